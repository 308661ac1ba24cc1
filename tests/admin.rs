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
        Case::new(
            "reason with a newline (forged log line)",
            "POST",
            sw,
            Some(
                r#"{"to": "green", "reason": "ok\n2026-11-29T20:47:25Z ERROR switchyard: forged"}"#,
            ),
            Some(TOKEN),
            400,
        ),
        Case::new(
            "reason with a terminal escape",
            "POST",
            "/services/api/rollback",
            Some(r#"{"reason": "\u001b[31mred"}"#),
            Some(TOKEN),
            400,
        ),
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

// ---------------------------------------------------------------------------
// ctl against things that are not the admin API, and how it finds the admin API
// ---------------------------------------------------------------------------

/// A loopback server that answers every connection with fixed bytes and
/// records the request heads it received. Stops when dropped.
struct FakeServer {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    /// `speaks_first`: send `reply` on accept, before reading (like SSH).
    fn start(reply: &'static [u8], speaks_first: bool) -> FakeServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: no test makes more than a few connections.
            for conn in listener.incoming().take(50) {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                if speaks_first {
                    let _ = conn.write_all(reply);
                }
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen2
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                if !speaks_first {
                    let _ = conn.write_all(reply);
                }
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        });
        FakeServer {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Asserts that ctl failed, printed nothing on stdout, and said on stderr
/// that `url` is not the admin API.
fn assert_not_admin(case: &str, out: &std::process::Output) {
    assert!(
        !out.status.success(),
        "{case}: ctl succeeded\n{}",
        describe(out)
    );
    assert!(
        out.stdout.is_empty(),
        "{case}: ctl printed a result\n{}",
        describe(out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a switchyard admin API"),
        "{case}: stderr does not say it is not the admin API\n{}",
        describe(out)
    );
}

#[test]
fn ctl_pointed_at_the_proxy_port_fails_and_posts_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let before = proxy.status();
    let wrong = proxy.http_url();
    let cases: [&[&str]; 6] = [
        &["status"],
        &["--json", "status"],
        &["history"],
        &["switch", "api", "green"],
        &["rollback", "api"],
        &["maintenance", "api", "on"],
    ];
    for args in cases {
        let out = run_ctl(&wrong, Some(TOKEN), args);
        assert_not_admin(&format!("proxy port, {args:?}"), &out);
    }
    // Nothing was posted to a backend, and the token never left for one.
    for up in [&blue, &green] {
        for r in up.seen() {
            assert_ne!(r.method, "POST", "a POST reached {}: {r:?}", up.label());
            assert!(
                r.header("authorization").is_none(),
                "the admin token reached {}",
                up.label()
            );
        }
    }
    assert_eq!(
        proxy.status(),
        before,
        "a ctl call to the proxy port changed state"
    );
}

#[test]
fn ctl_recognises_other_http_servers_and_non_http_ports() {
    let cases: [(&str, &[u8], bool); 6] = [
        (
            "404 JSON",
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 21\r\n\r\n{\"error\":\"not found\"}",
            false,
        ),
        (
            "HTML page",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 26\r\n\r\n<html><h1>Hello</h1></html>",
            false,
        ),
        (
            "200 unrelated JSON",
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 48\r\n\r\n{\"services\":{\"api\":{\"active\":\"blue\"}},\"x\":true}",
            false,
        ),
        (
            "200 text",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n",
            false,
        ),
        (
            "redirect",
            b"HTTP/1.1 301 Moved Permanently\r\nlocation: http://127.0.0.1:1/status\r\ncontent-length: 0\r\n\r\n",
            false,
        ),
        ("401 without marker", b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer\r\ncontent-length: 0\r\n\r\n", false),
    ];
    for (case, reply, first) in cases {
        let server = FakeServer::start(reply, first);
        for args in [&["status"][..], &["switch", "api", "green"]] {
            let out = run_ctl(&server.url(), Some(TOKEN), args);
            assert_not_admin(&format!("{case}, {args:?}"), &out);
        }
        for head in server.requests() {
            assert!(head.starts_with("GET "), "{case}: got {head:?}");
            assert!(
                !head.to_ascii_lowercase().contains("authorization"),
                "{case}: the token was sent to a server not known to be the admin API: {head:?}"
            );
        }
    }

    // Ports that do not speak HTTP: one that talks first, one that answers garbage.
    for (case, reply, first) in [
        ("ssh banner", &b"SSH-2.0-OpenSSH_9.6\r\n"[..], true),
        ("garbage", &b"\x00\x01\x02 hello\r\n\r\n"[..], false),
    ] {
        let server = FakeServer::start(reply, first);
        let out = run_ctl(&server.url(), Some(TOKEN), &["switch", "api", "green"]);
        assert!(!out.status.success(), "{case}\n{}", describe(&out));
        assert!(out.stdout.is_empty(), "{case}\n{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not a switchyard admin API") || err.contains("does not speak HTTP"),
            "{case}\n{}",
            describe(&out)
        );
    }
}

#[test]
fn ctl_admin_address_forms() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let addr = proxy.admin_addr();
    for given in [
        addr.clone(),
        format!("http://{addr}"),
        format!("http://{addr}/"),
        format!("HTTP://{addr}"),
    ] {
        let v = ok_json(&run_ctl(&given, Some(TOKEN), &["--json", "status"]));
        assert_eq!(v["services"]["api"]["active"], "blue", "{given}: {v}");
    }
    for (given, says) in [
        (format!("https://{addr}"), "plain HTTP"),
        ("127.0.0.1".to_string(), "give a port"),
        ("::1:9900".to_string(), "brackets"),
        (format!("http://{addr}/admin"), "without a path"),
    ] {
        let out = run_ctl(&given, Some(TOKEN), &["status"]);
        assert!(!out.status.success(), "{given}\n{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says),
            "{given}: wanted {says:?}\n{}",
            describe(&out)
        );
    }
}

#[test]
fn ctl_switch_to_the_active_color_says_nothing_changed() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let out = proxy.ctl(&["switch", "api", "blue"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out).trim(), "api: already blue; nothing changed");

    let out = proxy.ctl(&["switch", "api", "green"]);
    assert_eq!(
        stdout(&out).trim(),
        "api: now green (was blue)",
        "{}",
        describe(&out)
    );
    let out = proxy.ctl(&["switch", "api", "green"]);
    assert_eq!(
        stdout(&out).trim(),
        "api: already green; nothing changed",
        "{}",
        describe(&out)
    );
    let (_, h) = proxy.admin("GET", "/history", None);
    assert_eq!(h["events"].as_array().map(Vec::len), Some(1), "{h}");
}

/// Runs `switchyard ctl ARGS...` in `cwd` with `$SWITCHYARD_ADMIN_TOKEN` set
/// to `env_token` (or unset), without adding `--admin`.
fn ctl_in(cwd: &std::path::Path, env_token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("ctl")
        .args(args)
        .current_dir(cwd)
        .env_remove(TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(t) = env_token {
        cmd.env(TOKEN_ENV, t);
    }
    wait_output_with_deadline(cmd.spawn().unwrap(), Duration::from_secs(20), "ctl")
}

#[test]
fn ctl_missing_token_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for (given, shown) in [
        (
            "/nonexistent/admin.token".to_string(),
            "/nonexistent/admin.token".to_string(),
        ),
        (
            "missing.token".to_string(),
            format!(
                "relative to {}",
                dir.path().canonicalize().unwrap().display()
            ),
        ),
    ] {
        let out = ctl_in(
            dir.path(),
            None,
            &["--admin", "127.0.0.1:9", "--token-file", &given, "status"],
        );
        assert!(!out.status.success(), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not exist"),
            "{given}\n{}",
            describe(&out)
        );
        assert!(
            err.contains(&shown),
            "{given}: wanted {shown:?}\n{}",
            describe(&out)
        );
        assert!(!err.contains("pass --token-file"), "{}", describe(&out));
    }
}

#[test]
fn ctl_connection_refused_hints_that_the_admin_api_is_off() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .token(TokenSource::None)
        .start();
    let out = run_ctl(&proxy.admin_url(), Some(TOKEN), &["status"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection refused"), "{}", describe(&out));
    assert!(
        err.contains("only runs when it has a token"),
        "{}",
        describe(&out)
    );

    // With -c, the hint names the config; the config has no token file.
    let config = proxy.config_path().to_str().unwrap();
    let out = ctl_in(proxy.dir(), Some(TOKEN), &["-c", config, "status"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection refused"), "{}", describe(&out));
    assert!(err.contains(config), "{}", describe(&out));
}

#[test]
fn ctl_reads_admin_address_and_token_file_from_the_config() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let config = proxy.config_path().to_str().unwrap().to_string();

    // No --admin, no token in the environment: both come from the config.
    let out = ctl_in(
        proxy.dir(),
        None,
        &["-c", &config, "switch", "api", "green"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.active("api"), "green");

    // $SWITCHYARD_ADMIN_TOKEN wins over the config's token file...
    let out = ctl_in(
        proxy.dir(),
        Some("wrong-token-0123456789"),
        &["-c", &config, "status"],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        describe(&out)
    );
    // ...and --token-file wins over both.
    let token_file = proxy.token_path().to_str().unwrap();
    let out = ctl_in(
        proxy.dir(),
        Some("wrong-token-0123456789"),
        &["-c", &config, "--token-file", token_file, "status"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    // --admin wins over the config's [listen] admin.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = ctl_in(
        proxy.dir(),
        None,
        &["-c", &config, "--admin", &dead, "status"],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dead),
        "{}",
        describe(&out)
    );

    // A configured token file that is missing: said, with the command that creates it.
    std::fs::remove_file(proxy.token_path()).unwrap();
    let out = ctl_in(proxy.dir(), None, &["-c", &config, "status"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{}", describe(&out));
    assert!(err.contains(token_file), "{}", describe(&out));
    assert!(err.contains("umask 077"), "{}", describe(&out));
}

#[test]
fn run_says_the_configured_token_file_is_missing_and_how_to_create_it() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    std::fs::remove_file(proxy.token_path()).unwrap();
    proxy.relaunch();
    let token = proxy.token_path().to_str().unwrap().to_string();
    assert!(
        poll_until(Duration::from_secs(10), || {
            let e = proxy.stderr_text();
            e.contains("does not exist") && e.contains(&token) && e.contains("umask 077")
        }),
        "stderr does not name the missing token file and the command:\n{}",
        proxy.stderr_text()
    );
}

#[test]
fn ctl_help_409_and_wait_healthy_wording() {
    // Help: SERVICE and COLOR are explained.
    let out = std::process::Command::new(BIN)
        .args(["ctl", "switch", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for line in ["A service name", "The color to switch to"] {
        assert!(help.contains(line), "help lacks {line:?}:\n{help}");
    }

    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    green.set_healthy(false);
    let svc = service_with("api", &[&blue], &[&green], "blue", &fast_health());
    let proxy = ProxyBuilder::new(format!("{svc}{}", route(None, "/", "api"))).start();
    proxy.wait_health(
        "api",
        &[(&blue, "healthy"), (&green, "unhealthy")],
        Duration::from_secs(10),
    );
    // The 409 names the flag that exists.
    let out = proxy.ctl(&["switch", "api", "green"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("409") && err.contains("--force"),
        "{}",
        describe(&out)
    );
    assert!(!err.contains("pass force"), "{}", describe(&out));

    // A satisfied wait does not read as still waiting.
    green.set_healthy(true);
    proxy.wait_health(
        "api",
        &[(&blue, "healthy"), (&green, "healthy")],
        Duration::from_secs(10),
    );
    let out = proxy.ctl(&["switch", "api", "green", "--wait-healthy", "10s"]);
    assert!(out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("api green: healthy (1 healthy, 1 needed)"),
        "{}",
        describe(&out)
    );
    assert!(!err.contains("waiting"), "{}", describe(&out));
}

/// A request the admin listener cannot parse is closed without a trace of
/// its bytes in the log: they carry the bearer token and cookies.
#[test]
fn unparsable_admin_requests_never_log_the_token_or_cookies() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        // Even at the most verbose level.
        .log_filter("trace")
        .start();
    let cookie = "session=SECRETCOOKIE0123";
    for (admin, request) in [
        (true, format!("GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nCookie: {cookie}\r\nX: a\0b\r\n\r\n")),
        (true, format!("GET /a b c HTTP/1.1 x\r\nAuthorization: Bearer {TOKEN}\r\nCookie: {cookie}\r\n\r\n")),
        (false, format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nCookie: {cookie}\r\nX: a\0b\r\n\r\n")),
    ] {
        let addr = if admin { proxy.admin_addr() } else { proxy.http_addr() };
        let mut c = RawConn::connect(&addr);
        c.send(request.as_bytes()).unwrap();
        // Pingora logs about a request before it closes the connection, so
        // once closed, whatever it would log is in the log.
        assert!(
            c.wait_closed(Duration::from_secs(5)).is_some(),
            "not closed: {request:?}"
        );
    }
    let log = proxy.stderr_text();
    assert!(!log.contains(TOKEN), "token in the log:\n{log}");
    assert!(!log.contains("SECRETCOOKIE"), "cookie in the log:\n{log}");
}

/// An error names its cause once, not once per layer.
#[test]
fn ctl_errors_name_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl_in(dir.path(), None, &["-c", "missing.toml", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `ctl status | head -1`: a reader that goes away ends ctl quietly (by
/// SIGPIPE, as other tools), never with a panic.
#[test]
fn ctl_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let mut child = spawn_ctl(&proxy.admin_url(), Some(proxy.token()), &["status"]);
    drop(child.stdout.take());
    let out = wait_output_with_deadline(child, Duration::from_secs(10), "ctl status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
}
