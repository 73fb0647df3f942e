//! `bulkheadd run --metrics ADDR:PORT`: what the daemon exposes to Prometheus.
//!
//! A scrape asks the daemon loop for a [`Snapshot`] (the loop owns the data plane, so nothing is
//! shared with the packet path) and turns it into a registry here, off the loop. No I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_dataplane::{Counters, PeerStatus};
use bulkhead_proto::metrics::{Labels, Registry, Unit, counter, gauge, one};

/// The daemon's figures at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The revision of the allowlist in force, if any.
    pub revision: Option<u64>,
    /// Peers with a tunnel.
    pub peers: Vec<PeerStatus>,
    /// Drops by reason and by rule, flows started.
    pub counters: Counters,
    /// Flows tracked now.
    pub flows_tracked: usize,
    /// Most flows tracked at once (`--flow-capacity`).
    pub flow_capacity: usize,
    /// Flow-log entries waiting to be shipped.
    pub flow_log_entries: usize,
    /// Flow-log entries dropped because the buffer was full, since the start.
    pub flow_log_dropped: u64,
    /// I/O errors on the packet path, by operation (`tun_read`, `udp_send`, …): each dropped
    /// a packet or a batch.
    pub io_errors: Vec<(&'static str, u64)>,
    /// The host firewall's mode and whether its table is in place.
    pub underlay: Option<bulkhead_proto::UnderlayStatus>,
    /// New underlay connections the firewall logged, by direction and verdict (`deny`,
    /// `would_deny`): rate-limited in the kernel to 50 a second per direction.
    pub underlay_logged: Vec<(&'static str, &'static str, u64)>,
    /// The firewall table's counted rules, from the kernel.
    pub underlay_counters: Vec<bulkhead_hostfw::counters::Counted>,
    /// When it was taken.
    pub at: SystemTime,
}

fn peer(p: &PeerStatus) -> Labels {
    vec![("peer", p.name.clone())]
}

fn per_peer(s: &Snapshot, f: impl Fn(&PeerStatus) -> u64) -> Vec<(Labels, u64)> {
    s.peers.iter().map(|p| (peer(p), f(p))).collect()
}

