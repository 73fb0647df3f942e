//! From the YAML tree to [`Policy`]: every key known, every value well-formed. Problems are
//! collected, never returned early, so one run reports them all.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use bulkhead_allowlist::{Action, Addressing, Network, PortSpec, UnixTime, Window, proto};

use crate::addr;
use crate::ast::*;
use crate::diag::{Diags, Pos};
use crate::posture::{self, Condition, FactKind, Op, Version};
use crate::underlay;
use crate::yaml::{Node, Value};

/// Whether `s` is a valid identity, segment, rule or check name: 1 to 63 characters of
/// `[a-z0-9-]`, starting with a letter or digit.
pub fn is_valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Parses one entry of a rule's `ports`.
pub fn parse_port_spec(s: &str) -> Result<PortSpec, String> {
    let usage = "expected tcp/N, tcp/N-M, udp/N, udp/N-M, tcp, udp, icmp or any";
    match s {
        "any" => return Ok(PortSpec::Any),
        "icmp" => return Ok(PortSpec::Icmp),
        "tcp" => {
            return Ok(PortSpec::Tcp {
                lo: 0,
                hi: u16::MAX,
            });
        }
        "udp" => {
            return Ok(PortSpec::Udp {
                lo: 0,
                hi: u16::MAX,
            });
        }
        _ => {}
    }
    let Some((p, ports)) = s.split_once('/') else {
        return Err(format!("bad port {s:?}: {usage}"));
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port_number(s, a)?, port_number(s, b)?),
        None => {
            let n = port_number(s, ports)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("bad port range {s:?}: {lo} is above {hi}"));
    }
    match p {
        "tcp" => Ok(PortSpec::Tcp { lo, hi }),
        "udp" => Ok(PortSpec::Udp { lo, hi }),
        _ => Err(format!("bad port {s:?}: {usage}")),
    }
}

fn port_number(whole: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) && !s.starts_with('+') => Ok(n as u16),
        _ => Err(format!("bad port {whole:?}: ports are 1 to 65535")),
    }
}

/// Parses a single protocol and port, as tests and `explain` take it: `tcp/N`, `udp/N`, `icmp`.
pub fn parse_probe(s: &str) -> Result<Probe, String> {
    let usage = "expected tcp/N, udp/N or icmp";
    if s == "icmp" {
        return Ok(Probe {
            proto: proto::ICMP,
            port: 0,
        });
    }
    let (p, port) = s
        .split_once('/')
        .ok_or_else(|| format!("bad port {s:?}: {usage}"))?;
    let proto = match p {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        _ => return Err(format!("bad port {s:?}: {usage}")),
    };
    Ok(Probe {
        proto,
        port: port_number(s, port)?,
    })
}

/// Parses an RFC 3339 time, e.g. `2026-12-31T18:00:00Z`, into Unix seconds.
pub fn parse_time(s: &str) -> Result<UnixTime, String> {
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|_| format!("bad time {s:?}: expected RFC 3339, e.g. 2026-12-31T18:00:00Z"))
}

/// Parses a duration such as `90s`, `15m`, `1h30m` or `7d` into seconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("bad duration {s:?}: expected e.g. 30s, 15m, 1h30m or 7d");
    let mut total: i64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = rest[digits..].chars().next().ok_or_else(bad)?;
        let mult = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(mult)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        rest = &rest[digits + 1..];
    }
    if total == 0 {
        return Err(format!("bad duration {s:?}: must be more than zero"));
    }
    Ok(total)
}

