//! Zero-trust conditions with real binaries in namespaces: a node-local posture check that
//! flips when its marker file goes away and comes back, and the rule that needs it stopping and
//! restarting; `bulkhead nodes` saying which check failed and why.
//!
//! The times it prints (marker removed → flow cut, marker back → connect passes) are for the
//! notes; it asserts a generous bound (twice the guarantee of one check interval plus 1 s), so
//! that a noisy machine does not fail it, and benchmarks measure speed.

use std::thread;
use std::time::Duration;

use bulkhead_e2e::cluster::{Cluster, unix_ms, web_db_policy};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::{bin, netns_ok};

const POSTURE_RULES: &str = "posture:
  edr:
    check.edr-running: true
  modern:
    kernel.release: '>= 3.0'
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432], posture: [edr, modern] }
  - { name: db-to-web, from: [db], to: [web], ports: [tcp/8080] }
";

/// The check's interval, in seconds.
const INTERVAL: u64 = 2;

/// Starts the controller on `policy`, enrolls web-1 (run with `web_args`) and db-1, waits until
/// both enforce their allowlists, and starts listeners: db-1 on 5432, web-1 on `web_port`.
/// Returns the probe program's path.
fn start_pair(c: &mut Cluster, policy: &str, web_args: &[&str], web_port: &str) -> String {
    c.start_controller("controller", policy, &[]);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    c.start_daemon_with("web-1", "bulkheadd", Some(&tw), web_args);
    c.start_daemon("db-1", "bulkheadd", Some(&td));
    c.converge(&["web-1", "db-1"]);
    let probe = bin("bh-probe").display().to_string();
    c.lab
        .spawn("db-1", "listen", &[&probe, "listen", "5432", "120"]);
    c.lab
        .spawn("web-1", "listen", &[&probe, "listen", web_port, "120"]);
    thread::sleep(Duration::from_millis(300));
    probe
}

fn posture_of(c: &Cluster, identity: &str) -> serde_json::Value {
    c.nodes()
        .into_iter()
        .find(|n| n["identity"] == identity)
        .map(|n| n["posture"].clone())
        .unwrap_or_default()
}

#[test]
fn a_posture_check_flipping_stops_and_restarts_the_rule() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let policy = c.files.write(
        "policy.yaml",
        &web_db_policy("cond", "10.201.0.0/16", POSTURE_RULES),
    );
    let marker = c.files.write("edr-running", "");
    let config = c.files.write(
        "bulkheadd.yaml",
        &format!(
            "posture_checks:\n  edr-running: {{ command: [test, -e, {marker}], interval: {INTERVAL}s }}\n"
        ),
    );
    start_pair(&mut c, &policy, &["--config", &config], "8080");

    // Passing: the rule holds, and `nodes` says both checks pass.
    assert!(
        Lab::until(Duration::from_secs(10), || c.connect("web-1", "db-1", 5432)),
        "web-1 -> db-1:5432 must pass while web-1 passes its checks\n{:#?}\n{}\n{}\n{}",
        posture_of(&c, "web-1"),
        std::fs::read_to_string(format!("{}/config.json", c.state("web-1"))).unwrap_or_default(),
        std::fs::read_to_string(format!("{}/config.json", c.state("db-1"))).unwrap_or_default(),
        c.logs()
    );
    let p = posture_of(&c, "web-1");
    assert_eq!(
        p,
        serde_json::json!([{"check": "edr", "pass": true}, {"check": "modern", "pass": true}]),
        "{p}"
    );
    // db-1 initiates no rule with posture: it is shown no checks.
    assert_eq!(posture_of(&c, "db-1"), serde_json::json!([]));

    // The marker goes: the held flow is cut, new connections fail, db-1's rule is untouched.
    c.hold("web-1", "db-1", 5432, 12, "hold-edr");
    thread::sleep(Duration::from_millis(1000));
    let t0 = unix_ms();
    std::fs::remove_file(&marker).unwrap();
    let broke = c
        .held("web-1", "hold-edr")
        .expect_err("the flow that needs the check must be cut");
    let cut = broke.saturating_sub(t0);
    eprintln!("check fails -> flow cut: {cut} ms (interval {INTERVAL} s)");
    assert!(
        cut <= u128::from(2 * (INTERVAL * 1000 + 1000)),
        "cut after {cut} ms\n{}",
        c.logs()
    );
    assert!(!c.connect("web-1", "db-1", 5432));
    assert!(
        c.connect_eventually("db-1", "web-1", 8080),
        "a rule without posture stays"
    );
    let p = posture_of(&c, "web-1");
    assert_eq!(p[0]["check"], "edr");
    assert_eq!(p[0]["pass"], false);
    assert_eq!(
        p[0]["reason"], "check.edr-running is false",
        "the reason names the fact: {p}"
    );
    assert_eq!(p[1]["pass"], true, "{p}");
    let table = c.cli(&["nodes"]);
    assert!(
        table.stdout.contains("check.edr-running is false"),
        "{}",
        table.stdout
    );

    // The marker returns: the rule is back.
    std::fs::write(&marker, "").unwrap();
    let t1 = unix_ms();
    assert!(
        Lab::until(Duration::from_secs(10), || c.connect("web-1", "db-1", 5432)),
        "the rule must come back with the check\n{}",
        c.logs()
    );
    eprintln!(
        "check passes again -> connect passes: {} ms",
        unix_ms().saturating_sub(t1)
    );
    // Passing facts stay fresh: a flow held for more than three check intervals is not cut.
    c.hold("web-1", "db-1", 5432, 4 * INTERVAL, "hold-steady");
    assert_eq!(
        c.held("web-1", "hold-steady"),
        Ok(()),
        "facts reported in time never go stale\n{}",
        c.logs()
    );
}

