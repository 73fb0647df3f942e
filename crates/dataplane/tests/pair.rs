//! Nodes in one process, joined by a simulated network: handshakes, the filter at both ends,
//! spoofing, reconfiguration and expiry. Time is an argument; nothing touches a socket.

#![allow(clippy::unwrap_used)] // test code

mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bulkhead_dataplane::packet::{build, icmp, tcp};
use bulkhead_dataplane::{Direction, Event, Node, Now, Sink};
use bulkhead_proto::PrivateKey;
use world::{Out, T0, World, allowlists};

const POLICY: &str = "
version: 1
network: { cidr: 10.9.0.0/24 }
identities:
  web: { labels: { app: web } }
  db: { labels: { app: db } }
  ops: { labels: { app: ops } }
  other: { labels: { app: other } }
segments:
  webs: { match: { app: web } }
  dbs: { match: { app: db } }
  opss: { match: { app: ops } }
rules:
  - { name: web-db, from: [webs], to: [dbs], ports: [tcp/5432, udp/53, icmp] }
  - { name: ops-any, from: [opss], to: [webs, dbs], ports: [any] }
  - { name: no-ops-telnet, action: deny, from: [opss], to: [dbs], ports: [tcp/23] }
  - { name: web-ssh-temp, from: [webs], to: [dbs], ports: [tcp/22], expires: 2027-01-15T08:00:10Z }
";

fn world() -> World {
    World::new(POLICY, &["web", "db", "ops", "other"])
}

#[test]
fn an_allowed_tcp_connection_flows_both_ways_after_a_handshake() {
    let mut w = world();
    let (web, db) = (w.addr("web"), w.addr("db"));
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::SYN));
    let got = w.take_tun("db");
    assert_eq!(
        got,
        vec![build::tcp(web, db, 40000, 5432, tcp::SYN)],
        "the SYN arrives intact"
    );
    w.send("db", &build::tcp(db, web, 5432, 40000, tcp::SYN | tcp::ACK));
    assert_eq!(
        w.take_tun("web").len(),
        1,
        "the reply rides on the tracked flow"
    );
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::ACK));
    assert_eq!(w.take_tun("db").len(), 1);
    assert!(w.take_dropped("web").is_empty());
    assert!(w.take_dropped("db").is_empty());
    let flows = &w.hosts[w.idx("db")].flows;
    assert_eq!(flows, &vec!["web-db".to_string()]);
    // Per-peer counters: web sent db two packets and got one back, over one handshake.
    let syn = build::tcp(web, db, 40000, 5432, tcp::SYN).len() as u64;
    let peer = |w: &World, on: &str, name: &str| {
        let peers = w.hosts[w.idx(on)].node.peers();
        peers.into_iter().find(|p| p.name == name).expect("a peer")
    };
    let to_db = peer(&w, "web", "db");
    assert_eq!((to_db.sent.packets, to_db.received.packets), (2, 1));
    assert_eq!(to_db.sent.bytes, 2 * syn);
    assert_eq!(to_db.handshakes, 1);
    let from_web = peer(&w, "db", "web");
    assert_eq!((from_web.sent.packets, from_web.received.packets), (1, 2));
    assert_eq!(from_web.handshakes, 1);
    // A denied packet is counted as a drop, never as traffic.
    w.send("web", &build::tcp(web, db, 40002, 6379, tcp::SYN));
    assert_eq!(w.take_dropped("web"), vec!["not_allowed"]);
    let c = w.hosts[w.idx("web")].node.counters();
    assert_eq!(c.dropped.get(&(Direction::Egress, "not_allowed")), Some(&1));
    assert_eq!(peer(&w, "web", "db").sent.packets, 2);
}

