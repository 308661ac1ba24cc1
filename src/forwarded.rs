//! Who the client is, and the forwarding headers that tell the backend:
//! `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host`
//! and `X-Request-Id`.
//!
//! Forwarding headers are only believed from a trusted proxy (a load
//! balancer in front, `server.trusted_proxies`); otherwise anyone could claim
//! any address, scheme or host and walk around per-client limits or make the
//! backend build URLs for another site. The client is the rightmost address
//! of the `X-Forwarded-For` chain that is not itself a trusted proxy.
//!
//! From an untrusted peer the whole family that backends read as "set by a
//! proxy" ([`is_proxy_set`]) is removed before switchyard writes its own. The
//! list follows what the backends behind switchyard act on: Spring's
//! `ForwardedHeaderFilter` and Tomcat's `RemoteIpValve` (`Forwarded`, every
//! `X-Forwarded-*`), Tomcat's `SSLValve` and other readers of the client
//! certificate a TLS-terminating proxy passes on (`ssl_client_cert`,
//! `Client-Cert` of RFC 9440, `X-SSL-*`), Next.js internals (`x-middleware-*`
//! including `x-middleware-subrequest`, CVE-2025-29927; `x-invoke-*`,
//! `x-matched-path`, `x-now-route-matches`), the URL or host before a rewrite
//! (`X-Original-*`, `X-Rewrite-URL`, `X-Host`) and the client-IP headers of
//! CDNs and frameworks.
//!
//! Names are compared with `_` read as `-`: CGI and WSGI stacks turn both
//! `X_Forwarded_For` and `X-Forwarded-For` into `HTTP_X_FORWARDED_FOR`, so
//! an underscore spelling is the same header to them. Those spellings are
//! removed from every peer, trusted or not: a proxy writes the `-`
//! spelling, so an `_` one can only come from a client the proxy passed it
//! on for (the replaced nginx dropped them all). `Proxy` is
//! removed from every peer too (httpoxy: CGI-style stacks make it the
//! `HTTP_PROXY` their HTTP clients use); no proxy sets it.
//!
//! switchyard never writes an RFC 7239 `Forwarded` header of its own: Spring
//! prefers `Forwarded` over `X-Forwarded-*`, so one saying `proto=http`
//! behind a TLS-terminating load balancer that sets only
//! `X-Forwarded-Proto: https` would make the API build `http://` links. A
//! trusted peer's `Forwarded` is kept, with switchyard's hop appended.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::HeaderName;
use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::prelude::*;

use crate::host::Authority;

pub const FORWARDED: &str = "forwarded";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";
pub const X_REAL_IP: &str = "x-real-ip";
pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest request id passed through (128 bytes); longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Header-name prefixes (lower case) a backend treats as set by a proxy:
/// removed from untrusted peers' requests. Matched with `_` read as `-`.
pub const PROXY_SET_PREFIXES: &[&str] = &[
    // RFC 7239's predecessors: -For, -Proto, -Host, -Port, -Prefix, -Ssl,
    // -Server, -By, -Client-Cert (Envoy), -Tls-Client-Cert (Traefik), ...
    "x-forwarded-",
    // Next.js routing internals (x-middleware-subrequest: CVE-2025-29927).
    "x-middleware-",
    "x-invoke-",
    // The URL, host, method or address before a proxy rewrote it (IIS,
    // Symfony, Laravel, nginx auth_request's X-Original-URI / -Method).
    "x-original-",
    // The client's TLS session and certificate as a TLS-terminating proxy
    // tells them: X-SSL-Cert, X-SSL-Client-Cert, X-SSL-Client-Verify, ...;
    // Tomcat SSLValve's ssl_client_cert, ssl_cipher, ssl_session_id,
    // ssl_cipher_usekeysize, and every other mod_ssl-style SSL_* variable.
    "x-ssl-",
    "ssl-",
    // RFC 9440's Client-Cert-Chain and vendor variants.
    "client-cert-",
    "x-client-cert-",
    // AWS ALB mutual TLS: X-Amzn-Mtls-Clientcert, -Clientcert-Leaf, ...
    "x-amzn-mtls-",
];

