//! The `underlay` block in the offline policy commands, run as a user runs them: the real
//! binary on real files, with the exit codes and output forms of spec §3.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::process::Command;

use bulkhead_netlab::TempDir;

const POLICY: &str = r#"version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web, env: prod } }
  db-1: { labels: { app: db, env: prod } }
  dev-1: { labels: { env: dev } }
  bastion: { labels: { role: admin } }
segments:
  prod: { match: { env: prod } }
  web: { match: { app: web } }
  db: { match: { app: db } }
  admins: { match: { role: admin } }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
underlay:
  mode: enforce
  scope: [prod]
  allow:
    - name: mgmt-ssh
      from: [10.0.9.0/24, admins]
      to: ["*"]
      ports: [tcp/22]
    - { name: sync, from: [web], to: [db], ports: [tcp/873] }
"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `bulkhead` in `dir`, so that file names in diagnostics are as given.
fn bulkhead(dir: &TempDir, args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn an_invalid_underlay_block_is_rejected_with_file_line_col() {
    let dir = TempDir::new("underlay-check");
    let bad = POLICY
        .replace("mode: enforce", "mode: enforcing")
        .replace("[10.0.9.0/24, admins]", "[10.0.9.1/24, 0.0.0.0/0, admins]")
        .replace(
            "to: [db], ports: [tcp/873]",
            "to: [db, dev-1], ports: [tcp/0]",
        );
    dir.write("bad.yaml", &bad);
    let r = bulkhead(&dir, &["policy", "check", "bad.yaml"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains(": error: "))
        .collect();
    assert_eq!(
        errors,
        vec![
            "bad.yaml:16:9: error: unknown underlay mode \"enforcing\": expected off, observe or enforce",
            "bad.yaml:20:14: error: bad network \"10.0.9.1/24\": host bits are set; did you mean 10.0.9.0/24?",
            "bad.yaml:20:27: error: bad network \"0.0.0.0/0\": a /0 is every address; write \"*\" for that",
            "bad.yaml:23:43: error: identity \"dev-1\" is outside the underlay's scope",
            "bad.yaml:23:59: error: bad port \"tcp/0\": ports are 1 to 65535",
        ],
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("bad.yaml: invalid policy, 5 error(s)"));
    assert!(r.stdout.is_empty(), "{}", r.stdout);

    // Nothing else works on it either: the policy is rejected whole.
    let r = bulkhead(
        &dir,
        &["policy", "explain", "bad.yaml", "web-1", "db-1", "tcp/5432"],
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.is_empty());
}

#[test]
fn check_names_the_underlay_mode() {
    let dir = TempDir::new("underlay-check-ok");
    dir.write("p.yaml", POLICY);
    let r = bulkhead(&dir, &["policy", "check", "p.yaml"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("underlay enforce on 2 identities (scope prod), 2 allow entries"),
        "{}",
        r.stdout
    );
    let j = bulkhead(&dir, &["policy", "check", "p.yaml", "-o", "json"]).json();
    assert_eq!(j["underlay"]["mode"], "enforce");
    assert_eq!(j["underlay"]["scope"][0], "prod");
}

#[test]
fn explain_over_the_underlay_allows_denies_or_says_what_it_depends_on() {
    let dir = TempDir::new("underlay-explain");
    dir.write("p.yaml", POLICY);
    let explain = |from: &str, to: &str, port: &str, extra: &[&str]| {
        let mut args = vec![
            "policy", "explain", "p.yaml", from, to, port, "--path", "underlay",
        ];
        args.extend_from_slice(extra);
        bulkhead(&dir, &args)
    };

    // Allowed at both ends by the same entry.
    let r = explain("web-1", "db-1", "tcp/873", &["-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["path"], "underlay");
    assert_eq!(j["verdict"], "allow");
    assert_eq!(j["rule"], "sync");
    assert_eq!(j["location"], "p.yaml:23");
    assert_eq!(j["outbound"]["result"], "allowed");
    assert_eq!(j["inbound"]["result"], "allowed");
    assert_eq!(j["inbound"]["mode"], "enforce");

    // Denied: db-1's server may open nothing to another server.
    let r = explain("db-1", "web-1", "tcp/873", &[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("deny: db-1 -> web-1 tcp/873 over the underlay\n")
    );
    assert!(
        r.stdout
            .contains("drops it: no entry lets db-1 connect to web-1 on tcp/873"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("WireGuard to the daemon's port and the controller API are always open"),
        "{}",
        r.stdout
    );

    // dev-1's server is outside the scope; db-1 admits SSH only from the management network.
    let r = explain("dev-1", "db-1", "tcp/22", &["-o", "json"]);
    assert_eq!(r.code, Some(1));
    let j = r.json();
    assert_eq!(j["verdict"], "depends");
    assert_eq!(j["rule"], serde_json::Value::Null);
    assert_eq!(j["outbound"]["result"], "not-filtered");
    assert_eq!(j["outbound"]["in_scope"], false);
    assert_eq!(j["inbound"]["result"], "depends-on-address");
    assert_eq!(j["inbound"]["if_address_in"][0]["entry"], "mgmt-ssh");
    assert_eq!(
        j["inbound"]["if_address_in"][0]["networks"][0],
        "10.0.9.0/24"
    );
    let r = explain("dev-1", "db-1", "tcp/22", &["--from-address", "10.0.9.20"]);
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert!(r.stdout.starts_with("allow: "), "{}", r.stdout);
    let r = explain("dev-1", "db-1", "tcp/22", &["--from-address", "10.0.8.20"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.starts_with("deny: "), "{}", r.stdout);

    // Quarantined web-1 keeps its inbound entries but loses the outbound ones.
    let r = explain("web-1", "db-1", "tcp/873", &["--quarantined", "web-1"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("web-1 is quarantined"), "{}", r.stdout);
    let r = explain("bastion", "web-1", "tcp/22", &["--quarantined", "web-1"]);
    assert_eq!(r.code, Some(0), "{}", r.stdout);

    // The overlay is still the default, and the options that belong to one path only say so.
    let r = bulkhead(
        &dir,
        &[
            "policy", "explain", "p.yaml", "web-1", "db-1", "tcp/873", "-o", "json",
        ],
    );
    assert_eq!(r.code, Some(1));
    assert_eq!(r.json()["verdict"], "deny");
    let r = bulkhead(
        &dir,
        &[
            "policy",
            "explain",
            "p.yaml",
            "web-1",
            "db-1",
            "tcp/22",
            "--from-address",
            "10.0.9.1",
        ],
    );
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr
            .contains("--from-address goes with --path underlay")
    );
    let r = explain("web-1", "db-1", "tcp/22", &["--failing", "patched"]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("posture does not apply to the underlay"));
}

#[test]
fn diff_shows_an_underlay_mode_change() {
    let dir = TempDir::new("underlay-diff");
    dir.write("old.yaml", POLICY);
    dir.write(
        "new.yaml",
        &POLICY.replace("mode: enforce", "mode: observe"),
    );
    let r = bulkhead(&dir, &["policy", "diff", "old.yaml", "new.yaml"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "no change in reachability over the overlay",
            "",
            "UNDERLAY  BEFORE   AFTER",
            "mode      enforce  observe",
            "",
            "SERVER  UNDERLAY MODE       GAINED  LOST",
            "db-1    enforce -> observe  -       -",
            "web-1   enforce -> observe  -       -",
            "2 server(s) change their underlay firewall",
        ],
        "{}",
        r.stdout
    );

    let j = bulkhead(
        &dir,
        &["policy", "diff", "old.yaml", "new.yaml", "-o", "json"],
    )
    .json();
    assert_eq!(j["changes"], serde_json::json!([]));
    assert_eq!(
        j["underlay"]["block"],
        serde_json::json!([{ "item": "mode", "before": "enforce", "after": "observe" }])
    );
    assert_eq!(j["underlay"]["servers"][0]["identity"], "db-1");
    assert_eq!(j["underlay"]["servers"][0]["after"], "observe");

    // Without the block, JSON has no `underlay` key, as before it existed.
    let plain = &POLICY[..POLICY.find("underlay:").unwrap()];
    dir.write("plain.yaml", plain);
    let j = bulkhead(
        &dir,
        &["policy", "diff", "plain.yaml", "plain.yaml", "-o", "json"],
    )
    .json();
    assert!(j.get("underlay").is_none(), "{j}");
    let r = bulkhead(&dir, &["policy", "diff", "old.yaml", "old.yaml"]);
    assert_eq!(r.stdout, "no change in reachability\n");
}
