//! The request's story, as Pingora phases. Each phase stays thin: the rules
//! live in `route.rs` (where to go), `pools.rs` (which color, which backend),
//! `host.rs` (which host the request is for), `forwarded.rs` (who the client
//! is) and `respond.rs` (the proxy's own answers).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorSource;

use crate::completion::{self, Completion};
use crate::config::{RouteAction, RouteLimits};
use crate::forwarded::{self, Client};
use crate::host::{self, Authority};
use crate::limits::concurrency::{self, Permit};
use crate::pools::{InFlight, Snapshot};
use crate::record::{Observer, RequestRecord};
use crate::respond::{self, Refusal};
use crate::split;
use crate::switchboard::Switchboard;
use crate::tls::http::{self as tls_http, Side};

/// Requests answered 503 because no backend of the active pool was healthy,
/// since start (for the metrics listener to come, issue 11). Logged at debug
/// only: under an outage every request would otherwise add an ERROR line.
pub static NO_HEALTHY_BACKEND: AtomicU64 = AtomicU64::new(0);

pub use crate::settings::Settings;

/// Attempts per request at most (3): a stale kept-alive upstream connection
/// is retried, and a refused or reset one moves once to another backend.
pub const MAX_TRIES: usize = 3;

pub struct Proxy {
    /// Routes, limits, settings, colors and pools: one snapshot, loaded
    /// once per request (`request_filter`) and kept in its `Ctx`.
    board: Arc<Switchboard>,
    /// Every request between its headers and its log line; shutdown waits for 0.
    requests: Arc<AtomicUsize>,
    /// The listener this instance serves: plain HTTP or HTTPS.
    side: Side,
    /// Told about every finished request (metrics, access log).
    observers: Vec<Arc<dyn Observer>>,
}

impl Proxy {
    pub fn new(board: Arc<Switchboard>, requests: Arc<AtomicUsize>) -> Proxy {
        Proxy {
            board,
            requests,
            side: Side::PlainOnly,
            observers: Vec::new(),
        }
    }

    /// Tells `observer` about every finished request.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Proxy {
        self.observers.push(observer);
        self
    }

    /// Serves the plain or HTTPS listener's TLS duties (`tls/http.rs`).
    pub fn with_side(mut self, side: Side) -> Proxy {
        self.side = side;
        self
    }
}

/// Per-request state. Holds the snapshot the request started with (routes,
/// limits, settings, colors) and the pool picked from it, so its later
/// phases, retries and accounting stay on that config and color, whatever
/// a switch or a reload does meanwhile.
pub struct Ctx {
    _request: RequestCount,
    /// When the request head was read.
    started: Instant,
    /// Loaded once, first thing in `request_filter`.
    snap: Option<Arc<Snapshot>>,
    /// Indexes of the service and route the request was routed to, in `snap`.
    service: Option<usize>,
    route: Option<usize>,
    /// Why the proxy answered by itself, when it did.
    refusal: Option<Refusal>,
    /// When the request head went to the backend, and when its response
    /// head came back (the upstream time of the access log).
    upstream_sent: Option<Instant>,
    upstream_answered: Option<Instant>,
    /// The answer is a stream (upgrade or server-sent events).
    stream: bool,
    request_id: http::HeaderValue,
    client: Option<Client>,
    /// The one authority the request is for (`host.rs`), set once in
    /// `request_filter`; routing, the upstream `Host` and the forwarded
    /// headers all read it from here. `None` for HTTP/1.0 without `Host`.
    authority: Option<Authority>,
    /// The client speaks HTTP/1.0: no chunked framing, no 1xx, no upgrades.
    http10: bool,
    limits: RouteLimits,
    websocket: bool,
    target: Option<InFlight>,
    /// The sticky-bucket cookie for a client new to a split (`split.rs`).
    set_cookie: Option<http::HeaderValue>,
    /// The backend of the latest attempt, avoided by a retry.
    backend: Option<SocketAddr>,
    retried: bool,
    response_started: bool,
    body_bytes: usize,
    /// The slot of the route's concurrency cap, given back when the
    /// request ends, however it ends (the context is dropped then; for an
    /// upgraded connection, when the connection closes).
    _slot: Option<Permit>,
    /// An OpenAI-compatible completion on a route with a token budget.
    completion: Option<Completion>,
}

/// One request counted in flight from its creation to its drop (shutdown
/// waits for the count to reach 0).
struct RequestCount(Arc<AtomicUsize>);

