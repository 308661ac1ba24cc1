//! The one authority (`host[:port]`) a request is for: what it is routed by,
//! what the backend gets as `Host` and `X-Forwarded-Host`.
//!
//! A client can name a host in several places: the `Host` header, an
//! absolute-form request target (`GET http://a.example/x HTTP/1.1`), and, in
//! HTTP/2, the `:authority` pseudo-header. [`request_authority`] picks the
//! one that counts (RFC 9112 §3.2.2: the target's authority wins over `Host`;
//! RFC 9113 §8.3.1: `:authority` over `Host`), validates it with a strict
//! grammar and returns it in one canonical form, so routing, the forwarded
//! headers and the logs can never disagree about which host a request is for.
//!
//! The grammar (RFC 3986 §3.2.2, narrowed to what DNS and IP literals use):
//!
//! ```text
//! authority = host [ ":" [ port ] ]       ; an empty port is allowed (RFC 3986)
//! host      = name [ "." ] / IPv4 / "[" IPv6 "]"
//! name      = label *( "." label )        ; at most 253 bytes
//! label     = 1*63( ALPHA / DIGIT / "-" / "_" )
//! port      = 1*5DIGIT                    ; 1 to 65535
//! ```
//!
//! One host, one spelling: a name is lower-cased and loses its trailing dot;
//! an IPv6 literal is rewritten in its RFC 5952 text form (`[0:0::1]`,
//! `[0000::1]` and `[::0:1]` are all `[::1]`), so a route on a host holds for
//! every way of writing that host. An IPv4-mapped or IPv4-compatible IPv6
//! literal (`[::ffff:127.0.0.1]`, `[::ffff:7f00:1]`, `[::127.0.0.1]`) is
//! refused: it names an IPv4
//! host in IPv6 clothes, and sending it to the host-less routes would let a
//! client walk around the routes of the IPv4 host. Port 0 is refused too: no
//! client can have connected to it.
//!
//! A name whose last label is numeric (`1.2.3`, `0x7f.1`, `example.123`) is
//! refused unless the whole host is a plain dotted-quad IPv4 address: URL
//! parsers read such names as IPv4 in shorthand or hex, so the backend could
//! see another host than the one routed. Everything else (spaces, `@`, `/`,
//! `\`, `%`, `,`, control bytes, non-ASCII, an unbracketed IPv6 address,
//! an empty label) is an error, answered 400, never "unknown host".

use std::net::{Ipv4Addr, Ipv6Addr};

use http::{HeaderValue, Version};
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::RequestHeader;

/// Longest host name, without its trailing dot (253 bytes, RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 253;

/// Longest label of a host name (63 bytes, RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a request's authority was refused. Each is answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("an HTTP/1.1 request needs a Host header (RFC 9112 §3.2)")]
    Missing,
    #[error("more than one Host header")]
    Duplicate,
    #[error("empty host")]
    Empty,
    #[error("host has a character not allowed in a host name")]
    BadChar,
    #[error("host has an empty or over-long label, or is too long")]
    BadName,
    #[error("host name ends in a number but is not an IPv4 address")]
    Numeric,
    #[error("bad IPv6 literal (give it in brackets: [2001:db8::1])")]
    BadIpv6,
    #[error("IPv4-mapped or IPv4-compatible IPv6 literal: name the IPv4 address itself (127.0.0.1, not [::ffff:127.0.0.1])")]
    Ipv4Mapped,
    #[error("bad port: give a number from 1 to 65535")]
    BadPort,
    #[error("user information (user@) in the authority")]
    Userinfo,
    #[error("request target scheme is not http or https")]
    BadScheme,
    #[error("request target is not a path or an http(s) URL")]
    BadTarget,
}

/// A validated authority in canonical form: lower-case host without a
/// trailing dot, an IPv6 literal in brackets and in RFC 5952 form, and the
/// port in decimal when one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// `host[:port]`, as sent upstream in `Host` and `X-Forwarded-Host`.
    value: HeaderValue,
    /// Where the host ends in `value`.
    host_end: usize,
    port: Option<u16>,
}

impl Authority {
    /// Parses and validates `host[:port]`; see the module docs for the grammar.
    pub fn parse(raw: &[u8]) -> Result<Authority, HostError> {
        Self::parse_shared(raw, None)
    }

