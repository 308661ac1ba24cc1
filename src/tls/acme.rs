//! The ACME client (RFC 8555) on instant-acme: the account, created once and
//! kept in `certs_dir`, one issuance with HTTP-01 challenges, and the CA's
//! renewal information (RFC 9773). When to call them is the renewal
//! service's business ([`crate::tls::renewal`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, CertificateIdentifier,
    ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls_pki_types::CertificateDer;

use crate::config;
use crate::tls::certs::{self, Certificate, PRIVATE_MODE, PUBLIC_MODE};
use crate::tls::challenge::Challenges;

/// The account credentials under `certs_dir` (JSON, 0600): the account URL
/// and its private key. Deleting it makes the next start create a new
/// account.
pub const ACCOUNT_FILE: &str = "acme-account.json";

/// How long the CA may take to validate every challenge of an order:
/// first look after 250 ms, each wait 1.5× the last, give up after 90 s.
const READY_POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// How long the CA may take to sign after finalization (same shape, 90 s).
const CERTIFICATE_POLL: RetryPolicy = READY_POLL;

/// Bound on one whole issuance, account included (5 min): a CA that takes
/// the connection but never answers cannot hold the renewal task forever.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound on one renewal-information request (30 s).
pub const RENEWAL_INFO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an ACME step failed. The text is what the log line and `GET /certs`
/// show: the step, and the CA's problem document (RFC 8555 §6.7) where it
/// sent one. Never credentials or keys.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA answered with an error, or could not be reached.
    #[error("{step}: {detail}")]
    Ca { step: &'static str, detail: String },
    /// A challenge was refused: the CA could not fetch the key
    /// authorization from `http://DOMAIN/.well-known/acme-challenge/`.
    #[error("validation of {domain} failed: {detail}")]
    Validation { domain: String, detail: String },
    #[error("the CA offers no http-01 challenge for {0} (switchyard answers HTTP-01 only)")]
    NoHttp01(String),
    #[error("cannot read {}: {detail} (delete it to create a new account)", path.display())]
    AccountFile { path: PathBuf, detail: String },
    /// The account file exists but cannot be read (permissions, or
    /// `certs_dir` is not a directory): deleting it is not the remedy.
    #[error("cannot read {}: {source}", path.display())]
    ReadAccount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA's certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("no answer from the CA within {0:?}")]
    Timeout(Duration),
}

/// Whether `e` is the CA's problem document of type
/// `urn:ietf:params:acme:error:{kind}` (RFC 8555 §6.7).
fn problem_is(e: &instant_acme::Error, kind: &str) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref().and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:")) == Some(kind))
}

fn ca(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |e| AcmeError::Ca {
        step,
        detail: with_causes(&e),
    }
}

/// `e` and its causes, `: `-separated: hyper's "client error (Connect)"
/// alone does not say that the connection was refused.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

/// When the CA suggests renewing one certificate (RFC 9773 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The CA's `suggestedWindow.start`.
    pub start: SystemTime,
    /// The CA's `suggestedWindow.end`; past it, renew at once.
    pub end: SystemTime,
    /// When to ask again (the answer's `Retry-After`, RFC 9773 §4.3).
    pub retry_after: Duration,
}

/// The CA as the renewal service uses it; [`AcmeClient`] is the real one.
/// Tests drive the service with a fake.
pub trait Ca: Send + Sync + 'static {
    /// Obtains a new certificate for `domains` and stores it as `name` in
    /// `certs_dir`. `replaces` names the certificate it succeeds (RFC 9773
    /// §5), when the CA offers renewal information.
    fn issue(
        &self,
        name: &str,
        domains: &[String],
        replaces: Option<&CertificateDer<'static>>,
    ) -> impl std::future::Future<Output = Result<Certificate, AcmeError>> + Send;

    /// The CA's suggested renewal window for `leaf`; `Ok(None)` when the
    /// directory offers no renewal information.
    fn renewal_window(
        &self,
        leaf: &CertificateDer<'static>,
    ) -> impl std::future::Future<Output = Result<Option<Window>, AcmeError>> + Send;
}

