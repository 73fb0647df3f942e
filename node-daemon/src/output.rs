//! The core's output for one batch of input, written out after it (`writer.rs`): datagrams to
//! the UDP socket (runs to one peer as one GSO send), packets to the TUN device (coalesced by
//! GRO); events go to the flow log and the debug log at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_dataplane::{Event, Sink};

use crate::faults::Faults;
use crate::flowlog::FlowLog;
use crate::writer::{Batch, Write};

/// Output of the core for one batch, written out after it: reading a batch and then writing a
/// batch measured faster than writing each packet as it comes. Buffers are reused from batch to
/// batch, so the packet path does not allocate once warm.
pub(crate) struct Out {
    batch: Batch,
    w: Box<dyn Write>,
    /// Most datagrams one send may carry, as the socket said after the last batch written.
    max_segments: usize,
    /// Flow starts and denials, until the link ships them.
    pub(crate) flows: Arc<Mutex<FlowLog>>,
}

/// The virtio-net header every TUN read and write carries with offloads on.
pub(crate) const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;

impl Out {
    /// Output written by `w`.
    pub(crate) fn new(flows: Arc<Mutex<FlowLog>>, w: impl Write) -> Out {
        Out {
            batch: Batch::default(),
            max_segments: w.max_segments(),
            w: Box::new(w),
            flows,
        }
    }

    /// Writes the batch out. What the socket or the device refuses is dropped and counted in
    /// `faults`. Once it returns, everything the core output so far is written.
    pub(crate) fn flush(&mut self, faults: &mut Faults) {
        if !self.batch.is_empty() {
            self.w.write(&mut self.batch);
            self.max_segments = self.w.max_segments();
        }
        self.batch.recycle(faults);
    }
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        self.batch.datagram(to, d, self.max_segments);
    }

    fn to_tun(&mut self, p: &[u8]) {
        if self.batch.packet(VNET, p) {
            self.w.write_packets(&mut self.batch);
        }
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
