//! The model: a table of sets and base chains of rules, in the terms nftables uses, with only
//! the matches the host firewall needs. [`crate::encode`] and [`crate::render`] are its two
//! writers, so what the kernel holds and what the golden files show are the same value.

use std::net::{Ipv4Addr, Ipv6Addr};

use bulkhead_allowlist::Network;

/// An `inet` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its name.
    pub name: &'static str,
    /// Created with the owner flag: removed by the kernel when the creating socket closes.
    pub owned: bool,
    /// Named sets of IPv4 addresses.
    pub sets: Vec<Set>,
    /// Base chains, in order.
    pub chains: Vec<Chain>,
}

/// A named set of IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Its name, referred to as `@name`.
    pub name: &'static str,
    /// Its elements, sorted.
    pub elements: Vec<Ipv4Addr>,
}

/// Where a base chain hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets for this host.
    Input,
    /// Packets this host sends.
    Output,
    /// Packets this host routes.
    Forward,
}

impl Hook {
    /// The hook's name in nft syntax.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::Forward => "forward",
        }
    }
}

/// A base chain with policy `accept`: a packet no rule drops goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its name (the hook's).
    pub name: &'static str,
    /// Its hook.
    pub hook: Hook,
    /// Its priority, relative to `filter` (0).
    pub priority: i32,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

/// What a matching rule does after its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stop here and let the packet through this table.
    Accept,
    /// Stop here and drop the packet.
    Drop,
}

/// One condition on a packet. What a match implies (the address family of an address, the
/// protocol of a port) is not written: the encoder adds it, as nft does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Arrived on (`true`) or not on the loopback interface (`iif "lo"`: index 1).
    IifLoopback(bool),
    /// Leaves on the loopback interface.
    OifLoopback,
    /// Arrived on (or, `equal: false`, not on) the interface with this name.
    Iifname {
        /// The name.
        name: String,
        /// `==` or `!=`.
        equal: bool,
    },
    /// Leaves on the interface with this name.
    Oifname {
        /// The name.
        name: String,
    },
    /// The connection-tracking state is one of these bits ([`CT_ESTABLISHED`], …).
    CtState(u32),
    /// IPv6 (`meta nfproto ipv6`).
    Ipv6,
    /// The IP protocol (`meta l4proto`).
    L4proto(u8),
    /// The IPv4 source lies in the network.
    Saddr(Network),
    /// The IPv4 destination lies in the network.
    Daddr(Network),
    /// The IPv6 destination is this address.
    Daddr6(Ipv6Addr),
    /// The IPv4 destination is (`negate: false`) or is not in the named set.
    DaddrIn {
        /// The set.
        set: &'static str,
        /// `!=`.
        negate: bool,
    },
    /// The TCP or UDP destination port lies in `lo..=hi`.
    Dport {
        /// 6 or 17.
        proto: u8,
        /// First port.
        lo: u16,
        /// Last port.
        hi: u16,
    },
    /// The TCP or UDP source port is this one.
    Sport {
        /// 6 or 17.
        proto: u8,
        /// The port.
        port: u16,
    },
    /// An ICMP message of this type.
    IcmpType(u8),
    /// An ICMPv6 message of this type.
    Icmpv6Type(u8),
}

/// Connection-tracking state bits, as `ct state` compares them.
pub const CT_ESTABLISHED: u32 = 1 << 1;
/// See [`CT_ESTABLISHED`].
pub const CT_RELATED: u32 = 1 << 2;
/// See [`CT_ESTABLISHED`].
pub const CT_NEW: u32 = 1 << 3;

/// Sending a packet's head to userspace, at most `rate` a second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// The prefix, which says the direction.
    pub prefix: &'static str,
    /// The NFLOG group.
    pub group: u16,
    /// Packets a second, on average.
    pub rate: u32,
    /// Packets at once.
    pub burst: u32,
}

/// One rule: all matches hold → count, log, verdict (each optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Conditions, all of which must hold.
    pub matches: Vec<Match>,
    /// Log (rate-limited; a rule with a log has no verdict).
    pub log: Option<Log>,
    /// Count the packets (`counter`).
    pub counter: bool,
    /// Accept or drop; none: go on to the next rule.
    pub verdict: Option<Verdict>,
    /// A comment, shown by `nft list`.
    pub comment: Option<String>,
}

impl Rule {
    /// A rule that accepts what matches.
    pub fn accept(matches: Vec<Match>) -> Rule {
        Rule {
            matches,
            log: None,
            counter: false,
            verdict: Some(Verdict::Accept),
            comment: None,
        }
    }

    /// The same rule with a comment.
    pub fn comment(mut self, c: impl Into<String>) -> Rule {
        self.comment = Some(c.into());
        self
    }

    /// The same rule with a counter.
    pub fn counted(mut self) -> Rule {
        self.counter = true;
        self
    }
}
