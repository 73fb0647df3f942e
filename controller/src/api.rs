//! The HTTP layer: TLS, authentication, one permission layer, routes, JSON in and out, and the
//! one mapping of [`Error`]s to HTTP statuses and error codes. Thin: the work is in
//! [`crate::ops`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bulkhead_proto::tls::fingerprint;
use bulkhead_proto::{ErrorBody, JoinRequest, NodeMessage, PolicyRequest, Report, TokenRequest};
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tower::ServiceExt;

use crate::Controller;
use bulkhead_proto::Role;

use crate::ops::{Actor, Error};
use crate::records::CredRecord;
use crate::view::lock;

/// Largest request body of an administrator's call: a policy of tens of thousands of identities
/// fits.
const MAX_BODY: usize = 32 << 20;
/// Largest join request: a token's secret and two public keys.
const MAX_JOIN_BODY: usize = 16 << 10;
/// Largest node report (its facts are bounded too).
const MAX_REPORT_BODY: usize = 256 << 10;
/// Largest flow batch: 10,000 entries of a few hundred bytes.
const MAX_FLOWS_BODY: usize = 4 << 20;
/// Refused calls written to the audit log per administrator and minute; more are only logged.
const MAX_REFUSALS_AUDITED: u32 = 20;
/// Connections served at once; more wait in the kernel's backlog. Each node holds one.
const MAX_CONNECTIONS: usize = 16_384;

/// The HTTP status and the API's stable code of an error: the one place they are chosen.
fn status_of(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        Error::InvalidPolicy { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy"),
        Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Error::TokenInvalid => (StatusCode::FORBIDDEN, "token_invalid"),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = status_of(&self);
        let body = match self {
            Error::InvalidPolicy { message, details } => ErrorBody {
                code: code.into(),
                message,
                details,
            },
            e => ErrorBody {
                code: code.into(),
                message: e.to_string(),
                details: Vec::new(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

fn json<T: Serialize>(r: Result<T, Error>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A request body within its route's limit; over it, `413` with the API's JSON error
/// (`too_large`). Read only after the permission layer let the caller through.
#[derive(Debug)]
pub struct Limited(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Limited {
    type Rejection = Response;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Limited, Response> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Limited(b)),
            Err(e) => {
                let status = e.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                };
                let body = ErrorBody {
                    code: code.into(),
                    message: e.body_text(),
                    details: Vec::new(),
                };
                Err((status, axum::Json(body)).into_response())
            }
        }
    }
}

fn body<T: DeserializeOwned>(b: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| Error::BadRequest(format!("malformed request body: {e}")))
}

/// Who is calling, from the TLS handshake.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The fingerprint of the client certificate, if one was presented (and verified by TLS).
    pub fingerprint: Option<String>,
    /// The TCP peer.
    pub addr: SocketAddr,
}

/// Who may call a route. Every route but `join` names one, and the permission layer
/// ([`authorize`]) is the one place that checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An enrolled node, about itself.
    Node,
    /// An administrator with at least this role.
    Admin(Role),
}

/// The node making a call, as its credential names it.
#[derive(Debug, Clone)]
pub struct NodeIdentity(pub String);

/// The role of the administrator making a call, for the calls whose answer depends on it
/// (who may deny or revoke an access request).
#[derive(Debug, Clone, Copy)]
pub struct CallerRole(pub Role);

type Ctl = Arc<Controller>;

impl Controller {
    /// The credential of a caller: the view's copy, else the store's (the view may lag a write
    /// made an instant ago, here or through another controller).
    async fn credential(&self, peer: &Peer) -> Result<CredRecord, Error> {
        let fp = peer.fingerprint.as_ref().ok_or(Error::Unauthenticated(
            "this call needs a client certificate",
        ))?;
        if let Some(c) = lock(&self.view).records().creds.get(fp).cloned() {
            return Ok(c);
        }
        let key = format!("{}{fp}", crate::records::CREDS);
        match self.store.get(&key).await.map_err(Error::store)? {
            Some(kv) => crate::records::decode(&key, &kv.value).map_err(Error::internal),
            None => Err(Error::Unauthenticated("credential unknown or revoked")),
        }
    }

