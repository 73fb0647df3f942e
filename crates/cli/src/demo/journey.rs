//! `bulkhead demo --journey`: the rollout journey of spec §9 on the demo's lab, step by step.
//!
//! The three-tier shop's servers are enrolled with their own addresses (`addressing:
//! underlay`) and no rules, the host firewall observing. The applications talk as the example
//! policy says they should; the flow history records it; `policy suggest` writes rules from it;
//! `policy plan --replay` checks that nothing observed would be denied; the suggestion is
//! applied and the firewall set to `enforce`. Then every pair is probed again on the servers'
//! own addresses: what the applications used still works, through tunnels, and nothing else
//! does. No application was told a new address.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::bail;
use bulkhead_allowlist::proto;
use bulkhead_policy::{Conditions, Probe, evaluate};

use super::{EXAMPLE, Probed, Report, probes, start, stopped, table, until, verdict};
use crate::output::{Format, Outcome, emit};

/// The shop's identities, with their own addresses, no rules, and the firewall observing.
fn journey_policy(m: &bulkhead_policy::Model) -> String {
    let mut text = String::from(
        "# The demo's journey: the servers' own addresses, no rules yet, the host firewall\n\
         # observing. `bulkhead policy suggest` writes the rules from what it sees.\n\
         version: 1\n\
         network: { name: shop, cidr: 198.18.0.0/24, addressing: underlay }\n\
         identities:\n",
    );
    for i in m.identity_ids() {
        let labels: Vec<String> = m
            .labels(i)
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        text += &format!(
            "  {}: {{ labels: {{ {} }} }}\n",
            m.identity_name(i),
            labels.join(", ")
        );
    }
    text += "underlay:\n  mode: observe\n";
    text
}

