//! The access log (`[access_log]`) end to end: the real binary, real
//! upstreams, and the lines read back from its stdout or its file; and,
//! in process, that a line sampled out costs no allocation.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use common::openai::{FakeOpenAi, MODEL};
use common::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// Counts this test binary's allocations per thread, for
/// [`a_line_sampled_out_costs_no_allocation`].
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(|n| n.get())
}

/// Every field of a line, in the order written.
const FIELDS: [&str; 16] = [
    "timestamp",
    "request_id",
    "client",
    "method",
    "host",
    "path",
    "status",
    "service",
    "color",
    "route",
    "backend",
    "upstream_time_ms",
    "total_time_ms",
    "bytes_in",
    "bytes_out",
    "refusal",
];

/// Parses an access log: one JSON object per line, each with exactly
/// [`FIELDS`] in that order. Panics (with the text) on anything else, so
/// a stray ordinary log line or a torn line fails the test.
fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("not one JSON object ({e}): {line:?}\n--- log ---\n{text}")
            });
            let keys: Vec<&str> = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"))
                .keys()
                .map(String::as_str)
                .collect();
            let mut sorted = FIELDS.to_vec();
            sorted.sort_unstable();
            assert_eq!(keys, sorted, "fields of {line}");
            let order: Vec<usize> = FIELDS
                .iter()
                .map(|f| line.find(&format!("\"{f}\":")).expect("field"))
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "field order: {line}");
            v
        })
        .collect()
}

/// Polls `read` until it holds a line with this request id; returns it.
fn line_for(read: impl Fn() -> String, request_id: &str) -> Value {
    let mut found = None;
    let ok = poll_until(DEADLINE, || {
        found = parse_lines(&read())
            .into_iter()
            .find(|l| l["request_id"] == request_id);
        found.is_some()
    });
    assert!(
        ok,
        "no access log line for {request_id} within {DEADLINE:?}:\n{}",
        read()
    );
    found.unwrap()
}

fn request_id(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .unwrap_or_else(|| panic!("no X-Request-Id: {reply:?}"))
        .to_string()
}

/// Service `web` (blue active) on `/api/`, `/limited/` behind a one-a-minute
/// rate limit keyed by `X-Api-Key`, nothing else routed; `access` is
/// appended as the `[access_log]` table's keys (none: defaults).
fn web(blue: &Upstream, green: &Upstream, access: &str) -> String {
    let mut s = service("web", &[blue], &[green], "blue");
    s.push_str("[rate_limits.tight]\nrate = \"1/m\"\nkey = \"header:X-Api-Key\"\n\n");
    s.push_str(&route(None, "/api/", "web"));
    s.push_str(&route_with("/limited/", "web", "rate_limit = \"tight\""));
    if !access.is_empty() {
        s.push_str(&format!("[access_log]\n{}\n", access.trim()));
    }
    s
}

#[test]
fn a_proxied_request_is_one_line_with_every_field() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // The ordinary log at error only: the access log does not depend on RUST_LOG.
    let proxy = ProxyBuilder::new(web(&blue, &green, ""))
        .log_filter("error")
        .start();
    let body = b"hello=world";
    let reply = request(
        "POST",
        &format!("{}/api/items?page=2&q=shoes", proxy.http_url()),
        &[("host", "shop.test:8080")],
        Some(body),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let id = request_id(&reply);
    let line = line_for(|| proxy.stdout_text(), &id);

    let ts = line["timestamp"].as_str().unwrap();
    // RFC 3339, UTC, milliseconds: 2026-11-30T01:44:19.123Z
    assert!(
        ts.len() == 24
            && ts.ends_with('Z')
            && ts.as_bytes()[10] == b'T'
            && ts.as_bytes()[19] == b'.',
        "{ts}"
    );
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["host"], "shop.test");
    assert_eq!(line["path"], "/api/items", "no query string");
    assert_eq!(line["status"], 200);
    assert_eq!(line["service"], "web");
    assert_eq!(line["color"], "blue");
    assert_eq!(line["route"], "*/api/");
    assert_eq!(line["backend"], blue.addr());
    assert_eq!(line["bytes_in"], body.len());
    assert_eq!(line["bytes_out"], reply.body.len());
    assert_eq!(line["refusal"], Value::Null);
    let upstream = line["upstream_time_ms"].as_f64().expect("upstream_time_ms");
    let total = line["total_time_ms"].as_f64().expect("total_time_ms");
    assert!(upstream >= 0.0 && total >= upstream, "{line}");

    // Nothing but access lines on stdout, and no access line on stderr.
    parse_lines(&proxy.stdout_text());
    assert!(
        !proxy.stderr_text().contains(&id),
        "{}",
        proxy.stderr_text()
    );
}

