//! Keeps every `[[acme.certificates]]` current: at start-up it serves what
//! is on disk (or a self-signed stand-in), then one background task per
//! certificate issues, schedules and renews it.
//!
//! When to renew: inside the CA's suggested window where the directory
//! offers renewal information (RFC 9773), at a random moment of it so a
//! fleet does not renew at once (§4.2); otherwise once less than a third of
//! the lifetime remains. A failed attempt is retried with exponential
//! backoff and jitter, capped, while the current certificate keeps serving.
//! `CertStore::request_renewal` (the admin API) renews at once.
//!
//! The schedule reads the time from a [`Clock`], and the waits are tokio
//! sleeps, so tests run it on paused time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::FutureExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;

use crate::config;
use crate::tls::acme::{Ca, Window};
use crate::tls::certs::{self, CertInfo, Certificate};
use crate::tls::store::{one_line, CertStore};

/// Renew once less than this fraction of the lifetime remains (one third:
/// 30 days of a 90-day certificate), when the CA gives no window.
pub const RENEW_REMAINING_DIVISOR: u32 = 3;
/// Longest wait between failed attempts (6 h): an outage of a day is
/// still retried four times, a rate limit is not hammered.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// Each retry delay is spread ± this fraction (20 %) so certificates that
/// failed together do not retry together.
pub const RETRY_JITTER: f64 = 0.2;
/// Shortest wait before asking the CA for renewal information again (60 s),
/// whatever its `Retry-After` says: a zero would be a busy loop.
pub const MIN_RENEWAL_INFO_RECHECK: Duration = Duration::from_secs(60);
/// Longest wait before asking again (24 h): RFC 9773 §4.3.2 lets clients
/// bound an unreasonable `Retry-After`.
pub const MAX_RENEWAL_INFO_RECHECK: Duration = Duration::from_secs(24 * 3600);
/// When renewal information cannot be fetched, ask again after this long
/// (1 h) and meanwhile follow the one-third rule.
pub const RENEWAL_INFO_FAILURE_RECHECK: Duration = Duration::from_secs(3600);
/// Longest single sleep (1 h): the wall clock is read again at least this
/// often, so a suspended host or a clock step does not delay a renewal.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// A renewal failure is logged as an error instead of a warning when the
/// certificate served expires within this long (7 days).
pub const URGENT_BEFORE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// A self-signed stand-in is replaced by a new one when it expires within
/// this long (1 day) and issuance still fails.
pub const BOOTSTRAP_REFRESH_BEFORE: Duration = Duration::from_secs(24 * 3600);

/// The wall clock the schedule reads.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// When the one-third rule renews `info`: `notAfter − lifetime / 3`.
pub fn one_third_due(info: &CertInfo) -> SystemTime {
    info.not_after - info.lifetime() / RENEW_REMAINING_DIVISOR
}

/// A moment inside the suggested window, uniformly at `r` ∈ [0, 1] of its
/// length (RFC 9773 §4.2). An inverted window counts as its start.
pub fn pick_in_window(start: SystemTime, end: SystemTime, r: f64) -> SystemTime {
    let len = end.duration_since(start).unwrap_or_default();
    start + len.mul_f64(r.clamp(0.0, 1.0))
}

/// The wait after the `failures`-th failure in a row (1, 2, ...): `base`
/// doubled per earlier failure, capped at [`MAX_RETRY_BACKOFF`], then
/// spread by `r` ∈ [0, 1] over ± [`RETRY_JITTER`] (never above the cap).
pub fn retry_delay(failures: u32, base: Duration, r: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(32);
    let plain = base
        .checked_mul(1u32 << doublings.min(31))
        .unwrap_or(MAX_RETRY_BACKOFF)
        .min(MAX_RETRY_BACKOFF);
    let factor = 1.0 - RETRY_JITTER + 2.0 * RETRY_JITTER * r.clamp(0.0, 1.0);
    plain.mul_f64(factor).min(MAX_RETRY_BACKOFF)
}