/// Runs the journey; with `check`, exits after it (0 only if every probe matched).
pub fn run(check: bool, fmt: Format) -> anyhow::Result<Outcome> {
    let now = jiff::Timestamp::now().as_second();
    let example = bulkhead_policy::load(EXAMPLE, now, &Default::default())
        .model
        .ok_or_else(|| anyhow::anyhow!("the built-in example policy does not load"))?;
    let text = journey_policy(&example);
    let loaded = bulkhead_policy::load(&text, now, &Default::default());
    if !loaded.is_valid() {
        bail!("the journey's policy is invalid: {:?}", loaded.diagnostics);
    }
    let ids: Vec<String> = example
        .identity_ids()
        .map(|i| example.identity_name(i).to_string())
        .collect();
    let tcp: Vec<Probe> = probes(&example)
        .into_iter()
        .filter(|p| p.proto == proto::TCP)
        .collect();
    // What the applications use: what the example policy allows.
    let st = example.state(&Conditions::at(now));
    let mut used: BTreeSet<(String, String, u16)> = BTreeSet::new();
    for a in example.identity_ids() {
        for b in example.identity_ids() {
            for p in &tcp {
                if a != b && evaluate(&example, a, b, *p, &st).allowed {
                    used.insert((
                        example.identity_name(a).to_string(),
                        example.identity_name(b).to_string(),
                        p.port,
                    ));
                }
            }
        }
    }

    eprintln!(
        "journey: step 1 of 5, observe: the shop's servers enrolled with their own addresses, no rules, the host firewall observing"
    );
    let (d, _) = start(&text, &ids, &tcp)?;
    let observing = until(Duration::from_secs(20), || installed(&d, &ids))?;
    if !observing {
        bail!("the host firewalls were not all observing in 20 s");
    }
    let own = |n: &str| d.lab.host(n).underlay.clone();
    for (from, to, port) in &used {
        if !d.send(
            from,
            &own(to),
            Probe {
                proto: proto::TCP,
                port: *port,
            },
        ) {
            bail!("{from} -> {to}:{port} did not get through while observing");
        }
    }
    eprintln!(
        "journey: the applications made {} kinds of connection, to the servers' own addresses",
        used.len()
    );
    let recorded = until(Duration::from_secs(20), || {
        let out = d.cli(&["flows", "--since", "1h", "-o", "json"]);
        let flows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        used.iter().all(|(from, to, port)| {
            flows
                .iter()
                .any(|f| f["src"] == **from && f["dst"] == **to && f["port"] == *port)
        })
    })?;
    if !recorded {
        bail!("the flow history did not record every connection in 20 s");
    }

    eprintln!(
        "journey: step 2 of 5, suggest: `bulkhead policy suggest --since 1h --base journey.yaml --full`"
    );
    let dir = d.lab.host("ctl").dir.clone();
    let base = dir.join("policy.yaml");
    let out = d.cli(&[
        "policy",
        "suggest",
        "--since",
        "1h",
        "--base",
        &base.display().to_string(),
        "--full",
    ]);
    if !out.status.success() {
        bail!("suggest: {}", String::from_utf8_lossy(&out.stderr));
    }
    let suggested = String::from_utf8_lossy(&out.stdout).to_string();
    // What it adds: the lines the journey's policy does not have.
    let before: BTreeSet<&str> = text.lines().collect();
    for line in suggested
        .lines()
        .filter(|l| !before.contains(l) && !l.trim_start().starts_with('#') && !l.trim().is_empty())
    {
        eprintln!("journey:   {line}");
    }
    let suggested_file = dir.join("suggested.yaml");
    std::fs::write(&suggested_file, &suggested)?;

    eprintln!("journey: step 3 of 5, replay: `bulkhead policy plan suggested.yaml --replay 1h`");
    let out = d.cli(&[
        "policy",
        "plan",
        &suggested_file.display().to_string(),
        "--replay",
        "1h",
    ]);
    if !out.status.success() {
        bail!(
            "the replay says the suggestion would deny observed traffic:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    eprintln!("journey:   nothing observed would be denied");

    eprintln!(
        "journey: step 4 of 5, enforce: apply the suggestion, then `underlay: mode: enforce`"
    );
    let enforced = suggested.replace("mode: observe", "mode: enforce");
    let enforced_file = dir.join("enforced.yaml");
    std::fs::write(&enforced_file, &enforced)?;
    for f in [&suggested_file, &enforced_file] {
        let out = d.cli(&["policy", "apply", "--yes", &f.display().to_string()]);
        if !out.status.success() {
            bail!("apply: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let enforcing = until(Duration::from_secs(20), || {
        installed(&d, &ids) && in_sync(&d, ids.len())
    })?;
    if !enforcing {
        bail!("the nodes did not all enforce the new policy in 20 s");
    }

    eprintln!("journey: step 5 of 5, probe every pair on the servers' own addresses");
    let mut sent = Vec::new();
    for from in &ids {
        for to in &ids {
            if from == to {
                continue;
            }
            for p in &tcp {
                if stopped() {
                    bail!("interrupted");
                }
                let want = used.contains(&(from.clone(), to.clone(), p.port));
                let tries = if want { 3 } else { 1 };
                let got = (0..tries).any(|_| d.send(from, &own(to), *p));
                sent.push(Probed {
                    from: from.clone(),
                    to: to.clone(),
                    port: p.to_string(),
                    policy: verdict(want),
                    network: verdict(got),
                    matched: want == got,
                });
            }
        }
    }
    let report = Report {
        policy: "the suggestion, enforced".to_string(),
        identities: ids.clone(),
        matched: sent.iter().all(|p| p.matched),
        probes: sent,
        underlay: Vec::new(),
    };
    emit(fmt, &report, || {
        table(
            &report,
            &report.probes,
            &tcp,
            "the servers' own addresses (through the tunnels the suggestion allows)",
        )
    })?;
    if check {
        return Ok(Outcome::ok_if(report.matched));
    }
    eprintln!("journey: running; Ctrl-C stops everything and cleans up.");
    while !stopped() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Outcome::ok_if(report.matched))
}

/// Whether every node reports its host firewall table in place.
fn installed(d: &super::Demo, ids: &[String]) -> bool {
    let out = d.cli(&["nodes", "-o", "json"]);
    serde_json::from_slice::<Vec<bulkhead_proto::NodeView>>(&out.stdout).is_ok_and(|nodes| {
        ids.iter().all(|id| {
            nodes
                .iter()
                .any(|n| n.identity == *id && n.underlay.is_some_and(|u| u.installed))
        })
    })
}

/// Whether every node is online and in sync with the live policy.
fn in_sync(d: &super::Demo, n: usize) -> bool {
    let out = d.cli(&["nodes", "-o", "json"]);
    serde_json::from_slice::<Vec<bulkhead_proto::NodeView>>(&out.stdout)
        .is_ok_and(|nodes| nodes.iter().filter(|v| v.online && v.in_sync).count() == n)
}
