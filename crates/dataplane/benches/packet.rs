//! The per-packet cost of the core, with a realistic allowlist: one 1400-byte TCP packet of an
//! established flow, encrypted by one node and decrypted and admitted by another; and a SYN that
//! a deny rule refuses at the sender, the path a scan or a flood of refused flows takes.
//!
//! Run it twice to see what the filter costs, deterministic where throughput tests are noisy:
//!
//!   cargo bench -p bulkhead-dataplane --bench packet
//!   cargo bench -p bulkhead-dataplane --bench packet --features unfiltered

#![allow(clippy::unwrap_used)] // benchmark code

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use bulkhead_dataplane::packet::{build, tcp};
use bulkhead_dataplane::{Config, Node, Now, PeerConfig, Sink};
use bulkhead_policy::{Compiled, Conditions};
use bulkhead_proto::PrivateKey;

fn main() {
    divan::main();
}

const T0: i64 = 1_800_000_000;

#[derive(Default)]
struct Out {
    net: Vec<Vec<u8>>,
    tun: usize,
}

impl Sink for Out {
    fn to_network(&mut self, _: SocketAddr, d: &[u8]) {
        self.net.push(d.to_vec());
    }
    fn to_tun(&mut self, _: &[u8]) {
        self.tun += 1;
    }
}

/// 200 identities and 300 rules around the two that talk, like bench/dataplane.sh.
fn policy() -> String {
    let mut y = String::from(
        "version: 1\nnetwork: { cidr: 10.97.0.0/16 }\nidentities:\n  a: { labels: { app: client } }\n  b: { labels: { app: server } }\n",
    );
    for i in 0..198 {
        y += &format!("  h{i}: {{ labels: {{ app: app{} }} }}\n", i % 40);
    }
    y +=
        "segments:\n  clients: { match: { app: client } }\n  servers: { match: { app: server } }\n";
    for a in 0..40 {
        y += &format!("  s{a}: {{ match: {{ app: app{a} }} }}\n");
    }
    y += "rules:\n  - { name: bench, from: [clients], to: [servers, s1, s2], ports: [tcp/5201, icmp] }\n";
    for r in 0..300 {
        y += &format!(
            "  - {{ name: r{r}, from: [s{}], to: [s{}, servers], ports: [tcp/{}, udp/{}] }}\n",
            r % 40,
            (r * 7) % 40,
            1000 + r,
            2000 + r
        );
    }
    y
}

/// The nodes' keys and endpoints, and each one's configuration under `policy`.
struct Setup {
    keys: (PrivateKey, PrivateKey),
    endpoints: (SocketAddr, SocketAddr),
    configs: (Config, Config),
}

fn setup(policy: &str) -> Setup {
    let l = bulkhead_policy::load(policy, T0, &BTreeMap::new());
    let m = l.model.unwrap();
    let lists = Compiled::new(&m, m.state(&Conditions::at(T0))).allowlists(&m, 1);
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (ea, eb): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    let peers = BTreeMap::from([
        (
            "a".to_string(),
            PeerConfig {
                public_key: ka.public_key().0,
                endpoint: Some(ea),
            },
        ),
        (
            "b".to_string(),
            PeerConfig {
                public_key: kb.public_key().0,
                endpoint: Some(eb),
            },
        ),
    ]);
    let cfg = |name: &str| Config {
        allowlist: lists.iter().find(|l| l.identity == name).unwrap().clone(),
        peers: peers.clone(),
        keepalive: None,
    };
    Setup {
        configs: (cfg("a"), cfg("b")),
        keys: (ka, kb),
        endpoints: (ea, eb),
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix: T0,
    }
}

#[divan::bench(sample_count = 1000, sample_size = 20)]
fn tcp_packet_through_two_nodes(b: divan::Bencher) {
    let Setup {
        keys: (ka, kb),
        endpoints: (ea, eb),
        configs: (ca, cb),
    } = setup(&policy());
    let now = now();
    let (mut a, mut bn) = (
        Node::new(ka.to_bytes(), 65536),
        Node::new(kb.to_bytes(), 65536),
    );
    let (ia, ib): (Ipv4Addr, Ipv4Addr) = (ca.allowlist.address, cb.allowlist.address);
    a.apply(ca, now);
    bn.apply(cb, now);

    // Handshake and flow set-up: a SYN from a to b, and its answer.
    let run = |pkt: &[u8], a: &mut Node, bn: &mut Node| {
        let mut out = Out::default();
        a.handle_tun(pkt, now, &mut out);
        for _ in 0..4 {
            let mut back = Out::default();
            for d in std::mem::take(&mut out.net) {
                bn.handle_udp(ea, &d, now, &mut back);
            }
            for d in std::mem::take(&mut back.net) {
                a.handle_udp(eb, &d, now, &mut out);
            }
        }
    };
    run(&build::tcp(ia, ib, 40000, 5201, tcp::SYN), &mut a, &mut bn);
    let mut data = build::tcp(ia, ib, 40000, 5201, tcp::ACK);
    data.extend_from_slice(&[0x5a; 1360]);
    let total = (data.len() as u16).to_be_bytes();
    data[2..4].copy_from_slice(&total);

    let mut out = Out::default();
    let mut back = Out::default();
    b.bench_local(|| {
        out.net.clear();
        a.handle_tun(&data, now, &mut out);
        for d in &out.net {
            bn.handle_udp(ea, d, now, &mut back);
        }
    });
    assert!(back.tun > 0, "packets reached b");
}

/// A SYN to b's tcp/23, which a deny rule forbids: a's egress filter drops it before any
/// encryption, so no handshake and no second node are needed.
#[divan::bench(sample_count = 1000, sample_size = 1000)]
fn denied_syn(b: divan::Bencher) {
    let policy = policy()
        + "  - { name: no-telnet, action: deny, from: [clients], to: [servers], ports: [tcp/23] }\n";
    let Setup {
        keys: (ka, _),
        configs: (ca, cb),
        ..
    } = setup(&policy);
    let now = now();
    let mut a = Node::new(ka.to_bytes(), 65536);
    let syn = build::tcp(
        ca.allowlist.address,
        cb.allowlist.address,
        40000,
        23,
        tcp::SYN,
    );
    a.apply(ca, now);
    let mut out = Out::default();
    b.bench_local(|| a.handle_tun(&syn, now, &mut out));
    assert!(out.net.is_empty() && out.tun == 0, "nothing got out");
    assert!(a.counters().denied_by_rule.get("no-telnet") > Some(&0));
}