#[test]
fn ping_and_udp_replies_ride_on_flows_but_cannot_open_them() {
    let mut w = world();
    let (web, db) = (w.addr("web"), w.addr("db"));
    w.send("web", &build::icmp_echo(web, db, icmp::ECHO_REQUEST, 9, 1));
    assert_eq!(w.take_tun("db").len(), 1);
    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REPLY, 9, 1));
    assert_eq!(w.take_tun("web").len(), 1);
    // db may not ping web: no rule from db to web.
    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REQUEST, 10, 1));
    assert!(w.take_tun("web").is_empty());
    assert_eq!(w.take_dropped("db"), vec!["not_allowed"]);
    // An unsolicited echo reply is not a flow.
    w.send("db", &build::icmp_echo(db, web, icmp::ECHO_REPLY, 77, 1));
    assert_eq!(w.take_dropped("db"), vec!["no_flow"]);
    // UDP both ways.
    w.send("web", &build::udp(web, db, 5353, 53, b"q"));
    assert_eq!(w.take_tun("db").len(), 1);
    w.send("db", &build::udp(db, web, 53, 5353, b"a"));
    assert_eq!(w.take_tun("web").len(), 1);
}

#[test]
fn denied_traffic_is_dropped_at_the_sender_with_its_reason() {
    let mut w = world();
    let (web, db, ops, other) = (w.addr("web"), w.addr("db"), w.addr("ops"), w.addr("other"));
    w.send("web", &build::tcp(web, db, 40000, 6379, tcp::SYN));
    assert_eq!(w.take_dropped("web"), vec!["not_allowed"]);
    w.send("web", &build::tcp(web, other, 40000, 22, tcp::SYN));
    assert_eq!(w.take_dropped("web"), vec!["not_a_peer"]);
    w.send("ops", &build::tcp(ops, db, 40000, 23, tcp::SYN));
    assert_eq!(w.take_dropped("ops"), vec!["denied_by_rule"]);
    assert_eq!(
        w.hosts[w.idx("ops")]
            .node
            .counters()
            .denied_by_rule
            .get("no-ops-telnet"),
        Some(&1)
    );
    // A TCP segment that is not a SYN cannot open a flow.
    w.send("web", &build::tcp(web, db, 40001, 5432, tcp::ACK));
    assert_eq!(w.take_dropped("web"), vec!["no_flow"]);
    // Nothing reached anyone.
    for h in ["web", "db", "ops", "other"] {
        assert!(w.take_tun(h).is_empty(), "{h} received something");
    }
}

#[test]
fn other_has_no_tunnels_at_all() {
    let w = world();
    assert!(w.hosts[w.idx("other")].node.peers().is_empty());
    let names: Vec<String> = w.hosts[w.idx("db")]
        .node
        .peers()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["ops", "web"]);
}

/// A rogue node holds web's real key but enforces a permissive allowlist of its own making.
/// The receiver's own rules must stop it.
#[test]
fn the_receiver_enforces_its_own_rules_against_a_rogue_sender() {
    let mut w = world();
    let (web, db, ops) = (w.addr("web"), w.addr("db"), w.addr("ops"));
    // web's allowlist, widened: any traffic to db.
    let rogue = allowlists(
        &POLICY.replace("ports: [tcp/5432, udp/53, icmp] }", "ports: [any] }"),
        T0,
    );
    let cfg = w.config(rogue["web"].clone());
    let now = w.now;
    let i = w.idx("web");
    w.hosts[i].node.apply(cfg, now);

    w.send("web", &build::tcp(web, db, 40000, 6379, tcp::SYN));
    assert!(
        w.take_dropped("web").is_empty(),
        "the rogue sender lets it out"
    );
    assert!(
        w.take_tun("db").is_empty(),
        "the receiver does not let it in"
    );
    assert_eq!(w.take_dropped("db"), vec!["not_allowed"]);

    // Spoofing: a valid tunnel, with ops's address as the source.
    let mut spoof_list = w.lists["web"].clone();
    spoof_list.address = ops;
    let cfg = w.config(spoof_list);
    w.hosts[i].node.apply(cfg, now);
    w.send("web", &build::tcp(ops, db, 40000, 5432, tcp::SYN));
    assert!(w.take_tun("db").is_empty());
    assert_eq!(w.take_dropped("db"), vec!["spoofed_source"]);
    // Counted as ingress at the receiver, and as traffic received through web's tunnel.
    let db = &w.hosts[w.idx("db")].node;
    let c = db.counters();
    assert_eq!(
        c.dropped.get(&(Direction::Ingress, "spoofed_source")),
        Some(&1)
    );
    assert!(
        !c.dropped
            .contains_key(&(Direction::Egress, "spoofed_source"))
    );
    let from_web = db
        .peers()
        .into_iter()
        .find(|p| p.name == "web")
        .expect("a peer");
    assert!(from_web.received.packets >= 1);
}

