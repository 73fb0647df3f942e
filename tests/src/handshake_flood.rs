//! `bh-probe handshake-flood ADDR:PORT PUBLIC_KEY COUNT SECONDS [PER_SECOND]`: sends COUNT
//! WireGuard handshake initiations to a node, from keys that are not its peers, round-robin
//! over a few distinct ones, at most PER_SECOND a second (default: as fast as the socket takes
//! them), stopping early after SECONDS; prints how many were sent. Each has a valid
//! mac1 (all it takes is the node's public key), so the node must count it, and past its
//! limit answer it with a cookie: what an attacker who knows a node's key can make it do.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Distinct initiations sent round-robin.
const DISTINCT: u8 = 16;

/// Runs the probe; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let (Ok(to), Ok(key)) = (
        arg(1).parse::<SocketAddr>(),
        bulkhead_proto::PublicKey::from_base64(arg(2)),
    ) else {
        eprintln!("usage: probe handshake-flood ADDR:PORT PUBLIC_KEY COUNT SECONDS");
        return 2;
    };
    let count: u64 = arg(3).parse().unwrap_or(0);
    let limit = Duration::from_secs(arg(4).parse().unwrap_or(5));
    let rate: Option<u64> = arg(5).parse().ok().filter(|r| *r > 0);
    let inits: Vec<Vec<u8>> = (1..=DISTINCT)
        .filter_map(|i| {
            let mut t = Tunn::new(
                StaticSecret::from([i; 32]),
                PublicKey::from(key.0),
                None,
                None,
                u32::from(i),
                None,
            );
            let mut buf = [0u8; 256];
            match t.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                _ => None,
            }
        })
        .collect();
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return 2;
    };
    let start = Instant::now();
    let mut sent = 0u64;
    for i in 0..count {
        if i % 100 == 0 {
            if start.elapsed() >= limit {
                break;
            }
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        if sock.send_to(&inits[i as usize % inits.len()], to).is_ok() {
            sent += 1;
        }
    }
    println!("{sent} sent");
    0
}
