//! "May A's server open this connection to B's server over the underlay?": what each end's host
//! firewall does with it, from the same underlay parts the nodes get.

use std::net::Ipv4Addr;

use bulkhead_allowlist::{Network, Underlay, UnderlayHost, UnderlayMode};
use serde::Serialize;

use crate::ast::Probe;
use crate::eval::{State, ports_cover};
use crate::model::{IdentityId, Model};

use super::underlay_of;

/// An allow entry, and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryAt {
    /// The entry's name.
    pub name: String,
    /// The line it starts on.
    pub line: u32,
}

/// What one end's host firewall does with the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Filter {
    /// No host firewall: `mode: off`, or the server is outside the scope.
    NotFiltered,
    /// This entry lets it through.
    Allowed {
        /// The first entry, in policy order, that does.
        entry: EntryAt,
    },
    /// No entry lets it through: dropped in `enforce`, logged as `would-deny` in `observe`.
    NoEntry,
    /// Only entries with networks in `from` could let it through: it depends on the initiator's
    /// underlay address, which the policy does not know.
    DependsOnAddress {
        /// Those entries, in policy order, with their networks.
        entries: Vec<(EntryAt, Vec<Network>)>,
    },
}

/// One end of the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct End {
    /// The identity whose server this is.
    pub identity: String,
    /// Its server's mode: the block's inside the scope, `off` outside.
    pub mode: UnderlayMode,
    /// Whether its server is in the scope.
    pub in_scope: bool,
    /// Whether the identity is quarantined.
    pub quarantined: bool,
    /// What the firewall does.
    pub filter: Filter,
}

impl End {
    /// Whether the connection gets through this end: `None` if that depends on an address.
    pub fn passes(&self) -> Option<bool> {
        match (self.mode, &self.filter) {
            (UnderlayMode::Enforce, Filter::NoEntry) => Some(false),
            (UnderlayMode::Enforce, Filter::DependsOnAddress { .. }) => None,
            _ => Some(true),
        }
    }

    /// Whether an `observe` server would log it as `would-deny` (`None`: depends on an address).
    pub fn would_deny(&self) -> Option<bool> {
        match (self.mode, &self.filter) {
            (UnderlayMode::Observe, Filter::NoEntry) => Some(true),
            (UnderlayMode::Observe, Filter::DependsOnAddress { .. }) => None,
            _ => Some(false),
        }
    }
}

/// The verdict over the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Both ends let it through.
    Allow,
    /// An end in `enforce` drops it.
    Deny,
    /// It depends on the initiator's underlay address.
    Depends,
}

/// The answer, end by end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Both ends together.
    pub verdict: Verdict,
    /// A server's connection to itself: loopback, always allowed, outside the policy.
    pub self_traffic: bool,
    /// The initiator's server, where the connection leaves.
    pub outbound: End,
    /// The responder's server, where it arrives.
    pub inbound: End,
}

/// May `a`'s server open a connection on `probe` to `b`'s server over the underlay, in `st`?
/// `from_address`: `a`'s underlay address, if known, to match networks in `from`.
pub fn explain(
    m: &Model,
    st: &State,
    a: IdentityId,
    b: IdentityId,
    probe: Probe,
    from_address: Option<Ipv4Addr>,
) -> Explanation {
    let block = m.underlay();
    let end = |id: IdentityId, u: &Option<Underlay>, filter: Filter| End {
        identity: m.identity_name(id).to_string(),
        mode: u.as_ref().map_or(UnderlayMode::Off, |u| u.mode),
        in_scope: block.is_some_and(|b| b.in_scope(m, id)),
        quarantined: st.quarantined.get(id as usize).copied().unwrap_or(false),
        filter,
    };
    let at = |name: &str| EntryAt {
        name: name.to_string(),
        line: block.and_then(|b| b.entry(name)).map_or(0, |e| e.pos.line),
    };
    let (ua, ub) = (underlay_of(m, st, a), underlay_of(m, st, b));
    let a_name = m.identity_name(a);
    let b_name = m.identity_name(b);

    let outbound = match &ua {
        None => Filter::NotFiltered,
        Some(u) => u
            .outbound
            .iter()
            .find(|r| {
                ports_cover(&r.ports, probe)
                    && r.hosts
                        .iter()
                        .any(|h| matches!(h, UnderlayHost::Identity(n) if n == b_name))
            })
            .map_or(Filter::NoEntry, |r| Filter::Allowed { entry: at(&r.name) }),
    };

    let inbound = match &ub {
        None => Filter::NotFiltered,
        Some(u) => {
            let mut maybe = Vec::new();
            let mut found = None;
            for r in u.inbound.iter().filter(|r| ports_cover(&r.ports, probe)) {
                let mut nets = Vec::new();
                let admits = r.hosts.iter().any(|h| match h {
                    UnderlayHost::Identity(n) => n == a_name,
                    UnderlayHost::Net(n) if n.prefix_len == 0 => true,
                    UnderlayHost::Net(n) => match from_address {
                        Some(ip) => n.contains(ip),
                        None => {
                            nets.push(*n);
                            false
                        }
                    },
                });
                if admits {
                    found = Some(at(&r.name));
                    break;
                }
                if !nets.is_empty() {
                    maybe.push((at(&r.name), nets));
                }
            }
            match (found, maybe.is_empty()) {
                (Some(entry), _) => Filter::Allowed { entry },
                (None, true) => Filter::NoEntry,
                (None, false) => Filter::DependsOnAddress { entries: maybe },
            }
        }
    };

    let self_traffic = a == b;
    // A server's traffic to itself is loopback, which no firewall filters.
    let (outbound, inbound) = if self_traffic {
        (Filter::NotFiltered, Filter::NotFiltered)
    } else {
        (outbound, inbound)
    };
    let outbound = end(a, &ua, outbound);
    let inbound = end(b, &ub, inbound);
    let verdict = if self_traffic {
        Verdict::Allow
    } else {
        match (outbound.passes(), inbound.passes()) {
            (Some(false), _) | (_, Some(false)) => Verdict::Deny,
            (None, _) | (_, None) => Verdict::Depends,
            _ => Verdict::Allow,
        }
    };
    Explanation {
        verdict,
        self_traffic,
        outbound,
        inbound,
    }
}
