//! The live policy: resolved, compiled, and its allowlists. Made by a [`Job`] that runs with
//! the view's lock released, then swapped in whole.
//!
//! A full compile (a new policy, a rule window crossed, conditions changing for many identities
//! at once) takes ~100 ms at 5,000 identities, and building and diffing every allowlist as much
//! again: the follower takes a [`Job`] under the lock, runs it without the lock, and hands the
//! [`Outcome`] back. Only the follower changes the live policy, so nothing can move under a job.
//! Conditions changing for a few identities are patched in place ([`Compiled::set_conditions`]):
//! milliseconds, under the lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bulkhead_allowlist::{Addressing, Allowlist};
use bulkhead_policy::{CheckId, Compiled, Grant, IdentityId, Model, State};

use super::conditions::{self, Inputs};
use crate::records::PolicyRecord;

/// The live policy, resolved and compiled.
#[derive(Debug)]
pub struct Live {
    /// As stored.
    pub record: PolicyRecord,
    /// Resolved, without approved access: what plans compare with.
    pub plain: Arc<Model>,
    /// Resolved, with a rule for each approved access request in `grants`
    /// ([`Model::with_grants`]): what is compiled, evaluated and explained. Shared, so that a
    /// recompile for new conditions reuses it.
    pub model: Arc<Model>,
    /// The approved access `model` was made with.
    pub grants: Vec<Grant>,
    /// Compiled.
    pub compiled: Compiled,
}

impl Live {
    /// A live policy from its record and its resolved model, with `grants`, compiled for the
    /// conditions of `inputs`.
    pub fn new(record: PolicyRecord, plain: Arc<Model>, inputs: &Inputs) -> Live {
        let model = granted(&plain, &inputs.grants);
        let state = model.state(&conditions::conditions(&model, inputs));
        Live {
            record,
            compiled: Compiled::new(&model, state),
            plain,
            model,
            grants: inputs.grants.clone(),
        }
    }
}

/// `plain` with `grants`, sharing it when there are none.
fn granted(plain: &Arc<Model>, grants: &[Grant]) -> Arc<Model> {
    if grants.is_empty() {
        plain.clone()
    } else {
        Arc::new(plain.with_grants(grants))
    }
}

/// Each identity's allowlist. An allowlist's revision is the policy revision that last changed
/// it, and its digest says which content it is, on every controller alike.
pub type Allowlists = HashMap<String, Arc<Allowlist>>;

/// One identity whose conditions changed: its failing checks and whether it is quarantined.
pub type ConditionChange = (IdentityId, Vec<CheckId>, bool);

/// Work for the follower to do off the lock.
#[derive(Debug)]
pub struct Job {
    /// The live policy when the job was taken.
    pub base: Option<Arc<Live>>,
    /// A stored policy to make live.
    pub record: Option<PolicyRecord>,
    /// The same policy, if this controller committed it and compiled it already.
    pub prepared: Option<Live>,
    /// Whether conditions may have changed for the live policy.
    pub conditions: bool,
    /// What conditions are computed from.
    pub inputs: Inputs,
    /// The allowlists in force, to keep the revision of those that do not change.
    pub old: Arc<Allowlists>,
}

/// What a job found.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to change.
    Unchanged,
    /// A compiled policy and its allowlists, to swap in whole; `changed`: the identities whose
    /// allowlists changed or went. `new_policy`: a different policy became live.
    Replace {
        live: Box<Live>,
        allowlists: Allowlists,
        changed: Vec<String>,
        new_policy: bool,
    },
    /// Conditions changed for a few identities of the live policy: patch it.
    Patch { changed: Vec<ConditionChange> },
}

/// Whether a rule's window opened or closed between the compile's time and `now`.
fn crossed(m: &Model, compiled_at: i64, now: i64) -> bool {
    m.rules().iter().any(|r| {
        r.window
            .next_boundary(compiled_at)
            .is_some_and(|b| b <= now)
    })
}

/// Whether condition changes for `changed` identities are better done by a full compile.
fn too_many(m: &Model, changed: usize) -> bool {
    changed > 16 && changed * 4 > m.identity_count()
}

