//! What every limit with `scope = "cluster"` shares: asking Redis for a
//! request within `[cluster] limit_timeout`, falling back to this
//! instance's share of the limit when Redis cannot answer, and the secret
//! header keys are hashed under so every instance counts a client alike.
//!
//! # Falling back (issue 13 point 3)
//!
//! A request never waits on Redis longer than `limit_timeout`. When a call
//! fails or times out, the request is judged by a local limit sized to this
//! instance's share: the cluster-wide figure (rate and burst, token budget,
//! concurrency cap) divided by the instances live at the last look
//! ([`Link::live_instances`]), at least 1. The outage is logged once
//! ([`Link::mark_down`], and once more when it ends), never per request;
//! every request judged locally is counted
//! (`switchyard_cluster_limit_fallbacks_total{kind,limit}`). While Redis is
//! known to be down, requests go straight to the local share without
//! paying the timeout, except one probe per limit every
//! [`PROBE_INTERVAL`], which finds out when Redis is back.
//!
//! What was counted locally during an outage is not pushed to Redis when
//! it returns: the shared counts simply go on from what Redis holds.
//!
//! # The shared hash key
//!
//! A header key (an API key) is hashed, never stored. A local limit hashes
//! under a per-process random key; a cluster limit needs one every
//! instance shares: 32 random bytes kept in Redis under
//! `NAME:limits:secret`, created once by whichever instance asks first
//! (`SET NX`) and read by the others at their first request with a header
//! key. Until an instance knows it, its header keys are judged locally
//! (and counted as fallbacks). The secret is never logged.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterError, Link};
use crate::limits::key::{Key, SharedHash};

/// How often a limit lets one request ask Redis while it is known to be
/// down (1 s): the rest are judged locally at once.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes of the shared hash secret (32: the HMAC-SHA-256 block's half,
/// far beyond guessing).
pub const SECRET_LEN: usize = 32;

/// Creates the secret unless it exists, and returns it. KEYS: the secret.
/// ARGV: a new random secret (hex).
const SECRET_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

/// Which family of limits, as the metrics' `kind` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[rate_limits.NAME]`.
    Rate,
    /// `[concurrency.NAME]`.
    Concurrency,
    /// `[token_budgets.NAME]`.
    TokenBudget,
}

impl Kind {
    /// The `kind` label value, as `switchyard_limit_admissions_total` has it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rate => "rate_limit",
            Kind::Concurrency => "concurrency",
            Kind::TokenBudget => "token_budget",
        }
    }
}

/// The cluster side of one limit.
pub struct ClusterLimit {
    /// The cluster this limit is shared through.
    pub link: Arc<Link>,
    kind: Kind,
    /// When this limit last let a request probe a Redis known to be down,
    /// in ms since `start`; `u64::MAX`: never.
    last_probe: AtomicU64,
    start: Instant,
    /// Requests judged locally since start.
    fallbacks: AtomicU64,
    shared: Arc<SharedHash>,
    /// A read of the secret is under way (one at a time).
    fetching: Arc<AtomicBool>,
    /// When the secret was last asked for, in ms since `start`.
    last_fetch: AtomicU64,
}

impl ClusterLimit {
    /// The cluster side of a limit of `kind` on `link`. Makes no call.
    pub fn new(link: Arc<Link>, kind: Kind) -> ClusterLimit {
        ClusterLimit {
            link,
            kind,
            last_probe: AtomicU64::new(u64::MAX),
            start: Instant::now(),
            fallbacks: AtomicU64::new(0),
            shared: Arc::new(SharedHash::default()),
            fetching: Arc::new(AtomicBool::new(false)),
            last_fetch: AtomicU64::new(u64::MAX),
        }
    }

    /// Which family the limit belongs to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The hash header keys of this limit are computed under.
    pub fn shared_hash(&self) -> Arc<SharedHash> {
        self.shared.clone()
    }

    /// Requests judged by the local share since start.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// `n` (a cluster-wide figure) divided by the live instances, at least 1.
    pub fn share(&self, n: u64) -> u64 {
        (n / self.link.live_instances() as u64).max(1)
    }

    /// Runs `call` (one Redis script for the request counted under `key`)
    /// within `limit_timeout`. `None`: judge the request locally (counted
    /// as a fallback): Redis failed or is known down (outside a probe), or
    /// `key` is a header key hashed before the shared secret was known.
    pub async fn ask<T>(
        &self,
        key: &Key,
        call: impl Future<Output = Result<T, ClusterError>>,
    ) -> Option<T> {
        let answer = if !key.is_cluster_wide() {
            self.learn_secret();
            None
        } else if !self.may_ask() {
            None
        } else {
            self.bounded(call).await
        };
        if answer.is_none() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// `call` within `limit_timeout`; marks the link up or down.
    pub async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, ClusterError>>,
    ) -> Option<T> {
        let link = &self.link;
        let since = link.since();
        let result = match tokio::time::timeout(link.limit_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::Timeout {
                redis: link.redis.url().to_string(),
                after: link.limit_timeout,
            }),
        };
        match result {
            Ok(v) => {
                link.mark_up(since);
                Some(v)
            }
            Err(e) => {
                link.mark_down(&e);
                None
            }
        }
    }

    /// Whether a request may ask Redis now: always while it is up; while
    /// it is down, one request per [`PROBE_INTERVAL`].
    fn may_ask(&self) -> bool {
        self.link.is_up() || self.tick(&self.last_probe)
    }

    /// Takes the turn kept in `last` if [`PROBE_INTERVAL`] has passed.
    fn tick(&self, last: &AtomicU64) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let was = last.load(Ordering::Relaxed);
        let due = was == u64::MAX || now.saturating_sub(was) >= PROBE_INTERVAL.as_millis() as u64;
        due && last
            .compare_exchange(was, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Starts reading the shared secret (creating it if no instance has),
    /// at most one read at a time and one per [`PROBE_INTERVAL`].
    fn learn_secret(&self) {
        if self.shared.is_known() || !self.tick(&self.last_fetch) {
            return;
        }
        if self.fetching.swap(true, Ordering::Relaxed) {
            return;
        }
        let (link, shared, fetching) = (
            self.link.clone(),
            self.shared.clone(),
            self.fetching.clone(),
        );
        self.link.spawn(async move {
            match read_secret(&link).await {
                Ok(secret) => shared.set(&secret),
                Err(e) => tracing::warn!(
                    cause = %e,
                    "cannot read the cluster's shared hash key yet: header keys are judged locally"
                ),
            }
            fetching.store(false, Ordering::Relaxed);
        });
    }

    /// Reads the shared secret now (tests, and limits that want it before
    /// their first request).
    pub async fn load_secret(&self) -> Result<(), ClusterError> {
        let secret = read_secret(&self.link).await?;
        self.shared.set(&secret);
        Ok(())
    }
}

/// Reads (and creates, if none exists) the shared hash secret.
async fn read_secret(link: &Link) -> Result<Vec<u8>, ClusterError> {
    let script = redis::Script::new(SECRET_SCRIPT);
    let mut fresh = [0u8; SECRET_LEN];
    rand::fill(&mut fresh);
    let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
    let mut call = script.prepare_invoke();
    call.key(link.redis.key("limits:secret")).arg(hex);
    let secret: Vec<u8> = link.redis.invoke(&call).await?;
    if secret.len() < SECRET_LEN {
        return Err(ClusterError::Corrupt {
            redis: link.redis.url().to_string(),
            key: link.redis.key("limits:secret"),
            detail: format!("shorter than {SECRET_LEN} bytes"),
        });
    }
    Ok(secret)
}
