//! The core's output for one batch of input, written out after it: datagrams to the UDP socket
//! (runs to one peer as one GSO send), packets to the TUN device (coalesced by GRO), events to
//! the flow log and the debug log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bulkhead_dataplane::{Event, Sink};

use crate::faults::{Faults, Op};
use crate::flowlog::FlowLog;
use crate::udp::Udp;

/// Output of the core for one batch, written out after it: reading a batch and then writing a
/// batch measured faster than writing each packet as it comes. Buffers are reused from batch to
/// batch, so the packet path does not allocate once warm.
pub(crate) struct Out {
    /// Datagrams, in runs that each go out as one send: reused from batch to batch.
    runs: Vec<Run>,
    runs_len: usize,
    /// Most datagrams one send may carry, as the socket said at the last flush.
    max_segments: usize,
    tun: Vec<Vec<u8>>,
    tun_len: usize,
    gro: tun_rs::GROTable,
    /// Flow starts and denials, until the link ships them.
    pub(crate) flows: Arc<Mutex<FlowLog>>,
}

/// Datagrams to one destination, all of one size but the last, which may be shorter: one GSO
/// send. Each datagram is written here once, as the core hands it over, and sent from here.
struct Run {
    to: SocketAddr,
    size: usize,
    count: usize,
    /// A shorter datagram ended it.
    closed: bool,
    buf: Vec<u8>,
}

/// Most bytes of one GSO send (a UDP datagram's payload is at most 65,507 bytes).
const GSO_BYTES: usize = 65_000;

impl Run {
    /// Whether `d` to `to` can go at the end of this run.
    fn takes(&self, to: SocketAddr, d: &[u8], max_segments: usize) -> bool {
        self.to == to
            && !self.closed
            && d.len() <= self.size
            && self.count < max_segments
            && self.buf.len() + d.len() <= GSO_BYTES
    }
}

/// The virtio-net header every TUN read and write carries with offloads on.
pub(crate) const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Copies `data` into the next reusable buffer of `pool`, after `headroom` zero bytes (room for
/// the TUN device's virtio-net header).
fn stash(pool: &mut Vec<Vec<u8>>, len: &mut usize, headroom: usize, data: &[u8]) {
    if *len == pool.len() {
        pool.push(Vec::with_capacity(2048));
    }
    let b = &mut pool[*len];
    b.clear();
    b.resize(headroom, 0);
    b.extend_from_slice(data);
    *len += 1;
}

impl Out {
    pub(crate) fn new(flows: Arc<Mutex<FlowLog>>) -> Out {
        Out {
            runs: Vec::new(),
            runs_len: 0,
            max_segments: 1,
            tun: Vec::new(),
            tun_len: 0,
            gro: tun_rs::GROTable::default(),
            flows,
        }
    }

    /// Writes the batch out: datagrams to the UDP socket, packets to the TUN device. What the
    /// socket or the device refuses is dropped and counted in `faults`.
    pub(crate) async fn flush(
        &mut self,
        udp: &Udp,
        tun: &tun_rs::AsyncDevice,
        faults: &mut Faults,
    ) {
        // Each run of datagrams to one destination goes out as one GSO send: one system call
        // for up to `max_segments` datagrams.
        for r in &self.runs[..self.runs_len] {
            let segment_size = (r.count > 1).then_some(r.size);
            if let Err(e) = udp.send(r.to, &r.buf, segment_size).await {
                faults.record(Op::UdpSend, &e, Instant::now());
            }
        }
        if self.tun_len > 0
            && let Err(e) = tun
                .send_multiple(&mut self.gro, &mut self.tun[..self.tun_len], VNET)
                .await
        {
            faults.record(Op::TunWrite, &e, Instant::now());
        }
        self.runs_len = 0;
        self.tun_len = 0;
        self.max_segments = udp.max_segments();
    }
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        if let Some(r) = self.runs[..self.runs_len].last_mut()
            && r.takes(to, d, self.max_segments)
        {
            r.closed = d.len() < r.size;
            r.count += 1;
            r.buf.extend_from_slice(d);
            return;
        }
        if self.runs_len == self.runs.len() {
            self.runs.push(Run {
                to,
                size: 0,
                count: 0,
                closed: false,
                buf: Vec::with_capacity(GSO_BYTES),
            });
        }
        let r = &mut self.runs[self.runs_len];
        (r.to, r.size, r.count, r.closed) = (to, d.len(), 1, false);
        r.buf.clear();
        r.buf.extend_from_slice(d);
        self.runs_len += 1;
    }

    fn to_tun(&mut self, p: &[u8]) {
        stash(&mut self.tun, &mut self.tun_len, VNET, p);
    }

    fn event(&mut self, e: Event<'_>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut log = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        match &e {
            Event::FlowStarted {
                initiator,
                key,
                peer,
                rule,
            } => log.started(now_ms, *initiator, *key, peer, rule),
            Event::Dropped {
                egress,
                reason,
                key,
                peer,
                rule,
            } => log.dropped(now_ms, *egress, reason, *rule, *key, *peer),
        }
        drop(log);
        match e {
            Event::FlowStarted {
                initiator,
                key,
                peer,
                rule,
            } => tracing::debug!(
                ?initiator,
                peer,
                rule,
                proto = key.proto,
                local_port = key.local_port,
                peer_port = key.peer_port,
                "flow"
            ),
            Event::Dropped {
                egress,
                reason,
                key,
                peer,
                ..
            } => tracing::debug!(egress, reason = reason.reason(), ?key, peer, "drop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(out: &Out) -> Vec<(u16, usize, usize)> {
        out.runs[..out.runs_len]
            .iter()
            .map(|r| (r.to.port(), r.size, r.count))
            .collect()
    }

    /// Datagrams go into GSO runs as they come: one run per destination and size, a shorter
    /// datagram ends its run, and a run holds at most what one send may carry.
    #[test]
    fn datagrams_are_written_once_into_the_runs_they_go_out_in() {
        let mut out = Out::new(Arc::default());
        out.max_segments = 3;
        let a = SocketAddr::from(([10, 0, 0, 1], 1));
        let b = SocketAddr::from(([10, 0, 0, 2], 2));
        for _ in 0..4 {
            out.to_network(a, &[1; 100]);
        }
        out.to_network(a, &[2; 40]);
        out.to_network(a, &[3; 40]);
        out.to_network(b, &[4; 100]);
        out.to_network(a, &[5; 100]);
        out.to_network(a, &[6; 120]);
        assert_eq!(
            runs(&out),
            [
                (1, 100, 3),
                (1, 100, 2),
                (1, 40, 1),
                (2, 100, 1),
                (1, 100, 1),
                (1, 120, 1)
            ]
        );
        assert_eq!(
            out.runs[1].buf.len(),
            140,
            "the short datagram ends its run"
        );
        assert_eq!(&out.runs[1].buf[100..], &[2; 40]);
        // 65,000 bytes at most in one send.
        out.runs_len = 0;
        out.max_segments = 64;
        for _ in 0..60 {
            out.to_network(a, &[7; 1400]);
        }
        assert_eq!(runs(&out), [(1, 1400, 46), (1, 1400, 14)]);
    }
}
