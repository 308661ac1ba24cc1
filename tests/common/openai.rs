//! A fake vLLM: an OpenAI-compatible backend with deterministic token
//! counts, and the harness that runs the official `openai` Python SDK
//! against the proxy.
//!
//! [`FakeOpenAi`] speaks HTTP/1.1 by hand on blocking std sockets (one
//! thread per connection), so a test decides exactly how a Server-Sent
//! Events stream is cut into TCP writes: the proxy's SSE parser has to
//! cope with an event split in two and with several events in one read.
//! Facts about the real server it imitates: shared/reference/vllm-openai.md.
//!
//! Token accounting, the same for every response (so a test can compute
//! what the proxy must reserve and settle):
//! - `prompt_tokens` = [`FakeOpenAi::set_prompt_tokens`] if set, else the
//!   request body's length in bytes / 4, at least 1 (never more than the
//!   body's byte length, so a proxy that reserves one token per byte
//!   always reserves enough for the prompt);
//! - `completion_tokens` = min(`max_tokens` or `max_completion_tokens` or
//!   [`DEFAULT_MAX_TOKENS`], reply length ([`DEFAULT_REPLY_TOKENS`])) × `n`;
//! - the reply of each choice is that many words `"tok "`;
//! - [`FakeOpenAi::set_usage`] replaces only the numbers reported in
//!   `usage`, not the text generated.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{describe, toml_str, wait_output_with_deadline};

/// `completion_tokens` per choice when the request names no `max_tokens`
/// nor `max_completion_tokens` (16 tokens), unless
/// [`FakeOpenAi::set_default_max_tokens`] changed it.
pub const DEFAULT_MAX_TOKENS: u64 = 16;

/// How many tokens the fake generates per choice at most (8 tokens),
/// unless [`FakeOpenAi::set_reply_tokens`] changed it.
pub const DEFAULT_REPLY_TOKENS: u64 = 8;

/// The model name the fake reports in `/v1/models` and every response.
pub const MODEL: &str = "fake-model";

/// The longest a held request waits at the gate (30 s) before it is
/// answered anyway, so a test that forgets to release cannot hang the suite.
const GATE_CAP: Duration = Duration::from_secs(30);

/// How often idle connection threads look at the stop flag (100 ms).
const IDLE_TICK: Duration = Duration::from_millis(100);

/// The largest request head or body the fake accepts (4 MiB).
const MAX_REQUEST: usize = 4 << 20;

/// How a streamed response is cut into TCP writes (each write is one
/// HTTP/1.1 chunk and, with `TCP_NODELAY`, normally one segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// One write per SSE event (the default).
    PerEvent,
    /// Every event in two writes, cut in the middle (inside the JSON).
    Halves,
    /// This many events per write (the last write may hold fewer).
    Batched(usize),
}

/// Token counts the fake reports instead of its own (see
/// [`FakeOpenAi::set_usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageOverride {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct AiRequest {
    pub method: String,
    /// Path plus query.
    pub path: String,
    /// Header names (lowercase) and values in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as received (chunked transfer coding removed).
    pub raw_body: Vec<u8>,
    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub body: Value,
    /// Whether the body came in chunked transfer coding.
    pub chunked: bool,
    pub at: Instant,
}

impl AiRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the fake's settings are when a request arrives.
#[derive(Clone, Debug)]
struct Settings {
    prompt_tokens: Option<u64>,
    reply_tokens: u64,
    default_max_tokens: u64,
    usage: Option<UsageOverride>,
    omit_usage: bool,
    fail: Option<u16>,
    reset_after: Option<usize>,
    chunking: Chunking,
    write_gap: Duration,
}

#[derive(Default)]
struct Gate {
    closed: bool,
    /// Held requests let through by [`FakeOpenAi::release`] but not yet gone.
    permits: usize,
    waiting: usize,
}

struct State {
    settings: Mutex<Settings>,
    requests: Mutex<Vec<AiRequest>>,
    /// Completion requests received (chat and plain).
    completions: AtomicUsize,
    /// Completion responses written to their end.
    finished: AtomicUsize,
    /// Completion requests between arrival and the end of their response.
    in_flight: AtomicUsize,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    stop: AtomicBool,
}

