//! The lean HTTP/1 path (`server.fast_path`): the common request — HTTP/1.1,
//! no body, no upgrade, on a route without limits — proxied straight on
//! pingora-core's HTTP/1 server and client sessions, without Pingora's proxy
//! machinery (its per-request future, spawned tasks, channels and pool
//! hand-overs; issue 14 measured what that costs).
//!
//! The connection wrapper ([`crate::slow_clients`]) calls [`FastPath::serve`]
//! once a request's whole header is in and nothing came behind it. The
//! request is parsed by Pingora's parser; anything this path does not serve
//! is *declined* before a byte is written or a limit counted: its header
//! bytes are handed back and replayed into Pingora's proxy ([`crate::proxy`]),
//! which serves it as it serves every request without this path. Declined:
//! not HTTP/1.1, `CONNECT`, any framing of a body (`Content-Length`,
//! `Transfer-Encoding`), `Upgrade`, `Expect`, `HTTP2-Settings`, a
//! `Connection` naming anything but `keep-alive`/`close`; a host or path the
//! proxy would refuse, an ACME challenge or an HTTPS redirect, a route with
//! a rate limit that counts the request's method, a concurrency cap or a
//! token budget, a service in
//! maintenance, a header over `server.max_header_size`. So every refusal
//! and every limit stays Pingora's, and this path only ever answers with the
//! backend's response or a failed attempt's error page.
//!
//! What it does is what the proxy phases do for such a request, from the
//! same parts: one snapshot load, the client (`forwarded.rs`), the
//! authority (`host.rs`), the route, the split (`split.rs`), the pool and
//! backend (`pools.rs`); the upstream request gets Pingora's hop-by-hop
//! rules (RFC 9110 §7.6.1: `Connection` and the fields it may name here,
//! `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`,
//! `Proxy-Authorization`, `TE`, `Trailer`, `Upgrade`), origin-form
//! (RFC 9112 §3.2.1), `Host` and the forwarded headers; the response the
//! proxy's rules (hop-by-hop fields stripped, the sticky cookie, `Server`
//! and `X-Request-Id`, HSTS on HTTPS, a close-delimited body re-framed as
//! chunked so the connection is kept). Retries follow the proxy's: a
//! failed connect, or a failure before any response byte, moves to another
//! backend of the same pool once (idempotent methods only); a kept-alive
//! backend connection found broken before any response byte is retried once
//! on a new one. Interim `1xx` answers are passed on (RFC 9110 §15.2).
//!
//! Backend connections come from [`crate::upstream_pool`] (per thread, no
//! task per connection), not from Pingora's pool.
//!
//! Known limits: a client that closes its connection while the backend
//! prepares the answer is noticed when the answer is written, not before
//! (the backend's work is not cut short); pipelined requests (bytes behind
//! a header) go to Pingora's proxy, which answers them in order.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::v1::server::HttpSession as DownstreamSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, OrErr, Result};

use crate::config::RouteAction;
use crate::forwarded::{self, Client};
use crate::host::{self, Authority};
use crate::pools::{InFlight, Pool, Snapshot};
use crate::proxy::{self, RequestCount};
use crate::record::{self, Observer, RequestRecord};
use crate::respond::{self, Refusal};
use crate::split;
use crate::switchboard::Switchboard;
use crate::tls::http::Side;
use crate::upstream_pool;

/// Requests served on this path since start, by every listener
/// (`switchyard_fast_path_requests_total`).
pub static SERVED: AtomicU64 = AtomicU64::new(0);

/// Keep-alive a request starts with, in whole seconds, before the route's
/// settings apply (as Pingora starts each session: 60).
const FIRST_KEEPALIVE_SECS: u64 = 60;

/// What became of a request offered to the lean path.
pub enum Outcome {
    /// Answered; the connection may carry a next request. With the first
    /// bytes of that request when the client sent them early (pipelining,
    /// RFC 9112 §9.3.2), to be read again before the socket.
    KeepAlive(Stream, Option<BytesMut>),
    /// Answered (or the client left); the connection is to close.
    Close,
    /// Not for this path, nothing written: the stream and the request
    /// header's bytes, to be replayed into Pingora's proxy.
    Declined(Stream, Bytes),
}

