//! The daemon's flow log: flow starts and denied new flows, kept in a bounded buffer until the
//! link ships them to the controller. No I/O.
//!
//! Only new flows count as denials: a packet that could have opened a flow (the data plane
//! reports only those as `not_allowed`, `denied` or `not_a_peer`) and whose flow key was not
//! already denied in the last [`DEDUP_MS`]; retransmits of a refused SYN are not new flows.
//! When the buffer is full, new entries are dropped and counted, never the process's memory.

use std::collections::{HashMap, VecDeque};

use bulkhead_dataplane::{DropReason, FlowKey, Initiator};
use bulkhead_proto::{FlowEntry, Path, Protocol};

/// Most entries waiting to be shipped.
pub const CAPACITY: usize = 10_000;
/// A denial of the same flow key within this many milliseconds is the same attempt.
pub const DEDUP_MS: i64 = 60_000;
/// Most flow keys remembered for de-duplication.
const DEDUP_KEYS: usize = 16_384;

/// What a denial is, for de-duplication: its direction, path, and whether it was only
/// observed. The same flow key denied on another path, or denied after being only observed
/// (a firewall turned to `enforce`), is a new entry.
fn kind(egress: bool, underlay: bool, observed: bool) -> u8 {
    u8::from(egress) | u8::from(underlay) << 1 | u8::from(observed) << 2
}

/// The buffer.
#[derive(Debug, Default)]
pub struct FlowLog {
    buf: VecDeque<FlowEntry>,
    dropped: u64,
    dropped_total: u64,
    /// Recent denials by kind ([`kind`]) and flow key.
    recent: HashMap<(u8, FlowKey), i64>,
}

impl FlowLog {
    fn push(&mut self, e: FlowEntry) {
        if self.buf.len() >= CAPACITY {
            self.dropped += 1;
            self.dropped_total += 1;
        } else {
            self.buf.push_back(e);
        }
    }

    /// A flow was admitted.
    pub fn started(
        &mut self,
        now_ms: i64,
        initiator: Initiator,
        key: FlowKey,
        peer: &str,
        rule: &str,
    ) {
        let outbound = initiator == Initiator::Local;
        self.push(FlowEntry {
            at: now_ms,
            outbound,
            peer: Some(peer.to_string()),
            peer_address: key.peer,
            proto: Protocol::from_number(key.proto),
            port: if outbound {
                key.peer_port
            } else {
                key.local_port
            },
            allowed: true,
            rule: Some(rule.to_string()),
            reason: None,
            path: Path::Overlay,
            observed: false,
        });
    }

    /// A packet was dropped; recorded if it was a new flow refused by the policy. `rule` names
    /// the deny rule of a [`DropReason::DeniedByRule`].
    pub fn dropped(
        &mut self,
        now_ms: i64,
        egress: bool,
        reason: &DropReason,
        rule: Option<&str>,
        key: Option<FlowKey>,
        peer: Option<&str>,
    ) {
        let rule = match reason {
            DropReason::DeniedByRule(_) => rule.map(str::to_string),
            DropReason::NotAllowed | DropReason::NotAPeer => None,
            _ => return,
        };
        let Some(key) = key else { return };
        if !self.fresh(kind(egress, false, false), key, now_ms) {
            return;
        }
        self.push(FlowEntry {
            at: now_ms,
            outbound: egress,
            peer: peer.map(str::to_string),
            peer_address: key.peer,
            proto: Protocol::from_number(key.proto),
            port: if egress {
                key.peer_port
            } else {
                key.local_port
            },
            allowed: false,
            rule,
            reason: Some(reason.reason().to_string()),
            path: Path::Overlay,
            observed: false,
        });
    }

    /// A new underlay connection the host firewall dropped or, observing, would drop. Only
    /// IPv4 ones are entered (flow entries carry IPv4 addresses); the controller names the
    /// other end from the address.
    pub fn underlay(&mut self, now_ms: i64, e: &bulkhead_hostfw::nflog::Event) {
        let std::net::IpAddr::V4(remote) = e.remote else {
            return;
        };
        let key = FlowKey {
            proto: e.proto,
            peer: remote,
            local_port: if e.inbound { e.port } else { 0 },
            peer_port: if e.inbound { 0 } else { e.port },
        };
        if !self.fresh(kind(!e.inbound, true, e.observed), key, now_ms) {
            return;
        }
        self.push(FlowEntry {
            at: now_ms,
            outbound: !e.inbound,
            peer: None,
            peer_address: remote,
            proto: Protocol::from_number(e.proto),
            port: e.port,
            allowed: false,
            rule: None,
            reason: Some("not_allowed".into()),
            path: Path::Underlay,
            observed: e.observed,
        });
    }

