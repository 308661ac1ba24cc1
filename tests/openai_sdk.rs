//! The official `openai` Python SDK against the real proxy and a fake vLLM
//! ([`FakeOpenAi`]): what an application using the SDK sees through
//! switchyard, on a route without limits and on one with a token budget
//! (`[token_budgets.NAME]`, a route's `token_budget`). The SDK is installed
//! by `.ci/setup`; without it these tests fail and say so.

mod common;

use serde_json::{json, Value};

use common::openai::{
    budget_proxy, run_sdk, Chunking, FakeOpenAi, SdkOutcome, UsageOverride, MODEL,
};
use common::*;

/// A proxy sending `/v1/` to the fake as service `ai`; with `budget`
/// (the keys of a `[token_budgets.ai]` table) the route names it.
fn start(fake: &FakeOpenAi, budget: Option<&str>) -> Proxy {
    match budget {
        Some(keys) => budget_proxy(fake.service("ai"), keys, "", "").start(),
        None => ProxyBuilder::new(fake.service("ai") + &route(None, "/v1/", "ai")).start(),
    }
}

/// A budget large enough for every call of a test, keyed by the API key.
const ROOMY: &str = r#"
tokens_per_minute = 100000
key = "header:Authorization"
max_tokens = 2048
default_max_tokens = 512
max_body = "256KiB"
"#;

fn base_url(proxy: &Proxy) -> String {
    format!("{}/v1", proxy.http_url())
}

fn chat_args(extra: Value) -> Value {
    let mut args = json!({
        "api_key": "sk-test-a",
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        args[k] = v;
    }
    args
}

/// The usage the fake computes for its latest request (see
/// `common::openai`): prompt = body bytes / 4, completion = `completion`.
fn expected_usage(fake: &FakeOpenAi, completion: u64) -> Value {
    let req = fake.last_request().expect("the backend got the request");
    let prompt = (req.raw_body.len() as u64 / 4).max(1);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

// ---------------------------------------------------------------------------
// Routes without limits: the SDK works through the proxy as it is
// ---------------------------------------------------------------------------

#[test]
fn openai_sdk_chat_completion_through_a_route_without_limits() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, None);

    let r = run_sdk("chat.py", &base_url(&proxy), &chat_args(json!({}))).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(r["usage"], expected_usage(&fake, 8), "{r}");
    assert_eq!(fake.count(), 1);
    // The body reached the backend as the SDK sent it: nothing injected.
    let body = fake.last_body().unwrap();
    assert_eq!(body["messages"][0]["content"], "Say something.", "{body}");
    assert!(body.get("max_tokens").is_none(), "{body}");
    assert!(body.get("stream_options").is_none(), "{body}");
}

#[test]
fn openai_sdk_completion_through_a_route_without_limits() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, None);

    let args = json!({"api_key": "sk-test-a", "model": MODEL,
                      "prompt": "Once upon a time", "max_tokens": 3});
    let r = run_sdk("completion.py", &base_url(&proxy), &args).ok();
    assert_eq!(r["text"], "tok tok tok ", "{r}");
    assert_eq!(r["usage"], expected_usage(&fake, 3), "{r}");
    assert_eq!(fake.last_body().unwrap()["prompt"], "Once upon a time");
}

#[test]
fn openai_sdk_streams_chat_through_a_route_without_limits() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, None);
    let url = base_url(&proxy);

    // Events cut in two across writes: the SDK still sees whole chunks.
    fake.set_chunking(Chunking::Halves);
    let r = run_sdk("chat_stream.py", &url, &chat_args(json!({}))).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(r["chunks"], 8, "one chunk per token: {r}");
    assert_eq!(r["usage_chunks"], json!([]), "usage was not asked for: {r}");
    assert!(fake.last_body().unwrap().get("stream_options").is_none());

    // Several events per write, usage asked for: it comes last.
    fake.set_chunking(Chunking::Batched(3));
    let args = chat_args(json!({"stream_options": {"include_usage": true}}));
    let r = run_sdk("chat_stream.py", &url, &args).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(r["chunks"], 9, "{r}");
    let usage_chunk = json!([{"index": 8, "choices": 0, "usage": expected_usage(&fake, 8)}]);
    assert_eq!(r["usage_chunks"], usage_chunk, "{r}");
    assert_eq!(fake.finished(), 2);
}

// ---------------------------------------------------------------------------
// Routes with a token budget
// ---------------------------------------------------------------------------

#[test]
fn openai_sdk_streams_without_a_usage_chunk_it_did_not_ask_for() {
    let fake = FakeOpenAi::start();
    // Events in halves: the proxy has to reassemble them to find the usage
    // chunk it removes.
    fake.set_chunking(Chunking::Halves);
    let proxy = start(&fake, Some(ROOMY));

    let r = run_sdk("chat_stream.py", &base_url(&proxy), &chat_args(json!({}))).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(r["chunks"], 8, "{r}");
    assert_eq!(r["usage_chunks"], json!([]), "{r}");
    assert_eq!(r["empty_choice_chunks"], 0, "{r}");
    // The proxy asked the backend for the usage it settles with.
    let body = fake.last_body().unwrap();
    assert_eq!(body["stream_options"]["include_usage"], true, "{body}");
    assert_eq!(fake.finished(), 1);
}

