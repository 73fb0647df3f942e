//! The daemon's link to the controller: enrollment, then one long-lived stream of its own
//! configuration, and reports of what it enforces.
//!
//! The link never touches the data plane: it hands what the controller said to the daemon loop
//! ([`Update`]) and reads back what the loop applied ([`Applied`]). When the controller cannot
//! be reached, the link retries with capped, jittered exponential backoff and the loop keeps
//! enforcing what it has: the link going away is never a reason to let more through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bulkhead_proto::NodeConfig;
use bulkhead_proto::tls::{Identity, Trust};
use bulkhead_proto::{ApiError, Client, Facts, FlowBatch, NodeMessage, Report, ReportAck, Token};
use tokio::sync::{mpsc, watch};

use crate::flowlog::FlowLog;
use crate::state::{Enrollment, StateDir, load_or_create_key};

/// Enrolls with a join token: creates the keys locally, sends only their public halves, saves
/// the credential. Returns the enrollment.
pub async fn join(state: &StateDir, token: &str) -> anyhow::Result<Enrollment> {
    let t = Token::decode(token).map_err(anyhow::Error::msg)?;
    let wg = load_or_create_key(&state.0)?;
    let en = bulkhead_proto::join(&t, wg.public_key())
        .await
        .context("join refused")?;
    let mut controllers = en.response.controllers;
    for u in t.urls {
        if !controllers.contains(&u) {
            controllers.push(u);
        }
    }
    let e = Enrollment {
        identity: en.response.identity,
        certificate: en.response.certificate,
        key: en.credential.pem(),
        ca: en.response.ca,
        controllers,
    };
    state.save_enrollment(&e)?;
    Ok(e)
}

/// What the controller told the daemon.
#[derive(Debug)]
pub enum Update {
    /// Enforce this configuration.
    Config(Box<NodeConfig>),
    /// There is no allowlist for this identity: let nothing pass.
    NoPolicy,
    /// The credential was refused: revoked. Let nothing pass.
    Revoked,
}

/// What the daemon loop enforces, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The policy revision in force, if any.
    pub revision: Option<u64>,
    /// The digest of the allowlist in force, if the controller set one.
    pub digest: Option<String>,
    /// Peers with a tunnel.
    pub peers: usize,
    /// What keeps the node from its configuration, if anything (the kernel refused the
    /// interface's address, say); reported as the node's status, which is `ok` otherwise.
    pub problem: Option<String>,
    /// The host firewall's mode and whether its table is in place.
    pub underlay: Option<bulkhead_proto::UnderlayStatus>,
}

/// Most flow log entries per batch.
const FLOW_BATCH: usize = 2_000;

/// How often a node reports even when nothing changed.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a revoked node asks again (an operator may have re-enrolled it meanwhile).
const REVOKED_RETRY: Duration = Duration::from_secs(30);

/// What the link shares with the rest of the daemon.
#[derive(Debug)]
pub struct Wiring {
    /// Where to say what the controller said.
    pub updates: mpsc::Sender<Update>,
    /// What the daemon loop applied.
    pub applied: watch::Receiver<Applied>,
    /// Posture facts.
    pub facts: watch::Receiver<Facts>,
    /// The flow log to ship.
    pub flows: Arc<Mutex<FlowLog>>,
}

/// Runs the link until the daemon stops.
pub async fn run(
    mut enrollment: Enrollment,
    state: StateDir,
    listen_port: u16,
    endpoint: Option<SocketAddr>,
    w: Wiring,
) {
    let Wiring {
        updates,
        mut applied,
        mut facts,
        flows,
    } = w;
    let mut backoff = BACKOFF_MIN;
    loop {
        // Rebuilt on every connect: the controller list may have grown since.
        let client = match Client::new(
            &enrollment.controllers,
            &Trust::Ca(enrollment.ca.clone()),
            Some(&Identity {
                cert_pem: enrollment.certificate.clone(),
                key_pem: enrollment.key.clone(),
            }),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "enrollment unusable; nothing passes");
                let _ = updates.send(Update::Revoked).await;
                return;
            }
        };
        let link = Session {
            listen_port,
            endpoint,
            updates: &updates,
            flows: &flows,
        };
        let r = link
            .run(&client, &mut applied, &mut facts, &mut enrollment, &state)
            .await;
        let wait = match r {
            Ok(()) => {
                tracing::warn!("controller ended the stream; reconnecting");
                // To the next controller first: one that ends its nodes' streams is going away,
                // or has lost its store (and would answer 503 next).
                enrollment.controllers.rotate_left(1);
                backoff = BACKOFF_MIN;
                BACKOFF_MIN
            }
            Err(e @ ApiError::Api { status: 401, .. }) => {
                tracing::error!(error = %e, "the controller refuses this node's credential (revoked?): nothing passes; join again with a new token");
                if updates.send(Update::Revoked).await.is_err() {
                    return;
                }
                REVOKED_RETRY
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "controller unreachable; enforcing the last allowlist");
                // Start the next attempt at the next controller: a dead one that does not even
                // refuse would otherwise cost its connect timeout before the others are tried.
                enrollment.controllers.rotate_left(1);
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        if updates.is_closed() {
            return;
        }
        tokio::time::sleep(jitter(wait)).await;
    }
}

