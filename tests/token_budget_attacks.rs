//! Token budgets under attack: requests shaped to get more tokens than the
//! budget allows, to wedge the proxy or to leak the key, and backends that
//! answer oddly. The real proxy in front of the fake vLLM
//! ([`FakeOpenAi`]) or a [`Scripted`] backend that writes exact bytes.
//! The friendly cases are in `token_budget.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::openai::{
    budget_proxy, budget_stats, chat, openai_error, post, FakeOpenAi, UsageOverride, MODEL,
};
use common::*;

const DEADLINE: Duration = Duration::from_secs(10);

fn start(fake: &FakeOpenAi, budget: &str) -> Proxy {
    budget_proxy(fake.service("ai"), budget, "", "").start()
}

fn tokens(stats: &Value, name: &str) -> u64 {
    stats["tokens"][name].as_u64().unwrap()
}

/// `reserved + overrun = settled + refunded + kept` and nothing `held`:
/// every reservation ended one way.
fn balanced(proxy: &Proxy) -> bool {
    let s = budget_stats(proxy);
    tokens(&s, "held") == 0
        && tokens(&s, "reserved") + tokens(&s, "overrun")
            == tokens(&s, "settled") + tokens(&s, "refunded") + tokens(&s, "kept")
}

/// How vLLM reads the generation cap of a chat body
/// (`max_completion_tokens or max_tokens`, Python's `or`: 0 and null are
/// "not given"); `None`: it generates until the context is full.
fn vllm_cap(body: &Value) -> Option<u64> {
    let mct = body["max_completion_tokens"].as_u64().filter(|&n| n > 0);
    mct.or_else(|| body["max_tokens"].as_u64())
}

#[test]
fn a_zero_or_null_cap_never_lifts_the_cap_at_the_backend() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 100000\nmax_tokens = 64\ndefault_max_tokens = 32",
    );
    for extra in [
        json!({"max_completion_tokens": 0}),
        json!({"max_completion_tokens": 0, "max_tokens": null}),
        json!({"max_completion_tokens": null}),
        json!({"max_completion_tokens": 0, "max_tokens": 50}),
    ] {
        let before = fake.count();
        let reply = post(&proxy, "/v1/chat/completions", &chat(extra.clone()));
        if reply.status == 400 {
            openai_error(reply.status, reply.header("content-type"), &reply.body);
            assert_eq!(fake.count(), before, "{extra}");
            continue;
        }
        assert_eq!(reply.status, 200, "{extra}: {reply:?}");
        let sent = fake.last_body().unwrap();
        let cap = vllm_cap(&sent);
        assert!(
            cap.is_some_and(|c| (1..=64).contains(&c)),
            "{extra}: the backend reads cap {cap:?} from {sent}"
        );
    }
    // `max_tokens: 0` is vLLM's "echo the prompt, generate nothing": it
    // passes as it is, and costs no completion tokens.
    let body = serde_json::to_vec(&json!({
        "model": MODEL, "prompt": "score me", "echo": true, "max_tokens": 0
    }))
    .unwrap();
    let reply = post(&proxy, "/v1/completions", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(fake.last_body().unwrap()["max_tokens"], 0);
}

/// A completion API can also batch prompts given as embeddings (vLLM's
/// `prompt_embeds`, a list of base64 tensors, each a prompt of its own).
#[test]
fn prompt_embedding_batches_are_reserved_per_prompt() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 2000\nmax_tokens = 100\nmax_body = \"64KiB\"",
    );
    let embeds: Vec<String> = (0..40).map(|_| "AAAAAAAA".to_string()).collect();
    let body = serde_json::to_vec(&json!({
        "model": MODEL, "prompt_embeds": embeds, "max_tokens": 100
    }))
    .unwrap();
    // 40 prompts × 100 tokens can never fit a bucket of 2000.
    let reply = post(&proxy, "/v1/completions", &body);
    assert_eq!(reply.status, 400, "{reply:?}");
    let e = openai_error(reply.status, reply.header("content-type"), &reply.body);
    assert_eq!(e["code"], "tokens_exceed_budget", "{e}");
    // Text prompts and embeddings together are one batch.
    let body = serde_json::to_vec(&json!({
        "model": MODEL, "prompt": ["a", "b"], "prompt_embeds": ["AAAA"], "max_tokens": 100
    }))
    .unwrap();
    let reply = post(&proxy, "/v1/completions", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        tokens(&budget_stats(&proxy), "reserved"),
        body.len() as u64 + 3 * 100
    );
    assert_eq!(fake.count(), 1);
}

