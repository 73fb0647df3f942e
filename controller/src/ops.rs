//! What the API does, apart from HTTP: apply a policy, issue and redeem tokens, revoke, report.
//! Every change is a store transaction; the view follows the store ([`crate::view::sync`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bulkhead_policy::{Compiled, Conditions, Model, Severity, reach};
use bulkhead_proto::tls::{ClientPublicKey, cert_der, fingerprint, random_hex, sha256_hex};
use bulkhead_proto::{
    ApplyResponse, AuditEntry, Boundary, CheckView, JoinRequest, JoinResponse, NodeView,
    PairChange, Plan, PlanResponse, PlanSummary, PolicyRequest, PolicyView, Quarantine,
    QuarantineRequest, QuarantineResponse, Report, RevokeResponse, StatusView, Token, TokenRequest,
    TokenResponse,
};
use bulkhead_store::{Compare, Op};

use crate::Controller;
use crate::api::Fail;
use crate::records::{
    self, AUDIT, BLOBS, CREDS, CredRecord, ENDPOINTS, EndpointRecord, NODES, NodeRecord, POLICY,
    PRESENCE, PolicyHead, PolicyRecord, QUARANTINE, TOKENS, TokenRecord,
};
use crate::view::{Live, lock};

/// Longest token lifetime: a week.
pub const MAX_TTL: u64 = 7 * 24 * 3600;

pub(crate) fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

pub(crate) fn unix_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// A validated policy, ready to apply.
struct Candidate {
    model: Model,
    compiled: Compiled,
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
    }
}

