//! The follower: the one task that changes the view. A full read of the store, then its watch;
//! a resync or an error starts over. Each step takes the lock to take in what changed, lets go
//! of it to compile, and takes it again to swap in the result and push.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_store::{Event, Revision, Store, WatchMessage};
use tokio::sync::watch;

use super::mirror::Touched;
use super::{Shared, View, lock, unix_now};
use crate::currency::Currency;

/// One step: `take_in` changes the mirror under the lock; the compile it calls for runs with
/// the lock released, on a blocking thread (a full compile takes a runtime worker for as long
/// as it lasts otherwise); the result is swapped in and pushed under the lock again. Returns how
/// many nodes were sent something, and the credential generation.
async fn step(view: &Shared, take_in: impl FnOnce(&mut View) -> Touched) -> (usize, u64) {
    let now = unix_now();
    let (t, job) = {
        let mut v = lock(view);
        let mut t = take_in(&mut v);
        let job = v.job(&mut t, now);
        (t, job)
    };
    let outcome = if job.is_heavy() {
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(o) => o,
            Err(e) => {
                // A panic in the compiler: keep what is live, and say so.
                tracing::error!(error = %e, "compiling the policy failed; the live one stays");
                super::live::Outcome::Unchanged
            }
        }
    } else {
        job.run()
    };
    let mut v = lock(view);
    let sent = v.finish(t, outcome);
    (sent, v.cred_generation)
}

/// How long from `now_ms` until just past the second `t` (Unix seconds) begins. Both come from
/// what nodes and administrators wrote (facts' intervals, expiries): no arithmetic overflows,
/// and the wait is at most a day (the loop looks again then).
fn until(t: i64, now_ms: i64) -> Duration {
    let ms = t
        .saturating_mul(1000)
        .saturating_sub(now_ms)
        .clamp(0, 86_400_000);
    Duration::from_millis(ms.unsigned_abs() + 5)
}

/// Follows the store forever: a full read, then the watch; a resync or an error starts over.
/// `applied` holds the store revision the view has caught up with (-1 before the first full
/// read), so that a write can wait until its effect is visible (read your writes). Each full
/// read and each progress the watch confirms is recorded in `currency` once the view holds it.
pub async fn sync(
    store: Arc<dyn Store>,
    view: Arc<Shared>,
    applied: watch::Sender<Revision>,
    creds: watch::Sender<u64>,
    currency: Arc<Currency>,
) {
    let announce = |generation: u64| {
        creds.send_if_modified(|g| {
            let changed = *g != generation;
            *g = generation;
            changed
        });
    };
    loop {
        // Taken before the read: the snapshot is the store's state at some moment after it.
        let asked = Instant::now();
        let snap = match store.range("").await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (sent, generation) = step(&view, |v| v.reset(&snap.kvs)).await;
        announce(generation);
        tracing::debug!(revision = snap.revision, sent, "view loaded from the store");
        applied.send_replace(snap.revision);
        currency.confirm(asked);
        let mut w = match store.watch("", snap.revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut seen = snap.revision;
        loop {
            let wake = lock(&view).next_event(unix_now());
            let timer = async {
                match wake {
                    Some(t) => {
                        let now_ms = jiff::Timestamp::now().as_millisecond();
                        tokio::time::sleep(until(t, now_ms)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                m = w.next() => m,
                () = timer => {
                    let (sent, _) = step(&view, |_| Touched {
                        conditions: true,
                        ..Touched::default()
                    })
                    .await;
                    if sent > 0 {
                        tracing::info!(nodes = sent, "conditions changed (time): pushed");
                    }
                    continue;
                }
            };
            match msg {
                Some(WatchMessage::Events(events)) => {
                    let fresh = events.iter().filter(|e| e.revision() > seen);
                    let (sent, generation) = step(&view, |v| v.take(fresh)).await;
                    seen = events
                        .iter()
                        .map(Event::revision)
                        .max()
                        .unwrap_or(seen)
                        .max(seen);
                    announce(generation);
                    applied.send_replace(seen);
                    if sent > 0 {
                        tracing::info!(store_revision = seen, nodes = sent, "pushed");
                    }
                }
                // Everything before it on the watch has been taken in, by the steps above: the
                // view is the store's as of now. Its revision may be above `seen` for writes
                // outside this controller's keys (and, before etcd 3.4.25, for events still in
                // flight), so it moves neither `seen` nor `applied`.
                Some(WatchMessage::Progress(revision)) => {
                    tracing::trace!(revision, "store confirms the watch is current");
                    currency.confirm(Instant::now());
                }
                Some(WatchMessage::Resync) => {
                    tracing::warn!("store watch lost events: reloading everything");
                    break;
                }
                None => {
                    tracing::warn!("store watch ended: reloading");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_takes_any_time_without_overflow() {
        assert_eq!(until(10, 9_000), Duration::from_millis(1_005));
        assert_eq!(until(1, 9_000), Duration::from_millis(5), "past: at once");
        assert_eq!(until(i64::MAX, 0), Duration::from_millis(86_400_005));
        assert_eq!(until(i64::MIN, i64::MAX), Duration::from_millis(5));
    }
}
