//! Writing the core's output: datagrams to the UDP socket, packets to the TUN device. With
//! `--threads 1` the loop writes each batch itself, at once; with more, a writer thread does,
//! while the loop reads and runs the core on the next batch.
//!
//! **Why a writer thread.** Writing is the larger half of the daemon's system time: a GSO send
//! runs the kernel's whole UDP and IP output path in the caller's time, and a TUN write runs the
//! receive path of the packets it carries, after tun-rs's GRO has coalesced them. Done by a
//! second thread, that overlaps with the loop's reads, decryption, filtering and encryption.
//! Batches go over a channel, in order, and come back empty to be filled again, so the packet
//! path allocates nothing once warm and the writer can never be more than [`DEPTH`] batches
//! behind: when it is, the loop waits (backpressure, as a full socket buffer gives).
//!
//! **What cannot change.** One writer, so packets go out in the order the core made them, and
//! never split between queues (a multi-queue TUN reorders a flow's packets, and TCP takes
//! reordering for loss). And a packet the core let through under an allowlist must not reach
//! the wire after a new allowlist has been applied: [`Writer::barrier`] waits until every batch
//! handed over has been written, and the loop calls it before it applies an allowlist or clears
//! it. After `apply` returns, everything written was decided under the new allowlist.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::Instant;

use crate::faults::{Faults, Op};

/// Batches in the pipeline: the one the loop fills, and up to this many less one handed to the
/// writer.
pub(crate) const DEPTH: usize = 4;

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

/// One batch of output, in the order the core made it. Its buffers are reused from batch to
/// batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    runs: Vec<Run>,
    runs_len: usize,
    tun: Vec<Vec<u8>>,
    tun_len: usize,
    /// Writes that failed: how many, and the last error, for [`Op::UdpSend`] and
    /// [`Op::TunWrite`].
    failed: Vec<(Op, io::Error)>,
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
    pub(crate) fn packet(&mut self, headroom: usize, p: &[u8]) {
        if self.tun_len == self.tun.len() {
            self.tun.push(Vec::with_capacity(2048));
        }
        let b = &mut self.tun[self.tun_len];
        b.clear();
        b.resize(headroom, 0);
        b.extend_from_slice(p);
        self.tun_len += 1;
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
        }
    }

    /// Empties it for reuse, and counts its failures in `faults`.
    fn recycle(&mut self, faults: &mut Faults) {
        let now = Instant::now();
        for (op, e) in self.failed.drain(..) {
            faults.record(op, &e, now);
        }
        self.runs_len = 0;
        self.tun_len = 0;
    }
}

/// Writes batches to the wire.
pub(crate) trait Write: Send + 'static {
    /// Writes every run and packet of `batch`, noting failures in it.
    fn write(&mut self, batch: &mut Batch);
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
    fn write(&mut self, b: &mut Batch) {
        for i in 0..b.runs_len {
            let r = &b.runs[i];
            let segment_size = (r.count > 1).then_some(r.size);
            if let Err(e) = self.udp.send(r.to, &r.buf, segment_size) {
                b.fail(Op::UdpSend, e);
            }
        }
        if b.tun_len > 0 {
            // The device's own (blocking-free) write: a TUN write never waits for room.
            let dev: &tun_rs::DeviceImpl = &self.tun;
            if let Err(e) =
                dev.send_multiple(&mut self.gro, &mut b.tun[..b.tun_len], crate::output::VNET)
            {
                b.fail(Op::TunWrite, e);
            }
        }
    }

    fn max_segments(&self) -> usize {
        self.udp.max_segments()
    }
}

/// Where the loop's batches go: written at once, or handed to the writer thread.
pub(crate) enum Writer {
    /// The loop writes each batch itself (`--threads 1`).
    Inline(Box<dyn Write>, Arc<AtomicUsize>),
    /// The writer thread writes them.
    Thread(Pipe),
}

/// The two ends of the writer thread's channels, and the batches the loop may fill.
pub(crate) struct Pipe {
    to: SyncSender<Batch>,
    back: Receiver<Batch>,
    /// Batches handed over and not back yet.
    in_flight: usize,
    /// Batches made so far (at most [`DEPTH`]).
    made: usize,
    spare: Vec<Batch>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::Inline(..) => f.write_str("Writer::Inline"),
            Writer::Thread(p) => write!(f, "Writer::Thread({} in flight)", p.in_flight),
        }
    }
}

/// The writer thread is gone (it never ends on its own): the daemon cannot pass traffic.
#[derive(Debug)]
pub(crate) struct WriterGone;

impl std::fmt::Display for WriterGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the writer thread ended")
    }
}

impl std::error::Error for WriterGone {}

