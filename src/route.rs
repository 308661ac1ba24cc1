//! Request routing: host + path → service or action.
//!
//! Hosts work like nginx server blocks: when any route names the request's
//! host, only that host's routes are considered; requests for other hosts use
//! the routes without a host.
//!
//! Paths are matched the way the backends will read them (Tomcat/Spring,
//! Node/Next.js, uvicorn), so a `deny` route cannot be walked around with a
//! spelling one of them resolves differently ([`normalize_path`]):
//! percent-escapes are decoded once, `;parameters` are dropped from every
//! segment (Tomcat does so before resolving dot segments), `//` is merged and
//! `.`/`..` are resolved (RFC 3986 §5.2.4). A path whose meaning differs
//! between backends is refused ([`BadPath`], answered 400). Normalizing is
//! for matching only: the path goes upstream as the client sent it.
//!
//! A route path is a prefix of the normalized path, in which a `*` segment
//! stands for exactly one whole, non-empty segment. Among the routes that
//! match, the most specific wins ([`Entry::specificity`]): segment by segment
//! from the left, a literal beats `*`, and a longer match beats a shorter one.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

use crate::config::{Route, RouteAction, RouteLimits};

/// Why a request path is refused with 400 before routing: backends would not
/// agree on what it names, so no route decision about it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// `..` climbs above `/` (RFC 3986 §5.2.4 leaves this to the server).
    #[error("the path climbs above /")]
    AboveRoot,
    /// A dot segment spelled with escapes (`%2e`, `.%2E`) or carrying
    /// parameters (`..;x`, `.;`): Tomcat resolves these, others do not. Also
    /// a `..` right after an empty segment (`//..`, `/;x/..`): Tomcat merges
    /// `//` first, RFC 3986 resolution does not, so they climb differently.
    #[error("a dot segment with escapes or ;parameters")]
    DotSegment,
    /// An encoded `/` (`%2f`) or a `\` in any spelling: some backends split
    /// segments on them, others do not.
    #[error("an encoded / or a \\")]
    Separator,
    /// A NUL or other control byte once decoded.
    #[error("a control byte")]
    ControlByte,
    /// An escape of an escape of a dangerous byte (`%252e`, `%%32%65`): a
    /// backend or application that decodes twice would see a `.`, `/`, `;`
    /// or control byte that routing did not.
    #[error("a double-encoded special byte")]
    DoubleEncoded,
    /// A `%` not followed by two hex digits, or escapes that are not UTF-8
    /// (this includes overlong forms such as `%c0%ae`); Tomcat and Node
    /// refuse these themselves, uvicorn replaces them.
    #[error("a malformed percent-escape or non-UTF-8 bytes")]
    BadEscape,
}

/// Routes grouped by host, ready to match requests.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<String, Vec<Entry>>,
    any_host: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The configured path; for a route without `*` the whole match is
    /// `path.starts_with(prefix)`.
    prefix: Box<[u8]>,
    /// The path's segments after the leading `/` (`/api/` is `api`, ``).
    segments: Box<[Segment]>,
    /// Whether any segment is `*`: then matching walks the segments.
    wildcard: bool,
    target: Target,
}

#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<[u8]>),
    /// `*`: one whole, non-empty segment.
    Any,
}

/// How one route segment covered the request path's segment at the same
/// position, from least to most specific (the variant order is the rank).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fit {
    /// The route has no segment here: it ended before.
    Ended,
    /// A literal that is only the beginning of the segment (the end of a
    /// prefix like `/api/v`, or the empty segment after `/api/`); a longer
    /// beginning is more specific.
    Partial(usize),
    /// `*`.
    Any,
    /// A literal equal to the whole segment.
    Whole,
}

/// What a matched route says to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub action: RouteAction,
    pub limits: RouteLimits,
    /// The route's index in the configuration (`Config::routes`), which
    /// names it in metrics and logs.
    pub index: usize,
}

