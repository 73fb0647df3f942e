//! `policy matrix`: who can reach whom.
//!
//! For people, identities are grouped: identities in exactly the same segments, and not named
//! directly by any rule, are governed by the same rules, so they reach and are reached alike.
//! The table shows groups × groups with a key per distinct set of ports, which stays readable
//! for fifty identities and more. JSON and YAML list every pair.

use std::collections::{BTreeMap, HashMap, HashSet};

use bulkhead_allowlist::AccessSet;
use bulkhead_policy::reach::{Caveat, Reach};
use bulkhead_policy::{IdentityId, Model, RuleId};
use serde::Serialize;

use crate::output::columns;

pub struct Matrix<'a> {
    m: &'a Model,
    file: &'a str,
    groups: Vec<Group>,
    cells: HashMap<(IdentityId, IdentityId), Cell<'a>>,
    reach: &'a [Reach],
}

/// What one pair may open: the ports, the rules granting them, and the conditions some of it
/// holds under (derived from the rules, so equal rules mean equal conditions).
type Cell<'a> = (&'a AccessSet, &'a [RuleId], &'a [Caveat]);

struct Group {
    label: String,
    segments: Vec<String>,
    members: Vec<IdentityId>,
}

#[derive(Serialize)]
pub struct Json {
    file: String,
    identities: Vec<IdentityJson>,
    pairs: Vec<PairJson>,
}

#[derive(Serialize)]
struct IdentityJson {
    name: String,
    address: String,
    segments: Vec<String>,
}

#[derive(Serialize)]
struct PairJson {
    from: String,
    to: String,
    ports: AccessSet,
    rules: Vec<String>,
    /// Empty if all of it is unconditional.
    conditions: Vec<Caveat>,
}

const MAX_LISTED: usize = 6;

