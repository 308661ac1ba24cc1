//! Every family of the metrics names contract, registered in one registry.
//! Names, types and labels are a contract with the shipped alert rules and
//! dashboard (`conf/prometheus`, `conf/grafana`): change them only together.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Request duration buckets in seconds, 5 ms to 30 s: resolve the alert
/// thresholds (p95 over 0.5 s and 2 s) and slow streams.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The git commit switchyard was built from (`SWITCHYARD_GIT_COMMIT` at
/// build time, set by `build.rs`); `unknown` when it was not available.
pub const COMMIT: &str = match option_env!("SWITCHYARD_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// The families. Vectors are public so the observer and the scrape-time
/// refresh can resolve their series; nothing else should write to them.
pub struct Families {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub received_bytes: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub active_color: IntGaugeVec,
    pub traffic_weight: IntGaugeVec,
    pub switches: IntCounterVec,
    pub automatic_rollbacks: IntCounterVec,
    pub notices_dropped: IntCounterVec,
    pub access_log_dropped: IntCounterVec,
    pub maintenance: IntGaugeVec,
    pub backend_up: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub upgraded: IntGaugeVec,
    pub refusals: IntCounterVec,
    pub limit_admissions: IntCounterVec,
    pub limit_refusals: IntCounterVec,
    pub cluster_limit_fallbacks: IntCounterVec,
    pub concurrency_in_flight: IntGaugeVec,
    pub concurrency_queue_depth: IntGaugeVec,
    pub tokens: IntCounterVec,
    pub service_tokens: IntCounterVec,
    pub certificate_not_after: IntGaugeVec,
    pub certificate_renewal_failures: IntCounterVec,
    pub cluster_redis_up: IntGaugeVec,
    pub cluster_state_version: IntGaugeVec,
    pub cluster_instances: IntGaugeVec,
    pub cluster_redis_outages: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are valid");
    registry
        .register(Box::new(vec.clone()))
        .expect("each family is registered once");
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec =
        IntGaugeVec::new(Opts::new(name, help), labels).expect("metric names and labels are valid");
    registry
        .register(Box::new(vec.clone()))
        .expect("each family is registered once");
    vec
}

impl Families {
    /// Registers every family. The names are constants: a failure here is a
    /// programming error caught by the unit tests, hence the `expect`s.
    pub fn new() -> Families {
        let r = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from the request header read to the end of the response.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "color"],
        )
        .expect("metric names and labels are valid");
        r.register(Box::new(duration.clone()))
            .expect("each family is registered once");
        let f = Families {
            build_info: gauge(
                &r,
                "switchyard_build_info",
                "Always 1; the labels name the build.",
                &["version", "commit"],
            ),
            config_reloads: counter(
                &r,
                "switchyard_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            ),
            requests: counter(
                &r,
                "switchyard_requests_total",
                "Requests answered, proxied or refused, by the status class sent to the client.",
                &["service", "color", "route", "status_class"],
            ),
            duration,
            upstream_errors: counter(
                &r,
                "switchyard_upstream_errors_total",
                "Failed upstream attempts by kind.",
                &["service", "color", "kind"],
            ),
            received_bytes: counter(
                &r,
                "switchyard_received_bytes_total",
                "Request body bytes received from clients.",
                &["service"],
            ),
            sent_bytes: counter(
                &r,
                "switchyard_sent_bytes_total",
                "Response body bytes sent to clients.",
                &["service"],
            ),
            active_color: gauge(
                &r,
                "switchyard_active_color",
                "1 for the color taking the service's traffic, 0 for the other.",
                &["service", "color"],
            ),
            traffic_weight: gauge(
                &r,
                "switchyard_traffic_weight",
                "Percent of the service's new requests sent to the color (a canary shows between 0 and 100).",
                &["service", "color"],
            ),
            switches: counter(
                &r,
                "switchyard_switches_total",
                "Color changes since start by cause.",
                &["service", "cause"],
            ),
            automatic_rollbacks: counter(
                &r,
                "switchyard_automatic_rollbacks_total",
                "Rollbacks made by a failed gate (rollback watcher or ctl deploy) since start, by gate (error_ratio, p95).",
                &["service", "gate"],
            ),
            notices_dropped: counter(
                &r,
                "switchyard_notifications_dropped_total",
                "Webhook notices dropped because the webhook's queue was full, since start.",
                &["webhook"],
            ),
            access_log_dropped: counter(
                &r,
                "switchyard_access_log_dropped_lines_total",
                "Access log lines dropped because the writer fell behind, since start.",
                &[],
            ),
            maintenance: gauge(
                &r,
                "switchyard_maintenance",
                "1 while the service is in maintenance mode.",
                &["service"],
            ),
            backend_up: gauge(
                &r,
                "switchyard_backend_up",
                "1 when the health check sees the backend healthy (always 1 without a health check).",
                &["service", "color", "backend"],
            ),
            in_flight: gauge(
                &r,
                "switchyard_in_flight_requests",
                "Requests in flight per pool, upgraded connections included.",
                &["service", "color"],
            ),
            upgraded: gauge(
                &r,
                "switchyard_upgraded_connections",
                "Open WebSocket and other upgraded connections per pool.",
                &["service", "color"],
            ),
            refusals: counter(
                &r,
                "switchyard_refusals_total",
                "Answers the proxy gave itself, and slow client connections cut, by reason.",
                &["reason"],
            ),
            limit_admissions: counter(
                &r,
                "switchyard_limit_admissions_total",
                "Requests a limit let through.",
                &["kind", "limit"],
            ),
            limit_refusals: counter(
                &r,
                "switchyard_limit_refusals_total",
                "Requests a limit refused, by reason.",
                &["kind", "limit", "reason"],
            ),
            cluster_limit_fallbacks: counter(
                &r,
                "switchyard_cluster_limit_fallbacks_total",
                "Requests a cluster limit judged by this instance's local share (Redis unreachable).",
                &["kind", "limit"],
            ),
            concurrency_in_flight: gauge(
                &r,
                "switchyard_concurrency_in_flight",
                "Slots of a concurrency cap held now.",
                &["limit"],
            ),
            concurrency_queue_depth: gauge(
                &r,
                "switchyard_concurrency_queue_depth",
                "Requests waiting for a slot of a concurrency cap now.",
                &["limit"],
            ),
            tokens: counter(
                &r,
                "switchyard_tokens_total",
                "Tokens through a token budget by outcome.",
                &["budget", "outcome"],
            ),
            service_tokens: counter(
                &r,
                "switchyard_service_tokens_total",
                "Tokens through token budgets per service by outcome.",
                &["service", "outcome"],
            ),
            certificate_not_after: gauge(
                &r,
                "switchyard_certificate_not_after_seconds",
                "End of the served certificate's validity, Unix seconds.",
                &["certificate"],
            ),
            certificate_renewal_failures: counter(
                &r,
                "switchyard_certificate_renewal_failures_total",
                "Failed ACME renewals of the certificate.",
                &["certificate"],
            ),
            cluster_redis_up: gauge(
                &r,
                "switchyard_cluster_redis_up",
                "With [cluster]: 1 while the cluster's Redis answers this instance, 0 while it does not (switches refused, cluster limits on the local share).",
                &[],
            ),
            cluster_state_version: gauge(
                &r,
                "switchyard_cluster_state_version",
                "With [cluster]: the version of the shared state this instance serves (0 before its first sync).",
                &[],
            ),
            cluster_instances: gauge(
                &r,
                "switchyard_cluster_instances",
                "With [cluster]: live instances at this instance's last heartbeat, itself included.",
                &[],
            ),
            cluster_redis_outages: counter(
                &r,
                "switchyard_cluster_redis_outages_total",
                "With [cluster]: times the cluster's Redis stopped answering this instance, since start.",
                &[],
            ),
            registry: r,
        };
        f.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), COMMIT])
            .set(1);
        for result in ["success", "failure"] {
            f.config_reloads.with_label_values(&[result]);
        }
        f
    }
}

impl Default for Families {
    fn default() -> Self {
        Families::new()
    }
}
