//! The controller's in-memory view of the store, and distribution.
//!
//! The store is the only truth: API calls write to it, and this view changes only by following
//! the store's watch ([`sync`]). So a controller restart, or (with etcd) a write made through
//! another controller, reaches the nodes by the same path as a local one.
//!
//! Each node's configuration (its own allowlist plus its peers' keys and endpoints) sits in a
//! `watch` channel per identity. After a change, only the identities whose configuration really
//! differs are sent anything: a policy apply compares every allowlist; an enrollment, revocation
//! or endpoint change touches only the identities that have that node as a peer. A watch channel
//! keeps only the newest value, so a slow node skips intermediate configurations instead of
//! queueing them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_allowlist::Allowlist;
use bulkhead_policy::posture::Facts as PostureFacts;
use bulkhead_policy::{CheckId, Compiled, Conditions, IdentityId, Model};
use bulkhead_proto::{NodeConfig, NodeMessage, PeerInfo, Quarantine};
use bulkhead_store::{Event, KeyValue, Revision, Store, WatchMessage};
use tokio::sync::watch;

use crate::records::{
    self, BLOBS, CONTROLLERS, CREDS, ControllerRecord, CredRecord, DENIALS, DenialRecord,
    ENDPOINTS, EndpointRecord, NODES, NodeRecord, POLICY, PRESENCE, PolicyHead, PolicyRecord,
    PresenceRecord, QUARANTINE,
};

/// WireGuard persistent keepalive pushed to nodes, seconds.
const KEEPALIVE: u16 = 25;

/// The live policy, resolved and compiled.
#[derive(Debug)]
pub struct Live {
    /// As stored.
    pub record: PolicyRecord,
    /// Resolved; shared, so that a recompile for new conditions reuses it.
    pub model: Arc<Model>,
    /// Compiled.
    pub compiled: Compiled,
}

/// The view.
#[derive(Debug, Default)]
pub struct View {
    /// The live policy, if any.
    pub live: Option<Arc<Live>>,
    /// Enrolled nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Valid credentials.
    pub creds: HashMap<String, CredRecord>,
    /// Reported endpoints.
    pub endpoints: HashMap<String, SocketAddr>,
    /// Live controllers' URLs, by store key.
    pub controllers: BTreeMap<String, String>,
    /// Quarantines as stored, with the record's revision (one whose `until` passed still counts
    /// as over, before the record is removed).
    pub quarantines: HashMap<String, (Quarantine, Revision)>,
    /// Per-identity presence as stored, with the record's revision.
    pub presence: HashMap<String, (PresenceRecord, Revision)>,
    /// Denials per initiator, per controller id, as every controller shares them.
    pub denials: HashMap<String, HashMap<String, DenialRecord>>,
    allowlists: HashMap<String, Allowlist>,
    /// Chunks of policy bodies, by key (kept until the store deletes them).
    blobs: HashMap<String, Vec<u8>>,
    channels: HashMap<String, watch::Sender<Arc<NodeMessage>>>,
    /// Raised whenever credentials change, so that open streams re-check theirs.
    pub cred_generation: u64,
    /// A policy this controller is committing, already compiled, for the view to take when the
    /// store confirms it (instead of compiling it a second time).
    pub prepared: Option<Live>,
}

/// What a batch of store events touched.
#[derive(Debug, Default)]
struct Touched {
    policy: bool,
    /// Something conditions depend on (facts) changed.
    conditions: bool,
    creds: bool,
    /// Nodes whose enrollment or endpoint changed.
    nodes: HashSet<String>,
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl View {
    /// The revision of the live policy, 0 if none.
    pub fn revision(&self) -> u64 {
        self.live.as_ref().map_or(0, |l| l.record.revision)
    }

    /// Whether an enrolled node reports enforcing the allowlist the live policy gives it now:
    /// by digest, which tells apart allowlists that conditions changed under one revision; by
    /// revision for a daemon that reports no digest.
    pub fn in_sync(&self, identity: &str) -> bool {
        let reported = self.presence.get(identity).map(|p| &p.0);
        let want = self.allowlists.get(identity);
        self.nodes.contains_key(identity)
            && match (want, reported) {
                (None, r) => r.and_then(|r| r.revision).is_none(),
                (Some(_), None) => false,
                (Some(l), Some(r)) => match &r.digest {
                    Some(d) if !l.digest.is_empty() => *d == l.digest,
                    _ => r.revision == Some(l.revision),
                },
            }
    }

    /// Denials of `initiator` in the minute before `now_ms` that controllers other than `me`
    /// counted.
    pub fn others_denials(&self, initiator: &str, me: &str, now_ms: i64) -> u64 {
        self.denials.get(initiator).map_or(0, |by| {
            by.iter()
                .filter(|(ctl, _)| *ctl != me)
                .map(|(_, r)| r.within(now_ms))
                .sum()
        })
    }

    /// Whether a node's stream is open at a live controller.
    pub fn online(&self, identity: &str) -> bool {
        self.presence
            .get(identity)
            .is_some_and(|(p, _)| p.online && self.controllers.values().any(|u| *u == p.controller))
    }

    /// The message an identity's node should have now.
    fn message_for(&self, identity: &str) -> NodeMessage {
        let Some(list) = self.allowlists.get(identity) else {
            return NodeMessage::NoPolicy {
                revision: self.revision(),
            };
        };
        let peers = list
            .peers
            .iter()
            .filter_map(|p| {
                let n = self.nodes.get(&*p.name)?;
                Some((
                    p.name.to_string(),
                    PeerInfo {
                        public_key: n.wireguard_key,
                        endpoint: self.endpoints.get(&*p.name).copied(),
                    },
                ))
            })
            .collect();
        NodeMessage::Config(NodeConfig {
            allowlist: list.clone(),
            peers,
            keepalive: Some(KEEPALIVE),
        })
    }

    /// A receiver of `identity`'s configuration, starting with the current one.
    pub fn subscribe(&mut self, identity: &str) -> watch::Receiver<Arc<NodeMessage>> {
        if let Some(tx) = self.channels.get(identity) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(self.message_for(identity)));
        self.channels.insert(identity.to_string(), tx);
        rx
    }

