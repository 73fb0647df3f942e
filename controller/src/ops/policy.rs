//! The policy: validate, plan, apply, show. One path for the CLI and `--policy FILE`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bulkhead_policy::{Compiled, Conditions, Model, Severity, reach};
use bulkhead_proto::{
    ApplyResponse, AuditAction, AuditEntry, Boundary, ConditionChange, PairChange, Plan,
    PlanResponse, PlanSummary, PolicyRequest, PolicyView, UnderlayBlockChange, UnderlayPlan,
    UnderlayServerChange,
};
use bulkhead_store::{Compare, Op};

use super::{Actor, Error, unix_ms, unix_now};
use crate::Controller;
use crate::records::{self, BLOBS, POLICY, PolicyHead, PolicyRecord};
use crate::view::{Live, lock};

/// A validated policy, ready to apply.
struct Candidate {
    model: Model,
    compiled: Compiled,
}

impl Candidate {
    /// This candidate with approved access, compiled, if there is any.
    fn granted(&self, grants: &[bulkhead_policy::Grant]) -> Option<Candidate> {
        if grants.is_empty() {
            return None;
        }
        let model = self.model.with_grants(grants);
        let compiled = Compiled::new(&model, model.state(&Conditions::at(unix_now())));
        Some(Candidate { model, compiled })
    }
}

fn plan_between(old: Option<(&Model, &Compiled)>, new: (&Model, &Compiled)) -> Plan {
    let p = reach::plan(old, new);
    Plan {
        identities_added: p.identities_added,
        identities_removed: p.identities_removed,
        changes: p
            .changes
            .into_iter()
            .map(|c| PairChange {
                from: c.from,
                to: c.to,
                gained: c.gained.to_strings(),
                lost: c.lost.to_strings(),
            })
            .collect(),
        conditions: p
            .conditions
            .into_iter()
            .map(|c| {
                let strings = |v: Vec<reach::Caveat>| v.iter().map(ToString::to_string).collect();
                ConditionChange {
                    from: c.from,
                    to: c.to,
                    before: strings(c.before),
                    after: strings(c.after),
                }
            })
            .collect(),
        underlay: UnderlayPlan {
            block: p
                .underlay
                .block
                .into_iter()
                .map(|c| UnderlayBlockChange {
                    item: c.item,
                    before: c.before,
                    after: c.after,
                })
                .collect(),
            servers: p
                .underlay
                .servers
                .into_iter()
                .map(|s| UnderlayServerChange {
                    identity: s.identity,
                    before: s.before.to_string(),
                    after: s.after.to_string(),
                    gained: s.gained,
                    lost: s.lost,
                })
                .collect(),
        },
    }
}

/// The windows of the rules `keep` selects that open or close after `now`, soonest first.
pub(super) fn upcoming(
    model: &Model,
    now: i64,
    keep: impl Fn(&bulkhead_policy::Rule) -> bool,
) -> Vec<Boundary> {
    let mut out: Vec<Boundary> = model
        .rules()
        .iter()
        .filter(|r| keep(r))
        .flat_map(|r| {
            [
                ("opens", r.window.not_before),
                ("expires", r.window.expires),
            ]
            .into_iter()
            .filter_map(|(event, t)| {
                t.filter(|&t| t > now).map(|at| Boundary {
                    rule: r.name.clone(),
                    event: event.to_string(),
                    at,
                })
            })
        })
        .collect();
    out.sort_by(|a, b| (a.at, &a.rule).cmp(&(b.at, &b.rule)));
    out
}

