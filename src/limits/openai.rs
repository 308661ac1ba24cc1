//! What an OpenAI-compatible completion costs, read from its request and
//! its response (`/v1/chat/completions`, `/v1/completions`; vLLM's server).
//!
//! The request body is parsed whole, checked against the budget's caps and
//! sent on re-serialized, so the backend reads exactly the JSON that was
//! checked (no duplicate key or odd number form can mean one thing here and
//! another there). A request without `max_tokens` gets the budget's default;
//! a streamed one that did not ask for the usage chunk gets
//! `stream_options.include_usage`, and that chunk is later taken out of its
//! stream again.
//!
//! The response is read as it passes: a JSON body's `usage`, or, for a
//! stream of server-sent events, the usage chunk before `data: [DONE]`.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

use crate::config;

/// Paths whose POSTs are charged to a route's token budget.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
/// See [`CHAT_COMPLETIONS`]; `prompt` may hold several prompts here.
pub const COMPLETIONS: &str = "/v1/completions";

/// Largest JSON response body read for its `usage` (4 MiB); a larger one
/// passes on unread and its reservation is kept whole.
pub const MAX_RESPONSE_SCAN: usize = 4 * 1024 * 1024;
/// Largest single server-sent event held while looking for its end (1 MiB);
/// past it the stream passes on unread and the reservation is kept whole.
pub const MAX_EVENT: usize = 1024 * 1024;

/// Which completion endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    /// The endpoint of a request, if its method and path are one that is
    /// charged. `path` is the request path as the backend reads it (after
    /// `route::normalize_path`: `%63ompletions` is `completions` to vLLM).
    pub fn of(method: &http::Method, path: &[u8]) -> Option<Endpoint> {
        if method != http::Method::POST {
            return None;
        }
        match path {
            p if p == CHAT_COMPLETIONS.as_bytes() => Some(Endpoint::Chat),
            p if p == COMPLETIONS.as_bytes() => Some(Endpoint::Completions),
            _ => None,
        }
    }
}

/// Why a completion request is refused before anything is reserved (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The body is not JSON; where the parser stopped.
    Json { line: usize, column: usize },
    /// The body is JSON but not an object.
    NotObject,
    /// A field has the wrong type or range: `expected` says what it must be.
    Param {
        param: &'static str,
        expected: &'static str,
    },
    /// `max_tokens` / `max_completion_tokens` above the budget's cap.
    OverCap {
        param: &'static str,
        asked: u64,
        cap: u64,
    },
    /// Even a full bucket could not cover the request's worst case.
    OverBudget { needed: u64, budget: u64 },
    /// Media parts (images, audio, video, files) where the budget has no
    /// `media_tokens` to reserve for them.
    Media,
}

impl Invalid {
    /// The request field the refusal is about, for OpenAI's `param`.
    pub fn param(self) -> Option<&'static str> {
        match self {
            Invalid::Param { param, .. } | Invalid::OverCap { param, .. } => Some(param),
            Invalid::Media => Some("messages"),
            Invalid::Json { .. } | Invalid::NotObject | Invalid::OverBudget { .. } => None,
        }
    }

    /// OpenAI's `code` for the refusal.
    pub fn code(self) -> &'static str {
        match self {
            Invalid::Json { .. } | Invalid::NotObject => "invalid_json",
            Invalid::Param { .. } => "invalid_type",
            Invalid::OverCap { .. } => "max_tokens_too_large",
            Invalid::OverBudget { .. } => "tokens_exceed_budget",
            Invalid::Media => "media_not_allowed",
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Json { line, column } => write!(
                f,
                "request body is not valid JSON (line {line}, column {column})"
            ),
            Invalid::NotObject => f.write_str("request body must be a JSON object"),
            Invalid::Param { param, expected } => write!(f, "{param} must be {expected}"),
            Invalid::OverCap { param, asked, cap } => write!(
                f,
                "{param} = {asked} is above this endpoint's limit of {cap} tokens"
            ),
            Invalid::Media => f.write_str(
                "images, audio, video and files are not accepted here: their token cost cannot \
                 be bounded from the request (the budget's media_tokens is not set)",
            ),
            Invalid::OverBudget { needed, budget } => write!(
                f,
                "this request may use up to {needed} tokens (prompt and max_tokens × n), more \
                 than the budget of {budget} tokens per minute: shorten the prompt or lower \
                 max_tokens"
            ),
        }
    }
}

