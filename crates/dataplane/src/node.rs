//! [`Node`]: one identity's tunnels, filter and flow table.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bulkhead_allowlist::{Allowlist, UnixTime};

use crate::conntrack::{Flow, FlowKey};
use crate::filter::{Admitted, Filter, Tables};
use crate::packet::{self, Ipv4, Packet};
use crate::sink::{Counters, Direction, DropReason, Event, Sink};
use crate::tunnel::{Decapsulated, Encapsulated, Screened, SentBy, Tunnel, WireGuard};

/// Largest packet the node handles, plus room for WireGuard's overhead.
const BUFFER: usize = 65536 + 148;

/// The time, twice: monotonic for timeouts, wall clock for rule windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Unix seconds.
    pub unix: UnixTime,
}

/// How to reach one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's WireGuard public key.
    pub public_key: [u8; 32],
    /// Where to send to the peer, if known; learned from authenticated packets otherwise.
    pub endpoint: Option<SocketAddr>,
}

/// Everything the core enforces: the allowlist and how to reach the peers it names. The shell
/// builds it from what the controller sent (the wire format is not the core's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The compiled allowlist.
    pub allowlist: Allowlist,
    /// Keys and endpoints of peers, by name. A peer of the allowlist missing here gets no tunnel.
    pub peers: BTreeMap<String, PeerConfig>,
    /// WireGuard persistent keepalive, in seconds.
    pub keepalive: Option<u16>,
}

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
    fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// What applying a configuration changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The configuration was the same as the one in force: nothing was touched.
    pub unchanged: bool,
    /// Peers that got a tunnel.
    pub added: Vec<String>,
    /// Peers whose tunnel was removed.
    pub removed: Vec<String>,
    /// Tracked flows that the new allowlist no longer allows, and were cut.
    pub flows_cut: usize,
}

struct PeerState {
    name: String,
    address: Ipv4Addr,
    key: [u8; 32],
    tunnel: Tunnel,
    tables: Tables,
    sent: Traffic,
    received: Traffic,
}

/// One identity's data plane.
pub struct Node {
    wg: WireGuard,
    filter: Filter,
    /// The rest of the configuration in force, to tell when a new one is the same.
    peer_configs: BTreeMap<String, PeerConfig>,
    keepalive: Option<u16>,
    peers: Vec<PeerState>,
    by_address: HashMap<Ipv4Addr, usize, ahash::RandomState>,
    by_key: HashMap<[u8; 32], usize, ahash::RandomState>,
    /// Tunnel index (the upper 24 bits of WireGuard receiver indices) to peer.
    by_index: HashMap<u32, usize, ahash::RandomState>,
    next_index: u32,
    counters: Counters,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field(
                "public_key",
                &format_args!("{:02x?}…", &self.wg.public_key()[..4]),
            )
            .field("peers", &self.peers.len())
            .field("flows", &self.filter.flow_count())
            .finish()
    }
}

