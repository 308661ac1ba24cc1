//! Per-client request rates: nginx's `limit_req` with `nodelay`.
//!
//! Each `[rate_limits.NAME]` is one keyed GCRA limiter (governor) shared by
//! every route that names it, so a client's budget is the same whichever of
//! those routes it calls. A request over the rate is refused with 429 and a
//! `Retry-After`; it is never queued, and it does not use up budget.
//!
//! A limit counts requests under its `key` ([`crate::limits::key`]): the
//! client's address by default (after `trusted_proxies`, IPv6 by its /64),
//! a request header such as an API key (hashed), or one global key.
//!
//! A limit with `scope = "cluster"` is counted in Redis instead
//! ([`crate::cluster::ClusterRate`]: the same GCRA, one script per request),
//! so clients spread over N instances get the limit once, not N times;
//! while Redis cannot answer, each instance judges by a local limit of its
//! share (rate and burst divided by the live instances; see
//! [`crate::limits::cluster`]).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::cluster::{ClusterRate, Decision, Link};
use crate::config;
use crate::limits::cluster::{ClusterLimit, Kind};
use crate::limits::key::{Key, Keyer};
use pingora::http::RequestHeader;

/// How often client entries that have fully refilled are dropped (60 s), so
/// the table stays the size of the clients seen within one refill period.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Most keys one limit tracks (1 048 576: a key and its state take about
/// 40 bytes in governor's table, up to twice that while it grows, so tens
/// of MiB per limit at most): beyond it
/// refilled keys are dropped at once and, if that is not enough, the table
/// is emptied. A key is then counted from a full budget again, so a flood
/// of more distinct keys than this within one refill period loosens the
/// limit (each key may get up to one more burst) rather than growing
/// memory without end. Header keys make this reachable: a client can
/// invent values.
pub const MAX_KEYS: usize = 1 << 20;

/// The table size is looked at once per this many checks (1024), so the
/// check itself stays one atomic add; a limit may run over [`MAX_KEYS`] by
/// at most this many keys.
pub const KEY_CHECK_EVERY: u64 = 1024;

/// One named limit, checked by every route that uses it.
pub struct RateLimit {
    name: String,
    /// The settings it was built from: a reload keeps this limit (and the
    /// clients it has counted) only while they stay equal.
    settings: config::RateLimit,
    /// Requests per window as configured (`rate = "30/m"`: 30).
    requests: u32,
    /// Methods counted; `None` counts every method.
    methods: Option<Vec<http::Method>>,
    keyer: Keyer,
    /// Swapped whole for an empty one when over `max_keys` (governor has no
    /// way to clear a table in place).
    limiter: ArcSwap<DefaultKeyedRateLimiter<Key>>,
    quota: Quota,
    max_keys: usize,
    /// Checks so far, to look at the table size every [`KEY_CHECK_EVERY`].
    checks: AtomicU64,
    /// Times the table was emptied for going over `max_keys`.
    resets: AtomicU64,
    /// Requests refused since start.
    refused: AtomicU64,
    /// `scope = "cluster"`: the shared count and the local share.
    cluster: Option<ClusterSide>,
}

/// A cluster limit's Redis side and its fallback.
struct ClusterSide {
    limit: ClusterLimit,
    rate: ClusterRate,
    /// The local limit of this instance's share, and the live instances it
    /// was sized for: rebuilt when that number changes.
    fallback: ArcSwap<(usize, RateLimit)>,
}

impl RateLimit {
    pub fn new(limit: &config::RateLimit) -> RateLimit {
        RateLimit::with_max_keys(limit, MAX_KEYS)
    }