#[test]
fn refused_requests_are_logged_with_their_reason() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(web(&blue, &green, "")).start();

    // No route: no service, color, route or backend.
    let reply = request(
        "GET",
        &format!("{}/nowhere?x=1", proxy.http_url()),
        &[],
        None,
    );
    assert_eq!(reply.status, 404, "{reply:?}");
    let line = line_for(|| proxy.stdout_text(), &request_id(&reply));
    assert_eq!(line["status"], 404);
    assert_eq!(line["refusal"], "no_route");
    assert_eq!(line["path"], "/nowhere");
    for field in ["service", "color", "route", "backend", "upstream_time_ms"] {
        assert_eq!(line[field], Value::Null, "{field}: {line}");
    }

    // Over the rate limit: the route and service are known, no backend.
    let url = format!("{}/limited/x", proxy.http_url());
    let key = [("x-api-key", "k1")];
    assert_eq!(request("GET", &url, &key, None).status, 200);
    let reply = request("GET", &url, &key, None);
    assert_eq!(reply.status, 429, "{reply:?}");
    let line = line_for(|| proxy.stdout_text(), &request_id(&reply));
    assert_eq!(line["status"], 429);
    assert_eq!(line["refusal"], "rate_limited");
    assert_eq!(line["service"], "web");
    assert_eq!(line["color"], "blue");
    assert_eq!(line["route"], "*/limited/");
    assert_eq!(line["backend"], Value::Null);
    assert_eq!(line["upstream_time_ms"], Value::Null);
    assert_eq!(
        blue.received("/limited/"),
        1,
        "the refused one never reached blue"
    );
}

#[test]
fn requests_over_https_are_logged_too() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let certs = tempfile::tempdir().unwrap();
    let (site, _) = common::tls::self_signed_site(certs.path(), "shop.test");
    let tables = format!("[tls]\n{site}");
    let proxy = ProxyBuilder::new(web(&blue, &green, ""))
        .https(&tables)
        .start();
    let recorder = std::sync::Arc::new(common::tls::Recorder::default());
    let config = std::sync::Arc::new(common::tls::Recorder::config(recorder));
    let mut conn = common::tls::tls_connect(&proxy.https_addr(), "shop.test", config);
    let answer = common::tls::exchange(
        &mut conn,
        &common::tls::get_request("shop.test", "/api/tls?token=x"),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let id = answer.header("x-request-id").expect("X-Request-Id");
    let line = line_for(|| proxy.stdout_text(), id);
    assert_eq!(line["path"], "/api/tls");
    assert_eq!(line["host"], "shop.test");
    assert_eq!(line["backend"], blue.addr());
}

#[test]
fn sample_zero_logs_only_errors_and_refusals() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(web(&blue, &green, "sample = 0")).start();
    let mut ok_ids = Vec::new();
    for i in 0..5 {
        let reply = request("GET", &format!("{}/api/{i}", proxy.http_url()), &[], None);
        assert_eq!(reply.status, 200);
        ok_ids.push(request_id(&reply));
    }
    let reply = request("GET", &format!("{}/nowhere", proxy.http_url()), &[], None);
    assert_eq!(reply.status, 404);
    // One writer thread keeps the order: once the 404 is written, any
    // line of the earlier 200s would be too.
    line_for(|| proxy.stdout_text(), &request_id(&reply));
    let lines = parse_lines(&proxy.stdout_text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(ok_ids
        .iter()
        .all(|id| lines[0]["request_id"] != id.as_str()));
}

#[test]
fn sample_one_half_keeps_some_successes() {
    // Not a statistics test: with 0.5, 40 successes all dropped or all
    // kept is a 2^-39 chance; either means sampling is not applied.
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(web(&blue, &green, "sample = 0.5")).start();
    for i in 0..40 {
        assert_eq!(proxy.get(&format!("/api/{i}"), None).0, 200);
    }
    let reply = request("GET", &format!("{}/nowhere", proxy.http_url()), &[], None);
    line_for(|| proxy.stdout_text(), &request_id(&reply));
    let ok = parse_lines(&proxy.stdout_text())
        .iter()
        .filter(|l| l["status"] == 200)
        .count();
    assert!(ok > 0 && ok < 40, "{ok} of 40 successes logged");
}

