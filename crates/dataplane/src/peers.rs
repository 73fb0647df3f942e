//! The peer registry: the peers this node keeps a tunnel to, each under a [`PeerId`] that
//! outlives applies, and found by overlay address (egress), static key (handshake initiations)
//! and tunnel index (every other WireGuard message).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bulkhead_allowlist::Allowlist;

use crate::filter::Tables;
use crate::node::PeerConfig;
use crate::shards::Shard;
use crate::share::FlowShare;
use crate::tunnel::{TUNNEL_INDEX_BITS, Tunnel, WireGuard};

/// A peer's identity within one node. It is given when the peer first gets a tunnel and kept
/// across applies for as long as the peer keeps its key; it is never given to another key in
/// the node's life. So a packet that carries a `PeerId` across an apply can only ever meet the
/// peer it came from, or none. In a node split into shards, its low bits are the shard's
/// number ([`Shard`]), and so are those of the tunnel index that WireGuard messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(u32);

/// A peer as `wg show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's name.
    pub name: String,
    /// Its public key.
    pub public_key: [u8; 32],
    /// Its overlay address, the only one allowed from its tunnel.
    pub address: Ipv4Addr,
    /// Where it is reached.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last handshake.
    pub since_handshake: Option<Duration>,
    /// Payload bytes sent, as WireGuard counts them (for `wg show`).
    pub tx_bytes: u64,
    /// Payload bytes received, as WireGuard counts them.
    pub rx_bytes: u64,
    /// Persistent keepalive, in seconds.
    pub keepalive: Option<u16>,
    /// Packets that passed the egress filter into this peer's tunnel, and their bytes (one
    /// queued while a handshake is under way counts when queued).
    pub sent: Traffic,
    /// Packets decrypted from this peer's tunnel (before the ingress filter), and their bytes.
    pub received: Traffic,
    /// Handshakes with this peer: its initiations this node answered, and its responses that
    /// completed this node's initiations (an initiation it sends again counts again).
    pub handshakes: u64,
    /// Its flows in the flow table, and how many the table refused or evicted.
    pub flows: FlowShare,
}

/// Packets and their bytes (whole IP packets, before encryption or after decryption).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Traffic {
    pub(crate) fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// One peer with a tunnel.
pub(crate) struct Peer {
    pub(crate) id: PeerId,
    pub(crate) name: String,
    pub(crate) address: Ipv4Addr,
    pub(crate) key: [u8; 32],
    pub(crate) tunnel: Tunnel,
    pub(crate) tables: Tables,
    pub(crate) sent: Traffic,
    pub(crate) received: Traffic,
}

/// The peers with a tunnel, and the indexes that find them.
pub(crate) struct Peers {
    /// Which peers are this registry's: those of its shard.
    shard: Shard,
    peers: HashMap<PeerId, Peer, ahash::RandomState>,
    /// In the allowlist's order, which is by name.
    order: Vec<PeerId>,
    by_address: HashMap<Ipv4Addr, PeerId, ahash::RandomState>,
    by_key: HashMap<[u8; 32], PeerId, ahash::RandomState>,
    /// Tunnel index (the upper 24 bits of WireGuard receiver indexes) to peer.
    by_tunnel: HashMap<u32, PeerId, ahash::RandomState>,
    /// The sequence number of the last `PeerId` given; 0 is never one.
    last_seq: u32,
}

/// Which peers an update added and removed, by name.
pub(crate) struct Changes {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
}

