//! A node split into shards, one per worker thread, so that its peers are decrypted, filtered
//! and encrypted on several cores at once.
//!
//! Each shard is a [`Node`] with the node's key and every allowlist, holding only the peers it
//! owns: their tunnels, and their flows (every flow belongs to one peer, `share.rs`). Nothing is
//! shared between shards, so they need no locks, and each keeps the single-threaded core's
//! semantics for its peers. A peer's shard follows from its public key alone ([`Shard::owns`]),
//! so it does not move while the peer keeps its key.
//!
//! The [`Front`] says which shard a packet is for, before any of them sees it:
//! - a packet read from the TUN device goes to the shard of the peer whose overlay address is
//!   its destination (shard 0 when there is none: that shard drops it as not a peer);
//! - a WireGuard datagram first meets the node's one rate limiter, as in [`Node::handle_udp`]:
//!   the node's handshake budget is not multiplied by its shards. A handshake initiation then
//!   goes to the shard of the static key it decrypts to; every other message to the shard its
//!   receiver index names: each shard gives its tunnels indexes whose low bits are the shard's
//!   number ([`Shard::peer_id`]).
//!
//! Every packet of one flow thus goes through one shard, in order. An apply is a barrier: the
//! front and every shard take the configuration before the next packet is routed (the shell's
//! job; [`Sharded`] does it in one thread).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use crate::node::{ApplyReport, Config, Node, Now, screened};
use crate::peers::{PeerId, PeerStatus};
use crate::sink::{Counters, Direction, DropReason, Event, Sink};
use crate::tunnel::{Kind, SentBy, WireGuard};

/// Most shards a node may be split into.
pub const MAX_SHARDS: usize = 64;

/// Which of a node's shards one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
    /// Low bits of a peer id that hold the shard's number.
    bits: u32,
}

impl Shard {
    /// The whole node, not split.
    pub const WHOLE: Shard = Shard {
        index: 0,
        count: 1,
        bits: 0,
    };

    /// Shard `index` of `count`, if `index < count <= MAX_SHARDS`.
    pub fn new(index: usize, count: usize) -> Option<Shard> {
        if count == 0 || count > MAX_SHARDS || index >= count {
            return None;
        }
        let count = count as u32;
        Some(Shard {
            index: index as u32,
            count,
            bits: u32::BITS - (count - 1).leading_zeros(),
        })
    }

    /// The flow table of each of `count` shards of a node whose table holds `total`: the table
    /// is split, not multiplied, and each peer may hold a quarter of its shard's part.
    pub fn flow_capacity(total: usize, count: usize) -> usize {
        total.div_ceil(count.max(1))
    }

    /// Whether the peer with this public key is this shard's.
    pub fn owns(self, key: &[u8; 32]) -> bool {
        owner(key, self.count) == self.index
    }

    /// The id after sequence number `last`: its sequence number and the id, whose low bits are
    /// this shard's number. `None` once a shard's ids are spent.
    pub(crate) fn peer_id(self, last: u32) -> Option<(u32, u32)> {
        let seq = last.checked_add(1)?;
        let id = (u64::from(seq) << self.bits) | u64::from(self.index);
        Some((seq, u32::try_from(id).ok()?))
    }
}

/// The shard of `count` that owns the peer with this key. Public keys are uniform; a node that
/// picks its key to land on a shard only chooses which core carries it.
fn owner(key: &[u8; 32], count: u32) -> u32 {
    u32::from_le_bytes([key[0], key[1], key[2], key[3]]) % count
}

/// What the front learned of a datagram it routed, for [`Node::handle_screened`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) sent_by: SentBy,
    pub(crate) kind: Kind,
}

/// The node's front: its rate limiter, and where each packet goes.
pub struct Front {
    wg: WireGuard,
    count: u32,
    mask: u32,
    /// A peer's overlay address to its shard.
    by_address: HashMap<Ipv4Addr, u32, ahash::RandomState>,
    /// Datagrams the front dropped, by reason.
    drops: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("shards", &self.count)
            .field("peers", &self.by_address.len())
            .finish()
    }
}

impl Front {
    /// The front of a node with this key split into `shards` shards; `None` unless
    /// `1 <= shards <= MAX_SHARDS`.
    pub fn new(private_key: [u8; 32], shards: usize) -> Option<Front> {
        let last = Shard::new(shards.checked_sub(1)?, shards)?;
        Some(Front {
            wg: WireGuard::new(private_key),
            count: last.count,
            mask: (1 << last.bits) - 1,
            by_address: HashMap::default(),
            drops: BTreeMap::new(),
        })
    }

