//! The flow log, as the controller keeps it, and automatic quarantine.
//!
//! Nodes ship their flow starts and denied new flows in batches. This controller keeps the last
//! `--flow-history` of them (default 100,000; about 200 bytes each) in memory, in a ring: the
//! oldest go first, and a restart starts empty. They are not in the store: they are many, they
//! change nothing, and etcd wants small, few writes. `bulkhead flows` reads this ring (and, with
//! `--follow`, what arrives next).
//!
//! Each denied new flow counts against its initiator, at the time this controller receives it
//! (nodes' clocks are not trusted to agree; batches ship every second). An identity with more
//! than the policy's `quarantine.denied_per_minute` within the minute (the current second and
//! the 59 before) is quarantined for `quarantine.duration`, through the same path as
//! `bulkhead quarantine` (so it is audited).
//!
//! With several controllers the count is the cluster's: nodes report to different controllers
//! (a compromised node's attempts are denied by its peers, each reporting where it is
//! connected), so every second each controller writes its per-second counts of each initiator
//! to `denials/<identity>/<controller id>` when they grew ([`share_denials`]), and decides on
//! its own count plus everyone else's. Creating the quarantine record only if absent makes it
//! happen once. Once an identity is quarantined, every controller starts its count over.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::Mutex;

use bulkhead_proto::{FlowBatch, FlowView, QuarantineRequest};
use bulkhead_store::Op;
use tokio::sync::broadcast;

use crate::Controller;
use crate::records::{self, DENIALS, DenialRecord};
use crate::view::lock;

/// Default number of flows kept.
pub const DEFAULT_HISTORY: usize = 100_000;

/// The ring and the counters.
#[derive(Debug)]
pub struct Flows {
    cap: usize,
    ring: Mutex<VecDeque<FlowView>>,
    /// Denied new flows per initiator, their times within the window.
    denials: Mutex<HashMap<String, VecDeque<i64>>>,
    /// New flows for followers.
    pub live: broadcast::Sender<FlowView>,
    /// Entries nodes dropped because their buffers were full (reported in their batches).
    pub dropped_by_nodes: std::sync::atomic::AtomicU64,
}

impl Flows {
    /// A ring of `cap` flows.
    pub fn new(cap: usize) -> Flows {
        Flows {
            cap: cap.max(1),
            ring: Mutex::new(VecDeque::new()),
            denials: Mutex::default(),
            live: broadcast::channel(4096).0,
            dropped_by_nodes: Default::default(),
        }
    }

    fn add(&self, f: FlowView) {
        let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= self.cap {
            r.pop_front();
        }
        r.push_back(f.clone());
        drop(r);
        let _ = self.live.send(f);
    }

    /// Flows kept now.
    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none are kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `limit` flows that `keep` selects, oldest first.
    pub fn recent(&self, limit: usize, keep: impl Fn(&FlowView) -> bool) -> Vec<FlowView> {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<FlowView> = r
            .iter()
            .rev()
            .filter(|f| keep(f))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Counts a denial by `initiator` at `at`; returns how many it has in the window.
    fn denied(&self, initiator: &str, at: i64) -> usize {
        let mut d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        let q = d.entry(initiator.to_string()).or_default();
        q.push_back(at);
        while q.front().is_some_and(|&t| !records::in_minute(at, t)) {
            q.pop_front();
        }
        q.len()
    }

    /// Each initiator's denials in the minute before `now_ms`, per second; initiators with
    /// none left are forgotten.
    fn per_second(&self, now_ms: i64) -> HashMap<String, DenialRecord> {
        let mut d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|_, q| {
            q.retain(|&t| records::in_minute(now_ms, t));
            !q.is_empty()
        });
        d.iter()
            .map(|(id, q)| {
                let mut by_second: Vec<i64> = q.iter().map(|t| t.div_euclid(1000)).collect();
                by_second.sort_unstable();
                let mut seconds: Vec<(i64, u32)> = Vec::new();
                for s in by_second {
                    match seconds.last_mut() {
                        Some((last, n)) if *last == s => *n += 1,
                        _ => seconds.push((s, 1)),
                    }
                }
                (id.clone(), DenialRecord { seconds })
            })
            .collect()
    }

    /// Forgets an identity's denials (it was quarantined: counting starts over).
    fn reset(&self, initiator: &str) {
        self.denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(initiator);
    }
}

