//! The NFLOG reader: packets the firewall's log rules send (new connections it drops, or in
//! `observe` would drop) become underlay flow entries. The kernel limits the rate of logged
//! packets; the flow log bounds what waits to be shipped; a datagram that does not parse is
//! counted and skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_hostfw::nflog;
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_NETFILTER};

use crate::flowlog::FlowLog;

/// What the reader saw, for metrics.
#[derive(Debug, Default)]
pub struct Counts {
    /// Logged new connections, by `(inbound, observed)`: index `inbound as usize * 2 + observed`.
    pub logged: [AtomicU64; 4],
    /// Messages that did not parse.
    pub malformed: AtomicU64,
    /// Datagrams lost because the socket's buffer overflowed.
    pub overruns: AtomicU64,
}

impl Counts {
    /// `(direction, verdict, count)` of logged connections.
    pub fn logged(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        [(true, false), (true, true), (false, false), (false, true)]
            .into_iter()
            .map(|(inbound, observed)| {
                (
                    if inbound { "inbound" } else { "outbound" },
                    if observed { "would_deny" } else { "deny" },
                    self.logged[usize::from(inbound) * 2 + usize::from(observed)]
                        .load(Ordering::Relaxed),
                )
            })
    }
}

/// Binds to `group` and ships what it reads to `flows` until the daemon ends. A group that
/// cannot be bound is logged and leaves the firewall working, only unlogged.
pub fn spawn(group: u16, flows: Arc<Mutex<FlowLog>>) -> Arc<Counts> {
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        if let Err(e) = read(group, &flows, &c).await {
            tracing::error!(group, error = %e, "cannot read the firewall's NFLOG group: underlay flows are not logged");
        }
    });
    counts
}

async fn read(group: u16, flows: &Mutex<FlowLog>, counts: &Counts) -> std::io::Result<()> {
    let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
    socket.socket_mut().bind_auto()?;
    socket.socket_ref().set_rx_buf_sz(1 << 20)?;
    for m in nflog::bind(group) {
        socket.send(&m).await?;
    }
    loop {
        let datagram = match socket.recv_from_full().await {
            Ok((d, _)) => d,
            Err(e) if e.raw_os_error() == Some(105) => {
                // ENOBUFS: the kernel dropped what did not fit; go on.
                counts.overruns.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) => return Err(e),
        };
        let (events, bad) = nflog::parse(&datagram);
        counts.malformed.fetch_add(bad as u64, Ordering::Relaxed);
        if events.is_empty() {
            continue;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut log = flows.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            counts.logged[usize::from(e.inbound) * 2 + usize::from(e.observed)]
                .fetch_add(1, Ordering::Relaxed);
            log.underlay(now_ms, &e);
        }
    }
}
