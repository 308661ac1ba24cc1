//! WebSocket pass-through: only on routes with `websocket = true`, sockets
//! stay on the pool they were opened on across a switch, idle sockets are
//! closed after the route's `idle_timeout`, and handshakes are reliable.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Service `api` (blue active) with `/ws` open to WebSockets (plus
/// `ws_extra` keys on that route) and everything else a plain route.
fn ws_config(blue: &Upstream, green: &Upstream, ws_extra: &str) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&route_with(
        "/ws",
        "api",
        &format!("websocket = true\n{ws_extra}"),
    ));
    s.push_str(&route(None, "/", "api"));
    s
}

#[test]
fn websocket_echo_passes_through_a_websocket_route() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(ws_config(&blue, &green, "")).start();

    let mut ws = ws_connect(&proxy.http_addr(), "/ws/chat")
        .unwrap_or_else(|(code, e)| panic!("handshake through the proxy: {code} {e}"));
    assert_eq!(ws_echo(&mut ws, "hello").unwrap(), "blue:hello");
    assert_eq!(ws_echo(&mut ws, "second").unwrap(), "blue:second");
    // Larger than any single read buffer: frames must be relayed intact.
    let big = "z".repeat(200 * 1024);
    assert_eq!(
        ws_echo(&mut ws, &big).unwrap().len(),
        "blue:".len() + big.len()
    );

    assert_eq!(blue.ws_handshakes(), 1);
    assert_eq!(green.ws_handshakes(), 0);
    let up = blue.requests_for("/ws/chat");
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(
        up[0]
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "upgrade header not forwarded: {up:?}"
    );
    assert!(up[0].header("sec-websocket-key").is_some(), "{up:?}");

    // Closing from the client ends the upstream socket too.
    ws_close(ws);
    assert!(
        poll_until(Duration::from_secs(5), || blue.ws_open() == 0),
        "upstream socket still open after the client closed"
    );
}

#[test]
fn upgrade_on_a_route_without_websocket_is_400() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(ws_config(&blue, &green, "")).start();

    match ws_connect(&proxy.http_addr(), "/plain") {
        Ok(_) => panic!("WebSocket opened on a route without websocket = true"),
        Err((code, e)) => assert_eq!(code, 400, "{e}"),
    }
    // Also with a raw request, to see the whole answer.
    let req = format!(
        "GET /plain/raw HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        proxy.http_addr()
    );
    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(req.as_bytes()).unwrap();
    let r = c
        .read_response(Duration::from_secs(5))
        .expect("an answer to the refused upgrade");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(blue.ws_handshakes(), 0, "the upgrade reached blue");
    assert_eq!(green.ws_handshakes(), 0, "the upgrade reached green");

    // The route itself still serves plain HTTP.
    assert_eq!(proxy.get("/plain", None), (200, "blue".to_string()));
}

#[test]
fn open_socket_stays_on_blue_after_switch_while_new_sockets_go_to_green() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(ws_config(&blue, &green, "")).start();

    let mut old = ws_connect(&proxy.http_addr(), "/ws").expect("socket on blue");
    assert_eq!(ws_echo(&mut old, "before").unwrap(), "blue:before");

    proxy.switch("api", "green", Some("ws test"));

    assert_eq!(
        ws_echo(&mut old, "after").unwrap(),
        "blue:after",
        "the socket opened before the switch must stay on blue"
    );
    let mut new = ws_connect(&proxy.http_addr(), "/ws").expect("socket after switch");
    assert_eq!(ws_echo(&mut new, "new").unwrap(), "green:new");
    assert_eq!(proxy.get("/x", None), (200, "green".to_string()));
    // Both keep working side by side.
    for i in 0..5 {
        assert_eq!(
            ws_echo(&mut old, &format!("o{i}")).unwrap(),
            format!("blue:o{i}")
        );
        assert_eq!(
            ws_echo(&mut new, &format!("n{i}")).unwrap(),
            format!("green:n{i}")
        );
    }
    assert_eq!(blue.ws_handshakes(), 1);
    assert_eq!(green.ws_handshakes(), 1);
    ws_close(old);
    ws_close(new);
}

/// Pingora has had a race where a handshake gets its `101` and then EOF.
/// Many sequential handshakes, each with a round trip, must all work.
#[test]
fn two_hundred_sequential_handshakes_all_echo() {
    const N: usize = 200;
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(ws_config(&blue, &green, "")).start();
    let addr = proxy.http_addr();

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failures = Vec::new();
    let mut done = 0;
    while done < N && Instant::now() < deadline {
        let result = ws_connect(&addr, "/ws")
            .map_err(|(code, e)| format!("handshake: {code} {e}"))
            .and_then(|mut ws| {
                let msg = format!("m{done}");
                let r = ws_echo(&mut ws, &msg).and_then(|got| {
                    if got == format!("blue:{msg}") {
                        Ok(())
                    } else {
                        Err(format!("echo {msg:?} came back as {got:?}"))
                    }
                });
                // Close without waiting for the close handshake: what is
                // tested here is the opening.
                let _ = ws.close(None);
                r
            });
        if let Err(e) = result {
            failures.push(format!("#{done}: {e}"));
        }
        done += 1;
    }
    assert_eq!(done, N, "only {done} handshakes within 40 s");
    assert!(
        failures.is_empty(),
        "{} of {N} WebSocket handshakes failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn idle_socket_is_closed_after_idle_timeout_but_busy_one_is_not() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(ws_config(&blue, &green, "idle_timeout = \"1s\"")).start();

    let mut idle = ws_connect(&proxy.http_addr(), "/ws/idle").expect("idle socket");
    let mut busy = ws_connect(&proxy.http_addr(), "/ws/busy").expect("busy socket");
    assert_eq!(ws_echo(&mut idle, "hi").unwrap(), "blue:hi");
    let start = Instant::now();

    // Traffic every 300 ms for 2.5 s, well past the idle timeout: the busy
    // socket must survive.
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        let msg = format!("b{i}");
        assert_eq!(
            ws_echo(&mut busy, &msg),
            Ok(format!("blue:{msg}")),
            "busy socket failed after {:?}",
            start.elapsed()
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    // The idle one has been closed by now (or very soon).
    assert!(
        ws_wait_closed(&mut idle, Duration::from_secs(3)),
        "idle socket still open {:?} after its last traffic (idle_timeout 1s)",
        start.elapsed()
    );
    assert_eq!(ws_echo(&mut busy, "still").unwrap(), "blue:still");
    ws_close(busy);
    assert!(
        poll_until(Duration::from_secs(5), || blue.ws_open() == 0),
        "{} upstream sockets left open",
        blue.ws_open()
    );
}
