//! Graceful shutdown: exit as soon as in-flight requests have finished.
//!
//! On SIGTERM (or after handing the sockets to a new process on SIGQUIT)
//! Pingora stops accepting and then sleeps its whole grace period, however
//! little is in flight. That would make every deploy wait `grace_period`.
//! This watcher instead exits the process once no request has been in flight
//! for [`SETTLE`], or when `grace_period` runs out (logging what was cut).
//! SIGINT stays Pingora's fast shutdown.
//!
//! Known limit: a connection accepted just before the signal whose request
//! headers have not arrived within `SETTLE` is closed without an answer, as
//! with any proxy that stops; idempotent clients retry it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::{interval, Instant, MissedTickBehavior};

/// How long the proxy must be idle before it exits (250 ms): long enough for
/// a request already on the wire to show up in the count.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How often the in-flight count is read while draining (50 ms).
const POLL: Duration = Duration::from_millis(50);

pub struct Drain {
    requests: Arc<AtomicUsize>,
    grace_period: Duration,
}

impl Drain {
    pub fn new(requests: Arc<AtomicUsize>, grace_period: Duration) -> Drain {
        Drain {
            requests,
            grace_period,
        }
    }
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|&stop| stop).await.is_err() {
            return; // the server is gone; nothing to drain
        }
        let started = Instant::now();
        let deadline = started + self.grace_period;
        tracing::info!(
            in_flight = self.requests.load(Ordering::Relaxed),
            grace_period = ?self.grace_period,
            "shutting down: no new connections, draining in-flight requests"
        );
        let mut idle_since: Option<Instant> = None;
        let mut tick = interval(POLL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let in_flight = self.requests.load(Ordering::Relaxed);
            if in_flight > 0 {
                idle_since = None;
                if now >= deadline {
                    tracing::warn!(
                        in_flight,
                        "grace period over: exiting with requests still in flight"
                    );
                    break;
                }
                continue;
            }
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= SETTLE {
                tracing::info!(drained_in = ?now.duration_since(started), "drained; exiting");
                break;
            }
        }
        std::process::exit(0);
    }
}
