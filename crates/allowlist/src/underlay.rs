//! The underlay part of an identity's allowlist (spec §7): how the host firewall on its server
//! treats traffic that does not use the overlay.
//!
//! This is the policy's answer at the level of identities and networks. Which underlay address
//! each identity's server has is not policy: the controller learns it at run time and resolves
//! [`UnderlayHost::Identity`] into addresses when it builds a node's message.

use serde::{Deserialize, Serialize};

use crate::{Network, PortSpec};

/// What the host firewall does on a server.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum UnderlayMode {
    /// No host firewall: the daemon removes its table.
    #[default]
    Off,
    /// Nothing is dropped; what `enforce` would drop is logged as `would-deny`.
    Observe,
    /// Underlay traffic not allowed is dropped and logged.
    Enforce,
}

impl UnderlayMode {
    /// The word the policy and the CLI use.
    pub fn as_str(self) -> &'static str {
        match self {
            UnderlayMode::Off => "off",
            UnderlayMode::Observe => "observe",
            UnderlayMode::Enforce => "enforce",
        }
    }
}

impl std::fmt::Display for UnderlayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for UnderlayMode {
    type Err = String;

    fn from_str(s: &str) -> Result<UnderlayMode, String> {
        match s {
            "off" => Ok(UnderlayMode::Off),
            "observe" => Ok(UnderlayMode::Observe),
            "enforce" => Ok(UnderlayMode::Enforce),
            other => Err(format!(
                "unknown underlay mode {other:?}: expected off, observe or enforce"
            )),
        }
    }
}

/// One end of an underlay allow entry: a network, or an enrolled server named by its identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderlayHost {
    /// Every address in this IPv4 network (`0.0.0.0/0` for `"*"`).
    Net(Network),
    /// The underlay addresses of this identity's server, as the controller knows them.
    Identity(String),
}

/// An `allow` entry of the `underlay` block, as it concerns one identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnderlayRule {
    /// The entry's name in the policy.
    pub name: String,
    /// Inbound: who may connect. Outbound: where this identity may connect.
    pub hosts: Vec<UnderlayHost>,
    /// The protocols and destination ports.
    pub ports: Vec<PortSpec>,
}

/// The host firewall of one identity's server. Present only for an identity in the block's
/// scope with a mode other than `off`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Underlay {
    /// `observe` or `enforce`.
    pub mode: UnderlayMode,
    /// Connections others may open to this server over the underlay, besides WireGuard and the
    /// controller API: the `allow` entries whose `to` names this identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<UnderlayRule>,
    /// Connections this server may open to other enrolled servers over the underlay: the
    /// `allow` entries whose `from` names this identity (or its segment), with their `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<UnderlayRule>,
}