impl RouteTable {
    /// Builds the table from validated routes (see [`route_path_error`]).
    pub fn new(routes: &[Route]) -> RouteTable {
        let mut table = RouteTable::default();
        for (index, r) in routes.iter().enumerate() {
            let entry = Entry::new(
                &r.path,
                Target {
                    action: r.action,
                    limits: r.limits,
                    index,
                },
            );
            match &r.host {
                Some(h) => table.by_host.entry(h.clone()).or_default().push(entry),
                None => table.any_host.push(entry),
            }
        }
        table
    }

    /// The route for a request: `Ok(None)` when none matches, `Err` when the
    /// path must be refused with 400. `host` is the request's canonical host
    /// ([`crate::host::Authority::host`]: validated, lower-case, no port, no
    /// trailing dot), `None` for an HTTP/1.0 request without one.
    /// Allocation-free unless the path needs normalizing.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Result<Option<Target>, BadPath> {
        let entries = host
            .and_then(|h| self.by_host.get(h))
            .unwrap_or(&self.any_host);
        let path = normalize_path(path)?;
        let mut best: Option<&Entry> = None;
        for e in entries.iter().filter(|e| e.matches(&path)) {
            best = match best {
                Some(b) if b.specificity(e, &path) == Ordering::Greater => Some(b),
                _ => Some(e),
            };
        }
        Ok(best.map(|e| e.target))
    }
}

/// The route table with each route's name (`Route::label`), built from one
/// config: part of the snapshot a request loads once, so a request keeps
/// the routes it was matched against, and names its route after a reload.
#[derive(Debug, Default)]
pub struct Routes {
    pub table: RouteTable,
    /// Indexed like `Config::routes` (and [`Target::index`]).
    labels: Vec<String>,
}

impl Routes {
    /// The table and names of validated routes (see [`route_path_error`]).
    pub fn new(routes: &[Route]) -> Routes {
        Routes {
            table: RouteTable::new(routes),
            labels: routes.iter().map(Route::label).collect(),
        }
    }

    /// The name of the route with this index, as metrics and logs show it.
    pub fn label(&self, index: usize) -> Option<&str> {
        self.labels.get(index).map(String::as_str)
    }

    /// Every route's name, in config order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

impl Entry {
    fn new(path: &str, target: Target) -> Entry {
        let rest = path.strip_prefix('/').unwrap_or(path);
        let segments: Box<[Segment]> = rest
            .split('/')
            .map(|s| match s {
                "*" => Segment::Any,
                s => Segment::Literal(s.as_bytes().into()),
            })
            .collect();
        Entry {
            prefix: path.as_bytes().into(),
            wildcard: segments.contains(&Segment::Any),
            segments,
            target,
        }
    }

    /// Whether the route covers the normalized `path`: it is a prefix of the
    /// path where each `*` matched one whole, non-empty segment.
    fn matches(&self, path: &[u8]) -> bool {
        if !self.wildcard {
            return path.starts_with(&self.prefix);
        }
        let Some(rest) = path.strip_prefix(b"/") else {
            return false;
        };
        let mut parts = rest.split(|&b| b == b'/');
        let last = self.segments.len().saturating_sub(1);
        self.segments.iter().enumerate().all(|(i, seg)| {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Segment::Any => !part.is_empty(),
                Segment::Literal(lit) if i == last => part.starts_with(lit),
                Segment::Literal(lit) => part == &lit[..],
            }
        })
    }

    /// How this route's segment `i` covered `part`, the path's segment `i`;
    /// only meaningful when the route matched.
    fn fit(&self, i: usize, part: &[u8]) -> Fit {
        match self.segments.get(i) {
            None => Fit::Ended,
            Some(Segment::Any) => Fit::Any,
            Some(Segment::Literal(lit)) if lit.len() == part.len() => Fit::Whole,
            Some(Segment::Literal(lit)) => Fit::Partial(lit.len()),
        }
    }

