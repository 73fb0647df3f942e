//! Traffic probes, run inside a lab's namespaces (by `bh-probe` in the tests and by the hidden
//! `bulkhead probe` in the demo):
//!
//! - `listen PORT[,PORT…] SECONDS`: accept TCP connections on every port and echo what they
//!   send; exit after SECONDS.
//! - `connect ADDR PORT TIMEOUT_MS`: connect, send a line, wait for the echo. Exit 0 if the echo
//!   came back in time, 1 if not.
//! - `hold ADDR PORT SECONDS`: open one connection and exchange a line on it every 20 ms for
//!   SECONDS. Exit 0 if every exchange worked; else print `broken after MS ms at UNIX_MS` and
//!   exit 1.
//! - `scan ADDR FIRST LAST TIMEOUT_MS`: try a TCP connection to every port from FIRST to LAST,
//!   16 at a time, each bounded by TIMEOUT_MS; print how many connected. Exit 0.
//! - `flood ADDR COUNT SECONDS [PER_SECOND]`: send COUNT one-byte UDP datagrams from one
//!   socket to ADDR, cycling the destination port over 1–65535 (each a distinct flow), at most
//!   PER_SECOND a second (default: as fast as the socket takes them), stopping early after
//!   SECONDS; print how many were sent. Exit 0.
//! - `serve PORT BYTES SECONDS`: accept TCP connections and send each BYTES of a fixed pattern,
//!   then close it; exit after SECONDS.
//! - `fetch ADDR PORT BYTES SECONDS`: connect and read to the end, for at most SECONDS; print
//!   how many bytes came. Exit 0 if exactly BYTES came and every one was the pattern's, else 1.
//!
//! Every loop is bounded in time, so a probe never outlives its caller by more than SECONDS.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Runs a probe command; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "listen" => {
            let ports: Vec<u16> = arg(1).split(',').filter_map(|p| p.parse().ok()).collect();
            listen(&ports, Duration::from_secs(arg(2).parse().unwrap_or(10)))
        }
        "scan" => match arg(1).parse::<IpAddr>() {
            Ok(ip) => {
                let (first, last) = (arg(2).parse().unwrap_or(1), arg(3).parse().unwrap_or(0));
                let open = scan(
                    ip,
                    first,
                    last,
                    Duration::from_millis(arg(4).parse().unwrap_or(300)),
                );
                println!("{open} open");
                0
            }
            Err(_) => 2,
        },
        "flood" => match arg(1).parse::<IpAddr>() {
            Ok(ip) => {
                let sent = flood(
                    ip,
                    arg(2).parse().unwrap_or(0),
                    Duration::from_secs(arg(3).parse().unwrap_or(5)),
                    arg(4).parse().ok(),
                );
                println!("{sent} sent");
                0
            }
            Err(_) => 2,
        },
        "serve" => serve(
            arg(1).parse().unwrap_or(0),
            arg(2).parse().unwrap_or(0),
            Duration::from_secs(arg(3).parse().unwrap_or(10)),
        ),
        "fetch" => match arg(1).parse::<IpAddr>() {
            Ok(ip) => {
                let want = arg(3).parse().unwrap_or(0);
                let (got, intact) = fetch(
                    ip,
                    arg(2).parse().unwrap_or(0),
                    Duration::from_secs(arg(4).parse().unwrap_or(10)),
                );
                println!("{got} bytes, intact: {intact}");
                u8::from(!(got == want && intact))
            }
            Err(_) => 2,
        },
        "connect" => match arg(1).parse::<IpAddr>() {
            Ok(ip) => u8::from(!connect(
                ip,
                arg(2).parse().unwrap_or(0),
                Duration::from_millis(arg(3).parse().unwrap_or(1000)),
            )),
            Err(_) => 2,
        },
        "hold" => match arg(1).parse::<IpAddr>() {
            Ok(ip) => {
                match hold(
                    ip,
                    arg(2).parse().unwrap_or(0),
                    Duration::from_secs(arg(3).parse().unwrap_or(10)),
                ) {
                    Ok(()) => 0,
                    Err(b) => {
                        println!(
                            "broken after {} ms at {}",
                            b.after.as_millis(),
                            b.at_unix_ms
                        );
                        1
                    }
                }
            }
            Err(_) => 2,
        },
        _ => {
            eprintln!(
                "usage: probe listen PORT[,PORT...] SECONDS | connect ADDR PORT TIMEOUT_MS | hold ADDR PORT SECONDS | scan ADDR FIRST LAST TIMEOUT_MS | flood ADDR COUNT SECONDS | serve PORT BYTES SECONDS | fetch ADDR PORT BYTES SECONDS"
            );
            2
        }
    }
}