#[test]
fn a_new_allowlist_cuts_what_it_forbids_and_leaves_the_rest() {
    let mut w = world();
    let (web, db) = (w.addr("web"), w.addr("db"));
    // Two flows: postgres and DNS.
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::SYN));
    w.send("db", &build::tcp(db, web, 5432, 40000, tcp::SYN | tcp::ACK));
    w.send("web", &build::udp(web, db, 5353, 53, b"q"));
    w.take_tun("db");
    w.take_tun("web");

    // New policy: postgres stays (under a renamed rule), DNS goes.
    let new = allowlists(
        &POLICY.replace(
            "{ name: web-db, from: [webs], to: [dbs], ports: [tcp/5432, udp/53, icmp] }",
            "{ name: web-db-v2, from: [webs], to: [dbs], ports: [tcp/5432] }",
        ),
        T0,
    );
    let now = w.now;
    for h in ["web", "db"] {
        let cfg = w.config(new[h].clone());
        let i = w.idx(h);
        let r = w.hosts[i].node.apply(cfg, now);
        assert_eq!(r.flows_cut, 1, "{h}: the DNS flow is cut");
        assert!(
            r.added.is_empty() && r.removed.is_empty(),
            "{h}: tunnels stay"
        );
    }
    w.send("web", &build::tcp(web, db, 40000, 5432, tcp::ACK));
    assert_eq!(w.take_tun("db").len(), 1, "the postgres flow is untouched");
    w.send("db", &build::udp(db, web, 53, 5353, b"late answer"));
    assert!(w.take_tun("web").is_empty(), "the DNS flow is gone");
    assert!(w.take_dropped("db").contains(&"not_allowed".to_string()));

    // The same configuration again is a no-op.
    let cfg = w.config(new["web"].clone());
    let i = w.idx("web");
    assert!(w.hosts[i].node.apply(cfg, now).unchanged);
}

#[test]
fn removing_a_peer_drops_its_tunnel_and_flows() {
    let mut w = world();
    let (ops, web) = (w.addr("ops"), w.addr("web"));
    w.send("ops", &build::tcp(ops, web, 40000, 80, tcp::SYN));
    assert_eq!(w.take_tun("web").len(), 1);
    let new = allowlists(
        &POLICY.replace("to: [webs, dbs], ports: [any]", "to: [dbs], ports: [any]"),
        T0,
    );
    let now = w.now;
    let i = w.idx("web");
    let cfg = w.config(new["web"].clone());
    let r = w.hosts[i].node.apply(cfg, now);
    assert_eq!(r.removed, vec!["ops"]);
    assert_eq!(r.flows_cut, 1);
    w.send("ops", &build::tcp(ops, web, 40000, 80, tcp::ACK));
    assert!(w.take_tun("web").is_empty());
    assert_eq!(w.take_dropped("web"), vec!["unknown_peer"]);
}

