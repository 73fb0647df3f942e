//! The controller API, shared by the controller, the daemon and the CLI.
//!
//! HTTP/2 over TLS with JSON bodies (see docs/architecture.md for why not gRPC). Every route is
//! under `/v1`. Callers are authenticated by their client certificate ([`tls`]); a join carries
//! a token instead. Errors are JSON too: [`ErrorBody`] with a stable `code`.
//!
//! | route | caller | body → answer |
//! |---|---|---|
//! | `POST /v1/join` | token holder | [`JoinRequest`] → [`JoinResponse`] |
//! | `GET /v1/node/stream` | node | → newline-delimited [`NodeMessage`]s, for as long as it stays open |
//! | `POST /v1/node/report` | node | [`Report`] → [`ReportAck`] |
//! | `GET /v1/policy` | admin | → [`PolicyView`] |
//! | `POST /v1/policy/plan` | admin | [`PolicyRequest`] → [`PlanResponse`] |
//! | `POST /v1/policy/apply` | admin | [`PolicyRequest`] → [`ApplyResponse`] |
//! | `POST /v1/tokens` | admin | [`TokenRequest`] → [`TokenResponse`] |
//! | `GET /v1/nodes` | admin | → [`NodeView`]s |
//! | `POST /v1/nodes/{identity}/revoke` | admin | → [`RevokeResponse`] |
//! | `GET /v1/status` | admin | → [`StatusView`] |
//!
//! Quarantine, release, flows and audit (issue 6) are further admin routes of the same shape;
//! administrators and access requests (issue 17) are in [`admin`]. Each admin route needs a
//! least [`Role`]: the controller's `api::ROUTES` lists them all.

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
mod flow;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
mod node;
pub mod private;
pub mod tls;
pub mod token;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use admin::{
    AccessRequest, AccessState, AccessView, AdminIssued, AdminRequest, AdminView, Approval, Role,
};
pub use client::{ApiError, Client, Connection};
pub use config::CliConfig;
pub use flow::{FlowAggregate, FlowBatch, FlowEntry, FlowView, Path, Protocol, Verdict};
pub use keys::{PrivateKey, PublicKey};
pub use node::{NodeConfig, PeerInfo, UnderlayAllow, UnderlayConfig, UnderlayStatus};
pub use token::Token;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code: `unauthenticated`, `forbidden`, `bad_request`,
    /// `too_large`, `invalid_policy`, `conflict`, `not_found`, `token_invalid`, `unavailable`,
    /// `internal`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Extra lines, e.g. every `FILE:LINE:COL: error: …` of a refused policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// `POST /v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret part.
    pub secret: String,
    /// The node's WireGuard public key.
    pub wireguard_key: PublicKey,
    /// The node's credential public key ([`tls::ClientPublicKey::to_base64`]).
    pub credential_key: String,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The identity the token was bound to.
    pub identity: String,
    /// The node's client certificate, PEM.
    pub certificate: String,
    /// The CA certificate, PEM.
    pub ca: String,
    /// Every controller URL known.
    pub controllers: Vec<String>,
}

/// What the controller pushes on a node's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One message per change, held once per identity: boxing the common variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum NodeMessage {
    /// The node's whole configuration: its own allowlist and its peers' keys and endpoints.
    Config(NodeConfig),
    /// The identity has no allowlist (not in the policy, or no policy yet): nothing passes.
    NoPolicy {
        /// The policy revision, 0 if none.
        revision: u64,
    },
}

/// `POST /v1/node/report`: a node's view of itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Where peers should send to; the controller uses the connection's address with
    /// `listen_port` if this is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// The WireGuard UDP port.
    pub listen_port: u16,
    /// The policy revision of the allowlist the node enforces, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// That allowlist's [`Allowlist::digest`](bulkhead_allowlist::Allowlist::digest), if it
    /// has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `ok`, or what is wrong.
    pub status: String,
    /// Peers with a tunnel.
    #[serde(default)]
    pub peers: usize,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
    /// Posture facts about its host and the results of its node-local checks.
    #[serde(default, skip_serializing_if = "Facts::is_empty")]
    pub facts: Facts,
    /// The host firewall: the mode its configuration asks for, and whether its table is in
    /// place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<UnderlayStatus>,
}

/// The digest the controller sets in an allowlist: 64 bits of SHA-256 over its JSON with no
/// revision and no digest, so equal contents have equal digests on every controller.
pub fn allowlist_digest(a: &bulkhead_allowlist::Allowlist) -> String {
    let mut content = a.clone();
    content.revision = 0;
    content.digest.clear();
    let mut d = tls::sha256_hex(&serde_json::to_vec(&content).unwrap_or_default());
    d.truncate(16);
    d
}

