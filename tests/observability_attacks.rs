//! Attacks on the observability of issue 11, end to end against the real
//! binary: label cardinality driven by client input, counters that go
//! down, access log lines a client can blow up, secrets in the logs,
//! `/readyz` probes that leave traces, and the metrics listener as an
//! attack surface.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// How long a value may take to show.
const WAIT: Duration = Duration::from_secs(10);

/// The longest access log line a client may cause, in bytes: every field
/// a client controls (method, path) is bounded well below it, so neither
/// Loki (256 KB per line by default) nor the writer's line buffer
/// (`buffer_lines` lines) can be made to hold megabytes per request.
const MAX_LINE: usize = 8 * 1024;

/// One scrape, as `(name, labels) -> value`.
fn scrape(proxy: &Proxy) -> BTreeMap<(String, String), f64> {
    let r = request(
        "GET",
        &format!("{}/metrics", proxy.metrics_url()),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    parse(&r.body)
}

fn parse(text: &str) -> BTreeMap<(String, String), f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (head, value) = line.rsplit_once(' ').expect("series line has a value");
            let (name, labels) = head.split_once('{').unwrap_or((head, ""));
            let labels = labels.strip_suffix('}').unwrap_or(labels);
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            ((name.to_string(), labels.to_string()), value)
        })
        .collect()
}

fn value(m: &BTreeMap<(String, String), f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|((n, l), _)| n == name && labels.iter().all(|p| l.contains(p)))
        .map(|(_, v)| v)
        .sum()
}

fn requests_seen(proxy: &Proxy) -> f64 {
    value(&scrape(proxy), "switchyard_requests_total", &[])
}

/// Waits until the metrics have counted at least `n` requests.
fn wait_counted(proxy: &Proxy, n: usize) {
    assert!(
        poll_until(WAIT, || requests_seen(proxy) >= n as f64),
        "fewer than {n} requests counted"
    );
}

/// Service `api` (blue, green), `/` proxied on host `api.test`, `/x/*/y`
/// proxied without host, `/limited/` under a one-a-minute rate limit.
fn config(blue: &Upstream, green: &Upstream) -> String {
    let mut s = service("api", &[blue], &[green], "blue");
    s.push_str("[rate_limits.per_ip]\nrate = \"1/m\"\n\n");
    s.push_str(&route(Some("api.test"), "/", "api"));
    s.push_str(&route(None, "/x/*/y", "api"));
    s.push_str(&route_with("/limited/", "api", "rate_limit = \"per_ip\""));
    s
}

/// Raw request to `addr`; the answer's status, or 0 when none came.
fn raw_status(addr: &str, req: &[u8]) -> u16 {
    let mut c = RawConn::connect(addr);
    if c.send(req).is_err() {
        return 0;
    }
    c.read_head(Duration::from_secs(5)).map_or(0, |r| r.status)
}

/// A self-signed certificate for `api.test` as `[tls]` tables (handshake
/// timeout 300 ms), and a client config trusting it that offers `alpn`.
fn tls_tables(dir: &std::path::Path) -> (String, rustls::pki_types::CertificateDer<'static>) {
    let (site, der) = common::tls::self_signed_site(dir, "api.test");
    let tables = format!("[tls]\nhandshake_timeout = \"300ms\"\nredirect_http = false\n{site}");
    (tables, der)
}

