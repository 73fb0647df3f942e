//! A flood of denied packets costs no allocation: once the node is warm, a packet that a deny
//! rule refuses is counted and reported without touching the heap (Tailscale's filter has the
//! same test, `TestNoAllocs`). A binary of its own, because it installs a counting global allocator.

#![allow(clippy::unwrap_used)] // test code

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use bulkhead_allowlist::{Action, Allowlist, Network, Peer, PortSpec, PortTable, RuleRef, Window};
use bulkhead_counting_alloc::{Counting, allocations};
use bulkhead_dataplane::packet::{build, tcp};
use bulkhead_dataplane::{Config, Event, Node, Now, PeerConfig, Sink};
use bulkhead_proto::PrivateKey;

#[global_allocator]
static GLOBAL: Counting = Counting;

const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A node that may open tcp/5432 to db, and that a deny rule forbids tcp/23.
fn node() -> Node {
    let rule = |name: &str, action| RuleRef {
        name: name.into(),
        action,
        window: Window::ALWAYS,
        posture: vec![],
    };
    let allowlist = Allowlist {
        revision: 1,
        digest: String::new(),
        identity: "web".into(),
        address: ME,
        network: Network {
            address: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
        },
        addressing: Default::default(),
        rules: vec![
            rule("web-to-db", Action::Allow),
            rule("no-telnet", Action::Deny),
        ],
        tables: vec![PortTable::build([
            (0, PortSpec::Tcp { lo: 5432, hi: 5432 }),
            (1, PortSpec::Tcp { lo: 23, hi: 23 }),
        ])],
        peers: vec![Peer {
            name: "db".into(),
            address: DB,
            outbound: 0,
            inbound: 0,
        }],
        underlay: None,
    };
    let mut node = Node::new(PrivateKey::generate().to_bytes(), 1024);
    let db = PeerConfig {
        public_key: PrivateKey::generate().public_key().0,
        endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 51820))),
    };
    let config = Config {
        allowlist,
        peers: [("db".to_string(), db)].into(),
        keepalive: None,
    };
    node.apply(config, now());
    node
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix: 1_800_000_000,
    }
}

/// Sees every denial go by, as the daemon's flow log does; lets nothing out.
#[derive(Default)]
struct Denials(usize);

impl Sink for Denials {
    fn to_network(&mut self, _: SocketAddr, _: &[u8]) {
        panic!("a denied packet was sent");
    }
    fn to_tun(&mut self, _: &[u8]) {
        panic!("a denied packet was delivered");
    }
    fn event(&mut self, e: Event<'_>) {
        if let Event::Dropped { reason, .. } = e {
            assert_eq!(reason.reason(), "denied_by_rule");
            self.0 += 1;
        }
    }
}

#[test]
fn a_denied_packet_allocates_nothing() {
    let one = allocations(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(8))));
    assert_eq!(one, 1, "the counter counts in this binary");
    let mut node = node();
    let now = now();
    // A scan of telnet from many source ports: every SYN is a new flow the deny rule refuses.
    let syns: Vec<Vec<u8>> = (0..1000u16)
        .map(|i| build::tcp(ME, DB, 20000 + i, 23, tcp::SYN))
        .collect();
    let mut seen = Denials::default();
    // Warm-up: the first denial makes the counters' entries.
    for syn in &syns[..10] {
        node.handle_tun(syn, now, &mut seen);
    }
    let n = allocations(|| {
        for syn in &syns[10..] {
            node.handle_tun(syn, now, &mut seen);
        }
    });
    assert_eq!(seen.0, syns.len());
    assert_eq!(n, 0, "allocations for {} denied packets", syns.len() - 10);
    assert_eq!(
        node.counters().denied_by_rule.get("no-telnet"),
        Some(&(syns.len() as u64))
    );
}
