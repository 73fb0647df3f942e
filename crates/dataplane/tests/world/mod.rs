//! A simulated network of nodes in one process, shared by the pair tests and the attacks.

#![allow(dead_code)] // each test file uses part of it

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bulkhead_allowlist::Allowlist;
use bulkhead_dataplane::{Config, Event, Node, Now, PeerConfig, Sink};
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

pub struct Host {
    pub name: String,
    pub node: Node,
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
        let lists = allowlists(policy, T0);
        let hosts: Vec<Host> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let key = PrivateKey::generate();
                Host {
                    name: n.to_string(),
                    node: Node::new(key.to_bytes(), flow_capacity),
                    udp: SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16)),
                    key,
                    tun: Vec::new(),
                    dropped: Vec::new(),
                    flows: Vec::new(),
                }
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
