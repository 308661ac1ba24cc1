//! `[tls]`, `[[tls.certificates]]`, `[acme]` and `[[acme.certificates]]`:
//! the HTTPS listener's certificates, static (files on disk) or obtained
//! and renewed by ACME (RFC 8555), with their defaults.
//!
//! The files a static certificate names are read by `switchyard check` and
//! at start ([`crate::tls::certs`]); this file checks only what the config
//! text itself says.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::{file, Validator, MIN_DURATION};

/// Where certificates, keys and the ACME account live (relative to the
/// working directory).
pub const DEFAULT_CERTS_DIR: &str = "certs";
/// How long a client may take to complete the TLS handshake after its TCP
/// connection is accepted (10 s, as `server.header_timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `tls.handshake_timeout`: 100 ms to 10 min.
pub const HANDSHAKE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    MIN_DURATION..=Duration::from_secs(600);
/// Let's Encrypt's production directory: the CA the deployment uses today.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// First wait after a failed issuance or renewal (1 min); each further
/// failure doubles it up to `tls::renewal::MAX_RETRY_BACKOFF`.
pub const DEFAULT_ACME_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// `acme.retry_backoff`: 1 s to 1 h.
pub const ACME_RETRY_BACKOFF_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Most names on one certificate (100): Let's Encrypt's limit per order.
pub const MAX_DOMAINS: usize = 100;

/// The HTTPS side: where certificates live and how they are served.
#[derive(Debug, Clone)]
pub struct Tls {
    pub certs_dir: PathBuf,
    /// Plain HTTP requests for a host some certificate covers get 301 to
    /// https (ACME challenges excepted). Default on.
    pub redirect_http: bool,
    /// `Strict-Transport-Security` value sent on HTTPS answers (RFC 6797
    /// §6.1), e.g. `max-age=31536000`; `None`: not sent.
    pub hsts: Option<String>,
    pub handshake_timeout: Duration,
    /// The certificate for clients without SNI or naming no configured host;
    /// `None`: the first configured (static ones first, then ACME ones).
    pub default_certificate: Option<String>,
    pub certificates: Vec<StaticCertificate>,
}

