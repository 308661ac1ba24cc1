//! `[services.NAME]`: the blue and green backend pools of each service,
//! the color served first and the active health check, with their defaults
//! and ranges.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use super::{file, Validator, MIN_DURATION};
use crate::pools::Color;

/// How long to wait for a TCP connection to a backend (5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Probe period of active health checks (2 s).
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health probe may take (1 s).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Passes in a row that make a backend healthy (2).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Failures in a row that make a backend unhealthy (3).
pub const DEFAULT_HEALTH_FALL: u32 = 3;

/// `rollback.window`: the sliding window the gates judge (30 s).
pub const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(30);
/// `rollback.max_error_ratio`: 5xx share of the new color above which it is
/// rolled back (0.01, the team's 1 % warning level).
pub const DEFAULT_MAX_ERROR_RATIO: f64 = 0.01;
/// `rollback.max_p95`: p95 time to the response head above which the new
/// color is rolled back (1 s, between the team's 0.5 s warning and 2 s
/// critical alerts).
pub const DEFAULT_MAX_P95: Duration = Duration::from_secs(1);
/// `rollback.min_requests`: requests the window must hold before any
/// verdict (20): fewer is noise.
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
/// `rollback.watch`: how long after a switch or a weight change the watcher
/// keeps judging the new color (5 min); a split is watched as long as it lasts.
pub const DEFAULT_ROLLBACK_WATCH: Duration = Duration::from_secs(300);
/// `rollback.window`: whole seconds from 1 s to 5 min (the window is kept in
/// one-second slots, one ring of them per service and color).
pub const ROLLBACK_WINDOW_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);
/// `rollback.max_p95`: 1 ms to 10 min.
pub const MAX_P95_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(600);
/// `rollback.max_error_ratio`: a fraction from 0 to 1.
pub const MAX_ERROR_RATIO_RANGE: RangeInclusive<f64> = 0.0..=1.0;
/// `rollback.min_requests`: 1 to 1 000 000.
pub const MIN_REQUESTS_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// `rollback.watch`: 1 s to 24 h.
pub const ROLLBACK_WATCH_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);

/// `services.NAME.connect_timeout`: 100 ms to 5 min.
pub const CONNECT_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(300);
/// `health.interval`: 100 ms to 1 h.
pub const HEALTH_INTERVAL_RANGE: RangeInclusive<Duration> =
    MIN_DURATION..=Duration::from_secs(3600);
/// `health.timeout`: 100 ms to 5 min.
pub const HEALTH_TIMEOUT_RANGE: RangeInclusive<Duration> = MIN_DURATION..=Duration::from_secs(300);
/// `health.rise` and `fall`: 1 to 100 probes in a row.
pub const RISE_FALL_RANGE: RangeInclusive<u32> = 1..=100;

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub blue: Vec<SocketAddr>,
    pub green: Vec<SocketAddr>,
    /// The color served when no saved state exists.
    pub active: Color,
    pub connect_timeout: Duration,
    pub health: Option<HealthCheck>,
    /// Healthy backends a color needs before traffic may switch to it;
    /// `None` means all of them.
    pub min_healthy: Option<usize>,
    /// Keeps one client on one color while traffic is split (`sticky`);
    /// `None`: every request is placed on its own.
    pub sticky: Option<Sticky>,
    /// `[services.NAME.rollback]`: the automatic rollback watcher's gates;
    /// `None`: the service is not watched.
    pub rollback: Option<Rollback>,
}

/// The gates a new color must pass (`[services.NAME.rollback]`), used by the
/// automatic rollback watcher and by `ctl deploy` alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollback {
    /// Whether the watcher judges this service (`enabled`, default true);
    /// `ctl deploy` uses the gates either way.
    pub enabled: bool,
    /// The sliding window judged, whole seconds.
    pub window: Duration,
    /// 5xx share (0..=1) above which the new color is rolled back.
    pub max_error_ratio: f64,
    /// p95 of the time to the response head above which it is rolled back.
    pub max_p95: Duration,
    /// Requests the window must hold before any verdict.
    pub min_requests: u64,
    /// How long after a change the new color is judged (a split: always).
    pub watch: Duration,
}

