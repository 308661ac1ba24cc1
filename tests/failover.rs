//! Passive failover: an idempotent request that cannot reach one backend is
//! retried once on another backend of the same pool, never on the other
//! color; a POST is not retried.

mod common;

use std::time::Duration;

use common::*;

/// Service `api` with two blue backends and one green, blue active, no
/// health checks (nothing is ever marked unhealthy).
fn two_blue(b1: &Upstream, b2: &Upstream, green: &Upstream) -> String {
    service("api", &[b1, b2], &[green], "blue") + &route(None, "/", "api")
}

/// Sends `n` GETs to `path` and checks every one is answered 200 by `label`.
fn all_served_by(proxy: &Proxy, path: &str, n: usize, label: &str) {
    let mut wrong = Vec::new();
    for i in 0..n {
        match try_get(&agent(), &format!("{}{path}", proxy.http_url()), None) {
            Ok((200, body)) if body == label => {}
            other => wrong.push(format!("#{i}: {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} GETs to {path} not answered 200 by {label}:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn get_is_retried_on_the_other_backend_when_one_refuses_connections() {
    let b1 = Upstream::start("blue1");
    let mut b2 = Upstream::start("blue2");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(two_blue(&b1, &b2, &green)).start();

    // Both in use (and holding kept-alive upstream connections).
    for _ in 0..10 {
        assert_eq!(proxy.get("/warm", None).0, 200);
    }
    assert!(b1.received("/warm") > 0 && b2.received("/warm") > 0);

    b2.stop();
    assert!(
        connection_refused(&b2.addr()),
        "stopped backend still accepts"
    );
    all_served_by(&proxy, "/while-down", 20, "blue1");
    assert_eq!(green.traffic(), 0, "retried on the other color");

    // Back on the same port: it gets traffic again.
    b2.restart();
    let mut n = 0;
    let back = poll_until(Duration::from_secs(10), || {
        n += 1;
        assert_eq!(proxy.get(&format!("/back-{n}"), None).0, 200);
        b2.received("/back-") > 0
    });
    assert!(back, "restarted backend got none of {n} requests");
}

#[test]
fn get_is_retried_when_a_backend_resets_connections() {
    let b1 = Upstream::start("blue1");
    let b2 = Upstream::start("blue2");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(two_blue(&b1, &b2, &green)).start();

    // Accepts and resets every new connection without answering. Kept-alive
    // connections opened before are unaffected, so this starts before any
    // traffic.
    b2.set_reset(true);
    all_served_by(&proxy, "/reset", 20, "blue1");
    assert_eq!(green.traffic(), 0, "retried on the other color");
}

#[test]
fn post_to_a_refusing_backend_is_not_retried() {
    let b1 = Upstream::start("blue1");
    let mut b2 = Upstream::start("blue2");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(two_blue(&b1, &b2, &green)).start();
    b2.stop();

    // Round-robin sends about half of these to the stopped backend.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = request(
            "POST",
            &format!("{}/post-{i}", proxy.http_url()),
            &[("Content-Type", "text/plain")],
            Some(b"payload"),
        );
        statuses.push(r.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || (500..600).contains(s)),
        "{statuses:?}"
    );
    assert!(
        ok < statuses.len(),
        "every POST succeeded, so the ones sent to the refusing backend were retried: {statuses:?}"
    );
    assert_eq!(
        b1.received("/post-"),
        ok,
        "blue1 got another number of POSTs than succeeded: {statuses:?}"
    );
    assert_eq!(green.traffic(), 0, "a POST went to the other color");
}

#[test]
fn failover_never_crosses_to_the_other_color() {
    let mut b1 = Upstream::start("blue1");
    let mut b2 = Upstream::start("blue2");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(two_blue(&b1, &b2, &green)).start();
    b1.stop();
    b2.stop();

    for i in 0..4 {
        let r = request("GET", &format!("{}/dead-{i}", proxy.http_url()), &[], None);
        assert!(
            (500..600).contains(&r.status),
            "GET with the whole pool refusing: {r:?}"
        );
    }
    assert_eq!(
        green.traffic(),
        0,
        "failed over to green: {:?}",
        green.seen()
    );
}
