//! Micro-benchmarks of the per-request work switchyard adds: route matching
//! over the shipped route table, the snapshot load + backend pick, the
//! shipped rate limit's check, the concurrency cap, and a token budget's
//! work on a completion (reserve + settle, the body check, the usage scan
//! of the answer), and the metrics observer's count of one finished
//! request, and the cluster limits' Redis work against a Redis on
//! loopback: one rate check, one token reservation plus its settlement,
//! one concurrency lease taken and given back (skipped when none
//! answers). `cargo bench --bench micro`.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use switchyard::config::Config;
use switchyard::limits::rate::RateLimit;
use switchyard::route::RouteTable;
use switchyard::store::FileStore;
use switchyard::switchboard::Switchboard;

fn shipped() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/switchyard.toml");
    Config::load(&path).expect("shipped config is valid")
}

fn routing(c: &mut Criterion) {
    let table = RouteTable::new(&shipped().routes);
    c.bench_function("route/api prefix", |b| {
        b.iter(|| {
            table.resolve(
                black_box(Some("api.moyeobab.com")),
                black_box("/api/v1/meetings"),
            )
        })
    });
    c.bench_function("route/mixed-case host with port", |b| {
        b.iter(|| {
            table.resolve(
                black_box(Some("API.Moyeobab.com:443")),
                black_box("/v1/chat/completions"),
            )
        })
    });
    c.bench_function("route/settlement stream pattern", |b| {
        b.iter(|| {
            table.resolve(
                black_box(Some("api.moyeobab.com")),
                black_box("/api/v1/meetings/42/settlement/progress/stream"),
            )
        })
    });
    c.bench_function("route/path needing normalization", |b| {
        b.iter(|| {
            table.resolve(
                black_box(Some("api.moyeobab.com")),
                black_box("/api/../actuator/env"),
            )
        })
    });
}

fn snapshot(c: &mut Criterion) {
    let config = shipped();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FileStore::open(dir.path()).expect("state dir");
    let pages = switchyard::respond::Pages::new(None, config.server.retry_after).expect("page");
    let settings = switchyard::settings::Settings::new(&config.server, pages);
    let board =
        Switchboard::with_settings(&config, settings, Box::new(store)).expect("switchboard");
    c.bench_function("snapshot/load + pick backend", |b| {
        b.iter(|| {
            let snap = board.load();
            let pool = snap.services[black_box(1)].active_pool();
            pool.select(None).map(|backend| backend.addr)
        })
    });
}

fn rate_limit(c: &mut Criterion) {
    let config = shipped();
    let writes = config
        .rate_limits
        .iter()
        .find(|l| l.name == "writes")
        .expect("shipped config has the writes limit");
    let client: IpAddr = "203.0.113.7".parse().unwrap();
    let get = RequestHeader::build("GET", b"/api/v1/meetings", None).unwrap();
    let post = RequestHeader::build("POST", b"/api/v1/meetings", None).unwrap();

    // A GET on a limited route: the method is not counted (the common case).
    let limit = RateLimit::new(writes);
    c.bench_function("rate limit/uncounted method", |b| {
        b.iter(|| limit.check(black_box(&get), black_box(client)))
    });
    // One client hammering: after its burst every check is a refusal.
    c.bench_function("rate limit/one client over its rate", |b| {
        b.iter(|| limit.check(black_box(&post), black_box(client)))
    });
    // 65 536 distinct clients in turn: the table lookup with a big table.
    let limit = RateLimit::new(writes);
    let mut n: u32 = 0;
    c.bench_function("rate limit/65536 clients in turn", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::from((0x0a00_0000 | (n & 0xffff)).to_be_bytes());
            limit.check(black_box(&post), ip)
        })
    });
    // IPv6 clients are keyed by their /64.
    let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
    c.bench_function("rate limit/IPv6 client", |b| {
        b.iter(|| limit.check(black_box(&post), black_box(v6)))
    });

    // Keyed by an API key header: one keyed hash (SipHash-1-3) per check.
    let by_key = RateLimit::new(&switchyard::config::RateLimit {
        key: switchyard::config::KeySource::parse("header:x-api-key").unwrap(),
        scope: Default::default(),
        ..writes.clone()
    });
    let mut keyed = post.clone();
    keyed
        .insert_header("x-api-key", "sk-0123456789abcdef0123456789abcdef")
        .unwrap();
    c.bench_function("rate limit/API key header", |b| {
        b.iter(|| by_key.check(black_box(&keyed), black_box(client)))
    });
}

