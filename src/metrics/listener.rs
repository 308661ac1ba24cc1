//! The metrics listener (`[listen] metrics`): `GET /metrics` (Prometheus
//! text format), `/healthz` (the process runs), `/readyz` (ready for
//! traffic, else 503 and why) and `/status` (a JSON summary standing in for
//! nginx's `stub_status`). GET and HEAD only; no authentication: bind it to
//! loopback or a network only the scraper reaches.

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

    async fn answer(&self, method: &Method, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
        if method != Method::GET && method != Method::HEAD {
            return json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "only GET and HEAD" }),
            );
        }
        match path {
            "/metrics" => match self.state.encode() {
                Ok(body) => (StatusCode::OK, TEXT_FORMAT, body),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot encode metrics");
                    json_answer(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({ "error": format!("cannot encode metrics: {e}") }),
                    )
                }
            },
            "/healthz" => json_answer(StatusCode::OK, json!({ "status": "alive" })),
            "/readyz" => match self.state.not_ready().await {
                None => json_answer(StatusCode::OK, json!({ "status": "ready" })),
                Some(reason) => json_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "status": "not ready", "reason": reason }),
                ),
            },
            "/status" => json_answer(StatusCode::OK, self.state.status()),
            _ => json_answer(
                StatusCode::NOT_FOUND,
                json!({ "error": "not found: /metrics, /healthz, /readyz, /status" }),
            ),
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
        let (status, content_type, body) = self.answer(&method, &path).await;
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
