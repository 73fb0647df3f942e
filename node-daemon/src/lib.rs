//! `bulkheadd`: the node daemon. It creates the TUN interface, runs the data plane core
//! (`bulkhead-dataplane`) over it and a UDP socket, and serves the WireGuard UAPI socket.

pub mod daemon;
pub mod state;
pub mod tun;
pub mod uapi;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Run the daemon: the tunnel interface, the filter, the UAPI socket.
    Run {
        /// State directory (the private key lives here).
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
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
        /// Most connections tracked at once; new ones are refused beyond it.
        #[arg(long, default_value_t = 65536)]
        flow_capacity: usize,
    },
    /// Show the interface, its peers, handshakes and transfer, from the running daemon.
    Status {
        /// TUN interface name.
        #[arg(long, default_value = "bh0")]
        interface: String,
    },
    /// Print this node's WireGuard public key, creating the key pair if there is none.
    Pubkey {
        /// State directory.
        #[arg(long, default_value = "/var/lib/bulkheadd")]
        state: PathBuf,
    },
}

/// The daemon's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // BULKHEAD_LOG=error|warn|info|debug|trace; a full filter language is not worth its build.
    let level = std::env::var("BULKHEAD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkheadd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run {
            state,
            interface,
            listen_port,
            endpoint,
            allowlist,
            flow_capacity,
        } => rt.block_on(daemon::run(daemon::Settings {
            state,
            interface,
            listen_port,
            endpoint,
            allowlist,
            flow_capacity,
        })),
        Command::Status { interface } => {
            let text = rt.block_on(uapi::get(&interface))?;
            print!("{}", status(&interface, &text));
            Ok(())
        }
        Command::Pubkey { state } => {
            let key = state::load_or_create_key(&state)?;
            println!("{}", bulkhead_dataplane::public_key(&key).to_base64());
            Ok(())
        }
    }
}

/// Renders a UAPI `get` answer for people.
fn status(interface: &str, uapi: &str) -> String {
    let hex = |v: &str| -> Option<bulkhead_dataplane::Key> {
        let bytes: Option<Vec<u8>> = (0..v.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(v.get(i..i + 2)?, 16).ok())
            .collect();
        Some(bulkhead_dataplane::Key(bytes?.try_into().ok()?))
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
                        bulkhead_dataplane::public_key(&key).to_base64()
                    );
                }
            }
            "listen_port" => out += &format!("  listening port: {v}\n"),
            "public_key" => {
                out += &format!(
                    "peer: {}\n",
                    hex(v).map_or(v.to_string(), |k| k.to_base64())
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