/// Up to 25% less than `d`, so that nodes do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(1.0 - f64::from(nanos % 1000) / 4000.0)
}

/// What a session needs besides the client.
struct Session<'a> {
    listen_port: u16,
    endpoint: Option<SocketAddr>,
    updates: &'a mpsc::Sender<Update>,
    flows: &'a Mutex<FlowLog>,
}

impl Session<'_> {
    /// One connection: the stream, and reports on it. Returns when the stream ends. Each
    /// report's answer lists the live controllers; new ones are saved in the enrollment, so the
    /// node can fail over to controllers added after it joined.
    async fn run(
        &self,
        client: &Client,
        applied: &mut watch::Receiver<Applied>,
        facts: &mut watch::Receiver<Facts>,
        enrollment: &mut Enrollment,
        state: &StateDir,
    ) -> Result<(), ApiError> {
        let mut conn = client.connect().await?;
        let mut lines = conn.stream("/v1/node/stream").await?;
        tracing::info!(controller = conn.url(), "connected to the controller");
        // At least once per shortest fact interval: the controller counts facts as failing
        // three intervals after the last report.
        let every = facts
            .borrow()
            .values()
            .map(|f| Duration::from_secs(f.interval.max(1)))
            .min()
            .unwrap_or(REPORT_EVERY)
            .min(REPORT_EVERY);
        let mut tick = tokio::time::interval(every);
        let mut ship = tokio::time::interval(Duration::from_secs(1));
        loop {
            let report = tokio::select! {
                m = lines.next::<NodeMessage>() => {
                    let u = match m? {
                        None => return Ok(()),
                        Some(NodeMessage::Config(c)) => Update::Config(Box::new(c)),
                        Some(NodeMessage::NoPolicy { .. }) => Update::NoPolicy,
                    };
                    if self.updates.send(u).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                r = applied.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    self.report(&applied.borrow_and_update().clone(), &facts.borrow())
                }
                // A posture fact changed: tell the controller now, not at the next tick.
                r = facts.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    self.report(&applied.borrow().clone(), &facts.borrow_and_update())
                }
                _ = tick.tick() => self.report(&applied.borrow().clone(), &facts.borrow()),
                // The flow log, in batches, every second while there is something.
                _ = ship.tick() => {
                    let (batch, dropped) = self
                        .flows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take(FLOW_BATCH);
                    if !batch.is_empty() || dropped > 0 {
                        let _: serde_json::Value = conn
                            .post("/v1/node/flows", &FlowBatch { flows: batch, dropped })
                            .await?;
                    }
                    continue;
                }
            };
            let ack: ReportAck = conn.post("/v1/node/report", &report).await?;
            let mut known = enrollment.controllers.clone();
            for u in ack.controllers {
                if !known.contains(&u) {
                    known.push(u);
                }
            }
            if known != enrollment.controllers {
                tracing::info!(controllers = ?known, "learned new controllers");
                enrollment.controllers = known;
                if let Err(e) = state.save_enrollment(enrollment) {
                    tracing::error!(error = %format!("{e:#}"), "cannot save the controller list");
                }
            }
        }
    }

    fn report(&self, a: &Applied, facts: &Facts) -> Report {
        Report {
            endpoint: self.endpoint,
            listen_port: self.listen_port,
            revision: a.revision,
            digest: a.digest.clone(),
            status: a.problem.clone().unwrap_or_else(|| "ok".into()),
            peers: a.peers,
            version: env!("CARGO_PKG_VERSION").into(),
            facts: facts.clone(),
            underlay: a.underlay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_ok_or_what_is_wrong() {
        let (updates, _rx) = mpsc::channel(1);
        let flows = Mutex::new(FlowLog::default());
        let session = Session {
            listen_port: 51820,
            endpoint: None,
            updates: &updates,
            flows: &flows,
        };
        let mut applied = Applied {
            revision: Some(3),
            ..Applied::default()
        };
        assert_eq!(session.report(&applied, &Facts::new()).status, "ok");
        applied.problem = Some("cannot give bh0 the address 10.0.0.1/33".into());
        let report = session.report(&applied, &Facts::new());
        assert_eq!(report.status, "cannot give bh0 the address 10.0.0.1/33");
        assert_eq!(report.revision, Some(3));
    }
}
