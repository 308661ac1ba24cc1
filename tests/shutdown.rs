//! Graceful shutdown on SIGTERM: in-flight requests finish, the process exits
//! 0 as soon as it is idle, and the listener goes away.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Sends `path` from another thread and waits until blue is working on it.
fn in_flight_request(
    proxy: &Proxy,
    blue: &Upstream,
    path: &str,
) -> std::thread::JoinHandle<Result<(u16, String), ureq::Error>> {
    let url = format!("{}{path}", proxy.http_url());
    let request = std::thread::spawn(move || try_get(&agent(), &url, None));
    assert!(
        poll_until(Duration::from_secs(10), || blue.in_flight_for("/s") >= 1),
        "blue never received the slow request"
    );
    request
}

#[test]
fn sigterm_lets_in_flight_request_finish_then_exits_zero() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // grace_period is much longer than the slow request: the proxy has to
    // exit when the request is done, not when the grace period runs out.
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .grace_period("8s")
        .start();

    let slow = in_flight_request(&proxy, &blue, "/slow?delay_ms=1500");

    let t0 = Instant::now();
    proxy.sigterm();

    // New connections are refused eventually (at the latest once it exits).
    let http = proxy.http_addr();
    assert!(
        poll_until(Duration::from_secs(10), || connection_refused(&http)),
        "http port still accepting 10 s after SIGTERM"
    );

    finishes_then_exits(slow, &mut proxy);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}: it should follow the last request, not the 8 s grace period"
    );
}

#[test]
fn idle_proxy_exits_promptly_on_sigterm() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .grace_period("8s")
        .start();
    assert_eq!(proxy.get("/", None), (200, "blue".to_string()));

    let t0 = Instant::now();
    proxy.sigterm();
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    let took = t0.elapsed();
    assert_eq!(st.code(), Some(0), "exit status {st}");
    assert!(took < Duration::from_secs(4), "idle exit took {took:?}");
    assert!(connection_refused(&proxy.http_addr()));
}

#[test]
fn grace_period_bounds_a_request_that_runs_too_long() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .grace_period("1s")
        .start();

    // Far longer than the grace period (and the client's own timeout).
    let slow = in_flight_request(&proxy, &blue, "/stuck?delay_ms=20000");

    let t0 = Instant::now();
    proxy.sigterm();
    let exited = proxy.wait_exit(Duration::from_secs(8));
    assert!(exited.is_some(), "grace period of 1 s was not enforced");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1 s grace period with a request in flight"
    );
    assert!(took < Duration::from_secs(6), "exit took {took:?}");
    // The cut-off request must not look like a success.
    let result = slow.join().expect("slow client panicked");
    assert!(
        !matches!(result, Ok((200, _))),
        "request cut off by shutdown reported 200: {result:?}"
    );
}

/// Keep-alive ends at shutdown: a kept-alive connection waiting for its
/// next request is closed when SIGTERM arrives (as nginx closes its idle
/// connections), not left open until the process exits, while a request in
/// flight on another connection still finishes.
#[test]
fn idle_kept_alive_connection_is_closed_when_shutdown_starts() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .grace_period("10s")
        .start();
    let mut idle = RawConn::connect(&proxy.http_addr());
    idle.send(b"GET /before HTTP/1.1\r\nHost: s.test\r\n\r\n")
        .unwrap();
    let r = idle
        .read_response(Duration::from_secs(5))
        .expect("first answer");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");

    // Keeps the process running well past the moment the idle one closes.
    let slow = in_flight_request(&proxy, &blue, "/slow?delay_ms=5000");
    proxy.sigterm();
    let data = idle
        .wait_closed(Duration::from_secs(3))
        .expect("idle kept-alive connection still open 3 s after SIGTERM");
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert!(
        blue.in_flight_for("/s") >= 1,
        "closed only once the in-flight request was done, not at shutdown"
    );

    finishes_then_exits(slow, &mut proxy);
}

/// After SIGTERM: the in-flight request `slow` is answered in full (200,
/// from blue), then the process exits with status 0 within 10 s.
fn finishes_then_exits(
    slow: std::thread::JoinHandle<Result<(u16, String), ureq::Error>>,
    proxy: &mut Proxy,
) {
    let result = slow.join().expect("slow client panicked");
    let (code, body) = result.unwrap_or_else(|e| panic!("in-flight request failed: {e}"));
    assert_eq!((code, body.as_str()), (200, "blue"), "in-flight request");
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status {st}");
}
