//! Host and path routing, deny routes and round-robin inside a pool.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;

/// Makes every 404 probe path unique.
static TAG: AtomicUsize = AtomicUsize::new(0);

/// One upstream per service (plus two for the round-robin pool) and a route
/// table that exercises every routing rule. Green pools get their own
/// upstreams so a wrong pool would show in the body too.
struct Fixture {
    proxy: Proxy,
    ups: Vec<Upstream>,
}

impl Fixture {
    fn new() -> Fixture {
        let names = [
            "web", "api", "v2", "fallback", "static", "only", "rr-1", "rr-2", "green",
        ];
        let ups: Vec<Upstream> = names
            .iter()
            .map(|n| Upstream::start(&format!("{n}-blue")))
            .collect();
        let u = |i: usize| &ups[i];
        let green = u(8);
        let mut cfg = String::new();
        cfg += &service("web", &[u(0)], &[green], "blue");
        cfg += &service("api", &[u(1)], &[green], "blue");
        cfg += &service("v2", &[u(2)], &[green], "blue");
        cfg += &service("fallback", &[u(3)], &[green], "blue");
        cfg += &service("static", &[u(4)], &[green], "blue");
        cfg += &service("only", &[u(5)], &[green], "blue");
        cfg += &service("rr", &[u(6), u(7)], &[green], "blue");

        cfg += &route(Some("api.example.com"), "/", "web");
        cfg += &route(Some("api.example.com"), "/api/", "api");
        cfg += &route(Some("api.example.com"), "/api/v2/", "v2");
        cfg += &deny_route(Some("api.example.com"), "/actuator");
        cfg += &route(None, "/", "fallback");
        cfg += &route(None, "/static/", "static");
        cfg += &route(Some("only.example.com"), "/only/", "only");
        cfg += &route(Some("rr.example.com"), "/", "rr");

        let proxy = ProxyBuilder::new(cfg).start();
        Fixture { proxy, ups }
    }

    /// Asserts `path` on `host` is answered 200 by the upstream `label`.
    fn expect(&self, host: &str, path: &str, label: &str) {
        let (code, body) = self.proxy.get(path, Some(host));
        assert_eq!(
            (code, body.as_str()),
            (200, label),
            "GET {path} with Host: {host}"
        );
    }

    /// Asserts `path` on `host` is answered 404 and reached no upstream.
    /// Each call tags the path with a unique query so the upstreams' logs
    /// show whether this very request got through.
    fn expect_404(&self, host: &str, path: &str) {
        let n = TAG.fetch_add(1, Ordering::SeqCst);
        let path = format!("{path}?probe404={n}");
        let path = path.as_str();
        let (code, body) = self.proxy.get(path, Some(host));
        assert_eq!(code, 404, "GET {path} with Host: {host} answered {body:?}");
        for u in &self.ups {
            assert_ne!(
                body,
                u.label(),
                "GET {path} with Host: {host}: 404 came from upstream"
            );
        }
        let reached: usize = self.ups.iter().map(|u| u.received(path)).sum();
        assert_eq!(
            reached, 0,
            "GET {path} with Host: {host} reached an upstream"
        );
    }
}

#[test]
fn host_match_is_exact_case_insensitive_and_ignores_port() {
    let f = Fixture::new();
    f.expect("api.example.com", "/api/users", "api-blue");
    f.expect("API.Example.COM", "/api/users", "api-blue");
    f.expect("api.example.com:8080", "/api/users", "api-blue");
    f.expect("Api.Example.Com:443", "/api/users", "api-blue");
    // Exact match only: neither a suffix nor a prefix of the name matches,
    // so these fall to the host-less routes.
    f.expect("xapi.example.com", "/api/users", "fallback-blue");
    f.expect("api.example.com.evil", "/api/users", "fallback-blue");
    f.expect("example.com", "/api/users", "fallback-blue");
}

#[test]
fn longest_prefix_wins() {
    let f = Fixture::new();
    f.expect("api.example.com", "/api/v2/items", "v2-blue");
    f.expect("api.example.com", "/api/v2/", "v2-blue");
    f.expect("api.example.com", "/api/v1/items", "api-blue");
    f.expect("api.example.com", "/api/", "api-blue");
    // "/api" is not under the "/api/" prefix.
    f.expect("api.example.com", "/api", "web-blue");
    f.expect("api.example.com", "/", "web-blue");
    f.expect("api.example.com", "/index.html", "web-blue");
    // The upstream receives the original path and query.
    f.expect("api.example.com", "/api/v2/items?x=1", "v2-blue");
    let seen = f.ups[2].last_request().expect("v2 saw a request");
    assert_eq!(seen.path, "/api/v2/items?x=1");
}

#[test]
fn hostless_routes_apply_only_to_hosts_without_routes() {
    let f = Fixture::new();
    // Unknown host: host-less table, longest prefix.
    f.expect("unknown.example.com", "/static/app.js", "static-blue");
    f.expect("unknown.example.com", "/anything", "fallback-blue");
    f.expect("127.0.0.1", "/static/", "static-blue");
    // A host with routes never falls back to the host-less ones, even when
    // its own routes do not match...
    f.expect("api.example.com", "/static/app.js", "web-blue");
    f.expect("only.example.com", "/only/x", "only-blue");
    // ...so this is a 404 although host-less "/" would match.
    f.expect_404("only.example.com", "/static/app.js");
}

#[test]
fn deny_route_is_answered_404_by_the_proxy() {
    let f = Fixture::new();
    f.expect_404("api.example.com", "/actuator");
    f.expect_404("api.example.com", "/actuator/health");
    f.expect_404("API.EXAMPLE.COM:9000", "/actuator/env");
    // Deny is host-specific: elsewhere the host-less table applies.
    f.expect("other.example.com", "/actuator/health", "fallback-blue");
    for u in &f.ups {
        assert!(
            u.seen()
                .iter()
                .all(|r| !r.path.starts_with("/actuator") || u.label() == "fallback-blue"),
            "{} received a denied path: {:?}",
            u.label(),
            u.seen()
        );
    }
}

#[test]
fn no_matching_route_is_404() {
    let f = Fixture::new();
    f.expect_404("only.example.com", "/");
    f.expect_404("only.example.com", "/onl");
    f.expect_404("only.example.com", "/other/only/");
}

#[test]
fn round_robin_uses_every_backend_of_the_pool() {
    let f = Fixture::new();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..20 {
        let (code, body) = f.proxy.get("/rr", Some("rr.example.com"));
        assert_eq!(code, 200, "body {body:?}");
        *counts.entry(body).or_insert(0usize) += 1;
    }
    let one = counts.get("rr-1-blue").copied().unwrap_or(0);
    let two = counts.get("rr-2-blue").copied().unwrap_or(0);
    assert_eq!(one + two, 20, "responses from outside the pool: {counts:?}");
    // Round-robin over sequential requests splits them (nearly) evenly.
    assert!(
        one.abs_diff(two) <= 2,
        "uneven round-robin split: {counts:?}"
    );
    assert_eq!(
        f.ups[8].received("/rr"),
        0,
        "inactive green pool got traffic"
    );
}
