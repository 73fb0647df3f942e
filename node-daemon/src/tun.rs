//! The TUN device: created with tun-rs and brought up over netlink (rtnetlink). Its address is
//! host configuration (`host.rs`).

use anyhow::{Context, anyhow};
use tun_rs::{AsyncDevice, DeviceBuilder};

/// WireGuard's usual MTU: 1500 minus 80 bytes of outer IPv6, UDP and WireGuard headers.
pub const MTU: u16 = 1420;

/// Packets the kernel may queue for the daemon to read from the device (its "transmit" queue),
/// ten times Linux's default of 500. On a receiver, that queue holds mostly the TCP ACKs of the
/// data the daemon writes; while the loop is busy writing a burst, 500 overflowed (measured: 6,912
/// of 39,888 dropped in one 6 s, 4-stream bench run), and every ACK lost slows the sender.
pub const TX_QUEUE: u32 = 5000;

/// A TUN interface and the netlink handle that configures it.
pub struct Interface {
    /// The device: read by the loop, written by the writer (`writer.rs`).
    pub dev: std::sync::Arc<AsyncDevice>,
    /// Its name.
    pub name: String,
    index: u32,
    netlink: rtnetlink::Handle,
}

impl std::fmt::Debug for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interface")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl Interface {
    /// Creates the interface, up, without an address. It disappears when the process exits.
    pub async fn create(name: &str) -> anyhow::Result<Interface> {
        // Offloads: the kernel hands us TCP segments of up to 64 KiB, split into packets by
        // recv_multiple, and takes coalesced segments from send_multiple, so the kernel's TCP
        // stack sees a few large packets instead of many small ones.
        let dev = DeviceBuilder::new()
            .name(name)
            .mtu(MTU)
            .offload(true)
            .build_async()
            .with_context(|| {
                format!("cannot create TUN interface {name} (is /dev/net/tun there, are we root?)")
            })?;
        let index = dev.if_index().context("TUN interface index")?;
        if let Err(e) = dev.set_tx_queue_len(TX_QUEUE) {
            tracing::warn!(error = %e, "cannot lengthen the TUN device's queue");
        }
        tracing::info!(
            interface = name,
            tcp_gso = dev.tcp_gso(),
            udp_gso = dev.udp_gso(),
            "TUN offloads"
        );
        let (conn, netlink, _) = rtnetlink::new_connection().context("netlink")?;
        tokio::spawn(conn);
        // The overlay is IPv4; keep the kernel from sending IPv6 chatter into the tunnel.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // A new address in the old one's subnet is added before the old one goes (host.rs):
        // promoted, not removed with it.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{name}/promote_secondaries"),
            "1",
        );
        netlink
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| anyhow!("cannot bring {name} up: {e}"))?;
        Ok(Interface {
            dev: std::sync::Arc::new(dev),
            name: name.to_string(),
            index,
            netlink,
        })
    }

    /// Its index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// A handle on the netlink connection that configures it.
    pub fn netlink(&self) -> rtnetlink::Handle {
        self.netlink.clone()
    }
}

/// Buffers for reading the device a batch at a time: one read brings a segment of up to 64 KiB
/// (TSO), which tun-rs splits into packets, one per buffer.
///
/// How many packets one read brings is up to the sender's MSS, which a peer sets: at an MSS of
/// 88 a 64 KiB segment is ~745 packets. tun-rs refuses a segment with more packets than there
/// are buffers, so a refusal grows the buffers (the segment is lost; TCP sends it again) up to
/// the most tun-rs takes. Buffers past the first [`FIRST`] are only used by segments of many
/// small packets, so each is sized for the largest packet a segment that long can have.
#[derive(Debug)]
pub struct Reads {
    segment: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

/// Buffers to start with, each big enough for any packet up to the MTU.
pub const FIRST: usize = tun_rs::IDEAL_BATCH_SIZE;
/// The most buffers one read may be given (tun-rs's limit).
pub const MOST: usize = u16::MAX as usize;
/// Room for the headers of a packet split from a segment: IP and TCP with options, and more.
const HEADERS: usize = 256;
/// What tun-rs says when a segment has more packets than there are buffers. Its error type is
/// private; the text is what it promises to keep.
const TOO_MANY_SEGMENTS: &str = "too many GSO segments";

/// The size of buffer `i`: a segment that reaches it has more than `i` packets, so its packets
/// carry less than 64 KiB / `i` of payload each.
pub fn buffer_size(i: usize) -> usize {
    if i < FIRST { 2048 } else { HEADERS + 65536 / i }
}

impl Default for Reads {
    fn default() -> Reads {
        Reads {
            segment: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535],
            bufs: (0..FIRST).map(|i| vec![0u8; buffer_size(i)]).collect(),
            sizes: vec![0usize; FIRST],
            n: 0,
        }
    }
}

