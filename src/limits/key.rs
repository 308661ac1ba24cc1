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
//! A limit with `scope = "cluster"` needs every instance to hash a header
//! value alike, so its keyer also holds a [`SharedHash`]: HMAC-SHA-256
//! under a random secret kept in the cluster's Redis (see
//! `limits::cluster`), first 64 bits. Until the secret is known a header
//! key is hashed locally as above, and the limit judges it locally.
//!
//! A header key is only as good as the backend's check of it: a client that
//! sends a new made-up value each time gets a new budget each time. Use it
//! where the backend refuses unknown keys (cheaply, before any GPU work),
//! and keep a `client_ip` limit beside it for everyone else.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use pingora::http::RequestHeader;

pub use crate::config::KeySource;

/// The key one request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// An IPv4 address, or an IPv6 /64 (see [`client_key`]).
    Ip(IpAddr),
    /// The keyed hash of a header's value(s), under this process's own
    /// random key: other instances hash the same value differently.
    Hashed(u64),
    /// The keyed hash of a header's value(s) under the cluster's shared
    /// secret ([`SharedHash`]): the same on every instance.
    Shared(u64),
    Global,
}

impl Key {
    /// Whether every instance of a cluster computes this key for the same
    /// request (an address, the global key, a [`Key::Shared`] hash), so it
    /// may be counted in Redis.
    pub fn is_cluster_wide(&self) -> bool {
        !matches!(self, Key::Hashed(_))
    }
}

/// The secret every instance of a cluster hashes header keys under, once
/// known (read from Redis at first use). Never logged or shown.
#[derive(Default)]
pub struct SharedHash(ArcSwapOption<ring::hmac::Key>);

impl SharedHash {
    /// Sets the secret (the raw bytes read from Redis).
    pub fn set(&self, secret: &[u8]) {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        self.0.store(Some(Arc::new(key)));
    }

    /// Whether the secret is known yet.
    pub fn is_known(&self) -> bool {
        self.0.load().is_some()
    }
}

impl std::fmt::Debug for SharedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_known() {
            "SharedHash(known)"
        } else {
            "SharedHash(unknown)"
        })
    }
}

impl std::fmt::Display for Key {
    /// An address as itself (an IPv6 /64 as `PREFIX/64`), a header key as
    /// `hash:` and 16 hex digits (its keyed hash: the value cannot be
    /// recovered from it), the global key as `global`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Ip(ip @ IpAddr::V4(_)) => write!(f, "{ip}"),
            Key::Ip(ip) => write!(f, "{ip}/64"),
            Key::Hashed(h) | Key::Shared(h) => write!(f, "hash:{h:016x}"),
            Key::Global => f.write_str("global"),
        }
    }
}

/// Turns requests into keys for one limit.
#[derive(Debug, Clone)]
pub struct Keyer {
    source: KeySource,
    hasher: RandomState,
    /// A cluster limit's shared hash (see the module doc).
    shared: Option<Arc<SharedHash>>,
}

impl Keyer {
    pub fn new(source: KeySource) -> Keyer {
        Keyer {
            source,
            hasher: RandomState::new(),
            shared: None,
        }
    }

    /// A keyer for a cluster limit: header values are hashed under
    /// `shared` once it is known ([`Key::Shared`]), locally until then.
    pub fn with_shared(source: KeySource, shared: Arc<SharedHash>) -> Keyer {
        Keyer {
            shared: Some(shared),
            ..Keyer::new(source)
        }
    }

    /// The shared hash of a cluster limit's keyer.
    pub fn shared(&self) -> Option<&Arc<SharedHash>> {
        self.shared.as_ref()
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
                if let Some(secret) = self.shared.as_ref().map(|s| s.0.load()) {
                    if let Some(secret) = secret.as_deref() {
                        let mut ctx = ring::hmac::Context::with_key(secret);
                        for v in values {
                            ctx.update(v.as_bytes());
                            ctx.update(b"\n");
                        }
                        let tag = ctx.sign();
                        let mut first = [0u8; 8];
                        first.copy_from_slice(&tag.as_ref()[..8]);
                        return Key::Shared(u64::from_be_bytes(first));
                    }
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
    fn a_shared_hash_is_the_same_on_every_instance_once_known() {
        let source = KeySource::parse("header:x-api-key").unwrap();
        let (one, two) = (
            Arc::new(SharedHash::default()),
            Arc::new(SharedHash::default()),
        );
        let (a, b) = (
            Keyer::with_shared(source.clone(), one.clone()),
            Keyer::with_shared(source, two.clone()),
        );
        let r = req(&[("X-Api-Key", "sk-1")]);
        // Unknown yet: hashed locally, not to be counted in Redis.
        let local = a.key(&r, ip("192.0.2.1"));
        assert!(matches!(local, Key::Hashed(_)) && !local.is_cluster_wide());
        one.set(b"secret-from-redis");
        two.set(b"secret-from-redis");
        let (ka, kb) = (a.key(&r, ip("192.0.2.1")), b.key(&r, ip("192.0.2.9")));
        assert_eq!(ka, kb);
        assert!(matches!(ka, Key::Shared(_)) && ka.is_cluster_wide());
        assert_ne!(ka, a.key(&req(&[("X-Api-Key", "sk-2")]), ip("192.0.2.1")));
        assert!(!format!("{one:?}").contains("secret"));
        // Without the header: the address, cluster-wide as always.
        assert!(a.key(&req(&[]), ip("192.0.2.1")).is_cluster_wide());
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
