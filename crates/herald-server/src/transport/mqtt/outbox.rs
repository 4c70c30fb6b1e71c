//! The write side of an MQTT connection: packets are gathered and written
//! together on `flush`, so a burst is one write, and nothing is held between
//! bursts (a `BufWriter` keeps its whole buffer for the connection's life,
//! which for thousands of idle devices is most of their memory; even the few
//! hundred bytes of a CONNACK and a SUBACK, kept, were 5% of an idle
//! connection's).

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Past this size the connection stops gathering and writes out (see
/// `is_full`).
const HIGH_WATER: usize = 16 * 1024;

pub(crate) struct Outbox<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` is already written: a flush cancelled half-way (a
    /// takeover or shutdown won the race) goes on from there, never sending
    /// the same bytes twice.
    sent: usize,
    /// Written to `inner` since its last flush.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> Outbox<W> {
    pub(crate) fn new(inner: W) -> Self {
        Outbox { inner, buf: Vec::new(), sent: 0, unflushed: false }
    }

    /// Queues `bytes`, to be written by the next `flush`. Writing only
    /// there keeps every wait on the socket in one place, which the
    /// connection's loop races against a takeover and shutdown.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether enough is gathered to stop queueing more and flush.
    pub(crate) fn is_full(&self) -> bool {
        self.buf.len() >= HIGH_WATER
    }

    /// Whether anything waits for a flush.
    pub(crate) fn has_pending(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// Writes everything gathered.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.write_out().await?;
        self.inner.flush().await?;
        self.unflushed = false;
        Ok(())
    }

    pub(crate) async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }

    /// Cancel-safe: each `write` either wrote some bytes (counted in `sent`)
    /// or none.
    async fn write_out(&mut self) -> std::io::Result<()> {
        while self.sent < self.buf.len() {
            let n = self.inner.write(&self.buf[self.sent..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.sent += n;
            self.unflushed = true;
        }
        self.buf = Vec::new();
        self.sent = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gathers_until_flushed_and_keeps_nothing() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut out = Outbox::new(client);
        out.push(b"one");
        out.push(&[b'x'; 2000]);
        out.flush().await.unwrap();
        assert_eq!(out.buf.capacity(), 0, "nothing is held between bursts");
        let mut got = vec![0u8; 2003];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
        assert_eq!(&got[..3], b"one");
        assert!(got[3..].iter().all(|b| *b == b'x'));
    }

    /// A flush cancelled while the peer reads slowly, then finished: every
    /// byte arrives once, in order.
    #[tokio::test]
    async fn a_cancelled_flush_goes_on_where_it_stopped() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut out = Outbox::new(client);
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        out.push(&data);
        // The pipe holds 64 bytes: the flush cannot finish, and is cancelled.
        let cut = tokio::time::timeout(std::time::Duration::from_millis(20), out.flush()).await;
        assert!(cut.is_err(), "the flush was cut off half-way");
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 1000];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
            got
        });
        out.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), data);
    }
}
