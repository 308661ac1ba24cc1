//! Certificates as files: reading a PEM chain and key into what rustls
//! serves, the facts operators ask about (names, issuer, serial, validity),
//! writing them back atomically with private modes, and the temporary
//! self-signed stand-in served before the first real certificate exists.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Mode of every file holding a private key or account credentials.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of certificate chains: public material.
pub const PUBLIC_MODE: u32 = 0o644;
/// Lifetime of the bootstrap self-signed certificate (7 days): long enough
/// to outlast any CA outage the renewal backoff rides out, short enough
/// that a copy taken off the host is soon worthless.
pub const BOOTSTRAP_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The issuer name of the bootstrap certificate, as `GET /certs` shows it.
pub const BOOTSTRAP_ISSUER: &str = "CN=switchyard bootstrap (self-signed, temporary)";

/// A certificate chain with its key, ready for rustls, and what it says.
#[derive(Clone)]
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Certificate")
            .field("info", &self.info)
            .finish()
    }
}

/// What the leaf certificate says, for operators and the renewal schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names of the subject alternative name extension (RFC 5280
    /// §4.2.1.6), lower case, wildcards as written (`*.example.com`); the
    /// subject's common name when the extension is absent.
    pub names: Vec<String>,
    /// The issuer's distinguished name, RFC 4514 form.
    pub issuer: String,
    /// The serial number, lower-case hex without separators.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// The validity period (`notAfter` − `notBefore`); zero if inverted.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Whether `now` is past `notAfter`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }
}

/// Why a certificate could not be read. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Chain { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{} does not match the certificate in {}: {reason}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{} expired on {} (notAfter); renew it or point cert at the new file", path.display(), humantime::format_rfc3339_seconds(*not_after))]
    Expired {
        path: PathBuf,
        not_after: SystemTime,
    },
}

/// Why PEM text does not make a servable certificate (no file names: the
/// callers add them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("{0}")]
    Chain(String),
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Reads a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1; RSA, ECDSA P-256/P-384 or Ed25519) and checks the key belongs to
/// the leaf.
pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Certificate, PemError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Chain(format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = certs.first() else {
        return Err(PemError::Chain("no CERTIFICATE block".into()));
    };
    let info = describe(leaf).map_err(PemError::Chain)?;
    let key_pem = key;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PemError::Key(no_key(key_pem, e)))?;
    let signer = any_supported_type(&key)
        .map_err(|e| PemError::Key(format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(certs.clone(), signer.clone());
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            // The key belongs to a later certificate: the chain is in the
            // wrong order (RFC 8446 §4.4.2: the sender's certificate first).
            let belongs = |c: &CertificateDer<'static>| {
                CertifiedKey::new(vec![c.clone()], signer.clone())
                    .keys_match()
                    .is_ok()
            };
            if let Some(i) = certs.iter().skip(1).position(belongs) {
                return Err(PemError::Chain(format!(
                    "the chain is in the wrong order: certificate {} of {} belongs to the key; \
                     put it first, then its issuers (leaf first, as certbot's fullchain.pem is)",
                    i + 2,
                    certs.len()
                )));
            }
            return Err(PemError::Mismatch(e.to_string()));
        }
    }
    Ok(Certificate {
        key: Arc::new(certified),
        info,
    })
}

/// Why a key file gave no private key, saying what it holds instead where
/// that is the likely mistake: an encrypted key (no passphrase can be asked
/// for at start-up) or a certificate.
fn no_key(pem: &[u8], e: rustls_pki_types::pem::Error) -> String {
    let holds = |label: &str| pem.windows(label.len()).any(|w| w == label.as_bytes());
    if holds("ENCRYPTED PRIVATE KEY") || holds("Proc-Type: 4,ENCRYPTED") {
        "the private key is encrypted, and switchyard cannot ask for its passphrase: \
         decrypt it once (openssl pkey -in KEY -out KEY.plain) and keep the result mode 0600"
            .into()
    } else if holds("-----BEGIN CERTIFICATE-----") {
        "holds a CERTIFICATE, not a private key: is it the cert file?".into()
    } else {
        format!("no usable PEM private key: {e}")
    }
}

/// Reads a certificate from `cert` and `key` files; see [`from_pem`].
/// Expiry is not checked here ([`load_static`] does).
pub fn load(cert: &Path, key: &Path) -> Result<Certificate, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let (chain, key_pem) = (read(cert)?, read(key)?);
    from_pem(&chain, &key_pem).map_err(|e| match e {
        PemError::Chain(reason) => CertError::Chain {
            path: cert.to_path_buf(),
            reason,
        },
        PemError::Key(reason) => CertError::Key {
            path: key.to_path_buf(),
            reason,
        },
        PemError::Mismatch(reason) => CertError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason,
        },
    })
}

/// A static certificate as `check` and start-up accept it: readable,
/// matching, and not expired at `now`.
pub fn load_static(cert: &Path, key: &Path, now: SystemTime) -> Result<Certificate, CertError> {
    let c = load(cert, key)?;
    if c.info.expired_at(now) {
        return Err(CertError::Expired {
            path: cert.to_path_buf(),
            not_after: c.info.not_after,
        });
    }
    Ok(c)
}

