//! Propagation benchmark: how long from `bulkhead policy apply` and from `bulkhead revoke`
//! until the affected flow is cut on the nodes, and from `bulkhead policy apply` of a new
//! `underlay` mode until every node's host firewall table has it, with real binaries in network
//! namespaces.
//!
//! A flow web-1 → api-1:9000 exchanges a line every 20 ms; the time is from just before the CLI
//! command starts (its process start, TLS, plan and apply included) to the first exchange that
//! failed. For the underlay, the time is from the same start to the end of the first
//! `nft list table inet bulkhead` on each node that showed the new mode (every node is polled in
//! turn, 5 ms apart), the slowest node's. Needs root; build the binaries first.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! BH_RUNS=10 cargo bench -p bulkhead-e2e --bench propagation
//! BH_ONLY=underlay cargo bench -p bulkhead-e2e --bench propagation   # or apply, revoke
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use bulkhead_e2e::cluster::{Cluster, unix_ms};
use bulkhead_e2e::{bin, netns_ok};

const NODES: [&str; 3] = ["web-1", "api-1", "db-1"];

const OPEN: &str = "version: 1
network: { name: bench, cidr: 10.201.0.0/16 }
identities:
  web-1: { labels: { tier: web } }
  api-1: { labels: { tier: api } }
  db-1: { labels: { tier: db } }
segments:
  web: { match: { tier: web } }
  api: { match: { tier: api } }
  db: { match: { tier: db } }
rules:
  - { name: web-to-api, from: [web], to: [api], ports: [tcp/9000] }
  - { name: api-to-db, from: [api], to: [db], ports: [tcp/5432] }
";

fn summary(name: &str, mut v: Vec<u128>) {
    v.sort();
    println!(
        "{name}: {} runs, median {} ms, worst {} ms, all {:?}",
        v.len(),
        v[v.len() / 2],
        v[v.len() - 1],
        v
    );
}

/// The last rule of the firewall table in each mode.
const ENFORCING: &str = "drop comment \"default deny\"";
const OBSERVING: &str = "comment \"would deny\"";

/// Whether `node`'s firewall table holds `needle`.
fn table_has(c: &Cluster, node: &str, needle: &str) -> bool {
    let o = c
        .lab
        .exec(node, &["nft", "list", "table", "inet", "bulkhead"]);
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains(needle)
}

/// Applies `policy` and returns how long from just before the CLI starts until the slowest
/// node's table held `needle`, as polled while the CLI runs; `None` if not within 10 s.
fn apply_until_tables(c: &Cluster, policy: &str, needle: &str) -> Option<u128> {
    let t0 = Instant::now();
    thread::scope(|s| {
        let poll = s.spawn(|| {
            let mut pending: Vec<&str> = NODES.to_vec();
            let mut slowest = 0;
            while !pending.is_empty() && t0.elapsed() < Duration::from_secs(10) {
                pending.retain(|n| {
                    let there = table_has(c, n, needle);
                    if there {
                        slowest = t0.elapsed().as_millis();
                    }
                    !there
                });
                thread::sleep(Duration::from_millis(5));
            }
            pending.is_empty().then_some(slowest)
        });
        let r = c.cli(&["policy", "apply", "--yes", policy]);
        assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
        poll.join().expect("poller")
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !netns_ok() {
        return;
    }
    let runs: usize = std::env::var("BH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // Which parts to run: `apply`, `revoke`, `underlay`, comma-separated; all by default.
    let only = std::env::var("BH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    let mut c = Cluster::new(&NODES);
    let open = c.files.write("open.yaml", OPEN);
    let closed = c.files.write(
        "closed.yaml",
        &OPEN.replace(
            "  - { name: web-to-api, from: [web], to: [api], ports: [tcp/9000] }\n",
            "",
        ),
    );
    c.start_controller("controller", &open, &[]);
    for n in NODES {
        let t = c.token(n);
        c.start_daemon(n, "bulkheadd", Some(&t));
        let probe = bin("bh-probe").display().to_string();
        c.lab
            .spawn(n, "listen", &[&probe, "listen", "9000,5432", "3600"]);
    }
    c.converge(&NODES);

    let mut apply = Vec::new();
    for k in (0..runs).filter(|_| part("apply")) {
        assert!(c.connect_eventually("web-1", "api-1", 9000), "{}", c.logs());
        let label = format!("hold-apply-{k}");
        c.hold("web-1", "api-1", 9000, 10, &label);
        thread::sleep(Duration::from_millis(500));
        let t0 = unix_ms();
        assert_eq!(c.cli(&["policy", "apply", "--yes", &closed]).code, Some(0));
        let cut = c.held("web-1", &label).expect_err("flow must be cut");
        apply.push(cut.saturating_sub(t0));
        assert_eq!(c.cli(&["policy", "apply", "--yes", &open]).code, Some(0));
        c.converge(&NODES);
    }
    if part("apply") {
        summary("policy apply -> flow cut", apply);
    }

    let mut revoke = Vec::new();
    let mut label_n = 0;
    for k in (0..runs).filter(|_| part("revoke")) {
        assert!(c.connect_eventually("web-1", "api-1", 9000), "{}", c.logs());
        let label = format!("hold-revoke-{k}");
        c.hold("web-1", "api-1", 9000, 10, &label);
        thread::sleep(Duration::from_millis(500));
        let t0 = unix_ms();
        assert_eq!(c.cli(&["revoke", "api-1"]).code, Some(0));
        let cut = c.held("web-1", &label).expect_err("flow must be cut");
        revoke.push(cut.saturating_sub(t0));
        // Bring api-1 back with a new token.
        let old = c.daemons["api-1"].clone();
        c.lab.signal("api-1", &old, "TERM");
        c.lab.wait("api-1", &old, Duration::from_secs(10));
        let state = std::path::PathBuf::from(c.state("api-1"));
        let _ = std::fs::remove_file(state.join("enrollment.json"));
        let _ = std::fs::remove_file(state.join("config.json"));
        label_n += 1;
        let t = c.token("api-1");
        c.start_daemon("api-1", &format!("bulkheadd-{label_n}"), Some(&t));
        c.converge(&NODES);
    }
    if part("revoke") {
        summary("revoke -> flow cut", revoke);
    }

    if part("underlay") {
        // The same policy with an `underlay` block, its mode going observe -> enforce -> observe.
        let mode = |m: &str| format!("{OPEN}underlay:\n  mode: {m}\n");
        let observe = c.files.write("observe.yaml", &mode("observe"));
        let enforce = c.files.write("enforce.yaml", &mode("enforce"));
        apply_until_tables(&c, &observe, OBSERVING).expect("observing tables");
        let (mut enforced, mut observed) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            c.converge(&NODES);
            let ms = apply_until_tables(&c, &enforce, ENFORCING);
            enforced.push(ms.unwrap_or_else(|| panic!("no enforcing tables\n{}", c.logs())));
            c.converge(&NODES);
            let ms = apply_until_tables(&c, &observe, OBSERVING);
            observed.push(ms.unwrap_or_else(|| panic!("no observing tables\n{}", c.logs())));
        }
        summary("underlay policy apply -> every table enforce", enforced);
        summary("underlay policy apply -> every table observe", observed);
    }
}
