//! A real `redis-server` for the cluster tests: started on a loopback port
//! with a temp dir of its own, killed with `-9` and restarted on the same
//! port when a test needs Redis to go away, and stopped on drop. Nothing
//! listens beyond 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_ports, poll_until};

/// What to install when the binary is missing.
const MISSING: &str = "redis-server not found on PATH: run .ci/setup (it installs Debian's \
                       `redis-server` package)";

/// How long redis-server may take to answer PING after it starts (10 s).
const START_DEADLINE: Duration = Duration::from_secs(10);

/// How long one PING may take while waiting for the server (200 ms).
const PING_TIMEOUT: Duration = Duration::from_millis(200);

/// Fails the test (never skips it) when redis-server is not installed.
pub fn require() {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()))
        .unwrap_or(false);
    assert!(found, "{MISSING}");
}

/// How a test wants its Redis.
#[derive(Default, Clone)]
pub struct RedisOptions {
    /// `--requirepass`: clients must AUTH with it.
    pub password: Option<String>,
    /// Keep data across a kill and restart (an append-only file written on
    /// every change, `appendfsync always`); off: a restart comes back empty.
    pub persistent: bool,
    /// Serve TLS only (`--tls-port`, no plain port) with a certificate for
    /// 127.0.0.1 from a CA made for the test ([`RedisServer::ca_file`]).
    pub tls: bool,
}

/// A running `redis-server` owned by one test.
pub struct RedisServer {
    pub port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// An empty Redis without persistence or password.
    pub fn start() -> RedisServer {
        RedisServer::with(RedisOptions::default())
    }

    /// A Redis as `options` say, answering PING when this returns.
    pub fn with(options: RedisOptions) -> RedisServer {
        require();
        let [port] = free_ports::<1>();
        let mut server = RedisServer {
            port,
            options,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` with `tls`), without any
    /// password.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// With `tls`: the PEM file of the CA that signed the server's
    /// certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        if self.options.tls {
            let dir = self.dir.path();
            if !dir.join("ca.pem").exists() {
                let pki = super::pebble::pki(&["127.0.0.1"], 30);
                std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
                std::fs::write(dir.join("server.pem"), &pki.chain_pem).unwrap();
                std::fs::write(dir.join("server.key"), &pki.key_pem).unwrap();
            }
            cmd.args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.arg("--port").arg(self.port.to_string());
        }
        cmd.args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", ""])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if self.options.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(password) = &self.options.password {
            cmd.arg("--requirepass").arg(password);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}. {MISSING}"));
        self.child = Some(child);
        let port = self.port;
        let password = self.options.password.clone();
        // A TLS server is ready when it accepts; the tests' client then
        // does the handshake itself.
        let tls = self.options.tls;
        let up = poll_until(START_DEADLINE, || {
            if tls {
                TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), PING_TIMEOUT).is_ok()
            } else {
                ping(port, password.as_deref())
            }
        });
        if !up {
            let log =
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
            panic!("redis-server on 127.0.0.1:{port} did not answer PING within {START_DEADLINE:?}; its log:\n{log}");
        }
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (and the same dir: with
    /// `persistent` it comes back with its data, otherwise empty).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A `[cluster]` on this server named `name` (instance `test`), every
    /// call bounded by `timeout`, the lease 10 s: callers change what
    /// their test is about.
    pub fn cluster(&self, name: &str, timeout: Duration) -> switchyard::config::Cluster {
        switchyard::config::Cluster {
            redis: self.url(),
            tls: false,
            name: name.into(),
            instance: "test".into(),
            password: None,
            ca_file: None,
            timeout,
            limit_timeout: timeout,
            lease: Duration::from_secs(10),
        }
    }

    /// The server's directory (its log is `redis.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers PING on 127.0.0.1:`port` (after AUTH when a
/// password is given), with short timeouts so a poll can go on.
pub fn ping(port: u16, password: Option<&str>) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), PING_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PING_TIMEOUT));
    let _ = s.set_write_timeout(Some(PING_TIMEOUT));
    let mut request = Vec::new();
    if let Some(p) = password {
        request
            .extend_from_slice(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()).as_bytes());
    }
    request.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    if s.write_all(&request).is_err() {
        return false;
    }
    let mut reader = BufReader::new(s.take(1024));
    let mut line = String::new();
    if password.is_some() {
        if reader.read_line(&mut line).is_err() || line != "+OK\r\n" {
            return false;
        }
        line.clear();
    }
    reader.read_line(&mut line).is_ok() && line == "+PONG\r\n"
}

/// Asserts that `e`, from a call that took `took`, says Redis is gone
/// (unreachable or timed out), names `redis`'s URL, and came within
/// `timeout` (with a wide margin for a loaded machine).
pub fn assert_gone_within(
    e: &switchyard::cluster::ClusterError,
    redis: &RedisServer,
    took: Duration,
    timeout: Duration,
) {
    use switchyard::cluster::ClusterError;
    assert!(
        matches!(
            e,
            ClusterError::Unreachable { .. } | ClusterError::Timeout { .. }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains(&redis.url()), "{e}");
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
}
