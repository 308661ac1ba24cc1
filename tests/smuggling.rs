//! Request smuggling and message framing: whatever bytes a client sends,
//! switchyard and the backend must agree on where each request ends
//! (RFC 9112 §6, §9.3; RFC 9110 §8.6, §7.8).
//!
//! The backend here is [`Wire`], a raw TCP server with its own strict
//! HTTP/1.1 parser that records every byte it receives: a request that
//! reached it without switchyard's `X-Forwarded-For` was forwarded raw
//! (smuggled past the proxy's parser), a request line it cannot parse means
//! the proxy sent bytes it did not frame, and a request carrying both
//! `Content-Length` and `Transfer-Encoding` is ambiguous by itself. Paths
//! named `/smuggled` must never reach it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

/// How long any exchange may take before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(5);

/// Bytes per backend connection shown in a failure message.
const DUMP_TAIL: usize = 600;

/// The host every route of [`wire_proxy`] is on; any other host has no route.
const HOST: &str = "app.test";

// ---------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------

/// How a test body starts its proxy. Issue 14 ran every test here on two
/// request paths (Pingora's proxy and a lean HTTP/1 path, since removed:
/// README, "Lean HTTP/1 path"); one is left.
#[derive(Clone, Copy, Debug)]
struct Path;

impl Path {
    /// A proxy with `body` as its services and routes.
    fn proxy(self, body: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder::new(body)
    }
}

/// Runs `test` against the proxy.
fn run_on_proxy(test: impl Fn(Path)) {
    test(Path);
}

// ---------------------------------------------------------------------------
// Wire: a raw backend that shows what it received, byte by byte
// ---------------------------------------------------------------------------

/// One request as [`Wire`] parsed it.
#[derive(Clone, Debug)]
struct WireRequest {
    /// Index of the backend connection it came on (accept order).
    conn: usize,
    method: String,
    target: String,
    /// Header names (lowercase) and values, in arrival order.
    headers: Vec<(String, String)>,
    /// The body, chunked framing removed.
    body: Vec<u8>,
}

impl WireRequest {
    fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct WireLog {
    /// Raw bytes received, per connection.
    conns: Vec<Vec<u8>>,
    requests: Vec<WireRequest>,
    /// Bytes the parser refused, with the reason.
    errors: Vec<String>,
    /// Connections closed in the middle of a request.
    aborted: usize,
}

/// A backend on raw TCP with a strict HTTP/1.1 parser (CRLF lines, one
/// framing header, strict chunk sizes) that answers by path:
///
/// - `HEAD` anything: 200 with `Content-Length: 11` and no body;
/// - `/early-hints`: `103 Early Hints`, then 200;
/// - `/interim-100`: an unasked-for `100 Continue`, then 200;
/// - `/trunc-length`: `Content-Length: 100`, 9 bytes, close;
/// - `/trunc-chunk`: chunked, half a chunk, close;
/// - `/trunc-last-chunk`: chunked, one whole chunk, no last chunk, close;
/// - `/stall/length`: `Content-Length: 100`, 9 bytes, then nothing more on a
///   connection kept open (the proxy's `read_timeout` ends it);
/// - any request with `Upgrade: h2c`: `101 Switching Protocols`, then it
///   only records (an h2c-capable server: a tunnel past the proxy);
/// - anything else (an `Upgrade: websocket` included): 200 kept alive, the
///   body `<method> <target> <body length>`.
struct Wire {
    addr: String,
    log: Arc<Mutex<WireLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Wire {
    fn start() -> Wire {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind wire backend");
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(WireLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let id = {
                    let mut log = l.lock().unwrap();
                    log.conns.push(Vec::new());
                    log.conns.len() - 1
                };
                let l = l.clone();
                std::thread::spawn(move || wire_serve(conn, id, l));
            }
        });
        Wire {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<WireRequest> {
        self.log.lock().unwrap().requests.clone()
    }

    fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    /// Everything the backend received, as text, one block per connection.
    fn dump(&self) -> String {
        let log = self.log.lock().unwrap();
        let conns: Vec<String> = log
            .conns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // The end of each: where a test's own bytes are.
                let tail = &c[c.len().saturating_sub(DUMP_TAIL)..];
                format!("conn {i} (last bytes): {:?}", String::from_utf8_lossy(tail))
            })
            .collect();
        format!("{}\nparse errors: {:?}", conns.join("\n"), log.errors)
    }

    /// The invariants of every exchange: the backend parsed everything it
    /// got, every request came through switchyard's parser (it carries
    /// `X-Forwarded-For`), none had two framings, none was `/smuggled`.
    fn assert_clean(&self, what: &str) {
        let log = self.log.lock().unwrap();
        let bad: Vec<String> = log
            .requests
            .iter()
            .filter_map(|r| {
                let why = if r.target.contains("smuggled") {
                    "a smuggled request reached the backend"
                } else if r.header_all("x-forwarded-for").is_empty() {
                    "forwarded raw, not through the proxy's parser"
                } else if !r.header_all("content-length").is_empty()
                    && !r.header_all("transfer-encoding").is_empty()
                {
                    "both Content-Length and Transfer-Encoding"
                } else {
                    return None;
                };
                Some(format!("{why}: {} {}", r.method, r.target))
            })
            .chain(log.errors.iter().cloned())
            .collect();
        drop(log);
        assert!(
            bad.is_empty(),
            "{what}: the backend got {bad:?}\n{}",
            self.dump()
        );
    }

