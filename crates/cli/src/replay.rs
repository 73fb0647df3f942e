//! `bulkhead policy plan FILE --replay D` (spec §9): the recorded flows of a period replayed
//! against FILE. Online, besides the controller's plan; offline with `--history H`, the replay
//! alone, so that CI can gate a change without a controller. The logic is
//! `bulkhead_policy::replay`.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use bulkhead_policy::replay::{Change, Replay, replay};
use bulkhead_policy::{Conditions, observed::Way};
use bulkhead_proto::PlanResponse;
use serde::Serialize;

use crate::flowsource::{HistoryArgs, days};
use crate::online::{self, Remote};
use crate::output::{Format, Outcome, columns, emit, time};

#[derive(Serialize)]
struct Report<'a> {
    file: String,
    history: &'a str,
    /// The controller's plan; absent offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a PlanResponse>,
    replay: &'a Replay,
}

/// `bulkhead policy plan FILE --replay D` / `--history H`: exit 1 if anything observed would
/// newly be denied.
pub fn plan(
    file: &Path,
    since: Option<String>,
    history: Option<PathBuf>,
    remote: impl FnOnce() -> anyhow::Result<Remote>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let args = HistoryArgs { since, history };
    args.since_secs()?;
    let now = jiff::Timestamp::now().as_second();
    let Some(m) = crate::policy::load_valid(file, now)? else {
        return Ok(Outcome::Failed);
    };
    let mut conn = None;
    let plan = if args.online() {
        let mut r = remote()?;
        let p = match online::plan_of(&mut r, file)? {
            Ok(p) => p,
            Err(o) => return Ok(o),
        };
        conn = Some(r);
        Some(p)
    } else {
        None
    };
    let history = args.load(|| conn.ok_or_else(|| anyhow!("no controller connection")))?;
    history.warn();
    if history.flows.is_empty() {
        eprintln!(
            "bulkhead: warning: no flows recorded in {}: nothing to replay",
            history.source
        );
    }
    let r = replay(&m, &m.state(&Conditions::at(now)), &history.flows);
    let report = Report {
        file: file.display().to_string(),
        history: &history.source,
        plan: plan.as_ref(),
        replay: &r,
    };
    emit(fmt, &report, || {
        let mut s = plan.as_ref().map(online::plan_text).unwrap_or_default();
        if plan.is_some() {
            s += "\n";
        }
        let period = history
            .since_secs
            .map_or(String::new(), |x| format!(", last {}", days(x)));
        s += &format!(
            "replayed {} flow(s) of {} connection(s) from {}{period} against {}:\n",
            r.flows, r.connections, history.source, report.file
        );
        s + &table(&r)
    })?;
    Ok(Outcome::ok_if(r.newly_denied.is_empty()))
}

fn table(r: &Replay) -> String {
    let mut s = String::new();
    for (title, list) in [
        ("NEWLY DENIED", &r.newly_denied),
        ("NEWLY ALLOWED", &r.newly_allowed),
    ] {
        if list.is_empty() {
            continue;
        }
        s += &format!("\n{title}\n");
        let mut rows = vec![
            [
                "FROM",
                "TO",
                "PORT",
                "PATH",
                "FLOWS",
                "LAST SEEN",
                "RECORDED RULE",
                "NOW",
            ]
            .map(String::from)
            .to_vec(),
        ];
        rows.extend(list.iter().map(row));
        s += &columns(&rows);
    }
    let outside = if r.outside > 0 {
        format!(
            " ({} with an address outside the estate not replayed)",
            r.outside
        )
    } else {
        String::new()
    };
    s + &format!(
        "\n{} connection(s) would newly be denied, {} newly allowed{outside}\n",
        r.newly_denied.len(),
        r.newly_allowed.len()
    )
}

fn row(c: &Change) -> Vec<String> {
    vec![
        c.from.clone(),
        c.to.clone(),
        c.port.clone(),
        match c.path {
            Way::Overlay => "overlay".into(),
            Way::Underlay => "underlay".into(),
        },
        c.count.to_string(),
        time(c.last / 1000),
        if c.before_rules.is_empty() {
            "-".into()
        } else {
            c.before_rules.join(", ")
        },
        c.reason.clone(),
    ]
}
