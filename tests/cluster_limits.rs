//! Cluster limits end to end (issue 13 points 2, 3 and 5): three real
//! switchyard instances, each with its own state dir and a `[cluster]`
//! section on one real `redis-server`, real upstreams (the fake OpenAI
//! backend for tokens) and real clients spread over all three.
//!
//! - a cluster rate limit and a cluster token budget are never exceeded in
//!   total, where three local ones would admit three times as much;
//! - Redis killed mid-traffic: no request fails apart from the limits' own
//!   429s, every instance falls back (counted) and logs the outage once;
//! - an instance killed with -9 while holding cluster concurrency slots:
//!   the slots come back after the lease.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::openai::{chat, FakeOpenAi};
use common::redis::RedisServer;
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// The outage line of `Link::mark_down`.
const OUTAGE: &str = "redis unreachable";

/// The `[cluster]` section of instance `n`: a 2 s lease, so a dead
/// instance's slots come back quickly.
fn cluster(redis: &RedisServer, n: usize) -> String {
    format!(
        "\n[cluster]\nredis = {}\nname = \"e2e\"\ninstance = \"edge-{n}\"\nlease = \"2s\"\n\
         limit_timeout = \"100ms\"\ntimeout = \"300ms\"\n",
        toml_str(&redis.url())
    )
}

/// Three instances on `redis`, each with `body` (services, limits, routes).
fn three(redis: &RedisServer, body: &str) -> Vec<Proxy> {
    (1..=3)
        .map(|n| {
            ProxyBuilder::new(format!("{body}{}", cluster(redis, n)))
                .metrics()
                .start()
        })
        .collect()
}

fn fallbacks(proxy: &Proxy, kind: &str, limit: &str) -> f64 {
    proxy
        .metric(&format!(
            "switchyard_cluster_limit_fallbacks_total{{kind=\"{kind}\",limit=\"{limit}\"}}"
        ))
        .unwrap_or_else(|| panic!("no fallback series for {kind}/{limit}"))
}

#[test]
fn a_rate_limit_and_a_token_budget_hold_across_three_instances() {
    let redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let fake = FakeOpenAi::start();
    let mut body = service("api", &[&blue], &[&green], "blue");
    body.push_str(&fake.service("ai"));
    // 20 per minute, 10 at once; 10 000 tokens per minute: both global.
    body.push_str(
        "[rate_limits.api]\nrate = \"20/m\"\nburst = 9\nkey = \"global\"\nscope = \"cluster\"\n\n\
         [token_budgets.ai]\ntokens_per_minute = 10000\nkey = \"global\"\nmax_tokens = 2048\n\
         scope = \"cluster\"\n\n",
    );
    body.push_str(&route_with("/api/", "api", "rate_limit = \"api\""));
    body.push_str(&route_with("/v1/", "ai", "token_budget = \"ai\""));
    let proxies = three(&redis, &body);

    // Rate: 60 requests, round robin over the three.
    let started = Instant::now();
    let statuses: Vec<u16> = (0..60)
        .map(|i| {
            request(
                "GET",
                &format!("{}/api/x", proxies[i % 3].http_url()),
                &[],
                None,
            )
            .status
        })
        .collect();
    let elapsed = started.elapsed();
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    // The burst, plus one per 3 s that passed.
    let bound = 10 + elapsed.as_secs() / 3 + 1;
    assert!(ok <= bound, "{ok} admitted > {bound}: {statuses:?}");
    assert!(ok >= 10, "the burst was admitted: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    // Every instance saw refusals: the limit is the cluster's, not its own.
    for p in &proxies[..3] {
        assert!(
            p.metric("switchyard_limit_refusals_total{kind=\"rate_limit\",limit=\"api\",reason=\"rate\"}")
                .unwrap_or(0.0)
                > 0.0
        );
        assert_eq!(fallbacks(p, "rate_limit", "api"), 0.0);
    }

    // Tokens: 30 completions of ~1 080 tokens each at once, spread over
    // the three, all held at the backend: 9 fit in 10 000.
    let one = chat(json!({"max_tokens": 1000}));
    let reserve = one.len() as u64 + 1000;
    let fits = (10_000 / reserve) as usize;
    assert_eq!(fits, 9, "body of {} bytes", one.len());
    fake.hold();
    let started = Instant::now();
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let url = format!("{}/v1/chat/completions", proxies[i % 3].http_url());
            let body = one.clone();
            thread::spawn(move || {
                request(
                    "POST",
                    &url,
                    &[("content-type", "application/json")],
                    Some(&body),
                )
            })
        })
        .collect();
    // The refused ones are answered while the admitted ones are held.
    let refused_now = || -> u64 {
        proxies
            .iter()
            .map(|p| {
                p.metric("switchyard_limit_refusals_total{kind=\"token_budget\",limit=\"ai\",reason=\"exhausted\"}")
                    .unwrap_or(0.0) as u64
            })
            .sum()
    };
    assert!(
        poll_until(WAIT, || refused_now() + fake.waiting() as u64 == 30),
        "refused {} waiting {}",
        refused_now(),
        fake.waiting()
    );
    // What refilled meanwhile (166 tokens a second) may admit one more.
    let refill =
        (started.elapsed().as_secs_f64() * 10_000.0 / 60.0 / reserve as f64).ceil() as usize;
    let admitted = fake.waiting();
    assert!(
        admitted >= fits && admitted <= fits + refill,
        "{admitted} admitted, {fits} fit (+{refill} refilled)"
    );
    fake.release_all();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(replies.iter().filter(|r| r.status == 200).count(), admitted);
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    for p in &proxies {
        assert_eq!(fallbacks(p, "token_budget", "ai"), 0.0);
    }
}

