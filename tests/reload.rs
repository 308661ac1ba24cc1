//! Config reload (`POST /reload`, `switchyard ctl reload`, SIGHUP): a bad
//! file changes nothing and answers with `switchyard check`'s errors; a good
//! one serves new routes at once while requests, streams and WebSockets in
//! flight finish on what they started with; colors, health and unchanged
//! limits are kept; every reload is counted.

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// Replaces the proxy's config file with `f` applied to its text.
fn rewrite(proxy: &Proxy, f: impl FnOnce(String) -> String) {
    let text = fs::read_to_string(proxy.config_path()).unwrap();
    fs::write(proxy.config_path(), f(text)).unwrap();
}

/// `POST /reload` with the proxy's token.
fn reload(proxy: &Proxy) -> (u16, serde_json::Value) {
    proxy.admin("POST", "/reload", None)
}

/// The error lines `switchyard check` prints for the proxy's config file
/// (its closing "check failed" line left out).
fn check_errors(proxy: &Proxy) -> Vec<String> {
    let out = run_check(proxy.config_path(), None);
    assert!(!out.status.success(), "check passed: {}", describe(&out));
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.ends_with(": check failed"))
        .map(str::to_string)
        .collect()
}

fn sighup(proxy: &Proxy) {
    let rc = unsafe { libc::kill(proxy.pid(), libc::SIGHUP) };
    assert_eq!(rc, 0, "kill(SIGHUP) failed");
}

/// The value of `switchyard_config_reloads_total{result="RESULT"}`.
fn reloads_counted(proxy: &Proxy, result: &str) -> f64 {
    let series = format!("switchyard_config_reloads_total{{result=\"{result}\"}}");
    proxy
        .metric(&series)
        .unwrap_or_else(|| panic!("no {series} on /metrics"))
}

/// GETs `path` `n` times on its own thread; every answer must be 200 from
/// `label` (the old config's backend).
fn requests_meanwhile(proxy: &Proxy, path: &str, label: &str, n: usize) -> thread::JoinHandle<()> {
    let url = format!("{}{path}", proxy.http_url());
    let label = label.to_string();
    thread::spawn(move || {
        for i in 0..n {
            let (code, body) = get(&url, None);
            assert_eq!((code, body.as_str()), (200, label.as_str()), "request {i}");
        }
    })
}

#[test]
fn a_bad_config_is_rejected_with_checks_errors_and_the_old_one_keeps_serving() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let good = fs::read_to_string(proxy.config_path()).unwrap();

    // A syntax error, then a semantic one (a route to an unknown service).
    let bad_files = [
        format!("{good}\n[[routes]\npath = \"/x/\"\n"),
        format!("{good}\n{}", route(None, "/new/", "nope")),
    ];
    for bad in &bad_files {
        fs::write(proxy.config_path(), bad).unwrap();
        let expected = check_errors(&proxy);
        let during = requests_meanwhile(&proxy, "/a", "blue", 30);
        let (code, answer) = reload(&proxy);
        assert_eq!(code, 400, "{answer}");
        let errors: Vec<String> = answer["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors list in {answer}"))
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect();
        assert_eq!(errors, expected, "the reload's errors are check's");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("running config is kept")),
            "{answer}"
        );
        // ctl prints the same errors and fails.
        let out = proxy.ctl(&["reload"]);
        assert!(!out.status.success(), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in &expected {
            assert!(stderr.contains(line.as_str()), "{line:?} not in {stderr}");
        }
        during.join().expect("requests during the rejected reload");
        // The old routes, unchanged: /new/ still goes to api's blue.
        assert_eq!(proxy.get("/new/x", None), (200, "blue".to_string()));
    }

    // SIGHUP with a bad file: still serving, the errors logged at ERROR.
    sighup(&proxy);
    let logged = poll_until(WAIT, || {
        proxy
            .error_lines()
            .iter()
            .any(|l| l.contains("config reload rejected") && l.contains("unknown service"))
    });
    assert!(
        logged,
        "no ERROR line for the rejected SIGHUP reload:\n{}",
        proxy.stderr_text()
    );
    assert_eq!(proxy.get("/new/x", None), (200, "blue".to_string()));
    assert_eq!(proxy.active("api"), "blue");
}

