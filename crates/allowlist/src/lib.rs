//! The compiled allowlist of one identity: what the controller pushes to a node and what the data
//! plane enforces.
//!
//! The policy language never reaches a node. A node receives only this value: its own address,
//! the peers it may have a tunnel with, and for each peer the inbound and outbound port tables
//! with the rules behind them. Everything here is plain data with `serde` derives; the wire
//! encoding is `crates/proto`'s business.
//!
//! Lookups are `O(log n)`: peers are found by address through [`Allowlist::peer_index`], and a
//! [`PortTable`] keeps disjoint, sorted port spans per protocol, so a packet costs one hash lookup
//! and one binary search. Two allowlists diff cheaply: peers are sorted by name and compare with
//! `==` ([`Allowlist::diff`]).
//!
//! Time is an argument (`now`, Unix seconds), never read from the clock.

#![forbid(unsafe_code)]

mod access;
mod ports;
mod underlay;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use access::AccessSet;
pub use ports::{PortSpan, PortSpec, PortTable};
pub use underlay::{Underlay, UnderlayHost, UnderlayMode, UnderlayRule};

/// IP protocol numbers the filter knows by name.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Unix time in seconds.
pub type UnixTime = i64;

/// What a rule does to the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Permit connections initiated by the `from` side.
    Allow,
    /// Forbid them, whatever any allow rule says.
    Deny,
}

/// The half-open time window `[not_before, expires)` in which a rule is in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    /// The first second the rule is in force; `None` means always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<UnixTime>,
    /// The first second the rule is no longer in force; `None` means never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<UnixTime>,
}

impl Window {
    /// A window that is always open.
    pub const ALWAYS: Window = Window {
        not_before: None,
        expires: None,
    };

    /// Whether the window holds at `now`: `not_before <= now < expires`.
    pub fn contains(&self, now: UnixTime) -> bool {
        self.not_before.is_none_or(|t| t <= now) && self.expires.is_none_or(|t| now < t)
    }

    /// Whether the window is over at `now` and will never hold again.
    pub fn is_over(&self, now: UnixTime) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }

    /// The next boundary strictly after `now`, when the window opens or closes.
    pub fn next_boundary(&self, now: UnixTime) -> Option<UnixTime> {
        [self.not_before, self.expires]
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .min()
    }
}

/// A rule as a node sees it: enough to enforce its window and to name it in flow logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    /// The rule's name in the policy.
    pub name: String,
    /// Allow or deny.
    pub action: Action,
    /// When the rule is in force. Nodes enforce it themselves, so access ends on time even when
    /// no controller is reachable.
    #[serde(default)]
    pub window: Window,
    /// Posture checks the initiating identity must pass. The controller evaluates them and leaves
    /// out rules whose checks fail; nodes carry the names for display only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posture: Vec<String>,
}

/// The outcome of a port-table lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule at this index of [`Allowlist::rules`].
    Allow {
        /// Index into the allowlist's rule table.
        rule: u32,
    },
    /// Denied by a deny rule, or by default when `rule` is `None`.
    Deny {
        /// Index into the allowlist's rule table, or `None` for the default deny.
        rule: Option<u32>,
    },
}

impl Decision {
    /// Whether the packet may pass.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// The overlay network: an IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Network {
    /// The network address.
    pub address: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl Network {
    /// The netmask as a `u32`.
    pub fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// Whether `addr` lies inside this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.address) & self.mask()
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// What an identity's address is (spec §8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Addressing {
    /// An overlay address on the TUN interface; the overlay network is routed into it.
    #[default]
    Overlay,
    /// The server's own (underlay) address: traffic to each peer's own address is routed into
    /// the tunnel, so applications keep their addresses.
    Underlay,
}

impl Addressing {
    /// Whether this is the default, left out of the wire format.
    pub fn is_overlay(&self) -> bool {
        *self == Addressing::Overlay
    }
}

/// One peer of an identity, with the traffic allowed each way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's identity name; shared, since the controller holds the same name in thousands
    /// of allowlists.
    pub name: Arc<str>,
    /// The peer's overlay address; the only source address accepted from its tunnel.
    pub address: Ipv4Addr,
    /// Connections this identity may open to the peer: an index into [`Allowlist::tables`].
    pub outbound: u32,
    /// Connections the peer may open to this identity: an index into [`Allowlist::tables`].
    pub inbound: u32,
}

