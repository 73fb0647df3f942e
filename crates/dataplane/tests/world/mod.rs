//! A simulated network of nodes in one process, shared by the pair tests and the attacks.

#![allow(dead_code)] // each test file uses part of it

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bulkhead_allowlist::Allowlist;
use bulkhead_dataplane::{
    ApplyReport, Config, Counters, Event, Node, Now, PeerConfig, PeerId, PeerStatus, Shard,
    Sharded, Sink,
};
use bulkhead_policy::{Compiled, Conditions};
use bulkhead_proto::PrivateKey;

pub const T0: i64 = 1_800_000_000;

/// What one node emitted.
#[derive(Default)]
pub struct Out {
    pub net: Vec<(SocketAddr, Vec<u8>)>,
    pub tun: Vec<Vec<u8>>,
    pub dropped: Vec<String>,
    pub flows: Vec<String>,
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        self.net.push((to, d.to_vec()));
    }
    fn to_tun(&mut self, p: &[u8]) {
        self.tun.push(p.to_vec());
    }
    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Dropped { reason, .. } => self.dropped.push(reason.reason().to_string()),
            Event::FlowStarted { rule, .. } => self.flows.push(rule.to_string()),
        }
    }
}

/// A host's data plane: a whole node, or one split into shards (`BULKHEAD_TEST_SHARDS=N` runs
/// every world's nodes split into N, so that the same tests hold the split node to the same
/// decisions).
#[allow(clippy::large_enum_variant)] // one per host of a test
pub enum Core {
    Whole(Node),
    Split(Sharded),
}