#[test]
fn redis_killed_mid_traffic_falls_back_and_fails_no_request() {
    let mut redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let fake = FakeOpenAi::start();
    let mut body = service("api", &[&blue], &[&green], "blue");
    body.push_str(&fake.service("ai"));
    body.push_str(
        "[rate_limits.api]\nrate = \"600/m\"\nburst = 20\nscope = \"cluster\"\n\n\
         [token_budgets.ai]\ntokens_per_minute = 100000\nscope = \"cluster\"\n\n",
    );
    body.push_str(&route_with("/api/", "api", "rate_limit = \"api\""));
    body.push_str(&route_with("/v1/", "ai", "token_budget = \"ai\""));
    let proxies = three(&redis, &body);
    let completion = chat(json!({"max_tokens": 20}));

    // Three clients, one per instance, 90 requests each (rate and tokens
    // alternating); Redis is killed a third of the way through.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let clients: Vec<_> = proxies
        .iter()
        .map(|p| {
            let (api, ai) = (
                format!("{}/api/x", p.http_url()),
                format!("{}/v1/chat/completions", p.http_url()),
            );
            let (body, tx) = (completion.clone(), tx.clone());
            thread::spawn(move || {
                let mut seen = Vec::new();
                for i in 0..90 {
                    if i == 30 {
                        let _ = tx.send(());
                    }
                    let reply = if i % 2 == 0 {
                        try_request("GET", &api, &[], None)
                    } else {
                        try_request(
                            "POST",
                            &ai,
                            &[("content-type", "application/json")],
                            Some(&body),
                        )
                    };
                    seen.push(reply.map(|r| r.status).map_err(|e| e.to_string()));
                }
                seen
            })
        })
        .collect();
    drop(tx);
    // The first client a third of the way through: kill Redis.
    rx.recv().unwrap();
    redis.kill();
    let results: Vec<Vec<Result<u16, String>>> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (n, seen) in results.iter().enumerate() {
        let bad: Vec<_> = seen
            .iter()
            .filter(|r| !matches!(r, Ok(200) | Ok(429)))
            .collect();
        assert!(bad.is_empty(), "instance {n}: failed requests {bad:?}");
        assert!(
            seen.iter().filter(|r| matches!(r, Ok(200))).count() > 30,
            "instance {n} kept serving: {seen:?}"
        );
    }
    for (n, p) in proxies.iter().enumerate() {
        assert!(fallbacks(p, "rate_limit", "api") > 0.0, "instance {n}");
        assert!(fallbacks(p, "token_budget", "ai") > 0.0, "instance {n}");
        // Logged once, however many requests fell back.
        let lines = p.stderr_text().matches(OUTAGE).count();
        assert_eq!(lines, 1, "instance {n}: {lines} outage lines");
    }
    // Redis back: the limits find it (a probe per second) and stop
    // falling back.
    redis.restart();
    for p in &proxies {
        let api = format!("{}/api/x", p.http_url());
        assert!(poll_until(WAIT, || {
            let before = fallbacks(p, "rate_limit", "api");
            request("GET", &api, &[], None);
            fallbacks(p, "rate_limit", "api") == before
        }));
        assert!(p.stderr_text().contains("redis reachable again"));
    }
}