#[test]
fn path_sends_lines_to_a_file_not_stdout() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("access.log");
    let access = format!("path = {}", toml_str(file.to_str().unwrap()));
    let proxy = ProxyBuilder::new(web(&blue, &green, &access)).start();
    let reply = request("GET", &format!("{}/api/file", proxy.http_url()), &[], None);
    assert_eq!(reply.status, 200);
    let read = || fs::read_to_string(&file).unwrap_or_default();
    let line = line_for(read, &request_id(&reply));
    assert_eq!(line["path"], "/api/file");
    assert_eq!(proxy.stdout_text(), "", "stdout holds no access lines");
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
}

/// Threads of process `pid` named `name` (`/proc/PID/task/*/comm`).
fn threads_named(pid: i32, name: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn enabled_false_writes_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // On: the writer thread starts with the first line.
    let on = ProxyBuilder::new(web(&blue, &green, "")).start();
    let reply = request("GET", &format!("{}/api/x", on.http_url()), &[], None);
    line_for(|| on.stdout_text(), &request_id(&reply));
    assert_eq!(threads_named(on.pid(), "access-log"), 1);
    drop(on);
    // Off: no observer, so no writer thread and nothing on stdout, after
    // a success and a refusal (which sampling would keep).
    let off = ProxyBuilder::new(web(&blue, &green, "enabled = false")).start();
    assert_eq!(off.get("/api/x", None).0, 200);
    assert_eq!(off.get("/nowhere", None).0, 404);
    assert_eq!(threads_named(off.pid(), "access-log"), 0);
    assert_eq!(off.stdout_text(), "");
}

#[test]
fn a_stalled_writer_drops_lines_and_never_delays_a_response() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // The access log is a FIFO that is opened for reading but never read:
    // a disk that stopped. Its pipe buffer is cut to one page, so a few
    // lines fill it and the writer thread blocks for good.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // SAFETY: fcntl on a descriptor we own.
    let size = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size > 0, "F_SETPIPE_SZ failed");
    let access = format!(
        "path = {}
buffer_lines = 8",
        toml_str(fifo.to_str().unwrap())
    );
    let proxy = ProxyBuilder::new(web(&blue, &green, &access))
        .metrics()
        .start();
    // Far more lines than the pipe and the buffer hold; each answer comes
    // within the client's timeout, or the request panics.
    let requests = 20 + (size as usize) / 100;
    for i in 0..requests {
        assert_eq!(proxy.get(&format!("/api/{i}"), None).0, 200);
    }
    assert!(
        poll_until(DEADLINE, || proxy
            .stderr_text()
            .contains("access log lines dropped")),
        "no word of dropped lines on stderr:\n{}",
        proxy.stderr_text()
    );
    assert_eq!(
        proxy
            .stderr_text()
            .matches("access log lines dropped")
            .count(),
        1,
        "said once"
    );
    // And counted for the metrics.
    let dropped = proxy
        .metric("switchyard_access_log_dropped_lines_total")
        .expect("a dropped-lines series");
    assert!(dropped > 0.0);
    drop(reader);
}

#[test]
fn check_says_when_the_access_log_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let missing = dir.path().join("no-such-dir").join("access.log");
    let config = dir.path().join("switchyard.toml");
    let text = format!(
        "[server]\nstate_dir = {}\n\n[services.web]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n\n\
         [[routes]]\npath = \"/\"\nservice = \"web\"\n\n[access_log]\npath = {}\n",
        toml_str(state.to_str().unwrap()),
        toml_str(missing.to_str().unwrap())
    );
    fs::write(&config, &text).unwrap();
    let out = run_check(&config, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    let at = format!("{}:13:8: access log", config.display());
    assert!(stderr.contains(&at), "{}", describe(&out));
    assert!(stderr.contains("does not exist"), "{}", describe(&out));

    fs::create_dir(missing.parent().unwrap()).unwrap();
    let out = run_check(&config, None);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!Path::new(&missing).exists(), "check creates nothing");
}