    /// Which of two routes that both match `path` is more specific: compared
    /// segment by segment from the left, at the first segment where they
    /// differ a whole literal beats `*`, `*` beats a literal that is only the
    /// beginning of the segment, a longer beginning beats a shorter one, and
    /// a route that goes on beats one that ended. For routes without `*`
    /// this is "the longest prefix wins". Distinct routes never tie.
    fn specificity(&self, other: &Entry, path: &[u8]) -> Ordering {
        if !self.wildcard && !other.wildcard {
            return self.prefix.len().cmp(&other.prefix.len());
        }
        let rest = path.strip_prefix(b"/").unwrap_or(path);
        let n = self.segments.len().max(other.segments.len());
        for (i, part) in rest.split(|&b| b == b'/').take(n).enumerate() {
            let order = self.fit(i, part).cmp(&other.fit(i, part));
            if order != Ordering::Equal {
                return order;
            }
        }
        Ordering::Equal
    }
}

/// Why a configured route path could never match a normalized request path,
/// or misuses `*`; `None` when it is fine. The caller checks the leading `/`.
pub fn route_path_error(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if seg.contains('*') && *seg != "*" {
            return Some(format!(
                "`*` must be a whole segment (it matches exactly one segment, as in \"/api/*/stream\"), not part of {seg:?}"
            ));
        }
        if let Some(c) = seg
            .chars()
            .find(|&c| matches!(c, '%' | ';' | '\\' | '?' | '#') || c.is_control())
        {
            return Some(format!(
                "{c:?} can never match: requests are matched decoded, without ;parameters or query; write the plain path"
            ));
        }
        if seg.is_empty() && !last {
            return Some(
                "an empty segment (\"//\") can never match: requests are matched with \"//\" merged"
                    .into(),
            );
        }
        if *seg == "." || *seg == ".." {
            return Some(format!(
                "a {seg:?} segment can never match: requests are matched with dot segments resolved"
            ));
        }
    }
    None
}

/// The path as the backends will read it, for matching; borrowed (no
/// allocation) when it needs no change.
///
/// Each segment is percent-decoded once and cut at its first `;` (Tomcat's
/// path parameters, encoded or not); empty segments are dropped, `.` and `..`
/// resolved, and a trailing `/` kept. Refused ([`BadPath`]): a dot segment
/// spelled any other way than `.`/`..`, an encoded `/` or any `\`, a control
/// byte, a double-encoded special byte, a malformed escape or non-UTF-8
/// bytes, and `..` above the root. A path that does not start with `/` (such
/// as `*`) is returned unchanged and matches no route.
pub fn normalize_path(path: &str) -> Result<Cow<'_, [u8]>, BadPath> {
    let bytes = path.as_bytes();
    let Some(rest) = bytes.strip_prefix(b"/") else {
        return Ok(Cow::Borrowed(bytes));
    };
    if is_clean(rest) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut decoded = Vec::new();
    // Whether the last segment added nothing, so the path ends with '/'.
    let mut trailing = false;
    // Whether an empty segment was dropped since the last name was added or
    // removed: a `..` now would remove it for a backend that keeps empty
    // segments (RFC 3986, Node's URL) but the name before it for one that
    // merges them first (Tomcat).
    let mut dropped_empty = false;
    for raw in rest.split(|&b| b == b'/') {
        decode_segment(raw, &mut decoded)?;
        let name = decoded.split(|&b| b == b';').next().unwrap_or_default();
        trailing = true;
        match name {
            b"" => dropped_empty = true,
            b"." | b".." if raw != name => return Err(BadPath::DotSegment),
            b"." => {}
            b".." if dropped_empty => return Err(BadPath::DotSegment),
            b".." => {
                let parent = out
                    .iter()
                    .rposition(|&b| b == b'/')
                    .ok_or(BadPath::AboveRoot)?;
                out.truncate(parent);
            }
            name => {
                out.push(b'/');
                out.extend_from_slice(name);
                trailing = false;
                dropped_empty = false;
            }
        }
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    Ok(Cow::Owned(out))
}

