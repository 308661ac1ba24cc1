//! `ClusterRate` against a real `redis-server` on loopback (issue 13 point
//! 2): GCRA burst and wait, two instances sharing one key, independent
//! keys, idle keys expiring, Redis gone, and the cost of one check.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use switchyard::cluster::{ClusterRate, Decision, RedisState};
use switchyard::config::{Cluster, KeySource, RateLimit};
use switchyard::limits::key::Key;

/// Short, so the "Redis gone" case finishes quickly (300 ms).
const TIMEOUT: Duration = Duration::from_millis(300);

fn cluster(redis: &RedisServer, name: &str) -> Cluster {
    redis.cluster(name, TIMEOUT)
}

fn limit(name: &str, requests: u32, per: Duration, burst: u32) -> RateLimit {
    RateLimit {
        name: name.into(),
        requests,
        per,
        burst,
        methods: None,
        key: KeySource::ClientIp,
        scope: Default::default(),
    }
}

/// One "instance": its own `RedisState` (its own connection).
fn instance(redis: &RedisServer, cluster_name: &str, l: &RateLimit) -> ClusterRate {
    let state = Arc::new(RedisState::new(&cluster(redis, cluster_name), None).unwrap());
    ClusterRate::new(state, l)
}

fn ip(s: &str) -> Key {
    Key::Ip(s.parse::<IpAddr>().unwrap())
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_burst_then_refusals_with_the_right_wait() {
    let redis = RedisServer::start();
    // 2/s: T = 500 ms; burst 3: 4 at once.
    let rate = instance(&redis, "b", &limit("api", 2, Duration::from_secs(1), 3));
    let a = ip("192.0.2.1");
    for i in 0..4 {
        assert_eq!(
            rate.check(&a).await.unwrap(),
            Decision::Allowed,
            "request {i}"
        );
    }
    let Decision::Refused { wait } = rate.check(&a).await.unwrap() else {
        panic!("the 5th request must be refused");
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    // A refusal uses up nothing: the wait only shrinks.
    let Decision::Refused { wait: again } = rate.check(&a).await.unwrap() else {
        panic!("still over the rate");
    };
    assert!(again <= wait, "{again:?} > {wait:?}");
    // Admitted again once the wait has passed, not much earlier (polled).
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    loop {
        if rate.check(&a).await.unwrap() == Decision::Allowed {
            break;
        }
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    assert!(
        took + Duration::from_millis(50) >= again,
        "admitted after {took:?}, the wait said {again:?}"
    );
    // Exactly one more: the next is refused again.
    assert!(matches!(
        rate.check(&a).await.unwrap(),
        Decision::Refused { .. }
    ));
}

#[test]
fn two_instances_together_never_exceed_burst_plus_rate() {
    let redis = RedisServer::start();
    // 50/s, burst 10; each instance hammers the same key for up to 1 s.
    let (requests, burst) = (50u32, 10u32);
    let l = limit("shared", requests, Duration::from_secs(1), burst);
    let handles = [instance(&redis, "two", &l), instance(&redis, "two", &l)];
    const RUN: Duration = Duration::from_secs(1);
    const MAX_CHECKS: usize = 20_000;
    let barrier = Arc::new(Barrier::new(2));
    let started = Instant::now();
    let threads: Vec<_> = handles
        .into_iter()
        .map(|rate| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let key = ip("198.51.100.7");
                    // Connect first, so both start checking together.
                    let _ = rate.check(&ip("203.0.113.1")).await.unwrap();
                    barrier.wait();
                    let begin = Instant::now();
                    let (mut admitted, mut checks) = (0u64, 0usize);
                    while begin.elapsed() < RUN && checks < MAX_CHECKS {
                        checks += 1;
                        if rate.check(&key).await.unwrap() == Decision::Allowed {
                            admitted += 1;
                        }
                    }
                    (admitted, checks)
                })
            })
        })
        .collect();
    let results: Vec<(u64, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let admitted: u64 = results.iter().map(|r| r.0).sum();
    let checks: usize = results.iter().map(|r| r.1).sum();
    let bound = u64::from(burst) + 1 + (f64::from(requests) * elapsed.as_secs_f64()).ceil() as u64;
    println!("two instances: {checks} checks, {admitted} admitted in {elapsed:?} (bound {bound})");
    assert!(admitted <= bound, "{admitted} admitted > {bound}");
    assert!(
        admitted > u64::from(burst),
        "the burst itself was admitted: {admitted}"
    );
    // The test means something only if the instances asked for far more.
    assert!(
        checks as u64 > 2 * bound,
        "too few checks to judge: {checks}"
    );
    for (i, (a, _)) in results.iter().enumerate() {
        assert!(*a > 0, "instance {i} admitted nothing: {results:?}");
    }
}

