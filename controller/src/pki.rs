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

use crate::records::{self, CA, CREDS, CaRecord, CredRecord};
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

/// Makes sure `path` holds a working administrator configuration for `url`: keeps the one there
/// if its credential is still valid (rewriting the URL if it changed), else issues a new one.
pub async fn admin_config(
    store: &dyn Store,
    ca: &Ca,
    url: &str,
    path: &Path,
) -> anyhow::Result<()> {
    if let Ok(mut cfg) = CliConfig::load(path) {
        let fp = cert_der(&cfg.certificate).map(|d| fingerprint(&d));
        if let Ok(fp) = fp
            && store.get(&format!("{CREDS}{fp}")).await?.is_some()
            && cfg.ca == ca.cert_pem
        {
            if cfg.url != url {
                cfg.url = url.to_string();
                cfg.save(path).map_err(anyhow::Error::msg)?;
            }
            return Ok(());
        }
    }
    let key = CredentialKey::generate()?;
    let cert = ca.client_cert("admin", &key.public())?;
    let fp = fingerprint(&cert_der(&cert)?);
    let rec = CredRecord::Admin {
        name: "admin".into(),
    };
    let entry = bulkhead_proto::AuditEntry {
        at: jiff::Timestamp::now().as_millisecond(),
        who: crate::ops::Actor::Controller.to_string(),
        action: bulkhead_proto::AuditAction::AdminIssue,
        identity: None,
        revision: None,
        detail: format!(
            "administrator credential {} written to {}",
            &fp[..16],
            path.display()
        ),
    };
    let (c, a) = records::audit(&entry);
    let t = store
        .txn(
            &[c],
            &[Op::Put(format!("{CREDS}{fp}"), records::encode(&rec)), a],
        )
        .await?;
    anyhow::ensure!(
        t.succeeded,
        "cannot record the administrator's credential; try again"
    );
    let cfg = CliConfig {
        url: url.to_string(),
        ca: ca.cert_pem.clone(),
        certificate: cert,
        key: key.pem(),
    };
    cfg.save(path).map_err(anyhow::Error::msg)?;
    tracing::info!(path = %path.display(), "wrote the administrator's CLI configuration");
    Ok(())
}
