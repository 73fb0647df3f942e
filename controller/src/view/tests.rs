use std::collections::BTreeMap;

use bulkhead_allowlist::Allowlist;
use bulkhead_policy::Compiled;
use bulkhead_proto::Quarantine;

use super::*;
use crate::records::{EndpointRecord, NodeRecord, PresenceRecord, encode};

/// The follower's steps, run one after the other with the view in hand.
impl View {
    fn put(&mut self, kv: &KeyValue, t: &mut Touched) {
        self.mirror.put(kv, t);
    }

    fn delete(&mut self, key: &str, t: &mut Touched) {
        self.mirror.delete(key, t);
    }

    fn distribute(&mut self, t: Touched) -> usize {
        self.settle(t)
    }

    /// Recompiles if conditions changed; the identities whose allowlists changed, if it did.
    fn refresh(&mut self, now: i64) -> Option<Vec<String>> {
        let mut t = Touched {
            conditions: true,
            ..Touched::default()
        };
        let job = self.job(&mut t, now);
        self.install(job.run()).map(|(changed, _)| changed)
    }
}

fn kv(key: &str, value: Vec<u8>, rev: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value,
        mod_revision: rev,
    }
}

const POLICY_TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
  c: {labels: {r: c}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}
";

fn node(id: &str, k: u8) -> NodeRecord {
    NodeRecord {
        identity: id.into(),
        wireguard_key: bulkhead_proto::PublicKey([k; 32]),
        credential: format!("fp-{id}"),
        enrolled: 0,
        pinned: None,
    }
}

/// A node's presence as its controller writes it: online now, enforcing revision 1.
fn reported(digest: Option<&str>, facts: bulkhead_proto::Facts) -> PresenceRecord {
    PresenceRecord {
        controller: "https://c:1".into(),
        online: true,
        since: unix_now(),
        last_seen: unix_now(),
        revision: Some(1),
        digest: digest.map(str::to_string),
        status: None,
        version: String::new(),
        facts,
        underlay: None,
    }
}

/// Revision 1 of `text` as the store holds it: chunks, then the head.
fn stored_policy(text: &str) -> (PolicyRecord, Vec<KeyValue>) {
    let rec = PolicyRecord {
        revision: 1,
        text: text.into(),
        source: "p.yaml".into(),
        applied_at: 0,
        applied_by: "admin".into(),
        addresses: BTreeMap::new(),
    };
    let (head, chunks) = rec.split();
    let mut kvs: Vec<KeyValue> = chunks.into_iter().map(|(k, b)| kv(&k, b, 1)).collect();
    kvs.push(kv(POLICY, encode(&head), 1));
    (rec, kvs)
}

