//! `bulkhead policy suggest`: rules for what the flow history observed (spec §9). The logic is
//! `bulkhead_policy::suggest`; this is where the history and the base come from, and where the
//! YAML and the report go.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::anyhow;
use bulkhead_policy::Severity;
use bulkhead_policy::splice::{Block, splice};
use bulkhead_policy::suggest::{Options, Suggested, Suggestion, suggest as make};
use serde::Serialize;

use crate::flowsource::{HistoryArgs, days};
use crate::online::Remote;
use crate::output::{Format, Outcome, emit, escape_controls, time};

/// What `policy suggest` is asked.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub history: HistoryArgs,
    /// The policy to add to: its identities, labels and segments are used, and only what it
    /// does not already allow is suggested (default: the live policy; required with --history).
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// Print the whole base with the additions in place, instead of the additions alone.
    #[arg(long)]
    pub full: bool,
    /// The share of pairs between two groups that must have been observed (or allowed
    /// already) for one rule between the groups; 1 allows nothing unobserved.
    #[arg(long, default_value_t = 1.0, value_name = "SHARE")]
    pub coverage: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    base: &'a str,
    history: &'a str,
    full: bool,
    /// The YAML that goes to stdout in the other formats.
    yaml: &'a str,
    #[serde(flatten)]
    suggestion: &'a Suggestion,
}

/// How many covered connections are listed per rule, and skipped ones per reason.
const LISTED: usize = 10;

/// `bulkhead policy suggest`.
pub fn suggest(
    args: &Args,
    remote: impl Fn() -> anyhow::Result<Remote>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    args.history.since_secs()?;
    if !(args.coverage > 0.0 && args.coverage <= 1.0) {
        return Err(anyhow!("--coverage: a share above 0 and at most 1"));
    }
    if args.base.is_none() && !args.history.online() {
        return Err(anyhow!(
            "with --history, give the policy to add to with --base FILE"
        ));
    }
    // One connection serves both the live policy and the history.
    let mut conn: Option<Remote> = None;
    let (base_name, base_text) = match &args.base {
        Some(p) => (p.display().to_string(), crate::policy::read_text(p)?),
        None => {
            let mut r = remote()?;
            let (text, revision) = crate::flowsource::live_policy(&mut r)?;
            conn = Some(r);
            (format!("live policy revision {revision}"), text)
        }
    };
    let now = jiff::Timestamp::now().as_second();
    let loaded = bulkhead_policy::load(&base_text, now, &BTreeMap::new());
    for d in &loaded.diagnostics {
        eprintln!("{}", d.render(&base_name));
    }
    let Some(base) = loaded.model.as_ref().filter(|_| loaded.is_valid()) else {
        eprintln!("{base_name}: invalid policy: fix it before adding to it");
        return Ok(Outcome::Failed);
    };
    let history = args.history.load(|| conn.take().map_or_else(&remote, Ok))?;
    if history.flows.is_empty() {
        let period = history
            .since_secs
            .map_or(String::new(), |s| format!(" in the last {}", days(s)));
        eprintln!(
            "bulkhead: no flows recorded in {}{period}: nothing to suggest from (let the \
             estate run with the flow history on, then ask again)",
            history.source
        );
        return Ok(Outcome::Failed);
    }
    history.warn();
    let opt = Options {
        coverage: args.coverage,
        ..Options::at(now)
    };
    let s = make(base, &history.flows, &opt);
    let span = bulkhead_policy::observed::span_secs(&history.flows);
    let text = if args.full {
        let merged = splice(
            &base_text,
            &[
                (Block::Segments, s.segment_items()),
                (Block::Rules, s.rule_items()),
                (Block::UnderlayAllow, s.underlay_items()),
            ],
            "# suggested by `bulkhead policy suggest`",
        )
        .map_err(|e| {
            anyhow!(
                "{base_name}: cannot add to it: {e}; run without --full and paste the additions"
            )
        })?;
        let header = format!(
            "# {base_name} with the rules `bulkhead policy suggest` adds for {} connection(s) \
             observed in {} ({}), each marked `# suggested`.\n",
            s.connections,
            history.source,
            days(span)
        );
        let full = header + &merged;
        // What is printed must pass `policy check`: anything else is a bug here.
        let again = bulkhead_policy::load(&full, now, &BTreeMap::new());
        if let Some(d) = again
            .diagnostics
            .iter()
            .find(|d| d.severity == Severity::Error)
        {
            return Err(anyhow!(
                "the merged policy does not pass its check ({}); run without --full",
                d.render("merged")
            ));
        }
        full
    } else {
        s.yaml(&format!(
            "# Suggested by `bulkhead policy suggest` for {} connection(s) observed in {} ({}).\n\
             # Additions to {base_name}: paste each block under the same key there (or run with\n\
             # --full for the whole policy with them in), then `bulkhead policy check` it and\n\
             # `bulkhead policy plan FILE --replay D` it.\n",
            s.connections,
            history.source,
            days(span)
        ))
    };
    eprint!("{}", escape_controls(&report(&s), true));
    let r = Report {
        base: &base_name,
        history: &history.source,
        full: args.full,
        yaml: &text,
        suggestion: &s,
    };
    match fmt {
        Format::Json => emit(fmt, &r, String::new)?,
        _ => crate::output::print(&text)?,
    }
    Ok(Outcome::Ok)
}

