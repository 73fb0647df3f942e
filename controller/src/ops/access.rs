//! Access that needs approval (spec §10): requests, approvals, denials, revocations, and the
//! end of each, every step in the audit log with the administrator's name.
//!
//! A request is one record, `access/<id>`, changed only by compare-and-swap on its revision, so
//! two approvers (or an approver and a revoker) on different controllers cannot both act on the
//! same state. Once approved by as many different administrators as its rule asks for (none of
//! them its requester), the view adds a rule for it to the model
//! ([`bulkhead_policy::Model::with_grants`]), ending at the approval's end: the nodes enforce
//! that end themselves. Revoking it, or its end, takes the rule out again.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_proto::tls::random_hex;
use bulkhead_proto::{
    AccessRequest, AccessState, AccessView, Approval, AuditAction, AuditEntry, Role,
};
use bulkhead_store::{Compare, Op, Revision};

use super::admins::show_time;
use super::{Actor, Error, unix_ms, unix_now};
use crate::Controller;
use crate::records::{self, ACCESS};
use crate::view::lock;

/// How long a request waits for its approvals by default: an hour.
pub const DEFAULT_REQUEST_TTL: i64 = 3600;
/// Most requests pending or in force at once.
pub const MAX_OPEN_REQUESTS: usize = 1000;
/// Most requests one administrator may have pending or in force at once.
const MAX_OPEN_PER_REQUESTER: usize = 20;
/// Longest reason.
const MAX_REASON: usize = 1024;
/// How long a request is kept once nothing more can happen to it, for `access list`.
const KEEP_CLOSED: i64 = 7 * 86_400;

/// What a conflict on a request's revision says.
const CHANGED: &str = "changed meanwhile";

fn key(id: &str) -> String {
    format!("{ACCESS}{id}")
}

/// Who a request is for, as the audit log says it.
fn whom(a: &AccessView) -> String {
    match &a.from {
        Some(f) => format!("from {f}"),
        None => "from every identity on its from side".into(),
    }
}

