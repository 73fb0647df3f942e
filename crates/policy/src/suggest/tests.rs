#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::*;
use crate::eval::State;
use crate::observed::Seen;
use crate::splice::{Block, splice};

const NOW: i64 = 1_800_000_000;
const HOUR: i64 = 1_799_996_400;

const BASE: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web, env: prod } }
  web-2: { labels: { app: web, env: prod } }
  web-3: { labels: { app: web, env: dev } }
  db-1: { labels: { app: db, env: prod } }
  db-2: { labels: { app: db, env: prod } }
  cache-1: { labels: { app: cache, env: prod } }
  bastion: { labels: { role: admin } }
  app-web: {}
segments:
  admins: { match: { role: admin } }
  prod-db: { match: { app: db, env: prod } }
rules:
  - { name: admin-ssh, from: [admins], to: ["*"], ports: [tcp/22] }
  - { name: no-dev-to-db, action: deny, from: [web-3], to: [prod-db], ports: [any] }
underlay:
  mode: observe
  scope: [prod-db]
"#;

fn model(text: &str) -> Model {
    let l = crate::load(text, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}\n{text}", l.diagnostics);
    l.model.unwrap()
}

fn f(src: &str, dst: &str, proto: u8, port: u16, verdict: Seen, path: Way) -> Flow {
    Flow {
        hour: HOUR,
        src: src.into(),
        src_address: Ipv4Addr::new(198, 18, 0, 1),
        dst: dst.into(),
        dst_address: Ipv4Addr::new(198, 18, 0, 2),
        probe: Probe { proto, port },
        verdict,
        path,
        rule: None,
        count: 2,
        first: HOUR * 1000,
        last: HOUR * 1000 + 60_000,
    }
}

fn tcp(src: &str, dst: &str, port: u16) -> Flow {
    f(src, dst, proto::TCP, port, Seen::Allow, Way::Overlay)
}

fn flows() -> Vec<Flow> {
    let mut v = Vec::new();
    for w in ["web-1", "web-2"] {
        for d in ["db-1", "db-2"] {
            v.push(tcp(w, d, 5432));
            v.push(f(w, d, proto::TCP, 5433, Seen::Deny, Way::Overlay));
        }
    }
    v.push(tcp("web-1", "cache-1", 6379));
    v.push(tcp("bastion", "db-1", 22));
    v.push(f(
        "web-3",
        "db-1",
        proto::TCP,
        5432,
        Seen::Deny,
        Way::Overlay,
    ));
    v.push(tcp("web-1", "203.0.113.5", 443));
    for p in 40000..40010 {
        v.push(tcp("db-1", "web-1", p));
    }
    v.push(tcp("web-1", "web-1", 8080));
    v.push(f("web-1", "db-1", 47, 0, Seen::Allow, Way::Overlay));
    for d in ["db-1", "db-2"] {
        v.push(f(
            "bastion",
            d,
            proto::TCP,
            22,
            Seen::WouldDeny,
            Way::Underlay,
        ));
    }
    v.push(f(
        "db-1",
        "web-1",
        proto::TCP,
        8080,
        Seen::WouldDeny,
        Way::Underlay,
    ));
    v
}

fn rule_view(r: &Suggested) -> (String, String, String) {
    (r.from.join(","), r.to.join(","), r.ports.join(","))
}

/// The base with the suggestion spliced in, as `--full` writes it.
fn merged(base: &str, s: &Suggestion) -> String {
    splice(
        base,
        &[
            (Block::Segments, s.segment_items()),
            (Block::Rules, s.rule_items()),
            (Block::UnderlayAllow, s.underlay_items()),
        ],
        "# suggested",
    )
    .unwrap()
}