/// The compiled allowlist of one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    /// Increases with every change the controller makes; nodes report the one they applied.
    pub revision: u64,
    /// A digest of everything but the revision, set by the controller (empty when not): nodes
    /// report it back, so the controller knows which allowlist a node enforces even when a
    /// condition (posture, quarantine, a window) changes it under the same policy revision.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// The identity this allowlist belongs to.
    pub identity: String,
    /// The identity's overlay address.
    pub address: Ipv4Addr,
    /// The overlay network (with underlay addressing: the range of the servers' own
    /// addresses).
    pub network: Network,
    /// Whether addresses are overlay addresses or the servers' own.
    #[serde(default, skip_serializing_if = "Addressing::is_overlay")]
    pub addressing: Addressing,
    /// The rules the port tables refer to, by index, in policy order. Only rules that concern
    /// this identity.
    pub rules: Vec<RuleRef>,
    /// The distinct port tables, which peers refer to by index: peers governed by the same rules
    /// share one.
    pub tables: Vec<PortTable>,
    /// The peers, sorted by name: exactly the identities with some traffic allowed either way.
    pub peers: Vec<Peer>,
    /// The host firewall for the identity's server, if the policy's `underlay` block puts it
    /// in scope with a mode other than `off`. The data plane ignores it; the daemon's host
    /// firewall installs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<Underlay>,
}

/// Which peers changed between two allowlists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowlistDiff {
    /// Peers only in the new allowlist.
    pub added: Vec<String>,
    /// Peers only in the old allowlist.
    pub removed: Vec<String>,
    /// Peers in both whose address or tables differ.
    pub changed: Vec<String>,
    /// Whether anything else differs: identity, address, network, rule table or underlay.
    pub header_changed: bool,
}

impl AllowlistDiff {
    /// Whether the two allowlists are the same apart from the revision.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.header_changed
    }
}

impl Allowlist {
    /// An allowlist that allows nothing: what a node enforces before it knows better.
    pub fn deny_all(identity: &str, address: Ipv4Addr, network: Network) -> Allowlist {
        Allowlist {
            revision: 0,
            digest: String::new(),
            identity: identity.to_string(),
            address,
            network,
            addressing: Addressing::Overlay,
            rules: Vec::new(),
            tables: Vec::new(),
            peers: Vec::new(),
            underlay: None,
        }
    }

