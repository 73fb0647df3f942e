//! The policy resolved: names turned into indices, segments into member lists, addresses
//! assigned, and indexes built so that evaluation and compilation touch only what matters.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use bulkhead_allowlist::{Action, Addressing, PortSpec, RuleRef, Window};

use crate::addr;
use crate::ast::{Policy, Spanned};
use crate::diag::{Diags, Pos};

/// Index of an identity. Identities are numbered in name order, so id order is name order.
pub type IdentityId = u32;
/// Index of a segment, in file order.
pub type SegmentId = u32;
/// Index of a rule, in file order.
pub type RuleId = u32;
/// Index of a posture check, in file order.
pub type CheckId = u32;

/// The built-in segment of every identity currently in quarantine.
pub const QUARANTINED: &str = "quarantined";
/// Every identity.
pub const EVERYONE: &str = "*";

/// One side (`from` or `to`) of a rule, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Side {
    /// `"*"`: every identity.
    pub all: bool,
    /// Names the built-in segment `quarantined`.
    pub quarantined: bool,
    /// Segments named, ascending.
    pub segments: Vec<SegmentId>,
    /// Identities named directly, ascending.
    pub identities: Vec<IdentityId>,
}

impl Side {
    /// Whether `id`, a member of the `member_of` segments, is on this side by name, segment or
    /// `*`, leaving quarantine aside.
    fn holds_statically(&self, id: IdentityId, member_of: &[SegmentId]) -> bool {
        self.all
            || self.identities.binary_search(&id).is_ok()
            || intersects(&self.segments, member_of)
    }
}

fn intersects(a: &[u32], b: &[u32]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// A rule, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// Where it starts in the file.
    pub pos: Pos,
    /// Allow or deny.
    pub action: Action,
    /// Initiators.
    pub from: Side,
    /// Responders.
    pub to: Side,
    /// Ports covered.
    pub ports: Vec<PortSpec>,
    /// When it is in force.
    pub window: Window,
    /// Checks the initiator must pass, ascending.
    pub posture: Vec<CheckId>,
    /// `approval`: never in force itself; each approved request for it becomes a rule of its
    /// own ([`Model::with_grants`]).
    pub approval: Option<crate::ast::ApprovalDef>,
    /// For a rule made from an approved request: the request.
    pub grant: Option<std::sync::Arc<crate::approval::Grant>>,
}

/// A rule as a node sees it.
fn rule_ref(policy: &Policy, r: &Rule) -> RuleRef {
    RuleRef {
        name: r.name.clone(),
        action: r.action,
        window: r.window,
        posture: r
            .posture
            .iter()
            .map(|&c| policy.posture[c as usize].name.clone())
            .collect(),
    }
}

/// A policy resolved and indexed, ready to evaluate and compile.
#[derive(Debug, Clone)]
pub struct Model {
    policy: Policy,
    /// Identity names, ascending; an identity's id is its index here.
    names: Vec<String>,
    /// The same names, shared with every allowlist that names the identity.
    shared_names: Vec<std::sync::Arc<str>>,
    /// For each identity id, its index in `policy.identities`.
    def_of: Vec<usize>,
    addresses: Vec<Ipv4Addr>,
    ident_by_name: HashMap<String, IdentityId>,
    segment_by_name: HashMap<String, SegmentId>,
    check_by_name: HashMap<String, CheckId>,
    rule_by_name: HashMap<String, RuleId>,
    /// For each identity, the segments it belongs to, ascending.
    member_of: Vec<Vec<SegmentId>>,
    /// For each segment, its members, ascending.
    members: Vec<Vec<IdentityId>>,
    rules: Vec<Rule>,
    /// For each segment, the rules naming it in `from` / `to`.
    rules_naming_in_from: Vec<Vec<RuleId>>,
    rules_naming_in_to: Vec<Vec<RuleId>>,
    /// For each identity, the rules whose `from` / `to` holds it by segment or by name
    /// (not `*`, not `quarantined`), ascending.
    rules_from: Vec<Vec<RuleId>>,
    rules_to: Vec<Vec<RuleId>>,
    /// Rules with `*` / `quarantined` in `from` / `to`.
    all_from: Vec<RuleId>,
    all_to: Vec<RuleId>,
    quarantined_from: Vec<RuleId>,
    quarantined_to: Vec<RuleId>,
    /// Every rule as a node sees it, by rule id.
    refs: Vec<RuleRef>,
    /// The `underlay` block, if the policy has one.
    underlay: Option<crate::underlay::Block>,
}