    /// Whether the backend has received `needle` anywhere on any connection.
    fn received_bytes(&self, needle: &[u8]) -> bool {
        let log = self.log.lock().unwrap();
        log.conns.iter().any(|c| find(c, needle).is_some())
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one connection: parse, record, answer, until EOF or a parse error.
fn wire_serve(mut conn: TcpStream, id: usize, log: Arc<Mutex<WireLog>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf: Vec<u8> = Vec::new();
    let mut tunnel = false;
    loop {
        if !tunnel {
            match parse_request(&buf) {
                Parsed::Need => {}
                Parsed::Bad(why) => {
                    let tail = &buf[buf.len().saturating_sub(DUMP_TAIL)..];
                    log.lock().unwrap().errors.push(format!(
                        "conn {id}: {why} in {:?}",
                        String::from_utf8_lossy(tail)
                    ));
                    return;
                }
                Parsed::Done(used, mut req) => {
                    buf.drain(..used);
                    req.conn = id;
                    log.lock().unwrap().requests.push(req.clone());
                    let (answer, close) = wire_answer(&req);
                    if conn.write_all(&answer).is_err() {
                        return;
                    }
                    if close {
                        let _ = conn.shutdown(Shutdown::Both);
                        return;
                    }
                    tunnel = answer.starts_with(b"HTTP/1.1 101");
                    continue;
                }
            }
        }
        let mut chunk = [0u8; 8192];
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => {
                // A request cut short (the proxy gave up on its body, and
                // closed) is an abort, not a misframing: nothing follows.
                if !buf.is_empty() && !tunnel {
                    log.lock().unwrap().aborted += 1;
                }
                return;
            }
            Ok(n) => {
                log.lock().unwrap().conns[id].extend_from_slice(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// The answer to `req` and whether the connection closes after it.
fn wire_answer(req: &WireRequest) -> (Vec<u8>, bool) {
    let ok = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    if req
        .header_all("upgrade")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("h2c"))
    {
        let head =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
        return (head.into(), false);
    }
    if req.method == "HEAD" {
        let head = match req.target.as_str() {
            "/head-chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            _ => "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n",
        };
        return (head.into(), false);
    }
    let answer = match req.target.as_str() {
        "/no-content" => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
        "/hop-resp" => "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: X-Backend-Conn\r\n\
                        X-Backend-Conn: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
                        TE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\nhop"
            .to_string(),
        "/hop-resp-cl" => {
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Content-Length\r\n\r\nhop"
                .to_string()
        }
        "/not-modified" => {
            "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 11\r\n\r\n".to_string()
        }
        "/ws/refuse-426" => {
            "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno".to_string()
        }
        "/resp-cl-te" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
            return (head.into(), true);
        }
        "/resp-dup-cl" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello, ";
            return (head.into(), true);
        }
        "/early-hints" => format!(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n{}",
            ok("after hints")
        ),
        "/interim-100" => format!("HTTP/1.1 100 Continue\r\n\r\n{}", ok("after 100")),
        "/trunc-length" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part";
            return (head.into(), true);
        }
        "/stall/length" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part";
            return (head.into(), false);
        }
        "/trunc-chunk" => {
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly-par";
            return (head.into(), true);
        }
        "/trunc-last-chunk" => {
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfull\r\n";
            return (head.into(), true);
        }
        target => ok(&format!("{} {target} {}", req.method, req.body.len())),
    };
    (answer.into_bytes(), false)
}

enum Parsed {
    /// More bytes needed.
    Need,
    Bad(String),
    /// Bytes used and the request.
    Done(usize, WireRequest),
}

/// Parses one request from the start of `buf`, strictly (RFC 9112 §2-§7):
/// CRLF line ends, `name: value` fields with token names, one framing.
fn parse_request(buf: &[u8]) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Parsed::Need;
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parsed::Bad("head is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Parsed::Bad(format!("bad request line {line:?}"));
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || version != "HTTP/1.1" || target.is_empty() {
        return Parsed::Bad(format!("bad request line {line:?}"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Parsed::Bad(format!("header line without a colon {l:?}"));
        };
        if !token(name) {
            return Parsed::Bad(format!("bad header name {name:?}"));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Parsed::Bad(format!("control byte in header value {l:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut req = WireRequest {
        conn: 0,
        method: method.into(),
        target: target.into(),
        headers,
        body: Vec::new(),
    };
    let start = head_end + 4;
    let te = req.header_all("transfer-encoding");
    let cl = req.header_all("content-length");
    if !te.is_empty() {
        if te.len() > 1 || !te[0].eq_ignore_ascii_case("chunked") {
            return Parsed::Bad(format!("Transfer-Encoding {te:?}"));
        }
        return match dechunk(&buf[start..]) {
            None => Parsed::Need,
            Some(Err(why)) => Parsed::Bad(why),
            Some(Ok((used, body))) => {
                req.body = body;
                Parsed::Done(start + used, req)
            }
        };
    }
    let len = match cl[..] {
        [] => 0,
        [v] if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => match v.parse() {
            Ok(n) => n,
            Err(_) => return Parsed::Bad(format!("Content-Length {v:?}")),
        },
        _ => return Parsed::Bad(format!("Content-Length {cl:?}")),
    };
    if buf.len() < start + len {
        return Parsed::Need;
    }
    req.body = buf[start..start + len].to_vec();
    Parsed::Done(start + len, req)
}

/// Decodes a chunked body at the start of `b`: None if incomplete, else the
/// bytes used and the body, or why it is malformed.
fn dechunk(b: &[u8]) -> Option<Result<(usize, Vec<u8>), String>> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line_end = at + find(&b[at..], b"\r\n")?;
        let line = String::from_utf8_lossy(&b[at..line_end]).into_owned();
        let size_text = line.split(';').next().unwrap_or("");
        let size = match usize::from_str_radix(size_text, 16) {
            Ok(n) if !size_text.is_empty() && size_text.bytes().all(|c| c.is_ascii_hexdigit()) => n,
            _ => return Some(Err(format!("bad chunk size line {line:?}"))),
        };
        at = line_end + 2;
        if size == 0 {
            // Trailer section: lines until an empty one.
            loop {
                let end = at + find(&b[at..], b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some(Ok((at, body)));
                }
            }
        }
        if b.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&b[at..at + size]);
        if &b[at + size..at + size + 2] != b"\r\n" {
            return Some(Err("chunk data not followed by CRLF".into()));
        }
        at += size + 2;
    }
}

// ---------------------------------------------------------------------------
// The proxy in front of it, and the client side
// ---------------------------------------------------------------------------

/// Routes on [`HOST`] (any other host has no route): `/` to the wire
/// backend, `/ws` the same with WebSockets allowed, `/small` with a 16-byte
/// `max_body`, `/denied` answered 404 by the proxy.
fn wire_proxy(path: Path, wire: &Wire, green: &Upstream) -> Proxy {
    let host = toml_str(HOST);
    let cfg = format!(
        "[services.api]\nblue = [{}]\ngreen = [{}]\nactive = \"blue\"\n\n\
         [[routes]]\nhost = {host}\npath = \"/\"\nservice = \"api\"\n\n\
         [[routes]]\nhost = {host}\npath = \"/ws\"\nservice = \"api\"\nwebsocket = true\n\n\
         [[routes]]\nhost = {host}\npath = \"/small\"\nservice = \"api\"\nmax_body = \"16\"\n\n\
         [[routes]]\nhost = {host}\npath = \"/denied\"\naction = \"deny\"\n\n\
         [[routes]]\nhost = {host}\npath = \"/stall\"\nservice = \"api\"\nread_timeout = \"300ms\"\n\n",
        toml_str(&wire.addr),
        toml_str(&green.addr()),
    );
    path.proxy(cfg).start()
}

/// A test's backend and proxy.
struct Setup {
    wire: Wire,
    _green: Upstream,
    proxy: Proxy,
}

fn setup(path: Path) -> Setup {
    let wire = Wire::start();
    let green = Upstream::start("green");
    let proxy = wire_proxy(path, &wire, &green);
    Setup {
        wire,
        _green: green,
        proxy,
    }
}

/// `GET target` on [`HOST`] with extra header lines (each ending in CRLF).
fn get(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n")
}

/// The last request of an exchange: answered, then the proxy closes.
fn last(target: &str) -> String {
    get(target, "Connection: close\r\n")
}

/// A request smuggled inside another one's bytes; must never reach a backend.
fn smuggled() -> String {
    get("/smuggled", "")
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Closed (FIN or reset) after the last complete response.
    Closed,
    /// Closed in the middle of a response: its head, or part of its body.
    Cut(String),
}

/// What came back on one connection.
#[derive(Debug)]
struct Exchange {
    replies: Vec<Reply>,
    end: End,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.replies.iter().map(|r| r.status).collect()
    }

    fn bodies(&self) -> Vec<&str> {
        self.replies.iter().map(|r| r.body.as_str()).collect()
    }
}

/// Sends `bytes` on a new connection and reads responses until the proxy
/// closes it; fails if it is still open after [`DEADLINE`] without
/// answering (so each exchange ends with a `Connection: close` request or
/// one the proxy must refuse).
fn exchange(addr: &str, bytes: &[u8]) -> Exchange {
    let mut c = RawConn::connect(addr);
    // The proxy may close before reading everything; what it answered counts.
    let _ = c.send(bytes);
    read_until_close(&mut c, &String::from_utf8_lossy(bytes))
}

fn read_until_close(c: &mut RawConn, what: &str) -> Exchange {
    let mut replies = Vec::new();
    loop {
        match c.read_response(DEADLINE) {
            Ok(r) => replies.push(r),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("still open after {DEADLINE:?} and {replies:?}, sent {what:?}")
            }
            Err(e) => {
                let text = e.to_string();
                // RawConn names what it held when the stream ended: nothing
                // (a clean close between responses) or part of a response.
                let clean = text.contains("complete response head; got \"\"")
                    || e.kind() == std::io::ErrorKind::ConnectionReset;
                let end = match clean {
                    true => End::Closed,
                    false => End::Cut(text),
                };
                return Exchange { replies, end };
            }
        }
    }
}

/// The refusal of a request whose framing is broken: one 400, then the
/// connection closes (RFC 9112 §6.3: the framing of what follows is
/// unknown), and nothing reaches the backend.
fn assert_refused_400(s: &Setup, what: &str, bytes: &[u8]) {
    let before = s.wire.requests().len();
    let ex = exchange(&s.proxy.http_addr(), bytes);
    assert_eq!(
        (ex.statuses(), &ex.end),
        (vec![400], &End::Closed),
        "{what}: expected one 400 then close; sent {:?}; got {ex:?}",
        String::from_utf8_lossy(bytes)
    );
    s.wire.assert_clean(what);
    assert_eq!(
        s.wire.requests().len(),
        before,
        "{what}: a refused request reached the backend\n{}",
        s.wire.dump()
    );
}

