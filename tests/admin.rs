//! Admin API: authentication, allowlist, input validation, token handling
//! and the `ctl` client.

mod common;

use std::time::Duration;

use serde_json::Value;

use common::*;

/// A body that would switch `api` to green if it were accepted.
const SWITCH_GREEN: &str = r#"{"to": "green", "reason": "should not happen"}"#;

fn has_error_message(v: &Value) -> bool {
    v["error"].as_str().is_some_and(|e| !e.trim().is_empty())
}

/// One bad admin request and the status it must get.
struct Case<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    body: Option<&'a str>,
    token: Option<&'a str>,
    expected: u16,
}

impl<'a> Case<'a> {
    fn new(
        name: &'a str,
        method: &'a str,
        path: &'a str,
        body: Option<&'a str>,
        token: Option<&'a str>,
        expected: u16,
    ) -> Self {
        Case {
            name,
            method,
            path,
            body,
            token,
            expected,
        }
    }
}

#[test]
fn bad_requests_are_rejected_and_change_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let base = proxy.admin_url();
    let baseline = proxy.status();
    assert_eq!(baseline["services"]["api"]["active"], "blue", "{baseline}");

    let big_reason = "x".repeat(70 * 1024);
    let big_body = format!(r#"{{"to": "green", "reason": "{big_reason}"}}"#);

    let wrong = format!("{TOKEN}x");
    let sw = "/services/api/switch";
    let cases = [
        Case::new("missing token (status)", "GET", "/status", None, None, 401),
        Case::new("missing token", "POST", sw, Some(SWITCH_GREEN), None, 401),
        Case::new(
            "wrong token",
            "POST",
            sw,
            Some(SWITCH_GREEN),
            Some(&wrong),
            401,
        ),
        Case::new("empty token", "POST", sw, Some(SWITCH_GREEN), Some(""), 401),
        Case::new(
            "unknown service",
            "POST",
            "/services/nope/switch",
            Some(SWITCH_GREEN),
            Some(TOKEN),
            404,
        ),
        Case::new(
            "unknown service rollback",
            "POST",
            "/services/nope/rollback",
            None,
            Some(TOKEN),
            404,
        ),
        Case::new(
            "unknown color",
            "POST",
            sw,
            Some(r#"{"to": "purple"}"#),
            Some(TOKEN),
            400,
        ),
        Case::new(
            "malformed JSON",
            "POST",
            sw,
            Some(r#"{"to": "green""#),
            Some(TOKEN),
            400,
        ),
        Case::new(
            "not JSON at all",
            "POST",
            sw,
            Some("to=green"),
            Some(TOKEN),
            400,
        ),
        Case::new(
            "unknown path",
            "POST",
            "/services/api/switcheroo",
            Some(SWITCH_GREEN),
            Some(TOKEN),
            404,
        ),
        Case::new("unknown path (GET)", "GET", "/nope", None, Some(TOKEN), 404),
    ];

    let mut failures = Vec::new();
    let mut check_after = |name: &str, code: u16, expected: u16, v: &Value| {
        if code != expected {
            failures.push(format!("{name}: expected {expected}, got {code}: {v}"));
        } else if !has_error_message(v) {
            failures.push(format!("{name}: no {{\"error\": ...}} body: {v}"));
        }
        let now = proxy.status();
        if now != baseline {
            failures.push(format!("{name}: /status changed to {now}"));
        }
    };

    for c in &cases {
        let (code, v) = admin_request(&base, c.method, c.path, c.body, c.token);
        check_after(c.name, code, c.expected, &v);
    }

    // Oversized body, sent raw: the server may answer before reading it all.
    let req = format!(
        "POST /services/api/switch HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big_body}",
        proxy.admin_addr(),
        big_body.len()
    );
    let (code, text) = raw_http(&proxy.admin_addr(), req.as_bytes());
    check_after("body over 64 KiB", code, 413, &parse_json(&text));

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing reached green.
    assert_eq!(proxy.get("/", None), (200, "blue".to_string()));
    let (_, h) = proxy.admin("GET", "/history", None);
    assert_eq!(h["events"], serde_json::json!([]), "{h}");
}

#[test]
fn body_just_under_limit_is_not_413() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    // ~60 KiB: under the 64 KiB cap, so the size alone must not reject it.
    // (The contract does not say whether a reason this long is acceptable,
    // so a 400 is tolerated; if it is accepted it must have switched.)
    let body = format!(
        r#"{{"to": "green", "reason": "{}"}}"#,
        "y".repeat(60 * 1024)
    );
    assert!(body.len() < 64 * 1024);
    let (code, v) = proxy.admin("POST", "/services/api/switch", Some(&body));
    let shown = v.to_string().chars().take(200).collect::<String>();
    match code {
        200 => assert_eq!(proxy.active("api"), "green", "{shown}"),
        400 => assert_eq!(proxy.active("api"), "blue", "{shown}"),
        other => panic!("a {} byte body got {other}: {shown}", body.len()),
    }
}

#[test]
fn client_outside_allowlist_gets_403() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .allow(&["10.0.0.0/8"])
        .start();

    let (code, v) = proxy.admin("GET", "/status", None);
    assert_eq!(code, 403, "{v}");
    assert!(has_error_message(&v), "{v}");
    let (code, v) = proxy.admin("POST", "/services/api/switch", Some(SWITCH_GREEN));
    assert_eq!(code, 403, "{v}");
    assert!(has_error_message(&v), "{v}");
    // The admin API is unusable, so check through traffic that nothing moved.
    assert_eq!(proxy.get("/after-403", None), (200, "blue".to_string()));
    assert_eq!(green.received("/after-403"), 0);
}

