//! Two controllers sharing one real etcd (started on loopback by the test) are one system: one
//! CA, credentials from either work on both, a change through one reaches a node streaming from
//! the other, a token is redeemed once across both, garbage in etcd is refused and logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bulkhead_controller::records::{BLOBS, PolicyHead, PolicyRecord};
use bulkhead_controller::{Handle, Settings, start};
use bulkhead_netlab::TempDir;
use bulkhead_netlab::etcd::{Etcd as Server, etcd_ok, free_port};
use bulkhead_proto::tls::{Identity, Trust};
use bulkhead_proto::{
    ApplyResponse, AuditEntry, CliConfig, Client, FlowBatch, FlowEntry, NodeMessage, NodeView,
    PolicyRequest, PolicyView, QuarantineRequest, QuarantineResponse, Report, RevokeResponse,
    StatusView, Token, TokenRequest, TokenResponse,
};

const POLICY: &str = "version: 1
network: {name: t, cidr: 10.78.0.0/16}
identities:
  web-1: {labels: {tier: web}}
  db-1: {labels: {tier: db}}
segments:
  web: {match: {tier: web}}
  db: {match: {tier: db}}
rules:
  - {name: web-to-db, from: [web], to: [db], ports: [tcp/5432]}
";

/// A controller on etcd, in this process, with its administrator's config and a connection;
/// stopped, and its state directory removed, when dropped.
struct Ctl {
    url: String,
    admin: CliConfig,
    c: bulkhead_proto::Connection,
    handle: Option<Handle>,
    _state: TempDir,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

/// The CA key file every controller in these tests is given, as on a real deployment: the same
/// key in every file, written into a directory the test owns so that it goes with the test.
fn shared_ca_key(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("ca-key");
    std::fs::write(&p, format!("{}\n", "a7".repeat(32))).unwrap();
    p
}

async fn controller(name: &str, spec: &str) -> Ctl {
    let state = TempDir::new(&format!("ha-{name}"));
    let h = start(Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state: state.path().to_path_buf(),
        store: Some(spec.to_string()),
        etcd: Default::default(),
        ca_key_file: Some(shared_ca_key(state.path())),
        policy: None,
        advertise_url: None,
        flow_history: bulkhead_controller::flows::DEFAULT_HISTORY,
        flow_limits: Default::default(),
        access_request_ttl: bulkhead_controller::ops::DEFAULT_REQUEST_TTL,
        metrics: None,
    })
    .await
    .unwrap();
    let admin = CliConfig::load(&h.admin).unwrap();
    let c = admin.client().unwrap().connect().await.unwrap();
    Ctl {
        url: h.url.clone(),
        admin,
        c,
        handle: Some(h),
        _state: state,
    }
}

async fn token(c: &mut bulkhead_proto::Connection, identity: &str) -> String {
    let t: TokenResponse = c
        .post(
            "/v1/tokens",
            &TokenRequest {
                identity: identity.into(),
                ttl: 600,
            },
        )
        .await
        .unwrap();
    t.token
}