    /// Whether a denial of `key` is a new attempt, not a retransmit of one denied in the last
    /// [`DEDUP_MS`]; remembers it.
    fn fresh(&mut self, kind: u8, key: FlowKey, now_ms: i64) -> bool {
        if self.recent.len() >= DEDUP_KEYS {
            self.recent.retain(|_, t| now_ms - *t < DEDUP_MS);
            if self.recent.len() >= DEDUP_KEYS {
                self.recent.clear();
            }
        }
        // Counted from the attempt's first denial: its retransmits do not extend the window.
        match self.recent.get(&(kind, key)) {
            Some(&t) if now_ms - t < DEDUP_MS => false,
            _ => {
                self.recent.insert((kind, key), now_ms);
                true
            }
        }
    }

    /// Takes up to `max` entries, oldest first, and the count of those dropped since the last
    /// take.
    pub fn take(&mut self, max: usize) -> (Vec<FlowEntry>, u64) {
        let n = max.min(self.buf.len());
        let out = self.buf.drain(..n).collect();
        (out, std::mem::take(&mut self.dropped))
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Entries dropped for want of room since the start (for metrics).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            peer: Ipv4Addr::new(10, 0, 0, 2),
            local_port: 40000,
            peer_port: port,
        }
    }

    #[test]
    fn denials_count_new_flows_once_and_the_buffer_stays_bounded() {
        let mut l = FlowLog::default();
        // web-1's SYN to db-1:22, refused by its own egress filter, at `at` ms.
        let syn = |l: &mut FlowLog, at: i64| {
            l.dropped(
                at,
                true,
                &DropReason::NotAllowed,
                None,
                Some(key(22)),
                Some("db-1"),
            );
        };
        syn(&mut l, 0);
        // The SYN's retransmits are the same attempt.
        syn(&mut l, 1000);
        syn(&mut l, 3000);
        // Replies without a flow, broken packets: not flows.
        l.dropped(
            3000,
            false,
            &DropReason::NoFlow,
            None,
            Some(key(22)),
            Some("db-1"),
        );
        l.dropped(3000, false, &DropReason::Tunnel, None, None, None);
        assert_eq!(l.len(), 1);
        // After the window it is a new attempt.
        syn(&mut l, 61_000);
        l.started(61_001, Initiator::Local, key(5432), "db-1", "web-to-db");
        let (got, dropped) = l.take(10);
        assert_eq!(dropped, 0);
        assert_eq!(got.len(), 3);
        assert_eq!((got[2].allowed, got[2].port), (true, 5432));
        assert_eq!(got[0].reason.as_deref(), Some("not_allowed"));
        // A flood of distinct denied flows: the buffer stops at CAPACITY, the rest are counted.
        for p in 0..(CAPACITY as u32 + 500) {
            let k = FlowKey {
                local_port: (p % 60000) as u16,
                peer_port: (p / 60000) as u16 + 1,
                ..key(1)
            };
            l.dropped(100_000, true, &DropReason::NotAllowed, None, Some(k), None);
        }
        assert_eq!(l.len(), CAPACITY);
        let (got, dropped) = l.take(usize::MAX);
        assert_eq!((got.len(), dropped), (CAPACITY, 500));
        // Shipping resets what the next batch reports, not the running total.
        assert_eq!(l.take(1).1, 0);
        assert_eq!(l.dropped_total(), 500);
        assert!(l.is_empty());
        assert!(l.recent.len() <= DEDUP_KEYS);
    }

    #[test]
    fn a_denial_by_a_deny_rule_names_the_rule() {
        let mut l = FlowLog::default();
        l.dropped(
            0,
            true,
            &DropReason::DeniedByRule(3),
            Some("no-telnet"),
            Some(key(23)),
            Some("db-1"),
        );
        let (got, _) = l.take(10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rule.as_deref(), Some("no-telnet"));
        assert_eq!(got[0].reason.as_deref(), Some("denied_by_rule"));
    }
}