/// One posture fact as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// The value: a word, a version, or `true`/`false`.
    pub value: String,
    /// How often the node measures it, in seconds; it counts as failing once three intervals
    /// pass without a report.
    pub interval: u64,
}

/// Facts by name (`os.id`, `check.NAME`, …).
pub type Facts = BTreeMap<String, Fact>;

/// One posture check's result for one identity, as `bulkhead nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    /// The check's name.
    pub check: String,
    /// Whether it passes.
    pub pass: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportAck {
    /// Every live controller's URL: the node adds new ones to those it knows.
    #[serde(default)]
    pub controllers: Vec<String>,
}

/// `GET /v1/policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// The live policy revision; 0 before the first apply.
    pub revision: u64,
    /// The policy text as applied.
    pub text: String,
    /// The file name it was applied from.
    pub source: String,
    /// When, Unix seconds.
    pub applied_at: i64,
    /// Who applied it: `admin`, or `file` for `--policy`.
    pub applied_by: String,
    /// Rules' windows opening or closing from now on, soonest first.
    #[serde(default)]
    pub upcoming: Vec<Boundary>,
}

/// One entry of the audit log: who did what, when. Append-only in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at: i64,
    /// The administrator, `file:PATH` for `--policy`, `node` for an enrollment, or `controller`
    /// for what it does by itself (an automatic quarantine, one that ends).
    pub who: String,
    /// What was done.
    pub action: AuditAction,
    /// The identity concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The policy revision, for an apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// What else there is to say: the plan's summary, a quarantine's reason and end.
    #[serde(default)]
    pub detail: String,
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    /// A policy was applied.
    #[serde(rename = "policy.apply")]
    PolicyApply,
    /// A node enrolled with a token.
    #[serde(rename = "node.enroll")]
    NodeEnroll,
    /// A node was revoked.
    #[serde(rename = "node.revoke")]
    NodeRevoke,
    /// An identity was quarantined.
    #[serde(rename = "quarantine")]
    Quarantine,
    /// A quarantine ended.
    #[serde(rename = "release")]
    Release,
    /// A join token was created.
    #[serde(rename = "token.create")]
    TokenCreate,
    /// An administrator's credential was issued.
    #[serde(rename = "admin.issue")]
    AdminIssue,
    /// An administrator was added.
    #[serde(rename = "admin.add")]
    AdminAdd,
    /// An administrator was revoked.
    #[serde(rename = "admin.revoke")]
    AdminRevoke,
    /// A call beyond the caller's role was refused.
    #[serde(rename = "refused")]
    Refused,
    /// Access that needs approval was asked for.
    #[serde(rename = "access.request")]
    AccessRequest,
    /// An access request was approved (by one of the approvers it needs).
    #[serde(rename = "access.approve")]
    AccessApprove,
    /// An access request was denied.
    #[serde(rename = "access.deny")]
    AccessDeny,
    /// Approved access was revoked before its end.
    #[serde(rename = "access.revoke")]
    AccessRevoke,
    /// Approved access reached its end.
    #[serde(rename = "access.end")]
    AccessEnd,
    /// An access request was not approved in time.
    #[serde(rename = "access.expire")]
    AccessExpire,
    /// An action this version does not know (written by a newer controller).
    #[serde(other)]
    Unknown,
}

impl AuditAction {
    /// The name the audit log shows: `policy.apply`, `node.enroll`, `node.revoke`,
    /// `quarantine`, `release`, `token.create`, `admin.issue`, `admin.add`, `admin.revoke`,
    /// `refused`, `access.request`, `access.approve`, `access.deny`, `access.revoke`,
    /// `access.end`, `access.expire`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::PolicyApply => "policy.apply",
            AuditAction::NodeEnroll => "node.enroll",
            AuditAction::NodeRevoke => "node.revoke",
            AuditAction::Quarantine => "quarantine",
            AuditAction::Release => "release",
            AuditAction::TokenCreate => "token.create",
            AuditAction::AdminIssue => "admin.issue",
            AuditAction::AdminAdd => "admin.add",
            AuditAction::AdminRevoke => "admin.revoke",
            AuditAction::Refused => "refused",
            AuditAction::AccessRequest => "access.request",
            AuditAction::AccessApprove => "access.approve",
            AuditAction::AccessDeny => "access.deny",
            AuditAction::AccessRevoke => "access.revoke",
            AuditAction::AccessEnd => "access.end",
            AuditAction::AccessExpire => "access.expire",
            AuditAction::Unknown => "unknown",
        }
    }
}

