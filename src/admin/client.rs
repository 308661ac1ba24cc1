//! `switchyard ctl`'s side of the admin API: sends a [`Command`] and returns
//! the JSON reply, or an error that says what went wrong.
//!
//! Before it trusts an address, `ctl` makes sure a switchyard admin API
//! answers there: a first `GET /status` without the token must come back
//! with the [`ADMIN_HEADER`] marker (every admin answer carries it, even a
//! 401). Anything else (the proxy's own port, some other web server, a
//! redirect, a port that does not speak HTTP) is refused before the token is
//! sent or a command is posted, so a mistaken `--admin` can neither leak the
//! token nor post a switch to a backend.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::api::Command;
use super::auth::Token;
use crate::pools::Color;

/// How long `ctl` waits for the admin API (10 s): a switch only writes a small file.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Response header that marks every answer of the admin API, so `ctl` can
/// tell it from any other HTTP server.
pub const ADMIN_HEADER: &str = "switchyard-admin";
/// The value of [`ADMIN_HEADER`]: the admin API's version (1).
pub const ADMIN_HEADER_VALUE: &str = "1";

/// Most of a non-admin answer `ctl` reads to describe it (64 KiB).
const MAX_FOREIGN_BODY: u64 = 64 * 1024;

/// Why a `ctl` call failed; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad admin address {given:?}: {why}")]
    BadAddress { given: String, why: String },
    #[error("nothing listens at {url} (connection refused): {hint}")]
    NotListening { url: String, hint: String },
    #[error("cannot reach the admin API at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error(
        "{url} is not a switchyard admin API: it answered {answer} without the \
         `{ADMIN_HEADER}` header. Is it the proxy's port? The admin API listens on \
         [listen] admin (default 127.0.0.1:9900): pass --admin HOST:PORT or -c CONFIG"
    )]
    NotAdmin { url: String, answer: String },
    #[error(
        "{url} does not speak HTTP ({cause}): it is not a switchyard admin API; \
         pass --admin HOST:PORT of [listen] admin, or -c CONFIG"
    )]
    NotHttp { url: String, cause: String },
    #[error("admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("admin API sent a reply that is not JSON: {0}")]
    BadReply(String),
    #[error("gave up waiting: {0}")]
    Timeout(String),
}

/// How often `ctl` polls `/status` while waiting (250 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Turns `--admin` into the admin API's base URL. Accepted: `HOST:PORT`,
/// `[IPV6]:PORT`, and either of them after `http://`, with an optional
/// trailing `/`. Other schemes are refused: the admin API speaks plain HTTP
/// (it is meant for loopback).
pub fn admin_base_url(given: &str) -> Result<String, ClientError> {
    let bad = |why: &str| ClientError::BadAddress {
        given: given.to_string(),
        why: why.to_string(),
    };
    let text = given.trim();
    let authority = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
            "the admin API speaks plain HTTP, not {scheme}://; write HOST:PORT or http://HOST:PORT"
        )))
        }
        None => text,
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "give only HOST:PORT (or http://HOST:PORT), without a path, query or user",
        ));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address needs its closing ']', e.g. [::1]:9900"))?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(bad(&format!("{v6:?} is not an IPv6 address")));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("give a port after the address, e.g. [::1]:9900"))?;
        (format!("[{v6}]"), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("give a port, e.g. 127.0.0.1:9900"))?;
        if host.contains(':') {
            return Err(bad("put an IPv6 address in brackets, e.g. [::1]:9900"));
        }
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(bad(&format!("{host:?} is not a host name or IP address")));
        }
        (host.to_string(), port)
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(format!("http://{host}:{p}")),
        _ => Err(bad(&format!("{port:?} is not a port (1 to 65535)"))),
    }
}

/// The base URL for reaching a listener bound to `addr`: a wildcard bind
/// (`0.0.0.0`, `::`) is reached over loopback.
pub fn base_url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A connection to one admin API, for one `ctl` run. Blocking (ureq): `ctl`
/// makes a handful of requests and exits.
pub struct Client {
    base: String,
    token: Token,
    agent: ureq::Agent,
    /// Said after "connection refused": where switchyard looks for its token.
    refused_hint: String,
    /// Set once the first answer proved this is a switchyard admin API.
    identified: Cell<bool>,
}