#[test]
fn client_input_never_adds_a_series() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).metrics().start();
    let before = scrape(&proxy);
    let addr = proxy.http_addr();
    let mut sent = 0;
    for i in 0..40 {
        let reqs = [
            // Distinct raw paths on every route, matched and not.
            format!("GET /p{i}?q={i} HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            format!("GET /x/{i}/y/z{i} HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            format!("GET /nowhere/{i} HTTP/1.1\r\nHost: h{i}.test\r\n\r\n"),
            // Odd methods, hosts and header values.
            format!("M{i}X /p HTTP/1.1\r\nHost: api.test\r\nX-Weird: v{i}\r\n\r\n"),
            format!("GET /p HTTP/1.1\r\nHost: API.TEST.:{}\r\n\r\n", 1000 + i),
            format!("GET /%zz{i} HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            format!("GET /p HTTP/1.1\r\nHost: bad host {i}\r\n\r\n"),
            format!("GET /limited/{i} HTTP/1.1\r\nHost: other.test\r\n\r\n"),
        ];
        for r in &reqs {
            let status = raw_status(&addr, r.as_bytes());
            assert_ne!(status, 0, "no answer to {r:?}");
            sent += 1;
        }
    }
    wait_counted(&proxy, sent);
    let after = scrape(&proxy);
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(new.is_empty(), "series created by client input: {new:#?}");
}

/// A scraped counter must never go down while the process runs: a reset
/// reads to Prometheus as a restart, and `rate()` then counts the whole
/// value again. The rate limit's admissions are derived (checked minus
/// refused, two counters read one after the other), so a scrape that
/// lands between a check and its refusal must not make them step back.
#[test]
fn limit_counters_never_go_down_under_load() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).metrics().start();
    let addr = proxy.http_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut loaders = Vec::new();
    for t in 0..3 {
        let (addr, stop) = (addr.clone(), stop.clone());
        loaders.push(thread::spawn(move || {
            let mut c = RawConn::connect(&addr);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 200_000 {
                n += 1;
                let req = format!("GET /limited/{t}/{n} HTTP/1.1\r\nHost: other.test\r\n\r\n");
                let ok = c.send(req.as_bytes()).is_ok()
                    && c.read_response(Duration::from_secs(5)).is_ok();
                if !ok {
                    c = RawConn::connect(&addr);
                }
            }
        }));
    }
    let mut last: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut went_down = Vec::new();
    let mut scrapes = 0;
    while Instant::now() < deadline && scrapes < 5_000 {
        scrapes += 1;
        let now = scrape(&proxy);
        for ((name, labels), v) in &now {
            let counter = name.ends_with("_total")
                || name.ends_with("_count")
                || name.ends_with("_bucket")
                || name.ends_with("_sum");
            if let Some(prev) = last.get(&(name.clone(), labels.clone())) {
                if counter && v < prev {
                    went_down.push(format!("{name}{{{labels}}}: {prev} -> {v}"));
                }
            }
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    assert!(
        value(&last, "switchyard_limit_refusals_total", &["per_ip"]) > 100.0,
        "the load did not reach the rate limit: {:?} refusals, {} requests",
        value(&last, "switchyard_limit_refusals_total", &["per_ip"]),
        value(&last, "switchyard_requests_total", &[])
    );
    assert!(
        went_down.is_empty(),
        "counters went down over {scrapes} scrapes:\n{}",
        went_down.join("\n")
    );
}

/// Every access log line a client can cause stays one JSON object of at
/// most [`MAX_LINE`] bytes, however long its method or path.
#[test]
fn access_log_lines_stay_bounded_whatever_the_client_sends() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .log_filter("error")
        .start();
    let addr = proxy.http_addr();
    let long = "a".repeat(20_000);
    let huge = "b".repeat(60_000);
    let method = "X".repeat(20_000);
    let reqs = [
        // Under max_header_size: proxied.
        format!("GET /{long} HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        // Over it: 431, but the path is still logged.
        format!("GET /{huge} HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        // No route: 404.
        format!("GET /{long} HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n"),
        // An extension method of 20 KB, and one of 600 KB (431).
        format!("{method} /p HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        format!(
            "{} /p HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "Y".repeat(600_000)
        ),
        // Odd bytes in path and method: escapes, UTF-8, quotes.
        "GET /%22%5c%00/\u{e9}\"\\ HTTP/1.1\r\nHost: api.test\r\n\r\n".to_string(),
    ];
    for r in &reqs {
        raw_status(&addr, r.as_bytes());
    }
    let mut text = String::new();
    let enough = poll_until(WAIT, || {
        text = proxy.stdout_text();
        text.lines().count() >= 6
    });
    assert!(enough, "fewer than 6 lines:\n{text:.2000}");
    let mut long_lines = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:.300}"));
        assert!(v.is_object(), "{line:.300}");
        if line.len() > MAX_LINE {
            let cut = |f: &str| {
                v[f].as_str()
                    .unwrap_or("")
                    .chars()
                    .take(12)
                    .collect::<String>()
            };
            long_lines.push(format!(
                "{} bytes: status {}, method {}..., path {}...",
                line.len(),
                v["status"],
                cut("method"),
                cut("path")
            ));
        }
    }
    assert!(
        long_lines.is_empty(),
        "access log lines over {MAX_LINE} bytes:\n{}",
        long_lines.join("\n")
    );
}