fn concurrency(c: &mut Criterion) {
    use futures_util::FutureExt;
    use switchyard::config::{Concurrency as CapConfig, KeySource};
    use switchyard::limits::concurrency::Concurrency;

    let cap = |queue: u32| {
        Concurrency::new(&CapConfig {
            name: "gpu".into(),
            max_in_flight: 8,
            per_key: 2,
            key: KeySource::ClientIp,
            scope: Default::default(),
            queue,
            queue_timeout: std::time::Duration::from_secs(5),
        })
    };
    let req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    let client: IpAddr = "203.0.113.7".parse().unwrap();
    // A free slot: taken and given back (the whole cost a request pays).
    let free = cap(16);
    c.bench_function("concurrency/take and give back a free slot", |b| {
        b.iter(|| {
            let permit = free
                .acquire(black_box(&req), black_box(client))
                .now_or_never();
            drop(black_box(permit));
        })
    });
    // The key at its share and no queue: refused at once.
    let full = cap(0);
    let _held: Vec<_> = (0..2)
        .map(|_| full.acquire(&req, client).now_or_never())
        .collect();
    c.bench_function("concurrency/refused, no queue", |b| {
        b.iter(|| {
            full.acquire(black_box(&req), black_box(client))
                .now_or_never()
        })
    });
}

/// The shipped `[token_budgets.ai]`, with a bucket so large that no row is
/// ever refused however many iterations criterion runs (a refusal is
/// another, cheaper path).
fn budget_settings() -> switchyard::config::TokenBudget {
    let shipped = shipped();
    let ai = shipped
        .token_budgets
        .iter()
        .find(|b| b.name == "ai")
        .expect("shipped config has the ai token budget");
    switchyard::config::TokenBudget {
        tokens_per_minute: switchyard::config::MAX_TOKENS_PER_MINUTE,
        ..ai.clone()
    }
}

fn token_budget(c: &mut Criterion) {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    use switchyard::limits::key::Key;
    use switchyard::limits::tokens::TokenBudget;

    // What one completion does: reserve its worst case at admission, settle
    // with the response's usage at its end. It settles 1 token, so the
    // bucket (10^9 a minute, 16.7 per µs) refills faster than criterion
    // can spend it and every reservation is admitted.
    const RESERVE: u64 = 1_600;
    const USED: u64 = 1;
    let settings = budget_settings();
    let budget = Arc::new(TokenBudget::new(&settings));
    let client: IpAddr = "203.0.113.7".parse().unwrap();
    let key = Key::Ip(client);
    c.bench_function("token budget/reserve + settle, one key", |b| {
        b.iter(|| {
            let mut r = budget
                .reserve(black_box(key), black_box(RESERVE))
                .expect("the bench bucket never runs dry");
            r.settle(black_box(USED));
        })
    });
    // 65 536 distinct keys in turn: the table lookup with a big table.
    let mut n: u32 = 0;
    c.bench_function("token budget/reserve + settle, 65536 keys in turn", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::from((0x0a00_0000 | (n & 0xffff)).to_be_bytes());
            let mut r = budget
                .reserve(Key::Ip(ip), black_box(RESERVE))
                .expect("the bench bucket never runs dry");
            r.settle(black_box(USED));
        })
    });
    // The shipped key, `header:Authorization`: the keyed hash of the
    // header is part of the cost.
    let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    req.insert_header(
        "authorization",
        "Bearer sk-0123456789abcdef0123456789abcdef0123456789abcdef",
    )
    .unwrap();
    c.bench_function(
        "token budget/key from Authorization + reserve + settle",
        |b| {
            b.iter(|| {
                let key = budget.key(black_box(&req), black_box(client));
                let mut r = budget
                    .reserve(key, black_box(RESERVE))
                    .expect("the bench bucket never runs dry");
                r.settle(black_box(USED));
            })
        },
    );
    assert_eq!(
        budget.stats().refused_exhausted.load(Relaxed),
        0,
        "a token budget row was refused: it measured the wrong path"
    );
}

