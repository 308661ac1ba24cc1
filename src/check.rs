//! What `switchyard check` verifies, shared with `run` and with a config
//! reload (`reload.rs`), so a reload rejects a file with exactly the errors
//! `check` prints.

use std::path::Path;

use crate::admin::auth;
use crate::config::{self, Config, ConfigError};
use crate::store::{FileStore, StateStore};
use crate::tls::certs::{self, CertError};

/// `path` read and validated as `switchyard check` does it: the config, or
/// every problem as the lines `check` prints for it (without its closing
/// `check failed` line), sorted by position.
pub fn check_path(path: &Path) -> Result<Config, Vec<String>> {
    let (config, mut problems) = match Config::load_all(path) {
        Ok(read) => read,
        Err(e) => return Err(vec![e.to_string()]),
    };
    if let Some(config) = &config {
        problems.extend(check_files(config));
    }
    problems.sort_by_key(|e| (e.line, e.col));
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems.iter().map(ToString::to_string).collect()),
    }
}

/// What `check` and `run` verify beyond the config text: the token file,
/// the saved state, the maintenance page and the access log's directory, each located at the key that
/// names it. Relative paths in a message say what they are relative to.
pub fn check_files(config: &Config) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    for (key, e) in auth::check_tokens(&config.admin, std::env::var(auth::TOKEN_ENV).ok()) {
        let message = match config.admin.tokens.get(key_index(&key)) {
            Some(named) => format!("{e}{}", relative_note("file", &named.file)),
            None => e.to_string(),
        };
        problems.push(config.error_at(&key, message));
    }
    for hook in &config.notify.webhooks {
        if let Err(e) = crate::notify::load_url(hook, |v| std::env::var(v).ok()) {
            let key = match hook.url {
                config::UrlSource::File(_) => "url_file",
                config::UrlSource::Env(_) => "url_env",
            };
            let at = format!("notify.webhooks.{key}#{}", hook.index);
            problems.push(config.error_at(&at, e.to_string()));
        }
    }
    if let Some(cluster) = &config.cluster {
        if let Err(e) = crate::cluster::load_password(cluster, |v| std::env::var(v).ok()) {
            let (key, path) = match &cluster.password {
                Some(config::PasswordSource::File(path)) => ("password_file", Some(path)),
                _ => ("password_env", None),
            };
            let note = path.map_or(String::new(), |p| relative_note(key, p));
            problems.push(config.error_at(&format!("cluster.{key}"), format!("{e}{note}")));
        }
        if let Err(e) = crate::cluster::RedisState::new(cluster, None) {
            let note = cluster
                .ca_file
                .as_deref()
                .map_or(String::new(), |p| relative_note("ca_file", p));
            problems.push(config.error_at("cluster.ca_file", format!("{e}{note}")));
        }
    }
    let state_dir = &config.server.state_dir;
    if let Err(e) = FileStore::existing(state_dir).load() {
        let message = format!("{e}{}", relative_note("state_dir", state_dir));
        problems.push(config.error_at("server.state_dir", message));
    }
    if let Err(e) = crate::load_pages(&config.server) {
        let page = config
            .server
            .maintenance_page
            .as_deref()
            .unwrap_or(Path::new(""));
        let message = format!("{e}{}", relative_note("maintenance_page", page));
        problems.push(config.error_at("server.maintenance_page", message));
    }
    problems.extend(check_static_certificates(config));
    let log = &config.access_log;
    if let Some(path) = log.path.as_deref().filter(|_| log.enabled) {
        if let Err(e) = crate::access_log::check_path(path) {
            let message = format!("{e}{}", relative_note("path", path));
            problems.push(config.error_at("access_log.path", message));
        }
    }
    if config.acme.is_some() {
        let dir = &config.tls.certs_dir;
        if let Err(e) = certs::check_certs_dir(dir) {
            let message = format!("{e}{}", relative_note("certs_dir", dir));
            problems.push(config.error_at("tls.certs_dir", message));
        }
    }
    if let Some(root) = config.acme.as_ref().and_then(|a| a.ca_root.as_deref()) {
        if let Err(e) = certs::check_ca_root(root) {
            let message = format!("{e}{}", relative_note("ca_root", root));
            problems.push(config.error_at("acme.ca_root", message));
        }
    }
    problems
}

/// Each `[[tls.certificates]]` as start-up will load it: readable, key
/// matching the certificate, not expired. A problem is located at the key
/// naming the file at fault (`key` for a key that does not match).
fn check_static_certificates(config: &Config) -> Vec<ConfigError> {
    let now = std::time::SystemTime::now();
    let mut problems = Vec::new();
    for (i, c) in config.tls.certificates.iter().enumerate() {
        let Err(e) = certs::load_static(&c.cert, &c.key, now) else {
            continue;
        };
        let (key, path) = match &e {
            CertError::Read { path, .. } if *path == c.key => ("key", &c.key),
            CertError::Key { .. } | CertError::Mismatch { .. } => ("key", &c.key),
            _ => ("cert", &c.cert),
        };
        let message = format!("{e}{}", relative_note(key, path));
        problems.push(config.error_at(&format!("tls.certificates.{key}#{i}"), message));
    }
    problems
}

/// `I` of a key `NAME#I`; `usize::MAX` for a key without an index.
fn key_index(key: &str) -> usize {
    key.rsplit_once('#')
        .and_then(|(_, i)| i.parse().ok())
        .unwrap_or(usize::MAX)
}

/// For a relative path: what it is relative to, for an error message.
fn relative_note(key: &str, path: &Path) -> String {
    match config::relative_to(path).filter(|_| !path.as_os_str().is_empty()) {
        Some(base) => format!("\n  ({key} = {}, {base})", path.display()),
        None => String::new(),
    }
}
