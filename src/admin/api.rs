//! The admin API: HTTP in, a typed [`Command`] in the middle, JSON out.
//!
//! The handler only authenticates, parses the request into a `Command` and
//! formats the reply; [`dispatch`] does the work. `switchyard ctl` builds the
//! same `Command`s and sends them with [`Command::to_request`], so the two
//! sides cannot drift apart.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use ipnet::IpNet;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Tokens};
use crate::deploy::{DeployError, Deployer, Plan};
use crate::limits::concurrency::Concurrency;
use crate::limits::tokens::{TokenBudget, TokenCounts};
use crate::pools::{Color, ServiceState, SwitchError, SwitchKind, Weights};
use crate::reload::{ReloadError, Reloader};
use crate::rollback::Watcher;
use crate::store::Actor;
use crate::switchboard::Switchboard;
use crate::tls::store::{CertStatus, CertStore, RenewError};

/// Keys listed per concurrency cap by `GET /limits` (10): the heaviest.
pub const TOP_KEYS: usize = 10;

/// Largest request body the admin API reads (64 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// Everything the admin API can do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Status,
    /// Past color changes, of one service when `service` is set
    /// (`GET /history?service=NAME`).
    History {
        service: Option<String>,
    },
    Switch {
        service: String,
        to: Color,
        reason: Option<String>,
        /// Switch even when the target color is not healthy enough.
        force: bool,
    },
    Rollback {
        service: String,
        reason: Option<String>,
        force: bool,
    },
    Maintenance {
        service: String,
        on: bool,
    },
    /// Split new requests of `service` between its colors
    /// (`PUT /services/{name}/weights`, `{"blue": 90, "green": 10}`).
    Weights {
        service: String,
        weights: Weights,
        reason: Option<String>,
        /// Give traffic to a color even when it is not healthy enough.
        force: bool,
    },
    /// Every certificate: names, issuer, serial, validity, renewal state.
    Certs,
    /// Renew ACME certificate `name` now, whatever its schedule says.
    Renew {
        name: String,
    },
    /// Every concurrency cap and rate limit now: in flight, queued, top keys.
    Limits,
    /// Re-read the config file the process started with (`reload.rs`).
    Reload,
    /// Start a deploy of `service` (`POST /services/{name}/deploy`,
    /// `{"to": "green", "steps": [10, 50, 100], "interval": "60s",
    /// "wait_healthy": "5m", "reason": "..."}`; all but `to` optional).
    Deploy {
        service: String,
        plan: Plan,
    },
    /// The progress of `service`'s deploy (`GET /services/{name}/deploy`).
    DeployStatus {
        service: String,
    },
    /// Abort `service`'s deploy and restore the state from before it
    /// (`DELETE /services/{name}/deploy`, no body; the history names the
    /// token that asked).
    DeployAbort {
        service: String,
    },
}

impl Command {
    /// The HTTP request that carries this command: method, path, JSON body.
    pub fn to_request(&self) -> (Method, String, Option<Value>) {
        match self {
            Command::Status => (Method::GET, "/status".into(), None),
            Command::History { service: None } => (Method::GET, "/history".into(), None),
            Command::History {
                service: Some(service),
            } => (Method::GET, format!("/history?service={service}"), None),
            Command::Switch {
                service,
                to,
                reason,
                force,
            } => (
                Method::POST,
                format!("/services/{service}/switch"),
                Some(json!({ "to": to, "reason": reason, "force": force })),
            ),
            Command::Rollback {
                service,
                reason,
                force,
            } => (
                Method::POST,
                format!("/services/{service}/rollback"),
                Some(json!({ "reason": reason, "force": force })),
            ),
            Command::Maintenance { service, on } => (
                Method::POST,
                format!("/services/{service}/maintenance"),
                Some(json!({ "on": on })),
            ),
            Command::Weights {
                service,
                weights,
                reason,
                force,
            } => (
                Method::PUT,
                format!("/services/{service}/weights"),
                Some(json!({
                    "blue": weights.blue,
                    "green": weights.green,
                    "reason": reason,
                    "force": force,
                })),
            ),
            Command::Certs => (Method::GET, "/certs".into(), None),
            Command::Renew { name } => (Method::POST, format!("/certs/{name}/renew"), None),
            Command::Limits => (Method::GET, "/limits".into(), None),
            Command::Reload => (Method::POST, "/reload".into(), None),
            Command::Deploy { service, plan } => (
                Method::POST,
                format!("/services/{service}/deploy"),
                Some(json!({
                    "to": plan.to,
                    "steps": plan.steps,
                    "interval": crate::config::show_duration(plan.interval),
                    "wait_healthy": crate::config::show_duration(plan.wait_healthy),
                    "lease": crate::config::show_duration(plan.lease),
                    "reason": plan.reason,
                })),
            ),
            Command::DeployStatus { service } => {
                (Method::GET, format!("/services/{service}/deploy"), None)
            }
            Command::DeployAbort { service } => {
                (Method::DELETE, format!("/services/{service}/deploy"), None)
            }
        }
    }

