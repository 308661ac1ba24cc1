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

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{Histogram, IntCounter, IntGaugeVec};

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
    /// The series of the config in force, by name; replaced whole on a
    /// config reload ([`Observer::config_reloaded`]).
    handles: ArcSwap<Handles>,
    /// Indexed like [`REFUSAL_REASONS`].
    refusals: Vec<IntCounter>,
}

/// Handles into the families for the services and routes of one config,
/// resolved when the config comes into force, so the request path only
/// looks a name up (no label formatting). A request that started before a
/// reload may name a service or route the new config lacks: it is counted
/// by its labels then ([`Metrics::observe`]), a little slower.
struct Handles {
    services: NameMap<Arc<ServiceHandles>>,
    /// Per route label; a proxied request finds its service's handles
    /// here too, so it costs one lookup.
    routes: NameMap<RouteHandles>,
    /// `requests_total` of requests no route took.
    no_route: [IntCounter; 5],
    none_duration: Histogram,
    none_received: IntCounter,
    none_sent: IntCounter,
}

struct RouteHandles {
    /// The service the route proxies to (its name and handles); `None` for
    /// a deny route.
    service: Option<(String, Arc<ServiceHandles>)>,
    /// `requests_total` per color (two for a proxied route, one `none`
    /// otherwise), per status class.
    classes: Vec<[IntCounter; 5]>,
}

impl RouteHandles {
    /// Whether a record naming `service` was counted under this route's
    /// series: false when a reload gave the route another service while
    /// the request ran.
    fn serves(&self, service: Option<&str>) -> bool {
        self.service.as_ref().map(|(n, _)| n.as_str()) == service
    }
}

/// A table by service or route name. foldhash instead of the default
/// SipHash: two lookups per request, and the names come from the config,
/// not from clients, so hash flooding is not a concern here.
type NameMap<T> = HashMap<String, T, foldhash::fast::RandomState>;

struct ServiceHandles {
    /// `request_duration_seconds` per color.
    durations: [Histogram; 2],
    received: IntCounter,
    sent: IntCounter,
    /// Per color and [`UpstreamErrorKind::ALL`].
    upstream_errors: [[IntCounter; 4]; 2],
}

fn color_index(color: Color) -> usize {
    match color {
        Color::Blue => 0,
        Color::Green => 1,
    }
}

fn classes(f: &Families, service: &str, color: &str, route: &str) -> [IntCounter; 5] {
    STATUS_CLASSES.map(|class| {
        f.requests
            .with_label_values(&[service, color, route, class])
    })
}

impl Handles {
    /// Creates (or finds, after a reload) every series of `config`.
    fn new(f: &Families, config: &Config) -> Handles {
        let services: NameMap<Arc<ServiceHandles>> = config
            .services
            .iter()
            .map(|s| {
                let s = s.name.as_str();
                let handles = ServiceHandles {
                    durations: Color::ALL.map(|c| f.duration.with_label_values(&[s, c.as_str()])),
                    received: f.received_bytes.with_label_values(&[s]),
                    sent: f.sent_bytes.with_label_values(&[s]),
                    upstream_errors: Color::ALL.map(|c| {
                        UpstreamErrorKind::ALL.map(|k| {
                            f.upstream_errors
                                .with_label_values(&[s, c.as_str(), k.as_str()])
                        })
                    }),
                };
                (s.to_string(), Arc::new(handles))
            })
            .collect();
        let mut routes = NameMap::default();
        for route in &config.routes {
            let label = route.label();
            let entry = match route.action {
                RouteAction::Proxy(s) => {
                    let name = config.services[s].name.as_str();
                    let classes = Color::ALL
                        .iter()
                        .map(|c| classes(f, name, c.as_str(), &label))
                        .collect();
                    let service = services.get(name).map(|h| (name.to_string(), h.clone()));
                    RouteHandles { service, classes }
                }
                RouteAction::Deny => RouteHandles {
                    service: None,
                    classes: vec![classes(f, NONE, NONE, &label)],
                },
            };
            routes.insert(label, entry);
        }
        Handles {
            services,
            routes,
            no_route: classes(f, NONE, NONE, NONE),
            none_duration: f.duration.with_label_values(&[NONE, NONE]),
            none_received: f.received_bytes.with_label_values(&[NONE]),
            none_sent: f.sent_bytes.with_label_values(&[NONE]),
        }
    }
}

