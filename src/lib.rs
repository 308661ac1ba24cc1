//! switchyard: an edge reverse proxy on Pingora whose every service has a
//! blue and a green upstream pool, switched atomically through an admin API.
//!
//! This file wires the pieces into one Pingora server; each concern lives in
//! its own module.

pub mod access_log;
pub mod admin;
pub mod canary;
pub mod check;
pub mod cleanup;
pub mod cluster;
pub mod completion;
pub mod config;
pub mod connections;
pub mod demo;
pub mod deploy;
pub mod forwarded;
pub mod framing;
pub mod health;
pub mod host;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pools;
pub mod proxy;
pub mod record;
pub mod reload;
pub mod respond;
pub mod rollback;
pub mod route;
pub mod settings;
pub mod shutdown;
pub mod slow_clients;
pub mod split;
pub mod store;
pub mod switchboard;
pub mod tls;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::SystemTime;

use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;

use crate::access_log::AccessLog;
use crate::admin::api::AdminApi;
use crate::admin::auth::{self, TokenError};
use crate::config::Config;
use crate::connections::Connections;
use crate::health::HealthChecker;
use crate::limits::Sweeper;
use crate::listener::Listener;
use crate::record::Observer;
use crate::reload::{OnSighup, Reloader};
use crate::respond::Pages;
use crate::slow_clients::HeaderTimeout;
use crate::store::{FileStore, StoreError};
use crate::switchboard::Switchboard;
use crate::tls::acme::AcmeClient;
use crate::tls::challenge::Challenges;
use crate::tls::handshake::{self, TlsAcceptor};
use crate::tls::http::{Https, Plain, Side};
use crate::tls::renewal::{self, Renewer, SystemClock};
use crate::tls::store::CertStore;

/// Runtime shutdown allowance after the grace period, for Pingora's own
/// teardown (1 s). Our drain watcher normally exits long before.
const RUNTIME_SHUTDOWN_TIMEOUT_SECS: u64 = 1;

/// Client connections the admin API holds at once (64): deploy tooling
/// makes a few; more is a misbehaving script or a flood.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Client connections the metrics listener holds at once (64): a scraper
/// or two and a health prober.
const METRICS_MAX_CONNECTIONS: usize = 64;
/// Longest a request header to the metrics listener may take (2 s, or
/// `server.header_timeout` if shorter): a scraper sends its request at
/// once, and a shorter deadline frees the listener's few connections
/// sooner from clients that hold them open without a request.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Process-level switches from the command line.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take over the listening sockets of a running switchyard (Pingora's `-u`).
    pub upgrade: bool,
    /// Detach into the background (Pingora's `-d`).
    pub daemon: bool,
}

