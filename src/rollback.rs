//! The automatic rollback watcher: after a switch or a weight change of a
//! service with `[services.NAME.rollback]`, it judges the new color (the
//! canary during a split, for as long as the split lasts; the newly active
//! color for `watch` after a full switch) every [`TICK`] over the sliding
//! window of `canary.rs`, counting only requests that started after the
//! change, and rolls traffic back when a gate fails.
//!
//! It never flaps: a rollback (its own or anyone's) is never judged, so
//! nothing moves forward again without a new command; a verdict ends the
//! watch, so it cannot fire twice. A rollback the health gate refuses (the
//! old color is not healthy) is logged as an error and notified, not
//! forced: sending traffic to a color known to be down is an operator's
//! call. While `ctl deploy` runs on a service the deploy judges it with the
//! same gates ([`Watcher::hold`]), and the watcher takes over afterwards.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};

use crate::canary::{judge, Breach, Figures, Stats};
use crate::config::{NotifyEvent, Rollback};
use crate::notify::Notice;
use crate::pools::{Color, ServiceState, SwitchError, SwitchKind};
use crate::store::Actor;
use crate::switchboard::Switchboard;

/// How often the watcher judges (1 s): a breach is acted on within a
/// second of the window showing it.
pub const TICK: Duration = Duration::from_secs(1);

/// What the watcher is doing for one service.
#[derive(Debug, Clone)]
struct Track {
    /// `ServiceState::moves` when last looked at.
    moves: u64,
    /// The active color when last looked at.
    active: Color,
    watch: Option<Watching>,
    /// When the watcher last looked (clock ms): a move it finds now
    /// happened after this, so a new watch counts from here. Counting
    /// from the tick that notices the move would miss the canary's first
    /// requests, which a bad build fails at once.
    seen_ms: u64,
    /// Whether the service had gates when last looked at: gates a reload
    /// gives it during a split judge that split from then on.
    gated: bool,
    /// The last verdict, for `GET /status`.
    last: Option<Verdict>,
}

#[derive(Debug, Clone, Copy)]
struct Watching {
    color: Color,
    /// Only requests that started at or after this (clock ms) are judged.
    since_ms: u64,
    /// When the watch ends; `None` while a split lasts.
    until_ms: Option<u64>,
}

/// A rollback the watcher made or tried.
#[derive(Debug, Clone)]
struct Verdict {
    color: Color,
    reason: String,
    /// `rolled back`, or `refused: WHY`.
    outcome: String,
    at_ms: u64,
}

/// The automatic rollback watcher (a background service) and the figures
/// it shows in `GET /status`.
pub struct Watcher {
    board: Arc<Switchboard>,
    stats: Arc<Stats>,
    tracks: Mutex<HashMap<Arc<str>, Track>>,
    /// Services a deploy is judging now.
    held: Mutex<HashSet<Arc<str>>>,
}

/// Rolls the service of `judged` (the state its figures were judged on)
/// back for `breach` of its `color`: the one rollback path of the watcher
/// and of `ctl deploy`. Only that state is rolled back: if the service
/// moved since, nothing happens. Counted by gate on success; on a refusal
/// (the old color is not healthy) logged as an error and notified, never
/// forced. Returns the outcome as the status shows it.
pub fn roll_back(
    board: &Switchboard,
    stats: &Stats,
    judged: &ServiceState,
    color: Color,
    reason: &str,
    breach: &Breach,
    actor: &Actor,
) -> Result<ServiceState, String> {
    let service = &*judged.name;
    let moves = Some(judged.moves);
    match board.rollback_if(service, moves, Some(reason.to_string()), false, actor) {
        Ok(state) => {
            stats.count_rollback(service, breach.gate);
            tracing::warn!(service, %color, gate = breach.gate.as_str(), reason, %actor, "rolled back: a gate failed");
            Ok(state)
        }
        Err(e @ (SwitchError::Moved(_) | SwitchError::ClusterConflict(_))) => {
            // Someone moved the service after the verdict: their command
            // stands, and what it did is judged afresh.
            tracing::info!(service, %color, gate = breach.gate.as_str(), reason, cause = %e, "a gate failed, but the service moved meanwhile; no rollback");
            Err(e.to_string())
        }
        Err(e) => {
            tracing::error!(service, %color, gate = breach.gate.as_str(), reason, cause = %e, "a gate failed but the rollback was refused; traffic stays where it is");
            board.notify(
                Notice::new(
                    NotifyEvent::Rollback,
                    service,
                    Some(color.to_string()),
                    None,
                    &format!("{reason}; rollback refused: {e}"),
                    format!(
                        "{service}: {color} failed a gate ({}) but the rollback was refused: {e}",
                        breach.detail
                    ),
                )
                .by(actor),
            );
            Err(e.to_string())
        }
    }
}

