//! Colors, pools and the one atomic snapshot every request reads.
//!
//! A request loads the [`Snapshot`] once and keeps it (and the `Arc<Pool>`
//! it picked) to its end, so neither a switch nor a config reload disturbs
//! it: it finishes on the routes, limits, settings and pool it began with,
//! and every request that starts after [`Switchboard::switch`] or
//! [`Switchboard::reload`] returns sees the new world. Writers are
//! serialized, build the next snapshot, persist it and `store` it; nothing
//! on the request path takes a lock.
//!
//! The config-derived parts of a snapshot (routes, settings, limits) each
//! sit behind their own `Arc`: a color change copies the refcounts, not the
//! tables. A reload carries over what survives it (see [`Switchboard::reload`]).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::{Config, HealthCheck};
use crate::health::{Health, HealthStatus};
use crate::limits::concurrency::ConcurrencyCaps;
use crate::limits::rate::RateLimits;
use crate::limits::tokens::TokenBudgets;
use crate::route::Routes;
use crate::settings::Settings;
use crate::store::{Actor, Event, SavedService, SavedState, StateStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown color {0:?}: expected \"blue\" or \"green\"")]
pub struct BadColor(pub String);

impl FromStr for Color {
    type Err = BadColor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            other => Err(BadColor(other.to_string())),
        }
    }
}

/// How one service's new requests split between its colors, in percent
/// (the two add up to 100). A switch is the `0/100` case; anything between
/// is a canary. Serialized as `{"blue": 90, "green": 10}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub blue: u8,
    pub green: u8,
}

/// Why a split was refused.
#[derive(Debug, thiserror::Error)]
#[error("weights must be whole percentages adding up to 100, got blue {blue} + green {green}")]
pub struct BadWeights {
    pub blue: u64,
    pub green: u64,
}

impl Weights {
    /// Buckets a client can fall in (100): one per percent.
    pub const BUCKETS: u8 = 100;

    /// Everything to `color`.
    pub fn all(color: Color) -> Weights {
        match color {
            Color::Blue => Weights {
                blue: 100,
                green: 0,
            },
            Color::Green => Weights {
                blue: 0,
                green: 100,
            },
        }
    }

    /// A split of whole percentages adding up to 100.
    pub fn new(blue: u64, green: u64) -> Result<Weights, BadWeights> {
        match (u8::try_from(blue), u8::try_from(green)) {
            (Ok(b), Ok(g)) if u16::from(b) + u16::from(g) == 100 => {
                Ok(Weights { blue: b, green: g })
            }
            _ => Err(BadWeights { blue, green }),
        }
    }

    /// The share of `color`, in percent.
    pub fn of(self, color: Color) -> u8 {
        match color {
            Color::Blue => self.blue,
            Color::Green => self.green,
        }
    }

    /// The color taking all traffic, if one does.
    pub fn sole(self) -> Option<Color> {
        Color::ALL.into_iter().find(|&c| self.of(c) == 100)
    }

    /// The color of a client in `bucket` (0..100): the lowest `green`
    /// buckets go green. So as green's share grows, a client already on
    /// green stays there, and one on blue moves at most once.
    pub fn color_for(self, bucket: u8) -> Color {
        match bucket % Self::BUCKETS < self.green {
            true => Color::Green,
            false => Color::Blue,
        }
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blue {} / green {}", self.blue, self.green)
    }
}

/// One upstream server.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Shared with the same address's entry in a reloaded pool, so a
    /// reload does not send a surviving backend back through warm-up.
    pub health: Arc<Health>,
}

/// The backends of one color of one service. Pools are built at start-up
/// and shared by every snapshot, so round-robin position and in-flight counts
/// carry across switches, and across reloads that leave the pool unchanged.
#[derive(Debug)]
pub struct Pool {
    pub color: Color,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    next: AtomicUsize,
    /// Shared with the pool a reload replaced, so requests still running
    /// on the old backends count until they end (drain waits for them).
    load: Arc<PoolLoad>,
}

/// What runs on one service's color, whichever pool of it a request took.
#[derive(Debug, Default)]
struct PoolLoad {
    in_flight: AtomicUsize,
    upgraded: AtomicUsize,
}

impl Pool {
    fn new(color: Color, addrs: &[SocketAddr], connect_timeout: Duration) -> Pool {
        Pool {
            color,
            backends: addrs
                .iter()
                .map(|&addr| Backend {
                    addr,
                    health: Arc::default(),
                })
                .collect(),
            connect_timeout,
            next: AtomicUsize::new(0),
            load: Arc::default(),
        }
    }

