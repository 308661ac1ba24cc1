//! Process logging: `tracing` to stderr, Pingora's own `log` lines bridged
//! in, and a guard that keeps two kinds of Pingora lines out of the log.
//!
//! - **Request and response headers.** When Pingora cannot parse a request
//!   it logs the bytes it read (`buf: ...`), at ERROR on an HTTP app such as
//!   the admin API; at debug and trace it prints whole request and response
//!   headers. Those hold whatever the client sent: an `Authorization: Bearer`
//!   admin token, cookies. Secrets are never logged, so such lines are dropped
//!   whole (a line cannot be edited once made): every Pingora line below
//!   INFO, whatever `RUST_LOG` says, and every Pingora line with a `buf:`.
//! - **Noise at ERROR for expected events.** Pingora logs `failed to acquire
//!   reusable stream` when a pooled upstream connection is still held by its
//!   idle watcher; it then simply opens a new one. Under ordinary keep-alive
//!   traffic that is about one line per hundred requests, and it is nothing an
//!   operator can act on. A client that sends the admin API something it
//!   cannot parse is the client's mistake, not an ERROR of ours.
//! - **rustls warnings about peers.** rustls logs at WARN (or INFO) what a
//!   TLS client did wrong: an IP address as SNI (`Illegal SNI extension`,
//!   sent by every OpenSSL client given `https://127.0.0.1/`), an alert it
//!   sent, a broken ClientHello. One line per handshake, chosen by the
//!   client, is a flood anyone can start and nothing an operator can act
//!   on; those lines are dropped (failed handshakes are counted and logged
//!   at debug by `tls/handshake.rs`). rustls's ERROR, DEBUG and TRACE lines
//!   pass as `RUST_LOG` says: none carries key material.
//!
//! switchyard's own expected outcomes are logged at debug at their source
//! (`proxy.rs`, `slow_clients.rs`, `connections.rs`); this guard is only for
//! lines Pingora writes and switchyard cannot re-level.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Log filter when `RUST_LOG` is not set: switchyard at info, Pingora's
/// chatty internals at warn.
pub const DEFAULT_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn";

/// Starts logging to stderr; `RUST_LOG` overrides [`DEFAULT_FILTER`].
/// Pingora's `log` records arrive through the `tracing-log` bridge.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `try_init`: a second call (tests, demo) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(PingoraGuard)
        .with(fmt)
        .try_init();
}

/// Drops the Pingora lines described in the module docs.
struct PingoraGuard;

impl<S: Subscriber> Layer<S> for PingoraGuard {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        // Pingora's lines come through the `log` bridge; their real target
        // and level are in the normalized metadata.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        // ureq (webhooks) writes the request URL, a secret, at trace.
        if meta.target().starts_with("ureq") && *meta.level() > Level::INFO {
            return false;
        }
        if meta.target().starts_with("rustls") {
            return !is_peer_noise(*meta.level());
        }
        if !meta.target().starts_with("pingora") {
            return true;
        }
        if *meta.level() > Level::INFO {
            return false;
        }
        let mut message = Message::default();
        event.record(&mut message);
        !message.dropped
    }
}

/// Looks at an event's `message` field only.
#[derive(Default)]
struct Message {
    dropped: bool,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.dropped |= is_dropped(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            // Bridged `log` lines carry their text as `fmt::Arguments`. Only
            // Pingora's lines at INFO and above get here: none per request
            // on the hot path.
            self.dropped |= is_dropped(&format!("{value:?}"));
        }
    }
}

/// Whether a Pingora line at INFO or above is one the guard keeps out
/// (see the module docs).
fn is_dropped(message: &str) -> bool {
    message.contains("buf: ")
        || message.starts_with("failed to acquire reusable stream")
        || message.starts_with("HTTP server fails to read from downstream")
        // A request header that broke off on the client's side (it hung up
        // or the header deadline cut it) after bytes Pingora already held,
        // such as a pipelined follower: a client's doing, like the cuts the
        // connection guard keeps silent itself.
        || message.starts_with("Fail to proxy: Downstream")
}

/// rustls's WARN and INFO lines: about what a peer did (see the module docs).
fn is_peer_noise(level: Level) -> bool {
    level == Level::WARN || level == Level::INFO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_peer_warnings_are_dropped() {
        assert!(is_peer_noise(Level::WARN) && is_peer_noise(Level::INFO));
        assert!(!is_peer_noise(Level::ERROR) && !is_peer_noise(Level::DEBUG));
    }

    #[test]
    fn raw_request_bytes_and_pingora_noise_are_dropped() {
        assert!(is_dropped(
            "HTTP server fails to read from downstream: InvalidHTTPHeader context: buf: \"GET / HTTP/1.1\\r\\nAuthorization: Bearer s3cret\""
        ));
        assert!(is_dropped(
            "Fail to proxy: Downstream InvalidHTTPHeader context: buf: GET /x"
        ));
        assert!(is_dropped("failed to acquire reusable stream"));
        assert!(is_dropped(
            "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 22"
        ));
        assert!(!is_dropped(
            "Fail to proxy: Upstream ConnectRefused context: peer: addr: 127.0.0.1:1"
        ));
        assert!(!is_dropped("switchyard starting"));
    }
}
