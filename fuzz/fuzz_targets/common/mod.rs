//! Shared harness for the node targets: a fixed clock, fixed keys, an allowlist with allow and
//! deny rules and ports, a fresh node per input with a real peer tunnel, a sink that records
//! everything, and the oracle (the allowlist's own decision, plus the flows opened by packets it
//! allowed earlier in the same input).
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bulkhead_allowlist::{
    Action, Allowlist, Decision, Network, Peer, PortSpec, PortTable, RuleRef, Window,
};
use bulkhead_dataplane::packet::{Ipv4, Packet, classify};
use bulkhead_dataplane::{Config, Event, FlowKey, Initiator, Node, Now, PeerConfig, Sink};
use libfuzzer_sys::arbitrary::Unstructured;

pub const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// A second peer of the allowlist with a key but no handshake (so no endpoint traffic).
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
pub const UNIX: i64 = 1_800_000_000;
pub const NODE_KEY: [u8; 32] = [1u8; 32];
pub const PEER_KEY: [u8; 32] = [2u8; 32];
pub const OTHER_KEY: [u8; 32] = [3u8; 32];

pub fn endpoint() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// The clock: a base captured once, plus offsets the input chooses. Nothing reads the wall clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub offset: Duration,
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            offset: Duration::ZERO,
        }
    }
    pub fn now(&self) -> Now {
        Now {
            instant: base() + self.offset,
            unix: UNIX + self.offset.as_secs() as i64,
        }
    }
    pub fn advance(&mut self, ms: u32) {
        self.offset += Duration::from_millis(u64::from(ms));
    }
}

/// Everything the node handed out, in order.
#[derive(Default)]
pub struct Out {
    pub net: Vec<(SocketAddr, Vec<u8>)>,
    pub tun: Vec<Vec<u8>>,
    /// Flows the node reported as opened: initiator and key.
    pub opened: Vec<(Initiator, FlowKey)>,
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        self.net.push((to, d.to_vec()));
    }
    fn to_tun(&mut self, p: &[u8]) {
        self.tun.push(p.to_vec());
    }
    fn event(&mut self, e: Event<'_>) {
        if let Event::FlowStarted { initiator, key, .. } = e {
            self.opened.push((initiator, key));
        }
    }
}

/// Rules: 0 allow always, 1 deny always, 2 allow in a window that closes 30 s after the start,
/// 3 allow in a window that opens 20 s after the start.
pub fn allowlist() -> Allowlist {
    let rule = |name: &str, action, window| RuleRef {
        name: name.into(),
        action,
        window,
        posture: vec![],
    };
    Allowlist {
        revision: 1,
        digest: String::new(),
        identity: "me".into(),
        address: ME,
        network: Network {
            address: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
        },
        addressing: Default::default(),
        rules: vec![
            rule("allow", Action::Allow, Window::ALWAYS),
            rule("deny", Action::Deny, Window::ALWAYS),
            rule(
                "until",
                Action::Allow,
                Window {
                    not_before: None,
                    expires: Some(UNIX + 30),
                },
            ),
            rule(
                "from",
                Action::Allow,
                Window {
                    not_before: Some(UNIX + 20),
                    expires: None,
                },
            ),
        ],
        tables: vec![
            // 0: the peer's inbound (the peer may open these to this node).
            PortTable::build([
                (0, PortSpec::Tcp { lo: 22, hi: 22 }),
                (0, PortSpec::Udp { lo: 53, hi: 60 }),
                (1, PortSpec::Udp { lo: 55, hi: 55 }),
                (2, PortSpec::Tcp { lo: 80, hi: 80 }),
                (3, PortSpec::Tcp { lo: 443, hi: 443 }),
                (0, PortSpec::Icmp),
            ]),
            // 1: the peer's outbound (this node may open these to the peer).
            PortTable::build([
                (0, PortSpec::Tcp { lo: 1000, hi: 2000 }),
                (1, PortSpec::Tcp { lo: 1500, hi: 1500 }),
                (2, PortSpec::Udp { lo: 53, hi: 53 }),
                (3, PortSpec::Icmp),
            ]),
            // 2: everything, for the other peer outbound.
            PortTable::build([(0, PortSpec::Any), (1, PortSpec::Tcp { lo: 25, hi: 25 })]),
            PortTable::default(),
        ],
        peers: vec![
            Peer {
                name: "other".into(),
                address: OTHER,
                outbound: 2,
                inbound: 3,
            },
            Peer {
                name: "peer".into(),
                address: PEER,
                outbound: 1,
                inbound: 0,
            },
        ],
        underlay: None,
    }
}

