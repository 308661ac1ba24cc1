//! Open-loop load at a fixed request rate (issue 14, "fair measurements"):
//! every proxy of a scenario gets the same offered rate, so CPU per request
//! is compared at the same number of events per second rather than at each
//! proxy's own maximum (a closed-loop client such as wrk hands a faster
//! proxy more requests per wake-up, which makes each one cheaper).
//!
//! Why a generator of our own rather than a tool:
//! - wrk2 (the usual open-loop wrk) is in no package registry this project
//!   can install from (it would have to be cloned and built with its own
//!   LuaJIT, which `.ci/bench` cannot do on a fresh machine), and its send
//!   timer has millisecond resolution, which adds up to a millisecond of
//!   the client's own lateness to latencies that are a tenth of that here;
//! - oha (`cargo install`, minutes of build) runs a multi-threaded
//!   hyper client whose CPU per request is several times wrk's, on the same
//!   two cores as the proxy under test;
//! - h2load `--rps` reports no percentiles and times each request from
//!   when it was actually sent, so a stall hides the requests that queued
//!   behind it (coordinated omission).
//!
//! This one is built by `cargo bench` itself: one thread (a tokio
//! current-thread runtime, so its CPU is one thread's and can be read with
//! `getrusage`), `connections` kept-alive HTTP/1.1 connections opened
//! before the measurement starts, one request in flight on each, no
//! pipelining. Connection `c` of `n` owns the send slots `c, c + n, c + 2n,
//! ...` of a uniform schedule at `rate` per second (wrk2's model): it sends
//! at the slot's time, or at once when the previous answer came late. Each
//! latency is taken from the slot's *scheduled* time to the last byte of
//! the answer, so a stall is charged to every request that should have been
//! sent during it (corrected for coordinated omission). Send times come
//! from a `timerfd` per connection (nanosecond resolution); how late the
//! generator itself was at idle slots is reported as `send_lag`, so its
//! own error is visible next to the figures.

