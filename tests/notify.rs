//! Webhook notifications end to end: the real binary posts to a local
//! receiver on 127.0.0.1 (Discord, Slack and JSON shapes), retries after a
//! 500, and neither a hanging nor a refusing receiver holds up requests or
//! switches. The URL is a secret: it never shows in stderr, `/status` or
//! the history. `check` locates every webhook mistake.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The secret part of every test URL: it must never be seen anywhere but
/// in the receiver's request line.
const SECRET: &str = "SECRET-tok-5f2b9c";
/// How long the receiver holds a request at most when told to hold (60 s):
/// what "while the receiver is held" means, and so the bound of the loops
/// that must finish meanwhile.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct ReceiverState {
    /// Every request body received, in order, with its path.
    posts: Vec<(String, Value)>,
    /// Answer 500 to this many requests before answering 204.
    fail_next: usize,
    /// While true, requests are read but not answered.
    hold: bool,
    /// Requests read while held (not answered yet).
    held: usize,
}

/// A webhook receiver on 127.0.0.1 with an OS-chosen port.
struct Receiver {
    addr: SocketAddr,
    state: Arc<(Mutex<ReceiverState>, Condvar)>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<ReceiverState>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/api/webhooks/4242/{SECRET}", self.addr)
    }

    fn posts(&self) -> Vec<(String, Value)> {
        self.state.0.lock().unwrap().posts.clone()
    }

    fn fail_next(&self, n: usize) {
        self.state.0.lock().unwrap().fail_next = n;
    }

    fn hold(&self, on: bool) {
        self.state.0.lock().unwrap().hold = on;
        self.state.1.notify_all();
    }

    fn held(&self) -> usize {
        self.state.0.lock().unwrap().held
    }

    /// Waits until `n` posts have arrived; panics with what did otherwise.
    fn wait_posts(&self, n: usize) -> Vec<(String, Value)> {
        let ok = poll_until(Duration::from_secs(15), || self.posts().len() >= n);
        let posts = self.posts();
        assert!(
            ok,
            "expected {n} webhook posts, got {}: {posts:?}",
            posts.len()
        );
        posts
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Lets held connections finish.
        self.hold(false);
    }
}

/// Reads one request (head and `Content-Length` body), records it, answers.
fn serve(mut conn: TcpStream, st: &(Mutex<ReceiverState>, Condvar)) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let (lock, cv) = st;
    let mut s = lock.lock().unwrap();
    if s.hold {
        s.held += 1;
        let deadline = Instant::now() + HOLD_LIMIT;
        while s.hold && Instant::now() < deadline {
            s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
        }
        return; // closes without an answer
    }
    s.posts.push((path, body));
    let status = if s.fail_next > 0 {
        s.fail_next -= 1;
        "500 Internal Server Error"
    } else {
        "204 No Content"
    };
    drop(s);
    let _ = conn.write_all(
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    );
}

