//! What a [`Node`](crate::Node) hands its shell: output through a [`Sink`], events, the reasons
//! packets are dropped and the counts of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::conntrack::{FlowKey, Initiator};
use crate::packet::Malformed;

/// Why a packet was dropped. Small and without heap data: a flood of denied packets must not
/// cost an allocation each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IP packet.
    Malformed(Malformed),
    /// IPv6: no rule covers it.
    Ipv6,
    /// No allowlist applied yet: nothing passes.
    NoAllowlist,
    /// The destination (egress) is not a peer of this node.
    NotAPeer,
    /// Egress with a source other than this node's address.
    WrongSource,
    /// Ingress whose inner source is not the address of the peer that sent it.
    Spoofed,
    /// Ingress for an address other than this node's.
    WrongDestination,
    /// A deny rule forbids it: the rule's index in the allowlist's `rules`. [`Event::Dropped`]
    /// names it.
    DeniedByRule(u32),
    /// No rule allows it.
    NotAllowed,
    /// A packet that needs a tracked flow (a reply) and has none.
    NoFlow,
    /// The flow table is full.
    TableFull,
    /// The peer's endpoint is unknown, so nothing can be sent to it.
    NoEndpoint,
    /// A datagram that is not WireGuard, or fails authentication.
    Tunnel,
    /// A WireGuard datagram from a key that is not a peer.
    UnknownPeer,
    /// A handshake under load from a source address that has had its share this second, or
    /// past the most handshake messages the node reads in a second.
    HandshakeRateLimited,
}

impl DropReason {
    /// A short, stable name for counters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DropReason::Malformed(m) => m.as_str(),
            DropReason::Ipv6 => "ipv6",
            DropReason::NoAllowlist => "no_allowlist",
            DropReason::NotAPeer => "not_a_peer",
            DropReason::WrongSource => "wrong_source",
            DropReason::Spoofed => "spoofed_source",
            DropReason::WrongDestination => "wrong_destination",
            DropReason::DeniedByRule(_) => "denied_by_rule",
            DropReason::NotAllowed => "not_allowed",
            DropReason::NoFlow => "no_flow",
            DropReason::TableFull => "flow_table_full",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::Tunnel => "tunnel",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeRateLimited => "handshake_rate_limited",
        }
    }
}

/// Something the node did that the shell may log, count or report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// A new flow was admitted.
    FlowStarted {
        /// Who opened it.
        initiator: Initiator,
        /// The flow.
        key: FlowKey,
        /// The peer's name.
        peer: &'a str,
        /// The rule that admitted it.
        rule: &'a str,
    },
    /// A packet was dropped.
    Dropped {
        /// Egress (from TUN) or ingress (from a tunnel).
        egress: bool,
        /// Why.
        reason: &'a DropReason,
        /// The packet's flow key, if it got that far.
        key: Option<FlowKey>,
        /// The peer involved, if known.
        peer: Option<&'a str>,
        /// For [`DropReason::DeniedByRule`], the deny rule's name.
        rule: Option<&'a str>,
    },
}

/// Where the node's output goes.
pub trait Sink {
    /// Send `datagram` to `to` over UDP.
    fn to_network(&mut self, to: SocketAddr, datagram: &[u8]);
    /// Write `packet` to the TUN device.
    fn to_tun(&mut self, packet: &[u8]);
    /// Take note of an event. Ignored by default.
    fn event(&mut self, _event: Event<'_>) {}
}

/// Which way a packet was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From this node (read from TUN), before encryption.
    Egress,
    /// To this node (from a tunnel), after decryption.
    Ingress,
}

impl Direction {
    /// `egress` or `ingress`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// Counters of dropped packets, by reason and by deciding deny rule: a copy, taken by
/// [`Node::counters`](crate::Node::counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Drops by direction and [`DropReason::reason`].
    pub dropped: BTreeMap<(Direction, &'static str), u64>,
    /// Drops by the deny rule that decided them, by name: a rule keeps its count across
    /// allowlists that keep its name.
    pub denied_by_rule: BTreeMap<String, u64>,
    /// Flows admitted.
    pub flows_started: u64,
}

impl Counters {
    /// Adds `other`'s counts to these: the counters of a node's shards, summed.
    pub fn add(&mut self, other: Counters) {
        for (k, n) in other.dropped {
            *self.dropped.entry(k).or_default() += n;
        }
        for (k, n) in other.denied_by_rule {
            *self.denied_by_rule.entry(k).or_default() += n;
        }
        self.flows_started += other.flows_started;
    }
}
