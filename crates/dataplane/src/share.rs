//! Each peer's share of the flow table, and which flows make room when it is full.
//!
//! Every flow belongs to one peer: the peer end of it, whichever side opened it, so a local
//! process's connections to a peer count against that peer too. A peer may hold at most its
//! share of the table. A new flow that finds the peer's share, or the table, full first evicts
//! a half-open flow (a TCP handshake not completed, a UDP or ICMP flow never answered), oldest
//! first: of the same peer when its share is full, else of the peer holding the most flows.
//! Only when there is none is the new flow refused, and that is counted against the peer.
//!
//! Half-open flows are kept in a queue per peer in the order they opened, so finding the
//! oldest costs no scan of the table. Entries of flows that completed or went are dropped
//! when they reach the front, or all at once when stale ones outnumber the peer's flows.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use crate::conntrack::FlowKey;

/// One peer's flows in the table, and how often the table refused or evicted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowShare {
    /// Flows tracked now.
    pub tracked: usize,
    /// New flows refused because the peer's share, or the table, was full of flows that could
    /// not be evicted (`flow_table_full`).
    pub refused: u64,
    /// Its half-open flows evicted to make room.
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Peer {
    share: FlowShare,
    /// Half-open flows, oldest first, by key and the serial they were opened under.
    half_open: VecDeque<(FlowKey, u64)>,
}

/// The shares of every peer.
#[derive(Debug)]
pub(crate) struct Shares {
    peers: HashMap<Ipv4Addr, Peer, ahash::RandomState>,
    per_peer: usize,
}

impl Shares {
    pub(crate) fn new(per_peer: usize) -> Shares {
        Shares {
            peers: HashMap::default(),
            per_peer: per_peer.max(1),
        }
    }

    /// The share of the peer at `addr`.
    pub(crate) fn of(&self, addr: Ipv4Addr) -> FlowShare {
        self.peers.get(&addr).map(|p| p.share).unwrap_or_default()
    }

    /// Whether the peer at `addr` holds all the flows it may.
    pub(crate) fn full(&self, addr: Ipv4Addr) -> bool {
        self.of(addr).tracked >= self.per_peer
    }

    /// A flow `key` was opened, half-open, under `serial`. The peer's queue is rid of the
    /// flows that are no longer half-open (`is_half_open` says) when they outnumber its flows,
    /// so every queue stays within twice its peer's flows.
    pub(crate) fn opened(
        &mut self,
        key: FlowKey,
        serial: u64,
        is_half_open: impl Fn(&FlowKey, u64) -> bool,
    ) {
        let p = self.peers.entry(key.peer).or_default();
        p.share.tracked += 1;
        p.half_open.push_back((key, serial));
        if p.half_open.len() > 2 * p.share.tracked + 16 {
            p.half_open.retain(|(k, s)| is_half_open(k, *s));
        }
    }

    /// A flow of the peer at `addr` went (expired, cut, closed or evicted).
    pub(crate) fn removed(&mut self, addr: Ipv4Addr) {
        if let Some(p) = self.peers.get_mut(&addr) {
            p.share.tracked = p.share.tracked.saturating_sub(1);
        }
    }

    pub(crate) fn refused(&mut self, addr: Ipv4Addr) {
        self.peers.entry(addr).or_default().share.refused += 1;
    }

    /// The oldest half-open flow of the peer at `addr`, taken off its queue: `is_half_open`
    /// says whether a queued flow still is (it is given the key and serial). The caller evicts
    /// it.
    pub(crate) fn oldest_half_open(
        &mut self,
        addr: Ipv4Addr,
        is_half_open: impl Fn(&FlowKey, u64) -> bool,
    ) -> Option<FlowKey> {
        let p = self.peers.get_mut(&addr)?;
        while let Some((key, serial)) = p.half_open.pop_front() {
            if is_half_open(&key, serial) {
                p.share.evicted += 1;
                return Some(key);
            }
        }
        None
    }

