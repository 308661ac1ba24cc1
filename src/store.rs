//! Durable state: the active color of every service and the history of
//! switches, so a restart comes back on the colors it had.
//!
//! `state.json` is always written whole (temp file, fsync, rename, fsync of the
//! directory), so a crash leaves either the old or the new file, never half of
//! one. `history.jsonl` is appended one JSON line per switch and fsynced.
//! The [`StateStore`] trait is the seam where a shared backend (Redis) can go
//! when several instances must agree on colors.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pools::{Color, Weights};

/// History entries returned by the admin API at most (newest kept).
pub const HISTORY_LIMIT: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub version: u32,
    pub services: BTreeMap<String, SavedService>,
    /// With `[cluster]`: which cluster state this is (kept in the local
    /// file only, never in Redis). Absent for a lone instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Stamp>,
}

/// Where a state stands in the cluster's sequence of states: the
/// version Redis holds it under, the lineage (`epoch`) that version
/// counts in, and whether this instance changed it locally since (a
/// change forced while Redis was unreachable, not yet in Redis). See the
/// note on versions in `cluster/state.rs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stamp {
    pub version: u64,
    /// A random id chosen by whoever seeded the cluster's Redis; a new
    /// one after Redis lost its data.
    pub epoch: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl Stamp {
    /// The version this state claims when offered to Redis: one past the
    /// version it came from when it holds a local change.
    pub fn offered(&self) -> u64 {
        self.version.max(1) + u64::from(self.local)
    }
}

impl SavedState {
    pub const VERSION: u32 = 1;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedService {
    pub active: Color,
    pub previous: Option<Color>,
    /// The split while a canary is under way; absent: all on `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    #[serde(default)]
    pub maintenance: bool,
    /// Whether the last move was a rollback (the rollback watcher never
    /// judges one); carried so that every instance of a cluster knows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
}

/// One change of a service's traffic (a switch, a rollback, a canary step,
/// maintenance on or off), as kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub service: String,
    pub from: Color,
    pub to: Color,
    /// The split after the change when traffic is divided between the
    /// colors; absent when all of it is on `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    /// Set when the change turned maintenance mode on (`true`) or off;
    /// the colors are then unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    pub reason: String,
    /// Who or what made the change. Lines written before it was recorded
    /// read as [`Actor::UNRECORDED`].
    #[serde(default = "Actor::unrecorded")]
    pub actor: Actor,
    /// With `[cluster]`: the instance the change was made through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Who or what changed a service's state, as the history records it:
/// `token:NAME` for the admin token named NAME (`default`, `env` or an
/// `[[admin.tokens]]` name), or one of switchyard's own movers (`deploy`,
/// `rollback-watcher`, `reload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Actor(String);

impl Actor {
    /// `ctl deploy` walking its steps.
    pub const DEPLOY: &'static str = "deploy";
    /// The automatic rollback watcher.
    pub const ROLLBACK_WATCHER: &'static str = "rollback-watcher";
    /// A config reload.
    pub const RELOAD: &'static str = "reload";
    /// History lines from before the actor was recorded.
    pub const UNRECORDED: &'static str = "unrecorded";

    /// The holder of the admin token named `name`.
    pub fn token(name: &str) -> Actor {
        Actor(format!("token:{name}"))
    }

    /// A `ctl deploy` run by `by` (the admin token's holder):
    /// `deploy:token:NAME`, so the history says who deployed.
    pub fn deploy(by: &Actor) -> Actor {
        Actor(format!("{}:{}", Self::DEPLOY, by.0))
    }

    /// A config reload asked for by `by` (`token:NAME`, `sighup`):
    /// `reload:token:NAME`.
    pub fn reload(by: &Actor) -> Actor {
        Actor(format!("{}:{}", Self::RELOAD, by.0))
    }

    /// One of switchyard's own movers, e.g. [`Actor::DEPLOY`].
    pub fn internal(what: &'static str) -> Actor {
        Actor(what.to_string())
    }

