//! Tables as nf_tables netlink messages: one batch, which the kernel applies as one
//! transaction or not at all.
//!
//! Replacing a table is "add it, delete it, add it with its contents" in one batch: the add
//! makes the delete valid whether or not the table existed, and no packet ever sees a half
//! table. The messages are built with `netlink-packet-netfilter`'s typed nf_tables attributes;
//! the expressions it has no type for (`ct`, `limit`, `log`, `counter`) are written from the
//! kernel's attribute numbers (`linux/netfilter/nf_tables.h`). Expressions are what `nft`
//! itself generates for the same rule, so `nft list table` prints the rules back readably.

use bulkhead_allowlist::Network;
use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook as NlHook, Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey,
    NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute,
    SetElementAttribute, SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute,
    TableFlags, TableMessage, Verdict as NlVerdict, VerdictAttribute,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily, none::ControlMessage,
};

use crate::ruleset::{Hook, Log, Match, Rule, Table, Verdict};

/// The nfnetlink subsystem of nf_tables, for batch headers.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// nft's data type number for `ipv4_addr`, so `nft list` prints set elements as addresses.
const TYPE_IPADDR: u32 = 7;
/// Elements per set-element message, so no message outgrows a socket buffer.
const ELEMENTS_PER_MESSAGE: usize = 512;

/// A batch ready to send, and the sequence numbers the kernel will acknowledge.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The messages, back to back.
    pub bytes: Vec<u8>,
    /// One acknowledgement (or error) is due for each of these.
    pub acks: Vec<u32>,
}

/// Replaces (or creates) `table` atomically. Sequence numbers start at `seq`.
pub fn replace(table: &Table, seq: u32) -> Batch {
    let mut b = Builder::new(seq);
    b.table(table.name, false, false);
    b.delete_table(table.name);
    b.table(table.name, table.owned, true);
    for (i, s) in table.sets.iter().enumerate() {
        let id = i as u32 + 1;
        b.push(
            NfTablesMessage::NewSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(table.name.into()),
                    SetAttribute::Name(s.name.into()),
                    SetAttribute::Flags(SetFlags::empty()),
                    SetAttribute::KeyType(TYPE_IPADDR),
                    SetAttribute::KeyLen(4),
                    SetAttribute::Id(id),
                ],
            }),
            NLM_F_CREATE,
        );
        for chunk in s.elements.chunks(ELEMENTS_PER_MESSAGE) {
            let elements = chunk
                .iter()
                .map(|a| {
                    ListAttribute::Element(vec![SetElementAttribute::Key(DataAttribute::Value(
                        a.octets().to_vec(),
                    ))])
                })
                .collect();
            b.push(
                NfTablesMessage::NewSetElement(SetElementMessage {
                    attributes: vec![
                        SetElementList::Table(table.name.into()),
                        SetElementList::Set(s.name.into()),
                        SetElementList::SetId(id),
                        SetElementList::Elements(elements),
                    ],
                }),
                NLM_F_CREATE,
            );
        }
    }
    for c in &table.chains {
        let hook = match c.hook {
            Hook::Input => InetHookNumber::LocalIn,
            Hook::Output => InetHookNumber::LocalOut,
            Hook::Forward => InetHookNumber::Forward,
        };
        b.push(
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.name.into()),
                    ChainAttribute::Name(c.name.into()),
                    ChainAttribute::Hook(vec![
                        NlHook::Number(hook.into()),
                        NlHook::Priority(c.priority as u32),
                    ]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type("filter".into()),
                ],
            }),
            NLM_F_CREATE,
        );
        for r in &c.rules {
            let set_id = |name: &str| {
                table
                    .sets
                    .iter()
                    .position(|s| s.name == name)
                    .map_or(0, |i| i as u32 + 1)
            };
            let mut attributes = vec![
                RuleAttribute::Table(table.name.into()),
                RuleAttribute::Chain(c.name.into()),
                RuleAttribute::Expressions(expressions(r, &set_id)),
            ];
            if let Some(comment) = &r.comment {
                attributes.push(RuleAttribute::UserData(comment_udata(comment)));
            }
            b.push(
                NfTablesMessage::NewRule(RuleMessage { attributes }),
                NLM_F_CREATE | NLM_F_APPEND,
            );
        }
    }
    b.finish()
}

