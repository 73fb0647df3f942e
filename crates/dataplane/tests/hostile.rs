//! A compromised peer against a node, in the simulated network: what it sends may cost it its
//! own traffic, never other peers' traffic or the node's.

#![allow(clippy::unwrap_used)] // test code

mod world;

use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::TunnResult;
use boringtun::noise::rate_limiter::RateLimiter;
use bulkhead_dataplane::packet::{build, icmp, tcp};
use world::{Out, T0, World, allowlists};

/// Somewhere the attacker receives, which is none of the hosts.
fn attacker() -> SocketAddr {
    "127.0.0.2:49999".parse().unwrap()
}

/// Where `on` sends to its peer `name`.
fn endpoint(w: &World, on: &str, name: &str) -> Option<SocketAddr> {
    let peers = w.hosts[w.idx(on)].node.peers();
    peers.into_iter().find(|p| p.name == name).unwrap().endpoint
}

/// The first handshake initiation `from` sends `to`, taken off the wire before delivery, as
/// anyone on the path sees it.
fn initiation(w: &mut World, from: &str, to: &str) -> Vec<u8> {
    let (i, to) = (w.idx(from), w.hosts[w.idx(to)].udp);
    let mut out = Out::default();
    let now = w.now;
    w.hosts[i].node.tick(now, &mut out);
    let init = out.net.iter().find(|(dst, d)| *dst == to && d[0] == 1);
    init.unwrap().1.clone()
}

/// ops may open anything to db; web only tcp/5432 and pings.
const POLICY: &str = "
version: 1
network: { cidr: 10.9.0.0/24 }
identities:
  web: { labels: { app: web } }
  db: { labels: { app: db } }
  ops: { labels: { app: ops } }
segments:
  webs: { match: { app: web } }
  dbs: { match: { app: db } }
  opss: { match: { app: ops } }
rules:
  - { name: web-db, from: [webs], to: [dbs], ports: [tcp/5432, icmp] }
  - { name: ops-any, from: [opss], to: [dbs], ports: [any] }
";

/// Before: a SYN answered with a SYN-ACK made the flow established for two hours, so a peer
/// that never completed a handshake kept its flows in the table for that long.
#[test]
fn a_handshake_never_completed_leaves_the_table_in_seconds() {
    let mut w = World::new(POLICY, &["web", "db", "ops"]);
    let (db, ops) = (w.addr("db"), w.addr("ops"));
    w.send("ops", &build::tcp(ops, db, 40000, 8080, tcp::SYN));
    assert_eq!(w.take_tun("db").len(), 1);
    // db's kernel answers; ops never sends the ACK.
    w.send("db", &build::tcp(db, ops, 8080, 40000, tcp::SYN | tcp::ACK));
    let i = w.idx("db");
    assert_eq!(w.hosts[i].node.flow_count(), 1);
    w.tick(Duration::from_secs(6));
    assert_eq!(
        w.hosts[i].node.flow_count(),
        0,
        "a half-open flow is gone within seconds"
    );

    // A completed handshake is kept.
    w.send("ops", &build::tcp(ops, db, 40001, 8080, tcp::SYN));
    w.send("db", &build::tcp(db, ops, 8080, 40001, tcp::SYN | tcp::ACK));
    w.send("ops", &build::tcp(ops, db, 40001, 8080, tcp::ACK));
    w.tick(Duration::from_secs(60));
    assert_eq!(w.hosts[i].node.flow_count(), 1);
}

/// Before: one peer opening as many flows as the table holds refused every new flow on the
/// node, from every peer.
#[test]
fn one_peer_flooding_new_flows_does_not_starve_the_others() {
    const CAPACITY: usize = 64;
    let mut w = World::with_flow_capacity(POLICY, &["web", "db", "ops"], CAPACITY);
    let (web, db, ops) = (w.addr("web"), w.addr("db"), w.addr("ops"));
    for port in 0..(4 * CAPACITY as u16) {
        w.send("ops", &build::tcp(ops, db, 10000 + port, 8080, tcp::SYN));
    }
    let i = w.idx("db");
    assert_eq!(w.take_tun("db").len(), 4 * CAPACITY, "ops's own SYNs pass");
    let share = |w: &World, name: &str| {
        let peers = w.hosts[i].node.peers();
        peers.into_iter().find(|p| p.name == name).unwrap().flows
    };
    let flood = share(&w, "ops");
    assert!(flood.tracked <= CAPACITY / 4, "{flood:?}");
    assert_eq!(flood.evicted as usize, 4 * CAPACITY - flood.tracked);

    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::SYN));
    assert_eq!(
        w.take_tun("db"),
        vec![build::tcp(web, db, 40000, 5432, tcp::SYN)],
        "web's new connection gets in: {:?}",
        w.take_dropped("db")
    );
    assert_eq!(share(&w, "web").tracked, 1);
}

/// Before: boringtun took a cookie reply as a finished handshake and the node moved the peer's
/// endpoint to wherever it came from. A cookie reply needs only the peer's public key and the
/// mac1 of an initiation seen on the path, so anyone could redirect a node's traffic for a peer.
#[test]
fn a_cookie_reply_from_elsewhere_does_not_move_a_peer() {
    let mut w = World::new(POLICY, &["web", "db", "ops"]);
    let init = initiation(&mut w, "db", "web");
    let web_key = w.hosts[w.idx("web")].key.public_key().0;
    // What web's rate limiter would answer under load, made by the attacker.
    let forger = RateLimiter::new(&boringtun::x25519::PublicKey::from(web_key), 0);
    let mut buf = [0u8; 256];
    let cookie = match forger.verify_packet(Some(attacker().ip()), &init, &mut buf) {
        Err(TunnResult::WriteToNetwork(c)) => c.to_vec(),
        _ => panic!("a cookie reply"),
    };
    let (i, web) = (w.idx("db"), w.hosts[w.idx("web")].udp);
    let mut out = Out::default();
    let now = w.now;
    w.hosts[i]
        .node
        .handle_udp(attacker(), &cookie, now, &mut out);
    assert_eq!(
        endpoint(&w, "db", "web"),
        Some(web),
        "db still sends to web"
    );
    let peers = w.hosts[i].node.peers();
    let to_web = peers.iter().find(|p| p.name == "web").unwrap();
    assert_eq!(to_web.handshakes, 0, "no handshake");
}

