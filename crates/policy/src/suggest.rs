//! `bulkhead policy suggest` (spec §9): rules that let every observed connection through, and
//! nothing that was neither observed nor already allowed, written with segments where the
//! labels allow.
//!
//! **What must keep working.** Every connection the history recorded, whatever its verdict
//! (allowed, denied, would-deny) and path (overlay, underlay), except what no rule can or should
//! express, each reported with its reason ([`Skipped`]):
//! - an end that is not an identity of the base (an address outside the estate, or an identity
//!   the base does not define);
//! - traffic of an identity to itself (outside the policy);
//! - a protocol other than TCP, UDP and ICMP (only `any` would cover it);
//! - ephemeral ports: on one responder and protocol, once [`Options::ephemeral_distinct`] or
//!   more distinct ports from [`Options::ephemeral_floor`] up were seen, every port from the
//!   floor up is taken for the ephemeral side of a connection (a reply mislabelled as a new
//!   flow, passive FTP's data connections), not for a service;
//! - a connection a deny rule of the base forbids: no allow rule overrides a deny;
//! - on the underlay, a connection from a server in scope to one outside it: an `allow` entry's
//!   `to` can only name servers in scope.
//!
//! A connection the base already lets through needs nothing ([`Suggestion::kept`]).
//!
//! **Generalising.** For each protocol and port, the pairs that need a rule are covered by
//! products of groups, greedily: for the first pair not yet covered, every group holding its
//! initiator is tried against every group holding its responder, and the product that covers
//! most pairs not yet covered wins (then the smallest, then existing segments before
//! identities before new label segments). A group is an identity alone, a segment of the base,
//! or the identities that carry a set of labels (every subset of an identity's labels, up to
//! four labels; with more, one and two labels and all of them). Among groups with the same
//! members, an existing segment is preferred, then the identity itself, then the label set with
//! the most labels (the most specific). A product is taken only if enough of its pairs (all by
//! default: [`Options::coverage`]) were observed or were allowed by the base already (or are
//! forbidden by a deny rule of the base, which the new rule cannot change). So a rule from a
//! segment to a segment allows nothing new that was not observed.
//!
//! Products of the same two groups are one rule with all their ports; rules with the same
//! responders and ports take their initiators together, and then the other way round (a list
//! in `from` or `to` allows exactly the union). Consecutive ports become ranges.
//!
//! Underlay connections become entries of `underlay.allow` in the same way, with responders
//! drawn only from groups whose members are all in the underlay's scope.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;

use bulkhead_allowlist::{PortSpec, UnderlayMode, UnixTime, proto};
use serde::Serialize;

use crate::ast::Probe;
use crate::eval::{Conditions, evaluate};
use crate::model::{IdentityId, Model, SegmentId};
use crate::observed::{Connection, Flow, Way, connections};
use crate::underlay;

/// How to generalise.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The time the base is evaluated at.
    pub now: UnixTime,
    /// The share of a product's pairs that must have been observed or allowed before, for a
    /// rule between two groups: 1.0 (the default) allows nothing unobserved.
    pub coverage: f64,
    /// Ports from here up may be ephemeral.
    pub ephemeral_floor: u16,
    /// This many distinct such ports on one responder and protocol make them ephemeral.
    pub ephemeral_distinct: usize,
}

impl Options {
    /// The defaults at `now`: full coverage, ephemeral ports from 32768 seen 8 or more times.
    pub fn at(now: UnixTime) -> Options {
        Options {
            now,
            coverage: 1.0,
            ephemeral_floor: 32768,
            ephemeral_distinct: 8,
        }
    }
}

/// What to add to the base.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Suggestion {
    /// New segments, by labels.
    pub segments: Vec<NewSegment>,
    /// New rules.
    pub rules: Vec<Suggested>,
    /// New `underlay.allow` entries.
    pub underlay: Vec<Suggested>,
    /// Connections the base already lets through.
    pub kept: Vec<Kept>,
    /// Connections left out, and why.
    pub skipped: Vec<Skipped>,
    /// Connections observed.
    pub connections: usize,
}