#[test]
fn only_affected_nodes_are_sent_anything() {
    let mut v = View::default();
    let (rec, kvs) = stored_policy(POLICY_TEXT);
    let t = v.reset(
        &[
            kvs,
            vec![
                kv("nodes/a", encode(&node("a", 1)), 2),
                kv("nodes/b", encode(&node("b", 2)), 3),
                kv("nodes/c", encode(&node("c", 3)), 4),
            ],
        ]
        .concat(),
    );
    v.distribute(t);
    let (mut ra, mut rb, mut rc) = (v.subscribe("a"), v.subscribe("b"), v.subscribe("c"));
    ra.borrow_and_update();
    rb.borrow_and_update();
    rc.borrow_and_update();
    match &**ra.borrow() {
        NodeMessage::Config(c) => {
            assert_eq!(c.allowlist.identity, "a");
            assert_eq!(
                c.peers.keys().collect::<Vec<_>>(),
                ["b"],
                "own allowlist only"
            );
        }
        m => panic!("{m:?}"),
    }
    // c has no rule: it gets an allowlist with no peers, never a's or b's.
    match &**rc.borrow() {
        NodeMessage::Config(c) => assert!(c.allowlist.peers.is_empty() && c.peers.is_empty()),
        m => panic!("{m:?}"),
    }
    // b's endpoint changes: a (its peer) is sent a new config; c is not.
    let mut t = Touched::default();
    v.put(
        &kv(
            "endpoints/b",
            encode(&EndpointRecord {
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                underlay: None,
            }),
            5,
        ),
        &mut t,
    );
    assert_eq!(v.distribute(t), 1);
    assert!(ra.has_changed().unwrap());
    assert!(!rc.has_changed().unwrap());
    // b is revoked: a loses the peer; b's channel closes.
    let mut t = Touched::default();
    v.delete("nodes/b", &mut t);
    v.distribute(t);
    match &**ra.borrow_and_update() {
        NodeMessage::Config(c) => assert!(c.peers.is_empty()),
        m => panic!("{m:?}"),
    }
    assert!(rb.has_changed().is_err(), "the revoked node's stream ends");
    // A record that is not JSON is refused, and nothing else changes.
    let mut t = Touched::default();
    v.put(&kv("nodes/a", b"garbage".to_vec(), 7), &mut t);
    assert_eq!(v.mirror.nodes["a"], node("a", 1));
    // An older policy revision never replaces a newer one (a valid policy, so that only the
    // revision refuses it).
    let mut old = rec.clone();
    old.revision = 0;
    old.text = POLICY_TEXT.replace("tcp/80", "tcp/81");
    let (head, chunks) = old.split();
    let mut t = Touched::default();
    for (k, b) in chunks {
        v.put(&kv(&k, b, 8), &mut t);
    }
    v.put(&kv(POLICY, encode(&head), 8), &mut t);
    v.distribute(t);
    assert_eq!(v.revision(), 1);
    // A head whose chunks are not there is refused.
    let mut newer = rec.clone();
    newer.revision = 2;
    newer.text.push_str("# more\n");
    let mut t = Touched::default();
    v.put(&kv(POLICY, encode(&newer.split().0), 9), &mut t);
    v.distribute(t);
    assert_eq!(v.revision(), 1);
}

#[test]
fn in_sync_tells_allowlists_apart_that_a_condition_changed_under_one_revision() {
    let mut v = View::default();
    let (_, mut kvs) = stored_policy(POLICY_TEXT);
    kvs.push(kv("nodes/a", encode(&node("a", 1)), 2));
    kvs.push(kv("nodes/b", encode(&node("b", 2)), 3));
    let t = v.reset(&kvs);
    v.distribute(t);
    let before = v.allowlists["a"].digest.clone();
    assert_eq!(before.len(), 16);
    let reports = |digest: Option<&str>| reported(digest, Default::default());
    let mut t = Touched::default();
    v.put(
        &kv("presence/a", encode(&reports(Some(&before))), 4),
        &mut t,
    );
    v.distribute(t);
    assert!(v.in_sync("a"));
    // Quarantined: a's allowlist changes under the same policy revision.
    let q = Quarantine {
        since: unix_now(),
        until: None,
        reason: "by hand".into(),
        by: "admin".into(),
    };
    let mut t = Touched::default();
    v.put(&kv("quarantine/a", encode(&q), 5), &mut t);
    v.distribute(t);
    let after = v.allowlists["a"].digest.clone();
    assert_ne!(after, before);
    assert_eq!(v.allowlists["a"].revision, 1);
    assert!(
        !v.in_sync("a"),
        "a still reports the allowlist before the quarantine"
    );
    let mut t = Touched::default();
    v.put(&kv("presence/a", encode(&reports(Some(&after))), 6), &mut t);
    v.distribute(t);
    assert!(v.in_sync("a"));
    // A daemon that reports no digest is judged by its revision, as before.
    let mut t = Touched::default();
    v.put(&kv("presence/a", encode(&reports(None)), 7), &mut t);
    v.distribute(t);
    assert!(v.in_sync("a"));
    // Released: the same content as before, so the same digest again.
    let mut t = Touched::default();
    v.delete("quarantine/a", &mut t);
    v.distribute(t);
    assert_eq!(v.allowlists["a"].digest, before);
}

/// Allowlists as a full compile would give them now, without revision and digest.
fn full_compile(v: &View) -> BTreeMap<String, Allowlist> {
    let live = v.live.as_ref().unwrap();
    let m = &live.model;
    let state = m.state(&conditions::conditions(m, &v.inputs(unix_now())));
    Compiled::new(m, state)
        .allowlists(m, 0)
        .into_iter()
        .map(|l| (l.identity.clone(), l))
        .collect()
}

