//! A node split into shards (`shards.rs`): every shard carries its own peers, both ways, with
//! handshakes started from either end; the front routes what no shard owns to none; and an
//! apply cuts flows in every shard. The pair and hostile tests run split too
//! (`BULKHEAD_TEST_SHARDS=3`, in scripts/test.sh).

#![allow(clippy::unwrap_used)] // test code

mod world;

use std::net::SocketAddr;

use bulkhead_dataplane::packet::{build, tcp};
use bulkhead_dataplane::{Direction, Now, Sharded};
use world::{Core, Out, World};

const SHARDS: usize = 3;

/// A hub and six spokes: the hub may reach the spokes' tcp/5432, the spokes its tcp/22.
const POLICY: &str = "
version: 1
network: { cidr: 10.9.0.0/24 }
identities:
  hub: { labels: { app: hub } }
  s1: { labels: { app: spoke } }
  s2: { labels: { app: spoke } }
  s3: { labels: { app: spoke } }
  s4: { labels: { app: spoke } }
  s5: { labels: { app: spoke } }
  s6: { labels: { app: spoke } }
segments:
  hubs: { match: { app: hub } }
  spokes: { match: { app: spoke } }
rules:
  - { name: hub-db, from: [hubs], to: [spokes], ports: [tcp/5432] }
  - { name: spoke-ssh, from: [spokes], to: [hubs], ports: [tcp/22] }
";

const SPOKES: [&str; 6] = ["s1", "s2", "s3", "s4", "s5", "s6"];

fn world() -> World {
    World::split(POLICY, &["hub", "s1", "s2", "s3", "s4", "s5", "s6"], SHARDS)
}

fn split<'a>(w: &'a World, name: &str) -> &'a Sharded {
    match &w.hosts[w.idx(name)].node {
        Core::Split(s) => s,
        Core::Whole(_) => unreachable!("World::split splits every node"),
    }
}

/// A TCP handshake from `from`'s port 40000 to `to`'s `port`; what reached each end's TUN.
fn connect(w: &mut World, from: &str, to: &str, port: u16) -> (usize, usize) {
    let (a, b) = (w.addr(from), w.addr(to));
    w.send(from, &build::tcp(a, b, 40000, port, tcp::SYN));
    w.send(to, &build::tcp(b, a, port, 40000, tcp::SYN | tcp::ACK));
    w.send(from, &build::tcp(a, b, 40000, port, tcp::ACK));
    (w.take_tun(from).len(), w.take_tun(to).len())
}

#[test]
fn every_shard_carries_its_peers_both_ways() {
    let mut w = world();
    // Each shard of the hub owns two spokes.
    let hub = split(&w, "hub");
    for shard in hub.shards() {
        assert_eq!(shard.peers().len(), SPOKES.len() / SHARDS);
    }
    // The hub starts the handshakes (the spokes' responses are routed by receiver index)...
    for s in SPOKES {
        assert_eq!(connect(&mut w, "hub", s, 5432), (1, 2), "hub to {s}");
    }
    // ... and the spokes start new flows on the sessions, and a denied one.
    for s in SPOKES {
        assert_eq!(connect(&mut w, s, "hub", 22), (1, 2), "{s} to hub");
        let (a, b) = (w.addr(s), w.addr("hub"));
        w.send(s, &build::tcp(a, b, 40001, 5432, tcp::SYN));
        assert!(
            w.take_tun("hub").is_empty(),
            "{s} may not reach the hub's 5432"
        );
    }
    let hub = split(&w, "hub");
    for shard in hub.shards() {
        // Two peers, two flows each, in this shard's own table.
        assert_eq!(shard.flow_count(), 4);
    }
    assert_eq!(hub.flow_count(), 12);
    assert_eq!(hub.peers().len(), 6);
    assert!(hub.peers().iter().all(|p| p.handshakes >= 1));
    // The spokes' refused SYNs were dropped by the spoke itself (egress), not the hub.
    assert_eq!(hub.counters().flows_started, 12);
    assert!(w.take_dropped("hub").is_empty());
}

#[test]
fn handshakes_started_by_the_split_side_and_by_the_peers_both_complete() {
    // Spokes first this time: their initiations are routed by the key they decrypt to.
    let mut w = world();
    for s in SPOKES {
        assert_eq!(connect(&mut w, s, "hub", 22), (1, 2), "{s} to hub");
    }
    for s in SPOKES {
        assert_eq!(connect(&mut w, "hub", s, 5432), (1, 2), "hub to {s}");
    }
    assert!(w.take_dropped("hub").is_empty());
}

#[test]
fn a_datagram_no_shard_owns_is_dropped_at_the_front() {
    let mut w = world();
    let i = w.idx("hub");
    let now: Now = w.now;
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut out = Out::default();
    // A data message whose receiver index names shard 3 of 3: no such shard.
    let mut data = vec![4u8, 0, 0, 0];
    data.extend_from_slice(&((3u32 << 8) | 1).to_le_bytes());
    data.extend_from_slice(&[0; 8 + 16 + 32]);
    w.hosts[i].node.handle_udp(from, &data, now, &mut out);
    // And one that is no WireGuard at all.
    w.hosts[i].node.handle_udp(from, b"hello", now, &mut out);
    assert!(out.net.is_empty() && out.tun.is_empty());
    assert_eq!(out.dropped, ["unknown_peer", "tunnel"]);
    let front = split(&w, "hub").front().counters();
    assert_eq!(front.dropped[&(Direction::Ingress, "unknown_peer")], 1);
    assert_eq!(front.dropped[&(Direction::Ingress, "tunnel")], 1);
    // The node's counters include the front's.
    let all = w.hosts[i].node.counters();
    assert_eq!(all.dropped[&(Direction::Ingress, "unknown_peer")], 1);
}

