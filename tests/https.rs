//! HTTPS end to end: the real binary with static certificates signed by a
//! test CA generated here, real upstreams, and real clients (rustls over
//! HTTP/1.1, the h2 crate over HTTP/2, tungstenite over TLS) verifying the
//! chain against that CA. Also the plain listener's redirect, challenge
//! path and HSTS rules, the handshake deadline, and `check` on bad
//! certificate files.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ProtocolVersion, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

use common::tls::*;
use common::*;

// ---------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------

/// A test CA and the leaf certificates it signed, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate's files and DER (to recognise it in a handshake).
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            dir: tempfile::Builder::new()
                .prefix("switchyard-pki-")
                .tempdir()
                .unwrap(),
            ca,
        }
    }

    /// A leaf for `names`, valid from 1 day ago for a year.
    fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let now = time::OffsetDateTime::now_utc();
        self.leaf_valid(
            file,
            names,
            now - time::Duration::days(1),
            now + time::Duration::days(365),
        )
    }

    fn leaf_valid(
        &self,
        file: &str,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        fs::write(&leaf.cert, cert.pem()).unwrap();
        fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        Arc::new(roots)
    }
}

/// A `[[tls.certificates]]` entry.
fn static_cert(name: &str, leaf: &Leaf) -> String {
    format!(
        "[[tls.certificates]]\nname = {}\ncert = {}\nkey = {}\n\n",
        toml_str(name),
        toml_str(leaf.cert.to_str().unwrap()),
        toml_str(leaf.key.to_str().unwrap())
    )
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A client trusting only the test CA, offering `alpn`, with the given TLS
/// versions.
fn client_config(
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn h1_config(pki: &Pki) -> Arc<ClientConfig> {
    client_config(pki.roots(), &[b"http/1.1"], rustls::DEFAULT_VERSIONS)
}

/// A plain-HTTP GET over a fresh connection.
fn plain_get(addr: &str, host: &str, path: &str) -> Answer {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    exchange(&mut tcp, &get_request(host, path))
}

/// The leaf certificate served to a client sending `sni` (None: no SNI).
fn served_cert(addr: &str, sni: Option<&str>) -> Vec<u8> {
    let recorder = Arc::new(Recorder::default());
    let mut config = Recorder::config(recorder.clone());
    config.enable_sni = sni.is_some();
    // Without SNI rustls still needs a name to verify against.
    let _conn = tls_connect(addr, sni.unwrap_or("no-sni.invalid"), Arc::new(config));
    recorder.take().expect("a certificate was presented")
}

// ---------------------------------------------------------------------------
// HTTP/2 and async clients
// ---------------------------------------------------------------------------

/// A runtime whose worker drives the client connections while the test
/// thread blocks in [`poll_until`].
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTP/2 connection trusting the test CA, checked to have negotiated
/// `h2` by ALPN.
async fn h2_connect(pki: &Pki, addr: &str, name: &str) -> h2::client::SendRequest<Bytes> {
    let config = client_config(pki.roots(), &[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS);
    h2_handshake(addr, name, config).await
}

/// Sends a GET for `url` (its authority is `:authority`) and returns the
/// response head and body stream.
async fn h2_send(
    send: &mut h2::client::SendRequest<Bytes>,
    url: &str,
) -> http::Response<h2::RecvStream> {
    futures_util::future::poll_fn(|cx| send.poll_ready(cx))
        .await
        .expect("h2 ready");
    let req = http::Request::get(url).body(()).unwrap();
    let (resp, _) = send.send_request(req, true).expect("send h2 request");
    tokio::time::timeout(IO_TIMEOUT, resp)
        .await
        .expect("h2 response in time")
        .expect("h2 response")
}

/// The next non-empty DATA chunk of an h2 body, as text; None at its end.
async fn h2_chunk(body: &mut h2::RecvStream) -> Option<String> {
    loop {
        let data = tokio::time::timeout(IO_TIMEOUT, body.data())
            .await
            .expect("h2 data in time")?
            .expect("h2 data");
        let _ = body.flow_control().release_capacity(data.len());
        if !data.is_empty() {
            return Some(String::from_utf8_lossy(&data).into_owned());
        }
    }
}

async fn h2_body(mut body: h2::RecvStream) -> String {
    let mut text = String::new();
    while let Some(chunk) = h2_chunk(&mut body).await {
        text.push_str(&chunk);
    }
    text
}

// ---------------------------------------------------------------------------
// The setup most tests share
// ---------------------------------------------------------------------------

const ALPHA: &str = "alpha.test";
const BETA: &str = "beta.test";
/// Covered by alpha's wildcard; the only host with a route of its own.
const ONLY: &str = "only.wild.test";

/// Two certificates (`alpha`: alpha.test and *.wild.test; `beta`:
/// beta.test, the default), one service `app` (blue active), and routes:
/// `/ws` with WebSocket, `/a/` for only.wild.test only (a host with routes
/// of its own uses only those), `/denied` denied, everything else proxied.
struct Site {
    pki: Pki,
    alpha: Leaf,
    beta: Leaf,
    blue: Upstream,
    green: Upstream,
    proxy: Proxy,
}

fn site(extra_tls: &str) -> Site {
    let pki = Pki::new();
    let alpha = pki.leaf("alpha", &[ALPHA, "*.wild.test"]);
    let beta = pki.leaf("beta", &[BETA]);
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let body = format!(
        "{}{}{}{}{}{}",
        service("app", &[&blue], &[&green], "blue"),
        route_with("/ws", "app", "websocket = true"),
        route(Some(ONLY), "/a/", "app"),
        deny_route(None, "/a/"),
        deny_route(None, "/denied"),
        route(None, "/", "app"),
    );
    let tables = format!(
        "[tls]\nhsts = \"max-age=31536000\"\ndefault_certificate = \"beta\"\n{extra_tls}\n\n{}{}",
        static_cert("alpha", &alpha),
        static_cert("beta", &beta)
    );
    let proxy = ProxyBuilder::new(body).https(&tables).start();
    Site {
        pki,
        alpha,
        beta,
        blue,
        green,
        proxy,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn http1_over_tls_is_proxied_with_forwarded_proto_https_and_hsts() {
    let s = site("");
    let mut conn = tls_connect(&s.proxy.https_addr(), ALPHA, h1_config(&s.pki));
    assert_eq!(conn.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let a = exchange(&mut conn, &get_request(ALPHA, "/x?y=1"));
    assert_eq!((a.status, a.body.as_str()), (200, "blue"));
    assert_eq!(
        a.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let seen = s.blue.last_request().unwrap();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("host"), Some(ALPHA));
    // Kept alive: a second request on the same connection. A local answer
    // (deny) carries HSTS too.
    let a = exchange(&mut conn, &get_request(ALPHA, "/denied"));
    assert_eq!(a.status, 404);
    assert_eq!(
        a.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    // Plain HTTP for a host no certificate covers: proxied, no HSTS
    // (RFC 6797 §7.2), X-Forwarded-Proto http.
    let a = plain_get(&s.proxy.http_addr(), "other.test", "/p");
    assert_eq!((a.status, a.body.as_str()), (200, "blue"));
    assert_eq!(a.header("strict-transport-security"), None);
    let seen = s.blue.last_request().unwrap();
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert!(
        s.proxy.error_lines().is_empty(),
        "{}",
        s.proxy.stderr_text()
    );
}

#[test]
fn tls_1_2_and_1_3_are_both_served() {
    let s = site("");
    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let config = client_config(s.pki.roots(), &[b"http/1.1"], &[version]);
        let mut conn = tls_connect(&s.proxy.https_addr(), BETA, config);
        assert_eq!(conn.conn.protocol_version(), Some(expected));
        let a = exchange(&mut conn, &get_request(BETA, "/v"));
        assert_eq!(a.status, 200, "{expected:?}");
    }
}

/// A TLS 1.0 ClientHello (no `supported_versions` extension, so nothing
/// newer is offered), written out byte by byte: rustls clients cannot send
/// one. RFC 2246 §7.4.1.2.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01]; // client_version TLS 1.0
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // AES-CBC-SHA suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00, 0x00, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    record.extend_from_slice(&hs);
    record
}

#[test]
fn tls_1_0_and_1_1_are_refused() {
    let s = site("");
    for version in [0x01u8, 0x02] {
        let mut hello = tls10_client_hello();
        hello[10] = version; // client_version 3.1 or 3.2
        let mut conn = RawConn::connect(&s.proxy.https_addr());
        conn.send(&hello).unwrap();
        let reply = conn.wait_closed(IO_TIMEOUT).expect("connection closed");
        // An alert record (21) or nothing at all; never a ServerHello (22).
        assert!(
            reply.first().is_none_or(|&t| t == 21),
            "TLS 1.{} got {reply:?}",
            version - 1
        );
    }
    assert!(
        s.proxy.error_lines().is_empty(),
        "{}",
        s.proxy.stderr_text()
    );
}

#[test]
fn sni_chooses_exact_wildcard_or_default_certificate() {
    let s = site("");
    let addr = s.proxy.https_addr();
    assert_eq!(served_cert(&addr, Some(ALPHA)), s.alpha.der, "exact alpha");
    assert_eq!(served_cert(&addr, Some(BETA)), s.beta.der, "exact beta");
    assert_eq!(
        served_cert(&addr, Some("x.wild.test")),
        s.alpha.der,
        "wildcard"
    );
    // A wildcard stands for one label only; unknown names and no SNI get
    // the default certificate (beta).
    assert_eq!(served_cert(&addr, Some("a.b.wild.test")), s.beta.der);
    assert_eq!(served_cert(&addr, Some("unknown.test")), s.beta.der);
    assert_eq!(served_cert(&addr, None), s.beta.der, "no SNI");
}

#[test]
fn http2_is_negotiated_and_routes_by_authority() {
    let s = site("");
    let rt = runtime();
    rt.block_on(async {
        let mut send = h2_connect(&s.pki, &s.proxy.https_addr(), ALPHA).await;
        // One connection (SNI alpha.test) for any name its certificate
        // covers (RFC 9113 §9.1.1).
        let resp = h2_send(&mut send, "https://only.wild.test/a/x").await;
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        // Connection-specific headers are HTTP/1 only (RFC 9113 §8.2.2);
        // the h2 client would refuse the response outright, but check.
        assert!(resp.headers().get("connection").is_none());
        assert!(resp.headers().get("transfer-encoding").is_none());
        assert_eq!(
            resp.headers().get("strict-transport-security").unwrap(),
            "max-age=31536000"
        );
        assert_eq!(h2_body(resp.into_body()).await, "blue");
        // The host rule sees :authority: /a/ is for only.wild.test only.
        let resp = h2_send(&mut send, "https://alpha.test/a/x").await;
        assert_eq!(resp.status(), 404);
    });
    let seen = s.blue.requests_for("/a/");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen[0].header("host"), Some(ONLY));
}

#[test]
fn sse_streams_over_http2() {
    let s = site("");
    let rt = runtime();
    rt.block_on(async {
        let mut send = h2_connect(&s.pki, &s.proxy.https_addr(), BETA).await;
        let resp = h2_send(&mut send, "https://beta.test/events?sse=3&gated=1").await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        // Each event arrives before the upstream is let to send the next:
        // nothing is buffered on the way.
        let mut got = String::new();
        for i in 1..=3 {
            let want = format!("data: blue-{i}\n\n");
            while !got.contains(&want) {
                got.push_str(&h2_chunk(&mut body).await.expect("event"));
            }
            s.blue.release(1);
        }
        assert_eq!(h2_body(body).await, "");
    });
}

#[test]
fn switch_over_http2_lets_in_flight_requests_finish_on_the_old_color() {
    let s = site("");
    let rt = runtime();
    rt.block_on(async {
        let mut send = h2_connect(&s.pki, &s.proxy.https_addr(), BETA).await;
        let req = http::Request::get("https://beta.test/held?hold=1")
            .body(())
            .unwrap();
        let (held, _) = send.send_request(req, true).unwrap();
        let started = poll_until(FAIL_DEADLINE, || s.blue.in_flight() == 1);
        assert!(started, "held request reached blue");
        s.proxy.switch("app", "green", None);
        // A new stream on the same connection goes to green...
        let resp = h2_send(&mut send, "https://beta.test/new").await;
        assert_eq!(h2_body(resp.into_body()).await, "green");
        // ...while the held one finishes on blue.
        s.blue.release(1);
        let held = tokio::time::timeout(IO_TIMEOUT, held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held.status(), 200);
        assert_eq!(h2_body(held.into_body()).await, "blue");
    });
    assert_eq!(s.green.requests_for("/new").len(), 1);
}

#[test]
fn websocket_over_tls() {
    let s = site("");
    let rt = runtime();
    rt.block_on(async {
        // WebSocket needs HTTP/1.1 (no RFC 8441 over h2): offered alone.
        let config = client_config(s.pki.roots(), &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
        let tls = tls_async(&s.proxy.https_addr(), ALPHA, config).await;
        let (mut ws, resp) = tokio_tungstenite::client_async("wss://alpha.test/ws", tls)
            .await
            .expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("hi")).await.unwrap();
        let reply = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), "blue:hi");
        ws.close(None).await.unwrap();
    });
    let seen = s.blue.requests_for("/ws");
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
}

#[test]
fn plain_http_is_redirected_for_covered_hosts_only() {
    let s = site("");
    let http = s.proxy.http_addr();
    let https_port = s.proxy.https_addr().rsplit(':').next().unwrap().to_string();
    let a = plain_get(&http, ALPHA, "/some/path?q=1&r=2");
    assert_eq!(a.status, 301);
    assert_eq!(
        a.header("location"),
        Some(format!("https://alpha.test:{https_port}/some/path?q=1&r=2").as_str())
    );
    assert_eq!(a.header("strict-transport-security"), None);
    // Wildcard-covered host, and the host's own port is replaced.
    let a = plain_get(&http, "x.wild.test:8080", "/");
    assert_eq!(
        a.header("location"),
        Some(format!("https://x.wild.test:{https_port}/").as_str())
    );
    // No certificate for the host: proxied as before.
    let a = plain_get(&http, "other.test", "/plain");
    assert_eq!((a.status, a.body.as_str()), (200, "blue"));
    // The challenge path is never redirected nor routed: an unknown token
    // is 404 from switchyard itself, for a covered host as for any other.
    let hits = s.blue.hits();
    for host in [ALPHA, "other.test"] {
        let a = plain_get(&http, host, "/.well-known/acme-challenge/unknown-token");
        assert_eq!(a.status, 404, "{host}");
        assert_eq!(a.header("location"), None);
        assert_eq!(a.header("content-type"), Some("text/plain"));
    }
    assert_eq!(
        s.blue.hits(),
        hits,
        "challenge requests never reach a backend"
    );
}

#[test]
fn challenge_path_comes_before_maintenance_and_host_rules() {
    let s = site("");
    let (code, _) = s
        .proxy
        .admin("POST", "/services/app/maintenance", Some(r#"{"on": true}"#));
    assert_eq!(code, 200);
    let http = s.proxy.http_addr();
    // Maintenance answers everything else with 503...
    assert_eq!(plain_get(&http, "other.test", "/x").status, 503);
    // ...but challenge requests are switchyard's own, whatever the host:
    // even one no route or host rule would accept.
    for host in [ALPHA, "other.test", "bad host"] {
        let a = plain_get(&http, host, "/.well-known/acme-challenge/tok");
        assert_eq!(a.status, 404, "{host}");
        assert_eq!(a.header("content-type"), Some("text/plain"), "{host}");
    }
}

#[test]
fn redirect_can_be_turned_off() {
    let s = site("redirect_http = false");
    let a = plain_get(&s.proxy.http_addr(), ALPHA, "/x");
    assert_eq!((a.status, a.body.as_str()), (200, "blue"));
}

/// A real ClientHello from a rustls client, as bytes.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let mut conn = ClientConnection::new(
        h1_config(pki),
        ServerName::try_from(ALPHA.to_string()).unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn a_silent_client_is_cut_at_the_handshake_timeout() {
    let s = site("handshake_timeout = \"1s\"");
    let mut conn = RawConn::connect(&s.proxy.https_addr());
    let closed = conn.wait_closed(Duration::from_secs(8));
    assert_eq!(
        closed,
        Some(Vec::new()),
        "closed silently, long before 60 s"
    );
    // Connections that never finish a handshake are not logged as errors.
    assert!(
        s.proxy.error_lines().is_empty(),
        "{}",
        s.proxy.stderr_text()
    );
    // The listener still serves.
    let mut conn = tls_connect(&s.proxy.https_addr(), BETA, h1_config(&s.pki));
    assert_eq!(exchange(&mut conn, &get_request(BETA, "/")).status, 200);
}

#[test]
fn a_dribbled_client_hello_is_cut_at_the_header_deadline() {
    let pki = Pki::new();
    // The handshake timeout (default 10 s) is not what cuts here.
    let (_up, proxy) = short_deadline_proxy(&pki);
    let hello = client_hello(&pki);
    let mut conn = RawConn::connect(&proxy.https_addr());
    let started = Instant::now();
    // One byte every 100 ms: the whole hello would take far longer than the
    // deadline. Bounded in count (the hello's length) and time.
    let mut cut = false;
    for b in &hello {
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
        if conn.send(&[*b]).is_err() {
            cut = true;
            break;
        }
        if conn.wait_closed(Duration::from_millis(100)).is_some() {
            cut = true;
            break;
        }
    }
    assert!(cut, "connection still open after {:?}", started.elapsed());
    assert!(proxy.error_lines().is_empty(), "{}", proxy.stderr_text());
}

/// Everything to one upstream, one static certificate for alpha.test, and
/// `server` (one `[server]` line).
fn one_site_proxy(pki: &Pki, server: &str) -> (Upstream, Proxy) {
    let leaf = pki.leaf("site", &[ALPHA]);
    let up = Upstream::start("blue");
    let proxy = ProxyBuilder::new(format!(
        "{}{}",
        service("app", &[&up], &[&up], "blue"),
        route(None, "/", "app")
    ))
    .server(server)
    .https(&format!("[tls]\n{}", static_cert("site", &leaf)))
    .start();
    (up, proxy)
}

/// [`one_site_proxy`] with `header_timeout` 1 s.
fn short_deadline_proxy(pki: &Pki) -> (Upstream, Proxy) {
    one_site_proxy(pki, "header_timeout = \"1s\"")
}

/// Reads until the server closes; panics if it is still open after 8 s.
fn assert_closed(conn: &mut TlsConn) {
    conn.sock
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    // Bounded: each read waits at most 8 s, and the server sends little.
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "still open: {e}"
                );
                return;
            }
        }
    }
    panic!("the server kept sending");
}

