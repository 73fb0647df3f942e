//! A real etcd server (Debian's `etcd-server`) on loopback, for tests: its own data directory
//! and free ports, stopped and removed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Whether etcd can run here.
pub fn available() -> Result<(), String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("no etcd binary (apt-get install etcd-server)".into()),
    }
}

/// Whether etcd tests can run here. They must, unless BULKHEAD_SKIP_ETCD says otherwise: a test
/// that quietly does nothing would hide a broken setup.
pub fn etcd_ok() -> bool {
    match available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("BULKHEAD_SKIP_ETCD").is_some() => {
            eprintln!("skipping: {why}");
            false
        }
        Err(why) => panic!("etcd tests need etcd: {why} (BULKHEAD_SKIP_ETCD=1 skips them)"),
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One single-member etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    /// `127.0.0.1:PORT` of the client API.
    pub addr: String,
    dir: TempDir,
}

/// One member: its name, client address, peer URL.
struct Member {
    name: String,
    addr: String,
    peer: String,
}

fn spawn_member(dir: &std::path::Path, m: &Member, cluster: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{}.log", m.name))).expect("log");
    Command::new("etcd")
        .args([
            "--name",
            &m.name,
            "--data-dir",
            &dir.join(&m.name).display().to_string(),
            "--listen-client-urls",
            &format!("http://{}", m.addr),
            "--advertise-client-urls",
            &format!("http://{}", m.addr),
            "--listen-peer-urls",
            &m.peer,
            "--initial-advertise-peer-urls",
            &m.peer,
            "--initial-cluster",
            cluster,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start etcd")
}

fn member(name: &str) -> Member {
    Member {
        name: name.to_string(),
        addr: format!("127.0.0.1:{}", free_port()),
        peer: format!("http://127.0.0.1:{}", free_port()),
    }
}

/// A three-member etcd cluster on loopback (fast elections: 50 ms heartbeat, 500 ms timeout).
#[derive(Debug)]
pub struct EtcdCluster {
    children: Vec<Option<Child>>,
    /// Each member's client address, `127.0.0.1:PORT`.
    pub addrs: Vec<String>,
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits until each accepts connections (at most 20 s).
    pub fn start() -> EtcdCluster {
        let dir = TempDir::new("etcd3");
        let members: Vec<Member> = (1..=3).map(|i| member(&format!("m{i}"))).collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let children = members
            .iter()
            .map(|m| Some(spawn_member(dir.path(), m, &cluster)))
            .collect();
        let c = EtcdCluster {
            children,
            addrs: members.iter().map(|m| m.addr.clone()).collect(),
            dir,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if c.addrs
                .iter()
                .all(|a| std::net::TcpStream::connect(a).is_ok())
            {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd cluster did not start");
    }

    /// `etcd://A,B,C`.
    pub fn spec(&self) -> String {
        format!("etcd://{}", self.addrs.join(","))
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The logs of every member.
    pub fn logs(&self) -> String {
        (1..=3)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("m{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

impl Etcd {
    /// Starts etcd on a free port and waits until it answers (at most 20 s).
    pub fn start() -> Etcd {
        Etcd::start_on(&format!("127.0.0.1:{}", free_port()))
    }

    /// Starts etcd with its client API on `addr` (`127.0.0.1:PORT`) and waits until it
    /// answers (at most 20 s).
    pub fn start_on(addr: &str) -> Etcd {
        let dir = TempDir::new("etcd");
        let m = Member {
            addr: addr.to_string(),
            ..member("t")
        };
        let child = spawn_member(dir.path(), &m, &format!("t={}", m.peer));
        let e = Etcd {
            child,
            addr: m.addr,
            dir,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let health = Command::new("etcdctl")
                .args(["--endpoints", &e.addr, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output();
            match health {
                Ok(o) if o.status.success() => return e,
                Ok(_) => {}
                // No etcdctl: fall back to the port accepting connections.
                Err(_) if std::net::TcpStream::connect(&e.addr).is_ok() => return e,
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not start:\n{}", e.log());
    }

    /// The store spec for it: `etcd://127.0.0.1:PORT`.
    pub fn spec(&self) -> String {
        format!("etcd://{}", self.addr)
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("t.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
