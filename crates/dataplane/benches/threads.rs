//! How the core scales with worker threads (issue 16): one node, split into as many shards as
//! worker threads (`shards.rs`), exchanging 1400-byte TCP packets with 8 peers at once, in both
//! directions: its egress encrypts packets read from its TUN device, its ingress decrypts and
//! admits datagrams the peers sent. The main thread plays the daemon's I/O thread: it routes
//! every packet through the node's `Front` and hands batches to the workers, each of which owns
//! one shard and runs it on its own. Crypto-bound: no I/O, no system calls.
//!
//!   cargo bench -p bulkhead-dataplane --bench threads
//!   ROUNDS=31 PACKETS=1000 THREADS="1 2 4" cargo bench -p bulkhead-dataplane --bench threads
//!
//! Each thread count runs twice a round: with the main thread routing while the clock runs (the
//! daemon's shape: on this 2-core machine the router then shares the cores with the workers),
//! and with every packet routed before the clock starts (the workers' scaling alone). Rounds
//! alternate between the thread counts (interleaved, so drift hits each alike); the median of
//! each is printed, with the ratio to the first thread count. Peer keys are chosen so that each
//! shard owns as many peers as the others: with random keys and many peers the shards even out,
//! with 8 they may not. For each it also prints how much of the round the workers were on a CPU
//! (below 100%: they waited for work or for each other) and the throughput per CPU second they
//! used (lower with more threads: each core does less per second when both are busy), which
//! together say where a ratio below the thread count goes.

#![allow(clippy::unwrap_used)] // benchmark code

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bulkhead_dataplane::packet::{build, tcp};
use bulkhead_dataplane::{Config, Front, Node, Now, PeerConfig, Shard, Sink, Ticket};
use bulkhead_policy::{Compiled, Conditions};
use bulkhead_proto::PrivateKey;

const T0: i64 = 1_800_000_000;
const PEERS: usize = 8;
const PAYLOAD: usize = 1360;
/// Packets handed to a worker at once.
const BATCH: usize = 64;

/// Counts what comes out, and keeps datagrams when asked to.
#[derive(Default)]
struct Out {
    keep: bool,
    net: Vec<(SocketAddr, Vec<u8>)>,
    net_packets: usize,
    tun: Vec<Vec<u8>>,
    tun_packets: usize,
}

impl Sink for Out {
    fn to_network(&mut self, to: SocketAddr, d: &[u8]) {
        self.net_packets += 1;
        if self.keep {
            self.net.push((to, d.to_vec()));
        }
    }
    fn to_tun(&mut self, p: &[u8]) {
        self.tun_packets += 1;
        if self.keep {
            self.tun.push(p.to_vec());
        }
    }
}

