//! The journey of spec §9, scripted: observe → suggest → replay → enforce, with a controller
//! and real daemons in namespaces, transparent addressing, and applications that never change.
//!
//! The estate starts with no rules and the host firewall observing. Traffic between a few
//! pairs is generated over the servers' own addresses; `policy suggest` writes the rules from
//! the flow history; `policy plan --replay` says nothing observed would be denied; the
//! suggestion is applied and the firewall set to `enforce`. Every observed connection still
//! works (now through tunnels); one that was never observed is denied.

use std::time::Duration;

use bulkhead_e2e::cluster::Cluster;
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::{bin, netns_ok};

const POLICY: &str = "version: 1
network: { name: journey, cidr: 198.18.0.0/24, addressing: underlay }
identities:
  db-1: { labels: { app: db } }
  web-1: { labels: { app: web } }
  dev-1: { labels: { app: dev } }
underlay:
  mode: observe
";

const NODES: [&str; 3] = ["db-1", "web-1", "dev-1"];

fn connect(c: &Cluster, from: &str, to: &str, port: u16) -> bool {
    let probe = bin("bh-probe").display().to_string();
    let addr = c.lab.host(to).underlay.clone();
    c.lab
        .exec(from, &[&probe, "connect", &addr, &port.to_string(), "1500"])
        .status
        .success()
}

#[test]
fn observe_suggest_replay_enforce_without_changing_an_application() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&NODES);
    let policy = c.files.write("policy.yaml", POLICY);
    c.start_controller("controller", &policy, &[]);
    for n in NODES {
        let t = c.token(n);
        c.start_daemon(n, "bulkheadd", Some(&t));
    }
    c.converge(&NODES);
    let probe = bin("bh-probe").display().to_string();
    for n in NODES {
        c.lab
            .spawn(n, "listen", &[&probe, "listen", "5432,22,8080", "300"]);
    }
    std::thread::sleep(Duration::from_millis(300));

    // --- Observe: no rules, nothing dropped; what is used is recorded.
    let observed = [
        ("web-1", "db-1", 5432),
        ("dev-1", "db-1", 22),
        ("dev-1", "web-1", 8080),
    ];
    for (from, to, port) in observed {
        assert!(
            connect(&c, from, to, port),
            "{from} -> {to}:{port} in observe"
        );
    }
    let recorded = Lab::until(Duration::from_secs(15), || {
        let r = c.cli(&["flows", "--since", "1h", "-o", "json"]);
        let flows = r.json().as_array().cloned().unwrap_or_default();
        observed.iter().all(|(from, to, port)| {
            flows
                .iter()
                .any(|f| f["src"] == *from && f["dst"] == *to && f["port"] == *port)
        })
    });
    assert!(recorded, "{}", c.cli(&["flows", "--since", "1h"]).stdout);

    // --- Suggest: rules for what was observed, checked.
    let s = c.cli(&[
        "policy", "suggest", "--since", "1h", "--base", &policy, "--full",
    ]);
    assert_eq!(s.code, Some(0), "{}\n{}", s.stdout, s.stderr);
    let suggested = c.files.write("suggested.yaml", &s.stdout);
    let check = c.cli(&["policy", "check", &suggested]);
    assert_eq!(check.code, Some(0), "{}\n{}", check.stdout, s.stdout);

    // --- Replay: nothing observed would be denied by the suggestion.
    let r = c.cli(&["policy", "plan", &suggested, "--replay", "1h"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    // While the empty policy replays the same flows as newly denied once enforced.
    let enforce_empty = c.files.write(
        "empty-enforce.yaml",
        &POLICY.replace("mode: observe", "mode: enforce"),
    );
    let r = c.cli(&["policy", "plan", &enforce_empty, "--replay", "1h"]);
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);

    // --- Apply the suggestion, then enforce.
    let r = c.cli(&["policy", "apply", "--yes", &suggested]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let enforced = c.files.write(
        "enforced.yaml",
        &s.stdout.replace("mode: observe", "mode: enforce"),
    );
    let r = c.cli(&["policy", "apply", "--yes", &enforced]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    c.converge(&NODES);

    // Every observed connection still works, through the tunnels; what was never observed is
    // denied.
    for (from, to, port) in observed {
        assert!(
            (0..4).any(|_| connect(&c, from, to, port)),
            "{from} -> {to}:{port} after enforce\n{}",
            c.logs()
        );
    }
    for (from, to, port) in [
        ("web-1", "db-1", 22),
        ("db-1", "web-1", 5432),
        ("dev-1", "db-1", 5432),
    ] {
        assert!(
            !connect(&c, from, to, port),
            "{from} -> {to}:{port} was never observed"
        );
    }
}
