//! Rolling out (spec §9) as a user runs it: `policy suggest`, `policy plan --history` and `map`,
//! offline on a history file, with the real binary; and the map's page in a real headless
//! Chromium.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::process::Command;

use bulkhead_netlab::TempDir;

const BASE: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web, env: prod } }
  web-2: { labels: { app: web, env: prod } }
  db-1: { labels: { app: db, env: prod } }
  db-2: { labels: { app: db, env: prod } }
  bastion: { labels: { role: admin } }
segments:
  admins: { match: { role: admin } }
  db: { match: { app: db } }
rules:
  - { name: admin-ssh, from: [admins], to: ["*"], ports: [tcp/22] }
underlay:
  mode: observe
  scope: [db]
"#;

/// An hour in 2027 (Unix seconds, a multiple of 3600).
const HOUR: i64 = 1_799_996_400;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn bulkhead(dir: &TempDir, args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(args)
        .current_dir(dir.path())
        .env_remove("BULKHEAD_CONFIG")
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// One aggregate as `bulkhead flows --since D -o json` prints it.
fn agg(src: &str, dst: &str, port: u16, verdict: &str, path: &str, days_ago: i64) -> String {
    let hour = HOUR - days_ago * 86_400;
    let path = if path == "overlay" {
        String::new()
    } else {
        format!(r#","path":"{path}""#)
    };
    format!(
        r#"{{"hour":{hour},"src":"{src}","src_address":"10.0.0.1","dst":"{dst}","dst_address":"10.0.0.2","proto":"tcp","port":{port},"verdict":"{verdict}"{path},"count":4,"first":{},"last":{}}}"#,
        hour * 1000,
        hour * 1000 + 5000
    )
}

fn history() -> String {
    let mut lines = Vec::new();
    for d in 0..10 {
        for w in ["web-1", "web-2"] {
            for db in ["db-1", "db-2"] {
                lines.push(agg(w, db, 5432, "allow", "overlay", d));
            }
        }
    }
    lines.push(agg("bastion", "db-1", 22, "allow", "overlay", 0).replace(
        r#""verdict":"allow""#,
        r#""verdict":"allow","rule":"admin-ssh""#,
    ));
    lines.push(agg("web-1", "203.0.113.9", 443, "allow", "overlay", 0));
    lines.push(agg("bastion", "db-1", 22, "would-deny", "underlay", 1));
    lines.push(agg("bastion", "db-2", 22, "would-deny", "underlay", 1));
    lines.push(agg("db-1", "web-2", 8443, "deny", "overlay", 2));
    lines.join("\n") + "\n"
}

fn lab(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    dir.write("base.yaml", BASE);
    dir.write("history.jsonl", &history());
    dir
}

#[test]
fn suggest_writes_rules_that_pass_check_and_replay_clean() {
    let dir = lab("journey-suggest");
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "suggest",
            "--history",
            "history.jsonl",
            "--base",
            "base.yaml",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("from: [app-web-env-prod]\n    to: [db]\n    ports: [tcp/5432]"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("  allow:\n"), "{}", r.stdout);
    assert!(
        r.stderr.contains("covers 4 connection(s) of 4 pair(s)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("skipped, outside: 1"), "{}", r.stderr);
    assert!(r.stderr.contains("never got through"), "{}", r.stderr);

    let full = bulkhead(
        &dir,
        &[
            "policy",
            "suggest",
            "--history",
            "history.jsonl",
            "--base",
            "base.yaml",
            "--full",
        ],
    );
    assert_eq!(full.code, Some(0), "{}", full.stderr);
    dir.write("full.yaml", &full.stdout);
    let check = bulkhead(&dir, &["policy", "check", "full.yaml"]);
    assert_eq!(check.code, Some(0), "{}\n{}", check.stderr, full.stdout);

    // The suggestion replays clean; the base does not.
    let r = bulkhead(
        &dir,
        &["policy", "plan", "full.yaml", "--history", "history.jsonl"],
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("0 connection(s) would newly be denied"),
        "{}",
        r.stdout
    );
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "plan",
            "base.yaml",
            "--history",
            "history.jsonl",
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let denied = j["replay"]["newly_denied"].as_array().unwrap();
    assert_eq!(denied.len(), 4, "{j}");
    assert_eq!(denied[0]["from"], "web-1");
    assert_eq!(denied[0]["count"], 40);
    assert_eq!(j["replay"]["newly_allowed"].as_array().unwrap().len(), 0);

    // --replay D with --history: only the last D of the file. Two days back, the
    // denied attempt is the only thing the suggestion newly allows.
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "plan",
            "full.yaml",
            "--history",
            "history.jsonl",
            "--replay",
            "3d",
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["replay"]["newly_allowed"][0]["to"], "web-2", "{j}");
    assert_eq!(j["replay"]["aggregates"], 4 * 3 + 5);
}

#[test]
fn no_history_is_said_and_exits_1() {
    let dir = lab("journey-empty");
    dir.write("empty.jsonl", "");
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "suggest",
            "--history",
            "empty.jsonl",
            "--base",
            "base.yaml",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("no flows recorded in empty.jsonl"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    // Offline, a base is needed.
    let r = bulkhead(&dir, &["policy", "suggest", "--history", "history.jsonl"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--base FILE"), "{}", r.stderr);
}

#[test]
fn replay_against_an_invalid_policy_reports_file_line_col() {
    let dir = lab("journey-invalid");
    dir.write(
        "bad.yaml",
        &BASE.replace("ports: [tcp/22]", "ports: [tcp/99999]"),
    );
    let r = bulkhead(
        &dir,
        &["policy", "plan", "bad.yaml", "--history", "history.jsonl"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("bad.yaml:13:59: error: bad port \"tcp/99999\""),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

#[test]
fn a_bad_duration_is_a_usage_error() {
    let dir = lab("journey-usage");
    for args in [
        &[
            "policy",
            "suggest",
            "--since",
            "3x",
            "--history",
            "history.jsonl",
            "--base",
            "base.yaml",
        ][..],
        &[
            "policy",
            "plan",
            "base.yaml",
            "--replay",
            "soon",
            "--history",
            "history.jsonl",
        ],
        &["map", "--since", "0d", "--history", "history.jsonl"],
    ] {
        let r = bulkhead(&dir, args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("bad duration"), "{}", r.stderr);
    }
    // A short window is warned about.
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "suggest",
            "--since",
            "2d",
            "--history",
            "history.jsonl",
            "--base",
            "base.yaml",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("covers 1d 1h only"), "{}", r.stderr);
}

#[test]
fn map_prints_json_and_dot() {
    let dir = lab("journey-map");
    let r = bulkhead(
        &dir,
        &[
            "map",
            "--history",
            "history.jsonl",
            "--policy",
            "base.yaml",
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let groups: Vec<&str> = j["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["admins", "db", "(no segment)", "(outside)"]);
    assert_eq!(j["edges"].as_array().unwrap().len(), 9);
    let r = bulkhead(
        &dir,
        &[
            "map",
            "--history",
            "history.jsonl",
            "--policy",
            "base.yaml",
            "-o",
            "dot",
            "--out",
            "map.dot",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let dot = std::fs::read_to_string(dir.path().join("map.dot")).unwrap();
    assert!(
        dot.contains("\"db-1\" -> \"web-2\" [label=\"deny tcp/8443 ×4 (default deny)\""),
        "{dot}"
    );
    // Other commands do not take the map's formats.
    let r = bulkhead(&dir, &["policy", "check", "base.yaml", "-o", "html"]);
    assert_eq!(r.code, Some(2));
}

/// The page in a real browser: the DOM Chromium builds from it (after its script ran) holds
/// every identity and edge; nothing is fetched.
#[test]
fn map_html_in_headless_chromium() {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing; scripts/test.sh installs it (apt-get install chromium)"
        );
        eprintln!("SKIPPED map_html_in_headless_chromium: no chromium (apt-get install chromium)");
        return;
    };
    let dir = lab("journey-html");
    let r = bulkhead(
        &dir,
        &[
            "map",
            "--history",
            "history.jsonl",
            "--policy",
            "base.yaml",
            "-o",
            "html",
            "--out",
            "map.html",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let page = std::fs::read_to_string(dir.path().join("map.html")).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page names no URL"
    );
    let url = format!("file://{}", dir.path().join("map.html").display());
    let o = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            // Anything it tried to fetch would go to a proxy that is not there.
            "--proxy-server=127.0.0.1:9",
            &format!("--user-data-dir={}", dir.path().join("chromium").display()),
            "--dump-dom",
            &url,
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        dom.contains("data-ready=\"true\""),
        "the script did not run:\n{dom}"
    );
    for id in ["web-1", "web-2", "db-1", "db-2", "bastion", "203.0.113.9"] {
        assert!(
            dom.contains(&format!("data-identity=\"{id}\"")),
            "{id} missing"
        );
    }
    for (from, to, verdict, path) in [
        ("web-1", "db-1", "allow", "overlay"),
        ("bastion", "db-2", "would-deny", "underlay"),
        ("db-1", "web-2", "deny", "overlay"),
    ] {
        let edge = format!("class=\"edge {verdict}\" data-from=\"{from}\" data-to=\"{to}\"");
        let at = dom.find(&edge).unwrap_or_else(|| panic!("no edge {edge}"));
        let tag = &dom[at..at + dom[at..].find('>').unwrap()];
        assert!(tag.contains(&format!("data-path=\"{path}\"")), "{tag}");
    }
    assert!(
        dom.contains("data-ports=\"tcp/5432\" data-count=\"40\""),
        "counts"
    );
    assert!(dom.contains("data-rules=\"admin-ssh\""), "rules");
    assert_eq!(dom.matches("class=\"group ").count(), 4);
}
