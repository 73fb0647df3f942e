//! Reading IP packets just far enough to filter them. Nothing here trusts its input: every length
//! is checked before it is used, and anything that does not parse is refused with a reason.

use std::net::Ipv4Addr;

use bulkhead_allowlist::proto;

/// Why a packet could not be classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Shorter than the headers it claims.
    Truncated,
    /// IP version other than 4 or 6.
    BadVersion,
    /// IPv4 header length below 20 bytes or beyond the packet.
    BadHeaderLength,
    /// IPv4 total length disagrees with the packet.
    BadTotalLength,
    /// A fragment after the first: it carries no ports to filter on.
    Fragment,
}

impl Malformed {
    /// A short, stable name for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::Truncated => "truncated",
            Malformed::BadVersion => "bad_version",
            Malformed::BadHeaderLength => "bad_header_length",
            Malformed::BadTotalLength => "bad_total_length",
            Malformed::Fragment => "fragment",
        }
    }
}

/// The fields of an IPv4 packet the filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4 {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol number.
    pub proto: u8,
    /// TCP/UDP source port; ICMP echo identifier; else 0.
    pub src_port: u16,
    /// TCP/UDP destination port; ICMP echo identifier; else 0.
    pub dst_port: u16,
    /// TCP flags; else 0.
    pub tcp_flags: u8,
    /// ICMP type; else 0.
    pub icmp_type: u8,
}

/// TCP flag bits.
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// ICMP types the connection tracker knows.
pub mod icmp {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
}

/// A classified packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    /// IPv4, with the fields the filter needs.
    V4(Ipv4),
    /// IPv6: denied, since no rule covers IPv6 yet.
    V6,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Classifies a raw IP packet, as read from a TUN device or decrypted from a tunnel.
