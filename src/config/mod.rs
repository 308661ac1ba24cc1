//! Configuration: the TOML file as written (`file` structs, unknown keys
//! rejected) and the validated [`Config`] the rest of switchyard reads.
//!
//! Parsing and validation happen once, at start-up or in `switchyard check`,
//! so that every mistake is reported with its file, line and column before
//! any traffic is served. Nothing here panics on user input.
//!
//! Layout: this file holds [`Config`], loading, [`ConfigError`] and the
//! `Validator` core (error positions, recovery from mistakes in the parsed
//! tree); `file.rs` the TOML structs; `values.rs` the value forms every
//! section shares (durations, sizes, counts, networks, addresses); and one
//! file per section validates it and owns its `DEFAULT_*` constants and
//! ranges: `server.rs` (`[server]`, `[listen]`, `[admin]`), `services.rs`
//! (`[services.NAME]` and their health checks), `routes.rs` (`[[routes]]`),
//! `limits.rs` (`[rate_limits.NAME]`, `[concurrency.NAME]`,
//! `[token_budgets.NAME]`), `access_log.rs` (`[access_log]`) and
//! `notify.rs` (`[[notify.webhooks]]`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

mod access_log;
mod cluster;
mod file;
mod limits;
mod notify;
mod routes;
mod server;
mod services;
mod tls;
mod values;

pub use access_log::{
    AccessLog, ACCESS_LOG_BUFFER_LINES_RANGE, ACCESS_LOG_SAMPLE_RANGE,
    DEFAULT_ACCESS_LOG_BUFFER_LINES, DEFAULT_ACCESS_LOG_ENABLED, DEFAULT_ACCESS_LOG_SAMPLE,
};
pub use cluster::{
    hostname, Cluster, PasswordSource, CLUSTER_TIMEOUT_RANGE, DEFAULT_CLUSTER_NAME,
    DEFAULT_CLUSTER_TIMEOUT, DEFAULT_LEASE, DEFAULT_LIMIT_TIMEOUT, LEASE_RANGE,
    LIMIT_TIMEOUT_RANGE, MAX_CLUSTER_NAME_LEN,
};
pub use limits::{
    Concurrency, KeySource, RateLimit, Scope, TokenBudget, BUDGET_MAX_BODY_RANGE,
    DEFAULT_BUDGET_MAX_BODY, DEFAULT_BUDGET_MAX_TOKENS, DEFAULT_INJECTED_MAX_TOKENS,
    DEFAULT_PROMPT_BYTES_PER_TOKEN, DEFAULT_QUEUE_TIMEOUT, DEFAULT_RATE_BURST, DEFAULT_SCOPE,
    MAX_IN_FLIGHT, MAX_QUEUE, MAX_RATE, MAX_TOKENS_PER_MINUTE, PROMPT_BYTES_PER_TOKEN_RANGE,
    QUEUE_TIMEOUT_RANGE,
};
pub use notify::{Notify, NotifyEvent, UrlSource, Webhook, WebhookFormat};
pub use routes::{
    Route, RouteAction, RouteLimits, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BODY, DEFAULT_READ_TIMEOUT,
};
pub use server::{
    Admin, AdminTokenFile, Listen, Server, CLIENT_TIMEOUT_RANGE, DEFAULT_ADMIN_ALLOW,
    DEFAULT_ADMIN_LISTEN, DEFAULT_BODY_TIMEOUT, DEFAULT_GRACE_PERIOD, DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HTTP_LISTEN, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_HEADER_SIZE, DEFAULT_RETRY_AFTER,
    DEFAULT_SEND_TIMEOUT, DEFAULT_STATE_DIR, DEFAULT_THREADS, DEFAULT_UPSTREAM_KEEPALIVE_POOL,
    GRACE_PERIOD_RANGE, HEADER_TIMEOUT_RANGE, KEEPALIVE_POOL_RANGE, MAX_CONNECTION_CAP,
    MAX_HEADER_SIZE_RANGE, RESERVED_TOKEN_NAMES, RETRY_AFTER_RANGE, THREADS_RANGE,
};
pub use services::{
    HealthCheck, Rollback, Service, Sticky, CONNECT_TIMEOUT_RANGE, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEALTH_FALL, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_RISE, DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_MAX_ERROR_RATIO, DEFAULT_MAX_P95, DEFAULT_MIN_REQUESTS, DEFAULT_ROLLBACK_WATCH,
    DEFAULT_ROLLBACK_WINDOW, HEALTH_INTERVAL_RANGE, HEALTH_TIMEOUT_RANGE, MAX_ERROR_RATIO_RANGE,
    MAX_P95_RANGE, MIN_REQUESTS_RANGE, RISE_FALL_RANGE, ROLLBACK_WATCH_RANGE,
    ROLLBACK_WINDOW_RANGE,
};
pub use tls::{
    Acme, AcmeCertificate, StaticCertificate, Tls, ACME_RETRY_BACKOFF_RANGE,
    DEFAULT_ACME_DIRECTORY, DEFAULT_ACME_RETRY_BACKOFF, DEFAULT_CERTS_DIR,
    DEFAULT_HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT_RANGE, MAX_DOMAINS,
};
pub use values::{
    parse_duration, parse_size, show_duration, show_size, DURATION_RANGE, MIN_DURATION, SIZE_RANGE,
};

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
    pub tls: Tls,
    /// `None`: no `[acme]` section, no certificates obtained.
    pub acme: Option<Acme>,
    /// Services in a stable order; a service's index here is its id everywhere else.
    pub services: Vec<Service>,
    pub routes: Vec<Route>,
    /// Named per-client rate limits; a route's index into this list is in its limits.
    pub rate_limits: Vec<RateLimit>,
    /// Named in-flight caps (`[concurrency.NAME]`); a route's index into
    /// this list is in its limits.
    pub concurrency: Vec<Concurrency>,
    /// Named token budgets (`[token_budgets.NAME]`); a route's index into
    /// this list is in its limits.
    pub token_budgets: Vec<TokenBudget>,
    /// `[access_log]`: one JSON line per request.
    pub access_log: AccessLog,
    /// `[[notify.webhooks]]`: where events are posted.
    pub notify: Notify,
    /// `[cluster]`: the Redis several instances share; `None`: this
    /// instance alone.
    pub cluster: Option<Cluster>,
    /// Where the keys that name files (`server.state_dir`,
    /// `server.maintenance_page`, `admin.token_file`...) are written, as
    /// (line, column), so a problem with the file itself can point at its
    /// key; a key inside an array of tables is `KEY#INDEX` (e.g.
    /// `tls.certificates.cert#0`).
    pub positions: BTreeMap<String, (usize, usize)>,
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
            cluster_scopes: Vec::new(),
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
    positions: BTreeMap<String, (usize, usize)>,
    /// Where limits say `scope = "cluster"` (byte offsets), checked
    /// against `[cluster]` once the file is read.
    cluster_scopes: Vec<usize>,
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
}

