//! A node's flow batch: each entry checked, both ends named, kept, and its denials counted.
//!
//! What a node sends is a claim about itself, never a fact about another identity:
//! - the node's own end is the identity of its credential;
//! - a peer's end is named from the node's own allowlist, by address; a node's name for it is
//!   not used. An entry about traffic with a peer (anything inbound, and an admitted outbound
//!   flow) must be about one of the node's peers, or it is refused and counted: a tunnel only
//!   ever carries a peer's packets. Only the node's own denied attempts may name any address;
//! - a denial the node's egress filter made counts against the node itself; one its ingress
//!   filter made is the node's word against a peer, and counts only up to a cap
//!   ([`crate::records::Tally::total`]);
//! - a batch, its strings and its entries are bounded;
//! - an underlay entry (the host firewall's) is the node's report of a connection to or from
//!   an address on its ordinary network. The controller names both ends from the addresses it
//!   saw the servers' reports come from; the entry never counts towards a quarantine, since
//!   the node cannot show who really sent an underlay packet.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead_policy::Model;
use bulkhead_proto::{FlowBatch, FlowEntry, FlowView, Path, Verdict};

use super::quarantine::Rule;
use crate::Controller;
use crate::ops::Error;
use crate::view::{Mirror, lock};

/// Most entries one batch may carry: a daemon's whole flow-log buffer.
pub const MAX_BATCH: usize = 10_000;
/// Longest name (peer, rule) an entry may carry; identity names are shorter, and so are rule
/// names, even those of approved access (`RULE@ID`: 63 + 9).
const MAX_NAME: usize = 80;
/// Longest drop reason an entry may carry.
const MAX_REASON: usize = 32;

/// Flow entries refused, by why.
#[derive(Debug, Default)]
pub struct Refused {
    /// A string longer than any name or reason.
    pub malformed: AtomicU64,
    /// About an address that is not one of the reporting node's peers.
    pub not_a_peer: AtomicU64,
    /// In a batch over [`MAX_BATCH`].
    pub too_many: AtomicU64,
}

impl Refused {
    /// `(reason, count)` for metrics.
    pub fn counts(&self) -> [(&'static str, u64); 3] {
        [
            ("malformed", self.malformed.load(Ordering::Relaxed)),
            ("not_a_peer", self.not_a_peer.load(Ordering::Relaxed)),
            ("batch_too_large", self.too_many.load(Ordering::Relaxed)),
        ]
    }
}

/// Whether an entry carries a string longer than any name or reason, or a path this version
/// does not know.
fn malformed(e: &FlowEntry) -> bool {
    let long = |s: &Option<String>, max: usize| s.as_ref().is_some_and(|s| s.len() > max);
    long(&e.peer, MAX_NAME)
        || long(&e.rule, MAX_NAME)
        || long(&e.reason, MAX_REASON)
        || e.path == Path::Unknown
}

/// Why an overlay entry is refused, if it is.
fn refusal(e: &FlowEntry, peer: Option<&str>) -> Option<&'static str> {
    if malformed(e) {
        return Some("malformed");
    }
    // Traffic with a peer went through its tunnel; only the node's own refused attempts may
    // name any address.
    let own_denied = e.outbound && !e.allowed;
    if peer.is_none() && !own_denied {
        return Some("not_a_peer");
    }
    None
}

/// Names the ends of one node's entries: the node by its identity, a peer from the node's
/// allowlist, any other address by the identity that has it in the policy, if one does.
struct Namer<'a> {
    node: &'a str,
    address: Ipv4Addr,
    peers: HashMap<Ipv4Addr, String>,
    model: Option<&'a Model>,
    by_address: Option<HashMap<Ipv4Addr, String>>,
    records: &'a Mirror,
    by_underlay: Option<HashMap<Ipv4Addr, String>>,
}

impl Namer<'_> {
    /// One index per batch, only if the batch needs it.
    fn name_of(&mut self, addr: Ipv4Addr) -> String {
        let model = self.model;
        self.by_address
            .get_or_insert_with(|| {
                model.map_or_else(HashMap::new, |m| {
                    m.identity_ids()
                        .map(|i| (m.address(i), m.identity_name(i).to_string()))
                        .collect()
                })
            })
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    }

    /// An underlay entry: the node's end is its underlay address, the other end is named by
    /// the enrolled server whose reports come from that address, if any.
    fn underlay_view(&mut self, e: FlowEntry) -> FlowView {
        let records = self.records;
        let other = self
            .by_underlay
            .get_or_insert_with(|| {
                records
                    .underlay
                    .iter()
                    .filter(|(id, _)| records.nodes.contains_key(*id))
                    .map(|(id, a)| (*a, id.clone()))
                    .collect()
            })
            .get(&e.peer_address)
            .cloned()
            .unwrap_or_else(|| e.peer_address.to_string());
        let me = records
            .underlay
            .get(self.node)
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let (src, dst) = if e.outbound {
            ((self.node.to_string(), me), (other, e.peer_address))
        } else {
            ((other, e.peer_address), (self.node.to_string(), me))
        };
        self.finish(e, src, dst)
    }

    fn view(&mut self, e: FlowEntry, peer: Option<String>) -> FlowView {
        let me = (self.node.to_string(), self.address);
        let other = (
            peer.unwrap_or_else(|| self.name_of(e.peer_address)),
            e.peer_address,
        );
        let (src, dst) = if e.outbound { (me, other) } else { (other, me) };
        self.finish(e, src, dst)
    }

    fn finish(&self, e: FlowEntry, src: (String, Ipv4Addr), dst: (String, Ipv4Addr)) -> FlowView {
        FlowView {
            at: e.at,
            node: self.node.to_string(),
            src: src.0,
            src_address: src.1,
            dst: dst.0,
            dst_address: dst.1,
            proto: e.proto,
            port: e.port,
            verdict: match (e.allowed, e.observed) {
                (true, _) => Verdict::Allow,
                (false, true) => Verdict::WouldDeny,
                (false, false) => Verdict::Deny,
            },
            path: e.path,
            rule: e.rule,
            reason: e.reason,
        }
    }
}

