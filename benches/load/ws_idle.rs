//! Scenario `ws-idle`: many idle WebSockets through each proxy, for memory
//! per upgraded connection. The echo upstream runs in this process (one
//! tokio thread); the clients are plain blocking sockets speaking just
//! enough of RFC 6455 (handshake, one masked text frame each way).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::idle::IdleResult;
use crate::procs::Proc;

/// The client's `Sec-WebSocket-Key` (RFC 6455 §4.1: any 16 bytes, base64).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The message echoed on each connection.
const PING: &[u8] = b"ping";

/// Starts the echo upstream on a free loopback port: a plain `GET` is
/// answered `200 ok` (the proxies' readiness check), an upgrade request
/// `101`, after which every text frame (short, masked) comes back.
pub fn start_echo() -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(serve(s));
                }
            }
        })
    });
    Ok(addr)
}

async fn serve(mut s: tokio::net::TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some(end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        // The key as sent (base64 is case-sensitive), the names in any case.
        let key = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        });
        buf.drain(..end);
        match key {
            Some(key) if head.to_ascii_lowercase().contains("upgrade: websocket") => {
                let accept = derive_accept_key(key.as_bytes());
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                echo(s, buf).await;
                return;
            }
            _ => {
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads until the end of a request head; its length, or None at EOF.
async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 2048];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Echoes short masked frames (payload under 126 bytes) unmasked.
async fn echo(mut s: tokio::net::TcpStream, mut buf: Vec<u8>) {
    loop {
        while buf.len() >= 6 {
            let len = (buf[1] & 0x7f) as usize;
            if len >= 126 || buf[1] & 0x80 == 0 {
                return;
            }
            if buf.len() < 6 + len {
                break;
            }
            let mask = [buf[2], buf[3], buf[4], buf[5]];
            let mut out = vec![buf[0], len as u8];
            out.extend(
                buf[6..6 + len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[i % 4]),
            );
            buf.drain(..6 + len);
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
        let mut chunk = [0u8; 512];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A masked text frame carrying [`PING`] (clients must mask, RFC 6455 §5.3).
fn ping_frame() -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x81, 0x80 | PING.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(PING.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Sends one ping and reads its echo.
fn echoed(s: &mut TcpStream) -> bool {
    if s.write_all(&ping_frame()).is_err() {
        return false;
    }
    let mut got = [0u8; 6];
    s.read_exact(&mut got).is_ok() && got[..2] == [0x81, PING.len() as u8] && &got[2..] == PING
}

/// Reads a response head; true if it is `101`.
fn switched(s: &mut TcpStream) -> bool {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: the first frame must stay in the socket.
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
        if head.len() > 8192 {
            return false;
        }
    }
    head.starts_with(b"HTTP/1.1 101")
}

/// Opens `n` WebSockets to `addr` at `path`, echoes once on each, keeps
/// them open while `proc`'s memory is read, then closes them all.
pub fn hold(proc: &Proc, addr: SocketAddr, host: &str, path: &str, n: usize) -> IdleResult {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: switchyard-bench\r\n\r\n"
    );
    crate::idle::hold_with(
        proc,
        addr,
        n,
        &request,
        |s| switched(s) && echoed(s),
        echoed,
    )
}
