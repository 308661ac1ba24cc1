//! ACME end to end: the real switchyard against Pebble (Let's Encrypt's
//! test CA) on loopback, validating HTTP-01 on switchyard's own plain
//! listener; and the renewal-information path (RFC 9773), which Debian's
//! Pebble lacks, against a stub directory served here.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::pebble::{self, Pebble};
use common::tls::*;
use common::*;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

/// How long an issuance may take on a busy machine (30 s); Pebble without
/// validation sleeps needs about a second.
const ISSUE_DEADLINE: Duration = Duration::from_secs(30);

const DOMAIN: &str = "a.switchyard.test";

/// `[tls]` keeping certificates and the account in `dir`.
fn tls_table(dir: &Path) -> String {
    format!("[tls]\ncerts_dir = {}\n", toml_str(dir.to_str().unwrap()))
}

/// A proxy in front of one upstream, with ACME certificate `site` for
/// [`DOMAIN`] from `pebble`.
fn proxy(pebble: &Pebble, http_port: u16, certs: &Path, up: &Upstream) -> Proxy {
    proxy_with(pebble, http_port, certs, up, &[("site", &[DOMAIN])])
}

fn proxy_with(
    pebble: &Pebble,
    http_port: u16,
    certs: &Path,
    up: &Upstream,
    acme: &[(&str, &[&str])],
) -> Proxy {
    ProxyBuilder::new(format!(
        "{}{}{}",
        service("app", &[up], &[up], "blue"),
        route_with("/ws", "app", "websocket = true"),
        route(None, "/", "app")
    ))
    .http_port(http_port)
    .https(&format!(
        "{}\n{}",
        tls_table(certs),
        pebble.acme_tables(acme)
    ))
    .start()
}

