//! Compiling a model into per-identity allowlists, in full or one identity at a time.
//!
//! For every ordered pair `(a, b)` the compiler gathers the rules that apply to connections from
//! `a` to `b` and builds one [`PortTable`] from them. Pairs with the same rules share one table.
//! `b`'s inbound table from `a` is `a`'s outbound table to `b`, so each table is built once.
//!
//! A rule applies to a pair if `a` is on its `from` side and `b` on its `to` side, and:
//! - an allow rule is in force now ([`crate::eval`]: window, posture, quarantine);
//! - a deny rule's window is not over. Denies that start later are shipped too, so a node that
//!   loses its controller still starts enforcing them on time.
//!
//! Pairs without any allow rule get no table. A pair is a peer if either direction allows
//! something now.
//!
//! When one identity changes (its labels, posture or quarantine), only the pairs it is part of
//! change: [`Compiled::update_identity`] recomputes those and reports whose allowlists moved.
//!
//! The underlay part of an allowlist ([`crate::underlay`]) is small and built when the
//! allowlist is, from the model and the state. What is kept is where each identity appears in
//! the `underlay` block, so that a change to one identity reports every identity whose
//! underlay part it touches.

use std::collections::HashMap;
use std::sync::Arc;

use bulkhead_allowlist::{Action, Allowlist, Peer, PortTable};

use crate::eval::{State, in_force};
use crate::model::{CheckId, IdentityId, Model, RuleId};
use crate::underlay::{self, Footprint};

/// A pair's table, and whether it allows anything at the compile time.
#[derive(Debug)]
struct Entry {
    /// The rules behind the table, ascending. Equal tables have equal rule lists and the other
    /// way round (every rule leaves its index somewhere in the table), so this is the short key
    /// that tells tables apart.
    rules: Vec<RuleId>,
    table: PortTable,
    allows_now: bool,
}

type Tables = Vec<(IdentityId, Arc<Entry>)>;

/// FxHash (rustc's hasher): the compiler's maps are hit millions of times in a full compile, with
/// keys from the operator's own policy, so SipHash's protection against chosen keys buys nothing
/// here and costs a tenth of the compile.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Every pair's port tables for one model and state.
#[derive(Debug, Clone)]
pub struct Compiled {
    state: State,
    /// For each identity, its outbound tables by peer, sorted by peer.
    out: Vec<Tables>,
    /// For each identity, its inbound tables by peer, sorted by peer. Shared with `out`.
    inb: Vec<Tables>,
    /// For each identity, the `underlay` entries that name it.
    underlay: Vec<Footprint>,
}

/// Scratch space for gathering one identity's pairs: rule lists indexed by peer.
struct Scratch {
    lists: Vec<Vec<RuleId>>,
    touched: Vec<IdentityId>,
    tables: FastMap<Vec<RuleId>, Arc<Entry>>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        Scratch {
            lists: vec![Vec::new(); n],
            touched: Vec::new(),
            tables: FastMap::default(),
        }
    }

    fn push(&mut self, peer: IdentityId, rule: RuleId) {
        let l = &mut self.lists[peer as usize];
        if l.is_empty() {
            self.touched.push(peer);
        }
        l.push(rule);
    }

    /// Turns what was gathered into tables, sorted by peer, and resets.
    fn finish(&mut self, m: &Model, st: &State) -> Tables {
        self.touched.sort_unstable();
        let mut out = Vec::with_capacity(self.touched.len());
        for &peer in &self.touched {
            let mut rules = std::mem::take(&mut self.lists[peer as usize]);
            rules.sort_unstable();
            rules.dedup();
            if !rules.iter().any(|&r| m.rule(r).action == Action::Allow) {
                continue;
            }
            let table = match self.tables.get(&rules) {
                Some(t) => t.clone(),
                None => {
                    let table = PortTable::build(
                        rules
                            .iter()
                            .flat_map(|&r| m.rule(r).ports.iter().map(move |&p| (r, p))),
                    );
                    let allows_now = table.allows_any(m.rule_refs(), st.now);
                    let t = Arc::new(Entry {
                        rules: rules.clone(),
                        table,
                        allows_now,
                    });
                    self.tables.insert(rules, t.clone());
                    t
                }
            };
            out.push((peer, table));
        }
        self.touched.clear();
        out
    }
}