    /// The next routable backend in round-robin order, skipping `avoid` (a
    /// backend that just failed); `None` when no backend may take the request.
    pub fn select(&self, avoid: Option<SocketAddr>) -> Option<&Backend> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.backends[(start + i) % n])
            .find(|b| b.health.routable() && Some(b.addr) != avoid)
    }

    /// Requests currently being served by this pool, upgraded connections included.
    pub fn in_flight(&self) -> usize {
        self.load.in_flight.load(Ordering::Relaxed)
    }

    /// Open upgraded (WebSocket) connections.
    pub fn upgraded(&self) -> usize {
        self.load.upgraded.load(Ordering::Relaxed)
    }

    /// The pool of a reloaded config: `old` itself when its backends (in
    /// order) and connect timeout are unchanged; else a new pool sharing
    /// `old`'s in-flight counts, in which each backend `old` also has keeps
    /// its health (`keep_health`: the
    /// service is still health-checked; without a check every backend
    /// starts routable again).
    fn carry(
        color: Color,
        addrs: &[SocketAddr],
        connect_timeout: Duration,
        old: Option<&Arc<Pool>>,
        keep_health: bool,
    ) -> Arc<Pool> {
        let Some(old) = old else {
            return Arc::new(Pool::new(color, addrs, connect_timeout));
        };
        let same = old.connect_timeout == connect_timeout
            && old
                .backends
                .iter()
                .map(|b| b.addr)
                .eq(addrs.iter().copied());
        // Without a health check every backend must be routable; a pool
        // whose backends all are already needs no rebuilding.
        if same && (keep_health || old.backends.iter().all(|b| b.health.routable())) {
            return old.clone();
        }
        let mut pool = Pool::new(color, addrs, connect_timeout);
        pool.load = old.load.clone();
        if keep_health {
            for b in &mut pool.backends {
                if let Some(was) = old.backends.iter().find(|o| o.addr == b.addr) {
                    b.health = was.health.clone();
                }
            }
        }
        Arc::new(pool)
    }

    pub fn healthy(&self) -> usize {
        self.backends
            .iter()
            .filter(|b| b.health.status() == HealthStatus::Healthy)
            .count()
    }
}

/// Counts a request against its pool for as long as it lives.
#[derive(Debug)]
pub struct InFlight {
    pool: Arc<Pool>,
    upgraded: bool,
}

