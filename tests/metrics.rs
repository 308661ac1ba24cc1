//! The metrics listener (`[listen] metrics`): every family of the names
//! contract exported from start-up with zero-valued series, values that
//! move as a scripted set of requests, switches, health changes and
//! refusals says they should, `/healthz`, `/readyz`, `/status`, and
//! `promtool check metrics` on the output.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::tls::{exchange, get_request, tls_connect};
use common::*;

/// How long a value may take to show (health probes every 200 ms, rise
/// and fall 2) including a slow start.
const WAIT: Duration = Duration::from_secs(10);

/// Every family of the names contract (`README.md`, "Metrics") and its type.
const FAMILIES: [(&str, &str); 22] = [
    ("switchyard_build_info", "gauge"),
    ("switchyard_config_reloads_total", "counter"),
    ("switchyard_requests_total", "counter"),
    ("switchyard_request_duration_seconds", "histogram"),
    ("switchyard_upstream_errors_total", "counter"),
    ("switchyard_received_bytes_total", "counter"),
    ("switchyard_sent_bytes_total", "counter"),
    ("switchyard_active_color", "gauge"),
    ("switchyard_switches_total", "counter"),
    ("switchyard_maintenance", "gauge"),
    ("switchyard_backend_up", "gauge"),
    ("switchyard_in_flight_requests", "gauge"),
    ("switchyard_upgraded_connections", "gauge"),
    ("switchyard_refusals_total", "counter"),
    ("switchyard_limit_admissions_total", "counter"),
    ("switchyard_limit_refusals_total", "counter"),
    ("switchyard_concurrency_in_flight", "gauge"),
    ("switchyard_concurrency_queue_depth", "gauge"),
    ("switchyard_tokens_total", "counter"),
    ("switchyard_service_tokens_total", "counter"),
    ("switchyard_certificate_not_after_seconds", "gauge"),
    ("switchyard_certificate_renewal_failures_total", "counter"),
];

/// One scrape: the text, and each series (`name`, labels) with its value.
struct Scrape {
    text: String,
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut series = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = line.rsplit_once(' ').expect("series line has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let mut map = BTreeMap::new();
            // Label values in these tests hold no `,` or `"`.
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label pair");
                map.insert(k.to_string(), v.trim_matches('"').to_string());
            }
            series.push((name.to_string(), map, value));
        }
        Scrape { text, series }
    }

    /// Sum of the series of `name` carrying every label of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// How many series of `name` carry every label of `labels`.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .count()
    }
}

fn scrape(proxy: &Proxy) -> Scrape {
    let r = request(
        "GET",
        &format!("{}/metrics", proxy.metrics_url()),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    Scrape::parse(r.body)
}

/// A scrape once `n` requests have been observed. A request is counted in
/// the proxy's `logging` phase, after its answer went out, so a client can
/// see the answer a moment before the count. `requests_total` is the last
/// family the observer updates, but one scrape reads the families one after
/// the other (in name order: `refusals_total` before `requests_total`), so
/// an observation can land between them: once the count is reached, a
/// second scrape sees every family of those requests.
fn observed(proxy: &Proxy, n: usize) -> Scrape {
    let mut last = None;
    let done = poll_until(WAIT, || {
        let m = scrape(proxy);
        let seen = m.sum("switchyard_requests_total", &[]);
        let enough = seen >= n as f64;
        last = Some(m);
        enough
    });
    let m = last.expect("scraped at least once");
    assert!(done, "fewer than {n} requests observed:\n{}", m.text);
    scrape(proxy)
}

/// `promtool check metrics` on `text`; a missing promtool fails the test.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install it (Debian package `prometheus`; `.ci/setup` does)"
        ),
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = text.to_string();
    let writer = thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(input.as_bytes())
    });
    let out = wait_output_with_deadline(child, WAIT, "promtool check metrics");
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}\n--- output ---\n{}",
        describe(&out),
        text
    );
}

/// A self-signed certificate for `api.test`, as `[tls]` tables, and a
/// client that trusts it.
fn tls_tables(dir: &std::path::Path) -> (String, Arc<rustls::ClientConfig>) {
    let (site, der) = common::tls::self_signed_site(dir, "api.test");
    let client = common::tls::trusting(der, &[]);
    let tables = format!("[tls]\nhandshake_timeout = \"300ms\"\n{site}");
    (tables, client)
}

