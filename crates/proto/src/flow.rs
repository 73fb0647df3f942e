//! The flow log's wire types: what nodes ship (`POST /v1/node/flows`) and what `bulkhead flows`
//! shows.

use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What happened to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Admitted.
    Allow,
    /// Denied.
    Deny,
    /// Let through only because the host firewall observes: `enforce` would deny it.
    #[serde(rename = "would-deny")]
    WouldDeny,
    /// A verdict this version does not know (sent by a newer controller).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would-deny",
            Verdict::Unknown => "unknown",
        })
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;

    /// `allow`, `deny` or `would-deny`; nothing else (a filter on an unknown verdict is a
    /// mistake, not a request for none).
    fn from_str(s: &str) -> Result<Verdict, String> {
        match s {
            "allow" => Ok(Verdict::Allow),
            "deny" => Ok(Verdict::Deny),
            "would-deny" => Ok(Verdict::WouldDeny),
            _ => Err("verdict: allow, deny or would-deny".into()),
        }
    }
}

/// Which network a flow took: the overlay (through a tunnel) or the underlay (the server's
/// ordinary network, seen by the host firewall).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Through the overlay.
    #[default]
    Overlay,
    /// Over the underlay.
    Underlay,
    /// A path this version does not know.
    #[serde(other)]
    Unknown,
}

impl Path {
    /// Whether this is the overlay (the default, left out of the wire format).
    pub fn is_overlay(&self) -> bool {
        *self == Path::Overlay
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Overlay => "overlay",
            Path::Underlay => "underlay",
            Path::Unknown => "unknown",
        })
    }
}

impl std::str::FromStr for Path {
    type Err = String;

    /// `overlay` or `underlay`.
    fn from_str(s: &str) -> Result<Path, String> {
        match s {
            "overlay" => Ok(Path::Overlay),
            "underlay" => Ok(Path::Underlay),
            _ => Err("path: overlay or underlay".into()),
        }
    }
}

/// An IP protocol, written `tcp`, `udp`, `icmp`, or as its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1).
    Icmp,
    /// Any other, by number.
    Other(u8),
}

impl Protocol {
    /// The protocol with this IP protocol number.
    pub fn from_number(n: u8) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            n => Protocol::Other(n),
        }
    }

    /// Its IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::Other(n) => n,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Other(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            n => n
                .parse()
                .map(Protocol::from_number)
                .map_err(|_| format!("unknown protocol {n:?}")),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A flow start or a denied new flow, as a node records it (`POST /v1/node/flows`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// Unix milliseconds.
    pub at: i64,
    /// Opened by this node (`true`) or by the peer.
    pub outbound: bool,
    /// The peer's identity, if it is a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The peer's overlay address.
    pub peer_address: Ipv4Addr,
    /// `tcp`, `udp`, `icmp` or the protocol number.
    pub proto: Protocol,
    /// The destination port (ICMP: the echo identifier).
    pub port: u16,
    /// Admitted, or denied.
    pub allowed: bool,
    /// The rule that decided: the allow rule, or the deny rule; none for the default deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it was denied: `not_allowed`, `denied`, `not_a_peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The overlay, or the underlay (the host firewall). On the underlay, `peer_address` is the
    /// other server's underlay address and `peer` is left to the controller to name.
    #[serde(default, skip_serializing_if = "Path::is_overlay")]
    pub path: Path,
    /// Not allowed, but let through: the host firewall observes and `enforce` would drop it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub observed: bool,
}

/// A batch of a node's flow log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowBatch {
    /// The entries, oldest first.
    pub flows: Vec<FlowEntry>,
    /// Entries the node dropped because its buffer was full, since the last batch.
    #[serde(default)]
    pub dropped: u64,
}

/// One flow, as `bulkhead flows` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// Unix milliseconds.
    pub at: i64,
    /// The node that recorded it.
    pub node: String,
    /// The initiator's identity (or address, if no identity has it).
    pub src: String,
    /// Its overlay address.
    pub src_address: Ipv4Addr,
    /// The responder's identity (or address).
    pub dst: String,
    /// Its overlay address.
    pub dst_address: Ipv4Addr,
    /// `tcp`, `udp`, `icmp`, …
    pub proto: Protocol,
    /// Destination port.
    pub port: u16,
    /// `allow`, `deny` or `would-deny`.
    pub verdict: Verdict,
    /// `overlay` or `underlay`; on the underlay the addresses are underlay addresses.
    #[serde(default, skip_serializing_if = "Path::is_overlay")]
    pub path: Path,
    /// The deciding rule, if any (none: the default deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it was denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One hour of one kind of flow, as the durable flow history keeps it (spec §9):
