//! The per-connection wrapper: a deadline for the whole request header
//! (nginx's `client_header_timeout`), connection admission, idle tracking
//! for eviction, and one `Server` identity on every answer.
//!
//! Pingora only times out each single read, so a slowloris client that sends
//! one header byte every few seconds holds a connection forever. This wraps
//! each accepted connection: the request header must be complete within
//! `header_timeout` of the connection being accepted (first request) or of
//! its first byte arriving (later requests on a kept-alive connection). Past
//! the deadline the connection is closed.
//!
//! The bytes of a header are held back until its empty line arrives, and
//! only then handed to Pingora. A connection cut by the deadline (or closed
//! by the client) mid-header so ends, for Pingora, before any byte of a
//! request: it closes silently instead of logging an ERROR per cut
//! connection. The cut is counted ([`crate::connections::ConnStats::header_timeouts`]) and logged
//! at debug. The price: a malformed request line is answered 400 only once
//! its header ends, and a header that never ends is closed without an answer
//! at the deadline.
//!
//! The wrapper follows the HTTP/1 exchange from the bytes themselves: the end
//! of a header is its empty line; the first write after it is the response
//! (`1xx` interim answers aside); the next bytes read after a response start
//! the next request. After `101 Switching Protocols` it steps aside for good,
//! and HTTP/2 connections are not wrapped (they still count as connections).
//! Known limit: a request body still being uploaded after its response has
//! begun is timed like a header (and is not held back: requests that carry a
//! body framing header turn holding off for the next header).
//!
//! Idle tracking: a connection that has not sent a single byte of its next
//! request is idle and may be evicted at the connection cap
//! ([`crate::connections`]), like nginx's "reusable" connections. That is a
//! fresh connection from the moment it is wrapped until its first byte, and
//! a kept-alive one from the moment Pingora waits for its next request
//! (after a response has started, a read with a full buffer: Pingora's
//! 1-byte reads during a response only watch for a client close) until its
//! first byte. A connection with part of a header sent is not idle (the
//! header deadline ends it), nor is one with a request in flight. An evicted
//! connection reads as a clean EOF before any byte of a request, so Pingora
//! closes it quietly, without an answer. Cost: a connection takes one ticket
//! (a shared atomic counter) and one compare-and-swap when it goes idle, one
//! compare-and-swap at its first byte, and registers its waker while idle
//! (one atomic swap per read); no lock.
//!
//! Waiting for requests: the wrapper runs the HTTP/1 keep-alive loop that
//! Pingora runs otherwise (pingora-core `apps/mod.rs`) and waits for each
//! request itself, a connection's first and each next one between two
//! requests (`HeaderTimeout::serve_http1`). Only when the request's header
//! is in does Pingora get the connection, and it reads those bytes replayed
//! as if from the socket. A waiting connection so holds no Pingora
//! per-request future (13.9 KB for the proxy), session or 4 KiB header
//! buffer: an idle kept-alive connection went from 43 to 15 KiB
//! (`.ci/bench idle`). Pingora's rules stay: the keep-alive limit
//! (`server.keepalive_timeout`, read before each wait, so reloads apply),
//! keep-alive off at shutdown (a connection idle between requests closes
//! when shutdown begins, unless bytes are already waiting), the request
//! limit and settings carried from request to request, the header deadline
//! from the first byte. After a request with a body, or with bytes behind
//! its header (pipelining), Pingora may already hold the start of the next
//! request, so its own session waits for that one, as before.
//!
//! On the HTTPS listener (a plain TCP listener, see [`crate::tls::handshake`])
//! the wrapper admits the connection first, then does the TLS handshake
//! within the same deadline, counted from the accept; HTTP/2 connections
//! must then deliver their preface by it too ([`crate::tls::preface`]).
//!
//! Pingora writes some answers itself (400 for a request it cannot parse,
//! 405 for CONNECT) with `Server: Pingora`; the wrapper rewrites that header
//! in the response head to `Server: switchyard` on the way out.
//!
//! The wrapper is also the connection's write buffer ([`WRITE_BUFFER`]):
//! the stream switchyard's accept loop makes ([`crate::listener`]) has none,
//! and Pingora writes a response's head and body one after the other before
//! its flush.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::poll_fn;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::connections::{Connections, Slot};
use crate::record::{Observer, RequestRecord};
use crate::respond::Refusal;
use crate::tls::handshake::TlsAcceptor;
use crate::tls::preface;

/// Most bytes of one request header held back (1 MiB, just over Pingora's
/// own header limit): beyond it the bytes go to Pingora, which answers 400.
const HOLD_LIMIT: usize = 1024 * 1024;

