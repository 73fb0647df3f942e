//! `bulkhead demo`: the whole product on one machine. A controller and one daemon per identity
//! of the example policy, as real processes, each server in its own network namespace; the
//! policy applied through the controller; every pair probed with real packets; the matrix of
//! what the policy says against what the network did.
//!
//! Everything it creates (namespaces, processes, files) goes away on every way out: success,
//! failure, Ctrl-C or SIGTERM (the lab's `Drop`, reached because signals only raise a flag).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bulkhead_allowlist::{PortSpec, UnderlayMode, proto};
use bulkhead_netlab::Lab;
use bulkhead_policy::{Conditions, Probe, evaluate};
use serde::Serialize;

use crate::output::{Format, Outcome, columns, emit};

/// The default policy: the three-tier example, built in so the demo runs from anywhere.
mod journey;

const EXAMPLE: &str = include_str!("../../../deploy/examples/three-tier.yaml");
const CONTROLLER: &str = "198.18.0.1";

static STOP: AtomicBool = AtomicBool::new(false);

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Turns SIGINT and SIGTERM into a flag the demo polls, so that it always cleans up.
fn catch_signals() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                let _ = tx.send(false);
                return;
            };
            let _ = tx.send(true);
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            STOP.store(true, Ordering::Relaxed);
        });
    });
    if rx.recv() != Ok(true) {
        bail!("cannot install signal handlers");
    }
    Ok(())
}

/// Polls `check` every 100 ms until it holds, `limit` passes or a signal arrives.
fn until(limit: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<bool> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if stopped() {
            bail!("interrupted");
        }
        if check() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}

/// On a bare Debian (a container, say) `ip` may be missing: install iproute2 and ping, as root,
/// saying so. Anywhere else, `available` reports what is missing.
fn install_ip_tools() {
    let have_ip = Command::new("ip").arg("-V").output().is_ok();
    if have_ip || !Path::new("/usr/bin/apt-get").exists() {
        return;
    }
    eprintln!("demo: installing iproute2 and iputils-ping (network namespaces need `ip`)");
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "iproute2",
                "iputils-ping",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("demo: could not install iproute2; install it and run the demo again");
    }
}

/// The controller's etcd client is generated from etcd's .proto files at build time: on a bare
/// Debian, install protoc and the well-known types first, saying so.
fn install_protoc() {
    let have = Command::new("protoc").arg("--version").output().is_ok()
        && Path::new("/usr/include/google/protobuf/descriptor.proto").exists();
    if have || !Path::new("/usr/bin/apt-get").exists() {
        return;
    }
    eprintln!(
        "demo: installing protobuf-compiler and libprotobuf-dev (building the controller needs them)"
    );
    apt_install(&["protobuf-compiler", "libprotobuf-dev"]);
}

fn apt_install(packages: &[&str]) -> bool {
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
}

/// The controller and daemon binaries, next to this one. Under `cargo run`, builds them first
/// with the same profile, so that the README's one command is enough.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let dir = me.parent().context("no directory")?.to_path_buf();
    if let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) {
        install_protoc();
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "bulkhead-controller",
            "-p",
            "bulkhead-node",
        ])
        .current_dir(manifest);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        eprintln!("demo: building bulkhead-controller and bulkheadd");
        let st = cmd.status().context("cannot run cargo")?;
        if !st.success() {
            bail!("building the controller and the daemon failed");
        }
    }
    let find = |name: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        if p.exists() {
            Ok(p)
        } else {
            Err(anyhow!(
                "{} not found next to {}: build it (cargo build --release --workspace --bins)",
                name,
                me.display()
            ))
        }
    };
    Ok((me.clone(), find("bulkhead-controller")?, find("bulkheadd")?))
}

/// One probe's result.
#[derive(Debug, Clone, Serialize)]
struct Probed {
    from: String,
    to: String,
    port: String,
    policy: &'static str,
    network: &'static str,
    matched: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    policy: String,
    identities: Vec<String>,
    probes: Vec<Probed>,
    /// The same probes sent to the servers' underlay addresses, when the policy has a host
    /// firewall (`underlay` block, mode other than `off`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    underlay: Vec<Probed>,
    matched: bool,
}

/// One probe to send: from, to, what, whether the policy lets it through, the address.
type Job = (String, String, Probe, bool, String);

fn verdict(b: bool) -> &'static str {
    if b { "allow" } else { "deny" }
}