impl Controller {
    /// Takes a node's batch: checks each entry, names both ends, keeps the flows, counts
    /// denials, quarantines whoever crosses the policy's threshold. A batch over [`MAX_BATCH`]
    /// is refused whole.
    pub async fn flows_from(&self, node: &str, batch: FlowBatch) -> Result<(), Error> {
        let refused = &self.flows.refused;
        if batch.flows.len() > MAX_BATCH {
            refused
                .too_many
                .fetch_add(batch.flows.len() as u64, Ordering::Relaxed);
            return Err(Error::BadRequest(format!(
                "a flow batch carries at most {MAX_BATCH} entries, not {}",
                batch.flows.len()
            )));
        }
        if batch.dropped > 0 {
            self.flows
                .dropped_by_nodes
                .fetch_add(batch.dropped, Ordering::Relaxed);
            tracing::warn!(node, dropped = batch.dropped, "node's flow log overflowed");
        }
        let now = crate::ops::unix_ms();
        let mut over: Vec<(String, u64)> = Vec::new();
        let (mut malformed_n, mut not_a_peer) = (0u64, 0u64);
        let (threshold, views) = {
            let v = lock(&self.view);
            let live = v.live();
            let model = live.as_ref().map(|l| &*l.model);
            let list = v.allowlist(node);
            let mut namer = Namer {
                node,
                address: list.as_ref().map_or(Ipv4Addr::UNSPECIFIED, |l| l.address),
                peers: list
                    .iter()
                    .flat_map(|l| &l.peers)
                    .map(|p| (p.address, p.name.to_string()))
                    .collect(),
                model,
                by_address: None,
                records: v.records(),
                by_underlay: None,
            };
            let rule = Rule::now(&v, &self.id, now);
            let mut views = Vec::with_capacity(batch.flows.len());
            for e in batch.flows {
                if e.path == Path::Underlay {
                    if malformed(&e) {
                        malformed_n += 1;
                    } else {
                        views.push(namer.underlay_view(e));
                    }
                    continue;
                }
                let peer = namer.peers.get(&e.peer_address).cloned();
                match refusal(&e, peer.as_deref()) {
                    Some("malformed") => {
                        malformed_n += 1;
                        continue;
                    }
                    Some(_) => {
                        not_a_peer += 1;
                        continue;
                    }
                    None => {}
                }
                // A denial the node's own egress filter made counts against the node; one its
                // ingress filter made is its word against the peer.
                let denial = (!e.allowed).then(|| match (&peer, e.outbound) {
                    (Some(p), false) => (p.clone(), Some(node)),
                    _ => (node.to_string(), None),
                });
                let f = namer.view(e, peer);
                if let (Some(rule), Some((initiator, witness))) = (&rule, denial)
                    && rule.counts(&initiator)
                {
                    // Counted when received: node clocks need not agree with ours or each
                    // other (batches ship every second).
                    let here = self.flows.denials.denied(&initiator, witness, now);
                    if let Some(n) = rule.over(&initiator, &here)
                        && !over.iter().any(|(s, _)| *s == initiator)
                    {
                        over.push((initiator, n));
                    }
                }
                views.push(f);
            }
            (rule.map(|r| r.threshold), views)
        };
        if malformed_n + not_a_peer > 0 {
            refused.malformed.fetch_add(malformed_n, Ordering::Relaxed);
            refused.not_a_peer.fetch_add(not_a_peer, Ordering::Relaxed);
            tracing::warn!(
                node,
                malformed = malformed_n,
                not_a_peer,
                "flow entries refused: a node reports only about itself and its peers"
            );
        }
        self.flows.durable.record(&views, now);
        for f in views {
            self.flows.history.add(f);
        }
        for (id, n) in over {
            self.auto_quarantine(&id, n, threshold.unwrap_or(0)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_proto::Protocol;

    use super::*;

    fn entry(outbound: bool, allowed: bool) -> FlowEntry {
        FlowEntry {
            at: 0,
            outbound,
            peer: None,
            peer_address: Ipv4Addr::new(10, 0, 0, 9),
            proto: Protocol::Tcp,
            port: 22,
            allowed,
            rule: None,
            reason: None,
            path: Default::default(),
            observed: false,
        }
    }

    #[test]
    fn a_node_reports_about_its_peers_and_its_own_attempts_only() {
        // Anything about a peer is taken.
        for (out, ok) in [(true, true), (true, false), (false, true), (false, false)] {
            assert_eq!(refusal(&entry(out, ok), Some("db-1")), None);
        }
        // About a non-peer: only the node's own refused attempt.
        assert_eq!(refusal(&entry(true, false), None), None);
        assert_eq!(refusal(&entry(false, false), None), Some("not_a_peer"));
        assert_eq!(refusal(&entry(false, true), None), Some("not_a_peer"));
        assert_eq!(refusal(&entry(true, true), None), Some("not_a_peer"));
        // Strings are bounded.
        let mut e = entry(true, false);
        e.rule = Some("r".repeat(MAX_NAME + 1));
        assert_eq!(refusal(&e, Some("db-1")), Some("malformed"));
        e.rule = None;
        e.reason = Some("x".repeat(MAX_REASON + 1));
        assert_eq!(refusal(&e, None), Some("malformed"));
    }
}