/// User info of an absolute-form target (refused), query strings on a
/// refused request and cookies never reach the logs, at the most verbose
/// ordinary log level.
#[test]
fn userinfo_and_queries_of_refused_requests_stay_out_of_the_logs() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // And a service whose only backend is dead: Pingora's ERROR line for
    // the failed upstream request describes the request.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut body = config(&blue, &green);
    body.push_str(&format!(
        "[services.gone]\nblue = [\"{dead}\"]\ngreen = [\"{dead}\"]\n\n"
    ));
    body.push_str(&route(Some("gone.test"), "/", "gone"));
    let proxy = ProxyBuilder::new(body)
        .log_filter("trace")
        .metrics()
        .start();
    let addr = proxy.http_addr();
    let reqs = [
        "GET /p?t=s3cret-q9 HTTP/1.1\r\nHost: gone.test\r\nAuthorization: Bearer s3cret-gone\r\nCookie: s=s3cret-gone-cookie\r\n\r\n",
        "POST /p?t=s3cret-q10 HTTP/1.1\r\nHost: gone.test\r\nContent-Length: 11\r\nX-Api-Key: s3cret-gone-key\r\n\r\ns3cret-body",
        "GET http://user:s3cret-userinfo@api.test/p?t=s3cret-q1 HTTP/1.1\r\nHost: api.test\r\n\r\n",
        "GET http://s3cret-userinfo@api.test/p HTTP/1.1\r\nHost: api.test\r\n\r\n",
        "GET /%zz?t=s3cret-q2 HTTP/1.1\r\nHost: api.test\r\nCookie: a=s3cret-cookie\r\n\r\n",
        "GET /p?t=s3cret-q3 HTTP/1.1\r\nHost: bad host\r\nAuthorization: Basic s3cret-basic\r\n\r\n",
        "GET /p?t=s3cret-q4 HTTP/1.1\r\nHost: api.test\r\nHost: api.test\r\n\r\n",
        "GET /p?t=s3cret-q5 HTTP/1.1\r\nHost: api.test\r\nContent-Length: x\r\n\r\n",
        "GET /p?t=s3cret-q6 HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ];
    for r in reqs {
        raw_status(&addr, r.as_bytes());
    }
    // The metrics listener too: its query strings and tokens.
    let m = proxy.metrics_url();
    request(
        "GET",
        &format!("{m}/metrics?t=s3cret-q7"),
        &[("authorization", "Bearer s3cret-metrics")],
        None,
    );
    request(
        "POST",
        &format!("{m}/x?t=s3cret-q8"),
        &[],
        Some(b"s3cret-body"),
    );
    // A last request whose line says the writer caught up with the others.
    let last = b"GET /p HTTP/1.1\r\nHost: api.test\r\nX-Request-Id: sentinel-1\r\n\r\n";
    assert_eq!(raw_status(&addr, last), 200);
    assert!(
        poll_until(WAIT, || proxy.stdout_text().contains("sentinel-1")),
        "no access log line for the last request:\n{}",
        proxy.stdout_text()
    );
    let access = proxy.stdout_text();
    let stderr = proxy.stderr_text();
    assert!(
        stderr.contains("Host: gone.test"),
        "no log line about the failed upstream requests:\n{stderr}"
    );
    for needle in ["s3cret", "user:"] {
        assert!(
            !access.contains(needle),
            "{needle} in the access log:\n{access}"
        );
        assert!(!stderr.contains(needle), "{needle} on stderr:\n{stderr}");
    }
}