pub fn config() -> Config {
    let pk = |k: [u8; 32]| PublicKey::from(&StaticSecret::from(k)).to_bytes();
    Config {
        allowlist: allowlist(),
        peers: [
            (
                "peer".to_string(),
                PeerConfig {
                    public_key: pk(PEER_KEY),
                    endpoint: Some(endpoint()),
                },
            ),
            (
                "other".to_string(),
                PeerConfig {
                    public_key: pk(OTHER_KEY),
                    endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 10))),
                },
            ),
        ]
        .into(),
        keepalive: None,
    }
}

/// The node's public key, computed once.
pub fn node_public() -> PublicKey {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    PublicKey::from(*K.get_or_init(|| PublicKey::from(&StaticSecret::from(NODE_KEY)).to_bytes()))
}

pub fn peer_tunnel() -> Tunn {
    Tunn::new(
        StaticSecret::from(PEER_KEY),
        node_public(),
        None,
        None,
        7,
        None,
    )
}

/// A fresh node with the configuration applied, and the peer's tunnel. With `handshake`, the
/// peer has initiated, the node answered, and the peer sent a keepalive: both have a session.
pub fn fresh(clock: &Clock, handshake: bool) -> (Node, Tunn) {
    let mut node = Node::new(NODE_KEY, 64);
    node.apply(config(), clock.now());
    let mut tunn = peer_tunnel();
    if handshake {
        let mut buf = vec![0u8; 2048];
        let mut out = Out::default();
        if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false)
        {
            node.handle_udp(endpoint(), init, clock.now(), &mut out);
        }
        for (_, resp) in std::mem::take(&mut out.net) {
            let _ = tunn.decapsulate(None, &resp, &mut buf);
        }
        if let TunnResult::WriteToNetwork(k) = tunn.encapsulate(&[], &mut buf) {
            let k = k.to_vec();
            node.handle_udp(endpoint(), &k, clock.now(), &mut out);
        }
    }
    (node, tunn)
}

/// What the oracle knows: flows opened by packets the allowlist allowed, in this input.
#[derive(Default)]
pub struct Oracle {
    allowed: HashSet<FlowKey>,
}

impl Oracle {
    fn peer(addr: Ipv4Addr) -> Option<Peer> {
        allowlist().peers.into_iter().find(|p| p.address == addr)
    }

    /// The allowlist's own decision on a flow opened by `initiator` with `key`.
    pub fn decide(key: &FlowKey, initiator: Initiator, now: Now) -> Decision {
        let list = allowlist();
        let Some(peer) = Oracle::peer(key.peer) else {
            return Decision::Deny { rule: None };
        };
        let port = key.service_port(initiator);
        match initiator {
            Initiator::Local => list.decide_outbound(&peer, key.proto, port, now.unix),
            Initiator::Peer => list.decide_inbound(&peer, key.proto, port, now.unix),
        }
    }

    /// A packet that opened a flow: the allowlist must allow it now.
    pub fn opened(&mut self, initiator: Initiator, key: FlowKey, now: Now) {
        let d = Oracle::decide(&key, initiator, now);
        assert!(
            d.is_allow(),
            "flow {key:?} opened by {initiator:?} but the allowlist says {d:?}"
        );
        self.allowed.insert(key);
    }

    /// A packet the node let through (`egress`: sent to the network; else written to TUN).
    pub fn passed(&mut self, p: &Ipv4, egress: bool, now: Now) {
        let (key, initiator) = if egress {
            (FlowKey::egress(p), Initiator::Local)
        } else {
            (FlowKey::ingress(p), Initiator::Peer)
        };
        if self.allowed.contains(&key) {
            return;
        }
        let d = Oracle::decide(&key, initiator, now);
        assert!(
            d.is_allow(),
            "packet {p:?} passed ({}) with no allowed flow, and the allowlist says {d:?}",
            if egress { "egress" } else { "ingress" }
        );
        self.allowed.insert(key);
    }

