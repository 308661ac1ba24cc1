//! The `limits` scenario: AI traffic (`POST /v1/chat/completions` with a
//! small chat body, an API key in `Authorization`) through switchyard twice,
//! once on a route with the shipped kinds of limit (a per-client rate limit,
//! a concurrency cap, a token budget keyed by `Authorization`) and once on
//! the same route without them, so the table shows what the limits cost in
//! req/s and CPU per request. nginx proxying the same POST plainly is a
//! reference line: it cannot count tokens, so it is no "limits on" peer.
//!
//! The limits are sized so that nothing is refused during a run (the
//! point is the cost of checking, not of refusing): after the rounds the
//! harness reads `GET /limits` from the admin API and fails the scenario if
//! any limit refused or queued a request, or if the token budget did not
//! see the traffic. The upstream (the bench's nginx) answers a fixed
//! OpenAI-style completion with `usage`, so every request is reserved and
//! settled; in the streaming variant it answers a fixed event stream whose
//! usage chunk the client did not ask for, so switchyard also takes that
//! chunk out of every answer.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::confs::{Kind, Target, API_HOST};
use crate::procs;

/// The path every request of the scenario goes to.
pub const PATH: &str = "/v1/chat/completions";

/// The API key every client sends (one key, as one application would).
pub const AUTHORIZATION: &str = "Bearer sk-bench-0123456789abcdef0123456789abcdef";

/// The request body: a short chat, no `max_tokens` (so the budget injects
/// its default, as for most SDK calls).
pub const CHAT_BODY: &str = r#"{"model":"Qwen/Qwen2.5-7B-Instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Suggest a restaurant near Gangnam station for six people on Thursday evening."}],"temperature":0.7}"#;

/// The same chat, streamed (`"stream": true`, no `stream_options`).
pub const STREAM_BODY: &str = r#"{"model":"Qwen/Qwen2.5-7B-Instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Suggest a restaurant near Gangnam station for six people on Thursday evening."}],"temperature":0.7,"stream":true}"#;

/// The upstream's answer to a completion: fixed, with `usage`.
pub const ANSWER_JSON: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764460800,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Try Maple Tree House: Korean barbecue, a private room for six, five minutes from exit 11."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":41,"completion_tokens":24,"total_tokens":65}}"#;

/// Content chunks of the upstream's streamed answer (one token each).
pub const STREAM_CHUNKS: usize = 16;

/// The upstream's streamed answer: [`STREAM_CHUNKS`] content chunks, the
/// finish chunk, the usage chunk (no choices) and `[DONE]`.
pub fn answer_stream() -> String {
    let head = r#""id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764460800,"model":"Qwen/Qwen2.5-7B-Instruct""#;
    let mut s = String::new();
    for i in 0..STREAM_CHUNKS {
        writeln!(
            s,
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":" word{i}"}},"logprobs":null,"finish_reason":null}}]}}"#
        )
        .unwrap();
        s.push('\n');
    }
    writeln!(
        s,
        r#"data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
    )
    .unwrap();
    s.push('\n');
    writeln!(
        s,
        r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":41,"completion_tokens":{STREAM_CHUNKS},"total_tokens":{}}}}}"#,
        41 + STREAM_CHUNKS
    )
    .unwrap();
    s.push_str("\ndata: [DONE]\n\n");
    s
}

