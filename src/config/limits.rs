//! `[rate_limits.NAME]`: named per-client request rates that routes count
//! against, `[concurrency.NAME]`: named in-flight caps that routes hold
//! slots of, and `[token_budgets.NAME]`: named per-key token budgets that
//! routes' OpenAI-compatible completions are charged to, with their
//! defaults and bounds.

use std::ops::RangeInclusive;
use std::time::Duration;

use http::HeaderName;
use toml::Spanned;

use super::{file, Validator};

/// Requests a client may send beyond its rate in a rush (0), as nginx's `burst`.
pub const DEFAULT_RATE_BURST: u32 = 0;
/// Largest request count in a rate (1 000 000): at most one request per
/// microsecond per client, far beyond anything a limit is for.
pub const MAX_RATE: u32 = 1_000_000;

/// Largest `max_in_flight` of a concurrency cap (1 000 000 requests).
pub const MAX_IN_FLIGHT: u32 = 1_000_000;
/// Largest `queue` of a concurrency cap (100 000 waiting requests): each
/// waiter holds a connection and a little memory.
pub const MAX_QUEUE: u32 = 100_000;
/// Requests a cap queues when `queue` is not set (0): over the cap is 503 at once.
pub const DEFAULT_QUEUE: u32 = 0;
/// Longest a queued request waits for a slot when `queue_timeout` is not set (5 s).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Allowed `queue_timeout`: 100 ms to 10 min (a client waits that long
/// without a byte back).
pub const QUEUE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    super::values::MIN_DURATION..=Duration::from_secs(600);

/// Largest `tokens_per_minute` of a token budget (1 000 000 000 tokens).
pub const MAX_TOKENS_PER_MINUTE: u64 = 1_000_000_000;
/// The cap on `max_tokens` / `max_completion_tokens` when a budget sets no
/// `max_tokens` (4096 tokens), lowered to `tokens_per_minute` if that is less.
pub const DEFAULT_BUDGET_MAX_TOKENS: u64 = 4096;
/// `max_tokens` injected into a request that names none, when a budget sets
/// no `default_max_tokens` (512 tokens), lowered to the cap if that is
/// less. Without it vLLM generates until the context is full.
pub const DEFAULT_INJECTED_MAX_TOKENS: u64 = 512;
/// Largest completion request body read and parsed when a budget sets no
/// `max_body` (256 KiB).
pub const DEFAULT_BUDGET_MAX_BODY: usize = 256 * 1024;
/// Allowed `max_body` of a token budget: 1 KiB to 16 MiB (the body is held
/// in memory while it is parsed).
pub const BUDGET_MAX_BODY_RANGE: RangeInclusive<usize> = 1024..=16 * 1024 * 1024;
/// Request body bytes counted as one prompt token in the reservation when
/// a budget sets no `prompt_bytes_per_token` (1): no token of a byte-level
/// BPE tokenizer is shorter than one byte, so the estimate never falls
/// short and concurrent requests can never overrun the budget.
pub const DEFAULT_PROMPT_BYTES_PER_TOKEN: u32 = 1;
/// Allowed `prompt_bytes_per_token`: 1 to 8. Above 1 the reservation may
/// fall short of a prompt's real size; the difference is charged at
/// settlement, so a key pays in full, but concurrent requests may then
/// overrun the budget by what was underestimated.
pub const PROMPT_BYTES_PER_TOKEN_RANGE: RangeInclusive<u32> = 1..=8;

/// Where a limit is counted (`scope = "local" | "cluster"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// `"local"` (the default, [`DEFAULT_SCOPE`]): in this instance's
    /// memory; N instances together admit N times the limit.
    #[default]
    Local,
    /// `"cluster"`: in the Redis of `[cluster]` (required), shared by every
    /// instance; while Redis is unreachable each instance falls back to its
    /// share of the limit (the limit divided by the live instances).
    Cluster,
}

/// A limit's scope when it sets none: local. Sharing a limit through Redis
/// costs a round trip per request, so it is an explicit opt-in.
pub const DEFAULT_SCOPE: Scope = Scope::Local;

