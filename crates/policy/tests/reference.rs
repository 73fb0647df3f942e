//! Property tests: random policies, checked against a deliberately naive second evaluator written
//! straight from the spec, and the invariants every policy must keep.
//!
//! The evaluator under test (`evaluate`, used by `explain`, `test`, `matrix` and `diff`) and the
//! compiled allowlists (both ends of every pair) must agree with the reference on every query.
//!
//! Scale with `BULKHEAD_PROPTEST_SCALE=N` (default 1: 300 policies, well over 10,000 queries).
//! A failure prints the seed and the policy; rerun one seed with `BULKHEAD_PROPTEST_SEED=S`.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_allowlist::{
    Allowlist, Decision, Network, Underlay, UnderlayHost, UnderlayMode, UnderlayRule, proto,
};
use bulkhead_policy::{Compiled, Conditions, Model, Probe, evaluate};

// ---------------------------------------------------------------------------------------------
// Randomness

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// A generated policy, kept as data so that tests can remove and add rules.

const T0: i64 = 1_900_000_000; // 2030-03-17
const CHECKS: &[&str] = &["c1", "c2"];

#[derive(Clone, Debug)]
struct GenIdentity {
    name: String,
    labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct GenSegment {
    name: String,
    selector: BTreeMap<String, String>,
    listed: Vec<String>,
}

#[derive(Clone, Debug)]
struct GenRule {
    name: String,
    deny: bool,
    from: Vec<String>,
    to: Vec<String>,
    ports: Vec<String>,
    not_before: Option<i64>,
    expires: Option<i64>,
    posture: Vec<String>,
}

/// The `underlay` block.
#[derive(Clone, Debug)]
struct GenUnderlay {
    mode: &'static str,
    /// Segment names; `None`: every identity.
    scope: Option<Vec<String>>,
    allow: Vec<GenUnderlayEntry>,
}

#[derive(Clone, Debug)]
struct GenUnderlayEntry {
    name: String,
    from: Vec<String>,
    to: Vec<String>,
    ports: Vec<String>,
}

#[derive(Clone, Debug)]
struct Gen {
    identities: Vec<GenIdentity>,
    segments: Vec<GenSegment>,
    rules: Vec<GenRule>,
    underlay: Option<GenUnderlay>,
}

fn time(t: i64) -> String {
    jiff::Timestamp::from_second(t).unwrap().to_string()
}

impl Gen {
    fn random(r: &mut Rng) -> Gen {
        let labels = |r: &mut Rng| {
            let mut l = BTreeMap::new();
            if r.chance(80) {
                l.insert("app".into(), r.pick(&["a", "b", "c"]).to_string());
            }
            if r.chance(70) {
                l.insert("env".into(), r.pick(&["p", "d"]).to_string());
            }
            l
        };
        let n_ident = 2 + r.below(10);
        let identities: Vec<GenIdentity> = (0..n_ident)
            .map(|i| GenIdentity {
                name: format!("i{i}"),
                labels: labels(r),
            })
            .collect();
        let segments: Vec<GenSegment> = (0..1 + r.below(5))
            .map(|i| {
                let mut selector = if r.chance(75) {
                    labels(r)
                } else {
                    BTreeMap::new()
                };
                let mut listed = Vec::new();
                if selector.is_empty() || r.chance(25) {
                    for _ in 0..1 + r.below(3) {
                        listed.push(r.pick(&identities).name.clone());
                    }
                }
                if selector.is_empty() && listed.is_empty() {
                    selector.insert("app".into(), "a".into());
                }
                GenSegment {
                    name: format!("s{i}"),
                    selector,
                    listed,
                }
            })
            .collect();
        let mut g = Gen {
            identities,
            segments,
            rules: Vec::new(),
            underlay: None,
        };
        for i in 0..r.below(9) {
            let deny = r.chance(25);
            let rule = g.random_rule(r, i, deny);
            g.rules.push(rule);
        }
        if r.chance(70) {
            g.underlay = Some(g.random_underlay(r));
        }
        g
    }

