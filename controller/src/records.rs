//! What the controller keeps in its store: the keys and the JSON records under them. One place,
//! so that every backend and every controller agrees.
//!
//! | key | record |
//! |---|---|
//! | `ca` | [`CaRecord`]: the CA certificate and key |
//! | `policy` | [`PolicyRecord`]: the live policy, its revision and its addresses |
//! | `tokens/<sha256 of the secret>` | [`TokenRecord`] |
//! | `nodes/<identity>` | [`NodeRecord`]: an enrolled node |
//! | `creds/<certificate fingerprint>` | [`CredRecord`]: a credential that may call the API |
//! | `endpoints/<identity>` | [`EndpointRecord`]: where peers send to it |
//! | `controllers/<hash of URL>` | [`ControllerRecord`]: a live controller, held under a lease |
//! | `presence/<identity>` | [`PresenceRecord`]: which controller has its stream, what it reported |

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use bulkhead_dataplane::Key;
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
    /// `ok`, or what is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
}

/// A live controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    /// Its advertise URL.
    pub url: String,
}

/// The CA certificate and key, PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// The live policy.
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
    pub wireguard_key: Key,
    /// The fingerprint of its client certificate.
    pub credential: String,
    /// Unix seconds.
    pub enrolled: i64,
}

/// Who a credential is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum CredRecord {
    /// An administrator (the CLI).
    Admin {
        /// A name for the audit log.
        name: String,
    },
    /// An enrolled node.
    Node {
        /// Its identity.
        identity: String,
    },
}

/// Where a node's peers send to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The UDP address.
    pub endpoint: SocketAddr,
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
}