/// Header names (lower case) a backend treats as set by a proxy, besides
/// [`PROXY_SET_PREFIXES`]: removed from untrusted peers' requests. Matched
/// with `_` read as `-`.
pub const PROXY_SET_NAMES: &[&str] = &[
    // RFC 7239 and its predecessors.
    "forwarded",
    "forwarded-for",
    "x-forwarded",
    // Client address as told by a proxy or CDN.
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "cf-connecting-ipv6",
    "cf-pseudo-ipv4",
    "fastly-client-ip",
    "x-appengine-user-ip",
    "x-envoy-external-address",
    "x-proxyuser-ip",
    // The URL or host before a proxy rewrote it, besides `x-original-*`.
    "x-rewrite-url",
    "x-host",
    // The client certificate (RFC 9440 §2; `X-Client-Cert`, `X-SSL-Cert`
    // style), besides the prefixes.
    "client-cert",
    "x-client-cert",
    // Next.js routing internals.
    "x-matched-path",
    "x-now-route-matches",
];

/// Header names (lower case) removed from every peer's request, trusted or
/// not, besides the underscore spellings of the proxy-set family: `Proxy`,
/// which CGI-style stacks turn into `HTTP_PROXY`, the outgoing proxy of the
/// backend's own HTTP clients (httpoxy, CVE-2016-5385 and siblings).
pub const ALWAYS_STRIPPED: &[&str] = &["proxy"];

/// Whether header `name` (lower case, as `http` stores names) equals
/// `pattern` with every `_` in `name` read as `-`.
fn same_name(name: &[u8], pattern: &[u8]) -> bool {
    name.len() == pattern.len()
        && name
            .iter()
            .zip(pattern)
            .all(|(&n, &p)| n == p || (n == b'_' && p == b'-'))
}

/// Whether a backend would take header `name` (lower case, as `http`
/// stores names) as set by a proxy. `_` in `name` counts as `-`, so
/// `x_forwarded_for` and `X-Forwarded_Host` are members too.
pub fn is_proxy_set(name: &str) -> bool {
    let name = name.as_bytes();
    PROXY_SET_NAMES
        .iter()
        .any(|n| same_name(name, n.as_bytes()))
        || PROXY_SET_PREFIXES
            .iter()
            .any(|p| name.len() >= p.len() && same_name(&name[..p.len()], p.as_bytes()))
}

/// Whether header `name` (lower case) is removed whoever the peer is:
/// [`ALWAYS_STRIPPED`], and a proxy-set family member or `X-Request-Id`
/// spelled with `_` (a proxy writes `-`, so that one came from a client,
/// and a CGI-style backend could read it in place of switchyard's own).
pub fn is_always_stripped(name: &str) -> bool {
    let bytes = name.as_bytes();
    ALWAYS_STRIPPED
        .iter()
        .any(|n| same_name(bytes, n.as_bytes()))
        || (name.contains('_') && (is_proxy_set(name) || same_name(bytes, X_REQUEST_ID.as_bytes())))
}

/// The client as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The direct TCP peer.
    pub peer: IpAddr,
    /// The real client: the peer, or from `X-Forwarded-For` when the peer is trusted.
    pub ip: IpAddr,
    /// Whether the peer is a trusted proxy, so its forwarding headers stand.
    pub trusted: bool,
    /// Whether the client's connection is TLS (`X-Forwarded-Proto: https`);
    /// false from [`Client::identify`], set by the caller.
    pub tls: bool,
}

