//! Helpers for the end-to-end tests: find the workspace's real binaries and run them.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, as `scripts/test.sh`
//! does); a test that finds none fails with that advice rather than testing something stale.

pub mod cluster;
pub mod handshake_flood;
pub mod scrape;
pub mod standalone;
pub use bulkhead_netlab as netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The path of a workspace binary, next to this test's own `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs a workspace binary with `args` in the workspace root and waits for it.
pub fn run(name: &str, args: &[&str]) -> Run {
    Command::new(bin(name))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
        .into()
}

pub use bulkhead_netlab::TempDir;

/// Whether namespace tests can run here. They must, unless BULKHEAD_SKIP_NETNS says otherwise:
/// a test that quietly does nothing would hide a broken setup.
pub fn netns_ok() -> bool {
    match netns::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("BULKHEAD_SKIP_NETNS").is_some() => {
            eprintln!("skipping: {why}");
            false
        }
        Err(why) => panic!(
            "namespace tests need root, ip netns and /dev/net/tun: {why} (BULKHEAD_SKIP_NETNS=1 skips them)"
        ),
    }
}
