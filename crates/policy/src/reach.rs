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
            (!access.is_empty()).then(|| Reach {
                from,
                to,
                access,
                rules: granting_rules(t, refs, now),
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

/// Reachability gained and lost between two policies, pair by pair, sorted by names.
pub fn diff(old: (&Model, &Compiled), new: (&Model, &Compiled)) -> Vec<PairChange> {
    let by_name = |(m, c): (&Model, &Compiled)| -> BTreeMap<(String, String), AccessSet> {
        reachability(m, c)
            .into_iter()
            .map(|r| {
                (
                    (
                        m.identity_name(r.from).to_string(),
                        m.identity_name(r.to).to_string(),
                    ),
                    r.access,
                )
            })
            .collect()
    };
    let (a, b) = (by_name(old), by_name(new));
    let empty = AccessSet::default();
    let mut keys: Vec<&(String, String)> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&empty), b.get(k).unwrap_or(&empty));
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

/// What applying a policy changes: identities added and removed, and reachability gained and
/// lost pair by pair. Against no policy at all, everything the new one allows is gained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Identities only the new policy has.
    pub identities_added: Vec<String>,
    /// Identities only the old policy has.
    pub identities_removed: Vec<String>,
    /// Pair by pair, sorted by names.
    pub changes: Vec<PairChange>,
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
    let changes = match old {
        Some(old) => diff(old, new),
        None => reachability(new.0, new.1)
            .into_iter()
            .map(|r| PairChange {
                from: new.0.identity_name(r.from).to_string(),
                to: new.0.identity_name(r.to).to_string(),
                gained: r.access,
                lost: AccessSet::default(),
            })
            .collect(),
    };
    Plan {
        identities_added: nb.iter().filter(|n| !na.contains(n)).cloned().collect(),
        identities_removed: na.iter().filter(|n| !nb.contains(n)).cloned().collect(),
        changes,
    }
}