/// A per-key token budget (`[token_budgets.NAME]`) shared by every route
/// naming it: a bucket of `tokens_per_minute` tokens per key, refilled
/// continuously, that each completion reserves from at admission and
/// settles with its real `usage` when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBudget {
    pub name: String,
    /// Bucket size and refill per minute, 1 to [`MAX_TOKENS_PER_MINUTE`].
    pub tokens_per_minute: u64,
    /// What requests are charged under (`key`; default the client address).
    pub key: KeySource,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask
    /// for, 1 to `tokens_per_minute` (default [`DEFAULT_BUDGET_MAX_TOKENS`]).
    pub max_tokens: u64,
    /// `max_tokens` injected when a request names none, 1 to `max_tokens`
    /// (default [`DEFAULT_INJECTED_MAX_TOKENS`]).
    pub default_max_tokens: u64,
    /// Largest completion body, bytes (default [`DEFAULT_BUDGET_MAX_BODY`]).
    pub max_body: usize,
    /// Body bytes per prompt token in the reservation estimate (default
    /// [`DEFAULT_PROMPT_BYTES_PER_TOKEN`]).
    pub prompt_bytes_per_token: u32,
    /// Tokens reserved per media part of a chat message (an image, audio,
    /// video or file), 0 to `tokens_per_minute`; 0 (the default) refuses
    /// such requests, since their cost cannot be bounded from the body.
    pub media_tokens: u64,
    /// `scope` (default [`DEFAULT_SCOPE`]).
    pub scope: Scope,
}

/// An in-flight cap (`[concurrency.NAME]`) shared by every route naming it:
/// at most `max_in_flight` requests at the backends at once, at most
/// `per_key` of them under one key; the rest wait in a FIFO queue of
/// `queue` places for up to `queue_timeout`, or get 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    pub name: String,
    /// Requests in flight at once over every key, 1 to [`MAX_IN_FLIGHT`].
    pub max_in_flight: u32,
    /// Requests in flight at once under one key, 1 to `max_in_flight`
    /// (default `max_in_flight`).
    pub per_key: u32,
    /// What requests are counted under (`key`; default the client address).
    pub key: KeySource,
    /// Requests waiting for a slot, 0 to [`MAX_QUEUE`] (default [`DEFAULT_QUEUE`]).
    pub queue: u32,
    /// Longest wait in the queue (default [`DEFAULT_QUEUE_TIMEOUT`]).
    pub queue_timeout: Duration,
    /// `scope` (default [`DEFAULT_SCOPE`]).
    pub scope: Scope,
}

/// A per-client request rate (`[rate_limits.NAME]`), nginx's `limit_req`
/// with `nodelay`: requests over the rate are refused with 429, not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub name: String,
    /// `requests` per `per`, e.g. 2 per second.
    pub requests: u32,
    pub per: Duration,
    /// Requests beyond the rate a client may send at once: a fresh client
    /// gets `burst + 1` before the rate applies.
    pub burst: u32,
    /// Methods the limit counts; `None` means every method.
    pub methods: Option<Vec<http::Method>>,
    /// What requests are counted under (`key`; default the client address).
    pub key: KeySource,
    /// `scope` (default [`DEFAULT_SCOPE`]).
    pub scope: Scope,
}

/// Where a limit takes its key from (`key = ...` in a limit's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `"client_ip"` (the default): the client's address after
    /// `trusted_proxies`; IPv6 by its /64.
    ClientIp,
    /// `"header:NAME"`: the value of that request header, hashed.
    Header(HeaderName),
    /// `"global"`: every request shares one key.
    Global,
}

