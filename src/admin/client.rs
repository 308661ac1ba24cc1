//! `switchyard ctl`'s side of the admin API: sends a [`Command`] and returns
//! the JSON reply, or an error that says what went wrong.

use std::time::Duration;

use serde_json::Value;

use super::api::Command;
use super::auth::Token;

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
}

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
