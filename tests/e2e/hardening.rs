//! Attacks and failures from the hardening review (issue 13), run against the real binaries in
//! network namespaces: each test is the attack, and checks that it no longer works.
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