    /// Writes down a call refused for the caller's role. Best effort: the refusal stands
    /// whether or not the store takes it.
    async fn audit_refusal(&self, name: &str, role: Role, need: Role, what: &str) {
        // At most a few entries a minute per administrator: a credential that keeps calling
        // beyond its role must not fill the store's audit log.
        let minute = crate::ops::unix_now().div_euclid(60);
        {
            let mut seen = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() > 1024 {
                seen.retain(|_, (m, _)| *m == minute);
            }
            let (m, n) = seen.entry(name.to_string()).or_insert((minute, 0));
            if *m != minute {
                (*m, *n) = (minute, 0);
            }
            *n += 1;
            if *n > MAX_REFUSALS_AUDITED {
                return;
            }
        }
        let entry = bulkhead_proto::AuditEntry {
            at: crate::ops::unix_ms(),
            who: name.to_string(),
            action: bulkhead_proto::AuditAction::Refused,
            identity: None,
            revision: None,
            detail: format!("{what}: needs {need}, {name} is {role}"),
        };
        let (c, a) = crate::records::audit(&entry);
        if let Err(e) = self.store.txn(&[c], &[a]).await {
            tracing::warn!(error = %e, admin = name, "cannot audit a refused call");
        }
    }
}

/// Whether an administrator's credential has expired at `now` (Unix seconds).
pub fn expired(expires: Option<i64>, now: i64) -> bool {
    expires.is_some_and(|t| now >= t)
}

/// The permission layer: authenticates the caller by its certificate, checks it against the
/// route's [`Access`] (for administrators: the role, and the credential's expiry), and hands the
/// handler an [`Actor`] and a [`CallerRole`] (administrators) or a [`NodeIdentity`] (nodes).
/// It runs on every request, so a credential revoked or expired while a connection is open
/// stops working on that connection's next request.
async fn authorize(
    State((c, access)): State<(Ctl, Access)>,
    mut req: Request<Body>,
    next: Next,
) -> Response {
    let Some(peer) = req.extensions().get::<Peer>().cloned() else {
        return Error::internal("a request without its TLS peer").into_response();
    };
    let cred = match c.credential(&peer).await {
        Ok(cred) => cred,
        Err(e) => return e.into_response(),
    };
    match (access, cred) {
        (
            Access::Admin(need),
            CredRecord::Admin {
                name,
                admin_role,
                expires,
            },
        ) => {
            if expired(expires, crate::ops::unix_now()) {
                return Error::Unauthenticated("credential expired").into_response();
            }
            if admin_role < need {
                let what = format!("{} {}", req.method(), req.uri().path());
                c.audit_refusal(&name, admin_role, need, &what).await;
                tracing::warn!(admin = %name, role = %admin_role, need = %need, call = %what, "refused");
                return Error::Forbidden(format!(
                    "{what} needs the {need} role; {name} is {admin_role}"
                ))
                .into_response();
            }
            req.extensions_mut().insert(Actor::Admin(name));
            req.extensions_mut().insert(CallerRole(admin_role));
        }
        (Access::Node, CredRecord::Node { identity }) => {
            req.extensions_mut().insert(NodeIdentity(identity));
        }
        (Access::Admin(_), CredRecord::Node { .. }) => {
            return Error::Forbidden("administrators only".into()).into_response();
        }
        (Access::Node, CredRecord::Admin { .. }) => {
            return Error::Forbidden("nodes only".into()).into_response();
        }
    }
    next.run(req).await
}