#[test]
fn an_apply_cuts_flows_in_every_shard_and_keeps_the_rest() {
    let mut w = world();
    for s in SPOKES {
        assert_eq!(connect(&mut w, "hub", s, 5432), (1, 2));
        assert_eq!(connect(&mut w, s, "hub", 22), (1, 2));
    }
    // The spokes lose their SSH; the hub keeps its database connections.
    let policy = POLICY.replace(
        "  - { name: spoke-ssh, from: [spokes], to: [hubs], ports: [tcp/22] }\n",
        "",
    );
    let lists = world::allowlists(&policy, world::T0);
    let now = w.now;
    let cfg = w.config(lists["hub"].clone());
    let i = w.idx("hub");
    let report = w.hosts[i].node.apply(cfg, now);
    assert_eq!(
        report.flows_cut, 6,
        "one SSH flow in each of six peers, over three shards"
    );
    for shard in split(&w, "hub").shards() {
        assert_eq!(shard.flow_count(), 2);
    }
    for s in SPOKES {
        let (a, b) = (w.addr(s), w.addr("hub"));
        w.send(s, &build::tcp(a, b, 40000, 22, tcp::ACK));
        assert!(w.take_tun("hub").is_empty(), "{s}'s cut SSH flow");
        w.send("hub", &build::tcp(b, a, 40000, 5432, tcp::ACK));
        assert_eq!(w.take_tun(s).len(), 1, "hub's database flow to {s}");
    }
}

/// The same traffic through a world of whole nodes and a world of split ones, from a seeded
/// generator: allowed and denied ports, TCP handshakes in any order, UDP, ICMP, packets to
/// nobody, a spoofed source, and a policy change half way that cuts some flows. What reaches
/// every TUN device, and what the hub counts as dropped, must be the same.
#[test]
fn a_split_node_lets_through_exactly_what_a_whole_one_does() {
    let names = ["hub", "s1", "s2", "s3", "s4", "s5", "s6"];
    let policy = POLICY.to_string()
        + "  - { name: spoke-dns, from: [spokes], to: [hubs], ports: [udp/53, icmp] }\n";
    let changed = policy.replace("ports: [tcp/5432]", "ports: [tcp/5433]");
    let mut whole = World::new(&policy, &names);
    let mut split = World::split(&policy, &names, SHARDS);
    let mut seed: u64 = 0x5eed_b01d_face_cafe;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let hub_addr = whole.addr("hub");
    let nobody = std::net::Ipv4Addr::new(10, 9, 0, 250);
    for step in 0..1500 {
        if step == 750 {
            for w in [&mut whole, &mut split] {
                let lists = world::allowlists(&changed, world::T0);
                let now = w.now;
                for i in 0..w.hosts.len() {
                    let cfg = w.config(lists[&w.hosts[i].name].clone());
                    w.hosts[i].node.apply(cfg, now);
                }
            }
        }
        let spoke = names[1 + next(6) as usize];
        let outbound = next(2) == 0;
        let (from, to) = if outbound {
            ("hub", spoke)
        } else {
            (spoke, "hub")
        };
        let port = [22, 53, 5432, 5433, 80][next(5) as usize];
        let local = 40000 + next(8) as u16;
        let flags =
            [tcp::SYN, tcp::SYN | tcp::ACK, tcp::ACK, tcp::FIN | tcp::ACK][next(4) as usize];
        let kind = next(10);
        for w in [&mut whole, &mut split] {
            let (a, b) = (w.addr(from), w.addr(to));
            // The same addresses in both worlds: the policy gives them.
            assert_eq!(w.addr("hub"), hub_addr);
            let pkt = match kind {
                0..=4 => build::tcp(a, b, local, port, flags),
                5 => build::tcp(b, a, port, local, flags), // a reply, or a forged one
                6 | 7 => build::udp(a, b, local, port, b"q"),
                8 => build::icmp_echo(a, b, bulkhead_dataplane::packet::icmp::ECHO_REQUEST, 1, 1),
                _ => build::udp(
                    a,
                    if next_is_nobody(step) { nobody } else { b },
                    local,
                    53,
                    b"x",
                ),
            };
            w.send(from, &pkt);
        }
    }
    for name in names {
        let (a, b) = (whole.take_tun(name), split.take_tun(name));
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a == b,
            "what reached {name}'s TUN device: {} packets whole, {} split, first difference at {first:?}",
            a.len(),
            b.len()
        );
    }
    let (a, b) = (
        whole.hosts[0].node.counters(),
        split.hosts[0].node.counters(),
    );
    assert_eq!(a.dropped, b.dropped, "the hub's drops");
    assert_eq!(a.flows_started, b.flows_started);
    assert!(a.flows_started > 50, "traffic got through: {a:?}");
    assert!(
        a.dropped.values().sum::<u64>() > 50,
        "traffic was dropped: {a:?}"
    );
}

/// Every other step's stray datagram goes to an address no peer has.
fn next_is_nobody(step: u32) -> bool {
    step.is_multiple_of(2)
}
