#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::BTreeMap;

use bulkhead_allowlist::{
    Allowlist, Network, PortSpec, Underlay, UnderlayHost, UnderlayMode, UnderlayRule,
};

use crate::{Compiled, Conditions, Model};

const NOW: i64 = 1_800_000_000;

const POLICY: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web, env: prod } }
  web-2: { labels: { app: web, env: prod } }
  db-1: { labels: { app: db, env: prod } }
  dev-1: { labels: { env: dev } }
  bastion: { labels: { role: admin } }
segments:
  prod: { match: { env: prod } }
  web: { match: { app: web } }
  db: { match: { app: db } }
  admins: { match: { role: admin } }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
underlay:
  mode: enforce
  scope: [prod]
  allow:
    - { name: mgmt-ssh, from: [10.0.9.0/24, admins], to: ["*"], ports: [tcp/22] }
    - { name: sync, from: [web], to: [db, web], ports: [tcp/873] }
    - { name: public, from: ["*", 10.0.9.0/24], to: [web-1], ports: [tcp/443, tcp/80] }
    - { name: dev-pull, from: [dev-1], to: [db-1], ports: [tcp/5432] }
"#;

fn model(text: &str) -> Model {
    let l = crate::load(text, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    l.model.unwrap()
}

fn conditions(quarantined: &[&str]) -> Conditions {
    let mut c = Conditions::at(NOW);
    c.quarantined = quarantined.iter().map(|s| s.to_string()).collect();
    c
}

/// Every identity's underlay part, by name, from a full compile.
fn underlays(text: &str, quarantined: &[&str]) -> BTreeMap<String, Option<Underlay>> {
    let m = model(text);
    Compiled::new(&m, m.state(&conditions(quarantined)))
        .allowlists(&m, 1)
        .into_iter()
        .map(|l| (l.identity, l.underlay))
        .collect()
}

fn net(s: &str) -> UnderlayHost {
    let (a, n) = s.split_once('/').unwrap();
    UnderlayHost::Net(Network {
        address: a.parse().unwrap(),
        prefix_len: n.parse().unwrap(),
    })
}

fn id(s: &str) -> UnderlayHost {
    UnderlayHost::Identity(s.to_string())
}

fn tcp(p: u16) -> PortSpec {
    PortSpec::Tcp { lo: p, hi: p }
}

fn rule(name: &str, hosts: Vec<UnderlayHost>, ports: Vec<PortSpec>) -> UnderlayRule {
    UnderlayRule {
        name: name.to_string(),
        hosts,
        ports,
    }
}

fn enforce(inbound: Vec<UnderlayRule>, outbound: Vec<UnderlayRule>) -> Option<Underlay> {
    Some(Underlay {
        mode: UnderlayMode::Enforce,
        inbound,
        outbound,
    })
}

fn mgmt(hosts: Vec<UnderlayHost>) -> UnderlayRule {
    rule("mgmt-ssh", hosts, vec![tcp(22)])
}

#[test]
fn inbound_and_outbound_by_scope_segment_and_star() {
    let u = underlays(POLICY, &[]);
    // Outside the scope: no host firewall, even when named in `from`.
    assert_eq!(u["bastion"], None);
    assert_eq!(u["dev-1"], None);
    let ssh = || mgmt(vec![net("10.0.9.0/24"), id("bastion")]);
    assert_eq!(
        u["web-1"],
        enforce(
            vec![
                ssh(),
                rule("sync", vec![id("web-2")], vec![tcp(873)]),
                // "*" is 0.0.0.0/0, sorted with the other networks; ports as written.
                rule(
                    "public",
                    vec![net("0.0.0.0/0"), net("10.0.9.0/24")],
                    vec![tcp(443), tcp(80)]
                ),
            ],
            vec![rule("sync", vec![id("db-1"), id("web-2")], vec![tcp(873)])],
        )
    );
    assert_eq!(
        u["web-2"],
        enforce(
            vec![ssh(), rule("sync", vec![id("web-1")], vec![tcp(873)])],
            vec![rule("sync", vec![id("db-1"), id("web-1")], vec![tcp(873)])],
        )
    );
    assert_eq!(
        u["db-1"],
        enforce(
            vec![
                ssh(),
                rule("sync", vec![id("web-1"), id("web-2")], vec![tcp(873)]),
                rule("dev-pull", vec![id("dev-1")], vec![tcp(5432)]),
            ],
            vec![],
        )
    );
}

#[test]
fn without_a_scope_every_identity_is_in_it_and_star_is_everyone_else() {
    let text = POLICY.replace("  scope: [prod]\n", "");
    let u = underlays(&text, &[]);
    assert_eq!(
        u["bastion"],
        enforce(
            // Itself left out of its own inbound hosts.
            vec![mgmt(vec![net("10.0.9.0/24")])],
            vec![mgmt(vec![
                id("db-1"),
                id("dev-1"),
                id("web-1"),
                id("web-2")
            ])],
        )
    );
    assert_eq!(
        u["dev-1"],
        enforce(
            vec![mgmt(vec![net("10.0.9.0/24"), id("bastion")])],
            vec![rule("dev-pull", vec![id("db-1")], vec![tcp(5432)])],
        )
    );
}

#[test]
fn mode_off_or_no_block_leaves_every_server_alone_and_observe_is_carried() {
    for text in [
        POLICY.replace("mode: enforce", "mode: off"),
        POLICY.replace("  mode: enforce\n", ""),
        POLICY[..POLICY.find("underlay:").unwrap()].to_string(),
    ] {
        let u = underlays(&text, &[]);
        assert!(u.values().all(Option::is_none), "{text}\n{u:?}");
    }
    let u = underlays(&POLICY.replace("mode: enforce", "mode: observe"), &[]);
    let enforced = underlays(POLICY, &[]);
    for (name, got) in &u {
        let want = enforced[name].clone().map(|mut x| {
            x.mode = UnderlayMode::Observe;
            x
        });
        assert_eq!(got, &want, "{name}");
    }
}

#[test]
fn quarantine_keeps_inbound_drops_outbound_and_leaves_others_inbound_hosts() {
    let u = underlays(POLICY, &["web-1"]);
    let before = underlays(POLICY, &[]);
    let mut web1 = before["web-1"].clone().unwrap();
    web1.outbound.clear();
    assert_eq!(u["web-1"], Some(web1));
    // web-2's sync entry had web-1 only: it goes.
    assert_eq!(
        u["web-2"],
        enforce(
            vec![mgmt(vec![net("10.0.9.0/24"), id("bastion")])],
            vec![rule("sync", vec![id("db-1"), id("web-1")], vec![tcp(873)])],
        )
    );
    assert_eq!(
        u["db-1"].as_ref().unwrap().inbound[1],
        rule("sync", vec![id("web-2")], vec![tcp(873)])
    );

    // Out of scope, but named in `from`: gone from every server's hosts; the network stays.
    let u = underlays(POLICY, &["bastion", "dev-1"]);
    for name in ["web-1", "web-2", "db-1"] {
        let ul = u[name].as_ref().unwrap();
        assert_eq!(ul.inbound[0], mgmt(vec![net("10.0.9.0/24")]), "{name}");
        assert!(ul.inbound.iter().all(|r| r.name != "dev-pull"), "{name}");
    }
}

/// Allowlists compiled incrementally, and patched, are the full compile's.
fn assert_same(c: &Compiled, m: &Model, full: &[Allowlist], what: &str) {
    assert_eq!(c.allowlists(m, 1), full, "{what}");
}

#[test]
fn incremental_paths_give_the_full_compile() {
    let mut m = model(POLICY);
    let mut c = Compiled::new(&m, m.state(&conditions(&[])));
    let before = c.allowlists(&m, 1);

    // Quarantine bastion: it has no peers on the overlay, but every server in scope has it as
    // an inbound host.
    let bastion = m.identity("bastion").unwrap();
    let affected = c.set_conditions(&m, bastion, &[], true);
    let names: Vec<&str> = affected.iter().map(|&i| m.identity_name(i)).collect();
    for n in ["bastion", "db-1", "web-1", "web-2"] {
        assert!(names.contains(&n), "{n} not reported: {names:?}");
    }
    let full = Compiled::new(&m, m.state(&conditions(&["bastion"]))).allowlists(&m, 1);
    assert_same(&c, &m, &full, "quarantine bastion");
    for &a in &affected {
        let mut list = before[a as usize].clone();
        c.patch_allowlist(&m, &mut list, bastion);
        assert_eq!(list, full[a as usize], "patch {}", list.identity);
    }
    for (i, (old, new)) in before.iter().zip(&full).enumerate() {
        assert!(
            old == new || affected.contains(&(i as u32)),
            "{}",
            new.identity
        );
    }

    // dev-1 joins prod: it enters the scope and the `to: ["*"]` of mgmt-ssh.
    let before = c.allowlists(&m, 1);
    let dev = m.identity("dev-1").unwrap();
    m.set_labels(dev, [("env".to_string(), "prod".to_string())].into());
    let affected = c.update_identity(&m, dev);
    let relabeled = POLICY.replace(
        "dev-1: { labels: { env: dev } }",
        "dev-1: { labels: { env: prod } }",
    );
    let m2 = model(&relabeled);
    let full = Compiled::new(&m2, m2.state(&conditions(&["bastion"]))).allowlists(&m2, 1);
    assert!(full[dev as usize].underlay.is_some());
    assert_same(&c, &m, &full, "relabel dev-1");
    for (i, (old, new)) in before.iter().zip(&full).enumerate() {
        assert!(
            old == new || affected.contains(&(i as u32)),
            "{}",
            new.identity
        );
        if affected.contains(&(i as u32)) && i as u32 != dev {
            let mut list = old.clone();
            c.patch_allowlist(&m, &mut list, dev);
            assert_eq!(&list, new, "patch {}", new.identity);
        }
    }

    // web-1 quarantined: db-1 and web-2 lose it as a host.
    let web1 = m.identity("web-1").unwrap();
    let affected = c.set_quarantined(&m, web1, true);
    for n in ["db-1", "web-2"] {
        assert!(affected.contains(&m.identity(n).unwrap()), "{n}");
    }
    let full = Compiled::new(&m2, m2.state(&conditions(&["bastion", "web-1"]))).allowlists(&m2, 1);
    assert_same(&c, &m, &full, "quarantine web-1");
}

fn explain_in(
    text: &str,
    quarantined: &[&str],
    a: &str,
    b: &str,
    port: &str,
    from_address: Option<&str>,
) -> super::Explanation {
    let m = model(text);
    let st = m.state(&conditions(quarantined));
    super::explain(
        &m,
        &st,
        m.identity(a).unwrap(),
        m.identity(b).unwrap(),
        crate::parse_probe(port).unwrap(),
        from_address.map(|s| s.parse().unwrap()),
    )
}

fn allowed(name: &str, line: u32) -> super::Filter {
    super::Filter::Allowed {
        entry: super::EntryAt {
            name: name.to_string(),
            line,
        },
    }
}

#[test]
fn explain_looks_at_both_ends() {
    use super::{Filter, Verdict};
    let x = |a, b, port, addr| explain_in(POLICY, &[], a, b, port, addr);

    let e = x("web-1", "db-1", "tcp/873", None);
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.outbound.filter, allowed("sync", 21));
    assert_eq!(e.inbound.filter, allowed("sync", 21));
    assert_eq!(e.inbound.mode, UnderlayMode::Enforce);

    // dev-1 is outside the scope: its server does not filter.
    let e = x("dev-1", "db-1", "tcp/5432", None);
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.outbound.filter, Filter::NotFiltered);
    assert!(!e.outbound.in_scope);
    assert_eq!(e.inbound.filter, allowed("dev-pull", 23));

    // SSH from dev-1's server: only the management network could let it in.
    let e = x("dev-1", "db-1", "tcp/22", None);
    assert_eq!(e.verdict, Verdict::Depends);
    let Filter::DependsOnAddress { entries } = &e.inbound.filter else {
        panic!("{e:?}");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0.name, "mgmt-ssh");
    assert_eq!(entries[0].1[0].to_string(), "10.0.9.0/24");
    let e = x("dev-1", "db-1", "tcp/22", Some("10.0.9.5"));
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.inbound.filter, allowed("mgmt-ssh", 20));
    let e = x("dev-1", "db-1", "tcp/22", Some("10.1.0.1"));
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.inbound.filter, Filter::NoEntry);

    // "*" admits anyone at web-1, but db-1 may open nothing to other servers.
    let e = x("db-1", "web-1", "tcp/443", None);
    assert_eq!(e.inbound.filter, allowed("public", 22));
    assert_eq!(e.outbound.filter, Filter::NoEntry);
    assert_eq!(e.verdict, Verdict::Deny);
    // In observe it passes, logged as would-deny.
    let e = explain_in(
        &POLICY.replace("mode: enforce", "mode: observe"),
        &[],
        "db-1",
        "web-1",
        "tcp/443",
        None,
    );
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.outbound.would_deny(), Some(true));
    assert_eq!(e.inbound.would_deny(), Some(false));

    // Ports count.
    assert_eq!(x("web-1", "db-1", "tcp/874", None).verdict, Verdict::Deny);

    // Quarantined: no outbound entries, and no longer a host of db-1's.
    let e = explain_in(POLICY, &["web-1"], "web-1", "db-1", "tcp/873", None);
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(e.outbound.quarantined);
    assert_eq!(e.outbound.filter, Filter::NoEntry);
    assert_eq!(e.inbound.filter, Filter::NoEntry);
    // Operators still reach it.
    let e = explain_in(POLICY, &["web-1"], "bastion", "web-1", "tcp/22", None);
    assert_eq!(e.verdict, Verdict::Allow);

    let e = x("web-1", "web-1", "tcp/22", None);
    assert!(e.self_traffic);
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.inbound.filter, Filter::NotFiltered);
}