    fn unrecorded() -> Actor {
        Actor(Self::UNRECORDED.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: saved state is corrupt ({detail}); fix the file, or move it away to start on the \
         `active` colors from the config",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
}

pub trait StateStore: Send + Sync {
    /// The saved state, or `None` when nothing was saved yet.
    fn load(&self) -> Result<Option<SavedState>, StoreError>;
    fn save(&self, state: &SavedState) -> Result<(), StoreError>;
    fn append_history(&self, event: &Event) -> Result<(), StoreError>;
    /// The last [`HISTORY_LIMIT`] events (of `service` only, when given),
    /// oldest first.
    fn history(&self, service: Option<&str>) -> Result<Vec<Event>, StoreError>;
}

/// State kept in files under `state_dir`.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub const STATE_FILE: &'static str = "state.json";
    pub const HISTORY_FILE: &'static str = "history.jsonl";

    /// Opens (and creates, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    /// A store over `dir` that creates nothing, for `switchyard check`.
    pub fn existing(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<SavedState>, StoreError> {
        let path = self.path(Self::STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let state: SavedState = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if state.version != SavedState::VERSION {
            return Err(StoreError::Corrupt {
                path,
                detail: format!(
                    "version {} is not the supported version {}",
                    state.version,
                    SavedState::VERSION
                ),
            });
        }
        Ok(Some(state))
    }

    fn save(&self, state: &SavedState) -> Result<(), StoreError> {
        let path = self.path(Self::STATE_FILE);
        let tmp = self.path("state.json.tmp");
        let mut bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        bytes.push(b'\n');
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        // The rename is only durable once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    fn append_history(&self, event: &Event) -> Result<(), StoreError> {
        let path = self.path(Self::HISTORY_FILE);
        use std::os::unix::fs::FileExt;
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // After a crash mid-append the file may end in half a line: start a
        // fresh line so the new event is not glued onto the torn one.
        let len = f.metadata().map_err(io_err(&path))?.len();
        let mut last = [b'\n'];
        if len > 0 {
            f.read_at(&mut last, len - 1).map_err(io_err(&path))?;
        }
        let mut line = Vec::with_capacity(256);
        if last[0] != b'\n' {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, event).expect("event serializes");
        line.push(b'\n');
        f.write_all(&line).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))
    }

    fn history(&self, service: Option<&str>) -> Result<Vec<Event>, StoreError> {
        let path = self.path(Self::HISTORY_FILE);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut events = std::collections::VecDeque::new();
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io_err(&path))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Event>(&line) {
                Ok(e) if service.is_some_and(|s| s != e.service) => {}
                Ok(e) => events.push_back(e),
                // A torn last line (crash mid-append) must not hide the rest.
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    line = n + 1,
                    cause = %e,
                    "skipping unreadable history line"
                ),
            }
            if events.len() > HISTORY_LIMIT {
                events.pop_front();
            }
        }
        Ok(events.into())
    }
}

/// In-memory store for unit tests.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryStore {
    state: std::sync::Mutex<Option<SavedState>>,
    events: std::sync::Mutex<Vec<Event>>,
}

#[cfg(test)]
impl StateStore for MemoryStore {
    fn load(&self) -> Result<Option<SavedState>, StoreError> {
        Ok(self.state.lock().unwrap().clone())
    }
    fn save(&self, state: &SavedState) -> Result<(), StoreError> {
        *self.state.lock().unwrap() = Some(state.clone());
        Ok(())
    }
    fn append_history(&self, event: &Event) -> Result<(), StoreError> {
        self.events.lock().unwrap().push(event.clone());
        Ok(())
    }
    fn history(&self, service: Option<&str>) -> Result<Vec<Event>, StoreError> {
        let events = self.events.lock().unwrap();
        let of = |e: &&Event| service.is_none_or(|s| s == e.service);
        Ok(events.iter().filter(of).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Event {
        Event {
            instance: None,
            time: format!("t{n}"),
            service: "api".into(),
            from: Color::Blue,
            to: Color::Green,
            weights: None,
            maintenance: None,
            reason: "r".into(),
            actor: Actor::token("ci"),
        }
    }

    #[test]
    fn history_filters_by_service_and_reads_lines_without_actor() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        // As written before the actor was recorded.
        let old = r#"{"time":"t0","service":"web","from":"blue","to":"green","reason":"old"}"#;
        fs::write(dir.path().join(FileStore::HISTORY_FILE), format!("{old}\n")).unwrap();
        store.append_history(&event(1)).unwrap();
        let all = store.history(None).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].actor.as_str(), Actor::UNRECORDED);
        assert_eq!(all[0].reason, "old");
        assert_eq!(all[1].actor.as_str(), "token:ci");
        assert_eq!(store.history(Some("api")).unwrap(), vec![event(1)]);
        assert_eq!(store.history(Some("web")).unwrap(), vec![all[0].clone()]);
        assert!(store.history(Some("nope")).unwrap().is_empty());
        let line = serde_json::to_string(&event(1)).unwrap();
        assert!(line.contains(r#""actor":"token:ci""#), "{line}");
    }

    #[test]
    fn state_round_trips_and_history_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let mut state = SavedState {
            version: SavedState::VERSION,
            ..Default::default()
        };
        state.services.insert(
            "api".into(),
            SavedService {
                active: Color::Green,
                previous: Some(Color::Blue),
                weights: Some(Weights {
                    blue: 90,
                    green: 10,
                }),
                maintenance: true,
                rolled_back: true,
            },
        );
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
        store.append_history(&event(1)).unwrap();
        store.append_history(&event(2)).unwrap();
        assert_eq!(store.history(None).unwrap(), vec![event(1), event(2)]);
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        fs::write(
            dir.path().join(FileStore::STATE_FILE),
            "{\"version\": 1, \"serv",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn torn_history_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.append_history(&event(1)).unwrap();
        let path = dir.path().join(FileStore::HISTORY_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"time\": \"t2\", \"serv").unwrap();
        assert_eq!(store.history(None).unwrap(), vec![event(1)]);
        store.append_history(&event(3)).unwrap();
        assert_eq!(store.history(None).unwrap(), vec![event(1), event(3)]);
    }
}
