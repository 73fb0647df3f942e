//! The underlay part of each identity's allowlist, and which identities' parts one identity's
//! change can touch.

use bulkhead_allowlist::{Network, Underlay, UnderlayHost, UnderlayMode, UnderlayRule};

use crate::eval::State;
use crate::model::{IdentityId, Model, Side};

use super::Block;

/// `"*"` in `from`: every address.
pub(crate) const ANYWHERE: Network = Network {
    address: std::net::Ipv4Addr::UNSPECIFIED,
    prefix_len: 0,
};

/// The identities `side` names (by name, segment or `*`), ascending, each once.
fn members(m: &Model, side: &Side) -> Vec<IdentityId> {
    let mut v = Vec::new();
    m.for_each_on_side(side, &[], |i| v.push(i));
    v.sort_unstable();
    v.dedup();
    v
}

/// The block, if it puts any server under a firewall.
fn active(m: &Model) -> Option<&Block> {
    m.underlay().filter(|b| b.mode != UnderlayMode::Off)
}

/// The underlay part of `id`'s allowlist in `st`: `None` with no block, `mode: off`, or `id`
/// outside the scope. See the module docs of [`crate::underlay`] for what goes in.
pub(crate) fn underlay_of(m: &Model, st: &State, id: IdentityId) -> Option<Underlay> {
    let b = active(m).filter(|b| b.in_scope(m, id))?;
    let quarantined = |i: IdentityId| st.quarantined.get(i as usize).copied().unwrap_or(false);
    let name = |i: IdentityId| UnderlayHost::Identity(m.identity_name(i).to_string());
    let mut inbound = Vec::new();
    for e in b.entries.iter().filter(|e| m.on_side(&e.to, id, false)) {
        let mut hosts: Vec<UnderlayHost> =
            e.from_nets.iter().map(|&n| UnderlayHost::Net(n)).collect();
        if e.from_anywhere {
            hosts.push(UnderlayHost::Net(ANYWHERE));
        }
        hosts.extend(
            members(m, &e.from)
                .into_iter()
                .filter(|&i| i != id && !quarantined(i))
                .map(name),
        );
        hosts.sort_unstable();
        hosts.dedup();
        if !hosts.is_empty() {
            inbound.push(UnderlayRule {
                name: e.name.clone(),
                hosts,
                ports: e.ports.clone(),
            });
        }
    }
    let mut outbound = Vec::new();
    if !quarantined(id) {
        for e in b.entries.iter().filter(|e| m.on_side(&e.from, id, false)) {
            // Identity ids are in name order, so these are sorted.
            let hosts: Vec<UnderlayHost> = members(m, &e.to)
                .into_iter()
                .filter(|&i| i != id && b.in_scope(m, i))
                .map(name)
                .collect();
            if !hosts.is_empty() {
                outbound.push(UnderlayRule {
                    name: e.name.clone(),
                    hosts,
                    ports: e.ports.clone(),
                });
            }
        }
    }
    Some(Underlay {
        mode: b.mode,
        inbound,
        outbound,
    })
}

/// The entries that name one identity: what other identities' underlay parts it appears in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Footprint {
    /// Entries whose `from` names it, by name or segment: it is a host of their inbound side.
    from: Vec<u32>,
    /// Entries whose `to` holds it while it is in scope: it is a host of their outbound side.
    to: Vec<u32>,
}

/// Where `id` appears in the block; empty with no block or `mode: off`.
pub(crate) fn footprint(m: &Model, id: IdentityId) -> Footprint {
    let mut f = Footprint::default();
    let Some(b) = active(m) else {
        return f;
    };
    let in_scope = b.in_scope(m, id);
    for (i, e) in b.entries.iter().enumerate() {
        if m.on_side(&e.from, id, false) {
            f.from.push(i as u32);
        }
        if in_scope && m.on_side(&e.to, id, false) {
            f.to.push(i as u32);
        }
    }
    f
}

/// Adds to `out` the identities whose underlay part may change when one identity's footprint
/// goes from `before` to `after`, or its quarantine changes: the servers on the other side of
/// every entry it was or is in. The identity itself is not added.
pub(crate) fn touched(m: &Model, before: &Footprint, after: &Footprint, out: &mut Vec<IdentityId>) {
    let Some(b) = active(m) else {
        return;
    };
    let union = |x: &[u32], y: &[u32]| {
        let mut v: Vec<u32> = x.iter().chain(y).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut add = |entries: Vec<u32>, other_side: fn(&super::Entry) -> &Side| {
        for e in entries {
            let side = other_side(&b.entries[e as usize]);
            out.extend(members(m, side).into_iter().filter(|&i| b.in_scope(m, i)));
        }
    };
    add(union(&before.from, &after.from), |e| &e.to);
    add(union(&before.to, &after.to), |e| &e.from);
}
