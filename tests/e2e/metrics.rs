//! Prometheus metrics of the real daemon and controller in namespaces, scraped over the underlay
//! as Prometheus would and parsed by the Prometheus project's own Python parser: the families
//! follow the naming conventions, the counters move with the traffic (the denied counter rises
//! after denied traffic), and the controller counts nodes, pushes, propagation, posture
//! failures and quarantines. Then a flood of denied flows: the flow logs and the daemon's
//! memory stay bounded and the drops are counted.

use std::time::Duration;

use bulkhead_e2e::cluster::{CTL, Cluster, web_db_policy};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::scrape::{Scrape, scrape};
use bulkhead_e2e::{bin, netns_ok, run};

const RULES: &str = "posture:
  edr:
    check.edr-running: true
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
  - { name: no-db-telnet, action: deny, from: [web], to: [db], ports: [tcp/23] }
  - { name: db-to-web, from: [db], to: [web], ports: [tcp/8080], posture: [edr] }
";

/// The controller's metrics port, on its underlay address.
const CTL_METRICS_PORT: u16 = 9464;

fn ctl_metrics() -> String {
    format!("{CTL}:{CTL_METRICS_PORT}")
}

/// Scrapes a daemon from the controller's namespace.
fn node(c: &Cluster, name: &str) -> Scrape {
    let url = format!("http://{}:9101/metrics", c.lab.host(name).underlay);
    scrape(&c.lab, "ctl", &url)
}

fn controller(c: &Cluster) -> Scrape {
    scrape(&c.lab, "ctl", &format!("http://{}/metrics", ctl_metrics()))
}

