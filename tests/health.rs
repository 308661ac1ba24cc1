//! Active health checks: what `/status` shows, rotation of unhealthy
//! backends, the 503 answer when a whole pool is down, and switches gated on
//! the target pool's health (admin API and `ctl --wait-healthy`).

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// How long a health state change may take to show (probes every 200 ms,
/// rise/fall 2) including a slow start of the checker.
const HEALTH_DEADLINE: Duration = Duration::from_secs(10);

fn has_error_message(v: &Value) -> bool {
    v["error"].as_str().is_some_and(|e| !e.trim().is_empty())
}

#[test]
fn status_shows_health_of_every_backend_in_both_pools() {
    let b1 = Upstream::start("blue1");
    let b2 = Upstream::start("blue2");
    let g1 = Upstream::start("green1");
    let g2 = Upstream::start("green2");
    let g3 = Upstream::start("green3");
    g2.set_healthy(false); // 503
    g3.set_health_body("starting"); // 200, but without the expected "ok"
    let proxy = ProxyBuilder::new(
        service_with("api", &[&b1, &b2], &[&g1, &g2, &g3], "blue", &fast_health())
            + &route(None, "/", "api"),
    )
    .start();

    proxy.wait_health(
        "api",
        &[
            (&b1, "healthy"),
            (&b2, "healthy"),
            (&g1, "healthy"),
            (&g2, "unhealthy"),
            (&g3, "unhealthy"),
        ],
        HEALTH_DEADLINE,
    );

    let api = proxy.service_status("api");
    for (color, ups) in [("blue", vec![&b1, &b2]), ("green", vec![&g1, &g2, &g3])] {
        let pool = api["pools"][color]
            .as_array()
            .unwrap_or_else(|| panic!("no pools.{color}: {api}"));
        assert_eq!(pool.len(), ups.len(), "{api}");
        for (entry, up) in pool.iter().zip(&ups) {
            assert_eq!(entry["addr"], up.addr(), "{api}");
            let obj = entry.as_object().unwrap();
            assert!(obj.contains_key("last_error"), "no last_error: {entry}");
            if entry["health"] == "healthy" {
                assert!(entry["last_error"].is_null(), "{entry}");
            } else {
                assert!(
                    entry["last_error"].as_str().is_some_and(|e| !e.is_empty()),
                    "unhealthy backend without last_error: {entry}"
                );
            }
        }
    }

    // Every backend of both colors is probed with GET on the health path.
    for up in [&b1, &b2, &g1, &g2, &g3] {
        let probes = up.requests_for(HEALTH_PATH);
        assert!(
            probes.len() >= 2,
            "{} probed {} times",
            up.label(),
            probes.len()
        );
        assert!(probes.iter().all(|p| p.method == "GET"), "{probes:?}");
    }
}

#[test]
fn unhealthy_backend_leaves_rotation_and_returns_after_rise() {
    let b1 = Upstream::start("blue1");
    let b2 = Upstream::start("blue2");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(
        service_with("api", &[&b1, &b2], &[&green], "blue", &fast_health())
            + &route(None, "/", "api"),
    )
    .start();
    proxy.wait_health(
        "api",
        &[(&b1, "healthy"), (&b2, "healthy")],
        HEALTH_DEADLINE,
    );

    let spread = |path: &str| {
        for _ in 0..20 {
            let (code, body) = proxy.get(path, None);
            assert_eq!(code, 200, "{path}: {body}");
            assert!(body == "blue1" || body == "blue2", "{path}: {body}");
        }
        (b1.received(path), b2.received(path))
    };
    let (n1, n2) = spread("/before");
    assert!(n1 > 0 && n2 > 0, "both healthy, yet {n1}/{n2}");

    b2.set_healthy(false);
    proxy.wait_health(
        "api",
        &[(&b1, "healthy"), (&b2, "unhealthy")],
        HEALTH_DEADLINE,
    );
    let (n1, n2) = spread("/during");
    assert_eq!((n1, n2), (20, 0), "an unhealthy backend got traffic");

    b2.set_healthy(true);
    proxy.wait_health(
        "api",
        &[(&b1, "healthy"), (&b2, "healthy")],
        HEALTH_DEADLINE,
    );
    let (n1, n2) = spread("/after");
    assert!(
        n1 > 0 && n2 > 0,
        "recovered backend not back in rotation: {n1}/{n2}"
    );
    assert_eq!(green.traffic(), 0, "green got traffic: {:?}", green.seen());
}

