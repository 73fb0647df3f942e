//! An allowlist's [`Underlay`] entries, which name identities, resolved into the
//! [`UnderlayConfig`] a node installs, which names addresses. The controller calls it with the
//! addresses it has seen; the golden tests with fixed ones.
//!
//! An identity whose address is not known is left out of an `allow` entry (the entry allows
//! less until that server reports) and out of the guarded servers; an entry left with no
//! address is left out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use bulkhead_allowlist::{Network, Underlay, UnderlayHost, UnderlayRule};
use bulkhead_proto::{UnderlayAllow, UnderlayConfig};

/// `identity`'s host firewall, given every enrolled server's underlay address (by identity)
/// and the controllers' API addresses.
pub fn resolve(
    identity: &str,
    underlay: &Underlay,
    servers: &BTreeMap<&str, Ipv4Addr>,
    mut controllers: Vec<SocketAddr>,
) -> UnderlayConfig {
    let mut by_address = BTreeMap::new();
    for (&id, &a) in servers {
        if id != identity {
            // Two servers behind one address (NAT): the first by name keeps it, so the
            // message is the same on every controller.
            by_address.entry(a).or_insert_with(|| id.to_string());
        }
    }
    let rules = |rules: &[UnderlayRule]| {
        rules
            .iter()
            .filter_map(|r| {
                let mut nets: Vec<Network> = r
                    .hosts
                    .iter()
                    .filter_map(|h| match h {
                        UnderlayHost::Net(n) => Some(*n),
                        UnderlayHost::Identity(id) => {
                            servers.get(id.as_str()).map(|&address| Network {
                                address,
                                prefix_len: 32,
                            })
                        }
                    })
                    .collect();
                nets.sort();
                nets.dedup();
                (!nets.is_empty()).then(|| UnderlayAllow {
                    name: r.name.clone(),
                    nets,
                    ports: r.ports.clone(),
                })
            })
            .collect()
    };
    controllers.sort();
    controllers.dedup();
    UnderlayConfig {
        mode: underlay.mode,
        servers: by_address,
        controllers,
        inbound: rules(&underlay.inbound),
        outbound: rules(&underlay.outbound),
    }
}
