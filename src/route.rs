//! Request routing: host + longest path prefix → service or action.
//!
//! Hosts work like nginx server blocks: when any route names the request's
//! host, only that host's routes are considered; requests for other hosts use
//! the routes without a host. Within that set the longest prefix wins.
//!
//! Prefixes are matched against a normalized path (percent-escapes decoded,
//! `//` merged, `.` and `..` resolved), so `/api/../actuator` or `/%61ctuator`
//! cannot slip past a `deny` route. The request is forwarded unchanged.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::config::{Route, RouteAction, RouteLimits};

/// A path that climbs above `/` with `..`: answered 400.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPath;

#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<String, Vec<Entry>>,
    any_host: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    prefix: Box<[u8]>,
    target: Target,
}

/// What a matched route says to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub action: RouteAction,
    pub limits: RouteLimits,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> RouteTable {
        let mut table = RouteTable::default();
        for r in routes {
            let entry = Entry {
                prefix: r.path.as_bytes().into(),
                target: Target {
                    action: r.action,
                    limits: r.limits,
                },
            };
            match &r.host {
                Some(h) => table.by_host.entry(h.clone()).or_default().push(entry),
                None => table.any_host.push(entry),
            }
        }
        // Longest first, so the first match is the longest.
        let by_len = |a: &Entry, b: &Entry| b.prefix.len().cmp(&a.prefix.len());
        table.any_host.sort_by(by_len);
        for entries in table.by_host.values_mut() {
            entries.sort_by(by_len);
        }
        table
    }

    /// The route for a request; `Ok(None)` when none matches.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Result<Option<Target>, BadPath> {
        let entries = host
            .map(normalize_host)
            .and_then(|h| self.by_host.get(h.as_ref()))
            .unwrap_or(&self.any_host);
        let path = normalize_path(path)?;
        Ok(entries
            .iter()
            .find(|e| path.starts_with(&e.prefix))
            .map(|e| e.target))
    }
}

/// Lower-case host without port or trailing dot.
fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The path as the backend will understand it, for prefix matching.
fn normalize_path(path: &str) -> Result<Cow<'_, [u8]>, BadPath> {
    let bytes = path.as_bytes();
    let clean = !bytes.contains(&b'%')
        && !path.contains("//")
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..");
    if clean {
        return Ok(Cow::Borrowed(bytes));
    }
    let decoded = percent_decode(bytes);
    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop().ok_or(BadPath)?;
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    // Keep a trailing slash: "/api/" must still match the "/api/" prefix.
    let trailing = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    Ok(Cow::Owned(out))
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: &str, action: RouteAction) -> Route {
        Route {
            host: host.map(str::to_string),
            path: path.to_string(),
            action,
            limits: RouteLimits::default(),
        }
    }

    fn action(
        t: &RouteTable,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<RouteAction>, BadPath> {
        t.resolve(host, path).map(|r| r.map(|t| t.action))
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route(None, "/", RouteAction::Proxy(0)),
            route(None, "/wp-admin/", RouteAction::Deny),
            route(Some("api.example.com"), "/api/", RouteAction::Proxy(1)),
            route(Some("api.example.com"), "/api/v2/ws", RouteAction::Proxy(2)),
            route(Some("api.example.com"), "/actuator", RouteAction::Deny),
        ])
    }

    #[test]
    fn host_then_longest_prefix() {
        let t = table();
        let r = |h: Option<&str>, p: &str| action(&t, h, p).unwrap();
        assert_eq!(r(Some("example.com"), "/x"), Some(RouteAction::Proxy(0)));
        assert_eq!(r(None, "/wp-admin/x"), Some(RouteAction::Deny));
        assert_eq!(
            r(Some("API.Example.com:8443"), "/api/v1"),
            Some(RouteAction::Proxy(1))
        );
        assert_eq!(
            r(Some("api.example.com."), "/api/v2/ws"),
            Some(RouteAction::Proxy(2))
        );
        assert_eq!(
            r(Some("api.example.com"), "/actuator/health"),
            Some(RouteAction::Deny)
        );
        // The api host has routes, so the host-less "/" does not apply to it.
        assert_eq!(r(Some("api.example.com"), "/other"), None);
    }

    #[test]
    fn normalization_closes_deny_bypasses() {
        let t = table();
        let r = |p: &str| action(&t, Some("api.example.com"), p);
        assert_eq!(r("/api/../actuator/env"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("//actuator"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/%61ctuator"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/api/./v2/ws"), Ok(Some(RouteAction::Proxy(2))));
        assert_eq!(r("/api/%2e%2e/actuator"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/../etc/passwd"), Err(BadPath));
    }

    #[test]
    fn path_normalization_keeps_shape() {
        let n = |p: &str| String::from_utf8(normalize_path(p).unwrap().into_owned()).unwrap();
        assert_eq!(n("/a//b/"), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/%"), "/%");
        assert_eq!(n("/%4"), "/%4");
        assert_eq!(n("/%41"), "/A");
        assert_eq!(n("/."), "/");
    }
}