/// What reading a batch came to.
#[derive(Debug)]
pub enum Read {
    /// Packets to handle (possibly none).
    Batch,
    /// The read brought nothing usable (one segment, dropped); the device is fine.
    Dropped(std::io::Error),
    /// The device itself failed.
    Failed(std::io::Error),
}

impl Reads {
    /// Reads the next batch from `dev`. Errors about what was read (a segment tun-rs could not
    /// split) drop that read and say so; only an error of the device itself is a failure.
    pub async fn read(&mut self, dev: &AsyncDevice) -> Read {
        self.n = 0;
        let r = dev
            .recv_multiple(&mut self.segment, &mut self.bufs, &mut self.sizes, 0)
            .await;
        self.took(r)
    }

    /// Reads the next batch if one is waiting, without waiting: `None` if none is.
    pub fn try_read(&mut self, dev: &AsyncDevice) -> Option<Read> {
        self.n = 0;
        let r = dev.try_recv_multiple(&mut self.segment, &mut self.bufs, &mut self.sizes, 0);
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            r => Some(self.took(r)),
        }
    }

    fn took(&mut self, r: std::io::Result<usize>) -> Read {
        match r {
            Ok(n) => {
                self.n = n;
                Read::Batch
            }
            // The read(2) itself failed: the device, not a packet.
            Err(e) if e.raw_os_error().is_some() => Read::Failed(e),
            Err(e) => {
                if e.to_string() == TOO_MANY_SEGMENTS {
                    self.grow();
                }
                Read::Dropped(e)
            }
        }
    }

    /// Four times the buffers, up to [`MOST`].
    fn grow(&mut self) {
        let want = (self.bufs.len() * 4).min(MOST);
        let from = self.bufs.len();
        self.bufs
            .extend((from..want).map(|i| vec![0u8; buffer_size(i)]));
        self.sizes.resize(want, 0);
        tracing::info!(
            buffers = want,
            "TUN reads: more buffers for segments of many packets"
        );
    }

    /// Buffers one read may fill.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// The packets of the last batch.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(&self.sizes)
            .take(self.n)
            .map(|(b, &len)| &b[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tun-rs wants every buffer a segment uses to hold that segment's largest packet: headers
    /// and at most `payload / (packets - 1)` of payload (the last packet may be short).
    #[test]
    fn every_buffer_holds_the_largest_packet_of_any_segment_that_reaches_it() {
        for packets in [FIRST + 1, 745, 1820, 4096, MOST] {
            let payload: usize = 65535 - 40;
            let largest_payload = payload.div_ceil(packets - 1);
            assert!(
                buffer_size(packets - 1) >= 120 + largest_payload,
                "{packets} packets"
            );
        }
        assert!(buffer_size(0) >= usize::from(MTU) + 10);
    }

    #[test]
    fn growing_stops_at_what_tun_rs_takes() {
        let mut r = Reads::default();
        for _ in 0..10 {
            r.grow();
        }
        assert_eq!(r.capacity(), MOST);
        let bytes: usize = r.bufs.iter().map(Vec::len).sum();
        assert!(bytes < 24 << 20, "{bytes} bytes at most");
    }
}
