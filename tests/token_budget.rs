//! Token budgets (`[token_budgets.NAME]`) end to end: the real proxy in
//! front of a fake vLLM ([`FakeOpenAi`]), with raw HTTP clients so every
//! byte of the requests and answers can be checked. What an application
//! using the `openai` SDK sees is in `openai_sdk.rs`.

mod common;

use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use common::openai::{self, budget_proxy, budget_stats, chat, post, FakeOpenAi};
use common::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// A proxy sending `/v1/` to the fake as service `ai`, with the keys of a
/// `[token_budgets.ai]` table and `route_extra` on the route.
fn start(fake: &FakeOpenAi, budget: &str, route_extra: &str, tables: &str) -> Proxy {
    budget_proxy(fake.service("ai"), budget, route_extra, tables).start()
}

/// The `error` object of an OpenAI-shaped answer.
fn openai_error(reply: &Reply) -> Value {
    openai::openai_error(reply.status, reply.header("content-type"), &reply.body)
}

/// The usage the fake reports for `body` (see `common::openai`).
fn fake_usage(body_len: usize, completion: u64) -> u64 {
    (body_len as u64 / 4).max(1) + completion
}

#[test]
fn concurrent_completions_are_admitted_only_up_to_the_budget() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 10000\nkey = \"global\"\nmax_tokens = 2048",
        "",
        "",
    );
    let body = chat(json!({"max_tokens": 1000}));
    let reserve = body.len() as u64 + 1000;
    let fits = (10_000 / reserve) as usize;
    assert_eq!(fits, 9, "body of {} bytes", body.len());

    fake.hold();
    let url = format!("{}/v1/chat/completions", proxy.http_url());
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            thread::spawn(move || request("POST", &url, &[], Some(&body)))
        })
        .collect();
    // Every request beyond the budget is answered at once, while the
    // admitted ones are still running: none is admitted beyond it.
    assert!(
        fake.wait_for_waiting(fits, DEADLINE),
        "{} waiting",
        fake.waiting()
    );
    assert!(poll_until(DEADLINE, || {
        budget_stats(&proxy)["refused"]["exhausted"] == 16 - fits as u64
    }));
    assert_eq!(fake.count(), fits);
    fake.release_all();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, fits);
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429, "{r:?}");
        let e = openai_error(r);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("tokens"), Some("rate_limit_exceeded"))
        );
        assert_eq!(r.header("ratelimit-limit"), Some("10000"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{r:?}");
    }

    // Settled with the real usage, the rest refunded: the budget is free again.
    let used = fake_usage(body.len(), 8);
    let stats = budget_stats(&proxy);
    let tokens = &stats["tokens"];
    assert_eq!(stats["admitted"], fits as u64, "{stats}");
    assert_eq!(tokens["reserved"], reserve * fits as u64, "{stats}");
    assert_eq!(tokens["settled"], used * fits as u64, "{stats}");
    assert_eq!(
        tokens["refunded"],
        (reserve - used) * fits as u64,
        "{stats}"
    );
    assert_eq!(tokens["kept"], 0, "{stats}");
    assert_eq!(post(&proxy, "/v1/chat/completions", &body).status, 200);
}