/// Refuses what a controller that cannot vouch for its view must not do
/// ([`crate::currency`]), before anything else: nodes are sent away (`503 unavailable`, which
/// a daemon answers by trying the next controller), since a stale view may still hold a
/// revoked credential or an old allowlist; administrators' changes and plans are refused with
/// the reason; administrators' reads answer from the view as it was, and `status` says it is
/// not current.
async fn current_only(
    State((c, access)): State<(Ctl, Access)>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let refuse = match access {
        Access::Node => true,
        Access::Admin(_) => req.method() != axum::http::Method::GET,
    };
    if refuse && !c.currency.current() {
        return Error::Unavailable(c.currency.why_stale()).into_response();
    }
    next.run(req).await
}

/// The routes, each with who may call it.
pub fn router(c: Ctl) -> Router {
    let layer = |access| middleware::from_fn_with_state((c.clone(), access), authorize);
    // Added after `authorize`, so it runs before it.
    let current = |access| middleware::from_fn_with_state((c.clone(), access), current_only);
    let limit = DefaultBodyLimit::max;
    let node = Router::new()
        .route("/v1/node/stream", get(stream))
        .route(
            "/v1/node/report",
            post(report).layer(limit(MAX_REPORT_BODY)),
        )
        .route(
            "/v1/node/flows",
            post(node_flows).layer(limit(MAX_FLOWS_BODY)),
        )
        .route_layer(layer(Access::Node))
        .route_layer(current(Access::Node));
    // Each group names the least role its routes need; `ROUTES` lists them for the tests.
    let viewer = Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/flows/history", get(flow_history))
        .route("/v1/policy", get(policy))
        .route("/v1/policy/plan", post(plan))
        .route("/v1/nodes", get(nodes))
        .route("/v1/audit", get(audit))
        .route("/v1/status", get(status))
        .route("/v1/admins", get(admins))
        .route("/v1/access", get(access_list))
        .route_layer(layer(Access::Admin(Role::Viewer)))
        .route_layer(current(Access::Admin(Role::Viewer)));
    let operator = Router::new()
        .route("/v1/policy/apply", post(apply))
        .route("/v1/tokens", post(token))
        .route("/v1/nodes/{identity}/revoke", post(revoke))
        .route("/v1/nodes/{identity}/quarantine", post(quarantine))
        .route("/v1/nodes/{identity}/release", post(release))
        .route("/v1/access", post(access_request))
        // An approver's, or the requester's own: `ops::access` checks which.
        .route("/v1/access/{id}/deny", post(access_deny))
        .route("/v1/access/{id}/revoke", post(access_revoke))
        .route_layer(layer(Access::Admin(Role::Operator)))
        .route_layer(current(Access::Admin(Role::Operator)));
    let approver = Router::new()
        .route("/v1/access/{id}/approve", post(access_approve))
        .route_layer(layer(Access::Admin(Role::Approver)))
        .route_layer(current(Access::Admin(Role::Approver)));
    let owner = Router::new()
        .route("/v1/admins", post(admin_add))
        .route("/v1/admins/{name}/revoke", post(admin_revoke))
        .route_layer(layer(Access::Admin(Role::Owner)))
        .route_layer(current(Access::Admin(Role::Owner)));
    let admin = viewer.merge(operator).merge(approver).merge(owner);
    Router::new()
        .route("/v1/join", post(join).layer(limit(MAX_JOIN_BODY)))
        .merge(node)
        .merge(admin)
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(c)
}

