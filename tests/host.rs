//! The host rule: every request names exactly one valid authority, routing
//! uses it whatever way the client named it, and the backend sees it as
//! `Host` and `X-Forwarded-Host` (RFC 9112 §3.2, §3.2.2; RFC 3986 §3.2.2).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

/// Makes every probe path unique, so an upstream's log shows whether this
/// very request got through.
static TAG: AtomicUsize = AtomicUsize::new(0);

/// `api` serves the routes of one host (`api.example.com` unless told),
/// whose `/secret` is denied; `web` serves the host-less ones.
struct Fixture {
    proxy: Proxy,
    api: Upstream,
    web: Upstream,
    _green: Upstream,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::for_host("api.example.com")
    }

    /// `host` as written in the config's routes.
    fn for_host(host: &str) -> Fixture {
        let api = Upstream::start("api");
        let web = Upstream::start("web");
        let green = Upstream::start("green");
        let mut cfg = service("api", &[&api], &[&green], "blue");
        cfg += &service("web", &[&web], &[&green], "blue");
        cfg += &route(Some(host), "/", "api");
        cfg += &deny_route(Some(host), "/secret");
        cfg += &route(None, "/", "web");
        let proxy = ProxyBuilder::new(cfg).start();
        Fixture {
            proxy,
            api,
            web,
            _green: green,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("/{name}-{}", TAG.fetch_add(1, Ordering::SeqCst))
    }

    /// Sends `head` (request line and headers, without the final empty
    /// line) and reads the response.
    fn send(&self, head: &[u8]) -> Reply {
        let mut c = RawConn::connect(&self.proxy.http_addr());
        let mut req = head.to_vec();
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        c.send(&req).unwrap();
        c.read_response(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(head)))
    }

    /// `GET <path> HTTP/1.1` with these `Host` header values (raw bytes).
    fn get_with_hosts(&self, path: &str, hosts: &[&[u8]]) -> Reply {
        let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        for h in hosts {
            head.extend_from_slice(b"Host: ");
            head.extend_from_slice(h);
            head.extend_from_slice(b"\r\n");
        }
        self.send(&head)
    }

    /// Asserts a 400 that reached neither backend.
    fn expect_400(&self, reply: &Reply, path: &str, what: &str) {
        assert_eq!(reply.status, 400, "{what}: {reply:?}");
        assert_eq!(
            self.api.received(path) + self.web.received(path),
            0,
            "{what} reached a backend"
        );
    }

    /// The one request `up` got on `path`.
    fn seen(&self, up: &Upstream, path: &str) -> SeenRequest {
        let reqs = up.requests_for(path);
        assert_eq!(reqs.len(), 1, "{path} on {}: {reqs:?}", up.label());
        reqs.into_iter().next().unwrap()
    }
}

#[test]
fn http11_without_exactly_one_valid_host_is_400_and_reaches_no_backend() {
    let f = Fixture::new();

    // The inputs: no Host, and an empty Host.
    let p = f.path("internal");
    let r = f.send(format!("GET {p} HTTP/1.1\r\n").as_bytes());
    f.expect_400(&r, &p, "no Host");
    let p = f.path("internal");
    let r = f.get_with_hosts(&p, &[b""]);
    f.expect_400(&r, &p, "empty Host");

    // Two Host lines, equal or not, and a comma-joined list.
    for hosts in [
        &[&b"api.example.com"[..], b"api.example.com"][..],
        &[b"api.example.com", b"other.example"],
        &[b"api.example.com, other.example"],
        &[b"api.example.com,api.example.com"],
    ] {
        let p = f.path("two");
        let r = f.get_with_hosts(&p, hosts);
        f.expect_400(&r, &p, &format!("Host {hosts:?}"));
    }
}