/// The CA's `Retry-After` for renewal information, bounded to
/// [`MIN_RENEWAL_INFO_RECHECK`]..=[`MAX_RENEWAL_INFO_RECHECK`].
pub fn renewal_info_recheck(retry_after: Duration) -> Duration {
    retry_after.clamp(MIN_RENEWAL_INFO_RECHECK, MAX_RENEWAL_INFO_RECHECK)
}

/// What to do next about one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// When to renew.
    pub renew_at: SystemTime,
    /// When to ask the CA for its window again, if before `renew_at`.
    pub recheck_at: Option<SystemTime>,
    /// Where `renew_at` comes from, for the log.
    pub reason: &'static str,
}

/// The plan for a certificate given the CA's window (if any) at `now`.
/// `r` places the renewal inside the window.
pub fn plan(info: &CertInfo, window: Option<&Window>, now: SystemTime, r: f64) -> Plan {
    match window {
        Some(w) => Plan {
            renew_at: pick_in_window(w.start, w.end, r),
            recheck_at: Some(now + renewal_info_recheck(w.retry_after)),
            reason: "CA's renewal window (ARI)",
        },
        None => Plan {
            renew_at: one_third_due(info),
            recheck_at: None,
            reason: "a third of the lifetime left",
        },
    }
}

/// An ACME certificate as start-up left it.
#[derive(Clone)]
pub struct Managed {
    pub name: String,
    pub domains: Vec<String>,
    /// What is served now; `None` only if not even a stand-in could be made.
    pub current: Option<Certificate>,
    /// Whether `current` is the self-signed stand-in (issue at once).
    pub bootstrap: bool,
    /// Whether `current` is a valid certificate from disk that lacks some
    /// configured domain (a domain was added): it keeps serving the names
    /// it has while a certificate for all of them is ordered at once.
    pub incomplete: bool,
}

/// Serves each ACME certificate before the listener starts: the files under
/// `certs_dir` if they are valid at `now` (ordered again at once if they
/// lack a configured domain: the names they have stay trusted meanwhile),
/// otherwise a self-signed stand-in, to be replaced by the first issuance.
/// Never waits for the CA.
pub fn load_at_start(
    acme: &config::Acme,
    certs_dir: &Path,
    store: &CertStore,
    now: SystemTime,
) -> Vec<Managed> {
    let mut out = Vec::new();
    for c in &acme.certificates {
        let (pem, key) = certs::acme_paths(certs_dir, &c.name);
        let on_disk = certs::load(&pem, &key)
            .map_err(|e| e.to_string())
            .and_then(|cert| {
                if cert.info.expired_at(now) {
                    return Err(format!("{} expired", pem.display()));
                }
                if !c.domains.iter().any(|d| cert.info.names.contains(d)) {
                    return Err(format!("{} names none of the domains", pem.display()));
                }
                Ok(cert)
            });
        let mut incomplete = false;
        let (current, bootstrap) = match on_disk {
            Ok(cert) => {
                let missing: Vec<&String> = c
                    .domains
                    .iter()
                    .filter(|d| !cert.info.names.contains(d))
                    .collect();
                if missing.is_empty() {
                    tracing::info!(certificate = c.name, serial = cert.info.serial, not_after = %humantime::format_rfc3339_seconds(cert.info.not_after), "ACME certificate loaded from disk");
                } else {
                    incomplete = true;
                    tracing::warn!(certificate = c.name, serial = cert.info.serial, missing = ?missing,
                        "ACME certificate on disk lacks configured domains: it keeps serving the names it has; ordering one for all of them now");
                }
                (Some(cert), false)
            }
            Err(why) => match certs::self_signed(&c.domains) {
                Ok(cert) => {
                    tracing::warn!(certificate = c.name, domains = ?c.domains, reason = %why,
                        "no usable ACME certificate: serving a temporary SELF-SIGNED certificate; \
                         clients will see an untrusted certificate until issuance succeeds");
                    (Some(cert), true)
                }
                Err(e) => {
                    tracing::error!(certificate = c.name, cause = %e, "cannot make a bootstrap certificate");
                    (None, true)
                }
            },
        };
        if let Some(cert) = &current {
            store.install(&c.name, cert.clone(), bootstrap);
        }
        out.push(Managed {
            name: c.name.clone(),
            domains: c.domains.clone(),
            current,
            bootstrap,
            incomplete,
        });
    }
    out
}

