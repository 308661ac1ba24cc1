//! The families switchyard already keeps the numbers for: colors, health,
//! pools, limits, tokens, certificates, slow clients. They are copied into
//! the registry when it is scraped, not counted twice on the request path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde_json::{json, Value};

use super::{registry::Families, Metrics, SLOW_CLIENT};
use crate::connections::Connections;
use crate::health::HealthStatus;
use crate::pools::{Color, ServiceState, SwitchCause};
use crate::switchboard::Switchboard;
use crate::tls::handshake::TlsAcceptor;
use crate::tls::store::CertStore;

/// How long `/readyz` waits for each proxy listener to accept a probe
/// connection (500 ms): on loopback an accept is immediate.
pub const LISTENER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where the numbers of the state families live.
pub struct Sources {
    /// Colors, pools and the limits in force (a reload replaces them).
    pub board: Arc<Switchboard>,
    /// Served certificates; `None` without TLS.
    pub certs: Option<Arc<CertStore>>,
    /// The proxy listeners' connection table (header deadline cuts).
    pub connections: Arc<Connections>,
    /// The HTTPS listener's handshakes (handshake timeouts); `None` without HTTPS.
    pub handshakes: Option<Arc<TlsAcceptor>>,
    /// Requests in flight on every listener (the drain counter).
    pub requests: Arc<AtomicUsize>,
    /// The proxy listeners `/readyz` probes.
    pub listeners: Vec<SocketAddr>,
    /// The canary windows, with the automatic rollbacks by gate.
    pub canary: Option<Arc<crate::canary::Stats>>,
    /// The webhooks' queues (notices dropped when one is full).
    pub notifier: Option<Arc<crate::notify::Notifier>>,
    /// The access log (lines dropped when its writer falls behind).
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

/// The state half of the metrics: refreshed into the registry on scrape.
pub struct State {
    pub metrics: Arc<Metrics>,
    pub sources: Sources,
    /// Scrapes refresh one at a time: a counter is raised by reading it and
    /// adding the difference.
    refresh: Mutex<()>,
}

/// Raises a counter to a value read elsewhere; never lowers it. Every
/// source counts up from start-up, but some values are derived from two
/// counters read one after the other (a rate limit's admissions are its
/// checks minus its refusals, and a check is counted a moment before its
/// refusal), so a scrape can read one a little high and the next one
/// lower. A counter that went down would read to Prometheus as a restart,
/// and `rate()` would count its whole value again; holding it until the
/// source catches up keeps it monotonic.
fn set_counter(counter: &IntCounter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

fn flag(on: bool) -> i64 {
    i64::from(on)
}

/// Whether a backend counts as up: healthy by its check, or not checked.
fn backend_up(service: &ServiceState, status: HealthStatus) -> bool {
    !service.gated || status == HealthStatus::Healthy
}

impl State {
    /// Creates the zero-valued series of every configured service, color,
    /// backend, limit, budget and certificate.
    pub fn new(metrics: Arc<Metrics>, sources: Sources) -> State {
        let state = State {
            metrics,
            sources,
            refresh: Mutex::new(()),
        };
        state.refresh();
        state
    }

    /// Copies the current numbers into the registry and encodes it in the
    /// Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        use prometheus::Encoder;
        self.refresh();
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.metrics.families.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// Copies every state family's numbers into the registry.
    pub fn refresh(&self) {
        let _one = self.refresh.lock().unwrap_or_else(|p| p.into_inner());
        let f = &self.metrics.families;
        let s = &self.sources;
        self.pools(f);
        if let Some(stats) = &s.canary {
            for (service, gate, n) in stats.rollbacks() {
                set_counter(
                    &f.automatic_rollbacks
                        .with_label_values(&[&service, gate.as_str()]),
                    n,
                );
            }
        }
        if let Some(n) = &s.notifier {
            for (webhook, dropped) in n.dropped() {
                set_counter(&f.notices_dropped.with_label_values(&[&webhook]), dropped);
            }
        }
        if let Some(log) = &s.access_log {
            set_counter(
                &f.access_log_dropped.with_label_values::<&str>(&[]),
                log.dropped_lines() as u64,
            );
        }
        let slow = s.connections.stats.header_timeouts.load(Ordering::Relaxed)
            + s.handshakes
                .as_ref()
                .map_or(0, |h| h.stats.timeouts.load(Ordering::Relaxed));
        set_counter(&f.refusals.with_label_values(&[SLOW_CLIENT]), slow);
        self.limits(f);
        self.cluster(f);
        if let Some(certs) = &s.certs {
            for c in certs.status() {
                // 0 until a real certificate is served: the self-signed
                // stand-in's 7 days are not an expiry to alert on (the
                // renewal failure alert covers an issuance that fails).
                let not_after = c
                    .info
                    .as_ref()
                    .filter(|_| !c.bootstrap)
                    .and_then(|i| i.not_after.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                f.certificate_not_after
                    .with_label_values(&[&c.name])
                    .set(not_after);
                set_counter(
                    &f.certificate_renewal_failures.with_label_values(&[&c.name]),
                    c.failures_total,
                );
            }
        }
    }

    fn pools(&self, f: &Families) {
        let board = &self.sources.board;
        let snapshot = board.load();
        for service in snapshot.services.iter() {
            let name: &str = &service.name;
            f.maintenance
                .with_label_values(&[name])
                .set(flag(service.maintenance));
            for color in Color::ALL {
                let c = color.as_str();
                let pool = service.pool(color);
                f.active_color
                    .with_label_values(&[name, c])
                    .set(flag(service.active == color));
                f.traffic_weight
                    .with_label_values(&[name, c])
                    .set(i64::from(service.weights.of(color)));
                f.in_flight
                    .with_label_values(&[name, c])
                    .set(pool.in_flight() as i64);
                f.upgraded
                    .with_label_values(&[name, c])
                    .set(pool.upgraded() as i64);
                for b in &pool.backends {
                    let up = backend_up(service, b.health.status());
                    f.backend_up
                        .with_label_values(&[name, c, &b.addr.to_string()])
                        .set(flag(up));
                }
            }
            for (cause, n) in SwitchCause::ALL.iter().zip(service.switches()) {
                set_counter(&f.switches.with_label_values(&[name, cause.as_str()]), n);
            }
        }
    }

    /// The cluster's families, only with `[cluster]` (absent otherwise,
    /// so an alert on them cannot fire on a lone instance).
    fn cluster(&self, f: &Families) {
        let board = &self.sources.board;
        let Some(link) = board.load().settings.cluster.clone() else {
            return;
        };
        let none: &[&str] = &[];
        f.cluster_redis_up
            .with_label_values(none)
            .set(flag(link.is_up()));
        let version = board.stamp().map_or(0, |s| s.version);
        f.cluster_state_version
            .with_label_values(none)
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        f.cluster_instances
            .with_label_values(none)
            .set(i64::try_from(link.live_instances()).unwrap_or(i64::MAX));
        set_counter(
            &f.cluster_redis_outages.with_label_values(none),
            link.outages(),
        );
    }

    fn limits(&self, f: &Families) {
        let s = &*self.sources.board.load();
        for limit in s.rate_limits.iter() {
            let name = limit.name();
            let refused = limit.refused();
            set_counter(
                &f.limit_admissions.with_label_values(&["rate_limit", name]),
                limit.checked().saturating_sub(refused),
            );
            set_counter(
                &f.limit_refusals
                    .with_label_values(&["rate_limit", name, "rate"]),
                refused,
            );
            if limit.is_cluster() {
                set_counter(
                    &f.cluster_limit_fallbacks
                        .with_label_values(&["rate_limit", name]),
                    limit.fallbacks(),
                );
            }
        }
        for cap in s.concurrency.iter() {
            let name = cap.name();
            let st = cap.stats();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            set_counter(
                &f.limit_admissions.with_label_values(&["concurrency", name]),
                load(&st.admitted),
            );
            for (reason, n) in [
                ("queue_full", load(&st.refused_queue_full)),
                ("queue_timeout", load(&st.refused_timeout)),
            ] {
                set_counter(
                    &f.limit_refusals
                        .with_label_values(&["concurrency", name, reason]),
                    n,
                );
            }
            if cap.is_cluster() {
                set_counter(
                    &f.cluster_limit_fallbacks
                        .with_label_values(&["concurrency", name]),
                    cap.fallbacks(),
                );
            }
            f.concurrency_in_flight
                .with_label_values(&[name])
                .set(cap.in_flight() as i64);
            f.concurrency_queue_depth
                .with_label_values(&[name])
                .set(cap.queue_depth() as i64);
        }
        for budget in s.budgets.iter() {
            let name = budget.name();
            let st = budget.stats();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            set_counter(
                &f.limit_admissions
                    .with_label_values(&["token_budget", name]),
                load(&st.admitted),
            );
            for (reason, n) in [
                ("exhausted", load(&st.refused_exhausted)),
                ("invalid", load(&st.refused_invalid)),
            ] {
                set_counter(
                    &f.limit_refusals
                        .with_label_values(&["token_budget", name, reason]),
                    n,
                );
            }
            if budget.is_cluster() {
                set_counter(
                    &f.cluster_limit_fallbacks
                        .with_label_values(&["token_budget", name]),
                    budget.fallbacks(),
                );
            }
            for (outcome, n) in [
                ("reserved", load(&st.reserved)),
                ("settled", load(&st.settled)),
                ("refunded", load(&st.refunded)),
                ("kept", load(&st.kept)),
            ] {
                set_counter(&f.tokens.with_label_values(&[name, outcome]), n);
            }
        }
        for (service, counts) in s.budgets.services() {
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            for (outcome, n) in [
                ("reserved", load(&counts.reserved)),
                ("settled", load(&counts.settled)),
                ("refunded", load(&counts.refunded)),
                ("kept", load(&counts.kept)),
            ] {
                set_counter(&f.service_tokens.with_label_values(&[service, outcome]), n);
            }
        }
    }

    /// Why the process is not ready, if it is not: a proxy listener that
    /// does not accept, or an active pool with health checks and no
    /// healthy backend (of a service not in maintenance mode). The config
    /// is loaded: the listener runs.
    pub async fn not_ready(&self) -> Option<String> {
        for addr in &self.sources.listeners {
            let probe = reachable(*addr);
            let accepted = tokio::time::timeout(
                LISTENER_PROBE_TIMEOUT,
                tokio::net::TcpStream::connect(probe),
            )
            .await;
            if !matches!(accepted, Ok(Ok(_))) {
                return Some(format!("listener {addr} does not accept connections"));
            }
        }
        let snapshot = self.sources.board.load();
        let down: Vec<String> = snapshot
            .services
            .iter()
            // A service in maintenance answers its page on purpose, usually
            // while its backends are down: not a reason to take switchyard
            // out of a load balancer (the alert rules exempt it too).
            .filter(|s| s.gated && !s.maintenance && s.active_pool().healthy() == 0)
            .map(|s| format!("{} ({})", s.name, s.active))
            .collect();
        (!down.is_empty()).then(|| {
            format!(
                "no healthy backend in the active pool of {}",
                down.join(", ")
            )
        })
    }

    /// The `/status` summary: connections, requests, per-service colors and health.
    pub fn status(&self) -> Value {
        let s = &self.sources;
        let snapshot = s.board.load();
        let services: serde_json::Map<String, Value> = snapshot
            .services
            .iter()
            .map(|svc| {
                let pools: serde_json::Map<String, Value> = Color::ALL
                    .iter()
                    .map(|&c| {
                        let pool = svc.pool(c);
                        let up = pool
                            .backends
                            .iter()
                            .filter(|b| backend_up(svc, b.health.status()))
                            .count();
                        (
                            c.as_str().to_string(),
                            json!({
                                "backends": pool.backends.len(),
                                "up": up,
                                "in_flight": pool.in_flight(),
                                "upgraded": pool.upgraded(),
                            }),
                        )
                    })
                    .collect();
                (
                    svc.name.to_string(),
                    json!({
                        "active": svc.active,
                        "maintenance": svc.maintenance,
                        "health_checked": svc.gated,
                        "pools": pools,
                    }),
                )
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "unix_time": now,
            "connections": {
                "open": s.connections.open(),
                "max": s.connections.max_total(),
            },
            "requests": {
                "total": self.metrics.requests_total(),
                "in_flight": s.requests.load(Ordering::Relaxed),
            },
            "services": services,
        })
    }
}

/// The address a local client reaches a listener at: a wildcard address
/// is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_counter_never_goes_down() {
        let c = IntCounter::new("c", "c").unwrap();
        set_counter(&c, 2);
        assert_eq!(c.get(), 2);
        // A derived value read a little high, then exact: no step back.
        set_counter(&c, 1);
        assert_eq!(c.get(), 2);
        set_counter(&c, 5);
        assert_eq!(c.get(), 5);
    }
}