impl Client {
    /// Identifies the client from the TCP peer and every `X-Forwarded-For`
    /// line of the request, in order (a proxy may append a line rather than
    /// extend the first one).
    ///
    /// From a trusted peer the chain is walked from the right over trusted
    /// hops; the first other entry is the client. An entry that is not an
    /// address (`unknown`, garbage) stops the walk at the last trusted hop:
    /// skipping it would hand the choice to whatever the client wrote further
    /// left. `IP:port` entries (some load balancers add the port) count as
    /// their address. Empty elements (`a, , b`, an empty line) are skipped,
    /// as RFC 9110 §5.6.1 has recipients ignore them.
    pub fn identify<'a>(
        peer: IpAddr,
        forwarded_for: impl IntoIterator<Item = &'a [u8]>,
        trusted: &[IpNet],
    ) -> Client {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
        if !is_trusted(&peer) {
            return Client {
                peer,
                ip: peer,
                trusted: false,
                tls: false,
            };
        }
        let lines: Vec<&[u8]> = forwarded_for.into_iter().collect();
        let mut ip = peer;
        'walk: for line in lines.iter().rev() {
            // Empty list elements are not entries (RFC 9110 §5.6.1).
            for entry in line
                .rsplit(|&b| b == b',')
                .filter(|e| !trim_ows(e).is_empty())
            {
                match parse_chain_entry(entry) {
                    Some(hop) if is_trusted(&hop) => ip = hop,
                    Some(hop) => {
                        ip = hop;
                        break 'walk;
                    }
                    None => break 'walk,
                }
            }
        }
        Client {
            peer,
            ip,
            trusted: true,
            tls: false,
        }
    }
}

/// One `X-Forwarded-For` entry: `IP`, `IP:port` or `[IPv6]:port`.
fn parse_chain_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
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

/// Writes the forwarding headers into the request sent upstream, after
/// removing every proxy-set header an untrusted peer sent, and from every
/// peer `Proxy` and the underscore spellings ([`is_always_stripped`]):
/// - `X-Forwarded-For`: the trusted peer's chain (all its lines, joined)
///   plus the peer; else just the peer;
/// - `X-Real-IP`: the client ([`Client::identify`]);
/// - `X-Forwarded-Proto`: a trusted peer's, else `http`;
/// - `X-Forwarded-Host`: a trusted peer's, else the routed authority
///   (removed when the request named none, HTTP/1.0 without `Host`);
/// - `Forwarded`: a trusted peer's, with `for=<peer>` appended (RFC 7239
///   §4, §6); never created;
/// - `X-Request-Id`: `request_id`.
///
/// The trusted chains are rebuilt as lists without empty elements (RFC 9110
/// §5.6.1): an empty or blank `X-Forwarded-For` gives just the peer, never
/// `, <peer>`; an empty `Forwarded` counts as none and is removed.
pub fn apply(
    req: &mut RequestHeader,
    client: &Client,
    request_id: &HeaderValue,
    authority: Option<&Authority>,
) -> Result<()> {
    strip(req, client.trusted);
    let peer = ip_header(client.peer)?;
    let real_ip = match client.ip == client.peer {
        true => peer.clone(),
        false => ip_header(client.ip)?,
    };
    let xff = match list_elements(req, X_FORWARDED_FOR, false) {
        Some(mut chain) if client.trusted => {
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&chain).or_err(InvalidHTTPHeader, "X-Forwarded-For")?
        }
        _ => peer,
    };
    req.insert_header(X_FORWARDED_FOR, xff)?;
    req.insert_header(X_REAL_IP, real_ip)?;
    // Only a trusted peer's can still be here.
    match list_elements(req, FORWARDED, true) {
        Some(mut elements) => {
            elements.extend_from_slice(b", for=");
            match client.peer {
                IpAddr::V4(ip) => elements.extend_from_slice(ip.to_string().as_bytes()),
                IpAddr::V6(ip) => elements.extend_from_slice(format!("\"[{ip}]\"").as_bytes()),
            }
            let value =
                HeaderValue::from_bytes(&elements).or_err(InvalidHTTPHeader, "Forwarded")?;
            req.insert_header(FORWARDED, value)?;
        }
        // None at all, or only empty lines: nothing to append to, and an
        // empty one is no use to the backend.
        None => {
            req.remove_header(FORWARDED);
        }
    }
    if !(client.trusted && req.headers.contains_key(X_FORWARDED_PROTO)) {
        req.insert_header(X_FORWARDED_PROTO, if client.tls { "https" } else { "http" })?;
    }
    if !(client.trusted && req.headers.contains_key(X_FORWARDED_HOST)) {
        match authority {
            Some(a) => req.insert_header(X_FORWARDED_HOST, a.header_value().clone())?,
            None => {
                req.remove_header(X_FORWARDED_HOST);
            }
        }
    }
    req.insert_header(X_REQUEST_ID, request_id.clone())?;
    Ok(())
}