/// Starts with a token file of `mode`, expects start-up to fail, and
/// returns what switchyard said, with the token file's path.
fn refused_start_with_token_mode(mode: u32) -> (String, String) {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .token(TokenSource::File {
            token: TOKEN.to_string(),
            mode,
        })
        .spawn();
    let st = proxy
        .wait_exit(FAIL_DEADLINE)
        .unwrap_or_else(|| panic!("started with a {mode:o} token file"));
    assert!(!st.success(), "{st}");
    let path = proxy.token_path().display().to_string();
    (proxy.stderr_text(), path)
}

#[test]
fn world_readable_token_file_refuses_start() {
    let (err, path) = refused_start_with_token_mode(0o644);
    assert!(err.contains(&path), "stderr does not name {path}:\n{err}");
    assert!(
        err.contains("chmod 600"),
        "stderr lacks 'chmod 600':\n{err}"
    );
}

#[test]
fn group_readable_token_file_refuses_start() {
    let (err, _) = refused_start_with_token_mode(0o640);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn without_token_admin_is_disabled_but_proxy_serves() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .token(TokenSource::None)
        .start();

    assert_eq!(proxy.get("/", None), (200, "blue".to_string()));
    // Must stay refused: check repeatedly for a second, not once.
    let admin = proxy.admin_addr();
    let opened = poll_until(Duration::from_secs(1), || !connection_refused(&admin));
    assert!(
        !opened,
        "admin port {admin} accepted a connection without a token"
    );
    assert!(
        poll_until(Duration::from_secs(5), || {
            let e = proxy.stderr_text().to_lowercase();
            e.contains("admin") && e.contains("disabled")
        }),
        "stderr does not say the admin API is disabled:\n{}",
        proxy.stderr_text()
    );
}

#[test]
fn token_from_environment_works() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let env_token = "token-from-env-42";
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .token(TokenSource::Env(env_token.to_string()))
        .start();

    let (code, v) = admin_request(&proxy.admin_url(), "GET", "/status", None, Some(env_token));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["services"]["api"]["active"], "blue", "{v}");
    let (code, v) = admin_request(&proxy.admin_url(), "GET", "/status", None, Some(TOKEN));
    assert_eq!(
        code, 401,
        "a token other than the env one was accepted: {v}"
    );
    let v = proxy.switch("api", "green", Some("env token"));
    assert_eq!(v["active"], "green", "{v}");
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok_json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", describe(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{}", describe(out)))
}

