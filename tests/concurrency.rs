//! Concurrency caps (`[concurrency.NAME]`, a route's `concurrency`): a full
//! queue and a wait past `queue_timeout` get 503 with `Retry-After`, one key
//! cannot hold every slot, waiters are served in order without one key
//! blocking the others, a slot comes back on every way a request can end,
//! and a queued request whose client leaves gives its place up at once.
//!
//! A request is seen queued by the proxy's debug log line; clients are told
//! apart by `X-Forwarded-For` from a trusted loopback peer, or by an API key.

mod common;

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::*;

const QUEUED: &str = "request queued for a concurrency slot";
const CLIENT_GONE: &str = "client went away while its request waited";
const WAIT: Duration = Duration::from_secs(10);

/// Service `api` on `blue` with `/gpu` (and `/gpu2`, same cap) under the
/// cap `[concurrency.gpu]` written as `cap`, `/free` without a cap, plus
/// `extra` (more tables or routes). Loopback is a trusted proxy.
fn start(blue: &Upstream, green: &Upstream, cap: &str, extra: &str) -> Proxy {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str(&format!("[concurrency.gpu]\n{}\n\n", cap.trim()));
    s.push_str(extra);
    s.push_str(&route_with("/gpu/", "api", "concurrency = \"gpu\""));
    s.push_str(&route_with("/gpu2/", "api", "concurrency = \"gpu\""));
    s.push_str(&route(None, "/free", "api"));
    ProxyBuilder::new(s)
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .log_filter("info,switchyard::limits::concurrency=debug")
        .start()
}

fn queued(proxy: &Proxy) -> usize {
    proxy.stderr_text().matches(QUEUED).count()
}

/// `GET url+path` with `headers` on a thread of its own.
fn spawn_get(url: &str, path: &str, headers: &[(&str, &str)]) -> JoinHandle<Reply> {
    let url = format!("{url}{path}");
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    thread::spawn(move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        request("GET", &url, &h, None)
    })
}

/// Starts `GET path` and waits until the proxy has queued it (the
/// `n`-th queued request since start).
fn spawn_queued(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> JoinHandle<Reply> {
    let h = spawn_get(&proxy.http_url(), path, headers);
    assert!(
        poll_until(WAIT, || queued(proxy) >= n),
        "{path} was not queued (queued so far: {})",
        queued(proxy)
    );
    h
}

fn get(proxy: &Proxy, path: &str) -> Reply {
    request("GET", &format!("{}{path}", proxy.http_url()), &[], None)
}

/// Polls until a new request on the cap gets a slot (200): fails when the
/// slot of an ended request was never given back.
fn assert_slot_free(proxy: &Proxy, after: &str) {
    let mut last = None;
    let ok = poll_until(WAIT, || {
        let r = get(proxy, "/gpu/probe");
        let ok = r.status == 200;
        last = Some(r);
        ok
    });
    assert!(ok, "slot not given back after {after}: {last:?}");
}

fn assert_busy(r: &Reply, retry_after: &str) {
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some(retry_after), "{r:?}");
    assert!(r.header("x-request-id").is_some(), "{r:?}");
}

#[test]
fn a_full_queue_is_refused_at_once_and_a_long_wait_times_out() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 1\nqueue = 1\nqueue_timeout = \"2s\"",
        "",
    );
    let url = proxy.http_url();
    let holder = spawn_get(&url, "/gpu/hold?hold=1", &[]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let waiter = spawn_queued(&proxy, "/gpu/waiter", &[], 1);

    // The queue's one place is taken: refused at once, as JSON when asked.
    let r = request(
        "GET",
        &format!("{url}/gpu2/full"),
        &[("Accept", "application/json")],
        None,
    );
    assert_busy(&r, "2");
    assert_eq!(
        r.json()["error"],
        "too many requests in flight, try again later"
    );
    assert_eq!(queued(&proxy), 1, "the refused request never queued");

    // The waiter gives up after queue_timeout, never reaching the backend.
    let r = waiter.join().unwrap();
    assert_busy(&r, "2");
    assert_eq!(blue.received("/gpu/waiter"), 0);
    assert_eq!(blue.received("/gpu2/full"), 0);

    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);
    assert_slot_free(&proxy, "success");
}