#[test]
fn secrets_never_reach_the_access_log_or_stderr() {
    const SECRETS: [&str; 6] = [
        "s3cret-bearer",
        "s3cret-cookie",
        "s3cret-api-key",
        "s3cret-budget-key",
        "s3cret-query-token",
        "s3cret-refused",
    ];
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let fake = FakeOpenAi::start();
    let mut body = web(&blue, &green, "");
    body.push_str(&fake.service("ai"));
    body.push_str(
        "[token_budgets.ai]\ntokens_per_minute = 100000\nkey = \"header:X-Budget-Key\"\nmax_tokens = 2048\n\n",
    );
    body.push_str(&route_with("/v1/", "ai", "token_budget = \"ai\""));
    // The most verbose ordinary log there is.
    let proxy = ProxyBuilder::new(body).log_filter("trace").start();

    let headers = [
        ("authorization", "Bearer s3cret-bearer"),
        ("cookie", "session=s3cret-cookie"),
        ("x-api-key", "s3cret-api-key"),
        ("x-budget-key", "s3cret-budget-key"),
    ];
    let mut ids = Vec::new();
    let api = format!("{}/api/x?access_token=s3cret-query-token", proxy.http_url());
    let reply = request("GET", &api, &headers, None);
    assert_eq!(reply.status, 200, "{reply:?}");
    ids.push(request_id(&reply));
    let chat = serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    }))
    .unwrap();
    let ai = format!(
        "{}/v1/chat/completions?access_token=s3cret-query-token",
        proxy.http_url()
    );
    let mut ai_headers = headers.to_vec();
    ai_headers.push(("content-type", "application/json"));
    let reply = request("POST", &ai, &ai_headers, Some(&chat));
    assert_eq!(reply.status, 200, "{reply:?}");
    ids.push(request_id(&reply));
    // Refused ones: no route, and over the rate limit keyed by the API key.
    let refused = format!("{}/nowhere?access_token=s3cret-refused", proxy.http_url());
    let reply = request("GET", &refused, &headers, None);
    assert_eq!(reply.status, 404);
    ids.push(request_id(&reply));
    let limited = format!("{}/limited/?access_token=s3cret-refused", proxy.http_url());
    assert_eq!(request("GET", &limited, &headers, None).status, 200);
    let reply = request("GET", &limited, &headers, None);
    assert_eq!(reply.status, 429);
    ids.push(request_id(&reply));

    for id in &ids {
        line_for(|| proxy.stdout_text(), id);
    }
    // The requests did reach the backends with their secrets: the check
    // below is about the logs, not about requests that never went out.
    assert!(blue
        .last_request()
        .is_some_and(|r| r.header("authorization") == Some("Bearer s3cret-bearer")));
    let access = proxy.stdout_text();
    let stderr = proxy.stderr_text();
    assert!(!stderr.is_empty(), "trace logging wrote nothing to stderr");
    for secret in SECRETS {
        assert!(
            !access.contains(secret),
            "{secret} in the access log:\n{access}"
        );
        assert!(!stderr.contains(secret), "{secret} on stderr:\n{stderr}");
    }
    assert!(!access.contains("access_token"), "{access}");
    assert!(!stderr.contains("access_token"), "{stderr}");
}

#[test]
fn a_line_sampled_out_costs_no_allocation() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use switchyard::access_log::AccessLog;
    use switchyard::config::Config;
    use switchyard::record::{Observer, RequestRecord};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let text = format!(
        "[services.web]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n\n\
         [[routes]]\npath = \"/\"\nservice = \"web\"\n\n[access_log]\npath = {}\n",
        toml_str(file.to_str().unwrap())
    );
    let mut config = Config::parse(Path::new("t.toml"), &text).unwrap();
    // The smallest share above 0: the random draw is made (and must not
    // allocate) but practically never keeps a line (2^-53 a request).
    config.access_log.sample = f64::MIN_POSITIVE;
    let log = AccessLog::new(&config).unwrap().expect("enabled");
    let mut record = RequestRecord {
        request_id: "r",
        client: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        method: "GET",
        host: Some("shop.test"),
        path: "/",
        status: 404,
        service: Some("web"),
        color: None,
        route: Some("*/"),
        backend: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
        upstream_time: Some(Duration::from_millis(1)),
        total_time: Duration::from_millis(2),
        bytes_in: 0,
        bytes_out: 10,
        refusal: None,
        stream: false,
    };
    // Warm up: the writer thread and this thread's random generator.
    log.observe(&record);
    record.status = 200;
    log.observe(&record);
    let before = allocations();
    for _ in 0..1000 {
        log.observe(&record);
    }
    assert_eq!(
        allocations() - before,
        0,
        "allocations for 1000 sampled-out lines"
    );
    // Kept lines do allocate: the counter sees them.
    record.status = 500;
    log.observe(&record);
    assert!(allocations() > before);
}
