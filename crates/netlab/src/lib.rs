//! A lab of network namespaces joined by a bridge, for tests and the demo that run real daemons,
//! and the probes that send traffic across it.
//!
//! Every namespace, link and process a lab creates is removed when it is dropped, also when the
//! test fails or the demo is interrupted. Traffic stays inside the lab: the underlay is
//! 198.18.0.0/24 (the range RFC 2544 sets aside for benchmarks), on a bridge in a namespace of
//! the lab's own.
//!
//! Setting up a lab panics on failure (it is test equipment); check [`available`] first.

#![forbid(unsafe_code)]

pub mod etcd;
pub mod probe;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, empty directory.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("bulkhead-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file in it and returns its path as a string.
    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether this machine can run namespace tests: root, `ip netns`, `/dev/net/tun`.
pub fn available() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    let ok = Command::new("ip").args(["netns", "list"]).output();
    if !ok.is_ok_and(|o| o.status.success()) {
        return Err("`ip netns` does not work".into());
    }
    Ok(())
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One host of a lab.
#[derive(Debug)]
pub struct Host {
    /// Its name in the test.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its underlay address.
    pub underlay: String,
    /// A directory of its own: state, configuration, logs.
    pub dir: PathBuf,
    /// The TUN interface name its daemon uses (unique on the machine: UAPI sockets are global).
    pub interface: String,
}

/// A set of namespaces on one bridge, and the processes started in them.
#[derive(Debug)]
pub struct Lab {
    id: String,
    hub: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
    children: Vec<(String, Child)>,
    dir: TempDir,
}

impl Lab {
    /// Creates `names.len()` namespaces on a bridge.
    pub fn new(names: &[&str]) -> Lab {
        // Unique per lab on the machine: interface names also name the global UAPI sockets.
        let id = format!("{}x{}", std::process::id() % 100_000, unique());
        let hub = format!("bhhub{id}");
        let dir = TempDir::new("lab");
        let mut lab = Lab {
            id: id.clone(),
            hub: hub.clone(),
            hosts: Vec::new(),
            children: Vec::new(),
            dir,
        };
        must(&["ip", "netns", "add", &hub]);
        must(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let netns = format!("{hub}-{name}");
            must(&["ip", "netns", "add", &netns]);
            let (inner, outer) = ("u0", format!("v{n}"));
            must(&[
                "ip", "-n", &netns, "link", "add", inner, "type", "veth", "peer", "name", &outer,
                "netns", &hub,
            ]);
            must(&[
                "ip", "-n", &hub, "link", "set", &outer, "master", "br0", "up",
            ]);
            let underlay = format!("198.18.0.{n}");
            must(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{underlay}/24"),
                "dev",
                inner,
            ]);
            must(&["ip", "-n", &netns, "link", "set", inner, "up"]);
            must(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
            let dir = lab.dir.path().join(name);
            std::fs::create_dir_all(&dir).expect("host dir");
            lab.hosts.push(Host {
                name: name.to_string(),
                netns,
                underlay,
                dir,
                interface: format!("bh{}{}", lab.id, n),
            });
        }
        lab
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Runs a command in a host's namespace and waits for it.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.host(host).netns];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Starts a long-running command in a host's namespace, with its output in the host's
    /// directory; it is stopped when the lab is dropped.
    pub fn spawn(&mut self, host: &str, label: &str, args: &[&str]) {
        let h = self.host(host);
        let log = std::fs::File::create(h.dir.join(format!("{label}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &h.netns])
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
        self.children.push((format!("{host}/{label}"), child));
    }

    /// Sends a signal to a started process.
    pub fn signal(&self, host: &str, label: &str, sig: &str) {
        let key = format!("{host}/{label}");
        for (k, c) in &self.children {
            if *k == key {
                must(&["kill", &format!("-{sig}"), &c.id().to_string()]);
            }
        }
    }

    /// Waits up to `limit` for a started process to exit; returns its exit code (128 + the
    /// signal if a signal ended it), or `None` if it is still running.
    pub fn wait(&mut self, host: &str, label: &str, limit: Duration) -> Option<i32> {
        let key = format!("{host}/{label}");
        let end = Instant::now() + limit;
        let i = self.children.iter().position(|(k, _)| *k == key)?;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.children[i].1.try_wait() {
                self.children.remove(i);
                use std::os::unix::process::ExitStatusExt;
                return status.code().or_else(|| status.signal().map(|s| 128 + s));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The log of a started process.
    pub fn log(&self, host: &str, label: &str) -> String {
        std::fs::read_to_string(self.host(host).dir.join(format!("{label}.log")))
            .unwrap_or_default()
    }

    /// Polls `check` every 50 ms until it holds or `limit` passes.
    pub fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let end = Instant::now() + Duration::from_secs(3);
        for (_, c) in &mut self.children {
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "delete", &h.netns])
                .status();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", h.interface));
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.hub])
            .status();
    }
}