/// Shards for the worlds' nodes: `BULKHEAD_TEST_SHARDS`, 1 (whole) by default.
pub fn test_shards() -> usize {
    std::env::var("BULKHEAD_TEST_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

impl Core {
    pub fn new(key: [u8; 32], flow_capacity: usize) -> Core {
        match test_shards() {
            1 => Core::Whole(Node::new(key, flow_capacity)),
            n => Core::Split(Sharded::new(key, flow_capacity, n).expect("a shard count")),
        }
    }

    pub fn apply(&mut self, c: Config, now: Now) -> ApplyReport {
        match self {
            Core::Whole(n) => n.apply(c, now),
            Core::Split(n) => n.apply(c, now),
        }
    }

    pub fn clear(&mut self) {
        match self {
            Core::Whole(n) => n.clear(),
            Core::Split(n) => n.clear(),
        }
    }

    pub fn handle_tun(&mut self, pkt: &[u8], now: Now, sink: &mut impl Sink) {
        match self {
            Core::Whole(n) => n.handle_tun(pkt, now, sink),
            Core::Split(n) => n.handle_tun(pkt, now, sink),
        }
    }

    pub fn handle_udp(&mut self, from: SocketAddr, d: &[u8], now: Now, sink: &mut impl Sink) {
        match self {
            Core::Whole(n) => n.handle_udp(from, d, now, sink),
            Core::Split(n) => n.handle_udp(from, d, now, sink),
        }
    }

    pub fn tick(&mut self, now: Now, sink: &mut impl Sink) {
        match self {
            Core::Whole(n) => n.tick(now, sink),
            Core::Split(n) => n.tick(now, sink),
        }
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        match self {
            Core::Whole(n) => n.peers(),
            Core::Split(n) => n.peers(),
        }
    }

    pub fn peer_id(&self, name: &str) -> Option<PeerId> {
        match self {
            Core::Whole(n) => n.peer_id(name),
            Core::Split(n) => n.peer_id(name),
        }
    }

    pub fn counters(&self) -> Counters {
        match self {
            Core::Whole(n) => n.counters(),
            Core::Split(n) => n.counters(),
        }
    }

    pub fn epoch(&self) -> u64 {
        match self {
            Core::Whole(n) => n.epoch(),
            Core::Split(n) => n.epoch(),
        }
    }

    pub fn flow_count(&self) -> usize {
        match self {
            Core::Whole(n) => n.flow_count(),
            Core::Split(n) => n.flow_count(),
        }
    }
}

pub struct Host {
    pub name: String,
    pub node: Core,
    pub udp: SocketAddr,
    pub key: PrivateKey,
    /// Everything the host's TUN device received, and everything it dropped.
    pub tun: Vec<Vec<u8>>,
    pub dropped: Vec<String>,
    pub flows: Vec<String>,
}

pub struct World {
    pub hosts: Vec<Host>,
    pub lists: HashMap<String, Allowlist>,
    pub now: Now,
    pub wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

pub fn allowlists(policy: &str, now: i64) -> HashMap<String, Allowlist> {
    let l = bulkhead_policy::load(policy, now, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    let m = l.model.unwrap();
    Compiled::new(&m, m.state(&Conditions::at(now)))
        .allowlists(&m, 1)
        .into_iter()
        .map(|a| (a.identity.clone(), a))
        .collect()
}

impl World {
    pub fn new(policy: &str, names: &[&str]) -> World {
        World::with_flow_capacity(policy, names, 1024)
    }

    pub fn with_flow_capacity(policy: &str, names: &[&str], flow_capacity: usize) -> World {
        let keys = names.iter().map(|_| PrivateKey::generate()).collect();
        World::build(policy, names, flow_capacity, keys, Core::new)
    }

    /// Every node split into `shards`, with keys chosen so that host `i` is owned by shard
    /// `i % shards` of every other: each shard has peers, whatever the luck.
    pub fn split(policy: &str, names: &[&str], shards: usize) -> World {
        let keys = (0..names.len())
            .map(|i| {
                loop {
                    let k = PrivateKey::generate();
                    if Shard::new(i % shards, shards)
                        .unwrap()
                        .owns(&k.public_key().0)
                    {
                        break k;
                    }
                }
            })
            .collect();
        World::build(policy, names, 1024, keys, |k, c| {
            Core::Split(Sharded::new(k, c, shards).unwrap())
        })
    }

    fn build(
        policy: &str,
        names: &[&str],
        flow_capacity: usize,
        keys: Vec<PrivateKey>,
        core: impl Fn([u8; 32], usize) -> Core,
    ) -> World {
        let lists = allowlists(policy, T0);
        let hosts: Vec<Host> = names
            .iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (n, key))| Host {
                name: n.to_string(),
                node: core(key.to_bytes(), flow_capacity),
                udp: SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16)),
                key,
                tun: Vec::new(),
                dropped: Vec::new(),
                flows: Vec::new(),
            })
            .collect();
        let mut w = World {
            hosts,
            lists,
            now: Now {
                instant: Instant::now(),
                unix: T0,
            },
            wire: Vec::new(),
        };
        for i in 0..w.hosts.len() {
            let list = w.lists[&w.hosts[i].name].clone();
            let cfg = w.config(list);
            let now = w.now;
            w.hosts[i].node.apply(cfg, now);
        }
        w
    }

    /// The configuration for an allowlist, with every host's key and endpoint.
    pub fn config(&self, allowlist: Allowlist) -> Config {
        Config {
            allowlist,
            peers: self
                .hosts
                .iter()
                .map(|h| {
                    (
                        h.name.clone(),
                        PeerConfig {
                            public_key: h.key.public_key().0,
                            endpoint: Some(h.udp),
                        },
                    )
                })
                .collect(),
            keepalive: None,
        }
    }

    pub fn idx(&self, name: &str) -> usize {
        self.hosts.iter().position(|h| h.name == name).unwrap()
    }

    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.lists[name].address
    }

    pub fn collect(&mut self, i: usize, out: Out) {
        let from = self.hosts[i].udp;
        self.wire
            .extend(out.net.into_iter().map(|(to, d)| (from, to, d)));
        let h = &mut self.hosts[i];
        h.tun.extend(out.tun);
        h.dropped.extend(out.dropped);
        h.flows.extend(out.flows);
    }

    /// A local process on `name` sends `pkt`; the network runs until quiet.
    pub fn send(&mut self, name: &str, pkt: &[u8]) {
        let i = self.idx(name);
        let mut out = Out::default();
        let now = self.now;
        self.hosts[i].node.handle_tun(pkt, now, &mut out);
        self.collect(i, out);
        self.run();
    }

    /// Delivers datagrams until none are left (bounded, to catch loops).
    pub fn run(&mut self) {
        for _ in 0..100 {
            let Some((from, to, d)) = (!self.wire.is_empty()).then(|| self.wire.remove(0)) else {
                return;
            };
            let Some(j) = self.hosts.iter().position(|h| h.udp == to) else {
                continue;
            };
            let mut out = Out::default();
            let now = self.now;
            self.hosts[j].node.handle_udp(from, &d, now, &mut out);
            self.collect(j, out);
        }
        panic!("the network did not settle");
    }

    pub fn tick(&mut self, by: Duration) {
        self.now.instant += by;
        self.now.unix += by.as_secs() as i64;
        for i in 0..self.hosts.len() {
            let mut out = Out::default();
            let now = self.now;
            self.hosts[i].node.tick(now, &mut out);
            self.collect(i, out);
        }
        self.run();
    }

    pub fn take_tun(&mut self, name: &str) -> Vec<Vec<u8>> {
        let i = self.idx(name);
        std::mem::take(&mut self.hosts[i].tun)
    }

    pub fn take_dropped(&mut self, name: &str) -> Vec<String> {
        let i = self.idx(name);
        std::mem::take(&mut self.hosts[i].dropped)
    }
}
