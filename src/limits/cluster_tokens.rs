//! Token budgets shared by every instance of a cluster (`scope =
//! "cluster"` in `[token_budgets.NAME]`): the same bucket as
//! [`crate::limits::tokens`], kept in Redis and changed by one Lua script
//! per reservation and one per settlement, so concurrent requests on
//! different instances can never together reserve more than the bucket
//! holds.
//!
//! Key, for a cluster named `NAME`, budget `BUDGET` and a request key `KEY`
//! (its display: an address, `hash:…`, `global`; never a header value):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `NAME:tokens:BUDGET:KEY` | hash | `level` (tokens in the bucket, may be below 0 when in debt) and `at` (when `level` was true, µs on Redis's clock) |
//!
//! A reservation takes its worst case out of the bucket at once (refilled
//! first to Redis's `TIME`, continuously, `tokens_per_minute` per minute);
//! the settlement gives back what the response did not use (or takes what
//! it used beyond). Nothing is held per reservation in Redis: a
//! reservation whose instance dies is never given back, which is what a
//! request that reached a backend and brought no usage back costs locally
//! too ("kept"), and the bucket refills from it within a minute like from
//! any spend. So a crash can never leak a budget for longer than that, and
//! no reservation needs an expiry. A key's entry expires once its bucket
//! would be full again.
//!
//! Settlements run in the background (the response's last bytes are not
//! held for them), bounded by `[cluster] timeout`; one that fails (Redis
//! down) is lost, so the key stays charged the whole reservation: the
//! budget errs on the side of the limit.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{ClusterError, Link};
use crate::config;
use crate::limits::cluster::{ClusterLimit, Kind};
use crate::limits::key::Key;

/// Reserve. KEYS: the bucket. ARGV: capacity (tokens), refill rate
/// (tokens per µs), tokens wanted. Returns `{1, remaining, 0, reset}` or
/// `{0, remaining, retry, reset}`: remaining tokens (0 when in debt), µs
/// until the wanted tokens are there, µs until the bucket is full.
const RESERVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(v[1]) or cap
local at = tonumber(v[2]) or now
if at < now then
  level = math.min(cap, level + (now - at) * rate)
  at = now
end
local remaining = math.max(0, math.floor(level))
if level < want then
  return {0, remaining, math.ceil((want - level) / rate), math.ceil((cap - level) / rate)}
end
level = level - want
redis.call('HSET', KEYS[1], 'level', string.format('%.6f', level), 'at', string.format('%d', at))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((cap - level) / rate / 1000) + 1))
return {1, math.max(0, math.floor(level)), 0, math.ceil((cap - level) / rate)}
";

/// Settle. KEYS: the bucket. ARGV: capacity, rate (as above), tokens to
/// give back (below 0: a debt). A bucket gone meanwhile counts as full: a
/// refund has nothing to fill, a debt is still owed. Returns 1.
const SETTLE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local give = tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(v[1])
local at = tonumber(v[2]) or now
if not level then
  if give >= 0 then
    return 1
  end
  level = cap
end
if at < now then
  level = math.min(cap, level + (now - at) * rate)
  at = now
end
level = math.min(cap, level + give)
if level >= cap then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'level', string.format('%.6f', level), 'at', string.format('%d', at))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((cap - level) / rate / 1000) + 1))
return 1
";

/// What Redis said about a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The tokens were taken out of the bucket.
    pub admitted: bool,
    /// Tokens in the bucket after it (0 when in debt).
    pub remaining: u64,
    /// Refused: until the bucket holds enough.
    pub retry_after: Duration,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// One budget's Redis side.
pub struct ClusterTokens {
    /// Timeouts, fallback counting and the shared hash of this budget.
    pub limit: ClusterLimit,
    /// `NAME:tokens:BUDGET:`, to which a key's display is appended.
    prefix: String,
    capacity: u64,
    /// Tokens per microsecond.
    rate: f64,
    reserve: redis::Script,
    settle: redis::Script,
}

impl ClusterTokens {
    /// The Redis side of `budget` on `link`'s cluster. Makes no call.
    pub fn new(link: Arc<Link>, budget: &config::TokenBudget) -> ClusterTokens {
        ClusterTokens {
            prefix: link.redis.key(&format!("tokens:{}:", budget.name)),
            limit: ClusterLimit::new(link, Kind::TokenBudget),
            capacity: budget.tokens_per_minute,
            rate: budget.tokens_per_minute as f64 / 60e6,
            reserve: redis::Script::new(RESERVE_SCRIPT),
            settle: redis::Script::new(SETTLE_SCRIPT),
        }
    }

    /// The Redis key `key` is charged under: `NAME:tokens:BUDGET:KEY`.
    pub fn redis_key(&self, key: &Key) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Reserves `tokens` under `key` if the bucket holds them: one script
    /// call, bounded by `[cluster] timeout` (the caller bounds it by
    /// `limit_timeout`).
    pub async fn reserve(&self, key: &Key, tokens: u64) -> Result<Answer, ClusterError> {
        let mut call = self.reserve.prepare_invoke();
        call.key(self.redis_key(key))
            .arg(self.capacity)
            .arg(self.rate)
            .arg(tokens);
        let (admitted, remaining, retry, reset): (u8, i64, i64, i64) =
            self.limit.link.redis.invoke(&call).await?;
        let us = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
        Ok(Answer {
            admitted: admitted == 1,
            remaining: u64::try_from(remaining).unwrap_or(0),
            retry_after: round_up_ms(us(retry)),
            reset: round_up_ms(us(reset)),
        })
    }

    /// Gives `give_back` tokens back to `key`'s bucket (below 0: charges
    /// them): one script call, bounded by `[cluster] timeout`.
    pub async fn settle(&self, key: &Key, give_back: f64) -> Result<(), ClusterError> {
        let mut call = self.settle.prepare_invoke();
        call.key(self.redis_key(key))
            .arg(self.capacity)
            .arg(self.rate)
            .arg(give_back);
        self.limit.link.redis.invoke::<i64>(&call).await.map(drop)
    }

    /// [`ClusterTokens::settle`] in the background, on the cluster runtime.
    pub fn settle_later(self: &Arc<Self>, key: Key, give_back: f64) {
        if give_back == 0.0 {
            return;
        }
        let this = self.clone();
        let since = self.limit.link.since();
        self.limit.link.spawn(async move {
            match this.settle(&key, give_back).await {
                Ok(()) => this.limit.link.mark_up(since),
                Err(e) => this.limit.link.mark_down(&e),
            }
        });
    }
}

/// `d` rounded up to whole milliseconds, as the local budget reports.
fn round_up_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_micros().div_ceil(1000).min(u128::from(u64::MAX)) as u64)
}