#[tokio::test]
async fn keys_and_limits_are_independent() {
    let redis = RedisServer::start();
    let one = limit("one", 1, Duration::from_secs(60), 0);
    let rate = instance(&redis, "ind", &one);
    let a = ip("192.0.2.1");
    assert_eq!(rate.check(&a).await.unwrap(), Decision::Allowed);
    assert!(matches!(
        rate.check(&a).await.unwrap(),
        Decision::Refused { .. }
    ));
    for other in [
        ip("192.0.2.2"),
        ip("2001:db8:1:2::"),
        Key::Hashed(0x1234),
        Key::Global,
    ] {
        assert_eq!(
            rate.check(&other).await.unwrap(),
            Decision::Allowed,
            "{other}"
        );
    }
    // Another limit, and another cluster name, on the same Redis and key.
    let other_limit = instance(&redis, "ind", &limit("two", 1, Duration::from_secs(60), 0));
    assert_eq!(other_limit.check(&a).await.unwrap(), Decision::Allowed);
    let other_cluster = instance(&redis, "else", &one);
    assert_eq!(other_cluster.check(&a).await.unwrap(), Decision::Allowed);
    // The keys are named as documented.
    assert_eq!(rate.redis_key(a), "ind:rate:one:192.0.2.1");
    assert_eq!(
        rate.redis_key(ip("2001:db8:1:2::")),
        "ind:rate:one:2001:db8:1:2::/64"
    );
    let mut conn = raw(&redis).await;
    let exists: u32 = redis::cmd("EXISTS")
        .arg("ind:rate:one:192.0.2.1")
        .arg("ind:rate:two:192.0.2.1")
        .arg("else:rate:one:192.0.2.1")
        .arg("ind:rate:one:global")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 4);
}

#[tokio::test]
async fn an_idle_key_expires_once_refilled() {
    let redis = RedisServer::start();
    // 10/s, burst 2: three requests push the TAT 300 ms ahead.
    let rate = instance(&redis, "ttl", &limit("api", 10, Duration::from_secs(1), 2));
    let a = ip("192.0.2.1");
    for _ in 0..3 {
        assert_eq!(rate.check(&a).await.unwrap(), Decision::Allowed);
    }
    let key = rate.redis_key(a);
    let mut conn = raw(&redis).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 300, "PTTL {pttl} ms");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exists: u32 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{key} never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Gone means refilled: a full burst again.
    for _ in 0..3 {
        assert_eq!(rate.check(&a).await.unwrap(), Decision::Allowed);
    }
}

#[tokio::test]
async fn redis_killed_is_a_typed_error_within_the_timeout() {
    let mut redis = RedisServer::start();
    let rate = instance(&redis, "down", &limit("api", 10, Duration::from_secs(1), 0));
    let a = ip("192.0.2.1");
    assert_eq!(rate.check(&a).await.unwrap(), Decision::Allowed);
    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let e = rate.check(&a).await.unwrap_err();
        let took = started.elapsed();
        common::redis::assert_gone_within(&e, &redis, took, TIMEOUT);
    }
    // Back (empty): checks work again on a new connection.
    redis.restart();
    assert_eq!(rate.check(&a).await.unwrap(), Decision::Allowed);
}

/// The cost of one check on loopback: printed, never asserted (run with
/// `--nocapture` to see it).
#[tokio::test]
async fn cost_of_one_check_on_loopback() {
    let redis = RedisServer::start();
    let rate = instance(
        &redis,
        "cost",
        &limit("api", 1_000_000, Duration::from_secs(1), 0),
    );
    let a = ip("192.0.2.1");
    rate.check(&a).await.unwrap();
    const N: u32 = 2_000;
    let started = Instant::now();
    for _ in 0..N {
        rate.check(&a).await.unwrap();
    }
    let each = started.elapsed() / N;
    println!(
        "cluster rate check: {} µs per check (sequential, loopback, {N} checks)",
        each.as_micros()
    );
}
