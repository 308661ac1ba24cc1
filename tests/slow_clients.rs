//! Slow and oversized clients: header and body timeouts, idle keep-alive
//! connections, body and header size limits.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Trickles an endless header line into `c`, one byte about every 200 ms,
/// until the server closes the connection or `limit` passes. Returns the
/// time from `since` to the close (None if still open) and whatever the
/// server sent before closing.
fn trickle_until_closed(
    c: &mut RawConn,
    since: Instant,
    limit: Duration,
) -> (Option<Duration>, Vec<u8>) {
    while since.elapsed() < limit {
        if c.send(b"a").is_err() {
            return (Some(since.elapsed()), Vec::new());
        }
        // Waiting here is what makes the client slow.
        if let Some(data) = c.wait_closed(Duration::from_millis(200)) {
            return (Some(since.elapsed()), data);
        }
    }
    (None, Vec::new())
}

#[test]
fn slowloris_is_disconnected_while_other_clients_are_served() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .server(r#"header_timeout = "1s""#)
        .start();
    let addr = proxy.http_addr();

    let slow = std::thread::spawn(move || {
        let mut c = RawConn::connect(&addr);
        let t0 = Instant::now();
        c.send(b"GET /slowloris HTTP/1.1\r\nHost: slow.test\r\nX-Slow: ")
            .unwrap();
        trickle_until_closed(&mut c, t0, Duration::from_secs(4))
    });

    // Meanwhile normal clients are served.
    let mut served = 0;
    while !slow.is_finished() && served < 200 {
        assert_eq!(proxy.get("/normal", None), (200, "blue".to_string()));
        served += 1;
    }
    let (closed, data) = slow.join().expect("slow client panicked");
    let took = closed.expect("slowloris connection still open after 4 s (header_timeout 1s)");
    assert!(
        took >= Duration::from_millis(700),
        "closed after {took:?}, before the 1 s header_timeout"
    );
    assert!(
        data.is_empty(),
        "expected a close without a response, got {:?}",
        String::from_utf8_lossy(&data)
    );
    assert!(served >= 1, "no normal request completed meanwhile");
    assert_eq!(blue.received("/slowloris"), 0);

    // A client that is slow but finishes its header in time is served.
    let mut c = RawConn::connect(&proxy.http_addr());
    for part in [
        &b"GET /slow-but-ok HTTP/1.1\r\n"[..],
        b"Host: slow.test\r\n",
        b"Connection: close\r\n\r\n",
    ] {
        c.send(part).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = c
        .read_response(Duration::from_secs(5))
        .expect("slow but complete header");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
}

#[test]
fn slow_second_request_on_a_kept_alive_connection_is_disconnected() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .server(r#"header_timeout = "1s""#)
        .start();

    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(b"GET /first HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        .unwrap();
    let r = c
        .read_response(Duration::from_secs(5))
        .expect("first response");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");

    // The header timer starts at the first byte of the next request.
    let t0 = Instant::now();
    c.send(b"GET /second HTTP/1.1\r\nHost: slow.test\r\nX-Slow: ")
        .unwrap();
    let (closed, data) = trickle_until_closed(&mut c, t0, Duration::from_secs(4));
    let took = closed.expect("slow second request still open after 4 s (header_timeout 1s)");
    assert!(took >= Duration::from_millis(700), "closed after {took:?}");
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert_eq!(blue.received("/second"), 0);
}

#[test]
fn idle_kept_alive_connection_is_closed_after_keepalive_timeout() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .server(r#"keepalive_timeout = "1s""#)
        .start();

    let mut c = RawConn::connect(&proxy.http_addr());
    for path in ["/ka-1", "/ka-2"] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: ka.test\r\n\r\n").as_bytes())
            .unwrap();
        let r = c
            .read_response(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{path} on a kept-alive connection: {e}"));
        assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    }
    let t0 = Instant::now();
    let data = c
        .wait_closed(Duration::from_secs(4))
        .expect("idle connection still open 4 s after its last response (keepalive_timeout 1s)");
    let took = t0.elapsed();
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert!(
        took >= Duration::from_millis(500),
        "closed {took:?} after the response: keep-alive not honoured"
    );
}

/// `/upload` accepts at most 1 KiB of body; `/` has the default 1 MiB.
fn upload_config(blue: &Upstream, green: &Upstream) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&route_with("/upload", "api", "max_body = \"1KiB\""));
    s.push_str(&route(None, "/", "api"));
    s
}

