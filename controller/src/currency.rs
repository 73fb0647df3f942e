//! Whether this controller can vouch for its view: that what it serves is the store's state,
//! not a picture of it from before a cut.
//!
//! A controller cut off from etcd sees a silent watch, which is also what a quiet cluster looks
//! like; meanwhile revocations and policies committed through other controllers do not reach it.
//! So the store's watch confirms it is current every second ([`WatchMessage::Progress`]), and a
//! full read of the store confirms it too; the follower records each confirmation once the view
//! holds what it confirms. With no confirmation for [`STALE_AFTER`], the controller is stale: it
//! ends its nodes' streams and refuses them (`503 unavailable`), so that daemons move to a
//! controller that is current, and it refuses administrators' changes with the reason. When
//! contact is back and the view has caught up (a full read, then the watch's progress), it
//! serves again.
//!
//! The embedded store has one writer, this process: it is always current.
//!
//! [`WatchMessage::Progress`]: bulkhead_store::WatchMessage::Progress

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a controller serves nodes without confirming its view is the store's. Five of the
/// watch's one-second confirmations: a slow answer or two is not a cut.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How often the decision is taken again, so that streams end soon after [`STALE_AFTER`].
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Whether a view last confirmed at `confirmed` (never: `None`) is current at `now`. Pure.
pub fn is_current(confirmed: Option<Instant>, now: Instant) -> bool {
    confirmed.is_some_and(|c| now.saturating_duration_since(c) < STALE_AFTER)
}

/// This controller's currency: when its view was last confirmed, and whether it is current, as
/// a channel that node streams watch.
#[derive(Debug)]
pub struct Currency {
    /// False for a store that never needs confirming: then always current.
    tracked: bool,
    confirmed: Mutex<Option<Instant>>,
    current: watch::Sender<bool>,
}

impl Currency {
    /// For a store whose watch confirms it is current (`tracked`), or one that is always current.
    /// A tracked controller is not current until the follower's first full read.
    pub fn new(tracked: bool) -> Currency {
        Currency {
            tracked,
            confirmed: Mutex::new(None),
            current: watch::Sender::new(!tracked),
        }
    }

    fn confirmed(&self) -> Option<Instant> {
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The view holds the store's state as of `at`.
    pub fn confirm(&self, at: Instant) {
        if !self.tracked {
            return;
        }
        {
            let mut c = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
            *c = Some(c.map_or(at, |c| c.max(at)));
        }
        self.check(Instant::now());
    }

    /// Takes the decision again at `now`; returns whether the controller is current. Says so in
    /// the log when it changes.
    pub fn check(&self, now: Instant) -> bool {
        if !self.tracked {
            return true;
        }
        let confirmed = self.confirmed();
        let current = is_current(confirmed, now);
        let changed = self
            .current
            .send_if_modified(|c| std::mem::replace(c, current) != current);
        if changed && current {
            tracing::info!("the store confirms this controller's view again: serving nodes");
        } else if changed && confirmed.is_some() {
            tracing::warn!(
                unconfirmed_for = ?confirmed.map(|c| now.saturating_duration_since(c)),
                "no contact with the store: ending node streams and refusing changes until it is back"
            );
        }
        current
    }

    /// Whether the controller is current now.
    pub fn current(&self) -> bool {
        self.check(Instant::now())
    }

    /// How long since the view was last confirmed; `None` if it never needs to be.
    pub fn unconfirmed_for(&self) -> Option<Duration> {
        if !self.tracked {
            return None;
        }
        Some(self.confirmed().map_or(Duration::MAX, |c| {
            Instant::now().saturating_duration_since(c)
        }))
    }

    /// Why a stale controller refuses a call, for its error.
    pub fn why_stale(&self) -> String {
        let since = self
            .unconfirmed_for()
            .filter(|d| *d != Duration::MAX)
            .map_or("ever".to_string(), |d| format!("{} s", d.as_secs()));
        format!(
            "this controller has had no contact with its store for {since}, so its view may be out of date; try another controller"
        )
    }

    /// A receiver that changes whenever currency does: node streams end when it turns false.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.current.subscribe()
    }
}

/// Takes the decision every [`CHECK_EVERY`]: a confirmation that stops coming changes nothing
/// by itself, only time does.
pub async fn watch_over(c: std::sync::Arc<crate::Controller>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        c.currency.check(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_until_five_seconds_pass_without_a_confirmation() {
        let t0 = Instant::now();
        assert!(!is_current(None, t0), "never confirmed: not current");
        assert!(is_current(Some(t0), t0));
        assert!(is_current(Some(t0), t0 + Duration::from_millis(4_999)));
        assert!(!is_current(Some(t0), t0 + STALE_AFTER));
        assert!(!is_current(Some(t0), t0 + Duration::from_secs(60)));
        // A confirmation stamped after `now` (taken on another thread) is current, not a panic.
        assert!(is_current(Some(t0 + Duration::from_secs(1)), t0));
    }

    #[test]
    fn a_tracked_controller_goes_stale_and_comes_back_with_a_confirmation() {
        let c = Currency::new(true);
        let mut rx = c.subscribe();
        assert!(
            !*rx.borrow_and_update(),
            "nothing confirmed before the first read"
        );
        let t0 = Instant::now();
        c.confirm(t0);
        assert!(c.check(t0 + Duration::from_secs(1)));
        assert!(rx.has_changed().unwrap_or(false));
        assert!(*rx.borrow_and_update());
        assert!(!c.check(t0 + Duration::from_secs(6)), "stale");
        assert!(!*rx.borrow_and_update(), "streams are told");
        // An older confirmation arriving late does not move the clock back.
        c.confirm(t0 - Duration::from_secs(10));
        assert!(!c.check(t0 + Duration::from_secs(6)));
        c.confirm(t0 + Duration::from_secs(6));
        assert!(c.check(t0 + Duration::from_secs(7)), "serving again");
        assert!(c.why_stale().contains("no contact with its store"));
    }

    #[test]
    fn an_untracked_store_is_always_current() {
        let c = Currency::new(false);
        assert!(*c.subscribe().borrow());
        assert!(c.check(Instant::now() + Duration::from_secs(3600)));
        assert_eq!(c.unconfirmed_for(), None);
    }
}
