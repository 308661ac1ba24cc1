//! Micro-benchmarks of the per-request work switchyard adds: route matching
//! over the shipped route table, the snapshot load + backend pick, and the
//! shipped rate limit's check. `cargo bench --bench micro`.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use switchyard::config::Config;
use switchyard::limits::rate::RateLimit;
use switchyard::pools::Switchboard;
use switchyard::route::RouteTable;
use switchyard::store::FileStore;

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
    let board = Switchboard::new(&config, Box::new(store)).expect("switchboard");
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

criterion_group!(benches, routing, snapshot, rate_limit, concurrency);
criterion_main!(benches);
