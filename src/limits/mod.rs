//! Limits that keep a flood of clients from becoming an outage or a bill.
//! Each is checked in `request_filter`, before anything reaches a backend.

pub mod cluster;
pub mod cluster_tokens;
pub mod concurrency;
pub mod key;
pub mod leases;
pub mod openai;
pub mod rate;
pub mod tokens;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// The limits in force now: a config reload replaces them, so the sweeper
/// asks for them on every round.
pub type CurrentLimits =
    dyn Fn() -> (Arc<rate::RateLimits>, Arc<tokens::TokenBudgets>) + Send + Sync;

/// Background housekeeping: every [`rate::SWEEP_INTERVAL`], forgets the
/// rate-limit and token-budget keys whose buckets have refilled.
pub struct Sweeper(pub Box<CurrentLimits>);

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(rate::SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (rates, budgets) = (self.0)();
                    rates.sweep();
                    budgets.sweep();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