/// `GET /certs` entry of certificate `name`.
fn cert(p: &Proxy, name: &str) -> Value {
    let (code, v) = p.admin("GET", "/certs", None);
    assert_eq!(code, 200, "GET /certs: {v}");
    v["certificates"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no certificate {name} in {v}"))
}

/// Polls `GET /certs` until `ok` holds for `name`; panics with the last.
fn wait_cert(p: &Proxy, name: &str, deadline: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let done = poll_until(deadline, || {
        last = cert(p, name);
        ok(&last)
    });
    assert!(
        done,
        "certificate {name} not as expected within {deadline:?}: {last}"
    );
    last
}

/// A client that accepts any certificate: to look at the bootstrap one.
fn any_cert_config() -> Arc<rustls::ClientConfig> {
    Arc::new(Recorder::config(Arc::default()))
}

/// The leaf's facts as the client saw them.
fn peer(tls: &TlsConn) -> switchyard::tls::certs::CertInfo {
    let chain = tls
        .conn
        .peer_certificates()
        .expect("server sent certificates");
    switchyard::tls::certs::describe(&chain[0]).unwrap()
}

/// A verified handshake's serial, or why it failed.
fn verified_serial(p: &Proxy, root: &str) -> Result<String, String> {
    try_tls_connect(
        &p.https_addr(),
        DOMAIN,
        pebble::client_config(root, &[b"http/1.1"]),
    )
    .map(|t| peer(&t).serial)
}

/// One HTTP/1.1 keep-alive request on `tls`: status and body.
fn request_over(tls: &mut TlsConn, path: &str) -> (u16, String) {
    let a = exchange(tls, &get_request(DOMAIN, path));
    (a.status, a.body)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// First issuance: the self-signed stand-in is served while the CA is
/// down (and the failure logged and retried), the real certificate once
/// Pebble is up; it chains to Pebble's root for the domain, files and the
/// account are stored with the right modes, and a restart with them on
/// disk orders nothing and creates no account.
#[test]
fn issuance_replaces_the_bootstrap_and_a_restart_issues_nothing() {
    let up = Upstream::start("app");
    let http_port = free_port();
    let mut pebble = Pebble::prepare(http_port);
    let certs = tempfile::tempdir().unwrap();
    let mut p = proxy(&pebble, http_port, certs.path(), &up);

    // The CA is down: the stand-in serves, failures are recorded and retried.
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(2)
    });
    assert_eq!(st["bootstrap"], true, "{st}");
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("new account") && err.contains("Connection refused"),
        "{st}"
    );
    let boot = try_tls_connect(&p.https_addr(), DOMAIN, any_cert_config()).unwrap();
    assert_eq!(peer(&boot).issuer, switchyard::tls::certs::BOOTSTRAP_ISSUER);
    let log = p.stderr_text();
    assert!(
        log.contains("SELF-SIGNED"),
        "loud bootstrap warning:\n{log}"
    );
    assert!(log.contains("certificate issuance failed"), "{log}");

    // The CA comes up: issued within the retry schedule (1 s, 2 s, 4 s...).
    pebble.launch();
    let root = pebble.issuing_root();
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["bootstrap"] == false);
    assert_eq!(st["failures"], 0, "{st}");
    assert!(st["issuer"].as_str().unwrap().contains("Pebble"), "{st}");
    assert!(st["next_renewal"].is_string(), "{st}");
    let serial = verified_serial(&p, &root).expect("chain verifies against Pebble's root");
    assert_eq!(st["serial"], serial.as_str());
    let t = try_tls_connect(&p.https_addr(), DOMAIN, pebble::client_config(&root, &[])).unwrap();
    assert!(peer(&t).names.contains(&DOMAIN.to_string()));
    // The stand-in was only ever self-signed: it does not verify.
    assert!(boot.conn.peer_certificates().is_some());

    let (pem, key) = switchyard::tls::certs::acme_paths(certs.path(), "site");
    let account = certs.path().join(switchyard::tls::acme::ACCOUNT_FILE);
    assert_eq!(
        (mode(&pem), mode(&key), mode(&account)),
        (0o644, 0o600, 0o600)
    );
    let account_json = std::fs::read_to_string(&account).unwrap();
    let secret: Value = serde_json::from_str(&account_json).unwrap();
    let secret = secret["key_pkcs8"].as_str().unwrap();
    assert!(!p.stderr_text().contains(secret), "account key logged");
    assert_eq!(p.stderr_text().matches("ACME account created").count(), 1);
    let orders = pebble.orders();
    assert_eq!(orders, 1, "one order:\n{}", pebble.log());

    // Restart: the files on disk serve at once; no order, no account.
    // SIGTERM: the renewal service stops with the rest (its task sleeps
    // for years otherwise).
    p.sigterm();
    assert!(
        p.wait_exit(FAIL_DEADLINE).is_some(),
        "switchyard did not stop on SIGTERM:\n{}",
        p.stderr_text()
    );
    p.restart();
    let st = cert(&p, "site");
    assert_eq!(
        (st["bootstrap"].clone(), st["serial"].clone()),
        (Value::Bool(false), Value::String(serial.clone()))
    );
    assert_eq!(verified_serial(&p, &root), Ok(serial));
    // The renewal task has looked at the schedule and found nothing due.
    assert!(
        poll_until(FAIL_DEADLINE, || p
            .stderr_text()
            .contains("renewal scheduled")),
        "{}",
        p.stderr_text()
    );
    assert_eq!(pebble.orders(), orders, "no new order after restart");
    assert!(!p.stderr_text().contains("ACME account created"));
    assert_eq!(std::fs::read_to_string(&account).unwrap(), account_json);
}

/// A domain added to a certificate whose valid files are on disk: the files
/// keep serving the names they have (never the self-signed stand-in), and a
/// certificate for all the domains is ordered at once, retried while the CA
/// is down.
#[test]
fn an_added_domain_keeps_the_files_serving_and_orders_at_once() {
    let up = Upstream::start("app");
    let http_port = free_port();
    let mut pebble = Pebble::prepare(http_port);
    let certs = tempfile::tempdir().unwrap();
    let old = pebble::pki(&[DOMAIN], 89);
    let old_serial = switchyard::tls::certs::describe(&CertificateDer::from(old.leaf_der.clone()))
        .unwrap()
        .serial;
    let (pem, key) = switchyard::tls::certs::acme_paths(certs.path(), "site");
    std::fs::write(pem, &old.chain_pem).unwrap();
    std::fs::write(key, &old.key_pem).unwrap();
    const ADDED: &str = "b.switchyard.test";
    let p = proxy_with(
        &pebble,
        http_port,
        certs.path(),
        &up,
        &[("site", &[DOMAIN, ADDED])],
    );

    let st = cert(&p, "site");
    assert_eq!(st["bootstrap"], false, "{st}");
    assert_eq!(st["serial"], old_serial.as_str(), "{st}");
    let t = try_tls_connect(
        &p.https_addr(),
        DOMAIN,
        pebble::client_config(&old.ca_pem, &[]),
    );
    assert_eq!(t.map(|t| peer(&t).serial), Ok(old_serial.clone()));
    // Ordered at once; the CA is down, so it fails and is retried.
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(1)
    });
    assert_eq!(st["serial"], old_serial.as_str(), "still served: {st}");
    assert!(
        !p.stderr_text().contains("SELF-SIGNED"),
        "{}",
        p.stderr_text()
    );

    pebble.launch();
    let root = pebble.issuing_root();
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["failures"] == 0);
    assert_ne!(st["serial"], old_serial.as_str(), "{st}");
    for name in [DOMAIN, ADDED] {
        let t = try_tls_connect(&p.https_addr(), name, pebble::client_config(&root, &[]));
        assert!(t.is_ok(), "{name}: {:?}", t.err());
    }
}

