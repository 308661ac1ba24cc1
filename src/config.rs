//! Configuration: the TOML file as written (`file` structs, unknown keys
//! rejected) and the validated [`Config`] the rest of switchyard reads.
//!
//! Parsing and validation happen once, at start-up or in `switchyard check`,
//! so that every mistake is reported with its file, line and column before
//! any traffic is served. Nothing here panics on user input.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
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

    /// Validates configuration text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut v = Validator {
            path,
            text,
            errors: Vec::new(),
        };
        let file: file::Root = match toml::from_str(text) {
            Ok(file) => file,
            Err(err) => {
                v.error(err.span().map_or(0, |s| s.start), err.message().to_string());
                return Err(ConfigErrors::Invalid { list: v.errors });
            }
        };
        let config = v.validate(file);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors::Invalid { list: v.errors })
        }
    }

    pub fn service_index(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.name == name)
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
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

    fn at<T>(&mut self, value: &Spanned<T>, message: String) {
        self.error(value.span().start, message);
    }

    fn duration(&mut self, value: Option<&Spanned<String>>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.at(
                    value,
                    format!(
                        "bad duration {:?}: {e}; write it like \"30s\", \"500ms\" or \"2m\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn size(&mut self, value: Option<&Spanned<String>>, default: usize) -> usize {
        let Some(value) = value else { return default };
        match value.get_ref().parse::<bytesize::ByteSize>() {
            Ok(size) if size.as_u64() <= usize::MAX as u64 => size.as_u64() as usize,
            _ => {
                self.at(
                    value,
                    format!(
                        "bad size {:?}: write it like \"1MiB\", \"32KiB\" or \"512\"",
                        value.get_ref()
                    ),
                );
                default
            }
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
        if services.is_empty() {
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
        }
    }

    fn server(&mut self, s: file::Server) -> Server {
        let threads = match s.threads {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > 1024 => {
                self.at(&t, "threads must be between 1 and 1024".into());
                DEFAULT_THREADS
            }
            Some(t) => *t.get_ref() as usize,
            None => DEFAULT_THREADS,
        };
        Server {
            threads,
            grace_period: self.duration(s.grace_period.as_ref(), DEFAULT_GRACE_PERIOD),
            state_dir: s
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            upstream_keepalive_pool: s
                .upstream_keepalive_pool
                .unwrap_or(DEFAULT_UPSTREAM_KEEPALIVE_POOL),
            header_timeout: self.duration(s.header_timeout.as_ref(), DEFAULT_HEADER_TIMEOUT),
            body_timeout: self.duration(s.body_timeout.as_ref(), DEFAULT_BODY_TIMEOUT),
            keepalive_timeout: self
                .duration(s.keepalive_timeout.as_ref(), DEFAULT_KEEPALIVE_TIMEOUT),
            send_timeout: self.duration(s.send_timeout.as_ref(), DEFAULT_SEND_TIMEOUT),
            trusted_proxies: self.networks(s.trusted_proxies.as_deref().unwrap_or_default()),
            max_header_size: self.size(s.max_header_size.as_ref(), DEFAULT_MAX_HEADER_SIZE),
            maintenance_page: s.maintenance_page,
            retry_after: self.duration(s.retry_after.as_ref(), DEFAULT_RETRY_AFTER),
            max_connections: self.connection_cap(s.max_connections, "max_connections"),
            max_connections_per_client: self
                .connection_cap(s.max_connections_per_client, "max_connections_per_client"),
        }
    }

    /// A connection count from 1 to [`MAX_CONNECTION_CAP`].
    fn connection_cap(&mut self, value: Option<Spanned<u64>>, what: &str) -> Option<usize> {
        let value = value?;
        let n = *value.get_ref();
        if n == 0 || n > MAX_CONNECTION_CAP {
            self.at(
                &value,
                format!("{what} must be between 1 and {MAX_CONNECTION_CAP} connections"),
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
            token_file: a.token_file,
            allow,
        }
    }

    fn service(&mut self, name: Spanned<String>, s: file::Service) -> Option<Service> {
        let valid_name = self.name(&name, "service");
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
        let connect_timeout = self.duration(s.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT);
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
        let mut count = |v: Option<Spanned<u32>>, default: u32, what: &str| match v {
            Some(n) if *n.get_ref() == 0 => {
                self.at(&n, format!("{what} must be at least 1"));
                default
            }
            Some(n) => *n.get_ref(),
            None => default,
        };
        let rise = count(h.rise, DEFAULT_HEALTH_RISE, "rise");
        let fall = count(h.fall, DEFAULT_HEALTH_FALL, "fall");
        let interval = self.duration(h.interval.as_ref(), DEFAULT_HEALTH_INTERVAL);
        let timeout = self.duration(h.timeout.as_ref(), DEFAULT_HEALTH_TIMEOUT);
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
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for spanned in routes {
            let r = spanned.get_ref();
            let host = match &r.host {
                None => None,
                Some(h) => {
                    let host = h.get_ref().to_ascii_lowercase();
                    let ok = !host.is_empty()
                        && host
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                    if !ok {
                        self.at(
                            h,
                            format!(
                                "bad host {:?}: give a plain host name without port or scheme, e.g. \"api.example.com\"",
                                h.get_ref()
                            ),
                        );
                    }
                    Some(host)
                }
            };
            if !r.path.get_ref().starts_with('/') {
                self.at(
                    &r.path,
                    format!("route path {:?} must start with '/'", r.path.get_ref()),
                );
            }
            let action = match (&r.service, &r.action) {
                (Some(svc), None) => match services.iter().position(|s| s.name == *svc.get_ref()) {
                    Some(i) => Some(RouteAction::Proxy(i)),
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
            if !seen.insert((host.clone(), r.path.get_ref().clone())) {
                self.at(
                    &spanned,
                    format!(
                        "duplicate route: host {} path {:?} is already routed above",
                        host.as_deref().unwrap_or("(any)"),
                        r.path.get_ref()
                    ),
                );
                continue;
            }
            let rate_limit = r.rate_limit.as_ref().and_then(|name| {
                let found = rate_limits.iter().position(|l| l.name == *name.get_ref());
                if found.is_none() {
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
                idle_timeout: self.duration(r.idle_timeout.as_ref(), defaults.idle_timeout),
                read_timeout: self.duration(r.read_timeout.as_ref(), defaults.read_timeout),
                max_body: self.size(r.max_body.as_ref(), defaults.max_body),
                rate_limit,
            };
            if let Some(action) = action {
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
        pub state_dir: Option<PathBuf>,
        pub upstream_keepalive_pool: Option<usize>,
        pub header_timeout: Option<Spanned<String>>,
        pub body_timeout: Option<Spanned<String>>,
        pub keepalive_timeout: Option<Spanned<String>>,
        pub send_timeout: Option<Spanned<String>>,
        pub trusted_proxies: Option<Vec<Spanned<String>>>,
        pub max_header_size: Option<Spanned<String>>,
        pub maintenance_page: Option<PathBuf>,
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
        pub token_file: Option<PathBuf>,
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
        assert_eq!(lines, vec![25, 26, 27, 18], "{e:?}");
        assert!(e[0].message.contains("bad rate \"2/d\""), "{}", e[0]);
        assert!(e[1].message.contains("burst"), "{}", e[1]);
        assert!(e[2].message.contains("bad method"), "{}", e[2]);
        assert!(
            e[3].message
                .contains("unknown rate limit \"write\"; defined [rate_limits]: writes"),
            "{}",
            e[3]
        );
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
            err.contains("t.toml:2:19: max_connections must be between 1 and"),
            "{err}"
        );
        assert!(
            err.contains("t.toml:3:30: max_connections_per_client must be between 1"),
            "{err}"
        );
    }
}