    /// Like [`Authority::parse`]; `original` is the header value `raw` came
    /// from, reused without a copy when it is already canonical.
    fn parse_shared(raw: &[u8], original: Option<&HeaderValue>) -> Result<Authority, HostError> {
        if raw.is_empty() {
            return Err(HostError::Empty);
        }
        if raw.contains(&b'@') {
            return Err(HostError::Userinfo);
        }
        let (host, port_part) = split_port(raw)?;
        let port = match port_part {
            None | Some(b"") => None,
            Some(digits) => Some(parse_port(digits)?),
        };
        let rewritten_host = canonical_host(host)?;
        // The common case: the host already canonical, no empty or
        // zero-padded port. Then the header value is shared, not copied.
        let port_canonical = match port_part {
            None => true,
            Some(digits) => !digits.is_empty() && digits[0] != b'0',
        };
        if rewritten_host.is_none() && port_canonical {
            if let Some(value) = original {
                return Ok(Authority {
                    value: value.clone(),
                    host_end: host.len(),
                    port,
                });
            }
        }
        let mut text = match rewritten_host {
            Some(text) => text,
            // Canonical already, so only ASCII: no replacement characters.
            None => String::from_utf8_lossy(host).into_owned(),
        };
        let host_end = text.len();
        if let Some(port) = port {
            text.push(':');
            text.push_str(&port.to_string());
        }
        // Only ASCII letters, digits and `-_.:[]` are left: always a valid value.
        let value = HeaderValue::from_str(&text).map_err(|_| HostError::BadChar)?;
        Ok(Authority {
            value,
            host_end,
            port,
        })
    }

    /// The host alone, what routes match: `api.example.com`, `10.0.0.1`, `[::1]`.
    pub fn host(&self) -> &str {
        std::str::from_utf8(&self.value.as_bytes()[..self.host_end]).unwrap_or_default()
    }

    /// The port, when the client named one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `host[:port]` for the `Host` and `X-Forwarded-Host` headers.
    pub fn header_value(&self) -> &HeaderValue {
        &self.value
    }
}

/// The authority a request is for, from the one place that counts:
/// - HTTP/2: `:authority`, else `Host` (RFC 9113 §8.3.1);
/// - an absolute-form target: its authority, which wins over `Host`
///   (RFC 9112 §3.2.2); only `http` and `https` targets are accepted;
/// - otherwise the single `Host` header.
///
/// `Ok(None)` only for an HTTP/1.0 request without any (it then uses the
/// host-less routes). HTTP/1.1 without exactly one `Host` is an error, even
/// with an absolute-form target (RFC 9112 §3.2: "MUST respond with 400").
pub fn request_authority(req: &RequestHeader) -> Result<Option<Authority>, HostError> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    if req.version >= Version::HTTP_2 {
        if let Some(authority) = req.uri.authority() {
            return Authority::parse(authority.as_str().as_bytes()).map(Some);
        }
        return match host {
            Some(h) => Authority::parse_shared(h.as_bytes(), Some(h)).map(Some),
            None => Err(HostError::Missing),
        };
    }
    if host.is_none() && req.version >= Version::HTTP_11 {
        return Err(HostError::Missing);
    }
    let target = req.raw_path();
    if !is_origin_or_asterisk_form(target) {
        return match raw_target_authority(target) {
            RawTargetAuthority::Absolute {
                scheme, authority, ..
            } => {
                if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https"))
                {
                    return Err(HostError::BadScheme);
                }
                Authority::parse(authority).map(Some)
            }
            RawTargetAuthority::None | RawTargetAuthority::AmbiguousAuthority => {
                Err(HostError::BadTarget)
            }
        };
    }
    match host {
        Some(h) => Authority::parse_shared(h.as_bytes(), Some(h)).map(Some),
        None => Ok(None),
    }
}

/// The origin-form target of an absolute-form one (`http://a.example/x?y`
/// gives `/x?y`), for the request sent upstream; `None` when the target is
/// not absolute-form.
pub fn origin_form(target: &[u8]) -> Option<Vec<u8>> {
    if is_origin_or_asterisk_form(target) {
        return None;
    }
    let RawTargetAuthority::Absolute { path_and_query, .. } = raw_target_authority(target) else {
        return None;
    };
    let mut out = Vec::with_capacity(path_and_query.len() + 1);
    if !path_and_query.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(path_and_query);
    Some(out)
}

fn is_origin_or_asterisk_form(target: &[u8]) -> bool {
    target.is_empty() || target.starts_with(b"/") || target == b"*"
}