impl Peers {
    /// No peers, yet: this registry holds the peers of `shard`.
    pub(crate) fn new(shard: Shard) -> Peers {
        Peers {
            shard,
            peers: HashMap::default(),
            order: Vec::new(),
            by_address: HashMap::default(),
            by_key: HashMap::default(),
            by_tunnel: HashMap::default(),
            last_seq: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn get(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.peers.get_mut(&id)
    }

    /// The peer with this overlay address.
    pub(crate) fn by_address(&self, address: Ipv4Addr) -> Option<PeerId> {
        self.by_address.get(&address).copied()
    }

    /// The peer with this static key.
    pub(crate) fn by_key(&self, key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// The peer whose tunnel has this index.
    pub(crate) fn by_tunnel(&self, index: u32) -> Option<PeerId> {
        self.by_tunnel.get(&index).copied()
    }

    /// The peers, in name order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.order.iter().filter_map(|id| self.peers.get(id))
    }

    /// Runs `f` on every peer, in name order.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut Peer)) {
        for id in &self.order {
            if let Some(p) = self.peers.get_mut(id) {
                f(p);
            }
        }
    }

    /// Makes the registry hold exactly the peers of `list` that `configs` has a key for (never
    /// this node itself), of those its shard owns. A peer that stays with the same key keeps its
    /// id, its tunnel and its session, and takes its new address, tables and endpoint; a new
    /// name, or a new key for an old name, gets a new id and a new tunnel.
    pub(crate) fn update(
        &mut self,
        list: &Allowlist,
        configs: &BTreeMap<String, PeerConfig>,
        keepalive: Option<u16>,
        wg: &WireGuard,
    ) -> Changes {
        let mut added = Vec::new();
        // Tunnel indexes are an id's low 24 bits: after 2^24 ids (fewer in a shard) they come
        // round again, and a new tunnel must not take one a peer still has.
        let mut in_use: HashSet<u32> = self.peers.values().map(|p| p.tunnel.index()).collect();
        let mut old: HashMap<String, Peer> = self
            .peers
            .drain()
            .map(|(_, p)| (p.name.clone(), p))
            .collect();
        self.order.clear();
        for entry in &list.peers {
            let Some(config) = configs.get(&*entry.name) else {
                continue;
            };
            if config.public_key == wg.public_key() {
                continue; // never a tunnel to oneself
            }
            if !self.shard.owns(&config.public_key) {
                continue;
            }
            let peer = match old.remove(&*entry.name) {
                Some(mut p) if p.key == config.public_key => {
                    p.address = entry.address;
                    p.tunnel.set_endpoint(config.endpoint);
                    p.tables = Tables::of(entry);
                    p
                }
                _ => {
                    // Ids run out after 2^32 - 2 tunnels (fewer in a shard): from then on, no
                    // new tunnels rather than an id given twice.
                    let Some(id) = next_id(self.shard, &mut self.last_seq, &mut in_use) else {
                        continue;
                    };
                    added.push(entry.name.to_string());
                    Peer {
                        id,
                        name: entry.name.to_string(),
                        address: entry.address,
                        key: config.public_key,
                        tunnel: Tunnel::new(
                            wg,
                            config.public_key,
                            config.endpoint,
                            keepalive,
                            id.0,
                        ),
                        tables: Tables::of(entry),
                        sent: Traffic::default(),
                        received: Traffic::default(),
                    }
                }
            };
            self.order.push(peer.id);
            self.peers.insert(peer.id, peer);
        }
        let mut removed: Vec<String> = old.into_keys().collect();
        removed.sort();
        self.reindex();
        Changes { added, removed }
    }

    /// Keeps only the peers `keep` says yes to. Returns whether any went.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Peer) -> bool) -> bool {
        let before = self.peers.len();
        self.peers.retain(|_, p| keep(p));
        if self.peers.len() == before {
            return false;
        }
        let peers = &self.peers;
        self.order.retain(|id| peers.contains_key(id));
        self.reindex();
        true
    }

    /// No peers. Their ids are not given again.
    pub(crate) fn clear(&mut self) {
        self.retain(|_| false);
    }

    /// Rebuilds the indexes whole, in name order: applies are rare, and should two peers ever
    /// share an address or a key, the later by name is the one found, whatever came before.
    fn reindex(&mut self) {
        self.by_address.clear();
        self.by_key.clear();
        self.by_tunnel.clear();
        for p in self.order.iter().filter_map(|id| self.peers.get(id)) {
            self.by_address.insert(p.address, p.id);
            self.by_key.insert(p.key, p.id);
            self.by_tunnel.insert(p.tunnel.index(), p.id);
        }
    }
}

/// The next id of `shard` after `last_seq` whose tunnel index no peer in `in_use` has, which it
/// then joins; `None` once the shard's ids are spent, or no index is free.
fn next_id(shard: Shard, last_seq: &mut u32, in_use: &mut HashSet<u32>) -> Option<PeerId> {
    for _ in 0..=in_use.len() {
        let (seq, id) = shard.peer_id(*last_seq)?;
        *last_seq = seq;
        if in_use.insert(id & TUNNEL_INDEX_BITS) {
            return Some(PeerId(id));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that has given 2^24 tunnels in its life comes round to index 1 again: a new tunnel
    /// skips the indexes its peers still have instead of taking one (which would send one
    /// peer's messages to another's session).
    #[test]
    fn a_new_tunnel_never_takes_an_index_in_use() {
        let mut in_use = HashSet::from([1, 2]);
        let mut last = TUNNEL_INDEX_BITS - 1;
        let ids: Vec<u32> = (0..3)
            .map(|_| next_id(Shard::WHOLE, &mut last, &mut in_use).map(|PeerId(id)| id))
            .collect::<Option<_>>()
            .expect("ids");
        assert_eq!(ids, [0x00ff_ffff, 0x0100_0000, 0x0100_0003]);
        // In a shard, its own indexes only.
        let s = Shard::new(1, 2).expect("a shard");
        let mut in_use = HashSet::from([3, 5]);
        let mut last = 0;
        let id = next_id(s, &mut last, &mut in_use).expect("an id");
        assert_eq!(id.0, 7, "1 << 1 | 1 and 2 << 1 | 1 are taken");
        // Ids spent: no tunnel, rather than an id given twice.
        let mut full: HashSet<u32> = HashSet::new();
        let mut last = u32::MAX - 2;
        assert!(next_id(Shard::WHOLE, &mut last, &mut full).is_some());
        assert!(next_id(Shard::WHOLE, &mut last, &mut full).is_some());
        assert_eq!(
            next_id(Shard::WHOLE, &mut last, &mut full),
            None,
            "ids spent"
        );
    }
}
