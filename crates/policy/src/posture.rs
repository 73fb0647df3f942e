//! Device posture: conditions on the facts a node reports, and their evaluation.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use crate::ast::CheckDef;

/// The facts every daemon reports about its host. Node-local checks add `check.NAME`.
pub const FACTS: &[&str] = &[
    "os.id",
    "os.version_id",
    "kernel.release",
    "root_fs.encrypted",
    "daemon.version",
    ENDPOINT_ADDRESS,
];

/// Where a node is: the address its connection to the controller comes from, as the controller
/// sees it. Never reported by a node: the controller fills it in from the connection, and drops
/// any fact of that name a node claims.
pub const ENDPOINT_ADDRESS: &str = "endpoint.address";

/// The prefix of facts that carry node-local check results.
pub const CHECK_PREFIX: &str = "check.";

/// What kind of value a fact holds, which decides the conditions it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactKind {
    /// A word, such as `os.id`.
    Text,
    /// A version, such as `kernel.release`; also compared as text.
    Version,
    /// `true` or `false`.
    Bool,
    /// An IP address, tested against networks.
    Address,
}

/// The kind of a fact, or `None` if no daemon reports it.
pub fn fact_kind(fact: &str) -> Option<FactKind> {
    match fact {
        "os.id" => Some(FactKind::Text),
        "os.version_id" | "kernel.release" | "daemon.version" => Some(FactKind::Version),
        "root_fs.encrypted" => Some(FactKind::Bool),
        ENDPOINT_ADDRESS => Some(FactKind::Address),
        f if f
            .strip_prefix(CHECK_PREFIX)
            .is_some_and(crate::parse::is_valid_name) =>
        {
            Some(FactKind::Bool)
        }
        _ => None,
    }
}

/// A comparison operator for versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `==`
    #[serde(rename = "==")]
    Eq,
}

impl Op {
    /// Splits a leading operator off `s`.
    pub fn split(s: &str) -> Option<(Op, &str)> {
        for (text, op) in [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            (">", Op::Gt),
            ("<", Op::Lt),
        ] {
            if let Some(rest) = s.strip_prefix(text) {
                return Some((op, rest.trim()));
            }
        }
        None
    }

    fn holds(self, o: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Ge => o != Less,
            Op::Gt => o == Greater,
            Op::Le => o != Greater,
            Op::Lt => o == Less,
            Op::Eq => o == Equal,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
            Op::Eq => "==",
        }
    }

    fn negated_symbol(self) -> &'static str {
        match self {
            Op::Ge => "<",
            Op::Gt => "<=",
            Op::Le => ">",
            Op::Lt => ">=",
            Op::Eq => "!=",
        }
    }
}

