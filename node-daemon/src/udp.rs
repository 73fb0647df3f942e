//! The UDP socket WireGuard runs over, through quinn-udp: GRO and recvmmsg on the way in (one
//! receive, many datagrams), GSO on the way out (one send, many datagrams), where the kernel has
//! them.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::socket::{setsockopt, sockopt};
use std::os::fd::AsFd;
use tokio::net::UdpSocket;

/// The socket's send and receive buffers: about 7 MiB each, as wireguard-go's. The kernel's
/// default (about 208 KiB) holds about a millisecond of traffic at a few Gbit/s: any pause of
/// the loop longer than that (a scheduler slice, a handshake) dropped datagrams the peer's TCP
/// then had to send again. Set with SO_RCVBUFFORCE/SO_SNDBUFFORCE (the daemon has
/// CAP_NET_ADMIN), which `net.core.rmem_max` does not cap; without the capability, as large as
/// `rmem_max`/`wmem_max` allow.
pub const SOCKET_BUFFER: usize = 7 << 20;

/// Receives per wake-up; each can bring many datagrams.
const RECEIVES: usize = 8;
/// Buffers per receive: one datagram each, or one GRO run of them.
const BATCH: usize = if quinn_udp::BATCH_SIZE < 8 {
    quinn_udp::BATCH_SIZE
} else {
    8
};

/// The socket, and the buffers it receives into, reused from wake-up to wake-up: receiving
/// allocates nothing.
pub struct Udp {
    socket: UdpSocket,
    state: Arc<quinn_udp::UdpSocketState>,
    bufs: [Vec<u8>; BATCH],
    meta: [quinn_udp::RecvMeta; BATCH],
}

impl std::fmt::Debug for Udp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Udp")
            .field("local", &self.socket.local_addr().ok())
            .field("max_segments", &self.state.max_gso_segments())
            .finish()
    }
}

impl Udp {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Udp> {
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot bind UDP port {}", addr.port()))?;
        // Its datagrams are routed by `main`, never into the tunnel, whatever the peers' addresses
        // (transparent addressing: crate::routing).
        if let Err(e) = socket2::SockRef::from(&socket).set_mark(crate::routing::MARK) {
            tracing::warn!(error = %e, "cannot mark the UDP socket: transparent addressing will not work");
        }
        let (recv, send) = set_buffers(&socket, SOCKET_BUFFER);
        tracing::info!(recv, send, "UDP socket buffers");
        let state = Arc::new(quinn_udp::UdpSocketState::new((&socket).into())?);
        Ok(Udp {
            socket,
            state,
            bufs: std::array::from_fn(|_| vec![0u8; 65536]),
            meta: [quinn_udp::RecvMeta::default(); BATCH],
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits until there may be something to receive.
    pub async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Receives what is waiting, without waiting for more, and hands each datagram to `each`
    /// with its sender. A GRO run is cut back into its datagrams at the kernel's stride. An
    /// error (an ICMP error a peer provoked, say) ends this wake-up's receives and is returned;
    /// the socket is still fine.
    pub fn receive(&mut self, mut each: impl FnMut(SocketAddr, &[u8])) -> std::io::Result<()> {
        for _ in 0..RECEIVES {
            // On the stack: a Vec here would be an allocation per receive.
            let mut slices = self.bufs.each_mut().map(|b| std::io::IoSliceMut::new(b));
            let (socket, state, meta) = (&self.socket, &self.state, &mut self.meta);
            let r = socket.try_io(tokio::io::Interest::READABLE, || {
                state.recv(socket.into(), &mut slices, meta)
            });
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            for (meta, buf) in self.meta.iter().zip(&self.bufs).take(n) {
                let stride = meta.stride.max(1);
                for d in buf[..meta.len].chunks(stride) {
                    each(meta.addr, d);
                }
            }
        }
        Ok(())
    }

    /// A sending end of the socket, for a writer (the loop's, or a worker's).
    pub fn sender(&self) -> std::io::Result<Sender> {
        let fd = self.socket.as_fd().try_clone_to_owned()?;
        Ok(Sender {
            socket: std::net::UdpSocket::from(fd),
            state: self.state.clone(),
        })
    }
}

/// The sending end of the socket: the same socket, through a descriptor of its own, so that a
/// worker thread needs nothing of the loop's runtime.
#[derive(Debug)]
pub struct Sender {
    socket: std::net::UdpSocket,
    state: Arc<quinn_udp::UdpSocketState>,
}

/// How long a send waits for room in a full socket buffer before its datagrams are dropped.
const SEND_WAIT_MS: u16 = 200;

impl Sender {
    /// Most datagrams one send may carry now: quinn-udp turns GSO off (1) when the kernel
    /// refuses a GSO send, so this is asked at every batch, never remembered.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Sends `contents`, cut into datagrams of `segment_size` if given. Waits (a little) while
    /// the socket's buffer is full; other errors drop the datagrams (UDP makes no promise
    /// anyway) and are returned.
    pub fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> std::io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        let mut waited = false;
        loop {
            match self.state.try_send((&self.socket).into(), &t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !waited => {
                    wait_writable(&self.socket, SEND_WAIT_MS);
                    waited = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits until `fd` can be written to, at most `ms` milliseconds. Blocks the thread: the writer
/// thread's, or the loop's with `--threads 1` (as the loop waited for room before).
fn wait_writable(fd: impl AsFd, ms: u16) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Sets the socket's receive and send buffers to `bytes` (forced past the sysctl caps where the
/// daemon may), and returns what the kernel granted (it reports twice what it reserves for
/// payload).
fn set_buffers(socket: &UdpSocket, bytes: usize) -> (usize, usize) {
    let s = socket2::SockRef::from(socket);
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = s.set_recv_buffer_size(bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = s.set_send_buffer_size(bytes);
    }
    (
        s.recv_buffer_size().unwrap_or(0),
        s.send_buffer_size().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_buffers_hold_milliseconds_not_microseconds() {
        let u = Udp::bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let (recv, send) = set_buffers(&u.socket, SOCKET_BUFFER);
        // Forced past net.core.rmem_max (CAP_NET_ADMIN: the tests run as root, as the daemon
        // does); the kernel doubles what it is asked for (room for its bookkeeping).
        assert_eq!(recv, 2 * SOCKET_BUFFER);
        assert_eq!(send, 2 * SOCKET_BUFFER);
        assert!(u.sender().expect("sender").max_segments() >= 1);
    }
}