/// RFC 3339 UTC for a Unix time in seconds.
fn rfc3339(unix: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn expiring_policy(expires: u64) -> String {
    let rules = format!(
        "rules:
  - {{ name: temp-access, from: [web], to: [db], ports: [tcp/5432], expires: {} }}
  - {{ name: db-to-web, from: [db], to: [web], ports: [tcp/8080] }}
",
        rfc3339(expires)
    );
    web_db_policy("exp", "10.202.0.0/16", &rules)
}

/// Holds web-1 → db-1:5432 across `expires` and returns how long after it the flow broke (ms).
fn cut_after_expiry(c: &mut Cluster, expires: u64, label: &str) -> i128 {
    let secs = expires.saturating_sub(unix_ms() as u64 / 1000) + 4;
    c.hold("web-1", "db-1", 5432, secs, label);
    let broke = c
        .held("web-1", label)
        .expect_err("an expired rule's flow must be cut");
    broke as i128 - i128::from(expires) * 1000
}

#[test]
fn an_expiring_rule_is_cut_on_time_with_or_without_the_controller() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let now = || unix_ms() as u64 / 1000;
    let first = now() + 10;
    let policy = c.files.write("policy.yaml", &expiring_policy(first));
    start_pair(&mut c, &policy, &[], "8080");
    assert!(
        Lab::until(Duration::from_secs(5), || c.connect("web-1", "db-1", 5432)),
        "the rule holds before it expires\n{}",
        c.logs()
    );

    // Upcoming expiries are shown: the policy's, and each node's.
    let show = c.cli(&["policy", "show", "-o", "json"]);
    assert_eq!(
        show.json()["upcoming"],
        serde_json::json!([{"rule": "temp-access", "event": "expires", "at": first}]),
        "{}",
        show.stdout
    );
    let text = c.cli(&["policy", "show"]).stdout;
    assert!(
        text.contains("# upcoming: rule temp-access expires at"),
        "{text}"
    );
    for n in c.nodes() {
        assert_eq!(n["upcoming"][0]["rule"], "temp-access", "{n}");
    }

    // With the controller running.
    let late = cut_after_expiry(&mut c, first, "hold-1");
    eprintln!("expiry -> cut, controller up: {late} ms");
    assert!(late <= 1000, "cut {late} ms after the expiry\n{}", c.logs());
    assert!(!c.connect("web-1", "db-1", 5432));
    assert!(
        c.connect_eventually("db-1", "web-1", 8080),
        "other rules stay"
    );
    let show = c.cli(&["nodes", "-o", "json"]);
    assert_eq!(show.code, Some(0), "{}", show.stderr);

    // A new window, then the controller is stopped before it closes: the nodes cut on their own.
    let second = now() + 10;
    std::fs::write(&policy, expiring_policy(second)).unwrap();
    assert!(
        Lab::until(Duration::from_secs(8), || c.connect("web-1", "db-1", 5432)),
        "the renewed rule holds\n{}",
        c.logs()
    );
    c.lab.signal("ctl", "controller", "KILL");
    assert!(
        c.lab
            .wait("ctl", "controller", Duration::from_secs(5))
            .is_some()
    );
    let late = cut_after_expiry(&mut c, second, "hold-2");
    eprintln!("expiry -> cut, controller down: {late} ms");
    assert!(late <= 1000, "cut {late} ms after the expiry\n{}", c.logs());
    assert!(!c.connect("web-1", "db-1", 5432));
}

