//! The UDP socket WireGuard runs over, through quinn-udp: GRO and recvmmsg on the way in (one
//! receive, many datagrams), GSO on the way out (one send, many datagrams), where the kernel has
//! them.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::UdpSocket;

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
    state: quinn_udp::UdpSocketState,
    max_segments: usize,
    bufs: [Vec<u8>; BATCH],
    meta: [quinn_udp::RecvMeta; BATCH],
}

impl std::fmt::Debug for Udp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Udp")
            .field("local", &self.socket.local_addr().ok())
            .field("max_segments", &self.max_segments)
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
        let state = quinn_udp::UdpSocketState::new((&socket).into())?;
        let max_segments = state.max_gso_segments().max(1);
        Ok(Udp {
            socket,
            state,
            max_segments,
            bufs: std::array::from_fn(|_| vec![0u8; 65536]),
            meta: [quinn_udp::RecvMeta::default(); BATCH],
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Most datagrams one send may carry.
    pub fn max_segments(&self) -> usize {
        self.max_segments
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

    /// Sends `contents`, cut into datagrams of `segment_size` if given. Waits while the socket
    /// is full; other errors drop the datagrams (UDP makes no promise anyway) and are returned.
    pub async fn send(
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
        loop {
            let r = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &t)
            });
            match r {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.socket.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
