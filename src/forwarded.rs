//! Who the client is, and the `X-Forwarded-*` / `X-Request-Id` headers that
//! tell the backend.
//!
//! An incoming `X-Forwarded-For` is only believed when the direct peer is a
//! trusted proxy (a load balancer in front); otherwise anyone could claim any
//! address and walk around per-client limits. The client is then the rightmost
//! address of the chain that is not itself a trusted proxy.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::prelude::*;

pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";
pub const X_REAL_IP: &str = "x-real-ip";
pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest request id passed through (128 bytes); longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// The client as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The direct TCP peer.
    pub peer: IpAddr,
    /// The real client: the peer, or from `X-Forwarded-For` when the peer is trusted.
    pub ip: IpAddr,
    /// Whether the peer is a trusted proxy, so its `X-Forwarded-*` headers stand.
    pub trusted: bool,
}

impl Client {
    pub fn identify(peer: IpAddr, forwarded_for: Option<&[u8]>, trusted: &[IpNet]) -> Client {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
        if !is_trusted(&peer) {
            return Client {
                peer,
                ip: peer,
                trusted: false,
            };
        }
        let chain: Vec<IpAddr> = forwarded_for
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.split(',').filter_map(|a| a.trim().parse().ok()).collect())
            .unwrap_or_default();
        let ip = chain
            .iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .or(chain.first())
            .copied()
            .unwrap_or(peer);
        Client {
            peer,
            ip,
            trusted: true,
        }
    }
}

/// A request id from the client is kept when it is short and plain.
pub fn sane_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A new request id: a per-process random prefix and a counter, 32 hex
/// digits. Unique and cheap; not meant to be unguessable.
pub fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        use std::io::Read;
        let mut bytes = [0u8; 8];
        // The time is a fallback that is still unique per process start.
        match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
            Ok(()) => u64::from_ne_bytes(bytes),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 32];
    let digits = u128::from(*prefix) << 64 | u128::from(n);
    for (i, b) in id.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(digits >> (124 - 4 * i) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// An IP address as a header value, formatted without a temporary String.
fn ip_header(ip: IpAddr) -> Result<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 48];
    let mut w = &mut buf[..];
    write!(w, "{ip}").or_err(InternalError, "formatting an address")?;
    let len = 48 - w.len();
    HeaderValue::from_bytes(&buf[..len]).or_err(InternalError, "address header")
}

/// Writes the forwarding headers into the request sent upstream.
pub fn apply(
    req: &mut RequestHeader,
    client: &Client,
    request_id: &HeaderValue,
    host: Option<&str>,
) -> Result<()> {
    let peer = ip_header(client.peer)?;
    let real_ip = match client.ip == client.peer {
        true => peer.clone(),
        false => ip_header(client.ip)?,
    };
    let xff = match req.headers.get(X_FORWARDED_FOR) {
        Some(prior) if client.trusted => {
            let mut v = prior.as_bytes().to_vec();
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&v).or_err(InvalidHTTPHeader, "X-Forwarded-For")?
        }
        _ => peer,
    };
    req.insert_header(X_FORWARDED_FOR, xff)?;
    req.insert_header(X_REAL_IP, real_ip)?;
    if !(client.trusted && req.headers.contains_key(X_FORWARDED_PROTO)) {
        req.insert_header(X_FORWARDED_PROTO, "http")?;
    }
    if !(client.trusted && req.headers.contains_key(X_FORWARDED_HOST)) {
        match host {
            Some(h) => req.insert_header(X_FORWARDED_HOST, h)?,
            None => {
                req.remove_header(X_FORWARDED_HOST);
            }
        }
    }
    req.insert_header(X_REQUEST_ID, request_id.clone())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let c = Client::identify(
            "203.0.113.9".parse().unwrap(),
            Some(b"1.2.3.4"),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(c.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert!(!c.trusted);
    }

    #[test]
    fn trusted_chain_yields_rightmost_untrusted() {
        let trusted = nets(&["10.0.0.0/8"]);
        let c = Client::identify(
            "10.0.0.2".parse().unwrap(),
            Some(b"6.6.6.6, 198.51.100.7, 10.0.0.1"),
            &trusted,
        );
        assert_eq!(c.ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        let only_proxies =
            Client::identify("10.0.0.2".parse().unwrap(), Some(b"10.0.0.3"), &trusted);
        assert_eq!(only_proxies.ip, "10.0.0.3".parse::<IpAddr>().unwrap());
        let none = Client::identify("10.0.0.2".parse().unwrap(), None, &trusted);
        assert_eq!(none.ip, "10.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn request_ids() {
        assert!(sane_request_id(b"abc-123_x.y:z"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id(b"has space"));
        assert!(!sane_request_id(&[b'a'; 129]));
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(sane_request_id(a.as_bytes()));
        assert_eq!(ip_header("::1".parse().unwrap()).unwrap(), "::1");
    }

    #[test]
    fn headers_are_replaced_or_appended() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header(X_FORWARDED_FOR, "6.6.6.6").unwrap();
        req.insert_header(X_FORWARDED_PROTO, "https").unwrap();
        let untrusted = Client::identify("127.0.0.1".parse().unwrap(), None, &[]);
        apply(
            &mut req,
            &untrusted,
            &HeaderValue::from_static("id1"),
            Some("example.com"),
        )
        .unwrap();
        assert_eq!(req.headers[X_FORWARDED_FOR], "127.0.0.1");
        assert_eq!(req.headers[X_FORWARDED_PROTO], "http");
        assert_eq!(req.headers[X_FORWARDED_HOST], "example.com");

        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header(X_FORWARDED_FOR, "6.6.6.6").unwrap();
        let trusted = Client::identify(
            "127.0.0.1".parse().unwrap(),
            Some(b"6.6.6.6"),
            &nets(&["127.0.0.0/8"]),
        );
        apply(&mut req, &trusted, &HeaderValue::from_static("id2"), None).unwrap();
        assert_eq!(req.headers[X_FORWARDED_FOR], "6.6.6.6, 127.0.0.1");
        assert_eq!(req.headers[X_REAL_IP], "6.6.6.6");
        assert_eq!(req.headers[X_REQUEST_ID], "id2");
    }
}
