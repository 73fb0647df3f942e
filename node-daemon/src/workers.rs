//! The packet path on one thread or on several (`--threads N`).
//!
//! With one, the loop reads a batch, runs it through the core and writes the output. With N ≥ 2
//! the node is split into N shards (`bulkhead_dataplane::shards`), each owned by a worker
//! thread with its own output, and the loop becomes the I/O front:
//!
//! ```text
//!  loop thread:  read TUN / UDP ─► Front (rate limiter, route) ─► inbox of shard k ──┐
//!  worker k:     ◄─────────────────────────────────────────────────────────────────────┘
//!                decrypt, filter, encrypt (shard k's peers) ─► GSO sends, TUN writes
//! ```
//!
//! A peer's tunnel and flows live in one shard, so every packet of a flow goes through one
//! worker, in the order it was read, and out through that worker's writes: no flow is split
//! across threads (a multi-queue TUN would reorder it). Packets are copied once into an inbox;
//! inboxes come back empty to be filled again, and at most [`INBOXES`] exist per worker, so the
//! loop waits when a worker is behind (backpressure) and the path does not allocate once warm.
//!
//! **Apply is a barrier.** [`Plane::apply`] hands what the loop has read to the workers, then
//! the configuration to every worker, and returns when each has applied it and written what
//! it decided before. A worker takes its jobs in order, so every packet read before `apply`
//! was decided under the old configuration and is written before `apply` returns; every
//! packet routed after it is decided under the new one. As with one thread: once `apply` has
//! returned, nothing the old allowlist let through reaches the wire.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, channel, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bulkhead_allowlist::Allowlist;
use bulkhead_dataplane::{
    ApplyReport, Config, Counters, Front, Node, Now, PeerStatus, Shard, Ticket,
};

use crate::faults::{Faults, Op};
use crate::output::Out;

/// Packets in one inbox at most.
const INBOX_PACKETS: usize = 128;

/// Bytes in one inbox, past which it is handed over (datagrams can be 64 KiB each), and the most
/// it keeps of its buffer when it comes back: a burst of large packets must not leave every
/// inbox of every worker holding megabytes.
const INBOX_BYTES: usize = 256 * 1024;

/// Inboxes per worker: the one the loop fills, and those handed over.
const INBOXES: usize = 4;

/// Packets an inbox may hold and still be run by the loop itself, when its worker has nothing
/// to do: a trickle (a ping, a request) then costs no thread hand-over, while a burst still goes
/// to the worker.
const INLINE_PACKETS: usize = 4;

/// The workers are gone (they never end on their own): the daemon cannot pass traffic.
#[derive(Debug)]
pub(crate) struct WorkersGone;

impl std::fmt::Display for WorkersGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a packet worker thread ended")
    }
}

impl std::error::Error for WorkersGone {}

/// The core, on the loop's thread or split across workers.
#[allow(clippy::large_enum_variant)] // one per daemon, never moved
pub(crate) enum Plane {
    /// `--threads 1`.
    One(Node),
    /// `--threads N`, N ≥ 2.
    Many(Workers),
}

impl Plane {
    /// Handles a packet read from the TUN device; with workers, hands it to its shard's.
    pub(crate) fn handle_tun(&mut self, p: &[u8], now: Now, out: &mut Out) {
        match self {
            Plane::One(n) => n.handle_tun(p, now, out),
            Plane::Many(w) => {
                let s = w.front.route_tun(p);
                w.push(s, p, None, now);
            }
        }
    }

    /// Handles a datagram read from the UDP socket; with workers, the front screens it (what it
    /// answers or drops goes to `out`) and hands it to its shard's.
    pub(crate) fn handle_udp(&mut self, from: SocketAddr, d: &[u8], now: Now, out: &mut Out) {
        match self {
            Plane::One(n) => n.handle_udp(from, d, now, out),
            Plane::Many(w) => {
                if let Some((s, t)) = w.front.route_udp(from, d, now, out) {
                    w.push(s, d, Some((from, t)), now);
                }
            }
        }
    }