/// Why switchyard could not start. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("static certificate {name}: {source}")]
    Certificate {
        name: String,
        source: tls::certs::CertError,
    },
    #[error(transparent)]
    TlsConfig(#[from] tls::handshake::ConfigError),
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    #[error(transparent)]
    Webhook(#[from] notify::UrlError),
    #[error(transparent)]
    ClusterPassword(#[from] cluster::PasswordError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cannot read maintenance page {}: {source}", path.display())]
    Page {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A configured server, ready to `run`. `demo` adds its sample upstreams first.
pub struct Switchyard {
    pub server: Server,
}

impl Switchyard {
    /// Builds the proxy, the admin API (when a token is configured) and the
    /// drain watcher from a validated config. Binds nothing yet.
    pub fn build(config: &Config, opts: &RunOptions) -> Result<Switchyard, StartError> {
        let token = auth::load_tokens(&config.admin, std::env::var(auth::TOKEN_ENV).ok())?;
        let store = FileStore::open(&config.server.state_dir)?;
        let pages = load_pages(&config.server)?;
        let link = cluster_link(config)?;
        let settings = proxy::Settings::new(&config.server, pages).with_cluster(link.clone());
        let board = Arc::new(Switchboard::with_settings(
            config,
            settings,
            Box::new(store),
        )?);
        // With `[cluster]`: on the cluster's state before serving.
        let sync = link.as_ref().map(|link| {
            let sync = cluster::sync::StateSync::new(link.clone(), board.clone());
            sync_at_start(&sync, link);
            sync
        });
        // Webhook URLs are read now, so a bad one stops start-up.
        let (notifier, notify_sender) = notify::Notifier::new(notify::load_urls(&config.notify)?);
        board.set_notifier(notifier.clone());
        // Everything that can fail is read before Pingora touches any socket.
        let certs = Arc::new(CertStore::new(&config.tls, config.acme.as_ref()));
        let challenges = Arc::new(Challenges::new());
        load_static_certificates(&config.tls, &certs)?;
        let access_log = AccessLog::new(config)?.map(Arc::new);
        if opts.daemon && access_log.is_some() && config.access_log.path.is_none() {
            tracing::warn!("--daemon sends standard output, and so the access log, to /dev/null; set access_log.path");
        }

        let mut server = Server::new_with_opt_and_conf(
            Opt {
                upgrade: opts.upgrade,
                daemon: opts.daemon,
                ..Opt::default()
            },
            server_conf(config, opts),
        );
        server.bootstrap();

        let requests = Arc::new(AtomicUsize::new(0));
        // Off unless `[listen] metrics` is set: then every request is counted.
        let metrics = config
            .listen
            .metrics
            .map(|_| Arc::new(metrics::Metrics::new(config)));
        // Per-color windows for the rollback watcher and `ctl deploy`.
        let canary = Arc::new(canary::Stats::new(
            &board,
            Arc::new(canary::MonotonicClock::default()),
        ));
        let watcher = Arc::new(rollback::Watcher::new(board.clone(), canary.clone()));
        // Told about every finished request, and about the answers
        // Pingora's parser gives by itself (`slow_clients.rs`).
        let observers: Vec<Arc<dyn Observer>> = access_log
            .iter()
            .map(|log| log.clone() as Arc<dyn Observer>)
            .chain(metrics.iter().map(|m| m.clone() as Arc<dyn Observer>))
            .chain([canary.clone() as Arc<dyn Observer>])
            .collect();
        // Routes, limits and settings come with the snapshot (`pools.rs`).
        let new_proxy = |side| {
            let proxy = proxy::Proxy::new(board.clone(), requests.clone()).with_side(side);
            observers
                .iter()
                .fold(proxy, |proxy, o| proxy.with_observer(o.clone()))
        };
        let tls_configured = config.listen.https.is_some() || config.acme.is_some();
        let plain_side = match tls_configured {
            true => Side::Plain(Plain::new(
                challenges.clone(),
                certs.clone(),
                config
                    .listen
                    .https
                    .filter(|_| config.tls.redirect_http)
                    .map(|a| a.port()),
            )),
            false => Side::PlainOnly,
        };
        let proxy = new_proxy(plain_side);
        let connections = Arc::new(connection_table(&config.server));
        // The keep-alive idle limit as reloaded (`server.keepalive_timeout`).
        let keepalive: slow_clients::KeepAlive = {
            let board = board.clone();
            Arc::new(move || board.load().settings.keepalive_timeout)
        };
        let app = HeaderTimeout::new(
            http_proxy(&server.configuration, proxy),
            config.server.header_timeout,
            connections.clone(),
        )
        .with_keepalive(keepalive.clone())
        .with_observers(observers.clone());
        server.add_service(Listener::new("proxy", app, config.listen.http).upgrading(opts.upgrade));
        let mut tls_handshakes = None;
        if let Some(https) = config.listen.https {
            // A plain TCP listener: the handshake is ours, inside the
            // header deadline (`tls/handshake.rs`).
            let handshakes = Arc::new(TlsAcceptor::new(
                handshake::server_config(&certs)?,
                config.tls.handshake_timeout,
            ));
            tls_handshakes = Some(handshakes.clone());
            let mut app = http_proxy(
                &server.configuration,
                new_proxy(Side::Https(Https::new(config.tls.hsts.as_deref()))),
            );
            // An HTTP/2 connection with no stream open closes after the
            // keep-alive timeout, as an idle HTTP/1.1 one does.
            let mut options = HttpServerOptions::default();
            options.h2_idle_timeout = Some(config.server.keepalive_timeout);
            app.server_options = Some(options);
            let app = HeaderTimeout::new(app, config.server.header_timeout, connections.clone())
                .with_keepalive(keepalive)
                .with_tls(handshakes)
                .with_observers(observers.clone());
            server.add_service(Listener::new("proxy-https", app, https).upgrading(opts.upgrade));
        }

        if let Some(sync) = sync {
            server.add_service(background_service("cluster", sync));
        }

        // Always: a reload may add the first health check.
        server.add_service(background_service(
            "health",
            HealthChecker::new(board.clone()),
        ));

        // Always: a reload may add the first `[services.NAME.rollback]`.
        server.add_service(background_service(
            "rollback watcher",
            rollback::WatcherService(watcher.clone()),
        ));

        if !config.notify.webhooks.is_empty() {
            server.add_service(background_service("notify", notify_sender));
        }

        // Always: a reload may add the first limit. Each round sweeps the
        // limits in force then.
        let limits_board = board.clone();
        server.add_service(background_service(
            "limit sweep",
            Sweeper(Box::new(move || {
                let snap = limits_board.load();
                (snap.rate_limits.clone(), snap.budgets.clone())
            })),
        ));

        // `POST /reload`, `ctl reload` and SIGHUP (`reload.rs`).
        let reloader = Arc::new(
            Reloader::new(config, board.clone())
                .with_observers(observers.clone())
                .with_metrics(metrics.clone()),
        );
        if let Err(e) = reload::catch_sighup() {
            tracing::warn!(cause = %e, "cannot catch SIGHUP; it would end the process: reload through the admin API");
        } else {
            server.add_service(background_service("reload", OnSighup(reloader.clone())));
        }

        if let Some(acme) = &config.acme {
            // Certificates on disk (or self-signed stand-ins) are served
            // before any listener starts; the CA is only asked from the
            // background service, so start-up never waits for it.
            let certs_dir = &config.tls.certs_dir;
            let managed = renewal::load_at_start(acme, certs_dir, &certs, SystemTime::now());
            let client = AcmeClient::new(acme, certs_dir, challenges.clone());
            server.add_service(background_service(
                "acme",
                Renewer::new(
                    client,
                    certs.clone(),
                    SystemClock,
                    acme.retry_backoff,
                    managed,
                )
                .with_notifier(notifier.clone()),
            ));
        }

        match token {
            Some(token) => {
                if !config.listen.admin.ip().is_loopback() {
                    tracing::warn!(listen = %config.listen.admin, "admin API listens beyond loopback; keep the allowlist tight");
                }
                let served = config.listen.https.is_some().then(|| certs.clone());
                let api = AdminApi::new(board.clone(), served, token, config.admin.allow.clone())
                    .with_reloader(reloader.clone())
                    .with_deploys(Arc::new(deploy::Deployer::new(
                        board.clone(),
                        watcher.clone(),
                    )));
                // The same wrapper as the proxy's: a header deadline against
                // slow clients, a small connection cap, and `Server:
                // switchyard` on the answers Pingora's parser writes itself.
                let app = HeaderTimeout::new(
                    HttpServer::new_app(api),
                    config.server.header_timeout,
                    Arc::new(Connections::new(ADMIN_MAX_CONNECTIONS, None)),
                );
                server.add_service(
                    Listener::new("admin", app, config.listen.admin)
                        .with_threads(1)
                        .upgrading(opts.upgrade),
                );
                tracing::info!(listen = %config.listen.admin, "admin API enabled");
            }
            None => tracing::warn!(
                "admin API disabled: no token configured (set {}, or create admin.token_file or [[admin.tokens]] files, mode 0600)",
                auth::TOKEN_ENV
            ),
        }

        if let (Some(listen), Some(metrics)) = (config.listen.metrics, metrics) {
            if !listen.ip().is_loopback() {
                tracing::warn!(listen = %listen, "metrics listener (no authentication) listens beyond loopback; keep it reachable by the scraper only");
            }
            let sources = metrics::state::Sources {
                board: board.clone(),
                certs: tls_configured.then(|| certs.clone()),
                connections: connections.clone(),
                handshakes: tls_handshakes,
                requests: requests.clone(),
                listeners: [Some(config.listen.http), config.listen.https]
                    .into_iter()
                    .flatten()
                    .collect(),
                canary: Some(canary.clone()),
                notifier: (!config.notify.webhooks.is_empty()).then(|| notifier.clone()),
                access_log: access_log.clone(),
            };
            let state = Arc::new(metrics::state::State::new(metrics, sources));
            // The admin API's wrapper: header deadline and a small cap.
            let app = HeaderTimeout::new(
                HttpServer::new_app(metrics::listener::MetricsApi::new(state)),
                config.server.header_timeout.min(METRICS_HEADER_TIMEOUT),
                Arc::new(Connections::new(METRICS_MAX_CONNECTIONS, None)),
            );
            server.add_service(
                Listener::new("metrics", app, listen)
                    .with_threads(1)
                    .upgrading(opts.upgrade),
            );
            tracing::info!(listen = %listen, "metrics listener enabled");
        }

        server.add_service(background_service(
            "drain",
            shutdown::Drain::new(requests, config.server.grace_period),
        ));
        tracing::info!(
            config = %config.path.display(),
            http = %config.listen.http,
            https = ?config.listen.https,
            services = config.services.len(),
            routes = config.routes.len(),
            "switchyard starting"
        );
        Ok(Switchyard { server })
    }

    /// Serves until a shutdown signal; see [`shutdown`] for what each does.
    pub fn run(self) {
        self.server.run(RunArgs::default());
    }
}

/// This instance's link to `[cluster]`, if any: reads the Redis password
/// (a bad file stops the start) and makes the handle; Redis itself is not
/// asked yet, so a Redis that is down does not stop the start.
fn cluster_link(config: &Config) -> Result<Option<Arc<cluster::Link>>, StartError> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    let password = cluster::load_password(c, |v| std::env::var(v).ok())?;
    let link = cluster::Link::new(c, password.as_ref())?;
    tracing::info!(redis = %c.redis, name = %c.name, instance = %c.instance, "cluster on");
    Ok(Some(Arc::new(link)))
}

/// Brings the switchboard onto the cluster's state before any listener
/// starts (seeding an empty Redis from the saved state), within a few
/// `[cluster] timeout`s. A Redis that does not answer does not stop the
/// start: the instance serves its saved state, and the sync service takes
/// over when Redis answers.
fn sync_at_start(sync: &cluster::sync::StateSync, link: &cluster::Link) {
    // A runtime of its own, gone before Pingora forks (`--daemon`) and
    // starts its runtimes; the connection made on it goes with it.
    let synced = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                sync.converge().await?;
                sync.heartbeat().await
            })
            .map_err(|e| {
                link.mark_down(&e);
                e.to_string()
            })
        });
    link.redis.reset();
    match synced {
        Ok(()) => tracing::info!(instances = link.live_instances(), "on the cluster's state"),
        Err(e) => {
            tracing::error!(cause = %e, "cannot reach redis at start: serving the saved state; switches are refused until redis answers")
        }
    }
}

