//! The API against an in-process controller on port 0, over real TLS connections: enrollment,
//! token reuse and expiry, authentication, revocation and malformed requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bulkhead_controller::{Handle, Settings, start};
use bulkhead_proto::tls::{Ca, CredentialKey, Identity, Trust};
use bulkhead_proto::{
    AccessState, AccessView, ApiError, ApplyResponse, CliConfig, Client, JoinResponse, NodeMessage,
    PolicyRequest, PolicyView, Report, RevokeResponse, Role, Token, TokenRequest, TokenResponse,
};

const POLICY: &str = "version: 1
network: {name: t, cidr: 10.77.0.0/16}
identities:
  web-1: {labels: {tier: web}}
  db-1: {labels: {tier: db}}
  other: {labels: {tier: none}}
segments:
  web: {match: {tier: web}}
  db: {match: {tier: db}}
rules:
  - {name: web-to-db, from: [web], to: [db], ports: [tcp/5432]}
";

/// A controller on a free loopback port with its state in `dir`.
fn settings(dir: &std::path::Path) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state: dir.to_path_buf(),
        store: None,
        etcd: Default::default(),
        ca_key_file: None,
        policy: None,
        advertise_url: None,
        flow_history: bulkhead_controller::flows::DEFAULT_HISTORY,
        flow_limits: Default::default(),
        access_request_ttl: bulkhead_controller::ops::DEFAULT_REQUEST_TTL,
        metrics: None,
    }
}

