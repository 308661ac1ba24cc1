//! The HTTPS scenarios' pieces: one certificate for every proxy, the
//! OpenSSL config that pins wrk to TLS 1.3, h2load runs read into the same
//! figures as wrk's, and a rustls probe that tells whether a server resumes
//! TLS 1.3 sessions.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procs;
use crate::wrk::WrkOut;

/// The name the certificate is for, sent by every client as SNI and as the
/// host. A name, not 127.0.0.1: wrk takes its SNI from the URL, and an IP
/// address as SNI is not allowed (RFC 6066 §3), so servers would ignore it
/// (rustls logs a warning per handshake) and take their no-SNI path.
/// `localhost` resolves to loopback without any setup (wrk tries every
/// address it resolves to, so `::1` first is harmless).
pub const TLS_HOST: &str = "localhost";
/// The one TLS 1.3 cipher suite every client offers, so every server uses
/// the same one (browsers list it first too).
pub const CIPHER: &str = "TLS_AES_128_GCM_SHA256";

/// The run's certificate: ECDSA P-256, self-signed for [`TLS_HOST`] and
/// 127.0.0.1, generated once per run and served by every proxy.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub bundle: PathBuf,
    /// An OpenSSL config whose system default is TLS 1.3 only with
    /// [`CIPHER`]: given to wrk as `OPENSSL_CONF` (wrk has no TLS options).
    pub openssl_conf: PathBuf,
    /// The certificate (DER), trusted by the resumption probe.
    der: Vec<u8>,
}

pub fn write_files(dir: &Path) -> Result<Files, String> {
    let dir = dir.join("tls");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ck = rcgen::generate_simple_self_signed(vec![TLS_HOST.to_string(), "127.0.0.1".into()])
        .map_err(|e| format!("generating the certificate: {e}"))?;
    let (cert_pem, key_pem) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let write = |name: &str, text: &str, mode: u32| -> Result<PathBuf, String> {
        let p = dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    // OpenSSL reads `system_default` for every SSL_CTX a program makes, so
    // it binds wrk; h2load sets its own minimum (TLS 1.2) over it, so its
    // runs check the protocol it reports instead (see `h2load`).
    let conf = format!(
        "openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
MaxProtocol = TLSv1.3
Ciphersuites = {CIPHER}
"
    );
    Ok(Files {
        cert: write("cert.pem", &cert_pem, 0o644)?,
        key: write("key.pem", &key_pem, 0o600)?,
        bundle: write("bundle.pem", &format!("{cert_pem}{key_pem}"), 0o600)?,
        openssl_conf: write("openssl-tls13.cnf", &conf, 0o644)?,
        der: ck.cert.der().to_vec(),
    })
}

/// How h2load loads the proxy.
#[derive(Clone, Copy)]
pub enum H2Mode {
    /// `clients` connections kept open for `secs`, `streams` requests in
    /// flight on each.
    KeepAlive {
        clients: u32,
        streams: u32,
        secs: u32,
    },
    /// A new connection (full handshake, one request, close) every
    /// 1/`per_sec` s for `secs`.
    NewConnections { per_sec: u32, secs: u32 },
    /// A check before the measurements: a few requests on one connection.
    Probe,
}

/// h2load's own period for [`H2Mode::NewConnections`]: clients are started
/// in batches every 10 ms, so arrivals are near-even rather than once a second.
const RATE_PERIOD_MS: u32 = 10;

pub struct H2Load<'a> {
    pub h2load: &'a Path,
    pub port: u16,
    pub path: &'a str,
    pub mode: H2Mode,
    /// `--h1`: HTTP/1.1 over TLS (used only for the pre-run probe).
    pub h1: bool,
    pub log: &'a Path,
}