fn contents(v: &View) -> BTreeMap<String, Allowlist> {
    v.allowlists
        .iter()
        .map(|(id, l)| {
            let mut l = (**l).clone();
            l.revision = 0;
            l.digest.clear();
            (id.clone(), l)
        })
        .collect()
}

#[test]
fn condition_changes_recompile_only_whom_they_touch_and_equal_a_full_compile() {
    const TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
  c: {labels: {r: c}}
  d: {labels: {r: d}}
  e: {labels: {r: e}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
  sc: {match: {r: c}}
  sd: {match: {r: d}}
posture:
  edr: {check.edr: true}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}
  - {name: bc, from: [sb], to: [sc], ports: [tcp/5432], posture: [edr]}
  - {name: cd, from: [sc], to: [sd], ports: [tcp/22]}
  - {name: forensics, from: [sd], to: [quarantined], ports: [tcp/22]}
";
    let mut v = View::default();
    let (_, kvs) = stored_policy(TEXT);
    let t = v.reset(&kvs);
    v.distribute(t);
    assert_eq!(contents(&v), full_compile(&v), "b fails edr: no facts");
    let before = (*v.allowlists).clone();
    // b passes edr: b's and c's allowlists change, nobody else's.
    let fact = bulkhead_proto::Fact {
        value: "true".into(),
        interval: 30,
    };
    let mut t = Touched::default();
    v.put(
        &kv(
            "presence/b",
            encode(&reported(None, [("check.edr".to_string(), fact)].into())),
            4,
        ),
        &mut t,
    );
    assert_eq!(
        v.refresh(unix_now()),
        Some(vec!["b".to_string(), "c".to_string()])
    );
    assert_eq!(contents(&v), full_compile(&v));
    assert_eq!(
        v.allowlists["a"], before["a"],
        "untouched, revision and digest too"
    );
    assert_ne!(v.allowlists["b"].digest, before["b"].digest);
    // a and c quarantined at once: d gains both through `forensics`, b loses c.
    let q = Quarantine {
        since: unix_now(),
        until: None,
        reason: "by hand".into(),
        by: "admin".into(),
    };
    let mut t = Touched::default();
    v.put(&kv("quarantine/a", encode(&q), 5), &mut t);
    v.put(&kv("quarantine/c", encode(&q), 6), &mut t);
    let changed = v.refresh(unix_now()).unwrap();
    assert_eq!(changed, ["a", "b", "c", "d"]);
    assert_eq!(contents(&v), full_compile(&v));
    // Nothing new: nothing recompiled.
    assert_eq!(v.refresh(unix_now()), None);
    // Released: back to what a full compile of the passing state gives.
    let mut t = Touched::default();
    v.delete("quarantine/a", &mut t);
    v.delete("quarantine/c", &mut t);
    let changed = v.refresh(unix_now()).unwrap();
    assert_eq!(changed, ["a", "b", "c", "d"]);
    assert_eq!(contents(&v), full_compile(&v));
    assert_eq!(v.allowlists["e"], before["e"]);
}

#[test]
fn a_new_allowlist_survives_a_condition_refresh_that_touches_it() {
    // Revision 2 changes only rule ab's window: a's and b's allowlists differ from
    // revision 1 in their rules alone.
    let mut v = View::default();
    let (rec, kvs) = stored_policy(POLICY_TEXT);
    v.load(&kvs);
    let mut next = rec.clone();
    next.revision = 2;
    next.text = POLICY_TEXT.replace(
        "ports: [tcp/80]}",
        "ports: [tcp/80], expires: 2999-01-01T00:00:00Z}",
    );
    let (head, chunks) = next.split();
    let mut t = Touched::default();
    for (k, b) in chunks {
        v.put(&kv(&k, b, 2), &mut t);
    }
    v.put(&kv(POLICY, encode(&head), 2), &mut t);
    v.distribute(t);
    let window = |v: &View| v.allowlists["a"].rules[0].window;
    assert!(window(&v).expires.is_some());
    let changed = v.allowlists["a"].clone();
    // b quarantined, then released: a's allowlist is recompiled twice, and must come back
    // as revision 2 made it, never as revision 1 had it.
    let q = Quarantine {
        since: unix_now(),
        until: None,
        reason: "by hand".into(),
        by: "admin".into(),
    };
    let mut t = Touched::default();
    v.put(&kv("quarantine/b", encode(&q), 3), &mut t);
    v.distribute(t);
    assert!(v.allowlists["a"].peers.is_empty());
    let mut t = Touched::default();
    v.delete("quarantine/b", &mut t);
    v.distribute(t);
    assert_eq!(v.allowlists["a"], changed);
    assert_eq!(contents(&v), full_compile(&v));
}

