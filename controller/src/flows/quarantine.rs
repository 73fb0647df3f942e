//! Automatic quarantine: denied new flows counted per initiator, shared between controllers,
//! and the one rule that decides.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bulkhead_proto::QuarantineRequest;
use bulkhead_store::Op;

use crate::Controller;
use crate::ops::{Actor, Error};
use crate::records::{self, DENIALS, DenialRecord, Tally};
use crate::view::{Live, View, lock};

/// One denied new flow: when it was counted, and the peer that reported it (`None`: the
/// initiator's own node did).
type Denial = (i64, Option<String>);

/// Denied new flows per initiator: their times within the window, and who reported them.
#[derive(Debug, Default)]
pub(super) struct Denials(Mutex<HashMap<String, VecDeque<Denial>>>);

/// `(unix second, count)` runs of millisecond times.
fn per_second(mut times: Vec<i64>) -> Vec<(i64, u32)> {
    times.sort_unstable();
    let mut seconds: Vec<(i64, u32)> = Vec::new();
    for s in times.into_iter().map(|t| t.div_euclid(1000)) {
        match seconds.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => seconds.push((s, 1)),
        }
    }
    seconds
}

impl Denials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Denial>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a denial of `initiator` at `at`, reported by `witness` (a peer) or by the
    /// initiator's own node; returns its tally in the window.
    pub(super) fn denied(&self, initiator: &str, witness: Option<&str>, at: i64) -> Tally {
        let mut d = self.lock();
        let q = d.entry(initiator.to_string()).or_default();
        q.push_back((at, witness.map(str::to_string)));
        while q.front().is_some_and(|(t, _)| !records::in_minute(at, *t)) {
            q.pop_front();
        }
        let mut tally = Tally::default();
        for (_, w) in q.iter() {
            match w {
                None => tally.own += 1,
                Some(w) => *tally.witnesses.entry(w.clone()).or_default() += 1,
            }
        }
        tally
    }

    /// Each initiator's denials in the minute before `now_ms`, per second; initiators with
    /// none left are forgotten.
    fn per_second(&self, now_ms: i64) -> HashMap<String, DenialRecord> {
        let mut d = self.lock();
        d.retain(|_, q| {
            q.retain(|(t, _)| records::in_minute(now_ms, *t));
            !q.is_empty()
        });
        d.iter()
            .map(|(id, q)| {
                let own = q.iter().filter(|(_, w)| w.is_none()).map(|(t, _)| *t);
                let mut by_witness: BTreeMap<String, Vec<i64>> = BTreeMap::new();
                for (t, w) in q {
                    if let Some(w) = w {
                        by_witness.entry(w.clone()).or_default().push(*t);
                    }
                }
                let record = DenialRecord {
                    seconds: per_second(own.collect()),
                    witnesses: by_witness
                        .into_iter()
                        .map(|(w, times)| (w, per_second(times)))
                        .collect(),
                };
                (id.clone(), record)
            })
            .collect()
    }

    /// Forgets an identity's denials (it was quarantined: counting starts over).
    fn reset(&self, initiator: &str) {
        self.lock().remove(initiator);
    }
}

/// The automatic-quarantine rule as the view has it at one moment: the one place that says
/// whose denials count and when they are too many.
pub(super) struct Rule<'a> {
    /// The policy's `quarantine.denied_per_minute`.
    pub threshold: u32,
    live: Arc<Live>,
    view: &'a View,
    me: &'a str,
    now_ms: i64,
    quarantined: HashSet<String>,
}

impl<'a> Rule<'a> {
    /// The rule now, if the live policy has one. `me` is this controller's id: its own counts
    /// are the caller's, everyone else's come from the view.
    pub(super) fn now(view: &'a View, me: &'a str, now_ms: i64) -> Option<Rule<'a>> {
        let live = view.live()?;
        let threshold = live.model.policy().quarantine?.denied_per_minute;
        let quarantined = view
            .records()
            .quarantined(now_ms.div_euclid(1000))
            .map(|(id, _)| id.clone())
            .collect();
        Some(Rule {
            threshold,
            live,
            view,
            me,
            now_ms,
            quarantined,
        })
    }

    /// Whether denials of `id` count: it is in the policy, and not quarantined already.
    pub(super) fn counts(&self, id: &str) -> bool {
        !self.quarantined.contains(id) && self.live.model.identity(id).is_some()
    }

    /// The cluster's count of `id`'s denials ([`Tally::total`]), if it is over the threshold:
    /// `here` counted by this controller, the rest by the others.
    pub(super) fn over(&self, id: &str, here: &Tally) -> Option<u64> {
        if !self.counts(id) {
            return None;
        }
        let mut all = self.view.records().others_denials(id, self.me, self.now_ms);
        all.add(here);
        let n = all.total(self.threshold);
        (n > u64::from(self.threshold)).then_some(n)
    }
}