/// The probes worth sending: each TCP port and ICMP that some rule names.
fn probes(m: &bulkhead_policy::Model) -> Vec<Probe> {
    let mut set = BTreeSet::new();
    for r in m.rules() {
        for p in &r.ports {
            match p {
                PortSpec::Tcp { lo, .. } => {
                    set.insert((proto::TCP, *lo));
                }
                PortSpec::Icmp => {
                    set.insert((proto::ICMP, 0));
                }
                PortSpec::Any => {
                    set.insert((proto::TCP, 22));
                }
                PortSpec::Udp { .. } => {}
            }
        }
    }
    set.into_iter()
        .map(|(proto, port)| Probe { proto, port })
        .collect()
}

struct Demo {
    lab: Lab,
    me: String,
    admin: String,
}

impl Demo {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec![self.me.as_str(), "--config", self.admin.as_str()];
        full.extend_from_slice(args);
        self.lab.exec("ctl", &full)
    }

    fn tail(&self, host: &str, label: &str) -> String {
        let log = self.lab.log(host, label);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn send(&self, from: &str, to: &str, p: Probe) -> bool {
        let out = if p.proto == proto::ICMP {
            self.lab
                .exec(from, &["ping", "-c", "1", "-W", "1", "-q", to])
        } else {
            let port = p.port.to_string();
            self.lab
                .exec(from, &[&self.me, "probe", "connect", to, &port, "1000"])
        };
        out.status.success()
    }
}

