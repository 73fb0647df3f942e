//! Connection tracking: the flows a node has let through, so that replies ride on them and only
//! the first packet of a connection meets the rules.
//!
//! Flows are keyed from the node's own point of view (protocol, peer address, local port, peer
//! port), so a packet and its reply find the same flow. A TCP flow is established only once its
//! handshake completes (SYN, SYN-ACK, ACK); until then it is half-open and lives seconds. The
//! table is bounded, and each peer may hold only its share of it (`share.rs`): a new flow that
//! finds no room evicts the oldest half-open flow, never an established one, and is refused if
//! there is none.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bulkhead_allowlist::proto;

use crate::packet::{Ipv4, tcp};
use crate::share::{FlowShare, Shares};

/// Who opened a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// This node: the flow was admitted by its outbound rules.
    Local,
    /// The peer: the flow was admitted by this node's inbound rules.
    Peer,
}

/// A flow's identity, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IP protocol.
    pub proto: u8,
    /// The peer's overlay address.
    pub peer: Ipv4Addr,
    /// This node's port (ICMP: the echo identifier).
    pub local_port: u16,
    /// The peer's port (ICMP: the echo identifier).
    pub peer_port: u16,
}

impl FlowKey {
    /// The key of a packet leaving this node.
    pub fn egress(p: &Ipv4) -> FlowKey {
        FlowKey {
            proto: p.proto,
            peer: p.dst,
            local_port: p.src_port,
            peer_port: p.dst_port,
        }
    }

    /// The key of a packet arriving at this node.
    pub fn ingress(p: &Ipv4) -> FlowKey {
        FlowKey {
            proto: p.proto,
            peer: p.src,
            local_port: p.dst_port,
            peer_port: p.src_port,
        }
    }

    /// The port the initiator connected to, which the rules are about.
    pub fn service_port(&self, initiator: Initiator) -> u16 {
        match initiator {
            Initiator::Local => self.peer_port,
            Initiator::Peer => self.local_port,
        }
    }
}

/// Where a flow is in its life, which decides its timeout and whether it may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Opened; no packet seen from the answering side yet.
    Opening,
    /// TCP: the SYN was answered with a SYN-ACK; the initiator's ACK has not come.
    SynAcked,
    /// TCP: the handshake completed. Others: both sides have spoken.
    Established,
    /// A FIN or RST was seen.
    Closing,
}

/// One tracked flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Who opened it.
    pub initiator: Initiator,
    /// The rule that admitted it.
    pub rule: String,
    stage: Stage,
    last_seen: Instant,
    /// Which opening of this key it is, to tell it from a later flow under the same key.
    serial: u64,
}

impl Flow {
    /// Opened, but not answered (TCP: the handshake is not complete).
    pub fn half_open(&self) -> bool {
        matches!(self.stage, Stage::Opening | Stage::SynAcked)
    }
}

/// How long an idle flow is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A UDP or ICMP flow opened but never answered.
    pub opening: Duration,
    /// A TCP flow whose handshake has not completed.
    pub tcp_half_open: Duration,
    /// A TCP connection both sides have spoken on.
    pub tcp_established: Duration,
    /// A TCP connection after FIN or RST.
    pub tcp_closing: Duration,
    /// A UDP flow that was answered, or any other protocol.
    pub udp: Duration,
    /// An ICMP echo exchange.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            opening: Duration::from_secs(30),
            // SYNs are sent again after 1, 3, 7… s; one that comes after the flow went opens
            // it again, so a short timeout costs a legitimate connection nothing.
            tcp_half_open: Duration::from_secs(5),
            tcp_established: Duration::from_secs(2 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
        }
    }
}

/// The flow table.
#[derive(Debug)]
pub struct Conntrack {
    flows: HashMap<FlowKey, Flow, ahash::RandomState>,
    capacity: usize,
    timeouts: Timeouts,
    shares: Shares,
    serial: u64,
    /// When a full table last swept out expired flows: at most once a second, since a sweep
    /// walks the whole table.
    swept: Option<Instant>,
}

/// What tracking made of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// It belongs to a tracked flow, opened by this side.
    Known(Initiator),
    /// No flow yet; the packet may open one.
    New,
    /// No flow, and this packet cannot open one (a TCP segment without SYN, an echo reply).
    CannotOpen,
}

fn timeout(t: &Timeouts, key: &FlowKey, f: &Flow) -> Duration {
    match (key.proto, f.stage) {
        (proto::TCP, Stage::Opening | Stage::SynAcked) => t.tcp_half_open,
        (_, Stage::Opening | Stage::SynAcked) => t.opening,
        (proto::TCP, Stage::Closing) => t.tcp_closing,
        (proto::TCP, _) => t.tcp_established,
        (proto::ICMP, _) => t.icmp,
        _ => t.udp,
    }
}

