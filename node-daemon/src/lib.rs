//! `bulkheadd`: the node daemon. It creates the TUN interface, runs the data plane core
//! (`bulkhead-dataplane`) over it and a UDP socket, and serves the WireGuard UAPI socket.

pub mod daemon;
pub mod faults;
pub mod firewall;
pub mod flowlog;
pub mod host;
pub mod link;
pub mod metrics;
mod output;
pub mod posture;
mod retrying;
pub mod routing;
pub mod state;
pub mod tun;
pub mod uapi;
pub mod udp;
mod workers;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bulkhead_proto::{PrivateKey, PublicKey};
use clap::{Parser, Subcommand};

/// bulkheadd: the Bulkhead node daemon.
#[derive(Debug, Parser)]
#[command(name = "bulkheadd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll with a one-time join token from `bulkhead token create`.
    Join {
        /// The token; better from `--token-file` or `$BULKHEAD_TOKEN`, since a command line is
        /// readable by every user of the host (`/proc/*/cmdline`).
        #[arg(
            env = "BULKHEAD_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// State directory (keys, credential, cached allowlist).
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
    },
    /// Run the daemon: the tunnel interface, the filter, the UAPI socket, the controller link.
    Run {
        /// State directory (keys, credential, cached allowlist).
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
        /// Enroll with this token first, unless already enrolled; better from `--token-file` or
        /// `$BULKHEAD_TOKEN`, since a command line is readable by every user of the host.
        #[arg(long, env = "BULKHEAD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the token to enroll with from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// TUN interface name.
        #[arg(long, default_value = "bh0")]
        interface: String,
        /// UDP port for WireGuard.
        #[arg(long, default_value_t = 51820)]
        listen_port: u16,
        /// The address peers should send to (else detected).
        #[arg(long, value_name = "IP:PORT")]
        endpoint: Option<SocketAddr>,
        /// Enforce this configuration (allowlist and peers, JSON) instead of asking a controller;
        /// reread on SIGHUP. For tests and for running without a controller.
        #[arg(long, value_name = "FILE")]
        allowlist: Option<PathBuf>,
        /// Most connections tracked at once. Each peer may hold a quarter of them; a new one
        /// that finds no room evicts the oldest half-open one, else it is refused.
        #[arg(long, default_value_t = 65536)]
        flow_capacity: usize,
        /// Daemon configuration (YAML): `posture_checks: {NAME: {command: [...], interval: 30s}}`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<SocketAddr>,
        /// The NFLOG group the host firewall logs to (one per host).
        #[arg(long, default_value_t = bulkhead_hostfw::DEFAULT_NFLOG_GROUP)]
        nflog_group: u16,
        /// Threads for the packet path, by default the number of cores (at most 64). 1: one
        /// thread reads, decides and writes. N of 2 or more: the node is split into N shards of
        /// its peers, each decided and written by a worker thread of its own, while the loop
        /// reads and routes, and runs a trickle itself (docs/architecture.md, Threads).
        #[arg(long, value_name = "N", default_value_t = default_threads(), value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
    },
    /// Show the enrollment, the cached allowlist, and the running daemon's interface, peers,
    /// handshakes and transfer.
    Status {
        /// TUN interface name.
        #[arg(long, default_value = "bh0")]
        interface: String,
        /// State directory.
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
    },
    /// The host firewall (spec §7) on this host.
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
    /// Print this node's WireGuard public key, creating the key pair if there is none.
    Pubkey {
        /// State directory.
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
    },
}