impl PartialEq<&str> for AuditAction {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An identity's quarantine, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Unix seconds.
    pub since: i64,
    /// Unix seconds; `None` until released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Why: `by hand`, or the denied flows counted.
    pub reason: String,
    /// Who: an administrator, or `controller`.
    pub by: String,
}

/// `POST /v1/nodes/{identity}/quarantine`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuarantineRequest {
    /// Seconds; else the policy's `quarantine.duration`, else until released.
    #[serde(default)]
    pub duration: Option<u64>,
}

/// The answer to a quarantine or a release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineResponse {
    /// The identity.
    pub identity: String,
    /// Its quarantine now, if any.
    pub quarantine: Option<Quarantine>,
}

/// A rule's window opening or closing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boundary {
    /// The rule.
    pub rule: String,
    /// `opens` (its `not_before`) or `expires`.
    pub event: String,
    /// When, Unix seconds.
    pub at: i64,
}

/// `POST /v1/policy/plan` and `/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The policy text.
    pub text: String,
    /// Its file name, for diagnostics.
    pub source: String,
    /// Apply only if the live revision is still this one (the one the plan was made against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_revision: Option<u64>,
}

/// Reachability between two policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Identities the new policy adds.
    pub identities_added: Vec<String>,
    /// Identities it removes.
    pub identities_removed: Vec<String>,
    /// Pair by pair: what is gained and lost.
    pub changes: Vec<PairChange>,
    /// Pairs whose access holds under other conditions (windows, posture) than before.
    #[serde(default)]
    pub conditions: Vec<ConditionChange>,
    /// What changes on the underlay.
    #[serde(default, skip_serializing_if = "UnderlayPlan::is_empty")]
    pub underlay: UnderlayPlan,
}

/// What changes on the underlay between two policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayPlan {
    /// The `underlay` block's items that differ, as written: `mode`, `scope`, `allow NAME`.
    #[serde(default)]
    pub block: Vec<UnderlayBlockChange>,
    /// The servers whose host firewall changes, by name.
    #[serde(default)]
    pub servers: Vec<UnderlayServerChange>,
}

impl UnderlayPlan {
    /// Whether nothing changes on the underlay.
    pub fn is_empty(&self) -> bool {
        self.block.is_empty() && self.servers.is_empty()
    }
}

/// One item of the `underlay` block that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayBlockChange {
    /// `mode`, `scope` or `allow NAME`.
    pub item: String,
    /// Before, as written; `None`: not there.
    #[serde(default)]
    pub before: Option<String>,
    /// After, as written; `None`: not there.
    #[serde(default)]
    pub after: Option<String>,
}

/// One server whose host firewall changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayServerChange {
    /// The identity.
    pub identity: String,
    /// Its mode before: `off`, `observe` or `enforce`.
    pub before: String,
    /// Its mode after.
    pub after: String,
    /// What may newly cross its firewall, e.g. `in tcp/22 from 10.0.9.0/24`.
    #[serde(default)]
    pub gained: Vec<String>,
    /// What no longer may.
    #[serde(default)]
    pub lost: Vec<String>,
}

/// One ordered pair whose access holds under other conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionChange {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// The conditions before, as `bulkhead policy diff` writes them; empty: none.
    pub before: Vec<String>,
    /// The conditions after.
    pub after: Vec<String>,
}

impl Plan {
    /// The counts, for an apply's answer and the audit log.
    pub fn summary(&self) -> PlanSummary {
        PlanSummary {
            identities_added: self.identities_added.len(),
            identities_removed: self.identities_removed.len(),
            pairs_gaining: self.changes.iter().filter(|c| !c.gained.is_empty()).count(),
            pairs_losing: self.changes.iter().filter(|c| !c.lost.is_empty()).count(),
            pairs_conditions_changed: self.conditions.len(),
            underlay_items_changed: self.underlay.block.len(),
            underlay_servers_changed: self.underlay.servers.len(),
        }
    }
}

/// A plan in numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Identities added.
    pub identities_added: usize,
    /// Identities removed.
    pub identities_removed: usize,
    /// Ordered pairs that gain some access.
    pub pairs_gaining: usize,
    /// Ordered pairs that lose some access.
    pub pairs_losing: usize,
    /// Ordered pairs whose access holds under other conditions.
    #[serde(default)]
    pub pairs_conditions_changed: usize,
    /// Items of the `underlay` block that differ.
    #[serde(default)]
    pub underlay_items_changed: usize,
    /// Servers whose host firewall changes.
    #[serde(default)]
    pub underlay_servers_changed: usize,
}

/// One ordered pair's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairChange {
    /// Initiator.
    pub from: String,
    /// Responder.
    pub to: String,
    /// Newly allowed, e.g. `["tcp/5432"]`.
    pub gained: Vec<String>,
    /// No longer allowed.
    pub lost: Vec<String>,
}

