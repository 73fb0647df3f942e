//! Host configuration: what a configuration from the controller asks of this host besides the
//! core's allowlist, and bringing the host to it over netlink. Today that is the interface's
//! overlay address, whose prefix routes the overlay network into the tunnel. Wave 2's host
//! firewall (one nftables table) and routes belong here too: more parts of [`HostConfig`], more
//! steps of [`Host::configure`].

use std::net::{IpAddr, Ipv4Addr};

use anyhow::anyhow;
use bulkhead_dataplane::{Config, PeerConfig};
use bulkhead_proto::NodeConfig;
use futures_util::TryStreamExt;

use crate::tun::Interface;

/// What the host must hold for a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// The interface's address: the identity's overlay address.
    pub address: Ipv4Addr,
    /// The overlay network's prefix length: the kernel routes the whole network into the tunnel.
    pub prefix_len: u8,
}

/// Splits what the controller sent into the core's configuration and the host's.
pub fn split(cfg: NodeConfig) -> (Config, HostConfig) {
    let host = HostConfig {
        address: cfg.allowlist.address,
        prefix_len: cfg.allowlist.network.prefix_len,
    };
    let core = Config {
        allowlist: cfg.allowlist,
        peers: cfg
            .peers
            .into_iter()
            .map(|(name, p)| {
                let peer = PeerConfig {
                    public_key: p.public_key.0,
                    endpoint: p.endpoint,
                };
                (name, peer)
            })
            .collect(),
        keepalive: cfg.keepalive,
    };
    (core, host)
}

/// The host's side of the overlay: the interface, configured over netlink.
pub struct Host {
    netlink: rtnetlink::Handle,
    interface: String,
    index: u32,
    in_place: Option<HostConfig>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("interface", &self.interface)
            .field("in_place", &self.in_place)
            .finish()
    }
}

impl Host {
    /// The host of this interface, with nothing configured yet.
    pub fn new(tun: &Interface) -> Host {
        Host {
            netlink: tun.netlink(),
            interface: tun.name.clone(),
            index: tun.index(),
            in_place: None,
        }
    }

    /// Brings the host to `wanted`. The interface gets its address, replacing the one it had.
    pub async fn configure(&mut self, wanted: HostConfig) -> anyhow::Result<()> {
        if self.in_place == Some(wanted) {
            return Ok(());
        }
        let HostConfig {
            address,
            prefix_len,
        } = wanted;
        if self.in_place.take().is_some() {
            let mut list = self
                .netlink
                .address()
                .get()
                .set_link_index_filter(self.index)
                .execute();
            while let Some(msg) = list.try_next().await.map_err(|e| anyhow!("netlink: {e}"))? {
                self.netlink
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| anyhow!("cannot remove the old address: {e}"))?;
            }
        }
        self.netlink
            .address()
            .add(self.index, IpAddr::V4(address), prefix_len)
            .execute()
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot give {} the address {address}/{prefix_len}: {e}",
                    self.interface
                )
            })?;
        self.in_place = Some(wanted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_allowlist::{Allowlist, Network};
    use bulkhead_proto::{PeerInfo, PrivateKey};

    use super::*;

    #[test]
    fn a_configuration_splits_into_the_core_s_and_the_host_s() {
        let me = Ipv4Addr::new(10, 9, 0, 1);
        let network = Network {
            address: Ipv4Addr::new(10, 9, 0, 0),
            prefix_len: 16,
        };
        let key = PrivateKey::generate().public_key();
        let endpoint = Some("192.0.2.1:51820".parse().expect("endpoint"));
        let cfg = NodeConfig {
            allowlist: Allowlist::deny_all("web", me, network),
            peers: [(
                "db".to_string(),
                PeerInfo {
                    public_key: key,
                    endpoint,
                },
            )]
            .into(),
            keepalive: Some(25),
        };
        let (core, host) = split(cfg.clone());
        assert_eq!(
            host,
            HostConfig {
                address: me,
                prefix_len: 16
            }
        );
        assert_eq!(core.allowlist, cfg.allowlist);
        assert_eq!(core.keepalive, Some(25));
        assert_eq!(
            core.peers.get("db"),
            Some(&PeerConfig {
                public_key: key.0,
                endpoint
            })
        );
    }
}