#[test]
fn streams_settle_with_the_usage_chunk_and_the_client_never_sees_it() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 2500\nkey = \"header:Authorization\"\nmax_tokens = 2048\ndefault_max_tokens = 300",
        "",
        "",
    );
    let body = chat(json!({"stream": true}));
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.ends_with("data: [DONE]\n\n"), "{}", reply.body);
    // Where the budget stands, this request's reservation still held.
    let reserve = body.len() as u64 + 300;
    assert_eq!(reply.header("ratelimit-limit"), Some("2500"));
    // 42 tokens a second refill meanwhile. The budget is small so that
    // the tokens used stay visible to `ctl limits` below for seconds.
    let remaining: u64 = reply
        .header("ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (2_500 - reserve..2_500 - reserve + 100).contains(&remaining),
        "{reply:?}"
    );
    let reset: u64 = reply.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset), "{reply:?}");
    assert_eq!(reply.body.matches("data: {").count(), 8, "{}", reply.body);
    assert!(!reply.body.contains("\"choices\":[]"), "{}", reply.body);
    assert!(!reply.body.contains("total_tokens"), "{}", reply.body);
    // The backend was asked for the usage chunk and given the default cap.
    let sent = fake.last_body().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(sent["max_tokens"], 300, "{sent}");
    assert_eq!(sent["messages"][0]["content"], "Say something.");

    let stats = budget_stats(&proxy);
    let used = fake_usage(fake.last_request().unwrap().raw_body.len(), 8);
    assert_eq!(stats["tokens"]["reserved"], reserve, "{stats}");
    assert_eq!(stats["tokens"]["settled"], used, "{stats}");
    assert_eq!(stats["tokens"]["refunded"], reserve - used, "{stats}");
    let (_, limits) = proxy.admin("GET", "/limits", None);
    for field in ["reserved", "settled", "refunded", "kept"] {
        let service = &limits["tokens_by_service"]["ai"][field];
        assert_eq!(*service, stats["tokens"][field], "{limits}");
    }
    // The key is the API key, shown only as its keyed hash.
    let top = stats["top_keys"][0]["key"].as_str().unwrap().to_string();
    assert!(top.starts_with("hash:"), "{stats}");
    assert!(!stats.to_string().contains("sk-secret"), "{stats}");

    // A client that asked for usage gets the chunk, and the same settlement.
    let body = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert!(reply.body.contains("\"choices\":[]"), "{}", reply.body);
    assert!(reply.body.contains("total_tokens"), "{}", reply.body);
    assert_eq!(budget_stats(&proxy)["tokens"]["kept"], 0);
    assert!(!proxy.stderr_text().contains("sk-secret"));

    // The body sent on is the checked JSON, whatever encoding it claimed.
    let labelled = request(
        "POST",
        &format!("{}/v1/chat/completions", proxy.http_url()),
        &[("content-encoding", "identity")],
        Some(&chat(json!({}))),
    );
    assert_eq!(labelled.status, 200, "{labelled:?}");
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.header("content-encoding"), None);
    assert_eq!(seen.header("accept-encoding"), Some("identity"));

    let out = run_ctl(&proxy.admin_url(), Some(proxy.token()), &["limits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("token budget ai: 2500 tokens/min per key, 2 keys"),
        "{text}"
    );
    assert!(text.contains("3 admitted"), "{text}");
    assert!(text.contains("hash:"), "{text}");
    assert!(!text.contains("sk-secret"), "{text}");
}

#[test]
fn bad_completion_bodies_get_openai_errors_and_never_reach_the_backend() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 5000\nmax_tokens = 2048\nmax_body = \"2KiB\"",
        "",
        "",
    );
    let cases: Vec<(Vec<u8>, u16, &str, Value)> = vec![
        (b"{\"model\":".to_vec(), 400, "invalid_json", Value::Null),
        (b"[1, 2]".to_vec(), 400, "invalid_json", Value::Null),
        (
            chat(json!({"max_tokens": 4096})),
            400,
            "max_tokens_too_large",
            json!("max_tokens"),
        ),
        (
            chat(json!({"max_completion_tokens": 2049})),
            400,
            "max_tokens_too_large",
            json!("max_completion_tokens"),
        ),
        (chat(json!({"n": "two"})), 400, "invalid_type", json!("n")),
        (
            chat(json!({"max_tokens": 2000, "n": 3})),
            400,
            "tokens_exceed_budget",
            Value::Null,
        ),
        (vec![b' '; 3000], 413, "request_too_large", Value::Null),
    ];
    for (body, status, code, param) in cases {
        let reply = post(&proxy, "/v1/chat/completions", &body);
        assert_eq!(reply.status, status, "{reply:?}");
        let e = openai_error(&reply);
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(e["param"], param, "{e}");
        assert_eq!(e["type"], "invalid_request_error", "{e}");
    }
    let over = post(
        &proxy,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 4096})),
    );
    assert!(
        openai_error(&over)["message"]
            .as_str()
            .unwrap()
            .contains("2048"),
        "{over:?}"
    );
    // Every spelling of the path the backend reads as a completion is charged.
    for path in [
        "/v1/chat/%63ompletions",
        "/v1//chat/completions",
        "/v1/x/../chat/completions",
        "/v1/completions;v=1",
    ] {
        let reply = post(&proxy, path, &chat(json!({"max_tokens": 4096})));
        assert_eq!(reply.status, 400, "{path}: {reply:?}");
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    let stats = budget_stats(&proxy);
    assert_eq!(stats["refused"]["invalid"], 12, "{stats}");
    assert_eq!(stats["tokens"]["reserved"], 0, "{stats}");
}

