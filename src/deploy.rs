//! `ctl deploy`, server side: one deploy task per service that waits for the
//! target color to be healthy, walks the canary steps (each: set the
//! weights, then judge the target color for `interval` with the gates of
//! `[services.NAME.rollback]`, the defaults without one) and finishes on
//! 100 % or rolls back. The gates and the rollback are the automatic
//! rollback watcher's own ([`crate::canary::judge`],
//! [`crate::rollback::roll_back`]); the watcher leaves the service to the
//! deploy while it runs and watches what it leaves behind.
//!
//! The task runs in the proxy, so a slow or lost network to the CI runner
//! changes nothing about the gates. It holds a lease that the ctl renews by
//! polling `GET /services/NAME/deploy`: without a poll for [`LEASE`] the
//! deploy is abandoned — aborted and the state from before restored — so a
//! killed CI job never leaves traffic moving forward unattended, and what
//! CI reports (failed) matches what serves (the old color). `DELETE`
//! aborts the same way at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::canary::{judge, Figures};
use crate::config::{NotifyEvent, Rollback};
use crate::notify::Notice;
use crate::pools::{Color, ServiceState, SwitchError, SwitchKind, Weights};
use crate::rollback::{figures_json, gates_json, roll_back, Watcher};
use crate::store::Actor;
use crate::switchboard::Switchboard;

/// Steps when none are given: straight to 100 %, still judged for
/// `interval`.
pub const DEFAULT_STEPS: [u8; 1] = [100];
/// How long each step is judged (60 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// How long the deploy waits for the target color to be healthy (5 min).
pub const DEFAULT_WAIT_HEALTHY: Duration = Duration::from_secs(300);
/// `interval`: 1 s to 1 h.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// `wait_healthy`: 0 (the color must be healthy now) to 1 h.
pub const WAIT_HEALTHY_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(3600);
/// Steps at most (20).
pub const MAX_STEPS: usize = 20;
/// A deploy nobody polls for this long (30 s) is abandoned: aborted, with
/// the state from before restored.
pub const LEASE: Duration = Duration::from_secs(30);
/// `lease`: 3 s (a few of the ctl's 1 s polls) to 10 min.
pub const LEASE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3)..=Duration::from_secs(600);
/// How often the task looks at health, the gates, the lease and an abort
/// (250 ms).
pub const TICK: Duration = Duration::from_millis(250);

/// What a deploy is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub to: Color,
    /// Percent of new requests for `to` at each step; rising, the last 100.
    pub steps: Vec<u8>,
    pub interval: Duration,
    pub wait_healthy: Duration,
    /// Abandoned (aborted and restored) after this long without a poll.
    pub lease: Duration,
    /// Recorded with each step.
    pub reason: Option<String>,
}

impl Plan {
    /// Why the plan cannot run, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(format!(
                "steps: 1 to {MAX_STEPS} percentages, e.g. 10,50,100"
            ));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1])
            || self.steps[0] == 0
            || self.steps.last() != Some(&100)
        {
            return Err(format!(
                "steps must rise from above 0 and end at 100, e.g. 10,50,100 (got {:?})",
                self.steps
            ));
        }
        in_range("interval", self.interval, &INTERVAL_RANGE)?;
        in_range("wait_healthy", self.wait_healthy, &WAIT_HEALTHY_RANGE)?;
        in_range("lease", self.lease, &LEASE_RANGE)
    }
}

/// `Ok` when `got` is in `range`, else an error naming the range the
/// proxy enforces (from the constant, so the message cannot drift from
/// the check) and the value it got.
fn in_range(
    what: &str,
    got: Duration,
    range: &std::ops::RangeInclusive<Duration>,
) -> Result<(), String> {
    if range.contains(&got) {
        return Ok(());
    }
    Err(format!(
        "{what} must be {} to {}, got {}",
        show_duration(*range.start()),
        show_duration(*range.end()),
        show_duration(got)
    ))
}

/// A duration in its largest whole unit: `500 ms`, `3 s`, `10 min`, `1 h`.
fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0 s".into(),
        ms if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{ms} ms"),
    }
}

/// Why a deploy request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("no deploy of {0} since switchyard started")]
    None(String),
    #[error("{0}")]
    Invalid(String),
    /// Another deploy holds the service (409).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Refused(String),
}