impl Default for Rollback {
    /// The documented defaults: what `ctl deploy` judges a service by when
    /// it has no `[services.NAME.rollback]` table.
    fn default() -> Self {
        Rollback {
            enabled: true,
            window: DEFAULT_ROLLBACK_WINDOW,
            max_error_ratio: DEFAULT_MAX_ERROR_RATIO,
            max_p95: DEFAULT_MAX_P95,
            min_requests: DEFAULT_MIN_REQUESTS,
            watch: DEFAULT_ROLLBACK_WATCH,
        }
    }
}

/// `services.NAME.sticky`: what keeps a client on one color during a
/// weighted split (`split.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// `"cookie"`: a cookie carrying the client's bucket.
    Cookie,
    /// `"client_ip"`: a hash of the client's address (IPv6 by its /64).
    ClientIp,
}

/// An active health check: `GET path` must answer `expect` (and contain `body`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect: u16,
    pub body: Option<String>,
    pub rise: u32,
    pub fall: u32,
}

impl Service {
    pub fn pool(&self, color: Color) -> &[SocketAddr] {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

impl Validator<'_> {
    pub(super) fn service(&mut self, name: Spanned<String>, s: file::Service) -> Option<Service> {
        let valid_name = self.name(&name, "service");
        if !valid_name {
            self.dropped
                .insert(("services".into(), name.get_ref().clone()));
        }
        let mut pool = |list: Spanned<Vec<Spanned<String>>>, color: &str| -> Vec<SocketAddr> {
            if list.get_ref().is_empty() {
                self.at(
                    &list,
                    format!(
                        "service {:?} has an empty {color} pool: list at least one backend address",
                        name.get_ref()
                    ),
                );
            }
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for a in list.get_ref() {
                if let Some(addr) = self.addr(a, "backend") {
                    if seen.insert(addr) {
                        out.push(addr);
                    } else {
                        self.at(a, format!("backend {addr} is listed twice in this pool"));
                    }
                }
            }
            out
        };
        let blue = pool(s.blue, "blue");
        let green = pool(s.green, "green");
        let active = match s.active {
            None => Color::Blue,
            Some(c) => match c.get_ref().parse::<Color>() {
                Ok(color) => color,
                Err(e) => {
                    self.at(&c, e.to_string());
                    Color::Blue
                }
            },
        };
        let connect_timeout = self.duration_in(
            s.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            CONNECT_TIMEOUT_RANGE,
        );
        let health = s.health.map(|h| self.health(h));
        let min_healthy = s.min_healthy.map(|m| {
            let smallest = blue.len().min(green.len());
            if health.is_none() {
                self.at(&m, "min_healthy needs a `health` check to count healthy backends".into());
            } else if *m.get_ref() == 0 || *m.get_ref() > smallest {
                self.at(
                    &m,
                    format!(
                        "min_healthy must be between 1 and the size of the smaller pool ({smallest})"
                    ),
                );
            }
            *m.get_ref()
        });
        let sticky = s.sticky.and_then(|v| match v.get_ref().as_str() {
            "cookie" => Some(Sticky::Cookie),
            "client_ip" => Some(Sticky::ClientIp),
            other => {
                self.at(
                    &v,
                    format!("unknown sticky {other:?}: expected \"cookie\" or \"client_ip\""),
                );
                None
            }
        });
        let rollback = s.rollback.map(|r| self.rollback(r));
        valid_name.then(|| Service {
            name: name.into_inner(),
            blue,
            green,
            active,
            connect_timeout,
            health,
            min_healthy,
            sticky,
            rollback,
        })
    }

    fn rollback(&mut self, r: file::Rollback) -> Rollback {
        let window = self.duration_in(
            r.window.as_ref(),
            DEFAULT_ROLLBACK_WINDOW,
            ROLLBACK_WINDOW_RANGE,
        );
        let window = match (window.subsec_nanos(), r.window.as_ref()) {
            (0, _) | (_, None) => window,
            (_, Some(w)) => {
                self.at(
                    w,
                    "rollback window must be whole seconds (it is kept in one-second slots), e.g. \"30s\"".into(),
                );
                DEFAULT_ROLLBACK_WINDOW
            }
        };
        let max_error_ratio = match r.max_error_ratio {
            Some(v) if !MAX_ERROR_RATIO_RANGE.contains(v.get_ref()) => {
                self.at(
                    &v,
                    format!(
                        "max_error_ratio = {} is out of range: a fraction from 0 to 1, e.g. 0.01 for 1 %",
                        v.get_ref()
                    ),
                );
                DEFAULT_MAX_ERROR_RATIO
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_MAX_ERROR_RATIO,
        };
        Rollback {
            enabled: r.enabled.unwrap_or(true),
            window,
            max_error_ratio,
            max_p95: self.duration_in(r.max_p95.as_ref(), DEFAULT_MAX_P95, MAX_P95_RANGE),
            min_requests: self.count(
                r.min_requests.as_ref(),
                DEFAULT_MIN_REQUESTS,
                MIN_REQUESTS_RANGE,
                "min_requests",
            ),
            watch: self.duration_in(
                r.watch.as_ref(),
                DEFAULT_ROLLBACK_WATCH,
                ROLLBACK_WATCH_RANGE,
            ),
        }
    }

    fn health(&mut self, h: file::Health) -> HealthCheck {
        if !h.path.get_ref().starts_with('/') {
            self.at(
                &h.path,
                format!("health path {:?} must start with '/'", h.path.get_ref()),
            );
        }
        let rise = self.count(
            h.rise.as_ref(),
            DEFAULT_HEALTH_RISE,
            RISE_FALL_RANGE,
            "rise",
        );
        let fall = self.count(
            h.fall.as_ref(),
            DEFAULT_HEALTH_FALL,
            RISE_FALL_RANGE,
            "fall",
        );
        let interval = self.duration_in(
            h.interval.as_ref(),
            DEFAULT_HEALTH_INTERVAL,
            HEALTH_INTERVAL_RANGE,
        );
        let timeout = self.duration_in(
            h.timeout.as_ref(),
            DEFAULT_HEALTH_TIMEOUT,
            HEALTH_TIMEOUT_RANGE,
        );
        let expect = match h.expect {
            Some(code) if !(100..=599).contains(code.get_ref()) => {
                self.at(
                    &code,
                    "expect must be an HTTP status between 100 and 599".into(),
                );
                200
            }
            Some(code) => *code.get_ref(),
            None => 200,
        };
        HealthCheck {
            path: h.path.into_inner(),
            interval,
            timeout,
            expect,
            body: h.body,
            rise,
            fall,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{errors, GOOD};
    use crate::config::Config;

    fn with_rollback(table: &str) -> String {
        GOOD.replace(
            "active = \"green\"\n",
            &format!("active = \"green\"\n\n[services.api.rollback]\n{table}\n"),
        )
    }

    #[test]
    fn rollback_defaults_and_keys() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.services[0].rollback, None, "no table: not watched");
        let c = Config::parse(Path::new("t.toml"), &with_rollback("")).unwrap();
        assert_eq!(c.services[0].rollback, Some(Rollback::default()));
        let text = with_rollback(
            "enabled = false\nwindow = \"2s\"\nmax_error_ratio = 0.05\nmax_p95 = \"2s\"\nmin_requests = 5\nwatch = \"10m\"",
        );
        let r = Config::parse(Path::new("t.toml"), &text).unwrap().services[0]
            .rollback
            .unwrap();
        assert_eq!(
            r,
            Rollback {
                enabled: false,
                window: Duration::from_secs(2),
                max_error_ratio: 0.05,
                max_p95: Duration::from_secs(2),
                min_requests: 5,
                watch: Duration::from_secs(600),
            }
        );
    }

    #[test]
    fn rollback_mistakes_are_located() {
        let e = errors(&with_rollback(
            "window = \"1500ms\"\nmax_error_ratio = 1.5\nmax_p95 = \"1h\"\nmin_requests = 0\nwatch = \"0s\"",
        ));
        let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].contains(":15:10: rollback window must be whole seconds"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains(":16:19: max_error_ratio = 1.5 is out of range"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains(":17:11: duration \"1h\" is out of range"),
            "{lines:#?}"
        );
        assert!(
            lines[3].contains(":18:16: min_requests = 0 is out of range"),
            "{lines:#?}"
        );
        assert!(
            lines[4].contains(":19:9: duration \"0s\" is out of range"),
            "{lines:#?}"
        );
        let e = errors(&with_rollback("max_5xx = 0.1"));
        assert!(e[0].to_string().contains("unknown key `max_5xx`"), "{e:?}");
    }
}