/// Whether the rule applies to `a -> b` for compilation: see the module docs.
fn applies(m: &Model, rid: RuleId, a: IdentityId, b: IdentityId, st: &State) -> bool {
    let r = m.rule(rid);
    match r.action {
        Action::Allow => in_force(r, a, b, st).is_ok(),
        Action::Deny => !r.window.is_over(st.now),
    }
}

/// Which side of its pairs an identity is gathered from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The pairs it initiates.
    Out,
    /// The pairs it answers.
    In,
}

/// The tables of every pair `me` is on one side of, keyed by the identity on the other side.
fn pairs_of(m: &Model, st: &State, me: IdentityId, dir: Direction, s: &mut Scratch) -> Tables {
    let q = st.quarantined[me as usize];
    let mut rules: Vec<RuleId> = match dir {
        Direction::Out => m.rules_initiated_by(me, q).collect(),
        Direction::In => m.rules_answered_by(me, q).collect(),
    };
    rules.sort_unstable();
    rules.dedup();
    for rid in rules {
        let r = m.rule(rid);
        let other_side = if dir == Direction::Out {
            &r.to
        } else {
            &r.from
        };
        m.for_each_on_side(other_side, &st.quarantined, |other| {
            let (a, b) = if dir == Direction::Out {
                (me, other)
            } else {
                (other, me)
            };
            if other != me && applies(m, rid, a, b, st) {
                s.push(other, rid);
            }
        });
    }
    s.finish(m, st)
}

/// The index of `e` in `pool`, adding it if new. `None` stands for the empty table.
fn intern<'a>(
    pool: &mut Vec<Option<&'a Arc<Entry>>>,
    slot: &mut FastMap<*const Entry, u32>,
    e: Option<&'a Arc<Entry>>,
) -> u32 {
    let key = e.map_or(std::ptr::null(), Arc::as_ptr);
    *slot.entry(key).or_insert_with(|| {
        pool.push(e);
        pool.len() as u32 - 1
    })
}

/// Puts an allowlist's pools in the order [`Compiled::allowlist`] produces: tables by first use in
/// peer order, unused tables and rules dropped.
fn canonicalize(list: &mut Allowlist) {
    const UNSEEN: u32 = u32::MAX;
    let mut order = vec![UNSEEN; list.tables.len()];
    let mut next = 0;
    for p in &list.peers {
        for t in [p.outbound, p.inbound] {
            let slot = &mut order[t as usize];
            if *slot == UNSEEN {
                *slot = next;
                next += 1;
            }
        }
    }
    // Usually a patch leaves the order as it was: then there is nothing to move or drop.
    if next as usize == order.len() && order.iter().enumerate().all(|(i, &o)| o as usize == i) {
        return;
    }
    for p in &mut list.peers {
        p.outbound = order[p.outbound as usize];
        p.inbound = order[p.inbound as usize];
    }
    let mut tables: Vec<Option<PortTable>> = vec![None; next as usize];
    for (i, t) in std::mem::take(&mut list.tables).into_iter().enumerate() {
        if order[i] != UNSEEN {
            tables[order[i] as usize] = Some(t);
        }
    }
    list.tables = tables.into_iter().flatten().collect();
    let mut used = vec![false; list.rules.len()];
    for t in &list.tables {
        let spans = t.tcp.iter().chain(&t.udp).flat_map(|s| &s.rules);
        for &r in spans.chain(&t.icmp).chain(&t.other) {
            if let Some(u) = used.get_mut(r as usize) {
                *u = true;
            }
        }
    }
    if used.contains(&false) {
        let mut renumber = Vec::with_capacity(used.len());
        let mut next = 0;
        for &u in &used {
            renumber.push(next);
            next += u32::from(u);
        }
        for t in &mut list.tables {
            *t = t.remap(|i| renumber[i as usize]);
        }
        let rules = std::mem::take(&mut list.rules);
        list.rules = rules
            .into_iter()
            .zip(&used)
            .filter_map(|(r, &u)| u.then_some(r))
            .collect();
    }
}

