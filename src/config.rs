//! Configuration: the TOML file as written (`file` structs, unknown keys
//! rejected) and the validated [`Config`] the rest of switchyard reads.
//!
//! Parsing and validation happen once, at start-up or in `switchyard check`,
//! so that every mistake is reported with its file, line and column before
//! any traffic is served. Nothing here panics on user input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::pools::Color;

/// Worker threads of the proxy service (2).
pub const DEFAULT_THREADS: usize = 2;
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
/// How long to wait for a TCP connection to a backend (5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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
/// Longest wait for bytes from a backend on a route (60 s), like nginx's `proxy_read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle limit of an upgraded (WebSocket) connection (1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest request body on a route (1 MiB): uploads go to S3 directly.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Probe period of active health checks (2 s).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health probe may take (1 s).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Passes in a row that make a backend healthy (2).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Failures in a row that make a backend unhealthy (3).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Requests a client may send beyond its rate in a rush (0), as nginx's `burst`.
pub const DEFAULT_RATE_BURST: u32 = 0;
/// Largest request count in a rate (1 000 000): at most one request per
/// microsecond per client, far beyond anything a limit is for.
pub const MAX_RATE: u32 = 1_000_000;
/// Largest `max_connections` / `max_connections_per_client` (16 777 216
/// connections): far beyond any open-file limit.
pub const MAX_CONNECTION_CAP: u64 = 1 << 24;

/// Shortest timeout or interval accepted (100 ms): zero would close every
/// connection at once, and anything shorter is below scheduling noise.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
/// Any timeout or interval without a range of its own, and `routes.read_timeout`
/// and `idle_timeout` (long streams): 100 ms to 24 h.
pub const DURATION_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(24 * 3600);
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
/// `services.NAME.connect_timeout`: 100 ms to 5 min.
pub const CONNECT_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(300);
/// `health.interval`: 100 ms to 1 h.
pub const HEALTH_INTERVAL_RANGE: RangeInclusive<Duration> =
    MIN_DURATION..=Duration::from_secs(3600);
/// `health.timeout`: 100 ms to 5 min.
pub const HEALTH_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(300);
/// Any size without a range of its own, and `routes.max_body`: 0 bytes (no
/// body allowed) to 1 GiB.
pub const SIZE_RANGE: RangeInclusive<usize> = 0..=1024 * 1024 * 1024;
/// `server.max_header_size`: 1 KiB to 1 MiB; over 1 MiB Pingora itself answers 400.
pub const MAX_HEADER_SIZE_RANGE: RangeInclusive<usize> = 1024..=1024 * 1024;
/// `server.threads`: 1 to 1024 worker threads.
pub const THREADS_RANGE: RangeInclusive<u32> = 1..=1024;
/// `server.upstream_keepalive_pool`: 0 (no reuse) to 65 536 idle connections.
pub const KEEPALIVE_POOL_RANGE: RangeInclusive<usize> = 0..=65_536;
/// `health.rise` and `fall`: 1 to 100 probes in a row.
pub const RISE_FALL_RANGE: RangeInclusive<u32> = 1..=100;
/// The most mistakes one file may hold before `check` stops listing them
/// (1000): each costs a re-read of the parsed tree, so this bounds the work.
pub const MAX_ERRORS: usize = 1000;

/// The validated configuration. Immutable once built; shared as `Arc<Config>`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, for messages.
    pub path: PathBuf,
    pub server: Server,
    pub listen: Listen,
    pub admin: Admin,
    /// Services in a stable order; a service's index here is its id everywhere else.
    pub services: Vec<Service>,
    pub routes: Vec<Route>,
    /// Named per-client rate limits; a route's index into this list is in its limits.
    pub rate_limits: Vec<RateLimit>,
    /// Where the keys that name files (`server.state_dir`,
    /// `server.maintenance_page`, `admin.token_file`) are written, as (line,
    /// column), so a problem with the file itself can point at its key.
    pub positions: BTreeMap<&'static str, (usize, usize)>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
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
    pub admin: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Admin {
    /// Where the bearer token is read from; the env variable
    /// `SWITCHYARD_ADMIN_TOKEN` takes precedence. No token, no admin API.
    pub token_file: Option<PathBuf>,
    pub allow: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub blue: Vec<SocketAddr>,
    pub green: Vec<SocketAddr>,
    /// The color served when no saved state exists.
    pub active: Color,
    pub connect_timeout: Duration,
    pub health: Option<HealthCheck>,
    /// Healthy backends a color needs before traffic may switch to it;
    /// `None` means all of them.
    pub min_healthy: Option<usize>,
}

/// An active health check: `GET path` must answer `expect` (and contain `body`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect: u16,
    pub body: Option<String>,
    pub rise: u32,
    pub fall: u32,
}

impl Service {
    pub fn pool(&self, color: Color) -> &[SocketAddr] {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

/// A per-client request rate (`[rate_limits.NAME]`), nginx's `limit_req`
/// with `nodelay`: requests over the rate are refused with 429, not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub name: String,
    /// `requests` per `per`, e.g. 2 per second.
    pub requests: u32,
    pub per: Duration,
    /// Requests beyond the rate a client may send at once: a fresh client
    /// gets `burst + 1` before the rate applies.
    pub burst: u32,
    /// Methods the limit counts; `None` means every method.
    pub methods: Option<Vec<http::Method>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lower-case host without port; `None` matches requests for hosts that have no routes.
    pub host: Option<String>,
    /// Prefix of the normalized request path, starting with `/`; a `*`
    /// segment matches exactly one whole segment (see `route.rs`).
    pub path: String,
    pub action: RouteAction,
    pub limits: RouteLimits,
}

/// Per-route transport settings: what kind of traffic the route carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimits {
    /// Whether WebSocket upgrades are passed through.
    pub websocket: bool,
    /// Idle limit of an upgraded connection.
    pub idle_timeout: Duration,
    /// Longest wait for bytes from the backend (long for SSE streams).
    pub read_timeout: Duration,
    pub max_body: usize,
    /// Index into [`Config::rate_limits`] of the limit this route counts against.
    pub rate_limit: Option<usize>,
}

