//! Ingress decapsulation and filtering, from a peer holding a valid key: a fresh node per input
//! (same keys, same configuration, a fixed clock), a real handshake, then a sequence the input
//! chooses of arbitrary datagrams, inner packets (arbitrary or structured TCP/UDP/ICMP) sent
//! through the peer's tunnel, and clock steps with ticks.
//!
//! Nothing may panic. Every packet written to the TUN device must be IPv4 from the peer's own
//! address to the node's, and the allowlist itself must allow it: `decide_inbound` for the peer
//! and its protocol and port at that time, or it belongs to a flow opened earlier in this input
//! by a packet the allowlist allowed. Every flow the node reports as opened must be allowed.
#![no_main]

mod common;

use boringtun::noise::TunnResult;
use common::{Clock, ME, Oracle, Out, PEER, endpoint, fresh, packet};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut clock = Clock::new();
    let (mut node, mut tunn) = fresh(&clock, true);
    let mut oracle = Oracle::default();
    let mut out = Out::default();
    let mut u = Unstructured::new(data);
    let mut buf = vec![0u8; 70000];
    while !u.is_empty() {
        let op: u8 = u.arbitrary().unwrap_or(0);
        match op % 6 {
            // Arbitrary bytes as a datagram from the peer's endpoint.
            0 => {
                let n = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 2048);
                let d = u.bytes(n.min(u.len())).unwrap_or(&[]);
                node.handle_udp(endpoint(), d, clock.now(), &mut out);
            }
            // A structured or raw inner packet through the valid tunnel.
            1..=3 => {
                let p = if op % 6 == 3 {
                    // Source and destination from the input now and then.
                    let src = if u.arbitrary().unwrap_or(true) {
                        PEER
                    } else {
                        u.arbitrary::<[u8; 4]>().unwrap_or([0; 4]).into()
                    };
                    let dst = if u.arbitrary().unwrap_or(true) {
                        ME
                    } else {
                        u.arbitrary::<[u8; 4]>().unwrap_or([0; 4]).into()
                    };
                    packet(&mut u, src, dst)
                } else {
                    packet(&mut u, PEER, ME)
                };
                if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&p, &mut buf) {
                    let d = d.to_vec();
                    node.handle_udp(endpoint(), &d, clock.now(), &mut out);
                }
            }
            // Time passes; timers run.
            4 => {
                clock.advance(u.arbitrary::<u16>().unwrap_or(0).into());
                node.tick(clock.now(), &mut out);
            }
            // The whole rest as one inner packet (the original target's case).
            _ => {
                let rest = u.bytes(u.len()).unwrap_or(&[]).to_vec();
                if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&rest, &mut buf) {
                    let d = d.to_vec();
                    node.handle_udp(endpoint(), &d, clock.now(), &mut out);
                }
            }
        }
        oracle.check(&mut node, &mut out, &mut tunn, clock.now());
    }
});