/// `/readyz` probes the proxy listeners by connecting to them: on the
/// HTTPS listener that is a TLS handshake that never starts. A prober
/// every few seconds must leave no warning or error in the log, and
/// count no slow client or refusal.
#[test]
fn readyz_probes_leave_no_trace() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let (tables, _) = tls_tables(dir.path());
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .https(&tables)
        .metrics()
        .start();
    let before = scrape(&proxy);
    let url = format!("{}/readyz", proxy.metrics_url());
    for _ in 0..5 {
        let r = request("GET", &url, &[], None);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Longer than the handshake timeout: a probe cut at it would count now.
    let later = Instant::now() + Duration::from_millis(800);
    poll_until(Duration::from_secs(2), || Instant::now() >= later);
    let after = scrape(&proxy);
    for name in ["switchyard_refusals_total", "switchyard_requests_total"] {
        assert_eq!(
            value(&before, name, &[]),
            value(&after, name, &[]),
            "{name} moved on readiness probes"
        );
    }
    let noisy: Vec<String> = proxy
        .stderr_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect();
    assert!(noisy.is_empty(), "readiness probes logged:\n{noisy:#?}");
}

/// The metrics listener survives what a hostile local client sends it
/// (other methods with bodies, huge headers, odd paths, HTTP/1.0,
/// more connections than its cap) and still answers a scrape; the proxy
/// port never serves it.
#[test]
fn metrics_listener_shrugs_off_abuse() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green)).metrics().start();
    let m = proxy.metrics_url();
    let maddr = m.trim_start_matches("http://").to_string();
    let big = "h".repeat(2 * 1024 * 1024);
    let cases: [(Vec<u8>, &[u16]); 7] = [
        (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            &[405],
        ),
        (
            b"DELETE /readyz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[405],
        ),
        (
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").into_bytes(),
            &[0, 400, 431],
        ),
        (
            b"GET /metrics/../status HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[404],
        ),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n".to_vec(), &[200]),
        (
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[0, 400, 404],
        ),
        (b"GARBAGE\r\n\r\n".to_vec(), &[0, 400]),
    ];
    for (req, expect) in &cases {
        let status = raw_status(&maddr, req);
        assert!(
            expect.contains(&status),
            "{status} for {:.60}",
            String::from_utf8_lossy(req)
        );
    }
    // HEAD carries no body: the next answer on the connection is whole.
    let mut c = RawConn::connect(&maddr);
    c.send(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = c.read_head(WAIT).unwrap();
    assert_eq!(head.status, 200);
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let next = c.read_response(WAIT).unwrap();
    assert_eq!(next.status, 200, "{next:?}");
    assert!(next.body.contains("alive"), "{next:?}");
    // More idle connections than the cap (64): a scrape still gets in.
    let idle: Vec<RawConn> = (0..80).map(|_| RawConn::connect(&maddr)).collect();
    let mut ok = false;
    poll_until(WAIT, || {
        ok = try_request("GET", &format!("{m}/metrics"), &[], None).is_ok_and(|r| r.status == 200);
        ok
    });
    assert!(ok, "no scrape with 80 idle connections open");
    drop(idle);
    // The proxy port forwards /metrics like any path: the backend answers.
    let before = blue.hits();
    let (status, body) = proxy.get("/metrics", Some("api.test"));
    assert_eq!(status, 200);
    assert!(!body.contains("switchyard_"), "{body}");
    assert_eq!(blue.hits(), before + 1);
    // Nor does naming the metrics listener as the target: an absolute-form
    // URI is routed by its host like any request, CONNECT is refused.
    for req in [
        format!("GET {m}/metrics HTTP/1.1\r\nHost: {maddr}\r\n\r\n"),
        format!("CONNECT {maddr} HTTP/1.1\r\nHost: {maddr}\r\n\r\n"),
    ] {
        let mut c = RawConn::connect(&proxy.http_addr());
        c.send(req.as_bytes()).unwrap();
        let r = c.read_response(WAIT).unwrap();
        assert!(!r.body.contains("switchyard_"), "{req}: {r:?}");
        assert_ne!(r.status, 200, "{req}: {r:?}");
    }
}