/// Asks whether the table `name` exists: acknowledged if it does, `ENOENT` if not.
pub fn probe(name: &str, seq: u32) -> Batch {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(name.into())],
        }),
    ));
    m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    m.header.sequence_number = seq;
    m.finalize();
    let mut bytes = vec![0; m.buffer_len()];
    m.emit(&mut bytes);
    Batch {
        bytes,
        acks: vec![seq],
    }
}

/// Removes the table `name` if it exists (an add first makes the delete always valid).
pub fn delete(name: &str, seq: u32) -> Batch {
    let mut b = Builder::new(seq);
    b.table(name, false, false);
    b.delete_table(name);
    b.finish()
}

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Builds one batch.
struct Builder {
    messages: Vec<NetlinkMessage<NetfilterMessage>>,
    acks: Vec<u32>,
    seq: u32,
}

impl Builder {
    fn new(seq: u32) -> Builder {
        let mut b = Builder {
            messages: Vec::new(),
            acks: Vec::new(),
            seq,
        };
        b.control(ControlMessage::BatchBegin);
        b
    }

    fn control(&mut self, c: ControlMessage) {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            c,
        ));
        m.header.flags = NLM_F_REQUEST;
        m.header.sequence_number = self.next_seq();
        self.messages.push(m);
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    fn push(&mut self, msg: NfTablesMessage, flags: u16) {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            msg,
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        m.header.sequence_number = self.next_seq();
        self.acks.push(m.header.sequence_number);
        self.messages.push(m);
    }

    fn table(&mut self, name: &str, owned: bool, with_flags: bool) {
        let mut attributes = vec![TableAttribute::Name(name.into())];
        if with_flags {
            attributes.push(TableAttribute::Flags(if owned {
                TableFlags::Owner
            } else {
                TableFlags::empty()
            }));
        }
        self.push(
            NfTablesMessage::NewTable(TableMessage { attributes }),
            NLM_F_CREATE,
        );
    }

    fn delete_table(&mut self, name: &str) {
        self.push(
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(name.into())],
            }),
            0,
        );
    }

    fn finish(mut self) -> Batch {
        self.control(ControlMessage::BatchEnd);
        let mut bytes = Vec::new();
        for mut m in self.messages {
            m.finalize();
            let at = bytes.len();
            bytes.resize(at + m.buffer_len(), 0);
            m.emit(&mut bytes[at..]);
        }
        Batch {
            bytes,
            acks: self.acks,
        }
    }
}

/// nft's rule userdata: one comment TLV (type 0), NUL-terminated.
fn comment_udata(comment: &str) -> Vec<u8> {
    // A comment is at most 128 bytes in nft; longer ones are cut on a character boundary.
    let mut end = comment.len().min(127);
    while !comment.is_char_boundary(end) {
        end -= 1;
    }
    let text = &comment.as_bytes()[..end];
    let mut out = vec![0, text.len() as u8 + 1];
    out.extend_from_slice(text);
    out.push(0);
    out
}

type Expr = ListAttribute<ExpressionAttribute>;

/// A rule's expressions: each match with what it implies first, then the statements.
fn expressions(r: &Rule, set_id: &dyn Fn(&str) -> u32) -> Vec<Expr> {
    let mut e = Vec::new();
    for m in &r.matches {
        matcher(&mut e, m, set_id);
    }
    if let Some(l) = &r.log {
        log(&mut e, l);
    }
    if r.counter {
        e.push(other(
            "counter",
            vec![nla(1, 0u64.to_be_bytes()), nla(2, 0u64.to_be_bytes())],
        ));
    }
    if let Some(v) = r.verdict {
        let code = match v {
            Verdict::Accept => NF_ACCEPT,
            Verdict::Drop => NF_DROP,
        };
        e.push(
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Verdict),
                Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                    NlVerdict::Other(code),
                )])),
            ])
            .into(),
        );
    }
    e
}

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// Payload bases.
const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;