fn find(t: &Tables, peer: IdentityId) -> Result<usize, usize> {
    t.binary_search_by_key(&peer, |(p, _)| *p)
}

impl Compiled {
    /// Compiles every pair.
    pub fn new(m: &Model, state: State) -> Compiled {
        let n = m.identity_count();
        let mut s = Scratch::new(n);
        let out: Vec<Tables> = m
            .identity_ids()
            .map(|a| pairs_of(m, &state, a, Direction::Out, &mut s))
            .collect();
        let mut inb: Vec<Tables> = vec![Vec::new(); n];
        for (a, tables) in out.iter().enumerate() {
            for (b, t) in tables {
                inb[*b as usize].push((a as IdentityId, t.clone()));
            }
        }
        let underlay = m
            .identity_ids()
            .map(|id| underlay::footprint(m, id))
            .collect();
        Compiled {
            state,
            out,
            inb,
            underlay,
        }
    }

    /// The state this was compiled for.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The table for connections from `a` to `b`, if any rule allows some.
    pub fn table(&self, a: IdentityId, b: IdentityId) -> Option<&PortTable> {
        let t = &self.out[a as usize];
        find(t, b).ok().map(|i| &t[i].1.table)
    }

    /// Every pair `(a, b, table)` with an outbound table, in id order.
    pub fn tables(&self) -> impl Iterator<Item = (IdentityId, IdentityId, &PortTable)> {
        self.out
            .iter()
            .enumerate()
            .flat_map(|(a, t)| t.iter().map(move |(b, e)| (a as IdentityId, *b, &e.table)))
    }

    /// Recompiles every pair `id` is part of, after the model or the state changed for `id` only.
    /// Returns the identities whose allowlists may have changed, ascending, `id` included.
    pub fn update_identity(&mut self, m: &Model, id: IdentityId) -> Vec<IdentityId> {
        let mut affected: Vec<IdentityId> = vec![id];
        let old_out = std::mem::take(&mut self.out[id as usize]);
        let old_in = std::mem::take(&mut self.inb[id as usize]);
        for (b, _) in &old_out {
            let t = &mut self.inb[*b as usize];
            if let Ok(i) = find(t, id) {
                t.remove(i);
            }
            affected.push(*b);
        }
        for (a, _) in &old_in {
            let t = &mut self.out[*a as usize];
            if let Ok(i) = find(t, id) {
                t.remove(i);
            }
            affected.push(*a);
        }
        let mut s = Scratch::new(m.identity_count());
        let new_out = pairs_of(m, &self.state, id, Direction::Out, &mut s);
        let new_in = pairs_of(m, &self.state, id, Direction::In, &mut s);
        for (b, t) in &new_out {
            let v = &mut self.inb[*b as usize];
            if let Err(i) = find(v, id) {
                v.insert(i, (id, t.clone()));
            }
            affected.push(*b);
        }
        for (a, t) in &new_in {
            let v = &mut self.out[*a as usize];
            if let Err(i) = find(v, id) {
                v.insert(i, (id, t.clone()));
            }
            affected.push(*a);
        }
        self.out[id as usize] = new_out;
        self.inb[id as usize] = new_in;
        let footprint = underlay::footprint(m, id);
        underlay::touched(m, &self.underlay[id as usize], &footprint, &mut affected);
        self.underlay[id as usize] = footprint;
        affected.sort_unstable();
        affected.dedup();
        affected
    }

