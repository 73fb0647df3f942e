//! `bulkhead-controller`. A thin main: everything is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// bulkhead-controller: holds the policy, enrolls nodes, compiles and pushes allowlists.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-controller", version, about)]
struct Cli {
    /// API for daemons and the CLI, TLS.
    #[arg(long, default_value = "0.0.0.0:7443", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Keys, CA and the embedded store.
    #[arg(long, default_value = "/var/lib/bulkhead")]
    state: PathBuf,
    /// Keep state in etcd instead of the embedded store (etcds:// for TLS).
    #[arg(long, value_name = "etcds://H:P[,H:P]")]
    store: Option<String>,
    /// With etcds://: the CA that signed etcd's certificates (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// With etcds://: the client certificate presented to etcd (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// With etcds://: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user to log in as (with --etcd-password-file).
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (first line).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// The key (64 hex digits) that seals the CA's private key in the store. Default
    /// STATE/ca-seal.key, created if absent; required with etcd, the same file on every
    /// controller.
    #[arg(long, value_name = "FILE")]
    ca_key_file: Option<PathBuf>,
    /// Apply FILE at start and whenever it changes (validated, tested).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The URL that tokens and credentials carry (default: https://LISTEN-ADDRESS:PORT).
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Flows kept in memory for `bulkhead flows` (the oldest go first).
    #[arg(long, default_value_t = bulkhead_controller::flows::DEFAULT_HISTORY, value_name = "N")]
    flow_history: usize,
    /// How long the durable flow history (STATE/flows.redb) keeps each hour of flows, like
    /// `30d` or `12h`.
    #[arg(long, default_value = "30d", value_name = "DURATION", value_parser = duration)]
    flow_retention: i64,
    /// Most per-hour aggregates the durable flow history keeps; past it the oldest hours go
    /// first. About 190 bytes each on disk: the default is about 370 MB.
    #[arg(long, default_value_t = bulkhead_controller::flows::durable::DEFAULT_MAX_ROWS, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    flow_history_max_rows: u64,
    /// Most new aggregates one node may add to the durable flow history in an hour; past it,
    /// its new kinds of flow are not kept until the next hour. Default: the bound spread over
    /// the retention's hours, so that one node alone cannot push the others' history out.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    flow_history_node_rows: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// How long an access request waits for its approvals before it expires, like `1h`.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = request_ttl)]
    access_request_ttl: i64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bulkhead_proto::logging::init();
    let files = bulkhead_proto::limits::raise_open_files();
    tracing::debug!(?files, "open-files limit");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A duration such as `30d` or `12h`, in seconds.
fn duration(s: &str) -> Result<i64, String> {
    bulkhead_policy::parse_duration(s)
}

/// An access request's time to be approved: at least a minute, at most a week.
fn request_ttl(s: &str) -> Result<i64, String> {
    match bulkhead_policy::parse_duration(s)? {
        t if (60..=7 * 86_400).contains(&t) => Ok(t),
        _ => Err("at least 1m and at most 7d".into()),
    }
}

/// A PEM file, refused at once if it is not one.
fn pem(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        data.windows(11).any(|w| w == b"-----BEGIN "),
        "{}: not a PEM file",
        path.display()
    );
    Ok(data)
}

fn etcd_access(cli: &Cli) -> anyhow::Result<bulkhead_store::etcd::Access> {
    let identity = match (&cli.etcd_cert, &cli.etcd_key) {
        (Some(c), Some(k)) => Some((pem(c)?, pem(k)?)),
        _ => None,
    };
    let user = match (&cli.etcd_user, &cli.etcd_password_file) {
        (Some(u), Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let pw = text.lines().next().unwrap_or_default().to_string();
            anyhow::ensure!(!pw.is_empty(), "{}: empty password", f.display());
            Some((u.clone(), pw))
        }
        _ => None,
    };
    Ok(bulkhead_store::etcd::Access {
        ca: cli.etcd_ca.as_deref().map(pem).transpose()?,
        identity,
        user,
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let etcd = etcd_access(&cli)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let handle = bulkhead_controller::start(bulkhead_controller::Settings {
            listen: cli.listen,
            state: cli.state,
            store: cli.store,
            etcd,
            ca_key_file: cli.ca_key_file,
            policy: cli.policy,
            advertise_url: cli.advertise_url,
            flow_history: cli.flow_history,
            flow_limits: {
                let mut l = bulkhead_controller::flows::durable::Limits::new(
                    cli.flow_retention,
                    cli.flow_history_max_rows,
                );
                if let Some(n) = cli.flow_history_node_rows {
                    l.node_hour_rows = n;
                }
                l
            },
            metrics: cli.metrics,
            access_request_ttl: cli.access_request_ttl,
        })
        .await?;
        eprintln!(
            "bulkhead-controller: administrator config in {}",
            handle.admin.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("bulkhead-controller stopping");
        handle.stop();
        Ok(())
    })
}