impl Controller {
    /// Quarantines `id` for crossing the threshold, unless it already is (another controller,
    /// or this one a moment ago, got there first).
    pub(super) async fn auto_quarantine(&self, id: &str, n: u64, threshold: u32) {
        self.flows.denials.reset(id);
        let reason = format!("{n} denied new flows in a minute (threshold {threshold})");
        let req = QuarantineRequest::default();
        match self
            .quarantine(id, &req, &Actor::Controller, &reason, true)
            .await
        {
            Ok(_) => {}
            Err(Error::Conflict(_)) => {
                tracing::debug!(identity = %id, "already quarantined");
            }
            Err(e) => tracing::error!(identity = %id, "automatic quarantine failed: {e}"),
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
        let quarantined: HashSet<String> = lock(&c.view)
            .records()
            .quarantined(now.div_euclid(1000))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &quarantined {
            c.flows.denials.reset(id);
        }
        let mine = c.flows.denials.per_second(now);
        let key = |id: &str| format!("{DENIALS}{id}/{}", c.id);
        let mut ops: Vec<Op> = mine
            .iter()
            .filter(|(id, r)| {
                written
                    .get(*id)
                    .is_none_or(|w| w.tally(now) != r.tally(now))
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
                    if !live && r.tally(now) == Tally::default() {
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
        let (threshold, over) = {
            let v = lock(&c.view);
            let Some(rule) = Rule::now(&v, &c.id, now) else {
                continue;
            };
            let candidates: BTreeSet<&String> =
                mine.keys().chain(v.records().denials.keys()).collect();
            let over: Vec<(String, u64)> = candidates
                .into_iter()
                .filter_map(|id| {
                    let here = mine.get(id).map(|r| r.tally(now)).unwrap_or_default();
                    rule.over(id, &here).map(|n| (id.clone(), n))
                })
                .collect();
            (rule.threshold, over)
        };
        for (id, n) in over {
            c.auto_quarantine(&id, n, threshold).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_slide() {
        let f = Denials::default();
        let own = |f: &Denials, id: &str, at: i64| f.denied(id, None, at).own;
        assert_eq!(own(&f, "a", 0), 1);
        assert_eq!(own(&f, "a", 30_000), 2);
        assert_eq!(own(&f, "a", 61_000), 2, "the first left the window");
        f.reset("a");
        assert_eq!(own(&f, "a", 61_001), 1);
        // The window is the current second and the 59 before, as for shared counts.
        assert_eq!(own(&f, "b", 0), 1);
        assert_eq!(own(&f, "b", 59_999), 2);
        assert_eq!(own(&f, "b", 60_000), 2, "second 0 left at second 60");
        let shared = &f.per_second(60_000)["b"];
        assert_eq!(shared.within(60_000), 2);
    }

    #[test]
    fn shared_counts_are_per_second_and_age_out() {
        let f = Denials::default();
        // Batches from two nodes arrive out of order.
        for at in [10_100, 10_900, 12_000, 10_500, 69_000] {
            f.denied("web-1", None, at);
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

    #[test]
    fn a_peer_s_reports_count_apart_and_only_up_to_half_the_threshold() {
        let f = Denials::default();
        for i in 0..200 {
            f.denied("db-1", Some("dev-1"), 1_000 + i);
        }
        let t = f.denied("db-1", None, 1_500);
        assert_eq!((t.own, t.witnesses["dev-1"]), (1, 200));
        assert_eq!(t.total(50), 1 + 25, "one witness counts at most 25 of 50");
        let r = &f.per_second(2_000)["db-1"];
        assert_eq!(r.tally(2_000), t, "shared as counted");
        // Two more witnesses: 25 + 25 + 25 + 1.
        let mut all = t.clone();
        all.add(&Tally {
            own: 0,
            witnesses: [("web-1".to_string(), 30), ("web-2".to_string(), 30)].into(),
        });
        assert_eq!(all.total(50), 76);
    }
}
