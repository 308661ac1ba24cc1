//! Webhook notifications (`[[notify.webhooks]]`): what happened to the
//! traffic (a switch, a rollback, the active pool losing its last healthy
//! backend, a failed certificate renewal), posted to Discord, Slack or any
//! receiver of plain JSON.
//!
//! The code where an event happens only calls [`Notifier::notify`], which
//! puts the notice on each interested webhook's bounded queue without
//! waiting: a request or a switch never waits for a receiver. When a queue
//! is full the notice is dropped for that webhook, counted, and said once
//! in the log. A background service ([`NotifySender`], started by Pingora
//! after `--daemon` forks) runs one task per webhook that posts its queue
//! in order, each delivery within [`DELIVERY_TIMEOUT`], retried up to
//! [`MAX_ATTEMPTS`] times with exponential backoff and jitter on a
//! connection error, a timeout, 429 or 5xx. Delivery is at most
//! [`MAX_ATTEMPTS`] tries, never guaranteed: what is queued when switchyard
//! stops is lost.
//!
//! The URL is a secret (a Discord or Slack webhook URL is the credential to
//! post): it is read from a 0600 file or an environment variable, and is
//! never logged, in an error, in `/status` or in the history; logs and
//! errors name the webhook (`webhook team-discord`) instead.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::{self, NotifyEvent, UrlSource, WebhookFormat};
use crate::pools::{Color, Weights};

/// Notices a webhook's queue holds (256) before new ones are dropped: a
/// receiver down for the whole retry span of a burst of events falls behind
/// by this much, and no more memory than that.
pub const QUEUE_NOTICES: usize = 256;
/// Longest one delivery may take, connect to answer (5 s). Discord and
/// Slack answer in well under a second.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per notice and webhook (4): the first and up to three retries.
pub const MAX_ATTEMPTS: u32 = 4;
/// Wait before the first retry (500 ms); it doubles for each retry after,
/// plus a random jitter of up to half of it, so that many switchyards do
/// not retry against one receiver in step.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest URL read from a file or variable (2048 bytes): webhook URLs are
/// about 120.
pub const MAX_URL_LEN: usize = 2048;

/// A webhook URL. Never printed: `Debug` shows only that it is redacted.
#[derive(Clone)]
pub struct WebhookUrl(String);

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookUrl(redacted)")
    }
}

/// Why a webhook's URL cannot be used. Messages name the webhook and where
/// its URL is, never the URL.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(
        "webhook {name}: cannot read url_file {}: {source}",
        config::show_path(path)
    )]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("webhook {name}: url_file {} is not a regular file; give a file (mode 0600) that holds the URL", config::show_path(path))]
    NotAFile { name: String, path: PathBuf },
    #[error("webhook {name}: url_file {} is accessible by group or others (mode {mode:04o}); the URL is a secret: run chmod 600 on it", config::show_path(path))]
    Permissions {
        name: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("webhook {name}: environment variable {var} (url_env) is not set")]
    EnvUnset { name: String, var: String },
    #[error("webhook {name}: the URL (from {from}) is not an http:// or https:// URL with a host")]
    NotHttp { name: String, from: String },
}

/// Reads a webhook's URL from its file (a regular file, mode 0600, as the
/// admin token file) or variable (`env` looks one up), trimmed, and checks
/// it is `http://` or `https://` with a host.
pub fn load_url(
    hook: &config::Webhook,
    env: impl Fn(&str) -> Option<String>,
) -> Result<WebhookUrl, UrlError> {
    let name = hook.name.clone();
    let (raw, from) = match &hook.url {
        UrlSource::File(path) => (read_url_file(&name, path)?, "url_file".to_string()),
        UrlSource::Env(var) => match env(var) {
            Some(v) => (v, format!("${var}")),
            None => {
                return Err(UrlError::EnvUnset {
                    name,
                    var: var.clone(),
                })
            }
        },
    };
    let url = raw.trim();
    let ok = url.len() <= MAX_URL_LEN
        && url.parse::<http::Uri>().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        });
    if !ok {
        return Err(UrlError::NotHttp { name, from });
    }
    Ok(WebhookUrl(url.to_string()))
}