/// `GET /v1/flows/history` answers with these, one JSON object per line, oldest hour first.
///
/// Two flows fall into the same aggregate when they share the hour and every field from `src`
/// to `rule`; `count` says how many there were, `first`/`last` when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowAggregate {
    /// The hour's start, Unix seconds (a multiple of 3600).
    pub hour: i64,
    /// The initiator's identity (or address, if no identity has it).
    pub src: String,
    /// Its address (overlay, or underlay on the underlay path).
    pub src_address: Ipv4Addr,
    /// The responder's identity (or address).
    pub dst: String,
    /// Its address.
    pub dst_address: Ipv4Addr,
    /// `tcp`, `udp`, `icmp`, …
    pub proto: Protocol,
    /// Destination port (ICMP: 0).
    pub port: u16,
    /// `allow`, `deny` or `would-deny`.
    pub verdict: Verdict,
    /// `overlay` or `underlay`.
    #[serde(default, skip_serializing_if = "Path::is_overlay")]
    pub path: Path,
    /// The deciding rule, if any (none: the default deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Flows (allowed starts, or denied new flows) in the hour.
    pub count: u64,
    /// The first one, Unix milliseconds.
    pub first: i64,
    /// The last one, Unix milliseconds.
    pub last: i64,
}

impl FlowAggregate {
    /// Whether `other` is the same kind of flow in the same hour: every field but `count`,
    /// `first` and `last` is equal.
    pub fn same_kind(&self, other: &FlowAggregate) -> bool {
        self.hour == other.hour
            && self.src == other.src
            && self.src_address == other.src_address
            && self.dst == other.dst
            && self.dst_address == other.dst_address
            && self.proto == other.proto
            && self.port == other.port
            && self.verdict == other.verdict
            && self.path == other.path
            && self.rule == other.rule
    }

    /// Takes in the flows of `other`, an aggregate of the same kind ([`FlowAggregate::same_kind`])
    /// kept elsewhere (another controller, or not yet written): the counts add up, `first` is
    /// the earlier and `last` the later.
    pub fn absorb(&mut self, other: &FlowAggregate) {
        self.count = self.count.saturating_add(other.count);
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_read_as_they_are_written() {
        for n in 0..=255u8 {
            let p = Protocol::from_number(n);
            assert_eq!(p.number(), n);
            let json = serde_json::to_string(&p).unwrap_or_default();
            assert_eq!(
                serde_json::from_str::<Protocol>(&json).ok(),
                Some(p),
                "{json}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Protocol::Tcp).ok().as_deref(),
            Some("\"tcp\"")
        );
        assert_eq!(Protocol::from_number(47).to_string(), "47");
        assert!("gre".parse::<Protocol>().is_err());
        assert_eq!(
            serde_json::to_string(&Verdict::Deny).ok().as_deref(),
            Some("\"deny\"")
        );
        assert_eq!(
            serde_json::to_string(&Verdict::WouldDeny).ok().as_deref(),
            Some("\"would-deny\"")
        );
        for v in [Verdict::Allow, Verdict::Deny, Verdict::WouldDeny] {
            assert_eq!(v.to_string().parse::<Verdict>().ok(), Some(v));
        }
        for p in [Path::Overlay, Path::Underlay] {
            assert_eq!(p.to_string().parse::<Path>().ok(), Some(p));
        }
        assert!("unknown".parse::<Verdict>().is_err() && "unknown".parse::<Path>().is_err());
        // What a newer controller may send reads, as unknown.
        let v: Result<Verdict, _> = serde_json::from_str("\"maybe\"");
        assert_eq!(v.ok(), Some(Verdict::Unknown));
        let a: Result<crate::AuditAction, _> = serde_json::from_str("\"policy.rollback\"");
        assert_eq!(a.ok(), Some(crate::AuditAction::Unknown));
        let a: Result<crate::AuditAction, _> = serde_json::from_str("\"admin.add\"");
        assert_eq!(a.ok(), Some(crate::AuditAction::AdminAdd));
    }

    #[test]
    fn aggregates_of_one_kind_absorb_each_other() {
        let mut a = FlowAggregate {
            hour: 7200,
            src: "web-1".into(),
            src_address: Ipv4Addr::new(10, 0, 0, 1),
            dst: "db-1".into(),
            dst_address: Ipv4Addr::new(10, 0, 0, 2),
            proto: Protocol::Tcp,
            port: 5432,
            verdict: Verdict::Allow,
            path: Path::Overlay,
            rule: Some("web-to-db".into()),
            count: 3,
            first: 7_300_000,
            last: 7_400_000,
        };
        let b = FlowAggregate {
            count: 2,
            first: 7_200_500,
            last: 7_350_000,
            ..a.clone()
        };
        assert!(a.same_kind(&b));
        a.absorb(&b);
        assert_eq!((a.count, a.first, a.last), (5, 7_200_500, 7_400_000));
        let other_rule = FlowAggregate {
            rule: None,
            ..b.clone()
        };
        assert!(!a.same_kind(&other_rule));
        let other_hour = FlowAggregate { hour: 10800, ..b };
        assert!(!a.same_kind(&other_hour));
        // The wire form: the overlay and no rule are left out.
        let json = serde_json::to_value(&other_rule).unwrap_or_default();
        assert!(
            json.get("path").is_none() && json.get("rule").is_none(),
            "{json}"
        );
        assert_eq!(json["verdict"], "allow");
    }
}