impl Default for RouteLimits {
    fn default() -> Self {
        RouteLimits {
            websocket: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            rate_limit: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAction {
    /// Proxy to the service with this index in [`Config::services`].
    Proxy(usize),
    /// Answer 404 from the proxy; the request never reaches a backend.
    Deny,
}

/// One mistake in a configuration file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // About the file as a whole, or a key left at its default.
            return write!(f, "{}: {}", self.path.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every mistake found in one file; validation goes on past the first so
/// `switchyard check` can list them all at once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrors {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", list.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { list: Vec<ConfigError> },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigErrors::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Like [`Config::load`], but a file with mistakes still gives the
    /// config read from it, with defaults standing in for the bad values,
    /// so `check` can go on to look at the files it names and list every
    /// problem at once. The config is `None` only when the TOML itself is
    /// malformed.
    pub fn load_all(path: &Path) -> Result<(Option<Config>, Vec<ConfigError>), ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigErrors::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Config::parse_all(path, &text))
    }

    /// A problem with what `key` (e.g. `"admin.token_file"`) names, located
    /// at the key when the file sets it.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let (line, col) = self.positions.get(key).copied().unwrap_or((0, 0));
        ConfigError {
            path: self.path.clone(),
            line,
            col,
            message,
        }
    }

    /// Validates configuration text; `path` is only used in messages.
    ///
    /// Every mistake is reported, sorted by line: unknown keys, wrong types
    /// and missing required keys (found while reading the file structs, see
    /// [`Validator::file`]) and the semantic checks after them. Only a TOML
    /// syntax error stops at once, since nothing after it can be read.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        match Config::parse_all(path, text) {
            (Some(config), list) if list.is_empty() => Ok(config),
            (_, list) => Err(ConfigErrors::Invalid { list }),
        }
    }

    /// Validates configuration text; see [`Config::load_all`].
    pub fn parse_all(path: &Path, text: &str) -> (Option<Config>, Vec<ConfigError>) {
        let mut v = Validator {
            path,
            text,
            errors: Vec::new(),
            dropped: HashSet::new(),
            positions: BTreeMap::new(),
        };
        let config = v.file().map(|file| v.validate(file));
        // Stable: two mistakes at one place keep the order they were found in.
        v.errors.sort_by_key(|e| (e.line, e.col));
        (config, v.errors)
    }

    pub fn service_index(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.name == name)
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
    /// `(section, name)` of `[services.NAME]` and `[rate_limits.NAME]` tables
    /// dropped for a mistake already reported, so routes naming them do not
    /// add a second, misleading "unknown service".
    dropped: HashSet<(String, String)>,
    /// See [`Config::positions`].
    positions: BTreeMap<&'static str, (usize, usize)>,
}

/// What error recovery took out of the parsed tree.
struct Removed {
    /// Keys (and array indexes) from the root to the removed entry.
    path: Vec<String>,
    /// Span of the table or array it was removed from.
    parent: Range<usize>,
    /// The TOML type of the removed value, e.g. "integer".
    kind: &'static str,
}

impl Validator<'_> {
    /// Reads the file structs, going on past mistakes: serde stops at the
    /// first unknown key, wrong type or missing key, so each is reported,
    /// the entry it points at is taken out of the parsed tree, and reading
    /// starts over, until the rest reads cleanly. `None` when the TOML itself
    /// is malformed (reported) or nothing readable is left.
    fn file(&mut self) -> Option<file::Root> {
        let mut root = match DeTable::parse(self.text) {
            Ok(root) => root,
            Err(err) => {
                let at = err.span().map_or(0, |s| s.start);
                self.error(at, format!("TOML syntax: {}", err.message().trim()));
                return None;
            }
        };
        // (parent span, key) of entries removed for a bad value: when the key
        // was required, serde then reports it missing, which is not news.
        let mut removed_keys: Vec<(Range<usize>, String)> = Vec::new();
        for _ in 0..MAX_ERRORS {
            let err = match file::Root::deserialize(toml::de::Deserializer::from(root.clone())) {
                Ok(file) => return Some(file),
                Err(err) => err,
            };
            let message = err.message().trim().to_string();
            let Some(span) = err.span() else {
                self.error(0, message);
                return None;
            };
            let root_span = root.span();
            let Some(removed) = remove_at(root.get_mut(), root_span, &span, &mut Vec::new()) else {
                self.error(span.start, message);
                return None;
            };
            let key = removed.path.last().cloned().unwrap_or_default();
            let repeat = missing_field(&message)
                .is_some_and(|m| removed_keys.iter().any(|(s, k)| *s == span && k == m));
            if !repeat {
                self.error(span.start, explain_serde_error(&message, &key, &removed));
            }
            match removed.path.as_slice() {
                [section, name] => {
                    self.dropped.insert((section.clone(), name.clone()));
                }
                // A whole section of the wrong type: every name in it is unknown.
                [section] => {
                    self.dropped.insert((section.clone(), "*".into()));
                }
                _ => {}
            }
            removed_keys.push((removed.parent, key));
        }
        self.error(
            0,
            format!("more than {MAX_ERRORS} mistakes; fix these first"),
        );
        None
    }
}