/// Service `api` (blue, green), `/` proxied, `/private/` denied, `/limited/`
/// under a rate limit, `/gpu/` under a concurrency cap, `/v1/` under a token
/// budget; `extra` more tables.
fn full_config(blue: &Upstream, green: &Upstream, extra: &str) -> String {
    let mut s = service_with("api", &[blue], &[green], "blue", extra);
    s.push_str("[rate_limits.per_ip]\nrate = \"1/m\"\n\n");
    s.push_str("[concurrency.gpu]\nmax_in_flight = 1\nqueue = 0\n\n");
    s.push_str("[token_budgets.ai]\ntokens_per_minute = 6000\n\n");
    s.push_str(&route(Some("api.test"), "/", "api"));
    s.push_str(&deny_route(Some("api.test"), "/private/"));
    s.push_str(&route_with(
        "/limited/",
        "api",
        "rate_limit = \"per_ip\"\nmax_body = \"1KiB\"",
    ));
    s.push_str(&route_with("/gpu/", "api", "concurrency = \"gpu\""));
    s.push_str(&route_with("/v1/", "api", "token_budget = \"ai\""));
    s.push_str(&route_with("/ws/", "api", "websocket = true"));
    s.push_str(&route_with("/slow/", "api", "read_timeout = \"300ms\""));
    s
}