    /// Sets `id`'s failing checks and whether it is quarantined, and recompiles its pairs if
    /// either changed. Returns the identities whose allowlists may have changed (none if
    /// nothing did).
    pub fn set_conditions(
        &mut self,
        m: &Model,
        id: IdentityId,
        failing: &[CheckId],
        quarantined: bool,
    ) -> Vec<IdentityId> {
        let now_failing = self.state.failing_of(id);
        let mut want = failing.to_vec();
        want.sort_unstable();
        want.dedup();
        if now_failing == want && self.state.quarantined[id as usize] == quarantined {
            return Vec::new();
        }
        self.state.failing.retain(|(i, _)| *i != id);
        self.state.failing.extend(want.into_iter().map(|c| (id, c)));
        self.state.quarantined[id as usize] = quarantined;
        self.update_identity(m, id)
    }

    /// Sets whether `id` is quarantined and recompiles its pairs. Returns the identities whose
    /// allowlists may have changed.
    pub fn set_quarantined(&mut self, m: &Model, id: IdentityId, on: bool) -> Vec<IdentityId> {
        self.state.quarantined[id as usize] = on;
        self.update_identity(m, id)
    }

    /// The allowlist of `id`: its peers and their tables, with rule indices local to it.
    pub fn allowlist(&self, m: &Model, id: IdentityId, revision: u64) -> Allowlist {
        let refs = m.rule_refs();
        let (out, inb) = (&self.out[id as usize], &self.inb[id as usize]);
        // Distinct tables by identity of the shared entry; `None` is the empty table.
        let mut pool: Vec<Option<&Arc<Entry>>> = Vec::new();
        let mut slot: FastMap<*const Entry, u32> = FastMap::default();
        let (mut i, mut j) = (0, 0);
        let mut peers: Vec<(IdentityId, u32, u32)> = Vec::new();
        loop {
            let (po, pi) = (out.get(i).map(|x| x.0), inb.get(j).map(|x| x.0));
            let Some(peer) = po.into_iter().chain(pi).min() else {
                break;
            };
            let o = (po == Some(peer)).then(|| &out[i].1);
            let n = (pi == Some(peer)).then(|| &inb[j].1);
            i += usize::from(o.is_some());
            j += usize::from(n.is_some());
            // A peer without an address yet (addressing: underlay, not enrolled) gets no tunnel.
            if (o.is_some_and(|e| e.allows_now) || n.is_some_and(|e| e.allows_now))
                && m.has_address(peer)
            {
                let o = intern(&mut pool, &mut slot, o);
                let n = intern(&mut pool, &mut slot, n);
                peers.push((peer, o, n));
            }
        }
        let mut used: Vec<u32> = pool
            .iter()
            .flatten()
            .flat_map(|e| e.rules.iter().copied())
            .collect();
        used.sort_unstable();
        used.dedup();
        let local = |g: u32| used.binary_search(&g).unwrap_or_default() as u32;
        // Equal tables behind different entries (recompiled separately) become one, so that an
        // allowlist has one form whichever way it was compiled.
        static EMPTY: PortTable = PortTable {
            tcp: Vec::new(),
            udp: Vec::new(),
            icmp: Vec::new(),
            other: Vec::new(),
        };
        let mut canonical: FastMap<&[RuleId], u32> = FastMap::default();
        let mut tables = Vec::new();
        let renumber: Vec<u32> = pool
            .iter()
            .map(|e| {
                let t = e.map_or(&EMPTY, |e| &e.table);
                let key = e.map_or(&[][..], |e| e.rules.as_slice());
                *canonical.entry(key).or_insert_with(|| {
                    tables.push(t.remap(local));
                    tables.len() as u32 - 1
                })
            })
            .collect();
        Allowlist {
            revision,
            digest: String::new(),
            identity: m.identity_name(id).to_string(),
            address: m.address(id),
            network: m.policy().cidr,
            addressing: m.policy().addressing,
            rules: used.iter().map(|&g| refs[g as usize].clone()).collect(),
            tables,
            peers: peers
                .into_iter()
                .map(|(p, outbound, inbound)| Peer {
                    name: m.shared_name(p),
                    address: m.address(p),
                    outbound: renumber[outbound as usize],
                    inbound: renumber[inbound as usize],
                })
                .collect(),
            underlay: underlay::underlay_of(m, &self.state, id),
        }
    }

