//! The lean HTTP/1 path (`[server] fast_path`, `src/fast_path.rs`): which
//! requests it serves and which it declines into Pingora's proxy, its
//! backend connection reuse, and its answers when the backend fails. What
//! both paths must do alike is tested by every other file (the lean path is
//! on by default) and by `tests/smuggling.rs` (each test on both paths).
//!
//! `switchyard_fast_path_requests_total` tells the two paths apart.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

const SERVED: &str = "switchyard_fast_path_requests_total";

fn served(proxy: &Proxy) -> f64 {
    proxy.metric(SERVED).unwrap_or(-1.0)
}

/// A raw HTTP/1.1 backend: answers each request `200` with body `ok`, and,
/// when `close_after` is set, closes the connection after each answer
/// without saying so (as a backend whose keep-alive timeout just ran out).
/// Counts the connections it accepted.
struct RawBackend {
    addr: String,
    accepted: Arc<AtomicUsize>,
    /// Connections it closed (after their answer, `close_after`).
    closed: Arc<AtomicUsize>,
}

impl RawBackend {
    fn start(close_after: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, closes) = (accepted.clone(), closed.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let closes = closes.clone();
                thread::spawn(move || {
                    serve_raw(conn, close_after);
                    closes.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            closed,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve_raw(conn: TcpStream, close_after: bool) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        // Request line and headers; these requests have no body.
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
        }
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if conn.write_all(answer).is_err() {
            return;
        }
        if close_after {
            return;
        }
    }
}

fn raw_service(backend: &str) -> String {
    format!(
        "[services.raw]\nblue = [\"{backend}\"]\ngreen = [\"{backend}\"]\n\n{}",
        route(None, "/", "raw")
    )
}

#[test]
fn bodiless_requests_on_plain_routes_are_served_and_the_rest_declined() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let body = format!(
        "{}\n{}\n{}\n[concurrency.few]\nmax_in_flight = 4\n",
        service("app", &[&blue], &[&green], "blue"),
        route(None, "/", "app"),
        route_with("/capped/", "app", "concurrency = \"few\""),
    );
    let proxy = ProxyBuilder::new(body).metrics().start();
    let url = proxy.http_url();
    let before = served(&proxy);

    // Served: GET, HEAD, DELETE without a body, on a plain route.
    for method in ["GET", "HEAD", "DELETE"] {
        let reply = request(method, &format!("{url}/a"), &[], None);
        assert_eq!(reply.status, 200, "{method}");
    }
    assert_eq!(
        served(&proxy),
        before + 3.0,
        "GET, HEAD and DELETE go the lean way"
    );

    // Declined, and answered by Pingora's proxy all the same.
    let declined: [(&str, &str, &[(&str, &str)], Option<&[u8]>); 4] = [
        ("POST", "/a", &[], Some(b"body")),
        ("GET", "/capped/x", &[], None),
        ("GET", "/a", &[("Connection", "X-Private")], None),
        ("GET", "/a", &[("Expect", "100-continue")], None),
    ];
    for (method, path, headers, body) in declined {
        let reply = request(method, &format!("{url}{path}"), headers, body);
        assert_eq!(reply.status, 200, "{method} {path} {headers:?}");
    }
    // HTTP/1.0, and an upgrade (refused: the route passes no WebSocket).
    let (status, _) = raw_http(&proxy.http_addr(), b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    let (status, _) = raw_http(
        &proxy.http_addr(),
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(status, 400);
    assert_eq!(
        served(&proxy),
        before + 3.0,
        "none of these went the lean way"
    );
    let posts = blue.seen().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "the declined POST reached the backend once");
}

#[test]
fn backend_connections_are_reused_across_requests() {
    let backend = RawBackend::start(false);
    let proxy = ProxyBuilder::new(raw_service(&backend.addr))
        .metrics()
        .start();
    let before = served(&proxy);
    let mut conn = RawConn::connect(&proxy.http_addr());
    for i in 0..20 {
        conn.send(format!("GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let reply = conn.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
    }
    assert_eq!(served(&proxy), before + 20.0);
    assert_eq!(
        backend.accepted(),
        1,
        "one backend connection carried all 20"
    );
}

#[test]
fn a_backend_connection_closed_while_idle_is_replaced_without_an_error() {
    // Every answer ends its connection without saying so: each kept-alive
    // connection is stale by the next request. GET is retried on a new
    // connection; POST (not idempotent) is never sent on a stale one.
    let backend = RawBackend::start(true);
    let proxy = ProxyBuilder::new(raw_service(&backend.addr))
        .metrics()
        .start();
    let before = served(&proxy);
    let mut conn = RawConn::connect(&proxy.http_addr());
    for (i, method) in ["GET", "GET", "POST", "GET", "POST", "POST"]
        .iter()
        .enumerate()
    {
        // The backend has closed every connection it answered on (its FIN
        // is on switchyard's side before the next request goes out).
        let answered = i;
        assert!(
            poll_until(Duration::from_secs(5), || backend
                .closed
                .load(Ordering::SeqCst)
                >= answered),
            "the backend closed its connections"
        );
        conn.send(format!("{method} /s{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let reply = conn.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ok"),
            "{method} #{i}"
        );
    }
    assert_eq!(served(&proxy), before + 6.0);
    assert!(proxy.error_lines().is_empty(), "{:?}", proxy.error_lines());
}

#[test]
fn a_failed_backend_is_answered_with_the_error_page_and_a_close() {
    // A backend that refuses connections: 502, in JSON when asked.
    let port = free_port();
    let refused = format!("127.0.0.1:{port}");
    let proxy = ProxyBuilder::new(raw_service(&refused)).metrics().start();
    let before = served(&proxy);
    let mut conn = RawConn::connect(&proxy.http_addr());
    conn.send(b"GET /x HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")
        .unwrap();
    let reply = conn.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(
        conn.wait_closed(Duration::from_secs(5)).is_some(),
        "closed after the error"
    );
    assert_eq!(served(&proxy), before + 1.0);
}

#[test]
fn a_backend_that_answers_too_late_gets_a_504() {
    let slow = Upstream::start("slow");
    let body = format!(
        "{}\n{}",
        service("app", &[&slow], &[&slow], "blue"),
        route_with("/", "app", "read_timeout = \"300ms\""),
    );
    let proxy = ProxyBuilder::new(body).metrics().start();
    let before = served(&proxy);
    let reply = request(
        "GET",
        &format!("{}/x?delay_ms=3000", proxy.http_url()),
        &[],
        None,
    );
    assert_eq!(reply.status, 504);
    assert_eq!(served(&proxy), before + 1.0);
}

#[test]
fn a_pooled_backend_connection_sends_nothing_stray() {
    // A backend answer with bytes behind it (a second, unasked-for answer)
    // must not be taken as the next request's answer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let mut n = 0;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            n += 1;
            let tag = n;
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(read) = conn.read(&mut buf) {
                    if read == 0 {
                        return;
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nc{tag}HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
                    );
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = ProxyBuilder::new(raw_service(&addr)).start();
    for i in 0..3 {
        let reply = request("GET", &format!("{}/p{i}", proxy.http_url()), &[], None);
        assert_eq!(reply.status, 200, "request {i}");
        assert_ne!(reply.body, "stray", "request {i} got the stray answer");
    }
}
