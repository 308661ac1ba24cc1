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

/// Every header of the proxy-set family, as a client might spell it.
const PROXY_SET_FAMILY: &[&str] = &[
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Ssl",
    "X-Forwarded-By",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "x-forwarded-uri",
    "X-FORWARDED-PORT",
    "X-Forwarded",
    "Forwarded-For",
    "X-Real-IP",
    "True-Client-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "CF-Connecting-IP",
    "Client-IP",
    "Fastly-Client-IP",
    "X-Original-Forwarded-For",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Middleware-Subrequest",
    "X-Middleware-Rewrite",
    "x-middleware-override-headers",
    "X-Invoke-Path",
    "X-Matched-Path",
    "X-Now-Route-Matches",
    // The URL or host before a rewrite.
    "X-Original-URI",
    "X-Original-Method",
    "X-Original-Host",
    "X-Host",
    // The client certificate and TLS session, as a TLS-terminating proxy
    // passes them on (RFC 9440, nginx/HAProxy style, Tomcat SSLValve).
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Client-Cert",
    "X-SSL-Cert",
    "X-SSL-Client-Cert",
    "X-SSL-Client-Verify",
    "SSL-Client-Cert",
    "X-Forwarded-Client-Cert",
    "ssl_client_cert",
    "ssl_cipher",
    "ssl_session_id",
    "ssl_cipher_usekeysize",
    // Underscore spellings, which CGI/WSGI stacks read as the dash ones.
    "X_Forwarded_For",
    "X_Forwarded_Proto",
    "X-Forwarded_Host",
    "X_Forwarded_Prefix",
    "X_Real_IP",
    "True_Client_IP",
    "X_Middleware_Subrequest",
];

/// A header name as CGI/WSGI-style stacks read it: lower case, `_` as `-`.
fn cgi_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// A raw request carrying each family header twice, once in the case given
/// and once upper-cased, plus headers that must pass.
fn family_request(path: &str) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n");
    for name in PROXY_SET_FAMILY {
        req += &format!("{name}: for=203.0.113.50;proto=https;host=evil.example\r\n");
        req += &format!("{}: 203.0.113.51\r\n", name.to_ascii_uppercase());
    }
    req += "X-Kept: yes\r\nRSC: 1\r\n\r\n";
    req.into_bytes()
}

#[test]
fn untrusted_peer_cannot_send_any_proxy_set_header() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).start();

    // The issue's input first, exactly.
    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(
        b"GET /spring HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\
          Forwarded: for=203.0.113.50;proto=https;host=evil.example\r\n\
          X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-Ssl: on\r\n\r\n",
    )
    .unwrap();
    let r = c.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/spring");
    for h in [
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-ssl",
    ] {
        assert!(
            seen.header(h).is_none(),
            "{h} reached the backend: {seen:?}"
        );
    }

    // Then the whole family, mixed case, repeated.
    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(&family_request("/family")).unwrap();
    let r = c.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/family");
    let ours = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "shop.example.com"),
    ];
    for name in PROXY_SET_FAMILY {
        let name = name.to_ascii_lowercase();
        match ours.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => assert_eq!(seen.header_all(&name), [*value], "{seen:?}"),
            None => assert!(
                seen.header(&name).is_none(),
                "{name} reached the backend: {seen:?}"
            ),
        }
    }
    // Read the way a CGI/WSGI backend reads names, only switchyard's own
    // members of the family are left, once each.
    let family: Vec<String> = PROXY_SET_FAMILY.iter().map(|n| cgi_name(n)).collect();
    for (name, value) in &seen.headers {
        if family.contains(&cgi_name(name)) {
            assert!(
                ours.contains(&(name.as_str(), value.as_str())),
                "{name}: {value} reached the backend: {seen:?}"
            );
        }
    }
    assert_eq!(seen.header("x-kept"), Some("yes"), "{seen:?}");
    assert_eq!(seen.header("rsc"), Some("1"), "{seen:?}");
}

/// `Proxy` (httpoxy) and the underscore spelling of a family member are
/// never set by a proxy, so they are removed even when a trusted load
/// balancer passes them on; the rest of its family still passes.
#[test]
fn proxy_and_underscore_spellings_never_reach_the_backend_from_any_peer() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let untrusted = ProxyBuilder::new(config(&blue, &green)).start();
    let trusted = ProxyBuilder::new(config(&blue, &green))
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start();
    let stripped = [
        "Proxy",
        "PROXY",
        "X_Forwarded_For",
        "X_Forwarded_Proto",
        "X-Forwarded_Host",
        "x_forwarded_port",
        "X_Real_IP",
        "True_Client_IP",
        "ssl_client_cert",
        "ssl_cipher",
        "X_SSL_Client_Cert",
        "X_Request_Id",
    ];
    for (proxy, path) in [
        (&untrusted, "/httpoxy-untrusted"),
        (&trusted, "/httpoxy-trusted"),
    ] {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\
             X-Forwarded-For: 198.51.100.7\r\nX-SSL-Client-Cert: from-the-lb\r\n\
             Client-Cert: :bGI=:\r\n"
        );
        for name in stripped {
            req += &format!("{name}: http://203.0.113.50:3128\r\n");
        }
        req += "\r\n";
        let mut c = RawConn::connect(&proxy.http_addr());
        c.send(req.as_bytes()).unwrap();
        let r = c.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let seen = only_request(&blue, path);
        for name in stripped {
            assert!(
                seen.header(name).is_none(),
                "{name} reached the backend on {path}: {seen:?}"
            );
        }
        assert_ne!(
            seen.header("x-request-id"),
            Some("http://203.0.113.50:3128"),
            "{seen:?}"
        );
        if path.ends_with("-trusted") {
            assert_eq!(single(&seen, "x-forwarded-for"), "198.51.100.7, 127.0.0.1");
            assert_eq!(single(&seen, "x-real-ip"), "198.51.100.7");
            assert_eq!(single(&seen, "x-ssl-client-cert"), "from-the-lb");
            assert_eq!(single(&seen, "client-cert"), ":bGI=:");
        } else {
            assert_eq!(single(&seen, "x-forwarded-for"), "127.0.0.1");
            assert!(seen.header("x-ssl-client-cert").is_none(), "{seen:?}");
            assert!(seen.header("client-cert").is_none(), "{seen:?}");
        }
    }
}