/// The registry of one scrape.
pub fn registry(s: &Snapshot) -> Registry {
    let mut r = Registry::default();
    let traffic = [
        (
            "bulkhead_peer_sent",
            "sent into the peer's tunnel (after the egress filter)",
        ),
        (
            "bulkhead_peer_received",
            "decrypted from the peer's tunnel (before the ingress filter)",
        ),
    ];
    for (i, (name, what)) in traffic.into_iter().enumerate() {
        let pick = move |p: &PeerStatus| if i == 0 { p.sent } else { p.received };
        counter(
            &mut r,
            &format!("{name}_packets"),
            &format!("IP packets {what}"),
            None,
            per_peer(s, |p| pick(p).packets),
        );
        counter(
            &mut r,
            name,
            &format!("Bytes of IP packets {what}"),
            Some(Unit::Bytes),
            per_peer(s, |p| pick(p).bytes),
        );
    }
    counter(
        &mut r,
        "bulkhead_peer_handshakes",
        "WireGuard handshakes with the peer: its initiations answered, its responses to ours",
        None,
        per_peer(s, |p| p.handshakes),
    );
    let now = s.at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    gauge(
        &mut r,
        "bulkhead_peer_last_handshake_timestamp",
        "When the last handshake with the peer completed (Unix time; absent if none yet)",
        Some(Unit::Seconds),
        s.peers.iter().filter_map(|p| {
            let since = p.since_handshake?;
            Some((peer(p), now.saturating_sub(since).as_secs_f64()))
        }),
    );
    gauge(
        &mut r,
        "bulkhead_peers",
        "Peers with a tunnel",
        None,
        one(s.peers.len() as f64),
    );
    counter(
        &mut r,
        "bulkhead_packets_dropped",
        "Packets dropped, by direction and reason (not_allowed, denied_by_rule and not_a_peer are policy denials)",
        None,
        s.counters.dropped.iter().map(|((d, reason), n)| {
            (
                vec![
                    ("direction", d.as_str().into()),
                    ("reason", (*reason).into()),
                ],
                *n,
            )
        }),
    );
    counter(
        &mut r,
        "bulkhead_io_errors",
        "I/O errors on the packet path, by operation; each dropped a packet or a batch, and the daemon went on",
        None,
        s.io_errors
            .iter()
            .map(|(op, n)| (vec![("op", (*op).into())], *n)),
    );
    counter(
        &mut r,
        "bulkhead_underlay_connections_logged",
        "New underlay connections the host firewall dropped (deny) or would drop in observe (would_deny), as logged: at most 50 a second per direction",
        None,
        s.underlay_logged.iter().map(|(d, v, n)| {
            (
                vec![("direction", (*d).into()), ("verdict", (*v).into())],
                *n,
            )
        }),
    );
    counter(
        &mut r,
        "bulkhead_underlay_packets",
        "Underlay packets the host firewall counted, by chain and rule: an allow entry's name, or default deny (dropped) or would deny (observe: would have been dropped)",
        None,
        s.underlay_counters.iter().map(|c| {
            (
                vec![
                    (
                        "direction",
                        if c.chain == "input" {
                            "inbound"
                        } else {
                            "outbound"
                        }
                        .into(),
                    ),
                    ("rule", c.comment.clone()),
                ],
                c.packets,
            )
        }),
    );
    if let Some(u) = s.underlay {
        gauge(
            &mut r,
            "bulkhead_underlay_table_installed",
            "1 if the host firewall table for the configured mode is in place, by mode",
            None,
            vec![(
                vec![("mode", u.mode.as_str().into())],
                f64::from(u8::from(u.installed)),
            )],
        );
    }
    counter(
        &mut r,
        "bulkhead_packets_denied_by_rule",
        "Packets dropped by a deny rule, by rule",
        None,
        s.counters
            .denied_by_rule
            .iter()
            .map(|(rule, n)| (vec![("rule", rule.clone())], *n)),
    );
    counter(
        &mut r,
        "bulkhead_flows_started",
        "Flows admitted",
        None,
        one(s.counters.flows_started),
    );
    gauge(
        &mut r,
        "bulkhead_flows_tracked",
        "Flows tracked now",
        None,
        one(s.flows_tracked as f64),
    );
    gauge(
        &mut r,
        "bulkhead_flows_capacity",
        "Most flows tracked at once; each peer may hold a quarter of them",
        None,
        one(s.flow_capacity as f64),
    );
    gauge(
        &mut r,
        "bulkhead_peer_flows",
        "Flows tracked now with the peer, whichever side opened them",
        None,
        s.peers.iter().map(|p| (peer(p), p.flows.tracked as f64)),
    );
    counter(
        &mut r,
        "bulkhead_peer_flow_table_full",
        "New flows with the peer refused because its share of the flow table, or the table, was full of flows that could not be evicted",
        None,
        per_peer(s, |p| p.flows.refused),
    );
    counter(
        &mut r,
        "bulkhead_peer_flows_evicted",
        "Half-open flows with the peer evicted to make room for new ones",
        None,
        per_peer(s, |p| p.flows.evicted),
    );
    gauge(
        &mut r,
        "bulkhead_allowlist_revision",
        "Policy revision of the allowlist in force (0: none, nothing passes)",
        None,
        one(s.revision.unwrap_or(0) as f64),
    );
    gauge(
        &mut r,
        "bulkhead_flow_log_entries",
        "Flow-log entries waiting to be shipped to the controller",
        None,
        one(s.flow_log_entries as f64),
    );
    counter(
        &mut r,
        "bulkhead_flow_log_dropped",
        "Flow-log entries dropped because the buffer was full",
        None,
        one(s.flow_log_dropped),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_dataplane::{Direction, FlowShare, Traffic};

    #[test]
    fn a_snapshot_renders_every_family() {
        let mut counters = Counters::default();
        counters
            .dropped
            .insert((Direction::Egress, "not_allowed"), 7);
        counters.denied_by_rule.insert("no-telnet".into(), 2);
        counters.flows_started = 5;
        let at = UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Snapshot {
            revision: Some(3),
            peers: vec![PeerStatus {
                name: "db-1".into(),
                public_key: [1; 32],
                address: "10.0.0.2".parse().unwrap(),
                endpoint: None,
                since_handshake: Some(Duration::from_secs(10)),
                tx_bytes: 0,
                rx_bytes: 0,
                keepalive: None,
                sent: Traffic {
                    packets: 4,
                    bytes: 400,
                },
                received: Traffic {
                    packets: 2,
                    bytes: 120,
                },
                handshakes: 1,
                flows: FlowShare {
                    tracked: 1,
                    refused: 6,
                    evicted: 2,
                },
            }],
            counters,
            flows_tracked: 1,
            flow_capacity: 100,
            flow_log_entries: 0,
            flow_log_dropped: 9,
            io_errors: vec![("tun_read", 3)],
            underlay: Some(bulkhead_proto::UnderlayStatus {
                mode: bulkhead_allowlist::UnderlayMode::Enforce,
                installed: true,
            }),
            underlay_logged: vec![("inbound", "deny", 4)],
            underlay_counters: vec![bulkhead_hostfw::counters::Counted {
                chain: "input".into(),
                comment: "default deny".into(),
                packets: 12,
                bytes: 720,
            }],
            at,
        };
        let text = bulkhead_proto::metrics::encode(registry(&s)).unwrap();
        for line in [
            "bulkhead_peer_sent_packets_total{peer=\"db-1\"} 4",
            "bulkhead_peer_sent_bytes_total{peer=\"db-1\"} 400",
            "bulkhead_peer_received_packets_total{peer=\"db-1\"} 2",
            "bulkhead_peer_received_bytes_total{peer=\"db-1\"} 120",
            "bulkhead_peer_handshakes_total{peer=\"db-1\"} 1",
            "bulkhead_io_errors_total{op=\"tun_read\"} 3",
            "bulkhead_peer_flows{peer=\"db-1\"} 1.0",
            "bulkhead_peer_flow_table_full_total{peer=\"db-1\"} 6",
            "bulkhead_peer_flows_evicted_total{peer=\"db-1\"} 2",
            "bulkhead_peer_last_handshake_timestamp_seconds{peer=\"db-1\"} 990.0",
            "bulkhead_packets_dropped_total{direction=\"egress\",reason=\"not_allowed\"} 7",
            "bulkhead_packets_denied_by_rule_total{rule=\"no-telnet\"} 2",
            "bulkhead_flows_started_total 5",
            "bulkhead_flows_tracked 1.0",
            "bulkhead_allowlist_revision 3.0",
            "bulkhead_flow_log_dropped_total 9",
            "bulkhead_underlay_connections_logged_total{direction=\"inbound\",verdict=\"deny\"} 4",
            "bulkhead_underlay_table_installed{mode=\"enforce\"} 1.0",
            "bulkhead_underlay_packets_total{direction=\"inbound\",rule=\"default deny\"} 12",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
