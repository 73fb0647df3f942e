//! Quarantine: by hand, automatic, and its end. Each change is fenced on the record's revision,
//! so that of several controllers trying, exactly one commits.

use bulkhead_proto::{AuditAction, AuditEntry, Quarantine, QuarantineRequest, QuarantineResponse};
use bulkhead_store::Compare;
use bulkhead_store::Op;

use super::{Actor, Error, unix_ms, unix_now};
use crate::Controller;
use crate::records::{self, QUARANTINE};
use crate::view::lock;

fn changed_meanwhile() -> Error {
    Error::Conflict("the quarantine changed meanwhile; try again".into())
}

impl Controller {
    /// Puts an identity in quarantine: it loses every rule but those naming `quarantined`, on
    /// every node, until `duration` passes or it is released. By hand, a quarantine in force is
    /// replaced (its end changes); `automatic` (on denied flows) leaves one in force alone and
    /// answers `conflict`.
    pub async fn quarantine(
        &self,
        identity: &str,
        req: &QuarantineRequest,
        by: &Actor,
        reason: &str,
        automatic: bool,
    ) -> Result<QuarantineResponse, Error> {
        let now = unix_now();
        let duration = {
            let v = lock(&self.view);
            let live = v.live();
            let live = live.as_ref();
            let known = live.is_some_and(|l| l.model.identity(identity).is_some())
                || v.records().nodes.contains_key(identity);
            if !known {
                return Err(Error::NotFound(format!(
                    "no identity {identity:?} in the policy or enrolled"
                )));
            }
            req.duration
                .map(|d| i64::try_from(d).unwrap_or(i64::MAX))
                .or_else(|| live.and_then(|l| l.model.policy().quarantine.map(|q| q.duration_secs)))
        };
        let key = format!("{QUARANTINE}{identity}");
        let current = self.store.get(&key).await.map_err(Error::store)?;
        let q = Quarantine {
            since: now,
            until: duration.map(|d| now.saturating_add(d)),
            reason: reason.to_string(),
            by: by.to_string(),
        };
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::Quarantine,
            identity: Some(identity.to_string()),
            revision: None,
            detail: format!(
                "{reason}; {}",
                q.until.map_or("until released".to_string(), |u| format!(
                    "until {u} (Unix time)"
                ))
            ),
        };
        if automatic
            && let Some(kv) = &current
            && records::decode::<Quarantine>(&key, &kv.value)
                .is_ok_and(|q| q.until.is_none_or(|u| now < u))
        {
            return Err(Error::Conflict(format!(
                "{identity} is already quarantined"
            )));
        }
        let when = vec![Compare::ModRevision(
            key.clone(),
            current.map_or(0, |c| c.mod_revision),
        )];
        if !self
            .commit_audited(when, vec![Op::Put(key, records::encode(&q))], &entry)
            .await?
        {
            return Err(changed_meanwhile());
        }
        tracing::warn!(identity, by = %by, reason, until = ?q.until, "quarantined");
        self.metrics.quarantined(automatic);
        Ok(QuarantineResponse {
            identity: identity.to_string(),
            quarantine: Some(q),
        })
    }

    /// Ends a quarantine: by hand (`by` an administrator), or because its time is up (`by`
    /// `controller`, only if the record is still the one seen at `expected`). Exactly one
    /// caller's transaction commits: the record's revision fences it, and the audit entry is
    /// in the same transaction.
    pub async fn release(
        &self,
        identity: &str,
        by: &Actor,
        expected: Option<bulkhead_store::Revision>,
    ) -> Result<QuarantineResponse, Error> {
        let key = format!("{QUARANTINE}{identity}");
        let Some(kv) = self.store.get(&key).await.map_err(Error::store)? else {
            return Err(Error::NotFound(format!("{identity} is not in quarantine")));
        };
        if expected.is_some_and(|r| r != kv.mod_revision) {
            return Err(changed_meanwhile());
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::Release,
            identity: Some(identity.to_string()),
            revision: None,
            detail: if expected.is_some() {
                "its time was up".into()
            } else {
                "released by hand".into()
            },
        };
        let when = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
        if !self
            .commit_audited(when, vec![Op::Delete(key)], &entry)
            .await?
        {
            return Err(changed_meanwhile());
        }
        tracing::warn!(identity, by = %by, "released from quarantine");
        Ok(QuarantineResponse {
            identity: identity.to_string(),
            quarantine: None,
        })
    }
}
