//! The one answer to "may A open a connection to B on this port, now?".
//!
//! [`evaluate`] is the reference semantics: `explain`, `test`, `matrix` and `diff` rest on it, and
//! the compiled allowlists must agree with it (the property test in `tests/reference.rs` checks
//! both against a naive second implementation).

use std::collections::{BTreeSet, HashSet};

use bulkhead_allowlist::{Action, PortSpec, UnixTime, proto};
use serde::Serialize;

use crate::ast::Probe;
use crate::model::{CheckId, IdentityId, Model, Rule, RuleId};

/// The world a verdict depends on besides the policy, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// The time, in Unix seconds.
    pub now: UnixTime,
    /// `(identity, check)` pairs that fail. Every other check passes.
    pub failing: BTreeSet<(String, String)>,
    /// Identities in quarantine.
    pub quarantined: BTreeSet<String>,
}

impl Conditions {
    /// Every check passing, nobody quarantined, at `now`.
    pub fn at(now: UnixTime) -> Conditions {
        Conditions {
            now,
            ..Conditions::default()
        }
    }
}

/// [`Conditions`] resolved against a model. Unknown names are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The time.
    pub now: UnixTime,
    /// Failing `(identity, check)` pairs.
    pub failing: HashSet<(IdentityId, CheckId)>,
    /// Quarantine, by identity id.
    pub quarantined: Vec<bool>,
}

impl State {
    /// The checks `id` fails, in id order.
    pub fn failing_of(&self, id: IdentityId) -> Vec<CheckId> {
        let mut v: Vec<CheckId> = self
            .failing
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, c)| *c)
            .collect();
        v.sort_unstable();
        v
    }

    /// The identities whose failing checks or quarantine differ between `self` and `other`,
    /// in id order.
    pub fn changed_from(&self, other: &State) -> Vec<IdentityId> {
        let mut ids: Vec<IdentityId> = self
            .failing
            .symmetric_difference(&other.failing)
            .map(|(i, _)| *i)
            .chain(
                (0..self.quarantined.len().max(other.quarantined.len()))
                    .filter(|&i| self.quarantined.get(i) != other.quarantined.get(i))
                    .map(|i| i as IdentityId),
            )
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl Model {
    /// Resolves conditions by name into ids.
    pub fn state(&self, c: &Conditions) -> State {
        let mut quarantined = vec![false; self.identity_count()];
        for q in &c.quarantined {
            if let Some(id) = self.identity(q) {
                quarantined[id as usize] = true;
            }
        }
        State {
            now: c.now,
            failing: c
                .failing
                .iter()
                .filter_map(|(i, k)| Some((self.identity(i)?, self.check(k)?)))
                .collect(),
            quarantined,
        }
    }
}

/// Why a rule that matches a connection does not count now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inactive {
    /// Its window opens at this time.
    NotYet(UnixTime),
    /// Its window closed at this time.
    Expired(UnixTime),
    /// The rule needs approval, and this is the rule itself: only the rules made from
    /// approved requests for it ([`Model::with_grants`]) are ever in force.
    NeedsApproval {
        /// How many different administrators must approve a request.
        approvers: u32,
        /// The longest access a request may ask for, in seconds.
        max: i64,
    },
    /// The initiator fails these checks.
    Posture(Vec<CheckId>),
    /// An end is quarantined and the rule does not name `quarantined` on that side.
    Quarantined {
        /// The initiator is quarantined.
        from: bool,
        /// The responder is quarantined.
        to: bool,
    },
}

/// A verdict, the rule that decided it, and what else bears on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may be opened.
    pub allowed: bool,
    /// The deciding rule: the first deny in force, else the first allow in force. `None` for the
    /// default deny and for traffic to oneself.
    pub rule: Option<RuleId>,
    /// Traffic of an identity to itself: outside the policy, never on a tunnel.
    pub self_traffic: bool,
    /// Other rules in force that match too, in file order: further allows when allowed, further
    /// denies when denied by a rule.
    pub also: Vec<RuleId>,
    /// Rules that match the connection but are not in force, and why, in file order.
    pub inactive: Vec<(RuleId, Inactive)>,
}

