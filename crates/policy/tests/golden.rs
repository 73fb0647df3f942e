//! Golden tests: policies in, compiled allowlists out, as JSON under `testdata/`.
//!
//! After an intended change, regenerate with `BULKHEAD_UPDATE_GOLDEN=1 cargo test -p
//! bulkhead-policy --test golden` and review the diff like any other change.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_policy::{Compiled, Conditions, load};

/// 2027-01-01T00:00:00Z: a fixed "now", so windows give the same result on every run.
const NOW: i64 = 1_798_761_600;

fn policies() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<PathBuf> = ["../../deploy/examples", "testdata"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("readable dir"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn compiled_allowlists_match_the_golden_files() {
    let update = std::env::var_os("BULKHEAD_UPDATE_GOLDEN").is_some();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut mismatches = Vec::new();
    let all = policies();
    assert!(
        all.len() >= 3,
        "expected the examples and testdata policies, found {all:?}"
    );
    for policy in all {
        let text = std::fs::read_to_string(&policy).expect("readable policy");
        let l = load(&text, NOW, &BTreeMap::new());
        assert!(l.is_valid(), "{}: {:?}", policy.display(), l.diagnostics);
        let m = l.model.expect("model");
        let lists = Compiled::new(&m, m.state(&Conditions::at(NOW))).allowlists(&m, 1);
        let got = serde_json::to_string_pretty(&lists).expect("json") + "\n";
        let stem = policy
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .to_string();
        let golden = root.join(format!("{stem}.allowlists.json"));
        if update {
            std::fs::write(&golden, &got).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == got => {}
            Ok(_) => mismatches.push(format!(
                "{} differs from {}",
                policy.display(),
                golden.display()
            )),
            Err(e) => mismatches.push(format!("{}: {e}", golden.display())),
        }
    }
    assert!(
        mismatches.is_empty(),
        "{}\nrerun with BULKHEAD_UPDATE_GOLDEN=1 if the change is intended",
        mismatches.join("\n")
    );
}
