//! Two controllers sharing one real etcd (started on loopback by the test) are one system: one
//! CA, credentials from either work on both, a change through one reaches a node streaming from
//! the other, a token is redeemed once across both, garbage in etcd is refused and logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bulkhead_controller::{Handle, Settings, start};
use bulkhead_netlab::etcd::{self, Etcd as Server};
use bulkhead_proto::tls::{Identity, Trust};
use bulkhead_proto::{
    ApplyResponse, CliConfig, Client, NodeMessage, NodeView, PolicyRequest, PolicyView,
    RevokeResponse, StatusView, Token, TokenRequest, TokenResponse,
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

fn etcd_ok() -> bool {
    match etcd::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("BULKHEAD_SKIP_ETCD").is_some() => {
            eprintln!("skipping: {why}");
            false
        }
        Err(why) => panic!("etcd tests need etcd: {why} (BULKHEAD_SKIP_ETCD=1 skips them)"),
    }
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bh-ha-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn controller(state: &std::path::Path, spec: &str) -> (Handle, CliConfig) {
    let h = start(Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state: state.to_path_buf(),
        store: Some(spec.to_string()),
        policy: None,
        advertise_url: None,
    })
    .await
    .unwrap();
    let admin = CliConfig::load(&h.admin).unwrap();
    (h, admin)
}

async fn node_client(token: &str, url: &str) -> Client {
    let t = Token::decode(token).unwrap();
    let wg = bulkhead_dataplane::public_key(&bulkhead_dataplane::generate_private_key());
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
    let (da, db) = (dir("a"), dir("b"));
    let (a, admin_a) = controller(&da, &server.spec()).await;
    let (b, admin_b) = controller(&db, &server.spec()).await;
    // One CA: the second controller found the first one's; each wrote a working admin.yaml.
    assert_eq!(admin_a.ca, admin_b.ca);
    let mut ca = admin_a.client().unwrap().connect().await.unwrap();
    let mut cb = admin_b.client().unwrap().connect().await.unwrap();
    // Status: both controllers registered, the etcd member healthy.
    let st: StatusView = ca.get("/v1/status").await.unwrap();
    assert_eq!(st.controllers.len(), 2, "{:?}", st.controllers);
    assert!(st.controllers.contains(&a.url) && st.controllers.contains(&b.url));
    assert_eq!(st.store_health.len(), 1);
    assert!(
        st.store_health[0].1.starts_with("ok, etcd 3."),
        "{:?}",
        st.store_health
    );

    // A node enrolled through A streams from B; a policy applied through A reaches it.
    let tok: TokenResponse = ca
        .post(
            "/v1/tokens",
            &TokenRequest {
                identity: "web-1".into(),
                ttl: 600,
            },
        )
        .await
        .unwrap();
    let web = node_client(&tok.token, &b.url).await;
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
    let applied: ApplyResponse = ca
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
    let p: PolicyView = cb.get("/v1/policy").await.unwrap();
    assert_eq!(p.revision, 1, "B serves the policy A applied");

    // 100 concurrent joins with one token, spread over both controllers: exactly one wins.
    let tok: TokenResponse = cb
        .post(
            "/v1/tokens",
            &TokenRequest {
                identity: "db-1".into(),
                ttl: 600,
            },
        )
        .await
        .unwrap();
    let t = Token::decode(&tok.token).unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut t = t.clone();
        t.urls = vec![if i % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        }];
        tasks.push(tokio::spawn(async move {
            let wg = bulkhead_dataplane::public_key(&bulkhead_dataplane::generate_private_key());
            bulkhead_proto::join(&t, wg).await.map(|_| ())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some("token_invalid"), "{e}"),
        }
    }
    assert_eq!(ok, 1, "one token, one enrollment, across controllers");

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
    let nodes: Vec<NodeView> = cb.get("/v1/nodes").await.unwrap();
    assert!(!nodes.iter().any(|n| n.identity == "evil"), "{nodes:?}");
    let p: PolicyView = ca.get("/v1/policy").await.unwrap();
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
    let r: RevokeResponse = cb.post("/v1/nodes/web-1/revoke", &()).await.unwrap();
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
    let e = cb
        .post::<_, ApplyResponse>("/v1/policy/apply", &stored)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("internal"), "{e}");
    a.stop();
    b.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}
