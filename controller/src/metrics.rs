//! `bulkhead-controller --metrics ADDR:PORT`: what the controller exposes to Prometheus.
//!
//! Events are counted as they happen ([`Metrics`]: pushes, quarantines, propagation times);
//! states are read from the view at each scrape (nodes online, posture failures, quarantines in
//! force). With several controllers, counters are this controller's own (sum them), and states
//! are the cluster's as this controller's view sees it (the same on each).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use bulkhead_proto::metrics::{Histogram, Labels, Registry, Unit, counter, gauge, one};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::Controller;
use crate::view::lock;

/// Bucket bounds of the propagation histogram, in seconds.
const PROPAGATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Per node: the allowlist pushed and not yet reported, and the last one it reported, by
/// digest (which changes with conditions too, not only with policy revisions).
#[derive(Debug, Default)]
struct Propagation {
    /// Digest pushed and when, until the node reports it.
    pending: HashMap<String, (String, Instant)>,
    /// The digest each node last reported here.
    reported: HashMap<String, String>,
}

/// Counted events.
#[derive(Debug)]
pub struct Metrics {
    pushes: Counter,
    propagation: Histogram,
    quarantines: Family<Labels, Counter>,
    nodes: Mutex<Propagation>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            pushes: Counter::default(),
            propagation: Histogram::new(PROPAGATION_BUCKETS),
            quarantines: Family::default(),
            nodes: Mutex::default(),
        }
    }
}

impl Metrics {
    fn nodes(&self) -> std::sync::MutexGuard<'_, Propagation> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A configuration went down a node's stream, with the digest of its allowlist if it has
    /// one. Its propagation is timed from now until the node reports that digest, unless the
    /// node already did (a change of a peer's endpoint keeps the allowlist).
    pub fn pushed(&self, identity: &str, digest: Option<&str>) {
        self.pushes.inc();
        let mut n = self.nodes();
        match digest {
            // Already on its way: pushed again (a peer's endpoint moved), still timed from the
            // first push.
            Some(d) if n.pending.get(identity).is_some_and(|(p, _)| p == d) => {}
            Some(d) if n.reported.get(identity).map(String::as_str) != Some(d) => {
                n.pending
                    .insert(identity.to_string(), (d.to_string(), Instant::now()));
            }
            _ => {
                n.pending.remove(identity);
            }
        }
    }