/// A forced renewal: new handshakes get the new serial at once, while an
/// HTTP/1.1 keep-alive connection and an HTTP/2 one (ALPN h2) opened
/// before keep answering.
#[test]
fn forced_renewal_swaps_new_handshakes_and_keeps_open_connections() {
    let up = Upstream::start("app");
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let certs = tempfile::tempdir().unwrap();
    let p = proxy(&pebble, http_port, certs.path(), &up);
    let root = pebble.issuing_root();
    let first = wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["bootstrap"] == false)["serial"]
        .as_str()
        .unwrap()
        .to_string();

    let mut h1 = try_tls_connect(
        &p.https_addr(),
        DOMAIN,
        pebble::client_config(&root, &[b"http/1.1"]),
    )
    .unwrap();
    assert_eq!(request_over(&mut h1, "/one"), (200, "app".to_string()));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut h2 = rt.block_on(H2::connect(&p.https_addr(), &root));
    assert_eq!(rt.block_on(h2.get("/h2-one")), (200, "app".to_string()));
    // An SSE stream over HTTP/2, its first event in, the second held back
    // by the upstream until after the swap; and a WebSocket over TLS.
    let mut events = rt.block_on(h2.stream("/events?sse=2&gated=1"));
    let first_event = rt.block_on(read_until(&mut events, "data: app-1\n\n"));
    assert!(first_event, "first SSE event before the swap");
    let mut ws = rt.block_on(ws_connect_tls(&p.https_addr(), &root));
    assert_eq!(rt.block_on(ws_echo_tls(&mut ws, "before")), "app:before");

    // Through `ctl certs renew`, as an operator would.
    let out = run_ctl(&p.admin_url(), Some(p.token()), &["certs", "renew", "site"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site: renewal requested"),
        "{}",
        describe(&out)
    );
    let mut now = String::new();
    assert!(
        poll_until(ISSUE_DEADLINE, || {
            now = verified_serial(&p, &root).unwrap_or_default();
            !now.is_empty() && now != first
        }),
        "new handshakes never saw a new serial (still {first})"
    );
    assert_eq!(cert(&p, "site")["serial"], now.as_str());
    assert_eq!(
        peer(&h1).serial,
        first,
        "the open connection keeps its certificate"
    );
    assert_eq!(request_over(&mut h1, "/two"), (200, "app".to_string()));
    assert_eq!(rt.block_on(h2.get("/h2-two")), (200, "app".to_string()));
    // The stream and the socket opened before the swap go on.
    up.release(1);
    let second_event = rt.block_on(read_until(&mut events, "data: app-2\n\n"));
    assert!(second_event, "the SSE stream survives the swap");
    assert_eq!(rt.block_on(ws_echo_tls(&mut ws, "after")), "app:after");
    assert_eq!(pebble.orders(), 2);
}

type WsTls =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket over TLS (HTTP/1.1: no WebSocket over h2), trusting `root`.
async fn ws_connect_tls(addr: &str, root: &str) -> WsTls {
    let config = pebble::client_config(root, &[b"http/1.1"]);
    let tls = tls_async(addr, DOMAIN, config).await;
    let (ws, resp) = tokio_tungstenite::client_async(format!("wss://{DOMAIN}/ws"), tls)
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and returns the upstream's echo.
async fn ws_echo_tls(ws: &mut WsTls, text: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("socket open")
        .unwrap();
    reply.into_text().unwrap().to_string()
}

/// Reads `body` until it has delivered `want` (true), or 5 s pass (false).
async fn read_until(body: &mut h2::RecvStream, want: &str) -> bool {
    let mut got = String::new();
    let read = async {
        while !got.contains(want) {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    got.push_str(&String::from_utf8_lossy(&chunk));
                }
                _ => return false,
            }
        }
        true
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or(false)
}

