//! The policy engine at scale: 10,000 identities, 1,000 segments, 10,000 rules.
//!
//! Run with `cargo bench -p bulkhead-policy --bench compile`. Targets (issue 2): a full compile
//! under 1 s, a recompile after one identity's labels change under 10 ms, `explain` under 10 µs.

#![allow(clippy::unwrap_used)] // benchmark code

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::LazyLock;

use bulkhead_policy::{Compiled, Conditions, Model, Probe, evaluate, load};

const NOW: i64 = 1_798_761_600;
const IDENTITIES: usize = 10_000;
const APPS: usize = 1_000;
const TEAMS: usize = 100;
const ENVS: &[&str] = &["prod", "dev", "staging"];

fn main() {
    divan::main();
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Labels of identity `i`: one of 1,000 apps, 100 teams and 3 environments.
fn labels(i: usize, shift: usize) -> BTreeMap<String, String> {
    let i = i + shift;
    BTreeMap::from([
        ("app".to_string(), format!("app-{}", i % APPS)),
        ("team".to_string(), format!("team-{}", (i / 7) % TEAMS)),
        ("env".to_string(), ENVS[i % ENVS.len()].to_string()),
    ])
}

/// Segments: 700 by app (about 10 members each), 200 by team and environment (about 33), 100
/// listing 5 identities. Rules: 10,000 between random segments, a tenth of them denies, some
/// with expiry or posture.
static POLICY: LazyLock<String> = LazyLock::new(|| {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut y = String::from("version: 1\nnetwork: { cidr: 10.0.0.0/16 }\nidentities:\n");
    for i in 0..IDENTITIES {
        let l = labels(i, 0);
        writeln!(
            y,
            "  host-{i}: {{ labels: {{ app: {}, team: {}, env: {} }} }}",
            l["app"], l["team"], l["env"]
        )
        .unwrap();
    }
    y += "segments:\n";
    for s in 0..1000 {
        match s {
            0..700 => writeln!(y, "  seg-{s}: {{ match: {{ app: app-{s} }} }}").unwrap(),
            700..900 => writeln!(
                y,
                "  seg-{s}: {{ match: {{ team: team-{}, env: {} }} }}",
                s % TEAMS,
                ENVS[s % 3]
            )
            .unwrap(),
            _ => {
                let ids: Vec<String> = (0..5)
                    .map(|_| format!("host-{}", r.below(IDENTITIES)))
                    .collect();
                writeln!(y, "  seg-{s}: {{ identities: [{}] }}", ids.join(", ")).unwrap()
            }
        }
    }
    y += "posture:\n  patched: { kernel.release: \">= 6.1\" }\nrules:\n";
    const PORTS: &[&str] = &[
        "tcp/22",
        "tcp/443",
        "tcp/5432",
        "tcp/8000-8100",
        "udp/53",
        "icmp",
    ];
    for i in 0..10_000 {
        let deny = i % 10 == 9;
        write!(
            y,
            "  - {{ name: rule-{i}, action: {}, from: [seg-{}], to: [seg-{}], ports: [{}, {}]",
            if deny { "deny" } else { "allow" },
            r.below(1000),
            r.below(1000),
            PORTS[r.below(PORTS.len())],
            PORTS[r.below(PORTS.len())]
        )
        .unwrap();
        if i % 20 == 3 {
            y += ", expires: 2030-01-01T00:00:00Z";
        }
        if !deny && i % 20 == 5 {
            y += ", posture: [patched]";
        }
        y += " }\n";
    }
    y
});

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    let l = load(&POLICY, NOW, &BTreeMap::new());
    assert!(
        l.is_valid(),
        "{:?}",
        &l.diagnostics[..3.min(l.diagnostics.len())]
    );
    l.model.unwrap()
});

