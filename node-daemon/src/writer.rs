//! Writing the core's output: datagrams to the UDP socket, each run to one peer as one GSO send,
//! and packets to the TUN device, coalesced by tun-rs's GRO. Whoever runs the core writes its
//! output after each batch: the loop with `--threads 1`, each worker its own shard's with more
//! (`workers.rs`). One writer per shard keeps every flow's packets in the order the core made
//! them (a multi-queue TUN would reorder a flow, and TCP takes reordering for loss).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::faults::{Faults, Op};

/// Most bytes of one GSO send (a UDP datagram's payload is at most 65,507 bytes).
pub(crate) const GSO_BYTES: usize = 65_000;

/// Datagrams to one destination, all of one size but the last, which may be shorter: one GSO
/// send. Each datagram is written here once, as the core hands it over, and sent from here.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) to: SocketAddr,
    pub(crate) size: usize,
    pub(crate) count: usize,
    /// A shorter datagram ended it.
    closed: bool,
    pub(crate) buf: Vec<u8>,
}

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

/// Room each TUN packet's buffer keeps: tun-rs's GRO coalesces a flow's packets into the buffer
/// of the first one, and only if that buffer can take the whole coalesced segment (64 KiB and
/// two virtio-net headers) without growing. With less room it writes every packet on its own:
/// one system call, one sk_buff and one pass through the kernel's TCP stack per packet, and one
/// ACK for every two (measured: every TUN write 1,430 bytes, before this room was kept).
pub(crate) const TUN_ROOM: usize = 65_535 + 2 * crate::output::VNET;

/// Packets a batch holds for the TUN device before they are written: a bound on the memory the
/// buffers of [`TUN_ROOM`] take (virtual mostly: a buffer's pages are touched only as far as
/// packets fill it).
pub(crate) const TUN_BATCH: usize = 128;

/// One batch of output, in the order the core made it. Its buffers are reused from batch to
/// batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    runs: Vec<Run>,
    runs_len: usize,
    tun: Vec<Vec<u8>>,
    tun_len: usize,
    /// Writes that failed, with their errors, up to [`FAILURES_KEPT`]; past it, counted only,
    /// by operation.
    failed: Vec<(Op, io::Error)>,
    failed_past: Vec<(Op, u64)>,
}

/// Most failures a batch keeps the errors of; past it they are counted only.
const FAILURES_KEPT: usize = 4;

impl Batch {
    /// Adds a datagram for `to`: at the end of the last run if it fits there, else as a new run.
    pub(crate) fn datagram(&mut self, to: SocketAddr, d: &[u8], max_segments: usize) {
        if let Some(r) = self.runs[..self.runs_len].last_mut()
            && r.takes(to, d, max_segments)
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

    /// Adds a packet for the TUN device, after `headroom` zero bytes (the virtio-net header).
    /// Says whether the batch now holds [`TUN_BATCH`] packets: time to write them.
    pub(crate) fn packet(&mut self, headroom: usize, p: &[u8]) -> bool {
        if self.tun_len == self.tun.len() {
            self.tun.push(Vec::with_capacity(TUN_ROOM));
        }
        let b = &mut self.tun[self.tun_len];
        b.clear();
        b.resize(headroom, 0);
        b.extend_from_slice(p);
        self.tun_len += 1;
        self.tun_len >= TUN_BATCH
    }

    /// The packets for the TUN device, to be written.
    pub(crate) fn packets(&mut self) -> &mut [Vec<u8>] {
        &mut self.tun[..self.tun_len]
    }

    /// Forgets the packets for the TUN device: they are written.
    pub(crate) fn packets_written(&mut self) {
        self.tun_len = 0;
    }

    /// The runs of datagrams.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> &[Run] {
        &self.runs[..self.runs_len]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs_len == 0 && self.tun_len == 0
    }

    /// Notes a failed write.
    pub(crate) fn fail(&mut self, op: Op, e: io::Error) {
        if self.failed.len() < FAILURES_KEPT {
            self.failed.push((op, e));
        } else if let Some(c) = self.failed_past.iter_mut().find(|(o, _)| *o == op) {
            c.1 += 1;
        } else {
            self.failed_past.push((op, 1));
        }
    }