/// The daemon's entry point.
#[derive(Debug, Subcommand)]
enum FirewallAction {
    /// Remove the firewall table (`inet bulkhead`), say to recover a node whose daemon cannot
    /// start. A running daemon installs it again on its next configuration in `observe` or
    /// `enforce`.
    Off,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    bulkhead_proto::logging::init();
    let files = bulkhead_proto::limits::raise_open_files();
    tracing::debug!(?files, "open-files limit");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkheadd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The join token, from the command line, `$BULKHEAD_TOKEN` (clap reads both) or a file.
fn token_from(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    match file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?;
            Ok(Some(t.trim().to_string()))
        }
        None => Ok(token.map(|t| t.trim().to_string())),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Join {
            token,
            token_file,
            state,
        } => {
            let token = token_from(token, token_file.as_deref())?
                .ok_or_else(|| anyhow::anyhow!("no token: give it, or --token-file"))?;
            let e = rt.block_on(link::join(&state::StateDir(state), &token))?;
            println!(
                "enrolled as {} with {}",
                e.identity,
                e.controllers.join(", ")
            );
            Ok(())
        }
        Command::Run {
            state,
            token,
            token_file,
            interface,
            listen_port,
            endpoint,
            allowlist,
            flow_capacity,
            config,
            metrics,
            nflog_group,
            threads,
        } => rt.block_on(async {
            // A bad configuration stops the start, before anything is created.
            let config = match &config {
                Some(p) => posture::DaemonConfig::load(p)?,
                None => posture::DaemonConfig::default(),
            };
            let dir = state::StateDir(state.clone());
            // The token is read only when needed: once enrolled, a used token file may stay.
            if allowlist.is_none()
                && dir.enrollment()?.is_none()
                && let Some(t) = token_from(token, token_file.as_deref())?
            {
                let e = link::join(&dir, &t).await?;
                tracing::info!(identity = %e.identity, "enrolled");
            }
            daemon::run(daemon::Settings {
                state,
                interface,
                listen_port,
                endpoint,
                allowlist,
                flow_capacity,
                config,
                metrics,
                nflog_group,
                threads: usize::from(threads),
            })
            .await
        }),
        Command::Status { interface, state } => {
            let dir = state::StateDir(state);
            match dir.enrollment()? {
                Some(e) => println!(
                    "identity: {}\ncontrollers: {}",
                    e.identity,
                    e.controllers.join(", ")
                ),
                None => println!("not enrolled"),
            }
            match dir.cached_config()? {
                Some(c) => println!(
                    "cached allowlist: revision {}, {} peers",
                    c.allowlist.revision,
                    c.allowlist.peers.len()
                ),
                None => println!("cached allowlist: none"),
            }
            let text = rt
                .block_on(uapi::get(&interface))
                .with_context(|| format!("no daemon running on {interface}"))?;
            print!("{}", status(&interface, &text));
            Ok(())
        }
        Command::Firewall {
            action: FirewallAction::Off,
        } => {
            rt.block_on(firewall::off())
                .context("cannot remove the firewall table")?;
            println!(
                "firewall table inet {} removed; a bulkheadd running here installs it again within {} s while its policy says observe or enforce: stop it first to keep the table off",
                bulkhead_hostfw::FIREWALL,
                firewall::CHECK_EVERY.as_secs()
            );
            Ok(())
        }
        Command::Pubkey { state } => {
            let key = state::load_or_create_key(&state)?;
            println!("{}", key.public_key().to_base64());
            Ok(())
        }
    }
}

/// Renders a UAPI `get` answer for people.
fn status(interface: &str, uapi: &str) -> String {
    let hex = |v: &str| -> Option<[u8; 32]> {
        let bytes: Option<Vec<u8>> = (0..v.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(v.get(i..i + 2)?, 16).ok())
            .collect();
        bytes?.try_into().ok()
    };
    let mut out = format!("interface: {interface}\n");
    for line in uapi.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "private_key" => {
                if let Some(key) = hex(v) {
                    out += &format!(
                        "  public key: {}\n",
                        PrivateKey::from(key).public_key().to_base64()
                    );
                }
            }
            "listen_port" => out += &format!("  listening port: {v}\n"),
            "public_key" => {
                out += &format!(
                    "peer: {}\n",
                    hex(v).map_or(v.to_string(), |k| PublicKey(k).to_base64())
                );
            }
            "endpoint" => out += &format!("  endpoint: {v}\n"),
            "allowed_ip" => out += &format!("  allowed ips: {v}\n"),
            "last_handshake_time_sec" if v != "0" => {
                out += &format!("  latest handshake: {v} (unix)\n")
            }
            "rx_bytes" => out += &format!("  received: {v} B\n"),
            "tx_bytes" => out += &format!("  sent: {v} B\n"),
            _ => {}
        }
    }
    out
}

/// The packet path's threads unless `--threads` says otherwise: one per core, at most 64.
fn default_threads() -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    u16::try_from(cores.min(bulkhead_dataplane::MAX_SHARDS)).unwrap_or(1)
}
