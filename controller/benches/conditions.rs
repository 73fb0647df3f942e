//! A condition change at scale: one identity quarantined and released, in a view of 5,000
//! identities (50 tiers of 100, each tier allowed to the next, plus a forensics rule to the
//! `quarantined` segment), against the full compile and install that every condition change
//! cost before it was incremental.
//!
//! Run with `cargo bench -p bulkhead-controller --bench conditions`.

#![allow(clippy::unwrap_used)] // benchmark code

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::LazyLock;

use bulkhead_controller::records::{POLICY, PolicyRecord, QUARANTINE, encode};
use bulkhead_controller::view::View;
use bulkhead_policy::{Compiled, Conditions};
use bulkhead_proto::Quarantine;
use bulkhead_store::{Event, KeyValue};

const TIERS: usize = 50;
const PER_TIER: usize = 100;

fn main() {
    divan::main();
}

fn policy() -> String {
    let mut y =
        String::from("version: 1\nnetwork: {name: bench, cidr: 10.64.0.0/12}\nidentities:\n");
    for i in 0..TIERS * PER_TIER {
        writeln!(y, "  n{i}: {{labels: {{tier: t{}}}}}", i / PER_TIER).unwrap();
    }
    y += "segments:\n";
    for t in 0..TIERS {
        writeln!(y, "  t{t}: {{match: {{tier: t{t}}}}}").unwrap();
    }
    y += "rules:\n";
    for t in 0..TIERS - 1 {
        writeln!(
            y,
            "  - {{name: r{t}, from: [t{t}], to: [t{}], ports: [tcp/5432]}}",
            t + 1
        )
        .unwrap();
    }
    y += "  - {name: forensics, from: [t0], to: [quarantined], ports: [tcp/22]}\n";
    y
}

static RECORD: LazyLock<PolicyRecord> = LazyLock::new(|| PolicyRecord {
    revision: 1,
    text: policy(),
    source: "bench.yaml".into(),
    applied_at: 0,
    applied_by: "bench".into(),
    addresses: BTreeMap::new(),
});

fn kv(key: &str, value: Vec<u8>, rev: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value,
        mod_revision: rev,
    }
}

fn loaded() -> View {
    let (head, chunks) = RECORD.split();
    let mut kvs: Vec<KeyValue> = chunks.into_iter().map(|(k, b)| kv(&k, b, 1)).collect();
    kvs.push(kv(POLICY, encode(&head), 1));
    let mut v = View::default();
    v.load(&kvs);
    assert!(v.live().is_some());
    v
}

/// Quarantine a tier-25 identity (its 200 peers' allowlists change), then release it: two
/// condition changes, each recompiling one identity's pairs and patching its peers' allowlists.
#[divan::bench(sample_count = 20)]
fn quarantine_and_release_one(b: divan::Bencher) {
    let mut v = loaded();
    let q = Quarantine {
        since: 0,
        until: None,
        reason: "bench".into(),
        by: "bench".into(),
    };
    let key = format!("{QUARANTINE}n2500");
    let mut rev = 10;
    b.bench_local(|| {
        rev += 2;
        v.apply(&[Event::Put(kv(&key, encode(&q), rev))]);
        v.apply(&[Event::Delete {
            key: key.clone(),
            mod_revision: rev + 1,
        }]);
    });
}

/// What each of those two changes cost before: a full compile and every allowlist, twice.
#[divan::bench(sample_count = 5)]
fn full_recompile_twice(b: divan::Bencher) {
    let v = loaded();
    let live = v.live().unwrap();
    let m = &live.model;
    b.bench_local(|| {
        for _ in 0..2 {
            let state = m.state(&Conditions::at(0));
            let lists = Compiled::new(m, state).allowlists(m, 1);
            divan::black_box(lists.len());
        }
    });
}
