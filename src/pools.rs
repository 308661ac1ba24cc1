//! Colors, pools and the one atomic snapshot every request reads.
//!
//! A request loads the [`Snapshot`] once and keeps the `Arc<Pool>` it picked,
//! so a switch never disturbs it: it finishes on the pool it began on, and
//! every request that starts after [`Switchboard::switch`] returns sees the
//! new color. Writers are serialized, build the next snapshot, persist it and
//! `store` it; nothing on the request path takes a lock.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::store::{Event, SavedService, SavedState, StateStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown color {0:?}: expected \"blue\" or \"green\"")]
pub struct BadColor(pub String);

impl FromStr for Color {
    type Err = BadColor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            other => Err(BadColor(other.to_string())),
        }
    }
}

/// One upstream server.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
}

/// The backends of one color of one service. Pools are built once at start-up
/// and shared by every snapshot, so round-robin position and in-flight counts
/// carry across switches.
#[derive(Debug)]
pub struct Pool {
    pub color: Color,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    next: AtomicUsize,
    in_flight: AtomicUsize,
}

impl Pool {
    fn new(color: Color, addrs: &[SocketAddr], connect_timeout: Duration) -> Pool {
        Pool {
            color,
            backends: addrs.iter().map(|&addr| Backend { addr }).collect(),
            connect_timeout,
            next: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// The next backend in round-robin order; `None` for an empty pool.
    pub fn select(&self) -> Option<&Backend> {
        if self.backends.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.backends.get(i % self.backends.len())
    }

    /// Requests currently being served by this pool.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request against its pool for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Pool>);

impl InFlight {
    pub fn new(pool: Arc<Pool>) -> InFlight {
        pool.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(pool)
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request needs to know about one service.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub name: Arc<str>,
    pub active: Color,
    /// The color before the last switch: where `rollback` goes.
    pub previous: Option<Color>,
    pools: [Arc<Pool>; 2],
}

impl ServiceState {
    pub fn pool(&self, color: Color) -> &Arc<Pool> {
        &self.pools[color.index()]
    }

    pub fn active_pool(&self) -> &Arc<Pool> {
        self.pool(self.active)
    }
}

/// Everything about colors and pools, swapped as one value.
#[derive(Debug)]
pub struct Snapshot {
    /// Indexed like [`Config::services`].
    pub services: Vec<ServiceState>,
}

impl Snapshot {
    pub fn service(&self, name: &str) -> Option<(usize, &ServiceState)> {
        self.services
            .iter()
            .enumerate()
            .find(|(_, s)| &*s.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("service {0:?} has no previous color to roll back to")]
    NoPrevious(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a switch happened, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    Switch,
    Rollback,
}

/// Owns the live snapshot and every change to it.
pub struct Switchboard {
    current: ArcSwap<Snapshot>,
    store: Box<dyn StateStore>,
    /// Serializes writers: read-modify-persist-store must not interleave.
    write: Mutex<()>,
}

impl Switchboard {
    /// Builds the first snapshot from the config and the saved state (saved
    /// colors win; services the state does not know start on `active`).
    pub fn new(config: &Config, store: Box<dyn StateStore>) -> Result<Switchboard, StoreError> {
        let saved = store.load()?.unwrap_or_default();
        for name in saved.services.keys() {
            if config.service_index(name).is_none() {
                tracing::warn!(
                    service = %name,
                    "saved state names a service that is no longer configured; ignoring it"
                );
            }
        }
        let services = config
            .services
            .iter()
            .map(|s| {
                let saved = saved.services.get(&s.name);
                ServiceState {
                    name: Arc::from(s.name.as_str()),
                    active: saved.map_or(s.active, |v| v.active),
                    previous: saved.and_then(|v| v.previous),
                    pools: Color::ALL.map(|c| Arc::new(Pool::new(c, s.pool(c), s.connect_timeout))),
                }
            })
            .collect();
        Ok(Switchboard {
            current: ArcSwap::from_pointee(Snapshot { services }),
            store,
            write: Mutex::new(()),
        })
    }

    /// The snapshot for one request. Cheap: one atomic load and a refcount.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `to` the active color of `service`. Returns once every new request
    /// goes to `to`; switching to the active color changes nothing.
    pub fn switch(
        &self,
        service: &str,
        to: Color,
        kind: SwitchKind,
        reason: Option<String>,
    ) -> Result<ServiceState, SwitchError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.current.load_full();
        let (index, state) = snap
            .service(service)
            .ok_or_else(|| SwitchError::UnknownService(service.to_string()))?;
        if state.active == to {
            return Ok(state.clone());
        }
        let mut services = snap.services.clone();
        services[index].previous = Some(state.active);
        services[index].active = to;
        let next = Snapshot { services };
        // Persist first: if the disk refuses, nothing has changed.
        self.store.save(&saved_state(&next))?;
        self.current.store(Arc::new(next));
        let event = Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            service: service.to_string(),
            from: state.active,
            to,
            reason: reason.unwrap_or_else(|| {
                match kind {
                    SwitchKind::Switch => "switch",
                    SwitchKind::Rollback => "rollback",
                }
                .to_string()
            }),
        };
        if let Err(err) = self.store.append_history(&event) {
            // The switch itself is durable and live; losing the history line is
            // worth an alarm but not worth undoing the switch.
            tracing::error!(cause = %err, service, "switch done but its history entry was not written");
        }
        tracing::info!(service, from = %state.active, %to, reason = %event.reason, "switched");
        Ok(self.current.load().services[index].clone())
    }

    /// Switches `service` back to its previous color.
    pub fn rollback(
        &self,
        service: &str,
        reason: Option<String>,
    ) -> Result<ServiceState, SwitchError> {
        let previous = {
            let snap = self.load();
            let (_, state) = snap
                .service(service)
                .ok_or_else(|| SwitchError::UnknownService(service.to_string()))?;
            state
                .previous
                .ok_or_else(|| SwitchError::NoPrevious(service.to_string()))?
        };
        self.switch(service, previous, SwitchKind::Rollback, reason)
    }

    pub fn history(&self) -> Result<Vec<Event>, StoreError> {
        self.store.history()
    }

    /// Requests in flight across every pool.
    pub fn in_flight(&self) -> usize {
        self.load()
            .services
            .iter()
            .flat_map(|s| s.pools.iter())
            .map(|p| p.in_flight())
            .sum()
    }
}

fn saved_state(snap: &Snapshot) -> SavedState {
    SavedState {
        version: SavedState::VERSION,
        services: snap
            .services
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    SavedService {
                        active: s.active,
                        previous: s.previous,
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
[services.api]
blue = ["127.0.0.1:1", "127.0.0.1:2"]
green = ["127.0.0.1:3"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn round_robin_covers_the_pool() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        let snap = board.load();
        let pool = snap.services[0].active_pool();
        let picks: Vec<u16> = (0..4).map(|_| pool.select().unwrap().addr.port()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }

    #[test]
    fn switch_is_atomic_and_leaves_old_snapshots_alone() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        let before = board.load();
        let after = board
            .switch("api", Color::Green, SwitchKind::Switch, None)
            .unwrap();
        assert_eq!(after.active, Color::Green);
        assert_eq!(after.previous, Some(Color::Blue));
        assert_eq!(before.services[0].active, Color::Blue);
        assert_eq!(board.load().services[0].active, Color::Green);
        // The pools themselves are shared, not rebuilt.
        assert!(Arc::ptr_eq(
            before.services[0].pool(Color::Green),
            board.load().services[0].pool(Color::Green)
        ));
        let back = board.rollback("api", None).unwrap();
        assert_eq!(back.active, Color::Blue);
        let reasons: Vec<String> = board
            .history()
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, vec!["switch", "rollback"]);
    }

    #[test]
    fn errors_change_nothing() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        assert!(matches!(
            board.switch("nope", Color::Green, SwitchKind::Switch, None),
            Err(SwitchError::UnknownService(_))
        ));
        assert!(matches!(
            board.rollback("api", None),
            Err(SwitchError::NoPrevious(_))
        ));
        assert_eq!(board.load().services[0].active, Color::Blue);
        assert!(board.history().unwrap().is_empty());
    }

    #[test]
    fn in_flight_is_counted_per_pool() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        let pool = board.load().services[0].active_pool().clone();
        let a = InFlight::new(pool.clone());
        let b = InFlight::new(pool.clone());
        assert_eq!(board.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.in_flight(), 0);
    }
}