    /// Re-sends to `identities` whatever changed for them; returns how many were sent.
    fn push<'a>(&self, identities: impl Iterator<Item = &'a String>) -> usize {
        let mut sent = 0;
        for id in identities {
            let Some(tx) = self.channels.get(id) else {
                continue;
            };
            let msg = self.message_for(id);
            tx.send_if_modified(|cur| {
                if **cur == msg {
                    false
                } else {
                    *cur = Arc::new(msg);
                    sent += 1;
                    true
                }
            });
        }
        sent
    }

    fn recompile(&mut self, record: PolicyRecord) {
        let now = unix_now();
        let (model, compiled) = match self.prepared.take() {
            // This controller just validated and compiled exactly this record: reuse it.
            Some(p) if p.record == record => (p.model, p.compiled),
            _ => {
                let loaded = bulkhead_policy::load(&record.text, now, &record.addresses);
                let Some(model) = loaded.model else {
                    // Validated when applied; unreadable now means the record was tampered with.
                    tracing::error!(
                        revision = record.revision,
                        "stored policy does not resolve; keeping the previous one"
                    );
                    return;
                };
                let compiled = Compiled::new(&model, model.state(&self.conditions(&model, now)));
                (Arc::new(model), compiled)
            }
        };
        // A prepared policy was compiled without the nodes' posture: `distribute` refreshes it,
        // as after every policy change.
        self.install(record, model, compiled);
    }

    /// Makes a compiled policy live. An allowlist's revision is the policy revision that last
    /// changed it: an apply that does not touch a node sends it nothing. Returns the identities
    /// whose allowlists changed (or went).
    fn install(
        &mut self,
        record: PolicyRecord,
        model: Arc<Model>,
        compiled: Compiled,
    ) -> Vec<String> {
        let old = std::mem::take(&mut self.allowlists);
        let mut changed: Vec<String> = old
            .keys()
            .filter(|id| model.identity(id).is_none())
            .cloned()
            .collect();
        self.allowlists = compiled
            .allowlists(&model, record.revision)
            .into_iter()
            .map(|mut l| {
                match old.get(&l.identity) {
                    Some(o) if o.diff(&l).is_empty() => {
                        l.revision = o.revision;
                        l.digest.clone_from(&o.digest);
                    }
                    _ => {
                        l.digest = bulkhead_proto::allowlist_digest(&l);
                        changed.push(l.identity.clone());
                    }
                }
                (l.identity.clone(), l)
            })
            .collect();
        self.live = Some(Arc::new(Live {
            record,
            model,
            compiled,
        }));
        changed.sort();
        changed
    }

    /// The facts `identity` reported that are still fresh at `now` (reported within three of
    /// their intervals), and whether any went stale.
    fn fresh_facts(&self, identity: &str, now: i64) -> (PostureFacts, bool) {
        let mut out = PostureFacts::new();
        let mut stale = false;
        if let Some((p, _)) = self.presence.get(identity) {
            for (name, f) in &p.facts {
                let life = i64::try_from(f.interval.saturating_mul(3)).unwrap_or(i64::MAX);
                if now.saturating_sub(p.last_seen) <= life {
                    out.insert(name.clone(), f.value.clone());
                } else {
                    stale = true;
                }
            }
        }
        (out, stale)
    }

    /// Every check of the policy for `identity` at `now`: passing, or why not.
    pub fn posture(
        &self,
        model: &Model,
        identity: &str,
        now: i64,
    ) -> Vec<(String, Result<(), String>)> {
        let (facts, stale) = self.fresh_facts(identity, now);
        model
            .policy()
            .posture
            .iter()
            .map(|check| {
                let r = bulkhead_policy::posture::evaluate(check, &facts).map_err(|e| {
                    if stale {
                        format!("{e} (facts stale: no report for three intervals)")
                    } else {
                        e
                    }
                });
                (check.name.clone(), r)
            })
            .collect()
    }

    /// Quarantines in force at `now`, with their records' revisions.
    pub fn quarantined(&self, now: i64) -> impl Iterator<Item = (&String, &Quarantine)> {
        self.quarantines
            .iter()
            .filter(move |(_, (q, _))| q.until.is_none_or(|u| now < u))
            .map(|(id, (q, _))| (id, q))
    }

    /// The conditions at `now`: checks failing on stored facts, quarantines in force.
    fn conditions(&self, model: &Model, now: i64) -> Conditions {
        let mut c = Conditions::at(now);
        c.quarantined = self.quarantined(now).map(|(id, _)| id.clone()).collect();
        if model.policy().posture.is_empty() {
            return c;
        }
        for id in model.identity_ids() {
            let name = model.identity_name(id);
            for (check, r) in self.posture(model, name, now) {
                if r.is_err() {
                    c.failing.insert((name.to_string(), check));
                }
            }
        }
        c
    }

    /// Recompiles the live policy if the conditions changed since it was compiled: a check
    /// started or stopped failing, a quarantine began or ended, or a rule's window opened or
    /// closed. Returns the identities whose allowlists changed, if it recompiled.
    ///
    /// A window affects any number of pairs: that is a full compile. Posture and quarantine
    /// change one identity's pairs each: those are recompiled alone
    /// ([`Compiled::set_conditions`]), and only the allowlists they touch are patched, unless
    /// so many identities changed at once that a full compile is as cheap.
    pub fn refresh(&mut self, now: i64) -> Option<Vec<String>> {
        let live = self.live.clone()?;
        let m = &*live.model;
        let state = m.state(&self.conditions(m, now));
        let old = live.compiled.state();
        let crossed = m
            .rules()
            .iter()
            .any(|r| r.window.next_boundary(old.now).is_some_and(|b| b <= now));
        if !crossed && state.failing == old.failing && state.quarantined == old.quarantined {
            return None;
        }
        let changed: Vec<(IdentityId, Vec<CheckId>, bool)> = state
            .changed_from(old)
            .into_iter()
            .map(|i| (i, state.failing_of(i), state.quarantined[i as usize]))
            .collect();
        if crossed || (changed.len() > 16 && changed.len() * 4 > m.identity_count()) {
            let compiled = Compiled::new(m, state);
            return Some(self.install(live.record.clone(), live.model.clone(), compiled));
        }
        drop(live);
        let shared = self.live.take()?;
        // Usually the only reference; a plan in progress may hold another, then this copies.
        let mut live = Arc::try_unwrap(shared).unwrap_or_else(|l| Live {
            record: l.record.clone(),
            model: l.model.clone(),
            compiled: l.compiled.clone(),
        });
        let revision = live.record.revision;
        let m = live.model.clone();
        let mut originals: HashMap<String, Allowlist> = HashMap::new();
        for (id, failing, quarantined) in changed {
            for a in live.compiled.set_conditions(&m, id, &failing, quarantined) {
                let name = m.identity_name(a);
                let current = self.allowlists.get(name);
                if let Some(c) = current
                    && !originals.contains_key(name)
                {
                    originals.insert(name.to_string(), c.clone());
                }
                let list = match self.allowlists.remove(name) {
                    Some(mut list) if a != id => {
                        live.compiled.patch_allowlist(&m, &mut list, id);
                        list
                    }
                    _ => live.compiled.allowlist(&m, a, revision),
                };
                self.allowlists.insert(name.to_string(), list);
            }
        }
        let mut out = Vec::new();
        for (name, old) in originals {
            let Some(new) = self.allowlists.get_mut(&name) else {
                continue;
            };
            if old.diff(new).is_empty() {
                *new = old;
            } else {
                new.revision = revision;
                new.digest = bulkhead_proto::allowlist_digest(new);
                out.push(name);
            }
        }
        out.sort();
        self.live = Some(Arc::new(live));
        Some(out)
    }

    /// When conditions may next change with no store event: a rule's window opens or closes, or
    /// a node's facts go stale.
    pub fn next_event(&self, now: i64) -> Option<i64> {
        let live = self.live.as_ref()?;
        let windows = live
            .model
            .rules()
            .iter()
            .filter_map(|r| r.window.next_boundary(now));
        let stale = if live.model.policy().posture.is_empty() {
            None
        } else {
            self.presence
                .values()
                .flat_map(|(p, _)| {
                    p.facts.values().map(|f| {
                        p.last_seen
                            .saturating_add(
                                i64::try_from(f.interval.saturating_mul(3)).unwrap_or(i64::MAX),
                            )
                            .saturating_add(1)
                    })
                })
                .filter(|&t| t > now)
                .min()
        };
        let ends = self
            .quarantines
            .values()
            .filter_map(|(q, _)| q.until)
            .filter(|&t| t > now);
        windows.chain(stale).chain(ends).min()
    }

    /// Replaces the view with a snapshot of the store, and sends what changed. Returns how many
    /// nodes were sent something.
    pub fn load(&mut self, kvs: &[KeyValue]) -> usize {
        let t = self.reset(kvs);
        self.distribute(t)
    }

    /// Follows store events, and sends what changed. Returns how many nodes were sent
    /// something.
    pub fn apply<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) -> usize {
        let mut t = Touched::default();
        for e in events {
            match e {
                Event::Put(kv) => self.put(kv, &mut t),
                Event::Delete { key, .. } => self.delete(key, &mut t),
            }
        }
        self.distribute(t)
    }

    /// Replaces the whole view with a snapshot.
    fn reset(&mut self, kvs: &[KeyValue]) -> Touched {
        self.nodes.clear();
        self.creds.clear();
        self.endpoints.clear();
        self.controllers.clear();
        self.presence.clear();
        self.denials.clear();
        self.quarantines.clear();
        self.blobs.clear();
        let mut t = Touched::default();
        let had_policy = self.live.is_some();
        let mut policy_seen = false;
        for kv in kvs {
            policy_seen |= kv.key == POLICY;
            self.put(kv, &mut t);
        }
        if had_policy && !policy_seen {
            self.live = None;
            self.allowlists.clear();
        }
        // Everything may have changed.
        t.policy = true;
        t.conditions = true;
        t.creds = true;
        t
    }

    fn put(&mut self, kv: &KeyValue, t: &mut Touched) {
        let key = kv.key.as_str();
        let r: Result<(), String> = (|| {
            if key.starts_with(BLOBS) {
                self.blobs.insert(key.to_string(), kv.value.clone());
            } else if key == POLICY {
                let head: PolicyHead = records::decode(key, &kv.value)?;
                if self.live.as_ref().is_some_and(|l| {
                    l.record.revision == head.revision && l.record.applied_at == head.applied_at
                }) {
                    return Ok(());
                }
                let rec = PolicyRecord::join(head, |k| self.blobs.get(k).map(Vec::as_slice))?;
                if self.live.as_ref().is_some_and(|l| l.record == rec) {
                    return Ok(());
                }
                if rec.revision < self.revision() {
                    return Err(format!(
                        "stored policy revision {} is older than the live {}; ignored",
                        rec.revision,
                        self.revision()
                    ));
                }
                self.recompile(rec);
                t.policy = true;
            } else if let Some(id) = key.strip_prefix(NODES) {
                let rec: NodeRecord = records::decode(key, &kv.value)?;
                self.nodes.insert(id.to_string(), rec);
                t.nodes.insert(id.to_string());
            } else if let Some(fp) = key.strip_prefix(CREDS) {
                let rec: CredRecord = records::decode(key, &kv.value)?;
                self.creds.insert(fp.to_string(), rec);
                t.creds = true;
            } else if let Some(id) = key.strip_prefix(ENDPOINTS) {
                let rec: EndpointRecord = records::decode(key, &kv.value)?;
                self.endpoints.insert(id.to_string(), rec.endpoint);
                t.nodes.insert(id.to_string());
            } else if key.starts_with(CONTROLLERS) {
                let rec: ControllerRecord = records::decode(key, &kv.value)?;
                self.controllers.insert(key.to_string(), rec.url);
            } else if let Some(id) = key.strip_prefix(QUARANTINE) {
                let q: Quarantine = records::decode(key, &kv.value)?;
                self.quarantines
                    .insert(id.to_string(), (q, kv.mod_revision));
                t.conditions = true;
            } else if let Some((id, ctl)) = key
                .strip_prefix(DENIALS)
                .and_then(|rest| rest.split_once('/'))
            {
                let rec: DenialRecord = records::decode(key, &kv.value)?;
                self.denials
                    .entry(id.to_string())
                    .or_default()
                    .insert(ctl.to_string(), rec);
            } else if let Some(id) = key.strip_prefix(PRESENCE) {
                let rec: PresenceRecord = records::decode(key, &kv.value)?;
                let old = self.presence.insert(id.to_string(), (rec, kv.mod_revision));
                let new = &self.presence[id].0;
                t.conditions |=
                    old.is_none_or(|(o, _)| o.facts != new.facts || o.last_seen != new.last_seen);
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::error!("{e}");
        }
    }

    fn delete(&mut self, key: &str, t: &mut Touched) {
        if key.starts_with(BLOBS) {
            self.blobs.remove(key);
        } else if key == POLICY {
            tracing::error!("the stored policy was deleted; keeping the live one");
        } else if let Some(id) = key.strip_prefix(NODES) {
            self.nodes.remove(id);
            t.nodes.insert(id.to_string());
        } else if let Some(fp) = key.strip_prefix(CREDS) {
            self.creds.remove(fp);
            t.creds = true;
        } else if let Some(id) = key.strip_prefix(ENDPOINTS) {
            self.endpoints.remove(id);
            t.nodes.insert(id.to_string());
        } else if key.starts_with(CONTROLLERS) {
            self.controllers.remove(key);
        } else if let Some(id) = key.strip_prefix(PRESENCE) {
            self.presence.remove(id);
            t.conditions = true;
        } else if let Some((id, ctl)) = key
            .strip_prefix(DENIALS)
            .and_then(|rest| rest.split_once('/'))
        {
            if let Some(by) = self.denials.get_mut(id) {
                by.remove(ctl);
                if by.is_empty() {
                    self.denials.remove(id);
                }
            }
        } else if let Some(id) = key.strip_prefix(QUARANTINE) {
            self.quarantines.remove(id);
            t.conditions = true;
        }
    }

    /// Sends what changed to the nodes it concerns.
    fn distribute(&mut self, t: Touched) -> usize {
        // Identities whose allowlists new conditions changed. After a policy change too: a
        // snapshot or a batch of events may bring the policy before the quarantines and facts
        // it must be compiled with (keys come in order, and "policy" sorts first).
        let mut targets: BTreeSet<String> = BTreeSet::new();
        if t.conditions || t.policy {
            targets.extend(self.refresh(unix_now()).unwrap_or_default());
        }
        if t.creds {
            self.cred_generation += 1;
        }
        // A node no longer enrolled loses its channel: its streams end.
        let gone: Vec<String> = t
            .nodes
            .iter()
            .filter(|id| !self.nodes.contains_key(*id))
            .cloned()
            .collect();
        for id in &gone {
            self.channels.remove(id);
        }
        if t.policy {
            let all: Vec<String> = self.channels.keys().cloned().collect();
            return self.push(all.iter());
        }
        // And identities that have a changed node as a peer.
        if !t.nodes.is_empty() {
            targets.extend(
                self.channels
                    .keys()
                    .filter(|id| {
                        self.allowlists
                            .get(*id)
                            .is_some_and(|l| t.nodes.iter().any(|n| l.peer(n).is_some()))
                    })
                    .cloned(),
            );
        }
        self.push(targets.iter())
    }
}

/// Shared view, locked briefly (never across an await).
pub type Shared = std::sync::Mutex<View>;

/// Locks the view; a panic elsewhere must not take the controller down with it.
pub fn lock(v: &Shared) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows the store forever: a full read, then the watch; a resync or an error starts over.
/// `applied` holds the store revision the view has caught up with (-1 before the first full
/// read), so that a write can wait until its effect is visible (read your writes).
pub async fn sync(
    store: Arc<dyn Store>,
    view: Arc<Shared>,
    applied: watch::Sender<bulkhead_store::Revision>,
    creds: watch::Sender<u64>,
) {
    let announce = |v: &View| {
        creds.send_if_modified(|g| {
            let changed = *g != v.cred_generation;
            *g = v.cred_generation;
            changed
        });
    };
    loop {
        let snap = match store.range("").await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        {
            let mut v = lock(&view);
            let sent = v.load(&snap.kvs);
            announce(&v);
            tracing::debug!(revision = snap.revision, sent, "view loaded from the store");
        }
        applied.send_replace(snap.revision);
        let mut w = match store.watch("", snap.revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut seen = snap.revision;
        loop {
            let wake = lock(&view).next_event(unix_now());
            let timer = async {
                match wake {
                    Some(t) => {
                        // Just past the second the boundary falls on.
                        let now_ms = jiff::Timestamp::now().as_millisecond();
                        let ms = (t * 1000 - now_ms).max(0).unsigned_abs();
                        tokio::time::sleep(Duration::from_millis(ms + 5)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                m = w.next() => m,
                () = timer => {
                    let mut v = lock(&view);
                    let now = unix_now();
                    if let Some(changed) = v.refresh(now) {
                        let sent = v.push(changed.iter());
                        tracing::info!(nodes = sent, "conditions changed (time): pushed");
                    }
                    continue;
                }
            };
            match msg {
                Some(WatchMessage::Events(events)) => {
                    let mut v = lock(&view);
                    let sent = v.apply(events.iter().filter(|e| e.revision() > seen));
                    seen = events
                        .iter()
                        .map(Event::revision)
                        .max()
                        .unwrap_or(seen)
                        .max(seen);
                    announce(&v);
                    drop(v);
                    applied.send_replace(seen);
                    if sent > 0 {
                        tracing::info!(store_revision = seen, nodes = sent, "pushed");
                    }
                }
                Some(WatchMessage::Resync) => {
                    tracing::warn!("store watch lost events: reloading everything");
                    break;
                }
                None => {
                    tracing::warn!("store watch ended: reloading");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::records::encode;

    fn kv(key: &str, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value,
            mod_revision: rev,
        }
    }

    const POLICY_TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
  c: {labels: {r: c}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}
";

    fn node(id: &str, k: u8) -> NodeRecord {
        NodeRecord {
            identity: id.into(),
            wireguard_key: bulkhead_proto::PublicKey([k; 32]),
            credential: format!("fp-{id}"),
            enrolled: 0,
        }
    }

    /// A node's presence as its controller writes it: online now, enforcing revision 1.
    fn reported(digest: Option<&str>, facts: bulkhead_proto::Facts) -> PresenceRecord {
        PresenceRecord {
            controller: "https://c:1".into(),
            online: true,
            since: unix_now(),
            last_seen: unix_now(),
            revision: Some(1),
            digest: digest.map(str::to_string),
            status: None,
            version: String::new(),
            facts,
        }
    }

    /// Revision 1 of `text` as the store holds it: chunks, then the head.
    fn stored_policy(text: &str) -> (PolicyRecord, Vec<KeyValue>) {
        let rec = PolicyRecord {
            revision: 1,
            text: text.into(),
            source: "p.yaml".into(),
            applied_at: 0,
            applied_by: "admin".into(),
            addresses: BTreeMap::new(),
        };
        let (head, chunks) = rec.split();
        let mut kvs: Vec<KeyValue> = chunks.into_iter().map(|(k, b)| kv(&k, b, 1)).collect();
        kvs.push(kv(POLICY, encode(&head), 1));
        (rec, kvs)
    }

    #[test]
    fn only_affected_nodes_are_sent_anything() {
        let mut v = View::default();
        let (rec, kvs) = stored_policy(POLICY_TEXT);
        let t = v.reset(
            &[
                kvs,
                vec![
                    kv("nodes/a", encode(&node("a", 1)), 2),
                    kv("nodes/b", encode(&node("b", 2)), 3),
                    kv("nodes/c", encode(&node("c", 3)), 4),
                ],
            ]
            .concat(),
        );
        v.distribute(t);
        let (mut ra, mut rb, mut rc) = (v.subscribe("a"), v.subscribe("b"), v.subscribe("c"));
        ra.borrow_and_update();
        rb.borrow_and_update();
        rc.borrow_and_update();
        match &**ra.borrow() {
            NodeMessage::Config(c) => {
                assert_eq!(c.allowlist.identity, "a");
                assert_eq!(
                    c.peers.keys().collect::<Vec<_>>(),
                    ["b"],
                    "own allowlist only"
                );
            }
            m => panic!("{m:?}"),
        }
        // c has no rule: it gets an allowlist with no peers, never a's or b's.
        match &**rc.borrow() {
            NodeMessage::Config(c) => assert!(c.allowlist.peers.is_empty() && c.peers.is_empty()),
            m => panic!("{m:?}"),
        }
        // b's endpoint changes: a (its peer) is sent a new config; c is not.
        let mut t = Touched::default();
        v.put(
            &kv(
                "endpoints/b",
                encode(&EndpointRecord {
                    endpoint: "198.18.0.2:51820".parse().unwrap(),
                }),
                5,
            ),
            &mut t,
        );
        assert_eq!(v.distribute(t), 1);
        assert!(ra.has_changed().unwrap());
        assert!(!rc.has_changed().unwrap());
        // b is revoked: a loses the peer; b's channel closes.
        let mut t = Touched::default();
        v.delete("nodes/b", &mut t);
        v.distribute(t);
        match &**ra.borrow_and_update() {
            NodeMessage::Config(c) => assert!(c.peers.is_empty()),
            m => panic!("{m:?}"),
        }
        assert!(rb.has_changed().is_err(), "the revoked node's stream ends");
        // A record that is not JSON is refused, and nothing else changes.
        let mut t = Touched::default();
        v.put(&kv("nodes/a", b"garbage".to_vec(), 7), &mut t);
        assert_eq!(v.nodes["a"], node("a", 1));
        // An older policy revision never replaces a newer one.
        let mut old = rec.clone();
        old.revision = 0;
        old.text = "identities: {}\n".into();
        let (head, chunks) = old.split();
        let mut t = Touched::default();
        for (k, b) in chunks {
            v.put(&kv(&k, b, 8), &mut t);
        }
        v.put(&kv(POLICY, encode(&head), 8), &mut t);
        assert_eq!(v.revision(), 1);
        // A head whose chunks are not there is refused.
        let mut newer = rec.clone();
        newer.revision = 2;
        newer.text.push_str("# more\n");
        v.put(&kv(POLICY, encode(&newer.split().0), 9), &mut t);
        assert_eq!(v.revision(), 1);
    }

    #[test]
    fn in_sync_tells_allowlists_apart_that_a_condition_changed_under_one_revision() {
        let mut v = View::default();
        let (_, mut kvs) = stored_policy(POLICY_TEXT);
        kvs.push(kv("nodes/a", encode(&node("a", 1)), 2));
        kvs.push(kv("nodes/b", encode(&node("b", 2)), 3));
        let t = v.reset(&kvs);
        v.distribute(t);
        let before = v.allowlists["a"].digest.clone();
        assert_eq!(before.len(), 16);
        let reports = |digest: Option<&str>| reported(digest, Default::default());
        let mut t = Touched::default();
        v.put(
            &kv("presence/a", encode(&reports(Some(&before))), 4),
            &mut t,
        );
        v.distribute(t);
        assert!(v.in_sync("a"));
        // Quarantined: a's allowlist changes under the same policy revision.
        let q = Quarantine {
            since: unix_now(),
            until: None,
            reason: "by hand".into(),
            by: "admin".into(),
        };
        let mut t = Touched::default();
        v.put(&kv("quarantine/a", encode(&q), 5), &mut t);
        v.distribute(t);
        let after = v.allowlists["a"].digest.clone();
        assert_ne!(after, before);
        assert_eq!(v.allowlists["a"].revision, 1);
        assert!(
            !v.in_sync("a"),
            "a still reports the allowlist before the quarantine"
        );
        let mut t = Touched::default();
        v.put(&kv("presence/a", encode(&reports(Some(&after))), 6), &mut t);
        v.distribute(t);
        assert!(v.in_sync("a"));
        // A daemon that reports no digest is judged by its revision, as before.
        let mut t = Touched::default();
        v.put(&kv("presence/a", encode(&reports(None)), 7), &mut t);
        v.distribute(t);
        assert!(v.in_sync("a"));
        // Released: the same content as before, so the same digest again.
        let mut t = Touched::default();
        v.delete("quarantine/a", &mut t);
        v.distribute(t);
        assert_eq!(v.allowlists["a"].digest, before);
    }

    /// Allowlists as a full compile would give them now, without revision and digest.
    fn full_compile(v: &View) -> BTreeMap<String, Allowlist> {
        let live = v.live.as_ref().unwrap();
        let m = &live.model;
        let state = m.state(&v.conditions(m, unix_now()));
        Compiled::new(m, state)
            .allowlists(m, 0)
            .into_iter()
            .map(|l| (l.identity.clone(), l))
            .collect()
    }

    fn contents(v: &View) -> BTreeMap<String, Allowlist> {
        v.allowlists
            .iter()
            .map(|(id, l)| {
                let mut l = l.clone();
                l.revision = 0;
                l.digest.clear();
                (id.clone(), l)
            })
            .collect()
    }

    #[test]
    fn condition_changes_recompile_only_whom_they_touch_and_equal_a_full_compile() {
        const TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
  c: {labels: {r: c}}
  d: {labels: {r: d}}
  e: {labels: {r: e}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
  sc: {match: {r: c}}
  sd: {match: {r: d}}
posture:
  edr: {check.edr: true}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80]}
  - {name: bc, from: [sb], to: [sc], ports: [tcp/5432], posture: [edr]}
  - {name: cd, from: [sc], to: [sd], ports: [tcp/22]}
  - {name: forensics, from: [sd], to: [quarantined], ports: [tcp/22]}
";
        let mut v = View::default();
        let (_, kvs) = stored_policy(TEXT);
        let t = v.reset(&kvs);
        v.distribute(t);
        assert_eq!(contents(&v), full_compile(&v), "b fails edr: no facts");
        let before = v.allowlists.clone();
        // b passes edr: b's and c's allowlists change, nobody else's.
        let fact = bulkhead_proto::Fact {
            value: "true".into(),
            interval: 30,
        };
        let mut t = Touched::default();
        v.put(
            &kv(
                "presence/b",
                encode(&reported(None, [("check.edr".to_string(), fact)].into())),
                4,
            ),
            &mut t,
        );
        assert_eq!(
            v.refresh(unix_now()),
            Some(vec!["b".to_string(), "c".to_string()])
        );
        assert_eq!(contents(&v), full_compile(&v));
        assert_eq!(
            v.allowlists["a"], before["a"],
            "untouched, revision and digest too"
        );
        assert_ne!(v.allowlists["b"].digest, before["b"].digest);
        // a and c quarantined at once: d gains both through `forensics`, b loses c.
        let q = Quarantine {
            since: unix_now(),
            until: None,
            reason: "by hand".into(),
            by: "admin".into(),
        };
        let mut t = Touched::default();
        v.put(&kv("quarantine/a", encode(&q), 5), &mut t);
        v.put(&kv("quarantine/c", encode(&q), 6), &mut t);
        let changed = v.refresh(unix_now()).unwrap();
        assert_eq!(changed, ["a", "b", "c", "d"]);
        assert_eq!(contents(&v), full_compile(&v));
        // Nothing new: nothing recompiled.
        assert_eq!(v.refresh(unix_now()), None);
        // Released: back to what a full compile of the passing state gives.
        let mut t = Touched::default();
        v.delete("quarantine/a", &mut t);
        v.delete("quarantine/c", &mut t);
        let changed = v.refresh(unix_now()).unwrap();
        assert_eq!(changed, ["a", "b", "c", "d"]);
        assert_eq!(contents(&v), full_compile(&v));
        assert_eq!(v.allowlists["e"], before["e"]);
    }

    #[test]
    fn a_new_allowlist_survives_a_condition_refresh_that_touches_it() {
        // Revision 2 changes only rule ab's window: a's and b's allowlists differ from
        // revision 1 in their rules alone.
        let mut v = View::default();
        let (rec, kvs) = stored_policy(POLICY_TEXT);
        v.load(&kvs);
        let mut next = rec.clone();
        next.revision = 2;
        next.text = POLICY_TEXT.replace(
            "ports: [tcp/80]}",
            "ports: [tcp/80], expires: 2999-01-01T00:00:00Z}",
        );
        let (head, chunks) = next.split();
        let mut t = Touched::default();
        for (k, b) in chunks {
            v.put(&kv(&k, b, 2), &mut t);
        }
        v.put(&kv(POLICY, encode(&head), 2), &mut t);
        v.distribute(t);
        let window = |v: &View| v.allowlists["a"].rules[0].window;
        assert!(window(&v).expires.is_some());
        let changed = v.allowlists["a"].clone();
        // b quarantined, then released: a's allowlist is recompiled twice, and must come back
        // as revision 2 made it, never as revision 1 had it.
        let q = Quarantine {
            since: unix_now(),
            until: None,
            reason: "by hand".into(),
            by: "admin".into(),
        };
        let mut t = Touched::default();
        v.put(&kv("quarantine/b", encode(&q), 3), &mut t);
        v.distribute(t);
        assert!(v.allowlists["a"].peers.is_empty());
        let mut t = Touched::default();
        v.delete("quarantine/b", &mut t);
        v.distribute(t);
        assert_eq!(v.allowlists["a"], changed);
        assert_eq!(contents(&v), full_compile(&v));
    }

    #[test]
    fn a_snapshot_brings_quarantines_and_facts_into_the_first_compile() {
        // As the store lists them: "policy" before "presence/" and "quarantine/".
        let (_, mut kvs) = stored_policy(POLICY_TEXT);
        let q = Quarantine {
            since: unix_now(),
            until: None,
            reason: "by hand".into(),
            by: "admin".into(),
        };
        kvs.push(kv("quarantine/a", encode(&q), 2));
        let mut v = View::default();
        v.load(&kvs);
        let a = &v.allowlists["a"];
        assert!(a.peers.is_empty(), "a is quarantined from the start: {a:?}");
        assert_eq!(contents(&v), full_compile(&v));
    }

    #[test]
    fn posture_facts_switch_a_rule_on_and_off() {
        const TEXT: &str = "version: 1
network: {name: t, cidr: 10.9.0.0/16}
identities:
  a: {labels: {r: a}}
  b: {labels: {r: b}}
segments:
  sa: {match: {r: a}}
  sb: {match: {r: b}}
posture:
  edr: {check.edr: true}
rules:
  - {name: ab, from: [sa], to: [sb], ports: [tcp/80], posture: [edr]}
  - {name: ba, from: [sb], to: [sa], ports: [tcp/22]}
";
        let mut v = View::default();
        let (_, mut kvs) = stored_policy(TEXT);
        kvs.push(kv("nodes/a", encode(&node("a", 1)), 2));
        kvs.push(kv("nodes/b", encode(&node("b", 2)), 3));
        let t = v.reset(&kvs);
        v.distribute(t);
        let mut ra = v.subscribe("a");
        let rules = |rx: &mut watch::Receiver<Arc<NodeMessage>>| match &**rx.borrow_and_update() {
            NodeMessage::Config(c) => c
                .allowlist
                .rules
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>(),
            m => panic!("{m:?}"),
        };
        assert_eq!(rules(&mut ra), ["ba"], "no facts: the check fails");
        let presence = |edr: &str| {
            let fact = bulkhead_proto::Fact {
                value: edr.into(),
                interval: 30,
            };
            reported(None, [("check.edr".to_string(), fact)].into())
        };
        let mut t = Touched::default();
        v.put(&kv("presence/a", encode(&presence("true")), 4), &mut t);
        v.distribute(t);
        assert_eq!(rules(&mut ra), ["ab", "ba"], "the check passes");
        let mut t = Touched::default();
        v.put(&kv("presence/a", encode(&presence("false")), 5), &mut t);
        v.distribute(t);
        assert_eq!(rules(&mut ra), ["ba"], "the check fails again");
        // Stale facts fail: three intervals without a report.
        let mut p = presence("true");
        p.last_seen -= 91;
        let mut t = Touched::default();
        v.put(&kv("presence/a", encode(&p), 6), &mut t);
        v.distribute(t);
        assert_eq!(rules(&mut ra), ["ba"], "stale facts count as failing");
        assert!(v.next_event(unix_now()).is_none());
    }
}
