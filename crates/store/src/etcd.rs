//! The etcd backend (etcd v3 API, through `etcd-client`), for several controllers sharing one
//! etcd cluster.
//!
//! The trait is etcd's model, so the mapping is direct: keys live under a namespace prefix
//! (`/bulkhead/` by default) so that one etcd can serve other users too; revisions are etcd's
//! revisions; a transaction is an etcd `Txn` comparing `mod_revision`s (0 for "absent", as etcd
//! reports it); a watch is an etcd watch from `after + 1`.
//!
//! etcd's published failure modes and what this does about them:
//! - a watch starting at, or falling behind to, a compacted revision is cancelled by etcd with a
//!   `compact_revision` (#18089): it becomes [`WatchMessage::Resync`], never a silent gap;
//! - a broken watch stream (leader change, lost member, #17529 starvation) ends the [`Watch`]
//!   after a `Resync`, and the reader starts over with a full read;
//! - a watch that goes back in time after a partition (#15271): events at or below a revision
//!   already delivered are dropped here, so a reader never sees the past again;
//! - a cut-off or blackholed connection leaves a watch silent, as a quiet cluster does: the watch
//!   asks for a progress notification every [`PROGRESS_EVERY`] and passes each on as
//!   [`WatchMessage::Progress`], so the reader can tell silence from a cut. Before etcd 3.4.25 and
//!   3.5.8 (#15220) a progress notification may overtake events still in flight on the stream;
//!   its revision is therefore never used to skip events, only as a sign of contact.
//!
//! `etcds://` speaks TLS (rustls, ring), trusting only the CA in [`Access::ca`] and presenting
//! [`Access::identity`] as a client certificate; [`Access::user`] logs in to etcd's own
//! authentication (the token is refreshed when it expires).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{
    Compare, Error, Event, Held, KeyValue, Op, Revision, Snapshot, Store, Txn, Watch, WatchMessage,
};

/// The default key namespace.
pub const NAMESPACE: &str = "/bulkhead/";

/// How often a watch asks etcd to confirm it is current ([`WatchMessage::Progress`]).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Largest response the client accepts.
const MAX_MESSAGE: usize = 1 << 30;

/// A store in an etcd cluster.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    /// For reads: with a decoding limit above tonic's 4 MiB default, so that a full read of a
    /// large state (or a large watch batch) is not refused by the client.
    kv: etcd_client::KvClient,
    watcher: etcd_client::WatchClient,
    endpoints: Vec<String>,
    namespace: String,
    access: Access,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// How to reach and log in to etcd, beyond its addresses.
#[derive(Clone, Default)]
pub struct Access {
    /// PEM: the CA that signed etcd's server certificates. Required with `etcds://`.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and private key presented to etcd (`--client-cert-auth`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user and password.
    pub user: Option<(String, String)>,
}

impl Access {
    /// TLS trusting `ca` (PEM), presenting the client certificate `cert` with its `key` (PEM),
    /// with no etcd user.
    pub fn certificate(ca: &str, cert: &str, key: &str) -> Access {
        Access {
            ca: Some(ca.as_bytes().to_vec()),
            identity: Some((cert.as_bytes().to_vec(), key.as_bytes().to_vec())),
            user: None,
        }
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the password.
        f.debug_struct("Access")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl Access {
    /// Whether `spec` and these settings go together (a CA with etcds://, none with etcd://),
    /// without connecting: a mistake here is reported at once, not retried.
    pub fn check(&self, spec: &str) -> Result<(), Error> {
        self.options(&parse_spec(spec)?).map(|_| ())
    }

    /// The client options for `endpoints` (all `http://` or all `https://`, from
    /// [`parse_spec`]).
    fn options(&self, endpoints: &[String]) -> Result<ConnectOptions, Error> {
        let tls = endpoints.iter().any(|e| e.starts_with("https://"));
        let mut opts = ConnectOptions::new();
        if tls {
            let ca = self.ca.as_ref().ok_or_else(|| {
                Error::Unavailable(
                    "etcds:// needs the CA of etcd's certificates (--etcd-ca)".into(),
                )
            })?;
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        } else if self.ca.is_some() || self.identity.is_some() {
            return Err(Error::Unavailable(
                "a CA or client certificate for etcd needs etcds://".into(),
            ));
        }
        if let Some((user, password)) = &self.user {
            if !tls {
                tracing::warn!(user, "etcd password sent without TLS: use etcds://");
            }
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        Ok(opts)
    }
}

fn unavailable(e: etcd_client::Error) -> Error {
    if refused(&e) {
        return Error::Refused(format!("etcd: {e}"));
    }
    Error::Unavailable(format!("etcd: {e}"))
}

/// Whether etcd (or its TLS) turned this client away, rather than failed to answer: wrong
/// credentials, no permission, a certificate one side does not accept.
fn refused(e: &etcd_client::Error) -> bool {
    let code = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s.code()),
        _ => None,
    };
    // TLS alerts and certificate checks surface as transport errors whose text names them.
    let text = e.to_string().to_lowercase();
    matches!(
        code,
        Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
    ) || ["authentication failed", "permission denied", "certificate"]
        .iter()
        .any(|m| text.contains(m))
}

/// Parses `etcd://H:P[,H:P]` into `http://H:P` endpoints, `etcds://H:P[,H:P]` into
/// `https://H:P` ones.
pub fn parse_spec(spec: &str) -> Result<Vec<String>, Error> {
    let bad = || {
        Error::Unavailable(format!(
            "{spec:?}: expected etcd://HOST:PORT[,HOST:PORT] or etcds://…"
        ))
    };
    let (scheme, rest) = if let Some(rest) = spec.strip_prefix("etcd://") {
        ("http", rest)
    } else if let Some(rest) = spec.strip_prefix("etcds://") {
        ("https", rest)
    } else {
        return Err(bad());
    };
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (h, p) = e.rsplit_once(':').ok_or_else(bad)?;
            if h.is_empty() || p.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(format!("{scheme}://{e}"))
        })
        .collect::<Result<_, _>>()?;
    if eps.is_empty() {
        return Err(bad());
    }
    Ok(eps)
}

