//! `switchyard ctl`'s side of the admin API: sends a [`Command`] and returns
//! the JSON reply, or an error that says what went wrong.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::api::Command;
use super::auth::Token;
use crate::pools::Color;

/// How long `ctl` waits for the admin API (10 s): a switch only writes a small file.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("admin API sent a reply that is not JSON: {0}")]
    BadReply(String),
    #[error("gave up waiting: {0}")]
    Timeout(String),
}

/// How often `ctl` polls `/status` while waiting (250 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub struct Client {
    base: String,
    token: Token,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Token) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(DEFAULT_TIMEOUT))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    pub fn send(&self, cmd: &Command) -> Result<Value, ClientError> {
        let (method, path, body) = cmd.to_request();
        let url = format!("{}{}", self.base, path);
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token.as_str()))
            .header("content-type", "application/json");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = request.body(body).map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            cause: e.to_string(),
        })?;
        let mut resp = self
            .agent
            .run(request)
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                cause: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|_| ClientError::BadReply(text.clone()))?;
        if status != 200 {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or(text.trim())
                .to_string();
            return Err(ClientError::Refused { status, message });
        }
        Ok(value)
    }
}

impl Client {
    /// One service's entry of `/status`.
    fn service(&self, service: &str) -> Result<Value, ClientError> {
        let status = self.send(&Command::Status)?;
        match status["services"].get(service) {
            Some(v) => Ok(v.clone()),
            None => Err(ClientError::Refused {
                status: 404,
                message: format!("unknown service {service:?}"),
            }),
        }
    }

    /// Polls `service`'s status until `check` reports it done, printing each
    /// new progress line; at the deadline the last line is the error.
    fn wait_until(
        &self,
        service: &str,
        within: Duration,
        mut progress: impl FnMut(&str),
        mut check: impl FnMut(&Value) -> (bool, String),
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            let (done, line) = check(&self.service(service)?);
            if line != last {
                progress(&line);
                last = line;
            }
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(last));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Polls until `color` of `service` has the healthy backends a switch
    /// needs, reporting each change through `progress`.
    pub fn wait_healthy(
        &self,
        service: &str,
        color: Color,
        within: Duration,
        progress: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        self.wait_until(service, within, progress, |svc| {
            let Some(required) = svc["min_healthy"][color.as_str()].as_u64() else {
                return (
                    true,
                    format!("{service} has no health check: nothing to wait for"),
                );
            };
            let backends = svc["pools"][color.as_str()]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let healthy = backends.iter().filter(|b| b["health"] == "healthy").count() as u64;
            let line = format!(
                "{service} {color}: {healthy}/{required} healthy backends needed{}",
                describe_backends(&backends)
            );
            (healthy >= required, line)
        })
    }

    /// Polls until `color` of `service` has nothing in flight.
    pub fn wait_drained(
        &self,
        service: &str,
        color: Color,
        within: Duration,
        progress: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        self.wait_until(service, within, progress, |svc| {
            let in_flight = svc["in_flight"][color.as_str()].as_u64().unwrap_or(0);
            let upgraded = svc["upgraded"][color.as_str()].as_u64().unwrap_or(0);
            match in_flight {
                0 => (true, format!("{service} {color}: drained")),
                n => (
                    false,
                    format!(
                        "{service} {color}: {n} requests still in flight ({upgraded} upgraded connections)"
                    ),
                ),
            }
        })
    }
}

fn describe_backends(backends: &[Value]) -> String {
    let parts: Vec<String> = backends
        .iter()
        .filter(|b| b["health"] != "healthy")
        .map(|b| {
            let addr = b["addr"].as_str().unwrap_or("?");
            let health = b["health"].as_str().unwrap_or("?");
            match b["last_error"].as_str() {
                Some(e) => format!("{addr} {health}: {e}"),
                None => format!("{addr} {health}"),
            }
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}