#[test]
fn a_snapshot_brings_quarantines_and_facts_into_the_first_compile() {
    // As the store lists them: "policy" before "presence/" and "quarantine/".
    let (_, mut kvs) = stored_policy(POLICY_TEXT);
    let q = Quarantine {
        since: unix_now(),
        until: None,
        reason: "by hand".into(),
        by: "admin".into(),
    };
    kvs.push(kv("quarantine/a", encode(&q), 2));
    let mut v = View::default();
    v.load(&kvs);
    let a = &v.allowlists["a"];
    assert!(a.peers.is_empty(), "a is quarantined from the start: {a:?}");
    assert_eq!(contents(&v), full_compile(&v));
}

#[test]
fn posture_facts_switch_a_rule_on_and_off() {
    const TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
posture:
  edr: {check.edr: true}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80], posture: [edr]}
  - {name: ba, from: [sb], to: [sa], ports: [tcp/22]}
";
    let mut v = View::default();
    let (_, mut kvs) = stored_policy(TEXT);
    kvs.push(kv("nodes/a", encode(&node("a", 1)), 2));
    kvs.push(kv("nodes/b", encode(&node("b", 2)), 3));
    let t = v.reset(&kvs);
    v.distribute(t);
    let mut ra = v.subscribe("a");
    let rules = |rx: &mut watch::Receiver<Arc<NodeMessage>>| match &**rx.borrow_and_update() {
        NodeMessage::Config(c) => c
            .allowlist
            .rules
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>(),
        m => panic!("{m:?}"),
    };
    assert_eq!(rules(&mut ra), ["ba"], "no facts: the check fails");
    let presence = |edr: &str| {
        let fact = bulkhead_proto::Fact {
            value: edr.into(),
            interval: 30,
        };
        reported(None, [("check.edr".to_string(), fact)].into())
    };
    let mut t = Touched::default();
    v.put(&kv("presence/a", encode(&presence("true")), 4), &mut t);
    v.distribute(t);
    assert_eq!(rules(&mut ra), ["ab", "ba"], "the check passes");
    let mut t = Touched::default();
    v.put(&kv("presence/a", encode(&presence("false")), 5), &mut t);
    v.distribute(t);
    assert_eq!(rules(&mut ra), ["ba"], "the check fails again");
    // Stale facts fail: three intervals without a report.
    let mut p = presence("true");
    p.last_seen -= 91;
    let mut t = Touched::default();
    v.put(&kv("presence/a", encode(&p), 6), &mut t);
    v.distribute(t);
    assert_eq!(rules(&mut ra), ["ba"], "stale facts count as failing");
    assert!(v.next_event(unix_now()).is_none());
}

/// A policy this controller prepared (validated and compiled when applied) and a rule window
/// that opened between then and the store's confirmation: the window is in the allowlists.
#[test]
fn a_prepared_policy_is_compiled_again_when_a_window_opened_meanwhile() {
    let now = unix_now();
    let text = POLICY_TEXT.replace(
        "ports: [tcp/80]}",
        &format!(
            "ports: [tcp/80], not_before: {}}}",
            jiff::Timestamp::from_second(now - 5).unwrap()
        ),
    );
    let (rec, kvs) = stored_policy(&text);
    let loaded = bulkhead_policy::load(&text, now - 10, &rec.addresses);
    let model = loaded.model.unwrap();
    let compiled = Compiled::new(
        &model,
        model.state(&bulkhead_policy::Conditions::at(now - 10)),
    );
    assert!(
        compiled.allowlist(&model, 0, 1).peers.is_empty(),
        "compiled before the window opened"
    );
    let mut v = View::default();
    let model = Arc::new(model);
    v.prepare(Live {
        record: rec,
        plain: model.clone(),
        model,
        grants: Vec::new(),
        compiled,
    });
    v.load(&kvs);
    assert_eq!(
        v.allowlists["a"].peers.len(),
        1,
        "the rule is in force now: {:?}",
        v.allowlists["a"]
    );
}