/// Chunked framing of `data` as one chunk and the last chunk.
fn chunked(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n0\r\n\r\n", data.len())
}

// ---------------------------------------------------------------------------
// Both Content-Length and Transfer-Encoding (RFC 9112 §6.1, §6.3)
// ---------------------------------------------------------------------------

/// A request with both framing headers: Transfer-Encoding wins and
/// Content-Length goes (or the request is refused), and the connection
/// closes after the answer (RFC 9112 §6.1, §6.3). CL.TE: by the length the
/// smuggled request is body, by chunked framing it is a next request. TE.CL:
/// by chunked framing it is the body, by the length a next request.
#[test]
fn content_length_with_transfer_encoding_never_splits_differently() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let tail = "0\r\n\r\n".to_string() + &smuggled();
        let chunk = smuggled();
        let cases = [
            (
                "CL.TE",
                format!(
                    "POST /clte HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{tail}",
                    tail.len()
                ),
                "",
            ),
            (
                "TE.CL",
                format!(
                    "POST /tecl HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{}",
                    chunked(&chunk)
                ),
                chunk.as_str(),
            ),
        ];
        for (what, bytes, body) in &cases {
            let bytes = bytes.clone() + &last("/after");
            let before = s.wire.requests().len();
            let ex = exchange(&addr, bytes.as_bytes());
            s.wire.assert_clean(what);
            let got = s.wire.requests()[before..].to_vec();
            match ex.statuses()[..] {
                [400] => assert!(got.is_empty(), "{what}: refused yet forwarded: {got:?}"),
                [200] => {
                    assert_eq!(got.len(), 1, "{what}: {}", s.wire.dump());
                    assert_eq!(
                        (
                            got[0].body.as_slice(),
                            got[0].header_all("content-length").len()
                        ),
                        (body.as_bytes(), 0),
                        "{what}: chunked framing wins, Content-Length goes\n{}",
                        s.wire.dump()
                    );
                }
                _ => panic!("{what}: expected 200 or 400 alone, got {ex:?}"),
            }
            // Closed after the answer: `/after` is never read.
            assert_eq!(ex.end, End::Closed, "{what}: {ex:?}");
            assert!(!s.wire.targets().contains(&"/after".to_string()));
        }
    });
}

// ---------------------------------------------------------------------------
// Content-Length values (RFC 9110 §8.6, RFC 9112 §6.3)
// ---------------------------------------------------------------------------

/// Two Content-Length lines: equal ones may count as one (RFC 9110 §8.6),
/// then the body is exactly that long and the next request is intact;
/// different ones are refused 400 with the connection closed.
#[test]
fn duplicate_content_length() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        for (what, lines) in [
            (
                "two equal lines",
                "Content-Length: 5\r\nContent-Length: 5\r\n",
            ),
            ("an equal list", "Content-Length: 5, 5\r\n"),
            ("an equal list without a space", "Content-Length: 5,5\r\n"),
        ] {
            let bytes =
                format!("POST /dup HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\nhello") + &last("/after");
            let before = s.wire.requests().len();
            let ex = exchange(&addr, bytes.as_bytes());
            s.wire.assert_clean(what);
            let got: Vec<(String, Vec<u8>)> = s.wire.requests()[before..]
                .iter()
                .map(|r| (r.target.clone(), r.body.clone()))
                .collect();
            match ex.statuses()[..] {
                [400] => assert!(got.is_empty(), "{what}: {got:?}"),
                [200, 200] => assert_eq!(
                    got,
                    [
                        ("/dup".to_string(), b"hello".to_vec()),
                        ("/after".to_string(), vec![])
                    ],
                    "{what}\n{}",
                    s.wire.dump()
                ),
                _ => panic!("{what}: {ex:?}"),
            }
            assert_eq!(ex.end, End::Closed, "{what}: {ex:?}");
        }
        for (what, lines) in [
            (
                "two different lines",
                "Content-Length: 5\r\nContent-Length: 46\r\n",
            ),
            ("a different list", "Content-Length: 5, 46\r\n"),
        ] {
            let bytes = format!("POST /dup HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\nhello")
                + &smuggled()
                + &last("/after");
            assert_refused_400(&s, what, bytes.as_bytes());
        }
    });
}

