//! The durable flow history (spec §9), read from every live controller: what
//! `bulkhead flows --since D` shows, and what commands that learn from observed traffic
//! (`policy suggest`, `plan --replay`, `map`) build on, through [`fetch`].
//!
//! Each controller keeps the flows its own nodes reported, as per-hour aggregates
//! (`GET /v1/flows/history`); a node that moved between controllers in the hour left a part with
//! each. So the parts are merged: one aggregate per hour and kind of flow, the counts added up.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use bulkhead_proto::{FlowAggregate, Path, Protocol, Verdict};

use crate::online::{FlowFilter, Remote};
use crate::output::{Format, Outcome, columns, emit, time};

/// Every aggregate of the last `since_secs` seconds, from every live controller, merged
/// ([`merge`]): one per hour and kind of flow, oldest hour first. Hours are whole: an aggregate
/// is included if any of its flows falls in the period. A controller other than the configured
/// one that does not answer is named on stderr and its nodes' flows are missing.
pub fn fetch(r: &mut Remote, since_secs: i64) -> anyhow::Result<Vec<FlowAggregate>> {
    fetch_filtered(r, since_secs, &FlowFilter::default())
}

/// [`fetch`], only what `filter` selects (the controllers filter).
pub fn fetch_filtered(
    r: &mut Remote,
    since_secs: i64,
    filter: &FlowFilter,
) -> anyhow::Result<Vec<FlowAggregate>> {
    anyhow::ensure!(since_secs > 0, "the period must be more than zero seconds");
    let mut path = format!("/v1/flows/history?since={since_secs}");
    if filter.denied {
        path += "&denied=1";
    }
    for (k, v) in [
        ("identity", &filter.identity),
        ("path", &filter.path),
        ("verdict", &filter.verdict),
    ] {
        if let Some(v) = v {
            path += &format!("&{k}={v}");
        }
    }
    let mut parts = Vec::new();
    r.stream_all(
        &path,
        "the flows its nodes reported are missing",
        |a: FlowAggregate| parts.push(a),
    )?;
    Ok(merge(parts))
}

/// What makes two aggregates the same kind of flow in the same hour.
type Kind = (
    i64,
    String,
    Ipv4Addr,
    String,
    Ipv4Addr,
    Protocol,
    u16,
    Verdict,
    Path,
    Option<String>,
);

fn kind(a: &FlowAggregate) -> Kind {
    (
        a.hour,
        a.src.clone(),
        a.src_address,
        a.dst.clone(),
        a.dst_address,
        a.proto,
        a.port,
        a.verdict,
        a.path,
        a.rule.clone(),
    )
}

/// Aggregates from several controllers as one: those of the same kind and hour
/// ([`FlowAggregate::same_kind`]) become one ([`FlowAggregate::absorb`]: counts added, the
/// earliest first, the latest last). Sorted by hour, then source, destination, protocol, port,
/// verdict, path and rule.
pub fn merge(parts: impl IntoIterator<Item = FlowAggregate>) -> Vec<FlowAggregate> {
    let mut by_kind: HashMap<Kind, FlowAggregate> = HashMap::new();
    for a in parts {
        match by_kind.get_mut(&kind(&a)) {
            Some(m) => m.absorb(&a),
            None => {
                by_kind.insert(kind(&a), a);
            }
        }
    }
    let mut out: Vec<(Kind, FlowAggregate)> = by_kind.into_iter().collect();
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, a)| a).collect()
}

const HEADER: [&str; 8] = [
    "HOUR", "FROM", "TO", "PORT", "PATH", "VERDICT", "RULE", "COUNT",
];

/// One aggregate as a table row.
fn row(a: &FlowAggregate) -> Vec<String> {
    let port = match a.proto {
        Protocol::Icmp => "icmp".to_string(),
        p => format!("{p}/{}", a.port),
    };
    vec![
        time(a.hour),
        format!("{} ({})", a.src, a.src_address),
        format!("{} ({})", a.dst, a.dst_address),
        port,
        a.path.to_string(),
        a.verdict.to_string(),
        a.rule.clone().unwrap_or_else(|| "(default deny)".into()),
        a.count.to_string(),
    ]
}

/// `bulkhead flows --since D`: the history of the period from every live controller, merged;
/// a table (HOUR, FROM, TO, PORT, PATH, VERDICT, RULE, COUNT), or the aggregates as JSON/YAML.
pub fn show(
    r: &mut Remote,
    since_secs: i64,
    filter: &FlowFilter,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let all = fetch_filtered(r, since_secs, filter)?;
    emit(fmt, &all, || {
        let mut rows = vec![HEADER.map(String::from).to_vec()];
        rows.extend(all.iter().map(row));
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(hour: i64, port: u16, count: u64, first: i64, last: i64) -> FlowAggregate {
        FlowAggregate {
            hour,
            src: "web-1".into(),
            src_address: Ipv4Addr::new(10, 0, 0, 1),
            dst: "db-1".into(),
            dst_address: Ipv4Addr::new(10, 0, 0, 2),
            proto: Protocol::Tcp,
            port,
            verdict: Verdict::Allow,
            path: Path::Overlay,
            rule: Some("web-to-db".into()),
            count,
            first,
            last,
        }
    }

    #[test]
    fn parts_from_several_controllers_merge_by_kind_and_hour() {
        // Controller A's and B's parts of hour 7200 (the node moved), and hours of their own.
        let a = [
            agg(7200, 5432, 3, 7_300_000, 7_500_000),
            agg(3600, 5432, 1, 3_700_000, 3_700_000),
        ];
        let b = [
            agg(7200, 5432, 2, 7_250_000, 7_400_000),
            agg(7200, 22, 1, 7_260_000, 7_260_000),
            FlowAggregate {
                verdict: Verdict::Deny,
                rule: None,
                ..agg(7200, 5432, 4, 7_210_000, 7_220_000)
            },
        ];
        let m = merge(a.into_iter().chain(b));
        let brief: Vec<_> = m
            .iter()
            .map(|x| (x.hour, x.port, x.verdict, x.count, x.first, x.last))
            .collect();
        assert_eq!(
            brief,
            [
                (3600, 5432, Verdict::Allow, 1, 3_700_000, 3_700_000),
                (7200, 22, Verdict::Allow, 1, 7_260_000, 7_260_000),
                (7200, 5432, Verdict::Allow, 5, 7_250_000, 7_500_000),
                (7200, 5432, Verdict::Deny, 4, 7_210_000, 7_220_000),
            ]
        );
        assert!(merge([]).is_empty());
    }

    #[test]
    fn a_row_says_what_a_person_needs() {
        let mut a = agg(1_764_572_400, 5432, 12, 0, 0);
        assert_eq!(
            row(&a),
            [
                "2025-12-01T07:00:00Z",
                "web-1 (10.0.0.1)",
                "db-1 (10.0.0.2)",
                "tcp/5432",
                "overlay",
                "allow",
                "web-to-db",
                "12"
            ]
        );
        a.proto = Protocol::Icmp;
        a.port = 0;
        a.rule = None;
        let r = row(&a);
        assert_eq!((r[3].as_str(), r[6].as_str()), ("icmp", "(default deny)"));
    }
}
