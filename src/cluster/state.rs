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
//! | `NAME:state` | string (JSON) | the [`SavedState`] of that version |
//! | `NAME:history` | stream | one entry per change: `service`, `event` (an [`Event`] as JSON) |
//! | `NAME:changes` | pub/sub channel | the new version, after every change |
//!
//! Every write is ONE Lua script (Redis runs a script atomically: no other
//! command runs in between), so the version, the state, the history entry
//! and the message never disagree. A change names the version it was
//! computed from and is refused when Redis holds another (compare and set):
//! two instances switching at once cannot both win.
//!
//! Every call is bounded by `[cluster] timeout` (connecting included) and
//! every failure is a [`ClusterError`] whose message never holds the
//! password.
//!
//! # Versions across a Redis that lost its data (design note, not built)
//!
//! A Redis restarted without persistence comes back empty, and a plain
//! "seed with version 1" would then let the state of whichever instance
//! reconnects first win, even an old one. The plan for the next session:
//!
//! - Each instance keeps, with its local `state.json`, the version it last
//!   served (the Redis version of that state) and the cluster's *epoch*: a
//!   random id written by whoever seeded Redis (`NAME:epoch`).
//! - Re-seeding after a loss uses [`RedisState::seed`] with the instance's
//!   own version (not 1), under a new epoch, so versions never go
//!   backwards across the loss. While Redis holds a state seeded after a
//!   loss (marked in the seed), a later seed with a higher version
//!   replaces it once; so the newest state any instance held wins, not the
//!   first to reconnect.
//! - An instance applies a Redis state only when its version is higher
//!   than the one it serves, or when the epoch changed and the version is
//!   at least its own; an older state therefore never replaces a newer one.
//! - A switch forced locally while Redis was down bumps the local version
//!   and is marked; on return it is pushed with `change` only if Redis's
//!   version is still the one it was forced from, and otherwise reported as
//!   a conflict for the operator (logged, kept in the local history).

use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};

use super::Password;
use crate::config::Cluster;
use crate::store::{Event, SavedState, HISTORY_LIMIT};

/// Compare and set: writes the state, appends the history entry and
/// publishes the new version, only when the version is the expected one.
/// KEYS: version, state, history. ARGV: expected version, state JSON,
/// event JSON (empty: no entry), service, stream MAXLEN, channel.
/// Returns `{1, new}` or, on a conflict, `{0, current}`.
const CHANGE_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
local new = current + 1
redis.call('SET', KEYS[1], new)
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'service', ARGV[4], 'event', ARGV[3])
end
redis.call('PUBLISH', ARGV[6], new)
return {1, new}
";

/// Seeding: writes the state with the given version only when Redis holds
/// no version yet (SET NX inside the script, so of two instances starting
/// together exactly one seeds). KEYS: version, state. ARGV: version, state
/// JSON, channel. Returns `{1, version}` or `{0, current}`.
const SEED_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return {0, tonumber(redis.call('GET', KEYS[1]))}
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, tonumber(ARGV[1])}
";

/// A state and the version Redis holds it under.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub state: SavedState,
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
        "the cluster state changed meanwhile: expected version {expected}, redis holds {current}; \
         read it again and retry"
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

    /// The state and its version; `None` when Redis holds none (never
    /// seeded, or emptied by a restart). One call (MGET).
    pub async fn read(&self) -> Result<Option<Versioned>, ClusterError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.key("version")).arg(self.key("state"));
        let (version, state): (Option<u64>, Option<String>) = self.query(&cmd).await?;
        let (Some(version), Some(state)) = (version, state) else {
            return Ok(None);
        };
        let state = serde_json::from_str(&state).map_err(|e| self.corrupt("state", e))?;
        Ok(Some(Versioned { version, state }))
    }

    /// Writes `state` when Redis holds `expected` (0: nothing yet), appends
    /// `event` to the history and publishes the new version. Returns the
    /// new version, or [`ClusterError::Conflict`] with the version Redis
    /// holds.
    pub async fn change(
        &self,
        expected: u64,
        state: &SavedState,
        event: Option<&Event>,
    ) -> Result<u64, ClusterError> {
        let state = serde_json::to_string(state).map_err(|e| self.corrupt("state", e))?;
        let (event, service) = match event {
            Some(e) => (
                serde_json::to_string(e).map_err(|err| self.corrupt("history", err))?,
                e.service.clone(),
            ),
            None => (String::new(), String::new()),
        };
        let mut call = self.change.prepare_invoke();
        call.key(self.key("version"))
            .key(self.key("state"))
            .key(self.key("history"))
            .arg(expected)
            .arg(state)
            .arg(event)
            .arg(service)
            .arg(HISTORY_LIMIT)
            .arg(self.channel());
        let (won, version): (u8, u64) = self
            .bounded(|mut conn| {
                let call = &call;
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        if won == 1 {
            Ok(version)
        } else {
            Err(ClusterError::Conflict {
                expected,
                current: version,
            })
        }
    }

    /// Seeds Redis with `state` under `version` (1 for a new cluster) when
    /// it holds no state; of several instances seeding at once exactly one
    /// wins. `Ok(true)`: this call seeded; `Ok(false)`: Redis already held
    /// a state, left as it was.
    pub async fn seed(&self, version: u64, state: &SavedState) -> Result<bool, ClusterError> {
        let state = serde_json::to_string(state).map_err(|e| self.corrupt("state", e))?;
        let mut call = self.seed.prepare_invoke();
        call.key(self.key("version"))
            .key(self.key("state"))
            .arg(version.max(1))
            .arg(state)
            .arg(self.channel());
        let (won, _current): (u8, u64) = self
            .bounded(|mut conn| {
                let call = &call;
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(won == 1)
    }

    /// The newest `limit` history entries (at most [`HISTORY_LIMIT`]),
    /// oldest first; with `service`, only that service's among them.
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
        for (_id, fields) in entries.into_iter().rev() {
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
            let Some(event) = event else {
                return Err(self.corrupt("history", "an entry without an event"));
            };
            events.push(serde_json::from_str(&event).map_err(|e| self.corrupt("history", e))?);
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

    fn reset(&self) {
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
