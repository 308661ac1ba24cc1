//! Drain visibility: `/status` counts requests in flight and open WebSockets
//! per color, and `ctl switch --wait-drained` waits for the old color to
//! empty (or says what is still open when its deadline passes).

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// `simple_api` with `/ws` open to WebSockets.
fn config(blue: &Upstream, green: &Upstream) -> String {
    service("api", &[blue], &[green], "blue")
        + &route_with("/ws", "api", "websocket = true")
        + &route(None, "/", "api")
}

/// (`in_flight`, `upgraded`) counts of `color` in `/status`.
fn counts(proxy: &Proxy, color: &str) -> (Value, Value) {
    let api = proxy.service_status("api");
    (
        api["in_flight"][color].clone(),
        api["upgraded"][color].clone(),
    )
}

/// Polls until `color` shows exactly these counts.
fn wait_counts(proxy: &Proxy, color: &str, in_flight: u64, upgraded: u64) {
    let want = (Value::from(in_flight), Value::from(upgraded));
    let mut last = (Value::Null, Value::Null);
    let ok = poll_until(Duration::from_secs(10), || {
        last = counts(proxy, color);
        last == want
    });
    assert!(
        ok,
        "{color}: want in_flight {in_flight}, upgraded {upgraded}; last saw {last:?} in {}",
        proxy.service_status("api")
    );
}

/// Starts a GET that the upstream holds until released; returns its thread.
fn held_request(proxy: &Proxy, path: &str) -> std::thread::JoinHandle<(u16, String)> {
    let url = format!("{}{path}?hold=1", proxy.http_url());
    std::thread::spawn(move || get(&url, None))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn status_counts_requests_in_flight_and_open_websockets_per_color() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();
    wait_counts(&proxy, "blue", 0, 0);
    wait_counts(&proxy, "green", 0, 0);

    let slow = held_request(&proxy, "/held-blue");
    assert!(poll_until(Duration::from_secs(10), || blue
        .in_flight_for("/held-blue")
        == 1));
    wait_counts(&proxy, "blue", 1, 0);

    // An open WebSocket counts as in flight and as upgraded.
    let mut ws = ws_connect(&proxy.http_addr(), "/ws").expect("socket on blue");
    assert_eq!(ws_echo(&mut ws, "x").unwrap(), "blue:x");
    wait_counts(&proxy, "blue", 2, 1);
    wait_counts(&proxy, "green", 0, 0);

    proxy.switch("api", "green", Some("drain test"));
    let slow_green = held_request(&proxy, "/held-green");
    assert!(poll_until(Duration::from_secs(10), || green
        .in_flight_for("/held-green")
        == 1));
    wait_counts(&proxy, "green", 1, 0);
    wait_counts(&proxy, "blue", 2, 1);

    blue.release(1);
    assert_eq!(slow.join().unwrap(), (200, "blue".to_string()));
    wait_counts(&proxy, "blue", 1, 1);
    ws_close(ws);
    wait_counts(&proxy, "blue", 0, 0);
    green.release(1);
    assert_eq!(slow_green.join().unwrap(), (200, "green".to_string()));
    wait_counts(&proxy, "green", 0, 0);
}

#[test]
fn ctl_wait_drained_returns_once_the_old_color_has_nothing_in_flight() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();

    let slow = held_request(&proxy, "/slow");
    assert!(poll_until(Duration::from_secs(10), || blue
        .in_flight_for("/slow")
        == 1));

    let mut child = proxy.spawn_ctl(&["switch", "api", "green", "--wait-drained", "10s"]);
    // It switches first...
    assert!(
        poll_until(Duration::from_secs(10), || proxy.active("api") == "green"),
        "ctl --wait-drained did not switch"
    );
    assert_eq!(proxy.get("/new", None), (200, "green".to_string()));
    // ...then waits while blue still has the request.
    let exited_early = poll_until(Duration::from_millis(500), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(
        !exited_early,
        "ctl returned while blue still had a request in flight:\n{}",
        describe(&wait_output_with_deadline(
            child,
            Duration::from_secs(1),
            "ctl"
        ))
    );

    blue.release(1);
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl --wait-drained");
    // By the time ctl is seen to exit, the upstream had finished the request.
    assert_eq!(blue.in_flight_for("/slow"), 0);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(slow.join().unwrap(), (200, "blue".to_string()));
    assert_eq!(proxy.active("api"), "green");
}

#[test]
fn ctl_wait_drained_fails_at_its_deadline_naming_what_is_still_open() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();

    let slow = held_request(&proxy, "/slow");
    assert!(poll_until(Duration::from_secs(10), || blue
        .in_flight_for("/slow")
        == 1));

    let t0 = Instant::now();
    let out = proxy.ctl(&["switch", "api", "green", "--wait-drained", "1s"]);
    let took = t0.elapsed();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "exited after {took:?} with a 1 s deadline:\n{}",
        describe(&out)
    );
    let text = output_text(&out);
    assert!(
        text.contains("blue") && text.contains('1'),
        "output does not say that 1 request is still open on blue:\n{}",
        describe(&out)
    );
    // The switch itself happened; only the drain wait failed.
    assert_eq!(proxy.active("api"), "green");

    blue.release(1);
    assert_eq!(slow.join().unwrap(), (200, "blue".to_string()));
}

#[test]
fn open_websocket_on_the_old_color_keeps_wait_drained_waiting() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();

    let mut ws = ws_connect(&proxy.http_addr(), "/ws").expect("socket on blue");
    assert_eq!(ws_echo(&mut ws, "x").unwrap(), "blue:x");

    let mut child = proxy.spawn_ctl(&["switch", "api", "green", "--wait-drained", "10s"]);
    assert!(
        poll_until(Duration::from_secs(10), || proxy.active("api") == "green"),
        "ctl --wait-drained did not switch"
    );
    let exited_early = poll_until(Duration::from_millis(500), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(
        !exited_early,
        "ctl returned while a WebSocket was open on blue:\n{}",
        describe(&wait_output_with_deadline(
            child,
            Duration::from_secs(1),
            "ctl"
        ))
    );
    // The socket still works on blue meanwhile.
    assert_eq!(ws_echo(&mut ws, "y").unwrap(), "blue:y");

    ws_close(ws);
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl --wait-drained");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.active("api"), "green");
}
