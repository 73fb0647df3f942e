//! WireGuard, through boringtun: the node's own side ([`WireGuard`]: its static key, and the
//! handshake rate limiting) and one session per peer ([`Tunnel`]: handshakes, encryption and
//! decryption, timers). No filtering happens here; the node filters the packets before they go
//! in and after they come out.
//!
//! Every datagram meets the node's rate limiter once, in [`WireGuard::screen`]: past
//! [`HANDSHAKE_RATE_LIMIT`] handshake messages a second (under load) a handshake needs a cookie
//! (mac2) or is answered with one, and one with a valid cookie is then limited per source
//! address (`ratelimit.rs`). The tunnels' own boringtun limiter checks mac1 only and never
//! limits, so no message is charged twice. A peer's endpoint moves only to the address of a
//! message that authenticated as that peer: a handshake boringtun completed, or data it
//! decrypted; never a cookie reply, which anyone who knows a public key can make.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet as WgPacket, Tunn, TunnResult};

use crate::ratelimit::Sources;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::Sink;

/// Handshakes per second before the node answers with cookies (WireGuard's DoS defence).
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Handshake messages a second past which the node drops them unread, without even the mac1
/// check or a cookie: a flood at line rate must not cost more than the socket can drain, or
/// it drowns the data packets that share the socket. Kernel WireGuard does the same when its
/// handshake queue is full. Established sessions carry on; a handshake during such a flood
/// waits for it to pass.
pub(crate) const HANDSHAKE_SHED: u64 = 10 * HANDSHAKE_RATE_LIMIT;

/// The message type of a cookie reply: what a rate limiter answers instead of a handshake.
const COOKIE_REPLY: u8 = 3;

/// Tunnel indexes fill the upper 24 bits of WireGuard receiver indexes; boringtun keeps the
/// lower 8 for its sessions.
pub(crate) const TUNNEL_INDEX_BITS: u32 = 0x00ff_ffff;

/// The node's side of WireGuard.
pub(crate) struct WireGuard {
    secret: StaticSecret,
    public: PublicKey,
    /// The node's limiter: cookies under load.
    rate_limiter: Arc<RateLimiter>,
    /// The tunnels' limiter: checks mac1, never limits (the node's has screened the datagram).
    unlimited: Arc<RateLimiter>,
    /// Handshake messages with a valid mac1 this second, as the node's limiter counts them.
    handshakes: u64,
    /// Datagrams that look like handshake messages this second, valid or not.
    arrivals: u64,
    sources: Sources,
    last_rate_reset: Option<Instant>,
}

/// What kind of WireGuard message a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A handshake initiation.
    Init,
    /// A handshake response.
    Response,
    /// A cookie reply: proves nothing about who sent it.
    CookieReply,
    /// Transport data (or a keepalive).
    Data,
}

impl Kind {
    fn handshake(self) -> bool {
        matches!(self, Kind::Init | Kind::Response)
    }
}

/// Which tunnel a datagram that passed the rate limiter belongs to, as far as it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SentBy {
    /// A handshake initiation from this static key.
    Key([u8; 32]),
    /// A message for this tunnel index.
    Tunnel(u32),
    /// A handshake initiation that does not decrypt with this node's key.
    Unknown,
}

/// What the rate limiter made of a datagram.
pub(crate) enum Screened {
    /// Answered with a cookie (under load): nothing else to do.
    Answered,
    /// Not WireGuard, or not valid.
    Invalid,
    /// A handshake, under load, from a source that has had its share this second.
    Limited,
    /// A message for one of the tunnels.
    Message {
        /// Whose.
        sent_by: SentBy,
        /// What it is.
        kind: Kind,
    },
}

