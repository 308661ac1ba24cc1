//! The state a cluster shares in Redis: every service's active and
//! previous color, weights and maintenance (a [`SavedState`], as the file
//! store keeps it) with a version number, the history of changes, and the
//! channel that tells the other instances a change happened.
//!
//! Keys, for a cluster named `NAME` (`[cluster] name`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `NAME:version` | string (integer) | the state's version, 1 and up; absent: never seeded |
//! | `NAME:epoch` | string | the lineage that version counts in (see below) |
//! | `NAME:state` | string (JSON) | the [`SavedState`] of that version |
//! | `NAME:settling` | string | present from a seed until the first change after it |
//! | `NAME:history` | stream | one entry per change: `service`, `event` (an [`Event`] as JSON) |
//! | `NAME:changes` | pub/sub channel | the new version, after every change |
//! | `NAME:instances` | sorted set | live instances, scored by when their entry expires (ms) |
//! | `NAME:instance-info` | hash | instance → what it serves (JSON: version, epoch, local) |
//!
//! Every state write is ONE Lua script (Redis runs a script atomically:
//! no other command runs in between), so the version, the epoch, the state
//! and the message never disagree. A change names the version and epoch
//! it was computed from and is refused when Redis holds another (compare
//! and set): two instances switching at once cannot both win.
//!
//! Every call is bounded by `[cluster] timeout` (connecting included) and
//! every failure is a [`ClusterError`] whose message never holds the
//! password.
//!
//! # Versions, epochs, and a Redis that lost its data
//!
//! Versions only grow: each change adds one. The *epoch* is a random id
//! written by whoever seeds an empty Redis; every instance keeps, with its
//! local `state.json`, the version and epoch it serves ([`Stamp`]).
//!
//! A seed ([`RedisState::seed`]) offers an instance's state under its own
//! version (never back to 1), and Redis takes it when
//! 1. it holds no state (first start, or restarted without persistence):
//!    the offer is written under a new epoch, and `settling` is set;
//! 2. or `settling` is still set (no change was made since that seed) and
//!    the offer's version is higher: so of the instances re-seeding after a
//!    loss, the one holding the newest state wins, not the first to
//!    reconnect;
//! 3. or the offer has Redis's epoch and a higher version: Redis went
//!    back in time (restored from an older dump), or this instance made a
//!    change locally while Redis was unreachable and Redis still holds the
//!    version that change was made from (offered as that version + 1, so a
//!    change someone else pushed meanwhile wins instead).
//!
//! An instance puts Redis's state in force when its epoch differs from the
//! one served (after offering its own, so rule 2 can pick the newest) or
//! its version is higher. An older state therefore never replaces a newer
//! one; the one case where a state made later can lose is a change forced
//! on an instance cut off from Redis while another instance changed the
//! same Redis: the change Redis holds stands, and the forced one is logged
//! as overruled.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};

use super::Password;
use crate::config::Cluster;
use crate::store::{Event, SavedState, Stamp, HISTORY_LIMIT};

/// Compare and set: writes the state and publishes the new version, only
/// when Redis holds the expected version and epoch (never on an empty
/// Redis: that takes a seed). Ends `settling`.
/// KEYS: version, epoch, state, settling. ARGV: expected version,
/// expected epoch, state JSON, channel.
/// Returns `{1, new, epoch}` or, on a conflict, `{0, current, epoch}`; a
/// version that is not a number is an error reply `MALFORMED` (else Lua's
/// nil would cut the reply short and the client report a shape mismatch).
const CHANGE_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if not current then
  return redis.error_reply('MALFORMED not a number')
end
local epoch = redis.call('GET', KEYS[2]) or ''
if current == 0 or current ~= tonumber(ARGV[1]) or epoch ~= ARGV[2] then
  return {0, current, epoch}
end
local new = current + 1
redis.call('SET', KEYS[1], new)
redis.call('SET', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[4], new)
return {1, new, epoch}
";

