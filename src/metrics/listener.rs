//! The metrics listener (`[listen] metrics`): `GET /metrics` (Prometheus
//! text format), `/healthz` (the process runs), `/readyz` (ready for
//! traffic, else 503 and why) and `/status` (a JSON summary standing in for
//! nginx's `stub_status`, answered to loopback clients only, as nginx's
//! usually is). GET and HEAD only; no authentication: bind it to loopback
//! or a network only the scraper reaches.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use super::state::State;

/// Content type of the Prometheus text exposition format, version 0.0.4.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the endpoints from the shared metrics state.
pub struct MetricsApi {
    state: Arc<State>,
}

impl MetricsApi {
    /// Serves `state`: the registry, its sources and the readiness checks.
    pub fn new(state: Arc<State>) -> MetricsApi {
        MetricsApi { state }
    }

    async fn answer(
        &self,
        method: &Method,
        path: &str,
        loopback: bool,
    ) -> (StatusCode, &'static str, Vec<u8>) {
        match Endpoint::of(method, path, loopback) {
            Endpoint::Metrics => match self.state.encode() {
                Ok(body) => (StatusCode::OK, TEXT_FORMAT, body),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot encode metrics");
                    json_answer(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({ "error": format!("cannot encode metrics: {e}") }),
                    )
                }
            },
            Endpoint::Healthz => json_answer(StatusCode::OK, json!({ "status": "alive" })),
            Endpoint::Readyz => match self.state.not_ready().await {
                None => json_answer(StatusCode::OK, json!({ "status": "ready" })),
                Some(reason) => json_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "status": "not ready", "reason": reason }),
                ),
            },
            Endpoint::Status => json_answer(StatusCode::OK, self.state.status()),
            Endpoint::StatusElsewhere => json_answer(
                StatusCode::FORBIDDEN,
                json!({ "error": "/status answers loopback clients only" }),
            ),
            Endpoint::BadMethod => json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "only GET and HEAD" }),
            ),
            Endpoint::Unknown => json_answer(
                StatusCode::NOT_FOUND,
                json!({ "error": "not found: /metrics, /healthz, /readyz, /status" }),
            ),
        }
    }
}

/// What a request to the metrics listener asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Healthz,
    Readyz,
    Status,
    /// `/status` from a client that is not on loopback (403).
    StatusElsewhere,
    /// Not GET or HEAD (405).
    BadMethod,
    Unknown,
}

impl Endpoint {
    fn of(method: &Method, path: &str, loopback: bool) -> Endpoint {
        if method != Method::GET && method != Method::HEAD {
            return Endpoint::BadMethod;
        }
        match path {
            "/metrics" => Endpoint::Metrics,
            "/healthz" => Endpoint::Healthz,
            "/readyz" => Endpoint::Readyz,
            "/status" if loopback => Endpoint::Status,
            "/status" => Endpoint::StatusElsewhere,
            _ => Endpoint::Unknown,
        }
    }
}

fn json_answer(
    status: StatusCode,
    value: serde_json::Value,
) -> (StatusCode, &'static str, Vec<u8>) {
    let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    body.push(b'\n');
    (status, "application/json", body)
}

#[async_trait]
impl ServeHttp for MetricsApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        let loopback = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| a.ip().is_loopback());
        let (status, content_type, body) = self.answer(&method, &path, loopback).await;
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // A body may follow that was not read: do not reuse the connection.
            session.set_keepalive(None);
        }
        let mut resp = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(http::header::SERVER, crate::respond::SERVER)
            .header(http::header::CACHE_CONTROL, "no-store");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp = resp.header(http::header::ALLOW, "GET, HEAD");
        }
        resp.body(body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_for_loopback_clients_and_only_get_and_head_are_served() {
        assert_eq!(
            Endpoint::of(&Method::GET, "/status", true),
            Endpoint::Status
        );
        assert_eq!(
            Endpoint::of(&Method::GET, "/status", false),
            Endpoint::StatusElsewhere
        );
        // The scraper's endpoints answer wherever the listener is bound.
        assert_eq!(
            Endpoint::of(&Method::GET, "/metrics", false),
            Endpoint::Metrics
        );
        assert_eq!(
            Endpoint::of(&Method::HEAD, "/readyz", false),
            Endpoint::Readyz
        );
        assert_eq!(
            Endpoint::of(&Method::POST, "/metrics", true),
            Endpoint::BadMethod
        );
        assert_eq!(
            Endpoint::of(&Method::GET, "/metrics/", true),
            Endpoint::Unknown
        );
    }
}
