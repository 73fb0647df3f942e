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
}