impl Model {
    /// Resolves a parsed policy. `prior` holds the addresses identities had before, if known;
    /// see [`crate::addr`]. Errors and warnings go to `d`. Unresolvable names are left out, so the
    /// model is usable for further checks, but must not be used for anything else if `d` has
    /// errors.
    pub(crate) fn resolve(
        policy: Policy,
        prior: &BTreeMap<String, Ipv4Addr>,
        d: &mut Diags,
    ) -> Model {
        let mut order: Vec<usize> = (0..policy.identities.len()).collect();
        order.sort_by(|&a, &b| policy.identities[a].name.cmp(&policy.identities[b].name));
        let names: Vec<String> = order
            .iter()
            .map(|&i| policy.identities[i].name.clone())
            .collect();
        let ident_by_name: HashMap<String, IdentityId> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as IdentityId))
            .collect();
        let segment_by_name: HashMap<String, SegmentId> = policy
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i as SegmentId))
            .collect();
        let check_by_name: HashMap<String, CheckId> = policy
            .posture
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i as CheckId))
            .collect();

        let addresses = assign_addresses(&policy, &order, prior, d);

        // Segments.
        let n_ident = names.len();
        let mut explicit: Vec<Vec<IdentityId>> = Vec::with_capacity(policy.segments.len());
        for s in &policy.segments {
            if s.name == QUARANTINED {
                d.error(
                    s.pos,
                    "`quarantined` is a built-in segment: it holds every identity in quarantine",
                );
            }
            let mut ids: Vec<IdentityId> = s
                .identities
                .iter()
                .filter_map(|n| lookup_identity(&ident_by_name, n, d))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            explicit.push(ids);
        }
        // Selectors are indexed by one of their labels, so an identity is only matched against
        // segments that share a label with it, not against every segment.
        let mut by_label: HashMap<(&str, &str), Vec<SegmentId>> = HashMap::new();
        for (sid, s) in policy.segments.iter().enumerate() {
            if let Some((k, v)) = s.selector.as_ref().and_then(|m| m.iter().next()) {
                by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(sid as SegmentId);
            }
        }
        let mut member_of: Vec<Vec<SegmentId>> = vec![Vec::new(); n_ident];
        for (sid, ids) in explicit.iter().enumerate() {
            for &id in ids {
                member_of[id as usize].push(sid as SegmentId);
            }
        }
        let mut members: Vec<Vec<IdentityId>> = vec![Vec::new(); policy.segments.len()];
        for (id, &def) in order.iter().enumerate() {
            let labels = &policy.identities[def].labels;
            for (k, v) in labels {
                for &sid in by_label
                    .get(&(k.as_str(), v.as_str()))
                    .into_iter()
                    .flatten()
                {
                    let selector = policy.segments[sid as usize].selector.as_ref();
                    if selector.is_some_and(|m| selects(m, labels)) {
                        member_of[id].push(sid);
                    }
                }
            }
            let mine = &mut member_of[id];
            mine.sort_unstable();
            mine.dedup();
            for &sid in mine.iter() {
                members[sid as usize].push(id as IdentityId);
            }
        }
        for (sid, s) in policy.segments.iter().enumerate() {
            if members[sid].is_empty() {
                d.warning(s.pos, format!("segment {:?} has no members", s.name));
            }
        }

        // Rules.
        let mut rule_by_name: HashMap<String, RuleId> = HashMap::new();
        let mut rules = Vec::with_capacity(policy.rules.len());
        for (rid, r) in policy.rules.iter().enumerate() {
            if let Some(&first) = rule_by_name.get(&r.name) {
                d.error(
                    r.pos,
                    format!(
                        "duplicate rule name {:?} (first at {})",
                        r.name, policy.rules[first as usize].pos
                    ),
                );
            } else {
                rule_by_name.insert(r.name.clone(), rid as RuleId);
            }
            let from = resolve_side(&r.from, &segment_by_name, &ident_by_name, d);
            let to = resolve_side(&r.to, &segment_by_name, &ident_by_name, d);
            let mut posture: Vec<CheckId> = r
                .posture
                .iter()
                .filter_map(|c| match check_by_name.get(&c.value) {
                    Some(&id) => Some(id),
                    None => {
                        d.error(c.pos, format!("undefined posture check {:?}", c.value));
                        None
                    }
                })
                .collect();
            posture.sort_unstable();
            posture.dedup();
            rules.push(Rule {
                name: r.name.clone(),
                pos: r.pos,
                action: r.action,
                from,
                to,
                ports: r.ports.iter().map(|p| p.value).collect(),
                window: r.window,
                posture,
                approval: r.approval,
                grant: None,
            });
        }
        let refs = rules.iter().map(|r| rule_ref(&policy, r)).collect();

        let mut m = Model {
            policy,
            shared_names: names
                .iter()
                .map(|n| std::sync::Arc::from(n.as_str()))
                .collect(),
            names,
            def_of: order,
            addresses,
            ident_by_name,
            segment_by_name,
            check_by_name,
            rule_by_name,
            member_of,
            members,
            rules,
            rules_naming_in_from: Vec::new(),
            rules_naming_in_to: Vec::new(),
            rules_from: Vec::new(),
            rules_to: Vec::new(),
            all_from: Vec::new(),
            all_to: Vec::new(),
            quarantined_from: Vec::new(),
            quarantined_to: Vec::new(),
            refs,
            underlay: None,
        };
        m.index_rules();
        // An unresolved name already has its error; do not pile warnings on it.
        let resolved = !d.has_errors();
        for (rid, r) in m.rules.iter().enumerate().filter(|_| resolved) {
            let empty = |s: &Side| {
                !s.all
                    && !s.quarantined
                    && s.identities.is_empty()
                    && s.segments.iter().all(|&g| m.members[g as usize].is_empty())
            };
            if empty(&r.from) || empty(&r.to) {
                d.warning(
                    m.policy.rules[rid].pos,
                    format!("rule {:?} matches no identity on one side", r.name),
                );
            }
        }
        m.underlay = crate::underlay::resolve(&m, d);
        m
    }

    /// Adds rules and indexes them, for [`Model::with_grants`].
    pub(crate) fn add_rules(&mut self, rules: Vec<Rule>) {
        for r in rules {
            self.rule_by_name
                .insert(r.name.clone(), self.rules.len() as RuleId);
            self.refs.push(rule_ref(&self.policy, &r));
            self.rules.push(r);
        }
        self.all_from.clear();
        self.all_to.clear();
        self.quarantined_from.clear();
        self.quarantined_to.clear();
        self.index_rules();
    }

    fn index_rules(&mut self) {
        let n_seg = self.policy.segments.len();
        let n_ident = self.names.len();
        self.rules_naming_in_from = vec![Vec::new(); n_seg];
        self.rules_naming_in_to = vec![Vec::new(); n_seg];
        let mut by_ident_from: Vec<Vec<RuleId>> = vec![Vec::new(); n_ident];
        let mut by_ident_to: Vec<Vec<RuleId>> = vec![Vec::new(); n_ident];
        for (rid, r) in self.rules.iter().enumerate() {
            let rid = rid as RuleId;
            for (side, by_seg, by_ident, all, quarantined) in [
                (
                    &r.from,
                    &mut self.rules_naming_in_from,
                    &mut by_ident_from,
                    &mut self.all_from,
                    &mut self.quarantined_from,
                ),
                (
                    &r.to,
                    &mut self.rules_naming_in_to,
                    &mut by_ident_to,
                    &mut self.all_to,
                    &mut self.quarantined_to,
                ),
            ] {
                for &s in &side.segments {
                    by_seg[s as usize].push(rid);
                }
                for &i in &side.identities {
                    by_ident[i as usize].push(rid);
                }
                if side.all {
                    all.push(rid);
                }
                if side.quarantined {
                    quarantined.push(rid);
                }
            }
        }
        self.rules_from = by_ident_from;
        self.rules_to = by_ident_to;
        for id in 0..n_ident {
            self.reindex_identity(id as IdentityId);
        }
    }

    /// Recomputes `rules_from[id]` / `rules_to[id]` from its segments and direct mentions.
    fn reindex_identity(&mut self, id: IdentityId) {
        for (by_seg, out) in [
            (
                &self.rules_naming_in_from,
                &mut self.rules_from[id as usize],
            ),
            (&self.rules_naming_in_to, &mut self.rules_to[id as usize]),
        ] {
            for &s in &self.member_of[id as usize] {
                out.extend_from_slice(&by_seg[s as usize]);
            }
            out.sort_unstable();
            out.dedup();
        }
    }

    /// Changes one identity's labels and updates segment memberships and indexes, touching only
    /// that identity. Compiled state must then be refreshed with
    /// [`crate::Compiled::update_identity`].
    pub fn set_labels(&mut self, id: IdentityId, labels: BTreeMap<String, String>) {
        let def = self.def_of[id as usize];
        self.policy.identities[def].labels = labels;
        let labels = &self.policy.identities[def].labels;
        let mut now_in: Vec<SegmentId> = Vec::new();
        for (sid, s) in self.policy.segments.iter().enumerate() {
            let explicit = s
                .identities
                .iter()
                .any(|n| n.value == self.names[id as usize]);
            if explicit || s.selector.as_ref().is_some_and(|m| selects(m, labels)) {
                now_in.push(sid as SegmentId);
            }
        }
        let was_in = std::mem::replace(&mut self.member_of[id as usize], now_in.clone());
        for s in was_in.iter().filter(|s| now_in.binary_search(s).is_err()) {
            let m = &mut self.members[*s as usize];
            if let Ok(i) = m.binary_search(&id) {
                m.remove(i);
            }
        }
        for s in now_in.iter().filter(|s| was_in.binary_search(s).is_err()) {
            let m = &mut self.members[*s as usize];
            if let Err(i) = m.binary_search(&id) {
                m.insert(i, id);
            }
        }
        // Keep only the direct mentions, then add the segment-derived rules back.
        for (out, side) in [
            (
                &mut self.rules_from[id as usize],
                (|r: &Rule| &r.from) as fn(&Rule) -> &Side,
            ),
            (&mut self.rules_to[id as usize], |r: &Rule| &r.to),
        ] {
            out.retain(|&r| {
                side(&self.rules[r as usize])
                    .identities
                    .binary_search(&id)
                    .is_ok()
            });
        }
        self.reindex_identity(id);
    }

    /// The policy as written.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Number of identities.
    pub fn identity_count(&self) -> usize {
        self.names.len()
    }

    /// Identity ids, in name order.
    pub fn identity_ids(&self) -> impl Iterator<Item = IdentityId> + use<> {
        0..self.names.len() as IdentityId
    }

    /// The id of an identity.
    pub fn identity(&self, name: &str) -> Option<IdentityId> {
        self.ident_by_name.get(name).copied()
    }

    /// An identity's name.
    pub fn identity_name(&self, id: IdentityId) -> &str {
        &self.names[id as usize]
    }

    /// An identity's name as a shared string, for allowlists.
    pub fn shared_name(&self, id: IdentityId) -> std::sync::Arc<str> {
        self.shared_names[id as usize].clone()
    }

    /// An identity's address: its overlay address, or with `addressing: underlay` its
    /// server's own (`0.0.0.0` while it has none: declared in the policy, or pinned when its
    /// node enrolled).
    pub fn address(&self, id: IdentityId) -> Ipv4Addr {
        self.addresses[id as usize]
    }

    /// Whether the identity has an address yet (always, with overlay addressing).
    pub fn has_address(&self, id: IdentityId) -> bool {
        !self.addresses[id as usize].is_unspecified()
    }

    /// Every identity's address, by name.
    pub fn addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        self.names
            .iter()
            .cloned()
            .zip(self.addresses.iter().copied())
            .collect()
    }

    /// An identity's labels.
    pub fn labels(&self, id: IdentityId) -> &BTreeMap<String, String> {
        &self.policy.identities[self.def_of[id as usize]].labels
    }

    /// Where an identity is defined.
    pub fn identity_pos(&self, id: IdentityId) -> Pos {
        self.policy.identities[self.def_of[id as usize]].pos
    }

    /// The segments an identity belongs to, ascending.
    pub fn segments_of(&self, id: IdentityId) -> &[SegmentId] {
        &self.member_of[id as usize]
    }

    /// A segment's name.
    pub fn segment_name(&self, id: SegmentId) -> &str {
        &self.policy.segments[id as usize].name
    }

    /// A segment's members, ascending.
    pub fn members(&self, id: SegmentId) -> &[IdentityId] {
        &self.members[id as usize]
    }

    /// The id of a segment.
    pub fn segment(&self, name: &str) -> Option<SegmentId> {
        self.segment_by_name.get(name).copied()
    }

    /// The id of a posture check.
    pub fn check(&self, name: &str) -> Option<CheckId> {
        self.check_by_name.get(name).copied()
    }

    /// A posture check's name.
    pub fn check_name(&self, id: CheckId) -> &str {
        &self.policy.posture[id as usize].name
    }

    /// All rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// A rule.
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id as usize]
    }

    /// The id of a rule.
    pub fn rule_id(&self, name: &str) -> Option<RuleId> {
        self.rule_by_name.get(name).copied()
    }

    /// Every rule as a node sees it, by rule id.
    pub fn rule_refs(&self) -> &[RuleRef] {
        &self.refs
    }

    /// The `underlay` block, if the policy has one.
    pub fn underlay(&self) -> Option<&crate::underlay::Block> {
        self.underlay.as_ref()
    }

    /// Whether `id` is on `side`, given whether it is quarantined.
    pub fn on_side(&self, side: &Side, id: IdentityId, quarantined: bool) -> bool {
        side.holds_statically(id, &self.member_of[id as usize]) || (side.quarantined && quarantined)
    }

    /// The rules whose `from` holds `id`, by name or segment or `*`, and, if `quarantined`, by
    /// the `quarantined` segment. May repeat a rule.
    pub(crate) fn rules_initiated_by(
        &self,
        id: IdentityId,
        quarantined: bool,
    ) -> impl Iterator<Item = RuleId> + '_ {
        let q: &[RuleId] = if quarantined {
            &self.quarantined_from
        } else {
            &[]
        };
        self.rules_from[id as usize]
            .iter()
            .chain(&self.all_from)
            .chain(q)
            .copied()
    }

    /// The rules whose `to` holds `id`, like [`Model::rules_initiated_by`].
    pub(crate) fn rules_answered_by(
        &self,
        id: IdentityId,
        quarantined: bool,
    ) -> impl Iterator<Item = RuleId> + '_ {
        let q: &[RuleId] = if quarantined {
            &self.quarantined_to
        } else {
            &[]
        };
        self.rules_to[id as usize]
            .iter()
            .chain(&self.all_to)
            .chain(q)
            .copied()
    }

    /// Calls `f` with every identity on `side` (each at most once per segment or name; repeats
    /// are possible across them). `is_quarantined` tells who is in the `quarantined` segment.
    pub(crate) fn for_each_on_side(
        &self,
        side: &Side,
        quarantined: &[bool],
        mut f: impl FnMut(IdentityId),
    ) {
        if side.all {
            (0..self.names.len() as IdentityId).for_each(f);
            return;
        }
        for &s in &side.segments {
            self.members[s as usize].iter().copied().for_each(&mut f);
        }
        side.identities.iter().copied().for_each(&mut f);
        if side.quarantined {
            quarantined
                .iter()
                .enumerate()
                .filter(|(_, q)| **q)
                .for_each(|(i, _)| f(i as IdentityId));
        }
    }

    /// Where a rule is defined, as `LINE` for `FILE:LINE`.
    pub fn rule_line(&self, id: RuleId) -> u32 {
        self.rules[id as usize].pos.line
    }
}