/// Whether the path after its leading `/` is already normalized: plain
/// visible ASCII without `%`, `;` or `\`, no empty segment but the last, no
/// dot segment. One pass over the bytes.
fn is_clean(rest: &[u8]) -> bool {
    // Length of the current segment, and whether it is all dots so far.
    let mut len = 0;
    let mut dots = true;
    for &b in rest {
        match b {
            b'/' => {
                if len == 0 || (dots && len <= 2) {
                    return false;
                }
                len = 0;
                dots = true;
            }
            b'%' | b';' | b'\\' => return false,
            b if b.is_ascii_graphic() => {
                len += 1;
                dots &= b == b'.';
            }
            _ => return false,
        }
    }
    !(dots && (1..=2).contains(&len))
}

/// Percent-decodes one segment into `out` and checks what it decodes to.
fn decode_segment(raw: &[u8], out: &mut Vec<u8>) -> Result<(), BadPath> {
    out.clear();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            out.push(escape_at(raw, i).ok_or(BadPath::BadEscape)?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'/' | b'\\' => return Err(BadPath::Separator),
            b if b.is_ascii_control() => return Err(BadPath::ControlByte),
            b'%' if escape_at(out, i).is_some_and(is_special) => {
                return Err(BadPath::DoubleEncoded)
            }
            _ => {}
        }
    }
    if !out.is_ascii() && std::str::from_utf8(out).is_err() {
        return Err(BadPath::BadEscape);
    }
    Ok(())
}

/// The byte of the `%XX` escape at `bytes[i]`, if it is one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    let hex = |b: &u8| (*b as char).to_digit(16);
    let high = bytes.get(i + 1).and_then(hex)?;
    let low = bytes.get(i + 2).and_then(hex)?;
    u8::try_from(high * 16 + low).ok()
}

