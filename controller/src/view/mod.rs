//! The controller's in-memory view of the store, and distribution.
//!
//! The store is the only truth: API calls write to it, and this view changes only by following
//! the store's watch ([`sync`]). So a controller restart, or (with etcd) a write made through
//! another controller, reaches the nodes by the same path as a local one.
//!
//! Rooms:
//! - [`mirror`]: the records as the store holds them, behind one key router;
//! - [`conditions`]: failing posture checks and quarantines at a time (pure);
//! - [`live`]: the live policy, compiled, and its allowlists, made off the lock by a job;
//! - [`distribute`]: where a node's `NodeConfig` is assembled, and the per-identity channels;
//! - [`follow`]: the task that follows the store, the view's only writer.
//!
//! Readers lock the view briefly and copy out what they need (an `Arc` of the live policy is
//! one pointer); nothing heavy happens under the lock: a full compile runs without it.

mod conditions;
mod distribute;
mod follow;
mod live;
mod mirror;
mod underlay;

use std::collections::BTreeSet;
use std::sync::Arc;

use bulkhead_proto::NodeMessage;
use bulkhead_store::{Event, KeyValue};
use tokio::sync::watch;

pub use conditions::{Fresh, Inputs, STALE_AFTER_INTERVALS, posture};
pub use follow::sync;
pub use live::Live;
pub use mirror::Mirror;
pub use underlay::{api_address, ipv4};

use distribute::Channels;
use live::{Allowlists, Job, Outcome};
use mirror::Touched;

use crate::records::{POLICY, PolicyHead, PolicyRecord};

/// The view.
#[derive(Debug, Default)]
pub struct View {
    mirror: Mirror,
    live: Option<Arc<Live>>,
    /// Shared with a job that may be computing the next ones off the lock.
    allowlists: Arc<Allowlists>,
    channels: Channels,
    /// Raised whenever credentials change, so that open streams re-check theirs.
    cred_generation: u64,
    /// A policy this controller is committing, already compiled, for the view to take when the
    /// store confirms it (instead of compiling it a second time).
    prepared: Option<Live>,
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl View {
    /// The records the controller follows.
    pub fn records(&self) -> &Mirror {
        &self.mirror
    }

    /// The live policy, if any: a snapshot to use after letting go of the lock.
    pub fn live(&self) -> Option<Arc<Live>> {
        self.live.clone()
    }

    /// The revision of the live policy, 0 if none.
    pub fn revision(&self) -> u64 {
        self.live.as_ref().map_or(0, |l| l.record.revision)
    }

    /// The generation of credentials: raised whenever they change.
    pub fn cred_generation(&self) -> u64 {
        self.cred_generation
    }

    /// Whether a node's stream is open at a live controller.
    pub fn online(&self, identity: &str) -> bool {
        self.mirror.online(identity)
    }

    /// Whether an enrolled node reports enforcing the allowlist the live policy gives it now:
    /// by digest, which tells apart allowlists that conditions changed under one revision; by
    /// revision for a daemon that reports no digest.
    pub fn in_sync(&self, identity: &str) -> bool {
        let reported = self.mirror.presence.get(identity).map(|p| &p.0);
        let want = self.allowlists.get(identity);
        self.mirror.nodes.contains_key(identity)
            && match (want, reported) {
                (None, r) => r.and_then(|r| r.revision).is_none(),
                (Some(_), None) => false,
                (Some(l), Some(r)) => match &r.digest {
                    Some(d) if !l.digest.is_empty() => *d == l.digest,
                    _ => r.revision == Some(l.revision),
                },
            }
    }

    /// The allowlist the live policy gives `identity` now.
    pub fn allowlist(&self, identity: &str) -> Option<Arc<bulkhead_allowlist::Allowlist>> {
        self.allowlists.get(identity).cloned()
    }

    /// What conditions are computed from at `now`, to evaluate after letting go of the lock.
    pub fn inputs(&self, now: i64) -> Inputs {
        Inputs::at(&self.mirror, now, true)
    }

    /// When conditions may next change with no store event: a rule's window opens or closes, or
    /// a node's facts go stale, or a quarantine ends.
    pub fn next_event(&self, now: i64) -> Option<i64> {
        conditions::next_event(&self.live.as_ref()?.model, &self.mirror, now)
    }

    /// A receiver of `identity`'s configuration, starting with the current one.
    pub fn subscribe(&mut self, identity: &str) -> watch::Receiver<Arc<NodeMessage>> {
        let (revision, lists, records) = (self.revision(), &self.allowlists, &self.mirror);
        self.channels.subscribe(identity, || {
            distribute::message_for(identity, revision, lists, records)
        })
    }

    /// Hands the view a policy this controller is about to commit, compiled, so that the view
    /// takes it instead of compiling it again when the store confirms it.
    pub fn prepare(&mut self, live: Live) {
        self.prepared = Some(live);
    }

    /// Forgets a prepared policy whose commit failed.
    pub fn unprepare(&mut self) {
        self.prepared = None;
    }

    /// Replaces the view with a snapshot of the store, and sends what changed, in one go with
    /// the view in hand (the follower does it in three steps, to compile without the lock).
    /// Returns how many nodes were sent something.
    pub fn load(&mut self, kvs: &[KeyValue]) -> usize {
        let t = self.reset(kvs);
        self.settle(t)
    }

    /// Follows store events, and sends what changed, in one go with the view in hand. Returns
    /// how many nodes were sent something.
    pub fn apply<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) -> usize {
        let t = self.take(events);
        self.settle(t)
    }

