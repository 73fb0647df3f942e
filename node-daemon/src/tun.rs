//! The TUN device: created with tun-rs and brought up over netlink (rtnetlink). Its address is
//! host configuration (`host.rs`).

use anyhow::{Context, anyhow};
use tun_rs::{AsyncDevice, DeviceBuilder};

/// WireGuard's usual MTU: 1500 minus 80 bytes of outer IPv6, UDP and WireGuard headers.
pub const MTU: u16 = 1420;

/// A TUN interface and the netlink handle that configures it.
pub struct Interface {
    /// The device.
    pub dev: AsyncDevice,
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
            dev,
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
/// (TSO), which tun-rs splits into packets.
#[derive(Debug)]
pub struct Reads {
    segment: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl Default for Reads {
    fn default() -> Reads {
        Reads {
            segment: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE],
            sizes: vec![0usize; tun_rs::IDEAL_BATCH_SIZE],
            n: 0,
        }
    }
}

impl Reads {
    /// Reads the next batch from `dev`.
    pub async fn read(&mut self, dev: &AsyncDevice) -> std::io::Result<()> {
        self.n = 0;
        self.n = dev
            .recv_multiple(&mut self.segment, &mut self.bufs, &mut self.sizes, 0)
            .await?;
        Ok(())
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