#[test]
fn expiry_cuts_flows_and_tunnels_without_a_controller() {
    let mut w = world();
    // T0 is 2027-01-15T08:00:00Z; web-ssh-temp expires ten seconds later.
    let (web, db) = (w.addr("web"), w.addr("db"));
    w.send("web", &build::tcp(web, db, 40000, 22, tcp::SYN));
    assert_eq!(
        w.take_tun("db").len(),
        1,
        "ssh is allowed until the rule expires"
    );
    w.tick(Duration::from_secs(11));
    w.send("web", &build::tcp(web, db, 40000, 22, tcp::ACK));
    assert!(w.take_tun("db").is_empty(), "the flow was cut at expiry");
    w.send("web", &build::tcp(web, db, 40001, 22, tcp::SYN));
    assert_eq!(w.take_dropped("web"), vec!["no_flow", "not_allowed"]);
    // Postgres, under a rule without expiry, still works.
    w.send("web", &build::tcp(web, db, 40002, 5432, tcp::SYN));
    assert_eq!(w.take_tun("db").len(), 1);
}

#[test]
fn before_any_allowlist_nothing_passes() {
    let mut n = Node::new(PrivateKey::generate().to_bytes(), 16);
    let mut out = Out::default();
    let now = Now {
        instant: Instant::now(),
        unix: T0,
    };
    let a = Ipv4Addr::new(10, 9, 0, 1);
    let b = Ipv4Addr::new(10, 9, 0, 2);
    n.handle_tun(&build::tcp(a, b, 1, 22, tcp::SYN), now, &mut out);
    n.handle_udp(
        SocketAddr::from(([127, 0, 0, 1], 1)),
        &[1, 0, 0, 0],
        now,
        &mut out,
    );
    assert!(out.net.is_empty() && out.tun.is_empty());
    assert_eq!(out.dropped, vec!["no_allowlist", "tunnel"]);
}

#[test]
fn garbage_never_panics_and_is_counted() {
    let mut w = world();
    let web = w.addr("web");
    let db = w.addr("db");
    let i = w.idx("web");
    let now = w.now;
    let mut out = Out::default();
    let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0x45], vec![0xff; 100], vec![0x45; 70_000]];
    let good = build::tcp(web, db, 1, 5432, tcp::SYN);
    for n in 0..good.len() {
        inputs.push(good[..n].to_vec());
    }
    let mut wrong_src = good.clone();
    wrong_src[15] ^= 1;
    inputs.push(wrong_src);
    inputs.push(vec![0x60; 40]);
    let db_udp = w.hosts[w.idx("db")].udp;
    for pkt in &inputs {
        w.hosts[i].node.handle_tun(pkt, now, &mut out);
        w.hosts[i].node.handle_udp(db_udp, pkt, now, &mut out);
    }
    assert!(out.tun.is_empty());
    assert!(out.net.is_empty(), "garbage never makes the node send");
    let c = w.hosts[i].node.counters();
    let total: u64 = c.dropped.values().sum();
    assert_eq!(total as usize, inputs.len() * 2, "{:?}", c.dropped);
    let has = |d: Direction, r: &str| c.dropped.contains_key(&(d, r));
    assert!(has(Direction::Egress, "wrong_source"));
    assert!(has(Direction::Egress, "ipv6"));
    assert!(has(Direction::Egress, "truncated"));
    // The same garbage arriving on the UDP socket is counted as ingress (it never decrypts).
    assert!(c.dropped.contains_key(&(Direction::Ingress, "tunnel")));
}

