//! The daemon's packet path allocates nothing once warm. Here, the UDP receive path: datagrams
//! arriving on a loopback socket are received (recvmmsg, GRO) and handed on without a heap
//! allocation. A binary of its own, because it replaces the global allocator.

#![allow(unsafe_code)] // the counting allocator
#![allow(clippy::unwrap_used)] // test code

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulkhead_node::udp::Udp;

/// Counts the allocations of the threads that asked to be counted: the test harness's own
/// threads allocate as they please.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call goes straight to the system allocator; counting touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How many allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTED.with(|c| c.set(true));
    f();
    COUNTED.with(|c| c.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

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