/// Content-Length is 1*DIGIT (RFC 9110 §8.6): a sign, hex, a list of
/// different values, a negative or overflowing number, an empty value or
/// inner spaces are refused 400 and the connection closes. Surrounding
/// whitespace is not part of a field value (RFC 9110 §5.5), so `5 ` is 5.
#[test]
fn malformed_content_length_is_refused() {
    run_on_proxy(|path| {
        let s = setup(path);
        for value in [
            "+5",
            "0x5",
            "5,6",
            "-5",
            "5 5",
            "5x",
            "",
            "99999999999999999999999999",
            "٥",
        ] {
            let bytes = format!(
                "POST /cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {value}\r\n\r\nhello"
            ) + &smuggled()
                + &last("/after");
            assert_refused_400(&s, &format!("Content-Length {value:?}"), bytes.as_bytes());
        }
        // OWS around the value (spaces, a tab) is not part of it: the same 5.
        let addr = s.proxy.http_addr();
        for value in ["5 ", " 5", "\t5\t", "  5  "] {
            let what = format!("Content-Length {value:?}");
            let bytes = format!(
                "POST /ows HTTP/1.1\r\nHost: {HOST}\r\nContent-Length:{value}\r\n\r\nhello"
            ) + &last("/after");
            let before = s.wire.requests().len();
            let ex = exchange(&addr, bytes.as_bytes());
            s.wire.assert_clean(&what);
            assert_eq!(ex.statuses(), [200, 200], "{what}: {ex:?}");
            let got: Vec<(String, Vec<u8>)> = s.wire.requests()[before..]
                .iter()
                .map(|r| (r.target.clone(), r.body.clone()))
                .collect();
            assert_eq!(
                got,
                [
                    ("/ows".to_string(), b"hello".to_vec()),
                    ("/after".to_string(), vec![])
                ],
                "{what}"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Transfer-Encoding (RFC 9112 §6.1, §7)
// ---------------------------------------------------------------------------

/// Obfuscated `Transfer-Encoding` lines, each with a `Content-Length` that
/// frames the body differently (TE.CL: by the length the chunk's content is
/// a next request; CL.TE: by the length the request behind is body). Either
/// the line is refused (400, or 501 for a coding other than chunked;
/// closed, nothing forwarded) or it is read as
/// chunked: then the backend gets the chunk's bytes as the body, chunked,
/// without Content-Length, and nothing after it (RFC 9112 §6.1, §6.3).
#[test]
fn obfuscated_transfer_encoding_never_splits_differently() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let lines = [
            "Transfer-Encoding: chunked ",
            "Transfer-Encoding:\tchunked",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding : chunked",
            "Transfer-Encoding\t: chunked",
            " Transfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nTransfer-encoding: x",
            "TRANSFER-ENCODING: CHUNKED",
            "Transfer-Encoding: \x0bchunked",
            "Transfer-Encoding: \"chunked\"",
            "Transfer-Encoding: chunked;q=1",
        ];
        let inner = smuggled();
        for te in lines {
            let te_cl = format!(
                "POST /te HTTP/1.1\r\nHost: {HOST}\r\n{te}\r\nContent-Length: 4\r\n\r\n{}",
                chunked(&inner)
            );
            let tail = "0\r\n\r\n".to_string() + &smuggled();
            let cl_te = format!(
                "POST /te HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n{te}\r\n\r\n{tail}",
                tail.len()
            );
            for (shape, bytes, body) in [("TE.CL", te_cl, inner.as_str()), ("CL.TE", cl_te, "")] {
                let what = format!("{shape} with {te:?}");
                let before = s.wire.requests().len();
                let ex = exchange(&addr, (bytes + &last("/after")).as_bytes());
                s.wire.assert_clean(&what);
                let got = s.wire.requests()[before..].to_vec();
                match ex.statuses()[..] {
                    [400] | [501] => {
                        assert!(got.is_empty(), "{what}: refused yet forwarded {got:?}")
                    }
                    [200] => {
                        assert_eq!(got.len(), 1, "{what}\n{}", s.wire.dump());
                        assert_eq!(
                            (got[0].body.as_slice(), got[0].header_all("content-length")),
                            (body.as_bytes(), vec![]),
                            "{what}\n{}",
                            s.wire.dump()
                        );
                    }
                    _ => panic!("{what}: expected 200 or 400 alone, got {ex:?}"),
                }
                assert_eq!(ex.end, End::Closed, "{what}: {ex:?}");
            }
        }
    });
}

/// A transfer coding switchyard does not implement (anything but
/// `chunked`) is answered 501 (RFC 9112 §6.1) and the connection closed:
/// passed on, the backend would get the coded bytes re-chunked, with the
/// coding's name dropped (Pingora sends `Transfer-Encoding: chunked` only).
#[test]
fn unknown_transfer_codings_are_not_implemented() {
    run_on_proxy(|path| {
        let s = setup(path);
        for te in [
            "gzip, chunked",
            "deflate, chunked",
            "identity, chunked",
            "gzip\r\nTransfer-Encoding: chunked",
        ] {
            let what = format!("Transfer-Encoding {te:?}");
            let bytes = format!(
                "POST /coded HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: {te}\r\n\r\n{}",
                chunked("not really gzip")
            ) + &last("/after");
            let before = s.wire.requests().len();
            let ex = exchange(&s.proxy.http_addr(), bytes.as_bytes());
            assert_eq!(
                (ex.statuses(), &ex.end),
                (vec![501], &End::Closed),
                "{what}: {ex:?}\n{}",
                s.wire.dump()
            );
            assert_eq!(s.wire.requests().len(), before, "{what}\n{}", s.wire.dump());
        }
        s.wire.assert_clean("transfer codings");
    });
}

/// Framing spelled oddly but validly: empty list members and a
/// `Transfer-Encoding` split over lines (RFC 9110 §5.6.1, §5.3), chunk
/// extensions, chunk sizes with leading zeros and trailers that name
/// framing fields (RFC 9112 §7.1.1, §7.1.2), `Content-Length` with leading
/// zeros or repeated many times (RFC 9110 §8.6). Each is read as one body:
/// the backend gets exactly one framing header (a single `chunked`, or the
/// length's plain digits), the body, no trailer, and the request behind it
/// intact. Chunk framing that cannot be read (a size over 64 bits, a
/// quoted CRLF in an extension, a bare CR ending a trailer) and a length
/// over 64 bits are refused 400, closed, nothing forwarded.
#[test]
fn odd_but_valid_framing_reaches_the_backend_as_one_framing() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let te = "Transfer-Encoding: chunked\r\n";
        let many_cl = "Content-Length: 5\r\n".repeat(100);
        let accepted = [
            (
                "an empty Transfer-Encoding line, then chunked",
                "Transfer-Encoding: ,\r\nTransfer-Encoding: chunked\r\n".to_string(),
                chunked("hello"),
            ),
            (
                "an empty member before chunked",
                "Transfer-Encoding: , chunked\r\n".into(),
                chunked("hello"),
            ),
            (
                "an empty value line, then chunked",
                "Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n".into(),
                chunked("hello"),
            ),
            (
                "tabs around an empty member",
                "Transfer-Encoding: \t,\tchunked\r\n".into(),
                chunked("hello"),
            ),
            (
                "a chunk extension",
                te.into(),
                "5;ext=1\r\nhello\r\n0\r\n\r\n".into(),
            ),
            (
                "whitespace before a chunk extension",
                te.into(),
                "5 ;ext\r\nhello\r\n0\r\n\r\n".into(),
            ),
            (
                "chunk sizes with leading zeros",
                te.into(),
                "0005\r\nhello\r\n000\r\n\r\n".into(),
            ),
            (
                "a trailer",
                te.into(),
                "5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n".into(),
            ),
            (
                "framing fields in the trailer",
                te.into(),
                "5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n"
                    .into(),
            ),
            (
                "a length with leading zeros",
                "Content-Length: 005\r\n".into(),
                "hello".into(),
            ),
            (
                "an equal list with tabs",
                "Content-Length: 5\t,\t5\r\n".into(),
                "hello".into(),
            ),
            ("a hundred equal lengths", many_cl, "hello".into()),
        ];
        for (what, head, body) in accepted {
            let bytes =
                format!("POST /odd HTTP/1.1\r\nHost: {HOST}\r\n{head}\r\n{body}") + &last("/after");
            let before = s.wire.requests().len();
            let ex = exchange(&addr, bytes.as_bytes());
            s.wire.assert_clean(what);
            assert_eq!(
                (ex.bodies(), &ex.end),
                (vec!["POST /odd 5", "GET /after 0"], &End::Closed),
                "{what}: {ex:?}"
            );
            let got = &s.wire.requests()[before..];
            // Per request: target, body, Transfer-Encoding, Content-Length
            // and any trailer field that leaked into the head.
            let seen: Vec<String> = got
                .iter()
                .map(|r| {
                    format!(
                        "{} {:?} te={:?} cl={:?} trailer={:?}",
                        r.target,
                        String::from_utf8_lossy(&r.body),
                        r.header_all("transfer-encoding"),
                        r.header_all("content-length"),
                        r.header_all("x-trailer"),
                    )
                })
                .collect();
            let framing = match body.starts_with("hello") {
                true => r#"te=[] cl=["5"]"#,
                false => r#"te=["chunked"] cl=[]"#,
            };
            assert_eq!(
                seen,
                [
                    format!("/odd \"hello\" {framing} trailer=[]"),
                    "/after \"\" te=[] cl=[] trailer=[]".to_string(),
                ],
                "{what}\n{}",
                s.wire.dump()
            );
        }
        for (what, head, body) in [
            (
                "a chunk size over 64 bits",
                te,
                "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "a quoted CRLF in a chunk extension",
                te,
                "5;ext=\"a\r\nb\"\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "a bare CR ending a trailer",
                te,
                "5\r\nhello\r\n0\r\nX-Trailer: 1\r\r\n\r\n",
            ),
            (
                "a length over 64 bits",
                "Content-Length: 18446744073709551616\r\n",
                "hello",
            ),
        ] {
            let bytes = format!("POST /odd HTTP/1.1\r\nHost: {HOST}\r\n{head}\r\n{body}")
                + &smuggled()
                + &last("/after");
            assert_refused_400(&s, what, bytes.as_bytes());
        }
    });
}

/// `Transfer-Encoding` in an HTTP/1.0 request is faulty framing (RFC 9112
/// §6.1): refused 400, closed.
#[test]
fn transfer_encoding_from_an_http10_client_is_refused() {
    run_on_proxy(|path| {
        let s = setup(path);
        let bytes = format!(
            "POST /te10 HTTP/1.0\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            chunked("hello")
        ) + &smuggled();
        assert_refused_400(&s, "HTTP/1.0 with Transfer-Encoding", bytes.as_bytes());
    });
}

// ---------------------------------------------------------------------------
// Field syntax (RFC 9112 §2.2, §5)
// ---------------------------------------------------------------------------

/// Obsolete line folding is refused 400 (RFC 9112 §5.2), also where it
/// would hide a framing header from one reader; so is whitespace between
/// the request line and the first field (RFC 9112 §2.2).
#[test]
fn obs_fold_is_refused() {
    run_on_proxy(|path| {
        let s = setup(path);
        for (what, head) in [
            ("a folded value", "X-Folded: one\r\n two\r\n"),
            ("a folded value with a tab", "X-Folded: one\r\n\ttwo\r\n"),
            (
                "Transfer-Encoding folded in",
                "X-Folded: one\r\n Transfer-Encoding: chunked\r\n",
            ),
            (
                "a folded Transfer-Encoding value",
                "Transfer-Encoding:\r\n chunked\r\n",
            ),
        ] {
            let bytes = format!(
                "POST /fold HTTP/1.1\r\nHost: {HOST}\r\n{head}Content-Length: 5\r\n\r\nhello"
            ) + &smuggled()
                + &last("/after");
            assert_refused_400(&s, what, bytes.as_bytes());
        }
        let bytes =
            format!("GET /ws-first HTTP/1.1\r\n Host: {HOST}\r\nContent-Length: 5\r\n\r\nhello")
                + &last("/after");
        assert_refused_400(&s, "whitespace before the first field", bytes.as_bytes());
    });
}