impl<'a> Matrix<'a> {
    pub fn new(m: &'a Model, reach: &'a [Reach], file: &'a str) -> Matrix<'a> {
        let named: HashSet<IdentityId> = m
            .rules()
            .iter()
            .flat_map(|r| r.from.identities.iter().chain(&r.to.identities))
            .copied()
            .collect();
        let mut groups: Vec<Group> = Vec::new();
        let mut by_key: BTreeMap<(Vec<u32>, Option<IdentityId>), usize> = BTreeMap::new();
        for id in m.identity_ids() {
            let segs = m.segments_of(id).to_vec();
            let own = named.contains(&id).then_some(id);
            let seg_names: Vec<String> = segs
                .iter()
                .map(|&s| m.segment_name(s).to_string())
                .collect();
            let g: usize = *by_key.entry((segs, own)).or_insert_with(|| {
                let label = match (own, seg_names.is_empty()) {
                    (Some(i), _) => m.identity_name(i).to_string(),
                    (None, true) => "(no segment)".to_string(),
                    (None, false) => seg_names.join("+"),
                };
                groups.push(Group {
                    label,
                    segments: seg_names,
                    members: Vec::new(),
                });
                groups.len() - 1
            });
            groups[g].members.push(id);
        }
        let cells = reach
            .iter()
            .map(|r| {
                let cell = (&r.access, r.rules.as_slice(), r.caveats.as_slice());
                ((r.from, r.to), cell)
            })
            .collect();
        Matrix {
            m,
            file,
            groups,
            cells,
            reach,
        }
    }

    /// The representative pair for a cell: two distinct members, or `None` for a group of one
    /// facing itself.
    fn pair(&self, from: usize, to: usize) -> Option<(IdentityId, IdentityId)> {
        let (f, t) = (&self.groups[from].members, &self.groups[to].members);
        if from != to {
            Some((f[0], t[0]))
        } else {
            f.get(1).map(|&second| (f[0], second))
        }
    }

    pub fn table(&self) -> String {
        let letter = |i: usize| {
            let mut s = String::new();
            let mut n = i;
            loop {
                s.insert(0, (b'A' + (n % 26) as u8) as char);
                if n < 26 {
                    break;
                }
                n = n / 26 - 1;
            }
            s
        };
        let mut out = format!(
            "{}: {} identities in {} groups\n\n",
            self.file,
            self.m.identity_count(),
            self.groups.len()
        );
        let mut rows = vec![vec![
            "GROUP".to_string(),
            "SEGMENTS".into(),
            "MEMBERS".into(),
        ]];
        for (i, g) in self.groups.iter().enumerate() {
            let names: Vec<&str> = g
                .members
                .iter()
                .map(|&id| self.m.identity_name(id))
                .collect();
            let mut listed = names
                .iter()
                .take(MAX_LISTED)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > MAX_LISTED {
                listed += &format!(" and {} more", names.len() - MAX_LISTED);
            }
            let segs = if g.segments.is_empty() {
                "-".to_string()
            } else {
                g.segments.join(", ")
            };
            rows.push(vec![letter(i), segs, listed]);
        }
        out += &columns(&rows);

        // One key per distinct (ports, rules).
        let mut keys: Vec<Cell> = Vec::new();
        let mut grid = vec![vec!["FROM \\ TO".to_string()]];
        grid[0].extend((0..self.groups.len()).map(letter));
        for from in 0..self.groups.len() {
            let mut row = vec![format!("{} {}", letter(from), self.groups[from].label)];
            for to in 0..self.groups.len() {
                let cell = match self.pair(from, to) {
                    None => "-".to_string(),
                    Some(p) => match self.cells.get(&p) {
                        None => ".".to_string(),
                        Some(&v) => {
                            let k = keys.iter().position(|x| *x == v).unwrap_or_else(|| {
                                keys.push(v);
                                keys.len() - 1
                            });
                            // Marked: access behind posture or a time window is not permanent.
                            let mark = if v.2.is_empty() { "" } else { "*" };
                            format!("{}{mark}", k + 1)
                        }
                    },
                };
                row.push(cell);
            }
            grid.push(row);
        }
        out += "\n";
        out += &columns(&grid);
        out += "(a row opens connections to a column; '.' nothing, '-' only itself, N see below;\n \
                N* only under conditions: posture checks or a time window)\n\n";
        if keys.is_empty() {
            out += "no identity can reach another\n";
            return out;
        }
        let mut legend = vec![vec![
            "KEY".to_string(),
            "PORTS".into(),
            "RULES".into(),
            "CONDITIONS".into(),
        ]];
        for (i, (access, rules, caveats)) in keys.iter().enumerate() {
            let names: Vec<&str> = rules
                .iter()
                .map(|&r| self.m.rule(r).name.as_str())
                .collect();
            let conditions = if caveats.is_empty() {
                "-".to_string()
            } else {
                caveats
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let mark = if caveats.is_empty() { "" } else { "*" };
            legend.push(vec![
                format!("{}{mark}", i + 1),
                access.to_string(),
                names.join(", "),
                conditions,
            ]);
        }
        out += &columns(&legend);
        out
    }

    pub fn json(&self) -> Json {
        let m = self.m;
        Json {
            file: self.file.to_string(),
            identities: m
                .identity_ids()
                .map(|id| IdentityJson {
                    name: m.identity_name(id).to_string(),
                    address: m.address(id).to_string(),
                    segments: m
                        .segments_of(id)
                        .iter()
                        .map(|&s| m.segment_name(s).to_string())
                        .collect(),
                })
                .collect(),
            pairs: self
                .reach
                .iter()
                .map(|r| PairJson {
                    from: m.identity_name(r.from).to_string(),
                    to: m.identity_name(r.to).to_string(),
                    ports: r.access.clone(),
                    rules: r.rules.iter().map(|&x| m.rule(x).name.clone()).collect(),
                    conditions: r.caveats.clone(),
                })
                .collect(),
        }
    }
}
