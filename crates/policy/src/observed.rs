//! What the flow history says happened (spec §9), in the policy's terms: the input of
//! [`crate::suggest`] and [`crate::replay`], and of the CLI's map.
//!
//! The wire type is `bulkhead_proto::FlowAggregate` (one hour of one kind of flow); the CLI
//! turns each into a [`Flow`], so this crate stays free of the wire format and of I/O.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::ast::Probe;

/// What happened to the flows of an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Seen {
    /// Admitted.
    Allow,
    /// Denied.
    Deny,
    /// Let through by a host firewall that observes: `enforce` would have dropped it.
    WouldDeny,
}

impl Seen {
    /// Whether the flows got through: admitted, or only observed.
    pub fn passed(self) -> bool {
        self != Seen::Deny
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Seen::Allow => "allow",
            Seen::Deny => "deny",
            Seen::WouldDeny => "would-deny",
        })
    }
}

/// Which network the flows took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// Through a tunnel: the policy's rules decide.
    Overlay,
    /// Between the servers' own addresses: the `underlay` block decides.
    Underlay,
}

impl std::fmt::Display for Way {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Way::Overlay => "overlay",
            Way::Underlay => "underlay",
        })
    }
}

/// One aggregate of the flow history: flows of one kind within one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// The hour's start, Unix seconds.
    pub hour: i64,
    /// The initiator: an identity's name, or an address where no identity has it.
    pub src: String,
    /// Its address (overlay, or underlay on the underlay).
    pub src_address: Ipv4Addr,
    /// The responder: an identity's name, or an address.
    pub dst: String,
    /// Its address.
    pub dst_address: Ipv4Addr,
    /// Protocol and destination port (ICMP: port 0).
    pub probe: Probe,
    /// What happened.
    pub verdict: Seen,
    /// Overlay or underlay.
    pub path: Way,
    /// The deciding rule or underlay entry, if any.
    pub rule: Option<String>,
    /// How many flows.
    pub count: u64,
    /// The first, Unix milliseconds.
    pub first: i64,
    /// The last, Unix milliseconds.
    pub last: i64,
}

/// Every aggregate of one connection (initiator, responder, protocol and port, path) over the
/// whole period, added up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// The initiator, as in the history.
    pub src: String,
    /// Its address, as last seen.
    pub src_address: Ipv4Addr,
    /// The responder, as in the history.
    pub dst: String,
    /// Its address, as last seen.
    pub dst_address: Ipv4Addr,
    /// Protocol and port.
    pub probe: Probe,
    /// Overlay or underlay.
    pub path: Way,
    /// Flows, whatever happened to them.
    pub count: u64,
    /// Flows admitted.
    pub allowed: u64,
    /// Flows denied.
    pub denied: u64,
    /// Flows only observed (`would-deny`).
    pub would_deny: u64,
    /// The first, Unix milliseconds.
    pub first: i64,
    /// The last, Unix milliseconds.
    pub last: i64,
    /// In how many hours it was seen.
    pub hours: u32,
    /// The rules that decided it, as recorded, sorted, without repeats.
    pub rules: Vec<String>,
}

impl Connection {
    /// Flows that got through when recorded: admitted or only observed.
    pub fn passed(&self) -> u64 {
        self.allowed + self.would_deny
    }
}

/// The flows added up by connection, sorted by path, initiator, responder, protocol and port.
pub fn connections(flows: &[Flow]) -> Vec<Connection> {
    type Key<'a> = (Way, &'a str, &'a str, u8, u16);
    let mut by: HashMap<Key<'_>, Connection> = HashMap::new();
    for f in flows {
        let key = (
            f.path,
            f.src.as_str(),
            f.dst.as_str(),
            f.probe.proto,
            f.probe.port,
        );
        let c = by.entry(key).or_insert_with(|| Connection {
            src: f.src.clone(),
            src_address: f.src_address,
            dst: f.dst.clone(),
            dst_address: f.dst_address,
            probe: f.probe,
            path: f.path,
            count: 0,
            allowed: 0,
            denied: 0,
            would_deny: 0,
            first: f.first,
            last: f.last,
            hours: 0,
            rules: Vec::new(),
        });
        c.count += f.count;
        match f.verdict {
            Seen::Allow => c.allowed += f.count,
            Seen::Deny => c.denied += f.count,
            Seen::WouldDeny => c.would_deny += f.count,
        }
        c.first = c.first.min(f.first);
        if f.last >= c.last {
            c.last = f.last;
            c.src_address = f.src_address;
            c.dst_address = f.dst_address;
        }
        c.hours += 1;
        if let Some(r) = &f.rule
            && !c.rules.contains(r)
        {
            c.rules.push(r.clone());
        }
    }
    let mut out: Vec<Connection> = by.into_values().collect();
    for c in &mut out {
        c.rules.sort();
    }
    out.sort_by(|a, b| {
        (a.path, &a.src, &a.dst, a.probe.proto, a.probe.port).cmp(&(
            b.path,
            &b.src,
            &b.dst,
            b.probe.proto,
            b.probe.port,
        ))
    });
    out
}

/// The hours the flows span: from the first hour's start to the last hour's end, in seconds;
/// 0 without flows.
pub fn span_secs(flows: &[Flow]) -> i64 {
    let lo = flows.iter().map(|f| f.hour).min();
    let hi = flows.iter().map(|f| f.hour).max();
    match (lo, hi) {
        (Some(lo), Some(hi)) => hi - lo + 3600,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str, port: u16, verdict: Seen, hour: i64, count: u64) -> Flow {
        Flow {
            hour,
            src: src.into(),
            src_address: Ipv4Addr::new(10, 0, 0, 1),
            dst: dst.into(),
            dst_address: Ipv4Addr::new(10, 0, 0, 2),
            probe: Probe { proto: 6, port },
            verdict,
            path: Way::Overlay,
            rule: (verdict == Seen::Allow).then(|| "r".to_string()),
            count,
            first: hour * 1000 + 5,
            last: hour * 1000 + 3_000_000,
        }
    }

    #[test]
    fn connections_add_up_hours_and_verdicts() {
        let flows = vec![
            flow("a", "b", 22, Seen::Allow, 3600, 2),
            flow("a", "b", 22, Seen::Deny, 7200, 3),
            flow("a", "b", 80, Seen::Allow, 3600, 1),
            flow("b", "a", 22, Seen::WouldDeny, 0, 4),
        ];
        let c = connections(&flows);
        assert_eq!(c.len(), 3);
        let ab22 = &c[0];
        assert_eq!((ab22.src.as_str(), ab22.probe.port), ("a", 22));
        assert_eq!(
            (ab22.count, ab22.allowed, ab22.denied, ab22.hours),
            (5, 2, 3, 2)
        );
        assert_eq!(ab22.first, 3_600_005);
        assert_eq!(ab22.last, 7_200_000 + 3_000_000);
        assert_eq!(ab22.rules, ["r"]);
        assert_eq!(c[2].passed(), 4);
        assert_eq!(span_secs(&flows), 3 * 3600);
        assert_eq!(span_secs(&[]), 0);
    }
}
