//! The Bulkhead policy language.
//!
//! Pure: no I/O, no clock, no async. Text goes in, with the current time as an argument; a
//! validated [`Model`], diagnostics, verdicts and compiled [`Allowlist`]s come out.
//!
//! - [`load`] parses, validates and runs the policy's own tests, reporting every problem at once
//!   as `FILE:LINE:COL: error: MESSAGE` ([`Diagnostic::render`]).
//! - [`evaluate`] answers "may A open a connection to B on this port?" with the deciding rule.
//! - [`Compiled`] holds every pair's port tables and yields each identity's [`Allowlist`];
//!   [`Compiled::update_identity`] recompiles one identity's pairs after it changes.
//! - [`reach::reachability`] and [`reach::diff`] give the matrix and the change between policies.
//! - [`underlay`] is the `underlay` block: each server's host firewall, compiled into its
//!   allowlist, explained for one connection, and its part of a plan.
//! - [`suggest`] writes rules that let the connections the flow history observed through
//!   ([`observed`]), and [`replay`] tells which of them a policy would newly deny or allow.
//!
//! [`Allowlist`]: bulkhead_allowlist::Allowlist

#![forbid(unsafe_code)]

pub mod addr;
pub mod approval;
pub mod ast;
mod compile;
mod diag;
mod eval;
mod model;
pub mod observed;
mod parse;
pub mod posture;
pub mod reach;
pub mod replay;
pub mod splice;
pub mod suggest;
pub mod underlay;
mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_allowlist::UnixTime;
use serde::Serialize;

pub use approval::Grant;
pub use ast::{ApprovalDef, Expect, Policy, Probe};
pub use compile::Compiled;
pub use diag::{Diagnostic, Pos, Severity};
pub use eval::{Conditions, Decision, Inactive, State, evaluate, ports_cover};
pub use model::{CheckId, EVERYONE, IdentityId, Model, QUARANTINED, Rule, RuleId, SegmentId, Side};
pub use parse::{is_valid_name, parse_duration, parse_port_spec, parse_probe, parse_time};
pub use yaml::{MAX_BYTES, MAX_DEPTH, MAX_NODES};

/// The result of loading a policy.
#[derive(Debug)]
pub struct Loaded {
    /// The resolved policy, if its form and references are valid. Present even when tests fail,
    /// so that the tests can be shown.
    pub model: Option<Model>,
    /// Every problem found, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
    /// The outcome of each entry of `tests`, if the policy got that far.
    pub tests: Vec<TestOutcome>,
}

impl Loaded {
    /// Whether the policy may be applied: it resolved, and nothing is wrong, tests included.
    pub fn is_valid(&self) -> bool {
        self.model.is_some()
            && !self
                .diagnostics
                .iter()
                .any(|d| d.severity == Severity::Error)
    }
}

/// How one entry of `tests` went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestOutcome {
    /// Where the test is written.
    pub pos: Pos,
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// Protocol and port, e.g. `tcp/5432`.
    pub port: String,
    /// What the test expects.
    pub expect: Expect,
    /// What the policy says.
    pub got: Expect,
    /// The deciding rule, if any.
    pub rule: Option<String>,
    /// Whether `got` is `expect`.
    pub passed: bool,
}

/// Parses, validates and tests a policy. `now` is the time for tests without `at`; `prior` holds
/// addresses identities had before (see [`addr`]), empty if unknown.
pub fn load(text: &str, now: UnixTime, prior: &BTreeMap<String, Ipv4Addr>) -> Loaded {
    load_assuming(text, now, prior, &BTreeSet::new())
}

/// [`load`], with the policy's tests run assuming that each `(identity, check)` in `failing`
/// fails, besides the checks each test lists: how `bulkhead policy test --facts` tries the
/// tests against the facts nodes would report.
pub fn load_assuming(
    text: &str,
    now: UnixTime,
    prior: &BTreeMap<String, Ipv4Addr>,
    failing: &BTreeSet<(String, String)>,
) -> Loaded {
    let mut loaded = Loaded {
        model: None,
        diagnostics: Vec::new(),
        tests: Vec::new(),
    };
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(d) => {
            loaded.diagnostics.push(d);
            return loaded;
        }
    };
    let (policy, mut diags) = parse::read(&root);
    let Some(policy) = policy else {
        loaded.diagnostics = diags.into_sorted();
        return loaded;
    };
    let model = Model::resolve(policy, prior, &mut diags);
    // Tests run even on a policy with errors, so that one run reports everything; a failure
    // there says the other errors may be why.
    let clean = !diags.has_errors();
    loaded.tests = run_tests(&model, now, failing, &mut diags, clean);
    loaded.model = clean.then_some(model);
    loaded.diagnostics = diags.into_sorted();
    loaded
}

fn run_tests(
    m: &Model,
    now: UnixTime,
    failing: &BTreeSet<(String, String)>,
    d: &mut diag::Diags,
    clean: bool,
) -> Vec<TestOutcome> {
    let mut out = Vec::new();
    for t in &m.policy().tests {
        let ident = |n: &ast::Spanned<String>, d: &mut diag::Diags| {
            let id = m.identity(&n.value);
            if id.is_none() {
                d.error(n.pos, format!("undefined identity {:?}", n.value));
            }
            id
        };
        let (from, to) = (ident(&t.from, d), ident(&t.to, d));
        let mut cond = Conditions::at(t.at.unwrap_or(now));
        cond.failing.extend(failing.iter().cloned());
        for c in &t.failing {
            if m.check(&c.value).is_none() {
                d.error(c.pos, format!("undefined posture check {:?}", c.value));
            }
            cond.failing.insert((t.from.value.clone(), c.value.clone()));
        }
        for q in &t.quarantined {
            if ident(q, d).is_some() {
                cond.quarantined.insert(q.value.clone());
            }
        }
        let (Some(a), Some(b)) = (from, to) else {
            continue;
        };
        let dec = evaluate(m, a, b, t.probe, &m.state(&cond));
        let got = if dec.allowed {
            Expect::Allow
        } else {
            Expect::Deny
        };
        let outcome = TestOutcome {
            pos: t.pos,
            from: t.from.value.clone(),
            to: t.to.value.clone(),
            port: t.probe.to_string(),
            expect: t.expect,
            got,
            rule: dec.rule.map(|r| m.rule(r).name.clone()),
            passed: got == t.expect,
        };
        if !outcome.passed {
            let verdict = |e: Expect| match e {
                Expect::Allow => "allow",
                Expect::Deny => "deny",
            };
            let why = match dec.rule {
                Some(r) => format!("rule {:?}, line {}", m.rule(r).name, m.rule_line(r)),
                None if dec.self_traffic => "traffic to itself is outside the policy".into(),
                None => "no rule allows it".into(),
            };
            let caveat = if clean {
                ""
            } else {
                "; the policy has other errors, which may be why"
            };
            d.error(
                t.pos,
                format!(
                    "test failed: {} -> {} {}: expected {}, got {} ({why}){caveat}",
                    t.from.value,
                    t.to.value,
                    t.probe,
                    verdict(t.expect),
                    verdict(got)
                ),
            );
        }
        out.push(outcome);
    }
    out
}