impl Job {
    /// Whether running the job may take long (a compile, or a policy's conditions): worth a
    /// thread of its own.
    pub fn is_heavy(&self) -> bool {
        self.record.is_some() || self.conditions
    }

    /// Compiles what needs compiling.
    pub fn run(self) -> Outcome {
        let Job {
            base,
            record,
            prepared,
            conditions: check,
            inputs,
            old,
        } = self;
        // A stored policy that does not resolve leaves the live one, and conditions that changed
        // meanwhile still apply to it (below).
        if let Some(record) = record
            && let Some(live) = compile(record, prepared, &inputs)
        {
            return replace(live, &old, true);
        }
        let Some(base) = base.filter(|_| check) else {
            return Outcome::Unchanged;
        };
        // Approved access came or went: a rule more or less, a full compile.
        if inputs.grants != base.grants {
            let live = Live::new(base.record.clone(), base.plain.clone(), &inputs);
            return replace(live, &old, false);
        }
        let m = &*base.model;
        let state = m.state(&conditions::conditions(m, &inputs));
        let old_state = base.compiled.state();
        let crossed = crossed(m, old_state.now, inputs.now);
        if !crossed
            && state.failing == old_state.failing
            && state.quarantined == old_state.quarantined
        {
            return Outcome::Unchanged;
        }
        let changed = changes(&state, old_state);
        // A window affects any number of pairs: a full compile. So are changes to so many
        // identities at once that one is as cheap.
        if crossed || too_many(m, changed.len()) {
            let live = Live {
                record: base.record.clone(),
                plain: base.plain.clone(),
                model: base.model.clone(),
                grants: base.grants.clone(),
                compiled: Compiled::new(m, state),
            };
            return replace(live, &old, false);
        }
        Outcome::Patch { changed }
    }
}

fn changes(state: &State, old: &State) -> Vec<ConditionChange> {
    state
        .changed_from(old)
        .into_iter()
        .map(|i| (i, state.failing_of(i), state.quarantined[i as usize]))
        .collect()
}

/// Resolves and compiles a stored policy with the conditions now, reusing what this controller
/// compiled when it committed it. `None`: the record does not resolve (it was validated when
/// applied, so it was tampered with), and the previous policy stays.
fn compile(record: PolicyRecord, prepared: Option<Live>, inputs: &Inputs) -> Option<Live> {
    match prepared {
        // With the servers' own addresses the model depends on the nodes' pins, which the
        // prepared model did not have: resolve it again below.
        Some(p)
            if p.record == record
                && p.model.policy().addressing == Addressing::Overlay
                && !inputs.grants.is_empty() =>
        {
            Some(Live::new(p.record, p.plain, inputs))
        }
        Some(mut p) if p.record == record && p.model.policy().addressing == Addressing::Overlay => {
            // Compiled without the nodes' posture and quarantines, at the time it was validated:
            // bring those in, and compile again if a window opened or closed since, or if so
            // many identities' conditions differ that a full compile is as cheap.
            let m = p.model.clone();
            let state = m.state(&conditions::conditions(&m, inputs));
            let changed = changes(&state, p.compiled.state());
            if crossed(&m, p.compiled.state().now, inputs.now) || too_many(&m, changed.len()) {
                p.compiled = Compiled::new(&m, state);
            } else {
                for (id, failing, quarantined) in changed {
                    p.compiled.set_conditions(&m, id, &failing, quarantined);
                }
            }
            Some(p)
        }
        _ => {
            let loaded = bulkhead_policy::load(&record.text, inputs.now, &record.addresses);
            let loaded = match &loaded.model {
                Some(m) if m.policy().addressing == Addressing::Underlay => {
                    bulkhead_policy::load(&record.text, inputs.now, &with_pins(&record, inputs))
                }
                _ => loaded,
            };
            let Some(model) = loaded.model else {
                tracing::error!(
                    revision = record.revision,
                    "stored policy does not resolve; keeping the previous one"
                );
                return None;
            };
            Some(Live::new(record, Arc::new(model), inputs))
        }
    }
}

