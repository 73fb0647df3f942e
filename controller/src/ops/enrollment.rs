//! Enrollment: join tokens, joining with one, revocation, and nodes' reports.

use std::net::SocketAddr;

use bulkhead_proto::tls::{ClientPublicKey, cert_der, fingerprint, random_hex, sha256_hex};
use bulkhead_proto::{
    AuditAction, AuditEntry, JoinRequest, JoinResponse, Report, RevokeResponse, Token,
    TokenRequest, TokenResponse,
};
use bulkhead_store::{Compare, Op};

use super::{Actor, Error, MAX_TTL, unix_ms, unix_now};
use crate::Controller;
use crate::records::{
    self, CREDS, CredRecord, ENDPOINTS, EndpointRecord, NODES, NodeRecord, PRESENCE, TOKENS,
    TokenRecord,
};
use crate::view::lock;

/// Most posture facts one report may carry (host facts and node-local checks).
pub const MAX_FACTS: usize = 64;
/// Longest fact name, and longest value.
const MAX_FACT_NAME: usize = 64;
const MAX_FACT_VALUE: usize = 256;
/// Longest status and version a node may report.
const MAX_STATUS: usize = 512;
const MAX_VERSION: usize = 64;
/// A node's endpoint moves at most this often: each move is a store write and a push to every
/// peer of the node.
const ENDPOINT_MOVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a report stays within what a node may say about itself: presence records are written
/// in batches, and one node's oversized record must not fail the others'.
fn check_report(r: &Report) -> Result<(), Error> {
    let bad = |what: String| Err(Error::BadRequest(what));
    if r.facts.len() > MAX_FACTS {
        return bad(format!("{} facts: at most {MAX_FACTS}", r.facts.len()));
    }
    if let Some((name, _)) = r
        .facts
        .iter()
        .find(|(n, f)| n.len() > MAX_FACT_NAME || f.value.len() > MAX_FACT_VALUE)
    {
        return bad(format!(
            "fact {:?}: names at most {MAX_FACT_NAME} bytes, values {MAX_FACT_VALUE}",
            name.chars().take(MAX_FACT_NAME).collect::<String>()
        ));
    }
    if r.status.len() > MAX_STATUS || r.version.len() > MAX_VERSION {
        return bad(format!(
            "status at most {MAX_STATUS} bytes, version {MAX_VERSION}"
        ));
    }
    if r.digest.as_ref().is_some_and(|d| d.len() > 64) {
        return bad("digest too long".into());
    }
    Ok(())
}

/// The report with its location: `endpoint.address` is the address the report came from, as
/// this controller saw it (spec §10), never what the node says; a node's own claim of that
/// fact is dropped.
fn with_location(mut r: Report, from: SocketAddr) -> Report {
    let ip = crate::view::ipv4(from.ip()).map_or(from.ip(), std::net::IpAddr::V4);
    r.facts.insert(
        bulkhead_policy::posture::ENDPOINT_ADDRESS.to_string(),
        bulkhead_proto::Fact {
            value: ip.to_string(),
            // Reports come every 10 s; the presence record is refreshed at least every 30 s.
            interval: 30,
        },
    );
    r
}

