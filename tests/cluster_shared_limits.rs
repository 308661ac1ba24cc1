//! Cluster limits at library level against a real `redis-server` on
//! loopback (issue 13 points 2 and 3): two "instances" are two `Link`s
//! (two connections, two runtimes) with their own limit objects on one
//! Redis. Token budgets and concurrency leases are never exceeded under
//! concurrency, a dead holder's slot comes back after the lease, header
//! keys hash alike on both, and with Redis killed every kind falls back to
//! this instance's share, counted, with the outage logged once.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use pingora::http::RequestHeader;
use switchyard::cluster::Link;
use switchyard::config::{self, Cluster, KeySource, Scope};
use switchyard::limits::concurrency::{Concurrency, Refused};
use switchyard::limits::key::Key;
use switchyard::limits::rate::RateLimit;
use switchyard::limits::tokens::TokenBudget;

/// Lease of the test clusters (1 s, the shortest allowed): a dead
/// holder's slot comes back quickly.
const LEASE: Duration = Duration::from_secs(1);

fn link(redis: &RedisServer, name: &str, instance: &str) -> Arc<Link> {
    let cluster = Cluster {
        instance: instance.into(),
        limit_timeout: Duration::from_millis(200),
        lease: LEASE,
        ..redis.cluster(name, Duration::from_millis(300))
    };
    Arc::new(Link::new(&cluster, None).unwrap())
}

fn budget_settings(tokens_per_minute: u64) -> config::TokenBudget {
    config::TokenBudget {
        name: "llm".into(),
        tokens_per_minute,
        key: KeySource::ClientIp,
        max_tokens: tokens_per_minute,
        default_max_tokens: 1,
        max_body: 1024,
        prompt_bytes_per_token: 1,
        media_tokens: 0,
        scope: Scope::Cluster,
    }
}

fn cap_settings(max: u32, per_key: u32, queue: u32) -> config::Concurrency {
    config::Concurrency {
        name: "gpu".into(),
        max_in_flight: max,
        per_key,
        key: KeySource::ClientIp,
        queue,
        queue_timeout: Duration::from_millis(500),
        scope: Scope::Cluster,
    }
}

fn rate_settings(rate: u32, burst: u32, key: KeySource) -> config::RateLimit {
    config::RateLimit {
        name: "api".into(),
        requests: rate,
        per: Duration::from_secs(60),
        burst,
        methods: None,
        key,
        scope: Scope::Cluster,
    }
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, n])
}

fn req(api_key: Option<&str>) -> RequestHeader {
    let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    if let Some(k) = api_key {
        r.insert_header("x-api-key", k).unwrap();
    }
    r
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Polls `f` every 20 ms until it holds, for up to `within`.
async fn eventually(within: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn two_instances_never_reserve_more_than_the_budget() {
    let redis = RedisServer::start();
    // 60 000 per minute (1 000 per second); each reservation 1 000 tokens.
    let settings = budget_settings(60_000);
    let instances: Vec<Arc<TokenBudget>> = ["a", "b"]
        .iter()
        .map(|i| {
            Arc::new(TokenBudget::with_link(
                &settings,
                Some(&link(&redis, "tok", i)),
            ))
        })
        .collect();
    const RUN: Duration = Duration::from_millis(800);
    const MAX_TRIES: usize = 5_000;
    let barrier = Arc::new(Barrier::new(2));
    let started = Instant::now();
    let threads: Vec<_> = instances
        .iter()
        .cloned()
        .map(|budget| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    // Connect first (another key), so both start together.
                    let warm = budget.reserve_for(Key::Ip(ip(99)), 1).await.unwrap();
                    drop(warm);
                    barrier.wait();
                    let (mut admitted, mut tries) = (0u64, 0usize);
                    let begin = Instant::now();
                    while begin.elapsed() < RUN && tries < MAX_TRIES {
                        tries += 1;
                        if let Ok(mut r) = budget.reserve_for(Key::Ip(ip(1)), 1_000).await {
                            // Sent, and no usage came back: spent whole.
                            r.mark_sent();
                            std::mem::forget(r);
                            admitted += 1;
                        }
                    }
                    (admitted, tries)
                })
            })
        })
        .collect();
    let results: Vec<(u64, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let admitted: u64 = results.iter().map(|r| r.0).sum();
    let tries: usize = results.iter().map(|r| r.1).sum();
    // The bucket (60 reservations) plus what refilled meanwhile.
    let bound = 60 + (elapsed.as_secs_f64()).ceil() as u64;
    println!(
        "two instances: {tries} tries, {admitted} reservations in {elapsed:?} (bound {bound})"
    );
    assert!(admitted <= bound, "{admitted} reservations > {bound}");
    assert!(admitted >= 60, "the whole bucket was usable: {admitted}");
    assert!(tries as u64 > 2 * bound, "too few tries to judge: {tries}");
    for (i, (a, _)) in results.iter().enumerate() {
        assert!(*a > 0, "instance {i} reserved nothing: {results:?}");
    }
    for b in &instances {
        assert_eq!(b.fallbacks(), 0);
    }
}