#[test]
fn pairs_become_rules_between_segments_and_the_rest_is_reported() {
    let m = model(BASE);
    let s = suggest(&m, &flows(), &Options::at(NOW));
    let rules: Vec<_> = s.rules.iter().map(rule_view).collect();
    assert_eq!(
        rules,
        [
            (
                "app-web-env-prod".into(),
                "prod-db".into(),
                "tcp/5432-5433".into()
            ),
            ("web-1".into(), "cache-1".into(), "tcp/6379".into()),
        ],
        "{s:#?}"
    );
    // `app-web` is taken by an identity, but the most specific label set is used anyway.
    assert_eq!(s.segments.len(), 1);
    assert_eq!(s.segments[0].name, "app-web-env-prod");
    assert_eq!(s.segments[0].members, ["web-1", "web-2"]);
    assert_eq!(s.rules[0].name, "app-web-env-prod-to-prod-db");
    assert_eq!(s.rules[0].covers.len(), 8);
    assert_eq!(s.rules[0].unobserved, 0);

    let underlay: Vec<_> = s.underlay.iter().map(rule_view).collect();
    assert_eq!(
        underlay,
        [("admins".into(), "prod-db".into(), "tcp/22".into())]
    );

    let kinds: BTreeMap<&str, usize> = s.skipped.iter().fold(BTreeMap::new(), |mut m, x| {
        *m.entry(x.kind).or_default() += 1;
        m
    });
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("denied-by-rule", 1),
            ("ephemeral", 10),
            ("outside", 1),
            ("outside-scope", 1),
            ("protocol", 1),
            ("self", 1),
        ])
    );
    assert_eq!(s.kept.len(), 1);
    assert_eq!(s.kept[0].rule.as_deref(), Some("admin-ssh"));
    assert_eq!(s.connections, s.covered() + s.skipped.len());
}

#[test]
fn the_additions_are_yaml_that_keeps_every_observed_connection_working_and_nothing_else() {
    let base = model(BASE);
    let flows = flows();
    let s = suggest(&base, &flows, &Options::at(NOW));
    let text = merged(BASE, &s);
    let new = model(&text);
    keeps_working_and_adds_nothing_unobserved(&base, &new, &flows, &s, true);
    // The additions alone are YAML with the same blocks.
    let alone = crate::yaml::parse(&s.yaml("# header\n")).unwrap();
    let crate::yaml::Value::Map(top) = alone.value else {
        panic!("not a mapping");
    };
    let keys: Vec<&str> = top.iter().filter_map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["segments", "rules", "underlay"]);
}

/// The property `suggest` promises: every observed connection it does not skip gets through
/// the merged policy, and the merged policy lets through nothing new that was not observed.
fn keeps_working_and_adds_nothing_unobserved(
    base: &Model,
    new: &Model,
    flows: &[Flow],
    s: &Suggestion,
    exact: bool,
) {
    let (sb, sn) = (
        base.state(&Conditions::at(NOW)),
        new.state(&Conditions::at(NOW)),
    );
    let skipped: BTreeSet<(&str, &str, String, Way)> = s
        .skipped
        .iter()
        .map(|x| (x.from.as_str(), x.to.as_str(), x.port.clone(), x.path))
        .collect();
    let mut observed: BTreeSet<(String, String, Probe, Way)> = BTreeSet::new();
    for fl in flows {
        observed.insert((fl.src.clone(), fl.dst.clone(), fl.probe, fl.path));
        if skipped.contains(&(
            fl.src.as_str(),
            fl.dst.as_str(),
            fl.probe.to_string(),
            fl.path,
        )) {
            continue;
        }
        let (a, b) = (
            new.identity(&fl.src).unwrap(),
            new.identity(&fl.dst).unwrap(),
        );
        match fl.path {
            Way::Overlay => assert!(
                evaluate(new, a, b, fl.probe, &sn).allowed,
                "{} -> {} {} is not allowed",
                fl.src,
                fl.dst,
                fl.probe
            ),
            Way::Underlay => {
                let e = underlay::explain(new, &sn, a, b, fl.probe, Some(fl.src_address));
                assert!(underlay_passes(&e), "{e:?}");
            }
        }
    }
    if !exact {
        return;
    }
    let mut probes: BTreeSet<Probe> = flows.iter().map(|f| f.probe).collect();
    probes.insert(Probe {
        proto: proto::TCP,
        port: 1,
    });
    for x in new.identity_ids() {
        for y in new.identity_ids().filter(|&y| y != x) {
            let (nx, ny) = (new.identity_name(x), new.identity_name(y));
            let (bx, by) = (base.identity(nx).unwrap(), base.identity(ny).unwrap());
            for &p in &probes {
                let key = |w| (nx.to_string(), ny.to_string(), p, w);
                if evaluate(new, x, y, p, &sn).allowed && !evaluate(base, bx, by, p, &sb).allowed {
                    assert!(
                        observed.contains(&key(Way::Overlay)),
                        "{nx} -> {ny} {p} is newly allowed but was never observed"
                    );
                }
                let pass = |m: &Model, st: &State, a, b| {
                    underlay_passes(&underlay::explain(m, st, a, b, p, None))
                };
                if pass(new, &sn, x, y) && !pass(base, &sb, bx, by) {
                    assert!(
                        observed.contains(&key(Way::Underlay)),
                        "{nx} -> {ny} {p} newly passes the underlay but was never observed"
                    );
                }
            }
        }
    }
}