/// An HTTP/2 client connection over TLS (ALPN h2) with Pebble's root.
struct H2 {
    send: h2::client::SendRequest<bytes::Bytes>,
}

impl H2 {
    async fn connect(addr: &str, root: &str) -> H2 {
        let config = pebble::client_config(root, &[b"h2"]);
        H2 {
            send: h2_handshake(addr, DOMAIN, config).await,
        }
    }

    /// Starts a GET and returns its answer's body as it streams.
    async fn stream(&mut self, path: &str) -> h2::RecvStream {
        let req = http::Request::get(format!("https://{DOMAIN}{path}"))
            .body(())
            .unwrap();
        let send = self.send.clone().ready().await.expect("h2 ready");
        self.send = send;
        let (rsp, _) = self.send.send_request(req, true).unwrap();
        let rsp = tokio::time::timeout(Duration::from_secs(5), rsp)
            .await
            .expect("h2 answer in time")
            .unwrap();
        assert_eq!(rsp.status(), 200);
        rsp.into_body()
    }

    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = http::Request::get(format!("https://{DOMAIN}{path}"))
            .body(())
            .unwrap();
        let send = self.send.clone().ready().await.expect("h2 ready");
        self.send = send;
        let (rsp, _) = self.send.send_request(req, true).unwrap();
        let rsp = tokio::time::timeout(Duration::from_secs(5), rsp)
            .await
            .expect("h2 answer in time")
            .unwrap();
        let status = rsp.status().as_u16();
        let mut body = rsp.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        (status, String::from_utf8_lossy(&out).into_owned())
    }
}

/// The CA goes away: a renewal fails, the failure is visible and logged,
/// it is retried on its own, the issued certificate keeps serving; when
/// the CA is back (a fresh Pebble that has forgotten the account), the
/// retry succeeds.
#[test]
fn ca_down_keeps_serving_and_retries_until_it_is_back() {
    let up = Upstream::start("app");
    let http_port = free_port();
    let mut pebble = Pebble::start(http_port);
    let certs = tempfile::tempdir().unwrap();
    let p = proxy(&pebble, http_port, certs.path(), &up);
    let root = pebble.issuing_root();
    let first = wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["bootstrap"] == false)["serial"]
        .as_str()
        .unwrap()
        .to_string();

    pebble.stop();
    let (code, v) = p.admin("POST", "/certs/site/renew", None);
    assert_eq!(code, 200, "{v}");
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(2)
    });
    assert!(
        st["last_error"].as_str().unwrap().contains("new order"),
        "{st}"
    );
    assert!(st["next_renewal"].is_string(), "{st}");
    assert_eq!(st["serial"], first.as_str());
    assert_eq!(
        verified_serial(&p, &root),
        Ok(first.clone()),
        "still served"
    );
    assert!(
        p.stderr_text().contains("certificate renewal failed"),
        "{}",
        p.stderr_text()
    );

    pebble.launch();
    let root = pebble.issuing_root();
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["failures"] == 0);
    assert_ne!(st["serial"], first.as_str());
    assert!(st["last_error"].is_null(), "{st}");
    assert!(st["failures_total"].as_u64() >= Some(2), "{st}");
    assert_eq!(
        verified_serial(&p, &root).unwrap(),
        st["serial"].as_str().unwrap()
    );
}

/// A domain the CA cannot validate (its name points at an address where
/// switchyard does not listen): the CA's problem is reported in one line
/// and in `GET /certs`, the stand-in keeps serving, and the attempt is
/// retried later; the certificate beside it is issued regardless.
#[test]
fn a_failed_validation_is_reported_and_retried() {
    const BAD: &str = "bad.switchyard.test";
    let up = Upstream::start("app");
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    pebble.set_address(BAD, "127.0.0.2");
    let certs = tempfile::tempdir().unwrap();
    let p = proxy_with(
        &pebble,
        http_port,
        certs.path(),
        &up,
        &[("site", &[DOMAIN]), ("bad", &[BAD])],
    );
    let st = wait_cert(&p, "bad", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(2)
    });
    assert_eq!(st["bootstrap"], true, "{st}");
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains(BAD) && err.contains("127.0.0.2"), "{st}");
    let log = p.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("certificate issuance failed") && l.contains("\"bad\""))
        .unwrap_or_else(|| panic!("no failure line:\n{log}"));
    assert!(line.contains("ERROR") && line.contains(BAD), "{line}");
    wait_cert(&p, "site", ISSUE_DEADLINE, |c| c["bootstrap"] == false);
}

