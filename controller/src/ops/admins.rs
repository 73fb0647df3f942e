//! Named administrators (spec §10): add, list, revoke.
//!
//! An administrator is two records written and deleted in one transaction: `admins/<name>`
//! (its role, expiry, who added it, its certificate's fingerprint) and `creds/<fingerprint>`
//! (what the permission layer reads on every request). The CLI makes the key pair and sends
//! only the public half, as a node does; the controller never holds an administrator's key.
//!
//! The last owner cannot be revoked: the revocation requires every other owner's record to be
//! unchanged since it counted them, so two owners revoking each other at once cannot both
//! succeed, whichever controllers they ask.

use bulkhead_proto::tls::{ClientPublicKey, cert_der, fingerprint};
use bulkhead_proto::{AdminIssued, AdminRequest, AdminView, AuditAction, AuditEntry, Role};
use bulkhead_store::{Compare, Op};

use super::{Actor, Error, unix_ms, unix_now};
use crate::Controller;
use crate::records::{self, ADMINS, AdminRecord, CREDS, CredRecord};
use crate::view::lock;

/// Most administrators one deployment may have.
pub const MAX_ADMINS: usize = 1000;
/// The longest an administrator's credential may be given: a year.
const MAX_EXPIRY: u64 = 366 * 86_400;

impl Controller {
    /// Every administrator, by name.
    pub fn admins(&self) -> Vec<AdminView> {
        lock(&self.view)
            .records()
            .admins
            .values()
            .map(|(a, _)| a.view.clone())
            .collect()
    }

    /// Adds an administrator and certifies the public key it sent.
    pub async fn admin_add(&self, req: &AdminRequest, by: &Actor) -> Result<AdminIssued, Error> {
        if !bulkhead_policy::is_valid_name(&req.name) {
            return Err(Error::BadRequest(format!(
                "bad administrator name {:?}: 1 to 63 characters of a-z, 0-9 and '-', starting \
                 with a letter or digit",
                req.name.chars().take(64).collect::<String>()
            )));
        }
        // The audit log names the controller and nodes this way: nobody may pass for them.
        if ["controller", "node"].contains(&req.name.as_str()) {
            return Err(Error::BadRequest(format!(
                "{} is how the audit log names what is not an administrator; pick another name",
                req.name
            )));
        }
        if req.expires_in.is_some_and(|s| s == 0 || s > MAX_EXPIRY) {
            return Err(Error::BadRequest(
                "expiry: more than zero and at most 366 days".into(),
            ));
        }
        let key = ClientPublicKey::from_base64(&req.credential_key)
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let listed = self
            .store
            .range(ADMINS)
            .await
            .map_err(Error::store)?
            .kvs
            .len();
        if listed >= MAX_ADMINS {
            return Err(Error::Conflict(format!(
                "{listed} administrators: at most {MAX_ADMINS}; revoke some first"
            )));
        }
        let cert = self
            .ca
            .client_cert(&req.name, &key)
            .map_err(|e| Error::internal(e.to_string()))?;
        let fp = fingerprint(&cert_der(&cert).map_err(|e| Error::internal(e.to_string()))?);
        let now = unix_now();
        let expires = req
            .expires_in
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let view = AdminView {
            name: req.name.clone(),
            role: req.role,
            created: now,
            created_by: by.to_string(),
            expires,
            fingerprint: fp[..16].to_string(),
        };
        let rec = AdminRecord {
            view: view.clone(),
            credential: fp.clone(),
        };
        let cred = CredRecord::Admin {
            name: req.name.clone(),
            admin_role: req.role,
            expires,
        };
        let key = format!("{ADMINS}{}", req.name);
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::AdminAdd,
            identity: None,
            revision: None,
            detail: format!(
                "{} as {}{}, credential {}",
                req.name,
                req.role,
                expires.map_or(String::new(), |t| format!(", until {}", show_time(t))),
                &fp[..16]
            ),
        };
        let ok = self
            .commit_audited(
                vec![Compare::ModRevision(key.clone(), 0)],
                vec![
                    Op::Put(key, records::encode(&rec)),
                    Op::Put(format!("{CREDS}{fp}"), records::encode(&cred)),
                ],
                &entry,
            )
            .await?;
        if !ok {
            return Err(Error::Conflict(format!(
                "an administrator named {} exists; revoke it first or pick another name",
                req.name
            )));
        }
        tracing::info!(admin = %req.name, role = %req.role, by = %by, "administrator added");
        Ok(AdminIssued {
            admin: view,
            certificate: cert,
            ca: self.ca.cert_pem.clone(),
            url: self.url.clone(),
        })
    }

    /// Revokes an administrator: its credential stops working on its next request, on every
    /// controller, and its open streams end. The last owner cannot be revoked.
    pub async fn admin_revoke(&self, name: &str, by: &Actor) -> Result<AdminView, Error> {
        let snap = self.store.range(ADMINS).await.map_err(Error::store)?;
        let now = unix_now();
        let mut target = None;
        let mut other_owners = Vec::new();
        for kv in &snap.kvs {
            let Ok(rec) = records::decode::<AdminRecord>(&kv.key, &kv.value) else {
                continue;
            };
            if rec.view.name == name {
                target = Some((rec, kv.mod_revision));
            } else if rec.view.role == Role::Owner && !crate::api::expired(rec.view.expires, now) {
                other_owners.push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
            }
        }
        let Some((rec, rev)) = target else {
            return Err(Error::NotFound(format!(
                "no administrator named {}",
                name.chars().take(64).collect::<String>()
            )));
        };
        if rec.view.role == Role::Owner && other_owners.is_empty() {
            return Err(Error::Conflict(format!(
                "{name} is the last owner: add another owner before revoking it"
            )));
        }
        let key = format!("{ADMINS}{name}");
        let mut when = vec![Compare::ModRevision(key.clone(), rev)];
        // Every other owner counted must still be there: two owners revoking each other at
        // once leave one.
        if rec.view.role == Role::Owner {
            when.extend(other_owners);
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::AdminRevoke,
            identity: None,
            revision: None,
            detail: format!(
                "{name} ({}), credential {}",
                rec.view.role, rec.view.fingerprint
            ),
        };
        let ops = vec![
            Op::Delete(key),
            Op::Delete(format!("{CREDS}{}", rec.credential)),
        ];
        if !self.commit_audited(when, ops, &entry).await? {
            return Err(Error::Conflict(
                "the administrators changed meanwhile; try again".into(),
            ));
        }
        tracing::info!(admin = name, by = %by, "administrator revoked");
        Ok(rec.view)
    }
}

/// A time as the audit log says it.
pub(crate) fn show_time(t: i64) -> String {
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |t| t.to_string())
}