/// Asserts a proxy-made 503 with Retry-After `retry_after`: HTML by
/// default, `{"error": ...}` JSON when asked for. Returns the HTML body.
fn assert_unavailable(proxy: &Proxy, path: &str, retry_after: &str) -> String {
    let url = format!("{}{path}", proxy.http_url());
    let t0 = Instant::now();
    let html = request("GET", &url, &[("Accept", "text/html,*/*;q=0.8")], None);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(html.status, 503, "{html:?}");
    assert_eq!(html.header("retry-after"), Some(retry_after), "{html:?}");
    assert!(
        html.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{html:?}"
    );
    assert!(!html.body.trim().is_empty(), "{html:?}");

    let json = request("GET", &url, &[("Accept", "application/json")], None);
    assert_eq!(json.status, 503, "{json:?}");
    assert_eq!(json.header("retry-after"), Some(retry_after), "{json:?}");
    assert!(
        json.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{json:?}"
    );
    assert!(has_error_message(&json.json()), "{json:?}");
    html.body
}

#[test]
fn whole_pool_down_answers_503_with_retry_after_never_hangs() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    blue.set_healthy(false);
    let proxy = ProxyBuilder::new(
        service_with("api", &[&blue], &[&green], "blue", &fast_health()) + &route(None, "/", "api"),
    )
    .server(r#"retry_after = "7s""#)
    .start();
    proxy.wait_health(
        "api",
        &[(&blue, "unhealthy"), (&green, "healthy")],
        HEALTH_DEADLINE,
    );

    let page = assert_unavailable(&proxy, "/down", "7");
    assert!(page.contains('<'), "default page is not HTML: {page}");
    assert_eq!(blue.received("/down"), 0, "sent to an unhealthy backend");
    assert_eq!(
        green.received("/down"),
        0,
        "failed over to the inactive color"
    );

    blue.set_healthy(true);
    proxy.wait_health("api", &[(&blue, "healthy")], HEALTH_DEADLINE);
    assert_eq!(proxy.get("/up", None), (200, "blue".to_string()));
}

#[test]
fn configured_maintenance_page_is_served_when_the_pool_is_down() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    blue.set_healthy(false);
    let dir = tempfile::tempdir().unwrap();
    let page_path = dir.path().join("maintenance.html");
    let page = "<!doctype html><html><body>Back soon. marker-7f3a</body></html>\n";
    std::fs::write(&page_path, page).unwrap();
    let proxy = ProxyBuilder::new(
        service_with("api", &[&blue], &[&green], "blue", &fast_health()) + &route(None, "/", "api"),
    )
    .server(&format!(
        "maintenance_page = {}\nretry_after = \"30s\"",
        toml_str(page_path.to_str().unwrap())
    ))
    .start();
    proxy.wait_health("api", &[(&blue, "unhealthy")], HEALTH_DEADLINE);

    let body = assert_unavailable(&proxy, "/down", "30");
    assert_eq!(body, page, "the configured maintenance_page was not served");
}