/// Polls `/v1/nodes` (up to 5 s) until `identity` satisfies `ok`.
async fn wait_node(
    c: &mut bulkhead_proto::Connection,
    identity: &str,
    ok: impl Fn(&NodeView) -> bool,
) -> NodeView {
    let mut last = None;
    for _ in 0..50 {
        let nodes: Vec<NodeView> = c.get("/v1/nodes").await.unwrap();
        last = nodes.into_iter().find(|n| n.identity == identity);
        if last.as_ref().is_some_and(&ok) {
            return last.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{identity} never got there: {last:?}");
}

async fn node_client(token: &str, url: &str) -> Client {
    let t = Token::decode(token).unwrap();
    let wg = bulkhead_proto::PrivateKey::generate().public_key();
    let en = bulkhead_proto::join(&t, wg).await.unwrap();
    Client::new(
        &[url.to_string()],
        &Trust::Ca(en.response.ca.clone()),
        Some(&Identity {
            cert_pem: en.response.certificate,
            key_pem: en.credential.pem(),
        }),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_one_etcd_are_one_system() {
    if !etcd_ok() {
        return;
    }
    let server = Server::start();
    let mut a = controller("a", &server.spec()).await;
    let mut b = controller("b", &server.spec()).await;
    // One CA: the second controller found the first one's; each wrote a working admin.yaml.
    assert_eq!(a.admin.ca, b.admin.ca);
    // Status: both controllers registered, the etcd member healthy.
    let st: StatusView = a.c.get("/v1/status").await.unwrap();
    assert_eq!(st.controllers.len(), 2, "{:?}", st.controllers);
    assert!(st.controllers.contains(&a.url) && st.controllers.contains(&b.url));
    assert_eq!(st.store_health.len(), 1);
    assert!(
        st.store_health[0].1.starts_with("ok, etcd 3."),
        "{:?}",
        st.store_health
    );

    // A node enrolled through A streams from B; a policy applied through A reaches it.
    let tok = token(&mut a.c, "web-1").await;
    let web = node_client(&tok, &b.url).await;
    let mut wconn = web.connect().await.unwrap();
    let mut s = wconn.stream("/v1/node/stream").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), s.next::<NodeMessage>())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Some(NodeMessage::NoPolicy { .. })),
        "{first:?}"
    );
    let applied = apply(&mut a.c, POLICY).await;
    assert_eq!(applied.revision, 1);
    let t0 = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), s.next::<NodeMessage>())
        .await
        .unwrap()
        .unwrap()
    {
        Some(NodeMessage::Config(c)) => assert_eq!(
            (c.allowlist.identity.as_str(), c.allowlist.revision),
            ("web-1", 1)
        ),
        m => panic!("{m:?}"),
    }
    eprintln!(
        "apply through A -> config on B's stream: {:?}",
        t0.elapsed()
    );
    let p: PolicyView = b.c.get("/v1/policy").await.unwrap();
    assert_eq!(p.revision, 1, "B serves the policy A applied");

    // Presence is shared: the node streams from B and reports there; A shows it online, with
    // the revision it enforces.
    let report = Report {
        endpoint: None,
        listen_port: 51820,
        revision: Some(1),
        digest: None,
        status: "ok".into(),
        peers: 0,
        version: "test".into(),
        facts: Default::default(),
        underlay: None,
    };
    let _: serde_json::Value = wconn.post("/v1/node/report", &report).await.unwrap();
    let seen_on_a = wait_node(&mut a.c, "web-1", |n| n.online && n.in_sync).await;
    assert_eq!(seen_on_a.revision, Some(1), "{seen_on_a:?}");
    assert!(seen_on_a.status.as_deref() == Some("ok"), "{seen_on_a:?}");

    // 100 concurrent joins with one token, spread over both controllers: exactly one wins.
    let tok = token(&mut b.c, "db-1").await;
    let t = Token::decode(&tok).unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut t = t.clone();
        t.urls = vec![if i % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        }];
        tasks.push(tokio::spawn(async move {
            let wg = bulkhead_proto::PrivateKey::generate().public_key();
            bulkhead_proto::join(&t, wg).await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(en) => winners.push(en),
            Err(e) => assert_eq!(e.code(), Some("token_invalid"), "{e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "one token, one enrollment, across controllers"
    );

    // db-1 streams from A, then goes away: B shows it online, then offline.
    let en = winners.pop().unwrap();
    let db_client = Client::new(
        std::slice::from_ref(&a.url),
        &Trust::Ca(en.response.ca.clone()),
        Some(&Identity {
            cert_pem: en.response.certificate,
            key_pem: en.credential.pem(),
        }),
    )
    .unwrap();
    let mut dconn = db_client.connect().await.unwrap();
    let mut ds = dconn.stream("/v1/node/stream").await.unwrap();
    let _ = ds.next::<NodeMessage>().await.unwrap();
    wait_node(&mut b.c, "db-1", |n| n.online).await;
    drop(ds);
    drop(dconn);
    let gone = wait_node(&mut b.c, "db-1", |n| !n.online).await;
    assert!(gone.last_seen.is_some(), "{gone:?}");

    // web-1 is sent db-1's key (the race's winner): take what is pending.
    while tokio::time::timeout(Duration::from_millis(500), s.next::<NodeMessage>())
        .await
        .is_ok()
    {}

    // Garbage written straight into etcd is refused and logged, never applied.
    let mut raw = etcd_client::Client::connect([server.addr.as_str()], None)
        .await
        .unwrap();
    raw.put("/bulkhead/nodes/evil", "\u{0}not json", None)
        .await
        .unwrap();
    raw.put("/bulkhead/policy", "garbage", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nodes: Vec<NodeView> = b.c.get("/v1/nodes").await.unwrap();
    assert!(!nodes.iter().any(|n| n.identity == "evil"), "{nodes:?}");
    let p: PolicyView = a.c.get("/v1/policy").await.unwrap();
    assert_eq!(p.revision, 1, "the live policy stays");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.next::<NodeMessage>())
            .await
            .is_err(),
        "nothing pushed"
    );
    // Repair what the garbage broke, as an operator would, and carry on.
    raw.delete("/bulkhead/nodes/evil", None).await.unwrap();

    // Revocation through B ends the node's stream.
    let r: RevokeResponse = b.c.post("/v1/nodes/web-1/revoke", &()).await.unwrap();
    assert!(r.was_enrolled);
    let end = tokio::time::timeout(Duration::from_secs(10), s.next::<NodeMessage>())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)) || end.is_err(), "{end:?}");

    // With the stored policy record garbage, an apply fails cleanly rather than guess a revision
    // (which could go backwards).
    let stored = PolicyRequest {
        text: POLICY.replace("5432", "5433"),
        source: "p.yaml".into(),
        base_revision: None,
    };
    let e =
        b.c.post::<_, ApplyResponse>("/v1/policy/apply", &stored)
            .await
            .unwrap_err();
    assert_eq!(e.code(), Some("internal"), "{e}");
}