/// Field names are tokens and lines end in CRLF: a name with a space, a
/// tab or a control byte, an empty name, a line without a colon and a bare
/// CR are refused 400 (RFC 9112 §5, §2.2; RFC 9110 §5.1, §5.5). A bare LF
/// may end a line (RFC 9112 §2.2): then both readers must see the same
/// fields.
#[test]
fn malformed_header_lines_are_refused() {
    run_on_proxy(|path| {
        let s = setup(path);
        for (what, line) in [
            ("a space in a name", "Content Length: 5"),
            ("a tab in a name", "Content-Length\t: 5"),
            ("a space before the colon", "Content-Length : 5"),
            ("an empty name", ": 5"),
            ("no colon", "Content-Length 5"),
            ("a NUL in a name", "Content-Length\0: 5"),
            ("a bare CR inside a value", "X-A: a\rContent-Length: 5"),
            (
                "a bare CR ending a line",
                "X-A: a\rTransfer-Encoding: chunked",
            ),
            ("a NUL in a value", "X-A: a\0b"),
        ] {
            let bytes = format!(
                "POST /names HTTP/1.1\r\nHost: {HOST}\r\n{line}\r\nContent-Length: 0\r\n\r\nhello"
            ) + &smuggled()
                + &last("/after");
            assert_refused_400(&s, what, bytes.as_bytes());
        }
        // Bare LF line ends, alone or mixed with CRLF, in the header and in
        // chunked framing: refused, or read as the same lines and the same
        // body by switchyard and the backend.
        let addr = s.proxy.http_addr();
        let te = "Transfer-Encoding: chunked";
        for (what, bytes) in [
            (
                "bare LF",
                format!("POST /lf HTTP/1.1\nHost: {HOST}\nX-One: 1\nContent-Length: 5\n\nhello"),
            ),
            (
                "CRLF lines, LF end",
                format!(
                    "POST /lf HTTP/1.1\r\nHost: {HOST}\r\nX-One: 1\r\nContent-Length: 5\r\n\nhello"
                ),
            ),
            (
                "LF lines, CRLF end",
                format!("POST /lf HTTP/1.1\nHost: {HOST}\nX-One: 1\nContent-Length: 5\n\r\nhello"),
            ),
            (
                "bare LF, chunked",
                format!(
                    "POST /lf HTTP/1.1\nHost: {HOST}\nX-One: 1\n{te}\n\n5\r\nhello\r\n0\r\n\r\n"
                ),
            ),
            (
                "bare LF in chunked framing",
                format!(
                    "POST /lf HTTP/1.1\r\nHost: {HOST}\r\nX-One: 1\r\n{te}\r\n\r\n5\nhello\n0\n\n"
                ),
            ),
        ] {
            let before = s.wire.requests().len();
            let ex = exchange(&addr, (bytes + &last("/after")).as_bytes());
            s.wire.assert_clean(what);
            let got = s.wire.requests()[before..].to_vec();
            match ex.statuses()[..] {
                [400] => assert!(got.is_empty(), "{what}: {got:?}"),
                [200, 200] => {
                    let seen: Vec<(&str, &[u8], Vec<&str>)> = got
                        .iter()
                        .map(|r| (r.target.as_str(), r.body.as_slice(), r.header_all("x-one")))
                        .collect();
                    assert_eq!(
                        seen,
                        [
                            ("/lf", &b"hello"[..], vec!["1"]),
                            ("/after", &b""[..], vec![])
                        ],
                        "{what}\n{}",
                        s.wire.dump()
                    );
                }
                _ => panic!("{what}: {ex:?}"),
            }
            assert_eq!(ex.end, End::Closed, "{what}: {ex:?}");
        }
    });
}

// ---------------------------------------------------------------------------
// Hop-by-hop fields (RFC 9110 §7.6.1)
// ---------------------------------------------------------------------------

/// A client's hop-by-hop fields stay behind, and `Connection` cannot take
/// away the fields switchyard sets for the backend, nor a framing header
/// (a request whose `Content-Length` or `Transfer-Encoding` is named in
/// `Connection` still reaches the backend with its body framed as
/// switchyard read it, or is refused).
#[test]
fn hop_by_hop_request_fields_stay_behind() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let hop = "Connection: close, X-Custom\r\nX-Custom: 1\r\nKeep-Alive: timeout=5\r\n\
                   Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\
                   HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nUpgrade: foo\r\nX-Kept: yes\r\n";
        let ex = exchange(&addr, get("/hop", hop).as_bytes());
        assert_eq!(ex.statuses(), [200], "{ex:?}");
        let r = s.wire.requests().pop().expect("the backend got /hop");
        for name in [
            "x-custom",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "http2-settings",
            "upgrade",
        ] {
            assert!(r.header_all(name).is_empty(), "{name} passed on: {r:?}");
        }
        assert_eq!(r.header_all("x-kept"), ["yes"], "{r:?}");

        for nominated in [
            "X-Forwarded-For",
            "X-Real-IP",
            "X-Request-Id",
            "Host",
            "x-forwarded-for",
        ] {
            let before = s.wire.requests().len();
            let extra = format!("Connection: close, {nominated}\r\n");
            let ex = exchange(&addr, get("/named", &extra).as_bytes());
            let got = s.wire.requests()[before..].to_vec();
            match ex.statuses()[..] {
                [400] => assert!(got.is_empty(), "{nominated}: {got:?}"),
                [200] => {
                    let r = &got[0];
                    assert_eq!(
                        r.header_all("x-forwarded-for"),
                        ["127.0.0.1"],
                        "{nominated}: {r:?}"
                    );
                    assert_eq!(
                        r.header_all("x-real-ip"),
                        ["127.0.0.1"],
                        "{nominated}: {r:?}"
                    );
                    assert_eq!(r.header_all("host"), [HOST], "{nominated}: {r:?}");
                    assert_eq!(r.header_all("x-request-id").len(), 1, "{nominated}: {r:?}");
                }
                _ => panic!("{nominated}: {ex:?}"),
            }
        }

        for (what, bytes) in [
            (
                "Connection: Content-Length",
                format!(
                    "POST /named-body HTTP/1.1\r\nHost: {HOST}\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
                ),
            ),
            (
                "Connection: Transfer-Encoding",
                format!(
                    "POST /named-body HTTP/1.1\r\nHost: {HOST}\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                    chunked("hello")
                ),
            ),
        ] {
            let before = s.wire.requests().len();
            let ex = exchange(&addr, (bytes + &last("/after")).as_bytes());
            s.wire.assert_clean(what);
            let got: Vec<(String, Vec<u8>)> = s.wire.requests()[before..]
                .iter()
                .map(|r| (r.target.clone(), r.body.clone()))
                .collect();
            match ex.statuses()[..] {
                [400] => assert!(got.is_empty(), "{what}: {got:?}"),
                [200, 200] => assert_eq!(
                    got,
                    [
                        ("/named-body".to_string(), b"hello".to_vec()),
                        ("/after".to_string(), vec![])
                    ],
                    "{what}\n{}",
                    s.wire.dump()
                ),
                _ => panic!("{what}: {ex:?}"),
            }
        }
        s.wire.assert_clean("hop-by-hop");
    });
}

/// A backend answer's hop-by-hop fields stay behind too (RFC 9110 §7.6.1),
/// except that a framing header named in its `Connection` still frames it:
/// the response behind it is intact.
#[test]
fn hop_by_hop_response_fields_stay_behind() {
    run_on_proxy(|path| {
        let s = setup(path);
        let ex = exchange(
            &s.proxy.http_addr(),
            (get("/hop-resp", "") + &get("/hop-resp-cl", "") + &last("/after")).as_bytes(),
        );
        assert_eq!(ex.bodies(), ["hop", "hop", "GET /after 0"], "{ex:?}");
        let r = &ex.replies[0];
        for name in [
            "x-backend-conn",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ] {
            assert!(r.header_all(name).is_empty(), "{name} passed on: {r:?}");
        }
        assert_eq!(r.header_all("x-kept"), ["yes"], "{r:?}");
        s.wire.assert_clean("hop-by-hop answers");
    });
}

