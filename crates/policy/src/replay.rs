//! `bulkhead policy plan FILE --replay D` (spec §9): the recorded flows of a period replayed
//! against a policy, connection by connection.
//!
//! **Before** is what happened: the verdict each aggregate was recorded with (allowed and
//! would-deny flows got through, denied ones did not). **After** is what the policy says now:
//! [`evaluate`] on the overlay; on the underlay, both ends' host firewalls as
//! [`underlay::explain`] sees them, with the initiator's recorded underlay address (an
//! initiator that is not an identity is judged by the responder's firewall alone, and a
//! responder that is not an identity is not the policy's business: let through). On the
//! overlay, an end named by an identity the policy does not have is denied; an end that is an
//! address (outside the estate) is not replayed, only counted ([`Replay::outside`]).
//!
//! A connection is **newly denied** when flows of it got through and the policy denies it (an
//! underlay connection only observed, `would-deny`, still gets through); **newly allowed** when
//! flows of it were denied and the policy lets it through.

use std::collections::HashMap;

use bulkhead_allowlist::{UnderlayHost, UnderlayMode};
use serde::Serialize;

use crate::ast::Probe;
use crate::eval::{State, evaluate, ports_cover};
use crate::model::Model;
use crate::observed::{Connection, Flow, Way, connections};
use crate::underlay;

/// What the policy does with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Let through; by this rule or entry, if one decides.
    Allow,
    /// Let through, but logged: an underlay firewall in `observe` has no entry for it.
    WouldDeny,
    /// Denied.
    Deny,
}

impl After {
    /// Whether it gets through.
    pub fn passes(&self) -> bool {
        *self != After::Deny
    }
}

/// One connection whose fate changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Initiator, as recorded.
    pub from: String,
    /// Responder, as recorded.
    pub to: String,
    /// Protocol and port.
    pub port: String,
    /// Overlay or underlay.
    pub path: Way,
    /// The flows whose fate changes: those that got through (newly denied) or were denied
    /// (newly allowed).
    pub count: u64,
    /// The first flow of the connection, Unix milliseconds.
    pub first: i64,
    /// The last.
    pub last: i64,
    /// The rules that decided it when recorded.
    pub before_rules: Vec<String>,
    /// What the policy does with it.
    pub after: After,
    /// The rule or entry that decides now, if any.
    pub after_rule: Option<String>,
    /// Why, for people.
    pub reason: String,
}

/// The replay of a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replay {
    /// Aggregates replayed.
    pub aggregates: usize,
    /// Flows replayed.
    pub flows: u64,
    /// Distinct connections.
    pub connections: usize,
    /// Connections whose flows got through and would be denied.
    pub newly_denied: Vec<Change>,
    /// Connections whose flows were denied and would get through.
    pub newly_allowed: Vec<Change>,
    /// Overlay connections with an end outside the estate (an address no identity has), which
    /// no policy decides: not replayed.
    pub outside: usize,
}

/// Replays `flows` against `m` in `st`.
pub fn replay(m: &Model, st: &State, flows: &[Flow]) -> Replay {
    let conns = connections(flows);
    let mut out = Replay {
        aggregates: flows.len(),
        flows: flows.iter().map(|f| f.count).sum(),
        connections: conns.len(),
        ..Replay::default()
    };
    let mut underlay_parts = HashMap::new();
    for c in &conns {
        let address = |n: &str| m.identity(n).is_none() && n.parse::<std::net::Ipv4Addr>().is_ok();
        if c.path == Way::Overlay && (address(&c.src) || address(&c.dst)) {
            out.outside += 1;
            continue;
        }
        let (after, rule, reason) = match c.path {
            Way::Overlay => overlay(m, st, c),
            // With the servers' own addresses, a rule carries the connection through the
            // tunnel; without one it stays on the underlay, where the host firewall decides.
            Way::Underlay if m.policy().addressing == bulkhead_allowlist::Addressing::Underlay => {
                match overlay(m, st, c) {
                    allowed @ (After::Allow, _, _) => allowed,
                    _ => underlay_after(m, st, c, &mut underlay_parts),
                }
            }
            Way::Underlay => underlay_after(m, st, c, &mut underlay_parts),
        };
        let change = |count: u64| Change {
            from: c.src.clone(),
            to: c.dst.clone(),
            port: c.probe.to_string(),
            path: c.path,
            count,
            first: c.first,
            last: c.last,
            before_rules: c.rules.clone(),
            after: after.clone(),
            after_rule: rule.clone(),
            reason: reason.clone(),
        };
        if c.passed() > 0 && !after.passes() {
            out.newly_denied.push(change(c.passed()));
        }
        if c.denied > 0 && after.passes() {
            out.newly_allowed.push(change(c.denied));
        }
    }
    out
}

