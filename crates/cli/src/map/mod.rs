//! `bulkhead map` (spec §9): who talks to whom, from the flow history and the policy.
//!
//! Each identity is drawn in one group: its **primary segment**, the smallest segment of the
//! policy it belongs to (fewest members; the first name on a tie). Identities in no segment go
//! to `(no segment)`, and ends the policy does not know (addresses outside the estate,
//! identities it no longer has) to `(outside)`. Edges are one per initiator, responder,
//! verdict and path, with each port's flow count and deciding rules; between groups they add
//! up. `-o json` for scripts, `-o dot` for Graphviz, `-o html` one self-contained page
//! ([`render::html`]), `-o table` (the default) a listing.

mod layout;
mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use bulkhead_policy::Model;
use bulkhead_policy::observed::{Flow, Seen, Way};
use serde::Serialize;

use crate::flowsource::HistoryArgs;
use crate::online::Remote;
use crate::output::{Format, Outcome};

/// What `map` is asked.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub history: HistoryArgs,
    /// The policy whose segments group the identities (default: the live policy; with
    /// --history and no --policy, identities are not grouped).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Write the map to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The group of identities in no segment.
pub const NO_SEGMENT: &str = "(no segment)";
/// The group of ends that are not identities of the policy.
pub const OUTSIDE: &str = "(outside)";
/// The group of every identity when there is no policy.
pub const UNGROUPED: &str = "(identities)";

/// The whole map, as `-o json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Map {
    /// Where the policy came from, if any.
    pub policy: Option<String>,
    /// Where the flows came from.
    pub history: String,
    /// Groups, segments by name first, then `(no segment)`, then `(outside)`.
    pub groups: Vec<Group>,
    /// Every identity of the policy and every end of a flow.
    pub identities: Vec<Node>,
    /// Between identities.
    pub edges: Vec<Edge>,
    /// Between different groups, added up.
    pub group_edges: Vec<GroupEdge>,
}

/// A group of identities.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: String,
    /// `segment`, `none` (in no segment), `outside` (not identities of the policy).
    pub kind: &'static str,
    pub members: Vec<String>,
}

/// An identity, or an address outside the estate.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub name: String,
    pub group: String,
    /// Its overlay address in the policy, else the address flows showed.
    pub address: Option<String>,
}

/// One port of an edge.
#[derive(Debug, Clone, Serialize)]
pub struct PortUse {
    pub port: String,
    pub count: u64,
    /// The deciding rules as recorded; empty for the default deny.
    pub rules: Vec<String>,
}

/// Flows from one identity to another with one verdict over one path.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub from_group: String,
    pub to_group: String,
    pub verdict: Seen,
    pub path: Way,
    pub count: u64,
    /// The first flow, Unix milliseconds.
    pub first: i64,
    /// The last.
    pub last: i64,
    pub ports: Vec<PortUse>,
}