// ---------------------------------------------------------------------------
// Upgrades (RFC 9110 §7.8)
// ---------------------------------------------------------------------------

/// An upgrade the backend does not accept (200 or 426, not 101) opens no
/// tunnel (a proxy that trusts the request's `Upgrade` instead of the 101
/// is the classic WebSocket smuggling):
/// bytes the client sends after it, in the same write or after the answer,
/// are read as requests by switchyard (they carry its headers) or dropped
/// with the connection, never passed on raw.
#[test]
fn an_upgrade_not_answered_101_opens_no_tunnel() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        for (what, target, extra, status) in [
            ("a WebSocket upgrade", "/ws/chat", ws, 200),
            (
                "another protocol",
                "/ws/other",
                "Connection: Upgrade\r\nUpgrade: foo/2\r\n",
                200,
            ),
            (
                "a WebSocket upgrade answered 426",
                "/ws/refuse-426",
                ws,
                426,
            ),
        ] {
            // Raw bytes right behind the upgrade request.
            let bytes = get(target, extra) + "RAW BYTES\r\n\r\n" + &last("/after");
            let ex = exchange(&addr, bytes.as_bytes());
            assert_eq!(ex.statuses().first(), Some(&status), "{what}: {ex:?}");
            assert!(
                !s.wire.received_bytes(b"RAW BYTES"),
                "{what}\n{}",
                s.wire.dump()
            );
            s.wire.assert_clean(what);

            // A request sent after the answer came back.
            let mut c = RawConn::connect(&addr);
            c.send(get(target, extra).as_bytes()).unwrap();
            let r = c.read_response(DEADLINE).unwrap();
            assert_eq!(r.status, status, "{what}: {r:?}");
            let _ = c.send(last("/after-200").as_bytes());
            let ex = read_until_close(&mut c, what);
            s.wire.assert_clean(what);
            assert!(
                ex.replies.is_empty() || ex.bodies() == ["GET /after-200 0"],
                "{what}: {ex:?}"
            );
        }
    });
}