#[test]
fn a_reload_that_adds_a_route_serves_it_at_once() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let other = Upstream::start("other");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .metrics()
        .start();
    assert_eq!(proxy.get("/new/x", None), (200, "blue".to_string()));
    rewrite(&proxy, |text| {
        format!(
            "{text}\n{}{}",
            service("other", &[&other], &[&other], "blue"),
            route(None, "/new/", "other")
        )
    });
    let out = proxy.ctl(&["reload"]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("routes added: */new/"), "{stdout}");
    assert!(stdout.contains("services added: other"), "{stdout}");
    // The very first request after the answer takes the new route.
    assert_eq!(proxy.get("/new/x", None), (200, "other".to_string()));
    assert_eq!(proxy.get("/old", None), (200, "blue".to_string()));
    assert_eq!(proxy.service_status("other")["active"], "blue");
    // Its metrics series exist, and the reload is counted.
    let r = request(
        "GET",
        &format!("{}/metrics", proxy.metrics_url()),
        &[],
        None,
    );
    assert!(
        r.body
            .lines()
            .any(|l| l.starts_with("switchyard_requests_total{")
                && l.contains("route=\"*/new/\"")
                && l.contains("service=\"other\"")
                && l.contains("status_class=\"2xx\"")
                && l.ends_with(" 1")),
        "{}",
        r.body
    );
    assert_eq!(reloads_counted(&proxy, "success"), 1.0);
    assert_eq!(reloads_counted(&proxy, "failure"), 0.0);
    // The log says who reloaded and what changed.
    let logged = proxy.stderr_text();
    let line = logged
        .lines()
        .find(|l| l.contains("config reloaded"))
        .unwrap_or_else(|| panic!("no reload log line:\n{logged}"));
    assert!(line.contains("token:"), "{line}");
    assert!(line.contains("*/new/"), "{line}");
}

#[test]
fn a_reload_that_removes_a_backend_lets_its_requests_finish() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(format!(
        "{}{}",
        service("api", &[&a, &b], &[&green], "blue"),
        route(None, "/", "api")
    ))
    .start();

    // A request held by whichever backend round robin gives it.
    let url = format!("{}/slow?hold=1", proxy.http_url());
    let held = thread::spawn(move || get(&url, None));
    assert!(poll_until(WAIT, || a.in_flight() + b.in_flight() == 1));
    let (gone, stays) = if a.in_flight() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let (gone_label, stays_label) = (gone.label().to_string(), stays.label().to_string());

    let gone_addr = toml_str(&gone.addr());
    rewrite(&proxy, |text| {
        let before = text.len();
        let text = text
            .replace(&format!("{gone_addr}, "), "")
            .replace(&format!(", {gone_addr}"), "");
        assert!(text.len() < before, "backend not found in the config");
        text
    });
    let (code, answer) = reload(&proxy);
    assert_eq!(code, 200, "{answer}");
    // New requests go to the remaining backend only.
    for _ in 0..4 {
        assert_eq!(proxy.get("/fast", None), (200, stays_label.clone()));
    }
    assert_eq!(gone.in_flight(), 1, "the held request is still there");
    // The blue color still counts the request on the backend that left.
    assert_eq!(proxy.service_status("api")["in_flight"]["blue"], 1);
    // The history says what the reload did to the pool, and who asked.
    let (code, v) = proxy.admin("GET", "/history?service=api", None);
    assert_eq!(code, 200, "{v}");
    let last = v["events"]
        .as_array()
        .and_then(|e| e.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["actor"], "reload:token:default", "{v}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert_eq!(
        reason,
        format!(
            "config reload: blue pool now {} (was {}, {})",
            stays.addr(),
            a.addr(),
            b.addr()
        ),
        "{v}"
    );
    gone.release(1);
    let (code, body) = held.join().unwrap();
    assert_eq!(
        (code, body),
        (200, gone_label),
        "the in-flight request finished on its backend"
    );
}

