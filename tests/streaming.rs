//! Streaming responses: server-sent events are relayed as they arrive, and a
//! route's `read_timeout` bounds how long an upstream may stay silent.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `/short` waits at most 500 ms for upstream bytes, `/long` 3 s; `/` has
/// the default.
fn timeout_config(blue: &Upstream, green: &Upstream) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&route_with("/short", "api", "read_timeout = \"500ms\""));
    s.push_str(&route_with("/long", "api", "read_timeout = \"3s\""));
    s.push_str(&route(None, "/", "api"));
    s
}

fn get_raw(addr: &str, path: &str) -> RawConn {
    let mut c = RawConn::connect(addr);
    c.send(
        format!("GET {path} HTTP/1.1\r\nHost: stream.test\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    c
}

#[test]
fn event_stream_is_relayed_as_each_event_arrives() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    // The upstream sends event 1 at once, then each further event only when
    // the test releases it.
    let mut c = get_raw(&proxy.http_addr(), "/events?sse=3&gated=1");
    let head = c
        .read_head(Duration::from_secs(5))
        .expect("response head while the stream is open");
    assert_eq!(head.status, 200, "{head:?}");
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{head:?}"
    );

    let mut body = Vec::new();
    for i in 1..=3 {
        c.read_body_until(
            &mut body,
            &format!("data: blue-{i}\n\n"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("event {i} not relayed while the upstream waits: {e}"));
        // Event i reached the client while event i+1 did not exist yet.
        let sent: Vec<String> = blue.sse_sent().into_iter().map(|(n, _)| n).collect();
        assert_eq!(sent.len(), i, "upstream sent {sent:?}");
        blue.release(1);
    }
    let end = c
        .read_body_part(Instant::now() + Duration::from_secs(5))
        .expect("end of stream");
    assert_eq!(end, BodyPart::End, "stream not terminated cleanly");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "data: blue-1\n\ndata: blue-2\n\ndata: blue-3\n\n"
    );
}

#[test]
fn route_read_timeout_lets_upstream_stay_silent_longer() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(timeout_config(&blue, &green)).start();

    // 1.5 s between events, under the route's 3 s.
    let t0 = Instant::now();
    let mut c = get_raw(&proxy.http_addr(), "/long/events?sse=2&gap_ms=1500");
    let r = c
        .read_response(Duration::from_secs(10))
        .expect("complete stream through /long");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "data: blue-1\n\ndata: blue-2\n\n");
    assert!(t0.elapsed() >= Duration::from_millis(1400));
}

#[test]
fn route_read_timeout_cuts_a_silent_upstream() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(timeout_config(&blue, &green)).start();
    let url = proxy.http_url();

    // The same 2 s silence is fine on the default route (in parallel).
    let default_url = format!("{url}/default?delay_ms=2000");
    let default_route = std::thread::spawn(move || get(&default_url, None));

    // Nothing sent yet when the timeout hits: 504.
    let t0 = Instant::now();
    let (code, body) = get(&format!("{url}/short/slow?delay_ms=2000"), None);
    let took = t0.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(
        took < Duration::from_millis(1800),
        "504 came after {took:?}, not after the 500 ms read_timeout"
    );

    // A stream that goes silent after its first event is cut: no clean
    // end, and long before the upstream's next event (3 s later).
    let mut c = get_raw(&proxy.http_addr(), "/short/events?sse=3&gap_ms=3000");
    let head = c.read_head(Duration::from_secs(5)).expect("stream head");
    assert_eq!(head.status, 200, "{head:?}");
    let mut body = Vec::new();
    c.read_body_until(&mut body, "data: blue-1\n\n", Duration::from_secs(5))
        .expect("first event");
    let t1 = Instant::now();
    let mut rest = Vec::new();
    let outcome = loop {
        match c.read_body_part(t1 + Duration::from_millis(2500)) {
            Ok(BodyPart::Data(d)) => rest.extend_from_slice(&d),
            other => break other,
        }
    };
    assert!(
        matches!(outcome, Ok(BodyPart::Eof)),
        "expected the stream to be cut (EOF before its end) within 2.5 s; got {outcome:?} \
         after {:?}, extra data {:?}",
        t1.elapsed(),
        String::from_utf8_lossy(&rest)
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("blue-2"),
        "{rest:?}"
    );

    assert_eq!(
        default_route.join().unwrap(),
        (200, "blue".to_string()),
        "the default route must allow a 2 s silence"
    );
}