fn matcher(e: &mut Vec<Expr>, m: &Match, set_id: &dyn Fn(&str) -> u32) {
    match m {
        Match::IifLoopback(equal) => {
            meta(e, MetaKey::Iif);
            cmp(e, op(*equal), 1u32.to_ne_bytes().to_vec());
        }
        Match::OifLoopback => {
            meta(e, MetaKey::Oif);
            cmp(e, Operator::Equal, 1u32.to_ne_bytes().to_vec());
        }
        Match::Iifname { name, equal } => {
            meta(e, MetaKey::Iifname);
            cmp(e, op(*equal), ifname(name));
        }
        Match::Oifname { name } => {
            meta(e, MetaKey::Oifname);
            cmp(e, Operator::Equal, ifname(name));
        }
        Match::CtState(bits) => {
            e.push(other(
                "ct",
                vec![nla(1, reg1()), nla(2, 0u32.to_be_bytes())],
            ));
            e.push(
                Expressions::Bitwise(vec![
                    Bitwise::SourceRegister(Register::Reg1),
                    Bitwise::DestinationRegister(Register::Reg1),
                    Bitwise::Length(4),
                    Bitwise::Mask(DataAttribute::Value(bits.to_ne_bytes().to_vec())),
                    Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
                ])
                .into(),
            );
            cmp(e, Operator::NotEqual, vec![0; 4]);
        }
        Match::Ipv6 => nfproto(e, NFPROTO_IPV6),
        Match::L4proto(p) => l4proto(e, *p),
        Match::Saddr(n) => address(e, 12, n),
        Match::Daddr(n) => address(e, 16, n),
        Match::Daddr6(a) => {
            nfproto(e, NFPROTO_IPV6);
            payload(e, NETWORK, 24, 16);
            cmp(e, Operator::Equal, a.octets().to_vec());
        }
        Match::DaddrIn { set, negate } => {
            nfproto(e, NFPROTO_IPV4);
            payload(e, NETWORK, 16, 4);
            e.push(
                Expressions::Lookup(vec![
                    Lookup::Set((*set).into()),
                    Lookup::SourceRegister(Register::Reg1),
                    Lookup::SetId(set_id(set)),
                    Lookup::Flags(u32::from(*negate)),
                ])
                .into(),
            );
        }
        Match::Dport { proto, lo, hi } => {
            l4proto(e, *proto);
            payload(e, TRANSPORT, 2, 2);
            if lo == hi {
                cmp(e, Operator::Equal, lo.to_be_bytes().to_vec());
            } else {
                cmp(e, Operator::GreatherThanEqual, lo.to_be_bytes().to_vec());
                cmp(e, Operator::LessThanEqual, hi.to_be_bytes().to_vec());
            }
        }
        Match::Sport { proto, port } => {
            l4proto(e, *proto);
            payload(e, TRANSPORT, 0, 2);
            cmp(e, Operator::Equal, port.to_be_bytes().to_vec());
        }
        Match::IcmpType(t) => {
            nfproto(e, NFPROTO_IPV4);
            l4proto(e, 1);
            payload(e, TRANSPORT, 0, 1);
            cmp(e, Operator::Equal, vec![*t]);
        }
        Match::Icmpv6Type(t) => {
            nfproto(e, NFPROTO_IPV6);
            l4proto(e, 58);
            payload(e, TRANSPORT, 0, 1);
            cmp(e, Operator::Equal, vec![*t]);
        }
    }
}

fn op(equal: bool) -> Operator {
    if equal {
        Operator::Equal
    } else {
        Operator::NotEqual
    }
}