#[test]
fn odd_values_and_bodies_are_refused_before_the_backend() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 100000\nmax_tokens = 2048");
    let mut cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("n = u64::MAX", chat(json!({"n": u64::MAX})), 400),
        (
            "n beyond u64",
            br#"{"messages":[],"n":18446744073709551616}"#.to_vec(),
            400,
        ),
        (
            "best_of = u64::MAX",
            chat(json!({"best_of": u64::MAX, "max_tokens": 1})),
            400,
        ),
        ("max_tokens float", chat(json!({"max_tokens": 1e3})), 400),
        (
            "max_tokens 10.0",
            br#"{"messages":[],"max_tokens":10.0}"#.to_vec(),
            400,
        ),
        ("max_tokens string", chat(json!({"max_tokens": "10"})), 400),
        ("max_tokens negative", chat(json!({"max_tokens": -1})), 400),
        (
            "max_tokens huge",
            br#"{"messages":[],"max_tokens":1e400}"#.to_vec(),
            400,
        ),
        ("n = 0", chat(json!({"n": 0})), 400),
        ("stream string", chat(json!({"stream": "true"})), 400),
        (
            "stream_options list",
            chat(json!({"stream": true, "stream_options": []})),
            400,
        ),
        (
            "include_usage string",
            chat(json!({"stream": true, "stream_options": {"include_usage": 1}})),
            400,
        ),
        (
            "not UTF-8",
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            400,
        ),
        (
            "lone surrogate",
            br#"{"messages":[],"x":"\ud800"}"#.to_vec(),
            400,
        ),
        (
            "deep nesting",
            format!("{{\"x\":{}1{}}}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
        ),
        ("trailing garbage", b"{\"messages\":[]} {}".to_vec(), 400),
        ("empty", Vec::new(), 400),
        ("BOM", b"\xef\xbb\xbf{\"messages\":[]}".to_vec(), 400),
        (
            "batch over the bucket",
            serde_json::to_vec(&json!({"messages": [], "n": 100, "max_tokens": 2000})).unwrap(),
            400,
        ),
        (
            "duplicate key, large last",
            br#"{"messages":[],"max_tokens":1,"max_tokens":4096}"#.to_vec(),
            400,
        ),
    ];
    // Many keys, within max_body: parsed, not a crash.
    let mut many = String::from("{");
    for i in 0..20_000 {
        many.push_str(&format!("\"k{i}\":0,"));
    }
    many.push_str("\"max_tokens\":9999}");
    cases.push(("many keys", many.into_bytes(), 400));
    for (what, body, status) in &cases {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let reply = post(&proxy, path, body);
            assert_eq!(reply.status, *status, "{what} {path}: {reply:?}");
            openai_error(reply.status, reply.header("content-type"), &reply.body);
        }
    }
    assert_eq!(fake.count(), 0, "{:?}", fake.bodies());
    assert_eq!(tokens(&budget_stats(&proxy), "reserved"), 0);
    // Duplicate keys: the backend reads the value that was checked.
    let reply = post(
        &proxy,
        "/v1/chat/completions",
        br#"{"messages":[],"max_tokens":4096,"max_tokens":7}"#,
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body, json!({"messages": [], "max_tokens": 7}));
    let raw = String::from_utf8(seen.raw_body).unwrap();
    assert_eq!(raw.matches("max_tokens").count(), 1, "{raw}");
}

/// Reads from `conn` until the server closes it (at most [`DEADLINE`]).
fn read_all(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = Vec::new();
    let _ = conn.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn pipelined_completions_are_each_checked_and_charged() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 100000\nmax_tokens = 2048");
    let good = chat(json!({"max_tokens": 10}));
    let bad = chat(json!({"max_tokens": 9999}));
    let mut wire = Vec::new();
    for (body, close) in [(&good, false), (&bad, false), (&good, true)] {
        wire.extend_from_slice(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n{}\r\n",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        );
        wire.extend_from_slice(body);
    }
    let mut conn = TcpStream::connect(proxy.http_addr()).unwrap();
    conn.write_all(&wire).unwrap();
    let text = read_all(&mut conn);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400", "200"], "{text}");
    assert_eq!(fake.count(), 2);
    let stats = budget_stats(&proxy);
    assert_eq!(stats["admitted"], 2, "{stats}");
    assert_eq!(tokens(&stats, "reserved"), 2 * (good.len() as u64 + 10));
    assert!(
        poll_until(DEADLINE, || balanced(&proxy)),
        "{}",
        budget_stats(&proxy)
    );
}

#[test]
fn http10_completions_are_charged_and_get_no_interim_answer() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 100000\nmax_tokens = 2048");
    for stream in [false, true] {
        let body = chat(json!({"max_tokens": 10, "stream": stream}));
        let mut conn = TcpStream::connect(proxy.http_addr()).unwrap();
        // RFC 9110 §10.1.1: a server ignores an HTTP/1.0 client's Expect
        // and never sends it a 1xx (RFC 9110 §15.2).
        let head = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&body).unwrap();
        let text = read_all(&mut conn);
        assert!(
            text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
            "{text}"
        );
        assert!(!text.contains(" 100 Continue"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("transfer-encoding"),
            "{text}"
        );
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            assert!(!text.contains("total_tokens"), "{text}");
        } else {
            assert!(text.contains("total_tokens"), "{text}");
        }
    }
    assert!(
        poll_until(DEADLINE, || balanced(&proxy)),
        "{}",
        budget_stats(&proxy)
    );
    let stats = budget_stats(&proxy);
    assert_eq!(stats["admitted"], 2, "{stats}");
    assert_eq!(tokens(&stats, "kept"), 0, "{stats}");
}