impl Metrics {
    /// Creates every family and every zero-valued per-request series.
    pub fn new(config: &Config) -> Metrics {
        let families = Families::new();
        let handles = ArcSwap::from_pointee(Handles::new(&families, config));
        let refusals = REFUSAL_REASONS
            .iter()
            .map(|r| families.refusals.with_label_values(&[r]))
            .collect();
        Metrics {
            families,
            handles,
            refusals,
        }
    }

    /// Requests answered since start, every route and class.
    pub fn requests_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.families
            .requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Counts one config reload attempt: `ok` is `result="success"`, else
    /// `result="failure"` (the names contract's values).
    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.families
            .config_reloads
            .with_label_values(&[result])
            .inc();
    }
}

impl Observer for Metrics {
    fn observe(&self, r: &RequestRecord<'_>) {
        let handles = self.handles.load();
        // One lookup for a proxied request: its route holds its service's handles.
        let route_handles = r.route.and_then(|label| handles.routes.get(label));
        let route_handles = route_handles.filter(|h| h.serves(r.service));
        let service = match route_handles.and_then(|h| h.service.as_ref()) {
            Some((_, h)) => Some(&**h),
            None => r
                .service
                .and_then(|s| handles.services.get(s))
                .map(|h| &**h),
        };
        let f = &self.families;
        let service_label = r.service.unwrap_or(NONE);
        match (service, r.service) {
            (Some(h), _) => {
                h.received.inc_by(r.bytes_in as u64);
                h.sent.inc_by(r.bytes_out as u64);
            }
            // A service a reload removed while the request ran.
            (None, Some(name)) => {
                f.received_bytes
                    .with_label_values(&[name])
                    .inc_by(r.bytes_in as u64);
                f.sent_bytes
                    .with_label_values(&[name])
                    .inc_by(r.bytes_out as u64);
            }
            (None, None) => {
                handles.none_received.inc_by(r.bytes_in as u64);
                handles.none_sent.inc_by(r.bytes_out as u64);
            }
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
            match (service, r.service, r.color) {
                (Some(h), _, Some(color)) => h.durations[color_index(color)].observe(seconds),
                (None, Some(name), Some(color)) => f
                    .duration
                    .with_label_values(&[name, color.as_str()])
                    .observe(seconds),
                _ => handles.none_duration.observe(seconds),
            }
        }
        // Last, so a request counted here has every other family updated.
        let Some(route) = r.route else {
            handles.no_route[class].inc();
            return;
        };
        match route_handles {
            Some(h) => {
                let c = r.color.map_or(0, color_index).min(h.classes.len() - 1);
                h.classes[c][class].inc();
            }
            // A route a reload removed, or gave another service.
            None => {
                let color = match r.service {
                    Some(_) => r.color.map_or(NONE, Color::as_str),
                    None => NONE,
                };
                f.requests
                    .with_label_values(&[service_label, color, route, STATUS_CLASSES[class]])
                    .inc();
            }
        }
    }

    fn upstream_error(&self, service: &str, color: Color, kind: UpstreamErrorKind) {
        match self.handles.load().services.get(service) {
            Some(h) => h.upstream_errors[color_index(color)][kind as usize].inc(),
            None => self
                .families
                .upstream_errors
                .with_label_values(&[service, color.as_str(), kind.as_str()])
                .inc(),
        }
    }