/// A checked completion request: the body to send on, what to reserve and
/// whether the usage chunk was added for us.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The request body the backend receives (re-serialized JSON).
    pub body: Bytes,
    /// Tokens to reserve: the prompt estimate plus `max_tokens` for every
    /// completion asked for.
    pub reserve: u64,
    /// The request streams and did not ask for the usage chunk: it was
    /// asked for on its behalf and must be taken out of its stream.
    pub strip_usage: bool,
}

/// Checks a completion request body against `budget` and prepares the body
/// the backend receives.
///
/// The reservation is `ceil(body bytes / prompt_bytes_per_token)` for the
/// prompt (the whole body, so tools, images and the chat template's
/// framing are covered too) plus `max_tokens × max(n, best_of)` per prompt.
///
/// # Errors
/// [`Invalid`] when the body is not a JSON object, a field the cost depends
/// on has the wrong type, `max_tokens` / `max_completion_tokens` exceeds the
/// cap, or the reservation exceeds `tokens_per_minute`.
pub fn check(
    body: &[u8],
    endpoint: Endpoint,
    budget: &config::TokenBudget,
) -> Result<Checked, Invalid> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| Invalid::Json {
        line: e.line(),
        column: e.column(),
    })?;
    let request = value.as_object_mut().ok_or(Invalid::NotObject)?;

    // vLLM reads `max_completion_tokens or max_tokens` (Python's `or`), so
    // a 0 there names no cap, as null does, and vLLM then generates until
    // the context is full: only a positive value caps the generation.
    let mut max_tokens = None;
    for param in ["max_tokens", "max_completion_tokens"] {
        if let Some(asked) = count(request, param, 0)? {
            if asked > budget.max_tokens {
                return Err(Invalid::OverCap {
                    param,
                    asked,
                    cap: budget.max_tokens,
                });
            }
            if asked > 0 {
                max_tokens = Some(max_tokens.map_or(asked, |m: u64| m.max(asked)));
            }
        }
    }
    let max_tokens = match max_tokens {
        Some(m) => m,
        // `max_tokens: 0` read as such: vLLM's echo of the prompt without
        // generating (or its refusal), no completion tokens.
        None if request.get("max_tokens").and_then(Value::as_u64) == Some(0) => 0,
        None => {
            // `max_tokens` is the name both endpoints of vLLM read, and
            // what a `max_completion_tokens` of 0 falls back to.
            request.insert("max_tokens".into(), budget.default_max_tokens.into());
            budget.default_max_tokens
        }
    };
    let choices = count(request, "n", 1)?
        .unwrap_or(1)
        .max(count(request, "best_of", 1)?.unwrap_or(1));
    // A template sent with the request is code: a few bytes of it can
    // expand into any number of prompt tokens.
    if request.get("chat_template").is_some_and(|t| !t.is_null()) {
        return Err(Invalid::Param {
            param: "chat_template",
            expected: "left out on a route with a token budget (its expansion cannot be bounded)",
        });
    }
    // An image's tokens follow its pixels, not its bytes (a URL, or a small
    // file of a large picture): each media part reserves `media_tokens`.
    let media = media_parts(request.get("messages"));
    if media > 0 && budget.media_tokens == 0 {
        return Err(Invalid::Media);
    }
    let prompts = match endpoint {
        Endpoint::Completions => batch(request.get("prompt"), true)
            .saturating_add(batch(request.get("prompt_embeds"), false)),
        Endpoint::Chat => 1,
    };

    let strip_usage = match request.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => ask_for_usage(request)?,
        Some(_) => {
            return Err(Invalid::Param {
                param: "stream",
                expected: "true or false",
            })
        }
    };

    let per_token = u64::from(budget.prompt_bytes_per_token.max(1));
    let prompt = (body.len() as u64).div_ceil(per_token);
    let reserve = max_tokens
        .saturating_mul(choices)
        .saturating_mul(prompts.max(1))
        .saturating_add(prompt)
        .saturating_add(media.saturating_mul(budget.media_tokens));
    if reserve > budget.tokens_per_minute {
        return Err(Invalid::OverBudget {
            needed: reserve,
            budget: budget.tokens_per_minute,
        });
    }
    // Serializing a parsed Value cannot fail (its keys are strings).
    let body = serde_json::to_vec(&value).map_err(|_| Invalid::NotObject)?;
    Ok(Checked {
        body: Bytes::from(body),
        reserve,
        strip_usage,
    })
}

