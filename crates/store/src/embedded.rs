//! The default backend: one redb file in the controller's state directory.
//!
//! redb commits with fsync (`Durability::Immediate`), so a transaction that returned is on disk:
//! `kill -9` or a power cut loses nothing that was acknowledged. redb also locks the file, so a
//! second controller on the same directory is refused rather than corrupting it.
//!
//! Watches are fed from memory: each commit's events go to a broadcast channel, and the last
//! [`HISTORY`] transactions are kept so that a watch can start a little in the past (after a
//! `range`). A watch that falls behind, or starts before the kept history, gets
//! [`WatchMessage::Resync`].

use std::collections::VecDeque;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Compare, Error, Event, Held, KeyValue, Op, Revision, Snapshot, Store, Txn, Watch, WatchMessage,
};

/// key → 8 bytes of little-endian `mod_revision`, then the value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" → the store revision.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Keys written by `hold`: they live with their holder, so a process that died without
/// dropping them (`kill -9`) leaves them here, and the next `open` removes them.
const HELD: TableDefinition<&str, ()> = TableDefinition::new("held");
/// Transactions kept in memory for watches that start in the past.
const HISTORY: usize = 1024;

type Batch = Arc<(Revision, Vec<Event>)>;

/// The embedded store.
#[derive(Debug, Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: String,
    /// Held across commit and publication, so that watchers see transactions in order.
    log: Mutex<Log>,
    tx: broadcast::Sender<Batch>,
}

#[derive(Debug)]
struct Log {
    revision: Revision,
    history: VecDeque<Batch>,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, Error> {
    let (rev, value) = raw
        .split_first_chunk::<8>()
        .ok_or_else(|| Error::Corrupt(format!("key {key:?}: short record")))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        mod_revision: i64::from_le_bytes(*rev),
    })
}

fn encode(rev: Revision, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&rev.to_le_bytes());
    v.extend_from_slice(value);
    v
}

impl Embedded {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Embedded, Error> {
        // Created 0600, never wider: the store holds the CA's key.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!(path = %path.display(), "the store was readable by others: now 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
        }
        let db = redb::Builder::new().create_file(file).map_err(|e| {
            Error::Unavailable(format!(
                "{}: {e} (is another controller using this state directory?)",
                path.display()
            ))
        })?;
        let revision = {
            let w = db.begin_write().map_err(unavailable)?;
            let rev = {
                let mut kv = w.open_table(KV).map_err(unavailable)?;
                let mut meta = w.open_table(META).map_err(unavailable)?;
                let mut held = w.open_table(HELD).map_err(unavailable)?;
                let mut rev = meta
                    .get("revision")
                    .map_err(unavailable)?
                    .map_or(0, |g| g.value());
                // Whoever held these is gone: remove them, as one more revision.
                let orphans: Vec<String> = held
                    .iter()
                    .map_err(unavailable)?
                    .filter_map(|r| r.ok().map(|(k, _)| k.value().to_string()))
                    .collect();
                let mut removed = false;
                for k in &orphans {
                    removed |= kv.remove(k.as_str()).map_err(unavailable)?.is_some();
                    held.remove(k.as_str()).map_err(unavailable)?;
                }
                if removed {
                    rev += 1;
                    meta.insert("revision", rev).map_err(unavailable)?;
                }
                rev
            };
            w.commit().map_err(unavailable)?;
            rev
        };
        let (tx, _) = broadcast::channel(HISTORY);
        Ok(Embedded {
            inner: Arc::new(Inner {
                db,
                path: path.display().to_string(),
                log: Mutex::new(Log {
                    revision,
                    history: VecDeque::new(),
                }),
                tx,
            }),
        })
    }
}

impl Inner {
    fn mark_held(&self, key: &str, on: bool) -> Result<(), Error> {
        let w = self.db.begin_write().map_err(unavailable)?;
        {
            let mut held = w.open_table(HELD).map_err(unavailable)?;
            if on {
                held.insert(key, ()).map_err(unavailable)?;
            } else {
                held.remove(key).map_err(unavailable)?;
            }
        }
        w.commit().map_err(unavailable)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let r = self.db.begin_read().map_err(unavailable)?;
        let t = r.open_table(KV).map_err(unavailable)?;
        match t.get(key).map_err(unavailable)? {
            Some(g) => Ok(Some(decode(key, g.value())?)),
            None => Ok(None),
        }
    }

    fn range(&self, prefix: &str) -> Result<Snapshot, Error> {
        // The revision is read under the log lock with the read transaction opened, so the two
        // agree: no commit can slip between them.
        let (r, revision) = {
            let log = self.log();
            (self.db.begin_read().map_err(unavailable)?, log.revision)
        };
        let t = r.open_table(KV).map_err(unavailable)?;
        let mut kvs = Vec::new();
        for item in t.range(prefix..).map_err(unavailable)? {
            let (k, v) = item.map_err(unavailable)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            kvs.push(decode(key, v.value())?);
        }
        Ok(Snapshot { kvs, revision })
    }

