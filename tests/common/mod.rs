//! Shared harness for the end-to-end tests.
//!
//! The proxy is treated as a black box: every test writes a config into a
//! temporary directory, starts the real `switchyard` binary on OS-chosen ports
//! and talks to it over loopback HTTP. Upstreams are small in-process hyper
//! servers that answer with their own label, so a response body tells which
//! backend served it.
//!
//! Nothing here sleeps to synchronise: every wait is a poll with a deadline.

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The admin token written to the token file unless a test asks otherwise.
pub const TOKEN: &str = "e2e-test-token-0123456789";

/// Environment variable the proxy and `ctl` read the admin token from.
pub const TOKEN_ENV: &str = "SWITCHYARD_ADMIN_TOKEN";

/// How long a proxy may take to start listening.
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

/// How long a proxy that is expected to refuse to start may take to exit.
pub const FAIL_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Polls `f` every 10 ms until it returns true or `deadline` has passed.
/// Returns whether the condition was met.
pub fn poll_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A port that was free a moment ago: bind `127.0.0.1:0`, read the port,
/// release it. The proxy offers no way to report the port it bound, so the
/// harness has to choose one up front.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports: all probe listeners are held until every port
/// has been read, so the OS cannot hand out the same one twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// Quotes a string as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An HTTP client that reports 4xx/5xx as normal responses (tests assert on
/// them) and never hangs a test for long.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Sends `GET url` with the given `Host` header (or the default one derived
/// from the URL) on a fresh connection. Returns (status, body); a transport
/// error panics with the error.
pub fn get(url: &str, host: Option<&str>) -> (u16, String) {
    try_get(&agent(), url, host).unwrap_or_else(|e| panic!("GET {url} (host {host:?}): {e}"))
}

/// Like [`get`] but on a caller-supplied agent (keep-alive) and without
/// panicking on transport errors.
pub fn try_get(
    agent: &ureq::Agent,
    url: &str,
    host: Option<&str>,
) -> Result<(u16, String), ureq::Error> {
    let mut req = agent.get(url);
    if let Some(h) = host {
        req = req.header("Host", h);
    }
    let mut resp = req.call()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string()?;
    Ok((status, body))
}