fn post_head(path: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: up.test\r\nContent-Type: application/octet-stream\r\n{extra}Connection: close\r\n\r\n")
}

#[test]
fn content_length_over_max_body_is_413_and_not_forwarded() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(upload_config(&blue, &green)).start();
    let addr = proxy.http_addr();

    // Exactly the limit is fine.
    let body = vec![b'k'; 1024];
    let mut req = post_head("/upload/ok", "Content-Length: 1024\r\n").into_bytes();
    req.extend_from_slice(&body);
    let (code, text) = raw_http(&addr, &req);
    assert_eq!((code, text.as_str()), (200, "blue"));
    assert_eq!(blue.body_bytes(), 1024);

    // One KiB over.
    let body = vec![b'k'; 2048];
    let mut req = post_head("/upload/big", "Content-Length: 2048\r\n").into_bytes();
    req.extend_from_slice(&body);
    let (code, text) = raw_http(&addr, &req);
    assert_eq!(code, 413, "{text}");
    let v = parse_json(&text);
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "413 body is not {{\"error\": ...}}: {text}"
    );
    assert_eq!(
        blue.received("/upload/big"),
        0,
        "an oversized body was forwarded"
    );

    // The default limit (1 MiB) on another route: the declared length alone
    // decides, before any body is sent.
    let mut c = RawConn::connect(&addr);
    c.send(post_head("/default", "Content-Length: 1048577\r\n").as_bytes())
        .unwrap();
    let r = c
        .read_head(Duration::from_secs(5))
        .expect("an answer to a Content-Length over 1 MiB");
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(blue.received("/default"), 0);
    assert_eq!(blue.body_bytes(), 1024);
}

#[test]
fn chunked_body_over_max_body_is_refused_and_upstream_gets_at_most_max_body() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(upload_config(&blue, &green)).start();

    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(post_head("/upload/chunked", "Transfer-Encoding: chunked\r\n").as_bytes())
        .unwrap();
    // 8 chunks of 512 bytes: 4 KiB against a 1 KiB limit. Writes may fail
    // once the proxy has given up on the request.
    let chunk = format!("200\r\n{}\r\n", "c".repeat(512));
    for _ in 0..8 {
        if c.send(chunk.as_bytes()).is_err() {
            break;
        }
    }
    let _ = c.send(b"0\r\n\r\n");

    match c.read_response(Duration::from_secs(5)) {
        Ok(r) => assert_eq!(r.status, 413, "{r:?}"),
        // No (complete) answer: the connection was closed, acceptable once
        // the response had started.
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            "neither a 413 nor a closed connection: {e}"
        ),
    }
    // Watch the upstream for a moment: it must never get more than 1 KiB.
    let over = poll_until(Duration::from_millis(500), || blue.body_bytes() > 1024);
    assert!(
        !over,
        "upstream received {} body bytes, over the 1 KiB max_body",
        blue.body_bytes()
    );
}

#[test]
fn request_headers_over_max_header_size_get_431() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .server(r#"max_header_size = "4KiB""#)
        .start();
    let addr = proxy.http_addr();

    let req = |path: &str, size: usize| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: big.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "h".repeat(size)
        )
    };
    let (code, text) = raw_http(&addr, req("/small", 2000).as_bytes());
    assert_eq!((code, text.as_str()), (200, "blue"));
    let (code, text) = raw_http(&addr, req("/huge", 6000).as_bytes());
    assert_eq!(code, 431, "{text}");
    assert_eq!(blue.received("/huge"), 0);

    // Many small headers count too.
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: big.test\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: {}\r\n", "m".repeat(60)));
    }
    many.push_str("Connection: close\r\n\r\n");
    let (code, text) = raw_http(&addr, many.as_bytes());
    assert_eq!(code, 431, "{text}");
    assert_eq!(blue.received("/many"), 0);
}

