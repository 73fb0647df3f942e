//! First start: the CA and the administrator's credential.
//!
//! The CA lives in the store (created once, by compare-and-swap, so that several controllers on
//! one etcd agree on one CA), its private key sealed with the key in `--ca-key-file`
//! ([`crate::sealing`]). The administrator's credential is a client certificate whose key
//! never leaves `STATE/admin.yaml` (mode 0600); the store holds only its fingerprint.

use std::path::Path;

use anyhow::Context;
use bulkhead_proto::CliConfig;
use bulkhead_proto::tls::{Ca, CredentialKey, cert_der, fingerprint};
use bulkhead_store::{Compare, Op, Store};

use bulkhead_proto::{AdminView, Role};

use crate::records::{self, ADMINS, AdminRecord, CA, CREDS, CaRecord, CredRecord};
use crate::sealing::SealKey;

/// Loads the CA from the store, creating it if there is none. A record that still holds the
/// key in clear (written before sealing) is sealed now. Fails if the key does not open with
/// `seal`: a controller with the wrong key file must not start (nor make a CA of its own).
pub async fn ca(store: &dyn Store, seal: &SealKey) -> anyhow::Result<Ca> {
    loop {
        if let Some(kv) = store.get(CA).await? {
            let rec: CaRecord = records::decode(CA, &kv.value).map_err(anyhow::Error::msg)?;
            if let Some(sealed) = &rec.sealed_key {
                let key = seal.open(&rec.cert, sealed)?;
                return Ca::load(&rec.cert, &key).context("stored CA");
            }
            let ca = Ca::load(&rec.cert, &rec.key).context("stored CA")?;
            let sealed = CaRecord {
                cert: rec.cert.clone(),
                key: String::new(),
                sealed_key: Some(seal.seal(&rec.cert, &rec.key)?),
            };
            let t = store
                .txn(
                    &[Compare::ModRevision(CA.into(), kv.mod_revision)],
                    &[Op::Put(CA.into(), records::encode(&sealed))],
                )
                .await?;
            if t.succeeded {
                tracing::warn!(
                    "sealed the CA key, which the store held in clear; older copies (etcd \
                     history until compaction, backups) still hold it"
                );
                return Ok(ca);
            }
            // Another controller sealed it first: read theirs.
            continue;
        }
        let ca = Ca::generate()?;
        let rec = CaRecord {
            cert: ca.cert_pem.clone(),
            key: String::new(),
            sealed_key: Some(seal.seal(&ca.cert_pem, &ca.key_pem)?),
        };
        let t = store
            .txn(
                &[Compare::ModRevision(CA.into(), 0)],
                &[Op::Put(CA.into(), records::encode(&rec))],
            )
            .await?;
        if t.succeeded {
            tracing::info!(fingerprint = %ca.fingerprint()?, "created the CA");
            return Ok(ca);
        }
        // Another controller created one first: use theirs.
    }
}