/// An IPv4 address field (offset 12: source, 16: destination) within a network.
fn address(e: &mut Vec<Expr>, offset: u32, n: &Network) {
    nfproto(e, NFPROTO_IPV4);
    if n.prefix_len == 0 {
        return;
    }
    payload(e, NETWORK, offset, 4);
    if n.prefix_len < 32 {
        e.push(
            Expressions::Bitwise(vec![
                Bitwise::SourceRegister(Register::Reg1),
                Bitwise::DestinationRegister(Register::Reg1),
                Bitwise::Length(4),
                Bitwise::Mask(DataAttribute::Value(n.mask().to_be_bytes().to_vec())),
                Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
            ])
            .into(),
        );
    }
    let masked = u32::from(n.address) & n.mask();
    cmp(e, Operator::Equal, masked.to_be_bytes().to_vec());
}

fn nfproto(e: &mut Vec<Expr>, family: u8) {
    meta(e, MetaKey::Nfproto);
    cmp(e, Operator::Equal, vec![family]);
}

fn l4proto(e: &mut Vec<Expr>, proto: u8) {
    meta(e, MetaKey::L4Proto);
    cmp(e, Operator::Equal, vec![proto]);
}

fn meta(e: &mut Vec<Expr>, key: MetaKey) {
    e.push(
        Expressions::Meta(vec![
            Meta::Key(key),
            Meta::DestinationRegister(Register::Reg1),
        ])
        .into(),
    );
}

fn payload(e: &mut Vec<Expr>, base: u32, offset: u32, len: u32) {
    e.push(
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(base),
            Payload::Offset(offset),
            Payload::Len(len),
        ])
        .into(),
    );
}

fn cmp(e: &mut Vec<Expr>, op: Operator, data: Vec<u8>) {
    e.push(
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(op),
            Cmp::Data(DataAttribute::Value(data)),
        ])
        .into(),
    );
}

/// `limit rate R/second burst B packets log prefix P group G`.
fn log(e: &mut Vec<Expr>, l: &Log) {
    const SECOND: u64 = 1;
    e.push(other(
        "limit",
        vec![
            nla(1, u64::from(l.rate).to_be_bytes()),
            nla(2, SECOND.to_be_bytes()),
            nla(3, l.burst.to_be_bytes()),
            nla(4, 0u32.to_be_bytes()), // packets
            nla(5, 0u32.to_be_bytes()),
        ],
    ));
    let mut prefix = l.prefix.as_bytes().to_vec();
    prefix.push(0);
    e.push(other(
        "log",
        vec![nla(1, l.group.to_be_bytes()), DefaultNla::new(2, prefix)],
    ));
}

/// An interface name as `meta iifname` compares it: NUL-padded to IFNAMSIZ.
fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(16, 0);
    v
}

/// Register 1, as expressions name their destination.
fn reg1() -> [u8; 4] {
    u32::from(Register::Reg1).to_be_bytes()
}

fn nla<const N: usize>(kind: u16, value: [u8; N]) -> DefaultNla {
    DefaultNla::new(kind, value.to_vec())
}

fn other(name: &str, attributes: Vec<DefaultNla>) -> Expr {
    Expressions::Other {
        expression_type: name.into(),
        attributes,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Chain, Set};

    #[test]
    fn a_replacement_is_one_batch_acknowledged_message_by_message() {
        let t = Table {
            name: "t",
            owned: false,
            sets: vec![Set {
                name: "s",
                elements: (0..1000u32).map(std::net::Ipv4Addr::from).collect(),
            }],
            chains: vec![Chain {
                name: "input",
                hook: Hook::Input,
                priority: 0,
                rules: vec![Rule::accept(vec![Match::L4proto(6)]).comment("x")],
            }],
        };
        let b = replace(&t, 100);
        // begin, add, delete, add, set, 2 element chunks, chain, rule, end.
        assert_eq!(b.acks, (101..109).collect::<Vec<_>>());
        let first = u32::from_ne_bytes(b.bytes[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            u16::from_ne_bytes(b.bytes[4..6].try_into().unwrap()),
            0x10,
            "a batch begins with NFNL_MSG_BATCH_BEGIN"
        );
        assert!(first < b.bytes.len());
        assert_eq!(comment_udata("x"), vec![0, 2, b'x', 0]);
        assert_eq!(comment_udata(&"é".repeat(100)).len(), 2 + 126 + 1);
    }
}
