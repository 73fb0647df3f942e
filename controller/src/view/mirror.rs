//! The store mirror: every record the controller follows, decoded, by kind.
//!
//! One router ([`Record::of`]) says what a key is; `put` and `delete` both go through it, so a new
//! kind of record is one new arm in each, next to each other. A record that does not decode is
//! logged and left out: the mirror keeps what it had.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use bulkhead_proto::Quarantine;
use bulkhead_store::{KeyValue, Revision};

use crate::records::{
    self, ACCESS, ADMINS, AdminRecord, BLOBS, CONTROLLERS, CREDS, ControllerRecord, CredRecord,
    DENIALS, DenialRecord, ENDPOINTS, EndpointRecord, NODES, NodeRecord, POLICY, PRESENCE,
    PolicyHead, PresenceRecord, QUARANTINE, Tally,
};

/// What a batch of store events touched.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// The newest policy head that arrived, to be made live if it is newer.
    pub head: Option<PolicyHead>,
    /// Everything may have changed (a full reload): every node is sent what differs.
    pub everything: bool,
    /// Something conditions depend on (facts, quarantines) changed.
    pub conditions: bool,
    /// Credentials changed.
    pub creds: bool,
    /// Nodes whose enrollment or endpoint changed.
    pub nodes: HashSet<String>,
    /// A server's underlay address or the set of controllers changed: every host firewall
    /// may need new addresses.
    pub underlay: bool,
}

/// The records, as the store holds them now. Only the view's follower changes them; everyone
/// else reads them through [`super::View::records`].
#[derive(Debug, Default)]
pub struct Mirror {
    /// Enrolled nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Valid credentials, by certificate fingerprint.
    pub creds: HashMap<String, CredRecord>,
    /// Reported endpoints.
    pub endpoints: HashMap<String, SocketAddr>,
    /// Servers' underlay addresses, as controllers saw their reports come from.
    pub underlay: HashMap<String, Ipv4Addr>,
    /// Live controllers' URLs, by store key.
    pub controllers: BTreeMap<String, String>,
    /// Quarantines as stored, with the record's revision (one whose `until` passed still counts
    /// as over, before the record is removed).
    pub quarantines: HashMap<String, (Quarantine, Revision)>,
    /// Per-identity presence as stored, with the record's revision.
    pub presence: HashMap<String, (PresenceRecord, Revision)>,
    /// Denials per initiator, per controller id, as every controller shares them.
    pub denials: HashMap<String, HashMap<String, DenialRecord>>,
    /// Named administrators, with the record's revision.
    pub admins: BTreeMap<String, (AdminRecord, Revision)>,
    /// Access requests by id, with the record's revision.
    pub access: BTreeMap<String, (bulkhead_proto::AccessView, Revision)>,
    /// Chunks of policy bodies, by key (kept until the store deletes them).
    pub(super) blobs: HashMap<String, Vec<u8>>,
}

