//! The offline policy commands: check, test, explain, matrix, diff.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, anyhow};
use bulkhead_policy::{
    Compiled, Conditions, Diagnostic, Inactive, Loaded, MAX_BYTES, Model, Severity, evaluate,
    parse_probe, parse_time, posture, reach,
};
use serde::Serialize;

use crate::When;
use crate::output::{Format, Outcome, columns, emit, time};

/// A policy file as read from disk.
struct Source {
    path: String,
    loaded: Loaded,
}

impl Source {
    /// Reads and loads a policy, printing every diagnostic to stderr.
    fn load(path: &Path, now: i64, prior: &BTreeMap<String, Ipv4Addr>) -> anyhow::Result<Source> {
        let text = read_text(path)?;
        Ok(Source::report(
            path,
            bulkhead_policy::load(&text, now, prior),
        ))
    }

    /// A loaded policy, its diagnostics printed.
    fn report(path: &Path, loaded: Loaded) -> Source {
        let path = path.display().to_string();
        for d in &loaded.diagnostics {
            eprintln!("{}", d.render(&path));
        }
        Source { path, loaded }
    }

    /// The model, if the policy is valid; `None` after diagnostics were printed.
    fn valid_model(&self) -> Option<&Model> {
        self.loaded
            .model
            .as_ref()
            .filter(|_| self.loaded.is_valid())
    }

    fn errors(&self) -> usize {
        self.loaded
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    fn invalid(&self) -> anyhow::Result<Outcome> {
        eprintln!("{}: invalid policy, {} error(s)", self.path, self.errors());
        Ok(Outcome::Failed)
    }
}

/// Loads a policy a command needs valid, its diagnostics on stderr (`FILE:LINE:COL`); `None`
/// after saying it is invalid.
pub fn load_valid(path: &Path, now: i64) -> anyhow::Result<Option<Model>> {
    let src = Source::load(path, now, &BTreeMap::new())?;
    if src.valid_model().is_none() {
        src.invalid()?;
        return Ok(None);
    }
    Ok(src.loaded.model)
}

/// Reads a policy file, but no more of it than a policy may be: a longer file is cut a little
/// past [`MAX_BYTES`], so that loading it reports the size, with a position, without reading a
/// file of any size into memory first.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let cannot = || format!("cannot read {}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(cannot)?
        // Room for a character cut in two at the end to still leave MAX_BYTES + 1 whole bytes.
        .take(MAX_BYTES as u64 + 4)
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) if e.as_bytes().len() > MAX_BYTES && e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8 text", cannot()))
        }
        Err(_) => Err(anyhow!("{}: not UTF-8 text", cannot())),
    }
}

fn now(when: &When) -> anyhow::Result<i64> {
    match &when.at {
        Some(s) => parse_time(s).map_err(|e| anyhow!("--at: {e}")),
        None => Ok(jiff::Timestamp::now().as_second()),
    }
}

#[derive(Serialize)]
struct CheckReport<'a> {
    file: &'a str,
    valid: bool,
    identities: usize,
    segments: usize,
    rules: usize,
    tests: usize,
    /// The `underlay` block, if the policy has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    underlay: Option<crate::underlay::Summary>,
    diagnostics: &'a [Diagnostic],
}

/// `bulkhead policy check FILE`.
pub fn check(file: &Path, when: &When, fmt: Format) -> anyhow::Result<Outcome> {
    let src = Source::load(file, now(when)?, &BTreeMap::new())?;
    let valid = src.loaded.is_valid();
    let p = src.loaded.model.as_ref().map(|m| m.policy());
    let report = CheckReport {
        file: &src.path,
        valid,
        identities: p.map_or(0, |p| p.identities.len()),
        segments: p.map_or(0, |p| p.segments.len()),
        rules: p.map_or(0, |p| p.rules.len()),
        tests: src.loaded.tests.len(),
        underlay: src.valid_model().and_then(crate::underlay::Summary::of),
        diagnostics: &src.loaded.diagnostics,
    };
    emit(fmt, &report, || {
        if valid {
            let underlay = report
                .underlay
                .as_ref()
                .map_or_else(String::new, |u| format!("; {}", u.line()));
            format!(
                "{}: valid: {} identities, {} segments, {} rules, {} tests pass{underlay}\n",
                report.file, report.identities, report.segments, report.rules, report.tests
            )
        } else {
            String::new()
        }
    })?;
    if !valid {
        return src.invalid();
    }
    Ok(Outcome::Ok)
}

