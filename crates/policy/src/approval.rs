//! Access that needs approval (spec §10): a rule with `approval` is never in force by itself.
//! Each approved request for it becomes a rule of its own, added to the model by
//! [`Model::with_grants`]: the same ports and `to` side, its `from` side narrowed to the
//! requested initiators, and its window ending with the approval. So the end of each
//! approval travels in the allowlists as an ordinary window, and nodes cut the access at that
//! time by themselves, with or without a controller.
//!
//! A rule made from a request is named `RULE@ID` (`@` is not allowed in policy names, so it can
//! never clash with a rule of the policy): flow logs say which request let a flow through.

use bulkhead_allowlist::{Action, UnixTime, Window};
use serde::{Deserialize, Serialize};

use crate::model::{Model, Rule, Side};

/// An approved access request, as the controller hands it to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The request's id.
    pub id: String,
    /// The rule it is for.
    pub rule: String,
    /// The initiating identities it is for; empty: every identity on the rule's `from` side.
    #[serde(default)]
    pub initiators: Vec<String>,
    /// When it was approved: the access starts then.
    pub start: UnixTime,
    /// When the access ends.
    pub until: UnixTime,
    /// Who asked.
    pub requester: String,
    /// Who approved, in order.
    pub approvers: Vec<String>,
}

impl Grant {
    /// The name of the rule made from this grant.
    pub fn rule_name(&self) -> String {
        format!("{}@{}", self.rule, self.id)
    }
}

/// The rule name a rule made from a grant carries, split: `(RULE, ID)`.
pub fn split_rule_name(name: &str) -> Option<(&str, &str)> {
    name.split_once('@')
}

