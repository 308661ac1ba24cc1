//! Pebble, Let's Encrypt's test CA, on loopback for the ACME tests: pebble
//! itself with a TLS certificate made here, and pebble-challtestsrv as its
//! DNS, answering 127.0.0.1 for every name. Nothing leaves the machine.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::{free_ports, poll_until};

/// What to install when the binaries are missing.
const MISSING: &str = "pebble is not installed: run .ci/setup (it installs Debian's `pebble` \
                       package, which provides /usr/bin/pebble and /usr/bin/pebble-challtestsrv)";

/// How long Pebble may take to listen (10 s).
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Fails the test (never skips it) when Pebble is not installed.
pub fn require() {
    for bin in ["pebble", "pebble-challtestsrv"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(found, "{bin} not found on PATH. {MISSING}");
    }
}

/// A CA made for one test and a leaf it signed.
pub struct Pki {
    /// The CA certificate (PEM): the trust anchor for the leaf.
    pub ca_pem: String,
    /// The leaf followed by the CA (PEM).
    pub chain_pem: String,
    pub key_pem: String,
    /// The leaf (DER).
    pub leaf_der: Vec<u8>,
}

/// A CA and a leaf for `names` (DNS names or IP literals) valid from a day
/// ago for `days` more days, with an authority key identifier (RFC 9773
/// identifies certificates by it).
pub fn pki(names: &[&str], days: i64) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "switchyard test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(days);
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", cert.pem(), ca_cert.pem()),
        key_pem: key.serialize_pem(),
        leaf_der: cert.der().to_vec(),
    }
}

/// A rustls client config trusting only `ca_pem`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// `GET https://{addr}{path}` trusting `ca_pem`, HTTP/1.0: status and body.
pub fn https_get(addr: &str, path: &str, ca_pem: &str) -> std::io::Result<(u16, String)> {
    let ip = addr.rsplit_once(':').unwrap().0.to_string();
    let name = rustls_pki_types::ServerName::try_from(ip).unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca_pem, &[]), name)
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    // Go closes without close_notify on HTTP/1.0: take what arrived.
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A running Pebble and its DNS.
pub struct Pebble {
    dir: tempfile::TempDir,
    config: PathBuf,
    dns_port: u16,
    /// pebble-challtestsrv's management API (DNS records).
    dns_management: u16,
    acme_port: u16,
    management_port: u16,
    /// Trust anchor for Pebble's own HTTPS (what `acme.ca_root` names).
    ca_root: PathBuf,
    pebble: Option<Child>,
    challtestsrv: Child,
    runs: usize,
}

impl Pebble {
    /// Starts the DNS and Pebble, validating HTTP-01 on `http_port` of
    /// 127.0.0.1 (switchyard's plain listener).
    pub fn start(http_port: u16) -> Pebble {
        let mut p = Pebble::prepare(http_port);
        p.launch();
        p
    }

    /// Like [`Pebble::start`] but Pebble itself is not started yet (the CA
    /// is down until [`Pebble::launch`]).
    pub fn prepare(http_port: u16) -> Pebble {
        require();
        let dir = tempfile::Builder::new()
            .prefix("switchyard-pebble-")
            .tempdir()
            .unwrap();
        let [dns_port, dns_management, acme_port, management_port, tls_port] = free_ports::<5>();
        let pki = pki(&["127.0.0.1", "localhost"], 30);
        let (cert, key, ca_root) = (
            dir.path().join("pebble.pem"),
            dir.path().join("pebble.key"),
            dir.path().join("pebble-ca.pem"),
        );
        fs::write(&cert, &pki.chain_pem).unwrap();
        fs::write(&key, &pki.key_pem).unwrap();
        fs::write(&ca_root, &pki.ca_pem).unwrap();
        let config = dir.path().join("pebble-config.json");
        let json = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        fs::write(&config, json.to_string()).unwrap();

        let log = fs::File::create(dir.path().join("challtestsrv.log")).unwrap();
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run pebble-challtestsrv: {e}. {MISSING}"));
        let mgmt = format!("127.0.0.1:{dns_management}");
        assert!(
            poll_until(START_DEADLINE, || TcpStream::connect(&mgmt).is_ok()),
            "pebble-challtestsrv did not start"
        );
        Pebble {
            dir,
            config,
            dns_port,
            dns_management,
            acme_port,
            management_port,
            ca_root,
            pebble: None,
            challtestsrv,
            runs: 0,
        }
    }

    /// Starts (or restarts) Pebble on the same ports. A new Pebble has new
    /// roots and knows no accounts.
    pub fn launch(&mut self) {
        assert!(self.pebble.is_none(), "pebble already running");
        self.runs += 1;
        let log = fs::File::create(self.log_path(self.runs)).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&self.config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Pebble refuses 5 % of good nonces by default; instant-acme
            // retries them, but each retry is one more request in the log
            // the tests count orders in.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run pebble: {e}. {MISSING}"));
        self.pebble = Some(child);
        let (acme, mgmt) = (self.acme_addr(), self.management_addr());
        assert!(
            poll_until(START_DEADLINE, || TcpStream::connect(&acme).is_ok()
                && TcpStream::connect(&mgmt).is_ok()),
            "pebble did not start:\n{}",
            self.log()
        );
    }

    /// Makes `host` resolve to `ip` (IPv4) for Pebble's validation.
    pub fn set_address(&self, host: &str, ip: &str) {
        let body = serde_json::json!({ "host": format!("{host}."), "addresses": [ip] });
        let r = super::request(
            "POST",
            &format!("http://127.0.0.1:{}/add-a", self.dns_management),
            &[],
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(r.status, 200, "add-a {host}: {}", r.body);
    }

    /// Kills Pebble (the CA becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("pebble-{run}.log"))
    }

    /// Everything the current Pebble logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path(self.runs)).unwrap_or_default()
    }

    /// New-order requests the current Pebble received.
    pub fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }

    fn acme_addr(&self) -> String {
        format!("127.0.0.1:{}", self.acme_port)
    }

    fn management_addr(&self) -> String {
        format!("127.0.0.1:{}", self.management_port)
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    pub fn ca_root(&self) -> &Path {
        &self.ca_root
    }

    /// The root Pebble (this run) issues under, from its management
    /// interface: the trust anchor for issued chains.
    pub fn issuing_root(&self) -> String {
        let ca = fs::read_to_string(&self.ca_root).unwrap();
        let (status, body) = https_get(&self.management_addr(), "/roots/0", &ca).unwrap();
        assert_eq!(status, 200, "GET /roots/0: {body}");
        body
    }

    /// `[acme]` and `[[acme.certificates]]` for `certs`, each `(name,
    /// domains)`, with retries after 1 s.
    pub fn acme_tables(&self, certs: &[(&str, &[&str])]) -> String {
        let mut t = format!(
            "[acme]\ndirectory = \"{}\"\nemail = \"ops@switchyard.test\"\nca_root = {}\nretry_backoff = \"1s\"\n",
            self.directory(),
            super::toml_str(self.ca_root.to_str().unwrap())
        );
        for (name, domains) in certs {
            let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
            t.push_str(&format!(
                "\n[[acme.certificates]]\nname = \"{name}\"\ndomains = [{}]\n",
                list.join(", ")
            ));
        }
        t
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.challtestsrv.kill();
        let _ = self.challtestsrv.wait();
        if std::thread::panicking() {
            eprintln!("--- pebble log ---\n{}", self.log());
        }
    }
}