    /// Hands the workers what the loop has read for them.
    pub(crate) fn dispatch(&mut self) -> Result<(), WorkersGone> {
        match self {
            Plane::One(_) => Ok(()),
            Plane::Many(w) => w.dispatch(),
        }
    }

    /// Applies a configuration: a barrier (module docs). `out` holds the loop's own output.
    pub(crate) fn apply(
        &mut self,
        config: Config,
        now: Now,
        out: &mut Out,
        faults: &mut Faults,
    ) -> Result<ApplyReport, WorkersGone> {
        out.flush(faults);
        match self {
            Plane::One(n) => Ok(n.apply(config, now)),
            Plane::Many(w) => w.apply(config, now),
        }
    }

    /// Forgets the configuration, in every shard, after what was decided before is written.
    pub(crate) fn clear(&mut self, out: &mut Out, faults: &mut Faults) -> Result<(), WorkersGone> {
        out.flush(faults);
        match self {
            Plane::One(n) => {
                n.clear();
                Ok(())
            }
            Plane::Many(w) => {
                w.front.clear();
                w.allowlist = None;
                w.ask(|p| {
                    p.node.clear();
                    p.flush();
                })
                .map(drop)
            }
        }
    }

    /// Runs the timers, of the core or of every shard (whose output the workers write).
    pub(crate) fn tick(&mut self, now: Now, out: &mut Out) -> Result<(), WorkersGone> {
        match self {
            Plane::One(n) => {
                n.tick(now, out);
                Ok(())
            }
            Plane::Many(w) => {
                w.front.tick(now);
                w.tell(move |p| {
                    p.node.tick(now, &mut p.out);
                    p.flush();
                })
            }
        }
    }

    /// The allowlist in force.
    pub(crate) fn allowlist(&self) -> Option<&Allowlist> {
        match self {
            Plane::One(n) => n.allowlist(),
            Plane::Many(w) => w.allowlist.as_ref(),
        }
    }

    /// The peers with a tunnel, in name order.
    pub(crate) fn peers(&mut self) -> Vec<PeerStatus> {
        match self {
            Plane::One(n) => n.peers(),
            Plane::Many(w) => PeerStatus::of_shards(w.ask(|p| p.node.peers()).unwrap_or_default()),
        }
    }

    /// Drop counters, summed over the front and the shards.
    pub(crate) fn counters(&mut self) -> Counters {
        match self {
            Plane::One(n) => n.counters(),
            Plane::Many(w) => {
                let shards = w.ask(|p| p.node.counters()).unwrap_or_default();
                w.front.with(shards)
            }
        }
    }

    /// Flows tracked, in every shard.
    pub(crate) fn flow_count(&mut self) -> usize {
        match self {
            Plane::One(n) => n.flow_count(),
            Plane::Many(w) => w
                .ask(|p| p.node.flow_count())
                .unwrap_or_default()
                .into_iter()
                .sum(),
        }
    }

    /// The workers' write errors, by operation (the loop counts its own).
    pub(crate) fn faults(&mut self) -> Vec<(Op, u64)> {
        match self {
            Plane::One(_) => Vec::new(),
            Plane::Many(w) => w
                .ask(|p| p.faults.totals().collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect(),
        }
    }
}

/// Packets for one worker, copied out of the loop's read buffers, all read at `now`.
#[derive(Default)]
struct Inbox {
    data: Vec<u8>,
    /// Each packet's end in `data`, and for a datagram its sender and the front's ticket.
    items: Vec<(usize, Option<(SocketAddr, Ticket)>)>,
    now: Option<Now>,
}

/// A shard of the node and its output: run by its worker, or by the loop when the worker has
/// nothing to do (`Workers::dispatch`).
pub(crate) struct Part {
    node: Node,
    out: Out,
    faults: Faults,
}

impl Part {
    fn flush(&mut self) {
        self.out.flush(&mut self.faults);
    }