fn overlay(m: &Model, st: &State, c: &Connection) -> (After, Option<String>, String) {
    let (a, b) = match (m.identity(&c.src), m.identity(&c.dst)) {
        (Some(a), Some(b)) => (a, b),
        (a, _) => {
            let who = if a.is_none() { &c.src } else { &c.dst };
            return (
                After::Deny,
                None,
                format!("{who} is not an identity of the policy"),
            );
        }
    };
    let d = evaluate(m, a, b, c.probe, st);
    let rule = d.rule.map(|r| m.rule(r).name.clone());
    let reason = match (&rule, d.allowed, d.self_traffic) {
        (_, _, true) => "traffic of an identity to itself".to_string(),
        (Some(r), true, _) => format!("allowed by rule {r}"),
        (Some(r), false, _) => format!("denied by deny rule {r}"),
        (None, _, _) => "no rule allows it: default deny".to_string(),
    };
    let after = if d.allowed { After::Allow } else { After::Deny };
    (after, rule, reason)
}

type Parts = HashMap<u32, Option<bulkhead_allowlist::Underlay>>;

fn underlay_after(
    m: &Model,
    st: &State,
    c: &Connection,
    parts: &mut Parts,
) -> (After, Option<String>, String) {
    let Some(b) = m.identity(&c.dst) else {
        return (
            After::Allow,
            None,
            format!(
                "{} is not an enrolled server: the host firewall leaves it alone",
                c.dst
            ),
        );
    };
    let Some(a) = m.identity(&c.src) else {
        return from_address(m, st, c, b, parts);
    };
    let e = underlay::explain(m, st, a, b, c.probe, Some(c.src_address));
    let entry = |f: &underlay::Filter| match f {
        underlay::Filter::Allowed { entry } => Some(entry.name.clone()),
        _ => None,
    };
    let rule = entry(&e.inbound.filter).or_else(|| entry(&e.outbound.filter));
    let end = |x: &underlay::End, dir: &str| {
        format!(
            "{}'s firewall ({}) has no entry for it {dir}",
            x.identity, x.mode
        )
    };
    match e.verdict {
        underlay::Verdict::Deny | underlay::Verdict::Depends => {
            let x = if e.outbound.passes() == Some(false) {
                end(&e.outbound, "out")
            } else {
                end(&e.inbound, "in")
            };
            (After::Deny, rule, x)
        }
        underlay::Verdict::Allow => {
            if e.outbound.would_deny() == Some(true) {
                (After::WouldDeny, rule, end(&e.outbound, "out"))
            } else if e.inbound.would_deny() == Some(true) {
                (After::WouldDeny, rule, end(&e.inbound, "in"))
            } else {
                let why = rule.as_ref().map_or_else(
                    || "no firewall filters it".to_string(),
                    |r| format!("allowed by underlay entry {r}"),
                );
                (After::Allow, rule, why)
            }
        }
    }
}