fn read_url_file(name: &str, path: &Path) -> Result<String, UrlError> {
    let read_err = |source| UrlError::Read {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(UrlError::NotAFile {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(UrlError::Permissions {
            name: name.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// Reads every configured webhook's URL ([`load_url`] with the process
/// environment); the first problem stops start-up.
pub fn load_urls(notify: &config::Notify) -> Result<Vec<(config::Webhook, WebhookUrl)>, UrlError> {
    notify
        .webhooks
        .iter()
        .map(|w| Ok((w.clone(), load_url(w, |v| std::env::var(v).ok())?)))
        .collect()
}

/// One thing that happened, as every format tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub event: NotifyEvent,
    /// The service (or, for `certificate`, the certificate's name).
    pub service: String,
    /// Before and after: colors for a switch or rollback, `serving` and
    /// `maintenance` for maintenance mode, `healthy`/`unhealthy` for health.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Why: the operator's reason, the rollback's figures, the failure.
    pub reason: String,
    /// One line for humans (Discord's `content`, Slack's `text`).
    pub summary: String,
    pub time: SystemTime,
    /// Who or what made the change (`token:ci`, `rollback-watcher`...),
    /// when a person or a mover made it; `None` for what just happened
    /// (health, certificates).
    pub actor: Option<String>,
    /// Discord embed color (0xRRGGBB).
    color: u32,
}

/// Discord embed colors: the pool's own color for a switch to it; amber for
/// a rollback; red for a loss, a failure.
const BLUE: u32 = 0x3498db;
const GREEN: u32 = 0x2ecc71;
const AMBER: u32 = 0xe67e22;
const RED: u32 = 0xe74c3c;
const GREY: u32 = 0x95a5a6;

fn color_of(c: Color) -> u32 {
    match c {
        Color::Blue => BLUE,
        Color::Green => GREEN,
    }
}

impl Notice {
    /// The active color of `service` changed: `rollback` when it went back
    /// to the previous one.
    pub fn switched(service: &str, from: Color, to: Color, rollback: bool, reason: &str) -> Notice {
        let (event, verb, color) = match rollback {
            true => (NotifyEvent::Rollback, "rolled back", AMBER),
            false => (NotifyEvent::Switch, "switched", color_of(to)),
        };
        Notice {
            event,
            service: service.to_string(),
            from: Some(from.to_string()),
            to: Some(to.to_string()),
            reason: reason.to_string(),
            summary: format!("{service} {verb} from {from} to {to}: {reason}"),
            time: SystemTime::now(),
            actor: None,
            color,
        }
    }

    /// Maintenance mode turned on or off: a `switch` event from `serving`
    /// to `maintenance` or back, since it changes where traffic goes.
    pub fn maintenance(service: &str, on: bool) -> Notice {
        let (from, to) = match on {
            true => ("serving", "maintenance"),
            false => ("maintenance", "serving"),
        };
        let what = if on { "on" } else { "off" };
        Notice {
            event: NotifyEvent::Switch,
            service: service.to_string(),
            from: Some(from.into()),
            to: Some(to.into()),
            reason: format!("maintenance mode {what}"),
            summary: format!("{service}: maintenance mode {what}"),
            time: SystemTime::now(),
            actor: None,
            color: if on { AMBER } else { GREY },
        }
    }

    /// The active pool (`color`) of `service` lost its last healthy backend
    /// (`lost`), or has one again.
    pub fn active_health(service: &str, color: Color, lost: bool, detail: &str) -> Notice {
        let (from, to, summary, c) = match lost {
            true => (
                "healthy",
                "unhealthy",
                format!("{service}: active pool {color} has no healthy backend left"),
                RED,
            ),
            false => (
                "unhealthy",
                "healthy",
                format!("{service}: active pool {color} has a healthy backend again"),
                GREEN,
            ),
        };
        Notice {
            event: NotifyEvent::Health,
            service: service.to_string(),
            from: Some(from.into()),
            to: Some(to.into()),
            reason: detail.to_string(),
            summary,
            time: SystemTime::now(),
            actor: None,
            color: c,
        }
    }

    /// The split of `service` between its colors changed (a canary step).
    pub fn weights(service: &str, from: Weights, to: Weights, reason: &str) -> Notice {
        let (from, to) = (
            format!("{}/{}", from.blue, from.green),
            format!("{}/{}", to.blue, to.green),
        );
        Notice {
            event: NotifyEvent::Weights,
            service: service.to_string(),
            summary: format!("{service}: weights blue/green {from} → {to}: {reason}"),
            from: Some(from),
            to: Some(to),
            reason: reason.to_string(),
            time: SystemTime::now(),
            actor: None,
            color: GREY,
        }
    }

    /// Any other event (`deploy`): `summary` is the one line
    /// for humans, `from`/`to` what changed (e.g. `90/10` → `50/50`).
    pub fn new(
        event: NotifyEvent,
        service: &str,
        from: Option<String>,
        to: Option<String>,
        reason: &str,
        summary: String,
    ) -> Notice {
        Notice {
            event,
            service: service.to_string(),
            from,
            to,
            reason: reason.to_string(),
            summary,
            time: SystemTime::now(),
            actor: None,
            color: GREY,
        }
    }

    /// Certificate `name` could not be issued or renewed.
    pub fn certificate_failed(name: &str, cause: &str) -> Notice {
        Notice {
            event: NotifyEvent::Certificate,
            service: name.to_string(),
            from: None,
            to: None,
            reason: cause.to_string(),
            summary: format!(
                "certificate {name}: renewal failed; the current certificate keeps serving"
            ),
            time: SystemTime::now(),
            actor: None,
            color: RED,
        }
    }

    /// The same notice, naming who made the change (see [`Notice::actor`]).
    pub fn by(mut self, actor: &crate::store::Actor) -> Notice {
        self.actor = Some(actor.to_string());
        self
    }

    fn time_text(&self) -> String {
        humantime::format_rfc3339_millis(self.time).to_string()
    }

    /// The request body for `format`.
    pub fn body(&self, format: WebhookFormat) -> Value {
        match format {
            WebhookFormat::Discord => self.discord(),
            WebhookFormat::Slack => {
                json!({ "text": format!("switchyard: {}{}", self.summary, self.by_text()) })
            }
            WebhookFormat::Json => json!({
                "event": self.event.as_str(),
                "service": self.service,
                "from": self.from,
                "to": self.to,
                "reason": self.reason,
                "actor": self.actor,
                "time": self.time_text(),
                "summary": self.summary,
                "source": "switchyard",
            }),
        }
    }

    /// ` (by ACTOR)` after the summary, when known.
    fn by_text(&self) -> String {
        self.actor
            .as_ref()
            .map(|a| format!(" (by {a})"))
            .unwrap_or_default()
    }

    /// Discord's execute-webhook body: a one-line `content` and one embed
    /// with the details as fields. `allowed_mentions` is empty so that a
    /// reason holding `@everyone` pings nobody.
    fn discord(&self) -> Value {
        let mut fields = vec![json!({"name": "service", "value": self.service, "inline": true})];
        if let Some(from) = &self.from {
            fields.push(json!({"name": "from", "value": from, "inline": true}));
        }
        if let Some(to) = &self.to {
            fields.push(json!({"name": "to", "value": to, "inline": true}));
        }
        if let Some(actor) = &self.actor {
            fields.push(json!({"name": "by", "value": actor, "inline": true}));
        }
        // Discord refuses an embed description over 4096 characters.
        let reason: String = self.reason.chars().take(4000).collect();
        json!({
            "username": "switchyard",
            "content": format!("{}{}", self.summary, self.by_text()).chars().take(1900).collect::<String>(),
            "allowed_mentions": {"parse": []},
            "embeds": [{
                "title": format!("{}: {}", self.event, self.service),
                "description": reason,
                "color": self.color,
                "fields": fields,
                "timestamp": self.time_text(),
            }],
        })
    }
}

/// One webhook's side of the queue.
struct Hook {
    name: String,
    events: Vec<NotifyEvent>,
    tx: mpsc::Sender<Notice>,
    dropped: AtomicU64,
    /// Whether a full queue has been said in the log (once).
    said_full: AtomicBool,
}

/// The hook every event source calls. Cheap and never blocking; with no
/// webhooks configured it does nothing.
#[derive(Default)]
pub struct Notifier {
    hooks: Vec<Hook>,
}

/// The receiving side, for [`NotifySender`].
struct Outbox {
    name: String,
    url: WebhookUrl,
    format: WebhookFormat,
    rx: mpsc::Receiver<Notice>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn off() -> Notifier {
        Notifier::default()
    }

    /// The notifier and the background service that delivers what it is
    /// given; add the service to the server.
    pub fn new(hooks: Vec<(config::Webhook, WebhookUrl)>) -> (Arc<Notifier>, NotifySender) {
        let mut list = Vec::new();
        let mut outboxes = Vec::new();
        for (hook, url) in hooks {
            let (tx, rx) = mpsc::channel(QUEUE_NOTICES);
            list.push(Hook {
                name: hook.name.clone(),
                events: hook.events.clone(),
                tx,
                dropped: AtomicU64::new(0),
                said_full: AtomicBool::new(false),
            });
            outboxes.push(Outbox {
                name: hook.name,
                url,
                format: hook.format,
                rx,
            });
        }
        (
            Arc::new(Notifier { hooks: list }),
            NotifySender {
                outboxes: Mutex::new(outboxes),
            },
        )
    }

    /// Queues `notice` for every webhook that wants its event. Returns at
    /// once; a full queue drops the notice for that webhook (counted).
    pub fn notify(&self, notice: Notice) {
        for hook in self
            .hooks
            .iter()
            .filter(|h| h.events.contains(&notice.event))
        {
            if hook.tx.try_send(notice.clone()).is_err() {
                hook.dropped.fetch_add(1, Ordering::Relaxed);
                if !hook.said_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(webhook = hook.name, queue = QUEUE_NOTICES, "webhook queue full (receiver slow or down); dropping notices for it, counted, said once");
                }
            }
        }
    }

    /// Notices dropped for a full queue, per webhook name.
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.hooks
            .iter()
            .map(|h| (h.name.clone(), h.dropped.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Delivers every webhook's queue: one task per webhook, so a dead
/// receiver holds up only its own notices.
pub struct NotifySender {
    outboxes: Mutex<Vec<Outbox>>,
}

impl NotifySender {
    /// Takes what is queued and not yet sent, for tests of event sources.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> Vec<Notice> {
        let mut boxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for b in boxes.iter_mut() {
            while let Ok(n) = b.rx.try_recv() {
                out.push(n);
            }
        }
        out
    }
}

/// What one try came to.
enum Outcome {
    Delivered,
    /// Worth another try: no connection, no answer, 429 or 5xx.
    Retry(String),
    /// Not worth another try (another 4xx: wrong or revoked URL).
    Fail(String),
}

/// The wait before retry `n` (1-based): [`RETRY_BASE`] doubled `n - 1`
/// times, plus up to half of that at random (`r` in 0..1).
pub fn retry_delay(n: u32, r: f64) -> Duration {
    let base = RETRY_BASE * 2u32.saturating_pow(n.saturating_sub(1).min(10));
    base + base.mul_f64(r.clamp(0.0, 1.0) / 2.0)
}

/// One POST, blocking (run on the blocking pool).
fn post(agent: &ureq::Agent, url: &WebhookUrl, body: &[u8]) -> Outcome {
    let result = agent
        .post(url.0.as_str())
        .header("content-type", "application/json")
        .send(body);
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match status {
                200..=299 => Outcome::Delivered,
                429 | 500..=599 => Outcome::Retry(format!("status {status}")),
                _ => Outcome::Fail(format!("status {status}")),
            }
        }
        // Said in our words: some of ureq's errors quote the URL.
        Err(e) => Outcome::Retry(match e {
            ureq::Error::Timeout(_) => format!("no answer within {DELIVERY_TIMEOUT:?}"),
            ureq::Error::Io(io) => format!("connection: {}", io.kind()),
            ureq::Error::HostNotFound => "host not found".into(),
            ureq::Error::ConnectionFailed => "connection failed".into(),
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) => "TLS failed".into(),
            _ => "request failed".into(),
        }),
    }
}

async fn deliver_all(mut outbox: Outbox) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(DELIVERY_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent("switchyard")
        .build()
        .into();
    while let Some(notice) = outbox.rx.recv().await {
        let body = Arc::new(notice.body(outbox.format).to_string().into_bytes());
        for attempt in 1..=MAX_ATTEMPTS {
            let (agent, url, body) = (agent.clone(), outbox.url.clone(), body.clone());
            let outcome = tokio::task::spawn_blocking(move || post(&agent, &url, &body))
                .await
                .unwrap_or_else(|_| Outcome::Fail("delivery task failed".into()));
            match outcome {
                Outcome::Delivered => {
                    tracing::debug!(webhook = outbox.name, event = %notice.event, attempt, "notice delivered");
                    break;
                }
                Outcome::Retry(cause) if attempt < MAX_ATTEMPTS => {
                    let wait = retry_delay(attempt, rand::rng().random::<f64>());
                    tracing::info!(webhook = outbox.name, event = %notice.event, attempt, cause, retry_in = ?wait, "webhook delivery failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Outcome::Retry(cause) | Outcome::Fail(cause) => {
                    tracing::warn!(webhook = outbox.name, event = %notice.event, attempt, cause, "webhook delivery failed; notice dropped");
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for NotifySender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let outboxes =
            std::mem::take(&mut *self.outboxes.lock().unwrap_or_else(|p| p.into_inner()));
        let tasks: Vec<_> = outboxes
            .into_iter()
            .map(|o| tokio::spawn(deliver_all(o)))
            .collect();
        let _ = shutdown.changed().await;
        for t in tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: UrlSource) -> config::Webhook {
        config::Webhook {
            name: "team".into(),
            url,
            format: WebhookFormat::Discord,
            events: NotifyEvent::ALL.to_vec(),
            index: 0,
        }
    }

    #[test]
    fn url_checks_never_quote_the_url() {
        let env = |v: &str| match v {
            "GOOD" => Some(" https://discord.example/api/webhooks/1/secret\n".into()),
            "BAD" => Some("ftp://x/secret".into()),
            _ => None,
        };
        let url = load_url(&hook(UrlSource::Env("GOOD".into())), env).unwrap();
        assert_eq!(url.0, "https://discord.example/api/webhooks/1/secret");
        assert!(!format!("{url:?}").contains("secret"));
        let e = load_url(&hook(UrlSource::Env("BAD".into())), env).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("webhook team"), "{e}");
        let e = load_url(&hook(UrlSource::Env("NONE".into())), env).unwrap_err();
        assert!(e.to_string().contains("NONE"), "{e}");
    }

    #[test]
    fn url_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook");
        std::fs::write(&path, "http://127.0.0.1:9/secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_url(&hook(UrlSource::File(path.clone())), |_| None).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_url(&hook(UrlSource::File(path)), |_| None).is_ok());
    }

    #[test]
    fn payload_shapes() {
        let n = Notice::switched("api", Color::Blue, Color::Green, false, "release 42");
        let d = n.body(WebhookFormat::Discord);
        assert!(d["content"]
            .as_str()
            .unwrap()
            .contains("api switched from blue to green"));
        assert_eq!(d["embeds"][0]["color"], GREEN);
        assert_eq!(d["embeds"][0]["description"], "release 42");
        let s = n.body(WebhookFormat::Slack);
        assert!(s["text"].as_str().unwrap().contains("release 42"));
        let j = n.body(WebhookFormat::Json);
        assert_eq!(j["event"], "switch");
        assert_eq!(
            (j["from"].as_str(), j["to"].as_str()),
            (Some("blue"), Some("green"))
        );
        let r = Notice::switched("api", Color::Green, Color::Blue, true, "5xx");
        assert_eq!(r.body(WebhookFormat::Json)["event"], "rollback");
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        assert_eq!(retry_delay(1, 0.0), RETRY_BASE);
        assert_eq!(retry_delay(2, 0.0), RETRY_BASE * 2);
        assert_eq!(retry_delay(3, 1.0), RETRY_BASE * 4 + RETRY_BASE * 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (n, _sender) = Notifier::new(vec![(
            hook(UrlSource::Env("X".into())),
            WebhookUrl("http://127.0.0.1:9/".into()),
        )]);
        for _ in 0..QUEUE_NOTICES + 3 {
            n.notify(Notice::maintenance("api", true));
        }
        assert_eq!(n.dropped(), vec![("team".to_string(), 3)]);
    }
}
