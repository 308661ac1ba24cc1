//! Rate limits shared by every instance of a cluster (issue 13 point 2):
//! the same GCRA as the local limits (`limits::rate`, governor),
//! with each key's state kept in Redis and checked by ONE Lua script per
//! request, so N instances together admit what one instance would.
//!
//! Key, for a cluster named `NAME`, limit `LIMIT` and a request key `KEY`
//! (the text of the limit's key, `limits::key::Key`'s display: `192.0.2.1`,
//! `2001:db8::/64`, `hash:…`, `global`; never a raw header value). The
//! limits sit above the cluster module, so this module takes a key's text
//! and never imports them:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `NAME:rate:LIMIT:KEY` | string (integer) | the key's theoretical arrival time (TAT), microseconds since the Unix epoch on Redis's clock |
//!
//! GCRA in short: with the emission interval `T = per / requests` and the
//! tolerance `tau = burst × T`, a request at `now` conforms when
//! `TAT - tau <= now` (an absent or past TAT counts as `now`); it then moves
//! the TAT to `max(TAT, now) + T`. A fresh key so gets `burst + 1` requests
//! at once, then one per `T`, exactly as `[rate_limits.NAME]` does locally.
//! A refused request changes nothing (it does not use up budget) and
//! learns its wait, `TAT - tau - now`, for `Retry-After`.
//!
//! The key's expiry is set to the time its bucket takes to refill
//! (`TAT - now`): once it has passed, the key is indistinguishable from
//! one never seen, so Redis drops it and idle keys cost nothing.
//!
//! How the limits use it (scope, fallback while Redis is down, the shared
//! hash key of header keys): `limits::cluster`.

use std::sync::Arc;
use std::time::Duration;

use super::{ClusterError, RedisState};
use std::fmt::Display;

use crate::config;

/// The check. KEYS: the rate key. ARGV: the emission interval `T` and the
/// tolerance `tau`, both in microseconds (integers). Returns `{1, 0}`
/// (admitted) or `{0, wait}` (refused; wait in microseconds).
///
/// Time comes from `redis.call('TIME')`, Redis's own clock, so instances
/// whose clocks disagree still share one timeline. (Redis 5 and later
/// replicate a script's effects, not the script, so calling TIME before a
/// write is allowed.) Microseconds since the epoch (~1.8e15) stay below
/// 2^53, so Lua's doubles hold them exactly; `%d` writes them as integers.
const CHECK_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then
  tat = now
end
local allowed_at = tat - tau
if now < allowed_at then
  return {0, allowed_at - now}
end
local new = tat + interval
local ttl_ms = math.ceil((new - now) / 1000)
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', string.format('%d', ttl_ms))
return {1, 0}
";

/// What a cluster check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request conforms; it has been counted.
    Allowed,
    /// Over the rate; nothing was counted. `wait`: how long until this key
    /// may send again (for `Retry-After`, RFC 9110 §10.2.3), microsecond
    /// precision.
    Refused { wait: Duration },
}

/// One `[rate_limits.NAME]` enforced across the cluster.
pub struct ClusterRate {
    state: Arc<RedisState>,
    /// `NAME:rate:LIMIT:`, to which a key's display is appended.
    prefix: String,
    /// `T`, the emission interval, in microseconds (at least 1).
    interval_us: u64,
    /// `tau = burst × T`, in microseconds.
    tolerance_us: u64,
    script: redis::Script,
}

impl ClusterRate {
    /// The cluster-wide form of `limit` on `state`'s Redis (sharing its
    /// connection and `[cluster] timeout`). Makes no call.
    pub fn new(state: Arc<RedisState>, limit: &config::RateLimit) -> ClusterRate {
        // Validation keeps requests >= 1; max(1) keeps T non-zero anyway.
        let interval = limit.per / limit.requests.max(1);
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        ClusterRate {
            prefix: state.key(&format!("rate:{}:", limit.name)),
            state,
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(limit.burst)),
            script: redis::Script::new(CHECK_SCRIPT),
        }
    }

    /// The Redis key `key` (a limit key's text) is counted under:
    /// `NAME:rate:LIMIT:KEY`.
    pub fn redis_key(&self, key: impl Display) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Counts one request under `key` if it conforms: one script call,
    /// bounded by `[cluster] timeout` (connecting included). Errors:
    /// [`ClusterError::Unreachable`], [`ClusterError::Timeout`],
    /// [`ClusterError::Auth`], [`ClusterError::Redis`] (e.g. the key holds
    /// another type; a non-integer string counts as a fresh key); the caller falls back to a local limit.
    pub async fn check(&self, key: impl Display) -> Result<Decision, ClusterError> {
        let mut call = self.script.prepare_invoke();
        call.key(self.redis_key(key))
            .arg(self.interval_us)
            .arg(self.tolerance_us);
        let (allowed, wait_us): (u8, u64) = self.state.invoke(&call).await?;
        Ok(if allowed == 1 {
            Decision::Allowed
        } else {
            Decision::Refused {
                wait: Duration::from_micros(wait_us),
            }
        })
    }

    /// `T`, the time one request's budget takes to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us)
    }
}
