//! [`Node`]: one identity's data plane. It owns the peer registry, the filter and WireGuard, and
//! runs each packet through them in order; what each does is in its own module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use bulkhead_allowlist::{Allowlist, UnixTime};

use crate::conntrack::{Flow, FlowKey};
use crate::filter::{Admitted, Filter};
use crate::packet::{self, Ipv4, Packet};
use crate::peers::{Peer, PeerId, PeerStatus, Peers};
use crate::shards::{Shard, Ticket};
use crate::sink::{Counters, Direction, DropReason, Event, Sink};
use crate::tunnel::{Decapsulated, Encapsulated, Kind, Screened, SentBy, WireGuard};

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

/// One identity's data plane.
pub struct Node {
    wg: WireGuard,
    peers: Peers,
    filter: Filter,
    /// The rest of the configuration in force, to tell when a new one is the same.
    peer_configs: BTreeMap<String, PeerConfig>,
    keepalive: Option<u16>,
    epoch: u64,
    /// Drops by direction and reason.
    drops: BTreeMap<(Direction, &'static str), u64>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field(
                "public_key",
                &format_args!("{:02x?}…", &self.wg.public_key()[..4]),
            )
            .field("epoch", &self.epoch)
            .field("peers", &self.peers.len())
            .field("flows", &self.filter.flow_count())
            .finish()
    }
}

impl Node {
    /// A node with this private key, enforcing nothing-passes until [`Node::apply`].
    pub fn new(private_key: [u8; 32], flow_capacity: usize) -> Node {
        Node::shard(private_key, flow_capacity, Shard::WHOLE)
    }

