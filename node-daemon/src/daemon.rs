//! The daemon loop: one task owns the data plane core and feeds it from the TUN device, the UDP
//! socket, a timer, signals and the UAPI socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bulkhead_dataplane::{Node, Now};
use bulkhead_proto::NodeConfig;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::flowlog::FlowLog;
use crate::host::{self, Host};
use crate::link::{self, Applied, Update};
use crate::metrics::Snapshot;
use crate::output::{Out, VNET};
use crate::state::{Enrollment, StateDir};
use crate::tun::Interface;
use crate::uapi;
use crate::udp::Udp;

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

async fn apply(node: &mut Node, host: &mut Host, cfg: NodeConfig) -> anyhow::Result<Applied> {
    let revision = cfg.allowlist.revision;
    let digest = Some(cfg.allowlist.digest.clone()).filter(|d| !d.is_empty());
    let (core, wanted) = host::split(cfg);
    let report = node.apply(core, now());
    let applied = Applied {
        revision: Some(revision),
        digest,
        peers: node.peers().len(),
    };
    host.configure(wanted).await?;
    tracing::info!(
        revision,
        unchanged = report.unchanged,
        added = ?report.added,
        removed = ?report.removed,
        flows_cut = report.flows_cut,
        "allowlist applied"
    );
    Ok(applied)
}

/// Where the configuration comes from.
enum Source {
    /// `--allowlist FILE`, reread on SIGHUP.
    File(PathBuf),
    /// The controller, through the link; the last configuration is cached in the state.
    Controller(Box<Enrollment>),
}

/// Waits for the link's next update; forever if there is no link.
async fn next_update(rx: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
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
    let mut node = Node::new(key.to_bytes(), s.flow_capacity);
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
    let mut host = Host::new(&tun);
    let mut udp = Udp::bind(SocketAddr::from(([0, 0, 0, 0], s.listen_port))).await?;
    let (uapi_tx, mut uapi_rx) = mpsc::channel(16);
    let socket = uapi::serve(&s.interface, uapi_tx)?;
    let _cleanup = RemoveOnDrop(socket);

    // Scrapes ask the loop for a snapshot, as the UAPI socket does; without --metrics the
    // sender stays here and nothing ever asks.
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<oneshot::Sender<Snapshot>>(4);
    if let Some(listener) = metrics {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let tx = metrics_tx.clone();
        tokio::spawn(bulkhead_proto::metrics::serve(listener, move || {
            let tx = tx.clone();
            async move {
                let (reply, rx) = oneshot::channel();
                tx.send(reply).await.ok()?;
                Some(crate::metrics::registry(&rx.await.ok()?))
            }
        }));
    }

    let (applied_tx, applied_rx) = tokio::sync::watch::channel(Applied::default());
    let flows = Arc::new(Mutex::new(FlowLog::default()));
    if let Some(cfg) = first {
        if matches!(source, Source::Controller(_)) {
            tracing::info!(
                revision = cfg.allowlist.revision,
                "enforcing the cached allowlist until the controller answers"
            );
        }
        applied_tx.send_replace(apply(&mut node, &mut host, cfg).await?);
    } else {
        tracing::warn!("no allowlist yet: nothing passes");
    }
    let mut updates = match &source {
        Source::Controller(e) => {
            tracing::info!(identity = %e.identity, controllers = ?e.controllers, "enrolled");
            let (tx, rx) = mpsc::channel(4);
            let flows = flows.clone();
            let (facts_tx, facts_rx) = tokio::sync::watch::channel(crate::posture::host_facts());
            tokio::spawn(crate::posture::run(s.config.clone(), facts_tx));
            tokio::spawn(link::run(
                (**e).clone(),
                state.clone(),
                s.listen_port,
                s.endpoint,
                link::Wiring {
                    updates: tx,
                    applied: applied_rx,
                    facts: facts_rx,
                    flows,
                },
            ));
            Some(rx)
        }
        Source::File(_) => None,
    };
    tracing::info!(
        interface = %s.interface,
        port = s.listen_port,
        public_key = %key.public_key().to_base64(),
        endpoint = ?s.endpoint,
        "bulkheadd running"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut tun_super = vec![0u8; VNET + 65535];
    let mut tun_bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
    let mut tun_sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut out = Out::new(flows);

    loop {
        tokio::select! {
            r = tun.dev.recv_multiple(&mut tun_super, &mut tun_bufs, &mut tun_sizes, 0) => {
                let n = r.context("TUN read")?;
                let t = now();
                for (b, &len) in tun_bufs.iter().zip(&tun_sizes).take(n) {
                    node.handle_tun(&b[..len], t, &mut out);
                }
            }
            r = udp.readable() => {
                r.context("UDP socket")?;
                let t = now();
                udp.receive(|from, d| node.handle_udp(from, d, t, &mut out));
            }
            _ = tick.tick() => node.tick(now(), &mut out),
            Some(reply) = uapi_rx.recv() => {
                let snap = uapi::Snapshot {
                    private_key: key.clone(),
                    listen_port: s.listen_port,
                    peers: node.peers(),
                };
                let _ = reply.send(uapi::format_get(&snap, SystemTime::now()));
            }
            Some(reply) = metrics_rx.recv() => {
                let log = out.flows.lock().unwrap_or_else(|p| p.into_inner());
                let (flow_log_entries, flow_log_dropped) = (log.len(), log.dropped_total());
                drop(log);
                let _ = reply.send(Snapshot {
                    revision: node.allowlist().map(|a| a.revision),
                    peers: node.peers(),
                    counters: node.counters(),
                    flows_tracked: node.flow_count(),
                    flow_capacity: s.flow_capacity,
                    flow_log_entries,
                    flow_log_dropped,
                    at: SystemTime::now(),
                });
            }
            Some(u) = next_update(&mut updates) => match u {
                Update::Config(cfg) => {
                    if let Err(e) = state.save_config(&cfg) {
                        tracing::error!(error = %format!("{e:#}"), "cannot cache the allowlist");
                    }
                    applied_tx.send_replace(apply(&mut node, &mut host, *cfg).await?);
                }
                Update::NoPolicy | Update::Revoked => {
                    tracing::warn!("the controller has no allowlist for this node: nothing passes");
                    node.clear();
                    if let Err(e) = state.clear_config() {
                        tracing::error!(error = %e, "cannot remove the cached allowlist");
                    }
                    applied_tx.send_replace(Applied::default());
                }
            },
            _ = hup.recv() => {
                if let Source::File(path) = &source {
                    match read_config(path) {
                        Ok(cfg) => {
                            apply(&mut node, &mut host, cfg).await?;
                        }
                        Err(e) => {
                            // Never fail open: an allowlist that cannot be read lets nothing pass.
                            tracing::error!(error = %format!("{e:#}"), "allowlist unreadable: nothing passes until a good one arrives");
                            node.clear();
                        }
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        out.flush(&udp, &tun.dev).await;
    }
    drop(metrics_tx);
    tracing::info!("bulkheadd stopping");
    Ok(())
}

/// Removes a file when dropped: the UAPI socket, on every way out of `run`.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