/// Runs h2load over TLS against 127.0.0.1:`port` with SNI and `:authority`
/// [`TLS_HOST`]; fails unless TLS 1.3 with [`CIPHER`] and the expected
/// application protocol were negotiated. Latency is h2load's per-request
/// time (request sent → response complete, without connect and handshake,
/// as wrk's), from its `--log-file`.
pub fn h2load(run: &H2Load) -> Result<WrkOut, String> {
    let _ = fs::remove_file(run.log);
    let mut cmd = Command::new(run.h2load);
    cmd.arg("-t1")
        .arg(format!("--tls13-ciphers={CIPHER}"))
        .arg(format!("--connect-to=127.0.0.1:{}", run.port))
        .arg(format!("--log-file={}", run.log.display()));
    let secs = match run.mode {
        H2Mode::KeepAlive {
            clients,
            streams,
            secs,
        } => {
            cmd.arg(format!("-c{clients}"))
                .arg(format!("-m{streams}"))
                .arg(format!("-D{secs}"));
            secs
        }
        H2Mode::NewConnections { per_sec, secs } => {
            let per_period = (per_sec * RATE_PERIOD_MS / 1000).max(1);
            let total = per_period * (1000 / RATE_PERIOD_MS) * secs;
            cmd.arg(format!("-r{per_period}"))
                .arg(format!("--rate-period={RATE_PERIOD_MS}ms"))
                .arg(format!("-c{total}"))
                .arg(format!("-n{total}"))
                .arg("-m1");
            secs
        }
        H2Mode::Probe => {
            cmd.args(["-c1", "-n4", "-m1"]);
            5
        }
    };
    if run.h1 {
        cmd.arg("--h1");
    }
    let url = format!("https://{TLS_HOST}{}", run.path);
    cmd.arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(cmd, "h2load", Duration::from_secs(u64::from(secs) + 30))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let fail = |why: String| {
        format!(
            "h2load against 127.0.0.1:{} {why} ({}):\n{}\n{}",
            run.port,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let protocol = field("TLS Protocol:");
    let cipher = field("Cipher:");
    let alpn = field("Application protocol:");
    if protocol.is_none() {
        return Err(format!(
            "no TLS handshake completed with 127.0.0.1:{} (h2load: {})",
            run.port,
            field("requests:").unwrap_or_else(|| out.status.to_string())
        ));
    }
    if protocol.as_deref() != Some("TLSv1.3") {
        return Err(fail(format!("negotiated {protocol:?}, not TLSv1.3")));
    }
    if cipher.as_deref() != Some(CIPHER) {
        return Err(fail(format!("negotiated {cipher:?}, not {CIPHER}")));
    }
    let want_alpn = if run.h1 { "http/1.1" } else { "h2" };
    if alpn.as_deref() != Some(want_alpn) {
        return Err(fail(format!("negotiated {alpn:?}, not {want_alpn}")));
    }
    let finished = field("finished in")
        .and_then(|v| parse_duration(v.split(',').next()?.trim()))
        .ok_or_else(|| fail("printed no `finished in`".into()))?;
    // start µs, status (-1: failed stream), µs until the response ended.
    let log = fs::read_to_string(run.log).map_err(|e| format!("{}: {e}", run.log.display()))?;
    let mut lat_us = Vec::new();
    let (mut failed, mut non2xx) = (0u64, 0u64);
    for line in log.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let (Some(status), Some(us)) = (
            cols.get(1).and_then(|s| s.parse::<i32>().ok()),
            cols.get(2).and_then(|s| s.parse::<f64>().ok()),
        ) else {
            continue;
        };
        if status < 0 {
            failed += 1;
            continue;
        }
        if !(200..400).contains(&status) {
            non2xx += 1;
        }
        lat_us.push(us);
    }
    // `started` minus `done` are streams still in flight when a -D run
    // ends: not errors.
    let requests_line = field("requests:").unwrap_or_default();
    let count = |word: &str| -> u64 {
        requests_line
            .split(',')
            .find_map(|p| p.trim().strip_suffix(word)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let (errored, timeout) = (count("errored"), count("timeout"));
    lat_us.sort_by(f64::total_cmp);
    let pct = |q: f64| crate::percentile(&lat_us, q) / 1e3;
    let requests = lat_us.len() as u64;
    let secs = finished.as_secs_f64();
    Ok(WrkOut {
        requests,
        secs,
        rps: crate::wrk::rate(requests, secs),
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        max_ms: lat_us.last().copied().unwrap_or(0.0) / 1e3,
        socket_errors: failed.max(errored + timeout),
        non2xx,
        raw: json!({
            "tool": "h2load",
            "tls_protocol": protocol,
            "cipher": cipher,
            "server_temp_key": field("Server Temp Key:"),
            "application_protocol": alpn,
            "requests": requests_line,
            "time_for_connect": field("time for connect:"),
            "time_to_1st_byte": field("time to 1st byte:"),
        }),
    })
}

/// The mean (third column) of the figures h2load prints after a statistics
/// label such as `time to 1st byte:` (`2.78ms 121.42ms 44.64ms 27.86ms
/// 58.35%`: min, max, mean, sd, +/- sd), in ms.
pub fn mean_ms(line: &serde_json::Value) -> Option<f64> {
    let mean = line.as_str()?.split_whitespace().nth(2)?;
    Some(parse_duration(mean)?.as_secs_f64() * 1e3)
}

/// `998.64ms`, `2.00s`, `750us` as h2load prints them.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    Some(Duration::from_secs_f64(
        num.trim().parse::<f64>().ok()? * scale,
    ))
}