fn kept() -> Out {
    Out {
        keep: true,
        ..Out::default()
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Node `a` and its peers `p0`..`p7`: a may open tcp/5201 to each.
fn policy() -> String {
    let mut y = String::from(
        "version: 1\nnetwork: { cidr: 10.98.0.0/16 }\nidentities:\n  a: { labels: { app: client } }\n",
    );
    for i in 0..PEERS {
        y += &format!("  p{i}: {{ labels: {{ app: server }} }}\n");
    }
    y +=
        "segments:\n  clients: { match: { app: client } }\n  servers: { match: { app: server } }\n";
    y += "rules:\n  - { name: bench, from: [clients], to: [servers], ports: [tcp/5201] }\n";
    y
}

/// One thread count's node: the front, and a shard per worker; and the peers, whole.
struct Lab {
    front: Front,
    shards: Vec<Node>,
    peers: Vec<Node>,
    a_addr: SocketAddr,
    peer_addrs: Vec<SocketAddr>,
    a_ip: Ipv4Addr,
    peer_ips: Vec<Ipv4Addr>,
    now: Now,
}

/// Keys for `a` and the peers, the peers spread evenly over the shards of every count up to 4.
fn keys() -> (PrivateKey, Vec<PrivateKey>) {
    let a = PrivateKey::generate();
    let mut peers = Vec::new();
    while peers.len() < PEERS {
        let k = PrivateKey::generate();
        let want = peers.len() % 4; // shard of 4 it should land in; so also of 2 and 1
        if Shard::new(want, 4).unwrap().owns(&k.public_key().0) {
            peers.push(k);
        }
    }
    (a, peers)
}

impl Lab {
    fn new(shards: usize, a_key: &PrivateKey, peer_keys: &[PrivateKey]) -> Lab {
        let l = bulkhead_policy::load(&policy(), T0, &BTreeMap::new());
        let m = l.model.unwrap();
        let lists = Compiled::new(&m, m.state(&Conditions::at(T0))).allowlists(&m, 1);
        let a_addr: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let peer_addrs: Vec<SocketAddr> = (0..PEERS)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 2000 + i as u16)))
            .collect();
        let mut configs = BTreeMap::from([(
            "a".to_string(),
            PeerConfig {
                public_key: a_key.public_key().0,
                endpoint: Some(a_addr),
            },
        )]);
        for (i, k) in peer_keys.iter().enumerate() {
            configs.insert(
                format!("p{i}"),
                PeerConfig {
                    public_key: k.public_key().0,
                    endpoint: Some(peer_addrs[i]),
                },
            );
        }
        let config = |name: &str| Config {
            allowlist: lists.iter().find(|l| l.identity == name).unwrap().clone(),
            peers: configs.clone(),
            keepalive: None,
        };
        let now = Now {
            instant: Instant::now(),
            unix: T0,
        };
        let mut front = Front::new(a_key.to_bytes(), shards).unwrap();
        front.apply(&config("a"));
        let mut shard_nodes: Vec<Node> = (0..shards)
            .map(|i| {
                let mut n = Node::shard(a_key.to_bytes(), 65536, Shard::new(i, shards).unwrap());
                n.apply(config("a"), now);
                n
            })
            .collect();
        assert!(
            shard_nodes
                .iter()
                .all(|n| n.peers().len() == PEERS / shards)
        );
        let peers: Vec<Node> = peer_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut n = Node::new(k.to_bytes(), 65536);
                n.apply(config(&format!("p{i}")), now);
                n
            })
            .collect();
        shard_nodes.shrink_to_fit();
        let a_ip = lists.iter().find(|l| l.identity == "a").unwrap().address;
        let peer_ips = (0..PEERS)
            .map(|i| {
                lists
                    .iter()
                    .find(|l| l.identity == format!("p{i}"))
                    .unwrap()
                    .address
            })
            .collect();
        let mut lab = Lab {
            front,
            shards: shard_nodes,
            peers,
            a_addr,
            peer_addrs,
            a_ip,
            peer_ips,
            now,
        };
        lab.connect();
        lab
    }

    /// `a`'s datagrams to where they go, and back, until quiet; what reached a TUN device.
    fn settle(&mut self, mut from_a: Vec<(SocketAddr, Vec<u8>)>) {
        for _ in 0..8 {
            let mut to_a = Vec::new();
            for (to, d) in from_a.drain(..) {
                let i = self.peer_addrs.iter().position(|p| *p == to).unwrap();
                let mut out = kept();
                self.peers[i].handle_udp(self.a_addr, &d, self.now, &mut out);
                to_a.extend(out.net.into_iter().map(|(_, d)| (self.peer_addrs[i], d)));
            }
            for (from, d) in to_a {
                let mut out = kept();
                if let Some((s, t)) = self.front.route_udp(from, &d, self.now, &mut out) {
                    self.shards[s].handle_screened(from, &d, t, self.now, &mut out);
                }
                from_a.extend(out.net);
            }
        }
    }

    /// A TCP connection from `a` to each peer's tcp/5201, handshakes included.
    fn connect(&mut self) {
        for i in 0..PEERS {
            let syn = build::tcp(self.a_ip, self.peer_ips[i], 40000, 5201, tcp::SYN);
            let mut out = kept();
            let s = self.front.route_tun(&syn);
            self.shards[s].handle_tun(&syn, self.now, &mut out);
            self.settle(out.net);
            let synack = build::tcp(
                self.peer_ips[i],
                self.a_ip,
                5201,
                40000,
                tcp::SYN | tcp::ACK,
            );
            let mut out = kept();
            self.peers[i].handle_tun(&synack, self.now, &mut out);
            let to_a: Vec<_> = out.net.into_iter().map(|(_, d)| d).collect();
            let mut out = kept();
            for d in to_a {
                let from = self.peer_addrs[i];
                let (s, t) = self.front.route_udp(from, &d, self.now, &mut out).unwrap();
                self.shards[s].handle_screened(from, &d, t, self.now, &mut out);
            }
            assert_eq!(out.tun.len(), 1, "the SYN-ACK from p{i} reached a");
            let ack = build::tcp(self.a_ip, self.peer_ips[i], 40000, 5201, tcp::ACK);
            let mut out = kept();
            let s = self.front.route_tun(&ack);
            self.shards[s].handle_tun(&ack, self.now, &mut out);
            assert_eq!(out.net.len(), 1, "the ACK to p{i} left a");
        }
    }

    /// A round's work: `n` packets from each peer to `a`, encrypted by the peers (not timed),
    /// and `n` packets from `a` to each peer, interleaved peer by peer.
    fn work(&mut self, n: usize) -> Vec<Item> {
        let mut items = Vec::with_capacity(2 * n * PEERS);
        for _ in 0..n {
            for i in 0..PEERS {
                let mut up = build::tcp(self.a_ip, self.peer_ips[i], 40000, 5201, tcp::ACK);
                up.extend_from_slice(&[0x5a; PAYLOAD]);
                let len = (up.len() as u16).to_be_bytes();
                up[2..4].copy_from_slice(&len);
                items.push(Item::Tun(up));
                let mut down = build::tcp(self.peer_ips[i], self.a_ip, 5201, 40000, tcp::ACK);
                down.extend_from_slice(&[0xa5; PAYLOAD]);
                let len = (down.len() as u16).to_be_bytes();
                down[2..4].copy_from_slice(&len);
                let mut out = kept();
                self.peers[i].handle_tun(&down, self.now, &mut out);
                let (_, d) = out.net.pop().unwrap();
                items.push(Item::Udp(self.peer_addrs[i], d, None));
            }
        }
        items
    }
}

