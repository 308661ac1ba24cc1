//! A deadline for the whole request header (nginx's `client_header_timeout`).
//!
//! Pingora only times out each single read, so a slowloris client that sends
//! one header byte every few seconds holds a connection forever. This wraps
//! each accepted connection: the request header must be complete within
//! `header_timeout` of the connection being accepted (first request) or of
//! its first byte arriving (later requests on a kept-alive connection). Past
//! the deadline the read fails and the connection is closed.
//!
//! The wrapper follows the HTTP/1 exchange from the bytes themselves: the end
//! of a header is its empty line; the first write after it is the response
//! (`1xx` interim answers aside); the next bytes read after a response start
//! the next request. After `101 Switching Protocols` it steps aside for good,
//! and HTTP/2 connections are not wrapped. Known limit: a request body still
//! being uploaded after its response has begun is timed like a header.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant, Sleep};

/// Puts a header deadline on every connection `app` serves.
pub struct HeaderTimeout<A> {
    app: Arc<A>,
    timeout: Duration,
}

impl<A> HeaderTimeout<A> {
    pub fn new(app: A, timeout: Duration) -> Self {
        HeaderTimeout {
            app: Arc::new(app),
            timeout,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderTimeout<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            stream
        } else {
            Box::new(Guarded::new(stream, self.timeout))
        };
        self.app.process_new(stream, shutdown).await
    }

    /// Deliberately not passed on. Pingora's proxy cleanup, run when the
    /// listener stops at shutdown, drops every connection still waiting for
    /// its request header, including one accepted a moment earlier whose
    /// request is already on the wire: a lost request during every graceful
    /// upgrade (`tests/upgrade.rs`). Those connections are instead served;
    /// `shutdown.rs` exits once nothing has been in flight for a moment.
    async fn cleanup(&self) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request header, under the deadline.
    Header,
    /// Header complete; waiting for the response to start.
    Request,
    /// The response has started; the next bytes read begin a new request.
    Responded,
    /// Upgraded connection: no HTTP/1 framing any more.
    Tunnel,
}

struct Guarded {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    /// When the header being read must be complete.
    deadline: Option<Instant>,
    /// Wakes a read that is waiting at the deadline. Armed only when a read
    /// would block, and allocated once per connection: a header that arrives
    /// in one read (the common case) costs no timer at all.
    timer: Option<Pin<Box<Sleep>>>,
    scan: HeaderScan,
}

/// Finds the empty line that ends an HTTP/1 header, across reads.
#[derive(Debug, Default)]
struct HeaderScan {
    /// Bytes in the current line, CR excluded.
    line_len: usize,
    /// Whether a non-empty line (the request line) was seen: leading empty
    /// lines before a request are allowed and ignored.
    seen_line: bool,
}

impl HeaderScan {
    /// Feeds received bytes; true once the header has ended.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.line_len == 0 && self.seen_line => return true,
                b'\n' => {
                    self.seen_line |= self.line_len > 0;
                    self.line_len = 0;
                }
                b'\r' => {}
                _ => self.line_len += 1,
            }
        }
        false
    }
}

impl Guarded {
    fn new(inner: Stream, timeout: Duration) -> Guarded {
        Guarded {
            inner,
            timeout,
            phase: Phase::Header,
            deadline: Some(Instant::now() + timeout),
            timer: None,
            scan: HeaderScan::default(),
        }
    }

    fn start_header(&mut self) {
        self.phase = Phase::Header;
        self.scan = HeaderScan::default();
        self.deadline = Some(Instant::now() + self.timeout);
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("request header not complete within {:?}", self.timeout),
        )
    }
}

/// `Some(code)` when `bytes` start with an HTTP/1 status line.
fn status_code(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let digits = rest.get(2..5)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        if Pin::new(&mut this.inner).poll_read(cx, buf)?.is_pending() {
            if let Some(deadline) = this.deadline {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
                timer.as_mut().reset(deadline);
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.timed_out()));
                }
            }
            return Poll::Pending;
        }
        let new = &buf.filled()[before..];
        if this.phase == Phase::Responded && !new.is_empty() {
            this.start_header();
        }
        if this.phase == Phase::Header && this.scan.feed(new) {
            this.phase = Phase::Request;
            this.deadline = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Header | Phase::Request) {
            match status_code(data) {
                Some(101) => {
                    this.phase = Phase::Tunnel;
                    this.deadline = None;
                }
                Some(100..=199) => {}
                _ => {
                    this.phase = Phase::Responded;
                    this.deadline = None;
                }
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            // Route the phase logic through poll_write for the first slice.
            Some(first) if matches!(self.phase, Phase::Header | Phase::Request) => {
                let first: &[u8] = first;
                self.poll_write(cx, first)
            }
            _ => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
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

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_is_found_across_reads() {
        let mut scan = HeaderScan::default();
        assert!(!scan.feed(b"\r\nGET / HTTP/1.1\r\nHost: a\r"));
        assert!(!scan.feed(b"\n\r"));
        assert!(scan.feed(b"\nbody"));
        let mut bare_lf = HeaderScan::default();
        assert!(bare_lf.feed(b"GET / HTTP/1.0\n\n"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_code(b"HTTP/1.1 101 Switching Protocols\r\n"),
            Some(101)
        );
        assert_eq!(status_code(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code(b"{\"a\":1}"), None);
        assert_eq!(status_code(b"HTTP/1.1"), None);
    }
}