#[test]
fn expect_continue_is_answered_and_the_completion_charged() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 100000\nmax_tokens = 2048");
    let body = chat(json!({"max_tokens": 10}));
    let mut conn = RawConn::connect(&proxy.http_addr());
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes()).unwrap();
    // The client waits for the 100 before it sends the body.
    conn.stream().set_read_timeout(Some(DEADLINE)).unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while !first.ends_with(b"\r\n\r\n") {
        conn.stream().read_exact(&mut byte).unwrap();
        first.push(byte[0]);
    }
    assert!(
        first.starts_with(b"HTTP/1.1 100 "),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    conn.send(&body).unwrap();
    let reply = conn.read_response(DEADLINE).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    // The backend never sees the Expect: the body was read already.
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.header("expect"), None, "{:?}", seen.headers);
    assert!(poll_until(DEADLINE, || balanced(&proxy)));
}

#[test]
fn a_body_that_stalls_or_is_cut_holds_nothing_and_gets_openai_errors() {
    let fake = FakeOpenAi::start();
    let proxy = budget_proxy(
        fake.service("ai"),
        "tokens_per_minute = 100000\nmax_tokens = 2048\nmax_body = \"1MiB\"",
        "max_body = \"1MiB\"",
        "",
    )
    .server("body_timeout = \"1s\"")
    .start();
    let body = chat(json!({"max_tokens": 10}));
    // Early path (a small Content-Length) and late path (chunked): half a
    // body, then nothing.
    for chunked in [false, true] {
        let mut conn = RawConn::connect(&proxy.http_addr());
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {}", body.len())
        };
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
        );
        conn.send(head.as_bytes()).unwrap();
        let half = &body[..body.len() / 2];
        if chunked {
            conn.send(format!("{:x}\r\n", half.len()).as_bytes())
                .unwrap();
            conn.send(half).unwrap();
            conn.send(b"\r\n").unwrap();
        } else {
            conn.send(half).unwrap();
        }
        let reply = conn.read_response(DEADLINE).unwrap();
        assert_eq!(reply.status, 408, "chunked {chunked}: {reply:?}");
        let e = openai_error(reply.status, reply.header("content-type"), &reply.body);
        assert_eq!(e["type"], "invalid_request_error", "{e}");
    }
    // A body cut short by the client going away.
    for chunked in [false, true] {
        let mut conn = RawConn::connect(&proxy.http_addr());
        let head = if chunked {
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{\"messages\":[".to_string()
        } else {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{{\"messages\":[",
                body.len()
            )
        };
        conn.send(head.as_bytes()).unwrap();
        drop(conn);
    }
    // The proxy still serves, nothing was reserved, nothing was generated.
    assert_eq!(post(&proxy, "/v1/chat/completions", &body).status, 200);
    assert!(poll_until(DEADLINE, || balanced(&proxy)));
    let stats = budget_stats(&proxy);
    assert_eq!(stats["admitted"], 1, "{stats}");
    assert_eq!(fake.finished(), 1);
}

/// Every way a completion can end leaves `reserved = settled + refunded +
/// kept`: none of its tokens stay reserved for ever.
#[test]
fn every_ending_balances_the_counters() {
    let fake = FakeOpenAi::start();
    let proxy = budget_proxy(
        fake.service("ai"),
        "tokens_per_minute = 1000000\nmax_tokens = 2048",
        "concurrency = \"gpu\"\nread_timeout = \"2s\"",
        "[concurrency.gpu]\nmax_in_flight = 1\nqueue = 1\nqueue_timeout = \"200ms\"\n",
    )
    .start();
    let url = format!("{}/v1/chat/completions", proxy.http_url());
    let plain = chat(json!({"max_tokens": 10}));
    let streamed = chat(json!({"max_tokens": 10, "stream": true}));

    // Settled: plain and streamed.
    assert_eq!(post(&proxy, "/v1/chat/completions", &plain).status, 200);
    assert_eq!(post(&proxy, "/v1/chat/completions", &streamed).status, 200);
    // Backend error; backend reset mid-stream and mid-body.
    fake.set_fail(Some(500));
    assert_eq!(post(&proxy, "/v1/chat/completions", &plain).status, 500);
    fake.set_fail(None);
    fake.set_reset_after(Some(2));
    let _ = try_request("POST", &url, &[], Some(&streamed));
    let _ = try_request("POST", &url, &[], Some(&plain));
    fake.set_reset_after(None);
    // The backend never answers: read timeout.
    fake.hold();
    let timed_out = post(&proxy, "/v1/chat/completions", &plain);
    assert_eq!(timed_out.status, 504, "{timed_out:?}");
    openai_error(
        timed_out.status,
        timed_out.header("content-type"),
        &timed_out.body,
    );
    fake.release_all();
    fake.hold();
    // Queue full and queue timeout while one request holds the slot.
    let arrived = fake.count();
    let holder = {
        let (url, body) = (url.clone(), plain.clone());
        thread::spawn(move || request("POST", &url, &[], Some(&body)))
    };
    assert!(poll_until(DEADLINE, || fake.count() == arrived + 1));
    let waiter = {
        let (url, body) = (url.clone(), plain.clone());
        thread::spawn(move || request("POST", &url, &[], Some(&body)))
    };
    let full = post(&proxy, "/v1/chat/completions", &plain);
    let timeout = waiter.join().unwrap();
    assert!(
        [full.status, timeout.status].iter().all(|&s| s == 503),
        "{full:?} {timeout:?}"
    );
    fake.release_all();
    assert_eq!(holder.join().unwrap().status, 200);
    // The client goes away mid-stream.
    fake.hold();
    let mut conn = RawConn::connect(&proxy.http_addr());
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        streamed.len()
    );
    conn.send(head.as_bytes()).unwrap();
    conn.send(&streamed).unwrap();
    assert!(poll_until(DEADLINE, || fake.count() == arrived + 2));
    drop(conn);
    fake.release_all();
    // A backend without usage at all.
    fake.set_omit_usage(true);
    assert_eq!(post(&proxy, "/v1/chat/completions", &streamed).status, 200);
    assert_eq!(post(&proxy, "/v1/chat/completions", &plain).status, 200);
    fake.set_omit_usage(false);
    // Maintenance: refused after the reservation.
    let (status, _) = proxy.admin("POST", "/services/ai/maintenance", Some(r#"{"on": true}"#));
    assert_eq!(status, 200);
    assert_eq!(post(&proxy, "/v1/chat/completions", &plain).status, 503);

    assert!(
        poll_until(DEADLINE, || balanced(&proxy) && fake.in_flight() == 0),
        "{}",
        budget_stats(&proxy)
    );
    let stats = budget_stats(&proxy);
    assert!(
        tokens(&stats, "kept") > 0 && tokens(&stats, "refunded") > 0,
        "{stats}"
    );
}

#[test]
fn usage_above_the_reservation_is_charged_as_debt() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 6000\nmax_tokens = 1000\nkey = \"header:Authorization\"",
    );
    let body = chat(json!({"max_tokens": 100}));
    fake.set_usage(Some(UsageOverride {
        prompt_tokens: 5000,
        completion_tokens: 4000,
    }));
    assert_eq!(post(&proxy, "/v1/chat/completions", &body).status, 200);
    fake.set_usage(None);
    // 3000 tokens of debt: 100 tokens a second pay it off in 30 s, plus
    // what the next request reserves.
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 429, "{reply:?}");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 30, "{reply:?}");
    assert_eq!(reply.header("ratelimit-remaining"), Some("0"));
    let stats = budget_stats(&proxy);
    assert_eq!(tokens(&stats, "settled"), 9000, "{stats}");
}

