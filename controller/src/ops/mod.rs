//! What the API does, apart from HTTP, by resource:
//! - [`policy`]: validate, plan, apply, show;
//! - [`enrollment`]: tokens, joins, revocation, reports;
//! - [`quarantine`]: quarantine and release;
//! - [`reads`]: the audit log, nodes, status;
//! - [`admins`]: named administrators: add, list, revoke (spec §10);
//! - [`access`]: access that needs approval: request, approve, deny, revoke, and its end.
//!
//! Every change is a store transaction; the view follows the store ([`crate::view::sync`]).
//! Errors are an [`Error`]: what went wrong in the domain's words. Only `api.rs` maps them to
//! HTTP statuses and the API's error codes.

mod access;
mod admins;
mod enrollment;
mod policy;
mod quarantine;
mod reads;

pub use access::{DEFAULT_REQUEST_TTL, MAX_OPEN_REQUESTS, close_access};
pub use admins::MAX_ADMINS;

use bulkhead_proto::AuditEntry;
use bulkhead_store::{Compare, Op};

use crate::Controller;
use crate::records;
use crate::view::lock;

/// Longest token lifetime: a week.
pub const MAX_TTL: u64 = 7 * 24 * 3600;

pub(crate) fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

pub(crate) fn unix_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Why a call failed.
#[derive(Debug)]
pub enum Error {
    /// No credential, or one that is unknown or revoked.
    Unauthenticated(&'static str),
    /// A credential that may not make this call.
    Forbidden(String),
    /// The request is malformed or out of bounds.
    BadRequest(String),
    /// The policy does not validate: every problem, as `FILE:LINE:COL: error: …`.
    InvalidPolicy {
        /// The summary.
        message: String,
        /// One line per problem.
        details: Vec<String>,
    },
    /// Something changed meanwhile (another apply, another controller): try again.
    Conflict(String),
    /// No such thing.
    NotFound(String),
    /// The join token is unknown, used or expired.
    TokenInvalid,
    /// Not possible now (the store lags, or fails); try again.
    Unavailable(String),
    /// A fault of the controller's own, logged.
    Internal(String),
}

impl Error {
    /// The store failed: logged, and unavailable.
    pub fn store(e: bulkhead_store::Error) -> Error {
        tracing::error!(error = %e, "store");
        Error::Unavailable(e.to_string())
    }

    /// A fault of the controller's own: logged.
    pub fn internal(message: impl Into<String>) -> Error {
        let m = message.into();
        tracing::error!("{m}");
        Error::Internal(m)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unauthenticated(m) => f.write_str(m),
            Error::Forbidden(m) => f.write_str(m),
            Error::TokenInvalid => f.write_str("the join token is unknown, used or expired"),
            Error::InvalidPolicy { message, details } => {
                f.write_str(message)?;
                for d in details {
                    write!(f, "\n{d}")?;
                }
                Ok(())
            }
            Error::BadRequest(m)
            | Error::Conflict(m)
            | Error::NotFound(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Who does something, as the audit log and the records name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An administrator, by the name in its credential.
    Admin(String),
    /// A node, enrolling with a token.
    Node,
    /// `--policy FILE`.
    File(String),
    /// The controller itself: an automatic quarantine, one that ends.
    Controller,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Admin(name) => f.write_str(name),
            Actor::Node => f.write_str("node"),
            Actor::File(path) => write!(f, "file:{path}"),
            Actor::Controller => f.write_str("controller"),
        }
    }
}

impl Controller {
    /// Commits `ops` if every compare in `when` holds, with `entry` appended to the audit log in
    /// the same transaction, and waits until the view reflects it. `Ok(false)`: a compare failed
    /// and nothing was written.
    async fn commit_audited(
        &self,
        mut when: Vec<Compare>,
        mut ops: Vec<Op>,
        entry: &AuditEntry,
    ) -> Result<bool, Error> {
        let (c, a) = records::audit(entry);
        when.push(c);
        ops.push(a);
        let t = self.store.txn(&when, &ops).await.map_err(Error::store)?;
        if t.succeeded {
            self.caught_up(t.revision).await;
        }
        Ok(t.succeeded)
    }

    /// Every live controller's URL, this one's first.
    pub fn controller_urls(&self) -> Vec<String> {
        let mut urls = vec![self.url.clone()];
        for u in lock(&self.view).records().controllers.values() {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        urls
    }
}