/// The etcd leader is killed in the middle of a stream of applies. Every apply that succeeded
/// is in etcd's history with exactly its text, revisions only go up, and no revision reaches a
/// node with two different contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_during_applies_loses_nothing() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    if !etcd_ok() {
        return;
    }
    let mut cluster = bulkhead_netlab::etcd::EtcdCluster::start();
    let mut h = controller("leader", &cluster.spec()).await;
    let client = h.admin.client().unwrap();
    let tok = token(&mut h.c, "web-1").await;
    let web = node_client(&tok, &h.url).await;
    // What the node is served, per revision: must never be two different contents.
    let served: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let clash: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (served2, clash2) = (served.clone(), clash.clone());
    let node = tokio::spawn(async move {
        loop {
            let Ok(mut conn) = web.connect().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let Ok(mut s) = conn.stream("/v1/node/stream").await else {
                continue;
            };
            while let Ok(Some(m)) = s.next::<NodeMessage>().await {
                if let NodeMessage::Config(cfg) = m {
                    let body = serde_json::to_string(&cfg.allowlist).unwrap();
                    let rev = cfg.allowlist.revision;
                    let mut seen = served2.lock().unwrap();
                    if seen.get(&rev).is_some_and(|b| *b != body) {
                        clash2.lock().unwrap().push(rev);
                    }
                    seen.insert(rev, body);
                }
            }
        }
    });

    let mut applied: Vec<(u64, String)> = Vec::new();
    let mut failures = 0;
    for k in 0..30u32 {
        if k == 10 {
            // Find the leader and kill it.
            let mut leader = None;
            for (i, addr) in cluster.addrs.iter().enumerate() {
                let mut e = etcd_client::Client::connect([addr.as_str()], None)
                    .await
                    .unwrap();
                let st = e.status().await.unwrap();
                if st.header().map(|h| h.member_id()) == Some(st.leader()) {
                    leader = Some(i);
                }
            }
            cluster.kill(leader.expect("a leader"));
        }
        let text = POLICY.replace("5432", &(6000 + k).to_string());
        let req = PolicyRequest {
            text: text.clone(),
            source: "p.yaml".into(),
            base_revision: None,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match h.c.post::<_, ApplyResponse>("/v1/policy/apply", &req).await {
                Ok(r) => {
                    applied.push((r.revision, text));
                    break;
                }
                Err(e) => {
                    failures += 1;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "apply {k} never succeeded: {e}\n{}",
                        cluster.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(fresh) = client.connect().await {
                        h.c = fresh;
                    }
                }
            }
        }
    }
    eprintln!("30 applies, {failures} failed attempts retried while etcd elected a new leader");
    // Revisions only go up, one per change.
    for w in applied.windows(2) {
        assert!(w[1].0 > w[0].0, "revisions must go up: {applied:?}");
    }
    // Every successful apply is in etcd's history with exactly its text.
    let live = cluster
        .addrs
        .iter()
        .find_map(|a| std::net::TcpStream::connect(a).ok().map(|_| a.clone()))
        .unwrap();
    let mut raw = etcd_client::Client::connect([live.as_str()], None)
        .await
        .unwrap();
    let now = raw
        .get("/bulkhead/policy", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut history: BTreeMap<u64, String> = BTreeMap::new();
    let mut rev = now;
    while rev > 0 {
        let r = raw
            .get(
                "/bulkhead/policy",
                Some(etcd_client::GetOptions::new().with_revision(rev)),
            )
            .await
            .unwrap();
        let Some(kv) = r.kvs().first() else { break };
        // The head names its body's chunks, as they were at that revision.
        let head: PolicyHead = serde_json::from_slice(kv.value()).unwrap();
        let blobs = raw
            .get(
                format!("/bulkhead/{BLOBS}{}/", head.body),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_revision(kv.mod_revision()),
                ),
            )
            .await
            .unwrap();
        let chunks: BTreeMap<String, Vec<u8>> = blobs
            .kvs()
            .iter()
            .map(|c| {
                let k = String::from_utf8_lossy(c.key()).to_string();
                (k["/bulkhead/".len()..].to_string(), c.value().to_vec())
            })
            .collect();
        let rec = PolicyRecord::join(head, |k| chunks.get(k).map(Vec::as_slice)).unwrap();
        let prev = history.insert(rec.revision, rec.text.clone());
        if let Some(p) = prev {
            assert_eq!(p, rec.text, "one revision, two texts");
        }
        rev = kv.mod_revision() - 1;
    }
    for (r, text) in &applied {
        assert_eq!(
            history.get(r),
            Some(text),
            "applied revision {r} lost or different"
        );
    }
    // The node caught up with the last one, and never saw a revision twice differently.
    let last = applied.last().unwrap().0;
    let ok = async {
        while !served.lock().unwrap().contains_key(&last) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), ok)
        .await
        .expect("the node got the last revision");
    assert!(
        clash.lock().unwrap().is_empty(),
        "{:?}",
        clash.lock().unwrap()
    );
    node.abort();
}