const QUARANTINE_RULES: &str = "rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
  - { name: forensics, from: [db], to: [quarantined], ports: [tcp/22] }
quarantine: { denied_per_minute: 100, duration: 15m }
";

#[test]
fn quarantine_by_hand_cuts_all_but_quarantined_rules_and_ends() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let policy = c.files.write(
        "policy.yaml",
        &web_db_policy("q", "10.203.0.0/16", QUARANTINE_RULES),
    );
    start_pair(&mut c, &policy, &[], "22");
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());
    assert!(
        !c.connect("db-1", "web-1", 22),
        "forensics only reaches the quarantined"
    );

    // By hand: the held flow is cut, only the `quarantined` rule is left.
    c.hold("web-1", "db-1", 5432, 10, "hold-q");
    thread::sleep(Duration::from_millis(800));
    let t0 = unix_ms();
    let r = c.cli(&["quarantine", "web-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("quarantined web-1 until"), "{}", r.stdout);
    let broke = c
        .held("web-1", "hold-q")
        .expect_err("quarantine cuts the flow");
    eprintln!("quarantine -> flow cut: {} ms", broke.saturating_sub(t0));
    assert!(!c.connect("web-1", "db-1", 5432));
    assert!(
        c.connect_eventually("db-1", "web-1", 22),
        "the quarantined rule works\n{}",
        c.logs()
    );
    let web = c
        .nodes()
        .into_iter()
        .find(|n| n["identity"] == "web-1")
        .unwrap();
    assert_eq!(web["quarantine"]["by"], "admin", "{web}");
    assert!(
        web["quarantine"]["until"].as_i64().is_some(),
        "the policy's duration: {web}"
    );
    assert!(c.cli(&["nodes"]).stdout.contains("QUARANTINED"));

    // Release: back as before.
    let r = c.cli(&["release", "web-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(Lab::until(Duration::from_secs(5), || c.connect("web-1", "db-1", 5432)));
    assert!(!c.connect("db-1", "web-1", 22));
    let r = c.cli(&["release", "web-1"]);
    assert_eq!(r.code, Some(1), "not in quarantine: {}", r.stderr);
    let r = c.cli(&["quarantine", "nobody"]);
    assert_eq!(r.code, Some(1), "unknown identity: {}", r.stderr);

    // A short quarantine ends by itself, once.
    let r = c.cli(&["quarantine", "web-1", "--duration", "3s"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!c.connect("web-1", "db-1", 5432));
    assert!(
        Lab::until(Duration::from_secs(8), || c.connect("web-1", "db-1", 5432)),
        "the quarantine ends at its time\n{}",
        c.logs()
    );

    // The audit log has all of it, in order, each once. Access returns at the quarantine's end
    // (every node enforces it); the record's removal, audited, follows within a second.
    let ended = |c: &Cluster| {
        let log = c.cli(&["audit", "-o", "json"]).json();
        log.as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e["action"] == "release" && e["who"] == "controller")
        })
    };
    assert!(
        Lab::until(Duration::from_secs(5), || ended(&c)),
        "{}",
        c.logs()
    );
    let log = c.cli(&["audit", "-o", "json"]).json();
    let entries: Vec<(String, String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["identity"].as_str().unwrap_or_default().to_string(),
                e["who"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // The controller's first start issues the administrator's credential; then the policy.
    let first: Vec<&str> = entries.iter().take(2).map(|e| e.0.as_str()).collect();
    assert_eq!(first, ["admin.issue", "policy.apply"], "{entries:?}");
    let tokens = entries.iter().filter(|e| e.0 == "token.create").count();
    assert_eq!(tokens, 2, "one per node enrolled: {entries:?}");
    let q: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e.0 == "quarantine" || e.0 == "release")
        .map(|e| (e.0.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        q,
        [
            ("quarantine", "admin"),
            ("release", "admin"),
            ("quarantine", "admin"),
            ("release", "controller")
        ],
        "{entries:?}"
    );
    assert_eq!(
        entries.iter().filter(|e| e.0 == "node.enroll").count(),
        2,
        "{entries:?}"
    );
    let table = c.cli(&["audit"]).stdout;
    assert!(table.contains("its time was up"), "{table}");
}

#[test]
fn a_port_scan_quarantines_the_scanner_and_the_logs_show_it() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let policy = c.files.write(
        "policy.yaml",
        &web_db_policy("q", "10.203.0.0/16", QUARANTINE_RULES)
            .replace("denied_per_minute: 100", "denied_per_minute: 50"),
    );
    let probe = start_pair(&mut c, &policy, &[], "22");
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());

    // Someone follows the denied flows as they come.
    let cli = bin("bulkhead").display().to_string();
    let admin = c.admin();
    c.lab.spawn(
        "ctl",
        "follow",
        &[
            &cli, "--config", &admin, "flows", "--denied", "--follow", "-o", "json",
        ],
    );
    // web-1 scans 100 closed ports of db-1 while one allowed flow is open.
    c.hold("web-1", "db-1", 5432, 20, "hold-scan");
    thread::sleep(Duration::from_millis(800));
    let db = c.addresses["db-1"].clone();
    let t0 = unix_ms();
    let out = c
        .lab
        .exec("web-1", &[&probe, "scan", &db, "10000", "10099", "300"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0 open",
        "nothing gets through"
    );
    let broke = c
        .held("web-1", "hold-scan")
        .expect_err("the quarantine cuts the scanner's allowed flow");
    eprintln!(
        "scan start -> quarantine cut the allowed flow: {} ms",
        broke.saturating_sub(t0)
    );
    let web = c
        .nodes()
        .into_iter()
        .find(|n| n["identity"] == "web-1")
        .unwrap();
    assert_eq!(web["quarantine"]["by"], "controller", "{web}");
    assert!(
        web["quarantine"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("denied new flows in a minute"),
        "{web}"
    );
    assert!(!c.connect("web-1", "db-1", 5432));
    assert!(
        c.connect_eventually("db-1", "web-1", 22),
        "the quarantined-segment rule still works\n{}",
        c.logs()
    );

    // The follower saw them arrive, one JSON object per line.
    let followed = Lab::until(Duration::from_secs(5), || {
        c.lab
            .log("ctl", "follow")
            .lines()
            .filter(|l| l.contains("\"verdict\":\"deny\"") && l.contains("\"src\":\"web-1\""))
            .count()
            >= 100
    });
    assert!(followed, "flows --follow: {}", c.lab.log("ctl", "follow"));

    // The flow log shows the scan: one denied new flow per port, from web-1, default deny.
    let denied = c.cli(&["flows", "--denied", "--identity", "web-1", "-o", "json"]);
    assert_eq!(denied.code, Some(0), "{}", denied.stderr);
    let scan: Vec<u64> = denied
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["src"] == "web-1" && f["dst"] == "db-1" && f["verdict"] == "deny")
        .filter_map(|f| f["port"].as_u64())
        .filter(|p| (10000..=10099).contains(p))
        .collect();
    let distinct: std::collections::BTreeSet<u64> = scan.iter().copied().collect();
    assert_eq!(distinct.len(), 100, "every scanned port, once: {scan:?}");
    assert_eq!(scan.len(), 100, "new flows only, no retransmits");
    let all = c.cli(&["flows", "-o", "json"]).json();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|f| f["verdict"] == "allow" && f["rule"] == "web-to-db" && f["port"] == 5432),
        "allowed flow starts are logged with their rule"
    );
    let table = c.cli(&["flows", "--denied"]).stdout;
    assert!(
        table.contains("(default deny)") && table.contains("tcp/10042"),
        "{table}"
    );

    // Release restores it; the audit log has the automatic quarantine and the release.
    let r = c.cli(&["release", "web-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(Lab::until(Duration::from_secs(5), || c.connect("web-1", "db-1", 5432)));
    let log = c.cli(&["audit", "-o", "json"]).json();
    let q: Vec<(String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["identity"] == "web-1" && (e["action"] == "quarantine" || e["action"] == "release")
        })
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().into(),
                e["who"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        q,
        [
            ("quarantine".to_string(), "controller".to_string()),
            ("release".to_string(), "admin".to_string())
        ]
    );

    // The controller stops: the follower says so and fails, rather than end quietly.
    c.lab.signal("ctl", &c.controller.clone(), "TERM");
    let code = c.lab.wait("ctl", "follow", Duration::from_secs(10));
    let said = c.lab.log("ctl", "follow");
    assert_eq!(code, Some(2), "{said}");
    let url = "controller https://198.18.0.1:7443";
    assert!(
        said.lines()
            .any(|l| l.starts_with(&format!("bulkhead: {url}"))),
        "{said}"
    );
}