#[test]
fn routes_without_a_cap_are_untouched_while_the_cap_is_full() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(&blue, &green, "max_in_flight = 1", "");
    let holder = spawn_get(&proxy.http_url(), "/gpu/hold?hold=1", &[]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    assert_busy(&get(&proxy, "/gpu/x"), "5");
    for i in 0..5 {
        let r = get(&proxy, &format!("/free/{i}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("retry-after").is_none());
    }
    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);
    assert_eq!(queued(&proxy), 0);
}

#[test]
fn one_api_key_cannot_hold_every_slot_nor_block_other_keys() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 3\nper_key = 1\nkey = \"header:X-Api-Key\"\nqueue = 10\nqueue_timeout = \"20s\"",
        "",
    );
    let url = proxy.http_url();
    let k1 = [("X-Api-Key", "key-1")];
    let a1 = spawn_get(&url, "/gpu/a1?hold=1", &k1);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    // key-1 is at its share: its second request waits although slots are free...
    let a2 = spawn_queued(&proxy, "/gpu/a2?hold=1", &k1, 1);
    // ...and key-2, behind it in the queue, goes straight through.
    let b1 = spawn_get(&url, "/gpu/b1?hold=1", &[("X-Api-Key", "key-2")]);
    assert!(poll_until(WAIT, || blue.in_flight() == 2));
    assert_eq!(blue.received("/gpu/b1"), 1);
    assert_eq!(blue.received("/gpu/a2"), 0, "key-1 holds one slot at most");
    assert_eq!(queued(&proxy), 1);

    // a1 ends (the gate lets the oldest through): a2 gets key-1's slot.
    blue.release(1);
    assert_eq!(a1.join().unwrap().status, 200);
    assert!(poll_until(WAIT, || blue.received("/gpu/a2") == 1));
    blue.release(2);
    assert_eq!(b1.join().unwrap().status, 200);
    assert_eq!(a2.join().unwrap().status, 200);
    assert_slot_free(&proxy, "per-key requests");
}

#[test]
fn a_waiter_whose_key_is_full_does_not_hold_up_the_waiters_behind_it() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // A second backend under the same cap, so one request can be ended alone.
    let other = Upstream::start("other");
    let extra = format!(
        "{}{}",
        service("other", &[&other], &[&other], "blue"),
        route_with("/other/", "other", "concurrency = \"gpu\"")
    );
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 2\nper_key = 1\nkey = \"header:X-Api-Key\"\nqueue = 10\nqueue_timeout = \"20s\"",
        &extra,
    );
    let url = proxy.http_url();
    let a1 = spawn_get(&url, "/gpu/a1?hold=1", &[("X-Api-Key", "a")]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let b1 = spawn_get(&url, "/other/b1?hold=1", &[("X-Api-Key", "b")]);
    assert!(poll_until(WAIT, || other.in_flight() == 1));
    // Every slot taken; queue: a2 (key a, at its share), then c1.
    let a2 = spawn_queued(&proxy, "/gpu/a2?hold=1", &[("X-Api-Key", "a")], 1);
    let c1 = spawn_queued(&proxy, "/gpu/c1?hold=1", &[("X-Api-Key", "c")], 2);
    // b1 ends: a2 cannot take the slot (a holds one), so c1 gets it.
    other.release(1);
    assert_eq!(b1.join().unwrap().status, 200);
    assert!(
        poll_until(WAIT, || blue.received("/gpu/c1") == 1),
        "c1 waits behind a2"
    );
    assert_eq!(blue.received("/gpu/a2"), 0);
    // a1 ends: a2 runs.
    blue.release(1);
    assert_eq!(a1.join().unwrap().status, 200);
    assert!(poll_until(WAIT, || blue.received("/gpu/a2") == 1));
    blue.release(2);
    assert_eq!(c1.join().unwrap().status, 200);
    assert_eq!(a2.join().unwrap().status, 200);
}

#[test]
fn one_client_address_cannot_hold_every_slot() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 2\nper_key = 1\nqueue = 5\nqueue_timeout = \"20s\"",
        "",
    );
    let url = proxy.http_url();
    let a = [("X-Forwarded-For", "203.0.113.1")];
    let a1 = spawn_get(&url, "/gpu/a1?hold=1", &a);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let a2 = spawn_queued(&proxy, "/gpu/a2?hold=1", &a, 1);
    let b1 = spawn_get(
        &url,
        "/gpu/b1?hold=1",
        &[("X-Forwarded-For", "203.0.113.2")],
    );
    assert!(poll_until(WAIT, || blue.received("/gpu/b1") == 1));
    assert_eq!(blue.received("/gpu/a2"), 0);
    blue.release(1);
    assert_eq!(a1.join().unwrap().status, 200);
    assert!(poll_until(WAIT, || blue.received("/gpu/a2") == 1));
    blue.release(2);
    assert_eq!(b1.join().unwrap().status, 200);
    assert_eq!(a2.join().unwrap().status, 200);
}

