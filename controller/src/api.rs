//! The HTTP layer: TLS, authentication, routes, JSON in and out. Thin: the work is in
//! [`crate::ops`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{Request, StatusCode};
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
use crate::records::CredRecord;
use crate::view::lock;

/// Largest request body: a policy of tens of thousands of identities fits.
const MAX_BODY: usize = 32 << 20;

/// An error answer.
#[derive(Debug, Clone)]
pub struct Fail {
    status: StatusCode,
    body: ErrorBody,
}

impl Fail {
    /// An error with an HTTP status and a stable code.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Fail {
        Fail {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: ErrorBody {
                code: code.to_string(),
                message: message.into(),
                details: Vec::new(),
            },
        }
    }

    /// With detail lines.
    pub fn with_details(mut self, details: Vec<String>) -> Fail {
        self.body.details = details;
        self
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Fail {
        Fail::new(400, "bad_request", message)
    }

    /// 500, logged.
    pub fn internal(message: impl Into<String>) -> Fail {
        let m = message.into();
        tracing::error!("{m}");
        Fail::new(500, "internal", m)
    }

    /// 503: the store failed.
    pub fn store(e: bulkhead_store::Error) -> Fail {
        tracing::error!(error = %e, "store");
        Fail::new(503, "unavailable", e.to_string())
    }

    /// The code, for tests and logs.
    pub fn code(&self) -> &str {
        &self.body.code
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.message)?;
        for d in &self.body.details {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

fn json<T: Serialize>(r: Result<T, Fail>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(f) => f.into_response(),
    }
}

fn body<T: DeserializeOwned>(b: &Bytes) -> Result<T, Fail> {
    serde_json::from_slice(b).map_err(|e| Fail::bad_request(format!("malformed request body: {e}")))
}

/// Who is calling, from the TLS handshake.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The fingerprint of the client certificate, if one was presented (and verified by TLS).
    pub fingerprint: Option<String>,
    /// The TCP peer.
    pub addr: SocketAddr,
}

type Ctl = Arc<Controller>;

impl Controller {
    async fn caller(&self, peer: &Peer) -> Result<CredRecord, Fail> {
        let fp = peer.fingerprint.as_ref().ok_or_else(|| {
            Fail::new(
                401,
                "unauthenticated",
                "this call needs a client certificate",
            )
        })?;
        if let Some(c) = lock(&self.view).records().creds.get(fp).cloned() {
            return Ok(c);
        }
        // The view may lag a write made an instant ago (here, or through another controller
        // sharing the store): the store decides.
        let key = format!("{}{fp}", crate::records::CREDS);
        match self.store.get(&key).await.map_err(Fail::store)? {
            Some(kv) => crate::records::decode(&key, &kv.value).map_err(Fail::internal),
            None => Err(Fail::new(
                401,
                "unauthenticated",
                "credential unknown or revoked",
            )),
        }
    }

    async fn admin(&self, peer: &Peer) -> Result<String, Fail> {
        match self.caller(peer).await? {
            CredRecord::Admin { name } => Ok(name),
            CredRecord::Node { .. } => Err(Fail::new(403, "forbidden", "administrators only")),
        }
    }

    async fn node(&self, peer: &Peer) -> Result<String, Fail> {
        match self.caller(peer).await? {
            CredRecord::Node { identity } => Ok(identity),
            CredRecord::Admin { .. } => Err(Fail::new(403, "forbidden", "nodes only")),
        }
    }
}

