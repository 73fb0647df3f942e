//! The whole overlay with real binaries: a `bulkhead-controller` and four `bulkheadd`s, each in
//! its own network namespace, enrolled with join tokens, driven with the `bulkhead` CLI.
//!
//! One test, in steps, because each step builds on the state the last one left (as an operator
//! would see it): the matrix against `policy matrix`, tunnels only where a rule is, a policy
//! change that cuts exactly the flow it forbids, a daemon restart with the controller down,
//! a controller `kill -9` and restart, revocation, and bad input on the way.
//!
//! It prints the propagation times it sees (apply → flow cut, revoke → flow cut) for the notes;
//! it asserts only that the cut happens, never how fast (benchmarks measure speed).

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_e2e::cluster::{Cluster, unix_ms};
use bulkhead_e2e::netns::Lab;
use bulkhead_e2e::{Run, bin, netns_ok, run};

const POLICY: &str = "version: 1
network: { name: e2e, cidr: 10.200.0.0/16 }
identities:
  web-1: { labels: { tier: web } }
  web-2: { labels: { tier: web } }
  api-1: { labels: { tier: api } }
  db-1: { labels: { tier: db } }
segments:
  web: { match: { tier: web } }
  api: { match: { tier: api } }
  db: { match: { tier: db } }
rules:
  - { name: web-to-api, from: [web], to: [api], ports: [tcp/9000] }
  - { name: api-to-db, from: [api], to: [db], ports: [tcp/5432] }
tests:
  - { from: web-1, to: db-1, port: tcp/5432, expect: deny }
";

/// Only web-1 keeps access to the API.
fn policy_2() -> String {
    POLICY
        .replace(
            "web: { match: { tier: web } }",
            "web-one: { identities: [web-1] }",
        )
        .replace("from: [web]", "from: [web-one]")
}

const NODES: [&str; 4] = ["web-1", "web-2", "api-1", "db-1"];
const PORTS: [u16; 2] = [9000, 5432];
/// Every ordered pair and port, probed in parallel: (from, to, port) → got through.
fn probe_all(c: &Cluster) -> BTreeMap<(String, String, u16), bool> {
    let mut out = BTreeMap::new();
    thread::scope(|s| {
        let mut handles = Vec::new();
        for from in NODES {
            for to in NODES {
                if from == to {
                    continue;
                }
                for port in PORTS {
                    handles.push((
                        (from.to_string(), to.to_string(), port),
                        s.spawn(move || c.connect(from, to, port)),
                    ));
                }
            }
        }
        for (k, h) in handles {
            out.insert(k, h.join().unwrap_or(false));
        }
    });
    out
}

