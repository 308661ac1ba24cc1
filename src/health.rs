//! Active health checks of every backend of both colors.
//!
//! Each service with a `health` setting gets one loop that probes all its
//! backends (blue and green) every `interval` with `GET path`. A backend
//! becomes healthy after `rise` passes in a row and unhealthy after `fall`
//! failures in a row. Until its first verdict a backend is `unknown`: it takes
//! traffic (a restart of switchyard must not answer 503 for the first few
//! seconds) but does not count as healthy when a switch is gated.
//!
//! The checks follow config reloads: each probe round reads the backends
//! from the current snapshot (a backend a reload adds is probed from the
//! next round, a removed one no longer), and a reload that adds, removes
//! or changes a service's check starts or stops its loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::HealthCheck;
use crate::notify::Notice;
use crate::pools::{Color, ServiceState};
use crate::switchboard::Switchboard;

/// Largest health response read (16 KiB): enough for a status line, headers
/// and a small body to search for the expected text.
const MAX_RESPONSE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Unknown,
    Healthy,
    Unhealthy,
}

/// One backend's health, shared by every snapshot (backends outlive switches).
#[derive(Debug)]
pub struct Health {
    status: AtomicU8,
    passes: AtomicU32,
    fails: AtomicU32,
    last_error: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            status: AtomicU8::new(HealthStatus::Unknown as u8),
            passes: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl Health {
    pub fn status(&self) -> HealthStatus {
        match self.status.load(Ordering::Relaxed) {
            1 => HealthStatus::Healthy,
            2 => HealthStatus::Unhealthy,
            _ => HealthStatus::Unknown,
        }
    }

    /// Whether the backend may take requests: anything but a proven failure.
    pub fn routable(&self) -> bool {
        self.status() != HealthStatus::Unhealthy
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records one probe; returns the new status when it changed.
    pub fn record(&self, result: Result<(), String>, rise: u32, fall: u32) -> Option<HealthStatus> {
        let before = self.status();
        let next = match result {
            Ok(()) => {
                self.fails.store(0, Ordering::Relaxed);
                let passes = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
                (passes >= rise).then_some(HealthStatus::Healthy)
            }
            Err(e) => {
                self.passes.store(0, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
                (fails >= fall).then_some(HealthStatus::Unhealthy)
            }
        };
        match next {
            Some(status) if status != before => {
                self.status.store(status as u8, Ordering::Relaxed);
                Some(status)
            }
            _ => None,
        }
    }
}

/// One probe: `GET path` over a fresh HTTP/1.0 connection (so the body is
/// never chunked and every probe also proves the backend accepts connections).
/// Reading stops as soon as the answer can be judged: some servers keep even
/// an HTTP/1.0 connection open.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let mut conn = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: switchyard-health\r\nConnection: close\r\n\r\n",
            check.path
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            buf.extend_from_slice(&chunk[..n]);
            if n == 0 || buf.len() >= MAX_RESPONSE || complete(&buf, check.body.is_some()) {
                break;
            }
        }
        judge(&buf, check)
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

/// Whether `response` holds everything the check needs: the header, and the
/// whole body (by `Content-Length`) when the body is searched.
fn complete(response: &[u8], need_body: bool) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(header_len)) = parsed.parse(response) else {
        return false;
    };
    if !need_body {
        return true;
    }
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    length.is_some_and(|len| response.len() >= header_len + len)
}

/// Whether a raw HTTP response passes the check.
fn judge(response: &[u8], check: &HealthCheck) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let body_start = match parsed.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete response".into()),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let code = parsed.code.unwrap_or(0);
    if code != check.expect {
        return Err(format!("status {code}, expected {}", check.expect));
    }
    if let Some(text) = &check.body {
        let body = &response[body_start..];
        if !body.windows(text.len()).any(|w| w == text.as_bytes()) {
            return Err(format!("body does not contain {text:?}"));
        }
    }
    Ok(())
}

/// The background service that runs every service's probe loop.
pub struct HealthChecker {
    board: Arc<Switchboard>,
}

impl HealthChecker {
    /// Checks every service of `board`'s snapshot that has a `health`
    /// setting, now and after every reload.
    pub fn new(board: Arc<Switchboard>) -> HealthChecker {
        HealthChecker { board }
    }
}

/// One service's probe loop: every `check.interval`, probes the backends
/// the current snapshot gives the service; ends when the service is gone.
async fn probe_loop(board: Arc<Switchboard>, service: String, check: HealthCheck) {
    let mut tick = tokio::time::interval(check.interval);
    let mut watch = None;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = board.load();
        let Some((_, state)) = snap.service(&service) else {
            return;
        };
        check_service(&service, state, &check).await;
        watch_active(&board, &service, &mut watch);
    }
}

