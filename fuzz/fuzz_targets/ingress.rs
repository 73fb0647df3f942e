//! Ingress decapsulation and filtering, from a peer holding a valid key: arbitrary inner packets
//! are encrypted by a raw boringtun tunnel and delivered to a node. Also arbitrary datagrams.
//! Nothing may panic; nothing may reach the TUN device unless it is an IPv4 packet from the
//! peer's own address to the node's.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bulkhead_allowlist::{Action, Allowlist, Network, Peer, PortSpec, PortTable, RuleRef, Window};
use bulkhead_dataplane::{Config, Node, Now, PeerConfig, Sink};
use libfuzzer_sys::fuzz_target;

const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

#[derive(Default)]
struct Out {
    net: Vec<Vec<u8>>,
    tun: Vec<Vec<u8>>,
}

impl Sink for Out {
    fn to_network(&mut self, _: SocketAddr, d: &[u8]) {
        self.net.push(d.to_vec());
    }
    fn to_tun(&mut self, p: &[u8]) {
        self.tun.push(p.to_vec());
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix: 1_800_000_000,
    }
}

fn setup() -> (Node, Tunn) {
    // Fixed keys: the fuzzer's runs are reproducible.
    let peer_key = StaticSecret::from([2u8; 32]);
    let mut node = Node::new([1u8; 32], 64);
    let list = Allowlist {
        revision: 1,
        digest: String::new(),
        identity: "me".into(),
        address: ME,
        network: Network {
            address: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
        },
        rules: vec![RuleRef {
            name: "r".into(),
            action: Action::Allow,
            window: Window::ALWAYS,
            posture: vec![],
        }],
        tables: vec![
            PortTable::build([(0, PortSpec::Tcp { lo: 22, hi: 22 }), (0, PortSpec::Icmp)]),
            PortTable::default(),
        ],
        peers: vec![Peer {
            name: "peer".into(),
            address: PEER,
            outbound: 1,
            inbound: 0,
        }],
    };
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
    let cfg = Config {
        allowlist: list,
        peers: [(
            "peer".to_string(),
            PeerConfig {
                public_key: PublicKey::from(&peer_key).to_bytes(),
                endpoint: Some(from),
            },
        )]
        .into(),
        keepalive: None,
    };
    node.apply(cfg, now());
    let mut tunn = Tunn::new(
        peer_key,
        PublicKey::from(node.public_key()),
        None,
        None,
        7,
        None,
    );
    // Handshake: peer initiates, node answers, peer completes.
    let mut buf = vec![0u8; 65536];
    let mut out = Out::default();
    if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false) {
        node.handle_udp(from, init, now(), &mut out);
    }
    for resp in std::mem::take(&mut out.net) {
        let _ = tunn.decapsulate(None, &resp, &mut buf);
    }
    (node, tunn)
}

/// One node and one peer tunnel, set up once: key generation and the handshake would otherwise
/// be nearly all of each run.
static PAIR: std::sync::Mutex<Option<(Node, Tunn)>> = std::sync::Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let (node, tunn) = guard.get_or_insert_with(setup);
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
    let mut out = Out::default();
    // Arbitrary bytes as a datagram.
    node.handle_udp(from, data, now(), &mut out);
    // Arbitrary bytes as the inner packet of a valid tunnel.
    let mut buf = vec![0u8; data.len() + 256];
    if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(data, &mut buf) {
        let d = d.to_vec();
        node.handle_udp(from, &d, now(), &mut out);
    }
    for p in &out.tun {
        assert!(
            p.len() >= 20 && p[0] >> 4 == 4,
            "only IPv4 reaches the TUN device"
        );
        assert_eq!(&p[12..16], &PEER.octets(), "only the peer's own source");
        assert_eq!(&p[16..20], &ME.octets(), "only to this node");
    }
});
