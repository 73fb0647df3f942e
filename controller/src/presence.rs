//! Node presence, shared by every controller through the store.
//!
//! The controller holding a node's stream owns its `presence/<identity>` record: it writes it
//! when the stream opens and closes, when a report changes something shown (revision, status,
//! version), and at least every [`HEARTBEAT`] while the node reports. Writes are batched by one
//! task, off the request path, so a thousand nodes acknowledging an apply cost a few
//! transactions, not a thousand.
//!
//! Two controllers can both believe they hold a node (it moved, and the old stream has not
//! noticed yet). The old one's "offline" write is fenced by the record's revision: it only
//! lands if the record is still the one this controller wrote last, so it never overwrites the
//! new controller's "online". A controller that dies leaves `online: true` behind; readers show
//! a node online only while the record's controller is itself live (`controllers/`), and a
//! controller that restarts marks its leftovers offline before anything else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_proto::Report;
use bulkhead_store::{Compare, Op, Revision};
use tokio::sync::Notify;

use crate::Controller;
use crate::ops::unix_now;
use crate::records::{self, PRESENCE, PresenceRecord};
use crate::view::lock;

/// While a node reports, its record's `last_seen` is refreshed at least this often (seconds).
pub const HEARTBEAT: i64 = 30;
/// Most writes per transaction (etcd's default limit is 128 operations).
const BATCH: usize = 100;

/// This controller's side of presence: the nodes whose streams it holds.
#[derive(Debug)]
pub struct Tracker {
    url: String,
    local: Mutex<HashMap<String, Local>>,
    wake: Notify,
}

#[derive(Debug)]
struct Local {
    streams: usize,
    record: PresenceRecord,
    /// What this controller last wrote, and at which store revision.
    written: Option<(PresenceRecord, Revision)>,
    dirty: bool,
}