/// Before: the node and every tunnel shared one rate limiter and charged it twice per
/// message; once it was over its limit, the tunnel answered a replayed initiation with a
/// cookie, which the node took for a completed handshake: the peer's endpoint moved to the
/// replayer. Now a flood of replays from elsewhere leaves the tunnel as it was.
#[test]
fn a_flood_of_replayed_handshakes_leaves_an_established_tunnel_alone() {
    let mut w = World::new(POLICY, &["web", "db", "ops"]);
    let (web, db) = (w.addr("web"), w.addr("db"));
    let init = initiation(&mut w, "web", "db");
    let (from, to) = (w.hosts[w.idx("web")].udp, w.hosts[w.idx("db")].udp);
    w.wire.push((from, to, init.clone()));
    w.run();
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::SYN));
    assert_eq!(w.take_tun("db").len(), 1, "the tunnel is up");

    // One initiation from a key of the attacker's own, which db counts once: the attacker
    // needs only db's public key for it.
    let db_key = w.hosts[w.idx("db")].key.public_key().0;
    let mut stranger = boringtun::noise::Tunn::new(
        boringtun::x25519::StaticSecret::from([7u8; 32]),
        boringtun::x25519::PublicKey::from(db_key),
        None,
        None,
        1,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(own) = stranger.format_handshake_initiation(&mut buf, false)
    else {
        panic!("an initiation");
    };
    let i = w.idx("db");
    let mut out = Out::default();
    let now = w.now;
    w.hosts[i].node.handle_udp(attacker(), own, now, &mut out);
    for _ in 0..300 {
        let now = w.now;
        w.hosts[i].node.handle_udp(attacker(), &init, now, &mut out);
    }
    assert_eq!(
        endpoint(&w, "db", "web"),
        Some(from),
        "db still sends to web"
    );
    let cookies = out
        .net
        .iter()
        .filter(|(to, d)| *to == attacker() && d[0] == 3);
    assert!(
        cookies.count() >= 100,
        "past the limit, replays get cookies"
    );

    w.send("db", &build::tcp(db, web, 5432, 40000, tcp::SYN | tcp::ACK));
    assert_eq!(w.take_tun("web").len(), 1, "db's reply reaches web");
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::ACK));
    assert_eq!(w.take_tun("db").len(), 1);
}

/// Before: an echo flow was keyed by the identifier alone, so once web pinged db, db could
/// ping web with the same identifier, which no rule allows, riding on web's flow.
#[test]
fn a_reply_flow_does_not_open_the_other_direction() {
    let mut w = World::new(POLICY, &["web", "db", "ops"]);
    let (web, db) = (w.addr("web"), w.addr("db"));
    w.send("web", &build::icmp_echo(web, db, icmp::ECHO_REQUEST, 7, 1));
    assert_eq!(w.take_tun("db").len(), 1);
    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REPLY, 7, 1));
    assert_eq!(w.take_tun("web").len(), 1, "the reply rides on web's flow");

    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REQUEST, 7, 2));
    assert!(w.take_tun("web").is_empty(), "db may not ping web");
    assert_eq!(w.take_dropped("db"), vec!["no_flow"]);
    // web's own exchange goes on.
    w.send("web", &build::icmp_echo(web, db, icmp::ECHO_REQUEST, 7, 3));
    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REPLY, 7, 3));
    assert_eq!(w.take_tun("web").len(), 1);
}

/// Before: a packet boringtun queued while its handshake was under way went out when the
/// handshake completed, even if a new allowlist had cut its flow in between.
#[test]
fn packets_waiting_for_a_handshake_go_with_the_flows_a_new_allowlist_cuts() {
    let mut w = World::new(POLICY, &["web", "db", "ops"]);
    let (web, db) = (w.addr("web"), w.addr("db"));
    let (i, from) = (w.idx("web"), w.hosts[w.idx("web")].udp);
    let mut out = Out::default();
    let now = w.now;
    w.hosts[i]
        .node
        .handle_tun(&build::tcp(web, db, 40000, 5432, tcp::SYN), now, &mut out);
    // boringtun queued the SYN and sent an initiation instead, which the network holds.
    assert!(!out.net.is_empty() && out.net.iter().all(|(_, d)| d[0] == 1));

    let narrowed = allowlists(
        &POLICY.replace("ports: [tcp/5432, icmp]", "ports: [icmp]"),
        T0,
    );
    let cfg = w.config(narrowed["web"].clone());
    assert_eq!(w.hosts[i].node.apply(cfg, now).flows_cut, 1);

    // The initiation arrives; handshakes complete.
    w.wire
        .extend(out.net.into_iter().map(|(to, d)| (from, to, d)));
    w.run();
    w.tick(Duration::from_millis(300));
    assert!(w.take_tun("db").is_empty(), "the cut flow's SYN never left");
    // What is still allowed passes.
    w.send("web", &build::icmp_echo(web, db, icmp::ECHO_REQUEST, 9, 1));
    assert_eq!(w.take_tun("db").len(), 1);
}
