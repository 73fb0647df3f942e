//! Handshake and endpoint state: a fresh node per input (fixed keys, fixed clock) whose peer
//! has a configured endpoint, fed an interleaving the input chooses of arbitrary datagrams from
//! arbitrary source addresses, the real peer's handshake initiations and data sent from
//! addresses the input chooses, replays of the peer's earlier datagrams from other addresses,
//! the node's own output answered by the peer, and clock steps with ticks.
//!
//! Nothing may panic. The oracle: the peer's endpoint (`Node::peers()`) only ever changes in a
//! step that delivered, from that very address, a datagram the peer's tunnel produced and that
//! had not been delivered before (an authenticated message of that peer). Arbitrary bytes and
//! replayed datagrams must never move it.
#![no_main]

mod common;

use std::net::SocketAddr;

use boringtun::noise::TunnResult;
use common::{Clock, ME, Out, PEER, endpoint, fresh, packet};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

fn endpoint_of(node: &bulkhead_dataplane::Node) -> Option<SocketAddr> {
    node.peers()
        .into_iter()
        .find(|p| p.name == "peer")
        .and_then(|p| p.endpoint)
}

fn address(u: &mut Unstructured<'_>) -> SocketAddr {
    let pick: u8 = u.arbitrary().unwrap_or(0);
    match pick % 4 {
        0 => endpoint(),
        1 => SocketAddr::from(([127, 0, 0, 1], 9 + u16::from(pick >> 4))),
        2 => SocketAddr::from(([192, 0, 2, pick >> 2], 51820)),
        _ => {
            let ip: [u8; 4] = u.arbitrary().unwrap_or([0; 4]);
            SocketAddr::from((ip, u.arbitrary::<u16>().unwrap_or(0)))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut clock = Clock::new();
    let (mut node, mut tunn) = fresh(&clock, data.first().is_some_and(|b| b & 1 == 1));
    let mut out = Out::default();
    let mut u = Unstructured::new(data.get(1..).unwrap_or(&[]));
    let mut buf = vec![0u8; 70000];
    // Datagrams the peer produced, and whether each has been delivered.
    let mut sent_by_peer: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut steps = 0;
    while !u.is_empty() && steps < 64 {
        steps += 1;
        let before = endpoint_of(&node);
        // The address of a first delivery of an authentic datagram in this step, if any.
        let mut authentic: Vec<SocketAddr> = Vec::new();
        let op: u8 = u.arbitrary().unwrap_or(0);
        match op % 8 {
            // Arbitrary bytes from an arbitrary address.
            0 | 1 => {
                let from = address(&mut u);
                let n = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 512);
                let mut d = u.bytes(n.min(u.len())).unwrap_or(&[]).to_vec();
                // Often shaped like a WireGuard message, to get past the type check.
                if op % 8 == 1 && d.len() >= 4 {
                    d[0] = 1 + d[0] % 4;
                    d[1..4].fill(0);
                }
                node.handle_udp(from, &d, clock.now(), &mut out);
            }
            // The peer initiates a handshake.
            2 => {
                if let TunnResult::WriteToNetwork(d) =
                    tunn.format_handshake_initiation(&mut buf, true)
                {
                    sent_by_peer.push((d.to_vec(), false));
                }
            }
            // The peer sends a packet (or queues it and initiates).
            3 => {
                let p = packet(&mut u, PEER, ME);
                if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&p, &mut buf) {
                    sent_by_peer.push((d.to_vec(), false));
                }
            }
            // One of the peer's datagrams is delivered from an address: the first time, it is
            // authentic from there; later, a replay.
            4 | 5 => {
                if !sent_by_peer.is_empty() {
                    let i = usize::from(u.arbitrary::<u8>().unwrap_or(0)) % sent_by_peer.len();
                    let from = address(&mut u);
                    let (d, delivered) = &mut sent_by_peer[i];
                    if !*delivered {
                        authentic.push(from);
                        *delivered = true;
                    }
                    let d = d.clone();
                    node.handle_udp(from, &d, clock.now(), &mut out);
                }
            }
            // A tampered copy of one of the peer's datagrams from an address. A flip in a
            // handshake message's mac2 (checked only under load) leaves the message authentic:
            // that is the original delivered, authentic if it is its first delivery.
            6 => {
                if !sent_by_peer.is_empty() {
                    let i = usize::from(u.arbitrary::<u8>().unwrap_or(0)) % sent_by_peer.len();
                    let from = address(&mut u);
                    let (orig, delivered) = &mut sent_by_peer[i];
                    let mut d = orig.clone();
                    let at = usize::from(u.arbitrary::<u16>().unwrap_or(0)) % d.len().max(1);
                    if let Some(b) = d.get_mut(at) {
                        *b ^= u.arbitrary::<u8>().unwrap_or(0).max(1);
                    }
                    let mac2 = match (d.first(), d.len()) {
                        (Some(1), 148) => 132..148,
                        (Some(2), 92) => 76..92,
                        _ => 0..0,
                    };
                    if mac2.contains(&at) && !*delivered {
                        authentic.push(from);
                        *delivered = true;
                    }
                    node.handle_udp(from, &d, clock.now(), &mut out);
                }
            }
            // Time passes; timers run; the peer's timers too.
            _ => {
                clock.advance(u.arbitrary::<u16>().unwrap_or(0).into());
                node.tick(clock.now(), &mut out);
                if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut buf) {
                    sent_by_peer.push((d.to_vec(), false));
                }
            }
        }
        let after = endpoint_of(&node);
        if after != before {
            let to = after.unwrap_or_else(|| panic!("endpoint forgotten: was {before:?}"));
            assert!(
                authentic.contains(&to),
                "endpoint moved from {before:?} to {to:?} without an authenticated message \
                 of the peer from there (authentic this step: {authentic:?})"
            );
        }
        // What the node sent to the peer reaches the peer (wherever the node sent it); the
        // peer's answers become datagrams the input may deliver.
        for (_, d) in std::mem::take(&mut out.net) {
            let mut input = d;
            while let TunnResult::WriteToNetwork(r) = tunn.decapsulate(None, &input, &mut buf) {
                sent_by_peer.push((r.to_vec(), false));
                input = Vec::new();
            }
        }
        out.tun.clear();
        out.opened.clear();
        if sent_by_peer.len() > 256 {
            sent_by_peer.drain(..128);
        }
    }
});
