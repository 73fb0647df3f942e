//! The behaviour every backend must have, as one test suite run against each of them. Each check
//! works under its own `prefix`, so one fresh store serves them all.
//!
//! Panics on the first difference: this is test code, called from `#[test]`s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::{Compare, Event, Op, Store, WatchMessage};

fn put(k: &str, v: &str) -> Op {
    Op::Put(k.to_string(), v.as_bytes().to_vec())
}

/// Runs every check.
pub async fn run_all(store: Arc<dyn Store>, prefix: &str) {
    revisions_and_range(&*store, &format!("{prefix}/range/")).await;
    compare_and_swap(&*store, &format!("{prefix}/cas/")).await;
    one_winner(store.clone(), &format!("{prefix}/race/")).await;
    watch_in_order(&*store, &format!("{prefix}/watch/")).await;
    quiet_watch_confirms_progress(&*store, &format!("{prefix}/quiet/")).await;
    held_keys(&*store, &format!("{prefix}/held/")).await;
}

/// A held key exists while its holder lives (kept alive past its ttl), and goes after.
pub async fn held_keys(s: &dyn Store, p: &str) {
    let k = format!("{p}me");
    let held = s.hold(&k, b"https://a:7443".to_vec(), 2).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.get(&k).await.unwrap().map(|kv| kv.value),
        Some(b"https://a:7443".to_vec()),
        "kept alive past its ttl"
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.get(&k).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a dropped hold must go within its ttl"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every transaction raises the revision; keys remember theirs; ranges are by prefix, in order.
pub async fn revisions_and_range(s: &dyn Store, p: &str) {
    let r1 = s.txn(&[], &[put(&format!("{p}b"), "1")]).await.unwrap();
    assert!(r1.succeeded);
    let r2 = s
        .txn(
            &[],
            &[put(&format!("{p}a"), "2"), put(&format!("{p}c"), "3")],
        )
        .await
        .unwrap();
    assert_eq!(r2.revision, r1.revision + 1, "one revision per transaction");
    s.txn(&[], &[put(&format!("{p}z/other"), "x")])
        .await
        .unwrap();
    let snap = s.range(p).await.unwrap();
    let keys: Vec<&str> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            format!("{p}a"),
            format!("{p}b"),
            format!("{p}c"),
            format!("{p}z/other")
        ]
    );
    assert_eq!(snap.kvs[1].mod_revision, r1.revision);
    assert_eq!(snap.kvs[0].mod_revision, r2.revision);
    assert!(snap.revision > r2.revision);
    let only = s.range(&format!("{p}z/")).await.unwrap();
    assert_eq!(only.kvs.len(), 1);
    let got = s.get(&format!("{p}c")).await.unwrap().unwrap();
    assert_eq!(got.value, b"3");
    assert_eq!(s.get(&format!("{p}nope")).await.unwrap(), None);
    // Deleting removes; deleting nothing is harmless.
    let d = s
        .txn(
            &[],
            &[Op::Delete(format!("{p}c")), Op::Delete(format!("{p}nope"))],
        )
        .await
        .unwrap();
    assert!(d.succeeded);
    assert_eq!(s.get(&format!("{p}c")).await.unwrap(), None);
}

/// A transaction commits only if every comparison holds, and then all of its writes.
pub async fn compare_and_swap(s: &dyn Store, p: &str) {
    let k = format!("{p}k");
    // 0 means "must not exist".
    let t = s
        .txn(&[Compare::ModRevision(k.clone(), 0)], &[put(&k, "first")])
        .await
        .unwrap();
    assert!(t.succeeded);
    let again = s
        .txn(&[Compare::ModRevision(k.clone(), 0)], &[put(&k, "second")])
        .await
        .unwrap();
    assert!(!again.succeeded, "create-if-absent must fail when present");
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b"first");
    // A stale revision fails and writes nothing, not even the other keys.
    let other = format!("{p}other");
    let stale = s
        .txn(
            &[Compare::ModRevision(k.clone(), t.revision - 1)],
            &[put(&k, "x"), put(&other, "x")],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(s.get(&other).await.unwrap(), None, "all or nothing");
    let ok = s
        .txn(
            &[Compare::ModRevision(k.clone(), t.revision)],
            &[Op::Delete(k.clone()), put(&other, "y")],
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    assert_eq!(s.get(&k).await.unwrap(), None);
    assert_eq!(
        s.get(&other).await.unwrap().unwrap().mod_revision,
        ok.revision
    );
}

/// Many concurrent compare-and-swaps on one key: exactly one wins.
pub async fn one_winner(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}token");
    let first = s.txn(&[], &[put(&k, "unused")]).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (s, k) = (s.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            s.txn(
                &[Compare::ModRevision(k.clone(), first.revision)],
                &[Op::Delete(k), put(&format!("winner/{i}"), "")],
            )
            .await
            .unwrap()
            .succeeded
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one transaction may consume the key");
}

/// A watch sees every change under its prefix, in order, once, starting after the revision it
/// was given; and a watch started in the past replays what it missed (or asks for a resync).
pub async fn watch_in_order(s: &dyn Store, p: &str) {
    let start = s.range(p).await.unwrap().revision;
    let r1 = s.txn(&[], &[put(&format!("{p}a"), "1")]).await.unwrap();
    // Started after r1 was committed but asked for everything after `start`.
    let mut w = s.watch(p, start).await.unwrap();
    s.txn(&[], &[put("elsewhere/x", "no")]).await.unwrap();
    s.txn(
        &[],
        &[put(&format!("{p}b"), "2"), Op::Delete(format!("{p}a"))],
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 3 {
        let msg = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("watch delivered nothing in 10 s")
            .expect("watch ended");
        match msg {
            WatchMessage::Events(ev) => seen.extend(ev),
            WatchMessage::Progress(_) => {}
            WatchMessage::Resync => {
                // Allowed only if the backend cannot replay; then the state must be readable.
                let snap = s.range(p).await.unwrap();
                assert_eq!(snap.kvs.len(), 1);
                return;
            }
        }
    }
    assert_eq!(seen[0].key(), format!("{p}a"));
    assert_eq!(seen[0].revision(), r1.revision);
    assert!(matches!(&seen[1], Event::Put(kv) if kv.key == format!("{p}b") && kv.value == b"2"));
    assert!(matches!(&seen[2], Event::Delete { key, .. } if *key == format!("{p}a")));
    assert!(
        seen[1].revision() > r1.revision + 1,
        "the unrelated write took a revision"
    );
    let more = async {
        loop {
            match w.next().await {
                Some(WatchMessage::Progress(_)) => continue,
                other => return other,
            }
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(200), more)
            .await
            .is_err(),
        "nothing more, and nothing from outside the prefix"
    );
}

/// A watch on a quiet prefix of a backend with `progress_every` confirms it is current that
/// often, at a revision no older than its start; a backend without never sends progress.
pub async fn quiet_watch_confirms_progress(s: &dyn Store, p: &str) {
    let start = s.range(p).await.unwrap().revision;
    let mut w = s.watch(p, start).await.unwrap();
    match s.progress_every() {
        Some(every) => {
            for _ in 0..2 {
                let m = tokio::time::timeout(every * 3, w.next())
                    .await
                    .expect("no progress on a quiet watch");
                assert!(
                    matches!(m, Some(WatchMessage::Progress(r)) if r >= start),
                    "{m:?}"
                );
            }
        }
        None => {
            let m = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
            assert!(m.is_err(), "{m:?}");
        }
    }
}
