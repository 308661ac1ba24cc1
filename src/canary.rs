//! What each color of each service has been answering lately: request
//! counts, 5xx counts and a latency histogram over a sliding window, and the
//! gates (`[services.NAME.rollback]`) that judge them. The automatic
//! rollback watcher (`rollback.rs`) and `ctl deploy` (`deploy.rs`) read the
//! same figures through the same [`judge`].
//!
//! Every finished request is counted in the one-second slot of the second it
//! *started* in, so "requests that started after the change" is a range of
//! slots. A slot is a handful of atomics: the request path adds to them
//! without a lock, and memory is fixed at start-up (one ring of
//! [`RING_SLOTS`] slots per service and color, about 0.3 MB per service).
//!
//! Counted: requests that reached the color's pool (an upstream was tried,
//! or the pool had no healthy backend left), including the proxy's own
//! 502/503/504 when that color's backends failed. Not counted: refusals made
//! before a pool was picked (rate limits, caps, budgets, maintenance, bad
//! requests). Latency is the time from the request head sent to the backend
//! to its response head (`upstream_time`), so a long, legitimately slow body
//! (an LLM completion) is not mistaken for a slow backend; streams
//! (WebSocket, SSE) are left out of latency altogether.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::Rollback;
use crate::pools::Color;
use crate::record::{Observer, RequestRecord};
use crate::respond::Refusal;
use crate::switchboard::Switchboard;

/// Slot width: one second.
pub const SLOT: Duration = Duration::from_secs(1);
/// Slots per ring (301): the longest window allowed
/// ([`crate::config::ROLLBACK_WINDOW_RANGE`], 5 min) plus the second being
/// filled.
pub const RING_SLOTS: usize = 301;
/// Latency histogram buckets (64). Bucket 0 holds up to 1 ms; bucket `i`
/// up to `1.25^i` ms; the last one everything slower than about 18 min.
/// Resolution: a p95 is reported as the upper edge of its bucket, at most
/// 25 % above the true value. The p95 gate itself is exact: each slot also
/// counts the requests slower than the service's `max_p95`.
pub const BUCKETS: usize = 64;
/// Growth factor between bucket edges (1.25).
const BUCKET_GROWTH: f64 = 1.25;
/// The share of requests allowed above `max_p95` (5 %): more, and the
/// p95 is over it.
const P95_TAIL: f64 = 0.05;

/// Milliseconds on a monotonic clock; tests drive their own.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The process's monotonic clock, counted from start-up.
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A clock that moves only when told: for unit tests.
#[derive(Default)]
pub struct ManualClock(pub AtomicU64);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One second of one color. `second` says which second the counts belong
/// to; a recorder finding an older second there clears the slot first.
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Requests with a latency (not streams).
    measured: AtomicU64,
    /// Measured requests slower than the service's `max_p95`.
    slow: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Slot {
    fn new() -> Slot {
        Slot {
            // No second is u64::MAX: every slot starts stale.
            second: AtomicU64::new(u64::MAX),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Makes the slot hold `second`. Two recorders racing on a stale slot
    /// may each lose a count to the other's clearing: statistics, not
    /// accounting, and it happens once per slot per lap of the ring.
    fn claim(&self, second: u64) -> bool {
        let held = self.second.load(Relaxed);
        if held == second {
            return true;
        }
        if held != u64::MAX && held > second {
            // The ring has moved past this second: too old to count.
            return false;
        }
        if self
            .second
            .compare_exchange(held, second, Relaxed, Relaxed)
            .is_ok()
        {
            self.requests.store(0, Relaxed);
            self.errors.store(0, Relaxed);
            self.measured.store(0, Relaxed);
            self.slow.store(0, Relaxed);
            for b in &self.latency {
                b.store(0, Relaxed);
            }
        }
        self.second.load(Relaxed) == second
    }
}

/// The ring of one service's color.
struct Ring {
    slots: Vec<Slot>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            slots: (0..RING_SLOTS).map(|_| Slot::new()).collect(),
        }
    }

    fn slot(&self, second: u64) -> &Slot {
        &self.slots[(second % RING_SLOTS as u64) as usize]
    }
}

