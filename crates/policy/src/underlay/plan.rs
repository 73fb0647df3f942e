//! What changes on the underlay between two policies: the block as written (mode, scope, allow
//! entries), and, server by server, the mode and what may cross its host firewall.

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_allowlist::{Underlay, UnderlayHost, UnderlayMode};
use serde::Serialize;

use crate::ast::{UnderlayAllowDef, UnderlayDef, UnderlaySource};
use crate::compile::Compiled;
use crate::model::Model;

use super::underlay_of;

/// One item of the block that differs, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockChange {
    /// `mode`, `scope` or `allow NAME`.
    pub item: String,
    /// Before; `None`: not there.
    pub before: Option<String>,
    /// After; `None`: not there.
    pub after: Option<String>,
}

/// One server whose host firewall changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerChange {
    /// The identity.
    pub identity: String,
    /// Its mode before (`off` outside the scope, or for a new identity).
    pub before: UnderlayMode,
    /// Its mode after (`off` outside the scope, or for a removed identity).
    pub after: UnderlayMode,
    /// What may cross its firewall now and could not before, e.g. `in tcp/22 from
    /// 10.0.9.0/24` or `out tcp/873 to db-1`. Only while it has a firewall before and after:
    /// a server that gains one loses everything its entries do not allow, one that loses it
    /// lets everything through.
    pub gained: Vec<String>,
    /// What could cross it before and cannot now.
    pub lost: Vec<String>,
}

/// The underlay's part of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The block's items that differ: mode, scope, then allow entries in the new policy's
    /// order, then those removed.
    pub block: Vec<BlockChange>,
    /// The servers whose firewall changes, by name.
    pub servers: Vec<ServerChange>,
}

impl Plan {
    /// Whether nothing changes on the underlay.
    pub fn is_empty(&self) -> bool {
        self.block.is_empty() && self.servers.is_empty()
    }
}

/// The underlay's change from `old` (none: no policy) to `new`.
pub fn plan(old: Option<(&Model, &Compiled)>, new: (&Model, &Compiled)) -> Plan {
    let def = |m: &Model| m.policy().underlay.clone();
    Plan {
        block: block_changes(old.and_then(|o| def(o.0)).as_ref(), def(new.0).as_ref()),
        servers: server_changes(old, new),
    }
}

fn mode(d: Option<&UnderlayDef>) -> String {
    d.map_or(UnderlayMode::Off, |d| d.mode).to_string()
}

fn scope(d: Option<&UnderlayDef>) -> String {
    match d.and_then(|d| d.scope.as_ref()) {
        None => "every identity".to_string(),
        Some(s) => s
            .iter()
            .map(|n| n.value.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// An entry as written, e.g. `from 10.0.9.0/24, admins; to *; ports tcp/22`.
fn entry(e: &UnderlayAllowDef) -> String {
    let from: Vec<String> = e
        .from
        .iter()
        .map(|s| match &s.value {
            UnderlaySource::Net(n) => n.to_string(),
            UnderlaySource::Name(n) => n.clone(),
        })
        .collect();
    let to: Vec<&str> = e.to.iter().map(|s| s.value.as_str()).collect();
    let ports: Vec<String> = e.ports.iter().map(|p| p.value.to_string()).collect();
    format!(
        "from {}; to {}; ports {}",
        from.join(", "),
        to.join(", "),
        ports.join(", ")
    )
}

fn block_changes(old: Option<&UnderlayDef>, new: Option<&UnderlayDef>) -> Vec<BlockChange> {
    let mut out = Vec::new();
    let mut item = |item: String, before: Option<String>, after: Option<String>| {
        if before != after {
            out.push(BlockChange {
                item,
                before,
                after,
            });
        }
    };
    item("mode".into(), Some(mode(old)), Some(mode(new)));
    item("scope".into(), Some(scope(old)), Some(scope(new)));
    let entries = |d: Option<&UnderlayDef>| -> Vec<(String, String)> {
        d.map(|d| {
            d.allow
                .iter()
                .map(|e| (e.name.value.clone(), entry(e)))
                .collect()
        })
        .unwrap_or_default()
    };
    let (before, after) = (entries(old), entries(new));
    let find = |v: &[(String, String)], name: &str| {
        v.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone())
    };
    for (name, e) in &after {
        item(
            format!("allow {name}"),
            find(&before, name),
            Some(e.clone()),
        );
    }
    for (name, e) in &before {
        if find(&after, name).is_none() {
            item(format!("allow {name}"), Some(e.clone()), None);
        }
    }
    out
}

/// What may cross a server's firewall, one connection kind per string.
fn crossings(u: &Underlay) -> BTreeSet<String> {
    let host = |h: &UnderlayHost| match h {
        UnderlayHost::Net(n) => n.to_string(),
        UnderlayHost::Identity(n) => n.clone(),
    };
    let mut out = BTreeSet::new();
    for (dir, word, rules) in [("in", "from", &u.inbound), ("out", "to", &u.outbound)] {
        for r in rules {
            for h in &r.hosts {
                for p in &r.ports {
                    out.insert(format!("{dir} {p} {word} {}", host(h)));
                }
            }
        }
    }
    out
}

fn server_changes(old: Option<(&Model, &Compiled)>, new: (&Model, &Compiled)) -> Vec<ServerChange> {
    let all = |(m, c): (&Model, &Compiled)| -> BTreeMap<String, Option<Underlay>> {
        m.identity_ids()
            .map(|id| {
                (
                    m.identity_name(id).to_string(),
                    underlay_of(m, c.state(), id),
                )
            })
            .collect()
    };
    let before = old.map(all).unwrap_or_default();
    let after = all(new);
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let b = before.get(name).and_then(Option::as_ref);
        let a = after.get(name).and_then(Option::as_ref);
        if b == a {
            continue;
        }
        let mode = |u: Option<&Underlay>| u.map_or(UnderlayMode::Off, |u| u.mode);
        let (gained, lost) = match (b, a) {
            (Some(b), Some(a)) => {
                let (x, y) = (crossings(b), crossings(a));
                (
                    y.difference(&x).cloned().collect(),
                    x.difference(&y).cloned().collect(),
                )
            }
            _ => (Vec::new(), Vec::new()),
        };
        let change = ServerChange {
            identity: name.clone(),
            before: mode(b),
            after: mode(a),
            gained,
            lost,
        };
        if change.before != change.after || !change.gained.is_empty() || !change.lost.is_empty() {
            out.push(change);
        }
    }
    out
}
