//! The offline `bulkhead policy` commands, run as a user runs them: the real binary, real files,
//! exit codes and output formats as `../shared/spec.md` §3 fixes them.

use std::collections::BTreeSet;

use bulkhead_e2e::{TempDir, run};

const THREE_TIER: &str = "deploy/examples/three-tier.yaml";
const COMPANY: &str = "deploy/examples/company.yaml";

fn bulkhead(args: &[&str]) -> bulkhead_e2e::Run {
    run("bulkhead", args)
}

/// `bulkhead policy explain FILE FROM TO PORT EXTRA...`.
fn explain(file: &str, from: &str, to: &str, port: &str, extra: &[&str]) -> bulkhead_e2e::Run {
    let mut args = vec!["policy", "explain", file, from, to, port];
    args.extend_from_slice(extra);
    bulkhead(&args)
}

#[test]
fn the_examples_are_valid_and_their_tests_pass() {
    for f in [THREE_TIER, COMPANY] {
        let r = bulkhead(&["policy", "check", f]);
        assert_eq!(r.code, Some(0), "{f}: {}", r.stderr);
        assert!(r.stdout.contains("valid"), "{}", r.stdout);
        let r = bulkhead(&["policy", "test", f, "-o", "json"]);
        assert_eq!(r.code, Some(0), "{f}: {}", r.stderr);
        let j = r.json();
        assert_eq!(j["failed"], 0);
        assert!(j["passed"].as_u64().unwrap_or(0) >= 10, "{j}");
    }
}

#[test]
fn check_reports_every_error_with_file_line_col_and_exits_1() {
    let dir = TempDir::new("check");
    let f = dir.write(
        "bad.yaml",
        "version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web }, adress: 10.0.0.1 }
  db-1: { address: 10.9.9.9 }
segments:
  web: { match: { app: web } }
rules:
  - { name: r, from: [web, ghost], to: [db-1], ports: [tcp/99999] }
",
    );
    let r = bulkhead(&["policy", "check", &f]);
    assert_eq!(r.code, Some(1));
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains(": error: "))
        .collect();
    assert_eq!(
        errors,
        vec![
            format!(
                "{f}:4:34: error: unknown key \"adress\" in identity \"web-1\"; expected one of: labels, address, description"
            ),
            format!("{f}:5:20: error: address 10.9.9.9 is outside the network 10.0.0.0/24"),
            format!("{f}:9:28: error: undefined segment or identity \"ghost\""),
            format!("{f}:9:56: error: bad port \"tcp/99999\": ports are 1 to 65535"),
        ],
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.is_empty(),
        "results go to stdout, diagnostics to stderr"
    );

    let r = bulkhead(&["policy", "check", &f, "-o", "json"]);
    assert_eq!(r.code, Some(1));
    let j = r.json();
    assert_eq!(j["valid"], false);
    assert_eq!(j["diagnostics"].as_array().map(Vec::len), Some(4));
    assert_eq!(j["diagnostics"][0]["line"], 4);
    assert_eq!(j["diagnostics"][0]["col"], 34);
}

#[test]
fn a_failing_test_fails_check_and_test() {
    let dir = TempDir::new("tests");
    let text = std::fs::read_to_string(bulkhead_e2e::root().join(THREE_TIER)).unwrap_or_default();
    let broken = text.replace(
        "  - { from: web-1, to: db-1, port: tcp/5432, expect: deny }",
        "  - { from: web-1, to: db-1, port: tcp/5432, expect: allow }",
    );
    assert_ne!(text, broken);
    let f = dir.write("p.yaml", &broken);
    let r = bulkhead(&["policy", "test", &f]);
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("FAIL"), "{}", r.stdout);
    assert!(r.stdout.contains("1 of 15 tests fail"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("error: test failed: web-1 -> db-1 tcp/5432: expected allow, got deny"),
        "{}",
        r.stderr
    );
    let r = bulkhead(&["policy", "check", &f]);
    assert_eq!(r.code, Some(1));
}