    fn run(&mut self, mut inbox: Inbox) -> Inbox {
        if let Some(now) = inbox.now {
            let mut start = 0;
            for &(end, from) in &inbox.items {
                let p = &inbox.data[start..end];
                start = end;
                match from {
                    None => self.node.handle_tun(p, now, &mut self.out),
                    Some((from, t)) => self.node.handle_screened(from, p, t, now, &mut self.out),
                }
            }
        }
        self.flush();
        inbox.data.clear();
        inbox.data.shrink_to(INBOX_BYTES + 65_536);
        inbox.items.clear();
        inbox.now = None;
        inbox
    }
}

/// A shard's part, locked. A worker that panicked while holding it has ended, and the daemon
/// stops at the next hand-over; until then the part is used as it is.
fn lock(part: &Mutex<Part>) -> MutexGuard<'_, Part> {
    part.lock().unwrap_or_else(|p| p.into_inner())
}

type Task = Box<dyn FnOnce(&mut Part) + Send>;

enum Job {
    Packets(Inbox),
    Run(Task),
}

/// The loop's end of one worker.
struct Handle {
    to: SyncSender<Job>,
    back: Receiver<Inbox>,
    part: Arc<Mutex<Part>>,
    /// Inboxes handed to the worker that it has not yet run and written.
    in_flight: Arc<AtomicUsize>,
    filling: Inbox,
    spare: Vec<Inbox>,
    made: usize,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Hands the inbox being filled to the worker, and takes an empty one in its place:
    /// returned by the worker, new while fewer than [`INBOXES`] exist, or waited for.
    fn send(&mut self) -> Result<(), WorkersGone> {
        loop {
            match self.back.try_recv() {
                Ok(b) => self.spare.push(b),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(WorkersGone),
            }
        }
        let next = match self.spare.pop() {
            Some(b) => b,
            None if self.made < INBOXES => {
                self.made += 1;
                Inbox::default()
            }
            None => self.back.recv().map_err(|_| WorkersGone)?,
        };
        let full = std::mem::replace(&mut self.filling, next);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.to.send(Job::Packets(full)).map_err(|_| WorkersGone)
    }

    /// Runs the inbox being filled on the loop's thread, if it is small and the worker has
    /// nothing in flight and is not running a task: then every packet of its shard handed over
    /// before has been decided and written, so the order holds. Says whether it did.
    fn run_inline(&mut self) -> bool {
        if self.filling.items.len() > INLINE_PACKETS || self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let Ok(mut part) = self.part.try_lock() else {
            return false;
        };
        let inbox = std::mem::take(&mut self.filling);
        self.filling = part.run(inbox);
        true
    }
}

/// The worker threads, each owning one shard.
pub(crate) struct Workers {
    front: Front,
    handles: Vec<Handle>,
    /// The allowlist every shard holds.
    allowlist: Option<Allowlist>,
    /// A worker could not be handed a packet: the next dispatch says so.
    gone: bool,
    /// Inboxes the loop ran itself, and inboxes it handed to workers.
    ran_inline: u64,
    handed_over: u64,
}

