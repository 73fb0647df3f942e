//! `bulkhead-controller`: holds the policy, enrolls nodes, compiles and pushes allowlists,
//! collects reports.
//!
//! - [`records`]: what is kept in the store, under which keys.
//! - [`view`]: the in-memory view that follows the store, and distribution to nodes.
//! - [`ops`]: what each API call does.
//! - [`api`]: TLS, authentication, HTTP routes.
//! - [`flows`]: the flow log, its durable per-hour history, and automatic quarantine.
//! - [`presence`]: which nodes are connected where, shared through the store.
//! - [`currency`]: whether this controller can vouch that its view is the store's.
//! - [`metrics`]: what `--metrics` exposes to Prometheus.
//! - [`pki`]: the CA and the administrator's credential, at first start.
//! - [`sealing`]: the CA's private key sealed with `--ca-key-file`, never in the store in clear.
//!
//! [`start`] runs a controller inside the current tokio runtime (the binary, and in-process
//! tests on port 0).

pub mod api;
pub mod currency;
pub mod flows;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod presence;
pub mod records;
pub mod sealing;
pub mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_proto::PolicyRequest;
use bulkhead_proto::tls::{Ca, server_config};
use bulkhead_store::{Embedded, Etcd, Store};
use tokio::sync::watch;

/// How the controller was asked to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// API address.
    pub listen: SocketAddr,
    /// State directory: the embedded store and `admin.yaml`.
    pub state: PathBuf,
    /// `etcd://…` or `etcds://…` to keep state in etcd instead.
    pub store: Option<String>,
    /// TLS and login for etcd.
    pub etcd: bulkhead_store::etcd::Access,
    /// The key that seals the CA's private key in the store; default `STATE/ca-seal.key`,
    /// created if absent, with the embedded store. Required with etcd.
    pub ca_key_file: Option<PathBuf>,
    /// A policy file to apply at start and whenever it changes.
    pub policy: Option<PathBuf>,
    /// The URL tokens and `admin.yaml` carry.
    pub advertise_url: Option<String>,
    /// Flows kept in memory for `bulkhead flows`.
    pub flow_history: usize,
    /// How long and how much the durable flow history (`STATE/flows.redb`) keeps.
    pub flow_limits: flows::durable::Limits,
    /// `--metrics ADDR:PORT`: serve Prometheus metrics there.
    pub metrics: Option<SocketAddr>,
    /// Seconds an access request waits for its approvals before it expires.
    pub access_request_ttl: i64,
}

/// A running controller's shared state.
#[derive(Debug)]
pub struct Controller {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) view: Arc<view::Shared>,
    pub(crate) ca: Ca,
    pub(crate) ca_fingerprint: String,
    pub(crate) url: String,
    pub(crate) started: Instant,
    pub(crate) cred_changes: watch::Sender<u64>,
    /// The flow log.
    pub(crate) flows: flows::Flows,
    /// The nodes whose streams this controller holds.
    pub(crate) presence: presence::Tracker,
    /// The store revision the view has caught up with.
    pub(crate) applied: watch::Receiver<bulkhead_store::Revision>,
    /// Counted events, for `--metrics`.
    pub(crate) metrics: metrics::Metrics,
    /// This controller's id among the live ones: 16 hex digits of its URL's SHA-256.
    pub(crate) id: String,
    /// When each node's endpoint last moved.
    pub(crate) endpoint_moves: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// Whether the view is confirmed to be the store's; when not, nodes are sent elsewhere.
    pub(crate) currency: Arc<currency::Currency>,
    /// Seconds an access request waits for its approvals.
    pub(crate) access_request_ttl: i64,
    /// Refused calls audited per administrator in the current minute (`api::authorize`).
    pub(crate) refusals: std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>,
}

impl Controller {
    /// The store, for in-process tests.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Waits (up to 5 s) until the view reflects store revision `rev`, so that whoever made a
    /// change sees it in their next call.
    pub(crate) async fn caught_up(&self, rev: bulkhead_store::Revision) {
        let mut rx = self.applied.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r >= rev)).await;
    }
}

/// A started controller.
#[derive(Debug)]
pub struct Handle {
    /// The API address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The URL it advertises.
    pub url: String,
    /// The administrator's CLI configuration.
    pub admin: PathBuf,
    /// The shared state, for in-process tests.
    pub controller: Arc<Controller>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _registration: bulkhead_store::Held,
}

impl Handle {
    /// Stops serving: the listener, every connection and the store follower; then writes what
    /// the flow history holds in memory.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        if let Err(e) = self.controller.flows.durable.flush(ops::unix_ms()) {
            tracing::error!(error = %e, "cannot write the flow history at stop");
        }
    }
}

