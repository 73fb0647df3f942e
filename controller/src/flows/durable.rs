//! The durable flow history (spec §9): the flows this controller's nodes report, as per-hour
//! aggregates in `STATE/flows.redb`, kept for `--flow-retention` and bounded to
//! `--flow-history-max-rows` aggregates.
//!
//! **Why a file of its own, and why redb.** The history is an append-mostly time series, read by
//! ranges of hours, and local to the controller that received the flows: each controller keeps
//! its own nodes', and `bulkhead flows --since` merges them. Not etcd: it is a replicated
//! consensus log sized for small configuration state (a 2 GiB default quota, 8 GiB at most),
//! where every write is a Raft round trip to a quorum; millions of aggregates rewritten every
//! second would crowd out the state every controller depends on. redb is already the embedded
//! store's engine: pure Rust, ACID, fsync on commit, ordered keys (a range of hours is a range of
//! keys), a file lock against a second process. It is a second file, not tables in
//! `store.redb`, so that the store's commits (and with etcd, the store itself) never wait on the
//! history's writes, and so that the history can be dropped or moved on its own.
//!
//! **Layout.** One table, `aggregates`. The key is the kind of flow, encoded so that keys sort by
//! hour first: the hour (8 bytes, big-endian Unix seconds), then src, src_address, dst,
//! dst_address, proto, port, verdict, path and rule (strings length-prefixed). The value is
//! count, first and last (24 bytes). ICMP aggregates have port 0: a node reports an echo's
//! identifier there, which says nothing about the flow.
//!
//! **Writes.** [`DurableHistory::record`] adds a batch's flows to aggregates in memory; once a
//! second the flusher ([`run`]) writes all of them in one transaction (fsync on commit, with
//! redb's quick repair so that a restart after a crash does not walk the file), merged with
//! what is on disk. A `kill -9` loses what arrived since the last flush (at most a second), and
//! a commit is all or nothing. Retention and the bound are applied in the same transaction.
//!
//! **Retention and bound.** Hours that ended more than the retention ago are deleted. When a
//! new aggregate would take the file over the bound, the oldest hours go first, whole; when the
//! hour being written is itself the oldest left and the table is full, the new aggregate is
//! refused (its flows still count in aggregates that exist). What is dropped is counted, by
//! why ([`Dropped`]).
//!
//! **Each node its share.** A node's reports are its claims, and a compromised node can claim
//! as many kinds of flow as it likes (a scan of every port, every address). Each node may add
//! at most [`Limits::node_hour_rows`] new aggregates an hour; past that its new kinds are
//! refused and counted (`node_share`), while its aggregates that exist keep counting. The
//! default share is half the bound spread over the hours the file holds, so one node adding new
//! kinds at its full share every hour fills at most half the file before its oldest hour
//! expires: alone, it cannot push the other nodes' hours out before their time (which would
//! erase the evidence of what it did). The share is counted in memory, by a 64-bit hash of each new kind, for the current
//! hour; a restart gives every node a fresh share for the rest of that hour.
//!
//! **Each connection once.** An admitted overlay flow is reported by both ends: the initiator
//! when its egress admits it, the responder when its ingress does (or refuses it). Only the
//! responder's report is counted ([`counted`]): the receiver decides, and a connection the
//! responder refused must not also count as allowed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_proto::{FlowAggregate, FlowView, Path as NetPath, Protocol, Verdict};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// The file, in the state directory.
pub const FILE: &str = "flows.redb";
/// Default `--flow-retention`: 30 days.
pub const DEFAULT_RETENTION_SECS: i64 = 30 * 86_400;
/// Default `--flow-history-max-rows`.
pub const DEFAULT_MAX_ROWS: u64 = 2_000_000;
/// How often what arrived is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Most aggregates held in memory between two flushes; past it, new kinds of flow are dropped
/// (and counted) until the next flush. A second of a flood of distinct flows from every node.
pub const MAX_PENDING: usize = 100_000;
/// redb's page cache for this file.
const CACHE_BYTES: usize = 32 << 20;
const HOUR: i64 = 3600;

/// kind of flow (hour first) → count, first, last.
const AGGREGATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("aggregates");

/// How long and how much the history keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--flow-retention`, in seconds.
    pub retention_secs: i64,
    /// `--flow-history-max-rows`: most aggregates in the file.
    pub max_rows: u64,
    /// Most new aggregates one reporting node may add in one hour ([`Limits::share`] by
    /// default).
    pub node_hour_rows: u64,
}

impl Limits {
    /// Half the bound spread over the hours the file holds (the retention's and the current
    /// one): what one node may add an hour so that, alone, it fills at most half the file
    /// before the retention empties it.
    pub fn share(retention_secs: i64, max_rows: u64) -> u64 {
        let hours = u64::try_from(retention_secs / HOUR).unwrap_or(0) + 1;
        (max_rows / (2 * hours)).max(1)
    }

    /// These limits, with the default share.
    pub fn new(retention_secs: i64, max_rows: u64) -> Limits {
        Limits {
            retention_secs,
            max_rows,
            node_hour_rows: Limits::share(retention_secs, max_rows),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new(DEFAULT_RETENTION_SECS, DEFAULT_MAX_ROWS)
    }
}

/// What was dropped, by why.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Aggregates of hours past the retention, and flows reported from before it.
    pub retention: AtomicU64,
    /// The oldest hours, deleted to keep the file within its bound.
    pub bound: AtomicU64,
    /// New aggregates refused: the hour they belong to was the oldest left, and the file full.
    pub full: AtomicU64,
    /// Flows of new kinds refused in memory: more new kinds of flow arrived between two
    /// flushes than [`MAX_PENDING`].
    pub backlog: AtomicU64,
    /// Flows of new kinds from a node that had added its share of new aggregates this hour.
    pub node_share: AtomicU64,
}