/// Splits `host[:port]` into host and port text; the host part may be a
/// bracketed IPv6 literal.
fn split_port(raw: &[u8]) -> Result<(&[u8], Option<&[u8]>), HostError> {
    if raw[0] == b'[' {
        let close = raw
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::BadIpv6)?;
        let (host, rest) = raw.split_at(close + 1);
        return match rest {
            [] => Ok((host, None)),
            [b':', port @ ..] => Ok((host, Some(port))),
            _ => Err(HostError::BadIpv6),
        };
    }
    match raw.iter().position(|&b| b == b':') {
        None => Ok((raw, None)),
        Some(i) => {
            let port = &raw[i + 1..];
            if port.contains(&b':') {
                // Two colons: an IPv6 address without brackets, or garbage.
                return Err(HostError::BadIpv6);
            }
            Ok((&raw[..i], Some(port)))
        }
    }
}

fn parse_port(digits: &[u8]) -> Result<u16, HostError> {
    if digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HostError::BadPort);
    }
    let n = digits
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    match u16::try_from(n) {
        // Port 0 means "any port" to the socket API; no client reached us on it.
        Ok(0) | Err(_) => Err(HostError::BadPort),
        Ok(port) => Ok(port),
    }
}

/// Validates the host part and returns its canonical form, or `None` when
/// it is canonical already (the common case, which allocates nothing): a
/// name lower-case and without a trailing dot, an IPv6 literal in RFC 5952
/// form (Rust's `Ipv6Addr` display) inside brackets.
fn canonical_host(host: &[u8]) -> Result<Option<String>, HostError> {
    if let Some(inner) = host.strip_prefix(b"[") {
        return canonical_ipv6(inner.strip_suffix(b"]").ok_or(HostError::BadIpv6)?);
    }
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(&b) = host
        .iter()
        .find(|&&b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    {
        return Err(if b == b']' || b == b'[' {
            HostError::BadIpv6
        } else {
            HostError::BadChar
        });
    }
    let trailing_dot = host.ends_with(b".");
    let name = if trailing_dot {
        &host[..host.len() - 1]
    } else {
        host
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(HostError::BadName);
    }
    let mut last = &b""[..];
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err(HostError::BadName);
        }
        last = label;
    }
    if is_numeric_label(last) {
        let text = std::str::from_utf8(name).map_err(|_| HostError::BadChar)?;
        // Rust's parser takes exactly four decimal octets, no leading zeros,
        // so an accepted IPv4 address has one spelling only.
        text.parse::<Ipv4Addr>().map_err(|_| HostError::Numeric)?;
    }
    if !trailing_dot && !name.iter().any(u8::is_ascii_uppercase) {
        return Ok(None);
    }
    // Only ASCII is left after the checks above.
    Ok(Some(String::from_utf8_lossy(name).to_ascii_lowercase()))
}

/// Longest RFC 5952 text of an IPv6 address: 8 groups of 4 hex digits and
/// 7 colons (39 bytes); the IPv4-mapped form is shorter.
const MAX_IPV6_TEXT: usize = 39;

/// Validates the inside of `[...]`; returns `[addr]` in RFC 5952 form, or
/// `None` when `inner` is written that way already.
fn canonical_ipv6(inner: &[u8]) -> Result<Option<String>, HostError> {
    use std::io::Write;
    // Only hex digits, `:` and `.` (an embedded IPv4): no zone ids (`%`).
    if !inner
        .iter()
        .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
    {
        return Err(HostError::BadIpv6);
    }
    let text = std::str::from_utf8(inner).map_err(|_| HostError::BadIpv6)?;
    let addr = text.parse::<Ipv6Addr>().map_err(|_| HostError::BadIpv6)?;
    // IPv4-compatible (`::a.b.c.d`, deprecated by RFC 4291 §2.5.5.1) names an
    // IPv4 host just as a mapped one does. Only where the IPv4 address would
    // be a real one (not in 0.0.0.0/16), so `::`, `::1` and `::2` stay IPv6.
    let g = addr.segments();
    let compatible = g[..6].iter().all(|&x| x == 0) && g[6] != 0;
    if addr.to_ipv4_mapped().is_some() || compatible {
        return Err(HostError::Ipv4Mapped);
    }
    // Rust displays an `Ipv6Addr` in RFC 5952 §4 form (lower case, leading
    // zeros dropped, the longest run of zero groups as `::`). Written into
    // a stack buffer, so the canonical case allocates nothing.
    let mut buf = [0u8; MAX_IPV6_TEXT];
    let mut w = &mut buf[..];
    write!(w, "{addr}").map_err(|_| HostError::BadIpv6)?;
    let len = MAX_IPV6_TEXT - w.len();
    if inner == &buf[..len] {
        return Ok(None);
    }
    Ok(Some(format!("[{addr}]")))
}

