//! Egress: arbitrary and structured packets read from the TUN device, one by one and as bursts
//! of segments cut from a GSO super-packet the way the daemon's TUN reader hands them over
//! (`tun_rs::recv_multiple` segments a TSO/USO super-packet before `Node::handle_tun` sees
//! anything, so the core takes segments: each with its own IPv4 header, identification and
//! total length, and for TCP a sequence number advanced by the segment size). The peer may also
//! open flows inbound, whose replies then leave the node. A fresh node per input, fixed clock.
//!
//! Nothing may panic. Every datagram sent to the peer is decrypted with the peer's tunnel, and
//! its inner packet must be IPv4 from the node to the peer that the allowlist allows outbound
//! (`decide_outbound` for its protocol and port at that time), or belong to a flow opened
//! earlier in this input by a packet the allowlist allowed (either way).
#![no_main]

mod common;

use boringtun::noise::TunnResult;
use common::{Clock, ME, OTHER, Oracle, Out, PEER, endpoint, fresh, packet};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

/// Cuts a super-packet (an IPv4 header, a TCP or UDP header, a payload) into segments of at most
/// `mss` payload bytes, as GSO segmentation does. Anything else is handed over whole.
fn segments(sp: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let whole = || vec![sp.to_vec()];
    if sp.len() < 20 || sp[0] >> 4 != 4 || mss == 0 {
        return whole();
    }
    let ihl = usize::from(sp[0] & 0x0f) * 4;
    let l4 = match sp[9] {
        6 if sp.len() >= ihl + 20 => usize::from(sp[ihl + 12] >> 4) * 4,
        17 => 8,
        _ => return whole(),
    };
    let hdr = ihl + l4;
    if ihl < 20 || sp.len() < hdr {
        return whole();
    }
    let payload = &sp[hdr..];
    let id = u16::from_be_bytes([sp[4], sp[5]]);
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(mss).enumerate().take(64) {
        let mut s = sp[..hdr].to_vec();
        s.extend_from_slice(chunk);
        let total = s.len().min(65535) as u16;
        s[2..4].copy_from_slice(&total.to_be_bytes());
        s[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        if sp[9] == 6 {
            let seq = u32::from_be_bytes([sp[ihl + 4], sp[ihl + 5], sp[ihl + 6], sp[ihl + 7]]);
            let seq = seq.wrapping_add((i * mss) as u32);
            s[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            // FIN and PSH only on the last segment.
            if (i + 1) * mss < payload.len() {
                s[ihl + 13] &= !0x09;
            }
        } else {
            let len = (8 + chunk.len()) as u16;
            s[ihl + 4..ihl + 6].copy_from_slice(&len.to_be_bytes());
        }
        out.push(s);
    }
    if out.is_empty() {
        return whole();
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut clock = Clock::new();
    let (mut node, mut tunn) = fresh(&clock, data.first().is_none_or(|b| b & 1 == 0));
    let mut oracle = Oracle::default();
    let mut out = Out::default();
    let mut u = Unstructured::new(data.get(1..).unwrap_or(&[]));
    let mut buf = vec![0u8; 70000];
    while !u.is_empty() {
        let op: u8 = u.arbitrary().unwrap_or(0);
        match op % 7 {
            // Raw bytes as one TUN read.
            0 => {
                let n = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 2048);
                let p = u.bytes(n.min(u.len())).unwrap_or(&[]);
                node.handle_tun(p, clock.now(), &mut out);
            }
            // A structured packet from the node to the peer (or to the other peer).
            1 | 2 => {
                let dst = if op % 7 == 2 { OTHER } else { PEER };
                let p = packet(&mut u, ME, dst);
                node.handle_tun(&p, clock.now(), &mut out);
            }
            // A GSO super-packet, segmented, as one burst.
            3 => {
                let mss = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 1500) + 1;
                let mut sp = packet(&mut u, ME, PEER);
                let extra = usize::from(u.arbitrary::<u16>().unwrap_or(0));
                sp.resize(sp.len() + extra.min(65000), 0xab);
                if sp.len() >= 4 {
                    let total = sp.len().min(65535) as u16;
                    sp[2..4].copy_from_slice(&total.to_be_bytes());
                }
                for s in segments(&sp, mss) {
                    node.handle_tun(&s, clock.now(), &mut out);
                }
            }
            // The peer sends something in (opening flows inbound, or answering).
            4 => {
                let p = packet(&mut u, PEER, ME);
                if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&p, &mut buf) {
                    let d = d.to_vec();
                    node.handle_udp(endpoint(), &d, clock.now(), &mut out);
                }
            }
            // Time passes; timers run.
            5 => {
                clock.advance(u.arbitrary::<u16>().unwrap_or(0).into());
                node.tick(clock.now(), &mut out);
            }
            // Raw bytes with this node's source and the peer's destination patched in.
            _ => {
                let n = usize::from(u.arbitrary::<u16>().unwrap_or(0) % 2048);
                let mut p = u.bytes(n.min(u.len())).unwrap_or(&[]).to_vec();
                if p.len() >= 20 {
                    p[0] = 0x40 | (p[0] & 0x0f);
                    p[12..16].copy_from_slice(&ME.octets());
                    p[16..20].copy_from_slice(&PEER.octets());
                }
                node.handle_tun(&p, clock.now(), &mut out);
            }
        }
        oracle.check(&mut node, &mut out, &mut tunn, clock.now());
    }
});
