//! What the upstream sees of a proxied request (X-Forwarded-*, X-Real-IP,
//! X-Request-Id, hop-by-hop headers) and the proxy's own response headers.

mod common;

use std::time::Duration;

use common::*;

/// `simple_api` plus `/denied`, answered 404 by the proxy itself.
fn config(blue: &Upstream, green: &Upstream) -> String {
    let mut s = simple_api(blue, green);
    s.push_str(&deny_route(None, "/denied"));
    s
}

/// The one request blue got on `path`, panicking if it got none or several.
fn only_request(up: &Upstream, path: &str) -> SeenRequest {
    let reqs = up.requests_for(path);
    assert_eq!(
        reqs.len(),
        1,
        "requests to {path} on {}: {reqs:?}",
        up.label()
    );
    reqs.into_iter().next().unwrap()
}

/// The single value of `name` in `req`; fails if absent or repeated.
fn single<'a>(req: &'a SeenRequest, name: &str) -> &'a str {
    let all = req.header_all(name);
    assert_eq!(all.len(), 1, "{name} should appear once: {req:?}");
    all[0]
}

fn is_sane_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[test]
fn forwarded_headers_replace_what_an_untrusted_client_sent() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();
    let url = proxy.http_url();

    // No trusted_proxies: the loopback client is not believed.
    let r = request(
        "GET",
        &format!("{url}/spoofed"),
        &[
            ("Host", "shop.example.com"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example.com"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/spoofed");
    assert_eq!(
        single(&seen, "x-forwarded-for"),
        "127.0.0.1",
        "replaced, not appended"
    );
    assert_eq!(single(&seen, "x-real-ip"), "127.0.0.1");
    assert_eq!(single(&seen, "x-forwarded-proto"), "http");
    assert_eq!(single(&seen, "x-forwarded-host"), "shop.example.com");

    // Without any incoming forwarding headers.
    let r = request(
        "GET",
        &format!("{url}/plain"),
        &[("Host", "api.example.org")],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/plain");
    assert_eq!(single(&seen, "x-forwarded-for"), "127.0.0.1");
    assert_eq!(single(&seen, "x-real-ip"), "127.0.0.1");
    assert_eq!(single(&seen, "x-forwarded-proto"), "http");
    assert_eq!(single(&seen, "x-forwarded-host"), "api.example.org");
}

#[test]
fn trusted_loopback_proxy_chain_is_extended_and_real_ip_is_rightmost_untrusted() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start();
    let url = proxy.http_url();

    let r = request(
        "GET",
        &format!("{url}/chain"),
        &[("X-Forwarded-For", "203.0.113.7, 10.1.2.3")],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/chain");
    assert_eq!(
        single(&seen, "x-forwarded-for"),
        "203.0.113.7, 10.1.2.3, 127.0.0.1"
    );
    // 10.1.2.3 is not trusted here, so it is the client as far as we know.
    assert_eq!(single(&seen, "x-real-ip"), "10.1.2.3");

    let r = request("GET", &format!("{url}/direct"), &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/direct");
    assert_eq!(single(&seen, "x-forwarded-for"), "127.0.0.1");
}

#[test]
fn real_ip_skips_every_trusted_hop_but_not_further() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .server(r#"trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]"#)
        .start();
    let url = proxy.http_url();

    let r = request(
        "GET",
        &format!("{url}/two"),
        &[("X-Forwarded-For", "203.0.113.7, 10.1.2.3")],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/two");
    assert_eq!(
        single(&seen, "x-forwarded-for"),
        "203.0.113.7, 10.1.2.3, 127.0.0.1"
    );
    assert_eq!(single(&seen, "x-real-ip"), "203.0.113.7");

    // A client can prepend anything; the rightmost untrusted hop wins, not
    // the leftmost entry.
    let r = request(
        "GET",
        &format!("{url}/three"),
        &[("X-Forwarded-For", "198.51.100.1, 203.0.113.7, 10.1.2.3")],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/three");
    assert_eq!(
        single(&seen, "x-forwarded-for"),
        "198.51.100.1, 203.0.113.7, 10.1.2.3, 127.0.0.1"
    );
    assert_eq!(single(&seen, "x-real-ip"), "203.0.113.7");
}

#[test]
fn request_id_is_passed_through_when_sane_else_generated_and_always_returned() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();
    let url = proxy.http_url();

    // Sane ids go through unchanged, up to 128 characters.
    let long_sane = "a1._:-".repeat(22)[..128].to_string();
    for (i, id) in ["req-42_a.b:C", long_sane.as_str()].iter().enumerate() {
        let path = format!("/rid-sane-{i}");
        let r = request(
            "GET",
            &format!("{url}{path}"),
            &[("X-Request-Id", id)],
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(single(&only_request(&blue, &path), "x-request-id"), *id);
        assert_eq!(r.header("x-request-id"), Some(*id), "{r:?}");
    }

    // Missing or insane: a new sane id, the same upstream and downstream.
    let too_long = "b".repeat(129);
    let very_long = "c".repeat(200);
    let insane: [Option<&str>; 6] = [
        None,
        Some("has space"),
        Some(too_long.as_str()),
        Some(very_long.as_str()),
        Some("slash/and;semi"),
        Some(""),
    ];
    let mut generated = Vec::new();
    for (i, incoming) in insane.iter().enumerate() {
        let path = format!("/rid-new-{i}");
        let headers: Vec<(&str, &str)> =
            incoming.map(|v| ("X-Request-Id", v)).into_iter().collect();
        let r = request("GET", &format!("{url}{path}"), &headers, None);
        assert_eq!(r.status, 200, "{r:?}");
        let up = single(&only_request(&blue, &path), "x-request-id").to_string();
        assert!(
            is_sane_request_id(&up),
            "generated id {up:?} for {incoming:?}"
        );
        assert_ne!(Some(up.as_str()), *incoming, "insane id passed through");
        assert_eq!(
            r.header("x-request-id"),
            Some(up.as_str()),
            "client got another id than the upstream for {incoming:?}: {r:?}"
        );
        generated.push(up);
    }
    let mut unique = generated.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), generated.len(), "ids repeat: {generated:?}");

    // Answers the proxy makes itself carry the id too.
    let r = request(
        "GET",
        &format!("{url}/denied"),
        &[("X-Request-Id", "deny-1")],
        None,
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("x-request-id"), Some("deny-1"), "{r:?}");
    let r = request("GET", &format!("{url}/denied/x"), &[], None);
    assert_eq!(r.status, 404, "{r:?}");
    let id = r.header("x-request-id").unwrap_or_default();
    assert!(is_sane_request_id(id), "404 without a generated id: {r:?}");
    assert_eq!(blue.received("/denied"), 0);
}

#[test]
fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();
    let addr = proxy.http_addr();

    // Kept-alive first request, then one that closes; each names another
    // header as hop-by-hop in Connection.
    let mut c = RawConn::connect(&addr);
    c.send(
        b"GET /hop-1 HTTP/1.1\r\nHost: hop.test\r\nConnection: keep-alive, X-Secret\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n\
          X-Secret: s3cr3t\r\nX-Kept: yes\r\n\r\n",
    )
    .unwrap();
    let r = c.read_response(Duration::from_secs(5)).expect("response 1");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    c.send(
        b"GET /hop-2 HTTP/1.1\r\nHost: hop.test\r\nConnection: close, X-Other\r\n\
          X-Other: private\r\nX-Kept: yes\r\n\r\n",
    )
    .unwrap();
    let r = c.read_response(Duration::from_secs(5)).expect("response 2");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");

    for path in ["/hop-1", "/hop-2"] {
        let seen = only_request(&blue, path);
        for h in [
            "keep-alive",
            "te",
            "proxy-connection",
            "x-secret",
            "x-other",
        ] {
            assert!(
                seen.header(h).is_none(),
                "{h} reached the upstream on {path}: {seen:?}"
            );
        }
        // The proxy may manage its own upstream connection, but nothing of
        // the client's Connection header may pass.
        for v in seen.header_all("connection") {
            assert!(
                v.eq_ignore_ascii_case("keep-alive"),
                "client's Connection header reached the upstream on {path}: {seen:?}"
            );
        }
        assert_eq!(seen.header("x-kept"), Some("yes"), "{seen:?}");
    }
}

#[test]
fn responses_carry_server_switchyard_without_version() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();
    let url = proxy.http_url();

    // The upstream sends `Server: upstream/blue`; it is replaced.
    let r = request("GET", &format!("{url}/srv"), &[], None);
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    assert_eq!(r.header_all("server"), ["switchyard"], "{r:?}");

    let r = request("GET", &format!("{url}/denied"), &[], None);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header_all("server"), ["switchyard"], "{r:?}");
}
