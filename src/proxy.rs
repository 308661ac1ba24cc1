//! The request's story, as Pingora phases. Each phase stays thin: the rules
//! live in `route.rs` (where to go) and `pools.rs` (which color, which backend).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::config::RouteAction;
use crate::pools::{InFlight, Switchboard};
use crate::route::RouteTable;

pub struct Proxy {
    routes: RouteTable,
    board: Arc<Switchboard>,
    /// Every request between its headers and its log line; shutdown waits for 0.
    requests: Arc<AtomicUsize>,
}

impl Proxy {
    pub fn new(routes: RouteTable, board: Arc<Switchboard>, requests: Arc<AtomicUsize>) -> Proxy {
        Proxy {
            routes,
            board,
            requests,
        }
    }
}

/// Per-request state. Holds the pool picked from the snapshot the request
/// started with, so retries and accounting stay on that color.
pub struct Ctx {
    _request: RequestCount,
    target: Option<InFlight>,
}

struct RequestCount(Arc<AtomicUsize>);

impl Drop for RequestCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ctx {
            _request: RequestCount(self.requests.clone()),
            target: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host());
        let action = match self.routes.resolve(host, req.uri.path()) {
            Ok(action) => action,
            Err(_) => return respond(session, 400, "bad request path").await,
        };
        let service = match action {
            Some(RouteAction::Proxy(service)) => service,
            Some(RouteAction::Deny) => return respond(session, 404, "not found").await,
            None => return respond(session, 404, "no route for this host and path").await,
        };
        let snapshot = self.board.load();
        let pool = snapshot.services[service].active_pool().clone();
        ctx.target = Some(InFlight::new(pool));
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pool = ctx
            .target
            .as_ref()
            .map(InFlight::pool)
            .ok_or_else(|| Error::explain(InternalError, "no pool chosen for request"))?;
        let backend = pool
            .select()
            .ok_or_else(|| Error::explain(HTTPStatus(503), "pool has no backends"))?;
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(pool.connect_timeout);
        Ok(Box::new(peer))
    }
}

/// Answers from the proxy itself with a short JSON body.
async fn respond(session: &mut Session, status: u16, message: &str) -> Result<bool> {
    let body = Bytes::from(serde_json::json!({ "error": message }).to_string());
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}