/// Bytes that change a path's structure or meaning when a second decoding
/// produces them.
fn is_special(b: u8) -> bool {
    matches!(b, b'.' | b'/' | b'\\' | b';' | b'%') || b.is_ascii_control() || !b.is_ascii()
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
            route(Some("api.example.com"), "/webjars/", RouteAction::Deny),
        ])
    }

    #[test]
    fn host_then_longest_prefix() {
        let t = table();
        let r = |h: Option<&str>, p: &str| action(&t, h, p).unwrap();
        assert_eq!(r(Some("example.com"), "/x"), Some(RouteAction::Proxy(0)));
        assert_eq!(r(None, "/wp-admin/x"), Some(RouteAction::Deny));
        assert_eq!(
            r(Some("api.example.com"), "/api/v1"),
            Some(RouteAction::Proxy(1))
        );
        assert_eq!(
            r(Some("api.example.com"), "/api/v2/ws"),
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
        assert_eq!(r("/../etc/passwd"), Err(BadPath::AboveRoot));
        // Tomcat drops ;params from every segment: /actuator;x/env is /actuator/env.
        assert_eq!(r("/actuator;x/env"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/webjars;a=b/x.js"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/webjars%3b/x.js"), Ok(Some(RouteAction::Deny)));
        assert_eq!(r("/api/;x/actuator;y"), Ok(Some(RouteAction::Proxy(1))));
        assert_eq!(r("/api/v1/../../webjars/x"), Ok(Some(RouteAction::Deny)));
    }

    /// Every spelling of a dot segment other than a plain `.` or `..`, at the
    /// start, in the middle and at the end, with and without repeated and
    /// trailing slashes: refused.
    #[test]
    fn odd_dot_segments_are_refused_wherever_they_are() {
        let t = table();
        let dots = [
            "..;",
            "..;x",
            "..;jsessionid=x",
            "..;/",
            ".;",
            ".;x",
            "%2e%2e",
            "%2E%2E",
            "%2e%2E",
            ".%2e",
            "%2e.",
            ".%2E",
            "%2E.",
            "%2e",
            "%2E",
            "%2e%2e;",
            "%2e%2e;x",
            "..%3b",
            "..%3Bx",
            ".%3b",
            "%2e;",
            "..;;",
            "..;=",
            "..;%2e",
        ];
        for dot in dots {
            for form in [
                format!("/{dot}/actuator/env"),
                format!("/api/{dot}/actuator/env"),
                format!("/api/v1/{dot}/{dot}/actuator"),
                format!("/api//{dot}//actuator"),
                format!("/api/{dot}"),
                format!("/api/{dot}/"),
                format!("/api/v1/{dot}//"),
                format!("//{dot}"),
            ] {
                assert_eq!(
                    action(&t, Some("api.example.com"), &form),
                    Err(BadPath::DotSegment),
                    "{form}"
                );
            }
        }
        // `..` after an empty segment removes the empty segment for some
        // backends and the one before it for others.
        for p in [
            "/api//../actuator",
            "/api/v1//../../actuator",
            "/api/;x/../actuator",
            "/api//./../actuator",
            "/api/%3bx/../actuator",
            "//../actuator",
        ] {
            assert_eq!(
                action(&t, Some("api.example.com"), p),
                Err(BadPath::DotSegment),
                "{p}"
            );
        }
        // The inputs, literally.
        for p in [
            "/api/..;/actuator/env",
            "/api/..;jsessionid=x/actuator/env",
            "/api/%2e%2e;/actuator/env",
            "/api/v1/..;/..;/actuator/env",
            "/api/.;x/",
            "/api/..;",
        ] {
            assert_eq!(
                action(&t, Some("api.example.com"), p),
                Err(BadPath::DotSegment),
                "{p}"
            );
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let t = table();
        let r = |p: &str| action(&t, Some("api.example.com"), p);
        for p in [
            "/api%2factuator",
            "/api/x%2F..%2Factuator",
            "/api%5c..%5cactuator",
        ] {
            assert_eq!(r(p), Err(BadPath::Separator), "{p}");
        }
        assert_eq!(r("/api\\..\\actuator"), Err(BadPath::Separator));
        assert_eq!(r("/api/\\"), Err(BadPath::Separator));
        for p in [
            "/api/%00",
            "/api/..%00/actuator",
            "/api/x%0a",
            "/api/%7f",
            "/api/%1b",
        ] {
            assert_eq!(r(p), Err(BadPath::ControlByte), "{p}");
        }
        for p in [
            "/api/%252e%252e/actuator",
            "/api/%252E/",
            "/api/%252f",
            "/api/%255c",
            "/api/%253b",
            "/api/%2500",
            "/api/%25c0%25ae",
        ] {
            assert_eq!(r(p), Err(BadPath::DoubleEncoded), "{p}");
        }
        for p in [
            "/api/%",
            "/api/%4",
            "/api/%zz",
            "/api/%c0%ae%c0%ae/actuator",
            "/api/%c0%af",
            "/api/%ff",
        ] {
            assert_eq!(r(p), Err(BadPath::BadEscape), "{p}");
        }
        for p in [
            "/..",
            "/../",
            "/api/../..",
            "/api/v1/../../..;",
            "/api/%%32%65%%32%65/actuator",
            "/api/%2%65/",
        ] {
            assert!(r(p).is_err(), "{p}");
        }
        assert_eq!(r("/api/v1/../../.."), Err(BadPath::AboveRoot));
    }

    #[test]
    fn look_alikes_are_allowed() {
        let t = table();
        let r = |p: &str| action(&t, Some("api.example.com"), p);
        for p in [
            "/api/v1/a..b",
            "/api/...",
            "/api/..a",
            "/api/a..",
            "/api/.well-known",
            "/api/;x",
            "/api/x;y",
            "/api/v1/%2e%2ex",
            "/api/%E2%82%AC",
            "/api/100%25",
            "/api/%2541",
            "/api/a%20b",
            "/api/v2/ws/../x",
        ] {
            assert_eq!(r(p), Ok(Some(RouteAction::Proxy(1))), "{p}");
        }
    }

    #[test]
    fn path_normalization_keeps_shape() {
        let n = |p: &str| String::from_utf8(normalize_path(p).unwrap().into_owned()).unwrap();
        assert_eq!(n("/a//b/"), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/%41"), "/A");
        assert_eq!(n("/."), "/");
        assert_eq!(n("/a;x/b;y=1;z"), "/a/b");
        assert_eq!(n("/a/;x"), "/a/");
        assert_eq!(n("/a/;x/b"), "/a/b");
        assert_eq!(n("/a/./b/./"), "/a/b/");
        assert_eq!(n("/a/b/../c"), "/a/c");
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn clean_paths_are_borrowed() {
        for p in [
            "/",
            "/api/",
            "/api/v1/meetings",
            "/a..b/.x/x./...",
            "/a-b_c~d!$&'()*+,=:@",
        ] {
            assert!(
                matches!(normalize_path(p), Ok(Cow::Borrowed(_))),
                "{p} was copied"
            );
        }
        for p in [
            "//", "/a/.", "/a/..", "/./", "/a/../", "/%41", "/a;b", "/a\\b",
        ] {
            assert!(
                !matches!(normalize_path(p), Ok(Cow::Borrowed(_))),
                "{p} was not normalized"
            );
        }
    }

    fn patterns() -> RouteTable {
        let h = Some("h");
        RouteTable::new(&[
            route(h, "/api/", RouteAction::Proxy(0)),
            route(h, "/api/v1/meetings/", RouteAction::Proxy(1)),
            route(
                h,
                "/api/v1/meetings/*/settlement/progress/stream",
                RouteAction::Proxy(2),
            ),
            route(h, "/api/*/internal/", RouteAction::Deny),
            route(h, "/api/v1/", RouteAction::Proxy(3)),
            route(h, "/api/v1/*/x", RouteAction::Proxy(4)),
            route(h, "/api/v1/me", RouteAction::Proxy(5)),
            route(h, "/files/*", RouteAction::Proxy(6)),
        ])
    }

    #[test]
    fn star_matches_exactly_one_whole_segment() {
        let t = patterns();
        let r = |p: &str| action(&t, Some("h"), p).unwrap();
        let stream = Some(RouteAction::Proxy(2));
        assert_eq!(r("/api/v1/meetings/42/settlement/progress/stream"), stream);
        assert_eq!(
            r("/api/v1/meetings/a-b.c/settlement/progress/stream"),
            stream
        );
        // A prefix like any route: what follows is covered too.
        assert_eq!(
            r("/api/v1/meetings/42/settlement/progress/stream/x"),
            stream
        );
        // Normalized first.
        assert_eq!(
            r("/api/v1//meetings/42/./settlement/progress/stream"),
            stream
        );
        assert_eq!(
            r("/api/v1/meetings/42;x/settlement/progress/stream"),
            stream
        );
        // `*` is one non-empty segment: not zero, not two.
        let meetings = Some(RouteAction::Proxy(1));
        assert_eq!(r("/api/v1/meetings//settlement/progress/stream"), meetings);
        assert_eq!(r("/api/v1/meetings/settlement/progress/stream"), meetings);
        assert_eq!(
            r("/api/v1/meetings/4/2/settlement/progress/stream"),
            meetings
        );
        assert_eq!(r("/api/v1/meetings/42/settlement/progress"), meetings);
        assert_eq!(r("/api/v1/meetings/42/settlement"), meetings);
        // A trailing `*` needs a segment.
        assert_eq!(r("/files/"), None);
        assert_eq!(r("/files/a"), Some(RouteAction::Proxy(6)));
        assert_eq!(r("/files/a/b"), Some(RouteAction::Proxy(6)));
    }

    #[test]
    fn precedence_literal_beats_star_then_longer_wins() {
        let t = patterns();
        let r = |p: &str| action(&t, Some("h"), p).unwrap();
        // `*` beats the empty end of "/api/v1/meetings/".
        assert_eq!(
            r("/api/v1/meetings/7/settlement/progress/stream"),
            Some(RouteAction::Proxy(2))
        );
        // The literal "v1" beats `*` although "/api/*/internal/" is longer.
        assert_eq!(r("/api/v1/internal/y"), Some(RouteAction::Proxy(3)));
        assert_eq!(r("/api/v2/internal/x"), Some(RouteAction::Deny));
        assert_eq!(r("/api/v2/other"), Some(RouteAction::Proxy(0)));
        // "/api/v1/*/x" beats "/api/v1/": same up to "v1", then `*` beats the
        // empty end; a whole literal ("me") beats `*`; `*` beats a partial
        // literal ("me" of "meat").
        assert_eq!(r("/api/v1/abc/x"), Some(RouteAction::Proxy(4)));
        assert_eq!(r("/api/v1/me/x"), Some(RouteAction::Proxy(5)));
        assert_eq!(r("/api/v1/meat/x"), Some(RouteAction::Proxy(4)));
        assert_eq!(r("/api/v1/meat"), Some(RouteAction::Proxy(5)));
        // Order in the file does not matter.
        let mut routes = vec![
            route(None, "/api/v1/*/x", RouteAction::Proxy(4)),
            route(None, "/api/v1/me", RouteAction::Proxy(5)),
            route(None, "/api/v1/", RouteAction::Proxy(3)),
        ];
        for _ in 0..3 {
            routes.rotate_left(1);
            let t = RouteTable::new(&routes);
            let r = |p: &str| action(&t, None, p).unwrap();
            assert_eq!(r("/api/v1/abc/x"), Some(RouteAction::Proxy(4)));
            assert_eq!(r("/api/v1/me/x"), Some(RouteAction::Proxy(5)));
            assert_eq!(r("/api/v1/meat/x"), Some(RouteAction::Proxy(4)));
            assert_eq!(r("/api/v1/abc/y"), Some(RouteAction::Proxy(3)));
        }
    }

    #[test]
    fn route_path_errors() {
        assert_eq!(route_path_error("/api/*/stream"), None);
        assert_eq!(route_path_error("/*"), None);
        assert_eq!(route_path_error("/"), None);
        assert_eq!(route_path_error("/api/"), None);
        for bad in [
            "/api/v*/x",
            "/api/**/x",
            "/api*",
            "/a/*b",
            "/a%2e",
            "/a;b",
            "/a\\b",
            "/a?x",
            "/a#x",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/a/..",
            "/a/\u{1}",
        ] {
            assert!(route_path_error(bad).is_some(), "{bad}");
        }
        assert!(route_path_error("/api/v*/x")
            .unwrap()
            .contains("whole segment"));
    }

    /// The shipped config routes the settlement stream, and only it, with the
    /// 31-minute read timeout.
    #[test]
    fn shipped_config_routes_the_settlement_stream_exactly() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/switchyard.toml");
        let config = crate::config::Config::load(&path).expect("shipped config is valid");
        let t = RouteTable::new(&config.routes);
        let timeout = |p: &str| {
            t.resolve(Some("api.moyeobab.com"), p)
                .unwrap()
                .unwrap()
                .limits
                .read_timeout
        };
        let long = std::time::Duration::from_secs(31 * 60);
        assert_eq!(
            timeout("/api/v1/meetings/42/settlement/progress/stream"),
            long
        );
        for p in [
            "/api/v1/meetings/42",
            "/api/v1/meetings/42/settlement",
            "/api/v1/meetings/",
            "/api/v1/users/1",
        ] {
            assert_eq!(timeout(p), crate::config::DEFAULT_READ_TIMEOUT, "{p}");
        }
    }
}