impl Dropped {
    /// `(reason, count)` for metrics.
    pub fn counts(&self) -> [(&'static str, u64); 5] {
        [
            ("node_share", self.node_share.load(Ordering::Relaxed)),
            ("retention", self.retention.load(Ordering::Relaxed)),
            ("bound", self.bound.load(Ordering::Relaxed)),
            ("full", self.full.load(Ordering::Relaxed)),
            ("backlog", self.backlog.load(Ordering::Relaxed)),
        ]
    }
}

/// Whether a flow counts in the history: every flow, except the initiator's report of an
/// admitted overlay flow, which the responder reports too (admitted, or refused by its own
/// ingress filter). On the overlay, the initiator's end is the reporting node exactly when the
/// node opened the flow.
pub fn counted(f: &FlowView) -> bool {
    !(f.path == NetPath::Overlay && f.verdict == Verdict::Allow && f.node == f.src)
}

/// The flows of one kind in one hour, as the file keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    count: u64,
    first: i64,
    last: i64,
}

impl Tally {
    fn one(at: i64) -> Tally {
        Tally {
            count: 1,
            first: at,
            last: at,
        }
    }

    fn add(&mut self, o: Tally) {
        self.count = self.count.saturating_add(o.count);
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
    }

    fn encode(self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&self.count.to_le_bytes());
        v[8..16].copy_from_slice(&self.first.to_le_bytes());
        v[16..].copy_from_slice(&self.last.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Tally> {
        let v: &[u8; 24] = v.try_into().ok()?;
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i..i + 8]);
            b
        };
        Some(Tally {
            count: u64::from_le_bytes(word(0)),
            first: i64::from_le_bytes(word(8)),
            last: i64::from_le_bytes(word(16)),
        })
    }
}

/// The start of the hour `ms` falls in, Unix seconds.
fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(1000).div_euclid(HOUR) * HOUR
}

/// The first 8 bytes of every key of `hour`: keys sort by hour first. Hours before 1970 are
/// never kept (they are past any retention), so the sign bit is never set.
fn hour_prefix(hour: i64) -> [u8; 8] {
    hour.max(0).to_be_bytes()
}

fn put_str(k: &mut Vec<u8>, s: &str) {
    // Names are bounded when a batch is taken in (`ingest.rs`): 64 bytes.
    let s = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    k.extend_from_slice(&(s.len() as u16).to_be_bytes());
    k.extend_from_slice(s);
}

fn verdict_code(v: Verdict) -> u8 {
    match v {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
        Verdict::WouldDeny => 2,
        Verdict::Unknown => 255,
    }
}

fn path_code(p: NetPath) -> u8 {
    match p {
        NetPath::Overlay => 0,
        NetPath::Underlay => 1,
        NetPath::Unknown => 255,
    }
}

/// The key of the aggregate `f` falls in, in `hour`.
fn key_of(hour: i64, f: &FlowView) -> Vec<u8> {
    let mut k = Vec::with_capacity(48 + f.src.len() + f.dst.len());
    k.extend_from_slice(&hour_prefix(hour));
    put_str(&mut k, &f.src);
    k.extend_from_slice(&f.src_address.octets());
    put_str(&mut k, &f.dst);
    k.extend_from_slice(&f.dst_address.octets());
    k.push(f.proto.number());
    let port = if f.proto == Protocol::Icmp { 0 } else { f.port };
    k.extend_from_slice(&port.to_be_bytes());
    k.push(verdict_code(f.verdict));
    k.push(path_code(f.path));
    match &f.rule {
        None => k.push(0),
        Some(r) => {
            k.push(1);
            put_str(&mut k, r);
        }
    }
    k
}

