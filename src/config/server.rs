//! `[server]`, `[listen]` and `[admin]`: process-wide settings, the
//! listening addresses and who may call the admin API, with their defaults
//! and ranges.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::{file, Validator, MIN_DURATION};

/// Worker threads of the proxy service (2).
pub const DEFAULT_THREADS: usize = 2;
/// Whether an idle worker thread of a listener takes ready tasks from a
/// busy one (`false`): tokio's multi-threaded scheduler when on, one
/// single-threaded runtime per worker when off (issue 14 measures both).
pub const DEFAULT_WORK_STEALING: bool = false;
/// How long in-flight requests may run on after SIGTERM before the process exits (30 s).
/// Pingora's own default (300 s) is too long for a deploy.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Where active colors and the switch history are kept (relative to the working directory).
pub const DEFAULT_STATE_DIR: &str = "state";
/// Client-facing plain HTTP listener.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:80";
/// Admin API listener: loopback only unless the operator says otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
/// Client networks allowed to call the admin API: loopback only.
pub const DEFAULT_ADMIN_ALLOW: [&str; 2] = ["127.0.0.1/32", "::1/128"];
/// Idle upstream connections kept for reuse, across all backends (128 connections).
pub const DEFAULT_UPSTREAM_KEEPALIVE_POOL: usize = 128;
/// How long a client may take to send a whole request header (10 s), as nginx's
/// `client_header_timeout` in the deployment being replaced.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two reads of a request body (10 s).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle kept-alive client connection stays open (15 s).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a write to a client may block (10 s).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header accepted (32 KiB); larger ones get 431.
pub const DEFAULT_MAX_HEADER_SIZE: usize = 32 * 1024;
/// `Retry-After` sent with 503 answers (30 s).
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Largest `max_connections` / `max_connections_per_client` (16 777 216
/// connections): far beyond any open-file limit.
pub const MAX_CONNECTION_CAP: u64 = 1 << 24;

/// `server.grace_period`: 100 ms to 1 h (a deploy should not wait longer).
pub const GRACE_PERIOD_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(3600);
/// `server.header_timeout`: 100 ms to 10 min (nginx's default is 60 s).
pub const HEADER_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(600);
/// `server.body_timeout`, `keepalive_timeout`, `send_timeout`: 100 ms to 1 h.
pub const CLIENT_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(3600);
/// `server.retry_after`: 1 s to 24 h. `Retry-After` counts whole seconds
/// (RFC 9110 §10.2.3), hence the higher minimum.
pub const RETRY_AFTER_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// `server.max_header_size`: 1 KiB to 1 MiB; over 1 MiB Pingora itself answers 400.
pub const MAX_HEADER_SIZE_RANGE: RangeInclusive<usize> = 1024..=1024 * 1024;
/// `server.threads`: 1 to 1024 worker threads.
pub const THREADS_RANGE: RangeInclusive<u32> = 1..=1024;
/// `server.upstream_keepalive_pool`: 0 (no reuse) to 65 536 idle connections.
pub const KEEPALIVE_POOL_RANGE: RangeInclusive<usize> = 0..=65_536;

#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    /// See [`DEFAULT_WORK_STEALING`].
    pub work_stealing: bool,
    pub grace_period: Duration,
    pub state_dir: PathBuf,
    pub upstream_keepalive_pool: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are believed (a load balancer in front).
    pub trusted_proxies: Vec<IpNet>,
    pub max_header_size: usize,
    /// The page served with 503 in maintenance or when no backend is healthy;
    /// `None` means the built-in page.
    pub maintenance_page: Option<PathBuf>,
    pub retry_after: Duration,
    /// Client connections held at once (nginx's `worker_connections`,
    /// HAProxy's `maxconn`); `None`: sized from the open-file limit at start
    /// ([`crate::connections::default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Client connections per peer address (nginx's `limit_conn`); `None`:
    /// no per-client cap, since behind a load balancer every client shares
    /// its address.
    pub max_connections_per_client: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub http: SocketAddr,
    /// The HTTPS listener (TLS 1.2/1.3, HTTP/2 by ALPN); `None`: plain HTTP only.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The metrics listener (`/metrics`, `/healthz`, `/readyz`, `/status`);
    /// `None`: off.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    /// Where the bearer token is read from; the env variable
    /// `SWITCHYARD_ADMIN_TOKEN` takes precedence. No token, no admin API.
    pub token_file: Option<PathBuf>,
    pub allow: Vec<IpNet>,
    /// `[[admin.tokens]]`: more tokens, each with the name the history
    /// records for what it did (`token:NAME`). The position of entry `i`'s
    /// `file` is kept as `admin.tokens.file#i`.
    pub tokens: Vec<AdminTokenFile>,
}