/// A chunked request body in one write: `body` as chunks of 100 bytes.
fn chunked(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(100) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

#[test]
fn chunked_and_large_bodies_are_checked_as_they_stream() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 1000000\nmax_tokens = 2048\ndefault_max_tokens = 64\nmax_body = \"1MiB\"",
        "max_body = \"1MiB\"",
        "",
    );
    let addr = proxy.http_addr();

    // Chunked: no length up front, so the body is checked as it streams.
    let body = chat(json!({}));
    let (status, text) = raw_http(&addr, &chunked("/v1/chat/completions", &body));
    assert_eq!(status, 200, "{text}");
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body["max_tokens"], 64, "{:?}", seen.body);
    assert!(
        seen.chunked,
        "the checked body's length differs: sent chunked"
    );

    // Over the cap: refused with OpenAI's shape; the backend never got a
    // whole request, so no work started.
    let (status, text) = raw_http(
        &addr,
        &chunked("/v1/chat/completions", &chat(json!({"max_tokens": 9999}))),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("max_tokens_too_large"), "{text}");
    assert_eq!(fake.count(), 1);

    // Larger than Pingora can replay (64 KiB): checked as it streams too.
    let long = "안녕하세요 ".repeat(10_000);
    let body = chat(json!({"messages": [{"role": "user", "content": long}]}));
    assert!(body.len() > 100_000);
    let reply = post(&proxy, "/v1/completions", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = fake.last_request().unwrap();
    assert_eq!(seen.body["max_tokens"], 64);
    assert_eq!(seen.body["messages"][0]["content"], long.as_str());
    let stats = budget_stats(&proxy);
    assert_eq!(
        stats["tokens"]["reserved"],
        json!(chat(json!({})).len() + 64 + body.len() + 64),
        "{stats}"
    );
    assert_eq!(stats["tokens"]["kept"], 0, "{stats}");
    assert_eq!(fake.count(), 2);
}

#[test]
fn reservations_without_usage_are_kept_and_logged() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 100000\nkey = \"header:Authorization\"\nmax_tokens = 2048",
        "",
        "",
    );
    let body = chat(json!({"max_tokens": 100}));
    let reserve = body.len() as u64 + 100;

    // The backend fails: no usage, the reservation is spent.
    fake.set_fail(Some(500));
    let reply = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 500, "{reply:?}");
    assert!(poll_until(DEADLINE, || budget_stats(&proxy)["tokens"]
        ["kept"]
        == reserve));
    fake.set_fail(None);

    // The client goes away mid-stream: vLLM stops, no usage reaches anyone.
    let body = chat(json!({"max_tokens": 100, "stream": true}));
    fake.hold();
    let mut conn = RawConn::connect(&proxy.http_addr());
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sk-secret-b\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes()).unwrap();
    conn.send(&body).unwrap();
    assert!(fake.wait_for_waiting(1, DEADLINE));
    drop(conn);
    fake.release_all();
    let both = 2 * reserve + (body.len() - chat(json!({"max_tokens": 100})).len()) as u64;
    assert!(
        poll_until(DEADLINE, || budget_stats(&proxy)["tokens"]["kept"] == both),
        "{}",
        budget_stats(&proxy)
    );
    let log = proxy.stderr_text();
    assert_eq!(log.matches("its reservation is kept").count(), 2, "{log}");
    assert!(!log.contains("sk-secret"), "{log}");
}

