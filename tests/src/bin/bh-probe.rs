//! A tiny network probe for the end-to-end tests, run inside a test's network namespace:
//!
//! - `bh-probe listen PORT SECONDS`: accept TCP connections and echo what they send; exit after
//!   SECONDS.
//! - `bh-probe connect ADDR PORT TIMEOUT_MS`: connect, send a line, wait for the echo. Exit 0 if
//!   the echo came back in time, 1 if not.
//!
//! Every loop is bounded in time, so a probe never outlives its test.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "listen" => listen(arg(1).parse().unwrap_or(0), arg(2).parse().unwrap_or(10)),
        "connect" => connect(
            arg(1),
            arg(2).parse().unwrap_or(0),
            arg(3).parse().unwrap_or(1000),
        ),
        _ => {
            eprintln!("usage: bh-probe listen PORT SECONDS | connect ADDR PORT TIMEOUT_MS");
            ExitCode::from(2)
        }
    }
}

fn listen(port: u16, seconds: u64) -> ExitCode {
    let Ok(l) = TcpListener::bind(("0.0.0.0", port)) else {
        eprintln!("bh-probe: cannot listen on {port}");
        return ExitCode::from(2);
    };
    let _ = l.set_nonblocking(true);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        match l.accept() {
            Ok((s, _)) => {
                std::thread::spawn(move || echo(s, end));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    ExitCode::SUCCESS
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

fn connect(addr: &str, port: u16, timeout_ms: u64) -> ExitCode {
    let t = Duration::from_millis(timeout_ms);
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return ExitCode::from(2);
    };
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), t) else {
        return ExitCode::from(1);
    };
    let _ = s.set_read_timeout(Some(t));
    if s.write_all(b"bulkhead probe\n").is_err() {
        return ExitCode::from(1);
    }
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(_) if line == "bulkhead probe\n" => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}
