//! `bulkhead demo --check`, the README's first command without the waiting: a controller and
//! six daemons in namespaces, every pair probed, exit 0 only if the network did what the policy
//! says. Also: it refuses a bad policy before creating anything, and leaves nothing behind.

use bulkhead_e2e::{TempDir, netns_ok, run};

fn namespaces() -> usize {
    let o = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output();
    o.map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().count())
}

#[test]
fn the_demo_matches_the_policy_and_cleans_up() {
    if !netns_ok() {
        return;
    }
    let before = namespaces();
    let r = run("bulkhead", &["demo", "--check", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["matched"], true);
    let probes = j["probes"].as_array().expect("probes");
    // Six identities, 30 ordered pairs, five probes each (icmp, tcp/22, 5432, 8080, 9000).
    assert_eq!(probes.len(), 150);
    let allowed = probes.iter().filter(|p| p["network"] == "allow").count();
    assert!((10..150).contains(&allowed), "{allowed} allowed");
    assert!(
        probes
            .iter()
            .any(|p| p["from"] == "lb-1" && p["to"] == "db-1" && p["network"] == "deny")
    );
    assert_eq!(namespaces(), before, "the demo removes its namespaces");

    // A bad policy is refused with FILE:LINE:COL before anything is created.
    let d = TempDir::new("demo");
    let bad = d.write("bad.yaml", "version: 1\nnetwork: { cidr: 10.9.0.0/16 }\nidentities:\n  a: { labels: { x: 1 } }\nrules: [ {name: r, from: [nowhere], to: [a], ports: [tcp/1]} ]\n");
    let r = run("bulkhead", &["demo", "--check", "--policy", &bad]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains(&format!("{bad}:5:")), "{}", r.stderr);
    assert_eq!(namespaces(), before);

    // In the same test: the demos count the machine's namespaces, so they must not overlap.
    the_journey_demo_ends_with_exactly_what_was_used(before);
}

/// `bulkhead demo --journey --check`: observe, suggest, replay, enforce on the demo's lab;
/// exit 0 only if, after enforcing the suggestion, exactly what the applications used gets
/// through on the servers' own addresses.
fn the_journey_demo_ends_with_exactly_what_was_used(before: usize) {
    let r = run("bulkhead", &["demo", "--journey", "--check", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["matched"], true);
    let probes = j["probes"].as_array().expect("probes");
    let allowed = probes.iter().filter(|p| p["network"] == "allow").count();
    assert!((5..probes.len()).contains(&allowed), "{allowed} allowed");
    for step in [
        "step 2 of 5, suggest",
        "nothing observed would be denied",
        "step 5 of 5",
    ] {
        assert!(r.stderr.contains(step), "{}", r.stderr);
    }
    assert_eq!(namespaces(), before, "the demo removes its namespaces");
}