/// The windows of the rules `keep` selects that open or close after `now`, soonest first.
fn upcoming(
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

fn changed_meanwhile() -> Fail {
    Fail::new(
        409,
        "conflict",
        "the quarantine changed meanwhile; try again",
    )
}

impl Controller {
    /// Commits `ops` if every compare in `when` holds, with `entry` appended to the audit log in
    /// the same transaction, and waits until the view reflects it. `Ok(false)`: a compare failed
    /// and nothing was written.
    async fn commit_audited(
        &self,
        mut when: Vec<Compare>,
        mut ops: Vec<Op>,
        entry: &AuditEntry,
    ) -> Result<bool, Fail> {
        let (c, a) = records::audit(entry);
        when.push(c);
        ops.push(a);
        let t = self.store.txn(&when, &ops).await.map_err(Fail::store)?;
        if t.succeeded {
            self.caught_up(t.revision).await;
        }
        Ok(t.succeeded)
    }

    /// Every live controller's URL, this one's first.
    pub fn controller_urls(&self) -> Vec<String> {
        let mut urls = vec![self.url.clone()];
        for u in lock(&self.view).records().controllers.values() {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        urls
    }

    /// Validates and tests `text` against the live addresses; every problem becomes a detail
    /// line of one `invalid_policy` error.
    fn validate(
        &self,
        text: &str,
        source: &str,
        prior: &BTreeMap<String, std::net::Ipv4Addr>,
    ) -> Result<Candidate, Fail> {
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
            _ => Err(Fail::new(
                422,
                "invalid_policy",
                format!(
                    "{source}: invalid policy, {} error(s); nothing applied",
                    details.len()
                ),
            )
            .with_details(details)),
        }
    }

    /// The plan for `req` against the live policy.
    pub fn plan(&self, req: &PolicyRequest) -> Result<PlanResponse, Fail> {
        // A snapshot of the live policy: the plan is computed without holding the view's lock.
        let live = lock(&self.view).live();
        let prior = live
            .as_ref()
            .map(|l| l.record.addresses.clone())
            .unwrap_or_default();
        let cand = self.validate(&req.text, &req.source, &prior)?;
        Ok(PlanResponse {
            base_revision: live.as_ref().map_or(0, |l| l.record.revision),
            plan: plan_between(
                live.as_deref().map(|l| (&*l.model, &l.compiled)),
                (&cand.model, &cand.compiled),
            ),
        })
    }

    /// Validates, tests and applies a policy; the one path for the CLI and `--policy`.
    pub async fn apply(&self, req: &PolicyRequest, by: &str) -> Result<ApplyResponse, Fail> {
        let current = self.store.get(POLICY).await.map_err(Fail::store)?;
        let (mod_rev, live_rev) = match &current {
            Some(kv) => (
                kv.mod_revision,
                records::decode::<PolicyHead>(POLICY, &kv.value)
                    .map_err(Fail::internal)?
                    .revision,
            ),
            None => (0, 0),
        };
        if let Some(base) = req.base_revision
            && base != live_rev
        {
            return Err(Fail::new(
                409,
                "conflict",
                format!("the live policy is revision {live_rev}, not {base}: plan again"),
            ));
        }
        // The live policy whole, from the view once it has caught up with that head.
        self.caught_up(mod_rev).await;
        let old = lock(&self.view).live();
        let old = match old {
            Some(l) if l.record.revision == live_rev => Some(l),
            None if live_rev == 0 => None,
            _ => {
                return Err(Fail::new(
                    503,
                    "unavailable",
                    format!("the stored policy revision {live_rev} is not readable yet; try again"),
                ));
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
        let plan = plan_between(
            old.as_deref().map(|l| (&*l.model, &l.compiled)),
            (&cand.model, &cand.compiled),
        );
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
                .map_err(Fail::store)?;
            when.extend(
                group
                    .iter()
                    .map(|(k, _)| Compare::ModRevision(k.clone(), r)),
            );
        }
        let sha = head.body.clone();
        lock(&self.view).prepare(Live {
            record: rec,
            model: Arc::new(cand.model),
            compiled: cand.compiled,
        });
        let summary = plan.summary();
        let (c, a) = records::audit(&AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: "policy.apply".into(),
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
                r.map_err(Fail::store)?;
                return Err(Fail::new(
                    409,
                    "conflict",
                    "another apply won the race: plan again",
                ));
            }
        };
        self.drop_old_blobs(&sha, t.revision).await;
        self.caught_up(t.revision).await;
        tracing::info!(revision, by, source = %req.source, changes = plan.changes.len(), "policy applied");
        Ok(ApplyResponse {
            revision,
            changed: true,
            summary,
        })
    }

    /// The live policy, once the view has caught up with the stored one: a policy applied
    /// through another controller a moment ago is the one shown (its compile may still be
    /// running here).
    pub async fn policy(&self) -> Result<PolicyView, Fail> {
        if let Some(head) = self.store.get(POLICY).await.map_err(Fail::store)? {
            self.caught_up(head.mod_revision).await;
        }
        let l = lock(&self.view)
            .live()
            .ok_or_else(|| Fail::new(404, "not_found", "no policy applied yet"))?;
        Ok(PolicyView {
            revision: l.record.revision,
            text: l.record.text.clone(),
            source: l.record.source.clone(),
            applied_at: l.record.applied_at,
            applied_by: l.record.applied_by.clone(),
            upcoming: upcoming(&l.model, unix_now(), |_| true),
        })
    }

    /// A new one-time join token.
    pub async fn token(&self, req: &TokenRequest) -> Result<TokenResponse, Fail> {
        if !bulkhead_policy::is_valid_name(&req.identity) {
            return Err(Fail::bad_request(format!(
                "{:?} is not a valid identity name",
                req.identity
            )));
        }
        if req.ttl == 0 || req.ttl > MAX_TTL {
            return Err(Fail::bad_request(format!(
                "ttl must be between 1 s and {MAX_TTL} s"
            )));
        }
        let secret = random_hex(32);
        let now = unix_now();
        let rec = TokenRecord {
            identity: req.identity.clone(),
            expires: now + req.ttl as i64,
            created: now,
        };
        let key = format!("{TOKENS}{}", sha256_hex(secret.as_bytes()));
        bulkhead_store::put(&*self.store, &[Op::Put(key, records::encode(&rec))])
            .await
            .map_err(Fail::store)?;
        let in_policy = lock(&self.view)
            .live()
            .is_some_and(|l| l.model.identity(&req.identity).is_some());
        tracing::info!(identity = %req.identity, expires = rec.expires, "join token created");
        Ok(TokenResponse {
            token: Token {
                urls: self.controller_urls(),
                ca_fingerprint: self.ca_fingerprint.clone(),
                secret,
            }
            .encode(),
            expires: rec.expires,
            warning: (!in_policy).then(|| {
                format!(
                    "{} is not in the live policy: its node will pass nothing until it is",
                    req.identity
                )
            }),
        })
    }

    /// Redeems a token: exactly once, even when many try at the same moment.
    pub async fn join(&self, req: &JoinRequest) -> Result<JoinResponse, Fail> {
        let invalid = || {
            Fail::new(
                403,
                "token_invalid",
                "the join token is unknown, used or expired",
            )
        };
        let key = format!("{TOKENS}{}", sha256_hex(req.secret.as_bytes()));
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(Fail::store)?
            .ok_or_else(invalid)?;
        let tok: TokenRecord = records::decode(&key, &kv.value).map_err(Fail::internal)?;
        if tok.expires <= unix_now() {
            let _ = self
                .store
                .txn(
                    &[Compare::ModRevision(key.clone(), kv.mod_revision)],
                    &[Op::Delete(key)],
                )
                .await;
            return Err(invalid());
        }
        let public = ClientPublicKey::from_base64(&req.credential_key)
            .map_err(|e| Fail::bad_request(e.0))?;
        let cert = self
            .ca
            .client_cert(&tok.identity, &public)
            .map_err(|e| Fail::internal(e.0))?;
        let fp = fingerprint(&cert_der(&cert).map_err(|e| Fail::internal(e.0))?);
        let node_key = format!("{NODES}{}", tok.identity);
        let previous = self.store.get(&node_key).await.map_err(Fail::store)?;
        let mut ops = vec![
            Op::Delete(key.clone()),
            Op::Put(
                node_key.clone(),
                records::encode(&NodeRecord {
                    identity: tok.identity.clone(),
                    wireguard_key: req.wireguard_key,
                    credential: fp.clone(),
                    enrolled: unix_now(),
                }),
            ),
            Op::Put(
                format!("{CREDS}{fp}"),
                records::encode(&CredRecord::Node {
                    identity: tok.identity.clone(),
                }),
            ),
        ];
        // Re-enrolling replaces the identity's node: its old credential stops working.
        if let Some(prev) = &previous
            && let Ok(rec) = records::decode::<NodeRecord>(&node_key, &prev.value)
        {
            ops.push(Op::Delete(format!("{CREDS}{}", rec.credential)));
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: "node".into(),
            action: "node.enroll".into(),
            identity: Some(tok.identity.clone()),
            revision: None,
            detail: format!(
                "credential {}{}",
                &fp[..16],
                if previous.is_some() {
                    ", replacing the previous node"
                } else {
                    ""
                }
            ),
        };
        let when = vec![
            Compare::ModRevision(key, kv.mod_revision),
            Compare::ModRevision(node_key, previous.as_ref().map_or(0, |p| p.mod_revision)),
        ];
        if !self.commit_audited(when, ops, &entry).await? {
            return Err(invalid());
        }
        tracing::info!(identity = %tok.identity, "node enrolled");
        Ok(JoinResponse {
            identity: tok.identity,
            certificate: cert,
            ca: self.ca.cert_pem.clone(),
            controllers: self.controller_urls(),
        })
    }

    /// Revokes an identity's node: its record, its credential, its endpoint and any unused
    /// token for it go, in one transaction.
    pub async fn revoke(&self, identity: &str, by: &str) -> Result<RevokeResponse, Fail> {
        let node_key = format!("{NODES}{identity}");
        let node = self.store.get(&node_key).await.map_err(Fail::store)?;
        let tokens = self.store.range(TOKENS).await.map_err(Fail::store)?;
        let mut ops = vec![
            Op::Delete(node_key.clone()),
            Op::Delete(format!("{ENDPOINTS}{identity}")),
            Op::Delete(format!("{PRESENCE}{identity}")),
        ];
        for kv in &tokens.kvs {
            if records::decode::<TokenRecord>(&kv.key, &kv.value)
                .is_ok_and(|t| t.identity == identity)
            {
                ops.push(Op::Delete(kv.key.clone()));
            }
        }
        let was_enrolled = match &node {
            Some(kv) => {
                let rec: NodeRecord =
                    records::decode(&node_key, &kv.value).map_err(Fail::internal)?;
                ops.push(Op::Delete(format!("{CREDS}{}", rec.credential)));
                true
            }
            None => false,
        };
        if !was_enrolled && ops.len() == 3 {
            return Err(Fail::new(
                404,
                "not_found",
                format!("no node is enrolled as {identity:?}"),
            ));
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: "node.revoke".into(),
            identity: Some(identity.to_string()),
            revision: None,
            detail: if was_enrolled {
                "credential revoked, tunnels dropped".into()
            } else {
                "unused tokens voided".into()
            },
        };
        let when = vec![Compare::ModRevision(
            node_key,
            node.as_ref().map_or(0, |n| n.mod_revision),
        )];
        if !self.commit_audited(when, ops, &entry).await? {
            return Err(Fail::new(
                409,
                "conflict",
                "the node changed meanwhile; try again",
            ));
        }
        tracing::info!(identity, "node revoked");
        Ok(RevokeResponse {
            identity: identity.to_string(),
            was_enrolled,
        })
    }

    /// Takes a node's report; stores its endpoint if it moved.
    pub async fn report(&self, identity: &str, from: SocketAddr, r: Report) -> Result<(), Fail> {
        let endpoint = r
            .endpoint
            .unwrap_or_else(|| SocketAddr::new(from.ip(), r.listen_port));
        self.presence.reported(identity, &r);
        self.metrics.reported(identity, r.digest.as_deref());
        let moved = lock(&self.view).records().endpoints.get(identity) != Some(&endpoint);
        if moved {
            bulkhead_store::put(
                &*self.store,
                &[Op::Put(
                    format!("{ENDPOINTS}{identity}"),
                    records::encode(&EndpointRecord { endpoint }),
                )],
            )
            .await
            .map_err(Fail::store)?;
        }
        Ok(())
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

    /// Puts an identity in quarantine: it loses every rule but those naming `quarantined`, on
    /// every node, until `duration` passes or it is released. By hand, a quarantine in force is
    /// replaced (its end changes); `automatic` (on denied flows) leaves one in force alone and
    /// answers `conflict`.
    pub async fn quarantine(
        &self,
        identity: &str,
        req: &QuarantineRequest,
        by: &str,
        reason: &str,
        automatic: bool,
    ) -> Result<QuarantineResponse, Fail> {
        let now = unix_now();
        let duration = {
            let v = lock(&self.view);
            let live = v.live();
            let live = live.as_ref();
            let known = live.is_some_and(|l| l.model.identity(identity).is_some())
                || v.records().nodes.contains_key(identity);
            if !known {
                return Err(Fail::new(
                    404,
                    "not_found",
                    format!("no identity {identity:?} in the policy or enrolled"),
                ));
            }
            req.duration
                .map(|d| i64::try_from(d).unwrap_or(i64::MAX))
                .or_else(|| live.and_then(|l| l.model.policy().quarantine.map(|q| q.duration_secs)))
        };
        let key = format!("{QUARANTINE}{identity}");
        let current = self.store.get(&key).await.map_err(Fail::store)?;
        let q = Quarantine {
            since: now,
            until: duration.map(|d| now.saturating_add(d)),
            reason: reason.to_string(),
            by: by.to_string(),
        };
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: "quarantine".into(),
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
            return Err(Fail::new(
                409,
                "conflict",
                format!("{identity} is already quarantined"),
            ));
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
        tracing::warn!(identity, by, reason, until = ?q.until, "quarantined");
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
        by: &str,
        expected: Option<bulkhead_store::Revision>,
    ) -> Result<QuarantineResponse, Fail> {
        let key = format!("{QUARANTINE}{identity}");
        let Some(kv) = self.store.get(&key).await.map_err(Fail::store)? else {
            return Err(Fail::new(
                404,
                "not_found",
                format!("{identity} is not in quarantine"),
            ));
        };
        if expected.is_some_and(|r| r != kv.mod_revision) {
            return Err(changed_meanwhile());
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: "release".into(),
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
        tracing::warn!(identity, by, "released from quarantine");
        Ok(QuarantineResponse {
            identity: identity.to_string(),
            quarantine: None,
        })
    }

    /// The audit log, oldest first.
    pub async fn audit_log(&self) -> Result<Vec<AuditEntry>, Fail> {
        let snap = self.store.range(AUDIT).await.map_err(Fail::store)?;
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
            row.address = Some(m.address(i));
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
            revision: v.revision(),
            identities: v.live().map_or(0, |l| l.model.identity_count()),
            enrolled: r.nodes.len(),
            online: r.presence.keys().filter(|n| v.online(n)).count(),
            in_sync: r.nodes.keys().filter(|n| v.in_sync(n)).count(),
            uptime: self.started.elapsed().as_secs(),
        }
    }
}
