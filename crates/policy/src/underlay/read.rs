//! The `underlay` block, from the YAML tree to [`UnderlayDef`]: every key known, every network
//! checked. Names are resolved later, with the rest of the model ([`super::resolve`]).

use std::net::Ipv4Addr;

use bulkhead_allowlist::{Network, UnderlayMode};

use crate::addr;
use crate::ast::{Spanned, UnderlayAllowDef, UnderlayDef, UnderlaySource};
use crate::model::EVERYONE;
use crate::parse::Reader;
use crate::yaml::{Node, Value};

const ENTRY: &str = "an underlay allow entry";

/// Reads the block; `None` if it is not a mapping (reported).
pub(crate) fn read(r: &mut Reader, node: &Node) -> Option<UnderlayDef> {
    let f = r.fields(node, "underlay", &["mode", "scope", "allow"])?;
    let mode = f
        .get("mode")
        .and_then(|n| {
            let s = r.string(n, "underlay.mode")?;
            s.parse::<UnderlayMode>()
                .map_err(|e| r.d.error(n.pos, e))
                .ok()
        })
        .unwrap_or_default();
    let scope = f.get("scope").map(|n| {
        let names = r.names(n, "scope", "[prod]");
        if names.is_empty() && matches!(n.value, Value::Seq(_)) {
            r.d.error(
                n.pos,
                "`scope` is empty, so the underlay applies to no identity; leave it out to mean \
                 every identity",
            );
        }
        names
    });
    let allow = f.get("allow").map_or_else(Vec::new, |n| read_allow(r, n));
    Some(UnderlayDef {
        pos: node.pos,
        mode,
        scope,
        allow,
    })
}

fn read_allow(r: &mut Reader, node: &Node) -> Vec<UnderlayAllowDef> {
    let mut out = Vec::new();
    let example = "[{name: mgmt-ssh, from: [10.0.9.0/24], to: [\"*\"], ports: [tcp/22]}]";
    for item in r.list(node, "underlay.allow", example) {
        let Some(f) = r.fields(item, ENTRY, &["name", "description", "from", "to", "ports"]) else {
            continue;
        };
        let name = r.required(&f, "name", ENTRY).and_then(|n| {
            let s = r.string(n, "name")?;
            r.name(s, n.pos, "underlay allow entry").then(|| Spanned {
                pos: n.pos,
                value: s.to_string(),
            })
        });
        let from = r
            .required(&f, "from", ENTRY)
            .map(|n| {
                empty(r, n, "from");
                read_from(r, n)
            })
            .unwrap_or_default();
        let to = r
            .required(&f, "to", ENTRY)
            .map(|n| {
                empty(r, n, "to");
                r.names(n, "to", "[\"*\"]")
            })
            .unwrap_or_default();
        let ports = r
            .required(&f, "ports", ENTRY)
            .map(|n| r.ports(n, "the entry"))
            .unwrap_or_default();
        if let Some(d) = f.get("description") {
            r.string(d, "description");
        }
        if let Some(name) = name {
            out.push(UnderlayAllowDef {
                name,
                pos: item.pos,
                from,
                to,
                ports,
            });
        }
    }
    out
}

fn empty(r: &mut Reader, n: &Node, key: &str) {
    if matches!(&n.value, Value::Seq(v) if v.is_empty()) {
        r.d.error(
            n.pos,
            format!("`{key}` is empty, so the entry matches nothing"),
        );
    }
}

/// Whether a `from` or `to` entry is meant as an address rather than a name: names have no
/// `.`, `/` or `:`.
pub(super) fn looks_like_address(s: &str) -> bool {
    s.contains(['.', '/', ':'])
}

fn read_from(r: &mut Reader, node: &Node) -> Vec<Spanned<UnderlaySource>> {
    let mut out = Vec::new();
    for item in r.list(node, "from", "[10.0.9.0/24, bastion]") {
        let Some(s) = r.string(item, "an entry of from") else {
            continue;
        };
        let value = if s == EVERYONE || !looks_like_address(s) {
            UnderlaySource::Name(s.to_string())
        } else {
            match network(s) {
                Ok(net) => UnderlaySource::Net(net),
                Err(e) => {
                    r.d.error(item.pos, e);
                    continue;
                }
            }
        };
        out.push(Spanned {
            pos: item.pos,
            value,
        });
    }
    out
}

/// A network in `from`, held to the rules the overlay's own addresses follow ([`addr`]): no
/// host bits, nothing in the unspecified, loopback, link-local, multicast or reserved ranges.
fn network(s: &str) -> Result<Network, String> {
    let Some(net) = addr::parse_prefix(s) else {
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Err(format!(
                "bad network {s:?}: a network needs its length; write {ip}/32 for one address"
            ));
        }
        return Err(format!(
            "bad network {s:?}: expected an IPv4 network such as 10.0.9.0/24, an identity, a \
             segment or \"*\""
        ));
    };
    if net.prefix_len == 0 {
        return Err(format!(
            "bad network {s:?}: a /0 is every address; write \"*\" for that"
        ));
    }
    if let Some(base) = addr::host_bits_cleared(net) {
        return Err(format!(
            "bad network {s:?}: host bits are set; did you mean {base}?"
        ));
    }
    if let Some((range, what)) = addr::special_range(net) {
        return Err(format!(
            "bad network {s:?}: it overlaps {range}, the {what} range; `from` takes networks \
             of unicast hosts"
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let ok = |s: &str| {
            network(s)
                .unwrap_or_else(|e| panic!("{s}: {e}"))
                .to_string()
        };
        assert_eq!(ok("10.0.9.0/24"), "10.0.9.0/24");
        assert_eq!(ok("192.0.2.7/32"), "192.0.2.7/32");
        assert_eq!(ok("8.0.0.0/7"), "8.0.0.0/7");
        for (bad, why) in [
            ("0.0.0.0/0", "write \"*\""),
            ("10.0.0.0/0", "write \"*\""),
            ("10.0.9.1/24", "did you mean 10.0.9.0/24?"),
            ("10.0.9.5", "write 10.0.9.5/32"),
            ("127.0.0.0/8", "the loopback range"),
            ("169.254.0.0/16", "the link-local range"),
            ("224.0.0.0/8", "the multicast range"),
            ("255.255.255.255/32", "the reserved and broadcast range"),
            ("0.0.0.0/8", "the unspecified"),
            ("0.0.0.0/1", "the unspecified"),
            ("10.0.9.0/33", "expected an IPv4 network"),
            ("fd00::/8", "expected an IPv4 network"),
        ] {
            let e = network(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
