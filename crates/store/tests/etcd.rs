//! The store suite against a real etcd (Debian's etcd-server, started on loopback by the test),
//! plus what etcd adds: compaction forces a resync, an unreachable cluster is a clear error, and
//! keys stay inside their namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bulkhead_netlab::etcd::{Etcd as Server, etcd_ok};
use bulkhead_store::{Etcd, Op, Store, WatchMessage, suite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_passes_and_etcd_specifics_hold() {
    if !etcd_ok() {
        return;
    }
    let server = Server::start();
    let s = Etcd::connect(&server.spec(), "/bulkhead-test/")
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(s.clone());
    suite::run_all(store.clone(), "t").await;

    // A namespace sees only its own keys.
    let other = Etcd::connect(&server.spec(), "/other/").await.unwrap();
    other
        .txn(&[], &[Op::Put("x".into(), b"1".to_vec())])
        .await
        .unwrap();
    assert!(s.range("x").await.unwrap().kvs.is_empty());
    assert_eq!(other.range("").await.unwrap().kvs.len(), 1);

    // A watch from a compacted revision is told to resync, not given a gap.
    let r = s
        .txn(&[], &[Op::Put("c/a".into(), b"1".to_vec())])
        .await
        .unwrap();
    s.txn(&[], &[Op::Put("c/a".into(), b"2".to_vec())])
        .await
        .unwrap();
    let mut raw = etcd_client::Client::connect([server.addr.as_str()], None)
        .await
        .unwrap();
    raw.compact(r.revision + 1, None).await.unwrap();
    let mut w = s.watch("c/", r.revision - 1).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), change(&mut w))
        .await
        .unwrap();
    assert_eq!(m, Some(WatchMessage::Resync));

    // When etcd goes away, a watch says so (resync) instead of going quiet.
    let mut w = s
        .watch("c/", s.range("").await.unwrap().revision)
        .await
        .unwrap();
    drop(server);
    let m = tokio::time::timeout(Duration::from_secs(30), change(&mut w))
        .await
        .unwrap();
    assert_eq!(m, Some(WatchMessage::Resync));
}

/// The next message of a watch that is not a progress notification.
async fn change(w: &mut bulkhead_store::Watch) -> Option<WatchMessage> {
    loop {
        match w.next().await {
            Some(WatchMessage::Progress(_)) => continue,
            m => return m,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = format!("etcd://127.0.0.1:{port}");
    let t = std::time::Instant::now();
    let e = Etcd::connect(&spec, "/bulkhead/")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("etcd") && e.contains("unavailable"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "connect must give up, not hang"
    );
    let e = Etcd::connect("http://127.0.0.1:1", "/b/")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("etcd://HOST:PORT"), "{e}");
}
