//! Blue/green switching: atomic under load, in-flight requests finish on the
//! old pool, rollback and history.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// One request made by a load client.
struct Record {
    started: Instant,
    /// When the response had been read. A client thread can be descheduled
    /// between taking `started` and sending, so only `ended` bounds when the
    /// proxy saw the request from above.
    ended: Instant,
    status: u16,
    body: String,
}

const CLIENTS: usize = 8;
/// Hard cap per client so the load is bounded even if the test misbehaves.
const MAX_PER_CLIENT: usize = 3000;
/// Requests to see started after each switch before moving on.
const PER_PHASE: usize = 400;

#[test]
fn switch_under_concurrent_load_is_atomic_and_loses_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let url = format!("{}/load", proxy.http_url());

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let hard_deadline = Instant::now() + Duration::from_secs(45);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, started, url) = (stop.clone(), started.clone(), url.clone());
            std::thread::spawn(move || {
                // One agent per client: requests reuse a keep-alive connection.
                let agent = agent();
                let mut recs = Vec::new();
                while !stop.load(Ordering::SeqCst)
                    && recs.len() < MAX_PER_CLIENT
                    && Instant::now() < hard_deadline
                {
                    let t = Instant::now();
                    started.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = match try_get(&agent, &url, None) {
                        Ok(r) => r,
                        Err(e) => (0, format!("transport error: {e}")),
                    };
                    recs.push(Record {
                        started: t,
                        ended: Instant::now(),
                        status,
                        body,
                    });
                }
                recs
            })
        })
        .collect();

    let wait_for = |n: usize, what: &str| {
        assert!(
            poll_until(Duration::from_secs(20), || started.load(Ordering::SeqCst)
                >= n),
            "load stalled waiting for {what}: {} requests started",
            started.load(Ordering::SeqCst)
        );
    };

    wait_for(200, "warm-up");
    let t1_call = Instant::now();
    let v = proxy.switch("api", "green", Some("load test"));
    let t1 = Instant::now();
    assert_eq!(v["active"], "green", "switch response: {v}");
    wait_for(started.load(Ordering::SeqCst) + PER_PHASE, "green phase");

    let t2_call = Instant::now();
    let v = proxy.switch("api", "blue", Some("load test back"));
    let t2 = Instant::now();
    assert_eq!(v["active"], "blue", "switch response: {v}");
    wait_for(
        started.load(Ordering::SeqCst) + PER_PHASE,
        "second blue phase",
    );

    stop.store(true, Ordering::SeqCst);
    let recs: Vec<Record> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread panicked"))
        .collect();

    let failed: Vec<_> = recs
        .iter()
        .filter(|r| r.status != 200 || (r.body != "blue" && r.body != "green"))
        .map(|r| format!("{} {:?}", r.status, r.body))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        recs.len(),
        &failed[..failed.len().min(5)]
    );

    // A window holds the requests that started after `from` (so the proxy
    // saw them after that switch returned) and ended before `to` (so it saw
    // them before the next switch call began); requests overlapping a call
    // may go either way.
    let window = |from: Option<Instant>, to: Option<Instant>| {
        recs.iter()
            .filter(move |r| from.is_none_or(|f| r.started >= f) && to.is_none_or(|t| r.ended < t))
    };
    let count = |from, to, color: &str| window(from, to).filter(|r| r.body == color).count();

    let before = window(None, Some(t1_call)).count();
    let before_green = count(None, Some(t1_call), "green");
    assert!(before > 0, "no requests before the first switch");
    assert_eq!(before_green, 0, "green served before it was activated");

    let green_phase = window(Some(t1), Some(t2_call)).count();
    let green_phase_blue = count(Some(t1), Some(t2_call), "blue");
    assert!(
        green_phase >= 100,
        "only {green_phase} requests between the switches"
    );
    assert_eq!(
        green_phase_blue, 0,
        "{green_phase_blue} of {green_phase} requests started after the switch to green returned were answered by blue"
    );

    let back = window(Some(t2), None).count();
    let back_green = count(Some(t2), None, "green");
    assert!(back >= 100, "only {back} requests after switching back");
    assert_eq!(
        back_green, 0,
        "{back_green} of {back} requests started after switching back were answered by green"
    );
    assert_eq!(proxy.active("api"), "blue");
}