#[test]
fn ctl_human_and_json_output() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    // status, human: mentions the service and its active color, is not JSON.
    let out = proxy.ctl(&["status"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("api") && text.contains("blue"),
        "{}",
        describe(&out)
    );
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "human output is JSON: {text}"
    );

    // status, JSON: same shape as GET /status.
    let v = ok_json(&proxy.ctl(&["--json", "status"]));
    assert_eq!(v["services"]["api"]["active"], "blue", "{v}");
    assert_eq!(
        v["services"]["api"]["pools"]["green"][0]["addr"],
        green.addr(),
        "{v}"
    );

    // switch, human.
    let out = proxy.ctl(&["switch", "api", "green"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("green"), "{}", describe(&out));
    assert_eq!(proxy.active("api"), "green");
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));

    // switch, JSON: the service object.
    let v = ok_json(&proxy.ctl(&["--json", "switch", "api", "blue"]));
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["active"], "blue", "{v}");
    assert_eq!(v["previous"], "green", "{v}");
    assert_eq!(proxy.active("api"), "blue");

    // rollback, human: back to the previous color.
    let out = proxy.ctl(&["rollback", "api"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.active("api"), "green");
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));

    // rollback, JSON (after another switch, so there is a previous color).
    let out = proxy.ctl(&["switch", "api", "blue"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v = ok_json(&proxy.ctl(&["--json", "rollback", "api"]));
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["active"], "green", "{v}");
    assert_eq!(proxy.active("api"), "green");

    // history, JSON: five events, newest last.
    let v = ok_json(&proxy.ctl(&["--json", "history"]));
    let tos: Vec<&str> = v["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|e| e["to"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(tos, ["green", "blue", "green", "blue", "green"], "{v}");

    // history, human.
    let out = proxy.ctl(&["history"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("api") && text.contains("green") && text.contains("blue"),
        "{}",
        describe(&out)
    );
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "human output is JSON: {text}"
    );
}

#[test]
fn ctl_failures_exit_nonzero_with_server_message() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let before = proxy.status();

    // The server's message for this request, asked directly.
    let (code, v) = proxy.admin("POST", "/services/nope/switch", Some(r#"{"to": "green"}"#));
    assert_eq!(code, 404, "{v}");
    let message = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();

    for args in [
        &["switch", "nope", "green"][..],
        &["--json", "switch", "nope", "green"],
    ] {
        let out = proxy.ctl(args);
        assert!(
            !out.status.success(),
            "ctl {args:?} succeeded:\n{}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&message),
            "ctl {args:?} stderr lacks the server's message {message:?}:\n{}",
            describe(&out)
        );
    }

    let out = proxy.ctl(&["switch", "api", "purple"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let out = proxy.ctl(&["rollback", "api"]);
    assert!(
        !out.status.success(),
        "rollback with no previous: {}",
        describe(&out)
    );

    // Wrong token and no token.
    let out = run_ctl(&proxy.admin_url(), Some("wrong-token"), &["status"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let out = run_ctl(&proxy.admin_url(), None, &["switch", "api", "green"]);
    assert!(!out.status.success(), "{}", describe(&out));

    // Nothing listening.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = run_ctl(&dead, Some(TOKEN), &["status"]);
    assert!(!out.status.success(), "{}", describe(&out));

    assert_eq!(proxy.status(), before, "a failed ctl call changed state");
}

#[test]
fn ctl_reads_token_file() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let token_file = proxy.token_path().to_str().unwrap().to_string();
    let out = run_ctl(
        &proxy.admin_url(),
        None,
        &["--token-file", &token_file, "--json", "status"],
    );
    let v = ok_json(&out);
    assert_eq!(v["services"]["api"]["active"], "blue", "{v}");
}