impl Workers {
    /// A node with this key split over one worker thread per output in `outs` (at least 2),
    /// its flow table of `flow_capacity` split among them ([`Shard::flow_capacity`]).
    pub(crate) fn start(
        key: [u8; 32],
        flow_capacity: usize,
        outs: Vec<Out>,
    ) -> anyhow::Result<Workers> {
        let count = outs.len();
        let front = Front::new(key, count)
            .ok_or_else(|| anyhow::anyhow!("cannot split the node into {count} shards"))?;
        let mut handles = Vec::new();
        for (i, out) in outs.into_iter().enumerate() {
            let shard = Shard::new(i, count).ok_or_else(|| anyhow::anyhow!("shard {i}"))?;
            let part = Arc::new(Mutex::new(Part {
                node: Node::shard(key, Shard::flow_capacity(flow_capacity, count), shard),
                out,
                faults: Faults::default(),
            }));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let (to, jobs) = sync_channel::<Job>(INBOXES);
            let (give, back) = sync_channel::<Inbox>(INBOXES);
            let (mine, counted) = (part.clone(), in_flight.clone());
            let thread = std::thread::Builder::new()
                .name(format!("bulkheadd-shard{i}"))
                .spawn(move || {
                    while let Ok(job) = jobs.recv() {
                        match job {
                            Job::Packets(inbox) => {
                                let mut part = lock(&mine);
                                let inbox = part.run(inbox);
                                // Written, and still locked: the loop may run the next inbox.
                                counted.fetch_sub(1, Ordering::AcqRel);
                                drop(part);
                                if give.send(inbox).is_err() {
                                    return;
                                }
                            }
                            Job::Run(task) => task(&mut lock(&mine)),
                        }
                    }
                })?;
            handles.push(Handle {
                to,
                back,
                part,
                in_flight,
                filling: Inbox::default(),
                spare: Vec::new(),
                made: 1,
                thread: Some(thread),
            });
        }
        Ok(Workers {
            front,
            handles,
            allowlist: None,
            gone: false,
            ran_inline: 0,
            handed_over: 0,
        })
    }

    fn push(&mut self, shard: usize, p: &[u8], from: Option<(SocketAddr, Ticket)>, now: Now) {
        let h = &mut self.handles[shard];
        h.filling.now.get_or_insert(now);
        h.filling.data.extend_from_slice(p);
        h.filling.items.push((h.filling.data.len(), from));
        let full = h.filling.items.len() >= INBOX_PACKETS || h.filling.data.len() >= INBOX_BYTES;
        if full && h.send().is_err() {
            self.gone = true;
        }
    }

    /// Hands over every inbox with packets in it. Fails once any worker is gone, even an idle
    /// one: its shard's peers would otherwise keep whatever it last enforced, so the daemon
    /// stops instead (fail closed).
    fn dispatch(&mut self) -> Result<(), WorkersGone> {
        if self.gone
            || self
                .handles
                .iter()
                .any(|h| h.thread.as_ref().is_none_or(JoinHandle::is_finished))
        {
            self.gone = true;
            return Err(WorkersGone);
        }
        for h in &mut self.handles {
            if h.filling.items.is_empty() {
                continue;
            }
            if h.run_inline() {
                self.ran_inline += 1;
            } else {
                h.send()?;
                self.handed_over += 1;
            }
        }
        Ok(())
    }

    fn apply(&mut self, config: Config, now: Now) -> Result<ApplyReport, WorkersGone> {
        // Packets read so far go first (`ask` hands them over), under the configuration they
        // were read under.
        let allowlist = config.allowlist.clone();
        self.front.apply(&config);
        let reports = self.ask(move |p| {
            let r = p.node.apply(config.clone(), now);
            p.flush();
            r
        })?;
        self.allowlist = Some(allowlist);
        Ok(ApplyReport::of_shards(reports))
    }