/// The issue's input: an empty `X-Forwarded-For:` from a trusted peer
/// reached the backend as `, 127.0.0.1`. Empty and blank elements are no
/// elements (RFC 9110 §5.6.1), in either list.
#[test]
fn empty_forwarding_lists_from_a_trusted_peer_make_no_empty_elements() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start();
    // (the request's header lines, X-Forwarded-For and Forwarded the
    // backend must see; None: absent)
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("X-Forwarded-For:\r\n", "127.0.0.1", None),
        ("X-Forwarded-For: \t \r\n", "127.0.0.1", None),
        ("X-Forwarded-For: ,\r\n", "127.0.0.1", None),
        ("X-Forwarded-For: , ,,\r\n", "127.0.0.1", None),
        (
            "X-Forwarded-For:\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: \r\n",
            "203.0.113.7, 127.0.0.1",
            None,
        ),
        (
            "X-Forwarded-For: ,203.0.113.7,, 10.1.2.3 ,\r\n",
            "203.0.113.7, 10.1.2.3, 127.0.0.1",
            None,
        ),
        ("Forwarded:\r\n", "127.0.0.1", None),
        ("Forwarded: , \r\nForwarded: \r\n", "127.0.0.1", None),
        (
            "Forwarded: for=203.0.113.7,\r\n",
            "127.0.0.1",
            Some("for=203.0.113.7, for=127.0.0.1"),
        ),
        (
            "Forwarded:\r\nForwarded: ,for=203.0.113.7;proto=https, ,\r\n",
            "127.0.0.1",
            Some("for=203.0.113.7;proto=https, for=127.0.0.1"),
        ),
    ];
    for (i, (lines, xff, forwarded)) in cases.iter().enumerate() {
        let path = format!("/empty-{i}");
        let mut c = RawConn::connect(&proxy.http_addr());
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n{lines}\r\n")
                .as_bytes(),
        )
        .unwrap();
        let r = c.read_response(Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200, "{lines:?}: {r:?}");
        let seen = only_request(&blue, &path);
        assert_eq!(single(&seen, "x-forwarded-for"), *xff, "{lines:?}");
        match forwarded {
            Some(f) => assert_eq!(single(&seen, "forwarded"), *f, "{lines:?}"),
            None => assert!(seen.header("forwarded").is_none(), "{lines:?}: {seen:?}"),
        }
        // The client is the entry left of the peer (none of them is trusted
        // here), or the peer when the list had none.
        let client = xff.rsplit(", ").nth(1).unwrap_or("127.0.0.1");
        assert_eq!(single(&seen, "x-real-ip"), client, "{lines:?}");
    }
}

#[test]
fn trusted_peer_keeps_the_family_and_its_chains_are_appended_to() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start();

    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(
        b"GET /lb HTTP/1.1\r\nHost: internal.example\r\nConnection: close\r\n\
          X-Forwarded-For: 6.6.6.6\r\nx-forwarded-for: 198.51.100.7\r\n\
          Forwarded: for=6.6.6.6\r\nFORWARDED: for=198.51.100.7;proto=https;host=shop.example.com\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example.com\r\n\
          X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /shop\r\nX-Forwarded-Ssl: on\r\n\
          X-Middleware-Subrequest: kept-from-the-lb\r\n\r\n",
    )
    .unwrap();
    let r = c.read_response(Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen = only_request(&blue, "/lb");
    // Both lines of the chain, in order, then the peer; the load balancer's
    // line is the right end, so the client is its address, not the first.
    assert_eq!(
        single(&seen, "x-forwarded-for"),
        "6.6.6.6, 198.51.100.7, 127.0.0.1"
    );
    assert_eq!(single(&seen, "x-real-ip"), "198.51.100.7");
    assert_eq!(
        single(&seen, "forwarded"),
        "for=6.6.6.6, for=198.51.100.7;proto=https;host=shop.example.com, for=127.0.0.1"
    );
    for (h, v) in [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example.com"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/shop"),
        ("x-forwarded-ssl", "on"),
        ("x-middleware-subrequest", "kept-from-the-lb"),
    ] {
        assert_eq!(single(&seen, h), v, "{seen:?}");
    }
    // switchyard never invents a Forwarded header of its own.
    let r = request("GET", &format!("{}/plain-lb", proxy.http_url()), &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(only_request(&blue, "/plain-lb")
        .header("forwarded")
        .is_none());
}