/// A segment to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewSegment {
    /// Its name.
    pub name: String,
    /// Its `match`.
    pub labels: BTreeMap<String, String>,
    /// Its members in the base.
    pub members: Vec<String>,
}

/// A rule, or an underlay entry, to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suggested {
    /// Its name.
    pub name: String,
    /// Initiators: segments and identities.
    pub from: Vec<String>,
    /// Responders.
    pub to: Vec<String>,
    /// Ports, as written.
    pub ports: Vec<String>,
    /// The observed connections it lets through, by initiator, responder and port.
    pub covers: Vec<Covered>,
    /// Pairs and ports it allows that were neither observed nor allowed before (only with a
    /// coverage under 1).
    pub unobserved: usize,
}

/// What a suggested rule covers, summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Distinct (initiator, responder) pairs.
    pub pairs: usize,
    /// Flows counted.
    pub flows: u64,
    /// The first one, Unix milliseconds (0 if none).
    pub first: i64,
    /// The last one.
    pub last: i64,
}

impl Suggested {
    /// What it covers, summed.
    pub fn coverage(&self) -> Coverage {
        let pairs: BTreeSet<(&str, &str)> = self
            .covers
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str()))
            .collect();
        Coverage {
            pairs: pairs.len(),
            flows: self.covers.iter().map(|c| c.count).sum(),
            first: self.covers.iter().map(|c| c.first).min().unwrap_or(0),
            last: self.covers.iter().map(|c| c.last).max().unwrap_or(0),
        }
    }

    /// Its ports, parsed.
    pub fn port_specs(&self) -> Vec<PortSpec> {
        self.ports
            .iter()
            .filter_map(|p| crate::parse_port_spec(p).ok())
            .collect()
    }
}

/// An observed connection a suggested rule lets through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Covered {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// Protocol and port.
    pub port: String,
    /// Flows.
    pub count: u64,
    /// Of which denied when recorded.
    pub denied: u64,
    /// Of which only observed (`would-deny`).
    pub would_deny: u64,
    /// The first, Unix milliseconds.
    pub first: i64,
    /// The last, Unix milliseconds.
    pub last: i64,
}

/// An observed connection the base already lets through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// Protocol and port.
    pub port: String,
    /// Overlay or underlay.
    pub path: Way,
    /// Flows.
    pub count: u64,
    /// The rule or entry that lets it through; none where no firewall filters it.
    pub rule: Option<String>,
}

/// An observed connection no suggested rule covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Initiator, as recorded.
    pub from: String,
    /// Responder, as recorded.
    pub to: String,
    /// Protocol and port.
    pub port: String,
    /// Overlay or underlay.
    pub path: Way,
    /// Flows.
    pub count: u64,
    /// Why, as a stable word: `outside`, `self`, `protocol`, `ephemeral`, `denied-by-rule`,
    /// `outside-scope`.
    pub kind: &'static str,
    /// Why, for people.
    pub reason: String,
}