/// What a store key holds.
#[derive(Debug, PartialEq, Eq)]
enum Record<'a> {
    Blob,
    Policy,
    Node(&'a str),
    Cred(&'a str),
    Endpoint(&'a str),
    Controller,
    Quarantine(&'a str),
    /// Denials of an initiator counted by one controller.
    Denial(&'a str, &'a str),
    Presence(&'a str),
    Admin(&'a str),
    Access(&'a str),
    /// Not followed (tokens, the audit log, the CA).
    Other,
}

impl Record<'_> {
    fn of(key: &str) -> Record<'_> {
        let under = |prefix: &str| key.strip_prefix(prefix);
        if key == POLICY {
            Record::Policy
        } else if key.starts_with(BLOBS) {
            Record::Blob
        } else if let Some(id) = under(NODES) {
            Record::Node(id)
        } else if let Some(fp) = under(CREDS) {
            Record::Cred(fp)
        } else if let Some(id) = under(ENDPOINTS) {
            Record::Endpoint(id)
        } else if key.starts_with(CONTROLLERS) {
            Record::Controller
        } else if let Some(id) = under(QUARANTINE) {
            Record::Quarantine(id)
        } else if let Some((id, ctl)) = under(DENIALS).and_then(|r| r.split_once('/')) {
            Record::Denial(id, ctl)
        } else if let Some(id) = under(PRESENCE) {
            Record::Presence(id)
        } else if let Some(name) = under(ADMINS) {
            Record::Admin(name)
        } else if let Some(id) = under(ACCESS) {
            Record::Access(id)
        } else {
            Record::Other
        }
    }
}

impl Mirror {
    /// The address each enrolled node joined from, by identity.
    pub fn pins(&self) -> BTreeMap<String, Ipv4Addr> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| Some((id.clone(), n.pinned?)))
            .collect()
    }

    /// Empties the mirror, for a full reload.
    pub(super) fn clear(&mut self) {
        *self = Mirror::default();
    }

    /// Takes a record written to the store.
    pub(super) fn put(&mut self, kv: &KeyValue, t: &mut Touched) {
        if let Err(e) = self.try_put(kv, t) {
            tracing::error!("{e}");
        }
    }

    fn try_put(&mut self, kv: &KeyValue, t: &mut Touched) -> Result<(), String> {
        let key = kv.key.as_str();
        let v = &kv.value;
        match Record::of(key) {
            Record::Blob => {
                self.blobs.insert(key.to_string(), v.clone());
            }
            Record::Policy => t.head = Some(records::decode(key, v)?),
            Record::Node(id) => {
                self.nodes.insert(id.into(), records::decode(key, v)?);
                t.underlay |= self.underlay.contains_key(id);
                t.nodes.insert(id.into());
            }
            Record::Cred(fp) => {
                self.creds.insert(fp.into(), records::decode(key, v)?);
                t.creds = true;
            }
            Record::Endpoint(id) => {
                let rec: EndpointRecord = records::decode(key, v)?;
                self.endpoints.insert(id.into(), rec.endpoint);
                let was = match rec.underlay {
                    Some(a) => self.underlay.insert(id.into(), a),
                    None => self.underlay.remove(id),
                };
                t.underlay |= was != rec.underlay;
                t.nodes.insert(id.into());
            }
            Record::Controller => {
                let rec: ControllerRecord = records::decode(key, v)?;
                t.underlay |= self.controllers.insert(key.into(), rec.url.clone()) != Some(rec.url);
            }
            Record::Quarantine(id) => {
                let q = records::decode(key, v)?;
                self.quarantines.insert(id.into(), (q, kv.mod_revision));
                t.conditions = true;
            }
            Record::Denial(id, ctl) => {
                let rec = records::decode(key, v)?;
                self.denials
                    .entry(id.into())
                    .or_default()
                    .insert(ctl.into(), rec);
            }
            Record::Presence(id) => {
                let rec: PresenceRecord = records::decode(key, v)?;
                let facts_moved = self
                    .presence
                    .get(id)
                    .is_none_or(|(o, _)| o.facts != rec.facts || o.last_seen != rec.last_seen);
                t.conditions |= facts_moved;
                self.presence.insert(id.into(), (rec, kv.mod_revision));
            }
            Record::Admin(name) => {
                let rec = records::decode(key, v)?;
                self.admins.insert(name.into(), (rec, kv.mod_revision));
            }
            Record::Access(id) => {
                let rec = records::decode(key, v)?;
                self.access.insert(id.into(), (rec, kv.mod_revision));
                t.conditions = true;
            }
            Record::Other => {}
        }
        Ok(())
    }

    /// Takes a record deleted from the store.
    pub(super) fn delete(&mut self, key: &str, t: &mut Touched) {
        match Record::of(key) {
            Record::Blob => {
                self.blobs.remove(key);
            }
            Record::Policy => {
                tracing::error!("the stored policy was deleted; keeping the live one");
            }
            Record::Node(id) => {
                self.nodes.remove(id);
                t.underlay |= self.underlay.contains_key(id);
                t.nodes.insert(id.into());
            }
            Record::Cred(fp) => {
                self.creds.remove(fp);
                t.creds = true;
            }
            Record::Endpoint(id) => {
                self.endpoints.remove(id);
                t.underlay |= self.underlay.remove(id).is_some();
                t.nodes.insert(id.into());
            }
            Record::Controller => {
                t.underlay |= self.controllers.remove(key).is_some();
            }
            Record::Quarantine(id) => {
                self.quarantines.remove(id);
                t.conditions = true;
            }
            Record::Denial(id, ctl) => {
                if let Some(by) = self.denials.get_mut(id) {
                    by.remove(ctl);
                    if by.is_empty() {
                        self.denials.remove(id);
                    }
                }
            }
            Record::Presence(id) => {
                self.presence.remove(id);
                t.conditions = true;
            }
            Record::Admin(name) => {
                self.admins.remove(name);
            }
            Record::Access(id) => {
                self.access.remove(id);
                t.conditions = true;
            }
            Record::Other => {}
        }
    }

    /// The approved access in force or to come at `now`, for the model
    /// ([`bulkhead_policy::Model::with_grants`]), in id order.
    pub fn grants(&self, now: i64) -> Vec<bulkhead_policy::Grant> {
        self.access
            .values()
            .filter(|(a, _)| a.state_at(now) == bulkhead_proto::AccessState::Approved)
            .filter_map(|(a, _)| {
                Some(bulkhead_policy::Grant {
                    id: a.id.clone(),
                    rule: a.rule.clone(),
                    initiators: a.from.iter().cloned().collect(),
                    start: a.start?,
                    until: a.until?,
                    requester: a.requester.clone(),
                    approvers: a.approvals.iter().map(|p| p.by.clone()).collect(),
                })
            })
            .collect()
    }

    /// Whether a node's stream is open at a live controller.
    pub fn online(&self, identity: &str) -> bool {
        self.presence
            .get(identity)
            .is_some_and(|(p, _)| p.online && self.controllers.values().any(|u| *u == p.controller))
    }

    /// Denials of `initiator` in the minute before `now_ms` that controllers other than `me`
    /// counted.
    pub fn others_denials(&self, initiator: &str, me: &str, now_ms: i64) -> Tally {
        let mut t = Tally::default();
        for (_, r) in self
            .denials
            .get(initiator)
            .into_iter()
            .flatten()
            .filter(|(ctl, _)| *ctl != me)
        {
            t.add(&r.tally(now_ms));
        }
        t
    }

    /// Quarantines in force at `now`.
    pub fn quarantined(&self, now: i64) -> impl Iterator<Item = (&String, &Quarantine)> {
        self.quarantines
            .iter()
            .filter(move |(_, (q, _))| q.until.is_none_or(|u| now < u))
            .map(|(id, (q, _))| (id, q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_router_names_every_kind_of_key() {
        let cases = [
            ("policy", Record::Policy),
            ("blobs/ab/00001", Record::Blob),
            ("nodes/web-1", Record::Node("web-1")),
            ("creds/ff", Record::Cred("ff")),
            ("endpoints/db", Record::Endpoint("db")),
            ("controllers/0a", Record::Controller),
            ("quarantine/x", Record::Quarantine("x")),
            ("denials/x/0a", Record::Denial("x", "0a")),
            ("denials/x", Record::Other),
            ("presence/x", Record::Presence("x")),
            ("admins/alice", Record::Admin("alice")),
            ("access/0a1b2c3d", Record::Access("0a1b2c3d")),
            ("tokens/aa", Record::Other),
            ("audit/1-2", Record::Other),
            ("policyx", Record::Other),
        ];
        for (key, want) in cases {
            assert_eq!(Record::of(key), want, "{key}");
        }
    }
}