impl Etcd {
    /// Connects to `etcd://H:P[,H:P]`, keeping keys under `namespace`. Fails (clearly) if no
    /// endpoint answers within 5 s; the caller decides whether to retry.
    pub async fn connect(spec: &str, namespace: &str) -> Result<Etcd, Error> {
        Etcd::connect_with(spec, namespace, &Access::default()).await
    }

    /// [`Etcd::connect`] to `etcd://` or `etcds://`, with certificates and a login.
    pub async fn connect_with(spec: &str, namespace: &str, access: &Access) -> Result<Etcd, Error> {
        let endpoints = parse_spec(spec)?;
        let opts = access
            .options(&endpoints)?
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client =
            Client::connect(&endpoints, Some(opts))
                .await
                .map_err(|e| match unavailable(e) {
                    Error::Refused(m) => Error::Refused(format!("{}: {m}", endpoints.join(","))),
                    other => Error::Unavailable(format!("{}: {other}", endpoints.join(","))),
                })?;
        let s = Etcd {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watcher: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            client,
            endpoints,
            namespace: namespace.to_string(),
            access: access.clone(),
        };
        // Connecting is lazy: ask once, so that an unreachable cluster is reported now.
        s.range("\u{0}probe").await?;
        Ok(s)
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.namespace)
    }

    fn decode_kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, Error> {
        let key = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| k.strip_prefix(&self.namespace))
            .ok_or_else(|| {
                Error::Corrupt(format!("etcd key {:?} outside the namespace", kv.key()))
            })?;
        Ok(KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        })
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision())
}

