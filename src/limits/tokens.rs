//! Per-key token budgets: reserve at admission, settle when the response ends.
//!
//! Each `[token_budgets.NAME]` keeps, per key, a bucket of
//! `tokens_per_minute` tokens that refills continuously. A completion
//! reserves an upper bound of what it can cost before it reaches the
//! backend; when its response ends, the real `usage` is charged and the
//! rest of the reservation goes back. Because every admitted request holds
//! its worst case until then, concurrent requests can never together spend
//! more than the bucket held, unlike gateways that count a streamed
//! response only once it is over. A request the bucket cannot cover now is
//! refused with the time until it can.
//!
//! The reservation is settled, kept or given back whatever happens to the
//! request: [`Reservation`] is dropped with the request's context.
//!
//! A budget with `scope = "cluster"` keeps its buckets in Redis
//! ([`crate::limits::cluster_tokens`]); while Redis cannot answer, each
//! instance reserves from a local budget of its share (`tokens_per_minute`
//! divided by the live instances).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pingora::http::RequestHeader;
use std::net::IpAddr;

use arc_swap::ArcSwap;

use crate::cluster::Link;
use crate::config;
use crate::limits::cluster_tokens::ClusterTokens;
use crate::limits::key::{Key, Keyer};

/// Most keys one budget tracks (1 048 576; a key and its bucket take about
/// 48 bytes in the table, so about 50 MiB at most). A key whose bucket has
/// refilled is forgotten by the sweep (it is the same as a new key); when
/// more keys than this have spent tokens within one minute, the fullest
/// half is forgotten at once, each such key regaining at most what it was
/// short of a full bucket. Header keys make this reachable: a client can
/// invent values.
pub const MAX_KEYS: usize = 1 << 20;

/// Counters of one budget since start, for `GET /limits` and the metrics to
/// come (issue 11). Token counts are in tokens.
#[derive(Debug, Default)]
pub struct BudgetStats {
    /// Requests admitted with a reservation.
    pub admitted: AtomicU64,
    /// Requests refused because the key's bucket could not cover them (429).
    pub refused_exhausted: AtomicU64,
    /// Requests refused before any reservation: a body that is not JSON,
    /// over `max_body`, a `max_tokens` over the cap, or a worst case larger
    /// than the whole bucket (400/413).
    pub refused_invalid: AtomicU64,
    /// Tokens reserved at admission.
    pub reserved: AtomicU64,
    /// Tokens charged at settlement, from the responses' `usage`.
    pub settled: AtomicU64,
    /// Tokens given back: the unused rest of settled reservations, and
    /// whole reservations of requests that never reached a backend.
    pub refunded: AtomicU64,
    /// Tokens of reservations kept whole because the response carried no
    /// usage (a backend error, a client gone mid-stream).
    pub kept: AtomicU64,
    /// Tokens charged beyond their reservation (responses that used more
    /// than reserved; part of `settled`). Tokens still held by requests in
    /// flight are `reserved + overrun - settled - refunded - kept`.
    pub overrun: AtomicU64,
}

impl BudgetStats {
    /// Tokens reserved by requests still in flight.
    pub fn held(&self) -> u64 {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (load(&self.reserved) + load(&self.overrun))
            .saturating_sub(load(&self.settled) + load(&self.refunded) + load(&self.kept))
    }
}

/// Tokens through one service's completions since start, over every
/// budget its routes name (the settle/refund/keep split of
/// [`BudgetStats`], per service).
#[derive(Debug, Default)]
pub struct TokenCounts {
    pub reserved: AtomicU64,
    pub settled: AtomicU64,
    pub refunded: AtomicU64,
    pub kept: AtomicU64,
}

/// A bucket: `level` tokens at `at` (time since the budget's start).
/// `level` may be below zero when a response used more than it reserved.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Duration,
}

