//! The host firewall's addresses: an allowlist's [`Underlay`] entries, which name identities,
//! resolved into the [`UnderlayConfig`] a node installs, which names addresses.
//!
//! A server's underlay address is the one its reports came from ([`Mirror::underlay`]), never
//! one the node claims. The resolution itself is [`bulkhead_hostfw::resolve`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bulkhead_allowlist::Underlay;
use bulkhead_proto::UnderlayConfig;

use super::Mirror;

/// `identity`'s host firewall, with addresses as `records` know them now. Only enrolled
/// servers count: a revoked node's address leaves every firewall.
pub fn resolve(identity: &str, underlay: &Underlay, records: &Mirror) -> UnderlayConfig {
    let servers: BTreeMap<&str, Ipv4Addr> = records
        .nodes
        .keys()
        .filter_map(|id| Some((id.as_str(), *records.underlay.get(id)?)))
        .collect();
    bulkhead_hostfw::resolve(identity, underlay, &servers, controllers(records))
}

/// The live controllers' API addresses, from their URLs; a URL with a host name is left out
/// (a daemon always keeps the controllers it was started with open itself).
fn controllers(records: &Mirror) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = records
        .controllers
        .values()
        .filter_map(|url| api_address(url))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `https://198.18.0.1:7443/…` → `198.18.0.1:7443` (443 if no port); `None` for a host name.
pub fn api_address(url: &str) -> Option<SocketAddr> {
    let (host, port) = bulkhead_proto::client::url_authority(url)?;
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

/// An address as the underlay firewall keys it: IPv4, or IPv4 mapped into IPv6.
pub fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::NodeRecord;
    use bulkhead_allowlist::{Network, PortSpec, UnderlayHost, UnderlayMode, UnderlayRule};

    fn mirror(servers: &[(&str, Option<[u8; 4]>)]) -> Mirror {
        let mut m = Mirror::default();
        for (id, a) in servers {
            let node = NodeRecord {
                identity: id.to_string(),
                wireguard_key: bulkhead_proto::PrivateKey::generate().public_key(),
                credential: String::new(),
                enrolled: 0,
                pinned: None,
            };
            m.nodes.insert(id.to_string(), node);
            if let Some(a) = a {
                m.underlay.insert(id.to_string(), Ipv4Addr::from(*a));
            }
        }
        m.controllers
            .insert("controllers/x".into(), "https://198.18.0.1:7443".into());
        m
    }

    fn rule(name: &str, hosts: Vec<UnderlayHost>) -> UnderlayRule {
        UnderlayRule {
            name: name.into(),
            hosts,
            ports: vec![PortSpec::Tcp { lo: 22, hi: 22 }],
        }
    }

    #[test]
    fn identities_become_the_addresses_their_reports_came_from() {
        let mut m = mirror(&[
            ("db-1", Some([198, 18, 0, 3])),
            ("dev-1", Some([198, 18, 0, 4])),
            ("new-1", None),
        ]);
        // Known by address but revoked: not a server any more.
        m.underlay
            .insert("gone".into(), Ipv4Addr::new(198, 18, 0, 9));
        let u = Underlay {
            mode: UnderlayMode::Enforce,
            inbound: vec![
                rule(
                    "mgmt",
                    vec![
                        UnderlayHost::Net(Network {
                            address: Ipv4Addr::new(10, 0, 9, 0),
                            prefix_len: 24,
                        }),
                        UnderlayHost::Identity("dev-1".into()),
                    ],
                ),
                rule("nobody-yet", vec![UnderlayHost::Identity("new-1".into())]),
                rule("revoked", vec![UnderlayHost::Identity("gone".into())]),
            ],
            outbound: vec![rule("to-dev", vec![UnderlayHost::Identity("dev-1".into())])],
        };
        let c = resolve("db-1", &u, &m);
        assert_eq!(c.mode, UnderlayMode::Enforce);
        assert_eq!(
            c.servers.into_iter().collect::<Vec<_>>(),
            vec![(Ipv4Addr::new(198, 18, 0, 4), "dev-1".to_string())],
            "every other enrolled server with a known address, not itself, not the revoked"
        );
        assert_eq!(c.controllers, vec!["198.18.0.1:7443".parse().unwrap()]);
        assert_eq!(
            c.inbound.len(),
            1,
            "entries left with no address are dropped"
        );
        assert_eq!(
            c.inbound[0]
                .nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.9.0/24", "198.18.0.4/32"]
        );
        assert_eq!(c.outbound[0].nets[0].to_string(), "198.18.0.4/32");
    }

    #[test]
    fn api_addresses_come_from_urls_with_addresses() {
        assert_eq!(
            api_address("https://198.18.0.1:7443"),
            Some("198.18.0.1:7443".parse().unwrap())
        );
        assert_eq!(
            api_address("https://10.0.0.1/"),
            Some("10.0.0.1:443".parse().unwrap())
        );
        assert_eq!(
            api_address("https://[fd00::1]:7443"),
            Some("[fd00::1]:7443".parse().unwrap())
        );
        assert_eq!(api_address("https://ctl.example:7443"), None);
        assert_eq!(
            ipv4("::ffff:198.18.0.2".parse().unwrap()),
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
    }
}
