//! The filter: the allowlist in force and the flows it let through. It decides whether a packet
//! between this node and one peer may pass (a tracked flow, or the peer's port table for new
//! ones), and cuts the flows that a new allowlist or the passing time no longer allows.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_allowlist::{Allowlist, Decision, UnixTime};

use crate::conntrack::{Conntrack, Flow, FlowKey, Initiator, Timeouts, Tracked};
use crate::node::Now;
use crate::packet::Ipv4;
use crate::share::FlowShare;
use crate::sink::DropReason;

/// Into how many shares the flow table is cut: the most one peer may hold is one of them.
pub(crate) const PEER_SHARES: usize = 4;

/// The allowlist in force, the flow table, and what they decided.
pub(crate) struct Filter {
    allowlist: Option<Allowlist>,
    conntrack: Conntrack,
    /// When a rule window next opens or closes: flows and peers are checked again then.
    next_boundary: Option<UnixTime>,
    /// Packets denied by each rule of the allowlist in force, by its index: counting by index
    /// costs no allocation, where counting by name would cost one per denied packet.
    denied: Vec<u64>,
    /// Packets denied under earlier allowlists, by rule name.
    denied_before: BTreeMap<String, u64>,
    flows_started: u64,
}

/// Which port tables of the allowlist govern one peer, as indexes into its `tables`. Copied
/// from the peer's entry whenever an allowlist is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tables {
    outbound: u32,
    inbound: u32,
}

impl Tables {
    pub(crate) fn of(peer: &bulkhead_allowlist::Peer) -> Tables {
        Tables {
            outbound: peer.outbound,
            inbound: peer.inbound,
        }
    }
}

/// A packet the filter let through.
pub(crate) enum Admitted<'a> {
    /// It belongs to a tracked flow (or the filter is off: the `unfiltered` benchmark build).
    Tracked,
    /// It opened a flow, under this rule.
    Opened {
        /// Who opened it.
        initiator: Initiator,
        /// The flow.
        key: FlowKey,
        /// The allow rule's name.
        rule: &'a str,
    },
}

impl Filter {
    /// Nothing passes until an allowlist is set. Each peer may hold a quarter of the
    /// `flow_capacity` flows (rounded up), so it takes at least four peers to fill the table.
    pub(crate) fn new(flow_capacity: usize) -> Filter {
        Filter {
            allowlist: None,
            conntrack: Conntrack::new(
                flow_capacity,
                flow_capacity.div_ceil(PEER_SHARES),
                Timeouts::default(),
            ),
            next_boundary: None,
            denied: Vec::new(),
            denied_before: BTreeMap::new(),
            flows_started: 0,
        }
    }

    pub(crate) fn allowlist(&self) -> Option<&Allowlist> {
        self.allowlist.as_ref()
    }

    /// Puts `allowlist` in force. Flows stay until [`Filter::revalidate`] checks them.
    pub(crate) fn set(&mut self, allowlist: Allowlist) {
        self.fold_denials();
        self.denied.resize(allowlist.rules.len(), 0);
        self.allowlist = Some(allowlist);
        self.next_boundary = None;
    }

    /// No allowlist, no flows: nothing passes.
    pub(crate) fn clear(&mut self) {
        self.fold_denials();
        self.denied.clear();
        self.allowlist = None;
        self.conntrack.retain(|_, _| None);
        self.next_boundary = None;
    }

    pub(crate) fn flow_count(&self) -> usize {
        self.conntrack.len()
    }

    pub(crate) fn flows(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.conntrack.iter()
    }

    /// The flows of the peer at `addr`, and what the table refused and evicted of them.
    pub(crate) fn share(&self, addr: Ipv4Addr) -> FlowShare {
        self.conntrack.share(addr)
    }