/// Whether a selector matches labels: every listed label must be present and equal.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn lookup_identity(
    by_name: &HashMap<String, IdentityId>,
    n: &Spanned<String>,
    d: &mut Diags,
) -> Option<IdentityId> {
    let id = by_name.get(&n.value).copied();
    if id.is_none() {
        d.error(n.pos, format!("undefined identity {:?}", n.value));
    }
    id
}

fn resolve_side(
    names: &[Spanned<String>],
    segments: &HashMap<String, SegmentId>,
    identities: &HashMap<String, IdentityId>,
    d: &mut Diags,
) -> Side {
    let mut side = Side::default();
    for n in names {
        let v = n.value.as_str();
        match (v, segments.get(v), identities.get(v)) {
            (EVERYONE, _, _) => side.all = true,
            (QUARANTINED, None, _) => side.quarantined = true,
            (_, Some(_), Some(_)) => d.error(
                n.pos,
                format!("{v:?} is both a segment and an identity; rename one of them"),
            ),
            (_, Some(&s), None) => side.segments.push(s),
            (_, None, Some(&i)) => side.identities.push(i),
            (_, None, None) => d.error(n.pos, format!("undefined segment or identity {v:?}")),
        }
    }
    side.segments.sort_unstable();
    side.segments.dedup();
    side.identities.sort_unstable();
    side.identities.dedup();
    side
}