#[derive(Serialize)]
struct TestReport<'a> {
    file: &'a str,
    passed: usize,
    failed: usize,
    tests: &'a [bulkhead_policy::TestOutcome],
}

/// `bulkhead policy test FILE`.
pub fn test(
    file: &Path,
    when: &When,
    facts: Option<&Path>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let now = now(when)?;
    let src = match facts {
        None => Source::load(file, now, &BTreeMap::new())?,
        Some(facts) => {
            // The checks are the policy's, so read it once quietly to know them.
            let text = read_text(file)?;
            let first = bulkhead_policy::load(&text, now, &BTreeMap::new());
            let failing = match &first.model {
                Some(m) => SampleFacts::read(facts)?.failing(m, &file.display().to_string())?,
                None => Default::default(),
            };
            Source::report(
                file,
                bulkhead_policy::load_assuming(&text, now, &BTreeMap::new(), &failing),
            )
        }
    };
    if src.loaded.model.is_none() {
        return src.invalid();
    }
    let tests = &src.loaded.tests;
    let failed = tests.iter().filter(|t| !t.passed).count();
    let report = TestReport {
        file: &src.path,
        passed: tests.len() - failed,
        failed,
        tests,
    };
    emit(fmt, &report, || {
        let verdict = |e: bulkhead_policy::Expect| format!("{e:?}").to_lowercase();
        let mut rows = vec![vec![
            "RESULT".into(),
            "LINE".into(),
            "FROM".into(),
            "TO".into(),
            "PORT".into(),
            "EXPECT".into(),
            "GOT".into(),
            "RULE".into(),
        ]];
        for t in tests {
            rows.push(vec![
                if t.passed { "pass" } else { "FAIL" }.into(),
                t.pos.line.to_string(),
                t.from.clone(),
                t.to.clone(),
                t.port.clone(),
                verdict(t.expect),
                verdict(t.got),
                t.rule.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        let summary = if failed == 0 {
            format!("all {} tests pass\n", tests.len())
        } else {
            format!("{failed} of {} tests fail\n", tests.len())
        };
        columns(&rows) + &summary
    })?;
    if !src.loaded.is_valid() {
        return Ok(Outcome::Failed);
    }
    Ok(Outcome::Ok)
}

/// What `explain` is asked about.
#[derive(Debug)]
pub struct Query {
    pub from: String,
    pub to: String,
    pub port: String,
    pub failing: Vec<String>,
    pub quarantined: Vec<String>,
    pub facts: Option<std::path::PathBuf>,
    pub path: NetPath,
    pub from_address: Option<Ipv4Addr>,
}

/// Which way between two servers `explain` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetPath {
    /// Through the tunnels: the policy's rules.
    Overlay,
    /// Over the servers' own network: the `underlay` block.
    Underlay,
}

/// `--facts FILE`: sample facts per identity, as daemons would report them.
struct SampleFacts(BTreeMap<String, posture::Facts>);

/// One fact's value as YAML writes it: `6.1.0-18-amd64`, `true`, `12`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FactValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl SampleFacts {
    fn read(path: &Path) -> anyhow::Result<SampleFacts> {
        let text = read_text(path)?;
        let raw: BTreeMap<String, BTreeMap<String, FactValue>> = serde_saphyr::from_str(&text)
            .map_err(|e| {
                anyhow!(
                    "{}: expected IDENTITY: {{ FACT: VALUE, ... }}: {e}",
                    path.display()
                )
            })?;
        Ok(SampleFacts(
            raw.into_iter()
                .map(|(id, facts)| {
                    let facts = facts
                        .into_iter()
                        .map(|(k, v)| {
                            let v = match v {
                                FactValue::Bool(b) => b.to_string(),
                                FactValue::Int(n) => n.to_string(),
                                FactValue::Float(x) => x.to_string(),
                                FactValue::Text(t) => t,
                            };
                            (k, v)
                        })
                        .collect();
                    (id, facts)
                })
                .collect(),
        ))
    }

    /// Each `(identity, check)` that fails on the identity's facts, with the reason. An
    /// identity the file does not list is not judged (it passes, as without `--facts`).
    fn judge(&self, m: &Model, policy: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for (id, facts) in &self.0 {
            m.identity(id)
                .ok_or_else(|| anyhow!("--facts: {policy} has no identity named {id:?}"))?;
            for check in &m.policy().posture {
                if let Err(why) = posture::evaluate(check, facts) {
                    out.push((id.clone(), check.name.clone(), why));
                }
            }
        }
        Ok(out)
    }

    fn failing(
        &self,
        m: &Model,
        policy: &str,
    ) -> anyhow::Result<std::collections::BTreeSet<(String, String)>> {
        Ok(self
            .judge(m, policy)?
            .into_iter()
            .map(|(id, check, _)| (id, check))
            .collect())
    }
}

#[derive(Serialize)]
struct RuleAt {
    rule: String,
    location: String,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Depends {
    /// The verdict holds until this time.
    Expires { at: String },
    /// The verdict holds only from this time.
    NotBefore { at: String },
    /// The verdict holds while the identity passes the check.
    Posture { identity: String, check: String },
    /// The verdict holds while the identity is not quarantined.
    NotQuarantined { identity: String },
    /// The verdict holds while an approved access request is in force.
    Approval {
        request: String,
        requester: String,
        approved_by: Vec<String>,
        until: String,
    },
}

/// The policy's name for a rule: a rule made from an approved request (`RULE@ID`) is its rule's.
fn policy_rule(name: &str) -> String {
    bulkhead_policy::approval::split_rule_name(name)
        .map_or(name, |(rule, _)| rule)
        .to_string()
}

#[derive(Serialize)]
struct InactiveRule {
    rule: String,
    location: String,
    reason: String,
}

#[derive(Serialize)]
struct Explanation {
    from: String,
    to: String,
    port: String,
    at: String,
    verdict: &'static str,
    rule: Option<String>,
    location: Option<String>,
    reason: String,
    depends_on: Vec<Depends>,
    also: Vec<RuleAt>,
    not_in_force: Vec<InactiveRule>,
    /// With `--facts`: the posture checks FROM fails on its facts, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    facts: Vec<String>,
}

/// `bulkhead policy explain FILE FROM TO PORT`.
///
/// With `grants` (`--live`: the approved access requests the controller has), a rule that needs
/// approval is in force for what they cover, and the answer says who approved it, until when.
pub fn explain(
    file: &Path,
    q: Query,
    when: &When,
    grants: Option<Vec<bulkhead_policy::Grant>>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let probe = parse_probe(&q.port).map_err(|e| anyhow!(e))?;
    match q.path {
        NetPath::Overlay if q.from_address.is_some() => {
            return Err(anyhow!("--from-address goes with --path underlay"));
        }
        NetPath::Underlay if !q.failing.is_empty() || q.facts.is_some() => {
            return Err(anyhow!(
                "posture does not apply to the underlay: --failing and --facts go with --path \
                 overlay"
            ));
        }
        _ => {}
    }
    let now = now(when)?;
    let src = Source::load(file, now, &BTreeMap::new())?;
    let Some(plain) = src.valid_model() else {
        return src.invalid();
    };
    let granted = grants.as_ref().map(|g| plain.with_grants(g));
    let m = granted.as_ref().unwrap_or(plain);
    let ident = |n: &str| {
        m.identity(n)
            .ok_or_else(|| anyhow!("{}: no identity named {n:?}", src.path))
    };
    let (a, b) = (ident(&q.from)?, ident(&q.to)?);
    let mut cond = Conditions::at(now);
    for c in &q.failing {
        m.check(c)
            .ok_or_else(|| anyhow!("{}: no posture check named {c:?}", src.path))?;
        cond.failing.insert((q.from.clone(), c.clone()));
    }
    for i in &q.quarantined {
        ident(i)?;
        cond.quarantined.insert(i.clone());
    }
    if q.path == NetPath::Underlay {
        let query = crate::underlay::Query {
            file: &src.path,
            from: a,
            to: b,
            probe,
            from_address: q.from_address,
            now,
        };
        return crate::underlay::explain(m, &m.state(&cond), query, fmt);
    }
    let mut from_facts = Vec::new();
    if let Some(f) = &q.facts {
        for (id, check, why) in SampleFacts::read(f)?.judge(m, &src.path)? {
            if id == q.from {
                from_facts.push(format!("{id} fails {check}: {why}"));
                cond.failing.insert((id, check));
            }
        }
    }
    let d = evaluate(m, a, b, probe, &m.state(&cond));
    let loc = |r: u32| format!("{}:{}", src.path, m.rule_line(r));
    let mut depends = Vec::new();
    if let Some(r) = d.rule.map(|r| m.rule(r)) {
        if let Some(t) = r.window.expires {
            depends.push(Depends::Expires { at: time(t) });
        }
        if let Some(t) = r.window.not_before {
            depends.push(Depends::NotBefore { at: time(t) });
        }
        if let Some(g) = r.grant.as_deref().filter(|_| d.allowed) {
            depends.push(Depends::Approval {
                request: g.id.clone(),
                requester: g.requester.clone(),
                approved_by: g.approvers.clone(),
                until: time(g.until),
            });
        }
        if d.allowed {
            for &c in &r.posture {
                depends.push(Depends::Posture {
                    identity: q.from.clone(),
                    check: m.check_name(c).to_string(),
                });
            }
            if !r.from.quarantined {
                depends.push(Depends::NotQuarantined {
                    identity: q.from.clone(),
                });
            }
            if !r.to.quarantined {
                depends.push(Depends::NotQuarantined {
                    identity: q.to.clone(),
                });
            }
        }
    }
    let reason = match (d.rule, d.allowed, d.self_traffic) {
        (_, _, true) => "traffic of an identity to itself never crosses a tunnel".to_string(),
        (Some(_), true, _) => "allowed by rule".into(),
        (Some(_), false, _) => "denied by a deny rule, which overrides every allow".into(),
        (None, _, _) => "no rule in force allows it: default deny".into(),
    };
    let why = |w: &Inactive| match w {
        Inactive::NotYet(t) => format!("not in force before {}", time(*t)),
        Inactive::Expired(t) => format!("expired at {}", time(*t)),
        Inactive::NeedsApproval { approvers, max } => format!(
            "needs approval: in force only while an approved access request covers it \
             ({approvers} approver(s), at most {}){}",
            crate::online::span(u64::try_from(*max).unwrap_or(0)),
            if grants.is_some() {
                ""
            } else {
                "; --live asks the controller for approved requests"
            }
        ),
        Inactive::Posture(cs) => format!(
            "{} fails posture: {}",
            q.from,
            cs.iter()
                .map(|&c| m.check_name(c))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Inactive::Quarantined { from, to } => {
            let who: Vec<&str> = [(*from, q.from.as_str()), (*to, q.to.as_str())]
                .into_iter()
                .filter_map(|(on, n)| on.then_some(n))
                .collect();
            format!("{} quarantined", who.join(" and "))
        }
    };
    let e = Explanation {
        from: q.from.clone(),
        to: q.to.clone(),
        port: probe.to_string(),
        at: time(now),
        verdict: if d.allowed { "allow" } else { "deny" },
        rule: d.rule.map(|r| policy_rule(&m.rule(r).name)),
        location: d.rule.map(loc),
        reason,
        depends_on: depends,
        also: d
            .also
            .iter()
            .map(|&r| RuleAt {
                rule: policy_rule(&m.rule(r).name),
                location: loc(r),
            })
            .collect(),
        not_in_force: d
            .inactive
            .iter()
            .map(|(r, w)| InactiveRule {
                rule: policy_rule(&m.rule(*r).name),
                location: loc(*r),
                reason: why(w),
            })
            .collect(),
        facts: from_facts,
    };
    emit(fmt, &e, || explain_table(&e))?;
    Ok(Outcome::ok_if(d.allowed))
}

fn explain_table(e: &Explanation) -> String {
    let mut s = format!(
        "{}: {} -> {} {} at {}\n",
        e.verdict, e.from, e.to, e.port, e.at
    );
    match (&e.rule, &e.location) {
        (Some(r), Some(l)) => s += &format!("  rule:   {r} ({l})\n"),
        _ => s += "  rule:   none\n",
    }
    s += &format!("  reason: {}\n", e.reason);
    if !e.depends_on.is_empty() {
        s += "  holds while:\n";
        for d in &e.depends_on {
            s += &match d {
                Depends::Expires { at } => format!("    - now is before {at} (expires)\n"),
                Depends::NotBefore { at } => format!("    - now is after {at} (not_before)\n"),
                Depends::Posture { identity, check } => {
                    format!("    - {identity} passes posture check {check}\n")
                }
                Depends::NotQuarantined { identity } => {
                    format!("    - {identity} is not quarantined\n")
                }
                Depends::Approval {
                    request,
                    requester,
                    approved_by,
                    until,
                } => format!(
                    "    - access request {request} (by {requester}) approved by {}, until {until}\n",
                    approved_by.join(", ")
                ),
            };
        }
    }
    if !e.also.is_empty() {
        s += "  also matched by:\n";
        for r in &e.also {
            s += &format!("    - {} ({})\n", r.rule, r.location);
        }
    }
    if !e.facts.is_empty() {
        s += "  from --facts:\n";
        for f in &e.facts {
            s += &format!("    - {f}\n");
        }
    }
    if !e.not_in_force.is_empty() {
        s += "  matching rules not in force:\n";
        for r in &e.not_in_force {
            s += &format!("    - {} ({}): {}\n", r.rule, r.location, r.reason);
        }
    }
    s
}

/// `bulkhead policy matrix FILE`.
pub fn matrix(file: &Path, when: &When, fmt: Format) -> anyhow::Result<Outcome> {
    let now = now(when)?;
    let src = Source::load(file, now, &BTreeMap::new())?;
    let Some(m) = src.valid_model() else {
        return src.invalid();
    };
    let compiled = Compiled::new(m, m.state(&Conditions::at(now)));
    let reach = reach::reachability(m, &compiled);
    let report = crate::matrix::Matrix::new(m, &reach, &src.path);
    emit(fmt, &report.json(), || report.table())?;
    Ok(Outcome::Ok)
}

#[derive(Serialize)]
struct DiffReport<'a> {
    old: &'a str,
    new: &'a str,
    #[serde(flatten)]
    plan: reach::Plan,
}

/// `bulkhead policy diff OLD NEW`.
pub fn diff(old: &Path, new: &Path, when: &When, fmt: Format) -> anyhow::Result<Outcome> {
    let now = now(when)?;
    let a = Source::load(old, now, &BTreeMap::new())?;
    let Some(ma) = a.valid_model() else {
        return a.invalid();
    };
    // The new policy keeps the old addresses, as the controller would.
    let b = Source::load(new, now, &ma.addresses())?;
    let Some(mb) = b.valid_model() else {
        return b.invalid();
    };
    let cond = Conditions::at(now);
    let ca = Compiled::new(ma, ma.state(&cond));
    let cb = Compiled::new(mb, mb.state(&cond));
    let report = DiffReport {
        old: &a.path,
        new: &b.path,
        plan: reach::plan(Some((ma, &ca)), (mb, &cb)),
    };
    emit(fmt, &report, || plan_table(&wire_plan(&report.plan)))?;
    Ok(Outcome::Ok)
}

/// A plan as the controller sends it: ports as strings.
pub fn wire_plan(p: &reach::Plan) -> bulkhead_proto::Plan {
    bulkhead_proto::Plan {
        identities_added: p.identities_added.clone(),
        identities_removed: p.identities_removed.clone(),
        changes: p
            .changes
            .iter()
            .map(|c| bulkhead_proto::PairChange {
                from: c.from.clone(),
                to: c.to.clone(),
                gained: c.gained.to_strings(),
                lost: c.lost.to_strings(),
            })
            .collect(),
        conditions: p
            .conditions
            .iter()
            .map(|c| {
                let strings = |v: &[reach::Caveat]| v.iter().map(ToString::to_string).collect();
                bulkhead_proto::ConditionChange {
                    from: c.from.clone(),
                    to: c.to.clone(),
                    before: strings(&c.before),
                    after: strings(&c.after),
                }
            })
            .collect(),
        underlay: crate::underlay::wire_plan(&p.underlay),
    }
}

/// Reachability gained and lost, pair by pair, for people; then the pairs whose access holds
/// under other conditions; then the underlay.
pub fn plan_table(p: &bulkhead_proto::Plan) -> String {
    let conditions = &p.conditions;
    let mut s = String::new();
    for n in &p.identities_added {
        s += &format!("+ identity {n}\n");
    }
    for n in &p.identities_removed {
        s += &format!("- identity {n}\n");
    }
    if p.changes.is_empty() && conditions.is_empty() && p.underlay.is_empty() {
        s += "no change in reachability\n";
        return s;
    }
    if !p.changes.is_empty() {
        let mut rows = vec![vec![
            "FROM".to_string(),
            "TO".into(),
            "GAINED".into(),
            "LOST".into(),
        ]];
        let join = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        for c in &p.changes {
            rows.push(vec![
                c.from.clone(),
                c.to.clone(),
                join(&c.gained),
                join(&c.lost),
            ]);
        }
        let gained = p.changes.iter().filter(|c| !c.gained.is_empty()).count();
        let lost = p.changes.iter().filter(|c| !c.lost.is_empty()).count();
        s += &columns(&rows);
        s += &format!("{gained} pair(s) gain access, {lost} pair(s) lose access\n");
    }
    if !conditions.is_empty() {
        if !p.changes.is_empty() {
            s += "\n";
        }
        let mut rows = vec![vec![
            "FROM".to_string(),
            "TO".into(),
            "CONDITIONS BEFORE".into(),
            "CONDITIONS AFTER".into(),
        ]];
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join("; ")
            }
        };
        for c in conditions {
            rows.push(vec![
                c.from.clone(),
                c.to.clone(),
                list(&c.before),
                list(&c.after),
            ]);
        }
        s += &columns(&rows);
        s += &format!(
            "{} pair(s) reach each other under other conditions (posture, time windows)\n",
            conditions.len()
        );
    }
    if !p.underlay.is_empty() {
        if !p.changes.is_empty() || !conditions.is_empty() {
            s += "\n";
        } else {
            s += "no change in reachability over the overlay\n\n";
        }
        s += &crate::underlay::plan_table(&p.underlay);
    }
    s
}