/// Before its first issuance an ACME certificate is a self-signed stand-in
/// valid for 7 days. Its not-after is not the certificate's: exporting it
/// made `SwitchyardCertificateExpiring` (critical under 7 days) fire 15
/// minutes after a first start whose CA is slow or unreachable. The
/// README promises 0 ("not obtained yet, not an expiry").
#[test]
fn a_bootstrap_certificate_exports_no_expiry() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fs::create_dir(&certs).unwrap();
    // Nothing listens there: issuance fails, loopback only.
    let dead_ca = free_port();
    let tables = format!(
        "[tls]\ncerts_dir = {}\n\n[acme]\ndirectory = \"https://127.0.0.1:{dead_ca}/dir\"\nretry_backoff = \"1h\"\n\n\
         [[acme.certificates]]\nname = \"site\"\ndomains = [\"site.switchyard.test\"]\n\n",
        toml_str(certs.to_str().unwrap())
    );
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .https(&tables)
        .metrics()
        .start();
    let m = scrape(&proxy);
    let key = (
        "switchyard_certificate_not_after_seconds".to_string(),
        "certificate=\"site\"".to_string(),
    );
    let cert: Vec<_> = m
        .iter()
        .filter(|((n, _), _)| n.contains("certificate"))
        .collect();
    assert_eq!(m.get(&key), Some(&0.0), "{cert:?}");
}