    /// Decides whether `p` may pass between this node and a peer governed by `tables`, and
    /// tracks it. `egress` is the direction.
    pub(crate) fn admit(
        &mut self,
        tables: Tables,
        p: &Ipv4,
        egress: bool,
        now: Now,
    ) -> Result<Admitted<'_>, (DropReason, FlowKey)> {
        if crate::UNFILTERED {
            return Ok(Admitted::Tracked);
        }
        let (key, from) = if egress {
            (FlowKey::egress(p), Initiator::Local)
        } else {
            (FlowKey::ingress(p), Initiator::Peer)
        };
        match self.conntrack.track(key, p, from, now.instant) {
            Tracked::Known(_) => return Ok(Admitted::Tracked),
            Tracked::CannotOpen => return Err((DropReason::NoFlow, key)),
            Tracked::New => {}
        }
        let Some(list) = &self.allowlist else {
            return Err((DropReason::NoAllowlist, key));
        };
        let rule = match decide(list, tables, from, p.proto, key.service_port(from), now) {
            Decision::Allow { rule } => &list.rules[rule as usize].name,
            Decision::Deny { rule: Some(r) } => {
                if let Some(n) = self.denied.get_mut(r as usize) {
                    *n += 1;
                }
                return Err((DropReason::DeniedByRule(r), key));
            }
            Decision::Deny { rule: None } => return Err((DropReason::NotAllowed, key)),
        };
        if !self.conntrack.open(key, from, rule, now.instant) {
            return Err((DropReason::TableFull, key));
        }
        self.flows_started += 1;
        Ok(Admitted::Opened {
            initiator: from,
            key,
            rule,
        })
    }

    /// Checks every tracked flow against the allowlist at `now` and cuts those it no longer
    /// allows, or whose peer `tables_of` does not know; `cut_with` hears the peer address of
    /// each. Returns how many were cut.
    pub(crate) fn revalidate(
        &mut self,
        tables_of: impl Fn(Ipv4Addr) -> Option<Tables>,
        mut cut_with: impl FnMut(Ipv4Addr),
        now: Now,
    ) -> usize {
        let Some(list) = &self.allowlist else {
            return 0;
        };
        let cut = self.conntrack.retain(|k, f| {
            let port = k.service_port(f.initiator);
            let rule = tables_of(k.peer).and_then(|tables| {
                match decide(list, tables, f.initiator, k.proto, port, now) {
                    Decision::Allow { rule } => Some(list.rules[rule as usize].name.clone()),
                    Decision::Deny { .. } => None,
                }
            });
            if rule.is_none() {
                cut_with(k.peer);
            }
            rule
        });
        self.next_boundary = list.next_boundary(now.unix);
        cut
    }

    /// Whether anything at all is allowed with a peer governed by `tables`, either way, at `now`.
    pub(crate) fn allows_any(&self, tables: Tables, now: Now) -> bool {
        self.allowlist.as_ref().is_some_and(|list| {
            list.table(tables.outbound)
                .allows_any(&list.rules, now.unix)
                || list.table(tables.inbound).allows_any(&list.rules, now.unix)
        })
    }

    /// Whether a rule window opened or closed since the last [`Filter::revalidate`].
    pub(crate) fn window_passed(&self, now: Now) -> bool {
        self.next_boundary.is_some_and(|t| now.unix >= t)
    }

    /// The name of the deny rule behind a [`DropReason::DeniedByRule`].
    pub(crate) fn deny_rule(&self, why: DropReason) -> Option<&str> {
        let DropReason::DeniedByRule(r) = why else {
            return None;
        };
        let list = self.allowlist.as_ref()?;
        list.rules.get(r as usize).map(|rule| rule.name.as_str())
    }

    /// Packets denied by each deny rule, by name, under this allowlist and the earlier ones.
    pub(crate) fn denied_by_rule(&self) -> BTreeMap<String, u64> {
        let mut all = self.denied_before.clone();
        if let Some(list) = &self.allowlist {
            for (rule, &n) in list.rules.iter().zip(&self.denied) {
                if n > 0 {
                    *all.entry(rule.name.clone()).or_default() += n;
                }
            }
        }
        all
    }

    /// Flows admitted.
    pub(crate) fn flows_started(&self) -> u64 {
        self.flows_started
    }

    /// Moves the counts by rule index into the counts by name, before the rules change.
    fn fold_denials(&mut self) {
        let Some(list) = &self.allowlist else {
            return;
        };
        for (rule, n) in list.rules.iter().zip(&mut self.denied) {
            if *n > 0 {
                *self.denied_before.entry(rule.name.clone()).or_default() += std::mem::take(n);
            }
        }
    }

    /// Drops idle flows.
    pub(crate) fn expire(&mut self, now: Now) {
        self.conntrack.expire(now.instant);
    }
}

/// The allowlist's decision on a connection opened by `initiator` to `port`.
fn decide(
    list: &Allowlist,
    tables: Tables,
    initiator: Initiator,
    proto: u8,
    port: u16,
    now: Now,
) -> Decision {
    let table = match initiator {
        Initiator::Local => tables.outbound,
        Initiator::Peer => tables.inbound,
    };
    list.table(table).decide(&list.rules, proto, port, now.unix)
}
