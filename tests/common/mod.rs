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

pub mod load;
pub mod openai;
pub mod pebble;
pub mod redis;
pub mod tls;

use std::convert::Infallible;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};

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

/// A port that was free a moment ago: the harness has to choose the
/// proxy's ports up front, since the proxy offers no way to report the port
/// it bound.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// Where [`free_ports`] looks: below Linux's ephemeral range (32768-60999),
/// so the ports cannot be handed out meanwhile by the kernel to upstreams
/// (`bind(0)`) or client sockets, which happens when a port is probed with
/// `bind(0)` and released.
const PORT_BASE: usize = 20_000;
const PORT_SPAN: usize = 12_000;

/// Next candidate of [`free_ports`]: one counter for the whole test binary,
/// so concurrent tests never get the same port.
static NEXT_PORT: AtomicUsize = AtomicUsize::new(0);

/// `N` distinct free ports. Each candidate is probed by binding it; all
/// probe listeners are held until every port has been found.
pub fn free_ports<const N: usize>() -> [u16; N] {
    // A per-process start, so test binaries run one after another do not
    // reuse the previous one's ports.
    let start = (std::process::id() as usize).wrapping_mul(7919) % PORT_SPAN;
    let mut listeners = Vec::with_capacity(N);
    let mut tried = 0;
    while listeners.len() < N {
        tried += 1;
        assert!(
            tried <= PORT_SPAN,
            "no free port in {PORT_BASE}..{}",
            PORT_BASE + PORT_SPAN
        );
        let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let port = (PORT_BASE + (start + n) % PORT_SPAN) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
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

/// Starts `switchyard ctl --admin URL ARGS...` without waiting for it (for
/// commands that block, like `--wait-healthy`); collect it with
/// [`wait_output_with_deadline`].
pub fn spawn_ctl(admin_url: &str, token: Option<&str>, args: &[&str]) -> Child {
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
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard ctl")
}

/// `Child::wait_with_output` with a deadline, so a hung CLI fails the test
/// instead of hanging the suite.
pub fn wait_output_with_deadline(mut child: Child, deadline: Duration, what: &str) -> Output {
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
// Clients that show what the proxy sends back
// ---------------------------------------------------------------------------

/// A response with its headers, as the client saw it.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names (lowercase) and values in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as JSON (a JSON string holding the raw text if it is not).
    pub fn json(&self) -> Value {
        parse_json(&self.body)
    }
}

/// One request with arbitrary extra headers on a fresh connection; returns
/// status, headers and body. Transport errors come back as `Err`.
pub fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Reply, ureq::Error> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let agent = agent();
    let mut resp = match body {
        Some(data) => agent.run(b.body(data.to_vec()).expect("request"))?,
        None => agent.run(b.body(()).expect("request"))?,
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.body_mut().read_to_string()?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// [`try_request`] that panics on transport errors.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    try_request(method, url, headers, body)
        .unwrap_or_else(|e| panic!("{method} {url} {headers:?}: {e}"))
}

/// How the body of a response read by [`RawConn`] is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// No body (1xx, 204, 304) or body fully read.
    Done,
    Length(usize),
    /// `left` bytes of the current chunk remain; `crlf`: the CRLF after a
    /// finished chunk is still to be skipped.
    Chunked {
        left: usize,
        crlf: bool,
    },
    UntilClose,
}

/// One step of reading a body with [`RawConn::read_body_part`].
#[derive(Debug, PartialEq)]
pub enum BodyPart {
    /// Decoded body bytes that arrived.
    Data(Vec<u8>),
    /// The body ended as its framing says (last chunk, full length).
    End,
    /// The connection closed (or failed) before the body ended: the response
    /// was cut.
    Eof,
}

/// A hand-driven HTTP/1.1 client connection, for what a client library would
/// hide: slow or oversized requests, bodies read piece by piece as they
/// arrive, exact request headers, and whether the server closes the
/// connection. Every read takes a deadline, so nothing blocks for long.
pub struct RawConn {
    stream: TcpStream,
    /// Received but not yet consumed bytes.
    buf: Vec<u8>,
    framing: Framing,
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl RawConn {
    /// Connects to `addr`; panics if that fails.
    pub fn connect(addr: &str) -> RawConn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        RawConn::over(stream)
    }

    fn over(stream: TcpStream) -> RawConn {
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
            framing: Framing::Done,
        }
    }

    /// Connects to `addr` from the local address `local` (another loopback
    /// address such as `127.0.0.2`, to act as a second client); panics if
    /// that fails.
    pub fn connect_from(local: &str, addr: &str) -> RawConn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let stream = rt
            .block_on(async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(format!("{local}:0").parse().expect("local address"))?;
                socket.connect(addr.parse().expect("address")).await
            })
            .and_then(|s| s.into_std())
            .unwrap_or_else(|e| panic!("connect {addr} from {local}: {e}"));
        stream.set_nonblocking(false).unwrap();
        RawConn::over(stream)
    }

    /// Writes all of `bytes`. Fails once the server has closed or reset the
    /// connection (possibly only on a later write).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads what is available into the buffer. Ok(0) is end of stream;
    /// `TimedOut` if nothing came before `deadline`.
    fn fill(&mut self, deadline: Instant) -> std::io::Result<usize> {
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        self.stream.set_read_timeout(Some(deadline - now))?;
        let mut tmp = [0u8; 16 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Err(timed_out())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a response head (skipping `100 Continue`) and prepares to read
    /// its body. The returned reply has an empty body.
    pub fn read_head(&mut self, timeout: Duration) -> std::io::Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                if self.fill(deadline)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "closed before a complete response head; got {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ));
                }
                continue;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad status line in {head:?}"),
                    )
                })?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let reply = Reply {
                status,
                headers,
                body: String::new(),
            };
            if status == 100 {
                continue;
            }
            self.framing = if (100..200).contains(&status) || status == 204 || status == 304 {
                Framing::Done
            } else if reply
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                Framing::Chunked {
                    left: 0,
                    crlf: false,
                }
            } else if let Some(n) = reply
                .header("content-length")
                .and_then(|v| v.trim().parse().ok())
            {
                Framing::Length(n)
            } else {
                Framing::UntilClose
            };
            return Ok(reply);
        }
    }

    /// Decodes the next body piece from the buffer; None if more bytes are
    /// needed.
    fn take_body_part(&mut self) -> Option<BodyPart> {
        let RawConn { buf, framing, .. } = self;
        match framing {
            Framing::Done => Some(BodyPart::End),
            Framing::Length(0) => {
                *framing = Framing::Done;
                Some(BodyPart::End)
            }
            Framing::Length(left) => {
                if buf.is_empty() {
                    return None;
                }
                let n = (*left).min(buf.len());
                *left -= n;
                Some(BodyPart::Data(buf.drain(..n).collect()))
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    None
                } else {
                    Some(BodyPart::Data(std::mem::take(buf)))
                }
            }
            Framing::Chunked { left, crlf } => loop {
                if *crlf {
                    if buf.len() < 2 {
                        return None;
                    }
                    buf.drain(..2);
                    *crlf = false;
                }
                if *left > 0 {
                    if buf.is_empty() {
                        return None;
                    }
                    let n = (*left).min(buf.len());
                    *left -= n;
                    *crlf = *left == 0;
                    return Some(BodyPart::Data(buf.drain(..n).collect()));
                }
                let line_end = find(buf, b"\r\n")?;
                let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    // Last chunk: skip the (usually empty) trailer section.
                    let trailer_end = find(&buf[line_end..], b"\r\n\r\n")?;
                    buf.drain(..line_end + trailer_end + 4);
                    *framing = Framing::Done;
                    return Some(BodyPart::End);
                }
                buf.drain(..line_end + 2);
                *left = size;
            },
        }
    }

    /// The next piece of the body of the response whose head was read last:
    /// data as soon as some arrived, `End` when the body is complete, `Eof`
    /// if the connection ended first. `TimedOut` error at the deadline.
    pub fn read_body_part(&mut self, deadline: Instant) -> std::io::Result<BodyPart> {
        loop {
            if let Some(part) = self.take_body_part() {
                return Ok(part);
            }
            let n = match self.fill(deadline) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(e),
                // A reset is an end of stream too.
                Err(_) => 0,
            };
            if n == 0 {
                return Ok(if self.framing == Framing::UntilClose {
                    self.framing = Framing::Done;
                    BodyPart::End
                } else {
                    BodyPart::Eof
                });
            }
        }
    }

    /// Reads body pieces, appending them to `body`, until `body` contains
    /// `needle`. Fails if the body ends first or at the deadline.
    pub fn read_body_until(
        &mut self,
        body: &mut Vec<u8>,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while find(body, needle.as_bytes()).is_none() {
            match self.read_body_part(deadline) {
                Ok(BodyPart::Data(d)) => body.extend_from_slice(&d),
                other => {
                    return Err(format!(
                        "waiting for {needle:?}: {other:?}; body so far {:?}",
                        String::from_utf8_lossy(body)
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads a whole response (head and body); an incomplete body is an
    /// `UnexpectedEof` error.
    pub fn read_response(&mut self, timeout: Duration) -> std::io::Result<Reply> {
        let deadline = Instant::now() + timeout;
        let mut reply = self.read_head(timeout)?;
        let mut body = Vec::new();
        loop {
            match self.read_body_part(deadline)? {
                BodyPart::Data(d) => body.extend_from_slice(&d),
                BodyPart::End => break,
                BodyPart::Eof => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "status {}: body cut after {} bytes",
                            reply.status,
                            body.len()
                        ),
                    ))
                }
            }
        }
        reply.body = String::from_utf8_lossy(&body).into_owned();
        Ok(reply)
    }

    /// Waits up to `timeout` for the server to close (or reset) the
    /// connection. Returns whatever bytes arrived before the close, or None
    /// if the connection was still open at the deadline.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.fill(deadline) {
                Ok(0) => return Some(std::mem::take(&mut self.buf)),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
                Err(_) => return Some(std::mem::take(&mut self.buf)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

/// A blocking WebSocket client over a plain TCP stream.
pub type WsClient = tungstenite::WebSocket<TcpStream>;

/// I/O timeout of [`ws_connect`] sockets: a dead proxy fails the test instead
/// of hanging it.
pub const WS_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a WebSocket to `ws://{addr}{path}`. On failure returns the HTTP
/// status the server answered (0 if there was none) and a description.
pub fn ws_connect(addr: &str, path: &str) -> Result<WsClient, (u16, String)> {
    let stream = TcpStream::connect(addr).map_err(|e| (0, format!("connect {addr}: {e}")))?;
    stream.set_read_timeout(Some(WS_IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(WS_IO_TIMEOUT)).unwrap();
    let _ = stream.set_nodelay(true);
    match tungstenite::client(format!("ws://{addr}{path}"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err((
            resp.status().as_u16(),
            format!(
                "handshake answered {}: {:?}",
                resp.status(),
                resp.body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            ),
        )),
        Err(e) => Err((0, format!("handshake failed: {e}"))),
    }
}

/// Sends `text` and returns the next text message received (skipping pings
/// and pongs); a close or an error is `Err`.
pub fn ws_echo(ws: &mut WsClient, text: &str) -> Result<String, String> {
    ws.send(Message::text(text))
        .map_err(|e| format!("send {text:?}: {e}"))?;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Ok(t.as_str().to_string()),
            Ok(Message::Close(c)) => return Err(format!("closed by peer: {c:?}")),
            Ok(_) => continue,
            Err(e) => return Err(format!("read after {text:?}: {e}")),
        }
    }
}

/// Closes the socket from the client side and waits (bounded by the I/O
/// timeout) for the close handshake to finish.
pub fn ws_close(mut ws: WsClient) {
    let _ = ws.close(None);
    while ws.read().is_ok() {}
}

/// Waits up to `timeout` for the server side to end the socket (a close
/// frame, EOF or reset). Returns false if it is still open at the deadline.
/// Any data message arriving meanwhile is ignored.
pub fn ws_wait_closed(ws: &mut WsClient, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        ws.get_mut()
            .set_read_timeout(Some((deadline - now).min(Duration::from_millis(200))))
            .unwrap();
        match ws.read() {
            Ok(Message::Close(_)) => return true,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
}

// ---------------------------------------------------------------------------
// Upstream: a labelled HTTP/1.1 backend
// ---------------------------------------------------------------------------

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Path plus query, e.g. `/api/x?delay_ms=10`.
    pub path: String,
    /// Header names (lowercase) and values in arrival order.
    pub headers: Vec<(String, String)>,
    /// When the request head arrived.
    pub at: Instant,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in arrival order (a proxy that appends a
    /// second header line instead of extending the first shows up here).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The path an [`Upstream`] answers health probes on unless told otherwise.
pub const HEALTH_PATH: &str = "/health";

/// The longest an upstream waits at its gate ([`Upstream::release`]) before
/// giving up, so a test that forgets to release cannot hang the suite.
const GATE_CAP: Duration = Duration::from_secs(30);

struct UpstreamState {
    label: String,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
    /// Paths of the requests being handled right now, by request number.
    active: Mutex<Vec<(usize, String)>>,
    /// Health endpoint: path, whether it answers 200 (else 503), and the body
    /// of a 200.
    health_path: Mutex<String>,
    healthy: AtomicBool,
    health_body: Mutex<String>,
    health_probes: AtomicUsize,
    /// Requests other than health probes.
    traffic: AtomicUsize,
    /// When set, connections are accepted and reset at once, unanswered.
    reset: AtomicBool,
    /// When not 0, every request but health probes is answered with this
    /// status (a broken release); see [`Upstream::set_status`].
    forced_status: std::sync::atomic::AtomicU16,
    /// Added to every request but health probes, in ms (a slow release).
    added_delay_ms: std::sync::atomic::AtomicU64,
    /// Permits released by the test: `?hold=1` requests and gated SSE events
    /// wait here.
    gate: tokio::sync::Semaphore,
    /// SSE events queued for the connection so far, with the time of each.
    sse_sent: Mutex<Vec<(String, Instant)>>,
    /// Request body bytes received, counted frame by frame as they arrive.
    body_bytes: AtomicUsize,
    /// WebSocket handshakes answered with 101, and sockets still open.
    ws_handshakes: AtomicUsize,
    ws_open: AtomicUsize,
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

/// Counts a WebSocket as closed however its task ends.
struct WsOpenGuard(Arc<UpstreamState>);

impl Drop for WsOpenGuard {
    fn drop(&mut self) {
        self.0.ws_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend on `127.0.0.1:<random>` that answers every request with status
/// 200 and its label as the body, so tests can tell which pool served a
/// request. It runs on its own thread and runtime and stops when dropped.
///
/// Behaviour chosen by the request:
/// - `?delay_ms=N`: wait N ms before answering (to have a request in flight);
/// - `?hold=1`: wait until the test calls [`Upstream::release`];
/// - `?sse=N&gap_ms=M[&gated=1]`: a `text/event-stream` of N events
///   `data: <label>-<i>\n\n`, each flushed on its own, M ms apart; with
///   `gated=1` every event after the first also waits for a
///   [`Upstream::release`], so a test can prove event 1 arrived before
///   event 2 even existed;
/// - `Upgrade: websocket` (any path): a WebSocket echoing each text message
///   back as `<label>:<text>`;
/// - the health path (default [`HEALTH_PATH`]): `200 ok` or `503`, see
///   [`Upstream::set_healthy`].
///
/// Request bodies are read (and counted) before answering. Responses carry
/// `Server: upstream/<label>` so a proxy's own `Server` header is visible.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(label: &str) -> Upstream {
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            label: label.to_string(),
            hits: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
            health_path: Mutex::new(HEALTH_PATH.to_string()),
            healthy: AtomicBool::new(true),
            health_body: Mutex::new("ok".to_string()),
            health_probes: AtomicUsize::new(0),
            traffic: AtomicUsize::new(0),
            reset: AtomicBool::new(false),
            forced_status: std::sync::atomic::AtomicU16::new(0),
            added_delay_ms: std::sync::atomic::AtomicU64::new(0),
            gate: tokio::sync::Semaphore::new(0),
            sse_sent: Mutex::new(Vec::new()),
            body_bytes: AtomicUsize::new(0),
            ws_handshakes: AtomicUsize::new(0),
            ws_open: AtomicUsize::new(0),
        });
        let mut up = Upstream {
            addr,
            state,
            shutdown: None,
            thread: None,
        };
        up.serve(std_listener);
        up
    }

    /// Runs the accept loop on `std_listener` in a new thread and runtime.
    fn serve(&mut self, std_listener: TcpListener) {
        std_listener.set_nonblocking(true).unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = self.state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{}", self.state.label))
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
                                if st.reset.load(Ordering::SeqCst) {
                                    // RST instead of FIN: the peer gets no answer at all.
                                    let _ = stream.set_zero_linger();
                                    drop(stream);
                                    continue;
                                }
                                let st = st.clone();
                                tokio::spawn(async move {
                                    let svc = service_fn(move |req| handle(req, st.clone()));
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .with_upgrades()
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime here closes the listener and cancels
                // open connections (including WebSockets and streams).
            })
            .expect("spawn upstream thread");
        self.shutdown = Some(tx);
        self.thread = Some(thread);
    }

    /// `127.0.0.1:PORT`, as written into the config.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn label(&self) -> &str {
        &self.state.label
    }

    /// Requests received so far (counted on arrival, before any delay),
    /// health probes included.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Requests currently being handled (e.g. sleeping on `delay_ms`).
    /// Health probes and open WebSockets are not counted.
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

    /// The requests whose path starts with `prefix`, oldest first (ignores
    /// health probes and anything else the proxy sends on its own).
    pub fn requests_for(&self, prefix: &str) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Requests received so far other than health probes.
    pub fn traffic(&self) -> usize {
        self.state.traffic.load(Ordering::SeqCst)
    }

    // -- health --------------------------------------------------------------

    /// Health probes answered so far (on the health path).
    pub fn health_probes(&self) -> usize {
        self.state.health_probes.load(Ordering::SeqCst)
    }

    /// While false, the health path answers 503; while true, `200` with the
    /// health body (`ok` unless [`Upstream::set_health_body`] changed it).
    /// Only the health path is affected: other requests are still served.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// The body of a healthy (200) health answer.
    pub fn set_health_body(&self, body: &str) {
        *self.state.health_body.lock().unwrap() = body.to_string();
    }

    /// Moves the health endpoint to another path.
    pub fn set_health_path(&self, path: &str) {
        *self.state.health_path.lock().unwrap() = path.to_string();
    }

    // -- gate, streams, sockets ----------------------------------------------

    /// Lets `n` waiters through the gate: `?hold=1` requests and gated SSE
    /// events, oldest first.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// SSE events handed to the connection so far (`<label>-<i>`), oldest
    /// first, with the time each one was sent.
    pub fn sse_sent(&self) -> Vec<(String, Instant)> {
        self.state.sse_sent.lock().unwrap().clone()
    }

    /// Request body bytes received so far over all requests.
    pub fn body_bytes(&self) -> usize {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// WebSocket handshakes answered with 101 so far.
    pub fn ws_handshakes(&self) -> usize {
        self.state.ws_handshakes.load(Ordering::SeqCst)
    }

    /// WebSocket connections open right now.
    pub fn ws_open(&self) -> usize {
        self.state.ws_open.load(Ordering::SeqCst)
    }

    // -- failures ------------------------------------------------------------

    /// From now on every request but health probes is answered with
    /// `status` (e.g. 500: a release that fails while still passing its
    /// health check); `None` goes back to normal answers.
    pub fn set_status(&self, status: Option<u16>) {
        self.state
            .forced_status
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// From now on every request but health probes waits `delay` more
    /// before its answer (a slow release).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .added_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// While true, every new connection is accepted and reset at once
    /// without reading or answering anything (a backend that crashes on each
    /// request). Connections already open are not affected.
    pub fn set_reset(&self, reset: bool) {
        self.state.reset.store(reset, Ordering::SeqCst);
    }

    /// Stops the backend: the listener is closed and every open connection
    /// dropped, so connects are refused until [`Upstream::restart`].
    /// Counters and recorded requests are kept.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Listens again on the same port after [`Upstream::stop`] (a no-op if
    /// it is running). Panics if the port cannot be bound again within 5 s.
    pub fn restart(&mut self) {
        if self.thread.is_some() {
            return;
        }
        let mut listener = None;
        let mut last_err = None;
        poll_until(Duration::from_secs(5), || {
            match TcpListener::bind(self.addr) {
                Ok(l) => {
                    listener = Some(l);
                    true
                }
                Err(e) => {
                    last_err = Some(e);
                    false
                }
            }
        });
        let listener = listener.unwrap_or_else(|| {
            panic!(
                "upstream {}: rebind {}: {last_err:?}",
                self.label(),
                self.addr
            )
        });
        self.serve(listener);
    }

    /// Whether the accept loop is running (between start/restart and stop).
    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

type UpBody = Either<Full<Bytes>, StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>>;

fn full(status: u16, content_type: &str, label: &str, body: String) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-upstream", label)
        .header("server", format!("upstream/{label}"))
        .body(Either::Left(Full::new(Bytes::from(body))))
        .unwrap()
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Waits for one gate permit; false if none came within [`GATE_CAP`].
async fn pass_gate(st: &UpstreamState) -> bool {
    match tokio::time::timeout(GATE_CAP, st.gate.acquire()).await {
        Ok(Ok(permit)) => {
            permit.forget();
            true
        }
        _ => false,
    }
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<UpBody>, Infallible> {
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
        method: req.method().as_str().to_string(),
        path: path.clone(),
        headers,
        at: Instant::now(),
    });

    if req.uri().path() == *st.health_path.lock().unwrap() {
        st.health_probes.fetch_add(1, Ordering::SeqCst);
        return Ok(if st.healthy.load(Ordering::SeqCst) {
            let body = st.health_body.lock().unwrap().clone();
            full(200, "text/plain", &st.label, body)
        } else {
            full(503, "text/plain", &st.label, "unhealthy".to_string())
        });
    }
    st.traffic.fetch_add(1, Ordering::SeqCst);
    let wants_ws = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if wants_ws {
        return Ok(websocket(req, st));
    }

    st.in_flight.fetch_add(1, Ordering::SeqCst);
    st.active.lock().unwrap().push((id, path));
    let _guard = InFlightGuard { st: &st, id };
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();

    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    st.body_bytes.fetch_add(d.len(), Ordering::SeqCst);
                }
            }
            Err(_) => break,
        }
    }
    if query_param(query, "hold").is_some() {
        pass_gate(&st).await;
    }
    if let Some(ms) = query_param(query, "delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let added = st.added_delay_ms.load(Ordering::SeqCst);
    if added > 0 {
        tokio::time::sleep(Duration::from_millis(added)).await;
    }
    let forced = st.forced_status.load(Ordering::SeqCst);
    if forced != 0 {
        return Ok(full(forced, "text/plain", &st.label, st.label.clone()));
    }
    if let Some(n) = query_param(query, "sse").and_then(|v| v.parse::<usize>().ok()) {
        let gap = query_param(query, "gap_ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let gated = query_param(query, "gated").is_some();
        return Ok(event_stream(
            st.clone(),
            n,
            Duration::from_millis(gap),
            gated,
        ));
    }
    Ok(full(200, "text/plain", &st.label, st.label.clone()))
}

/// `text/event-stream` of `n` events written by a separate task, one frame
/// (hence one flush) per event.
fn event_stream(st: Arc<UpstreamState>, n: usize, gap: Duration, gated: bool) -> Response<UpBody> {
    // A small queue: an event counts as sent once it is queued for the
    // connection. Tests rely on the gate, not on this timing.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(Frame::data(data)), rx))
    });
    let body = StreamBody::new(frames.boxed());
    let label = st.label.clone();
    tokio::spawn(async move {
        for i in 1..=n {
            if i > 1 {
                if gated && !pass_gate(&st).await {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            let name = format!("{}-{i}", st.label);
            if tx
                .send(Bytes::from(format!("data: {name}\n\n")))
                .await
                .is_err()
            {
                return;
            }
            st.sse_sent.lock().unwrap().push((name, Instant::now()));
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-upstream", label.as_str())
        .header("server", format!("upstream/{label}"))
        .body(Either::Right(body))
        .unwrap()
}

/// Answers a WebSocket handshake with 101 and echoes on the upgraded
/// connection in a task of its own.
fn websocket(mut req: Request<Incoming>, st: Arc<UpstreamState>) -> Response<UpBody> {
    let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY) else {
        return full(400, "text/plain", &st.label, "no Sec-WebSocket-Key".into());
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    st.ws_handshakes.fetch_add(1, Ordering::SeqCst);
    st.ws_open.fetch_add(1, Ordering::SeqCst);
    let guard = WsOpenGuard(st.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let Ok(upgraded) = hyper::upgrade::on(&mut req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        // Runs until the peer closes (a Close is answered by tungstenite
        // itself on the next poll) or the connection fails.
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("{}:{}", st.label, t.as_str())),
                Message::Binary(b) => Message::binary(b),
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Either::Left(Full::new(Bytes::new())))
        .unwrap()
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

/// [`service`] plus extra keys for the table, one `key = value` per line
/// (e.g. `health = {...}`, `min_healthy = 1`).
pub fn service_with(
    name: &str,
    blue: &[&Upstream],
    green: &[&Upstream],
    active: &str,
    extra: &str,
) -> String {
    let mut s = service(name, blue, green, active);
    s.truncate(s.trim_end().len());
    format!("{s}\n{}\n\n", extra.trim())
}

/// A `[[routes]]` entry for any host with extra keys, one per line
/// (e.g. `websocket = true`, `read_timeout = "500ms"`, `max_body = "1KiB"`).
pub fn route_with(path: &str, service: &str, extra: &str) -> String {
    format!(
        "[[routes]]\npath = {}\nservice = {}\n{}\n\n",
        toml_str(path),
        toml_str(service),
        extra.trim()
    )
}

/// A `health = {...}` line probing [`HEALTH_PATH`] for a 200 with `ok` in
/// the body, `rise` and `fall` 2, every `interval`.
pub fn health_check(interval: &str) -> String {
    format!(
        "health = {{ path = {}, interval = {}, timeout = \"500ms\", expect = 200, body = \"ok\", rise = 2, fall = 2 }}",
        toml_str(HEALTH_PATH),
        toml_str(interval)
    )
}

/// Health checks fast enough for tests: a state change shows within about
/// half a second.
pub fn fast_health() -> String {
    health_check("200ms")
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
    server_extra: Vec<String>,
    open_files: Option<u64>,
    log_filter: Option<String>,
    http_port: Option<u16>,
    tls: Option<String>,
    metrics: bool,
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
            server_extra: Vec::new(),
            open_files: None,
            log_filter: None,
            http_port: None,
            tls: None,
            metrics: false,
        }
    }

    /// Turns the metrics listener on (`[listen] metrics`, a free port).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Listens for plain HTTP on this port instead of a free one (an ACME
    /// test points its CA's HTTP-01 validation at it before starting us).
    pub fn http_port(mut self, port: u16) -> Self {
        self.http_port = Some(port);
        self
    }

    /// Adds an HTTPS listener on a free port and `tables` to the config:
    /// the `[tls]`, `[[tls.certificates]]`, `[acme]`... tables it needs.
    pub fn https(mut self, tables: &str) -> Self {
        self.tls = Some(tables.to_string());
        self
    }

    /// Runs the proxy with `RUST_LOG` set to `filter` (default: unset, info).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.to_string());
        self
    }

    /// Starts the proxy with both its soft and hard open-file limits
    /// (RLIMIT_NOFILE) set to `n`, so a test can exhaust them with a few
    /// hundred connections.
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
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

    /// Adds keys to the `[server]` table, one `key = value` per line, e.g.
    /// `header_timeout = "1s"`. May be called more than once.
    pub fn server(mut self, lines: &str) -> Self {
        self.server_extra.push(lines.trim().to_string());
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
        let [free_http, admin_port, https_port] = free_ports::<3>();
        let http_port = self.http_port.unwrap_or(free_http);
        let (https_listen, tls) = match &self.tls {
            Some(tables) => (
                format!("https = \"127.0.0.1:{https_port}\"\n"),
                tables.clone(),
            ),
            None => (String::new(), String::new()),
        };
        let https_port = self.tls.is_some().then_some(https_port);
        let metrics_port = self.metrics.then(free_port);
        let https_listen = match metrics_port {
            Some(port) => format!("{https_listen}metrics = \"127.0.0.1:{port}\"\n"),
            None => https_listen,
        };
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

        let mut server_extra = self.server_extra.join("\n");
        if !server_extra.is_empty() {
            server_extra.push('\n');
        }
        let config = format!(
            "[server]\nthreads = 1\ngrace_period = {}\nstate_dir = {}\n{server_extra}\n\
             [listen]\nhttp = \"127.0.0.1:{http_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n{https_listen}\n\
             {admin}\n{tls}\n{}",
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
            https_port,
            metrics_port,
            token,
            env_token,
            child: None,
            runs: 0,
            open_files: self.open_files,
            log_filter: self.log_filter,
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
    /// The HTTPS listener's port, when the builder asked for one.
    https_port: Option<u16>,
    /// The metrics listener's port, when the builder asked for one.
    metrics_port: Option<u16>,
    /// The token that the admin API accepts, if any.
    token: Option<String>,
    env_token: Option<String>,
    child: Option<Child>,
    /// Number of times the process was launched; names the log files.
    runs: usize,
    /// RLIMIT_NOFILE (soft and hard) of the process, if set.
    open_files: Option<u64>,
    /// `RUST_LOG` of the process, if set.
    log_filter: Option<String>,
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
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        }
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
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
            accepts(&http)
                && (!need_admin || accepts(&admin))
                && self
                    .https_port
                    .is_none_or(|p| accepts(&format!("127.0.0.1:{p}")))
                && self
                    .metrics_port
                    .is_none_or(|p| accepts(&format!("127.0.0.1:{p}")))
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

    /// `127.0.0.1:PORT` of the HTTPS listener; panics if it has none.
    pub fn https_addr(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.https_port.expect("proxy has no https listener")
        )
    }

    /// `http://127.0.0.1:PORT` of the metrics listener; panics if it has none.
    pub fn metrics_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.metrics_port.expect("proxy has no metrics listener")
        )
    }

    /// The value of one series on `GET /metrics`, given as it appears
    /// there (`name{label="v",...}`, labels sorted); `None` when absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (code, text) = get(&format!("{}/metrics", self.metrics_url()), None);
        assert_eq!(code, 200, "GET /metrics: {text}");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
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

    /// CPU time (user + system) the process has used so far, from
    /// `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read stat");
        // The command name (field 2) may hold spaces; fields count from after it.
        let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Open file descriptors of the process now, from `/proc/PID/fd`.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join(format!("stderr-{}.log", self.runs))
    }

    /// Stderr of the current (latest) process so far.
    /// The proxy's log lines at ERROR level.
    pub fn error_lines(&self) -> Vec<String> {
        self.stderr_text()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Stdout of the current (latest) process so far: the access log,
    /// unless `access_log.path` sends it to a file.
    pub fn stdout_text(&self) -> String {
        let path = self.dir.path().join(format!("stdout-{}.log", self.runs));
        fs::read_to_string(path).unwrap_or_default()
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

    /// Like [`Proxy::ctl`] but returns at once (for commands that block).
    pub fn spawn_ctl(&self, args: &[&str]) -> Child {
        spawn_ctl(&self.admin_url(), self.token.as_deref(), args)
    }

    /// `services.NAME` of `GET /status`; panics if missing.
    pub fn service_status(&self, service: &str) -> Value {
        let v = self.status();
        let s = v["services"][service].clone();
        assert!(s.is_object(), "no services.{service} in {v}");
        s
    }

    /// The `health` of backend `addr` of `service` in `GET /status` (either
    /// pool), or a description of what is there instead.
    pub fn health_of(&self, service: &str, addr: &str) -> String {
        let s = self.service_status(service);
        for color in ["blue", "green"] {
            if let Some(b) = s["pools"][color]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["addr"] == addr))
            {
                return b["health"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("<no health in {b}>"));
            }
        }
        format!("<{addr} not in {}>", s["pools"])
    }

    /// Polls `GET /status` until every listed backend of `service` shows the
    /// given health; panics with the last status after `deadline`.
    pub fn wait_health(&self, service: &str, expected: &[(&Upstream, &str)], deadline: Duration) {
        let mut last = String::new();
        let ok = poll_until(deadline, || {
            let got: Vec<String> = expected
                .iter()
                .map(|(u, _)| self.health_of(service, &u.addr()))
                .collect();
            let matched = got.iter().zip(expected).all(|(g, (_, want))| g == want);
            last = expected
                .iter()
                .zip(&got)
                .map(|((u, want), g)| format!("{} ({}): want {want}, got {g}", u.label(), u.addr()))
                .collect::<Vec<_>>()
                .join("; ");
            matched
        });
        assert!(
            ok,
            "health of {service} not as expected within {deadline:?}: {last}\nstatus: {}",
            self.status()
        );
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