#[test]
fn every_family_is_exported_from_start_with_zero_series() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let (tls, client) = tls_tables(dir.path());
    let proxy = ProxyBuilder::new(full_config(&blue, &green, ""))
        .https(&tls)
        .metrics()
        .start();
    let m = scrape(&proxy);
    for (name, kind) in FAMILIES {
        assert!(
            m.text.contains(&format!("# TYPE {name} {kind}\n")),
            "no {kind} {name}:\n{}",
            m.text
        );
        // A histogram's series are counted through its `_count`.
        let series_name = match kind {
            "histogram" => format!("{name}_count"),
            _ => name.to_string(),
        };
        assert!(
            m.count(&series_name, &[]) > 0,
            "no series of {name}:\n{}",
            m.text
        );
    }
    // A zero series for each service, color, route and status class.
    for color in ["blue", "green"] {
        for route in ["api.test/", "*/limited/", "*/gpu/", "*/v1/"] {
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                let labels = [
                    ("service", "api"),
                    ("color", color),
                    ("route", route),
                    ("status_class", class),
                ];
                assert_eq!(
                    m.count("switchyard_requests_total", &labels),
                    1,
                    "{labels:?}"
                );
            }
        }
        for kind in ["connect", "timeout", "reset", "other"] {
            let labels = [("service", "api"), ("color", color), ("kind", kind)];
            assert_eq!(m.count("switchyard_upstream_errors_total", &labels), 1);
        }
    }
    let deny = [("service", "none"), ("route", "api.test/private/")];
    assert_eq!(m.count("switchyard_requests_total", &deny), 5);
    let none = [("service", "none"), ("route", "none"), ("color", "none")];
    assert_eq!(m.count("switchyard_requests_total", &none), 5);
    for reason in [
        "no_route",
        "deny",
        "bad_request",
        "body_too_large",
        "header_too_large",
        "rate_limited",
        "busy",
        "tokens_exhausted",
        "invalid_completion",
        "maintenance",
        "no_healthy_backend",
        "upstream_error",
        "upstream_timeout",
        "client_error",
        "slow_client",
    ] {
        assert_eq!(
            m.count("switchyard_refusals_total", &[("reason", reason)]),
            1,
            "{reason}"
        );
    }
    for cause in ["switch", "forced", "rollback"] {
        assert_eq!(m.count("switchyard_switches_total", &[("cause", cause)]), 1);
    }
    for (kind, limit) in [
        ("rate_limit", "per_ip"),
        ("concurrency", "gpu"),
        ("token_budget", "ai"),
    ] {
        let labels = [("kind", kind), ("limit", limit)];
        assert_eq!(m.count("switchyard_limit_admissions_total", &labels), 1);
        assert!(m.count("switchyard_limit_refusals_total", &labels) >= 1);
    }
    for outcome in ["reserved", "settled", "refunded", "kept"] {
        let budget = [("budget", "ai"), ("outcome", outcome)];
        assert_eq!(m.count("switchyard_tokens_total", &budget), 1);
        let service = [("service", "api"), ("outcome", outcome)];
        assert_eq!(m.count("switchyard_service_tokens_total", &service), 1);
    }
    // Nothing happened yet: every counter is zero.
    for (name, labels, value) in &m.series {
        if name.ends_with("_total") || name.ends_with("_count") {
            assert_eq!(*value, 0.0, "{name}{labels:?}");
        }
    }
    assert_eq!(m.sum("switchyard_active_color", &[("color", "blue")]), 1.0);
    assert_eq!(m.sum("switchyard_active_color", &[("color", "green")]), 0.0);
    let (blue_addr, green_addr) = (blue.addr(), green.addr());
    let blue_up = [("color", "blue"), ("backend", blue_addr.as_str())];
    assert_eq!(m.sum("switchyard_backend_up", &blue_up), 1.0);
    let green_up = [("color", "green"), ("backend", green_addr.as_str())];
    assert_eq!(m.sum("switchyard_backend_up", &green_up), 1.0);
    let not_after = m.sum(
        "switchyard_certificate_not_after_seconds",
        &[("certificate", "site")],
    );
    assert!(not_after > 1.7e9, "{not_after}");
    let build = m
        .series
        .iter()
        .find(|(n, _, _)| n == "switchyard_build_info");
    let (_, labels, value) = build.expect("build_info");
    assert_eq!(*value, 1.0);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!labels["commit"].is_empty(), "{labels:?}");
    promtool_check(&m.text);

    let out = run_check(proxy.config_path(), None);
    let said = String::from_utf8_lossy(&out.stdout);
    let expected = format!("metrics listener: {}/metrics", proxy.metrics_url());
    assert!(said.contains(&expected), "{}", describe(&out));

    // The HTTPS listener's requests are counted too.
    let mut conn = tls_connect(&proxy.https_addr(), "api.test", client);
    let answer = exchange(&mut conn, &get_request("api.test", "/a"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let ok = [
        ("color", "blue"),
        ("route", "api.test/"),
        ("status_class", "2xx"),
    ];
    // Polled on its own series: the readiness probes' connections may be
    // recorded around it on a loaded machine.
    let counted = poll_until(WAIT, || {
        scrape(&proxy).sum("switchyard_requests_total", &ok) == 1.0
    });
    assert!(counted, "{}", scrape(&proxy).text);

    // A client that never finishes its TLS handshake: one slow_client.
    let mut silent = RawConn::connect(&proxy.https_addr());
    assert!(silent.wait_closed(WAIT).is_some(), "handshake not cut");
    let slow = [("reason", "slow_client")];
    assert_eq!(scrape(&proxy).sum("switchyard_refusals_total", &slow), 1.0);
}

#[test]
fn requests_switches_and_upstream_errors_move_their_series() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(full_config(&blue, &green, ""))
        .metrics()
        .start();
    let url = proxy.http_url();
    let host = [("Host", "api.test")];
    for _ in 0..3 {
        assert_eq!(request("GET", &format!("{url}/a"), &host, None).status, 200);
    }
    let body = vec![b'x'; 100];
    assert_eq!(
        request("POST", &format!("{url}/a"), &host, Some(&body)).status,
        200
    );
    let m = observed(&proxy, 4);
    let blue_ok = [
        ("service", "api"),
        ("color", "blue"),
        ("route", "api.test/"),
        ("status_class", "2xx"),
    ];
    assert_eq!(m.sum("switchyard_requests_total", &blue_ok), 4.0);
    let blue_time = [("service", "api"), ("color", "blue")];
    assert_eq!(
        m.sum("switchyard_request_duration_seconds_count", &blue_time),
        4.0
    );
    assert_eq!(
        m.sum("switchyard_received_bytes_total", &[("service", "api")]),
        100.0
    );
    // Each answer's body is the upstream's label, "blue".
    assert_eq!(
        m.sum("switchyard_sent_bytes_total", &[("service", "api")]),
        16.0
    );

    // An open WebSocket: in flight and upgraded on blue until it closes.
    let ws = ws_connect(&proxy.http_addr(), "/ws/echo").expect("websocket");
    let blue_pool = [("service", "api"), ("color", "blue")];
    let m = scrape(&proxy);
    assert_eq!(m.sum("switchyard_upgraded_connections", &blue_pool), 1.0);
    assert_eq!(m.sum("switchyard_in_flight_requests", &blue_pool), 1.0);
    ws_close(ws);
    assert!(
        poll_until(WAIT, || {
            scrape(&proxy).sum("switchyard_upgraded_connections", &blue_pool) == 0.0
        }),
        "upgraded connection still counted after close"
    );

    // A switch shows as a step of active_color and one switches_total.
    proxy.switch("api", "green", None);
    let m = scrape(&proxy);
    assert_eq!(m.sum("switchyard_active_color", &[("color", "green")]), 1.0);
    assert_eq!(m.sum("switchyard_active_color", &[("color", "blue")]), 0.0);
    assert_eq!(
        m.sum("switchyard_switches_total", &[("cause", "switch")]),
        1.0
    );
    assert_eq!(request("GET", &format!("{url}/b"), &host, None).status, 200);
    let green_ok = [("color", "green"), ("status_class", "2xx")];
    assert_eq!(m.sum("switchyard_requests_total", &green_ok), 0.0);
    // 4, the WebSocket's 101 (counted when it closed), this one.
    let m = observed(&proxy, 6);
    assert_eq!(m.sum("switchyard_requests_total", &green_ok), 1.0);
    // The WebSocket's open time is not request latency: not in the histogram.
    assert_eq!(
        m.sum("switchyard_request_duration_seconds_count", &blue_time),
        4.0
    );

    // Rolled back, then forced: each counted under its cause.
    let (code, v) = proxy.admin("POST", "/services/api/rollback", Some("{}"));
    assert_eq!(code, 200, "{v}");
    let forced = r#"{"to": "green", "force": true}"#;
    let (code, v) = proxy.admin("POST", "/services/api/switch", Some(forced));
    assert_eq!(code, 200, "{v}");
    let m = scrape(&proxy);
    assert_eq!(
        m.sum("switchyard_switches_total", &[("cause", "rollback")]),
        1.0
    );
    assert_eq!(
        m.sum("switchyard_switches_total", &[("cause", "forced")]),
        1.0
    );
    assert_eq!(
        m.sum("switchyard_switches_total", &[("cause", "switch")]),
        1.0
    );

    // A backend slower than the route's read_timeout: a timeout and a 504.
    let r = request("GET", &format!("{url}/slow/x?delay_ms=2000"), &[], None);
    assert_eq!(r.status, 504, "{}", r.body);
    let m = observed(&proxy, 7);
    let timeout = [("color", "green"), ("kind", "timeout")];
    assert_eq!(m.sum("switchyard_upstream_errors_total", &timeout), 1.0);
    assert_eq!(
        m.sum(
            "switchyard_refusals_total",
            &[("reason", "upstream_timeout")]
        ),
        1.0
    );

    // Green's only backend gone: a connect error and a 502.
    let mut green = green;
    green.stop();
    let r = request("GET", &format!("{url}/c"), &host, None);
    assert_eq!(r.status, 502, "{}", r.body);
    let m = observed(&proxy, 8);
    let connect = [("color", "green"), ("kind", "connect")];
    assert_eq!(m.sum("switchyard_upstream_errors_total", &connect), 1.0);
    let green_5xx = [
        ("color", "green"),
        ("route", "api.test/"),
        ("status_class", "5xx"),
    ];
    assert_eq!(m.sum("switchyard_requests_total", &green_5xx), 1.0);
    assert_eq!(
        m.sum("switchyard_refusals_total", &[("reason", "upstream_error")]),
        1.0
    );
    promtool_check(&m.text);
}