    /// Parses an HTTP request into a command. `target` is the path with
    /// its query, if any; only `GET /history` reads a query.
    pub fn from_request(method: &Method, target: &str, body: &[u8]) -> Result<Command, ApiError> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["status"]) => Ok(Command::Status),
            (&Method::GET, ["history"]) => Ok(Command::History {
                service: history_filter(query)?,
            }),
            (&Method::POST, ["services", service, "switch"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    to: String,
                    reason: Option<String>,
                    #[serde(default)]
                    force: bool,
                }
                let b: Body = parse_body(body)?;
                let to =
                    b.to.parse::<Color>()
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                Ok(Command::Switch {
                    service: service.to_string(),
                    to,
                    reason: checked_reason(b.reason)?,
                    force: b.force,
                })
            }
            (&Method::POST, ["services", service, "rollback"]) => {
                #[derive(Deserialize, Default)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    reason: Option<String>,
                    #[serde(default)]
                    force: bool,
                }
                let b: Body = if body.iter().all(u8::is_ascii_whitespace) {
                    Body::default()
                } else {
                    parse_body(body)?
                };
                Ok(Command::Rollback {
                    service: service.to_string(),
                    reason: checked_reason(b.reason)?,
                    force: b.force,
                })
            }
            (&Method::POST, ["services", service, "maintenance"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    on: bool,
                }
                let b: Body = parse_body(body)?;
                Ok(Command::Maintenance {
                    service: service.to_string(),
                    on: b.on,
                })
            }
            (&Method::PUT, ["services", service, "weights"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    blue: u64,
                    green: u64,
                    reason: Option<String>,
                    #[serde(default)]
                    force: bool,
                }
                let b: Body = parse_body(body)?;
                let weights = Weights::new(b.blue, b.green)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                Ok(Command::Weights {
                    service: service.to_string(),
                    weights,
                    reason: checked_reason(b.reason)?,
                    force: b.force,
                })
            }
            (&Method::POST, ["services", service, "deploy"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    to: String,
                    steps: Option<Vec<u8>>,
                    interval: Option<String>,
                    wait_healthy: Option<String>,
                    lease: Option<String>,
                    reason: Option<String>,
                }
                let b: Body = parse_body(body)?;
                let duration = |v: Option<String>, default, what: &str| match v {
                    None => Ok(default),
                    Some(text) => crate::config::parse_duration(&text)
                        .map_err(|e| ApiError::BadRequest(format!("{what}: {e}"))),
                };
                let plan = Plan {
                    to: b
                        .to
                        .parse::<Color>()
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?,
                    steps: b.steps.unwrap_or(crate::deploy::DEFAULT_STEPS.to_vec()),
                    interval: duration(b.interval, crate::deploy::DEFAULT_INTERVAL, "interval")?,
                    wait_healthy: duration(
                        b.wait_healthy,
                        crate::deploy::DEFAULT_WAIT_HEALTHY,
                        "wait_healthy",
                    )?,
                    lease: duration(b.lease, crate::deploy::LEASE, "lease")?,
                    reason: checked_reason(b.reason)?,
                };
                plan.check().map_err(ApiError::BadRequest)?;
                Ok(Command::Deploy {
                    service: service.to_string(),
                    plan,
                })
            }
            (&Method::GET, ["services", service, "deploy"]) => Ok(Command::DeployStatus {
                service: service.to_string(),
            }),
            (&Method::DELETE, ["services", service, "deploy"]) => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(ApiError::BadRequest(
                        "DELETE /services/{name}/deploy takes no body".into(),
                    ));
                }
                Ok(Command::DeployAbort {
                    service: service.to_string(),
                })
            }
            (&Method::GET, ["certs"]) => Ok(Command::Certs),
            (&Method::GET, ["limits"]) => Ok(Command::Limits),
            (&Method::POST, ["reload"]) => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(ApiError::BadRequest("POST /reload takes no body".into()));
                }
                Ok(Command::Reload)
            }
            (&Method::POST, ["certs", name, "renew"]) => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(ApiError::BadRequest(
                        "POST /certs/{name}/renew takes no body".into(),
                    ));
                }
                Ok(Command::Renew {
                    name: name.to_string(),
                })
            }
            (
                _,
                ["status"]
                | ["history"]
                | ["certs"]
                | ["limits"]
                | ["reload"]
                | ["certs", _, "renew"]
                | ["services", _, "switch" | "rollback" | "maintenance" | "weights" | "deploy"],
            ) => Err(ApiError::MethodNotAllowed),
            _ => Err(ApiError::NotFound(format!("no admin endpoint {path}"))),
        }
    }
}

