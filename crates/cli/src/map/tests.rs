#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_policy::Probe;

use super::*;

const POLICY: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web, env: prod } }
  web-2: { labels: { app: web, env: prod } }
  db-1: { labels: { app: db, env: prod } }
  lone: {}
segments:
  prod: { match: { env: prod } }
  web: { match: { app: web } }
  db: { match: { app: db } }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
"#;

fn flow(src: &str, dst: &str, port: u16, verdict: Seen, rule: Option<&str>, count: u64) -> Flow {
    Flow {
        hour: 1_800_000_000,
        src: src.into(),
        src_address: Ipv4Addr::new(10, 0, 0, 1),
        dst: dst.into(),
        dst_address: Ipv4Addr::new(192, 0, 2, 9),
        probe: Probe { proto: 6, port },
        verdict,
        path: Way::Overlay,
        rule: rule.map(str::to_string),
        count,
        first: 1_800_000_000_000,
        last: 1_800_000_100_000,
    }
}

fn sample() -> Map {
    let l = bulkhead_policy::load(POLICY, 1_800_000_000, &BTreeMap::new());
    let m = l.model.unwrap();
    let flows = vec![
        flow("web-1", "db-1", 5432, Seen::Allow, Some("web-to-db"), 7),
        flow("web-1", "db-1", 5432, Seen::Allow, Some("web-to-db"), 5),
        flow("web-2", "db-1", 22, Seen::Deny, None, 3),
        flow("db-1", "198.51.100.4", 443, Seen::Deny, None, 1),
    ];
    build(Some(&m), &flows, Some("p.yaml".into()), "h.jsonl".into())
}

#[test]
fn identities_go_to_their_smallest_segment_and_edges_add_up() {
    let map = sample();
    let groups: Vec<(&str, &str, Vec<&str>)> = map
        .groups
        .iter()
        .map(|g| {
            (
                g.name.as_str(),
                g.kind,
                g.members.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("db", "segment", vec!["db-1"]),
            ("web", "segment", vec!["web-1", "web-2"]),
            (NO_SEGMENT, "none", vec!["lone"]),
            (OUTSIDE, "outside", vec!["198.51.100.4"]),
        ]
    );
    assert_eq!(map.edges.len(), 3);
    let e = &map.edges[1];
    assert_eq!(
        (e.from.as_str(), e.to.as_str(), e.count),
        ("web-1", "db-1", 12)
    );
    assert_eq!(e.label(), "tcp/5432 ×12 (web-to-db)");
    assert_eq!(map.edges[2].label(), "tcp/22 ×3 (default deny)");
    let json = serde_json::to_value(&map).unwrap();
    assert_eq!(json["edges"][1]["verdict"], "allow");
    assert_eq!(json["edges"][1]["ports"][0]["rules"][0], "web-to-db");
    let outside = json["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "198.51.100.4")
        .unwrap();
    assert_eq!(outside["group"], OUTSIDE);
    assert_eq!(outside["address"], "192.0.2.9");
    let ge: Vec<(&str, &str, u64, usize)> = map
        .group_edges
        .iter()
        .map(|g| (g.from.as_str(), g.to.as_str(), g.count, g.pairs))
        .collect();
    assert_eq!(
        ge,
        [
            ("db", OUTSIDE, 1, 1),
            ("web", "db", 12, 1),
            ("web", "db", 3, 1),
        ]
    );
}

#[test]
fn dot_has_a_cluster_per_group_and_coloured_edges() {
    let dot = render::dot(&sample());
    assert!(dot.starts_with("digraph bulkhead {"), "{dot}");
    assert_eq!(dot.matches("subgraph \"cluster_").count(), 4);
    assert!(dot.contains("label=\"web\";"));
    assert!(
        dot.contains(
            "\"web-1\" -> \"db-1\" [label=\"allow tcp/5432 ×12 (web-to-db)\", color=\"#2e7d32\""
        ),
        "{dot}"
    );
    assert!(dot.contains(
        "\"web-2\" -> \"db-1\" [label=\"deny tcp/22 ×3 (default deny)\", color=\"#c62828\""
    ));
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn the_page_fetches_nothing_and_escapes_what_flows_say() {
    let l = bulkhead_policy::load(POLICY, 1_800_000_000, &BTreeMap::new());
    let m = l.model.unwrap();
    let mut flows = vec![
        flow("web-1", "db-1", 5432, Seen::Allow, Some("web-to-db"), 7),
        flow("web-2", "db-1", 22, Seen::Deny, None, 3),
        flow("<script>x</script>", "db-1", 80, Seen::Deny, None, 1),
    ];
    // A group of twelve starts collapsed.
    for i in 0..12 {
        flows.push(flow(
            &format!("10.9.0.{i}"),
            "web-1",
            443,
            Seen::WouldDeny,
            None,
            1,
        ));
    }
    let page = render::html(&build(Some(&m), &flows, None, "h".into()));
    assert!(!page.contains("<script>x"), "names are escaped");
    for forbidden in ["http://", "https://", "src=", "@import", "url(http"] {
        assert!(!page.contains(forbidden), "{forbidden} in the page");
    }
    assert_eq!(page.matches("<g class=\"edge ").count(), 15);
    assert!(page.contains("data-identity=\"web-1\""));
    assert!(page.contains("data-verdict=\"deny\""));
    // Small groups start expanded; a big one collapsed, with its edges given to the group edges.
    assert!(page.contains(
        "data-group=\"web\" data-kind=\"segment\" data-size=\"2\" data-collapsed=\"false\""
    ));
    assert!(page.contains(
        "data-group=\"(outside)\" data-kind=\"outside\" data-size=\"13\" data-collapsed=\"true\""
    ));
}