/// A dotted numeric version. Missing trailing parts count as zero: `6.1 == 6.1.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    /// Parses a policy's version exactly: digits separated by dots, e.g. `6.1` or `12`.
    pub fn parse_strict(s: &str) -> Option<Version> {
        let parts = s
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    p.parse().ok()
                }
            })
            .collect::<Option<Vec<u64>>>()?;
        Some(Version {
            parts,
            text: s.to_string(),
        })
    }

    /// Reads the leading version of a reported fact, e.g. `6.1.0` from `6.1.0-18-amd64`.
    pub fn parse_prefix(s: &str) -> Option<Version> {
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        Version::parse_strict(s[..end].trim_end_matches('.'))
    }

    fn cmp(&self, other: &Version) -> std::cmp::Ordering {
        let n = self.parts.len().max(other.parts.len());
        let at = |v: &Version, i: usize| v.parts.get(i).copied().unwrap_or(0);
        (0..n)
            .map(|i| at(self, i).cmp(&at(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// What one fact must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// One of these strings.
    OneOf(Vec<String>),
    /// Exactly this string.
    Equals(String),
    /// `true` or `false`.
    Bool(bool),
    /// A version comparison.
    Compare(Op, Version),
    /// An address in one of these networks.
    InNetworks(Vec<IpNet>),
}

/// An IPv4 or IPv6 network, `ADDRESS/LEN`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    len: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8` or `fd00::/8`; an address alone is a single host.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let bad = || format!("bad network {s:?}: expected e.g. 10.0.0.0/8 or fd00::/8");
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().ok().filter(|&l| l <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        let net = IpNet { addr, len };
        if !net.contains(addr) || net.masked() != addr {
            return Err(format!(
                "bad network {s:?}: host bits are set; did you mean {}/{len}?",
                net.masked()
            ));
        }
        Ok(net)
    }

    fn masked(&self) -> std::net::IpAddr {
        match self.addr {
            std::net::IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                std::net::IpAddr::V4((u32::from(a) & m).into())
            }
            std::net::IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                std::net::IpAddr::V6((u128::from(a) & m).into())
            }
        }
    }

    /// Whether `ip` lies in this network. An IPv4 address seen as IPv6 (`::ffff:a.b.c.d`)
    /// counts as the IPv4 address.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        let masked = IpNet {
            addr: ip,
            len: self.len,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && masked.masked() == self.addr
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::OneOf(v) => write!(f, "one of {}", v.join(", ")),
            Condition::Equals(s) => write!(f, "== {s}"),
            Condition::Bool(b) => write!(f, "{b}"),
            Condition::Compare(op, v) => write!(f, "{} {}", op.symbol(), v.text),
            Condition::InNetworks(nets) => write!(f, "in {}", join(nets)),
        }
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The facts one node reported, by name, as text (`true`/`false` for booleans).
pub type Facts = BTreeMap<String, String>;

/// Checks one condition against a fact's value; on failure, says why in the words an operator
/// reads in `bulkhead nodes`, e.g. `kernel.release 5.10.0 < 6.1`.
pub fn check_condition(fact: &str, cond: &Condition, value: Option<&str>) -> Result<(), String> {
    let Some(value) = value else {
        return Err(format!("{fact} not reported"));
    };
    match cond {
        Condition::OneOf(options) if options.iter().any(|o| o == value) => Ok(()),
        Condition::OneOf(options) => Err(format!(
            "{fact} {value} is not one of {}",
            options.join(", ")
        )),
        Condition::Equals(want) if want == value => Ok(()),
        Condition::Equals(want) => Err(format!("{fact} {value} != {want}")),
        Condition::Bool(want) => match value {
            "true" | "false" if (value == "true") == *want => Ok(()),
            "true" | "false" => Err(format!("{fact} is {value}")),
            _ => Err(format!("{fact} {value:?} is not true or false")),
        },
        Condition::Compare(op, want) => match Version::parse_prefix(value) {
            Some(have) if op.holds(have.cmp(want)) => Ok(()),
            Some(_) => Err(format!(
                "{fact} {value} {} {}",
                op.negated_symbol(),
                want.text
            )),
            None => Err(format!("{fact} {value:?} is not a version")),
        },
        Condition::InNetworks(nets) => match value.parse::<std::net::IpAddr>() {
            Ok(ip) if nets.iter().any(|n| n.contains(ip)) => Ok(()),
            Ok(_) => Err(format!("{fact} {value} is not in {}", join(nets))),
            Err(_) => Err(format!("{fact} {value:?} is not an address")),
        },
    }
}

