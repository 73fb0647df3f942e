//! Who can reach whom: the matrix, and what changes between two policies.

use std::collections::BTreeMap;

use bulkhead_allowlist::{AccessSet, Decision, PortTable, RuleRef, UnixTime, proto};
use serde::Serialize;

use crate::compile::Compiled;
use crate::model::{IdentityId, Model, RuleId};

/// What one identity may open to another, and the allow rules that grant it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// Initiator.
    pub from: IdentityId,
    /// Responder.
    pub to: IdentityId,
    /// Everything allowed now.
    pub access: AccessSet,
    /// The allow rules deciding some part of it, ascending.
    pub rules: Vec<RuleId>,
    /// The conditions some of it holds under, sorted; empty if all of it is unconditional.
    pub caveats: Vec<Caveat>,
}

/// A condition that access granted by one rule holds under: the rule's time window, and the
/// posture checks its initiator must pass. Part of reachability: the same ports behind a posture
/// check, or until another date, are not the same access.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Caveat {
    /// The ports of the granting rule, as written.
    pub ports: Vec<String>,
    /// In force from this time (RFC 3339), if the rule says `not_before`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// In force until this time (RFC 3339), if the rule says `expires`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The posture checks the initiator must pass.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub posture: Vec<String>,
}

impl Caveat {
    /// The caveat of rule `r`, or `None` if it grants unconditionally.
    pub fn of(m: &Model, r: RuleId) -> Option<Caveat> {
        let rule = m.rule(r);
        let w = rule.window;
        if w.not_before.is_none() && w.expires.is_none() && rule.posture.is_empty() {
            return None;
        }
        let time = |t: UnixTime| {
            jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |ts| ts.to_string())
        };
        Some(Caveat {
            ports: rule.ports.iter().map(ToString::to_string).collect(),
            not_before: w.not_before.map(time),
            expires: w.expires.map(time),
            posture: rule
                .posture
                .iter()
                .map(|&c| m.check_name(c).to_string())
                .collect(),
        })
    }
}

impl std::fmt::Display for Caveat {
    /// E.g. `tcp/22: posture patched, until 2026-12-31T18:00:00Z`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut terms = Vec::new();
        if !self.posture.is_empty() {
            terms.push(format!("posture {}", self.posture.join("+")));
        }
        if let Some(t) = &self.not_before {
            terms.push(format!("from {t}"));
        }
        if let Some(t) = &self.expires {
            terms.push(format!("until {t}"));
        }
        write!(f, "{}: {}", self.ports.join(", "), terms.join(", "))
    }
}

fn caveats(m: &Model, rules: &[RuleId]) -> Vec<Caveat> {
    let mut out: Vec<Caveat> = rules.iter().filter_map(|&r| Caveat::of(m, r)).collect();
    out.sort();
    out.dedup();
    out
}

/// The allow rules that decide some part of a table at `now`.
fn granting_rules(t: &PortTable, refs: &[RuleRef], now: UnixTime) -> Vec<RuleId> {
    let mut probes: Vec<(u8, u16)> = t.tcp.iter().map(|s| (proto::TCP, s.lo)).collect();
    probes.extend(t.udp.iter().map(|s| (proto::UDP, s.lo)));
    probes.push((proto::ICMP, 0));
    probes.push((0, 0));
    let mut rules: Vec<RuleId> = probes
        .into_iter()
        .filter_map(|(p, port)| match t.decide(refs, p, port, now) {
            Decision::Allow { rule } => Some(rule),
            Decision::Deny { .. } => None,
        })
        .collect();
    rules.sort_unstable();
    rules.dedup();
    rules
}

/// Every ordered pair with something allowed, in id order.
pub fn reachability(m: &Model, c: &Compiled) -> Vec<Reach> {
    let now = c.state().now;
    let refs = m.rule_refs();
    c.tables()
        .filter_map(|(from, to, t)| {
            let access = t.access(refs, now);
            (!access.is_empty()).then(|| {
                let rules = granting_rules(t, refs, now);
                Reach {
                    from,
                    to,
                    access,
                    caveats: caveats(m, &rules),
                    rules,
                }
            })
        })
        .collect()
}

/// A change of reachability for one ordered pair, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairChange {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// Allowed now and not before.
    pub gained: AccessSet,
    /// Allowed before and not now.
    pub lost: AccessSet,
}

/// A change in the conditions of one ordered pair's access, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConditionChange {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// The conditions before; empty if the access was unconditional or there was none.
    pub before: Vec<Caveat>,
    /// The conditions after.
    pub after: Vec<Caveat>,
}

type ByName = BTreeMap<(String, String), (AccessSet, Vec<Caveat>)>;

fn by_name((m, c): (&Model, &Compiled)) -> ByName {
    reachability(m, c)
        .into_iter()
        .map(|r| {
            (
                (
                    m.identity_name(r.from).to_string(),
                    m.identity_name(r.to).to_string(),
                ),
                (r.access, r.caveats),
            )
        })
        .collect()
}

/// Reachability gained and lost between two policies, pair by pair, sorted by names.
pub fn diff(old: (&Model, &Compiled), new: (&Model, &Compiled)) -> Vec<PairChange> {
    access_changes(&by_name(old), &by_name(new))
}

fn keys<'a>(a: &'a ByName, b: &'a ByName) -> Vec<&'a (String, String)> {
    let mut keys: Vec<&(String, String)> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys
}

