//! The durable flow history (spec §9) with the real binaries in network namespaces: flows between
//! real daemons come back from `bulkhead flows --since` as per-hour aggregates, each connection
//! counted once; a `kill -9` of the controller loses none of what it had written; a flood of
//! distinct flows stays within `--flow-history-max-rows`, and what it could not keep is counted.
//!
//! Needs root, `ip netns` and `/dev/net/tun` (`scripts/test.sh` installs the tools).

use std::time::Duration;

use bulkhead_e2e::cluster::{CTL, Cluster, unix_ms, web_db_policy};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::scrape::scrape;
use bulkhead_e2e::{bin, netns_ok};

const RULES: &str = "rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
  - { name: warm-up, from: [web], to: [db], ports: [tcp/5433] }
";

/// The bound the controller restarts with, for the flood.
const BOUND: usize = 3000;
/// The new aggregates one node may add in an hour, for the flood: more than the bound, as the
/// nodes of a fleet flooding together would add.
const SHARE: usize = 4000;

/// `bulkhead flows --since 1h -o json`.
fn history(c: &Cluster) -> Vec<serde_json::Value> {
    let r = c.cli(&["flows", "--since", "1h", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    r.json().as_array().cloned().unwrap_or_default()
}

/// The aggregates from `src` to `dst` on tcp/`port` with `verdict`: (hour, count) each.
fn of(h: &[serde_json::Value], dst: &str, port: u16, verdict: &str) -> Vec<(i64, u64)> {
    h.iter()
        .filter(|a| {
            a["src"] == "web-1" && a["dst"] == dst && a["port"] == port && a["verdict"] == verdict
        })
        .map(|a| {
            (
                a["hour"].as_i64().unwrap_or(-1),
                a["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(&c.lab, "ctl", &format!("http://{CTL}:9464/metrics")).count(name, labels)
}

#[test]
fn the_flow_history_survives_kill_9_and_keeps_to_its_bound() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let policy = c
        .files
        .write("policy.yaml", &web_db_policy("hist", "10.96.0.0/24", RULES));
    let metrics = format!("{CTL}:9464");
    c.start_controller("controller", &policy, &["--metrics", &metrics]);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    c.start_daemon("web-1", "bulkheadd", Some(&tw));
    c.start_daemon("db-1", "bulkheadd", Some(&td));
    c.converge(&["web-1", "db-1"]);
    let probe = bin("bh-probe").display().to_string();
    c.lab
        .spawn("db-1", "listen", &[&probe, "listen", "5432,5433", "120"]);
    // The first handshake on another port, so that every connection below is one attempt.
    assert!(c.connect_eventually("web-1", "db-1", 5433), "{}", c.logs());
    for i in 0..5 {
        assert!(c.connect("web-1", "db-1", 5432), "connection {i}");
    }
    for _ in 0..3 {
        assert!(!c.connect("web-1", "db-1", 22), "no rule for tcp/22");
    }

    // Five connections counted once each (web-1 reports them too), three refused attempts.
    let want = |h: &[serde_json::Value]| {
        let (allowed, denied) = (of(h, "db-1", 5432, "allow"), of(h, "db-1", 22, "deny"));
        let total = |v: &[(i64, u64)]| v.iter().map(|(_, n)| n).sum::<u64>();
        (total(&allowed), total(&denied))
    };
    let seen = Lab::until(Duration::from_secs(10), || want(&history(&c)) == (5, 3));
    let before = history(&c);
    assert!(seen, "{:#?}\n{}", before, c.logs());
    let a = before
        .iter()
        .find(|a| a["port"] == 5432)
        .expect("the allowed aggregate");
    assert_eq!(a["rule"], "web-to-db");
    assert_eq!(a["dst_address"], c.addresses["db-1"].as_str());
    assert!(a["first"].as_i64() <= a["last"].as_i64(), "{a}");
    let table = c.cli(&["flows", "--since", "1h"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    let head = table.stdout.lines().next().unwrap_or_default();
    for col in [
        "HOUR", "FROM", "TO", "PORT", "PATH", "VERDICT", "RULE", "COUNT",
    ] {
        assert!(head.contains(col), "{head}");
    }
    assert!(table.stdout.contains("tcp/5432"), "{}", table.stdout);
    let bad = c.cli(&["flows", "--since", "7x"]);
    assert_eq!(bad.code, Some(2), "a bad duration is a usage error");
    assert!(bad.stderr.contains("bad duration"), "{}", bad.stderr);

    // kill -9, more than a second after the flows came in: they were written.
    std::thread::sleep(Duration::from_millis(1500));
    c.lab.signal("ctl", "controller", "KILL");
    assert!(
        c.lab
            .wait("ctl", "controller", Duration::from_secs(5))
            .is_some()
    );
    let bound = BOUND.to_string();
    c.start_controller(
        "controller-2",
        &policy,
        &[
            "--metrics",
            &metrics,
            "--flow-history-max-rows",
            &bound,
            "--flow-history-node-rows",
            &SHARE.to_string(),
        ],
    );
    let after = history(&c);
    assert_eq!(want(&after), (5, 3), "{after:#?}");
    assert_eq!(after, before, "the history as it was before the kill");

    // A flood of distinct flows: web-1's own refused attempts (a node may name any address
    // there), 10,000 kinds in two batches, more than three times the bound.
    let now = unix_ms() as i64;
    let flood = |net: u8| {
        let flows: Vec<serde_json::Value> = (0..5000u16)
            .map(|i| {
                serde_json::json!({
                    "at": now, "outbound": true, "peer_address": format!("198.51.100.{net}"),
                    "proto": "tcp", "port": 10_000 + i, "allowed": false, "reason": "not_allowed"
                })
            })
            .collect();
        serde_json::json!({ "flows": flows, "dropped": 0 })
    };
    c.converge(&["web-1", "db-1"]);
    assert_eq!(c.post_flows_as("web-1", &flood(1)), 200);
    assert_eq!(c.post_flows_as("web-1", &flood(2)), 200);
    let full = || {
        metric(
            &c,
            "bulkhead_flow_history_dropped_total",
            &[("reason", "full")],
        )
    };
    assert!(
        Lab::until(Duration::from_secs(10), || full() > 0.0),
        "{}",
        c.lab.log("ctl", "controller-2")
    );
    std::thread::sleep(Duration::from_millis(1500));
    let h = history(&c);
    assert_eq!(h.len(), BOUND, "the history holds its bound, no more");
    let flooded = h
        .iter()
        .filter(|a| {
            a["dst"]
                .as_str()
                .is_some_and(|d| d.starts_with("198.51.100."))
        })
        .count();
    // What did not fit is counted; what was there before the flood stays, unless its hour is
    // over (then it is the oldest, and goes first).
    // Past its share web-1's new kinds are refused (1,000 of each batch; both batches, if
    // the hour turned between them), past the bound the file's.
    let share = metric(
        &c,
        "bulkhead_flow_history_dropped_total",
        &[("reason", "node_share")],
    ) as usize;
    assert!(
        share == 10_000 - SHARE || share == 2 * (5000 - SHARE),
        "{share}"
    );
    assert_eq!(
        full() as usize + share,
        10_000 - flooded,
        "refused and counted"
    );
    let hour = now.div_euclid(3_600_000) * 3600;
    let kept: Vec<serde_json::Value> = before
        .iter()
        .filter(|a| a["hour"] == hour)
        .cloned()
        .collect();
    assert_eq!(flooded, BOUND - kept.len());
    assert_eq!(
        want(&h),
        want(&kept),
        "the aggregates of this hour from before stay"
    );
    assert_eq!(
        metric(
            &c,
            "bulkhead_flow_history_dropped_total",
            &[("reason", "bound")]
        ) as usize,
        before.len() - kept.len(),
        "older hours went first"
    );
    assert_eq!(
        metric(&c, "bulkhead_flow_history_aggregates", &[]) as usize,
        BOUND
    );
    // A node's real flows still count, in the aggregates that exist.
    assert!(c.connect("web-1", "db-1", 5432));
    if kept.iter().any(|a| a["port"] == 5432) && unix_ms() as i64 / 3_600_000 * 3600 == hour {
        let more = Lab::until(Duration::from_secs(10), || want(&history(&c)).0 == 6);
        assert!(more, "{:?}", of(&history(&c), "db-1", 5432, "allow"));
    }
}