    /// Takes the peers' addresses from `config`, as every shard's [`Node::apply`] takes them:
    /// should two peers share an address, the later by name is the one found.
    pub fn apply(&mut self, config: &Config) {
        self.by_address.clear();
        let me = self.wg.public_key();
        for entry in &config.allowlist.peers {
            if let Some(c) = config.peers.get(&*entry.name)
                && c.public_key != me
            {
                self.by_address
                    .insert(entry.address, owner(&c.public_key, self.count));
            }
        }
    }

    /// Forgets every peer, as [`Node::clear`] does.
    pub fn clear(&mut self) {
        self.by_address.clear();
    }

    /// The shard a packet read from the TUN device goes to.
    pub fn route_tun(&self, pkt: &[u8]) -> usize {
        let dst = match pkt.get(16..20) {
            Some(&[a, b, c, d]) if pkt[0] >> 4 == 4 => Ipv4Addr::new(a, b, c, d),
            _ => return 0,
        };
        self.by_address.get(&dst).map_or(0, |&s| s as usize)
    }

    /// Screens a datagram read from the UDP socket through the node's rate limiter, as
    /// [`Node::handle_udp`] does, and says which shard it goes to. `None`: it was answered (a
    /// cookie, in `sink`) or dropped (counted here, and told to `sink`).
    pub fn route_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Now,
        sink: &mut impl Sink,
    ) -> Option<(usize, Ticket)> {
        let screened = screened(self.wg.screen(from, datagram, now.instant, sink));
        let routed = screened.and_then(|s| {
            let Some((sent_by, kind)) = s else {
                return Ok(None);
            };
            let shard = match sent_by {
                SentBy::Key(key) => owner(&key, self.count),
                SentBy::Tunnel(index) => index & self.mask,
                SentBy::Unknown => u32::MAX,
            };
            if shard >= self.count {
                return Err(DropReason::UnknownPeer);
            }
            Ok(Some((shard as usize, Ticket { sent_by, kind })))
        });
        match routed {
            Ok(r) => r,
            Err(why) => {
                *self.drops.entry(why.reason()).or_default() += 1;
                sink.event(Event::Dropped {
                    egress: false,
                    reason: &why,
                    key: None,
                    peer: None,
                    rule: None,
                });
                None
            }
        }
    }

    /// Lets the rate limiter count afresh once a second. Call it as often as the shards' ticks.
    pub fn tick(&mut self, now: Now) {
        self.wg.tick(now.instant);
    }

    /// The node's counters: the front's and the shards' `counters`, summed.
    pub fn with(&self, shards: Vec<Counters>) -> Counters {
        let mut all = self.counters();
        for c in shards {
            all.add(c);
        }
        all
    }

    /// What the front dropped, as [`Counters`] (ingress only).
    pub fn counters(&self) -> Counters {
        Counters {
            dropped: self
                .drops
                .iter()
                .map(|(r, n)| ((Direction::Ingress, *r), *n))
                .collect(),
            ..Counters::default()
        }
    }
}

/// A split node driven from one thread: its front and its shards, with [`Node`]'s interface.
/// The reference the threaded shells are held to, and what the tests compare with a whole node.
#[derive(Debug)]
pub struct Sharded {
    front: Front,
    shards: Vec<Node>,
}

impl Sharded {
    /// A node with this key split into `shards`, its flow table of `flow_capacity` split among
    /// them ([`Shard::flow_capacity`]), as the daemon splits it.
    pub fn new(private_key: [u8; 32], flow_capacity: usize, shards: usize) -> Option<Sharded> {
        let front = Front::new(private_key, shards)?;
        let capacity = Shard::flow_capacity(flow_capacity, shards);
        let shards = (0..shards)
            .map(|i| Shard::new(i, shards).map(|s| Node::shard(private_key, capacity, s)))
            .collect::<Option<Vec<_>>>()?;
        Some(Sharded { front, shards })
    }

    /// The front.
    pub fn front(&self) -> &Front {
        &self.front
    }

    /// The shards.
    pub fn shards(&self) -> &[Node] {
        &self.shards
    }

    /// Applies `config` to the front and every shard; what changed, summed.
    pub fn apply(&mut self, config: Config, now: Now) -> ApplyReport {
        self.front.apply(&config);
        let reports: Vec<ApplyReport> = self
            .shards
            .iter_mut()
            .map(|s| s.apply(config.clone(), now))
            .collect();
        ApplyReport::of_shards(reports)
    }

    /// Forgets the configuration, in every shard.
    pub fn clear(&mut self) {
        self.front.clear();
        self.shards.iter_mut().for_each(Node::clear);
    }

