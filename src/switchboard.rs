//! The one writer of the snapshot (`pools.rs`): every switch, canary
//! step, rollback, maintenance toggle and config reload goes through
//! [`Switchboard`], serialized, persisted before it is published, recorded
//! in the history with who made it, counted and notified. Readers (every
//! request) never wait for it: they load the current snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::cluster::{self, ClusterError, Link, Versioned};
use crate::config::Config;
use crate::pools::{
    Color, Pool, Reloaded, ServiceState, Snapshot, SwitchCause, SwitchError, SwitchKind, Weights,
};
use crate::settings::Settings;
use crate::store::{Actor, Event, SavedService, SavedState, Stamp, StateStore, StoreError};

/// Owns the live snapshot and every change to it.
pub struct Switchboard {
    current: ArcSwap<Snapshot>,
    store: Box<dyn StateStore>,
    /// Serializes writers: read-modify-persist-store must not interleave.
    write: Mutex<()>,
    /// Counts config reloads; the health checker watches it to follow
    /// services and backends a reload adds or removes.
    reloads: tokio::sync::watch::Sender<u64>,
    /// Told about every color change and maintenance toggle (webhooks);
    /// set once at start, none in tests that do not ask.
    notifier: std::sync::OnceLock<Arc<crate::notify::Notifier>>,
    /// With `[cluster]`: where the state served stands in the cluster's
    /// sequence (`None`: never synced), and the services the cluster's
    /// state holds that this instance's config does not (kept in what it
    /// writes to Redis, so instances whose configs differ for a while do
    /// not erase each other's services). Changed under `write` only.
    cluster: Mutex<(Option<Stamp>, BTreeMap<String, SavedService>)>,
    /// With `[cluster]`: history entries made while Redis did not answer,
    /// oldest first (at most `HISTORY_LIMIT`), for the sync to push.
    unpushed: Mutex<Vec<Event>>,
}

impl Switchboard {
    /// [`Switchboard::with_settings`] with the built-in maintenance page
    /// instead of `server.maintenance_page` (tests and benches; `run`
    /// reads the configured page, which can fail, first).
    pub fn new(config: &Config, store: Box<dyn StateStore>) -> Result<Switchboard, StoreError> {
        let pages = crate::respond::Pages::builtin(config.server.retry_after);
        Switchboard::with_settings(config, Settings::new(&config.server, pages), store)
    }

    /// Builds the first snapshot from the config and the saved state (saved
    /// colors win; services the state does not know start on `active`).
    pub fn with_settings(
        config: &Config,
        settings: Settings,
        store: Box<dyn StateStore>,
    ) -> Result<Switchboard, StoreError> {
        let saved = store.load()?.unwrap_or_default();
        for name in saved.services.keys() {
            if config.service_index(name).is_none() {
                tracing::warn!(
                    service = %name,
                    "saved state names a service that is no longer configured; ignoring it"
                );
            }
        }
        let stamp = saved.cluster.clone();
        Ok(Switchboard {
            current: ArcSwap::from_pointee(Snapshot::build(config, settings, None, &saved)),
            store,
            write: Mutex::new(()),
            reloads: tokio::sync::watch::Sender::new(0),
            notifier: std::sync::OnceLock::new(),
            cluster: Mutex::new((stamp, BTreeMap::new())),
            unpushed: Mutex::new(Vec::new()),
        })
    }

    /// Puts a reloaded `config` in force for every request that starts
    /// after this returns; requests in flight keep the snapshot they loaded.
    ///
    /// Carried over: each surviving service's saved state (active and
    /// previous color, maintenance, and any field added to it later), the
    /// health of every backend address that stays in the same service and
    /// color (the same `Arc<Pool>`, with its round robin and in-flight
    /// counts, when the pool is unchanged), and every limit whose name and
    /// settings are unchanged. New services start on their saved state, or
    /// on their configured `active`; removed ones drop out.
    pub fn reload(&self, config: &Config, settings: Settings) -> Reloaded {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        // Validated before (switchyard check reads it too); a state file
        // that went bad since only costs the new services their saved colors.
        let saved = self.store.load().ok().flatten().unwrap_or_default();
        let next = Snapshot::build(config, settings, Some(&old), &saved);
        let changes = next.changes_from(&old);
        self.current.store(Arc::new(next));
        self.reloads.send_modify(|n| *n += 1);
        changes
    }

    /// Changes each time a reload is in force (see [`Switchboard::reload`]).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// The snapshot for one request. Cheap: one atomic load and a refcount.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `to` the active color of `service`: the `0/100` case of
    /// [`Switchboard::set_weights`]. Returns once every new request goes to
    /// `to`; switching to the color that already takes everything changes
    /// nothing. Unless `force`, a color without enough healthy backends is
    /// refused. `actor` is recorded in the history with the reason.
    pub fn switch(
        &self,
        service: &str,
        to: Color,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.set_weights(service, Weights::all(to), kind, reason, force, actor)
    }

