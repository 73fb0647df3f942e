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
  - { name: app-to-db, from: [app], to: [db], ports: [tcp/5432, tcp/8443] }
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
    // A bulk transfer through the tunnel to b's own address: full-size segments, as the
    // interface's MTU (1420) and the route through it give TCP, arrive whole.
    let probe = bin("bh-probe").display().to_string();
    o.lab
        .spawn("b", "serve", &[&probe, "serve", "8443", "4000000", "60"]);
    std::thread::sleep(Duration::from_millis(300));
    let fetch = o
        .lab
        .exec("a", &[&probe, "fetch", &b, "8443", "4000000", "30"]);
    let said = String::from_utf8_lossy(&fetch.stdout).into_owned();
    assert!(
        fetch.status.success() && said.contains("4000000 bytes, intact: true"),
        "{said}"
    );

    // Not a peer: c's address is not drawn into the tunnel; a reaches it over the underlay.
    assert!(connect(&o.lab, "a", &c, 22), "a -> c over the underlay");

    // A peer removed while a flow is live: the flow is cut, and a new connection to its
    // address is dropped by the data plane, not sent in clear over the underlay (its route
    // stays while the daemon runs).
    o.lab.spawn("a", "hold", &[&probe, "hold", &b, "5432", "8"]);
    std::thread::sleep(Duration::from_millis(1500));
    let mut cfgs = bulkhead_e2e::standalone::configs(
        &POLICY.replace(
            "  - { name: app-to-db, from: [app], to: [db], ports: [tcp/5432, tcp/8443] }\n",
            "",
        ),
        &o.lab,
        &o.keys,
    );
    let mut cfg = cfgs.remove("a").expect("a's config");
    cfg.allowlist.addressing = Addressing::Underlay;
    o.write_config("a", &cfg);
    o.reload("a");
    let held = o.lab.wait("a", "hold", Duration::from_secs(20));
    assert_eq!(
        held,
        Some(1),
        "the live flow is cut: {}",
        o.lab.log("a", "hold")
    );
    assert!(
        !connect(&o.lab, "a", &b, 5432),
        "no fallback to the underlay in clear"
    );

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

const CLUSTER_POLICY: &str = "version: 1
network: { name: pinned, cidr: 198.18.0.0/24, addressing: underlay }
identities:
  db-1: { labels: { tier: db } }
  web-1: { labels: { tier: web } }
  dev-1: { labels: { tier: dev } }
  spare: { labels: { tier: dev } }
segments:
  db: { match: { tier: db } }
  web: { match: { tier: web } }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
";

/// With a controller: each identity's address is the one its node joined from, pinned; a node
/// cannot move it, nor take another server's; applications use the servers' own addresses;
/// and with the host firewall in `enforce` nothing between servers bypasses the tunnels.
#[test]
fn addresses_are_pinned_at_enrollment_and_never_learned() {
    if !netns_ok() {
        return;
    }
    let nodes = ["db-1", "web-1", "dev-1"];
    let mut c = bulkhead_e2e::cluster::Cluster::new(&nodes);
    let policy = c.files.write("policy.yaml", CLUSTER_POLICY);
    let enforce = c.files.write(
        "enforce.yaml",
        &format!("{CLUSTER_POLICY}underlay: {{ mode: enforce }}\n"),
    );
    c.start_controller("controller", &policy, &[]);
    for n in nodes {
        let t = c.token(n);
        if n == "dev-1" {
            // dev-1 claims db-1's address as its endpoint: a claim, which moves nothing.
            let endpoint = format!("{}:51820", c.lab.host("db-1").underlay);
            c.start_daemon_with(n, "bulkheadd", Some(&t), &["--endpoint", &endpoint]);
        } else {
            c.start_daemon(n, "bulkheadd", Some(&t));
        }
    }
    c.converge(&nodes);
    let own: std::collections::BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.to_string(), c.lab.host(n).underlay.clone()))
        .collect();
    for n in nodes {
        assert_eq!(
            c.addresses[n], own[n],
            "{n} is pinned to the address it joined from"
        );
    }
    let probe = bin("bh-probe").display().to_string();
    for n in nodes {
        c.lab
            .spawn(n, "listen", &[&probe, "listen", "5432,22", "120"]);
    }
    std::thread::sleep(Duration::from_millis(300));

    // web-1 -> db-1's own address: through the tunnel, in the flow log as overlay traffic.
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());
    assert!(
        !c.connect("web-1", "db-1", 22),
        "not allowed: drawn into the tunnel, dropped"
    );
    let seen = Lab::until(Duration::from_secs(10), || {
        let r = c.cli(&["flows", "-o", "json"]);
        r.json().as_array().is_some_and(|fs| {
            fs.iter().any(|f| {
                f["src"] == "web-1"
                    && f["dst"] == "db-1"
                    && f["port"] == 5432
                    && f["verdict"] == "allow"
                    && f.get("path").is_none_or(|p| p == "overlay")
            })
        })
    });
    assert!(seen, "{}", c.cli(&["flows"]).stdout);

    // Another identity cannot take a pinned server's address: a join from dev-1's server as
    // `spare` is refused.
    let spare = c.token("spare");
    let state = c.lab.host("dev-1").dir.join("spare-state");
    let join = c.lab.exec(
        "dev-1",
        &[
            &bin("bulkheadd").display().to_string(),
            "join",
            &spare,
            "--state",
            &state.display().to_string(),
        ],
    );
    assert!(!join.status.success());
    assert!(
        String::from_utf8_lossy(&join.stderr).contains("already dev-1's address"),
        "{}",
        String::from_utf8_lossy(&join.stderr)
    );

    // Without a host firewall, dev-1 (no rule) still reaches db-1 over the underlay; with
    // `underlay: enforce`, servers reach each other only through tunnels.
    assert!(underlay_open(&c, "dev-1", "db-1", 5432));
    let r = c.cli(&["policy", "apply", "--yes", &enforce]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let closed = Lab::until(Duration::from_secs(10), || {
        !underlay_open(&c, "dev-1", "db-1", 5432)
    });
    assert!(closed, "{}", c.logs());
    assert!(
        c.connect_eventually("web-1", "db-1", 5432),
        "the tunnel still carries it"
    );
    c.converge(&nodes);
    for n in nodes {
        assert_eq!(c.addresses[n], own[n], "still pinned after the apply");
    }
}

fn underlay_open(c: &bulkhead_e2e::cluster::Cluster, from: &str, to: &str, port: u16) -> bool {
    connect(&c.lab, from, &c.lab.host(to).underlay, port)
}
