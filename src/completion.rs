//! One OpenAI-compatible completion on a route with a token budget, through
//! the proxy phases: its body read and checked, tokens reserved, the body
//! the backend receives, the response read for its usage, the reservation
//! settled.
//!
//! Where the body is read depends on what Pingora can replay to the
//! backend. A body of known length up to [`EARLY_BODY_LIMIT`] is read in
//! `request_filter`, before any backend is contacted: a refusal costs the
//! backend nothing, and Pingora sends the checked body from its retry
//! buffer (which holds that much). A larger or chunked body is read as it
//! streams, after the backend connection is open and the request head is
//! sent (chunked, since the body's length changes); a refusal then aborts
//! that backend request before its body is complete, so no backend work
//! starts either way.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use crate::limits::key::Key;
use crate::limits::openai::{self, Endpoint, UsageScan};
use crate::limits::tokens::{Reservation, TokenBudget, TokenCounts};
use crate::respond::{self, Refusal};

/// Largest body checked before the backend is contacted (64 KiB: the size
/// of Pingora's retry buffer, through which the checked body is sent).
pub const EARLY_BODY_LIMIT: usize = 64 * 1024;

/// A completion request on its way through the proxy.
pub struct Completion {
    budget: Arc<TokenBudget>,
    service: Option<Arc<TokenCounts>>,
    key: Key,
    endpoint: Endpoint,
    /// Read in `request_filter` (known length up to [`EARLY_BODY_LIMIT`]).
    early: bool,
    /// The body as read so far (late path), bounded by the route's `max_body`.
    read: BytesMut,
    /// The checked body, until it is handed to Pingora for the backend.
    body: Option<Bytes>,
    /// Length of the checked body (early path), for `Content-Length`.
    body_len: Option<usize>,
    strip_usage: bool,
    reservation: Option<Reservation>,
    scan: Option<UsageScan>,
    /// A refusal decided after the backend request began (late path),
    /// answered by `fail_to_proxy`.
    pub refusal: Option<Refusal>,
}

impl Completion {
    /// The completion `req` is, if it is a charged endpoint of a route with
    /// `budget`; `client` is its address after `trusted_proxies`.
    /// `service` counts the tokens of the route's service.
    pub fn of(
        budget: &Arc<TokenBudget>,
        service: Option<&Arc<TokenCounts>>,
        req: &RequestHeader,
        client: IpAddr,
    ) -> Option<Completion> {
        // Matched as the backend reads the path, so no spelling of it
        // (`/v1/chat/%63ompletions`) escapes the budget.
        let path = crate::route::normalize_path(req.uri.path()).ok()?;
        let endpoint = Endpoint::of(&req.method, &path)?;
        Some(Completion {
            budget: budget.clone(),
            service: service.cloned(),
            key: budget.key(req, client),
            endpoint,
            early: false,
            read: BytesMut::new(),
            body: None,
            body_len: None,
            strip_usage: false,
            reservation: None,
            scan: None,
            refusal: None,
        })
    }

    /// The largest body this completion accepts: the budget's `max_body`,
    /// or the route's if smaller.
    pub fn max_body(&self, route_max: usize) -> usize {
        self.budget.settings().max_body.min(route_max)
    }