    /// Splits new requests of `service` by `to`. A color that gets traffic
    /// it did not have must pass the health gate unless `force`; the color
    /// taking 100 % becomes the active one (the other its `previous`).
    /// Requests already running stay where they started. Recorded in the
    /// history with `reason` and `actor`, counted and notified.
    pub fn set_weights(
        &self,
        service: &str,
        to: Weights,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.steer(service, kind, reason, force, actor, |_| Ok(to))
    }

    /// The one path that moves traffic: under the write lock, `target`
    /// picks the weights from the state as it is now (so a rollback's
    /// destination cannot go stale between reading and writing), the
    /// health gate is asked for a color that gains traffic unless `force`,
    /// and the change is persisted, published and recorded.
    fn steer(
        &self,
        service: &str,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
        target: impl FnOnce(&ServiceState) -> Result<Weights, SwitchError>,
    ) -> Result<ServiceState, SwitchError> {
        // While Redis is unreachable, a forced change and a rollback (back
        // to where traffic was) go through on this instance alone.
        let local_ok = force || kind == SwitchKind::Rollback;
        let before = self.change(service, local_ok, |state| {
            let to = target(state)?;
            if state.weights == to {
                return Ok(None);
            }
            if !force {
                state.gate_gaining(to)?;
            }
            let before = state.clone();
            if let Some(sole) = to.sole().filter(|&c| c != state.active) {
                state.previous = Some(state.active);
                state.active = sole;
            }
            state.weights = to;
            state.moves += 1;
            state.last_move = Some(kind);
            Ok(Some(before))
        })?;
        let after = self.service(service)?;
        if let Some(before) = before {
            self.record_change(&before, &after, kind, reason, force, actor);
        }
        Ok(after)
    }

    /// Counts, logs, records and notifies one change of a service's split.
    fn record_change(
        &self,
        before: &ServiceState,
        after: &ServiceState,
        kind: SwitchKind,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) {
        let service = &*after.name;
        let (from, to) = (before.active, after.active);
        let rollback = kind == SwitchKind::Rollback;
        // A color change or a rollback moves traffic back and forth; a
        // canary step is not a switch (`switchyard_traffic_weight` shows it).
        if from != to || rollback {
            let cause = match (kind, force) {
                (SwitchKind::Rollback, _) => SwitchCause::Rollback,
                (SwitchKind::Switch, true) => SwitchCause::Forced,
                (SwitchKind::Switch, false) => SwitchCause::Switch,
            };
            if let Some((_, state)) = self.load().service(service) {
                state.count_switch(cause);
            }
        }
        let split = after.canary().map(|_| after.weights);
        let reason = reason.unwrap_or_else(|| {
            match (kind, split) {
                (SwitchKind::Rollback, _) => "rollback",
                (SwitchKind::Switch, Some(_)) => "weights",
                (SwitchKind::Switch, None) => "switch",
            }
            .to_string()
        });
        tracing::info!(service, %from, %to, weights = %after.weights, force, reason = %reason, %actor, "traffic moved");
        let notice = match (from != to || rollback, split) {
            (true, _) | (false, None) => {
                crate::notify::Notice::switched(service, from, to, rollback, &reason)
            }
            (false, Some(w)) => crate::notify::Notice::weights(service, before.weights, w, &reason),
        };
        self.append_history(Event {
            from,
            ..entry(after, reason, actor)
        });
        self.notify(notice.by(actor));
    }

    /// Sends all traffic of `service` back where it came from: to the
    /// active color when a split is under way, else to the previous color.
    pub fn rollback(
        &self,
        service: &str,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.rollback_if(service, None, reason, force, actor)
    }

    /// [`Switchboard::rollback`], only if the service has not moved since
    /// the state its caller judged (`moves`, when given; else
    /// [`SwitchError::Moved`]): how the rollback watcher and `ctl deploy`
    /// roll back, so a command that lands after their verdict is never
    /// rolled back on figures about a state that is gone.
    pub fn rollback_if(
        &self,
        service: &str,
        moves: Option<u64>,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        self.steer(
            service,
            SwitchKind::Rollback,
            reason,
            force,
            actor,
            |state| {
                if moves.is_some_and(|m| m != state.moves) {
                    return Err(SwitchError::Moved(service.to_string()));
                }
                state
                    .rollback_target()
                    .map(Weights::all)
                    .ok_or_else(|| SwitchError::NoPrevious(service.to_string()))
            },
        )
    }