/// A packet for a worker.
enum Item {
    /// Read from the TUN device.
    Tun(Vec<u8>),
    /// Read from the UDP socket; the front's ticket once routed.
    Udp(SocketAddr, Vec<u8>, Option<Ticket>),
}

/// Runs one round: the main thread routes `items` and hands them out in batches; each worker
/// runs its shard. Returns the time taken and the packets written to the network and to the
/// TUN device.
fn round(lab: &mut Lab, items: Vec<Item>, preroute: bool) -> Round {
    let now = lab.now;
    let front = &mut lab.front;
    let shards = &mut lab.shards;
    let mut items = items;
    // Pre-routed: the front's work is done before the clock starts, so only the workers'
    // decrypting, filtering and encrypting is timed.
    let mut routed: Vec<Vec<Vec<Item>>> = (0..shards.len()).map(|_| Vec::new()).collect();
    if preroute {
        let mut sink = Out::default();
        for item in items.drain(..) {
            if let Some((shard, item)) = route(front, item, now, &mut sink) {
                let b = &mut routed[shard];
                if b.last().is_none_or(|l| l.len() == BATCH) {
                    b.push(Vec::with_capacity(BATCH));
                }
                b.last_mut().unwrap().push(item);
            }
        }
    }
    let start = Instant::now();
    let ((net, tun), done) = std::thread::scope(|s| {
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for node in shards.iter_mut() {
            let (tx, rx) = mpsc::sync_channel::<Vec<Item>>(16);
            senders.push(tx);
            workers.push(s.spawn(move || {
                let cpu = thread_cpu();
                let mut out = Out::default();
                // Kept, and freed after the clock stops: the packets were allocated by the main
                // thread, and freeing them here would time the allocator's cross-thread locks,
                // which the daemon's reused inboxes never take.
                let mut done = Vec::new();
                for batch in rx {
                    for item in &batch {
                        match item {
                            Item::Tun(p) => node.handle_tun(p, now, &mut out),
                            Item::Udp(from, d, Some(t)) => {
                                node.handle_screened(*from, d, *t, now, &mut out)
                            }
                            Item::Udp(_, _, None) => {}
                        }
                    }
                    done.push(batch);
                }
                (out.net_packets, out.tun_packets, done, thread_cpu() - cpu)
            }));
        }
        let mut batches: Vec<Vec<Item>> = (0..senders.len())
            .map(|_| Vec::with_capacity(BATCH))
            .collect();
        // Round robin, so that no worker waits while another's queue is filled.
        let mut routed: Vec<_> = routed.into_iter().map(Vec::into_iter).collect();
        loop {
            let mut sent = false;
            for (tx, bs) in senders.iter().zip(routed.iter_mut()) {
                if let Some(b) = bs.next() {
                    tx.send(b).unwrap();
                    sent = true;
                }
            }
            if !sent {
                break;
            }
        }
        let mut sink = Out::default();
        for item in items {
            let Some((shard, item)) = route(front, item, now, &mut sink) else {
                continue;
            };
            batches[shard].push(item);
            if batches[shard].len() == BATCH {
                let full = std::mem::replace(&mut batches[shard], Vec::with_capacity(BATCH));
                senders[shard].send(full).unwrap();
            }
        }
        for (tx, b) in senders.iter().zip(batches) {
            tx.send(b).unwrap();
        }
        drop(senders);
        let mut done = Vec::new();
        let mut counts = (0, 0);
        let mut cpu = Duration::ZERO;
        for w in workers {
            let (n, t, d, c) = w.join().unwrap();
            counts = (counts.0 + n, counts.1 + t);
            cpu += c;
            done.push(d);
        }
        (counts, (done, cpu))
    });
    let took = start.elapsed();
    let (done, cpu) = done;
    drop(done);
    Round {
        took,
        cpu,
        net,
        tun,
    }
}