#[test]
fn a_slow_header_over_tls_is_cut_at_the_header_deadline() {
    let pki = Pki::new();
    let (up, proxy) = short_deadline_proxy(&pki);
    let mut conn = tls_connect(&proxy.https_addr(), ALPHA, h1_config(&pki));
    conn.write_all(b"GET / HTTP/1.1\r\nHost: alp").unwrap();
    conn.flush().unwrap();
    assert_closed(&mut conn);
    assert_eq!(up.hits(), 0);
    assert!(proxy.error_lines().is_empty(), "{}", proxy.stderr_text());
}

#[test]
fn an_http2_client_without_preface_is_cut_at_the_header_deadline() {
    let pki = Pki::new();
    let (_up, proxy) = short_deadline_proxy(&pki);
    // Handshake done, h2 chosen, then nothing: no preface ever comes.
    let config = client_config(pki.roots(), &[b"h2"], rustls::DEFAULT_VERSIONS);
    let mut conn = tls_connect(&proxy.https_addr(), ALPHA, config);
    assert_eq!(conn.conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_closed(&mut conn);
    assert!(proxy.error_lines().is_empty(), "{}", proxy.stderr_text());
}

#[test]
fn an_idle_http2_connection_closes_after_the_keepalive_timeout() {
    let pki = Pki::new();
    let (_up, proxy) = one_site_proxy(&pki, "keepalive_timeout = \"1s\"");
    let rt = runtime();
    rt.block_on(async {
        let config = client_config(pki.roots(), &[b"h2"], rustls::DEFAULT_VERSIONS);
        let tls = tls_async(&proxy.https_addr(), ALPHA, config).await;
        let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let resp = h2_send(&mut send, "https://alpha.test/one").await;
        assert_eq!(h2_body(resp.into_body()).await, "blue");
        // Then nothing: the server ends the connection.
        let ended = tokio::time::timeout(Duration::from_secs(8), conn).await;
        assert!(ended.is_ok(), "HTTP/2 connection still open");
    });
}

#[test]
fn connection_caps_apply_before_the_handshake() {
    let pki = Pki::new();
    let (_up, proxy) = one_site_proxy(&pki, "max_connections_per_client = 1");
    // The harness's readiness probe was a connection too, released once
    // the proxy sees it closed: poll for the first connection.
    let mut first = None;
    let opened = poll_until(FAIL_DEADLINE, || {
        first = try_tls_connect(&proxy.https_addr(), ALPHA, h1_config(&pki)).ok();
        first.is_some()
    });
    assert!(opened, "{}", proxy.stderr_text());
    let mut first = first.unwrap();
    // Over the cap: closed without a handshake (no ServerHello comes).
    let mut second = RawConn::connect(&proxy.https_addr());
    let _ = second.send(&client_hello(&pki));
    assert_eq!(second.wait_closed(IO_TIMEOUT), Some(Vec::new()));
    // The first is served; once it is gone there is room again.
    assert_eq!(exchange(&mut first, &get_request(ALPHA, "/")).status, 200);
    drop(first);
    let served = poll_until(FAIL_DEADLINE, || {
        try_tls_connect(&proxy.https_addr(), ALPHA, h1_config(&pki)).is_ok()
    });
    assert!(served, "a new TLS connection after the first closed");
    assert!(proxy.error_lines().is_empty(), "{}", proxy.stderr_text());
}

#[test]
fn a_bad_certificate_file_stops_the_start_naming_it() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &[ALPHA]);
    let other = pki.leaf("other", &[BETA]);
    // The key of another certificate: a mismatch.
    let bad = Leaf {
        cert: leaf.cert.clone(),
        key: other.key.clone(),
        der: Vec::new(),
    };
    let up = Upstream::start("blue");
    let body = format!(
        "{}{}",
        service("app", &[&up], &[&up], "blue"),
        route(None, "/", "app")
    );
    let mut proxy = ProxyBuilder::new(body)
        .https(&format!("[tls]\n{}", static_cert("site", &bad)))
        .spawn();
    let status = proxy.wait_exit(FAIL_DEADLINE).expect("exits");
    assert!(!status.success());
    let err = proxy.stderr_text();
    assert!(err.contains(other.key.to_str().unwrap()), "{err}");
    assert!(connection_refused(&proxy.https_addr()), "nothing bound");
}