impl KeySource {
    /// Reads `client_ip`, `global` or `header:NAME` (NAME a header field
    /// name, RFC 9110 §5.1; case does not matter). The error says what to
    /// write instead.
    pub fn parse(text: &str) -> Result<KeySource, String> {
        match text {
            "client_ip" => Ok(KeySource::ClientIp),
            "global" => Ok(KeySource::Global),
            _ => {
                let Some(name) = text.strip_prefix("header:") else {
                    return Err(
                        "expected \"client_ip\", \"global\" or \"header:NAME\" (e.g. \"header:X-Api-Key\")"
                            .into(),
                    );
                };
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("{name:?} is not a header name"))?;
                if name == http::header::HOST || name.as_str().starts_with("x-forwarded-") {
                    return Err(format!(
                        "{name} says where a request goes or came from, not who sent it: use \"client_ip\""
                    ));
                }
                Ok(KeySource::Header(name))
            }
        }
    }
}

impl Validator<'_> {
    pub(super) fn rate_limit(
        &mut self,
        name: Spanned<String>,
        r: file::RateLimit,
    ) -> Option<RateLimit> {
        let valid_name = self.name(&name, "rate limit");
        if !valid_name {
            self.dropped
                .insert(("rate_limits".into(), name.get_ref().clone()));
        }
        let (requests, per) = match parse_rate(r.rate.get_ref()) {
            Some(rate) => rate,
            None => {
                self.at(
                    &r.rate,
                    format!(
                        "bad rate {:?}: write it like \"2/s\", \"30/m\" or \"500/h\" (1 to {MAX_RATE} requests)",
                        r.rate.get_ref()
                    ),
                );
                (1, Duration::from_secs(1))
            }
        };
        let burst = match r.burst {
            Some(b) if *b.get_ref() >= MAX_RATE => {
                self.at(&b, format!("burst must be below {MAX_RATE}"));
                DEFAULT_RATE_BURST
            }
            Some(b) => *b.get_ref(),
            None => DEFAULT_RATE_BURST,
        };
        let methods = r.methods.map(|list| {
            let mut out: Vec<http::Method> = Vec::new();
            for m in &list {
                let upper = m.get_ref().to_ascii_uppercase();
                match http::Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() && !out.contains(&method) => out.push(method),
                    Ok(_) if !upper.is_empty() => {
                        self.at(m, format!("method {upper} is listed twice"))
                    }
                    _ => self.at(
                        m,
                        format!("bad method {:?}: give names like \"POST\"", m.get_ref()),
                    ),
                }
            }
            out
        });
        let key = self.limit_key(r.key.as_ref());
        let scope = self.limit_scope(r.scope.as_ref());
        valid_name.then(|| RateLimit {
            name: name.into_inner(),
            requests,
            per,
            burst,
            methods,
            key,
            scope,
        })
    }

    pub(super) fn concurrency(
        &mut self,
        name: Spanned<String>,
        c: file::Concurrency,
    ) -> Option<Concurrency> {
        let valid_name = self.name(&name, "concurrency cap");
        if !valid_name {
            self.dropped
                .insert(("concurrency".into(), name.get_ref().clone()));
        }
        let max_in_flight = self.count(
            Some(&c.max_in_flight),
            1,
            1..=MAX_IN_FLIGHT,
            "max_in_flight",
        );
        let per_key = self.count(
            c.per_key.as_ref(),
            max_in_flight,
            1..=max_in_flight,
            "per_key",
        );
        let queue = self.count(c.queue.as_ref(), DEFAULT_QUEUE, 0..=MAX_QUEUE, "queue");
        let queue_timeout = self.duration_in(
            c.queue_timeout.as_ref(),
            DEFAULT_QUEUE_TIMEOUT,
            QUEUE_TIMEOUT_RANGE,
        );
        let key = self.limit_key(c.key.as_ref());
        let scope = self.limit_scope(c.scope.as_ref());
        valid_name.then(|| Concurrency {
            name: name.into_inner(),
            max_in_flight,
            per_key,
            key,
            queue,
            queue_timeout,
            scope,
        })
    }

    pub(super) fn token_budget(
        &mut self,
        name: Spanned<String>,
        b: file::TokenBudget,
    ) -> Option<TokenBudget> {
        let valid_name = self.name(&name, "token budget");
        if !valid_name {
            self.dropped
                .insert(("token_budgets".into(), name.get_ref().clone()));
        }
        let tokens_per_minute = self.count(
            Some(&b.tokens_per_minute),
            DEFAULT_BUDGET_MAX_TOKENS,
            1..=MAX_TOKENS_PER_MINUTE,
            "tokens_per_minute",
        );
        // A cap above the bucket would let no request at the cap through.
        let max_tokens = self.count(
            b.max_tokens.as_ref(),
            DEFAULT_BUDGET_MAX_TOKENS.min(tokens_per_minute),
            1..=tokens_per_minute,
            "max_tokens",
        );
        let default_max_tokens = self.count(
            b.default_max_tokens.as_ref(),
            DEFAULT_INJECTED_MAX_TOKENS.min(max_tokens),
            1..=max_tokens,
            "default_max_tokens",
        );
        let max_body = self.size_in(
            b.max_body.as_ref(),
            DEFAULT_BUDGET_MAX_BODY,
            BUDGET_MAX_BODY_RANGE,
        );
        let prompt_bytes_per_token = self.count(
            b.prompt_bytes_per_token.as_ref(),
            DEFAULT_PROMPT_BYTES_PER_TOKEN,
            PROMPT_BYTES_PER_TOKEN_RANGE,
            "prompt_bytes_per_token",
        );
        let media_tokens = self.count(
            b.media_tokens.as_ref(),
            0,
            0..=tokens_per_minute,
            "media_tokens",
        );
        let key = self.limit_key(b.key.as_ref());
        let scope = self.limit_scope(b.scope.as_ref());
        valid_name.then(|| TokenBudget {
            name: name.into_inner(),
            tokens_per_minute,
            key,
            max_tokens,
            default_max_tokens,
            max_body,
            prompt_bytes_per_token,
            media_tokens,
            scope,
        })
    }

    /// A limit's `scope`; a mistake is reported and local stands in. Where
    /// `"cluster"` was written is kept: it needs a `[cluster]` section,
    /// which is known only once the whole file is read
    /// ([`Validator::cluster_scopes_need_a_cluster`]).
    pub(super) fn limit_scope(&mut self, value: Option<&Spanned<String>>) -> Scope {
        let Some(value) = value else {
            return DEFAULT_SCOPE;
        };
        match value.get_ref().as_str() {
            "local" => Scope::Local,
            "cluster" => {
                self.cluster_scopes.push(value.span().start);
                Scope::Cluster
            }
            other => {
                self.at(
                    value,
                    format!("bad scope {other:?}: expected \"local\" or \"cluster\""),
                );
                DEFAULT_SCOPE
            }
        }
    }

    /// Reports every `scope = "cluster"` of a file without `[cluster]`.
    pub(super) fn cluster_scopes_need_a_cluster(&mut self, has_cluster: bool) {
        if has_cluster {
            return;
        }
        for at in std::mem::take(&mut self.cluster_scopes) {
            self.error(
                at,
                "scope = \"cluster\" needs a [cluster] section (the Redis the instances share): \
                 add one, or use scope = \"local\""
                    .into(),
            );
        }
    }

    /// A limit's `key`; a mistake is reported and the client address
    /// stands in.
    pub(super) fn limit_key(&mut self, value: Option<&Spanned<String>>) -> KeySource {
        let Some(value) = value else {
            return KeySource::ClientIp;
        };
        match KeySource::parse(value.get_ref()) {
            Ok(k) => k,
            Err(e) => {
                self.at(value, format!("bad key {:?}: {e}", value.get_ref()));
                KeySource::ClientIp
            }
        }
    }
}

