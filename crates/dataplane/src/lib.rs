//! The Bulkhead data plane core: WireGuard tunnels and a stateful L3/L4 filter, with no I/O.
//!
//! [`Node`] takes packets read from the TUN device ([`Node::handle_tun`]) and datagrams read
//! from the UDP socket ([`Node::handle_udp`]), plus the time, and hands what must be written to
//! a [`Sink`]: datagrams for the network, packets for the TUN device, and events. The I/O shell
//! (`node-daemon`) owns the device, the socket and the clock. Like boringtun's `noise::Tunn`,
//! quinn-proto and Firezone's tunnel core, this makes every decision testable in one process.
//!
//! Enforcement, in both directions:
//! - **Egress** (from TUN): the destination must be a peer in the allowlist, and the packet must
//!   belong to a tracked flow or be allowed by the outbound rules for that peer; then it is
//!   encrypted to that peer.
//! - **Ingress** (from UDP, after decryption): the inner source must be the address of the peer
//!   whose key decrypted it, the destination must be this node, and the packet must belong to a
//!   tracked flow or be allowed by this node's own inbound rules. The sender is never trusted to
//!   have filtered anything.
//!
//! Before the first allowlist, nothing passes.

#![forbid(unsafe_code)]

pub mod conntrack;
mod filter;
mod node;
pub mod packet;
mod peers;
mod ratelimit;
mod shards;
mod share;
mod sink;
mod tunnel;

pub use conntrack::{FlowKey, Initiator};
pub use node::{ApplyReport, Config, Node, Now, PeerConfig};
pub use peers::{PeerId, PeerStatus, Traffic};
pub use shards::{Front, MAX_SHARDS, Shard, Sharded, Ticket};
pub use share::FlowShare;
pub use sink::{Counters, Direction, DropReason, Event, Sink};

/// Whether this build skips the filter (the `unfiltered` benchmark feature).
pub const UNFILTERED: bool = cfg!(feature = "unfiltered");
