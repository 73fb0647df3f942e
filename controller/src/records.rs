//! What the controller keeps in its store: the keys and the JSON records under them. One place,
//! so that every backend and every controller agrees.
//!
//! | key | record |
//! |---|---|
//! | `ca` | [`CaRecord`]: the CA certificate, and its key sealed with `--ca-key-file` |
//! | `policy` | [`PolicyHead`]: the live policy's revision, who applied it, and which blob holds its text and addresses |
//! | `blobs/<sha256>/<n>` | 64 KiB chunks of a [`PolicyRecord`]'s body, written before the head that names them |
//! | `tokens/<sha256 of the secret>` | [`TokenRecord`] |
//! | `nodes/<identity>` | [`NodeRecord`]: an enrolled node |
//! | `creds/<certificate fingerprint>` | [`CredRecord`]: a credential that may call the API |
//! | `endpoints/<identity>` | [`EndpointRecord`]: where peers send to it |
//! | `controllers/<hash of URL>` | [`ControllerRecord`]: a live controller, held under a lease |
//! | `quarantine/<identity>` | [`bulkhead_proto::Quarantine`]: an identity in quarantine |
//! | `audit/<unix ms>-<random>` | [`bulkhead_proto::AuditEntry`]: created once, never changed |
//! | `presence/<identity>` | [`PresenceRecord`]: which controller has its stream, what it reported |
//! | `admins/<name>` | [`AdminRecord`]: a named administrator, its role, its credential's fingerprint |
//! | `access/<id>` | [`bulkhead_proto::AccessView`]: an access request and where it stands |

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use bulkhead_proto::PublicKey;
use bulkhead_store::{Compare, Op};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The CA.
pub const CA: &str = "ca";
/// The live policy.
pub const POLICY: &str = "policy";
/// Join tokens, by the hash of their secret.
pub const TOKENS: &str = "tokens/";
/// Enrolled nodes, by identity.
pub const NODES: &str = "nodes/";
/// Credentials, by certificate fingerprint.
pub const CREDS: &str = "creds/";
/// Reported endpoints, by identity.
pub const ENDPOINTS: &str = "endpoints/";
/// Live controllers, each held under a lease while it runs (by a hash of its URL).
pub const CONTROLLERS: &str = "controllers/";

/// Administrators, by name (their credentials are under [`CREDS`]).
pub const ADMINS: &str = "admins/";
/// Access requests, by id.
pub const ACCESS: &str = "access/";

/// A named administrator. Written and deleted in one transaction with its `creds/` record, so
/// that the name and the credential never disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// As shown.
    pub view: bulkhead_proto::AdminView,
    /// The full fingerprint of its certificate: its key under [`CREDS`].
    pub credential: String,
}

/// Quarantines, by identity.
pub const QUARANTINE: &str = "quarantine/";
/// The audit log, in time order.
pub const AUDIT: &str = "audit/";

/// The writes that append `e` to the audit log, for the transaction doing what it records: the
/// key is new (time and randomness), and the compare makes sure it was.
pub fn audit(e: &bulkhead_proto::AuditEntry) -> (Compare, Op) {
    let key = format!(
        "{AUDIT}{:016}-{}",
        e.at,
        &bulkhead_proto::tls::random_hex(8)[..8]
    );
    (
        Compare::ModRevision(key.clone(), 0),
        Op::Put(key, encode(e)),
    )
}

/// Node presence, by identity.
pub const PRESENCE: &str = "presence/";

/// Where a node is connected and what it last reported, written by the controller holding its
/// stream (see `crate::presence`), so that every controller shows the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// The advertise URL of the controller that has (or last had) its stream.
    pub controller: String,
    /// Whether that controller has its stream open. Shown as online only while that controller
    /// is live too: a controller that dies leaves this `true` behind.
    pub online: bool,
    /// Unix seconds: when the stream opened.
    pub since: i64,
    /// Unix seconds: the last report or stream event, refreshed at least every
    /// `presence::HEARTBEAT` while online.
    pub last_seen: i64,
    /// The revision of the allowlist it enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The digest of the allowlist it enforces (daemons that predate digests send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `ok`, or what is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
    /// Posture facts, as last reported.
    #[serde(default, skip_serializing_if = "bulkhead_proto::Facts::is_empty")]
    pub facts: bulkhead_proto::Facts,
    /// The host firewall, as last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<bulkhead_proto::UnderlayStatus>,
}

/// Denied new flows one controller's nodes reported for one initiator:
/// `denials/<identity>/<controller id>`. Every controller adds up everyone's, so automatic
/// quarantine counts what all nodes saw, whichever controller they report to.
pub const DENIALS: &str = "denials/";

/// One controller's count of an initiator's denials, per second of the last minute: those the
/// initiator's own node reported (its egress filter refused them), and those each peer reported
/// (its ingress filter refused them), apart: a peer's report is a claim about another identity,
/// and counts only up to a cap ([`Tally::total`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialRecord {
    /// `(unix second, denials in it)`, oldest first; only seconds with denials. Reported by the
    /// initiator's own node.
    pub seconds: Vec<(i64, u32)>,
    /// The same, per peer that reported them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub witnesses: BTreeMap<String, Vec<(i64, u32)>>,
}