/// Longest a kept-alive connection waits for its next request when the
/// wrapper is not told otherwise ([`HeaderTimeout::with_keepalive`]): 60 s,
/// Pingora's own default.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// Keep-alive of a new connection's first request, in whole seconds (60),
/// as Pingora sets it (pingora-core `apps/mod.rs`); the proxy replaces it
/// per request with `server.keepalive_timeout`.
const FIRST_REQUEST_KEEPALIVE_SECS: u64 = 60;

/// Response bytes gathered before they are written (1 460, one TCP
/// segment's payload, as Pingora's stream buffered them before switchyard
/// accepted its own connections, `listener.rs`): a small response's head
/// and body, which Pingora writes one after the other and then flushes,
/// leave in one `write` (and one TLS record on HTTPS).
const WRITE_BUFFER: usize = 1460;

/// Most bytes taken by the read that ends an idle wait (4 KiB, Pingora's
/// first header read): the rest of a longer header follows through the
/// same held-back path. On the stack of one poll, never kept.
const FIRST_READ: usize = 4 * 1024;

/// The keep-alive idle limit, asked before each wait between two requests
/// (so a reloaded `server.keepalive_timeout` applies to the next wait).
pub type KeepAlive = Arc<dyn Fn() -> Duration + Send + Sync>;

/// Puts a header deadline and connection admission on every connection
/// `app` serves.
pub struct HeaderTimeout<A> {
    app: Arc<A>,
    timeout: Duration,
    connections: Arc<Connections>,
    /// Told about the answers Pingora's parser gives by itself, which no
    /// proxy phase sees (metrics, access log).
    observers: Arc<[Arc<dyn Observer>]>,
    /// Set on the HTTPS listener: the TLS handshake, done here inside the
    /// header deadline ([`crate::tls::handshake`]).
    tls: Option<Arc<TlsAcceptor>>,
    /// How long a kept-alive connection may wait for its next request.
    keepalive: KeepAlive,
}

impl<A> HeaderTimeout<A> {
    /// `timeout` is the whole-header deadline; `connections` admits (or
    /// refuses) each accepted connection.
    pub fn new(app: A, timeout: Duration, connections: Arc<Connections>) -> Self {
        HeaderTimeout {
            app: Arc::new(app),
            timeout,
            connections,
            observers: Arc::new([]),
            tls: None,
            keepalive: Arc::new(|| DEFAULT_KEEPALIVE),
        }
    }