impl Controller {
    /// Whether `identity`'s endpoint may move now (at most once per [`ENDPOINT_MOVE_EVERY`]);
    /// if so, notes the move.
    fn may_move(&self, identity: &str) -> bool {
        let now = std::time::Instant::now();
        let mut moves = self
            .endpoint_moves
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if moves.len() > 100_000 {
            moves.retain(|_, t| now.duration_since(*t) < ENDPOINT_MOVE_EVERY);
        }
        match moves.get(identity) {
            Some(t) if now.duration_since(*t) < ENDPOINT_MOVE_EVERY => false,
            _ => {
                moves.insert(identity.to_string(), now);
                true
            }
        }
    }
    /// A new one-time join token.
    pub async fn token(&self, req: &TokenRequest, by: &Actor) -> Result<TokenResponse, Error> {
        if !bulkhead_policy::is_valid_name(&req.identity) {
            return Err(Error::BadRequest(format!(
                "{:?} is not a valid identity name",
                req.identity
            )));
        }
        if req.ttl == 0 || req.ttl > MAX_TTL {
            return Err(Error::BadRequest(format!(
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
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::TokenCreate,
            identity: Some(req.identity.clone()),
            revision: None,
            detail: format!("join token valid until {} (Unix time)", rec.expires),
        };
        let put = vec![Op::Put(key, records::encode(&rec))];
        if !self.commit_audited(Vec::new(), put, &entry).await? {
            return Err(Error::Conflict(
                "the token could not be stored; try again".into(),
            ));
        }
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
    pub async fn join(
        &self,
        req: &JoinRequest,
        from: std::net::SocketAddr,
    ) -> Result<JoinResponse, Error> {
        let invalid = || Error::TokenInvalid;
        let key = format!("{TOKENS}{}", sha256_hex(req.secret.as_bytes()));
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(Error::store)?
            .ok_or_else(invalid)?;
        let tok: TokenRecord = records::decode(&key, &kv.value).map_err(Error::internal)?;
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
            .map_err(|e| Error::BadRequest(e.0))?;
        let cert = self
            .ca
            .client_cert(&tok.identity, &public)
            .map_err(|e| Error::internal(e.0))?;
        let fp = fingerprint(&cert_der(&cert).map_err(|e| Error::internal(e.0))?);
        let node_key = format!("{NODES}{}", tok.identity);
        // A WireGuard key belongs to one node: another node's key here would let this one take
        // over or break the other's tunnels. (The same identity may enroll again with its key.)
        let nodes = self.store.range(NODES).await.map_err(Error::store)?;
        let taken = nodes.kvs.iter().find_map(|kv| {
            let n = records::decode::<NodeRecord>(&kv.key, &kv.value).ok()?;
            (n.wireguard_key == req.wireguard_key && n.identity != tok.identity)
                .then_some(n.identity)
        });
        if let Some(other) = taken {
            tracing::warn!(identity = %tok.identity, holder = %other, "join refused: its WireGuard key is another node's");
            return Err(Error::Conflict(
                "this WireGuard key is already another node's: each node needs its own".into(),
            ));
        }
        let pinned = crate::view::ipv4(from.ip());
        self.check_pin(&tok.identity, pinned, &nodes.kvs)?;
        let previous = self.store.get(&node_key).await.map_err(Error::store)?;
        let mut ops = vec![
            Op::Delete(key.clone()),
            Op::Put(
                node_key.clone(),
                records::encode(&NodeRecord {
                    identity: tok.identity.clone(),
                    wireguard_key: req.wireguard_key,
                    credential: fp.clone(),
                    enrolled: unix_now(),
                    pinned,
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
            who: Actor::Node.to_string(),
            action: AuditAction::NodeEnroll,
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

    /// With `addressing: underlay`, an identity without an `address:` takes the one its node
    /// joins from (spec §8): it must be in the network's range, and no other enrolled node may
    /// hold it, or the join is refused (a node that took another's address would draw that
    /// host's traffic into its own tunnel).
    fn check_pin(
        &self,
        identity: &str,
        pinned: Option<std::net::Ipv4Addr>,
        nodes: &[bulkhead_store::KeyValue],
    ) -> Result<(), Error> {
        let Some(live) = lock(&self.view).live() else {
            return Ok(());
        };
        let m = &live.model;
        if m.policy().addressing != bulkhead_allowlist::Addressing::Underlay {
            return Ok(());
        }
        let declared = m
            .policy()
            .identities
            .iter()
            .any(|i| i.name == identity && i.address.is_some());
        if declared {
            return Ok(());
        }
        let net = m.policy().cidr;
        let Some(a) = pinned.filter(|a| net.contains(*a)) else {
            return Err(Error::BadRequest(format!(
                "with addressing: underlay, {identity} takes the address it joins from, and \
                 {} is outside the network {net}: join from the server's own address, or give \
                 {identity} an address in the policy",
                pinned.map_or("an IPv6 address".to_string(), |a| a.to_string())
            )));
        };
        let holder = nodes.iter().find_map(|kv| {
            let n = records::decode::<NodeRecord>(&kv.key, &kv.value).ok()?;
            (n.pinned == Some(a) && n.identity != identity).then_some(n.identity)
        });
        let declared_by = m.policy().identities.iter().find_map(|i| {
            (i.address.as_ref().is_some_and(|d| d.value == a) && i.name != identity)
                .then(|| i.name.clone())
        });
        if let Some(other) = holder.or(declared_by) {
            return Err(Error::Conflict(format!(
                "{a} is already {other}'s address: one server, one identity"
            )));
        }
        Ok(())
    }

    /// Revokes an identity's node: its record, its credential, its endpoint and any unused
    /// token for it go, in one transaction.
    pub async fn revoke(&self, identity: &str, by: &Actor) -> Result<RevokeResponse, Error> {
        let node_key = format!("{NODES}{identity}");
        let node = self.store.get(&node_key).await.map_err(Error::store)?;
        let tokens = self.store.range(TOKENS).await.map_err(Error::store)?;
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
                    records::decode(&node_key, &kv.value).map_err(Error::internal)?;
                ops.push(Op::Delete(format!("{CREDS}{}", rec.credential)));
                true
            }
            None => false,
        };
        if !was_enrolled && ops.len() == 3 {
            return Err(Error::NotFound(format!(
                "no node is enrolled as {identity:?}"
            )));
        }
        let entry = AuditEntry {
            at: unix_ms(),
            who: by.to_string(),
            action: AuditAction::NodeRevoke,
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
            return Err(Error::Conflict(
                "the node changed meanwhile; try again".into(),
            ));
        }
        tracing::info!(identity, "node revoked");
        Ok(RevokeResponse {
            identity: identity.to_string(),
            was_enrolled,
        })
    }

    /// Takes a node's report; stores its endpoint if it moved.
    pub async fn report(&self, identity: &str, from: SocketAddr, r: Report) -> Result<(), Error> {
        check_report(&r)?;
        let r = with_location(r, from);
        let endpoint = r
            .endpoint
            .unwrap_or_else(|| SocketAddr::new(from.ip(), r.listen_port));
        self.presence.reported(identity, &r);
        self.metrics.reported(identity, r.digest.as_deref());
        // The underlay address is the one the report came from: seen, not claimed.
        let underlay = crate::view::ipv4(from.ip());
        let moved = {
            let view = lock(&self.view);
            let r = view.records();
            r.endpoints.get(identity) != Some(&endpoint)
                || r.underlay.get(identity).copied() != underlay
        };
        if moved && !self.may_move(identity) {
            tracing::debug!(identity, %endpoint, "endpoint moved again too soon: kept the last");
            return Ok(());
        }
        if moved {
            bulkhead_store::put(
                &*self.store,
                &[Op::Put(
                    format!("{ENDPOINTS}{identity}"),
                    records::encode(&EndpointRecord { endpoint, underlay }),
                )],
            )
            .await
            .map_err(Error::store)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_location_is_the_connections_never_the_nodes_claim() {
        let mut r = Report::default();
        r.facts.insert(
            "endpoint.address".into(),
            bulkhead_proto::Fact {
                value: "10.0.0.1".into(),
                interval: 1,
            },
        );
        let seen = with_location(r, "[::ffff:198.18.0.7]:40000".parse().unwrap());
        let f = &seen.facts["endpoint.address"];
        assert_eq!(
            f.value, "198.18.0.7",
            "seen, and an IPv4 address seen as IPv6 is IPv4"
        );
        assert_eq!(f.interval, 30);
        let v6 = with_location(Report::default(), "[fd00::9]:1".parse().unwrap());
        assert_eq!(v6.facts["endpoint.address"].value, "fd00::9");
    }
}
