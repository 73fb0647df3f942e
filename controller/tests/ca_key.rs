//! The CA's private key at rest, and a controller on TLS etcd: the store never holds the key in
//! clear (embedded or etcd), a clear record from before is sealed on start, a controller with
//! the wrong CA key file refuses to start, and a controller runs on `etcds://` with a client
//! certificate (start, apply, restart that reads the policy back).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bulkhead_controller::records::{CA, CaRecord};
use bulkhead_controller::sealing::SealKey;
use bulkhead_controller::{Settings, start};
use bulkhead_netlab::TempDir;
use bulkhead_netlab::etcd::{Etcd as Server, TestPki, etcd_ok};
use bulkhead_proto::tls::Ca;
use bulkhead_proto::{ApplyResponse, CliConfig, PolicyRequest, PolicyView};
use bulkhead_store::etcd::Access;
use bulkhead_store::{Embedded, Op, Store};

const POLICY: &str = "version: 1
network: {name: t, cidr: 10.79.0.0/16}
identities:
  web-1: {labels: {tier: web}}
segments:
  web: {match: {tier: web}}
rules: []
";

fn settings(state: &Path) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state: state.to_path_buf(),
        store: None,
        etcd: Access::default(),
        ca_key_file: None,
        policy: None,
        advertise_url: None,
        flow_history: bulkhead_controller::flows::DEFAULT_HISTORY,
        flow_limits: Default::default(),
        access_request_ttl: bulkhead_controller::ops::DEFAULT_REQUEST_TTL,
        metrics: None,
    }
}

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
    p
}

/// The stored CA value holds no private key in clear: not the PEM, not a line of it. Returns
/// the key, opened with `seal`.
fn assert_sealed(value: &[u8], seal: &SealKey) -> String {
    let text = String::from_utf8_lossy(value);
    assert!(
        !text.contains("PRIVATE KEY"),
        "the CA key is in clear: {text}"
    );
    let rec: CaRecord = serde_json::from_slice(value).unwrap();
    assert!(rec.key.is_empty());
    let sealed = rec.sealed_key.as_deref().expect("a sealed key");
    assert!(!sealed.contains("BEGIN"));
    let key = seal.open(&rec.cert, sealed).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "a line of the CA key is in the store");
    }
    Ca::load(&rec.cert, &key).unwrap();
    key
}

async fn stored_ca(state: &Path) -> Vec<u8> {
    let s = Embedded::open(&state.join("store.redb")).unwrap();
    s.get(CA).await.unwrap().unwrap().value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_holds_the_ca_key_sealed_and_the_wrong_key_file_refuses() {
    let dir = TempDir::new("ca-key-embedded");
    let state = dir.path().join("state");
    let h = start(settings(&state)).await.unwrap();
    h.stop();
    // The default key file: in the state directory, 0600.
    let file = state.join(bulkhead_controller::sealing::DEFAULT_FILE);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let value = stored_ca(&state).await;
    assert_sealed(&value, &SealKey::load(&file, false).unwrap());

    // Another key file: refused, naming it; the CA is left alone.
    let wrong = key_file(dir.path(), "wrong.key", 0x11);
    let e = start(Settings {
        ca_key_file: Some(wrong.clone()),
        ..settings(&state)
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("does not open") && e.contains(&wrong.display().to_string()),
        "{e}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(stored_ca(&state).await, value);
    // The right one again: it starts.
    start(settings(&state)).await.unwrap().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_ca_record_is_sealed_on_start() {
    let dir = TempDir::new("ca-key-migrate");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // What controllers before sealing wrote.
    let ca = Ca::generate().unwrap();
    {
        let s = Embedded::open(&state.join("store.redb")).unwrap();
        let clear = serde_json::json!({"cert": ca.cert_pem, "key": ca.key_pem});
        s.txn(&[], &[Op::Put(CA.into(), clear.to_string().into_bytes())])
            .await
            .unwrap();
    }
    let h = start(settings(&state)).await.unwrap();
    let admin = CliConfig::load(&h.admin).unwrap();
    assert_eq!(admin.ca, ca.cert_pem, "the same CA, not a new one");
    h.stop();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let file = state.join(bulkhead_controller::sealing::DEFAULT_FILE);
    let key = assert_sealed(
        &stored_ca(&state).await,
        &SealKey::load(&file, false).unwrap(),
    );
    assert_eq!(key, ca.key_pem);
}

fn tls_access(pki: &TestPki) -> Access {
    Access::certificate(&pki.ca_pem, &pki.client.0, &pki.client.1)
}

/// The administrator's connection to a started controller.
async fn admin(h: &bulkhead_controller::Handle) -> bulkhead_proto::Connection {
    CliConfig::load(&h.admin)
        .unwrap()
        .client()
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_runs_on_tls_etcd_with_the_ca_key_sealed() {
    if !etcd_ok() {
        return;
    }
    let dir = TempDir::new("ca-key-etcd");
    let pki = TestPki::generate(dir.path());
    let server = Server::start_tls(&pki.server);
    let key = key_file(dir.path(), "ca-seal.key", 0x42);
    let on_etcd = |state: &str, key: Option<PathBuf>| Settings {
        store: Some(server.spec()),
        etcd: tls_access(&pki),
        ca_key_file: key,
        ..settings(&dir.path().join(state))
    };

    // With etcd the key file must be given, and exist.
    let e = start(on_etcd("s0", None)).await.unwrap_err().to_string();
    assert!(e.contains("--ca-key-file"), "{e}");
    let e = start(on_etcd("s0", Some(dir.path().join("absent"))))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    // TLS settings on plain etcd:// are refused at once, not retried.
    let e = start(Settings {
        store: Some(server.spec().replace("etcds://", "etcd://")),
        ..on_etcd("s0", Some(key.clone()))
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("etcds://"), "{e}");

    // Start, apply.
    let h = start(on_etcd("s1", Some(key.clone()))).await.unwrap();
    let mut c = admin(&h).await;
    let r: ApplyResponse = c
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
    h.stop();

    // What etcd holds under the CA key is no private key.
    let raw = bulkhead_store::Etcd::connect_with(
        &server.spec(),
        bulkhead_store::etcd::NAMESPACE,
        &tls_access(&pki),
    )
    .await
    .unwrap();
    let value = raw.get(CA).await.unwrap().unwrap().value;
    assert_sealed(&value, &SealKey::load(&key, false).unwrap());

    // A restart (a fresh state directory: everything comes from etcd) reads the policy back.
    let h = start(on_etcd("s2", Some(key.clone()))).await.unwrap();
    let mut c = admin(&h).await;
    let p: PolicyView = c.get("/v1/policy").await.unwrap();
    assert_eq!((p.revision, p.text.as_str()), (1, POLICY));

    // A controller with another key file refuses to start, and changes nothing.
    let wrong = key_file(dir.path(), "wrong.key", 0x43);
    let e = start(on_etcd("s3", Some(wrong)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not open"), "{e}");
    assert_eq!(raw.get(CA).await.unwrap().unwrap().value, value);
    h.stop();
}
