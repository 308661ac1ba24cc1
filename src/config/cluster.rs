//! `[cluster]`: several switchyard instances sharing their state through
//! one Redis (issue 13). Which Redis (`redis://` or `rediss://`), the key
//! prefix that lets several clusters share it, this instance's name, where
//! the password is read from, and how long one Redis call may take.
//!
//! The password is never in the URL: a URL is logged and shown by
//! `switchyard check` and `/status`, so it lives in a 0600 file
//! (`password_file`, checked like `admin.token_file`) or a variable
//! (`password_env`), read at start by `crate::cluster::load_password`.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::{file, Validator};

/// The key prefix when `[cluster]` has no `name` ("switchyard").
pub const DEFAULT_CLUSTER_NAME: &str = "switchyard";
/// How long one Redis call may take, connecting included, before it
/// fails as a timeout (500 ms): long enough for a busy Redis across a
/// data centre, short enough that an admin command fails fast when Redis
/// is gone.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(500);
/// `cluster.timeout`: 10 ms to 10 s.
pub const CLUSTER_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(10);
/// How long a request waits for a cluster limit check (`limit_timeout`,
/// 50 ms) before it is judged by the instance's local share instead: a
/// healthy Redis answers in well under a millisecond, and a request must
/// never stall on a sick one.
pub const DEFAULT_LIMIT_TIMEOUT: Duration = Duration::from_millis(50);
/// `cluster.limit_timeout`: 1 ms to 1 s.
pub const LIMIT_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(1);
/// How long an instance's liveness entry and its cluster concurrency
/// slots outlive it (`lease`, 10 s): each is renewed every third of it,
/// so a crashed instance's slots come back within one lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// `cluster.lease`: 1 s to 5 min.
pub const LEASE_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(300);
/// The longest `name` or `instance` (64 bytes): they go into every key and
/// into `/status`.
pub const MAX_CLUSTER_NAME_LEN: usize = 64;

/// Where the Redis password is read from. Never the password itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file (mode 0600, like `admin.token_file`) holding the password.
    File(PathBuf),
    /// An environment variable holding the password.
    Env(String),
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The Redis URL as written: `redis://HOST[:PORT][/DB]` or
    /// `rediss://...` (TLS). Holds no password, so it may be logged.
    pub redis: String,
    /// Whether `redis` is `rediss://`: TLS with the system's roots.
    pub tls: bool,
    /// Key prefix: every key and channel of this cluster starts with
    /// `NAME:`, so several clusters can share one Redis.
    pub name: String,
    /// This instance's name among the cluster's (the hostname by default).
    pub instance: String,
    /// `None`: Redis asks for no password.
    pub password: Option<PasswordSource>,
    /// With `rediss://`: the CA certificates (PEM) to trust instead of the
    /// system's roots, for a Redis with a certificate from a private CA.
    pub ca_file: Option<PathBuf>,
    /// See [`DEFAULT_CLUSTER_TIMEOUT`].
    pub timeout: Duration,
    /// See [`DEFAULT_LIMIT_TIMEOUT`].
    pub limit_timeout: Duration,
    /// See [`DEFAULT_LEASE`].
    pub lease: Duration,
}

/// This machine's hostname, or `"switchyard"` when it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => DEFAULT_CLUSTER_NAME.to_string(),
    }
}

/// Whether a usable Redis URL is TLS (`rediss://`), or why it is refused.
/// A message never repeats what stands before an '@' (a secret).
fn check_url(url: &str) -> Result<bool, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (true, rest)
    } else {
        return Err(format!(
            "redis = {:?} is not a Redis URL: use redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS)",
            shown(url)
        ));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        // Never echo the URL: what is before '@' is a secret.
        return Err(
            "redis holds a user or password before '@': a URL is logged and shown, so put the \
             password in a 0600 file named by password_file, or in a variable named by \
             password_env, and give the URL without it"
                .into(),
        );
    }
    if path.contains(['?', '#']) || authority.contains(['?', '#']) {
        return Err(format!(
            "redis = {url:?}: query and fragment options are not supported; give redis://HOST:PORT/DB"
        ));
    }
    let host_ok = !authority.is_empty()
        && http::uri::Authority::try_from(authority).is_ok_and(|a| {
            !a.host().is_empty() && (a.port().is_some() || !authority.ends_with(':'))
        });
    if !host_ok {
        return Err(format!(
            "redis = {url:?} has no usable host: give redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0"
        ));
    }
    let db = path.trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!(
            "redis = {url:?}: the path is the database number, e.g. /0"
        ));
    }
    Ok(tls)
}