    /// A valid `underlay` block whatever the labels become: `to` names only `*`, segments of
    /// the scope, and identities those segments list by name.
    fn random_underlay(&self, r: &mut Rng) -> GenUnderlay {
        let segments: Vec<String> = self.segments.iter().map(|s| s.name.clone()).collect();
        let idents: Vec<String> = self.identities.iter().map(|i| i.name.clone()).collect();
        let scope = r.chance(50).then(|| {
            let mut v: Vec<String> = (0..1 + r.below(2))
                .map(|_| r.pick(&segments).clone())
                .collect();
            v.sort();
            v.dedup();
            v
        });
        let mut to_names = vec!["*".to_string()];
        match &scope {
            None => {
                to_names.extend(segments.iter().cloned());
                to_names.extend(idents.iter().cloned());
            }
            Some(sc) => {
                to_names.extend(sc.iter().cloned());
                for s in self.segments.iter().filter(|s| sc.contains(&s.name)) {
                    to_names.extend(s.listed.iter().cloned());
                }
            }
        }
        let mut from_names: Vec<String> = ["*", "10.9.0.0/16", "192.0.2.0/24", "198.51.100.7/32"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        from_names.extend(segments.iter().cloned());
        from_names.extend(idents.iter().cloned());
        let pick = |names: &[String], r: &mut Rng| -> Vec<String> {
            (0..1 + r.below(3)).map(|_| r.pick(names).clone()).collect()
        };
        let allow = (0..r.below(5))
            .map(|i| GenUnderlayEntry {
                name: format!("u{i}"),
                from: pick(&from_names, r),
                to: pick(&to_names, r),
                ports: pick(
                    &[
                        "tcp/22".to_string(),
                        "udp/53".to_string(),
                        "any".to_string(),
                    ],
                    r,
                ),
            })
            .collect();
        GenUnderlay {
            mode: ["off", "observe", "enforce", "enforce"][r.below(4)],
            scope,
            allow,
        }
    }

    fn random_side(&self, r: &mut Rng) -> Vec<String> {
        let mut names: Vec<String> = self.segments.iter().map(|s| s.name.clone()).collect();
        names.extend(self.identities.iter().map(|i| i.name.clone()));
        let mut side = Vec::new();
        for _ in 0..1 + r.below(2) {
            side.push(match r.below(20) {
                0 => "*".to_string(),
                1 | 2 => "quarantined".to_string(),
                _ => r.pick(&names).clone(),
            });
        }
        side
    }

    fn random_rule(&self, r: &mut Rng, i: usize, deny: bool) -> GenRule {
        const PORTS: &[&str] = &[
            "tcp/22",
            "tcp/80",
            "tcp/443",
            "tcp/5432",
            "tcp/1-1024",
            "tcp/80-90",
            "tcp/1000-65535",
            "udp/53",
            "udp/1-100",
            "tcp",
            "udp",
            "icmp",
            "any",
        ];
        let windows = [None, Some(T0 - 100), Some(T0 + 100)];
        let mut rule = GenRule {
            name: format!("{}{i}", if deny { "deny" } else { "allow" }),
            deny,
            from: self.random_side(r),
            to: self.random_side(r),
            ports: (0..1 + r.below(3))
                .map(|_| r.pick(PORTS).to_string())
                .collect(),
            not_before: if r.chance(15) {
                *r.pick(&windows)
            } else {
                None
            },
            expires: if r.chance(20) {
                *r.pick(&windows)
            } else {
                None
            },
            posture: Vec::new(),
        };
        if let (Some(a), Some(b)) = (rule.not_before, rule.expires)
            && a >= b
        {
            rule.not_before = None;
        }
        if !deny {
            for c in CHECKS {
                if r.chance(20) {
                    rule.posture.push(c.to_string());
                }
            }
        }
        rule
    }

    fn yaml(&self) -> String {
        let map = |m: &BTreeMap<String, String>| {
            let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{ {} }}", inner.join(", "))
        };
        let list = |v: &[String]| {
            let q: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", q.join(", "))
        };
        let mut y = String::from("version: 1\nnetwork: { cidr: 10.0.0.0/24 }\nidentities:\n");
        for i in &self.identities {
            y += &format!("  {}: {{ labels: {} }}\n", i.name, map(&i.labels));
        }
        y += "segments:\n";
        for s in &self.segments {
            let mut parts = Vec::new();
            if !s.selector.is_empty() {
                parts.push(format!("match: {}", map(&s.selector)));
            }
            if !s.listed.is_empty() {
                parts.push(format!("identities: {}", list(&s.listed)));
            }
            y += &format!("  {}: {{ {} }}\n", s.name, parts.join(", "));
        }
        y += "posture:\n  c1: { os.id: [debian] }\n  c2: { kernel.release: \">= 6.1\" }\n";
        y += "rules:\n";
        if self.rules.is_empty() {
            y.truncate(y.len() - "rules:\n".len());
            y += "rules: []\n";
        }
        for r in &self.rules {
            y += &format!(
                "  - name: {}\n    action: {}\n    from: {}\n    to: {}\n    ports: {}\n",
                r.name,
                if r.deny { "deny" } else { "allow" },
                list(&r.from),
                list(&r.to),
                list(&r.ports)
            );
            if let Some(t) = r.not_before {
                y += &format!("    not_before: {}\n", time(t));
            }
            if let Some(t) = r.expires {
                y += &format!("    expires: {}\n", time(t));
            }
            if !r.posture.is_empty() {
                y += &format!("    posture: {}\n", list(&r.posture));
            }
        }
        if let Some(u) = &self.underlay {
            y += &format!("underlay:\n  mode: {}\n", u.mode);
            if let Some(sc) = &u.scope {
                y += &format!("  scope: {}\n", list(sc));
            }
            y += "  allow:\n";
            if u.allow.is_empty() {
                y.truncate(y.len() - "  allow:\n".len());
                y += "  allow: []\n";
            }
            for e in &u.allow {
                y += &format!(
                    "    - {{ name: {}, from: {}, to: {}, ports: {} }}\n",
                    e.name,
                    list(&e.from),
                    list(&e.to),
                    list(&e.ports)
                );
            }
        }
        y
    }

