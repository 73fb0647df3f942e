//! The API client: one HTTP/2 connection over TLS, many requests on it.
//!
//! HTTP/2 keepalive pings (every 2 s, 2 s timeout) notice a dead controller within about 4 s,
//! long before TCP would; the daemon's stream then ends with an error and it reconnects, to the
//! next controller it knows if this one is gone.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ErrorBody;
use crate::tls::{Identity, TlsError, Trust, client_config};

/// How long a TCP connect plus TLS handshake to one controller may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take (streams excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The controller could not be reached, or the connection broke.
    Transport(String),
    /// The controller answered with an error.
    Api {
        /// The HTTP status.
        status: u16,
        /// The error.
        body: ErrorBody,
    },
    /// The answer was not what the API promises.
    Decode(String),
}

impl ApiError {
    /// The error code, if the controller answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Transport(m) => write!(f, "cannot reach the controller: {m}"),
            ApiError::Api { status, body } => {
                write!(f, "{} ({status} {})", body.message, body.code)?;
                for d in &body.details {
                    write!(f, "\n{d}")?;
                }
                Ok(())
            }
            ApiError::Decode(m) => write!(f, "unexpected answer from the controller: {m}"),
        }
    }
}

impl std::error::Error for ApiError {}

impl From<TlsError> for ApiError {
    fn from(e: TlsError) -> ApiError {
        ApiError::Transport(e.0)
    }
}

fn transport(e: impl fmt::Display) -> ApiError {
    ApiError::Transport(e.to_string())
}

/// A controller URL's host and port (443 if it names none), any path left out:
/// `https://h:7443/x` → `("h", 7443)`, `https://[fd00::1]` → `("fd00::1", 443)`. `None` if it
/// is not `http(s)://`, has no host, or a port that is not a number.
pub fn url_authority(url: &str) -> Option<(&str, u16)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 443,
    };
    (!host.is_empty()).then_some((host, port))
}

/// `https://HOST:PORT` split up.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, ApiError> {
    let bad = || ApiError::Transport(format!("{url:?} is not an https://HOST:PORT URL"));
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
            (h.to_string(), p)
        }
        None => {
            let (h, p) = rest.rsplit_once(':').ok_or_else(bad)?;
            (h.to_string(), p)
        }
    };
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Target {
        url: url.to_string(),
        host,
        port,
    })
}

/// A controller client: where to go, whom to trust, who we are.
#[derive(Clone)]
pub struct Client {
    targets: Vec<Target>,
    tls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field(
                "urls",
                &self.targets.iter().map(|t| &t.url).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for any of `urls`, tried in order.
    pub fn new(
        urls: &[String],
        trust: &Trust,
        identity: Option<&Identity>,
    ) -> Result<Client, ApiError> {
        let targets = urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ApiError::Transport("no controller URL".into()));
        }
        Ok(Client {
            targets,
            tls: Arc::new(client_config(trust, identity)?),
        })
    }

    /// Connects to the first controller that answers.
    pub async fn connect(&self) -> Result<Connection, ApiError> {
        let mut last = ApiError::Transport("no controller URL".into());
        for t in &self.targets {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_to(t)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = e,
                Err(_) => last = ApiError::Transport(format!("{}: timed out", t.url)),
            }
        }
        Err(last)
    }

    async fn connect_to(&self, t: &Target) -> Result<Connection, ApiError> {
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| ApiError::Transport(format!("{}: {e}", t.url)))?;
        tcp.set_nodelay(true).map_err(transport)?;
        let name = ServerName::try_from(t.host.clone())
            .map_err(|e| ApiError::Transport(format!("{}: {e}", t.url)))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ApiError::Transport(format!("{}: TLS: {e}", t.url)))?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ApiError::Transport(format!("{}: HTTP/2: {e}", t.url)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection {
            send,
            authority: format!("{}:{}", t.host, t.port),
            url: t.url.clone(),
        })
    }
}

/// One open connection to a controller.
#[derive(Debug)]
pub struct Connection {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: String,
    url: String,
}

impl Connection {
    /// The URL connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| ApiError::Transport(e.to_string()))?;
        self.send.ready().await.map_err(transport)?;
        self.send.send_request(req).await.map_err(transport)
    }

    /// Sends raw bytes and returns the raw answer: for tests of malformed requests.
    pub async fn raw(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let fut = async {
            let resp = self.send(method, path, body.into()).await?;
            let status = resp.status();
            Ok((status, body_bytes(resp).await?))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ApiError::Transport(format!("{}: request timed out", self.url)))?
    }

    async fn call<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self.raw(method, path, body).await?;
        decode_answer(status, &bytes)
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ApiError> {
        self.call(Method::GET, path, Vec::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let body = serde_json::to_vec(body).map_err(|e| ApiError::Decode(e.to_string()))?;
        self.call(Method::POST, path, body).await
    }

    /// `GET path` answered by a stream of JSON lines.
    pub async fn stream(&mut self, path: &str) -> Result<Lines, ApiError> {
        let resp =
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, path, Bytes::new()))
                .await
                .map_err(|_| ApiError::Transport(format!("{}: request timed out", self.url)))??;
        let status = resp.status();
        if !status.is_success() {
            return Err(error_answer(status, &body_bytes(resp).await?));
        }
        Ok(Lines {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

async fn body_bytes(resp: http::Response<Incoming>) -> Result<Bytes, ApiError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(transport)?
        .to_bytes())
}

fn error_answer(status: StatusCode, bytes: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ApiError::Api {
            status: status.as_u16(),
            body,
        },
        Err(_) => ApiError::Decode(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )),
    }
}

fn decode_answer<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ApiError> {
    if !status.is_success() {
        return Err(error_answer(status, bytes));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::Decode(e.to_string()))
}

/// A stream of JSON lines.
#[derive(Debug)]
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

/// The longest line a stream may carry (a big allowlist is a few hundred KB).
const MAX_LINE: usize = 64 << 20;

impl Lines {
    /// The next message; `None` when the controller ended the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ApiError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line[..i])
                    .map(Some)
                    .map_err(|e| ApiError::Decode(e.to_string()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(ApiError::Decode("stream line too long".into()));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(transport(e)),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_authorities() {
        assert_eq!(
            url_authority("https://10.0.0.1:7443/v1"),
            Some(("10.0.0.1", 7443))
        );
        assert_eq!(
            url_authority("https://ctl.example"),
            Some(("ctl.example", 443))
        );
        assert_eq!(
            url_authority("https://[fd00::1]:7443"),
            Some(("fd00::1", 7443))
        );
        assert_eq!(url_authority("https://[fd00::1]"), Some(("fd00::1", 443)));
        assert_eq!(url_authority("ftp://x:1"), None);
        assert_eq!(url_authority("https://:7443"), None);
        assert_eq!(url_authority("https://h:port"), None);
    }

    #[test]
    fn urls() {
        let t = parse_url("https://10.1.2.3:7443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.1.2.3", 7443));
        let t = parse_url("https://[::1]:7443/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7443));
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("https://:80").is_err());
    }
}