/// The addresses a policy with `addressing: underlay` resolves with: those it had when applied,
/// then each enrolled node's pin over them.
fn with_pins(record: &PolicyRecord, inputs: &Inputs) -> BTreeMap<String, std::net::Ipv4Addr> {
    let mut prior = record.addresses.clone();
    prior.retain(|_, a| !a.is_unspecified());
    prior.extend(inputs.pins.iter().map(|(k, v)| (k.clone(), *v)));
    prior
}

/// Whether the live model's addresses are not the ones the nodes' pins now give it.
pub(super) fn pins_moved(live: &Live, pins: &BTreeMap<String, std::net::Ipv4Addr>) -> bool {
    let m = &live.model;
    if m.policy().addressing != Addressing::Underlay {
        return false;
    }
    let declared: BTreeSet<&str> = m
        .policy()
        .identities
        .iter()
        .filter(|i| i.address.is_some())
        .map(|i| i.name.as_str())
        .collect();
    m.identity_ids().any(|i| {
        let name = m.identity_name(i);
        !declared.contains(name)
            && pins.get(name).copied() != Some(m.address(i)).filter(|a| !a.is_unspecified())
    })
}

/// `live` in place of the policy in force, with all its allowlists ([`allowlists_of`]).
fn replace(live: Live, old: &Allowlists, new_policy: bool) -> Outcome {
    let (allowlists, changed) = allowlists_of(&live, old);
    Outcome::Replace {
        live: Box::new(live),
        allowlists,
        changed,
        new_policy,
    }
}

/// Every allowlist of `live`: those equal to `old` keep their revision and digest (an apply
/// that does not touch a node sends it nothing). Returns them and the identities whose
/// allowlists changed or went, sorted.
fn allowlists_of(live: &Live, old: &Allowlists) -> (Allowlists, Vec<String>) {
    let model = &live.model;
    let mut changed: Vec<String> = old
        .keys()
        .filter(|id| model.identity(id).is_none())
        .cloned()
        .collect();
    let lists = live
        .compiled
        .allowlists(model, live.record.revision)
        .into_iter()
        .map(|mut l| {
            let list = match old.get(&l.identity) {
                Some(o) if o.diff(&l).is_empty() => o.clone(),
                _ => {
                    l.digest = bulkhead_proto::allowlist_digest(&l);
                    changed.push(l.identity.clone());
                    Arc::new(l)
                }
            };
            (list.identity.clone(), list)
        })
        .collect();
    changed.sort();
    (lists, changed)
}

/// Applies condition changes for a few identities to `live` and `lists` in place: recompiles
/// only their pairs and patches only the allowlists they touch. Returns the identities whose
/// allowlists really changed, sorted.
pub fn patch(
    live: &mut Live,
    lists: &mut Allowlists,
    changed: Vec<ConditionChange>,
) -> Vec<String> {
    let revision = live.record.revision;
    let m = live.model.clone();
    let mut originals: HashMap<String, Arc<Allowlist>> = HashMap::new();
    for (id, failing, quarantined) in changed {
        for a in live.compiled.set_conditions(&m, id, &failing, quarantined) {
            let name = m.identity_name(a);
            let current = lists.remove(name);
            if let Some(c) = &current {
                originals
                    .entry(name.to_string())
                    .or_insert_with(|| c.clone());
            }
            let list = match current {
                Some(list) if a != id => {
                    let mut list = Arc::unwrap_or_clone(list);
                    live.compiled.patch_allowlist(&m, &mut list, id);
                    list
                }
                _ => live.compiled.allowlist(&m, a, revision),
            };
            lists.insert(name.to_string(), Arc::new(list));
        }
    }
    let mut out = Vec::new();
    for (name, old) in originals {
        let Some(new) = lists.get_mut(&name) else {
            continue;
        };
        if old.diff(new).is_empty() {
            *new = old;
        } else {
            let n = Arc::make_mut(new);
            n.revision = revision;
            n.digest = bulkhead_proto::allowlist_digest(n);
            out.push(name);
        }
    }
    out.sort();
    out
}