#[test]
fn stalled_request_body_is_given_up_after_body_timeout() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .server(r#"body_timeout = "1s""#)
        .start();

    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(post_head("/stalled", "Content-Length: 100\r\n").as_bytes())
        .unwrap();
    c.send(&[b's'; 10]).unwrap();
    let t0 = Instant::now();
    // The rest of the body never comes: the proxy must answer with an error
    // or close within a bound, never forward a complete request.
    match c.read_head(Duration::from_secs(4)) {
        Ok(r) => assert!(
            r.status >= 400,
            "a stalled body got {} after {:?}",
            r.status,
            t0.elapsed()
        ),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "no answer and no close 4 s into a stalled body (body_timeout 1s)"
        ),
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(700), "gave up after {took:?}");
    assert!(
        blue.body_bytes() <= 10,
        "upstream got {} bytes",
        blue.body_bytes()
    );
}

/// Sends `request` raw (a write error after the server answered is fine)
/// and reads the response head.
fn raw_head(addr: &str, request: &[u8]) -> Reply {
    let mut c = RawConn::connect(addr);
    let _ = c.send(request);
    c.read_head(Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "{:?}: {e}",
            String::from_utf8_lossy(&request[..80.min(request.len())])
        )
    })
}

/// Every answer says `Server: switchyard`, including those Pingora builds
/// itself: each request here is refused by Pingora's parser or framing
/// checks, or by the proxy, before any backend is involved.
#[test]
fn answers_pingora_writes_itself_say_server_switchyard() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let addr = proxy.http_addr();

    let mut huge = b"GET /huge HTTP/1.1\r\nHost: id.test\r\nX-Huge: ".to_vec();
    huge.extend(std::iter::repeat_n(b'h', 1100 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "malformed request line",
            b"GET /a b c HTTP/1.1 x\r\nHost: id.test\r\n\r\n".to_vec(),
            400,
        ),
        (
            "method with a space",
            b"G ET / HTTP/1.1\r\nHost: id.test\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bad version",
            b"GET / HTTP/9.x\r\nHost: id.test\r\n\r\n".to_vec(),
            400,
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: id.test\r\nX-A: a\0b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bad header name",
            b"GET / HTTP/1.1\r\nHost: id.test\r\nBad Name: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "header name with a colon-less line",
            b"GET / HTTP/1.1\r\nHost: id.test\r\nnocolon\r\n\r\n".to_vec(),
            400,
        ),
        (
            "invalid Content-Length",
            b"POST / HTTP/1.1\r\nHost: id.test\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
        ),
        (
            "conflicting Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: id.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
            400,
        ),
        (
            "non-chunked final Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: id.test\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            400,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: id.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            400,
        ),
        (
            "CONNECT",
            b"CONNECT id.test:443 HTTP/1.1\r\nHost: id.test:443\r\n\r\n".to_vec(),
            405,
        ),
        ("header over 1 MiB", huge, 400),
    ];
    for (what, req, want) in &cases {
        let r = raw_head(&addr, req);
        assert_eq!(r.status, *want, "{what}: {r:?}");
        assert_eq!(r.header_all("server"), vec!["switchyard"], "{what}: {r:?}");
    }

    // An invalid chunked body is found while proxying: answered by the proxy.
    let mut c = RawConn::connect(&addr);
    c.send(
        b"POST /chunks HTTP/1.1\r\nHost: id.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n",
    )
    .unwrap();
    if let Ok(r) = c.read_head(Duration::from_secs(10)) {
        assert!(r.status >= 400, "invalid chunked body: {r:?}");
        assert_eq!(r.header_all("server"), vec!["switchyard"], "{r:?}");
    }

    // Proxied and proxy-made answers keep theirs, once.
    let r = raw_head(&addr, b"GET /ok HTTP/1.1\r\nHost: id.test\r\n\r\n");
    assert_eq!(
        (r.status, r.header_all("server")),
        (200, vec!["switchyard"])
    );
    assert_eq!(blue.received("/huge"), 0);
    assert_eq!(blue.received("/ok"), 1);

    // The admin listener's answers too (Pingora's HTTP app answers nothing
    // itself there: a request it cannot parse is closed unanswered).
    let admin = proxy.admin_addr();
    let authorized =
        format!("GET /status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    for (what, req, want) in [
        (
            "admin without a token",
            "GET /status HTTP/1.1\r\nHost: a\r\n\r\n",
            401,
        ),
        ("admin status", authorized.as_str(), 200),
    ] {
        let r = raw_head(&admin, req.as_bytes());
        assert_eq!(r.status, want, "{what}: {r:?}");
        assert_eq!(r.header_all("server"), vec!["switchyard"], "{what}: {r:?}");
    }
}

