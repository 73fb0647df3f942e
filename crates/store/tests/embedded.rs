//! The store suite against the embedded backend, plus what only it promises: durability across
//! reopening and an exclusive lock on its file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bulkhead_store::{Embedded, Op, Store, suite};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bh-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_passes() {
    let d = dir("suite");
    let s: Arc<dyn Store> = Arc::new(Embedded::open(&d.join("db")).unwrap());
    suite::run_all(s, "t").await;
    std::fs::remove_dir_all(&d).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_data_and_revision() {
    let d = dir("reopen");
    let path = d.join("db");
    let rev = {
        let s = Embedded::open(&path).unwrap();
        s.txn(&[], &[Op::Put("k".into(), b"v".to_vec())])
            .await
            .unwrap();
        let r = s
            .txn(&[], &[Op::Put("k2".into(), b"w".to_vec())])
            .await
            .unwrap();
        // A second open of the same file while the first holds it is refused, clearly.
        let e = Embedded::open(&path).unwrap_err().to_string();
        assert!(e.contains("another controller"), "{e}");
        r.revision
    };
    let s = Embedded::open(&path).unwrap();
    let snap = s.range("").await.unwrap();
    assert_eq!(
        snap.revision, rev,
        "revisions never go back after a restart"
    );
    assert_eq!(snap.kvs.len(), 2);
    let next = s.txn(&[], &[Op::Delete("k".into())]).await.unwrap();
    assert_eq!(next.revision, rev + 1);
    // A watch from before the restart's history asks for a resync rather than skipping.
    let mut w = s.watch("", 0).await.unwrap();
    assert_eq!(w.next().await, Some(bulkhead_store::WatchMessage::Resync));
    std::fs::remove_dir_all(&d).unwrap();
}