/// The lean path of one listener. Holds what the proxy holds
/// ([`crate::proxy::Proxy`]) and answers exactly as it would.
pub struct FastPath {
    board: Arc<Switchboard>,
    requests: Arc<AtomicUsize>,
    side: Side,
    observers: Vec<Arc<dyn Observer>>,
    /// Most idle backend connections kept per worker thread.
    pool_cap: usize,
}

/// A request this path serves: everything decided before the backend is asked.
struct Plan {
    snap: Arc<Snapshot>,
    request_id: http::HeaderValue,
    client: Client,
    authority: Option<Authority>,
    service: usize,
    route: usize,
    read_timeout: Duration,
    target: InFlight,
    set_cookie: Option<http::HeaderValue>,
}

/// How one request went, for its record.
#[derive(Default)]
struct Trace {
    backend: Option<SocketAddr>,
    upstream_sent: Option<Instant>,
    upstream_answered: Option<Instant>,
    status: u16,
    refusal: Option<Refusal>,
    stream: bool,
}

/// A failed attempt at the backend, and whether it may be tried again.
struct Failed {
    error: Box<Error>,
    connecting: bool,
    /// A kept-alive connection that broke before any response byte.
    stale: bool,
    /// The client left (or could not be written to): nobody to answer.
    gone: bool,
}

impl Failed {
    fn upstream(error: Box<Error>, connecting: bool, stale: bool) -> Failed {
        Failed {
            error,
            connecting,
            stale,
            gone: false,
        }
    }

    fn gone(error: Box<Error>) -> Failed {
        Failed {
            error,
            connecting: false,
            stale: false,
            gone: true,
        }
    }
}

impl FastPath {
    /// `pool_cap`: most idle backend connections kept per worker thread.
    pub fn new(
        board: Arc<Switchboard>,
        requests: Arc<AtomicUsize>,
        side: Side,
        observers: Vec<Arc<dyn Observer>>,
        pool_cap: usize,
    ) -> FastPath {
        FastPath {
            board,
            requests,
            side,
            observers,
            pool_cap,
        }
    }