/// Raises the open-file limit to its hard limit and sizes the connection
/// caps: `max_connections` from the limit unless configured.
fn connection_table(server: &config::Server) -> Connections {
    let open_files = match connections::raise_open_file_limit() {
        Ok((before, after)) if before < after => {
            tracing::info!(
                before,
                after,
                "open-file limit (RLIMIT_NOFILE) raised to its hard limit"
            );
            after
        }
        Ok((_, limit)) => {
            tracing::info!(
                limit,
                "open-file limit (RLIMIT_NOFILE) is at its hard limit"
            );
            limit
        }
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read or raise the open-file limit; assuming 1024");
            1024
        }
    };
    let safe = connections::default_max_connections(open_files, server.upstream_keepalive_pool);
    let max = server.max_connections.unwrap_or(safe);
    if max > safe {
        tracing::warn!(
            max_connections = max,
            open_files,
            "max_connections leaves too few open files for upstream connections; \
             accept() may fail with EMFILE (raise the hard limit: ulimit -Hn, LimitNOFILE=)"
        );
    }
    tracing::info!(
        max_connections = max,
        max_connections_per_client = server.max_connections_per_client,
        "client connection caps"
    );
    Connections::new(max, server.max_connections_per_client)
}

/// Reads every `[[tls.certificates]]` and serves it. A missing, broken,
/// mismatched or expired one stops the start (nothing is bound yet).
fn load_static_certificates(tls: &config::Tls, certs: &CertStore) -> Result<(), StartError> {
    let now = std::time::SystemTime::now();
    for c in &tls.certificates {
        let cert = tls::certs::load_static(&c.cert, &c.key, now).map_err(|source| {
            StartError::Certificate {
                name: c.name.clone(),
                source,
            }
        })?;
        tracing::info!(
            name = %c.name,
            names = ?cert.info.names,
            not_after = %humantime::format_rfc3339_seconds(cert.info.not_after),
            "static certificate loaded"
        );
        certs.install(&c.name, cert, false);
    }
    Ok(())
}

