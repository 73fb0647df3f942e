//! A real etcd server (Debian's `etcd-server`) on loopback, for tests: its own data directory
//! and free ports, stopped and removed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
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

fn free_port() -> u16 {
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

impl Etcd {
    /// Starts etcd and waits until it answers (at most 20 s).
    pub fn start() -> Etcd {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let addr = format!("127.0.0.1:{client}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let child = Command::new("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                &dir.path().join("data").display().to_string(),
                "--listen-client-urls",
                &format!("http://{addr}"),
                "--advertise-client-urls",
                &format!("http://{addr}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let e = Etcd { child, addr, dir };
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
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