/// One ACME account on one directory, issuing into `certs_dir`.
pub struct AcmeClient {
    directory: String,
    email: Option<String>,
    ca_root: Option<PathBuf>,
    certs_dir: PathBuf,
    challenges: Arc<Challenges>,
    /// Loaded or created on first use, so start-up never waits for the CA.
    account: tokio::sync::Mutex<Option<Account>>,
}

impl AcmeClient {
    /// A client for `acme.directory` keeping its files in `certs_dir` and
    /// publishing HTTP-01 answers in `challenges` (the plain listener's).
    /// Contacts nothing yet.
    pub fn new(acme: &config::Acme, certs_dir: &Path, challenges: Arc<Challenges>) -> AcmeClient {
        AcmeClient {
            directory: acme.directory.clone(),
            email: acme.email.clone(),
            ca_root: acme.ca_root.clone(),
            certs_dir: certs_dir.to_path_buf(),
            challenges,
            account: tokio::sync::Mutex::new(None),
        }
    }

    fn builder(&self) -> Result<AccountBuilder, AcmeError> {
        match &self.ca_root {
            Some(root) => Account::builder_with_root(root).map_err(|e| AcmeError::Ca {
                step: "ca_root",
                detail: format!("{}: {e}", root.display()),
            }),
            None => Account::builder().map_err(ca("HTTP client")),
        }
    }

