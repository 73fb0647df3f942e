//! From a configuration to tables: the whole meaning of spec §7 in rules.
//!
//! Inbound, in `enforce`, a server in scope takes only: loopback; replies and related ICMP
//! (`ct state established,related`); its overlay interface (the data plane filters that);
//! WireGuard to the daemon's port; a controller's API if one runs here; the ICMP a network
//! needs; and the `allow` entries. Outbound, it may not open anything to another enrolled
//! server's underlay address but WireGuard (from the daemon's port), a controller's API and the
//! `allow` entries; everything else outbound is not the firewall's business. New connections
//! it drops (or, in `observe`, would drop) are logged to NFLOG at a bounded rate; the rest of
//! the counting is done by counters in the kernel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bulkhead_allowlist::{Network, PortSpec, UnderlayMode};
use bulkhead_proto::{UnderlayAllow, UnderlayConfig};

use crate::ruleset::{
    CT_ESTABLISHED, CT_NEW, CT_RELATED, Chain, Hook, Log, Match, Rule, Set, Table, Verdict,
};
use crate::{FIREWALL, GUARD, prefix};

/// What the daemon knows about its host, besides the controller's configuration.
#[derive(Debug, Clone)]
pub struct Host<'a> {
    /// The overlay interface.
    pub interface: &'a str,
    /// The identity's overlay address.
    pub overlay_address: Ipv4Addr,
    /// The daemon's WireGuard UDP port.
    pub wireguard_port: u16,
    /// The controllers the daemon was started with, resolved: kept open whatever the
    /// configuration says, so a node can always reach a controller.
    pub controllers: &'a [SocketAddr],
    /// Where log rules send packets.
    pub nflog_group: u16,
}

/// The set of other enrolled servers' underlay addresses.
pub const SERVERS: &str = "servers";
/// New connections logged a second, per direction, at most (with the burst below).
const LOG_RATE: u32 = 50;
const LOG_BURST: u32 = 100;

/// ICMP types a network needs: destination unreachable (with "fragmentation needed").
const ICMP_NEEDED: [(u8, &str); 1] = [(3, "destination-unreachable")];
/// ICMPv6 types a network needs: errors PMTU discovery needs, and neighbour discovery.
const ICMPV6_NEEDED: [(u8, &str); 6] = [
    (1, "destination-unreachable"),
    (2, "packet-too-big"),
    (133, "nd-router-solicit"),
    (134, "nd-router-advert"),
    (135, "nd-neighbor-solicit"),
    (136, "nd-neighbor-advert"),
];

/// The names nft prints for the ICMP and ICMPv6 types the firewall lets in.
pub fn icmp_type_name(v6: bool, t: u8) -> Option<&'static str> {
    let table: &[(u8, &str)] = if v6 { &ICMPV6_NEEDED } else { &ICMP_NEEDED };
    table.iter().find(|(n, _)| *n == t).map(|(_, s)| *s)
}

/// The underlay firewall's table for `cfg` on `host`; `None` for `mode: off`, whose table is
/// no table.
pub fn firewall(cfg: &UnderlayConfig, host: &Host) -> Option<Table> {
    let drop = match cfg.mode {
        UnderlayMode::Off => return None,
        UnderlayMode::Observe => false,
        UnderlayMode::Enforce => true,
    };
    let mut controllers: Vec<SocketAddr> = cfg
        .controllers
        .iter()
        .chain(host.controllers)
        .copied()
        .collect();
    controllers.sort();
    controllers.dedup();

    let mut input = vec![
        Rule::accept(vec![Match::IifLoopback(true)]),
        Rule::accept(vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)]),
        Rule::accept(vec![Match::Iifname {
            name: host.interface.to_string(),
            equal: true,
        }])
        .comment("overlay"),
        Rule::accept(vec![udp_dport(host.wireguard_port)]).comment("wireguard"),
    ];
    input.extend(controllers.iter().map(|c| {
        let to = match c.ip() {
            IpAddr::V4(a) => Match::Daddr(host_net(a)),
            IpAddr::V6(a) => Match::Daddr6(a),
        };
        Rule::accept(vec![to, tcp_dport(c.port())]).comment("controller")
    }));
    input.extend(
        ICMP_NEEDED
            .iter()
            .map(|&(t, _)| Rule::accept(vec![Match::IcmpType(t)]).comment("icmp")),
    );
    input.extend(
        ICMPV6_NEEDED
            .iter()
            .map(|&(t, _)| Rule::accept(vec![Match::Icmpv6Type(t)]).comment("icmpv6")),
    );
    input.extend(allow_rules(&cfg.inbound, Match::Saddr));
    input.extend(closing(drop, true, host.nflog_group));

    let mut output = vec![
        Rule::accept(vec![Match::OifLoopback]),
        Rule::accept(vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)]),
        Rule::accept(vec![Match::Oifname {
            name: host.interface.to_string(),
        }])
        .comment("overlay"),
        Rule::accept(vec![Match::Ipv6]).comment("not a server"),
        Rule::accept(vec![Match::DaddrIn {
            set: SERVERS,
            negate: true,
        }])
        .comment("not a server"),
        Rule::accept(vec![Match::Sport {
            proto: 17,
            port: host.wireguard_port,
        }])
        .comment("wireguard"),
    ];
    output.extend(controllers.iter().filter_map(|c| {
        match c.ip() {
            IpAddr::V4(a) => Some(
                Rule::accept(vec![Match::Daddr(host_net(a)), tcp_dport(c.port())])
                    .comment("controller"),
            ),
            IpAddr::V6(_) => None, // IPv6 is not guarded outbound
        }
    }));
    output.extend(allow_rules(&cfg.outbound, Match::Daddr));
    output.extend(closing(drop, false, host.nflog_group));

    Some(Table {
        name: FIREWALL,
        owned: false,
        sets: vec![Set {
            name: SERVERS,
            elements: cfg.servers.keys().copied().collect(),
        }],
        chains: vec![
            Chain {
                name: "input",
                hook: Hook::Input,
                priority: 0,
                rules: input,
            },
            Chain {
                name: "output",
                hook: Hook::Output,
                priority: 0,
                rules: output,
            },
        ],
    })
}

