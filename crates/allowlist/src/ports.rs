//! Port specifications and the per-peer port table.

use serde::{Deserialize, Serialize};

use crate::{AccessSet, Action, Decision, RuleRef, UnixTime, proto};

/// One entry of a rule's `ports` list, after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "proto", rename_all = "lowercase")]
pub enum PortSpec {
    /// Every IP protocol and every port.
    Any,
    /// TCP destination ports `lo..=hi`.
    Tcp {
        /// First port.
        lo: u16,
        /// Last port, inclusive.
        hi: u16,
    },
    /// UDP destination ports `lo..=hi`.
    Udp {
        /// First port.
        lo: u16,
        /// Last port, inclusive.
        hi: u16,
    },
    /// IPv4 ICMP, all types.
    Icmp,
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn range(f: &mut std::fmt::Formatter<'_>, p: &str, lo: u16, hi: u16) -> std::fmt::Result {
            match (lo, hi) {
                (0, u16::MAX) => write!(f, "{p}"),
                (lo, hi) if lo == hi => write!(f, "{p}/{lo}"),
                (lo, hi) => write!(f, "{p}/{lo}-{hi}"),
            }
        }
        match *self {
            PortSpec::Any => f.write_str("any"),
            PortSpec::Tcp { lo, hi } => range(f, "tcp", lo, hi),
            PortSpec::Udp { lo, hi } => range(f, "udp", lo, hi),
            PortSpec::Icmp => f.write_str("icmp"),
        }
    }
}

/// A run of ports `lo..=hi` and the rules, by index, that cover every port in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortSpan {
    /// First port.
    pub lo: u16,
    /// Last port, inclusive.
    pub hi: u16,
    /// Indices into the allowlist's rule table, ascending.
    pub rules: Vec<u32>,
}

/// The rules that govern traffic one way between two identities, indexed for lookup.
///
/// TCP and UDP spans are disjoint and sorted, so finding a port is a binary search. Rule lists are
/// ascending, and a rule table is in policy order, so the first match is the first rule in the
/// policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortTable {
    /// TCP spans, disjoint and sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<PortSpan>,
    /// UDP spans, disjoint and sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp: Vec<PortSpan>,
    /// Rules covering ICMP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmp: Vec<u32>,
    /// Rules covering every other IP protocol (only `any` does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other: Vec<u32>,
}

impl PortTable {
    /// Builds a table from `(rule index, port spec)` pairs, in any order, with repeats.
    pub fn build(grants: impl IntoIterator<Item = (u32, PortSpec)>) -> PortTable {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut icmp = Vec::new();
        let mut other = Vec::new();
        for (rule, spec) in grants {
            match spec {
                PortSpec::Any => {
                    tcp.push((0, u16::MAX, rule));
                    udp.push((0, u16::MAX, rule));
                    icmp.push(rule);
                    other.push(rule);
                }
                PortSpec::Tcp { lo, hi } => tcp.push((lo, hi, rule)),
                PortSpec::Udp { lo, hi } => udp.push((lo, hi, rule)),
                PortSpec::Icmp => icmp.push(rule),
            }
        }
        for v in [&mut icmp, &mut other] {
            v.sort_unstable();
            v.dedup();
        }
        PortTable {
            tcp: spans(tcp),
            udp: spans(udp),
            icmp,
            other,
        }
    }