#[test]
fn secrets_stay_out_of_debug_logs_and_limits() {
    let fake = FakeOpenAi::start();
    let proxy = budget_proxy(
        fake.service("ai"),
        "tokens_per_minute = 100000\nmax_tokens = 2048\nkey = \"header:Authorization\"",
        "",
        "",
    )
    .log_filter("trace")
    .start();
    let url = format!("{}/v1/chat/completions", proxy.http_url());
    let auth = [("authorization", "Bearer sk-leak-canary-9f3a")];
    for body in [
        chat(json!({"max_tokens": 10})),
        chat(json!({"max_tokens": 10, "stream": true})),
        chat(json!({"max_tokens": 99999})),
        b"{not json".to_vec(),
    ] {
        let _ = request("POST", &url, &auth, Some(&body));
    }
    fake.set_fail(Some(500));
    let _ = request("POST", &url, &auth, Some(&chat(json!({}))));
    fake.set_fail(None);
    let (_, limits) = proxy.admin("GET", "/limits", None);
    assert!(!limits.to_string().contains("canary"), "{limits}");
    let log = proxy.stderr_text();
    assert!(!log.contains("canary"), "{log}");
}

/// A backend that answers every request with `pieces`, written one by one
/// (with `TCP_NODELAY`, so they tend to arrive as separate reads).
struct Scripted {
    addr: String,
    _thread: thread::JoinHandle<()>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Scripted {
    fn start(pieces: Vec<Vec<u8>>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let pieces = pieces.clone();
                let seen = seen.clone();
                thread::spawn(move || {
                    if let Some(body) = read_request(&mut conn) {
                        seen.lock().unwrap().push(body);
                        for p in &pieces {
                            if conn.write_all(p).and_then(|_| conn.flush()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            _thread: thread,
            bodies,
        }
    }

    fn service(&self) -> String {
        let a = toml_str(&self.addr);
        format!("[services.ai]\nblue = [{a}]\ngreen = [{a}]\n\n")
    }
}

/// Reads one request with a `Content-Length` body (the proxy sends a
/// checked early body so); returns the body.
fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    conn.set_read_timeout(Some(DEADLINE)).ok()?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    while buf.len() < end + len {
        let n = conn.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(buf[end..end + len].to_vec())
}

fn sse_response(content_type: &str, body: &[u8], cut: usize) -> Vec<Vec<u8>> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut pieces = vec![head.into_bytes()];
    pieces.extend(body.chunks(cut).map(<[u8]>::to_vec));
    pieces
}

const CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
const USAGE: &str = r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;

/// Streams with `\r\n` line ends, cut into pieces of every size, and a
/// media type written in capitals (RFC 9110 §8.3.1: case-insensitive).
#[test]
fn event_streams_are_read_however_they_are_written() {
    let stream = format!(
        "data: {CHUNK}\r\n\r\ndata: {CHUNK}\r\n\r\ndata: {USAGE}\r\n\r\ndata: [DONE]\r\n\r\n"
    );
    let without = format!("data: {CHUNK}\r\n\r\ndata: {CHUNK}\r\n\r\ndata: [DONE]\r\n\r\n");
    for (content_type, cut) in [
        ("text/event-stream", 1),
        ("text/event-stream; charset=utf-8", 7),
        ("Text/Event-Stream; charset=utf-8", 1000),
    ] {
        let backend = Scripted::start(sse_response(content_type, stream.as_bytes(), cut));
        let proxy = budget_proxy(
            backend.service(),
            "tokens_per_minute = 100000\nmax_tokens = 100",
            "",
            "",
        )
        .start();
        let reply = post(
            &proxy,
            "/v1/chat/completions",
            &chat(json!({"stream": true, "max_tokens": 10})),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, without, "{content_type}, pieces of {cut}");
        let stats = budget_stats(&proxy);
        assert_eq!(tokens(&stats, "settled"), 7, "{content_type}: {stats}");
        let sent: Value = serde_json::from_slice(&backend.bodies.lock().unwrap()[0]).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
    // Lines may end with a lone CR too (the SSE format's third line end):
    // the events are still found, in pieces of any size, and the stream is
    // not held back until its end.
    let stream = format!("data: {CHUNK}\r\rdata: {USAGE}\r\rdata: [DONE]\r\r");
    for cut in [1, 5, 1000] {
        let backend = Scripted::start(sse_response("text/event-stream", stream.as_bytes(), cut));
        let proxy = budget_proxy(
            backend.service(),
            "tokens_per_minute = 100000\nmax_tokens = 100",
            "",
            "",
        )
        .start();
        let body = chat(json!({"stream": true, "max_tokens": 10}));
        let reply = post(&proxy, "/v1/chat/completions", &body);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.body,
            format!("data: {CHUNK}\r\rdata: [DONE]\r\r"),
            "pieces of {cut}"
        );
        assert_eq!(
            tokens(&budget_stats(&proxy), "settled"),
            7,
            "pieces of {cut}"
        );
    }
}

/// A backend that compresses despite `Accept-Encoding: identity`: its bytes
/// reach the client untouched, and with no readable usage the reservation
/// is kept, never lost or refunded.
#[test]
fn a_compressed_answer_passes_intact_and_keeps_its_reservation() {
    let mut binary: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    binary.extend_from_slice(b"\n\ndata: x\n\n\r\n\r\n\x00");
    for content_type in ["application/json", "text/event-stream"] {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            binary.len()
        );
        let mut pieces = vec![head.into_bytes()];
        pieces.extend(binary.chunks(333).map(<[u8]>::to_vec));
        let backend = Scripted::start(pieces);
        let proxy = budget_proxy(
            backend.service(),
            "tokens_per_minute = 100000\nmax_tokens = 100",
            "",
            "",
        )
        .start();
        let body = chat(json!({"stream": true, "max_tokens": 10}));
        let mut conn = RawConn::connect(&proxy.http_addr());
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.send(head.as_bytes()).unwrap();
        conn.send(&body).unwrap();
        let head = conn.read_head(DEADLINE).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while let BodyPart::Data(d) = conn.read_body_part(deadline).unwrap() {
            got.extend_from_slice(&d);
        }
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-encoding"), Some("gzip"));
        assert!(
            got == binary,
            "{content_type}: {} bytes of {}",
            got.len(),
            binary.len()
        );
        assert!(poll_until(DEADLINE, || tokens(
            &budget_stats(&proxy),
            "kept"
        ) == body.len() as u64 + 10));
    }
}

/// The header size is checked once the route is known, so an AI route's
/// 431 is in OpenAI's shape too.
#[test]
fn a_header_too_large_on_an_ai_route_is_an_openai_error() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 100000");
    let big = "x".repeat(40 * 1024);
    let reply = request(
        "POST",
        &format!("{}/v1/chat/completions", proxy.http_url()),
        &[("x-big", &big)],
        Some(&chat(json!({}))),
    );
    assert_eq!(reply.status, 431, "{reply:?}");
    openai_error(reply.status, reply.header("content-type"), &reply.body);
}

/// A chunked request body in one write, `body` in chunks of 100 bytes.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
        Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for piece in body.chunks(100) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// Concurrent completions whose bodies are checked as they stream (chunked,
/// or larger than Pingora replays): their heads reach the backend before
/// their bodies are checked, yet none beyond the budget gets a whole
/// request to the backend.
#[test]
fn concurrent_streamed_bodies_are_admitted_only_up_to_the_budget() {
    let fake = FakeOpenAi::start();
    let proxy = budget_proxy(
        fake.service("ai"),
        "tokens_per_minute = 10000\nkey = \"global\"\nmax_tokens = 2048",
        "",
        "",
    )
    .start();
    let body = chat(json!({"max_tokens": 1000}));
    let fits = (10_000 / (body.len() as u64 + 1000)) as usize;
    fake.hold();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (addr, req) = (proxy.http_addr(), chunked(&body));
            thread::spawn(move || raw_http(&addr, &req))
        })
        .collect();
    assert!(poll_until(DEADLINE, || {
        budget_stats(&proxy)["refused"]["exhausted"] == 16 - fits as u64
    }));
    assert!(fake.wait_for_waiting(fits, DEADLINE));
    assert_eq!(fake.count(), fits);
    fake.release_all();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap().0).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        fits,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        16 - fits,
        "{statuses:?}"
    );
    assert_eq!(fake.count(), fits);
    assert!(poll_until(DEADLINE, || balanced(&proxy)));
}