/// The latency bucket of `ms`.
fn bucket(ms: f64) -> usize {
    if ms <= 1.0 {
        return 0;
    }
    let i = (ms.ln() / BUCKET_GROWTH.ln()).ceil();
    (i as usize).min(BUCKETS - 1)
}

/// The upper edge of bucket `i`.
fn bucket_edge(i: usize) -> Duration {
    Duration::from_secs_f64(BUCKET_GROWTH.powi(i as i32) / 1000.0)
}

/// What one color answered over a stretch of the window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    pub requests: u64,
    /// Of them, 5xx (the proxy's 502/503/504 for this color included).
    pub errors: u64,
    /// Requests with a latency (streams left out).
    pub measured: u64,
    /// Measured requests slower than `max_p95`.
    pub slow: u64,
    /// The 95th percentile of the time to the response head, as the upper
    /// edge of its histogram bucket; `None` with nothing measured.
    pub p95: Option<Duration>,
    /// How much time the figures cover.
    pub span: Duration,
}

impl Figures {
    /// The 5xx share, 0 with no requests.
    pub fn error_ratio(&self) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.errors as f64 / n as f64,
        }
    }
}

/// Which gate a color failed, as `switchyard_automatic_rollbacks_total{gate}`
/// names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The 5xx share was above `max_error_ratio`.
    ErrorRatio,
    /// The p95 was above `max_p95`.
    P95,
}

impl Gate {
    pub const ALL: [Gate; 2] = [Gate::ErrorRatio, Gate::P95];

    /// The `gate` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::ErrorRatio => "error_ratio",
            Gate::P95 => "p95",
        }
    }
}

/// A failed gate with the figures that failed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub gate: Gate,
    /// `5xx 23.5 % > 1 % over 30 s, 212 requests` or
    /// `p95 1.8 s > 1 s over 30 s, 212 requests`.
    pub detail: String,
}

/// A duration the way the figures show it: `350 ms`, `1 s`, `1.8 s`.
pub fn show_secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{} ms", d.as_millis());
    }
    let s = format!("{:.1}", d.as_secs_f64());
    format!("{} s", s.strip_suffix(".0").unwrap_or(&s))
}

/// A fraction as a percentage: `1 %`, `23.5 %`.
pub fn show_percent(ratio: f64) -> String {
    let s = format!("{:.1}", ratio * 100.0);
    format!("{} %", s.strip_suffix(".0").unwrap_or(&s))
}

/// The verdict on `f` by `gates`: `None` while the window holds fewer than
/// `min_requests`, or when both gates pass. The 5xx gate is judged first.
/// The p95 gate fails when more than 5 % of the measured requests took
/// longer than `max_p95` (which is what "p95 above it" means), and needs
/// `min_requests` measured requests of its own.
pub fn judge(f: &Figures, gates: &Rollback) -> Option<Breach> {
    if f.requests < gates.min_requests {
        return None;
    }
    let over = format!(
        "over {}, {} requests",
        show_secs(Duration::from_secs(f.span.as_secs().max(1))),
        f.requests
    );
    if f.error_ratio() > gates.max_error_ratio {
        return Some(Breach {
            gate: Gate::ErrorRatio,
            detail: format!(
                "5xx {} > {} {over}",
                show_percent(f.error_ratio()),
                show_percent(gates.max_error_ratio)
            ),
        });
    }
    if f.measured >= gates.min_requests && f.slow as f64 > f.measured as f64 * P95_TAIL {
        // The bucket edge is at or above the true p95, which is above max.
        let p95 = f.p95.unwrap_or(gates.max_p95).max(gates.max_p95);
        return Some(Breach {
            gate: Gate::P95,
            detail: format!(
                "p95 {} > {} {over}",
                show_secs(p95),
                show_secs(gates.max_p95)
            ),
        });
    }
    None
}