    /// The account: the stored one if its file exists and was made on this
    /// directory, otherwise a new one (terms of service agreed, contact
    /// `mailto:EMAIL`), stored at once (RFC 8555 §7.3).
    pub async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let path = self.certs_dir.join(ACCOUNT_FILE);
        let account = match read_credentials(&path, &self.directory)? {
            Some(credentials) => self
                .builder()?
                .from_credentials(credentials)
                .await
                .map_err(ca("ACME directory"))?,
            None => self.create_account().await?,
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// Creates an account (terms of service agreed, contact `mailto:EMAIL`)
    /// and stores its credentials, replacing any stored ones.
    async fn create_account(&self) -> Result<Account, AcmeError> {
        let path = self.certs_dir.join(ACCOUNT_FILE);
        let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.directory.clone(),
                None,
            )
            .await
            .map_err(ca("new account"))?;
        let json = serde_json::to_vec_pretty(&credentials).map_err(|e| AcmeError::AccountFile {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::create_dir_all(&self.certs_dir).map_err(|source| AcmeError::Write {
            path: self.certs_dir.clone(),
            source,
        })?;
        certs::write_atomic(&path, &json, PRIVATE_MODE).map_err(|source| AcmeError::Write {
            path: path.clone(),
            source,
        })?;
        tracing::info!(directory = %self.directory, account = account.id(), file = %path.display(), "ACME account created");
        Ok(account)
    }

    async fn issue_inner(
        &self,
        name: &str,
        domains: &[String],
        replaces: Option<&CertificateDer<'static>>,
    ) -> Result<Certificate, AcmeError> {
        let identifiers: Vec<Identifier> =
            domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
        let replaces = replaces.and_then(|leaf| CertificateIdentifier::try_from(leaf).ok());
        let account = self.account().await?;
        let mut order = match self.new_order(&account, name, &identifiers, replaces.clone()).await {
            // A CA restarted or reset (or an account deactivated elsewhere)
            // no longer knows the stored account: make a new one, once.
            Err(e) if problem_is(&e, "accountDoesNotExist") => {
                tracing::warn!(certificate = name, directory = %self.directory, "the CA no longer knows the stored ACME account; creating a new one");
                let account = self.create_account().await?;
                *self.account.lock().await = Some(account.clone());
                self.new_order(&account, name, &identifiers, replaces).await
            }
            other => other,
        }
        .map_err(ca("new order"))?;

        // Answered from the moment a token is added until this is dropped,
        // whatever happens in between (errors, timeouts, cancellation).
        let mut pending = Pending {
            challenges: &self.challenges,
            tokens: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(ca("authorization"))?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Validation {
                        domain: authz.identifier().to_string(),
                        detail: format!("authorization is {other:?}"),
                    })
                }
            }
            let domain = authz.identifier().to_string();
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| AcmeError::NoHttp01(domain.clone()))?;
            pending.add(&challenge.token, challenge.key_authorization().as_str());
            challenge.set_ready().await.map_err(ca("challenge"))?;
        }
        let status = order
            .poll_ready(&READY_POLL)
            .await
            .map_err(ca("validation"))?;
        if status != OrderStatus::Ready {
            return Err(self.why_invalid(&mut order).await);
        }
        drop(pending);

        // A fresh ECDSA P-256 key for every certificate.
        let key_pem = order.finalize().await.map_err(ca("finalize"))?;
        let chain = order
            .poll_certificate(&CERTIFICATE_POLL)
            .await
            .map_err(ca("certificate"))?;
        let cert = certs::from_pem(chain.as_bytes(), key_pem.as_bytes())
            .map_err(|e| AcmeError::BadCertificate(e.to_string()))?;
        if let Some(missing) = domains.iter().find(|d| !cert.info.names.contains(d)) {
            return Err(AcmeError::BadCertificate(format!(
                "{missing} is not among its names"
            )));
        }
        let (pem_path, key_path) = certs::acme_paths(&self.certs_dir, name);
        std::fs::create_dir_all(&self.certs_dir).map_err(|source| AcmeError::Write {
            path: self.certs_dir.clone(),
            source,
        })?;
        // Key first: a crash between the two leaves a pair that does not
        // match, which the next start treats as missing and reissues.
        for (path, bytes, mode) in [
            (&key_path, key_pem.as_bytes(), PRIVATE_MODE),
            (&pem_path, chain.as_bytes(), PUBLIC_MODE),
        ] {
            certs::write_atomic(path, bytes, mode).map_err(|source| AcmeError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(cert)
    }

    /// A new order, naming the certificate it replaces where possible.
    async fn new_order(
        &self,
        account: &Account,
        name: &str,
        identifiers: &[Identifier],
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<instant_acme::Order, instant_acme::Error> {
        if let Some(id) = replaces {
            match account
                .new_order(&NewOrder::new(identifiers).replaces(id))
                .await
            {
                // No renewal information at this CA, or the CA refused the
                // `replaces` field, however it words it (RFC 9773 §5 lets it:
                // already replaced, a certificate another account ordered,
                // such as certbot's after a migration, one it never issued,
                // no identifier in common): a plain order still renews, and
                // retrying the same field would fail until expiry. An
                // unknown account is the caller's to handle; a rate limit
                // would refuse the plain order too.
                Err(e)
                    if matches!(e, instant_acme::Error::Unsupported(_))
                        || (matches!(e, instant_acme::Error::Api(_))
                            && !problem_is(&e, "accountDoesNotExist")
                            && !problem_is(&e, "rateLimited")) =>
                {
                    tracing::info!(certificate = name, cause = %crate::tls::store::one_line(&e.to_string()), "ordering without `replaces`");
                }
                other => return other,
            }
        }
        account.new_order(&NewOrder::new(identifiers)).await
    }

    /// The first failed challenge's problem, for the log line.
    async fn why_invalid(&self, order: &mut instant_acme::Order) -> AcmeError {
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let Ok(state) = authz.refresh().await else {
                continue;
            };
            if state.status == AuthorizationStatus::Valid {
                continue;
            }
            let domain = state.identifier().to_string();
            let detail = state
                .challenges
                .iter()
                .find_map(|c| c.error.as_ref().map(|p| p.to_string()))
                .unwrap_or_else(|| format!("authorization is {:?}", state.status));
            return AcmeError::Validation { domain, detail };
        }
        AcmeError::Ca {
            step: "validation",
            detail: "the order became invalid".into(),
        }
    }
}

