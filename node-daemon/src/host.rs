//! Host configuration: what a configuration from the controller asks of this host besides the
//! core's allowlist, and bringing the host to it over netlink. With overlay addressing, that is
//! the interface's overlay address, whose prefix routes the overlay network into the tunnel;
//! with the servers' own addresses (spec §8), the interface has none and each peer's address is
//! routed into it ([`crate::routing`]). The host firewall is `crate::firewall`'s.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::anyhow;
use bulkhead_allowlist::Addressing;
use bulkhead_dataplane::{Config, PeerConfig};
use bulkhead_proto::NodeConfig;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

use crate::retrying::{Failure, RETRY_EVERY};
use crate::routing::Routing;
use crate::tun::Interface;

/// What the host must hold for a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The identity's address: the interface's (overlay addressing), or the server's own.
    pub address: Ipv4Addr,
    /// The overlay network's prefix length: the kernel routes the whole network into the tunnel.
    pub prefix_len: u8,
    /// Overlay addresses, or the servers' own.
    pub addressing: Addressing,
    /// With the servers' own addresses: the peers', each routed into the tunnel.
    pub routes: Vec<Ipv4Addr>,
}

/// Splits what the controller sent into the core's configuration and the host's.
pub fn split(cfg: NodeConfig) -> (Config, HostConfig) {
    let addressing = cfg.allowlist.addressing;
    let host = HostConfig {
        address: cfg.allowlist.address,
        prefix_len: cfg.allowlist.network.prefix_len,
        addressing,
        routes: match addressing {
            Addressing::Overlay => Vec::new(),
            Addressing::Underlay => cfg.allowlist.peers.iter().map(|p| p.address).collect(),
        },
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
///
/// The host never stops the daemon: what the kernel refuses is logged, reported as the node's
/// status, and tried again. Meanwhile the core enforces the new allowlist whatever the host
/// holds, so a failure here can only keep traffic out, never let more in.
pub struct Host {
    netlink: rtnetlink::Handle,
    interface: String,
    index: u32,
    wanted: Option<HostConfig>,
    in_place: Option<HostConfig>,
    failure: Option<Failure>,
    routing: Routing,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("interface", &self.interface)
            .field("wanted", &self.wanted)
            .field("in_place", &self.in_place)
            .field("failure", &self.failure.as_ref().map(|f| &f.error))
            .finish()
    }
}

impl Host {
    /// The host of this interface, with nothing configured yet.
    pub fn new(tun: &Interface) -> Host {
        Host {
            netlink: tun.netlink(),
            routing: Routing::new(tun.netlink(), &tun.name, tun.index()),
            interface: tun.name.clone(),
            index: tun.index(),
            wanted: None,
            in_place: None,
            failure: None,
        }
    }

    /// Brings the host to `wanted`, or, if the kernel refuses, records why, to try again on
    /// [`Host::retry`].
    pub async fn configure(&mut self, wanted: HostConfig) {
        self.wanted = Some(wanted);
        self.reconcile().await;
    }

    /// Tries again if the last attempt failed and a while has passed since. Returns whether it
    /// tried.
    pub async fn retry(&mut self) -> bool {
        let due = self.failure.as_ref().is_some_and(Failure::due);
        if due {
            self.reconcile().await;
        }
        due
    }

    /// What keeps the host from the configuration in force, if anything.
    pub fn problem(&self) -> Option<&str> {
        self.failure.as_ref().map(|f| f.error.as_str())
    }

    async fn reconcile(&mut self) {
        let Some(wanted) = self.wanted.clone() else {
            return;
        };
        if self.in_place.as_ref() == Some(&wanted) {
            self.failure = None;
            return;
        }
        let done = match wanted.addressing {
            Addressing::Overlay => self.set_address(&wanted).await,
            Addressing::Underlay => self.route_peers(&wanted).await,
        };
        match done {
            Ok(()) => {
                self.in_place = Some(wanted);
                if self.failure.take().is_some() {
                    tracing::info!(interface = %self.interface, "host configuration in place");
                }
            }
            Err(e) => {
                // Part of it may be in place: the next attempt looks at the host afresh.
                self.in_place = None;
                let (failure, log) =
                    Failure::next(self.failure.as_ref(), format!("{e:#}"), Instant::now());
                if log {
                    tracing::error!(
                        interface = %self.interface,
                        error = %failure.error,
                        retry_every = ?RETRY_EVERY,
                        "host configuration failed; the allowlist is enforced, retrying"
                    );
                }
                self.failure = Some(failure);
            }
        }
    }

    /// The interface's addresses now.
    async fn addresses(&self) -> anyhow::Result<Vec<AddressMessage>> {
        let mut current = Vec::new();
        let mut list = self
            .netlink
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        while let Some(msg) = list.try_next().await.map_err(|e| anyhow!("netlink: {e}"))? {
            current.push(msg);
        }
        Ok(current)
    }

    /// Gives the interface exactly `address/prefix_len`: the wanted address is added first, then
    /// every other one is removed, and the result is checked. An address the kernel refuses
    /// leaves the one that worked, and a retry picks up from what is there. (Removing a primary
    /// address also removes the secondaries of its subnet unless `promote_secondaries` is set,
    /// which `tun.rs` does; the check at the end catches a kernel that does otherwise.)
    /// The servers' own addresses: no address on the interface (the server has its own, on
    /// the underlay), and each peer's address routed into the tunnel.
    async fn route_peers(&mut self, wanted: &HostConfig) -> anyhow::Result<()> {
        for old in self.addresses().await? {
            self.netlink
                .address()
                .del(old)
                .execute()
                .await
                .map_err(|e| anyhow!("cannot remove the interface's address: {e}"))?;
        }
        self.routing.ensure(wanted.address, &wanted.routes).await
    }

    /// Removes what the host holds that the interface's removal does not: the routing rules.
    pub async fn cleanup(&mut self) {
        if self.routing.active() {
            self.routing.remove().await;
        }
    }

    async fn set_address(&self, wanted: &HostConfig) -> anyhow::Result<()> {
        let HostConfig {
            address,
            prefix_len,
            ..
        } = *wanted;
        let is_wanted = |m: &AddressMessage| {
            m.header.prefix_len == prefix_len
                && m.attributes
                    .contains(&AddressAttribute::Address(IpAddr::V4(address)))
        };
        let current = self.addresses().await?;
        if !current.iter().any(is_wanted) {
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
        }
        for old in current.into_iter().filter(|m| !is_wanted(m)) {
            self.netlink
                .address()
                .del(old)
                .execute()
                .await
                .map_err(|e| anyhow!("cannot remove the old address: {e}"))?;
        }
        let now = self.addresses().await?;
        if now.len() != 1 || !now.iter().any(is_wanted) {
            anyhow::bail!(
                "{} does not hold exactly {address}/{prefix_len} after configuring it",
                self.interface
            );
        }
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
            underlay: None,
        };
        let (core, host) = split(cfg.clone());
        assert_eq!(
            host,
            HostConfig {
                address: me,
                prefix_len: 16,
                addressing: Addressing::Overlay,
                routes: vec![],
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