/// Parses the overlay's `A.B.C.D/N`.
fn parse_cidr(s: &str) -> Result<Network, String> {
    let bad = || format!("bad cidr {s:?}: expected an IPv4 prefix such as 10.100.0.0/16");
    let net = addr::parse_prefix(s).ok_or_else(bad)?;
    let prefix_len = net.prefix_len;
    if prefix_len > 30 {
        return Err(format!(
            "bad cidr {s:?}: a /{prefix_len} leaves no room for identities; use /30 or shorter"
        ));
    }
    if let Some(base) = addr::host_bits_cleared(net) {
        return Err(format!(
            "bad cidr {s:?}: host bits are set; did you mean {base}?"
        ));
    }
    if prefix_len < addr::MIN_PREFIX_LEN {
        return Err(format!(
            "bad cidr {s:?}: a /{prefix_len} is too large; every node routes the whole network \
             into the overlay, so use /{} or longer, e.g. a range of 10.0.0.0/8",
            addr::MIN_PREFIX_LEN
        ));
    }
    if let Some((range, what)) = addr::special_range(net) {
        return Err(format!(
            "bad cidr {s:?}: it overlaps {}/{}, the {what} range; an overlay needs unicast \
             addresses, e.g. a range of 10.0.0.0/8",
            range.address, range.prefix_len
        ));
    }
    Ok(net)
}

/// The keys of one mapping, checked: unknown and repeated keys are reported, the rest kept.
pub(crate) struct Fields<'n> {
    map: HashMap<&'n str, &'n Node>,
    pub(crate) pos: Pos,
}

impl<'n> Fields<'n> {
    pub(crate) fn get(&self, key: &str) -> Option<&'n Node> {
        self.map
            .get(key)
            .copied()
            .filter(|n| n.value != Value::Null)
    }
}

/// Reads values out of the tree, reporting every problem to `d` and going on.
pub(crate) struct Reader {
    pub(crate) d: Diags,
}