fn h2_proxy(fake: &FakeOpenAi, budget: &str) -> (Proxy, Arc<rustls::ClientConfig>) {
    let pki = common::pebble::pki(&["localhost"], 30);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&cert, &pki.chain_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let tables = format!(
        "[tls]\ndefault_certificate = \"site\"\n\n[[tls.certificates]]\nname = \"site\"\ncert = {}\nkey = {}\n",
        toml_str(cert.to_str().unwrap()),
        toml_str(key.to_str().unwrap())
    );
    let proxy = budget_proxy(fake.service("ai"), budget, "", "")
        .https(&tables)
        .start();
    // The proxy has read its certificate: the directory may go.
    drop(dir);
    let config = common::pebble::client_config(&pki.ca_pem, &[b"h2"]);
    (proxy, config)
}

/// Sends a POST on `send`; `length`: with `Content-Length`. Returns the
/// response future and the request stream.
fn h2_start(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    body: &[u8],
    length: bool,
) -> h2::client::ResponseFuture {
    // Each kind of request its own budget key (a new bucket).
    let mut req = http::Request::post("https://localhost/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-round", length.to_string());
    if length {
        req = req.header("content-length", body.len());
    }
    let (resp, mut stream) = send.send_request(req.body(()).unwrap(), false).unwrap();
    stream
        .send_data(bytes::Bytes::copy_from_slice(body), true)
        .unwrap();
    resp
}