    /// Maps each peer's address to its index in [`Allowlist::peers`].
    pub fn peer_index(&self) -> HashMap<Ipv4Addr, usize> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.address, i))
            .collect()
    }

    /// The peer with this name.
    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers
            .binary_search_by(|p| (*p.name).cmp(name))
            .ok()
            .map(|i| &self.peers[i])
    }

    /// The table at `index`; an index out of range is the empty table, which allows nothing.
    pub fn table(&self, index: u32) -> &PortTable {
        static EMPTY: PortTable = PortTable {
            tcp: Vec::new(),
            udp: Vec::new(),
            icmp: Vec::new(),
            other: Vec::new(),
        };
        self.tables.get(index as usize).unwrap_or(&EMPTY)
    }

    /// May this identity open a connection to `peer` on `proto`/`port` at `now`?
    pub fn decide_outbound(&self, peer: &Peer, proto: u8, port: u16, now: UnixTime) -> Decision {
        self.table(peer.outbound)
            .decide(&self.rules, proto, port, now)
    }

    /// May `peer` open a connection to this identity on `proto`/`port` at `now`?
    pub fn decide_inbound(&self, peer: &Peer, proto: u8, port: u16, now: UnixTime) -> Decision {
        self.table(peer.inbound)
            .decide(&self.rules, proto, port, now)
    }

    /// The next time after `now` that one of its rules starts or stops being in force: when the
    /// node must look at its peers and flows again even if no controller speaks.
    pub fn next_boundary(&self, now: UnixTime) -> Option<UnixTime> {
        self.rules
            .iter()
            .filter_map(|r| r.window.next_boundary(now))
            .min()
    }

    /// Compares two allowlists peer by peer, ignoring the revision. Linear in the number of peers.
    pub fn diff(&self, new: &Allowlist) -> AllowlistDiff {
        // Every field, named: a field added to `Allowlist` is a compile error here until it is
        // compared. The controller keeps the old allowlist when the diff is empty, so a field
        // left out would be silently reverted.
        let Allowlist {
            revision: _,
            digest: _,
            identity,
            address,
            network,
            addressing,
            rules,
            tables: _, // compared through the peers that refer to them
            peers,
            underlay,
        } = self;
        let Allowlist {
            revision: _,
            digest: _,
            identity: new_identity,
            address: new_address,
            network: new_network,
            addressing: new_addressing,
            rules: new_rules,
            tables: _,
            peers: new_peers,
            underlay: new_underlay,
        } = new;
        let mut d = AllowlistDiff {
            header_changed: identity != new_identity
                || address != new_address
                || network != new_network
                || addressing != new_addressing
                || rules != new_rules
                || underlay != new_underlay,
            ..AllowlistDiff::default()
        };
        let (mut a, mut b) = (peers.iter().peekable(), new_peers.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), None) => {
                    d.removed.push(x.name.to_string());
                    a.next();
                }
                (None, Some(y)) => {
                    d.added.push(y.name.to_string());
                    b.next();
                }
                (Some(x), Some(y)) => match x.name.cmp(&y.name) {
                    std::cmp::Ordering::Less => {
                        d.removed.push(x.name.to_string());
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        d.added.push(y.name.to_string());
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        let Peer {
                            name: _,
                            address,
                            outbound,
                            inbound,
                        } = x;
                        let same = *address == y.address
                            && self.table(*outbound) == new.table(y.outbound)
                            && self.table(*inbound) == new.table(y.inbound);
                        if !same {
                            d.changed.push(x.name.to_string());
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, action: Action, window: Window) -> RuleRef {
        RuleRef {
            name: name.into(),
            action,
            window,
            posture: vec![],
        }
    }

    /// Peers with their outbound tables; inbound tables are empty.
    fn list(peers: Vec<(&str, u8, PortTable)>, rules: Vec<RuleRef>) -> Allowlist {
        let mut tables = vec![PortTable::default()];
        let peers = peers
            .into_iter()
            .map(|(name, last, outbound)| {
                tables.push(outbound);
                Peer {
                    name: name.into(),
                    address: Ipv4Addr::new(10, 0, 0, last),
                    outbound: tables.len() as u32 - 1,
                    inbound: 0,
                }
            })
            .collect();
        Allowlist {
            revision: 1,
            digest: String::new(),
            identity: "me".into(),
            address: Ipv4Addr::new(10, 0, 0, 1),
            network: Network {
                address: Ipv4Addr::new(10, 0, 0, 0),
                prefix_len: 24,
            },
            addressing: Addressing::Overlay,
            rules,
            tables,
            peers,
            underlay: None,
        }
    }

    #[test]
    fn a_change_to_any_field_but_revision_and_digest_is_a_change() {
        let t22 = PortTable::build([(0, PortSpec::Tcp { lo: 22, hi: 22 })]);
        let t23 = PortTable::build([(0, PortSpec::Tcp { lo: 23, hi: 23 })]);
        let old = list(
            vec![("a", 2, t22)],
            vec![rule("r", Action::Allow, Window::ALWAYS)],
        );
        type Change = fn(&mut Allowlist, &PortTable);
        let changes: Vec<(&str, Change)> = vec![
            ("identity", |l, _| l.identity = "other".into()),
            ("address", |l, _| l.address = Ipv4Addr::new(10, 0, 0, 9)),
            ("network", |l, _| l.network.prefix_len = 16),
            ("addressing", |l, _| l.addressing = Addressing::Underlay),
            ("rules", |l, _| l.rules[0].name = "s".into()),
            ("rule window", |l, _| l.rules[0].window.expires = Some(5)),
            ("tables", |l, t| l.tables[1] = t.clone()),
            ("peer address", |l, _| {
                l.peers[0].address = Ipv4Addr::new(10, 0, 0, 8)
            }),
            ("peer table", |l, _| l.peers[0].outbound = 0),
            ("peer inbound", |l, _| l.peers[0].inbound = 1),
            ("peers", |l, _| l.peers.clear()),
            ("underlay", |l, _| {
                l.underlay = Some(Underlay {
                    mode: UnderlayMode::Observe,
                    inbound: vec![],
                    outbound: vec![],
                })
            }),
        ];
        for (what, change) in changes {
            let mut new = old.clone();
            change(&mut new, &t23);
            assert_ne!(new, old, "{what}: the change changes something");
            assert!(
                !old.diff(&new).is_empty(),
                "{what} changed: not in the diff"
            );
        }
        let mut same = old.clone();
        same.revision += 1;
        same.digest = "x".into();
        assert!(old.diff(&same).is_empty());
    }

    #[test]
    fn window_is_half_open() {
        let w = Window {
            not_before: Some(10),
            expires: Some(20),
        };
        assert!(!w.contains(9));
        assert!(w.contains(10));
        assert!(w.contains(19));
        assert!(!w.contains(20));
        assert!(!w.is_over(19));
        assert!(w.is_over(20));
        assert_eq!(w.next_boundary(5), Some(10));
        assert_eq!(w.next_boundary(10), Some(20));
        assert_eq!(w.next_boundary(20), None);
        assert!(Window::ALWAYS.contains(i64::MIN));
    }

    #[test]
    fn network_contains() {
        let n = Network {
            address: Ipv4Addr::new(10, 100, 0, 0),
            prefix_len: 16,
        };
        assert!(n.contains(Ipv4Addr::new(10, 100, 255, 1)));
        assert!(!n.contains(Ipv4Addr::new(10, 101, 0, 1)));
        let all = Network {
            address: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn lookups_go_through_the_peer_and_its_table() {
        let rules = vec![rule("r", Action::Allow, Window::ALWAYS)];
        let t = PortTable::build([(0, PortSpec::Tcp { lo: 22, hi: 22 })]);
        let l = list(vec![("a", 2, t)], rules);
        let idx = l.peer_index();
        let p = &l.peers[idx[&Ipv4Addr::new(10, 0, 0, 2)]];
        assert_eq!(
            l.decide_outbound(p, proto::TCP, 22, 0),
            Decision::Allow { rule: 0 }
        );
        assert_eq!(
            l.decide_outbound(p, proto::TCP, 23, 0),
            Decision::Deny { rule: None }
        );
        assert_eq!(
            l.decide_inbound(p, proto::TCP, 22, 0),
            Decision::Deny { rule: None }
        );
        assert!(l.peer("a").is_some());
        assert!(l.peer("b").is_none());
    }

    #[test]
    fn diff_reports_added_removed_and_changed_peers() {
        let rules = vec![rule("r", Action::Allow, Window::ALWAYS)];
        let t22 = PortTable::build([(0, PortSpec::Tcp { lo: 22, hi: 22 })]);
        let t23 = PortTable::build([(0, PortSpec::Tcp { lo: 23, hi: 23 })]);
        let old = list(
            vec![
                ("a", 2, t22.clone()),
                ("b", 3, t22.clone()),
                ("c", 4, t22.clone()),
            ],
            rules.clone(),
        );
        let new = list(
            vec![("b", 3, t23), ("c", 4, t22.clone()), ("d", 5, t22)],
            rules,
        );
        let d = old.diff(&new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.removed, vec!["a"]);
        assert_eq!(d.changed, vec!["b"]);
        assert!(!d.header_changed);
        assert!(old.diff(&old).is_empty());
        let mut bumped = old.clone();
        bumped.revision += 1;
        assert!(
            old.diff(&bumped).is_empty(),
            "the revision alone is no change"
        );
    }

    #[test]
    fn serde_round_trip() {
        let rules = vec![rule(
            "r",
            Action::Deny,
            Window {
                not_before: None,
                expires: Some(5),
            },
        )];
        let t = PortTable::build([(0, PortSpec::Any)]);
        let l = list(vec![("a", 2, t)], rules);
        let json = serde_json::to_string(&l).unwrap();
        let back: Allowlist = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
    }
}