/// A certificate read from files, never renewed by switchyard.
#[derive(Debug, Clone)]
pub struct StaticCertificate {
    pub name: String,
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// An ACME account and the certificates it keeps issued.
#[derive(Debug, Clone)]
pub struct Acme {
    /// The directory URL (RFC 8555 §7.1.1), `https://`.
    pub directory: String,
    /// Contact for the account (`mailto:` is added), for the CA's expiry mail.
    pub email: Option<String>,
    /// A PEM CA certificate to trust for the directory's HTTPS instead of the
    /// system roots (a test or private CA).
    pub ca_root: Option<PathBuf>,
    /// First wait after a failed attempt; doubles per failure (capped).
    pub retry_backoff: Duration,
    pub certificates: Vec<AcmeCertificate>,
}

/// A certificate obtained and renewed through ACME with HTTP-01 challenges.
#[derive(Debug, Clone)]
pub struct AcmeCertificate {
    pub name: String,
    /// Canonical host names (lower case, no trailing dot); the first is the
    /// certificate's subject.
    pub domains: Vec<String>,
}

impl Tls {
    /// Names of every configured certificate, static first, in config order.
    pub fn names<'a>(&'a self, acme: Option<&'a Acme>) -> impl Iterator<Item = &'a str> {
        let acme = acme.map(|a| a.certificates.as_slice()).unwrap_or_default();
        self.certificates
            .iter()
            .map(|c| c.name.as_str())
            .chain(acme.iter().map(|c| c.name.as_str()))
    }
}

impl Validator<'_> {
    /// `[tls]` and `[acme]` together: certificate names are one namespace,
    /// and `default_certificate` may name either kind.
    pub(super) fn tls(
        &mut self,
        t: file::Tls,
        a: Option<file::Acme>,
        https: bool,
    ) -> (Tls, Option<Acme>) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut static_certs = Vec::new();
        for (i, c) in t.certificates.unwrap_or_default().into_iter().enumerate() {
            let name_ok = self.certificate_name(&c.name, &mut seen);
            let cert = self.file_key(&format!("tls.certificates.cert#{i}"), c.cert);
            let key = self.file_key(&format!("tls.certificates.key#{i}"), c.key);
            if name_ok {
                static_certs.push(StaticCertificate {
                    name: c.name.into_inner(),
                    cert,
                    key,
                });
            }
        }
        let acme = a.map(|a| self.acme(a, &mut seen));
        let tls = Tls {
            certs_dir: self
                .path_key("tls.certs_dir", t.certs_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CERTS_DIR)),
            redirect_http: t.redirect_http.unwrap_or(true),
            hsts: t.hsts.and_then(|h| self.hsts(h)),
            handshake_timeout: self.duration_in(
                t.handshake_timeout.as_ref(),
                DEFAULT_HANDSHAKE_TIMEOUT,
                HANDSHAKE_TIMEOUT_RANGE,
            ),
            default_certificate: None,
            certificates: static_certs,
        };
        let default_certificate = t.default_certificate.and_then(|d| {
            if seen.contains_key(d.get_ref()) || self.any_certificate_dropped() {
                Some(d.into_inner())
            } else {
                let known: Vec<&str> = tls.names(acme.as_ref()).collect();
                self.at(
                    &d,
                    format!(
                        "default_certificate {:?} names no certificate; configured: {}",
                        d.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                None
            }
        });
        let any = tls.names(acme.as_ref()).next().is_some();
        if https && !any && !self.any_certificate_dropped() {
            self.error(
                0,
                "listen.https needs a certificate: add [[tls.certificates]] (files) or [acme] with [[acme.certificates]]".into(),
            );
        }
        if !https && any {
            self.error(
                0,
                "certificates are configured but [listen] https is not set: add https = \"0.0.0.0:443\"".into(),
            );
        }
        (
            Tls {
                default_certificate,
                ..tls
            },
            acme,
        )
    }

    fn any_certificate_dropped(&self) -> bool {
        self.dropped
            .iter()
            .any(|(section, _)| section == "tls" || section == "acme")
    }

    fn acme(&mut self, a: file::Acme, seen: &mut HashMap<String, usize>) -> Acme {
        let directory = match a.directory {
            None => DEFAULT_ACME_DIRECTORY.to_string(),
            Some(d) => {
                let ok = d
                    .get_ref()
                    .strip_prefix("https://")
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
                if !ok {
                    self.at(
                        &d,
                        format!(
                            "bad ACME directory {:?}: give the CA's https:// directory URL, e.g. {DEFAULT_ACME_DIRECTORY:?}",
                            d.get_ref()
                        ),
                    );
                }
                d.into_inner()
            }
        };
        let email = a.email.and_then(|e| {
            let text = e.get_ref();
            let ok = text.split_once('@').is_some_and(|(user, domain)| {
                !user.is_empty() && domain.contains('.') && !domain.starts_with('.')
            }) && text.bytes().all(|b| b.is_ascii_graphic() && b != b',');
            if ok {
                Some(e.into_inner())
            } else {
                self.at(
                    &e,
                    format!("bad email {text:?}: expected an address like \"ops@example.com\""),
                );
                None
            }
        });
        let ca_root = self.path_key("acme.ca_root", a.ca_root);
        let retry_backoff = self.duration_in(
            a.retry_backoff.as_ref(),
            DEFAULT_ACME_RETRY_BACKOFF,
            ACME_RETRY_BACKOFF_RANGE,
        );
        let mut certificates = Vec::new();
        for c in a.certificates.unwrap_or_default() {
            let name_ok = self.certificate_name(&c.name, seen);
            let domains = self.acme_domains(&c.domains);
            if name_ok && !domains.is_empty() {
                certificates.push(AcmeCertificate {
                    name: c.name.into_inner(),
                    domains,
                });
            }
        }
        Acme {
            directory,
            email,
            ca_root,
            retry_backoff,
            certificates,
        }
    }

    /// A certificate name: unique across static and ACME certificates, and
    /// written like a service name (it becomes file names and URL segments).
    fn certificate_name(
        &mut self,
        name: &Spanned<String>,
        seen: &mut HashMap<String, usize>,
    ) -> bool {
        if !self.name(name, "certificate") {
            return false;
        }
        let line = super::line_col(self.text, name.span().start).0;
        match seen.get(name.get_ref()) {
            Some(first) => {
                self.at(
                    name,
                    format!(
                        "duplicate certificate name {:?}: already used on line {first}",
                        name.get_ref()
                    ),
                );
                false
            }
            None => {
                seen.insert(name.get_ref().clone(), line);
                true
            }
        }
    }

    /// ACME domains: DNS names in the request-host grammar (canonical form),
    /// no IP addresses and no wildcards (HTTP-01 cannot prove either, RFC
    /// 8555 §8.3), no repeats.
    fn acme_domains(&mut self, list: &Spanned<Vec<Spanned<String>>>) -> Vec<String> {
        if list.get_ref().is_empty() {
            self.at(
                list,
                "domains is empty: list the host names this certificate covers".into(),
            );
            return Vec::new();
        }
        if list.get_ref().len() > MAX_DOMAINS {
            self.at(
                list,
                format!(
                    "{} domains on one certificate: at most {MAX_DOMAINS}",
                    list.get_ref().len()
                ),
            );
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::new();
        for d in list.get_ref() {
            let text = d.get_ref();
            let parsed = crate::host::Authority::parse(text.as_bytes())
                .ok()
                .filter(|a| a.port().is_none());
            let host = match parsed {
                Some(a)
                    if a.host().parse::<std::net::IpAddr>().is_err()
                        && !a.host().starts_with('[') =>
                {
                    a.host().to_string()
                }
                _ => {
                    let why = if text.starts_with("*.") {
                        "wildcards need a DNS-01 challenge, and switchyard answers HTTP-01 only"
                    } else {
                        "give a DNS host name without port or scheme, e.g. \"api.example.com\""
                    };
                    self.at(d, format!("bad domain {text:?}: {why}"));
                    continue;
                }
            };
            if !host.contains('.') {
                self.at(
                    d,
                    format!("bad domain {text:?}: a public CA issues only for names with a dot"),
                );
                continue;
            }
            if out.contains(&host) {
                self.at(d, format!("domain {text:?} is listed twice"));
                continue;
            }
            out.push(host);
        }
        out
    }

    /// `Strict-Transport-Security` (RFC 6797 §6.1): `max-age=SECONDS` with
    /// optional `includeSubDomains` and `preload`, separated by `;`.
    fn hsts(&mut self, value: Spanned<String>) -> Option<String> {
        let text = value.get_ref();
        let mut max_age = false;
        let mut ok = true;
        for part in text.split(';').map(str::trim) {
            let lower = part.to_ascii_lowercase();
            if let Some(n) = lower.strip_prefix("max-age=") {
                ok &= !max_age
                    && !n.is_empty()
                    && n.len() <= 10
                    && n.bytes().all(|b| b.is_ascii_digit());
                max_age = true;
            } else {
                ok &= lower == "includesubdomains" || lower == "preload";
            }
        }
        if ok && max_age {
            Some(text.trim().to_string())
        } else {
            self.at(
                &value,
                format!(
                    "bad hsts {text:?}: expected \"max-age=SECONDS\", optionally followed by \"; includeSubDomains\" and \"; preload\""
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const SERVICE: &str =
        "[services.api]\nblue = [\"127.0.0.1:8080\"]\ngreen = [\"127.0.0.1:8081\"]\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("t.toml"), &format!("{text}\n{SERVICE}")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_issue_example_reads() {
        let c = parse(
            r#"
[listen]
http  = "0.0.0.0:80"
https = "0.0.0.0:443"

[tls]
certs_dir = "certs"
redirect_http = true
hsts = "max-age=31536000"
handshake_timeout = "10s"
default_certificate = "site"

[[tls.certificates]]
name = "internal"
cert = "certs/internal.pem"
key  = "certs/internal.key"

[acme]
directory = "https://acme-v02.api.letsencrypt.org/directory"
email = "ops@example.com"
ca_root = "certs/acme-ca.pem"

[[acme.certificates]]
name = "site"
domains = ["moyeobab.com", "API.moyeobab.com."]
"#,
        )
        .unwrap();
        assert_eq!(c.listen.https, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(c.tls.default_certificate.as_deref(), Some("site"));
        assert_eq!(c.tls.hsts.as_deref(), Some("max-age=31536000"));
        assert_eq!(c.tls.certificates[0].key, Path::new("certs/internal.key"));
        let acme = c.acme.unwrap();
        assert_eq!(
            acme.certificates[0].domains,
            ["moyeobab.com", "api.moyeobab.com"]
        );
        assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
        assert!(c.positions.contains_key("acme.ca_root"));
        assert!(c.positions.contains_key("tls.certificates.key#0"));
    }

    #[test]
    fn defaults_without_tls() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.https, None);
        assert!(c.tls.redirect_http);
        assert_eq!(c.tls.handshake_timeout, super::DEFAULT_HANDSHAKE_TIMEOUT);
        assert!(c.acme.is_none());
    }

    #[test]
    fn acme_retry_backoff_defaults_and_is_ranged() {
        let ok = |extra: &str| {
            format!("[listen]\nhttps = \"127.0.0.1:8443\"\n[acme]\n{extra}\n[[acme.certificates]]\nname = \"s\"\ndomains = [\"a.example.com\"]\n")
        };
        let c = parse(&ok("")).unwrap();
        assert_eq!(
            c.acme.unwrap().retry_backoff,
            super::DEFAULT_ACME_RETRY_BACKOFF
        );
        let c = parse(&ok("retry_backoff = \"5s\"")).unwrap();
        assert_eq!(c.acme.unwrap().retry_backoff, super::Duration::from_secs(5));
        let err = parse(&ok("retry_backoff = \"2h\"")).unwrap_err();
        assert!(err.contains("t.toml:4:17:"), "{err}");
    }

    #[test]
    fn mistakes_are_located() {
        let err = parse(
            r#"[listen]
https = "127.0.0.1:8443"
[tls]
hsts = "max-age=abc"
default_certificate = "nope"
[[tls.certificates]]
name = "a"
cert = "a.pem"
key = "a.key"
[acme]
directory = "http://ca.test/dir"
email = "not-an-address"
[[acme.certificates]]
name = "a"
domains = ["*.example.com", "10.0.0.1", "example.com:443", "localhost", "ok.example.com", "OK.example.com"]
[[acme.certificates]]
name = "empty"
domains = []
"#,
        )
        .unwrap_err();
        for want in [
            "t.toml:4:8: bad hsts \"max-age=abc\"",
            "t.toml:5:23: default_certificate \"nope\" names no certificate; configured: a",
            "t.toml:11:13: bad ACME directory \"http://ca.test/dir\"",
            "t.toml:12:9: bad email \"not-an-address\"",
            "t.toml:14:8: duplicate certificate name \"a\": already used on line 7",
            "t.toml:15:12: bad domain \"*.example.com\": wildcards need a DNS-01 challenge",
            "bad domain \"10.0.0.1\"",
            "bad domain \"example.com:443\"",
            "bad domain \"localhost\": a public CA issues only for names with a dot",
            "domain \"OK.example.com\" is listed twice",
            "t.toml:18:11: domains is empty",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }

    #[test]
    fn https_and_certificates_go_together() {
        let err = parse("[listen]\nhttps = \"127.0.0.1:8443\"\n").unwrap_err();
        assert!(err.contains("listen.https needs a certificate"), "{err}");
        let err = parse("[[tls.certificates]]\nname = \"a\"\ncert = \"a.pem\"\nkey = \"a.key\"\n")
            .unwrap_err();
        assert!(err.contains("[listen] https is not set"), "{err}");
    }

    #[test]
    fn hsts_forms() {
        for good in [
            "max-age=0",
            "max-age=31536000; includeSubDomains",
            "max-age=63072000; includeSubDomains; preload",
        ] {
            let text = format!("[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\nhsts = \"{good}\"\n[[tls.certificates]]\nname = \"a\"\ncert = \"a.pem\"\nkey = \"a.key\"\n");
            assert_eq!(parse(&text).unwrap().tls.hsts.as_deref(), Some(good));
        }
        for bad in [
            "",
            "includeSubDomains",
            "max-age=1; max-age=2",
            "max-age=-1",
            "max-age=1, preload",
        ] {
            let text = format!("[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\nhsts = \"{bad}\"\n[[tls.certificates]]\nname = \"a\"\ncert = \"a.pem\"\nkey = \"a.key\"\n");
            assert!(parse(&text).unwrap_err().contains("bad hsts"), "{bad}");
        }
    }
}
