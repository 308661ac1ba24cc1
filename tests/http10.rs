//! HTTP/1.0 clients: plain bodies (never chunked framing), keep-alive only
//! when asked and the length is known, no 1xx interim responses, `Upgrade`
//! ignored, and well-formed answers from the proxy itself
//! (RFC 9112 §6.1, §6.3, §9.3; RFC 9110 §7.8, §15.2). Also, for every
//! client, a backend answer's hop-by-hop headers stay behind (RFC 9110
//! §7.6.1), with a scripted backend that sends them.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// A backend that answers each request with canned bytes picked by path,
/// then closes: for framings and interim responses a hyper server will not
/// produce on demand.
struct Scripted {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The canned answer for a request path.
fn script(path: &str) -> &'static [u8] {
    match path {
        // The issue's backend: a chunked "hello world".
        "/chunked" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nB\r\nhello world\r\n0\r\n\r\n",
        "/length" => b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
        // An HTTP/1.0-style answer: no length, ends with the connection.
        "/unframed" => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world",
        "/early-hints" => b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhints",
        "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\ncontinue",
        "/gzip-te" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        // Hop-by-hop headers about the backend's own connection.
        "/hop" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close, X-Backend-Conn\r\nX-Backend-Conn: secret-ish\r\nKeep-Alive: timeout=5\r\nProxy-Connection: close\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\nhop",
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    }
}