impl Validator<'_> {
    fn error(&mut self, offset: usize, message: String) {
        let (line, col) = line_col(self.text, offset);
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line,
            col,
            message,
        });
    }

    /// Whether `[section.name]` was dropped for a mistake already reported.
    fn was_dropped(&self, section: &str, name: &str) -> bool {
        [name, "*"]
            .iter()
            .any(|n| self.dropped.contains(&(section.to_string(), n.to_string())))
    }

    fn at<T>(&mut self, value: &Spanned<T>, message: String) {
        self.error(value.span().start, message);
    }

    /// A timeout or interval without a range of its own ([`DURATION_RANGE`]).
    fn duration(&mut self, value: Option<&Spanned<String>>, default: Duration) -> Duration {
        self.duration_in(value, default, DURATION_RANGE)
    }

    /// A duration setting; a bad form or a value outside `range` is reported
    /// with the allowed range, and `default` stands in for it.
    fn duration_in(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let Some(value) = value else { return default };
        let text = value.get_ref();
        match parse_duration(text) {
            Ok(d) if range.contains(&d) => d,
            Ok(_) => {
                self.at(
                    value,
                    format!(
                        "duration {text:?} is out of range: allowed from {} to {}",
                        show_duration(*range.start()),
                        show_duration(*range.end())
                    ),
                );
                default
            }
            Err(e) => {
                self.at(value, format!("bad duration {text:?}: {e}"));
                default
            }
        }
    }

    /// A size without a range of its own ([`SIZE_RANGE`]).
    fn size(&mut self, value: Option<&Spanned<String>>, default: usize) -> usize {
        self.size_in(value, default, SIZE_RANGE)
    }

    /// A size setting; a bad form or a value outside `range` is reported with
    /// the allowed range, and `default` stands in for it.
    fn size_in(
        &mut self,
        value: Option<&Spanned<String>>,
        default: usize,
        range: RangeInclusive<usize>,
    ) -> usize {
        let Some(value) = value else { return default };
        let text = value.get_ref();
        match parse_size(text) {
            Ok(n) if range.contains(&n) => n,
            Ok(_) => {
                self.at(
                    value,
                    format!(
                        "size {text:?} is out of range: allowed from {} to {}",
                        show_size(*range.start()),
                        show_size(*range.end())
                    ),
                );
                default
            }
            Err(e) => {
                self.at(value, format!("bad size {text:?}: {e}"));
                default
            }
        }
    }

    /// A count setting (`what` names it); a value outside `range` is
    /// reported with the allowed range, and `default` stands in for it.
    fn count<T: Copy + PartialOrd + fmt::Display>(
        &mut self,
        value: Option<&Spanned<T>>,
        default: T,
        range: RangeInclusive<T>,
        what: &str,
    ) -> T {
        match value {
            Some(v) if !range.contains(v.get_ref()) => {
                self.at(
                    v,
                    format!(
                        "{what} = {} is out of range: allowed from {} to {}",
                        v.get_ref(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        }
    }

    fn networks(&mut self, list: &[Spanned<String>]) -> Vec<IpNet> {
        list.iter()
            .filter_map(|n| match n.get_ref().parse::<IpNet>() {
                Ok(net) => Some(net),
                Err(_) => {
                    self.at(
                        n,
                        format!(
                            "bad network {:?}: expected CIDR like \"127.0.0.1/32\"",
                            n.get_ref()
                        ),
                    );
                    None
                }
            })
            .collect()
    }

    fn addr(&mut self, value: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    value,
                    format!(
                        "bad {what} address {:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn validate(&mut self, file: file::Root) -> Config {
        let server = self.server(file.server.unwrap_or_default());
        let listen = self.listen(file.listen.unwrap_or_default());
        let admin = self.admin(file.admin.unwrap_or_default());
        let services: Vec<Service> = file
            .services
            .into_iter()
            .filter_map(|(name, s)| self.service(name, s))
            .collect();
        let any_dropped = self
            .dropped
            .iter()
            .any(|(section, _)| section == "services");
        if services.is_empty() && !any_dropped {
            self.error(
                0,
                "no services: add at least one [services.NAME] with blue and green pools".into(),
            );
        }
        let rate_limits: Vec<RateLimit> = file
            .rate_limits
            .into_iter()
            .filter_map(|(name, r)| self.rate_limit(name, r))
            .collect();
        let routes = self.routes(file.routes, &services, &rate_limits);
        Config {
            path: self.path.to_path_buf(),
            server,
            listen,
            admin,
            services,
            routes,
            rate_limits,
            positions: std::mem::take(&mut self.positions),
        }
    }

    fn server(&mut self, s: file::Server) -> Server {
        let threads = self.count(
            s.threads.as_ref(),
            DEFAULT_THREADS as u32,
            THREADS_RANGE,
            "threads",
        ) as usize;
        Server {
            threads,
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

    fn listen(&mut self, l: file::Listen) -> Listen {
        let mut addr = |value: Option<Spanned<String>>, default: &str, what: &str| {
            value
                .and_then(|v| self.addr(&v, what))
                .unwrap_or_else(|| default.parse().expect("default addresses are valid"))
        };
        Listen {
            http: addr(l.http, DEFAULT_HTTP_LISTEN, "listen.http"),
            admin: addr(l.admin, DEFAULT_ADMIN_LISTEN, "listen.admin"),
        }
    }

    fn admin(&mut self, a: file::Admin) -> Admin {
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
        }
    }

    /// A key that names a file: its position is kept for later problems
    /// with the file itself ([`Config::error_at`]).
    fn path_key(&mut self, key: &'static str, value: Option<Spanned<PathBuf>>) -> Option<PathBuf> {
        let value = value?;
        let at = line_col(self.text, value.span().start);
        self.positions.insert(key, at);
        Some(value.into_inner())
    }

    fn service(&mut self, name: Spanned<String>, s: file::Service) -> Option<Service> {
        let valid_name = self.name(&name, "service");
        if !valid_name {
            self.dropped
                .insert(("services".into(), name.get_ref().clone()));
        }
        let mut pool = |list: Spanned<Vec<Spanned<String>>>, color: &str| -> Vec<SocketAddr> {
            if list.get_ref().is_empty() {
                self.at(
                    &list,
                    format!(
                        "service {:?} has an empty {color} pool: list at least one backend address",
                        name.get_ref()
                    ),
                );
            }
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for a in list.get_ref() {
                if let Some(addr) = self.addr(a, "backend") {
                    if seen.insert(addr) {
                        out.push(addr);
                    } else {
                        self.at(a, format!("backend {addr} is listed twice in this pool"));
                    }
                }
            }
            out
        };
        let blue = pool(s.blue, "blue");
        let green = pool(s.green, "green");
        let active = match s.active {
            None => Color::Blue,
            Some(c) => match c.get_ref().parse::<Color>() {
                Ok(color) => color,
                Err(e) => {
                    self.at(&c, e.to_string());
                    Color::Blue
                }
            },
        };
        let connect_timeout = self.duration_in(
            s.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            CONNECT_TIMEOUT_RANGE,
        );
        let health = s.health.map(|h| self.health(h));
        let min_healthy = s.min_healthy.map(|m| {
            let smallest = blue.len().min(green.len());
            if health.is_none() {
                self.at(&m, "min_healthy needs a `health` check to count healthy backends".into());
            } else if *m.get_ref() == 0 || *m.get_ref() > smallest {
                self.at(
                    &m,
                    format!(
                        "min_healthy must be between 1 and the size of the smaller pool ({smallest})"
                    ),
                );
            }
            *m.get_ref()
        });
        valid_name.then(|| Service {
            name: name.into_inner(),
            blue,
            green,
            active,
            connect_timeout,
            health,
            min_healthy,
        })
    }

    fn health(&mut self, h: file::Health) -> HealthCheck {
        if !h.path.get_ref().starts_with('/') {
            self.at(
                &h.path,
                format!("health path {:?} must start with '/'", h.path.get_ref()),
            );
        }
        let rise = self.count(
            h.rise.as_ref(),
            DEFAULT_HEALTH_RISE,
            RISE_FALL_RANGE,
            "rise",
        );
        let fall = self.count(
            h.fall.as_ref(),
            DEFAULT_HEALTH_FALL,
            RISE_FALL_RANGE,
            "fall",
        );
        let interval = self.duration_in(
            h.interval.as_ref(),
            DEFAULT_HEALTH_INTERVAL,
            HEALTH_INTERVAL_RANGE,
        );
        let timeout = self.duration_in(
            h.timeout.as_ref(),
            DEFAULT_HEALTH_TIMEOUT,
            HEALTH_TIMEOUT_RANGE,
        );
        let expect = match h.expect {
            Some(code) if !(100..=599).contains(code.get_ref()) => {
                self.at(
                    &code,
                    "expect must be an HTTP status between 100 and 599".into(),
                );
                200
            }
            Some(code) => *code.get_ref(),
            None => 200,
        };
        HealthCheck {
            path: h.path.into_inner(),
            interval,
            timeout,
            expect,
            body: h.body,
            rise,
            fall,
        }
    }

    fn rate_limit(&mut self, name: Spanned<String>, r: file::RateLimit) -> Option<RateLimit> {
        let valid_name = self.name(&name, "rate limit");
        if !valid_name {
            self.dropped
                .insert(("rate_limits".into(), name.get_ref().clone()));
        }
        let (requests, per) = match parse_rate(r.rate.get_ref()) {
            Some(rate) => rate,
            None => {
                self.at(
                    &r.rate,
                    format!(
                        "bad rate {:?}: write it like \"2/s\", \"30/m\" or \"500/h\" (1 to {MAX_RATE} requests)",
                        r.rate.get_ref()
                    ),
                );
                (1, Duration::from_secs(1))
            }
        };
        let burst = match r.burst {
            Some(b) if *b.get_ref() >= MAX_RATE => {
                self.at(&b, format!("burst must be below {MAX_RATE}"));
                DEFAULT_RATE_BURST
            }
            Some(b) => *b.get_ref(),
            None => DEFAULT_RATE_BURST,
        };
        let methods = r.methods.map(|list| {
            let mut out: Vec<http::Method> = Vec::new();
            for m in &list {
                let upper = m.get_ref().to_ascii_uppercase();
                match http::Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() && !out.contains(&method) => out.push(method),
                    Ok(_) if !upper.is_empty() => {
                        self.at(m, format!("method {upper} is listed twice"))
                    }
                    _ => self.at(
                        m,
                        format!("bad method {:?}: give names like \"POST\"", m.get_ref()),
                    ),
                }
            }
            out
        });
        valid_name.then(|| RateLimit {
            name: name.into_inner(),
            requests,
            per,
            burst,
            methods,
        })
    }

    /// Checks a service or rate-limit name: they appear in URLs, metrics and logs.
    fn name(&mut self, name: &Spanned<String>, what: &str) -> bool {
        let n = name.get_ref();
        let ok = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            self.at(
                name,
                format!("bad {what} name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        ok
    }

    fn routes(
        &mut self,
        routes: Vec<Spanned<file::Route>>,
        services: &[Service],
        rate_limits: &[RateLimit],
    ) -> Vec<Route> {
        // (host, path) -> line of the route that claimed it first.
        let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut out = Vec::new();
        for spanned in routes {
            let r = spanned.get_ref();
            let host = match &r.host {
                None => None,
                Some(h) => {
                    // The grammar requests are held to (host.rs), so every
                    // host a request can name can also be routed, and in the
                    // same canonical form (lower case, no trailing dot).
                    match crate::host::Authority::parse(h.get_ref().as_bytes()) {
                        Ok(a) if a.port().is_none() && !h.get_ref().ends_with(':') => {
                            Some(a.host().to_string())
                        }
                        _ => {
                            self.at(
                                h,
                                format!(
                                    "bad host {:?}: give a host name, an IPv4 address or a bracketed IPv6 address, without port or scheme, e.g. \"api.example.com\"",
                                    h.get_ref()
                                ),
                            );
                            Some(h.get_ref().to_ascii_lowercase())
                        }
                    }
                }
            };
            if !r.path.get_ref().starts_with('/') {
                self.at(
                    &r.path,
                    format!("route path {:?} must start with '/'", r.path.get_ref()),
                );
            } else if let Some(problem) = crate::route::route_path_error(r.path.get_ref()) {
                self.at(
                    &r.path,
                    format!("route path {:?}: {problem}", r.path.get_ref()),
                );
            }
            let action = match (&r.service, &r.action) {
                (Some(svc), None) => match services.iter().position(|s| s.name == *svc.get_ref()) {
                    Some(i) => Some(RouteAction::Proxy(i)),
                    // Its table had a mistake, already reported.
                    None if self.was_dropped("services", svc.get_ref()) => None,
                    None => {
                        self.at(
                            svc,
                            format!(
                                "route to unknown service {:?}; defined services: {}",
                                svc.get_ref(),
                                names(services.iter().map(|s| s.name.as_str()))
                            ),
                        );
                        None
                    }
                },
                (None, Some(a)) if a.get_ref() == "deny" => Some(RouteAction::Deny),
                (None, Some(a)) => {
                    self.at(
                        a,
                        format!(
                            "unknown route action {:?}; the only action is \"deny\"",
                            a.get_ref()
                        ),
                    );
                    None
                }
                _ => {
                    self.at(
                        &spanned,
                        "a route needs exactly one of `service = \"NAME\"` or `action = \"deny\"`"
                            .into(),
                    );
                    None
                }
            };
            let line = line_col(self.text, spanned.span().start).0;
            let key = (host.clone(), r.path.get_ref().clone());
            let duplicate = seen.get(&key).copied();
            if let Some(first) = duplicate {
                self.at(
                    &spanned,
                    format!(
                        "duplicate route: host {} path {:?} is already routed by the route on line {first}",
                        host.as_deref().unwrap_or("(any)"),
                        r.path.get_ref()
                    ),
                );
            } else {
                seen.insert(key, line);
            }
            let rate_limit = r.rate_limit.as_ref().and_then(|name| {
                let found = rate_limits.iter().position(|l| l.name == *name.get_ref());
                if found.is_none() && !self.was_dropped("rate_limits", name.get_ref()) {
                    self.at(
                        name,
                        format!(
                            "route uses unknown rate limit {:?}; defined [rate_limits]: {}",
                            name.get_ref(),
                            names(rate_limits.iter().map(|l| l.name.as_str()))
                        ),
                    );
                }
                found
            });
            let defaults = RouteLimits::default();
            let limits = RouteLimits {
                websocket: r.websocket.unwrap_or(false),
                // Long streams (SSE, WebSockets) use the whole general range.
                idle_timeout: self.duration(r.idle_timeout.as_ref(), defaults.idle_timeout),
                read_timeout: self.duration(r.read_timeout.as_ref(), defaults.read_timeout),
                max_body: self.size(r.max_body.as_ref(), defaults.max_body),
                rate_limit,
            };
            if let (Some(action), None) = (action, duplicate) {
                out.push(Route {
                    host,
                    path: r.path.get_ref().clone(),
                    action,
                    limits,
                });
            }
        }
        out
    }
}

/// Whether `inner` lies within `outer`.
fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Removes the innermost entry of `table` (span `span`) whose key or value
/// holds the error span `err`; `path` is the way down to `table`.
fn remove_at(
    table: &mut DeTable<'_>,
    span: Range<usize>,
    err: &Range<usize>,
    path: &mut Vec<String>,
) -> Option<Removed> {
    let mut hit = None;
    for (k, v) in table.iter_mut() {
        path.push(k.get_ref().to_string());
        if let Some(found) = remove_in(v, err, path) {
            return Some(found);
        }
        path.pop();
        if hit.is_none() && (contains(&k.span(), err) || contains(&v.span(), err)) {
            hit = Some(k.clone());
        }
    }
    let key = hit?;
    let value = table.remove(&key)?;
    path.push(key.get_ref().to_string());
    Some(Removed {
        path: path.clone(),
        parent: span,
        kind: value.get_ref().type_str(),
    })
}

/// [`remove_at`] for whatever a value holds: a table's entries or an
/// array's items.
fn remove_in(
    value: &mut Spanned<DeValue<'_>>,
    err: &Range<usize>,
    path: &mut Vec<String>,
) -> Option<Removed> {
    let span = value.span();
    match value.get_mut() {
        DeValue::Table(table) => remove_at(table, span, err, path),
        DeValue::Array(items) => {
            let mut hit = None;
            for (i, item) in items.iter_mut().enumerate() {
                path.push(i.to_string());
                if let Some(found) = remove_in(item, err, path) {
                    return Some(found);
                }
                path.pop();
                if hit.is_none() && contains(&item.span(), err) {
                    hit = Some(i);
                }
            }
            let index = hit?;
            let kind = items[index].get_ref().type_str();
            *items = items
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, item)| item.clone())
                .collect();
            path.push(index.to_string());
            Some(Removed {
                path: path.clone(),
                parent: span,
                kind,
            })
        }
        _ => None,
    }
}

/// The key named by serde's "missing field `KEY`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// serde's message in the config's words, with the fix where one is known:
/// a bare number where a duration or size string belongs.
fn explain_serde_error(message: &str, key: &str, removed: &Removed) -> String {
    let message = message
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing required key")
        .replace("expected one of", "expected one of these keys:");
    let number = message
        .strip_prefix("invalid type: integer `")
        .and_then(|rest| rest.split('`').next());
    match number {
        Some(n) if removed.kind == "integer" && message.contains("expected a string") => {
            if is_duration_key(key) {
                format!("{message}; durations are strings with a unit: write {key} = \"{n}s\"")
            } else {
                format!("{message}; write {key} = \"{n}\"")
            }
        }
        _ => message,
    }
}

/// Whether a key holds a duration, by the naming rule every duration key follows.
fn is_duration_key(key: &str) -> bool {
    ["timeout", "interval", "period", "retry_after"]
        .iter()
        .any(|end| key.ends_with(end))
}

/// Parses a duration as the README documents it: a whole number and one
/// unit, `ms`, `s`, `m` or `h`, with nothing between them (`"500ms"`,
/// `"30s"`, `"2m"`, `"1h"`). The error says how to write it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let Ok(n) = number.parse::<u64>() else {
        return Err("write a whole number and a unit: ms, s, m or h, e.g. \"30s\"".into());
    };
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("a duration needs a unit: \"{n}s\", or ms, m, h")),
        _ if unit.starts_with('.') => {
            return Err("no fractions: write a smaller unit, e.g. \"1500ms\" for 1.5 s".into())
        }
        _ => {
            return Err(format!(
                "unknown unit {:?}: write ms, s, m or h right after the number, e.g. \"{n}s\"",
                unit.trim()
            ))
        }
    };
    n.checked_mul(scale)
        .map(Duration::from_millis)
        .ok_or_else(|| "too large".to_string())
}