fn access_changes(a: &ByName, b: &ByName) -> Vec<PairChange> {
    let empty = AccessSet::default();
    keys(a, b)
        .into_iter()
        .filter_map(|k| {
            let x = a.get(k).map_or(&empty, |v| &v.0);
            let y = b.get(k).map_or(&empty, |v| &v.0);
            let change = PairChange {
                from: k.0.clone(),
                to: k.1.clone(),
                gained: y.minus(x),
                lost: x.minus(y),
            };
            (!change.gained.is_empty() || !change.lost.is_empty()).then_some(change)
        })
        .collect()
}

/// The pairs whose access holds under other conditions than before (posture checks added or
/// dropped, windows moved), sorted by names; including pairs that gain or lose all access under
/// a condition.
fn condition_changes(a: &ByName, b: &ByName) -> Vec<ConditionChange> {
    keys(a, b)
        .into_iter()
        .filter_map(|k| {
            let before = a.get(k).map(|v| v.1.clone()).unwrap_or_default();
            let after = b.get(k).map(|v| v.1.clone()).unwrap_or_default();
            (before != after).then(|| ConditionChange {
                from: k.0.clone(),
                to: k.1.clone(),
                before,
                after,
            })
        })
        .collect()
}

/// What applying a policy changes: identities added and removed, reachability gained and
/// lost pair by pair, and the underlay. Against no policy at all, everything the new one allows
/// is gained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Identities only the new policy has.
    pub identities_added: Vec<String>,
    /// Identities only the old policy has.
    pub identities_removed: Vec<String>,
    /// Pair by pair, sorted by names.
    pub changes: Vec<PairChange>,
    /// Pairs whose access holds under other conditions, sorted by names. Against no policy at
    /// all, empty: `changes` says what is gained, with [`reachability`] for its conditions.
    pub conditions: Vec<ConditionChange>,
    /// What changes on the underlay: the block, and server by server.
    #[serde(skip_serializing_if = "crate::underlay::Plan::is_empty")]
    pub underlay: crate::underlay::Plan,
}

/// The plan from `old` (if any) to `new`.
pub fn plan(old: Option<(&Model, &Compiled)>, new: (&Model, &Compiled)) -> Plan {
    let names = |m: &Model| -> Vec<String> {
        m.identity_ids()
            .map(|i| m.identity_name(i).to_string())
            .collect()
    };
    let nb = names(new.0);
    let na = old.map(|o| names(o.0)).unwrap_or_default();
    let (changes, conditions) = match old {
        Some(old) => {
            let (a, b) = (by_name(old), by_name(new));
            (access_changes(&a, &b), condition_changes(&a, &b))
        }
        None => (
            reachability(new.0, new.1)
                .into_iter()
                .map(|r| PairChange {
                    from: new.0.identity_name(r.from).to_string(),
                    to: new.0.identity_name(r.to).to_string(),
                    gained: r.access,
                    lost: AccessSet::default(),
                })
                .collect(),
            Vec::new(),
        ),
    };
    Plan {
        identities_added: nb.iter().filter(|n| !na.contains(n)).cloned().collect(),
        identities_removed: na.iter().filter(|n| !nb.contains(n)).cloned().collect(),
        changes,
        conditions,
        underlay: crate::underlay::plan(old, new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conditions;

    const NOW: UnixTime = 1_800_000_000;

    fn policy(rule_extra: &str) -> String {
        format!(
            "version: 1
network: {{ cidr: 10.0.0.0/24 }}
identities: {{ a: {{}}, b: {{}} }}
posture: {{ patched: {{ kernel.release: \">= 6.1\" }} }}
rules:
  - {{ name: ssh, from: [a], to: [b], ports: [tcp/22]{rule_extra} }}
  - {{ name: web, from: [a], to: [b], ports: [tcp/80] }}
"
        )
    }

    fn plan_between(old: &str, new: &str) -> Plan {
        let load = |t: &str| {
            let l = crate::load(t, NOW, &BTreeMap::new());
            assert!(l.is_valid(), "{:?}", l.diagnostics);
            let m = l.model.unwrap_or_else(|| unreachable!());
            let c = Compiled::new(&m, m.state(&Conditions::at(NOW)));
            (m, c)
        };
        let ((ma, ca), (mb, cb)) = (load(old), load(new));
        plan(Some((&ma, &ca)), (&mb, &cb))
    }

    #[test]
    fn conditions_are_part_of_reachability() {
        // A rule that loses its posture check: same ports, other access.
        let p = plan_between(&policy(", posture: [patched]"), &policy(""));
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert_eq!(p.conditions.len(), 1, "{:?}", p.conditions);
        let c = &p.conditions[0];
        assert_eq!((c.from.as_str(), c.to.as_str()), ("a", "b"));
        assert_eq!(c.before[0].to_string(), "tcp/22: posture patched");
        assert!(c.after.is_empty());

        // An expiry moved by 70 years.
        let p = plan_between(
            &policy(", expires: 2027-06-01T00:00:00Z"),
            &policy(", expires: 2097-06-01T00:00:00Z"),
        );
        assert!(p.changes.is_empty());
        assert_eq!(
            p.conditions[0].before[0].to_string(),
            "tcp/22: until 2027-06-01T00:00:00Z"
        );
        assert_eq!(
            p.conditions[0].after[0].to_string(),
            "tcp/22: until 2097-06-01T00:00:00Z"
        );

        // The same conditions: nothing to say.
        let same = policy(", posture: [patched], expires: 2027-06-01T00:00:00Z");
        let p = plan_between(&same, &same);
        assert!(p.changes.is_empty() && p.conditions.is_empty());
    }
}
