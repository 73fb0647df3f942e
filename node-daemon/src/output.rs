//! The core's output for one batch of input, written out after it (`writer.rs`): datagrams to
//! the UDP socket (runs to one peer as one GSO send), packets to the TUN device (coalesced by
//! GRO); events go to the flow log and the debug log at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_dataplane::{Event, Sink};

use crate::faults::Faults;
use crate::flowlog::FlowLog;
use crate::writer::{Batch, Write, Writer, WriterGone};

/// Output of the core for one batch, written out after it: reading a batch and then writing a
/// batch measured faster than writing each packet as it comes. Buffers are reused from batch to
/// batch, so the packet path does not allocate once warm. The [`Writer`] writes each batch, in
/// the loop or in a thread of its own.
pub(crate) struct Out {
    batch: Batch,
    writer: Writer,
    /// Most datagrams one send may carry, as the socket said after the last batch written.
    max_segments: Arc<AtomicUsize>,
    /// Flow starts and denials, until the link ships them.
    pub(crate) flows: Arc<Mutex<FlowLog>>,
}

/// The virtio-net header every TUN read and write carries with offloads on.
pub(crate) const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;

impl Out {
    /// Output written by `w`, in a writer thread if `threaded`.
    pub(crate) fn new(flows: Arc<Mutex<FlowLog>>, w: impl Write, threaded: bool) -> Out {
        let max_segments = Arc::new(AtomicUsize::new(1));
        Out {
            batch: Batch::default(),
            writer: Writer::new(w, threaded, max_segments.clone()),
            max_segments,
            flows,
        }
    }

    /// Writes the batch out, or hands it to the writer thread. What the socket or the device
    /// refuses is dropped and counted in `faults`.
    pub(crate) fn flush(&mut self, faults: &mut Faults) -> Result<(), WriterGone> {
        self.writer.flush(&mut self.batch, faults)
    }

    /// Writes the batch out and waits until everything the core output so far is written: what
    /// comes after was decided under whatever the core enforces from now on.
    pub(crate) fn barrier(&mut self, faults: &mut Faults) -> Result<(), WriterGone> {
        self.writer.barrier(&mut self.batch, faults)
    }
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        let max = self.max_segments.load(Ordering::Relaxed);
        self.batch.datagram(to, d, max);
    }

    fn to_tun(&mut self, p: &[u8]) {
        self.batch.packet(VNET, p);
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