    fn load(&self) -> Model {
        let text = self.yaml();
        let l = bulkhead_policy::load(&text, T0, &BTreeMap::new());
        let errors: Vec<String> = l
            .diagnostics
            .iter()
            .filter(|d| d.severity == bulkhead_policy::Severity::Error)
            .map(|d| d.render("gen.yaml"))
            .collect();
        assert!(errors.is_empty(), "{}\n{text}", errors.join("\n"));
        l.model.expect("valid generated policy")
    }
}

// ---------------------------------------------------------------------------------------------
// The reference evaluator: the spec, read literally, over the generated data.

struct World {
    now: i64,
    failing: BTreeSet<(String, String)>,
    quarantined: BTreeSet<String>,
}

impl World {
    fn conditions(&self) -> Conditions {
        Conditions {
            now: self.now,
            failing: self.failing.clone(),
            quarantined: self.quarantined.clone(),
        }
    }
}

fn on_side(g: &Gen, side: &[String], who: &str, w: &World) -> bool {
    side.iter().any(|name| {
        if name == "*" {
            return true;
        }
        if name == "quarantined" {
            return w.quarantined.contains(who);
        }
        if let Some(s) = g.segments.iter().find(|s| &s.name == name) {
            let me = g.identities.iter().find(|i| i.name == who).unwrap();
            let by_label = !s.selector.is_empty()
                && s.selector.iter().all(|(k, v)| me.labels.get(k) == Some(v));
            return by_label || s.listed.iter().any(|l| l == who);
        }
        name == who
    })
}

fn covers(port: &str, p: Probe) -> bool {
    let range = |s: &str| -> (u16, u16) {
        match s.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (s.parse().unwrap(), s.parse().unwrap()),
        }
    };
    match port {
        "any" => true,
        "icmp" => p.proto == proto::ICMP,
        "tcp" => p.proto == proto::TCP,
        "udp" => p.proto == proto::UDP,
        _ => {
            let (name, ports) = port.split_once('/').unwrap();
            let want = if name == "tcp" {
                proto::TCP
            } else {
                proto::UDP
            };
            let (lo, hi) = range(ports);
            p.proto == want && lo <= p.port && p.port <= hi
        }
    }
}

/// (allowed, deciding rule name)
fn reference(g: &Gen, a: &str, b: &str, p: Probe, w: &World) -> (bool, Option<String>) {
    if a == b {
        return (true, None);
    }
    let in_window = |r: &GenRule| {
        r.not_before.is_none_or(|t| t <= w.now) && r.expires.is_none_or(|t| w.now < t)
    };
    let matches = |r: &GenRule| {
        on_side(g, &r.from, a, w)
            && on_side(g, &r.to, b, w)
            && r.ports.iter().any(|x| covers(x, p))
            && in_window(r)
    };
    if let Some(r) = g.rules.iter().find(|r| r.deny && matches(r)) {
        return (false, Some(r.name.clone()));
    }
    let allowed = g.rules.iter().find(|r| {
        !r.deny
            && matches(r)
            && r.posture
                .iter()
                .all(|c| !w.failing.contains(&(a.to_string(), c.clone())))
            && (!w.quarantined.contains(a) || r.from.iter().any(|s| s == "quarantined"))
            && (!w.quarantined.contains(b) || r.to.iter().any(|s| s == "quarantined"))
    });
    match allowed {
        Some(r) => (true, Some(r.name.clone())),
        None => (false, None),
    }
}