/// A chat completion request of about 1 KiB: a system prompt, two turns of
/// history and a question, as an SDK sends it (`max_tokens`, when given,
/// comes first, so the body keeps its size either way).
fn chat_body(max_tokens: Option<u64>, stream: bool) -> Vec<u8> {
    let mut body = serde_json::json!({
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "messages": [
            {"role": "system", "content": "You are the assistant of a meeting scheduling app. \
                Answer briefly, in the language of the question, and never invent dates, \
                places or names that are not in the conversation."},
            {"role": "user", "content": "We are six people and want to meet next week for \
                dinner near Gangnam station. Three of us can only do Tuesday or Thursday \
                evening, two prefer Thursday, one is free every day after 7 pm."},
            {"role": "assistant", "content": "Thursday evening suits everyone: three can only \
                do Tuesday or Thursday, two prefer Thursday and one is free after 7 pm. \
                Shall I suggest 7:30 pm?"},
            {"role": "user", "content": "Yes, 7:30 pm on Thursday. Please also suggest three \
                Korean barbecue restaurants within ten minutes' walk of the station, with a \
                private room for six, and write a short invitation message for the group chat."}
        ],
        "temperature": 0.7,
        "top_p": 0.9,
        "user": "user-4242"
    });
    let request = body.as_object_mut().unwrap();
    if let Some(m) = max_tokens {
        request.insert("max_tokens".into(), m.into());
    }
    if stream {
        request.insert("stream".into(), true.into());
    }
    serde_json::to_vec(&body).unwrap()
}

fn completion_check(c: &mut Criterion) {
    use switchyard::limits::openai::{check, Endpoint};

    let settings = budget_settings();
    let with_cap = chat_body(Some(1024), false);
    let without = chat_body(None, false);
    let streamed = chat_body(None, true);
    assert!(
        (900..1300).contains(&without.len()),
        "chat body is {} bytes; the rows say about 1 KiB",
        without.len()
    );
    for (name, body) in [
        ("openai check/1 KiB chat body, max_tokens given", &with_cap),
        (
            "openai check/1 KiB chat body, max_tokens injected",
            &without,
        ),
        (
            "openai check/1 KiB chat body, stream: usage asked for",
            &streamed,
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                check(black_box(body), Endpoint::Chat, black_box(&settings)).expect("a valid body")
            })
        });
    }
}

/// A streamed chat completion as vLLM sends it: 64 content chunks (one
/// token each), the finish chunk, the usage chunk (no choices) and
/// `[DONE]`, each its own body piece as the backend flushes them.
fn sse_stream() -> Vec<Bytes> {
    let head = r#""id":"chatcmpl-8f3a2c","object":"chat.completion.chunk","created":1764460800,"model":"Qwen/Qwen2.5-7B-Instruct""#;
    let mut pieces = Vec::new();
    for i in 0..64 {
        pieces.push(format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ));
    }
    pieces.push(format!(
        "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}]}}\n\n"
    ));
    pieces.push(format!(
        "data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":312,\"completion_tokens\":64,\"total_tokens\":376}}}}\n\n"
    ));
    pieces.push("data: [DONE]\n\n".to_string());
    pieces.into_iter().map(Bytes::from).collect()
}

fn usage_scan(c: &mut Criterion) {
    use switchyard::limits::openai::UsageScan;

    let stream = sse_stream();
    let feed_all = |strip: bool| {
        let mut scan = UsageScan::new(true, strip);
        let last = stream.len() - 1;
        for (i, piece) in stream.iter().enumerate() {
            let mut chunk = Some(piece.clone());
            scan.feed(&mut chunk, i == last);
            black_box(chunk);
        }
        scan.usage()
    };
    assert_eq!(feed_all(true), Some(376));
    c.bench_function(
        "usage scan/64-chunk SSE stream, usage chunk stripped",
        |b| b.iter(|| feed_all(black_box(true))),
    );
    c.bench_function("usage scan/64-chunk SSE stream, read only", |b| {
        b.iter(|| feed_all(black_box(false)))
    });
    // A non-streamed answer: one JSON body, parsed whole at its end.
    let json = Bytes::from_static(
        br#"{"id":"chatcmpl-8f3a2c","object":"chat.completion","created":1764460800,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Thursday at 7:30 pm works for everyone. Here are three Korean barbecue places near Gangnam station with private rooms for six, and an invitation for the group chat."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":312,"completion_tokens":41,"total_tokens":353}}"#,
    );
    c.bench_function("usage scan/JSON answer", |b| {
        b.iter(|| {
            let mut scan = UsageScan::new(false, false);
            let mut chunk = Some(json.clone());
            scan.feed(&mut chunk, true);
            scan.usage()
        })
    });
}