/// Denials of one initiator within a minute: its own, and each witness's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Reported by the initiator's own node.
    pub own: u64,
    /// Reported by each peer.
    pub witnesses: BTreeMap<String, u64>,
}

impl Tally {
    /// Adds another controller's tally.
    pub fn add(&mut self, other: &Tally) {
        self.own += other.own;
        for (w, n) in &other.witnesses {
            *self.witnesses.entry(w.clone()).or_default() += n;
        }
    }

    /// The count that decides an automatic quarantine: the initiator's own denials, and each
    /// witness's up to `threshold / 2`. So no single node can get another identity quarantined
    /// (nor two: it takes the initiator's own denials, or three peers' reports).
    pub fn total(&self, threshold: u32) -> u64 {
        let cap = u64::from(threshold / 2);
        self.own + self.witnesses.values().map(|&n| n.min(cap)).sum::<u64>()
    }
}

/// Whether a denial counted at `t_ms` is still within the minute at `now_ms`: the current second
/// and the 59 before. The one window rule of automatic quarantine, local and shared.
pub fn in_minute(now_ms: i64, t_ms: i64) -> bool {
    now_ms.div_euclid(1000) - t_ms.div_euclid(1000) < 60
}

fn within(seconds: &[(i64, u32)], now_ms: i64) -> u64 {
    seconds
        .iter()
        .filter(|(s, _)| in_minute(now_ms, s.saturating_mul(1000)))
        .map(|(_, n)| u64::from(*n))
        .sum()
}

impl DenialRecord {
    /// The initiator's own denials within the minute at `now_ms` ([`in_minute`]).
    pub fn within(&self, now_ms: i64) -> u64 {
        within(&self.seconds, now_ms)
    }

    /// Own and witnessed denials within the minute at `now_ms`.
    pub fn tally(&self, now_ms: i64) -> Tally {
        Tally {
            own: self.within(now_ms),
            witnesses: self
                .witnesses
                .iter()
                .map(|(w, s)| (w.clone(), within(s, now_ms)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// A live controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    /// Its advertise URL.
    pub url: String,
}

/// The CA certificate, PEM, and its private key sealed by [`crate::sealing`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    /// Certificate.
    pub cert: String,
    /// Private key, PEM, in clear: only in records written before sealing, which a starting
    /// controller seals. Never written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Private key sealed with the controllers' CA key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<String>,
}

/// Chunks of large values, by the SHA-256 of the whole.
pub const BLOBS: &str = "blobs/";
/// The largest chunk: etcd wants values of a few KB, and refuses requests over 1.5 MiB.
pub const CHUNK: usize = 64 * 1024;

/// The key of chunk `i` of the blob with hash `sha`.
pub fn blob_key(sha: &str, i: usize) -> String {
    format!("{BLOBS}{sha}/{i:05}")
}

/// What the `policy` key holds: small, so that the compare-and-swap that makes a revision is
/// small too; the text and addresses are in `blobs/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyHead {
    /// See [`PolicyRecord::revision`].
    pub revision: u64,
    /// Its file name.
    pub source: String,
    /// Unix seconds.
    pub applied_at: i64,
    /// `admin` or `file:PATH`.
    pub applied_by: String,
    /// SHA-256 (hex) of the body.
    pub body: String,
    /// How many chunks the body has.
    pub chunks: usize,
}

#[derive(Serialize, Deserialize)]
struct PolicyBody {
    text: String,
    addresses: BTreeMap<String, Ipv4Addr>,
}

impl PolicyRecord {
    /// The head and the chunks (key, value) to store it as.
    pub fn split(&self) -> (PolicyHead, Vec<(String, Vec<u8>)>) {
        let body = encode(&PolicyBody {
            text: self.text.clone(),
            addresses: self.addresses.clone(),
        });
        let sha = bulkhead_proto::tls::sha256_hex(&body);
        let chunks: Vec<(String, Vec<u8>)> = body
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| (blob_key(&sha, i), c.to_vec()))
            .collect();
        let head = PolicyHead {
            revision: self.revision,
            source: self.source.clone(),
            applied_at: self.applied_at,
            applied_by: self.applied_by.clone(),
            body: sha,
            chunks: chunks.len(),
        };
        (head, chunks)
    }

    /// Puts a record back together from its head and its chunks; a missing chunk or one that
    /// does not match the head's hash is an error.
    pub fn join<'a>(
        head: PolicyHead,
        chunk: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<PolicyRecord, String> {
        let mut body = Vec::new();
        for i in 0..head.chunks {
            let key = blob_key(&head.body, i);
            let c = chunk(&key).ok_or_else(|| {
                format!(
                    "policy revision {}: store key {key:?} is missing",
                    head.revision
                )
            })?;
            body.extend_from_slice(c);
        }
        if bulkhead_proto::tls::sha256_hex(&body) != head.body {
            return Err(format!(
                "policy revision {}: its text does not match its hash",
                head.revision
            ));
        }
        let b: PolicyBody = decode(&format!("{BLOBS}{}", head.body), &body)?;
        Ok(PolicyRecord {
            revision: head.revision,
            text: b.text,
            source: head.source,
            applied_at: head.applied_at,
            applied_by: head.applied_by,
            addresses: b.addresses,
        })
    }
}

/// The live policy, whole (in memory; stored as a [`PolicyHead`] and chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Starts at 1 and only ever goes up by one per apply.
    pub revision: u64,
    /// The text as applied.
    pub text: String,
    /// Its file name.
    pub source: String,
    /// Unix seconds.
    pub applied_at: i64,
    /// `admin` or `file:PATH`.
    pub applied_by: String,
    /// Every identity's address as this apply assigned them, so that every controller and every
    /// restart rebuilds exactly the same allowlists.
    pub addresses: BTreeMap<String, Ipv4Addr>,
}