/// The routes.
pub fn router(c: Ctl) -> Router {
    Router::new()
        .route("/v1/join", post(join))
        .route("/v1/node/stream", get(stream))
        .route("/v1/node/report", post(report))
        .route("/v1/node/flows", post(node_flows))
        .route("/v1/flows", get(flows))
        .route("/v1/policy", get(policy))
        .route("/v1/policy/plan", post(plan))
        .route("/v1/policy/apply", post(apply))
        .route("/v1/tokens", post(token))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{identity}/revoke", post(revoke))
        .route("/v1/nodes/{identity}/quarantine", post(quarantine))
        .route("/v1/nodes/{identity}/release", post(release))
        .route("/v1/audit", get(audit))
        .route("/v1/status", get(status))
        .fallback(|| async { Fail::new(404, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(c)
}

type Req = axum::Extension<Peer>;

async fn join(State(c): State<Ctl>, b: Bytes) -> Response {
    let r = async {
        let req: JoinRequest = body(&b)?;
        c.join(&req).await
    };
    json(r.await)
}

async fn report(State(c): State<Ctl>, axum::Extension(p): Req, b: Bytes) -> Response {
    let r = async {
        let id = c.node(&p).await?;
        let rep: Report = body(&b)?;
        c.report(&id, p.addr, rep).await?;
        Ok(bulkhead_proto::ReportAck {
            controllers: c.controller_urls(),
        })
    };
    json(r.await)
}

async fn node_flows(State(c): State<Ctl>, axum::Extension(p): Req, b: Bytes) -> Response {
    let r = async {
        let id = c.node(&p).await?;
        let batch: bulkhead_proto::FlowBatch = body(&b)?;
        c.flows_from(&id, batch).await;
        Ok(serde_json::json!({}))
    };
    json(r.await)
}

/// `GET /v1/flows?denied=1&identity=X&limit=N&follow=1`: the last flows (default 1,000),
/// oldest first, as NDJSON; with `follow`, then every new one as it comes.
async fn flows(
    State(c): State<Ctl>,
    axum::Extension(p): Req,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    if let Err(f) = c.admin(&p).await {
        return f.into_response();
    }
    let (mut denied, mut identity, mut limit, mut follow) = (false, None, 1000usize, false);
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
            "limit" => match v.parse() {
                Ok(n) => limit = n,
                Err(_) => return Fail::bad_request("limit: a number").into_response(),
            },
            _ => return Fail::bad_request(format!("unknown parameter {k:?}")).into_response(),
        }
    }
    let keep = move |f: &bulkhead_proto::FlowView| {
        (!denied || f.verdict == "deny")
            && identity
                .as_ref()
                .is_none_or(|i| f.src == *i || f.dst == *i || f.node == *i)
    };
    // Subscribed before the history is read: nothing falls between the two.
    let rx = c.flows.live.subscribe();
    let past = c.flows.recent(limit, &keep);
    let head = futures_util::stream::iter(past.into_iter().map(|f| {
        let mut v = serde_json::to_vec(&f).unwrap_or_default();
        v.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(v))
    }));
    let body = if follow {
        let tail = futures_util::stream::unfold((rx, keep), |(mut rx, keep)| async move {
            loop {
                match rx.recv().await {
                    Ok(f) if keep(&f) => {
                        let mut v = serde_json::to_vec(&f).unwrap_or_default();
                        v.push(b'\n');
                        return Some((Ok(Bytes::from(v)), (rx, keep)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Body::from_stream(head.chain(tail))
    } else {
        Body::from_stream(head)
    };
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| Fail::internal("flows").into_response())
}

async fn policy(State(c): State<Ctl>, axum::Extension(p): Req) -> Response {
    let r = async {
        c.admin(&p).await?;
        c.policy().await
    };
    json(r.await)
}

async fn plan(State(c): State<Ctl>, axum::Extension(p): Req, b: Bytes) -> Response {
    json(async { c.admin(&p).await.and_then(|_| c.plan(&body(&b)?)) }.await)
}

async fn apply(State(c): State<Ctl>, axum::Extension(p): Req, b: Bytes) -> Response {
    let r = async {
        let who = c.admin(&p).await?;
        let req: PolicyRequest = body(&b)?;
        c.apply(&req, &who).await
    };
    json(r.await)
}

async fn token(State(c): State<Ctl>, axum::Extension(p): Req, b: Bytes) -> Response {
    let r = async {
        c.admin(&p).await?;
        c.token(&body::<TokenRequest>(&b)?).await
    };
    json(r.await)
}

async fn nodes(State(c): State<Ctl>, axum::Extension(p): Req) -> Response {
    json(c.admin(&p).await.map(|_| c.nodes()))
}

async fn revoke(State(c): State<Ctl>, axum::Extension(p): Req, Path(id): Path<String>) -> Response {
    let r = async {
        let who = c.admin(&p).await?;
        c.revoke(&id, &who).await
    };
    json(r.await)
}

async fn quarantine(
    State(c): State<Ctl>,
    axum::Extension(p): Req,
    Path(id): Path<String>,
    b: Bytes,
) -> Response {
    let r = async {
        let who = c.admin(&p).await?;
        let req: bulkhead_proto::QuarantineRequest = body(&b)?;
        c.quarantine(&id, &req, &who, "by hand", false).await
    };
    json(r.await)
}

async fn release(
    State(c): State<Ctl>,
    axum::Extension(p): Req,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let who = c.admin(&p).await?;
        c.release(&id, &who, None).await
    };
    json(r.await)
}

async fn audit(State(c): State<Ctl>, axum::Extension(p): Req) -> Response {
    let r = async {
        c.admin(&p).await?;
        c.audit_log().await
    };
    json(r.await)
}

async fn status(State(c): State<Ctl>, axum::Extension(p): Req) -> Response {
    let r = match c.admin(&p).await {
        Ok(_) => Ok(c.status().await),
        Err(f) => Err(f),
    };
    json(r)
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
/// revoked or re-enrolled (its credential is gone).
async fn stream(State(c): State<Ctl>, axum::Extension(p): Req) -> Response {
    let id = match c.node(&p).await {
        Ok(id) => id,
        Err(f) => return f.into_response(),
    };
    let Some(fp) = p.fingerprint.clone() else {
        return Fail::new(401, "unauthenticated", "no credential").into_response();
    };
    let rx = lock(&c.view).subscribe(&id);
    let creds = c.cred_changes.subscribe();
    tracing::info!(identity = %id, from = %p.addr, "node connected");
    let online = Online::new(c.clone(), id);
    struct St {
        rx: tokio::sync::watch::Receiver<Arc<NodeMessage>>,
        creds: tokio::sync::watch::Receiver<u64>,
        first: bool,
        fp: String,
        online: Online,
    }
    let st = St {
        rx,
        creds,
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
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(s))
        .unwrap_or_else(|_| Fail::internal("stream").into_response())
}

/// Accepts TLS connections forever, serving HTTP/2 (and HTTP/1.1) on each.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, router: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = tokio::task::JoinSet::new();
    loop {
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
            if let Err(e) = b.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%addr, error = %e, "connection ended");
            }
        });
    }
}