/// `text` as an nginx double-quoted string (no `$`: nginx would expand it).
fn nginx_quoted(text: &str) -> String {
    assert!(!text.contains('$'), "nginx would read $ as a variable");
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The upstream's completion location (any method: `return` answers POST);
/// the event stream is sent chunked, without `Content-Length`. nginx reads no config token longer than 4 KiB, so the answer is cut
/// into variables of at most [`NGINX_PIECE`] bytes that `return` joins.
pub fn upstream_location(stream: bool) -> String {
    let (kind, body) = if stream {
        ("text/event-stream", answer_stream())
    } else {
        ("application/json", ANSWER_JSON.to_string())
    };
    let mut pieces: Vec<&str> = Vec::new();
    let mut rest = body.as_str();
    while !rest.is_empty() {
        let mut at = rest.len().min(NGINX_PIECE);
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        let (piece, tail) = rest.split_at(at);
        pieces.push(piece);
        rest = tail;
    }
    let mut s = format!("        location = {PATH} {{\n            default_type {kind};\n");
    if stream {
        // Chunked, as vLLM streams: SSI (which finds nothing to include
        // here) takes `Content-Length` off nginx's own answer.
        s.push_str("            ssi on;\n            ssi_types text/event-stream;\n");
    }
    let mut joined = String::new();
    for (i, piece) in pieces.iter().enumerate() {
        writeln!(s, "            set $answer{i} {};", nginx_quoted(piece)).unwrap();
        write!(joined, "$answer{i}").unwrap();
    }
    writeln!(s, "            return 200 \"{joined}\";\n        }}").unwrap();
    s
}

/// Largest piece of an answer in one nginx string, bytes (before escaping,
/// which at most doubles it).
const NGINX_PIECE: usize = 1500;

/// The wrk script of a variant: POST with the chat body, then the report
/// hook every scenario uses.
pub fn wrk_script(stream: bool, report: &str) -> String {
    let body = if stream { STREAM_BODY } else { CHAT_BODY };
    // A Lua long string: the body holds quotes but no `]]`.
    assert!(!body.contains("]]"));
    format!("wrk.method = \"POST\"\nwrk.body = [[{body}]]\n{report}")
}

/// The headers wrk sends besides its own.
pub fn headers() -> Vec<String> {
    vec![
        format!("Host: {API_HOST}"),
        format!("Authorization: {AUTHORIZATION}"),
        "Content-Type: application/json".to_string(),
    ]
}

/// Rate-limit rate of the "on" route: far above what one client can send
/// here, so no request is refused, but every request is counted.
const RATE: &str = "1000000/s";
/// In-flight cap and per-key share of the "on" route: above the client's
/// 50 connections, so no request waits in the queue.
const MAX_IN_FLIGHT: u32 = 64;
/// Token budget of the "on" route, tokens per minute: the largest allowed.
/// A request reserves about 760 tokens (body + 512 injected `max_tokens`)
/// and settles 57 or 65, so a run spends a few percent of it.
const TOKENS_PER_MINUTE: u64 = 1_000_000_000;

/// switchyard's limit tables and the AI route, with or without the limits;
/// the rest of the route is as conf/switchyard.toml's `/v1/` route.
pub fn switchyard_route(on: bool) -> String {
    let mut s = String::new();
    if on {
        write!(
            s,
            "[rate_limits.ai_calls]
rate = \"{RATE}\"
burst = 1000
key = \"client_ip\"

[concurrency.gpu]
max_in_flight = {MAX_IN_FLIGHT}
per_key = {MAX_IN_FLIGHT}
key = \"client_ip\"
queue = 16
queue_timeout = \"5s\"

[token_budgets.ai]
tokens_per_minute = {TOKENS_PER_MINUTE}
key = \"header:Authorization\"
max_tokens = 2048
default_max_tokens = 512
max_body = \"256KiB\"

"
        )
        .unwrap();
    }
    write!(
        s,
        "[[routes]]
host = \"{API_HOST}\"
path = \"/v1/\"
service = \"ai\"
read_timeout = \"5m\"
"
    )
    .unwrap();
    if on {
        s.push_str("rate_limit = \"ai_calls\"\nconcurrency = \"gpu\"\ntoken_budget = \"ai\"\n");
    }
    s
}

/// One POST of the scenario's body on a new connection; the status and
/// the raw answer (head and body).
fn post(addr: SocketAddr, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST {PATH} HTTP/1.1\r\nHost: {API_HOST}\r\nAuthorization: {AUTHORIZATION}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let status = procs::parse_status(&buf).unwrap_or(0);
    Ok((status, String::from_utf8_lossy(&buf).into_owned()))
}

/// Before the rounds: every proxy answers the POST with 200 and the
/// upstream's answer; in the streaming variant, switchyard with limits
/// takes out the usage chunk the client did not ask for, and the others
/// pass it on (so the "on" route really does the budget's work).
pub fn precheck(targets: &[Target], stream: bool) -> Result<(), String> {
    let body = if stream { STREAM_BODY } else { CHAT_BODY };
    for t in targets {
        let name = t.kind.name();
        let (status, answer) = post(t.addr(), body).map_err(|e| format!("{name}: POST: {e}"))?;
        if status != 200 {
            return Err(format!("{name} answers {status} to the POST:\n{answer}"));
        }
        let last_content = format!("word{}", STREAM_CHUNKS - 1);
        let complete = if stream {
            answer.contains(&last_content) && answer.contains("[DONE]")
        } else {
            answer.contains("\"total_tokens\":65")
        };
        if !complete {
            return Err(format!(
                "{name}: the answer is not the upstream's:\n{answer}"
            ));
        }
        if stream {
            let has_usage = answer.contains("\"usage\"");
            let want_usage = t.kind != Kind::Switchyard;
            if has_usage != want_usage {
                return Err(format!(
                    "{name}: the usage chunk is {} the stream (expected {}):\n{answer}",
                    if has_usage { "in" } else { "not in" },
                    if want_usage { "in" } else { "out" }
                ));
            }
        }
    }
    Ok(())
}

/// What `GET /limits` says after the rounds of the "on" switchyard.
pub struct Counts {
    pub budget_admitted: u64,
    pub tokens_settled: u64,
    pub tokens_kept: u64,
    pub cap_admitted: u64,
    /// Refused or queued requests, by limit and reason (all must be 0).
    pub refusals: Vec<(&'static str, u64)>,
}

/// Reads the counters of the "on" switchyard's limits from its admin API.
pub fn counts(admin_port: u16, token: &str) -> Result<Counts, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{admin_port}/limits");
    let mut resp = agent
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| format!("GET /limits: {e}"))?;
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if resp.status().as_u16() != 200 {
        return Err(format!("GET /limits: {}: {text}", resp.status()));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("GET /limits: {e}"))?;
    let n = |path: &str| -> Result<u64, String> {
        v.pointer(path)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("GET /limits has no {path}: {text}"))
    };
    Ok(Counts {
        budget_admitted: n("/token_budgets/ai/admitted")?,
        tokens_settled: n("/token_budgets/ai/tokens/settled")?,
        tokens_kept: n("/token_budgets/ai/tokens/kept")?,
        cap_admitted: n("/concurrency/gpu/admitted")?,
        refusals: vec![
            (
                "token budget: exhausted",
                n("/token_budgets/ai/refused/exhausted")?,
            ),
            (
                "token budget: invalid",
                n("/token_budgets/ai/refused/invalid")?,
            ),
            (
                "concurrency: queue full",
                n("/concurrency/gpu/refused/queue_full")?,
            ),
            (
                "concurrency: timeout",
                n("/concurrency/gpu/refused/timeout")?,
            ),
            ("concurrency: queued", n("/concurrency/gpu/queued")?),
        ],
    })
}
