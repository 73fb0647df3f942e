//! Deterministic overlay addresses for identities that do not fix their own.
//!
//! Each identity's name hashes (FNV-1a, 64 bit: fixed forever, never a keyed or seeded hash) to
//! a preferred slot in the network; on a collision it probes the next slots. Identities are
//! placed in this order:
//! 1. fixed `address`es;
//! 2. addresses the identity held before (`prior`), while still free and inside the network; the
//!    controller passes what it has handed out, so adding an identity never moves another;
//! 3. everyone else by name.
//!
//! Without `prior`, a given policy always yields the same addresses, whatever its key order.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use bulkhead_allowlist::Network;

/// FNV-1a over the name's bytes: stable across releases, platforms and runs.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The shortest prefix an overlay network may have. Every node routes the whole network into its
/// overlay interface, so the range must hold nothing else it needs to reach; the largest
/// private range, 10.0.0.0/8, is a /8, and anything shorter necessarily takes in public or
/// special addresses (and 16 million identities is far beyond any deployment).
pub const MIN_PREFIX_LEN: u8 = 8;

const fn net(a: u8, b: u8, prefix_len: u8) -> Network {
    Network {
        address: Ipv4Addr::new(a, b, 0, 0),
        prefix_len,
    }
}

/// Ranges that can never be overlay addresses, with what they are (RFC 6890).
const SPECIAL: &[(Network, &str)] = &[
    (net(0, 0, 8), "unspecified (\"this network\")"),
    (net(127, 0, 8), "loopback"),
    (net(169, 254, 16), "link-local"),
    (net(224, 0, 4), "multicast"),
    (net(240, 0, 4), "reserved and broadcast"),
];

/// The private (RFC 1918) and shared carrier-grade NAT (RFC 6598) ranges: where an overlay
/// belongs.
pub const PRIVATE: &[Network] = &[
    net(10, 0, 8),
    net(172, 16, 12),
    net(192, 168, 16),
    net(100, 64, 10),
];

fn overlaps(a: Network, b: Network) -> bool {
    let shorter = if a.prefix_len <= b.prefix_len { a } else { b };
    let longer = if a.prefix_len <= b.prefix_len { b } else { a };
    shorter.contains(longer.address)
}

/// The special range `net` overlaps, if any: loopback, multicast, link-local, unspecified,
/// reserved and broadcast.
pub fn special_range(net: Network) -> Option<(Network, &'static str)> {
    SPECIAL.iter().copied().find(|&(s, _)| overlaps(s, net))
}

/// The special range `addr` is in, if any (see [`special_range`]).
pub fn special_address(addr: Ipv4Addr) -> Option<(Network, &'static str)> {
    SPECIAL.iter().copied().find(|(s, _)| s.contains(addr))
}

/// Parses `A.B.C.D/N` as written, host bits and all; `None` if it is not that form. What a
/// prefix may be depends on its use: see [`host_bits_cleared`] and [`special_range`].
pub(crate) fn parse_prefix(s: &str) -> Option<Network> {
    let (a, n) = s.split_once('/')?;
    let address: Ipv4Addr = a.parse().ok()?;
    // Digits only: `u8`'s parser would take `+8`.
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix_len: u8 = n.parse().ok().filter(|&p| p <= 32)?;
    Some(Network {
        address,
        prefix_len,
    })
}

/// The network with its host bits cleared, if `net` has any set (`10.0.0.1/24` is
/// `10.0.0.0/24` written with a host's address).
pub(crate) fn host_bits_cleared(net: Network) -> Option<Network> {
    let base = Ipv4Addr::from(u32::from(net.address) & net.mask());
    (base != net.address).then_some(Network {
        address: base,
        prefix_len: net.prefix_len,
    })
}

/// Whether `net` lies wholly inside one private or CGNAT range ([`PRIVATE`]).
pub fn is_private(net: Network) -> bool {
    PRIVATE
        .iter()
        .any(|p| p.prefix_len <= net.prefix_len && p.contains(net.address))
}

/// How many host addresses the network has: all but the network and broadcast addresses.
pub fn capacity(net: Network) -> u64 {
    (1u64 << (32 - u32::from(net.prefix_len))).saturating_sub(2)
}

/// Whether `addr` may be given to an identity: inside the network, and neither its network nor
/// its broadcast address.
pub fn is_host_address(net: Network, addr: Ipv4Addr) -> bool {
    let a = u32::from(addr);
    let base = u32::from(net.address) & net.mask();
    net.contains(addr) && a != base && a != base | !net.mask()
}

