//! The flow log, as the controller keeps it, and automatic quarantine.
//!
//! - [`ingest`]: a node's batch, both ends named (a node reports about itself and its peers);
//! - [`history`]: the last `--flow-history` flows in memory, and a broadcast of new ones;
//! - [`durable`]: every flow, as per-hour aggregates on disk (`STATE/flows.redb`), for
//!   `--flow-retention`, bounded;
//! - [`quarantine`]: denials counted per initiator, shared between controllers, and the one
//!   threshold rule that quarantines.
//!
//! Nodes ship their flow starts and denied new flows in batches. This controller keeps the last
//! `--flow-history` of them (default 100,000; about 200 bytes each) in memory, in a ring: the
//! oldest go first, and a restart starts empty. `bulkhead flows` reads this ring (and, with
//! `--follow`, what arrives next). It also adds each to the durable history, which
//! `bulkhead flows --since` reads. Neither is in the store: flows are many, they change nothing,
//! and etcd wants small, few writes.

pub mod durable;
mod history;
pub mod ingest;
mod quarantine;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use durable::DurableHistory;
pub use history::History;
pub use quarantine::share_denials;

/// Default number of flows kept.
pub const DEFAULT_HISTORY: usize = 100_000;

/// The flow log and the denial counts.
#[derive(Debug)]
pub struct Flows {
    /// The flows kept in memory.
    pub history: History,
    /// Every flow, aggregated per hour, on disk.
    pub durable: Arc<DurableHistory>,
    denials: quarantine::Denials,
    /// Entries nodes dropped because their buffers were full (reported in their batches).
    pub dropped_by_nodes: AtomicU64,
    /// Entries this controller refused.
    pub refused: ingest::Refused,
}

impl Flows {
    /// A log keeping `cap` flows in memory, and every one in `durable`.
    pub fn new(cap: usize, durable: DurableHistory) -> Flows {
        Flows {
            history: History::new(cap),
            durable: Arc::new(durable),
            denials: quarantine::Denials::default(),
            dropped_by_nodes: AtomicU64::new(0),
            refused: ingest::Refused::default(),
        }
    }
}
