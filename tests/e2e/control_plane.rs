//! Attacks on the control plane and on private state from the hardening review (issue 13), run
//! against the real binaries in network namespaces: each test is the attack, and checks that it
//! no longer works. (The data plane's are in `hardening.rs`.)
//!
//! Needs root, `ip netns` and `/dev/net/tun` (`scripts/test.sh` installs the tools).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use bulkhead_e2e::cluster::{Cluster, web_db_policy};
use bulkhead_e2e::netns_ok;

const RULES: &str = "rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
";

/// Every file and directory under `dir` that group or others can read, write or enter.
fn loose(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let meta = std::fs::symlink_metadata(&d).expect("stat");
        if meta.mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", d.display(), meta.mode() & 0o777));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                todo.push(e.expect("entry").path());
            }
        }
    }
    out
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .permissions()
        .mode()
        & 0o777
}

/// Under a umask of 022 (files 0644, directories 0755 by default), everything the controller
/// and the daemons create is private from the start: the store holds the CA's key, the state
/// directories the nodes' keys and credentials, and the UAPI socket answers with the private key.
#[test]
fn state_is_private_whatever_the_umask() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    c.wrap = ["sh", "-c", "umask 022; exec \"$0\" \"$@\""]
        .map(String::from)
        .to_vec();
    let policy = c
        .files
        .write("policy.yaml", &web_db_policy("priv", "10.93.0.0/24", RULES));
    c.start_controller("controller", &policy, &[]);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    c.start_daemon("web-1", "bulkheadd", Some(&tw));
    c.start_daemon("db-1", "bulkheadd", Some(&td));
    c.converge(&["web-1", "db-1"]);

    let ctl = c.state("ctl");
    assert_eq!(mode(&ctl), 0o700, "the controller's state directory");
    assert_eq!(
        mode(&format!("{ctl}/store.redb")),
        0o600,
        "the store, with the CA key"
    );
    assert_eq!(mode(&format!("{ctl}/admin.yaml")), 0o600);
    assert_eq!(
        mode(&format!("{ctl}/flows.redb")),
        0o600,
        "the flow history, who talks to whom"
    );
    for n in ["web-1", "db-1"] {
        let state = c.state(n);
        assert_eq!(mode(&state), 0o700, "{n}'s state directory");
        for f in ["private.key", "enrollment.json", "config.json"] {
            assert_eq!(mode(&format!("{state}/{f}")), 0o600, "{n}: {f}");
        }
        let socket = format!("/var/run/wireguard/{}.sock", c.lab.host(n).interface);
        assert_eq!(mode(&socket), 0o600, "{n}'s UAPI socket");
    }
    for dir in [ctl, c.state("web-1"), c.state("db-1")] {
        let l = loose(Path::new(&dir));
        assert!(l.is_empty(), "readable by others: {l:?}");
    }
}

/// `n` inbound denials of new flows by `from` (at `address`), as a node's flow log writes them.
fn inbound_denials(from: &str, address: &str, n: usize) -> serde_json::Value {
    let now = bulkhead_e2e::cluster::unix_ms() as i64;
    let flows: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "at": now + i as i64, "outbound": false, "peer": from, "peer_address": address,
                "proto": "tcp", "port": 20000 + i, "allowed": false, "reason": "not_allowed"
            })
        })
        .collect();
    serde_json::json!({ "flows": flows, "dropped": 0 })
}

/// A node can get nobody quarantined by reporting lies about them: not when the identity is
/// not its peer (the entries are refused), and not when it is (one node's word counts for at
/// most half the threshold). db-1's allowed flow from web-1 works throughout.
#[test]
fn a_node_cannot_get_another_identity_quarantined() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1", "dev-1"]);
    let policy = "version: 1
network: { name: forge, cidr: 10.94.0.0/24 }
identities:
  web-1: { labels: { tier: web } }
  db-1: { labels: { tier: db } }
  dev-1: { labels: { tier: dev } }
segments:
  web: { match: { tier: web } }
  db: { match: { tier: db } }