#[test]
fn peers_keep_their_ids_across_applies_and_an_id_is_never_given_twice() {
    let mut w = world();
    let now = w.now;
    let i = w.idx("db");
    let ids = |w: &World| {
        let n = &w.hosts[i].node;
        (n.peer_id("web"), n.peer_id("ops"), n.epoch())
    };
    let (web, ops, epoch) = ids(&w);
    let (web, ops) = (
        web.expect("web has a tunnel"),
        ops.expect("ops has a tunnel"),
    );
    assert_ne!(web, ops);
    assert_eq!(epoch, 1, "one apply so far");
    let mut seen = vec![web, ops];

    // A new allowlist that keeps both peers: same ids, a new epoch.
    let renamed = allowlists(&POLICY.replace("name: web-db,", "name: web-db-v2,"), T0);
    let cfg = w.config(renamed["db"].clone());
    w.hosts[i].node.apply(cfg.clone(), now);
    assert_eq!(ids(&w), (Some(web), Some(ops), 2));
    // The same configuration again changes nothing, not even the epoch.
    assert!(w.hosts[i].node.apply(cfg.clone(), now).unchanged);
    assert_eq!(ids(&w), (Some(web), Some(ops), 2));

    // web comes back with a new key: a new tunnel under a new id.
    let mut rekeyed = cfg.clone();
    rekeyed.peers.get_mut("web").expect("web").public_key = PrivateKey::generate().public_key().0;
    w.hosts[i].node.apply(rekeyed, now);
    let (web2, ops2, epoch) = ids(&w);
    let web2 = web2.expect("web has a tunnel");
    assert!(!seen.contains(&web2), "a new key never gets an old id");
    assert_eq!((ops2, epoch), (Some(ops), 3));
    seen.push(web2);

    // Cleared and applied again: every peer is new, and so is every id.
    w.hosts[i].node.clear();
    assert_eq!(ids(&w), (None, None, 4));
    w.hosts[i].node.apply(cfg, now);
    let (web3, ops3, epoch) = ids(&w);
    assert_eq!(epoch, 5);
    for id in [web3, ops3] {
        let id = id.expect("a tunnel again");
        assert!(!seen.contains(&id), "{id:?} was given before");
        seen.push(id);
    }

    // The tunnels under the new ids work.
    let (web_a, db_a) = (w.addr("web"), w.addr("db"));
    w.send("web", &build::tcp(web_a, db_a, 40000, 5432, tcp::SYN));
    assert_eq!(w.take_tun("db").len(), 1);
}

#[test]
fn a_rule_window_closing_moves_the_epoch() {
    let mut w = world();
    let i = w.idx("web");
    assert_eq!(w.hosts[i].node.epoch(), 1);
    w.tick(Duration::from_secs(1));
    assert_eq!(w.hosts[i].node.epoch(), 1, "nothing opened or closed");
    // web-ssh-temp expires ten seconds after T0.
    w.tick(Duration::from_secs(11));
    assert_eq!(w.hosts[i].node.epoch(), 2);
}

#[test]
fn a_deny_rule_is_named_and_keeps_its_count_when_the_rules_change() {
    /// The deny rule named by each drop.
    #[derive(Default)]
    struct Named(Vec<Option<String>>);
    impl Sink for Named {
        fn to_network(&mut self, _: SocketAddr, _: &[u8]) {}
        fn to_tun(&mut self, _: &[u8]) {}
        fn event(&mut self, e: Event<'_>) {
            if let Event::Dropped { rule, .. } = e {
                self.0.push(rule.map(str::to_string));
            }
        }
    }
    let mut w = world();
    let (ops, db) = (w.addr("ops"), w.addr("db"));
    let (i, now) = (w.idx("ops"), w.now);
    let telnet = build::tcp(ops, db, 40000, 23, tcp::SYN);
    let mut named = Named::default();
    w.hosts[i].node.handle_tun(&telnet, now, &mut named);
    // A rule ahead of it moves it in the allowlist's rule table.
    let moved = allowlists(
        &POLICY.replace(
            "rules:\n",
            "rules:\n  - { name: a-first, from: [opss], to: [dbs], ports: [udp/9] }\n",
        ),
        T0,
    );
    let cfg = w.config(moved["ops"].clone());
    assert!(!w.hosts[i].node.apply(cfg, now).unchanged);
    w.hosts[i].node.handle_tun(&telnet, now, &mut named);
    assert_eq!(named.0, vec![Some("no-ops-telnet".to_string()); 2]);
    let counted = |w: &World| {
        w.hosts[i]
            .node
            .counters()
            .denied_by_rule
            .get("no-ops-telnet")
            .copied()
    };
    assert_eq!(counted(&w), Some(2));
    // Counts outlive the allowlist.
    w.hosts[i].node.clear();
    assert_eq!(counted(&w), Some(2));
}
