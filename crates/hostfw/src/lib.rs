//! The host firewall (spec §7), sans IO: what the daemon installs in nftables, built from the
//! controller's [`UnderlayConfig`], written as netlink messages, and read back from NFLOG.
//!
//! Two tables, each replaced whole in one netlink transaction:
//! - [`FIREWALL`] (`inet bulkhead`): the underlay firewall of `observe` and `enforce`. It
//!   outlives the daemon in `enforce` (assume breach); `mode: off`, leaving the scope or
//!   `bulkheadd firewall off` removes it.
//! - [`GUARD`] (`inet bulkhead-overlay`): the overlay address only through the overlay
//!   interface, and no forwarding into or out of it, in every mode. It is created with the
//!   kernel's owner flag, so it lives exactly as long as the daemon's netlink socket, like the
//!   TUN interface and the overlay address it protects.
//!
//! [`resolve`] turns an allowlist's underlay entries into a node's configuration with
//! addresses, [`ruleset`] holds the model (tables, chains, rules as nftables sees them), [`build`] turns a
//! configuration into tables, [`render`] writes them as `nft list table` shows them (golden
//! files and docs), [`encode`] writes them as one netlink batch, and [`nflog`] reads the packets
//! the log rules send, for the flow log.

#![forbid(unsafe_code)]

pub mod build;
pub mod counters;
pub mod encode;
pub mod nflog;
pub mod render;
mod resolve;
pub mod ruleset;

pub use build::{Host, firewall, guard};
pub use resolve::resolve;
pub use ruleset::{Chain, Hook, Match, Rule, Set, Table, Verdict};

/// The underlay firewall's table (family `inet`).
pub const FIREWALL: &str = "bulkhead";
/// The overlay guard's table (family `inet`).
pub const GUARD: &str = "bulkhead-overlay";
/// The NFLOG group the log rules send to, unless the daemon is told another.
pub const DEFAULT_NFLOG_GROUP: u16 = 21537;
/// Log prefixes, which say the direction of a logged packet and whether it was dropped
/// (`enforce`) or only would have been (`observe`): `(inbound, observed, prefix)`.
pub const PREFIXES: [(bool, bool, &str); 4] = [
    (true, false, "bulkhead in deny "),
    (false, false, "bulkhead out deny "),
    (true, true, "bulkhead in would-deny "),
    (false, true, "bulkhead out would-deny "),
];

/// The log prefix for a direction and mode.
pub fn prefix(inbound: bool, observed: bool) -> &'static str {
    PREFIXES
        .iter()
        .find(|(i, o, _)| *i == inbound && *o == observed)
        .map_or("bulkhead ", |(_, _, p)| p)
}
