//! Administrators, their roles, and access that needs approval (spec §10).
//!
//! | route | least role | body → answer |
//! |---|---|---|
//! | `GET /v1/admins` | viewer | → [`AdminView`]s |
//! | `POST /v1/admins` | owner | [`AdminRequest`] → [`AdminIssued`] |
//! | `POST /v1/admins/{name}/revoke` | owner | → [`AdminView`] |
//! | `GET /v1/access` | viewer | → [`AccessView`]s |
//! | `POST /v1/access` | operator | [`AccessRequest`] → [`AccessView`] |
//! | `POST /v1/access/{id}/approve` | approver | → [`AccessView`] |
//! | `POST /v1/access/{id}/deny` | approver, or its requester | → [`AccessView`] |
//! | `POST /v1/access/{id}/revoke` | approver, or its requester | → [`AccessView`] |

use serde::{Deserialize, Serialize};

/// What an administrator may do; each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Also applies policies, creates tokens, quarantines, releases, revokes nodes, and asks
    /// for access that needs approval.
    Operator,
    /// Also approves and denies access requests.
    Approver,
    /// Also manages administrators. The first administrator (`admin.yaml`) is an owner, and
    /// so is one stored before roles existed.
    Owner,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Approver, Role::Owner];

    /// Its name: `viewer`, `operator`, `approver`, `owner`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Owner => "owner",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected viewer, operator, approver or owner")
            })
    }
}

/// `POST /v1/admins`: a new administrator. The CLI makes the key pair and sends only the
/// public half; the answer is the certificate for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRequest {
    /// A name for the audit log: 1 to 63 characters of `[a-z0-9-]`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Seconds from now until the credential stops working; `None`: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    /// The credential's public key (see [`crate::tls::ClientPublicKey::to_base64`]).
    pub credential_key: String,
}

/// The answer to [`AdminRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminIssued {
    /// The administrator, as stored.
    pub admin: AdminView,
    /// Its client certificate, PEM.
    pub certificate: String,
    /// The CA certificate, PEM.
    pub ca: String,
    /// The controller's URL.
    pub url: String,
}

/// An administrator, as `bulkhead admin list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminView {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Unix seconds.
    pub created: i64,
    /// Who added it (`controller` for the first one).
    pub created_by: String,
    /// Unix seconds when it stops working, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// The first 16 hex digits of its certificate's SHA-256.
    pub fingerprint: String,
}

/// `POST /v1/access`: ask for access under a rule that needs approval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequest {
    /// The rule.
    pub rule: String,
    /// How long, in seconds, from its approval; at most the rule's `max`.
    pub duration: u64,
    /// The initiating identity; `None`: every identity on the rule's `from` side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Why, for the approvers and the audit log.
    pub reason: String,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessState {
    /// Waiting for approvals.
    Pending,
    /// Approved: the access is in force until `until`.
    Approved,
    /// Denied: it never takes effect.
    Denied,
    /// Not approved in time: it never takes effect.
    Expired,
    /// Approved, then revoked before its end.
    Revoked,
    /// Approved, and its time is over.
    Ended,
    /// A state this version does not know.
    #[serde(other)]
    Unknown,
}

impl AccessState {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessState::Pending => "pending",
            AccessState::Approved => "approved",
            AccessState::Denied => "denied",
            AccessState::Expired => "expired",
            AccessState::Revoked => "revoked",
            AccessState::Ended => "ended",
            AccessState::Unknown => "unknown",
        }
    }

    /// Whether nothing more can happen to it.
    pub fn is_final(self) -> bool {
        !matches!(self, AccessState::Pending | AccessState::Approved)
    }
}

impl std::fmt::Display for AccessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One approval of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The administrator.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
}

/// An access request, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessView {
    /// Its id: 8 hex digits.
    pub id: String,
    /// The rule.
    pub rule: String,
    /// The initiating identity asked for; `None`: every identity on the rule's `from` side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Seconds of access, from its approval.
    pub duration: u64,
    /// Why.
    pub reason: String,
    /// Who asked.
    pub requester: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds: not approved by then, it expires.
    pub approve_by: i64,
    /// How many different approvers the rule needs.
    pub approvers_needed: u32,
    /// The approvals so far.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// Where it stands (for a pending or approved request, as stored: see
    /// [`AccessView::state_at`]).
    pub state: AccessState,
    /// Unix seconds: when the access started, once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    /// Unix seconds: when the access ends (or ended), once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Who denied or revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<String>,
}

impl AccessView {
    /// Where it stands at `now`: a pending request past `approve_by` has expired, and an
    /// approved one past `until` has ended, whether or not that is stored yet.
    pub fn state_at(&self, now: i64) -> AccessState {
        match self.state {
            AccessState::Pending if now >= self.approve_by => AccessState::Expired,
            AccessState::Approved if self.until.is_some_and(|u| now >= u) => AccessState::Ended,
            s => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Viewer < Role::Operator && Role::Approver < Role::Owner);
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert!("root".parse::<Role>().unwrap_err().contains("viewer"));
    }

    #[test]
    fn a_request_expires_or_ends_with_time() {
        let mut v = AccessView {
            id: "a".into(),
            rule: "r".into(),
            from: None,
            duration: 60,
            reason: "x".into(),
            requester: "alice".into(),
            created: 0,
            approve_by: 100,
            approvers_needed: 1,
            approvals: vec![],
            state: AccessState::Pending,
            start: None,
            until: None,
            closed_by: None,
        };
        assert_eq!(v.state_at(99), AccessState::Pending);
        assert_eq!(v.state_at(100), AccessState::Expired);
        v.state = AccessState::Approved;
        v.until = Some(160);
        assert_eq!(v.state_at(159), AccessState::Approved);
        assert_eq!(v.state_at(160), AccessState::Ended);
        assert!(AccessState::Denied.is_final() && !AccessState::Approved.is_final());
    }
}