/// Parse, validate and resolve the whole policy.
#[divan::bench(sample_count = 5)]
fn load_policy(b: divan::Bencher) {
    let text: &str = &POLICY;
    b.bench(|| load(text, NOW, &BTreeMap::new()));
}

/// Every pair's port tables.
#[divan::bench(sample_count = 5)]
fn compile_all_pairs(b: divan::Bencher) {
    let m = &*MODEL;
    b.bench(|| Compiled::new(m, m.state(&Conditions::at(NOW))));
}

/// Every pair's tables and all 10,000 allowlists: the full compile.
#[divan::bench(sample_count = 5)]
fn compile_all_allowlists(b: divan::Bencher) {
    let m = &*MODEL;
    b.bench(|| Compiled::new(m, m.state(&Conditions::at(NOW))).allowlists(m, 1));
}

/// From the policy's text to all 10,000 allowlists: load, then compile everything.
#[divan::bench(sample_count = 5)]
fn text_to_all_allowlists(b: divan::Bencher) {
    let text: &str = &POLICY;
    b.bench(|| {
        let m = load(text, NOW, &BTreeMap::new()).model.unwrap();
        Compiled::new(&m, m.state(&Conditions::at(NOW))).allowlists(&m, 1)
    });
}

/// The 10k model and its compiled pairs, with one identity whose labels go back and forth.
struct Relabel {
    m: Model,
    c: Compiled,
    id: u32,
    flip: bool,
}

impl Relabel {
    fn new() -> Relabel {
        let m = MODEL.clone();
        let c = Compiled::new(&m, m.state(&Conditions::at(NOW)));
        let id = m.identity("host-4242").unwrap();
        Relabel {
            m,
            c,
            id,
            flip: false,
        }
    }

    /// Changes the labels and recompiles that identity's pairs; returns who is affected.
    fn step(&mut self) -> Vec<u32> {
        self.flip = !self.flip;
        self.m
            .set_labels(self.id, labels(4242, usize::from(self.flip)));
        self.c.update_identity(&self.m, self.id)
    }
}

/// One identity's labels change: update the model, recompile its pairs, rebuild its allowlist
/// and patch the allowlists of every identity affected, as the controller does.
#[divan::bench(sample_count = 20)]
fn recompile_after_one_label_change(b: divan::Bencher) {
    let mut r = Relabel::new();
    let mut lists = r.c.allowlists(&r.m, 1);
    b.bench_local(|| {
        let affected = r.step();
        for &a in &affected {
            if a == r.id {
                lists[a as usize] = r.c.allowlist(&r.m, a, 2);
            } else {
                r.c.patch_allowlist(&r.m, &mut lists[a as usize], r.id);
            }
        }
        affected.len()
    });
}

/// The same, rebuilding every affected allowlist from scratch instead of patching.
#[divan::bench(sample_count = 20)]
fn recompile_and_rebuild_after_one_label_change(b: divan::Bencher) {
    let mut r = Relabel::new();
    b.bench_local(|| {
        let affected = r.step();
        affected
            .iter()
            .map(|&a| r.c.allowlist(&r.m, a, 2))
            .collect::<Vec<_>>()
    });
}

/// The same, without building the allowlists: only the pair tables.
#[divan::bench(sample_count = 20)]
fn recompile_pairs_only_after_one_label_change(b: divan::Bencher) {
    let mut r = Relabel::new();
    b.bench_local(|| r.step());
}

/// One `explain` query: the deciding rule for a random pair and port.
#[divan::bench(sample_count = 50, sample_size = 100)]
fn explain(b: divan::Bencher) {
    let m = &*MODEL;
    let st = m.state(&Conditions::at(NOW));
    let mut r = Rng(7);
    b.bench_local(|| {
        let a = r.below(IDENTITIES) as u32;
        let bb = r.below(IDENTITIES) as u32;
        evaluate(
            m,
            a,
            bb,
            Probe {
                proto: 6,
                port: 5432,
            },
            &st,
        )
    });
}
