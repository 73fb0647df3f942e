//! `--metrics ADDR:PORT`: the Prometheus endpoint of the daemon and of the controller.
//!
//! Plain HTTP/1.1 (what Prometheus scrapes), `GET /metrics` only, in the Prometheus text format
//! 0.0.4. Each binary builds a fresh [`Registry`] per scrape from its own state
//! (`node-daemon/src/metrics.rs`, `controller/src/metrics.rs`); this module serves it and adds
//! what every process has: `process_resident_memory_bytes`, `process_open_fds` and
//! `bulkhead_build_info`. Naming follows Prometheus: counters end in `_total` and every unit is
//! in the name (`_bytes`, `_seconds`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use prometheus_client::metrics::histogram::Histogram;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Scrapes served at once; further connections wait to be accepted.
const CONNECTIONS: usize = 16;
/// A connection that has not sent its request headers by then is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `--metrics ADDR:PORT`, if given. An address that cannot be bound is an error at
/// start, never a daemon running without the metrics it was asked for.
pub async fn bind(addr: Option<std::net::SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("--metrics: cannot listen on {addr}: {e}"),
        )),
    }
}

/// Registers a counter family: one series per row. `help` has no final period (the encoder
/// adds one). `name` is without `_total`, which the
/// encoder appends; `unit`, if any, is appended before it.
pub fn counter(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let f = Family::<Labels, Counter>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).inc_by(v);
    }
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f),
        None => r.register(name, help, f),
    }
}

/// Registers a gauge family: one series per row.
pub fn gauge(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) {
    let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f),
        None => r.register(name, help, f),
    }
}

/// One unlabelled row, for [`counter`] and [`gauge`].
pub fn one<T>(v: T) -> [(Labels, T); 1] {
    [(Vec::new(), v)]
}

/// The process's own figures, read from `/proc/self`.
fn process(r: &mut Registry) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024.0)
        });
    if let Some(rss) = rss {
        gauge(
            r,
            "process_resident_memory",
            "Resident memory of this process",
            Some(Unit::Bytes),
            one(rss),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            r,
            "process_open_fds",
            "Open file descriptors of this process",
            None,
            one(fds.count() as f64),
        );
    }
    gauge(
        r,
        "bulkhead_build_info",
        "The running version (always 1)",
        None,
        [(vec![("version", env!("CARGO_PKG_VERSION").into())], 1.0)],
    );
}

/// Renders a registry (plus the process's own figures) as Prometheus text.
pub fn encode(mut r: Registry) -> Result<String, std::fmt::Error> {
    process(&mut r);
    let mut out = String::new();
    prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

fn answer(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle<F, Fut>(method: &Method, path: &str, render: &F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<Registry>>,
{
    const PLAIN: &str = "text/plain; charset=utf-8";
    if path != "/metrics" {
        return answer(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(registry) = render().await else {
        return answer(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n".into());
    };
    match encode(registry) {
        Ok(text) => answer(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        Err(_) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            "cannot encode the metrics\n".into(),
        ),
    }
}

/// Serves `GET /metrics` on `listener` forever; `render` builds the registry of one scrape
/// (`None`: not available now, answered 503). At most 16 connections at once, each closed if
/// its request is not in within 10 s or it lives past 60 s.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Registry>> + Send + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let r = handle(req.method(), req.uri().path(), &*render).await;
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(%addr, error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_labels_follow_prometheus() {
        let mut r = Registry::default();
        counter(
            &mut r,
            "bulkhead_peer_sent",
            "Bytes sent",
            Some(Unit::Bytes),
            [(vec![("peer", "db \"1\"".to_string())], 42)],
        );
        gauge(&mut r, "bulkhead_flows_tracked", "Flows", None, one(3.0));
        let text = encode(r).unwrap();
        assert!(
            text.contains("# TYPE bulkhead_peer_sent_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("bulkhead_peer_sent_bytes_total{peer=\"db \\\"1\\\"\"} 42\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE bulkhead_flows_tracked gauge\n"),
            "{text}"
        );
        assert!(text.contains("\nbulkhead_flows_tracked 3.0\n"), "{text}");
        assert!(
            text.contains("# HELP bulkhead_flows_tracked Flows.\n"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("bulkhead_build_info{version="), "{text}");
    }

    #[tokio::test]
    async fn only_get_metrics_is_served() {
        let render = || async { Some(Registry::default()) };
        let r = handle(&Method::GET, "/metrics", &render).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        assert_eq!(
            handle(&Method::POST, "/metrics", &render).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            handle(&Method::GET, "/", &render).await.status(),
            StatusCode::NOT_FOUND
        );
        let none = || async { None };
        assert_eq!(
            handle(&Method::GET, "/metrics", &none).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