/// Seeding, by the three rules in the module's note. KEYS: version,
/// epoch, state, settling. ARGV: offered version, state JSON, the
/// offerer's epoch ('' for none), a fresh epoch, channel.
/// Returns `{1, version, epoch}` when the offer was taken, else
/// `{0, current, epoch}`; `MALFORMED` as the change script.
const SEED_SCRIPT: &str = r"
local offered = tonumber(ARGV[1])
local stored = redis.call('GET', KEYS[1])
if not stored then
  redis.call('SET', KEYS[1], offered)
  redis.call('SET', KEYS[2], ARGV[4])
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('SET', KEYS[4], '1')
  redis.call('PUBLISH', ARGV[5], offered)
  return {1, offered, ARGV[4]}
end
stored = tonumber(stored)
if not stored then
  return redis.error_reply('MALFORMED not a number')
end
local epoch = redis.call('GET', KEYS[2]) or ''
local settling = redis.call('EXISTS', KEYS[4]) == 1
if offered > stored and (settling or epoch == ARGV[3]) then
  redis.call('SET', KEYS[1], offered)
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('PUBLISH', ARGV[5], offered)
  return {1, offered, epoch}
end
return {0, stored, epoch}
";

/// A heartbeat: this instance's entry, renewed, and the live ones.
/// KEYS: instances, instance-info. ARGV: instance, info JSON, lease (ms).
/// Uses Redis's clock, so instances' clocks need not agree. Returns the
/// live instances' info, `{id, info, id, info, ...}`. Both keys only
/// hold what the heartbeats of the last lease wrote: one of another type
/// (written by hand) is dropped and rebuilt, rather than failing every
/// heartbeat, and with it the sync, until someone deletes it.
const HEARTBEAT_SCRIPT: &str = r"
for i, kind in ipairs({'zset', 'hash'}) do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= kind and t ~= 'none' then
    redis.call('DEL', KEYS[i])
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(live) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
end
return out
";

/// A state and the version and epoch Redis holds it under.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub epoch: String,
    pub state: SavedState,
}

/// What a seed did (see the module's note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// Whether the offer was taken.
    pub won: bool,
    /// The version and epoch Redis holds now.
    pub version: u64,
    pub epoch: String,
}

/// Why a Redis call failed. No message holds the password (or the URL's
/// user part: URLs with one are refused by `switchyard check`).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis {redis} is unreachable: {detail}")]
    Unreachable { redis: String, detail: String },
    #[error("redis {redis} did not answer within {} ms", after.as_millis())]
    Timeout { redis: String, after: Duration },
    #[error(
        "redis {redis} refused the password: check cluster.password_file or cluster.password_env \
         against the server's requirepass ({detail})"
    )]
    Auth { redis: String, detail: String },
    #[error(
        "the cluster state changed meanwhile (this instance served version {expected}, redis \
         holds {current}); this instance now serves redis's state: check it and retry"
    )]
    Conflict { expected: u64, current: u64 },
    #[error(
        "cannot use cluster.ca_file {}: {detail}",
        crate::config::show_path(path)
    )]
    CaFile {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("redis {redis} answered with an error: {detail}")]
    Redis { redis: String, detail: String },
    #[error("redis {redis} holds a malformed {key}: {detail}")]
    Corrupt {
        redis: String,
        key: String,
        detail: String,
    },
}

/// One cluster's shared state in one Redis.
pub struct RedisState {
    client: Client,
    /// The URL as configured (no password), for messages.
    redis: String,
    name: String,
    timeout: Duration,
    /// The connection every call shares (it multiplexes), made on first
    /// use and dropped after a connection error so the next call makes a
    /// new one.
    conn: Mutex<Option<MultiplexedConnection>>,
    change: redis::Script,
    seed: redis::Script,
    heartbeat: redis::Script,
}

