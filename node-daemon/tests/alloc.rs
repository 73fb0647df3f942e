//! The daemon's packet path allocates nothing once warm. Here, the UDP receive path: datagrams
//! arriving on a loopback socket are received (recvmmsg, GRO) and handed on without a heap
//! allocation. A binary of its own, because it installs a counting global allocator.

#![allow(clippy::unwrap_used)] // test code

use std::time::Duration;

use bulkhead_counting_alloc::{Counting, allocations};
use bulkhead_node::udp::Udp;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sends `n` datagrams of 100 bytes to `udp`, a few at a time (the socket's buffer holds only
/// so many), and receives them; returns the allocations the receiving made.
async fn round(udp: &mut Udp, sender: &std::net::UdpSocket, n: usize) -> usize {
    let to = udp.local_addr().unwrap();
    let (mut got, mut counted) = (0, 0);
    let wait = async {
        for sent in (50..=n).step_by(50) {
            for i in 0..50u8 {
                sender.send_to(&[i; 100], to).unwrap();
            }
            while got < sent {
                udp.readable().await.unwrap();
                counted += allocations(|| {
                    udp.receive(|_, d| {
                        assert_eq!(d.len(), 100);
                        got += 1;
                    })
                    .expect("receive")
                });
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("every datagram arrives");
    counted
}

#[test]
fn receiving_datagrams_allocates_nothing() {
    let one = allocations(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(8))));
    assert_eq!(one, 1, "the counter counts in this binary");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut udp = Udp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        round(&mut udp, &sender, 50).await; // warm-up
        assert_eq!(round(&mut udp, &sender, 500).await, 0);
    });
}
