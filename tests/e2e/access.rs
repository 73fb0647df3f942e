//! Privileged access with real binaries in namespaces (spec §10), on one cluster: named
//! administrators and their roles through the CLI; a rule that needs approval passing nothing
//! before approval, reaching the node within a second of it, and cut at its end with the
//! controller running and with it stopped, and at once on `access revoke`; the audit log naming
//! who asked, who approved, and the end; a location check that does not hold withdrawing the
//! rule that needs it, and one that holds keeping its rule.

use std::thread;
use std::time::Duration;

use bulkhead_e2e::cluster::{Cluster, unix_ms, web_db_policy};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::{Run, bin, netns_ok};

/// The lab's nodes reach the controller from 198.18.0.0/16: `office` never holds there, `lab`
/// always does.
const RULES: &str = "posture:
  office: { endpoint.address: [192.0.2.0/24, 2001:db8::/32] }
  lab: { endpoint.address: [198.18.0.0/16] }
rules:
  - name: web-ssh
    from: [web]
    to: [db]
    ports: [tcp/22]
    approval: { approvers: 1, max: 1h }
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432], posture: [office] }
  - { name: db-to-web, from: [db], to: [web], ports: [tcp/8080], posture: [lab] }
";

/// The CLI with another administrator's configuration.
fn cli_as(c: &Cluster, config: &str, args: &[&str]) -> Run {
    let b = bin("bulkhead").display().to_string();
    let mut full = vec![b.as_str(), "--config", config];
    full.extend_from_slice(args);
    c.lab.exec("ctl", &full).into()
}

/// Adds an administrator through the CLI, its configuration written to a file; returns the path.
fn add_admin(c: &Cluster, name: &str, role: &str) -> String {
    let path = c.files.path().join(format!("{name}.yaml"));
    let p = path.display().to_string();
    let r = c.cli(&["admin", "add", name, "--role", role, "--out", &p]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("the configuration file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "an administrator's key is private");
    p
}

/// `access request` as `who`; returns the id it prints.
fn request(c: &Cluster, who: &str, duration: &str) -> String {
    let r = cli_as(
        c,
        who,
        &[
            "access",
            "request",
            "web-ssh",
            "--for",
            duration,
            "--from",
            "web-1",
            "--reason",
            "incident 42",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let id = r.stdout.trim().to_string();
    assert_eq!(id.len(), 8, "the id alone on stdout: {:?}", r.stdout);
    id
}

/// Approves `id` as `who`; returns when the access ends (Unix seconds) and when the approval
/// returned (Unix ms).
fn approve(c: &Cluster, who: &str, id: &str) -> (u64, u128) {
    let r = cli_as(c, who, &["access", "approve", id, "-o", "json"]);
    let at = unix_ms();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["state"], "approved", "{v}");
    (v["until"].as_u64().expect("until"), at)
}

/// Waits until web-1's daemon holds a configuration with (or without) the approved rule, and
/// returns how long after `since` (Unix ms) that was seen.
fn node_has_rule(c: &Cluster, id: &str, want: bool, since: u128) -> u128 {
    let file = format!("{}/config.json", c.state("web-1"));
    let name = format!("\"web-ssh@{id}\"");
    let ok = Lab::until(Duration::from_secs(5), || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&name) == want)
    });
    assert!(ok, "web-1 never got the rule (want {want})\n{}", c.logs());
    unix_ms().saturating_sub(since)
}

/// Holds web-1 → db-1:22 across `until` (Unix seconds) and returns how long after it the flow
/// broke (ms).
fn cut_after(c: &mut Cluster, until: u64, label: &str) -> i128 {
    let secs = until.saturating_sub(unix_ms() as u64 / 1000) + 4;
    c.hold("web-1", "db-1", 22, secs, label);
    let broke = c
        .held("web-1", label)
        .expect_err("access past its end must be cut");
    let late = broke as i128 - i128::from(until) * 1000;
    assert!(
        late > -500,
        "the flow broke {late} ms before the end\n{}",
        c.logs()
    );
    late
}

