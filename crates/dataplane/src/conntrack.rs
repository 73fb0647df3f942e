//! Connection tracking: the flows a node has let through, so that replies ride on them and only
//! the first packet of a connection meets the rules.
//!
//! Flows are keyed from the node's own point of view (protocol, peer address, local port, peer
//! port), so a packet and its reply find the same flow. The table is bounded: when it is full,
//! expired flows are swept, and if none are, the new flow is refused, never an old one evicted.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bulkhead_allowlist::proto;

use crate::packet::{Ipv4, tcp};

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

/// Where a TCP flow is in its life, which decides its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Opened; no packet seen from the answering side yet.
    Opening,
    /// Both sides have spoken.
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
}

/// How long an idle flow is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A flow opened but never answered.
    pub opening: Duration,
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
        (_, Stage::Opening) => t.opening,
        (proto::TCP, Stage::Closing) => t.tcp_closing,
        (proto::TCP, _) => t.tcp_established,
        (proto::ICMP, _) => t.icmp,
        _ => t.udp,
    }
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
    /// A table holding at most `capacity` flows.
    pub fn new(capacity: usize, timeouts: Timeouts) -> Conntrack {
        Conntrack {
            flows: HashMap::default(),
            capacity,
            timeouts,
        }
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
            return fresh();
        }
        f.last_seen = now;
        if from != f.initiator && f.stage == Stage::Opening {
            f.stage = Stage::Established;
        }
        if key.proto == proto::TCP && p.tcp_flags & (tcp::FIN | tcp::RST) != 0 {
            f.stage = Stage::Closing;
        }
        Tracked::Known(f.initiator)
    }

    /// Records a new flow. Fails, leaving the table as it was, when it is full even after expired
    /// flows are swept.
    pub fn open(&mut self, key: FlowKey, initiator: Initiator, rule: &str, now: Instant) -> bool {
        if self.flows.len() >= self.capacity {
            self.expire(now);
            if self.flows.len() >= self.capacity {
                return false;
            }
        }
        self.flows.insert(
            key,
            Flow {
                initiator,
                rule: rule.to_string(),
                stage: Stage::Opening,
                last_seen: now,
            },
        );
        true
    }

    /// Drops idle flows. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.flows.len();
        let t = self.timeouts;
        self.flows
            .retain(|k, f| now.saturating_duration_since(f.last_seen) <= timeout(&t, k, f));
        before - self.flows.len()
    }

    /// Keeps only the flows `still` says yes to, and records the rule it names for each. Returns
    /// how many were cut.
    pub fn retain(&mut self, mut still: impl FnMut(&FlowKey, &Flow) -> Option<String>) -> usize {
        let before = self.flows.len();
        self.flows.retain(|k, f| match still(k, f) {
            Some(rule) => {
                f.rule = rule;
                true
            }
            None => false,
        });
        before - self.flows.len()
    }

    /// Every flow.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.flows.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Packet, build, classify, icmp};

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn v4(b: Vec<u8>) -> Ipv4 {
        match classify(&b) {
            Ok(Packet::V4(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reply_finds_the_flow_of_its_request() {
        let mut ct = Conntrack::new(10, Timeouts::default());
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
        let mut ct = Conntrack::new(10, Timeouts::default());
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
        let mut ct = Conntrack::new(10, t);
        let t0 = Instant::now();
        let syn = v4(build::tcp(A, B, 1, 22, tcp::SYN));
        let k = FlowKey::egress(&syn);
        ct.open(k, Initiator::Local, "r", t0);
        // Unanswered: gone after the opening timeout.
        let ack = v4(build::tcp(A, B, 1, 22, tcp::ACK));
        assert_eq!(
            ct.track(
                k,
                &ack,
                Initiator::Local,
                t0 + t.opening + Duration::from_secs(1)
            ),
            Tracked::CannotOpen
        );
        // Answered: lives for the established timeout.
        ct.open(k, Initiator::Local, "r", t0);
        let back = v4(build::tcp(B, A, 22, 1, tcp::SYN | tcp::ACK));
        assert_eq!(
            ct.track(k, &back, Initiator::Peer, t0),
            Tracked::Known(Initiator::Local)
        );
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
        let mut ct = Conntrack::new(2, t);
        let t0 = Instant::now();
        let key = |port| FlowKey {
            proto: proto::UDP,
            peer: B,
            local_port: port,
            peer_port: 53,
        };
        assert!(ct.open(key(1), Initiator::Local, "r", t0));
        assert!(ct.open(key(2), Initiator::Local, "r", t0));
        assert!(!ct.open(key(3), Initiator::Local, "r", t0));
        assert_eq!(ct.len(), 2);
        assert!(ct.open(
            key(3),
            Initiator::Local,
            "r",
            t0 + t.opening + Duration::from_secs(1)
        ));
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn retain_cuts_and_relabels() {
        let mut ct = Conntrack::new(10, Timeouts::default());
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
}