/// The background service renewing every ACME certificate.
pub struct Renewer<C: Ca, K: Clock = SystemClock> {
    inner: Arc<Inner<C, K>>,
    certs: Vec<Managed>,
}

struct Inner<C, K> {
    ca: C,
    store: Arc<CertStore>,
    clock: K,
    retry_backoff: Duration,
    /// Told about each failure (webhooks); unset in tests that do not ask.
    notifier: std::sync::OnceLock<Arc<crate::notify::Notifier>>,
}

impl<C: Ca, K: Clock> Renewer<C, K> {
    /// `certs` from [`load_at_start`]; `retry_backoff` is the first wait
    /// after a failure (`acme.retry_backoff`).
    pub fn new(
        ca: C,
        store: Arc<CertStore>,
        clock: K,
        retry_backoff: Duration,
        certs: Vec<Managed>,
    ) -> Self {
        Renewer {
            inner: Arc::new(Inner {
                ca,
                store,
                clock,
                retry_backoff,
                notifier: std::sync::OnceLock::new(),
            }),
            certs,
        }
    }

    /// Posts every renewal failure to the webhooks that want `certificate`.
    pub fn with_notifier(self, notifier: Arc<crate::notify::Notifier>) -> Self {
        let _ = self.inner.notifier.set(notifier);
        self
    }

