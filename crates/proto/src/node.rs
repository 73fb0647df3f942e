//! What a node is told: [`NodeConfig`], its whole desired state, in one message.
//!
//! The daemon translates it into what its data-plane core takes; the core never sees this type
//! (nor serde). Later fields (host firewall rules, routes) join this struct, so a node always
//! gets its desired state as one value, applied as one step.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use bulkhead_allowlist::{Allowlist, Network, PortSpec, UnderlayMode};
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
    /// The host firewall, with the allowlist's underlay entries resolved to addresses; absent
    /// when the identity is out of the policy's underlay scope or the mode is `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<UnderlayConfig>,
}

/// A node's host firewall (spec §7), as the controller resolves it for that node: the
/// allowlist's [`Underlay`](bulkhead_allowlist::Underlay) entries with identities replaced by
/// their servers' underlay addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayConfig {
    /// `observe` or `enforce`.
    pub mode: UnderlayMode,
    /// Every other enrolled server's underlay address, with its identity: outbound traffic to
    /// them is what the firewall guards, and flow entries name them.
    #[serde(default)]
    pub servers: BTreeMap<Ipv4Addr, String>,
    /// The controllers' API addresses: never dropped, whatever the policy says.
    #[serde(default)]
    pub controllers: Vec<SocketAddr>,
    /// Connections others may open to this server, by `allow` entry.
    #[serde(default)]
    pub inbound: Vec<UnderlayAllow>,
    /// Connections this server may open to other enrolled servers, by `allow` entry.
    #[serde(default)]
    pub outbound: Vec<UnderlayAllow>,
}

/// The host firewall as a node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayStatus {
    /// The mode its configuration asks for.
    pub mode: UnderlayMode,
    /// Whether the table for that mode is in place (`false` for `off`).
    pub installed: bool,
}

/// One resolved `allow` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayAllow {
    /// The entry's name in the policy.
    pub name: String,
    /// Sources (inbound) or destinations (outbound).
    pub nets: Vec<Network>,
    /// Protocols and destination ports.
    pub ports: Vec<PortSpec>,
}
