//! Config reload: `POST /reload`, `switchyard ctl reload` and SIGHUP re-read
//! the config file the process was started with.
//!
//! The file is checked exactly as `switchyard check` checks it
//! (`check.rs`); an invalid one is rejected with check's error lines and
//! changes nothing. A valid one becomes the next snapshot
//! ([`Switchboard::reload`]): routes, services, pools, limits and the
//! per-request `[server]` settings change for requests that start after
//! the reload, while requests, WebSockets and streams in flight finish on
//! the snapshot they loaded. Settings that are read once at start-up (the
//! listeners, threads, TLS, the admin API, ...; [`RESTART_ONLY`]) keep
//! their running values: the reload says which of them changed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pools::Reloaded;
use crate::record::Observer;
use crate::settings::Settings;
use crate::store::Actor;
use crate::switchboard::Switchboard;

/// The config keys a reload cannot change: each is read once when the
/// process builds its listeners and background services. A reload that
/// changes one keeps the running value and names the key (answer and WARN
/// log line); a restart (or the `-u` socket handover) applies it.
pub const RESTART_ONLY: [&str; 16] = [
    "listen",
    "cluster",
    "admin",
    "tls",
    "acme",
    "access_log",
    "notify",
    "server.threads",
    "server.work_stealing",
    "server.grace_period",
    "server.state_dir",
    "server.upstream_keepalive_pool",
    "server.header_timeout",
    "server.max_connections",
    "server.max_connections_per_client",
    // The HTTP/2 idle limit of the HTTPS listener is set from it at start;
    // HTTP/1.1 keep-alive follows a reload.
    "server.keepalive_timeout (HTTP/2 idle limit)",
];