    /// Runs `f` on every worker, after what it was handed before, and waits for the answers,
    /// in shard order.
    fn ask<R: Send + 'static>(
        &mut self,
        f: impl Fn(&mut Part) -> R + Clone + Send + 'static,
    ) -> Result<Vec<R>, WorkersGone> {
        let r = self.try_ask(f);
        self.gone |= r.is_err();
        r
    }

    fn try_ask<R: Send + 'static>(
        &mut self,
        f: impl Fn(&mut Part) -> R + Clone + Send + 'static,
    ) -> Result<Vec<R>, WorkersGone> {
        self.dispatch()?;
        let (tx, rx) = channel();
        for (i, h) in self.handles.iter().enumerate() {
            let (f, tx) = (f.clone(), tx.clone());
            let task: Task = Box::new(move |p| {
                let _ = tx.send((i, f(p)));
            });
            h.to.send(Job::Run(task)).map_err(|_| WorkersGone)?;
        }
        drop(tx);
        let mut answers: Vec<(usize, R)> = rx.iter().collect();
        if answers.len() != self.handles.len() {
            return Err(WorkersGone);
        }
        answers.sort_by_key(|(i, _)| *i);
        Ok(answers.into_iter().map(|(_, r)| r).collect())
    }

    /// Runs `f` on every worker, after what it was handed before, without waiting.
    fn tell(&mut self, f: impl Fn(&mut Part) + Clone + Send + 'static) -> Result<(), WorkersGone> {
        self.dispatch()?;
        for h in &self.handles {
            if h.to.send(Job::Run(Box::new(f.clone()))).is_err() {
                self.gone = true;
                return Err(WorkersGone);
            }
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let threads: Vec<_> = self
            .handles
            .drain(..)
            .filter_map(|mut h| h.thread.take())
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bulkhead_dataplane::packet::build;
    use bulkhead_dataplane::{PeerConfig, Sink};
    use bulkhead_proto::PrivateKey;

    use super::*;
    use crate::writer::{Batch, Write};

    const T0: i64 = 1_800_000_000;

    /// Each datagram written, where to, and whether the new allowlist was in force then.
    type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>, bool)>>>;

    /// A wire that records, slowly, so the workers fall behind the loop; it panics once its
    /// second flag is set.
    struct Record(Seen, Arc<AtomicBool>, Arc<AtomicBool>);

    impl Write for Record {
        fn write_runs(&mut self, b: &mut Batch) {
            assert!(!self.2.load(Ordering::SeqCst), "the wire breaks");
            std::thread::sleep(Duration::from_millis(2));
            let applied = self.1.load(Ordering::SeqCst);
            let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
            for r in b.runs() {
                seen.extend(r.buf.chunks(r.size).map(|d| (r.to, d.to_vec(), applied)));
            }
        }
        fn write_packets(&mut self, _: &mut Batch) {}
        fn max_segments(&self) -> usize {
            64
        }
    }

    /// Collects what a whole node outputs.
    #[derive(Default)]
    struct Collect(Vec<(SocketAddr, Vec<u8>)>, Vec<Vec<u8>>);

    impl Sink for Collect {
        fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
            self.0.push((to, d.to_vec()));
        }
        fn to_tun(&mut self, p: &[u8]) {
            self.1.push(p.to_vec());
        }
    }

    const OPEN: &str = "version: 1
network: { cidr: 10.9.0.0/24 }
identities:
  web: { labels: { app: web } }
  db1: { labels: { app: db1 } }
  db2: { labels: { app: db2 } }
segments:
  webs: { match: { app: web } }
  db1s: { match: { app: db1 } }
  db2s: { match: { app: db2 } }
rules:
  - { name: web-db1, from: [webs], to: [db1s], ports: [udp/5000] }
  - { name: web-db2, from: [webs], to: [db2s], ports: [udp/5000] }
