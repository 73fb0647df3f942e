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
];

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
}

/// The kind of a fact, or `None` if no daemon reports it.
pub fn fact_kind(fact: &str) -> Option<FactKind> {
    match fact {
        "os.id" => Some(FactKind::Text),
        "os.version_id" | "kernel.release" | "daemon.version" => Some(FactKind::Version),
        "root_fs.encrypted" => Some(FactKind::Bool),
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
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::OneOf(v) => write!(f, "one of {}", v.join(", ")),
            Condition::Equals(s) => write!(f, "== {s}"),
            Condition::Bool(b) => write!(f, "{b}"),
            Condition::Compare(op, v) => write!(f, "{} {}", op.symbol(), v.text),
        }
    }
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
    fn fact_kinds() {
        assert_eq!(fact_kind("os.id"), Some(FactKind::Text));
        assert_eq!(fact_kind("kernel.release"), Some(FactKind::Version));
        assert_eq!(fact_kind("check.edr-running"), Some(FactKind::Bool));
        assert_eq!(fact_kind("check.Bad_Name"), None);
        assert_eq!(fact_kind("os.name"), None);
    }
}