    /// The idle limit between two requests on a kept-alive HTTP/1
    /// connection (`server.keepalive_timeout`), read before each wait.
    pub fn with_keepalive(mut self, keepalive: KeepAlive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Reports the answers Pingora gives by itself (400 for a request it
    /// cannot parse, 405 for CONNECT) to `observers`.
    pub fn with_observers(mut self, observers: Vec<Arc<dyn Observer>>) -> Self {
        self.observers = observers.into();
        self
    }

    /// Makes this the HTTPS listener's wrapper: each admitted connection
    /// shakes hands with `tls` before its first request, and the handshake
    /// shares the request header's deadline.
    pub fn with_tls(mut self, tls: Arc<TlsAcceptor>) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Whether request bytes are already waiting on an accepted connection:
/// one `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte, which takes nothing
/// from the socket. Asked only at the connection cap (see
/// [`crate::connections::MAX_PENDING_EVICTIONS`]). Pingora's unique id of a
/// connection is its socket's file descriptor.
fn bytes_waiting(stream: &Stream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`, which we own; the
    // descriptor stays open while `stream` is borrowed, and MSG_PEEK leaves
    // the data in place. On anything but a socket it fails (false).
    let n = unsafe {
        libc::recv(
            stream.id(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// The client's address of an accepted connection.
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    Some(digest.peer_addr()?.as_inet()?.ip())
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for HeaderTimeout<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let deadline = accepted + self.timeout;
        // Not known before a TLS handshake: such a connection takes a slot,
        // unused if it turns out to speak HTTP/2.
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        // Refused: the stream is dropped here, which closes it at once.
        let admission = self
            .connections
            .admit(peer_ip(&stream), !h2, || bytes_waiting(&stream))
            .ok()?;
        // A failed or late handshake drops the stream: closed, not logged.
        // Boxed: the handshake's state would otherwise sit inline in this
        // future, which every connection allocates, plain HTTP ones too.
        let stream = match &self.tls {
            Some(tls) => Box::pin(tls.accept(stream, accepted, deadline)).await?,
            None => stream,
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        // HTTP/2 is not wrapped below; its preface still comes by the deadline.
        let stream = match h2 && self.tls.is_some() {
            true => match Box::pin(preface::read(stream, deadline)).await {
                Ok(stream) => stream,
                // Counted as an HTTP/1 header past its deadline is.
                Err(preface::Missing::Late) => {
                    let stats = &self.connections.stats;
                    stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(preface::Missing::Other) => return None,
            },
            false => stream,
        };
        let conn = match admission.slot() {
            Some(slot) if !h2 => Box::new(Guarded::new(
                stream,
                self.timeout,
                deadline,
                slot,
                self.connections.clone(),
                self.observers.clone(),
            )),
            // HTTP/2, or a listener without a connection cap: Pingora's loop.
            _ => {
                let reuse = self.app.process_new(stream, shutdown).await;
                drop(admission);
                return reuse;
            }
        };
        // Cleartext HTTP/2 and custom protocols are told apart inside
        // Pingora's own loop; switchyard enables neither.
        let reuse = match self.app.server_options() {
            Some(o) if o.h2c || o.force_custom => self.app.process_new(conn, shutdown).await,
            _ => {
                self.serve_http1(conn, shutdown).await;
                None
            }
        };
        // The place is given back when the connection has been served.
        drop(admission);
        reuse
    }

    /// Deliberately not passed on. Pingora's proxy cleanup, run when the
    /// listener stops at shutdown, drops every connection still waiting for
    /// its request header, including one accepted a moment earlier whose
    /// request is already on the wire: a lost request during every graceful
    /// upgrade (`tests/upgrade.rs`). Those connections are instead served;
    /// `shutdown.rs` exits once nothing has been in flight for a moment.
    async fn cleanup(&self) {}
}

impl<A: HttpServerApp + Send + Sync + 'static> HeaderTimeout<A> {
    /// Pingora's HTTP/1 keep-alive loop (pingora-core `apps/mod.rs`, same
    /// rules: keep-alive off for a connection accepted during shutdown, the
    /// per-connection request limit, the settings carried from one request
    /// to the next), owned here so that the wait for a request happens in
    /// [`Guarded::wait_next`] and not inside Pingora: a connection waiting
    /// for its first request or idle between two holds neither Pingora's
    /// per-request future nor its session and header buffer, only this
    /// loop and the wrapped stream. Pingora's session starts once the
    /// request's bytes are in, and reads them as if from the socket.
    async fn serve_http1(self: &Arc<Self>, mut conn: Box<Guarded>, shutdown: &ShutdownWatch) {
        let mut carried = None;
        let mut first = true;
        loop {
            // Not after a request with a body or with bytes behind it:
            // Pingora may hold the start of the next one (it waits then).
            let wait = first || conn.between_requests();
            if wait && !conn.wait_next((self.keepalive)(), shutdown).await {
                return;
            }
            // Built and moved in one go: no session sits in this future.
            let session = self.session(conn, first, carried.take(), shutdown);
            first = false;
            let Some(reused) = self.app.process_new_http(session, shutdown).await else {
                return;
            };
            let (stream, settings) = reused.consume();
            // Pingora hands back the stream it was given.
            let Ok(back) = stream.into_any().downcast::<Guarded>() else {
                tracing::debug!("kept-alive stream is not the wrapper's; connection closed");
                return;
            };
            conn = back;
            carried = settings;
        }
    }

    /// Pingora's session for the next request on `conn`: a connection's
    /// first gets keep-alive (unless shutting down) and the request limit
    /// as Pingora starts it; a later one the settings carried from the
    /// request before.
    fn session(
        &self,
        conn: Box<Guarded>,
        first: bool,
        carried: Option<HttpPersistentSettings>,
        shutdown: &ShutdownWatch,
    ) -> ServerSession {
        let mut session = ServerSession::new_http1(conn);
        if let Some(settings) = carried {
            settings.apply_to_session(&mut session);
        } else if first {
            session.set_keepalive(match *shutdown.borrow() {
                true => None,
                false => Some(FIRST_REQUEST_KEEPALIVE_SECS),
            });
            session.set_keepalive_reuses_remaining(
                self.app
                    .server_options()
                    .and_then(|o| o.keepalive_request_limit),
            );
        }
        session
    }
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
    /// Whether the header being read is held back until it is complete.
    hold: bool,
    /// Bytes came after the end of the current request's header (in the
    /// read that ended it, or later before its response): a body, or a
    /// pipelined request that Pingora may now hold.
    extra: bool,
    /// Bytes of the current header not yet handed to Pingora.
    held: Vec<u8>,
    /// A complete header being handed over, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Response bytes taken but not yet written, from `wpos` on: the write
    /// buffer ([`WRITE_BUFFER`]), and rewritten response heads.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Idle state shared with [`Connections`].
    slot: Arc<Slot>,
    /// The ticket of the current idle period, 0 when busy.
    idle: u64,
    connections: Arc<Connections>,
    observers: Arc<[Arc<dyn Observer>]>,
}

/// Finds the empty line that ends an HTTP/1 header, across reads, and
/// whether the header announces a body.
#[derive(Debug, Default)]
struct HeaderScan {
    /// Bytes in the current line, CR excluded.
    line_len: usize,
    /// Whether a non-empty line (the request line) was seen: leading empty
    /// lines before a request are allowed and ignored.
    seen_line: bool,
    /// The first bytes of the current line, lower-cased.
    start: [u8; 18],
    /// A `Content-Length` or `Transfer-Encoding` header was seen.
    body: bool,
    /// More bytes followed the header's end in the read that ended it.
    tail: bool,
}

impl HeaderScan {
    /// Feeds received bytes; true once the header has ended.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.line_len == 0 && self.seen_line => {
                    self.tail = i + 1 < bytes.len();
                    return true;
                }
                b'\n' => {
                    let start = &self.start[..self.line_len.min(self.start.len())];
                    self.body |= start.starts_with(b"content-length:")
                        || start.starts_with(b"transfer-encoding:");
                    self.seen_line |= self.line_len > 0;
                    self.line_len = 0;
                }
                b'\r' => {}
                _ => {
                    if let Some(slot) = self.start.get_mut(self.line_len) {
                        *slot = b.to_ascii_lowercase();
                    }
                    self.line_len += 1;
                }
            }
        }
        false
    }
}

impl Guarded {
    /// Wraps a fresh connection, idle (evictable) until its first byte.
    fn new(
        inner: Stream,
        timeout: Duration,
        deadline: Instant,
        slot: Arc<Slot>,
        connections: Arc<Connections>,
        observers: Arc<[Arc<dyn Observer>]>,
    ) -> Guarded {
        let ticket = connections.ticket();
        // False only if the slot was already taken out of the idle set
        // (evicted), and then the first read ends the connection anyway.
        let idle = if slot.set_idle(ticket) { ticket } else { 0 };
        Guarded {
            inner,
            timeout,
            phase: Phase::Header,
            deadline: Some(deadline),
            timer: None,
            scan: HeaderScan::default(),
            hold: true,
            extra: false,
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            slot,
            idle,
            connections,
            observers,
        }
    }

    /// Tells the observers about an answer Pingora's parser gave by itself:
    /// nothing of the request is known but its client.
    fn report_own_answer(&self, status: u16) {
        if self.observers.is_empty() {
            return;
        }
        let record = RequestRecord {
            request_id: "-",
            client: peer_ip(&self.inner),
            method: "-",
            host: None,
            path: "-",
            status,
            service: None,
            color: None,
            route: None,
            backend: None,
            upstream_time: None,
            total_time: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            refusal: Some(Refusal::Unparsed(status)),
            stream: false,
        };
        for observer in self.observers.iter() {
            observer.observe(&record);
        }
    }

    fn start_header(&mut self) {
        self.phase = Phase::Header;
        // A body may still be arriving after an early response: never hold
        // it back waiting for an empty line.
        self.hold = !self.scan.body;
        self.extra = false;
        self.scan = HeaderScan::default();
        self.deadline = Some(Instant::now() + self.timeout);
    }

    /// The header missed its deadline: counted, and logged at debug only
    /// (an expected outcome under a slowloris flood).
    fn timed_out(&mut self) -> Poll<io::Result<()>> {
        self.deadline = None;
        // Closing anyway: no longer a candidate for eviction, which would
        // count an eviction that frees nothing.
        if self.idle != 0 {
            self.slot.set_busy(self.idle);
            self.idle = 0;
        }
        self.connections
            .stats
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(timeout = ?self.timeout, "request header not complete in time; connection closed");
        self.held = Vec::new();
        if self.hold {
            // Nothing of this header reached Pingora: a clean EOF.
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request header not complete within {:?}", self.timeout),
            )))
        }
    }

    /// Hands over released header bytes; true if any were pending.
    fn give_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_pos >= self.out.len() {
            return false;
        }
        let n = buf.remaining().min(self.out.len() - self.out_pos);
        buf.put_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out = Vec::new();
            self.out_pos = 0;
        }
        true
    }

    /// Takes `head` (a rewritten form of the caller's `len` bytes) as
    /// written: it goes out with the next flush, or shutdown.
    fn write_rewritten(&mut self, head: Vec<u8>, len: usize) -> Poll<io::Result<usize>> {
        self.wbuf.extend_from_slice(&head);
        Poll::Ready(Ok(len))
    }

    /// Writes `data` through the write buffer: kept while it and what is
    /// already buffered fit in [`WRITE_BUFFER`], otherwise the buffer goes
    /// out first, and `data` as large as the buffer is written directly
    /// (the rules of tokio's `BufWriter`, which Pingora's stream used).
    fn poll_buffered(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.wbuf.len() - self.wpos + data.len() > WRITE_BUFFER
            && self.poll_drain(cx)?.is_pending()
        {
            return Poll::Pending;
        }
        if data.len() >= WRITE_BUFFER {
            return Pin::new(&mut self.inner).poll_write(cx, data);
        }
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve_exact(WRITE_BUFFER);
        }
        self.wbuf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    /// Writes out the write buffer; Ready once nothing is left. The
    /// buffer's memory is kept for the next response (see
    /// [`Self::wait_next`] for when it is given back).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl Guarded {
    /// Whether the connection is between two requests and nothing of the
    /// next one has been read: the last request had no body, no byte came
    /// after its header, its response has started (Pingora hands the stream
    /// back only once it is complete) and nothing is left to hand over or
    /// to write. Only then can the wait for the next request happen here:
    /// otherwise Pingora may already hold the start of a pipelined request,
    /// and its own session waits instead (as before).
    fn between_requests(&self) -> bool {
        self.phase == Phase::Responded
            && !self.extra
            && !self.scan.body
            && self.out_pos >= self.out.len()
            && self.wpos >= self.wbuf.len()
    }

    /// Waits for a connection's next request (its first, or the next on a
    /// kept-alive connection), holding no buffer meanwhile. The bytes go
    /// through the same path as any request header's (idle until the first
    /// byte, evictable at the connection cap; then held back under the
    /// header deadline until the header is complete) and are kept to be
    /// replayed to Pingora's next session.
    ///
    /// True once a request has come; false when the connection is to close:
    /// the client closed it, it was evicted, its header missed the deadline,
    /// or, between two requests, it stayed idle for `keepalive` (what
    /// Pingora's keep-alive timeout does) or shutdown began before its
    /// first byte (keep-alive ends at shutdown, as Pingora ends it for each
    /// request it starts then). A request already on the wire when shutdown
    /// begins is still served, and so is a fresh connection's first request
    /// (see `HeaderTimeout::cleanup`).
    async fn wait_next(&mut self, keepalive: Duration, shutdown: &ShutdownWatch) -> bool {
        // Empty between requests (Pingora flushed its answer); its memory
        // is not held while the connection waits, maybe for long.
        self.wbuf = Vec::new();
        let idle_until = Instant::now() + keepalive;
        let mut watch = shutdown.clone();
        let mut stopping = *watch.borrow();
        let changed = watch.changed();
        tokio::pin!(changed);
        poll_fn(|cx| {
            if let Poll::Ready(started) = self.poll_next_request(cx) {
                return Poll::Ready(started.unwrap_or(false));
            }
            if self.phase != Phase::Responded {
                // A header is arriving: its deadline rules now.
                return Poll::Pending;
            }
            if !stopping && changed.as_mut().poll(cx).is_ready() {
                stopping = true;
            }
            if stopping {
                return Poll::Ready(bytes_waiting(&self.inner));
            }
            // The header deadline's timer, unused while idle.
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(sleep_until(idle_until)));
            if timer.deadline() != idle_until {
                timer.as_mut().reset(idle_until);
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// One read for [`Self::wait_next`]: Ready(true) once a request's first
    /// bytes (its whole header, if held back) are in and kept for replay,
    /// Ready(false) at a clean end (client close, eviction, header deadline).
    fn poll_next_request(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut first = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut first);
        if Pin::new(&mut *self).poll_read(cx, &mut buf)?.is_pending() {
            return Poll::Pending;
        }
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.replay(buf.filled());
        Poll::Ready(Ok(true))
    }

    /// Puts `bytes` back in front of whatever is still to be handed over:
    /// the next reads give them out first, as read from the socket.
    fn replay(&mut self, bytes: &[u8]) {
        let rest = self.out.get(self.out_pos..).unwrap_or_default();
        let mut out = Vec::with_capacity(bytes.len() + rest.len());
        out.extend_from_slice(bytes);
        out.extend_from_slice(rest);
        self.out = out;
        self.out_pos = 0;
    }
}

/// `Some(code)` when `bytes` start with an HTTP/1 status line.
fn status_code(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let digits = rest.get(2..5)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The `Server` value Pingora puts on the answers it builds itself
/// (pingora-core `protocols/http/error_resp.rs`).
const PINGORA_SERVER: &[u8] = b"\r\nserver: pingora\r\n";

/// Whether `data` is, whole, a 4xx/5xx response head with no body
/// (`Content-Length: 0`): the shape of the answers Pingora builds itself.
fn is_bodiless_error_head(data: &[u8]) -> bool {
    const NO_BODY: &[u8] = b"\r\ncontent-length: 0\r\n";
    status_code(data).is_some_and(|c| c >= 400)
        && data.ends_with(b"\r\n\r\n")
        && data
            .windows(NO_BODY.len())
            .any(|w| w.eq_ignore_ascii_case(NO_BODY))
}

/// `data` with `Server: Pingora` in its response head replaced by switchyard's
/// own; None when the head (which Pingora writes in one piece) has no such
/// header.
fn rewrite_server(data: &[u8]) -> Option<Vec<u8>> {
    let head_end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 2;
    let at = data[..head_end + 2]
        .windows(PINGORA_SERVER.len())
        .position(|w| w.eq_ignore_ascii_case(PINGORA_SERVER))?;
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(&data[..at]);
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(crate::respond::SERVER.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&data[at + PINGORA_SERVER.len()..]);
    Some(out)
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.give_out(buf) {
            return Poll::Ready(Ok(()));
        }
        if this.deadline.is_some_and(|d| Instant::now() >= d) {
            return this.timed_out();
        }
        // A full-size read after a response: Pingora waits for the next
        // request, so the connection is idle (evictable). A fresh connection
        // is idle from the start (see `new`).
        if this.phase == Phase::Responded && this.idle == 0 && buf.remaining() > 1 {
            let ticket = this.connections.ticket();
            if this.slot.set_idle(ticket) {
                this.idle = ticket;
            }
        }
        if this.idle != 0 {
            this.slot.register(cx.waker());
            if this.slot.evicted() {
                // Nothing of a request was handed on: Pingora closes quietly.
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            let before = buf.filled().len();
            if Pin::new(&mut this.inner).poll_read(cx, buf)?.is_pending() {
                if let Some(deadline) = this.deadline {
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
                    timer.as_mut().reset(deadline);
                    if timer.as_mut().poll(cx).is_ready() {
                        return this.timed_out();
                    }
                }
                return Poll::Pending;
            }
            let new_len = buf.filled().len() - before;
            if new_len == 0 {
                // The client closed; a held partial header is dropped so
                // Pingora sees a clean close.
                this.held = Vec::new();
                return Poll::Ready(Ok(()));
            }
            if this.idle != 0 {
                if !this.slot.set_busy(this.idle) {
                    // Evicted while these bytes arrived: drop them, end here.
                    buf.set_filled(before);
                    return Poll::Ready(Ok(()));
                }
                this.idle = 0;
            }
            if this.phase == Phase::Responded {
                this.start_header();
            }
            if this.phase == Phase::Request {
                this.extra = true;
            }
            if this.phase != Phase::Header {
                return Poll::Ready(Ok(()));
            }
            let done = this.scan.feed(&buf.filled()[before..]);
            if done {
                this.phase = Phase::Request;
                this.deadline = None;
                this.extra = this.scan.tail;
            }
            if !this.hold {
                return Poll::Ready(Ok(()));
            }
            if done || this.held.len() + new_len > HOLD_LIMIT {
                if this.held.is_empty() {
                    // The whole header came in this read: nothing to copy.
                    return Poll::Ready(Ok(()));
                }
                // Hand over the held bytes and then these.
                this.held.extend_from_slice(&buf.filled()[before..]);
                buf.set_filled(before);
                this.out = std::mem::take(&mut this.held);
                this.out_pos = 0;
                this.hold = done;
                this.give_out(buf);
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(&buf.filled()[before..]);
            buf.set_filled(before);
        }
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
                code => {
                    this.phase = Phase::Responded;
                    this.deadline = None;
                    this.held = Vec::new();
                    // Only Pingora's own error answers carry its name.
                    if let Some((code, head)) = code
                        .filter(|c| *c >= 400)
                        .and_then(|c| Some((c, rewrite_server(data)?)))
                    {
                        this.report_own_answer(code);
                        return this.write_rewritten(head, data.len());
                    }
                }
            }
        } else if this.phase == Phase::Responded && is_bodiless_error_head(data) {
            // A pipelined request (RFC 9112 §9.3.2) is parsed by Pingora from
            // bytes it already holds, so no read marks its start; its error
            // answer is recognised by shape: one write holding a whole 4xx/5xx
            // head with `Content-Length: 0`, which is how Pingora writes them.
            if let Some(head) = rewrite_server(data) {
                this.report_own_answer(status_code(data).unwrap_or(400));
                return this.write_rewritten(head, data.len());
            }
        }
        this.poll_buffered(cx, data)
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
            _ => {
                if self.poll_drain(cx)?.is_pending() {
                    return Poll::Pending;
                }
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What is still in the write buffer goes out if the socket takes it at
/// once, as Pingora's own stream does with its buffer when dropped. Pingora
/// drops a connection without a flush when its backend fails mid-body: the
/// client then gets the response as far as it came, then the cut, rather
/// than nothing at all (a response head still buffered would otherwise
/// vanish, `tests/smuggling.rs`). Never waits: a client not reading loses
/// what its socket cannot take, as it did with Pingora's buffer.
impl Drop for Guarded {
    fn drop(&mut self) {
        if self.wpos < self.wbuf.len() {
            let waker = futures_util::task::noop_waker_ref();
            let _ = self.poll_drain(&mut Context::from_waker(waker));
        }
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
        // What is still buffered goes out before the close.
        let _ = futures_util::future::poll_fn(|cx| self.poll_drain(cx)).await;
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
    fn body_framing_headers_are_noticed() {
        let mut scan = HeaderScan::default();
        assert!(scan.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 1\r\n\r\n"));
        assert!(!scan.body);
        let mut scan = HeaderScan::default();
        assert!(!scan.feed(b"POST / HTTP/1.1\r\nconTent-LENGTH: 5\r"));
        assert!(scan.feed(b"\n\r\n"));
        assert!(scan.body);
        let mut scan = HeaderScan::default();
        assert!(scan.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(scan.body);
    }

    #[test]
    fn server_header_is_rewritten_in_the_head_only() {
        let head = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nContent-Length: 0\r\n\r\n";
        let out = rewrite_server(head).expect("rewritten");
        assert_eq!(
            out,
            b"HTTP/1.1 400 Bad Request\r\nServer: switchyard\r\nContent-Length: 0\r\n\r\n"
        );
        let lower = b"HTTP/1.1 405 x\r\nserver: pingora\r\n\r\n";
        assert!(rewrite_server(lower).is_some());
        let in_body = b"HTTP/1.1 404 x\r\nServer: switchyard\r\n\r\n\r\nServer: Pingora\r\n";
        assert_eq!(rewrite_server(in_body), None);
        assert_eq!(
            rewrite_server(b"HTTP/1.1 400 x\r\nServer: Pingora\r\n"),
            None
        );
    }

    /// A wrapped connection over an in-memory pipe that takes at most
    /// `pipe` bytes at a time, and the client's end.
    fn wrapped(
        pipe: usize,
        timeout: Duration,
    ) -> (Guarded, tokio::io::DuplexStream, Arc<Connections>) {
        let (server, client) = tokio::io::duplex(pipe);
        let table = Arc::new(Connections::new(1, None));
        let admission = table.admit(None, true, || false).expect("admitted");
        let slot = admission.slot().expect("slot");
        // The place stays taken for the whole test.
        std::mem::forget(admission);
        (
            Guarded::new(
                Box::new(server),
                timeout,
                Instant::now() + timeout,
                slot,
                table.clone(),
                Arc::new([]),
            ),
            client,
            table,
        )
    }

    /// Small writes wait for the flush (a response's head and body leave in
    /// one write); one as large as the buffer goes out at once, after what
    /// was gathered before it.
    #[tokio::test(start_paused = true)]
    async fn small_writes_wait_for_the_flush_and_large_ones_do_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, mut client, _) = wrapped(64 * 1024, Duration::from_secs(5));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");

        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        conn.write_all(&answer[..answer.len() - 2]).await.unwrap();
        conn.write_all(b"ok").await.unwrap();
        let wait = Duration::from_secs(1);
        let early = tokio::time::timeout(wait, client.read(&mut buf)).await;
        assert!(early.is_err(), "written before the flush: {early:?}");
        conn.flush().await.unwrap();
        let mut got = vec![0u8; answer.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, answer);

        let large = vec![b'x'; WRITE_BUFFER];
        conn.write_all(b"abc").await.unwrap();
        conn.write_all(&large).await.unwrap();
        let mut got = vec![0u8; 3 + large.len()];
        tokio::time::timeout(wait, client.read_exact(&mut got))
            .await
            .expect("a large write goes out without a flush")
            .unwrap();
        assert_eq!((&got[..3], &got[3..]), (&b"abc"[..], &large[..]));
    }

    #[tokio::test]
    async fn rewritten_answer_survives_partial_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, mut client, _) = wrapped(7, Duration::from_secs(5));
        let request = b"GE T / HTTP/1.1\r\n\r\n";
        let mut got = vec![0u8; request.len()];
        let (sent, read) = tokio::join!(client.write_all(request), conn.read_exact(&mut got));
        sent.unwrap();
        read.unwrap();
        assert_eq!(got, request);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        conn.write_all(b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        Shutdown::shutdown(&mut conn).await;
        drop(conn);
        let got = reader.await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            "HTTP/1.1 400 Bad Request\r\nServer: switchyard\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn header_is_held_back_until_complete_and_a_cut_one_reads_as_eof() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, mut client, table) = wrapped(1024, Duration::from_millis(300));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 8];
        // Nothing is handed on while the header is incomplete.
        let early = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut buf)).await;
        assert!(early.is_err(), "{early:?}");
        client.write_all(b"\r\nbody").await.unwrap();
        // Then all of it, through a small buffer, in order.
        let mut got = Vec::new();
        while !got.ends_with(b"body") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody");

        // After a response, a next header that stalls ends as a clean EOF.
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        let n = conn.read(&mut [0u8; 4096]).await.unwrap();
        assert_eq!(n, 0, "a header cut by the deadline reads as EOF");
        assert_eq!(table.stats.header_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_evicted_reads_as_eof() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, mut client, table) = wrapped(1024, Duration::from_secs(5));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // Pingora's 1-byte reads during a response do not make it idle.
        let probe = tokio::time::timeout(Duration::from_millis(20), conn.read(&mut buf[..1])).await;
        assert!(probe.is_err());
        assert!(
            table.admit(None, false, || false).is_err(),
            "nothing idle yet"
        );
        // Waiting for a next request with a full buffer does.
        let (read, admitted) = tokio::join!(conn.read(&mut buf), async {
            tokio::task::yield_now().await;
            table.admit(None, false, || false)
        });
        assert!(admitted.is_ok(), "the idle connection gave way");
        assert_eq!(read.unwrap(), 0, "evicted: a clean EOF");
        assert_eq!(table.stats.evicted_idle.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_fresh_connection_is_idle_until_its_first_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Nothing sent: evicted at the cap, and it reads as a clean EOF.
        let (mut conn, _client, table) = wrapped(1024, Duration::from_secs(5));
        let admitted = table.admit(None, false, || false);
        assert!(admitted.is_ok(), "the fresh connection gave way");
        let n = conn.read(&mut [0u8; 4096]).await.unwrap();
        assert_eq!(n, 0, "evicted before any byte: a clean EOF");
        assert_eq!(table.stats.evicted_idle.load(Ordering::Relaxed), 1);

        // Part of a header sent: busy, so the newcomer is refused instead.
        let (mut conn, mut client, table) = wrapped(1024, Duration::from_secs(5));
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 4096];
        let held = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut buf)).await;
        assert!(held.is_err(), "{held:?}");
        assert!(
            table.admit(None, false, || false).is_err(),
            "midway through a header"
        );
        client.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(table.stats.evicted_idle.load(Ordering::Relaxed), 0);
    }

    /// The wait for a request, as the keep-alive loop runs it: a first
    /// request is replayed whole; between two requests the wait ends at the
    /// keep-alive limit, at shutdown, or with the next request's bytes,
    /// which come back in order even when split and with a second request
    /// pipelined behind them.
    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_request_ends_at_keepalive_shutdown_or_its_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let keepalive = Duration::from_secs(60);
        let (tx, running) = tokio::sync::watch::channel(false);
        let (mut conn, mut client, _) = wrapped(1024, Duration::from_secs(5));
        client.write_all(b"GET /1 HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(conn.wait_next(keepalive, &running).await, "first request");
        let mut buf = [0u8; 4096];
        // Bounded: bytes lost by the replay fail the test instead of hanging it.
        let limit = Duration::from_secs(5);
        let n = tokio::time::timeout(limit, conn.read(&mut buf))
            .await
            .expect("the request is replayed")
            .unwrap();
        assert_eq!(&buf[..n], b"GET /1 HTTP/1.1\r\n\r\n");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // Written out by the flush that ends every response in Pingora.
        assert!(!conn.between_requests());
        conn.flush().await.unwrap();
        assert!(conn.between_requests());

        // Nothing comes: closed at the keep-alive limit, not before.
        let t0 = Instant::now();
        assert!(!conn.wait_next(keepalive, &running).await);
        assert!((keepalive..keepalive * 2).contains(&t0.elapsed()));

        // Shutdown begins while idle: closed then.
        let t0 = Instant::now();
        let (waited, _) = tokio::join!(conn.wait_next(keepalive, &running), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(true).unwrap();
        });
        assert!(!waited);
        assert!(t0.elapsed() < keepalive, "{:?}", t0.elapsed());

        // The next request in two pieces, a second one behind it.
        let (_tx, running) = tokio::sync::watch::channel(false);
        let (waited, _) = tokio::join!(conn.wait_next(keepalive, &running), async {
            client.write_all(b"GET /2 HT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            client
                .write_all(b"TP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
        });
        assert!(waited);
        let mut got = Vec::new();
        while got.len() < 38 {
            let n = tokio::time::timeout(limit, conn.read(&mut buf))
                .await
                .expect("both requests are replayed")
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // Pingora holds the pipelined one: its own session waits next.
        assert!(!conn.between_requests());
    }

    #[test]
    fn bodiless_error_heads_are_recognised_by_shape() {
        let pingora = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert!(is_bodiless_error_head(pingora));
        // A body, a success, or a head with more after it: left alone.
        assert!(!is_bodiless_error_head(&pingora[..pingora.len() - 2]));
        assert!(!is_bodiless_error_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!is_bodiless_error_head(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(!is_bodiless_error_head(b"some body bytes\r\n\r\n"));
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