#[test]
fn waiters_get_slots_in_arrival_order() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 1\nqueue = 10\nqueue_timeout = \"20s\"",
        "",
    );
    let holder = spawn_get(&proxy.http_url(), "/gpu/w0?hold=1", &[]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let mut waiters = Vec::new();
    for i in 1..=4 {
        waiters.push(spawn_queued(&proxy, &format!("/gpu/w{i}?hold=1"), &[], i));
    }
    for i in 1..=4 {
        blue.release(1);
        assert!(
            poll_until(WAIT, || blue.received(&format!("/gpu/w{i}")) == 1),
            "w{i} next"
        );
        for later in i + 1..=4 {
            assert_eq!(
                blue.received(&format!("/gpu/w{later}")),
                0,
                "w{later} before w{i}"
            );
        }
    }
    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);
    for w in waiters {
        assert_eq!(w.join().unwrap().status, 200);
    }
}

#[test]
fn a_slot_comes_back_after_an_upstream_error_or_reset() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dead = free_port();
    // A backend that resets every connection it accepts, unanswered.
    let flaky = Upstream::start("flaky");
    flaky.set_reset(true);
    let extra = format!(
        "[services.down]\nblue = [\"127.0.0.1:{dead}\"]\ngreen = [\"127.0.0.1:{dead}\"]\nactive = \"blue\"\n\n{}{}{}",
        service("flaky", &[&flaky], &[&flaky], "blue"),
        route_with("/down/", "down", "concurrency = \"gpu\""),
        route_with("/flaky/", "flaky", "concurrency = \"gpu\""),
    );
    let proxy = start(&blue, &green, "max_in_flight = 1", &extra);

    // Nothing listens: 502, and the slot is free again.
    let r = get(&proxy, "/down/x");
    assert_eq!(r.status, 502, "{r:?}");
    assert_slot_free(&proxy, "an upstream connect error");

    // The backend resets the connection unanswered (POST: not retried).
    let r = request(
        "POST",
        &format!("{}/flaky/x", proxy.http_url()),
        &[],
        Some(b"x"),
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert_slot_free(&proxy, "an upstream reset");
}

#[test]
fn a_slot_comes_back_after_an_upstream_timeout() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let extra = route_with(
        "/slow/",
        "api",
        "concurrency = \"gpu\"\nread_timeout = \"300ms\"",
    );
    let proxy = start(&blue, &green, "max_in_flight = 1", &extra);
    let r = get(&proxy, "/slow/x?delay_ms=3000");
    assert_eq!(r.status, 504, "{r:?}");
    assert_slot_free(&proxy, "an upstream timeout");
}

#[test]
fn a_slot_comes_back_when_the_client_leaves_mid_stream() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(&blue, &green, "max_in_flight = 1", "");
    let mut c = RawConn::connect(&proxy.http_addr());
    c.send(b"GET /gpu/events?sse=600&gap_ms=50 HTTP/1.1\r\nHost: s.test\r\n\r\n")
        .unwrap();
    let head = c.read_head(WAIT).unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    assert!(matches!(
        c.read_body_part(std::time::Instant::now() + WAIT),
        Ok(BodyPart::Data(_))
    ));
    // While the stream runs, the one slot is taken.
    assert_busy(&get(&proxy, "/gpu/during"), "5");
    drop(c);
    assert_slot_free(&proxy, "the client left mid-stream");
}

#[test]
fn a_websocket_holds_its_slot_until_it_ends() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let extra = route_with("/ws/", "api", "concurrency = \"gpu\"\nwebsocket = true");
    let proxy = start(&blue, &green, "max_in_flight = 1", &extra);
    let mut ws = ws_connect(&proxy.http_addr(), "/ws/chat")
        .unwrap_or_else(|(code, e)| panic!("handshake: {code} {e}"));
    assert_eq!(ws_echo(&mut ws, "hi").unwrap(), "blue:hi");
    // Upgraded, still open: the slot is still held.
    assert_busy(&get(&proxy, "/gpu/during"), "5");
    assert_eq!(ws_echo(&mut ws, "still").unwrap(), "blue:still");
    ws_close(ws);
    assert_slot_free(&proxy, "the WebSocket ended");
}

#[test]
fn a_queued_request_whose_client_leaves_gives_its_place_up() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 1\nqueue = 1\nqueue_timeout = \"30s\"",
        "",
    );
    let holder = spawn_get(&proxy.http_url(), "/gpu/hold?hold=1", &[]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let mut gone = RawConn::connect(&proxy.http_addr());
    gone.send(b"GET /gpu/gone HTTP/1.1\r\nHost: s.test\r\n\r\n")
        .unwrap();
    assert!(poll_until(WAIT, || queued(&proxy) == 1));
    drop(gone);
    assert!(
        poll_until(WAIT, || proxy.stderr_text().contains(CLIENT_GONE)),
        "the proxy did not see the queued client leave"
    );
    // Its place is free at once (long before the 30 s timeout): the next
    // request queues instead of being refused, and gets the slot.
    let next = spawn_queued(&proxy, "/gpu/next", &[], 2);
    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);
    assert_eq!(next.join().unwrap().status, 200);
    assert_eq!(blue.received("/gpu/gone"), 0, "the gone request never ran");
}