/// One service's two rings, its latency gate and its rollback counts.
struct ServiceWindows {
    name: Arc<str>,
    colors: [Ring; 2],
    /// The service's `max_p95` in ms: a request slower than this is
    /// counted `slow` when it is recorded. Follows config reloads.
    max_p95_ms: AtomicU64,
    /// Rollbacks made by a gate, per [`Gate::ALL`]:
    /// `switchyard_automatic_rollbacks_total`.
    rollbacks: [AtomicU64; 2],
}

impl ServiceWindows {
    fn new(name: Arc<str>, gates: Option<Rollback>) -> ServiceWindows {
        ServiceWindows {
            name,
            colors: [Ring::new(), Ring::new()],
            max_p95_ms: AtomicU64::new(max_p95_ms(gates)),
            rollbacks: Default::default(),
        }
    }
}

fn max_p95_ms(gates: Option<Rollback>) -> u64 {
    gates.unwrap_or_default().max_p95.as_millis() as u64
}

/// The per-color sliding windows of every service: an [`Observer`].
/// A config reload adds the windows of new services and drops those of
/// removed ones; a service that stays keeps its windows.
pub struct Stats {
    clock: Arc<dyn Clock>,
    services: ArcSwap<Vec<Arc<ServiceWindows>>>,
}

fn color_index(c: Color) -> usize {
    match c {
        Color::Blue => 0,
        Color::Green => 1,
    }
}

impl Stats {
    /// Windows for every service the board knows.
    pub fn new(board: &Switchboard, clock: Arc<dyn Clock>) -> Stats {
        let services = board
            .load()
            .services
            .iter()
            .map(|s| Arc::new(ServiceWindows::new(s.name.clone(), s.rollback)))
            .collect();
        Stats {
            clock,
            services: ArcSwap::from_pointee(services),
        }
    }

    /// Now, on the clock the windows use.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn windows(&self, service: &str) -> Option<Arc<ServiceWindows>> {
        self.services
            .load()
            .iter()
            .find(|s| &*s.name == service)
            .cloned()
    }

    /// Counts one finished request of `service` on `color` that started at
    /// `start_ms`; slower than the service's `max_p95` counts as slow.
    pub fn record(
        &self,
        service: &str,
        color: Color,
        start_ms: u64,
        error: bool,
        latency: Option<Duration>,
    ) {
        let all = self.services.load();
        let Some(w) = all.iter().find(|s| &*s.name == service) else {
            return;
        };
        let second = start_ms / SLOT.as_millis() as u64;
        let now_second = self.clock.now_ms() / SLOT.as_millis() as u64;
        if now_second.saturating_sub(second) >= RING_SLOTS as u64 {
            return;
        }
        let slot = w.colors[color_index(color)].slot(second);
        if !slot.claim(second) {
            return;
        }
        slot.requests.fetch_add(1, Relaxed);
        if error {
            slot.errors.fetch_add(1, Relaxed);
        }
        if let Some(l) = latency {
            slot.measured.fetch_add(1, Relaxed);
            if l.as_millis() as u64 > w.max_p95_ms.load(Relaxed) {
                slot.slow.fetch_add(1, Relaxed);
            }
            let ms = l.as_secs_f64() * 1000.0;
            slot.latency[bucket(ms)].fetch_add(1, Relaxed);
        }
    }

    /// The figures of `service`'s `color` for requests that started in the
    /// last `window` and not before `since_ms`.
    pub fn figures(&self, service: &str, color: Color, window: Duration, since_ms: u64) -> Figures {
        let Some(w) = self.windows(service) else {
            return Figures::default();
        };
        let ring = &w.colors[color_index(color)];
        let slot_ms = SLOT.as_millis() as u64;
        let now_ms = self.clock.now_ms();
        let now = now_ms / slot_ms;
        // The last `window` whole seconds and the one being filled.
        let slots = (window.as_secs().max(1) + 1).min(RING_SLOTS as u64);
        let first = (now + 1).saturating_sub(slots).max(since_ms / slot_ms);
        let mut f = Figures {
            span: window.min(Duration::from_millis(now_ms.saturating_sub(since_ms))),
            ..Figures::default()
        };
        let mut hist = [0u64; BUCKETS];
        for second in first..=now {
            let slot = ring.slot(second);
            if slot.second.load(Relaxed) != second {
                continue;
            }
            f.requests += slot.requests.load(Relaxed);
            f.errors += slot.errors.load(Relaxed);
            f.measured += slot.measured.load(Relaxed);
            f.slow += slot.slow.load(Relaxed);
            for (h, b) in hist.iter_mut().zip(&slot.latency) {
                *h += b.load(Relaxed);
            }
        }
        let total: u64 = hist.iter().sum();
        if total > 0 {
            // Nearest rank: the smallest latency with 95 % at or below it.
            let rank = ((total as f64) * (1.0 - P95_TAIL)).ceil() as u64;
            let mut seen = 0;
            for (i, n) in hist.iter().enumerate() {
                seen += n;
                if seen >= rank.max(1) {
                    f.p95 = Some(bucket_edge(i));
                    break;
                }
            }
        }
        f
    }

    /// Counts a rollback a gate made.
    pub fn count_rollback(&self, service: &str, gate: Gate) {
        if let Some(w) = self.windows(service) {
            w.rollbacks[gate as usize].fetch_add(1, Relaxed);
        }
    }

    /// Rollbacks by gate since start: (service, gate, count) for every
    /// configured service and gate.
    pub fn rollbacks(&self) -> Vec<(Arc<str>, Gate, u64)> {
        self.services
            .load()
            .iter()
            .flat_map(|w| {
                Gate::ALL
                    .iter()
                    .map(move |&g| (w.name.clone(), g, w.rollbacks[g as usize].load(Relaxed)))
            })
            .collect()
    }
}