/// What one round took: wall time, the workers' CPU time, and the packets they wrote.
struct Round {
    took: Duration,
    cpu: Duration,
    net: usize,
    tun: usize,
}

/// The CPU time this thread has used.
fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// The shard an item goes to, with the front's ticket for a datagram; `None` if the front
/// dropped it.
fn route(front: &mut Front, item: Item, now: Now, sink: &mut Out) -> Option<(usize, Item)> {
    match item {
        Item::Tun(p) => Some((front.route_tun(&p), Item::Tun(p))),
        Item::Udp(from, d, _) => {
            let (s, t) = front.route_udp(from, &d, now, sink)?;
            Some((s, Item::Udp(from, d, Some(t))))
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs bench targets once with no `--bench`: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    // 1,000 packets each way per peer is 22 MB a round: it stays in the cache, as the daemon's
    // reused inboxes do. With 10,000 (224 MB) both threads stream from memory, and on the
    // benchmark machine the ratio fell from 1.87x to 1.65x (pre-routed).
    let rounds = env("ROUNDS", if quick { 1 } else { 21 });
    let packets = env("PACKETS", if quick { 200 } else { 1_000 });
    let threads: Vec<usize> = std::env::var("THREADS")
        .unwrap_or_else(|_| "1 2".to_string())
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let (a_key, peer_keys) = keys();
    let mut labs: Vec<Lab> = threads
        .iter()
        .map(|&t| Lab::new(t, &a_key, &peer_keys))
        .collect();
    // Per thread count: routed on the main thread while timed, and pre-routed.
    let modes = [false, true];
    let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); threads.len() * modes.len()];
    // The workers' CPU time over the wall time of their threads, and Gbit/s per CPU second.
    let mut busy: Vec<Vec<f64>> = vec![Vec::new(); threads.len() * modes.len()];
    let mut per_cpu: Vec<Vec<f64>> = vec![Vec::new(); threads.len() * modes.len()];
    let payload_bytes = 2 * packets * PEERS * (PAYLOAD + 40);
    for r in 0..rounds {
        for k in 0..gbits.len() {
            let (lab, preroute) = (&mut labs[k / modes.len()], modes[k % modes.len()]);
            let items = lab.work(packets);
            let Round {
                took,
                cpu,
                net,
                tun,
            } = round(lab, items, preroute);
            // Every packet went through: each egress packet encrypted and sent, each ingress
            // packet admitted.
            assert_eq!(
                tun,
                packets * PEERS,
                "every packet from the peers was admitted"
            );
            assert_eq!(net, packets * PEERS, "every packet to the peers was sent");
            let g = payload_bytes as f64 * 8.0 / took.as_secs_f64() / 1e9;
            gbits[k].push(g);
            let t = threads[k / modes.len()] as f64;
            busy[k].push(cpu.as_secs_f64() / (t * took.as_secs_f64()));
            per_cpu[k].push(payload_bytes as f64 * 8.0 / cpu.as_secs_f64() / 1e9);
            if !quick {
                println!(
                    "round {r} threads {} {}: {:.3} Gbit/s ({:.1} ms)",
                    threads[k / modes.len()],
                    mode_name(preroute),
                    g,
                    took.as_secs_f64() * 1e3
                );
            }
        }
    }
    println!(
        "threads: {} peers, {} packets of {} bytes each way per peer per round, {} rounds",
        PEERS,
        packets,
        PAYLOAD + 40,
        rounds
    );
    for (mi, preroute) in modes.into_iter().enumerate() {
        let base = median(&mut gbits[mi].clone());
        for (ti, t) in threads.iter().enumerate() {
            let k = ti * modes.len() + mi;
            let m = median(&mut gbits[k]);
            println!(
                "  {t} worker thread(s), {}: median {m:.3} Gbit/s, {:.2}x {} thread(s) ({:?})",
                mode_name(preroute),
                m / base,
                threads[0],
                gbits[k]
                    .iter()
                    .map(|g| format!("{g:.3}"))
                    .collect::<Vec<_>>()
            );
            println!(
                "      workers on CPU {:.0}% of the round, {:.3} Gbit/s per CPU second (medians)",
                100.0 * median(&mut busy[k]),
                median(&mut per_cpu[k])
            );
        }
    }
    let last = labs.len() - 1;
    let ns = front_only(&mut labs[last], packets, rounds.min(5));
    println!(
        "  the front alone ({} shards): {ns:.0} ns a packet, {:.1} M packets/s, {:.0} Gbit/s of \
         1400-byte packets",
        threads[last],
        1e3 / ns,
        1400.0 * 8.0 / ns
    );
}

/// The front alone: what one routing thread costs per packet, which bounds how many workers it
/// can feed (the daemon's loop adds its reads and one copy per packet).
fn front_only(lab: &mut Lab, packets: usize, rounds: usize) -> f64 {
    let mut ns = Vec::new();
    for _ in 0..rounds {
        let items = lab.work(packets);
        let n = items.len();
        let mut sink = Out::default();
        let start = Instant::now();
        let routed: Vec<_> = items
            .into_iter()
            .filter_map(|i| route(&mut lab.front, i, lab.now, &mut sink))
            .collect();
        let took = start.elapsed();
        assert_eq!(routed.len(), n);
        ns.push(took.as_secs_f64() * 1e9 / n as f64);
    }
    median(&mut ns)
}

fn mode_name(preroute: bool) -> &'static str {
    if preroute {
        "pre-routed"
    } else {
        "routed while timed"
    }
}
