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
    tls: bool,
}

/// One member: its name, client address, peer URL.
struct Member {
    name: String,
    addr: String,
    peer: String,
}

/// Files for an etcd that speaks TLS to its clients and wants their certificates.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed client certificates (`--trusted-ca-file`).
    pub ca: PathBuf,
    /// The server's certificate and key, PEM.
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
}

fn spawn_member(dir: &std::path::Path, m: &Member, cluster: &str, tls: Option<&Tls>) -> Child {
    let log = std::fs::File::create(dir.join(format!("{}.log", m.name))).expect("log");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut tls_args = Vec::new();
    if let Some(t) = tls {
        tls_args = vec![
            "--cert-file".to_string(),
            t.cert.display().to_string(),
            "--key-file".to_string(),
            t.key.display().to_string(),
            "--trusted-ca-file".to_string(),
            t.ca.display().to_string(),
            "--client-cert-auth".to_string(),
        ];
    }
    Command::new("etcd")
        .args(tls_args)
        .args([
            "--name",
            &m.name,
            "--data-dir",
            &dir.join(&m.name).display().to_string(),
            "--listen-client-urls",
            &format!("{scheme}://{}", m.addr),
            "--advertise-client-urls",
            &format!("{scheme}://{}", m.addr),
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
            .map(|m| Some(spawn_member(dir.path(), m, &cluster, None)))
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
        Etcd::start_with(addr, None)
    }

    /// Starts etcd on a free port speaking only TLS to clients, and refusing any client without
    /// a certificate signed by `tls.ca` (`--client-cert-auth`); waits until it accepts
    /// connections (at most 20 s).
    pub fn start_tls(tls: &Tls) -> Etcd {
        Etcd::start_with(&format!("127.0.0.1:{}", free_port()), Some(tls))
    }

    fn start_with(addr: &str, tls: Option<&Tls>) -> Etcd {
        let dir = TempDir::new("etcd");
        let m = Member {
            addr: addr.to_string(),
            ..member("t")
        };
        let child = spawn_member(dir.path(), &m, &format!("t={}", m.peer), tls);
        let e = Etcd {
            child,
            addr: m.addr,
            dir,
            tls: tls.is_some(),
        };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if tls.is_some() {
                // etcdctl would need a client certificate: the port accepting is enough, the
                // client's first request waits for the member to be ready.
                if std::net::TcpStream::connect(&e.addr).is_ok()
                    && e.log().contains("ready to serve")
                {
                    return e;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
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

    /// The store spec for it: `etcd://127.0.0.1:PORT`, or `etcds://…` with TLS.
    pub fn spec(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.addr)
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

/// Certificates for a TLS etcd test, written into a directory: a CA, a server certificate for
/// 127.0.0.1 and localhost, a client certificate from the same CA, and one from another CA.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// What the server is started with.
    pub server: Tls,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// A client certificate and key (PEM) that the server trusts.
    pub client: (String, String),
    /// A client certificate and key (PEM) from another CA, which the server must refuse.
    pub stranger: (String, String),
    /// The directory the files are in (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`).
    pub dir: PathBuf,
}

/// A CA: its certificate and an issuer for what it signs.
fn test_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("CA certificate");
    (cert.pem(), rcgen::Issuer::new(p, key))
}

/// A leaf certificate and its key, PEM.
fn test_leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    cn: &str,
    names: &[&str],
    usages: &[rcgen::ExtendedKeyUsagePurpose],
) -> (String, String) {
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, cn.to_string());
    p.extended_key_usages = usages.to_vec();
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let cert = p.signed_by(&key, issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &std::path::Path) -> TestPki {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let (ca_pem, issuer) = test_ca("etcd test CA");
        // One certificate for both roles, as etcd's own guide makes them: etcd also connects
        // to itself (its gRPC gateway) with it.
        let server = test_leaf(
            &issuer,
            "etcd",
            &["127.0.0.1", "localhost"],
            &[ServerAuth, ClientAuth],
        );
        let client = test_leaf(&issuer, "bulkhead", &[], &[ClientAuth]);
        let (_, other) = test_ca("another CA");
        let stranger = test_leaf(&other, "bulkhead", &[], &[ClientAuth]);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write a test certificate");
            p
        };
        write("client.pem", &client.0);
        write("client.key", &client.1);
        TestPki {
            server: Tls {
                ca: write("ca.pem", &ca_pem),
                cert: write("server.pem", &server.0),
                key: write("server.key", &server.1),
            },
            ca_pem,
            client,
            stranger,
            dir: dir.to_path_buf(),
        }
    }
}