impl RedisState {
    /// A handle on `cluster`'s state; connects on the first call, so this
    /// fails only on a URL the client cannot use or an unreadable
    /// `ca_file` (with one, `rediss://` trusts its CAs instead of the
    /// system's roots).
    pub fn new(cluster: &Cluster, password: Option<&Password>) -> Result<RedisState, ClusterError> {
        let redis = cluster.redis.clone();
        let bad = |e: RedisError| ClusterError::Unreachable {
            redis: redis.clone(),
            detail: e.to_string(),
        };
        let mut info = cluster.redis.as_str().into_connection_info().map_err(bad)?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &cluster.ca_file {
            None => Client::open(info).map_err(bad)?,
            Some(path) => {
                let ca_err = |detail: String| ClusterError::CaFile {
                    path: path.clone(),
                    detail,
                };
                let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                Client::build_with_tls(info, certs).map_err(|e| ca_err(e.to_string()))?
            }
        };
        Ok(RedisState {
            client,
            redis,
            name: cluster.name.clone(),
            timeout: cluster.timeout,
            conn: Mutex::new(None),
            change: redis::Script::new(CHANGE_SCRIPT),
            seed: redis::Script::new(SEED_SCRIPT),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
        })
    }

    /// `NAME:what`: a key of this cluster (other cluster modules share it).
    pub(crate) fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.name)
    }

    /// The Redis URL as configured (it holds no password).
    pub fn url(&self) -> &str {
        &self.redis
    }

    /// The channel a change's version is published on: `NAME:changes`.
    pub fn channel(&self) -> String {
        self.key("changes")
    }

    /// The state, its version and epoch; `None` when Redis holds none
    /// (never seeded, or emptied by a restart). One call (MGET).
    pub async fn read(&self) -> Result<Option<Versioned>, ClusterError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.key("version"))
            .arg(self.key("epoch"))
            .arg(self.key("state"));
        let (version, epoch, state): (Option<String>, Option<String>, Option<String>) =
            self.query(&cmd).await?;
        let version = self.parse_version(version)?;
        let (Some(version), Some(state)) = (version, state) else {
            return Ok(None);
        };
        let state = serde_json::from_str(&state).map_err(|e| self.corrupt("state", e))?;
        Ok(Some(Versioned {
            version,
            epoch: epoch.unwrap_or_default(),
            state,
        }))
    }

    /// Only the version and epoch (the periodic check: one small MGET).
    pub async fn version(&self) -> Result<Option<(u64, String)>, ClusterError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.key("version")).arg(self.key("epoch"));
        let (version, epoch): (Option<String>, Option<String>) = self.query(&cmd).await?;
        let version = self.parse_version(version)?;
        Ok(version.map(|v| (v, epoch.unwrap_or_default())))
    }

    /// `NAME:version` as read: absent, or a number; anything else (a key
    /// written by hand) is [`ClusterError::Corrupt`] naming the key.
    fn parse_version(&self, raw: Option<String>) -> Result<Option<u64>, ClusterError> {
        raw.map(|v| {
            v.parse()
                .map_err(|_| self.corrupt("version", format!("{v:?} is not a number")))
        })
        .transpose()
    }

    /// Writes `state` when Redis holds `expected` (version and epoch) and
    /// publishes the new version. Returns the new version, or
    /// [`ClusterError::Conflict`] with the version Redis holds (0: none;
    /// an empty Redis takes a [`RedisState::seed`], not a change).
    pub async fn change(&self, expected: &Stamp, state: &SavedState) -> Result<u64, ClusterError> {
        let state = self.state_json(state)?;
        let mut call = self.change.prepare_invoke();
        call.key(self.key("version"))
            .key(self.key("epoch"))
            .key(self.key("state"))
            .key(self.key("settling"))
            .arg(expected.version)
            .arg(&expected.epoch)
            .arg(state)
            .arg(self.channel());
        let (won, version, _epoch): (u8, u64, String) = self.invoke(&call).await?;
        if won == 1 {
            Ok(version)
        } else {
            Err(ClusterError::Conflict {
                expected: expected.version,
                current: version,
            })
        }
    }

    /// Offers `state` as of `stamp` (its [`Stamp::offered`] version, its
    /// epoch; `None`: a state that was never in a cluster, offered as
    /// version 1). Taken by the rules in the module's note; of several
    /// instances seeding an empty Redis at once exactly one wins.
    ///
    /// An epoch is `NAME:` and 16 random hex digits: a stamp from another
    /// cluster (a copied `state_dir`, a renamed cluster) is offered as a
    /// state that was never in this one, so its version, counted in
    /// another sequence, cannot beat this cluster's states.
    pub async fn seed(
        &self,
        stamp: Option<&Stamp>,
        state: &SavedState,
    ) -> Result<Seeded, ClusterError> {
        let state = self.state_json(state)?;
        let ours = format!("{}:", self.name);
        let stamp = stamp.filter(|s| s.epoch.is_empty() || s.epoch.starts_with(&ours));
        let offered = stamp.map_or(1, Stamp::offered);
        let epoch = stamp.map_or("", |s| s.epoch.as_str());
        let fresh = format!("{ours}{:016x}", rand::random::<u64>());
        let mut call = self.seed.prepare_invoke();
        call.key(self.key("version"))
            .key(self.key("epoch"))
            .key(self.key("state"))
            .key(self.key("settling"))
            .arg(offered)
            .arg(state)
            .arg(epoch)
            .arg(fresh)
            .arg(self.channel());
        let (won, version, epoch): (u8, u64, String) = self.invoke(&call).await?;
        Ok(Seeded {
            won: won == 1,
            version,
            epoch,
        })
    }

    /// Appends `event` to the history stream (trimmed to about
    /// [`HISTORY_LIMIT`] entries).
    pub async fn append_history(&self, event: &Event) -> Result<(), ClusterError> {
        let json = serde_json::to_string(event).map_err(|e| self.corrupt("history", e))?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.key("history"))
            .arg("MAXLEN")
            .arg("~")
            .arg(HISTORY_LIMIT)
            .arg("*")
            .arg("service")
            .arg(&event.service)
            .arg("event")
            .arg(json);
        let _id: String = self.query(&cmd).await?;
        Ok(())
    }

    /// Renews `instance`'s entry (expiring after `lease`) with `info` (what
    /// it serves, JSON) and returns every live instance with its info,
    /// sorted by name. One script, on Redis's clock.
    pub async fn heartbeat(
        &self,
        instance: &str,
        info: &str,
        lease: Duration,
    ) -> Result<Vec<(String, String)>, ClusterError> {
        let mut call = self.heartbeat.prepare_invoke();
        call.key(self.key("instances"))
            .key(self.key("instance-info"))
            .arg(instance)
            .arg(info)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let flat: Vec<String> = self.invoke(&call).await?;
        let mut live: Vec<(String, String)> = flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        live.sort();
        Ok(live)
    }

    /// Removes `instance`'s liveness entry (a clean shutdown), so the
    /// others' shares grow at once rather than after the lease.
    pub async fn leave(&self, instance: &str) -> Result<(), ClusterError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(self.key("instances"), instance)
            .hdel(self.key("instance-info"), instance);
        self.bounded(|mut conn| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut conn).await }
        })
        .await
    }

    /// The JSON of `state` as Redis keeps it: without the local stamp.
    fn state_json(&self, state: &SavedState) -> Result<String, ClusterError> {
        let shared = SavedState {
            cluster: None,
            ..state.clone()
        };
        serde_json::to_string(&shared).map_err(|e| self.corrupt("state", e))
    }

    /// The newest `limit` history entries (at most [`HISTORY_LIMIT`]),
    /// oldest first; with `service`, only that service's among them.
    /// Entries that are not an event are skipped (and logged).
    pub async fn history(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, ClusterError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.key("history"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit.min(HISTORY_LIMIT));
        type Entry = (String, Vec<(String, String)>);
        let entries: Vec<Entry> = self.query(&cmd).await?;
        let mut events = Vec::with_capacity(entries.len());
        let mut skipped = Vec::new();
        for (id, fields) in entries.into_iter().rev() {
            let mut svc = None;
            let mut event = None;
            for (k, v) in fields {
                match k.as_str() {
                    "service" => svc = Some(v),
                    "event" => event = Some(v),
                    _ => {}
                }
            }
            if service.is_some_and(|s| svc.as_deref() != Some(s)) {
                continue;
            }
            match event.map(|e| serde_json::from_str(&e)) {
                Some(Ok(event)) => events.push(event),
                // One bad entry (written by hand, or by another program)
                // must not hide every good one: skipped, and said.
                _ => skipped.push(id),
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(key = %self.key("history"), entries = ?skipped, "history entries that are not switchyard events skipped");
        }
        Ok(events)
    }

    /// Subscribes to `NAME:changes`: the stream yields each published
    /// version and ends when the connection is lost (the caller
    /// resubscribes, then reads, to catch what it missed).
    pub async fn subscribe(
        &self,
    ) -> Result<impl futures_util::Stream<Item = u64> + Send + 'static, ClusterError> {
        let channel = self.channel();
        let subscribed = tokio::time::timeout(self.timeout, async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Err(_) => return Err(self.timed_out()),
            Ok(Err(e)) => return Err(self.error(e)),
            Ok(Ok(p)) => p,
        };
        Ok(pubsub
            .into_on_message()
            .filter_map(|msg| async move { msg.get_payload::<u64>().ok() }))
    }

    /// Runs a prepared script call (EVALSHA, loading the script on
    /// NOSCRIPT) on the shared connection, bounded like every call
    /// ([`RedisState::bounded`]).
    pub(crate) async fn invoke<T: redis::FromRedisValue + Send>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        self.bounded(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await
    }

    async fn query<T: redis::FromRedisValue + Send>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, ClusterError> {
        self.bounded(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs `f` on the shared connection (made first if needed), the whole
    /// within the timeout; a failed connection is dropped for the next call.
    ///
    /// A connection kept from before a Redis restart fails on its first
    /// use (broken pipe): then `f` runs once more on a new connection,
    /// still within the same timeout. For a `change` whose first attempt
    /// did reach Redis, that second run answers a conflict naming the
    /// version it made, never a second write (the script compares versions).
    pub(crate) async fn bounded<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let run = async {
            let (conn, kept) = self.connection().await?;
            match f(conn).await {
                Err(e) if kept && (e.is_io_error() || e.is_connection_dropped()) => {
                    self.reset();
                    let (conn, _) = self.connection().await?;
                    f(conn).await
                }
                done => done,
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.reset();
                }
                Err(self.error(e))
            }
            Err(_) => {
                self.reset();
                Err(self.timed_out())
            }
        }
    }

    /// The shared connection, and whether it was kept from an earlier call.
    async fn connection(&self) -> Result<(MultiplexedConnection, bool), RedisError> {
        if let Some(c) = self.lock().as_ref() {
            return Ok((c.clone(), true));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.lock() = Some(conn.clone());
        Ok((conn, false))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        // Only an Option is kept behind it: a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the shared connection: the next call makes a new one (on
    /// the runtime it runs on; see the start-up sync in `lib.rs`).
    pub(crate) fn reset(&self) {
        *self.lock() = None;
    }

    fn timed_out(&self) -> ClusterError {
        ClusterError::Timeout {
            redis: self.redis.clone(),
            after: self.timeout,
        }
    }

    fn corrupt(&self, key: &str, detail: impl ToString) -> ClusterError {
        ClusterError::Corrupt {
            redis: self.redis.clone(),
            key: self.key(key),
            detail: detail.to_string(),
        }
    }

    /// Maps a client error onto what an operator can act on.
    fn error(&self, e: RedisError) -> ClusterError {
        let redis = self.redis.clone();
        let detail = e.to_string();
        // The state scripts' own refusal of a version that is not a number.
        if e.code() == Some("MALFORMED") {
            return self.corrupt("version", e.detail().unwrap_or("not a number"));
        }
        let auth = matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
        if auth {
            ClusterError::Auth { redis, detail }
        } else if e.is_timeout() {
            self.timed_out()
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            ClusterError::Unreachable { redis, detail }
        } else {
            ClusterError::Redis { redis, detail }
        }
    }
}