/// Kills the process when dropped, so a failing test leaves nothing running.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The controller binary started before its etcd: it says so and retries, and serves once etcd
/// comes up.
#[test]
fn an_etcd_unreachable_at_start_is_retried_not_fatal() {
    if !etcd_ok() {
        return;
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = TempDir::new("ha-late");
    let d = dir.path();
    let log = d.join("controller.log");
    let mut ctl = Reap(
        std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-controller"))
            .args(["--listen", "127.0.0.1:0", "--store"])
            .arg(format!("etcd://{addr}"))
            .arg("--ca-key-file")
            .arg(shared_ca_key(d))
            .arg("--state")
            .arg(d.join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let retries = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("cannot reach etcd; retrying")
            .count()
    };
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while retries() < 2 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        retries() >= 2,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(ctl.0.try_wait().unwrap().is_none(), "it must not exit");
    let admin = d.join("state/admin.yaml");
    assert!(!admin.exists(), "nothing is served without the store");

    let server = Server::start_on(&addr);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !admin.exists() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let st: StatusView = rt.block_on(async {
        // admin.yaml is written just before the API starts serving.
        for _ in 0..50 {
            if let Ok(cfg) = CliConfig::load(&admin)
                && let Ok(mut c) = cfg.client().unwrap().connect().await
                && let Ok(st) = c.get("/v1/status").await
            {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    });
    assert!(st.store.contains(&addr), "{st:?}");
    assert!(st.store_health[0].1.starts_with("ok"), "{st:?}");
    drop(ctl);
    drop(server);
}

/// A policy larger than etcd's 1.5 MiB request limit is stored as chunks of 64 KiB; a
/// controller started afterwards reads it whole; the previous revision's chunks are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_larger_than_an_etcd_request_is_stored_in_chunks() {
    if !etcd_ok() {
        return;
    }
    let server = Server::start();
    let mut a = controller("big-a", &server.spec()).await;
    let big = |port: u32| {
        let mut t = POLICY.replace("5432", &port.to_string());
        for i in 0..48_000 {
            t.push_str(&format!("# padding line {i:06} to make the policy large\n"));
        }
        t
    };
    let text = big(7000);
    assert!(text.len() > 2 << 20, "{}", text.len());
    let req = |text: &str| PolicyRequest {
        text: text.to_string(),
        source: "big.yaml".into(),
        base_revision: None,
    };
    let r: ApplyResponse = a.c.post("/v1/policy/apply", &req(&text)).await.unwrap();
    assert_eq!(r.revision, 1);

    let mut b = controller("big-b", &server.spec()).await;
    let p: PolicyView = b.c.get("/v1/policy").await.unwrap();
    assert_eq!((p.revision, p.text == text), (1, true));

    let mut raw = etcd_client::Client::connect([server.addr.as_str()], None)
        .await
        .unwrap();
    let blobs = |raw: &mut etcd_client::Client| {
        let mut raw = raw.clone();
        async move {
            raw.get(
                format!("/bulkhead/{BLOBS}"),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .unwrap()
            .kvs()
            .len()
        }
    };
    let first = blobs(&mut raw).await;
    assert!(first >= 32, "{first} chunks");
    // A second large apply through B: A serves it, and only its chunks remain.
    let text2 = big(7001);
    let r: ApplyResponse = b.c.post("/v1/policy/apply", &req(&text2)).await.unwrap();
    assert_eq!(r.revision, 2);
    let p: PolicyView = a.c.get("/v1/policy").await.unwrap();
    assert_eq!((p.revision, p.text == text2), (2, true));
    assert_eq!(
        blobs(&mut raw).await,
        first,
        "the old revision's chunks are gone"
    );
}

/// Work that must happen once: both controllers see a quarantine end at its time and both try
/// to remove it; the transaction fenced on the record's revision lets exactly one commit, so
/// the audit log has one release.
/// A real etcd and two controllers on it, `policy` applied through the first.
async fn two_controllers(tag: &str, policy: &str) -> (Server, Ctl, Ctl) {
    let server = Server::start();
    let mut a = controller(&format!("{tag}-a"), &server.spec()).await;
    let b = controller(&format!("{tag}-b"), &server.spec()).await;
    apply(&mut a.c, policy).await;
    (server, a, b)
}

/// Applies `policy` through a controller.
async fn apply(c: &mut bulkhead_proto::Connection, policy: &str) -> ApplyResponse {
    let req = PolicyRequest {
        text: policy.into(),
        source: "p.yaml".into(),
        base_revision: None,
    };
    c.post("/v1/policy/apply", &req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_ends_exactly_once_across_controllers() {
    if !etcd_ok() {
        return;
    }
    let (_server, mut a, mut b) = two_controllers("once", POLICY).await;
    for round in 0..3 {
        let q: QuarantineResponse =
            a.c.post(
                "/v1/nodes/web-1/quarantine",
                &QuarantineRequest { duration: Some(1) },
            )
            .await
            .unwrap();
        assert!(q.quarantine.is_some());
        wait_node(&mut b.c, "web-1", |n| n.quarantine.is_some()).await;
        // Both controllers' sweepers run every second; give them several chances.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        wait_node(&mut a.c, "web-1", |n| n.quarantine.is_none()).await;
        wait_node(&mut b.c, "web-1", |n| n.quarantine.is_none()).await;
        let log: Vec<AuditEntry> = b.c.get("/v1/audit").await.unwrap();
        let releases = log
            .iter()
            .filter(|e| e.action == "release" && e.who == "controller")
            .count();
        assert_eq!(
            releases,
            round + 1,
            "exactly one release per quarantine: {log:#?}"
        );
    }
}

/// Posts `n` ingress denials of new flows from web-1 at `web` (distinct ports from
/// `first_port`), as a node's flow log would.
async fn denials_from_web(
    node: &mut bulkhead_proto::Connection,
    web: std::net::Ipv4Addr,
    first_port: u16,
    n: u16,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let flows = (0..n)
        .map(|i| FlowEntry {
            at: now + i64::from(i),
            outbound: false,
            peer: Some("web-1".into()),
            peer_address: web,
            proto: bulkhead_proto::Protocol::Tcp,
            port: first_port + i,
            allowed: false,
            rule: None,
            reason: Some("not_allowed".into()),
            path: Default::default(),
            observed: false,
        })
        .collect();
    let _: serde_json::Value = node
        .post("/v1/node/flows", &FlowBatch { flows, dropped: 0 })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_reported_to_different_controllers_add_up_to_one_quarantine() {
    if !etcd_ok() {
        return;
    }
    const POLICY: &str = "version: 1
network: {name: t, cidr: 10.79.0.0/16}
identities:
  web-1: {labels: {tier: web}}
  db-1: {labels: {tier: db}}
  db-2: {labels: {tier: db}}
  db-3: {labels: {tier: db}}
segments:
  web: {match: {tier: web}}
  db: {match: {tier: db}}
quarantine: {denied_per_minute: 50, duration: 1h}
rules:
  - {name: web-to-db, from: [web], to: [db], ports: [tcp/5432]}
";
    let (server, mut a, mut b) = two_controllers("spread", POLICY).await;
    // web-1 is compromised and talks to the databases directly: each denies it at ingress and
    // reports to the controller it is connected to, db-1 and db-3 to A, db-2 to B. A peer's
    // reports are its word against web-1: each counts for at most half the threshold.
    let mut db1 = node_client(&token(&mut a.c, "db-1").await, &a.url)
        .await
        .connect()
        .await
        .unwrap();
    let mut db2 = node_client(&token(&mut b.c, "db-2").await, &b.url)
        .await
        .connect()
        .await
        .unwrap();
    let mut db3 = node_client(&token(&mut a.c, "db-3").await, &a.url)
        .await
        .connect()
        .await
        .unwrap();
    let nodes: Vec<NodeView> = a.c.get("/v1/nodes").await.unwrap();
    let web_address = nodes
        .iter()
        .find(|n| n.identity == "web-1")
        .and_then(|n| n.address)
        .unwrap();
    let not_quarantined = |nodes: &[NodeView]| {
        let web = nodes.iter().find(|n| n.identity == "web-1");
        web.is_none_or(|n| n.quarantine.is_none())
    };

    // 30 through A: below the threshold, on A and everywhere.
    denials_from_web(&mut db1, web_address, 1000, 30).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let nodes: Vec<NodeView> = b.c.get("/v1/nodes").await.unwrap();
    assert!(not_quarantined(&nodes), "{nodes:?}");

    // 30 more through B: two peers' words, 25 + 25, are not above 50.
    denials_from_web(&mut db2, web_address, 2000, 30).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let nodes: Vec<NodeView> = a.c.get("/v1/nodes").await.unwrap();
    assert!(not_quarantined(&nodes), "{nodes:?}");

    // A third peer through A: 75 in the cluster, above 50. Quarantined once, by the sum.
    denials_from_web(&mut db3, web_address, 3000, 30).await;
    wait_node(&mut a.c, "web-1", |n| n.quarantine.is_some()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log: Vec<AuditEntry> = a.c.get("/v1/audit").await.unwrap();
    let quarantines: Vec<&AuditEntry> = log
        .iter()
        .filter(|e| e.action == "quarantine" && e.identity.as_deref() == Some("web-1"))
        .collect();
    assert_eq!(quarantines.len(), 1, "exactly once: {log:#?}");
    assert_eq!(quarantines[0].who, "controller");
    // Counted flow by flow: the quarantine names the count that crossed the threshold.
    let detail = &quarantines[0].detail;
    let n: u64 = detail
        .split_once(' ')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (51..=60).contains(&n) && detail.contains("denied new flows in a minute (threshold 50)"),
        "{detail:?}"
    );
    // Both controllers started their counts over: no shared count is left in the store.
    let mut raw = etcd_client::Client::connect([server.addr.as_str()], None)
        .await
        .unwrap();
    let left = raw
        .get(
            "/bulkhead/denials/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "{:?}", left.kvs());
}

/// A TCP forwarder the test can cut, between a controller and etcd. Cut, it forwards nothing
/// either way and holds every connection open, old and new: a blackhole, as a partition looks
/// to a client (nothing refused, nothing answered). Restored, the connections held through the
/// cut are dropped and new ones forward again. Its task, and every connection's, end with it.
struct Cuttable {
    addr: String,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn start(target: &str) -> Cuttable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, rx) = tokio::sync::watch::channel(false);
        let target = target.to_string();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let (target, mut rx) = (target.clone(), rx.clone());
                conns.spawn(async move {
                    if *rx.borrow_and_update() {
                        until(&mut rx, false).await;
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = until(&mut rx, true) => until(&mut rx, false).await,
                    }
                });
            }
        });
        Cuttable { addr, cut, task }
    }

    fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the cut is `v` (or the proxy is gone).
async fn until(rx: &mut tokio::sync::watch::Receiver<bool>, v: bool) {
    while *rx.borrow_and_update() != v {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A node enrolled with a token: its credential, for clients of any controllers.
struct Enrolled {
    ca: String,
    cert: String,
    key: String,
}

impl Enrolled {
    async fn join(token: &str) -> Enrolled {
        let t = Token::decode(token).unwrap();
        let wg = bulkhead_proto::PrivateKey::generate().public_key();
        let en = bulkhead_proto::join(&t, wg).await.unwrap();
        Enrolled {
            ca: en.response.ca,
            cert: en.response.certificate,
            key: en.credential.pem(),
        }
    }

    /// A client trying `urls` in order.
    fn client(&self, urls: &[&str]) -> Client {
        let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        Client::new(
            &urls,
            &Trust::Ca(self.ca.clone()),
            Some(&Identity {
                cert_pem: self.cert.clone(),
                key_pem: self.key.clone(),
            }),
        )
        .unwrap()
    }
}

/// A node's open stream, with its connection, after its first message.
struct Stream {
    _conn: bulkhead_proto::Connection,
    lines: bulkhead_proto::client::Lines,
    url: String,
}

/// Opens a node's stream at the first controller `node` reaches, and takes its first message.
async fn open_stream(node: &Client) -> Result<Stream, bulkhead_proto::ApiError> {
    let mut conn = node.connect().await?;
    let url = conn.url().to_string();
    let mut lines = conn.stream("/v1/node/stream").await?;
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next::<NodeMessage>())
        .await
        .expect("a first message in 10 s")?;
    assert!(first.is_some(), "the stream ended at once");
    Ok(Stream {
        _conn: conn,
        lines,
        url,
    })
}

/// What a daemon does (node-daemon/src/link.rs): each controller in turn until one serves a
/// stream; a 401 is final. At most `tries` attempts.
async fn fail_over(
    en: &Enrolled,
    urls: &[&str],
    tries: usize,
) -> Result<Stream, bulkhead_proto::ApiError> {
    let mut last = None;
    for i in 0..tries {
        let (head, tail) = urls.split_at(i % urls.len());
        let order: Vec<&str> = tail.iter().chain(head).copied().collect();
        match open_stream(&en.client(&order)).await {
            Ok(s) => return Ok(s),
            Err(e) if e.code() == Some("unauthenticated") => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap())
}

/// A controller's `/v1/status`, as JSON (fields a test may check are absent from older ones).
async fn status(c: &mut bulkhead_proto::Connection) -> serde_json::Value {
    c.get("/v1/status").await.unwrap()
}

/// A controller cut off from etcd cannot vouch for its view: within seconds it ends its nodes'
/// streams and refuses them with `503 unavailable` (a daemon then tries the next controller),
/// and refuses changes saying why, while the other controller serves; so a revocation made
/// through the other one is never missed by a node that follows. Once etcd is back, it serves
/// again, with the revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_etcd_sends_its_nodes_to_another() {
    if !etcd_ok() {
        return;
    }
    let server = Server::start();
    let proxy = Cuttable::start(&server.addr).await;
    let mut a = controller("cut-a", &format!("etcd://{}", proxy.addr)).await;
    let mut b = controller("cut-b", &server.spec()).await;
    apply(&mut b.c, POLICY).await;
    let (ua, ub) = (a.url.clone(), b.url.clone());
    // web-1 enrolled through A, db-1 through B; web-1 streams from A.
    let web = Enrolled::join(&token(&mut a.c, "web-1").await).await;
    let db = Enrolled::join(&token(&mut b.c, "db-1").await).await;
    let mut s = open_stream(&web.client(&[&ua])).await.unwrap();

    // Cut A from etcd: its stream to web-1 ends within 10 s.
    proxy.set(true);
    let t0 = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = s.lines.next::<NodeMessage>().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "A kept serving web-1 after 10 s cut off from etcd"
    );
    eprintln!("cut -> web-1's stream on A ended: {:?}", t0.elapsed());

    // A refuses nodes with 503 `unavailable`, saying why.
    let e = open_stream(&web.client(&[&ua]))
        .await
        .err()
        .expect("A refuses web-1");
    assert!(
        matches!(&e, bulkhead_proto::ApiError::Api { status: 503, .. }),
        "{e}"
    );
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    assert!(e.to_string().contains("no contact with its store"), "{e}");
    let e = open_stream(&db.client(&[&ua]))
        .await
        .err()
        .expect("A refuses db-1");
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    // Administrators: changes refused with the reason; reads answer, and status says so.
    let e =
        a.c.post::<_, TokenResponse>(
            "/v1/tokens",
            &TokenRequest {
                identity: "web-1".into(),
                ttl: 600,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    assert!(e.to_string().contains("no contact with its store"), "{e}");
    let st = status(&mut a.c).await;
    assert_eq!(st["store_current"], false, "{st}");
    assert!(
        st["store_unconfirmed_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 5000),
        "{st}"
    );

    // web-1 follows the failover, as its daemon would: A sends it away, B serves it.
    let mut s = fail_over(&web, &[&ua, &ub], 4).await.unwrap();
    assert_eq!(s.url, ub);
    assert_eq!(status(&mut b.c).await["store_current"], true);
    // A revocation through B ends it; A, whose stale view still holds the credential, never
    // serves web-1 a configuration again, B says it is revoked.
    let r: RevokeResponse = b.c.post("/v1/nodes/web-1/revoke", &()).await.unwrap();
    assert!(r.was_enrolled);
    let end = tokio::time::timeout(Duration::from_secs(10), s.lines.next::<NodeMessage>())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)) || end.is_err(), "{end:?}");
    let e = fail_over(&web, &[&ua, &ub], 4)
        .await
        .err()
        .expect("revoked");
    assert_eq!(e.code(), Some("unauthenticated"), "{e}");

    // Etcd back: A catches up and serves again, with the revocation.
    proxy.set(false);
    let t1 = std::time::Instant::now();
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(s) = open_stream(&db.client(&[&ua])).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "A never served again once etcd was back");
    eprintln!("restore -> A serves db-1 again: {:?}", t1.elapsed());
    let e = open_stream(&web.client(&[&ua]))
        .await
        .err()
        .expect("web-1 is revoked on A too");
    assert_eq!(e.code(), Some("unauthenticated"), "{e}");
    assert_eq!(status(&mut a.c).await["store_current"], true);
    // Stopped before the proxy and etcd they use.
    drop((a, b, proxy));
}

/// Administrators live in etcd: one added through A works on B (each controller also has an
/// owner of its own in its admin.yaml), and revoked through B it is refused by A at once, on a
/// connection it had open there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_revoked_through_one_controller_is_refused_by_the_other() {
    if !etcd_ok() {
        return;
    }
    let server = Server::start();
    let mut a = controller("adm-a", &server.spec()).await;
    let mut b = controller("adm-b", &server.spec()).await;
    let key = bulkhead_proto::tls::CredentialKey::generate().unwrap();
    let issued: bulkhead_proto::AdminIssued =
        a.c.post(
            "/v1/admins",
            &bulkhead_proto::AdminRequest {
                name: "alice".into(),
                role: bulkhead_proto::Role::Viewer,
                expires_in: None,
                credential_key: key.public().to_base64(),
            },
        )
        .await
        .unwrap();
    let alice = |url: &str| CliConfig {
        url: url.to_string(),
        ca: issued.ca.clone(),
        certificate: issued.certificate.clone(),
        key: key.pem(),
    };
    let mut on_a = alice(&a.url).client().unwrap().connect().await.unwrap();
    let mut on_b = alice(&b.url).client().unwrap().connect().await.unwrap();
    let _: StatusView = on_a.get("/v1/status").await.unwrap();
    let _: StatusView = on_b.get("/v1/status").await.unwrap();
    let admins: Vec<bulkhead_proto::AdminView> = b.c.get("/v1/admins").await.unwrap();
    let owners = admins
        .iter()
        .filter(|x| x.role == bulkhead_proto::Role::Owner)
        .count();
    assert_eq!(owners, 2, "each controller's admin.yaml: {admins:?}");

    let _: bulkhead_proto::AdminView = b.c.post("/v1/admins/alice/revoke", &()).await.unwrap();
    let t0 = std::time::Instant::now();
    let refused = loop {
        match on_a.get::<StatusView>("/v1/status").await {
            Err(e) => break e,
            Ok(_) if t0.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(_) => panic!("A still serves alice 2 s after her revocation through B"),
        }
    };
    assert_eq!(refused.code(), Some("unauthenticated"), "{refused}");
    eprintln!("revoked through B -> refused by A: {:?}", t0.elapsed());
    drop((a, b));
}