/// An h2c upgrade (RFC 7540 §3.2) is not passed on: an h2c-capable backend
/// would answer 101 and the client could then send HTTP/2 requests that
/// switchyard never routes, limits or logs ("h2c smuggling"). The backend
/// sees no `Upgrade: h2c`, the client gets no 101, and the HTTP/2 preface
/// that follows never reaches the backend.
#[test]
fn h2c_upgrade_is_not_passed_on() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for (what, target, extra) in [
            (
                "h2c",
                "/h2c",
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            ),
            (
                "h2c on a WebSocket route",
                "/ws/h2c",
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            ),
            ("h2c without Connection", "/h2c-bare", "Upgrade: h2c\r\n"),
        ] {
            let mut c = RawConn::connect(&addr);
            c.send(get(target, extra).as_bytes()).unwrap();
            let first = c.read_response(DEADLINE);
            assert!(
                first.as_ref().map_or(true, |r| r.status != 101),
                "{what}: the client got {first:?}\n{}",
                s.wire.dump()
            );
            // Not a request switchyard serves: refused and closed. Through a
            // tunnel it would reach the backend and the connection stay open.
            let _ = c.send(preface.as_bytes());
            let closed = c.wait_closed(DEADLINE);
            assert!(
                closed.is_some(),
                "{what}: still open after the HTTP/2 preface\n{}",
                s.wire.dump()
            );
            let upgrades: Vec<WireRequest> = s
                .wire
                .requests()
                .into_iter()
                .filter(|r| !r.header_all("upgrade").is_empty())
                .collect();
            assert!(upgrades.is_empty(), "{what}: {upgrades:?}");
            assert!(
                !s.wire.received_bytes(b"PRI * HTTP/2.0"),
                "{what}\n{}",
                s.wire.dump()
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Bodies the proxy does not read (RFC 9112 §9.3, RFC 9110 §10.1.1)
// ---------------------------------------------------------------------------

/// A request the proxy answers itself before reading its body (no route,
/// a denied route, a body over `max_body`): the body, which holds what
/// looks like a request, is never read as a next request. It is drained
/// (then the request behind it is answered, by the backend) or the
/// connection closes after the refusal.
#[test]
fn an_unread_body_is_never_read_as_a_request() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let inner = smuggled();
        let sized = |target: &str, host: &str| {
            format!(
                "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{inner}",
                inner.len()
            )
        };
        let chunk = |target: &str, host: &str| {
            format!(
                "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                chunked(&inner)
            )
        };
        let cases = [
            ("no route", sized("/x", "nowhere.test"), 404),
            ("no route, chunked", chunk("/x", "nowhere.test"), 404),
            ("a denied route", sized("/denied", HOST), 404),
            ("a denied route, chunked", chunk("/denied", HOST), 404),
            ("over max_body", sized("/small", HOST), 413),
            ("over max_body, chunked", chunk("/small", HOST), 413),
            (
                "a Content-Length over any limit",
                format!(
                    "POST /small HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 18446744073709551615\r\n\r\n{inner}"
                ),
                413,
            ),
        ];
        for (what, bytes, status) in cases {
            let before = s.wire.requests().len();
            let ex = exchange(&addr, (bytes + &last("/after")).as_bytes());
            s.wire.assert_clean(what);
            let got = s.wire.targets()[before..].to_vec();
            assert_eq!(ex.end, End::Closed, "{what}: {ex:?}");
            match ex.statuses()[..] {
                // Closed after the refusal.
                [code] if code == status => assert!(got.is_empty(), "{what}: {got:?}"),
                // Drained: the next request is the one behind the body.
                [code, 200] if code == status => {
                    assert_eq!(got, ["/after"], "{what}");
                    assert_eq!(ex.bodies()[1], "GET /after 0", "{what}: {ex:?}");
                }
                _ => panic!("{what}: expected {status}, then /after or close; got {ex:?}"),
            }
        }

        // `Expect: 100-continue` refused before the body (RFC 9110
        // §10.1.1): the client may send the body anyway after the answer.
        for (what, target, host, status) in [
            ("no route, expecting 100", "/x", "nowhere.test", 404),
            ("over max_body, expecting 100", "/small", HOST, 413),
        ] {
            let before = s.wire.requests().len();
            let mut c = RawConn::connect(&addr);
            c.send(
                format!(
                    "POST {target} HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                    inner.len()
                )
                .as_bytes(),
            )
            .unwrap();
            let r = c.read_response(DEADLINE).unwrap();
            assert_eq!(r.status, status, "{what}: {r:?}");
            let _ = c.send((inner.clone() + &last("/after")).as_bytes());
            let ex = read_until_close(&mut c, what);
            s.wire.assert_clean(what);
            let got = s.wire.targets()[before..].to_vec();
            assert!(
                (ex.replies.is_empty() && got.is_empty())
                    || (ex.bodies() == ["GET /after 0"] && got == ["/after"]),
                "{what}: {ex:?}, backend got {got:?}"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// HTTP/2 clients (RFC 9113 §8.1.1)
// ---------------------------------------------------------------------------

/// An HTTP/2 request's `content-length` that its DATA frames do not match
/// is malformed (RFC 9113 §8.1.1): more data than announced, or less before
/// END_STREAM. Whatever part was already passed on, the backend connection
/// it went on is never used for another request (which the backend would
/// read as the rest of that body); the requests after it, on the same h2
/// connection and a new one, reach the backend intact. A body without
/// `content-length`, holding what looks like a request, reaches the backend
/// chunked, as a body.
#[test]
fn http2_content_length_that_disagrees_with_data_never_desyncs_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (site, cert) = common::tls::self_signed_site(dir.path(), HOST);
    let config = common::tls::trusting(cert, &[b"h2"]);

    let wire = Wire::start();
    let green = Upstream::start("green");
    let host = toml_str(HOST);
    let proxy = ProxyBuilder::new(format!(
        "[services.api]\nblue = [{}]\ngreen = [{}]\nactive = \"blue\"\n\n\
         [[routes]]\nhost = {host}\npath = \"/\"\nservice = \"api\"\n",
        toml_str(&wire.addr),
        toml_str(&green.addr())
    ))
    .https(&format!("[tls]\ndefault_certificate = \"site\"\n\n{site}"))
    .start();
    let addr = proxy.https_addr();
    let inner = smuggled();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // (status, or the stream's error) of one request with `body` as DATA.
    let send = |h2: &mut h2::client::SendRequest<Bytes>,
                target: &str,
                length: Option<usize>,
                body: &str| {
        let mut req = http::Request::post(format!("https://{HOST}{target}"));
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let h2 = h2.clone();
        let body = Bytes::from(body.to_string());
        rt.block_on(async move {
            let mut h2 = h2.ready().await.map_err(|e| e.to_string())?;
            let (resp, mut stream) = h2
                .send_request(req.body(()).unwrap(), body.is_empty())
                .map_err(|e| e.to_string())?;
            if !body.is_empty() {
                let _ = stream.send_data(body, true);
            }
            match tokio::time::timeout(DEADLINE, resp).await {
                Err(_) => panic!("no h2 answer to {target} in {DEADLINE:?}"),
                Ok(Ok(r)) => {
                    let status = r.status().as_u16();
                    let mut body = r.into_body();
                    let mut text = Vec::new();
                    while let Some(Ok(d)) = tokio::time::timeout(DEADLINE, body.data())
                        .await
                        .expect("h2 body in time")
                    {
                        let _ = body.flow_control().release_capacity(d.len());
                        text.extend_from_slice(&d);
                    }
                    Ok((status, String::from_utf8_lossy(&text).into_owned()))
                }
                Ok(Err(e)) => Err(e.to_string()),
            }
        })
    };
    let connect = || rt.block_on(common::tls::h2_handshake(&addr, HOST, config.clone()));

    let mut h2 = connect();
    let n = inner.len();
    let short = send(&mut h2, "/short", Some(n + 10), &inner);
    let long = send(&mut h2, "/long", Some(5), &inner);
    let after = send(&mut h2, "/after-same", None, "");
    let fresh = send(&mut connect(), "/after-new", None, "");
    let no_length = send(&mut connect(), "/unsized", None, &inner);
    wire.assert_clean("h2 content-length");
    let answers = format!("short {short:?}, long {long:?}, after {after:?}, new {fresh:?}");
    assert!(
        short.as_ref().map_or(true, |(s, _)| *s >= 400)
            && long.as_ref().map_or(true, |(s, _)| *s >= 400),
        "a malformed h2 body was answered as a success: {answers}\n{}",
        wire.dump()
    );
    assert_eq!(after, Ok((200, "POST /after-same 0".into())), "{answers}");
    assert_eq!(fresh, Ok((200, "POST /after-new 0".into())), "{answers}");
    assert_eq!(
        no_length,
        Ok((200, format!("POST /unsized {n}"))),
        "{answers}"
    );
    let got: Vec<(String, Vec<u8>)> = wire
        .requests()
        .into_iter()
        .filter(|r| !r.target.starts_with("/short") && !r.target.starts_with("/long"))
        .map(|r| (r.target, r.body))
        .collect();
    assert_eq!(
        got,
        [
            ("/after-same".to_string(), vec![]),
            ("/after-new".to_string(), vec![]),
            ("/unsized".to_string(), inner.as_bytes().to_vec()),
        ],
        "{answers}\n{}",
        wire.dump()
    );
}

// ---------------------------------------------------------------------------
// HTTP/1.0 clients (RFC 9112 §9.3, §6.1; RFC 9110 §15.2)
// ---------------------------------------------------------------------------

/// HTTP/1.0: the connection is kept only when asked (`Connection:
/// keep-alive`); without it the request behind is never read. A body is
/// framed by its Content-Length, exactly.
#[test]
fn http10_keep_alive_only_when_asked_and_bodies_by_length() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        let v10 = |target: &str, extra: &str| {
            format!("GET {target} HTTP/1.0\r\nHost: {HOST}\r\n{extra}\r\n")
        };

        let ex = exchange(&addr, (v10("/ten-1", "") + &v10("/ten-2", "")).as_bytes());
        assert_eq!(ex.statuses(), [200], "no keep-alive asked: {ex:?}");
        assert_eq!(ex.end, End::Closed);

        let ex = exchange(
            &addr,
            (v10("/ten-3", "Connection: keep-alive\r\n") + &v10("/ten-4", "")).as_bytes(),
        );
        assert_eq!(ex.statuses(), [200, 200], "keep-alive asked: {ex:?}");
        assert_eq!(
            ex.replies[0]
                .header("connection")
                .map(str::to_ascii_lowercase),
            Some("keep-alive".to_string()),
            "{ex:?}"
        );

        let inner = smuggled();
        let post = format!(
            "POST /ten-body HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ) + &v10("/ten-5", "");
        let ex = exchange(&addr, post.as_bytes());
        assert_eq!(ex.statuses(), [200, 200], "{ex:?}");
        s.wire.assert_clean("HTTP/1.0");
        let got: Vec<(String, Vec<u8>)> = s
            .wire
            .requests()
            .into_iter()
            .map(|r| (r.target, r.body))
            .collect();
        let want: Vec<(String, Vec<u8>)> = [
            ("/ten-1", ""),
            ("/ten-3", ""),
            ("/ten-4", ""),
            ("/ten-body", inner.as_str()),
            ("/ten-5", ""),
        ]
        .iter()
        .map(|(t, b)| (t.to_string(), b.as_bytes().to_vec()))
        .collect();
        assert_eq!(got, want, "{}", s.wire.dump());
    });
}

// ---------------------------------------------------------------------------
// Responses: HEAD, 1xx, truncated bodies (RFC 9112 §6.3, RFC 9110 §15.2)
// ---------------------------------------------------------------------------

/// Responses without a body whatever their header says (RFC 9112 §6.3): to
/// HEAD (with `Content-Length` or `Transfer-Encoding: chunked`), 204, and
/// 304 with a `Content-Length`. The response pipelined behind each starts
/// right after its head.
#[test]
fn bodiless_responses_keep_the_next_one_intact() {
    run_on_proxy(|path| {
        let s = setup(path);
        let head = |target: &str| format!("HEAD {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        for (what, first, status) in [
            ("HEAD, Content-Length", head("/head"), 200),
            ("HEAD, chunked", head("/head-chunked"), 200),
            ("204", get("/no-content", ""), 204),
            ("304 with Content-Length", get("/not-modified", ""), 304),
        ] {
            let mut c = RawConn::connect(&s.proxy.http_addr());
            c.send((first + &get("/after-head", "") + &last("/last")).as_bytes())
                .unwrap();
            let r = c.read_head(DEADLINE).unwrap();
            assert_eq!(r.status, status, "{what}: {r:?}");
            // No body read: the next bytes are the next response.
            let next = c.read_response(DEADLINE).unwrap();
            assert_eq!(
                (next.status, next.body.as_str()),
                (200, "GET /after-head 0"),
                "{what}: {next:?}"
            );
            let ex = read_until_close(&mut c, what);
            assert_eq!(ex.bodies(), ["GET /last 0"], "{what}: {ex:?}");
            assert_eq!(ex.end, End::Closed, "{what}");
        }
        s.wire.assert_clean("bodiless responses");
    });
}

/// A backend answer with ambiguous framing reaches the client with one
/// framing or not at all: with both `Content-Length` and chunked, chunked
/// wins (RFC 9112 §6.3); differing lengths are the backend's failure (502,
/// or a cut connection). Never both headers, never the wrong length.
#[test]
fn ambiguous_backend_framing_reaches_the_client_unambiguous() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();

        let ex = exchange(&addr, (get("/resp-cl-te", "") + &last("/after")).as_bytes());
        match ex.replies.first() {
            Some(r) if r.status == 200 => {
                assert_eq!(r.body, "hello", "{ex:?}");
                let framings =
                    r.header_all("content-length").len() + r.header_all("transfer-encoding").len();
                assert_eq!(framings, 1, "CL and TE: {r:?}");
            }
            Some(r) => assert_eq!(r.status, 502, "CL and TE: {ex:?}"),
            None => assert!(matches!(ex.end, End::Cut(_)), "CL and TE: {ex:?}"),
        }

        let ex = exchange(
            &addr,
            (get("/resp-dup-cl", "") + &last("/after")).as_bytes(),
        );
        for r in &ex.replies {
            let lengths = r.header_all("content-length");
            assert!(lengths.len() <= 1, "two lengths: {ex:?}");
            assert!(
                r.status == 502 || lengths.is_empty() || lengths == [r.body.len().to_string()],
                "differing lengths: {ex:?}"
            );
        }
        s.wire.assert_clean("backend framing");
    });
}