    /// The peer holding the most flows among those with queued half-open flows.
    pub(crate) fn largest(&self) -> Option<Ipv4Addr> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.half_open.is_empty())
            .max_by_key(|(_, p)| p.share.tracked)
            .map(|(a, _)| *a)
    }

    /// Entries in the half-open queue of the peer at `addr`.
    #[cfg(test)]
    pub(crate) fn queued(&self, addr: Ipv4Addr) -> usize {
        self.peers.get(&addr).map_or(0, |p| p.half_open.len())
    }

    /// Forgets peers that have no flows and nothing counted.
    pub(crate) fn forget_idle(&mut self) {
        self.peers
            .retain(|_, p| p.share != FlowShare::default() || !p.half_open.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::conntrack::tests::{A, B, peer_syn, syn, v4};
    use crate::conntrack::{Conntrack, Initiator, Timeouts};
    use crate::packet::{build, tcp};

    const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    /// The attack: one peer opening as many flows as the table holds refused every new flow
    /// on the node, from every peer and from local processes.
    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let mut ct = Conntrack::new(8, 4, Timeouts::default());
        let t0 = Instant::now();
        // B floods: it keeps its four newest flows, evicting its own oldest half-open ones.
        for port in 0..100 {
            assert!(peer_syn(&mut ct, B, 1000 + port, t0));
        }
        assert_eq!(ct.share(B).tracked, 4);
        assert_eq!(ct.share(B).evicted, 96);
        assert!(ct.iter().all(|(k, _)| k.peer_port >= 1096));
        // C, and this node's own connections to C, still get in.
        assert!(peer_syn(&mut ct, C, 1000, t0));
        let out = v4(build::tcp(A, C, 40000, 22, tcp::SYN));
        assert!(ct.open(FlowKey::egress(&out), Initiator::Local, "r", t0));
        assert_eq!(ct.share(C).tracked, 2);
        assert_eq!(ct.share(C).refused + ct.share(B).refused, 0);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_half_open_flow_of_the_largest_peer() {
        let mut ct = Conntrack::new(4, 3, Timeouts::default());
        let t0 = Instant::now();
        for port in 0..3 {
            assert!(peer_syn(&mut ct, B, 1000 + port, t0));
        }
        assert!(peer_syn(&mut ct, C, 1000, t0));
        // Full: C's next flow evicts B's oldest, not C's own.
        assert!(peer_syn(&mut ct, C, 1001, t0));
        assert_eq!((ct.share(B).tracked, ct.share(B).evicted), (2, 1));
        assert!(!ct.iter().any(|(k, _)| k.peer == B && k.peer_port == 1000));
        assert_eq!(ct.share(C).tracked, 2);
    }

    #[test]
    fn established_flows_are_never_evicted_and_a_refusal_is_counted_against_the_peer() {
        let mut ct = Conntrack::new(2, 2, Timeouts::default());
        let t0 = Instant::now();
        for port in [1000, 1001] {
            assert!(peer_syn(&mut ct, B, port, t0));
            let (k, _) = syn(B, port);
            let synack = v4(build::tcp(A, B, 5432, port, tcp::SYN | tcp::ACK));
            let ack = v4(build::tcp(B, A, port, 5432, tcp::ACK));
            ct.track(k, &synack, Initiator::Local, t0);
            ct.track(k, &ack, Initiator::Peer, t0);
        }
        assert!(!peer_syn(&mut ct, C, 1000, t0));
        assert_eq!(ct.share(C).refused, 1);
        assert_eq!(ct.share(B).tracked, 2);
        assert_eq!(ct.share(B).evicted, 0);
    }

    #[test]
    fn the_eviction_queues_stay_bounded_when_flows_complete() {
        let mut ct = Conntrack::new(100, 100, Timeouts::default());
        let t0 = Instant::now();
        for port in 0..10_000u16 {
            let p = v4(build::udp(A, B, port, 53, b""));
            let k = FlowKey::egress(&p);
            assert!(ct.open(k, Initiator::Local, "r", t0));
            let reply = v4(build::udp(B, A, 53, port, b""));
            ct.track(k, &reply, Initiator::Peer, t0);
            ct.retain(|k, _| (k.local_port == port).then(|| "r".to_string()));
        }
        // A few, not one per flow ever opened.
        let queued: usize = ct.queued(B);
        assert!(queued <= 2 * (ct.len() + 1) + 16, "{queued}");
    }
}