impl InFlight {
    pub fn new(pool: Arc<Pool>) -> InFlight {
        pool.load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            pool,
            upgraded: false,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The request became a tunnel (101 Switching Protocols).
    pub fn mark_upgraded(&mut self) {
        if !self.upgraded {
            self.upgraded = true;
            self.pool.load.upgraded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.upgraded {
            self.pool.load.upgraded.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a request needs to know about one service.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub name: Arc<str>,
    /// The color that took all traffic last: the one a split (canary)
    /// started from, and where a rollback of that split returns.
    pub active: Color,
    /// The color before the last switch: where `rollback` goes.
    pub previous: Option<Color>,
    /// How new requests split between the colors; all on `active` unless a
    /// canary is under way.
    pub weights: Weights,
    /// Answer 503 with the maintenance page instead of proxying.
    pub maintenance: bool,
    /// Whether switches wait for health: only services with a health check
    /// have anything to gate on.
    pub gated: bool,
    /// Healthy backends a color needs before a switch to it; `None`: all of them.
    pub min_healthy: Option<usize>,
    /// The service's active health check, which the checker follows.
    pub health: Option<HealthCheck>,
    /// What keeps a client on one color during a split.
    pub sticky: Option<crate::config::Sticky>,
    /// The automatic rollback gates (`[services.NAME.rollback]`); `None`:
    /// not watched.
    pub rollback: Option<crate::config::Rollback>,
    /// Changes of the split since start: the rollback watcher tells a new
    /// change from one it has seen by this.
    pub moves: u64,
    /// What the last change was; a rollback is never judged (judging it
    /// could roll forward again).
    pub last_move: Option<SwitchKind>,
    pools: [Arc<Pool>; 2],
    /// Places requests without a sticky bucket during a split; shared by
    /// every snapshot of the service.
    spread: Arc<AtomicU64>,
    /// Color changes since start, by [`SwitchCause`] (in `ALL` order);
    /// shared by every snapshot and kept across reloads.
    switches: Arc<[AtomicU64; SwitchCause::ALL.len()]>,
}

impl ServiceState {
    /// Healthy backends `color` needs before a switch to it; `None` when
    /// switches are not gated.
    pub fn required_healthy(&self, color: Color) -> Option<usize> {
        self.gated
            .then(|| self.min_healthy.unwrap_or(self.pool(color).backends.len()))
    }

    /// Why `to` may not take traffic yet, if it may not.
    fn gate(&self, to: Color) -> Option<String> {
        let required = self.required_healthy(to)?;
        let pool = self.pool(to);
        let healthy = pool.healthy();
        if healthy >= required {
            return None;
        }
        let detail: Vec<String> = pool
            .backends
            .iter()
            .filter(|b| b.health.status() != HealthStatus::Healthy)
            .map(|b| match b.health.last_error() {
                Some(e) => format!("{} {:?}: {e}", b.addr, b.health.status()),
                None => format!("{} {:?}: not checked enough yet", b.addr, b.health.status()),
            })
            .collect();
        Some(format!(
            "{to} has {healthy} healthy backends of {required} required ({}); wait for health checks, or force it (ctl --force; \"force\": true in the API)",
            detail.join("; ").to_lowercase()
        ))
    }

    pub fn pool(&self, color: Color) -> &Arc<Pool> {
        &self.pools[color.index()]
    }

    /// Refuses `to` when a color it gives traffic to, that had none, is
    /// not healthy enough (see [`ServiceState::required_healthy`]).
    fn gate_gaining(&self, to: Weights) -> Result<(), SwitchError> {
        let gaining = Color::ALL
            .into_iter()
            .filter(|&c| to.of(c) > 0 && self.weights.of(c) == 0);
        for color in gaining {
            if let Some(reason) = self.gate(color) {
                return Err(SwitchError::NotHealthy {
                    service: self.name.to_string(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// The pool for one new request: the active one unless traffic is
    /// split, then the color of `bucket` (a sticky client's, 0..100) or,
    /// without one, the next of an even spread that gives each color its
    /// exact share of every 100 requests.
    pub fn pick(&self, bucket: Option<u8>) -> &Arc<Pool> {
        if self.weights.sole().is_some() {
            return self.active_pool();
        }
        let bucket = bucket.unwrap_or_else(|| {
            // 37 is coprime to 100: consecutive requests visit all 100
            // buckets in a scattered order, not 10 greens in a row.
            let n = self.spread.fetch_add(1, Ordering::Relaxed);
            (n.wrapping_mul(37) % u64::from(Weights::BUCKETS)) as u8
        });
        self.pool(self.weights.color_for(bucket))
    }

    /// The color a split sends new traffic to besides `active`, if any.
    pub fn canary(&self) -> Option<Color> {
        let other = self.active.other();
        (self.weights.of(other) > 0).then_some(other)
    }

    /// Where a rollback goes: all traffic back on `active` when a split is
    /// under way, else all on the previous color.
    pub fn rollback_target(&self) -> Option<Color> {
        match self.canary() {
            Some(_) => Some(self.active),
            None => self.previous,
        }
    }

    pub fn active_pool(&self) -> &Arc<Pool> {
        self.pool(self.active)
    }

    /// Color changes since start (or since the service was added by a
    /// reload), by cause, in [`SwitchCause::ALL`] order.
    pub fn switches(&self) -> [u64; SwitchCause::ALL.len()] {
        self.switches.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    /// The state of `config`'s service: `old`'s saved part (active and
    /// previous color, maintenance, and whatever else `old` carries) with
    /// the config-derived parts replaced; a new service starts on `saved`
    /// or, without it, on its configured active color.
    fn carry(
        s: &crate::config::Service,
        old: Option<&ServiceState>,
        saved: Option<&SavedService>,
    ) -> ServiceState {
        let checked = s.health.is_some();
        let pools = Color::ALL.map(|c| {
            let old = old.map(|o| o.pool(c));
            Pool::carry(c, s.pool(c), s.connect_timeout, old, checked)
        });
        match old {
            // Active and previous color, weights, maintenance, the
            // split's spread, the switch counts and the rollback watcher's
            // view of the last move carry over as they are.
            Some(old) => ServiceState {
                gated: checked,
                min_healthy: s.min_healthy,
                health: s.health.clone(),
                sticky: s.sticky,
                rollback: s.rollback,
                pools,
                ..old.clone()
            },
            None => {
                let active = saved.map_or(s.active, |v| v.active);
                ServiceState {
                    name: Arc::from(s.name.as_str()),
                    active,
                    previous: saved.and_then(|v| v.previous),
                    weights: saved
                        .and_then(|v| v.weights)
                        .unwrap_or(Weights::all(active)),
                    maintenance: saved.is_some_and(|v| v.maintenance),
                    gated: checked,
                    min_healthy: s.min_healthy,
                    health: s.health.clone(),
                    sticky: s.sticky,
                    rollback: s.rollback,
                    moves: 0,
                    last_move: None,
                    pools,
                    spread: Arc::default(),
                    switches: Arc::default(),
                }
            }
        }
    }
}

/// Everything a request reads about routes, limits, settings, colors and
/// pools, swapped as one value.
pub struct Snapshot {
    /// Indexed like [`Config::services`] of the config the snapshot was
    /// built from (the indexes in `routes` point here).
    pub services: Vec<ServiceState>,
    pub routes: Arc<Routes>,
    pub settings: Arc<Settings>,
    /// Indexed like `Config::rate_limits` (routes hold the indexes).
    pub rate_limits: Arc<RateLimits>,
    /// Indexed like `Config::concurrency`.
    pub concurrency: Arc<ConcurrencyCaps>,
    /// Indexed like `Config::token_budgets`; token counts per service.
    pub budgets: Arc<TokenBudgets>,
}

/// What a reload changed, for its answer and its log line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reloaded {
    /// Service names, in config order.
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    /// Route labels (`host/path`, `*/path`: [`crate::config::Route::label`]).
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    /// Limits (`rate_limit:NAME`, `concurrency:NAME`, `token_budget:NAME`)
    /// that start afresh: new, or with changed settings.
    pub limits_reset: Vec<String>,
}

impl Snapshot {
    /// The next snapshot after a color or maintenance change: the
    /// config-derived parts are shared, not copied.
    fn with_services(&self, services: Vec<ServiceState>) -> Snapshot {
        Snapshot {
            services,
            routes: self.routes.clone(),
            settings: self.settings.clone(),
            rate_limits: self.rate_limits.clone(),
            concurrency: self.concurrency.clone(),
            budgets: self.budgets.clone(),
        }
    }

    /// A snapshot of `config`, carrying over from `old` what survives (see
    /// [`Switchboard::reload`]); `saved`: the durable state, for services
    /// `old` does not have.
    fn build(
        config: &Config,
        settings: Settings,
        old: Option<&Snapshot>,
        saved: &SavedState,
    ) -> Snapshot {
        let services = config
            .services
            .iter()
            .map(|s| {
                let was = old.and_then(|o| o.service(&s.name)).map(|(_, st)| st);
                ServiceState::carry(s, was, saved.services.get(&s.name))
            })
            .collect();
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        Snapshot {
            services,
            routes: Arc::new(Routes::new(&config.routes)),
            settings: Arc::new(settings),
            rate_limits: Arc::new(RateLimits::carry(
                &config.rate_limits,
                old.map(|o| &*o.rate_limits),
            )),
            concurrency: Arc::new(ConcurrencyCaps::carry(
                &config.concurrency,
                old.map(|o| &*o.concurrency),
            )),
            budgets: Arc::new(TokenBudgets::carry(
                &config.token_budgets,
                &names,
                old.map(|o| &*o.budgets),
            )),
        }
    }

    /// What changed from `old` to this snapshot.
    fn changes_from(&self, old: &Snapshot) -> Reloaded {
        let names = |s: &Snapshot| -> Vec<String> {
            s.services.iter().map(|s| s.name.to_string()).collect()
        };
        let (now, was) = (names(self), names(old));
        let labels = |s: &Snapshot| s.routes.labels().to_vec();
        let (routes, routes_was) = (labels(self), labels(old));
        let minus = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|x| !b.contains(x)).cloned().collect()
        };
        let mut limits_reset = Vec::new();
        for l in self.rate_limits.iter() {
            let kept = old.rate_limits.iter().any(|o| std::ptr::eq(o, l));
            if !kept {
                limits_reset.push(format!("rate_limit:{}", l.name()));
            }
        }
        for c in self.concurrency.iter() {
            if !old.concurrency.iter().any(|o| std::ptr::eq(o, c)) {
                limits_reset.push(format!("concurrency:{}", c.name()));
            }
        }
        for b in self.budgets.iter() {
            if !old.budgets.iter().any(|o| Arc::ptr_eq(o, b)) {
                limits_reset.push(format!("token_budget:{}", b.name()));
            }
        }
        Reloaded {
            services_added: minus(&now, &was),
            services_removed: minus(&was, &now),
            routes_added: minus(&routes, &routes_was),
            routes_removed: minus(&routes_was, &routes),
            limits_reset,
        }
    }

    pub fn service(&self, name: &str) -> Option<(usize, &ServiceState)> {
        self.services
            .iter()
            .enumerate()
            .find(|(_, s)| &*s.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("service {0:?} has no previous color to roll back to")]
    NoPrevious(String),
    #[error("refusing to switch {service:?}: {reason}")]
    NotHealthy { service: String, reason: String },
    /// The service moved since the caller's last own change (see
    /// [`Switchboard::restore`]).
    #[error("{0} was changed by someone else meanwhile (see the history); left as it is")]
    Moved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a switch happened, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    Switch,
    Rollback,
}

/// Owns the live snapshot and every change to it.
pub struct Switchboard {
    current: ArcSwap<Snapshot>,
    store: Box<dyn StateStore>,
    /// Serializes writers: read-modify-persist-store must not interleave.
    write: Mutex<()>,
    /// Counts config reloads; the health checker watches it to follow
    /// services and backends a reload adds or removes.
    reloads: tokio::sync::watch::Sender<u64>,
    /// Told about every color change and maintenance toggle (webhooks);
    /// set once at start, none in tests that do not ask.
    notifier: std::sync::OnceLock<Arc<crate::notify::Notifier>>,
}

/// Why a color changed, as `switchyard_switches_total{cause}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchCause {
    Switch,
    /// A switch with `force` set: the health gate was not asked.
    Forced,
    Rollback,
}

impl SwitchCause {
    pub const ALL: [SwitchCause; 3] = [
        SwitchCause::Switch,
        SwitchCause::Forced,
        SwitchCause::Rollback,
    ];

    /// The `cause` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchCause::Switch => "switch",
            SwitchCause::Forced => "forced",
            SwitchCause::Rollback => "rollback",
        }
    }
}

impl Switchboard {
    /// [`Switchboard::with_settings`] with the built-in maintenance page
    /// instead of `server.maintenance_page` (tests and benches; `run`
    /// reads the configured page, which can fail, first).
    pub fn new(config: &Config, store: Box<dyn StateStore>) -> Result<Switchboard, StoreError> {
        let pages = crate::respond::Pages::builtin(config.server.retry_after);
        Switchboard::with_settings(config, Settings::new(&config.server, pages), store)
    }

    /// Builds the first snapshot from the config and the saved state (saved
    /// colors win; services the state does not know start on `active`).
    pub fn with_settings(
        config: &Config,
        settings: Settings,
        store: Box<dyn StateStore>,
    ) -> Result<Switchboard, StoreError> {
        let saved = store.load()?.unwrap_or_default();
        for name in saved.services.keys() {
            if config.service_index(name).is_none() {
                tracing::warn!(
                    service = %name,
                    "saved state names a service that is no longer configured; ignoring it"
                );
            }
        }
        Ok(Switchboard {
            current: ArcSwap::from_pointee(Snapshot::build(config, settings, None, &saved)),
            store,
            write: Mutex::new(()),
            reloads: tokio::sync::watch::Sender::new(0),
            notifier: std::sync::OnceLock::new(),
        })
    }

    /// Puts a reloaded `config` in force for every request that starts
    /// after this returns; requests in flight keep the snapshot they loaded.
    ///
    /// Carried over: each surviving service's saved state (active and
    /// previous color, maintenance, and any field added to it later), the
    /// health of every backend address that stays in the same service and
    /// color (the same `Arc<Pool>`, with its round robin and in-flight
    /// counts, when the pool is unchanged), and every limit whose name and
    /// settings are unchanged. New services start on their saved state, or
    /// on their configured `active`; removed ones drop out.
    pub fn reload(&self, config: &Config, settings: Settings) -> Reloaded {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        // Validated before (switchyard check reads it too); a state file
        // that went bad since only costs the new services their saved colors.
        let saved = self.store.load().ok().flatten().unwrap_or_default();
        let next = Snapshot::build(config, settings, Some(&old), &saved);
        let changes = next.changes_from(&old);
        self.current.store(Arc::new(next));
        self.reloads.send_modify(|n| *n += 1);
        changes
    }

    /// Changes each time a reload is in force (see [`Switchboard::reload`]).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// The snapshot for one request. Cheap: one atomic load and a refcount.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `to` the active color of `service`: the `0/100` case of
    /// [`Switchboard::set_weights`]. Returns once every new request goes to
    /// `to`; switching to the color that already takes everything changes
    /// nothing. Unless `force`, a color without enough healthy backends is
    /// refused. `actor` is recorded in the history with the reason.
    pub fn switch(
        &self,
        service: &str,
        to: Color,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.set_weights(service, Weights::all(to), kind, reason, force, actor)
    }

    /// Splits new requests of `service` by `to`. A color that gets traffic
    /// it did not have must pass the health gate unless `force`; the color
    /// taking 100 % becomes the active one (the other its `previous`).
    /// Requests already running stay where they started. Recorded in the
    /// history with `reason` and `actor`, counted and notified.
    pub fn set_weights(
        &self,
        service: &str,
        to: Weights,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.steer(service, kind, reason, force, actor, |_| Ok(to))
    }

    /// The one path that moves traffic: under the write lock, `target`
    /// picks the weights from the state as it is now (so a rollback's
    /// destination cannot go stale between reading and writing), the
    /// health gate is asked for a color that gains traffic unless `force`,
    /// and the change is persisted, published and recorded.
    fn steer(
        &self,
        service: &str,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
        target: impl FnOnce(&ServiceState) -> Result<Weights, SwitchError>,
    ) -> Result<ServiceState, SwitchError> {
        let before = self.change(service, |state| {
            let to = target(state)?;
            if state.weights == to {
                return Ok(None);
            }
            if !force {
                state.gate_gaining(to)?;
            }
            let before = state.clone();
            if let Some(sole) = to.sole().filter(|&c| c != state.active) {
                state.previous = Some(state.active);
                state.active = sole;
            }
            state.weights = to;
            state.moves += 1;
            state.last_move = Some(kind);
            Ok(Some(before))
        })?;
        let after = self.service(service)?;
        if let Some(before) = before {
            self.record_change(&before, &after, kind, reason, force, actor);
        }
        Ok(after)
    }

    /// Counts, logs, records and notifies one change of a service's split.
    fn record_change(
        &self,
        before: &ServiceState,
        after: &ServiceState,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) {
        let service = &*after.name;
        let (from, to) = (before.active, after.active);
        let rollback = kind == SwitchKind::Rollback;
        // A color change or a rollback moves traffic back and forth; a
        // canary step is not a switch (`switchyard_traffic_weight` shows it).
        if from != to || rollback {
            let cause = match (kind, force) {
                (SwitchKind::Rollback, _) => SwitchCause::Rollback,
                (SwitchKind::Switch, true) => SwitchCause::Forced,
                (SwitchKind::Switch, false) => SwitchCause::Switch,
            };
            if let Some((_, state)) = self.load().service(service) {
                state.switches[cause as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        let split = after.canary().map(|_| after.weights);
        let reason = reason.unwrap_or_else(|| {
            match (kind, split) {
                (SwitchKind::Rollback, _) => "rollback",
                (SwitchKind::Switch, Some(_)) => "weights",
                (SwitchKind::Switch, None) => "switch",
            }
            .to_string()
        });
        tracing::info!(service, %from, %to, weights = %after.weights, force, reason = %reason, %actor, "traffic moved");
        let notice = match (from != to || rollback, split) {
            (true, _) | (false, None) => {
                crate::notify::Notice::switched(service, from, to, rollback, &reason)
            }
            (false, Some(w)) => crate::notify::Notice::weights(service, before.weights, w, &reason),
        };
        self.append_history(Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            service: service.to_string(),
            from,
            to,
            weights: split,
            maintenance: None,
            reason,
            actor: actor.clone(),
        });
        self.notify(notice.by(actor));
    }

    /// Sends all traffic of `service` back where it came from: to the
    /// active color when a split is under way, else to the previous color.
    pub fn rollback(
        &self,
        service: &str,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.rollback_if(service, None, reason, force, actor)
    }

    /// [`Switchboard::rollback`], only if the service has not moved since
    /// the state its caller judged (`moves`, when given; else
    /// [`SwitchError::Moved`]): how the rollback watcher and `ctl deploy`
    /// roll back, so a command that lands after their verdict is never
    /// rolled back on figures about a state that is gone.
    pub fn rollback_if(
        &self,
        service: &str,
        moves: Option<u64>,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.steer(
            service,
            SwitchKind::Rollback,
            reason,
            force,
            actor,
            |state| {
                if moves.is_some_and(|m| m != state.moves) {
                    return Err(SwitchError::Moved(service.to_string()));
                }
                state
                    .rollback_target()
                    .map(Weights::all)
                    .ok_or_else(|| SwitchError::NoPrevious(service.to_string()))
            },
        )
    }

    /// Puts `service` back exactly as `to` was (active, previous, weights):
    /// how an aborted deploy restores the state from before it. Recorded
    /// as a rollback with `reason` and `actor`; the health gate is asked
    /// for a color that regains traffic unless `force`. Only while the
    /// service's `moves` is still `if_moves` (the caller's last own change):
    /// a change someone made since is never undone ([`SwitchError::Moved`]).
    pub fn restore(
        &self,
        service: &str,
        to: &ServiceState,
        if_moves: u64,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        let before = self.change(service, |state| {
            if state.moves != if_moves {
                return Err(SwitchError::Moved(service.to_string()));
            }
            if (state.active, state.previous, state.weights) == (to.active, to.previous, to.weights)
            {
                return Ok(None);
            }
            if !force {
                state.gate_gaining(to.weights)?;
            }
            let before = state.clone();
            state.active = to.active;
            state.previous = to.previous;
            state.weights = to.weights;
            state.moves += 1;
            state.last_move = Some(SwitchKind::Rollback);
            Ok(Some(before))
        })?;
        let after = self.service(service)?;
        if let Some(before) = before {
            self.record_change(&before, &after, SwitchKind::Rollback, reason, force, actor);
        }
        Ok(after)
    }

    /// Appends a history entry that changes nothing (from and to are the
    /// active color, with the split if any): how `ctl deploy` records its
    /// outcome next to the steps it took.
    pub fn note(&self, service: &str, reason: String, actor: &Actor) -> Result<(), SwitchError> {
        let state = self.service(service)?;
        let event = Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            service: service.to_string(),
            from: state.active,
            to: state.active,
            weights: state.canary().map(|_| state.weights),
            maintenance: None,
            reason,
            actor: actor.clone(),
        };
        self.store.append_history(&event)?;
        Ok(())
    }

    /// Turns maintenance mode of `service` on or off; recorded in the
    /// history with `actor` (the colors unchanged).
    pub fn set_maintenance(
        &self,
        service: &str,
        on: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        let changed = self.change(service, |state| {
            let changed = state.maintenance != on;
            state.maintenance = on;
            Ok(changed)
        })?;
        let after = self.service(service)?;
        if changed {
            tracing::info!(service, on, %actor, "maintenance mode");
            let what = if on { "on" } else { "off" };
            self.append_history(Event {
                time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                service: service.to_string(),
                from: after.active,
                to: after.active,
                weights: after.canary().map(|_| after.weights),
                maintenance: Some(on),
                reason: format!("maintenance {what}"),
                actor: actor.clone(),
            });
            // Webhooks: maintenance on/off is a `switch` event (notify.rs).
            self.notify(crate::notify::Notice::maintenance(service, on).by(actor));
        }
        Ok(after)
    }

    /// Records in the history what a config reload did to each service:
    /// added, removed, or a pool whose backends changed (`before`: the
    /// snapshot the reload replaced). Colors are never changed by a reload.
    pub fn note_reload(&self, before: &Snapshot, actor: &Actor) {
        let after = self.load();
        let event = |s: &ServiceState, reason: String| Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            service: s.name.to_string(),
            from: s.active,
            to: s.active,
            weights: s.canary().map(|_| s.weights),
            maintenance: None,
            reason: format!("config reload: {reason}"),
            actor: actor.clone(),
        };
        for s in &after.services {
            let Some((_, old)) = before.service(&s.name) else {
                self.append_history(event(s, "service added".into()));
                continue;
            };
            for color in Color::ALL {
                let (was, now) = (old.pool(color), s.pool(color));
                if !Arc::ptr_eq(was, now) {
                    let list = |p: &Pool| {
                        let addrs: Vec<String> =
                            p.backends.iter().map(|b| b.addr.to_string()).collect();
                        addrs.join(", ")
                    };
                    let reason = match (list(now), list(was)) {
                        (now, was) if now == was => {
                            format!("{color} pool rebuilt ({now}): connect_timeout or health check changed")
                        }
                        (now, was) => format!("{color} pool now {now} (was {was})"),
                    };
                    self.append_history(event(s, reason));
                }
            }
        }
        for s in &before.services {
            if after.service(&s.name).is_none() {
                self.append_history(event(s, "service removed".into()));
            }
        }
    }

    /// Appends one history line. The change itself is durable and live by
    /// now; losing its history line is worth an alarm, not worth undoing it.
    fn append_history(&self, event: Event) {
        if let Err(err) = self.store.append_history(&event) {
            tracing::error!(cause = %err, service = %event.service, "state changed but its history entry was not written");
        }
    }

    /// Sends what happens here to `notifier` from now on (first call wins).
    pub fn set_notifier(&self, notifier: Arc<crate::notify::Notifier>) {
        let _ = self.notifier.set(notifier);
    }

    /// Queues `notice` for the webhooks; returns at once (see `notify.rs`).
    pub fn notify(&self, notice: crate::notify::Notice) {
        if let Some(n) = self.notifier.get() {
            n.notify(notice);
        }
    }

    /// The current state of one service.
    pub fn service(&self, service: &str) -> Result<ServiceState, SwitchError> {
        self.load()
            .service(service)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| SwitchError::UnknownService(service.to_string()))
    }

    /// The one write path: edit a copy of `service`, persist, then publish.
    /// `edit` returns what the caller wants back; a change that leaves the
    /// state equal is neither persisted nor published.
    fn change<T>(
        &self,
        service: &str,
        edit: impl FnOnce(&mut ServiceState) -> Result<T, SwitchError>,
    ) -> Result<T, SwitchError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.current.load_full();
        let (index, state) = snap
            .service(service)
            .ok_or_else(|| SwitchError::UnknownService(service.to_string()))?;
        let mut next = state.clone();
        let out = edit(&mut next)?;
        if (next.active, next.previous, next.weights, next.maintenance)
            == (
                state.active,
                state.previous,
                state.weights,
                state.maintenance,
            )
        {
            return Ok(out);
        }
        let mut services = snap.services.clone();
        services[index] = next;
        let next = snap.with_services(services);
        // Persist first: if the disk refuses, nothing has changed.
        self.store.save(&saved_state(&next))?;
        self.current.store(Arc::new(next));
        Ok(out)
    }

    /// The last [`crate::store::HISTORY_LIMIT`] color changes, oldest
    /// first; of `service` only, when given.
    pub fn history(&self, service: Option<&str>) -> Result<Vec<Event>, StoreError> {
        self.store.history(service)
    }

    /// Requests in flight across every pool.
    pub fn in_flight(&self) -> usize {
        self.load()
            .services
            .iter()
            .flat_map(|s| s.pools.iter())
            .map(|p| p.in_flight())
            .sum()
    }
}

fn saved_state(snap: &Snapshot) -> SavedState {
    SavedState {
        version: SavedState::VERSION,
        services: snap
            .services
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    SavedService {
                        active: s.active,
                        previous: s.previous,
                        weights: s.canary().map(|_| s.weights),
                        maintenance: s.maintenance,
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Actor {
        Actor::token("test")
    }
    use crate::store::MemoryStore;
    use std::path::Path;

    fn settings(config: &Config) -> Settings {
        let pages = crate::respond::Pages::new(None, Duration::from_secs(1)).unwrap();
        Settings::new(&config.server, pages)
    }

    fn config() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
[services.api]
blue = ["127.0.0.1:1", "127.0.0.1:2"]
green = ["127.0.0.1:3"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn round_robin_covers_the_pool() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let snap = board.load();
        let pool = snap.services[0].active_pool();
        let picks: Vec<u16> = (0..4)
            .map(|_| pool.select(None).unwrap().addr.port())
            .collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }

    #[test]
    fn switch_is_atomic_and_leaves_old_snapshots_alone() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let before = board.load();
        let after = board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
            .unwrap();
        assert_eq!(after.active, Color::Green);
        assert_eq!(after.previous, Some(Color::Blue));
        assert_eq!(before.services[0].active, Color::Blue);
        assert_eq!(board.load().services[0].active, Color::Green);
        // The pools themselves are shared, not rebuilt.
        assert!(Arc::ptr_eq(
            before.services[0].pool(Color::Green),
            board.load().services[0].pool(Color::Green)
        ));
        let back = board.rollback("api", None, false, &who()).unwrap();
        assert_eq!(back.active, Color::Blue);
        let reasons: Vec<String> = board
            .history(None)
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, vec!["switch", "rollback"]);
    }

    #[test]
    fn errors_change_nothing() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        assert!(matches!(
            board.switch(
                "nope",
                Color::Green,
                SwitchKind::Switch,
                None,
                false,
                &who()
            ),
            Err(SwitchError::UnknownService(_))
        ));
        assert!(matches!(
            board.rollback("api", None, false, &who()),
            Err(SwitchError::NoPrevious(_))
        ));
        assert_eq!(board.load().services[0].active, Color::Blue);
        assert!(board.history(None).unwrap().is_empty());
    }

    #[test]
    fn switch_waits_for_health_unless_forced() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[services.api]
blue = ["127.0.0.1:1"]
green = ["127.0.0.1:3", "127.0.0.1:4"]
health = { path = "/ping", rise = 1, fall = 1 }
min_healthy = 1
"#,
        )
        .unwrap();
        let board =
            Switchboard::with_settings(&config, settings(&config), Box::<MemoryStore>::default())
                .unwrap();
        let switch =
            |force| board.switch("api", Color::Green, SwitchKind::Switch, None, force, &who());
        // Unknown health does not count as healthy.
        let err = switch(false).unwrap_err().to_string();
        assert!(err.contains("0 healthy backends of 1 required"), "{err}");
        assert_eq!(board.load().services[0].active, Color::Blue);
        let green = board.load().services[0].pool(Color::Green).clone();
        green.backends[0]
            .health
            .record(Err("connect: refused".into()), 1, 1);
        green.backends[1].health.record(Ok(()), 1, 1);
        assert_eq!(switch(false).unwrap().active, Color::Green);
        // An unhealthy backend leaves rotation.
        assert!((0..4).all(|_| green.select(None).unwrap().addr.port() == 4));
        // Blue was never checked: rolling back to it needs force too.
        assert!(board.rollback("api", None, false, &who()).is_err());
        board.rollback("api", None, true, &who()).unwrap();
        green.backends[1]
            .health
            .record(Err("status 500".into()), 1, 1);
        assert!(green.select(None).is_none());
        assert_eq!(switch(true).unwrap().active, Color::Green);
    }

    #[test]
    fn maintenance_is_part_of_the_snapshot() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        assert!(
            board
                .set_maintenance("api", true, &who())
                .unwrap()
                .maintenance
        );
        assert!(board.load().services[0].maintenance);
        assert!(
            !board
                .set_maintenance("api", false, &who())
                .unwrap()
                .maintenance
        );
        assert!(matches!(
            board.set_maintenance("nope", true, &who()),
            Err(SwitchError::UnknownService(_))
        ));
    }

