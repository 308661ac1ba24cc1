//! `[[notify.webhooks]]`: where switchyard posts what happened (switches,
//! rollbacks, health of the active pool, certificate renewal failures).
//! The URL itself is a secret and is not in the file: `url_file` names a
//! 0600 file that holds it, or `url_env` a variable; it is read at start
//! (and by `switchyard check`) by `crate::notify::load_url`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::{file, names, Validator};

/// The body shape a webhook receiver expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// Discord's "execute webhook" JSON: `content` and one embed.
    Discord,
    /// Slack's incoming-webhook JSON: `text`.
    Slack,
    /// switchyard's own flat object (`event`, `service`, `from`, `to`,
    /// `reason`, `time`, ...), for scripts.
    Json,
}

impl WebhookFormat {
    pub const ALL: [WebhookFormat; 3] = [
        WebhookFormat::Discord,
        WebhookFormat::Slack,
        WebhookFormat::Json,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Discord => "discord",
            WebhookFormat::Slack => "slack",
            WebhookFormat::Json => "json",
        }
    }
}

/// What a webhook can be told about; `events` picks a subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyEvent {
    /// The active color changed by command (also maintenance on/off).
    Switch,
    /// A blue/green traffic split changed.
    Weights,
    /// A `ctl deploy` started or finished.
    Deploy,
    /// Traffic went back to the previous color (by command or automatically).
    Rollback,
    /// The active pool lost its last healthy backend, or got one back.
    Health,
    /// A certificate could not be issued or renewed.
    Certificate,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 6] = [
        NotifyEvent::Switch,
        NotifyEvent::Weights,
        NotifyEvent::Deploy,
        NotifyEvent::Rollback,
        NotifyEvent::Health,
        NotifyEvent::Certificate,
    ];

    /// The name in `events` and in the JSON payload's `event`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Switch => "switch",
            NotifyEvent::Weights => "weights",
            NotifyEvent::Deploy => "deploy",
            NotifyEvent::Rollback => "rollback",
            NotifyEvent::Health => "health",
            NotifyEvent::Certificate => "certificate",
        }
    }
}

impl fmt::Display for NotifyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotifyEvent {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        NotifyEvent::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or(())
    }
}

/// Where a webhook's URL is read from. Never the URL itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// A file (mode 0600, like `admin.token_file`) holding the URL.
    File(PathBuf),
    /// An environment variable holding the URL.
    Env(String),
}

/// One `[[notify.webhooks]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Names the webhook in logs and errors, in place of its secret URL.
    pub name: String,
    pub url: UrlSource,
    pub format: WebhookFormat,
    /// What it is told about; every event when the file does not say.
    pub events: Vec<NotifyEvent>,
    /// Its index among `notify.webhooks`: the key suffix (`#INDEX`) of its
    /// position in `Config::positions` (`notify.webhooks.url_file#0`).
    pub index: usize,
}

/// `[notify]`: no webhooks unless configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notify {
    pub webhooks: Vec<Webhook>,
}