/// The `service=NAME` filter of `GET /history`; any other parameter, or a
/// name no service could have, is refused rather than ignored (a typo
/// would otherwise show the whole history as if it were the one service's).
fn history_filter(query: &str) -> Result<Option<String>, ApiError> {
    let mut service = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("service", name))
                if service.is_none()
                    && !name.is_empty()
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    }) =>
            {
                service = Some(name.to_string());
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "GET /history takes one query parameter, service=NAME (a service name)".into(),
                ))
            }
        }
    }
    Ok(service)
}

/// Longest switch or rollback reason kept in the history (500 characters).
pub const MAX_REASON_CHARS: usize = 500;

/// A reason goes into the log, the history and `ctl history` output: a
/// control character (a newline forging a log line, a terminal escape) or an
/// essay is refused rather than stored.
fn checked_reason(reason: Option<String>) -> Result<Option<String>, ApiError> {
    match reason {
        Some(r) if r.chars().any(char::is_control) => Err(ApiError::BadRequest(
            "reason must be one line of text without control characters".into(),
        )),
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        ))),
        r => Ok(r),
    }
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("client address not allowed")]
    Forbidden,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body over {MAX_BODY} bytes")]
    TooLarge,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// A dependency (Redis, with `[cluster]`) is unreachable: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A config reload refused: the file's problems, as `switchyard
    /// check` prints them, are in the answer's `errors` list.
    #[error("{message}")]
    InvalidConfig {
        message: String,
        errors: Vec<String>,
    },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InvalidConfig { .. } => StatusCode::BAD_REQUEST,
        }
    }
}

/// `GET /status`'s `cluster`: the Redis (URL, no password), whether it
/// answers (and, when not, why), this instance and the state version it serves, and the live
/// instances with the version each serves (from the last heartbeat).
fn cluster_json(board: &Switchboard, link: &crate::cluster::Link) -> Value {
    let stamp = board.stamp();
    json!({
        "redis": link.redis.url(),
        "reachable": link.is_up(),
        // While unreachable: why (the last failed call's error).
        "last_error": if link.is_up() { None } else { link.last_error() },
        "instance": link.instance,
        "version": stamp.as_ref().map(|s| s.version),
        "epoch": stamp.as_ref().map(|s| s.epoch.clone()),
        "local_change": stamp.is_some_and(|s| s.local),
        "instances": link.members(),
    })
}