    /// Brings `list`, an allowlist this value produced before [`Compiled::update_identity`]
    /// changed `peer`, up to date for that one peer: its entry, and the rule and table pools,
    /// and its underlay part (rebuilt whole: it is small).
    /// The result equals [`Compiled::allowlist`] at a fraction of the cost, since every other
    /// peer is untouched. For the changed identity itself, call [`Compiled::allowlist`].
    pub fn patch_allowlist(&self, m: &Model, list: &mut Allowlist, peer: IdentityId) {
        let Some(me) = m.identity(&list.identity) else {
            return;
        };
        list.underlay = underlay::underlay_of(m, &self.state, me);
        let name = m.identity_name(peer);
        if let Ok(i) = list.peers.binary_search_by(|p| (*p.name).cmp(name)) {
            list.peers.remove(i);
        }
        let entry = |t: &Tables| find(t, peer).ok().map(|i| t[i].1.clone());
        let (o, n) = (entry(&self.out[me as usize]), entry(&self.inb[me as usize]));
        let allows = |e: &Option<Arc<Entry>>| e.as_ref().is_some_and(|e| e.allows_now);
        if (allows(&o) || allows(&n)) && m.has_address(peer) {
            // Rule indices of the new entry are global; the list's are local to it. Usually the
            // list has every rule the entry needs already, found by name.
            let mut needed: Vec<u32> = o
                .iter()
                .chain(&n)
                .flat_map(|e| e.rules.iter().copied())
                .collect();
            needed.sort_unstable();
            needed.dedup();
            let refs = m.rule_refs();
            let known: Option<Vec<(u32, u32)>> = needed
                .iter()
                .map(|&g| {
                    let at = list
                        .rules
                        .iter()
                        .position(|r| r.name == refs[g as usize].name)?;
                    Some((g, at as u32))
                })
                .collect();
            // Otherwise the rule table grows, in policy order, and every table is renumbered.
            let mut global: Vec<u32> = Vec::new();
            if known.is_none() {
                global = list
                    .rules
                    .iter()
                    .filter_map(|r| m.rule_id(&r.name))
                    .collect();
                let mut grown = global.clone();
                grown.extend(&needed);
                grown.sort_unstable();
                grown.dedup();
                let to_new =
                    |l: u32| grown.binary_search(&global[l as usize]).unwrap_or_default() as u32;
                for t in &mut list.tables {
                    *t = t.remap(to_new);
                }
                list.rules = grown.iter().map(|&g| refs[g as usize].clone()).collect();
                global = grown;
            }
            let local = |g: u32| match &known {
                Some(pairs) => pairs.iter().find(|p| p.0 == g).map_or(0, |p| p.1),
                None => global.binary_search(&g).unwrap_or_default() as u32,
            };
            let mut slot = |e: &Option<Arc<Entry>>| -> u32 {
                let t = e
                    .as_ref()
                    .map_or_else(PortTable::default, |e| e.table.remap(local));
                match list.tables.iter().position(|x| *x == t) {
                    Some(i) => i as u32,
                    None => {
                        list.tables.push(t);
                        list.tables.len() as u32 - 1
                    }
                }
            };
            let (outbound, inbound) = (slot(&o), slot(&n));
            let at = list
                .peers
                .binary_search_by(|p| (*p.name).cmp(name))
                .unwrap_or_else(|i| i);
            list.peers.insert(
                at,
                Peer {
                    name: m.shared_name(peer),
                    address: m.address(peer),
                    outbound,
                    inbound,
                },
            );
        }
        canonicalize(list);
    }

    /// Every identity's allowlist, in name order.
    pub fn allowlists(&self, m: &Model, revision: u64) -> Vec<Allowlist> {
        m.identity_ids()
            .map(|id| self.allowlist(m, id, revision))
            .collect()
    }
}