/// A fake vLLM OpenAI-compatible server on `127.0.0.1:<random>`, for the
/// `ai` service of a test config. Stops when dropped.
///
/// Answers `POST /v1/chat/completions` and `POST /v1/completions` (JSON or,
/// with `"stream": true`, SSE ending in `data: [DONE]`; a usage chunk with
/// `choices: []` only when `stream_options.include_usage` is true),
/// `GET /v1/models`, `GET /health` (200, empty body); anything else 404.
/// Request bodies may come with `Content-Length` or chunked; connections are
/// kept alive unless the request says `Connection: close`.
pub struct FakeOpenAi {
    addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl FakeOpenAi {
    /// Starts the fake on an OS-chosen loopback port.
    pub fn start() -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake openai");
        let addr = listener.local_addr().expect("fake openai address");
        let state = Arc::new(State {
            settings: Mutex::new(Settings {
                prompt_tokens: None,
                reply_tokens: DEFAULT_REPLY_TOKENS,
                default_max_tokens: DEFAULT_MAX_TOKENS,
                usage: None,
                omit_usage: false,
                fail: None,
                reset_after: None,
                chunking: Chunking::PerEvent,
                write_gap: Duration::ZERO,
            }),
            requests: Mutex::new(Vec::new()),
            completions: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-openai".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    let _ = std::thread::Builder::new()
                        .name("fake-openai-conn".into())
                        .spawn(move || serve_connection(conn, &st));
                }
            })
            .expect("spawn fake openai");
        FakeOpenAi {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`, as written into the config.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    // -- what arrived ------------------------------------------------------

    /// Every request received so far (all paths), oldest first.
    pub fn requests(&self) -> Vec<AiRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The JSON bodies of the completion requests received so far, oldest
    /// first (`Value::Null` for a body that was not JSON).
    pub fn bodies(&self) -> Vec<Value> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| is_completion(&r.method, &r.path))
            .map(|r| r.body.clone())
            .collect()
    }

    /// The body of the latest completion request, if any.
    pub fn last_body(&self) -> Option<Value> {
        self.bodies().pop()
    }

    /// The latest completion request with its headers, if any.
    pub fn last_request(&self) -> Option<AiRequest> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| is_completion(&r.method, &r.path))
            .cloned()
    }

    /// Completion requests (chat and plain) received so far.
    pub fn count(&self) -> usize {
        self.state.completions.load(Ordering::SeqCst)
    }

    /// Completion responses written to their end (not reset, not failed
    /// mid-write).
    pub fn finished(&self) -> usize {
        self.state.finished.load(Ordering::SeqCst)
    }

    /// Completion requests received whose response has not ended yet
    /// (held at the gate, or streaming).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    // -- the gate ------------------------------------------------------------

    /// From now on, completion requests wait after they were received (and
    /// recorded) until [`FakeOpenAi::release`] or
    /// [`FakeOpenAi::release_all`], at most 30 s.
    pub fn hold(&self) {
        self.state.gate.lock().unwrap().closed = true;
    }

    /// Lets the `n` oldest held requests go on; the gate stays closed.
    pub fn release(&self, n: usize) {
        self.state.gate.lock().unwrap().permits += n;
        self.state.gate_cv.notify_all();
    }

    /// Opens the gate: every held request goes on, and new ones no longer
    /// wait.
    pub fn release_all(&self) {
        let mut g = self.state.gate.lock().unwrap();
        g.closed = false;
        g.permits = 0;
        drop(g);
        self.state.gate_cv.notify_all();
    }

    /// Requests waiting at the gate right now.
    pub fn waiting(&self) -> usize {
        self.state.gate.lock().unwrap().waiting
    }

    /// Polls until `n` requests wait at the gate; false after `deadline`.
    pub fn wait_for_waiting(&self, n: usize, deadline: Duration) -> bool {
        super::poll_until(deadline, || self.waiting() >= n)
    }

    // -- behaviour -----------------------------------------------------------

    /// Reports this many prompt tokens instead of body bytes / 4 (`None`:
    /// back to the estimate).
    pub fn set_prompt_tokens(&self, tokens: Option<u64>) {
        self.settings().prompt_tokens = tokens;
    }

    /// Generates at most this many tokens per choice (default
    /// [`DEFAULT_REPLY_TOKENS`]).
    pub fn set_reply_tokens(&self, tokens: u64) {
        self.settings().reply_tokens = tokens;
    }

    /// Tokens per choice a request without `max_tokens` may get (default
    /// [`DEFAULT_MAX_TOKENS`]).
    pub fn set_default_max_tokens(&self, tokens: u64) {
        self.settings().default_max_tokens = tokens;
    }

    /// Reports these counts in `usage` (e.g. more than the proxy reserved);
    /// `total_tokens` is their sum. `None`: the deterministic counts.
    pub fn set_usage(&self, usage: Option<UsageOverride>) {
        self.settings().usage = usage;
    }

    /// While true, responses carry no usage at all: no `usage` field in
    /// JSON answers, no usage chunk in streams even when asked for (a
    /// backend the proxy cannot settle with).
    pub fn set_omit_usage(&self, omit: bool) {
        self.settings().omit_usage = omit;
    }

    /// Answers completion requests with this status and an OpenAI-style
    /// error JSON (`Some(500)`), after the gate; `None`: answer normally.
    pub fn set_fail(&self, status: Option<u16>) {
        self.settings().fail = status;
    }

    /// Resets the connection (TCP RST) after this many complete SSE events
    /// of a stream (with [`Chunking::Halves`] the first half of the next
    /// one goes out too; `[DONE]` counts as an event, and a stream that has
    /// fewer is reset instead of its final empty chunk); a non-streaming
    /// answer is reset after its head and half of its body. `None`: no
    /// reset.
    pub fn set_reset_after(&self, events: Option<usize>) {
        self.settings().reset_after = events;
    }

    /// How streams are cut into TCP writes (default [`Chunking::PerEvent`]).
    pub fn set_chunking(&self, chunking: Chunking) {
        self.settings().chunking = chunking;
    }

    /// A pause between two writes of a stream, so the pieces arrive at the
    /// proxy in separate reads (shaping only, never used to synchronise;
    /// default none).
    pub fn set_write_gap(&self, gap: Duration) {
        self.settings().write_gap = gap;
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.state.settings.lock().unwrap()
    }

    // -- config --------------------------------------------------------------

    /// A `[services.NAME]` table with this fake in both pools, blue active.
    pub fn service(&self, name: &str) -> String {
        let a = toml_str(&self.addr());
        format!("[services.{name}]\nblue = [{a}]\ngreen = [{a}]\nactive = \"blue\"\n\n")
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.gate_cv.notify_all();
        // Wake the accept loop so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn is_completion(method: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    method == "POST" && (path == "/v1/chat/completions" || path == "/v1/completions")
}

// ---------------------------------------------------------------------------
// The connection: HTTP/1.1 by hand
// ---------------------------------------------------------------------------

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Incoming {
    Request(Head, Vec<u8>, bool),
    Closed,
}

fn serve_connection(stream: TcpStream, st: &State) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TICK));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut out = write_half;
    loop {
        let (head, body, chunked) = match read_request(&mut reader, st) {
            Ok(Incoming::Request(h, b, c)) => (h, b, c),
            Ok(Incoming::Closed) => return,
            Err(msg) => {
                let _ = write_json(&mut out, 400, &error_json(&msg, "invalid_request_error"));
                return;
            }
        };
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        // A write error means the peer is gone: the connection ends.
        let keep = answer(&mut out, st, head, body, chunked).unwrap_or(false);
        if !keep || close || st.stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Reads one line, retrying on the idle read timeout until the stop flag.
/// `Ok(None)`: the peer closed.
fn read_line(r: &mut BufReader<TcpStream>, st: &State) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    loop {
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(None),
            Ok(_) if line.ends_with(b"\n") => {
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()))
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if st.stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
        if line.len() > MAX_REQUEST {
            return Err("line too long".into());
        }
    }
}

fn read_exact(r: &mut BufReader<TcpStream>, st: &State, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err("peer closed inside the body".into()),
            Ok(k) => got += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if st.stop.load(Ordering::SeqCst) {
                    return Err("stopped".into());
                }
            }
            Err(e) => return Err(format!("read body: {e}")),
        }
    }
    Ok(buf)
}

fn read_request(r: &mut BufReader<TcpStream>, st: &State) -> Result<Incoming, String> {
    // Request line (blank lines before it are allowed, RFC 9112 §2.2).
    let request_line = loop {
        match read_line(r, st)? {
            None => return Ok(Incoming::Closed),
            Some(l) if l.trim().is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, st)?.ok_or("peer closed inside the head")?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').ok_or("header line without a colon")?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let head = Head {
        method,
        path,
        headers,
    };
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let size_line = read_line(r, st)?.ok_or("peer closed inside a chunk size")?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
            if size == 0 {
                // Trailer section up to the empty line.
                loop {
                    let l = read_line(r, st)?.ok_or("peer closed inside the trailers")?;
                    if l.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if body.len() + size > MAX_REQUEST {
                return Err("body too large".into());
            }
            body.extend(read_exact(r, st, size)?);
            let crlf = read_line(r, st)?.ok_or("peer closed after a chunk")?;
            if !crlf.trim().is_empty() {
                return Err("chunk data longer than its size".into());
            }
        }
        body
    } else {
        let len: usize = match head.header("content-length") {
            Some(v) => v.trim().parse().map_err(|_| "bad Content-Length")?,
            None => 0,
        };
        if len > MAX_REQUEST {
            return Err("body too large".into());
        }
        read_exact(r, st, len)?
    };
    Ok(Incoming::Request(head, body, chunked))
}

// ---------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------

fn error_json(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

fn write_json(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        reason(status),
        text.len()
    )?;
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Sends a TCP RST instead of a FIN when the socket is closed.
fn set_zero_linger(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a pointer to a live `linger`
    // of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn reset(out: &TcpStream) {
    set_zero_linger(out);
    let _ = out.shutdown(std::net::Shutdown::Read);
}

/// Waits at the gate while it is closed (at most [`GATE_CAP`], or until the
/// fake stops).
fn pass_gate(st: &State) {
    let mut g = st.gate.lock().unwrap();
    if !g.closed {
        return;
    }
    g.waiting += 1;
    let end = Instant::now() + GATE_CAP;
    loop {
        if !g.closed || st.stop.load(Ordering::SeqCst) || Instant::now() >= end {
            break;
        }
        if g.permits > 0 {
            g.permits -= 1;
            break;
        }
        let left = end.saturating_duration_since(Instant::now());
        g = st.gate_cv.wait_timeout(g, left).unwrap().0;
    }
    g.waiting -= 1;
}

/// Answers one request; returns whether the connection may be reused.
fn answer(
    out: &mut TcpStream,
    st: &State,
    head: Head,
    raw_body: Vec<u8>,
    chunked: bool,
) -> std::io::Result<bool> {
    let body: Value = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
    let completion = is_completion(&head.method, &head.path);
    st.requests.lock().unwrap().push(AiRequest {
        method: head.method.clone(),
        path: head.path.clone(),
        headers: head.headers.clone(),
        raw_body: raw_body.clone(),
        body: body.clone(),
        chunked,
        at: Instant::now(),
    });
    let path = head.path.split('?').next().unwrap_or("");
    if !completion {
        return match (head.method.as_str(), path) {
            ("GET", "/health") => {
                out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
                Ok(true)
            }
            ("GET", "/v1/models") => {
                let models = json!({"object": "list", "data": [
                    {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]});
                write_json(out, 200, &models)?;
                Ok(true)
            }
            _ => {
                let e = error_json(&format!("no route {path}"), "not_found_error");
                write_json(out, 404, &e)?;
                Ok(true)
            }
        };
    }
    st.completions.fetch_add(1, Ordering::SeqCst);
    st.in_flight.fetch_add(1, Ordering::SeqCst);
    struct Done<'a>(&'a State);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(st);
    pass_gate(st);
    let settings = st.settings.lock().unwrap().clone();
    if let Some(status) = settings.fail {
        let e = error_json("the fake backend was told to fail", "internal_server_error");
        write_json(out, status, &e)?;
        st.finished.fetch_add(1, Ordering::SeqCst);
        return Ok(true);
    }
    if !body.is_object() {
        let e = error_json("the body is not a JSON object", "invalid_request_error");
        write_json(out, 400, &e)?;
        return Ok(true);
    }
    let chat = path == "/v1/chat/completions";
    let plan = Plan::new(&body, raw_body.len(), &settings, chat);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        stream(out, st, &settings, &plan)
    } else {
        let text = plan.json_response().to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            text.len()
        );
        if settings.reset_after.is_some() {
            out.write_all(head.as_bytes())?;
            out.write_all(&text.as_bytes()[..text.len() / 2])?;
            out.flush()?;
            reset(out);
            return Ok(false);
        }
        out.write_all(format!("{head}{text}").as_bytes())?;
        out.flush()?;
        st.finished.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
}

/// What one completion request gets.
struct Plan {
    chat: bool,
    id: String,
    /// Choices (`n`).
    n: u64,
    /// Tokens generated per choice.
    per_choice: u64,
    /// Whether `max_tokens` cut the reply short (`finish_reason: length`).
    cut: bool,
    usage: Option<Value>,
    include_usage: bool,
}

impl Plan {
    fn new(body: &Value, body_len: usize, s: &Settings, chat: bool) -> Plan {
        let max = body
            .get("max_tokens")
            .and_then(Value::as_u64)
            .or_else(|| body.get("max_completion_tokens").and_then(Value::as_u64))
            .unwrap_or(s.default_max_tokens);
        let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
        let per_choice = max.min(s.reply_tokens);
        let prompt = s
            .prompt_tokens
            .unwrap_or_else(|| (body_len as u64 / 4).max(1));
        let (p, c) = match s.usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            None => (prompt, per_choice * n),
        };
        let usage = (!s.omit_usage)
            .then(|| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}));
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
        let id = format!(
            "{}-{}",
            if chat { "chatcmpl" } else { "cmpl" },
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        );
        Plan {
            chat,
            id,
            n,
            per_choice,
            cut: max < s.reply_tokens,
            usage,
            include_usage,
        }
    }

    fn finish_reason(&self) -> &'static str {
        if self.cut {
            "length"
        } else {
            "stop"
        }
    }

    fn json_response(&self) -> Value {
        let text = "tok ".repeat(self.per_choice as usize);
        let choices: Vec<Value> = (0..self.n)
            .map(|i| {
                if self.chat {
                    json!({"index": i, "message": {"role": "assistant", "content": text},
                           "logprobs": null, "finish_reason": self.finish_reason()})
                } else {
                    json!({"index": i, "text": text, "logprobs": null,
                           "finish_reason": self.finish_reason()})
                }
            })
            .collect();
        let mut v = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": 0,
            "model": MODEL,
            "choices": choices,
        });
        if let Some(u) = &self.usage {
            v["usage"] = u.clone();
        }
        v
    }

    /// The `data:` payloads of the stream, `[DONE]` last.
    fn events(&self) -> Vec<String> {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut events = Vec::new();
        for t in 0..self.per_choice {
            for i in 0..self.n {
                let last = t + 1 == self.per_choice;
                let finish = if last {
                    Value::from(self.finish_reason())
                } else {
                    Value::Null
                };
                let choice = if self.chat {
                    let mut delta = json!({"content": "tok "});
                    if t == 0 {
                        delta["role"] = "assistant".into();
                    }
                    json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": i, "text": "tok ", "logprobs": null, "finish_reason": finish})
                };
                let mut ev = json!({"id": self.id, "object": object, "created": 0,
                                    "model": MODEL, "choices": [choice]});
                if self.include_usage {
                    ev["usage"] = Value::Null;
                }
                events.push(ev.to_string());
            }
        }
        if self.include_usage {
            if let Some(u) = &self.usage {
                let ev = json!({"id": self.id, "object": object, "created": 0,
                                "model": MODEL, "choices": [], "usage": u});
                events.push(ev.to_string());
            }
        }
        events.push("[DONE]".to_string());
        events
    }
}

/// Writes `bytes` as one HTTP/1.1 chunk in one write.
fn write_chunk(out: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut buf = format!("{:x}\r\n", bytes.len()).into_bytes();
    buf.extend_from_slice(bytes);
    buf.extend_from_slice(b"\r\n");
    out.write_all(&buf)?;
    out.flush()
}

fn stream(out: &mut TcpStream, st: &State, s: &Settings, plan: &Plan) -> std::io::Result<bool> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )?;
    out.flush()?;
    let events: Vec<Vec<u8>> = plan
        .events()
        .into_iter()
        .map(|e| format!("data: {e}\n\n").into_bytes())
        .collect();
    // Cut the events into writes as the test asked, remembering after how
    // many events each write ends (for the reset).
    let mut writes: Vec<(Vec<u8>, usize)> = Vec::new();
    match s.chunking {
        Chunking::PerEvent => {
            for (i, e) in events.iter().enumerate() {
                writes.push((e.clone(), i + 1));
            }
        }
        Chunking::Halves => {
            for (i, e) in events.iter().enumerate() {
                let mid = e.len() / 2;
                writes.push((e[..mid].to_vec(), i));
                writes.push((e[mid..].to_vec(), i + 1));
            }
        }
        Chunking::Batched(k) => {
            for (j, group) in events.chunks(k.max(1)).enumerate() {
                let done = (j * k.max(1) + group.len()).min(events.len());
                writes.push((group.concat(), done));
            }
        }
    }
    let mut first = true;
    for (bytes, done_after) in writes {
        if let Some(k) = s.reset_after {
            if done_after > k {
                // Send what completes event K, then reset.
                reset(out);
                return Ok(false);
            }
        }
        if !first && !s.write_gap.is_zero() {
            std::thread::sleep(s.write_gap);
        }
        first = false;
        write_chunk(out, &bytes)?;
    }
    if s.reset_after.is_some() {
        reset(out);
        return Ok(false);
    }
    out.write_all(b"0\r\n\r\n")?;
    out.flush()?;
    st.finished.fetch_add(1, Ordering::SeqCst);
    Ok(true)
}

// ---------------------------------------------------------------------------
// The official `openai` Python SDK
// ---------------------------------------------------------------------------

/// Environment variable naming the Python interpreter that has the `openai`
/// package, instead of the venv `.ci/setup` makes.
pub const SDK_PYTHON_ENV: &str = "SWITCHYARD_SDK_PYTHON";

/// The venv `.ci/setup` installs the pinned `openai` package into, under
/// `$HOME` unless [`SDK_VENV_ENV`] says otherwise.
pub const SDK_VENV: &str = ".cache/switchyard/openai-sdk-venv";

/// Environment variable moving the venv, read by `.ci/setup` too.
pub const SDK_VENV_ENV: &str = "SWITCHYARD_SDK_VENV";

/// How long one SDK script may run (30 s) before the test fails.
pub const SDK_DEADLINE: Duration = Duration::from_secs(30);

/// The Python interpreter with the `openai` SDK. Panics (never skips) with
/// what to run when it is missing.
pub fn sdk_python() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let python = match std::env::var_os(SDK_PYTHON_ENV) {
                Some(p) => PathBuf::from(p),
                None => {
                    let venv = match std::env::var_os(SDK_VENV_ENV) {
                        Some(v) => PathBuf::from(v),
                        None => {
                            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(SDK_VENV)
                        }
                    };
                    venv.join("bin/python")
                }
            };
            let probe = Command::new(&python)
                .args(["-c", "import openai; print(openai.__version__)"])
                .stdin(Stdio::null())
                .output();
            match probe {
                Ok(out) if out.status.success() => Ok(python),
                Ok(out) => Err(format!(
                    "{} cannot import openai: {}",
                    python.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => Err(format!("{}: {e}", python.display())),
            }
        })
        .clone()
        .unwrap_or_else(|e| {
            panic!(
                "the openai Python SDK is missing ({e}): run .ci/setup, which installs \
                 it into ${SDK_VENV_ENV} or else $HOME/{SDK_VENV}, or point \
                 {SDK_PYTHON_ENV} at a python that has it"
            )
        })
}

/// What an SDK script reported: its JSON result line, or the exception it
/// raised.
#[derive(Debug)]
pub enum SdkOutcome {
    /// The script's JSON result.
    Ok(Value),
    /// The SDK raised: exception class name (e.g. `RateLimitError`),
    /// `str(e)`, the HTTP status and response headers (lowercase names) if
    /// the exception had a response.
    Raised {
        class: String,
        message: String,
        status: Option<u16>,
        headers: Value,
    },
}

impl SdkOutcome {
    /// The result; panics with the exception if the SDK raised.
    pub fn ok(self) -> Value {
        match self {
            SdkOutcome::Ok(v) => v,
            raised => panic!("the SDK raised: {raised:?}"),
        }
    }
}

/// Runs `tests/sdk/SCRIPT` with the SDK against `base_url` (e.g.
/// `http://127.0.0.1:PORT/v1`); `args` is the script's JSON argument
/// (keyword arguments of the SDK call, plus `api_key`). Panics if the
/// script prints no result line (a bug in the script or a missing SDK).
pub fn run_sdk(script: &str, base_url: &str, args: &Value) -> SdkOutcome {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let child = Command::new(sdk_python())
        .arg(&path)
        .arg(base_url)
        .arg(args.to_string())
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", path.display()));
    let out = wait_output_with_deadline(child, SDK_DEADLINE, script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let Some(v) = line.and_then(|l| serde_json::from_str::<Value>(l).ok()) else {
        panic!("{script} printed no JSON result:\n{}", describe(&out));
    };
    match (out.status.success(), v.get("raised")) {
        (true, _) => SdkOutcome::Ok(v),
        (false, Some(class)) => SdkOutcome::Raised {
            class: class.as_str().unwrap_or("").to_string(),
            message: v["message"].as_str().unwrap_or("").to_string(),
            status: v["status"].as_u64().map(|s| s as u16),
            headers: v["headers"].clone(),
        },
        (false, None) => panic!("{script} failed:\n{}", describe(&out)),
    }
}

// -- proxies with a token budget ------------------------------------------

/// A proxy sending `/v1/` to `service` (a `[services.ai]` table, e.g.
/// [`FakeOpenAi::service`]) with the keys of a `[token_budgets.ai]` table,
/// `route_extra` on the route and `tables` (other limits) beside it.
pub fn budget_proxy(
    service: String,
    budget: &str,
    route_extra: &str,
    tables: &str,
) -> super::ProxyBuilder {
    let mut s = service;
    s.push_str(&format!(
        "[token_budgets.ai]\n{}\n\n{tables}\n",
        budget.trim()
    ));
    s.push_str(&super::route_with(
        "/v1/",
        "ai",
        &format!("token_budget = \"ai\"\n{route_extra}"),
    ));
    super::ProxyBuilder::new(s)
}

/// A chat completion body for [`MODEL`] with one user message, the fields
/// of `extra` set on top.
pub fn chat(extra: Value) -> Vec<u8> {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    serde_json::to_vec(&body).unwrap()
}

/// The API key [`post`] sends; tests look for `sk-secret` in logs.
pub const API_KEY: &str = "sk-secret-a";

/// POSTs `body` as JSON to `path` with `Authorization: Bearer` [`API_KEY`].
pub fn post(proxy: &super::Proxy, path: &str, body: &[u8]) -> super::Reply {
    super::request(
        "POST",
        &format!("{}{path}", proxy.http_url()),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {API_KEY}")),
        ],
        Some(body),
    )
}

/// `GET /limits` for the budget `ai`.
pub fn budget_stats(proxy: &super::Proxy) -> Value {
    let (status, limits) = proxy.admin("GET", "/limits", None);
    assert_eq!(status, 200, "{limits}");
    limits["token_budgets"]["ai"].clone()
}

/// The `error` object of an answer in OpenAI's error shape
/// (`{"error": {"message", "type", "param", "code"}}`), checked to be one.
pub fn openai_error(status: u16, content_type: Option<&str>, body: &str) -> Value {
    assert_eq!(content_type, Some("application/json"), "{status} {body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let e = v["error"].clone();
    for field in ["message", "type", "code"] {
        assert!(e[field].is_string(), "{field} missing: {body}");
    }
    assert!(e.get("param").is_some(), "param missing: {body}");
    e
}
