//! Conditions: which posture checks fail and who is quarantined, at a given time. Pure: the
//! records and `now` are arguments, so the follower can take what it needs under the view's
//! lock and evaluate it after letting go.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bulkhead_policy::posture::Facts as PostureFacts;
use bulkhead_policy::{Conditions, Model};

use super::Mirror;
use crate::records::PresenceRecord;

/// A fact counts as failing once this many of its intervals pass without a report.
pub const STALE_AFTER_INTERVALS: u64 = 3;

/// How long a fact measured every `interval` seconds stays fresh after its report.
pub fn fact_life(interval: u64) -> i64 {
    i64::try_from(interval.saturating_mul(STALE_AFTER_INTERVALS)).unwrap_or(i64::MAX)
}

/// One identity's facts that are still fresh at some time, and whether any went stale.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fresh {
    /// Fresh facts by name.
    pub facts: PostureFacts,
    /// Whether some reported fact went stale.
    pub stale: bool,
}

/// The facts of `p` still fresh at `now`.
pub fn fresh(p: Option<&PresenceRecord>, now: i64) -> Fresh {
    let mut out = Fresh::default();
    for (name, f) in p.iter().flat_map(|p| &p.facts) {
        let seen = p.map_or(0, |p| p.last_seen);
        if now.saturating_sub(seen) <= fact_life(f.interval) {
            out.facts.insert(name.clone(), f.value.clone());
        } else {
            out.stale = true;
        }
    }
    out
}

/// Every check of `model` for an identity with these facts: passing, or why not.
pub fn posture(model: &Model, fresh: &Fresh) -> Vec<(String, Result<(), String>)> {
    model
        .policy()
        .posture
        .iter()
        .map(|check| {
            let r = bulkhead_policy::posture::evaluate(check, &fresh.facts).map_err(|e| {
                if fresh.stale {
                    format!("{e} (facts stale: no report for {STALE_AFTER_INTERVALS} intervals)")
                } else {
                    e
                }
            });
            (check.name.clone(), r)
        })
        .collect()
}

/// What conditions are computed from, taken from the mirror at one time.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Unix seconds.
    pub now: i64,
    /// Each reporting identity's fresh facts.
    pub facts: HashMap<String, Fresh>,
    /// Identities in quarantine at `now`.
    pub quarantined: BTreeSet<String>,
    /// The address each enrolled node joined from (`addressing: underlay`, spec §8).
    pub pins: BTreeMap<String, std::net::Ipv4Addr>,
    /// Approved access in force at `now`.
    pub grants: Vec<bulkhead_policy::Grant>,
}

impl Inputs {
    /// Reads them from the mirror, at `now`; the facts only `with_facts` (a policy with no
    /// posture checks needs none).
    pub fn at(m: &Mirror, now: i64, with_facts: bool) -> Inputs {
        Inputs {
            now,
            facts: m
                .presence
                .iter()
                .filter(|_| with_facts)
                .map(|(id, (p, _))| (id.clone(), fresh(Some(p), now)))
                .collect(),
            quarantined: m.quarantined(now).map(|(id, _)| id.clone()).collect(),
            pins: m.pins(),
            grants: m.grants(now),
        }
    }

    /// An identity's fresh facts (none if it never reported).
    pub fn of(&self, identity: &str) -> Fresh {
        self.facts.get(identity).cloned().unwrap_or_default()
    }
}

/// The conditions for `model`: checks failing on the facts, quarantines in force.
pub fn conditions(model: &Model, inputs: &Inputs) -> Conditions {
    let mut c = Conditions::at(inputs.now);
    c.quarantined.clone_from(&inputs.quarantined);
    if model.policy().posture.is_empty() {
        return c;
    }
    let none = Fresh::default();
    for id in model.identity_ids() {
        let name = model.identity_name(id);
        let fresh = inputs.facts.get(name).unwrap_or(&none);
        for (check, r) in posture(model, fresh) {
            if r.is_err() {
                c.failing.insert((name.to_string(), check));
            }
        }
    }
    c
}

/// When conditions may next change with no store event: a rule's window opens or closes, or a
/// node's facts go stale, or a quarantine or approved access ends.
pub fn next_event(model: &Model, m: &Mirror, now: i64) -> Option<i64> {
    let windows = model
        .rules()
        .iter()
        .filter_map(|r| r.window.next_boundary(now));
    let stale = if model.policy().posture.is_empty() {
        None
    } else {
        m.presence
            .values()
            .flat_map(|(p, _)| {
                p.facts.values().map(|f| {
                    p.last_seen
                        .saturating_add(fact_life(f.interval))
                        .saturating_add(1)
                })
            })
            .filter(|&t| t > now)
            .min()
    };
    let ends = m
        .quarantines
        .values()
        .filter_map(|(q, _)| q.until)
        .filter(|&t| t > now);
    // Approved access ends with its rule's window too; this also covers an approval whose
    // rule the live policy no longer has.
    let access = m
        .access
        .values()
        .filter_map(|(a, _)| a.until)
        .filter(|&t| t > now);
    windows.chain(stale).chain(ends).chain(access).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_proto::Fact;

    fn presence(last_seen: i64, interval: u64) -> PresenceRecord {
        PresenceRecord {
            controller: "https://c:1".into(),
            online: true,
            since: 0,
            last_seen,
            revision: None,
            digest: None,
            status: None,
            version: String::new(),
            facts: [(
                "check.edr".to_string(),
                Fact {
                    value: "true".into(),
                    interval,
                },
            )]
            .into(),
            underlay: None,
        }
    }

    #[test]
    fn facts_are_fresh_for_three_intervals_and_not_a_second_more() {
        let p = presence(1000, 10);
        assert!(!fresh(Some(&p), 1030).stale);
        assert_eq!(fresh(Some(&p), 1030).facts.len(), 1);
        let late = fresh(Some(&p), 1031);
        assert!(late.stale && late.facts.is_empty());
        assert_eq!(fresh(None, 0), Fresh::default());
        assert_eq!(fact_life(u64::MAX), i64::MAX, "no overflow");
    }
}
