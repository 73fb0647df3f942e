//! A host change the kernel refused: what went wrong, when it was tried, and when it was last
//! logged. The host configuration and the host firewall both keep one, try again every
//! [`RETRY_EVERY`], and log the same failure at most every [`LOG_EVERY`].

use std::time::{Duration, Instant};

/// How often a refused change is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often the same failure is logged again while it lasts.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// The last failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What the kernel said.
    pub error: String,
    tried: Instant,
    logged: Instant,
}

impl Failure {
    /// The failure after an attempt failed with `error`, following `prev`; and whether to log
    /// it (a new error, or the same one not logged for [`LOG_EVERY`]).
    pub fn next(prev: Option<&Failure>, error: String, now: Instant) -> (Failure, bool) {
        let log =
            prev.is_none_or(|f| f.error != error || now.duration_since(f.logged) >= LOG_EVERY);
        let logged = match prev {
            Some(f) if !log => f.logged,
            _ => now,
        };
        (
            Failure {
                error,
                tried: now,
                logged,
            },
            log,
        )
    }

    /// Whether it is time to try again.
    pub fn due(&self) -> bool {
        self.tried.elapsed() >= RETRY_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_failure_is_logged_once_a_minute() {
        let t0 = Instant::now();
        let (f, log) = Failure::next(None, "e".into(), t0);
        assert!(log);
        let (f, log) = Failure::next(Some(&f), "e".into(), t0 + Duration::from_secs(1));
        assert!(!log);
        let (f, log) = Failure::next(Some(&f), "other".into(), t0 + Duration::from_secs(2));
        assert!(log, "a new error is logged at once");
        let (_, log) = Failure::next(Some(&f), "other".into(), t0 + LOG_EVERY * 2);
        assert!(log);
    }
}
