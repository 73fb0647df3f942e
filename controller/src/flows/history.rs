//! The flow history in memory: the last N flows, oldest out first, and a broadcast of each new
//! one for `bulkhead flows --follow`.

use std::collections::VecDeque;
use std::sync::Mutex;

use bulkhead_proto::FlowView;
use tokio::sync::broadcast;

/// The ring.
#[derive(Debug)]
pub struct History {
    cap: usize,
    ring: Mutex<VecDeque<FlowView>>,
    live: broadcast::Sender<FlowView>,
}

impl History {
    /// A ring of `cap` flows.
    pub fn new(cap: usize) -> History {
        History {
            cap: cap.max(1),
            ring: Mutex::new(VecDeque::new()),
            live: broadcast::channel(4096).0,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<FlowView>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a flow, and tells followers.
    pub fn add(&self, f: FlowView) {
        let mut r = self.ring();
        if r.len() >= self.cap {
            r.pop_front();
        }
        r.push_back(f.clone());
        drop(r);
        let _ = self.live.send(f);
    }

    /// New flows from now on. Subscribe before reading [`History::recent`], so that nothing
    /// falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<FlowView> {
        self.live.subscribe()
    }

    /// Flows kept now.
    pub fn len(&self) -> usize {
        self.ring().len()
    }

    /// Whether none are kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `limit` flows that `keep` selects, oldest first.
    pub fn recent(&self, limit: usize, keep: impl Fn(&FlowView) -> bool) -> Vec<FlowView> {
        let r = self.ring();
        let mut out: Vec<FlowView> = r
            .iter()
            .rev()
            .filter(|f| keep(f))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bulkhead_proto::{Protocol, Verdict};

    use super::*;

    fn flow(i: i64, verdict: Verdict) -> FlowView {
        FlowView {
            at: i,
            node: "n".into(),
            src: "a".into(),
            src_address: Ipv4Addr::LOCALHOST,
            dst: "b".into(),
            dst_address: Ipv4Addr::LOCALHOST,
            proto: Protocol::Tcp,
            port: 1,
            verdict,
            path: Default::default(),
            rule: None,
            reason: None,
        }
    }

    #[test]
    fn the_ring_is_bounded() {
        let h = History::new(3);
        let mut rx = h.subscribe();
        for i in 0..5 {
            h.add(flow(
                i,
                if i % 2 == 0 {
                    Verdict::Deny
                } else {
                    Verdict::Allow
                },
            ));
        }
        let all = h.recent(10, |_| true);
        assert_eq!(all.iter().map(|f| f.at).collect::<Vec<_>>(), [2, 3, 4]);
        let denied = h.recent(10, |f| f.verdict == Verdict::Deny);
        assert_eq!(denied.iter().map(|f| f.at).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(h.recent(1, |_| true)[0].at, 4, "the newest");
        assert_eq!(
            rx.try_recv().map(|f| f.at).ok(),
            Some(0),
            "followers see every one"
        );
    }
}
