//! NFLOG packets from the log rules, read back as events for the flow log.
//!
//! The kernel sends the head of each logged packet with the rule's prefix, which says the
//! direction. Everything here is parsed defensively: a datagram that does not parse is
//! counted and skipped, never trusted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{Emitable, NetlinkDeserializable};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    Parseable,
};
use netlink_packet_netfilter::nflog::{ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

use crate::PREFIXES;

/// Bytes of each packet the kernel copies: enough for IPv6 and TCP headers.
pub const COPY_RANGE: u32 = 96;

/// A new connection the firewall dropped or would drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Opened by another host towards this one.
    pub inbound: bool,
    /// Let through: the firewall observes, and `enforce` would have dropped it.
    pub observed: bool,
    /// The other host's address.
    pub remote: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// TCP/UDP destination port; ICMP: the type.
    pub port: u16,
}

/// Messages that bind a socket to `group` and ask for packet heads: send each, in order.
pub fn bind(group: u16) -> Vec<Vec<u8>> {
    [
        ConfigNla::Cmd(ConfigCmd::Bind),
        ConfigNla::Mode(ConfigMode::new_packet(COPY_RANGE)),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, nla)| {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = i as u32 + 1;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, group),
                ULogMessage::Config(vec![nla]),
            )),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    })
    .collect()
}

/// The events in one datagram, and how many of its messages did not parse as one.
pub fn parse(datagram: &[u8]) -> (Vec<Event>, usize) {
    let (mut events, mut bad) = (Vec::new(), 0);
    let mut rest = datagram;
    while rest.len() >= 16 {
        let Ok(buf) = NetlinkBuffer::new_checked(rest) else {
            bad += 1;
            break;
        };
        let len = (buf.length() as usize).max(16);
        let aligned = (len + 3) & !3;
        let message = &rest[..len.min(rest.len())];
        rest = &rest[aligned.min(rest.len())..];
        let Ok(header) = NetlinkHeader::parse(&buf) else {
            bad += 1;
            continue;
        };
        if header.message_type < 16 {
            continue; // NLMSG_ERROR (acks of the bind), NLMSG_DONE
        }
        match NetfilterMessage::deserialize(&header, &message[16..])
            .ok()
            .and_then(|m| event(&m))
        {
            Some(e) => events.push(e),
            None => bad += 1,
        }
    }
    (events, bad)
}

fn event(m: &NetfilterMessage) -> Option<Event> {
    let NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)) = &m.inner else {
        return None;
    };
    let (mut prefix, mut payload) = (None, None);
    for n in nlas {
        match n {
            PacketNla::Prefix(p) => prefix = Some(p.to_bytes()),
            PacketNla::Payload(p) => payload = Some(p.as_slice()),
            _ => {}
        }
    }
    let prefix = prefix?;
    let &(inbound, observed, _) = PREFIXES.iter().find(|(_, _, p)| p.as_bytes() == prefix)?;
    let (src, dst, proto, l4) = ip_header(payload?)?;
    let port = match proto {
        6 | 17 => u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
        1 | 58 => u16::from(*l4.first()?),
        _ => 0,
    };
    Some(Event {
        inbound,
        observed,
        remote: if inbound { src } else { dst },
        proto,
        port,
    })
}

/// Source, destination, protocol and the transport header of an IP packet.
fn ip_header(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, &[u8])> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]));
            Some((a(12), a(16), p[9], &p[ihl..]))
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let a = |o: usize| {
                let b: [u8; 16] = p[o..o + 16].try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            };
            // Extension headers are not followed: the next header is reported as it is.
            Some((a(8)?, a(24)?, p[6], &p[40..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::nflog::PacketNla;
    use std::ffi::CString;

    fn datagram(prefix: &str, payload: Vec<u8>) -> Vec<u8> {
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 7),
                ULogMessage::Packet(vec![
                    PacketNla::Prefix(CString::new(prefix).unwrap_or_default()),
                    PacketNla::Payload(payload),
                ]),
            )),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    fn tcp_syn(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend([0x9c, 0x40]);
        p.extend(dport.to_be_bytes());
        p.resize(40, 0);
        p
    }

    #[test]
    fn logged_packets_read_as_events_with_the_remote_end() {
        let mut d = datagram(
            crate::prefix(true, false),
            tcp_syn([198, 18, 0, 4], [198, 18, 0, 3], 5432),
        );
        d.extend(datagram(
            crate::prefix(false, true),
            tcp_syn([198, 18, 0, 4], [198, 18, 0, 3], 22),
        ));
        let (events, bad) = parse(&d);
        assert_eq!(bad, 0);
        assert_eq!(
            events,
            vec![
                Event {
                    inbound: true,
                    observed: false,
                    remote: "198.18.0.4".parse().unwrap(),
                    proto: 6,
                    port: 5432
                },
                Event {
                    inbound: false,
                    observed: true,
                    remote: "198.18.0.3".parse().unwrap(),
                    proto: 6,
                    port: 22
                }
            ]
        );
    }

    #[test]
    fn what_does_not_parse_is_counted_not_trusted() {
        // Another prefix, a truncated header, garbage.
        let mut d = datagram("someone else ", tcp_syn([1, 1, 1, 1], [2, 2, 2, 2], 1));
        d.extend(datagram(crate::prefix(true, false), vec![0x45, 0, 0]));
        let (events, bad) = parse(&d);
        assert!(events.is_empty());
        assert_eq!(bad, 2);
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = parse(&junk); // must not panic
        }
    }
}