#[test]
fn a_completion_refused_after_its_reservation_gets_it_back() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 100000\nmax_tokens = 2048",
        "concurrency = \"gpu\"",
        "[concurrency.gpu]\nmax_in_flight = 1\n",
    );
    let body = chat(json!({"max_tokens": 100}));
    let reserve = body.len() as u64 + 100;
    fake.hold();
    let first = {
        let (url, body) = (
            format!("{}/v1/chat/completions", proxy.http_url()),
            body.clone(),
        );
        thread::spawn(move || request("POST", &url, &[], Some(&body)))
    };
    assert!(fake.wait_for_waiting(1, DEADLINE));
    let busy = post(&proxy, "/v1/chat/completions", &body);
    assert_eq!(busy.status, 503, "{busy:?}");
    let e = openai_error(&busy);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("server_error"), Some("overloaded"))
    );
    assert!(busy.header("retry-after").is_some());
    // Given back when the refused request's context ends, just after its answer.
    assert!(
        poll_until(DEADLINE, || budget_stats(&proxy)["tokens"]["refunded"]
            == reserve),
        "{}",
        budget_stats(&proxy)
    );
    fake.release_all();
    assert_eq!(first.join().unwrap().status, 200);
}

#[test]
fn other_paths_and_limits_of_an_ai_route() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 100000",
        "rate_limit = \"calls\"",
        "[rate_limits.calls]\nrate = \"2/m\"\n",
    );
    // Other paths pass untouched: the body is neither parsed nor rewritten.
    let odd = br#"{"b": 1,   "a": [1.50, 2]}"#;
    let reply = post(&proxy, "/v1/embeddings", odd);
    assert_eq!(reply.status, 404, "the fake has no embeddings: {reply:?}");
    assert_eq!(fake.requests().last().unwrap().raw_body, odd);
    let models = request("GET", &format!("{}/v1/models", proxy.http_url()), &[], None);
    assert_eq!(models.status, 429, "{models:?}");
    // The rate limit's refusal speaks OpenAI too, with the RateLimit fields.
    let e = openai_error(&models);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("requests"), Some("rate_limit_exceeded"))
    );
    assert_eq!(models.header("ratelimit-limit"), Some("2"));
    assert_eq!(models.header("ratelimit-remaining"), Some("0"));
    assert!(models.header("retry-after").is_some());
    assert_eq!(budget_stats(&proxy)["admitted"], 0);
    let (_, limits) = proxy.admin("GET", "/limits", None);
    let calls = &limits["rate_limits"]["calls"];
    assert_eq!(
        (calls["checked"].as_u64(), calls["refused"].as_u64()),
        (Some(2), Some(1)),
        "{limits}"
    );
}

/// One HTTP/2 POST: `length` sends `Content-Length` (else the body's end
/// is only its last DATA frame). Returns the status and the whole body.
async fn h2_post(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    url: &str,
    body: &[u8],
    length: bool,
) -> (u16, String) {
    futures_util::future::poll_fn(|cx| send.poll_ready(cx))
        .await
        .unwrap();
    let mut req = http::Request::post(url).header("content-type", "application/json");
    if length {
        req = req.header("content-length", body.len());
    }
    let (resp, mut stream) = send.send_request(req.body(()).unwrap(), false).unwrap();
    // Two DATA frames, so the body arrives in pieces.
    let (a, b) = body.split_at(body.len() / 2);
    stream
        .send_data(bytes::Bytes::copy_from_slice(a), false)
        .unwrap();
    stream
        .send_data(bytes::Bytes::copy_from_slice(b), true)
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let mut recv = resp.into_body();
    let mut text = Vec::new();
    while let Some(data) = tokio::time::timeout(DEADLINE, recv.data()).await.unwrap() {
        let data = data.unwrap();
        let _ = recv.flow_control().release_capacity(data.len());
        text.extend_from_slice(&data);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[test]
fn completions_over_http2_are_checked_with_or_without_a_length() {
    let fake = FakeOpenAi::start();
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
    let mut s = fake.service("ai");
    s.push_str("[token_budgets.ai]\ntokens_per_minute = 100000\ndefault_max_tokens = 77\n\n");
    s.push_str(&route_with("/v1/", "ai", "token_budget = \"ai\""));
    let proxy = ProxyBuilder::new(s).https(&tables).start();
    let url = "https://localhost/v1/chat/completions";

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = common::pebble::client_config(&pki.ca_pem, &[b"h2"]);
        let mut send = common::tls::h2_handshake(&proxy.https_addr(), "localhost", config).await;
        for length in [true, false] {
            let (status, text) = h2_post(&mut send, url, &chat(json!({})), length).await;
            assert_eq!(status, 200, "{text}");
            let seen = fake.last_request().unwrap();
            assert_eq!(seen.body["max_tokens"], 77, "length {length}");
            // Read before the backend was contacted only with a length.
            assert_eq!(seen.chunked, !length);
            let (status, text) =
                h2_post(&mut send, url, &chat(json!({"max_tokens": 9999})), length).await;
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("max_tokens_too_large"), "{text}");
        }
    });
    assert_eq!(fake.count(), 2);
}

