//! The access log: one JSON object per line for every finished request,
//! for Loki and `jq` (README "Access log" lists the fields).
//!
//! Each line is a `tracing` event with the target [`TARGET`], sent to a
//! dispatcher of its own ([`AccessLog`] holds it) rather than to the
//! process's subscriber: the operator's `RUST_LOG` filter and the stderr
//! format of the ordinary log never touch it, and an access line can never
//! land on stderr, nor an ordinary log line in the access log.
//!
//! The line is handed to a writer thread (`tracing-appender`'s lossy
//! non-blocking writer): a slow disk or a stalled stdout pipe never delays
//! a response. When its buffer (`buffer_lines`) is full, lines are dropped,
//! counted ([`AccessLog::dropped_lines`]) and the first drop is said once in
//! the ordinary log. Lines still in the buffer when the process exits are
//! lost (the writer normally keeps up within milliseconds).
//!
//! Only what [`RequestRecord`] holds is written: the path without its
//! query, no header values, so no `Authorization`, cookie, API key or
//! token-budget key can reach the log.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{span, Dispatch, Event, Metadata, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config;
use crate::record::{Observer, RequestRecord};

/// The `tracing` target of access log events.
pub const TARGET: &str = "switchyard::access";

/// Mode of an access log file switchyard creates (0640): it holds client
/// addresses, so not world-readable.
pub const FILE_MODE: u32 = 0o640;

/// Longest request path written, in bytes (4096): a client controls the
/// path, up to the 64 KiB a URI may have, so a line stays far below Loki's
/// default line limit (256 KB) and `buffer_lines` queued lines stay a
/// bounded amount of memory. A longer path is cut and ends with `…`.
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest request method written, in bytes (32): the standard methods
/// have at most 7 letters, but an extension method is a token of any
/// length the request header holds (up to Pingora's 1 MiB). A longer one
/// is cut and ends with `…`.
pub const MAX_METHOD_BYTES: usize = 32;

/// What a field cut to its bound ends with.
const CUT: &str = "\u{2026}";

/// Why the access log cannot be written where the config says.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("access log {}: directory {} does not exist; create it or change access_log.path", config::show_path(path), dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error(
        "access log {}: is a directory; access_log.path names a file",
        config::show_path(path)
    )]
    IsDirectory { path: PathBuf },
    #[error("cannot open access log {}: {source}", config::show_path(path))]
    Open { path: PathBuf, source: io::Error },
}