/// Every route, its method, and who may call it: `None` for anyone (join).
pub const ROUTES: &[(&str, &str, Option<Access>)] = &[
    ("POST", "/v1/join", None),
    ("GET", "/v1/node/stream", Some(Access::Node)),
    ("POST", "/v1/node/report", Some(Access::Node)),
    ("POST", "/v1/node/flows", Some(Access::Node)),
    ("GET", "/v1/flows", Some(Access::Admin(Role::Viewer))),
    (
        "GET",
        "/v1/flows/history",
        Some(Access::Admin(Role::Viewer)),
    ),
    ("GET", "/v1/policy", Some(Access::Admin(Role::Viewer))),
    ("POST", "/v1/policy/plan", Some(Access::Admin(Role::Viewer))),
    ("GET", "/v1/nodes", Some(Access::Admin(Role::Viewer))),
    ("GET", "/v1/audit", Some(Access::Admin(Role::Viewer))),
    ("GET", "/v1/status", Some(Access::Admin(Role::Viewer))),
    ("GET", "/v1/admins", Some(Access::Admin(Role::Viewer))),
    ("GET", "/v1/access", Some(Access::Admin(Role::Viewer))),
    (
        "POST",
        "/v1/policy/apply",
        Some(Access::Admin(Role::Operator)),
    ),
    ("POST", "/v1/tokens", Some(Access::Admin(Role::Operator))),
    (
        "POST",
        "/v1/nodes/{identity}/revoke",
        Some(Access::Admin(Role::Operator)),
    ),
    (
        "POST",
        "/v1/nodes/{identity}/quarantine",
        Some(Access::Admin(Role::Operator)),
    ),
    (
        "POST",
        "/v1/nodes/{identity}/release",
        Some(Access::Admin(Role::Operator)),
    ),
    ("POST", "/v1/access", Some(Access::Admin(Role::Operator))),
    (
        "POST",
        "/v1/access/{id}/deny",
        Some(Access::Admin(Role::Operator)),
    ),
    (
        "POST",
        "/v1/access/{id}/revoke",
        Some(Access::Admin(Role::Operator)),
    ),
    (
        "POST",
        "/v1/access/{id}/approve",
        Some(Access::Admin(Role::Approver)),
    ),
    ("POST", "/v1/admins", Some(Access::Admin(Role::Owner))),
    (
        "POST",
        "/v1/admins/{name}/revoke",
        Some(Access::Admin(Role::Owner)),
    ),
];

type Admin = axum::Extension<Actor>;
type Caller = axum::Extension<CallerRole>;
type Node = axum::Extension<NodeIdentity>;

async fn join(
    State(c): State<Ctl>,
    axum::Extension(p): axum::Extension<Peer>,
    Limited(b): Limited,
) -> Response {
    let r = async {
        let req: JoinRequest = body(&b)?;
        c.join(&req, p.addr).await
    };
    json(r.await)
}

async fn report(
    State(c): State<Ctl>,
    axum::Extension(NodeIdentity(id)): Node,
    axum::Extension(p): axum::Extension<Peer>,
    Limited(b): Limited,
) -> Response {
    let r = async {
        let rep: Report = body(&b)?;
        c.report(&id, p.addr, rep).await?;
        Ok(bulkhead_proto::ReportAck {
            controllers: c.controller_urls(),
        })
    };
    json(r.await)
}

async fn node_flows(
    State(c): State<Ctl>,
    axum::Extension(NodeIdentity(id)): Node,
    Limited(b): Limited,
) -> Response {
    let r = async {
        let batch: bulkhead_proto::FlowBatch = body(&b)?;
        c.flows_from(&id, batch).await?;
        Ok(serde_json::json!({}))
    };
    json(r.await)
}