impl Watcher {
    pub fn new(board: Arc<Switchboard>, stats: Arc<Stats>) -> Watcher {
        Watcher {
            board,
            stats,
            tracks: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// A deploy judges `service` from now until [`Watcher::release`].
    pub fn hold(&self, service: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Arc::from(service));
    }

    /// The deploy of `service` is over: changes it made and did not roll
    /// back are watched from the next tick.
    pub fn release(&self, service: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }

    fn is_held(&self, service: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(service)
    }

    /// One round: notice changes, judge what is watched, act on breaches.
    pub fn tick(&self) {
        let now = self.stats.now_ms();
        let snap = self.board.load();
        let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        // Services a reload removed are forgotten.
        tracks.retain(|name, _| snap.service(name).is_some());
        for s in &snap.services {
            let held = self.is_held(&s.name);
            // Every service is tracked, watched or not, so that moves made
            // before its gates appear (or before a reload-added service is
            // first seen) are not taken for new ones.
            let track = tracks.entry(s.name.clone()).or_insert_with(|| Track {
                // `moves` counts from the service's start (process start
                // or the reload that added it): a move seen here happened
                // since the last tick, and is judged like any other.
                moves: 0,
                active: match s.moves {
                    0 => s.active,
                    _ => s.previous.unwrap_or(s.active),
                },
                // A split found in place (e.g. restored at start) is watched.
                watch: s.canary().filter(|_| s.moves == 0).map(|c| Watching {
                    color: c,
                    since_ms: now,
                    until_ms: None,
                }),
                seen_ms: now,
                gated: true,
                last: None,
            });
            let changed_after = std::mem::replace(&mut track.seen_ms, now);
            let Some(gates) = s.rollback.filter(|r| r.enabled) else {
                track.moves = s.moves;
                track.active = s.active;
                track.watch = None;
                track.gated = false;
                continue;
            };
            if !std::mem::replace(&mut track.gated, true)
                && track.moves == s.moves
                && s.last_move != Some(SwitchKind::Rollback)
            {
                // Gates just appeared (a reload) on a split already in
                // place: judge its canary from now. A full switch made
                // before the gates existed is not judged: its start is
                // unknown.
                track.watch = s.canary().map(|c| Watching {
                    color: c,
                    since_ms: now,
                    until_ms: None,
                });
            }
            if held {
                // The deploy judges; what it leaves behind is new at release.
                track.watch = None;
                continue;
            }
            if track.moves != s.moves {
                let moved_to_new_color = s.active != track.active;
                track.moves = s.moves;
                track.active = s.active;
                track.watch = match (s.last_move, s.canary()) {
                    (Some(SwitchKind::Rollback), _) => None,
                    (_, Some(canary)) => Some(Watching {
                        color: canary,
                        since_ms: changed_after,
                        until_ms: None,
                    }),
                    // Back to 100 % on the color that was already active:
                    // a canary called off, nothing new to judge.
                    (_, None) if !moved_to_new_color => None,
                    (_, None) => Some(Watching {
                        color: s.active,
                        since_ms: changed_after,
                        until_ms: Some(changed_after + gates.watch.as_millis() as u64),
                    }),
                };
            }
            let Some(w) = track.watch else { continue };
            if w.until_ms.is_some_and(|until| now >= until) {
                track.watch = None;
                continue;
            }
            let figures = self
                .stats
                .figures(&s.name, w.color, gates.window, w.since_ms);
            tracing::debug!(service = %s.name, ?figures, "judging");
            let Some(breach) = judge(&figures, &gates) else {
                continue;
            };
            // Judged on this snapshot: if the service moved meanwhile (an
            // operator was quicker), the verdict is about a state that is
            // gone: `roll_back` refuses it under the write lock, and the
            // next tick sees the new state.
            if self.board.service(&s.name).map(|now| now.moves).ok() != Some(s.moves) {
                continue;
            }
            // One verdict per watch, whatever the outcome.
            track.watch = None;
            let reason = format!("automatic rollback: {}", breach.detail);
            let actor = Actor::internal(Actor::ROLLBACK_WATCHER);
            let outcome = match roll_back(
                &self.board,
                &self.stats,
                s,
                w.color,
                &reason,
                &breach,
                &actor,
            ) {
                Ok(after) => {
                    track.moves = after.moves;
                    track.active = after.active;
                    "rolled back".to_string()
                }
                Err(e) => format!("refused: {e}"),
            };
            track.last = Some(Verdict {
                color: w.color,
                reason,
                outcome,
                at_ms: now,
            });
        }
    }

    /// The watcher's view of `service` for `GET /status`; `None` when the
    /// service is not watched (no `[services.NAME.rollback]`, or disabled).
    pub fn status(&self, s: &ServiceState) -> Option<Value> {
        let gates = s.rollback.filter(|r| r.enabled)?;
        let now = self.stats.now_ms();
        let track = self
            .tracks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s.name)
            .cloned();
        let watch = track.as_ref().and_then(|t| t.watch);
        let live = watch.map(|w| {
            let f = self
                .stats
                .figures(&s.name, w.color, gates.window, w.since_ms);
            let mut v = figures_json(&f);
            v["color"] = json!(w.color);
            v["time_left_s"] = json!(w.until_ms.map(|u| u.saturating_sub(now).div_ceil(1000)));
            v
        });
        let last = track.and_then(|t| t.last).map(|v| {
            json!({
                "color": v.color,
                "reason": v.reason,
                "outcome": v.outcome,
                "seconds_ago": now.saturating_sub(v.at_ms) / 1000,
            })
        });
        Some(json!({
            "watching": watch.is_some() && !self.is_held(&s.name),
            "deploy_judging": self.is_held(&s.name),
            "gates": gates_json(&gates),
            "live": live,
            "last_verdict": last,
        }))
    }
}