impl Controller {
    /// Takes a node's batch: names both ends, keeps the flows, counts denials, quarantines
    /// whoever crosses the policy's threshold.
    pub async fn flows_from(&self, node: &str, batch: FlowBatch) {
        if batch.dropped > 0 {
            self.flows
                .dropped_by_nodes
                .fetch_add(batch.dropped, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(node, dropped = batch.dropped, "node's flow log overflowed");
        }
        let mut over: Vec<(String, u64)> = Vec::new();
        let (threshold, views) = {
            let v = lock(&self.view);
            let live = v.live();
            let model = live.as_ref().map(|l| &l.model);
            let address_of = |name: &str| {
                model
                    .and_then(|m| m.identity(name).map(|i| m.address(i)))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED)
            };
            // Entries without a peer name (not a peer) are named by address: one index per
            // batch, only if the batch needs it.
            let mut by_address: Option<HashMap<Ipv4Addr, String>> = None;
            let mut name_of = |addr: Ipv4Addr| {
                by_address
                    .get_or_insert_with(|| {
                        model.map_or_else(HashMap::new, |m| {
                            m.identity_ids()
                                .map(|i| (m.address(i), m.identity_name(i).to_string()))
                                .collect()
                        })
                    })
                    .get(&addr)
                    .cloned()
                    .unwrap_or_else(|| addr.to_string())
            };
            let threshold = model.and_then(|m| m.policy().quarantine.map(|q| q.denied_per_minute));
            let now = crate::ops::unix_ms();
            let quarantined: Vec<String> = v
                .records()
                .quarantined(crate::ops::unix_now())
                .map(|(id, _)| id.clone())
                .collect();
            let me = (node.to_string(), address_of(node));
            let views: Vec<FlowView> = batch
                .flows
                .into_iter()
                .map(|e| {
                    let peer = (
                        e.peer.clone().unwrap_or_else(|| name_of(e.peer_address)),
                        e.peer_address,
                    );
                    let (src, dst) = if e.outbound {
                        (me.clone(), peer)
                    } else {
                        (peer, me.clone())
                    };
                    FlowView {
                        at: e.at,
                        node: node.to_string(),
                        src: src.0,
                        src_address: src.1,
                        dst: dst.0,
                        dst_address: dst.1,
                        proto: e.proto,
                        port: e.port,
                        verdict: if e.allowed { "allow" } else { "deny" }.into(),
                        rule: e.rule,
                        reason: e.reason,
                    }
                })
                .collect();
            if let Some(t) = threshold {
                for f in views.iter().filter(|f| f.verdict == "deny") {
                    if quarantined.contains(&f.src)
                        || model.and_then(|m| m.identity(&f.src)).is_none()
                    {
                        continue;
                    }
                    // Counted when received: node clocks need not agree with ours or each
                    // other (batches ship every second).
                    let n = self.flows.denied(&f.src, now) as u64
                        + v.records().others_denials(&f.src, &self.id, now);
                    if n > u64::from(t) && !over.iter().any(|(s, _)| *s == f.src) {
                        over.push((f.src.clone(), n));
                    }
                }
            }
            (threshold, views)
        };
        for f in views {
            self.flows.add(f);
        }
        for (id, n) in over {
            self.auto_quarantine(&id, n, threshold.unwrap_or(0)).await;
        }
    }

    /// Quarantines `id` for crossing the threshold, unless it already is (another controller,
    /// or this one a moment ago, got there first).
    async fn auto_quarantine(&self, id: &str, n: u64, threshold: u32) {
        self.flows.reset(id);
        let reason = format!("{n} denied new flows in a minute (threshold {threshold})");
        let req = QuarantineRequest::default();
        let by = crate::ops::Actor::Controller;
        match self.quarantine(id, &req, &by, &reason, true).await {
            Ok(_) => {}
            Err(crate::ops::Error::Conflict(_)) => {
                tracing::debug!(identity = %id, "already quarantined");
            }
            Err(f) => tracing::error!(identity = %id, "automatic quarantine failed: {f}"),
        }
    }
}

