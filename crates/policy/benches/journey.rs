//! Rolling out at scale: 30 days of flow history for 1,000 identities.
//!
//! `cargo bench -p bulkhead-policy --bench journey` measures `suggest` and `replay` on the
//! history in memory. `cargo bench -p bulkhead-policy --bench journey -- --write DIR` writes the
//! same history as `DIR/history.jsonl` (JSON lines of flow aggregates, as `bulkhead flows -o
//! json` prints them) and the policy as `DIR/base.yaml`, to time the CLI end to end:
//!
//! ```sh
//! time bulkhead policy suggest --history DIR/history.jsonl --base DIR/base.yaml --full > DIR/full.yaml
//! time bulkhead policy plan DIR/full.yaml --history DIR/history.jsonl
//! time bulkhead map --history DIR/history.jsonl --policy DIR/base.yaml -o html --out DIR/map.html
//! ```
//!
//! Targets (issue 15): suggest and replay under 5 s, the map under 2 s, from the file.
//!
//! The estate: 100 apps of 10 identities (labels `app`, `env`, `team`), a segment per app. Each
//! app's members open connections to every member of two other apps on one port each, in 12
//! random hours of the 720; an app in ten also to an address outside the estate; one
//! identity in fifty scans 40 ports of another (denied); and a few servers get replies
//! mislabelled as flows to ephemeral ports.

#![allow(clippy::unwrap_used)] // benchmark code

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::LazyLock;

use bulkhead_policy::observed::{Flow, Seen, Way};
use bulkhead_policy::suggest::{Options, suggest};
use bulkhead_policy::{Conditions, Model, Probe, load};

const NOW: i64 = 1_800_000_000;
const APPS: usize = 100;
const PER_APP: usize = 10;
const DAYS: i64 = 30;
const HOURS_SEEN: usize = 12;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--write") {
        let dir = std::path::PathBuf::from(&args[i + 1]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base.yaml"), &*POLICY).unwrap();
        let mut out = String::with_capacity(FLOWS.len() * 260);
        for f in FLOWS.iter() {
            out += &json(f);
            out.push('\n');
        }
        std::fs::write(dir.join("history.jsonl"), out).unwrap();
        eprintln!(
            "wrote {} aggregates to {}",
            FLOWS.len(),
            dir.join("history.jsonl").display()
        );
        return;
    }
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

fn host(app: usize, i: usize) -> String {
    format!("app{app}-{i}")
}

static POLICY: LazyLock<String> = LazyLock::new(|| {
    let mut y = String::from("version: 1\nnetwork: { cidr: 10.0.0.0/20 }\nidentities:\n");
    for a in 0..APPS {
        for i in 0..PER_APP {
            writeln!(
                y,
                "  {}: {{ labels: {{ app: a{a}, env: {}, team: t{} }} }}",
                host(a, i),
                ["prod", "dev"][a % 2],
                a % 10
            )
            .unwrap();
        }
    }
    y += "segments:\n";
    for a in 0..APPS {
        writeln!(y, "  seg-a{a}: {{ match: {{ app: a{a} }} }}").unwrap();
    }
    y += "rules:\n  - { name: ping, from: [\"*\"], to: [\"*\"], ports: [icmp] }\n";
    y
});

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    let l = load(&POLICY, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    l.model.unwrap()
});

static FLOWS: LazyLock<Vec<Flow>> = LazyLock::new(|| {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let first_hour = (NOW - DAYS * 86_400) / 3600 * 3600;
    let mut flows = Vec::new();
    let mut push =
        |r: &mut Rng, src: String, dst: String, port: u16, verdict: Seen, hours: usize| {
            for _ in 0..hours {
                let hour = first_hour + 3600 * r.below((DAYS * 24) as usize) as i64;
                flows.push(Flow {
                    hour,
                    src: src.clone(),
                    src_address: Ipv4Addr::new(10, 0, 1, 1),
                    dst: dst.clone(),
                    dst_address: Ipv4Addr::new(10, 0, 2, 2),
                    probe: Probe { proto: 6, port },
                    verdict,
                    path: Way::Overlay,
                    rule: None,
                    count: 1 + r.below(50) as u64,
                    first: hour * 1000 + 1000,
                    last: hour * 1000 + 3_000_000,
                });
            }
        };
    for a in 0..APPS {
        for k in 1..=2 {
            let b = (a + k * 7) % APPS;
            let port = [5432, 6379, 443, 8080][(a + k) % 4];
            for i in 0..PER_APP {
                for j in 0..PER_APP {
                    push(
                        &mut r,
                        host(a, i),
                        host(b, j),
                        port,
                        Seen::Allow,
                        HOURS_SEEN,
                    );
                }
            }
        }
        if a % 10 == 0 {
            push(
                &mut r,
                host(a, 0),
                "203.0.113.7".into(),
                443,
                Seen::Allow,
                50,
            );
        }
        if a % 20 == 0 {
            for p in 0..40 {
                push(
                    &mut r,
                    host(a, 1),
                    host((a + 1) % APPS, 2),
                    1000 + p,
                    Seen::Deny,
                    1,
                );
            }
            for p in 0..12 {
                push(
                    &mut r,
                    host(a, 3),
                    host(a, 4),
                    40_000 + 97 * p,
                    Seen::Allow,
                    1,
                );
            }
        }
    }
    flows
});

fn json(f: &Flow) -> String {
    format!(
        r#"{{"hour":{},"src":"{}","src_address":"{}","dst":"{}","dst_address":"{}","proto":"tcp","port":{},"verdict":"{}","count":{},"first":{},"last":{}}}"#,
        f.hour,
        f.src,
        f.src_address,
        f.dst,
        f.dst_address,
        f.probe.port,
        f.verdict,
        f.count,
        f.first,
        f.last
    )
}

#[divan::bench(sample_count = 5)]
fn suggest_30_days_1000_identities(bencher: divan::Bencher) {
    let (m, flows) = (&*MODEL, &*FLOWS);
    bencher.bench(|| suggest(m, flows, &Options::at(NOW)));
}

#[divan::bench(sample_count = 5)]
fn replay_30_days_1000_identities(bencher: divan::Bencher) {
    let (m, flows) = (&*MODEL, &*FLOWS);
    let st = m.state(&Conditions::at(NOW));
    bencher.bench(|| bulkhead_policy::replay::replay(m, &st, flows));
}
