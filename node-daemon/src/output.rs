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
    net: Vec<(SocketAddr, Vec<u8>)>,
    net_len: usize,
    tun: Vec<Vec<u8>>,
    tun_len: usize,
    gro: tun_rs::GROTable,
    gso: Vec<u8>,
    /// Flow starts and denials, until the link ships them.
    pub(crate) flows: Arc<Mutex<FlowLog>>,
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
            net: Vec::new(),
            net_len: 0,
            tun: Vec::new(),
            tun_len: 0,
            gro: tun_rs::GROTable::default(),
            gso: Vec::new(),
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
        // Runs of datagrams to one destination, all of one size but the last, go out as one
        // GSO send: one system call for up to `max_segments` datagrams.
        let mut i = 0;
        while i < self.net_len {
            let (to, size) = (self.net[i].0, self.net[i].1.len());
            let mut j = i + 1;
            while j < self.net_len
                && j - i < udp.max_segments()
                && self.net[j].0 == to
                && self.net[j - 1].1.len() == size
                && self.net[j].1.len() <= size
                && (j - i + 1) * size <= 65000
            {
                j += 1;
            }
            self.gso.clear();
            for (_, d) in &self.net[i..j] {
                self.gso.extend_from_slice(d);
            }
            let segment_size = (j - i > 1).then_some(size);
            if let Err(e) = udp.send(to, &self.gso, segment_size).await {
                faults.record(Op::UdpSend, &e, Instant::now());
            }
            i = j;
        }
        if self.tun_len > 0
            && let Err(e) = tun
                .send_multiple(&mut self.gro, &mut self.tun[..self.tun_len], VNET)
                .await
        {
            faults.record(Op::TunWrite, &e, Instant::now());
        }
        self.net_len = 0;
        self.tun_len = 0;
    }
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        if self.net_len == self.net.len() {
            self.net.push((to, Vec::with_capacity(2048)));
        }
        let slot = &mut self.net[self.net_len];
        slot.0 = to;
        slot.1.clear();
        slot.1.extend_from_slice(d);
        self.net_len += 1;
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
