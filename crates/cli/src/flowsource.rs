//! Where `policy suggest`, `policy plan --replay` and `map` get the flow history from: the
//! controllers (`--since D`), or a file (`--history FILE`: JSON lines of `FlowAggregate`, as
//! `bulkhead flows --since D -o json` prints them), so that CI and tests need no controller.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use bulkhead_policy::Probe;
use bulkhead_policy::observed::{Flow, Seen, Way};
use bulkhead_proto::{FlowAggregate, Path as NetPath, Verdict};

use crate::online::Remote;

/// Below this, rare periodic jobs (weekly backups, monthly reports) may be missing.
pub const SHORT_WINDOW_SECS: i64 = 7 * 86_400;

/// `--since D` and `--history FILE`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HistoryArgs {
    /// The period of history to use, like `30d` or `12h` (default 30d from the controllers;
    /// with --history, the last D of the file, counted from its newest hour).
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Read the flow history from FILE (JSON lines of flow aggregates, as `bulkhead flows
    /// --since D -o json` prints them) instead of asking the controllers.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
}

/// The flows of the period, and what was said about them.
#[derive(Debug)]
pub struct History {
    /// The aggregates, in the policy's terms.
    pub flows: Vec<Flow>,
    /// Where they came from, for messages: the file, or `the controllers`.
    pub source: String,
    /// The period asked for, in seconds; `None`: the whole file.
    pub since_secs: Option<i64>,
    /// Aggregates left out because this version does not know their verdict or path.
    pub unknown: usize,
}

impl HistoryArgs {
    /// `--since` in seconds, checked (a bad duration is a usage error).
    pub fn since_secs(&self) -> anyhow::Result<Option<i64>> {
        self.since
            .as_deref()
            .map(|s| bulkhead_policy::parse_duration(s).map_err(|e| anyhow!("--since: {e}")))
            .transpose()
    }

    /// Whether the history comes from the controllers.
    pub fn online(&self) -> bool {
        self.history.is_none()
    }

    /// Reads the history: the file's, or the controllers' (`remote` is only called then).
    pub fn load(&self, remote: impl FnOnce() -> anyhow::Result<Remote>) -> anyhow::Result<History> {
        let since = self.since_secs()?;
        let (aggregates, source) = match &self.history {
            Some(path) => (read_file(path)?, path.display().to_string()),
            None => {
                let since = since.unwrap_or(DEFAULT_SINCE_SECS);
                (
                    fetch_online(&mut remote()?, since)?,
                    "the controllers".to_string(),
                )
            }
        };
        let (flows, unknown) = convert(aggregates, since);
        Ok(History {
            flows,
            source,
            since_secs: since.or(self.online().then_some(DEFAULT_SINCE_SECS)),
            unknown,
        })
    }
}

/// The default period for the online commands: the controllers keep 30 days.
const DEFAULT_SINCE_SECS: i64 = 30 * 86_400;

/// The last `since_secs` of flow history from the controllers: their durable histories
/// (`GET /v1/flows/history`), merged over every live controller.
fn fetch_online(r: &mut Remote, since_secs: i64) -> anyhow::Result<Vec<FlowAggregate>> {
    crate::history::fetch(r, since_secs)
}

/// Reads a history file: JSON lines of `FlowAggregate` (a JSON array of them is read too).
pub fn read_file(path: &Path) -> anyhow::Result<Vec<FlowAggregate>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON list of flow aggregates", path.display()));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a flow aggregate", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// The aggregates of the last `since` seconds (counted back from the newest hour) in the
/// policy's terms, and how many were left out for a verdict or path this version does not know.
pub fn convert(aggregates: Vec<FlowAggregate>, since: Option<i64>) -> (Vec<Flow>, usize) {
    let newest = aggregates.iter().map(|a| a.hour).max().unwrap_or(0);
    let from = since.map_or(i64::MIN, |s| newest + 3600 - s);
    let mut unknown = 0;
    let mut flows = Vec::with_capacity(aggregates.len());
    for a in aggregates.into_iter().filter(|a| a.hour >= from) {
        let verdict = match a.verdict {
            Verdict::Allow => Seen::Allow,
            Verdict::Deny => Seen::Deny,
            Verdict::WouldDeny => Seen::WouldDeny,
            Verdict::Unknown => {
                unknown += 1;
                continue;
            }
        };
        let path = match a.path {
            NetPath::Overlay => Way::Overlay,
            NetPath::Underlay => Way::Underlay,
            NetPath::Unknown => {
                unknown += 1;
                continue;
            }
        };
        flows.push(Flow {
            hour: a.hour,
            src: a.src,
            src_address: a.src_address,
            dst: a.dst,
            dst_address: a.dst_address,
            probe: Probe {
                proto: a.proto.number(),
                port: a.port,
            },
            verdict,
            path,
            rule: a.rule,
            count: a.count,
            first: a.first,
            last: a.last,
        });
    }
    (flows, unknown)
}

impl History {
    /// Says on stderr what the period may miss: a short window, aggregates left out.
    pub fn warn(&self) {
        if self.unknown > 0 {
            eprintln!(
                "bulkhead: warning: {} aggregate(s) in {} have a verdict or path this version \
                 does not know; they are left out",
                self.unknown, self.source
            );
        }
        let span = bulkhead_policy::observed::span_secs(&self.flows);
        let window = self.since_secs.map_or(span, |s| s.min(span));
        if !self.flows.is_empty() && window < SHORT_WINDOW_SECS {
            eprintln!(
                "bulkhead: warning: the history covers {} only: jobs that run weekly or monthly \
                 (backups, reports) may be missing from it; 30d is safer",
                days(window)
            );
        }
    }
}

/// Seconds for people: `3d 4h`, `5h`.
pub fn days(secs: i64) -> String {
    let (d, h) = (secs / 86_400, (secs % 86_400) / 3600);
    match (d, h) {
        (0, h) => format!("{h}h"),
        (d, 0) => format!("{d}d"),
        (d, h) => format!("{d}d {h}h"),
    }
}

/// The live policy's text and its revision, for commands that need a base and were given none.
pub fn live_policy(r: &mut Remote) -> anyhow::Result<(String, u64)> {
    let p = crate::online::policy_view(r)?;
    Ok((p.text, p.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(hour: i64, verdict: Verdict) -> FlowAggregate {
        FlowAggregate {
            hour,
            src: "a".into(),
            src_address: std::net::Ipv4Addr::new(10, 0, 0, 1),
            dst: "b".into(),
            dst_address: std::net::Ipv4Addr::new(10, 0, 0, 2),
            proto: bulkhead_proto::Protocol::Tcp,
            port: 22,
            verdict,
            path: NetPath::Overlay,
            rule: None,
            count: 1,
            first: hour * 1000,
            last: hour * 1000,
        }
    }

    #[test]
    fn since_counts_back_from_the_newest_hour_and_unknowns_are_left_out() {
        let aggs = vec![
            agg(0, Verdict::Allow),
            agg(3600 * 10, Verdict::Deny),
            agg(3600 * 20, Verdict::Unknown),
            agg(3600 * 30, Verdict::WouldDeny),
        ];
        let (all, unknown) = convert(aggs.clone(), None);
        assert_eq!((all.len(), unknown), (3, 1));
        let (last, _) = convert(aggs, Some(21 * 3600));
        let hours: Vec<i64> = last.iter().map(|f| f.hour / 3600).collect();
        assert_eq!(hours, [10, 30]);
        assert_eq!(days(3 * 86_400 + 7200), "3d 2h");
        assert_eq!(days(3600), "1h");
    }
}