impl Node {
    /// A node with this private key, enforcing nothing-passes until [`Node::apply`].
    pub fn new(private_key: [u8; 32], flow_capacity: usize) -> Node {
        Node {
            wg: WireGuard::new(private_key),
            filter: Filter::new(flow_capacity),
            peer_configs: BTreeMap::new(),
            keepalive: None,
            peers: Vec::new(),
            by_address: HashMap::default(),
            by_key: HashMap::default(),
            by_index: HashMap::default(),
            next_index: 1,
            counters: Counters::default(),
            buf: vec![0; BUFFER],
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.wg.public_key()
    }

    /// The allowlist in force, if any.
    pub fn allowlist(&self) -> Option<&Allowlist> {
        self.filter.allowlist()
    }

    /// DropReason counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Number of tracked flows.
    pub fn flow_count(&self) -> usize {
        self.filter.flow_count()
    }

    /// The tracked flows.
    pub fn flows(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.filter.flows()
    }

    /// The peers with a tunnel, in name order.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| {
                let (since, tx_bytes, rx_bytes) = p.tunnel.stats();
                PeerStatus {
                    name: p.name.clone(),
                    public_key: p.key,
                    address: p.address,
                    endpoint: p.tunnel.endpoint(),
                    since_handshake: since,
                    tx_bytes,
                    rx_bytes,
                    keepalive: p.tunnel.keepalive(),
                    sent: p.sent,
                    received: p.received,
                    handshakes: p.tunnel.handshakes(),
                }
            })
            .collect()
    }

    /// Applies a new configuration as one step: peers are added and removed, the filter is
    /// swapped whole, and tracked flows the new allowlist does not allow are cut. Flows it still
    /// allows are untouched, and tunnels of peers that stay keep their sessions. Applying the
    /// configuration in force changes nothing.
    pub fn apply(&mut self, config: Config, now: Now) -> ApplyReport {
        if self.filter.allowlist() == Some(&config.allowlist)
            && self.peer_configs == config.peers
            && self.keepalive == config.keepalive
        {
            return ApplyReport {
                unchanged: true,
                ..ApplyReport::default()
            };
        }
        let mut report = ApplyReport::default();
        let mut old: HashMap<String, PeerState> =
            self.peers.drain(..).map(|p| (p.name.clone(), p)).collect();
        let list = &config.allowlist;
        for peer in &list.peers {
            let Some(info) = config.peers.get(&*peer.name) else {
                continue;
            };
            if info.public_key == self.public_key() {
                continue; // never a tunnel to oneself
            }
            let state = match old.remove(&*peer.name) {
                Some(mut p) if p.key == info.public_key => {
                    p.address = peer.address;
                    p.tunnel.set_endpoint(info.endpoint);
                    p.tables = Tables::of(peer);
                    p
                }
                _ => {
                    report.added.push(peer.name.to_string());
                    let index = self.next_index;
                    self.next_index = (self.next_index + 1) & 0x00ff_ffff;
                    PeerState {
                        name: peer.name.to_string(),
                        address: peer.address,
                        key: info.public_key,
                        tunnel: Tunnel::new(
                            &self.wg,
                            info.public_key,
                            info.endpoint,
                            config.keepalive,
                            index,
                        ),
                        tables: Tables::of(peer),
                        sent: Traffic::default(),
                        received: Traffic::default(),
                    }
                }
            };
            self.peers.push(state);
        }
        report.removed = old.into_keys().collect();
        report.removed.sort();
        self.filter.set(config.allowlist);
        self.peer_configs = config.peers;
        self.keepalive = config.keepalive;
        self.reindex();
        report.flows_cut = self.revalidate(now);
        report
    }

    /// Forgets the configuration: every tunnel goes, every flow is cut, and nothing passes until
    /// the next [`Node::apply`]. For an allowlist that cannot be read: never fail open.
    pub fn clear(&mut self) {
        self.filter.clear();
        self.peers.clear();
        self.reindex();
    }

    fn reindex(&mut self) {
        self.by_address.clear();
        self.by_key.clear();
        self.by_index.clear();
        for (i, p) in self.peers.iter().enumerate() {
            self.by_address.insert(p.address, i);
            self.by_key.insert(p.key, i);
            self.by_index.insert(p.tunnel.index(), i);
        }
    }

    /// Checks every tracked flow against the allowlist at `now` and cuts those it no longer
    /// allows; removes tunnels to peers nothing is allowed with any more. Returns flows cut.
    fn revalidate(&mut self, now: Now) -> usize {
        if self.filter.allowlist().is_none() {
            return 0;
        }
        let (by_address, peers) = (&self.by_address, &self.peers);
        let cut = self
            .filter
            .revalidate(|a| by_address.get(&a).map(|&i| peers[i].tables), now);
        // A peer whose every rule has expired keeps no tunnel: it cannot come back without a new
        // allowlist, since rules that open later are only sent when they open.
        let before = self.peers.len();
        let filter = &self.filter;
        self.peers.retain(|p| filter.allows_any(p.tables, now));
        if self.peers.len() != before {
            self.reindex();
        }
        cut
    }

    fn drop(
        &mut self,
        egress: bool,
        why: DropReason,
        key: Option<FlowKey>,
        peer: Option<usize>,
        sink: &mut impl Sink,
    ) {
        let direction = if egress {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        *self
            .counters
            .dropped
            .entry((direction, why.reason()))
            .or_default() += 1;
        if let DropReason::DeniedByRule(r) = &why {
            *self.counters.denied_by_rule.entry(r.clone()).or_default() += 1;
        }
        sink.event(Event::Dropped {
            egress,
            reason: &why,
            key,
            peer: peer.map(|i| self.peers[i].name.as_str()),
        });
    }

    /// Decides whether `p` may pass between this node and peer `i`, tracking flows. `egress` is
    /// the direction. Returns the drop reason if not.
    fn admit(
        &mut self,
        i: usize,
        p: &Ipv4,
        egress: bool,
        now: Now,
        sink: &mut impl Sink,
    ) -> Result<(), (DropReason, FlowKey)> {
        match self.filter.admit(self.peers[i].tables, p, egress, now)? {
            Admitted::Tracked => {}
            Admitted::Opened {
                initiator,
                key,
                rule,
            } => {
                self.counters.flows_started += 1;
                sink.event(Event::FlowStarted {
                    initiator,
                    key,
                    peer: &self.peers[i].name,
                    rule,
                });
            }
        }
        Ok(())
    }

    /// Handles one packet read from the TUN device: filter, then encrypt to its peer.
    pub fn handle_tun(&mut self, pkt: &[u8], now: Now, sink: &mut impl Sink) {
        let Some(me) = self.filter.allowlist().map(|l| l.address) else {
            return self.drop(true, DropReason::NoAllowlist, None, None, sink);
        };
        let p = match packet::classify(pkt) {
            Ok(Packet::V4(p)) => p,
            Ok(Packet::V6) => return self.drop(true, DropReason::Ipv6, None, None, sink),
            Err(m) => return self.drop(true, DropReason::Malformed(m), None, None, sink),
        };
        if p.src != me {
            return self.drop(
                true,
                DropReason::WrongSource,
                Some(FlowKey::egress(&p)),
                None,
                sink,
            );
        }
        let Some(&i) = self.by_address.get(&p.dst) else {
            return self.drop(
                true,
                DropReason::NotAPeer,
                Some(FlowKey::egress(&p)),
                None,
                sink,
            );
        };
        if let Err((why, key)) = self.admit(i, &p, true, now, sink) {
            return self.drop(true, why, Some(key), Some(i), sink);
        }
        let peer = &mut self.peers[i];
        match peer.tunnel.encapsulate(pkt, &mut self.buf) {
            Encapsulated::Send(to, out) => {
                peer.sent.add(pkt.len());
                sink.to_network(to, out)
            }
            Encapsulated::Queued => peer.sent.add(pkt.len()),
            Encapsulated::NoEndpoint => self.drop(
                true,
                DropReason::NoEndpoint,
                Some(FlowKey::egress(&p)),
                Some(i),
                sink,
            ),
            Encapsulated::Failed => self.drop(true, DropReason::Tunnel, None, Some(i), sink),
        }
    }

    /// Handles one datagram read from the UDP socket: authenticate and decrypt, then filter.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Now,
        sink: &mut impl Sink,
    ) {
        let (sent_by, handshake) = match self.wg.screen(from, datagram, sink) {
            Screened::Answered => return,
            Screened::Invalid => return self.drop(false, DropReason::Tunnel, None, None, sink),
            Screened::Message { sent_by, handshake } => (sent_by, handshake),
        };
        let peer = match sent_by {
            SentBy::Key(key) => self.by_key.get(&key).copied(),
            SentBy::Tunnel(index) => self.by_index.get(&index).copied(),
            SentBy::Unknown => None,
        };
        let Some(i) = peer else {
            return self.drop(false, DropReason::UnknownPeer, None, None, sink);
        };
        // The buffer is taken out so the decrypted packet can be filtered without a copy.
        let mut buf = std::mem::take(&mut self.buf);
        let peer = &mut self.peers[i];
        match peer
            .tunnel
            .decapsulate(from, datagram, handshake, &mut buf, sink)
        {
            Decapsulated::Nothing => {}
            Decapsulated::V4 { len, src } => {
                peer.received.add(len);
                self.ingress(i, &buf[..len], src, now, sink);
            }
            Decapsulated::V6 { len } => {
                peer.received.add(len);
                self.drop(false, DropReason::Ipv6, None, Some(i), sink);
            }
            Decapsulated::Failed => self.drop(false, DropReason::Tunnel, None, Some(i), sink),
        }
        self.buf = buf;
    }

    fn ingress(&mut self, i: usize, pkt: &[u8], src: Ipv4Addr, now: Now, sink: &mut impl Sink) {
        let Some(me) = self.filter.allowlist().map(|l| l.address) else {
            return self.drop(false, DropReason::NoAllowlist, None, Some(i), sink);
        };
        let p = match packet::classify(pkt) {
            Ok(Packet::V4(p)) => p,
            Ok(Packet::V6) => return self.drop(false, DropReason::Ipv6, None, Some(i), sink),
            Err(m) => return self.drop(false, DropReason::Malformed(m), None, Some(i), sink),
        };
        let key = FlowKey::ingress(&p);
        if p.src != self.peers[i].address || src != p.src {
            return self.drop(false, DropReason::Spoofed, Some(key), Some(i), sink);
        }
        if p.dst != me {
            return self.drop(
                false,
                DropReason::WrongDestination,
                Some(key),
                Some(i),
                sink,
            );
        }
        match self.admit(i, &p, false, now, sink) {
            Ok(()) => sink.to_tun(pkt),
            Err((why, key)) => self.drop(false, why, Some(key), Some(i), sink),
        }
    }

    /// Runs timers: WireGuard handshakes and keepalives, flow expiry, and rule windows that open
    /// or close. Call it a few times a second.
    pub fn tick(&mut self, now: Now, sink: &mut impl Sink) {
        self.wg.tick(now.instant);
        for p in &mut self.peers {
            p.tunnel.tick(&mut self.buf, sink);
        }
        self.filter.expire(now);
        if self.filter.window_passed(now) {
            self.revalidate(now);
        }
    }
}