/// How many prompts a completion's `prompt` or `prompt_embeds` holds: a
/// list is a batch, one prompt each (vLLM runs text prompts and prompt
/// embeddings of one request side by side), except that a list of numbers
/// (`tokens`) is a single prompt in token ids; anything else is one
/// prompt, absent or null none.
fn batch(value: Option<&Value>, tokens: bool) -> u64 {
    match value {
        None | Some(Value::Null) => 0,
        Some(Value::Array(items)) if !(tokens && items.first().is_some_and(Value::is_number)) => {
            items.len() as u64
        }
        Some(_) => 1,
    }
}

/// Content parts of chat messages that are not text (`image_url`,
/// `input_audio`, `video_url`, `file`...): each costs the model's tokens for
/// that medium, which the body's size does not tell.
fn media_parts(messages: Option<&Value>) -> u64 {
    let Some(Value::Array(messages)) = messages else {
        return 0;
    };
    messages
        .iter()
        .filter_map(|m| m.get("content")?.as_array())
        .flatten()
        .filter(|part| part.get("type").and_then(Value::as_str) != Some("text"))
        .count() as u64
}

/// A whole-number field of at least `min`; `None` when absent or null.
fn count(
    request: &Map<String, Value>,
    param: &'static str,
    min: u64,
) -> Result<Option<u64>, Invalid> {
    match request.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(Invalid::Param {
                param,
                expected: if min == 0 {
                    "a whole number of at least 0"
                } else {
                    "a whole number of at least 1"
                },
            }),
        },
    }
}

/// Makes a streamed request ask for the usage chunk; true when it did not
/// already (the chunk is ours to take out again).
fn ask_for_usage(request: &mut Map<String, Value>) -> Result<bool, Invalid> {
    let options = request
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if options.is_null() {
        *options = Value::Object(Map::new());
    }
    let Some(options) = options.as_object_mut() else {
        return Err(Invalid::Param {
            param: "stream_options",
            expected: "an object",
        });
    };
    match options.get("include_usage") {
        Some(Value::Bool(true)) => Ok(false),
        None | Some(Value::Null) | Some(Value::Bool(false)) => {
            options.insert("include_usage".into(), Value::Bool(true));
            Ok(true)
        }
        Some(_) => Err(Invalid::Param {
            param: "stream_options.include_usage",
            expected: "true or false",
        }),
    }
}

/// Reads a completion response for its usage as it passes to the client,
/// and, when the usage chunk was asked for on the client's behalf, takes
/// that chunk out of the stream.
#[derive(Debug)]
pub struct UsageScan {
    /// The response is a stream of server-sent events (else one JSON body).
    events: bool,
    strip: bool,
    /// JSON: the body so far. Events: the start of an event not yet ended.
    held: BytesMut,
    /// Too large to read: the rest passes on unread.
    gave_up: bool,
    usage: Option<u64>,
}

impl UsageScan {
    /// `events`: the response's `Content-Type` is `text/event-stream`.
    /// `strip`: take the usage chunk out (only for event streams).
    pub fn new(events: bool, strip: bool) -> UsageScan {
        UsageScan {
            events,
            strip: strip && events,
            held: BytesMut::new(),
            gave_up: false,
            usage: None,
        }
    }

    /// Whether the usage chunk is taken out: the body's length changes.
    pub fn rewrites(&self) -> bool {
        self.strip
    }

    /// The response's `usage.total_tokens`, once seen.
    pub fn usage(&self) -> Option<u64> {
        self.usage
    }

    /// Reads the next piece of the response body; in strip mode `chunk` is
    /// replaced by what the client gets (whole events only, the usage
    /// chunk left out; a partial event waits for its end).
    pub fn feed(&mut self, chunk: &mut Option<Bytes>, end: bool) {
        if self.gave_up {
            return;
        }
        let data = chunk.as_deref().unwrap_or_default();
        if !self.events {
            if self.held.len() + data.len() > MAX_RESPONSE_SCAN {
                self.give_up();
                return;
            }
            self.held.extend_from_slice(data);
            if end {
                self.usage = serde_json::from_slice::<Value>(&self.held)
                    .ok()
                    .and_then(|v| total_tokens(&v));
                self.held.clear();
            }
            return;
        }
        self.held.extend_from_slice(data);
        let mut out = BytesMut::new();
        while let Some(len) = event_end(&self.held) {
            let event = self.held.split_to(len);
            let usage_only = self.read_event(&event);
            if !(self.strip && usage_only) {
                out.extend_from_slice(&event);
            }
        }
        if end && !self.held.is_empty() {
            let rest = self.held.split();
            self.read_event(&rest);
            out.extend_from_slice(&rest);
        }
        if self.held.len() > MAX_EVENT {
            out.extend_from_slice(&self.held.split());
            self.give_up();
        }
        if self.strip {
            *chunk = (!out.is_empty()).then(|| out.freeze());
        }
    }

