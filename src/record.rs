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
    /// Index into `Config::services` of the service the request was routed to.
    pub service: Option<usize>,
    /// The color of the pool the request started on.
    pub color: Option<Color>,
    /// Index into `Config::routes` of the route that matched.
    pub route: Option<usize>,
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
}

/// Something told about every finished request.
pub trait Observer: Send + Sync {
    fn observe(&self, record: &RequestRecord<'_>);
}
