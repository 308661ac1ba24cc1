//! What happened to one request, gathered when it ends (Pingora's `logging`
//! phase) for the observers that report on it: the metrics and the access
//! log. Everything here is bounded and free of secrets: the path without its
//! query, no header values, the client's address only.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::pools::Color;
use crate::respond::Refusal;

/// One finished request.
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    /// `X-Request-Id` as sent to the backend and the client.
    pub request_id: &'a str,
    /// The client's address after `trusted_proxies`.
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// The request's host (validated, lower-case, no port).
    pub host: Option<&'a str>,
    /// The request path without its query string (which may carry tokens).
    pub path: &'a str,
    /// The status sent to the client; 0 when none was (the client left).
    pub status: u16,
    /// The name of the service the request was routed to. A name, not an
    /// index: a request that outlives a config reload still names it right.
    pub service: Option<&'a str>,
    /// The color of the pool the request started on.
    pub color: Option<Color>,
    /// The route that matched, as [`crate::config::Route::label`] names it.
    pub route: Option<&'a str>,
    /// The backend of the last attempt.
    pub backend: Option<SocketAddr>,
    /// From the request head sent to the backend to its response head.
    pub upstream_time: Option<Duration>,
    /// From the request head read to the end of the response.
    pub total_time: Duration,
    /// Request body bytes read from the client.
    pub bytes_in: usize,
    /// Response body bytes written to the client.
    pub bytes_out: usize,
    /// Why the proxy answered by itself, when it did.
    pub refusal: Option<Refusal>,
    /// The answer was a stream (a protocol upgrade such as WebSocket, or
    /// server-sent events): its total time is how long the stream stayed
    /// open, not how long the request took.
    pub stream: bool,
}

/// What went wrong on one failed upstream attempt, as
/// `switchyard_upstream_errors_total{kind}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection could not be made (refused, unreachable).
    Connect,
    /// Connecting, reading or writing took too long.
    Timeout,
    /// The backend closed or reset the connection mid-exchange.
    Reset,
    Other,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Other,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// Something told about every finished request.
pub trait Observer: Send + Sync {
    fn observe(&self, record: &RequestRecord<'_>);

    /// One failed upstream attempt of a request routed to service `service`
    /// (its name) on pool `color`; a request may fail more than once when
    /// it is retried. Ignored unless overridden.
    fn upstream_error(&self, _service: &str, _color: Color, _kind: UpstreamErrorKind) {}

    /// A config reload is in force: services, routes and limits may have
    /// come or gone. Requests that started before it may still be
    /// observed afterwards, naming what the old config had. Ignored unless
    /// overridden.
    fn config_reloaded(&self, _config: &crate::config::Config) {}
}

/// The kind of a Pingora upstream error; `connecting`: it happened while
/// the connection was being made (`fail_to_connect`).
pub fn upstream_error_kind(etype: &pingora::ErrorType, connecting: bool) -> UpstreamErrorKind {
    use pingora::ErrorType as E;
    match etype {
        E::ConnectTimedout | E::ReadTimedout | E::WriteTimedout | E::TLSHandshakeTimedout => {
            UpstreamErrorKind::Timeout
        }
        E::ConnectionClosed | E::ReadError | E::WriteError => UpstreamErrorKind::Reset,
        _ if connecting => UpstreamErrorKind::Connect,
        E::ConnectRefused | E::ConnectNoRoute | E::ConnectError | E::SocketError => {
            UpstreamErrorKind::Connect
        }
        _ => UpstreamErrorKind::Other,
    }
}