/// `bulkhead policy compile FILE [IDENTITY]`.
pub fn compile(
    file: &Path,
    identity: Option<&str>,
    when: &When,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let now = now(when)?;
    let src = Source::load(file, now, &BTreeMap::new())?;
    let Some(m) = src.valid_model() else {
        return src.invalid();
    };
    let c = Compiled::new(m, m.state(&Conditions::at(now)));
    let lists = match identity {
        Some(name) => {
            let id = m
                .identity(name)
                .ok_or_else(|| anyhow!("{}: no identity named {name:?}", src.path))?;
            vec![c.allowlist(m, id, 0)]
        }
        None => c.allowlists(m, 0),
    };
    emit(fmt, &lists, || {
        let mut s = String::new();
        for l in &lists {
            s += &format!(
                "{} {} ({} peers, {} rules)\n",
                l.identity,
                l.address,
                l.peers.len(),
                l.rules.len()
            );
            for p in &l.peers {
                let (o, i) = (l.table(p.outbound), l.table(p.inbound));
                s += &format!(
                    "  {:<20} {:<15} out: {}  in: {}\n",
                    p.name,
                    p.address,
                    o.access(&l.rules, now),
                    i.access(&l.rules, now)
                );
            }
            if let Some(u) = &l.underlay {
                s += &crate::underlay::compiled_lines(u);
            }
        }
        s
    })?;
    Ok(Outcome::Ok)
}
