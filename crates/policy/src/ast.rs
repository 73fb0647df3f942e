//! The policy as written, after parsing: every value well-formed, every name and position kept.
//! References between names are resolved later, by [`crate::Model`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_allowlist::{Action, Network, PortSpec, UnderlayMode, UnixTime, Window};
use serde::Serialize;

use crate::diag::Pos;
use crate::posture::Condition;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Spanned<T> {
    /// Where.
    pub pos: Pos,
    /// What.
    pub value: T,
}

/// A whole policy file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// The format version; only 1 exists.
    pub version: u32,
    /// `network.name`, default `"default"`.
    pub network_name: String,
    /// `network.cidr`.
    pub cidr: Network,
    /// Where `network.cidr` was written.
    pub cidr_pos: Pos,
    /// `network.addressing`: overlay addresses (default), or the servers' own (spec §8).
    pub addressing: bulkhead_allowlist::Addressing,
    /// `identities`, in file order.
    pub identities: Vec<IdentityDef>,
    /// `segments`, in file order.
    pub segments: Vec<SegmentDef>,
    /// `rules`, in file order.
    pub rules: Vec<RuleDef>,
    /// `posture`, in file order.
    pub posture: Vec<CheckDef>,
    /// `quarantine`, if set.
    pub quarantine: Option<QuarantineDef>,
    /// `tests`, in file order.
    pub tests: Vec<TestDef>,
    /// `underlay`, if written.
    pub underlay: Option<UnderlayDef>,
}

/// One entry of `identities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityDef {
    /// The identity's name.
    pub name: String,
    /// Where the name was written.
    pub pos: Pos,
    /// Labels, by key.
    pub labels: BTreeMap<String, String>,
    /// A fixed overlay address, if given.
    pub address: Option<Spanned<Ipv4Addr>>,
}

/// One entry of `segments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentDef {
    /// The segment's name.
    pub name: String,
    /// Where the name was written.
    pub pos: Pos,
    /// `match`: every listed label must match. `None` if absent.
    pub selector: Option<BTreeMap<String, String>>,
    /// `identities`: listed members.
    pub identities: Vec<Spanned<String>>,
}

/// One entry of `rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleDef {
    /// The rule's name.
    pub name: String,
    /// Where the rule starts.
    pub pos: Pos,
    /// Allow (default) or deny.
    pub action: Action,
    /// Segment names, identity names, `*` or `quarantined`.
    pub from: Vec<Spanned<String>>,
    /// Segment names, identity names, `*` or `quarantined`.
    pub to: Vec<Spanned<String>>,
    /// The ports it covers.
    pub ports: Vec<Spanned<PortSpec>>,
    /// `not_before` and `expires`.
    pub window: Window,
    /// Check names the initiating identity must pass.
    pub posture: Vec<Spanned<String>>,
    /// `approval`: the rule is in force only while an approved access request covers it.
    pub approval: Option<ApprovalDef>,
}

/// A rule's `approval: { approvers: N, max: D }` (spec §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ApprovalDef {
    /// How many different administrators must approve a request, none of them its requester.
    pub approvers: u32,
    /// The longest a request may ask for, in seconds.
    pub max_secs: i64,
}

/// One entry of `posture`: a named device-health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckDef {
    /// The check's name.
    pub name: String,
    /// Where the name was written.
    pub pos: Pos,
    /// Every condition must hold, fact by fact.
    pub conditions: Vec<(Spanned<String>, Condition)>,
}

/// `quarantine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuarantineDef {
    /// An identity denied more often than this per minute is quarantined.
    pub denied_per_minute: u32,
    /// How long a quarantine lasts, in seconds.
    pub duration_secs: i64,
}

/// The expected verdict of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The connection must be allowed.
    Allow,
    /// The connection must be denied.
    Deny,
}

/// A single protocol and port, as in a test or an `explain` query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Probe {
    /// IP protocol number.
    pub proto: u8,
    /// Destination port; 0 for protocols without ports.
    pub port: u16,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use bulkhead_allowlist::proto;
        match self.proto {
            proto::TCP => write!(f, "tcp/{}", self.port),
            proto::UDP => write!(f, "udp/{}", self.port),
            proto::ICMP => f.write_str("icmp"),
            p => write!(f, "proto/{p}"),
        }
    }
}

/// One entry of `tests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestDef {
    /// Where the test starts.
    pub pos: Pos,
    /// Initiating identity.
    pub from: Spanned<String>,
    /// Responding identity.
    pub to: Spanned<String>,
    /// Protocol and port.
    pub probe: Probe,
    /// Expected verdict.
    pub expect: Expect,
    /// Evaluate at this time instead of now.
    pub at: Option<UnixTime>,
    /// Posture checks that fail for `from` in this test; all others pass.
    pub failing: Vec<Spanned<String>>,
    /// Identities quarantined in this test.
    pub quarantined: Vec<Spanned<String>>,
}

/// `underlay`: the host firewall on the servers in scope (see [`crate::underlay`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnderlayDef {
    /// Where the block starts.
    pub pos: Pos,
    /// `mode`, default `off`.
    pub mode: UnderlayMode,
    /// `scope`: segment names. `None`: every identity.
    pub scope: Option<Vec<Spanned<String>>>,
    /// `allow`, in file order.
    pub allow: Vec<UnderlayAllowDef>,
}

/// One entry of `underlay.allow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnderlayAllowDef {
    /// The entry's name, and where it is written.
    pub name: Spanned<String>,
    /// Where the entry starts.
    pub pos: Pos,
    /// Who may connect: networks, or names (identities, segments, `*`) resolved later.
    pub from: Vec<Spanned<UnderlaySource>>,
    /// The servers that accept: identity and segment names, or `*`.
    pub to: Vec<Spanned<String>>,
    /// The ports it covers.
    pub ports: Vec<Spanned<PortSpec>>,
}

/// One entry of an underlay `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderlaySource {
    /// An IPv4 network, checked: no host bits, no special range, not `/0`.
    Net(Network),
    /// An identity, a segment or `*`.
    Name(String),
}
