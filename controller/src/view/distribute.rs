//! Distribution: where a node's [`NodeConfig`] is assembled, and the channels that carry it.
//!
//! Each identity has a `watch` channel holding its current message. After a change, only the
//! identities whose message really differs are sent anything. A watch channel keeps only the
//! newest value, so a slow node skips intermediate configurations instead of queueing them.

use std::collections::HashMap;
use std::sync::Arc;

use bulkhead_proto::{NodeConfig, NodeMessage, PeerInfo};
use tokio::sync::watch;

use super::Mirror;
use super::live::Allowlists;

/// WireGuard persistent keepalive pushed to nodes, seconds.
const KEEPALIVE: u16 = 25;

/// The open channels, by identity.
#[derive(Debug, Default)]
pub struct Channels(HashMap<String, watch::Sender<Arc<NodeMessage>>>);

/// The message an identity's node should have now: its own allowlist and its peers' keys and
/// endpoints; never another identity's allowlist, never the policy.
pub fn message_for(
    identity: &str,
    revision: u64,
    lists: &Allowlists,
    records: &Mirror,
) -> NodeMessage {
    let Some(list) = lists.get(identity) else {
        return NodeMessage::NoPolicy { revision };
    };
    let peers = list
        .peers
        .iter()
        .filter_map(|p| {
            let n = records.nodes.get(&*p.name)?;
            let info = PeerInfo {
                public_key: n.wireguard_key,
                endpoint: records.endpoints.get(&*p.name).copied(),
            };
            Some((p.name.to_string(), info))
        })
        .collect();
    NodeMessage::Config(NodeConfig {
        allowlist: (**list).clone(),
        peers,
        keepalive: Some(KEEPALIVE),
        underlay: list
            .underlay
            .as_ref()
            .map(|u| super::underlay::resolve(identity, u, records)),
    })
}

impl Channels {
    /// A receiver of `identity`'s messages, starting with `current()` if it has no channel yet.
    pub fn subscribe(
        &mut self,
        identity: &str,
        current: impl FnOnce() -> NodeMessage,
    ) -> watch::Receiver<Arc<NodeMessage>> {
        if let Some(tx) = self.0.get(identity) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(current()));
        self.0.insert(identity.to_string(), tx);
        rx
    }

    /// Identities with a channel.
    pub fn identities(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// Closes an identity's channel: its streams end.
    pub fn close(&mut self, identity: &str) {
        self.0.remove(identity);
    }

    /// Sends each of `identities` that has a channel its message from `message`, if it differs
    /// from the one it has; returns how many were sent.
    pub fn push<'a>(
        &self,
        identities: impl IntoIterator<Item = &'a String>,
        message: impl Fn(&str) -> NodeMessage,
    ) -> usize {
        let mut sent = 0;
        for id in identities {
            let Some(tx) = self.0.get(id) else {
                continue;
            };
            let msg = message(id);
            tx.send_if_modified(|cur| {
                if **cur == msg {
                    false
                } else {
                    *cur = Arc::new(msg);
                    sent += 1;
                    true
                }
            });
        }
        sent
    }
}
