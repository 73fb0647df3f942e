//! Transparent addressing (spec §8): with `addressing: underlay`, an identity's address is its
//! server's own, and traffic from this server to a peer's own address must go through the
//! peer's tunnel while the tunnel's UDP to the same address stays on the underlay.
//!
//! Policy routing does it, as wg-quick does for a default route, but only for what this host
//! sends:
//!
//! ```text
//!  pref 5210  iif lo fwmark 0x4248  lookup main    the daemon's own WireGuard UDP (SO_MARK)
//!  pref 5211  iif lo                lookup 16968   everything else this host sends
//!  pref 5212  iif <tun>             lookup 16968   reverse-path checks of tunnel packets
//!  table 16968: <peer>/32 dev <tun> src <own address>, one per peer
//! ```
//!
//! A lookup that finds nothing in table 16968 goes on to `main`, so only peers' addresses are
//! drawn into the tunnel. Packets arriving on the underlay (`iif` not `lo`) never see these
//! rules, so strict reverse-path filtering on the underlay interface keeps working. Routes only
//! grow while the daemon runs: a peer that is removed keeps its route, so its traffic is dropped
//! by the data plane (`not_a_peer`) rather than leaking onto the underlay in clear; the routes go
//! with the interface when the daemon exits, and the rules are removed then (and at start, if a
//! crashed daemon left them).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::anyhow;
use futures_util::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

/// The routing table of peers' addresses.
pub const TABLE: u32 = 0x4248;
/// The mark on the daemon's UDP socket: its datagrams are routed by `main`.
pub const MARK: u32 = 0x4248;
/// The rules' priorities, before `main` (32766) and after `local` (0).
const PRIORITIES: [u32; 3] = [5210, 5211, 5212];
/// The `main` table.
const MAIN: u32 = 254;

/// The host's policy routing for transparent addressing.
pub struct Routing {
    netlink: rtnetlink::Handle,
    interface: String,
    index: u32,
    rules: bool,
    routed: BTreeSet<Ipv4Addr>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("interface", &self.interface)
            .field("rules", &self.rules)
            .field("routed", &self.routed)
            .finish()
    }
}

impl Routing {
    /// Nothing in place yet.
    pub fn new(netlink: rtnetlink::Handle, interface: &str, index: u32) -> Routing {
        Routing {
            netlink,
            interface: interface.to_string(),
            index,
            rules: false,
            routed: BTreeSet::new(),
        }
    }

    /// Whether anything is in place.
    pub fn active(&self) -> bool {
        self.rules || !self.routed.is_empty()
    }

    /// Routes each of `peers` into the tunnel, from `own`; puts the rules in place first.
    pub async fn ensure(&mut self, own: Ipv4Addr, peers: &[Ipv4Addr]) -> anyhow::Result<()> {
        if !self.rules {
            self.remove_rules().await?;
            self.add_rules().await?;
            self.rules = true;
        }
        for &p in peers {
            if p == own || self.routed.contains(&p) {
                continue;
            }
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p, 32)
                .output_interface(self.index)
                .pref_source(own)
                .table_id(TABLE)
                .build();
            self.netlink
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| anyhow!("cannot route {p} into {}: {e}", self.interface))?;
            self.routed.insert(p);
        }
        Ok(())
    }

    /// Removes the rules (the routes go with the interface).
    pub async fn remove(&mut self) {
        if let Err(e) = self.remove_rules().await {
            tracing::warn!(error = %format!("{e:#}"), "cannot remove the policy routing rules");
        }
        self.rules = false;
    }

    async fn add_rules(&self) -> anyhow::Result<()> {
        let add = |priority: u32| {
            self.netlink
                .rule()
                .add()
                .v4()
                .priority(priority)
                .action(RuleAction::ToTable)
        };
        add(PRIORITIES[0])
            .input_interface("lo")
            .fw_mark(MARK)
            .table_id(MAIN)
            .execute()
            .await
            .map_err(|e| anyhow!("cannot add the routing rule for WireGuard's own UDP: {e}"))?;
        add(PRIORITIES[1])
            .input_interface("lo")
            .table_id(TABLE)
            .execute()
            .await
            .map_err(|e| anyhow!("cannot add the routing rule into the tunnel: {e}"))?;
        add(PRIORITIES[2])
            .input_interface(self.interface.clone())
            .table_id(TABLE)
            .execute()
            .await
            .map_err(|e| anyhow!("cannot add the routing rule for the tunnel's packets: {e}"))?;
        Ok(())
    }

    /// Removes every IPv4 rule at one of our priorities, whoever left it.
    async fn remove_rules(&self) -> anyhow::Result<()> {
        let mut ours: Vec<RuleMessage> = Vec::new();
        let mut list = self.netlink.rule().get(rtnetlink::IpVersion::V4).execute();
        while let Some(r) = list
            .try_next()
            .await
            .map_err(|e| anyhow!("cannot list the routing rules: {e}"))?
        {
            let priority = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            if priority.is_some_and(|p| PRIORITIES.contains(&p)) {
                ours.push(r);
            }
        }
        for r in ours {
            self.netlink
                .rule()
                .del(r)
                .execute()
                .await
                .map_err(|e| anyhow!("cannot remove a routing rule: {e}"))?;
        }
        Ok(())
    }
}