    #[test]
    fn weights_split_new_requests_and_a_switch_is_their_extreme() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let split = |blue, green| {
            board.set_weights(
                "api",
                Weights::new(blue, green).unwrap(),
                SwitchKind::Switch,
                None,
                false,
                &who(),
            )
        };
        let s = split(90, 10).unwrap();
        assert_eq!(
            (s.active, s.canary(), s.previous),
            (Color::Blue, Some(Color::Green), None)
        );
        // Every 100 requests without a bucket: exactly the split.
        let greens = (0..1000)
            .filter(|_| s.pick(None).color == Color::Green)
            .count();
        assert_eq!(greens, 100);
        // A bucket decides by itself: the lowest `green` buckets go green.
        assert_eq!(s.pick(Some(9)).color, Color::Green);
        assert_eq!(s.pick(Some(10)).color, Color::Blue);
        // A rollback of a split returns everything to the active color.
        assert_eq!(
            board.rollback("api", None, false, &who()).unwrap().weights,
            Weights::all(Color::Blue)
        );
        // 0/100 is a switch: green active, blue previous, counted as one.
        let s = split(0, 100).unwrap();
        assert_eq!(
            (s.active, s.previous, s.canary()),
            (Color::Green, Some(Color::Blue), None)
        );
        assert_eq!(s.pick(Some(99)).color, Color::Green);
        assert_eq!(board.load().services[0].switches(), [1, 0, 1]);
        let history = board.history(None).unwrap();
        let split_steps: Vec<_> = history
            .iter()
            .map(|e| (e.reason.as_str(), e.weights))
            .collect();
        assert_eq!(
            split_steps,
            vec![
                (
                    "weights",
                    Some(Weights {
                        blue: 90,
                        green: 10
                    })
                ),
                ("rollback", None),
                ("switch", None),
            ]
        );
        assert!(Weights::new(50, 51).is_err());
        assert!(Weights::new(300, 0).is_err());
    }

    #[test]
    fn a_conditional_rollback_never_undoes_a_later_command() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        let judged = board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
            .unwrap();
        // An operator moves on after the verdict was reached...
        board
            .set_weights(
                "api",
                Weights::new(50, 50).unwrap(),
                SwitchKind::Switch,
                None,
                false,
                &who(),
            )
            .unwrap();
        // ...so the verdict's rollback is refused and changes nothing.
        let late = board.rollback_if("api", Some(judged.moves), None, false, &who());
        assert!(matches!(late, Err(SwitchError::Moved(_))), "{late:?}");
        assert_eq!(
            board.load().services[0].weights,
            Weights::new(50, 50).unwrap()
        );
        // On the state it judged, it rolls back.
        let now = board.service("api").unwrap().moves;
        let back = board
            .rollback_if("api", Some(now), None, false, &who())
            .unwrap();
        assert_eq!(back.weights, Weights::all(Color::Green));
    }

    #[test]
    fn in_flight_is_counted_per_pool() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let pool = board.load().services[0].active_pool().clone();
        let a = InFlight::new(pool.clone());
        let b = InFlight::new(pool.clone());
        assert_eq!(board.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.in_flight(), 0);
    }

    #[test]
    fn reload_carries_colors_health_pools_and_unchanged_limits() {
        let text = r#"
[services.api]
blue = ["127.0.0.1:1", "127.0.0.1:2"]
green = ["127.0.0.1:3"]
health = { path = "/ping", rise = 1, fall = 1 }

[services.old]
blue = ["127.0.0.1:7"]
green = ["127.0.0.1:8"]

[rate_limits.writes]
rate = "1/m"

[rate_limits.reads]
rate = "5/m"

[[routes]]
path = "/"
service = "api"
rate_limit = "writes"

[[routes]]
path = "/old/"
service = "old"
rate_limit = "reads"
"#;
        let config = Config::parse(Path::new("t.toml"), text).unwrap();
        let board =
            Switchboard::with_settings(&config, settings(&config), Box::<MemoryStore>::default())
                .unwrap();
        board
            .switch("api", Color::Green, SwitchKind::Switch, None, true, &who())
            .unwrap();
        board.set_maintenance("api", true, &who()).unwrap();
        let before = board.load();
        let blue = before.services[0].pool(Color::Blue).clone();
        blue.backends[1].health.record(Ok(()), 1, 1);
        let running = InFlight::new(blue.clone());
        // Blue loses 127.0.0.1:1; green is unchanged; `old` goes, `new`
        // comes; `writes` stays as it was, `reads` changes.
        let next = text
            .replace(
                r#"blue = ["127.0.0.1:1", "127.0.0.1:2"]"#,
                r#"blue = ["127.0.0.1:2"]"#,
            )
            .replace("[services.old]", "[services.new]")
            .replace(r#"service = "old""#, r#"service = "new""#)
            .replace(r#"rate = "5/m""#, r#"rate = "6/m""#)
            .replace(r#"path = "/old/""#, r#"path = "/new/""#);
        let next = Config::parse(Path::new("t.toml"), &next).unwrap();
        let changes = board.reload(&next, settings(&next));
        assert_eq!(changes.services_added, vec!["new"]);
        assert_eq!(changes.services_removed, vec!["old"]);
        assert_eq!(changes.routes_added, vec!["*/new/"]);
        assert_eq!(changes.routes_removed, vec!["*/old/"]);
        assert_eq!(changes.limits_reset, vec!["rate_limit:reads"]);
        let after = board.load();
        let api = &after.services[0];
        assert_eq!(
            (api.active, api.previous, api.maintenance),
            (Color::Green, Some(Color::Blue), true)
        );
        assert!(Arc::ptr_eq(
            api.pool(Color::Green),
            before.services[0].pool(Color::Green)
        ));
        let new_blue = api.pool(Color::Blue);
        assert!(!Arc::ptr_eq(new_blue, &blue));
        assert_eq!(new_blue.backends.len(), 1);
        assert!(Arc::ptr_eq(
            &new_blue.backends[0].health,
            &blue.backends[1].health
        ));
        assert_eq!(new_blue.healthy(), 1);
        // A request still on the old pool counts on its color until it ends.
        assert_eq!(new_blue.in_flight(), 1);
        drop(running);
        assert_eq!(new_blue.in_flight(), 0);
        assert_eq!(after.services[1].name.as_ref(), "new");
        assert_eq!(after.services[1].active, Color::Blue);
        let kept = |s: &Snapshot| {
            let l = s.rate_limits.iter().find(|l| l.name() == "writes");
            l.map(|l| l as *const _)
        };
        assert_eq!(kept(&before), kept(&after));
        // The old snapshot is untouched: requests that hold it finish on it.
        assert_eq!(before.services[1].name.as_ref(), "old");
        assert_eq!(before.routes.label(1), Some("*/old/"));
        // A color change after the reload shares the config-derived parts.
        board.set_maintenance("api", false, &who()).unwrap();
        assert!(Arc::ptr_eq(&board.load().routes, &after.routes));
    }
}