fn plan_between(old: &str, new: &str) -> crate::reach::Plan {
    let (ma, mb) = (model(old), model(new));
    let ca = Compiled::new(&ma, ma.state(&conditions(&[])));
    let cb = Compiled::new(&mb, mb.state(&conditions(&[])));
    crate::reach::plan(Some((&ma, &ca)), (&mb, &cb))
}

#[test]
fn plans_show_the_block_and_each_server() {
    assert!(plan_between(POLICY, POLICY).underlay.is_empty());

    let p = plan_between(POLICY, &POLICY.replace("mode: enforce", "mode: observe")).underlay;
    assert_eq!(p.block.len(), 1);
    assert_eq!(p.block[0].item, "mode");
    assert_eq!(p.block[0].before.as_deref(), Some("enforce"));
    assert_eq!(p.block[0].after.as_deref(), Some("observe"));
    let servers: Vec<(&str, UnderlayMode, UnderlayMode, usize)> = p
        .servers
        .iter()
        .map(|s| {
            (
                s.identity.as_str(),
                s.before,
                s.after,
                s.gained.len() + s.lost.len(),
            )
        })
        .collect();
    let (e, o) = (UnderlayMode::Enforce, UnderlayMode::Observe);
    assert_eq!(
        servers,
        vec![("db-1", e, o, 0), ("web-1", e, o, 0), ("web-2", e, o, 0)]
    );

    // A port changes: the entry, and what crosses each firewall.
    let p = plan_between(
        POLICY,
        &POLICY.replace("ports: [tcp/873]", "ports: [tcp/874]"),
    )
    .underlay;
    assert_eq!(p.block.len(), 1);
    assert_eq!(p.block[0].item, "allow sync");
    assert_eq!(
        p.block[0].after.as_deref(),
        Some("from web; to db, web; ports tcp/874")
    );
    let web1 = p.servers.iter().find(|s| s.identity == "web-1").unwrap();
    assert_eq!(
        web1.gained,
        vec![
            "in tcp/874 from web-2",
            "out tcp/874 to db-1",
            "out tcp/874 to web-2"
        ]
    );
    assert_eq!(web1.lost.len(), 3);

    // The block as written is the same, but admins gain a member: every server in scope lets
    // one more host in.
    let p = plan_between(
        POLICY,
        &POLICY.replace(
            "  bastion: { labels: { role: admin } }\n",
            "  bastion: { labels: { role: admin } }\n  bastion-2: { labels: { role: admin } }\n",
        ),
    );
    assert_eq!(p.identities_added, vec!["bastion-2"]);
    assert!(p.underlay.block.is_empty());
    assert_eq!(p.underlay.servers.len(), 3);
    for s in &p.underlay.servers {
        assert_eq!(s.gained, vec!["in tcp/22 from bastion-2"], "{}", s.identity);
        assert!(s.lost.is_empty());
    }

    // The block goes: every item, and every server's firewall.
    let p = plan_between(POLICY, &POLICY[..POLICY.find("underlay:").unwrap()]).underlay;
    let items: Vec<&str> = p.block.iter().map(|c| c.item.as_str()).collect();
    assert_eq!(
        items,
        vec![
            "mode",
            "scope",
            "allow mgmt-ssh",
            "allow sync",
            "allow public",
            "allow dev-pull"
        ]
    );
    assert!(p.block[2..].iter().all(|c| c.after.is_none()));
    assert_eq!(p.block[1].after.as_deref(), Some("every identity"));
    assert!(
        p.servers
            .iter()
            .all(|s| s.after == UnderlayMode::Off && s.gained.is_empty())
    );
}