/// A 0600 (or `mode`) file holding `url`.
fn url_file(dir: &Path, name: &str, url: &str, mode: u32) -> PathBuf {
    let path = dir.join(format!("{name}.webhook"));
    fs::write(&path, format!("{url}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// One `[[notify.webhooks]]` table.
fn webhook(name: &str, file: &Path, format: &str, events: Option<&str>) -> String {
    let events = events.map_or(String::new(), |e| format!("events = {e}\n"));
    format!(
        "\n[[notify.webhooks]]\nname = {}\nurl_file = {}\nformat = {}\n{events}",
        toml_str(name),
        toml_str(file.to_str().unwrap()),
        toml_str(format)
    )
}

/// The URL and its secret appear nowhere the operator or a client sees.
fn assert_secret_kept(proxy: &Proxy, url: &str) {
    let stderr = proxy.stderr_text();
    assert!(
        !stderr.contains(SECRET) && !stderr.contains(url),
        "URL in stderr:\n{stderr}"
    );
    let status = proxy.status().to_string();
    assert!(!status.contains(SECRET), "URL in /status: {status}");
    let (_, history) = proxy.admin("GET", "/history", None);
    assert!(
        !history.to_string().contains(SECRET),
        "URL in history: {history}"
    );
}

#[test]
fn a_switch_and_a_rollback_post_discord_messages() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let file = url_file(dir.path(), "discord", &rx.url(), 0o600);
    let body = simple_api(&blue, &green) + &webhook("team-discord", &file, "discord", None);
    let proxy = ProxyBuilder::new(body).start();

    proxy.switch("api", "green", Some("release 42"));
    let posts = rx.wait_posts(1);
    let (path, msg) = &posts[0];
    assert!(path.ends_with(SECRET), "{path}");
    let content = msg["content"].as_str().unwrap_or_default();
    for word in ["api", "blue", "green", "release 42"] {
        assert!(content.contains(word), "{word:?} not in {msg}");
    }
    let embed = &msg["embeds"][0];
    assert_eq!(embed["description"], "release 42", "{msg}");
    assert_eq!(embed["color"], 0x2ecc71, "green's color: {msg}");
    let fields: Vec<(String, String)> = embed["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().into(),
                f["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(fields.contains(&("from".into(), "blue".into())), "{msg}");
    assert!(fields.contains(&("to".into(), "green".into())), "{msg}");
    assert_eq!(
        msg["allowed_mentions"]["parse"],
        serde_json::json!([]),
        "{msg}"
    );

    let (code, v) = proxy.admin(
        "POST",
        "/services/api/rollback",
        Some(r#"{"reason": "errors after release 42"}"#),
    );
    assert_eq!(code, 200, "{v}");
    let posts = rx.wait_posts(2);
    let msg = &posts[1].1;
    let content = msg["content"].as_str().unwrap_or_default();
    assert!(content.contains("rolled back from green to blue"), "{msg}");
    assert!(content.contains("errors after release 42"), "{msg}");
    assert!(
        msg["embeds"][0]["title"]
            .as_str()
            .unwrap()
            .starts_with("rollback"),
        "{msg}"
    );
    assert_secret_kept(&proxy, &rx.url());
}

#[test]
fn slack_and_json_shapes_and_the_events_filter() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let (slack, json) = (Receiver::start(), Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let body = simple_api(&blue, &green)
        + &webhook(
            "ops-slack",
            &url_file(dir.path(), "slack", &slack.url(), 0o600),
            "slack",
            None,
        )
        + &webhook(
            "scripts",
            &url_file(dir.path(), "json", &json.url(), 0o600),
            "json",
            Some(r#"["rollback"]"#),
        );
    let proxy = ProxyBuilder::new(body).start();

    proxy.switch("api", "green", Some("canary ok"));
    let text = slack.wait_posts(1)[0].1["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("api switched from blue to green: canary ok (by token:default)"),
        "{text}"
    );

    let (code, v) = proxy.admin(
        "POST",
        "/services/api/rollback",
        Some(r#"{"reason": "p95 too high"}"#),
    );
    assert_eq!(code, 200, "{v}");
    let posts = json.wait_posts(1);
    let msg = &posts[0].1;
    assert_eq!(msg["event"], "rollback", "{msg}");
    assert_eq!(msg["service"], "api", "{msg}");
    assert_eq!(
        (msg["from"].as_str(), msg["to"].as_str()),
        (Some("green"), Some("blue")),
        "{msg}"
    );
    assert_eq!(msg["reason"], "p95 too high", "{msg}");
    // Who made the change: the token's name, as in the history.
    assert_eq!(msg["actor"], "token:default", "{msg}");
    assert!(
        msg["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{msg}"
    );
    slack.wait_posts(2);
    // Maintenance is a `switch` event: Slack hears it, the rollback-only hook does not.
    let (code, v) = proxy.admin("POST", "/services/api/maintenance", Some(r#"{"on": true}"#));
    assert_eq!(code, 200, "{v}");
    let text = slack.wait_posts(3)[2].1["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(text.contains("api: maintenance mode on"), "{text}");
    assert_eq!(
        json.posts().len(),
        1,
        "only the rollback reaches the json hook"
    );
    assert_secret_kept(&proxy, &slack.url());
    assert_secret_kept(&proxy, &json.url());
}

#[test]
fn the_active_pool_losing_health_is_posted_and_its_return() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let mut body = service_with("api", &[&blue], &[&green], "blue", &fast_health());
    body += &route(None, "/", "api");
    body += &webhook(
        "ops",
        &url_file(dir.path(), "ops", &rx.url(), 0o600),
        "json",
        Some(r#"["health"]"#),
    );
    let proxy = ProxyBuilder::new(body).start();
    proxy.wait_health(
        "api",
        &[(&blue, "healthy"), (&green, "healthy")],
        Duration::from_secs(10),
    );
    assert!(
        rx.posts().is_empty(),
        "coming up healthy is no news: {:?}",
        rx.posts()
    );

    // The idle pool's health is not news either.
    green.set_healthy(false);
    proxy.wait_health("api", &[(&green, "unhealthy")], Duration::from_secs(10));
    blue.set_healthy(false);
    let msg = rx.wait_posts(1)[0].1.clone();
    assert_eq!(msg["event"], "health", "{msg}");
    assert_eq!(msg["to"], "unhealthy", "{msg}");
    assert!(
        msg["summary"]
            .as_str()
            .unwrap()
            .contains("active pool blue has no healthy backend"),
        "{msg}"
    );
    assert!(
        msg["reason"].as_str().unwrap().contains(&blue.addr()),
        "{msg}"
    );

    blue.set_healthy(true);
    let msg = rx.wait_posts(2)[1].1.clone();
    assert_eq!(msg["to"], "healthy", "{msg}");
    assert_eq!(rx.posts().len(), 2, "{:?}", rx.posts());
}

#[test]
fn a_500_is_retried_until_delivered() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let rx = Receiver::start();
    rx.fail_next(2);
    let dir = tempfile::tempdir().unwrap();
    let file = url_file(dir.path(), "d", &rx.url(), 0o600);
    let proxy = ProxyBuilder::new(
        simple_api(&blue, &green) + &webhook("team-discord", &file, "discord", None),
    )
    .start();
    proxy.switch("api", "green", Some("retry me"));
    let posts = rx.wait_posts(3);
    assert_eq!(posts[0].1, posts[2].1, "the same notice is sent again");
    assert!(poll_until(Duration::from_secs(5), || proxy
        .stderr_text()
        .contains("webhook delivery failed; retrying")));
    let stderr = proxy.stderr_text();
    assert!(
        stderr.contains("team-discord") && stderr.contains("status 500"),
        "{stderr}"
    );
    assert_eq!(rx.posts().len(), 3, "delivered once it succeeded");
    assert_secret_kept(&proxy, &rx.url());
}

/// Requests and switches go on while the receiver holds every delivery;
/// the queue fills, drops are said once.
#[test]
fn a_hanging_receiver_holds_up_neither_requests_nor_switches() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let rx = Receiver::start();
    rx.hold(true);
    let dir = tempfile::tempdir().unwrap();
    let file = url_file(dir.path(), "d", &rx.url(), 0o600);
    let proxy = ProxyBuilder::new(
        simple_api(&blue, &green) + &webhook("team-discord", &file, "discord", None),
    )
    .metrics()
    .start();
    let held_since = Instant::now();
    proxy.switch("api", "green", None);
    assert!(
        poll_until(Duration::from_secs(10), || rx.held() >= 1),
        "the receiver got the first post"
    );
    // More switches than the queue holds, each with a request, all while held.
    for i in 0..300 {
        let to = if i % 2 == 0 { "blue" } else { "green" };
        proxy.switch("api", to, None);
        let (code, body) = proxy.get("/x", None);
        assert_eq!((code, body.starts_with(to)), (200, true), "{code} {body}");
        // Not a speed test: the loop just has to end while the receiver holds.
        assert!(
            held_since.elapsed() < HOLD_LIMIT,
            "switch {i}: waited for the receiver"
        );
    }
    assert!(rx.posts().is_empty(), "the receiver was held throughout");
    assert!(rx.held() >= 1);
    let stderr = proxy.stderr_text();
    assert_eq!(stderr.matches("webhook queue full").count(), 1, "{stderr}");
    // The loss is counted where an alert can see it, under the webhook's name.
    let dropped = proxy
        .metric("switchyard_notifications_dropped_total{webhook=\"team-discord\"}")
        .expect("a dropped-notice series");
    assert!(dropped >= (300 - 256) as f64, "{dropped} dropped");
    assert_secret_kept(&proxy, &rx.url());
}

#[test]
fn a_refusing_receiver_holds_up_nothing() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    // A port that was just free: connections to it are refused.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/webhooks/1/{SECRET}");
    let dir = tempfile::tempdir().unwrap();
    let file = url_file(dir.path(), "d", &url, 0o600);
    let proxy = ProxyBuilder::new(
        simple_api(&blue, &green) + &webhook("team-discord", &file, "discord", None),
    )
    .start();
    for i in 0..20 {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        proxy.switch("api", to, None);
        assert_eq!(proxy.get("/x", None).0, 200);
    }
    assert!(poll_until(Duration::from_secs(10), || proxy
        .stderr_text()
        .contains("connection: connection refused")));
    assert_secret_kept(&proxy, &url);
}

#[test]
fn check_locates_webhook_mistakes() {
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let dir = tempfile::tempdir().unwrap();
    let private = url_file(
        dir.path(),
        "private",
        &format!("http://127.0.0.1:9/{SECRET}"),
        0o600,
    );
    let open = url_file(
        dir.path(),
        "open",
        &format!("http://127.0.0.1:9/{SECRET}"),
        0o644,
    );
    let ftp = url_file(
        dir.path(),
        "ftp",
        &format!("ftp://127.0.0.1/{SECRET}"),
        0o600,
    );
    let state = dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    let head = format!(
        "[server]\nstate_dir = {}\n[listen]\nhttp = \"127.0.0.1:{}\"\n{}",
        toml_str(state.to_str().unwrap()),
        free_port(),
        simple_api(&blue, &green)
    );
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{}url_env = \"HOOK_URL\"\n", webhook("a", &private, "discord", None)),
            "url_env = \"HOOK_URL\"",
            "not both",
        ),
        (webhook("b", &open, "discord", None), "url_file =", "chmod 600"),
        (webhook("c", &private, "teams", None), "format =", "unknown webhook format \"teams\""),
        (
            webhook("d", &private, "json", Some(r#"["switch", "deploys"]"#)),
            "\"deploys\"",
            "unknown event \"deploys\"",
        ),
        (webhook("e", &ftp, "json", None), "url_file =", "not an http:// or https:// URL"),
        (
            "\n[[notify.webhooks]]\nname = \"f\"\nurl_env = \"SWITCHYARD_TEST_UNSET_HOOK\"\nformat = \"slack\"\n".into(),
            "url_env =",
            "SWITCHYARD_TEST_UNSET_HOOK",
        ),
    ];
    for (table, at, message) in cases {
        let text = format!("{head}{table}");
        let path = dir.path().join("switchyard.toml");
        fs::write(&path, &text).unwrap();
        let out = run_check(&path, None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{table}: {}", describe(&out));
        let (line_no, _) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.contains(at))
            .unwrap();
        let located = format!("{}:{}:", path.display(), line_no + 1);
        let hit = stderr.lines().find(|l| l.contains(message));
        assert!(
            hit.is_some_and(|l| l.starts_with(&located)),
            "{message:?} at {located} for\n{table}\ngot:\n{stderr}"
        );
        assert!(!stderr.contains(SECRET), "URL in check output:\n{stderr}");
    }
}