/// What `bulkhead policy matrix -o json` says: (from, to, port) → allowed.
fn expected(policy_file: &str) -> BTreeMap<(String, String, u16), bool> {
    let r = run("bulkhead", &["policy", "matrix", policy_file, "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json();
    let mut out = BTreeMap::new();
    for from in NODES {
        for to in NODES {
            if from == to {
                continue;
            }
            for port in PORTS {
                let allowed = j["pairs"].as_array().is_some_and(|pairs| {
                    pairs.iter().any(|p| {
                        p["from"] == from
                            && p["to"] == to
                            && p["ports"]
                                .as_array()
                                .is_some_and(|ps| ps.iter().any(|x| *x == format!("tcp/{port}")))
                    })
                });
                out.insert((from.to_string(), to.to_string(), port), allowed);
            }
        }
    }
    out
}

#[test]
fn the_overlay_end_to_end() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&NODES);
    let policy_file = c.files.write("policy.yaml", POLICY);
    let policy2_file = c.files.write("policy2.yaml", &policy_2());

    // --- The controller applies --policy at start; nodes enroll with tokens.
    c.start_controller("controller", &policy_file, &[]);
    let show = c.cli(&["policy", "show", "-o", "json"]);
    assert_eq!(show.json()["revision"], 1, "{}", show.stderr);
    let mut tokens = BTreeMap::new();
    for n in NODES {
        let t = c.token(n);
        c.start_daemon(n, "bulkheadd", Some(&t));
        tokens.insert(n, t);
    }
    c.converge(&NODES);
    for n in NODES {
        let probe = bin("bh-probe").display().to_string();
        c.lab
            .spawn(n, "listen", &[&probe, "listen", "9000,5432", "240"]);
    }
    thread::sleep(Duration::from_millis(300));

    // --- The whole matrix matches `policy matrix`, with real packets.
    let want = expected(&policy_file);
    // What must pass, first with retries for the first handshakes.
    for ((from, to, port), allowed) in &want {
        if *allowed {
            assert!(
                c.connect_eventually(from, to, *port),
                "{from} -> {to}:{port} must pass\n{}",
                c.logs()
            );
        }
    }
    let got = probe_all(&c);
    assert_eq!(got, want, "the network must do what the policy says");
    assert!(want.values().filter(|a| **a).count() >= 3 && want.values().any(|a| !*a));

    // --- No tunnel without a rule: each node's WireGuard peers are exactly its policy peers.
    let keys: BTreeMap<&str, String> = NODES.iter().map(|n| (*n, c.pubkey(n))).collect();
    let peers_of = |n: &str| -> BTreeSet<String> {
        NODES
            .iter()
            .filter(|m| **m != n)
            .filter(|m| {
                PORTS.iter().any(|p| {
                    want[&(n.to_string(), m.to_string(), *p)]
                        || want[&(m.to_string(), n.to_string(), *p)]
                })
            })
            .map(|m| keys[m].clone())
            .collect()
    };
    for n in NODES {
        assert_eq!(c.wg_peers(n), peers_of(n), "{n}'s tunnels");
    }
    assert!(
        !c.wg_peers("web-1").contains(&keys["web-2"]),
        "web-1 and web-2 share no rule"
    );
    assert!(!c.wg_peers("web-1").contains(&keys["db-1"]));

    // --- A policy change cuts the flow it forbids and leaves the others alone.
    c.hold("web-2", "api-1", 9000, 8, "hold-cut");
    c.hold("web-1", "api-1", 9000, 8, "hold-keep");
    c.hold("api-1", "db-1", 5432, 8, "hold-keep");
    thread::sleep(Duration::from_millis(1500));
    let plan = c.cli(&["policy", "plan", &policy2_file]);
    assert_eq!(plan.code, Some(0), "{}", plan.stderr);
    assert!(
        plan.stdout.contains("web-2") && plan.stdout.contains("tcp/9000"),
        "{}",
        plan.stdout
    );
    let applied_at = unix_ms();
    let apply = c.cli(&["policy", "apply", "--yes", &policy2_file, "-o", "json"]);
    assert_eq!(apply.code, Some(0), "{}", apply.stderr);
    assert_eq!(apply.json()["revision"], 2);
    let cut = c
        .held("web-2", "hold-cut")
        .expect_err("web-2 -> api-1 must be cut");
    eprintln!(
        "propagation: policy apply -> flow cut in {} ms",
        cut.saturating_sub(applied_at)
    );
    assert_eq!(
        c.held("web-1", "hold-keep"),
        Ok(()),
        "web-1 -> api-1 must not be disturbed"
    );
    assert_eq!(
        c.held("api-1", "hold-keep"),
        Ok(()),
        "api-1 -> db-1 must not be disturbed"
    );
    assert!(!c.connect("web-2", "api-1", 9000), "and no new flow either");
    c.converge(&NODES);
    // Only the nodes whose allowlist changed were sent revision 2; db-1's did not change.
    let revs: BTreeMap<String, u64> = c
        .nodes()
        .iter()
        .filter_map(|v| Some((v["identity"].as_str()?.to_string(), v["revision"].as_u64()?)))
        .collect();
    assert_eq!(revs["web-2"], 2);
    assert_eq!(revs["api-1"], 2);
    assert_eq!(revs["db-1"], 1, "{revs:?}");

    // --- Bad input: a policy that fails validation or its tests is refused whole, exit 1.
    let bad = c
        .files
        .write("bad.yaml", &POLICY.replace("tcp/5432", "tcp/70000"));
    let r = c.cli(&["policy", "apply", "--yes", &bad]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{bad}:14:")),
        "FILE:LINE:COL errors: {}",
        r.stderr
    );
    let failing = c.files.write(
        "failing.yaml",
        &POLICY.replace("expect: deny", "expect: allow"),
    );
    assert_eq!(c.cli(&["policy", "apply", "--yes", &failing]).code, Some(1));
    // The --policy file turning bad is refused too, and logged; the live policy stays.
    std::fs::write(&policy_file, "version: 1\nidentities: [oops\n").expect("write");
    let logged = Lab::until(Duration::from_secs(10), || {
        c.lab
            .log("ctl", "controller")
            .contains("policy file refused")
    });
    assert!(logged, "{}", c.lab.log("ctl", "controller"));
    assert_eq!(
        c.cli(&["policy", "show", "-o", "json"]).json()["revision"],
        2
    );

    // --- Controller down (kill -9), db-1 restarted: it enforces its cached allowlist.
    c.lab.signal("ctl", "controller", "KILL");
    assert!(
        c.lab
            .wait("ctl", "controller", Duration::from_secs(5))
            .is_some()
    );
    c.lab.signal("db-1", "bulkheadd", "TERM");
    assert!(
        c.lab
            .wait("db-1", "bulkheadd", Duration::from_secs(10))
            .is_some()
    );
    c.start_daemon("db-1", "bulkheadd-2", None);
    let cached = Lab::until(Duration::from_secs(10), || {
        c.lab
            .log("db-1", "bulkheadd-2")
            .contains("enforcing the cached allowlist")
    });
    assert!(cached, "{}", c.lab.log("db-1", "bulkheadd-2"));
    assert!(
        c.connect_eventually("api-1", "db-1", 5432),
        "cached allow still passes\n{}",
        c.logs()
    );
    assert!(
        !c.connect("web-1", "db-1", 5432),
        "cached deny still denies"
    );
    assert!(!c.connect("web-2", "db-1", 5432));

    // --- The controller restarts on its state: nothing lost, every node back on revision 2.
    c.start_controller("controller-2", &policy_file, &[]);
    assert_eq!(
        c.cli(&["policy", "show", "-o", "json"]).json()["revision"],
        2
    );
    c.converge(&NODES);
    let nodes = c.nodes();
    assert!(nodes.iter().all(|n| n["enrolled"] == true), "{nodes:?}");

    // --- Revocation: every peer drops api-1 and its flows; its credential stops working.
    c.hold("web-1", "api-1", 9000, 8, "hold-revoke");
    thread::sleep(Duration::from_millis(1500));
    let revoked_at = unix_ms();
    let r = c.cli(&["revoke", "api-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let audit = c.cli(&["audit", "-o", "json"]).json();
    let last = audit
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&last["action"], &last["identity"], &last["who"]),
        (&"node.revoke".into(), &"api-1".into(), &"admin".into()),
        "the revocation is audited: {last}"
    );
    let cut = c
        .held("web-1", "hold-revoke")
        .expect_err("the revoked node's flows must be cut");
    eprintln!(
        "propagation: revoke -> flow cut in {} ms",
        cut.saturating_sub(revoked_at)
    );
    let dropped = Lab::until(Duration::from_secs(5), || {
        ["web-1", "db-1"]
            .iter()
            .all(|n| !c.wg_peers(n).contains(&keys["api-1"]))
    });
    assert!(dropped, "every peer drops the revoked identity's tunnel");
    assert!(!c.connect("api-1", "db-1", 5432));
    let refused = Lab::until(Duration::from_secs(10), || {
        c.lab
            .log("api-1", "bulkheadd")
            .contains("refuses this node's credential")
    });
    assert!(refused, "{}", c.lab.log("api-1", "bulkheadd"));
    // Its old token cannot bring it back; only a new one can.
    let state = format!("{}-rejoin", c.state("api-1"));
    let r: Run = c
        .lab
        .exec(
            "api-1",
            &[
                &bin("bulkheadd").display().to_string(),
                "join",
                tokens["api-1"].as_str(),
                "--state",
                &state,
            ],
        )
        .into();
    assert_ne!(
        r.code,
        Some(0),
        "an old token must not re-enroll: {}",
        r.stdout
    );
    let fresh = c.token("api-1");
    let r: Run = c
        .lab
        .exec(
            "api-1",
            &[
                &bin("bulkheadd").display().to_string(),
                "join",
                &fresh,
                "--state",
                &state,
            ],
        )
        .into();
    assert_eq!(r.code, Some(0), "a new token enrolls: {}", r.stderr);

    // --- A corrupt state file: the daemon refuses to start rather than fail open.
    c.lab.signal("web-2", "bulkheadd", "TERM");
    assert!(
        c.lab
            .wait("web-2", "bulkheadd", Duration::from_secs(10))
            .is_some()
    );
    let web2 = c.state("web-2");
    std::fs::write(format!("{web2}/config.json"), b"{\"allowlist\": {\"revis").expect("write");
    let iface = c.lab.host("web-2").interface.clone();
    let daemon = bin("bulkheadd").display().to_string();
    let r: Run = c
        .lab
        .exec(
            "web-2",
            &[&daemon, "run", "--state", &web2, "--interface", &iface],
        )
        .into();
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("refusing to start"), "{}", r.stderr);
    assert!(
        !c.lab
            .exec("web-2", &["ip", "link", "show", &iface])
            .status
            .success(),
        "nothing created"
    );
    let elapsed = Instant::now();
    drop(c);
    eprintln!("cleanup took {:?}", elapsed.elapsed());
}