/// Assigns an address to every identity. `idents` is `(name, fixed address)`; fixed addresses
/// must already be valid and distinct. Returns `None` if the network is too small.
pub fn allocate(
    net: Network,
    idents: &[(&str, Option<Ipv4Addr>)],
    prior: &BTreeMap<String, Ipv4Addr>,
) -> Option<Vec<Ipv4Addr>> {
    let cap = capacity(net);
    if idents.len() as u64 > cap {
        return None;
    }
    let base = u32::from(net.address) & net.mask();
    let mut taken: HashSet<Ipv4Addr> = idents.iter().filter_map(|(_, a)| *a).collect();
    let mut out: Vec<Option<Ipv4Addr>> = idents.iter().map(|(_, a)| *a).collect();

    let mut order: Vec<usize> = (0..idents.len()).filter(|&i| out[i].is_none()).collect();
    order.sort_by_key(|&i| idents[i].0);

    for &i in &order {
        if let Some(&p) = prior.get(idents[i].0)
            && is_host_address(net, p)
            && taken.insert(p)
        {
            out[i] = Some(p);
        }
    }
    for &i in &order {
        if out[i].is_some() {
            continue;
        }
        let start = fnv1a(idents[i].0) % cap;
        let addr = (0..cap)
            .map(|k| Ipv4Addr::from(base + 1 + ((start + k) % cap) as u32))
            .find(|a| !taken.contains(a))?;
        taken.insert(addr);
        out[i] = Some(addr);
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    fn cidr(s: &str) -> Network {
        let (a, n) = s.split_once('/').unwrap();
        Network {
            address: a.parse().unwrap(),
            prefix_len: n.parse().unwrap(),
        }
    }

    #[test]
    fn special_and_private_ranges() {
        for (s, what) in [
            ("0.0.0.0/0", "unspecified (\"this network\")"),
            ("127.0.0.0/8", "loopback"),
            ("127.1.0.0/16", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/24", "multicast"),
            ("239.0.0.0/8", "multicast"),
            ("255.255.255.252/30", "reserved and broadcast"),
            ("126.0.0.0/7", "loopback"),
        ] {
            assert_eq!(special_range(cidr(s)).map(|r| r.1), Some(what), "{s}");
        }
        for s in [
            "10.0.0.0/8",
            "100.64.0.0/10",
            "8.8.8.0/24",
            "169.253.0.0/16",
        ] {
            assert_eq!(special_range(cidr(s)), None, "{s}");
        }
        let what = |a: &str| special_address(a.parse().unwrap()).map(|r| r.1);
        assert_eq!(what("127.0.0.1"), Some("loopback"));
        assert_eq!(what("255.255.255.255"), Some("reserved and broadcast"));
        assert_eq!(what("10.0.0.1"), None);
        for s in [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "172.16.0.0/12",
            "172.31.0.0/16",
            "192.168.50.0/28",
            "100.64.0.0/10",
            "100.127.0.0/16",
        ] {
            assert!(is_private(cidr(s)), "{s}");
        }
        for s in [
            "8.8.8.0/24",
            "172.0.0.0/8",
            "100.0.0.0/8",
            "192.0.2.0/24",
            "172.32.0.0/16",
        ] {
            assert!(!is_private(cidr(s)), "{s}");
        }
    }

    use super::*;

    fn net(s: &str, p: u8) -> Network {
        Network {
            address: s.parse().unwrap(),
            prefix_len: p,
        }
    }

    #[test]
    fn same_policy_same_addresses_whatever_the_order() {
        let n = net("10.100.0.0", 16);
        let a = allocate(n, &[("web-1", None), ("db-1", None)], &BTreeMap::new()).unwrap();
        let b = allocate(n, &[("db-1", None), ("web-1", None)], &BTreeMap::new()).unwrap();
        assert_eq!(a[0], b[1]);
        assert_eq!(a[1], b[0]);
        assert!(a.iter().all(|&x| is_host_address(n, x)));
    }

    #[test]
    fn fixed_addresses_are_kept_and_avoided() {
        let n = net("10.0.0.0", 30); // two hosts: .1 and .2
        let got = allocate(
            n,
            &[("a", None), ("b", Some("10.0.0.1".parse().unwrap()))],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(got[1], "10.0.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(got[0], "10.0.0.2".parse::<Ipv4Addr>().unwrap());
        assert!(
            allocate(
                n,
                &[("a", None), ("b", None), ("c", None)],
                &BTreeMap::new()
            )
            .is_none()
        );
    }

    #[test]
    fn with_prior_adding_identities_never_moves_one() {
        // A tiny network forces collisions, the hard case for stability.
        let n = net("10.0.0.0", 27);
        let mut names: Vec<String> = Vec::new();
        let mut prior = BTreeMap::new();
        for i in 0..30 {
            // Insert new names at the front too, so they sort before existing ones.
            names.insert(if i % 2 == 0 { 0 } else { names.len() }, format!("n{i}"));
            let idents: Vec<(&str, Option<Ipv4Addr>)> =
                names.iter().map(|s| (s.as_str(), None)).collect();
            let got = allocate(n, &idents, &prior).unwrap();
            for (name, addr) in names.iter().zip(&got) {
                if let Some(old) = prior.get(name) {
                    assert_eq!(old, addr, "{name} moved");
                }
            }
            let distinct: HashSet<_> = got.iter().collect();
            assert_eq!(distinct.len(), got.len());
            prior = names.iter().cloned().zip(got).collect();
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("10.1.0.0/16"), Some(net("10.1.0.0", 16)));
        assert_eq!(parse_prefix("10.1.0.1/32"), Some(net("10.1.0.1", 32)));
        assert_eq!(parse_prefix("0.0.0.0/0"), Some(net("0.0.0.0", 0)));
        for bad in [
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0/16",
            "10.1.0.0/+8",
            "10.1.0.0/",
            "/8",
            "a/8",
            "10.1.0.0/16/1",
        ] {
            assert_eq!(parse_prefix(bad), None, "{bad}");
        }
        assert_eq!(
            host_bits_cleared(net("10.0.0.1", 24)),
            Some(net("10.0.0.0", 24))
        );
        assert_eq!(host_bits_cleared(net("10.0.0.0", 24)), None);
        assert_eq!(host_bits_cleared(net("10.0.0.1", 32)), None);
    }

    #[test]
    fn host_addresses() {
        let n = net("10.0.0.0", 24);
        assert!(!is_host_address(n, "10.0.0.0".parse().unwrap()));
        assert!(!is_host_address(n, "10.0.0.255".parse().unwrap()));
        assert!(!is_host_address(n, "10.0.1.1".parse().unwrap()));
        assert!(is_host_address(n, "10.0.0.1".parse().unwrap()));
        assert_eq!(capacity(n), 254);
    }

    #[test]
    fn the_hash_is_fixed() {
        // Changing this changes every deployed address: never do it.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