/// One named admin token: where it is read from and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenFile {
    /// Lower-case letters, digits, `-` and `_`; unique, and not one of the
    /// names switchyard gives itself ([`RESERVED_TOKEN_NAMES`]).
    pub name: String,
    /// Mode 0600, checked like `admin.token_file`.
    pub file: PathBuf,
}

/// Names of the tokens that are not in `[[admin.tokens]]`: `default` for
/// `admin.token_file`, `env` for `$SWITCHYARD_ADMIN_TOKEN`.
pub const RESERVED_TOKEN_NAMES: [&str; 2] = ["default", "env"];

impl Validator<'_> {
    pub(super) fn server(&mut self, s: file::Server) -> Server {
        let threads = self.count(
            s.threads.as_ref(),
            DEFAULT_THREADS as u32,
            THREADS_RANGE,
            "threads",
        ) as usize;
        Server {
            threads,
            work_stealing: s
                .work_stealing
                .map_or(DEFAULT_WORK_STEALING, Spanned::into_inner),
            grace_period: self.duration_in(
                s.grace_period.as_ref(),
                DEFAULT_GRACE_PERIOD,
                GRACE_PERIOD_RANGE,
            ),
            state_dir: self
                .path_key("server.state_dir", s.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            upstream_keepalive_pool: self.count(
                s.upstream_keepalive_pool.as_ref(),
                DEFAULT_UPSTREAM_KEEPALIVE_POOL,
                KEEPALIVE_POOL_RANGE,
                "upstream_keepalive_pool",
            ),
            header_timeout: self.duration_in(
                s.header_timeout.as_ref(),
                DEFAULT_HEADER_TIMEOUT,
                HEADER_TIMEOUT_RANGE,
            ),
            body_timeout: self.duration_in(
                s.body_timeout.as_ref(),
                DEFAULT_BODY_TIMEOUT,
                CLIENT_TIMEOUT_RANGE,
            ),
            keepalive_timeout: self.duration_in(
                s.keepalive_timeout.as_ref(),
                DEFAULT_KEEPALIVE_TIMEOUT,
                CLIENT_TIMEOUT_RANGE,
            ),
            send_timeout: self.duration_in(
                s.send_timeout.as_ref(),
                DEFAULT_SEND_TIMEOUT,
                CLIENT_TIMEOUT_RANGE,
            ),
            trusted_proxies: self.networks(s.trusted_proxies.as_deref().unwrap_or_default()),
            max_header_size: self.size_in(
                s.max_header_size.as_ref(),
                DEFAULT_MAX_HEADER_SIZE,
                MAX_HEADER_SIZE_RANGE,
            ),
            maintenance_page: self.path_key("server.maintenance_page", s.maintenance_page),
            retry_after: self.retry_after(s.retry_after.as_ref()),
            max_connections: self.connection_cap(s.max_connections, "max_connections"),
            max_connections_per_client: self
                .connection_cap(s.max_connections_per_client, "max_connections_per_client"),
        }
    }

    /// `Retry-After` is sent in whole seconds (RFC 9110 §10.2.3): a fraction
    /// would be cut off silently, so it is refused.
    fn retry_after(&mut self, value: Option<&Spanned<String>>) -> Duration {
        let d = self.duration_in(value, DEFAULT_RETRY_AFTER, RETRY_AFTER_RANGE);
        match value {
            Some(v) if d.subsec_nanos() != 0 => {
                self.at(
                    v,
                    format!(
                        "retry_after {:?} must be whole seconds: Retry-After counts seconds",
                        v.get_ref()
                    ),
                );
                DEFAULT_RETRY_AFTER
            }
            _ => d,
        }
    }

    /// A connection count from 1 to [`MAX_CONNECTION_CAP`].
    fn connection_cap(&mut self, value: Option<Spanned<u64>>, what: &str) -> Option<usize> {
        let value = value?;
        let n = *value.get_ref();
        if n == 0 || n > MAX_CONNECTION_CAP {
            self.at(
                &value,
                format!("{what} = {n} is out of range: allowed from 1 to {MAX_CONNECTION_CAP}"),
            );
            return None;
        }
        usize::try_from(n).ok()
    }

    pub(super) fn listen(&mut self, l: file::Listen) -> Listen {
        let keys = [
            ("listen.http", l.http, Some(DEFAULT_HTTP_LISTEN)),
            ("listen.https", l.https, None),
            ("listen.admin", l.admin, Some(DEFAULT_ADMIN_LISTEN)),
            ("listen.metrics", l.metrics, None),
        ];
        // Each listener binds a socket of its own: two whose addresses
        // overlap would fail at start (or share one socket), after the
        // config was called good.
        let mut taken: Vec<(&str, SocketAddr, Option<Spanned<String>>)> = Vec::new();
        let mut addrs = [None; 4];
        for (slot, (what, value, default)) in addrs.iter_mut().zip(keys) {
            let addr = value
                .as_ref()
                .and_then(|v| self.addr(v, what))
                .or_else(|| default.map(|d| d.parse().expect("default addresses are valid")));
            let Some(addr) = addr else { continue };
            if let Some((other, other_addr, other_value)) =
                taken.iter().find(|(_, a, _)| overlap(*a, addr))
            {
                let mine = described(what, addr, value.is_some());
                let theirs = described(other, *other_addr, other_value.is_some());
                // Said at a key written in the file: the later one of the
                // two, or the only one (two defaults never overlap).
                let said = match (&value, other_value) {
                    (Some(spot), _) => Some((spot, mine, theirs)),
                    (None, Some(spot)) => Some((spot, theirs, mine)),
                    (None, None) => None,
                };
                if let Some((spot, first, second)) = said {
                    self.at(
                        spot,
                        format!(
                            "{first} overlaps {second}: each listener needs an address of its own"
                        ),
                    );
                }
            }
            taken.push((what, addr, value));
            *slot = Some(addr);
        }
        // The two with a default always have an address.
        let [http, https, admin, metrics] = addrs;
        let default = |d: &str| d.parse().expect("default addresses are valid");
        Listen {
            http: http.unwrap_or_else(|| default(DEFAULT_HTTP_LISTEN)),
            https,
            admin: admin.unwrap_or_else(|| default(DEFAULT_ADMIN_LISTEN)),
            metrics,
        }
    }

    pub(super) fn admin(&mut self, a: file::Admin) -> Admin {
        let allow = match a.allow {
            None => DEFAULT_ADMIN_ALLOW
                .iter()
                .map(|n| n.parse().expect("default networks are valid"))
                .collect(),
            Some(list) => self.networks(&list),
        };
        Admin {
            token_file: self.path_key("admin.token_file", a.token_file),
            allow,
            tokens: self.admin_tokens(a.tokens.unwrap_or_default()),
        }
    }

    /// `[[admin.tokens]]`: a bad, reserved or repeated name is an error at
    /// the name and the entry is left out.
    fn admin_tokens(&mut self, list: Vec<file::AdminToken>) -> Vec<AdminTokenFile> {
        let mut tokens: Vec<AdminTokenFile> = Vec::new();
        for t in list {
            if !self.name(&t.name, "admin token") {
                continue;
            }
            let name = t.name.get_ref();
            if RESERVED_TOKEN_NAMES.contains(&name.as_str()) {
                self.at(
                    &t.name,
                    format!(
                        "admin token name {name:?} is reserved: \"default\" is admin.token_file, \
                         \"env\" is ${}; pick another name",
                        crate::admin::auth::TOKEN_ENV
                    ),
                );
                continue;
            }
            if tokens.iter().any(|other| other.name == *name) {
                self.at(
                    &t.name,
                    format!(
                        "admin token name {name:?} is used twice; every token needs its own name"
                    ),
                );
                continue;
            }
            let key = format!("admin.tokens.file#{}", tokens.len());
            let file = self.file_key(&key, t.file);
            tokens.push(AdminTokenFile {
                name: name.clone(),
                file,
            });
        }
        tokens
    }
}