    /// [`RateLimit::new`] with another key bound than [`MAX_KEYS`] (tests).
    pub fn with_max_keys(limit: &config::RateLimit, max_keys: usize) -> RateLimit {
        // Validation keeps requests in 1..=MAX_RATE and burst below it, so
        // neither the period nor the bucket can be zero.
        let period = limit.per / limit.requests.max(1);
        let bucket = NonZeroU32::new(limit.burst.saturating_add(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(bucket);
        RateLimit {
            settings: limit.clone(),
            requests: limit.requests,
            name: limit.name.clone(),
            methods: limit.methods.clone(),
            keyer: Keyer::new(limit.key.clone()),
            limiter: ArcSwap::from_pointee(DefaultKeyedRateLimiter::keyed(quota)),
            quota,
            max_keys,
            checks: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cluster: None,
        }
    }

    /// The limit `limit` on `link`'s cluster when it says `scope =
    /// "cluster"` (and a lone instance's limit otherwise, or without a link).
    pub fn with_link(limit: &config::RateLimit, link: Option<&Arc<Link>>) -> RateLimit {
        let mut local = RateLimit::new(limit);
        let Some(link) = link.filter(|_| limit.scope == config::Scope::Cluster) else {
            return local;
        };
        let cluster = ClusterLimit::new(link.clone(), Kind::Rate);
        local.keyer = Keyer::with_shared(limit.key.clone(), cluster.shared_hash());
        local.cluster = Some(ClusterSide {
            rate: ClusterRate::new(link.redis.clone(), limit),
            fallback: ArcSwap::from_pointee((0, RateLimit::new(limit))),
            limit: cluster,
        });
        local
    }

    /// [`RateLimit::check`] for any scope: a cluster limit asks Redis (one
    /// script call, at most `[cluster] limit_timeout`) and falls back to
    /// this instance's share when Redis cannot answer; a local limit never
    /// leaves the process.
    pub async fn admit(&self, req: &RequestHeader, client: IpAddr) -> Result<(), Duration> {
        let Some(c) = &self.cluster else {
            return self.check(req, client);
        };
        if !self.counts(&req.method) {
            return Ok(());
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        let key = self.keyer.key(req, client);
        let verdict = match c.limit.ask(&key, c.rate.check(key)).await {
            Some(Decision::Allowed) => Ok(()),
            Some(Decision::Refused { wait }) => Err(wait),
            None => self.share(c).1.check_counted(key),
        };
        if verdict.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// The local limit of this instance's share: `requests / live` (at
    /// least 1) per window, `burst / live` beyond it.
    fn share(&self, c: &ClusterSide) -> Arc<(usize, RateLimit)> {
        let live = c.limit.link.live_instances();
        let current = c.fallback.load_full();
        if current.0 == live {
            return current;
        }
        let sized = config::RateLimit {
            requests: c.limit.share(u64::from(self.requests)) as u32,
            burst: self.settings.burst / live as u32,
            scope: config::Scope::Local,
            ..self.settings.clone()
        };
        let next = Arc::new((live, RateLimit::new(&sized)));
        c.fallback.store(next.clone());
        next
    }

    /// Requests judged by the local share (cluster limits; 0 otherwise).
    pub fn fallbacks(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.limit.fallbacks())
    }

    /// Whether the limit is counted in Redis (`scope = "cluster"`).
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Reads the cluster's shared hash key now, so header keys are shared
    /// from the first request (tests; otherwise read at first need).
    pub async fn load_secret(&self) -> Result<(), crate::cluster::ClusterError> {
        match &self.cluster {
            Some(c) => c.limit.load_secret().await,
            None => Ok(()),
        }
    }

    /// Whether requests of `method` count against this limit (`methods`;
    /// all when unset).
    pub fn counts(&self, method: &http::Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }

    /// `Err(wait)` when the key of `req` from `client` (its address after
    /// `trusted_proxies`) is over the rate: how long until it may send
    /// again. Methods the limit does not count always pass, untouched.
    pub fn check(&self, req: &RequestHeader, client: IpAddr) -> Result<(), Duration> {
        if !self.counts(&req.method) {
            return Ok(());
        }
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(KEY_CHECK_EVERY)
        {
            self.bound_keys();
        }
        self.check_key(self.keyer.key(req, client))
            .inspect_err(|_| {
                self.refused.fetch_add(1, Ordering::Relaxed);
            })
    }

    /// [`RateLimit::check_key`] with the key table kept within its bound
    /// (the local share of a cluster limit, whose own counters are unused).
    fn check_counted(&self, key: Key) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(KEY_CHECK_EVERY)
        {
            self.bound_keys();
        }
        self.check_key(key)
    }

    /// Counts one request under `key` in this process (no counters kept).
    fn check_key(&self, key: Key) -> Result<(), Duration> {
        let limiter = self.limiter.load();
        limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Requests counted against the limit since start (admitted and refused).
    pub fn checked(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Requests refused with 429 since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Requests per window as configured (for `RateLimit-Limit`).
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// The limit's name (`[rate_limits.NAME]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keys currently tracked.
    pub fn clients(&self) -> usize {
        self.limiter.load().len()
    }

    /// Keeps the table within `max_keys` (see [`MAX_KEYS`]).
    fn bound_keys(&self) {
        let limiter = self.limiter.load();
        if limiter.len() < self.max_keys {
            return;
        }
        limiter.retain_recent();
        if limiter.len() >= self.max_keys {
            self.limiter
                .store(Arc::new(DefaultKeyedRateLimiter::keyed(self.quota)));
            self.resets.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max_keys = self.max_keys,
                "rate limit tracks too many keys; every key starts from a full budget again"
            );
        }
    }

    /// Times the key table was emptied for going over its bound.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Drops clients whose budget has refilled: they are indistinguishable
    /// from clients never seen.
    pub fn sweep(&self) {
        let limiter = self.limiter.load();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if let Some(c) = &self.cluster {
            c.fallback.load().1.sweep();
        }
    }
}

/// Every configured limit, indexed like `Config::rate_limits`.
pub struct RateLimits(Vec<Arc<RateLimit>>);

impl RateLimits {
    pub fn new(limits: &[config::RateLimit]) -> RateLimits {
        RateLimits::carry(limits, None, None)
    }

    /// The limits of a reloaded config: a limit whose name and settings are
    /// unchanged in `old` is the same limit (its clients stay counted, so a
    /// reload is no way to reset a rate); a new or changed one starts empty.
    /// `link`: the cluster, for limits with `scope = "cluster"`.
    pub fn carry(
        limits: &[config::RateLimit],
        old: Option<&RateLimits>,
        link: Option<&Arc<Link>>,
    ) -> RateLimits {
        RateLimits(
            limits
                .iter()
                .map(|l| {
                    old.and_then(|o| o.0.iter().find(|k| k.settings == *l))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(RateLimit::with_link(l, link)))
                })
                .collect(),
        )
    }

    pub fn get(&self, index: usize) -> Option<&RateLimit> {
        self.0.get(index).map(|l| &**l)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every limit, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &RateLimit> {
        self.0.iter().map(|l| &**l)
    }

    pub fn sweep(&self) {
        self.0.iter().for_each(|l| l.sweep());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, burst: u32, methods: Option<Vec<http::Method>>) -> RateLimit {
        RateLimit::new(&config::RateLimit {
            name: "t".into(),
            requests,
            per: Duration::from_secs(1),
            burst,
            methods,
            key: config::KeySource::ClientIp,
            scope: Default::default(),
        })
    }

    fn req(method: http::Method) -> RequestHeader {
        RequestHeader::build(method, b"/", None).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_fresh_client_gets_burst_plus_one_then_waits_one_period() {
        let l = limit(2, 10, None);
        let a = ip("192.0.2.1");
        for i in 0..11 {
            assert_eq!(l.check(&req(http::Method::POST), a), Ok(()), "request {i}");
        }
        let wait = l.check(&req(http::Method::POST), a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another client has its own budget.
        assert_eq!(l.check(&req(http::Method::POST), ip("192.0.2.2")), Ok(()));
    }

    #[test]
    fn methods_outside_the_list_are_not_counted() {
        let l = limit(1, 0, Some(vec![http::Method::POST]));
        let a = ip("192.0.2.1");
        assert_eq!(l.check(&req(http::Method::POST), a), Ok(()));
        assert!(l.check(&req(http::Method::POST), a).is_err());
        for _ in 0..100 {
            assert_eq!(l.check(&req(http::Method::GET), a), Ok(()));
        }
        assert_eq!(l.clients(), 1);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        use crate::limits::key::client_key;
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        let l = limit(1, 0, None);
        assert_eq!(
            l.check(&req(http::Method::GET), ip("2001:db8:1:2::1")),
            Ok(())
        );
        assert!(l
            .check(&req(http::Method::GET), ip("2001:db8:1:2::2"))
            .is_err());
        assert_eq!(
            l.check(&req(http::Method::GET), ip("2001:db8:1:3::1")),
            Ok(())
        );
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_bound() {
        // A million made-up API keys at one request per minute: every
        // value is a new entry that will not refill during the test.
        let max = 10_000;
        let l = RateLimit::with_max_keys(
            &config::RateLimit {
                name: "t".into(),
                requests: 1,
                per: Duration::from_secs(60),
                burst: 0,
                methods: None,
                key: config::KeySource::parse("header:x-api-key").unwrap(),
                scope: Default::default(),
            },
            max,
        );
        let client = ip("192.0.2.1");
        let mut req = req(http::Method::POST);
        let mut most = 0;
        for i in 0..1_000_000u32 {
            req.insert_header("x-api-key", format!("sk-{i}")).unwrap();
            let _ = l.check(&req, client);
            most = most.max(l.clients());
        }
        assert!(most <= max + KEY_CHECK_EVERY as usize, "{most}");
        assert!(l.resets() >= 90, "{}", l.resets());
        assert!(
            std::mem::size_of::<Key>() <= 24,
            "the per-key estimate of MAX_KEYS"
        );
        // A key still counts within its period between resets.
        req.insert_header("x-api-key", "steady").unwrap();
        assert_eq!(l.check(&req, client), Ok(()));
        assert!(l.check(&req, client).is_err());
    }

    #[test]
    fn sweep_forgets_only_refilled_clients() {
        // 1 000 000/s refills within a microsecond: every client is stale at once.
        let fast = limit(1_000_000, 0, None);
        for i in 0..100u8 {
            let _ = fast.check(&req(http::Method::GET), IpAddr::from([10, 0, 0, i]));
        }
        assert_eq!(fast.clients(), 100);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fast.clients() > 0 && std::time::Instant::now() < deadline {
            fast.sweep();
        }
        assert_eq!(fast.clients(), 0);
        // 1/s with a spent budget: still remembered after a sweep.
        let slow = limit(1, 0, None);
        let _ = slow.check(&req(http::Method::GET), ip("192.0.2.1"));
        slow.sweep();
        assert_eq!(slow.clients(), 1);
    }
}