    /// Empties it for reuse, and counts its failures in `faults`.
    pub(crate) fn recycle(&mut self, faults: &mut Faults) {
        let now = Instant::now();
        for (op, e) in self.failed.drain(..) {
            faults.record(op, &e, now);
        }
        for (op, n) in self.failed_past.drain(..) {
            faults.count_quietly(op, n);
        }
        self.runs_len = 0;
        self.tun_len = 0;
    }
}

/// Writes batches to the wire.
pub(crate) trait Write: Send + 'static {
    /// Writes every run and packet of `batch`, noting failures in it.
    fn write(&mut self, batch: &mut Batch) {
        self.write_runs(batch);
        self.write_packets(batch);
    }
    /// Writes the runs of datagrams of `batch`, noting failures in it.
    fn write_runs(&mut self, batch: &mut Batch);
    /// Writes the packets for the TUN device of `batch`, noting failures in it. The caller
    /// forgets them after ([`Batch::packets_written`]).
    fn write_packets(&mut self, batch: &mut Batch);
    /// Most datagrams one send may carry now.
    fn max_segments(&self) -> usize;
}

/// The real wire: the UDP socket and the TUN device.
pub(crate) struct Wire {
    pub(crate) udp: crate::udp::Sender,
    pub(crate) tun: Arc<tun_rs::AsyncDevice>,
    pub(crate) gro: tun_rs::GROTable,
}

impl Write for Wire {
    fn write_runs(&mut self, b: &mut Batch) {
        for i in 0..b.runs_len {
            let r = &b.runs[i];
            let segment_size = (r.count > 1).then_some(r.size);
            if let Err(e) = self.udp.send(r.to, &r.buf, segment_size) {
                b.fail(Op::UdpSend, e);
            }
        }
    }

    fn write_packets(&mut self, b: &mut Batch) {
        if !b.packets().is_empty() {
            // The device's own (blocking-free) write: a TUN write never waits for room.
            let dev: &tun_rs::DeviceImpl = &self.tun;
            if let Err(e) = dev.send_multiple(&mut self.gro, b.packets(), crate::output::VNET) {
                b.fail(Op::TunWrite, e);
            }
        }
    }

    fn max_segments(&self) -> usize {
        self.udp.max_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], 51820))
    }

    /// Datagrams go into GSO runs as they come: one run per destination and size, a shorter
    /// datagram ends its run, and a run holds at most what one send may carry.
    #[test]
    fn datagrams_are_written_once_into_the_runs_they_go_out_in() {
        let mut b = Batch::default();
        let (a, c) = (SocketAddr::from(([10, 0, 0, 1], 1)), to());
        for _ in 0..4 {
            b.datagram(a, &[1; 100], 3);
        }
        b.datagram(a, &[2; 40], 3);
        b.datagram(a, &[3; 40], 3);
        b.datagram(c, &[4; 100], 3);
        b.datagram(a, &[5; 100], 3);
        b.datagram(a, &[6; 120], 3);
        let runs = |b: &Batch| -> Vec<(u16, usize, usize)> {
            b.runs()
                .iter()
                .map(|r| (r.to.port(), r.size, r.count))
                .collect()
        };
        assert_eq!(
            runs(&b),
            [
                (1, 100, 3),
                (1, 100, 2),
                (1, 40, 1),
                (51820, 100, 1),
                (1, 100, 1),
                (1, 120, 1)
            ]
        );
        assert_eq!(
            b.runs()[1].buf.len(),
            140,
            "the short datagram ends its run"
        );
        assert_eq!(&b.runs()[1].buf[100..], &[2; 40]);
        // 65,000 bytes at most in one send.
        b.recycle(&mut Faults::default());
        for _ in 0..60 {
            b.datagram(a, &[7; 1400], 64);
        }
        assert_eq!(runs(&b), [(1, 1400, 46), (1, 1400, 14)]);
    }
}
