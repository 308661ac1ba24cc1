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
        valid_name.then(|| Service {
            name: name.into_inner(),
            blue,
            green,
            active,
            connect_timeout,
            health,
            min_healthy,
            sticky,
        })
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