/// Many streams of one HTTP/2 connection at once, with and without a
/// length: none is admitted beyond the budget.
#[test]
fn concurrent_http2_streams_are_admitted_only_up_to_the_budget() {
    let fake = FakeOpenAi::start();
    let (proxy, config) = h2_proxy(
        &fake,
        "tokens_per_minute = 10000\nkey = \"header:x-round\"\nmax_tokens = 2048",
    );
    let body = chat(json!({"max_tokens": 1000}));
    let fits = (10_000 / (body.len() as u64 + 1000)) as usize;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for length in [true, false] {
        fake.hold();
        let before = fake.count();
        let exhausted = budget_stats(&proxy)["refused"]["exhausted"]
            .as_u64()
            .unwrap();
        let statuses = rt.block_on(async {
            let mut send =
                common::tls::h2_handshake(&proxy.https_addr(), "localhost", config.clone()).await;
            let mut pending = Vec::new();
            for _ in 0..16 {
                futures_util::future::poll_fn(|cx| send.poll_ready(cx))
                    .await
                    .unwrap();
                pending.push(h2_start(&mut send, &body, length));
            }
            let waited = tokio::task::spawn_blocking({
                let fake_waiting = fits;
                let proxy_admin = proxy.admin_url();
                move || {
                    poll_until(DEADLINE, || {
                        let (_, l) =
                            admin_request(&proxy_admin, "GET", "/limits", None, Some(TOKEN));
                        l["token_budgets"]["ai"]["refused"]["exhausted"]
                            .as_u64()
                            .unwrap()
                            >= exhausted + (16 - fake_waiting) as u64
                    })
                }
            });
            assert!(waited.await.unwrap());
            assert!(
                fake.wait_for_waiting(fits, DEADLINE),
                "length {length}: {} waiting, {} received, {}",
                fake.waiting(),
                fake.count() - before,
                budget_stats(&proxy)
            );
            fake.release_all();
            let mut statuses = Vec::new();
            for resp in pending {
                let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
                statuses.push(resp.status().as_u16());
            }
            statuses
        });
        assert_eq!(fake.count() - before, fits, "length {length}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|&&s| s == 200).count(),
            fits,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().all(|&s| s == 200 || s == 429),
            "{statuses:?}"
        );
        assert!(
            poll_until(DEADLINE, || balanced(&proxy)),
            "{}",
            budget_stats(&proxy)
        );
    }
}