/// The suggestion for `flows` against the base `m`. See the module docs.
pub fn suggest(m: &Model, flows: &[Flow], opt: &Options) -> Suggestion {
    let conns = connections(flows);
    let st = m.state(&Conditions::at(opt.now));
    let ephemeral = ephemeral_ports(&conns, opt);
    let mut out = Suggestion {
        connections: conns.len(),
        ..Suggestion::default()
    };
    let mut over = Needs::default();
    let mut under = Needs::default();
    let block = m.underlay().filter(|b| b.mode != UnderlayMode::Off);
    for (i, c) in conns.iter().enumerate() {
        let skip = |kind: &'static str, reason: String| Skipped {
            from: c.src.clone(),
            to: c.dst.clone(),
            port: c.probe.to_string(),
            path: c.path,
            count: c.count,
            kind,
            reason,
        };
        let kept = |rule: Option<String>| Kept {
            from: c.src.clone(),
            to: c.dst.clone(),
            port: c.probe.to_string(),
            path: c.path,
            count: c.count,
            rule,
        };
        if c.src == c.dst {
            out.skipped.push(skip(
                "self",
                "traffic of an identity to itself is outside the policy".into(),
            ));
            continue;
        }
        let (a, b) = match (m.identity(&c.src), m.identity(&c.dst)) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => {
                let mut outside = Vec::new();
                if a.is_none() {
                    outside.push(format!("{} ({})", c.src, c.src_address));
                }
                if b.is_none() {
                    outside.push(format!("{} ({})", c.dst, c.dst_address));
                }
                let hint = if c.path == Way::Underlay {
                    "; an underlay entry can name a network in `from`"
                } else {
                    ""
                };
                out.skipped.push(skip(
                    "outside",
                    format!("not an identity of the base: {}{hint}", outside.join(", ")),
                ));
                continue;
            }
        };
        if ![proto::TCP, proto::UDP, proto::ICMP].contains(&c.probe.proto) {
            out.skipped.push(skip(
                "protocol",
                format!(
                    "IP protocol {}: a rule can name it only with `any`, which allows every protocol",
                    c.probe.proto
                ),
            ));
            continue;
        }
        if ephemeral.contains(&(c.dst.as_str(), c.probe.proto))
            && c.probe.port >= opt.ephemeral_floor
        {
            out.skipped.push(skip(
                "ephemeral",
                format!(
                    "ephemeral port: {} saw {} or more distinct {} ports from {} up",
                    c.dst,
                    opt.ephemeral_distinct,
                    proto_name(c.probe.proto),
                    opt.ephemeral_floor
                ),
            ));
            continue;
        }
        // With the servers' own addresses (spec §8), a rule moves an underlay connection between
        // two servers into their tunnel without any change to the application: it becomes a
        // rule, not an underlay entry, and `enforce` can then close the underlay.
        let way = match m.policy().addressing {
            bulkhead_allowlist::Addressing::Underlay => Way::Overlay,
            bulkhead_allowlist::Addressing::Overlay => c.path,
        };
        match way {
            Way::Overlay => {
                let d = evaluate(m, a, b, c.probe, &st);
                let rule = d.rule.map(|r| m.rule(r).name.clone());
                if d.allowed {
                    out.kept.push(kept(rule));
                } else if let Some(r) = rule {
                    out.skipped.push(skip(
                        "denied-by-rule",
                        format!(
                            "the base's deny rule {r:?} forbids it, and no allow rule overrides \
                             a deny: change that rule if this connection must work"
                        ),
                    ));
                } else {
                    over.add(a, b, c.probe, i);
                }
            }
            Way::Underlay => {
                let Some(block) = block else {
                    out.kept.push(kept(None));
                    continue;
                };
                let e = underlay::explain(m, &st, a, b, c.probe, Some(c.src_address));
                if underlay_passes(&e) {
                    let entry = match &e.inbound.filter {
                        underlay::Filter::Allowed { entry } => Some(entry.name.clone()),
                        _ => match &e.outbound.filter {
                            underlay::Filter::Allowed { entry } => Some(entry.name.clone()),
                            _ => None,
                        },
                    };
                    out.kept.push(kept(entry));
                } else if block.in_scope(m, a) && !block.in_scope(m, b) {
                    out.skipped.push(skip(
                        "outside-scope",
                        format!(
                            "{} is outside the underlay's scope, so no entry can name it in `to`, \
                             while {}'s firewall filters what it opens: widen the scope",
                            c.dst, c.src
                        ),
                    ));
                } else {
                    under.add(a, b, c.probe, i);
                }
            }
        }
    }

    let mut groups = Groups::new(m);
    let over_rects = cover(
        &mut groups,
        &over,
        |x, y, p| {
            let d = evaluate(m, x, y, p, &st);
            // Allowed already, or forbidden by a deny rule that a new allow cannot lift.
            d.allowed || d.rule.is_some()
        },
        |_| true,
        opt.coverage,
    );
    let under_rects = match block {
        Some(block) => cover(
            &mut groups,
            &under,
            |x, y, p| underlay_passes(&underlay::explain(m, &st, x, y, p, None)),
            |g| g.members.iter().all(|&i| block.in_scope(m, i)),
            opt.coverage,
        ),
        None => Vec::new(),
    };

    let mut names = Names::new(m);
    out.rules = merge(over_rects)
        .into_iter()
        .map(|r| names.render(m, &r, &conns, &over, Kind::Rule))
        .collect();
    out.underlay = merge(under_rects)
        .into_iter()
        .map(|r| names.render(m, &r, &conns, &under, Kind::Entry))
        .collect();
    out.rules.sort_by(|a, b| a.name.cmp(&b.name));
    out.underlay.sort_by(|a, b| a.name.cmp(&b.name));
    out.segments = names.segments;
    out.segments.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether both ends' firewalls let an underlay connection through without logging it.