impl From<SwitchError> for ApiError {
    fn from(e: SwitchError) -> Self {
        match e {
            SwitchError::UnknownService(_) => ApiError::NotFound(e.to_string()),
            SwitchError::NoPrevious(_)
            | SwitchError::NotHealthy { .. }
            | SwitchError::Moved(_)
            | SwitchError::ClusterConflict(_) => ApiError::Conflict(e.to_string()),
            SwitchError::ClusterDown(_) => ApiError::Unavailable(e.to_string()),
            SwitchError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        match e {
            ReloadError::Invalid { path, errors } => ApiError::InvalidConfig {
                message: format!(
                    "{} rejected, the running config is kept ({} problem{}; see errors)",
                    path.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                ),
                errors,
            },
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::UnknownService(_) | DeployError::None(_) => {
                ApiError::NotFound(e.to_string())
            }
            DeployError::Invalid(m) => ApiError::BadRequest(m),
            DeployError::Busy(m) | DeployError::Refused(m) => ApiError::Conflict(m),
        }
    }
}

impl From<RenewError> for ApiError {
    fn from(e: RenewError) -> Self {
        match e {
            RenewError::Unknown(_) => ApiError::NotFound(e.to_string()),
            RenewError::Static(_) => ApiError::Conflict(e.to_string()),
        }
    }
}

/// Carries out a command. The only place admin actions change anything.
/// `certs` is `None` when no HTTPS listener is configured.
/// `reloader` is `None` where reloads are not wired in (tests): a reload
/// is then refused.
/// `actor` is who asked, as the history records it.
/// `deploys`: the deploy tasks and the automatic rollback watcher, whose
/// live figures `GET /status` shows per service (`rollback`); `None` where
/// there are none (deploy requests are then 404).
pub fn dispatch(
    board: &Switchboard,
    certs: Option<&CertStore>,
    reloader: Option<&Reloader>,
    deploys: Option<&Arc<Deployer>>,
    actor: &Actor,
    cmd: Command,
) -> Result<Value, ApiError> {
    let watcher: Option<&Watcher> = deploys.map(|d| &**d.watcher());
    let no_deploys = || ApiError::NotFound("deploys are not available here".into());
    match cmd {
        Command::Deploy { service, plan } => Ok(deploys
            .ok_or_else(no_deploys)?
            .start(&service, plan, actor)?),
        Command::DeployStatus { service } => {
            Ok(deploys.ok_or_else(no_deploys)?.progress(&service, actor)?)
        }
        Command::DeployAbort { service } => Ok(deploys
            .ok_or_else(no_deploys)?
            .abort(&service, format!("deploy aborted by {actor}"))?),
        Command::Status => {
            let snap = board.load();
            let services: serde_json::Map<String, Value> = snap
                .services
                .iter()
                .map(|s| {
                    let mut v = service_json(s);
                    v["rollback"] = watcher.and_then(|w| w.status(s)).unwrap_or(Value::Null);
                    (s.name.to_string(), v)
                })
                .collect();
            let mut status = json!({ "services": services });
            if let Some(link) = &snap.settings.cluster {
                status["cluster"] = cluster_json(board, link);
            }
            Ok(status)
        }
        Command::History { service } => {
            let events = board
                .history(service.as_deref())
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json!({ "events": events }))
        }
        Command::Switch {
            service,
            to,
            reason,
            force,
        } => Ok(service_json(&board.switch(
            &service,
            to,
            SwitchKind::Switch,
            reason,
            force,
            actor,
        )?)),
        Command::Rollback {
            service,
            reason,
            force,
        } => Ok(service_json(
            &board.rollback(&service, reason, force, actor)?,
        )),
        Command::Maintenance { service, on } => {
            Ok(service_json(&board.set_maintenance(&service, on, actor)?))
        }
        Command::Weights {
            service,
            weights,
            reason,
            force,
        } => Ok(service_json(&board.set_weights(
            &service,
            weights,
            SwitchKind::Switch,
            reason,
            force,
            actor,
        )?)),
        Command::Certs => {
            let list: Vec<Value> = certs
                .map(CertStore::status)
                .unwrap_or_default()
                .iter()
                .map(cert_json)
                .collect();
            Ok(json!({ "certificates": list }))
        }
        Command::Reload => {
            let reloader =
                reloader.ok_or_else(|| ApiError::Internal("reload is not available".into()))?;
            let outcome = reloader.reload(actor)?;
            serde_json::to_value(outcome).map_err(|e| ApiError::Internal(e.to_string()))
        }
        Command::Limits => {
            // The limits in force now: a reload replaces them.
            let snap = board.load();
            let limits = Some(&*snap);
            let caps: serde_json::Map<String, Value> = limits
                .into_iter()
                .flat_map(|l| l.concurrency.iter())
                .map(|c| (c.name().to_string(), cap_json(c)))
                .collect();
            let rates: serde_json::Map<String, Value> = limits
                .into_iter()
                .flat_map(|l| l.rate_limits.iter())
                .map(|r| {
                    let counts = json!({
                        "keys": r.clients(),
                        "checked": r.checked(),
                        "refused": r.refused(),
                        "resets": r.resets(),
                    });
                    (r.name().to_string(), counts)
                })
                .collect();
            let budgets: serde_json::Map<String, Value> = limits
                .into_iter()
                .flat_map(|l| l.budgets.iter())
                .map(|b| (b.name().to_string(), budget_json(b)))
                .collect();
            let services: serde_json::Map<String, Value> = limits
                .into_iter()
                .flat_map(|l| l.budgets.services())
                .map(|(name, c)| (name.to_string(), token_counts_json(c)))
                .collect();
            Ok(json!({
                "concurrency": caps,
                "rate_limits": rates,
                "token_budgets": budgets,
                "tokens_by_service": services,
            }))
        }
        Command::Renew { name } => {
            let store = certs.ok_or_else(|| RenewError::Unknown(name.clone()))?;
            store.request_renewal(&name)?;
            tracing::info!(certificate = %name, %actor, "renewal requested through the admin API");
            let status = store.get(&name).ok_or(RenewError::Unknown(name))?;
            Ok(json!({ "renewal": "requested", "certificate": cert_json(&status) }))
        }
    }
}