impl Ca for AcmeClient {
    async fn issue(
        &self,
        name: &str,
        domains: &[String],
        replaces: Option<&CertificateDer<'static>>,
    ) -> Result<Certificate, AcmeError> {
        tokio::time::timeout(ATTEMPT_TIMEOUT, self.issue_inner(name, domains, replaces))
            .await
            .map_err(|_| AcmeError::Timeout(ATTEMPT_TIMEOUT))?
    }

    async fn renewal_window(
        &self,
        leaf: &CertificateDer<'static>,
    ) -> Result<Option<Window>, AcmeError> {
        let ask = async {
            let account = self.account().await?;
            let id = CertificateIdentifier::try_from(leaf).map_err(|detail| AcmeError::Ca {
                step: "renewal info",
                detail,
            })?;
            match account.renewal_info(&id).await {
                Ok((info, retry_after)) => Ok(Some(Window {
                    start: info.suggested_window.start.into(),
                    end: info.suggested_window.end.into(),
                    retry_after,
                })),
                Err(instant_acme::Error::Unsupported(_)) => Ok(None),
                Err(e) => Err(ca("renewal info")(e)),
            }
        };
        tokio::time::timeout(RENEWAL_INFO_TIMEOUT, ask)
            .await
            .map_err(|_| AcmeError::Timeout(RENEWAL_INFO_TIMEOUT))?
    }
}

/// Reads stored credentials; `None` when there are none for `directory`
/// (no file yet, or one made on another directory: a new account is made
/// and replaces it).
fn read_credentials(path: &Path, directory: &str) -> Result<Option<AccountCredentials>, AcmeError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AcmeError::ReadAccount {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // serde_json's messages quote no input, so the key stays out of logs.
    let bad = |e: serde_json::Error| AcmeError::AccountFile {
        path: path.to_path_buf(),
        detail: format!("not ACME account credentials ({e})"),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    if value.get("directory").and_then(|d| d.as_str()) != Some(directory) {
        tracing::warn!(file = %path.display(), directory, "stored ACME account belongs to another directory; creating a new account");
        return Ok(None);
    }
    serde_json::from_value(value).map(Some).map_err(bad)
}

/// Challenge tokens of one order, withdrawn when dropped.
struct Pending<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
}

impl Pending<'_> {
    fn add(&mut self, token: &str, key_authorization: &str) {
        self.challenges.insert(token, key_authorization);
        self.tokens.push(token.to_string());
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.challenges.remove(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_tokens_are_withdrawn_on_drop() {
        let c = Challenges::new();
        {
            let mut p = Pending {
                challenges: &c,
                tokens: Vec::new(),
            };
            p.add("t1", "t1.k");
            p.add("t2", "t2.k");
            assert!(c.answer(b"/.well-known/acme-challenge/t1").is_some());
        }
        assert!(c.answer(b"/.well-known/acme-challenge/t1").is_none());
        assert!(c.answer(b"/.well-known/acme-challenge/t2").is_none());
    }

    #[test]
    fn credentials_of_another_directory_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCOUNT_FILE);
        assert!(read_credentials(&path, "https://ca/dir").unwrap().is_none());
        std::fs::write(
            &path,
            br#"{"id":"https://ca/acct/1","key_pkcs8":"AAAA","directory":"https://other/dir"}"#,
        )
        .unwrap();
        assert!(read_credentials(&path, "https://ca/dir").unwrap().is_none());
        std::fs::write(&path, b"{not json").unwrap();
        let Err(e) = read_credentials(&path, "https://ca/dir") else {
            panic!("a broken account file is an error");
        };
        let e = e.to_string();
        assert!(e.contains(ACCOUNT_FILE) && e.contains("delete it"), "{e}");
    }
}