/// Evaluates a whole check against a node's facts: every condition must hold. On failure, the
/// reasons of every failing condition, joined.
pub fn evaluate(check: &CheckDef, facts: &Facts) -> Result<(), String> {
    let reasons: Vec<String> = check
        .conditions
        .iter()
        .filter_map(|(fact, cond)| {
            check_condition(
                &fact.value,
                cond,
                facts.get(&fact.value).map(String::as_str),
            )
            .err()
        })
        .collect();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse_strict(s).unwrap()
    }

    #[test]
    fn versions_compare_numerically_with_zero_padding() {
        assert_eq!(v("6.1").cmp(&v("6.1.0")), std::cmp::Ordering::Equal);
        assert_eq!(v("6.10").cmp(&v("6.9")), std::cmp::Ordering::Greater);
        assert_eq!(v("5.10.0").cmp(&v("6.1")), std::cmp::Ordering::Less);
        assert!(Version::parse_strict("6.x").is_none());
        assert!(Version::parse_strict("").is_none());
        assert!(Version::parse_strict("6..1").is_none());
        assert_eq!(
            Version::parse_prefix("6.1.0-18-amd64").unwrap().parts,
            vec![6, 1, 0]
        );
        assert!(Version::parse_prefix("rolling").is_none());
    }

    #[test]
    fn operators_split_off() {
        assert_eq!(Op::split(">= 6.1"), Some((Op::Ge, "6.1")));
        assert_eq!(Op::split(">6"), Some((Op::Gt, "6")));
        assert_eq!(Op::split("==12"), Some((Op::Eq, "12")));
        assert_eq!(Op::split("6.1"), None);
    }

    #[test]
    fn conditions_explain_failures() {
        let ge = Condition::Compare(Op::Ge, v("6.1"));
        assert_eq!(
            check_condition("kernel.release", &ge, Some("5.10.0")),
            Err("kernel.release 5.10.0 < 6.1".into())
        );
        assert_eq!(
            check_condition("kernel.release", &ge, Some("6.1.0-18-amd64")),
            Ok(())
        );
        assert_eq!(
            check_condition("kernel.release", &ge, None),
            Err("kernel.release not reported".into())
        );
        let one = Condition::OneOf(vec!["debian".into(), "ubuntu".into()]);
        assert!(check_condition("os.id", &one, Some("debian")).is_ok());
        assert_eq!(
            check_condition("os.id", &one, Some("arch")),
            Err("os.id arch is not one of debian, ubuntu".into())
        );
        let t = Condition::Bool(true);
        assert!(check_condition("check.edr", &t, Some("true")).is_ok());
        assert_eq!(
            check_condition("check.edr", &t, Some("false")),
            Err("check.edr is false".into())
        );
        assert!(check_condition("check.edr", &t, Some("yes")).is_err());
    }

    #[test]
    fn locations_are_networks_of_either_family() {
        let nets = Condition::InNetworks(vec![
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("fd00::/8").unwrap(),
        ]);
        let at = |v: &str| check_condition(ENDPOINT_ADDRESS, &nets, Some(v));
        assert!(at("10.1.2.3").is_ok());
        assert!(at("::ffff:10.1.2.3").is_ok(), "IPv4 seen as IPv6");
        assert!(at("fd12::1").is_ok());
        assert_eq!(
            at("192.168.1.5"),
            Err("endpoint.address 192.168.1.5 is not in 10.0.0.0/8, fd00::/8".into())
        );
        assert!(at("nonsense").is_err());
        assert_eq!(
            check_condition(ENDPOINT_ADDRESS, &nets, None),
            Err("endpoint.address not reported".into())
        );
        assert!(
            IpNet::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
        for bad in ["10.0.0.0/33", "10.0.0.0/", "x/8", "10.0.0.0/-1", "::/129"] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(IpNet::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(
            IpNet::parse("10.1.2.3")
                .unwrap()
                .contains("10.1.2.3".parse().unwrap())
        );
    }

    #[test]
    fn fact_kinds() {
        assert_eq!(fact_kind("endpoint.address"), Some(FactKind::Address));
        assert_eq!(fact_kind("os.id"), Some(FactKind::Text));
        assert_eq!(fact_kind("kernel.release"), Some(FactKind::Version));
        assert_eq!(fact_kind("check.edr-running"), Some(FactKind::Bool));
        assert_eq!(fact_kind("check.Bad_Name"), None);
        assert_eq!(fact_kind("os.name"), None);
    }
}
