//! The host firewall's I/O (spec §7): the daemon's two nftables tables, kept as the
//! configuration wants them, and the NFLOG reader that turns logged packets into flow entries.
//! What the tables hold is `bulkhead-hostfw`'s business; this module only installs them.
//!
//! Like the host configuration, a table the kernel refuses never stops the daemon: the failure
//! is reported as the node's status and tried again every second. The guard table is created
//! with the owner flag on this module's socket, so it goes when the daemon goes; the firewall
//! table is not, so in `enforce` it outlives a crash (assume breach). `mode: off`, or leaving
//! the scope, deletes it; so does `bulkheadd firewall off`.

mod nflog;
mod socket;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use bulkhead_allowlist::{Addressing, UnderlayMode};
use bulkhead_hostfw::{FIREWALL, GUARD, Host, Table, encode};
use bulkhead_proto::{UnderlayConfig, UnderlayStatus};

pub use nflog::{Counts as NflogCounts, spawn as spawn_nflog};
pub use socket::Nftables;

use crate::retrying::{Failure, RETRY_EVERY};

/// What the daemon knows of its host, for the firewall.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The overlay interface.
    pub interface: String,
    /// The WireGuard port.
    pub wireguard_port: u16,
    /// The controllers the daemon was started with, resolved.
    pub controllers: Vec<SocketAddr>,
    /// The NFLOG group of the log rules.
    pub nflog_group: u16,
}

/// The tables a configuration wants.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    guard: Option<Table>,
    firewall: Option<Table>,
    mode: UnderlayMode,
}

/// The daemon's tables.
#[derive(Debug)]
pub struct Firewall {
    facts: Facts,
    nft: Option<Nftables>,
    wanted: Option<Wanted>,
    guard_in_place: Option<Table>,
    /// `Some(None)`: known to hold no firewall table.
    firewall_in_place: Option<Option<Table>>,
    failure: Option<Failure>,
    /// When the tables were last checked to be there.
    checked: Instant,
}