/// `"N/s"`, `"N/m"` or `"N/h"` as (N, the unit), N from 1 to [`MAX_RATE`].
fn parse_rate(text: &str) -> Option<(u32, Duration)> {
    let (count, unit) = text.split_once('/')?;
    let count: u32 = count.trim().parse().ok()?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return None,
    };
    (1..=MAX_RATE).contains(&count).then_some((count, per))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_bad_key_is_located() {
        let text = format!("{GOOD}\n[rate_limits.ai]\nrate = \"30/m\"\nkey = \"ip\"\n");
        let err = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad key \"ip\": expected \"client_ip\""),
            "{err}"
        );
        let text =
            format!("{GOOD}\n[rate_limits.ai]\nrate = \"30/m\"\nkey = \"header:X-Api-Key\"\n");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(
            c.rate_limits[0].key,
            KeySource::Header(HeaderName::from_static("x-api-key"))
        );
    }

    #[test]
    fn sources_parse_with_clear_errors() {
        assert_eq!(KeySource::parse("client_ip"), Ok(KeySource::ClientIp));
        assert_eq!(KeySource::parse("global"), Ok(KeySource::Global));
        assert_eq!(
            KeySource::parse("header:X-Api-Key"),
            Ok(KeySource::Header(HeaderName::from_static("x-api-key")))
        );
        for bad in [
            "",
            "ip",
            "Client_IP",
            "header:",
            "header:bad name",
            "header:a:b",
        ] {
            assert!(KeySource::parse(bad).is_err(), "{bad}");
        }
        let err = KeySource::parse("header:X-Forwarded-For").unwrap_err();
        assert!(err.contains("use \"client_ip\""), "{err}");
        assert!(KeySource::parse("header:host").is_err());
    }

    use crate::config::tests::{errors, GOOD};
    use crate::config::Config;

    #[test]
    fn rate_limits_parse_and_routes_name_them() {
        let text = format!(
            "{GOOD}\n[rate_limits.writes]\nrate = \"2/s\"\nburst = 10\nmethods = [\"post\", \"PUT\"]\n"
        )
        .replace("service = \"api\"", "service = \"api\"\nrate_limit = \"writes\"");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let limit = &c.rate_limits[0];
        assert_eq!(
            (limit.requests, limit.per, limit.burst),
            (2, Duration::from_secs(1), 10)
        );
        assert_eq!(
            limit.methods,
            Some(vec![http::Method::POST, http::Method::PUT])
        );
        assert_eq!(c.routes[0].limits.rate_limit, Some(0));
        assert_eq!(c.routes[1].limits.rate_limit, None);
    }

    #[test]
    fn bad_rate_limits_are_located() {
        let text = format!(
            "{GOOD}\n[rate_limits.writes]\nrate = \"2/d\"\nburst = 1000000\nmethods = [\"PO ST\"]\n"
        )
        .replace(
            "service = \"api\"",
            "service = \"api\"\nrate_limit = \"write\"",
        );
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        // In line order, whatever order they were found in.
        assert_eq!(lines, vec![18, 25, 26, 27], "{e:?}");
        assert!(
            e[0].message
                .contains("unknown rate limit \"write\"; defined [rate_limits]: writes"),
            "{}",
            e[0]
        );
        assert!(e[1].message.contains("bad rate \"2/d\""), "{}", e[1]);
        assert!(e[2].message.contains("burst"), "{}", e[2]);
        assert!(e[3].message.contains("bad method"), "{}", e[3]);
    }

    #[test]
    fn concurrency_caps_parse_with_defaults_and_routes_name_them() {
        let text = format!(
            "{GOOD}\n[concurrency.gpu]\nmax_in_flight = 8\nper_key = 2\nkey = \"header:X-Api-Key\"\nqueue = 16\nqueue_timeout = \"2s\"\n\n[concurrency.small]\nmax_in_flight = 3\n"
        )
        .replace("service = \"api\"", "service = \"api\"\nconcurrency = \"small\"");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let gpu = &c.concurrency[0];
        assert_eq!(
            (gpu.name.as_str(), gpu.max_in_flight, gpu.per_key, gpu.queue),
            ("gpu", 8, 2, 16)
        );
        assert_eq!(gpu.queue_timeout, Duration::from_secs(2));
        assert_eq!(
            gpu.key,
            KeySource::Header(HeaderName::from_static("x-api-key"))
        );
        let small = &c.concurrency[1];
        assert_eq!((small.per_key, small.queue), (3, DEFAULT_QUEUE));
        assert_eq!(small.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
        assert_eq!(small.key, KeySource::ClientIp);
        assert_eq!(c.routes[0].limits.concurrency, Some(1));
        assert_eq!(c.routes[1].limits.concurrency, None);
    }

    #[test]
    fn bad_concurrency_caps_are_located() {
        let text = format!(
            "{GOOD}\n[concurrency.gpu]\nmax_in_flight = 0\nper_key = 2\nqueue = 100001\nqueue_timeout = \"20m\"\nkey = \"ip\"\n\n[concurrency.b]\nmax_in_flight = 2\nper_key = 3\n\n[concurrency.c]\nper_key = 1\nqueues = 1\n"
        )
        .replace("service = \"api\"", "service = \"api\"\nconcurrency = \"gpus\"");
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![18, 25, 26, 27, 28, 29, 33, 35, 37], "{e:?}");
        assert!(
            e[0].message
                .contains("unknown concurrency cap \"gpus\"; defined [concurrency]: b, gpu"),
            "{}",
            e[0]
        );
        assert!(
            e[1].message.contains("max_in_flight = 0 is out of range"),
            "{}",
            e[1]
        );
        // per_key is checked against the default max_in_flight stood in.
        assert!(
            e[2].message
                .contains("per_key = 2 is out of range: allowed from 1 to 1"),
            "{}",
            e[2]
        );
        assert!(
            e[3].message.contains("queue = 100001 is out of range"),
            "{}",
            e[3]
        );
        assert!(e[4].message.contains("out of range"), "{}", e[4]);
        assert!(e[5].message.contains("bad key \"ip\""), "{}", e[5]);
        assert!(
            e[6].message
                .contains("per_key = 3 is out of range: allowed from 1 to 2"),
            "{}",
            e[6]
        );
        assert!(e[7].message.contains("max_in_flight"), "{}", e[7]);
        assert!(e[8].message.contains("queues"), "{}", e[8]);
    }

    #[test]
    fn scope_is_local_by_default_and_cluster_needs_a_cluster_section() {
        let limits = "\n[rate_limits.ai]\nrate = \"30/m\"\nscope = \"cluster\"\n\
                      \n[concurrency.gpu]\nmax_in_flight = 2\nscope = \"cluster\"\n\
                      \n[token_budgets.llm]\ntokens_per_minute = 1000\nscope = \"cluster\"\n\
                      \n[rate_limits.plain]\nrate = \"1/s\"\n\
                      \n[concurrency.here]\nmax_in_flight = 1\nscope = \"local\"\n";
        let e = errors(&format!("{GOOD}{limits}"));
        let lines: Vec<(usize, usize)> = e.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(
            lines,
            vec![25, 29, 33]
                .into_iter()
                .map(|l| (l, 9))
                .collect::<Vec<_>>(),
            "{e:?}"
        );
        for err in &e {
            assert!(
                err.message
                    .contains("scope = \"cluster\" needs a [cluster] section"),
                "{err}"
            );
        }
        let text = format!("{GOOD}{limits}\n[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\n");
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.rate_limits[0].scope, Scope::Cluster);
        assert_eq!(c.rate_limits[1].scope, DEFAULT_SCOPE);
        assert_eq!(DEFAULT_SCOPE, Scope::Local);
        assert_eq!(c.concurrency[0].scope, Scope::Cluster);
        assert_eq!(c.concurrency[1].scope, Scope::Local);
        assert_eq!(c.token_budgets[0].scope, Scope::Cluster);
        let e = errors(&format!(
            "{GOOD}\n[rate_limits.ai]\nrate = \"1/s\"\nscope = \"global\"\n"
        ));
        assert!(
            e[0].message
                .contains("bad scope \"global\": expected \"local\" or \"cluster\""),
            "{}",
            e[0]
        );
    }

    #[test]
    fn rates_read_like_nginx() {
        assert_eq!(parse_rate("2/s"), Some((2, Duration::from_secs(1))));
        assert_eq!(parse_rate("30/m"), Some((30, Duration::from_secs(60))));
        assert_eq!(
            parse_rate("500 / h"),
            Some((500, Duration::from_secs(3600)))
        );
        for bad in ["0/s", "2", "2/d", "-1/s", "1000001/s", "x/s", ""] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }
}