/// The 503 page and `Retry-After` from `[server]`.
pub fn load_pages(server: &config::Server) -> Result<Pages, StartError> {
    let page = server.maintenance_page.as_deref();
    Pages::new(page, server.retry_after).map_err(|source| StartError::Page {
        path: page.unwrap_or(std::path::Path::new("")).to_path_buf(),
        source,
    })
}

fn server_conf(config: &Config, opts: &RunOptions) -> ServerConf {
    let state = &config.server.state_dir;
    ServerConf {
        threads: config.server.threads,
        // Off by default: each worker thread runs its own connections
        // (nginx's model), with fewer cross-thread wake-ups (README,
        // "Fixed rate and two worker threads").
        work_stealing: config.server.work_stealing,
        daemon: opts.daemon,
        // A backstop only: the drain watcher exits as soon as nothing is in flight.
        grace_period_seconds: Some(config.server.grace_period.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_TIMEOUT_SECS),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        // A stale kept-alive upstream connection, then one other backend.
        max_retries: proxy::MAX_TRIES,
        pid_file: state.join("switchyard.pid").display().to_string(),
        // A daemon would otherwise move to `/` (breaking relative paths) and
        // lose its log with stderr.
        working_directory: opts.daemon.then(|| std::env::current_dir().ok()).flatten(),
        error_log: opts
            .daemon
            .then(|| state.join("switchyard.log").display().to_string()),
        upgrade_sock: state.join("upgrade.sock").display().to_string(),
        ..ServerConf::default()
    }
}