/// The answer to a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanResponse {
    /// The live revision the plan is against.
    pub base_revision: u64,
    /// The change.
    pub plan: Plan,
}

/// The answer to an apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The new live revision (the old one if nothing changed).
    pub revision: u64,
    /// Whether the text differed from the live policy.
    pub changed: bool,
    /// What changed, in numbers (the plan itself is what `plan` answers; at thousands of
    /// identities it is megabytes, and the operator has seen it already).
    pub summary: PlanSummary,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The identity the token enrolls.
    pub identity: String,
    /// Lifetime in seconds.
    pub ttl: u64,
}

/// The answer to a token request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The token, to give to `bulkheadd join`.
    pub token: String,
    /// When it expires, Unix seconds.
    pub expires: i64,
    /// Something the operator should know, e.g. that the identity is not in the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One identity, as `bulkhead nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// The identity.
    pub identity: String,
    /// Its overlay address, if the policy names it.
    pub address: Option<Ipv4Addr>,
    /// Whether it is in the live policy.
    pub in_policy: bool,
    /// Whether a node has enrolled as it.
    pub enrolled: bool,
    /// Its WireGuard endpoint, as reported.
    pub endpoint: Option<SocketAddr>,
    /// Whether its stream is open now.
    pub online: bool,
    /// The last report, Unix seconds.
    pub last_seen: Option<i64>,
    /// The revision of the allowlist it has applied: the policy revision that last changed it.
    pub revision: Option<u64>,
    /// Whether it enforces the allowlist the live policy gives it.
    pub in_sync: bool,
    /// Its reported status.
    pub status: Option<String>,
    /// Each posture check the policy's rules name for it, passing or not.
    #[serde(default)]
    pub posture: Vec<CheckView>,
    /// Windows of the rules it is on either side of, opening or closing from now on.
    #[serde(default)]
    pub upcoming: Vec<Boundary>,
    /// Its quarantine, if it is in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// The host firewall mode the live policy gives it (`off` out of scope).
    #[serde(default)]
    pub underlay_mode: bulkhead_allowlist::UnderlayMode,
    /// The host firewall as its node last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<UnderlayStatus>,
}

/// The answer to a revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The identity revoked.
    pub identity: String,
    /// Whether a node was enrolled as it.
    pub was_enrolled: bool,
}

/// A controller that predates `store_current` was taken to be current.
fn yes() -> bool {
    true
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The controller's version.
    pub version: String,
    /// The URL it advertises.
    pub url: String,
    /// Every live controller's URL (several share one etcd).
    #[serde(default)]
    pub controllers: Vec<String>,
    /// Where its state lives.
    pub store: String,
    /// Each store endpoint (a file, or each etcd member) and its health: `ok, …` or the error.
    #[serde(default)]
    pub store_health: Vec<(String, String)>,
    /// Whether the controller can vouch that its view is the store's: with etcd, confirmed in
    /// the last few seconds. A controller that is not serves no node and refuses changes.
    #[serde(default = "yes")]
    pub store_current: bool,
    /// Milliseconds since the store last confirmed the controller's view; absent for the
    /// embedded store, which is always current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_unconfirmed_ms: Option<u64>,
    /// The live policy revision.
    pub revision: u64,
    /// Identities in the policy.
    pub identities: usize,
    /// Nodes enrolled.
    pub enrolled: usize,
    /// Nodes with an open stream.
    pub online: usize,
    /// Enrolled nodes that enforce the allowlist the live policy gives them.
    pub in_sync: usize,
    /// Seconds since the controller started.
    pub uptime: u64,
}

/// What a node holds after enrolling.
#[derive(Debug)]
pub struct Enrolled {
    /// The controller's answer: identity, certificate, CA, controller URLs.
    pub response: JoinResponse,
    /// The credential key the certificate was issued for, created here and never sent.
    pub credential: tls::CredentialKey,
}

/// Enrolls with a join token: creates the credential key locally, trusts the controller by the
/// CA fingerprint the token carries, and sends only public keys.
pub async fn join(token: &Token, wireguard_key: PublicKey) -> Result<Enrolled, ApiError> {
    let credential = tls::CredentialKey::generate()?;
    let client = Client::new(
        &token.urls,
        &tls::Trust::Fingerprint(token.ca_fingerprint.clone()),
        None,
    )?;
    let response: JoinResponse = client
        .connect()
        .await?
        .post(
            "/v1/join",
            &JoinRequest {
                secret: token.secret.clone(),
                wireguard_key,
                credential_key: credential.public().to_base64(),
            },
        )
        .await?;
    Ok(Enrolled {
        response,
        credential,
    })
}