impl Reader {
    /// The entries of a mapping whose keys are names the user chose: repeats are reported, and
    /// only the first of each key is kept.
    pub(crate) fn entries<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
    ) -> Vec<(&'n str, Pos, &'n Node)> {
        let Value::Map(entries) = &node.value else {
            if node.value != Value::Null {
                self.d.error(
                    node.pos,
                    format!("{what} must be a mapping, found {}", node.kind()),
                );
            }
            return Vec::new();
        };
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.d.error(
                    k.pos,
                    format!("keys in {what} must be strings, found {}", k.kind()),
                );
                continue;
            };
            if let Some(first) = seen.get(key) {
                self.d.error(
                    k.pos,
                    format!("duplicate key {key:?} in {what} (first at {first})"),
                );
                continue;
            }
            seen.insert(key, k.pos);
            out.push((key, k.pos, v));
        }
        out
    }

    /// A mapping with a fixed set of keys.
    pub(crate) fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
    ) -> Option<Fields<'n>> {
        if !matches!(node.value, Value::Map(_)) {
            self.d.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return None;
        }
        let mut map = HashMap::new();
        for (key, pos, v) in self.entries(node, what) {
            if key == "<<" {
                self.d
                    .error(pos, "merge keys (<<) are not supported; write the keys out");
            } else if !known.contains(&key) {
                self.d.error(
                    pos,
                    format!(
                        "unknown key {key:?} in {what}; expected one of: {}",
                        known.join(", ")
                    ),
                );
            } else {
                map.insert(key, v);
            }
        }
        Some(Fields { map, pos: node.pos })
    }

    pub(crate) fn required<'n>(
        &mut self,
        f: &Fields<'n>,
        key: &str,
        what: &str,
    ) -> Option<&'n Node> {
        let n = f.get(key);
        if n.is_none() {
            self.d
                .error(f.pos, format!("{what} is missing the required key {key:?}"));
        }
        n
    }

    pub(crate) fn string<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        match node.as_str() {
            Some(s) => Some(s),
            None => {
                self.d.error(
                    node.pos,
                    format!("{what} must be a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    pub(crate) fn name(&mut self, s: &str, pos: Pos, kind: &str) -> bool {
        let ok = is_valid_name(s);
        if !ok {
            self.d.error(
                pos,
                format!(
                    "bad {kind} name {s:?}: names are 1 to 63 characters of a-z, 0-9 and '-', \
                     starting with a letter or digit"
                ),
            );
        }
        ok
    }

    pub(crate) fn list<'n>(&mut self, node: &'n Node, what: &str, example: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            _ => {
                self.d.error(
                    node.pos,
                    format!(
                        "{what} must be a list, e.g. {example}, found {}",
                        node.kind()
                    ),
                );
                &[]
            }
        }
    }

    /// A list of names, each checked for form.
    pub(crate) fn names(&mut self, node: &Node, what: &str, example: &str) -> Vec<Spanned<String>> {
        let mut out = Vec::new();
        for item in self.list(node, what, example) {
            if let Some(s) = self.string(item, &format!("an entry of {what}")) {
                out.push(Spanned {
                    pos: item.pos,
                    value: s.to_string(),
                });
            }
        }
        out
    }

    /// A list of ports, each as a rule's `ports` entry; `what` names the owner in the message
    /// for an empty list ("the rule").
    pub(crate) fn ports(&mut self, node: &Node, what: &str) -> Vec<Spanned<PortSpec>> {
        let mut ports = Vec::new();
        let items = self.list(node, "ports", "[tcp/5432, icmp]");
        if items.is_empty() && matches!(&node.value, Value::Seq(_)) {
            self.d.error(
                node.pos,
                format!("`ports` is empty, so {what} matches nothing; use [any] for everything"),
            );
        }
        for item in items {
            let Some(s) = self.string(item, "a port") else {
                continue;
            };
            match parse_port_spec(s) {
                Ok(spec) => ports.push(Spanned {
                    pos: item.pos,
                    value: spec,
                }),
                Err(e) => self.d.error(item.pos, e),
            }
        }
        ports
    }

    fn labels(&mut self, node: &Node, what: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (key, pos, v) in self.entries(node, what) {
            let key_ok = (1..=63).contains(&key.len())
                && key.starts_with(|c: char| c.is_ascii_alphanumeric())
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
            if !key_ok {
                self.d.error(
                    pos,
                    format!(
                        "bad label key {key:?}: 1 to 63 characters of letters, digits, \
                         '.', '_', '/' and '-', starting with a letter or digit"
                    ),
                );
                continue;
            }
            match v.as_str() {
                Some(val) if !val.is_empty() && val.len() <= 255 => {
                    out.insert(key.to_string(), val.to_string());
                }
                _ => self.d.error(
                    v.pos,
                    format!("label {key:?} needs a value of 1 to 255 characters"),
                ),
            }
        }
        out
    }

    fn time(&mut self, node: &Node, what: &str) -> Option<UnixTime> {
        let s = self.string(node, what)?;
        parse_time(s).map_err(|e| self.d.error(node.pos, e)).ok()
    }

    fn uint(&mut self, node: &Node, what: &str) -> Option<u64> {
        match node.value {
            Value::Scalar {
                ref text,
                quoted: false,
            } => text.parse().ok(),
            _ => None,
        }
        .or_else(|| {
            self.d
                .error(node.pos, format!("{what} must be a whole number"));
            None
        })
    }
}

/// Reads a whole policy document. Returns what could be read, leaving out what was malformed, so
/// that later checks can report their problems too; `None` only if the document is not a
/// mapping.
/// The diagnostics say whether anything was wrong.
pub(crate) fn read(root: &Node) -> (Option<Policy>, Diags) {
    let mut r = Reader {
        d: Diags::default(),
    };
    let policy = read_policy(&mut r, root);
    (policy, r.d)
}

