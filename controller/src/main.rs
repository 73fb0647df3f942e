//! `bulkhead-controller`. A thin main: everything is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Keep state in etcd instead of the embedded store.
    #[arg(long, value_name = "etcd://H:P[,H:P]")]
    store: Option<String>,
    /// Apply FILE at start and whenever it changes (validated, tested).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The URL that tokens and credentials carry (default: https://LISTEN-ADDRESS:PORT).
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Flows kept in memory for `bulkhead flows` (the oldest go first).
    #[arg(long, default_value_t = bulkhead_controller::flows::DEFAULT_HISTORY, value_name = "N")]
    flow_history: usize,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let handle = bulkhead_controller::start(bulkhead_controller::Settings {
            listen: cli.listen,
            state: cli.state,
            store: cli.store,
            policy: cli.policy,
            advertise_url: cli.advertise_url,
            flow_history: cli.flow_history,
            metrics: cli.metrics,
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