    /// Runs every certificate's task until `shutdown` turns true.
    pub async fn run(&self, shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for m in &self.certs {
            let inner = self.inner.clone();
            let (m, shutdown) = (m.clone(), shutdown.clone());
            tasks.spawn(async move { inner.keep_current(m, shutdown).await });
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[async_trait]
impl<C: Ca, K: Clock> BackgroundService for Renewer<C, K> {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await
    }
}

/// What a task waits for.
enum Wake {
    Due,
    Forced,
    Shutdown,
}

impl<C: Ca, K: Clock> Inner<C, K> {
    /// Sleeps until `at` (wall clock), a forced renewal or shutdown.
    async fn wait_until(
        &self,
        at: SystemTime,
        forced: &tokio::sync::Notify,
        shutdown: &mut ShutdownWatch,
    ) -> Wake {
        loop {
            if *shutdown.borrow() {
                return Wake::Shutdown;
            }
            let Ok(left) = at.duration_since(self.clock.now()) else {
                return Wake::Due;
            };
            if left.is_zero() {
                return Wake::Due;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
                _ = forced.notified() => return Wake::Forced,
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return Wake::Shutdown },
            }
        }
    }

    /// The plan for `cert`, asking the CA for its window first.
    async fn plan_for(&self, name: &str, cert: &Certificate) -> Plan {
        let leaf = cert.key.cert[0].clone();
        let window = match self.ca.renewal_window(&leaf).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(certificate = name, cause = %one_line(&e.to_string()), "cannot fetch renewal information; following the one-third rule meanwhile");
                let mut p = plan(&cert.info, None, self.clock.now(), 0.0);
                p.recheck_at = Some(self.clock.now() + RENEWAL_INFO_FAILURE_RECHECK);
                return p;
            }
        };
        plan(
            &cert.info,
            window.as_ref(),
            self.clock.now(),
            rand::rng().random::<f64>(),
        )
    }

    /// Replaces a self-signed stand-in about to expire, so an outage of the
    /// CA longer than its lifetime still leaves something to handshake with.
    fn refresh_stand_in(&self, m: &mut Managed, now: SystemTime) {
        let expiring = m
            .current
            .as_ref()
            .is_none_or(|c| c.info.not_after < now + BOOTSTRAP_REFRESH_BEFORE);
        if !m.bootstrap || !expiring {
            return;
        }
        match certs::self_signed(&m.domains) {
            Ok(cert) => {
                tracing::warn!(certificate = m.name, "the self-signed stand-in was about to expire; serving a new one until issuance succeeds");
                self.store.install(&m.name, cert.clone(), true);
                m.current = Some(cert);
            }
            Err(e) => {
                tracing::error!(certificate = m.name, cause = %e, "cannot make a bootstrap certificate")
            }
        }
    }

    /// One certificate's life: renew when due, retry on failure, until
    /// shutdown.
    async fn keep_current(&self, mut m: Managed, mut shutdown: ShutdownWatch) {
        let Some(forced) = self.store.renewal_signal(&m.name) else {
            return;
        };
        let mut failures: u32 = 0;
        let mut retry_at: Option<SystemTime> = None;
        loop {
            // When to act, and whether that moment is a renewal or only a
            // new look at the CA's window.
            let (at, renew) = match (&m.current, retry_at) {
                (_, Some(at)) => (at, true),
                (None, None) => (self.clock.now(), true),
                (Some(_), None) if m.bootstrap || m.incomplete => (self.clock.now(), true),
                (Some(cert), None) => {
                    let p = self.plan_for(&m.name, cert).await;
                    tracing::info!(certificate = m.name, at = %humantime::format_rfc3339_seconds(p.renew_at), reason = p.reason, "renewal scheduled");
                    self.store.set_next_renewal(&m.name, Some(p.renew_at));
                    match p.recheck_at {
                        Some(r) if r < p.renew_at => (r, false),
                        _ => (p.renew_at, true),
                    }
                }
            };
            if retry_at.is_some() || m.bootstrap || m.incomplete || m.current.is_none() {
                self.store.set_next_renewal(&m.name, Some(at));
            }
            match self.wait_until(at, &forced, &mut shutdown).await {
                Wake::Shutdown => return,
                Wake::Due if !renew => continue,
                Wake::Forced => {
                    tracing::info!(certificate = m.name, "renewal requested");
                }
                Wake::Due => {}
            }
            let replaces = match (&m.current, m.bootstrap) {
                (Some(c), false) => Some(c.key.cert[0].clone()),
                _ => None,
            };
            let attempt = tokio::select! {
                r = self.ca.issue(&m.name, &m.domains, replaces.as_ref()) => r,
                _ = shutdown.changed() => return,
            };
            match attempt {
                Ok(cert) => {
                    tracing::info!(certificate = m.name, serial = cert.info.serial, not_after = %humantime::format_rfc3339_seconds(cert.info.not_after), "certificate issued and now served");
                    self.store.install(&m.name, cert.clone(), false);
                    self.store.record_success(&m.name);
                    m.current = Some(cert);
                    m.bootstrap = false;
                    m.incomplete = false;
                    failures = 0;
                    // A renewal requested while this one was under way is
                    // served by it: drop the stored wake-up rather than
                    // issue a second certificate (CAs limit duplicates).
                    let _ = forced.notified().now_or_never();
                    retry_at = None;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay =
                        retry_delay(failures, self.retry_backoff, rand::rng().random::<f64>());
                    let now = self.clock.now();
                    retry_at = Some(now + delay);
                    self.store.record_failure(&m.name, e.to_string());
                    self.refresh_stand_in(&mut m, now);
                    let urgent = m.bootstrap
                        || m.current
                            .as_ref()
                            .is_none_or(|c| c.info.not_after < now + URGENT_BEFORE_EXPIRY);
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                    if let Some(n) = self.notifier.get() {
                        n.notify(crate::notify::Notice::certificate_failed(
                            &m.name,
                            &one_line(&e.to_string()),
                        ));
                    }
                    if urgent {
                        tracing::error!(certificate = m.name, failures, retry_in = %retry_in, cause = %one_line(&e.to_string()), "certificate issuance failed; the current certificate keeps serving");
                    } else {
                        tracing::warn!(certificate = m.name, failures, retry_in = %retry_in, cause = %one_line(&e.to_string()), "certificate renewal failed; the current certificate keeps serving");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::acme::AcmeError;
    use rustls_pki_types::CertificateDer;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn info(not_before: SystemTime, lifetime: Duration) -> CertInfo {
        CertInfo {
            names: vec!["a.test".into()],
            issuer: "CN=t".into(),
            serial: "01".into(),
            not_before,
            not_after: not_before + lifetime,
        }
    }

    #[test]
    fn one_third_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * DAY;
        assert_eq!(one_third_due(&info(t0, 90 * DAY)), t0 + 60 * DAY);
        assert_eq!(one_third_due(&info(t0, 6 * DAY)), t0 + 4 * DAY);
    }

    #[test]
    fn window_pick_stays_inside() {
        let s = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let e = s + 2 * DAY;
        assert_eq!(pick_in_window(s, e, 0.0), s);
        assert_eq!(pick_in_window(s, e, 1.0), e);
        assert_eq!(pick_in_window(s, e, 0.5), s + DAY);
        assert_eq!(pick_in_window(s, e, 7.0), e, "r is clamped");
        assert_eq!(pick_in_window(e, s, 0.5), e, "inverted: its start");
    }

    #[test]
    fn backoff_doubles_then_caps_with_bounded_jitter() {
        let base = Duration::from_secs(60);
        assert_eq!(retry_delay(1, base, 0.5), base);
        assert_eq!(retry_delay(2, base, 0.5), 2 * base);
        assert_eq!(retry_delay(5, base, 0.5), 16 * base);
        assert_eq!(retry_delay(50, base, 0.5), MAX_RETRY_BACKOFF);
        assert_eq!(retry_delay(u32::MAX, base, 1.0), MAX_RETRY_BACKOFF);
        // ± 20 % at the extremes of r.
        assert_eq!(retry_delay(3, base, 0.0), (4 * base).mul_f64(0.8));
        assert_eq!(retry_delay(3, base, 1.0), (4 * base).mul_f64(1.2));
        for i in 0..=100 {
            let r = i as f64 / 100.0;
            let d = retry_delay(2, base, r);
            assert!(d >= base.mul_f64(1.6) && d <= base.mul_f64(2.4), "{d:?}");
            assert!(retry_delay(40, base, r) <= MAX_RETRY_BACKOFF);
        }
    }

    #[test]
    fn renewal_info_retry_after_is_bounded() {
        assert_eq!(
            renewal_info_recheck(Duration::ZERO),
            MIN_RENEWAL_INFO_RECHECK
        );
        assert_eq!(
            renewal_info_recheck(3 * 3600 * Duration::from_secs(1)),
            Duration::from_secs(3 * 3600)
        );
        assert_eq!(renewal_info_recheck(30 * DAY), MAX_RENEWAL_INFO_RECHECK);
    }

    #[test]
    fn plan_uses_the_window_where_offered() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let i = info(t0, 90 * DAY);
        let now = t0 + DAY;
        let w = Window {
            start: t0 + 10 * DAY,
            end: t0 + 12 * DAY,
            retry_after: Duration::from_secs(6 * 3600),
        };
        let p = plan(&i, Some(&w), now, 0.25);
        assert_eq!(p.renew_at, t0 + 10 * DAY + DAY / 2);
        assert_eq!(p.recheck_at, Some(now + Duration::from_secs(6 * 3600)));
        let p = plan(&i, None, now, 0.25);
        assert_eq!((p.renew_at, p.recheck_at), (t0 + 60 * DAY, None));
    }

    /// Wall clock following tokio's (paused) clock from a fixed start.
    #[derive(Clone, Copy)]
    struct TokioClock {
        start: SystemTime,
        base: tokio::time::Instant,
    }

    impl Clock for TokioClock {
        fn now(&self) -> SystemTime {
            self.start + self.base.elapsed()
        }
    }

    /// A CA that answers from scripts and records the calls.
    #[derive(Default)]
    struct FakeCa {
        /// Issuance results in order; empty: success.
        issue: Mutex<VecDeque<Result<(), String>>>,
        windows: Mutex<VecDeque<Option<(Duration, Duration, Duration)>>>,
        issued: Mutex<Vec<SystemTime>>,
        asked: Mutex<Vec<SystemTime>>,
        /// How long an issuance takes.
        delay: Mutex<Duration>,
        clock: Mutex<Option<TokioClock>>,
    }

    impl FakeCa {
        fn now(&self) -> SystemTime {
            self.clock.lock().unwrap().expect("clock set").now()
        }
    }

    impl Ca for Arc<FakeCa> {
        async fn issue(
            &self,
            _name: &str,
            domains: &[String],
            _replaces: Option<&CertificateDer<'static>>,
        ) -> Result<Certificate, AcmeError> {
            let now = self.now();
            self.issued.lock().unwrap().push(now);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            match self.issue.lock().unwrap().pop_front() {
                Some(Err(detail)) => Err(AcmeError::Ca {
                    step: "new order",
                    detail,
                }),
                _ => {
                    let mut c = certs::self_signed(domains).unwrap();
                    // Lifetimes in the clock's terms: 90 days from now.
                    c.info.not_before = now;
                    c.info.not_after = now + 90 * DAY;
                    Ok(c)
                }
            }
        }

        async fn renewal_window(
            &self,
            _leaf: &CertificateDer<'static>,
        ) -> Result<Option<Window>, AcmeError> {
            let now = self.now();
            self.asked.lock().unwrap().push(now);
            Ok(self
                .windows
                .lock()
                .unwrap()
                .pop_front()
                .flatten()
                .map(|(s, e, retry)| Window {
                    start: now + s,
                    end: now + e,
                    retry_after: retry,
                }))
        }
    }

    struct Harness {
        ca: Arc<FakeCa>,
        store: Arc<CertStore>,
        start: SystemTime,
        base: tokio::time::Instant,
        stop: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn now(&self) -> SystemTime {
            self.start + self.base.elapsed()
        }
    }

    fn acme_config() -> config::Acme {
        config::Acme {
            directory: "https://ca.test/dir".into(),
            email: None,
            ca_root: None,
            retry_backoff: Duration::from_secs(60),
            certificates: vec![config::AcmeCertificate {
                name: "site".into(),
                domains: vec!["a.test".into()],
            }],
        }
    }

    /// Starts the service on one certificate, bootstrap or `current`.
    fn start(ca: FakeCa, current: Option<Certificate>) -> Harness {
        start_with(ca, current, None)
    }

    /// [`start`], telling `notifier` about failures.
    fn start_with(
        ca: FakeCa,
        current: Option<Certificate>,
        notifier: Option<Arc<crate::notify::Notifier>>,
    ) -> Harness {
        let start = SystemTime::now();
        let base = tokio::time::Instant::now();
        let ca = Arc::new(ca);
        *ca.clock.lock().unwrap() = Some(TokioClock { start, base });
        let tls = config::Tls {
            certs_dir: "certs".into(),
            redirect_http: true,
            hsts: None,
            handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
            default_certificate: None,
            certificates: Vec::new(),
        };
        let acme = acme_config();
        let store = Arc::new(CertStore::new(&tls, Some(&acme)));
        let bootstrap = current.is_none();
        let current = current.unwrap_or_else(|| certs::self_signed(&["a.test".into()]).unwrap());
        store.install("site", current.clone(), bootstrap);
        let current = Some(current);
        let managed = vec![Managed {
            name: "site".into(),
            domains: vec!["a.test".into()],
            current,
            bootstrap,
            incomplete: false,
        }];
        let mut renewer = Renewer::new(
            ca.clone(),
            store.clone(),
            TokioClock { start, base },
            acme.retry_backoff,
            managed,
        );
        if let Some(n) = notifier {
            renewer = renewer.with_notifier(n);
        }
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { renewer.run(rx).await });
        Harness {
            ca,
            store,
            start,
            base,
            stop,
            task,
        }
    }

    /// Lets the paused clock run `d` of virtual time.
    async fn run_for(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn bootstrap_issues_at_once_then_schedules_a_third_before_expiry() {
        let h = start(FakeCa::default(), None);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 1);
        let st = h.store.get("site").unwrap();
        assert!(!st.bootstrap && st.failures == 0);
        let issued = h.ca.issued.lock().unwrap()[0];
        assert_eq!(st.next_renewal, Some(issued + 60 * DAY));
        // Nothing more until then.
        run_for(59 * DAY).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 1);
        run_for(2 * DAY).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 2, "renewed at day 60");
        h.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), h.task)
            .await
            .expect("stops promptly on shutdown")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_with_jitter_and_keep_serving() {
        let ca = FakeCa::default();
        ca.issue
            .lock()
            .unwrap()
            .extend((0..4).map(|_| Err("rateLimited".to_string())));
        let h = start(ca, None);
        let served = h.store.resolve(Some("a.test"));
        run_for(Duration::from_secs(1)).await;
        let st = h.store.get("site").unwrap();
        assert_eq!(st.failures, 1);
        assert!(st.last_error.as_deref().unwrap().contains("rateLimited"));
        assert!(st.bootstrap, "the stand-in keeps serving");
        assert!(Arc::ptr_eq(
            &served.unwrap(),
            &h.store.resolve(Some("a.test")).unwrap()
        ));
        // Attempts 2..5 follow delays of about 1, 2, 4, 8 min (± 20 %).
        run_for(30 * 60 * Duration::from_secs(1)).await;
        let at = h.ca.issued.lock().unwrap().clone();
        assert_eq!(at.len(), 5, "4 failures then a success");
        for (i, pair) in at.windows(2).enumerate() {
            let gap = pair[1].duration_since(pair[0]).unwrap();
            let want = Duration::from_secs(60) * (1 << i);
            assert!(
                gap >= want.mul_f64(0.8) && gap <= want.mul_f64(1.2) + Duration::from_millis(10),
                "retry {i}: {gap:?} not within 20 % of {want:?}"
            );
        }
        let st = h.store.get("site").unwrap();
        assert_eq!(
            (st.failures, st.failures_total, st.bootstrap),
            (0, 4, false)
        );
        assert!(st.last_error.is_none());
        h.stop.send(true).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn each_failure_is_a_certificate_notice() {
        use crate::config::{NotifyEvent, UrlSource, Webhook, WebhookFormat};
        use crate::notify::{load_url, Notifier};
        let ca = FakeCa::default();
        ca.issue
            .lock()
            .unwrap()
            .extend((0..2).map(|_| Err("rateLimited".to_string())));
        let hook = Webhook {
            name: "ops".into(),
            url: UrlSource::Env("U".into()),
            format: WebhookFormat::Json,
            events: vec![NotifyEvent::Certificate],
            index: 0,
        };
        let url = load_url(&hook, |_| Some("http://127.0.0.1:9/".into())).unwrap();
        let (notifier, sender) = Notifier::new(vec![(hook, url)]);
        let h = start_with(ca, None, Some(notifier));
        run_for(5 * 60 * Duration::from_secs(1)).await;
        let notices = sender.queued();
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert_eq!(notices[0].event, NotifyEvent::Certificate);
        assert_eq!(notices[0].service, "site");
        assert!(notices[0].reason.contains("rateLimited"), "{notices:?}");
        h.stop.send(true).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_window_decides_and_retry_after_is_honoured() {
        let ca = FakeCa::default();
        // First look: a window 10..11 days out, ask again in 2 h; then the
        // window moves to 1..2 h from the second look.
        ca.windows.lock().unwrap().extend([
            Some((10 * DAY, 11 * DAY, Duration::from_secs(2 * 3600))),
            Some((
                Duration::from_secs(3600),
                Duration::from_secs(2 * 3600),
                30 * DAY,
            )),
        ]);
        let mut current = certs::self_signed(&["a.test".into()]).unwrap();
        let now = SystemTime::now();
        current.info.not_before = now;
        current.info.not_after = now + 90 * DAY;
        let h = start(ca, Some(current));
        run_for(Duration::from_secs(1)).await;
        let first = h.ca.asked.lock().unwrap()[0];
        let next = h.store.get("site").unwrap().next_renewal.unwrap();
        assert!(
            next >= first + 10 * DAY && next <= first + 11 * DAY,
            "inside the window"
        );
        assert!(h.ca.issued.lock().unwrap().is_empty());
        run_for(2 * 3600 * Duration::from_secs(1)).await;
        let asked = h.ca.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "asked again after Retry-After");
        assert_eq!(
            asked[1].duration_since(asked[0]).unwrap(),
            Duration::from_secs(2 * 3600)
        );
        run_for(2 * 3600 * Duration::from_secs(1)).await;
        let issued = h.ca.issued.lock().unwrap().clone();
        assert_eq!(issued.len(), 1, "renewed inside the moved window");
        assert!(issued[0] >= asked[1] + Duration::from_secs(3600));
        assert!(issued[0] <= asked[1] + Duration::from_secs(2 * 3600));
        assert!(h.now() > h.start);
        h.stop.send(true).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn forced_renewal_renews_at_once() {
        let mut current = certs::self_signed(&["a.test".into()]).unwrap();
        let now = SystemTime::now();
        current.info.not_before = now;
        current.info.not_after = now + 90 * DAY;
        let h = start(FakeCa::default(), Some(current));
        run_for(Duration::from_secs(1)).await;
        assert!(h.ca.issued.lock().unwrap().is_empty());
        h.store.request_renewal("site").unwrap();
        run_for(Duration::from_secs(1)).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 1);
        h.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), h.task)
            .await
            .expect("stops promptly")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_requested_during_one_under_way_is_served_by_it() {
        let mut current = certs::self_signed(&["a.test".into()]).unwrap();
        let now = SystemTime::now();
        current.info.not_before = now;
        current.info.not_after = now + 90 * DAY;
        let ca = FakeCa::default();
        *ca.delay.lock().unwrap() = Duration::from_secs(10);
        let h = start(ca, Some(current));
        run_for(Duration::from_secs(1)).await;
        h.store.request_renewal("site").unwrap();
        run_for(Duration::from_secs(1)).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 1, "under way");
        h.store.request_renewal("site").unwrap();
        run_for(Duration::from_secs(60)).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 1, "no second one");
        // A request after it is done renews again.
        h.store.request_renewal("site").unwrap();
        run_for(Duration::from_secs(60)).await;
        assert_eq!(h.ca.issued.lock().unwrap().len(), 2);
        h.stop.send(true).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stand_in_near_expiry_is_replaced_while_issuance_fails() {
        let ca = FakeCa::default();
        ca.issue
            .lock()
            .unwrap()
            .extend((0..100).map(|_| Err("down".to_string())));
        let h = start(ca, None);
        let first = h.store.get("site").unwrap().info.unwrap().serial;
        run_for(5 * DAY).await;
        let st = h.store.get("site").unwrap();
        assert_eq!(st.info.unwrap().serial, first, "still valid: kept");
        run_for(2 * DAY).await;
        let st = h.store.get("site").unwrap();
        assert!(st.bootstrap);
        assert_ne!(st.info.unwrap().serial, first, "renewed stand-in");
        h.stop.send(true).unwrap();
    }

    #[test]
    fn start_up_uses_valid_files_and_bootstraps_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let acme = acme_config();
        let tls = config::Tls {
            certs_dir: dir.path().into(),
            redirect_http: true,
            hsts: None,
            handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
            default_certificate: None,
            certificates: Vec::new(),
        };
        let now = SystemTime::now();
        // Nothing on disk: bootstrap.
        let store = CertStore::new(&tls, Some(&acme));
        let m = load_at_start(&acme, dir.path(), &store, now);
        assert!(m[0].bootstrap && store.get("site").unwrap().bootstrap);
        assert!(store.resolve(Some("a.test")).is_some());
        // Valid files naming the domain: used as they are.
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (pem, keyp) = certs::acme_paths(dir.path(), "site");
        std::fs::write(&pem, cert.pem()).unwrap();
        std::fs::write(&keyp, key.serialize_pem()).unwrap();
        let store = CertStore::new(&tls, Some(&acme));
        let m = load_at_start(&acme, dir.path(), &store, now);
        assert!(!m[0].bootstrap && !store.get("site").unwrap().bootstrap);
        // The same files after their expiry, or for other domains: bootstrap.
        let store = CertStore::new(&tls, Some(&acme));
        let later = now + 31 * DAY;
        assert!(load_at_start(&acme, dir.path(), &store, later)[0].bootstrap);
        let mut other = acme.clone();
        other.certificates[0].domains = vec!["b.test".into()];
        let store = CertStore::new(&tls, Some(&other));
        assert!(load_at_start(&other, dir.path(), &store, now)[0].bootstrap);
        // A domain added: the files keep serving, ordered again at once.
        let mut added = acme.clone();
        added.certificates[0].domains.push("b.test".into());
        let store = CertStore::new(&tls, Some(&added));
        let m = load_at_start(&added, dir.path(), &store, now);
        assert!(!m[0].bootstrap && m[0].incomplete && !store.get("site").unwrap().bootstrap);
    }
}