#[test]
fn an_instance_killed_while_holding_cluster_slots_frees_them_after_the_lease() {
    let redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let mut body = service("api", &[&blue], &[&green], "blue");
    body.push_str(
        "[concurrency.gpu]\nmax_in_flight = 2\nkey = \"global\"\nscope = \"cluster\"\n\n",
    );
    body.push_str(&route_with("/gpu/", "api", "concurrency = \"gpu\""));
    let mut proxies = three(&redis, &body);

    // Instance 1 holds both slots with two requests the backend holds.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{}/gpu/slow?hold=1", proxies[0].http_url());
            thread::spawn(move || try_request("GET", &url, &[], None))
        })
        .collect();
    assert!(poll_until(WAIT, || blue.in_flight_for("/gpu/slow") == 2));
    // The others find the cap full: 503 at once (no queue).
    for p in &proxies[1..] {
        let r = request("GET", &format!("{}/gpu/x", p.http_url()), &[], None);
        assert_eq!(r.status, 503, "{}", r.body);
    }
    // Killed with -9: it gives nothing back.
    let dead = proxies.remove(0);
    drop(dead);
    for h in held {
        assert!(
            h.join().unwrap().is_err(),
            "the client's connection died with it"
        );
    }
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let slots: usize = ::redis::cmd("ZCARD")
        .arg("e2e:cap:gpu")
        .query(&mut conn)
        .unwrap();
    assert_eq!(slots, 2, "the dead instance's slots are still taken");
    // After the lease (2 s) they are free again for the others.
    let url = format!("{}/gpu/x", proxies[0].http_url());
    assert!(
        poll_until(WAIT, || request("GET", &url, &[], None).status == 200),
        "the slots never came back"
    );
    blue.release(2);
    // A slot is given back by a script run after the response is sent, so
    // the poll's own slot may be held a moment longer: poll again.
    let url = format!("{}/gpu/x", proxies[1].http_url());
    assert!(poll_until(WAIT, || request("GET", &url, &[], None).status == 200));
    for p in &proxies {
        assert_eq!(fallbacks(p, "concurrency", "gpu"), 0.0);
    }
}

#[test]
fn check_refuses_a_cluster_scope_without_a_cluster_section_at_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start("blue");
    let mut text = format!(
        "[listen]\nhttp = \"127.0.0.1:{}\"\n\n{}",
        free_port(),
        service("api", &[&upstream], &[&upstream], "blue")
    );
    text.push_str("[rate_limits.api]\nrate = \"1/s\"\nscope = \"cluster\"\n");
    text.push_str(&route_with("/api/", "api", "rate_limit = \"api\""));
    let line = text
        .lines()
        .position(|l| l == "scope = \"cluster\"")
        .unwrap()
        + 1;
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, &text).unwrap();
    let out = run_check(&path, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let at = format!("{}:{line}:9:", path.display());
    assert!(
        stderr.contains(&at) && stderr.contains("needs a [cluster] section"),
        "expected {at} in {stderr}"
    );
    // With `[cluster]` (never contacted by check) the same file is valid;
    // `scope = "local"` needs none.
    let with_cluster = format!("{text}\n[cluster]\nredis = \"redis://127.0.0.1:1/0\"\n");
    std::fs::write(&path, with_cluster).unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    std::fs::write(&path, text.replace("\"cluster\"", "\"local\"")).unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// With Redis gone, a cluster cap of 6 over three live instances becomes
/// a local cap of 2 on each: the share, not the whole.
#[test]
fn with_redis_down_a_cluster_cap_is_this_instances_share() {
    let mut redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let mut body = service("api", &[&blue], &[&green], "blue");
    body.push_str(
        "[concurrency.gpu]\nmax_in_flight = 6\nkey = \"global\"\nscope = \"cluster\"\n\n",
    );
    body.push_str(&route_with("/gpu/", "api", "concurrency = \"gpu\""));
    let proxies = three(&redis, &body);
    assert!(
        poll_until(WAIT, || proxies.iter().all(|p| {
            p.status()["cluster"]["instances"].as_array().map(Vec::len) == Some(3)
        })),
        "three live instances"
    );
    redis.kill();
    assert!(
        poll_until(WAIT, || proxies
            .iter()
            .all(|p| p.status()["cluster"]["reachable"] == false)),
        "every instance sees redis gone"
    );
    // Four slow requests at instance 1: its share (6 / 3 = 2) goes through,
    // the others are refused at once (no queue).
    let url = format!("{}/gpu/slow?hold=1", proxies[0].http_url());
    let held: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || try_request("GET", &url, &[], None))
        })
        .collect();
    assert!(poll_until(WAIT, || blue.in_flight_for("/gpu/slow") == 2));
    let refused = poll_until(WAIT, || {
        held.iter().filter(|h| h.is_finished()).count() == 2
    });
    assert!(refused, "two of the four refused at once");
    assert_eq!(blue.in_flight_for("/gpu/slow"), 2, "the share, not 6");
    blue.release(2);
    let codes: Vec<u16> = held
        .into_iter()
        .map(|h| h.join().unwrap().map(|r| r.status).unwrap_or(0))
        .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 2, "{codes:?}");
    assert!(fallbacks(&proxies[0], "concurrency", "gpu") >= 4.0);
}