#[test]
fn a_queued_completion_whose_client_leaves_frees_its_place_and_tokens() {
    let fake = FakeOpenAi::start();
    let proxy = start(
        &fake,
        "tokens_per_minute = 100000\nmax_tokens = 2048",
        "concurrency = \"gpu\"",
        "[concurrency.gpu]\nmax_in_flight = 1\nqueue = 4\nqueue_timeout = \"60s\"\n",
    );
    let body = chat(json!({"max_tokens": 100}));
    fake.hold();
    let first = {
        let (url, body) = (
            format!("{}/v1/chat/completions", proxy.http_url()),
            body.clone(),
        );
        thread::spawn(move || request("POST", &url, &[], Some(&body)))
    };
    assert!(fake.wait_for_waiting(1, DEADLINE));
    // HTTP/1 with a body: read whole for the budget, so the queue can
    // watch the connection and sees the client leave.
    let mut conn = RawConn::connect(&proxy.http_addr());
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes()).unwrap();
    conn.send(&body).unwrap();
    let gpu = |proxy: &Proxy| proxy.admin("GET", "/limits", None).1["concurrency"]["gpu"].clone();
    assert!(poll_until(DEADLINE, || gpu(&proxy)["queue_depth"] == 1));
    drop(conn);
    assert!(
        poll_until(DEADLINE, || gpu(&proxy)["queue_depth"] == 0),
        "{}",
        gpu(&proxy)
    );
    assert_eq!(gpu(&proxy)["abandoned"], 1);
    // Its reservation never reached a backend: given back whole.
    let refund = body.len() as u64 + 100;
    assert!(
        poll_until(DEADLINE, || budget_stats(&proxy)["tokens"]["refunded"]
            == refund),
        "{}",
        budget_stats(&proxy)
    );
    fake.release_all();
    assert_eq!(first.join().unwrap().status, 200);
}

/// A backend that answers every request on a connection with an event
/// stream framed by `Content-Length` (vLLM sends chunked ones; others may
/// not), the usage chunk included.
fn length_framed_sse_backend() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().take(8).flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                loop {
                    let mut length = 0;
                    let mut chunked = false;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        chunked |= lower.starts_with("transfer-encoding:");
                        if line == "\r\n" {
                            break;
                        }
                    }
                    assert!(!chunked, "the early-read body has a length");
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let usage = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
                    let sse = format!(
                        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}\n\ndata: {usage}\n\ndata: [DONE]\n\n"
                    );
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                        sse.len()
                    );
                    if out.write_all(head.as_bytes()).is_err()
                        || out.write_all(sse.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_shortened_stream_keeps_the_client_connection_alive() {
    let backend = length_framed_sse_backend();
    let mut s = format!(
        "[services.ai]\nblue = [\"{backend}\"]\ngreen = [\"{backend}\"]\nactive = \"blue\"\n\n"
    );
    s.push_str("[token_budgets.ai]\ntokens_per_minute = 100000\n\n");
    s.push_str(&route_with("/v1/", "ai", "token_budget = \"ai\""));
    let proxy = ProxyBuilder::new(s).start();
    let body = chat(json!({"stream": true, "max_tokens": 5}));
    let mut conn = RawConn::connect(&proxy.http_addr());
    for _ in 0..2 {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.send(head.as_bytes()).unwrap();
        conn.send(&body).unwrap();
        let reply = conn
            .read_response(DEADLINE)
            .expect("an answer on the same connection");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(!reply.body.contains("total_tokens"), "{}", reply.body);
        assert!(reply.body.ends_with("data: [DONE]\n\n"), "{}", reply.body);
        assert_eq!(
            reply.header("transfer-encoding"),
            Some("chunked"),
            "{reply:?}"
        );
    }
    assert_eq!(budget_stats(&proxy)["tokens"]["settled"], 8);
}