impl WireGuard {
    pub(crate) fn new(private_key: [u8; 32]) -> WireGuard {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret);
        WireGuard {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
            handshakes: 0,
            arrivals: 0,
            sources: Sources::default(),
            secret,
            public,
            last_rate_reset: None,
        }
    }

    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Passes a datagram through the rate limiters: under load, a handshake without a valid
    /// cookie is answered with one, and one with a cookie is limited per source address. Says
    /// which tunnel the datagram is for.
    pub(crate) fn screen(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        sink: &mut impl Sink,
    ) -> Screened {
        if looks_like_handshake(datagram) {
            self.arrivals += 1;
            if self.arrivals > HANDSHAKE_SHED {
                return Screened::Limited;
            }
        }
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(reply)) => {
                sink.to_network(from, reply);
                return Screened::Answered;
            }
            Err(_) => return Screened::Invalid,
        };
        let kind = match packet {
            WgPacket::HandshakeInit(_) => Kind::Init,
            WgPacket::HandshakeResponse(_) => Kind::Response,
            WgPacket::PacketCookieReply(_) => Kind::CookieReply,
            WgPacket::PacketData(_) => Kind::Data,
        };
        if kind.handshake() {
            // Counted as the limiter counted it: past the limit, it has checked the cookie,
            // so the source address is the sender's own.
            self.handshakes += 1;
            if self.handshakes > HANDSHAKE_RATE_LIMIT && !self.sources.allow(from.ip(), now) {
                return Screened::Limited;
            }
        }
        let sent_by = match packet {
            WgPacket::HandshakeInit(ref init) => {
                match parse_handshake_anon(&self.secret, &self.public, init) {
                    Ok(h) => SentBy::Key(h.peer_static_public),
                    Err(_) => SentBy::Unknown,
                }
            }
            WgPacket::HandshakeResponse(r) => SentBy::Tunnel(r.receiver_idx >> 8),
            WgPacket::PacketCookieReply(c) => SentBy::Tunnel(c.receiver_idx >> 8),
            WgPacket::PacketData(d) => SentBy::Tunnel(d.receiver_idx >> 8),
        };
        Screened::Message { sent_by, kind }
    }

    /// Lets the rate limiter count afresh once a second, and forgets idle sources.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self
            .last_rate_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.rate_limiter.reset_count();
            self.handshakes = 0;
            self.arrivals = 0;
            self.sources.forget_idle(now);
            self.last_rate_reset = Some(now);
        }
    }
}

/// Whether a datagram has the type and size of a handshake initiation or response.
fn looks_like_handshake(d: &[u8]) -> bool {
    matches!((d.len(), d.first()), (148, Some(1)) | (92, Some(2)))
}

/// One peer's WireGuard session, and where to send its datagrams.
pub(crate) struct Tunnel {
    tunn: Tunn,
    peer_key: [u8; 32],
    /// Packets may wait in boringtun's queue for a handshake under way.
    queued: bool,
    index: u32,
    endpoint: Option<SocketAddr>,
    /// Start a handshake at the next tick: the peer is new, or its endpoint is. A node that
    /// restarted thus tells its peers at once, instead of waiting for their session to time
    /// out before they notice (WireGuard's ~15 s).
    greet: bool,
    handshakes: u64,
}

/// What encrypting a packet came to.
pub(crate) enum Encapsulated<'a> {
    /// Send this datagram to this address.
    Send(SocketAddr, &'a [u8]),
    /// Queued until the handshake under way completes.
    Queued,
    /// The peer's endpoint is unknown: nothing can be sent to it.
    NoEndpoint,
    /// boringtun refused it.
    Failed,
}

/// What decrypting a datagram came to. Datagrams boringtun answers (handshakes, cookies) and
/// packets a handshake released are already in the sink.
pub(crate) enum Decapsulated {
    /// Nothing for the TUN device.
    Nothing,
    /// An IPv4 packet of this length, at the start of the buffer, from this inner source.
    V4 {
        /// Its length.
        len: usize,
        /// Its source address, as boringtun read it.
        src: Ipv4Addr,
    },
    /// An IPv6 packet of this length.
    V6 {
        /// Its length.
        len: usize,
    },
    /// Not a valid message for this session.
    Failed,
}

impl Tunnel {
    /// A session with `peer_key` under `index` (only its low 24 bits are used).
    pub(crate) fn new(
        wg: &WireGuard,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        keepalive: Option<u16>,
        index: u32,
    ) -> Tunnel {
        let index = index & TUNNEL_INDEX_BITS;
        Tunnel {
            tunn: Self::tunn(wg, peer_key, keepalive, index),
            peer_key,
            queued: false,
            index,
            endpoint,
            greet: true,
            handshakes: 0,
        }
    }

    fn tunn(wg: &WireGuard, peer_key: [u8; 32], keepalive: Option<u16>, index: u32) -> Tunn {
        Tunn::new(
            wg.secret.clone(),
            PublicKey::from(peer_key),
            None,
            keepalive,
            index,
            Some(wg.unlimited.clone()),
        )
    }

