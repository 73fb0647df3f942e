//! The `underlay` block (spec §7): what the host firewall on each server in scope lets through
//! besides the tunnels and the controller API.
//!
//! ```yaml
//! underlay:
//!   mode: enforce            # off (default) | observe | enforce
//!   scope: [prod]            # segments; default every identity
//!   allow:
//!     - name: mgmt-ssh
//!       from: [10.0.9.0/24]  # networks, identities, segments or "*"
//!       to: ["*"]            # identities or segments in scope, or "*"
//!       ports: [tcp/22]
//! ```
//!
//! `read` checks the block's form, `resolve` its names against the model, [`explain`] answers
//! for one connection and [`plan`] tells two policies apart. `underlay_of` compiles the block
//! into one identity's [`Underlay`], which [`crate::Compiled::allowlist`] puts in its allowlist:
//!
//! - `None` with no block, with `mode: off`, and for an identity outside the scope: its server
//!   has no host firewall.
//! - `inbound`: the entries whose `to` holds the identity (`*` holds everyone in scope), in
//!   policy order. Their hosts are the entry's `from`: networks as written, `*` as `0.0.0.0/0`,
//!   identities and segment members as identities (their servers' own addresses, which the
//!   controller fills in), sorted, without repeats. The identity itself is left out: a server's
//!   traffic to itself is loopback, always allowed.
//! - `outbound`: the entries whose `from` names the identity, by name or through a segment (a
//!   network or `*` that happens to hold its address does not count: that is a matter of
//!   addresses, not of the policy), with the servers of their `to` other than itself.
//! - An entry left with no hosts is dropped.
//!
//! **Quarantine.** A quarantined identity's server keeps its inbound entries, so that operators
//! can still reach it (SSH from a management network, for instance), but loses its outbound
//! ones, and it is taken out of every other server's inbound hosts. A network or `*` in `from`
//! still covers its address: the policy knows identities, not addresses.
//!
//! **Posture** does not apply: the underlay is about servers, whatever they run, and a failing
//! check must not lock operators out of a server they need to repair.
//!
//! [`Underlay`]: bulkhead_allowlist::Underlay

mod compile;
mod explain;
mod plan;
mod read;

use std::collections::HashMap;

use bulkhead_allowlist::{Network, PortSpec, UnderlayMode};

use crate::ast::{Spanned, UnderlaySource};
use crate::diag::{Diags, Pos};
use crate::model::{EVERYONE, IdentityId, Model, QUARANTINED, SegmentId, Side};

pub(crate) use compile::{Footprint, footprint, touched, underlay_of};
pub use explain::{End, EntryAt, Explanation, Filter, Verdict, explain};
pub use plan::{BlockChange, Plan, ServerChange, plan};
pub(crate) use read::read;

/// The `underlay` block, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The mode of every server in scope.
    pub mode: UnderlayMode,
    /// The segments in scope, ascending; `None`: every identity.
    pub scope: Option<Vec<SegmentId>>,
    /// `allow`, in file order.
    pub entries: Vec<Entry>,
}

/// One `allow` entry, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Where it starts in the file.
    pub pos: Pos,
    /// The networks in `from`, in file order, without repeats.
    pub from_nets: Vec<Network>,
    /// `"*"` in `from`: any address.
    pub from_anywhere: bool,
    /// The identities and segments in `from`, meaning their servers' own addresses. Never `*`
    /// or `quarantined`.
    pub from: Side,
    /// The servers that accept: identities, segments or `*` (every identity in scope).
    pub to: Side,
    /// The ports it covers, as written.
    pub ports: Vec<PortSpec>,
}

impl Block {
    /// Whether `id`'s server is in scope.
    pub fn in_scope(&self, m: &Model, id: IdentityId) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|s| m.segments_of(id).iter().any(|g| s.binary_search(g).is_ok()))
    }

    /// The mode of `id`'s server: the block's inside the scope, `off` outside.
    pub fn mode_of(&self, m: &Model, id: IdentityId) -> UnderlayMode {
        if self.in_scope(m, id) {
            self.mode
        } else {
            UnderlayMode::Off
        }
    }

    /// The entry with this name.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Resolves the model's `underlay` block, if it has one. Errors go to `d`; what does not