/// Starts the controller (with `ctl_args`) and both daemons with `--metrics`; web-1 passes its
/// `edr-running` check, db-1 has none.
fn start(c: &mut Cluster, rules: &str, ctl_args: &[&str]) {
    let policy = c
        .files
        .write("policy.yaml", &web_db_policy("m", "10.209.0.0/16", rules));
    let config = c.files.write(
        "bulkheadd.yaml",
        "posture_checks:\n  edr-running: { command: [\"true\"], interval: 2s }\n",
    );
    let at = ctl_metrics();
    let mut args = vec!["--metrics", at.as_str()];
    args.extend_from_slice(ctl_args);
    c.start_controller("controller", &policy, &args);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    let (mw, md) = (
        format!("{}:9101", c.lab.host("web-1").underlay),
        format!("{}:9101", c.lab.host("db-1").underlay),
    );
    c.start_daemon_with(
        "web-1",
        "bulkheadd",
        Some(&tw),
        &["--config", &config, "--metrics", &mw],
    );
    c.start_daemon_with("db-1", "bulkheadd", Some(&td), &["--metrics", &md]);
    c.converge(&["web-1", "db-1"]);
    let probe = bin("bh-probe").display().to_string();
    c.lab
        .spawn("db-1", "listen", &[&probe, "listen", "5432,23", "120"]);
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happens() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    start(&mut c, RULES, &[]);

    let before = node(&c, "web-1");
    before.assert_conventions();
    let not_allowed = [("direction", "egress"), ("reason", "not_allowed")];
    let denied0 = before.count("bulkhead_packets_dropped_total", &not_allowed);

    // Allowed, not allowed, denied by a rule.
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());
    assert!(!c.connect("web-1", "db-1", 6379));
    assert!(!c.connect("web-1", "db-1", 23));

    let web = node(&c, "web-1");
    web.assert_conventions();
    let db_peer = [("peer", "db-1")];
    let denied1 = web.count("bulkhead_packets_dropped_total", &not_allowed);
    assert!(
        denied1 > denied0,
        "the denied counter rises after denied traffic: {denied0} -> {denied1}"
    );
    assert!(
        web.count(
            "bulkhead_packets_denied_by_rule_total",
            &[("rule", "no-db-telnet")]
        ) >= 1.0
    );
    assert!(
        web.count(
            "bulkhead_packets_dropped_total",
            &[("direction", "egress"), ("reason", "denied_by_rule")]
        ) >= 1.0
    );
    assert!(web.count("bulkhead_peer_sent_packets_total", &db_peer) >= 3.0);
    assert!(web.count("bulkhead_peer_sent_bytes_total", &db_peer) >= 3.0 * 40.0);
    assert!(web.count("bulkhead_peer_received_packets_total", &db_peer) >= 2.0);
    assert!(web.count("bulkhead_peer_handshakes_total", &db_peer) >= 1.0);
    let now = bulkhead_e2e::cluster::unix_ms() as f64 / 1000.0;
    let hs = web
        .get("bulkhead_peer_last_handshake_timestamp_seconds", &db_peer)
        .expect("a handshake happened");
    assert!((now - 120.0..=now + 1.0).contains(&hs), "{hs} vs {now}");
    assert!(web.count("bulkhead_flows_started_total", &[]) >= 1.0);
    assert_eq!(web.get("bulkhead_peers", &[]), Some(1.0));
    assert!(web.get("bulkhead_flows_tracked", &[]).is_some());
    assert_eq!(web.get("bulkhead_flows_capacity", &[]), Some(65536.0));
    assert!(web.get("process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1e6);

    // The other end counts what came through its tunnel, and nothing denied reached it.
    let db = node(&c, "db-1");
    db.assert_conventions();
    assert!(db.count("bulkhead_peer_received_packets_total", &[("peer", "web-1")]) >= 3.0);
    assert_eq!(
        db.count(
            "bulkhead_packets_denied_by_rule_total",
            &[("rule", "no-db-telnet")]
        ),
        0.0
    );

    // The controller.
    let ctl = controller(&c);
    ctl.assert_conventions();
    let revision = ctl.get("bulkhead_policy_revision", &[]).expect("revision");
    assert_eq!(web.get("bulkhead_allowlist_revision", &[]), Some(revision));
    assert_eq!(ctl.get("bulkhead_nodes_enrolled", &[]), Some(2.0));
    assert_eq!(ctl.get("bulkhead_nodes_online", &[]), Some(2.0));
    assert_eq!(ctl.get("bulkhead_nodes_in_sync", &[]), Some(2.0));
    assert_eq!(ctl.get("bulkhead_node_streams", &[]), Some(2.0));
    assert!(ctl.count("bulkhead_pushes_total", &[]) >= 2.0);
    assert_eq!(
        ctl.get("bulkhead_posture_failing_identities", &[("check", "edr")]),
        Some(1.0),
        "db-1 runs no edr check"
    );
    assert_eq!(ctl.get("bulkhead_quarantined_identities", &[]), Some(0.0));
    assert_eq!(
        ctl.families
            .get("bulkhead_propagation_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    let timed0 = ctl.count("bulkhead_propagation_seconds_count", &[]);
    assert!(
        timed0 >= 2.0,
        "both nodes' first allowlist was timed: {timed0}"
    );

    // A new revision for both nodes is timed once per node.
    let wider = c.files.write(
        "wider.yaml",
        &web_db_policy(
            "m",
            "10.209.0.0/16",
            &RULES.replace("tcp/5432]", "tcp/5432, tcp/5433]"),
        ),
    );
    let r = c.cli(&["policy", "apply", "--yes", &wider]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let timed = Lab::until(Duration::from_secs(10), || {
        controller(&c).count("bulkhead_propagation_seconds_count", &[]) >= timed0 + 2.0
    });
    assert!(timed, "{:?}", controller(&c).samples);
    let ctl = controller(&c);
    assert_eq!(
        ctl.get("bulkhead_policy_revision", &[]),
        Some(revision + 1.0)
    );
    // Buckets are cumulative and end in +Inf = count.
    let buckets: Vec<f64> = ctl
        .samples
        .iter()
        .filter(|s| s.0 == "bulkhead_propagation_seconds_bucket")
        .map(|s| s.2)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(
        buckets.last().copied(),
        ctl.get("bulkhead_propagation_seconds_count", &[])
    );
    let le1 = ctl.count("bulkhead_propagation_seconds_bucket", &[("le", "1")]);
    eprintln!(
        "propagation: {} timed, {le1} within 1 s, sum {:.3} s",
        ctl.count("bulkhead_propagation_seconds_count", &[]),
        ctl.count("bulkhead_propagation_seconds_sum", &[])
    );

    // A quarantine by hand is counted, and the gauge follows it. It changes both allowlists
    // under the same policy revision: each node's new allowlist is timed too (by digest), and
    // both are in sync again once they report it.
    let timed1 = ctl.count("bulkhead_propagation_seconds_count", &[]);
    let r = c.cli(&["quarantine", "web-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let ctl = controller(&c);
    assert_eq!(
        ctl.get("bulkhead_quarantines_total", &[("origin", "manual")]),
        Some(1.0)
    );
    assert_eq!(ctl.get("bulkhead_quarantined_identities", &[]), Some(1.0));
    let synced = Lab::until(Duration::from_secs(10), || {
        let ctl = controller(&c);
        ctl.count("bulkhead_propagation_seconds_count", &[]) >= timed1 + 2.0
            && ctl.get("bulkhead_nodes_in_sync", &[]) == Some(2.0)
    });
    assert!(synced, "{:?}", controller(&c).samples);
    assert_eq!(
        controller(&c).get("bulkhead_policy_revision", &[]),
        Some(revision + 1.0)
    );
}

/// Distinct denied flows the flood sends: three times the daemon's flow-log buffer.
const FLOOD: u64 = 30_000;
/// The controller's flow history in the flood test.
const HISTORY: usize = 5_000;

#[test]
fn a_flood_of_denied_flows_keeps_the_flow_logs_bounded_and_counts_drops() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    start(&mut c, RULES, &["--flow-history", &HISTORY.to_string()]);
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());
    let before = node(&c, "web-1");
    let rss0 = before.count("process_resident_memory_bytes", &[]);

    // 30,000 UDP datagrams to 30,000 ports no rule allows, from one socket: each a new flow.
    // Paced at 6,000 a second, so that they reach the daemon (a burst would overflow the TUN
    // queue in the kernel instead) faster than it ships entries (2,000 a second).
    let probe = bin("bh-probe").display().to_string();
    let db = c.addresses["db-1"].clone();
    let out: bulkhead_e2e::Run = c
        .lab
        .exec(
            "web-1",
            &[&probe, "flood", &db, &FLOOD.to_string(), "10", "6000"],
        )
        .into();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eprintln!("flood: {}", out.stdout.trim());

    // The daemon: its buffer never exceeds 10,000 entries, the rest are counted as dropped.
    let flooded = Lab::until(Duration::from_secs(10), || {
        node(&c, "web-1").count("bulkhead_flow_log_dropped_total", &[]) > 0.0
    });
    let web = node(&c, "web-1");
    assert!(flooded, "the flow log dropped nothing: {:?}", web.samples);
    web.assert_conventions();
    let denied = web.count(
        "bulkhead_packets_dropped_total",
        &[("direction", "egress"), ("reason", "not_allowed")],
    );
    let dropped = web.count("bulkhead_flow_log_dropped_total", &[]);
    let waiting = web.count("bulkhead_flow_log_entries", &[]);
    assert!(waiting <= 10_000.0, "{waiting}");
    assert!(
        denied >= 10_000.0,
        "most of the flood reached the filter: {denied}"
    );
    let rss1 = web.count("process_resident_memory_bytes", &[]);
    eprintln!(
        "daemon: {denied} denied, {dropped} flow-log entries dropped, {waiting} waiting; RSS {:.1} -> {:.1} MiB",
        rss0 / 1048576.0,
        rss1 / 1048576.0
    );
    assert!(
        rss1 - rss0 < 32.0 * 1048576.0,
        "the daemon's memory stays bounded: {rss0} -> {rss1}"
    );

    // The controller: told of the drops, its history capped at --flow-history.
    let told = Lab::until(Duration::from_secs(15), || {
        let ctl = controller(&c);
        ctl.count("bulkhead_flow_log_node_dropped_total", &[]) > 0.0
            && ctl.count("bulkhead_flow_history_entries", &[]) >= HISTORY as f64
    });
    let ctl = controller(&c);
    assert!(told, "{:?}", ctl.samples);
    assert_eq!(
        ctl.get("bulkhead_flow_history_entries", &[]),
        Some(HISTORY as f64)
    );
    let r = c.cli(&["flows", "--denied", "--limit", "100000", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let shown = r.json().as_array().map_or(0, Vec::len);
    assert!(shown <= HISTORY && shown > 0, "{shown}");
    eprintln!(
        "controller: history {shown} of {HISTORY}, nodes reported {} dropped",
        ctl.count("bulkhead_flow_log_node_dropped_total", &[])
    );

    // Still working: the allowed flow passes, nobody was quarantined (no quarantine block).
    assert!(c.connect("web-1", "db-1", 5432), "{}", c.logs());
    assert_eq!(ctl.get("bulkhead_quarantined_identities", &[]), Some(0.0));
}

/// A `--metrics` address that cannot be bound stops the start with a clear error.
#[test]
fn an_unusable_metrics_address_is_refused_at_start() {
    let dir = bulkhead_e2e::TempDir::new("metrics-bind");
    let state = dir.path().display().to_string();
    // 192.0.2.1 (TEST-NET-1) is no local address: binding it fails, nothing is sent.
    let r = run(
        "bulkhead-controller",
        &[
            "--listen",
            "127.0.0.1:0",
            "--state",
            &state,
            "--metrics",
            "192.0.2.1:9464",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--metrics: cannot listen on 192.0.2.1:9464"),
        "{}",
        r.stderr
    );
}