    fn txn(&self, when: &[Compare], then: &[Op]) -> Result<Txn, Error> {
        let mut log = self.log();
        let w = self.db.begin_write().map_err(unavailable)?;
        let mut events = Vec::new();
        let revision = log.revision + 1;
        {
            let mut kv = w.open_table(KV).map_err(unavailable)?;
            for c in when {
                let Compare::ModRevision(key, want) = c;
                let have = match kv.get(key.as_str()).map_err(unavailable)? {
                    Some(g) => decode(key, g.value())?.mod_revision,
                    None => 0,
                };
                if have != *want {
                    return Ok(Txn {
                        succeeded: false,
                        revision: log.revision,
                    });
                }
            }
            for op in then {
                match op {
                    Op::Put(key, value) => {
                        kv.insert(key.as_str(), encode(revision, value).as_slice())
                            .map_err(unavailable)?;
                        events.push(Event::Put(KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            mod_revision: revision,
                        }));
                    }
                    Op::Delete(key) => {
                        if kv.remove(key.as_str()).map_err(unavailable)?.is_some() {
                            events.push(Event::Delete {
                                key: key.clone(),
                                mod_revision: revision,
                            });
                        }
                    }
                }
            }
            let mut meta = w.open_table(META).map_err(unavailable)?;
            meta.insert("revision", revision).map_err(unavailable)?;
        }
        w.commit().map_err(unavailable)?;
        log.revision = revision;
        let batch = Arc::new((revision, events));
        if log.history.len() == HISTORY {
            log.history.pop_front();
        }
        log.history.push_back(batch.clone());
        let _ = self.tx.send(batch); // nobody watching is fine
        Ok(Txn {
            succeeded: true,
            revision,
        })
    }

    /// Subscribes, and gathers the kept transactions above `after`; `None` if the history does
    /// not reach back that far.
    fn subscribe(&self, after: Revision) -> (broadcast::Receiver<Batch>, Option<Vec<Batch>>) {
        let log = self.log();
        let rx = self.tx.subscribe();
        if after >= log.revision {
            return (rx, Some(Vec::new()));
        }
        let oldest = log.history.front().map_or(log.revision + 1, |b| b.0);
        if after + 1 < oldest {
            return (rx, None);
        }
        let past = log
            .history
            .iter()
            .filter(|b| b.0 > after)
            .cloned()
            .collect();
        (rx, Some(past))
    }
}

fn matching(batch: &Batch, prefix: &str) -> Vec<Event> {
    batch
        .1
        .iter()
        .filter(|e| e.key().starts_with(prefix))
        .cloned()
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable(format!("store task: {e}")))?
}

#[async_trait]
impl Store for Embedded {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let (i, key) = (self.inner.clone(), key.to_string());
        blocking(move || i.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, Error> {
        let (i, prefix) = (self.inner.clone(), prefix.to_string());
        blocking(move || i.range(&prefix)).await
    }

    async fn txn(&self, when: &[Compare], then: &[Op]) -> Result<Txn, Error> {
        let (i, when, then) = (self.inner.clone(), when.to_vec(), then.to_vec());
        blocking(move || i.txn(&when, &then)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, Error> {
        let (mut rx, past) = self.inner.subscribe(after);
        let (tx, out) = mpsc::channel(64);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut seen = after;
            match past {
                None => {
                    if tx.send(WatchMessage::Resync).await.is_err() {
                        return;
                    }
                }
                Some(past) => {
                    for b in past {
                        seen = b.0;
                        let ev = matching(&b, &prefix);
                        if !ev.is_empty() && tx.send(WatchMessage::Events(ev)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            loop {
                let msg = match rx.recv().await {
                    Ok(b) if b.0 <= seen => continue, // already replayed from history
                    Ok(b) => {
                        seen = b.0;
                        let ev = matching(&b, &prefix);
                        if ev.is_empty() {
                            continue;
                        }
                        WatchMessage::Events(ev)
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "store watch fell behind: resync");
                        WatchMessage::Resync
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(out))
    }

    async fn hold(&self, key: &str, value: Vec<u8>, _ttl: i64) -> Result<Held, Error> {
        // Marked as held first, so that a crash right after the put still cleans it up.
        let (i, k) = (self.inner.clone(), key.to_string());
        blocking(move || i.mark_held(&k, true)).await?;
        self.txn(&[], &[Op::Put(key.to_string(), value)]).await?;
        // The key goes when the holder does: a task that waits forever and, when aborted
        // (the Held dropped), cannot run async code, so a guard deletes synchronously.
        struct Remove(Arc<Inner>, String);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = self.0.txn(&[], &[Op::Delete(self.1.clone())]);
                let _ = self.0.mark_held(&self.1, false);
            }
        }
        let guard = Remove(self.inner.clone(), key.to_string());
        Ok(Held::new(tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        })))
    }

    fn progress_every(&self) -> Option<std::time::Duration> {
        None
    }

    fn describe(&self) -> String {
        format!("embedded {}", self.inner.path)
    }

    async fn health(&self) -> Vec<(String, Result<String, String>)> {
        let rev = self.inner.log().revision;
        vec![(self.inner.path.clone(), Ok(format!("ok, revision {rev}")))]
    }
}