// ---------------------------------------------------------------------------
// Renewal information (RFC 9773) against a stub directory
// ---------------------------------------------------------------------------

/// What the stub directory saw and answers.
#[derive(Default)]
struct StubState {
    /// The suggested window, RFC 3339.
    window: (String, String),
    /// Certificate identifiers asked about.
    renewal_info: Vec<String>,
    /// Payloads of new-order requests (decoded JSON).
    orders: Vec<Value>,
    accounts: usize,
    /// Refuse orders naming the certificate they replace as Let's Encrypt
    /// does for one another account ordered (certbot's, after a migration).
    refuse_replaces: bool,
}

/// A tiny HTTPS ACME directory with ARI: accounts are accepted, renewal
/// information answers the configured window with `Retry-After: 3600`,
/// and every new order is refused as rate-limited.
struct Stub {
    state: Arc<Mutex<StubState>>,
    port: u16,
    ca_root: tempfile::NamedTempFile,
    _rt: tokio::runtime::Runtime,
}

fn base64url(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => continue,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

impl Stub {
    fn start(window: (SystemTime, SystemTime)) -> Stub {
        let port = free_port();
        let pki = pebble::pki(&["127.0.0.1"], 30);
        let ca_root = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_root.path(), &pki.ca_pem).unwrap();
        let state = Arc::new(Mutex::new(StubState {
            window: (
                humantime::format_rfc3339_seconds(window.0).to_string(),
                humantime::format_rfc3339_seconds(window.1).to_string(),
            ),
            ..StubState::default()
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let server = {
            use rustls_pki_types::pem::PemObject;
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pki.chain_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key =
                rustls_pki_types::PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap()
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(stub_answer(port, &st, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Stub {
            state,
            port,
            ca_root,
            _rt: rt,
        }
    }

    fn tables(&self) -> String {
        format!(
            "[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\nca_root = {}\nretry_backoff = \"1s\"\n\n\
             [[acme.certificates]]\nname = \"site\"\ndomains = [\"ari.switchyard.test\"]\n",
            self.port,
            toml_str(self.ca_root.path().to_str().unwrap())
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StubState> {
        self.state.lock().unwrap()
    }
}

async fn stub_answer(
    port: u16,
    state: &Mutex<StubState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let base = format!("https://127.0.0.1:{port}");
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let payload = || -> Value {
        let jws: Value = serde_json::from_slice(&body).unwrap_or_default();
        serde_json::from_slice(&base64url(jws["payload"].as_str().unwrap_or("")))
            .unwrap_or_default()
    };
    let rsp = hyper::Response::builder().header("Replay-Nonce", format!("n{}", rand_nonce()));
    let (rsp, text) = match path.as_str() {
        "/dir" => (
            rsp,
            serde_json::json!({
                "newNonce": format!("{base}/nonce"),
                "newAccount": format!("{base}/account"),
                "newOrder": format!("{base}/order"),
                "renewalInfo": format!("{base}/renewal-info"),
            })
            .to_string(),
        ),
        "/nonce" => (rsp, String::new()),
        "/account" => {
            state.lock().unwrap().accounts += 1;
            (
                rsp.status(201)
                    .header("Location", format!("{base}/account/1")),
                r#"{"status":"valid"}"#.to_string(),
            )
        }
        "/order" => {
            let order = payload();
            let mut st = state.lock().unwrap();
            st.orders.push(order.clone());
            if st.refuse_replaces && order.get("replaces").is_some() {
                return rsp
                    .status(403)
                    .header("Content-Type", "application/problem+json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        r#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"requester account did not request the certificate being replaced by this order","status":403}"#,
                    )))
                    .unwrap();
            }
            (
                rsp.status(429).header("Content-Type", "application/problem+json"),
                r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"stub: too many certificates","status":429}"#.to_string(),
            )
        }
        p if p.starts_with("/renewal-info/") => {
            let mut st = state.lock().unwrap();
            st.renewal_info
                .push(p["/renewal-info/".len()..].to_string());
            let (start, end) = st.window.clone();
            (
                rsp.header("Retry-After", "3600"),
                serde_json::json!({ "suggestedWindow": { "start": start, "end": end } })
                    .to_string(),
            )
        }
        _ => (rsp.status(404), String::new()),
    };
    rsp.body(http_body_util::Full::new(bytes::Bytes::from(text)))
        .unwrap()
}

fn rand_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Writes a 90-day certificate for the stub's domain as `site`, and
/// returns its RFC 9773 identifier.
fn certificate_on_disk(dir: &Path) -> String {
    let pki = pebble::pki(&["ari.switchyard.test"], 89);
    let (pem, key) = switchyard::tls::certs::acme_paths(dir, "site");
    std::fs::write(pem, &pki.chain_pem).unwrap();
    std::fs::write(key, &pki.key_pem).unwrap();
    let der = CertificateDer::from(pki.leaf_der);
    instant_acme::CertificateIdentifier::try_from(&der)
        .unwrap()
        .to_string()
}

fn stub_proxy(stub: &Stub, certs: &Path, up: &Upstream) -> Proxy {
    ProxyBuilder::new(format!(
        "{}{}",
        service("app", &[up], &[up], "blue"),
        route(None, "/", "app")
    ))
    .https(&format!("{}\n{}", tls_table(certs), stub.tables()))
    .start()
}

fn parse_time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().expect("a time")).unwrap()
}

/// A window in the future decides the schedule: the next renewal is a
/// moment inside it (not the one-third point, 60 days out), asked about
/// with the certificate's identifier, and nothing is ordered.
#[test]
fn renewal_is_scheduled_inside_the_cas_window() {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let (start, end) = (now + 10 * day, now + 11 * day);
    let stub = Stub::start((start, end));
    let certs = tempfile::tempdir().unwrap();
    let id = certificate_on_disk(certs.path());
    let up = Upstream::start("app");
    let p = stub_proxy(&stub, certs.path(), &up);
    let st = wait_cert(&p, "site", FAIL_DEADLINE, |c| c["next_renewal"].is_string());
    let next = parse_time(&st["next_renewal"]);
    // RFC 3339 seconds: allow the rounding.
    assert!(
        next + Duration::from_secs(1) >= start && next <= end,
        "{st}"
    );
    assert_eq!(st["bootstrap"], false);
    let s = stub.state();
    assert_eq!(s.renewal_info, vec![id]);
    assert_eq!((s.accounts, s.orders.len()), (1, 0));
}

/// A window already open renews at once, naming the certificate it
/// replaces (RFC 9773 §5); the CA's refusal is logged with its problem
/// detail and retried with backoff while the certificate on disk serves.
#[test]
fn an_open_window_renews_now_and_a_refusal_is_retried() {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let stub = Stub::start((now - 2 * hour, now - hour));
    let certs = tempfile::tempdir().unwrap();
    let id = certificate_on_disk(certs.path());
    let up = Upstream::start("app");
    let p = stub_proxy(&stub, certs.path(), &up);
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(2)
    });
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("rateLimited") && err.contains("stub: too many certificates"),
        "{st}"
    );
    assert_eq!(
        st["bootstrap"], false,
        "the certificate on disk keeps serving"
    );
    let log = p.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("certificate renewal failed"))
        .unwrap_or_else(|| panic!("no failure line:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("rateLimited"),
        "{line}"
    );
    let s = stub.state();
    assert!(s.orders.len() >= 2, "retried");
    assert_eq!(s.orders[0]["replaces"], id.as_str(), "{:?}", s.orders[0]);
    assert_eq!(
        s.orders[0]["identifiers"][0]["value"],
        "ari.switchyard.test"
    );
    assert_eq!(s.accounts, 1, "one account for all attempts");
}

/// The certificate on disk was ordered by another account (certbot's, as
/// in the README's migration): the CA refuses an order that names it in
/// `replaces`, and the renewal goes on with a plain order at once instead
/// of repeating the refused one until the certificate expires.
#[test]
fn a_refused_replaces_falls_back_to_a_plain_order() {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let stub = Stub::start((now - 2 * hour, now - hour));
    stub.state().refuse_replaces = true;
    let certs = tempfile::tempdir().unwrap();
    let id = certificate_on_disk(certs.path());
    let up = Upstream::start("app");
    let p = stub_proxy(&stub, certs.path(), &up);
    let st = wait_cert(&p, "site", ISSUE_DEADLINE, |c| {
        c["failures"].as_u64() >= Some(1)
    });
    // The attempt got as far as the plain order (the stub rate-limits it).
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("rateLimited"), "{st}");
    let s = stub.state();
    assert!(s.orders.len() >= 2, "{:?}", s.orders);
    assert_eq!(s.orders[0]["replaces"], id.as_str(), "{:?}", s.orders[0]);
    assert!(s.orders[1].get("replaces").is_none(), "{:?}", s.orders[1]);
}