impl Validator<'_> {
    pub(super) fn notify(&mut self, n: file::Notify) -> Notify {
        let mut webhooks: Vec<Webhook> = Vec::new();
        for (index, w) in n.webhooks.unwrap_or_default().into_iter().enumerate() {
            let named = self.name(&w.name, "webhook");
            if named && webhooks.iter().any(|o| o.name == *w.name.get_ref()) {
                self.at(
                    &w.name,
                    format!("duplicate webhook name {:?}", w.name.get_ref()),
                );
            }
            let url = match (w.url_file, w.url_env) {
                (Some(path), None) => Some(UrlSource::File(
                    self.file_key(&format!("notify.webhooks.url_file#{index}"), path),
                )),
                (None, Some(var)) => {
                    let at = super::line_col(self.text, var.span().start);
                    self.positions
                        .insert(format!("notify.webhooks.url_env#{index}"), at);
                    Some(UrlSource::Env(var.into_inner()))
                }
                (Some(_), Some(var)) => {
                    self.at(
                        &var,
                        format!(
                            "webhook {:?}: set url_file or url_env, not both",
                            w.name.get_ref()
                        ),
                    );
                    None
                }
                (None, None) => {
                    self.at(
                        &w.name,
                        format!(
                            "webhook {:?}: set url_file (a 0600 file holding the URL) or url_env (a variable holding it)",
                            w.name.get_ref()
                        ),
                    );
                    None
                }
            };
            let format = WebhookFormat::ALL
                .into_iter()
                .find(|f| f.as_str() == w.format.get_ref());
            if format.is_none() {
                self.at(
                    &w.format,
                    format!(
                        "unknown webhook format {:?}: use one of {}",
                        w.format.get_ref(),
                        names(WebhookFormat::ALL.iter().map(|f| f.as_str()))
                    ),
                );
            }
            let events = match w.events {
                None => NotifyEvent::ALL.to_vec(),
                Some(list) => {
                    let mut events = Vec::new();
                    for e in &list {
                        match e.get_ref().parse::<NotifyEvent>() {
                            Ok(ev) if !events.contains(&ev) => events.push(ev),
                            Ok(_) => {}
                            Err(()) => self.at(
                                e,
                                format!(
                                    "unknown event {:?}: use some of {}",
                                    e.get_ref(),
                                    names(NotifyEvent::ALL.iter().map(|e| e.as_str()))
                                ),
                            ),
                        }
                    }
                    events
                }
            };
            if let (true, Some(url), Some(format)) = (named, url, format) {
                webhooks.push(Webhook {
                    name: w.name.into_inner(),
                    url,
                    format,
                    events,
                    index,
                });
            }
        }
        Notify { webhooks }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::errors;
    use crate::config::Config;

    use super::*;

    const SERVICE: &str =
        "[services.api]\nblue = [\"127.0.0.1:8080\"]\ngreen = [\"127.0.0.1:8081\"]\n";

    #[test]
    fn webhooks_parse_with_every_event_by_default() {
        let text = format!(
            "{SERVICE}\n[[notify.webhooks]]\nname = \"team-discord\"\nurl_file = \"conf/d.webhook\"\nformat = \"discord\"\n\n\
             [[notify.webhooks]]\nname = \"ops\"\nurl_env = \"OPS_HOOK\"\nformat = \"slack\"\nevents = [\"rollback\", \"health\"]\n"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let w = &c.notify.webhooks;
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].url, UrlSource::File("conf/d.webhook".into()));
        assert_eq!(w[0].events, NotifyEvent::ALL.to_vec());
        assert_eq!(w[1].url, UrlSource::Env("OPS_HOOK".into()));
        assert_eq!(w[1].format, WebhookFormat::Slack);
        assert_eq!(
            w[1].events,
            vec![NotifyEvent::Rollback, NotifyEvent::Health]
        );
        assert_eq!(
            c.positions.get("notify.webhooks.url_file#0"),
            Some(&(7, 12))
        );
    }

    #[test]
    fn mistakes_are_located() {
        let text = format!(
            "{SERVICE}\n[[notify.webhooks]]\nname = \"a\"\nurl_file = \"f\"\nurl_env = \"V\"\nformat = \"teams\"\nevents = [\"switch\", \"deploys\"]\n\
             [[notify.webhooks]]\nname = \"b\"\nformat = \"json\"\n"
        );
        let e = errors(&text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![8, 9, 10, 12], "{e:?}");
        assert!(e[0].message.contains("not both"), "{}", e[0]);
        assert!(
            e[1].message.contains("unknown webhook format \"teams\""),
            "{}",
            e[1]
        );
        assert!(
            e[2].message.contains("unknown event \"deploys\""),
            "{}",
            e[2]
        );
        assert!(e[3].message.contains("set url_file"), "{}", e[3]);
    }
}