impl Tracker {
    /// A tracker for the controller advertising `url`.
    pub fn new(url: &str) -> Tracker {
        Tracker {
            url: url.to_string(),
            local: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn edit(&self, identity: &str, f: impl FnOnce(&mut Local, i64)) {
        let now = unix_now();
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let l = m.entry(identity.to_string()).or_insert_with(|| Local {
            streams: 0,
            record: PresenceRecord {
                controller: self.url.clone(),
                online: false,
                since: now,
                last_seen: now,
                revision: None,
                digest: None,
                status: None,
                version: String::new(),
                facts: Default::default(),
                underlay: None,
            },
            written: None,
            dirty: false,
        });
        let before = l.record.clone();
        f(l, now);
        // Facts count as failing three intervals after the last report seen in the store: a
        // node with short-interval checks is refreshed more often than the heartbeat.
        let every = l
            .record
            .facts
            .values()
            .map(|f| i64::try_from(f.interval).unwrap_or(i64::MAX).max(1))
            .min()
            .unwrap_or(HEARTBEAT)
            .min(HEARTBEAT);
        let stale = l
            .written
            .as_ref()
            .is_none_or(|(w, _)| now - w.last_seen >= every);
        if l.record != before && (stale || !same_but_time(&l.record, &before)) {
            l.dirty = true;
            drop(m);
            self.wake.notify_one();
        }
    }

    /// Streams `identity` has open here.
    pub fn streams_of(&self, identity: &str) -> usize {
        let m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        m.get(identity).map_or(0, |l| l.streams)
    }

    /// Nodes with a stream open here.
    pub fn streams(&self) -> usize {
        let m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        m.values().filter(|l| l.streams > 0).count()
    }

    /// A stream opened.
    pub fn connected(&self, identity: &str) {
        self.edit(identity, |l, now| {
            if l.streams == 0 {
                l.record.since = now;
            }
            l.streams += 1;
            l.record.online = true;
            l.record.last_seen = now;
        });
    }

    /// A stream closed.
    pub fn disconnected(&self, identity: &str) {
        self.edit(identity, |l, now| {
            l.streams = l.streams.saturating_sub(1);
            l.record.online = l.streams > 0;
            l.record.last_seen = now;
        });
    }

    /// A report arrived on a stream's connection.
    pub fn reported(&self, identity: &str, r: &Report) {
        self.edit(identity, |l, now| {
            l.record.last_seen = now;
            l.record.revision = r.revision;
            l.record.digest.clone_from(&r.digest);
            l.record.status = Some(r.status.clone());
            l.record.version.clone_from(&r.version);
            l.record.facts.clone_from(&r.facts);
            l.record.underlay = r.underlay;
        });
    }

    /// The records to write now, marked clean.
    fn take(&self) -> Vec<(String, PresenceRecord, Option<Revision>)> {
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        m.iter_mut()
            .filter(|(_, l)| l.dirty)
            .map(|(id, l)| {
                l.dirty = false;
                (
                    id.clone(),
                    l.record.clone(),
                    l.written.as_ref().map(|w| w.1),
                )
            })
            .collect()
    }

    fn written(&self, id: &str, rec: PresenceRecord, rev: Option<Revision>) {
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = m.get_mut(id) else { return };
        match rev {
            None => l.dirty = true,
            // Offline and nothing opened since: forget it.
            Some(_) if !rec.online && l.streams == 0 && !l.dirty => {
                m.remove(id);
            }
            Some(rev) => l.written = Some((rec, rev)),
        }
    }
}

/// Equal apart from `last_seen`.
fn same_but_time(a: &PresenceRecord, b: &PresenceRecord) -> bool {
    *a == PresenceRecord {
        last_seen: a.last_seen,
        ..b.clone()
    }
}

/// Writes presence forever. First marks offline what a previous run of this controller left
/// online; then, every 100 ms or when woken, writes what changed.
pub async fn run(c: Arc<Controller>) {
    let t = &c.presence;
    let leftovers: Vec<(String, Revision)> = lock(&c.view)
        .records()
        .presence
        .iter()
        .filter(|(_, (r, _))| r.online && r.controller == t.url)
        .map(|(id, (_, rev))| (id.clone(), *rev))
        .collect();
    for (id, rev) in leftovers {
        if t.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
        {
            continue;
        }
        let key = format!("{PRESENCE}{id}");
        let Ok(Some(kv)) = c.store.get(&key).await else {
            continue;
        };
        let Ok(mut rec) = records::decode::<PresenceRecord>(&key, &kv.value) else {
            continue;
        };
        if kv.mod_revision != rev {
            continue;
        }
        rec.online = false;
        let _ = c
            .store
            .txn(
                &[Compare::ModRevision(key.clone(), rev)],
                &[Op::Put(key, records::encode(&rec))],
            )
            .await;
    }
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(100), t.wake.notified()).await;
        // Let a burst (a thousand reports after an apply) gather into few transactions.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let todo = t.take();
        let (online, offline): (Vec<_>, Vec<_>) = todo.into_iter().partition(|(_, r, _)| r.online);
        for chunk in online.chunks(BATCH) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|(id, r, _)| Op::Put(format!("{PRESENCE}{id}"), records::encode(r)))
                .collect();
            let rev = bulkhead_store::put(&*c.store, &ops).await;
            if rev.is_ok() {
                for (id, r, _) in chunk {
                    t.written(id, r.clone(), rev.as_ref().ok().copied());
                }
                continue;
            }
            // One by one, so that a record the store refuses fails alone, not its batch.
            for ((id, r, _), op) in chunk.iter().zip(ops) {
                let rev = bulkhead_store::put(&*c.store, &[op]).await;
                if let Err(e) = &rev {
                    tracing::warn!(identity = %id, error = %e, "cannot write presence; retrying");
                }
                t.written(id, r.clone(), rev.ok());
            }
        }
        // Fenced: only over the record this controller wrote last, or over one that no live
        // controller holds (a report that came without a stream).
        for (id, r, last) in offline {
            let key = format!("{PRESENCE}{id}");
            let fence = {
                let v = lock(&c.view);
                match v.records().presence.get(&id) {
                    None => Some(last.unwrap_or(0)),
                    Some((s, rev)) if s.controller == t.url || !v.online(&id) => {
                        Some(last.unwrap_or(0).max(*rev))
                    }
                    Some(_) => None,
                }
            };
            let Some(fence) = fence else {
                t.written(&id, r, Some(0));
                continue;
            };
            let res = c
                .store
                .txn(
                    &[Compare::ModRevision(key.clone(), fence)],
                    &[Op::Put(key, records::encode(&r))],
                )
                .await;
            match res {
                Ok(txn) => {
                    if !txn.succeeded {
                        tracing::debug!(identity = %id, "presence taken over by another controller");
                    }
                    t.written(&id, r, Some(txn.revision));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write presence; retrying");
                    t.written(&id, r, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rev: u64) -> Report {
        Report {
            endpoint: None,
            listen_port: 1,
            revision: Some(rev),
            digest: None,
            status: "ok".into(),
            peers: 0,
            version: "1".into(),
            facts: Default::default(),
            underlay: None,
        }
    }

    #[test]
    fn only_what_is_shown_makes_a_write() {
        let t = Tracker::new("https://a:1");
        t.connected("n");
        let w = t.take();
        assert_eq!(w.len(), 1);
        assert!(w[0].1.online);
        t.written("n", w[0].1.clone(), Some(5));
        t.reported("n", &report(1));
        let w = t.take();
        assert_eq!(w[0].1.revision, Some(1));
        t.written("n", w[0].1.clone(), Some(6));
        // The same report again, within the heartbeat: nothing to write.
        t.reported("n", &report(1));
        assert!(t.take().is_empty());
        t.reported("n", &report(2));
        assert_eq!(t.take().len(), 1);
        // A failed write is retried.
        let rec = t.local.lock().unwrap()["n"].record.clone();
        t.written("n", rec, None);
        assert_eq!(t.take().len(), 1);
        // Two streams (a reconnect racing the old one): one closing leaves it online.
        t.connected("n");
        t.disconnected("n");
        assert!(t.local.lock().unwrap()["n"].record.online);
        t.disconnected("n");
        let w = t.take();
        assert!(!w[0].1.online);
        t.written("n", w[0].1.clone(), Some(9));
        assert!(t.local.lock().unwrap().is_empty(), "forgotten once offline");
    }
}