/// Checks that `path` (`acme.ca_root`) holds at least one PEM certificate,
/// as the ACME client will need when it first talks to the CA.
pub fn check_ca_root(path: &Path) -> Result<(), CertError> {
    let pem = std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let chain = |reason: String| CertError::Chain {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| chain(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(chain(
            "no CERTIFICATE block: give the CA's PEM certificate".into(),
        ));
    }
    Ok(())
}

/// Checks that ACME can keep its files in `dir` (`tls.certs_dir`): an
/// existing directory this process may write, or a path whose nearest
/// existing ancestor is one (it is created on first need). A file in the
/// way or a read-only directory would otherwise surface only at the first
/// issuance, in the background, after start-up said everything was fine.
pub fn check_certs_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                at = match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(format!("cannot use {}: {e}", at.display())),
        }
    }
    let c = std::ffi::CString::new(at.as_os_str().as_bytes())
        .map_err(|_| format!("{} has a NUL byte", at.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "{} is not writable ({e}): ACME keeps its certificates, keys and account there",
            at.display()
        ));
    }
    Ok(())
}

/// The facts of a DER certificate.
pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, x509) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    for ext in x509.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::DNSName(dns) = name {
                    names.push(dns.to_ascii_lowercase());
                }
            }
        }
    }
    if names.is_empty() {
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        names,
        issuer: x509.issuer().to_string(),
        serial: x509
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: time(x509.validity().not_before),
        not_after: time(x509.validity().not_after),
    })
}

/// A self-signed certificate for `domains`, valid from now for
/// [`BOOTSTRAP_LIFETIME`]: served before the first real one exists so the
/// HTTPS listener can start without waiting for the CA. Clients do not
/// trust it; it only keeps start-up from blocking.
pub fn self_signed(domains: &[String]) -> Result<Certificate, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(domains.to_vec()).map_err(|e| e.to_string())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        "switchyard bootstrap (self-signed, temporary)",
    );
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + BOOTSTRAP_LIFETIME;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` atomically with `mode`: a temporary file in the
/// same directory, created with the mode (never briefly wider), written and
/// fsynced, then renamed over `path`, and the directory fsynced so the
/// rename survives a crash. Readers see the old file or the new one, never
/// half of one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // An old temp file keeps its mode through `create`: set it again.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where an ACME certificate `name` lives under `certs_dir`: the chain
/// (`NAME.pem`, 0644) and the key (`NAME.key`, 0600).
pub fn acme_paths(certs_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        certs_dir.join(format!("{name}.pem")),
        certs_dir.join(format!("{name}.key")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(domains: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            domains.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reads_a_pair_and_describes_it() {
        let (chain, key) = pair(&["Example.com", "*.example.com"]);
        let c = from_pem(chain.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(c.info.names, ["example.com", "*.example.com"]);
        assert!(!c.info.serial.is_empty());
        assert!(c.info.not_after > c.info.not_before);
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch() {
        let (chain, _) = pair(&["a.example.com"]);
        let (_, other_key) = pair(&["a.example.com"]);
        let err = from_pem(chain.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::Mismatch(_)), "{err}");
    }

    #[test]
    fn garbage_is_named_for_what_it_is() {
        let (chain, key) = pair(&["a.example.com"]);
        assert!(matches!(
            from_pem(b"", key.as_bytes()),
            Err(PemError::Chain(_))
        ));
        assert!(matches!(
            from_pem(b"junk", key.as_bytes()),
            Err(PemError::Chain(_))
        ));
        assert!(matches!(
            from_pem(chain.as_bytes(), b""),
            Err(PemError::Key(_))
        ));
        assert!(matches!(
            from_pem(chain.as_bytes(), chain.as_bytes()),
            Err(PemError::Key(_))
        ));
    }

    #[test]
    fn files_are_named_in_errors_and_expiry_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = pair(&["a.example.com"]);
        let (c, k) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        let err = load(&c, &k).unwrap_err().to_string();
        assert!(err.contains("a.pem"), "{err}");
        std::fs::write(&c, chain).unwrap();
        std::fs::write(&k, key).unwrap();
        let cert = load_static(&c, &k, SystemTime::now()).unwrap();
        let later = cert.info.not_after + Duration::from_secs(1);
        let err = load_static(&c, &k, later).unwrap_err().to_string();
        assert!(err.contains("a.pem expired on"), "{err}");
    }

    #[test]
    fn a_ca_root_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        assert!(matches!(check_ca_root(&path), Err(CertError::Read { .. })));
        std::fs::write(&path, "not pem").unwrap();
        let err = check_ca_root(&path).unwrap_err().to_string();
        assert!(err.contains("ca.pem: no CERTIFICATE block"), "{err}");
        std::fs::write(&path, pair(&["ca.test"]).0).unwrap();
        check_ca_root(&path).unwrap();
    }

    #[test]
    fn atomic_writes_keep_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_atomic(&path, b"one", PRIVATE_MODE).unwrap();
        write_atomic(&path, b"two", PRIVATE_MODE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn bootstrap_is_self_signed_and_short_lived() {
        let c = self_signed(&["a.example.com".into()]).unwrap();
        assert_eq!(c.info.names, ["a.example.com"]);
        assert_eq!(c.info.issuer, BOOTSTRAP_ISSUER);
        assert!(c.info.lifetime() <= BOOTSTRAP_LIFETIME + Duration::from_secs(600));
    }
}