// ---------------------------------------------------------------------------
// switchyard check
// ---------------------------------------------------------------------------

fn check_config(dir: &Path, certs: &[(&str, &Path, &Path)]) -> (PathBuf, String) {
    let state = dir.join("state");
    fs::create_dir_all(&state).unwrap();
    let mut text = format!(
        "[server]\nstate_dir = {}\n\n[listen]\nhttp = \"127.0.0.1:18080\"\nhttps = \"127.0.0.1:18443\"\nadmin = \"127.0.0.1:18081\"\n\n",
        toml_str(state.to_str().unwrap())
    );
    text.push_str(
        "[services.api]\nblue = [\"127.0.0.1:18090\"]\ngreen = [\"127.0.0.1:18091\"]\nactive = \"blue\"\n\n\
         [[routes]]\npath = \"/\"\nservice = \"api\"\n\n",
    );
    for (name, cert, key) in certs {
        text.push_str(&format!(
            "[[tls.certificates]]\nname = {}\ncert = {}\nkey = {}\n\n",
            toml_str(name),
            toml_str(cert.to_str().unwrap()),
            toml_str(key.to_str().unwrap())
        ));
    }
    let path = dir.join("switchyard.toml");
    fs::write(&path, &text).unwrap();
    (path, text)
}

/// 1-based line of the line `key = "value"`.
fn line_with(text: &str, key: &str, value: &Path) -> usize {
    let want = format!("{key} = {}", toml_str(value.to_str().unwrap()));
    text.lines().position(|l| l == want).unwrap() + 1
}