#[tokio::test]
async fn a_settlement_on_one_instance_is_seen_by_the_other() {
    let redis = RedisServer::start();
    let settings = budget_settings(6_000);
    let a = Arc::new(TokenBudget::with_link(
        &settings,
        Some(&link(&redis, "set", "a")),
    ));
    let b = Arc::new(TokenBudget::with_link(
        &settings,
        Some(&link(&redis, "set", "b")),
    ));
    let key = Key::Ip(ip(1));
    let mut r = a.reserve_for(key, 6_000).await.unwrap();
    assert!(r.standing().0 < 10, "{:?}", r.standing());
    let refused = b.reserve_for(key, 1_000).await.unwrap_err();
    // 1 000 tokens at 100 per second.
    assert!(
        refused.retry_after > Duration::from_secs(9)
            && refused.retry_after <= Duration::from_secs(10),
        "{refused:?}"
    );
    r.mark_sent();
    r.settle(1_000);
    // The 5 000 unused come back (settled in the background).
    eventually(Duration::from_secs(5), "refund seen by b", async || match b
        .reserve_for(key, 4_500)
        .await
    {
        Ok(r) => {
            std::mem::forget(r);
            true
        }
        Err(_) => false,
    })
    .await;
    // A response that used more than reserved puts the key in debt,
    // whichever instance settles it.
    let mut over = b.reserve_for(Key::Ip(ip(2)), 1_000).await.unwrap();
    over.mark_sent();
    over.settle(7_000);
    eventually(Duration::from_secs(5), "debt seen by a", async || {
        a.reserve_for(Key::Ip(ip(2)), 1).await.is_err()
    })
    .await;
    // The bucket key expires once it would be full: nothing is held for
    // ever, even for a reservation whose instance died before settling.
    let mut conn = raw(&redis).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg("set:tokens:llm:192.0.2.1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 60_001, "PTTL {pttl}");
}

#[test]
fn two_instances_never_hold_more_leases_than_the_cap() {
    let redis = RedisServer::start();
    let settings = cap_settings(3, 3, 0);
    let caps: Vec<Arc<Concurrency>> = ["a", "b"]
        .iter()
        .map(|i| {
            Arc::new(Concurrency::with_link(
                &settings,
                Some(&link(&redis, "cap", i)),
            ))
        })
        .collect();
    let url = redis.url();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = caps
        .iter()
        .cloned()
        .map(|cap| {
            let (barrier, url) = (barrier.clone(), url.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut conn = redis::Client::open(url)
                        .unwrap()
                        .get_multiplexed_async_connection()
                        .await
                        .unwrap();
                    barrier.wait();
                    let (mut most, mut refused) = (0usize, 0usize);
                    for round in 0..200u32 {
                        // Take up to two slots, look at the total, give back.
                        let mut held = Vec::new();
                        for n in 0..2u8 {
                            match cap.acquire(&req(None), ip(n + (round % 7) as u8)).await {
                                Ok(p) => held.push(p),
                                Err(Refused::QueueFull) => refused += 1,
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                        let total: usize = redis::cmd("ZCARD")
                            .arg("cap:cap:gpu")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        most = most.max(total);
                        drop(held);
                    }
                    (most, refused)
                })
            })
        })
        .collect();
    let results: Vec<(usize, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    println!("leases: {results:?}");
    for (most, _) in &results {
        assert!(*most <= 3, "{most} slots held at once > 3");
    }
    assert!(
        results.iter().any(|r| r.1 > 0),
        "the cap was never full: the test judged nothing"
    );
    for c in &caps {
        assert_eq!(c.fallbacks(), 0);
    }
}

#[tokio::test]
async fn a_dead_holders_slot_comes_back_after_the_lease_and_held_ones_are_renewed() {
    let redis = RedisServer::start();
    let settings = cap_settings(2, 2, 0);
    let a = Concurrency::with_link(&settings, Some(&link(&redis, "dead", "a")));
    let b = Concurrency::with_link(&settings, Some(&link(&redis, "dead", "b")));
    // `a` holds one slot past several leases: renewed, it stays taken.
    let held = a.acquire(&req(None), ip(1)).await.unwrap();
    assert_eq!(a.leases(), 1);
    // A dead instance's slot, as it left it: taken a moment ago, never to
    // be renewed or given back.
    let mut conn = raw(&redis).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let _: () = redis::cmd("ZADD")
        .arg("dead:cap:gpu")
        .arg(now_ms + LEASE.as_millis() as u64)
        .arg("crashed:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        b.acquire(&req(None), ip(2)).await.err(),
        Some(Refused::QueueFull),
        "the dead holder's slot still counts within its lease"
    );
    let started = Instant::now();
    let p = loop {
        match b.acquire(&req(None), ip(2)).await {
            Ok(p) => break p,
            Err(Refused::QueueFull) => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // `held` has lived through the dead slot's whole lease and more.
    tokio::time::sleep(LEASE).await;
    assert_eq!(
        b.acquire(&req(None), ip(3)).await.err(),
        Some(Refused::QueueFull),
        "a's renewed slot and b's fill the cap"
    );
    drop(held);
    eventually(Duration::from_secs(5), "a's slot given back", async || {
        b.acquire(&req(None), ip(3)).await.map(drop).is_ok()
    })
    .await;
    drop(p);
    assert_eq!((a.leases(), b.leases()), (0, 0));
}

#[tokio::test]
async fn a_waiter_gets_a_slot_freed_on_another_instance() {
    let redis = RedisServer::start();
    let settings = cap_settings(1, 1, 4);
    let a = Concurrency::with_link(&settings, Some(&link(&redis, "wait", "a")));
    let b = Concurrency::with_link(&settings, Some(&link(&redis, "wait", "b")));
    let held = a.acquire(&req(None), ip(1)).await.unwrap();
    let second = req(None);
    let waiting = b.acquire(&second, ip(2));
    let release = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(held);
    };
    let (got, ()) = tokio::join!(waiting, release);
    let p = got.expect("the freed slot went to the waiter");
    assert_eq!(
        b.stats().queued.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Nobody frees it now: the next waiter times out.
    assert_eq!(
        a.acquire(&req(None), ip(3)).await.err(),
        Some(Refused::Timeout)
    );
    drop(p);
}

#[tokio::test]
async fn header_keys_hash_alike_on_every_instance() {
    let redis = RedisServer::start();
    let settings = rate_settings(1, 0, KeySource::parse("header:x-api-key").unwrap());
    let la = link(&redis, "hash", "a");
    let a = RateLimit::with_link(&settings, Some(&la));
    let b = RateLimit::with_link(&settings, Some(&link(&redis, "hash", "b")));
    a.load_secret().await.unwrap();
    b.load_secret().await.unwrap();
    assert!(a.admit(&req(Some("sk-1")), ip(1)).await.is_ok());
    // The same API key from another address, on the other instance.
    assert!(b.admit(&req(Some("sk-1")), ip(2)).await.is_err());
    assert!(b.admit(&req(Some("sk-2")), ip(2)).await.is_ok());
    assert_eq!((a.fallbacks(), b.fallbacks()), (0, 0));
    // Redis holds the hash, never the value.
    let mut conn = raw(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("hash:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.iter().all(|k| !k.contains("sk-")), "{keys:?}");
    assert!(keys.contains(&"hash:limits:secret".to_string()), "{keys:?}");
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("hash:rate:api:hash:"))
            .count(),
        2
    );
    // An instance that has not read the secret yet judges locally (and
    // starts reading it).
    let c = RateLimit::with_link(&settings, Some(&la));
    assert!(c.admit(&req(Some("sk-1")), ip(3)).await.is_ok());
    assert_eq!(c.fallbacks(), 1);
    eventually(
        Duration::from_secs(5),
        "secret read in the background",
        async || {
            // Judged in Redis (not counted as a fallback) and refused there.
            let before = c.fallbacks();
            c.admit(&req(Some("sk-1")), ip(3)).await.is_err() && c.fallbacks() == before
        },
    )
    .await;
}

#[tokio::test]
async fn redis_killed_falls_back_to_the_share_counted_and_logged_once() {
    let mut redis = RedisServer::start();
    let l = link(&redis, "down", "a");
    // Two instances live: this one's share is half of everything.
    l.set_live_instances(2);
    let rate = RateLimit::with_link(&rate_settings(60, 3, KeySource::ClientIp), Some(&l));
    let budget = Arc::new(TokenBudget::with_link(&budget_settings(6_000), Some(&l)));
    let cap = Concurrency::with_link(&cap_settings(4, 4, 0), Some(&l));
    // Shared while Redis is up.
    assert!(rate.admit(&req(None), ip(9)).await.is_ok());
    assert!(l.is_up());
    redis.kill();

    // Rate: 60/min burst 3 (4 at once) becomes 30/min burst 1 (2 at once).
    let admitted = {
        let mut n = 0;
        for _ in 0..10 {
            if rate.admit(&req(None), ip(1)).await.is_ok() {
                n += 1;
            }
        }
        n
    };
    assert_eq!(admitted, 2, "the share of the burst");
    assert!(!l.is_up());
    assert_eq!(rate.fallbacks(), 10);
    // Budget: 3 000 of the 6 000.
    let r = budget.reserve_for(Key::Ip(ip(1)), 3_000).await.unwrap();
    assert!(budget.reserve_for(Key::Ip(ip(1)), 1).await.is_err());
    drop(r);
    assert_eq!(budget.fallbacks(), 2);
    // Concurrency: 2 of the 4 slots.
    let p1 = cap.acquire(&req(None), ip(1)).await.unwrap();
    let p2 = cap.acquire(&req(None), ip(2)).await.unwrap();
    assert_eq!(
        cap.acquire(&req(None), ip(3)).await.err(),
        Some(Refused::QueueFull)
    );
    assert_eq!(cap.fallbacks(), 3);
    assert_eq!(cap.leases(), 0);
    assert_eq!(cap.snapshot(0).max_in_flight, 2, "the share is shown");
    drop((p1, p2));
    // However many requests, one outage.
    assert_eq!(l.outages(), 1);

    // Back: a probe (at most one per second per limit) finds it, and the
    // limits are shared again.
    redis.restart();
    eventually(Duration::from_secs(5), "redis seen back", async || {
        let _ = rate.admit(&req(None), ip(7)).await;
        l.is_up()
    })
    .await;
    let before = cap.fallbacks();
    let p = cap.acquire(&req(None), ip(1)).await.unwrap();
    assert_eq!((cap.leases(), cap.fallbacks()), (1, before));
    assert_eq!(cap.snapshot(0).max_in_flight, 4, "the whole cap again");
    drop(p);
    assert_eq!(l.outages(), 1);
}