impl Edge {
    /// `tcp/5432 ×12 (web-to-db)`, port by port.
    pub fn label(&self) -> String {
        self.ports
            .iter()
            .map(|p| {
                let rules = if p.rules.is_empty() {
                    if self.verdict == Seen::Allow {
                        String::new()
                    } else {
                        " (default deny)".into()
                    }
                } else {
                    format!(" ({})", p.rules.join(", "))
                };
                format!("{} ×{}{rules}", p.port, p.count)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rules of every port, without repeats.
    pub fn rules(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.ports.iter().flat_map(|p| &p.rules).collect();
        set.into_iter().cloned().collect()
    }
}

/// Flows between two groups with one verdict over one path.
#[derive(Debug, Clone, Serialize)]
pub struct GroupEdge {
    pub from: String,
    pub to: String,
    pub verdict: Seen,
    pub path: Way,
    pub count: u64,
    /// Identity pairs behind it.
    pub pairs: usize,
    pub ports: Vec<String>,
}

/// Builds the map from the flows and, if any, the policy.
pub fn build(m: Option<&Model>, flows: &[Flow], policy: Option<String>, history: String) -> Map {
    let mut group_of: BTreeMap<String, String> = BTreeMap::new();
    let mut address: HashMap<String, String> = HashMap::new();
    if let Some(m) = m {
        for id in m.identity_ids() {
            let primary = m
                .segments_of(id)
                .iter()
                .min_by_key(|&&s| (m.members(s).len(), m.segment_name(s)))
                .map_or(NO_SEGMENT.to_string(), |&s| m.segment_name(s).to_string());
            let name = m.identity_name(id).to_string();
            address.insert(name.clone(), m.address(id).to_string());
            group_of.insert(name, primary);
        }
    }
    let known = |n: &str| m.is_none_or(|m| m.identity(n).is_some());
    for f in flows {
        for (n, a) in [(&f.src, f.src_address), (&f.dst, f.dst_address)] {
            if !group_of.contains_key(n) {
                let g = if known(n) { UNGROUPED } else { OUTSIDE };
                group_of.insert(n.clone(), g.to_string());
            }
            address.entry(n.clone()).or_insert_with(|| a.to_string());
        }
    }

    // Edges: (from, to, verdict, path) -> port -> (count, rules).
    type Ports = BTreeMap<bulkhead_policy::Probe, (u64, BTreeSet<String>)>;
    type Key<'a> = (&'a str, &'a str, Seen, Way);
    let mut by: BTreeMap<Key<'_>, (Ports, i64, i64)> = BTreeMap::new();
    for f in flows {
        let e = by
            .entry((&f.src, &f.dst, f.verdict, f.path))
            .or_insert_with(|| (Ports::new(), f.first, f.last));
        let p = e.0.entry(f.probe).or_default();
        p.0 += f.count;
        if let Some(r) = &f.rule {
            p.1.insert(r.clone());
        }
        e.1 = e.1.min(f.first);
        e.2 = e.2.max(f.last);
    }
    let edges: Vec<Edge> = by
        .into_iter()
        .map(|((from, to, verdict, path), (ports, first, last))| Edge {
            from: from.to_string(),
            to: to.to_string(),
            from_group: group_of[from].clone(),
            to_group: group_of[to].clone(),
            verdict,
            path,
            count: ports.values().map(|p| p.0).sum(),
            first,
            last,
            ports: ports
                .into_iter()
                .map(|(probe, (count, rules))| PortUse {
                    port: probe.to_string(),
                    count,
                    rules: rules.into_iter().collect(),
                })
                .collect(),
        })
        .collect();

    let mut gby: BTreeMap<Key<'_>, (u64, usize, BTreeSet<&str>)> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.from_group != e.to_group) {
        let g = gby
            .entry((&e.from_group, &e.to_group, e.verdict, e.path))
            .or_default();
        g.0 += e.count;
        g.1 += 1;
        g.2.extend(e.ports.iter().map(|p| p.port.as_str()));
    }
    let group_edges = gby
        .into_iter()
        .map(
            |((from, to, verdict, path), (count, pairs, ports))| GroupEdge {
                from: from.to_string(),
                to: to.to_string(),
                verdict,
                path,
                count,
                pairs,
                ports: ports.into_iter().map(str::to_string).collect(),
            },
        )
        .collect();

    let mut members: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (n, g) in &group_of {
        members.entry(g).or_default().push(n.clone());
    }
    let order = |g: &str| match g {
        NO_SEGMENT => 1,
        UNGROUPED => 2,
        OUTSIDE => 3,
        _ => 0,
    };
    let mut groups: Vec<Group> = members
        .into_iter()
        .map(|(g, members)| Group {
            name: g.to_string(),
            kind: match g {
                NO_SEGMENT | UNGROUPED => "none",
                OUTSIDE => "outside",
                _ => "segment",
            },
            members,
        })
        .collect();
    groups.sort_by(|a, b| (order(&a.name), &a.name).cmp(&(order(&b.name), &b.name)));
    let identities = groups
        .iter()
        .flat_map(|g| {
            g.members.iter().map(|n| Node {
                name: n.clone(),
                group: g.name.clone(),
                address: address.get(n).cloned(),
            })
        })
        .collect();
    Map {
        policy,
        history,
        groups,
        identities,
        edges,
        group_edges,
    }
}

/// `bulkhead map`.
pub fn map(
    args: &Args,
    remote: impl Fn() -> anyhow::Result<Remote>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    args.history.since_secs()?;
    let now = jiff::Timestamp::now().as_second();
    let mut conn = None;
    let (policy, model) = match (&args.policy, args.history.online()) {
        (Some(p), _) => {
            let Some(m) = crate::policy::load_valid(p, now)? else {
                return Ok(Outcome::Failed);
            };
            (Some(p.display().to_string()), Some(m))
        }
        (None, true) => {
            let mut r = remote()?;
            let (text, revision) = crate::flowsource::live_policy(&mut r)?;
            conn = Some(r);
            let name = format!("live policy revision {revision}");
            let loaded = bulkhead_policy::load(&text, now, &BTreeMap::new());
            (Some(name), loaded.model)
        }
        (None, false) => (None, None),
    };
    let history = args.history.load(|| conn.take().map_or_else(&remote, Ok))?;
    history.warn();
    let map = build(
        model.as_ref(),
        &history.flows,
        policy,
        history.source.clone(),
    );
    let text = match fmt {
        Format::Html => render::html(&map),
        Format::Dot => render::dot(&map),
        Format::Json => serde_json::to_string_pretty(&map)? + "\n",
        Format::Yaml => serde_saphyr::to_string(&map)?,
        Format::Table => render::table(&map),
    };
    match &args.out {
        Some(path) => std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        None => crate::output::print(&text)?,
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests;
