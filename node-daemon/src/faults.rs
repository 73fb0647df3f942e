//! I/O errors on the packet path that concern one packet or one batch: a TUN read the device
//! could not split, a datagram the socket refused. None of them may end the daemon (a peer can
//! provoke some of them at will): each is counted by operation for the metrics, and logged at
//! most once per [`LOG_EVERY`] per operation, with how many were not logged. No I/O.

use std::time::{Duration, Instant};

/// Least time between two log lines about one operation.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// An I/O operation of the packet path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading a batch from the TUN device.
    TunRead,
    /// Writing a batch to the TUN device.
    TunWrite,
    /// Receiving from the UDP socket.
    UdpRecv,
    /// Sending on the UDP socket.
    UdpSend,
}

impl Op {
    const ALL: [Op; 4] = [Op::TunRead, Op::TunWrite, Op::UdpRecv, Op::UdpSend];

    /// `tun_read`, `tun_write`, `udp_recv`, `udp_send`: for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::TunRead => "tun_read",
            Op::TunWrite => "tun_write",
            Op::UdpRecv => "udp_recv",
            Op::UdpSend => "udp_send",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Count {
    total: u64,
    /// Errors since the last log line that were not logged.
    quiet: u64,
    logged: Option<Instant>,
}

/// Errors counted by operation, with the bounded log.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    counts: [Count; 4],
}

impl Faults {
    /// Counts `n` more errors of `op` without logging them: those past what a batch keeps.
    pub fn count_quietly(&mut self, op: Op, n: u64) {
        let c = &mut self.counts[op as usize];
        c.total += n;
        c.quiet += n;
    }

    /// Counts an error of `op` at `now`, and logs it unless one was logged less than
    /// [`LOG_EVERY`] ago. Returns whether it was logged.
    pub fn record(&mut self, op: Op, error: &dyn std::fmt::Display, now: Instant) -> bool {
        let c = &mut self.counts[op as usize];
        c.total += 1;
        if c.logged
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            c.quiet += 1;
            return false;
        }
        tracing::warn!(
            op = op.as_str(),
            error = %error,
            unlogged_since_last = c.quiet,
            total = c.total,
            "I/O error on the packet path: dropped, going on"
        );
        c.quiet = 0;
        c.logged = Some(now);
        true
    }

    /// Errors so far, by operation.
    pub fn totals(&self) -> impl Iterator<Item = (Op, u64)> + '_ {
        Op::ALL
            .into_iter()
            .map(|op| (op, self.counts[op as usize].total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_counted_but_few_are_logged() {
        let mut f = Faults::default();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|i| f.record(Op::TunRead, &"x", t0 + Duration::from_millis(*i)))
            .count();
        assert_eq!(logged, 1);
        assert!(
            f.record(Op::UdpSend, &"x", t0),
            "each operation has its own budget"
        );
        assert!(f.record(Op::TunRead, &"x", t0 + LOG_EVERY));
        let totals: Vec<_> = f.totals().collect();
        assert_eq!(
            totals,
            [
                (Op::TunRead, 1001),
                (Op::TunWrite, 0),
                (Op::UdpRecv, 0),
                (Op::UdpSend, 1)
            ]
        );
    }
}
