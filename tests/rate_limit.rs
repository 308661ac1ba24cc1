//! Per-client rate limits (`[rate_limits.NAME]`, a route's `rate_limit`):
//! what a client over its rate gets, who shares a budget, and what never
//! counts. Clients are told apart by `X-Forwarded-For` from a trusted
//! loopback peer, as behind a cloud load balancer.

mod common;

use std::time::Duration;

use common::*;

/// `/limited` and `/shared` count POSTs against one limit of `rate` with
/// `burst`; `/free` has no limit. Loopback is a trusted proxy.
fn start(blue: &Upstream, green: &Upstream, rate: &str, burst: u32) -> Proxy {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&format!(
        "[rate_limits.writes]\nrate = {}\nburst = {burst}\nmethods = [\"POST\"]\n\n",
        toml_str(rate)
    ));
    s.push_str(&route_with("/limited", "api", "rate_limit = \"writes\""));
    s.push_str(&route_with("/shared", "api", "rate_limit = \"writes\""));
    s.push_str(&route(None, "/free", "api"));
    ProxyBuilder::new(s)
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start()
}

fn post(url: &str, path: &str, client: &str) -> Reply {
    request(
        "POST",
        &format!("{url}{path}"),
        &[("X-Forwarded-For", client)],
        Some(b"{}"),
    )
}

const A: &str = "203.0.113.1";
const B: &str = "203.0.113.2";

#[test]
fn posts_over_the_rate_get_429_and_never_reach_the_backend() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // One per minute: nothing refills while the test runs.
    let proxy = start(&blue, &green, "1/m", 2);
    let url = proxy.http_url();

    for i in 0..3 {
        let r = post(&url, "/limited", A);
        assert_eq!(r.status, 200, "request {i} is within rate + burst: {r:?}");
    }
    let r = post(&url, "/limited", A);
    assert_eq!(r.status, 429, "{r:?}");
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in seconds: {r:?}"));
    assert!((1..=60).contains(&wait), "one request per minute: {wait}");
    assert_eq!(r.json()["error"], "too many requests, slow down", "{r:?}");
    assert!(r.header("x-request-id").is_some(), "{r:?}");
    assert_eq!(r.header("server"), Some("switchyard"), "{r:?}");
    assert_eq!(
        blue.received("/limited"),
        3,
        "the refused POST stayed at the proxy"
    );

    // Routes naming the same limit share the client's budget.
    assert_eq!(post(&url, "/shared", A).status, 429);
    assert_eq!(blue.received("/shared"), 0);
    // Methods the limit does not list, and routes without a limit, pass.
    let r = request(
        "GET",
        &format!("{url}/limited"),
        &[("X-Forwarded-For", A)],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(post(&url, "/free", A).status, 200);
    // Another client has its own budget.
    assert_eq!(post(&url, "/limited", B).status, 200);
}

#[test]
fn a_refused_request_keeps_its_connection_unless_a_body_is_unread() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(&blue, &green, "1/m", 0);
    assert_eq!(post(&proxy.http_url(), "/limited", A).status, 200);
    let head = format!("POST /limited HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {A}\r\n");

    // No body: the client may go on using the connection.
    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(format!("{head}Content-Length: 0\r\n\r\n").as_bytes())
        .unwrap();
    let r = c.read_response(Duration::from_secs(5)).expect("429");
    assert_eq!(r.status, 429, "{r:?}");
    c.send(b"GET /free/after HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = c
        .read_response(Duration::from_secs(5))
        .expect("next response");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");

    // An unread body is never taken for a next request: the proxy answers
    // and closes (Pingora's rule for answers sent before the body is read).
    let mut c = RawConn::connect(&proxy.http_addr());
    let body = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    c.send(format!("{head}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .unwrap();
    let r = c.read_response(Duration::from_secs(5)).expect("429");
    assert_eq!(
        (r.status, r.header("connection")),
        (429, Some("close")),
        "{r:?}"
    );
    assert!(
        c.wait_closed(Duration::from_secs(5)).is_some(),
        "connection left open"
    );
    assert_eq!(blue.received("/smuggled"), 0);
    assert_eq!(blue.received("/limited"), 1);
}

#[test]
fn the_budget_refills_at_the_rate() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(&blue, &green, "1/s", 0);
    let url = proxy.http_url();
    assert_eq!(post(&url, "/limited", A).status, 200);
    // Normally the very next POST is refused; on a machine so loaded that a
    // second passes between two requests, a later one is.
    let r = (0..10)
        .map(|_| post(&url, "/limited", A))
        .find(|r| r.status == 429)
        .expect("a rush of POSTs at 1/s gets a 429");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    // Within about a second the client may send again.
    assert!(
        poll_until(Duration::from_secs(5), || post(&url, "/limited", A).status
            == 200),
        "the budget never refilled"
    );
}

/// A limit keyed by `key` (`header:X-Api-Key` or `global`), 1 POST a
/// minute, on `/keyed`.
fn start_keyed(blue: &Upstream, green: &Upstream, key: &str) -> Proxy {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&format!(
        "[rate_limits.ai]\nrate = \"1/m\"\nkey = {}\n\n",
        toml_str(key)
    ));
    s.push_str(&route_with("/keyed", "api", "rate_limit = \"ai\""));
    ProxyBuilder::new(s)
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start()
}

fn post_as(url: &str, client: &str, api_key: Option<&str>) -> u16 {
    let mut headers = vec![("X-Forwarded-For", client)];
    if let Some(k) = api_key {
        headers.push(("X-Api-Key", k));
    }
    request("POST", &format!("{url}/keyed"), &headers, Some(b"{}")).status
}

#[test]
fn a_header_key_counts_per_key_and_falls_back_to_the_client_without_it() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start_keyed(&blue, &green, "header:X-Api-Key");
    let url = proxy.http_url();
    // One key from two clients shares one budget...
    assert_eq!(post_as(&url, A, Some("sk-one")), 200);
    assert_eq!(post_as(&url, B, Some("sk-one")), 429);
    // ...and two keys from one client have one each.
    assert_eq!(post_as(&url, A, Some("sk-two")), 200);
    assert_eq!(post_as(&url, A, Some("sk-two")), 429);
    // Without the header a request counts under its client's address.
    assert_eq!(post_as(&url, A, None), 200);
    assert_eq!(post_as(&url, A, None), 429);
    assert_eq!(post_as(&url, B, None), 200);
    // The key is never logged.
    assert!(!proxy.stderr_text().contains("sk-one"));
}

#[test]
fn a_global_key_is_one_budget_for_everyone() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start_keyed(&blue, &green, "global");
    let url = proxy.http_url();
    assert_eq!(post_as(&url, A, Some("sk-one")), 200);
    assert_eq!(post_as(&url, B, Some("sk-two")), 429);
    assert_eq!(post_as(&url, "2001:db8::1", None), 429);
    assert_eq!(blue.requests_for("/keyed").len(), 1);
}