/// Probes every backend of both colors of one service, concurrently.
async fn check_service(service: &str, state: &ServiceState, check: &HealthCheck) {
    let probes = Color::ALL.into_iter().flat_map(|color| {
        state.pool(color).backends.iter().map(move |b| async move {
            let result = probe(b.addr, check).await;
            let cause = result.as_ref().err().cloned().unwrap_or_default();
            match b.health.record(result, check.rise, check.fall) {
                Some(HealthStatus::Unhealthy) => {
                    tracing::warn!(service, %color, backend = %b.addr, cause, "backend unhealthy")
                }
                Some(status) => {
                    tracing::info!(service, %color, backend = %b.addr, ?status, "backend healthy")
                }
                None => {}
            }
        })
    });
    futures_util::future::join_all(probes).await;
}

/// What [`watch_active`] saw last: the active color, whether it had a
/// healthy backend, and whether its loss was announced.
type ActiveWatch = Option<(Color, bool, bool)>;

/// Notifies when the active pool loses its last healthy backend, and when
/// it has one again after that. A pool that has not had a verdict yet
/// (`unknown` after a start) is not a loss; a color change starts over.
fn watch_active(board: &Switchboard, service: &str, watch: &mut ActiveWatch) {
    let snap = board.load();
    let Some((_, state)) = snap.service(service) else {
        return;
    };
    let pool = state.active_pool();
    let up = pool.healthy() > 0;
    let (announced, notice) = match *watch {
        Some((color, true, _)) if color == state.active && !up => {
            let causes: Vec<String> = pool
                .backends
                .iter()
                .map(|b| format!("{}: {}", b.addr, b.health.last_error().unwrap_or_default()))
                .collect();
            let detail = format!("no healthy backend: {}", causes.join("; "));
            tracing::warn!(service, color = %state.active, "the active pool has no healthy backend left");
            (
                true,
                Some(Notice::active_health(service, state.active, true, &detail)),
            )
        }
        Some((color, false, true)) if color == state.active && up => {
            let detail = format!(
                "{} of {} backends healthy",
                pool.healthy(),
                pool.backends.len()
            );
            (
                false,
                Some(Notice::active_health(service, state.active, false, &detail)),
            )
        }
        Some((color, _, announced)) if color == state.active => (announced, None),
        _ => (false, None),
    };
    *watch = Some((state.active, up, announced));
    if let Some(n) = notice {
        board.notify(n);
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut reloads = self.board.reloads();
        // Service name -> the check its loop runs, and the loop.
        let mut loops: HashMap<String, (HealthCheck, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let snap = self.board.load();
            let wanted: Vec<(String, HealthCheck)> = snap
                .services
                .iter()
                .filter_map(|s| Some((s.name.to_string(), s.health.clone()?)))
                .collect();
            loops.retain(|name, (check, task)| {
                let keep = wanted.iter().any(|(n, c)| n == name && c == check);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (name, check) in wanted {
                if let std::collections::hash_map::Entry::Vacant(slot) = loops.entry(name) {
                    let task = probe_loop(self.board.clone(), slot.key().clone(), check.clone());
                    slot.insert((check, tokio::spawn(task)));
                }
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        let _ = shutdown.changed().await;
                        break;
                    }
                }
            }
        }
        // Aborting also stops a probe in progress.
        for (_, (_, task)) in loops {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: Option<&str>) -> HealthCheck {
        HealthCheck {
            path: "/ping".into(),
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            expect: 200,
            body: body.map(str::to_string),
            rise: 2,
            fall: 2,
        }
    }

    #[test]
    fn judging_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong";
        assert_eq!(judge(ok, &check(None)), Ok(()));
        assert_eq!(judge(ok, &check(Some("pong"))), Ok(()));
        assert!(judge(ok, &check(Some("ok!"))).unwrap_err().contains("body"));
        let down = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert!(judge(down, &check(None)).unwrap_err().contains("503"));
        assert!(judge(b"garbage\r\n\r\n", &check(None)).is_err());
    }

    #[test]
    fn reading_stops_once_the_answer_is_known() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n";
        assert!(!complete(b"HTTP/1.1 200 OK\r\n", false));
        assert!(complete(head, false));
        assert!(!complete(head, true));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong",
            true
        ));
    }

    #[test]
    fn rise_and_fall() {
        let h = Health::default();
        assert_eq!(h.status(), HealthStatus::Unknown);
        assert!(h.routable());
        assert_eq!(h.record(Ok(()), 2, 2), None);
        assert_eq!(h.record(Ok(()), 2, 2), Some(HealthStatus::Healthy));
        assert_eq!(h.record(Err("x".into()), 2, 2), None);
        assert_eq!(
            h.record(Err("y".into()), 2, 2),
            Some(HealthStatus::Unhealthy)
        );
        assert!(!h.routable());
        assert_eq!(h.last_error().as_deref(), Some("y"));
    }
}