/// One concurrency cap as `GET /limits` shows it. Header keys appear only
/// as their keyed hash (`hash:...`), never as the value.
pub fn cap_json(cap: &Concurrency) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let now = cap.snapshot(TOP_KEYS);
    let stats = cap.stats();
    let top: Vec<Value> = now
        .top_keys
        .iter()
        .map(|(key, in_flight, queued)| {
            json!({ "key": key.to_string(), "in_flight": in_flight, "queued": queued })
        })
        .collect();
    json!({
        "max_in_flight": now.max_in_flight,
        "per_key": now.per_key,
        "queue": now.queue,
        "in_flight": now.in_flight,
        "queue_depth": now.queue_depth,
        "keys": now.keys,
        "top_keys": top,
        "admitted": stats.admitted.load(Relaxed),
        "queued": stats.queued.load(Relaxed),
        "refused": {
            "queue_full": stats.refused_queue_full.load(Relaxed),
            "timeout": stats.refused_timeout.load(Relaxed),
        },
        "abandoned": stats.abandoned.load(Relaxed),
    })
}

/// One token budget as `GET /limits` shows it: its settings, the keys
/// furthest below a full bucket (`used`: tokens short of full, about what
/// they spent in the last minute) and token counts since start. Header
/// keys appear only as their keyed hash.
pub fn budget_json(b: &TokenBudget) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let settings = b.settings();
    let stats = b.stats();
    let top: Vec<Value> = b
        .top(TOP_KEYS)
        .iter()
        .map(|(key, used)| json!({ "key": key.to_string(), "used": used }))
        .collect();
    json!({
        "tokens_per_minute": settings.tokens_per_minute,
        "max_tokens": settings.max_tokens,
        "default_max_tokens": settings.default_max_tokens,
        "keys": b.keys(),
        "top_keys": top,
        "admitted": stats.admitted.load(Relaxed),
        "refused": {
            "exhausted": stats.refused_exhausted.load(Relaxed),
            "invalid": stats.refused_invalid.load(Relaxed),
        },
        "tokens": {
            "reserved": stats.reserved.load(Relaxed),
            "settled": stats.settled.load(Relaxed),
            "refunded": stats.refunded.load(Relaxed),
            "kept": stats.kept.load(Relaxed),
            "overrun": stats.overrun.load(Relaxed),
            "held": stats.held(),
        },
    })
}