/// Least time between two sweeps of a full table.
const SWEEP: Duration = Duration::from_secs(1);

/// Whether the flow under `key` is still the half-open one opened under `serial`.
fn is_half_open(
    flows: &HashMap<FlowKey, Flow, ahash::RandomState>,
    key: &FlowKey,
    serial: u64,
) -> bool {
    flows
        .get(key)
        .is_some_and(|f| f.serial == serial && f.half_open())
}

/// Whether a packet can be the first of a flow.
pub fn can_open(p: &Ipv4) -> bool {
    match p.proto {
        proto::TCP => p.tcp_flags & (tcp::SYN | tcp::ACK | tcp::RST) == tcp::SYN,
        proto::ICMP => p.icmp_type != crate::packet::icmp::ECHO_REPLY,
        _ => true,
    }
}

impl Conntrack {
    /// A table holding at most `capacity` flows, at most `per_peer` of them with any one peer.
    pub fn new(capacity: usize, per_peer: usize, timeouts: Timeouts) -> Conntrack {
        Conntrack {
            flows: HashMap::default(),
            capacity,
            timeouts,
            shares: Shares::new(per_peer),
            serial: 0,
            swept: None,
        }
    }

    /// The flows of the peer at `addr`, and what the table refused and evicted of them.
    pub fn share(&self, addr: Ipv4Addr) -> FlowShare {
        self.shares.of(addr)
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no flows.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Looks a packet up, and if it belongs to a live flow, records it. `from` is the side that
    /// sent the packet.
    pub fn track(&mut self, key: FlowKey, p: &Ipv4, from: Initiator, now: Instant) -> Tracked {
        let fresh = || {
            if can_open(p) {
                Tracked::New
            } else {
                Tracked::CannotOpen
            }
        };
        // One lookup on the common path: a live flow.
        let Some(f) = self.flows.get_mut(&key) else {
            return fresh();
        };
        if now.saturating_duration_since(f.last_seen) > timeout(&self.timeouts, &key, f) {
            self.flows.remove(&key);
            self.shares.removed(key.peer);
            return fresh();
        }
        let answer = from != f.initiator;
        // An echo flow carries the initiator's requests and the other side's replies. A request
        // from the other side with the same identifier is a connection the other way, which
        // the rules have not allowed; it must not ride on this one.
        if key.proto == proto::ICMP && answer && p.icmp_type == crate::packet::icmp::ECHO_REQUEST {
            return Tracked::CannotOpen;
        }
        f.last_seen = now;
        if key.proto == proto::TCP {
            let flags = p.tcp_flags & (tcp::SYN | tcp::ACK | tcp::FIN | tcp::RST);
            f.stage = match (f.stage, answer, flags) {
                (_, _, f) if f & (tcp::FIN | tcp::RST) != 0 => Stage::Closing,
                (Stage::Opening, true, f) if f == tcp::SYN | tcp::ACK => Stage::SynAcked,
                // The initiator's ACK of the SYN-ACK completes the handshake.
                (Stage::SynAcked, false, tcp::ACK) => Stage::Established,
                (stage, _, _) => stage,
            };
        } else if answer && f.stage == Stage::Opening {
            f.stage = Stage::Established;
        }
        Tracked::Known(f.initiator)
    }

    /// Records a new flow, half-open. When the peer's share or the table is full, the oldest
    /// half-open flow makes room: the peer's own if its share is full, else the largest
    /// peer's; a full table also sweeps out expired flows (at most once a second). Fails,
    /// counting `flow_table_full` against the peer, when there is still no room; the table
    /// is then as it was.
    pub fn open(&mut self, key: FlowKey, initiator: Initiator, rule: &str, now: Instant) -> bool {
        if self.flows.contains_key(&key) {
            self.remove(&key);
        }
        if !self.make_room(key.peer, now) {
            self.shares.refused(key.peer);
            return false;
        }
        self.serial += 1;
        self.flows.insert(
            key,
            Flow {
                initiator,
                rule: rule.to_string(),
                stage: Stage::Opening,
                last_seen: now,
                serial: self.serial,
            },
        );
        let flows = &self.flows;
        self.shares
            .opened(key, self.serial, |k, s| is_half_open(flows, k, s));
        true
    }

    /// Makes room for one more flow of the peer at `peer`, if it can: in its share, then in
    /// the table.
    fn make_room(&mut self, peer: Ipv4Addr, now: Instant) -> bool {
        if self.shares.full(peer) && !self.evict_from(peer) {
            self.sweep(now);
            if self.shares.full(peer) {
                return false;
            }
        }
        if self.flows.len() >= self.capacity {
            let evicted = self.shares.largest().is_some_and(|v| self.evict_from(v));
            if !evicted {
                self.sweep(now);
            }
        }
        self.flows.len() < self.capacity
    }

    /// Sweeps out expired flows, unless that was done less than a second ago.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP)
        {
            self.swept = Some(now);
            self.expire(now);
        }
    }