    /// One shard of a node split across worker threads (`shards.rs`): the same key, and of the
    /// peers of every allowlist only those `shard` owns, with their tunnels and their flows, in
    /// a flow table of `flow_capacity`. Its datagrams come through the node's
    /// [`Front`](crate::Front) and [`Node::handle_screened`].
    pub fn shard(private_key: [u8; 32], flow_capacity: usize, shard: Shard) -> Node {
        Node {
            wg: WireGuard::new(private_key),
            peers: Peers::new(shard),
            filter: Filter::new(flow_capacity),
            peer_configs: BTreeMap::new(),
            keepalive: None,
            epoch: 0,
            drops: BTreeMap::new(),
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

    /// The generation of what the node enforces: 0 before the first [`Node::apply`], then one
    /// more with every apply that changes anything, every [`Node::clear`], and every rule
    /// window that opens or closes (flows and tunnels are checked again then). It never goes
    /// down. Work that outlives one call (anything that holds a [`PeerId`] it was classified
    /// under) is still valid if the epoch has not moved; if it has, the peer and the rules must
    /// be looked up again.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The id of the peer with this name, if it has a tunnel.
    pub fn peer_id(&self, name: &str) -> Option<PeerId> {
        self.peers.iter().find(|p| p.name == name).map(|p| p.id)
    }

    /// A copy of the counters.
    pub fn counters(&self) -> Counters {
        Counters {
            dropped: self.drops.clone(),
            denied_by_rule: self.filter.denied_by_rule(),
            flows_started: self.filter.flows_started(),
        }
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
                    flows: self.filter.share(p.address),
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
        let changes =
            self.peers
                .update(&config.allowlist, &config.peers, config.keepalive, &self.wg);
        self.filter.set(config.allowlist);
        self.peer_configs = config.peers;
        self.keepalive = config.keepalive;
        self.epoch += 1;
        ApplyReport {
            unchanged: false,
            added: changes.added,
            removed: changes.removed,
            flows_cut: self.revalidate(now),
        }
    }

    /// Forgets the configuration: every tunnel goes, every flow is cut, and nothing passes until
    /// the next [`Node::apply`]. For an allowlist that cannot be read: never fail open.
    pub fn clear(&mut self) {
        self.filter.clear();
        self.peers.clear();
        self.epoch += 1;
    }

    /// Checks every tracked flow against the allowlist at `now` and cuts those it no longer
    /// allows; removes tunnels to peers nothing is allowed with any more. Returns flows cut.
    fn revalidate(&mut self, now: Now) -> usize {
        if self.filter.allowlist().is_none() {
            return 0;
        }
        let peers = &self.peers;
        let mut cut_with = Vec::new();
        let cut = self.filter.revalidate(
            |a| {
                peers
                    .by_address(a)
                    .and_then(|id| peers.get(id))
                    .map(|p| p.tables)
            },
            |a| cut_with.push(a),
            now,
        );
        // Packets waiting in a tunnel for its handshake were let through under the old rules.
        for a in cut_with {
            if let Some(p) = self
                .peers
                .by_address(a)
                .and_then(|id| self.peers.get_mut(id))
            {
                p.tunnel.discard_queued(&self.wg);
            }
        }
        // A peer whose every rule has expired keeps no tunnel: it cannot come back without a new
        // allowlist, since rules that open later are only sent when they open.
        let filter = &self.filter;
        self.peers.retain(|p| filter.allows_any(p.tables, now));
        cut
    }

    /// Handles one packet read from the TUN device: filter, then encrypt to its peer.
    pub fn handle_tun(&mut self, pkt: &[u8], now: Now, sink: &mut impl Sink) {
        if let Err(d) = self.egress(pkt, now, sink) {
            self.report(Direction::Egress, d, sink);
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
        if let Err(d) = self.ingress(from, datagram, now, sink) {
            self.report(Direction::Ingress, d, sink);
        }
    }

    /// Runs timers: WireGuard handshakes and keepalives, flow expiry, and rule windows that open
    /// or close. Call it a few times a second.
    pub fn tick(&mut self, now: Now, sink: &mut impl Sink) {
        self.wg.tick(now.instant);
        let buf = &mut self.buf;
        self.peers.for_each_mut(|p| p.tunnel.tick(buf, sink));
        self.filter.expire(now);
        if self.filter.window_passed(now) {
            self.revalidate(now);
            self.epoch += 1;
        }
    }

    fn egress(&mut self, pkt: &[u8], now: Now, sink: &mut impl Sink) -> Result<(), Dropped> {
        let me = self.filter.allowlist().map(|l| l.address);
        let me = me.ok_or(Dropped::from(DropReason::NoAllowlist))?;
        let p = classify(pkt)?;
        let key = FlowKey::egress(&p);
        if p.src != me {
            return Err(Dropped::from(DropReason::WrongSource).key(key));
        }
        let peers = &mut self.peers;
        let peer = peers.by_address(p.dst).and_then(|id| peers.get_mut(id));
        let peer = peer.ok_or(Dropped::from(DropReason::NotAPeer).key(key))?;
        admit(&mut self.filter, peer, &p, true, now, sink)?;
        let why = match peer.tunnel.encapsulate(pkt, &mut self.buf) {
            Encapsulated::Send(to, out) => {
                peer.sent.add(pkt.len());
                sink.to_network(to, out);
                return Ok(());
            }
            Encapsulated::Queued => {
                peer.sent.add(pkt.len());
                return Ok(());
            }
            Encapsulated::NoEndpoint => Dropped::from(DropReason::NoEndpoint).key(key),
            Encapsulated::Failed => Dropped::from(DropReason::Tunnel),
        };
        Err(why.peer(peer.id))
    }

    fn ingress(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Now,
        sink: &mut impl Sink,
    ) -> Result<(), Dropped> {
        let screened = screened(self.wg.screen(from, datagram, now.instant, sink));
        let Some((sent_by, kind)) = screened.map_err(Dropped::from)? else {
            return Ok(()); // answered with a cookie
        };
        self.deliver(from, datagram, sent_by, kind, now, sink)
    }

    /// Handles a datagram the node's [`Front`](crate::Front) has screened and routed to this
    /// shard: decrypt, then filter, as [`Node::handle_udp`] does after its own screening.
    pub fn handle_screened(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        ticket: Ticket,
        now: Now,
        sink: &mut impl Sink,
    ) {
        if let Err(d) = self.deliver(from, datagram, ticket.sent_by, ticket.kind, now, sink) {
            self.report(Direction::Ingress, d, sink);
        }
    }

    /// The ingress path after the rate limiter: find the peer, decrypt, filter.
    fn deliver(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        sent_by: SentBy,
        kind: Kind,
        now: Now,
        sink: &mut impl Sink,
    ) -> Result<(), Dropped> {
        let peers = &mut self.peers;
        let id = match sent_by {
            SentBy::Key(key) => peers.by_key(&key),
            SentBy::Tunnel(index) => peers.by_tunnel(index),
            SentBy::Unknown => None,
        };
        let peer = id.and_then(|id| peers.get_mut(id));
        let peer = peer.ok_or(Dropped::from(DropReason::UnknownPeer))?;
        // Decrypted in place, and filtered where it lies.
        let buf = &mut self.buf;
        let (len, src) = match peer.tunnel.decapsulate(from, datagram, kind, buf, sink) {
            Decapsulated::Nothing => return Ok(()),
            Decapsulated::V4 { len, src } => (len, src),
            Decapsulated::V6 { len } => {
                peer.received.add(len);
                return Err(Dropped::from(DropReason::Ipv6).peer(peer.id));
            }
            Decapsulated::Failed => return Err(Dropped::from(DropReason::Tunnel).peer(peer.id)),
        };
        peer.received.add(len);
        let pkt = &buf[..len];
        let id = peer.id;
        let me = self.filter.allowlist().map(|l| l.address);
        let me = me.ok_or(Dropped::from(DropReason::NoAllowlist).peer(id))?;
        let p = classify(pkt).map_err(|d| d.peer(id))?;
        let key = FlowKey::ingress(&p);
        // The receiver decides: the source must be the address of the peer whose key decrypted
        // the packet, never what the sender claims.
        if p.src != peer.address || src != p.src {
            return Err(Dropped::from(DropReason::Spoofed).key(key).peer(id));
        }
        if p.dst != me {
            return Err(Dropped::from(DropReason::WrongDestination)
                .key(key)
                .peer(id));
        }
        admit(&mut self.filter, peer, &p, false, now, sink)?;
        sink.to_tun(pkt);
        Ok(())
    }

    /// Counts a dropped packet and tells the sink.
    fn report(&mut self, direction: Direction, d: Dropped, sink: &mut impl Sink) {
        *self.drops.entry((direction, d.why.reason())).or_default() += 1;
        sink.event(Event::Dropped {
            egress: direction == Direction::Egress,
            reason: &d.why,
            key: d.key,
            peer: d
                .peer
                .and_then(|id| self.peers.get(id))
                .map(|p| p.name.as_str()),
            rule: self.filter.deny_rule(d.why),
        });
    }
}

/// What the rate limiter let through, or why it dropped a datagram; `Ok(None)` when it
/// answered with a cookie instead.
pub(crate) fn screened(s: Screened) -> Result<Option<(SentBy, Kind)>, DropReason> {
    match s {
        Screened::Answered => Ok(None),
        Screened::Invalid => Err(DropReason::Tunnel),
        Screened::Limited => Err(DropReason::HandshakeRateLimited),
        Screened::Message { sent_by, kind } => Ok(Some((sent_by, kind))),
    }
}

/// A dropped packet: why, and what is known of it, until [`Node::report`] counts and reports it.
struct Dropped {
    why: DropReason,
    key: Option<FlowKey>,
    peer: Option<PeerId>,
}

impl From<DropReason> for Dropped {
    fn from(why: DropReason) -> Dropped {
        Dropped {
            why,
            key: None,
            peer: None,
        }
    }
}

impl Dropped {
    fn key(self, key: FlowKey) -> Dropped {
        Dropped {
            key: Some(key),
            ..self
        }
    }

    fn peer(self, peer: PeerId) -> Dropped {
        Dropped {
            peer: Some(peer),
            ..self
        }
    }
}

/// The packet as the filter sees it: IPv4, parsed.
fn classify(pkt: &[u8]) -> Result<Ipv4, Dropped> {
    match packet::classify(pkt) {
        Ok(Packet::V4(p)) => Ok(p),
        Ok(Packet::V6) => Err(Dropped::from(DropReason::Ipv6)),
        Err(m) => Err(Dropped::from(DropReason::Malformed(m))),
    }
}

/// Runs `p` through the filter, between this node and `peer`, and reports a flow it opens.
fn admit(
    filter: &mut Filter,
    peer: &Peer,
    p: &Ipv4,
    egress: bool,
    now: Now,
    sink: &mut impl Sink,
) -> Result<(), Dropped> {
    let admitted = filter.admit(peer.tables, p, egress, now);
    match admitted.map_err(|(why, key)| Dropped::from(why).key(key).peer(peer.id))? {
        Admitted::Tracked => {}
        Admitted::Opened {
            initiator,
            key,
            rule,
        } => {
            sink.event(Event::FlowStarted {
                initiator,
                key,
                peer: &peer.name,
                rule,
            });
        }
    }
    Ok(())
}