    /// Puts `service` back exactly as `to` was (active, previous, weights):
    /// how an aborted deploy restores the state from before it. Recorded
    /// as a rollback with `reason` and `actor`; the health gate is asked
    /// for a color that regains traffic unless `force`. Only while the
    /// service's `moves` is still `if_moves` (the caller's last own change):
    /// a change someone made since is never undone ([`SwitchError::Moved`]).
    pub fn restore(
        &self,
        service: &str,
        to: &ServiceState,
        if_moves: u64,
        reason: Option<String>,
        force: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        let before = self.change(service, true, |state| {
            if state.moves != if_moves {
                return Err(SwitchError::Moved(service.to_string()));
            }
            if (state.active, state.previous, state.weights) == (to.active, to.previous, to.weights)
            {
                return Ok(None);
            }
            if !force {
                state.gate_gaining(to.weights)?;
            }
            let before = state.clone();
            state.active = to.active;
            state.previous = to.previous;
            state.weights = to.weights;
            state.moves += 1;
            state.last_move = Some(SwitchKind::Rollback);
            Ok(Some(before))
        })?;
        let after = self.service(service)?;
        if let Some(before) = before {
            self.record_change(&before, &after, SwitchKind::Rollback, reason, force, actor);
        }
        Ok(after)
    }

    /// Appends a history entry that changes nothing (from and to are the
    /// active color, with the split if any): how `ctl deploy` records its
    /// outcome next to the steps it took.
    pub fn note(&self, service: &str, reason: String, actor: &Actor) -> Result<(), SwitchError> {
        let state = self.service(service)?;
        self.append_history(entry(&state, reason, actor));
        Ok(())
    }

    /// Turns maintenance mode of `service` on or off; recorded in the
    /// history with `actor` (the colors unchanged).
    pub fn set_maintenance(
        &self,
        service: &str,
        on: bool,
        actor: &Actor,
    ) -> Result<ServiceState, SwitchError> {
        let changed = self.change(service, false, |state| {
            let changed = state.maintenance != on;
            state.maintenance = on;
            Ok(changed)
        })?;
        let after = self.service(service)?;
        if changed {
            tracing::info!(service, on, %actor, "maintenance mode");
            let what = if on { "on" } else { "off" };
            self.append_history(Event {
                maintenance: Some(on),
                ..entry(&after, format!("maintenance {what}"), actor)
            });
            // Webhooks: maintenance on/off is a `switch` event (notify.rs).
            self.notify(crate::notify::Notice::maintenance(service, on).by(actor));
        }
        Ok(after)
    }

    /// Records in the history what a config reload did to each service:
    /// added, removed, or a pool whose backends changed (`before`: the
    /// snapshot the reload replaced). Colors are never changed by a reload.
    pub fn note_reload(&self, before: &Snapshot, actor: &Actor) {
        let after = self.load();
        let event =
            |s: &ServiceState, reason: String| entry(s, format!("config reload: {reason}"), actor);
        for s in &after.services {
            let Some((_, old)) = before.service(&s.name) else {
                self.append_history(event(s, "service added".into()));
                continue;
            };
            for color in Color::ALL {
                let (was, now) = (old.pool(color), s.pool(color));
                if !Arc::ptr_eq(was, now) {
                    let list = |p: &Pool| {
                        let addrs: Vec<String> =
                            p.backends.iter().map(|b| b.addr.to_string()).collect();
                        addrs.join(", ")
                    };
                    let reason = match (list(now), list(was)) {
                        (now, was) if now == was => {
                            format!("{color} pool rebuilt ({now}): connect_timeout or health check changed")
                        }
                        (now, was) => format!("{color} pool now {now} (was {was})"),
                    };
                    self.append_history(event(s, reason));
                }
            }
        }
        for s in &before.services {
            if after.service(&s.name).is_none() {
                self.append_history(event(s, "service removed".into()));
            }
        }
    }

    /// Appends one history line, here and (with `[cluster]`) to the
    /// cluster's stream. The change itself is durable and live by now;
    /// losing its history line is worth an alarm, not worth undoing it.
    fn append_history(&self, mut event: Event) {
        let link = self.link();
        event.instance = link.as_ref().map(|l| l.instance.clone());
        if let Err(err) = self.store.append_history(&event) {
            tracing::error!(cause = %err, service = %event.service, "state changed but its history entry was not written");
        }
        let Some(link) = link else {
            return;
        };
        // While Redis is known to be down, no second wait for the same
        // timeout: the entry waits for the sync to push it.
        let written = link.is_up() && {
            let (redis, shared) = (link.redis.clone(), event.clone());
            match link.block_on(async move { redis.append_history(&shared).await }) {
                Ok(()) => true,
                Err(err) => {
                    link.mark_down(&err);
                    false
                }
            }
        };
        if !written {
            tracing::warn!(service = %event.service, "redis unreachable: history entry kept here until it returns");
            let mut unpushed = self.unpushed_history();
            if unpushed.len() >= crate::store::HISTORY_LIMIT {
                unpushed.remove(0);
            }
            unpushed.push(event);
        }
    }