/// How often the daemon checks that its tables are still in place.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Firewall {
    /// Nothing installed yet; a table left by an earlier daemon stays until a configuration
    /// says otherwise.
    pub fn new(facts: Facts) -> Firewall {
        Firewall {
            facts,
            nft: None,
            wanted: None,
            guard_in_place: None,
            firewall_in_place: None,
            failure: None,
            checked: Instant::now(),
        }
    }

    /// Brings the tables to what `underlay` asks for an identity at `address`.
    pub async fn configure(
        &mut self,
        address: Ipv4Addr,
        addressing: Addressing,
        underlay: Option<&UnderlayConfig>,
    ) {
        let host = Host {
            interface: &self.facts.interface,
            overlay_address: address,
            wireguard_port: self.facts.wireguard_port,
            controllers: &self.facts.controllers,
            nflog_group: self.facts.nflog_group,
        };
        self.wanted = Some(Wanted {
            // With the servers' own addresses there is no overlay address to guard: the
            // identity's address is the server's, and the firewall closes its underlay.
            guard: (addressing == Addressing::Overlay).then(|| bulkhead_hostfw::guard(&host)),
            firewall: underlay.and_then(|u| bulkhead_hostfw::firewall(u, &host)),
            mode: underlay.map_or(UnderlayMode::Off, |u| u.mode),
        });
        self.reconcile().await;
    }

    /// Tries again if the last attempt failed a while ago, and every [`CHECK_EVERY`] checks
    /// that the tables it installed are still there (`nft flush ruleset`, another tool, a
    /// person): a missing one is installed again. Returns whether it tried anything.
    pub async fn retry(&mut self) -> bool {
        let due = self.failure.as_ref().is_some_and(Failure::due);
        if due {
            self.reconcile().await;
            return true;
        }
        if self.checked.elapsed() < CHECK_EVERY {
            return false;
        }
        self.checked = Instant::now();
        let Some(nft) = self.nft.as_mut() else {
            return false;
        };
        let mut gone = Vec::new();
        if self.guard_in_place.is_some() && !nft.exists(GUARD).await.unwrap_or(true) {
            self.guard_in_place = None;
            gone.push(GUARD);
        }
        if matches!(self.firewall_in_place, Some(Some(_)))
            && !nft.exists(FIREWALL).await.unwrap_or(true)
        {
            self.firewall_in_place = None;
            gone.push(FIREWALL);
        }
        if gone.is_empty() {
            return false;
        }
        tracing::warn!(tables = ?gone, "a firewall table was removed behind the daemon's back: installing it again");
        self.reconcile().await;
        true
    }

    /// What keeps the tables from the configuration, if anything.
    pub fn problem(&self) -> Option<&str> {
        self.failure.as_ref().map(|f| f.error.as_str())
    }

    /// The mode in force and whether its table is in place, for reports.
    pub fn status(&self) -> Option<UnderlayStatus> {
        let w = self.wanted.as_ref()?;
        Some(UnderlayStatus {
            mode: w.mode,
            installed: w.firewall.is_some() && self.firewall_in_place.as_ref() == Some(&w.firewall),
        })
    }

    /// The firewall table's counted rules, by chain and comment: what each `allow` entry let
    /// in or out, and what the last rules dropped (`default deny`) or would have (`would
    /// deny`). Empty without a table.
    pub async fn counters(&mut self) -> Vec<bulkhead_hostfw::counters::Counted> {
        if self.wanted.as_ref().is_none_or(|w| w.firewall.is_none()) {
            return Vec::new();
        }
        let Some(nft) = self.nft.as_mut() else {
            return Vec::new();
        };
        nft.counters(FIREWALL).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the firewall's counters");
            Vec::new()
        })
    }

    /// On a clean stop: an observing table goes (nothing would read its logs); an enforcing
    /// one stays, so the server is no more open without the daemon than with it.
    pub async fn stop(&mut self) {
        if self
            .wanted
            .as_ref()
            .is_some_and(|w| w.mode == UnderlayMode::Observe)
            && let Some(nft) = self.nft.as_mut()
            && let Err(e) = nft.run(|seq| encode::delete(FIREWALL, seq)).await
        {
            tracing::warn!(error = %e, "cannot remove the observing firewall table");
        }
    }

    async fn reconcile(&mut self) {
        let Some(wanted) = self.wanted.clone() else {
            return;
        };
        match self.install(&wanted).await {
            Ok(()) => {
                if self.failure.take().is_some() {
                    tracing::info!("host firewall in place");
                }
            }
            Err(e) => {
                let (failure, log) = Failure::next(self.failure.as_ref(), e, Instant::now());
                if log {
                    tracing::error!(
                        error = %failure.error,
                        retry_every = ?RETRY_EVERY,
                        "host firewall not in place; retrying"
                    );
                }
                self.failure = Some(failure);
            }
        }
    }

    async fn install(&mut self, wanted: &Wanted) -> Result<(), String> {
        if self.nft.is_none() {
            let nft = Nftables::open().map_err(|e| format!("cannot open nf_tables: {e}"))?;
            self.nft = Some(nft);
            // A new socket owns nothing: the guard is created anew.
            self.guard_in_place = None;
        }
        let Some(nft) = self.nft.as_mut() else {
            return Err("no nf_tables socket".into());
        };
        if self.guard_in_place != wanted.guard {
            self.guard_in_place = None;
            match &wanted.guard {
                Some(g) => nft.run(|seq| encode::replace(g, seq)).await,
                None => nft.run(|seq| encode::delete(GUARD, seq)).await,
            }
            .map_err(|e| format!("cannot install the overlay guard table: {e}"))?;
            self.guard_in_place = wanted.guard.clone();
        }
        if self.firewall_in_place.as_ref() != Some(&wanted.firewall) {
            self.firewall_in_place = None;
            match &wanted.firewall {
                Some(t) => nft
                    .run(|seq| encode::replace(t, seq))
                    .await
                    .map_err(|e| format!("cannot install the firewall table: {e}"))?,
                None => nft
                    .run(|seq| encode::delete(FIREWALL, seq))
                    .await
                    .map_err(|e| format!("cannot remove the firewall table: {e}"))?,
            }
            self.firewall_in_place = Some(wanted.firewall.clone());
            match &wanted.firewall {
                Some(_) => tracing::info!(mode = %wanted.mode, "host firewall table installed"),
                None => tracing::info!("no host firewall table"),
            }
        }
        Ok(())
    }
}

/// `bulkheadd firewall off`: removes the firewall table, whatever installed it.
pub async fn off() -> std::io::Result<()> {
    Nftables::open()?
        .run(|seq| encode::delete(FIREWALL, seq))
        .await
}

/// Sets strict reverse-path filtering on the overlay interface: a packet arriving there must
/// come from an address routed through it. (The kernel uses the stricter of `all` and the
/// interface's own setting.)
pub fn strict_reverse_path(interface: &str) -> std::io::Result<()> {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"),
        "1",
    )
}
