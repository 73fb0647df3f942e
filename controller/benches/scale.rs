//! Scale benchmark: one controller (a separate process) and many simulated daemons on real TLS
//! connections, each enrolled with its own token, holding its stream and acknowledging every
//! configuration with a report, as `bulkheadd` does.
//!
//! It measures, per apply, the time from the start of `policy apply` until each node has
//! acknowledged the new allowlist (every apply here changes every node's allowlist), and the
//! controller's memory (VmRSS and VmHWM from /proc).
//!
//! ```sh
//! cargo bench -p bulkhead-controller --bench scale                  # 1,000 nodes, 10 applies
//! BH_SCALE_ETCD=1 cargo bench -p bulkhead-controller --bench scale  # two controllers on etcd
//! BH_SCALE_NODES=2000 BH_SCALE_APPLIES=5 cargo bench -p bulkhead-controller --bench scale
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_proto::tls::{Identity, Trust};
use bulkhead_proto::{
    ApplyResponse, CliConfig, Client, NodeMessage, PolicyRequest, Report, Token, TokenRequest,
    TokenResponse,
};

const TIERS: usize = 20;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` identities in 20 tiers; tier k may open tier k+1 on one port. `shift` moves every port,
/// so that each apply changes every identity's allowlist.
fn policy(n: usize, shift: usize) -> String {
    let mut s =
        String::from("version: 1\nnetwork: { name: scale, cidr: 10.64.0.0/12 }\nidentities:\n");
    for i in 0..n {
        s += &format!("  n{i:05}: {{ labels: {{ tier: t{} }} }}\n", i % TIERS);
    }
    s += "segments:\n";
    for k in 0..TIERS {
        s += &format!("  t{k}: {{ match: {{ tier: t{k} }} }}\n");
    }
    s += "rules:\n";
    for k in 0..TIERS - 1 {
        s += &format!(
            "  - {{ name: r{k}, from: [t{k}], to: [t{}], ports: [tcp/{}] }}\n",
            k + 1,
            1000 + shift * 100 + k
        );
    }
    s
}

fn controller_process() {
    let dir = std::env::var("BH_SCALE_CONTROLLER_DIR").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = bulkhead_controller::start(bulkhead_controller::Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            state: dir.into(),
            store: std::env::var("BH_SCALE_STORE").ok(),
            etcd: Default::default(),
            ca_key_file: std::env::var_os("BH_SCALE_CA_KEY").map(Into::into),
            policy: None,
            advertise_url: None,
            flow_history: bulkhead_controller::flows::DEFAULT_HISTORY,
            flow_limits: Default::default(),
            access_request_ttl: bulkhead_controller::ops::DEFAULT_REQUEST_TTL,
            metrics: None,
        })
        .await
        .unwrap();
        println!("ready {}", h.admin.display());
        // Runs until the benchmark closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .unwrap();
        h.stop();
    });
}

fn memory(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Per node: the revisions it acknowledged, and when.
type Acks = Arc<Mutex<HashMap<usize, Vec<(u64, Instant)>>>>;

async fn fake_daemon(
    i: usize,
    token: String,
    url: String,
    acks: Acks,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let t = Token::decode(&token).unwrap();
    let wg = bulkhead_proto::PrivateKey::generate().public_key();
    let en = bulkhead_proto::join(&t, wg).await.unwrap();
    let (j, key) = (en.response, en.credential);
    let client = Client::new(
        &[url],
        &Trust::Ca(j.ca),
        Some(&Identity {
            cert_pem: j.certificate,
            key_pem: key.pem(),
        }),
    )
    .unwrap();
    let mut conn = client.connect().await.unwrap();
    let mut lines = conn.stream("/v1/node/stream").await.unwrap();
    drop(permit); // enrolled and streaming: let the next one start
    while let Ok(Some(m)) = lines.next::<NodeMessage>().await {
        let NodeMessage::Config(c) = m else { continue };
        let rev = c.allowlist.revision;
        let r = Report {
            endpoint: Some(format!("127.0.0.1:{}", 20000 + i).parse().unwrap()),
            listen_port: 51820,
            revision: Some(rev),
            digest: Some(c.allowlist.digest.clone()),
            status: "ok".into(),
            peers: c.peers.len(),
            version: String::new(),
            facts: Default::default(),
            underlay: None,
        };
        // The report rides on the stream's own connection, as bulkheadd's does.
        let _: serde_json::Value = conn.post("/v1/node/report", &r).await.unwrap();
        acks.lock()
            .unwrap()
            .entry(i)
            .or_default()
            .push((rev, Instant::now()));
    }
}

async fn wait_all(acks: &Acks, n: usize, rev: u64, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let done = acks
            .lock()
            .unwrap()
            .values()
            .filter(|v| v.iter().any(|(r, _)| *r == rev))
            .count();
        if done == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

fn main() {
    if std::env::var_os("BH_SCALE_CONTROLLER_DIR").is_some() {
        return controller_process();
    }
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches lists benchmarks; there is nothing to list
    }
    let n = env("BH_SCALE_NODES", 1000);
    let applies = env("BH_SCALE_APPLIES", 10);
    // BH_SCALE_ETCD=1: two controllers sharing a real etcd, the nodes split between them.
    let etcd = (std::env::var("BH_SCALE_ETCD").as_deref() == Ok("1"))
        .then(bulkhead_netlab::etcd::Etcd::start);
    let store = etcd.as_ref().map(|e| e.spec());
    let count = if etcd.is_some() { 2 } else { 1 };
    let mut children = Vec::new();
    let mut dirs = Vec::new();
    let mut admins = Vec::new();
    for k in 0..count {
        let dir = std::env::temp_dir().join(format!("bh-scale-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.env("BH_SCALE_CONTROLLER_DIR", &dir)
            .env("BULKHEAD_LOG", "warn")
            .stderr(
                std::fs::File::create(
                    std::env::temp_dir().join(format!("bh-scale-controller-{k}.log")),
                )
                .unwrap(),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if let Some(spec) = &store {
            // One CA key file for both controllers, as on a real deployment.
            let key = std::env::temp_dir().join(format!("bh-scale-{}.key", std::process::id()));
            if !key.exists() {
                std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
            }
            cmd.env("BH_SCALE_STORE", spec).env("BH_SCALE_CA_KEY", key);
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        admins.push(
            line.trim()
                .strip_prefix("ready ")
                .expect("controller did not start")
                .to_string(),
        );
        children.push(child);
        dirs.push(dir);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let memory_all = move || {
        pids.iter()
            .map(|&p| {
                let (rss, hwm) = memory(p);
                format!("VmRSS {} MiB, VmHWM {} MiB", rss / 1024, hwm / 1024)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let admin_path = admins[0].clone();
    let urls: Vec<String> = admins
        .iter()
        .map(|a| CliConfig::load(std::path::Path::new(a)).unwrap().url)
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let admin = CliConfig::load(std::path::Path::new(&admin_path)).unwrap();
        let mut a = admin.client().unwrap().connect().await.unwrap();
        let apply = |shift: usize| PolicyRequest {
            text: policy(n, shift),
            source: "scale.yaml".into(),
            base_revision: None,
        };
        let r: ApplyResponse = a.post("/v1/policy/apply", &apply(0)).await.unwrap();
        assert_eq!(r.revision, 1);
        let acks: Acks = Arc::default();
        let start = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        for i in 0..n {
            let t: TokenResponse = a
                .post("/v1/tokens", &TokenRequest { identity: format!("n{i:05}"), ttl: 600 })
                .await
                .unwrap();
            let (acks, permit) = (acks.clone(), sem.clone().acquire_owned().await.unwrap());
            let url = urls[i % urls.len()].clone();
            tokio::spawn(fake_daemon(i, t.token, url, acks, permit));
        }
        assert!(wait_all(&acks, n, 1, Duration::from_secs(300)).await, "enrollment did not finish");
        println!(
            "{n} nodes on {} controller(s) ({}) enrolled and acknowledged revision 1 in {:.1} s; controller memory: {}",
            urls.len(),
            if urls.len() > 1 { "etcd" } else { "embedded store" },
            start.elapsed().as_secs_f64(),
            memory_all()
        );

        let mut all = Vec::new();
        let mut full = Vec::new();
        let mut calls = Vec::new();
        for k in 1..=applies {
            let t0 = Instant::now();
            let r: ApplyResponse = a.post("/v1/policy/apply", &apply(k)).await.unwrap();
            calls.push(t0.elapsed());
            let rev = r.revision;
            assert!(wait_all(&acks, n, rev, Duration::from_secs(60)).await, "apply {k} not acknowledged");
            let mut lat: Vec<Duration> = acks
                .lock()
                .unwrap()
                .values()
                .filter_map(|v| v.iter().find(|(r, _)| *r == rev).map(|(_, t)| *t - t0))
                .collect();
            lat.sort();
            full.push(*lat.last().unwrap());
            all.extend(lat);
        }
        all.sort();
        full.sort();
        calls.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "apply -> acknowledged, {} acks over {applies} applies: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            all.len(),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(*all.last().unwrap()),
        );
        println!(
            "apply -> all {n} acknowledged: median {:.0} ms, worst {:.0} ms",
            ms(percentile(&full, 0.5)),
            ms(*full.last().unwrap())
        );
        println!(
            "the apply call itself (validate, test, plan, commit): median {:.0} ms",
            ms(percentile(&calls, 0.5))
        );
        println!("controller memory: {}", memory_all());
    });
    for mut child in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(etcd);
}