/// One service's tokens since start, over every budget its routes name.
pub fn token_counts_json(c: &TokenCounts) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "reserved": c.reserved.load(Relaxed),
        "settled": c.settled.load(Relaxed),
        "refunded": c.refunded.load(Relaxed),
        "kept": c.kept.load(Relaxed),
    })
}

/// RFC 3339 in UTC, whole seconds: what `GET /certs` shows for times.
fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One certificate as the API shows it. Times are RFC 3339 UTC; `serial`
/// is lower-case hex; `next_renewal` is `null` for static certificates.
pub fn cert_json(c: &CertStatus) -> Value {
    let info = c.info.as_ref();
    json!({
        "name": c.name,
        "source": c.source.as_str(),
        "domains": c.domains,
        "bootstrap": c.bootstrap,
        "issuer": info.map(|i| i.issuer.clone()),
        "serial": info.map(|i| i.serial.clone()),
        "not_before": info.map(|i| rfc3339(i.not_before)),
        "not_after": info.map(|i| rfc3339(i.not_after)),
        "next_renewal": c.next_renewal.map(rfc3339),
        "last_error": c.last_error,
        "failures": c.failures,
        "failures_total": c.failures_total,
    })
}

/// One service as the API shows it.
pub fn service_json(s: &ServiceState) -> Value {
    let pool = |c: Color| -> Vec<Value> {
        s.pool(c)
            .backends
            .iter()
            .map(|b| {
                json!({
                    "addr": b.addr.to_string(),
                    "health": b.health.status(),
                    "last_error": b.health.last_error(),
                })
            })
            .collect()
    };
    let per_color = |f: fn(&crate::pools::Pool) -> usize| json!({ "blue": f(s.pool(Color::Blue)), "green": f(s.pool(Color::Green)) });
    json!({
        "name": &*s.name,
        "active": s.active,
        "previous": s.previous,
        "weights": s.weights,
        "sticky": s.sticky.map(|k| match k {
            crate::config::Sticky::Cookie => "cookie",
            crate::config::Sticky::ClientIp => "client_ip",
        }),
        "maintenance": s.maintenance,
        "min_healthy": s.gated.then(|| json!({
            "blue": s.required_healthy(Color::Blue),
            "green": s.required_healthy(Color::Green),
        })),
        "pools": { "blue": pool(Color::Blue), "green": pool(Color::Green) },
        "in_flight": per_color(crate::pools::Pool::in_flight),
        "upgraded": per_color(crate::pools::Pool::upgraded),
    })
}

/// The admin listener's application.
pub struct AdminApi {
    board: Arc<Switchboard>,
    certs: Option<Arc<CertStore>>,
    reloader: Option<Arc<Reloader>>,
    deploys: Option<Arc<Deployer>>,
    tokens: Tokens,
    allow: Vec<IpNet>,
}