#[test]
fn streams_and_websockets_on_a_removed_route_keep_working_until_they_end() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let events = Upstream::start("ev");
    let ws_old = Upstream::start("wsold");
    let ws_new = Upstream::start("wsnew");
    let proxy = ProxyBuilder::new(format!(
        "{}{}{}{}{}",
        simple_api(&blue, &green),
        service("ev", &[&events], &[&events], "blue"),
        route(None, "/events/", "ev"),
        service("chat", &[&ws_old], &[&ws_old], "blue"),
        route_with("/ws/", "chat", "websocket = true"),
    ))
    .start();

    let mut sse = RawConn::connect(&proxy.http_addr());
    sse.send(
        b"GET /events/x?sse=3&gated=1 HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    )
    .unwrap();
    let head = sse.read_head(Duration::from_secs(5)).expect("stream head");
    assert_eq!(head.status, 200, "{head:?}");
    let mut body = Vec::new();
    sse.read_body_until(&mut body, "data: ev-1\n\n", Duration::from_secs(5))
        .expect("first event");
    let mut ws = ws_connect(&proxy.http_addr(), "/ws/chat").expect("websocket");
    assert_eq!(ws_echo(&mut ws, "before").unwrap(), "wsold:before");

    // The route /events/ and its service go; chat's backend is replaced.
    rewrite(&proxy, |text| {
        let text = text.replace(&route(None, "/events/", "ev"), "");
        let text = text.replace(&service("ev", &[&events], &[&events], "blue"), "");
        text.replace(&toml_str(&ws_old.addr()), &toml_str(&ws_new.addr()))
    });
    let (code, answer) = reload(&proxy);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["routes_removed"], serde_json::json!(["*/events/"]));
    assert_eq!(answer["services_removed"], serde_json::json!(["ev"]));

    // New requests see the new config...
    assert_eq!(proxy.get("/events/y", None), (200, "blue".to_string()));
    let mut ws2 = ws_connect(&proxy.http_addr(), "/ws/chat").expect("new websocket");
    assert_eq!(ws_echo(&mut ws2, "new").unwrap(), "wsnew:new");
    // ...while the open ones carry on where they started.
    assert_eq!(ws_echo(&mut ws, "after").unwrap(), "wsold:after");
    for i in 2..=3 {
        events.release(1);
        sse.read_body_until(
            &mut body,
            &format!("data: ev-{i}\n\n"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("event {i} after the reload: {e}"));
    }
    let end = sse
        .read_body_part(Instant::now() + Duration::from_secs(5))
        .expect("end of stream");
    assert_eq!(end, BodyPart::End);
    ws_close(ws);
    ws_close(ws2);
}

#[test]
fn a_reload_keeps_colors_health_and_the_state_of_unchanged_limits() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let body = format!(
        "[rate_limits.tight]\nrate = \"1/m\"\n\n{}{}{}",
        service_with("api", &[&blue], &[&green], "blue", &fast_health()),
        route_with("/limited/", "api", "rate_limit = \"tight\""),
        route(None, "/", "api"),
    );
    let proxy = ProxyBuilder::new(body).start();
    proxy.wait_health("api", &[(&blue, "healthy"), (&green, "healthy")], WAIT);
    proxy.switch("api", "green", None);
    // A canary split in progress: 90 % green, 10 % blue.
    let split = r#"{"blue": 10, "green": 90}"#;
    let (code, v) = proxy.admin("PUT", "/services/api/weights", Some(split));
    assert_eq!(code, 200, "{v}");
    assert_eq!(proxy.get("/limited/x", None).0, 200);
    assert_eq!(proxy.get("/limited/x", None).0, 429, "the limit is spent");

    // A reload that changes something else (a new deny route).
    rewrite(&proxy, |text| {
        format!("{text}\n{}", deny_route(None, "/private/"))
    });
    let (code, answer) = reload(&proxy);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["limits_reset"], serde_json::json!([]));
    // Health at once, without a new rise: no warm-up gate after a reload.
    assert_eq!(proxy.health_of("api", &blue.addr()), "healthy");
    assert_eq!(proxy.health_of("api", &green.addr()), "healthy");
    assert_eq!(proxy.active("api"), "green");
    let weights = &proxy.service_status("api")["weights"];
    assert_eq!(
        weights,
        &serde_json::json!({"blue": 10, "green": 90}),
        "weights kept"
    );
    // All traffic back to green, then a switch to blue after the reload.
    let whole = r#"{"blue": 0, "green": 100}"#;
    assert_eq!(
        proxy.admin("PUT", "/services/api/weights", Some(whole)).0,
        200
    );
    assert_eq!(proxy.get("/x", None), (200, "green".to_string()));
    assert_eq!(proxy.get("/private/x", None).0, 404);
    assert_eq!(
        proxy.get("/limited/x", None).0,
        429,
        "still spent after the reload"
    );
    // The health gate sees the carried health: a switch back needs no force.
    proxy.switch("api", "blue", None);

    // A limit whose settings change starts afresh.
    rewrite(&proxy, |text| {
        text.replace("rate = \"1/m\"", "rate = \"2/m\"")
    });
    let (code, answer) = reload(&proxy);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["limits_reset"],
        serde_json::json!(["rate_limit:tight"])
    );
    assert_eq!(proxy.get("/limited/x", None), (200, "blue".to_string()));
}