/// What `switchyard check` verifies about `access_log.path` without creating
/// anything: its directory exists and it is not itself a directory.
pub fn check_path(path: &Path) -> Result<(), AccessLogError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(AccessLogError::NoDirectory {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    if path.is_dir() {
        return Err(AccessLogError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The access log observer; register it on every proxy.
pub struct AccessLog {
    sample: f64,
    dispatch: Dispatch,
    sink: Arc<Sink>,
}

impl AccessLog {
    /// Opens `config.access_log.path` (append, created with [`FILE_MODE`])
    /// or takes standard output. `None` when the access log is off. The
    /// writer thread starts with the first line, so that it is born after
    /// `--daemon` forks (a fork keeps only the calling thread).
    pub fn new(config: &config::Config) -> Result<Option<AccessLog>, AccessLogError> {
        let settings = &config.access_log;
        if !settings.enabled {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = match &settings.path {
            Some(path) => Box::new(open(path)?),
            None => Box::new(io::stdout()),
        };
        Ok(Some(AccessLog::with_writer(
            settings.sample,
            settings.buffer_lines,
            out,
        )))
    }

    fn with_writer(sample: f64, buffer_lines: usize, out: Box<dyn Write + Send>) -> AccessLog {
        let sink = Arc::new(Sink {
            out: Mutex::new(Some(out)),
            writer: OnceLock::new(),
            buffer_lines,
            warned: AtomicBool::new(false),
        });
        AccessLog {
            sample,
            dispatch: Dispatch::new(Lines { sink: sink.clone() }),
            sink,
        }
    }

    /// Lines dropped so far because the writer could not keep up.
    pub fn dropped_lines(&self) -> usize {
        self.sink
            .writer
            .get()
            .map_or(0, |(w, _)| w.error_counter().dropped_lines())
    }

    /// Whether this request's line is written: every error (status 400 and
    /// up), refusal and unanswered request (status 0, the client left);
    /// a `sample` share of the rest. No allocation either way.
    fn sampled(&self, record: &RequestRecord<'_>) -> bool {
        if record.status >= 400 || record.status == 0 || record.refusal.is_some() {
            return true;
        }
        self.sample >= 1.0 || (self.sample > 0.0 && rand::random::<f64>() < self.sample)
    }
}

impl Observer for AccessLog {
    fn observe(&self, r: &RequestRecord<'_>) {
        if !self.sampled(r) {
            return;
        }
        let method = bounded(r.method, MAX_METHOD_BYTES);
        let path = bounded(r.path, MAX_PATH_BYTES);
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info!(
                target: TARGET,
                request_id = r.request_id,
                client = r.client.map(display),
                method = &*method,
                host = r.host,
                path = &*path,
                status = r.status,
                service = r.service,
                color = r.color.map(|c| c.as_str()),
                route = r.route,
                backend = r.backend.map(display),
                upstream_time_ms = r.upstream_time.map(millis),
                total_time_ms = millis(r.total_time),
                bytes_in = r.bytes_in,
                bytes_out = r.bytes_out,
                refusal = r.refusal.map(|f| f.reason()),
            );
        });
        // Outside the access dispatcher: this goes to the ordinary log.
        let dropped = self.dropped_lines();
        if dropped > 0 && !self.sink.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dropped,
                buffer_lines = self.sink.buffer_lines,
                "access log lines dropped: the writer cannot keep up (slow disk or stdout \
                 pipe); this is said once, the count goes on"
            );
        }
    }
}

/// `text` if it has at most `max` bytes, else its longest start of at
/// most `max` bytes that ends on a character boundary, then [`CUT`].
/// Borrows (no allocation) in the usual case.
fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{CUT}", &text[..end]))
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn open(path: &Path) -> Result<File, AccessLogError> {
    check_path(path)?;
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Where the lines go: the output until the writer thread takes it.
struct Sink {
    out: Mutex<Option<Box<dyn Write + Send>>>,
    writer: OnceLock<(NonBlocking, WorkerGuard)>,
    buffer_lines: usize,
    /// Whether the first dropped line was said in the ordinary log.
    warned: AtomicBool,
}

impl Sink {
    /// Queues one whole line (one message to the writer thread, so lines
    /// never interleave).
    fn write(&self, line: &[u8]) {
        let (writer, _) = self.writer.get_or_init(|| {
            let out = self
                .out
                .lock()
                .ok()
                .and_then(|mut o| o.take())
                .unwrap_or_else(|| Box::new(io::sink()));
            NonBlockingBuilder::default()
                .lossy(true)
                .buffered_lines_limit(self.buffer_lines)
                .thread_name("access-log")
                .finish(out)
        });
        // `NonBlocking` writes through `&mut`; a clone is a channel handle.
        let _ = writer.clone().write_all(line);
    }
}

/// The access log's own `tracing` subscriber: it takes only [`TARGET`]
/// events and writes each as one JSON line. Spans are not used.
struct Lines {
    sink: Arc<Sink>,
}

fn is_access(meta: &Metadata<'_>) -> bool {
    meta.target() == TARGET
}

impl Subscriber for Lines {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        // `never` for everything else, so that this dispatcher existing
        // does not make the process's other callsites costlier.
        match is_access(meta) {
            true => Interest::always(),
            false => Interest::never(),
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        is_access(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        if !is_access(event.metadata()) {
            return;
        }
        let mut line = Line {
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ..Line::default()
        };
        event.record(&mut line);
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        self.sink.write(&bytes);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// One access log line; the field order is the order written. A field the
/// request did not reach (no service, no backend...) is `null`.
#[derive(Serialize, Default)]
struct Line {
    timestamp: String,
    request_id: Option<String>,
    client: Option<String>,
    method: Option<String>,
    host: Option<String>,
    path: Option<String>,
    status: Option<u64>,
    service: Option<String>,
    color: Option<String>,
    route: Option<String>,
    backend: Option<String>,
    upstream_time_ms: Option<f64>,
    total_time_ms: Option<f64>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    refusal: Option<String>,
}

impl Line {
    fn text(&mut self, name: &str, value: String) {
        let slot = match name {
            "request_id" => &mut self.request_id,
            "client" => &mut self.client,
            "method" => &mut self.method,
            "host" => &mut self.host,
            "path" => &mut self.path,
            "service" => &mut self.service,
            "color" => &mut self.color,
            "route" => &mut self.route,
            "backend" => &mut self.backend,
            "refusal" => &mut self.refusal,
            _ => return,
        };
        *slot = Some(value);
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `display` values (addresses) arrive here, formatted as Display.
        self.text(field.name(), format!("{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "status" => self.status = Some(value),
            "bytes_in" => self.bytes_in = Some(value),
            "bytes_out" => self.bytes_out = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            "upstream_time_ms" => self.upstream_time_ms = Some(value),
            "total_time_ms" => self.total_time_ms = Some(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::mpsc;

    use serde_json::Value;

    use super::*;
    use crate::pools::Color;
    use crate::respond::Refusal;

    /// Collects written bytes; optionally blocks every write until released.
    #[derive(Clone)]
    struct Capture {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Option<Arc<Mutex<mpsc::Receiver<()>>>>,
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = &self.gate {
                let _ = gate.lock().unwrap().recv();
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(status: u16) -> RequestRecord<'static> {
        RequestRecord {
            request_id: "rid-1",
            client: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            method: "GET",
            host: Some("api.example.com"),
            path: "/v1/x",
            status,
            service: Some("api"),
            color: Some(Color::Green),
            route: Some("api.example.com/v1/"),
            backend: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            upstream_time: Some(Duration::from_micros(1500)),
            total_time: Duration::from_micros(2250),
            bytes_in: 3,
            bytes_out: 42,
            refusal: None,
            stream: false,
        }
    }

    fn log(sample: f64, buffer: usize, out: Capture) -> AccessLog {
        AccessLog::with_writer(sample, buffer, Box::new(out))
    }

    fn capture() -> Capture {
        Capture {
            bytes: Arc::new(Mutex::new(Vec::new())),
            gate: None,
        }
    }

    fn lines(c: &Capture, n: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8(c.bytes.lock().unwrap().clone()).unwrap();
            if text.lines().count() >= n || std::time::Instant::now() > deadline {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_line_has_every_field_in_order() {
        let out = capture();
        let log = log(1.0, 16, out.clone());
        log.observe(&record(200));
        let mut refused = record(429);
        refused.backend = None;
        refused.upstream_time = None;
        refused.refusal = Some(Refusal::Busy(1));
        log.observe(&refused);
        let got = lines(&out, 2);
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .next()
            .unwrap()
            .split("\":")
            .map(|k| k.rsplit('"').next().unwrap())
            .collect();
        assert_eq!(
            &keys[..16],
            [
                "timestamp",
                "request_id",
                "client",
                "method",
                "host",
                "path",
                "status",
                "service",
                "color",
                "route",
                "backend",
                "upstream_time_ms",
                "total_time_ms",
                "bytes_in",
                "bytes_out",
                "refusal"
            ]
        );
        let l = &got[0];
        assert_eq!(l["client"], "127.0.0.1");
        assert_eq!(l["backend"], "127.0.0.1:8081");
        assert_eq!(l["service"], "api");
        assert_eq!(l["route"], "api.example.com/v1/");
        assert_eq!(l["color"], "green");
        assert_eq!(l["upstream_time_ms"], 1.5);
        assert_eq!(l["total_time_ms"], 2.25);
        assert_eq!(l["status"], 200);
        assert_eq!(l["refusal"], Value::Null);
        let ts = l["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        assert_eq!(got[1]["refusal"], "busy");
        assert_eq!(got[1]["backend"], Value::Null);
        assert_eq!(got[1]["upstream_time_ms"], Value::Null);
    }

    #[test]
    fn long_methods_and_paths_are_cut() {
        assert_eq!(bounded("/short", 8), "/short");
        assert_eq!(bounded("/abcdefgh", 4), "/abc\u{2026}");
        // Never inside a character: `é` is two bytes.
        assert_eq!(bounded("/\u{e9}\u{e9}", 4), "/\u{e9}\u{2026}");
        let out = capture();
        let log = log(1.0, 16, out.clone());
        let path = format!("/{}", "p".repeat(3 * MAX_PATH_BYTES));
        let method = "M".repeat(10 * MAX_METHOD_BYTES);
        let mut r = record(200);
        r.path = &path;
        r.method = &method;
        log.observe(&r);
        let got = lines(&out, 1);
        let logged = got[0]["path"].as_str().unwrap();
        assert_eq!(logged.len(), MAX_PATH_BYTES + CUT.len());
        assert!(logged.ends_with(CUT) && path.starts_with(&logged[..MAX_PATH_BYTES]));
        let logged = got[0]["method"].as_str().unwrap();
        assert_eq!(logged, format!("{}{CUT}", &method[..MAX_METHOD_BYTES]));
    }

    #[test]
    fn sampling_keeps_every_error() {
        let out = capture();
        let log = log(0.0, 64, out.clone());
        for status in [200, 204, 302, 404, 503, 0] {
            log.observe(&record(status));
        }
        let got = lines(&out, 3);
        let statuses: Vec<u64> = got.iter().map(|l| l["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses, [404, 503, 0]);
    }

    #[test]
    fn dropped_lines_are_counted_and_never_block() {
        let (release, gate) = mpsc::channel();
        let out = Capture {
            bytes: Arc::new(Mutex::new(Vec::new())),
            gate: Some(Arc::new(Mutex::new(gate))),
        };
        let log = log(1.0, 2, out.clone());
        // The writer thread holds the first line (blocked), two wait in the
        // buffer, the rest are dropped; `observe` returns every time.
        for _ in 0..10 {
            log.observe(&record(200));
        }
        assert!(log.dropped_lines() >= 7, "{}", log.dropped_lines());
        assert!(log.sink.warned.load(Ordering::Relaxed));
        drop(release);
    }
}