/// Every way a request arrives counts it exactly once, in
/// `requests_total` and in the access log: pipelined, HTTP/1.0, retried
/// on a dead backend, HTTP/2 streams, a client gone before its answer (a
/// line with status 0, no count); the in-flight gauges come back to 0.
#[test]
fn every_request_counts_once_however_it_arrives() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // A dead backend first in blue: round robin sends some attempts there.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut body = format!(
        "[services.api]\nblue = [\"{dead}\", \"{}\"]\ngreen = [\"{}\"]\nactive = \"blue\"\n\n",
        blue.addr(),
        green.addr()
    );
    body.push_str(&route(Some("api.test"), "/", "api"));
    let dir = tempfile::tempdir().unwrap();
    let (tables, der) = tls_tables(dir.path());
    let proxy = ProxyBuilder::new(body)
        .https(&tables)
        .metrics()
        .log_filter("error")
        .start();
    let addr = proxy.http_addr();
    let mut answered = 0;

    // Three pipelined requests in one write.
    let mut c = RawConn::connect(&addr);
    let one = "GET /pipe HTTP/1.1\r\nHost: api.test\r\n\r\n";
    c.send(one.repeat(3).as_bytes()).unwrap();
    for _ in 0..3 {
        assert_eq!(c.read_response(WAIT).unwrap().status, 200);
        answered += 1;
    }
    // HTTP/1.0, with and without Host.
    assert_eq!(
        raw_status(&addr, b"GET /ten HTTP/1.0\r\nHost: api.test\r\n\r\n"),
        200
    );
    assert_eq!(raw_status(&addr, b"GET /ten HTTP/1.0\r\n\r\n"), 404);
    answered += 2;
    // Retried GETs: every one answered 200 once.
    for _ in 0..4 {
        assert_eq!(
            raw_status(&addr, b"GET /retry HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            200
        );
        answered += 1;
    }
    // A client gone before its (delayed) answer.
    let mut gone = RawConn::connect(&addr);
    gone.send(b"GET /gone?delay_ms=400 HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .unwrap();
    assert!(poll_until(WAIT, || blue.in_flight() == 1 || green.in_flight() == 1));
    drop(gone);

    // HTTP/2: four streams on one connection.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = common::tls::trusting(der, &[b"h2"]);
    let https = proxy.https_addr();
    let statuses = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&https).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("api.test").unwrap(),
                tcp,
            )
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.expect("h2 ready");
        let mut pending = Vec::new();
        for i in 0..4 {
            let req = http::Request::get(format!("https://api.test/h2/{i}"))
                .body(())
                .unwrap();
            let (resp, _) = send.send_request(req, true).expect("h2 request");
            pending.push(resp);
            send = send.ready().await.expect("h2 ready");
        }
        let mut statuses = Vec::new();
        for r in pending {
            statuses.push(r.await.expect("h2 answer").status().as_u16());
        }
        statuses
    });
    assert_eq!(statuses, [200; 4]);
    answered += 4;

    // The unanswered request ends; nothing stays in flight.
    assert!(poll_until(WAIT, || {
        let m = scrape(&proxy);
        value(&m, "switchyard_in_flight_requests", &[]) == 0.0
            && value(&m, "switchyard_requests_total", &[]) >= answered as f64
    }));
    let lines_ok = poll_until(WAIT, || proxy.stdout_text().lines().count() > answered);
    let m = scrape(&proxy);
    let text = proxy.stdout_text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        value(&m, "switchyard_requests_total", &[]),
        answered as f64,
        "requests_total; access log:\n{text}"
    );
    assert_eq!(
        value(&m, "switchyard_requests_total", &["status_class=\"2xx\""]),
        (answered - 1) as f64
    );
    let errors = value(&m, "switchyard_upstream_errors_total", &[]);
    assert!(
        (1.0..=answered as f64).contains(&errors),
        "{errors} upstream errors (one per attempt on the dead backend)"
    );
    let unanswered = lines.iter().filter(|l| l["status"] == 0).count();
    assert!(lines_ok, "{} lines:\n{text}", lines.len());
    assert_eq!(
        (lines.len() - unanswered, unanswered),
        (answered, 1),
        "(answered, status 0) lines:\n{text}"
    );
    drop(rt);
}