/// Makes sure `path` holds a working owner's configuration for `url`: keeps the one there if
/// its credential is still valid (rewriting the URL if it changed), else issues a new one. This
/// is the break-glass credential (docs/operations.md): whoever can read the controller's state
/// directory is an owner. The first one is named `admin`; a controller that finds that name
/// taken by another credential (several controllers on one etcd, or a lost file) names its own
/// `admin-` and 8 hex digits of its URL's hash, and replaces its own earlier one.
pub async fn admin_config(
    store: &dyn Store,
    ca: &Ca,
    url: &str,
    path: &Path,
) -> anyhow::Result<()> {
    if let Ok(mut cfg) = CliConfig::load(path) {
        let fp = cert_der(&cfg.certificate).map(|d| fingerprint(&d));
        if let Ok(fp) = fp
            && let Some(kv) = store.get(&format!("{CREDS}{fp}")).await?
            && cfg.ca == ca.cert_pem
        {
            let rec: CredRecord =
                records::decode(&format!("{CREDS}{fp}"), &kv.value).map_err(anyhow::Error::msg)?;
            if let CredRecord::Admin { name, .. } = &rec {
                ensure_listed(store, name, &fp).await?;
            }
            if cfg.url != url {
                cfg.url = url.to_string();
                cfg.save(path).map_err(anyhow::Error::msg)?;
            }
            return Ok(());
        }
    }
    let key = CredentialKey::generate()?;
    let mut name = "admin".to_string();
    let mut when = vec![Compare::ModRevision(format!("{ADMINS}{name}"), 0)];
    let mut ops = Vec::new();
    if store.get(&format!("{ADMINS}{name}")).await?.is_some() {
        name = format!(
            "admin-{}",
            &bulkhead_proto::tls::sha256_hex(url.as_bytes())[..8]
        );
        let own = format!("{ADMINS}{name}");
        when = match store.get(&own).await? {
            Some(kv) => {
                // Our own earlier one, whose file is gone: replaced. Never an administrator an
                // owner added under that name.
                let old =
                    records::decode::<AdminRecord>(&own, &kv.value).map_err(anyhow::Error::msg)?;
                anyhow::ensure!(
                    old.view.created_by == crate::ops::Actor::Controller.to_string(),
                    "the administrator {name}, whom this controller would issue {} to, was added \
                     by {}: revoke it, then start again",
                    path.display(),
                    old.view.created_by
                );
                ops.push(Op::Delete(format!("{CREDS}{}", old.credential)));
                vec![Compare::ModRevision(own, kv.mod_revision)]
            }
            None => vec![Compare::ModRevision(own, 0)],
        };
    }
    let cert = ca.client_cert(&name, &key.public())?;
    let fp = fingerprint(&cert_der(&cert)?);
    let now = jiff::Timestamp::now().as_second();
    let rec = CredRecord::Admin {
        name: name.clone(),
        admin_role: Role::Owner,
        expires: None,
    };
    let admin = AdminRecord {
        view: AdminView {
            name: name.clone(),
            role: Role::Owner,
            created: now,
            created_by: crate::ops::Actor::Controller.to_string(),
            expires: None,
            fingerprint: fp[..16].to_string(),
        },
        credential: fp.clone(),
    };
    let entry = bulkhead_proto::AuditEntry {
        at: jiff::Timestamp::now().as_millisecond(),
        who: crate::ops::Actor::Controller.to_string(),
        action: bulkhead_proto::AuditAction::AdminIssue,
        identity: None,
        revision: None,
        detail: format!(
            "owner {name}: credential {} written to {}",
            &fp[..16],
            path.display()
        ),
    };
    let (c, a) = records::audit(&entry);
    when.push(c);
    ops.extend([
        Op::Put(format!("{CREDS}{fp}"), records::encode(&rec)),
        Op::Put(format!("{ADMINS}{name}"), records::encode(&admin)),
        a,
    ]);
    let t = store.txn(&when, &ops).await?;
    anyhow::ensure!(
        t.succeeded,
        "cannot record the administrator's credential (another controller wrote one at the same \
         time); start again"
    );
    let cfg = CliConfig {
        url: url.to_string(),
        ca: ca.cert_pem.clone(),
        certificate: cert,
        key: key.pem(),
    };
    cfg.save(path).map_err(anyhow::Error::msg)?;
    tracing::info!(path = %path.display(), name, "wrote an owner's CLI configuration");
    Ok(())
}

/// An administrator credential stored before administrators had names of their own in the
/// store gets its `admins/` record, so that it is listed, can be revoked, and counts as an
/// owner.
async fn ensure_listed(store: &dyn Store, name: &str, fp: &str) -> anyhow::Result<()> {
    let key = format!("{ADMINS}{name}");
    if store.get(&key).await?.is_some() {
        return Ok(());
    }
    let admin = AdminRecord {
        view: AdminView {
            name: name.to_string(),
            role: Role::Owner,
            created: jiff::Timestamp::now().as_second(),
            created_by: crate::ops::Actor::Controller.to_string(),
            expires: None,
            fingerprint: fp[..16.min(fp.len())].to_string(),
        },
        credential: fp.to_string(),
    };
    // Another controller may do the same at once: one of them writes it.
    store
        .txn(
            &[Compare::ModRevision(key.clone(), 0)],
            &[Op::Put(key, records::encode(&admin))],
        )
        .await?;
    Ok(())
}