/// A duration in the shortest unit that says it exactly, as it is written
/// in the config: `"100ms"`, `"90s"`, `"10m"`, `"24h"`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// Parses a size: a whole number of bytes, optionally followed by a unit:
/// `B`, `KiB`, `MiB`, `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of
/// 1000), e.g. `"512"`, `"32KiB"`, `"1MiB"`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let Ok(n) = number.parse::<usize>() else {
        return Err("write a whole number of bytes with an optional unit, e.g. \"1MiB\", \"32KiB\" or \"512\"".into());
    };
    let scale: usize = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {:?}: write B, KiB, MiB, GiB, KB, MB or GB right after the number, e.g. \"{n}KiB\"",
                unit.trim()
            ))
        }
    };
    n.checked_mul(scale).ok_or_else(|| "too large".to_string())
}

/// A size as written in the config: `"1MiB"`, `"32KiB"`, `"512"`.
pub fn show_size(n: usize) -> String {
    match n {
        0 => "0".into(),
        _ if n.is_multiple_of(1 << 30) => format!("{}GiB", n >> 30),
        _ if n.is_multiple_of(1 << 20) => format!("{}MiB", n >> 20),
        _ if n.is_multiple_of(1 << 10) => format!("{}KiB", n >> 10),
        _ => n.to_string(),
    }
}