/// Parses a response body as JSON; a body that is not JSON comes back as a
/// JSON string holding the raw text, so assertions on fields fail visibly.
pub fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// One admin API call. `token: None` sends no `Authorization` header.
/// Returns (status, parsed JSON body).
pub fn admin_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let agent = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match method {
        "GET" => {
            let mut req = agent.get(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
        "POST" | "PUT" => {
            let mut req = if method == "POST" {
                agent.post(&url)
            } else {
                agent.put(&url)
            };
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req = req.header("Content-Type", "application/json");
            match body {
                Some(b) => req.send(b),
                None => req.send_empty(),
            }
        }
        "DELETE" => {
            let mut req = agent.delete(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
        other => panic!("admin_request: unsupported method {other}"),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("{method} {url}: reading body: {e}"));
    (status, parse_json(&text))
}

/// Sends raw bytes to `addr` and reads until the server closes. Used where a
/// client library would get in the way (e.g. an oversized body the server may
/// reject before reading it all). Returns (status, body) with a chunked body
/// decoded; status 0 if no status line came back.
pub fn raw_http(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it has read everything; keep
    // whatever response made it back.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text);
    };
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, rest)) = s.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        s = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// Whether a TCP connection to `addr` is currently refused.
pub fn connection_refused(addr: &str) -> bool {
    let sa: SocketAddr = addr.parse().unwrap();
    matches!(
        TcpStream::connect_timeout(&sa, Duration::from_millis(500)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn accepts(addr: &str) -> bool {
    let sa: SocketAddr = addr.parse().unwrap();
    TcpStream::connect_timeout(&sa, Duration::from_millis(500)).is_ok()
}

/// Runs `switchyard check -c path` with a clean environment.
pub fn run_check(path: &Path, cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check")
        .arg("-c")
        .arg(path)
        .env_remove(TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().expect("spawn switchyard check")
}

/// Runs `switchyard ctl --admin URL ARGS...`; `token` goes into the
/// environment variable, `None` leaves it unset.
pub fn run_ctl(admin_url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("ctl")
        .arg("--admin")
        .arg(admin_url)
        .args(args)
        .env_remove(TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env(TOKEN_ENV, t);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard ctl");
    wait_output_with_deadline(child, Duration::from_secs(20), "switchyard ctl")
}

/// `Child::wait_with_output` with a deadline, so a hung CLI fails the test
/// instead of hanging the suite.
fn wait_output_with_deadline(mut child: Child, deadline: Duration, what: &str) -> Output {
    let mut status = None;
    poll_until(deadline, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {deadline:?}");
    }
    child.wait_with_output().expect("collect output")
}

/// Human-readable dump of a command's output for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// Upstream: a labelled HTTP/1.1 backend
// ---------------------------------------------------------------------------

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Path plus query, e.g. `/api/x?delay_ms=10`.
    pub path: String,
    /// Header names (lowercase) and values in arrival order.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct UpstreamState {
    label: String,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
    /// Paths of the requests being handled right now, by request number.
    active: Mutex<Vec<(usize, String)>>,
}

/// Marks a request as finished even if the handler future is dropped.
struct InFlightGuard<'a> {
    st: &'a UpstreamState,
    id: usize,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.st.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.st
            .active
            .lock()
            .unwrap()
            .retain(|(id, _)| *id != self.id);
    }
}

/// A backend on `127.0.0.1:<random>` that answers every request with status
/// 200 and its label as the body, so tests can tell which pool served a
/// request. `?delay_ms=N` makes it wait N ms first (to have a request in
/// flight). It runs on its own thread and runtime and stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(label: &str) -> Upstream {
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            label: label.to_string(),
            hits: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{label}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("upstream runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let st = st.clone();
                                tokio::spawn(async move {
                                    let svc = service_fn(move |req| handle(req, st.clone()));
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime here cancels open connections.
            })
            .expect("spawn upstream thread");
        Upstream {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`, as written into the config.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn label(&self) -> &str {
        &self.state.label
    }

    /// Requests received so far (counted on arrival, before any delay).
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Requests currently being handled (e.g. sleeping on `delay_ms`).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Requests received so far whose path (with query) starts with `prefix`.
    /// Tests count their own paths so that anything else the proxy might send
    /// (e.g. health checks) cannot disturb the numbers.
    pub fn received(&self, prefix: &str) -> usize {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    /// Requests being handled right now whose path starts with `prefix`.
    pub fn in_flight_for(&self, prefix: &str) -> usize {
        self.state
            .active
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.starts_with(prefix))
            .count()
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<SeenRequest> {
        self.state.seen.lock().unwrap().last().cloned()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = st.hits.fetch_add(1, Ordering::SeqCst);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    st.seen.lock().unwrap().push(SeenRequest {
        path: path.clone(),
        headers,
    });
    st.in_flight.fetch_add(1, Ordering::SeqCst);
    st.active.lock().unwrap().push((id, path));
    let _guard = InFlightGuard { st: &st, id };
    let delay = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "delay_ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
    });
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let resp = Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .header("x-upstream", st.label.as_str())
        .body(Full::new(Bytes::from(st.label.clone())))
        .unwrap();
    Ok(resp)
}

// ---------------------------------------------------------------------------
// Config snippets
// ---------------------------------------------------------------------------

fn addr_list(ups: &[&Upstream]) -> String {
    let items: Vec<String> = ups.iter().map(|u| toml_str(&u.addr())).collect();
    format!("[{}]", items.join(", "))
}

/// A `[services.NAME]` table with the given pools and initial color.
pub fn service(name: &str, blue: &[&Upstream], green: &[&Upstream], active: &str) -> String {
    format!(
        "[services.{name}]\nblue = {}\ngreen = {}\nactive = {}\n\n",
        addr_list(blue),
        addr_list(green),
        toml_str(active)
    )
}

/// A `[[routes]]` entry sending `path` (prefix) on `host` (or any host
/// without routes of its own, when `None`) to `service`.
pub fn route(host: Option<&str>, path: &str, service: &str) -> String {
    let host = host
        .map(|h| format!("host = {}\n", toml_str(h)))
        .unwrap_or_default();
    format!(
        "[[routes]]\n{host}path = {}\nservice = {}\n\n",
        toml_str(path),
        toml_str(service)
    )
}

/// A `[[routes]]` entry the proxy answers with 404 itself.
pub fn deny_route(host: Option<&str>, path: &str) -> String {
    let host = host
        .map(|h| format!("host = {}\n", toml_str(h)))
        .unwrap_or_default();
    format!(
        "[[routes]]\n{host}path = {}\naction = \"deny\"\n\n",
        toml_str(path)
    )
}

/// The most common setup: service `api` with one blue and one green backend,
/// blue active, every path on every host routed to it.
pub fn simple_api(blue: &Upstream, green: &Upstream) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&route(None, "/", "api"));
    s
}

// ---------------------------------------------------------------------------
// Proxy: the binary under test
// ---------------------------------------------------------------------------

/// How the admin token is provided.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// `[admin] token_file` pointing at a file with this content and mode.
    File { token: String, mode: u32 },
    /// `SWITCHYARD_ADMIN_TOKEN` in the proxy's environment, no token file.
    Env(String),
    /// Neither: the admin API must stay off.
    None,
}

/// Builds a config around a services/routes snippet and starts the proxy.
pub struct ProxyBuilder {
    body: String,
    token: TokenSource,
    allow: Option<Vec<String>>,
    grace_period: String,
    state_json: Option<String>,
}

impl ProxyBuilder {
    /// `body` holds the `[services.*]` tables and `[[routes]]`.
    pub fn new(body: impl Into<String>) -> Self {
        ProxyBuilder {
            body: body.into(),
            token: TokenSource::File {
                token: TOKEN.to_string(),
                mode: 0o600,
            },
            allow: None,
            grace_period: "5s".to_string(),
            state_json: None,
        }
    }

    pub fn token(mut self, token: TokenSource) -> Self {
        self.token = token;
        self
    }

    /// Sets `[admin] allow`; without it the key is omitted (loopback default).
    pub fn allow(mut self, nets: &[&str]) -> Self {
        self.allow = Some(nets.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn grace_period(mut self, d: &str) -> Self {
        self.grace_period = d.to_string();
        self
    }

    /// Writes `state_dir/state.json` with this content before the first start.
    pub fn state_json(mut self, content: &str) -> Self {
        self.state_json = Some(content.to_string());
        self
    }

    /// Starts the proxy and waits until it accepts connections; panics with
    /// its stderr if it exits or is not ready in time.
    pub fn start(self) -> Proxy {
        let mut p = self.spawn();
        p.wait_ready();
        p
    }

    /// Starts the proxy without waiting (for start-up failure tests).
    pub fn spawn(self) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-e2e-")
            .tempdir()
            .expect("tempdir");
        let state_dir = dir.path().join("state");
        fs::create_dir_all(&state_dir).unwrap();
        if let Some(s) = &self.state_json {
            fs::write(state_dir.join("state.json"), s).unwrap();
        }
        let [http_port, admin_port] = free_ports::<2>();
        let token_path = dir.path().join("admin.token");

        let mut admin = String::from("[admin]\n");
        let token = match &self.token {
            TokenSource::File { token, mode } => {
                fs::write(&token_path, format!("{token}\n")).unwrap();
                fs::set_permissions(&token_path, fs::Permissions::from_mode(*mode)).unwrap();
                admin.push_str(&format!(
                    "token_file = {}\n",
                    toml_str(token_path.to_str().unwrap())
                ));
                Some(token.clone())
            }
            TokenSource::Env(t) => Some(t.clone()),
            TokenSource::None => None,
        };
        if let Some(nets) = &self.allow {
            let items: Vec<String> = nets.iter().map(|n| toml_str(n)).collect();
            admin.push_str(&format!("allow = [{}]\n", items.join(", ")));
        }

        let config = format!(
            "[server]\nthreads = 1\ngrace_period = {}\nstate_dir = {}\n\n\
             [listen]\nhttp = \"127.0.0.1:{http_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\n\
             {admin}\n{}",
            toml_str(&self.grace_period),
            toml_str(state_dir.to_str().unwrap()),
            self.body
        );
        let config_path = dir.path().join("switchyard.toml");
        fs::write(&config_path, &config).unwrap();

        let env_token = match &self.token {
            TokenSource::Env(t) => Some(t.clone()),
            _ => None,
        };
        let mut p = Proxy {
            dir,
            config_path,
            state_dir,
            token_path,
            http_port,
            admin_port,
            token,
            env_token,
            child: None,
            runs: 0,
        };
        p.launch();
        p
    }
}

/// A running `switchyard run -c CONFIG`. Killed (SIGKILL) on drop; if the
/// test is panicking, its stderr is printed so the failure can be diagnosed.
pub struct Proxy {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    state_dir: PathBuf,
    token_path: PathBuf,
    http_port: u16,
    admin_port: u16,
    /// The token that the admin API accepts, if any.
    token: Option<String>,
    env_token: Option<String>,
    child: Option<Child>,
    /// Number of times the process was launched; names the log files.
    runs: usize,
}

impl Proxy {
    fn launch(&mut self) {
        self.runs += 1;
        let stderr = fs::File::create(self.stderr_path()).unwrap();
        let stdout =
            fs::File::create(self.dir.path().join(format!("stdout-{}.log", self.runs))).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .env_remove(TOKEN_ENV)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(t) = &self.env_token {
            cmd.env(TOKEN_ENV, t);
        }
        self.child = Some(cmd.spawn().expect("spawn switchyard run"));
    }

    /// Waits until the http port (and the admin port, when a token is
    /// configured) accept TCP connections.
    fn wait_ready(&mut self) {
        let http = self.http_addr();
        let admin = self.admin_addr();
        let need_admin = self.token.is_some();
        let mut exited = None;
        let ready = poll_until(READY_DEADLINE, || {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                exited = Some(st);
                return true;
            }
            accepts(&http) && (!need_admin || accepts(&admin))
        });
        if let Some(st) = exited {
            panic!(
                "switchyard exited during start-up ({st}).\n--- config ---\n{}\n--- stderr ---\n{}",
                fs::read_to_string(&self.config_path).unwrap_or_default(),
                self.stderr_text()
            );
        }
        assert!(
            ready,
            "switchyard not ready within {READY_DEADLINE:?}\n--- stderr ---\n{}",
            self.stderr_text()
        );
    }

    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The token the admin API accepts; panics if none is configured.
    pub fn token(&self) -> &str {
        self.token.as_deref().expect("proxy has no admin token")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub fn token_path(&self) -> &Path {
        &self.token_path
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("no process").id() as i32
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join(format!("stderr-{}.log", self.runs))
    }

    /// Stderr of the current (latest) process so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// `GET {http_url}{path}` with an optional Host header.
    pub fn get(&self, path: &str, host: Option<&str>) -> (u16, String) {
        get(&format!("{}{}", self.http_url(), path), host)
    }

    /// Admin API call with the proxy's own (valid) token.
    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        admin_request(&self.admin_url(), method, path, body, self.token.as_deref())
    }

    /// `GET /status`, asserting 200.
    pub fn status(&self) -> Value {
        let (code, v) = self.admin("GET", "/status", None);
        assert_eq!(code, 200, "GET /status: {v}");
        v
    }

    /// The active color of `service` according to `GET /status`.
    pub fn active(&self, service: &str) -> String {
        let v = self.status();
        v["services"][service]["active"]
            .as_str()
            .unwrap_or_else(|| panic!("no services.{service}.active in {v}"))
            .to_string()
    }

    /// `POST /services/{service}/switch`, asserting 200; returns the body.
    pub fn switch(&self, service: &str, to: &str, reason: Option<&str>) -> Value {
        let mut body = serde_json::json!({ "to": to });
        if let Some(r) = reason {
            body["reason"] = Value::String(r.to_string());
        }
        let (code, v) = self.admin(
            "POST",
            &format!("/services/{service}/switch"),
            Some(&body.to_string()),
        );
        assert_eq!(code, 200, "switch {service} -> {to}: {v}");
        v
    }

    /// `switchyard ctl --admin URL ARGS...` with the proxy's token in the env.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_ctl(&self.admin_url(), self.token.as_deref(), args)
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Waits up to `deadline` for the process to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("no process");
        let mut status = None;
        poll_until(deadline, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }

    /// Starts the proxy again with the same config and state dir and waits
    /// until it is ready. A still-running process gets SIGTERM first.
    pub fn restart(&mut self) {
        self.relaunch();
        self.wait_ready();
    }

    /// Like [`Proxy::restart`] but without waiting for readiness (for
    /// start-up failure tests).
    pub fn relaunch(&mut self) {
        if self.child.as_mut().unwrap().try_wait().unwrap().is_none() {
            self.sigterm();
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let child = self.child.as_mut().unwrap();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.launch();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for run in 1..=self.runs {
                let path = self.dir.path().join(format!("stderr-{run}.log"));
                eprintln!(
                    "--- switchyard stderr (run {run}) ---\n{}",
                    fs::read_to_string(path).unwrap_or_default()
                );
            }
        }
    }
}
