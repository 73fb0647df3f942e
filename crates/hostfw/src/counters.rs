//! The firewall's counters, read back from the kernel: the `counter` of each counted rule
//! (every `allow` entry, and the last rule of each chain: `default deny` in `enforce`,
//! `would deny` in `observe`), by chain and comment. Exact, unlike the rate-limited log.

use netlink_packet_core::Emitable;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    Parseable,
};
use netlink_packet_netfilter::nftables::{
    ExpressionAttribute, Expressions, ListAttribute, NfTablesMessage, RuleAttribute, RuleMessage,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

/// One counted rule's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// `input` or `output`.
    pub chain: String,
    /// The rule's comment: an `allow` entry's name, `default deny` or `would deny`.
    pub comment: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// A request for every rule of `table` (family `inet`), answered by a multi-part dump that
/// ends with `NLMSG_DONE`.
pub fn dump_request(table: &str, seq: u32) -> Vec<u8> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(table.into())],
        }),
    ));
    m.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    m.header.sequence_number = seq;
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.emit(&mut buf);
    buf
}

/// The counted rules in one datagram of a dump, and whether it held the dump's end.
pub fn parse_dump(datagram: &[u8]) -> (Vec<Counted>, bool) {
    let (mut out, mut done) = (Vec::new(), false);
    let mut rest = datagram;
    while rest.len() >= 16 {
        let Ok(buf) = NetlinkBuffer::new_checked(rest) else {
            break;
        };
        let len = (buf.length() as usize).clamp(16, rest.len());
        let Ok(header) = NetlinkHeader::parse(&buf) else {
            break;
        };
        let body = &rest[16..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        match header.message_type {
            3 => done = true, // NLMSG_DONE
            t if t < 16 => {}
            _ => {
                if let Ok(m) = NetfilterMessage::deserialize(&header, body)
                    && let Some(c) = counted(&m)
                {
                    out.push(c);
                }
            }
        }
    }
    (out, done)
}

fn counted(m: &NetfilterMessage) -> Option<Counted> {
    let NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(r)) = &m.inner else {
        return None;
    };
    let (mut chain, mut comment, mut counter) = (None, None, None);
    for a in &r.attributes {
        match a {
            RuleAttribute::Chain(c) => chain = Some(c.clone()),
            RuleAttribute::UserData(u) => comment = comment_of(u),
            RuleAttribute::Expressions(list) => counter = list.iter().find_map(counter_of),
            _ => {}
        }
    }
    let (packets, bytes) = counter?;
    Some(Counted {
        chain: chain?,
        comment: comment?,
        packets,
        bytes,
    })
}

/// The comment TLV (type 0) of nft's rule userdata.
fn comment_of(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if kind == 0 {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

fn counter_of(e: &ListAttribute<ExpressionAttribute>) -> Option<(u64, u64)> {
    let ListAttribute::Element(attrs) = e else {
        return None;
    };
    attrs.iter().find_map(|a| match a {
        ExpressionAttribute::Data(Expressions::Other {
            expression_type,
            attributes,
        }) if expression_type == "counter" => {
            let value = |kind: u16| {
                attributes.iter().find_map(|n| {
                    let mut buf = vec![0; n.buffer_len()];
                    n.emit(&mut buf);
                    // An NLA: length, type, value.
                    let t = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
                    let v: [u8; 8] = buf.get(4..12)?.try_into().ok()?;
                    (t == kind).then(|| u64::from_be_bytes(v))
                })
            };
            Some((value(2)?, value(1)?))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Chain, Hook, Match, Rule, Table};

    #[test]
    fn a_dumped_rule_reads_back_as_its_comment_and_counter() {
        // The kernel answers a dump with the rules as they were sent, so a batch's rule
        // messages stand in for its answer.
        let t = Table {
            name: "t",
            owned: false,
            sets: vec![],
            chains: vec![Chain {
                name: "input",
                hook: Hook::Input,
                priority: 0,
                rules: vec![
                    Rule::accept(vec![Match::L4proto(6)])
                        .comment("ssh")
                        .counted(),
                    Rule::accept(vec![Match::L4proto(17)]).comment("uncounted"),
                ],
            }],
        };
        let batch = crate::encode::replace(&t, 1);
        // Rule messages arrive as NEWRULE in a dump: the same type as in the batch.
        let (got, done) = parse_dump(&batch.bytes);
        assert!(!done);
        assert_eq!(
            got,
            vec![Counted {
                chain: "input".into(),
                comment: "ssh".into(),
                packets: 0,
                bytes: 0
            }]
        );
        assert_eq!(
            comment_of(&[0, 4, b'a', b'b', b'c', 0]).as_deref(),
            Some("abc")
        );
        assert_eq!(comment_of(&[0, 40, b'a']), None);
        let _ = parse_dump(&[0xff; 64]);
        let mut end = 16u32.to_ne_bytes().to_vec();
        end.extend(3u16.to_ne_bytes());
        end.extend([0; 10]);
        assert_eq!(parse_dump(&end), (vec![], true));
    }
}