fn underlay_passes(e: &underlay::Explanation) -> bool {
    e.verdict == underlay::Verdict::Allow
        && e.outbound.would_deny() == Some(false)
        && e.inbound.would_deny() == Some(false)
}

fn proto_name(p: u8) -> String {
    Probe { proto: p, port: 0 }
        .to_string()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The `(responder, protocol)`s whose high ports are ephemeral.
fn ephemeral_ports<'a>(conns: &'a [Connection], opt: &Options) -> HashSet<(&'a str, u8)> {
    let mut high: HashMap<(&str, u8), BTreeSet<u16>> = HashMap::new();
    for c in conns {
        if [proto::TCP, proto::UDP].contains(&c.probe.proto) && c.probe.port >= opt.ephemeral_floor
        {
            high.entry((c.dst.as_str(), c.probe.proto))
                .or_default()
                .insert(c.probe.port);
        }
    }
    high.into_iter()
        .filter(|(_, ports)| ports.len() >= opt.ephemeral_distinct)
        .map(|(k, _)| k)
        .collect()
}

/// The pairs that need a rule, per protocol and port, and which connection each is.
#[derive(Default)]
struct Needs {
    pairs: BTreeMap<Probe, BTreeSet<(IdentityId, IdentityId)>>,
    conn: HashMap<(IdentityId, IdentityId, Probe), usize>,
}

impl Needs {
    fn add(&mut self, a: IdentityId, b: IdentityId, p: Probe, conn: usize) {
        self.pairs.entry(p).or_default().insert((a, b));
        self.conn.insert((a, b, p), conn);
    }

    fn contains(&self, a: IdentityId, b: IdentityId, p: Probe) -> bool {
        self.conn.contains_key(&(a, b, p))
    }
}

/// How a group is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    /// A segment of the base.
    Segment(SegmentId),
    /// One identity.
    Identity(IdentityId),
    /// A new segment of those carrying these labels.
    Labels(Vec<(String, String)>),
}

impl Repr {
    /// Lower is preferred among groups with the same members.
    fn rank(&self) -> (u8, usize) {
        match self {
            Repr::Segment(_) => (0, 0),
            Repr::Identity(_) => (1, 0),
            Repr::Labels(l) => (2, usize::MAX - l.len()),
        }
    }
}

/// A set of identities and how to write it.
#[derive(Debug, Clone)]
struct Group {
    repr: Repr,
    members: Rc<[IdentityId]>,
}

/// The candidate groups of each identity, built once.
struct Groups<'m> {
    m: &'m Model,
    by_label: HashMap<(&'m str, &'m str), Vec<IdentityId>>,
    of: HashMap<IdentityId, Rc<[Group]>>,
}

