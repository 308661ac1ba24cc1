//! The TLS handshake of the HTTPS listener, done by switchyard itself inside
//! the slow-client deadline rather than by Pingora's TLS listener.
//!
//! Pingora's own TLS listener shakes hands before any application code sees
//! the connection, with a fixed 60 s timeout and an ERROR log line for each
//! failed handshake: a client that opens TCP and sends nothing, or dribbles
//! its ClientHello a byte at a time, would hold a connection for a minute
//! outside connection admission, and a scan would fill the log. So the HTTPS
//! port is a plain TCP listener, and [`crate::slow_clients::HeaderTimeout`]
//! admits the connection first and then calls [`TlsAcceptor::accept`], which
//! must finish before both `tls.handshake_timeout` and the request header
//! deadline, both counted from the accept. A handshake that fails or runs out
//! of time is counted and logged at debug; the connection is closed.
//!
//! The server side: TLS 1.2 and 1.3 only (RFC 8996 deprecates 1.0 and 1.1),
//! ALPN `h2` then `http/1.1` (RFC 7301; RFC 9113 §3.2), the certificate
//! chosen by SNI through [`CertStore::resolver`], and ring as the one crypto
//! provider (the one Pingora's rustls build installs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use rustls::ServerConfig;
use tokio::time::Instant;

use crate::tls::store::CertStore;

/// ALPN protocols offered, most preferred first: HTTP/2, then HTTP/1.1.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Handshakes that did not complete, since start (for the metrics issue).
#[derive(Debug, Default)]
pub struct HandshakeStats {
    /// Cut at the deadline (silent or dribbling clients).
    pub timeouts: AtomicU64,
    /// Refused or broken by the client (bad ClientHello, old TLS version,
    /// no shared cipher, a client closing mid-handshake).
    pub failures: AtomicU64,
}

/// Why the rustls server configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS server configuration: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// The rustls server configuration of the HTTPS listener; see the module
/// documentation for what it allows.
pub fn server_config(store: &Arc<CertStore>) -> Result<ServerConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store.resolver());
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Server-side TLS handshakes for accepted TCP connections.
pub struct TlsAcceptor {
    acceptor: Acceptor,
    timeout: Duration,
    /// Handshakes that did not complete (for the metrics issue).
    pub stats: HandshakeStats,
}

impl TlsAcceptor {
    /// `timeout` is `tls.handshake_timeout`, counted from the accept.
    pub fn new(config: ServerConfig, timeout: Duration) -> TlsAcceptor {
        TlsAcceptor {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            timeout,
            stats: HandshakeStats::default(),
        }
    }

    /// Shakes hands on `stream`, a freshly accepted TCP connection, and
    /// returns the TLS stream (which reports the negotiated ALPN and an SSL
    /// digest to Pingora), or `None` when the handshake failed or was not
    /// complete by `accepted + timeout` nor by `deadline` (the request
    /// header deadline): the connection is then dropped, which closes it.
    pub async fn accept(
        &self,
        stream: Stream,
        accepted: Instant,
        deadline: Instant,
    ) -> Option<Stream> {
        // Pingora hands a plain TCP listener's connections over as its own
        // L4 stream, boxed; the TLS stream is built on that concrete type.
        let l4 = match stream.into_any().downcast::<L4Stream>() {
            Ok(l4) => *l4,
            Err(_) => {
                tracing::error!("HTTPS connection is not a TCP stream; closed");
                return None;
            }
        };
        let until = deadline.min(accepted + self.timeout);
        match tokio::time::timeout_at(until, self.acceptor.tls_handshake(l4)).await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cause = %e, "TLS handshake failed; connection closed");
                None
            }
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    timeout = ?until.saturating_duration_since(accepted),
                    "TLS handshake not complete in time; connection closed"
                );
                None
            }
        }
    }
}
