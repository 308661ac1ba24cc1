//! Scenario (e): a server-sent-events upstream that stamps each event with
//! its send time, and a client that measures how late events arrive.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::procs;

/// Longest an event stream runs (the client normally hangs up far sooner).
const MAX_STREAM: Duration = Duration::from_secs(60);

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Starts the SSE upstream on 127.0.0.1:0: every request gets a chunked
/// `text/event-stream` with `data: <send time in ns since the epoch>` every
/// `every`, the first one at once (`GET /health` gets a short `ok`). It
/// runs until the harness exits.
pub fn start_server(every: Duration) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("sse-upstream".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("sse-stream".into())
                    .spawn(move || {
                        let _ = serve(stream, every);
                    });
            }
        })?;
    Ok(addr)
}

fn serve(mut s: TcpStream, every: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while procs::find(&buf, b"\r\n\r\n").is_none() {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    if line.starts_with("GET /health ") {
        // Readiness probe: short, and not kept alive by the proxy.
        return s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
        );
    }
    s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let start = Instant::now();
    let mut k: u32 = 0;
    while start.elapsed() < MAX_STREAM {
        let event = format!("data: {}\n\n", now_nanos());
        s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
        k += 1;
        let next = start + every * k;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    s.write_all(b"0\r\n\r\n")
}

/// Incremental decoder of a chunked body.
#[derive(Default)]
struct Chunked {
    line: Vec<u8>,
    state: ChunkState,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    /// Bytes of the CRLF after a chunk still to skip.
    Crlf(u8),
    Done,
}

impl Chunked {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        let line = String::from_utf8_lossy(&self.line).to_string();
                        self.line.clear();
                        let hex = line.trim().split(';').next().unwrap_or("").trim();
                        let n = usize::from_str_radix(hex, 16).unwrap_or(0);
                        self.state = if n == 0 {
                            ChunkState::Done
                        } else {
                            ChunkState::Data(n)
                        };
                    } else {
                        self.line.push(b);
                    }
                }
                ChunkState::Data(n) => {
                    let take = n.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.state = if take == n {
                        ChunkState::Crlf(2)
                    } else {
                        ChunkState::Data(n - take)
                    };
                }
                ChunkState::Crlf(left) => {
                    i += 1;
                    self.state = if left <= 1 {
                        ChunkState::Size
                    } else {
                        ChunkState::Crlf(left - 1)
                    };
                }
                ChunkState::Done => return,
            }
        }
    }
}

/// One stream read by the client.
#[derive(Debug, Clone)]
pub struct SseSample {
    /// From before connect to the first response byte.
    pub ttfb_ms: f64,
    /// From before connect to the first complete event.
    pub first_event_ms: f64,
    /// Receive time minus send stamp of every event after the first, in µs.
    pub delays_us: Vec<f64>,
}

/// Reads `events` events from `GET /events` through `addr`.
pub fn read_stream(addr: SocketAddr, host: &str, events: usize) -> Result<SseSample, String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nUser-Agent: switchyard-bench\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;

    let mut ttfb = None;
    let mut first_event = None;
    let mut head: Vec<u8> = Vec::new();
    let mut head_done = false;
    let mut chunked = None;
    let mut decoder = Chunked::default();
    let mut body: Vec<u8> = Vec::new();
    let mut delays = Vec::with_capacity(events);
    let mut seen = 0usize;
    let mut buf = [0u8; 16384];
    while seen < events {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reading events from {addr} after {seen}: {e}"))?;
        let recv = now_nanos();
        if n == 0 {
            return Err(format!("{addr} closed the stream after {seen} events"));
        }
        ttfb.get_or_insert_with(|| t0.elapsed());
        let mut data = &buf[..n];
        if !head_done {
            head.extend_from_slice(data);
            let Some(end) = procs::find(&head, b"\r\n\r\n") else {
                continue;
            };
            let status = procs::parse_status(&head).unwrap_or(0);
            if status != 200 {
                return Err(format!("{addr} answered {status} to the event stream"));
            }
            let lower = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            chunked = Some(lower.contains("transfer-encoding: chunked"));
            head_done = true;
            let rest = head.split_off(end + 4);
            body_feed(chunked == Some(true), &mut decoder, &rest, &mut body);
            data = &[];
        }
        body_feed(chunked == Some(true), &mut decoder, data, &mut body);
        while let Some(end) = procs::find(&body, b"\n\n") {
            let event: Vec<u8> = body.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(stamp) = text
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|v| v.trim().parse::<u128>().ok())
            else {
                continue;
            };
            seen += 1;
            if first_event.is_none() {
                first_event = Some(t0.elapsed());
            } else {
                delays.push((recv as f64 - stamp as f64) / 1e3);
            }
        }
    }
    Ok(SseSample {
        ttfb_ms: ttfb.unwrap_or_default().as_secs_f64() * 1e3,
        first_event_ms: first_event.unwrap_or_default().as_secs_f64() * 1e3,
        delays_us: delays,
    })
}

fn body_feed(chunked: bool, decoder: &mut Chunked, data: &[u8], body: &mut Vec<u8>) {
    if chunked {
        decoder.feed(data, body);
    } else {
        body.extend_from_slice(data);
    }
}