#[test]
fn explain_names_the_rule_and_its_line_and_exits_by_verdict() {
    let r = explain(THREE_TIER, "api-1", "db-1", "tcp/5432", &["-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["verdict"], "allow");
    assert_eq!(j["rule"], "api-to-db");
    assert_eq!(j["location"], format!("{THREE_TIER}:37"));

    let r = explain(THREE_TIER, "web-1", "db-1", "tcp/5432", &["-o", "json"]);
    assert_eq!(
        r.code,
        Some(1),
        "a denial the command was asked about exits 1"
    );
    let j = r.json();
    assert_eq!(j["verdict"], "deny");
    assert_eq!(j["rule"], serde_json::Value::Null);

    // A deny rule decides, and the table form says so with FILE:LINE.
    let r = explain(THREE_TIER, "bastion", "db-1", "tcp/5432", &[]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stdout.starts_with("deny: bastion -> db-1 tcp/5432"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("no-admin-on-db-data ({THREE_TIER}:45)")),
        "{}",
        r.stdout
    );
}

#[test]
fn explain_lists_the_conditions_of_the_verdict() {
    let r = explain(
        COMPANY,
        "admin-alice",
        "prod-db-1",
        "tcp/22",
        &["-o", "json"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let checks: BTreeSet<String> = r.json()["depends_on"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["kind"] == "posture")
        .filter_map(|d| d["check"].as_str().map(String::from))
        .collect();
    assert_eq!(
        checks,
        BTreeSet::from(["patched".into(), "disk-encrypted".into()])
    );

    let r = explain(
        COMPANY,
        "admin-alice",
        "prod-db-1",
        "tcp/22",
        &["--failing", "patched"],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stdout.contains("admin-alice fails posture: patched"),
        "{}",
        r.stdout
    );

    let r = explain(
        COMPANY,
        "contractor",
        "dev-web-1",
        "tcp/8080",
        &["--at", "2027-01-01T00:00:00Z", "-o", "json"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["depends_on"][0]["kind"], "expires");
    assert_eq!(j["depends_on"][0]["at"], "2030-06-30T17:00:00Z");

    let r = explain(
        COMPANY,
        "contractor",
        "dev-web-1",
        "tcp/8080",
        &["--at", "2031-01-01T00:00:00Z"],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stdout.contains("expired at 2030-06-30T17:00:00Z"),
        "{}",
        r.stdout
    );
}

#[test]
fn matrix_agrees_with_explain_on_every_pair() {
    let r = bulkhead(&["policy", "matrix", THREE_TIER, "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json();
    let names: Vec<String> = j["identities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names.len(), 6);
    let pairs: BTreeSet<(String, String, String)> = j["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let (f, t) = (
                p["from"].as_str().unwrap_or(""),
                p["to"].as_str().unwrap_or(""),
            );
            p["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |x| Some((f.to_string(), t.to_string(), x.as_str()?.to_string())))
        })
        .collect();
    for from in &names {
        for to in names.iter().filter(|t| *t != from) {
            for port in ["tcp/22", "tcp/5432", "tcp/8080", "tcp/9000", "icmp"] {
                let r = explain(THREE_TIER, from, to, port, &["-o", "json"]);
                let allowed = r.json()["verdict"] == "allow";
                let in_matrix = pairs.iter().any(|(f, t, p)| {
                    f == from
                        && t == to
                        && (p == port || (port == "tcp/9000" && p == "tcp/9000-9001"))
                });
                assert_eq!(allowed, in_matrix, "{from} -> {to} {port}");
                assert_eq!(r.code, Some(if allowed { 0 } else { 1 }));
            }
        }
    }
}

#[test]
fn matrix_table_groups_identities_by_segment() {
    let r = bulkhead(&["policy", "matrix", THREE_TIER]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains("6 identities in 5 groups"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("web-1, web-2"), "{}", r.stdout);
    assert!(r.stdout.contains("tcp/9000-9001"), "{}", r.stdout);
}

#[test]
fn diff_shows_reachability_gained_and_lost_pair_by_pair() {
    let dir = TempDir::new("diff");
    let text = std::fs::read_to_string(bulkhead_e2e::root().join(THREE_TIER)).unwrap_or_default();
    let new = text
        .replace(
            "    ports: [tcp/5432]\n  - name: admin-ssh",
            "    ports: [tcp/5432, tcp/6432]\n  - name: admin-ssh",
        )
        .replace("    ports: [tcp/8080]\n", "    ports: [tcp/8443]\n");
    // The old tests no longer hold; this is about the diff, so drop them.
    let new = new[..new.find("\ntests:").unwrap_or(new.len())].to_string();
    assert_ne!(text, new);
    let f = dir.write("new.yaml", &new);
    let r = bulkhead(&["policy", "diff", THREE_TIER, &f, "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let changes = r.json()["changes"].clone();
    let got: Vec<(String, String, String, String)> = changes
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |v: &serde_json::Value| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            (
                c["from"].as_str().unwrap_or("").to_string(),
                c["to"].as_str().unwrap_or("").to_string(),
                s(&c["gained"]),
                s(&c["lost"]),
            )
        })
        .collect();
    let want: Vec<(String, String, String, String)> = [
        ("api-1", "db-1", "tcp/6432", ""),
        ("lb-1", "web-1", "tcp/8443", "tcp/8080"),
        ("lb-1", "web-2", "tcp/8443", "tcp/8080"),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    assert_eq!(got, want);

    let r = bulkhead(&["policy", "diff", THREE_TIER, THREE_TIER]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains("no change in reachability"),
        "{}",
        r.stdout
    );
}

#[test]
fn yaml_output_is_yaml() {
    let r = explain(THREE_TIER, "api-1", "db-1", "tcp/5432", &["-o", "yaml"]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.lines().any(|l| l == "verdict: allow"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.lines().any(|l| l == "rule: api-to-db"),
        "{}",
        r.stdout
    );
}

#[test]
fn usage_and_file_errors_exit_2() {
    for args in [
        vec!["policy", "explain", THREE_TIER, "api-1", "db-1", "tcp/0"],
        vec!["policy", "explain", THREE_TIER, "nobody", "db-1", "tcp/22"],
        vec!["policy", "check", "/nonexistent/policy.yaml"],
        vec!["policy", "check", THREE_TIER, "--at", "yesterday"],
        vec!["policy", "frobnicate"],
        vec!["policy", "check", THREE_TIER, "-o", "xml"],
    ] {
        let r = bulkhead(&args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.is_empty(), "{args:?} says why");
    }
}

#[test]
fn completions_and_man_page() {
    let r = bulkhead(&["completions", "bash"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("bulkhead"), "{}", r.stdout);
    let r = bulkhead(&["man"]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains(".TH bulkhead"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
    let dir = TempDir::new("man");
    let r = bulkhead(&["man", "--dir", &dir.path().display().to_string()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(dir.path().join("bulkhead-policy-explain.1").exists());
}

#[test]
fn an_alias_bomb_is_refused_quickly_with_its_position() {
    // 378 bytes that would expand to 9^9 values: the "billion laughs".
    let mut text = "a: &a [x, x, x, x, x, x, x, x, x]\n".to_string();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        let alias = format!("*{}", w[0]);
        text += &format!("{}: &{} [{}]\n", w[1], w[1], vec![alias; 9].join(", "));
    }
    let dir = TempDir::new("bomb");
    let f = dir.write("bomb.yaml", &text);
    let started = std::time::Instant::now();
    let r = bulkhead(&["policy", "check", &f]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{f}:6:4: error: the policy holds more than")),
        "{}",
        r.stderr
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A file far past the limit is refused by its size, without reading all of it.
    let big = dir.write("big.yaml", &"# padding\n".repeat(1_000_000));
    let r = bulkhead(&["policy", "check", &big]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("error: the policy is larger than 8 MiB"),
        "{}",
        r.stderr
    );
}

/// Runs `bulkhead ARGS` with stdout a pipe whose reader is already gone, as in
/// `bulkhead … | head -c1` once `head` has had its byte.
fn with_closed_stdout(args: &[&str]) -> bulkhead_e2e::Run {
    let (reader, writer) = std::io::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
    drop(reader);
    std::process::Command::new(bulkhead_e2e::bin("bulkhead"))
        .args(args)
        .current_dir(bulkhead_e2e::root())
        .stdout(writer)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bulkhead: {e}"))
        .into()
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    for args in [
        vec!["policy", "compile", COMPANY, "-o", "json"],
        vec!["policy", "compile", COMPANY],
        vec!["policy", "matrix", THREE_TIER],
        vec!["policy", "check", THREE_TIER, "-o", "yaml"],
        vec!["policy", "explain", THREE_TIER, "api-1", "db-1", "tcp/5432"],
        vec!["completions", "bash"],
        vec!["man"],
    ] {
        let r = with_closed_stdout(&args);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("Broken pipe"), "{args:?}: {}", r.stderr);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn diff_and_matrix_show_conditions_of_access() {
    let dir = TempDir::new("conditions");
    let text = std::fs::read_to_string(bulkhead_e2e::root().join(COMPANY)).unwrap_or_default();
    // admin-ssh loses its posture; the contractor's expiry moves by 70 years.
    let new = text
        .replace("    posture: [patched, disk-encrypted]\n", "")
        .replace(
            "expires: 2030-06-30T17:00:00Z",
            "expires: 2100-06-30T17:00:00Z",
        );
    let new = new[..new.find("\ntests:").unwrap_or(new.len())].to_string();
    assert_ne!(text, new);
    let f = dir.write("new.yaml", &new);
    let at = ["--at", "2027-01-01T00:00:00Z"];

    let r = bulkhead(&["policy", "diff", COMPANY, &f, at[0], at[1]]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        !r.stdout.contains("no change in reachability"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("posture patched+disk-encrypted"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("until 2100-06-30T17:00:00Z"),
        "{}",
        r.stdout
    );

    let r = bulkhead(&["policy", "diff", COMPANY, &f, at[0], at[1], "-o", "json"]);
    let j = r.json();
    assert_eq!(j["changes"].as_array().map(Vec::len), Some(0), "{j}");
    let conditions = j["conditions"].as_array().cloned().unwrap_or_default();
    let contractor = conditions
        .iter()
        .find(|c| c["from"] == "contractor")
        .unwrap_or_else(|| panic!("{j}"));
    assert_eq!(contractor["before"][0]["expires"], "2030-06-30T17:00:00Z");
    assert_eq!(contractor["after"][0]["expires"], "2100-06-30T17:00:00Z");
    let admin = conditions
        .iter()
        .find(|c| c["from"] == "admin-alice")
        .unwrap_or_else(|| panic!("{j}"));
    assert_eq!(admin["before"][0]["posture"][0], "patched");
    assert_eq!(admin["after"], serde_json::json!([]));

    // The matrix marks access that is not permanent.
    let r = bulkhead(&["policy", "matrix", COMPANY, at[0], at[1], "-o", "json"]);
    let j = r.json();
    let pair = |from: &str, to: &str| {
        j["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["from"] == from && p["to"] == to)
            .cloned()
            .unwrap_or_else(|| panic!("{from} -> {to}: {j}"))
    };
    assert_eq!(
        pair("contractor", "dev-web-1")["conditions"][0]["expires"],
        "2030-06-30T17:00:00Z"
    );
    assert_eq!(
        pair("ci-runner", "dev-web-1")["conditions"],
        serde_json::json!([])
    );
    let r = bulkhead(&["policy", "matrix", COMPANY, at[0], at[1]]);
    assert!(
        r.stdout.contains("posture patched+disk-encrypted"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("1*"), "{}", r.stdout);
}

#[test]
fn explain_and_test_take_sample_facts() {
    let dir = TempDir::new("facts");
    let old_kernel = dir.write(
        "old.yaml",
        "admin-alice: { os.id: debian, kernel.release: 5.10.0-28-amd64, root_fs.encrypted: true }\n",
    );
    let good = dir.write(
        "good.yaml",
        "admin-alice: { os.id: debian, kernel.release: 6.1.0-18-amd64, root_fs.encrypted: true }\n",
    );
    let r = explain(
        COMPANY,
        "admin-alice",
        "prod-db-1",
        "tcp/22",
        &["--facts", &old_kernel, "-o", "json"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["verdict"], "deny");
    assert_eq!(
        j["facts"][0],
        "admin-alice fails patched: kernel.release 5.10.0-28-amd64 < 6.1"
    );
    let r = explain(
        COMPANY,
        "admin-alice",
        "prod-db-1",
        "tcp/22",
        &["--facts", &good],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // The tests run against the facts too: the one expecting alice's access now fails.
    let r = bulkhead(&["policy", "test", COMPANY, "--facts", &old_kernel]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stdout.contains("1 of 21 tests fail"), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!(
            "{COMPANY}:114:5: error: test failed: admin-alice -> prod-db-1 tcp/22"
        )),
        "{}",
        r.stderr
    );
    let r = bulkhead(&["policy", "test", COMPANY, "--facts", &good]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    let nobody = dir.write("nobody.yaml", "mallory: { os.id: debian }\n");
    let r = bulkhead(&["policy", "test", COMPANY, "--facts", &nobody]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("no identity named \"mallory\""),
        "{}",
        r.stderr
    );
}
