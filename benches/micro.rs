//! Micro-benchmarks of the per-request work switchyard adds: route matching
//! over the shipped route table, and the snapshot load + backend pick.
//! `cargo bench --bench micro`. (Rate limiters arrive with the limits issue;
//! their check joins this file then.)

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::config::Config;
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

criterion_group!(benches, routing, snapshot);
criterion_main!(benches);