/// A client that resets its HTTP/2 stream mid-response: the reservation is
/// kept (the backend may have spent it), never left reserved, and the
/// connection goes on serving.
#[test]
fn an_http2_stream_reset_mid_response_keeps_its_reservation() {
    let fake = FakeOpenAi::start();
    let (proxy, config) = h2_proxy(&fake, "tokens_per_minute = 100000\nmax_tokens = 2048");
    let body = chat(json!({"max_tokens": 100, "stream": true}));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut send = common::tls::h2_handshake(&proxy.https_addr(), "localhost", config).await;
        fake.set_write_gap(Duration::from_millis(50));
        fake.set_reply_tokens(50);
        let resp = h2_start(&mut send, &body, true);
        let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        let mut recv = resp.into_body();
        let first = tokio::time::timeout(DEADLINE, recv.data()).await.unwrap();
        assert!(first.is_some());
        // Dropping the body and its stream resets the stream (RST_STREAM CANCEL).
        drop(recv);
        fake.set_write_gap(Duration::ZERO);
        fake.set_reply_tokens(8);
        let plain = chat(json!({"max_tokens": 10}));
        futures_util::future::poll_fn(|cx| send.poll_ready(cx))
            .await
            .unwrap();
        let resp = h2_start(&mut send, &plain, true);
        let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
    });
    assert!(
        poll_until(DEADLINE, || balanced(&proxy)
            && tokens(&budget_stats(&proxy), "kept") > 0),
        "{}",
        budget_stats(&proxy)
    );
    assert_eq!(
        tokens(&budget_stats(&proxy), "kept"),
        body.len() as u64 + 100
    );
}

/// Bodies around the size Pingora replays (64 KiB): read early or late,
/// each reaches the backend whole, checked and charged once.
#[test]
fn bodies_at_the_early_read_bound_reach_the_backend_checked() {
    let fake = FakeOpenAi::start();
    let proxy = budget_proxy(
        fake.service("ai"),
        "tokens_per_minute = 1000000\nmax_tokens = 2048\ndefault_max_tokens = 20",
        "",
        "",
    )
    .start();
    let empty = chat(json!({"messages": [{"role": "user", "content": ""}]}));
    let mut reserved = 0;
    for size in [65_535usize, 65_536, 65_537] {
        let content = "a".repeat(size - empty.len());
        let body = chat(json!({"messages": [{"role": "user", "content": content}]}));
        assert_eq!(body.len(), size);
        let reply = post(&proxy, "/v1/chat/completions", &body);
        assert_eq!(reply.status, 200, "{size}: {reply:?}");
        let seen = fake.last_request().unwrap();
        assert_eq!(seen.body["max_tokens"], 20, "{size}");
        assert_eq!(seen.body["messages"][0]["content"], content.as_str());
        reserved += size as u64 + 20;
    }
    let stats = budget_stats(&proxy);
    assert_eq!(tokens(&stats, "reserved"), reserved, "{stats}");
    assert!(poll_until(DEADLINE, || balanced(&proxy)));
}