    /// Checks everything the node handed out in one step, then forgets it. Datagrams to the
    /// peer are decrypted as the peer would; what the peer answers (handshake responses) goes
    /// back to the node, and what that produces is checked in turn.
    pub fn check(&mut self, node: &mut Node, out: &mut Out, peer: &mut Tunn, now: Now) {
        for _ in 0..8 {
            let replies = self.check_once(out, peer, now);
            if replies.is_empty() {
                break;
            }
            for r in replies {
                node.handle_udp(endpoint(), &r, now, out);
            }
        }
        self.check_once(out, peer, now);
    }

    fn check_once(&mut self, out: &mut Out, peer: &mut Tunn, now: Now) -> Vec<Vec<u8>> {
        for (initiator, key) in std::mem::take(&mut out.opened) {
            self.opened(initiator, key, now);
        }
        for p in std::mem::take(&mut out.tun) {
            assert!(
                p.len() >= 20 && p[0] >> 4 == 4,
                "only IPv4 reaches the TUN device"
            );
            assert_eq!(&p[12..16], &PEER.octets(), "only the peer's own source");
            assert_eq!(&p[16..20], &ME.octets(), "only to this node");
            match classify(&p) {
                Ok(Packet::V4(v4)) => self.passed(&v4, false, now),
                other => panic!("unclassifiable packet reached TUN: {other:?}"),
            }
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 70000];
        for (to, d) in std::mem::take(&mut out.net) {
            if to != endpoint() {
                continue;
            }
            let mut input = d;
            loop {
                match peer.decapsulate(None, &input, &mut buf) {
                    TunnResult::WriteToTunnelV4(inner, _) => {
                        match classify(inner) {
                            Ok(Packet::V4(v4)) => {
                                assert_eq!(v4.src, ME, "egress only from this node");
                                assert_eq!(v4.dst, PEER, "egress only to the peer");
                                self.passed(&v4, true, now)
                            }
                            other => panic!("unclassifiable packet sent: {other:?}"),
                        }
                        break;
                    }
                    TunnResult::WriteToTunnelV6(..) => panic!("IPv6 sent to the network"),
                    TunnResult::WriteToNetwork(r) => {
                        // The peer answers; packets it queued may follow.
                        replies.push(r.to_vec());
                        input = Vec::new();
                    }
                    _ => break,
                }
            }
        }
        replies
    }
}

/// IPv4 packet builders for structured inputs.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total.min(65535) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

/// A structured packet from the input: TCP, UDP or ICMP between `src` and `dst` with ports and
/// flags from the input (and ports near the allowlist's, so the rules are met often), or raw.
pub fn packet(u: &mut Unstructured<'_>, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    const PORTS: [u16; 12] = [22, 53, 55, 60, 80, 443, 999, 1000, 1500, 2000, 2001, 25];
    let port = |u: &mut Unstructured<'_>| -> u16 {
        if u.arbitrary::<bool>().unwrap_or(false) {
            PORTS[usize::from(u.arbitrary::<u8>().unwrap_or(0)) % PORTS.len()]
        } else {
            u.arbitrary().unwrap_or(0)
        }
    };
    let kind: u8 = u.arbitrary().unwrap_or(0);
    match kind % 5 {
        0 | 1 => {
            let (sp, dp) = (port(u), port(u));
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sp.to_be_bytes());
            t[2..4].copy_from_slice(&dp.to_be_bytes());
            t[4..8].copy_from_slice(&u.arbitrary::<u32>().unwrap_or(0).to_be_bytes());
            t[12] = 5 << 4;
            t[13] = u.arbitrary().unwrap_or(0x02);
            ipv4(src, dst, 6, &t)
        }
        2 => {
            let (sp, dp) = (port(u), port(u));
            let n = usize::from(u.arbitrary::<u8>().unwrap_or(0));
            let payload = u.bytes(n.min(u.len())).unwrap_or(&[]);
            let mut d = vec![0u8; 8];
            d[0..2].copy_from_slice(&sp.to_be_bytes());
            d[2..4].copy_from_slice(&dp.to_be_bytes());
            d[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            d.extend_from_slice(payload);
            ipv4(src, dst, 17, &d)
        }
        3 => {
            let mut i = vec![0u8; 8];
            i[0] = if u.arbitrary().unwrap_or(false) {
                8
            } else {
                u.arbitrary().unwrap_or(0)
            };
            i[4..6].copy_from_slice(&port(u).to_be_bytes());
            ipv4(src, dst, 1, &i)
        }
        _ => {
            let n = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 1600);
            u.bytes(n.min(u.len())).unwrap_or(&[]).to_vec()
        }
    }
}