/// A path for a message: relative ones also say what they are relative to
/// (the directory switchyard was started in, absolute), since that is where
/// a reader would not look.
pub fn show_path(path: &Path) -> String {
    match relative_to(path) {
        Some(base) => format!("{} ({base})", path.display()),
        None => path.display().to_string(),
    }
}

/// For a relative path, `relative to DIR, the directory switchyard was
/// started in`; `None` for an absolute one (or when the directory is gone).
pub fn relative_to(path: &Path) -> Option<String> {
    if path.is_absolute() {
        return None;
    }
    let dir = std::env::current_dir().ok()?;
    Some(format!(
        "relative to {}, the directory switchyard was started in",
        dir.display()
    ))
}

/// A list of defined names for messages, or "(none)".
fn names<'a>(defined: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = defined.collect();
    if list.is_empty() {
        "(none)".into()
    } else {
        list.join(", ")
    }
}

/// `"N/s"`, `"N/m"` or `"N/h"` as (N, the unit), N from 1 to [`MAX_RATE`].
fn parse_rate(text: &str) -> Option<(u32, Duration)> {
    let (count, unit) = text.split_once('/')?;
    let count: u32 = count.trim().parse().ok()?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return None,
    };
    (1..=MAX_RATE).contains(&count).then_some((count, per))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// The file as written. Each struct mirrors a TOML table and refuses keys it
