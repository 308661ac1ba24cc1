//! The answers switchyard gives itself: refusals, the maintenance page, and
//! the headers stamped on every response (`Server`, `X-Request-Id`), with
//! a backend answer's hop-by-hop headers taken off.
//!
//! Every refusal is short: JSON `{"error": "..."}`, except 503s, which browsers
//! get as the HTML maintenance page (JSON when they ask for it with `Accept`).
//! On AI routes (those with a token budget) every refusal is JSON in
//! OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`,
//! which OpenAI's SDKs turn into their typed errors (429 `RateLimitError`,
//! 400 `BadRequestError`...).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::ErrorSource;

use crate::forwarded::X_REQUEST_ID;
use crate::host::HostError;
use crate::limits::openai::Invalid;
use crate::route::BadPath;

/// The `Server` header on every response: no version, nothing to fingerprint.
pub const SERVER: &str = "switchyard";

/// The page used when `server.maintenance_page` is not set.
pub const BUILTIN_PAGE: &str = include_str!("../conf/maintenance.html");

/// Why the proxy answered by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoRoute,
    Denied,
    /// A path backends would read differently, or above `/`: see `route.rs`.
    BadPath(BadPath),
    /// No valid, single authority (`Host`, absolute-form target): see `host.rs`.
    BadHost(HostError),
    HeaderTooLarge,
    BodyTooLarge(usize),
    WebSocketNotAllowed,
    /// The client is over its rate (`limit` requests per window); it may
    /// send again in `retry` seconds.
    RateLimited {
        retry: u64,
        limit: u32,
    },
    /// A completion request the token budget refuses before reserving (400).
    Invalid(Invalid),
    /// The key's token bucket cannot cover the request now (429): it holds
    /// `remaining` of `limit` tokens, enough in `retry` seconds, full in
    /// `reset` seconds.
    TokensExhausted {
        retry: u64,
        limit: u64,
        remaining: u64,
        reset: u64,
    },
    /// Every slot of the route's concurrency cap is taken and the queue is
    /// full or the wait ran out; worth retrying in this many seconds.
    Busy(u64),
    Maintenance,
    NoHealthyBackend,
    /// The backend failed: 502, or 504 on a timeout.
    Upstream(u16),
    /// The client's request broke while it was being proxied (framing such
    /// as a bad chunk: 400; a body that stalled: 408).
    Client(u16),
    /// Pingora's parser answered by itself before any proxy phase ran (400
    /// for a request it cannot parse, 405 for CONNECT): reported, never sent
    /// from here.
    Unparsed(u16),
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::NoRoute | Refusal::Denied => 404,
            Refusal::BadPath(_)
            | Refusal::BadHost(_)
            | Refusal::WebSocketNotAllowed
            | Refusal::Invalid(_) => 400,
            Refusal::HeaderTooLarge => 431,
            Refusal::BodyTooLarge(_) => 413,
            Refusal::RateLimited { .. } | Refusal::TokensExhausted { .. } => 429,
            Refusal::Busy(_) | Refusal::Maintenance | Refusal::NoHealthyBackend => 503,
            Refusal::Upstream(code) | Refusal::Client(code) | Refusal::Unparsed(code) => code,
        }
    }

    fn message(self) -> String {
        match self {
            Refusal::NoRoute => "no route for this host and path".into(),
            Refusal::Denied => "not found".into(),
            Refusal::BadPath(e) => format!("bad request path: {e}"),
            Refusal::BadHost(e) => format!("bad request host: {e}"),
            Refusal::HeaderTooLarge => "request header too large".into(),
            Refusal::BodyTooLarge(max) => format!("request body larger than {max} bytes"),
            Refusal::WebSocketNotAllowed => "WebSocket is not enabled on this route".into(),
            Refusal::RateLimited { .. } => "too many requests, slow down".into(),
            Refusal::Invalid(e) => e.to_string(),
            Refusal::TokensExhausted { retry, .. } => {
                format!("token budget used up, try again in {retry} s")
            }
            Refusal::Busy(_) => "too many requests in flight, try again later".into(),
            Refusal::Maintenance => "service under maintenance".into(),
            Refusal::NoHealthyBackend => "no healthy backend, try again later".into(),
            Refusal::Upstream(504) => "upstream timed out".into(),
            Refusal::Upstream(_) => "upstream failed".into(),
            Refusal::Client(408) => "request body not received in time".into(),
            Refusal::Client(_) | Refusal::Unparsed(_) => "bad request".into(),
        }
    }

    /// The refusal's reason as metrics and the access log name it.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::Denied => "deny",
            Refusal::BadPath(_)
            | Refusal::BadHost(_)
            | Refusal::WebSocketNotAllowed
            | Refusal::Unparsed(_) => "bad_request",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::BodyTooLarge(_) => "body_too_large",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Invalid(_) => "invalid_completion",
            Refusal::TokensExhausted { .. } => "tokens_exhausted",
            Refusal::Busy(_) => "busy",
            Refusal::Maintenance => "maintenance",
            Refusal::NoHealthyBackend => "no_healthy_backend",
            Refusal::Upstream(504) => "upstream_timeout",
            Refusal::Upstream(_) => "upstream_error",
            Refusal::Client(_) => "client_error",
        }
    }

    /// OpenAI's `type`, `code` and `param` for the refusal.
    fn openai_kind(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            Refusal::Invalid(e) => ("invalid_request_error", e.code(), e.param()),
            Refusal::RateLimited { .. } => ("requests", "rate_limit_exceeded", None),
            Refusal::TokensExhausted { .. } => ("tokens", "rate_limit_exceeded", None),
            Refusal::BodyTooLarge(_) => ("invalid_request_error", "request_too_large", None),
            Refusal::HeaderTooLarge => ("invalid_request_error", "headers_too_large", None),
            Refusal::NoRoute | Refusal::Denied => ("invalid_request_error", "not_found", None),
            Refusal::BadPath(_)
            | Refusal::BadHost(_)
            | Refusal::WebSocketNotAllowed
            | Refusal::Client(_)
            | Refusal::Unparsed(_) => ("invalid_request_error", "bad_request", None),
            Refusal::Busy(_) => ("server_error", "overloaded", None),
            Refusal::Maintenance => ("server_error", "maintenance", None),
            Refusal::NoHealthyBackend => ("server_error", "no_healthy_backend", None),
            Refusal::Upstream(504) => ("server_error", "upstream_timeout", None),
            Refusal::Upstream(_) => ("server_error", "upstream_error", None),
        }
    }

    /// Refusals sent before the request body was read leave the connection
    /// in an unknown state: close it.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Refusal::HeaderTooLarge
                | Refusal::BodyTooLarge(_)
                | Refusal::WebSocketNotAllowed
                | Refusal::BadHost(_)
                | Refusal::Unparsed(_)
        )
    }
}