/// Reads a key back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u16()?;
        std::str::from_utf8(self.take(usize::from(n))?)
            .ok()
            .map(str::to_string)
    }

    fn address(&mut self) -> Option<std::net::Ipv4Addr> {
        self.take(4)
            .map(|b| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

/// The hour of a key.
fn key_hour(k: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    i64::from_be_bytes(b)
}

/// An aggregate from its key and value; `None` if either is not one this version wrote.
fn decode(k: &[u8], t: Tally) -> Option<FlowAggregate> {
    let mut c = Cursor(k);
    let hour = key_hour(c.take(8)?);
    let src = c.string()?;
    let src_address = c.address()?;
    let dst = c.string()?;
    let dst_address = c.address()?;
    let proto = Protocol::from_number(c.u8()?);
    let port = c.u16()?;
    let verdict = match c.u8()? {
        0 => Verdict::Allow,
        1 => Verdict::Deny,
        2 => Verdict::WouldDeny,
        _ => Verdict::Unknown,
    };
    let path = match c.u8()? {
        0 => NetPath::Overlay,
        1 => NetPath::Underlay,
        _ => NetPath::Unknown,
    };
    let rule = match c.u8()? {
        0 => None,
        _ => Some(c.string()?),
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(FlowAggregate {
        hour,
        src,
        src_address,
        dst,
        dst_address,
        proto,
        port,
        verdict,
        path,
        rule,
        count: t.count,
        first: t.first,
        last: t.last,
    })
}

/// What a read selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// From this time (Unix ms): aggregates whose last flow is earlier are left out.
    pub from_ms: i64,
    /// Until this time (Unix ms): aggregates whose first flow is later are left out.
    pub to_ms: i64,
    /// From or to this identity.
    pub identity: Option<String>,
    /// Over this path.
    pub path: Option<NetPath>,
    /// With this verdict.
    pub verdict: Option<Verdict>,
    /// Denied or would-be-denied flows only.
    pub denied: bool,
}

impl Query {
    /// The query of `GET /v1/flows/history?since=S[&until=U][&identity=X][&path=P][&verdict=V]
    /// [&denied=1]`, at `now_ms`: `since` and `until` are seconds before now (`until` default
    /// 0, less than `since`).
    pub fn parse(raw: &str, now_ms: i64) -> Result<Query, String> {
        let (mut since, mut until) = (None, 0i64);
        let mut q = Query {
            from_ms: 0,
            to_ms: now_ms,
            identity: None,
            path: None,
            verdict: None,
            denied: false,
        };
        let seconds = |k: &str, v: &str| -> Result<i64, String> {
            v.parse::<i64>()
                .ok()
                .filter(|s| (0..=100 * 365 * 86_400).contains(s))
                .ok_or_else(|| format!("{k}: a number of seconds before now, not {v:?}"))
        };
        for pair in raw.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "since" => since = Some(seconds(k, v)?),
                "until" => until = seconds(k, v)?,
                "identity" if !v.is_empty() => q.identity = Some(v.to_string()),
                "path" => q.path = Some(v.parse()?),
                "verdict" => q.verdict = Some(v.parse()?),
                "denied" => q.denied = v != "0",
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        let since = since.ok_or("since: required, in seconds before now")?;
        if since == 0 || until >= since {
            return Err(format!(
                "since ({since}) must be more than zero and more than until ({until})"
            ));
        }
        q.from_ms = now_ms - since * 1000;
        q.to_ms = now_ms - until * 1000;
        Ok(q)
    }

    /// Whether `a` is selected.
    pub fn keeps(&self, a: &FlowAggregate) -> bool {
        a.last >= self.from_ms
            && a.first <= self.to_ms
            && self.path.is_none_or(|p| a.path == p)
            && self.verdict.is_none_or(|v| a.verdict == v)
            && (!self.denied || a.verdict != Verdict::Allow)
            && self
                .identity
                .as_ref()
                .is_none_or(|i| a.src == *i || a.dst == *i)
    }
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Aggregates written (new or updated).
    pub written: u64,
    /// Aggregates deleted for the retention.
    pub retention: u64,
    /// Aggregates deleted for the bound (the oldest hours).
    pub bound: u64,
    /// New aggregates refused: the file was full and their hour the oldest left.
    pub full: u64,
    /// Aggregates in the file after it.
    pub rows: u64,
}

/// The durable flow history of one controller.
#[derive(Debug)]
pub struct DurableHistory {
    db: Database,
    limits: Limits,
    /// Aggregates not yet written, by key.
    pending: Mutex<BTreeMap<Vec<u8>, Tally>>,
    /// The new kinds each node added in the current hour.
    shares: Mutex<Shares>,
    /// Held by a flush from taking `pending` to its commit, and by a read while it takes its
    /// snapshot (`pending` and a read transaction): a read sees each flow once, in memory or
    /// on disk.
    writing: Mutex<()>,
    /// The retention cutoff (an hour) last applied; a flush with nothing new and no newer
    /// cutoff writes nothing.
    cutoff: AtomicI64,
    rows: AtomicU64,
    /// Aggregates dropped, by why.
    pub dropped: Dropped,
    /// Flushes that failed (their aggregates stay in memory for the next).
    pub write_errors: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DurableHistory {
    /// Opens (or creates, 0600) the history at `path`.
    pub fn open(path: &Path, limits: Limits) -> Result<DurableHistory, redb::Error> {
        let file = bulkhead_proto::private::open_file(path).map_err(redb::StorageError::Io)?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create_file(file)?;
        let rows = {
            let w = db.begin_write()?;
            let rows = w.open_table(AGGREGATES)?.len()?;
            w.commit()?;
            rows
        };
        Ok(DurableHistory {
            db,
            limits,
            pending: Mutex::default(),
            shares: Mutex::default(),
            writing: Mutex::default(),
            cutoff: AtomicI64::new(i64::MIN),
            rows: AtomicU64::new(rows),
            dropped: Dropped::default(),
            write_errors: AtomicU64::new(0),
        })
    }

    /// The limits it keeps to.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Aggregates in the file, as of the last flush.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Adds a batch's flows ([`counted`] ones) to the aggregates in memory. A flow's time is
    /// the node's (`at`), or now if the node's clock is ahead of ours; a flow from before the
    /// retention is not kept.
    pub fn record<'a>(&self, flows: impl IntoIterator<Item = &'a FlowView>, now_ms: i64) {
        let oldest = now_ms.saturating_sub(self.limits.retention_secs.saturating_mul(1000));
        let (mut late, mut backlog, mut over) = (0u64, 0u64, 0u64);
        let mut p = lock(&self.pending);
        let mut shares = lock(&self.shares);
        shares.roll(hour_of(now_ms));
        for f in flows.into_iter().filter(|f| counted(f)) {
            let at = f.at.min(now_ms);
            if at < oldest {
                late += 1;
                continue;
            }
            let key = key_of(hour_of(at), f);
            if !shares.admit(&f.node, &key, self.limits.node_hour_rows) {
                over += 1;
                continue;
            }
            let full = p.len() >= MAX_PENDING;
            match p.get_mut(&key) {
                Some(t) => t.add(Tally::one(at)),
                None if full => backlog += 1,
                None => {
                    p.insert(key, Tally::one(at));
                }
            }
        }
        let newly_over = shares.newly_over();
        drop(shares);
        drop(p);
        for node in newly_over {
            tracing::warn!(
                node = %node,
                share = self.limits.node_hour_rows,
                "flow history: this node reported more new kinds of flow this hour than its share; its further new kinds are not kept until the next hour"
            );
        }
        self.dropped.retention.fetch_add(late, Ordering::Relaxed);
        self.dropped.backlog.fetch_add(backlog, Ordering::Relaxed);
        self.dropped.node_share.fetch_add(over, Ordering::Relaxed);
    }

    /// Writes what arrived since the last flush, in one transaction, with the retention and
    /// the bound applied. On failure, what was taken goes back to memory for the next try.
    pub fn flush(&self, now_ms: i64) -> Result<Flushed, redb::Error> {
        let _writing = lock(&self.writing);
        let taken = std::mem::take(&mut *lock(&self.pending));
        let cutoff =
            hour_of(now_ms.saturating_sub(self.limits.retention_secs.saturating_mul(1000)));
        if taken.is_empty() && cutoff <= self.cutoff.load(Ordering::Relaxed) {
            return Ok(Flushed {
                rows: self.rows(),
                ..Flushed::default()
            });
        }
        match self.write(&taken, cutoff) {
            Ok(f) => {
                self.cutoff.store(cutoff, Ordering::Relaxed);
                self.rows.store(f.rows, Ordering::Relaxed);
                let d = &self.dropped;
                d.retention.fetch_add(f.retention, Ordering::Relaxed);
                d.bound.fetch_add(f.bound, Ordering::Relaxed);
                d.full.fetch_add(f.full, Ordering::Relaxed);
                Ok(f)
            }
            Err(e) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                let mut p = lock(&self.pending);
                for (k, t) in taken {
                    p.entry(k).and_modify(|x| x.add(t)).or_insert(t);
                }
                Err(e)
            }
        }
    }

    fn write(&self, taken: &BTreeMap<Vec<u8>, Tally>, cutoff: i64) -> Result<Flushed, redb::Error> {
        let max = self.limits.max_rows;
        let mut out = Flushed::default();
        let mut w = self.db.begin_write()?;
        // A crash between commits leaves the allocator's state saved: the next open is quick.
        w.set_quick_repair(true);
        {
            let mut t = w.open_table(AGGREGATES)?;
            let before = t.len()?;
            let below = hour_prefix(cutoff);
            t.retain_in::<&[u8], _>(..below.as_slice(), |_, _| false)?;
            out.retention = before - t.len()?;
            // Over the bound already (it was lowered since the file was written).
            out.bound += evict(&mut t, max, 0, i64::MAX)?;
            for (k, tally) in taken {
                let hour = key_hour(k);
                if hour < cutoff {
                    out.retention += 1;
                    continue;
                }
                let old = t.get(k.as_slice())?.and_then(|g| Tally::decode(g.value()));
                let merged = match old {
                    Some(mut o) => {
                        o.add(*tally);
                        o
                    }
                    None => {
                        // A new row: room is made by deleting hours older than its own.
                        out.bound += evict(&mut t, max, 1, hour)?;
                        if t.len()? >= max {
                            out.full += 1;
                            continue;
                        }
                        *tally
                    }
                };
                t.insert(k.as_slice(), merged.encode().as_slice())?;
                out.written += 1;
            }
            out.rows = t.len()?;
        }
        w.commit()?;
        Ok(out)
    }

    /// Calls `each` with every selected aggregate, those in memory included, oldest hour first,
    /// until it returns `false`.
    pub fn scan(
        &self,
        q: &Query,
        mut each: impl FnMut(FlowAggregate) -> bool,
    ) -> Result<(), redb::Error> {
        let lo = hour_prefix(hour_of(q.from_ms));
        let hi = hour_prefix(hour_of(q.to_ms) + HOUR);
        let (memory, r) = {
            let _writing = lock(&self.writing);
            let memory: Vec<(Vec<u8>, Tally)> = lock(&self.pending)
                .range(lo.to_vec()..hi.to_vec())
                .map(|(k, t)| (k.clone(), *t))
                .collect();
            (memory, self.db.begin_read()?)
        };
        let t = r.open_table(AGGREGATES)?;
        let mut memory = memory.into_iter().peekable();
        let mut emit = |k: &[u8], tally: Tally| match decode(k, tally) {
            Some(a) if q.keeps(&a) => each(a),
            Some(_) => true,
            None => {
                tracing::warn!(key = ?k, "flow history: an aggregate this version cannot read");
                true
            }
        };
        for item in t.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            let (k, Some(mut tally)) = (k.value(), Tally::decode(v.value())) else {
                continue;
            };
            while let Some((mk, mt)) = memory.next_if(|(mk, _)| mk.as_slice() <= k) {
                if mk.as_slice() == k {
                    tally.add(mt);
                } else if !emit(&mk, mt) {
                    return Ok(());
                }
            }
            if !emit(k, tally) {
                return Ok(());
            }
        }
        for (k, t) in memory {
            if !emit(&k, t) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The aggregates `q` selects as NDJSON, in chunks of about 32 KiB, read on a blocking thread
/// as the receiver takes them. A read error ends the stream with that error, so the answer is
/// broken off rather than ended short.
pub fn ndjson(
    h: Arc<DurableHistory>,
    q: Query,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    const CHUNK: usize = 32 << 10;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(2 * CHUNK);
        let r = h.scan(&q, |a| {
            if serde_json::to_writer(&mut buf, &a).is_err() {
                return false;
            }
            buf.push(b'\n');
            buf.len() < CHUNK || tx.blocking_send(Ok(std::mem::take(&mut buf))).is_ok()
        });
        let last = r.map(|()| buf).map_err(|e| {
            tracing::error!(error = %e, "cannot read the flow history");
            std::io::Error::other(e)
        });
        let _ = tx.blocking_send(last);
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

/// The new kinds of flow each reporting node added in the current hour, as 64-bit hashes of
/// their keys: bounded by the share times the nodes that reported.
#[derive(Debug, Default)]
struct Shares {
    hour: i64,
    by_node: std::collections::HashMap<String, NodeShare>,
    /// Nodes that went over their share since the last call to [`Shares::newly_over`].
    over: Vec<String>,
}

#[derive(Debug, Default)]
struct NodeShare {
    kinds: std::collections::HashSet<u64>,
    said: bool,
}

impl Shares {
    /// Starts a new hour's shares when the hour changed.
    fn roll(&mut self, hour: i64) {
        if hour != self.hour {
            self.hour = hour;
            self.by_node.clear();
        }
    }

    /// Whether `node` may add to the aggregate `key`: one it added this hour, or a new one
    /// within its share.
    fn admit(&mut self, node: &str, key: &[u8], share: u64) -> bool {
        use std::hash::BuildHasher;
        // Keys are the node's own words: a fixed, unkeyed hash would let it choose collisions.
        static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let h = SEED.get_or_init(Default::default).hash_one(key);
        let s = match self.by_node.get_mut(node) {
            Some(s) => s,
            None => self.by_node.entry(node.to_string()).or_default(),
        };
        if s.kinds.contains(&h) {
            return true;
        }
        if (s.kinds.len() as u64) < share {
            s.kinds.insert(h);
            return true;
        }
        if !s.said {
            s.said = true;
            self.over.push(node.to_string());
        }
        false
    }

    fn newly_over(&mut self) -> Vec<String> {
        std::mem::take(&mut self.over)
    }
}

/// Deletes the oldest hours, whole, until `room` more rows fit within `max`, but only hours
/// before `before`. Returns how many rows went.
fn evict(
    t: &mut redb::Table<&[u8], &[u8]>,
    max: u64,
    room: u64,
    before: i64,
) -> Result<u64, redb::Error> {
    let start = t.len()?;
    while t.len()? + room > max {
        let Some(oldest) = t.first()?.map(|(k, _)| key_hour(k.value())) else {
            break;
        };
        if oldest >= before {
            break;
        }
        let (a, b) = (hour_prefix(oldest), hour_prefix(oldest + HOUR));
        t.retain_in::<&[u8], _>(a.as_slice()..b.as_slice(), |_, _| false)?;
    }
    Ok(start - t.len()?)
}

/// Flushes the history every [`FLUSH_EVERY`], for as long as the controller runs.
pub async fn run(h: Arc<DurableHistory>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once a minute is enough to say the file is full, or the disk failing; the metrics count
    // every time.
    let once_a_minute = |last: &mut Option<std::time::Instant>| {
        let due = last.is_none_or(|w| w.elapsed() >= Duration::from_secs(60));
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    };
    let (mut full_said, mut error_said) = (None, None);
    loop {
        tick.tick().await;
        let h = h.clone();
        let r = tokio::task::spawn_blocking(move || h.flush(crate::ops::unix_ms())).await;
        match r {
            Ok(Ok(f)) => {
                if f.bound + f.full > 0 && once_a_minute(&mut full_said) {
                    tracing::warn!(
                        deleted = f.bound,
                        refused = f.full,
                        rows = f.rows,
                        "flow history at its bound (--flow-history-max-rows): the oldest hours go first"
                    );
                }
            }
            Ok(Err(e)) => {
                if once_a_minute(&mut error_said) {
                    tracing::error!(error = %e, "cannot write the flow history; kept in memory, tried again every second");
                }
            }
            Err(e) => tracing::error!(error = %e, "flow history flush"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const H: i64 = 3_600_000;
    /// Some hour, in ms.
    const T0: i64 = 490_000 * H;

    fn flow(at: i64, port: u16, verdict: Verdict) -> FlowView {
        FlowView {
            at,
            node: "db-1".into(),
            src: "web-1".into(),
            src_address: Ipv4Addr::new(10, 0, 0, 1),
            dst: "db-1".into(),
            dst_address: Ipv4Addr::new(10, 0, 0, 2),
            proto: Protocol::Tcp,
            port,
            verdict,
            path: NetPath::Overlay,
            rule: (verdict == Verdict::Allow).then(|| "web-to-db".into()),
            reason: None,
        }
    }

    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("bh-durable-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }

        fn open(&self, limits: Limits) -> DurableHistory {
            DurableHistory::open(&self.0.join(FILE), limits).unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn all(h: &DurableHistory, now: i64) -> Vec<FlowAggregate> {
        let q = Query::parse("since=315360000", now).unwrap();
        let mut out = Vec::new();
        h.scan(&q, |a| {
            out.push(a);
            true
        })
        .unwrap();
        out
    }

    fn limits(max_rows: u64) -> Limits {
        Limits {
            retention_secs: 30 * 86_400,
            max_rows,
            node_hour_rows: u64::MAX,
        }
    }

    /// The attack: a compromised node reports a flood of distinct flows (a scan of every
    /// port) to push the other nodes' history out of the file. It gets its share of new
    /// aggregates an hour, no more; the others' hours stay, and their flows keep counting.
    #[test]
    fn one_node_cannot_push_the_others_history_out() {
        let d = Dir::new("share");
        // 10 hours' retention (11 hours in the file), 220 rows: a share of 10 new aggregates a
        // node an hour.
        let l = Limits::new(10 * 3600, 220);
        assert_eq!(l.node_hour_rows, 10);
        let h = d.open(l);
        let witness = |at: i64| FlowView {
            node: "web-1".into(),
            dst: "web-1".into(),
            ..flow(at, 443, Verdict::Deny)
        };
        // Every hour of the retention, the attacker (db-1) reports 1,000 new kinds, and an
        // honest node one.
        for hour in 0..=10 {
            let now = T0 + hour * H + 1000;
            let scan: Vec<FlowView> = (0..1000).map(|p| flow(now, p, Verdict::Deny)).collect();
            h.record(&scan, now);
            h.record(&[witness(now)], now);
            h.flush(now).unwrap();
        }
        let now = T0 + 10 * H + 2000;
        let a = all(&h, now);
        let from = |n: &str| a.iter().filter(|x| x.dst == n).count();
        assert_eq!(from("db-1"), 11 * 10, "the attacker's share: 10 an hour");
        assert_eq!(from("web-1"), 11);
        assert!(
            a.iter().any(|x| x.dst == "web-1" && x.hour * 1000 == T0),
            "the oldest hour of the honest node went"
        );
        assert_eq!(h.dropped.node_share.load(Ordering::Relaxed), 11 * 990);
        assert_eq!(h.dropped.bound.load(Ordering::Relaxed), 0);
        // What it added this hour still counts.
        h.record(&[flow(now, 0, Verdict::Deny)], now);
        assert_eq!(h.dropped.node_share.load(Ordering::Relaxed), 11 * 990);
    }

    #[test]
    fn flows_of_one_kind_in_one_hour_make_one_aggregate() {
        let d = Dir::new("aggregate");
        let h = d.open(Limits::default());
        let now = T0 + H / 2;
        let mut flows = vec![
            flow(T0 + 10, 5432, Verdict::Allow),
            flow(T0 + 30, 5432, Verdict::Allow),
            flow(T0 + 20, 5432, Verdict::Allow),
            flow(T0 + 40, 22, Verdict::Deny),
            // The previous hour.
            flow(T0 - 5, 5432, Verdict::Allow),
        ];
        // ICMP: the echo identifier is not a port.
        for id in [7, 8, 9] {
            let mut f = flow(T0 + 50 + i64::from(id), id, Verdict::Allow);
            f.proto = Protocol::Icmp;
            flows.push(f);
        }
        // The initiator's copy of an admitted overlay flow: the responder's counts.
        let mut copy = flow(T0 + 60, 5432, Verdict::Allow);
        copy.node = "web-1".into();
        flows.push(copy);
        h.record(&flows, now);
        let got = all(&h, now);
        let brief: Vec<_> = got
            .iter()
            .map(|a| (a.hour, a.proto, a.port, a.verdict, a.count, a.first, a.last))
            .collect();
        let hour = T0 / 1000;
        let tcp = Protocol::Tcp;
        let (allow, deny) = (Verdict::Allow, Verdict::Deny);
        let want = [
            (hour - 3600, tcp, 5432, allow, 1, T0 - 5, T0 - 5),
            (hour, Protocol::Icmp, 0, allow, 3, T0 + 57, T0 + 59),
            (hour, tcp, 22, deny, 1, T0 + 40, T0 + 40),
            (hour, tcp, 5432, allow, 3, T0 + 10, T0 + 30),
        ];
        // Within an hour the order is the key's; compare as sets, hours in order.
        assert_eq!(brief.len(), want.len(), "{brief:?}");
        for w in want {
            assert!(brief.contains(&w), "{w:?} not in {brief:?}");
        }
        assert!(got.windows(2).all(|w| w[0].hour <= w[1].hour));
        // The same in memory and once written, and written once.
        let f = h.flush(now).unwrap();
        assert_eq!((f.written, f.rows), (4, 4));
        assert_eq!(all(&h, now), got);
        assert_eq!(
            h.flush(now).unwrap().written,
            0,
            "nothing new: nothing written"
        );
        // More of the same kind: added to the written aggregate, not a new one.
        h.record(&[flow(T0 + 70, 5432, Verdict::Allow)], now);
        let merged = all(&h, now);
        assert_eq!(merged.len(), 4, "in memory, merged with the file");
        h.flush(now).unwrap();
        assert_eq!(all(&h, now), merged);
        let a = merged
            .iter()
            .find(|a| a.port == 5432 && a.hour == hour)
            .unwrap();
        assert_eq!((a.count, a.first, a.last), (4, T0 + 10, T0 + 70));
        assert_eq!(h.rows(), 4);
    }

    #[test]
    fn a_reopened_history_has_what_was_flushed_and_a_read_sees_each_flow_once() {
        let d = Dir::new("reopen");
        let now = T0 + H / 2;
        {
            let h = d.open(Limits::default());
            h.record(&[flow(T0, 1, Verdict::Deny)], now);
            h.flush(now).unwrap();
            // Not flushed: lost with the process.
            h.record(&[flow(T0, 2, Verdict::Deny)], now);
        }
        let h = d.open(Limits::default());
        assert_eq!(h.rows(), 1);
        let got = all(&h, now);
        assert_eq!(got.iter().map(|a| a.port).collect::<Vec<_>>(), [1]);
        // Reads while flushes run, with flows arriving: never a flow twice or missing.
        let h = Arc::new(h);
        let writer = {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    h.record(&[flow(T0 + i, 3, Verdict::Deny)], now);
                    h.flush(now).unwrap();
                }
            })
        };
        let mut last = 0;
        while !writer.is_finished() {
            let n = all(&h, now)
                .iter()
                .filter(|a| a.port == 3)
                .map(|a| a.count)
                .sum::<u64>();
            assert!(
                n >= last && n <= 200,
                "counted twice or lost: {n} after {last}"
            );
            last = n;
        }
        writer.join().unwrap();
        assert_eq!(all(&h, now).iter().map(|a| a.count).sum::<u64>(), 201);
    }

    #[test]
    fn hours_past_the_retention_go() {
        let d = Dir::new("retention");
        let l = Limits {
            retention_secs: 2 * 3600,
            max_rows: 100,
            node_hour_rows: u64::MAX,
        };
        let h = d.open(l);
        let now = T0 + 10;
        // Three hours ago (gone at once), two (kept: the hour overlaps the retention), one, now.
        for (i, ago) in [3, 2, 1, 0].into_iter().enumerate() {
            h.record(&[flow(T0 - ago * H + 2000, i as u16, Verdict::Deny)], now);
        }
        assert_eq!(h.dropped.retention.load(Ordering::Relaxed), 1);
        h.flush(now).unwrap();
        assert_eq!(all(&h, now).len(), 3);
        // An hour on: the oldest kept one is past the retention.
        let later = now + H;
        let f = h.flush(later).unwrap();
        assert_eq!((f.retention, f.rows), (1, 2));
        let hours: Vec<i64> = all(&h, later).iter().map(|a| a.hour).collect();
        assert_eq!(hours, [T0 / 1000 - 3600, T0 / 1000]);
        assert_eq!(h.dropped.retention.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn over_the_bound_the_oldest_hours_go_first() {
        let d = Dir::new("bound");
        let h = d.open(limits(10));
        let now = T0 + 3 * H;
        // Hours 0, 1, 2: 4 aggregates each, 12 > 10.
        for hour in 0..3 {
            let flows: Vec<_> = (0..4)
                .map(|p| flow(T0 + hour * H + p, p as u16, Verdict::Deny))
                .collect();
            h.record(&flows, now);
        }
        let f = h.flush(now).unwrap();
        // Hour 0 went whole to make room for hour 2's aggregates.
        assert_eq!((f.bound, f.rows, f.full), (4, 8, 0));
        let hours: Vec<i64> = all(&h, now).iter().map(|a| a.hour).collect();
        assert_eq!(
            hours,
            [1, 1, 1, 1, 2, 2, 2, 2].map(|i| T0 / 1000 + i * 3600)
        );
        // Flows of a kind already kept still count at the bound.
        h.record(&[flow(T0 + 2 * H + 9, 0, Verdict::Deny)], now);
        // A flood in the current hour: hour 1 goes, then the hour alone fills the file and the
        // rest is refused, counted.
        let flood: Vec<_> = (100..120)
            .map(|p| flow(T0 + 3 * H + 1, p, Verdict::Deny))
            .collect();
        h.record(&flood, now + 1);
        let f = h.flush(now + 1).unwrap();
        assert_eq!((f.rows, f.bound), (10, 8));
        assert_eq!(f.full, 10, "20 new, 10 fit");
        assert_eq!(h.dropped.bound.load(Ordering::Relaxed), 12);
        assert_eq!(h.dropped.full.load(Ordering::Relaxed), 10);
        assert_eq!(all(&h, now + 1).len(), 10);
        // The next hour's first aggregate takes this one's place, hour by hour.
        h.record(&[flow(T0 + 4 * H, 1, Verdict::Deny)], now + H);
        let f = h.flush(now + H).unwrap();
        assert_eq!(f.rows, 1);
        // A history reopened with a lower bound is brought within it.
        drop(h);
        let h = d.open(limits(5));
        h.record(
            &(0..8)
                .map(|p| flow(T0 + 5 * H, p, Verdict::Deny))
                .collect::<Vec<_>>(),
            now + 2 * H,
        );
        let f = h.flush(now + 2 * H).unwrap();
        assert!(f.rows <= 5, "{f:?}");
    }

    #[test]
    fn memory_between_flushes_is_bounded() {
        let d = Dir::new("backlog");
        let h = d.open(Limits {
            node_hour_rows: u64::MAX,
            ..Limits::default()
        });
        let now = T0 + 10;
        let flows: Vec<_> = (0..=MAX_PENDING)
            .map(|i| {
                let mut f = flow(T0, (i % 65_536) as u16, Verdict::Deny);
                f.dst_address = Ipv4Addr::from(0x0a00_0000 + (i / 65_536) as u32);
                f
            })
            .collect();
        h.record(&flows, now);
        assert_eq!(h.dropped.backlog.load(Ordering::Relaxed), 1);
        assert_eq!(lock(&h.pending).len(), MAX_PENDING);
    }

    #[test]
    fn reads_select_by_range_and_filter() {
        let d = Dir::new("range");
        let h = d.open(Limits::default());
        let now = T0 + 5 * H;
        for hour in 0..5 {
            h.record(&[flow(T0 + hour * H + 100, 1, Verdict::Allow)], now);
            let mut u = flow(T0 + hour * H + 3 * H / 4, 2, Verdict::WouldDeny);
            u.path = NetPath::Underlay;
            u.src = "dev-1".into();
            h.record(&[u], now);
        }
        h.flush(now).unwrap();
        // The last flow of the current hour: not yet written.
        h.record(&[flow(now - 1, 3, Verdict::Deny)], now);
        let read = |raw: &str| {
            let q = Query::parse(raw, now).unwrap();
            let mut out = Vec::new();
            h.scan(&q, |a| {
                out.push((a.hour - T0 / 1000) / 3600);
                true
            })
            .unwrap();
            out
        };
        // The last 90 minutes: hour 3's flows of its last half, hour 4's, and the one in memory.
        assert_eq!(read("since=5400"), [3, 4, 4, 4]);
        // From 3 h to 1 h ago: hours 2 and 3; hour 4 began 1 h ago, its flows after.
        assert_eq!(read("since=10800&until=3600"), [2, 2, 3, 3]);
        assert_eq!(read("since=86400&path=underlay"), [0, 1, 2, 3, 4]);
        assert_eq!(read("since=86400&verdict=deny"), [4]);
        assert_eq!(read("since=86400&denied=1").len(), 6);
        assert_eq!(read("since=86400&identity=dev-1").len(), 5);
        assert_eq!(read("since=86400&identity=db-1").len(), 11);
        assert!(read("since=86400&identity=nobody").is_empty());
        // A reader that has had enough stops the scan.
        let mut n = 0;
        h.scan(&Query::parse("since=86400", now).unwrap(), |_| {
            n += 1;
            n < 3
        })
        .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let now = T0;
        for bad in [
            "",
            "since=",
            "since=-5",
            "since=abc",
            "since=0",
            "since=10&until=10",
            "since=10&until=20",
            "since=3600&path=sideways",
            "since=3600&verdict=maybe",
            "since=3600&limit=5",
            "since=99999999999999",
        ] {
            assert!(Query::parse(bad, now).is_err(), "{bad:?} was taken");
        }
        let q = Query::parse("since=3600&until=60&identity=web-1&path=overlay", now).unwrap();
        assert_eq!((q.from_ms, q.to_ms), (now - 3_600_000, now - 60_000));
        assert_eq!(q.identity.as_deref(), Some("web-1"));
        assert_eq!(q.path, Some(NetPath::Overlay));
    }

    #[test]
    fn the_file_is_private_from_creation() {
        use std::os::unix::fs::PermissionsExt;
        let d = Dir::new("mode");
        drop(d.open(Limits::default()));
        let mode = std::fs::metadata(d.0.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The disk a node-day takes: `NODES` simulated nodes for 24 hours, each reporting 50 kinds
    /// of flow an hour (30 admitted from 10 peers on 3 ports, 10 denied from elsewhere, 10
    /// would-deny on the underlay), every kind once a minute, written every 5 minutes (the
    /// controller writes every second: the same rows, more often; a debug build takes a minute
    /// for a day of per-minute commits). Prints the
    /// file's size per node-day and per aggregate (`-- --nocapture`); `BULKHEAD_NODE_DAYS=N`
    /// simulates N nodes instead of 10.
    #[test]
    fn disk_use_of_a_node_day() {
        use std::os::unix::fs::MetadataExt;
        let nodes: u32 = std::env::var("BULKHEAD_NODE_DAYS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10);
        let d = Dir::new("node-day");
        let h = d.open(Limits::default());
        let kinds: Vec<FlowView> = (0..nodes)
            .flat_map(|n| {
                let me = format!("app-{n}");
                let my_address = Ipv4Addr::from(0x0a64_0000 + n);
                (0..50u32).map(move |k| {
                    let (src, src_address, port, verdict, path, rule) = match k {
                        0..30 => (
                            format!("client-{}", k / 3),
                            Ipv4Addr::from(0x0a65_0000 + k / 3),
                            [443, 8443, 9100][k as usize % 3],
                            Verdict::Allow,
                            NetPath::Overlay,
                            Some("clients-to-app".to_string()),
                        ),
                        30..40 => (
                            "10.200.0.9".to_string(),
                            Ipv4Addr::new(10, 200, 0, 9),
                            20_000 + k as u16,
                            Verdict::Deny,
                            NetPath::Overlay,
                            None,
                        ),
                        _ => (
                            format!("scanner-{k}"),
                            Ipv4Addr::new(192, 0, 2, k as u8),
                            22,
                            Verdict::WouldDeny,
                            NetPath::Underlay,
                            None,
                        ),
                    };
                    FlowView {
                        at: 0,
                        node: me.clone(),
                        src,
                        src_address,
                        dst: me.clone(),
                        dst_address: my_address,
                        proto: Protocol::Tcp,
                        port,
                        verdict,
                        path,
                        rule,
                        reason: None,
                    }
                })
            })
            .collect();
        let mut minute: Vec<FlowView> = kinds.clone();
        for m in 0..24 * 60 {
            let now = T0 + m * 60_000;
            for f in &mut minute {
                f.at = now;
            }
            h.record(&minute, now);
            if m % 5 == 4 {
                h.flush(now).unwrap();
            }
        }
        let rows = h.rows();
        assert_eq!(rows, u64::from(nodes) * 50 * 24);
        drop(h);
        let meta = std::fs::metadata(d.0.join(FILE)).unwrap();
        let (size, on_disk) = (meta.len(), meta.blocks() * 512);
        let per_day = on_disk / u64::from(nodes);
        println!(
            "flow history: {nodes} node-days, {rows} aggregates: file {size} bytes, {on_disk} on disk; \
             {per_day} bytes per node-day, {} per aggregate",
            on_disk / rows
        );
        // A node-day's 1,200 aggregates fit in well under a megabyte.
        assert!(
            on_disk / rows < 400,
            "{} bytes per aggregate",
            on_disk / rows
        );
    }

    #[test]
    fn keys_read_back_as_written() {
        let mut f = flow(T0, 443, Verdict::WouldDeny);
        f.path = NetPath::Underlay;
        f.rule = Some("r".repeat(64));
        f.src = "192.0.2.7".into();
        let k = key_of(T0 / 1000, &f);
        let a = decode(&k, Tally::one(T0)).unwrap();
        assert_eq!(
            (
                a.hour,
                a.src.as_str(),
                a.dst.as_str(),
                a.port,
                a.verdict,
                a.path
            ),
            (
                T0 / 1000,
                "192.0.2.7",
                "db-1",
                443,
                Verdict::WouldDeny,
                NetPath::Underlay
            )
        );
        assert_eq!(a.rule, f.rule);
        assert!(decode(&k[..k.len() - 1], Tally::one(0)).is_none());
        assert_eq!(Tally::decode(&Tally::one(5).encode()), Some(Tally::one(5)));
        assert_eq!(hour_of(-1), -3600, "never kept, but never a panic");
    }
}