/// The overlay guard: the overlay address only through the overlay interface (or loopback),
/// and nothing routed into or out of the overlay interface.
pub fn guard(host: &Host) -> Table {
    let tun = |equal| Match::Iifname {
        name: host.interface.to_string(),
        equal,
    };
    let dropped = |matches, comment: &str| Rule {
        matches,
        log: None,
        counter: true,
        verdict: Some(Verdict::Drop),
        comment: Some(comment.to_string()),
    };
    Table {
        name: GUARD,
        owned: true,
        sets: vec![],
        chains: vec![
            Chain {
                name: "input",
                hook: Hook::Input,
                priority: -1,
                rules: vec![dropped(
                    vec![
                        tun(false),
                        Match::IifLoopback(false),
                        Match::Daddr(host_net(host.overlay_address)),
                    ],
                    "overlay address only through the overlay",
                )],
            },
            Chain {
                name: "forward",
                hook: Hook::Forward,
                priority: -1,
                rules: vec![
                    dropped(
                        vec![
                            tun(false),
                            Match::Oifname {
                                name: host.interface.to_string(),
                            },
                        ],
                        "nothing routed into the overlay",
                    ),
                    dropped(vec![tun(true)], "nothing routed out of the overlay"),
                ],
            },
        ],
    }
}

/// The last rules of a chain: log new connections no rule accepted, then drop (`enforce`) or
/// only count them (`observe`).
fn closing(drop: bool, inbound: bool, group: u16) -> [Rule; 2] {
    [
        Rule {
            matches: vec![Match::CtState(CT_NEW)],
            log: Some(Log {
                prefix: prefix(inbound, !drop),
                group,
                rate: LOG_RATE,
                burst: LOG_BURST,
            }),
            counter: false,
            verdict: None,
            comment: None,
        },
        Rule {
            matches: vec![],
            log: None,
            counter: true,
            verdict: drop.then_some(Verdict::Drop),
            comment: Some(if drop { "default deny" } else { "would deny" }.to_string()),
        },
    ]
}

/// One rule per network and port entry of each `allow` entry, named after it.
fn allow_rules(
    entries: &[UnderlayAllow],
    address: fn(Network) -> Match,
) -> impl Iterator<Item = Rule> + '_ {
    entries.iter().flat_map(move |e| {
        e.nets.iter().flat_map(move |&net| {
            e.ports.iter().map(move |p| {
                let mut m = vec![address(net)];
                m.extend(port_match(*p));
                Rule::accept(m).comment(e.name.clone()).counted()
            })
        })
    })
}

/// A port entry as matches: none for any protocol.
fn port_match(p: PortSpec) -> Option<Match> {
    let ports = |proto, lo, hi| match (lo, hi) {
        (0, u16::MAX) => Match::L4proto(proto),
        (lo, hi) => Match::Dport { proto, lo, hi },
    };
    match p {
        PortSpec::Any => None,
        PortSpec::Tcp { lo, hi } => Some(ports(6, lo, hi)),
        PortSpec::Udp { lo, hi } => Some(ports(17, lo, hi)),
        PortSpec::Icmp => Some(Match::L4proto(1)),
    }
}

fn host_net(address: Ipv4Addr) -> Network {
    Network {
        address,
        prefix_len: 32,
    }
}

fn tcp_dport(port: u16) -> Match {
    Match::Dport {
        proto: 6,
        lo: port,
        hi: port,
    }
}

fn udp_dport(port: u16) -> Match {
    Match::Dport {
        proto: 17,
        lo: port,
        hi: port,
    }
}