#[test]
fn a_product_is_generalised_only_when_every_pair_was_observed_unless_told_otherwise() {
    let base = model(BASE);
    // Three of the four web -> db pairs.
    let flows: Vec<Flow> = [("web-1", "db-1"), ("web-1", "db-2"), ("web-2", "db-1")]
        .into_iter()
        .map(|(a, b)| tcp(a, b, 5432))
        .collect();
    let s = suggest(&base, &flows, &Options::at(NOW));
    let rules: Vec<_> = s.rules.iter().map(rule_view).collect();
    assert_eq!(
        rules,
        [
            ("web-1".into(), "prod-db".into(), "tcp/5432".into()),
            ("web-2".into(), "db-1".into(), "tcp/5432".into()),
        ]
    );
    keeps_working_and_adds_nothing_unobserved(&base, &model(&merged(BASE, &s)), &flows, &s, true);

    let loose = Options {
        coverage: 0.75,
        ..Options::at(NOW)
    };
    let s = suggest(&base, &flows, &loose);
    let rules: Vec<_> = s.rules.iter().map(rule_view).collect();
    assert_eq!(
        rules,
        [(
            "app-web-env-prod".into(),
            "prod-db".into(),
            "tcp/5432".into()
        )]
    );
    assert_eq!(s.rules[0].unobserved, 1);
}

#[test]
fn high_ports_are_ephemeral_only_when_many_distinct_ones_are_seen() {
    let base = model(BASE);
    let few: Vec<Flow> = (40000..40003).map(|p| tcp("web-1", "db-1", p)).collect();
    let s = suggest(&base, &few, &Options::at(NOW));
    assert!(s.skipped.is_empty(), "{:?}", s.skipped);
    assert_eq!(s.rules[0].ports, ["tcp/40000-40002"]);
    let many: Vec<Flow> = (0..8)
        .map(|i| tcp("web-1", "db-1", 50000 + 7 * i))
        .collect();
    let s = suggest(&base, &many, &Options::at(NOW));
    assert!(s.rules.is_empty());
    assert_eq!(s.skipped.len(), 8);
    assert!(s.skipped.iter().all(|x| x.kind == "ephemeral"));
    // A low port of the same responder is still a service.
    let mut mixed = many.clone();
    mixed.push(tcp("web-1", "db-1", 5432));
    let s = suggest(&base, &mixed, &Options::at(NOW));
    assert_eq!(s.rules.len(), 1);
    assert_eq!(s.rules[0].ports, ["tcp/5432"]);
}

#[test]
fn without_a_host_firewall_underlay_flows_need_nothing() {
    let base_text = BASE.replace("  mode: observe\n  scope: [prod-db]\n", "  mode: off\n");
    let base = model(&base_text);
    let flows = vec![f(
        "bastion",
        "db-1",
        proto::TCP,
        22,
        Seen::Allow,
        Way::Underlay,
    )];
    let s = suggest(&base, &flows, &Options::at(NOW));
    assert!(s.is_empty());
    assert_eq!(s.kept.len(), 1);
    assert!(s.yaml("# h\n").ends_with("{}\n"));
}

