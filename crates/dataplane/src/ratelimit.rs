//! Handshakes per source address, as kernel WireGuard limits them
//! (`drivers/net/wireguard/ratelimiter.c`): a token bucket per source IP, 20 a second with a
//! burst of 5, in a bounded table that forgets a source idle for a second.
//!
//! The node consults it only under load, when the global limiter has already demanded a
//! cookie (mac2) and the source has proved it receives at its address: a spoofed source could
//! otherwise spend a real peer's tokens. Under load, a source that gets its cookie can then
//! cost the node at most 20 handshakes a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshakes a second one source may make under load.
pub(crate) const PER_SECOND: u32 = 20;
/// How many it may make at once.
pub(crate) const BURST: u32 = 5;
/// Most sources remembered; a new source beyond them is refused until some are forgotten.
pub(crate) const SOURCES: usize = 8192;
const TOKEN: Duration = Duration::from_nanos(1_000_000_000 / PER_SECOND as u64);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// When it was last used.
    last: Instant,
    /// What it holds, in time: a token is [`TOKEN`] of it; it fills with time, up to the burst.
    tokens: Duration,
}

/// The token buckets of every recent source.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    buckets: HashMap<IpAddr, Bucket, ahash::RandomState>,
}

impl Sources {
    /// Takes a token from `source`'s bucket at `now`, if it has one.
    pub(crate) fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let full = TOKEN * BURST;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= SOURCES {
            return false;
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            last: now,
            tokens: full,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.last)).min(full);
        b.last = now;
        if b.tokens >= TOKEN {
            b.tokens -= TOKEN;
            true
        } else {
            false
        }
    }

    /// Forgets sources idle for a second or more (their buckets are full again).
    pub(crate) fn forget_idle(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(1));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut s = Sources::default();
        let t0 = Instant::now();
        let burst = (0..100).filter(|_| s.allow(ip(1), t0)).count();
        assert_eq!(burst, BURST as usize);
        // Over ten seconds of trying 1,000 times a second: 20 a second.
        let allowed = (1..=10_000)
            .filter(|ms| s.allow(ip(1), t0 + Duration::from_millis(*ms)))
            .count();
        assert_eq!(allowed, 10 * PER_SECOND as usize);
        assert!(s.allow(ip(2), t0), "another source has its own bucket");
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_sources() {
        let mut s = Sources::default();
        let t0 = Instant::now();
        for n in 0..SOURCES as u32 {
            assert!(s.allow(ip(n), t0));
        }
        assert!(!s.allow(ip(SOURCES as u32), t0), "full: a new source waits");
        assert!(s.allow(ip(0), t0), "a known source still has tokens");
        s.forget_idle(t0 + Duration::from_secs(1));
        assert_eq!(s.len(), 0);
        assert!(s.allow(ip(SOURCES as u32), t0 + Duration::from_secs(1)));
    }
}
