//! Concurrency caps shared by every instance of a cluster (`scope =
//! "cluster"` in `[concurrency.NAME]`): each slot in flight is a lease in
//! Redis that expires unless its instance renews it, so a crashed instance
//! never leaks slots for longer than `[cluster] lease`.
//!
//! Keys, for a cluster named `NAME`, cap `CAP` and a request key `KEY`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `NAME:cap:CAP` | sorted set | every slot held: member `INSTANCE:ID`, score its expiry (ms on Redis's clock) |
//! | `NAME:cap:CAP:KEY` | sorted set | the slots held under one key (for `per_key`), same members and scores |
//!
//! Taking a slot is one script: it drops the expired members of both sets
//! and adds the new one only when both are below `max_in_flight` and
//! `per_key`. Giving it back is one script (`ZREM` from both). One
//! background task per cap renews every slot this instance holds every
//! third of the lease, in one script; a slot whose renewal fails (Redis
//! down) expires and may be taken by another instance while its request
//! still runs here, so an outage longer than the lease can let the cap be
//! overrun by what was in flight. A slot whose `ZREM` is lost (Redis down
//! at the end of the request, or a call that timed out after Redis took
//! the slot) comes back when its lease runs out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::cluster::{ClusterError, Link};
use crate::config;
use crate::limits::cluster::{ClusterLimit, Kind};
use crate::limits::key::Key;

/// How often a request waiting for a cluster slot asks Redis again (50 ms):
/// the queue of a cluster cap is polled, since a slot freed on another
/// instance sends no message here.
pub const CLUSTER_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Take a slot. KEYS: every slot, the key's slots. ARGV: max_in_flight,
/// per_key, member, lease (ms). Returns 1 (taken) or 0 (full).
const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) or redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 0
end
local deadline = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], deadline, ARGV[3])
redis.call('ZADD', KEYS[2], deadline, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
";

/// Give a slot back. KEYS: every slot, the key's slots. ARGV: member.
const RELEASE_SCRIPT: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

/// Renew slots still held. KEYS: every slot, then the key set of each
/// slot. ARGV: lease (ms), then the member of each slot (ARGV[i] goes with
/// KEYS[i]). A slot that has expired meanwhile is not brought back (`XX`).
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ARGV[1])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
  redis.call('ZADD', KEYS[i], 'XX', deadline, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// One cap's Redis side.
pub struct ClusterCap {
    /// Timeouts, fallback counting and the shared hash of this cap.
    pub limit: ClusterLimit,
    /// `NAME:cap:CAP`.
    all: String,
    max_in_flight: u32,
    per_key: u32,
    /// Unique per process and cap: `INSTANCE:RANDOM:`.
    member_prefix: String,
    next: AtomicU64,
    /// Slots this instance holds: member → the key's set.
    held: Mutex<HashMap<String, String>>,
    /// Requests of this instance waiting for a slot (at most `queue`).
    pub waiting: AtomicUsize,
    acquire: redis::Script,
    release: redis::Script,
    renew: redis::Script,
}

/// A slot held in Redis; given back when dropped.
pub struct Lease {
    cap: Arc<ClusterCap>,
    member: String,
    set: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cap.lock().remove(&self.member);
        let (cap, member, set) = (self.cap.clone(), self.member.clone(), self.set.clone());
        self.cap.limit.link.spawn(async move {
            let mut call = cap.release.prepare_invoke();
            call.key(&cap.all).key(&set).arg(&member);
            let done = cap.limit.link.redis.invoke::<i64>(&call).await;
            if let Err(e) = done {
                cap.limit.link.mark_down(&e);
            }
        });
    }
}

impl ClusterCap {
    /// The Redis side of `cap` on `link`'s cluster, and its renewal task
    /// (on the cluster runtime; it ends when the cap is dropped).
    pub fn new(link: Arc<Link>, cap: &config::Concurrency) -> Arc<ClusterCap> {
        let this = Arc::new(ClusterCap {
            all: link.redis.key(&format!("cap:{}", cap.name)),
            member_prefix: format!("{}:{:016x}:", link.instance, rand::random::<u64>()),
            limit: ClusterLimit::new(link.clone(), Kind::Concurrency),
            max_in_flight: cap.max_in_flight,
            per_key: cap.per_key,
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            acquire: redis::Script::new(ACQUIRE_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            renew: redis::Script::new(RENEW_SCRIPT),
        });
        link.spawn(renew_loop(Arc::downgrade(&this), link.lease / 3));
        this
    }

    /// The set of `key`'s slots: `NAME:cap:CAP:KEY`.
    pub fn key_set(&self, key: &Key) -> String {
        format!("{}:{key}", self.all)
    }

    /// A member name for one request's slot.
    pub fn member(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.member_prefix)
    }

    /// Takes a slot for `key` as `member` if both `max_in_flight` and
    /// `per_key` allow: one script call, bounded by `[cluster] timeout`.
    /// `Some(lease)`: taken; `None`: full.
    pub async fn try_acquire(
        self: &Arc<Self>,
        key: &Key,
        member: &str,
    ) -> Result<Option<Lease>, ClusterError> {
        let set = self.key_set(key);
        let mut call = self.acquire.prepare_invoke();
        call.key(&self.all)
            .key(&set)
            .arg(self.max_in_flight)
            .arg(self.per_key)
            .arg(member)
            .arg(lease_ms(self.limit.link.lease));
        let taken: i64 = self.limit.link.redis.invoke(&call).await?;
        if taken != 1 {
            return Ok(None);
        }
        self.lock().insert(member.to_string(), set.clone());
        Ok(Some(Lease {
            cap: self.clone(),
            member: member.to_string(),
            set,
        }))
    }

    /// Slots this instance holds now.
    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Renews every slot held, in one script call; `false`: none held, no call.
    async fn renew_all(&self) -> Result<bool, ClusterError> {
        let held: Vec<(String, String)> = self
            .lock()
            .iter()
            .map(|(m, s)| (m.clone(), s.clone()))
            .collect();
        if held.is_empty() {
            return Ok(false);
        }
        let mut call = self.renew.prepare_invoke();
        call.key(&self.all).arg(lease_ms(self.limit.link.lease));
        for (member, set) in &held {
            call.key(set).arg(member);
        }
        self.limit
            .link
            .redis
            .invoke::<i64>(&call)
            .await
            .map(|_| true)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, String>> {
        // A map of strings, changed by single inserts and removes: a
        // panic elsewhere cannot leave it half-written.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Renews a cap's slots every `every` until the cap is dropped.
async fn renew_loop(cap: Weak<ClusterCap>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cap) = cap.upgrade() else {
            return;
        };
        let since = cap.limit.link.since();
        match cap.renew_all().await {
            Ok(true) => cap.limit.link.mark_up(since),
            Ok(false) => {}
            Err(e) => cap.limit.link.mark_down(&e),
        }
    }
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}