/// Whether a request counts against its color: it reached the pool, or
/// the pool had nothing healthy left to give it.
fn counts(r: &RequestRecord<'_>) -> bool {
    match r.refusal {
        None => true,
        Some(Refusal::NoHealthyBackend | Refusal::Upstream(_)) => true,
        Some(_) => r.backend.is_some(),
    }
}

impl Observer for Stats {
    fn observe(&self, r: &RequestRecord<'_>) {
        let (Some(service), Some(color)) = (r.service, r.color) else {
            return;
        };
        if !counts(r) {
            return;
        }
        let now = self.clock.now_ms();
        let start = now.saturating_sub(r.total_time.as_millis() as u64);
        let error = (500..=599).contains(&r.status);
        // A request the backend never answered (timeout, reset) has waited
        // its whole time for a head that did not come.
        let latency = match (r.stream, r.upstream_time) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) if r.backend.is_some() => Some(r.total_time),
            (false, None) => None,
        };
        self.record(service, color, start, error, latency);
    }

    /// Keeps the windows of the services that stay (with their gate's new
    /// `max_p95`), adds fresh ones for new services, drops the rest.
    fn config_reloaded(&self, config: &crate::config::Config) {
        let old = self.services.load_full();
        let next = config
            .services
            .iter()
            .map(|s| match old.iter().find(|w| *w.name == s.name) {
                Some(w) => {
                    w.max_p95_ms.store(max_p95_ms(s.rollback), Relaxed);
                    w.clone()
                }
                None => Arc::new(ServiceWindows::new(Arc::from(s.name.as_str()), s.rollback)),
            })
            .collect();
        self.services.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::MemoryStore;
    use std::path::Path;

    fn setup() -> (Arc<ManualClock>, Stats) {
        let config = Config::parse(
            Path::new("t.toml"),
            "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n",
        )
        .unwrap();
        let board = Arc::new(Switchboard::new(&config, Box::<MemoryStore>::default()).unwrap());
        let clock = Arc::new(ManualClock::default());
        // Start well past zero so "a while ago" exists.
        clock.advance(Duration::from_secs(1000));
        let stats = Stats::new(&board, clock.clone());
        (clock, stats)
    }

    fn gates() -> Rollback {
        Rollback {
            window: Duration::from_secs(10),
            min_requests: 20,
            ..Rollback::default()
        }
    }

    #[test]
    fn window_slides_and_since_cuts_off_older_requests() {
        let (clock, stats) = setup();
        let ms = |n| Some(Duration::from_millis(n));
        for _ in 0..10 {
            stats.record("api", Color::Green, clock.now_ms(), true, ms(5));
        }
        clock.advance(Duration::from_secs(5));
        let since = clock.now_ms();
        for _ in 0..30 {
            stats.record("api", Color::Green, clock.now_ms(), false, ms(5));
        }
        let window = Duration::from_secs(10);
        let all = stats.figures("api", Color::Green, window, 0);
        assert_eq!((all.requests, all.errors), (40, 10));
        let after = stats.figures("api", Color::Green, window, since);
        assert_eq!((after.requests, after.errors), (30, 0));
        // Blue saw nothing.
        assert_eq!(stats.figures("api", Color::Blue, window, 0).requests, 0);
        // Ten seconds on, the errors have left the window.
        clock.advance(Duration::from_secs(6));
        let later = stats.figures("api", Color::Green, window, 0);
        assert_eq!((later.requests, later.errors), (30, 0));
        // A lap of the ring later, nothing is left.
        clock.advance(Duration::from_secs(RING_SLOTS as u64));
        assert_eq!(stats.figures("api", Color::Green, window, 0).requests, 0);
    }

    #[test]
    fn gates_need_min_requests_then_judge_errors_and_p95() {
        let (clock, stats) = setup();
        let g = gates();
        let now = clock.now_ms();
        let fast = Some(Duration::from_millis(20));
        for _ in 0..19 {
            stats.record("api", Color::Green, now, true, fast);
        }
        let f = stats.figures("api", Color::Green, g.window, 0);
        assert_eq!(judge(&f, &g), None, "19 requests are below min_requests");
        stats.record("api", Color::Green, now, false, fast);
        let f = stats.figures("api", Color::Green, g.window, 0);
        let breach = judge(&f, &g).unwrap();
        assert_eq!(breach.gate, Gate::ErrorRatio);
        assert!(
            breach
                .detail
                .starts_with("5xx 95 % > 1 % over 10 s, 20 requests"),
            "{}",
            breach.detail
        );

        // 100 fast and 6 slow (1.8 s) on blue: p95 is over 1 s.
        let slow = Some(Duration::from_millis(1800));
        for _ in 0..100 {
            stats.record("api", Color::Blue, now, false, fast);
        }
        let f = stats.figures("api", Color::Blue, g.window, 0);
        assert_eq!(judge(&f, &g), None);
        assert!(f.p95.unwrap() <= Duration::from_millis(25), "{:?}", f.p95);
        for _ in 0..6 {
            stats.record("api", Color::Blue, now, false, slow);
        }
        let f = stats.figures("api", Color::Blue, g.window, 0);
        let breach = judge(&f, &g).unwrap();
        assert_eq!(breach.gate, Gate::P95);
        // Within the histogram's resolution (25 %) above the truth.
        let p95 = f.p95.unwrap();
        assert!(
            p95 >= Duration::from_millis(1800) && p95 <= Duration::from_millis(2250),
            "{p95:?}"
        );
        assert!(breach.detail.starts_with("p95 "), "{}", breach.detail);
        assert!(breach.detail.contains("> 1 s over 10 s, 106 requests"));
        // Streams have no latency: they count, but never slow the p95.
        for _ in 0..100 {
            stats.record("api", Color::Green, now, false, None);
        }
        let f = stats.figures("api", Color::Green, g.window, 0);
        assert_eq!((f.requests, f.measured), (120, 20));
    }

    #[test]
    fn a_reload_keeps_the_windows_of_services_that_stay_and_adds_new_ones() {
        let (clock, stats) = setup();
        let now = clock.now_ms();
        let slow = Some(Duration::from_millis(1500));
        stats.record("api", Color::Green, now, true, slow);
        let next = Config::parse(
            Path::new("t.toml"),
            "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n\
             rollback = { max_p95 = \"2s\" }\n\
             [services.web]\nblue = [\"127.0.0.1:3\"]\ngreen = [\"127.0.0.1:4\"]\n",
        )
        .unwrap();
        stats.config_reloaded(&next);
        let window = Duration::from_secs(10);
        // api kept its window; its new max_p95 judges from now on.
        let f = stats.figures("api", Color::Green, window, 0);
        assert_eq!((f.requests, f.errors, f.slow), (1, 1, 1));
        stats.record("api", Color::Green, now, false, slow);
        assert_eq!(stats.figures("api", Color::Green, window, 0).slow, 1);
        // web is new and counted at once.
        stats.record("web", Color::Blue, now, false, slow);
        assert_eq!(stats.figures("web", Color::Blue, window, 0).requests, 1);
        let only_api = Config::parse(
            Path::new("t.toml"),
            "[services.web]\nblue = [\"127.0.0.1:3\"]\ngreen = [\"127.0.0.1:4\"]\n",
        )
        .unwrap();
        stats.config_reloaded(&only_api);
        assert_eq!(stats.figures("api", Color::Green, window, 0).requests, 0);
        assert_eq!(stats.rollbacks().len(), Gate::ALL.len());
    }

    #[test]
    fn buckets_cover_the_range() {
        assert_eq!(bucket(0.2), 0);
        assert_eq!(bucket(1.0), 0);
        assert!(bucket_edge(bucket(1800.0)) >= Duration::from_millis(1800));
        assert_eq!(bucket(1e12), BUCKETS - 1);
        assert_eq!(show_secs(Duration::from_millis(1800)), "1.8 s");
        assert_eq!(show_secs(Duration::from_secs(30)), "30 s");
        assert_eq!(show_secs(Duration::from_millis(250)), "250 ms");
        assert_eq!(show_percent(0.235), "23.5 %");
        assert_eq!(show_percent(0.01), "1 %");
    }

    fn record(status: u16, refusal: Option<Refusal>, backend: bool) -> RequestRecord<'static> {
        RequestRecord {
            request_id: "r",
            client: None,
            method: "GET",
            host: None,
            path: "/",
            status,
            service: Some("api"),
            color: Some(Color::Green),
            route: Some("*/"),
            backend: backend.then(|| "127.0.0.1:2".parse().unwrap()),
            upstream_time: backend.then(|| Duration::from_millis(40)),
            total_time: Duration::from_millis(50),
            bytes_in: 0,
            bytes_out: 0,
            refusal,
            stream: false,
        }
    }

    #[test]
    fn only_requests_that_reached_the_pool_count() {
        let (_clock, stats) = setup();
        // Counted: answered by a backend, the proxy's 502/504 for it, and
        // a pool with nothing healthy left.
        stats.observe(&record(200, None, true));
        stats.observe(&record(502, Some(Refusal::Upstream(502)), true));
        stats.observe(&record(503, Some(Refusal::NoHealthyBackend), false));
        // Not counted: refused before a pool was picked.
        let limited = Refusal::RateLimited { retry: 1, limit: 2 };
        stats.observe(&record(429, Some(limited), false));
        stats.observe(&record(503, Some(Refusal::Maintenance), false));
        stats.observe(&record(503, Some(Refusal::Busy(1)), false));
        // A stream counts, without a latency.
        let mut stream = record(200, None, true);
        stream.stream = true;
        stats.observe(&stream);
        let f = stats.figures("api", Color::Green, Duration::from_secs(10), 0);
        assert_eq!((f.requests, f.errors, f.measured), (4, 2, 2));
        assert_eq!(f.p95, Some(bucket_edge(bucket(40.0))));
    }
}