    fn unpushed_history(&self) -> MutexGuard<'_, Vec<Event>> {
        self.unpushed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.current.load().settings.cluster.clone()
    }

    /// Sends what happens here to `notifier` from now on (first call wins).
    pub fn set_notifier(&self, notifier: Arc<crate::notify::Notifier>) {
        let _ = self.notifier.set(notifier);
    }

    /// Queues `notice` for the webhooks; returns at once (see `notify.rs`).
    pub fn notify(&self, notice: crate::notify::Notice) {
        if let Some(n) = self.notifier.get() {
            n.notify(notice);
        }
    }

    /// The current state of one service.
    pub fn service(&self, service: &str) -> Result<ServiceState, SwitchError> {
        self.load()
            .service(service)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| SwitchError::UnknownService(service.to_string()))
    }

    /// The one write path: edit a copy of `service`, write it to the
    /// cluster (with `[cluster]`), persist, then publish. `edit` returns
    /// what the caller wants back; a change that leaves the state equal is
    /// neither written, persisted nor published. `local_ok`: while Redis is
    /// unreachable the change may go through on this instance alone.
    fn change<T>(
        &self,
        service: &str,
        local_ok: bool,
        edit: impl FnOnce(&mut ServiceState) -> Result<T, SwitchError>,
    ) -> Result<T, SwitchError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.current.load_full();
        let (index, state) = snap
            .service(service)
            .ok_or_else(|| SwitchError::UnknownService(service.to_string()))?;
        let mut next = state.clone();
        let out = edit(&mut next)?;
        if (next.active, next.previous, next.weights, next.maintenance)
            == (
                state.active,
                state.previous,
                state.weights,
                state.maintenance,
            )
        {
            return Ok(out);
        }
        let mut services = snap.services.clone();
        services[index] = next;
        let next = snap.with_services(services);
        let mut cluster = self.cluster_state();
        let mut saved = saved_state(&next, &cluster.1);
        if let Some(link) = &next.settings.cluster {
            // Redis first: a change it refuses changes nothing here.
            let stamp = self.push(link, &mut cluster, &saved, local_ok)?;
            saved.cluster = Some(stamp);
        } else {
            // Alone (no `[cluster]`) after being in one: keep the stamp,
            // marked as a change Redis does not have, so that on joining
            // again this state is offered as newer than the one left,
            // never older than another instance's copy of that one.
            saved.cluster = cluster.0.clone().map(|s| Stamp { local: true, ..s });
        }
        // Persist before publishing: if the disk refuses, nothing has
        // changed here (with `[cluster]`, the next sync puts Redis's
        // newer state in force).
        self.store.save(&saved)?;
        cluster.0 = saved.cluster;
        self.current.store(Arc::new(next));
        Ok(out)
    }

    fn cluster_state(&self) -> MutexGuard<'_, (Option<Stamp>, BTreeMap<String, SavedService>)> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `saved` to Redis as the version after the one served, and
    /// returns its stamp. On a conflict, Redis's state is put in force
    /// here at once and the change refused
    /// ([`SwitchError::ClusterConflict`]); with Redis unreachable, refused
    /// ([`SwitchError::ClusterDown`]) unless `local_ok`, which keeps it on
    /// this instance, marked, for the sync to push when Redis returns.
    fn push(
        &self,
        link: &Arc<Link>,
        cluster: &mut (Option<Stamp>, BTreeMap<String, SavedService>),
        saved: &SavedState,
        local_ok: bool,
    ) -> Result<Stamp, SwitchError> {
        let served = cluster.0.clone();
        let since = link.since();
        let outcome = match served.as_ref().filter(|s| !s.local) {
            Some(stamp) => {
                let (redis, stamp, state) = (link.redis.clone(), stamp.clone(), saved.clone());
                link.block_on(async move {
                    match redis.change(&stamp, &state).await {
                        // The answer may be lost after Redis took the change
                        // (a slow Redis, a dropped connection): look once
                        // before calling it refused, or the change would be
                        // in force everywhere but reported as refused here.
                        Err(e @ ClusterError::Timeout { .. }) => match redis.read().await {
                            Ok(Some(held)) if took(&stamp, &state, &held) => Ok(held.version),
                            _ => Err(e),
                        },
                        other => other,
                    }
                })
            }
            // Never synced since start, or holding a local change the sync
            // has not pushed yet: nothing to compare and set against.
            None => Err(ClusterError::Unreachable {
                redis: link.redis.url().to_string(),
                detail: match served {
                    Some(_) => "this instance holds a change made while redis was unreachable, \
                                not pushed yet"
                        .into(),
                    None => match link.last_error() {
                        Some(e) => {
                            format!("this instance has not synced with it since it started ({e})")
                        }
                        None => "this instance has not synced with it since it started".into(),
                    },
                },
            }),
        };
        // Whether `failure` came from a call to Redis (an outage to log),
        // rather than from this instance not being able to ask.
        let mut asked = served.as_ref().is_some_and(|s| !s.local);
        let failure = match outcome {
            Ok(version) => {
                link.mark_up(since);
                let epoch = served.map(|s| s.epoch).unwrap_or_default();
                return Ok(Stamp {
                    version,
                    epoch,
                    local: false,
                });
            }
            Err(conflict @ ClusterError::Conflict { .. }) => {
                let redis = link.redis.clone();
                match link.block_on(async move { redis.read().await }) {
                    Ok(Some(held)) => {
                        link.mark_up(since);
                        self.adopt_locked(cluster, &held);
                        return Err(SwitchError::ClusterConflict(conflict.to_string()));
                    }
                    // Emptied since (restarted without persistence): the
                    // sync re-seeds it within a check interval.
                    Ok(None) => {
                        asked = false;
                        ClusterError::Unreachable {
                            redis: link.redis.url().to_string(),
                            detail: "it holds no state (restarted empty?) until the sync \
                                     re-seeds it"
                                .into(),
                        }
                    }
                    // A state this instance cannot read (a malformed key)
                    // cannot be followed either: as if Redis did not answer,
                    // so a rollback or a forced change still goes through.
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if asked {
            link.mark_down(&failure);
        }
        if !local_ok {
            return Err(SwitchError::ClusterDown(failure.to_string()));
        }
        tracing::warn!(cause = %failure, "redis unreachable: change applied on this instance only; it is pushed to redis when it returns");
        Ok(Stamp {
            local: true,
            ..served.unwrap_or_default()
        })
    }

    /// Puts the cluster's state `held` in force when it is newer than the
    /// one served (see the note on versions in `cluster/state.rs`): each
    /// service's colors, split and maintenance, as one snapshot. Requests
    /// in flight keep theirs. Nothing is counted, notified or recorded in
    /// the history: the instance that made the change did that.
    fn adopt_locked(
        &self,
        cluster: &mut (Option<Stamp>, BTreeMap<String, SavedService>),
        held: &Versioned,
    ) {
        let newer = cluster
            .0
            .as_ref()
            .is_none_or(|s| s.epoch != held.epoch || held.version > s.version);
        if !newer {
            return;
        }
        if let Some(s) = cluster.0.as_ref().filter(|s| s.local) {
            tracing::error!(
                local_from = s.version,
                cluster_version = held.version,
                "a change made on this instance while redis was unreachable is overruled by the \
                 cluster's newer state (see the history)"
            );
        }
        let snap = self.current.load_full();
        let mut services = snap.services.clone();
        let mut moved = Vec::new();
        for s in services.iter_mut() {
            let Some(saved) = held.state.services.get(&*s.name) else {
                continue;
            };
            let weights = saved.weights.unwrap_or(Weights::all(saved.active));
            let now = (s.active, s.previous, s.weights, s.maintenance);
            if now == (saved.active, saved.previous, weights, saved.maintenance) {
                continue;
            }
            s.active = saved.active;
            s.previous = saved.previous;
            s.weights = weights;
            s.maintenance = saved.maintenance;
            s.moves += 1;
            s.last_move = Some(match saved.rolled_back {
                true => SwitchKind::Rollback,
                false => SwitchKind::Switch,
            });
            moved.push(s.name.to_string());
        }
        cluster.1 = held
            .state
            .services
            .iter()
            .filter(|(name, _)| snap.service(name).is_none())
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        let next = snap.with_services(services);
        let mut saved = saved_state(&next, &cluster.1);
        saved.cluster = Some(Stamp {
            version: held.version,
            epoch: held.epoch.clone(),
            local: false,
        });
        if let Err(e) = self.store.save(&saved) {
            // Served all the same: Redis holds it, and a restart syncs again.
            tracing::error!(cause = %e, "cluster state applied but not saved locally");
        }
        cluster.0 = saved.cluster;
        if !moved.is_empty() {
            self.current.store(Arc::new(next));
            tracing::info!(version = held.version, services = ?moved, "cluster state applied");
        }
    }

    /// The last [`crate::store::HISTORY_LIMIT`] color changes, oldest
    /// first; of `service` only, when given. With `[cluster]`, the
    /// cluster's (every instance's changes), or this instance's own while
    /// Redis is unreachable (entries made then stay local).
    pub fn history(&self, service: Option<&str>) -> Result<Vec<Event>, StoreError> {
        if let Some(link) = self.link().filter(|l| l.is_up()) {
            let (redis, svc) = (link.redis.clone(), service.map(str::to_string));
            let limit = crate::store::HISTORY_LIMIT;
            match link.block_on(async move { redis.history(svc.as_deref(), limit).await }) {
                Ok(events) => return Ok(events),
                Err(e) => {
                    link.mark_down(&e);
                    tracing::warn!(cause = %e, "history: redis unreachable, showing this instance's own");
                }
            }
        }
        self.store.history(service)
    }

    /// Where the state served stands in the cluster (`None`: no
    /// `[cluster]`, or never synced).
    pub fn stamp(&self) -> Option<Stamp> {
        self.cluster_state().0.clone()
    }

    /// Requests in flight across every pool.
    pub fn in_flight(&self) -> usize {
        self.load()
            .services
            .iter()
            .flat_map(|s| Color::ALL.map(|c| s.pool(c).clone()))
            .map(|p| p.in_flight())
            .sum()
    }
}

/// What `snap` saves (and, with `[cluster]`, shares), plus `others`:
/// services the cluster holds that this instance does not serve.
fn saved_state(snap: &Snapshot, others: &BTreeMap<String, SavedService>) -> SavedState {
    let mut services = others.clone();
    services.extend(snap.services.iter().map(|s| {
        (
            s.name.to_string(),
            SavedService {
                active: s.active,
                previous: s.previous,
                weights: s.canary().map(|_| s.weights),
                maintenance: s.maintenance,
                rolled_back: s.last_move == Some(SwitchKind::Rollback),
            },
        )
    }));
    SavedState {
        version: SavedState::VERSION,
        services,
        cluster: None,
    }
}

impl cluster::sync::Replica for Switchboard {
    fn served(&self) -> (SavedState, Option<Stamp>) {
        let cluster = self.cluster_state();
        let saved = saved_state(&self.current.load(), &cluster.1);
        (saved, cluster.0.clone())
    }

    fn adopt(&self, held: &Versioned) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut cluster = self.cluster_state();
        self.adopt_locked(&mut cluster, held);
    }

    fn take_history(&self) -> Vec<Event> {
        std::mem::take(&mut *self.unpushed_history())
    }

    fn keep_history(&self, mut events: Vec<Event>) {
        let mut unpushed = self.unpushed_history();
        events.append(&mut unpushed);
        let over = events.len().saturating_sub(crate::store::HISTORY_LIMIT);
        events.drain(..over);
        *unpushed = events;
    }
}

/// Whether Redis holds, one version after `expected`, the very state a
/// change whose answer was lost wrote: then that change was taken.
fn took(expected: &Stamp, sent: &SavedState, held: &Versioned) -> bool {
    held.epoch == expected.epoch
        && held.version == expected.version + 1
        && held.state.services == sent.services
}

/// A history entry for `state` as it is now, stamped now: `from` and `to`
/// its active color, its split while one is under way. Callers change
/// what differs (the color it came from, a maintenance flag).
fn entry(state: &ServiceState, reason: String, actor: &Actor) -> Event {
    Event {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        service: state.name.to_string(),
        from: state.active,
        to: state.active,
        weights: state.canary().map(|_| state.weights),
        maintenance: None,
        reason,
        actor: actor.clone(),
        instance: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::InFlight;
    use crate::store::MemoryStore;
    use std::time::Duration;

    fn who() -> Actor {
        Actor::token("test")
    }
    use std::path::Path;

    fn settings(config: &Config) -> Settings {
        let pages = crate::respond::Pages::new(None, Duration::from_secs(1)).unwrap();
        Settings::new(&config.server, pages)
    }

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
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let snap = board.load();
        let pool = snap.services[0].active_pool();
        let picks: Vec<u16> = (0..4)
            .map(|_| pool.select(None).unwrap().addr.port())
            .collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }

    #[test]
    fn switch_is_atomic_and_leaves_old_snapshots_alone() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let before = board.load();
        let after = board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
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
        let back = board.rollback("api", None, false, &who()).unwrap();
        assert_eq!(back.active, Color::Blue);
        let reasons: Vec<String> = board
            .history(None)
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, vec!["switch", "rollback"]);
    }

    #[test]
    fn errors_change_nothing() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        assert!(matches!(
            board.switch(
                "nope",
                Color::Green,
                SwitchKind::Switch,
                None,
                false,
                &who()
            ),
            Err(SwitchError::UnknownService(_))
        ));
        assert!(matches!(
            board.rollback("api", None, false, &who()),
            Err(SwitchError::NoPrevious(_))
        ));
        assert_eq!(board.load().services[0].active, Color::Blue);
        assert!(board.history(None).unwrap().is_empty());
    }

    #[test]
    fn switch_waits_for_health_unless_forced() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[services.api]
