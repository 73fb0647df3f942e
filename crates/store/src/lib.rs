//! The controller's durable state, behind one trait.
//!
//! The model is etcd's, so that the embedded backend and the etcd backend are honestly the same
//! thing: a flat, ordered map of string keys to byte values; one global revision that every
//! committed transaction raises by one; each key remembers the revision that last wrote it
//! (`mod_revision`); a transaction is a list of comparisons on `mod_revision` and a list of
//! writes, all or nothing (compare-and-swap); a watch streams every committed change under a
//! prefix, in revision order.
//!
//! A watch may lose events (a lagging reader, an etcd compaction). It then says so with
//! [`WatchMessage::Resync`] and the reader must read the whole prefix again: never a silent gap.
//!
//! A store that other processes write too (etcd) can also be cut off: its watch then goes quiet
//! exactly as it does on a quiet cluster. Such a backend's watch says that it is current with
//! [`WatchMessage::Progress`] every [`Store::progress_every`], so that a reader can tell the two
//! apart; silence past a few of those means the reader can no longer vouch for what it holds.
//!
//! Values are opaque here; the controller encodes them (JSON) and refuses ones it cannot read.

#![forbid(unsafe_code)]

mod embedded;
pub mod etcd;
pub mod suite;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use embedded::Embedded;
pub use etcd::Etcd;

/// A store revision: 0 before the first write, then one more per committed transaction.
pub type Revision = i64;

/// One key and its current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the transaction that last wrote it.
    pub mod_revision: Revision,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key was last written at exactly this revision; 0 means the key must not exist.
    ModRevision(String, Revision),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key.
    Put(String, Vec<u8>),
    /// Remove a key (no effect, and no event, if it does not exist).
    Delete(String),
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Txn {
    /// Whether every comparison held and the writes were committed.
    pub succeeded: bool,
    /// The store's revision after the transaction: the new one if it committed.
    pub revision: Revision,
}

/// Every key under a prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the snapshot was taken at.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put(KeyValue),
    /// A key was removed.
    Delete {
        /// The key.
        key: String,
        /// The revision of the transaction that removed it.
        mod_revision: Revision,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the transaction that made it.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one or more transactions, in revision order.
    Events(Vec<Event>),
    /// Events were lost; read the prefix again with [`Store::range`] and go on watching. Events
    /// at or below the new snapshot's revision that still arrive must be ignored.
    Resync,
    /// The store confirms that this watch is current: it has delivered every change up to this
    /// store revision, and the store answered a moment ago. Sent only by backends with a
    /// [`Store::progress_every`], that often while the store is reachable.
    Progress(Revision),
}

/// A stream of changes under a prefix. It ends (`None`) when the backend's stream ends (the
/// store went away, or an etcd watch broke after saying `Resync`); the reader then starts over
/// with a full read and a new watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchMessage>,
}

impl Watch {
    /// A watch fed by a backend task.
    pub fn new(rx: mpsc::Receiver<WatchMessage>) -> Watch {
        Watch { rx }
    }

    /// The next batch of changes.
    pub async fn next(&mut self) -> Option<WatchMessage> {
        self.rx.recv().await
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The backend cannot be reached or failed; the call may be retried.
    Unavailable(String),
    /// The backend's data is not what this program wrote.
    Corrupt(String),
    /// The backend refused this client: a wrong password, a certificate it does not accept,
    /// no permission on the namespace. Retrying does not help; the configuration must change.
    Refused(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(m) => write!(f, "store unavailable: {m}"),
            Error::Corrupt(m) => write!(f, "store corrupt: {m}"),
            Error::Refused(m) => write!(f, "store refused this controller: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The controller's storage. Every method is one round trip to the backend.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error>;
    /// Every key starting with `prefix`, at one revision.
    async fn range(&self, prefix: &str) -> Result<Snapshot, Error>;
    /// If every comparison holds, apply every write as one new revision.
    async fn txn(&self, when: &[Compare], then: &[Op]) -> Result<Txn, Error>;
    /// Changes under `prefix` with a revision above `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, Error>;
    /// Writes `key` and keeps it only while the returned [`Held`] lives and this process keeps
    /// talking to the store: with etcd, a lease of `ttl` seconds kept alive in the background,
    /// so a controller that dies disappears within `ttl`. The embedded store (one controller)
    /// keeps it until the `Held` is dropped, or until the next `open` if the process died.
    async fn hold(&self, key: &str, value: Vec<u8>, ttl: i64) -> Result<Held, Error>;
    /// How often this store's watch confirms it is current ([`WatchMessage::Progress`]), or
    /// `None` if it never needs to: the embedded store is written only by this process, through
    /// this very object, so its watch cannot fall behind without saying `Resync`.
    fn progress_every(&self) -> Option<Duration>;
    /// Where the data lives, for logs and `bulkhead status`.
    fn describe(&self) -> String;
    /// Each place the data lives (a file, or each etcd endpoint) and how it is: `Ok` with a
    /// short description, or the error. For `bulkhead status`.
    async fn health(&self) -> Vec<(String, Result<String, String>)>;
}

/// A key held by [`Store::hold`]; dropping it stops keeping the key alive.
#[derive(Debug)]
pub struct Held {
    task: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Wraps the task that keeps the key alive (or removes it when aborted).
    pub fn new(task: tokio::task::JoinHandle<()>) -> Held {
        Held { task }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Unconditional writes; the revision they committed at.
pub async fn put(store: &dyn Store, ops: &[Op]) -> Result<Revision, Error> {
    Ok(store.txn(&[], ops).await?.revision)
}
