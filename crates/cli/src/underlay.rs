//! The underlay in the offline policy commands: `explain --path underlay`, the underlay's part of
//! `diff` and `plan`, and the summaries in `check` and `compile`.

use std::net::Ipv4Addr;

use bulkhead_allowlist::{Underlay, UnderlayHost, UnderlayMode};
use bulkhead_policy::underlay::{self, End, EntryAt, Filter, Verdict};
use bulkhead_policy::{IdentityId, Model, Probe, State};
use serde::Serialize;

use crate::output::{Format, Outcome, columns, emit, time};

/// Always open on the underlay, whatever the mode (spec §7).
const ALWAYS_OPEN: &str = "WireGuard to the daemon's port and the controller API are always \
                           open, whatever the mode; so are loopback, replies within connections \
                           a server opened, and the ICMP the network needs";

#[derive(Serialize)]
struct Candidate {
    entry: String,
    location: String,
    networks: Vec<String>,
}

#[derive(Serialize)]
struct EndView {
    identity: String,
    mode: UnderlayMode,
    in_scope: bool,
    quarantined: bool,
    /// `not-filtered`, `allowed`, `denied`, `would-deny` or `depends-on-address`.
    result: &'static str,
    entry: Option<String>,
    location: Option<String>,
    /// With `depends-on-address`: the entries that admit the connection if the initiator's
    /// address is in one of their networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    if_address_in: Vec<Candidate>,
    /// What happens there, in one line.
    detail: String,
}

#[derive(Serialize)]
struct Explanation {
    path: &'static str,
    from: String,
    to: String,
    port: String,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_address: Option<String>,
    /// `allow`, `deny`, or `depends` (on FROM's underlay address).
    verdict: Verdict,
    /// The entry that lets it in at TO's server, else out at FROM's; `null` if none does.
    rule: Option<String>,
    location: Option<String>,
    reason: String,
    /// FROM's server, where the connection leaves.
    outbound: EndView,
    /// TO's server, where it arrives.
    inbound: EndView,
    notes: Vec<String>,
}

/// What `explain --path underlay` needs besides the model.
pub struct Query<'a> {
    pub file: &'a str,
    pub from: IdentityId,
    pub to: IdentityId,
    pub probe: Probe,
    pub from_address: Option<Ipv4Addr>,
    pub now: i64,
}