fn read_policy(r: &mut Reader, root: &Node) -> Option<Policy> {
    if root.value == Value::Null {
        r.d.error(
            root.pos,
            "the policy is empty; it needs at least `version` and `network`",
        );
        return None;
    }
    let top = r.fields(
        root,
        "the policy",
        &[
            "version",
            "network",
            "identities",
            "segments",
            "rules",
            "posture",
            "quarantine",
            "tests",
            "underlay",
        ],
    )?;

    let version = r
        .required(&top, "version", "the policy")
        .and_then(|n| {
            let v = r.uint(n, "version")?;
            if v != 1 {
                r.d.error(
                    n.pos,
                    format!("unsupported policy version {v}; this bulkhead reads version 1"),
                );
            }
            Some(v as u32)
        })
        .unwrap_or(1);

    let (network_name, cidr, cidr_pos, addressing) = read_network(r, &top);
    let identities = top
        .get("identities")
        .map_or_else(Vec::new, |n| read_identities(r, n));
    let segments = top
        .get("segments")
        .map_or_else(Vec::new, |n| read_segments(r, n));
    let rules = top.get("rules").map_or_else(Vec::new, |n| read_rules(r, n));
    let posture = top
        .get("posture")
        .map_or_else(Vec::new, |n| read_posture(r, n));
    let quarantine = top.get("quarantine").and_then(|n| read_quarantine(r, n));
    let tests = top.get("tests").map_or_else(Vec::new, |n| read_tests(r, n));
    let underlay = top.get("underlay").and_then(|n| underlay::read(r, n));

    let mut identities = identities;
    let cidr = cidr.unwrap_or_else(|| {
        // The network is missing or bad, and that is reported. Read on with a stand-in, so that
        // the rest of the file is checked in the same run; fixed addresses mean nothing against
        // it and are left out. The policy is invalid whatever comes next.
        for i in &mut identities {
            i.address = None;
        }
        STAND_IN_NETWORK
    });
    Some(Policy {
        version,
        network_name,
        cidr,
        cidr_pos,
        addressing,
        identities,
        segments,
        rules,
        posture,
        quarantine,
        tests,
        underlay,
    })
}

/// The network a policy is read with when its own is missing or bad: large enough that addresses
/// never run out.
const STAND_IN_NETWORK: Network = Network {
    address: Ipv4Addr::new(10, 0, 0, 0),
    prefix_len: 8,
};

fn read_network(r: &mut Reader, top: &Fields<'_>) -> (String, Option<Network>, Pos, Addressing) {
    let mut name = "default".to_string();
    let mut addressing = Addressing::Overlay;
    let Some(n) = r.required(top, "network", "the policy") else {
        return (name, None, top.pos, addressing);
    };
    let Some(f) = r.fields(n, "network", &["name", "cidr", "addressing"]) else {
        return (name, None, n.pos, addressing);
    };
    if let Some(v) = f.get("addressing")
        && let Some(s) = r.string(v, "network.addressing")
    {
        match s {
            "overlay" => {}
            "underlay" => addressing = Addressing::Underlay,
            other => r.d.error(
                v.pos,
                format!(
                    "unknown addressing {other:?}: overlay (addresses in the overlay network) or \
                     underlay (each server's own address)"
                ),
            ),
        }
    }
    let cidr_pos = f.get("cidr").map_or(n.pos, |c| c.pos);
    if let Some(v) = f.get("name")
        && let Some(s) = r.string(v, "network.name")
        && r.name(s, v.pos, "network")
    {
        name = s.to_string();
    }
    let cidr = r.required(&f, "cidr", "network").and_then(|v| {
        let s = r.string(v, "network.cidr")?;
        let net = parse_cidr(s).map_err(|e| r.d.error(v.pos, e)).ok()?;
        // With the servers' own addresses, the range is theirs, public or not.
        if addressing == Addressing::Overlay && !addr::is_private(net) {
            r.d.warning(
                v.pos,
                format!(
                    "network {s} is public address space, not a private (10.0.0.0/8, \
                     172.16.0.0/12, 192.168.0.0/16) or CGNAT (100.64.0.0/10) range: every node \
                     sends its traffic for {s} into the overlay, so real hosts there become \
                     unreachable"
                ),
            );
        }
        Some(net)
    });
    (name, cidr, cidr_pos, addressing)
}

