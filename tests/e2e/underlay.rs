//! The host firewall (spec §7) with real daemons and a real nftables, in network namespaces.
//! Every service listens on every address, as real ones do.
//!
//! - `the_kernel_holds_the_table_that_was_meant`: a standalone daemon given an underlay
//!   configuration; the table nftables lists is the one `bulkhead-hostfw` renders, and it
//!   drops and lets through what it says; it outlives `kill -9`; `bulkheadd firewall off`
//!   removes it.
//! - `the_underlay_end_to_end`: a controller and three daemons, the policy's `underlay` block
//!   through `off`, `observe` and `enforce` (one segment), what the flow log shows, a crash, a
//!   bad policy, and back to `off`.

use std::time::Duration;

use bulkhead_allowlist::{Network, PortSpec, UnderlayMode};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::standalone::Overlay;
use bulkhead_e2e::{bin, netns_ok};
use bulkhead_proto::{UnderlayAllow, UnderlayConfig};

const POLICY: &str = "version: 1
network: { name: fw, cidr: 10.210.0.0/16 }
identities:
  a: { labels: { tier: a } }
  b: { labels: { tier: b } }
segments:
  tier-a: { match: { tier: a } }
  tier-b: { match: { tier: b } }
rules:
  - { name: b-to-a, from: [tier-b], to: [tier-a], ports: [tcp/5432] }
";

/// Connects from `from`'s namespace to `addr:port` (one try, 1 s).
fn underlay_connect(lab: &Lab, from: &str, addr: &str, port: u16) -> bool {
    let probe = bin("bh-probe").display().to_string();
    lab.exec(from, &[&probe, "connect", addr, &port.to_string(), "1000"])
        .status
        .success()
}

/// `nft list table inet NAME` in a namespace, counters zeroed; `None` if there is no table.
fn listed(lab: &Lab, host: &str, table: &str) -> Option<String> {
    let o = lab.exec(host, &["nft", "list", "table", "inet", table]);
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut out = String::new();
    for line in text.lines() {
        // `counter packets N bytes M` → zeroes; nft's "# progname" note is not ours.
        let mut words: Vec<String> = line
            .split(" # progname")
            .next()
            .unwrap_or_default()
            .split(' ')
            .map(str::to_string)
            .collect();
        for i in 0..words.len() {
            let count = words[i].parse::<u64>().is_ok();
            if count && i >= 1 && (words[i - 1] == "packets" || words[i - 1] == "bytes") {
                words[i] = "0".into();
            }
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    Some(out)
}

#[test]
fn the_kernel_holds_the_table_that_was_meant() {
    if !netns_ok() {
        return;
    }
    let mut o = Overlay::start(POLICY, &["a", "b"]);
    for n in ["a", "b"] {
        o.listen(n, 5432);
        o.listen(n, 22);
        o.listen(n, 8080);
    }
    let (a_u, b_u) = (
        o.lab.host("a").underlay.clone(),
        o.lab.host("b").underlay.clone(),
    );
    // Before any underlay configuration: the underlay is open both ways.
    assert!(underlay_connect(&o.lab, "b", &a_u, 5432));

    let net = |a: &str| Network {
        address: a.parse().unwrap(),
        prefix_len: 32,
    };
    let underlay = UnderlayConfig {
        mode: UnderlayMode::Enforce,
        servers: [(b_u.parse().unwrap(), "b".to_string())].into(),
        controllers: vec![],
        inbound: vec![UnderlayAllow {
            name: "ssh-from-b".into(),
            nets: vec![net(&b_u)],
            ports: vec![PortSpec::Tcp { lo: 22, hi: 22 }],
        }],
        outbound: vec![UnderlayAllow {
            name: "web-on-b".into(),
            nets: vec![net(&b_u)],
            ports: vec![PortSpec::Tcp { lo: 8080, hi: 8080 }],
        }],
    };
    let mut cfgs = bulkhead_e2e::standalone::configs(POLICY, &o.lab, &o.keys);
    let mut cfg = cfgs.remove("a").expect("a's config");
    cfg.underlay = Some(underlay.clone());
    o.write_config("a", &cfg);
    o.reload("a");

    // The kernel holds what was meant, byte for byte as nft lists it.
    let interface = o.lab.host("a").interface.clone();
    let host = bulkhead_hostfw::Host {
        interface: &interface,
        overlay_address: cfg.allowlist.address,
        wireguard_port: bulkhead_e2e::standalone::PORT,
        controllers: &[],
        nflog_group: bulkhead_hostfw::DEFAULT_NFLOG_GROUP,
    };
    let want =
        bulkhead_hostfw::render::render(&bulkhead_hostfw::firewall(&underlay, &host).unwrap());
    let installed = Lab::until(Duration::from_secs(10), || {
        listed(&o.lab, "a", "bulkhead").is_some()
    });
    assert!(installed, "{}", o.lab.log("a", "bulkheadd"));
    assert_eq!(listed(&o.lab, "a", "bulkhead").unwrap(), want);
    assert_eq!(
        listed(&o.lab, "a", "bulkhead-overlay").unwrap(),
        bulkhead_hostfw::render::render(&bulkhead_hostfw::guard(&host))
    );

    // What it says: in, only WireGuard and the allow entry; out to b, only the allow entry.
    assert!(
        !underlay_connect(&o.lab, "b", &a_u, 5432),
        "inbound dropped"
    );
    assert!(
        underlay_connect(&o.lab, "b", &a_u, 22),
        "inbound allow entry"
    );
    assert!(
        !underlay_connect(&o.lab, "a", &b_u, 5432),
        "outbound to a server dropped"
    );
    assert!(
        underlay_connect(&o.lab, "a", &b_u, 8080),
        "outbound allow entry"
    );
    // The overlay still works: b may reach a's 5432 through its tunnel.
    assert!(
        o.connect_eventually("b", "a", 5432),
        "{}",
        o.lab.log("a", "bulkheadd")
    );

    // kill -9: the firewall table stays (the guard goes with the daemon and its interface).
    o.lab.signal("a", "bulkheadd", "KILL");
    let _ = o.lab.wait("a", "bulkheadd", Duration::from_secs(5));
    assert_eq!(
        listed(&o.lab, "a", "bulkhead").as_deref(),
        Some(want.as_str())
    );
    assert!(listed(&o.lab, "a", "bulkhead-overlay").is_none());
    assert!(
        !underlay_connect(&o.lab, "b", &a_u, 5432),
        "still dropped without the daemon"
    );

    // `bulkheadd firewall off` removes it, and the underlay is open again.
    let off = o.lab.exec(
        "a",
        &[&bin("bulkheadd").display().to_string(), "firewall", "off"],
    );
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    assert!(listed(&o.lab, "a", "bulkhead").is_none());
    assert!(underlay_connect(&o.lab, "b", &a_u, 5432));
}