/// `bulkhead policy explain FILE FROM TO PORT --path underlay`.
pub fn explain(m: &Model, st: &State, q: Query<'_>, fmt: Format) -> anyhow::Result<Outcome> {
    let e = underlay::explain(m, st, q.from, q.to, q.probe, q.from_address);
    let (a, b) = (e.outbound.identity.clone(), e.inbound.identity.clone());
    let loc = |at: &EntryAt| format!("{}:{}", q.file, at.line);
    let port = q.probe.to_string();
    let not_filtered = |end: &End| {
        if end.in_scope {
            "mode off".to_string()
        } else {
            "outside the underlay's scope".to_string()
        }
    };
    let detail_out = match &e.outbound.filter {
        Filter::NotFiltered => format!("not filtered ({})", not_filtered(&e.outbound)),
        Filter::Allowed { entry } => format!("lets it out: entry {}", entry.name),
        Filter::NoEntry => {
            let what = if e.outbound.mode == UnderlayMode::Observe {
                "lets it out, logged as would-deny"
            } else {
                "drops it"
            };
            format!("{what}: no entry lets {a} connect to {b} on {port}")
        }
        // Only the receiving end matches networks.
        Filter::DependsOnAddress { .. } => "depends on the address".to_string(),
    };
    let detail_in = match &e.inbound.filter {
        Filter::NotFiltered => format!("not filtered ({})", not_filtered(&e.inbound)),
        Filter::Allowed { entry } => format!("admits it: entry {}", entry.name),
        Filter::NoEntry => {
            let what = if e.inbound.mode == UnderlayMode::Observe {
                "admits it, logged as would-deny"
            } else {
                "drops it"
            };
            format!("{what}: no entry admits {a} on {port}")
        }
        Filter::DependsOnAddress { entries } => {
            let nets: Vec<String> = entries
                .iter()
                .flat_map(|(_, n)| n.iter().map(ToString::to_string))
                .collect();
            let then = if e.inbound.mode == UnderlayMode::Observe {
                "it is admitted either way, and logged as would-deny unless"
            } else {
                "admits it only if"
            };
            format!(
                "{then} {a}'s underlay address is in {} (give --from-address to decide)",
                nets.join(", ")
            )
        }
    };
    let (detail_out, detail_in) = if e.self_traffic {
        let lo = "loopback: always allowed".to_string();
        (lo.clone(), lo)
    } else {
        (detail_out, detail_in)
    };
    let view = |end: &End, detail: String| {
        let (entry, location) = match &end.filter {
            Filter::Allowed { entry } => (Some(entry.name.clone()), Some(loc(entry))),
            _ => (None, None),
        };
        let result = match (&end.filter, end.mode) {
            (Filter::NotFiltered, _) => "not-filtered",
            (Filter::Allowed { .. }, _) => "allowed",
            (Filter::NoEntry, UnderlayMode::Observe) => "would-deny",
            (Filter::NoEntry, _) => "denied",
            (Filter::DependsOnAddress { .. }, _) => "depends-on-address",
        };
        let if_address_in = match &end.filter {
            Filter::DependsOnAddress { entries } => entries
                .iter()
                .map(|(at, nets)| Candidate {
                    entry: at.name.clone(),
                    location: loc(at),
                    networks: nets.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            _ => Vec::new(),
        };
        EndView {
            identity: end.identity.clone(),
            mode: end.mode,
            in_scope: end.in_scope,
            quarantined: end.quarantined,
            result,
            entry,
            location,
            if_address_in,
            detail,
        }
    };
    let decided = [&e.inbound.filter, &e.outbound.filter]
        .into_iter()
        .find_map(|f| match f {
            Filter::Allowed { entry } if e.verdict == Verdict::Allow && !e.self_traffic => {
                Some(entry.clone())
            }
            _ => None,
        });
    let reason = if e.self_traffic {
        "a server's connection to itself is loopback: always allowed".to_string()
    } else {
        format!("at {a}: {detail_out}; at {b}: {detail_in}")
    };
    let mut notes = vec![ALWAYS_OPEN.to_string()];
    for end in [&e.outbound, &e.inbound] {
        if end.mode == UnderlayMode::Observe && end.would_deny() != Some(false) {
            notes.push(format!(
                "{} is in observe: its server drops nothing, and logs what enforce would drop \
                 as would-deny",
                end.identity
            ));
        }
    }
    if e.outbound.quarantined {
        notes.push(format!(
            "{a} is quarantined: its server keeps no outbound entries, and it is no host of \
             other servers' entries (a network in `from` still covers its address)"
        ));
    }
    if e.inbound.quarantined {
        notes.push(format!(
            "{b} is quarantined: its server keeps its inbound entries, so operators can still \
             reach it"
        ));
    }
    let out = Explanation {
        path: "underlay",
        from: a,
        to: b,
        port,
        at: time(q.now),
        from_address: q.from_address.map(|ip| ip.to_string()),
        verdict: e.verdict,
        rule: decided.as_ref().map(|d| d.name.clone()),
        location: decided.as_ref().map(loc),
        reason,
        outbound: view(&e.outbound, detail_out),
        inbound: view(&e.inbound, detail_in),
        notes,
    };
    emit(fmt, &out, || table(&out))?;
    Ok(Outcome::ok_if(e.verdict == Verdict::Allow))
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Depends => "depends",
    }
}

fn table(e: &Explanation) -> String {
    let mut s = format!(
        "{}: {} -> {} {} over the underlay\n",
        verdict_word(e.verdict),
        e.from,
        e.to,
        e.port
    );
    if let Some(ip) = &e.from_address {
        s += &format!("  {} at {ip}\n", e.from);
    }
    let rows: Vec<Vec<String>> = [("from", &e.outbound), ("to", &e.inbound)]
        .into_iter()
        .map(|(side, end)| {
            let mut mode = end.mode.to_string();
            if !end.in_scope {
                mode += " (out of scope)";
            }
            let detail = match &end.location {
                Some(l) => format!("{} ({l})", end.detail),
                None => end.detail.clone(),
            };
            vec![format!("  {side} {}:", end.identity), mode, detail]
        })
        .collect();
    s += &columns(&rows);
    for end in [&e.outbound, &e.inbound] {
        for c in &end.if_address_in {
            s += &format!(
                "    - {} ({}) if {}'s address is in {}\n",
                c.entry,
                c.location,
                e.from,
                c.networks.join(", ")
            );
        }
    }
    s += "  notes:\n";
    for n in &e.notes {
        s += &format!("    - {n}\n");
    }
    s
}

/// The underlay as `policy check` reports it.
#[derive(Serialize)]
pub struct Summary {
    mode: UnderlayMode,
    /// The scope's segments; `null`: every identity.
    scope: Option<Vec<String>>,
    /// Allow entries.
    allow: usize,
    /// Identities whose servers are in scope.
    in_scope: usize,
}

impl Summary {
    /// The model's block, if it has one.
    pub fn of(m: &Model) -> Option<Summary> {
        let b = m.underlay()?;
        Some(Summary {
            mode: b.mode,
            scope: b
                .scope
                .as_ref()
                .map(|s| s.iter().map(|&g| m.segment_name(g).to_string()).collect()),
            allow: b.entries.len(),
            in_scope: m.identity_ids().filter(|&i| b.in_scope(m, i)).count(),
        })
    }

    /// E.g. `underlay enforce on 3 identities (scope prod), 2 allow entries`.
    pub fn line(&self) -> String {
        if self.mode == UnderlayMode::Off {
            return "underlay off".to_string();
        }
        let scope = match &self.scope {
            Some(s) => format!(" (scope {})", s.join(", ")),
            None => String::new(),
        };
        format!(
            "underlay {} on {} identities{scope}, {} allow entries",
            self.mode, self.in_scope, self.allow
        )
    }
}

/// An identity's underlay part, for `policy compile`'s table.
pub fn compiled_lines(u: &Underlay) -> String {
    let host = |h: &UnderlayHost| match h {
        UnderlayHost::Net(n) => n.to_string(),
        UnderlayHost::Identity(n) => n.clone(),
    };
    let mut s = format!("  underlay: {}\n", u.mode);
    for (dir, word, rules) in [("in ", "from", &u.inbound), ("out", "to", &u.outbound)] {
        for r in rules {
            let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
            let hosts: Vec<String> = r.hosts.iter().map(host).collect();
            s += &format!(
                "    {dir} {}: {} {word} {}\n",
                r.name,
                ports.join(", "),
                hosts.join(", ")
            );
        }
    }
    s
}

/// The underlay's part of a plan, as the controller sends it.
pub fn wire_plan(p: &underlay::Plan) -> bulkhead_proto::UnderlayPlan {
    bulkhead_proto::UnderlayPlan {
        block: p
            .block
            .iter()
            .map(|c| bulkhead_proto::UnderlayBlockChange {
                item: c.item.clone(),
                before: c.before.clone(),
                after: c.after.clone(),
            })
            .collect(),
        servers: p
            .servers
            .iter()
            .map(|s| bulkhead_proto::UnderlayServerChange {
                identity: s.identity.clone(),
                before: s.before.to_string(),
                after: s.after.to_string(),
                gained: s.gained.clone(),
                lost: s.lost.clone(),
            })
            .collect(),
    }
}

/// The underlay's part of a plan, for people; empty if nothing changes there.
pub fn plan_table(p: &bulkhead_proto::UnderlayPlan) -> String {
    let mut s = String::new();
    let dash = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".to_string());
    if !p.block.is_empty() {
        let mut rows = vec![vec![
            "UNDERLAY".to_string(),
            "BEFORE".into(),
            "AFTER".into(),
        ]];
        for c in &p.block {
            rows.push(vec![
                c.item.clone(),
                dash(c.before.as_ref()),
                dash(c.after.as_ref()),
            ]);
        }
        s += &columns(&rows);
    }
    if !p.servers.is_empty() {
        if !s.is_empty() {
            s += "\n";
        }
        let join = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        let mut rows = vec![vec![
            "SERVER".to_string(),
            "UNDERLAY MODE".into(),
            "GAINED".into(),
            "LOST".into(),
        ]];
        for c in &p.servers {
            let mode = if c.before == c.after {
                c.after.clone()
            } else {
                format!("{} -> {}", c.before, c.after)
            };
            rows.push(vec![
                c.identity.clone(),
                mode,
                join(&c.gained),
                join(&c.lost),
            ]);
        }
        s += &columns(&rows);
        s += &format!(
            "{} server(s) change their underlay firewall\n",
            p.servers.len()
        );
    }
    s
}