fn read_identities(r: &mut Reader, node: &Node) -> Vec<IdentityDef> {
    let mut out = Vec::new();
    for (name, pos, v) in r.entries(node, "identities") {
        r.name(name, pos, "identity");
        let mut def = IdentityDef {
            name: name.to_string(),
            pos,
            labels: BTreeMap::new(),
            address: None,
        };
        if v.value != Value::Null
            && let Some(f) = r.fields(
                v,
                &format!("identity {name:?}"),
                &["labels", "address", "description"],
            )
        {
            if let Some(l) = f.get("labels") {
                def.labels = r.labels(l, &format!("the labels of {name:?}"));
            }
            if let Some(a) = f.get("address")
                && let Some(s) = r.string(a, "address")
            {
                match s.parse::<Ipv4Addr>() {
                    Ok(ip) => match addr::special_address(ip) {
                        Some((range, what)) => r.d.error(
                            a.pos,
                            format!(
                                "address {ip} is in {}/{}, the {what} range; an identity needs \
                                 a unicast address inside the network",
                                range.address, range.prefix_len
                            ),
                        ),
                        None => {
                            def.address = Some(Spanned {
                                pos: a.pos,
                                value: ip,
                            })
                        }
                    },
                    Err(_) => r.d.error(
                        a.pos,
                        format!("bad address {s:?}: expected an IPv4 address"),
                    ),
                }
            }
            if let Some(d) = f.get("description") {
                r.string(d, "description");
            }
        }
        out.push(def);
    }
    out
}

fn read_segments(r: &mut Reader, node: &Node) -> Vec<SegmentDef> {
    let mut out = Vec::new();
    for (name, pos, v) in r.entries(node, "segments") {
        r.name(name, pos, "segment");
        let what = format!("segment {name:?}");
        let Some(f) = r.fields(v, &what, &["match", "identities", "description"]) else {
            continue;
        };
        let selector = f.get("match").map(|m| {
            let labels = r.labels(m, &format!("the match of {name:?}"));
            if labels.is_empty() && matches!(&m.value, Value::Map(e) if e.is_empty()) {
                r.d.error(
                    m.pos,
                    format!(
                        "segment {name:?} has an empty match, which would select every \
                         identity; write \"*\" in a rule for that"
                    ),
                );
            }
            labels
        });
        let identities = f.get("identities").map_or_else(Vec::new, |l| {
            r.names(l, &format!("the identities of {name:?}"), "[web-1, web-2]")
        });
        if f.get("match").is_none() && f.get("identities").is_none() {
            r.d.error(pos, format!("{what} needs `match`, `identities` or both"));
        }
        if let Some(d) = f.get("description") {
            r.string(d, "description");
        }
        out.push(SegmentDef {
            name: name.to_string(),
            pos,
            selector,
            identities,
        });
    }
    out
}

fn read_rules(r: &mut Reader, node: &Node) -> Vec<RuleDef> {
    let mut out = Vec::new();
    for item in r.list(
        node,
        "rules",
        "[{name: web-to-db, from: [web], to: [db], ports: [tcp/5432]}]",
    ) {
        let Some(f) = r.fields(
            item,
            "a rule",
            &[
                "name",
                "description",
                "action",
                "from",
                "to",
                "ports",
                "not_before",
                "expires",
                "posture",
                "approval",
            ],
        ) else {
            continue;
        };
        let name = r.required(&f, "name", "a rule").and_then(|n| {
            let s = r.string(n, "name")?;
            r.name(s, n.pos, "rule").then(|| s.to_string())
        });
        let action = match f.get("action") {
            None => Action::Allow,
            Some(a) => match a.as_str() {
                Some("allow") => Action::Allow,
                Some("deny") => Action::Deny,
                _ => {
                    r.d.error(a.pos, "action must be allow or deny");
                    Action::Allow
                }
            },
        };
        let mut side = |key: &str| {
            r.required(&f, key, "a rule")
                .map(|n| {
                    let v = r.names(n, key, "[web]");
                    if v.is_empty() && matches!(&n.value, Value::Seq(_)) {
                        r.d.error(
                            n.pos,
                            format!("`{key}` is empty, so the rule matches nothing"),
                        );
                    }
                    v
                })
                .unwrap_or_default()
        };
        let from = side("from");
        let to = side("to");
        let ports = r
            .required(&f, "ports", "a rule")
            .map(|p| r.ports(p, "the rule"))
            .unwrap_or_default();
        let not_before = f.get("not_before").and_then(|n| r.time(n, "not_before"));
        let expires = f.get("expires").and_then(|n| r.time(n, "expires"));
        if let (Some(a), Some(b), Some(n)) = (not_before, expires, f.get("expires"))
            && a >= b
        {
            r.d.error(n.pos, "expires must be later than not_before");
        }
        let posture = f
            .get("posture")
            .map(|n| r.names(n, "posture", "[patched]"))
            .unwrap_or_default();
        if action == Action::Deny
            && let Some(p) = f.get("posture")
        {
            r.d.error(
                p.pos,
                "a deny rule cannot require posture: a failing check would lift the deny",
            );
        }
        let approval = f.get("approval").and_then(|n| read_approval(r, n));
        if action == Action::Deny
            && let Some(a) = f.get("approval")
        {
            r.d.error(
                a.pos,
                "a deny rule cannot need approval: a pending request would lift the deny",
            );
        }
        if let Some(d) = f.get("description") {
            r.string(d, "description");
        }
        if let Some(name) = name {
            out.push(RuleDef {
                name,
                pos: item.pos,
                action,
                from,
                to,
                ports,
                window: Window {
                    not_before,
                    expires,
                },
                posture,
                approval,
            });
        }
    }
    out
}