/// Connections cut by the header deadline and 503s for want of a healthy
/// backend are expected outcomes: no ERROR line each. A real failure (a
/// backend that resets) still logs one.
#[test]
fn expected_outcomes_log_no_error_but_real_failures_do() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // A second service without health checks, on loopback ports where
    // nothing listens: its requests fail for real (502).
    let [dead1, dead2] = free_ports::<2>();
    let proxy = ProxyBuilder::new(
        service_with("api", &[&blue], &[&green], "blue", &fast_health())
            + &format!(
                "[services.dead]\nblue = [\"127.0.0.1:{dead1}\"]\ngreen = [\"127.0.0.1:{dead2}\"]\n\n"
            )
            + &route(None, "/dead", "dead")
            + &route(None, "/", "api"),
    )
    .server(r#"header_timeout = "500ms""#)
    // A pipelined follower's header is timed by the keep-alive timeout.
    .server(r#"keepalive_timeout = "1s""#)
    // Our own debug lines show that each expected outcome was handled.
    .log_filter("info,switchyard=debug")
    .start();
    let addr = proxy.http_addr();
    assert_eq!(proxy.get("/up", None), (200, "blue".to_string()));

    // Headers cut by the deadline: partway through a first request, partway
    // through a second on a kept-alive connection, and nothing sent at all.
    let mut first = RawConn::connect(&addr);
    first
        .send(b"GET /cut HTTP/1.1\r\nHost: q.test\r\nX-Slow: ")
        .unwrap();
    let mut second = RawConn::connect(&addr);
    second
        .send(b"GET /one HTTP/1.1\r\nHost: q.test\r\n\r\n")
        .unwrap();
    second
        .read_response(Duration::from_secs(5))
        .expect("first response");
    second
        .send(b"GET /two HTTP/1.1\r\nHost: q.test\r\nX-Slow: ")
        .unwrap();
    let mut silent = RawConn::connect(&addr);
    for c in [&mut first, &mut second, &mut silent] {
        let data = c
            .wait_closed(Duration::from_secs(5))
            .expect("cut by the header deadline");
        assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    }

    // No healthy backend: 503 with the maintenance page.
    blue.set_healthy(false);
    proxy.wait_health("api", &[(&blue, "unhealthy")], Duration::from_secs(10));
    for _ in 0..5 {
        assert_eq!(proxy.get("/down", None).0, 503);
    }
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // Client mistakes and clients gone: a chunked body over max_body (413),
    // broken chunk framing (400), a client that hangs up mid-request.
    blue.set_healthy(true);
    proxy.wait_health("api", &[(&blue, "healthy")], Duration::from_secs(10));
    let mut big = RawConn::connect(&addr);
    big.send(b"POST /big HTTP/1.1\r\nHost: q.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..20 {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if big.send(&framed).is_err() {
            break;
        }
    }
    assert_eq!(big.read_head(Duration::from_secs(5)).unwrap().status, 413);
    let mut broken = RawConn::connect(&addr);
    broken
        .send(b"POST /chunk HTTP/1.1\r\nHost: q.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .unwrap();
    // Answered as the client's mistake, and the connection is not kept.
    let r = broken.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("bad request"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    // Next headers cut short after bytes Pingora already holds: a pipelined
    // follower (one byte, then the keep-alive timeout), and one after a
    // request with a body (not held back by the guard, so the header
    // deadline fails Pingora's read midway).
    for (first, rest) in [
        (&b"GET /lead HTTP/1.1\r\nHost: q.test\r\n\r\nG"[..], None),
        (
            &b"POST /lead HTTP/1.1\r\nHost: q.test\r\nContent-Length: 5\r\n\r\nhello"[..],
            Some(&b"GET /next HTTP/1.1\r\nHo"[..]),
        ),
    ] {
        let mut c = RawConn::connect(&addr);
        c.send(first).unwrap();
        assert_eq!(c.read_response(Duration::from_secs(5)).unwrap().status, 200);
        if let Some(rest) = rest {
            c.send(rest).unwrap();
        }
        // Pingora logs about a connection before it closes it.
        assert!(
            c.wait_closed(Duration::from_secs(5)).is_some(),
            "the cut connection stayed open"
        );
    }
    let mut gone = RawConn::connect(&addr);
    gone.send(b"POST /gone HTTP/1.1\r\nHost: q.test\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    drop(gone);
    // Each was handled (and would have logged by now) once its debug line is there.
    let handled = || proxy.stderr_text().matches("expected outcome").count();
    assert!(
        poll_until(Duration::from_secs(5), || handled() >= 5 + 3),
        "{} expected outcomes handled:\n{}",
        handled(),
        proxy.stderr_text()
    );
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // A real failure is still an ERROR, without the query (it may hold a token).
    assert_eq!(proxy.get("/dead?access_token=SECRETQ1", None).0, 502);
    assert!(
        poll_until(Duration::from_secs(5), || !proxy.error_lines().is_empty()),
        "a backend reset logged no ERROR"
    );
    assert!(
        !proxy.stderr_text().contains("SECRETQ1"),
        "query in the log:\n{}",
        proxy.stderr_text()
    );
}

/// Pipelined requests (RFC 9112 §9.3.2) are each answered, in order, on the
/// same connection: after a proxied answer, after a request body, after the
/// proxy's own 404, and for HTTP/1.0 keep-alive. The wrapper holds back
/// nothing that belongs to the next request.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green) + &deny_route(None, "/denied")).start();
    let addr = proxy.http_addr();
    let get = |path: &str, id: &str, version: &str, extra: &str| {
        format!("GET {path} HTTP/{version}\r\nHost: p.test\r\nX-Request-Id: {id}\r\n{extra}\r\n")
    };
    // (what, the bytes sent, the (request id, status) of each answer)
    type Case<'a> = (&'a str, String, Vec<(&'a str, u16)>);
    let cases: Vec<Case> = vec![
        (
            "three GETs in one write",
            get("/p1", "a1", "1.1", "")
                + &get("/p2", "a2", "1.1", "")
                + &get("/p3", "a3", "1.1", "Connection: close\r\n"),
            vec![("a1", 200), ("a2", 200), ("a3", 200)],
        ),
        (
            "a POST with a body, then a GET",
            "POST /p4 HTTP/1.1\r\nHost: p.test\r\nX-Request-Id: b1\r\nContent-Length: 5\r\n\r\nhello"
                .to_string()
                + &get("/p5", "b2", "1.1", "Connection: close\r\n"),
            vec![("b1", 200), ("b2", 200)],
        ),
        (
            "after the proxy's own 404",
            get("/denied", "c1", "1.1", "") + &get("/p6", "c2", "1.1", "Connection: close\r\n"),
            vec![("c1", 404), ("c2", 200)],
        ),
        (
            "HTTP/1.0 keep-alive",
            get("/p7", "d1", "1.0", "Connection: keep-alive\r\n") + &get("/p8", "d2", "1.0", ""),
            vec![("d1", 200), ("d2", 200)],
        ),
    ];
    for (what, bytes, expected) in &cases {
        let mut c = RawConn::connect(&addr);
        c.send(bytes.as_bytes()).unwrap();
        for (id, status) in expected {
            let r = c
                .read_response(Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{what}: no answer for {id}: {e}"));
            assert_eq!(
                (r.status, r.header("x-request-id")),
                (*status, Some(*id)),
                "{what}: {r:?}"
            );
        }
    }
    let paths: Vec<String> = blue.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/p1", "/p2", "/p3", "/p4", "/p5", "/p6", "/p7", "/p8"],
        "the backend's order"
    );

    // A malformed request pipelined behind a good one: Pingora's own 400,
    // still with switchyard's identity.
    let mut c = RawConn::connect(&addr);
    c.send(
        (get("/p9", "e1", "1.1", "") + "GET /a b c HTTP/1.1 x\r\nHost: p.test\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let first = c.read_response(Duration::from_secs(5)).unwrap();
    let second = c.read_head(Duration::from_secs(5)).unwrap();
    assert_eq!((first.status, second.status), (200, 400), "{second:?}");
    assert_eq!(
        second.header_all("server"),
        vec!["switchyard"],
        "{second:?}"
    );
}

/// Between two requests the wrapper waits for the next one itself and hands
/// its bytes to Pingora afterwards: the next request arrives intact whether
/// it comes in one write, in several small ones, or with a second request
/// pipelined behind it, and after a request that had a body too.
#[test]
fn the_request_after_an_idle_wait_is_answered_intact() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let mut c = RawConn::connect(&proxy.http_addr());
    let get = |path: &str, id: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: idle.test\r\nX-Request-Id: {id}\r\n\r\n")
    };
    let answered = |c: &mut RawConn, id: &str| {
        let r = c
            .read_response(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("no answer for {id}: {e}"));
        assert_eq!(
            (r.status, r.header("x-request-id"), r.body.as_str()),
            (200, Some(id), "blue"),
            "{r:?}"
        );
    };
    c.send(get("/w1", "w1").as_bytes()).unwrap();
    answered(&mut c, "w1");

    // Idle for a moment, then a request in small pieces. (The pauses are
    // what make the client slow, not synchronisation.)
    std::thread::sleep(Duration::from_millis(200));
    let pieces = get("/w2?q=split", "w2");
    for piece in pieces.as_bytes().chunks(7) {
        c.send(piece).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    answered(&mut c, "w2");

    // Idle again, then two requests in one write: the replay loses neither.
    std::thread::sleep(Duration::from_millis(200));
    c.send((get("/w3", "w3") + &get("/w4", "w4")).as_bytes())
        .unwrap();
    answered(&mut c, "w3");
    answered(&mut c, "w4");

    // After a request with a body, then idle, then one more.
    c.send(b"POST /w5 HTTP/1.1\r\nHost: idle.test\r\nX-Request-Id: w5\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    answered(&mut c, "w5");
    std::thread::sleep(Duration::from_millis(200));
    c.send(get("/w6", "w6").as_bytes()).unwrap();
    answered(&mut c, "w6");

    let seen: Vec<(String, String)> = blue
        .seen()
        .into_iter()
        .map(|r| {
            let id = r.header("x-request-id").unwrap_or_default().to_string();
            (r.path, id)
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("/w1", "w1"),
        ("/w2?q=split", "w2"),
        ("/w3", "w3"),
        ("/w4", "w4"),
        ("/w5", "w5"),
        ("/w6", "w6"),
    ]
    .iter()
    .map(|(p, i)| (p.to_string(), i.to_string()))
    .collect();
    assert_eq!(seen, expected, "what the backend received, in order");
}

/// Three GETs in one write (RFC 9112 §9.3.2): each reaches the backend and
/// is answered, in order, on the same connection.
#[test]
fn three_pipelined_requests_are_answered_in_order() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let mut c = RawConn::connect(&proxy.http_addr());
    let get =
        |id: &str| format!("GET /{id} HTTP/1.1\r\nHost: pipe.test\r\nX-Request-Id: {id}\r\n\r\n");
    c.send((get("a") + &get("b") + &get("c")).as_bytes())
        .unwrap();
    for id in ["a", "b", "c"] {
        let r = c
            .read_response(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("no answer for /{id}: {e}"));
        assert_eq!(
            (r.status, r.header("x-request-id")),
            (200, Some(id)),
            "{r:?}"
        );
    }
}