/// The underlay part of `who`'s allowlist, from the spec and the policy docs, read literally.
fn reference_underlay(g: &Gen, who: &str, w: &World) -> Option<Underlay> {
    let u = g.underlay.as_ref()?;
    let mode = match u.mode {
        "observe" => UnderlayMode::Observe,
        "enforce" => UnderlayMode::Enforce,
        _ => return None,
    };
    let in_scope = |x: &str| u.scope.as_ref().is_none_or(|sc| on_side(g, sc, x, w));
    if !in_scope(who) {
        return None;
    }
    let quarantined = |x: &str| w.quarantined.contains(x);
    let is_net = |s: &str| s.contains('/');
    // `from` by name or segment: not `*`, not a network.
    let named_in_from = |e: &GenUnderlayEntry, x: &str| {
        let names: Vec<String> = e
            .from
            .iter()
            .filter(|s| *s != "*" && !is_net(s))
            .cloned()
            .collect();
        on_side(g, &names, x, w)
    };
    let to_holds = |e: &GenUnderlayEntry, x: &str| in_scope(x) && on_side(g, &e.to, x, w);
    let ports = |e: &GenUnderlayEntry| {
        e.ports
            .iter()
            .map(|p| bulkhead_policy::parse_port_spec(p).unwrap())
            .collect::<Vec<_>>()
    };
    let mut inbound = Vec::new();
    for e in u.allow.iter().filter(|e| to_holds(e, who)) {
        let mut hosts = Vec::new();
        for f in &e.from {
            let net = match f.as_str() {
                "*" => Some("0.0.0.0/0"),
                s if is_net(s) => Some(s),
                _ => None,
            };
            if let Some(n) = net {
                let (a, l) = n.split_once('/').unwrap();
                hosts.push(UnderlayHost::Net(Network {
                    address: a.parse().unwrap(),
                    prefix_len: l.parse().unwrap(),
                }));
            }
        }
        for i in &g.identities {
            if i.name != who && !quarantined(&i.name) && named_in_from(e, &i.name) {
                hosts.push(UnderlayHost::Identity(i.name.clone()));
            }
        }
        hosts.sort();
        hosts.dedup();
        if !hosts.is_empty() {
            inbound.push(UnderlayRule {
                name: e.name.clone(),
                hosts,
                ports: ports(e),
            });
        }
    }
    let mut outbound = Vec::new();
    for e in u.allow.iter().filter(|e| named_in_from(e, who)) {
        if quarantined(who) {
            break;
        }
        let mut hosts: Vec<UnderlayHost> = g
            .identities
            .iter()
            .filter(|i| i.name != who && to_holds(e, &i.name))
            .map(|i| UnderlayHost::Identity(i.name.clone()))
            .collect();
        hosts.sort();
        if !hosts.is_empty() {
            outbound.push(UnderlayRule {
                name: e.name.clone(),
                hosts,
                ports: ports(e),
            });
        }
    }
    Some(Underlay {
        mode,
        inbound,
        outbound,
    })
}

// ---------------------------------------------------------------------------------------------
// Queries

fn random_probe(r: &mut Rng) -> Probe {
    let port = *r.pick(&[
        1u16, 22, 53, 79, 80, 85, 90, 91, 100, 101, 443, 999, 1024, 1025, 5432, 65535,
    ]);
    match r.below(6) {
        0..=2 => Probe {
            proto: proto::TCP,
            port,
        },
        3 => Probe {
            proto: proto::UDP,
            port,
        },
        4 => Probe {
            proto: proto::ICMP,
            port: 0,
        },
        _ => Probe { proto: 47, port: 0 },
    }
}

fn random_world(g: &Gen, r: &mut Rng) -> World {
    let mut w = World {
        now: *r.pick(&[T0 - 200, T0 - 100, T0, T0 + 100, T0 + 200]),
        failing: BTreeSet::new(),
        quarantined: BTreeSet::new(),
    };
    for i in &g.identities {
        for c in CHECKS {
            if r.chance(20) {
                w.failing.insert((i.name.clone(), c.to_string()));
            }
        }
        if r.chance(12) {
            w.quarantined.insert(i.name.clone());
        }
    }
    w
}