struct Fixture {
    dir: std::path::PathBuf,
    handle: Option<Handle>,
    admin: CliConfig,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        Fixture::with(name, |_| {}).await
    }

    async fn with(name: &str, tweak: impl FnOnce(&mut Settings)) -> Fixture {
        let dir = std::env::temp_dir().join(format!("bh-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut settings = settings(&dir);
        tweak(&mut settings);
        let handle = start(settings).await.unwrap();
        let admin = CliConfig::load(&handle.admin).unwrap();
        Fixture {
            dir,
            handle: Some(handle),
            admin,
        }
    }

    async fn try_add_admin(&self, name: &str, role: Role) -> Result<CliConfig, ApiError> {
        self.add(name, role, None).await
    }

    async fn add_admin(&self, name: &str, role: Role, expires_in: Option<u64>) -> CliConfig {
        self.add(name, role, expires_in).await.unwrap()
    }

    /// A new administrator's CLI configuration, as `bulkhead admin add` makes it.
    async fn add(
        &self,
        name: &str,
        role: Role,
        expires_in: Option<u64>,
    ) -> Result<CliConfig, ApiError> {
        let key = CredentialKey::generate().unwrap();
        let issued: bulkhead_proto::AdminIssued = self
            .admin()
            .await
            .post(
                "/v1/admins",
                &bulkhead_proto::AdminRequest {
                    name: name.into(),
                    role,
                    expires_in,
                    credential_key: key.public().to_base64(),
                },
            )
            .await?;
        Ok(CliConfig {
            url: self.admin.url.clone(),
            ca: issued.ca,
            certificate: issued.certificate,
            key: key.pem(),
        })
    }

    async fn admin(&self) -> bulkhead_proto::Connection {
        self.admin.client().unwrap().connect().await.unwrap()
    }

    async fn token(&self, identity: &str, ttl: u64) -> String {
        let r: TokenResponse = self
            .admin()
            .await
            .post(
                "/v1/tokens",
                &TokenRequest {
                    identity: identity.into(),
                    ttl,
                },
            )
            .await
            .unwrap();
        r.token
    }

    async fn apply(&self, text: &str) -> Result<ApplyResponse, ApiError> {
        self.admin()
            .await
            .post(
                "/v1/policy/apply",
                &PolicyRequest {
                    text: text.into(),
                    source: "p.yaml".into(),
                    base_revision: None,
                },
            )
            .await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node's side of a join: fresh keys, only public parts sent.
struct Joined {
    response: JoinResponse,
    wireguard: bulkhead_proto::PublicKey,
    identity: Identity,
    url: String,
}

impl Joined {
    fn client(&self) -> Client {
        Client::new(
            std::slice::from_ref(&self.url),
            &Trust::Ca(self.response.ca.clone()),
            Some(&self.identity),
        )
        .unwrap()
    }
}

async fn join(token: &str) -> Result<Joined, ApiError> {
    let t = Token::decode(token).unwrap();
    let wg = bulkhead_proto::PrivateKey::generate().public_key();
    let en = bulkhead_proto::join(&t, wg).await?;
    Ok(Joined {
        wireguard: wg,
        identity: Identity {
            cert_pem: en.response.certificate.clone(),
            key_pem: en.credential.pem(),
        },
        response: en.response,
        url: t.urls[0].clone(),
    })
}

async fn next(lines: &mut bulkhead_proto::client::Lines) -> Option<NodeMessage> {
    tokio::time::timeout(Duration::from_secs(10), lines.next::<NodeMessage>())
        .await
        .expect("no message within 10 s")
        .expect("stream error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_and_distribution() {
    let f = Fixture::new("enroll").await;
    let t = f.token("web-1", 3600).await;
    let node = join(&t).await.unwrap();
    assert_eq!(node.response.identity, "web-1");
    let mut conn = node.client().connect().await.unwrap();
    let mut s = conn.stream("/v1/node/stream").await.unwrap();
    // No policy yet: the node is told so (it passes nothing).
    assert!(matches!(
        next(&mut s).await,
        Some(NodeMessage::NoPolicy { revision: 0 })
    ));
    let applied = f.apply(POLICY).await.unwrap();
    assert_eq!(applied.revision, 1);
    assert_eq!(applied.summary.identities_added, 3);
    assert_eq!(applied.summary.pairs_gaining, 1, "web-1 -> db-1");
    match next(&mut s).await {
        Some(NodeMessage::Config(c)) => {
            assert_eq!(c.allowlist.identity, "web-1", "its own allowlist");
            assert_eq!(c.allowlist.revision, 1);
            assert_eq!(c.allowlist.peers.len(), 1);
            assert!(c.peers.is_empty(), "db-1 is not enrolled: no tunnel to it");
        }
        m => panic!("{m:?}"),
    }
    // db-1 enrolls and reports: web-1 is sent db-1's key and reported endpoint.
    let db = join(&f.token("db-1", 3600).await).await.unwrap();
    let mut dbc = db.client().connect().await.unwrap();
    let _: serde_json::Value = dbc
        .post(
            "/v1/node/report",
            &Report {
                endpoint: Some("198.18.0.9:51820".parse().unwrap()),
                listen_port: 51820,
                revision: Some(1),
                status: "ok".into(),
                ..Report::default()
            },
        )
        .await
        .unwrap();
    let mut got_endpoint = false;
    for _ in 0..3 {
        match next(&mut s).await {
            Some(NodeMessage::Config(c)) => {
                if let Some(p) = c.peers.get("db-1") {
                    assert_eq!(p.public_key, db.wireguard);
                    if p.endpoint == Some("198.18.0.9:51820".parse().unwrap()) {
                        got_endpoint = true;
                        break;
                    }
                }
            }
            m => panic!("{m:?}"),
        }
    }
    assert!(got_endpoint, "the peer's reported endpoint reached web-1");
    // `other` is in no rule: an applied change to it sends web-1 nothing...
    let changed = POLICY.replace(
        "other: {labels: {tier: none}}",
        "other: {labels: {tier: none2}}",
    );
    assert_eq!(f.apply(&changed).await.unwrap().revision, 2);
    let quiet = tokio::time::timeout(Duration::from_millis(500), s.next::<NodeMessage>()).await;
    assert!(
        quiet.is_err(),
        "an untouched node is sent nothing: {quiet:?}"
    );
    // ...and a change to its own rule does, with the new revision.
    let port = changed.replace("tcp/5432", "tcp/5433");
    assert_eq!(f.apply(&port).await.unwrap().revision, 3);
    match next(&mut s).await {
        Some(NodeMessage::Config(c)) => assert_eq!(c.allowlist.revision, 3),
        m => panic!("{m:?}"),
    }
    // The live policy and node list.
    let p: PolicyView = f.admin().await.get("/v1/policy").await.unwrap();
    assert_eq!(p.revision, 3);
    let nodes: Vec<bulkhead_proto::NodeView> = f.admin().await.get("/v1/nodes").await.unwrap();
    let web = nodes.iter().find(|n| n.identity == "web-1").unwrap();
    assert!(web.enrolled && web.online && web.in_policy);
    let dbv = nodes.iter().find(|n| n.identity == "db-1").unwrap();
    assert_eq!(dbv.revision, Some(1));
    assert!(
        !nodes
            .iter()
            .find(|n| n.identity == "other")
            .unwrap()
            .enrolled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrolls_exactly_once_even_concurrently() {
    let f = Fixture::new("race").await;
    let t = f.token("web-1", 3600).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move { join(&t).await }));
    }
    let (mut ok, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some("token_invalid"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (1, 99));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_forged_tokens_are_refused() {
    let f = Fixture::new("expiry").await;
    let t = f.token("web-1", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(join(&t).await.err().unwrap().code(), Some("token_invalid"));
    // A token with a made-up secret.
    let mut forged = Token::decode(&f.token("web-1", 3600).await).unwrap();
    forged.secret = "0".repeat(64);
    assert_eq!(
        join(&forged.encode()).await.err().unwrap().code(),
        Some("token_invalid")
    );
    // A token pinning another CA: the join never reaches the API.
    let mut wrong_ca = Token::decode(&f.token("web-1", 3600).await).unwrap();
    wrong_ca.ca_fingerprint = Ca::generate().unwrap().fingerprint().unwrap();
    match join(&wrong_ca.encode()).await {
        Err(ApiError::Transport(m)) => assert!(m.contains("fingerprint"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
    // Bad token requests.
    let r: Result<TokenResponse, _> = f
        .admin()
        .await
        .post(
            "/v1/tokens",
            &TokenRequest {
                identity: "Not A Name".into(),
                ttl: 60,
            },
        )
        .await;
    assert_eq!(r.unwrap_err().code(), Some("bad_request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_credential_get_nothing() {
    let f = Fixture::new("auth").await;
    f.apply(POLICY).await.unwrap();
    // No client certificate at all.
    let anon = Client::new(
        std::slice::from_ref(&f.admin.url),
        &Trust::Ca(f.admin.ca.clone()),
        None,
    )
    .unwrap();
    for path in ["/v1/policy", "/v1/nodes", "/v1/status"] {
        let e = anon
            .connect()
            .await
            .unwrap()
            .get::<serde_json::Value>(path)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("unauthenticated"), "{path}: {e}");
    }
    let e = anon
        .connect()
        .await
        .unwrap()
        .stream("/v1/node/stream")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthenticated"));
    // A certificate from another CA fails the TLS handshake (or the first request).
    let other = Ca::generate().unwrap();
    let k = CredentialKey::generate().unwrap();
    let foreign = Client::new(
        std::slice::from_ref(&f.admin.url),
        &Trust::Ca(f.admin.ca.clone()),
        Some(&Identity {
            cert_pem: other.client_cert("admin", &k.public()).unwrap(),
            key_pem: k.pem(),
        }),
    )
    .unwrap();
    let r = async {
        foreign
            .connect()
            .await?
            .get::<serde_json::Value>("/v1/policy")
            .await
    }
    .await;
    assert!(matches!(r, Err(ApiError::Transport(_))), "{r:?}");
    // A node's credential is not an administrator's.
    let node = join(&f.token("web-1", 60).await).await.unwrap();
    let e = node
        .client()
        .connect()
        .await
        .unwrap()
        .get::<serde_json::Value>("/v1/policy")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    // Nor can an administrator pose as a node.
    let e = f.admin().await.stream("/v1/node/stream").await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_the_stream_and_the_credential() {
    let f = Fixture::new("revoke").await;
    f.apply(POLICY).await.unwrap();
    let web = join(&f.token("web-1", 600).await).await.unwrap();
    let db = join(&f.token("db-1", 600).await).await.unwrap();
    let spare = f.token("db-1", 600).await; // unused: revocation must void it too
    let mut wconn = web.client().connect().await.unwrap();
    let mut ws = wconn.stream("/v1/node/stream").await.unwrap();
    let mut dconn = db.client().connect().await.unwrap();
    let mut ds = dconn.stream("/v1/node/stream").await.unwrap();
    let first = next(&mut ws).await;
    assert!(
        matches!(&first, Some(NodeMessage::Config(c)) if c.peers.contains_key("db-1")),
        "{first:?}"
    );
    next(&mut ds).await;
    let r: RevokeResponse = f
        .admin()
        .await
        .post("/v1/nodes/db-1/revoke", &())
        .await
        .unwrap();
    assert!(r.was_enrolled);
    // web-1 is told to drop db-1.
    match next(&mut ws).await {
        Some(NodeMessage::Config(c)) => assert!(c.peers.is_empty()),
        m => panic!("{m:?}"),
    }
    // db-1's stream ends, and its credential no longer works.
    assert!(
        next(&mut ds).await.is_none(),
        "the revoked node's stream ends"
    );
    let e = db
        .client()
        .connect()
        .await
        .unwrap()
        .stream("/v1/node/stream")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthenticated"));
    // The unused token issued before the revocation is void; a new one works.
    assert_eq!(
        join(&spare).await.err().unwrap().code(),
        Some("token_invalid")
    );
    let again = join(&f.token("db-1", 600).await).await.unwrap();
    assert_eq!(again.response.identity, "db-1");
    // Revoking what is not enrolled is an error.
    let e = f
        .admin()
        .await
        .post::<_, RevokeResponse>("/v1/nodes/nobody/revoke", &())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_codes_and_change_nothing() {
    let f = Fixture::new("bad").await;
    f.apply(POLICY).await.unwrap();
    let mut c = f.admin().await;
    // Garbage and truncated bodies.
    for body in [
        b"\x00\xffgarbage".to_vec(),
        br#"{"text": "version: 1", "sour"#.to_vec(),
    ] {
        let (status, bytes) = c
            .raw(http::Method::POST, "/v1/policy/apply", body)
            .await
            .unwrap();
        assert_eq!(status, 400);
        let e: bulkhead_proto::ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e.code, "bad_request");
    }
    let (status, _) = c.raw(http::Method::GET, "/v1/nope", vec![]).await.unwrap();
    assert_eq!(status, 404);
    // A policy that fails validation: every error with FILE:LINE:COL, nothing applied.
    let bad = POLICY
        .replace("to: [db]", "to: [nowhere]")
        .replace("tcp/5432", "tcp/99999");
    let e = f.apply(&bad).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_policy"));
    let ApiError::Api { body, .. } = &e else {
        panic!()
    };
    assert_eq!(body.details.len(), 2, "{:?}", body.details);
    assert!(
        body.details.iter().all(|d| d.starts_with("p.yaml:11:")),
        "{:?}",
        body.details
    );
    // A policy whose own test fails is refused too.
    let failing =
        format!("{POLICY}tests:\n  - {{from: db-1, to: web-1, port: tcp/5432, expect: allow}}\n");
    assert_eq!(
        f.apply(&failing).await.unwrap_err().code(),
        Some("invalid_policy")
    );
    let p: PolicyView = c.get("/v1/policy").await.unwrap();
    assert_eq!(
        (p.revision, p.text.as_str()),
        (1, POLICY),
        "the live policy stays"
    );
    // Applying against a stale plan is a conflict.
    let r: Result<ApplyResponse, _> = c
        .post(
            "/v1/policy/apply",
            &PolicyRequest {
                text: POLICY.replace("5432", "5433"),
                source: "p.yaml".into(),
                base_revision: Some(0),
            },
        )
        .await;
    assert_eq!(r.unwrap_err().code(), Some("conflict"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_policy_enrollment_and_revision() {
    let mut f = Fixture::new("restart").await;
    f.apply(POLICY).await.unwrap();
    f.apply(&POLICY.replace("5432", "5433")).await.unwrap();
    let node = join(&f.token("web-1", 600).await).await.unwrap();
    let dir = f.dir.clone();
    f.handle.take().unwrap().stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = start(settings(&dir)).await.unwrap();
    let admin = CliConfig::load(&h.admin).unwrap();
    assert_eq!(
        admin.certificate, f.admin.certificate,
        "admin.yaml's credential is kept"
    );
    let p: PolicyView = admin
        .client()
        .unwrap()
        .connect()
        .await
        .unwrap()
        .get("/v1/policy")
        .await
        .unwrap();
    assert_eq!(p.revision, 2);
    // The node's credential still works, against the new address.
    let client = Client::new(
        std::slice::from_ref(&h.url),
        &Trust::Ca(node.response.ca.clone()),
        Some(&node.identity),
    )
    .unwrap();
    let mut s = client
        .connect()
        .await
        .unwrap()
        .stream("/v1/node/stream")
        .await
        .unwrap();
    match next(&mut s).await {
        Some(NodeMessage::Config(c)) => assert_eq!(c.allowlist.revision, 2),
        m => panic!("{m:?}"),
    }
    f.handle = Some(h);
}

/// Denial counts are shared through the store from memory: a restarted controller removes what
/// its previous run left, and counts nothing else has a use for (of a controller no longer
/// registered, older than a minute), but not another live count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_removes_the_denial_counts_its_previous_run_left() {
    use bulkhead_store::{Embedded, Op};
    let dir = std::env::temp_dir().join(format!("bh-api-denials-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = "https://127.0.0.1:7999";
    let me = &bulkhead_proto::tls::sha256_hex(url.as_bytes())[..16];
    let old = br#"{"seconds":[[1,5]]}"#.to_vec();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = format!(r#"{{"seconds":[[{now},5]]}}"#).into_bytes();
    {
        let store = Embedded::open(&dir.join("store.redb")).unwrap();
        let ops = [
            Op::Put(format!("denials/web-1/{me}"), fresh.clone()),
            Op::Put("denials/web-1/0123456789abcdef".into(), fresh),
            Op::Put("denials/db-1/fedcba9876543210".into(), old),
        ];
        bulkhead_store::put(&store, &ops).await.unwrap();
    }
    let mut s = settings(&dir);
    s.advertise_url = Some(url.into());
    let h = start(s).await.unwrap();
    let mut left = Vec::new();
    for _ in 0..50 {
        left = h.controller.store().range("denials/").await.unwrap().kvs;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["denials/web-1/0123456789abcdef"],
        "another controller's stays"
    );
    h.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A large policy arriving through the store (as from another controller, or at a restart) is
/// compiled by the view's follower. Calls that read the view keep answering meanwhile: the
/// compile runs with the view's lock released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_keep_answering_while_a_large_policy_compiles() {
    use std::fmt::Write;
    use std::time::Instant;

    use bulkhead_controller::records::{POLICY as HEAD, PolicyRecord, encode};
    use bulkhead_store::{Compare, Op};

    let f = Fixture::new("compile").await;
    let (tiers, per_tier) = (25, 100);
    let mut text =
        String::from("version: 1\nnetwork: {name: big, cidr: 10.64.0.0/12}\nidentities:\n");
    for i in 0..tiers * per_tier {
        writeln!(text, "  n{i}: {{labels: {{tier: t{}}}}}", i / per_tier).unwrap();
    }
    text += "segments:\n";
    for t in 0..tiers {
        writeln!(text, "  t{t}: {{match: {{tier: t{t}}}}}").unwrap();
    }
    text += "rules:\n";
    for t in 0..tiers - 1 {
        let next = t + 1;
        writeln!(
            text,
            "  - {{name: r{t}, from: [t{t}], to: [t{next}], ports: [tcp/5432]}}"
        )
        .unwrap();
    }
    let rec = PolicyRecord {
        revision: 1,
        text,
        source: "big.yaml".into(),
        applied_at: 1,
        applied_by: "another controller".into(),
        addresses: Default::default(),
    };
    let (head, chunks) = rec.split();
    let store = f.handle.as_ref().unwrap().controller.store();
    for group in chunks.chunks(8) {
        let ops: Vec<Op> = group
            .iter()
            .map(|(k, v)| Op::Put(k.clone(), v.clone()))
            .collect();
        bulkhead_store::put(store, &ops).await.unwrap();
    }
    let c = f.handle.as_ref().unwrap().controller.clone();
    let t = store
        .txn(
            &[Compare::ModRevision(HEAD.into(), 0)],
            &[Op::Put(HEAD.into(), encode(&head))],
        )
        .await
        .unwrap();
    assert!(t.succeeded);
    let written = Instant::now();
    // Read the view until the policy is live, timing each call.
    let (answers, longest, live_after) = tokio::task::spawn_blocking(move || {
        let (mut answers, mut longest) = (0u32, Duration::ZERO);
        loop {
            let asked = Instant::now();
            let live = c.nodes().iter().any(|n| n.in_policy);
            longest = longest.max(asked.elapsed());
            if live {
                return (answers, longest, written.elapsed());
            }
            answers += 1;
            assert!(
                written.elapsed() < Duration::from_secs(120),
                "never compiled"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .await
    .unwrap();
    eprintln!(
        "policy live after {live_after:?}; {answers} calls answered meanwhile, the longest in {longest:?}"
    );
    assert!(
        live_after > Duration::from_millis(200),
        "the compile must take a while for this test to tell anything: {live_after:?}"
    );
    assert!(
        longest < live_after / 4,
        "a call waited {longest:?} of the {live_after:?} the compile took"
    );
    assert!(
        answers >= 10,
        "only {answers} calls answered during the compile"
    );
}

/// Every route, called by nobody, by a node and by an administrator: the permission layer
/// lets through exactly who the route is for (what the call then answers is another matter).
/// Every route against every caller: anyone, a node, and an administrator of each role. The
/// table is the router's own (`api::ROUTES`): each route answers exactly the callers it names,
/// an administrator below the route's role gets `forbidden`, and that refusal is audited with
/// the administrator's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_only_the_callers_it_is_for() {
    use bulkhead_controller::api::{Access, ROUTES};
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Who {
        Anyone,
        Node,
        Admin(Role),
    }
    let f = Fixture::new("routes").await;
    f.apply(POLICY).await.unwrap();
    let node = join(&f.token("web-1", 60).await).await.unwrap();
    let anon = Client::new(
        std::slice::from_ref(&f.admin.url),
        &Trust::Ca(f.admin.ca.clone()),
        None,
    )
    .unwrap();
    let mut callers = vec![(Who::Anyone, anon), (Who::Node, node.client())];
    for role in Role::ALL {
        let cfg = f.add_admin(&format!("as-{role}"), role, None).await;
        callers.push((Who::Admin(role), cfg.client().unwrap()));
    }
    assert_eq!(
        ROUTES.len(),
        24,
        "a route added: add it to the table (api::ROUTES)"
    );
    let mut refused = 0;
    for &(method, template, access) in ROUTES {
        let path = template
            .replace("{identity}", "other")
            .replace("{id}", "0badc0de")
            .replace("{name}", "nobody")
            .replace("/v1/flows/history", "/v1/flows/history?since=3600");
        for (who, client) in &callers {
            let mut c = client.connect().await.unwrap();
            let code = match (method, path.as_str()) {
                ("GET", "/v1/node/stream") => c.stream(&path).await.err(),
                ("GET", _) => c.get::<serde_json::Value>(&path).await.err(),
                _ => c
                    .post::<_, serde_json::Value>(&path, &serde_json::json!({}))
                    .await
                    .err(),
            }
            .and_then(|e| e.code().map(str::to_string));
            let want = match (access, who) {
                (None, _) => None,
                (_, Who::Anyone) => Some("unauthenticated"),
                (Some(Access::Node), Who::Node) => None,
                (Some(Access::Admin(need)), Who::Admin(role)) if *role >= need => None,
                (Some(Access::Admin(_)), Who::Admin(_)) => {
                    refused += 1;
                    Some("forbidden")
                }
                _ => Some("forbidden"),
            };
            match want {
                Some(w) => assert_eq!(code.as_deref(), Some(w), "{who:?} {method} {path}"),
                None => assert!(
                    !matches!(code.as_deref(), Some("unauthenticated" | "forbidden")),
                    "{who:?} {method} {path}: {code:?}"
                ),
            }
        }
    }
    // Viewer: 11 routes beyond it; operator: 3; approver: 2.
    assert_eq!(refused, 16);
    // Each refusal is in the audit log, with the administrator's name.
    let log: Vec<bulkhead_proto::AuditEntry> = f.admin().await.get("/v1/audit").await.unwrap();
    let refusals: Vec<_> = log.iter().filter(|e| e.action == "refused").collect();
    assert_eq!(refusals.len(), refused, "{refusals:#?}");
    assert!(
        refusals
            .iter()
            .any(|e| e.who == "as-viewer" && e.detail.contains("POST /v1/policy/apply")),
        "{refusals:#?}"
    );
    assert!(refusals.iter().all(|e| e.who != "as-owner"));
}

/// A revoked or expired administrator is refused, also on a connection it opened before, and
/// a flow stream it follows ends; the last owner cannot be revoked; an administrator's name is
/// in the audit log of what it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_administrators_are_refused_on_open_connections() {
    let f = Fixture::new("admins").await;
    let alice = f.add_admin("alice", Role::Operator, None).await;
    let mut open = alice.client().unwrap().connect().await.unwrap();
    let _: serde_json::Value = open.get("/v1/status").await.unwrap();
    let mut follow = alice.client().unwrap().connect().await.unwrap();
    let mut lines = follow.stream("/v1/flows?follow=1").await.unwrap();
    // She acts under her own name.
    let r: ApplyResponse = open
        .post(
            "/v1/policy/apply",
            &PolicyRequest {
                text: POLICY.into(),
                source: "p.yaml".into(),
                base_revision: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(r.revision, 1);
    let listed: Vec<bulkhead_proto::AdminView> = f.admin().await.get("/v1/admins").await.unwrap();
    let names: Vec<&str> = listed.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["admin", "alice"]);
    assert_eq!(
        listed[0].role,
        Role::Owner,
        "the first admin.yaml is an owner's"
    );

    let gone: bulkhead_proto::AdminView = f
        .admin()
        .await
        .post("/v1/admins/alice/revoke", &())
        .await
        .unwrap();
    assert_eq!(gone.name, "alice");
    let e = open
        .get::<serde_json::Value>("/v1/status")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthenticated"), "{e}");
    let end = tokio::time::timeout(Duration::from_secs(5), lines.next::<serde_json::Value>())
        .await
        .expect("the follow stream of a revoked administrator ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");

    // Expired: refused once its time passes, on the open connection too.
    // Expiry is to the second: 2 s from now leaves at least one for the first call.
    let bob = f.add_admin("bob", Role::Viewer, Some(2)).await;
    let mut b = bob.client().unwrap().connect().await.unwrap();
    let _: serde_json::Value = b.get("/v1/status").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = b.get::<serde_json::Value>("/v1/status").await.unwrap_err();
    assert_eq!(e.code(), Some("unauthenticated"), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");

    // The last owner stays; a second owner may go, then the first is the last again.
    let e = f
        .admin()
        .await
        .post::<_, serde_json::Value>("/v1/admins/admin/revoke", &())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    assert!(e.to_string().contains("last owner"), "{e}");
    let carol = f.add_admin("carol", Role::Owner, None).await;
    let _: serde_json::Value = carol
        .client()
        .unwrap()
        .connect()
        .await
        .unwrap()
        .post("/v1/admins/carol/revoke", &())
        .await
        .unwrap();
    let e = f
        .admin()
        .await
        .post::<_, serde_json::Value>("/v1/admins/admin/revoke", &())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    // Names are unique; bad names and roles are refused.
    let e = f.try_add_admin("bob", Role::Viewer).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    for bad in ["Bad Name", "controller", "node", ""] {
        let e = f.try_add_admin(bad, Role::Viewer).await.unwrap_err();
        assert_eq!(e.code(), Some("bad_request"), "{bad:?}: {e}");
    }
    let e = f
        .admin()
        .await
        .post::<_, serde_json::Value>(
            "/v1/admins",
            &serde_json::json!({"name": "x", "role": "root", "credential_key": ""}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("bad_request"), "{e}");

    let log: Vec<bulkhead_proto::AuditEntry> = f.admin().await.get("/v1/audit").await.unwrap();
    let said = |who: &str, action: &str| log.iter().any(|e| e.who == who && e.action == action);
    assert!(said("alice", "policy.apply"), "{log:#?}");
    assert!(said("admin", "admin.add") && said("admin", "admin.revoke"));
    assert!(said("carol", "admin.revoke"));
}

/// Two owners revoking each other at once, the only two: never both, so an owner is always
/// left. Run a few times, since which one wins is a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_revoking_each_other_at_once_leave_one() {
    let f = Fixture::new("owners").await;
    let call = |by: &CliConfig, path: String| {
        let c = by.client().unwrap();
        async move {
            let mut conn = c.connect().await.unwrap();
            conn.post::<_, serde_json::Value>(&path, &()).await
        }
    };
    let (mut owner, mut name) = (f.admin.clone(), "admin".to_string());
    for round in 0..10 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        let mut added = Vec::new();
        for n in [&x, &y] {
            let key = CredentialKey::generate().unwrap();
            let issued: bulkhead_proto::AdminIssued = owner
                .client()
                .unwrap()
                .connect()
                .await
                .unwrap()
                .post(
                    "/v1/admins",
                    &bulkhead_proto::AdminRequest {
                        name: n.clone(),
                        role: Role::Owner,
                        expires_in: None,
                        credential_key: key.public().to_base64(),
                    },
                )
                .await
                .unwrap();
            added.push(CliConfig {
                url: f.admin.url.clone(),
                ca: issued.ca,
                certificate: issued.certificate,
                key: key.pem(),
            });
        }
        call(&owner, format!("/v1/admins/{name}/revoke"))
            .await
            .unwrap();
        let (cx, cy) = (&added[0], &added[1]);
        let (a, b) = tokio::join!(
            call(cx, format!("/v1/admins/{y}/revoke")),
            call(cy, format!("/v1/admins/{x}/revoke"))
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} {b:?}");
        (owner, name) = if a.is_ok() {
            (cx.clone(), x)
        } else {
            (cy.clone(), y)
        };
        let list: Vec<bulkhead_proto::AdminView> = owner
            .client()
            .unwrap()
            .connect()
            .await
            .unwrap()
            .get("/v1/admins")
            .await
            .unwrap();
        let owners: Vec<&str> = list
            .iter()
            .filter(|v| v.role == Role::Owner)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(owners, [name.as_str()], "round {round}");
    }
}

const APPROVAL: &str = "version: 1
network: {name: t, cidr: 10.77.0.0/16}
identities:
  web-1: {labels: {tier: web}}
  web-2: {labels: {tier: web}}
  db-1: {labels: {tier: db}}
segments:
  web: {match: {tier: web}}
  db: {match: {tier: db}}
rules:
  - {name: web-to-db, from: [web], to: [db], ports: [tcp/5432]}
  - {name: web-ssh, from: [web], to: [db], ports: [tcp/22], approval: {approvers: 2, max: 2h}}
";

/// The rules of the next configuration `s` sends.
async fn rules_of(s: &mut bulkhead_proto::client::Lines) -> Vec<String> {
    match next(s).await {
        Some(NodeMessage::Config(c)) => c.allowlist.rules.iter().map(|r| r.name.clone()).collect(),
        m => panic!("{m:?}"),
    }
}

/// Access that needs approval: nobody approves their own request; `approvers: 2` takes two
/// different approvers; only then does the rule reach the node, ending with the approval; a
/// denied request never takes effect; revoking ends it at once; bad requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_needs_distinct_approvers_other_than_the_requester() {
    // Requests wait 8 s for their approvals here: time for the steps below, short enough to
    // see one expire.
    let f = Fixture::with("access", |s| s.access_request_ttl = 8).await;
    f.apply(APPROVAL).await.unwrap();
    let node = join(&f.token("web-1", 600).await).await.unwrap();
    let mut conn = node.client().connect().await.unwrap();
    let mut s = conn.stream("/v1/node/stream").await.unwrap();
    assert_eq!(rules_of(&mut s).await, ["web-to-db"], "before approval");

    let ask = |who: &CliConfig, body: serde_json::Value| {
        let c = who.client().unwrap();
        async move {
            c.connect()
                .await
                .unwrap()
                .post::<_, AccessView>("/v1/access", &body)
                .await
        }
    };
    let act = |who: &CliConfig, id: &str, verb: &str| {
        let c = who.client().unwrap();
        let path = format!("/v1/access/{id}/{verb}");
        async move {
            c.connect()
                .await
                .unwrap()
                .post::<_, AccessView>(&path, &())
                .await
        }
    };
    let alice = f.add_admin("alice", Role::Approver, None).await;
    let bob = f.add_admin("bob", Role::Approver, None).await;
    let carol = f.add_admin("carol", Role::Approver, None).await;
    let dave = f.add_admin("dave", Role::Operator, None).await;

    // Bad requests: a rule without approval, too long, nobody's identity, no reason.
    let body = |rule: &str, secs: u64, from: Option<&str>, reason: &str| serde_json::json!({"rule": rule, "duration": secs, "from": from, "reason": reason});
    let e = ask(&alice, body("web-to-db", 600, None, "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("bad_request"));
    assert!(e.to_string().contains("does not need approval"), "{e}");
    let e = ask(&alice, body("web-ssh", 3 * 3600, None, "x"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("more than rule web-ssh's max of 2h"),
        "{e}"
    );
    let e = ask(&alice, body("web-ssh", 600, Some("db-1"), "x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not on the from side"), "{e}");
    let e = ask(&alice, body("web-ssh", 600, None, "  "))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("bad_request"));
    let e = ask(&alice, body("nope", 600, None, "x")).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"));

    // Made first, so that it has expired by the end.
    let mine = ask(&alice, body("web-ssh", 600, None, "again"))
        .await
        .unwrap();

    let req = ask(&alice, body("web-ssh", 600, Some("web-1"), "incident 42"))
        .await
        .unwrap();
    assert_eq!(req.state, AccessState::Pending);
    // Her own: refused. An operator may not approve at all.
    let e = act(&alice, &req.id, "approve").await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    assert!(e.to_string().contains("nobody approves their own"), "{e}");
    assert_eq!(
        act(&dave, &req.id, "approve").await.unwrap_err().code(),
        Some("forbidden")
    );
    // One approval of two: still pending, nothing sent.
    let one = act(&bob, &req.id, "approve").await.unwrap();
    assert_eq!((one.state, one.approvals.len()), (AccessState::Pending, 1));
    let e = act(&bob, &req.id, "approve").await.unwrap_err();
    assert!(e.to_string().contains("2 different approvers"), "{e}");
    let quiet = tokio::time::timeout(Duration::from_millis(300), s.next::<NodeMessage>()).await;
    assert!(
        quiet.is_err(),
        "one approval of two changes nothing: {quiet:?}"
    );
    // The second, different approver: in force, ending with the approval, on the node.
    let t0 = std::time::Instant::now();
    let two = act(&carol, &req.id, "approve").await.unwrap();
    assert_eq!(two.state, AccessState::Approved);
    let until = two.until.unwrap();
    assert!((599..=601).contains(&(until - two.start.unwrap())));
    match next(&mut s).await {
        Some(NodeMessage::Config(c)) => {
            let r = c
                .allowlist
                .rules
                .iter()
                .find(|r| r.name == format!("web-ssh@{}", req.id))
                .expect("the approved rule");
            assert_eq!(r.window.expires, Some(until), "its end travels to the node");
        }
        m => panic!("{m:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Revoked by an approver: gone at once. Revoked twice: refused.
    let r = act(&bob, &req.id, "revoke").await.unwrap();
    assert_eq!(r.state, AccessState::Revoked);
    assert_eq!(rules_of(&mut s).await, ["web-to-db"]);
    assert_eq!(
        act(&bob, &req.id, "revoke").await.unwrap_err().code(),
        Some("conflict")
    );

    // Two approvers at once: both count (the second is added to the first, not refused).
    let both = ask(&alice, body("web-ssh", 600, None, "both"))
        .await
        .unwrap();
    let (x, y) = tokio::join!(
        act(&bob, &both.id, "approve"),
        act(&carol, &both.id, "approve")
    );
    let last = [x.unwrap(), y.unwrap()]
        .into_iter()
        .max_by_key(|v| v.approvals.len())
        .unwrap();
    assert_eq!(last.state, AccessState::Approved, "{last:?}");
    assert_eq!(last.approvals.len(), 2);
    assert!(
        rules_of(&mut s)
            .await
            .contains(&format!("web-ssh@{}", both.id)),
        "every initiator on its from side"
    );
    act(&alice, &both.id, "revoke").await.unwrap();
    assert_eq!(
        rules_of(&mut s).await,
        ["web-to-db"],
        "the requester may end it"
    );

    // Denied: never takes effect, whoever approves after.
    let d = ask(&dave, body("web-ssh", 600, None, "deploy"))
        .await
        .unwrap();
    let e = act(&alice, &d.id, "deny").await.unwrap();
    assert_eq!(e.state, AccessState::Denied);
    for who in [&bob, &carol] {
        let e = act(who, &d.id, "approve").await.unwrap_err();
        assert_eq!(e.code(), Some("conflict"), "{e}");
    }
    // An operator may not deny someone else's request, only withdraw their own.
    assert_eq!(
        act(&dave, &mine.id, "deny").await.unwrap_err().code(),
        Some("forbidden")
    );
    // Not approved in time: expires, and is audited.
    let wait =
        (mine.approve_by * 1000 + 300).saturating_sub(jiff::Timestamp::now().as_millisecond());
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
    let e = act(&bob, &mine.id, "approve").await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    let quiet = tokio::time::timeout(Duration::from_millis(300), s.next::<NodeMessage>()).await;
    assert!(
        quiet.is_err(),
        "nothing denied or expired reached the node: {quiet:?}"
    );

    let log: Vec<bulkhead_proto::AuditEntry> = f.admin().await.get("/v1/audit").await.unwrap();
    let said = |who: &str, action: &str| log.iter().any(|e| e.who == who && e.action == action);
    assert!(said("alice", "access.request"), "{log:#?}");
    assert!(said("bob", "access.approve") && said("carol", "access.approve"));
    assert!(said("bob", "access.revoke") && said("alice", "access.deny"));
    let end = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let log: Vec<bulkhead_proto::AuditEntry> =
                f.admin().await.get("/v1/audit").await.unwrap();
            if log.iter().any(|e| e.action == "access.expire") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(end.is_ok(), "the expiry is audited");
    let list: Vec<AccessView> = f.admin().await.get("/v1/access").await.unwrap();
    assert_eq!(list.len(), 4);
}

/// A plan shows a change of conditions (here a new expiry) even when no port changes: the
/// operator must not read "no change" for access that will now end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_shows_changed_conditions() {
    let f = Fixture::new("plan-conditions").await;
    f.apply(POLICY).await.unwrap();
    let expiring = POLICY.replace(
        "ports: [tcp/5432]}",
        "ports: [tcp/5432], expires: 2999-01-01T00:00:00Z}",
    );
    let p: bulkhead_proto::PlanResponse = f
        .admin()
        .await
        .post(
            "/v1/policy/plan",
            &PolicyRequest {
                text: expiring.clone(),
                source: "p.yaml".into(),
                base_revision: None,
            },
        )
        .await
        .unwrap();
    assert!(p.plan.changes.is_empty(), "{:?}", p.plan.changes);
    assert_eq!(p.plan.conditions.len(), 1, "{:?}", p.plan.conditions);
    let c = &p.plan.conditions[0];
    assert_eq!((c.from.as_str(), c.to.as_str()), ("web-1", "db-1"));
    assert!(c.before.is_empty() && c.after[0].contains("2999"), "{c:?}");
    let r = f.apply(&expiring).await.unwrap();
    assert_eq!(r.summary.pairs_conditions_changed, 1);
}

/// A node cannot enroll with another node's WireGuard key (it would take over or break that
/// node's tunnels); the same identity may enroll again with its own. Token creation and the
/// administrator's credential are in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wireguard_key_in_use_is_refused_and_tokens_are_audited() {
    let f = Fixture::new("key-reuse").await;
    f.apply(POLICY).await.unwrap();
    let web = join(&f.token("web-1", 60).await).await.unwrap();
    let stolen = Token::decode(&f.token("db-1", 60).await).unwrap();
    let e = bulkhead_proto::join(&stolen, web.wireguard)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    // The token was not spent: db-1 enrolls with a key of its own.
    let own = bulkhead_proto::PrivateKey::generate().public_key();
    bulkhead_proto::join(&stolen, own).await.unwrap();
    // web-1 again, with its own key: a rebuilt server keeps its key.
    let again = Token::decode(&f.token("web-1", 60).await).unwrap();
    bulkhead_proto::join(&again, web.wireguard).await.unwrap();
    let log: Vec<bulkhead_proto::AuditEntry> = f.admin().await.get("/v1/audit").await.unwrap();
    let actions: Vec<String> = log.iter().map(|e| e.action.to_string()).collect();
    assert_eq!(
        actions.iter().filter(|a| *a == "token.create").count(),
        3,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| *a == "admin.issue").count(),
        1,
        "{actions:?}"
    );
    assert!(
        log.iter().any(|e| e.action == "token.create"
            && e.who == "admin"
            && e.identity.as_deref() == Some("db-1")),
        "{log:#?}"
    );
}

/// Bodies are bounded by what each route needs, and read only after the caller is
/// authenticated: an anonymous client cannot make the controller buffer megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_bounded_per_route_and_read_only_for_the_right_caller() {
    let f = Fixture::new("bodies").await;
    let anon = Client::new(
        std::slice::from_ref(&f.admin.url),
        &Trust::Ca(f.admin.ca.clone()),
        None,
    )
    .unwrap();
    let big = |n: usize| serde_json::json!({ "secret": "x".repeat(n) });
    let post = |c: &Client, path: &'static str, body: serde_json::Value| {
        let c = c.clone();
        async move {
            c.connect()
                .await
                .unwrap()
                .post::<_, serde_json::Value>(path, &body)
                .await
                .unwrap_err()
                .code()
                .map(str::to_string)
        }
    };
    assert_eq!(
        post(&anon, "/v1/join", big(100 << 10)).await.as_deref(),
        Some("too_large")
    );
    assert_eq!(
        post(&anon, "/v1/join", big(100)).await.as_deref(),
        Some("bad_request")
    );
    assert_eq!(
        post(&anon, "/v1/policy/apply", big(8 << 20))
            .await
            .as_deref(),
        Some("unauthenticated"),
        "refused before the body is read"
    );
    let node = join(&f.token("web-1", 60).await).await.unwrap();
    assert_eq!(
        post(&node.client(), "/v1/node/report", big(1 << 20))
            .await
            .as_deref(),
        Some("too_large")
    );
}

/// What a node reports about itself is bounded (facts, names, values), and its endpoint moves
/// at most every few seconds: each move is a store write and a push to all its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_bounded_and_endpoints_do_not_flap() {
    let f = Fixture::new("reports").await;
    f.apply(POLICY).await.unwrap();
    let node = join(&f.token("web-1", 60).await).await.unwrap();
    let mut c = node.client().connect().await.unwrap();
    let report = |endpoint: &str, facts: bulkhead_proto::Facts| Report {
        endpoint: Some(endpoint.parse().unwrap()),
        listen_port: 51820,
        status: "ok".into(),
        facts,
        ..Report::default()
    };
    let fact = |v: &str| bulkhead_proto::Fact {
        value: v.into(),
        interval: 30,
    };
    let many: bulkhead_proto::Facts = (0..65)
        .map(|i| (format!("check.c{i}"), fact("true")))
        .collect();
    let e = c
        .post::<_, serde_json::Value>("/v1/node/report", &report("198.18.0.7:51820", many))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("bad_request"), "{e}");
    let long: bulkhead_proto::Facts = [("check.x".to_string(), fact(&"y".repeat(10_000)))].into();
    let e = c
        .post::<_, serde_json::Value>("/v1/node/report", &report("198.18.0.7:51820", long))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("bad_request"), "{e}");
    // Within bounds: taken. Its endpoint moves once; a second move at once is not written.
    for ep in ["198.18.0.7:51820", "198.18.0.8:51820"] {
        let _: serde_json::Value = c
            .post(
                "/v1/node/report",
                &report(ep, [("check.x".to_string(), fact("true"))].into()),
            )
            .await
            .unwrap();
    }
    let nodes: Vec<bulkhead_proto::NodeView> = f.admin().await.get("/v1/nodes").await.unwrap();
    let web = nodes.iter().find(|n| n.identity == "web-1").unwrap();
    assert_eq!(web.endpoint, Some("198.18.0.7:51820".parse().unwrap()));
}

/// A flow entry as a node's flow log writes it.
fn entry(
    at: i64,
    outbound: bool,
    peer: &str,
    proto: &str,
    port: u16,
    allowed: bool,
) -> serde_json::Value {
    let mut e = serde_json::json!({
        "at": at, "outbound": outbound, "peer_address": peer, "proto": proto, "port": port,
        "allowed": allowed,
    });
    if allowed {
        e["rule"] = "web-to-db".into();
    } else {
        e["reason"] = "not_allowed".into();
    }
    e
}

/// Reads `GET /v1/flows/history?{query}` as the administrator of `admin`.
async fn history(
    admin: &CliConfig,
    query: &str,
) -> Result<Vec<bulkhead_proto::FlowAggregate>, ApiError> {
    let mut c = admin.client().unwrap().connect().await.unwrap();
    let mut lines = c.stream(&format!("/v1/flows/history?{query}")).await?;
    let mut out = Vec::new();
    while let Some(a) = lines.next().await? {
        out.push(a);
    }
    Ok(out)
}

/// The durable flow history through the API: what nodes report comes back as per-hour
/// aggregates (each connection once, ICMP on port 0), oldest hour first, including what is not
/// written yet, filtered as asked; bad parameters are refused with the API's error; a restart
/// on the same state keeps it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_history_answers_per_hour_aggregates_and_survives_a_restart() {
    let mut f = Fixture::new("flow-history").await;
    f.apply(POLICY).await.unwrap();
    let web = join(&f.token("web-1", 600).await).await.unwrap();
    let db = join(&f.token("db-1", 600).await).await.unwrap();
    let nodes: Vec<bulkhead_proto::NodeView> = f.admin().await.get("/v1/nodes").await.unwrap();
    let address = |id: &str| {
        nodes
            .iter()
            .find(|n| n.identity == id)
            .and_then(|n| n.address)
            .unwrap()
            .to_string()
    };
    let (web_addr, db_addr) = (address("web-1"), address("db-1"));
    let now = jiff::Timestamp::now().as_millisecond();
    let two_hours_ago = now - 2 * 3_600_000;
    let mut from_web = vec![
        // Its own denied attempts: at db-1, and at an address nobody has.
        entry(now - 5, true, &db_addr, "tcp", 22, false),
        entry(now - 4, true, &db_addr, "tcp", 22, false),
        entry(now - 3, true, &db_addr, "tcp", 22, false),
        entry(now - 2, true, "192.0.2.9", "tcp", 23, false),
        entry(two_hours_ago, true, &db_addr, "tcp", 22, false),
        // Its side of two connections db-1 admitted (and reports too).
        entry(now - 9, true, &db_addr, "tcp", 5432, true),
        entry(now - 8, true, &db_addr, "tcp", 5432, true),
    ];
    // Pings with three echo identifiers: one kind of flow.
    for id in [101, 102, 103] {
        from_web.push(entry(now - 1, true, &db_addr, "icmp", id, false));
    }
    let from_db = vec![
        entry(now - 9, false, &web_addr, "tcp", 5432, true),
        entry(now - 7, false, &web_addr, "tcp", 5432, true),
    ];
    for (node, flows) in [(&web, from_web), (&db, from_db)] {
        let _: serde_json::Value = node
            .client()
            .connect()
            .await
            .unwrap()
            .post(
                "/v1/node/flows",
                &serde_json::json!({ "flows": flows, "dropped": 0 }),
            )
            .await
            .unwrap();
    }
    let hour = |ms: i64| ms.div_euclid(3_600_000) * 3600;
    let brief =
        |v: &[bulkhead_proto::FlowAggregate]| -> Vec<(i64, String, String, u16, String, u64)> {
            v.iter()
                .map(|a| {
                    (
                        a.hour,
                        a.dst.clone(),
                        a.proto.to_string(),
                        a.port,
                        a.verdict.to_string(),
                        a.count,
                    )
                })
                .collect()
        };
    let check = |got: Vec<bulkhead_proto::FlowAggregate>| {
        let b = brief(&got);
        let want = [
            (hour(two_hours_ago), "db-1", "tcp", 22, "deny", 1),
            (hour(now), "db-1", "tcp", 22, "deny", 3),
            (hour(now), "db-1", "tcp", 5432, "allow", 2),
            (hour(now), "db-1", "icmp", 0, "deny", 3),
            (hour(now), "192.0.2.9", "tcp", 23, "deny", 1),
        ];
        assert_eq!(b.len(), want.len(), "{b:?}");
        for (h, dst, proto, port, verdict, count) in want {
            assert!(
                b.contains(&(h, dst.into(), proto.into(), port, verdict.into(), count)),
                "{:?} missing from {b:?}",
                (h, dst, proto, port, verdict, count)
            );
        }
        assert!(
            got.windows(2).all(|w| w[0].hour <= w[1].hour),
            "oldest hour first"
        );
        let allowed = got.iter().find(|a| a.port == 5432).unwrap();
        assert_eq!(
            (
                allowed.src.as_str(),
                allowed.rule.as_deref(),
                allowed.first,
                allowed.last
            ),
            ("web-1", Some("web-to-db"), now - 9, now - 7)
        );
    };
    // Right away (in memory), and once written.
    check(history(&f.admin, "since=10800").await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    check(history(&f.admin, "since=10800").await.unwrap());
    // The last ten minutes leave the hour of two hours ago out; filters select.
    let recent = history(&f.admin, "since=600").await.unwrap();
    assert_eq!(recent.len(), 4, "{:?}", brief(&recent));
    let allowed = history(&f.admin, "since=600&verdict=allow").await.unwrap();
    assert_eq!(
        brief(&allowed),
        [(
            hour(now),
            "db-1".into(),
            "tcp".into(),
            5432,
            "allow".into(),
            2
        )]
    );
    let denied = history(&f.admin, "since=10800&denied=1&identity=db-1")
        .await
        .unwrap();
    assert_eq!(denied.len(), 3, "{:?}", brief(&denied));
    assert!(
        history(&f.admin, "since=10800&path=underlay")
            .await
            .unwrap()
            .is_empty()
    );
    let older = history(&f.admin, "since=10800&until=3700").await.unwrap();
    assert_eq!(
        brief(&older),
        [(
            hour(two_hours_ago),
            "db-1".into(),
            "tcp".into(),
            22,
            "deny".into(),
            1
        )]
    );
    // Bad parameters: 400, with the API's error.
    for bad in [
        "",
        "since=abc",
        "since=0",
        "since=60&until=60",
        "since=60&verdict=maybe",
        "since=60&path=x",
        "since=60&limit=1",
    ] {
        let e = history(&f.admin, bad).await.unwrap_err();
        assert_eq!(e.code(), Some("bad_request"), "{bad:?}: {e}");
    }
    // A node is not an administrator.
    let e = web
        .client()
        .connect()
        .await
        .unwrap()
        .stream("/v1/flows/history?since=60")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));

    // A restart on the same state keeps the history, and a stop writes what is in memory.
    let _: serde_json::Value = web
        .client()
        .connect()
        .await
        .unwrap()
        .post(
            "/v1/node/flows",
            &serde_json::json!({ "flows": [entry(now, true, &db_addr, "tcp", 24, false)], "dropped": 0 }),
        )
        .await
        .unwrap();
    let dir = f.dir.clone();
    f.handle.take().unwrap().stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = start(settings(&dir)).await.unwrap();
    let admin = CliConfig::load(&h.admin).unwrap();
    let got = history(&admin, "since=10800").await.unwrap();
    assert!(got.iter().any(|a| a.port == 24), "{:?}", brief(&got));
    check(got.into_iter().filter(|a| a.port != 24).collect());
    f.handle = Some(h);
}