impl Model {
    /// This model with a rule added for each grant whose rule needs approval. Grants for rules
    /// that are not in the policy, that do not need approval, or whose initiators are on no
    /// side of it add nothing: a request outlives the policy it was made under only as far as
    /// the new policy still has its rule.
    pub fn with_grants(&self, grants: &[Grant]) -> Model {
        let mut added = Vec::new();
        for g in grants {
            let Some(base) = self.rule_id(&g.rule).map(|r| self.rule(r)) else {
                continue;
            };
            if base.approval.is_none() || base.action != Action::Allow || g.until <= g.start {
                continue;
            }
            let mut identities: Vec<u32> = if g.initiators.is_empty() {
                self.identity_ids()
                    .filter(|&i| self.on_side(&base.from, i, false))
                    .collect()
            } else {
                g.initiators
                    .iter()
                    .filter_map(|n| self.identity(n))
                    .filter(|&i| self.on_side(&base.from, i, false))
                    .collect()
            };
            identities.sort_unstable();
            identities.dedup();
            if identities.is_empty() {
                continue;
            }
            // It starts when the controller ships it (an allow rule is shipped only once in
            // force), so a node whose clock is a little behind does not hold it back; it ends
            // at the approval's end, or the rule's, whichever comes first.
            let window = Window {
                not_before: base.window.not_before,
                expires: Some(base.window.expires.map_or(g.until, |t| t.min(g.until))),
            };
            added.push(Rule {
                name: g.rule_name(),
                pos: base.pos,
                action: Action::Allow,
                from: Side {
                    identities,
                    ..Side::default()
                },
                to: base.to.clone(),
                ports: base.ports.clone(),
                window,
                posture: base.posture.clone(),
                approval: None,
                grant: Some(std::sync::Arc::new(g.clone())),
            });
        }
        let mut m = self.clone();
        if !added.is_empty() {
            m.add_rules(added);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::Probe;
    use crate::eval::{Conditions, Inactive, evaluate};

    const POLICY: &str = "version: 1
network: {cidr: 10.9.0.0/16}
identities:
  alice-laptop: {labels: {role: admin}}
  bob-laptop: {labels: {role: admin}}
  db-1: {labels: {app: db}}
segments:
  admins: {match: {role: admin}}
  db: {match: {app: db}}
rules:
  - name: admin-ssh
    from: [admins]
    to: [db]
    ports: [tcp/22]
    approval: {approvers: 2, max: 2h}
";

    fn grant(initiators: &[&str], start: i64, until: i64) -> Grant {
        Grant {
            id: "a1b2c3d4".into(),
            rule: "admin-ssh".into(),
            initiators: initiators.iter().map(|s| s.to_string()).collect(),
            start,
            until,
            requester: "alice".into(),
            approvers: vec!["bob".into(), "carol".into()],
        }
    }

    fn verdict(m: &Model, from: &str, now: i64) -> (bool, Vec<Inactive>) {
        let st = m.state(&Conditions::at(now));
        let d = evaluate(
            m,
            m.identity(from).unwrap(),
            m.identity("db-1").unwrap(),
            Probe { proto: 6, port: 22 },
            &st,
        );
        (d.allowed, d.inactive.into_iter().map(|(_, w)| w).collect())
    }

    #[test]
    fn a_rule_that_needs_approval_is_in_force_only_for_granted_initiators_and_time() {
        let loaded = crate::load(POLICY, 1000, &Default::default());
        assert!(loaded.is_valid(), "{:?}", loaded.diagnostics);
        let m = loaded.model.unwrap();
        let (allowed, why) = verdict(&m, "alice-laptop", 1000);
        assert!(!allowed);
        assert_eq!(
            why,
            [Inactive::NeedsApproval {
                approvers: 2,
                max: 7200
            }]
        );

        let g = m.with_grants(&[grant(&["alice-laptop"], 1000, 1600)]);
        assert!(verdict(&g, "alice-laptop", 1000).0);
        assert!(verdict(&g, "alice-laptop", 1599).0);
        assert!(!verdict(&g, "alice-laptop", 1600).0, "over at its end");
        assert!(
            !verdict(&g, "bob-laptop", 1200).0,
            "only for whom it was asked"
        );
        // The window is the approval's, in the rule nodes get.
        let r = g.rule(g.rule_id("admin-ssh@a1b2c3d4").unwrap());
        assert_eq!(r.window.expires, Some(1600));
        assert_eq!(r.grant.as_ref().unwrap().approvers, ["bob", "carol"]);

        // No initiator named: every one on the rule's `from` side.
        let all = m.with_grants(&[grant(&[], 1000, 1600)]);
        assert!(verdict(&all, "bob-laptop", 1200).0);
        // One outside the rule's `from` side, or an unknown rule, grants nothing.
        let outside = m.with_grants(&[grant(&["db-1"], 1000, 1600)]);
        assert_eq!(outside.rules().len(), 1);
        let mut other = grant(&[], 1000, 1600);
        other.rule = "nope".into();
        assert_eq!(m.with_grants(&[other]).rules().len(), 1);
    }

    #[test]
    fn a_grant_compiles_into_an_allowlist_whose_window_ends_with_it() {
        let m = crate::load(POLICY, 1000, &Default::default())
            .model
            .unwrap();
        let before = crate::Compiled::new(&m, m.state(&Conditions::at(1000)));
        let alice = m.identity("alice-laptop").unwrap();
        assert!(
            before.allowlist(&m, alice, 1).peers.is_empty(),
            "no tunnel before approval"
        );
        let g = m.with_grants(&[grant(&["alice-laptop"], 1000, 1600)]);
        let c = crate::Compiled::new(&g, g.state(&Conditions::at(1000)));
        let list = c.allowlist(&g, alice, 1);
        assert_eq!(list.peers.len(), 1);
        assert_eq!(list.rules[0].name, "admin-ssh@a1b2c3d4");
        assert_eq!(list.rules[0].window.expires, Some(1600));
        // The responder's allowlist carries the same end.
        let db = c.allowlist(&g, g.identity("db-1").unwrap(), 1);
        assert_eq!(db.rules[0].window.expires, Some(1600));
        // Past its end, the next compile leaves it out.
        let after = crate::Compiled::new(&g, g.state(&Conditions::at(1600)));
        assert!(after.allowlist(&g, alice, 1).peers.is_empty());
    }
}