    /// A node reported the digest of the allowlist it enforces.
    pub fn reported(&self, identity: &str, digest: Option<&str>) {
        let mut n = self.nodes();
        let Some(d) = digest else {
            n.reported.remove(identity);
            return;
        };
        if n.reported.get(identity).map(String::as_str) != Some(d) {
            n.reported.insert(identity.to_string(), d.to_string());
        }
        if n.pending.get(identity).is_some_and(|(want, _)| want == d)
            && let Some((_, at)) = n.pending.remove(identity)
        {
            drop(n);
            self.propagation.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A node's last stream here closed: what it did not confirm is not timed any further.
    pub fn gone(&self, identity: &str) {
        let mut n = self.nodes();
        n.pending.remove(identity);
        n.reported.remove(identity);
    }

    /// An identity was put in quarantine, `automatic`ally (on denied flows) or by hand.
    pub fn quarantined(&self, automatic: bool) {
        let origin = if automatic { "automatic" } else { "manual" };
        self.quarantines
            .get_or_create(&vec![("origin", origin.to_string())])
            .inc();
    }

    /// The registry of one scrape.
    pub fn registry(&self, c: &Controller) -> Registry {
        let mut r = Registry::default();
        r.register(
            "bulkhead_pushes",
            "Configurations sent down node streams by this controller",
            self.pushes.clone(),
        );
        r.register_with_unit(
            "bulkhead_propagation",
            "From a changed allowlist sent down a node's stream to the node's report that it enforces it",
            Unit::Seconds,
            self.propagation.clone(),
        );
        r.register(
            "bulkhead_quarantines",
            "Quarantines this controller committed, automatic or manual",
            self.quarantines.clone(),
        );
        let now = crate::ops::unix_now();
        let v = lock(&c.view);
        let records = v.records();
        let online = records.nodes.keys().filter(|id| v.online(id)).count();
        let in_sync = records.nodes.keys().filter(|id| v.in_sync(id)).count();
        // Enrolled identities only: one not enrolled yet has no facts, and fails every check.
        let mut failing: BTreeMap<String, usize> = BTreeMap::new();
        if let Some(live) = &v.live() {
            for check in &live.model.policy().posture {
                failing.insert(check.name.clone(), 0);
            }
            for (id, check) in &live.compiled.state().failing {
                if records.nodes.contains_key(live.model.identity_name(*id)) {
                    *failing
                        .entry(live.model.check_name(*check).to_string())
                        .or_default() += 1;
                }
            }
        }
        let rows: [(&str, &str, f64); 5] = [
            (
                "bulkhead_nodes_enrolled",
                "Enrolled nodes",
                records.nodes.len() as f64,
            ),
            (
                "bulkhead_nodes_online",
                "Enrolled nodes with a stream open at a live controller",
                online as f64,
            ),
            (
                "bulkhead_nodes_in_sync",
                "Enrolled nodes that report enforcing the allowlist (by digest) the live policy gives them now",
                in_sync as f64,
            ),
            (
                "bulkhead_policy_revision",
                "Revision of the live policy (0: none)",
                v.revision() as f64,
            ),
            (
                "bulkhead_quarantined_identities",
                "Identities in quarantine now",
                records.quarantined(now).count() as f64,
            ),
        ];
        drop(v);
        for (name, help, value) in rows {
            gauge(&mut r, name, help, None, one(value));
        }
        gauge(
            &mut r,
            "bulkhead_posture_failing_identities",
            "Enrolled identities failing each posture check of the live policy",
            None,
            failing
                .into_iter()
                .map(|(check, n)| (vec![("check", check)], n as f64)),
        );
        gauge(
            &mut r,
            "bulkhead_store_current",
            "1 while this controller's view is confirmed to be the store's (always, with the embedded store); 0 while it is cut off, serves no node and refuses changes",
            None,
            one(if c.currency.current() { 1.0 } else { 0.0 }),
        );
        gauge(
            &mut r,
            "bulkhead_node_streams",
            "Nodes whose stream this controller holds",
            None,
            one(c.presence.streams() as f64),
        );
        gauge(
            &mut r,
            "bulkhead_flow_history_entries",
            "Flows kept in memory for `bulkhead flows`",
            None,
            one(c.flows.history.len() as f64),
        );
        let durable = &c.flows.durable;
        gauge(
            &mut r,
            "bulkhead_flow_history_aggregates",
            "Per-hour flow aggregates in the durable flow history (STATE/flows.redb)",
            None,
            one(durable.rows() as f64),
        );
        gauge(
            &mut r,
            "bulkhead_flow_history_max_aggregates",
            "--flow-history-max-rows: the durable flow history's bound",
            None,
            one(durable.limits().max_rows as f64),
        );
        counter(
            &mut r,
            "bulkhead_flow_history_dropped",
            "What the durable flow history dropped: aggregates past the retention (and flows reported from before it), the oldest hours' aggregates deleted for the bound, new aggregates refused at the bound, flows of new kinds refused in memory between two writes, flows of new kinds from a node past its hourly share",
            None,
            durable
                .dropped
                .counts()
                .into_iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], n)),
        );
        counter(
            &mut r,
            "bulkhead_flow_history_write_errors",
            "Writes of the durable flow history that failed (what they held is tried again)",
            None,
            one(durable
                .write_errors
                .load(std::sync::atomic::Ordering::Relaxed)),
        );
        counter(
            &mut r,
            "bulkhead_flow_log_node_dropped",
            "Flow-log entries nodes dropped because their buffers were full",
            None,
            one(c
                .flows
                .dropped_by_nodes
                .load(std::sync::atomic::Ordering::Relaxed)),
        );
        counter(
            &mut r,
            "bulkhead_flow_entries_refused",
            "Flow-log entries this controller refused: malformed, about a non-peer, or in a batch too large",
            None,
            c.flows
                .refused
                .counts()
                .into_iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], n)),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A figure of the propagation histogram (`count`, `sum`), as Prometheus would read it.
    fn figure(m: &Metrics, which: &str) -> f64 {
        let mut r = Registry::default();
        r.register("p", "p", m.propagation.clone());
        let text = bulkhead_proto::metrics::encode(r).unwrap();
        let prefix = format!("p_{which} ");
        let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap();
        line[prefix.len()..].parse().unwrap()
    }

    fn timed(m: &Metrics) -> u64 {
        figure(m, "count") as u64
    }

    fn sum(m: &Metrics) -> f64 {
        figure(m, "sum")
    }

    #[test]
    fn propagation_is_timed_from_push_to_report_once() {
        let m = Metrics::default();
        m.pushed("web-1", Some("d3"));
        m.reported("web-1", Some("d2")); // the one before: still waiting
        assert_eq!(timed(&m), 0);
        m.reported("web-1", Some("d3"));
        assert_eq!(timed(&m), 1);
        m.reported("web-1", Some("d3")); // the periodic report again: not a second propagation
        assert_eq!(timed(&m), 1);
        // The same allowlist pushed again (a peer's endpoint moved): nothing to time.
        m.pushed("web-1", Some("d3"));
        m.reported("web-1", Some("d3"));
        assert_eq!(timed(&m), 1);
        // Pushed again while on its way: timed from the first push, not the second.
        m.pushed("web-1", Some("e3"));
        std::thread::sleep(std::time::Duration::from_millis(30));
        m.pushed("web-1", Some("e3"));
        m.reported("web-1", Some("e3"));
        assert_eq!(timed(&m), 2);
        assert!(sum(&m) >= 0.03, "timed from the first push: {}", sum(&m));
        // A quarantine changes the allowlist under the same revision: a new digest, timed.
        m.pushed("web-1", Some("q3"));
        m.reported("web-1", Some("q3"));
        assert_eq!(timed(&m), 3);
        // A node that goes before confirming is not timed.
        m.pushed("web-1", Some("d4"));
        m.gone("web-1");
        m.reported("web-1", Some("d4"));
        assert_eq!(timed(&m), 3);
        assert_eq!(m.pushes.get(), 6);
    }
}