impl AdminApi {
    /// `certs`: the served certificates, `None` without an HTTPS listener.
    /// `tokens`: every token accepted; the one presented names the actor.
    pub fn new(
        board: Arc<Switchboard>,
        certs: Option<Arc<CertStore>>,
        tokens: Tokens,
        allow: Vec<IpNet>,
    ) -> AdminApi {
        AdminApi {
            board,
            certs,
            reloader: None,
            deploys: None,
            tokens,
            allow,
        }
    }

    /// Serves `POST /reload` with `reloader`.
    pub fn with_reloader(mut self, reloader: Arc<Reloader>) -> AdminApi {
        self.reloader = Some(reloader);
        self
    }

    /// Runs deploys with these, and shows their watcher's live figures
    /// in `GET /status`.
    pub fn with_deploys(mut self, deploys: Arc<Deployer>) -> AdminApi {
        self.deploys = Some(deploys);
        self
    }

    async fn handle(&self, session: &mut ServerSession) -> Result<Value, ApiError> {
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if !ip.is_some_and(|ip| auth::allowed(&self.allow, ip)) {
            return Err(ApiError::Forbidden);
        }
        let header = session.get_header(http::header::AUTHORIZATION);
        let actor = match self.tokens.identify(header.map(|h| h.as_bytes())) {
            Some(name) => Actor::token(name),
            None => return Err(ApiError::Unauthorized),
        };
        let body = read_body(session).await?;
        let req = session.req_header();
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let cmd = Command::from_request(&req.method, target, &body)?;
        let board = self.board.clone();
        let certs = self.certs.clone();
        let reloader = self.reloader.clone();
        let deploys = self.deploys.clone();
        // Switches fsync and reloads read files; keep that off the
        // listener's async threads.
        tokio::task::spawn_blocking(move || {
            dispatch(
                &board,
                certs.as_deref(),
                reloader.as_deref(),
                deploys.as_ref(),
                &actor,
                cmd,
            )
        })
        .await
        .map_err(|e| ApiError::Internal(format!("admin task failed: {e}")))?
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, ApiError> {
    let declared = session
        .get_header(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::TooLarge);
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(ApiError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(ApiError::BadRequest(format!("cannot read body: {e}"))),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, value) = match self.handle(session).await {
            Ok(v) => (StatusCode::OK, v),
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::error!(cause = %e, "admin request failed");
                }
                let value = match &e {
                    ApiError::InvalidConfig { errors, .. } => {
                        json!({ "error": e.to_string(), "errors": errors })
                    }
                    _ => json!({ "error": e.to_string() }),
                };
                (e.status(), value)
            }
        };
        if status != StatusCode::OK {
            // The body was not read to the end: do not reuse the connection.
            session.set_keepalive(None);
        }
        let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
        body.push(b'\n');
        let mut resp = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(http::header::SERVER, crate::respond::SERVER)
            // On every answer, errors too: how `ctl` knows it reached the admin API.
            .header(
                super::client::ADMIN_HEADER,
                super::client::ADMIN_HEADER_VALUE,
            );
        if status == StatusCode::UNAUTHORIZED {
            resp = resp.header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
        resp.body(body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_http() {
        let cmds = [
            Command::Status,
            Command::History { service: None },
            Command::History {
                service: Some("api".into()),
            },
            Command::Switch {
                service: "api".into(),
                to: Color::Green,
                reason: Some("deploy 1.2".into()),
                force: true,
            },
            Command::Rollback {
                service: "api".into(),
                reason: None,
                force: false,
            },
            Command::Maintenance {
                service: "api".into(),
                on: true,
            },
            Command::Certs,
            Command::Renew {
                name: "site".into(),
            },
            Command::Limits,
            Command::Reload,
            Command::Deploy {
                service: "api".into(),
                plan: Plan {
                    to: Color::Green,
                    steps: vec![10, 50, 100],
                    interval: std::time::Duration::from_secs(90),
                    wait_healthy: std::time::Duration::from_secs(300),
                    lease: std::time::Duration::from_secs(10),
                    reason: Some("release 1.4".into()),
                },
            },
            Command::DeployStatus {
                service: "api".into(),
            },
            Command::DeployAbort {
                service: "api".into(),
            },
        ];
        for cmd in cmds {
            let (method, path, body) = cmd.to_request();
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let back = Command::from_request(&method, &path, body.as_bytes()).unwrap();
            assert_eq!(back, cmd);
        }
    }

    #[test]
    fn bad_requests_are_typed() {
        let post =
            |path: &str, body: &str| Command::from_request(&Method::POST, path, body.as_bytes());
        assert!(matches!(
            post("/services/api/switch", "{\"to\":\"purple\"}"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            post("/services/api/switch", "{\"to\":"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            post("/services/api/switch", "{\"to\":\"blue\",\"x\":1}"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(post("/nope", ""), Err(ApiError::NotFound(_))));
        assert!(matches!(
            post("/status", ""),
            Err(ApiError::MethodNotAllowed)
        ));
        assert!(post("/services/api/rollback", "").is_ok());
        assert!(matches!(
            post("/certs/site/renew", "{\"now\":true}"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            post("/certs", ""),
            Err(ApiError::MethodNotAllowed)
        ));
        for reason in [
            "ok\\n2026-11-29 ERROR forged",
            "\\u001b[31mred",
            "tab\\there",
        ] {
            let switch = format!("{{\"to\":\"blue\",\"reason\":\"{reason}\"}}");
            let rollback = format!("{{\"reason\":\"{reason}\"}}");
            for (path, body) in [
                ("/services/api/switch", switch),
                ("/services/api/rollback", rollback),
            ] {
                assert!(
                    matches!(post(path, &body), Err(ApiError::BadRequest(_))),
                    "{path} {body}"
                );
            }
        }
        let long = format!(
            "{{\"to\":\"blue\",\"reason\":\"{}\"}}",
            "x".repeat(MAX_REASON_CHARS + 1)
        );
        assert!(matches!(
            post("/services/api/switch", &long),
            Err(ApiError::BadRequest(_))
        ));
        let get = |target: &str| Command::from_request(&Method::GET, target, b"");
        for bad in [
            "/history?service=",
            "/history?svc=api",
            "/history?service=API",
            "/history?service=a%20b",
            "/history?service=api&service=web",
        ] {
            assert!(matches!(get(bad), Err(ApiError::BadRequest(_))), "{bad}");
        }
        assert_eq!(
            get("/history?").unwrap(),
            Command::History { service: None }
        );
        for bad in [
            "{\"to\":\"green\",\"steps\":[50,10,100]}",
            "{\"to\":\"green\",\"steps\":[10,50]}",
            "{\"to\":\"green\",\"interval\":\"1\"}",
            "{\"to\":\"green\",\"interval\":\"2h\"}",
            "{\"to\":\"purple\"}",
            "{\"to\":\"green\",\"steps\":[300]}",
            "{\"to\":\"green\",\"lease\":\"0s\"}",
            "{\"to\":\"green\",\"extra\":1}",
        ] {
            assert!(
                matches!(
                    post("/services/api/deploy", bad),
                    Err(ApiError::BadRequest(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            post("/services/api/deploy", "{\"to\":\"green\"}").unwrap(),
            Command::Deploy {
                service: "api".into(),
                plan: Plan {
                    to: Color::Green,
                    steps: vec![100],
                    interval: crate::deploy::DEFAULT_INTERVAL,
                    wait_healthy: crate::deploy::DEFAULT_WAIT_HEALTHY,
                    lease: crate::deploy::LEASE,
                    reason: None,
                },
            }
        );
        assert!(matches!(
            Command::from_request(&Method::DELETE, "/services/api/deploy", b"{}"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            Command::from_request(&Method::PUT, "/services/api/deploy", b""),
            Err(ApiError::MethodNotAllowed)
        ));
        let fine = "{\"to\":\"blue\",\"reason\":\"deploy 1.4 — ok\"}";
        assert!(post("/services/api/switch", fine).is_ok());
    }
}