/// The metrics observer (`src/metrics`) on one finished request of the
/// shipped config: a proxied 200 and a refused 429, each counted into
/// `requests_total`, the duration histogram and the byte counters.
fn metrics_observe(c: &mut Criterion) {
    use std::time::Duration;
    use switchyard::metrics::Metrics;
    use switchyard::pools::Color;
    use switchyard::record::{Observer, RequestRecord};
    use switchyard::respond::Refusal;

    let config = shipped();
    let metrics = Metrics::new(&config);
    let table = RouteTable::new(&config.routes);
    let target = table
        .resolve(Some("api.moyeobab.com"), "/api/v1/meetings")
        .ok()
        .flatten()
        .expect("the shipped config routes /api/");
    let service = match target.action {
        switchyard::config::RouteAction::Proxy(s) => Some(config.services[s].name.as_str()),
        switchyard::config::RouteAction::Deny => None,
    };
    let route = config.routes[target.index].label();
    let proxied = RequestRecord {
        request_id: "0123456789abcdef",
        client: Some(IpAddr::from([203, 0, 113, 7])),
        method: "GET",
        host: Some("api.moyeobab.com"),
        path: "/api/v1/meetings",
        status: 200,
        service,
        color: Some(Color::Blue),
        route: Some(&route),
        backend: None,
        upstream_time: Some(Duration::from_micros(800)),
        total_time: Duration::from_micros(950),
        bytes_in: 0,
        bytes_out: 1234,
        refusal: None,
        stream: false,
    };
    c.bench_function("metrics/observe a proxied request", |b| {
        b.iter(|| metrics.observe(black_box(&proxied)))
    });
    let refused = RequestRecord {
        status: 429,
        refusal: Some(Refusal::RateLimited {
            retry: 1,
            limit: 10,
        }),
        ..proxied.clone()
    };
    c.bench_function("metrics/observe a refused request", |b| {
        b.iter(|| metrics.observe(black_box(&refused)))
    });
}

/// Where the cluster benches find a Redis: `SWITCHYARD_BENCH_REDIS`,
/// default `redis://127.0.0.1:6379/0`. Loopback only.
const BENCH_REDIS: &str = "redis://127.0.0.1:6379/0";

/// The `[cluster]` of the cluster benches, or `None` (with a line saying
/// why) when there is no loopback Redis to measure against: benches are
/// not tests, so they skip.
fn bench_cluster(what: &str) -> Option<switchyard::config::Cluster> {
    use std::time::Duration;
    let url = std::env::var("SWITCHYARD_BENCH_REDIS").unwrap_or_else(|_| BENCH_REDIS.into());
    let loopback = ["redis://127.0.0.1:", "redis://localhost:", "redis://[::1]:"];
    if !loopback.iter().any(|p| url.starts_with(p)) {
        eprintln!("{what} bench skipped: {url} is not a loopback redis:// URL");
        return None;
    }
    Some(switchyard::config::Cluster {
        redis: url,
        tls: false,
        name: "switchyard-bench".into(),
        instance: "bench".into(),
        password: None,
        ca_file: None,
        timeout: Duration::from_millis(200),
        limit_timeout: Duration::from_millis(200),
        lease: Duration::from_secs(10),
    })
}

fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One cluster rate check (one Lua script round trip) against a Redis
/// already running on loopback (e.g. `redis-server --port 6379 --save ''`).
fn cluster_rate(c: &mut Criterion) {
    use std::sync::Arc;
    use std::time::Duration;
    use switchyard::cluster::{ClusterRate, RedisState};
    use switchyard::limits::key::Key;

    let Some(cluster) = bench_cluster("cluster rate") else {
        return;
    };
    let Ok(state) = RedisState::new(&cluster, None) else {
        eprintln!("cluster rate bench skipped: cannot use {}", cluster.redis);
        return;
    };
    let limit = switchyard::config::RateLimit {
        name: "bench".into(),
        requests: 1_000_000,
        per: Duration::from_secs(1),
        burst: 0,
        methods: None,
        key: switchyard::config::KeySource::ClientIp,
        scope: Default::default(),
    };
    let rate = ClusterRate::new(Arc::new(state), &limit);
    let rt = bench_runtime();
    let key = Key::Ip(IpAddr::from([192, 0, 2, 1]));
    if let Err(e) = rt.block_on(rate.check(key)) {
        eprintln!("cluster rate bench skipped: no Redis to measure against ({e})");
        return;
    }
    c.bench_function("cluster rate/one check on loopback redis", |b| {
        b.iter(|| rt.block_on(rate.check(black_box(key))))
    });
}

/// A cluster token budget's Redis work for one completion: the
/// reservation script and the settlement script, back to back.
fn cluster_tokens(c: &mut Criterion) {
    use std::sync::Arc;
    use switchyard::cluster::Link;
    use switchyard::limits::cluster_tokens::ClusterTokens;
    use switchyard::limits::key::Key;

    let Some(cluster) = bench_cluster("cluster token budget") else {
        return;
    };
    let Ok(link) = Link::new(&cluster, None) else {
        eprintln!(
            "cluster token budget bench skipped: cannot use {}",
            cluster.redis
        );
        return;
    };
    let tokens = ClusterTokens::new(Arc::new(link), &budget_settings());
    let rt = bench_runtime();
    let key = Key::Ip(IpAddr::from([192, 0, 2, 1]));
    let once = async {
        tokens.reserve(&key, 1000).await?;
        tokens.settle(&key, 700.0).await
    };
    if let Err(e) = rt.block_on(once) {
        eprintln!("cluster token budget bench skipped: no Redis to measure against ({e})");
        return;
    }
    c.bench_function(
        "cluster token budget/reserve + settle on loopback redis",
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    let answer = tokens.reserve(black_box(&key), 1000).await;
                    let settled = tokens.settle(&key, 700.0).await;
                    (answer.is_ok(), settled.is_ok())
                })
            })
        },
    );
}

/// A cluster concurrency slot: the lease script, and its release (run on
/// the cluster runtime when the lease is dropped, as after a request).
fn cluster_lease(c: &mut Criterion) {
    use std::sync::Arc;
    use switchyard::cluster::Link;
    use switchyard::limits::key::Key;
    use switchyard::limits::leases::ClusterCap;

    let Some(cluster) = bench_cluster("cluster lease") else {
        return;
    };
    let Ok(link) = Link::new(&cluster, None) else {
        eprintln!("cluster lease bench skipped: cannot use {}", cluster.redis);
        return;
    };
    let cap = ClusterCap::new(
        Arc::new(link),
        &switchyard::config::Concurrency {
            name: "bench".into(),
            max_in_flight: switchyard::config::MAX_IN_FLIGHT,
            per_key: switchyard::config::MAX_IN_FLIGHT,
            key: switchyard::config::KeySource::ClientIp,
            queue: 0,
            queue_timeout: std::time::Duration::from_secs(1),
            scope: switchyard::config::Scope::Cluster,
        },
    );
    let rt = bench_runtime();
    let key = Key::Ip(IpAddr::from([192, 0, 2, 1]));
    if let Err(e) = rt.block_on(cap.try_acquire(&key, &cap.member())) {
        eprintln!("cluster lease bench skipped: no Redis to measure against ({e})");
        return;
    }
    c.bench_function(
        "cluster lease/take one slot on loopback redis (given back in the background)",
        |b| b.iter(|| rt.block_on(cap.try_acquire(black_box(&key), &cap.member()))),
    );
}

criterion_group!(
    benches,
    cluster_rate,
    cluster_tokens,
    cluster_lease,
    metrics_observe,
    routing,
    snapshot,
    rate_limit,
    concurrency,
    token_budget,
    completion_check,
    usage_scan
);
criterion_main!(benches);