/// `GET /v1/flows?denied=1&identity=X&limit=N&follow=1`: the last flows (default 1,000),
/// oldest first, as NDJSON; with `follow`, then every new one as it comes.
async fn flows(
    State(c): State<Ctl>,
    _: Admin,
    axum::Extension(p): axum::Extension<Peer>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let (mut denied, mut identity, mut limit, mut follow) = (false, None, 1000usize, false);
    let (mut path, mut verdict) = (None, None);
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "denied" => denied = v != "0",
            "follow" => follow = v != "0",
            "identity" => identity = Some(v.to_string()),
            "path" => match v.parse() {
                Ok(p) => path = Some(p),
                Err(e) => return Error::BadRequest(e).into_response(),
            },
            "verdict" => match v.parse() {
                Ok(x) => verdict = Some(x),
                Err(e) => return Error::BadRequest(e).into_response(),
            },
            "limit" => match v.parse() {
                Ok(n) => limit = n,
                Err(_) => return Error::BadRequest("limit: a number".into()).into_response(),
            },
            _ => {
                return Error::BadRequest(format!("unknown parameter {k:?}")).into_response();
            }
        }
    }
    let keep = move |f: &bulkhead_proto::FlowView| {
        (!denied || f.verdict != bulkhead_proto::Verdict::Allow)
            && path.is_none_or(|p| f.path == p)
            && verdict.is_none_or(|v| f.verdict == v)
            && identity
                .as_ref()
                .is_none_or(|i| f.src == *i || f.dst == *i || f.node == *i)
    };
    // Subscribed before the history is read: nothing falls between the two.
    let rx = c.flows.history.subscribe();
    let past = c.flows.history.recent(limit, &keep);
    let head = futures_util::stream::iter(past.into_iter().map(|f| {
        let mut v = serde_json::to_vec(&f).unwrap_or_default();
        v.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(v))
    }));
    let body = if follow {
        // A follower is an open connection too: it ends when the credential is revoked or
        // expires, like every later request on it would be refused.
        let still = Credential {
            c: c.clone(),
            fp: p.fingerprint.unwrap_or_default(),
            changes: c.cred_changes.subscribe(),
        };
        let tail = futures_util::stream::unfold(
            (rx, keep, still),
            |(mut rx, keep, mut still)| async move {
                loop {
                    let until = still.expires().map_or(Duration::from_secs(3600), |t| {
                        Duration::from_secs(u64::try_from(t - crate::ops::unix_now()).unwrap_or(0))
                    });
                    tokio::select! {
                        r = rx.recv() => match r {
                            Ok(f) if keep(&f) => {
                                let mut v = serde_json::to_vec(&f).unwrap_or_default();
                                v.push(b'\n');
                                return Some((Ok(Bytes::from(v)), (rx, keep, still)));
                            }
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        r = still.changes.changed() => {
                            if r.is_err() || !still.valid() {
                                return None;
                            }
                        }
                        () = tokio::time::sleep(until) => {
                            if !still.valid() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        Body::from_stream(head.chain(tail))
    } else {
        Body::from_stream(head)
    };
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| Error::internal("flows").into_response())
}

/// An administrator's credential on an open connection, followed as it changes.
struct Credential {
    c: Ctl,
    fp: String,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Credential {
    fn record(&self) -> Option<CredRecord> {
        lock(&self.c.view).records().creds.get(&self.fp).cloned()
    }

    /// When it expires, if it does.
    fn expires(&self) -> Option<i64> {
        match self.record()? {
            CredRecord::Admin { expires, .. } => expires,
            CredRecord::Node { .. } => None,
        }
    }

    /// Whether it still works.
    fn valid(&self) -> bool {
        match self.record() {
            Some(CredRecord::Admin { expires, .. }) => !expired(expires, crate::ops::unix_now()),
            Some(CredRecord::Node { .. }) | None => false,
        }
    }
}

/// `GET /v1/flows/history?since=S[&until=U][&identity=X][&path=P][&verdict=V][&denied=1]`: the
/// durable flow history's aggregates from S to U seconds ago (those of the hour not yet written
/// included), oldest hour first, as NDJSON. A failure once the answer has begun breaks it off,
/// so a client never takes a part for the whole.
async fn flow_history(
    State(c): State<Ctl>,
    _: Admin,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let query = match crate::flows::durable::Query::parse(
        q.as_deref().unwrap_or(""),
        crate::ops::unix_ms(),
    ) {
        Ok(q) => q,
        Err(e) => return Error::BadRequest(e).into_response(),
    };
    let body = crate::flows::durable::ndjson(c.flows.durable.clone(), query);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| Error::internal("flow history").into_response())
}

async fn policy(State(c): State<Ctl>, _: Admin) -> Response {
    json(c.policy().await)
}

async fn plan(State(c): State<Ctl>, _: Admin, Limited(b): Limited) -> Response {
    json(body(&b).and_then(|req| c.plan(&req)))
}

async fn apply(State(c): State<Ctl>, axum::Extension(who): Admin, Limited(b): Limited) -> Response {
    let r = async {
        let req: PolicyRequest = body(&b)?;
        c.apply(&req, &who).await
    };
    json(r.await)
}

async fn token(State(c): State<Ctl>, axum::Extension(who): Admin, Limited(b): Limited) -> Response {
    let r = async { c.token(&body::<TokenRequest>(&b)?, &who).await };
    json(r.await)
}

async fn nodes(State(c): State<Ctl>, _: Admin) -> Response {
    json(Ok(c.nodes()))
}

async fn revoke(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Path(id): Path<String>,
) -> Response {
    json(c.revoke(&id, &who).await)
}

async fn quarantine(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Path(id): Path<String>,
    Limited(b): Limited,
) -> Response {
    let r = async {
        let req: bulkhead_proto::QuarantineRequest = body(&b)?;
        c.quarantine(&id, &req, &who, "by hand", false).await
    };
    json(r.await)
}

async fn release(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Path(id): Path<String>,
) -> Response {
    json(c.release(&id, &who, None).await)
}

async fn audit(State(c): State<Ctl>, _: Admin) -> Response {
    json(c.audit_log().await)
}

async fn status(State(c): State<Ctl>, _: Admin) -> Response {
    json(Ok(c.status().await))
}

async fn admins(State(c): State<Ctl>, _: Admin) -> Response {
    json(Ok(c.admins()))
}

async fn admin_add(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Limited(b): Limited,
) -> Response {
    let r = async { c.admin_add(&body(&b)?, &who).await };
    json(r.await)
}

async fn admin_revoke(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Path(name): Path<String>,
) -> Response {
    json(c.admin_revoke(&name, &who).await)
}

async fn access_list(State(c): State<Ctl>, _: Admin) -> Response {
    json(Ok(c.access_list()))
}

async fn access_request(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Limited(b): Limited,
) -> Response {
    let r = async { c.access_request(&body(&b)?, &who).await };
    json(r.await)
}

async fn access_approve(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    Path(id): Path<String>,
) -> Response {
    json(c.access_approve(&id, &who).await)
}

async fn access_deny(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    axum::Extension(CallerRole(role)): Caller,
    Path(id): Path<String>,
) -> Response {
    json(c.access_close(&id, &who, role, false).await)
}

async fn access_revoke(
    State(c): State<Ctl>,
    axum::Extension(who): Admin,
    axum::Extension(CallerRole(role)): Caller,
    Path(id): Path<String>,
) -> Response {
    json(c.access_close(&id, &who, role, true).await)
}

/// Counts a node's open stream while it lives.
struct Online {
    c: Ctl,
    identity: String,
}

impl Online {
    fn new(c: Ctl, identity: String) -> Online {
        c.presence.connected(&identity);
        Online { c, identity }
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        self.c.presence.disconnected(&self.identity);
        // A reconnect may have opened the next stream before this one closed.
        if self.c.presence.streams_of(&self.identity) == 0 {
            self.c.metrics.gone(&self.identity);
        }
    }
}

/// One message of a node's stream, counted as a push.
fn push(online: &Online, m: &NodeMessage) -> Result<Bytes, Infallible> {
    let digest = match m {
        NodeMessage::Config(cfg) => Some(cfg.allowlist.digest.as_str()).filter(|d| !d.is_empty()),
        _ => None,
    };
    online.c.metrics.pushed(&online.identity, digest);
    let mut v = serde_json::to_vec(m).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// A node's stream: its configuration now, then each time it changes. Ends when the node is
/// revoked or re-enrolled (its credential is gone), or when this controller can no longer
/// vouch for its view (the node then moves to another controller).
async fn stream(
    State(c): State<Ctl>,
    axum::Extension(NodeIdentity(id)): Node,
    axum::Extension(p): axum::Extension<Peer>,
) -> Response {
    let Some(fp) = p.fingerprint.clone() else {
        return Error::Unauthenticated("no credential").into_response();
    };
    let rx = lock(&c.view).subscribe(&id);
    let creds = c.cred_changes.subscribe();
    let current = c.currency.subscribe();
    // Subscribed first: a controller that went stale since the check in front is caught here,
    // and one that goes stale after it, by the stream.
    if !*current.borrow() {
        return Error::Unavailable(c.currency.why_stale()).into_response();
    }
    tracing::info!(identity = %id, from = %p.addr, "node connected");
    let online = Online::new(c.clone(), id);
    struct St {
        rx: tokio::sync::watch::Receiver<Arc<NodeMessage>>,
        creds: tokio::sync::watch::Receiver<u64>,
        current: tokio::sync::watch::Receiver<bool>,
        first: bool,
        fp: String,
        online: Online,
    }
    let st = St {
        rx,
        creds,
        current,
        first: true,
        fp,
        online,
    };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        if st.first {
            st.first = false;
            let m = st.rx.borrow_and_update().clone();
            return Some((push(&st.online, &m), st));
        }
        loop {
            tokio::select! {
                r = st.rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    let m = st.rx.borrow_and_update().clone();
                    return Some((push(&st.online, &m), st));
                }
                r = st.creds.changed() => {
                    let valid = lock(&st.online.c.view).records().creds.contains_key(&st.fp);
                    if r.is_err() || !valid {
                        tracing::info!(identity = %st.online.identity, "credential gone: stream closed");
                        return None;
                    }
                }
                r = st.current.changed() => {
                    if r.is_err() || !*st.current.borrow_and_update() {
                        tracing::info!(identity = %st.online.identity, "no contact with the store: stream closed, for the node to move to a current controller");
                        return None;
                    }
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(s))
        .unwrap_or_else(|_| Error::internal("stream").into_response())
}

/// Accepts TLS connections forever, serving HTTP/2 (and HTTP/1.1) on each.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, router: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // At the cap, connections wait in the kernel's backlog until one ends.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        conns.spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let fp = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| fingerprint(c));
            let peer = Peer {
                fingerprint: fp,
                addr,
            };
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                router.clone().oneshot(req)
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(10)))
                .keep_alive_timeout(Duration::from_secs(10));
            // An HTTP/1 client that sends no complete request head in 10 s is dropped.
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            if let Err(e) = b.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%addr, error = %e, "connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_expires_at_its_second() {
        assert!(!expired(None, i64::MAX));
        assert!(!expired(Some(100), 99));
        assert!(expired(Some(100), 100));
    }

    #[test]
    fn the_route_table_names_each_route_once() {
        let mut seen = std::collections::HashSet::new();
        for (method, path, _) in ROUTES {
            assert!(seen.insert((method, path)), "{method} {path} twice");
        }
    }

    #[test]
    fn every_error_has_its_status_and_stable_code() {
        let cases = [
            (Error::Unauthenticated("x"), 401, "unauthenticated"),
            (Error::Forbidden("x".into()), 403, "forbidden"),
            (Error::BadRequest("x".into()), 400, "bad_request"),
            (
                Error::InvalidPolicy {
                    message: "x".into(),
                    details: vec!["p.yaml:1:1: error: y".into()],
                },
                422,
                "invalid_policy",
            ),
            (Error::Conflict("x".into()), 409, "conflict"),
            (Error::NotFound("x".into()), 404, "not_found"),
            (Error::TokenInvalid, 403, "token_invalid"),
            (Error::Unavailable("x".into()), 503, "unavailable"),
            (Error::Internal("x".into()), 500, "internal"),
        ];
        for (e, status, code) in cases {
            assert_eq!(status_of(&e), (StatusCode::from_u16(status).unwrap(), code));
        }
    }
}