#[test]
fn in_flight_request_finishes_on_old_pool_while_new_ones_go_to_new_pool() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    let slow_url = format!("{}/slow?delay_ms=1500", proxy.http_url());
    let slow = std::thread::spawn(move || get(&slow_url, None));
    assert!(
        poll_until(Duration::from_secs(10), || blue.in_flight_for("/slow") == 1),
        "blue never received the slow request"
    );

    let v = proxy.switch("api", "green", Some("slow test"));
    assert_eq!(v["active"], "green", "{v}");
    let (code, body) = proxy.get("/fast", None);
    assert_eq!((code, body.as_str()), (200, "green"));
    // The switch neither waited for nor cut off the request on blue.
    assert_eq!(
        blue.in_flight_for("/slow"),
        1,
        "the slow request should still be running on blue"
    );

    let (code, body) = slow.join().expect("slow client panicked");
    assert_eq!((code, body.as_str()), (200, "blue"), "slow request");
    assert_eq!(blue.received("/slow"), 1, "blue: {:?}", blue.seen());
    assert_eq!(blue.received("/fast"), 0, "blue: {:?}", blue.seen());
    assert_eq!(green.received("/fast"), 1, "green: {:?}", green.seen());
    assert_eq!(green.received("/slow"), 0, "green: {:?}", green.seen());
}

#[test]
fn switch_reports_service_and_noop_switch_changes_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    // Switching to the active color is a 200 no-op.
    let v = proxy.switch("api", "blue", None);
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["active"], "blue", "{v}");
    assert!(v["previous"].is_null(), "no-op set previous: {v}");
    let (code, v) = proxy.admin("POST", "/services/api/rollback", None);
    assert_eq!(code, 409, "rollback after a no-op switch: {v}");
    let (code, h) = proxy.admin("GET", "/history", None);
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["events"], serde_json::json!([]), "no-op recorded: {h}");

    let v = proxy.switch("api", "green", None);
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["active"], "green", "{v}");
    assert_eq!(v["previous"], "blue", "{v}");
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));

    let s = proxy.status();
    let api = &s["services"]["api"];
    assert_eq!(api["active"], "green", "{s}");
    assert_eq!(api["previous"], "blue", "{s}");
    assert_eq!(api["pools"]["blue"][0]["addr"], blue.addr(), "{s}");
    assert_eq!(api["pools"]["green"][0]["addr"], green.addr(), "{s}");
}

#[test]
fn rollback_returns_to_previous_and_history_records_events() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    // Nothing to roll back to yet.
    let before = proxy.status();
    let (code, v) = proxy.admin("POST", "/services/api/rollback", None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "409 without an error message: {v}"
    );
    assert_eq!(proxy.status(), before, "a refused rollback changed state");

    proxy.switch("api", "green", Some("release 42"));
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));

    let (code, v) = proxy.admin("POST", "/services/api/rollback", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["active"], "blue", "{v}");
    assert_eq!(proxy.active("api"), "blue");
    assert_eq!(proxy.get("/", None), (200, "blue".to_string()));

    proxy.switch("api", "green", Some("release 43"));

    let (code, h) = proxy.admin("GET", "/history", None);
    assert_eq!(code, 200, "{h}");
    let events = h["events"].as_array().unwrap_or_else(|| panic!("{h}"));
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["service"].as_str().unwrap_or("?").to_string(),
                e["from"].as_str().unwrap_or("?").to_string(),
                e["to"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("api", "blue", "green"),
        ("api", "green", "blue"),
        ("api", "blue", "green"),
    ]
    .iter()
    .map(|(s, f, t)| (s.to_string(), f.to_string(), t.to_string()))
    .collect();
    assert_eq!(summary, expected, "history (newest last): {h}");
    assert_eq!(events[0]["reason"], "release 42", "{h}");
    assert_eq!(events[2]["reason"], "release 43", "{h}");
    for e in events {
        let t = e["time"].as_str().unwrap_or_else(|| panic!("no time: {e}"));
        assert!(looks_like_rfc3339(t), "time {t:?} is not RFC 3339");
    }
}

/// `YYYY-MM-DDTHH:MM:SS` followed by optional fraction and a zone.
fn looks_like_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (t.ends_with('Z') || t.ends_with('z') || t[19..].contains('+') || t[19..].contains('-'))
}