/// Removes every header [`is_always_stripped`] names and, when the peer is
/// not trusted, every one [`is_proxy_set`] names: in any case and however
/// often it was repeated. Allocates only when there is something to remove.
fn strip(req: &mut RequestHeader, trusted: bool) {
    let doomed: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            is_always_stripped(name) || (!trusted && is_proxy_set(name))
        })
        .cloned()
        .collect();
    for name in doomed {
        req.remove_header(&name);
    }
}

/// The elements of list header `name` over all its lines, trimmed of OWS,
/// empty ones left out (RFC 9110 §5.6.1), joined with `, `; `None` when
/// there is no element at all. With `quoted`, a `,` inside a quoted string
/// (RFC 9110 §5.6.4, as `Forwarded` values use) does not split.
fn list_elements(req: &RequestHeader, name: &str, quoted: bool) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for value in req.headers.get_all(name) {
        for element in split_list(value.as_bytes(), quoted) {
            let element = trim_ows(element);
            if element.is_empty() {
                continue;
            }
            match out.as_mut() {
                None => out = Some(element.to_vec()),
                Some(v) => {
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(element);
                }
            }
        }
    }
    out
}

/// `value` cut at each `,`, except (with `quoted`) inside a quoted string,
/// where `\` escapes the next byte.
fn split_list(value: &[u8], quoted: bool) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let text = rest?;
        let (mut in_quotes, mut escaped) = (false, false);
        for (i, &b) in text.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_quotes => escaped = true,
                b'"' if quoted => in_quotes = !in_quotes,
                b',' if !in_quotes => {
                    rest = Some(&text[i + 1..]);
                    return Some(&text[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(text)
    })
}