#[test]
fn every_invalid_host_class_is_400_never_the_hostless_routes() {
    let f = Fixture::new();
    let classes: &[(&str, &[u8])] = &[
        ("space", b"api.example.com evil"),
        ("leading space inside", b"a b"),
        ("userinfo", b"user@api.example.com"),
        ("userinfo with password", b"u:p@api.example.com"),
        ("slash", b"api.example.com/x"),
        ("backslash", b"api.example.com\\x"),
        ("percent", b"api%2eexample.com"),
        ("semicolon", b"api.example.com;x"),
        ("unbracketed IPv6", b"::1"),
        ("unbracketed IPv6 with port", b"2001:db8::1:80"),
        ("unclosed bracket", b"[::1"),
        ("junk after bracket", b"[::1]x"),
        ("zone id", b"[fe80::1%25eth0]"),
        ("IPvFuture", b"[v1.x]"),
        ("bad IPv6", b"[::g]"),
        ("non-digit port", b"api.example.com:http"),
        ("signed port", b"api.example.com:+80"),
        ("too large port", b"api.example.com:65536"),
        ("too long port", b"api.example.com:123456"),
        ("two colons", b"api.example.com:80:80"),
        ("empty label", b"api..example.com"),
        ("leading dot", b".api.example.com"),
        ("only a dot", b"."),
        ("over-long label", &[b'a'; 64]),
        ("control byte", b"api.example.com\x7f"),
        ("non-ASCII", "bücher.example".as_bytes()),
        ("IPv4 shorthand", b"127.1"),
        ("hex IPv4", b"0x7f.0.0.1"),
        ("decimal IPv4", b"2130706433"),
        ("octal-looking IPv4", b"0127.0.0.1"),
        ("numeric last label", b"api.example.123"),
        ("port only", b":80"),
        ("star", b"*"),
        ("port 0", b"api.example.com:0"),
        ("port 0, zero-padded", b"api.example.com:00000"),
        ("IPv6 with port 0", b"[::1]:0"),
        ("IPv4 with port 0", b"127.0.0.1:0"),
        ("IPv4-mapped IPv6", b"[::ffff:127.0.0.1]"),
        ("IPv4-mapped IPv6 in hex", b"[::ffff:7f00:1]"),
        ("IPv4-compatible IPv6", b"[::127.0.0.1]"),
        (
            "IPv4-compatible IPv6, long form",
            b"[0:0:0:0:0:0:127.0.0.1]",
        ),
        (
            "IPv4-mapped IPv6, long form",
            b"[0:0:0:0:0:FFFF:127.0.0.1]:80",
        ),
    ];
    for (what, host) in classes {
        let p = f.path("bad");
        let r = f.get_with_hosts(&p, &[host]);
        f.expect_400(&r, &p, what);
    }
    // A control byte Pingora's parser itself refuses is a 400 too.
    let p = f.path("bad");
    let r = f.get_with_hosts(&p, &[b"api.example.com\x01"]);
    f.expect_400(&r, &p, "NUL-class control byte");
}

#[test]
fn valid_hosts_are_routed_by_the_host_alone_and_sent_upstream_canonical() {
    let f = Fixture::new();
    // (Host sent, backend, Host and X-Forwarded-Host the backend sees)
    let cases: &[(&str, &str, &str)] = &[
        ("api.example.com", "api", "api.example.com"),
        ("API.Example.COM", "api", "api.example.com"),
        ("api.example.com.", "api", "api.example.com"),
        ("api.example.com:8443", "api", "api.example.com:8443"),
        ("api.example.com:", "api", "api.example.com"),
        ("API.example.com.:08443", "api", "api.example.com:8443"),
        ("other.example", "web", "other.example"),
        ("my_service-1", "web", "my_service-1"),
        ("127.0.0.1", "web", "127.0.0.1"),
        ("127.0.0.1:8080", "web", "127.0.0.1:8080"),
        ("[::1]", "web", "[::1]"),
        ("[2001:DB8::1]:80", "web", "[2001:db8::1]:80"),
        ("[::1]:", "web", "[::1]"),
        ("[0:0::1]:8080", "web", "[::1]:8080"),
        ("[2001:0DB8:0:0:0:0:0:1]", "web", "[2001:db8::1]"),
        ("127.0.0.1.", "web", "127.0.0.1"),
        ("api.example.com:00001", "api", "api.example.com:1"),
    ];
    for (host, backend, canonical) in cases {
        let p = f.path("ok");
        let r = f.get_with_hosts(&p, &[host.as_bytes()]);
        assert_eq!((r.status, r.body.as_str()), (200, *backend), "Host {host}");
        let up = if *backend == "api" { &f.api } else { &f.web };
        let seen = f.seen(up, &p);
        assert_eq!(seen.header_all("host"), [*canonical], "Host {host}");
        assert_eq!(
            seen.header_all("x-forwarded-host"),
            [*canonical],
            "Host {host}"
        );
    }
}