impl Validator<'_> {
    fn validate(&mut self, file: file::Root) -> Config {
        let server = self.server(file.server.unwrap_or_default());
        // Written, even if its address is bad (reported on its own).
        let https = file.listen.as_ref().is_some_and(|l| l.https.is_some());
        let listen = self.listen(file.listen.unwrap_or_default());
        let admin = self.admin(file.admin.unwrap_or_default());
        let (tls, acme) = self.tls(file.tls.unwrap_or_default(), file.acme, https);
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
        let concurrency: Vec<Concurrency> = file
            .concurrency
            .into_iter()
            .filter_map(|(name, c)| self.concurrency(name, c))
            .collect();
        let token_budgets: Vec<TokenBudget> = file
            .token_budgets
            .into_iter()
            .filter_map(|(name, b)| self.token_budget(name, b))
            .collect();
        let access_log = self.access_log(file.access_log.unwrap_or_default());
        let notify = self.notify(file.notify.unwrap_or_default());
        let has_cluster = file.cluster.is_some();
        let cluster = file.cluster.and_then(|c| self.cluster(c));
        self.cluster_scopes_need_a_cluster(has_cluster);
        let routes = self.routes(
            file.routes,
            &services,
            &rate_limits,
            &concurrency,
            &token_budgets,
        );
        Config {
            path: self.path.to_path_buf(),
            server,
            listen,
            admin,
            tls,
            acme,
            services,
            routes,
            rate_limits,
            concurrency,
            token_budgets,
            access_log,
            notify,
            cluster,
            positions: std::mem::take(&mut self.positions),
        }
    }

    /// A key that names a file: its position is kept for later problems
    /// with the file itself ([`Config::error_at`]).
    fn path_key(&mut self, key: &str, value: Option<Spanned<PathBuf>>) -> Option<PathBuf> {
        value.map(|v| self.file_key(key, v))
    }

    /// [`Validator::path_key`] for a key the file must set.
    fn file_key(&mut self, key: &str, value: Spanned<PathBuf>) -> PathBuf {
        let at = line_col(self.text, value.span().start);
        self.positions.insert(key.to_string(), at);
        value.into_inner()
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
    let mut message = message
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing required key")
        .replace("expected one of", "expected one of these keys:");
    // serde names Rust's integer types; a reader wants the rule.
    for int in ["u8", "u16", "u32", "u64", "usize"] {
        if let Some(head) = message.strip_suffix(&format!("expected {int}")) {
            message = format!("{head}expected a whole number, 0 or more, without quotes");
        }
    }
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

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pools::Color;

    pub(super) const GOOD: &str = r#"
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

    pub(super) fn errors(text: &str) -> Vec<ConfigError> {
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
    fn wrong_number_types_say_what_to_write() {
        let e = errors(&GOOD.replace("threads = 1", "threads = \"two\"\nmax_connections = -1"));
        assert_eq!(e.len(), 2, "{e:?}");
        for err in &e {
            assert!(
                err.message
                    .contains("expected a whole number, 0 or more, without quotes"),
                "{err}"
            );
        }
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
    fn line_col_counts_characters() {
        assert_eq!(line_col("a\nbé c", 6), (2, 4));
        assert_eq!(line_col("", 10), (1, 1));
    }
}