/// Whether URL parsers (WHATWG "ends in a number") would read this last
/// label as a number, making the host an IPv4 address in some spelling.
fn is_numeric_label(label: &[u8]) -> bool {
    if label.iter().all(u8::is_ascii_digit) {
        return true;
    }
    match label {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (String, Option<u16>, String) {
        let a = Authority::parse(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
        let value = a.header_value().to_str().unwrap().to_string();
        (a.host().to_string(), a.port(), value)
    }

    fn err(raw: &[u8]) -> HostError {
        match Authority::parse(raw) {
            Ok(a) => panic!("{:?} accepted as {a:?}", String::from_utf8_lossy(raw)),
            Err(e) => e,
        }
    }

    #[test]
    fn valid_forms_are_canonicalised() {
        let cases: &[(&str, &str, Option<u16>, &str)] = &[
            (
                "api.example.com",
                "api.example.com",
                None,
                "api.example.com",
            ),
            (
                "API.Example.COM",
                "api.example.com",
                None,
                "api.example.com",
            ),
            (
                "api.example.com.",
                "api.example.com",
                None,
                "api.example.com",
            ),
            (
                "api.example.com:8443",
                "api.example.com",
                Some(8443),
                "api.example.com:8443",
            ),
            (
                "api.example.com:",
                "api.example.com",
                None,
                "api.example.com",
            ),
            (
                "Api.example.com.:080",
                "api.example.com",
                Some(80),
                "api.example.com:80",
            ),
            ("localhost", "localhost", None, "localhost"),
            ("my_service-1", "my_service-1", None, "my_service-1"),
            ("10.0.0.1", "10.0.0.1", None, "10.0.0.1"),
            ("127.0.0.1:8080", "127.0.0.1", Some(8080), "127.0.0.1:8080"),
            ("[::1]", "[::1]", None, "[::1]"),
            (
                "[2001:DB8::1]:443",
                "[2001:db8::1]",
                Some(443),
                "[2001:db8::1]:443",
            ),
            ("[0:0::1]", "[::1]", None, "[::1]"),
            ("[0:0:0:0:0:0:0:1]:80", "[::1]", Some(80), "[::1]:80"),
            ("[::0:1]", "[::1]", None, "[::1]"),
            ("[0000::1]:", "[::1]", None, "[::1]"),
            (
                "[0000:0000:0000:0000:0000:0000:0000:0001]",
                "[::1]",
                None,
                "[::1]",
            ),
            ("[::]", "[::]", None, "[::]"),
            ("[0::0]", "[::]", None, "[::]"),
            (
                "[2001:0DB8:0:0:1:0:0:1]",
                "[2001:db8::1:0:0:1]",
                None,
                "[2001:db8::1:0:0:1]",
            ),
            (
                "[2001:db8:0:0:0:1:0:0]",
                "[2001:db8::1:0:0]",
                None,
                "[2001:db8::1:0:0]",
            ),
            ("[1:0:0:0:0:0:0:0]", "[1::]", None, "[1::]"),
            (
                "[1::2:3:4:5:6:7]",
                "[1:0:2:3:4:5:6:7]",
                None,
                "[1:0:2:3:4:5:6:7]",
            ),
            // An embedded IPv4 outside the mapped and compatible ranges is
            // just 32 bits (here NAT64's well-known prefix).
            (
                "[64:ff9b::1.2.3.4]",
                "[64:ff9b::102:304]",
                None,
                "[64:ff9b::102:304]",
            ),
            ("127.0.0.1.", "127.0.0.1", None, "127.0.0.1"),
            (
                "1.2.3.4.example",
                "1.2.3.4.example",
                None,
                "1.2.3.4.example",
            ),
            ("a:65535", "a", Some(65535), "a:65535"),
            ("a:00001", "a", Some(1), "a:1"),
        ];
        for (raw, host, port, value) in cases {
            assert_eq!(
                ok(raw),
                (host.to_string(), *port, value.to_string()),
                "{raw}"
            );
        }
        let label = "a".repeat(63);
        assert_eq!(ok(&format!("{label}.com")).0, format!("{label}.com"));
    }

    #[test]
    fn canonical_values_are_shared_not_copied() {
        for (raw, host) in [
            ("api.example.com:8443", "api.example.com"),
            ("10.0.0.1", "10.0.0.1"),
            ("[2001:db8::1]:443", "[2001:db8::1]"),
            ("[fe80::ab:1]", "[fe80::ab:1]"),
        ] {
            let v = HeaderValue::from_static(raw);
            let a = Authority::parse_shared(v.as_bytes(), Some(&v)).unwrap();
            assert_eq!(
                a.header_value().as_bytes().as_ptr(),
                v.as_bytes().as_ptr(),
                "{raw}"
            );
            assert_eq!(a.host(), host);
        }
        // Another spelling is copied, into the one canonical form.
        let v = HeaderValue::from_static("[0::1]");
        let a = Authority::parse_shared(v.as_bytes(), Some(&v)).unwrap();
        assert_eq!(a.header_value(), "[::1]");
    }

    #[test]
    fn every_spelling_of_an_ipv6_address_is_one_host() {
        // Every way of writing ::1 with full or shortened groups and the
        // `::` run anywhere it can go: all route as `[::1]`.
        let groups = ["0", "00", "0000"];
        let mut spellings = vec!["[::1]".to_string(), "[::0001]".to_string()];
        for run_end in 0..7 {
            for g in groups {
                // `run_end` explicit zero groups after a `::`, then the 1.
                let explicit = vec![g; run_end];
                let mut text = String::from("[::");
                for z in &explicit {
                    text.push_str(z);
                    text.push(':');
                }
                text.push_str("1]");
                spellings.push(text);
                // The same zero groups before the `::`.
                let mut text = String::from("[");
                for z in &explicit {
                    text.push_str(z);
                    text.push(':');
                }
                text.push_str(":1]");
                if run_end > 0 {
                    spellings.push(text);
                }
            }
        }
        spellings.push(format!("[{}1]", "0:".repeat(7)));
        spellings.push(format!("[{}0001]", "0000:".repeat(7)));
        for s in &spellings {
            assert_eq!(ok(s).0, "[::1]", "{s}");
        }
    }

    #[test]
    fn every_invalid_class_is_refused() {
        use HostError::*;
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}a", "abcdefghi.".repeat(26));
        let cases: &[(&[u8], HostError)] = &[
            (b"", Empty),
            (b":80", Empty),
            (b".", BadName),
            (b"a..b", BadName),
            (b".a", BadName),
            (b"a.b..", BadName),
            (long_label.as_bytes(), BadName),
            (long_name.as_bytes(), BadName),
            (b"a b", BadChar),
            (b" a", BadChar),
            (b"a\t", BadChar),
            (b"a/b", BadChar),
            (b"a\\b", BadChar),
            (b"a%2eb", BadChar),
            (b"a,b", BadChar),
            (b"a.example, b.example", BadChar),
            (b"a;b", BadChar),
            (b"a*", BadChar),
            (b"a\x00", BadChar),
            (b"a\x7f", BadChar),
            (b"a\rb", BadChar),
            ("b\u{fc}cher.de".as_bytes(), BadChar),
            (b"user@a.example", Userinfo),
            (b"@a", Userinfo),
            (b"::1", BadIpv6),
            (b"2001:db8::1", BadIpv6),
            (b"[::1", BadIpv6),
            (b"::1]", BadIpv6),
            (b"[::1]x", BadIpv6),
            (b"[::1]:80:81", BadPort),
            (b"[::g]", BadIpv6),
            (b"[fe80::1%25eth0]", BadIpv6),
            (b"[v1.abc]", BadIpv6),
            (b"[1.2.3.4]", BadIpv6),
            (b"[::ffff:127.0.0.1]", Ipv4Mapped),
            (b"[::FFFF:127.0.0.1]:80", Ipv4Mapped),
            (b"[::ffff:7f00:1]", Ipv4Mapped),
            (b"[0:0:0:0:0:ffff:7f00:0001]", Ipv4Mapped),
            (b"[::ffff:10.0.0.1]:", Ipv4Mapped),
            (b"[::127.0.0.1]", Ipv4Mapped),
            (b"[0:0:0:0:0:0:127.0.0.1]", Ipv4Mapped),
            (b"[::7f00:1]", Ipv4Mapped),
            (b"[::1]:0", BadPort),
            (b"[]", BadIpv6),
            (b"a:b:c", BadIpv6),
            (b"a:80:80", BadIpv6),
            (b"a:x", BadPort),
            (b"a:-1", BadPort),
            (b"a:+1", BadPort),
            (b"a: 80", BadPort),
            (b"a:65536", BadPort),
            (b"a:999999", BadPort),
            (b"a:000080", BadPort),
            (b"a:0", BadPort),
            (b"a:00", BadPort),
            (b"a:00000", BadPort),
            (b"api.example.com:0", BadPort),
            (b"1.2.3", Numeric),
            (b"256.1.1.1", Numeric),
            (b"01.2.3.4", Numeric),
            (b"0x7f.0.0.1", Numeric),
            (b"0x7f000001", Numeric),
            (b"2130706433", Numeric),
            (b"example.123", Numeric),
            (b"1.2.3.4.5", Numeric),
        ];
        for (raw, want) in cases {
            assert_eq!(err(raw), *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    fn req(version: Version, target: &[u8], hosts: &[&[u8]]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", target, None).unwrap();
        r.set_version(version);
        for h in hosts {
            r.append_header("Host", HeaderValue::from_bytes(h).unwrap())
                .unwrap();
        }
        r
    }

    fn routed(r: &RequestHeader) -> Result<Option<String>, HostError> {
        request_authority(r).map(|a| a.map(|a| a.header_value().to_str().unwrap().to_string()))
    }

    #[test]
    fn one_source_per_request() {
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        let some = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(routed(&req(v11, b"/x", &[b"A.example"])), some("a.example"));
        assert_eq!(routed(&req(v11, b"/x", &[])), Err(HostError::Missing));
        assert_eq!(routed(&req(v11, b"/x", &[b""])), Err(HostError::Empty));
        assert_eq!(
            routed(&req(v11, b"/x", &[b"a.example", b"a.example"])),
            Err(HostError::Duplicate)
        );
        assert_eq!(routed(&req(v10, b"/x", &[])), Ok(None));
        assert_eq!(routed(&req(v10, b"/x", &[b"a.example"])), some("a.example"));
        assert_eq!(routed(&req(v10, b"/x", &[b""])), Err(HostError::Empty));
        // Absolute-form: the target's authority counts.
        assert_eq!(
            routed(&req(v11, b"http://B.example:81/x", &[b"ignored.example"])),
            some("b.example:81")
        );
        assert_eq!(
            routed(&req(v10, b"HTTPS://b.example", &[])),
            some("b.example")
        );
        assert_eq!(
            routed(&req(v11, b"http://b.example/x", &[])),
            Err(HostError::Missing)
        );
        assert_eq!(
            routed(&req(v11, b"http://u:p@b.example/x", &[b"b.example"])),
            Err(HostError::Userinfo)
        );
        assert_eq!(
            routed(&req(v11, b"ftp://b.example/x", &[b"b.example"])),
            Err(HostError::BadScheme)
        );
        assert_eq!(
            routed(&req(v11, b"ws://b.example/x", &[b"b.example"])),
            Err(HostError::BadScheme)
        );
        assert_eq!(
            routed(&req(v11, b"http://b..example/x", &[b"b.example"])),
            Err(HostError::BadName)
        );
        assert_eq!(
            routed(&req(v11, b"b.example:80", &[b"b.example"])),
            Err(HostError::BadTarget)
        );
        assert_eq!(routed(&req(v11, b"*", &[b"a.example"])), some("a.example"));
        // HTTP/2: `:authority` (in the URI) wins over Host.
        let mut h2 = req(Version::HTTP_2, b"/x", &[b"host.example"]);
        h2.set_uri("https://Auth.example:8443/x".parse().unwrap());
        assert_eq!(routed(&h2), some("auth.example:8443"));
        let h2_host = req(Version::HTTP_2, b"/x", &[b"host.example"]);
        assert_eq!(routed(&h2_host), some("host.example"));
        assert_eq!(
            routed(&req(Version::HTTP_2, b"/x", &[])),
            Err(HostError::Missing)
        );
    }

    #[test]
    fn absolute_targets_become_origin_form() {
        let o = |t: &[u8]| origin_form(t).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(o(b"http://a.example/x?y=1"), Some("/x?y=1".into()));
        assert_eq!(o(b"http://a.example"), Some("/".into()));
        assert_eq!(o(b"http://a.example?q"), Some("/?q".into()));
        assert_eq!(o(b"/x"), None);
        assert_eq!(o(b"*"), None);
    }
}