/// A duration as people write it.
fn span(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl Controller {
    /// Every request kept, oldest first, each as it stands now.
    pub fn access_list(&self) -> Vec<AccessView> {
        let now = unix_now();
        let mut v: Vec<AccessView> = lock(&self.view)
            .records()
            .access
            .values()
            .map(|(a, _)| {
                let mut a = a.clone();
                a.state = a.state_at(now);
                a
            })
            .collect();
        v.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        v
    }

    /// The approval block of rule `name` in the live policy, or why a request for it cannot be.
    fn approval_of(
        &self,
        name: &str,
    ) -> Result<(bulkhead_policy::ApprovalDef, Arc<crate::view::Live>), Error> {
        let live = lock(&self.view)
            .live()
            .ok_or_else(|| Error::NotFound("no policy is live".into()))?;
        let rule = live
            .plain
            .rule_id(name)
            .map(|r| live.plain.rule(r).clone())
            .ok_or_else(|| Error::NotFound(format!("no rule named {name} in the live policy")))?;
        match rule.approval {
            Some(a) => Ok((a, live)),
            None => Err(Error::BadRequest(format!(
                "rule {name} does not need approval: it is in force without a request (only \
                 rules with `approval:` take requests)"
            ))),
        }
    }

    /// Stores a request for access under a rule that needs approval.
    pub async fn access_request(
        &self,
        req: &AccessRequest,
        by: &Actor,
    ) -> Result<AccessView, Error> {
        for name in std::iter::once(&req.rule).chain(&req.from) {
            if !bulkhead_policy::is_valid_name(name) {
                return Err(Error::BadRequest(format!(
                    "{:?} is not a rule or identity name",
                    name.chars().take(64).collect::<String>()
                )));
            }
        }
        let (approval, live) = self.approval_of(&req.rule)?;
        let max = u64::try_from(approval.max_secs).unwrap_or(0);
        if req.duration == 0 || req.duration > max {
            return Err(Error::BadRequest(format!(
                "{} of access is more than rule {}'s max of {}",
                span(req.duration),
                req.rule,
                span(max)
            )));
        }
        let reason = req.reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON {
            return Err(Error::BadRequest(format!(
                "a reason is required, at most {MAX_REASON} bytes"
            )));
        }
        if let Some(from) = &req.from {
            let m = &live.plain;
            let rule = m.rule(m.rule_id(&req.rule).unwrap_or_default());
            let on = m
                .identity(from)
                .is_some_and(|i| m.on_side(&rule.from, i, false));
            if !on {
                return Err(Error::BadRequest(format!(
                    "{} is not on the from side of rule {}",
                    from.chars().take(64).collect::<String>(),
                    req.rule
                )));
            }
        }
        let who = by.to_string();
        let now = unix_now();
        {
            let v = lock(&self.view);
            let open: Vec<&AccessView> = v
                .records()
                .access
                .values()
                .map(|(a, _)| a)
                .filter(|a| !a.state_at(now).is_final())
                .collect();
            if open.len() >= MAX_OPEN_REQUESTS {
                return Err(Error::Conflict(format!(
                    "{} requests are open: at most {MAX_OPEN_REQUESTS}",
                    open.len()
                )));
            }
            if open.iter().filter(|a| a.requester == who).count() >= MAX_OPEN_PER_REQUESTER {
                return Err(Error::Conflict(format!(
                    "{who} has {MAX_OPEN_PER_REQUESTER} requests open: revoke or deny some first"
                )));
            }
        }
        let view = AccessView {
            id: random_hex(4)[..8].to_string(),
            rule: req.rule.clone(),
            from: req.from.clone(),
            duration: req.duration,
            reason: reason.to_string(),
            requester: who.clone(),
            created: now,
            approve_by: now.saturating_add(self.access_request_ttl),
            approvers_needed: approval.approvers,
            approvals: Vec::new(),
            state: AccessState::Pending,
            start: None,
            until: None,
            closed_by: None,
        };
        let entry = AuditEntry {
            at: unix_ms(),
            who,
            action: AuditAction::AccessRequest,
            identity: view.from.clone(),
            revision: None,
            detail: format!(
                "request {}: rule {} {} for {}, needs {} approver(s): {}",
                view.id,
                view.rule,
                whom(&view),
                span(view.duration),
                view.approvers_needed,
                view.reason
            ),
        };
        let k = key(&view.id);
        if !self
            .commit_audited(
                vec![Compare::ModRevision(k.clone(), 0)],
                vec![Op::Put(k, records::encode(&view))],
                &entry,
            )
            .await?
        {
            return Err(Error::Conflict("request id taken; try again".into()));
        }
        tracing::info!(id = %view.id, rule = %view.rule, requester = %view.requester, "access requested");
        Ok(view)
    }

    /// A request as stored, with its revision.
    async fn stored(&self, id: &str) -> Result<(AccessView, Revision), Error> {
        if id.len() > 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NotFound(format!(
                "no access request {}",
                id.chars().take(16).collect::<String>()
            )));
        }
        let k = key(id);
        match self.store.get(&k).await.map_err(Error::store)? {
            Some(kv) => Ok((
                records::decode(&k, &kv.value).map_err(Error::internal)?,
                kv.mod_revision,
            )),
            None => Err(Error::NotFound(format!("no access request {id}"))),
        }
    }

    /// Writes a request's new state if it has not changed since `rev`, with its audit entry.
    async fn update(&self, a: &AccessView, rev: Revision, entry: &AuditEntry) -> Result<(), Error> {
        let k = key(&a.id);
        if self
            .commit_audited(
                vec![Compare::ModRevision(k.clone(), rev)],
                vec![Op::Put(k, records::encode(a))],
                entry,
            )
            .await?
        {
            Ok(())
        } else {
            Err(Error::Conflict(format!(
                "request {} {CHANGED}; look again",
                a.id
            )))
        }
    }

    /// Approves a request, as one of the different approvers its rule needs; the last one puts
    /// the access in force from now until its duration passes. Nobody approves their own.
    pub async fn access_approve(&self, id: &str, by: &Actor) -> Result<AccessView, Error> {
        // Another approver's approval may land between the read and the write: read again
        // and add this one to it, a few times.
        let mut tries = 0;
        loop {
            match self.approve_once(id, by).await {
                Err(Error::Conflict(m)) if m.contains(CHANGED) && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    async fn approve_once(&self, id: &str, by: &Actor) -> Result<AccessView, Error> {
        let (mut a, rev) = self.stored(id).await?;
        let now = unix_now();
        let who = by.to_string();
        let state = a.state_at(now);
        if state != AccessState::Pending {
            return Err(Error::Conflict(format!(
                "request {id} is {state}: only a pending request can be approved"
            )));
        }
        if a.requester == who {
            return Err(Error::Forbidden(format!(
                "{who} asked for request {id}: nobody approves their own request"
            )));
        }
        if a.approvals.iter().any(|p| p.by == who) {
            return Err(Error::Conflict(format!(
                "{who} approved request {id} already; it needs {} different approvers",
                a.approvers_needed
            )));
        }
        // The rule as it is now: a policy applied since may ask for more approvers, or less
        // time, or not take requests at all any more.
        let (approval, _) = self.approval_of(&a.rule)?;
        a.approvers_needed = a.approvers_needed.max(approval.approvers);
        a.duration = a
            .duration
            .min(u64::try_from(approval.max_secs).unwrap_or(0));
        a.approvals.push(Approval {
            by: who.clone(),
            at: now,
        });
        let done = a.approvals.len() >= a.approvers_needed as usize;
        if done {
            a.state = AccessState::Approved;
            a.start = Some(now);
            a.until = Some(now.saturating_add(i64::try_from(a.duration).unwrap_or(0)));
        }
        let detail = format!(
            "request {id} by {}: rule {} {}, approval {} of {}{}",
            a.requester,
            a.rule,
            whom(&a),
            a.approvals.len(),
            a.approvers_needed,
            match a.until {
                Some(u) if done => format!(
                    "; approved by {}, in force until {}",
                    a.approvals
                        .iter()
                        .map(|p| p.by.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    show_time(u)
                ),
                _ => String::new(),
            }
        );
        let entry = AuditEntry {
            at: unix_ms(),
            who,
            action: AuditAction::AccessApprove,
            identity: a.from.clone(),
            revision: None,
            detail,
        };
        self.update(&a, rev, &entry).await?;
        tracing::info!(id, rule = %a.rule, approver = %by, in_force = done, "access approved");
        Ok(a)
    }

    /// Denies a pending request (`revoke: false`), or ends approved access at once (`revoke:
    /// true`). An approver may do either to any request; an operator only to their own.
    pub async fn access_close(
        &self,
        id: &str,
        by: &Actor,
        role: Role,
        revoke: bool,
    ) -> Result<AccessView, Error> {
        let (mut a, rev) = self.stored(id).await?;
        let now = unix_now();
        let who = by.to_string();
        let verb = if revoke { "revoke" } else { "deny" };
        if role < Role::Approver && a.requester != who {
            return Err(Error::Forbidden(format!(
                "only an approver, or its requester, may {verb} request {id}"
            )));
        }
        let state = a.state_at(now);
        let (want, next, action) = if revoke {
            (
                AccessState::Approved,
                AccessState::Revoked,
                AuditAction::AccessRevoke,
            )
        } else {
            (
                AccessState::Pending,
                AccessState::Denied,
                AuditAction::AccessDeny,
            )
        };
        if state != want {
            let hint = match (revoke, state) {
                (true, AccessState::Pending) => ": deny it instead",
                (false, AccessState::Approved) => ": revoke it to end it",
                _ => "",
            };
            return Err(Error::Conflict(format!(
                "request {id} is {state}, not {want}{hint}"
            )));
        }
        a.state = next;
        a.closed_by = Some(who.clone());
        if revoke {
            a.until = Some(now);
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who,
            action,
            identity: a.from.clone(),
            revision: None,
            detail: format!(
                "request {id} by {}: rule {} {}{}",
                a.requester,
                a.rule,
                whom(&a),
                if revoke {
                    format!(
                        ", approved by {}: ended now",
                        a.approvals
                            .iter()
                            .map(|p| p.by.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
            ),
        };
        self.update(&a, rev, &entry).await?;
        tracing::info!(id, rule = %a.rule, by = %by, verb, "access request closed");
        Ok(a)
    }

    /// Marks requests whose time is up: pending ones not approved in time expire, approved
    /// ones end; each with its audit entry, fenced on the record's revision so that exactly
    /// one controller writes it. Access does not wait for this: the view stops granting at
    /// the end, and the nodes cut the flows at the end of the window they were given.
    /// Requests closed more than a week ago are deleted.
    async fn close_due(&self, now: i64) {
        let due: Vec<(AccessView, Revision)> = lock(&self.view)
            .records()
            .access
            .values()
            .filter(|(a, _)| {
                let s = a.state_at(now);
                s != a.state || (s.is_final() && closed_at(a) + KEEP_CLOSED <= now)
            })
            .cloned()
            .collect();
        for (mut a, rev) in due {
            let state = a.state_at(now);
            let k = key(&a.id);
            let r = if state == a.state {
                self.store
                    .txn(&[Compare::ModRevision(k.clone(), rev)], &[Op::Delete(k)])
                    .await
                    .map(|_| ())
                    .map_err(Error::store)
            } else {
                let (action, detail) = if state == AccessState::Expired {
                    (
                        AuditAction::AccessExpire,
                        format!(
                            "request {} by {}: rule {} {}: not approved in time ({} of {} approvals)",
                            a.id,
                            a.requester,
                            a.rule,
                            whom(&a),
                            a.approvals.len(),
                            a.approvers_needed
                        ),
                    )
                } else {
                    (
                        AuditAction::AccessEnd,
                        format!(
                            "request {} by {}: rule {} {}, approved by {}: ended at {}",
                            a.id,
                            a.requester,
                            a.rule,
                            whom(&a),
                            a.approvals
                                .iter()
                                .map(|p| p.by.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            show_time(a.until.unwrap_or(now))
                        ),
                    )
                };
                a.state = state;
                let entry = AuditEntry {
                    at: unix_ms(),
                    who: Actor::Controller.to_string(),
                    action,
                    identity: a.from.clone(),
                    revision: None,
                    detail,
                };
                self.update(&a, rev, &entry).await
            };
            match r {
                Ok(()) | Err(Error::Conflict(_)) => {}
                Err(e) => tracing::warn!(id = %a.id, "cannot close the access request: {e}"),
            }
        }
    }
}

/// When nothing more could happen to a request.
fn closed_at(a: &AccessView) -> i64 {
    a.until.unwrap_or(a.approve_by).max(a.created)
}

/// Every second, closes the requests whose time is up (see `Controller::close_due`).
pub async fn close_access(c: Arc<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if c.currency.current() {
            c.close_due(unix_now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_written() {
        assert_eq!(span(7200), "2h");
        assert_eq!(span(90), "90s");
        assert_eq!(span(900), "15m");
        assert_eq!(span(86_400 * 2), "2d");
    }
}