/// The gates as the API shows them.
pub fn gates_json(g: &Rollback) -> Value {
    json!({
        "window_s": g.window.as_secs(),
        "max_error_ratio": g.max_error_ratio,
        "max_p95_ms": g.max_p95.as_millis() as u64,
        "min_requests": g.min_requests,
        "watch_s": g.watch.as_secs(),
    })
}

/// Live figures as the API shows them.
pub fn figures_json(f: &Figures) -> Value {
    json!({
        "requests": f.requests,
        "errors": f.errors,
        "error_ratio": f.error_ratio(),
        "measured": f.measured,
        "slow": f.slow,
        "p95_ms": f.p95.map(|d| d.as_millis() as u64),
        "span_s": f.span.as_secs(),
    })
}

/// The watcher as a Pingora background service, ticking every [`TICK`].
pub struct WatcherService(pub Arc<Watcher>);

#[async_trait]
impl BackgroundService for WatcherService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            // A rollback fsyncs the state: off the async threads.
            let me = self.0.clone();
            let _ = tokio::task::spawn_blocking(move || me.tick()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::{Clock, ManualClock};
    use crate::config::Config;
    use crate::pools::Weights;
    use crate::store::MemoryStore;
    use std::path::Path;

    fn setup() -> (Arc<ManualClock>, Arc<Switchboard>, Watcher) {
        setup_with(
            "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n\
             [services.api.rollback]\nwindow = \"10s\"\nmin_requests = 10\nwatch = \"1m\"\n",
        )
    }

    /// A watcher over the services of `config`, its clock well past zero.
    fn setup_with(config: &str) -> (Arc<ManualClock>, Arc<Switchboard>, Watcher) {
        let config = Config::parse(Path::new("t.toml"), config).unwrap();
        let board = Arc::new(Switchboard::new(&config, Box::<MemoryStore>::default()).unwrap());
        let clock = Arc::new(ManualClock::default());
        clock.advance(Duration::from_secs(100));
        let stats = Arc::new(Stats::new(&board, clock.clone()));
        (clock, board.clone(), Watcher::new(board, stats))
    }

    fn who() -> Actor {
        Actor::token("test")
    }

    fn load(w: &Watcher, clock: &ManualClock, color: Color, n: usize, error: bool) {
        for _ in 0..n {
            w.stats.record(
                "api",
                color,
                clock.now_ms(),
                error,
                Some(Duration::from_millis(5)),
            );
        }
    }

    #[test]
    fn a_failing_switch_is_rolled_back_once_and_never_rolled_forward() {
        let (clock, board, w) = setup();
        w.tick();
        board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
            .unwrap();
        w.tick();
        clock.advance(Duration::from_secs(1));
        load(&w, &clock, Color::Green, 9, true);
        w.tick();
        assert_eq!(
            board.load().services[0].active,
            Color::Green,
            "9 < min_requests"
        );
        load(&w, &clock, Color::Green, 1, true);
        w.tick();
        let s = board.service("api").unwrap();
        assert_eq!(s.active, Color::Blue);
        let last = board.history(None).unwrap().pop().unwrap();
        assert_eq!(last.actor.as_str(), Actor::ROLLBACK_WATCHER);
        assert!(
            last.reason
                .starts_with("automatic rollback: 5xx 100 % > 1 % over"),
            "{}",
            last.reason
        );
        // Blue failing now is not judged: that would roll forward.
        load(&w, &clock, Color::Blue, 50, true);
        for _ in 0..3 {
            clock.advance(Duration::from_secs(1));
            w.tick();
        }
        assert_eq!(board.service("api").unwrap().active, Color::Blue);
        assert_eq!(board.history(None).unwrap().len(), 2);
        let counted: u64 = w.stats.rollbacks().iter().map(|(_, _, n)| n).sum();
        assert_eq!(counted, 1);
    }

    #[test]
    fn requests_between_the_change_and_the_next_tick_are_judged() {
        // The watcher learns of a change at its next tick, up to a second
        // later; the canary's first requests (the ones a bad build fails
        // at once) land in between and must count.
        let (clock, board, w) = setup();
        w.tick();
        clock.advance(Duration::from_millis(300));
        let split = Weights::new(50, 50).unwrap();
        board
            .set_weights("api", split, SwitchKind::Switch, None, false, &who())
            .unwrap();
        load(&w, &clock, Color::Green, 10, true);
        clock.advance(Duration::from_millis(900));
        w.tick();
        let s = board.service("api").unwrap();
        assert_eq!(s.weights, Weights::all(Color::Blue), "{:?}", w.status(&s));
    }

    #[test]
    fn gates_a_reload_adds_during_a_split_judge_that_split() {
        // No gates at start: the split is seen but not watched.
        let bare = "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n";
        let config = Config::parse(Path::new("t.toml"), bare).unwrap();
        let board = Arc::new(Switchboard::new(&config, Box::<MemoryStore>::default()).unwrap());
        let clock = Arc::new(ManualClock::default());
        clock.advance(Duration::from_secs(100));
        let stats = Arc::new(Stats::new(&board, clock.clone()));
        let w = Watcher::new(board.clone(), stats);
        w.tick();
        let split = Weights::new(50, 50).unwrap();
        board
            .set_weights("api", split, SwitchKind::Switch, None, false, &who())
            .unwrap();
        w.tick();
        // A reload gives it gates in the middle of the canary.
        let gated = format!("{bare}[services.api.rollback]\nwindow = \"10s\"\nmin_requests = 10\n");
        let config = Config::parse(Path::new("t.toml"), &gated).unwrap();
        let pages = crate::respond::Pages::new(None, Duration::from_secs(1)).unwrap();
        let settings = crate::settings::Settings::new(&config.server, pages);
        board.reload(&config, settings);
        w.tick();
        clock.advance(Duration::from_secs(1));
        load(&w, &clock, Color::Green, 10, true);
        w.tick();
        assert_eq!(
            board.service("api").unwrap().weights,
            Weights::all(Color::Blue)
        );
    }

    #[test]
    fn a_split_is_judged_on_its_canary_and_the_watch_ends() {
        let (clock, board, w) = setup();
        w.tick();
        let split = Weights::new(90, 10).unwrap();
        board
            .set_weights("api", split, SwitchKind::Switch, None, false, &who())
            .unwrap();
        w.tick();
        // Errors of the old color do not count against the canary.
        load(&w, &clock, Color::Blue, 50, true);
        load(&w, &clock, Color::Green, 50, false);
        w.tick();
        assert_eq!(board.service("api").unwrap().weights, split);
        // A full switch is watched for `watch` (1 min), then let go.
        board
            .set_weights(
                "api",
                Weights::all(Color::Green),
                SwitchKind::Switch,
                None,
                false,
                &who(),
            )
            .unwrap();
        w.tick();
        let s = board.service("api").unwrap();
        assert!(w.status(&s).unwrap()["watching"].as_bool().unwrap());
        clock.advance(Duration::from_secs(61));
        w.tick();
        load(&w, &clock, Color::Green, 50, true);
        w.tick();
        assert_eq!(board.service("api").unwrap().active, Color::Green);
        assert!(!w.status(&s).unwrap()["watching"].as_bool().unwrap());
    }

    #[test]
    fn a_held_service_is_left_to_its_deploy() {
        let (clock, board, w) = setup();
        w.tick();
        w.hold("api");
        board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
            .unwrap();
        w.tick();
        load(&w, &clock, Color::Green, 50, true);
        w.tick();
        assert_eq!(board.service("api").unwrap().active, Color::Green);
        w.release("api");
        w.tick();
        clock.advance(Duration::from_secs(1));
        load(&w, &clock, Color::Green, 50, true);
        w.tick();
        assert_eq!(board.service("api").unwrap().active, Color::Blue);
    }

    #[test]
    fn a_refused_rollback_is_not_forced_nor_retried() {
        let (clock, board, w) = setup_with(
            "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n\
             health = { path = \"/ping\" }\n\
             [services.api.rollback]\nwindow = \"10s\"\nmin_requests = 10\n",
        );
        w.tick();
        // Neither color was ever checked healthy: the switch needs force,
        // and the rollback to blue is refused by the health gate.
        board
            .switch("api", Color::Green, SwitchKind::Switch, None, true, &who())
            .unwrap();
        w.tick();
        load(&w, &clock, Color::Green, 20, true);
        w.tick();
        let s = board.service("api").unwrap();
        assert_eq!(s.active, Color::Green);
        let status = w.status(&s).unwrap();
        let outcome = status["last_verdict"]["outcome"].as_str().unwrap();
        assert!(outcome.starts_with("refused: "), "{status}");
        assert_eq!(status["watching"], false);
        for _ in 0..3 {
            clock.advance(Duration::from_secs(1));
            load(&w, &clock, Color::Green, 20, true);
            w.tick();
        }
        assert_eq!(board.history(None).unwrap().len(), 1, "only the switch");
        let counted: u64 = w.stats.rollbacks().iter().map(|(_, _, n)| n).sum();
        assert_eq!(counted, 0);
    }
}
