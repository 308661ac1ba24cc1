//! The harness itself, without the proxy: the upstream's behaviours and the
//! raw and WebSocket clients work as the end-to-end tests assume, so a
//! failure elsewhere points at the proxy, not at the test tools.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn raw_conn_reads_kept_alive_responses_and_sees_the_close() {
    let up = Upstream::start("blue");
    let mut c = RawConn::connect(&up.addr());
    for _ in 0..2 {
        c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = c.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "blue"));
        assert_eq!(r.header("server"), Some("upstream/blue"));
    }
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_response(Duration::from_secs(5)).unwrap().status, 200);
    assert_eq!(c.wait_closed(Duration::from_secs(5)), Some(Vec::new()));
}

#[test]
fn request_sends_headers_as_given_and_upstream_records_them() {
    let up = Upstream::start("blue");
    let url = format!("http://{}/h", up.addr());
    let r = request(
        "GET",
        &url,
        &[
            ("Host", "shop.example.com"),
            ("X-Request-Id", ""),
            ("X-Forwarded-For", "1.2.3.4, 5.6.7.8"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header_all("server"), ["upstream/blue"]);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header_all("host"), ["shop.example.com"]);
    assert_eq!(seen.header_all("x-request-id"), [""]);
    assert_eq!(seen.header("x-forwarded-for"), Some("1.2.3.4, 5.6.7.8"));
}

#[test]
fn gated_event_stream_waits_for_each_release() {
    let up = Upstream::start("blue");
    let mut c = RawConn::connect(&up.addr());
    c.send(b"GET /e?sse=3&gated=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = c.read_head(Duration::from_secs(5)).unwrap();
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let mut body = Vec::new();
    for i in 1..=3 {
        c.read_body_until(
            &mut body,
            &format!("data: blue-{i}\n\n"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(up.sse_sent().len(), i);
        if i < 3 {
            // Nothing more comes until released.
            let next = c.read_body_part(Instant::now() + Duration::from_millis(100));
            assert!(
                matches!(&next, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
                "event {} came unreleased: {next:?}",
                i + 1
            );
        }
        up.release(1);
    }
    let end = c.read_body_part(Instant::now() + Duration::from_secs(5));
    assert_eq!(end.unwrap(), BodyPart::End);
}

#[test]
fn event_stream_gaps_and_a_cut_stream_is_eof() {
    let mut up = Upstream::start("blue");
    let mut c = RawConn::connect(&up.addr());
    c.send(b"GET /e?sse=3&gap_ms=100 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r = c.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(r.body, "data: blue-1\n\ndata: blue-2\n\ndata: blue-3\n\n");

    let mut c = RawConn::connect(&up.addr());
    c.send(b"GET /e?sse=3&gap_ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c.read_head(Duration::from_secs(5)).unwrap();
    let mut body = Vec::new();
    c.read_body_until(&mut body, "blue-1", Duration::from_secs(5))
        .unwrap();
    up.stop();
    let part = c.read_body_part(Instant::now() + Duration::from_secs(5));
    assert_eq!(part.unwrap(), BodyPart::Eof);
}

#[test]
fn health_endpoint_hold_and_body_counting() {
    let up = Upstream::start("g");
    let url = format!("http://{}", up.addr());
    assert_eq!(get(&format!("{url}/health"), None), (200, "ok".into()));
    up.set_healthy(false);
    assert_eq!(get(&format!("{url}/health"), None).0, 503);
    up.set_healthy(true);
    up.set_health_body("starting");
    assert_eq!(
        get(&format!("{url}/health"), None),
        (200, "starting".into())
    );
    assert_eq!((up.health_probes(), up.traffic()), (3, 0));

    let held = format!("{url}/held?hold=1");
    let t = std::thread::spawn(move || get(&held, None));
    assert!(poll_until(Duration::from_secs(5), || up
        .in_flight_for("/held")
        == 1));
    assert!(!poll_until(Duration::from_millis(200), || t.is_finished()));
    up.release(1);
    assert_eq!(t.join().unwrap(), (200, "g".into()));

    let r = request("POST", &format!("{url}/post"), &[], Some(&[b'x'; 1000]));
    assert_eq!(r.status, 200);
    assert_eq!(up.body_bytes(), 1000);
    assert_eq!(up.traffic(), 2);
}

#[test]
fn websocket_echo_and_open_count() {
    let up = Upstream::start("blue");
    let mut ws = ws_connect(&up.addr(), "/ws").unwrap();
    assert_eq!(ws_echo(&mut ws, "hello").unwrap(), "blue:hello");
    assert_eq!((up.ws_handshakes(), up.ws_open()), (1, 1));
    ws_close(ws);
    assert!(poll_until(Duration::from_secs(5), || up.ws_open() == 0));

    let mut ws = ws_connect(&up.addr(), "/ws").unwrap();
    drop(up);
    assert!(ws_wait_closed(&mut ws, Duration::from_secs(5)));
}

#[test]
fn stop_restart_and_reset() {
    let mut up = Upstream::start("b");
    let url = format!("http://{}/x", up.addr());
    assert_eq!(get(&url, None).0, 200);
    up.stop();
    assert!(connection_refused(&up.addr()));
    up.restart();
    assert_eq!(get(&url, None).0, 200);

    up.set_reset(true);
    assert!(try_get(&agent(), &url, None).is_err());
    let mut c = RawConn::connect(&up.addr());
    let _ = c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.wait_closed(Duration::from_secs(5)), Some(Vec::new()));
    up.set_reset(false);
    assert_eq!(get(&url, None).0, 200);
}