";

    fn lists(policy: &str) -> BTreeMap<String, Allowlist> {
        let l = bulkhead_policy::load(policy, T0, &BTreeMap::new());
        let m = l.model.expect("a valid policy");
        bulkhead_policy::Compiled::new(&m, m.state(&bulkhead_policy::Conditions::at(T0)))
            .allowlists(&m, 1)
            .into_iter()
            .map(|a| (a.identity.clone(), a))
            .collect()
    }

    /// A node split over two workers, with a peer in each shard (db1 in shard 0, db2 in 1),
    /// the handshakes done; the workers' wire records slowly.
    struct Lab {
        keys: Vec<PrivateKey>,
        udp: Vec<SocketAddr>,
        web: Plane,
        loop_out: Out,
        faults: Faults,
        dbs: Vec<Node>,
        wire: Seen,
        applied: Arc<AtomicBool>,
        /// Set, the workers' wires panic.
        breaks: Arc<AtomicBool>,
        now: Now,
    }

    const NAMES: [&str; 3] = ["web", "db1", "db2"];

    impl Lab {
        fn new() -> Lab {
            let keys: Vec<PrivateKey> = (0..3)
                .map(|i| {
                    loop {
                        let k = PrivateKey::generate();
                        if i == 0
                            || Shard::new(i - 1, 2)
                                .expect("a shard")
                                .owns(&k.public_key().0)
                        {
                            break k;
                        }
                    }
                })
                .collect();
            let udp = (0..3)
                .map(|i| SocketAddr::from(([192, 0, 2, 1 + i as u8], 51820)))
                .collect();
            let (wire, applied): (Seen, _) = (Arc::default(), Arc::new(AtomicBool::new(false)));
            let breaks = Arc::new(AtomicBool::new(false));
            let outs = (0..2)
                .map(|_| {
                    let w = Record(wire.clone(), applied.clone(), breaks.clone());
                    Out::new(Arc::default(), w)
                })
                .collect();
            let workers = Workers::start(keys[0].to_bytes(), 1024, outs).expect("workers");
            let never = Arc::default();
            let mut lab = Lab {
                loop_out: Out::new(Arc::default(), Record(wire.clone(), applied.clone(), never)),
                faults: Faults::default(),
                web: Plane::Many(workers),
                dbs: Vec::new(),
                keys,
                udp,
                wire,
                applied,
                breaks,
                now: Now {
                    instant: Instant::now(),
                    unix: T0,
                },
            };
            lab.apply(OPEN);
            lab.dbs = (1..3)
                .map(|i| {
                    let mut n = Node::new(lab.keys[i].to_bytes(), 1024);
                    n.apply(lab.config(OPEN, i), lab.now);
                    n
                })
                .collect();
            let Plane::Many(ws) = &mut lab.web else {
                unreachable!()
            };
            let per_shard = ws.ask(|p| p.node.peers().len()).expect("workers");
            assert_eq!(per_shard, [1, 1], "each shard holds its peer");
            // The handshakes, shuttled by hand: the first packet to each starts it.
            for i in 0..2 {
                lab.send(i, 0);
                let mut got = [Collect::default(), Collect::default()];
                for _ in 0..4 {
                    lab.web.flow_count(); // every worker is done with what it was handed
                    let written: Vec<_> = std::mem::take(&mut *lab.wire.lock().expect("lock"));
                    for (to, d, _) in written {
                        let j = lab.udp.iter().position(|u| *u == to).expect("a peer") - 1;
                        lab.dbs[j].handle_udp(lab.udp[0], &d, lab.now, &mut got[j]);
                        for (_, back) in std::mem::take(&mut got[j].0) {
                            let from = lab.udp[j + 1];
                            lab.web.handle_udp(from, &back, lab.now, &mut lab.loop_out);
                        }
                    }
                    lab.web.dispatch().expect("workers");
                }
                assert_eq!(got[i].1.len(), 1, "the first packet to db{} arrived", i + 1);
            }
            lab.wire.lock().expect("lock").clear();
            lab
        }

        fn config(&self, policy: &str, me: usize) -> Config {
            Config {
                allowlist: lists(policy).remove(NAMES[me]).expect("an allowlist"),
                peers: (0..3)
                    .filter(|&i| i != me)
                    .map(|i| {
                        let c = PeerConfig {
                            public_key: self.keys[i].public_key().0,
                            endpoint: Some(self.udp[i]),
                        };
                        (NAMES[i].to_string(), c)
                    })
                    .collect(),
                keepalive: None,
            }
        }

        fn apply(&mut self, policy: &str) -> ApplyReport {
            let cfg = self.config(policy, 0);
            let (now, out, faults) = (self.now, &mut self.loop_out, &mut self.faults);
            self.web.apply(cfg, now, out, faults).expect("workers")
        }

        /// web's local process sends datagram `seq` to db `i` (0 or 1).
        fn send(&mut self, i: usize, seq: u32) {
            let addr = |n: usize| lists(OPEN)[NAMES[n]].address;
            let p = build::udp(addr(0), addr(i + 1), 4000, 5000, &seq.to_be_bytes());
            self.web.handle_tun(&p, self.now, &mut self.loop_out);
        }

        /// Waits for the workers, then: how many datagrams to db `i` were written after the
        /// change, and the sequence numbers each db decrypts from all that was written.
        fn outcome(&mut self) -> ([usize; 2], [Vec<u32>; 2]) {
            self.web.flow_count();
            let wire = std::mem::take(&mut *self.wire.lock().expect("lock"));
            let mut late = [0, 0];
            let mut got = [Collect::default(), Collect::default()];
            for (to, d, after) in &wire {
                let i = self.udp.iter().position(|u| u == to).expect("a peer") - 1;
                late[i] += usize::from(*after);
                self.dbs[i].handle_udp(self.udp[0], d, self.now, &mut got[i]);
            }
            let seqs = |c: &Collect| -> Vec<u32> {
                c.1.iter()
                    .map(|p| u32::from_be_bytes(p[p.len() - 4..].try_into().expect("4 bytes")))
                    .collect()
            };
            (late, [seqs(&got[0]), seqs(&got[1])])
        }

        /// Asserts the workers are behind the loop now.
        fn assert_behind(&self, sent: usize) {
            let written = self.wire.lock().expect("lock").len();
            assert!(
                written < sent,
                "the workers are behind ({written} of {sent} written)"
            );
        }
    }

    /// Sends round `round` of a transfer to both peers: a burst (more than the loop runs
    /// itself), or every third round a single packet, which the loop runs itself if the worker
    /// is idle; every sixth round it waits for the workers first, so that it is. Returns the
    /// next sequence number.
    fn round(lab: &mut Lab, round: u32, seq: u32) -> u32 {
        if round.is_multiple_of(6) {
            lab.web.flow_count();
        }
        let n = if round.is_multiple_of(3) { 1 } else { 6 };
        for s in seq..seq + n {
            lab.send(0, s);
            lab.send(1, s);
        }
        lab.web.dispatch().expect("workers");
        seq + n
    }

    /// A transfer to both peers through the two workers and the loop, with the allowlist
    /// changed half way to cut the flow to db1, while the workers are behind. Once `apply` has
    /// returned, not one more datagram of the cut flow reaches the wire; the other flow
    /// carries on, and both arrive intact and in order, whichever thread ran each part.
    #[test]
    fn no_packet_of_a_cut_flow_is_written_after_apply_returns() {
        let mut lab = Lab::new();
        if let Plane::Many(w) = &mut lab.web {
            (w.ran_inline, w.handed_over) = (0, 0);
        }
        let closed = OPEN.replace(
            "  - { name: web-db1, from: [webs], to: [db1s], ports: [udp/5000] }\n",
            "",
        );
        let (mut seq, mut cut) = (0, 0);
        for r in 0..60 {
            if r == 35 {
                lab.assert_behind(2 * seq as usize);
                let rep = lab.apply(&closed);
                assert!(rep.flows_cut >= 1, "{rep:?}");
                lab.applied.store(true, Ordering::SeqCst);
                cut = seq;
            }
            seq = round(&mut lab, r, seq);
        }
        let (late, got) = lab.outcome();
        assert_eq!(
            late[0], 0,
            "datagrams of the cut flow written after apply returned"
        );
        assert_eq!(got[0], (0..cut).collect::<Vec<u32>>(), "db1: up to the cut");
        assert_eq!(got[1], (0..seq).collect::<Vec<u32>>(), "db2: all of it");
        let Plane::Many(w) = &lab.web else {
            unreachable!()
        };
        assert!(w.handed_over > 0, "the workers ran bursts");
        assert!(
            w.ran_inline >= 10,
            "the loop ran single packets while a worker was idle"
        );
    }

    /// The same with the allowlist cleared (one that cannot be read): once `clear` has
    /// returned, nothing more reaches the wire from any shard.
    #[test]
    fn nothing_is_written_after_clear_returns() {
        let mut lab = Lab::new();
        let (mut seq, mut cleared) = (0, 0);
        for r in 0..40 {
            if r == 23 {
                lab.assert_behind(2 * seq as usize);
                let (out, faults) = (&mut lab.loop_out, &mut lab.faults);
                lab.web.clear(out, faults).expect("workers");
                lab.applied.store(true, Ordering::SeqCst);
                assert_eq!(lab.web.allowlist(), None);
                assert!(lab.web.peers().is_empty(), "no tunnels left in any shard");
                cleared = seq;
            }
            seq = round(&mut lab, r, seq);
        }
        let (late, got) = lab.outcome();
        assert_eq!(late, [0, 0], "datagrams written after clear returned");
        assert_eq!(got[0], (0..cleared).collect::<Vec<u32>>());
        assert_eq!(got[1], (0..cleared).collect::<Vec<u32>>());
        let c = lab.web.counters();
        let dropped = c
            .dropped
            .get(&(bulkhead_dataplane::Direction::Egress, "no_allowlist"));
        assert_eq!(dropped, Some(&(2 * u64::from(seq - cleared))), "{c:?}");
    }

    /// A worker thread that ends (here its wire panics, in shard 0) stops the packet path: the
    /// next hand-over fails, and so do apply and clear, even though the other worker is fine;
    /// the daemon then stops rather than leave the dead worker's peers on an old allowlist.
    #[test]
    fn a_worker_that_ends_stops_the_packet_path() {
        let mut lab = Lab::new();
        lab.breaks.store(true, Ordering::SeqCst);
        // More than the loop runs itself: the burst goes to db1's worker, which panics on it.
        for s in 0..6 {
            lab.send(0, s);
        }
        lab.web.dispatch().expect("handed over to a live worker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while lab.web.dispatch().is_ok() {
            assert!(
                Instant::now() < deadline,
                "the dead worker was never noticed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let cfg = lab.config(OPEN, 0);
        let (now, out, faults) = (lab.now, &mut lab.loop_out, &mut lab.faults);
        assert!(lab.web.apply(cfg, now, out, faults).is_err(), "apply fails");
        assert!(lab.web.clear(out, faults).is_err(), "clear fails");
        assert!(lab.web.dispatch().is_err(), "and it stays failed");
    }

    /// The loop runs a small inbox itself only when the worker has nothing in flight and holds
    /// no lock: a packet of a flow never overtakes one handed over before it.
    #[test]
    fn the_loop_runs_an_inbox_itself_only_behind_nothing() {
        let (to, _jobs) = sync_channel::<Job>(INBOXES);
        let (_give, back) = sync_channel::<Inbox>(INBOXES);
        let wire: Seen = Arc::default();
        let part = Part {
            node: Node::new(PrivateKey::generate().to_bytes(), 16),
            out: Out::new(Arc::default(), Record(wire, Arc::default(), Arc::default())),
            faults: Faults::default(),
        };
        let mut h = Handle {
            to,
            back,
            part: Arc::new(Mutex::new(part)),
            in_flight: Arc::new(AtomicUsize::new(1)),
            filling: Inbox::default(),
            spare: Vec::new(),
            made: 1,
            thread: None,
        };
        let now = Now {
            instant: Instant::now(),
            unix: T0,
        };
        h.filling.now = Some(now);
        h.filling.data.extend_from_slice(b"packet");
        h.filling.items.push((6, None));
        assert!(!h.run_inline(), "an inbox is in flight: it goes behind it");
        h.in_flight.store(0, Ordering::SeqCst);
        let held = h.part.clone();
        let guard = held.lock().expect("lock");
        assert!(!h.run_inline(), "the worker is running: it goes behind");
        drop(guard);
        for _ in 0..INLINE_PACKETS {
            h.filling.items.push((6, None));
        }
        assert!(!h.run_inline(), "a burst goes to the worker");
        h.filling.items.truncate(1);
        assert!(
            h.run_inline(),
            "idle, and a single packet: the loop runs it"
        );
        assert!(h.filling.items.is_empty(), "and the inbox is empty again");
        let c = lock(&h.part).node.counters();
        assert_eq!(c.dropped.values().sum::<u64>(), 1, "the core saw it: {c:?}");
    }
}
