//! The automatic rollback watcher (`[services.NAME.rollback]`): a new color
//! that fails its gates after a switch is rolled back within the window,
//! with the figures in the history and a counted metric; noise below
//! `min_requests` is not a verdict.

mod common;

use std::time::{Duration, Instant};

use common::load::Load;
use common::*;

/// The window the tests judge (2 s) and the watcher's tick (1 s).
const WINDOW: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_secs(1);

/// `api` (blue active) with a rollback table of `gates`, every path routed.
fn watched_api(blue: &Upstream, green: &Upstream, gates: &str) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&format!("[services.api.rollback]\n{}\n\n", gates.trim()));
    s.push_str(&route(None, "/", "api"));
    s
}

fn switch_to_green(p: &Proxy) {
    let out = p.ctl(&["switch", "api", "green", "--reason", "release 2"]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// The last history event of `api`.
fn last_event(p: &Proxy) -> serde_json::Value {
    let (code, v) = p.admin("GET", "/history?service=api", None);
    assert_eq!(code, 200, "{v}");
    v["events"].as_array().unwrap().last().cloned().unwrap()
}

/// Polls until `api` is back on blue; returns how long that took.
fn time_to_rollback(p: &Proxy, since: Instant, limit: Duration) -> Duration {
    let back = poll_until(limit, || p.active("api") == "blue");
    assert!(
        back,
        "not rolled back within {limit:?}: {}\n{}",
        p.service_status("api"),
        p.stderr_text()
    );
    since.elapsed()
}

#[test]
fn a_green_answering_500_is_rolled_back_within_the_window() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(watched_api(
        &blue,
        &green,
        "window = \"2s\"\nmin_requests = 10\nmax_error_ratio = 0.1",
    ))
    .metrics()
    .start();
    let series = "switchyard_automatic_rollbacks_total{gate=\"error_ratio\",service=\"api\"}";
    assert_eq!(p.metric(series), Some(0.0));
    green.set_status(Some(500));
    let load = Load::start(&format!("{}/orders", p.http_url()), 2, 5000);
    switch_to_green(&p);
    let switched = Instant::now();
    // Noticed within a tick, judged over the window, acted on at the next tick.
    let took = time_to_rollback(&p, switched, WINDOW + 3 * TICK + Duration::from_secs(5));
    assert!(took <= WINDOW + 3 * TICK, "rolled back after {took:?}");
    // Requests that started after the rollback go to blue (one per client
    // may still be finishing on green as the rollback lands).
    let before = load.answers().len();
    assert!(poll_until(Duration::from_secs(10), || load.answers().len()
        >= before + 10));
    let answers = load.stop();
    assert!(answers.iter().any(|(s, b)| *s == 500 && b == "green"));
    assert!(
        answers[before + 2..]
            .iter()
            .all(|(s, b)| *s == 200 && b == "blue"),
        "{:?}",
        &answers[before..]
    );

    let e = last_event(&p);
    assert_eq!(e["actor"], "rollback-watcher", "{e}");
    assert_eq!(
        (e["from"].as_str(), e["to"].as_str()),
        (Some("green"), Some("blue"))
    );
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("automatic rollback: 5xx 100 % > 10 % over "),
        "{reason}"
    );
    let requests: u64 = reason
        .rsplit_once(", ")
        .and_then(|(_, n)| n.strip_suffix(" requests"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {reason:?}"));
    assert!(requests >= 10, "{reason}");
    assert_eq!(p.metric(series), Some(1.0));
    let s = p.service_status("api");
    assert_eq!(
        s["rollback"]["last_verdict"]["outcome"], "rolled back",
        "{s}"
    );
    assert_eq!(s["rollback"]["watching"], false, "{s}");
}

#[test]
fn a_slow_green_is_rolled_back_on_its_p95() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(watched_api(
        &blue,
        &green,
        "window = \"2s\"\nmin_requests = 5\nmax_p95 = \"300ms\"",
    ))
    .metrics()
    .start();
    let delay = Duration::from_millis(600);
    green.set_delay(delay);
    switch_to_green(&p);
    let switched = Instant::now();
    let load = Load::start(&format!("{}/search", p.http_url()), 4, 2000);
    let took = time_to_rollback(
        &p,
        switched,
        WINDOW + 3 * TICK + delay + Duration::from_secs(5),
    );
    assert!(
        took <= WINDOW + 3 * TICK + delay,
        "rolled back after {took:?}"
    );
    drop(load);
    let e = last_event(&p);
    assert_eq!(e["actor"], "rollback-watcher", "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.starts_with("automatic rollback: p95 "), "{reason}");
    assert!(reason.contains(" > 300 ms over "), "{reason}");
    // The p95 shown is at least the delay green was given.
    let shown = reason
        .strip_prefix("automatic rollback: p95 ")
        .and_then(|r| r.split_once(" > "))
        .map(|(v, _)| v)
        .unwrap_or_default();
    let p95 = match shown.split_once(' ') {
        Some((ms, "ms")) => ms.parse::<f64>().ok().map(|v| v / 1000.0),
        Some((s, "s")) => s.parse::<f64>().ok(),
        _ => None,
    }
    .unwrap_or_else(|| panic!("no p95 in {reason:?}"));
    assert!(p95 >= 0.6, "{reason}");
    assert_eq!(
        p.metric("switchyard_automatic_rollbacks_total{gate=\"p95\",service=\"api\"}"),
        Some(1.0)
    );
}

#[test]
fn a_few_errors_below_min_requests_are_no_verdict() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(watched_api(
        &blue,
        &green,
        "window = \"2s\"\nmin_requests = 20\nwatch = \"3s\"",
    ))
    .start();
    switch_to_green(&p);
    // The watcher has taken the switch in hand.
    assert!(poll_until(Duration::from_secs(5), || {
        p.service_status("api")["rollback"]["watching"] == true
    }));
    let out = p.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rollback watch: green 0 requests"), "{text}");
    green.set_status(Some(500));
    for _ in 0..5 {
        let (code, body) = p.get("/orders", None);
        assert_eq!((code, body.as_str()), (500, "green"));
    }
    green.set_status(None);
    // Seen and judged: 5 errors in 5 requests, short of 20.
    assert!(
        poll_until(Duration::from_secs(5), || {
            let s = p.service_status("api");
            s["rollback"]["live"]["errors"] == 5
        }),
        "{}",
        p.service_status("api")
    );
    // The watch runs out with green still serving.
    assert!(
        poll_until(Duration::from_secs(10), || {
            p.service_status("api")["rollback"]["watching"] == false
        }),
        "{}",
        p.service_status("api")
    );
    assert_eq!(p.active("api"), "green");
    assert_eq!(last_event(&p)["reason"], "release 2");
    assert!(p.service_status("api")["rollback"]["last_verdict"].is_null());
}

#[test]
fn a_service_and_gates_a_reload_adds_are_watched_at_once() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let (web_blue, web_green) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    // At start nothing is watched, and `api` does not exist yet.
    let mut first = service("web", &[&web_blue], &[&web_green], "blue");
    first.push_str(&route(None, "/web/", "web"));
    let p = ProxyBuilder::new(first.clone()).start();
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    let added = watched_api(
        &blue,
        &green,
        "window = \"2s\"\nmin_requests = 10\nmax_error_ratio = 0.1",
    );
    std::fs::write(
        p.config_path(),
        text.replace(&first, &format!("{first}{added}")),
    )
    .unwrap();
    let (code, v) = p.admin("POST", "/reload", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["services_added"], serde_json::json!(["api"]), "{v}");
    let e = last_event(&p);
    assert_eq!(
        (e["actor"].as_str(), e["reason"].as_str()),
        (
            Some("reload:token:default"),
            Some("config reload: service added")
        ),
        "{e}"
    );

    green.set_status(Some(500));
    let load = Load::start(&format!("{}/orders", p.http_url()), 2, 5000);
    switch_to_green(&p);
    let took = time_to_rollback(
        &p,
        Instant::now(),
        WINDOW + 3 * TICK + Duration::from_secs(5),
    );
    assert!(took <= WINDOW + 3 * TICK, "rolled back after {took:?}");
    load.stop();
    assert_eq!(last_event(&p)["actor"], "rollback-watcher");
}