/// A refusal: the key's bucket holds too few tokens for this request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exhausted {
    /// Until the bucket holds enough for this request.
    pub retry_after: Duration,
    /// Tokens in the bucket now (0 when in debt).
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// One named budget, charged by every route that uses it.
pub struct TokenBudget {
    settings: config::TokenBudget,
    keyer: Keyer,
    /// Tokens per nanosecond of refill.
    rate: f64,
    capacity: f64,
    start: Instant,
    table: Mutex<HashMap<Key, Bucket>>,
    max_keys: usize,
    /// Shared with the local share of a cluster budget, so what it counts
    /// shows under this budget's name.
    stats: Arc<BudgetStats>,
    /// `scope = "cluster"`: the buckets in Redis and the local share.
    cluster: Option<ClusterSide>,
}

/// A cluster budget's Redis side and its fallback.
struct ClusterSide {
    tokens: Arc<ClusterTokens>,
    /// The local budget of this instance's share, and the live instances
    /// it was sized for: rebuilt when that number changes.
    fallback: ArcSwap<(usize, Arc<TokenBudget>)>,
}

impl TokenBudget {
    pub fn new(settings: &config::TokenBudget) -> TokenBudget {
        TokenBudget::with_max_keys(settings, MAX_KEYS)
    }

    /// [`TokenBudget::new`] with another key bound than [`MAX_KEYS`] (tests).
    pub fn with_max_keys(settings: &config::TokenBudget, max_keys: usize) -> TokenBudget {
        let capacity = settings.tokens_per_minute as f64;
        TokenBudget {
            keyer: Keyer::new(settings.key.clone()),
            rate: capacity / 60e9,
            capacity,
            start: Instant::now(),
            table: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(2),
            stats: Arc::default(),
            settings: settings.clone(),
            cluster: None,
        }
    }

    /// The budget `settings` on `link`'s cluster when it says `scope =
    /// "cluster"` (and a lone instance's budget otherwise, or without a link).
    pub fn with_link(settings: &config::TokenBudget, link: Option<&Arc<Link>>) -> TokenBudget {
        let mut budget = TokenBudget::new(settings);
        let Some(link) = link.filter(|_| settings.scope == config::Scope::Cluster) else {
            return budget;
        };
        let tokens = Arc::new(ClusterTokens::new(link.clone(), settings));
        budget.keyer = Keyer::with_shared(settings.key.clone(), tokens.limit.shared_hash());
        budget.cluster = Some(ClusterSide {
            tokens,
            fallback: ArcSwap::from_pointee((0, Arc::new(TokenBudget::new(settings)))),
        });
        budget
    }

    /// [`TokenBudget::reserve`] for any scope: a cluster budget reserves in
    /// Redis (one script call, at most `[cluster] limit_timeout`) and from
    /// this instance's share when Redis cannot answer.
    pub async fn reserve_for(
        self: &Arc<Self>,
        key: Key,
        tokens: u64,
    ) -> Result<Reservation, Exhausted> {
        let Some(c) = &self.cluster else {
            return self.reserve(key, tokens);
        };
        let Some(answer) = c
            .tokens
            .limit
            .ask(&key, c.tokens.reserve(&key, tokens))
            .await
        else {
            return self.share(c).reserve(key, tokens);
        };
        if !answer.admitted {
            self.stats.refused_exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(Exhausted {
                retry_after: answer.retry_after,
                remaining: answer.remaining,
                reset: answer.reset,
            });
        }
        Ok(self.held(key, tokens, Some((answer.remaining, answer.reset))))
    }

    /// The local budget of this instance's share of a cluster budget:
    /// `tokens_per_minute / live` (at least 1), with the caps lowered to it.
    fn share(&self, c: &ClusterSide) -> Arc<TokenBudget> {
        let live = c.tokens.limit.link.live_instances();
        let current = c.fallback.load();
        if current.0 == live {
            return current.1.clone();
        }
        let per_minute = c.tokens.limit.share(self.settings.tokens_per_minute);
        let sized = config::TokenBudget {
            tokens_per_minute: per_minute,
            scope: config::Scope::Local,
            ..self.settings.clone()
        };
        let mut budget = TokenBudget::new(&sized);
        budget.stats = self.stats.clone();
        let budget = Arc::new(budget);
        c.fallback.store(Arc::new((live, budget.clone())));
        budget
    }

    /// Requests judged by the local share (cluster budgets; 0 otherwise).
    pub fn fallbacks(&self) -> u64 {
        self.cluster
            .as_ref()
            .map_or(0, |c| c.tokens.limit.fallbacks())
    }