impl Controller {
    /// Validates and tests `text` against the live addresses; every problem becomes a detail
    /// line of one `invalid_policy` error.
    fn validate(
        &self,
        text: &str,
        source: &str,
        prior: &BTreeMap<String, std::net::Ipv4Addr>,
    ) -> Result<Candidate, Error> {
        let now = unix_now();
        let loaded = bulkhead_policy::load(text, now, prior);
        let details: Vec<String> = loaded
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.render(source))
            .collect();
        match loaded.model {
            Some(model) if loaded.is_valid() => {
                let compiled = Compiled::new(&model, model.state(&Conditions::at(now)));
                Ok(Candidate { model, compiled })
            }
            _ => Err(Error::InvalidPolicy {
                message: format!(
                    "{source}: invalid policy, {} error(s); nothing applied",
                    details.len()
                ),
                details,
            }),
        }
    }

    /// The plan for `req` against the live policy.
    pub fn plan(&self, req: &PolicyRequest) -> Result<PlanResponse, Error> {
        // A snapshot of the live policy: the plan is computed without holding the view's lock.
        let live = lock(&self.view).live();
        let prior = live
            .as_ref()
            .map(|l| l.record.addresses.clone())
            .unwrap_or_default();
        let cand = self.validate(&req.text, &req.source, &prior)?;
        let granted = live.as_ref().and_then(|l| cand.granted(&l.grants));
        let after = granted.as_ref().unwrap_or(&cand);
        Ok(PlanResponse {
            base_revision: live.as_ref().map_or(0, |l| l.record.revision),
            plan: plan_between(
                live.as_deref().map(|l| (&*l.model, &l.compiled)),
                (&after.model, &after.compiled),
            ),
        })
    }

    /// Validates, tests and applies a policy; the one path for the CLI and `--policy`.
    pub async fn apply(&self, req: &PolicyRequest, by: &Actor) -> Result<ApplyResponse, Error> {
        let current = self.store.get(POLICY).await.map_err(Error::store)?;
        let (mod_rev, live_rev) = match &current {
            Some(kv) => (
                kv.mod_revision,
                records::decode::<PolicyHead>(POLICY, &kv.value)
                    .map_err(Error::internal)?
                    .revision,
            ),
            None => (0, 0),
        };
        if let Some(base) = req.base_revision
            && base != live_rev
        {
            return Err(Error::Conflict(format!(
                "the live policy is revision {live_rev}, not {base}: plan again"
            )));
        }
        // The live policy whole, from the view once it has caught up with that head.
        self.caught_up(mod_rev).await;
        let old = lock(&self.view).live();
        let old = match old {
            Some(l) if l.record.revision == live_rev => Some(l),
            None if live_rev == 0 => None,
            _ => {
                return Err(Error::Unavailable(format!(
                    "the stored policy revision {live_rev} is not readable yet; try again"
                )));
            }
        };
        let prior = old
            .as_ref()
            .map(|l| l.record.addresses.clone())
            .unwrap_or_default();
        let cand = self.validate(&req.text, &req.source, &prior)?;
        if old.as_ref().is_some_and(|l| l.record.text == req.text) {
            return Ok(ApplyResponse {
                revision: live_rev,
                changed: false,
                summary: PlanSummary::default(),
            });
        }
        // Approved access in force stays in force under the new policy, as far as it still
        // has the rules: not a loss.
        let granted = old.as_ref().and_then(|l| cand.granted(&l.grants));
        let after = granted.as_ref().unwrap_or(&cand);
        let plan = plan_between(
            old.as_deref().map(|l| (&*l.model, &l.compiled)),
            (&after.model, &after.compiled),
        );
        drop(granted);
        let rec = PolicyRecord {
            revision: live_rev + 1,
            text: req.text.clone(),
            source: req.source.clone(),
            applied_at: unix_now(),
            applied_by: by.to_string(),
            addresses: cand.model.addresses(),
        };
        let revision = rec.revision;
        let (head, chunks) = rec.split();
        // The body first, a few chunks per transaction; then the head, only if the policy has
        // not moved and every chunk is still exactly as written (a concurrent apply's cleanup
        // may have removed it).
        let mut when = vec![Compare::ModRevision(POLICY.into(), mod_rev)];
        for group in chunks.chunks(8) {
            let ops: Vec<Op> = group
                .iter()
                .map(|(k, v)| Op::Put(k.clone(), v.clone()))
                .collect();
            let r = bulkhead_store::put(&*self.store, &ops)
                .await
                .map_err(Error::store)?;
            when.extend(
                group
                    .iter()
                    .map(|(k, _)| Compare::ModRevision(k.clone(), r)),
            );
        }
        let sha = head.body.clone();
        let model = Arc::new(cand.model);
        lock(&self.view).prepare(Live {
            record: rec,
            plain: model.clone(),
            model,
            grants: Vec::new(),
            compiled: cand.compiled,
        });
        let summary = plan.summary();
        let (c, a) = records::audit(&AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::PolicyApply,
            identity: None,
            revision: Some(revision),
            detail: format!(
                "{} from {}: {} pairs gained access, {} lost, {} identities added, {} removed",
                req.source,
                by,
                summary.pairs_gaining,
                summary.pairs_losing,
                summary.identities_added,
                summary.identities_removed
            ),
        });
        when.push(c);
        let t = self
            .store
            .txn(&when, &[Op::Put(POLICY.into(), records::encode(&head)), a])
            .await;
        let t = match t {
            Ok(t) if t.succeeded => t,
            r => {
                lock(&self.view).unprepare();
                r.map_err(Error::store)?;
                return Err(Error::Conflict(
                    "another apply won the race: plan again".into(),
                ));
            }
        };
        self.drop_old_blobs(&sha, t.revision).await;
        self.caught_up(t.revision).await;
        tracing::info!(revision, by = %by, source = %req.source, changes = plan.changes.len(), "policy applied");
        Ok(ApplyResponse {
            revision,
            changed: true,
            summary,
        })
    }

    /// The live policy, once the view has caught up with the stored one: a policy applied
    /// through another controller a moment ago is the one shown (its compile may still be
    /// running here).
    pub async fn policy(&self) -> Result<PolicyView, Error> {
        // If the store cannot say, the view's policy is the best answer there is.
        if let Ok(Some(head)) = self.store.get(POLICY).await {
            self.caught_up(head.mod_revision).await;
        }
        let l = lock(&self.view)
            .live()
            .ok_or_else(|| Error::NotFound("no policy applied yet".into()))?;
        Ok(PolicyView {
            revision: l.record.revision,
            text: l.record.text.clone(),
            source: l.record.source.clone(),
            applied_at: l.record.applied_at,
            applied_by: l.record.applied_by.clone(),
            upcoming: upcoming(&l.model, unix_now(), |_| true),
        })
    }

    /// Removes every blob but the live policy's, if the policy is still the one committed at
    /// `committed` (otherwise a later apply does it). Best effort: leftovers go next time.
    async fn drop_old_blobs(&self, keep: &str, committed: bulkhead_store::Revision) {
        let Ok(all) = self.store.range(BLOBS).await else {
            return;
        };
        let keep = format!("{BLOBS}{keep}/");
        let old: Vec<Op> = all
            .kvs
            .into_iter()
            .filter(|kv| !kv.key.starts_with(&keep))
            .map(|kv| Op::Delete(kv.key))
            .collect();
        for group in old.chunks(100) {
            let fenced = [Compare::ModRevision(POLICY.into(), committed)];
            match self.store.txn(&fenced, group).await {
                Ok(t) if t.succeeded => {}
                _ => return,
            }
        }
    }
}
