//! TLS clients for the HTTPS and ACME tests: a blocking rustls handshake,
//! one HTTP/1.1 exchange over any stream, and a verifier that accepts (and
//! records) whatever certificate the server presents.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// I/O timeout of the test clients: a dead proxy fails the test, never hangs it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub type TlsConn = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake naming `name` (and verifying the
/// chain for it, as `config` says), or says why it failed.
pub fn try_tls_connect(
    addr: &str,
    name: &str,
    config: Arc<ClientConfig>,
) -> Result<TlsConn, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(config, server).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("TLS handshake with {addr} as {name}: {e}"))?;
    }
    Ok(tls)
}

/// [`try_tls_connect`], failing the test on an error.
pub fn tls_connect(addr: &str, name: &str, config: Arc<ClientConfig>) -> TlsConn {
    try_tls_connect(addr, name, config).unwrap_or_else(|e| panic!("{e}"))
}

/// An HTTP/1.1 response with a `Content-Length` body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Writes `request` and reads one response (Content-Length framed).
pub fn exchange(conn: &mut impl ReadWrite, request: &str) -> Answer {
    conn.write_all(request.as_bytes()).unwrap();
    conn.flush().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).expect("read response head");
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).expect("read body");
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub fn get_request(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// Accepts whatever certificate the server presents and records it: for
/// tests that look at which certificate is served, not whether it verifies.
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Option<Vec<u8>>>);

impl Recorder {
    /// The last certificate presented (DER), taken out.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap().take()
    }

    /// A client config that trusts anything, recording through `recorder`.
    pub fn config(recorder: Arc<Recorder>) -> ClientConfig {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(recorder)
            .with_no_client_auth()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection (async, for the HTTP/2 and WebSocket clients), the
/// handshake bounded by [`IO_TIMEOUT`].
pub async fn tls_async(
    addr: &str,
    name: &str,
    config: Arc<ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(
        IO_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(server, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

/// An HTTP/2 connection (the TLS handshake as [`tls_async`]), checked to
/// have negotiated `h2` by ALPN, its connection driven by a task of the
/// current runtime.
pub async fn h2_handshake(
    addr: &str,
    name: &str,
    config: Arc<ClientConfig>,
) -> h2::client::SendRequest<Bytes> {
    let tls = tls_async(addr, name, config).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN chose h2"
    );
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("h2 ready")
}

/// A self-signed certificate for `name`, written into `dir` (the key with
/// mode 0600, as switchyard requires), as a `[[tls.certificates]]` table
/// named `site` to follow a `[tls]` header, and the certificate for a
/// client to trust.
pub fn self_signed_site(dir: &std::path::Path, name: &str) -> (String, CertificateDer<'static>) {
    use std::os::unix::fs::PermissionsExt;
    let site = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let (cert, key) = (dir.join("site.pem"), dir.join("site.key"));
    std::fs::write(&cert, site.cert.pem()).unwrap();
    std::fs::write(&key, site.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let table = format!(
        "[[tls.certificates]]\nname = \"site\"\ncert = {}\nkey = {}\n\n",
        super::toml_str(cert.to_str().unwrap()),
        super::toml_str(key.to_str().unwrap())
    );
    (table, site.cert.der().clone())
}

/// A client that trusts only `cert` (a self-signed site, as from
/// [`self_signed_site`]) and offers the ALPN protocols `alpn`.
pub fn trusting(cert: CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