impl<'m> Groups<'m> {
    fn new(m: &'m Model) -> Groups<'m> {
        let mut by_label: HashMap<(&str, &str), Vec<IdentityId>> = HashMap::new();
        for id in m.identity_ids() {
            for (k, v) in m.labels(id) {
                by_label.entry((k, v)).or_default().push(id);
            }
        }
        Groups {
            m,
            by_label,
            of: HashMap::new(),
        }
    }

    /// The identities carrying every label of `set`, ascending.
    fn carrying(&self, set: &[(&str, &str)]) -> Vec<IdentityId> {
        let mut lists: Vec<&Vec<IdentityId>> = set
            .iter()
            .filter_map(|&(k, v)| self.by_label.get(&(k, v)))
            .collect();
        if lists.len() < set.len() {
            return Vec::new();
        }
        lists.sort_by_key(|l| l.len());
        let mut out = lists[0].clone();
        for l in &lists[1..] {
            out.retain(|id| l.binary_search(id).is_ok());
        }
        out
    }

    /// The groups holding `id`, one per distinct member set (the preferred way of writing it),
    /// smallest first.
    fn of(&mut self, id: IdentityId) -> Rc<[Group]> {
        if let Some(g) = self.of.get(&id) {
            return g.clone();
        }
        let m = self.m;
        let mut all: Vec<Group> = vec![Group {
            repr: Repr::Identity(id),
            members: Rc::from(vec![id]),
        }];
        for &s in m.segments_of(id) {
            all.push(Group {
                repr: Repr::Segment(s),
                members: Rc::from(m.members(s).to_vec()),
            });
        }
        let labels: Vec<(&str, &str)> = m
            .labels(id)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let n = labels.len();
        for mask in 1u32..(1u32 << n.min(16)) {
            let size = mask.count_ones() as usize;
            if n > 4 && size > 2 && size != n {
                continue;
            }
            let set: Vec<(&str, &str)> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| labels[i])
                .collect();
            let members = self.carrying(&set);
            all.push(Group {
                repr: Repr::Labels(
                    set.iter()
                        .map(|&(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                members: Rc::from(members),
            });
        }
        let mut best: BTreeMap<Rc<[IdentityId]>, Group> = BTreeMap::new();
        for g in all {
            match best.get(&g.members) {
                Some(b) if (b.repr.rank(), &b.repr) <= (g.repr.rank(), &g.repr) => {}
                _ => {
                    best.insert(g.members.clone(), g);
                }
            }
        }
        let mut v: Vec<Group> = best.into_values().collect();
        v.sort_by(|a, b| {
            (a.members.len(), a.repr.rank(), &a.repr).cmp(&(
                b.members.len(),
                b.repr.rank(),
                &b.repr,
            ))
        });
        let v: Rc<[Group]> = Rc::from(v);
        self.of.insert(id, v.clone());
        v
    }
}

/// A product of two groups for one protocol and port.
struct Rect {
    from: Group,
    to: Group,
    probe: Probe,
    /// The pairs needing a rule that this product was chosen for.
    pairs: Vec<(IdentityId, IdentityId)>,
    /// Pairs in it neither observed nor allowed before.
    unobserved: usize,
}

/// The best product so far for one pair: the lowest `key` (most pairs covered, then the
/// smallest product, then the preferred ways of writing it) and the groups' indexes.
struct Choice {
    key: (std::cmp::Reverse<usize>, usize, (u8, usize)),
    from: usize,
    to: usize,
    unobserved: usize,
}

/// Covers every needed pair with products of groups; see the module docs.
fn cover(
    groups: &mut Groups<'_>,
    needs: &Needs,
    ok: impl Fn(IdentityId, IdentityId, Probe) -> bool,
    responders: impl Fn(&Group) -> bool,
    coverage: f64,
) -> Vec<Rect> {
    let mut rects = Vec::new();
    for (&probe, pairs) in &needs.pairs {
        let mut uncovered: HashSet<(IdentityId, IdentityId)> = pairs.iter().copied().collect();
        for &(a, b) in pairs {
            if !uncovered.contains(&(a, b)) {
                continue;
            }
            let (ga, gb) = (groups.of(a), groups.of(b));
            let mut best: Option<Choice> = None;
            for (i, s) in ga.iter().enumerate() {
                for (j, d) in gb.iter().enumerate().filter(|(_, d)| responders(d)) {
                    let Some((covered, product, unobserved)) =
                        score(s, d, probe, needs, &uncovered, &ok, coverage)
                    else {
                        continue;
                    };
                    let rank = {
                        let (x, y) = (s.repr.rank(), d.repr.rank());
                        (x.0 + y.0, x.1.saturating_add(y.1))
                    };
                    let choice = Choice {
                        key: (std::cmp::Reverse(covered), product, rank),
                        from: i,
                        to: j,
                        unobserved,
                    };
                    if best.as_ref().is_none_or(|b| choice.key < b.key) {
                        best = Some(choice);
                    }
                }
            }
            // The pair alone always qualifies: it was observed.
            let Some(Choice {
                from,
                to,
                unobserved,
                ..
            }) = best
            else {
                continue;
            };
            let (s, d) = (ga[from].clone(), gb[to].clone());
            let mut mine = Vec::new();
            for &x in s.members.iter() {
                for &y in d.members.iter() {
                    if uncovered.remove(&(x, y)) {
                        mine.push((x, y));
                    }
                }
            }
            rects.push(Rect {
                from: s,
                to: d,
                probe,
                pairs: mine,
                unobserved,
            });
        }
    }
    rects
}

/// For a product: the needed pairs it would newly cover, its size (pairs of two different
/// identities), and its pairs neither observed nor allowed before; `None` if too many are.
fn score(
    s: &Group,
    d: &Group,
    probe: Probe,
    needs: &Needs,
    uncovered: &HashSet<(IdentityId, IdentityId)>,
    ok: &impl Fn(IdentityId, IdentityId, Probe) -> bool,
    coverage: f64,
) -> Option<(usize, usize, usize)> {
    let both = s
        .members
        .iter()
        .filter(|x| d.members.binary_search(x).is_ok())
        .count();
    let product = s.members.len() * d.members.len() - both;
    let allowed_misses = ((1.0 - coverage.clamp(0.0, 1.0)) * product as f64 + 1e-9) as usize;
    let (mut covered, mut misses) = (0, 0);
    for &x in s.members.iter() {
        for &y in d.members.iter() {
            if x == y {
                continue;
            }
            if needs.contains(x, y, probe) {
                covered += usize::from(uncovered.contains(&(x, y)));
            } else if !ok(x, y, probe) {
                misses += 1;
                if misses > allowed_misses {
                    return None;
                }
            }
        }
    }
    (covered > 0).then_some((covered, product, misses))
}

/// A rule before it is named: groups on each side and the ports.
struct Merged {
    from: Vec<Group>,
    to: Vec<Group>,
    probes: BTreeSet<Probe>,
    pairs: Vec<(IdentityId, IdentityId, Probe)>,
    unobserved: usize,
}

/// Products of the same groups become one rule with all their ports; then rules with the same
/// responders and ports take their initiators together, and the other way round.
fn merge(rects: Vec<Rect>) -> Vec<Merged> {
    let mut by_pair: BTreeMap<(Repr, Repr), Merged> = BTreeMap::new();
    for r in rects {
        let e = by_pair
            .entry((r.from.repr.clone(), r.to.repr.clone()))
            .or_insert_with(|| Merged {
                from: vec![r.from.clone()],
                to: vec![r.to.clone()],
                probes: BTreeSet::new(),
                pairs: Vec::new(),
                unobserved: 0,
            });
        e.probes.insert(r.probe);
        e.pairs
            .extend(r.pairs.iter().map(|&(a, b)| (a, b, r.probe)));
        e.unobserved += r.unobserved;
    }
    let join =
        |items: Vec<Merged>, key: fn(&Merged) -> (Vec<Repr>, Vec<Probe>), into_from: bool| {
            let mut by: BTreeMap<(Vec<Repr>, Vec<Probe>), Merged> = BTreeMap::new();
            for it in items {
                match by.entry(key(&it)) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(it);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        let e = o.get_mut();
                        if into_from {
                            e.from.extend(it.from);
                        } else {
                            e.to.extend(it.to);
                        }
                        e.pairs.extend(it.pairs);
                        e.unobserved += it.unobserved;
                    }
                }
            }
            by.into_values().collect::<Vec<Merged>>()
        };
    let merged: Vec<Merged> = by_pair.into_values().collect();
    let merged = join(
        merged,
        |m| {
            (
                m.to.iter().map(|g| g.repr.clone()).collect(),
                m.probes.iter().copied().collect(),
            )
        },
        true,
    );
    let mut merged = join(
        merged,
        |m| {
            (
                m.from.iter().map(|g| g.repr.clone()).collect(),
                m.probes.iter().copied().collect(),
            )
        },
        false,
    );
    for m in &mut merged {
        m.from.sort_by_key(|g| g.repr.clone());
        m.to.sort_by_key(|g| g.repr.clone());
        m.pairs.sort_unstable();
    }
    merged
}

/// A suggested rule, or an underlay entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rule,
    Entry,
}