/// Where a deploy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    WaitingHealthy,
    Step,
    Done,
    /// A gate failed and traffic went back.
    RolledBack,
    /// Stopped on request (`DELETE`, Ctrl-C) or abandoned; the state from
    /// before was restored.
    Aborted,
    /// Could not go on (the target never became healthy, a step was
    /// refused, someone else changed the service); left where it stopped.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingHealthy => "waiting_healthy",
            Phase::Step => "step",
            Phase::Done => "done",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }

    pub fn running(self) -> bool {
        matches!(self, Phase::WaitingHealthy | Phase::Step)
    }
}

#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    /// 1-based step under way.
    step: Option<usize>,
    /// Requests judged from here (clock ms).
    since_ms: u64,
    /// When the phase ends (clock ms).
    until_ms: Option<u64>,
    figures: Option<Figures>,
    /// How it ended.
    outcome: Option<String>,
}

/// One deploy of one service.
struct Run {
    service: Arc<str>,
    plan: Plan,
    /// The token that started it (`token:ci`): its polls renew the lease.
    owner: Actor,
    /// `deploy:token:ci`, as the history records the deploy's changes.
    actor: Actor,
    started: SystemTime,
    before: ServiceState,
    /// The gates when it started, as `GET` shows them; each tick judges by
    /// the service's gates then (a reload may change them).
    gates: Rollback,
    progress: Mutex<Progress>,
    /// Set to the reason when an abort is asked.
    stop: Mutex<Option<String>>,
    wake: Condvar,
    last_poll_ms: AtomicU64,
    /// The service's `moves` after the deploy's own last change (before
    /// its first: as it found it). Anything else means someone else moved
    /// the service, and the deploy leaves it alone, abort included.
    own_moves: AtomicU64,
}

