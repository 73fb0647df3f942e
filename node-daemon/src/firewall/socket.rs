//! The nf_tables netlink socket: sends a batch, waits for every acknowledgement.

use std::io;
use std::time::Duration;

use bulkhead_hostfw::counters::{self, Counted};
use bulkhead_hostfw::encode::{self, Batch};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_NETFILTER};

/// How long the kernel may take to answer a batch.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a question the daemon's loop asks in passing (does a table exist, its counters)
/// may take: the loop also moves packets, so it gives up rather than wait.
const QUICK: Duration = Duration::from_millis(250);
const NLMSG_ERROR: u16 = 2;

/// An open nf_tables socket. Tables created through it with the owner flag live as long as it.
pub struct Nftables {
    socket: TokioSocket,
    seq: u32,
}

impl std::fmt::Debug for Nftables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nftables").field("seq", &self.seq).finish()
    }
}

impl Nftables {
    /// Opens and binds a socket.
    pub fn open() -> io::Result<Nftables> {
        let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
        socket.socket_mut().bind_auto()?;
        // Answers to a large batch (one per message) must not be lost.
        socket.socket_ref().set_rx_buf_sz(1 << 20)?;
        Ok(Nftables { socket, seq: 1 })
    }

    /// Sends the batch `make` builds from the next sequence number; returns once the kernel
    /// has answered every message, with the first error it reported, if any. The kernel
    /// applies a batch whole or not at all.
    pub async fn run(&mut self, make: impl FnOnce(u32) -> Batch) -> io::Result<()> {
        self.run_within(ANSWER_WITHIN, make).await
    }

    /// [`Nftables::run`], giving the kernel `limit` to answer.
    async fn run_within(
        &mut self,
        limit: Duration,
        make: impl FnOnce(u32) -> Batch,
    ) -> io::Result<()> {
        let batch = make(self.seq);
        self.seq = self.seq.wrapping_add(batch.acks.len() as u32 + 2);
        self.socket.send(&batch.bytes).await?;
        let mut waiting: std::collections::HashSet<u32> = batch.acks.iter().copied().collect();
        let mut first_error = None;
        let answered = tokio::time::timeout(limit, async {
            while !waiting.is_empty() {
                let (datagram, _) = self.socket.recv_from_full().await?;
                for (seq, errno) in answers(&datagram) {
                    if waiting.remove(&seq) && errno != 0 && first_error.is_none() {
                        first_error = Some(io::Error::from_raw_os_error(-errno));
                    }
                }
            }
            Ok::<(), io::Error>(())
        })
        .await;
        match answered {
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "nf_tables did not answer",
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => first_error.map_or(Ok(()), Err),
        }
    }
}

impl Nftables {
    /// Whether `table` exists.
    pub async fn exists(&mut self, table: &str) -> io::Result<bool> {
        match self
            .run_within(QUICK, |seq| encode::probe(table, seq))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(2) => Ok(false), // ENOENT
            Err(e) => Err(e),
        }
    }

    /// The counted rules of `table` (none if it does not exist).
    pub async fn counters(&mut self, table: &str) -> io::Result<Vec<Counted>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.socket
            .send(&counters::dump_request(table, seq))
            .await?;
        let mut out = Vec::new();
        tokio::time::timeout(QUICK, async {
            loop {
                let (datagram, _) = self.socket.recv_from_full().await?;
                if answers(&datagram)
                    .iter()
                    .any(|&(s, errno)| s == seq && errno != 0)
                {
                    // ENOENT: no such table.
                    return Ok::<(), io::Error>(());
                }
                let (counted, done) = counters::parse_dump(&datagram);
                out.extend(counted);
                if done {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nf_tables did not answer"))??;
        Ok(out)
    }
}

/// `(sequence number, errno)` of each acknowledgement or error in a datagram; errno 0 is an
/// acknowledgement.
fn answers(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 16 {
        let u32_at =
            |o: usize| u32::from_ne_bytes([rest[o], rest[o + 1], rest[o + 2], rest[o + 3]]);
        let len = u32_at(0) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if kind == NLMSG_ERROR && len >= 20 {
            // The error's own sequence number is the request's.
            out.push((u32_at(8), u32_at(16) as i32));
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_sequence_number() {
        let mut d = Vec::new();
        for (seq, errno) in [(7u32, 0i32), (8, -2)] {
            d.extend(36u32.to_ne_bytes());
            d.extend(NLMSG_ERROR.to_ne_bytes());
            d.extend(0u16.to_ne_bytes());
            d.extend(seq.to_ne_bytes());
            d.extend(0u32.to_ne_bytes());
            d.extend(errno.to_ne_bytes());
            d.extend([0; 16]); // the request's header
        }
        d.extend([1, 2, 3]); // a torn tail is ignored
        assert_eq!(answers(&d), vec![(7, 0), (8, -2)]);
        assert!(answers(&[0xff; 40]).is_empty());
    }
}