/// resolve is left out.
pub(crate) fn resolve(m: &Model, d: &mut Diags) -> Option<Block> {
    let def = m.policy().underlay.as_ref()?;
    let scope = def.scope.as_ref().map(|names| {
        let mut v: Vec<SegmentId> = names
            .iter()
            .filter_map(|n| scope_segment(m, n, d))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    });
    let mut block = Block {
        mode: def.mode,
        scope,
        entries: Vec::with_capacity(def.allow.len()),
    };
    let mut first: HashMap<&str, Pos> = HashMap::new();
    for e in &def.allow {
        if let Some(at) = first.get(e.name.value.as_str()) {
            d.error(
                e.name.pos,
                format!(
                    "duplicate underlay allow entry name {:?} (first at {at})",
                    e.name.value
                ),
            );
        } else {
            first.insert(&e.name.value, e.name.pos);
        }
        let mut entry = Entry {
            name: e.name.value.clone(),
            pos: e.pos,
            from_nets: Vec::new(),
            from_anywhere: false,
            from: Side::default(),
            to: Side::default(),
            ports: e.ports.iter().map(|p| p.value).collect(),
        };
        for s in &e.from {
            match &s.value {
                UnderlaySource::Net(n) => {
                    if !entry.from_nets.contains(n) {
                        entry.from_nets.push(*n);
                    }
                }
                UnderlaySource::Name(n) if n == EVERYONE => entry.from_anywhere = true,
                UnderlaySource::Name(n) => {
                    let named = Spanned {
                        pos: s.pos,
                        value: n.clone(),
                    };
                    add_name(m, &mut entry.from, &named, "from", d);
                }
            }
        }
        for n in &e.to {
            if n.value == EVERYONE {
                entry.to.all = true;
            } else if add_name(m, &mut entry.to, n, "to", d) {
                outside_scope(m, &block, n, d);
            }
        }
        for side in [&mut entry.from, &mut entry.to] {
            side.segments.sort_unstable();
            side.segments.dedup();
            side.identities.sort_unstable();
            side.identities.dedup();
        }
        block.entries.push(entry);
    }
    // An unresolved name already has its error; do not pile warnings on it.
    if !d.has_errors() {
        let nobody = |s: &Side| {
            !s.all && s.identities.is_empty() && s.segments.iter().all(|&g| m.members(g).is_empty())
        };
        for e in &block.entries {
            if nobody(&e.to) || (nobody(&e.from) && e.from_nets.is_empty() && !e.from_anywhere) {
                d.warning(
                    e.pos,
                    format!(
                        "underlay allow entry {:?} matches no identity on one side",
                        e.name
                    ),
                );
            }
        }
    }
    Some(block)
}

/// A name in `scope`: a segment.
fn scope_segment(m: &Model, n: &Spanned<String>, d: &mut Diags) -> Option<SegmentId> {
    let v = n.value.as_str();
    let segment = m.segment(v);
    let why = match (v, segment, m.identity(v)) {
        (_, Some(s), _) => return Some(s),
        (EVERYONE, ..) => "`scope` takes segments; leave it out to mean every identity".to_string(),
        (QUARANTINED, ..) => {
            "the built-in segment `quarantined` cannot be the underlay's scope".to_string()
        }
        (_, None, Some(_)) => format!(
            "{v:?} is an identity; `scope` takes segments (a segment can list it: \
             `identities: [{v}]`)"
        ),
        (_, None, None) => format!("undefined segment {v:?}"),
    };
    d.error(n.pos, why);
    None
}

/// Adds an identity or segment name to `side`, or reports why not. Returns whether it was
/// added.
fn add_name(m: &Model, side: &mut Side, n: &Spanned<String>, key: &str, d: &mut Diags) -> bool {
    let v = n.value.as_str();
    match (v, m.segment(v), m.identity(v)) {
        (_, Some(_), Some(_)) => d.error(
            n.pos,
            format!("{v:?} is both a segment and an identity; rename one of them"),
        ),
        (_, Some(s), None) => {
            side.segments.push(s);
            return true;
        }
        (_, None, Some(i)) => {
            side.identities.push(i);
            return true;
        }
        (QUARANTINED, None, None) => d.error(
            n.pos,
            "the underlay cannot name `quarantined`: a quarantined server is taken out of the \
             other servers' entries by itself",
        ),
        _ if key == "to" && read::looks_like_address(v) => d.error(
            n.pos,
            format!(
                "{v:?} in `to`: `to` names servers, by identity, segment or \"*\"; networks go \
                 in `from`"
            ),
        ),
        _ if key == "from" => d.error(
            n.pos,
            format!(
                "undefined segment or identity {v:?}; `from` takes IPv4 networks such as \
                 10.0.9.0/24, identities, segments or \"*\""
            ),
        ),
        _ => d.error(n.pos, format!("undefined segment or identity {v:?}")),
    }
    false
}

/// Reports a `to` name that holds identities outside the scope.
fn outside_scope(m: &Model, block: &Block, n: &Spanned<String>, d: &mut Diags) {
    let v = n.value.as_str();
    if let Some(i) = m.identity(v) {
        if !block.in_scope(m, i) {
            d.error(
                n.pos,
                format!("identity {v:?} is outside the underlay's scope"),
            );
        }
        return;
    }
    let Some(s) = m.segment(v) else {
        return;
    };
    let outside: Vec<&str> = m
        .members(s)
        .iter()
        .filter(|&&i| !block.in_scope(m, i))
        .map(|&i| m.identity_name(i))
        .collect();
    if outside.is_empty() {
        return;
    }
    const SHOWN: usize = 10;
    let mut list = outside[..outside.len().min(SHOWN)].join(", ");
    if outside.len() > SHOWN {
        list += &format!(" and {} more", outside.len() - SHOWN);
    }
    d.error(
        n.pos,
        format!("segment {v:?} has members outside the underlay's scope: {list}"),
    );
}

#[cfg(test)]
mod tests;
