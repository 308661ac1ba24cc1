//! Scenario (d): many idle kept-alive client connections, for memory.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::procs::{self, Proc};

/// Connections opened (and answered) before the next batch starts, so the
/// proxy's accept queue never overflows.
const BATCH: usize = 250;

#[derive(Debug, Clone)]
pub struct IdleResult {
    pub wanted: usize,
    /// Connections whose request was answered 200 and that were then held.
    pub held: usize,
    pub open_secs: f64,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    pub hwm_kib: u64,
    pub rss_after_close_kib: u64,
    /// Of every 100th held connection: how many still answered a second
    /// request after the measurement (the proxy had not dropped them).
    pub sampled: usize,
    pub sampled_alive: usize,
}

impl IdleResult {
    pub fn kib_per_conn(&self) -> f64 {
        if self.held == 0 {
            return 0.0;
        }
        (self.rss_held_kib as f64 - self.rss_before_kib as f64) / self.held as f64
    }

    pub fn json(&self) -> Value {
        json!({
            "wanted": self.wanted,
            "held": self.held,
            "open_secs": self.open_secs,
            "rss_before_kib": self.rss_before_kib,
            "rss_held_kib": self.rss_held_kib,
            "peak_rss_kib": self.hwm_kib,
            "rss_after_close_kib": self.rss_after_close_kib,
            "kib_per_conn": self.kib_per_conn(),
            "sampled": self.sampled,
            "sampled_alive": self.sampled_alive,
        })
    }
}

/// Opens `n` connections to `addr`, sends one request on each, keeps them
/// open while `proc`'s memory is read, then closes them all.
pub fn hold(proc: &Proc, addr: SocketAddr, host: &str, n: usize) -> IdleResult {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-bench\r\n\r\n");
    let answered = |s: &mut TcpStream| matches!(procs::read_response(s), Ok(200));
    hold_with(proc, addr, n, &request, answered, |s| {
        s.write_all(request.as_bytes()).is_ok() && answered(s)
    })
}

/// Opens `n` connections to `addr` in batches, sends `request` on each and
/// keeps those `accepted` says were answered as expected; after a moment
/// for the proxy to settle (buffers released once the answers went out),
/// [`measure`]s `proc` holding them, each 100th checked with `alive`.
pub fn hold_with(
    proc: &Proc,
    addr: SocketAddr,
    n: usize,
    request: &str,
    mut accepted: impl FnMut(&mut TcpStream) -> bool,
    alive: impl FnMut(&mut TcpStream) -> bool,
) -> IdleResult {
    let rss_before_kib = proc.rss_kib();
    let start = Instant::now();
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    let mut opened = 0;
    while opened < n {
        let count = BATCH.min(n - opened);
        opened += count;
        let mut batch = Vec::with_capacity(count);
        for _ in 0..count {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.set_nodelay(true);
            if s.write_all(request.as_bytes()).is_ok() {
                batch.push(s);
            }
        }
        for mut s in batch {
            if accepted(&mut s) {
                held.push(s);
            }
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    measure(proc, n, open_secs, rss_before_kib, held, alive)
}

/// Measures `proc` holding `held` (of `n` wanted, opened in `open_secs`,
/// RSS `rss_before_kib` before): RSS and high-water mark now, then whether
/// every 100th connection is still `alive`, then RSS once all are closed.
pub fn measure(
    proc: &Proc,
    n: usize,
    open_secs: f64,
    rss_before_kib: u64,
    mut held: Vec<TcpStream>,
    mut alive: impl FnMut(&mut TcpStream) -> bool,
) -> IdleResult {
    let rss_held_kib = proc.rss_kib();
    let hwm_kib = proc.hwm_kib();
    let mut sampled = 0;
    let mut sampled_alive = 0;
    for s in held.iter_mut().step_by(100) {
        sampled += 1;
        if alive(s) {
            sampled_alive += 1;
        }
    }
    let count = held.len();
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    IdleResult {
        wanted: n,
        held: count,
        open_secs,
        rss_before_kib,
        rss_held_kib,
        hwm_kib,
        rss_after_close_kib: proc.rss_kib(),
        sampled,
        sampled_alive,
    }
}