    fn give_up(&mut self) {
        self.gave_up = true;
        self.held = BytesMut::new();
        tracing::debug!("completion response too large to read for its usage");
    }

    /// Notes an event's usage; true when it is the usage chunk (a
    /// completion chunk with no choices and a usage).
    fn read_event(&mut self, event: &[u8]) -> bool {
        // Every usage object names its prompt tokens; other events (all
        // but one of a stream) are not parsed at all. A usage missed here
        // could only keep a reservation whole, never undercharge.
        if memchr::memmem::find(event, b"\"prompt_tokens\"").is_none() {
            return false;
        }
        let mut data = Vec::new();
        // CRLF splits into a line and an empty one, which holds no field.
        for line in event.split(|&b| b == b'\n' || b == b'\r') {
            if let Some(value) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
            }
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(&data) else {
            return false;
        };
        let Some(total) = total_tokens(&chunk) else {
            return false;
        };
        self.usage = Some(total);
        chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    }
}

/// `usage.total_tokens` of a completion or chunk (prompt plus completion
/// tokens when the total is missing).
fn total_tokens(value: &Value) -> Option<u64> {
    let usage = value.get("usage")?.as_object()?;
    let field = |name: &str| usage.get(name).and_then(Value::as_u64);
    field("total_tokens")
        .or_else(|| field("prompt_tokens")?.checked_add(field("completion_tokens").unwrap_or(0)))
}

