//! The path rule end to end: a denied path cannot be reached by any spelling
//! a backend would resolve to it (path parameters, escapes, dot segments),
//! ambiguous paths are refused with 400 before any backend sees them,
//! harmless look-alikes pass unchanged, and `*` patterns route the settlement
//! stream exactly, with its own read timeout.

mod common;

use std::fs;

use common::*;

const HOST: &str = "api.example.com";

/// One upstream per service so the body names the route that was chosen.
struct Fixture {
    proxy: Proxy,
    ups: Vec<Upstream>,
}

impl Fixture {
    fn new() -> Fixture {
        let names = ["web", "api", "stream", "public", "green"];
        let ups: Vec<Upstream> = names.iter().map(|n| Upstream::start(n)).collect();
        let green = &ups[4];
        let mut cfg = String::new();
        for (i, name) in names[..4].iter().enumerate() {
            cfg += &service(name, &[&ups[i]], &[green], "blue");
        }
        let h = Some(HOST);
        cfg += &route(h, "/", "web");
        cfg += &route(h, "/api/", "api");
        cfg += "read_timeout = \"500ms\"\n\n";
        cfg += &route(h, "/api/v1/meetings/*/settlement/progress/stream", "stream");
        cfg += "read_timeout = \"10s\"\n\n";
        cfg += &route(h, "/api/public/", "public");
        cfg += &deny_route(h, "/api/*/internal/");
        cfg += &deny_route(h, "/actuator");
        cfg += &deny_route(h, "/webjars/");
        let proxy = ProxyBuilder::new(cfg).start();
        Fixture { proxy, ups }
    }

    /// Sends `GET target` byte for byte (no client library rewrites it).
    fn raw_get(&self, target: &str) -> (u16, String) {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        raw_http(&self.proxy.http_addr(), request.as_bytes())
    }

    fn traffic(&self) -> usize {
        self.ups.iter().map(Upstream::traffic).sum()
    }

    /// Asserts `target` is refused by the proxy (400, or 404 for a path that
    /// normalizes into a deny route) and reaches no backend.
    fn expect_refused(&self, target: &str) {
        let before = self.traffic();
        let (code, body) = self.raw_get(target);
        assert!(
            code == 400 || code == 404,
            "GET {target}: {code} {body:?}, expected 400 or 404"
        );
        assert!(
            !self.ups.iter().any(|u| body == u.label()),
            "GET {target}: the answer came from a backend: {body:?}"
        );
        assert_eq!(self.traffic(), before, "GET {target} reached a backend");
    }

    /// Asserts `target` is answered by the upstream `label`, which received
    /// the request target unchanged.
    fn expect_served(&self, target: &str, label: &str) {
        let (code, body) = self.raw_get(target);
        assert_eq!((code, body.as_str()), (200, label), "GET {target}");
        let up = self.ups.iter().find(|u| u.label() == label).unwrap();
        let seen = up.last_request().expect("the upstream saw the request");
        assert_eq!(seen.path, target, "forwarded target changed");
    }
}

#[test]
fn the_issue_inputs_are_refused_before_any_backend() {
    let f = Fixture::new();
    for target in [
        "/api/..;/actuator/env",
        "/api/..;jsessionid=x/actuator/env",
        "/api/%2e%2e;/actuator/env",
        "/api/v1/..;/..;/actuator/env",
    ] {
        let (code, _) = f.raw_get(target);
        assert_eq!(code, 400, "GET {target}");
        f.expect_refused(target);
    }
    // The same paths in absolute form (RFC 9112 §3.2.2) are read the same way.
    for path in [
        "/api/..;/actuator/env",
        "/api/%2e%2e;/actuator/env",
        "/actuator;x/env",
    ] {
        f.expect_refused(&format!("http://{HOST}{path}"));
    }
    // The control case is still denied (404) after resolving `..`.
    let (code, _) = f.raw_get("/api/../actuator/env");
    assert_eq!(code, 404);
    f.expect_refused("/api/../actuator/env");
}

/// Every spelling of a dot segment other than a plain `.`/`..`: encoded,
/// mixed case, with parameters (raw or `%3b`), at the start, middle and end,
/// with repeated and trailing slashes.
#[test]
fn every_dot_segment_spelling_is_refused() {
    let f = Fixture::new();
    let dots = [
        "..;", "..;x", "..;a=b;c", ".;", ".;x", "%2e%2e", "%2E%2E", "%2e%2E", ".%2e", "%2E.",
        "%2e", "%2E", "%2e%2e;", "%2e%2e;x", "..%3b", "..%3Bx", "%2e%3b", ".%3b",
    ];
    for dot in dots {
        for target in [
            format!("/{dot}/actuator/env"),
            format!("/api/{dot}/actuator/env"),
            format!("/api/v1/{dot}/{dot}/actuator"),
            format!("/api//{dot}//webjars/x.js"),
            format!("/api/{dot}"),
            format!("/api/{dot}/"),
            format!("/api/public/{dot}"),
            format!("/api/public/x/{dot}//"),
        ] {
            let (code, body) = f.raw_get(&target);
            assert_eq!(code, 400, "GET {target}: {body:?}");
            f.expect_refused(&target);
        }
    }
}

