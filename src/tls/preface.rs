//! The HTTP/2 connection preface (RFC 9113 §3.4) inside the slow-client
//! deadline.
//!
//! HTTP/2 connections are not wrapped by [`crate::slow_clients`] (its
//! HTTP/1 framing does not apply), and Pingora's HTTP/2 handshake waits for
//! the client's preface without a time limit, logging an ERROR when it is
//! wrong. So a client that negotiates `h2` and then sends nothing would hold
//! its connection forever, and one sending garbage would add a log line. The
//! preface is read here, before the deadline the TLS handshake shared, and
//! handed to Pingora in front of the rest of the stream. Once it is in, an
//! HTTP/2 connection is Pingora's: streams are handled as they come, and a
//! connection with none open closes after `server.keepalive_timeout`.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The client connection preface every HTTP/2 connection starts with
/// (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why no HTTP/2 preface came (the connection is then dropped, which closes
/// it; logged at debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Not by the deadline: a slow client, counted as such by the caller.
    Late,
    /// Something else came, or the client closed.
    Other,
}

/// Reads the HTTP/2 preface from `stream` by `deadline`. Returns the stream
/// with the preface put back in front, or why there was none.
pub async fn read(mut stream: Stream, deadline: Instant) -> Result<Stream, Missing> {
    let mut got = [0u8; PREFACE.len()];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut got)).await {
        Ok(Ok(_)) if got == *PREFACE => Ok(Box::new(Replay {
            inner: stream,
            pos: 0,
        })),
        Ok(Ok(_)) => {
            tracing::debug!("not an HTTP/2 connection preface after ALPN h2; connection closed");
            Err(Missing::Other)
        }
        Ok(Err(e)) => {
            tracing::debug!(cause = %e, "HTTP/2 connection preface not received; connection closed");
            Err(Missing::Other)
        }
        Err(_) => {
            tracing::debug!("HTTP/2 connection preface not received in time; connection closed");
            Err(Missing::Late)
        }
    }
}

/// A stream whose first bytes, the already read preface, are served again.
struct Replay {
    inner: Stream,
    /// How much of [`PREFACE`] has been served.
    pos: usize,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < PREFACE.len() {
            let n = buf.remaining().min(PREFACE.len() - self.pos);
            buf.put_slice(&PREFACE[self.pos..self.pos + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Shutdown for Replay {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Replay {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replay {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replay {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replay {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Replay {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Peeking would skip the replayed preface; Pingora peeks only for
/// cleartext HTTP/2 (h2c), never on TLS.
#[async_trait]
impl Peek for Replay {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_preface_is_replayed_then_the_rest_follows() {
        let (server, mut client) = tokio::io::duplex(64);
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = read(Box::new(server), deadline).await.expect("preface");
        let mut got = vec![0u8; PREFACE.len() + 6];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..PREFACE.len()], PREFACE);
        assert_eq!(&got[PREFACE.len()..], b"frames");
    }

    #[tokio::test]
    async fn anything_else_or_silence_is_refused() {
        let (server, mut client) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            read(Box::new(server), deadline).await.err(),
            Some(Missing::Other)
        );

        tokio::time::pause();
        let (server, _client) = tokio::io::duplex(64);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The paused clock jumps to the deadline: no real waiting.
        assert_eq!(
            read(Box::new(server), deadline).await.err(),
            Some(Missing::Late)
        );
    }
}
