//! The certificates being served: one table, swapped whole, that every TLS
//! handshake reads without a lock, and beside it what operators ask about
//! each certificate (its source, schedule and last error).
//!
//! A new certificate reaches new handshakes the moment [`CertStore::install`]
//! returns; connections already open keep the certificate they were made
//! with, since TLS never looks at it again after the handshake.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

use crate::config;
use crate::tls::certs::{CertInfo, Certificate};

/// Longest `last_error` kept (1000 characters): a CA's problem detail is
/// a sentence or two.
pub const MAX_ERROR_CHARS: usize = 1000;

/// `text` as one line of at most [`MAX_ERROR_CHARS`] characters, control
/// characters turned into spaces: for errors that carry a CA's words into
/// the log and `GET /certs`, where a newline could forge a log line and a
/// terminal escape could dress up `ctl certs`.
pub fn one_line(text: &str) -> String {
    text.chars()
        .take(MAX_ERROR_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Where a certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Files named by `[[tls.certificates]]`; never renewed by switchyard.
    Static,
    /// Obtained and renewed through ACME (`[[acme.certificates]]`).
    Acme,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Acme => "acme",
        }
    }
}

/// One certificate as operators see it (`GET /certs`).
#[derive(Debug, Clone)]
pub struct CertStatus {
    pub name: String,
    pub source: Source,
    /// The host names it is served for: an ACME certificate's configured
    /// domains, a static one's names.
    pub domains: Vec<String>,
    /// What is served now; `None` before anything could be loaded.
    pub info: Option<CertInfo>,
    /// Whether what is served is the temporary self-signed stand-in.
    pub bootstrap: bool,
    /// When the renewal service will next try (ACME only).
    pub next_renewal: Option<SystemTime>,
    /// The last failed attempt's error, cleared by a success.
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// Renewal failures since start (for metrics).
    pub failures_total: u64,
}

/// Why a forced renewal was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    #[error("no certificate named {0:?}")]
    Unknown(String),
    #[error("certificate {0:?} is static (files on disk): replace the files and restart, or move it to [[acme.certificates]]")]
    Static(String),
}

struct Entry {
    status: CertStatus,
    key: Option<Arc<CertifiedKey>>,
    /// Wakes the renewal task of an ACME certificate.
    renew: Arc<Notify>,
}