/// Spawns `cmd` and collects its output, killing it after `limit`.
fn wait_output(
    mut cmd: Command,
    name: &str,
    limit: Duration,
) -> Result<std::process::Output, String> {
    procs::set_death_signal(&mut cmd, libc::SIGKILL);
    let mut child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name} did not finish within {limit:?}"));
            }
            Err(e) => return Err(format!("waiting for {name}: {e}")),
        }
    }
    child
        .wait_with_output()
        .map_err(|e| format!("reading {name}'s output: {e}"))
}

/// Checks that the `OPENSSL_CONF` pin binds wrk: against `tls12_only` (a
/// server that offers TLS 1.2 alone) wrk must complete no request at all.
pub fn check_wrk_pin(
    wrk: &Path,
    script: &Path,
    files: &Files,
    tls12_only: u16,
) -> Result<(), String> {
    let url = format!("https://127.0.0.1:{tls12_only}/");
    let out = crate::wrk::run(
        wrk,
        script,
        &crate::wrk::Load {
            url: &url,
            secs: 1,
            threads: 1,
            connections: 1,
            headers: &[],
            openssl_conf: Some(&files.openssl_conf),
        },
    )?;
    if out.requests > 0 || out.socket_errors == 0 {
        return Err(format!(
            "wrk completed {} requests with a TLS 1.2-only server although OPENSSL_CONF \
             pins it to TLS 1.3: the pin does not hold, so the TLS 1.3 figures would be wrong",
            out.requests
        ));
    }
    Ok(())
}

/// Whether `addr` resumes TLS 1.3 sessions: two HTTPS requests on two
/// connections by one rustls client (TLS 1.3 only, [`CIPHER`]); true when
/// the second handshake was a resumption. wrk offers the previous session
/// on every reconnect, so this says what its `Connection: close` runs cost.
pub fn resumes(files: &Files, addr: SocketAddr) -> Result<bool, String> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let provider = rustls::crypto::ring::default_provider();
    let suite = provider
        .cipher_suites
        .iter()
        .copied()
        .find(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        .ok_or("rustls has no TLS_AES_128_GCM_SHA256")?;
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..provider
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(files.der.clone()))
        .map_err(|e| format!("trusting the bench certificate: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let name = ServerName::try_from(TLS_HOST).map_err(|e| e.to_string())?;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let conn = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(|e| e.to_string())?;
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("{addr}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        write!(
            tls,
            "GET / HTTP/1.1\r\nHost: {TLS_HOST}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("HTTPS request to {addr}: {e}"))?;
        // Read to the end: TLS 1.3 tickets come after the handshake.
        let mut buf = Vec::new();
        match tls.read_to_end(&mut buf) {
            Ok(_) => {}
            // A close without close_notify still delivered the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(format!("HTTPS answer from {addr}: {e}")),
        }
        if procs::parse_status(&buf) != Some(200) {
            return Err(format!(
                "HTTPS GET / on {addr} answered {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(80)])
            ));
        }
        kinds.push(tls.conn.handshake_kind());
    }
    Ok(kinds[1] == Some(rustls::HandshakeKind::Resumed))
}