/// The input: a deny route on `[::1]` held only for that one
/// spelling; `[0:0::1]` and the like went to the host-less routes.
#[test]
fn every_spelling_of_an_ipv6_host_gets_that_hosts_routes_and_denies() {
    let spellings: &[(&str, &str)] = &[
        ("[::1]", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("[0:0:0:0:0:0:0:1]", "[::1]"),
        ("[::0:1]", "[::1]"),
        ("[0000::1]", "[::1]"),
        ("[::0001]", "[::1]"),
        ("[0::0:0:1]:8080", "[::1]:8080"),
        ("[0000:0000:0000:0000:0000:0000:0000:0001]:", "[::1]"),
    ];
    // The route host written canonically, and written another way (the
    // config canonicalises it the same way).
    for configured in ["[::1]", "[0:0:0:0:0:0:0:1]"] {
        let f = Fixture::for_host(configured);
        for (host, canonical) in spellings {
            let what = format!("route host {configured}, Host {host}");
            let p = format!("/secret{}", f.path("x"));
            let r = f.get_with_hosts(&p, &[host.as_bytes()]);
            assert_eq!(r.status, 404, "{what}: {r:?}");
            assert_eq!(
                f.api.received(&p) + f.web.received(&p),
                0,
                "{what}: the denied path reached a backend"
            );

            let p = f.path("open");
            let r = f.get_with_hosts(&p, &[host.as_bytes()]);
            assert_eq!((r.status, r.body.as_str()), (200, "api"), "{what}: {r:?}");
            let seen = f.seen(&f.api, &p);
            assert_eq!(seen.header_all("host"), [*canonical], "{what}");
            assert_eq!(seen.header_all("x-forwarded-host"), [*canonical], "{what}");
        }
        // Another IPv6 host is another host: the host-less routes.
        let p = f.path("other");
        let r = f.get_with_hosts(&p, &[b"[::2]"]);
        assert_eq!((r.status, r.body.as_str()), (200, "web"), "{r:?}");
    }
}

#[test]
fn absolute_form_target_names_the_authority_and_goes_upstream_in_origin_form() {
    let f = Fixture::new();

    let p = f.path("abs");
    let r = f.send(
        format!("GET http://api.example.com{p}?q=1 HTTP/1.1\r\nHost: api.example.com\r\n")
            .as_bytes(),
    );
    assert_eq!((r.status, r.body.as_str()), (200, "api"), "{r:?}");
    let seen = f.seen(&f.api, &p);
    assert_eq!(seen.path, format!("{p}?q=1"));
    assert_eq!(seen.header_all("host"), ["api.example.com"]);
    assert_eq!(seen.header_all("x-forwarded-host"), ["api.example.com"]);

    // Scheme and host are case-insensitive; the port is kept.
    let p = f.path("abs");
    let r = f.send(
        format!("GET HTTP://API.example.com:8080{p} HTTP/1.1\r\nHost: API.example.com:8080\r\n")
            .as_bytes(),
    );
    assert_eq!((r.status, r.body.as_str()), (200, "api"), "{r:?}");
    let seen = f.seen(&f.api, &p);
    assert_eq!(seen.path, p);
    assert_eq!(seen.header_all("host"), ["api.example.com:8080"]);

    // HTTP/1.0 may leave Host out: the target alone names the host.
    let p = f.path("abs10");
    let r = f.send(format!("GET http://api.example.com{p} HTTP/1.0\r\n").as_bytes());
    assert_eq!((r.status, r.body.as_str()), (200, "api"), "{r:?}");
    assert_eq!(f.seen(&f.api, &p).header_all("host"), ["api.example.com"]);

    // Refused: userinfo, another scheme, a bad authority, a target Host
    // disagrees with, an authority-form target, HTTP/1.1 without Host.
    let refused: &[(&str, String)] = &[
        (
            "userinfo",
            "GET http://u@api.example.com{p} HTTP/1.1\r\nHost: api.example.com\r\n".into(),
        ),
        (
            "password",
            "GET http://u:pw@api.example.com{p} HTTP/1.1\r\nHost: api.example.com\r\n".into(),
        ),
        (
            "ftp",
            "GET ftp://api.example.com{p} HTTP/1.1\r\nHost: api.example.com\r\n".into(),
        ),
        (
            "ws",
            "GET ws://api.example.com{p} HTTP/1.1\r\nHost: api.example.com\r\n".into(),
        ),
        (
            "bad authority",
            "GET http://api..example.com{p} HTTP/1.1\r\nHost: api..example.com\r\n".into(),
        ),
        (
            "bad port",
            "GET http://api.example.com:x{p} HTTP/1.1\r\nHost: api.example.com:x\r\n".into(),
        ),
        (
            "mismatch",
            "GET http://api.example.com{p} HTTP/1.1\r\nHost: other.example\r\n".into(),
        ),
        (
            "authority-form",
            "GET api.example.com:80 HTTP/1.1\r\nHost: api.example.com\r\n".into(),
        ),
        (
            "no Host",
            "GET http://api.example.com{p} HTTP/1.1\r\n".into(),
        ),
        (
            "port 0",
            "GET http://api.example.com:0{p} HTTP/1.1\r\nHost: api.example.com:0\r\n".into(),
        ),
        (
            "IPv4-mapped IPv6",
            "GET http://[::ffff:127.0.0.1]{p} HTTP/1.1\r\nHost: [::ffff:127.0.0.1]\r\n".into(),
        ),
    ];
    for (what, template) in refused {
        let p = f.path("absbad");
        let r = f.send(template.replace("{p}", &p).as_bytes());
        f.expect_400(&r, &p, what);
    }
}

#[test]
fn http10_without_host_uses_the_hostless_routes_with_an_empty_upstream_host() {
    let f = Fixture::new();
    let p = f.path("old");
    let r = f.send(format!("GET {p} HTTP/1.0\r\n").as_bytes());
    assert_eq!((r.status, r.body.as_str()), (200, "web"), "{r:?}");
    let seen = f.seen(&f.web, &p);
    assert_eq!(seen.header_all("host"), [""], "{seen:?}");
    assert!(seen.header("x-forwarded-host").is_none(), "{seen:?}");

    // With a Host it is routed by it like any other request; a bad one is 400.
    let p = f.path("old");
    let r = f.send(format!("GET {p} HTTP/1.0\r\nHost: API.example.com\r\n").as_bytes());
    assert_eq!((r.status, r.body.as_str()), (200, "api"), "{r:?}");
    let p = f.path("old");
    let r = f.send(format!("GET {p} HTTP/1.0\r\nHost: a..b\r\n").as_bytes());
    f.expect_400(&r, &p, "HTTP/1.0 with a bad Host");
}
