//! Transparent addressing (spec §8) with real daemons in namespaces: each identity's address is
//! its server's own, and applications connect to a peer's own address as they always did.
//!
//! Services listen on every address. What the policy allows to a peer's address goes through
//! the tunnel (WireGuard's counters move); what it does not allow is dropped, although the
//! underlay itself is open; a host that is not a peer is reached over the underlay as before;
//! the tunnel's own UDP to the same addresses stays on the underlay; and the policy routing
//! is gone when the daemon stops.

use std::time::Duration;

use bulkhead_allowlist::Addressing;
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::standalone::Overlay;
use bulkhead_e2e::{bin, netns_ok};

/// The lab's underlay is 198.18.0.0/24 and hosts are numbered in order: a is .1, b is .2, c is
/// .3. With transparent addressing the identities' addresses are those. c has no rule: it is
/// nobody's peer.
const POLICY: &str = "version: 1
network: { name: transparent, cidr: 198.18.0.0/24 }
identities:
  a: { labels: { tier: app }, address: 198.18.0.1 }
  b: { labels: { tier: db }, address: 198.18.0.2 }
  c: { labels: { tier: other }, address: 198.18.0.3 }
segments:
  app: { match: { tier: app } }
  db: { match: { tier: db } }
rules:
  - { name: app-to-db, from: [app], to: [db], ports: [tcp/5432] }
";

fn connect(lab: &Lab, from: &str, addr: &str, port: u16) -> bool {
    let probe = bin("bh-probe").display().to_string();
    lab.exec(from, &[&probe, "connect", addr, &port.to_string(), "1500"])
        .status
        .success()
}

/// Bytes received from peers, as `wg show` counts them.
fn received(o: &Overlay, on: &str) -> u64 {
    let o = o
        .lab
        .exec(on, &["wg", "show", &o.lab.host(on).interface, "transfer"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn our_rules(lab: &Lab, on: &str) -> usize {
    let o = lab.exec(on, &["ip", "rule", "show"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("5210:") || l.starts_with("5211:") || l.starts_with("5212:"))
        .count()
}

#[test]
fn applications_use_servers_own_addresses_and_the_tunnel_carries_them() {
    if !netns_ok() {
        return;
    }
    let mut o = Overlay::start_edited(POLICY, &["a", "b", "c"], &[], |cfg| {
        cfg.allowlist.addressing = Addressing::Underlay;
    });
    let (a, b, c) = (
        o.lab.host("a").underlay.clone(),
        o.lab.host("b").underlay.clone(),
        o.lab.host("c").underlay.clone(),
    );
    assert_eq!((a.as_str(), b.as_str()), ("198.18.0.1", "198.18.0.2"));
    for n in ["a", "b", "c"] {
        o.listen(n, 5432);
        o.listen(n, 22);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(our_rules(&o.lab, "a"), 3, "{}", o.lab.log("a", "bulkheadd"));

    // Allowed: a -> b's own address on 5432, through the tunnel.
    let before = received(&o, "b");
    let through = (0..4).any(|_| connect(&o.lab, "a", &b, 5432));
    assert!(
        through,
        "{}\n{}",
        o.lab.log("a", "bulkheadd"),
        o.lab.log("b", "bulkheadd")
    );
    assert!(
        received(&o, "b") > before,
        "the connection went through b's tunnel: {}",
        o.wg_show("b")
    );
    // Not allowed: a -> b's own address on 22 is drawn into the tunnel and dropped, although
    // b listens there and the underlay is open (c reaches it).
    assert!(
        !connect(&o.lab, "a", &b, 22),
        "a -> b tcp/22 must be dropped"
    );
    assert!(connect(&o.lab, "c", &b, 22), "the underlay itself is open");
    // Not a peer: c's address is not drawn into the tunnel; a reaches it over the underlay.
    assert!(connect(&o.lab, "a", &c, 22), "a -> c over the underlay");

    // A clean stop removes the routing rules; the routes went with the interface.
    o.lab.signal("a", "bulkheadd", "TERM");
    let _ = o.lab.wait("a", "bulkheadd", Duration::from_secs(10));
    assert_eq!(our_rules(&o.lab, "a"), 0, "{}", o.lab.log("a", "bulkheadd"));
    assert!(
        connect(&o.lab, "a", &c, 22),
        "without the daemon: the plain underlay"
    );
    // b still draws a's address into its tunnel, whose other end is gone: b does not fall
    // back to the underlay in clear (fail closed).
    assert!(!connect(&o.lab, "b", &a, 22));
}