    /// Throws away the packets waiting in boringtun's queue for a handshake, if any may be:
    /// they were let through under rules that have just cut their flows. boringtun cannot
    /// empty its queue, so the session starts afresh (there is none yet anyway while packets
    /// wait) and greets the peer again.
    pub(crate) fn discard_queued(&mut self, wg: &WireGuard) {
        if self.queued {
            let keepalive = self.tunn.persistent_keepalive();
            self.tunn = Self::tunn(wg, self.peer_key, keepalive, self.index);
            self.queued = false;
            self.greet = true;
        }
    }

    /// The tunnel index: the upper 24 bits of the receiver index of every message for it.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// The endpoint the controller gave; `None` keeps the one learned from the peer.
    pub(crate) fn set_endpoint(&mut self, endpoint: Option<SocketAddr>) {
        self.greet |= endpoint.is_some() && endpoint != self.endpoint;
        self.endpoint = endpoint.or(self.endpoint);
    }

    /// Handshakes completed: initiations of the peer answered, responses to ours.
    pub(crate) fn handshakes(&self) -> u64 {
        self.handshakes
    }

    /// Time since the last handshake, and payload bytes sent and received.
    pub(crate) fn stats(&self) -> (Option<Duration>, u64, u64) {
        let (since, tx, rx, _, _) = self.tunn.stats();
        (since, tx as u64, rx as u64)
    }

    pub(crate) fn keepalive(&self) -> Option<u16> {
        self.tunn.persistent_keepalive()
    }

    /// Encrypts `packet` into `buf`.
    pub(crate) fn encapsulate<'a>(&mut self, packet: &[u8], buf: &'a mut [u8]) -> Encapsulated<'a> {
        let Some(to) = self.endpoint else {
            return Encapsulated::NoEndpoint;
        };
        match self.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(out) => {
                // An initiation instead of the packet: boringtun queued it for the handshake.
                self.queued |= out.first() == Some(&1);
                Encapsulated::Send(to, out)
            }
            TunnResult::Err(_) => Encapsulated::Failed,
            _ => {
                self.queued = true;
                Encapsulated::Queued
            }
        }
    }

    /// Decrypts a datagram of `kind` from `from` into `buf`. A message that authenticates as
    /// the peer (a handshake boringtun completed, data it decrypted) makes `from` the
    /// endpoint; nothing else moves it.
    pub(crate) fn decapsulate(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        kind: Kind,
        buf: &mut [u8],
        sink: &mut impl Sink,
    ) -> Decapsulated {
        let ip: IpAddr = from.ip();
        match self.tunn.decapsulate(Some(ip), datagram, buf) {
            TunnResult::WriteToNetwork(out) => {
                // A cookie reply answers a message that was not checked: it proves nothing.
                // (The tunnel's limiter never limits; this is the second lock.)
                let completed = kind.handshake() && out.first() != Some(&COOKIE_REPLY);
                sink.to_network(from, out);
                if completed {
                    self.endpoint = Some(from);
                    self.handshakes += 1;
                    self.queued = false;
                    // A completed handshake releases packets queued while it was under way.
                    while let TunnResult::WriteToNetwork(out) =
                        self.tunn.decapsulate(None, &[], buf)
                    {
                        sink.to_network(from, out);
                    }
                }
                Decapsulated::Nothing
            }
            TunnResult::WriteToTunnelV4(out, src) => {
                self.endpoint = Some(from);
                Decapsulated::V4 {
                    len: out.len(),
                    src,
                }
            }
            TunnResult::WriteToTunnelV6(out, _) => Decapsulated::V6 { len: out.len() },
            // A cookie reply boringtun took (it decrypts with the peer's public key and a mac1
            // anyone on the path saw): not the peer speaking. A keepalive or a handshake is.
            TunnResult::Done if kind == Kind::CookieReply => Decapsulated::Nothing,
            TunnResult::Done => {
                self.endpoint = Some(from);
                self.handshakes += u64::from(kind.handshake());
                Decapsulated::Nothing
            }
            TunnResult::Err(_) => Decapsulated::Failed,
        }
    }

    /// Runs the session's timers: the greeting handshake, handshakes and keepalives due.
    pub(crate) fn tick(&mut self, buf: &mut [u8], sink: &mut impl Sink) {
        if self.greet
            && let Some(to) = self.endpoint
        {
            self.greet = false;
            if let TunnResult::WriteToNetwork(out) =
                self.tunn.format_handshake_initiation(buf, false)
            {
                sink.to_network(to, out);
            }
        }
        if let TunnResult::WriteToNetwork(out) = self.tunn.update_timers(buf)
            && let Some(to) = self.endpoint
        {
            sink.to_network(to, out);
        }
    }
}