/// `/readyz` is about this switchyard taking traffic. A service without
/// a health check counts as healthy even with every backend dead; an
/// active pool that goes down makes it 503; but a service put in
/// maintenance mode answers its maintenance page on purpose, usually
/// while its backends are down for the work: a 503 from `/readyz` then
/// would make the load balancer pull switchyard out, so nobody sees the
/// page (and every other service goes down with it). The alert rules
/// already exempt a service in maintenance (`SwitchyardActivePoolDown`).
#[test]
fn readyz_follows_the_active_pools_but_not_a_service_in_maintenance() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dead = format!("127.0.0.1:{}", free_port());
    let mut body = service_with("api", &[&blue], &[&green], "blue", &fast_health());
    body.push_str(&format!(
        "[services.bare]\nblue = [\"{dead}\"]\ngreen = [\"{dead}\"]\n\n"
    ));
    body.push_str(&route(Some("api.test"), "/", "api"));
    body.push_str(&route(Some("bare.test"), "/", "bare"));
    let proxy = ProxyBuilder::new(body).metrics().start();
    let url = format!("{}/readyz", proxy.metrics_url());
    let readyz = || {
        let r = try_request("GET", &url, &[], None).expect("readyz answers");
        (r.status, r.body)
    };
    assert!(
        poll_until(WAIT, || readyz().0 == 200),
        "never ready: {:?}",
        readyz()
    );
    blue.set_healthy(false);
    assert!(poll_until(WAIT, || readyz().0 == 503), "{:?}", readyz());
    assert!(readyz().1.contains("api (blue)"), "{:?}", readyz());
    let (code, _) = proxy.admin("POST", "/services/api/maintenance", Some(r#"{"on": true}"#));
    assert_eq!(code, 200);
    assert_eq!(proxy.get("/", Some("api.test")).0, 503);
    let (status, text) = readyz();
    assert_eq!(status, 200, "in maintenance: {text}");
}

/// A WebSocket shows in the pool gauges while open and is counted once,
/// as 1xx, when it closes, outside the latency histogram; the gauges come
/// back to 0 however it ends (closed cleanly, or the client's socket just
/// dropped).
#[test]
fn an_upgraded_connection_counts_once_and_leaves_the_gauges() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut body = service("api", &[&blue], &[&green], "blue");
    body.push_str(&route_with("/ws/", "api", "websocket = true"));
    let proxy = ProxyBuilder::new(body).metrics().start();
    let gauges = |m: &BTreeMap<(String, String), f64>| {
        (
            value(m, "switchyard_upgraded_connections", &["color=\"blue\""]),
            value(m, "switchyard_in_flight_requests", &["color=\"blue\""]),
        )
    };
    let mut ws = ws_connect(&proxy.http_addr(), "/ws/a").expect("websocket");
    assert_eq!(ws_echo(&mut ws, "hi").unwrap(), "blue:hi");
    let dropped = ws_connect(&proxy.http_addr(), "/ws/b").expect("websocket");
    assert!(poll_until(WAIT, || gauges(&scrape(&proxy)) == (2.0, 2.0)));
    let m = scrape(&proxy);
    assert_eq!(value(&m, "switchyard_requests_total", &[]), 0.0);
    ws_close(ws);
    drop(dropped);
    assert!(
        poll_until(WAIT, || gauges(&scrape(&proxy)) == (0.0, 0.0)),
        "{:?}",
        gauges(&scrape(&proxy))
    );
    assert!(poll_until(WAIT, || requests_seen(&proxy) >= 2.0));
    let m = scrape(&proxy);
    assert_eq!(
        value(&m, "switchyard_requests_total", &["status_class=\"1xx\""]),
        2.0
    );
    assert_eq!(value(&m, "switchyard_requests_total", &[]), 2.0);
    assert_eq!(
        value(&m, "switchyard_request_duration_seconds_count", &[]),
        0.0
    );
}

/// Requests so malformed that Pingora's parser answers them 400 itself,
/// before any switchyard code sees them (a URI over 64 KiB, a bad
/// `Content-Length`, a header line without a colon, bytes no request
/// line holds): they are answers like any other, so `requests_total`,
/// `refusals_total{reason="bad_request"}` and the access log must see
/// them, or a flood of them (a scanner, a broken client) is invisible.
#[test]
fn answers_pingora_gives_itself_are_counted_and_logged() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .metrics()
        .log_filter("error")
        .start();
    let addr = proxy.http_addr();
    let long = "u".repeat(70_000);
    let reqs = [
        format!("GET /{long} HTTP/1.1\r\nHost: api.test\r\n\r\n"),
        "GET /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: x\r\n\r\n".to_string(),
        "GET /p HTTP/1.1\r\nHost: api.test\r\nno colon here\r\n\r\n".to_string(),
        "GET /p HTTP/9.9\r\nHost: api.test\r\n\r\n".to_string(),
    ];
    let before = scrape(&proxy);
    for r in &reqs {
        let status = raw_status(&addr, r.as_bytes());
        assert_eq!(status, 400, "{:.60}", r);
    }
    let four = |m: &BTreeMap<(String, String), f64>| {
        value(m, "switchyard_requests_total", &["status_class=\"4xx\""])
    };
    let bad = |m: &BTreeMap<(String, String), f64>| {
        value(m, "switchyard_refusals_total", &["reason=\"bad_request\""])
    };
    poll_until(Duration::from_secs(3), || {
        four(&scrape(&proxy)) >= four(&before) + reqs.len() as f64
    });
    // Once counted, a fresh scrape: one scrape reads refusals_total before
    // requests_total, so an observation can land between the two.
    let now = scrape(&proxy);
    let lines = proxy.stdout_text().lines().count();
    assert_eq!(
        (four(&now) - four(&before), bad(&now) - bad(&before), lines),
        (reqs.len() as f64, reqs.len() as f64, reqs.len()),
        "(4xx counted, bad_request refusals, access log lines) for {} answers of 400",
        reqs.len()
    );
}

