//! Attacks on the data plane by a compromised peer, run against real `bulkheadd` processes in
//! network namespaces: the daemon must survive them, keep serving the other peers, and go on
//! dropping what its rules do not allow.
//!
//! Needs root, `ip netns` and `/dev/net/tun`.

use std::time::Duration;

use bulkhead_e2e::scrape::scrape;
use bulkhead_e2e::standalone::{Overlay, PORT};
use bulkhead_e2e::{bin, netns_ok};

const POLICY: &str = "
version: 1
network: { cidr: 10.78.0.0/24 }
identities:
  client: { labels: { app: client } }
  server: { labels: { app: server } }
  attacker: { labels: { app: attacker } }
segments:
  clients: { match: { app: client } }
  servers: { match: { app: server } }
  attackers: { match: { app: attacker } }
rules:
  - { name: bulk, from: [clients], to: [servers], ports: [tcp/9000, tcp/5432] }
  - { name: noisy, from: [attackers], to: [servers], ports: [udp, tcp/5432] }
";

/// A lab confirmed it: a client whose route to the server advertises an MSS of 88 made the
/// server's TUN reads bring super-packets of ~745 segments, more than the read had buffers
/// for, and the daemon exited on the read error, taking its interface with it.
#[test]
fn a_tiny_mss_neither_ends_the_daemon_nor_stops_the_transfer() {
    if !netns_ok() {
        return;
    }
    const BYTES: u64 = 4 << 20;
    let mut o = Overlay::start(POLICY, &["client", "server"]);
    let (server, iface) = (
        o.addr("server").to_string(),
        o.lab.host("client").interface.clone(),
    );
    let route = o.lab.exec(
        "client",
        &[
            "ip",
            "route",
            "add",
            &format!("{server}/32"),
            "dev",
            &iface,
            "advmss",
            "88",
        ],
    );
    assert!(route.status.success(), "{route:?}");
    o.listen("server", 5432);
    let probe = bin("bh-probe").display().to_string();
    let bytes = BYTES.to_string();
    o.lab
        .spawn("server", "serve", &[&probe, "serve", "9000", &bytes, "90"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(o.connect_eventually("client", "server", 5432));

    let fetch = o
        .lab
        .exec("client", &[&probe, "fetch", &server, "9000", &bytes, "40"]);
    let said = String::from_utf8_lossy(&fetch.stdout).into_owned();
    assert_eq!(
        o.lab
            .wait("server", "bulkheadd", Duration::from_millis(100)),
        None,
        "the server's daemon is still running:\n{}",
        o.lab.log("server", "bulkheadd")
    );
    assert!(
        fetch.status.success(),
        "every byte came, intact: {said}\n{}",
        o.lab.log("server", "bulkheadd")
    );
    assert!(said.starts_with(&format!("{BYTES} bytes")), "{said}");
    let log = o.lab.log("server", "bulkheadd");
    assert!(
        log.contains("more buffers"),
        "the segments were too long for the first buffers (else the test tests nothing):\n{log}"
    );

    // And the filter still filters.
    assert!(
        !o.connect("server", "client", 5432),
        "no rule from server to client"
    );
    assert!(!o.ping("client", "server"), "no rule for icmp");
    assert!(o.connect_eventually("client", "server", 5432));
}

/// Before: one peer opening as many flows as the table held refused every new flow on the
/// node, from every peer, for as long as it kept them open.
#[test]
fn a_peer_flooding_new_flows_does_not_keep_another_peer_out() {
    if !netns_ok() {
        return;
    }
    const CAPACITY: u64 = 400;
    let capacity = CAPACITY.to_string();
    let mut o = Overlay::start_with(
        POLICY,
        &["client", "server", "attacker"],
        &["--flow-capacity", &capacity],
    );
    o.listen("server", 5432);
    o.listen("server", 22);
    assert!(o.connect_eventually("attacker", "server", 5432));
    let probe = bin("bh-probe").display().to_string();
    let server = o.addr("server").to_string();
    let count = (5 * CAPACITY).to_string();
    let flood = o.lab.exec(
        "attacker",
        &[&probe, "flood", &server, &count, "10", "2000"],
    );
    let said = String::from_utf8_lossy(&flood.stdout);
    assert!(said.contains(&format!("{count} sent")), "{said}");

    assert!(
        o.connect_eventually("client", "server", 5432),
        "the client's new connection gets in:\n{}",
        o.lab.log("server", "bulkheadd")
    );
    assert!(!o.connect("attacker", "server", 22), "no rule for tcp/22");
    assert!(!o.connect("client", "server", 22), "no rule for tcp/22");
    assert_eq!(
        o.lab
            .wait("server", "bulkheadd", Duration::from_millis(100)),
        None
    );
}

/// A stranger who knows the server's public key floods it with handshake initiations, at
/// `RATE` a second for a few seconds. The
/// established tunnel must keep passing traffic, the client's endpoint must not move, and
/// `wg show` and `/metrics` must answer during the flood.
#[test]
fn a_handshake_flood_leaves_the_tunnel_uapi_and_metrics_working() {
    if !netns_ok() {
        return;
    }
    const RATE: u64 = 20_000;
    let mut o = Overlay::start_with(
        POLICY,
        &["client", "server", "attacker"],
        &["--metrics", "127.0.0.1:9190"],
    );
    o.listen("server", 5432);
    assert!(o.connect_eventually("client", "server", 5432));
    let probe = bin("bh-probe").display().to_string();
    let server = format!("{}:{}", o.lab.host("server").underlay, PORT);
    let key = o.keys["server"].to_base64();
    let (server_ip, client_underlay) = (
        o.addr("server").to_string(),
        o.lab.host("client").underlay.clone(),
    );
    o.lab
        .spawn("client", "hold", &[&probe, "hold", &server_ip, "5432", "6"]);
    o.lab.spawn(
        "attacker",
        "flood",
        &[
            &probe,
            "handshake-flood",
            &server,
            &key,
            &(4 * RATE).to_string(),
            "5",
            &RATE.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_secs(1));

    // During the flood.
    let shown = o.wg_show("server");
    assert!(
        shown.contains(&format!("endpoint: {client_underlay}:{PORT}")),
        "the client's endpoint did not move:\n{shown}"
    );
    let m = scrape(&o.lab, "server", "http://127.0.0.1:9190/metrics");
    let dropped = |m: &bulkhead_e2e::scrape::Scrape, reason: &str| -> f64 {
        m.samples
            .iter()
            .filter(|(n, l, _, _)| {
                n == "bulkhead_packets_dropped_total"
                    && l.get("reason").map(String::as_str) == Some(reason)
            })
            .map(|(_, _, v, _)| v)
            .sum()
    };
    assert!(dropped(&m, "unknown_peer") > 0.0, "the flood is arriving");

    let held = o.lab.wait("client", "hold", Duration::from_secs(15));
    assert_eq!(
        o.lab.wait("attacker", "flood", Duration::from_secs(10)),
        Some(0)
    );
    let said = o.lab.log("attacker", "flood");
    eprintln!("handshake flood: {}", said.trim());
    assert_eq!(
        held,
        Some(0),
        "the held connection never broke: {}",
        o.lab.log("client", "hold")
    );
    let m = scrape(&o.lab, "server", "http://127.0.0.1:9190/metrics");
    eprintln!(
        "server: unknown_peer {} tunnel {}",
        dropped(&m, "unknown_peer"),
        dropped(&m, "tunnel")
    );
    let shown = o.wg_show("server");
    assert!(
        shown.contains(&format!("endpoint: {client_underlay}:{PORT}")),
        "{shown}"
    );
    assert!(o.connect_eventually("client", "server", 5432));
    assert!(!o.connect("attacker", "server", 22), "no rule for tcp/22");
    assert_eq!(
        o.lab
            .wait("server", "bulkheadd", Duration::from_millis(100)),
        None
    );
}