/// `element` without leading and trailing OWS.
fn trim_ows(element: &[u8]) -> &[u8] {
    let start = element
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(element.len());
    let end = element
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &element[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn identify(peer: &str, lines: &[&str], trusted: &[&str]) -> Client {
        Client::identify(ip(peer), lines.iter().map(|l| l.as_bytes()), &nets(trusted))
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let c = identify("203.0.113.9", &["1.2.3.4"], &["10.0.0.0/8"]);
        assert_eq!(c.ip, ip("203.0.113.9"));
        assert!(!c.trusted);
    }

    #[test]
    fn trusted_chain_yields_rightmost_untrusted() {
        let t = &["10.0.0.0/8"];
        let c = identify("10.0.0.2", &["6.6.6.6, 198.51.100.7, 10.0.0.1"], t);
        assert_eq!(c.ip, ip("198.51.100.7"));
        assert_eq!(identify("10.0.0.2", &["10.0.0.3"], t).ip, ip("10.0.0.3"));
        assert_eq!(identify("10.0.0.2", &[], t).ip, ip("10.0.0.2"));
        // A second line appended by the load balancer is the right end of
        // the chain, not something to ignore.
        let c = identify("10.0.0.2", &["6.6.6.6", "198.51.100.7, 10.0.0.1"], t);
        assert_eq!(c.ip, ip("198.51.100.7"));
        // Ports as some load balancers write them.
        let c = identify("10.0.0.2", &["6.6.6.6, 198.51.100.7:5123"], t);
        assert_eq!(c.ip, ip("198.51.100.7"));
        let c = identify("10.0.0.2", &["[2001:db8::7]:443"], t);
        assert_eq!(c.ip, ip("2001:db8::7"));
        // Garbage stops the walk: what is left of it is the client's to write.
        let c = identify("10.0.0.2", &["6.6.6.6, unknown, 10.0.0.1"], t);
        assert_eq!(c.ip, ip("10.0.0.1"));
        // Empty elements are nothing (RFC 9110 §5.6.1): not garbage, not a hop.
        let c = identify("10.0.0.2", &["6.6.6.6, "], t);
        assert_eq!(c.ip, ip("6.6.6.6"));
        let c = identify("10.0.0.2", &["6.6.6.6", "", " ,\t, "], t);
        assert_eq!(c.ip, ip("6.6.6.6"));
        let c = identify("10.0.0.2", &["6.6.6.6,,10.0.0.1,"], t);
        assert_eq!(c.ip, ip("6.6.6.6"));
        assert_eq!(identify("10.0.0.2", &[""], t).ip, ip("10.0.0.2"));
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

    fn authority(s: &str) -> Authority {
        Authority::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn headers_are_replaced_or_appended() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header(X_FORWARDED_FOR, "6.6.6.6").unwrap();
        req.insert_header(X_FORWARDED_PROTO, "https").unwrap();
        let untrusted = identify("127.0.0.1", &[], &[]);
        let host = authority("example.com");
        apply(
            &mut req,
            &untrusted,
            &HeaderValue::from_static("id1"),
            Some(&host),
        )
        .unwrap();
        assert_eq!(req.headers[X_FORWARDED_FOR], "127.0.0.1");
        assert_eq!(req.headers[X_FORWARDED_PROTO], "http");
        assert_eq!(req.headers[X_FORWARDED_HOST], "example.com");

        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header(X_FORWARDED_FOR, "6.6.6.6").unwrap();
        req.append_header("X-Forwarded-For", "7.7.7.7").unwrap();
        req.insert_header(FORWARDED, "for=6.6.6.6;proto=https")
            .unwrap();
        let trusted = identify("::1", &["6.6.6.6", "7.7.7.7"], &["::1/128"]);
        apply(&mut req, &trusted, &HeaderValue::from_static("id2"), None).unwrap();
        assert_eq!(req.headers[X_FORWARDED_FOR], "6.6.6.6, 7.7.7.7, ::1");
        assert_eq!(req.headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(req.headers[X_REAL_IP], "7.7.7.7");
        assert_eq!(
            req.headers[FORWARDED],
            "for=6.6.6.6;proto=https, for=\"[::1]\""
        );
        assert_eq!(req.headers[X_REQUEST_ID], "id2");
        assert!(req.headers.get(X_FORWARDED_HOST).is_none());
    }

    #[test]
    fn the_whole_proxy_set_family_is_stripped_from_untrusted_peers() {
        let sent = [
            "Forwarded",
            "FORWARDED",
            "X-Forwarded-Port",
            "x-forwarded-prefix",
            "X-FORWARDED-SSL",
            "X-Forwarded-By",
            "X-Forwarded-Server",
            "X-Forwarded-Anything-New",
            "X-Forwarded",
            "Forwarded-For",
            "X-Real-Ip",
            "True-Client-IP",
            "X-Client-IP",
            "X-Cluster-Client-IP",
            "CF-Connecting-IP",
            "Client-IP",
            "Fastly-Client-IP",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-Original-Forwarded-For",
            "X-Middleware-Subrequest",
            "x-middleware-rewrite",
            "X-Middleware-Override-Headers",
            "X-Invoke-Path",
            "X-Matched-Path",
            "X-Now-Route-Matches",
        ];
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for name in sent {
            req.append_header(name.to_string(), "evil").unwrap();
            req.append_header(name.to_string(), "evil-again").unwrap();
        }
        req.insert_header("X-Kept", "yes").unwrap();
        req.insert_header("RSC", "1").unwrap();
        req.insert_header("Next-Router-State-Tree", "x").unwrap();
        let untrusted = identify("192.0.2.1", &[], &[]);
        let host = authority("shop.example");
        apply(
            &mut req,
            &untrusted,
            &HeaderValue::from_static("id"),
            Some(&host),
        )
        .unwrap();
        let mut names: Vec<&str> = req.headers.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "next-router-state-tree",
                "rsc",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-kept",
                "x-real-ip",
                "x-request-id"
            ]
        );
        for name in ["x-forwarded-for", "x-real-ip"] {
            assert_eq!(req.headers.get_all(name).iter().count(), 1);
            assert_eq!(req.headers[name], "192.0.2.1");
        }
        assert_eq!(req.headers[X_FORWARDED_HOST], "shop.example");
        assert!(sent.iter().all(|n| is_proxy_set(&n.to_ascii_lowercase())));
        assert!(!is_proxy_set("x-request-id"));
        assert!(!is_proxy_set("x-forwardedfor"));
    }

    #[test]
    fn the_family_covers_certificates_rewrites_and_underscore_spellings() {
        for name in [
            // Client certificates and TLS sessions a terminating proxy passes on.
            "client-cert",
            "client-cert-chain",
            "x-client-cert",
            "x-client-cert-chain",
            "x-ssl-cert",
            "x-ssl-client-cert",
            "x-ssl-client-verify",
            "x-ssl-client-s-dn",
            "ssl-client-cert",
            "ssl-client-verify",
            "x-forwarded-client-cert",
            "x-forwarded-tls-client-cert",
            "x-amzn-mtls-clientcert",
            // Tomcat SSLValve's defaults, as sent.
            "ssl_client_cert",
            "ssl_client_escaped_cert",
            "ssl_cipher",
            "ssl_session_id",
            "ssl_cipher_usekeysize",
            // The URL or host before a rewrite.
            "x-original-uri",
            "x-original-url",
            "x-original-method",
            "x-original-host",
            "x-original-forwarded-for",
            "x-rewrite-url",
            "x-host",
            "x-forwarded-server",
            // Any member, with `_` for `-` anywhere.
            "x_forwarded_for",
            "x_forwarded_proto",
            "x-forwarded_host",
            "x_forwarded-port",
            "x_real_ip",
            "x-real_ip",
            "true_client_ip",
            "x_middleware_subrequest",
            "x_original_uri",
            "x_ssl_client_cert",
            "client_cert",
            "x_host",
        ] {
            assert!(is_proxy_set(name), "{name}");
            assert_eq!(is_always_stripped(name), name.contains('_'), "{name}");
        }
        assert!(is_always_stripped("x_request_id"));
        assert!(is_always_stripped("x-request_id"));
        assert!(!is_always_stripped("x-request-id"));
        for name in [
            "x-request-id",
            "x-client-version",
            "x-hostname",
            "ssl",
            "sslcert",
            "client-certificate",
            "x-ssl",
            "proxy-authorization",
            "x-proxy",
            "authorization",
            "x-forwardedfor",
            "x_forwardedfor",
        ] {
            assert!(!is_proxy_set(name), "{name}");
            assert!(!is_always_stripped(name), "{name}");
        }
        assert!(!is_proxy_set("x_request_id"));
        assert!(is_always_stripped("proxy"));
        assert!(!is_proxy_set("proxy"));
    }

    fn apply_from(peer_trusted: bool, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        let lines: Vec<&[u8]> = req
            .headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let trusted = if peer_trusted {
            nets(&["10.0.0.0/8"])
        } else {
            vec![]
        };
        let client = Client::identify(ip("10.0.0.2"), lines, &trusted);
        let host = authority("shop.example");
        apply(
            &mut req,
            &client,
            &HeaderValue::from_static("id"),
            Some(&host),
        )
        .unwrap();
        req
    }

    #[test]
    fn proxy_and_underscore_spellings_are_stripped_from_every_peer() {
        for trusted in [false, true] {
            let req = apply_from(
                trusted,
                &[
                    ("Proxy", "http://evil.example:3128"),
                    ("X_Forwarded_For", "6.6.6.6"),
                    ("X_Forwarded_Proto", "https"),
                    ("X-Forwarded_Host", "evil.example"),
                    ("X_Real_IP", "6.6.6.6"),
                    ("ssl_client_cert", "evil"),
                    ("X-SSL-Client-Cert", "from-the-lb"),
                    ("X-Kept", "yes"),
                ],
            );
            for name in [
                "proxy",
                "x_forwarded_for",
                "x_forwarded_proto",
                "x-forwarded_host",
                "x_real_ip",
                "ssl_client_cert",
            ] {
                assert!(req.headers.get(name).is_none(), "{name}, trusted {trusted}");
            }
            // A trusted peer's dash-spelled family still passes.
            assert_eq!(
                req.headers.get("x-ssl-client-cert").is_some(),
                trusted,
                "trusted {trusted}"
            );
            assert_eq!(req.headers["x-kept"], "yes");
            assert_eq!(req.headers[X_FORWARDED_FOR], "10.0.0.2");
        }
    }

    #[test]
    fn empty_list_elements_from_a_trusted_peer_are_dropped() {
        let xff = |lines: &[&str]| {
            let headers: Vec<(&str, &str)> = lines.iter().map(|l| (X_FORWARDED_FOR, *l)).collect();
            let req = apply_from(true, &headers);
            assert_eq!(req.headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
            req.headers[X_FORWARDED_FOR].to_str().unwrap().to_string()
        };
        assert_eq!(xff(&[""]), "10.0.0.2");
        assert_eq!(xff(&["   "]), "10.0.0.2");
        assert_eq!(xff(&["", "\t"]), "10.0.0.2");
        assert_eq!(xff(&[","]), "10.0.0.2");
        assert_eq!(xff(&[" , ,, "]), "10.0.0.2");
        assert_eq!(xff(&["6.6.6.6,"]), "6.6.6.6, 10.0.0.2");
        assert_eq!(xff(&[",6.6.6.6 ,, 7.7.7.7,"]), "6.6.6.6, 7.7.7.7, 10.0.0.2");
        assert_eq!(xff(&["", "6.6.6.6", " "]), "6.6.6.6, 10.0.0.2");

        let fwd = |lines: &[&str]| {
            let headers: Vec<(&str, &str)> = lines.iter().map(|l| (FORWARDED, *l)).collect();
            let req = apply_from(true, &headers);
            assert!(req.headers.get_all(FORWARDED).iter().count() <= 1);
            req.headers
                .get(FORWARDED)
                .map(|v| v.to_str().unwrap().to_string())
        };
        // Empty means none: switchyard creates no Forwarded of its own.
        assert_eq!(fwd(&[""]), None);
        assert_eq!(fwd(&[" ", ", ,"]), None);
        assert_eq!(
            fwd(&["for=6.6.6.6,"]),
            Some("for=6.6.6.6, for=10.0.0.2".into())
        );
        assert_eq!(
            fwd(&["", " for=6.6.6.6;proto=https ", ",,for=7.7.7.7"]),
            Some("for=6.6.6.6;proto=https, for=7.7.7.7, for=10.0.0.2".into())
        );
        // A comma inside a quoted string is not a list separator.
        assert_eq!(
            fwd(&["for=\"_a,,b\";by=\"x\\\",\", ,"]),
            Some("for=\"_a,,b\";by=\"x\\\",\", for=10.0.0.2".into())
        );
    }
}