    /// Whether the budget is kept in Redis (`scope = "cluster"`).
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Reads the cluster's shared hash key now (see
    /// [`crate::limits::rate::RateLimit::load_secret`]).
    pub async fn load_secret(&self) -> Result<(), crate::cluster::ClusterError> {
        match &self.cluster {
            Some(c) => c.tokens.limit.load_secret().await,
            None => Ok(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The budget as configured (caps, `max_body`, estimate ratio).
    pub fn settings(&self) -> &config::TokenBudget {
        &self.settings
    }

    pub fn stats(&self) -> &BudgetStats {
        &self.stats
    }

    /// The key a request is charged under.
    pub fn key(&self, req: &RequestHeader, client: IpAddr) -> Key {
        self.keyer.key(req, client)
    }

    /// Reserves `tokens` under `key`, or says how long until the bucket can
    /// cover them. `tokens` must not exceed `tokens_per_minute` (the
    /// caller refuses such a request outright: it could never be admitted).
    pub fn reserve(self: &Arc<Self>, key: Key, tokens: u64) -> Result<Reservation, Exhausted> {
        self.reserve_at(key, tokens, self.start.elapsed())
    }

    /// [`TokenBudget::reserve`] at `now`, the time since the budget's start
    /// (tests drive the clock through this).
    pub fn reserve_at(
        self: &Arc<Self>,
        key: Key,
        tokens: u64,
        now: Duration,
    ) -> Result<Reservation, Exhausted> {
        let mut table = self.lock();
        let full = Bucket {
            level: self.capacity,
            at: now,
        };
        let mut bucket = table.get(&key).copied().unwrap_or(full);
        self.refill(&mut bucket, now);
        let wanted = tokens as f64;
        if bucket.level < wanted {
            self.stats.refused_exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(Exhausted {
                retry_after: self.time_to(wanted - bucket.level),
                remaining: bucket.level.max(0.0) as u64,
                reset: self.time_to(self.capacity - bucket.level),
            });
        }
        bucket.level -= wanted;
        if !table.contains_key(&key) && table.len() >= self.max_keys {
            self.evict(&mut table, now);
        }
        table.insert(key, bucket);
        drop(table);
        Ok(self.held(key, tokens, None))
    }

    /// A reservation of `tokens` under `key` just admitted, counted.
    fn held(
        self: &Arc<Self>,
        key: Key,
        tokens: u64,
        standing: Option<(u64, Duration)>,
    ) -> Reservation {
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        self.stats.reserved.fetch_add(tokens, Ordering::Relaxed);
        Reservation {
            budget: self.clone(),
            key,
            tokens,
            state: State::Held,
            service: None,
            standing,
        }
    }

    /// Tokens in `key`'s bucket now (0 when in debt; the full bucket for an
    /// unknown key) and the time until it is full again:
    /// `RateLimit-Remaining` and `RateLimit-Reset`.
    pub fn standing(&self, key: Key) -> (u64, Duration) {
        self.standing_at(key, self.start.elapsed())
    }

    /// [`TokenBudget::standing`] at `now` (tests).
    pub fn standing_at(&self, key: Key, now: Duration) -> (u64, Duration) {
        let level = self
            .lock()
            .get(&key)
            .copied()
            .map_or(self.capacity, |mut b| {
                self.refill(&mut b, now);
                b.level
            });
        (level.max(0.0) as u64, self.time_to(self.capacity - level))
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }

    /// The `n` keys furthest below a full bucket, with the tokens they are
    /// short of it (spent within the last minute, roughly), largest first.
    pub fn top(&self, n: usize) -> Vec<(Key, u64)> {
        let now = self.start.elapsed();
        let mut used: Vec<(Key, u64)> = self
            .lock()
            .iter()
            .map(|(key, bucket)| {
                let mut b = *bucket;
                self.refill(&mut b, now);
                (*key, (self.capacity - b.level).max(0.0) as u64)
            })
            .filter(|(_, used)| *used > 0)
            .collect();
        used.sort_unstable_by_key(|&(_, used)| std::cmp::Reverse(used));
        used.truncate(n);
        used
    }

    /// Forgets keys whose bucket has refilled: they are the same as new keys.
    pub fn sweep(&self) {
        self.sweep_at(self.start.elapsed());
    }

    /// [`TokenBudget::sweep`] at `now` (tests).
    pub fn sweep_at(&self, now: Duration) {
        if let Some(c) = &self.cluster {
            c.fallback.load().1.sweep();
        }
        let mut table = self.lock();
        table.retain(|_, bucket| {
            let mut b = *bucket;
            self.refill(&mut b, now);
            b.level < self.capacity
        });
    }

    /// Makes room for a new key: refilled keys go first; if that is not
    /// enough, the fullest half (each regains at most what it was short of
    /// a full bucket, see [`MAX_KEYS`]).
    fn evict(&self, table: &mut HashMap<Key, Bucket>, now: Duration) {
        table.retain(|_, bucket| {
            self.refill(bucket, now);
            bucket.level < self.capacity
        });
        if table.len() < self.max_keys {
            return;
        }
        let mut levels: Vec<f64> = table.values().map(|b| b.level).collect();
        let middle = levels.len() / 2;
        let (_, threshold, _) = levels.select_nth_unstable_by(middle, f64::total_cmp);
        let threshold = *threshold;
        table.retain(|_, bucket| bucket.level < threshold);
        tracing::warn!(
            budget = %self.settings.name,
            max_keys = self.max_keys,
            kept = table.len(),
            "token budget over its key bound: the fullest buckets were forgotten"
        );
    }

    fn settle(&self, key: Key, give_back: f64, now: Duration) {
        if let Some(c) = &self.cluster {
            c.tokens.settle_later(key, give_back);
            return;
        }
        let mut table = self.lock();
        match table.get_mut(&key) {
            Some(bucket) => {
                self.refill(bucket, now);
                bucket.level = (bucket.level + give_back).min(self.capacity);
            }
            // A key forgotten meanwhile (swept or evicted) counts as full: a
            // refund has nothing to fill, but a debt (a response that used
            // more than it reserved, after a request that outlived its
            // bucket's refill) is still owed.
            None if give_back < 0.0 => {
                if table.len() >= self.max_keys {
                    self.evict(&mut table, now);
                }
                let level = self.capacity + give_back;
                table.insert(key, Bucket { level, at: now });
            }
            None => {}
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Duration) {
        let elapsed = now.saturating_sub(bucket.at).as_nanos() as f64;
        bucket.level = (bucket.level + elapsed * self.rate).min(self.capacity);
        bucket.at = bucket.at.max(now);
    }

    /// How long the bucket takes to gain `tokens`, rounded up to whole ms.
    fn time_to(&self, tokens: f64) -> Duration {
        let nanos = (tokens.max(0.0) / self.rate).ceil();
        let ms = (nanos / 1e6).ceil().min(u64::MAX as f64) as u64;
        Duration::from_millis(ms)
    }

    /// A poisoned lock (a panic while holding it, which the code above
    /// cannot cause) still guards consistent data: every update is one
    /// assignment.
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Bucket>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reserved; the request has not reached a backend.
    Held,
    /// The request went to a backend: without usage, the tokens are spent.
    Sent,
    Done,
}

/// Tokens reserved for one request. Settle it with the response's usage;
/// dropped unsettled, it is given back whole if the request never reached a
/// backend, and kept whole otherwise (the backend may have spent it).
pub struct Reservation {
    budget: Arc<TokenBudget>,
    key: Key,
    tokens: u64,
    state: State,
    /// The service's counts, when the reservation is counted for one.
    service: Option<Arc<TokenCounts>>,
    /// A cluster reservation: the bucket's remaining tokens and time to
    /// full as Redis answered it.
    standing: Option<(u64, Duration)>,
}

impl Reservation {
    /// Counts the reservation, and its outcome, for a service too.
    pub fn count_for(&mut self, service: Arc<TokenCounts>) {
        service.reserved.fetch_add(self.tokens, Ordering::Relaxed);
        self.service = Some(service);
    }

    /// Tokens left in the key's bucket, with this reservation held, and
    /// the time until it is full again (`RateLimit-Remaining`,
    /// `RateLimit-Reset`): as Redis answered the reservation for a cluster
    /// budget, the local bucket now otherwise.
    pub fn standing(&self) -> (u64, Duration) {
        self.standing
            .unwrap_or_else(|| self.budget.standing(self.key))
    }

    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The request is being sent to a backend: from now on an unsettled
    /// reservation is kept, not given back.
    pub fn mark_sent(&mut self) {
        if self.state == State::Held {
            self.state = State::Sent;
        }
    }

    /// Whether the request reached a backend and is not yet settled.
    pub fn is_unsettled(&self) -> bool {
        self.state == State::Sent
    }

    /// Charges `used` tokens (the response's `usage.total_tokens`) and
    /// gives back the rest; more than reserved puts the key in debt.
    pub fn settle(&mut self, used: u64) {
        self.settle_at(used, self.budget.start.elapsed());
    }

    /// [`Reservation::settle`] at `now` (tests).
    pub fn settle_at(&mut self, used: u64, now: Duration) {
        if self.state == State::Done {
            return;
        }
        self.state = State::Done;
        let refund = self.tokens.saturating_sub(used);
        let stats = &self.budget.stats;
        stats.settled.fetch_add(used, Ordering::Relaxed);
        stats.refunded.fetch_add(refund, Ordering::Relaxed);
        stats
            .overrun
            .fetch_add(used.saturating_sub(self.tokens), Ordering::Relaxed);
        if let Some(service) = &self.service {
            service.settled.fetch_add(used, Ordering::Relaxed);
            service.refunded.fetch_add(refund, Ordering::Relaxed);
        }
        self.budget
            .settle(self.key, self.tokens as f64 - used as f64, now);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("budget", &self.budget.name())
            .field("key", &self.key)
            .field("tokens", &self.tokens)
            .field("state", &self.state)
            .finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let stats = &self.budget.stats;
        match self.state {
            State::Held => {
                stats.refunded.fetch_add(self.tokens, Ordering::Relaxed);
                if let Some(service) = &self.service {
                    service.refunded.fetch_add(self.tokens, Ordering::Relaxed);
                }
                self.budget
                    .settle(self.key, self.tokens as f64, self.budget.start.elapsed());
            }
            State::Sent => {
                stats.kept.fetch_add(self.tokens, Ordering::Relaxed);
                if let Some(service) = &self.service {
                    service.kept.fetch_add(self.tokens, Ordering::Relaxed);
                }
            }
            State::Done => {}
        }
    }
}

/// Every `[token_budgets.NAME]`, in config order (routes hold indexes),
/// and the token counts of every service, in config order.
pub struct TokenBudgets {
    budgets: Vec<Arc<TokenBudget>>,
    services: Vec<(String, Arc<TokenCounts>)>,
}

impl TokenBudgets {
    /// `services`: the names of every service, in config order.
    pub fn new(budgets: &[config::TokenBudget], services: &[&str]) -> TokenBudgets {
        TokenBudgets::carry(budgets, services, None, None)
    }

    /// The budgets of a reloaded config: a budget whose name and settings
    /// are unchanged in `old` is the same budget (what its keys spent stays
    /// spent: a reload is no way to refill a budget); a new or changed one
    /// starts full. A service that stays keeps its token counts.
    pub fn carry(
        budgets: &[config::TokenBudget],
        services: &[&str],
        old: Option<&TokenBudgets>,
        link: Option<&Arc<Link>>,
    ) -> TokenBudgets {
        TokenBudgets {
            budgets: budgets
                .iter()
                .map(|b| {
                    old.and_then(|o| o.budgets.iter().find(|k| k.settings == *b))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(TokenBudget::with_link(b, link)))
                })
                .collect(),
            services: services
                .iter()
                .map(|s| {
                    let counts = old
                        .and_then(|o| o.services.iter().find(|(n, _)| n == s))
                        .map(|(_, c)| c.clone())
                        .unwrap_or_default();
                    (s.to_string(), counts)
                })
                .collect(),
        }
    }

    pub fn get(&self, index: usize) -> Option<&Arc<TokenBudget>> {
        self.budgets.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<TokenBudget>> {
        self.budgets.iter()
    }

    /// The token counts of the service with this index.
    pub fn service(&self, index: usize) -> Option<&Arc<TokenCounts>> {
        self.services.get(index).map(|(_, counts)| counts)
    }

    /// Every service's name and token counts.
    pub fn services(&self) -> impl Iterator<Item = (&str, &TokenCounts)> {
        self.services.iter().map(|(name, c)| (name.as_str(), &**c))
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// [`TokenBudget::sweep`] on every budget.
    pub fn sweep(&self) {
        for budget in &self.budgets {
            budget.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;

    fn budget(tokens_per_minute: u64, max_keys: usize) -> Arc<TokenBudget> {
        let settings = config::TokenBudget {
            name: "ai".into(),
            tokens_per_minute,
            key: KeySource::ClientIp,
            scope: Default::default(),
            max_tokens: tokens_per_minute,
            default_max_tokens: 1,
            max_body: 1024,
            prompt_bytes_per_token: 1,
            media_tokens: 0,
        };
        Arc::new(TokenBudget::with_max_keys(&settings, max_keys))
    }

    fn key(n: u64) -> Key {
        Key::Hashed(n)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn reservations_never_exceed_the_bucket() {
        let b = budget(6000, 16);
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(b.reserve_at(key(1), 1000, SEC).unwrap());
        }
        let refused = b.reserve_at(key(1), 1, SEC).unwrap_err();
        assert_eq!(refused.remaining, 0);
        // 6000 per minute is 100 per second: one token takes 10 ms.
        assert_eq!(refused.retry_after, Duration::from_millis(10));
        assert_eq!(refused.reset, Duration::from_secs(60));
        // Another key has its own bucket.
        assert!(b.reserve_at(key(2), 6000, SEC).is_ok());
        assert_eq!(b.stats().refused_exhausted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn settlement_refunds_the_unused_rest_and_charges_overuse() {
        let b = budget(6000, 16);
        let mut r = b.reserve_at(key(1), 1000, SEC).unwrap();
        r.mark_sent();
        r.settle_at(300, SEC);
        assert_eq!(b.standing_at(key(1), SEC).0, 5700);
        let mut r = b.reserve_at(key(1), 1000, SEC).unwrap();
        r.mark_sent();
        r.settle_at(5000, SEC);
        // 5700 - 5000: a response larger than its reservation is charged in full.
        assert_eq!(b.standing_at(key(1), SEC).0, 700);
        let stats = b.stats();
        assert_eq!(stats.settled.load(Ordering::Relaxed), 5300);
        assert_eq!(stats.refunded.load(Ordering::Relaxed), 700);
        assert_eq!(stats.reserved.load(Ordering::Relaxed), 2000);
        assert_eq!(stats.overrun.load(Ordering::Relaxed), 4000);
        assert_eq!(stats.held(), 0);
        let held = b.reserve_at(key(1), 500, SEC).unwrap();
        assert_eq!(b.stats().held(), 500);
        drop(held);
    }

    #[test]
    fn a_debt_is_owed_even_when_the_key_was_forgotten_meanwhile() {
        let b = budget(6000, 16);
        let mut r = b.reserve_at(key(1), 1000, SEC).unwrap();
        r.mark_sent();
        // A long stream: the bucket refills and the sweep forgets the key.
        b.sweep_at(SEC * 120);
        assert_eq!(b.keys(), 0);
        r.settle_at(5000, SEC * 120);
        assert_eq!(b.standing_at(key(1), SEC * 120).0, 2000);
        // Within the bound too: the fullest half goes to make room.
        let b = budget(6000, 2);
        let mut r = b.reserve_at(key(1), 1000, SEC).unwrap();
        r.mark_sent();
        b.sweep_at(SEC * 120);
        std::mem::forget(b.reserve_at(key(2), 10, SEC * 120).unwrap());
        std::mem::forget(b.reserve_at(key(3), 20, SEC * 120).unwrap());
        r.settle_at(7000, SEC * 120);
        assert_eq!(b.standing_at(key(1), SEC * 120).0, 0);
        assert!(b.keys() <= 2, "{}", b.keys());
        assert!(b.reserve_at(key(1), 1, SEC * 120).is_err());
    }

    #[test]
    fn a_key_in_debt_waits_until_it_has_paid() {
        let b = budget(6000, 16);
        let mut r = b.reserve_at(key(1), 6000, SEC).unwrap();
        r.mark_sent();
        r.settle_at(7000, SEC);
        let refused = b.reserve_at(key(1), 100, SEC).unwrap_err();
        assert_eq!(refused.remaining, 0);
        // 1000 of debt and 100 to reserve at 100 per second.
        assert_eq!(refused.retry_after, Duration::from_secs(11));
        assert!(b.reserve_at(key(1), 100, SEC * 12).is_ok());
    }

    #[test]
    fn the_bucket_refills_continuously_up_to_its_size() {
        let b = budget(6000, 16);
        let r = b.reserve_at(key(1), 6000, SEC);
        std::mem::forget(r);
        assert_eq!(b.standing_at(key(1), SEC * 2).0, 100);
        assert_eq!(b.standing_at(key(1), SEC * 31).0, 3000);
        assert_eq!(b.standing_at(key(1), SEC * 600).0, 6000);
    }

    #[test]
    fn unsettled_reservations_are_given_back_or_kept() {
        let b = budget(6000, 16);
        // Never sent (refused later, queue timeout...): all back.
        drop(b.reserve_at(key(1), 1000, Duration::ZERO).unwrap());
        assert_eq!(b.standing(key(1)).0, 6000);
        // Sent, no usage came back (error, client gone): spent.
        let mut r = b.reserve(key(1), 1000).unwrap();
        r.mark_sent();
        assert!(r.is_unsettled());
        drop(r);
        assert!(b.standing(key(1)).0 < 5100);
        assert_eq!(b.stats().kept.load(Ordering::Relaxed), 1000);
        assert_eq!(b.stats().refunded.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn services_count_their_reservations_outcomes() {
        let b = budget(6000, 16);
        let counts = Arc::new(TokenCounts::default());
        let mut r = b.reserve_at(key(1), 1000, SEC).unwrap();
        r.count_for(counts.clone());
        r.mark_sent();
        r.settle_at(400, SEC);
        let mut r = b.reserve_at(key(1), 500, SEC).unwrap();
        r.count_for(counts.clone());
        drop(r);
        let mut r = b.reserve_at(key(1), 200, SEC).unwrap();
        r.count_for(counts.clone());
        r.mark_sent();
        drop(r);
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(
            (
                n(&counts.reserved),
                n(&counts.settled),
                n(&counts.refunded),
                n(&counts.kept)
            ),
            (1700, 400, 1100, 200)
        );
    }

    #[test]
    fn the_key_table_stays_bounded_and_spares_the_emptiest_buckets() {
        let b = budget(6000, 8);
        for n in 0..8u64 {
            std::mem::forget(b.reserve_at(key(n), 100 * (n + 1), SEC).unwrap());
        }
        assert_eq!(b.keys(), 8);
        // A ninth key: no bucket has refilled, so the fullest half goes.
        std::mem::forget(b.reserve_at(key(100), 1, SEC).unwrap());
        assert!(b.keys() <= 5, "{}", b.keys());
        let top: Vec<Key> = b.top(3).into_iter().map(|(k, _)| k).collect();
        assert_eq!(top, vec![key(7), key(6), key(5)]);
        // A million distinct keys later the table is still within its bound.
        for n in 0..1_000_000u64 {
            std::mem::forget(b.reserve_at(key(1000 + n), 1, SEC).unwrap());
            assert!(b.keys() <= 8);
        }
    }

    #[test]
    fn refilled_keys_are_swept() {
        let b = budget(6000, 16);
        drop(b.reserve_at(key(1), 10, Duration::ZERO).unwrap());
        let mut r = b.reserve_at(key(2), 10, Duration::ZERO).unwrap();
        r.mark_sent();
        drop(r);
        b.sweep_at(Duration::from_millis(50));
        assert_eq!(b.keys(), 1);
        b.sweep_at(SEC);
        // Key 1 got its reservation back at once; key 2 refilled since.
        assert_eq!(b.keys(), 0);
    }
}