#[test]
fn openai_sdk_sees_the_usage_chunk_it_asked_for() {
    let fake = FakeOpenAi::start();
    fake.set_chunking(Chunking::Batched(4));
    let proxy = start(&fake, Some(ROOMY));

    let args = chat_args(json!({"max_tokens": 5, "stream_options": {"include_usage": true}}));
    let r = run_sdk("chat_stream.py", &base_url(&proxy), &args).ok();
    assert_eq!(r["content"], "tok ".repeat(5), "{r}");
    assert_eq!(r["chunks"], 6, "five tokens and the usage chunk: {r}");
    let usage_chunk = json!([{"index": 5, "choices": 0, "usage": expected_usage(&fake, 5)}]);
    assert_eq!(r["usage_chunks"], usage_chunk, "{r}");
}

#[test]
fn openai_sdk_raises_rate_limit_error_when_the_budget_is_spent() {
    let fake = FakeOpenAi::start();
    // The first call really costs 1510 tokens of 2000 a minute; the second
    // reserves its body plus 1500 and cannot fit in what is left, even with
    // a few seconds of refill (33 tokens per second).
    fake.set_usage(Some(UsageOverride {
        prompt_tokens: 10,
        completion_tokens: 1500,
    }));
    let proxy = start(
        &fake,
        Some(
            r#"
tokens_per_minute = 2000
key = "header:Authorization"
max_tokens = 1600
default_max_tokens = 512
max_body = "256KiB"
"#,
        ),
    );
    let url = base_url(&proxy);
    let args = chat_args(json!({"max_tokens": 1500}));

    let r = run_sdk("chat.py", &url, &args).ok();
    assert_eq!(r["usage"]["total_tokens"], 1510, "{r}");
    assert_eq!(fake.count(), 1);

    match run_sdk("chat.py", &url, &args) {
        SdkOutcome::Raised {
            class,
            status,
            headers,
            message,
        } => {
            assert_eq!(class, "RateLimitError", "{message}");
            assert_eq!(status, Some(429), "{message}");
            let wait: u64 = headers["retry-after"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("Retry-After in seconds: {headers}"));
            assert!((1..=60).contains(&wait), "{headers}");
            for h in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
                assert!(headers[h].is_string(), "{h} missing: {headers}");
            }
            assert_eq!(headers["ratelimit-limit"], "2000", "{headers}");
            // 490 left after the first call, plus a little refill.
            let remaining: u64 = headers["ratelimit-remaining"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((490..600).contains(&remaining), "{headers}");
        }
        SdkOutcome::Ok(v) => panic!("the second call fit in the budget: {v}"),
    }
    assert_eq!(fake.count(), 1, "the refused call never reached the GPU");

    // Another API key has a budget of its own.
    let mut other = args.clone();
    other["api_key"] = "sk-test-b".into();
    let r = run_sdk("chat.py", &url, &other).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(fake.count(), 2);
}

#[test]
fn openai_sdk_raises_bad_request_error_over_the_max_tokens_cap() {
    let fake = FakeOpenAi::start();
    let proxy = start(&fake, Some(ROOMY));
    let url = base_url(&proxy);

    for field in ["max_tokens", "max_completion_tokens"] {
        let args = chat_args(json!({ field: 4096 }));
        match run_sdk("chat.py", &url, &args) {
            SdkOutcome::Raised {
                class,
                status,
                message,
                ..
            } => {
                assert_eq!(class, "BadRequestError", "{field}: {message}");
                assert_eq!(status, Some(400), "{field}: {message}");
                assert!(
                    message.contains("2048"),
                    "{field}: the cap is named: {message}"
                );
            }
            SdkOutcome::Ok(v) => panic!("{field} 4096 was let through: {v}"),
        }
    }
    assert_eq!(fake.count(), 0, "nothing over the cap reached the backend");

    // At the cap is fine.
    let r = run_sdk("chat.py", &url, &chat_args(json!({"max_tokens": 2048}))).ok();
    assert_eq!(r["content"], "tok ".repeat(8), "{r}");
    assert_eq!(fake.last_body().unwrap()["max_tokens"], 2048);
}

#[test]
fn openai_sdk_raises_internal_server_error_when_the_backend_fails() {
    let fake = FakeOpenAi::start();
    fake.set_fail(Some(500));
    let proxy = start(&fake, None);

    match run_sdk("chat.py", &base_url(&proxy), &chat_args(json!({}))) {
        SdkOutcome::Raised {
            class,
            status,
            message,
            ..
        } => {
            assert_eq!(class, "InternalServerError", "{message}");
            assert_eq!(status, Some(500), "{message}");
            assert!(
                message.contains("told to fail"),
                "the backend's message: {message}"
            );
        }
        SdkOutcome::Ok(v) => panic!("a failed backend call succeeded: {v}"),
    }
    assert_eq!(fake.count(), 1, "max_retries = 0: one call");
}