/// An answer larger than the proxy reads for its usage passes whole; its
/// reservation is kept, not refunded.
#[test]
fn an_answer_beyond_the_scan_bound_passes_whole_and_keeps_its_reservation() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, "tokens_per_minute = 10000000\nmax_tokens = 2000000");
    // "tok " × 1.1 M is 4.4 MB, beyond the 4 MiB read for usage.
    fake.set_reply_tokens(1_100_000);
    let body = chat(json!({"max_tokens": 1_100_000}));
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 200);
    assert!(reply.body.len() > 4 * 1024 * 1024);
    assert!(reply.json()["usage"]["total_tokens"].is_u64());
    assert!(poll_until(DEADLINE, || {
        tokens(&budget_stats(&proxy), "kept") == body.len() as u64 + 1_100_000
    }));
}

/// An HTTP/1.0 client that keeps its connection alive, and a stream whose
/// usage chunk is taken out of a backend answer framed by
/// `Content-Length`: the answer loses its length, so it must end with the
/// connection, or the client waits for ever.
#[test]
fn a_stripped_stream_to_a_kept_alive_http10_client_ends() {
    let stream = format!("data: {CHUNK}\n\ndata: {USAGE}\n\ndata: [DONE]\n\n");
    let backend = Scripted::start(sse_response("text/event-stream", stream.as_bytes(), 1000));
    let proxy = budget_proxy(
        backend.service(),
        "tokens_per_minute = 100000\nmax_tokens = 100",
        "",
        "",
    )
    .start();
    let body = chat(json!({"stream": true, "max_tokens": 10}));
    let mut conn = RawConn::connect(&proxy.http_addr());
    let head = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes()).unwrap();
    conn.send(&body).unwrap();
    let reply = conn.read_response(DEADLINE).expect("the answer ends");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, format!("data: {CHUNK}\n\ndata: [DONE]\n\n"));
    assert!(reply.header("transfer-encoding").is_none(), "{reply:?}");
    assert_eq!(tokens(&budget_stats(&proxy), "settled"), 7);
}

/// Prompts whose size the body does not show: vLLM fetches an `image_url`
/// and turns it into hundreds to thousands of prompt tokens (a request's
/// own `chat_template` can likewise expand a few bytes into any number).
/// Without `media_tokens` such requests are refused; with it, each media
/// part reserves that many tokens, so concurrent requests stay within the
/// bucket. The fake stands in for the model's image tokens with
/// `set_prompt_tokens`; the URL is never fetched.
#[test]
fn remote_media_cannot_overrun_the_budget_under_concurrency() {
    let body = chat(
        json!({"max_tokens": 100, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}},
        ]}]}),
    );
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 10000\nkey = \"global\"\nmax_tokens = 100",
    );
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 400, "{reply:?}");
    let e = openai_error(reply.status, reply.header("content-type"), &reply.body);
    assert_eq!(e["code"], "media_not_allowed", "{e}");
    assert_eq!(fake.count(), 0);

    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 10000\nkey = \"global\"\nmax_tokens = 100\nmedia_tokens = 3000",
    );
    // What vLLM reports for a prompt with one large image.
    fake.set_prompt_tokens(Some(2900));
    fake.hold();
    let url = format!("{}/v1/chat/completions", proxy.http_url());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            thread::spawn(move || request("POST", &url, &[], Some(&body)))
        })
        .collect();
    assert!(poll_until(DEADLINE, || {
        let s = budget_stats(&proxy);
        s["admitted"].as_u64().unwrap() + s["refused"]["exhausted"].as_u64().unwrap() == 8
    }));
    assert_eq!(budget_stats(&proxy)["admitted"], 3);
    fake.release_all();
    for c in clients {
        c.join().unwrap();
    }
    let settled = tokens(&budget_stats(&proxy), "settled");
    assert!(
        settled <= 10_000,
        "{settled} tokens spent at once from a budget of 10000 a minute: {}",
        budget_stats(&proxy)
    );
}

#[test]
fn a_backend_that_refuses_connections_costs_no_tokens() {
    let closed = free_port();
    let a = toml_str(&format!("127.0.0.1:{closed}"));
    let proxy = budget_proxy(
        format!("[services.ai]\nblue = [{a}]\ngreen = [{a}]\n\n"),
        "tokens_per_minute = 100000\nmax_tokens = 100",
        "",
        "",
    )
    .start();
    let body = chat(json!({"max_tokens": 100}));
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 502, "{reply:?}");
    let e = openai_error(reply.status, reply.header("content-type"), &reply.body);
    assert_eq!(e["type"], "server_error", "{e}");
    let stats = budget_stats(&proxy);
    assert_eq!(
        tokens(&stats, "refunded"),
        body.len() as u64 + 100,
        "{stats}"
    );
    assert_eq!(tokens(&stats, "kept"), 0, "{stats}");
}