/// Most approvers a rule may ask for.
pub const MAX_APPROVERS: u64 = 10;
/// The longest access a rule may let a request ask for: 30 days.
pub const MAX_APPROVAL_SECS: i64 = 30 * 86_400;

fn read_approval(r: &mut Reader, node: &Node) -> Option<ApprovalDef> {
    let f = r.fields(node, "approval", &["approvers", "max"])?;
    let approvers = match f.get("approvers") {
        None => Some(1),
        Some(n) => r.uint(n, "approvers").and_then(|v| {
            if (1..=MAX_APPROVERS).contains(&v) {
                u32::try_from(v).ok()
            } else {
                r.d.error(n.pos, format!("approvers must be 1 to {MAX_APPROVERS}"));
                None
            }
        }),
    };
    let max = r.required(&f, "max", "approval").and_then(|n| {
        let s = r.string(n, "max")?;
        match parse_duration(s) {
            Ok(v) if v <= MAX_APPROVAL_SECS => Some(v),
            Ok(_) => {
                r.d.error(
                    n.pos,
                    "max must be at most 30d: access that needs approval is time-limited",
                );
                None
            }
            Err(e) => {
                r.d.error(n.pos, e);
                None
            }
        }
    });
    Some(ApprovalDef {
        approvers: approvers?,
        max_secs: max?,
    })
}

fn read_posture(r: &mut Reader, node: &Node) -> Vec<CheckDef> {
    let mut out = Vec::new();
    for (name, pos, v) in r.entries(node, "posture") {
        r.name(name, pos, "check");
        let mut conditions = Vec::new();
        let facts = r.entries(v, &format!("check {name:?}"));
        if facts.is_empty() && v.value == Value::Null {
            r.d.error(pos, format!("check {name:?} lists no conditions"));
        }
        for (fact, fpos, cond) in facts {
            let Some(kind) = posture::fact_kind(fact) else {
                r.d.error(
                    fpos,
                    format!(
                        "unknown fact {fact:?}; expected one of: {}, or check.NAME",
                        posture::FACTS.join(", ")
                    ),
                );
                continue;
            };
            if let Some(c) = read_condition(r, fact, kind, cond) {
                conditions.push((
                    Spanned {
                        pos: fpos,
                        value: fact.to_string(),
                    },
                    c,
                ));
            }
        }
        out.push(CheckDef {
            name: name.to_string(),
            pos,
            conditions,
        });
    }
    out
}

/// Most networks one location condition may list.
pub const MAX_NETWORKS: usize = 1024;

