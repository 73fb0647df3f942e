//! The WireGuard cross-platform userspace API (wireguard.com/xplatform) on
//! `/var/run/wireguard/<interface>.sock`, so that `wg show` works.
//!
//! `get=1` is answered in full. `set=1` is refused with `errno=1` (EPERM): the controller owns the
//! configuration, and a node must not add peers or allowed IPs behind its back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_dataplane::PeerStatus;
use bulkhead_proto::{PrivateKey, PublicKey};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// The directory `wg` looks in.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The socket path of an interface.
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// What the interface looks like, for a `get`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The node's private key; `wg` derives the public key from it.
    pub private_key: PrivateKey,
    /// The UDP port.
    pub listen_port: u16,
    /// The peers with tunnels.
    pub peers: Vec<PeerStatus>,
}

/// Formats a `get=1` answer.
pub fn format_get(s: &Snapshot, now: SystemTime) -> String {
    let mut out = format!(
        "private_key={}\nlisten_port={}\n",
        s.private_key.to_hex(),
        s.listen_port
    );
    for p in &s.peers {
        out += &format!("public_key={}\n", PublicKey(p.public_key).to_hex());
        if let Some(e) = p.endpoint {
            out += &format!("endpoint={}\n", endpoint(e));
        }
        out += &format!("allowed_ip={}/32\n", p.address);
        let (sec, nsec) = match p.since_handshake.and_then(|d| now.checked_sub(d)) {
            Some(t) => {
                let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
                (d.as_secs(), d.subsec_nanos())
            }
            None => (0, 0),
        };
        out += &format!(
            "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\ntx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}\nprotocol_version=1\n",
            p.tx_bytes,
            p.rx_bytes,
            p.keepalive.unwrap_or(0)
        );
    }
    out += "errno=0\n\n";
    out
}

fn endpoint(e: SocketAddr) -> String {
    match e {
        SocketAddr::V4(v) => v.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

/// A request from a UAPI connection to the daemon's loop.
pub type GetRequest = oneshot::Sender<String>;

/// Binds the socket, replacing a stale one, and serves connections: each `get` is answered by
/// the daemon loop through `requests`.
pub fn serve(interface: &str, requests: mpsc::Sender<GetRequest>) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(SOCKET_DIR)?;
    let path = socket_path(interface);
    // The TUN interface was created first, so no live daemon owns this name: the file is stale.
    let _ = std::fs::remove_file(&path);
    // Bound in a directory only root can enter, made 0600 there, then moved into place: the
    // socket is never reachable with the umask's permissions, not even for an instant.
    let staging = Path::new(SOCKET_DIR).join(format!(".{interface}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    bulkhead_proto::private::create_dir(&staging)?;
    let bound = staging.join("sock");
    let listener = UnixListener::bind(&bound)?;
    std::fs::set_permissions(&bound, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(&bound, &path)?;
    let _ = std::fs::remove_dir(&staging);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, requests).await {
                    tracing::debug!(error = %e, "uapi connection");
                }
            });
        }
    });
    Ok(path)
}

/// Most bytes one connection may send: `wg` sends a few dozen per request; a `set` with many
/// peers fits too. Past it, the connection reads as ended, so a request without a newline
/// cannot grow a line without bound.
const MAX_CONNECTION_BYTES: u64 = 64 * 1024;

async fn connection(stream: UnixStream, requests: mpsc::Sender<GetRequest>) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_CONNECTION_BYTES)).lines();
    while let Some(first) = lines.next_line().await? {
        // Read the rest of the request, up to its blank line, bounded.
        let mut n = 0;
        while let Some(l) = lines.next_line().await? {
            n += 1;
            if l.is_empty() || n > 10_000 {
                break;
            }
        }
        let answer = match first.as_str() {
            "get=1" => {
                let (tx, rx) = oneshot::channel();
                requests.send(tx).await?;
                rx.await?
            }
            "set=1" => "errno=1\n\n".to_string(),
            _ => "errno=22\n\n".to_string(),
        };
        w.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}

/// Asks a running daemon for its state, as `wg` would.
pub async fn get(interface: &str) -> anyhow::Result<String> {
    let path = socket_path(interface);
    let mut s = UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (is bulkheadd running for {interface}?)",
            path.display()
        )
    })?;
    s.write_all(b"get=1\n\n").await?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 || line == "\n" {
            break;
        }
        out += &line;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_bounded_even_without_a_newline() {
        let (client, server) = UnixStream::pair().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let serving = tokio::spawn(connection(server, tx));
        // 1 MiB without a newline, written while the server reads.
        let writing = tokio::spawn(async move {
            let mut client = client;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            client
        });
        let done = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(
            done.is_ok(),
            "the connection ends after 64 KiB, not at a newline"
        );
        drop(writing);
    }

    #[test]
    fn get_follows_the_protocol() {
        let k = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let s = Snapshot {
            private_key: k.clone(),
            listen_port: 51820,
            peers: vec![PeerStatus {
                name: "db".into(),
                public_key: peer.0,
                address: "10.0.0.2".parse().unwrap(),
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                since_handshake: Some(Duration::from_secs(5)),
                tx_bytes: 10,
                rx_bytes: 20,
                keepalive: None,
                sent: Default::default(),
                received: Default::default(),
                flows: Default::default(),
                handshakes: 1,
            }],
        };
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let text = format_get(&s, now);
        let want = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=192.0.2.1:51820\nallowed_ip=10.0.0.2/32\nlast_handshake_time_sec=995\nlast_handshake_time_nsec=0\ntx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=0\nprotocol_version=1\nerrno=0\n\n",
            k.to_hex(),
            peer.to_hex()
        );
        assert_eq!(text, want);
    }
}