#[test]
fn names_never_collide_with_the_base() {
    // A rule and a segment already have the names the suggestion would take.
    let base_text = BASE
        .replace(
            "  prod-db: { match: { app: db, env: prod } }\n",
            "  prod-db: { match: { app: db, env: prod } }\n  app-web-env-prod: { identities: [bastion] }\n",
        )
        .replace(
            "rules:\n",
            "rules:\n  - { name: app-web-env-prod-2-to-prod-db, from: [admins], to: [prod-db], ports: [tcp/1] }\n",
        );
    let base = model(&base_text);
    let s = suggest(&base, &flows(), &Options::at(NOW));
    assert_eq!(s.segments[0].name, "app-web-env-prod-2");
    assert_eq!(s.rules[0].name, "app-web-env-prod-2-to-prod-db-2");
    model(&merged(&base_text, &s));
}

#[test]
fn label_values_that_yaml_would_read_otherwise_are_quoted() {
    assert_eq!(scalar("web"), "web");
    assert_eq!(scalar("true"), "\"true\"");
    assert_eq!(scalar("12"), "\"12\"");
    assert_eq!(scalar("a b\"c"), "\"a b\\\"c\"");
    assert_eq!(slug("Team/Payments EU"), "team-payments-eu");
    assert_eq!(slug("--"), "suggested");
    assert!(slug(&"x".repeat(100)).len() <= 63);
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn random_histories_keep_working_and_add_nothing_unobserved() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..40 {
        let n = 4 + r.below(10);
        let mut text = String::from("version: 1\nnetwork: { cidr: 10.0.0.0/24 }\nidentities:\n");
        for i in 0..n {
            text += &format!(
                "  h-{i}: {{ labels: {{ app: a{}, env: e{}, zone: z{} }} }}\n",
                r.below(3),
                r.below(2),
                r.below(2)
            );
        }
        text += "segments:\n  s0: { match: { app: a0 } }\n  s1: { identities: [h-0, h-1] }\n";
        text += "rules:\n  - { name: base, from: [s1], to: [s0], ports: [tcp/80] }\n";
        if r.below(2) == 0 {
            text += "  - { name: no, action: deny, from: [h-2], to: [\"*\"], ports: [tcp/443] }\n";
        }
        if r.below(2) == 0 {
            text += "underlay:\n  mode: enforce\n  scope: [s0]\n";
        }
        let base = model(&text);
        let mut flows = Vec::new();
        for _ in 0..r.below(40) + 1 {
            let (a, b) = (r.below(n), r.below(n));
            let port = [80, 443, 5432, 5433, 22][r.below(5)];
            let path = if r.below(4) == 0 {
                Way::Underlay
            } else {
                Way::Overlay
            };
            let verdict = [Seen::Allow, Seen::Deny, Seen::WouldDeny][r.below(3)];
            flows.push(f(
                &format!("h-{a}"),
                &format!("h-{b}"),
                proto::TCP,
                port,
                verdict,
                path,
            ));
        }
        let coverage = [1.0, 1.0, 0.5][r.below(3)];
        let opt = Options {
            coverage,
            ..Options::at(NOW)
        };
        let s = suggest(&base, &flows, &opt);
        let full = merged(&text, &s);
        let new = model(&full);
        assert_eq!(s.connections, s.covered() + s.skipped.len(), "case {case}");
        keeps_working_and_adds_nothing_unobserved(&base, &new, &flows, &s, coverage == 1.0);
    }
}

/// With the servers' own addresses (spec §8), what was seen on the underlay between two servers
/// becomes a rule: the tunnel then carries it with no change to the application, and the
/// underlay can be closed. Replay agrees: the suggestion keeps it working.
#[test]
fn with_servers_own_addresses_underlay_connections_become_rules() {
    let text = BASE
        .replace(
            "network: { cidr: 10.0.0.0/24 }",
            "network: { cidr: 198.18.0.0/24, addressing: underlay }",
        )
        .replace("  mode: observe\n  scope: [prod-db]\n", "  mode: observe\n");
    let base = model(&text);
    let seen = vec![f(
        "web-1",
        "db-1",
        proto::TCP,
        5432,
        Seen::WouldDeny,
        Way::Underlay,
    )];
    let s = suggest(&base, &seen, &Options::at(NOW));
    assert_eq!(s.rules.len(), 1, "{s:?}");
    assert!(s.underlay.is_empty(), "{:?}", s.underlay);
    assert_eq!(s.rules[0].ports, ["tcp/5432"]);
}
