//! Prometheus metrics: the registry of every family of the names contract
//! (README, "Metrics"), the per-request counting and the metrics listener.
//!
//! - [`registry`]: the families, with a zero-valued series for every
//!   configured service, color, route, limit, budget, certificate and
//!   backend created at start-up, so a rule never points at a missing series;
//! - [`Metrics`] (here): the [`Observer`] the proxies call for every finished
//!   request; it only increments handles resolved at start-up (no label
//!   formatting or hashing on the request path);
//! - [`state`]: the families read at scrape time from the counters and
//!   snapshots switchyard keeps anyway (colors, health, limits, certificates);
//! - [`listener`]: `GET /metrics`, `/healthz`, `/readyz`, `/status`.

pub mod listener;
pub mod registry;
pub mod state;

use prometheus::{Histogram, IntCounter};

use crate::config::{Config, RouteAction};
use crate::pools::Color;
use crate::record::{Observer, RequestRecord, UpstreamErrorKind};
use registry::Families;

/// Label value for "no service", "no color" and "no route".
pub const NONE: &str = "none";

/// Status classes, `status_class` label values, indexed by `status / 100 - 1`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every `switchyard_refusals_total{reason}` value: the names of
/// [`crate::respond::Refusal::reason`], then `slow_client` (connections cut
/// before a request was read, counted at the connection level).
pub const REFUSAL_REASONS: [&str; 15] = [
    "no_route",
    "deny",
    "bad_request",
    "body_too_large",
    "header_too_large",
    "rate_limited",
    "busy",
    "tokens_exhausted",
    "invalid_completion",
    "maintenance",
    "no_healthy_backend",
    "upstream_error",
    "upstream_timeout",
    "client_error",
    SLOW_CLIENT,
];

/// The refusal reason counted from connection statistics, not requests.
pub const SLOW_CLIENT: &str = "slow_client";

/// The families and the per-request handles into them.
pub struct Metrics {
    pub families: Families,
    /// `requests_total` per route (indexed like `Config::routes`, then one
    /// more for "no route"), per color (two for a proxied route, one `none`
    /// otherwise), per status class.
    requests: Vec<Vec<[IntCounter; 5]>>,
    /// `request_duration_seconds` per service and color, then `none`.
    durations: Vec<[Histogram; 2]>,
    none_duration: Histogram,
    /// Bytes per service, the last entry for `none`.
    received: Vec<IntCounter>,
    sent: Vec<IntCounter>,
    /// Indexed like [`REFUSAL_REASONS`].
    refusals: Vec<IntCounter>,
    /// Per service, color and [`UpstreamErrorKind::ALL`].
    upstream_errors: Vec<[[IntCounter; 4]; 2]>,
}

fn color_index(color: Color) -> usize {
    match color {
        Color::Blue => 0,
        Color::Green => 1,
    }
}

impl Metrics {
    /// Creates every family and every zero-valued per-request series.
    pub fn new(config: &Config) -> Metrics {
        let families = Families::new();
        let f = &families;
        let classes = |service: &str, color: &str, route: &str| {
            STATUS_CLASSES.map(|class| {
                f.requests
                    .with_label_values(&[service, color, route, class])
            })
        };
        let mut requests = Vec::with_capacity(config.routes.len() + 1);
        for route in &config.routes {
            let label = route.label();
            match route.action {
                RouteAction::Proxy(s) => {
                    let name = config.services[s].name.as_str();
                    requests.push(
                        Color::ALL
                            .iter()
                            .map(|c| classes(name, c.as_str(), &label))
                            .collect(),
                    );
                }
                RouteAction::Deny => {
                    requests.push(vec![classes(NONE, NONE, &label)]);
                }
            }
        }
        requests.push(vec![classes(NONE, NONE, NONE)]);

        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let durations = names
            .iter()
            .map(|s| Color::ALL.map(|c| f.duration.with_label_values(&[s, c.as_str()])))
            .collect();
        let none_duration = f.duration.with_label_values(&[NONE, NONE]);
        let with_none = || names.iter().copied().chain([NONE]);
        let received = with_none()
            .map(|s| f.received_bytes.with_label_values(&[s]))
            .collect();
        let sent = with_none()
            .map(|s| f.sent_bytes.with_label_values(&[s]))
            .collect();
        let refusals = REFUSAL_REASONS
            .iter()
            .map(|r| f.refusals.with_label_values(&[r]))
            .collect();
        let upstream_errors = names
            .iter()
            .map(|s| {
                Color::ALL.map(|c| {
                    UpstreamErrorKind::ALL.map(|k| {
                        f.upstream_errors
                            .with_label_values(&[s, c.as_str(), k.as_str()])
                    })
                })
            })
            .collect();
        Metrics {
            families,
            requests,
            durations,
            none_duration,
            received,
            sent,
            refusals,
            upstream_errors,
        }
    }

    /// Requests answered since start, every route and class.
    pub fn requests_total(&self) -> u64 {
        self.requests
            .iter()
            .flatten()
            .flatten()
            .map(IntCounter::get)
            .sum()
    }
}