    /// Serves the request whose whole header (and nothing more) waits on
    /// `stream`, or declines it. `shutting_down`: keep-alive ends with this
    /// request, as Pingora ends it for a request that starts at shutdown.
    pub async fn serve(&self, stream: Stream, shutting_down: bool) -> Outcome {
        let mut down = DownstreamSession::new(stream);
        down.set_server_keepalive((!shutting_down).then_some(FIRST_KEEPALIVE_SECS));
        // Bytes of a next request read while watching for the client
        // leaving are kept for it (see `Outcome::KeepAlive`).
        down.set_pipelining_enabled(true);
        match down.read_request().await {
            Ok(Some(_)) => {}
            Ok(None) => return Outcome::Close,
            Err(e) => {
                // As Pingora's proxy answers a header it cannot parse.
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    let answer = Box::new(ServerSession::generate_error(400));
                    down.set_server_keepalive(None);
                    let _ = down.write_response_header(answer).await;
                }
                return Outcome::Close;
            }
        }
        let plan = match eligible(down.req_header()) {
            true => self.plan(&down),
            false => None,
        };
        let Some(plan) = plan else {
            let raw = down.get_headers_raw_bytes();
            return Outcome::Declined(down.into_inner(), raw);
        };
        SERVED.fetch_add(1, Ordering::Relaxed);
        let _request = RequestCount::new(self.requests.clone());
        let started = Instant::now();
        let mut trace = Trace::default();
        let reusable = self.proxy(&mut down, &plan, &mut trace).await;
        self.observe(&down, &plan, &trace, started);
        if !reusable {
            down.shutdown().await;
            return Outcome::Close;
        }
        match down.reuse().await {
            Ok(Some(reusable)) => {
                let (stream, early) = reusable.into_parts();
                Outcome::KeepAlive(stream, early)
            }
            _ => Outcome::Close,
        }
    }

    /// Decides everything the proxy's `request_filter` decides for a
    /// request of this path; `None` when the proxy would refuse it, limit
    /// it or answer it by itself (then it is declined).
    fn plan(&self, down: &DownstreamSession) -> Option<Plan> {
        let req = down.req_header();
        let snap = self.board.load();
        let peer = down
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let mut client = Client::identify(
            peer,
            req.headers
                .get_all(forwarded::X_FORWARDED_FOR)
                .iter()
                .map(|v| v.as_bytes()),
            &snap.settings.trusted_proxies,
        );
        client.tls = down.digest().ssl_digest.is_some();
        let authority = host::request_authority(req).ok()?;
        if let Side::Plain(plain) = &self.side {
            if plain.challenge(req).is_some() || plain.redirect(req, authority.as_ref()).is_some() {
                return None;
            }
        }
        let host = authority.as_ref().map(Authority::host);
        let target = snap.routes.table.resolve(host, req.uri.path()).ok()??;
        let RouteAction::Proxy(service) = target.action else {
            return None;
        };
        let limits = &target.limits;
        // A rate limit that counts only other methods (writes) stays out of the way.
        let rate_limited = limits
            .rate_limit
            .and_then(|i| snap.rate_limits.get(i))
            .is_some_and(|l| l.counts(&req.method));
        if rate_limited || limits.concurrency.is_some() || limits.token_budget.is_some() {
            return None;
        }
        if proxy::header_size(req) > snap.settings.max_header_size {
            return None;
        }
        let state = snap.services.get(service)?;
        if state.maintenance {
            return None;
        }
        let placement = split::place(state, req, client.ip, client.tls);
        let target_pool = InFlight::new(state.pick(placement.bucket).clone());
        let request_id = match req.headers.get(forwarded::X_REQUEST_ID) {
            Some(id) if forwarded::sane_request_id(id.as_bytes()) => id.clone(),
            _ => forwarded::new_request_id(),
        };
        Some(Plan {
            request_id,
            client,
            authority,
            service,
            route: target.index,
            read_timeout: limits.read_timeout,
            target: target_pool,
            set_cookie: placement.set_cookie,
            snap,
        })
    }

    /// Asks the backend and relays its answer; false when the client's
    /// connection must close afterwards.
    async fn proxy(&self, down: &mut DownstreamSession, plan: &Plan, trace: &mut Trace) -> bool {
        let settings = &plan.snap.settings;
        // Only where the client allows it (RFC 9112 §9.3), as the proxy does.
        if down.get_keepalive_timeout().is_some() {
            down.set_server_keepalive(Some(settings.keepalive_timeout.as_secs().max(1)));
        }
        down.set_write_timeout(Some(settings.send_timeout));
        let idempotent = down.req_header().method.is_idempotent();
        let pool = plan.target.pool();
        // As the proxy's retries go: each try avoids the backend that
        // failed when the pool has another; a kept-alive connection that
        // broke before any response byte is always worth another try, a
        // failed backend once (idempotent methods only).
        let mut failed_backend = None;
        let mut moved = false;
        let mut fresh = false;
        let mut tries = 0;
        let mut up = loop {
            tries += 1;
            let Some(backend) = failed_backend
                .and_then(|failed| pool.select(Some(failed)))
                .or_else(|| pool.select(None))
                .map(|b| b.addr)
            else {
                proxy::NO_HEALTHY_BACKEND.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "no healthy backend in the active pool: request ended early (expected outcome)"
                );
                return self
                    .answer_failure(down, plan, trace, Refusal::NoHealthyBackend)
                    .await;
            };
            // A new connection when the same backend is tried again.
            fresh &= failed_backend == Some(backend);
            trace.backend = Some(backend);
            let failed = match self.attempt(down, plan, pool, backend, fresh, trace).await {
                Ok(up) => break up,
                Err(failed) => failed,
            };
            if failed.gone {
                tracing::debug!(cause = %failed.error, "client gone before the response: request ended early (expected outcome)");
                return false;
            }
            self.count_upstream_error(plan, &failed);
            let another = !moved && pool.select(Some(backend)).is_some();
            if idempotent && tries < proxy::MAX_TRIES && (failed.stale || another) {
                moved |= !failed.stale;
                fresh = failed.stale;
                failed_backend = Some(backend);
                continue;
            }
            let code = respond::status_for(&failed.error);
            tracing::error!(cause = %failed.error, request = %summary(down.req_header(), plan), "fail to proxy");
            return self
                .answer_failure(down, plan, trace, Refusal::Upstream(code))
                .await;
        };
        trace.upstream_answered = Some(Instant::now());
        let Some(mut resp) = up.resp_header().map(|r| Box::new(r.clone())) else {
            return false;
        };
        let body_done = up.is_body_done();
        self.response_filter(down, plan, &mut resp, body_done, trace);
        trace.status = resp.status.as_u16();
        if let Err(e) = down.write_response_header(resp).await {
            tracing::debug!(cause = %e, "client gone before the response header: request ended early (expected outcome)");
            return false;
        }
        // The body, as it comes, while watching for the client leaving (a
        // stream may be quiet for a long time).
        loop {
            let read = tokio::select! {
                biased;
                read = up.read_body_bytes() => read,
                gone = down.read_body_or_idle(true) => {
                    let cause = gone.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::debug!(%cause, "client gone during the response: request ended early (expected outcome)");
                    return false;
                }
            };
            match read {
                Ok(Some(chunk)) => {
                    if let Err(e) = down.write_body(&chunk).await {
                        tracing::debug!(cause = %e, "client gone during the response body: request ended early (expected outcome)");
                        return false;
                    }
                }
                Ok(None) => break,
                Err(mut e) => {
                    // The client got a head and part of a body: the
                    // connection closes so that it cannot take it as whole.
                    e.as_up();
                    let failed = Failed::upstream(e, false, false);
                    self.count_upstream_error(plan, &failed);
                    tracing::error!(cause = %failed.error, request = %summary(down.req_header(), plan), "backend failed during the response body");
                    return false;
                }
            }
        }
        // Kept alive as the backend's answer allows (RFC 9112 §9.3).
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            if let Some(backend) = trace.backend {
                upstream_pool::put(backend, stream, self.pool_cap);
            }
        }
        match down.finish_body().await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(cause = %e, "client gone at the end of the response: request ended early (expected outcome)");
                false
            }
        }
    }

    /// One attempt at `backend`: a connection (kept-alive unless `fresh`),
    /// the request header, and the answer's head, interim `1xx` answers
    /// passed on to the client on the way. The client is watched while
    /// the backend prepares its answer: one that leaves ends the attempt.
    async fn attempt(
        &self,
        down: &mut DownstreamSession,
        plan: &Plan,
        pool: &Pool,
        backend: SocketAddr,
        fresh: bool,
        trace: &mut Trace,
    ) -> std::result::Result<UpstreamSession, Failed> {
        let idempotent = down.req_header().method.is_idempotent();
        let pooled = match fresh {
            true => None,
            false => upstream_pool::take(backend, !idempotent),
        };
        let reused = pooled.is_some();
        let stream = match pooled {
            Some(stream) => stream,
            None => connect(backend, pool.connect_timeout)
                .await
                .map_err(|mut error| {
                    error.as_up();
                    Failed::upstream(error, true, false)
                })?,
        };
        let mut up = UpstreamSession::new(stream);
        up.read_timeout = Some(plan.read_timeout);
        // Broken before any response byte, not by a timeout: a kept-alive
        // connection the backend closed meanwhile.
        let fail = |mut error: Box<Error>, up: &UpstreamSession| {
            error.as_up();
            let timeout = matches!(
                error.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            );
            let stale = reused && up.resp_header().is_none() && !timeout;
            Failed::upstream(error, false, stale)
        };
        let req = match upstream_request(down.req_header(), plan) {
            Ok(req) => req,
            Err(e) => return Err(fail(e, &up)),
        };
        trace.upstream_sent = Some(Instant::now());
        if let Err(e) = up.write_request_header(req).await {
            return Err(fail(e, &up));
        }
        loop {
            let read = tokio::select! {
                biased;
                read = up.read_response() => read,
                gone = down.read_body_or_idle(true) => {
                    let error = gone.err().unwrap_or_else(|| Error::new(ErrorType::ConnectionClosed));
                    return Err(Failed::gone(error));
                }
            };
            if let Err(e) = read {
                return Err(fail(e, &up));
            }
            let Some(status) = up.get_status() else {
                return Err(fail(Error::new(ErrorType::InvalidHTTPHeader), &up));
            };
            if status == http::StatusCode::SWITCHING_PROTOCOLS {
                // Nothing asked for an upgrade.
                let e = Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "101 to a request without Upgrade",
                );
                return Err(fail(e, &up));
            }
            if !status.is_informational() {
                return Ok(up);
            }
            if let Some(interim) = up.resp_header() {
                let interim = Box::new(interim.clone());
                if let Err(e) = down.write_response_header(interim).await {
                    return Err(Failed::gone(e));
                }
            }
        }
    }

    /// The proxy's `response_filter` for this path's answers.
    fn response_filter(
        &self,
        down: &DownstreamSession,
        plan: &Plan,
        resp: &mut ResponseHeader,
        body_done: bool,
        trace: &mut Trace,
    ) {
        trace.stream = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| respond::is_event_stream(v.as_bytes()));
        respond::strip_hop_by_hop(resp);
        // As Pingora's proxy does: a body delimited by the backend closing
        // its connection goes out chunked, so the client's is kept.
        let bodiless = down.req_header().method == http::Method::HEAD
            || matches!(resp.status.as_u16(), 204 | 304);
        let framed = resp.headers.contains_key(http::header::TRANSFER_ENCODING)
            || resp.headers.contains_key(http::header::CONTENT_LENGTH);
        let filtered = (|| -> Result<()> {
            if !bodiless && !framed && !body_done {
                resp.set_version(http::Version::HTTP_11);
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
            if let Some(cookie) = &plan.set_cookie {
                resp.append_header(http::header::SET_COOKIE, cookie.clone())?;
            }
            if let Side::Https(https) = &self.side {
                https.stamp(resp)?;
            }
            respond::stamp(resp, &plan.request_id)
        })();
        if let Err(e) = filtered {
            tracing::debug!(cause = %e, "response header not filtered");
        }
    }

    /// Answers a failed request with its error page; the connection closes
    /// after it, as the proxy's does.
    async fn answer_failure(
        &self,
        down: &mut DownstreamSession,
        plan: &Plan,
        trace: &mut Trace,
        refusal: Refusal,
    ) -> bool {
        trace.refusal = Some(refusal);
        trace.status = refusal.status();
        down.set_server_keepalive(None);
        let accept = down.req_header().headers.get(http::header::ACCEPT);
        let page = plan
            .snap
            .settings
            .pages
            .render(accept, &plan.request_id, refusal, false);
        let (mut resp, body) = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::debug!(cause = %e, "could not build error response");
                return false;
            }
        };
        if let Side::Https(https) = &self.side {
            let _ = https.stamp(&mut resp);
        }
        let sent = async {
            down.write_response_header(Box::new(resp)).await?;
            down.write_body(&body).await?;
            down.finish_body().await
        };
        if let Err(e) = sent.await {
            tracing::debug!(cause = %e, "could not send error response");
        }
        false
    }

    /// Tells the observers about a failed attempt at the backend.
    fn count_upstream_error(&self, plan: &Plan, failed: &Failed) {
        let Some(state) = plan.snap.services.get(plan.service) else {
            return;
        };
        let kind = record::upstream_error_kind(failed.error.etype(), failed.connecting);
        let color = plan.target.pool().color;
        for observer in &self.observers {
            observer.upstream_error(&state.name, color, kind);
        }
    }

    /// Tells the observers about the finished request (metrics, access log).
    fn observe(&self, down: &DownstreamSession, plan: &Plan, trace: &Trace, started: Instant) {
        if self.observers.is_empty() {
            return;
        }
        let req = down.req_header();
        let record = RequestRecord {
            request_id: plan.request_id.to_str().unwrap_or("-"),
            client: Some(plan.client.ip),
            method: req.method.as_str(),
            host: plan.authority.as_ref().map(Authority::host),
            path: req.uri.path(),
            status: trace.status,
            service: plan.snap.services.get(plan.service).map(|s| &*s.name),
            color: Some(plan.target.pool().color),
            route: plan.snap.routes.label(plan.route),
            backend: trace.backend,
            upstream_time: trace
                .upstream_sent
                .zip(trace.upstream_answered)
                .map(|(sent, answered)| answered.saturating_duration_since(sent)),
            total_time: started.elapsed(),
            bytes_in: 0,
            bytes_out: down.body_bytes_sent(),
            refusal: trace.refusal,
            stream: trace.stream,
        };
        for observer in &self.observers {
            observer.observe(&record);
        }
    }
}