/// Whether `key` of [`RESTART_ONLY`] differs between `a` and `b`. The
/// sections are compared by their `Debug` form: they hold paths, addresses
/// and durations, never a secret's value (token and webhook URLs are read
/// from files at start), and not every one implements `PartialEq`.
fn differs(key: &str, a: &Config, b: &Config) -> bool {
    let d = |x: &dyn std::fmt::Debug, y: &dyn std::fmt::Debug| format!("{x:?}") != format!("{y:?}");
    let (s, t) = (&a.server, &b.server);
    match key {
        "listen" => d(&a.listen, &b.listen),
        "cluster" => d(&a.cluster, &b.cluster),
        "admin" => d(&a.admin, &b.admin),
        "tls" => d(&a.tls, &b.tls),
        "acme" => d(&a.acme, &b.acme),
        "access_log" => d(&a.access_log, &b.access_log),
        "notify" => d(&a.notify, &b.notify),
        "server.threads" => s.threads != t.threads,
        "server.work_stealing" => s.work_stealing != t.work_stealing,
        "server.grace_period" => s.grace_period != t.grace_period,
        "server.state_dir" => s.state_dir != t.state_dir,
        "server.upstream_keepalive_pool" => s.upstream_keepalive_pool != t.upstream_keepalive_pool,
        "server.header_timeout" => s.header_timeout != t.header_timeout,
        "server.max_connections" => s.max_connections != t.max_connections,
        "server.max_connections_per_client" => {
            s.max_connections_per_client != t.max_connections_per_client
        }
        _ => a.listen.https.is_some() && s.keepalive_timeout != t.keepalive_timeout,
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not pass `switchyard check`: its error lines.
    #[error("{} rejected, the running config is kept:\n{}", path.display(), errors.join("\n"))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// What a reload did, as the admin API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The file read.
    pub config: String,
    #[serde(flatten)]
    pub changes: Reloaded,
    /// Keys of [`RESTART_ONLY`] the file changes, still running with their
    /// start-up values.
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads the config file and puts it in force.
pub struct Reloader {
    path: PathBuf,
    board: Arc<Switchboard>,
    /// The config the process started with: restart-only keys are
    /// compared against it, since they keep its values until a restart.
    started: Config,
    /// Told about each config put in force (metrics series by name).
    observers: Vec<Arc<dyn Observer>>,
    /// Counts reloads (`switchyard_config_reloads_total`) when metrics are on.
    metrics: Option<Arc<Metrics>>,
    /// One reload at a time: check, build and store must not interleave.
    one: Mutex<()>,
}

impl Reloader {
    /// `config`: the config the process started with, read from `config.path`.
    pub fn new(config: &Config, board: Arc<Switchboard>) -> Reloader {
        Reloader {
            path: config.path.clone(),
            board,
            started: config.clone(),
            observers: Vec::new(),
            metrics: None,
            one: Mutex::new(()),
        }
    }

    /// Tells `observers` about every config put in force.
    pub fn with_observers(mut self, observers: Vec<Arc<dyn Observer>>) -> Reloader {
        self.observers = observers;
        self
    }

    /// Counts reloads into `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Reloader {
        self.metrics = metrics;
        self
    }

    /// Reads, checks and applies the config file; `actor` (who asked:
    /// `token:NAME`, `sighup`) is logged. Blocking (reads files): call it
    /// off the async threads.
    pub fn reload(&self, actor: &Actor) -> Result<Outcome, ReloadError> {
        let _one = self.one.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path.display().to_string();
        let checked = crate::check::check_path(&self.path).and_then(|config| {
            // Checked just above (`check_files`); only a file changed in
            // between can fail here.
            match crate::load_pages(&config.server) {
                Ok(pages) => Ok((config, pages)),
                Err(e) => Err(vec![e.to_string()]),
            }
        });
        let (config, pages) = match checked {
            Ok(read) => read,
            Err(errors) => {
                self.count(false);
                tracing::error!(%actor, config = %path, errors = %errors.join("; "), "config reload rejected; the running config is kept");
                return Err(ReloadError::Invalid {
                    path: self.path.clone(),
                    errors,
                });
            }
        };
        let needs_restart: Vec<&'static str> = RESTART_ONLY
            .into_iter()
            .filter(|k| differs(k, &self.started, &config))
            .collect();
        let before = self.board.load();
        // The cluster link is made once at start (`[cluster]` is restart-only).
        let settings =
            Settings::new(&config.server, pages).with_cluster(before.settings.cluster.clone());
        let changes = self.board.reload(&config, settings);
        self.board.note_reload(&before, &Actor::reload(actor));
        for o in &self.observers {
            o.config_reloaded(&config);
        }
        self.count(true);
        tracing::info!(
            %actor,
            config = %path,
            services = config.services.len(),
            routes = config.routes.len(),
            services_added = ?changes.services_added,
            services_removed = ?changes.services_removed,
            routes_added = ?changes.routes_added,
            routes_removed = ?changes.routes_removed,
            limits_reset = ?changes.limits_reset,
            "config reloaded"
        );
        if !needs_restart.is_empty() {
            tracing::warn!(%actor, keys = %needs_restart.join(", "), "config reload: these settings changed but need a restart; their running values are kept");
        }
        Ok(Outcome {
            config: path,
            changes,
            needs_restart,
        })
    }

    fn count(&self, ok: bool) {
        if let Some(m) = &self.metrics {
            m.count_reload(ok);
        }
    }
}

/// Replaces SIGHUP's default action (ending the process) for the rest of
/// the process's life, before the server runs: a SIGHUP that arrives
/// before [`OnSighup`] starts is then dropped rather than fatal. Tokio
/// installs its handler process-wide the first time a signal is asked
/// for, and keeps it after the stream (and the short-lived runtime it is
/// made in here) are gone; a fork (`--daemon`) keeps it too.
pub fn catch_sighup() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(drop)
    })
}

/// The background service that reloads on SIGHUP. Pingora does not handle
/// SIGHUP (its `run` waits for SIGTERM, SIGINT and SIGQUIT, the last for
/// the `-u` socket handover), so nothing is taken from it.
pub struct OnSighup(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for OnSighup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(cause = %e, "cannot listen for SIGHUP; reload through the admin API");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let reloader = self.0.clone();
                    let actor = Actor::internal("sighup");
                    // A rejected file is logged at ERROR by `reload`.
                    let _ = tokio::task::spawn_blocking(move || reloader.reload(&actor)).await;
                }
            }
        }
    }
}