impl Scripted {
    fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || answer(conn));
            }
        });
        Scripted {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn answer(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("");
    let _ = conn.write_all(script(path));
    let _ = conn.flush();
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What came back on a connection until the server closed it.
struct Raw {
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` and reads until the server closes; fails if it does not
/// close within 5 s (an HTTP/1.0 exchange without keep-alive must end).
fn exchange_until_close(addr: &str, request: &[u8]) -> Raw {
    let mut c = RawConn::connect(addr);
    c.send(request).unwrap();
    let bytes = c.wait_closed(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "connection still open after {:?}",
            String::from_utf8_lossy(request)
        )
    });
    split_response(&bytes)
}

fn split_response(bytes: &[u8]) -> Raw {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
    Raw {
        head: String::from_utf8_lossy(&bytes[..end]).into_owned(),
        body: bytes[end + 4..].to_vec(),
    }
}

/// Service `api` on the scripted backend (blue) for every host and path.
fn scripted_proxy(backend: &Scripted, green: &Upstream) -> Proxy {
    let cfg = format!(
        "[services.api]\nblue = [{}]\ngreen = [{}]\n\n{}",
        toml_str(&backend.addr),
        toml_str(&green.addr()),
        route(None, "/", "api")
    );
    ProxyBuilder::new(cfg).start()
}

#[test]
fn chunked_backend_answer_reaches_an_http10_client_as_a_plain_body() {
    let backend = Scripted::start();
    let green = Upstream::start("green");
    let proxy = scripted_proxy(&backend, &green);
    let addr = proxy.http_addr();

    // The issue's input.
    let r = exchange_until_close(&addr, b"GET /chunked HTTP/1.0\r\n\r\n");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    assert_eq!(r.body, b"hello world", "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);

    // Asking for keep-alive changes nothing when the length is unknown: the
    // close is what ends the body, and the response says so.
    let r = exchange_until_close(
        &addr,
        b"GET /chunked HTTP/1.0\r\nHost: a.example\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);

    // A backend answer without any framing, which Pingora itself would chunk.
    let r = exchange_until_close(&addr, b"GET /unframed HTTP/1.0\r\n\r\n");
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);

    // A Content-Length from the backend is kept.
    let r = exchange_until_close(&addr, b"GET /length HTTP/1.0\r\n\r\n");
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(r.header("content-length"), Some("11"), "{}", r.head);

    // A HEAD answer has no body to delimit: asked-for keep-alive stays.
    let mut c = RawConn::connect(&addr);
    c.send(b"HEAD /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let r = c.read_head(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
    assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
    c.send(b"GET /length HTTP/1.0\r\n\r\n").unwrap();
    let rest = c.wait_closed(Duration::from_secs(5)).expect("closed");
    let r = split_response(&rest);
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"hello world"[..]));

    // A transfer coding other than chunked cannot be undone for 1.0: 502.
    let r = exchange_until_close(&addr, b"GET /gzip-te HTTP/1.0\r\n\r\n");
    assert_eq!(r.status(), 502, "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);

    // HTTP/1.1 clients still get chunked framing.
    let r = exchange_until_close(
        &addr,
        b"GET /chunked HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("hello world\r\n") && body.ends_with("\r\n0\r\n\r\n"),
        "{body:?}"
    );
}

#[test]
fn http10_keep_alive_only_when_asked_and_the_length_is_known() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let addr = proxy.http_addr();

    // Not asked: answered and closed.
    let r = exchange_until_close(&addr, b"GET /ka-0 HTTP/1.0\r\n\r\n");
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"blue"[..]));
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);

    // Asked, and the backend's answer has a length: kept alive.
    let mut c = RawConn::connect(&addr);
    for i in 1..=2 {
        c.send(format!("GET /ka-{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .unwrap();
        let r = c.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
        assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
        assert_eq!(r.header("content-length"), Some("4"), "{r:?}");
    }
    // The last one without it ends the connection.
    c.send(b"GET /ka-3 HTTP/1.0\r\n\r\n").unwrap();
    let rest = c.wait_closed(Duration::from_secs(5)).expect("closed");
    let r = split_response(&rest);
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"blue"[..]));
    assert_eq!(blue.received("/ka-"), 4);
}

#[test]
fn http10_clients_get_no_interim_responses() {
    let backend = Scripted::start();
    let green = Upstream::start("green");
    let proxy = scripted_proxy(&backend, &green);
    let addr = proxy.http_addr();

    for (path, body) in [("/early-hints", "hints"), ("/continue", "continue")] {
        let r = exchange_until_close(&addr, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
        assert!(
            r.head.starts_with("HTTP/1.1 200"),
            "{path}: interim answer reached the 1.0 client: {}",
            r.head
        );
        assert_eq!(r.body, body.as_bytes(), "{path}");
    }
    // An HTTP/1.1 client does get the 103.
    let r = exchange_until_close(
        &addr,
        b"GET /early-hints HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    );
    assert!(r.head.starts_with("HTTP/1.1 103"), "{}", r.head);

    // `Expect: 100-continue` from a 1.0 client is ignored (RFC 9110
    // §10.1.1): no 100 for it, and the backend never sees the expectation.
    let blue = Upstream::start("blue");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let r = exchange_until_close(
        &proxy.http_addr(),
        b"POST /expect HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert_eq!(r.body, b"blue");
    let seen = blue.requests_for("/expect");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("expect"), None, "{seen:?}");
    assert_eq!(blue.body_bytes(), 5);
}

#[test]
fn http10_upgrade_is_ignored_not_a_websocket() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut cfg = service("api", &[&blue], &[&green], "blue");
    cfg += &route_with("/ws", "api", "websocket = true");
    cfg += &route(None, "/", "api");
    let proxy = ProxyBuilder::new(cfg).start();
    let addr = proxy.http_addr();

    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    // On a WebSocket route: a plain request, never a 101.
    let r = exchange_until_close(&addr, format!("GET /ws/a HTTP/1.0\r\n{upgrade}").as_bytes());
    assert_eq!(
        (r.status(), r.body.as_slice()),
        (200, &b"blue"[..]),
        "{}",
        r.head
    );
    // Elsewhere: not refused as a WebSocket either.
    let r = exchange_until_close(
        &addr,
        format!("GET /plain HTTP/1.0\r\n{upgrade}").as_bytes(),
    );
    assert_eq!(
        (r.status(), r.body.as_slice()),
        (200, &b"blue"[..]),
        "{}",
        r.head
    );
    assert_eq!(blue.ws_handshakes(), 0);
    for path in ["/ws/a", "/plain"] {
        let seen = blue.requests_for(path);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].header("upgrade"), None, "{seen:?}");
    }
}

#[test]
fn event_stream_reaches_an_http10_client_unframed_as_it_is_sent() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(b"GET /events?sse=3&gap_ms=0&gated=1 HTTP/1.0\r\n\r\n")
        .unwrap();
    let r = c.read_head(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
    assert_eq!(r.header("content-length"), None, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    let mut body = Vec::new();
    // Each event arrives before the next one is even released.
    for i in 1..=3 {
        if i > 1 {
            blue.release(1);
        }
        c.read_body_until(
            &mut body,
            &format!("data: blue-{i}\n\n"),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(c.read_body_part(deadline).unwrap(), BodyPart::End);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "data: blue-1\n\ndata: blue-2\n\ndata: blue-3\n\n"
    );
}

#[test]
fn proxy_answers_to_http10_clients_are_well_formed() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut down = Upstream::start("down");
    let down_green = Upstream::start("down-green");
    let maint = Upstream::start("maint");
    let mut cfg = service("api", &[&blue], &[&green], "blue");
    cfg += &service("down", &[&down], &[&down_green], "blue");
    cfg += &service("maint", &[&maint], &[&green], "blue");
    cfg += "[rate_limits.once]\nrate = \"1/h\"\n\n";
    cfg += &deny_route(None, "/denied");
    cfg += &route_with("/small", "api", "max_body = \"16B\"");
    cfg += &route_with("/limited", "api", "rate_limit = \"once\"");
    cfg += &route(None, "/down", "down");
    cfg += &route(None, "/maint", "maint");
    cfg += &route(None, "/", "api");
    let proxy = ProxyBuilder::new(cfg).start();
    let addr = proxy.http_addr();
    down.stop();
    let (code, v) = proxy.admin(
        "POST",
        "/services/maint/maintenance",
        Some(r#"{"on": true}"#),
    );
    assert_eq!(code, 200, "{v}");
    // The one request the rate limit allows.
    let r = exchange_until_close(&addr, b"GET /limited HTTP/1.0\r\n\r\n");
    assert_eq!(r.status(), 200, "{}", r.head);

    let cases: &[(&str, u16)] = &[
        ("GET /denied HTTP/1.0\r\n\r\n", 404),
        ("GET /x HTTP/1.0\r\nHost: a..b\r\n\r\n", 400),
        ("POST /small HTTP/1.0\r\nContent-Length: 100\r\n\r\n", 413),
        ("GET /limited HTTP/1.0\r\n\r\n", 429),
        ("GET /down HTTP/1.0\r\n\r\n", 502),
        ("GET /maint HTTP/1.0\r\n\r\n", 503),
    ];
    for (request, status) in cases {
        let r = exchange_until_close(&addr, request.as_bytes());
        assert_eq!(r.status(), *status, "{request:?}: {}", r.head);
        assert!(r.head.starts_with("HTTP/1.1 "), "{}", r.head);
        assert_eq!(
            r.header("transfer-encoding"),
            None,
            "{request:?}: {}",
            r.head
        );
        let length: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{request:?}: no Content-Length: {}", r.head));
        assert_eq!(length, r.body.len(), "{request:?}: {}", r.head);
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{request:?}: {}",
            r.head
        );
        assert_eq!(
            r.header("server"),
            Some("switchyard"),
            "{request:?}: {}",
            r.head
        );
    }
}

#[test]
fn hop_by_hop_headers_of_a_backend_answer_stay_behind() {
    let backend = Scripted::start();
    let green = Upstream::start("green");
    let proxy = scripted_proxy(&backend, &green);
    for request in [
        &b"GET /hop HTTP/1.1\r\nHost: a.example\r\n\r\n"[..],
        &b"GET /hop HTTP/1.0\r\n\r\n"[..],
    ] {
        let mut c = RawConn::connect(&proxy.http_addr());
        c.send(request).unwrap();
        let r = c.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for name in [
            "x-backend-conn",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ] {
            assert_eq!(r.header(name), None, "{name} in {r:?}");
        }
        assert_eq!(r.header("x-kept"), Some("yes"), "{r:?}");
        // The client's connection is described by switchyard alone: the
        // backend closing its own is no reason to close the client's.
        let want = if request.ends_with(b"HTTP/1.1\r\nHost: a.example\r\n\r\n") {
            "keep-alive"
        } else {
            "close"
        };
        assert_eq!(r.header("connection"), Some(want), "{r:?}");
    }
}
