//! Several switchyard instances sharing one Redis (issue 13, `[cluster]`).
//!
//! - [`state::RedisState`]: the shared state in Redis (colors, weights,
//!   maintenance under a version and an epoch, the history stream, the
//!   change channel, the live instances), one Lua script per write.
//! - [`sync::StateSync`]: the background service that keeps this
//!   instance's snapshot on Redis's state (pub/sub plus a version check
//!   every second), seeds an empty Redis, pushes a change made while Redis
//!   was unreachable, and renews this instance's liveness entry.
//! - [`Link`]: what every cluster user on this instance shares: the Redis
//!   handle, the live instance count (a cluster limit's local share is its
//!   figure divided by it) and whether Redis answers (an outage is logged
//!   once).
//! - [`rate::ClusterRate`]: the GCRA check of a `scope = "cluster"` rate
//!   limit; budgets and concurrency leases live with the limits
//!   (`limits/cluster_tokens.rs`, `limits/leases.rs`).
//!
//! The request path never asks Redis for colors: the switchboard's
//! snapshot is replaced when Redis says a newer state exists, and a change
//! made here is written to Redis (compare and set) before it is published
//! here (`switchboard.rs`).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{self, Cluster, PasswordSource};

pub mod link;
pub mod rate;
pub mod state;
pub mod sync;

pub use link::{Link, Member};
pub use rate::{ClusterRate, Decision};
pub use state::{ClusterError, RedisState, Seeded, Versioned};

/// The longest password read from a file or variable (4 KiB).
pub const MAX_PASSWORD_LEN: usize = 4096;

/// The Redis password. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// The password, for the AUTH handshake only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(redacted)")
    }
}

/// Why the Redis password cannot be read. Messages name where it is,
/// never what it is.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(
        "cannot read cluster.password_file {}: {source}",
        config::show_path(path)
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cluster.password_file {} is not a regular file; give a file (mode 0600) that holds the password",
        config::show_path(path)
    )]
    NotAFile { path: PathBuf },
    #[error(
        "cluster.password_file {} is accessible by group or others (mode {mode:04o}); the password is a secret: run chmod 600 on it",
        config::show_path(path)
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("environment variable {var} (cluster.password_env) is not set")]
    EnvUnset { var: String },
    #[error(
        "the Redis password (from {from}) is empty, longer than {MAX_PASSWORD_LEN} bytes, or \
         holds a line break; put the password alone on one line"
    )]
    Malformed { from: String },
}

/// Reads the Redis password from `cluster.password_file` (a regular file,
/// mode 0600, as the admin token file) or `cluster.password_env` (`env`
/// looks the variable up), trimmed of surrounding white space. `None`:
/// no password configured.
pub fn load_password(
    cluster: &Cluster,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Password>, PasswordError> {
    let (raw, from) = match &cluster.password {
        None => return Ok(None),
        Some(PasswordSource::File(path)) => (read_file(path)?, "password_file".to_string()),
        Some(PasswordSource::Env(var)) => match env(var) {
            Some(v) => (v, format!("${var}")),
            None => return Err(PasswordError::EnvUnset { var: var.clone() }),
        },
    };
    let p = raw.trim();
    if p.is_empty() || p.len() > MAX_PASSWORD_LEN || p.contains(['\r', '\n']) {
        return Err(PasswordError::Malformed { from });
    }
    Ok(Some(Password(p.to_string())))
}

fn read_file(path: &Path) -> Result<String, PasswordError> {
    let read_err = |source| PasswordError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(PasswordError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PasswordError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cluster(password: Option<PasswordSource>) -> Cluster {
        Cluster {
            redis: "redis://127.0.0.1:6379/0".into(),
            tls: false,
            name: "t".into(),
            instance: "i".into(),
            password,
            ca_file: None,
            timeout: Duration::from_millis(100),
            limit_timeout: Duration::from_millis(50),
            lease: Duration::from_secs(10),
        }
    }

    #[test]
    fn password_file_must_be_private_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis.pass");
        std::fs::write(&path, "s3cret-pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = cluster(Some(PasswordSource::File(path.clone())));
        let e = load_password(&c, |_| None).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = load_password(&c, |_| None).unwrap().unwrap();
        assert_eq!(p.expose(), "s3cret-pw");
        assert!(!format!("{p:?}").contains("s3cret"));

        std::fs::write(&path, "two\nlines\n").unwrap();
        let e = load_password(&c, |_| None).unwrap_err();
        assert!(!e.to_string().contains("two"), "{e}");
        assert!(load_password(&cluster(None), |_| None).unwrap().is_none());
    }

    #[test]
    fn password_env_is_read_or_named_when_unset() {
        let c = cluster(Some(PasswordSource::Env("REDIS_PW".into())));
        let p = load_password(&c, |v| (v == "REDIS_PW").then(|| " pw ".into())).unwrap();
        assert_eq!(p.unwrap().expose(), "pw");
        let e = load_password(&c, |_| None).unwrap_err();
        assert!(
            e.to_string()
                .contains("REDIS_PW (cluster.password_env) is not set"),
            "{e}"
        );
    }
}