/// The scheme only, for a message about a URL that may hold a secret.
fn shown(url: &str) -> String {
    if url.contains('@') {
        return "(a URL with a secret, not shown)".into();
    }
    url.to_string()
}

impl Validator<'_> {
    pub(super) fn cluster(&mut self, c: file::Cluster) -> Option<Cluster> {
        let at = super::line_col(self.text, c.redis.span().start);
        self.positions.insert("cluster.redis".into(), at);
        let tls = match check_url(c.redis.get_ref()) {
            Ok(tls) => tls,
            Err(message) => {
                self.at(&c.redis, message);
                false
            }
        };
        let name = self.cluster_name(c.name.as_ref(), "name", DEFAULT_CLUSTER_NAME);
        let instance = match &c.instance {
            Some(i) => self.cluster_name(Some(i), "instance", ""),
            None => hostname(),
        };
        let password = match (c.password_file, c.password_env) {
            (Some(path), None) => Some(PasswordSource::File(
                self.file_key("cluster.password_file", path),
            )),
            (None, Some(var)) => {
                let at = super::line_col(self.text, var.span().start);
                self.positions.insert("cluster.password_env".into(), at);
                if var.get_ref().is_empty() {
                    self.at(
                        &var,
                        "password_env is empty: name the variable that holds the password".into(),
                    );
                }
                Some(PasswordSource::Env(var.into_inner()))
            }
            (Some(_), Some(var)) => {
                self.at(&var, "set password_file or password_env, not both".into());
                None
            }
            (None, None) => None,
        };
        if let (Some(ca), false) = (&c.ca_file, tls) {
            if c.redis.get_ref().starts_with("redis://") {
                self.at(
                    ca,
                    "ca_file is for TLS: use a rediss:// URL, or remove ca_file".into(),
                );
            }
        }
        let ca_file = self.path_key("cluster.ca_file", c.ca_file);
        let timeout = self.duration_in(
            c.timeout.as_ref(),
            DEFAULT_CLUSTER_TIMEOUT,
            CLUSTER_TIMEOUT_RANGE,
        );
        let limit_timeout = self.duration_in(
            c.limit_timeout.as_ref(),
            DEFAULT_LIMIT_TIMEOUT,
            LIMIT_TIMEOUT_RANGE,
        );
        let lease = self.duration_in(c.lease.as_ref(), DEFAULT_LEASE, LEASE_RANGE);
        Some(Cluster {
            redis: c.redis.into_inner(),
            tls,
            name,
            instance,
            password,
            ca_file,
            timeout,
            limit_timeout,
            lease,
        })
    }

    /// `name` or `instance`: goes into Redis keys and `/status`, so
    /// letters, digits, '-', '_' and '.' only.
    fn cluster_name(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: &str,
    ) -> String {
        let Some(value) = value else {
            return default.to_string();
        };
        let v = value.get_ref();
        let ok = !v.is_empty()
            && v.len() <= MAX_CLUSTER_NAME_LEN
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            self.at(
                value,
                format!(
                    "bad {key} {v:?}: use 1 to {MAX_CLUSTER_NAME_LEN} letters, digits, '-', '_' and '.'"
                ),
            );
            return default.to_string();
        }
        v.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::{errors, GOOD};
    use crate::config::Config;

    fn parse(section: &str) -> Config {
        Config::parse(
            Path::new("t.toml"),
            &format!("{GOOD}\n[cluster]\n{section}"),
        )
        .unwrap()
    }

    #[test]
    fn absent_means_no_cluster() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert!(c.cluster.is_none());
    }

    #[test]
    fn defaults_and_keys_are_read() {
        let c = parse("redis = \"redis://127.0.0.1:6379/0\"\n")
            .cluster
            .unwrap();
        assert_eq!(c.redis, "redis://127.0.0.1:6379/0");
        assert!(!c.tls);
        assert_eq!(c.name, DEFAULT_CLUSTER_NAME);
        assert_eq!(c.instance, hostname());
        assert_eq!(c.password, None);
        assert_eq!(c.timeout, DEFAULT_CLUSTER_TIMEOUT);
        assert_eq!(c.limit_timeout, DEFAULT_LIMIT_TIMEOUT);
        assert_eq!(c.lease, DEFAULT_LEASE);

        let c = parse(
            "redis = \"rediss://redis.internal:6380/2\"\nname = \"prod\"\ninstance = \"edge-1\"\n\
             password_file = \"redis.pass\"\ntimeout = \"200ms\"\nca_file = \"redis-ca.pem\"\n\
             limit_timeout = \"20ms\"\nlease = \"30s\"\n",
        );
        assert_eq!(c.positions.get("cluster.password_file"), Some(&(27, 17)));
        let c = c.cluster.unwrap();
        assert!(c.tls);
        assert_eq!((c.name.as_str(), c.instance.as_str()), ("prod", "edge-1"));
        assert_eq!(c.password, Some(PasswordSource::File("redis.pass".into())));
        assert_eq!(c.timeout, Duration::from_millis(200));
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("redis-ca.pem")));
        assert_eq!(c.limit_timeout, Duration::from_millis(20));
        assert_eq!(c.lease, Duration::from_secs(30));
        let c = parse("redis = \"redis://localhost\"\npassword_env = \"REDIS_PASSWORD\"\n");
        assert_eq!(
            c.cluster.unwrap().password,
            Some(PasswordSource::Env("REDIS_PASSWORD".into()))
        );
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        for url in [
            "redis://:hunter2@127.0.0.1:6379/0",
            "rediss://default:hunter2@127.0.0.1/0",
        ] {
            let e = errors(&format!("{GOOD}\n[cluster]\nredis = \"{url}\"\n"));
            assert_eq!((e[0].line, e[0].col), (24, 9), "{e:?}");
            assert!(e[0].message.contains("password_file"), "{}", e[0]);
            assert!(!e[0].to_string().contains("hunter2"), "{}", e[0]);
        }
    }

    #[test]
    fn bad_values_are_refused_with_their_position() {
        let e = errors(&format!(
            "{GOOD}\n[cluster]\nredis = \"http://127.0.0.1:6379\"\nname = \"a b\"\n\
             instance = \"\"\npassword_file = \"p\"\npassword_env = \"P\"\ntimeout = \"1ms\"\nport = 1\n"
        ));
        let found: Vec<(usize, usize)> = e.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(
            found,
            vec![(24, 9), (25, 8), (26, 12), (28, 16), (29, 11), (30, 1)],
            "{e:?}"
        );
        assert!(e[0].message.contains("not a Redis URL"), "{}", e[0]);
        assert!(e[1].message.contains("bad name"), "{}", e[1]);
        assert!(e[3].message.contains("not both"), "{}", e[3]);
        assert!(e[5].message.contains("unknown key `port`"), "{}", e[5]);
        for url in [
            "redis://",
            "redis://:6379/0",
            "redis://h/x",
            "redis://h/0?protocol=resp3",
        ] {
            let e = errors(&format!("{GOOD}\n[cluster]\nredis = \"{url}\"\n"));
            assert_eq!(e.len(), 1, "{url}: {e:?}");
        }
        let e = errors(&format!(
            "{GOOD}\n[cluster]\nredis = \"redis://h/0\"\nca_file = \"ca.pem\"\n"
        ));
        assert_eq!((e.len(), e[0].line, e[0].col), (1, 25, 11), "{e:?}");
        assert!(e[0].message.contains("rediss://"), "{}", e[0]);
        let e = errors(&format!("{GOOD}\n[cluster]\nname = \"prod\"\n"));
        assert!(e[0].message.contains("redis"), "{}", e[0]);
    }
}
