//! Propagation benchmark: how long from `bulkhead policy apply` and from `bulkhead revoke`
//! until the affected flow is cut on the nodes, with real binaries in network namespaces.
//!
//! A flow web-1 → api-1:9000 exchanges a line every 20 ms; the time is from just before the CLI
//! command starts (its process start, TLS, plan and apply included) to the first exchange that
//! failed. Needs root; build the binaries first.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! BH_RUNS=10 cargo bench -p bulkhead-e2e --bench propagation
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::Duration;

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

fn main() {
    if std::env::args().any(|a| a == "--list") || !netns_ok() {
        return;
    }
    let runs: usize = std::env::var("BH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
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
    for k in 0..runs {
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
    summary("policy apply -> flow cut", apply);

    let mut revoke = Vec::new();
    let mut label_n = 0;
    for k in 0..runs {
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
    summary("revoke -> flow cut", revoke);
}