/// Every port where the allowed set can change, so "is anything allowed" is decidable by probing.
fn boundary_probes(g: &Gen) -> Vec<Probe> {
    let mut ports: BTreeSet<u16> = [0, 1, 65535].into();
    for r in &g.rules {
        for p in &r.ports {
            if let Some((_, range)) = p.split_once('/') {
                let (lo, hi) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>().unwrap(), b.parse::<u16>().unwrap()),
                    None => (range.parse().unwrap(), range.parse().unwrap()),
                };
                ports.insert(lo);
                ports.insert(hi);
                ports.insert(hi.saturating_add(1));
            }
        }
    }
    let mut v: Vec<Probe> = Vec::new();
    for &port in &ports {
        v.push(Probe {
            proto: proto::TCP,
            port,
        });
        v.push(Probe {
            proto: proto::UDP,
            port,
        });
    }
    v.push(Probe {
        proto: proto::ICMP,
        port: 0,
    });
    v.push(Probe { proto: 47, port: 0 });
    v
}

fn scale() -> usize {
    std::env::var("BULKHEAD_PROPTEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn seeds(base: u64, n: usize) -> Vec<u64> {
    match std::env::var("BULKHEAD_PROPTEST_SEED") {
        Ok(s) => vec![s.parse().expect("a number")],
        Err(_) => (0..n as u64).map(|i| base + i).collect(),
    }
}

fn allowlists(m: &Model, w: &World) -> BTreeMap<String, Allowlist> {
    Compiled::new(m, m.state(&w.conditions()))
        .allowlists(m, 1)
        .into_iter()
        .map(|l| (l.identity.clone(), l))
        .collect()
}

fn rule_name(l: &Allowlist, d: Decision) -> (bool, Option<String>) {
    match d {
        Decision::Allow { rule } => (true, Some(l.rules[rule as usize].name.clone())),
        Decision::Deny { rule } => (false, rule.map(|r| l.rules[r as usize].name.clone())),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn evaluator_and_allowlists_agree_with_the_reference() {
    let mut queries = 0usize;
    for seed in seeds(1, 300 * scale()) {
        let mut r = Rng(seed);
        let g = Gen::random(&mut r);
        let m = g.load();
        let ctx = |what: &str| format!("seed {seed}: {what}\n{}", g.yaml());
        for _ in 0..4 {
            let w = random_world(&g, &mut r);
            let st = m.state(&w.conditions());
            let lists = allowlists(&m, &w);
            for _ in 0..12 {
                let a = r.pick(&g.identities).name.clone();
                let b = r.pick(&g.identities).name.clone();
                let p = random_probe(&mut r);
                queries += 1;
                let want = reference(&g, &a, &b, p, &w);
                let d = evaluate(&m, m.identity(&a).unwrap(), m.identity(&b).unwrap(), p, &st);
                let got = (d.allowed, d.rule.map(|x| m.rule(x).name.clone()));
                let q = format!(
                    "{a} -> {b} {p} at {} failing {:?} quarantined {:?}",
                    w.now, w.failing, w.quarantined
                );
                assert_eq!(got, want, "{}", ctx(&format!("evaluate: {q}")));
                if a == b {
                    continue;
                }
                // Both ends of the tunnel must reach the same verdict.
                let (la, lb) = (&lists[&a], &lists[&b]);
                let out = la
                    .peer(&b)
                    .map(|peer| rule_name(la, la.decide_outbound(peer, p.proto, p.port, w.now)))
                    .unwrap_or((false, None));
                let inb = lb
                    .peer(&a)
                    .map(|peer| rule_name(lb, lb.decide_inbound(peer, p.proto, p.port, w.now)))
                    .unwrap_or((false, None));
                assert_eq!(out.0, want.0, "{}", ctx(&format!("sender allowlist: {q}")));
                assert_eq!(
                    inb.0,
                    want.0,
                    "{}",
                    ctx(&format!("receiver allowlist: {q}"))
                );
                if want.0 {
                    assert_eq!(out.1, want.1, "{}", ctx(&format!("sender rule: {q}")));
                    assert_eq!(inb.1, want.1, "{}", ctx(&format!("receiver rule: {q}")));
                }
            }
        }
    }
    eprintln!("reference checks: {queries} queries");
    assert!(queries >= 10_000 || std::env::var("BULKHEAD_PROPTEST_SEED").is_ok());
}

#[test]
fn underlay_parts_agree_with_the_reference() {
    let mut checked = 0;
    for seed in seeds(60_000, 200 * scale()) {
        let mut r = Rng(seed);
        let g = Gen::random(&mut r);
        let m = g.load();
        let w = random_world(&g, &mut r);
        for (name, l) in allowlists(&m, &w) {
            let want = reference_underlay(&g, &name, &w);
            checked += usize::from(want.is_some());
            assert_eq!(
                l.underlay,
                want,
                "seed {seed}: {name} quarantined {:?}\n{}",
                w.quarantined,
                g.yaml()
            );
        }
    }
    assert!(checked >= 200 || std::env::var("BULKHEAD_PROPTEST_SEED").is_ok());
}

#[test]
fn a_peer_exists_exactly_when_some_traffic_is_allowed_either_way() {
    for seed in seeds(10_000, 150 * scale()) {
        let mut r = Rng(seed);
        let g = Gen::random(&mut r);
        let m = g.load();
        let w = random_world(&g, &mut r);
        let lists = allowlists(&m, &w);
        let probes = boundary_probes(&g);
        for a in &g.identities {
            let l = &lists[&a.name];
            assert!(
                l.peer(&a.name).is_none(),
                "seed {seed}: {} is its own peer",
                a.name
            );
            for b in g.identities.iter().filter(|b| b.name != a.name) {
                let any = |x: &str, y: &str| probes.iter().any(|&p| reference(&g, x, y, p, &w).0);
                let want = any(&a.name, &b.name) || any(&b.name, &a.name);
                assert_eq!(
                    l.peer(&b.name).is_some(),
                    want,
                    "seed {seed}: peer {} in {}'s allowlist\n{}",
                    b.name,
                    a.name,
                    g.yaml()
                );
            }
        }
    }
}

#[test]
fn an_empty_rule_list_denies_everything() {
    for seed in seeds(20_000, 50 * scale()) {
        let mut r = Rng(seed);
        let mut g = Gen::random(&mut r);
        g.rules.clear();
        let m = g.load();
        let w = random_world(&g, &mut r);
        for l in allowlists(&m, &w).values() {
            assert!(l.peers.is_empty(), "seed {seed}: {} has peers", l.identity);
        }
        let st = m.state(&w.conditions());
        for a in m.identity_ids() {
            for b in m.identity_ids().filter(|&b| b != a) {
                for p in boundary_probes(&g) {
                    assert!(!evaluate(&m, a, b, p, &st).allowed);
                }
            }
        }
    }
}

/// Checks that everything `narrow` allows, `wide` allows too, on every boundary probe.
fn assert_no_new_access(wide: &Gen, narrow: &Gen, w: &World, what: &str) {
    let (mw, mn) = (wide.load(), narrow.load());
    let (sw, sn) = (mw.state(&w.conditions()), mn.state(&w.conditions()));
    let probes = boundary_probes(wide);
    for a in &wide.identities {
        for b in &wide.identities {
            for &p in &probes {
                let id = |m: &Model, n: &str| m.identity(n).unwrap();
                let after = evaluate(&mn, id(&mn, &a.name), id(&mn, &b.name), p, &sn).allowed;
                let before = evaluate(&mw, id(&mw, &a.name), id(&mw, &b.name), p, &sw).allowed;
                assert!(
                    !after || before,
                    "{what} added {} -> {} {p}\n{}",
                    a.name,
                    b.name,
                    narrow.yaml()
                );
            }
        }
    }
}

#[test]
fn removing_an_allow_rule_never_adds_access() {
    for seed in seeds(30_000, 60 * scale()) {
        let mut r = Rng(seed);
        let g = Gen::random(&mut r);
        let allows: Vec<usize> = (0..g.rules.len()).filter(|&i| !g.rules[i].deny).collect();
        if allows.is_empty() {
            continue;
        }
        let mut narrow = g.clone();
        narrow.rules.remove(*r.pick(&allows));
        let w = random_world(&g, &mut r);
        assert_no_new_access(&g, &narrow, &w, &format!("seed {seed}: removing an allow"));
    }
}

#[test]
fn adding_a_deny_rule_never_adds_access() {
    for seed in seeds(40_000, 60 * scale()) {
        let mut r = Rng(seed);
        let g = Gen::random(&mut r);
        let mut narrow = g.clone();
        let deny = g.random_rule(&mut r, 99, true);
        narrow.rules.push(deny);
        let w = random_world(&g, &mut r);
        assert_no_new_access(&g, &narrow, &w, &format!("seed {seed}: adding a deny"));
    }
}

#[test]
fn incremental_recompiles_match_full_ones() {
    for seed in seeds(50_000, 100 * scale()) {
        let mut r = Rng(seed);
        let mut g = Gen::random(&mut r);
        let mut m = g.load();
        let w = random_world(&g, &mut r);
        let mut c = Compiled::new(&m, m.state(&w.conditions()));
        let before: Vec<Allowlist> = c.allowlists(&m, 1);

        // Relabel one identity, in the model and in the generated source.
        let who = r.below(g.identities.len());
        let fresh = Gen::random(&mut r).identities[0].labels.clone();
        g.identities[who].labels = fresh.clone();
        let id = m.identity(&g.identities[who].name).unwrap();
        m.set_labels(id, fresh);
        let affected = c.update_identity(&m, id);

        let reloaded = g.load();
        let full =
            Compiled::new(&reloaded, reloaded.state(&w.conditions())).allowlists(&reloaded, 1);
        let incremental = c.allowlists(&m, 1);
        assert_eq!(incremental, full, "seed {seed}: relabel\n{}", g.yaml());
        // Patching the old allowlists of the affected gives the same as building them anew.
        for &a in &affected {
            let mut list = before[a as usize].clone();
            if a == id {
                list = c.allowlist(&m, a, 1);
            } else {
                c.patch_allowlist(&m, &mut list, id);
            }
            assert_eq!(
                list,
                full[a as usize],
                "seed {seed}: patch {}\n{}",
                list.identity,
                g.yaml()
            );
        }
        for (i, (old, new)) in before.iter().zip(&full).enumerate() {
            if old != new {
                assert!(
                    affected.contains(&(i as u32)),
                    "seed {seed}: {} changed but was not reported",
                    new.identity
                );
            }
        }

        // Quarantine someone.
        let q = r.pick(&g.identities).name.clone();
        let on = !w.quarantined.contains(&q);
        c.set_quarantined(&m, m.identity(&q).unwrap(), on);
        let mut w2 = w.conditions();
        if on {
            w2.quarantined.insert(q);
        } else {
            w2.quarantined.remove(&q);
        }
        let full = Compiled::new(&reloaded, reloaded.state(&w2)).allowlists(&reloaded, 1);
        assert_eq!(
            c.allowlists(&m, 1),
            full,
            "seed {seed}: quarantine\n{}",
            g.yaml()
        );

        // Someone's posture changes (any subset of the checks fails), and maybe their
        // quarantine: one `set_conditions`, the same as a full compile, patches included.
        let before = c.allowlists(&m, 1);
        let who = r.pick(&g.identities).name.clone();
        let id = m.identity(&who).unwrap();
        let mut w3 = w2.clone();
        w3.failing.retain(|(i, _)| *i != who);
        let mut failing = Vec::new();
        for check in ["c1", "c2"] {
            if r.below(2) == 0
                && let Some(k) = m.check(check)
            {
                failing.push(k);
                w3.failing.insert((who.clone(), check.to_string()));
            }
        }
        let quarantine = r.below(2) == 0;
        if quarantine {
            w3.quarantined.insert(who.clone());
        } else {
            w3.quarantined.remove(&who);
        }
        let affected = c.set_conditions(&m, id, &failing, quarantine);
        let full = Compiled::new(&reloaded, reloaded.state(&w3)).allowlists(&reloaded, 1);
        assert_eq!(
            c.allowlists(&m, 1),
            full,
            "seed {seed}: conditions\n{}",
            g.yaml()
        );
        for (i, (old, new)) in before.iter().zip(&full).enumerate() {
            let i = i as u32;
            if old != new {
                assert!(
                    affected.contains(&i),
                    "seed {seed}: {} not reported",
                    new.identity
                );
            }
            if affected.contains(&i) && i != id {
                let mut list = old.clone();
                c.patch_allowlist(&m, &mut list, id);
                assert_eq!(&list, new, "seed {seed}: patch {}", new.identity);
            }
        }
    }
}
