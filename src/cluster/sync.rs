//! Keeps this instance's snapshot on the cluster's state: seeds Redis when
//! it is empty, follows every change another instance makes (pub/sub, plus
//! a version check every [`CHECK_INTERVAL`] that catches a message lost
//! while the subscription was down), pushes a change made here while Redis
//! was unreachable, and renews this instance's liveness entry.
//!
//! Requests never wait for any of it: they read the local snapshot, which
//! [`Replica::adopt`] replaces in one atomic store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use super::{ClusterError, Link, Member, Versioned};
use crate::store::{Event, SavedState, Stamp};

/// How often the version in Redis is compared with the one served (1 s):
/// the bound on how long a change whose message was lost stays unseen.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait before reconnecting to Redis (100 ms); doubled after
/// each failure up to [`MAX_BACKOFF`], each wait drawn between half and
/// all of it (jitter), so instances do not reconnect in step.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts (5 s).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the sync needs from the switchboard (which is above this module).
pub trait Replica: Send + Sync + 'static {
    /// The state served now and where it stands (`None`: never synced).
    fn served(&self) -> (SavedState, Option<Stamp>);
    /// Puts `held` in force when it is newer than what is served, by the
    /// rules in `state.rs` (checked again under the switchboard's write
    /// lock, as a change may have landed since `held` was read).
    fn adopt(&self, held: &Versioned);
    /// Takes the history entries made while Redis did not answer (oldest
    /// first), for the sync to push.
    fn take_history(&self) -> Vec<Event>;
    /// Gives back the entries a push did not get to, before any newer.
    fn keep_history(&self, events: Vec<Event>);
}

/// The loop of one instance.
pub struct StateSync {
    link: Arc<Link>,
    replica: Arc<dyn Replica>,
}

impl StateSync {
    pub fn new(link: Arc<Link>, replica: Arc<dyn Replica>) -> StateSync {
        StateSync { link, replica }
    }

    /// One round: offers this instance's state when Redis is empty, went
    /// back in time, was re-seeded, or lacks a change made here meanwhile
    /// (the seed rules decide), then puts Redis's state in force if newer.
    pub async fn converge(&self) -> Result<(), ClusterError> {
        let redis = &self.link.redis;
        let (mine, stamp) = self.served().await?;
        let mut held = redis.read().await?;
        let offer = match (&held, &stamp) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(h), Some(s)) => s.local || h.epoch != s.epoch || h.version < s.version,
        };
        if offer {
            let seeded = redis.seed(stamp.as_ref(), &mine).await?;
            if seeded.won {
                tracing::info!(
                    version = seeded.version,
                    epoch = %seeded.epoch,
                    local_change = stamp.as_ref().is_some_and(|s| s.local),
                    "cluster state taken from this instance"
                );
            }
            held = redis.read().await?;
        }
        if let Some(h) = held {
            let replica = self.replica.clone();
            self.off_thread(move || replica.adopt(&h)).await?;
        }
        Ok(())
    }

    /// [`Replica::served`], off this runtime's threads (see `off_thread`).
    async fn served(&self) -> Result<(SavedState, Option<Stamp>), ClusterError> {
        let replica = self.replica.clone();
        self.off_thread(move || replica.served()).await
    }

    /// Runs `f` on the blocking pool: the replica's calls take the
    /// switchboard's locks, which a change holds while it waits for Redis,
    /// and that wait may need the shared connection's driver, spawned on
    /// the runtime that made it (maybe this one, of one worker, as Pingora
    /// runs background services). Blocking here could stall that change
    /// for the whole `[cluster] timeout`.
    async fn off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ClusterError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ClusterError::Unreachable {
                redis: self.link.redis.url().to_string(),
                detail: format!("the cluster sync's task failed: {e}"),
            })
    }

    /// Pushes the history entries made while Redis did not answer to the
    /// cluster's stream (in the order they were made; each keeps its time).
    pub async fn push_history(&self) -> Result<(), ClusterError> {
        let replica = self.replica.clone();
        let events = self.off_thread(move || replica.take_history()).await?;
        for (i, event) in events.iter().enumerate() {
            if let Err(e) = self.link.redis.append_history(event).await {
                let rest = events[i..].to_vec();
                let replica = self.replica.clone();
                self.off_thread(move || replica.keep_history(rest)).await?;
                return Err(e);
            }
        }
        if !events.is_empty() {
            tracing::info!(
                entries = events.len(),
                "history entries made while redis was unreachable pushed to the cluster's history"
            );
        }
        Ok(())
    }

    /// Renews this instance's liveness entry and records the live ones.
    pub async fn heartbeat(&self) -> Result<(), ClusterError> {
        let (_, stamp) = self.served().await?;
        let stamp = stamp.unwrap_or_default();
        let me = Member {
            instance: self.link.instance.clone(),
            version: stamp.version,
            epoch: stamp.epoch,
            local: stamp.local,
        };
        let info = serde_json::to_string(&me).unwrap_or_default();
        let live = self
            .link
            .redis
            .heartbeat(&me.instance, &info, self.link.lease)
            .await?;
        let members = live
            .into_iter()
            .map(|(instance, info)| Member {
                instance,
                ..serde_json::from_str(&info).unwrap_or_default()
            })
            .collect();
        self.link.set_members(members);
        Ok(())
    }

    /// Follows the cluster until `shutdown` turns true: subscribe, converge,
    /// then react to messages and ticks; on any failure, log the outage
    /// once (`Link::mark_down`), wait (backoff with jitter) and start over.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = FIRST_BACKOFF;
        while !*shutdown.borrow() {
            match self.follow(&mut shutdown).await {
                Ok(()) => return,
                Err(e) => self.link.mark_down(&e),
            }
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One connected stretch; `Ok` only at shutdown.
    async fn follow(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), ClusterError> {
        let redis = &self.link.redis;
        let since = self.link.since();
        let mut changes = std::pin::pin!(redis.subscribe().await?);
        // Subscribed first, then read: a change made in between is seen
        // by the read or by a message, never missed.
        self.converge().await?;
        self.heartbeat().await?;
        self.push_history().await?;
        self.link.mark_up(since);
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let beat_every = self.link.lease / 3;
        let mut last_beat = tokio::time::Instant::now();
        loop {
            tokio::select! {
                msg = changes.next() => match msg {
                    Some(version) => {
                        let (_, stamp) = self.served().await?;
                        if stamp.is_none_or(|s| version != s.version || s.local) {
                            self.converge().await?;
                        }
                    }
                    None => {
                        return Err(ClusterError::Unreachable {
                            redis: redis.url().to_string(),
                            detail: "the subscription to changes was lost".into(),
                        })
                    }
                },
                _ = tick.tick() => {
                    let since = self.link.since();
                    let (_, stamp) = self.served().await?;
                    let held = redis.version().await?;
                    let current = stamp.as_ref().map(|s| (s.version, s.epoch.clone()));
                    if held != current || stamp.is_some_and(|s| s.local) {
                        self.converge().await?;
                    }
                    if last_beat.elapsed() >= beat_every {
                        self.heartbeat().await?;
                        last_beat = tokio::time::Instant::now();
                    }
                    self.push_history().await?;
                    self.link.mark_up(since);
                }
                _ = shutdown.changed() => {
                    let _ = redis.leave(&self.link.instance).await;
                    return Ok(());
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for StateSync {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
    }
}