/// The 503 page and `Retry-After`, loaded once at start-up.
#[derive(Clone)]
pub struct Pages {
    page: Bytes,
    retry_after: String,
}

impl Pages {
    /// The built-in 503 page with `Retry-After: retry_after` (nothing to read).
    pub fn builtin(retry_after: Duration) -> Pages {
        Pages {
            page: Bytes::from_static(BUILTIN_PAGE.as_bytes()),
            retry_after: retry_after.as_secs().max(1).to_string(),
        }
    }

    pub fn new(page: Option<&Path>, retry_after: Duration) -> std::io::Result<Pages> {
        let page = match page {
            Some(path) => Bytes::from(std::fs::read(path)?),
            None => Bytes::from_static(BUILTIN_PAGE.as_bytes()),
        };
        Ok(Pages {
            page,
            retry_after: retry_after.as_secs().max(1).to_string(),
        })
    }

    /// Writes the whole answer for `refusal`; `openai`: in OpenAI's error
    /// shape (an AI route).
    pub async fn send(
        &self,
        session: &mut Session,
        request_id: &http::HeaderValue,
        refusal: Refusal,
        openai: bool,
    ) -> Result<()> {
        let accept = session.req_header().headers.get(http::header::ACCEPT);
        let (resp, body) = self.render(accept, request_id, refusal, openai)?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// The answer for `refusal` as a head and a body, for a client that
    /// sent `accept`: the configured HTML page for a 503 unless the client
    /// asks for JSON, else a JSON error (`openai`: in OpenAI's error shape).
    pub fn render(
        &self,
        accept: Option<&http::HeaderValue>,
        request_id: &http::HeaderValue,
        refusal: Refusal,
        openai: bool,
    ) -> Result<(ResponseHeader, Bytes)> {
        let status = refusal.status();
        let wants_json =
            accept.is_some_and(|a| a.to_str().is_ok_and(|a| a.contains("application/json")));
        let (content_type, body) = if status == 503 && !wants_json && !openai {
            ("text/html; charset=utf-8", self.page.clone())
        } else {
            let json = match openai {
                true => {
                    let (kind, code, param) = refusal.openai_kind();
                    serde_json::json!({ "error": {
                        "message": refusal.message(), "type": kind, "param": param, "code": code,
                    }})
                }
                false => serde_json::json!({ "error": refusal.message() }),
            };
            ("application/json", Bytes::from(format!("{json}\n")))
        };
        let mut resp = ResponseHeader::build(status, Some(8))?;
        resp.insert_header(http::header::CONTENT_TYPE, content_type)?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        match refusal {
            Refusal::RateLimited { retry, limit } => {
                resp.insert_header(http::header::RETRY_AFTER, retry.to_string())?;
                rate_limit_fields(&mut resp, u64::from(limit), 0, retry)?;
            }
            Refusal::TokensExhausted {
                retry,
                limit,
                remaining,
                reset,
            } => {
                resp.insert_header(http::header::RETRY_AFTER, retry.to_string())?;
                rate_limit_fields(&mut resp, limit, remaining, reset)?;
            }
            Refusal::Busy(secs) => {
                resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?
            }
            _ if status == 503 => {
                resp.insert_header(http::header::RETRY_AFTER, &self.retry_after)?
            }
            _ => {}
        }
        stamp(&mut resp, request_id)?;
        Ok((resp, body))
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds),
/// the fields of the IETF httpapi draft "RateLimit header fields for HTTP"
/// in the form most clients read (one field each).
pub fn rate_limit_fields(
    resp: &mut ResponseHeader,
    limit: u64,
    remaining: u64,
    reset: u64,
) -> Result<()> {
    resp.insert_header("ratelimit-limit", limit.to_string())?;
    resp.insert_header("ratelimit-remaining", remaining.to_string())?;
    resp.insert_header("ratelimit-reset", reset.to_string())
}

/// Whether a `Content-Type` value is `text/event-stream` (server-sent
/// events); media types are case-insensitive (RFC 9110 §8.3.1).
pub fn is_event_stream(content_type: &[u8]) -> bool {
    const EVENT_STREAM: &[u8] = b"text/event-stream";
    content_type
        .get(..EVENT_STREAM.len())
        .is_some_and(|t| t.eq_ignore_ascii_case(EVENT_STREAM))
}

/// Headers every response carries.
pub fn stamp(resp: &mut ResponseHeader, request_id: &http::HeaderValue) -> Result<()> {
    resp.insert_header(http::header::SERVER, SERVER)?;
    resp.insert_header(X_REQUEST_ID, request_id.clone())
}

/// Removes a backend answer's hop-by-hop headers, which describe the
/// backend's connection to switchyard, not switchyard's to the client (RFC
/// 9110 §7.6.1): the fields `Connection` names, `Connection` itself
/// (Pingora writes its own for the client's connection), `Keep-Alive`,
/// `Proxy-Connection`, `TE` and, outside a `101 Switching Protocols`,
/// `Upgrade`. Framing fields (`Content-Length`, `Transfer-Encoding`) are
/// Pingora's to handle and are never removed by name.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    for name in ["keep-alive", "proxy-connection", "te"] {
        resp.remove_header(name);
    }
    // A 101's `Connection: Upgrade` and `Upgrade` are the handshake itself,
    // which Pingora passes on to the client.
    if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let named: Vec<http::HeaderName> = resp
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|token| http::HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| {
            *name != http::header::CONTENT_LENGTH && *name != http::header::TRANSFER_ENCODING
        })
        .collect();
    for name in named {
        resp.remove_header(&name);
    }
    resp.remove_header(&http::header::CONNECTION);
    resp.remove_header(&http::header::UPGRADE);
}

/// The status to answer for a failed proxy attempt; 0 when the client is gone.
pub fn status_for(e: &Error) -> u16 {
    match e.etype() {
        HTTPStatus(code) => *code,
        ConnectTimedout | ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => 0,
                ReadTimedout => 408,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_of_backend_answers_are_removed() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (name, value) in [
            ("connection", "keep-alive, X-Backend-Conn"),
            ("connection", "content-length"),
            ("x-backend-conn", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("content-length", "3"),
            ("x-kept", "yes"),
        ] {
            resp.append_header(name, value).unwrap();
        }
        strip_hop_by_hop(&mut resp);
        let mut left: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-kept"]);

        let mut switching = ResponseHeader::build(101, None).unwrap();
        switching.append_header("connection", "Upgrade").unwrap();
        switching.append_header("upgrade", "websocket").unwrap();
        strip_hop_by_hop(&mut switching);
        assert!(switching.headers.contains_key("upgrade"));
        assert!(switching.headers.contains_key("connection"));
    }
}