/// An underlay connection from an address that is no identity's: the responder's firewall
/// alone decides, by the networks in its inbound entries.
fn from_address(
    m: &Model,
    st: &State,
    c: &Connection,
    b: u32,
    parts: &mut Parts,
) -> (After, Option<String>, String) {
    let part = parts
        .entry(b)
        .or_insert_with(|| underlay::underlay_of(m, st, b));
    let Some(u) = part else {
        return (
            After::Allow,
            None,
            format!("{} has no host firewall", c.dst),
        );
    };
    let admits = |p: Probe| {
        u.inbound.iter().find(|r| {
            ports_cover(&r.ports, p)
                && r.hosts.iter().any(|h| match h {
                    UnderlayHost::Net(n) => n.prefix_len == 0 || n.contains(c.src_address),
                    UnderlayHost::Identity(_) => false,
                })
        })
    };
    if let Some(r) = admits(c.probe) {
        return (
            After::Allow,
            Some(r.name.clone()),
            format!("allowed by underlay entry {}", r.name),
        );
    }
    let why = format!(
        "{}'s firewall ({}) has no entry for {}",
        c.dst, u.mode, c.src_address
    );
    match u.mode {
        UnderlayMode::Observe => (After::WouldDeny, None, why),
        UnderlayMode::Enforce => (After::Deny, None, why),
        UnderlayMode::Off => (After::Allow, None, "no firewall filters it".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::Conditions;
    use crate::observed::Seen;

    const NOW: i64 = 1_800_000_000;

    const OLD: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web } }
  web-2: { labels: { app: web } }
  db-1: { labels: { app: db } }
segments:
  web: { match: { app: web } }
rules:
  - { name: web-to-db, from: [web], to: [db-1], ports: [tcp/5432] }
underlay:
  mode: enforce
  allow:
    - { name: mgmt, from: [10.0.9.0/24], to: ["*"], ports: [tcp/22] }
"#;

    fn model(text: &str) -> Model {
        let l = crate::load(text, NOW, &BTreeMap::new());
        assert!(l.is_valid(), "{:?}", l.diagnostics);
        l.model.unwrap()
    }

    fn flow(src: &str, dst: &str, port: u16, verdict: Seen, path: Way) -> Flow {
        Flow {
            hour: 1_799_996_400,
            src: src.into(),
            src_address: Ipv4Addr::new(10, 0, 9, 7),
            dst: dst.into(),
            dst_address: Ipv4Addr::new(10, 0, 0, 9),
            probe: Probe { proto: 6, port },
            verdict,
            path,
            rule: None,
            count: 3,
            first: 1_799_996_400_000,
            last: 1_799_996_500_000,
        }
    }

    fn run(policy: &str, flows: &[Flow]) -> Replay {
        let m = model(policy);
        replay(&m, &m.state(&Conditions::at(NOW)), flows)
    }

    #[test]
    fn newly_denied_and_newly_allowed_connections() {
        let flows = vec![
            flow("web-1", "db-1", 5432, Seen::Allow, Way::Overlay),
            flow("web-2", "db-1", 5432, Seen::Allow, Way::Overlay),
            flow("db-1", "web-1", 22, Seen::Deny, Way::Overlay),
            flow("ops", "db-1", 22, Seen::Allow, Way::Underlay),
            flow("web-1", "203.0.113.9", 443, Seen::Allow, Way::Overlay),
        ];
        // The same policy: nothing changes.
        let r = run(OLD, &flows);
        assert!(
            r.newly_denied.is_empty() && r.newly_allowed.is_empty(),
            "{r:?}"
        );
        assert_eq!((r.aggregates, r.flows, r.connections), (5, 15, 5));
        assert_eq!(r.outside, 1);

        // web-2 loses the database, db-1 gains SSH to web-1, and the management network
        // loses the underlay.
        let new = OLD
            .replace("from: [web], to: [db-1]", "from: [web-1], to: [db-1]")
            .replace(
                "rules:\n",
                "rules:\n  - { name: db-ssh, from: [db-1], to: [web], ports: [tcp/22] }\n",
            )
            .replace("10.0.9.0/24", "10.0.8.0/24");
        let r = run(&new, &flows);
        let denied: Vec<(&str, &str, &str, Way)> = r
            .newly_denied
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str(), c.port.as_str(), c.path))
            .collect();
        assert_eq!(
            denied,
            [
                ("web-2", "db-1", "tcp/5432", Way::Overlay),
                ("ops", "db-1", "tcp/22", Way::Underlay)
            ]
        );
        assert_eq!(r.newly_denied[0].count, 3);
        assert_eq!(r.newly_denied[0].after, After::Deny);
        assert!(r.newly_denied[1].reason.contains("10.0.9.7"), "{r:?}");
        assert_eq!(r.newly_allowed.len(), 1);
        assert_eq!(r.newly_allowed[0].after_rule.as_deref(), Some("db-ssh"));

        // Observing instead of enforcing: the underlay connection still gets through.
        let observing = new.replace("mode: enforce", "mode: observe");
        let r = run(&observing, &flows);
        assert_eq!(r.newly_denied.len(), 1, "{r:?}");

        // An identity dropped from the policy loses its connections.
        let gone = OLD.replace("  web-2: { labels: { app: web } }\n", "");
        let r = run(&gone, &flows);
        assert_eq!(r.newly_denied.len(), 1);
        assert!(
            r.newly_denied[0]
                .reason
                .contains("web-2 is not an identity")
        );
    }
}