#[test]
fn every_kind_of_refusal_is_counted_by_reason() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(full_config(&blue, &green, ""))
        .server("header_timeout = \"500ms\"\nmax_header_size = \"2KiB\"")
        .metrics()
        .start();
    let url = proxy.http_url();
    let get = |path: &str, host: &str, headers: &[(&str, &str)]| {
        let mut h = vec![("Host", host)];
        h.extend_from_slice(headers);
        request("GET", &format!("{url}{path}"), &h, None).status
    };
    assert_eq!(get("/private/x", "api.test", &[]), 404); // deny
    assert_eq!(get("/nothing", "nowhere.test", &[]), 404); // no route
                                                           // A WebSocket upgrade on a route without `websocket = true`.
    let refused = ws_connect(&proxy.http_addr(), "/gpu/ws").map(|_| ());
    assert_eq!(refused.map_err(|(status, _)| status), Err(400));
    let big = "x".repeat(3000);
    assert_eq!(get("/a", "api.test", &[("X-Big", &big)]), 431);
    let r = request(
        "POST",
        &format!("{url}/limited/x"),
        &[("Host", "x.test")],
        Some(&[b'y'; 2000]),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(get("/limited/x", "x.test", &[]), 200);
    assert_eq!(get("/limited/x", "x.test", &[]), 429);

    // A completion the token budget cannot read: 400 before any reservation.
    let r = request(
        "POST",
        &format!("{url}/v1/chat/completions"),
        &[("Content-Type", "application/json")],
        Some(b"not json"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // 4000 tokens reserved of a 6000-token bucket: the next one does not fit.
    let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4000}"#;
    let post_chat = || {
        let json = [("Content-Type", "application/json")];
        request(
            "POST",
            &format!("{url}/v1/chat/completions"),
            &json,
            Some(chat),
        )
    };
    assert_eq!(post_chat().status, 200);
    let r = post_chat();
    assert_eq!(r.status, 429, "{}", r.body);

    // Busy: the cap's one slot held, no queue.
    let holder = {
        let url = url.clone();
        thread::spawn(move || request("GET", &format!("{url}/gpu/hold?hold=1"), &[], None))
    };
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    assert_eq!(get("/gpu/x", "x.test", &[]), 503);
    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);

    // Maintenance.
    let (code, v) = proxy.admin("POST", "/services/api/maintenance", Some(r#"{"on": true}"#));
    assert_eq!(code, 200, "{v}");
    assert_eq!(get("/a", "api.test", &[]), 503);
    let m = scrape(&proxy);
    assert_eq!(m.sum("switchyard_maintenance", &[("service", "api")]), 1.0);
    let (code, v) = proxy.admin(
        "POST",
        "/services/api/maintenance",
        Some(r#"{"on": false}"#),
    );
    assert_eq!(code, 200, "{v}");

    // A slow client: half a header, cut at the header deadline.
    let mut conn = RawConn::connect(&proxy.http_addr());
    conn.send(b"GET / HTTP/1.1\r\nHost: api.test\r\n").unwrap();
    assert!(conn.wait_closed(WAIT).is_some(), "slow client not cut");

    let m = observed(&proxy, 13);
    for (reason, n) in [
        ("deny", 1.0),
        ("no_route", 1.0),
        ("header_too_large", 1.0),
        ("body_too_large", 1.0),
        ("rate_limited", 1.0),
        ("busy", 1.0),
        ("maintenance", 1.0),
        ("slow_client", 1.0),
        ("invalid_completion", 1.0),
        ("tokens_exhausted", 1.0),
        ("bad_request", 1.0),
    ] {
        assert_eq!(
            m.sum("switchyard_refusals_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    let rate = [("kind", "rate_limit"), ("limit", "per_ip")];
    assert_eq!(m.sum("switchyard_limit_admissions_total", &rate), 1.0);
    assert_eq!(m.sum("switchyard_limit_refusals_total", &rate), 1.0);
    let cap = [("kind", "concurrency"), ("limit", "gpu")];
    assert_eq!(m.sum("switchyard_limit_admissions_total", &cap), 1.0);
    let full = [("kind", "concurrency"), ("reason", "queue_full")];
    assert_eq!(m.sum("switchyard_limit_refusals_total", &full), 1.0);
    assert_eq!(
        m.sum("switchyard_concurrency_in_flight", &[("limit", "gpu")]),
        0.0
    );
    let invalid = [("kind", "token_budget"), ("reason", "invalid")];
    assert_eq!(m.sum("switchyard_limit_refusals_total", &invalid), 1.0);
    let exhausted = [("kind", "token_budget"), ("reason", "exhausted")];
    assert_eq!(m.sum("switchyard_limit_refusals_total", &exhausted), 1.0);
    let budget = [("kind", "token_budget"), ("limit", "ai")];
    assert_eq!(m.sum("switchyard_limit_admissions_total", &budget), 1.0);
    let reserved = [("budget", "ai"), ("outcome", "reserved")];
    assert!(m.sum("switchyard_tokens_total", &reserved) >= 4000.0);
    let by_service = [("service", "api"), ("outcome", "reserved")];
    assert!(m.sum("switchyard_service_tokens_total", &by_service) >= 4000.0);
    // Refusals are requests too: the deny route's 4xx and no route's 4xx.
    let denied = [("route", "api.test/private/"), ("status_class", "4xx")];
    assert_eq!(m.sum("switchyard_requests_total", &denied), 1.0);
    let unrouted = [("route", "none"), ("status_class", "4xx")];
    assert_eq!(m.sum("switchyard_requests_total", &unrouted), 1.0);
    let busy = [
        ("route", "*/gpu/"),
        ("color", "blue"),
        ("status_class", "5xx"),
    ];
    assert_eq!(m.sum("switchyard_requests_total", &busy), 1.0);
    promtool_check(&m.text);
}

#[test]
fn health_changes_move_backend_up_readyz_and_status() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(full_config(&blue, &green, &fast_health()))
        .metrics()
        .start();
    let base = proxy.metrics_url();
    let blue_addr = blue.addr();
    let blue_up = [("color", "blue"), ("backend", blue_addr.as_str())];
    assert!(
        poll_until(WAIT, || scrape(&proxy)
            .sum("switchyard_backend_up", &blue_up)
            == 1.0),
        "blue never up"
    );
    assert!(
        poll_until(WAIT, || request(
            "GET",
            &format!("{base}/readyz"),
            &[],
            None
        )
        .status
            == 200),
        "never ready"
    );

    blue.set_healthy(false);
    assert!(
        poll_until(WAIT, || scrape(&proxy)
            .sum("switchyard_backend_up", &blue_up)
            == 0.0),
        "blue never down"
    );
    let r = request("GET", &format!("{base}/readyz"), &[], None);
    assert_eq!(r.status, 503, "{}", r.body);
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("api (blue)"), "{reason}");
    // Still alive, and the request is refused and counted.
    assert_eq!(
        request("GET", &format!("{base}/healthz"), &[], None).status,
        200
    );
    let r = request(
        "GET",
        &format!("{}/a", proxy.http_url()),
        &[("Host", "api.test")],
        None,
    );
    assert_eq!(r.status, 503, "{}", r.body);
    let m = observed(&proxy, 1);
    let refused = [("reason", "no_healthy_backend")];
    assert_eq!(m.sum("switchyard_refusals_total", &refused), 1.0);

    let status = request("GET", &format!("{base}/status"), &[], None);
    assert_eq!(status.status, 200);
    let v = status.json();
    assert_eq!(v["services"]["api"]["active"], "blue", "{v}");
    assert_eq!(v["services"]["api"]["pools"]["blue"]["up"], 0, "{v}");
    assert_eq!(v["services"]["api"]["pools"]["green"]["up"], 1, "{v}");
    assert_eq!(v["requests"]["total"], 1, "{v}");
    assert!(v["connections"]["open"].is_u64(), "{v}");

    blue.set_healthy(true);
    assert!(
        poll_until(WAIT, || request(
            "GET",
            &format!("{base}/readyz"),
            &[],
            None
        )
        .status
            == 200),
        "never ready again"
    );
    assert_eq!(scrape(&proxy).sum("switchyard_backend_up", &blue_up), 1.0);

    // Only GET and HEAD, only the four paths.
    let head = request("HEAD", &format!("{base}/metrics"), &[], None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        request("POST", &format!("{base}/metrics"), &[], Some(b"")).status,
        405
    );
    assert_eq!(
        request("GET", &format!("{base}/other"), &[], None).status,
        404
    );
}

#[test]
fn metrics_listener_is_off_unless_configured() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    assert!(!proxy.stderr_text().contains("metrics listener enabled"));
    let out = run_check(proxy.config_path(), None);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("metrics listener: off"), "{}", describe(&out));
}