/// The SNI lookup table handshakes read.
#[derive(Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain of a `*.parent` name.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Table {
    fn lookup(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(k) = self.exact.get(host) {
            return Some(k);
        }
        // A wildcard stands for exactly one leftmost label (RFC 6125 §6.4.3).
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// Every configured certificate, in config order (static ones first).
pub struct CertStore {
    table: ArcSwap<Table>,
    entries: Mutex<Vec<Entry>>,
    /// `tls.default_certificate`; `None`: the first with a certificate.
    default_name: Option<String>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl CertStore {
    /// One entry per configured certificate, none loaded yet.
    pub fn new(tls: &config::Tls, acme: Option<&config::Acme>) -> CertStore {
        let mut entries = Vec::new();
        let mut add = |name: &str, source, domains: Vec<String>| {
            entries.push(Entry {
                status: CertStatus {
                    name: name.to_string(),
                    source,
                    domains,
                    info: None,
                    bootstrap: false,
                    next_renewal: None,
                    last_error: None,
                    failures: 0,
                    failures_total: 0,
                },
                key: None,
                renew: Arc::new(Notify::new()),
            })
        };
        for c in &tls.certificates {
            add(&c.name, Source::Static, Vec::new());
        }
        for c in acme.map(|a| a.certificates.as_slice()).unwrap_or_default() {
            add(&c.name, Source::Acme, c.domains.clone());
        }
        CertStore {
            table: ArcSwap::from_pointee(Table::default()),
            entries: Mutex::new(entries),
            default_name: tls.default_certificate.clone(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `cert` as certificate `name` to every handshake from now on.
    /// A static certificate's names come from the certificate itself.
    /// `bootstrap` marks the temporary self-signed stand-in. Unknown names
    /// are ignored (false).
    pub fn install(&self, name: &str, cert: Certificate, bootstrap: bool) -> bool {
        let mut entries = self.entries();
        let Some(e) = entries.iter_mut().find(|e| e.status.name == name) else {
            return false;
        };
        if e.status.source == Source::Static {
            e.status.domains = cert.info.names.clone();
        }
        e.key = Some(cert.key);
        e.status.info = Some(cert.info);
        e.status.bootstrap = bootstrap;
        self.table.store(Arc::new(self.build(&entries)));
        true
    }

    fn build(&self, entries: &[Entry]) -> Table {
        let mut table = Table::default();
        for e in entries {
            let Some(key) = &e.key else { continue };
            for name in &e.status.domains {
                // The first configured certificate claiming a name keeps it.
                match name.strip_prefix("*.") {
                    Some(parent) => table.wildcard.entry(parent.to_string()),
                    None => table.exact.entry(name.clone()),
                }
                .or_insert_with(|| key.clone());
            }
            let is_default = match &self.default_name {
                Some(d) => *d == e.status.name,
                None => table.default.is_none(),
            };
            if is_default {
                table.default = Some(key.clone());
            }
        }
        if table.default.is_none() {
            // The named default is not loaded yet: any certificate beats a
            // failed handshake.
            table.default = entries.iter().find_map(|e| e.key.clone());
        }
        table
    }

    /// The certificate a handshake naming `host` (SNI, canonical lower case)
    /// gets; `None` for the host means no SNI.
    pub fn resolve(&self, host: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        host.and_then(|h| table.lookup(h))
            .or(table.default.as_ref())
            .cloned()
    }

    /// Whether some certificate is served for `host` by name (not only as
    /// the default): plain HTTP for such a host is redirected to https.
    pub fn covers(&self, host: &str) -> bool {
        self.table.load().lookup(host).is_some()
    }

    /// A handshake-side view for `TlsSettings::set_cert_resolver`.
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }

    /// Every certificate's status, in config order.
    pub fn status(&self) -> Vec<CertStatus> {
        self.entries().iter().map(|e| e.status.clone()).collect()
    }

    /// One certificate's status.
    pub fn get(&self, name: &str) -> Option<CertStatus> {
        self.entries()
            .iter()
            .find(|e| e.status.name == name)
            .map(|e| e.status.clone())
    }

    /// Records when the renewal service will next look at `name`.
    pub fn set_next_renewal(&self, name: &str, at: Option<SystemTime>) {
        if let Some(e) = self.entries().iter_mut().find(|e| e.status.name == name) {
            e.status.next_renewal = at;
        }
    }

    /// Records a failed issuance or renewal of `name`.
    /// The error text comes partly from the CA (its problem document): control
    /// characters become spaces and it is cut at [`MAX_ERROR_CHARS`], so
    /// `ctl certs` prints one line an untrusted CA cannot dress up.
    pub fn record_failure(&self, name: &str, error: String) {
        let error = one_line(&error);
        if let Some(e) = self.entries().iter_mut().find(|e| e.status.name == name) {
            e.status.last_error = Some(error);
            e.status.failures += 1;
            e.status.failures_total += 1;
        }
    }

    /// Clears `name`'s error after a success.
    pub fn record_success(&self, name: &str) {
        if let Some(e) = self.entries().iter_mut().find(|e| e.status.name == name) {
            e.status.last_error = None;
            e.status.failures = 0;
        }
    }

    /// Asks the renewal service to renew ACME certificate `name` now.
    pub fn request_renewal(&self, name: &str) -> Result<(), RenewError> {
        let entries = self.entries();
        let e = entries
            .iter()
            .find(|e| e.status.name == name)
            .ok_or_else(|| RenewError::Unknown(name.to_string()))?;
        if e.status.source == Source::Static {
            return Err(RenewError::Static(name.to_string()));
        }
        // Stored if the task is busy: it renews again right after.
        e.renew.notify_one();
        Ok(())
    }

    /// What the renewal task of `name` waits on for forced renewals.
    pub fn renewal_signal(&self, name: &str) -> Option<Arc<Notify>> {
        self.entries()
            .iter()
            .find(|e| e.status.name == name)
            .map(|e| e.renew.clone())
    }
}

/// Chooses the certificate by SNI for each handshake.
#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands over the SNI name lower-cased without a trailing
        // dot, as a DNS name (IP literals are not sent as SNI, RFC 6066 §3).
        let host = hello.server_name().map(|h| h.to_ascii_lowercase());
        self.0.resolve(host.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::self_signed;

    fn store(default: Option<&str>) -> CertStore {
        let tls = config::Tls {
            certs_dir: "certs".into(),
            redirect_http: true,
            hsts: None,
            handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
            default_certificate: default.map(String::from),
            certificates: vec![config::StaticCertificate {
                name: "wild".into(),
                cert: "w.pem".into(),
                key: "w.key".into(),
            }],
        };
        let acme = config::Acme {
            directory: config::DEFAULT_ACME_DIRECTORY.into(),
            email: None,
            ca_root: None,
            retry_backoff: config::DEFAULT_ACME_RETRY_BACKOFF,
            certificates: vec![config::AcmeCertificate {
                name: "site".into(),
                domains: vec!["example.com".into(), "api.example.com".into()],
            }],
        };
        CertStore::new(&tls, Some(&acme))
    }

    fn serial(k: Option<Arc<CertifiedKey>>) -> String {
        crate::tls::certs::describe(&k.unwrap().cert[0])
            .unwrap()
            .serial
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let s = store(Some("site"));
        assert!(
            s.resolve(Some("example.com")).is_none(),
            "nothing loaded yet"
        );
        let wild = self_signed(&["*.example.com".into()]).unwrap();
        let site = self_signed(&["example.com".into(), "api.example.com".into()]).unwrap();
        let (w, t) = (wild.info.serial.clone(), site.info.serial.clone());
        s.install("wild", wild, false);
        // The named default is not loaded: the loaded one stands in.
        assert_eq!(serial(s.resolve(None)), w);
        s.install("site", site, false);
        assert_eq!(
            serial(s.resolve(Some("api.example.com"))),
            t,
            "exact beats wildcard"
        );
        assert_eq!(serial(s.resolve(Some("www.example.com"))), w);
        assert_eq!(serial(s.resolve(Some("example.com"))), t);
        assert_eq!(
            serial(s.resolve(Some("a.b.example.com"))),
            t,
            "one label only: default"
        );
        assert_eq!(serial(s.resolve(None)), t);
        assert!(s.covers("www.example.com") && s.covers("example.com"));
        assert!(!s.covers("other.test") && !s.covers("a.b.example.com"));
    }

    #[test]
    fn renewals_are_asked_for_acme_certificates_only() {
        let s = store(None);
        assert_eq!(s.request_renewal("site"), Ok(()));
        assert!(matches!(
            s.request_renewal("wild"),
            Err(RenewError::Static(_))
        ));
        assert!(matches!(
            s.request_renewal("nope"),
            Err(RenewError::Unknown(_))
        ));
        s.record_failure("site", "CA down".into());
        s.record_failure("site", "CA said:\n\u{1b}[31mforged line".into());
        assert_eq!(
            s.get("site").unwrap().last_error.as_deref(),
            Some("CA said:  [31mforged line")
        );
        let st = s.get("site").unwrap();
        assert_eq!((st.failures, st.failures_total), (2, 2));
        s.record_success("site");
        let st = s.get("site").unwrap();
        assert_eq!(
            (st.failures, st.failures_total, st.last_error),
            (0, 2, None)
        );
    }
}
