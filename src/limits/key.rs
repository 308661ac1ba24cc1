//! What a limit counts requests under: the client's address, a request
//! header such as an API key, or one key for everyone.
//!
//! A header's value is never kept: only a keyed hash of it (SipHash-1-3 under
//! a random key drawn at start, std's `RandomState`), so a limit's table, a
//! log line or an admin answer never holds a credential, and the hash of a
//! known value cannot be computed outside the process. A request without
//! the header is counted under its client address instead, so leaving the
//! header out does not escape a limit.
//!
//! A header key is only as good as the backend's check of it: a client that
//! sends a new made-up value each time gets a new budget each time. Use it
//! where the backend refuses unknown keys (cheaply, before any GPU work),
//! and keep a `client_ip` limit beside it for everyone else.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;

use pingora::http::RequestHeader;

pub use crate::config::KeySource;

/// The key one request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// An IPv4 address, or an IPv6 /64 (see [`client_key`]).
    Ip(IpAddr),
    /// The keyed hash of a header's value(s).
    Hashed(u64),
    Global,
}

impl std::fmt::Display for Key {
    /// An address as itself (an IPv6 /64 as `PREFIX/64`), a header key as
    /// `hash:` and 16 hex digits (its keyed hash: the value cannot be
    /// recovered from it), the global key as `global`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Ip(ip @ IpAddr::V4(_)) => write!(f, "{ip}"),
            Key::Ip(ip) => write!(f, "{ip}/64"),
            Key::Hashed(h) => write!(f, "hash:{h:016x}"),
            Key::Global => f.write_str("global"),
        }
    }
}

/// Turns requests into keys for one limit.
#[derive(Debug, Clone)]
pub struct Keyer {
    source: KeySource,
    hasher: RandomState,
}

impl Keyer {
    pub fn new(source: KeySource) -> Keyer {
        Keyer {
            source,
            hasher: RandomState::new(),
        }
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The key of `req` from `client` (its address after
    /// `trusted_proxies`). Every line of a repeated header counts, in order,
    /// so a second line makes another key rather than being ignored.
    pub fn key(&self, req: &RequestHeader, client: IpAddr) -> Key {
        match &self.source {
            KeySource::ClientIp => Key::Ip(client_key(client)),
            KeySource::Global => Key::Global,
            KeySource::Header(name) => {
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    return Key::Ip(client_key(client));
                }
                let mut hasher = self.hasher.build_hasher();
                for v in values {
                    std::hash::Hasher::write(&mut hasher, v.as_bytes());
                    // A separator no header value can hold (RFC 9110 §5.5).
                    std::hash::Hasher::write_u8(&mut hasher, b'\n');
                }
                Key::Hashed(std::hash::Hasher::finish(&hasher))
            }
        }
    }
}

/// The key a client address is counted under: its IPv4 address, or the
/// /64 of its IPv6 address (one host usually holds a whole /64, and keying
/// single addresses would let it rotate through them); IPv4-mapped IPv6
/// counts as the IPv4 address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn header_keys_are_hashed_and_fall_back_to_the_client() {
        let k = Keyer::new(KeySource::parse("header:authorization").unwrap());
        let a = k.key(&req(&[("Authorization", "Bearer sk-1")]), ip("192.0.2.1"));
        let a_elsewhere = k.key(&req(&[("authorization", "Bearer sk-1")]), ip("192.0.2.9"));
        let b = k.key(&req(&[("Authorization", "Bearer sk-2")]), ip("192.0.2.1"));
        assert_eq!(a, a_elsewhere, "the key, not the address");
        assert_ne!(a, b);
        assert!(matches!(a, Key::Hashed(_)));
        assert!(!format!("{a:?}").contains("sk-1"), "never the value itself");
        // No header: the client's address, IPv6 by its /64.
        assert_eq!(k.key(&req(&[]), ip("192.0.2.1")), Key::Ip(ip("192.0.2.1")));
        assert_eq!(
            k.key(&req(&[]), ip("2001:db8:1:2::7")),
            Key::Ip(ip("2001:db8:1:2::"))
        );
        // A second line is part of the key.
        let two = k.key(
            &req(&[("Authorization", "Bearer sk-1"), ("Authorization", "x")]),
            ip("192.0.2.1"),
        );
        assert_ne!(two, a);
        // Another process (another random hash key) gives other hashes.
        let other = Keyer::new(KeySource::parse("header:authorization").unwrap());
        assert_ne!(
            other.key(&req(&[("Authorization", "Bearer sk-1")]), ip("192.0.2.1")),
            a
        );
    }

    #[test]
    fn keys_display_without_their_secret() {
        let k = Keyer::new(KeySource::parse("header:x-api-key").unwrap());
        let shown = k
            .key(&req(&[("X-Api-Key", "sk-secret")]), ip("192.0.2.1"))
            .to_string();
        assert!(shown.starts_with("hash:") && shown.len() == 21, "{shown}");
        assert!(!shown.contains("secret"));
        assert_eq!(Key::Ip(ip("192.0.2.1")).to_string(), "192.0.2.1");
        assert_eq!(
            Key::Ip(ip("2001:db8:1:2::")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(Key::Global.to_string(), "global");
    }

    #[test]
    fn client_ip_and_global() {
        let ipk = Keyer::new(KeySource::ClientIp);
        assert_eq!(
            ipk.key(&req(&[]), ip("::ffff:192.0.2.7")),
            Key::Ip(ip("192.0.2.7"))
        );
        let g = Keyer::new(KeySource::Global);
        assert_eq!(g.key(&req(&[]), ip("192.0.2.7")), Key::Global);
        assert_eq!(g.key(&req(&[]), ip("2001:db8::1")), Key::Global);
    }
}