    /// Reads and checks the whole body now when its length is known and
    /// small enough for Pingora to replay ([`EARLY_BODY_LIMIT`]); else the
    /// body is checked as it streams ([`Completion::body_filter`]).
    ///
    /// # Errors
    /// `Ok(Err(refusal))` to answer the client; `Err` when reading failed
    /// (the client went away or stalled past the body timeout).
    pub async fn read_early(
        &mut self,
        session: &mut Session,
        content_length: Option<usize>,
    ) -> Result<Result<(), Refusal>> {
        if content_length.is_none_or(|n| n > EARLY_BODY_LIMIT) {
            return Ok(Ok(()));
        }
        self.early = true;
        let downstream = session.as_downstream_mut();
        // The body is sent on from the retry buffer, which only records
        // what is read after it is enabled.
        downstream.enable_retry_buffering();
        // Failures here are the client's (gone, or stalled past the body
        // timeout: 408), never the backend's, which is not contacted yet.
        if downstream
            .get_header(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            downstream
                .write_continue_response()
                .await
                .map_err(|e| e.into_down())?;
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = downstream
            .read_request_body()
            .await
            .map_err(|e| e.into_down())?
        {
            body.extend_from_slice(&chunk);
        }
        Ok(self.admit(&body).await)
    }

    /// Counts a body over `max_body` (refused with 413 by the proxy).
    pub fn count_too_large(&self) {
        self.budget.stats().refused_invalid.fetch_add(1, Relaxed);
    }

    /// Checks `body`, reserves its worst case and keeps the body to send.
    async fn admit(&mut self, body: &[u8]) -> Result<(), Refusal> {
        let stats = self.budget.stats();
        let checked = match openai::check(body, self.endpoint, self.budget.settings()) {
            Ok(checked) => checked,
            Err(invalid) => {
                stats.refused_invalid.fetch_add(1, Relaxed);
                return Err(Refusal::Invalid(invalid));
            }
        };
        let mut reservation = self
            .budget
            .reserve_for(self.key, checked.reserve)
            .await
            .map_err(|e| Refusal::TokensExhausted {
                retry: whole_seconds(e.retry_after),
                limit: self.budget.settings().tokens_per_minute,
                remaining: e.remaining,
                reset: whole_seconds(e.reset),
            })?;
        if let Some(service) = &self.service {
            reservation.count_for(service.clone());
        }
        self.reservation = Some(reservation);
        self.strip_usage = checked.strip_usage;
        self.body_len = Some(checked.body.len());
        self.body = Some(checked.body);
        Ok(())
    }

    /// Prepares the request head for the backend: the checked body's
    /// length (or chunked framing while the body is still to be read), no
    /// `Expect` once the body is read, and no content coding in the answer
    /// so its usage can be read.
    pub fn upstream_request(&mut self, upstream: &mut RequestHeader) -> Result<()> {
        match self.body_len {
            Some(len) => {
                upstream.remove_header(&http::header::TRANSFER_ENCODING);
                upstream.remove_header(&http::header::EXPECT);
                upstream.insert_header(http::header::CONTENT_LENGTH, len)?;
            }
            None => {
                upstream.remove_header(&http::header::CONTENT_LENGTH);
                upstream.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
        }
        upstream.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        // The body sent on is the checked JSON itself, whatever the client
        // declared (a body it had encoded would not have parsed).
        upstream.remove_header(&http::header::CONTENT_ENCODING);
        if let Some(r) = self.reservation.as_mut() {
            r.mark_sent();
        }
        Ok(())
    }

    /// Puts the checked body in place of what the client sent. Early path:
    /// Pingora hands over the buffered body once; late path: the body is
    /// held back until its end, then checked.
    ///
    /// # Errors
    /// A refusal of the late path, also kept in [`Completion::refusal`]
    /// for `fail_to_proxy` to answer.
    pub async fn body_filter(&mut self, body: &mut Option<Bytes>, end: bool) -> Result<()> {
        if self.early {
            *body = self.body.take();
            return Ok(());
        }
        if let Some(chunk) = body.as_ref() {
            self.read.extend_from_slice(chunk);
        }
        if !end {
            // Held back: empty is skipped, where `None` would end the
            // backend's body.
            *body = Some(Bytes::new());
            return Ok(());
        }
        let read = std::mem::take(&mut self.read);
        if let Err(refusal) = self.admit(&read).await {
            self.refusal = Some(refusal);
            return Error::e_explain(
                HTTPStatus(refusal.status()),
                "completion refused by its token budget",
            );
        }
        // The backend already has the request head.
        if let Some(r) = self.reservation.as_mut() {
            r.mark_sent();
        }
        *body = self.body.take();
        Ok(())
    }

    /// Starts reading the backend's answer; makes it chunked when the
    /// usage chunk is to be taken out of the stream, and tells
    /// the client where its budget stands (`RateLimit-*`, tokens, with
    /// this request's reservation still held).
    pub fn response(&mut self, resp: &mut ResponseHeader) -> Result<()> {
        if let Some(r) = &self.reservation {
            let (remaining, reset) = r.standing();
            respond::rate_limit_fields(
                resp,
                self.budget.settings().tokens_per_minute,
                remaining,
                whole_seconds(reset),
            )?;
        }
        let events = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| respond::is_event_stream(v.as_bytes()));
        let scan = UsageScan::new(events, self.strip_usage);
        if scan.rewrites() {
            // Shortened: chunked now (Pingora frames an answer before this
            // filter runs, so without it the body would end by closing the
            // connection; HTTP/2 and HTTP/1.0 drop the field again).
            resp.remove_header(&http::header::CONTENT_LENGTH);
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        self.scan = Some(scan);
        Ok(())
    }

    /// Reads a piece of the answer; at its end, settles the reservation
    /// with the usage found.
    pub fn response_body(&mut self, body: &mut Option<Bytes>, end: bool) {
        let Some(scan) = self.scan.as_mut() else {
            return;
        };
        scan.feed(body, end);
        if end {
            if let (Some(used), Some(r)) = (scan.usage(), self.reservation.as_mut()) {
                r.settle(used);
            }
        }
    }

    /// Ends the completion. A reservation that reached a backend but saw
    /// no usage (an upstream error, a client gone mid-stream) is kept
    /// whole, and said so.
    pub fn finish(&mut self, request_id: &http::HeaderValue, status: u16) {
        let Some(r) = self.reservation.take() else {
            return;
        };
        if r.is_unsettled() {
            tracing::info!(
                request_id = request_id.to_str().unwrap_or("-"),
                budget = self.budget.name(),
                tokens = r.tokens(),
                status,
                "no usage in the completion's response: its reservation is kept"
            );
        }
    }
}

/// Whole seconds, rounded up: a client that waits that long is let through.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
