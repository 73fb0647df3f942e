//! What is reachable one way between two identities, as a normalized set.

use serde::{Serialize, Serializer};

/// A normalized set of protocols and ports: sorted, disjoint, merged port ranges per protocol.
///
/// `other` stands for every IP protocol but TCP, UDP and ICMP; only an `any` rule grants it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessSet {
    /// TCP port ranges, inclusive.
    pub tcp: Vec<(u16, u16)>,
    /// UDP port ranges, inclusive.
    pub udp: Vec<(u16, u16)>,
    /// ICMP.
    pub icmp: bool,
    /// Every other IP protocol.
    pub other: bool,
}

const FULL: &[(u16, u16)] = &[(0, u16::MAX)];

impl AccessSet {
    /// Nothing at all.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && !self.icmp && !self.other
    }

    /// Everything: what `any` grants.
    pub fn is_everything(&self) -> bool {
        self.tcp == FULL && self.udp == FULL && self.icmp && self.other
    }

    /// What `self` has that `other` has not.
    pub fn minus(&self, other: &AccessSet) -> AccessSet {
        AccessSet {
            tcp: ranges_minus(&self.tcp, &other.tcp),
            udp: ranges_minus(&self.udp, &other.udp),
            icmp: self.icmp && !other.icmp,
            other: self.other && !other.other,
        }
    }

    /// The set as short strings: `any`, `tcp`, `tcp/22`, `udp/1000-2000`, `icmp`, `other`.
    pub fn to_strings(&self) -> Vec<String> {
        if self.is_everything() {
            return vec!["any".into()];
        }
        let mut out = Vec::new();
        for (name, ranges) in [("tcp", &self.tcp), ("udp", &self.udp)] {
            for &(lo, hi) in ranges {
                out.push(match (lo, hi) {
                    (0, u16::MAX) => name.to_string(),
                    (lo, hi) if lo == hi => format!("{name}/{lo}"),
                    (lo, hi) => format!("{name}/{lo}-{hi}"),
                });
            }
        }
        if self.icmp {
            out.push("icmp".into());
        }
        if self.other {
            out.push("other".into());
        }
        out
    }
}

impl std::fmt::Display for AccessSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        f.write_str(&self.to_strings().join(", "))
    }
}

impl Serialize for AccessSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_strings().serialize(s)
    }
}

/// `a - b` for sorted, disjoint, inclusive ranges.
fn ranges_minus(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for &(lo, hi) in a {
        let (mut lo, hi) = (u32::from(lo), u32::from(hi));
        for &(blo, bhi) in b {
            let (blo, bhi) = (u32::from(blo), u32::from(bhi));
            if bhi < lo || blo > hi {
                continue;
            }
            if blo > lo {
                out.push((lo as u16, (blo - 1) as u16));
            }
            lo = bhi + 1;
            if lo > hi {
                break;
            }
        }
        if lo <= hi {
            out.push((lo as u16, hi as u16));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_cuts_ranges() {
        assert_eq!(
            ranges_minus(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 9), (21, 29), (41, 100)]
        );
        assert_eq!(ranges_minus(&[(10, 20)], &[(0, 65535)]), vec![]);
        assert_eq!(ranges_minus(&[(10, 20)], &[(20, 30)]), vec![(10, 19)]);
        assert_eq!(ranges_minus(&[(0, 65535)], &[(0, 0)]), vec![(1, 65535)]);
        assert_eq!(
            ranges_minus(&[(0, 65535)], &[(65535, 65535)]),
            vec![(0, 65534)]
        );
    }

    #[test]
    fn strings() {
        let all = AccessSet {
            tcp: FULL.to_vec(),
            udp: FULL.to_vec(),
            icmp: true,
            other: true,
        };
        assert_eq!(all.to_string(), "any");
        let some = AccessSet {
            tcp: vec![(22, 22), (8000, 8080)],
            udp: FULL.to_vec(),
            icmp: true,
            other: false,
        };
        assert_eq!(some.to_string(), "tcp/22, tcp/8000-8080, udp, icmp");
        assert_eq!(
            all.minus(&some).to_string(),
            "tcp/0-21, tcp/23-7999, tcp/8081-65535, other"
        );
        assert_eq!(AccessSet::default().to_string(), "-");
        assert!(some.minus(&all).is_empty());
    }
}