/// Whether a parsed request is of the kind this path serves (see the
/// module's doc): HTTP/1.1, not `CONNECT`, no body framing, no upgrade or
/// expectation, and a `Connection` that names no other field.
fn eligible(req: &RequestHeader) -> bool {
    use http::header;
    if req.version != http::Version::HTTP_11 || req.method == http::Method::CONNECT {
        return false;
    }
    let h = &req.headers;
    let declined = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::EXPECT,
    ];
    if declined.iter().any(|name| h.contains_key(name)) || h.contains_key("http2-settings") {
        return false;
    }
    h.get_all(header::CONNECTION).iter().all(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .all(|t| {
                t.is_empty()
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"close")
            })
    })
}

/// The request as the backend gets it, from the client's: HTTP/1.1,
/// hop-by-hop fields removed (RFC 9110 §7.6.1; `Connection` named no other
/// field, see [`eligible`]), origin-form, the routed authority as `Host`,
/// and the forwarded headers.
fn upstream_request(req: &RequestHeader, plan: &Plan) -> Result<Box<RequestHeader>> {
    let mut up = Box::new(req.clone());
    up.set_version(http::Version::HTTP_11);
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "connection",
    ] {
        up.remove_header(name);
    }
    if let Some(origin) = host::origin_form(up.raw_path()) {
        up.set_raw_path(&origin)?;
    }
    match &plan.authority {
        Some(a) => up.insert_header(http::header::HOST, a.header_value().clone())?,
        None => up.insert_header(http::header::HOST, "")?,
    }
    forwarded::apply(
        &mut up,
        &plan.client,
        &plan.request_id,
        plan.authority.as_ref(),
    )?;
    Ok(up)
}

/// A new plain TCP connection to a backend, within `timeout`.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Stream> {
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return Err(Error::because(
                ErrorType::ConnectError,
                format!("connecting to {addr}"),
                e,
            ))
        }
        Err(_) => {
            return Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("connecting to {addr}: no answer within {timeout:?}"),
            )
        }
    };
    tcp.set_nodelay(true)
        .or_err(ErrorType::ConnectError, "setting TCP_NODELAY")?;
    Ok(Box::new(L4Stream::from(tcp)))
}

/// The request as log lines describe it: method, path, host; never the
/// query string (it may carry tokens).
fn summary(req: &RequestHeader, plan: &Plan) -> String {
    let host = plan.authority.as_ref().map_or("-", Authority::host);
    format!("{} {}, Host: {host}", req.method, req.uri.path())
}