#[test]
fn check_lists_missing_mismatched_and_expired_certificates_at_their_keys() {
    let pki = Pki::new();
    let good = pki.leaf("good", &[ALPHA]);
    let other = pki.leaf("other", &[BETA]);
    let now = time::OffsetDateTime::now_utc();
    let expired = pki.leaf_valid(
        "expired",
        &["old.test"],
        now - time::Duration::days(90),
        now - time::Duration::days(1),
    );
    let missing = pki.dir.path().join("missing.pem");
    let dir = tempfile::tempdir().unwrap();

    // A good one passes.
    let (path, _) = check_config(dir.path(), &[("good", &good.cert, &good.key)]);
    let out = run_check(&path, None);
    assert!(out.status.success(), "{}", describe(&out));

    let (path, text) = check_config(
        dir.path(),
        &[
            ("missing", &missing, &good.key),
            ("mismatch", &good.cert, &other.key),
            ("expired", &expired.cert, &expired.key),
        ],
    );
    let out = run_check(&path, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let at = |line: usize| format!("{}:{line}:", path.display());
    // All three at once, each at the line of the file at fault.
    let missing_line = line_with(&text, "cert", &missing);
    assert!(err.contains(&at(missing_line)), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    let mismatch_line = line_with(&text, "key", &other.key);
    assert!(err.contains(&at(mismatch_line)), "{err}");
    assert!(err.contains("does not match"), "{err}");
    let expired_line = line_with(&text, "cert", &expired.cert);
    assert!(err.contains(&at(expired_line)), "{err}");
    assert!(err.contains("expired"), "{err}");

    // An ACME CA root that is not a certificate, beside the others.
    let bad_root = pki.dir.path().join("not-a-ca.pem");
    fs::write(&bad_root, "hello").unwrap();
    let with_acme = format!(
        "{text}[acme]\nca_root = {}\n",
        toml_str(bad_root.to_str().unwrap())
    );
    fs::write(&path, &with_acme).unwrap();
    let out = run_check(&path, None);
    let err = String::from_utf8_lossy(&out.stderr);
    let root_line = with_acme.lines().count();
    assert!(
        err.contains(&format!("{}:{root_line}:11: ", path.display())),
        "{err}"
    );
    assert!(err.contains("no CERTIFICATE block"), "{err}");
    assert!(err.contains(&at(expired_line)), "{err}");
}

#[test]
fn admin_lists_static_certificates_and_refuses_to_renew_them() {
    let s = site("");
    let p = &s.proxy;
    let (code, v) = p.admin("GET", "/certs", None);
    assert_eq!(code, 200, "{v}");
    let list = v["certificates"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"], "config order");
    let alpha = &list[0];
    assert_eq!(alpha["source"], "static");
    assert_eq!(alpha["domains"], serde_json::json!([ALPHA, "*.wild.test"]));
    assert_eq!(alpha["issuer"], "CN=switchyard test CA");
    assert!(alpha["serial"].as_str().unwrap().len() >= 2);
    assert!(alpha["not_after"].as_str().unwrap().ends_with('Z'));
    assert_eq!(alpha["next_renewal"], serde_json::Value::Null);
    assert_eq!(alpha["bootstrap"], false);

    // A static certificate is replaced by its files, not renewed: 409;
    // an unknown name: 404. Nothing changes.
    let (code, v) = p.admin("POST", "/certs/alpha/renew", None);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("static"), "{v}");
    let (code, _) = p.admin("POST", "/certs/nope/renew", None);
    assert_eq!(code, 404);

    let out = run_ctl(&p.admin_url(), Some(p.token()), &["certs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("alpha (static): alpha.test, *.wild.test"),
        "{text}"
    );
    assert!(
        text.contains("issuer       CN=switchyard test CA"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "serial       {}",
            alpha["serial"].as_str().unwrap()
        )),
        "{text}"
    );
    let out = run_ctl(
        &p.admin_url(),
        Some(p.token()),
        &["certs", "renew", "alpha"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate \"alpha\" is static"), "{err}");
    let out = run_ctl(&p.admin_url(), Some(p.token()), &["--json", "certs"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["certificates"][1]["name"], "beta");
}

#[test]
fn clients_naming_an_ip_address_as_sni_do_not_fill_the_log() {
    let s = site("");
    // OpenSSL clients given https://10.0.0.255/ send the IP address as SNI,
    // which RFC 6066 §3 forbids and rustls warns about per handshake. Make
    // such a ClientHello by writing an IP of the same length over the name.
    assert_eq!(ALPHA.len(), "10.0.0.255".len());
    let mut hello = client_hello(&s.pki);
    let at = hello
        .windows(ALPHA.len())
        .position(|w| w == ALPHA.as_bytes())
        .expect("SNI in the ClientHello");
    hello[at..at + ALPHA.len()].copy_from_slice(b"10.0.0.255");
    for _ in 0..20 {
        let mut conn = RawConn::connect(&s.proxy.https_addr());
        conn.send(&hello).unwrap();
        // The server answers (ServerHello...) before the client gives up.
        let mut first = [0u8; 1];
        conn.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert_eq!(conn.stream().read(&mut first).unwrap(), 1);
        assert_eq!(first[0], 0x16, "a TLS handshake record");
    }
    // The default certificate still serves a client without usable SNI,
    // and none of the 20 handshakes left a line at WARN or above.
    assert_eq!(served_cert(&s.proxy.https_addr(), None), s.beta.der);
    let text = s.proxy.stderr_text();
    let loud: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(loud.is_empty(), "{text}");
}

/// A throwaway EC key encrypted with the passphrase `x` (`openssl genpkey
/// -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -aes-128-cbc`).
const ENCRYPTED_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAhUITgpFN2k0AICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEAQIEEAMkoLiiAZaNLa0waSpFytcEgZBY
Ij6Z6MFN/9IPRl7qR4sPaXY5rgE5bOH6NMJ/FeJPG4iAlg915mTeIOWYsNhIEx8A
2ady3MLz5LEIoLVzU1HYEw/8R1dfZIjN9ue3Z4yXAgGqePmsFm3eH2z7ihkKItw6
fqzaSJAhu4uX6jGb9/YhtOkXHoQwchZebcUnva5CUfIw/AGwgBBh05+oFy2eruc=
-----END ENCRYPTED PRIVATE KEY-----
";

/// Mistakes made when importing files by hand, each named for what it is
/// (not "does not match", "no items found"), at the key of the file; and an
/// ACME `certs_dir` that is a file, caught by `check` rather than at the
/// first issuance in the background.
#[test]
fn check_names_a_reversed_chain_an_encrypted_key_and_a_certs_dir_that_is_a_file() {
    let pki = Pki::new();
    let good = pki.leaf("good", &[ALPHA]);
    // The CA first, then the leaf: the reverse of fullchain.pem.
    let reversed = pki.dir.path().join("reversed.pem");
    let leaf_pem = fs::read_to_string(&good.cert).unwrap();
    fs::write(&reversed, format!("{}{leaf_pem}", pki.ca.pem())).unwrap();
    let encrypted = pki.dir.path().join("encrypted.key");
    fs::write(&encrypted, ENCRYPTED_KEY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, text) = check_config(
        dir.path(),
        &[
            ("reversed", &reversed, &good.key),
            ("encrypted", &good.cert, &encrypted),
            ("swapped", &good.key, &good.cert),
        ],
    );
    let out = run_check(&path, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let at = |line: usize| format!("{}:{line}:", path.display());
    let reversed_line = line_with(&text, "cert", &reversed);
    assert!(err.contains(&at(reversed_line)), "{err}");
    assert!(err.contains("wrong order"), "{err}");
    let encrypted_line = line_with(&text, "key", &encrypted);
    assert!(err.contains(&at(encrypted_line)), "{err}");
    assert!(err.contains("encrypted"), "{err}");
    assert!(!err.contains("no items found"), "{err}");
    assert!(!err.contains("does not match"), "{err}");

    // certs_dir is a file: ACME could never write there.
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "").unwrap();
    let (path, text) = check_config(dir.path(), &[]);
    let with_acme = format!(
        "{text}[tls]\ncerts_dir = {}\n\n[acme]\ndirectory = \"https://127.0.0.1:1/dir\"\n\n\
         [[acme.certificates]]\nname = \"site\"\ndomains = [\"a.test\"]\n",
        toml_str(file.to_str().unwrap())
    );
    fs::write(&path, &with_acme).unwrap();
    let out = run_check(&path, None);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = with_acme
        .lines()
        .position(|l| l.starts_with("certs_dir"))
        .unwrap()
        + 1;
    assert!(err.contains(&at(line)), "{err}");
    assert!(err.contains("not a directory"), "{err}");
    // A certs_dir that does not exist yet is fine: it is created on need.
    let later = with_acme.replace(
        &toml_str(file.to_str().unwrap()),
        &toml_str(dir.path().join("new/certs").to_str().unwrap()),
    );
    fs::write(&path, &later).unwrap();
    let out = run_check(&path, None);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Sends a POST with `body` over HTTP/2 and returns the answer's status.
async fn h2_post(send: &mut h2::client::SendRequest<Bytes>, url: &str, body: &'static [u8]) -> u16 {
    futures_util::future::poll_fn(|cx| send.poll_ready(cx))
        .await
        .expect("h2 ready");
    let req = http::Request::post(url).body(()).unwrap();
    let (resp, mut stream) = send.send_request(req, false).expect("send h2 request");
    stream.send_data(Bytes::from_static(body), true).unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, resp)
        .await
        .expect("h2 response in time")
        .expect("h2 response");
    resp.status().as_u16()
}

#[test]
fn rate_limits_and_body_limits_hold_over_http2() {
    let pki = Pki::new();
    let leaf = pki.leaf("alpha", &[ALPHA]);
    let blue = Upstream::start("blue");
    let body = format!(
        "[rate_limits.writes]\nrate = \"1/m\"\nmethods = [\"POST\"]\n\n{}{}{}",
        service("app", &[&blue], &[&blue], "blue"),
        route_with("/w", "app", "rate_limit = \"writes\""),
        route_with("/small", "app", "max_body = \"10\""),
    );
    let proxy = ProxyBuilder::new(body)
        .https(&static_cert("alpha", &leaf))
        .start();
    let rt = runtime();
    rt.block_on(async {
        let mut send = h2_connect(&pki, &proxy.https_addr(), ALPHA).await;
        // One POST a minute per client: the second on the same HTTP/2
        // connection (or any other) is refused.
        assert_eq!(h2_post(&mut send, "https://alpha.test/w", b"a").await, 200);
        assert_eq!(h2_post(&mut send, "https://alpha.test/w", b"b").await, 429);
        // A body over the route's max_body is refused with 413.
        let big = b"twenty bytes of body";
        assert_eq!(
            h2_post(&mut send, "https://alpha.test/small", big).await,
            413
        );
        assert_eq!(
            h2_post(&mut send, "https://alpha.test/small", b"ok").await,
            200
        );
    });
    assert_eq!(blue.requests_for("/w").len(), 1);
}