fn read_condition(r: &mut Reader, fact: &str, kind: FactKind, node: &Node) -> Option<Condition> {
    match (&node.value, kind) {
        (Value::Seq(items), FactKind::Address) => {
            if items.len() > MAX_NETWORKS {
                r.d.error(
                    node.pos,
                    format!(
                        "{fact} lists {} networks: at most {MAX_NETWORKS}",
                        items.len()
                    ),
                );
                return None;
            }
            let mut nets = Vec::new();
            for i in items {
                if let Some(s) = r.string(i, &format!("a network of {fact}")) {
                    match posture::IpNet::parse(s) {
                        Ok(n) => nets.push(n),
                        Err(e) => r.d.error(i.pos, e),
                    }
                }
            }
            if items.is_empty() {
                r.d.error(node.pos, format!("{fact} lists no networks"));
                return None;
            }
            (nets.len() == items.len()).then_some(Condition::InNetworks(nets))
        }
        (_, FactKind::Address) => {
            r.d.error(
                node.pos,
                format!("{fact} must be a list of networks, e.g. [10.0.0.0/8, 192.168.0.0/16]"),
            );
            None
        }
        (Value::Scalar { text, quoted }, FactKind::Bool) => match (text.as_str(), quoted) {
            ("true", false) => Some(Condition::Bool(true)),
            ("false", false) => Some(Condition::Bool(false)),
            _ => {
                r.d.error(node.pos, format!("{fact} must be true or false"));
                None
            }
        },
        (_, FactKind::Bool) => {
            r.d.error(node.pos, format!("{fact} must be true or false"));
            None
        }
        (Value::Seq(items), _) => {
            let mut options = Vec::new();
            for i in items {
                if let Some(s) = r.string(i, &format!("an option of {fact}")) {
                    options.push(s.to_string());
                }
            }
            if options.is_empty() {
                r.d.error(node.pos, format!("{fact} lists no options"));
                return None;
            }
            Some(Condition::OneOf(options))
        }
        (Value::Scalar { text, .. }, _) => {
            match Op::split(text) {
                Some((op, v)) => {
                    if kind != FactKind::Version {
                        r.d.error(
                            node.pos,
                            format!("{fact} is not a version; compare it with a string or a list"),
                        );
                        return None;
                    }
                    match Version::parse_strict(v) {
                        Some(v) => Some(Condition::Compare(op, v)),
                        None => {
                            r.d.error(
                            node.pos,
                            format!("bad version {v:?}: expected numbers separated by dots, e.g. 6.1"),
                        );
                            None
                        }
                    }
                }
                None if kind == FactKind::Version => {
                    // Compared as text, "6.1" would never equal "6.1.0-18-amd64": say so rather
                    // than lock everyone out.
                    let op: String = text.chars().take_while(|c| "~!=<>^".contains(*c)).collect();
                    r.d.error(
                        node.pos,
                        if op.is_empty() {
                            format!(
                                "{fact} is a version: compare it with >=, >, <=, < or ==, e.g. \
                                 \"== {text}\" or \">= {text}\"; a list such as [\"{text}\"] \
                                 matches the exact text"
                            )
                        } else {
                            format!(
                                "unknown operator {op:?} for {fact}: versions compare with \
                                 >=, >, <=, < or =="
                            )
                        },
                    );
                    None
                }
                None => Some(Condition::Equals(text.clone())),
            }
        }
        _ => {
            r.d.error(
                node.pos,
                format!(
                    "{fact} must be a string, a list of strings or a comparison such as \">= 6.1\""
                ),
            );
            None
        }
    }
}

fn read_quarantine(r: &mut Reader, node: &Node) -> Option<QuarantineDef> {
    let f = r.fields(node, "quarantine", &["denied_per_minute", "duration"])?;
    let rate = r
        .required(&f, "denied_per_minute", "quarantine")
        .and_then(|n| {
            let v = r.uint(n, "denied_per_minute")?;
            match u32::try_from(v) {
                Ok(v) if v > 0 => Some(v),
                _ => {
                    r.d.error(n.pos, "denied_per_minute must be 1 or more");
                    None
                }
            }
        });
    let duration = r.required(&f, "duration", "quarantine").and_then(|n| {
        let s = r.string(n, "duration")?;
        parse_duration(s).map_err(|e| r.d.error(n.pos, e)).ok()
    });
    Some(QuarantineDef {
        denied_per_minute: rate?,
        duration_secs: duration?,
    })
}