/// The backend's 103 and unasked-for 100 before the final answer: an
/// HTTP/1.1 client gets the final answer intact and the connection goes on;
/// an HTTP/1.0 client gets no 1xx at all (RFC 9110 §15.2).
#[test]
fn interim_responses_keep_the_exchange_framed() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        for (target, body) in [
            ("/early-hints", "after hints"),
            ("/interim-100", "after 100"),
        ] {
            let mut c = RawConn::connect(&addr);
            c.send((get(target, "") + &last("/after")).as_bytes())
                .unwrap();
            let mut first = c.read_response(DEADLINE).unwrap();
            if first.status == 103 {
                first = c.read_response(DEADLINE).unwrap();
            }
            assert_eq!((first.status, first.body.as_str()), (200, body), "{target}");
            let ex = read_until_close(&mut c, target);
            assert_eq!(ex.bodies(), ["GET /after 0"], "{target}: {ex:?}");

            // HTTP/1.0: the raw bytes hold one status line, the final one.
            let mut c = RawConn::connect(&addr);
            c.send(format!("GET {target} HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes())
                .unwrap();
            let raw = c.wait_closed(DEADLINE).expect("HTTP/1.0 exchange ends");
            let text = String::from_utf8_lossy(&raw);
            assert!(
                text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
                "{target} to HTTP/1.0: {text:?}"
            );
            assert_eq!(text.matches("HTTP/1.").count(), 1, "{target}: {text:?}");
            assert!(text.ends_with(body), "{target}: {text:?}");
        }
        s.wire.assert_clean("1xx");
    });
}

/// A backend that closes before its body is complete (short of its
/// Content-Length, mid-chunk, or without the last chunk): the client sees
/// an incomplete response, never one that looks complete, and the
/// connection is not used again.
#[test]
fn a_truncated_upstream_body_never_looks_complete() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();
        for target in ["/trunc-length", "/trunc-chunk", "/trunc-last-chunk"] {
            let mut c = RawConn::connect(&addr);
            c.send((get(target, "") + &get("/after", "")).as_bytes())
                .unwrap();
            let head = c.read_head(DEADLINE);
            let mut body = Vec::new();
            // Some(true): the body ended as framed; Some(false): cut.
            let complete = match &head {
                Err(_) => None,
                Ok(_) => loop {
                    match c.read_body_part(Instant::now() + DEADLINE) {
                        Ok(BodyPart::Data(d)) => body.extend_from_slice(&d),
                        Ok(BodyPart::End) => break Some(true),
                        Ok(BodyPart::Eof) => break Some(false),
                        Err(e) => panic!("{target}: body neither ended nor cut: {e}"),
                    }
                },
            };
            match (&head, complete) {
                // No answer at all, or an answer cut short: the client knows.
                (Err(_), _) | (Ok(_), Some(false)) => {}
                // The proxy's own error answer, before any backend byte.
                (Ok(r), Some(true)) if r.status == 502 => {}
                (Ok(r), _) => panic!(
                    "{target}: a complete-looking response {r:?}, body {:?}",
                    String::from_utf8_lossy(&body)
                ),
            }
            // Nothing more on this connection: `/after` is never answered.
            let rest = c.wait_closed(DEADLINE);
            assert_eq!(
                rest.as_deref(),
                Some(&b""[..]),
                "{target}: after the cut: {:?}",
                rest.as_ref()
                    .map(|r| String::from_utf8_lossy(r).into_owned())
            );
        }
        s.wire.assert_clean("truncated");
    });
}

/// What a backend sent before it failed mid-body still reaches the client,
/// then the cut: the head and the bytes that came. A response small enough
/// to sit in the proxy's write buffer must not vanish with the connection,
/// which would leave the client no status at all (an empty reply, which
/// some clients answer by sending the request again).
#[test]
fn a_truncated_upstream_body_still_delivers_what_came() {
    run_on_proxy(|path| {
        let s = setup(path);
        let mut c = RawConn::connect(&s.proxy.http_addr());
        // The backend stalls after a part of its body; the proxy gives up
        // on it at the route's `read_timeout`, long after the part came.
        c.send(get("/stall/length", "").as_bytes()).unwrap();
        let raw = c.wait_closed(DEADLINE).expect("the cut connection closes");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nonly-part"),
            "what reached the client: {text:?}"
        );
        s.wire.assert_clean("truncated, delivered");
    });
}

// ---------------------------------------------------------------------------
// Pipelining (RFC 9112 §9.3.2)
// ---------------------------------------------------------------------------

/// Pipelined requests are answered in order: three GETs in one write, a
/// GET behind a POST with a body (Content-Length and chunked), a GET behind
/// a request the proxy refused itself; and a request behind one refused for
/// its framing is never read.
#[test]
fn pipelined_requests_are_answered_in_order() {
    run_on_proxy(|path| {
        let s = setup(path);
        let addr = s.proxy.http_addr();

        let ex = exchange(
            &addr,
            (get("/p1", "") + &get("/p2", "") + &last("/p3")).as_bytes(),
        );
        assert_eq!(
            ex.bodies(),
            ["GET /p1 0", "GET /p2 0", "GET /p3 0"],
            "three GETs: {ex:?}"
        );
        assert_eq!(ex.end, End::Closed);

        let inner = smuggled();
        let post = format!(
            "POST /p4 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let posted = format!(
            "POST /p5 HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            chunked(&inner)
        );
        let ex = exchange(
            &addr,
            (post + &get("/p6", "") + &posted + &last("/p7")).as_bytes(),
        );
        let n = inner.len();
        assert_eq!(
            ex.bodies(),
            [
                format!("POST /p4 {n}"),
                "GET /p6 0".into(),
                format!("POST /p5 {n}"),
                "GET /p7 0".into()
            ],
            "behind bodies: {ex:?}"
        );

        // Methods that seldom carry a body still may (RFC 9110 §9.3): the
        // body is framed by its header, whatever the method.
        let get_body = format!(
            "GET /p12 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let delete_body = format!(
            "DELETE /p13 HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            chunked(&inner)
        );
        let ex = exchange(&addr, (get_body + &delete_body + &last("/p14")).as_bytes());
        assert_eq!(
            ex.bodies(),
            [
                format!("GET /p12 {n}"),
                format!("DELETE /p13 {n}"),
                "GET /p14 0".into()
            ],
            "bodies on GET and DELETE: {ex:?}"
        );

        let ex = exchange(
            &addr,
            (get("/denied", "") + &get("/p8", "") + &last("/p9")).as_bytes(),
        );
        assert_eq!(ex.statuses(), [404, 200, 200], "behind a refusal: {ex:?}");
        assert_eq!(ex.bodies()[1..], ["GET /p8 0", "GET /p9 0"], "{ex:?}");

        let bad = format!("GET /p10 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1, 2\r\n\r\n");
        let ex = exchange(&addr, (bad + &last("/p11")).as_bytes());
        assert_eq!(ex.statuses(), [400], "behind bad framing: {ex:?}");

        s.wire.assert_clean("pipelined");
        let targets = s.wire.targets();
        let want = [
            "/p1", "/p2", "/p3", "/p4", "/p6", "/p5", "/p7", "/p12", "/p13", "/p14", "/p8", "/p9",
        ];
        assert_eq!(targets, want, "the backend's order");
        let bodies: Vec<Vec<u8>> = s.wire.requests()[3..10]
            .iter()
            .map(|r| r.body.clone())
            .collect();
        let i = inner.as_bytes();
        assert_eq!(bodies, [i, b"", i, b"", i, i, b""], "{}", s.wire.dump());
    });
}