fn assign_addresses(
    policy: &Policy,
    order: &[usize],
    prior: &BTreeMap<String, Ipv4Addr>,
    d: &mut Diags,
) -> Vec<Ipv4Addr> {
    let net = policy.cidr;
    let mut used: HashMap<Ipv4Addr, (&str, Pos)> = HashMap::new();
    // Checked in file order, so a repeat is reported where it is written second.
    let mut fixed: Vec<Option<Ipv4Addr>> = vec![None; policy.identities.len()];
    for (i, def) in policy.identities.iter().enumerate() {
        let Some(a) = &def.address else {
            continue;
        };
        if !addr::is_host_address(net, a.value) {
            d.error(
                a.pos,
                if net.contains(a.value) {
                    format!(
                        "address {} is the network or broadcast address of {net}",
                        a.value
                    )
                } else {
                    format!("address {} is outside the network {net}", a.value)
                },
            );
            continue;
        }
        if let Some((other, pos)) = used.get(&a.value) {
            d.error(
                a.pos,
                format!("address {} is already used by {other} (at {pos})", a.value),
            );
        } else {
            used.insert(a.value, (&def.name, a.pos));
        }
        fixed[i] = Some(a.value);
    }
    // With the servers' own addresses nothing is allocated: an identity has its `address:`,
    // or the address it was pinned to when its node enrolled (`prior`, from the controller),
    // or none yet (unspecified: no peer has a tunnel to it until it has one).
    if policy.addressing == Addressing::Underlay {
        // A pin another identity holds already (fixed, or pinned first) is not taken.
        let mut taken: std::collections::HashSet<Ipv4Addr> = used.keys().copied().collect();
        return order
            .iter()
            .map(|&i| {
                let def = &policy.identities[i];
                fixed[i]
                    .or_else(|| {
                        prior
                            .get(&def.name)
                            .copied()
                            .filter(|a| addr::is_host_address(net, *a) && taken.insert(*a))
                    })
                    .unwrap_or(Ipv4Addr::UNSPECIFIED)
            })
            .collect();
    }
    // Fixed-address conflicts are reported above; drop them so allocation can still run.
    let mut seen = std::collections::HashSet::new();
    let idents: Vec<(&str, Option<Ipv4Addr>)> = order
        .iter()
        .map(|&i| {
            (
                policy.identities[i].name.as_str(),
                fixed[i].filter(|a| seen.insert(*a)),
            )
        })
        .collect();
    match addr::allocate(net, &idents, prior) {
        Some(v) => v,
        None => {
            d.error(
                policy.cidr_pos,
                format!(
                    "the network {net} has room for {} identities, the policy has {}",
                    addr::capacity(net),
                    idents.len()
                ),
            );
            vec![net.address; idents.len()]
        }
    }
}
