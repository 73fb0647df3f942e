//! Allowlist deserialization: arbitrary bytes as the JSON of an `Allowlist`. Nothing may panic.
//! If it parses, every decision on it is checked (a table index out of range must deny by
//! default, never allow, and an allow must name a rule that exists and allows), and it is
//! applied to a fresh node with keys for its peers, which then gets packets to each peer, a
//! forged inbound datagram and ticks: nothing may panic, and every flow the node opens must be
//! one the allowlist itself allows.
#![no_main]

mod common;

use std::net::SocketAddr;

use boringtun::x25519::{PublicKey, StaticSecret};
use bulkhead_allowlist::{Action, Allowlist, Decision, Peer};
use bulkhead_dataplane::{Config, Initiator, Node, PeerConfig};
use common::{Clock, Out, ipv4};
use libfuzzer_sys::fuzz_target;

const PORTS: [u16; 6] = [0, 1, 22, 443, 1024, 65535];
const PROTOS: [u8; 5] = [0, 1, 6, 17, 132];

fn check(list: &Allowlist, peer: &Peer, d: Decision, table: u32, now: i64) {
    if table as usize >= list.tables.len() {
        assert_eq!(
            d,
            Decision::Deny { rule: None },
            "table {table} out of range must be the default deny"
        );
    }
    if let Decision::Allow { rule } = d {
        let r = list
            .rules
            .get(rule as usize)
            .unwrap_or_else(|| panic!("allow names rule {rule}, which does not exist ({peer:?})"));
        assert_eq!(r.action, Action::Allow);
        assert!(r.window.contains(now));
    }
    if let Decision::Deny { rule: Some(rule) } = d {
        let r = list
            .rules
            .get(rule as usize)
            .unwrap_or_else(|| panic!("deny names rule {rule}, which does not exist"));
        assert_eq!(r.action, Action::Deny);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(list) = serde_json::from_slice::<Allowlist>(data) else {
        return;
    };
    let clock = Clock::new();
    let now = clock.now();
    for peer in list.peers.iter().take(16) {
        for proto in PROTOS {
            for port in PORTS {
                let d = list.decide_outbound(peer, proto, port, now.unix);
                check(&list, peer, d, peer.outbound, now.unix);
                let d = list.decide_inbound(peer, proto, port, now.unix);
                check(&list, peer, d, peer.inbound, now.unix);
            }
        }
    }
    // Applied to a node: keys for up to 8 of its peers, derived from their index.
    let peers = list
        .peers
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, p)| {
            let key = PublicKey::from(&StaticSecret::from([i as u8 + 10; 32])).to_bytes();
            let endpoint = SocketAddr::from(([127, 0, 0, 1], 100 + i as u16));
            (
                p.name.to_string(),
                PeerConfig {
                    public_key: key,
                    endpoint: Some(endpoint),
                },
            )
        })
        .collect();
    let mut node = Node::new(common::NODE_KEY, 16);
    let mut out = Out::default();
    node.apply(
        Config {
            allowlist: list.clone(),
            peers,
            keepalive: Some(1),
        },
        now,
    );
    for peer in list.peers.iter().take(8) {
        for proto in PROTOS {
            for port in [22u16, 443] {
                let mut l4 = vec![0u8; 20];
                l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
                l4[2..4].copy_from_slice(&port.to_be_bytes());
                l4[12] = 5 << 4;
                l4[13] = 0x02;
                if proto == 1 {
                    l4[0] = 8;
                }
                let p = ipv4(list.address, peer.address, proto, &l4);
                node.handle_tun(&p, now, &mut out);
            }
        }
    }
    node.handle_udp(
        SocketAddr::from(([127, 0, 0, 1], 100)),
        &[1, 0, 0, 0, 9, 9, 9, 9],
        now,
        &mut out,
    );
    let mut later = clock;
    for _ in 0..3 {
        later.advance(40_000);
        node.tick(later.now(), &mut out);
    }
    for (initiator, key) in out.opened {
        let allowed = list.peers.iter().any(|p| {
            p.address == key.peer
                && match initiator {
                    Initiator::Local => list.decide_outbound(p, key.proto, key.peer_port, now.unix),
                    Initiator::Peer => list.decide_inbound(p, key.proto, key.local_port, now.unix),
                }
                .is_allow()
        });
        assert!(
            allowed,
            "flow {key:?} opened by {initiator:?} is not allowed"
        );
    }
    let _ = node.peers();
    let _ = node.counters();
});