blue = ["127.0.0.1:1"]
green = ["127.0.0.1:3", "127.0.0.1:4"]
health = { path = "/ping", rise = 1, fall = 1 }
min_healthy = 1
"#,
        )
        .unwrap();
        let board =
            Switchboard::with_settings(&config, settings(&config), Box::<MemoryStore>::default())
                .unwrap();
        let switch =
            |force| board.switch("api", Color::Green, SwitchKind::Switch, None, force, &who());
        // Unknown health does not count as healthy.
        let err = switch(false).unwrap_err().to_string();
        assert!(err.contains("0 healthy backends of 1 required"), "{err}");
        assert_eq!(board.load().services[0].active, Color::Blue);
        let green = board.load().services[0].pool(Color::Green).clone();
        green.backends[0]
            .health
            .record(Err("connect: refused".into()), 1, 1);
        green.backends[1].health.record(Ok(()), 1, 1);
        assert_eq!(switch(false).unwrap().active, Color::Green);
        // An unhealthy backend leaves rotation.
        assert!((0..4).all(|_| green.select(None).unwrap().addr.port() == 4));
        // Blue was never checked: rolling back to it needs force too.
        assert!(board.rollback("api", None, false, &who()).is_err());
        board.rollback("api", None, true, &who()).unwrap();
        green.backends[1]
            .health
            .record(Err("status 500".into()), 1, 1);
        assert!(green.select(None).is_none());
        assert_eq!(switch(true).unwrap().active, Color::Green);
    }

    #[test]
    fn maintenance_is_part_of_the_snapshot() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        assert!(
            board
                .set_maintenance("api", true, &who())
                .unwrap()
                .maintenance
        );
        assert!(board.load().services[0].maintenance);
        assert!(
            !board
                .set_maintenance("api", false, &who())
                .unwrap()
                .maintenance
        );
        assert!(matches!(
            board.set_maintenance("nope", true, &who()),
            Err(SwitchError::UnknownService(_))
        ));
    }

    #[test]
    fn weights_split_new_requests_and_a_switch_is_their_extreme() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let split = |blue, green| {
            board.set_weights(
                "api",
                Weights::new(blue, green).unwrap(),
                SwitchKind::Switch,
                None,
                false,
                &who(),
            )
        };
        let s = split(90, 10).unwrap();
        assert_eq!(
            (s.active, s.canary(), s.previous),
            (Color::Blue, Some(Color::Green), None)
        );
        // Every 100 requests without a bucket: exactly the split.
        let greens = (0..1000)
            .filter(|_| s.pick(None).color == Color::Green)
            .count();
        assert_eq!(greens, 100);
        // A bucket decides by itself: the lowest `green` buckets go green.
        assert_eq!(s.pick(Some(9)).color, Color::Green);
        assert_eq!(s.pick(Some(10)).color, Color::Blue);
        // A rollback of a split returns everything to the active color.
        assert_eq!(
            board.rollback("api", None, false, &who()).unwrap().weights,
            Weights::all(Color::Blue)
        );
        // 0/100 is a switch: green active, blue previous, counted as one.
        let s = split(0, 100).unwrap();
        assert_eq!(
            (s.active, s.previous, s.canary()),
            (Color::Green, Some(Color::Blue), None)
        );
        assert_eq!(s.pick(Some(99)).color, Color::Green);
        assert_eq!(board.load().services[0].switches(), [1, 0, 1]);
        let history = board.history(None).unwrap();
        let split_steps: Vec<_> = history
            .iter()
            .map(|e| (e.reason.as_str(), e.weights))
            .collect();
        assert_eq!(
            split_steps,
            vec![
                (
                    "weights",
                    Some(Weights {
                        blue: 90,
                        green: 10
                    })
                ),
                ("rollback", None),
                ("switch", None),
            ]
        );
        assert!(Weights::new(50, 51).is_err());
        assert!(Weights::new(300, 0).is_err());
    }

    #[test]
    fn a_conditional_rollback_never_undoes_a_later_command() {
        let board = Switchboard::new(&config(), Box::<MemoryStore>::default()).unwrap();
        let judged = board
            .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
            .unwrap();
        // An operator moves on after the verdict was reached...
        board
            .set_weights(
                "api",
                Weights::new(50, 50).unwrap(),
                SwitchKind::Switch,
                None,
                false,
                &who(),
            )
            .unwrap();
        // ...so the verdict's rollback is refused and changes nothing.
        let late = board.rollback_if("api", Some(judged.moves), None, false, &who());
        assert!(matches!(late, Err(SwitchError::Moved(_))), "{late:?}");
        assert_eq!(
            board.load().services[0].weights,
            Weights::new(50, 50).unwrap()
        );
        // On the state it judged, it rolls back.
        let now = board.service("api").unwrap().moves;
        let back = board
            .rollback_if("api", Some(now), None, false, &who())
            .unwrap();
        assert_eq!(back.weights, Weights::all(Color::Green));
    }

    #[test]
    fn in_flight_is_counted_per_pool() {
        let board = Switchboard::with_settings(
            &config(),
            settings(&config()),
            Box::<MemoryStore>::default(),
        )
        .unwrap();
        let pool = board.load().services[0].active_pool().clone();
        let a = InFlight::new(pool.clone());
        let b = InFlight::new(pool.clone());
        assert_eq!(board.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.in_flight(), 0);
    }

    #[test]
    fn reload_carries_colors_health_pools_and_unchanged_limits() {
        let text = r#"
[services.api]
blue = ["127.0.0.1:1", "127.0.0.1:2"]
green = ["127.0.0.1:3"]
health = { path = "/ping", rise = 1, fall = 1 }

[services.old]
blue = ["127.0.0.1:7"]
green = ["127.0.0.1:8"]

[rate_limits.writes]
rate = "1/m"

[rate_limits.reads]
rate = "5/m"

[[routes]]
path = "/"
service = "api"
rate_limit = "writes"

[[routes]]
path = "/old/"
service = "old"
rate_limit = "reads"
"#;
        let config = Config::parse(Path::new("t.toml"), text).unwrap();
        let board =
            Switchboard::with_settings(&config, settings(&config), Box::<MemoryStore>::default())
                .unwrap();
        board
            .switch("api", Color::Green, SwitchKind::Switch, None, true, &who())
            .unwrap();
        board.set_maintenance("api", true, &who()).unwrap();
        let before = board.load();
        let blue = before.services[0].pool(Color::Blue).clone();
        blue.backends[1].health.record(Ok(()), 1, 1);
        let running = InFlight::new(blue.clone());
        // Blue loses 127.0.0.1:1; green is unchanged; `old` goes, `new`
        // comes; `writes` stays as it was, `reads` changes.
        let next = text
            .replace(
                r#"blue = ["127.0.0.1:1", "127.0.0.1:2"]"#,
                r#"blue = ["127.0.0.1:2"]"#,
            )
            .replace("[services.old]", "[services.new]")
            .replace(r#"service = "old""#, r#"service = "new""#)
            .replace(r#"rate = "5/m""#, r#"rate = "6/m""#)
            .replace(r#"path = "/old/""#, r#"path = "/new/""#);
        let next = Config::parse(Path::new("t.toml"), &next).unwrap();
        let changes = board.reload(&next, settings(&next));
        assert_eq!(changes.services_added, vec!["new"]);
        assert_eq!(changes.services_removed, vec!["old"]);
        assert_eq!(changes.routes_added, vec!["*/new/"]);
        assert_eq!(changes.routes_removed, vec!["*/old/"]);
        assert_eq!(changes.limits_reset, vec!["rate_limit:reads"]);
        let after = board.load();
        let api = &after.services[0];
        assert_eq!(
            (api.active, api.previous, api.maintenance),
            (Color::Green, Some(Color::Blue), true)
        );
        assert!(Arc::ptr_eq(
            api.pool(Color::Green),
            before.services[0].pool(Color::Green)
        ));
        let new_blue = api.pool(Color::Blue);
        assert!(!Arc::ptr_eq(new_blue, &blue));
        assert_eq!(new_blue.backends.len(), 1);
        assert!(Arc::ptr_eq(
            &new_blue.backends[0].health,
            &blue.backends[1].health
        ));
        assert_eq!(new_blue.healthy(), 1);
        // A request still on the old pool counts on its color until it ends.
        assert_eq!(new_blue.in_flight(), 1);
        drop(running);
        assert_eq!(new_blue.in_flight(), 0);
        assert_eq!(after.services[1].name.as_ref(), "new");
        assert_eq!(after.services[1].active, Color::Blue);
        let kept = |s: &Snapshot| {
            let l = s.rate_limits.iter().find(|l| l.name() == "writes");
            l.map(|l| l as *const _)
        };
        assert_eq!(kept(&before), kept(&after));
        // The old snapshot is untouched: requests that hold it finish on it.
        assert_eq!(before.services[1].name.as_ref(), "old");
        assert_eq!(before.routes.label(1), Some("*/old/"));
        // A color change after the reload shares the config-derived parts.
        board.set_maintenance("api", false, &who()).unwrap();
        assert!(Arc::ptr_eq(&board.load().routes, &after.routes));
    }
}