use std::io;
use std::net::{SocketAddr, TcpStream as StdStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// How long an answer may take before it counts as an error and its
/// connection is replaced (5 s, as wrk's `--timeout` in this harness).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// After the schedule's last slot, how long requests still owed (a proxy
/// that fell behind) may be sent and answered (5 s); those never sent by
/// then count as `missed`.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Read buffer per connection (64 KiB): a whole answer of the wrk
/// scenarios (at most 16 KiB of body) in one or a few reads.
const READ_CHUNK: usize = 64 * 1024;

/// What to send, how fast and for how long.
pub struct Plan {
    /// The whole request, sent as is on every slot.
    pub request: Vec<u8>,
    /// The request asks for `Connection: close`: a new connection per
    /// request (its connect then counts in the latency).
    pub close: bool,
    /// Offered requests per second, over all connections.
    pub rate: u32,
    pub secs: u32,
}

/// One run, as measured by the generator.
#[derive(Debug, Clone, Default)]
pub struct RateOut {
    pub offered_rps: f64,
    /// Answers read completely (any status).
    pub completed: u64,
    /// Slots of the schedule still unsent when the drain time ran out.
    pub missed: u64,
    /// Failed sends or reads, answers that broke the protocol or timed out.
    pub errors: u64,
    /// Complete answers outside 2xx/3xx.
    pub non2xx: u64,
    /// From the first slot to the last answer (at least the schedule's length).
    pub secs: f64,
    /// `completed / secs`.
    pub achieved_rps: f64,
    /// Latency from scheduled send to the answer's last byte.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// How late the generator sent at slots where its connection was idle
    /// (its own timing error, not the proxy's): median and p99, ms.
    pub send_lag_p50_ms: f64,
    pub send_lag_p99_ms: f64,
    /// CPU of the generator's thread per completed request, µs.
    pub client_cpu_us_per_req: f64,
}

/// Connections opened ahead of a run, so that the proxy's accepts fall
/// outside the measured window.
pub struct Conns {
    addr: SocketAddr,
    streams: Vec<StdStream>,
}

/// Opens `n` connections to `addr`.
pub fn connect(addr: SocketAddr, n: u32) -> Result<Conns, String> {
    let streams = (0..n.max(1))
        .map(|_| {
            let s = StdStream::connect_timeout(&addr, ANSWER_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("open-loop client: connecting to {addr}: {e}"))?;
    Ok(Conns { addr, streams })
}

/// Per connection: what it saw.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    lags_ns: Vec<u64>,
    completed: u64,
    missed: u64,
    errors: u64,
    non2xx: u64,
    last_answer_ns: u64,
}

impl Conns {
    /// Runs `plan` on these connections; returns when every slot has been
    /// answered, or [`DRAIN`] after the schedule's end.
    pub fn run(self, plan: &Plan) -> Result<RateOut, String> {
        let rate = plan.rate.max(1);
        let n = self.streams.len() as u64;
        let slots = u64::from(rate) * u64::from(plan.secs);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("open-loop client: runtime: {e}"))?;
        let cpu0 = thread_cpu_ns();
        let tallies = rt.block_on(async {
            // The first slot a little ahead, so every connection is armed.
            let start = mono_ns() + 10_000_000;
            let end = start + u64::from(plan.secs) * 1_000_000_000;
            let mut tasks = Vec::new();
            for (c, s) in self.streams.into_iter().enumerate() {
                let job = Job {
                    addr: self.addr,
                    request: plan.request.clone(),
                    close: plan.close,
                    start,
                    end,
                    // Slot k is at start + k / rate; connection c owns
                    // c, c + n, c + 2n, ...
                    first: c as u64,
                    step: n,
                    slots,
                    rate: u64::from(rate),
                };
                tasks.push(tokio::spawn(connection(job, s)));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(
                    t.await
                        .map_err(|e| format!("open-loop client task: {e}"))??,
                );
            }
            Ok::<_, String>((start, end, out))
        });
        let cpu = thread_cpu_ns().saturating_sub(cpu0);
        let (start, end, tallies) = tallies?;
        let mut all = Tally::default();
        for t in tallies {
            all.latencies_ns.extend(t.latencies_ns);
            all.lags_ns.extend(t.lags_ns);
            all.completed += t.completed;
            all.missed += t.missed;
            all.errors += t.errors;
            all.non2xx += t.non2xx;
            all.last_answer_ns = all.last_answer_ns.max(t.last_answer_ns);
        }
        all.latencies_ns.sort_unstable();
        all.lags_ns.sort_unstable();
        let secs = (all.last_answer_ns.max(end) - start) as f64 / 1e9;
        let ms = |v: &[u64], q: f64| percentile(v, q) as f64 / 1e6;
        Ok(RateOut {
            offered_rps: f64::from(rate),
            completed: all.completed,
            missed: all.missed,
            errors: all.errors,
            non2xx: all.non2xx,
            secs,
            achieved_rps: all.completed as f64 / secs,
            p50_ms: ms(&all.latencies_ns, 50.0),
            p99_ms: ms(&all.latencies_ns, 99.0),
            p999_ms: ms(&all.latencies_ns, 99.9),
            max_ms: all.latencies_ns.last().map_or(0.0, |&v| v as f64 / 1e6),
            send_lag_p50_ms: ms(&all.lags_ns, 50.0),
            send_lag_p99_ms: ms(&all.lags_ns, 99.0),
            client_cpu_us_per_req: if all.completed > 0 {
                cpu as f64 / 1e3 / all.completed as f64
            } else {
                0.0
            },
        })
    }
}

/// One connection's share of the schedule.
struct Job {
    addr: SocketAddr,
    request: Vec<u8>,
    close: bool,
    start: u64,
    end: u64,
    first: u64,
    step: u64,
    slots: u64,
    rate: u64,
}

impl Job {
    fn slot_ns(&self, k: u64) -> u64 {
        self.start + k * 1_000_000_000 / self.rate
    }
}

async fn connection(job: Job, first: StdStream) -> Result<Tally, String> {
    let timer = Timer::new().map_err(|e| format!("open-loop client: timerfd: {e}"))?;
    let mut stream = Some(TcpStream::from_std(first).map_err(|e| e.to_string())?);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut t = Tally::default();
    let give_up = job.end + DRAIN.as_nanos() as u64;
    let mut k = job.first;
    while k < job.slots {
        let slot = job.slot_ns(k);
        let now = mono_ns();
        if now >= give_up {
            t.missed += (job.slots - k).div_ceil(job.step);
            break;
        }
        if now < slot {
            timer
                .wait_until(slot)
                .await
                .map_err(|e| format!("open-loop client: timer: {e}"))?;
            t.lags_ns.push(mono_ns().saturating_sub(slot));
        }
        let s = match stream.take() {
            Some(s) => s,
            None => {
                match tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(job.addr)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        s
                    }
                    _ => {
                        t.errors += 1;
                        k += job.step;
                        continue;
                    }
                }
            }
        };
        let exchange = tokio::time::timeout(ANSWER_TIMEOUT, exchange(s, &job.request, &mut buf));
        match exchange.await {
            Ok(Ok((s, status, keep))) => {
                let done = mono_ns();
                t.latencies_ns.push(done.saturating_sub(slot));
                t.completed += 1;
                t.last_answer_ns = done;
                if !(200..400).contains(&status) {
                    t.non2xx += 1;
                }
                if keep && !job.close {
                    stream = Some(s);
                }
            }
            // The connection is dropped; the next slot opens a new one.
            Ok(Err(_)) | Err(_) => t.errors += 1,
        }
        k += job.step;
    }
    Ok(t)
}