/// does not know, so a typo is an error rather than a silently ignored setting.
mod file {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Root {
        pub server: Option<Server>,
        pub listen: Option<Listen>,
        pub admin: Option<Admin>,
        #[serde(default)]
        pub services: BTreeMap<Spanned<String>, Service>,
        #[serde(default)]
        pub routes: Vec<Spanned<Route>>,
        #[serde(default)]
        pub rate_limits: BTreeMap<Spanned<String>, RateLimit>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RateLimit {
        pub rate: Spanned<String>,
        pub burst: Option<Spanned<u32>>,
        pub methods: Option<Vec<Spanned<String>>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Server {
        pub threads: Option<Spanned<u32>>,
        pub grace_period: Option<Spanned<String>>,
        pub state_dir: Option<Spanned<PathBuf>>,
        pub upstream_keepalive_pool: Option<Spanned<usize>>,
        pub header_timeout: Option<Spanned<String>>,
        pub body_timeout: Option<Spanned<String>>,
        pub keepalive_timeout: Option<Spanned<String>>,
        pub send_timeout: Option<Spanned<String>>,
        pub trusted_proxies: Option<Vec<Spanned<String>>>,
        pub max_header_size: Option<Spanned<String>>,
        pub maintenance_page: Option<Spanned<PathBuf>>,
        pub retry_after: Option<Spanned<String>>,
        pub max_connections: Option<Spanned<u64>>,
        pub max_connections_per_client: Option<Spanned<u64>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Listen {
        pub http: Option<Spanned<String>>,
        pub admin: Option<Spanned<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub token_file: Option<Spanned<PathBuf>>,
        pub allow: Option<Vec<Spanned<String>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub blue: Spanned<Vec<Spanned<String>>>,
        pub green: Spanned<Vec<Spanned<String>>>,
        pub active: Option<Spanned<String>>,
        pub connect_timeout: Option<Spanned<String>>,
        pub health: Option<Health>,
        pub min_healthy: Option<Spanned<usize>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        pub path: Spanned<String>,
        pub interval: Option<Spanned<String>>,
        pub timeout: Option<Spanned<String>>,
        pub expect: Option<Spanned<u16>>,
        pub body: Option<String>,
        pub rise: Option<Spanned<u32>>,
        pub fall: Option<Spanned<u32>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub host: Option<Spanned<String>>,
        pub path: Spanned<String>,
        pub service: Option<Spanned<String>>,
        pub action: Option<Spanned<String>>,
        pub websocket: Option<bool>,
        pub idle_timeout: Option<Spanned<String>>,
        pub read_timeout: Option<Spanned<String>>,
        pub max_body: Option<Spanned<String>>,
        pub rate_limit: Option<Spanned<String>>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
threads = 1
grace_period = "5s"

[listen]
http = "127.0.0.1:8000"

[services.api]
blue = ["127.0.0.1:8080"]
green = ["127.0.0.1:8081"]
active = "green"

[[routes]]
host = "API.example.com"
path = "/api/"
service = "api"

[[routes]]
path = "/actuator"
action = "deny"
"#;

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::parse(Path::new("t.toml"), text) {
            Ok(_) => panic!("expected errors"),
            Err(ConfigErrors::Invalid { list }) => list,
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.server.threads, 1);
        assert_eq!(c.server.grace_period, Duration::from_secs(5));
        assert_eq!(c.listen.admin, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(c.admin.allow.len(), 2);
        assert_eq!(c.services[0].active, Color::Green);
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(c.routes[1].action, RouteAction::Deny);
    }

    #[test]
    fn unknown_service_is_located() {
        let text = GOOD.replace("service = \"api\"", "service = \"apx\"");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].col), (17, 11));
        assert!(e[0].message.contains("unknown service \"apx\""), "{}", e[0]);
    }