/// A listen key and its address, marked when the address is the default.
fn described(key: &str, addr: SocketAddr, written: bool) -> String {
    match written {
        true => format!("{key} {addr}"),
        false => format!("{key} {addr} (its default)"),
    }
}

/// Whether two listen addresses cannot both be bound: the same port on the
/// same address, or on any address when either is a wildcard (`0.0.0.0`,
/// `[::]`, which on Linux also takes IPv4 by default).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const SERVICE: &str =
        "[services.api]\nblue = [\"127.0.0.1:8080\"]\ngreen = [\"127.0.0.1:8081\"]\n";

    #[test]
    fn metrics_listener_is_off_unless_set_and_checked() {
        let path = Path::new("t.toml");
        let c = Config::parse(path, SERVICE).unwrap();
        assert_eq!(c.listen.metrics, None);
        let text = format!("[listen]\nmetrics = \"127.0.0.1:9901\"\n{SERVICE}");
        let c = Config::parse(path, &text).unwrap();
        assert_eq!(c.listen.metrics, Some("127.0.0.1:9901".parse().unwrap()));
        let text = format!("[listen]\nmetrics = \"localhost\"\n{SERVICE}");
        let err = Config::parse(path, &text).unwrap_err().to_string();
        assert!(
            err.contains("t.toml:2:11: bad listen.metrics address"),
            "{err}"
        );
        let text = format!(
            "[listen]\nadmin = \"127.0.0.1:9900\"\nmetrics = \"127.0.0.1:9900\"\n{SERVICE}"
        );
        let err = Config::parse(path, &text).unwrap_err().to_string();
        assert!(
            err.contains(
                "t.toml:3:11: listen.metrics 127.0.0.1:9900 overlaps listen.admin 127.0.0.1:9900"
            ),
            "{err}"
        );
    }

    /// Every pair of listeners, wildcards and defaults included: each needs
    /// an address of its own, or one of them would fail to bind at start.
    #[test]
    fn listen_addresses_must_not_overlap() {
        let path = Path::new("t.toml");
        let refused = [
            // The same address, any two keys.
            (
                "https = \"127.0.0.1:8443\"\nadmin = \"127.0.0.1:8443\"",
                "t.toml:3:9: listen.admin 127.0.0.1:8443 overlaps listen.https 127.0.0.1:8443",
            ),
            (
                "http = \"127.0.0.1:8080\"\nhttps = \"127.0.0.1:8080\"",
                "t.toml:3:9: listen.https 127.0.0.1:8080 overlaps listen.http",
            ),
            // A wildcard takes the port on every address, IPv6 too.
            (
                "http = \"0.0.0.0:8080\"\nmetrics = \"127.0.0.1:8080\"",
                "listen.metrics 127.0.0.1:8080 overlaps listen.http 0.0.0.0:8080",
            ),
            (
                "http = \"[::]:8080\"\nadmin = \"127.0.0.1:8080\"",
                "listen.admin 127.0.0.1:8080 overlaps listen.http [::]:8080",
            ),
            // Against a default, the error is at the key written.
            (
                "admin = \"0.0.0.0:80\"",
                "t.toml:2:9: listen.admin 0.0.0.0:80 overlaps listen.http 0.0.0.0:80 (its default)",
            ),
            (
                &format!("http = \"{}\"", super::DEFAULT_ADMIN_LISTEN),
                "t.toml:2:8: listen.http",
            ),
        ];
        for (listen, want) in refused {
            let text = format!("[listen]\n{listen}\n{SERVICE}");
            let err = Config::parse(path, &text).unwrap_err().to_string();
            assert!(err.contains(want), "{listen}: {err}");
        }
        let allowed =
            "http = \"127.0.0.1:8080\"\nadmin = \"[::1]:8080\"\nmetrics = \"127.0.0.2:8080\"";
        let text = format!("[listen]\n{allowed}\n{SERVICE}");
        let c = Config::parse(path, &text).unwrap();
        assert_eq!(c.listen.metrics, Some("127.0.0.2:8080".parse().unwrap()));
    }

    #[test]
    fn connection_caps_are_optional_and_range_checked() {
        let path = Path::new("t.toml");
        let c = Config::parse(path, SERVICE).unwrap();
        assert_eq!(c.server.max_connections, None);
        assert_eq!(c.server.max_connections_per_client, None);
        let text =
            format!("[server]\nmax_connections = 500\nmax_connections_per_client = 20\n{SERVICE}");
        let c = Config::parse(path, &text).unwrap();
        assert_eq!(c.server.max_connections, Some(500));
        assert_eq!(c.server.max_connections_per_client, Some(20));
        let text = format!(
            "[server]\nmax_connections = 0\nmax_connections_per_client = 99999999\n{SERVICE}"
        );
        let err = Config::parse(path, &text).unwrap_err().to_string();
        assert!(
            err.contains("t.toml:2:19: max_connections = 0 is out of range: allowed from 1 to"),
            "{err}"
        );
        assert!(
            err.contains("t.toml:3:30: max_connections_per_client = 99999999 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn admin_token_names_are_checked_at_the_name() {
        let path = Path::new("t.toml");
        let text = format!(
            "[admin]\n[[admin.tokens]]\nname = \"ci\"\nfile = \"ci.token\"\n\
             [[admin.tokens]]\nname = \"ops\"\nfile = \"ops.token\"\n{SERVICE}"
        );
        let c = Config::parse(path, &text).unwrap();
        let names: Vec<&str> = c.admin.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["ci", "ops"]);
        assert_eq!(c.positions.get("admin.tokens.file#1"), Some(&(7, 8)));
        let text = format!(
            "[[admin.tokens]]\nname = \"ci\"\nfile = \"a\"\n\
             [[admin.tokens]]\nname = \"ci\"\nfile = \"b\"\n\
             [[admin.tokens]]\nname = \"CI\"\nfile = \"c\"\n\
             [[admin.tokens]]\nname = \"default\"\nfile = \"d\"\n\
             [[admin.tokens]]\nname = \"x\"\n{SERVICE}"
        );
        let err = Config::parse(path, &text).unwrap_err().to_string();
        assert!(
            err.contains("t.toml:5:8: admin token name \"ci\" is used twice"),
            "{err}"
        );
        assert!(
            err.contains("t.toml:8:8: bad admin token name \"CI\""),
            "{err}"
        );
        assert!(
            err.contains("t.toml:11:8: admin token name \"default\" is reserved"),
            "{err}"
        );
        assert!(
            err.contains("t.toml:13:1: missing required key `file`"),
            "{err}"
        );
    }
}