/// Every second: shares this controller's denial counts through the store (when they grew, and
/// a delete once none are left), removes what controllers that are gone left behind, starts the
/// count over for quarantined identities, and quarantines whoever everyone's counts together put
/// over the threshold.
pub async fn share_denials(c: Arc<Controller>) {
    // What a previous run of this controller left behind: its counts were in its memory.
    let mine = format!("/{}", c.id);
    if let Ok(r) = c.store.range(DENIALS).await {
        let stale: Vec<Op> = r
            .kvs
            .into_iter()
            .filter(|kv| kv.key.ends_with(&mine))
            .map(|kv| Op::Delete(kv.key))
            .collect();
        for group in stale.chunks(64) {
            if let Err(e) = c.store.txn(&[], group).await {
                tracing::warn!(error = %e, "cannot remove old denial counts");
            }
        }
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut written: HashMap<String, DenialRecord> = HashMap::new();
    loop {
        tick.tick().await;
        let now = crate::ops::unix_ms();
        let (threshold, quarantined) = {
            let v = lock(&c.view);
            let t = v
                .live()
                .and_then(|l| l.model.policy().quarantine.map(|q| q.denied_per_minute));
            let q: HashSet<String> = v
                .records()
                .quarantined(now.div_euclid(1000))
                .map(|(id, _)| id.clone())
                .collect();
            (t, q)
        };
        for id in &quarantined {
            c.flows.reset(id);
        }
        let mine = c.flows.per_second(now);
        let key = |id: &str| format!("{DENIALS}{id}/{}", c.id);
        let mut ops: Vec<Op> = mine
            .iter()
            .filter(|(id, r)| {
                written
                    .get(*id)
                    .is_none_or(|w| w.within(now) != r.within(now))
            })
            .map(|(id, r)| Op::Put(key(id), records::encode(r)))
            .collect();
        ops.extend(
            written
                .keys()
                .filter(|id| !mine.contains_key(*id))
                .map(|id| Op::Delete(key(id))),
        );
        // The counts of controllers that are gone for good (no longer registered, nothing
        // within the minute): nobody else would delete them.
        {
            let v = lock(&c.view);
            let records = v.records();
            for (id, by) in &records.denials {
                for (ctl, r) in by {
                    let live = records
                        .controllers
                        .contains_key(&format!("{}{ctl}", records::CONTROLLERS));
                    if !live && r.within(now) == 0 {
                        ops.push(Op::Delete(format!("{DENIALS}{id}/{ctl}")));
                    }
                }
            }
        }
        let mut ok = true;
        for group in ops.chunks(64) {
            if let Err(e) = c.store.txn(&[], group).await {
                tracing::warn!(error = %e, "cannot share denial counts");
                ok = false;
                break;
            }
        }
        if ok {
            written.clone_from(&mine);
        } else {
            // Some writes may have failed: write all of ours again next time, and keep every
            // key that may exist so that it is deleted once it has nothing left.
            for id in mine.keys() {
                written.insert(id.clone(), DenialRecord::default());
            }
        }
        let Some(t) = threshold else {
            continue;
        };
        let over: Vec<(String, u64)> = {
            let v = lock(&c.view);
            let Some(live) = v.live() else {
                continue;
            };
            let records = v.records();
            let candidates: BTreeSet<&String> = mine.keys().chain(records.denials.keys()).collect();
            candidates
                .into_iter()
                .filter(|id| !quarantined.contains(*id) && live.model.identity(id).is_some())
                .map(|id| {
                    let n = mine.get(id).map_or(0, |r| r.within(now))
                        + records.others_denials(id, &c.id, now);
                    (id.clone(), n)
                })
                .filter(|(_, n)| *n > u64::from(t))
                .collect()
        };
        for (id, n) in over {
            c.auto_quarantine(&id, n, t).await;
        }
    }
}

/// Shared ring, for the API.
pub type Shared = Arc<Flows>;

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: i64, verdict: &str) -> FlowView {
        FlowView {
            at: i,
            node: "n".into(),
            src: "a".into(),
            src_address: Ipv4Addr::LOCALHOST,
            dst: "b".into(),
            dst_address: Ipv4Addr::LOCALHOST,
            proto: "tcp".into(),
            port: 1,
            verdict: verdict.into(),
            rule: None,
            reason: None,
        }
    }

    #[test]
    fn the_ring_is_bounded_and_denials_slide() {
        let f = Flows::new(3);
        for i in 0..5 {
            f.add(flow(i, if i % 2 == 0 { "deny" } else { "allow" }));
        }
        let all = f.recent(10, |_| true);
        assert_eq!(all.iter().map(|f| f.at).collect::<Vec<_>>(), [2, 3, 4]);
        let denied = f.recent(10, |f| f.verdict == "deny");
        assert_eq!(denied.iter().map(|f| f.at).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(f.recent(1, |_| true)[0].at, 4, "the newest");
        assert_eq!(f.denied("a", 0), 1);
        assert_eq!(f.denied("a", 30_000), 2);
        assert_eq!(f.denied("a", 61_000), 2, "the first left the window");
        f.reset("a");
        assert_eq!(f.denied("a", 61_001), 1);
        // The window is the current second and the 59 before, as for shared counts.
        assert_eq!(f.denied("b", 0), 1);
        assert_eq!(f.denied("b", 59_999), 2);
        assert_eq!(f.denied("b", 60_000), 2, "second 0 left at second 60");
        let shared = &f.per_second(60_000)["b"];
        assert_eq!(shared.within(60_000), 2);
    }

    #[test]
    fn shared_counts_are_per_second_and_age_out() {
        let f = Flows::new(10);
        // Batches from two nodes arrive out of order.
        for at in [10_100, 10_900, 12_000, 10_500, 69_000] {
            f.denied("web-1", at);
        }
        let r = &f.per_second(69_500)["web-1"];
        assert_eq!(r.seconds, [(10, 3), (12, 1), (69, 1)]);
        assert_eq!(r.within(69_500), 5);
        assert_eq!(r.within(70_000), 2, "second 10 is a minute old");
        assert_eq!(r.within(128_999), 1);
        assert_eq!(r.within(129_000), 0);
        // Once nothing is left in the window, the initiator is forgotten.
        assert!(f.per_second(200_000).is_empty());
    }
}