impl Writer {
    /// Writes with `w`: in a thread of its own if `threaded`. `max_segments` is kept up to date
    /// with what `w` says after each batch.
    pub(crate) fn new(w: impl Write, threaded: bool, max_segments: Arc<AtomicUsize>) -> Writer {
        max_segments.store(w.max_segments(), Ordering::Relaxed);
        if !threaded {
            return Writer::Inline(Box::new(w), max_segments);
        }
        let (to, rx) = sync_channel::<Batch>(DEPTH);
        let (tx, back) = sync_channel::<Batch>(DEPTH);
        let spawned = std::thread::Builder::new()
            .name("bulkheadd-writer".into())
            .spawn(move || {
                let mut w = w;
                while let Ok(mut b) = rx.recv() {
                    w.write(&mut b);
                    max_segments.store(w.max_segments(), Ordering::Relaxed);
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread the channels are closed: the first flush says so and the
            // daemon stops, rather than pass nothing silently.
            tracing::error!(error = %e, "cannot start the writer thread");
        }
        Writer::Thread(Pipe {
            to,
            back,
            in_flight: 0,
            made: 1,
            spare: Vec::new(),
        })
    }

    /// Writes `batch`, or hands it to the writer thread and puts an empty one in its place.
    pub(crate) fn flush(
        &mut self,
        batch: &mut Batch,
        faults: &mut Faults,
    ) -> Result<(), WriterGone> {
        match self {
            Writer::Inline(w, max) => {
                if !batch.is_empty() {
                    w.write(batch);
                    max.store(w.max_segments(), Ordering::Relaxed);
                }
                batch.recycle(faults);
                Ok(())
            }
            Writer::Thread(p) => {
                p.collect(faults)?;
                if batch.is_empty() {
                    return Ok(());
                }
                let next = match p.spare.pop() {
                    Some(b) => b,
                    None if p.made < DEPTH => {
                        p.made += 1;
                        Batch::default()
                    }
                    None => p.wait_back(faults)?,
                };
                let full = std::mem::replace(batch, next);
                p.to.send(full).map_err(|_| WriterGone)?;
                p.in_flight += 1;
                Ok(())
            }
        }
    }

    /// Flushes `batch` and waits until everything handed over so far has been written.
    pub(crate) fn barrier(
        &mut self,
        batch: &mut Batch,
        faults: &mut Faults,
    ) -> Result<(), WriterGone> {
        self.flush(batch, faults)?;
        if let Writer::Thread(p) = self {
            while p.in_flight > 0 {
                let b = p.wait_back(faults)?;
                p.spare.push(b);
            }
        }
        Ok(())
    }
}

impl Pipe {
    /// Waits for the writer to give back the next batch it has written, emptied.
    fn wait_back(&mut self, faults: &mut Faults) -> Result<Batch, WriterGone> {
        let b = self.back.recv().map_err(|_| WriterGone)?;
        Ok(self.returned(b, faults))
    }

    fn returned(&mut self, mut b: Batch, faults: &mut Faults) -> Batch {
        self.in_flight -= 1;
        b.recycle(faults);
        b
    }

    /// Takes back the batches the writer has written, without waiting.
    fn collect(&mut self, faults: &mut Faults) -> Result<(), WriterGone> {
        loop {
            match self.back.try_recv() {
                Ok(b) => {
                    let b = self.returned(b, faults);
                    self.spare.push(b);
                }
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(WriterGone),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Records the first byte of every datagram, slowly.
    struct Slow(Arc<Mutex<Vec<u8>>>);

    impl Write for Slow {
        fn write(&mut self, b: &mut Batch) {
            std::thread::sleep(Duration::from_millis(3));
            let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
            for r in b.runs() {
                seen.extend(r.buf.chunks(r.size).map(|d| d[0]));
            }
        }
        fn max_segments(&self) -> usize {
            1
        }
    }

    fn to() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], 51820))
    }

    /// Everything handed to the writer thread is written, in order, and after `barrier`
    /// returns nothing handed over before it is still waiting.
    #[test]
    fn the_barrier_returns_once_everything_handed_over_is_written() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut w = Writer::new(Slow(seen.clone()), true, Arc::default());
        let (mut batch, mut faults) = (Batch::default(), Faults::default());
        for i in 0..10u8 {
            batch.datagram(to(), &[i; 100], 1);
            w.flush(&mut batch, &mut faults).expect("writer");
        }
        let before = seen.lock().expect("lock").len();
        w.barrier(&mut batch, &mut faults).expect("writer");
        let after: Vec<u8> = seen.lock().expect("lock").clone();
        assert!(
            before < 10,
            "the writer is behind ({before}), as it should be here"
        );
        assert_eq!(after, (0..10).collect::<Vec<u8>>(), "all of it, in order");
        // And the batches are reused: no more than DEPTH were ever made.
        let Writer::Thread(p) = &w else {
            unreachable!()
        };
        assert!(p.made <= DEPTH);
        assert_eq!(p.in_flight, 0);
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

    /// A transfer through the threaded path, with the allowlist changed in the middle of it:
    /// once `apply` has returned, not one more datagram of the cut flow reaches the wire, even
    /// though the writer is behind (slow here on purpose) when the change comes. The daemon
    /// drains the writer before every apply (`Daemon::drain`), as this does.
    #[test]
    fn no_packet_of_a_cut_flow_is_written_after_apply_returns() {
        use std::collections::BTreeMap;
        use std::sync::atomic::AtomicBool;

        use bulkhead_dataplane::packet::build;
        use bulkhead_dataplane::{Config, Node, Now, PeerConfig};
        use bulkhead_proto::PrivateKey;

        const T0: i64 = 1_800_000_000;
        let open = "version: 1
network: { cidr: 10.9.0.0/24 }
identities:
  web: { labels: { app: web } }
  db: { labels: { app: db } }
segments:
  webs: { match: { app: web } }
  dbs: { match: { app: db } }
rules:
  - { name: web-db, from: [webs], to: [dbs], ports: [udp/5000] }
";
        let closed = open.replace("udp/5000", "udp/5001");
        let lists = |policy: &str| {
            let l = bulkhead_policy::load(policy, T0, &BTreeMap::new());
            let m = l.model.expect("a valid policy");
            bulkhead_policy::Compiled::new(&m, m.state(&bulkhead_policy::Conditions::at(T0)))
                .allowlists(&m, 1)
                .into_iter()
                .map(|a| (a.identity.clone(), a))
                .collect::<BTreeMap<_, _>>()
        };
        let keys = [PrivateKey::generate(), PrivateKey::generate()];
        let udp = [
            SocketAddr::from(([192, 0, 2, 1], 51820)),
            SocketAddr::from(([192, 0, 2, 2], 51820)),
        ];
        let config = |policy: &str, me: usize| {
            let other = 1 - me;
            let name = ["web", "db"];
            Config {
                allowlist: lists(policy).remove(name[me]).expect("an allowlist"),
                peers: BTreeMap::from([(
                    name[other].to_string(),
                    PeerConfig {
                        public_key: keys[other].public_key().0,
                        endpoint: Some(udp[other]),
                    },
                )]),
                keepalive: None,
            }
        };
        let now = Now {
            instant: Instant::now(),
            unix: T0,
        };
        let mut nodes = [0, 1].map(|i| {
            let mut n = Node::new(keys[i].to_bytes(), 1024);
            n.apply(config(open, i), now);
            n
        });
        let (web, db) = (
            nodes[0].allowlist().expect("applied").address,
            nodes[1].allowlist().expect("applied").address,
        );

        /// Collects what a node outputs, for the single-threaded handshake.
        #[derive(Default)]
        struct Collect(Vec<(SocketAddr, Vec<u8>)>, Vec<Vec<u8>>);
        impl bulkhead_dataplane::Sink for Collect {
            fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
                self.0.push((to, d.to_vec()));
            }
            fn to_tun(&mut self, p: &[u8]) {
                self.1.push(p.to_vec());
            }
        }
        // The handshake, shuttled by hand: web's first packet starts it.
        let mut out = Collect::default();
        nodes[0].handle_tun(&build::udp(web, db, 4000, 5000, b"hello"), now, &mut out);
        for _ in 0..4 {
            for (to, d) in std::mem::take(&mut out.0) {
                let (from, at) = if to == udp[1] {
                    (udp[0], 1)
                } else {
                    (udp[1], 0)
                };
                nodes[at].handle_udp(from, &d, now, &mut out);
            }
        }
        assert_eq!(
            out.1.len(),
            1,
            "the first packet arrived after the handshake"
        );

        // The transfer through the threaded path: what reaches the wire, and whether the new
        // allowlist was in force when it did.
        /// Each datagram written, and whether the new allowlist was in force then.
        type Seen = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;
        struct Record(Seen, Arc<AtomicBool>);
        impl Write for Record {
            fn write(&mut self, b: &mut Batch) {
                std::thread::sleep(Duration::from_millis(2));
                let applied = self.1.load(Ordering::SeqCst);
                let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
                for r in b.runs() {
                    seen.extend(r.buf.chunks(r.size).map(|d| (d.to_vec(), applied)));
                }
            }
            fn max_segments(&self) -> usize {
                64
            }
        }
        let (wire, applied) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let mut out =
            crate::output::Out::new(Arc::default(), Record(wire.clone(), applied.clone()), true);
        let mut faults = Faults::default();
        let web_node = &mut nodes[0];
        for i in 0..200u32 {
            if i == 100 {
                out.barrier(&mut faults).expect("writer");
                let r = web_node.apply(config(&closed, 0), now);
                assert!(r.flows_cut >= 1, "{r:?}");
                applied.store(true, Ordering::SeqCst);
            }
            let p = build::udp(web, db, 4000, 5000, &i.to_be_bytes());
            web_node.handle_tun(&p, now, &mut out);
            out.flush(&mut faults).expect("writer");
        }
        out.barrier(&mut faults).expect("writer");
        let wire = wire.lock().expect("lock").clone();
        let late = wire.iter().filter(|(_, after)| *after).count();
        assert_eq!(late, 0, "datagrams written after apply returned");
        // What was written before is the transfer up to the change, intact and in order.
        let mut got = Collect::default();
        for (d, _) in &wire {
            nodes[1].handle_udp(udp[0], d, now, &mut got);
        }
        let seqs: Vec<u32> = got
            .1
            .iter()
            .map(|p| u32::from_be_bytes(p[p.len() - 4..].try_into().expect("4 bytes")))
            .collect();
        assert_eq!(seqs, (0..100).collect::<Vec<u32>>());
    }
}
