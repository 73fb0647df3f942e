//! What a node is told: [`NodeConfig`], its whole desired state, in one message.
//!
//! The daemon translates it into what its data-plane core takes; the core never sees this type
//! (nor serde). Later fields (host firewall rules, routes) join this struct, so a node always
//! gets its desired state as one value, applied as one step.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bulkhead_allowlist::Allowlist;
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// How to reach one peer: what the controller tells a node besides its allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's WireGuard public key.
    pub public_key: PublicKey,
    /// Where to send to the peer, if known; learned from authenticated packets otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

/// Everything a node enforces: its allowlist and how to reach the peers it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The compiled allowlist.
    pub allowlist: Allowlist,
    /// Keys and endpoints of peers, by name. A peer of the allowlist missing here gets no tunnel.
    #[serde(default)]
    pub peers: BTreeMap<String, PeerInfo>,
    /// WireGuard persistent keepalive, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u16>,
}