/// A stored policy that does not resolve keeps the live one, and a quarantine that arrived in
/// the same batch still applies to it.
#[test]
fn conditions_apply_even_when_a_stored_policy_does_not_resolve() {
    let mut v = View::default();
    let (rec, kvs) = stored_policy(POLICY_TEXT);
    v.load(&kvs);
    assert_eq!(v.allowlists["a"].peers.len(), 1);
    let mut broken = rec.clone();
    broken.revision = 2;
    broken.text = "version: 1\nnot a policy\n".into();
    let (head, chunks) = broken.split();
    let mut t = Touched::default();
    for (k, b) in chunks {
        v.put(&kv(&k, b, 2), &mut t);
    }
    v.put(&kv(POLICY, encode(&head), 2), &mut t);
    let q = Quarantine {
        since: unix_now(),
        until: None,
        reason: "by hand".into(),
        by: "admin".into(),
    };
    v.put(&kv("quarantine/b", encode(&q), 3), &mut t);
    v.distribute(t);
    assert_eq!(v.revision(), 1, "the live policy stays");
    assert!(
        v.allowlists["a"].peers.is_empty(),
        "b's quarantine applies: {:?}",
        v.allowlists["a"]
    );
}

/// An approved access request puts its rule in the initiator's and the responder's allowlists,
/// ending with it; the view drops it at its end with no store event, and a pending or denied
/// one never gets there.
#[test]
fn approved_access_comes_and_goes_with_its_time() {
    use bulkhead_proto::{AccessState, AccessView, Approval};
    let text = POLICY_TEXT.replace(
        "  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}\n",
        "  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}\n  - {name: ssh, from: [sa], to: [sb], ports: [tcp/22], approval: {max: 1h}}\n",
    );
    let now = unix_now();
    let request = |state, until: Option<i64>| AccessView {
        id: "0a0b0c0d".into(),
        rule: "ssh".into(),
        from: Some("a".into()),
        duration: 600,
        reason: "x".into(),
        requester: "alice".into(),
        created: now - 5,
        approve_by: now + 3600,
        approvers_needed: 1,
        approvals: vec![Approval {
            by: "bob".into(),
            at: now - 1,
        }],
        state,
        start: until.map(|_| now - 1),
        until,
        closed_by: None,
    };
    let rules = |v: &View, id: &str| -> Vec<(String, Option<i64>)> {
        v.allowlists[id]
            .rules
            .iter()
            .map(|r| (r.name.clone(), r.window.expires))
            .collect()
    };
    let mut v = View::default();
    let (_, kvs) = stored_policy(&text);
    let pending = kv(
        "access/0a0b0c0d",
        encode(&request(AccessState::Pending, None)),
        2,
    );
    v.load(&[kvs.clone(), vec![pending]].concat());
    assert_eq!(
        rules(&v, "a"),
        [("ab".to_string(), None)],
        "pending: not in force"
    );

    let until = now + 600;
    let mut t = Touched::default();
    v.put(
        &kv(
            "access/0a0b0c0d",
            encode(&request(AccessState::Approved, Some(until))),
            3,
        ),
        &mut t,
    );
    v.distribute(t);
    let want = [
        ("ab".to_string(), None),
        ("ssh@0a0b0c0d".to_string(), Some(until)),
    ];
    assert_eq!(rules(&v, "a"), want);
    assert_eq!(rules(&v, "b"), want, "the responder holds the same end");
    assert_eq!(v.next_event(now), Some(until));
    // At its end, the view drops it with no store event.
    assert!(v.refresh(until).is_some());
    assert_eq!(rules(&v, "a"), [("ab".to_string(), None)]);

    // Denied: never in force.
    let mut v = View::default();
    let mut denied = request(AccessState::Denied, None);
    denied.closed_by = Some("carol".into());
    v.load(&[kvs, vec![kv("access/0a0b0c0d", encode(&denied), 2)]].concat());
    assert_eq!(rules(&v, "a"), [("ab".to_string(), None)]);
}