fn default_url(listen: SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    } else {
        listen.ip().to_string()
    };
    match listen.ip() {
        std::net::IpAddr::V6(_) if !listen.ip().is_unspecified() => {
            format!("https://[{host}]:{}", listen.port())
        }
        _ => format!("https://{host}:{}", listen.port()),
    }
}

/// The host part of an `https://HOST:PORT` URL.
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?.trim_end_matches('/');
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => rest.rsplit_once(':')?.0,
    };
    Some(host.to_string())
}

/// Opens the store, sets up the PKI, binds the API and starts serving.
pub async fn start(s: Settings) -> anyhow::Result<Handle> {
    // The store holds the CA's key: the directory and everything in it are private from the
    // moment they exist, whatever the umask.
    bulkhead_proto::private::create_dir(&s.state)
        .with_context(|| format!("cannot create state directory {}", s.state.display()))?;
    let seal = match (&s.ca_key_file, &s.store) {
        (Some(f), _) => sealing::SealKey::load(f, s.store.is_none())?,
        (None, None) => sealing::SealKey::load(&s.state.join(sealing::DEFAULT_FILE), true)?,
        (None, Some(_)) => anyhow::bail!(
            "with etcd, --ca-key-file is required: the same file on every controller (make it \
             once with `openssl rand -hex 32`)"
        ),
    };
    let store: Arc<dyn Store> = match &s.store {
        None => Arc::new(Embedded::open(&s.state.join("store.redb"))?),
        Some(spec) => {
            // A malformed spec is an error at once; an unreachable cluster is waited for.
            s.etcd.check(spec)?;
            loop {
                match Etcd::connect_with(spec, bulkhead_store::etcd::NAMESPACE, &s.etcd).await {
                    Ok(e) => break Arc::new(e),
                    // Wrong credentials do not get better by waiting: say so and stop.
                    Err(e @ bulkhead_store::Error::Refused(_)) => {
                        anyhow::bail!(
                            "{e}: check --etcd-user, --etcd-password-file, --etcd-cert and --etcd-key"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reach etcd; retrying in 2 s");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        }
    };
    let flow_file = s.state.join(flows::durable::FILE);
    let durable = flows::DurableHistory::open(&flow_file, s.flow_limits).with_context(|| {
        format!(
            "cannot open the flow history {} (is another controller using this state directory?)",
            flow_file.display()
        )
    })?;
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = bulkhead_proto::metrics::bind(s.metrics).await?;
    let url = s.advertise_url.clone().unwrap_or_else(|| default_url(addr));
    let host = url_host(&url)
        .with_context(|| format!("--advertise-url {url:?}: expected https://HOST:PORT"))?;

    let ca = pki::ca(&*store, &seal).await?;
    let mut names = vec![host, "localhost".into(), "127.0.0.1".into()];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    names.sort();
    names.dedup();
    let (cert, key) = ca.server_cert(&names)?;
    let tls = Arc::new(server_config(&ca.cert_pem, &cert, &key)?);
    let admin = s.state.join("admin.yaml");
    pki::admin_config(&*store, &ca, &url, &admin).await?;

    let (applied_tx, mut applied) = watch::channel(-1);
    let (cred_tx, _) = watch::channel(0u64);
    let view = Arc::new(view::Shared::default());
    let currency = Arc::new(currency::Currency::new(store.progress_every().is_some()));
    let controller = Arc::new(Controller {
        store: store.clone(),
        view: view.clone(),
        ca_fingerprint: ca.fingerprint()?,
        ca,
        url: url.clone(),
        started: Instant::now(),
        cred_changes: cred_tx.clone(),
        presence: presence::Tracker::new(&url),
        flows: flows::Flows::new(s.flow_history, durable),
        applied: applied.clone(),
        metrics: metrics::Metrics::default(),
        id: bulkhead_proto::tls::sha256_hex(url.as_bytes())[..16].to_string(),
        endpoint_moves: Default::default(),
        currency: currency.clone(),
        access_request_ttl: s.access_request_ttl,
        refusals: Default::default(),
    });
    let mut tasks = vec![tokio::spawn(view::sync(
        store, view, applied_tx, cred_tx, currency,
    ))];
    // Serve only once the view holds the store's state: never answer from an empty view.
    applied.wait_for(|r| *r >= 0).await?;
    tasks.push(tokio::spawn(presence::run(controller.clone())));
    tasks.push(tokio::spawn(currency::watch_over(controller.clone())));
    tasks.push(tokio::spawn(end_quarantines(controller.clone())));
    tasks.push(tokio::spawn(ops::close_access(controller.clone())));
    tasks.push(tokio::spawn(flows::share_denials(controller.clone())));
    tasks.push(tokio::spawn(flows::durable::run(
        controller.flows.durable.clone(),
    )));
    tasks.push(tokio::spawn(api::serve(
        listener,
        tls,
        api::router(controller.clone()),
    )));
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let c = controller.clone();
        tasks.push(tokio::spawn(bulkhead_proto::metrics::serve(
            listener,
            move || {
                let c = c.clone();
                async move { Some(c.metrics.registry(&c)) }
            },
        )));
    }
    if let Some(path) = s.policy.clone() {
        tasks.push(tokio::spawn(follow_policy_file(controller.clone(), path)));
    }
    // Registered while it runs: tokens and nodes learn every live controller from this.
    let key = format!("{}{}", records::CONTROLLERS, controller.id);
    let registration = controller
        .store
        .hold(
            &key,
            records::encode(&records::ControllerRecord { url: url.clone() }),
            10,
        )
        .await?;
    tracing::info!(%addr, %url, store = %controller.store.describe(), "bulkhead-controller serving");
    Ok(Handle {
        addr,
        url,
        admin,
        controller,
        tasks,
        _registration: registration,
    })
}

/// Removes quarantines whose time is up, each with its audit entry. Every controller runs this;
/// the removal is fenced on the record's revision, so exactly one of them commits it. Access
/// does not wait for it: the view stops counting a quarantine at its `until`.
async fn end_quarantines(c: Arc<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = ops::unix_now();
        let due: Vec<(String, bulkhead_store::Revision)> = view::lock(&c.view)
            .records()
            .quarantines
            .iter()
            .filter(|(_, (q, _))| q.until.is_some_and(|u| u <= now))
            .map(|(id, (_, rev))| (id.clone(), *rev))
            .collect();
        for (id, rev) in due {
            match c.release(&id, &ops::Actor::Controller, Some(rev)).await {
                Ok(_) => {}
                Err(ops::Error::Conflict(_) | ops::Error::NotFound(_)) => {}
                Err(f) => tracing::warn!(identity = %id, "cannot end the quarantine: {f}"),
            }
        }
    }
}

/// `--policy FILE`: applies the file at start and whenever its contents change (checked every
/// second), through the same validate-test-apply path as `bulkhead policy apply`. A bad file is
/// refused with its errors in the log, and the last good policy stays; an apply that failed for
/// another reason (the store unavailable, a concurrent apply) is tried again every second.
async fn follow_policy_file(c: Arc<Controller>, path: PathBuf) {
    let mut last: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                if last.is_some() || e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(path = %path.display(), error = %e, "policy file unreadable");
                }
                continue;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        if settled(&apply_file(&c, &path, text.clone()).await) {
            last = Some(text);
        }
    }
}

/// Whether an apply's outcome holds until the file changes: applied, unchanged, or refused as
/// invalid. Anything else may go through on the next try.
fn settled(r: &Result<bulkhead_proto::ApplyResponse, ops::Error>) -> bool {
    matches!(r, Ok(_) | Err(ops::Error::InvalidPolicy { .. }))
}

async fn apply_file(
    c: &Controller,
    path: &Path,
    text: String,
) -> Result<bulkhead_proto::ApplyResponse, ops::Error> {
    let req = PolicyRequest {
        text,
        source: path.display().to_string(),
        base_revision: None,
    };
    let by = ops::Actor::File(path.display().to_string());
    let r = c.apply(&req, &by).await;
    match &r {
        Ok(r) if r.changed => {
            tracing::info!(revision = r.revision, path = %path.display(), "policy file applied")
        }
        Ok(_) => tracing::debug!(path = %path.display(), "policy file unchanged"),
        Err(f) => {
            tracing::error!(path = %path.display(), "policy file refused; the live policy stays: {f}")
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_is_tried_again_unless_its_outcome_is_settled() {
        let ok = bulkhead_proto::ApplyResponse {
            revision: 1,
            changed: true,
            summary: Default::default(),
        };
        assert!(settled(&Ok(ok)));
        let invalid = ops::Error::InvalidPolicy {
            message: "x".into(),
            details: vec![],
        };
        assert!(
            settled(&Err(invalid)),
            "the same text is refused again: wait for a change"
        );
        assert!(!settled(&Err(ops::Error::Unavailable("etcd".into()))));
        assert!(!settled(&Err(ops::Error::Conflict("raced".into()))));
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host("https://10.0.0.1:7443").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("https://[fd00::1]:7443/").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(url_host("http://x:1"), None);
        assert_eq!(
            default_url("10.1.1.1:7443".parse().unwrap()),
            "https://10.1.1.1:7443"
        );
    }
}