    #[test]
    fn every_mistake_is_reported() {
        let text = GOOD
            .replace("\"5s\"", "\"soon\"")
            .replace("[\"127.0.0.1:8081\"]", "[]")
            .replace("\"green\"", "\"purple\"")
            .replace("\"127.0.0.1:8000\"", "\"127.0.0.1:x\"");
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 7, 11, 12], "{e:?}");
    }

    #[test]
    fn duplicate_route_and_unknown_key() {
        let text = format!("{GOOD}\n[[routes]]\npath = \"/actuator\"\naction = \"deny\"\n");
        let e = errors(&text);
        assert!(e[0].message.contains("duplicate route"), "{}", e[0]);
        assert_eq!(e[0].line, 23);
        let e = errors(&GOOD.replace("threads = 1", "threads = 1\ncolour = 2"));
        assert_eq!(e[0].line, 4);
        assert!(e[0].message.contains("colour"), "{}", e[0]);
    }

    #[test]
    fn rate_limits_parse_and_routes_name_them() {
        let text = format!(
            "{GOOD}\n[rate_limits.writes]\nrate = \"2/s\"\nburst = 10\nmethods = [\"post\", \"PUT\"]\n"
        )
        .replace("service = \"api\"", "service = \"api\"\nrate_limit = \"writes\"");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let limit = &c.rate_limits[0];
        assert_eq!(
            (limit.requests, limit.per, limit.burst),
            (2, Duration::from_secs(1), 10)
        );
        assert_eq!(
            limit.methods,
            Some(vec![http::Method::POST, http::Method::PUT])
        );
        assert_eq!(c.routes[0].limits.rate_limit, Some(0));
        assert_eq!(c.routes[1].limits.rate_limit, None);
    }

    #[test]
    fn bad_rate_limits_are_located() {
        let text = format!(
            "{GOOD}\n[rate_limits.writes]\nrate = \"2/d\"\nburst = 1000000\nmethods = [\"PO ST\"]\n"
        )
        .replace(
            "service = \"api\"",
            "service = \"api\"\nrate_limit = \"write\"",
        );
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        // In line order, whatever order they were found in.
        assert_eq!(lines, vec![18, 25, 26, 27], "{e:?}");
        assert!(
            e[0].message
                .contains("unknown rate limit \"write\"; defined [rate_limits]: writes"),
            "{}",
            e[0]
        );
        assert!(e[1].message.contains("bad rate \"2/d\""), "{}", e[1]);
        assert!(e[2].message.contains("burst"), "{}", e[2]);
        assert!(e[3].message.contains("bad method"), "{}", e[3]);
    }

    #[test]
    fn rates_read_like_nginx() {
        assert_eq!(parse_rate("2/s"), Some((2, Duration::from_secs(1))));
        assert_eq!(parse_rate("30/m"), Some((30, Duration::from_secs(60))));
        assert_eq!(
            parse_rate("500 / h"),
            Some((500, Duration::from_secs(3600)))
        );
        for bad in ["0/s", "2", "2/d", "-1/s", "1000001/s", "x/s", ""] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }

    #[test]
    fn structural_and_semantic_mistakes_are_all_reported_in_line_order() {
        let text = GOOD
            .replace("threads = 1", "threads = \"one\"\ncolour = 2")
            .replace("http = \"127.0.0.1:8000\"", "htp = \"127.0.0.1:8000\"")
            .replace("service = \"api\"", "service = \"apx\"\nwebsockets = true");
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 8, 18, 19], "{e:?}");
        assert!(e[0].message.contains("invalid type"), "{}", e[0]);
        assert!(e[1].message.contains("unknown key `colour`"), "{}", e[1]);
        assert!(e[2].message.contains("unknown key `htp`"), "{}", e[2]);
        assert!(e[3].message.contains("unknown service \"apx\""), "{}", e[3]);
        assert!(
            e[4].message.contains("unknown key `websockets`"),
            "{}",
            e[4]
        );
    }

    #[test]
    fn a_broken_required_key_is_reported_once_and_its_service_is_not_unknown() {
        // A wrong type for a required key: one error, not also "missing", and
        // the route to the dropped service does not add "unknown service".
        let text = GOOD.replace("blue = [\"127.0.0.1:8080\"]", "blue = \"127.0.0.1:8080\"");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].line, 10, "{e:?}");
        // A missing required key is named.
        let text = GOOD.replace("green = [\"127.0.0.1:8081\"]\n", "");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].message.contains("missing required key `green`"),
            "{e:?}"
        );
    }

    #[test]
    fn a_section_of_the_wrong_type_is_one_mistake() {
        let text = "services = 5\n\n[[routes]]\npath = \"/\"\nservice = \"api\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].line, 1, "{e:?}");
    }

    #[test]
    fn durations_take_one_documented_form_and_a_range() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "10 sec",
            "10 seconds",
            "1.5s",
            "10",
            "s",
            "",
            "-1s",
            "1m30s",
            "10S",
            " 5s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("90").unwrap_err().contains("\"90s\""));
        for (text, shown) in [
            ("100ms", "100ms"),
            ("90s", "90s"),
            ("600s", "10m"),
            ("24h", "24h"),
        ] {
            assert_eq!(show_duration(parse_duration(text).unwrap()), shown);
        }
        for (line, bad) in [
            ("grace_period = \"5s\"", "grace_period = \"0s\""),
            ("grace_period = \"5s\"", "grace_period = \"99ms\""),
            ("threads = 1", "threads = 1\nheader_timeout = \"0s\""),
            ("threads = 1", "threads = 1\nkeepalive_timeout = \"9000h\""),
            ("threads = 1", "threads = 1\nretry_after = \"1500ms\""),
        ] {
            let e = errors(&GOOD.replace(line, bad));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
        }
        let e = errors(&GOOD.replace("threads = 1", "threads = 1\nheader_timeout = \"0s\""));
        assert!(
            e[0].message.contains("allowed from 100ms to 10m"),
            "{}",
            e[0]
        );
        let e = errors(&GOOD.replace("threads = 1", "threads = 1\nsend_timeout = 90"));
        assert!(e[0].message.contains("send_timeout = \"90s\""), "{}", e[0]);
    }

    #[test]
    fn sizes_and_counts_have_ranges() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        for bad in ["1.5MiB", "1 MiB", "1mib", "", "MiB", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for bad in [
            "max_header_size = \"100\"",
            "max_header_size = \"2MiB\"",
            "threads = 0",
            "upstream_keepalive_pool = 1000000",
        ] {
            let e = errors(&GOOD.replace("threads = 1", bad));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].message.contains("allowed from"), "{bad}: {}", e[0]);
        }
    }

    #[test]
    fn duplicate_route_names_the_first_line() {
        let text = format!("{GOOD}\n[[routes]]\npath = \"/actuator\"\naction = \"deny\"\n");
        let e = errors(&text);
        assert!(e[0].message.contains("on line 19"), "{}", e[0]);
    }

    #[test]
    fn route_hosts_follow_the_request_host_grammar() {
        let with_host = |h: &str| GOOD.replace("API.example.com", h);
        for (written, canonical) in [
            ("API.Example.com.", "api.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("[0:0::1]", "[::1]"),
            ("[2001:DB8:0:0::1]", "[2001:db8::1]"),
            ("under_score.example", "under_score.example"),
        ] {
            let c = Config::parse(Path::new("t.toml"), &with_host(written)).unwrap();
            assert_eq!(c.routes[0].host.as_deref(), Some(canonical), "{written}");
            // A request naming the host any valid way reaches the route.
            let table = crate::route::RouteTable::new(&c.routes);
            let request =
                crate::host::Authority::parse(format!("{written}:8443").as_bytes()).unwrap();
            assert!(table
                .resolve(Some(request.host()), "/api/x")
                .unwrap()
                .is_some());
        }
        for bad in [
            "a.com:80",
            "a.com:",
            "http://a.com",
            "a b",
            "a..b",
            "",
            "::1",
            "1.2.3",
            "[::ffff:127.0.0.1]",
        ] {
            let e = errors(&with_host(bad));
            assert!(e[0].message.contains("bad host"), "{bad}: {}", e[0]);
        }
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("a\nbé c", 6), (2, 4));
        assert_eq!(line_col("", 10), (1, 1));
    }
}

#[cfg(test)]
mod connection_cap_tests {
    use super::*;

    const SERVICE: &str =
        "[services.api]\nblue = [\"127.0.0.1:8080\"]\ngreen = [\"127.0.0.1:8081\"]\n";

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
}
