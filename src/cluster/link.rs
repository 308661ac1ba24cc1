//! This instance's link to the cluster: the Redis handle every cluster
//! user shares (the state service, the cluster limits), what this instance
//! knows about the others (how many are live, for the local share of a
//! limit), and whether Redis answers, so an outage is logged once when it
//! starts and once when it ends, never per request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ClusterError, Password, RedisState};
use crate::config::Cluster;

/// Shared by everything on this instance that talks to the cluster.
pub struct Link {
    /// The Redis of `[cluster]`, one multiplexed connection for all.
    pub redis: Arc<RedisState>,
    /// `[cluster] instance`.
    pub instance: String,
    /// `[cluster] limit_timeout`: the longest a request waits on Redis.
    pub limit_timeout: Duration,
    /// `[cluster] lease`: how long this instance's liveness entry and
    /// cluster concurrency slots outlive it.
    pub lease: Duration,
    /// Instances seen live at the last look, this one included (≥ 1).
    /// Kept through an outage: a limit's local share is its cluster-wide
    /// figure divided by it.
    live: AtomicUsize,
    /// Whether Redis answered the last call anyone made.
    up: AtomicBool,
    /// Outages seen since start (each counted once, when it starts).
    outages: AtomicU64,
    /// Why the last failed call failed (a [`ClusterError`]'s message, no
    /// secret in it), for answers that cannot ask Redis themselves.
    last_error: Mutex<Option<String>>,
    /// The instances at the last heartbeat, for `GET /status`.
    members: Mutex<Vec<Member>>,
    /// Where blocking callers' Redis calls run (see [`Link::block_on`]):
    /// made at first use, so after Pingora's `--daemon` fork (threads do
    /// not survive a fork); `None` inside if it could not start.
    runtime: OnceLock<Option<tokio::runtime::Runtime>>,
}

/// One live instance as its heartbeat describes it (`GET /status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    /// The state version it serves.
    pub version: u64,
    pub epoch: String,
    /// Whether it serves a change made while Redis was unreachable.
    #[serde(default)]
    pub local: bool,
}

impl Link {
    /// The link for `cluster`: builds the Redis handle (no call yet).
    /// Errors as [`RedisState::new`].
    pub fn new(cluster: &Cluster, password: Option<&Password>) -> Result<Link, ClusterError> {
        let redis = Arc::new(RedisState::new(cluster, password)?);
        Ok(Link {
            redis,
            instance: cluster.instance.clone(),
            limit_timeout: cluster.limit_timeout,
            lease: cluster.lease,
            live: AtomicUsize::new(1),
            up: AtomicBool::new(true),
            outages: AtomicU64::new(0),
            last_error: Mutex::new(None),
            members: Mutex::new(Vec::new()),
            runtime: OnceLock::new(),
        })
    }

    /// The live instances at the last heartbeat, sorted by name.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the live instances a heartbeat returned.
    pub fn set_members(&self, members: Vec<Member>) {
        self.set_live_instances(members.len());
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
    }

    /// Instances live at the last look, this one included (at least 1).
    pub fn live_instances(&self) -> usize {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Records how many instances are live (0 is taken as 1: this one).
    pub fn set_live_instances(&self, n: usize) {
        self.live.store(n.max(1), Ordering::Relaxed);
    }

    /// Whether Redis answered the last call. While it did not, cluster
    /// limits judge by the local share without asking it.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Outages seen since start.
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Why the last failed call failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call failed: logs the start of an outage (once) with its cause.
    pub fn mark_down(&self, cause: &ClusterError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause.to_string());
        if self.up.swap(false, Ordering::Relaxed) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                cause = %cause,
                live_instances = self.live_instances(),
                "redis unreachable: serving on the last cluster state; switches are refused \
                 unless forced, cluster limits use this instance's local share"
            );
        }
    }

    /// A mark to take before a call, for [`Link::mark_up`].
    pub fn since(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// A call that started at `since` (from [`Link::since`]) succeeded:
    /// logs the end of an outage (once). A call that started before the
    /// outage began proves nothing about Redis now (its answer may have
    /// come just before the failure another call saw), so it is ignored;
    /// otherwise one outage could be logged as two.
    pub fn mark_up(&self, since: u64) {
        if since == self.since() && !self.up.swap(true, Ordering::Relaxed) {
            tracing::warn!("redis reachable again: cluster state and limits are shared again");
        }
    }

    /// Runs `fut` on the cluster runtime and waits for it: how the
    /// switchboard, whose writers are blocking code (the admin API and the
    /// watchers call it off the async threads), talks to Redis. Every
    /// Redis call is bounded by `[cluster] timeout`, so this blocks at most
    /// about that long. Safe from any thread, async or not.
    pub fn block_on<T, F>(&self, fut: F) -> Result<T, ClusterError>
    where
        F: Future<Output = Result<T, ClusterError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(fut.await);
        });
        // The task sends exactly once, unless the runtime is going away
        // with the process.
        rx.recv().unwrap_or_else(|_| {
            Err(ClusterError::Unreachable {
                redis: self.redis.url().to_string(),
                detail: "the cluster runtime has stopped".into(),
            })
        })
    }

    /// Spawns `fut` on the cluster runtime, a one-thread runtime named
    /// `cluster` made at first use. If it cannot start (the OS refuses a
    /// thread), that is logged and `fut` is dropped: a caller waiting on
    /// it sees its sender gone.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("cluster")
                .enable_all()
                .build()
                .inspect_err(|e| tracing::error!(cause = %e, "cannot start the cluster runtime"))
                .ok()
        });
        if let Some(rt) = runtime {
            rt.spawn(fut);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // A runtime dropped inside another one panics; the last `Arc` of a
        // link may well go on an async thread.
        if let Some(rt) = self.runtime.take().flatten() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_that_started_before_an_outage_does_not_end_it() {
        let cluster = Cluster {
            redis: "redis://127.0.0.1:1/0".into(),
            tls: false,
            name: "t".into(),
            instance: "i".into(),
            password: None,
            ca_file: None,
            timeout: Duration::from_millis(100),
            limit_timeout: Duration::from_millis(50),
            lease: Duration::from_secs(10),
        };
        let link = Link::new(&cluster, None).unwrap();
        let before = link.since();
        let e = ClusterError::Timeout {
            redis: cluster.redis.clone(),
            after: cluster.timeout,
        };
        link.mark_down(&e);
        link.mark_down(&e);
        assert_eq!(link.outages(), 1, "one outage, however many failures");
        link.mark_up(before);
        assert!(
            !link.is_up(),
            "a call from before the outage proves nothing"
        );
        link.mark_up(link.since());
        assert!(link.is_up());
        link.mark_down(&e);
        assert_eq!(link.outages(), 2);
    }
}