impl RequestCount {
    fn new(requests: Arc<AtomicUsize>) -> RequestCount {
        requests.fetch_add(1, Ordering::Relaxed);
        RequestCount(requests)
    }
}

impl Drop for RequestCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    /// No modules: Pingora's default adds a (disabled) compression module to
    /// every request. switchyard never compresses, so streams are never held
    /// back for it, and the module's per-request work is saved.
    /// HTTPS only: the HSTS header, on every answer.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        if let Side::Https(https) = &self.side {
            https.modules(modules);
        }
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _request: RequestCount::new(self.requests.clone()),
            started: Instant::now(),
            snap: None,
            service: None,
            route: None,
            refusal: None,
            upstream_sent: None,
            upstream_answered: None,
            stream: false,
            request_id: http::HeaderValue::from_static(""),
            client: None,
            authority: None,
            http10: false,
            limits: RouteLimits::default(),
            websocket: false,
            target: None,
            set_cookie: None,
            backend: None,
            retried: false,
            response_started: false,
            body_bytes: 0,
            _slot: None,
            completion: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Pipelined requests (RFC 9112 §9.3.2) are answered in order, one
        // after the other; Pingora's default drops all but the first.
        session.as_downstream_mut().set_pipelining_enabled(true);
        crate::framing::check(session.req_header_mut())?;
        let req = session.req_header();
        ctx.request_id = match req.headers.get(forwarded::X_REQUEST_ID) {
            Some(id) if forwarded::sane_request_id(id.as_bytes()) => id.clone(),
            _ => forwarded::new_request_id(),
        };
        // The one load of the request: every later phase reads `ctx.snap`.
        let snap = self.board.load();
        ctx.snap = Some(snap.clone());
        // ACME challenges come first: nothing may stand in their way.
        if let Side::Plain(plain) = &self.side {
            if let Some(answer) = plain.challenge(req) {
                tls_http::send(session, &ctx.request_id, answer).await?;
                return Ok(true);
            }
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let req = session.req_header();
        let forwarded_for = req.headers.get_all(forwarded::X_FORWARDED_FOR);
        let mut client = Client::identify(
            peer,
            forwarded_for.iter().map(|v| v.as_bytes()),
            &snap.settings.trusted_proxies,
        );
        client.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let client_ip = client.ip;
        ctx.client = Some(client);
        ctx.http10 = req.version < http::Version::HTTP_11;
        if ctx.http10 {
            // RFC 9110 §15.2: no 1xx interim responses to an HTTP/1.0 client.
            session.set_ignore_info_resp(true);
        }
        let req = session.req_header();
        ctx.authority = match host::request_authority(req) {
            Ok(authority) => authority,
            Err(e) => return self.refuse(session, ctx, Refusal::BadHost(e)).await,
        };
        if let Side::Plain(plain) = &self.side {
            if let Some(answer) = plain.redirect(session.req_header(), ctx.authority.as_ref()) {
                tls_http::send(session, &ctx.request_id, answer).await?;
                return Ok(true);
            }
        }
        let req = session.req_header();

        let host = ctx.authority.as_ref().map(Authority::host);
        let target = match snap.routes.table.resolve(host, req.uri.path()) {
            Ok(Some(target)) => target,
            Ok(None) => return self.refuse(session, ctx, Refusal::NoRoute).await,
            Err(e) => return self.refuse(session, ctx, Refusal::BadPath(e)).await,
        };
        ctx.route = Some(target.index);
        let service = match target.action {
            RouteAction::Proxy(service) => service,
            RouteAction::Deny => return self.refuse(session, ctx, Refusal::Denied).await,
        };
        ctx.limits = target.limits;
        if let RouteAction::Proxy(service) = target.action {
            ctx.service = Some(service);
        }
        // After routing, so an AI route answers in OpenAI's shape.
        if header_size(req) > snap.settings.max_header_size {
            return self.refuse(session, ctx, Refusal::HeaderTooLarge).await;
        }
        // RFC 9110 §7.8: an HTTP/1.0 client's Upgrade is ignored.
        ctx.websocket = !ctx.http10 && is_websocket_upgrade(req);
        if ctx.websocket && !target.limits.websocket {
            return self
                .refuse(session, ctx, Refusal::WebSocketNotAllowed)
                .await;
        }
        if content_length(req).is_some_and(|n| n > target.limits.max_body) {
            return self
                .refuse(session, ctx, Refusal::BodyTooLarge(target.limits.max_body))
                .await;
        }
        let rate_limit = target
            .limits
            .rate_limit
            .and_then(|i| snap.rate_limits.get(i));
        if let Some(limit) = rate_limit {
            if let Err(wait) = limit.admit(req, client_ip).await {
                let retry = completion::whole_seconds(wait);
                let refusal = Refusal::RateLimited {
                    retry,
                    limit: limit.requests(),
                };
                return self.refuse(session, ctx, refusal).await;
            }
        }

        let s = &snap.settings;
        // Only where the client allows it: HTTP/1.1 unless `Connection:
        // close`, HTTP/1.0 only with `Connection: keep-alive` (RFC 9112 §9.3).
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(s.keepalive_timeout.as_secs().max(1)));
        }
        let (read, write) = match ctx.websocket {
            true => (target.limits.idle_timeout, target.limits.idle_timeout),
            false => (s.body_timeout, s.send_timeout),
        };
        session.set_read_timeout(Some(read));
        session.set_write_timeout(Some(write));

        let budget = target.limits.token_budget.and_then(|i| snap.budgets.get(i));
        let req = session.req_header();
        let counts = snap.budgets.service(service);
        if let Some(mut completion) = budget.and_then(|b| Completion::of(b, counts, req, client_ip))
        {
            ctx.limits.max_body = completion.max_body(target.limits.max_body);
            let length = content_length(req);
            if length.is_some_and(|n| n > ctx.limits.max_body) {
                completion.count_too_large();
                let refusal = Refusal::BodyTooLarge(ctx.limits.max_body);
                return self.refuse(session, ctx, refusal).await;
            }
            if let Err(refusal) = completion.read_early(session, length).await? {
                return self.refuse(session, ctx, refusal).await;
            }
            ctx.completion = Some(completion);
        }
        if let Some(cap) = target
            .limits
            .concurrency
            .and_then(|i| snap.concurrency.get(i))
        {
            ctx._slot = match cap.admit(session, client_ip).await {
                Ok(permit) => Some(permit),
                // Nobody to answer: end quietly, as any client gone (logged at debug).
                Err(concurrency::Refused::ClientGone) => {
                    return Err(Error::new_down(ConnectionClosed))
                }
                Err(_) => {
                    let retry = cap.retry_after();
                    return self.refuse(session, ctx, Refusal::Busy(retry)).await;
                }
            };
        }

        let Some(state) = snap.services.get(service) else {
            return Error::e_explain(InternalError, "route names a service the snapshot lacks");
        };
        if state.maintenance {
            return self.refuse(session, ctx, Refusal::Maintenance).await;
        }
        let https = ctx.client.as_ref().is_some_and(|c| c.tls);
        let placement = split::place(state, session.req_header(), client_ip, https);
        ctx.set_cookie = placement.set_cookie;
        ctx.target = Some(InFlight::new(state.pick(placement.bucket).clone()));
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Chunked bodies carry no length up front: count as they stream.
        ctx.body_bytes += body.as_ref().map_or(0, Bytes::len);
        if !ctx.websocket && ctx.body_bytes > ctx.limits.max_body {
            if let Some(c) = &ctx.completion {
                c.count_too_large();
            }
            return Error::e_explain(HTTPStatus(413), "request body over the route's max_body");
        }
        match ctx.completion.as_mut() {
            Some(completion) => completion.body_filter(body, end_of_stream).await,
            None => Ok(()),
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pool = ctx
            .target
            .as_ref()
            .map(InFlight::pool)
            .ok_or_else(|| Error::explain(InternalError, "no pool chosen for request"))?;
        // A retry avoids the backend that just failed, if the pool has another.
        let backend = ctx
            .backend
            .and_then(|failed| pool.select(Some(failed)))
            .or_else(|| pool.select(None))
            .ok_or_else(|| {
                Error::explain(HTTPStatus(503), "no healthy backend in the active pool")
            })?;
        ctx.backend = Some(backend.addr);
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(pool.connect_timeout);
        peer.options.read_timeout = Some(match ctx.websocket {
            true => ctx.limits.idle_timeout,
            false => ctx.limits.read_timeout,
        });
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(client) = &ctx.client else {
            return Error::e_explain(InternalError, "client not identified");
        };
        // The backend sees the authority the request was routed by, in
        // origin-form (RFC 9112 §3.2.1: a server expects absolute-form only
        // from proxies).
        if let Some(origin) = host::origin_form(upstream.raw_path()) {
            upstream.set_raw_path(&origin)?;
        }
        match &ctx.authority {
            Some(a) => upstream.insert_header(http::header::HOST, a.header_value().clone())?,
            // HTTP/1.1 to the backend needs a Host; empty when the client
            // named none (RFC 9112 §3.2).
            None => upstream.insert_header(http::header::HOST, "")?,
        }
        if ctx.http10 {
            // RFC 9110 §10.1.1 and §7.8: ignored for HTTP/1.0, so the
            // backend (spoken to in HTTP/1.1) must not see them either.
            upstream.remove_header(&http::header::EXPECT);
            upstream.remove_header(&http::header::UPGRADE);
        }
        if let Some(completion) = ctx.completion.as_mut() {
            completion.upstream_request(upstream)?;
        }
        ctx.upstream_sent = Some(Instant::now());
        forwarded::apply(upstream, client, &ctx.request_id, ctx.authority.as_ref())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.response_started = true;
        ctx.upstream_answered = Some(Instant::now());
        ctx.stream = resp.status == http::StatusCode::SWITCHING_PROTOCOLS
            || resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| respond::is_event_stream(v.as_bytes()));
        respond::strip_hop_by_hop(resp);
        if let Some(cookie) = ctx.set_cookie.take() {
            resp.append_header(http::header::SET_COOKIE, cookie)?;
        }
        // Before the HTTP/1.0 framing: a stream it shortens is chunked.
        if let Some(completion) = ctx.completion.as_mut() {
            completion.response(resp)?;
        }
        if ctx.http10 {
            http10_framing(session, resp)?;
        }
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Some(target) = ctx.target.as_mut() {
                target.mark_upgraded();
            }
        }
        respond::stamp(resp, &ctx.request_id)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(completion) = ctx.completion.as_mut() {
            completion.response_body(body, end_of_stream);
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if let Some(completion) = ctx.completion.as_mut() {
            completion.finish(&ctx.request_id, status);
        }
        if self.observers.is_empty() {
            return;
        }
        let req = session.req_header();
        let snap = ctx.snap.as_deref();
        let service = ctx
            .service
            .and_then(|s| snap?.services.get(s))
            .map(|s| &*s.name);
        let record = RequestRecord {
            request_id: ctx.request_id.to_str().unwrap_or("-"),
            client: ctx.client.as_ref().map(|c| c.ip),
            method: req.method.as_str(),
            host: ctx.authority.as_ref().map(Authority::host),
            path: req.uri.path(),
            status,
            service,
            // Refused before a pool was picked: the service's active color
            // in the snapshot the request started with.
            color: ctx
                .target
                .as_ref()
                .map(|t| t.pool().color)
                .or_else(|| Some(snap?.services.get(ctx.service?)?.active)),
            route: ctx.route.and_then(|r| snap?.routes.label(r)),
            backend: ctx.backend,
            upstream_time: ctx
                .upstream_sent
                .zip(ctx.upstream_answered)
                .map(|(sent, answered)| answered.saturating_duration_since(sent)),
            total_time: ctx.started.elapsed(),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            refusal: ctx.refusal,
            stream: ctx.stream,
        };
        for observer in &self.observers {
            observer.observe(&record);
        }
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.count_upstream_error(ctx, &e, true);
        if self.may_retry(session, ctx) {
            ctx.retried = true;
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        self.count_upstream_error(ctx, &e, false);
        let mut e = e.more_context(format!("peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.retry_buffer_truncated() {
            e.set_retry(false);
        } else if !ctx.response_started && self.may_retry(session, ctx) {
            // Reset before any response byte: nothing reached the client yet.
            ctx.retried = true;
            e.set_retry(true);
        } else {
            // A stale kept-alive upstream connection is always worth one more try.
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    /// The request as Pingora's log lines describe it: method, path and
    /// host, without the query string, which may carry tokens
    /// (`?access_token=...`) that must not reach the log.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = ctx.authority.as_ref().map_or("-", Authority::host);
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    /// Expected outcomes are logged at debug instead of Pingora's ERROR
    /// line; real failures (the backend's, ours) still log. Expected: a 503
    /// for no healthy backend (counted), and every failure on the client's
    /// side of the connection, which is a client mistake or a client gone
    /// (a body over `max_body`, broken chunked framing, a body that stalls,
    /// a client that hangs up mid-response): under a flood these would
    /// bury the errors an operator must see.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        let no_backend = matches!(e.etype(), HTTPStatus(503));
        if no_backend {
            NO_HEALTHY_BACKEND.fetch_add(1, Ordering::Relaxed);
        }
        let refused = ctx.completion.as_ref().is_some_and(|c| c.refusal.is_some());
        let client_side = refused
            || matches!(e.etype(), HTTPStatus(413))
            || e.esource() == &ErrorSource::Downstream;
        let expected = no_backend || client_side;
        if expected {
            tracing::debug!(cause = %e, "request ended early (expected outcome)");
        }
        expected
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = respond::status_for(e);
        if code > 0 && session.response_written().is_none() {
            let late = ctx.completion.as_ref().and_then(|c| c.refusal);
            let refusal = match code {
                _ if late.is_some() => late.unwrap_or(Refusal::Client(code)),
                503 => Refusal::NoHealthyBackend,
                413 => Refusal::BodyTooLarge(ctx.limits.max_body),
                code if e.esource() == &ErrorSource::Downstream => Refusal::Client(code),
                code => Refusal::Upstream(code),
            };
            ctx.refusal = Some(refusal);
            // The connection is not reused (below): the answer says so.
            session.set_keepalive(None);
            let snap = ctx.snap.clone().unwrap_or_else(|| self.board.load());
            let openai = ctx.limits.token_budget.is_some();
            let sent = snap
                .settings
                .pages
                .send(session, &ctx.request_id, refusal, openai);
            if let Err(err) = sent.await {
                tracing::debug!(cause = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

impl Proxy {
    /// Tells the observers about a failed upstream attempt; failures on the
    /// client's side of the connection are not the backend's.
    fn count_upstream_error(&self, ctx: &Ctx, e: &Error, connecting: bool) {
        if self.observers.is_empty() || e.esource() == &ErrorSource::Downstream {
            return;
        }
        let (Some(service), Some(target)) = (ctx.service, ctx.target.as_ref()) else {
            return;
        };
        let Some(state) = ctx.snap.as_deref().and_then(|s| s.services.get(service)) else {
            return;
        };
        let kind = crate::record::upstream_error_kind(e.etype(), connecting);
        for observer in &self.observers {
            observer.upstream_error(&state.name, target.pool().color, kind);
        }
    }

    /// One retry per request, idempotent methods only, and only where the
    /// pool has another backend to try (never the other color).
    fn may_retry(&self, session: &Session, ctx: &Ctx) -> bool {
        !ctx.retried
            && session.req_header().method.is_idempotent()
            && ctx
                .target
                .as_ref()
                .zip(ctx.backend)
                .is_some_and(|(t, failed)| t.pool().select(Some(failed)).is_some())
    }

    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, refusal: Refusal) -> Result<bool> {
        ctx.refusal = Some(refusal);
        if refusal.closes_connection() {
            session.set_keepalive(None);
        }
        let snap = ctx.snap.clone().unwrap_or_else(|| self.board.load());
        snap.settings
            .pages
            .send(
                session,
                &ctx.request_id,
                refusal,
                ctx.limits.token_budget.is_some(),
            )
            .await?;
        Ok(true)
    }
}

/// Frames a response for an HTTP/1.0 client, which cannot decode chunked
/// transfer coding (RFC 9112 §6.1: no `Transfer-Encoding` in a response to
/// a 1.0 request). Pingora relays a backend's chunked body (or adds chunking
/// to an unframed one) as chunked; without `Transfer-Encoding` it writes the
/// plain body instead, delimited by `Content-Length` if the backend gave one,
/// else by closing the connection (RFC 9112 §6.3), so keep-alive ends here.
/// A transfer coding other than chunked cannot be undone here: 502.
fn http10_framing(session: &mut Session, resp: &mut ResponseHeader) -> Result<()> {
    let Some(te) = resp.headers.get(http::header::TRANSFER_ENCODING) else {
        return Ok(());
    };
    if !te.as_bytes().eq_ignore_ascii_case(b"chunked")
        || resp
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .count()
            > 1
    {
        return Error::e_explain(
            HTTPStatus(502),
            "backend transfer coding an HTTP/1.0 client cannot decode",
        );
    }
    resp.remove_header(&http::header::TRANSFER_ENCODING);
    let bodyless = session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304);
    if !bodyless && !resp.headers.contains_key(http::header::CONTENT_LENGTH) {
        session.set_keepalive(None);
    }
    Ok(())
}

fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn content_length(req: &RequestHeader) -> Option<usize> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes of the request line and headers as they came on the wire (close enough).
fn header_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.raw_path().len() + 12;
    req.headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}