/// Every service's deploy, running or last finished.
pub struct Deployer {
    board: Arc<Switchboard>,
    watcher: Arc<Watcher>,
    runs: Mutex<HashMap<Arc<str>, Arc<Run>>>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Deployer {
    pub fn new(board: Arc<Switchboard>, watcher: Arc<Watcher>) -> Deployer {
        Deployer {
            board,
            watcher,
            runs: Mutex::new(HashMap::new()),
        }
    }

    pub fn watcher(&self) -> &Arc<Watcher> {
        &self.watcher
    }

    fn now_ms(&self) -> u64 {
        self.watcher.stats().now_ms()
    }

    /// Starts a deploy of `service` by `owner` (the admin token's actor);
    /// refused while another one runs (naming who started it and when).
    pub fn start(
        self: &Arc<Self>,
        service: &str,
        plan: Plan,
        owner: &Actor,
    ) -> Result<Value, DeployError> {
        plan.check().map_err(DeployError::Invalid)?;
        let before = self
            .board
            .service(service)
            .map_err(|_| DeployError::UnknownService(service.to_string()))?;
        if before.weights == Weights::all(plan.to) {
            return Err(DeployError::Refused(format!(
                "{service} already sends all traffic to {}: nothing to deploy",
                plan.to
            )));
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs.get(service).filter(|r| r.phase().running()) {
            let p = run
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let at = match p.step {
                Some(i) => format!("step {i} of {}", run.plan.steps.len()),
                None => "waiting for health".into(),
            };
            return Err(DeployError::Busy(format!(
                "a deploy of {service} to {} is already running: started by {} at {} ({at}); \
                 abort it with DELETE /services/{service}/deploy (ctl deploy {service} --abort)",
                run.plan.to,
                run.actor,
                rfc3339(run.started)
            )));
        }
        let now = self.now_ms();
        let before_moves = before.moves;
        let run = Arc::new(Run {
            service: Arc::from(service),
            gates: before.rollback.unwrap_or_default(),
            before,
            owner: owner.clone(),
            actor: Actor::deploy(owner),
            started: SystemTime::now(),
            progress: Mutex::new(Progress {
                phase: Phase::WaitingHealthy,
                step: None,
                since_ms: now,
                until_ms: Some(now + plan.wait_healthy.as_millis() as u64),
                figures: None,
                outcome: None,
            }),
            plan,
            stop: Mutex::new(None),
            wake: Condvar::new(),
            last_poll_ms: AtomicU64::new(now),
            own_moves: AtomicU64::new(before_moves),
        });
        runs.insert(run.service.clone(), run.clone());
        drop(runs);
        self.watcher.hold(service);
        let steps: Vec<String> = run.plan.steps.iter().map(u8::to_string).collect();
        tracing::info!(service, to = %run.plan.to, steps = %steps.join(","), interval = ?run.plan.interval, actor = %run.actor, "deploy started");
        let summary = format!(
            "{service}: deploy to {} started by {} (steps {} %, {} each)",
            run.plan.to,
            run.owner,
            steps.join(", "),
            crate::canary::show_secs(run.plan.interval)
        );
        self.notify(
            &run,
            run.plan.reason.as_deref().unwrap_or("deploy"),
            summary,
        );
        let me = self.clone();
        let task = run.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("deploy-{service}"))
            .spawn(move || me.drive(&task));
        if let Err(e) = spawned {
            self.finish(&run, Phase::Failed, format!("deploy could not start: {e}"));
        }
        Ok(self.json(&run))
    }

    /// The progress of `service`'s deploy (running or the last one);
    /// a poll by the token that started it renews its lease.
    pub fn progress(&self, service: &str, caller: &Actor) -> Result<Value, DeployError> {
        let run = self.run(service)?;
        if &run.owner == caller {
            run.last_poll_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        Ok(self.json(&run))
    }

    /// Asks the running deploy of `service` to stop and restore the state
    /// from before it; returns once it has.
    pub fn abort(&self, service: &str, reason: String) -> Result<Value, DeployError> {
        let run = self.run(service)?;
        if !run.phase().running() {
            return Err(DeployError::Refused(format!(
                "the deploy of {service} is over ({}): nothing to abort",
                run.phase().as_str()
            )));
        }
        run.request_stop(reason);
        // The task looks every TICK; a restore is one write.
        let mut stopped = run.stop.lock().unwrap_or_else(|p| p.into_inner());
        while run.phase().running() {
            let (guard, _) = run
                .wake
                .wait_timeout(stopped, TICK)
                .unwrap_or_else(|p| p.into_inner());
            stopped = guard;
        }
        drop(stopped);
        Ok(self.json(&run))
    }

    /// The deploy of `service`, running or last finished. A service a
    /// reload removed keeps its record, so the ctl following its deploy
    /// learns how it ended rather than getting a 404.
    fn run(&self, service: &str) -> Result<Arc<Run>, DeployError> {
        let run = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned();
        match run {
            Some(run) => Ok(run),
            None if self.board.service(service).is_err() => {
                Err(DeployError::UnknownService(service.to_string()))
            }
            None => Err(DeployError::None(service.to_string())),
        }
    }

    /// The task: wait for health, walk the steps, finish.
    fn drive(&self, run: &Run) {
        let service = &*run.service;
        let to = run.plan.to;
        // 1. The target color must pass the health gate of a switch.
        loop {
            if let Some(why) = self.interrupted(run) {
                return self.abort_now(run, why);
            }
            let Ok(s) = self.board.service(service) else {
                let why = format!("deploy stopped: {service} was removed by a config reload");
                return self.finish(run, Phase::Failed, why);
            };
            if s.moves != run.own_moves.load(Ordering::Relaxed) {
                let why = format!(
                    "deploy stopped while waiting for health: {service} was changed by someone else meanwhile (see the history); left as it is"
                );
                return self.finish(run, Phase::Failed, why);
            }
            let healthy = s.pool(to).healthy();
            match s.required_healthy(to) {
                None => break,
                Some(required) if healthy >= required => break,
                Some(required) => {
                    if run.until_passed(self.now_ms()) {
                        let why = format!(
                            "deploy failed: {to} not healthy within {} ({healthy} healthy of {required} required); nothing was changed",
                            crate::canary::show_secs(run.plan.wait_healthy)
                        );
                        return self.finish(run, Phase::Failed, why);
                    }
                }
            }
            run.sleep(TICK);
        }
        // 2. The steps.
        let n = run.plan.steps.len();
        for (i, &pct) in run.plan.steps.iter().enumerate() {
            let step = i + 1;
            let weights = match to {
                Color::Green => Weights::new(u64::from(100 - pct), u64::from(pct)),
                Color::Blue => Weights::new(u64::from(pct), u64::from(100 - pct)),
            };
            let Ok(weights) = weights else {
                return self.finish(run, Phase::Failed, format!("bad step {pct}"));
            };
            let reason = match &run.plan.reason {
                Some(r) => format!("{r}: deploy step {step}/{n}, {to} {pct} %"),
                None => format!("deploy step {step}/{n}: {to} {pct} %"),
            };
            let after = match self.board.set_weights(
                service,
                weights,
                SwitchKind::Switch,
                Some(reason),
                false,
                &run.actor,
            ) {
                Ok(after) => after,
                Err(e) => {
                    let why = format!("deploy failed at step {step}/{n}: {e}");
                    return self.abort_now(run, why);
                }
            };
            run.own_moves.store(after.moves, Ordering::Relaxed);
            let now = self.now_ms();
            {
                let mut p = run.lock();
                p.phase = Phase::Step;
                p.step = Some(step);
                p.since_ms = now;
                p.until_ms = Some(now + run.plan.interval.as_millis() as u64);
                p.figures = None;
            }
            loop {
                if let Some(why) = self.interrupted(run) {
                    return self.abort_now(run, why);
                }
                let Ok(now) = self.board.service(service) else {
                    let why = format!(
                        "deploy stopped at step {step}/{n}: {service} was removed by a config reload"
                    );
                    return self.finish(run, Phase::Failed, why);
                };
                if now.moves != after.moves {
                    let why = format!(
                        "deploy stopped at step {step}/{n}: {service} was changed by someone else meanwhile (see the history); left as it is"
                    );
                    return self.finish(run, Phase::Failed, why);
                }
                // The service's gates as they are now: a reload that changes
                // them applies at once, as the windows' slow counts do.
                let gates = now.rollback.unwrap_or_default();
                let since = run.lock().since_ms;
                let f = self
                    .watcher
                    .stats()
                    .figures(service, to, gates.window, since);
                run.lock().figures = Some(f);
                if let Some(breach) = judge(&f, &gates) {
                    let why = format!(
                        "deploy rolled back at step {step}/{n} ({to} {pct} %): {}",
                        breach.detail
                    );
                    let stats = self.watcher.stats();
                    let outcome = match roll_back(
                        &self.board,
                        stats,
                        &after,
                        to,
                        &why,
                        &breach,
                        &run.actor,
                    ) {
                        Ok(_) => why,
                        Err(e) => format!("{why}; the rollback was refused: {e}"),
                    };
                    return self.finish(run, Phase::RolledBack, outcome);
                }
                if run.until_passed(self.now_ms()) {
                    break;
                }
                run.sleep(TICK);
            }
        }
        let done = format!("deploy done: {to} 100 % after {n} step(s)");
        self.finish(run, Phase::Done, done);
    }

    /// An abort asked for, or the lease run out.
    fn interrupted(&self, run: &Run) -> Option<String> {
        if let Some(why) = run.stop.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(why);
        }
        let idle = self
            .now_ms()
            .saturating_sub(run.last_poll_ms.load(Ordering::Relaxed));
        let lease = run.plan.lease;
        (idle > lease.as_millis() as u64).then(|| {
            format!(
                "deploy abandoned: no progress poll for {} (the ctl that started it is gone)",
                crate::canary::show_secs(lease)
            )
        })
    }

    /// Restores the state from before the deploy and ends it as aborted
    /// (or failed, when the restore itself is refused).
    fn abort_now(&self, run: &Run, why: String) {
        let reason = format!("{why}; restoring the state from before the deploy");
        let own = run.own_moves.load(Ordering::Relaxed);
        match self.board.restore(
            &run.service,
            &run.before,
            own,
            Some(reason),
            false,
            &run.actor,
        ) {
            Ok(_) => self.finish(run, Phase::Aborted, why),
            Err(e @ SwitchError::Moved(_)) => {
                self.finish(run, Phase::Aborted, format!("{why}; {e}"))
            }
            Err(e) => {
                tracing::error!(service = %run.service, cause = %e, "deploy aborted but the state from before it could not be restored");
                self.finish(
                    run,
                    Phase::Aborted,
                    format!("{why}; the restore was refused: {e}"),
                );
            }
        }
    }

    fn finish(&self, run: &Run, phase: Phase, outcome: String) {
        {
            let mut p = run.lock();
            p.phase = phase;
            p.until_ms = None;
            p.outcome = Some(outcome.clone());
        }
        run.wake.notify_all();
        self.watcher.release(&run.service);
        let service = &*run.service;
        match phase {
            Phase::Done => tracing::info!(service, actor = %run.actor, outcome, "deploy finished"),
            _ => {
                tracing::warn!(service, actor = %run.actor, phase = phase.as_str(), outcome, "deploy finished")
            }
        }
        // Rollbacks and restores are in the history already; the outcome
        // of the others is noted beside the steps.
        if matches!(phase, Phase::Done | Phase::Failed) {
            if let Err(e) = self.board.note(service, outcome.clone(), &run.actor) {
                tracing::error!(service, cause = %e, "deploy outcome not written to the history");
            }
        }
        let summary = format!("{service}: {}: {outcome}", phase.as_str().replace('_', " "));
        self.notify(run, &outcome, summary);
    }

    /// A `deploy` webhook notice about `run` (its colors, its actor).
    fn notify(&self, run: &Run, reason: &str, summary: String) {
        let notice = Notice::new(
            NotifyEvent::Deploy,
            &run.service,
            Some(run.before.active.to_string()),
            Some(run.plan.to.to_string()),
            reason,
            summary,
        );
        self.board.notify(notice.by(&run.actor));
    }

    /// A deploy as the API shows it.
    fn json(&self, run: &Run) -> Value {
        let p = run
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = self.now_ms();
        let state = self.board.service(&run.service).ok();
        let health = state.as_ref().map(|s| {
            let pool = s.pool(run.plan.to);
            json!({
                "healthy": pool.healthy(),
                "backends": pool.backends.len(),
                "required": s.required_healthy(run.plan.to),
            })
        });
        json!({
            "service": &*run.service,
            "to": run.plan.to,
            "steps": run.plan.steps,
            "interval_s": run.plan.interval.as_secs(),
            "wait_healthy_s": run.plan.wait_healthy.as_secs(),
            "lease_s": run.plan.lease.as_secs(),
            "reason": run.plan.reason,
            "actor": run.actor.as_str(),
            "started": rfc3339(run.started),
            "running": p.phase.running(),
            "phase": p.phase.as_str(),
            "step": p.step,
            "of": run.plan.steps.len(),
            "weights": state.as_ref().map(|s| s.weights),
            "health": health,
            "live": p.figures.as_ref().map(figures_json),
            "time_left_s": p.until_ms.map(|u| u.saturating_sub(now).div_ceil(1000)),
            "outcome": p.outcome,
            "before": {
                "active": run.before.active,
                "previous": run.before.previous,
                "weights": run.before.weights,
            },
            "gates": gates_json(&run.gates),
        })
    }
}

impl Run {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    fn until_passed(&self, now: u64) -> bool {
        self.lock().until_ms.is_some_and(|u| now >= u)
    }

    fn request_stop(&self, why: String) {
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        stop.get_or_insert(why);
        self.wake.notify_all();
    }

    /// Waits `d`, or less when an abort is asked.
    fn sleep(&self, d: Duration) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if stop.is_none() {
            let _ = self.wake.wait_timeout(stop, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(steps: &[u8]) -> Plan {
        Plan {
            to: Color::Green,
            steps: steps.to_vec(),
            interval: Duration::from_secs(1),
            wait_healthy: Duration::ZERO,
            lease: LEASE,
            reason: None,
        }
    }

    #[test]
    fn plans_rise_to_100() {
        assert!(plan(&[10, 50, 100]).check().is_ok());
        assert!(plan(&[100]).check().is_ok());
        for bad in [
            &[][..],
            &[50, 10, 100],
            &[10, 50],
            &[0, 100],
            &[10, 10, 100],
        ] {
            assert!(plan(bad).check().is_err(), "{bad:?}");
        }
        let mut p = plan(&[100]);
        p.interval = Duration::from_millis(10);
        assert!(p.check().is_err());
    }
}