/// Names for what is added: segments (not the name of any identity or segment), rules and
/// underlay entries (not the name of any other).
struct Names {
    taken_groups: HashSet<String>,
    rules: HashSet<String>,
    entries: HashSet<String>,
    new_segments: HashMap<Vec<(String, String)>, String>,
    segments: Vec<NewSegment>,
}

impl Names {
    fn new(m: &Model) -> Names {
        let p = m.policy();
        Names {
            taken_groups: p
                .identities
                .iter()
                .map(|i| i.name.clone())
                .chain(p.segments.iter().map(|s| s.name.clone()))
                .collect(),
            rules: p.rules.iter().map(|r| r.name.clone()).collect(),
            entries: p
                .underlay
                .iter()
                .flat_map(|u| u.allow.iter().map(|e| e.name.value.clone()))
                .collect(),
            new_segments: HashMap::new(),
            segments: Vec::new(),
        }
    }

    fn group(&mut self, m: &Model, g: &Group) -> String {
        match &g.repr {
            Repr::Segment(s) => m.segment_name(*s).to_string(),
            Repr::Identity(i) => m.identity_name(*i).to_string(),
            Repr::Labels(l) => {
                if let Some(n) = self.new_segments.get(l) {
                    return n.clone();
                }
                let base = slug(
                    &l.iter()
                        .map(|(k, v)| format!("{k}-{v}"))
                        .collect::<Vec<_>>()
                        .join("-"),
                );
                let name = unique(&base, &self.taken_groups);
                self.taken_groups.insert(name.clone());
                self.new_segments.insert(l.clone(), name.clone());
                self.segments.push(NewSegment {
                    name: name.clone(),
                    labels: l.iter().cloned().collect(),
                    members: g
                        .members
                        .iter()
                        .map(|&i| m.identity_name(i).to_string())
                        .collect(),
                });
                name
            }
        }
    }