impl Client {
    /// A client for the admin API at `base` (from [`admin_base_url`]).
    /// `refused_hint` is appended when nothing listens there.
    pub fn new(base: &str, token: Token, refused_hint: String) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The admin API never redirects; a redirect means some other server.
            .max_redirects(0)
            .timeout_global(Some(DEFAULT_TIMEOUT))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
            refused_hint,
            identified: Cell::new(false),
        }
    }

    /// Runs one request; transport failures become errors that say what
    /// kind of thing is (not) at the address.
    fn run(
        &self,
        request: http::Request<String>,
    ) -> Result<http::Response<ureq::Body>, ClientError> {
        self.agent.run(request).map_err(|e| match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotListening {
                    url: self.base.clone(),
                    hint: self.refused_hint.clone(),
                }
            }
            ureq::Error::Protocol(_) => ClientError::NotHttp {
                url: self.base.clone(),
                cause: e.to_string(),
            },
            ureq::Error::Timeout(_) => ClientError::Unreachable {
                url: self.base.clone(),
                cause: format!("no answer within {DEFAULT_TIMEOUT:?}"),
            },
            other => ClientError::Unreachable {
                url: self.base.clone(),
                cause: other.to_string(),
            },
        })
    }

    /// Makes sure a switchyard admin API answers at the base URL, without
    /// sending the token: the marker header comes with its 401 as well.
    fn identify(&self) -> Result<(), ClientError> {
        if self.identified.get() {
            return Ok(());
        }
        let url = format!("{}/status", self.base);
        let request =
            http::Request::get(&url)
                .body(String::new())
                .map_err(|e| ClientError::Unreachable {
                    url: url.clone(),
                    cause: e.to_string(),
                })?;
        let resp = self.run(request)?;
        self.expect_admin(resp)?;
        self.identified.set(true);
        Ok(())
    }

    /// Passes the response through when it carries the admin marker;
    /// otherwise describes what answered instead.
    fn expect_admin(
        &self,
        mut resp: http::Response<ureq::Body>,
    ) -> Result<http::Response<ureq::Body>, ClientError> {
        let marked = resp
            .headers()
            .get(ADMIN_HEADER)
            .is_some_and(|v| v.as_bytes() == ADMIN_HEADER_VALUE.as_bytes());
        if marked {
            return Ok(resp);
        }
        let status = resp.status();
        let header = |name: http::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let location = header(http::header::LOCATION);
        let content_type = header(http::header::CONTENT_TYPE).to_ascii_lowercase();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_FOREIGN_BODY)
            .read_to_string()
            .unwrap_or_default();
        Err(ClientError::NotAdmin {
            url: self.base.clone(),
            answer: describe_answer(status, &location, &content_type, &body),
        })
    }

    /// Sends `cmd` and returns the JSON reply of a 200. The first call
    /// checks that the address is a switchyard admin API (see the module
    /// docs); a non-200 answer becomes [`ClientError::Refused`] with the
    /// server's `error` message.
    pub fn send(&self, cmd: &Command) -> Result<Value, ClientError> {
        self.identify()?;
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
        let mut resp = self.expect_admin(self.run(request)?)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|_| ClientError::BadReply(text.clone()))?;
        if status != 200 {
            let mut message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or(text.trim())
                .to_string();
            // A rejected reload lists the file's problems as `check` does.
            for line in value["errors"].as_array().into_iter().flatten() {
                message.push('\n');
                message.push_str(line.as_str().unwrap_or_default());
            }
            return Err(ClientError::Refused { status, message });
        }
        Ok(value)
    }
}

/// A short description of a non-admin answer, for the error message:
/// status, kind of content and a snippet (or where a redirect points).
fn describe_answer(
    status: http::StatusCode,
    location: &str,
    content_type: &str,
    body: &str,
) -> String {
    if status.is_redirection() {
        return format!("{status} (a redirect to {location:?})");
    }
    let trimmed = body.trim_start();
    let kind = if content_type.contains("html") || trimmed.starts_with('<') {
        "an HTML page"
    } else if content_type.contains("json") || serde_json::from_str::<Value>(body).is_ok() {
        "JSON"
    } else if trimmed.is_empty() {
        "an empty body"
    } else {
        "text"
    };
    let snippet: String = trimmed
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(80)
        .collect();
    if snippet.is_empty() {
        format!("{status} with {kind}")
    } else {
        format!("{status} with {kind}: {:?}", snippet.trim_end())
    }
}

impl Client {
    /// One service's entry of `/status`.
    pub fn service(&self, service: &str) -> Result<Value, ClientError> {
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
            let done = healthy >= required;
            let line = if done {
                format!("{service} {color}: healthy ({healthy} healthy, {required} needed)")
            } else {
                format!(
                    "{service} {color}: waiting: {healthy} healthy, {required} needed{}",
                    describe_backends(&backends)
                )
            };
            (done, line)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        for (given, url) in [
            ("127.0.0.1:9900", "http://127.0.0.1:9900"),
            ("http://127.0.0.1:9900", "http://127.0.0.1:9900"),
            ("HTTP://127.0.0.1:9900/", "http://127.0.0.1:9900"),
            ("[::1]:9900", "http://[::1]:9900"),
            ("http://[::1]:9900/", "http://[::1]:9900"),
            ("localhost:9900", "http://localhost:9900"),
        ] {
            assert_eq!(admin_base_url(given).unwrap(), url, "{given}");
        }
        for (given, says) in [
            ("https://127.0.0.1:9900", "plain HTTP"),
            ("ftp://127.0.0.1:9900", "plain HTTP"),
            ("127.0.0.1", "give a port"),
            ("127.0.0.1:", "not a port"),
            ("127.0.0.1:0", "not a port"),
            ("127.0.0.1:99999", "not a port"),
            ("::1:9900", "brackets"),
            ("[::1]", "give a port"),
            ("[zz]:1", "not an IPv6"),
            ("http://127.0.0.1:9900/status", "without a path"),
            ("http://user@127.0.0.1:9900", "without a path"),
            ("", "give a port"),
            ("bad host:1", "not a host name"),
        ] {
            let err = admin_base_url(given).unwrap_err().to_string();
            assert!(err.contains(says), "{given}: {err}");
        }
    }

    #[test]
    fn wildcard_binds_are_reached_over_loopback() {
        assert_eq!(
            base_url_for("0.0.0.0:9900".parse().unwrap()),
            "http://127.0.0.1:9900"
        );
        assert_eq!(
            base_url_for("[::]:9900".parse().unwrap()),
            "http://[::1]:9900"
        );
        assert_eq!(
            base_url_for("10.1.2.3:9900".parse().unwrap()),
            "http://10.1.2.3:9900"
        );
    }
}