pub fn classify(b: &[u8]) -> Result<Packet, Malformed> {
    let first = *b.first().ok_or(Malformed::Truncated)?;
    match first >> 4 {
        4 => {}
        6 => {
            return if b.len() >= 40 {
                Ok(Packet::V6)
            } else {
                Err(Malformed::Truncated)
            };
        }
        _ => return Err(Malformed::BadVersion),
    }
    if b.len() < 20 {
        return Err(Malformed::Truncated);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || ihl > b.len() {
        return Err(Malformed::BadHeaderLength);
    }
    let total = usize::from(be16(b, 2).ok_or(Malformed::Truncated)?);
    if total < ihl || total > b.len() {
        return Err(Malformed::BadTotalLength);
    }
    let flags_frag = be16(b, 6).ok_or(Malformed::Truncated)?;
    if flags_frag & 0x1fff != 0 {
        return Err(Malformed::Fragment);
    }
    let proto = b[9];
    let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
    let l4 = &b[ihl..total];
    let mut p = Ipv4 {
        src,
        dst,
        proto,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
    };
    match proto {
        proto::TCP => {
            if l4.len() < 20 || usize::from(l4[12] >> 4) * 4 < 20 {
                return Err(Malformed::Truncated);
            }
            p.src_port = be16(l4, 0).ok_or(Malformed::Truncated)?;
            p.dst_port = be16(l4, 2).ok_or(Malformed::Truncated)?;
            p.tcp_flags = l4[13];
        }
        proto::UDP => {
            if l4.len() < 8 {
                return Err(Malformed::Truncated);
            }
            p.src_port = be16(l4, 0).ok_or(Malformed::Truncated)?;
            p.dst_port = be16(l4, 2).ok_or(Malformed::Truncated)?;
        }
        proto::ICMP => {
            if l4.len() < 8 {
                return Err(Malformed::Truncated);
            }
            p.icmp_type = l4[0];
            if matches!(p.icmp_type, icmp::ECHO_REQUEST | icmp::ECHO_REPLY) {
                let id = be16(l4, 4).ok_or(Malformed::Truncated)?;
                p.src_port = id;
                p.dst_port = id;
            }
        }
        _ => {}
    }
    Ok(Packet::V4(p))
}

/// Building packets for tests, fuzzing and benchmarks.
pub mod build {
    use std::net::Ipv4Addr;

    use bulkhead_allowlist::proto;

    fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 packet around `l4`.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    /// A TCP segment with `flags` and no payload (checksum left zero).
    pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        ipv4(src, dst, proto::TCP, &t)
    }

    /// A UDP datagram with `payload` (checksum left zero).
    pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        ipv4(src, dst, proto::UDP, &u)
    }

    /// An ICMP echo request (type 8) or reply (type 0).
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16, seq: u16) -> Vec<u8> {
        let mut i = vec![0u8; 8];
        i[0] = kind;
        i[4..6].copy_from_slice(&id.to_be_bytes());
        i[6..8].copy_from_slice(&seq.to_be_bytes());
        let c = checksum(&i);
        i[2..4].copy_from_slice(&c.to_be_bytes());
        ipv4(src, dst, proto::ICMP, &i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn tcp_udp_icmp() {
        let Ok(Packet::V4(p)) = classify(&build::tcp(A, B, 40000, 22, tcp::SYN)) else {
            panic!("tcp")
        };
        assert_eq!((p.src, p.dst, p.proto), (A, B, proto::TCP));
        assert_eq!((p.src_port, p.dst_port, p.tcp_flags), (40000, 22, tcp::SYN));
        let Ok(Packet::V4(p)) = classify(&build::udp(A, B, 5353, 53, b"q")) else {
            panic!("udp")
        };
        assert_eq!((p.proto, p.dst_port), (proto::UDP, 53));
        let Ok(Packet::V4(p)) = classify(&build::icmp_echo(A, B, icmp::ECHO_REQUEST, 7, 1)) else {
            panic!("icmp")
        };
        assert_eq!((p.proto, p.icmp_type, p.src_port), (proto::ICMP, 8, 7));
    }

    #[test]
    fn malformed_packets_are_refused_with_a_reason() {
        let good = build::tcp(A, B, 1, 2, tcp::SYN);
        assert_eq!(classify(&[]), Err(Malformed::Truncated));
        assert_eq!(classify(&good[..19]), Err(Malformed::Truncated));
        assert_eq!(classify(&good[..30]), Err(Malformed::BadTotalLength));
        let mut v = good.clone();
        v[0] = 0x55;
        assert_eq!(classify(&v), Err(Malformed::BadVersion));
        let mut v = good.clone();
        v[0] = 0x44;
        assert_eq!(classify(&v), Err(Malformed::BadHeaderLength));
        let mut v = good.clone();
        v[0] = 0x4f; // 60-byte header in a 40-byte packet
        assert_eq!(classify(&v), Err(Malformed::BadHeaderLength));
        let mut v = good.clone();
        v[7] = 1; // fragment offset 8
        assert_eq!(classify(&v), Err(Malformed::Fragment));
        let short_tcp = build::ipv4(A, B, proto::TCP, &[0u8; 10]);
        assert_eq!(classify(&short_tcp), Err(Malformed::Truncated));
        let mut bad_offset = good.clone();
        bad_offset[20 + 12] = 2 << 4;
        assert_eq!(classify(&bad_offset), Err(Malformed::Truncated));
        assert_eq!(classify(&[0x60; 39]), Err(Malformed::Truncated));
        assert_eq!(classify(&[0x60; 40]), Ok(Packet::V6));
    }

    #[test]
    fn trailing_bytes_beyond_total_length_are_ignored() {
        let mut v = build::udp(A, B, 1, 2, b"x");
        v.extend_from_slice(&[0xff; 7]);
        assert!(matches!(classify(&v), Ok(Packet::V4(_))));
    }

    #[test]
    fn other_protocols_have_no_ports() {
        let Ok(Packet::V4(p)) = classify(&build::ipv4(A, B, 47, &[1, 2, 3, 4])) else {
            panic!("gre")
        };
        assert_eq!((p.proto, p.src_port, p.dst_port), (47, 0, 0));
    }

    #[test]
    fn every_prefix_of_a_packet_is_handled_without_panic() {
        for pkt in [
            build::tcp(A, B, 1, 2, tcp::SYN),
            build::udp(A, B, 1, 2, b"abc"),
            build::icmp_echo(A, B, 8, 1, 1),
        ] {
            for n in 0..=pkt.len() {
                let _ = classify(&pkt[..n]);
            }
        }
    }
}