/// The length of the first whole event in `buf`: through the empty line
/// that ends it (WHATWG HTML, "Server-sent events": a line ends with CRLF,
/// LF or a lone CR). A CR last in `buf` waits for the next byte, which may
/// make it a CRLF.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    let mut i = 0;
    while i < buf.len() {
        let end = match buf[i] {
            b'\n' => i + 1,
            b'\r' => match buf.get(i + 1) {
                None => return None,
                Some(b'\n') => i + 2,
                Some(_) => i + 1,
            },
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            return Some(end);
        }
        line_start = end;
        i = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;

    fn budget() -> config::TokenBudget {
        config::TokenBudget {
            name: "ai".into(),
            tokens_per_minute: 20_000,
            key: KeySource::ClientIp,
            scope: Default::default(),
            max_tokens: 2048,
            default_max_tokens: 512,
            max_body: 256 * 1024,
            prompt_bytes_per_token: 1,
            media_tokens: 0,
        }
    }

    fn check_json(body: &str, endpoint: Endpoint) -> Result<(Value, Checked), Invalid> {
        let checked = check(body.as_bytes(), endpoint, &budget())?;
        Ok((serde_json::from_slice(&checked.body).unwrap(), checked))
    }

    #[test]
    fn the_default_cap_is_injected_and_reserved() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let (sent, checked) = check_json(body, Endpoint::Chat).unwrap();
        assert_eq!(sent["max_tokens"], 512);
        assert_eq!(sent["messages"][0]["content"], "hi");
        assert_eq!(checked.reserve, 512 + body.len() as u64);
        assert!(!checked.strip_usage);
    }

    #[test]
    fn caps_are_enforced_on_both_names() {
        for param in ["max_tokens", "max_completion_tokens"] {
            let body = format!(r#"{{"model":"m","messages":[],"{param}":4096}}"#);
            let err = check(body.as_bytes(), Endpoint::Chat, &budget()).unwrap_err();
            assert_eq!(
                err,
                Invalid::OverCap {
                    param,
                    asked: 4096,
                    cap: 2048
                }
            );
            assert!(err.to_string().contains("2048"), "{err}");
        }
        let body = r#"{"messages":[],"max_completion_tokens":100,"max_tokens":null}"#;
        let (sent, checked) = check_json(body, Endpoint::Chat).unwrap();
        assert_eq!(sent.get("max_tokens"), Some(&Value::Null));
        assert_eq!(checked.reserve, 100 + body.len() as u64);
    }

    #[test]
    fn choices_and_batches_multiply_the_reservation() {
        let body = r#"{"prompt":["a","b","c"],"max_tokens":10,"n":2,"best_of":3}"#;
        let (_, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(checked.reserve, 10 * 3 * 3 + body.len() as u64);
        let body = r#"{"prompt":[1,2,3],"max_tokens":10}"#;
        let (_, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(checked.reserve, 10 + body.len() as u64);
        let body = r#"{"prompt":"x","max_tokens":2000,"n":20}"#;
        let err = check(body.as_bytes(), Endpoint::Completions, &budget()).unwrap_err();
        assert!(matches!(err, Invalid::OverBudget { .. }), "{err:?}");
    }

    #[test]
    fn a_zero_cap_is_read_as_vllm_reads_it() {
        // `max_completion_tokens or max_tokens`: a 0 there is no cap at all.
        let (sent, checked) = check_json(r#"{"max_completion_tokens":0}"#, Endpoint::Chat).unwrap();
        assert_eq!(sent["max_tokens"], 512, "{sent}");
        assert!(checked.reserve >= 512);
        let body = r#"{"max_completion_tokens":0,"max_tokens":null}"#;
        let (sent, _) = check_json(body, Endpoint::Chat).unwrap();
        assert_eq!(sent["max_tokens"], 512, "{sent}");
        let body = r#"{"max_completion_tokens":0,"max_tokens":40}"#;
        let (sent, checked) = check_json(body, Endpoint::Chat).unwrap();
        assert_eq!(sent["max_tokens"], 40, "{sent}");
        assert_eq!(checked.reserve, 40 + body.len() as u64);
        // `max_tokens: 0` alone is read as 0 (echo without generation).
        let body = r#"{"prompt":"x","echo":true,"max_tokens":0}"#;
        let (sent, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(sent["max_tokens"], 0, "{sent}");
        assert_eq!(checked.reserve, body.len() as u64);
    }

    #[test]
    fn prompt_embeddings_are_a_batch_too() {
        let body = r#"{"prompt_embeds":["AA","BB","CC"],"max_tokens":10}"#;
        let (_, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(checked.reserve, 30 + body.len() as u64);
        let body = r#"{"prompt":["a","b"],"prompt_embeds":"AA","max_tokens":10}"#;
        let (_, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(checked.reserve, 30 + body.len() as u64);
        let body = r#"{"prompt":[],"prompt_embeds":null,"max_tokens":10}"#;
        let (_, checked) = check_json(body, Endpoint::Completions).unwrap();
        assert_eq!(checked.reserve, 10 + body.len() as u64);
    }

    #[test]
    fn bad_bodies_are_refused_with_what_is_wrong() {
        let err = check(b"{\"a\":", Endpoint::Chat, &budget()).unwrap_err();
        assert!(matches!(err, Invalid::Json { line: 1, .. }), "{err:?}");
        assert_eq!(
            check(b"[1]", Endpoint::Chat, &budget()),
            Err(Invalid::NotObject)
        );
        for (body, param) in [
            (r#"{"max_tokens":-1}"#, "max_tokens"),
            (r#"{"max_tokens":1.5}"#, "max_tokens"),
            (r#"{"max_tokens":"9"}"#, "max_tokens"),
            (r#"{"n":0}"#, "n"),
            (r#"{"stream":"yes"}"#, "stream"),
            (r#"{"stream":true,"stream_options":[]}"#, "stream_options"),
        ] {
            let err = check(body.as_bytes(), Endpoint::Chat, &budget()).unwrap_err();
            assert_eq!(err.param(), Some(param), "{body}: {err}");
        }
        let deep = "[".repeat(10_000);
        assert!(matches!(
            check(deep.as_bytes(), Endpoint::Chat, &budget()),
            Err(Invalid::Json { .. })
        ));
    }

    #[test]
    fn media_and_request_templates_cannot_hide_their_cost() {
        let image = r#"{"messages":[{"role":"user","content":[
            {"type":"text","text":"what is this?"},
            {"type":"image_url","image_url":{"url":"http://127.0.0.1:9/a.png"}},
            {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}}]}],
            "max_tokens":10}"#;
        let err = check(image.as_bytes(), Endpoint::Chat, &budget()).unwrap_err();
        assert_eq!((err, err.code()), (Invalid::Media, "media_not_allowed"));
        let priced = config::TokenBudget {
            media_tokens: 3000,
            ..budget()
        };
        let checked = check(image.as_bytes(), Endpoint::Chat, &priced).unwrap();
        assert_eq!(checked.reserve, 2 * 3000 + 10 + image.len() as u64);
        // Text parts alone are the body's bytes.
        let text = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        assert!(check(text.as_bytes(), Endpoint::Chat, &budget()).is_ok());
        let templated =
            r#"{"messages":[],"chat_template":"{% for i in range(99999) %}x{% endfor %}"}"#;
        let err = check(templated.as_bytes(), Endpoint::Chat, &priced).unwrap_err();
        assert_eq!(err.param(), Some("chat_template"), "{err}");
    }

    #[test]
    fn streams_ask_for_usage_once() {
        let (sent, checked) = check_json(r#"{"stream":true}"#, Endpoint::Chat).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert!(checked.strip_usage);
        let body = r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let (sent, checked) = check_json(body, Endpoint::Chat).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["stream_options"]["x"], 1);
        assert!(checked.strip_usage);
        let body = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let (_, checked) = check_json(body, Endpoint::Chat).unwrap();
        assert!(!checked.strip_usage);
    }

    #[test]
    fn duplicate_keys_reach_the_backend_as_checked() {
        let body = r#"{"max_tokens":10,"max_tokens":5000}"#;
        assert!(matches!(
            check(body.as_bytes(), Endpoint::Chat, &budget()),
            Err(Invalid::OverCap { asked: 5000, .. })
        ));
        let body = r#"{"max_tokens":5000,"max_tokens":10}"#;
        let checked = check(body.as_bytes(), Endpoint::Chat, &budget()).unwrap();
        assert_eq!(&checked.body[..], br#"{"max_tokens":10}"#);
    }

    const CHUNK: &str = r#"data: {"choices":[{"delta":{"content":"a"}}],"usage":null}"#;
    const USAGE: &str = r#"data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;

    fn stream() -> String {
        format!("{CHUNK}\n\n{CHUNK}\r\n\r\n{CHUNK}\r\r{USAGE}\n\ndata: [DONE]\n\n")
    }

    /// Feeds `body` in pieces of `size` bytes; returns what the client got.
    fn feed(scan: &mut UsageScan, body: &str, size: usize) -> String {
        let pieces: Vec<&[u8]> = body.as_bytes().chunks(size).collect();
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut chunk = Some(Bytes::copy_from_slice(piece));
            scan.feed(&mut chunk, i + 1 == pieces.len());
            out.extend_from_slice(chunk.as_deref().unwrap_or_default());
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_chunk_is_read_and_taken_out_however_the_stream_is_cut() {
        let body = stream();
        let expected = format!("{CHUNK}\n\n{CHUNK}\r\n\r\n{CHUNK}\r\rdata: [DONE]\n\n");
        for size in [1, 2, 3, 7, 64, body.len()] {
            let mut scan = UsageScan::new(true, true);
            assert_eq!(feed(&mut scan, &body, size), expected, "size {size}");
            assert_eq!(scan.usage(), Some(7));
            let mut scan = UsageScan::new(true, false);
            assert_eq!(feed(&mut scan, &body, size), body, "size {size}");
            assert_eq!(scan.usage(), Some(7));
        }
    }

    #[test]
    fn json_bodies_are_read_for_usage() {
        let body =
            r#"{"choices":[{"text":"a"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let mut scan = UsageScan::new(false, true);
        assert_eq!(feed(&mut scan, body, 5), body);
        assert_eq!(scan.usage(), Some(7));
        let mut scan = UsageScan::new(false, false);
        feed(&mut scan, r#"{"error":{"message":"x"}}"#, 100);
        assert_eq!(scan.usage(), None);
    }

    #[test]
    fn an_endless_event_passes_on_unread() {
        let mut scan = UsageScan::new(true, true);
        let huge = "x".repeat(MAX_EVENT + 1);
        let out = feed(&mut scan, &format!("data: {huge}"), 64 * 1024);
        assert_eq!(out.len(), MAX_EVENT + 1 + 6);
        assert_eq!(scan.usage(), None);
    }
}