#[test]
fn approved_access_is_enforced_by_the_nodes_from_approval_to_its_end() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let text = web_db_policy("acc", "10.204.0.0/16", RULES);
    let policy = c.files.write("policy.yaml", &text);
    c.start_controller("controller", &policy, &[]);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    c.start_daemon("web-1", "bulkheadd", Some(&tw));
    c.start_daemon("db-1", "bulkheadd", Some(&td));
    c.converge(&["web-1", "db-1"]);
    let probe = bin("bh-probe").display().to_string();
    c.lab
        .spawn("db-1", "listen", &[&probe, "listen", "22,5432", "300"]);
    c.lab
        .spawn("web-1", "listen", &[&probe, "listen", "8080", "300"]);
    thread::sleep(Duration::from_millis(300));

    // Location: seen from where the node connects, 198.18.0.x. `lab` holds, `office` does not,
    // and `nodes` says why; the rule needing `office` is withdrawn.
    assert!(
        c.connect_eventually("db-1", "web-1", 8080),
        "a location check that holds keeps its rule\n{}",
        c.logs()
    );
    assert!(
        !c.connect("web-1", "db-1", 5432),
        "a rule whose location check fails passes nothing"
    );
    let web = c
        .nodes()
        .into_iter()
        .find(|n| n["identity"] == "web-1")
        .unwrap();
    let office = web["posture"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["check"] == "office")
        .cloned()
        .unwrap_or_else(|| panic!("{web}"));
    assert_eq!(office["pass"], false, "{web}");
    let reason = office["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("endpoint.address 198.18.0.")
            && reason.ends_with("is not in 192.0.2.0/24, 2001:db8::/32"),
        "{reason}"
    );
    assert!(c.cli(&["nodes"]).stdout.contains("is not in 192.0.2.0/24"));

    // Administrators through the CLI: roles, refusals (exit 1), usage errors (exit 2).
    let alice = add_admin(&c, "alice", "operator");
    let bob = add_admin(&c, "bob", "approver");
    let vera = add_admin(&c, "vera", "viewer");
    let r = c.cli(&["admin", "add", "mallory", "--role", "root"]);
    assert_eq!(
        r.code,
        Some(2),
        "an unknown role is a usage error: {}",
        r.stderr
    );
    let r = cli_as(&c, &vera, &["policy", "apply", &policy, "--yes"]);
    assert_eq!(r.code, Some(1), "beyond a viewer's role: {}", r.stderr);
    assert!(r.stderr.contains("needs the operator role"), "{}", r.stderr);
    let r = cli_as(&c, &vera, &["admin", "list", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.json().as_array().map(Vec::len), Some(4), "{}", r.stdout);

    // Bad requests: a rule without approval, and longer than `max`.
    let r = cli_as(
        &c,
        &alice,
        &["access", "request", "db-to-web", "--reason", "x"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("does not need approval"), "{}", r.stderr);
    let r = cli_as(
        &c,
        &alice,
        &[
            "access", "request", "web-ssh", "--for", "2h", "--reason", "x",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("max of 1h"), "{}", r.stderr);

    // Before approval: nothing gets through, and explain says why.
    assert!(!c.connect("web-1", "db-1", 22), "no approval, no access");
    let ex = c.cli(&["policy", "explain", &policy, "web-1", "db-1", "tcp/22"]);
    assert_eq!(ex.code, Some(1));
    assert!(ex.stdout.contains("needs approval"), "{}", ex.stdout);

    // Nobody approves their own request; an operator approves none.
    let id = request(&c, &alice, "10s");
    let r = cli_as(&c, &alice, &["access", "approve", &id]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let own = request(&c, &bob, "5s");
    let r = cli_as(&c, &bob, &["access", "approve", &own]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("nobody approves their own"),
        "{}",
        r.stderr
    );
    let r = cli_as(&c, &bob, &["access", "deny", &own]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!c.connect("web-1", "db-1", 22), "still nothing");

    // Approved: on the node within a second, then through.
    let (until, at) = approve(&c, &bob, &id);
    let seen = node_has_rule(&c, &id, true, at);
    eprintln!("approval -> rule on web-1: {seen} ms");
    assert!(seen <= 1000, "{seen} ms\n{}", c.logs());
    assert!(
        c.connect_eventually("web-1", "db-1", 22),
        "approved access passes\n{}",
        c.logs()
    );
    assert!(!c.connect("db-1", "web-1", 22), "one way only");
    assert!(!c.connect("web-1", "db-1", 5432), "and only its ports");
    let ex = c.cli(&[
        "policy", "explain", &policy, "web-1", "db-1", "tcp/22", "--live", "-o", "json",
    ]);
    assert_eq!(ex.code, Some(0), "{}{}", ex.stdout, ex.stderr);
    let j = ex.json();
    assert_eq!(j["rule"], "web-ssh", "{j}");
    let approval = j["depends_on"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "approval")
        .cloned()
        .unwrap_or_default();
    assert_eq!(approval["approved_by"], serde_json::json!(["bob"]), "{j}");
    assert_eq!(approval["requester"], "alice", "{j}");

    // Its end, with the controller running: cut on time.
    let late = cut_after(&mut c, until, "hold-end");
    eprintln!("end -> cut, controller up: {late} ms");
    assert!(late <= 1000, "cut {late} ms after the end\n{}", c.logs());
    assert!(!c.connect("web-1", "db-1", 22));

    // Revoked: cut at once.
    let id2 = request(&c, &alice, "1h");
    let (_, at) = approve(&c, &bob, &id2);
    node_has_rule(&c, &id2, true, at);
    assert!(c.connect_eventually("web-1", "db-1", 22), "{}", c.logs());
    c.hold("web-1", "db-1", 22, 10, "hold-revoke");
    thread::sleep(Duration::from_millis(800));
    let t0 = unix_ms();
    let r = cli_as(&c, &bob, &["access", "revoke", &id2]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let broke = c
        .held("web-1", "hold-revoke")
        .expect_err("revoke cuts the flow");
    let cut = broke.saturating_sub(t0);
    eprintln!("revoke -> cut: {cut} ms");
    assert!(
        cut <= 1000,
        "cut {cut} ms after the revocation\n{}",
        c.logs()
    );
    assert!(!c.connect("web-1", "db-1", 22));

    // The audit log: request, approval, revocation, end, each with its names.
    let ended = Lab::until(Duration::from_secs(5), || {
        c.cli(&["audit"]).stdout.contains("access.end")
    });
    assert!(ended, "{}", c.cli(&["audit"]).stdout);
    let log = c.cli(&["audit", "-o", "json"]).json();
    let entries = log.as_array().unwrap();
    let find = |action: &str, id: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["detail"].as_str().unwrap_or("").contains(id))
            .cloned()
            .unwrap_or_else(|| panic!("no {action} for {id}: {log:#}"))
    };
    assert_eq!(find("access.request", &id)["who"], "alice");
    assert_eq!(find("access.approve", &id)["who"], "bob");
    let end = find("access.end", &id);
    assert_eq!(end["who"], "controller");
    let detail = end["detail"].as_str().unwrap();
    assert!(
        detail.contains("by alice") && detail.contains("approved by bob"),
        "{detail}"
    );
    assert_eq!(find("access.deny", &own)["who"], "bob");
    assert_eq!(find("access.revoke", &id2)["who"], "bob");
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "refused" && e["who"] == "vera"),
        "{log:#}"
    );

    // Its end with the controller stopped: the nodes cut on their own.
    let id3 = request(&c, &alice, "8s");
    let (until, at) = approve(&c, &bob, &id3);
    node_has_rule(&c, &id3, true, at);
    assert!(c.connect_eventually("web-1", "db-1", 22), "{}", c.logs());
    c.lab.signal("ctl", "controller", "KILL");
    assert!(
        c.lab
            .wait("ctl", "controller", Duration::from_secs(5))
            .is_some()
    );
    let late = cut_after(&mut c, until, "hold-down");
    eprintln!("end -> cut, controller down: {late} ms");
    assert!(late <= 1000, "cut {late} ms after the end\n{}", c.logs());
    assert!(!c.connect("web-1", "db-1", 22));
}