/// `bulkhead demo [--check] [--policy FILE]`.
pub fn demo(
    check: bool,
    policy: Option<&Path>,
    journey: bool,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    install_ip_tools();
    if journey {
        bulkhead_netlab::available().map_err(|e| {
            anyhow!("the demo needs root, `ip netns` (iproute2) and /dev/net/tun: {e}")
        })?;
        catch_signals()?;
        return journey::run(check, fmt);
    }
    bulkhead_netlab::available()
        .map_err(|e| anyhow!("the demo needs root, `ip netns` (iproute2) and /dev/net/tun: {e}"))?;
    let (text, source) = match policy {
        Some(p) => (crate::policy::read_text(p)?, p.display().to_string()),
        None => (
            EXAMPLE.to_string(),
            "deploy/examples/three-tier.yaml".to_string(),
        ),
    };
    let now = jiff::Timestamp::now().as_second();
    let loaded = bulkhead_policy::load(&text, now, &Default::default());
    let model = match loaded.model {
        Some(m) if loaded.is_valid() => m,
        _ => {
            for d in &loaded.diagnostics {
                eprintln!("{}", d.render(&source));
            }
            bail!("{source}: invalid policy");
        }
    };
    let ids: Vec<String> = model
        .identity_ids()
        .map(|i| model.identity_name(i).to_string())
        .collect();
    if ids.is_empty() || ids.len() > 50 {
        bail!(
            "{source}: the demo runs 1 to 50 identities, this policy has {}",
            ids.len()
        );
    }
    let has_ping = Command::new("ping").arg("-V").output().is_ok();
    let probes: Vec<Probe> = probes(&model)
        .into_iter()
        .filter(|p| p.proto != proto::ICMP || has_ping)
        .collect();
    let (d, addresses) = start(&text, &ids, &probes)?;
    eprintln!("demo: policy applied from {source}");
    eprintln!(
        "demo: {} daemons enrolled and enforcing the policy; probing every pair",
        ids.len()
    );

    let overlay = probe_all(&d, &jobs(&d, &model, &addresses, &probes, now, false))?;
    let underlay = match model.underlay().filter(|u| u.mode != UnderlayMode::Off) {
        Some(u) => {
            let in_scope: Vec<&String> = ids
                .iter()
                .filter(|id| model.identity(id).is_some_and(|i| u.in_scope(&model, i)))
                .collect();
            eprintln!(
                "demo: the same probes over the underlay, to the servers' own addresses ({} host firewalls in {})",
                in_scope.len(),
                u.mode
            );
            let installed = until(Duration::from_secs(20), || {
                let out = d.cli(&["nodes", "-o", "json"]);
                serde_json::from_slice::<Vec<bulkhead_proto::NodeView>>(&out.stdout).is_ok_and(
                    |nodes| {
                        in_scope.iter().all(|id| {
                            nodes.iter().any(|n| {
                                n.identity == **id && n.underlay.is_some_and(|s| s.installed)
                            })
                        })
                    },
                )
            })?;
            if !installed {
                bail!("the host firewalls were not all installed in 20 s");
            }
            probe_all(&d, &jobs(&d, &model, &addresses, &probes, now, true))?
        }
        None => Vec::new(),
    };
    let report = Report {
        policy: source.to_string(),
        identities: ids.to_vec(),
        matched: overlay.iter().chain(&underlay).all(|p| p.matched),
        probes: overlay,
        underlay,
    };
    emit(fmt, &report, || {
        let mut s = table(&report, &report.probes, &probes, "the overlay");
        if !report.underlay.is_empty() {
            s += "\n";
            s += &table(
                &report,
                &report.underlay,
                &probes,
                "the underlay (each server's own address; the host firewall decides)",
            );
        }
        s
    })?;
    if check {
        return Ok(Outcome::ok_if(report.matched));
    }
    eprintln!(
        "demo: running. Try: ip netns exec {} {} --config {} nodes\ndemo: Ctrl-C stops everything and cleans up.",
        d.lab.host("ctl").netns,
        d.me,
        d.admin
    );
    while !stopped() {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("demo: stopping and cleaning up");
    Ok(Outcome::ok_if(report.matched))
}

/// Starts the lab for `text`: a controller applying it and one enrolled daemon per identity
/// in `ids`, each with listeners on the TCP ports of `probes`, and waits until every daemon
/// enforces revision 1. Returns the lab and each identity's address.
fn start(
    text: &str,
    ids: &[String],
    probes: &[Probe],
) -> anyhow::Result<(Demo, std::collections::BTreeMap<String, String>)> {
    let (me, controller, daemon) = binaries()?;
    catch_signals()?;

    eprintln!(
        "demo: {} namespaces: a controller and {} daemons",
        ids.len() + 1,
        ids.len()
    );
    let mut names = vec!["ctl"];
    names.extend(ids.iter().map(String::as_str));
    let lab = Lab::new(&names);
    let state = lab.host("ctl").dir.join("state");
    let policy_file = lab.host("ctl").dir.join("policy.yaml");
    std::fs::write(&policy_file, text)?;
    let mut d = Demo {
        admin: state.join("admin.yaml").display().to_string(),
        me: me.display().to_string(),
        lab,
    };
    let listen = format!("{CONTROLLER}:7443");
    d.lab.spawn(
        "ctl",
        "controller",
        &[
            &controller.display().to_string(),
            "--listen",
            &listen,
            "--state",
            &state.display().to_string(),
            "--policy",
            &policy_file.display().to_string(),
        ],
    );
    let up = until(Duration::from_secs(20), || {
        Path::new(&d.admin).exists() && d.cli(&["policy", "show", "-o", "json"]).status.success()
    })?;
    if !up {
        bail!(
            "the controller did not come up:\n{}",
            d.tail("ctl", "controller")
        );
    }
    eprintln!("demo: controller up at https://{listen}");

    let tcp_ports: Vec<String> = probes
        .iter()
        .filter(|p| p.proto == proto::TCP)
        .map(|p| p.port.to_string())
        .collect();
    for id in ids {
        let out = d.cli(&["token", "create", id, "--ttl", "5m"]);
        if !out.status.success() {
            bail!(
                "token create {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let host = d.lab.host(id);
        let (iface, st) = (host.interface.clone(), host.dir.join("state"));
        d.lab.spawn(
            id,
            "bulkheadd",
            &[
                &daemon.display().to_string(),
                "run",
                "--token",
                &token,
                "--state",
                &st.display().to_string(),
                "--interface",
                &iface,
            ],
        );
        if !tcp_ports.is_empty() {
            let me = d.me.clone();
            d.lab.spawn(
                id,
                "listen",
                &[&me, "probe", "listen", &tcp_ports.join(","), "86400"],
            );
        }
    }
    let mut addresses = std::collections::BTreeMap::new();
    let converged = until(Duration::from_secs(30), || {
        let out = d.cli(&["nodes", "-o", "json"]);
        let Ok(nodes) = serde_json::from_slice::<Vec<bulkhead_proto::NodeView>>(&out.stdout) else {
            return false;
        };
        addresses = nodes
            .iter()
            .filter_map(|n| Some((n.identity.clone(), n.address?.to_string())))
            .collect();
        nodes
            .iter()
            .filter(|n| n.online && n.revision == Some(1))
            .count()
            == ids.len()
    })?;
    if !converged {
        let mut logs = String::new();
        for id in ids {
            logs += &format!("--- {id}\n{}\n", d.tail(id, "bulkheadd"));
        }
        bail!("the daemons did not all enroll and apply the policy in 30 s:\n{logs}");
    }
    Ok((d, addresses))
}

/// Every ordered pair on every probe, over the overlay (to overlay addresses) or the underlay
/// (to the servers' own addresses, where the host firewall decides).
fn jobs(
    d: &Demo,
    model: &bulkhead_policy::Model,
    addresses: &std::collections::BTreeMap<String, String>,
    probes: &[Probe],
    now: i64,
    underlay: bool,
) -> Vec<Job> {
    let st = model.state(&Conditions::at(now));
    let mut jobs = Vec::new();
    for a in model.identity_ids() {
        for b in model.identity_ids() {
            if a == b {
                continue;
            }
            let (from, to) = (model.identity_name(a), model.identity_name(b));
            for p in probes {
                let (want, addr) = if underlay {
                    let from_address = d.lab.host(from).underlay.parse().ok();
                    let e = bulkhead_policy::underlay::explain(model, &st, a, b, *p, from_address);
                    let want = e.verdict == bulkhead_policy::underlay::Verdict::Allow;
                    (want, d.lab.host(to).underlay.clone())
                } else {
                    (
                        evaluate(model, a, b, *p, &st).allowed,
                        addresses[to].clone(),
                    )
                };
                jobs.push((from.to_string(), to.to_string(), *p, want, addr));
            }
        }
    }
    jobs
}

/// Sends every job's probe, a few threads at a time (each probe is a process in a namespace).
fn probe_all(d: &Demo, jobs: &[Job]) -> anyhow::Result<Vec<Probed>> {
    let results: Vec<bool> = std::thread::scope(|s| {
        let chunks: Vec<_> = jobs.chunks(jobs.len().div_ceil(8).max(1)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(from, _, p, want, to_addr)| {
                            // What must pass gets a few tries (a first handshake); what must
                            // not pass is sent once: one leak is a failure.
                            let tries = if *want { 3 } else { 1 };
                            (0..tries).any(|_| !stopped() && d.send(from, to_addr, *p))
                        })
                        .collect::<Vec<bool>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    if stopped() {
        bail!("interrupted");
    }
    Ok(jobs
        .iter()
        .zip(results)
        .map(|((from, to, p, want, _), got)| Probed {
            from: from.clone(),
            to: to.clone(),
            port: p.to_string(),
            policy: verdict(*want),
            network: verdict(got),
            matched: *want == got,
        })
        .collect())
}

/// The matrix: what got through per pair; a pair where the network and the policy disagree is
/// marked `!`, and every disagreement is listed below.
fn table(r: &Report, sent: &[Probed], probes: &[Probe], path: &str) -> String {
    let mut rows = vec![{
        let mut h = vec!["FROM \\ TO".to_string()];
        h.extend(r.identities.iter().cloned());
        h
    }];
    for from in &r.identities {
        let mut row = vec![from.clone()];
        for to in &r.identities {
            if from == to {
                row.push("·".into());
                continue;
            }
            let cell: Vec<&Probed> = sent
                .iter()
                .filter(|p| p.from == *from && p.to == *to)
                .collect();
            let passed: Vec<&str> = cell
                .iter()
                .filter(|p| p.network == "allow")
                .map(|p| p.port.as_str())
                .collect();
            let mut text = if passed.is_empty() {
                "-".to_string()
            } else {
                passed.join(",")
            };
            if cell.iter().any(|p| !p.matched) {
                text += " !";
            }
            row.push(text);
        }
        rows.push(row);
    }
    let ports: Vec<String> = probes.iter().map(ToString::to_string).collect();
    let mut s = format!(
        "What got through {path}, probed with real packets on {} (policy: {}):\n\n",
        ports.join(", "),
        r.policy
    );
    s += &columns(&rows);
    let bad: Vec<&Probed> = sent.iter().filter(|p| !p.matched).collect();
    if bad.is_empty() {
        s += &format!(
            "\nall {} probes matched the policy: every allowed flow passed, every other was dropped\n",
            sent.len()
        );
    } else {
        s += &format!(
            "\n{} of {} probes did NOT match the policy:\n",
            bad.len(),
            sent.len()
        );
        for p in bad {
            s += &format!(
                "  {} -> {} {}: policy says {}, the network did {}\n",
                p.from, p.to, p.port, p.policy, p.network
            );
        }
    }
    s
}