#[test]
fn switch_is_refused_while_target_pool_is_not_healthy_enough() {
    // api: default min_healthy (every green backend); web: min_healthy = 1.
    let ab = Upstream::start("api-blue");
    let ag1 = Upstream::start("api-green1");
    let ag2 = Upstream::start("api-green2");
    let wb = Upstream::start("web-blue");
    let wg1 = Upstream::start("web-green1");
    let wg2 = Upstream::start("web-green2");
    ag2.set_healthy(false);
    wg2.set_healthy(false);
    let health = fast_health();
    let body = service_with("api", &[&ab], &[&ag1, &ag2], "blue", &health)
        + &service_with(
            "web",
            &[&wb],
            &[&wg1, &wg2],
            "blue",
            &format!("{health}\nmin_healthy = 1"),
        )
        + &route(None, "/web", "web")
        + &route(None, "/", "api");
    let proxy = ProxyBuilder::new(body).start();
    let all = [(&ab, "healthy"), (&ag1, "healthy"), (&ag2, "unhealthy")];
    proxy.wait_health("api", &all, HEALTH_DEADLINE);
    proxy.wait_health(
        "web",
        &[(&wb, "healthy"), (&wg1, "healthy"), (&wg2, "unhealthy")],
        HEALTH_DEADLINE,
    );

    let before = proxy.service_status("api");
    let (code, v) = proxy.admin("POST", "/services/api/switch", Some(r#"{"to": "green"}"#));
    assert_eq!(code, 409, "{v}");
    assert!(has_error_message(&v), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("health"),
        "the error does not give the health reason: {v}"
    );
    let after = proxy.service_status("api");
    assert_eq!(after["active"], "blue", "{after}");
    assert_eq!(after["previous"], before["previous"], "{after}");
    assert_eq!(proxy.get("/", None), (200, "api-blue".to_string()));
    let (_, h) = proxy.admin("GET", "/history", None);
    assert_eq!(
        h["events"],
        serde_json::json!([]),
        "a refused switch was recorded: {h}"
    );

    // One healthy backend is enough for web.
    let (code, v) = proxy.admin("POST", "/services/web/switch", Some(r#"{"to": "green"}"#));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["active"], "green", "{v}");
    assert_eq!(proxy.get("/web", None), (200, "web-green1".to_string()));

    // force overrides the check.
    let (code, v) = proxy.admin(
        "POST",
        "/services/api/switch",
        Some(r#"{"to": "green", "force": true, "reason": "forced"}"#),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["active"], "green", "{v}");
    assert_eq!(proxy.get("/", None), (200, "api-green1".to_string()));
}

#[test]
fn backends_of_unknown_health_do_not_count_as_healthy() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // rise = 2 probes an hour apart: nothing can become healthy in this test.
    let proxy = ProxyBuilder::new(
        service_with("api", &[&blue], &[&green], "blue", &health_check("1h"))
            + &route(None, "/", "api"),
    )
    .start();
    proxy.wait_health(
        "api",
        &[(&blue, "unknown"), (&green, "unknown")],
        HEALTH_DEADLINE,
    );

    let (code, v) = proxy.admin("POST", "/services/api/switch", Some(r#"{"to": "green"}"#));
    assert_eq!(code, 409, "{v}");
    assert!(has_error_message(&v), "{v}");
    assert_eq!(proxy.active("api"), "blue");

    let (code, v) = proxy.admin(
        "POST",
        "/services/api/switch",
        Some(r#"{"to": "green", "force": true}"#),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(proxy.active("api"), "green");
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Service `api` with health checks, blue active and healthy, green
/// unhealthy: the starting point of a deploy that must wait.
fn blue_active_green_unhealthy() -> (Upstream, Upstream, Proxy) {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    green.set_healthy(false);
    let proxy = ProxyBuilder::new(
        service_with("api", &[&blue], &[&green], "blue", &fast_health()) + &route(None, "/", "api"),
    )
    .start();
    proxy.wait_health(
        "api",
        &[(&blue, "healthy"), (&green, "unhealthy")],
        HEALTH_DEADLINE,
    );
    (blue, green, proxy)
}

#[test]
fn ctl_wait_healthy_switches_once_green_becomes_healthy() {
    let (_blue, green, proxy) = blue_active_green_unhealthy();

    let mut child = proxy.spawn_ctl(&["switch", "api", "green", "--wait-healthy", "10s"]);
    // Let several probes fail while ctl waits; it must neither switch nor
    // give up.
    let probes = green.health_probes();
    assert!(
        poll_until(Duration::from_secs(5), || green.health_probes()
            >= probes + 3),
        "green is no longer probed"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "ctl gave up while green was unhealthy:\n{}",
        describe(&wait_output_with_deadline(
            child,
            Duration::from_secs(1),
            "ctl"
        ))
    );
    assert_eq!(
        proxy.active("api"),
        "blue",
        "switched to an unhealthy green"
    );

    green.set_healthy(true);
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl --wait-healthy");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        output_text(&out).contains("green"),
        "no progress or result printed:\n{}",
        describe(&out)
    );
    assert_eq!(proxy.active("api"), "green");
    assert_eq!(proxy.health_of("api", &green.addr()), "healthy");
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));
}

#[test]
fn ctl_wait_healthy_gives_up_at_its_deadline_and_changes_nothing() {
    let (_blue, _green, proxy) = blue_active_green_unhealthy();

    let t0 = Instant::now();
    let out = proxy.ctl(&["switch", "api", "green", "--wait-healthy", "1s"]);
    let took = t0.elapsed();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        took >= Duration::from_millis(900),
        "gave up after {took:?}, before its 1 s deadline:\n{}",
        describe(&out)
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(proxy.active("api"), "blue");
    let (_, h) = proxy.admin("GET", "/history", None);
    assert_eq!(h["events"], serde_json::json!([]), "{h}");
    assert_eq!(proxy.get("/", None), (200, "blue".to_string()));
}
