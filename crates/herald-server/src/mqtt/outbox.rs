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
    /// Written to `inner` since its last flush.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> Outbox<W> {
    pub(crate) fn new(inner: W) -> Self {
        Outbox { inner, buf: Vec::new(), unflushed: false }
    }

    /// Queues `bytes`, to be written by the next `flush`. Writing only
    /// there keeps every wait on the socket in one place, which the
    /// connection's loop races against a takeover and shutdown.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        Ok(())
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

    async fn write_out(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.unflushed = true;
        }
        self.buf = Vec::new();
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
        out.write_all(b"one").await.unwrap();
        out.write_all(&[b'x'; 2000]).await.unwrap();
        out.flush().await.unwrap();
        assert_eq!(out.buf.capacity(), 0, "nothing is held between bursts");
        let mut got = vec![0u8; 2003];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
        assert_eq!(&got[..3], b"one");
        assert!(got[3..].iter().all(|b| *b == b'x'));
    }
}