impl Observer for Metrics {
    fn observe(&self, r: &RequestRecord<'_>) {
        let service = r.service;
        let service_slot = service.unwrap_or(self.received.len() - 1);
        if let Some(c) = self.received.get(service_slot) {
            c.inc_by(r.bytes_in as u64);
        }
        if let Some(c) = self.sent.get(service_slot) {
            c.inc_by(r.bytes_out as u64);
        }
        if let Some(refusal) = r.refusal {
            let reason = refusal.reason();
            if let Some(i) = REFUSAL_REASONS.iter().position(|n| *n == reason) {
                self.refusals[i].inc();
            }
        }
        // Status 0: the client left before any answer; not "answered".
        // A backend may send any three digits (RFC 9110 §15) and the
        // client gets them: beyond 599 it is a server error, not nothing.
        let class = match r.status {
            0 => return,
            100..=599 => usize::from(r.status / 100 - 1),
            _ => STATUS_CLASSES.len() - 1,
        };
        // A stream's time is how long it stayed open, not latency.
        if !r.stream {
            let seconds = r.total_time.as_secs_f64();
            match (service.and_then(|s| self.durations.get(s)), r.color) {
                (Some(colors), Some(color)) => colors[color_index(color)].observe(seconds),
                _ => self.none_duration.observe(seconds),
            }
        }
        // Last, so a request counted here has every other family updated.
        let routes = r
            .route
            .and_then(|i| self.requests.get(i))
            .or_else(|| self.requests.last());
        if let Some(colors) = routes {
            let c = r.color.map_or(0, color_index).min(colors.len() - 1);
            colors[c][class].inc();
        }
    }

    fn upstream_error(&self, service: usize, color: Color, kind: UpstreamErrorKind) {
        if let Some(colors) = self.upstream_errors.get(service) {
            colors[color_index(color)][kind as usize].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::respond::Refusal;

    const CONFIG: &str = r#"
[services.api]
blue = ["127.0.0.1:8080"]
green = ["127.0.0.1:8081"]

[[routes]]
host = "api.example.com"
path = "/"
service = "api"

[[routes]]
path = "/admin/"
action = "deny"
"#;

    fn record(route: Option<usize>, color: Option<Color>, status: u16) -> RequestRecord<'static> {
        RequestRecord {
            request_id: "r",
            client: None,
            method: "GET",
            host: None,
            path: "/",
            status,
            service: route.filter(|&r| r == 0).map(|_| 0),
            color,
            route,
            backend: None,
            upstream_time: None,
            total_time: Duration::from_millis(7),
            bytes_in: 3,
            bytes_out: 5,
            refusal: None,
            stream: false,
        }
    }

    fn value(m: &Metrics, labels: &[&str]) -> u64 {
        m.families.requests.with_label_values(labels).get()
    }

    #[test]
    fn observe_counts_by_route_color_and_class() {
        let config = Config::parse(Path::new("t.toml"), CONFIG).unwrap();
        let m = Metrics::new(&config);
        m.observe(&record(Some(0), Some(Color::Green), 204));
        m.observe(&record(Some(0), Some(Color::Blue), 503));
        let mut denied = record(Some(1), None, 404);
        denied.refusal = Some(Refusal::Denied);
        m.observe(&denied);
        m.observe(&record(None, None, 0));
        m.observe(&record(Some(0), Some(Color::Green), 999));
        let route = "api.example.com/";
        assert_eq!(value(&m, &["api", "green", route, "2xx"]), 1);
        assert_eq!(value(&m, &["api", "blue", route, "5xx"]), 1);
        assert_eq!(value(&m, &["api", "green", route, "5xx"]), 1);
        assert_eq!(value(&m, &["api", "blue", route, "2xx"]), 0);
        assert_eq!(value(&m, &["none", "none", "*/admin/", "4xx"]), 1);
        assert_eq!(m.requests_total(), 4);
        let deny = m.families.refusals.with_label_values(&["deny"]).get();
        assert_eq!(deny, 1);
        let sent = m.families.sent_bytes.with_label_values(&["api"]).get();
        assert_eq!(sent, 15);
        let h = m.families.duration.with_label_values(&["api", "green"]);
        assert_eq!(h.get_sample_count(), 2);
        m.upstream_error(0, Color::Green, UpstreamErrorKind::Reset);
        let e = m
            .families
            .upstream_errors
            .with_label_values(&["api", "green", "reset"]);
        assert_eq!(e.get(), 1);
    }

    #[test]
    fn every_refusal_reason_is_a_label_value() {
        let refusals = [
            Refusal::NoRoute,
            Refusal::Denied,
            Refusal::WebSocketNotAllowed,
            Refusal::HeaderTooLarge,
            Refusal::BodyTooLarge(1),
            Refusal::RateLimited { retry: 1, limit: 1 },
            Refusal::TokensExhausted {
                retry: 1,
                limit: 1,
                remaining: 0,
                reset: 1,
            },
            Refusal::Busy(1),
            Refusal::Maintenance,
            Refusal::NoHealthyBackend,
            Refusal::Upstream(502),
            Refusal::Upstream(504),
            Refusal::Client(400),
        ];
        for r in refusals {
            assert!(REFUSAL_REASONS.contains(&r.reason()), "{}", r.reason());
        }
    }
}