    fn render(
        &mut self,
        m: &Model,
        r: &Merged,
        conns: &[Connection],
        needs: &Needs,
        kind: Kind,
    ) -> Suggested {
        let from: Vec<String> = r.from.iter().map(|g| self.group(m, g)).collect();
        let to: Vec<String> = r.to.iter().map(|g| self.group(m, g)).collect();
        let side = |v: &[String]| match v {
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first}-and-{}", rest.len()),
            [] => String::new(),
        };
        let base = slug(&format!("{}-to-{}", side(&from), side(&to)));
        let taken = match kind {
            Kind::Rule => &mut self.rules,
            Kind::Entry => &mut self.entries,
        };
        let name = unique(&base, taken);
        taken.insert(name.clone());
        let covers = r
            .pairs
            .iter()
            .filter_map(|k| needs.conn.get(k))
            .map(|&i| {
                let c = &conns[i];
                Covered {
                    from: c.src.clone(),
                    to: c.dst.clone(),
                    port: c.probe.to_string(),
                    count: c.count,
                    denied: c.denied,
                    would_deny: c.would_deny,
                    first: c.first,
                    last: c.last,
                }
            })
            .collect();
        Suggested {
            name,
            from,
            to,
            ports: port_list(&r.probes),
            covers,
            unobserved: r.unobserved,
        }
    }
}

/// Ports as a rule writes them, consecutive ones as ranges: `tcp/80`, `tcp/8000-8002`, `icmp`.
fn port_list(probes: &BTreeSet<Probe>) -> Vec<String> {
    let mut out = Vec::new();
    for p in [proto::TCP, proto::UDP] {
        let name = proto_name(p);
        let ports: Vec<u16> = probes
            .iter()
            .filter(|x| x.proto == p)
            .map(|x| x.port)
            .collect();
        let mut i = 0;
        while i < ports.len() {
            let mut j = i;
            while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
                j += 1;
            }
            out.push(if i == j {
                format!("{name}/{}", ports[i])
            } else {
                format!("{name}/{}-{}", ports[i], ports[j])
            });
            i = j + 1;
        }
    }
    if probes.iter().any(|x| x.proto == proto::ICMP) {
        out.push("icmp".into());
    }
    out
}