quarantine: { denied_per_minute: 50, duration: 1h }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
";
    let policy = c.files.write("policy.yaml", policy);
    c.start_controller("controller", &policy, &[]);
    for n in ["web-1", "db-1", "dev-1"] {
        let t = c.token(n);
        c.start_daemon(n, "bulkheadd", Some(&t));
    }
    c.converge(&["web-1", "db-1", "dev-1"]);
    let db = c.addresses["db-1"].clone();
    c.lab.spawn(
        "db-1",
        "listen",
        &[
            &bulkhead_e2e::bin("bh-probe").display().to_string(),
            "listen",
            "5432",
            "60",
        ],
    );
    assert!(c.connect_eventually("web-1", "db-1", 5432));

    // dev-1 has no rules, so no peers: 200 "db-1 attacked me" entries are refused.
    assert_eq!(
        c.post_flows_as("dev-1", &inbound_denials("db-1", &db, 200)),
        200
    );
    // web-1 is db-1's peer: its 200 are counted, but as one witness's, at most 25 of 50.
    assert_eq!(
        c.post_flows_as("web-1", &inbound_denials("db-1", &db, 200)),
        200
    );
    // A batch larger than any daemon's flow log is refused whole.
    assert_eq!(
        c.post_flows_as("web-1", &inbound_denials("db-1", &db, 10_001)),
        400
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let db1 = c
        .nodes()
        .into_iter()
        .find(|n| n["identity"] == "db-1")
        .expect("db-1");
    assert!(db1["quarantine"].is_null(), "db-1 was quarantined: {db1}");
    assert!(
        c.connect("web-1", "db-1", 5432),
        "db-1's allowed flow still works"
    );
    // The flow log holds web-1's counted entries, none of dev-1's.
    let r = c.cli(&["flows", "-o", "json", "--limit", "100000"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let flows = r.json().as_array().cloned().unwrap_or_default();
    let from = |node: &str| flows.iter().filter(|f| f["node"] == node).count();
    assert_eq!(from("dev-1"), 0, "dev-1's claims are not kept");
    assert!(from("web-1") >= 200, "web-1's are, as its word");

    // Underlay entries (the host firewall's) name any address, and the controller names the
    // server behind it; they are the node's word and never count towards a quarantine:
    // 200 "db-1's server attacked mine over the underlay" from dev-1 quarantine nobody.
    let db_underlay = c.lab.host("db-1").underlay.clone();
    let mut underlay = inbound_denials("db-1", &db_underlay, 200);
    for f in underlay["flows"].as_array_mut().expect("flows") {
        f["path"] = "underlay".into();
    }
    assert_eq!(c.post_flows_as("dev-1", &underlay), 200);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let db1 = c
        .nodes()
        .into_iter()
        .find(|n| n["identity"] == "db-1")
        .expect("db-1");
    assert!(db1["quarantine"].is_null(), "db-1 was quarantined: {db1}");
    let r = c.cli(&["flows", "-o", "json", "--path", "underlay"]);
    let flows = r.json().as_array().cloned().unwrap_or_default();
    assert_eq!(flows.len(), 200, "{}", r.stderr);
    assert!(
        flows
            .iter()
            .all(|f| f["src"] == "db-1" && f["dst"] == "dev-1" && f["node"] == "dev-1"),
        "named from the addresses the controller saw: {:?}",
        flows.first()
    );

    // What a node reports reaches the operator's terminal escaped: a rule "name" with escape
    // sequences (set the window title, clear the screen) is shown, not obeyed.
    let evil = serde_json::json!({ "flows": [{
        "at": bulkhead_e2e::cluster::unix_ms() as i64, "outbound": true, "peer_address": db,
        "proto": "tcp", "port": 5432, "allowed": true, "rule": "x\u{1b}]0;pwned\u{7}\u{1b}[2J"
    }], "dropped": 0 });
    assert_eq!(c.post_flows_as("web-1", &evil), 200);
    let r = c.cli(&["flows", "--limit", "5"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("x\\u{1b}]0;pwned") && !r.stdout.contains('\u{1b}'),
        "{:?}",
        r.stdout
    );
}

/// A join token need not be on the command line, where every user of the host reads it
/// (`/proc/*/cmdline`): `--token-file` and `$BULKHEAD_TOKEN` enroll as well.
#[test]
fn a_join_token_need_not_be_on_the_command_line() {
    if !netns_ok() {
        return;
    }
    let mut c = Cluster::new(&["web-1", "db-1"]);
    let policy = c.files.write(
        "policy.yaml",
        &web_db_policy("token", "10.95.0.0/24", RULES),
    );
    c.start_controller("controller", &policy, &[]);
    let (tw, td) = (c.token("web-1"), c.token("db-1"));
    let file = c.files.write("web-1.token", &format!("{tw}\n"));
    c.start_daemon_with("web-1", "bulkheadd", None, &["--token-file", &file]);
    c.wrap = vec!["env".into(), format!("BULKHEAD_TOKEN={td}")];
    c.start_daemon("db-1", "bulkheadd", None);
    c.converge(&["web-1", "db-1"]);
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        for t in [&tw, &td] {
            assert!(
                !cmdline.contains(t.as_str()),
                "a token on a command line: {cmdline}"
            );
        }
    }
}
