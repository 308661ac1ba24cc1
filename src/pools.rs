//! Colors, pools and the one atomic snapshot every request reads.
//!
//! A request loads the [`Snapshot`] once and keeps it (and the `Arc<Pool>`
//! it picked) to its end, so neither a switch nor a config reload disturbs
//! it: it finishes on the routes, limits, settings and pool it began with,
//! and every request that starts after a switch or a config reload returns
//! sees the new world. The one writer is `switchboard.rs`: serialized, it
//! builds the next snapshot, persists it and stores it; nothing on the
//! request path takes a lock.
//!
//! The config-derived parts of a snapshot (routes, settings, limits) each
//! sit behind their own `Arc`: a color change copies the refcounts, not the
//! tables. A reload carries over what survives it (`ServiceState::carry`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, HealthCheck};
use crate::health::{Health, HealthStatus};
use crate::limits::concurrency::ConcurrencyCaps;
use crate::limits::rate::RateLimits;
use crate::limits::tokens::TokenBudgets;
use crate::route::Routes;
use crate::settings::Settings;
use crate::store::{SavedService, SavedState, StoreError};

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
    pub(crate) fn gate_gaining(&self, to: Weights) -> Result<(), SwitchError> {
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

    /// Counts one color change by `cause` (the switchboard's).
    pub(crate) fn count_switch(&self, cause: SwitchCause) {
        self.switches[cause as usize].fetch_add(1, Ordering::Relaxed);
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
    pub(crate) fn with_services(&self, services: Vec<ServiceState>) -> Snapshot {
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
    /// `Switchboard::reload`); `saved`: the durable state, for services
    /// `old` does not have.
    pub(crate) fn build(
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
        let link = settings.cluster.clone();
        Snapshot {
            services,
            routes: Arc::new(Routes::new(&config.routes)),
            settings: Arc::new(settings),
            rate_limits: Arc::new(RateLimits::carry(
                &config.rate_limits,
                old.map(|o| &*o.rate_limits),
                link.as_ref(),
            )),
            concurrency: Arc::new(ConcurrencyCaps::carry(
                &config.concurrency,
                old.map(|o| &*o.concurrency),
                link.as_ref(),
            )),
            budgets: Arc::new(TokenBudgets::carry(
                &config.token_budgets,
                &names,
                old.map(|o| &*o.budgets),
                link.as_ref(),
            )),
        }
    }

    /// What changed from `old` to this snapshot.
    pub(crate) fn changes_from(&self, old: &Snapshot) -> Reloaded {
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
    /// `Switchboard::restore`).
    #[error("{0} was changed by someone else meanwhile (see the history); left as it is")]
    Moved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another instance changed the cluster's state first; this instance
    /// now serves that state.
    #[error("{0}")]
    ClusterConflict(String),
    /// Redis is unreachable and the change was not forced: refused, so
    /// that no two instances serve different states.
    #[error(
        "{0}: refused so that the instances do not diverge; retry when redis is back, or force \
         it (--force) to change this instance only"
    )]
    ClusterDown(String),
}

/// Why a switch happened, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    Switch,
    Rollback,
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
