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
            self.batch.packets_written();
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

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::faults::{Faults, Op};
    use crate::writer::{Batch, TUN_BATCH, TUN_ROOM};

    type Kept = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A wire that keeps every TUN packet written (without its virtio-net header), and fails
    /// each one if told to.
    struct Keep(Kept, bool);

    impl Write for Keep {
        fn write_runs(&mut self, _: &mut Batch) {}
        fn write_packets(&mut self, b: &mut Batch) {
            let mut kept = self.0.lock().expect("lock");
            for p in b.packets() {
                assert!(p.capacity() >= TUN_ROOM, "room for GRO: {}", p.capacity());
                kept.push(p[VNET..].to_vec());
            }
            if self.1 {
                for _ in 0..b.packets().len() {
                    b.fail(Op::TunWrite, io::Error::other("refused"));
                }
            }
        }
        fn max_segments(&self) -> usize {
            64
        }
    }

    fn packets(n: u32) -> Vec<Vec<u8>> {
        (0..n).map(|i| i.to_be_bytes().to_vec()).collect()
    }

    /// Packets for the TUN device are written every [`TUN_BATCH`] as they come, the rest at the
    /// flush: each once, in order, and from buffers that keep their room for GRO when reused.
    #[test]
    fn tun_packets_are_written_in_batches_in_order_and_once() {
        let kept = Kept::default();
        let mut out = Out::new(Arc::default(), Keep(kept.clone(), false));
        let mut faults = Faults::default();
        for (i, p) in packets(300).iter().enumerate() {
            out.to_tun(p);
            let written = kept.lock().expect("lock").len();
            assert_eq!(written, (i + 1) / TUN_BATCH * TUN_BATCH, "after packet {i}");
        }
        out.flush(&mut faults);
        assert_eq!(*kept.lock().expect("lock"), packets(300));
        for p in &packets(10) {
            out.to_tun(p);
        }
        out.flush(&mut faults);
        let kept = kept.lock().expect("lock");
        assert_eq!(kept.len(), 310);
        assert_eq!(kept[300..], packets(10)[..]);
    }

    /// Every failed write is counted, not just the few whose errors a batch keeps.
    #[test]
    fn every_failed_tun_write_is_counted() {
        let mut out = Out::new(Arc::default(), Keep(Kept::default(), true));
        for p in &packets(300) {
            out.to_tun(p);
        }
        let mut faults = Faults::default();
        out.flush(&mut faults);
        let tun = faults.totals().find(|(op, _)| *op == Op::TunWrite);
        assert_eq!(tun, Some((Op::TunWrite, 300)));
    }
}
