//! Tables written as `nft list table` shows them: for golden files, for docs, and so a test
//! can compare what the kernel holds with what was meant (counters aside).

use std::fmt::Write as _;

use crate::build::icmp_type_name;
use crate::ruleset::{CT_ESTABLISHED, CT_NEW, CT_RELATED, Match, Rule, Table, Verdict};

/// The table in nft's own listing format.
pub fn render(t: &Table) -> String {
    let mut out = format!("table inet {} {{\n", t.name);
    if t.owned {
        out.push_str("\tflags owner\n\n");
    }
    let mut blocks = Vec::new();
    for s in &t.sets {
        let mut b = format!("\tset {} {{\n\t\ttype ipv4_addr\n", s.name);
        if !s.elements.is_empty() {
            let e: Vec<String> = s.elements.iter().map(ToString::to_string).collect();
            let _ = writeln!(b, "\t\telements = {{ {} }}", e.join(", "));
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    for c in &t.chains {
        let priority = match c.priority {
            0 => "filter".to_string(),
            p if p < 0 => format!("filter - {}", -p),
            p => format!("filter + {p}"),
        };
        let mut b = format!(
            "\tchain {} {{\n\t\ttype filter hook {} priority {priority}; policy accept;\n",
            c.name,
            c.hook.name()
        );
        for r in &c.rules {
            let _ = writeln!(b, "\t\t{}", rule(r));
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    out.push_str(&blocks.join("\n"));
    out.push_str("}\n");
    out
}

/// One rule, as nft prints it.
pub fn rule(r: &Rule) -> String {
    let mut parts: Vec<String> = r.matches.iter().map(matcher).collect();
    if let Some(l) = &r.log {
        parts.push(format!(
            "limit rate {}/second burst {} packets log prefix \"{}\" group {}",
            l.rate, l.burst, l.prefix, l.group
        ));
    }
    if r.counter {
        parts.push("counter packets 0 bytes 0".into());
    }
    match r.verdict {
        Some(Verdict::Accept) => parts.push("accept".into()),
        Some(Verdict::Drop) => parts.push("drop".into()),
        None => {}
    }
    if let Some(c) = &r.comment {
        parts.push(format!("comment \"{c}\""));
    }
    parts.join(" ")
}

fn matcher(m: &Match) -> String {
    let proto = |p: u8| match p {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "ipv6-icmp".to_string(),
        n => n.to_string(),
    };
    match m {
        Match::IifLoopback(true) => "iif \"lo\"".into(),
        Match::IifLoopback(false) => "iif != \"lo\"".into(),
        Match::OifLoopback => "oif \"lo\"".into(),
        Match::Iifname { name, equal: true } => format!("iifname \"{name}\""),
        Match::Iifname { name, equal: false } => format!("iifname != \"{name}\""),
        Match::Oifname { name } => format!("oifname \"{name}\""),
        Match::CtState(bits) => {
            let names: Vec<&str> = [
                (CT_ESTABLISHED, "established"),
                (CT_RELATED, "related"),
                (CT_NEW, "new"),
            ]
            .iter()
            .filter(|(b, _)| bits & b != 0)
            .map(|(_, n)| *n)
            .collect();
            format!("ct state {}", names.join(","))
        }
        Match::Ipv6 => "meta nfproto ipv6".into(),
        Match::L4proto(p) => format!("meta l4proto {}", proto(*p)),
        Match::Saddr(n) => address("saddr", n),
        Match::Daddr(n) => address("daddr", n),
        Match::Daddr6(a) => format!("ip6 daddr {a}"),
        Match::DaddrIn { set, negate } => {
            format!("ip daddr {}@{set}", if *negate { "!= " } else { "" })
        }
        Match::Dport { proto: p, lo, hi } if lo == hi => format!("{} dport {lo}", proto(*p)),
        Match::Dport { proto: p, lo, hi } => format!("{} dport {lo}-{hi}", proto(*p)),
        Match::Sport { proto: p, port } => format!("{} sport {port}", proto(*p)),
        Match::IcmpType(t) => format!("icmp type {}", type_name(false, *t)),
        Match::Icmpv6Type(t) => format!("icmpv6 type {}", type_name(true, *t)),
    }
}

fn type_name(v6: bool, t: u8) -> String {
    icmp_type_name(v6, t).map_or_else(|| t.to_string(), str::to_string)
}

fn address(field: &str, n: &bulkhead_allowlist::Network) -> String {
    match n.prefix_len {
        0 => "meta nfproto ipv4".into(),
        32 => format!("ip {field} {}", n.address),
        _ => format!("ip {field} {n}"),
    }
}