    /// Evicts the oldest half-open flow of the peer at `addr`, if it has one.
    fn evict_from(&mut self, addr: Ipv4Addr) -> bool {
        let flows = &self.flows;
        match self
            .shares
            .oldest_half_open(addr, |k, s| is_half_open(flows, k, s))
        {
            Some(key) => {
                self.remove(&key);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &FlowKey) {
        if self.flows.remove(key).is_some() {
            self.shares.removed(key.peer);
        }
    }

    /// Drops idle flows. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.flows.len();
        let (t, shares) = (self.timeouts, &mut self.shares);
        self.flows.retain(|k, f| {
            let live = now.saturating_duration_since(f.last_seen) <= timeout(&t, k, f);
            if !live {
                shares.removed(k.peer);
            }
            live
        });
        shares.forget_idle();
        before - self.flows.len()
    }

    /// Keeps only the flows `still` says yes to, and records the rule it names for each. Returns
    /// how many were cut.
    pub fn retain(&mut self, mut still: impl FnMut(&FlowKey, &Flow) -> Option<String>) -> usize {
        let before = self.flows.len();
        let shares = &mut self.shares;
        self.flows.retain(|k, f| match still(k, f) {
            Some(rule) => {
                f.rule = rule;
                true
            }
            None => {
                shares.removed(k.peer);
                false
            }
        });
        before - self.flows.len()
    }

    /// Entries in the half-open queue of the peer at `addr`.
    #[cfg(test)]
    pub(crate) fn queued(&self, addr: Ipv4Addr) -> usize {
        self.shares.queued(addr)
    }

    /// Every flow.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.flows.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::{Packet, build, classify, icmp};

    pub(crate) const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    pub(crate) const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    pub(crate) fn v4(b: Vec<u8>) -> Ipv4 {
        match classify(&b) {
            Ok(Packet::V4(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reply_finds_the_flow_of_its_request() {
        let mut ct = Conntrack::new(10, 10, Timeouts::default());
        let t0 = Instant::now();
        let syn = v4(build::tcp(A, B, 40000, 22, tcp::SYN));
        assert_eq!(
            ct.track(FlowKey::egress(&syn), &syn, Initiator::Local, t0),
            Tracked::New
        );
        assert!(ct.open(FlowKey::egress(&syn), Initiator::Local, "r", t0));
        // As the peer sees it arrive back, from B to A.
        let synack = v4(build::tcp(B, A, 22, 40000, tcp::SYN | tcp::ACK));
        assert_eq!(FlowKey::ingress(&synack), FlowKey::egress(&syn));
        assert_eq!(
            ct.track(FlowKey::ingress(&synack), &synack, Initiator::Peer, t0),
            Tracked::Known(Initiator::Local)
        );
    }

    #[test]
    fn only_a_syn_or_echo_request_opens_a_flow() {
        let mut ct = Conntrack::new(10, 10, Timeouts::default());
        let t0 = Instant::now();
        for (pkt, opens) in [
            (build::tcp(A, B, 1, 22, tcp::SYN), true),
            (build::tcp(A, B, 1, 22, tcp::ACK), false),
            (build::tcp(A, B, 1, 22, tcp::SYN | tcp::ACK), false),
            (build::tcp(A, B, 1, 22, tcp::RST), false),
            (build::icmp_echo(A, B, icmp::ECHO_REQUEST, 1, 1), true),
            (build::icmp_echo(A, B, icmp::ECHO_REPLY, 1, 1), false),
            (build::udp(A, B, 1, 53, b""), true),
        ] {
            let p = v4(pkt);
            let want = if opens {
                Tracked::New
            } else {
                Tracked::CannotOpen
            };
            assert_eq!(
                ct.track(FlowKey::egress(&p), &p, Initiator::Local, t0),
                want,
                "{p:?}"
            );
        }
    }

    #[test]
    fn idle_flows_expire_by_stage() {
        let t = Timeouts::default();
        let mut ct = Conntrack::new(10, 10, t);
        let t0 = Instant::now();
        let syn = v4(build::tcp(A, B, 1, 22, tcp::SYN));
        let k = FlowKey::egress(&syn);
        ct.open(k, Initiator::Local, "r", t0);
        // Unanswered: gone after the half-open timeout.
        let ack = v4(build::tcp(A, B, 1, 22, tcp::ACK));
        assert_eq!(
            ct.track(
                k,
                &ack,
                Initiator::Local,
                t0 + t.tcp_half_open + Duration::from_secs(1)
            ),
            Tracked::CannotOpen
        );
        // Answered, and the handshake completed: lives for the established timeout.
        ct.open(k, Initiator::Local, "r", t0);
        let back = v4(build::tcp(B, A, 22, 1, tcp::SYN | tcp::ACK));
        assert_eq!(
            ct.track(k, &back, Initiator::Peer, t0),
            Tracked::Known(Initiator::Local)
        );
        ct.track(k, &ack, Initiator::Local, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            ct.track(k, &ack, Initiator::Local, later),
            Tracked::Known(Initiator::Local)
        );
        let fin = v4(build::tcp(A, B, 1, 22, tcp::FIN | tcp::ACK));
        ct.track(k, &fin, Initiator::Local, later);
        assert_eq!(ct.expire(later + t.tcp_closing + Duration::from_secs(1)), 1);
        assert!(ct.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_flows_but_sweeps_expired_ones_first() {
        let t = Timeouts::default();
        let mut ct = Conntrack::new(2, 2, t);
        let t0 = Instant::now();
        let key = |port| FlowKey {
            proto: proto::UDP,
            peer: B,
            local_port: port,
            peer_port: 53,
        };
        assert!(ct.open(key(1), Initiator::Local, "r", t0));
        assert!(ct.open(key(2), Initiator::Local, "r", t0));
        // Both answered: neither may be evicted.
        for port in [1, 2] {
            let reply = v4(build::udp(B, A, 53, port, b""));
            ct.track(key(port), &reply, Initiator::Peer, t0);
        }
        assert!(!ct.open(key(3), Initiator::Local, "r", t0));
        assert_eq!(ct.share(B).refused, 1);
        assert_eq!(ct.len(), 2);
        assert!(ct.open(
            key(3),
            Initiator::Local,
            "r",
            t0 + t.udp + Duration::from_secs(1)
        ));
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn retain_cuts_and_relabels() {
        let mut ct = Conntrack::new(10, 10, Timeouts::default());
        let t0 = Instant::now();
        for port in [1, 2, 3] {
            let k = FlowKey {
                proto: proto::UDP,
                peer: B,
                local_port: port,
                peer_port: 53,
            };
            ct.open(k, Initiator::Local, "old", t0);
        }
        let cut = ct.retain(|k, _| (k.local_port != 2).then(|| "new".to_string()));
        assert_eq!(cut, 1);
        assert!(ct.iter().all(|(_, f)| f.rule == "new"));
    }

    pub(crate) fn syn(peer: Ipv4Addr, port: u16) -> (FlowKey, Ipv4) {
        let p = v4(build::tcp(peer, A, port, 5432, tcp::SYN));
        (FlowKey::ingress(&p), p)
    }

    /// Opens the flow of a peer's SYN as the filter would.
    pub(crate) fn peer_syn(ct: &mut Conntrack, peer: Ipv4Addr, port: u16, now: Instant) -> bool {
        let (k, p) = syn(peer, port);
        assert_eq!(ct.track(k, &p, Initiator::Peer, now), Tracked::New);
        ct.open(k, Initiator::Peer, "r", now)
    }

    /// The attack: a SYN answered with a SYN-ACK used to make a flow established for two
    /// hours, so a peer that never completed a handshake filled the table for that long.
    #[test]
    fn a_syn_answered_but_never_acknowledged_stays_half_open_and_expires_in_seconds() {
        let t = Timeouts::default();
        let mut ct = Conntrack::new(10, 10, t);
        let t0 = Instant::now();
        assert!(peer_syn(&mut ct, B, 1000, t0));
        let (k, _) = syn(B, 1000);
        let synack = v4(build::tcp(A, B, 5432, 1000, tcp::SYN | tcp::ACK));
        assert_eq!(
            ct.track(k, &synack, Initiator::Local, t0),
            Tracked::Known(Initiator::Peer)
        );
        assert!(ct.iter().all(|(_, f)| f.half_open()));
        assert!(t.tcp_half_open <= Duration::from_secs(10));
        assert_eq!(ct.expire(t0 + t.tcp_half_open + Duration::from_secs(1)), 1);

        // The same, acknowledged: established, and kept.
        assert!(peer_syn(&mut ct, B, 1001, t0));
        let (k, _) = syn(B, 1001);
        let synack = v4(build::tcp(A, B, 5432, 1001, tcp::SYN | tcp::ACK));
        let ack = v4(build::tcp(B, A, 1001, 5432, tcp::ACK));
        ct.track(k, &synack, Initiator::Local, t0);
        // An ACK from the side that sent the SYN-ACK does not complete it.
        ct.track(k, &ack, Initiator::Local, t0);
        assert!(ct.iter().all(|(_, f)| f.half_open()));
        ct.track(k, &ack, Initiator::Peer, t0);
        assert!(ct.iter().all(|(_, f)| !f.half_open()));
        assert_eq!(ct.expire(t0 + Duration::from_secs(60)), 0);
    }
}