/// A slow client on HTTP/2: the TLS handshake done (ALPN h2), then
/// nothing. It is cut at the header deadline like an HTTP/1 client that
/// never finishes its header, so `refusals_total{reason="slow_client"}`
/// must count it as it counts the HTTP/1 one.
#[test]
fn an_http2_client_cut_at_the_header_deadline_counts_as_slow() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let (tables, der) = tls_tables(dir.path());
    // The handshake timeout (300 ms) is inside the 1 s header deadline.
    let proxy = ProxyBuilder::new(config(&blue, &green))
        .https(&tables)
        .server("header_timeout = \"1s\"")
        .metrics()
        .start();
    let slow = || {
        value(
            &scrape(&proxy),
            "switchyard_refusals_total",
            &["slow_client"],
        )
    };
    assert_eq!(slow(), 0.0);
    let client = |alpn: &[u8]| common::tls::trusting(der.clone(), &[alpn]);
    for (alpn, counted) in [(&b"http/1.1"[..], 1.0), (&b"h2"[..], 2.0)] {
        let mut tls = common::tls::tls_connect(&proxy.https_addr(), "api.test", client(alpn));
        assert_eq!(tls.conn.alpn_protocol(), Some(alpn));
        // Say nothing; the proxy closes the connection at the deadline.
        let mut buf = [0u8; 64];
        let closed = poll_until(WAIT, || {
            use std::io::Read;
            !matches!(tls.read(&mut buf), Ok(n) if n > 0)
        });
        assert!(closed, "not closed at the header deadline");
        assert!(
            poll_until(WAIT, || slow() >= counted),
            "{} cut at the header deadline: slow_client {}, expected {counted}",
            String::from_utf8_lossy(alpn),
            slow()
        );
    }
}

/// A backend that answers with a status outside 100–599 (HTTP allows any
/// three digits; RFC 9110 §15 defines 1xx–5xx). The client gets it, so it
/// is an answer and must be counted (as `5xx`: a backend speaking nonsense
/// is a server error), not silently dropped from `requests_total`.
#[test]
fn an_odd_status_from_a_backend_is_still_counted() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let odd = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        // Bounded: the test sends one request.
        if let Ok((mut s, _)) = listener.accept() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let body = format!(
        "[services.odd]\nblue = [\"{odd}\"]\ngreen = [\"{odd}\"]\n\n{}",
        route(None, "/", "odd")
    );
    let proxy = ProxyBuilder::new(body).metrics().start();
    let status = raw_status(
        &proxy.http_addr(),
        b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n",
    );
    server.join().unwrap();
    assert_ne!(status, 0, "no answer");
    let logged = poll_until(WAIT, || proxy.stdout_text().lines().count() >= 1);
    assert!(logged, "no access log line");
    let counted = poll_until(Duration::from_secs(3), || requests_seen(&proxy) >= 1.0);
    assert!(
        counted,
        "the client got {status}, but requests_total counted nothing:\n{}",
        proxy.stdout_text()
    );
    let m = scrape(&proxy);
    let class = if (100..600).contains(&status) {
        format!("status_class=\"{}xx\"", status / 100)
    } else {
        "status_class=\"5xx\"".to_string()
    };
    assert_eq!(value(&m, "switchyard_requests_total", &[&class]), 1.0);
}