#[async_trait]
impl Store for Etcd {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let resp = self
            .client
            .clone()
            .get(self.key(key), None)
            .await
            .map_err(unavailable)?;
        resp.kvs().first().map(|kv| self.decode_kv(kv)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, Error> {
        let resp = self
            .kv
            .clone()
            .get(self.key(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        Ok(Snapshot {
            kvs: resp
                .kvs()
                .iter()
                .map(|kv| self.decode_kv(kv))
                .collect::<Result<_, _>>()?,
            revision: header_revision(resp.header()),
        })
    }

    async fn txn(&self, when: &[Compare], then: &[Op]) -> Result<Txn, Error> {
        let compares: Vec<EtcdCompare> = when
            .iter()
            .map(|Compare::ModRevision(k, rev)| {
                EtcdCompare::mod_revision(self.key(k), CompareOp::Equal, *rev)
            })
            .collect();
        let ops: Vec<TxnOp> = then
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(self.key(k), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(self.key(k), None),
            })
            .collect();
        let resp = self
            .client
            .clone()
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await
            .map_err(unavailable)?;
        Ok(Txn {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, Error> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let stream = self
            .watcher
            .clone()
            .watch(self.key(prefix), Some(opts))
            .await
            .map_err(unavailable)?;
        let (mut requests, mut responses) = stream.split();
        let (tx, out) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let mut seen = after;
            let mut ask = tokio::time::interval_at(
                tokio::time::Instant::now() + PROGRESS_EVERY,
                PROGRESS_EVERY,
            );
            ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let resp = tokio::select! {
                    r = responses.message() => r,
                    _ = ask.tick() => {
                        // Only queued on the watch's own stream; bounded all the same, since a
                        // blackholed connection stops draining it. An unanswered request is
                        // what the reader notices, by the progress that does not come.
                        match tokio::time::timeout(PROGRESS_EVERY, requests.request_progress())
                            .await
                        {
                            Ok(Ok(())) | Err(_) => {}
                            Ok(Err(_)) => {
                                let _ = tx.send(WatchMessage::Resync).await;
                                return;
                            }
                        }
                        continue;
                    }
                };
                let resp = match resp {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => {
                        // The stream broke: the reader must start over.
                        let _ = tx.send(WatchMessage::Resync).await;
                        return;
                    }
                };
                if resp.compact_revision() > 0 || resp.canceled() {
                    tracing::warn!(
                        compacted = resp.compact_revision(),
                        reason = resp.cancel_reason(),
                        "etcd cancelled the watch: resync"
                    );
                    let _ = tx.send(WatchMessage::Resync).await;
                    return;
                }
                let mut events = Vec::new();
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    if kv.mod_revision() <= seen {
                        continue; // never the past again
                    }
                    let kv = match me.decode_kv(kv) {
                        Ok(kv) => kv,
                        Err(err) => {
                            tracing::error!(error = %err, "ignoring an etcd event");
                            continue;
                        }
                    };
                    events.push(match e.event_type() {
                        EventType::Put => Event::Put(kv),
                        EventType::Delete => Event::Delete {
                            key: kv.key,
                            mod_revision: kv.mod_revision,
                        },
                    });
                }
                if let Some(last) = events.last() {
                    seen = last.revision();
                    if tx.send(WatchMessage::Events(events)).await.is_err() {
                        return;
                    }
                } else if resp.events().is_empty() && !resp.created() {
                    // A progress notification: everything up to its header revision was sent
                    // (the creation answer is not one: history may still follow it). `seen` is
                    // left alone: see the module's note on etcd before 3.4.25.
                    let rev = header_revision(resp.header());
                    if tx.send(WatchMessage::Progress(rev)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch::new(out))
    }

    async fn hold(&self, key: &str, value: Vec<u8>, ttl: i64) -> Result<Held, Error> {
        let key = self.key(key);
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(unavailable)?
            .id();
        client
            .put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(unavailable)?;
        Ok(Held::new(tokio::spawn(async move {
            let mut lease = lease;
            let every = Duration::from_secs((ttl / 3).max(1) as u64);
            loop {
                // Keep the lease alive; if it was lost (etcd unreachable longer than ttl),
                // take a new one and write the key again.
                let alive = async {
                    let (mut keeper, mut stream) =
                        client.lease_keep_alive(lease).await.map_err(unavailable)?;
                    loop {
                        keeper.keep_alive().await.map_err(unavailable)?;
                        match stream.message().await.map_err(unavailable)? {
                            Some(r) if r.ttl() > 0 => {}
                            _ => return Err(Error::Unavailable("lease expired".into())),
                        }
                        tokio::time::sleep(every).await;
                    }
                };
                let r: Result<(), Error> = alive.await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, key, "lost the etcd lease; taking a new one");
                }
                tokio::time::sleep(every).await;
                if let Ok(g) = client.lease_grant(ttl, None).await {
                    lease = g.id();
                    let _ = client
                        .put(
                            key.clone(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await;
                }
            }
        })))
    }

    fn progress_every(&self) -> Option<Duration> {
        Some(PROGRESS_EVERY)
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    async fn health(&self) -> Vec<(String, Result<String, String>)> {
        let mut out = Vec::new();
        for ep in &self.endpoints {
            let r = async {
                let opts = self
                    .access
                    .options(std::slice::from_ref(ep))
                    .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(2));
                let mut c = Client::connect([ep.as_str()], Some(opts)).await?;
                let s = c.status().await?;
                let me = s.header().map_or(0, |h| h.member_id());
                Ok::<_, etcd_client::Error>(format!(
                    "ok, etcd {}{}, db {} KiB, raft index {}",
                    s.version(),
                    if s.leader() == me { ", leader" } else { "" },
                    s.db_size() / 1024,
                    s.raft_index()
                ))
            };
            out.push((ep.clone(), r.await.map_err(|e| e.to_string())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            parse_spec("etcds://a:2379, b:2379").unwrap(),
            ["https://a:2379", "https://b:2379"]
        );
        assert!(parse_spec("http://x:1").is_err());
        assert!(parse_spec("etcds://").is_err());
        assert!(parse_spec("etcd://").is_err());
        assert!(parse_spec("etcd://host").is_err());
        assert!(parse_spec("etcd://:2379").is_err());
    }

    #[test]
    fn tls_needs_a_ca_and_https() {
        let https = ["https://a:1".to_string()];
        let http = ["http://a:1".to_string()];
        let e = Access::default().options(&https).err().unwrap().to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        let with_ca = Access {
            ca: Some(b"x".to_vec()),
            ..Access::default()
        };
        assert!(
            with_ca.options(&http).is_err(),
            "a CA on plain etcd:// is a mistake"
        );
        let secret = Access {
            identity: Some((b"cert".to_vec(), b"KEY".to_vec())),
            user: Some(("root".into(), "PASSWORD".into())),
            ..with_ca
        };
        let shown = format!("{secret:?}");
        assert!(
            !shown.contains("KEY") && !shown.contains("PASSWORD"),
            "{shown}"
        );
    }
}