#[test]
fn sighup_reloads_and_every_reload_is_counted() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let other = Upstream::start("other");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .metrics()
        .start();
    rewrite(&proxy, |text| {
        format!(
            "{text}\n{}{}",
            service("other", &[&other], &[&other], "blue"),
            route(None, "/new/", "other")
        )
    });
    sighup(&proxy);
    let served = poll_until(WAIT, || {
        proxy.get("/new/x", None) == (200, "other".to_string())
    });
    assert!(served, "SIGHUP did not reload:\n{}", proxy.stderr_text());
    // Logged (and counted) just after the new config is in force.
    let logged = poll_until(WAIT, || {
        let log = proxy.stderr_text();
        log.lines()
            .any(|l| l.contains("config reloaded") && l.contains("actor=sighup"))
    });
    assert!(logged, "{}", proxy.stderr_text());
    assert_eq!(reloads_counted(&proxy, "success"), 1.0);

    // A bad file by SIGHUP: counted as a failure, still serving.
    rewrite(&proxy, |text| format!("{text}\n[services.broken]\n"));
    sighup(&proxy);
    assert!(poll_until(WAIT, || reloads_counted(&proxy, "failure") == 1.0));
    assert_eq!(proxy.get("/new/x", None), (200, "other".to_string()));

    // The admin API and ctl count too.
    assert_eq!(reload(&proxy).0, 400);
    assert_eq!(reloads_counted(&proxy, "failure"), 2.0);
    rewrite(&proxy, |text| text.replace("\n[services.broken]\n", ""));
    let out = proxy.ctl(&["reload"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(reloads_counted(&proxy, "success"), 2.0);
    // The process is the same one: SIGHUP never ended it.
    assert_eq!(proxy.get("/x", None), (200, "blue".to_string()));
}

#[test]
fn the_health_checker_follows_a_reload() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let added = Upstream::start("added");
    let text = |blues: &[&Upstream]| {
        format!(
            "{}{}",
            service_with("api", blues, &[&green], "blue", &fast_health()),
            route(None, "/", "api")
        )
    };
    let proxy = ProxyBuilder::new(text(&[&blue])).start();
    proxy.wait_health("api", &[(&blue, "healthy"), (&green, "healthy")], WAIT);
    assert_eq!(added.health_probes(), 0);

    // A backend the reload adds is probed and becomes healthy.
    let before = text(&[&blue]);
    rewrite(&proxy, |t| t.replace(&before, &text(&[&blue, &added])));
    assert_eq!(reload(&proxy).0, 200);
    proxy.wait_health("api", &[(&added, "healthy"), (&blue, "healthy")], WAIT);

    // A backend the reload removes is no longer probed (one probe may
    // have been under way).
    let before = text(&[&blue, &added]);
    rewrite(&proxy, |t| t.replace(&before, &text(&[&added])));
    assert_eq!(reload(&proxy).0, 200);
    let removed_at = blue.health_probes();
    let others_at = added.health_probes();
    assert!(poll_until(WAIT, || added.health_probes() >= others_at + 3));
    assert!(
        blue.health_probes() <= removed_at + 1,
        "a removed backend is still probed: {} -> {}",
        removed_at,
        blue.health_probes()
    );
    assert_eq!(proxy.get("/x", None), (200, "added".to_string()));
}

/// `server.work_stealing` is read once, when the worker threads start: a
/// reload that changes it (either way) keeps serving, answers it in
/// `needs_restart` and says so in the WARN line; the running value stays.
#[test]
fn a_reload_that_changes_work_stealing_needs_a_restart() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    for value in ["true", "false"] {
        rewrite(&proxy, |text| match text.contains("work_stealing") {
            false => text.replacen(
                "[server]\n",
                &format!("[server]\nwork_stealing = {value}\n"),
                1,
            ),
            true => text.replace("work_stealing = true", &format!("work_stealing = {value}")),
        });
        let (status, answer) = reload(&proxy);
        assert_eq!(status, 200, "{answer}");
        let want: Vec<&str> = match value {
            "true" => vec!["server.work_stealing"],
            _ => vec![],
        };
        assert_eq!(
            answer["needs_restart"],
            serde_json::json!(want),
            "{value}: {answer}"
        );
        assert_eq!(proxy.get("/x", None), (200, "blue".to_string()));
    }
    let logged = proxy.stderr_text();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("need a restart") && l.contains("server.work_stealing")),
        "no WARN line naming server.work_stealing:\n{logged}"
    );
}
