//! What the API reads: the audit log, the nodes, the controller's status.

use bulkhead_proto::{AuditEntry, CheckView, NodeView, StatusView};

use super::policy::upcoming;
use super::{Error, unix_now};
use crate::Controller;
use crate::records::{self, AUDIT};
use crate::view::lock;

impl Controller {
    /// The audit log, oldest first.
    pub async fn audit_log(&self) -> Result<Vec<AuditEntry>, Error> {
        let snap = self.store.range(AUDIT).await.map_err(Error::store)?;
        Ok(snap
            .kvs
            .iter()
            .filter_map(
                |kv| match records::decode::<AuditEntry>(&kv.key, &kv.value) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::error!("{e}");
                        None
                    }
                },
            )
            .collect())
    }

    /// Every identity in the policy or enrolled. What it shows is copied out under the view's
    /// lock; posture is evaluated after letting go of it.
    pub fn nodes(&self) -> Vec<NodeView> {
        let now = unix_now();
        let (live, inputs, mut rows) = {
            let v = lock(&self.view);
            let live = v.live();
            let r = v.records();
            let mut names: Vec<String> = r.nodes.keys().cloned().collect();
            if let Some(l) = &live {
                names.extend(
                    l.model
                        .identity_ids()
                        .map(|i| l.model.identity_name(i).to_string()),
                );
            }
            names.sort();
            names.dedup();
            let rows: Vec<NodeView> = names
                .into_iter()
                .map(|n| {
                    let p = r.presence.get(&n).map(|p| &p.0);
                    NodeView {
                        address: None,
                        in_policy: false,
                        enrolled: r.nodes.contains_key(&n),
                        endpoint: r.endpoints.get(&n).copied(),
                        online: v.online(&n),
                        last_seen: p.map(|p| p.last_seen),
                        revision: p.and_then(|p| p.revision),
                        in_sync: v.in_sync(&n),
                        status: p.and_then(|p| p.status.clone()),
                        posture: Vec::new(),
                        quarantine: r.quarantines.get(&n).map(|q| q.0.clone()),
                        upcoming: Vec::new(),
                        underlay_mode: v
                            .allowlist(&n)
                            .and_then(|l| l.underlay.as_ref().map(|u| u.mode))
                            .unwrap_or_default(),
                        underlay: p.and_then(|p| p.underlay),
                        identity: n,
                    }
                })
                .collect();
            let with_facts = live
                .as_ref()
                .is_some_and(|l| !l.model.policy().posture.is_empty());
            (live, with_facts.then(|| v.inputs(now)), rows)
        };
        let Some(live) = live else {
            return rows;
        };
        let m = &*live.model;
        for row in &mut rows {
            let Some(i) = m.identity(&row.identity) else {
                continue;
            };
            row.address = Some(m.address(i)).filter(|a| !a.is_unspecified());
            row.in_policy = true;
            if let Some(inputs) = &inputs {
                // The checks of the rules it initiates.
                let needed: std::collections::BTreeSet<&str> = m
                    .rules()
                    .iter()
                    .filter(|r| m.on_side(&r.from, i, false))
                    .flat_map(|r| r.posture.iter().map(|c| m.check_name(*c)))
                    .collect();
                row.posture = crate::view::posture(m, &inputs.of(&row.identity))
                    .into_iter()
                    .filter(|(c, _)| needed.contains(c.as_str()))
                    .map(|(check, r)| CheckView {
                        check,
                        pass: r.is_ok(),
                        reason: r.err(),
                    })
                    .collect();
            }
            row.upcoming = upcoming(m, now, |r| {
                m.on_side(&r.from, i, false) || m.on_side(&r.to, i, false)
            });
        }
        rows
    }

    /// The controller's own state, with the store's health.
    pub async fn status(&self) -> StatusView {
        // The store is asked first: the view's lock is never held across I/O.
        let store_health = self
            .store
            .health()
            .await
            .into_iter()
            .map(|(ep, r)| (ep, r.unwrap_or_else(|e| format!("unhealthy: {e}"))))
            .collect();
        let v = lock(&self.view);
        let r = v.records();
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            url: self.url.clone(),
            controllers: r.controllers.values().cloned().collect(),
            store: self.store.describe(),
            store_health,
            store_current: self.currency.current(),
            store_unconfirmed_ms: self
                .currency
                .unconfirmed_for()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            revision: v.revision(),
            identities: v.live().map_or(0, |l| l.model.identity_count()),
            enrolled: r.nodes.len(),
            online: r.presence.keys().filter(|n| v.online(n)).count(),
            in_sync: r.nodes.keys().filter(|n| v.in_sync(n)).count(),
            uptime: self.started.elapsed().as_secs(),
        }
    }
}