    /// Handles one packet read from the TUN device.
    pub fn handle_tun(&mut self, pkt: &[u8], now: Now, sink: &mut impl Sink) {
        let s = self.front.route_tun(pkt);
        self.shards[s].handle_tun(pkt, now, sink);
    }

    /// Handles one datagram read from the UDP socket.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Now,
        sink: &mut impl Sink,
    ) {
        if let Some((s, ticket)) = self.front.route_udp(from, datagram, now, sink) {
            self.shards[s].handle_screened(from, datagram, ticket, now, sink);
        }
    }

    /// Runs every shard's timers, and the front's.
    pub fn tick(&mut self, now: Now, sink: &mut impl Sink) {
        self.front.tick(now);
        for s in &mut self.shards {
            s.tick(now, sink);
        }
    }

    /// The peers with a tunnel, in name order.
    pub fn peers(&self) -> Vec<PeerStatus> {
        PeerStatus::of_shards(self.shards.iter().map(Node::peers).collect())
    }

    /// The id of the peer with this name, if it has a tunnel.
    pub fn peer_id(&self, name: &str) -> Option<PeerId> {
        self.shards.iter().find_map(|s| s.peer_id(name))
    }

    /// The counters of the front and every shard, summed.
    pub fn counters(&self) -> Counters {
        self.front
            .with(self.shards.iter().map(Node::counters).collect())
    }

    /// The generation of what the node enforces ([`Node::epoch`]): every shard takes every
    /// configuration and crosses every rule window, so theirs are the same.
    pub fn epoch(&self) -> u64 {
        self.shards.iter().map(Node::epoch).max().unwrap_or(0)
    }

    /// Flows tracked, in every shard.
    pub fn flow_count(&self) -> usize {
        self.shards.iter().map(Node::flow_count).sum()
    }
}

impl ApplyReport {
    /// What the shards' applies changed, as one node's apply reports it. A peer whose new key
    /// moves it to another shard is removed from one and added to another: it is reported as
    /// added, as a whole node reports a new key.
    pub fn of_shards(reports: Vec<ApplyReport>) -> ApplyReport {
        let mut all = ApplyReport {
            unchanged: true,
            ..ApplyReport::default()
        };
        for r in reports {
            all.unchanged &= r.unchanged;
            all.added.extend(r.added);
            all.removed.extend(r.removed);
            all.flows_cut += r.flows_cut;
        }
        all.added.sort();
        all.removed.sort();
        let added = &all.added;
        all.removed.retain(|n| added.binary_search(n).is_err());
        all
    }
}

impl PeerStatus {
    /// The shards' peers as one node lists them: in name order.
    pub fn of_shards(shards: Vec<Vec<PeerStatus>>) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = shards.into_iter().flatten().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_shard_in_the_low_bits() {
        for count in 1..=MAX_SHARDS {
            for index in 0..count {
                let s = Shard::new(index, count).unwrap();
                let mask = (1u32 << s.bits) - 1;
                let mut last = 0;
                for _ in 0..50 {
                    let (seq, id) = s.peer_id(last).unwrap();
                    assert_eq!(seq, last + 1);
                    assert_ne!(id, 0);
                    // What a WireGuard message carries: the id's low 24 bits.
                    assert_eq!((id & 0x00ff_ffff) & mask, index as u32);
                    last = seq;
                }
            }
        }
        assert_eq!(Shard::new(0, 0), None);
        assert_eq!(Shard::new(2, 2), None);
        assert_eq!(Shard::new(0, MAX_SHARDS + 1), None);
    }

    #[test]
    fn ids_run_out_rather_than_repeat() {
        let s = Shard::new(3, 4).unwrap();
        let last_ok = u32::MAX >> 2;
        assert!(s.peer_id(last_ok - 1).is_some());
        assert_eq!(s.peer_id(last_ok), None);
        assert_eq!(Shard::WHOLE.peer_id(u32::MAX), None);
    }

    #[test]
    fn every_key_has_exactly_one_owner() {
        for count in [1, 2, 3, 7, 16] {
            let mut seen = vec![0; count];
            for k in 0..=255u8 {
                let key = [k.wrapping_mul(37); 32];
                let owners: Vec<usize> = (0..count)
                    .filter(|&i| Shard::new(i, count).unwrap().owns(&key))
                    .collect();
                assert_eq!(owners.len(), 1);
                seen[owners[0]] += 1;
            }
            assert!(seen.iter().all(|&n| n > 0), "{count}: {seen:?}");
        }
    }
}