/// Sends `request` and reads one whole answer; returns the stream, the
/// status and whether the connection may be reused.
async fn exchange(
    mut s: TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<(TcpStream, u16, bool)> {
    s.write_all(request).await?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let got = s.read(&mut buf[have..]).await?;
        if got == 0 {
            // EOF: complete only for an answer framed by the close.
            return match frame(&buf[..have]) {
                Framed::ToEof(status) => Ok((s, status, false)),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-answer",
                )),
            };
        }
        have += got;
        match frame(&buf[..have]) {
            Framed::Complete { status, keep } => return Ok((s, status, keep)),
            Framed::Partial | Framed::ToEof(_) => {}
            Framed::Bad(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
        }
    }
}

enum Framed {
    Partial,
    Complete {
        status: u16,
        keep: bool,
    },
    /// No length and not chunked: the body ends with the connection.
    ToEof(u16),
    Bad(&'static str),
}

/// Whether `data` holds one whole HTTP/1.1 answer (RFC 9112 §6.3).
fn frame(data: &[u8]) -> Framed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Framed::Partial,
        Err(_) => return Framed::Bad("malformed answer head"),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut keep = resp.version == Some(1);
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = Some(n),
                Err(_) => return Framed::Bad("bad Content-Length"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep = !value.eq_ignore_ascii_case("close");
        }
    }
    let body = &data[head..];
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Framed::Complete { status, keep };
    }
    if chunked {
        return match chunked_len(body) {
            Some(Ok(_)) => Framed::Complete { status, keep },
            Some(Err(why)) => Framed::Bad(why),
            None => Framed::Partial,
        };
    }
    match length {
        Some(n) if body.len() >= n => Framed::Complete { status, keep },
        Some(_) => Framed::Partial,
        None => Framed::ToEof(status),
    }
}

/// Length of a complete chunked body at the start of `body` (RFC 9112
/// §7.1), `None` while incomplete.
fn chunked_len(body: &[u8]) -> Option<Result<usize, &'static str>> {
    let mut at = 0;
    loop {
        let line_end = at + find(&body[at..], b"\r\n")?;
        let line = std::str::from_utf8(&body[at..line_end]).unwrap_or("");
        let size_text = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Some(Err("bad chunk size"));
        };
        at = line_end + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let end = at + find(&body[at..], b"\r\n")?;
                if end == at {
                    return Some(Ok(end + 2));
                }
                at = end + 2;
            }
        }
        if body.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CLOCK_MONOTONIC in ns: the clock of the timerfds' absolute deadlines.
fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread in ns.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A one-shot timerfd (CLOCK_MONOTONIC, absolute deadlines) in the runtime.
struct Timer {
    fd: AsyncFd<OwnedFd>,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create has no memory arguments; the fd is checked.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an OwnedFd gives the same open descriptor for as long as
        // the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Timer { fd })
    }

    /// Waits until CLOCK_MONOTONIC reaches `deadline_ns`.
    async fn wait_until(&self, deadline_ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let raw: RawFd = self.fd.get_ref().as_raw_fd();
        // SAFETY: settime on our own timerfd with a valid itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(raw, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into our buffer from our own timerfd.
            let n = unsafe { libc::read(raw, expirations.as_mut_ptr().cast(), 8) };
            if n == 8 {
                // Drained, and a one-shot timer stays quiet until re-armed:
                // forget the readiness now rather than pay a read that
                // would block at the next slot.
                guard.clear_ready();
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
                // A readiness left over from the previous slot.
                guard.clear_ready();
                continue;
            }
            return Err(e);
        }
    }
}
