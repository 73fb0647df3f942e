//! The daemon loop: one task owns the data plane core and feeds it from the TUN device, the UDP
//! socket, a timer, signals and the UAPI socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bulkhead_dataplane::{Node, Now};
use bulkhead_proto::{NodeConfig, PrivateKey};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::faults::{Faults, Op};
use crate::firewall::{self, Firewall};
use crate::flowlog::FlowLog;
use crate::host::{self, Host};
use crate::link::{self, Applied, Update};
use crate::metrics::Snapshot;
use crate::output::Out;
use crate::state::{Enrollment, StateDir};
use crate::tun::{Interface, Read, Reads};
use crate::uapi;
use crate::udp::Udp;
use crate::workers::{Plane, Workers};

/// TUN reads taken at once after the one the loop woke for, if they are waiting.
const MORE_TUN_READS: usize = 31;

/// How `bulkheadd run` was asked to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// State directory: the private key, the enrollment, the cached configuration.
    pub state: PathBuf,
    /// TUN interface name.
    pub interface: String,
    /// UDP port.
    pub listen_port: u16,
    /// The address peers should send to, as reported to the controller.
    pub endpoint: Option<SocketAddr>,
    /// A configuration (allowlist and peers) to enforce, as JSON; reread on SIGHUP.
    pub allowlist: Option<PathBuf>,
    /// Most flows tracked at once.
    pub flow_capacity: usize,
    /// `--config`: posture checks.
    pub config: crate::posture::DaemonConfig,
    /// `--metrics ADDR:PORT`: serve Prometheus metrics there.
    pub metrics: Option<SocketAddr>,
    /// The NFLOG group of the host firewall's log rules.
    pub nflog_group: u16,
    /// `--threads`: 1, the loop does everything; more, the node is split into that many shards,
    /// each on a worker thread (`workers.rs`).
    pub threads: usize,
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    }
}

/// Reads a configuration file. Anything unreadable is an error, never a partial config.
pub fn read_config(path: &Path) -> anyhow::Result<NodeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid configuration", path.display()))
}

/// Where the configuration comes from.
enum Source {
    /// `--allowlist FILE`, reread on SIGHUP.
    File(PathBuf),
    /// The controller, through the link; the last configuration is cached in the state.
    Controller(Box<Enrollment>),
}