fn read_tests(r: &mut Reader, node: &Node) -> Vec<TestDef> {
    let mut out = Vec::new();
    for item in r.list(
        node,
        "tests",
        "[{from: web-1, to: db-1, port: tcp/5432, expect: allow}]",
    ) {
        let Some(f) = r.fields(
            item,
            "a test",
            &[
                "from",
                "to",
                "port",
                "expect",
                "at",
                "failing",
                "quarantined",
            ],
        ) else {
            continue;
        };
        let mut ident = |key: &str| {
            r.required(&f, key, "a test").and_then(|n| {
                r.string(n, key).map(|s| Spanned {
                    pos: n.pos,
                    value: s.to_string(),
                })
            })
        };
        let from = ident("from");
        let to = ident("to");
        let probe = r.required(&f, "port", "a test").and_then(|n| {
            let s = r.string(n, "port")?;
            parse_probe(s).map_err(|e| r.d.error(n.pos, e)).ok()
        });
        let expect = r
            .required(&f, "expect", "a test")
            .and_then(|n| match n.as_str() {
                Some("allow") => Some(Expect::Allow),
                Some("deny") => Some(Expect::Deny),
                _ => {
                    r.d.error(n.pos, "expect must be allow or deny");
                    None
                }
            });
        let at = f.get("at").and_then(|n| r.time(n, "at"));
        let failing = f
            .get("failing")
            .map(|n| r.names(n, "failing", "[patched]"))
            .unwrap_or_default();
        let quarantined = f
            .get("quarantined")
            .map(|n| r.names(n, "quarantined", "[web-1]"))
            .unwrap_or_default();
        if let (Some(from), Some(to), Some(probe), Some(expect)) = (from, to, probe, expect) {
            out.push(TestDef {
                pos: item.pos,
                from,
                to,
                probe,
                expect,
                at,
                failing,
                quarantined,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0db", &"a".repeat(63)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "Web", "a_b", "a.b", "*", &"a".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn port_specs() {
        assert_eq!(
            parse_port_spec("tcp/22"),
            Ok(PortSpec::Tcp { lo: 22, hi: 22 })
        );
        assert_eq!(
            parse_port_spec("udp/1-9"),
            Ok(PortSpec::Udp { lo: 1, hi: 9 })
        );
        assert_eq!(
            parse_port_spec("tcp"),
            Ok(PortSpec::Tcp { lo: 0, hi: 65535 })
        );
        assert_eq!(parse_port_spec("any"), Ok(PortSpec::Any));
        assert_eq!(parse_port_spec("icmp"), Ok(PortSpec::Icmp));
        for bad in [
            "tcp/0",
            "tcp/65536",
            "tcp/9-1",
            "sctp/1",
            "tcp/",
            "tcp/a",
            "22",
            "icmp/8",
            "tcp/+1",
            "tcp/1-",
        ] {
            assert!(parse_port_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn probes() {
        assert_eq!(parse_probe("icmp").unwrap().proto, proto::ICMP);
        assert_eq!(parse_probe("udp/53").unwrap().port, 53);
        assert!(parse_probe("tcp").is_err());
        assert!(parse_probe("tcp/1-2").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("7d"), Ok(604800));
        for bad in ["", "15", "m", "1x", "0s", "1h 2m", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:01:00Z"), Ok(60));
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Ok(0));
        assert!(parse_time("2026-12-31").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.100.0.0/16").is_ok());
        assert!(
            parse_cidr("10.100.0.1/16")
                .unwrap_err()
                .contains("did you mean 10.100.0.0/16")
        );
        assert!(parse_cidr("10.100.0.0/31").is_err());
        assert!(parse_cidr("10.100.0.0").is_err());
        assert!(parse_cidr("300.0.0.0/8").is_err());
    }
}
