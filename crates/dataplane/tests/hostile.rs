//! A compromised peer against a node, in the simulated network: what it sends may cost it its
//! own traffic, never other peers' traffic or the node's.

#![allow(clippy::unwrap_used)] // test code

mod world;

use std::time::Duration;

use bulkhead_dataplane::packet::{build, tcp};
use world::World;

/// ops may open anything to db; web only tcp/5432.
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
  - { name: web-db, from: [webs], to: [dbs], ports: [tcp/5432] }
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