    /// New series for what the reload added; the gauges of services,
    /// backends and caps it removed are dropped (they describe nothing
    /// any more). Counters of removed services and routes stay, frozen at
    /// their last value (requests that started before the reload may still
    /// add to them) until the process restarts.
    fn config_reloaded(&self, config: &Config) {
        self.handles
            .store(Arc::new(Handles::new(&self.families, config)));
        let f = &self.families;
        let service = |name: &str| config.services.iter().find(|s| s.name == name);
        let backend = |labels: &[&str]| {
            let (Some(s), Some(color), Some(addr)) = (
                labels.first().and_then(|n| service(n)),
                labels.get(1).and_then(|c| c.parse::<Color>().ok()),
                labels.get(2),
            ) else {
                return false;
            };
            s.pool(color).iter().any(|a| a.to_string() == *addr)
        };
        let known = |labels: &[&str]| labels.first().is_some_and(|n| service(n).is_some());
        for gauge in [&f.active_color, &f.in_flight, &f.upgraded, &f.maintenance] {
            prune(gauge, &["service", "color"], known);
        }
        prune(&f.backend_up, &["service", "color", "backend"], backend);
        let cap = |labels: &[&str]| {
            labels
                .first()
                .is_some_and(|n| config.concurrency.iter().any(|c| c.name == *n))
        };
        prune(&f.concurrency_in_flight, &["limit"], cap);
        prune(&f.concurrency_queue_depth, &["limit"], cap);
    }
}

/// Removes every series of `gauge` whose values of `names` (the labels
/// it has of these, in this order) `keep` refuses.
fn prune(gauge: &IntGaugeVec, names: &[&str], keep: impl Fn(&[&str]) -> bool) {
    use prometheus::core::Collector;
    for family in gauge.collect() {
        for m in family.get_metric() {
            let pairs = m.get_label();
            let values: Vec<&str> = names
                .iter()
                .filter_map(|n| pairs.iter().find(|p| p.name() == *n).map(|p| p.value()))
                .collect();
            if !keep(&values) {
                let all: HashMap<&str, &str> =
                    pairs.iter().map(|p| (p.name(), p.value())).collect();
                let _ = gauge.remove(&all);
            }
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
            service: route.filter(|&r| r == 0).map(|_| "api"),
            color,
            route: route.map(|r| ["api.example.com/", "*/admin/"][r]),
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
        m.upstream_error("api", Color::Green, UpstreamErrorKind::Reset);
        let e = m
            .families
            .upstream_errors
            .with_label_values(&["api", "green", "reset"]);
        assert_eq!(e.get(), 1);
    }

    #[test]
    fn a_reload_adds_series_and_old_requests_still_count() {
        let config = Config::parse(Path::new("t.toml"), CONFIG).unwrap();
        let m = Metrics::new(&config);
        m.families
            .backend_up
            .with_label_values(&["api", "blue", "127.0.0.1:8080"])
            .set(1);
        let next = CONFIG
            .replace("[services.api]", "[services.web]")
            .replace("service = \"api\"", "service = \"web\"")
            .replace("/admin/", "/private/");
        let next = Config::parse(Path::new("t.toml"), &next).unwrap();
        m.config_reloaded(&next);
        // The new config's series exist at once, at zero.
        let route = "api.example.com/";
        assert_eq!(
            m.families
                .requests
                .with_label_values(&["web", "blue", route, "2xx"])
                .get(),
            0
        );
        // A request that started before the reload names the old service.
        m.observe(&record(Some(0), Some(Color::Green), 200));
        assert_eq!(value(&m, &["api", "green", route, "2xx"]), 1);
        assert_eq!(value(&m, &["web", "green", route, "2xx"]), 0);
        m.upstream_error("api", Color::Green, UpstreamErrorKind::Reset);
        let e = m
            .families
            .upstream_errors
            .with_label_values(&["api", "green", "reset"]);
        assert_eq!(e.get(), 1);
        // The removed service's gauges are gone.
        use prometheus::core::Collector;
        let up: usize = m
            .families
            .backend_up
            .collect()
            .iter()
            .map(|f| f.get_metric().len())
            .sum();
        assert_eq!(up, 0);
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