#[test]
fn parameters_and_escapes_cannot_reach_a_denied_prefix() {
    let f = Fixture::new();
    for target in [
        // Tomcat serves /actuator/env and /webjars/x.js for these.
        "/actuator;x/env",
        "/actuator;jsessionid=1",
        "/webjars;x/x.js",
        "/webjars%3bx/x.js",
        "/%61ctuator/env",
        "//actuator",
        "/api/x/../../actuator",
        "/api/v1/./../../webjars/x",
        // `..` after an empty segment climbs differently per backend.
        "/api//../actuator",
        "/api/;x/../actuator",
        // Encoded separators, backslashes, control bytes.
        "/api%2f..%2factuator",
        "/api/x%2F..%2F..%2Factuator",
        "/api%5c..%5cactuator",
        "/api/..%5c..%5cactuator",
        "/api/\\..\\..\\actuator",
        "/api/..%00/actuator",
        "/api/%0d%0a",
        "/api/%7f",
        // Double encoding, malformed and overlong escapes.
        "/api/%252e%252e/actuator",
        "/api/%252e%252e%252factuator",
        "/api/%255c",
        "/api/%253b",
        "/api/%2500",
        "/api/%%32%65%%32%65/actuator",
        "/api/%c0%ae%c0%ae/actuator",
        "/api/%c0%af",
        "/api/%",
        "/api/%zz",
        // Above the root.
        "/..",
        "/../actuator",
        "/api/../../actuator",
        // The deny patterns and prefixes themselves.
        "/api/v9/internal/x",
        "/api/v9/internal;x/x",
        "/api/v9/%69nternal/x",
    ] {
        f.expect_refused(target);
    }
}

#[test]
fn look_alikes_are_forwarded_unchanged() {
    let f = Fixture::new();
    for target in [
        "/api/v1/a..b",
        "/api/;x",
        "/api/x;jsessionid=1",
        "/api/...",
        "/api/..x",
        "/api/x..",
        "/api/.well-known",
        "/api/%2e%2ex",
        "/api/100%25",
        "/api/a%20b",
        "/api/%E2%82%AC",
        "/api/./v1",
        "/api/v1/../v2?q=..;/actuator",
        "/api/actuator",
    ] {
        f.expect_served(target, "api");
    }
    f.expect_served("/api/public/internal/x", "public");
    f.expect_served("/actuato", "web");
}

/// The settlement stream route is chosen for the exact pattern only, and
/// carries its own read timeout: its sibling paths fall back to "/api/",
/// whose 500 ms read timeout cuts a backend that takes 1.5 s.
#[test]
fn pattern_route_gets_its_own_read_timeout_and_siblings_do_not() {
    let f = Fixture::new();
    for id in ["42", "a-b_c", "7;x"] {
        let target = format!("/api/v1/meetings/{id}/settlement/progress/stream?delay_ms=1500");
        let (code, body) = f.raw_get(&target);
        assert_eq!((code, body.as_str()), (200, "stream"), "GET {target}");
    }
    for target in [
        "/api/v1/meetings/42/settlement?delay_ms=1500",
        "/api/v1/meetings/42/settlement/progress?delay_ms=1500",
        "/api/v1/meetings/settlement/progress/stream?delay_ms=1500",
        "/api/v1/meetings/4/2/settlement/progress/stream?delay_ms=1500",
    ] {
        let (code, body) = f.raw_get(target);
        assert_eq!(code, 504, "GET {target}: {body:?}");
    }
    // Without a delay the siblings reach the api service, not the stream one.
    f.expect_served("/api/v1/meetings/42/settlement", "api");
    f.expect_served("/api/v1/meetings//settlement/progress/stream", "api");
    assert_eq!(
        f.ups[2]
            .requests_for("/api/v1/meetings/42/settlement?")
            .len(),
        0
    );
}

/// Segment by segment a literal beats `*`: "/api/public/" wins over the deny
/// pattern "/api/*/internal/", which wins over "/api/".
#[test]
fn literal_beats_star_and_star_beats_a_shorter_prefix() {
    let f = Fixture::new();
    f.expect_served("/api/public/internal/x", "public");
    f.expect_refused("/api/v1/internal/x");
    f.expect_served("/api/v1/internals", "api");
    f.expect_served("/api/v1/x/internal/", "api");
}

/// `check` points at a misplaced `*` and at route paths that could never
/// match, with the file, line and column.
#[test]
fn check_rejects_partial_stars_and_unmatchable_route_paths() {
    let dir = tempfile::tempdir().unwrap();
    let up = "127.0.0.1:18090";
    let mut text = format!(
        "[listen]\nhttp = \"127.0.0.1:18080\"\n\n[services.api]\nblue = [\"{up}\"]\ngreen = [\"{up}\"]\n\n"
    );
    let bad = [
        ("/api/v*/stream", "whole segment"),
        ("/api/**/x", "whole segment"),
        ("/api/*x", "whole segment"),
        ("/api/%2e%2e/x", "never match"),
        ("/api;x/", "never match"),
        ("/api//x", "never match"),
        ("/api/../x", "never match"),
    ];
    for (path, _) in bad {
        text += &format!(
            "[[routes]]\npath = {}\nservice = \"api\"\n\n",
            toml_str(path)
        );
    }
    text += "[[routes]]\npath = \"/api/*/ok/*\"\nservice = \"api\"\n";
    let file = dir.path().join("bad.toml");
    fs::write(&file, &text).unwrap();
    let out = run_check(&file, Some(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (path, words) in bad {
        let needle = format!("path = {}", toml_str(path));
        let line = text.lines().position(|l| l == needle).unwrap() + 1;
        let col = "path = ".len() + 1;
        let located = format!("{}:{line}:{col}: ", file.display());
        let hit = stderr
            .lines()
            .find(|l| l.starts_with(&located))
            .unwrap_or_else(|| panic!("no error at {located} for {path}:\n{stderr}"));
        assert!(hit.contains(words), "{hit}");
    }
    assert_eq!(
        stderr.lines().filter(|l| l.contains("route path")).count(),
        bad.len(),
        "{stderr}"
    );
}