/// HTTP/2 streams are watched whatever they carry: a queued POST whose
/// body is still coming leaves the queue when the client resets its stream.
#[test]
fn a_queued_http2_stream_reset_by_its_client_gives_its_place_up() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::ServerName;

    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // A test CA and a leaf for h2.test, written as PEM files.
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["h2.test".to_string()])
        .unwrap()
        .signed_by(&key, &*ca)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("h2.pem"), dir.path().join("h2.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\n[[tls.certificates]]\nname = \"h2\"\ncert = {}\nkey = {}\n",
        toml_str(cert_path.to_str().unwrap()),
        toml_str(key_path.to_str().unwrap())
    );
    let mut s = service("api", &[&blue], &[&green], "blue");
    s.push_str("[concurrency.gpu]\nmax_in_flight = 1\nqueue = 1\nqueue_timeout = \"30s\"\n\n");
    s.push_str(&route_with("/gpu/", "api", "concurrency = \"gpu\""));
    let proxy = ProxyBuilder::new(s)
        .https(&tls)
        .log_filter("info,switchyard::limits::concurrency=debug")
        .start();

    let holder = spawn_get(&proxy.http_url(), "/gpu/hold?hold=1", &[]);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let addr = proxy.https_addr();
    let (mut body, _response) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("h2.test").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.expect("h2 ready");
        let req = http::Request::post("https://h2.test/gpu/h2")
            .header("content-length", "10")
            .body(())
            .unwrap();
        let (response, mut body) = send.send_request(req, false).expect("h2 request");
        body.send_data(bytes::Bytes::from_static(b"part"), false)
            .unwrap();
        (body, response)
    });
    assert!(
        poll_until(WAIT, || queued(&proxy) == 1),
        "the h2 request was not queued"
    );
    body.send_reset(h2::Reason::CANCEL);
    assert!(
        poll_until(WAIT, || proxy.stderr_text().contains(CLIENT_GONE)),
        "the proxy did not see the stream reset"
    );
    let next = spawn_queued(&proxy, "/gpu/next", &[], 2);
    blue.release(1);
    assert_eq!(holder.join().unwrap().status, 200);
    assert_eq!(next.join().unwrap().status, 200);
    assert_eq!(blue.received("/gpu/h2"), 0);
    drop(rt);
}

#[test]
fn the_admin_api_shows_slots_queue_and_top_keys_hashed() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = start(
        &blue,
        &green,
        "max_in_flight = 2\nper_key = 1\nkey = \"header:X-Api-Key\"\nqueue = 4\nqueue_timeout = \"20s\"",
        "[rate_limits.ai]\nrate = \"100/s\"\n\n",
    );
    let url = proxy.http_url();
    let k1 = [("X-Api-Key", "sk-very-secret-1")];
    let a1 = spawn_get(&url, "/gpu/a1?hold=1", &k1);
    assert!(poll_until(WAIT, || blue.in_flight() == 1));
    let a2 = spawn_queued(&proxy, "/gpu/a2?hold=1", &k1, 1);

    let (code, v) = proxy.admin("GET", "/limits", None);
    assert_eq!(code, 200, "{v}");
    let gpu = &v["concurrency"]["gpu"];
    assert_eq!(
        (
            gpu["max_in_flight"].as_u64(),
            gpu["per_key"].as_u64(),
            gpu["queue"].as_u64()
        ),
        (Some(2), Some(1), Some(4)),
        "{v}"
    );
    assert_eq!(
        (gpu["in_flight"].as_u64(), gpu["queue_depth"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    let top = &gpu["top_keys"][0];
    assert!(top["key"].as_str().unwrap().starts_with("hash:"), "{v}");
    assert_eq!(
        (top["in_flight"].as_u64(), top["queued"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert!(
        !v.to_string().contains("very-secret"),
        "the key itself never shows: {v}"
    );
    assert_eq!(v["rate_limits"]["ai"]["keys"], 0, "{v}");

    let out = run_ctl(&proxy.admin_url(), Some(proxy.token()), &["limits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("concurrency gpu: 1/2 in flight, 1/4 queued, 1 keys"),
        "{text}"
    );
    assert!(!text.contains("very-secret"), "{text}");

    blue.release(2);
    assert_eq!(a1.join().unwrap().status, 200);
    assert_eq!(a2.join().unwrap().status, 200);
    assert_slot_free(&proxy, "the listed requests");
    // A slot is given back just after its answer is sent: poll.
    let mut v = serde_json::Value::Null;
    let forgotten = poll_until(WAIT, || {
        v = proxy.admin("GET", "/limits", None).1;
        v["concurrency"]["gpu"]["keys"] == 0
    });
    assert!(forgotten, "keys are forgotten when idle: {v}");
    assert_eq!(v["concurrency"]["gpu"]["admitted"].as_u64(), Some(3), "{v}");
}