/// Whether a rule's `ports` cover the probe.
pub fn ports_cover(ports: &[PortSpec], p: Probe) -> bool {
    ports.iter().any(|s| match *s {
        PortSpec::Any => true,
        PortSpec::Tcp { lo, hi } => p.proto == proto::TCP && (lo..=hi).contains(&p.port),
        PortSpec::Udp { lo, hi } => p.proto == proto::UDP && (lo..=hi).contains(&p.port),
        PortSpec::Icmp => p.proto == proto::ICMP,
    })
}

/// Whether rule `r` counts for a connection from `a` to `b` in `st`, or why not. `a` and `b` must
/// already be on the rule's sides. Deny rules count whenever their window holds: posture and
/// quarantine only ever take access away.
pub(crate) fn in_force(r: &Rule, a: IdentityId, b: IdentityId, st: &State) -> Result<(), Inactive> {
    let w = r.window;
    if let Some(t) = w.not_before.filter(|&t| st.now < t) {
        return Err(Inactive::NotYet(t));
    }
    if let Some(t) = w.expires.filter(|&t| st.now >= t) {
        return Err(Inactive::Expired(t));
    }
    if r.action == Action::Deny {
        return Ok(());
    }
    if let Some(a) = r.approval {
        return Err(Inactive::NeedsApproval {
            approvers: a.approvers,
            max: a.max_secs,
        });
    }
    let failing: Vec<CheckId> = r
        .posture
        .iter()
        .copied()
        .filter(|&c| st.failing.contains(&(a, c)))
        .collect();
    if !failing.is_empty() {
        return Err(Inactive::Posture(failing));
    }
    let from = st.quarantined[a as usize] && !r.from.quarantined;
    let to = st.quarantined[b as usize] && !r.to.quarantined;
    if from || to {
        return Err(Inactive::Quarantined { from, to });
    }
    Ok(())
}

/// May `a` open a connection to `b` on `probe` in state `st`?
pub fn evaluate(m: &Model, a: IdentityId, b: IdentityId, probe: Probe, st: &State) -> Decision {
    let mut d = Decision {
        allowed: false,
        rule: None,
        self_traffic: false,
        also: Vec::new(),
        inactive: Vec::new(),
    };
    if a == b {
        d.allowed = true;
        d.self_traffic = true;
        return d;
    }
    let qa = st.quarantined[a as usize];
    let qb = st.quarantined[b as usize];
    let mut candidates: Vec<RuleId> = m.rules_initiated_by(a, qa).collect();
    candidates.sort_unstable();
    candidates.dedup();

    let mut deny = Vec::new();
    let mut allow = Vec::new();
    for rid in candidates {
        let r = m.rule(rid);
        if !m.on_side(&r.to, b, qb) || !ports_cover(&r.ports, probe) {
            continue;
        }
        match in_force(r, a, b, st) {
            Err(why) => d.inactive.push((rid, why)),
            Ok(()) if r.action == Action::Deny => deny.push(rid),
            Ok(()) => allow.push(rid),
        }
    }
    let decided = if deny.is_empty() { allow } else { deny };
    d.allowed = decided
        .first()
        .is_some_and(|&r| m.rule(r).action == Action::Allow);
    d.rule = decided.first().copied();
    d.also = decided.into_iter().skip(1).collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_identities_are_those_whose_checks_or_quarantine_differ() {
        let old = State {
            now: 0,
            failing: [(1, 0), (2, 0), (2, 1)].into(),
            quarantined: vec![false, false, false, true],
        };
        let mut new = old.clone();
        assert!(new.changed_from(&old).is_empty());
        new.failing.remove(&(2, 1));
        new.failing.insert((0, 1));
        new.quarantined[3] = false;
        assert_eq!(new.changed_from(&old), [0, 2, 3]);
        assert_eq!(new.failing_of(2), [0]);
        assert_eq!(new.failing_of(1), [0]);
        assert!(new.failing_of(3).is_empty());
    }
}