/// What each rule covers, and what was left out and why: the report on stderr.
fn report(s: &Suggestion) -> String {
    let mut out = String::new();
    for (what, list) in [("rule", &s.rules), ("underlay entry", &s.underlay)] {
        for r in list {
            out += &rule_report(what, r);
        }
    }
    let by_rules: usize = s
        .rules
        .iter()
        .chain(&s.underlay)
        .map(|r| r.covers.len())
        .sum();
    out += &format!(
        "coverage: {} of {} observed connection(s) keep working: {} already allowed by the \
         base, {by_rules} by the suggestion; {} skipped\n",
        s.covered(),
        s.connections,
        s.kept.len(),
        s.skipped.len()
    );
    let mut kinds: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for x in &s.skipped {
        kinds.entry(x.kind).or_default().push(x);
    }
    for (kind, list) in kinds {
        out += &format!("  skipped, {kind}: {} connection(s)\n", list.len());
        for x in list.iter().take(LISTED) {
            out += &format!(
                "    {} -> {} {} ({}, {} flows): {}\n",
                x.from, x.to, x.port, x.path, x.count, x.reason
            );
        }
        if list.len() > LISTED {
            out += &format!("    and {} more\n", list.len() - LISTED);
        }
    }
    out
}

fn rule_report(what: &str, r: &Suggested) -> String {
    let bulkhead_policy::suggest::Coverage {
        pairs,
        flows,
        first,
        last,
    } = r.coverage();
    let mut out = format!(
        "{what} {}: {} -> {} {}\n  covers {} connection(s) of {} pair(s), {flows} flow(s), first \
         seen {}, last seen {}\n",
        r.name,
        r.from.join(", "),
        r.to.join(", "),
        r.ports.join(", "),
        r.covers.len(),
        pairs,
        time(first / 1000),
        time(last / 1000)
    );
    for c in r.covers.iter().take(LISTED) {
        let mut note = String::new();
        if c.denied > 0 {
            note += &format!(", {} denied when recorded", c.denied);
        }
        if c.would_deny > 0 {
            note += &format!(", {} would-deny", c.would_deny);
        }
        out += &format!(
            "    {} -> {} {}: {} flow(s), {} to {}{note}\n",
            c.from,
            c.to,
            c.port,
            c.count,
            time(c.first / 1000),
            time(c.last / 1000)
        );
    }
    if r.covers.len() > LISTED {
        out += &format!("    and {} more\n", r.covers.len() - LISTED);
    }
    let denied = r.covers.iter().filter(|c| c.denied == c.count).count();
    if denied > 0 {
        out += &format!(
            "  note: {denied} of them never got through (denied when recorded): make sure they \
             are wanted\n"
        );
    }
    if r.unobserved > 0 {
        out += &format!(
            "  note: also allows {} pair-port(s) never observed (--coverage below 1)\n",
            r.unobserved
        );
    }
    out
}