/// A join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The identity it enrolls.
    pub identity: String,
    /// Unix seconds; refused from then on.
    pub expires: i64,
    /// Unix seconds.
    pub created: i64,
}

/// An enrolled node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its identity.
    pub identity: String,
    /// Its WireGuard public key.
    pub wireguard_key: PublicKey,
    /// The fingerprint of its client certificate.
    pub credential: String,
    /// Unix seconds.
    pub enrolled: i64,
    /// The address the node joined from, as the controller saw it: with `addressing:
    /// underlay`, the identity's address unless the policy gives one (spec §8). Set once, at
    /// enrollment; nothing the node says later moves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<std::net::Ipv4Addr>,
}

/// Who a credential is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum CredRecord {
    /// An administrator (the CLI).
    Admin {
        /// A name for the audit log.
        name: String,
        /// What it may do; a credential stored before roles existed is the first
        /// administrator's: an owner.
        #[serde(default = "owner")]
        admin_role: bulkhead_proto::Role,
        /// Unix seconds from which it no longer works.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires: Option<i64>,
    },
    /// An enrolled node.
    Node {
        /// Its identity.
        identity: String,
    },
}

fn owner() -> bulkhead_proto::Role {
    bulkhead_proto::Role::Owner
}

/// Where a node's peers send to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The UDP address.
    pub endpoint: SocketAddr,
    /// The address the node's reports came from, as the controller saw it: the server's
    /// underlay address for host firewalls (spec §7). Unlike `endpoint`, the node does not
    /// choose it (short of spoofing a TCP handshake through the whole TLS exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<std::net::Ipv4Addr>,
}

/// Encodes a record.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Decodes a record, naming the key if it is not what this program writes.
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| format!("store key {key:?}: unreadable record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_the_key() {
        let e = decode::<NodeRecord>("nodes/web-1", b"\x00garbage").unwrap_err();
        assert!(e.contains("nodes/web-1"), "{e}");
        let c = CredRecord::Node {
            identity: "web-1".into(),
        };
        assert_eq!(decode::<CredRecord>("k", &encode(&c)).unwrap(), c);
    }

    #[test]
    fn an_administrator_stored_before_roles_is_an_owner() {
        let old: CredRecord = decode("k", br#"{"role":"admin","name":"admin"}"#).unwrap();
        assert_eq!(
            old,
            CredRecord::Admin {
                name: "admin".into(),
                admin_role: bulkhead_proto::Role::Owner,
                expires: None
            }
        );
        let v: CredRecord = decode(
            "k",
            br#"{"role":"admin","name":"v","admin_role":"viewer","expires":5}"#,
        )
        .unwrap();
        assert!(matches!(
            v,
            CredRecord::Admin {
                admin_role: bulkhead_proto::Role::Viewer,
                expires: Some(5),
                ..
            }
        ));
    }

    #[test]
    fn a_policy_splits_into_chunks_and_joins_back() {
        let rec = PolicyRecord {
            revision: 3,
            text: "x".repeat(3 * CHUNK),
            source: "p.yaml".into(),
            applied_at: 1,
            applied_by: "admin".into(),
            addresses: BTreeMap::from([("a".to_string(), Ipv4Addr::new(10, 0, 0, 1))]),
        };
        let (head, chunks) = rec.split();
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|(_, v)| v.len() <= CHUNK));
        let map: std::collections::HashMap<String, Vec<u8>> = chunks.into_iter().collect();
        let back = PolicyRecord::join(head.clone(), |k| map.get(k).map(Vec::as_slice)).unwrap();
        assert_eq!(back, rec);
        // A chunk missing, or altered: refused, never half a policy.
        let e = PolicyRecord::join(head.clone(), |k| {
            (!k.ends_with("00002")).then(|| map[k].as_slice())
        })
        .unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let mut bad = map.clone();
        bad.get_mut(&blob_key(&head.body, 0)).unwrap()[0] ^= 1;
        let e = PolicyRecord::join(head, |k| bad.get(k).map(Vec::as_slice)).unwrap_err();
        assert!(e.contains("hash"), "{e}");
    }
}