/// A valid name from any text: lower case `a-z`, `0-9` and `-`, at most 63 characters.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-');
    let mut out: String = out.chars().take(56).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("suggested");
    }
    out
}

/// `base`, or `base-2`, `base-3`, … : the first not in `taken`.
fn unique(base: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| base.to_string())
}

impl Suggestion {
    /// Whether there is nothing to add.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.rules.is_empty() && self.underlay.is_empty()
    }

    /// Observed connections the suggestion lets through: kept by the base or covered by a new
    /// rule or entry.
    pub fn covered(&self) -> usize {
        self.kept.len()
            + self
                .rules
                .iter()
                .chain(&self.underlay)
                .map(|r| r.covers.len())
                .sum::<usize>()
    }

    /// The segments to add, each as lines of YAML from column 0 (`NAME:` and its body).
    pub fn segment_items(&self) -> Vec<Vec<String>> {
        self.segments
            .iter()
            .map(|s| {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{}: {}", scalar(k), scalar(v)))
                    .collect();
                vec![
                    format!("{}:", s.name),
                    format!("  match: {{ {} }}", labels.join(", ")),
                ]
            })
            .collect()
    }

    /// The rules to add, each as lines of YAML from column 0 (`- name: …`).
    pub fn rule_items(&self) -> Vec<Vec<String>> {
        self.rules.iter().map(item).collect()
    }

    /// The underlay entries to add, like [`Suggestion::rule_items`].
    pub fn underlay_items(&self) -> Vec<Vec<String>> {
        self.underlay.iter().map(item).collect()
    }

    /// The additions as one YAML document: `segments`, `rules` and `underlay.allow`, as far as
    /// there is something to add, after `header` (comment lines).
    pub fn yaml(&self, header: &str) -> String {
        let mut out = String::from(header);
        let mut block = |key: &str, items: Vec<Vec<String>>, indent: usize| {
            if items.is_empty() {
                return;
            }
            out += key;
            for it in items {
                for line in it {
                    out += &format!("{}{line}\n", " ".repeat(indent));
                }
            }
        };
        block("segments:\n", self.segment_items(), 2);
        block("rules:\n", self.rule_items(), 2);
        block("underlay:\n  allow:\n", self.underlay_items(), 4);
        if self.is_empty() {
            out += "{}\n";
        }
        out
    }
}

/// One rule or entry as YAML lines, with a comment on what it covers.
fn item(r: &Suggested) -> Vec<String> {
    let Coverage {
        pairs,
        flows,
        first,
        last,
    } = r.coverage();
    let mut comment = format!(
        "# {} observed connection(s) of {} pair(s), {flows} flow(s), {} to {}",
        r.covers.len(),
        pairs,
        day(first),
        day(last)
    );
    if r.unobserved > 0 {
        comment += &format!("; also allows {} unobserved pair-port(s)", r.unobserved);
    }
    vec![
        comment,
        format!("- name: {}", r.name),
        format!("  from: [{}]", r.from.join(", ")),
        format!("  to: [{}]", r.to.join(", ")),
        format!("  ports: [{}]", r.ports.join(", ")),
    ]
}

/// Unix milliseconds as a date, `2026-12-01`.
pub(crate) fn day(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| ms.to_string(),
        |t| t.to_string().chars().take(10).collect(),
    )
}

/// A label key or value as YAML: plain where that reads back as the same text, else quoted.
fn scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        return s.to_string();
    }
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q += "\\\"",
            '\\' => q += "\\\\",
            c if c.is_control() => q += &format!("\\u{:04x}", c as u32),
            c => q.push(c),
        }
    }
    q + "\""
}

#[cfg(test)]
mod tests;