    /// Whether the table mentions no rule at all.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && self.icmp.is_empty() && self.other.is_empty()
    }

    /// The rules that cover `proto`/`port`, ascending. `port` is ignored for protocols without ports.
    pub fn rules_for(&self, proto: u8, port: u16) -> &[u32] {
        let spans = match proto {
            proto::TCP => &self.tcp,
            proto::UDP => &self.udp,
            proto::ICMP => return &self.icmp,
            _ => return &self.other,
        };
        // The last span starting at or before `port`, if it reaches `port`.
        let i = spans.partition_point(|s| s.lo <= port);
        match i.checked_sub(1).map(|i| &spans[i]) {
            Some(s) if port <= s.hi => &s.rules,
            _ => &[],
        }
    }

    /// Decides `proto`/`port` at `now`: a deny rule in force wins, else the first allow rule in
    /// force, else the default deny. Indices that `rules` does not hold count as nothing.
    pub fn decide(&self, rules: &[RuleRef], proto: u8, port: u16, now: UnixTime) -> Decision {
        decide_list(self.rules_for(proto, port), rules, now)
    }

    /// Whether any traffic at all is allowed at `now`.
    pub fn allows_any(&self, rules: &[RuleRef], now: UnixTime) -> bool {
        let allows = |list: &[u32]| decide_list(list, rules, now).is_allow();
        self.tcp.iter().any(|s| allows(&s.rules))
            || self.udp.iter().any(|s| allows(&s.rules))
            || allows(&self.icmp)
            || allows(&self.other)
    }

    /// Everything allowed at `now`, as a normalized set.
    pub fn access(&self, rules: &[RuleRef], now: UnixTime) -> AccessSet {
        let allows = |list: &[u32]| decide_list(list, rules, now).is_allow();
        let ranges = |spans: &[PortSpan]| {
            let mut out: Vec<(u16, u16)> = Vec::new();
            for s in spans.iter().filter(|s| allows(&s.rules)) {
                match out.last_mut() {
                    Some(last) if u32::from(last.1) + 1 == u32::from(s.lo) => last.1 = s.hi,
                    _ => out.push((s.lo, s.hi)),
                }
            }
            out
        };
        AccessSet {
            tcp: ranges(&self.tcp),
            udp: ranges(&self.udp),
            icmp: allows(&self.icmp),
            other: allows(&self.other),
        }
    }

    /// Every rule index the table mentions, ascending and without repeats.
    pub fn rule_indices(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .tcp
            .iter()
            .chain(&self.udp)
            .flat_map(|s| s.rules.iter().copied())
            .chain(self.icmp.iter().copied())
            .chain(self.other.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The same table with every rule index passed through `f`, which must keep their order.
    pub fn remap(&self, f: impl Fn(u32) -> u32) -> PortTable {
        let list = |v: &[u32]| v.iter().map(|&r| f(r)).collect::<Vec<_>>();
        let spans = |v: &[PortSpan]| {
            v.iter()
                .map(|s| PortSpan {
                    lo: s.lo,
                    hi: s.hi,
                    rules: list(&s.rules),
                })
                .collect()
        };
        PortTable {
            tcp: spans(&self.tcp),
            udp: spans(&self.udp),
            icmp: list(&self.icmp),
            other: list(&self.other),
        }
    }
}

fn decide_list(list: &[u32], rules: &[RuleRef], now: UnixTime) -> Decision {
    let mut allow = None;
    for &i in list {
        let Some(r) = rules.get(i as usize) else {
            continue;
        };
        if !r.window.contains(now) {
            continue;
        }
        match r.action {
            Action::Deny => return Decision::Deny { rule: Some(i) },
            Action::Allow => {
                allow.get_or_insert(i);
            }
        }
    }
    match allow {
        Some(rule) => Decision::Allow { rule },
        None => Decision::Deny { rule: None },
    }
}

/// Cuts overlapping `(lo, hi, rule)` intervals into disjoint spans, each with the rules covering
/// all of it, and merges neighbours that carry the same rules.
fn spans(mut intervals: Vec<(u16, u16, u32)>) -> Vec<PortSpan> {
    if intervals.is_empty() {
        return Vec::new();
    }
    intervals.sort_unstable();
    intervals.dedup();
    let mut cuts: Vec<u32> = intervals
        .iter()
        .flat_map(|&(lo, hi, _)| [u32::from(lo), u32::from(hi) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<PortSpan> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let mut rules: Vec<u32> = intervals
            .iter()
            .take_while(|&&(l, _, _)| u32::from(l) <= lo)
            .filter(|&&(_, h, _)| u32::from(h) >= hi)
            .map(|&(_, _, r)| r)
            .collect();
        if rules.is_empty() {
            continue;
        }
        rules.sort_unstable();
        rules.dedup();
        // Cuts are at most 65536, so both ends fit a u16.
        let (lo, hi) = (lo as u16, hi as u16);
        match out.last_mut() {
            Some(last) if u32::from(last.hi) + 1 == u32::from(lo) && last.rules == rules => {
                last.hi = hi;
            }
            _ => out.push(PortSpan { lo, hi, rules }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Window;

    fn rules(actions: &[(Action, Window)]) -> Vec<RuleRef> {
        actions
            .iter()
            .enumerate()
            .map(|(i, &(action, window))| RuleRef {
                name: format!("r{i}"),
                action,
                window,
                posture: vec![],
            })
            .collect()
    }

    const ALLOW: (Action, Window) = (Action::Allow, Window::ALWAYS);
    const DENY: (Action, Window) = (Action::Deny, Window::ALWAYS);

    #[test]
    fn overlapping_ranges_become_disjoint_spans() {
        let t = PortTable::build([
            (0, PortSpec::Tcp { lo: 10, hi: 20 }),
            (1, PortSpec::Tcp { lo: 15, hi: 30 }),
            (2, PortSpec::Tcp { lo: 40, hi: 40 }),
        ]);
        let got: Vec<_> = t
            .tcp
            .iter()
            .map(|s| (s.lo, s.hi, s.rules.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 14, vec![0]),
                (15, 20, vec![0, 1]),
                (21, 30, vec![1]),
                (40, 40, vec![2]),
            ]
        );
        assert_eq!(t.rules_for(proto::TCP, 9), &[] as &[u32]);
        assert_eq!(t.rules_for(proto::TCP, 10), &[0]);
        assert_eq!(t.rules_for(proto::TCP, 20), &[0, 1]);
        assert_eq!(t.rules_for(proto::TCP, 35), &[] as &[u32]);
        assert_eq!(t.rules_for(proto::TCP, 40), &[2]);
        assert_eq!(t.rules_for(proto::TCP, 65535), &[] as &[u32]);
        assert_eq!(t.rules_for(proto::UDP, 10), &[] as &[u32]);
    }

    #[test]
    fn adjacent_spans_with_the_same_rules_merge() {
        let t = PortTable::build([
            (0, PortSpec::Udp { lo: 1, hi: 5 }),
            (0, PortSpec::Udp { lo: 6, hi: 9 }),
            (0, PortSpec::Udp { lo: 6, hi: 9 }),
        ]);
        assert_eq!(
            t.udp,
            vec![PortSpan {
                lo: 1,
                hi: 9,
                rules: vec![0]
            }]
        );
    }

    #[test]
    fn any_covers_every_protocol_and_port() {
        let t = PortTable::build([(3, PortSpec::Any)]);
        for (p, port) in [(proto::TCP, 0), (proto::TCP, 65535), (proto::UDP, 53)] {
            assert_eq!(t.rules_for(p, port), &[3]);
        }
        assert_eq!(t.rules_for(proto::ICMP, 0), &[3]);
        assert_eq!(t.rules_for(47, 0), &[3], "GRE is covered by any");
        let only_tcp = PortTable::build([(3, PortSpec::Tcp { lo: 0, hi: 65535 })]);
        assert!(only_tcp.rules_for(47, 0).is_empty());
        assert!(only_tcp.rules_for(proto::ICMP, 0).is_empty());
    }

    #[test]
    fn deny_wins_and_windows_are_enforced() {
        let rs = rules(&[
            ALLOW,
            (
                Action::Deny,
                Window {
                    not_before: Some(100),
                    expires: Some(200),
                },
            ),
            (
                Action::Allow,
                Window {
                    not_before: None,
                    expires: Some(50),
                },
            ),
        ]);
        let t = PortTable::build([
            (0, PortSpec::Tcp { lo: 80, hi: 80 }),
            (1, PortSpec::Tcp { lo: 80, hi: 80 }),
            (2, PortSpec::Tcp { lo: 443, hi: 443 }),
        ]);
        assert_eq!(
            t.decide(&rs, proto::TCP, 80, 0),
            Decision::Allow { rule: 0 }
        );
        assert_eq!(
            t.decide(&rs, proto::TCP, 80, 150),
            Decision::Deny { rule: Some(1) }
        );
        assert_eq!(
            t.decide(&rs, proto::TCP, 80, 200),
            Decision::Allow { rule: 0 }
        );
        assert_eq!(
            t.decide(&rs, proto::TCP, 443, 49),
            Decision::Allow { rule: 2 }
        );
        assert_eq!(
            t.decide(&rs, proto::TCP, 443, 50),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn first_allow_in_policy_order_decides() {
        let rs = rules(&[ALLOW, ALLOW]);
        let t = PortTable::build([(1, PortSpec::Icmp), (0, PortSpec::Icmp)]);
        assert_eq!(
            t.decide(&rs, proto::ICMP, 0, 0),
            Decision::Allow { rule: 0 }
        );
    }

    #[test]
    fn unknown_rule_indices_allow_nothing() {
        let t = PortTable::build([(7, PortSpec::Any)]);
        assert_eq!(
            t.decide(&rules(&[ALLOW]), proto::TCP, 1, 0),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn access_set_subtracts_denies() {
        let rs = rules(&[ALLOW, DENY]);
        let t = PortTable::build([(0, PortSpec::Any), (1, PortSpec::Tcp { lo: 22, hi: 22 })]);
        let a = t.access(&rs, 0);
        assert_eq!(a.tcp, vec![(0, 21), (23, 65535)]);
        assert_eq!(a.udp, vec![(0, 65535)]);
        assert!(a.icmp && a.other);
        assert!(t.allows_any(&rs, 0));
        let only_denied = PortTable::build([(0, PortSpec::Icmp), (1, PortSpec::Icmp)]);
        assert!(!only_denied.allows_any(&rs, 0));
        assert!(only_denied.access(&rs, 0).is_empty());
    }

    #[test]
    fn remap_and_rule_indices() {
        let t = PortTable::build([(4, PortSpec::Tcp { lo: 1, hi: 2 }), (9, PortSpec::Icmp)]);
        assert_eq!(t.rule_indices(), vec![4, 9]);
        let r = t.remap(|i| if i == 4 { 0 } else { 1 });
        assert_eq!(r.rule_indices(), vec![0, 1]);
        assert_eq!(r.rules_for(proto::TCP, 2), &[0]);
    }

    #[test]
    fn display_of_specs() {
        let cases = [
            (PortSpec::Any, "any"),
            (PortSpec::Icmp, "icmp"),
            (PortSpec::Tcp { lo: 22, hi: 22 }, "tcp/22"),
            (PortSpec::Udp { lo: 1, hi: 9 }, "udp/1-9"),
            (PortSpec::Tcp { lo: 0, hi: 65535 }, "tcp"),
        ];
        for (spec, want) in cases {
            assert_eq!(spec.to_string(), want);
        }
    }
}
