//! A node's flow batch: each entry gets both ends named, is kept, and its denials counted.
//!
//! What a node sends is a claim about itself: the controller names the node's end from the
//! node's own credential, and the peer's end from the live policy.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use bulkhead_policy::Model;
use bulkhead_proto::{FlowBatch, FlowEntry, FlowView, Verdict};

use super::quarantine::Rule;
use crate::Controller;
use crate::view::lock;

/// Names both ends of a node's entries: the node by its identity, a peer by the name the node
/// gives or, failing that, by the identity that has its address in the policy.
struct Namer<'a> {
    model: Option<&'a Model>,
    by_address: Option<HashMap<Ipv4Addr, String>>,
}

impl Namer<'_> {
    fn address_of(&self, name: &str) -> Ipv4Addr {
        self.model
            .and_then(|m| m.identity(name).map(|i| m.address(i)))
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

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

    fn view(&mut self, node: &str, e: FlowEntry) -> FlowView {
        let me = (node.to_string(), self.address_of(node));
        let peer = (
            e.peer
                .clone()
                .unwrap_or_else(|| self.name_of(e.peer_address)),
            e.peer_address,
        );
        let (src, dst) = if e.outbound { (me, peer) } else { (peer, me) };
        FlowView {
            at: e.at,
            node: node.to_string(),
            src: src.0,
            src_address: src.1,
            dst: dst.0,
            dst_address: dst.1,
            proto: e.proto,
            port: e.port,
            verdict: if e.allowed {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            rule: e.rule,
            reason: e.reason,
        }
    }
}

impl Controller {
    /// Takes a node's batch: names both ends, keeps the flows, counts denials, quarantines
    /// whoever crosses the policy's threshold.
    pub async fn flows_from(&self, node: &str, batch: FlowBatch) {
        if batch.dropped > 0 {
            self.flows
                .dropped_by_nodes
                .fetch_add(batch.dropped, Ordering::Relaxed);
            tracing::warn!(node, dropped = batch.dropped, "node's flow log overflowed");
        }
        let now = crate::ops::unix_ms();
        let mut over: Vec<(String, u64)> = Vec::new();
        let (threshold, views) = {
            let v = lock(&self.view);
            let live = v.live();
            let mut namer = Namer {
                model: live.as_ref().map(|l| &*l.model),
                by_address: None,
            };
            let views: Vec<FlowView> = batch
                .flows
                .into_iter()
                .map(|e| namer.view(node, e))
                .collect();
            let rule = Rule::now(&v, &self.id, now);
            if let Some(rule) = &rule {
                for f in views.iter().filter(|f| f.verdict == Verdict::Deny) {
                    if !rule.counts(&f.src) {
                        continue;
                    }
                    // Counted when received: node clocks need not agree with ours or each
                    // other (batches ship every second).
                    let own = self.flows.denials.denied(&f.src, now) as u64;
                    if let Some(n) = rule.over(&f.src, own)
                        && !over.iter().any(|(s, _)| *s == f.src)
                    {
                        over.push((f.src.clone(), n));
                    }
                }
            }
            (rule.map(|r| r.threshold), views)
        };
        for f in views {
            self.flows.history.add(f);
        }
        for (id, n) in over {
            self.auto_quarantine(&id, n, threshold.unwrap_or(0)).await;
        }
    }
}