/// Echoes on every port until `limit` passes. Exit code 2 if a port cannot be bound.
pub fn listen(ports: &[u16], limit: Duration) -> u8 {
    let mut listeners = Vec::new();
    for &port in ports {
        let Ok(l) = TcpListener::bind(("0.0.0.0", port)) else {
            eprintln!("probe: cannot listen on {port}");
            return 2;
        };
        let _ = l.set_nonblocking(true);
        listeners.push(l);
    }
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let mut idle = true;
        for l in &listeners {
            if let Ok((s, _)) = l.accept() {
                idle = false;
                std::thread::spawn(move || echo(s, end));
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    0
}

fn echo(s: TcpStream, end: Instant) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(_) => continue,
        }
    }
}

/// One exchange on a new connection, within `timeout` for the connect and again for the echo.
pub fn connect(ip: IpAddr, port: u16, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(b"bulkhead probe\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line == "bulkhead probe\n"
}

/// When a held connection stopped working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken {
    /// Since the hold started, to the send of the first exchange that failed.
    pub after: Duration,
    /// That send, in Unix milliseconds (to compare with when a change was made).
    pub at_unix_ms: u128,
}

/// Tries every port from `first` to `last` (at most 1,024 of them), 16 at a time; returns how
/// many accepted.
pub fn scan(ip: IpAddr, first: u16, last: u16, timeout: Duration) -> usize {
    let ports: Vec<u16> = (first..=last).take(1024).collect();
    ports
        .chunks(16)
        .map(|group| {
            std::thread::scope(|s| {
                let hs: Vec<_> = group
                    .iter()
                    .map(|&p| {
                        s.spawn(move || {
                            TcpStream::connect_timeout(&SocketAddr::new(ip, p), timeout).is_ok()
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or(false))
                    .filter(|ok| *ok)
                    .count()
            })
        })
        .sum()
}

/// Sends `count` one-byte datagrams to `ip`, destination ports 1, 2, … 65535, 1, …, for at
/// most `limit` and at most `per_second` a second; returns how many the socket took.
pub fn flood(ip: IpAddr, count: u64, limit: Duration, per_second: Option<u64>) -> u64 {
    let any: IpAddr = if ip.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let Ok(sock) = UdpSocket::bind(SocketAddr::new(any, 0)) else {
        return 0;
    };
    let start = Instant::now();
    let mut sent = 0;
    for i in 0..count {
        if i % 100 == 0 {
            if start.elapsed() >= limit {
                break;
            }
            if let Some(rate) = per_second.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let port = (i % 65535) as u16 + 1;
        if sock.send_to(b"x", SocketAddr::new(ip, port)).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// The byte at `offset` of what `serve` sends: not constant, so a lost or repeated chunk
/// shows.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Sends `bytes` of the pattern on every connection accepted until `limit` passes. Exit code 2
/// if the port cannot be bound.
pub fn serve(port: u16, bytes: u64, limit: Duration) -> u8 {
    let Ok(l) = TcpListener::bind(("0.0.0.0", port)) else {
        eprintln!("probe: cannot listen on {port}");
        return 2;
    };
    let _ = l.set_nonblocking(true);
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match l.accept() {
            Ok((s, _)) => {
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                    let mut s = s;
                    let mut chunk = [0u8; 16384];
                    let mut sent = 0;
                    while sent < bytes && Instant::now() < end {
                        let n = chunk.len().min((bytes - sent) as usize);
                        for (i, b) in chunk[..n].iter_mut().enumerate() {
                            *b = pattern(sent + i as u64);
                        }
                        match s.write(&chunk[..n]) {
                            Ok(w) => sent += w as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => return,
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    0
}

/// Reads one connection to its end, for at most `limit`; returns the bytes read and whether
/// each was the pattern's.
pub fn fetch(ip: IpAddr, port: u16, limit: Duration) -> (u64, bool) {
    use std::io::Read;
    let end = Instant::now() + limit;
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2))
    else {
        return (0, false);
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let (mut got, mut intact) = (0u64, true);
    let mut buf = [0u8; 16384];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                intact &= buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(got + i as u64));
                got += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    (got, intact)
}

/// Keeps one connection busy for `limit`; `Err` when an exchange fails (500 ms each).
pub fn hold(ip: IpAddr, port: u16, limit: Duration) -> Result<(), Broken> {
    let start = Instant::now();
    let broken = |sent: Instant| Broken {
        after: sent - start,
        at_unix_ms: std::time::SystemTime::now()
            .checked_sub(sent.elapsed())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis()),
    };
    let t = Duration::from_millis(500);
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), t) else {
        return Err(broken(start));
    };
    let _ = s.set_read_timeout(Some(t));
    let Ok(r) = s.try_clone() else {
        return Err(broken(start));
    };
    let mut r = BufReader::new(r);
    let mut line = String::new();
    while start.elapsed() < limit {
        let sent = Instant::now();
        line.clear();
        let ok =
            s.write_all(b"hold\n").is_ok() && r.read_line(&mut line).is_ok() && line == "hold\n";
        if !ok {
            return Err(broken(sent));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