/// Runs until SIGTERM or SIGINT. Removes the interface and the UAPI socket on the way out.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    if bulkhead_dataplane::UNFILTERED {
        tracing::error!(
            "this bulkheadd is a benchmark build WITHOUT the packet filter: never deploy it"
        );
    }
    let key = crate::state::load_or_create_key(&s.state)?;
    let state = StateDir(s.state.clone());
    // A configuration or state that does not parse stops the daemon before it creates anything.
    let (source, first) = match &s.allowlist {
        Some(path) => (Source::File(path.clone()), Some(read_config(path)?)),
        None => {
            let e = state.enrollment()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: not enrolled: run `bulkheadd join TOKEN` first, or pass --token",
                    s.state.display()
                )
            })?;
            (Source::Controller(Box::new(e)), state.cached_config()?)
        }
    };
    let metrics = bulkhead_proto::metrics::bind(s.metrics).await?;
    let tun = Interface::create(&s.interface).await?;
    let mut udp = Udp::bind(SocketAddr::from(([0, 0, 0, 0], s.listen_port))).await?;
    let (uapi_tx, mut uapi_rx) = mpsc::channel(16);
    let _cleanup = RemoveOnDrop(uapi::serve(&s.interface, uapi_tx)?);
    let (metrics_tx, mut metrics_rx) = serve_metrics(metrics)?;

    let (applied_tx, applied_rx) = watch::channel(Applied::default());
    let flows = Arc::new(Mutex::new(FlowLog::default()));
    if let Err(e) = firewall::strict_reverse_path(&s.interface) {
        tracing::warn!(error = %e, "cannot set strict reverse-path filtering on the interface");
    }
    let controllers = match &source {
        Source::Controller(e) => resolve_controllers(&e.controllers).await,
        Source::File(_) => Vec::new(),
    };
    let nflog = firewall::spawn_nflog(s.nflog_group, flows.clone());
    let wire = || -> anyhow::Result<crate::writer::Wire> {
        Ok(crate::writer::Wire {
            udp: udp.sender().context("UDP socket")?,
            tun: tun.dev.clone(),
            gro: tun_rs::GROTable::default(),
        })
    };
    let plane = if s.threads > 1 {
        let outs = (0..s.threads)
            .map(|_| Ok(Out::new(flows.clone(), wire()?)))
            .collect::<anyhow::Result<Vec<Out>>>()?;
        Plane::Many(Workers::start(key.to_bytes(), s.flow_capacity, outs)?)
    } else {
        Plane::One(Node::new(key.to_bytes(), s.flow_capacity))
    };
    let mut d = Daemon {
        plane,
        host: Host::new(&tun),
        firewall: Firewall::new(firewall::Facts {
            interface: s.interface.clone(),
            wireguard_port: s.listen_port,
            controllers,
            nflog_group: s.nflog_group,
        }),
        nflog,
        out: Out::new(flows.clone(), wire()?),
        applied: applied_tx,
        state,
        source,
        key,
        listen_port: s.listen_port,
        flow_capacity: s.flow_capacity,
        faults: Faults::default(),
    };
    d.start(first).await;
    let mut updates = d.spawn_link(&s, applied_rx, flows);
    tracing::info!(
        interface = %s.interface,
        port = s.listen_port,
        public_key = %d.key.public_key().to_base64(),
        endpoint = ?s.endpoint,
        threads = s.threads,
        "bulkheadd running"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut reads = Reads::default();
    loop {
        tokio::select! {
            r = reads.read(&tun.dev) => {
                d.tun_read(r, &reads)?;
                // And what else is waiting, a bounded number of reads: a run of small packets
                // (a receiver's ACKs) then leaves as one GSO send, not one send each.
                for _ in 0..MORE_TUN_READS {
                    let Some(r) = reads.try_read(&tun.dev) else {
                        break;
                    };
                    d.tun_read(r, &reads)?;
                }
            }
            r = udp.readable() => {
                r.context("UDP socket")?;
                let t = now();
                let r = udp.receive(|from, dg| d.plane.handle_udp(from, dg, t, &mut d.out));
                if let Err(e) = r {
                    d.faults.record(Op::UdpRecv, &e, t.instant);
                }
            }
            _ = tick.tick() => d.tick().await,
            Some(reply) = uapi_rx.recv() => d.answer_uapi(reply),
            Some(reply) = metrics_rx.recv() => d.answer_metrics(reply).await,
            Some(u) = next_update(&mut updates) => d.update(u).await,
            _ = hup.recv() => d.reload().await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        d.out.flush(&mut d.faults);
        d.plane.dispatch()?;
    }
    drop(metrics_tx);
    d.firewall.stop().await;
    d.host.cleanup().await;
    tracing::info!("bulkheadd stopping");
    Ok(())
}

/// What the loop owns besides its event sources: the core and its output, the host, and what
/// the link reports.
struct Daemon {
    plane: Plane,
    host: Host,
    firewall: Firewall,
    nflog: Arc<firewall::NflogCounts>,
    out: Out,
    applied: watch::Sender<Applied>,
    state: StateDir,
    source: Source,
    key: PrivateKey,
    listen_port: u16,
    flow_capacity: usize,
    faults: Faults,
}

impl Daemon {
    /// A read from the TUN device: its packets to the core. A read that brought nothing usable
    /// is counted and the loop goes on; only a failure of the device itself ends the daemon.
    fn tun_read(&mut self, r: Read, reads: &Reads) -> anyhow::Result<()> {
        let t = now();
        match r {
            Read::Batch => {
                for p in reads.packets() {
                    self.plane.handle_tun(p, t, &mut self.out);
                }
            }
            Read::Dropped(e) => {
                self.faults.record(Op::TunRead, &e, t.instant);
            }
            Read::Failed(e) => return Err(e).context("TUN read"),
        }
        Ok(())
    }

    /// Enforces the configuration the daemon starts with, if any: the file, or the cached one.
    async fn start(&mut self, first: Option<NodeConfig>) {
        let Some(cfg) = first else {
            tracing::warn!("no allowlist yet: nothing passes");
            return;
        };
        if matches!(self.source, Source::Controller(_)) {
            tracing::info!(
                revision = cfg.allowlist.revision,
                "enforcing the cached allowlist until the controller answers"
            );
        }
        self.apply(cfg).await;
    }

    /// Starts the link to the controller, and posture checks, if a controller is the source.
    fn spawn_link(
        &self,
        s: &Settings,
        applied: watch::Receiver<Applied>,
        flows: Arc<Mutex<FlowLog>>,
    ) -> Option<mpsc::Receiver<Update>> {
        let Source::Controller(e) = &self.source else {
            return None;
        };
        tracing::info!(identity = %e.identity, controllers = ?e.controllers, "enrolled");
        let (tx, rx) = mpsc::channel(4);
        let (facts_tx, facts_rx) = watch::channel(crate::posture::host_facts());
        tokio::spawn(crate::posture::run(s.config.clone(), facts_tx));
        tokio::spawn(link::run(
            (**e).clone(),
            self.state.clone(),
            s.listen_port,
            s.endpoint,
            link::Wiring {
                updates: tx,
                applied,
                facts: facts_rx,
                flows,
            },
        ));
        Some(rx)
    }

    fn answer_uapi(&mut self, reply: oneshot::Sender<String>) {
        let snap = uapi::Snapshot {
            private_key: self.key.clone(),
            listen_port: self.listen_port,
            peers: self.plane.peers(),
        };
        let _ = reply.send(uapi::format_get(&snap, SystemTime::now()));
    }

    async fn answer_metrics(&mut self, reply: Scrape) {
        let underlay_counters = self.firewall.counters().await;
        let log = self.out.flows.lock().unwrap_or_else(|p| p.into_inner());
        let (flow_log_entries, flow_log_dropped) = (log.len(), log.dropped_total());
        drop(log);
        let _ = reply.send(Snapshot {
            revision: self.plane.allowlist().map(|a| a.revision),
            peers: self.plane.peers(),
            counters: self.plane.counters(),
            flows_tracked: self.plane.flow_count(),
            flow_capacity: self.flow_capacity,
            flow_log_entries,
            flow_log_dropped,
            io_errors: self.io_errors(),
            underlay: self.firewall.status(),
            underlay_logged: self.nflog.logged().collect(),
            underlay_counters,
            at: SystemTime::now(),
        });
    }

    /// Timers: the core's, and a host configuration to try again.
    async fn tick(&mut self) {
        // A worker that is gone stops the loop at its next dispatch (fail closed).
        let _ = self.plane.tick(now(), &mut self.out);
        let host = self.host.retry().await;
        let firewall = self.firewall.retry().await;
        if host || firewall {
            let (problem, underlay) = (self.problem(), self.firewall.status());
            self.applied.send_if_modified(|a| {
                let changed = a.problem != problem || a.underlay != underlay;
                a.problem = problem;
                a.underlay = underlay;
                changed
            });
        }
    }

    /// What the controller said.
    async fn update(&mut self, u: Update) {
        match u {
            Update::Config(cfg) => {
                if let Err(e) = self.state.save_config(&cfg) {
                    tracing::error!(error = %format!("{e:#}"), "cannot cache the allowlist");
                }
                self.apply(*cfg).await;
            }
            Update::NoPolicy | Update::Revoked => {
                tracing::warn!("the controller has no allowlist for this node: nothing passes");
                self.clear();
                if let Err(e) = self.state.clear_config() {
                    tracing::error!(error = %e, "cannot remove the cached allowlist");
                }
                self.report_applied();
            }
        }
    }

    /// SIGHUP: reads the `--allowlist` file again.
    async fn reload(&mut self) {
        let Source::File(path) = &self.source else {
            return;
        };
        match read_config(path) {
            Ok(cfg) => self.apply(cfg).await,
            Err(e) => {
                // Never fail open: an allowlist that cannot be read lets nothing pass.
                tracing::error!(error = %format!("{e:#}"), "allowlist unreadable: nothing passes until a good one arrives");
                self.clear();
                self.report_applied();
            }
        }
    }

    /// Applies a configuration: the core's part first, so the new allowlist is what filters
    /// whatever becomes of the host's part. Reports what is in force, and what went wrong.
    async fn apply(&mut self, mut cfg: NodeConfig) {
        let revision = cfg.allowlist.revision;
        let (address, addressing, underlay) = (
            cfg.allowlist.address,
            cfg.allowlist.addressing,
            cfg.underlay.take(),
        );
        let (core, wanted) = host::split(cfg);
        let report = match self
            .plane
            .apply(core, now(), &mut self.out, &mut self.faults)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot apply the allowlist");
                return;
            }
        };
        tracing::info!(
            revision,
            unchanged = report.unchanged,
            added = ?report.added,
            removed = ?report.removed,
            flows_cut = report.flows_cut,
            "allowlist applied"
        );
        self.host.configure(wanted).await;
        self.firewall
            .configure(address, addressing, underlay.as_ref())
            .await;
        self.report_applied();
    }

    /// Lets nothing pass from now on; what the core let through before is written first.
    fn clear(&mut self) {
        if let Err(e) = self.plane.clear(&mut self.out, &mut self.faults) {
            tracing::error!(error = %e, "cannot clear the allowlist");
        }
    }

    /// Packet-path I/O errors by operation: the loop's and the workers'.
    fn io_errors(&mut self) -> Vec<(&'static str, u64)> {
        let mut all: Vec<(&'static str, u64)> = Vec::new();
        for (op, n) in self.faults.totals().chain(self.plane.faults()) {
            match all.iter_mut().find(|(o, _)| *o == op.as_str()) {
                Some((_, total)) => *total += n,
                None => all.push((op.as_str(), n)),
            }
        }
        all
    }

    /// What keeps the host from its configuration: the interface, or the firewall.
    fn problem(&self) -> Option<String> {
        let parts: Vec<&str> = [self.host.problem(), self.firewall.problem()]
            .into_iter()
            .flatten()
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Tells the link what is in force now.
    fn report_applied(&mut self) {
        let a = self.applied();
        self.applied.send_replace(a);
    }

    /// What is in force, for the link's reports.
    fn applied(&mut self) -> Applied {
        let peers = self.plane.peers().len();
        let list = self.plane.allowlist();
        Applied {
            revision: list.map(|l| l.revision),
            digest: list.map(|l| l.digest.clone()).filter(|d| !d.is_empty()),
            peers,
            problem: self.problem(),
            underlay: self.firewall.status(),
        }
    }
}

/// The controllers' API addresses, for the firewall to keep open: each URL's host resolved
/// (a name that does not resolve within a few seconds is left out and logged).
async fn resolve_controllers(urls: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for url in urls {
        let Some(authority) = bulkhead_proto::client::url_authority(url) else {
            tracing::warn!(%url, "not a controller URL: the firewall cannot keep it open");
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(authority)).await
        {
            Ok(Ok(addrs)) => out.extend(addrs),
            Ok(Err(e)) => {
                tracing::warn!(%url, error = %e, "cannot resolve a controller for the firewall")
            }
            Err(_) => tracing::warn!(%url, "resolving a controller for the firewall timed out"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A scrape, waiting for the loop's snapshot.
type Scrape = oneshot::Sender<Snapshot>;

/// Serves `/metrics` on `listener`, if given. Scrapes ask the loop for a snapshot over the
/// returned channel, as the UAPI socket does; without a listener nothing ever asks.
fn serve_metrics(
    listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<(mpsc::Sender<Scrape>, mpsc::Receiver<Scrape>)> {
    let (tx, rx) = mpsc::channel::<Scrape>(4);
    if let Some(listener) = listener {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let tx = tx.clone();
        tokio::spawn(bulkhead_proto::metrics::serve(listener, move || {
            let tx = tx.clone();
            async move {
                let (reply, rx) = oneshot::channel();
                tx.send(reply).await.ok()?;
                Some(crate::metrics::registry(&rx.await.ok()?))
            }
        }));
    }
    Ok((tx, rx))
}

/// Waits for the link's next update; forever if there is no link.
async fn next_update(rx: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Removes a file when dropped: the UAPI socket, on every way out of `run`.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