    /// The job `t` calls for, run at once, and its outcome sent.
    fn settle(&mut self, mut t: Touched) -> usize {
        let job = self.job(&mut t, unix_now());
        let outcome = job.run();
        self.finish(t, outcome)
    }

    /// Replaces the mirror with a snapshot of the store.
    fn reset(&mut self, kvs: &[KeyValue]) -> Touched {
        self.mirror.clear();
        let mut t = Touched::default();
        for kv in kvs {
            self.mirror.put(kv, &mut t);
        }
        if self.live.is_some() && !kvs.iter().any(|kv| kv.key == POLICY) {
            self.live = None;
            self.allowlists = Arc::default();
        }
        // Everything may have changed.
        t.everything = true;
        t.conditions = true;
        t.creds = true;
        t
    }

    /// Follows store events.
    fn take<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) -> Touched {
        let mut t = Touched::default();
        for e in events {
            match e {
                Event::Put(kv) => self.mirror.put(kv, &mut t),
                Event::Delete { key, .. } => self.mirror.delete(key, &mut t),
            }
        }
        t
    }

    /// The stored policy `head` names, if it should replace the live one.
    fn newer_policy(&self, head: PolicyHead) -> Option<PolicyRecord> {
        let live = self.live.as_ref().map(|l| &l.record);
        if live.is_some_and(|l| l.revision == head.revision && l.applied_at == head.applied_at) {
            return None;
        }
        let rec = PolicyRecord::join(head, |k| self.mirror.blobs.get(k).map(Vec::as_slice))
            .map_err(|e| tracing::error!("{e}"))
            .ok()?;
        if live.is_some_and(|l| *l == rec) {
            return None;
        }
        if rec.revision < self.revision() {
            tracing::error!(
                "stored policy revision {} is older than the live {}; ignored",
                rec.revision,
                self.revision()
            );
            return None;
        }
        Some(rec)
    }

    /// The work `t` calls for, to run off the lock.
    fn job(&mut self, t: &mut Touched, now: i64) -> Job {
        let mut record = t.head.take().and_then(|h| self.newer_policy(h));
        // With the servers' own addresses, a node enrolled or revoked may move an identity's
        // address: the live policy is resolved again with the pins.
        if record.is_none()
            && !t.nodes.is_empty()
            && let Some(live) = &self.live
            && live::pins_moved(live, &self.mirror.pins())
        {
            record = Some(live.record.clone());
        }
        let prepared = record.as_ref().and_then(|_| self.prepared.take());
        let conditions = t.conditions && self.live.is_some();
        let needs_facts = record.is_some()
            || (conditions
                && self
                    .live
                    .as_ref()
                    .is_some_and(|l| !l.model.policy().posture.is_empty()));
        let inputs = if record.is_some() || conditions {
            Inputs::at(&self.mirror, now, needs_facts)
        } else {
            Inputs::default()
        };
        Job {
            base: self.live.clone(),
            record,
            prepared,
            conditions,
            inputs,
            old: self.allowlists.clone(),
        }
    }

    /// Takes a job's outcome, and sends what changed to the nodes it concerns. Returns how many
    /// nodes were sent something.
    fn finish(&mut self, t: Touched, outcome: Outcome) -> usize {
        let mut targets: BTreeSet<String> = BTreeSet::new();
        let mut everyone = t.everything;
        if let Some((changed, new_policy)) = self.install(outcome) {
            targets.extend(changed);
            everyone |= new_policy;
        }
        if t.creds {
            self.cred_generation += 1;
        }
        // A node no longer enrolled loses its channel: its streams end.
        for id in &t.nodes {
            if !self.mirror.nodes.contains_key(id) {
                self.channels.close(id);
            }
        }
        if everyone {
            let all: Vec<String> = self.channels.identities().cloned().collect();
            return self.push(&all);
        }
        // Every host firewall, when servers' addresses or the controllers changed.
        if t.underlay {
            targets.extend(self.connected_where(|l| l.underlay.is_some()));
        }
        // And identities that have a changed node as a peer.
        if !t.nodes.is_empty() {
            targets.extend(self.connected_where(|l| t.nodes.iter().any(|n| l.peer(n).is_some())));
        }
        self.push(&targets)
    }

    /// The identities with an open channel whose allowlist satisfies `f`.
    fn connected_where<'a>(
        &'a self,
        f: impl Fn(&bulkhead_allowlist::Allowlist) -> bool + 'a,
    ) -> impl Iterator<Item = String> + 'a {
        self.channels
            .identities()
            .filter(move |id| self.allowlists.get(*id).is_some_and(|l| f(l)))
            .cloned()
    }

    /// Makes a job's outcome live. Returns the identities whose allowlists changed, and whether
    /// a different policy became live; `None` if nothing changed.
    fn install(&mut self, outcome: Outcome) -> Option<(Vec<String>, bool)> {
        match outcome {
            Outcome::Unchanged => None,
            Outcome::Replace {
                live,
                allowlists,
                changed,
                new_policy,
            } => {
                self.live = Some(Arc::new(*live));
                self.allowlists = Arc::new(allowlists);
                Some((changed, new_policy))
            }
            Outcome::Patch { changed } => Some((self.patch(changed), false)),
        }
    }

    /// Re-sends to `identities` whatever changed for them; returns how many were sent.
    fn push<'a>(&self, identities: impl IntoIterator<Item = &'a String>) -> usize {
        let (revision, lists, records) = (self.revision(), &self.allowlists, &self.mirror);
        self.channels.push(identities, |id| {
            distribute::message_for(id, revision, lists, records)
        })
    }

    /// Conditions changed for a few identities: patches the live policy and its allowlists in
    /// place. Returns the identities whose allowlists changed.
    fn patch(&mut self, changed: Vec<live::ConditionChange>) -> Vec<String> {
        let Some(shared) = self.live.take() else {
            return Vec::new();
        };
        // Usually the only reference; a plan in progress may hold another, then this copies.
        let mut live = Arc::try_unwrap(shared).unwrap_or_else(|l| Live {
            record: l.record.clone(),
            plain: l.plain.clone(),
            model: l.model.clone(),
            grants: l.grants.clone(),
            compiled: l.compiled.clone(),
        });
        let out = live::patch(&mut live, Arc::make_mut(&mut self.allowlists), changed);
        self.live = Some(Arc::new(live));
        out
    }
}

/// Shared view, locked briefly (never across an await, never for a compile).
pub type Shared = std::sync::Mutex<View>;

/// Locks the view; a panic elsewhere must not take the controller down with it.
pub fn lock(v: &Shared) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
