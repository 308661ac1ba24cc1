//! Request message framing: where a request's body ends (RFC 9112 §6),
//! decided once, before the request is routed, so that switchyard and the
//! backend behind it can never read the same bytes as different requests
//! (request smuggling).
//!
//! Pingora's HTTP/1 parser refuses most ambiguous framing by itself
//! (differing or malformed `Content-Length`, a last coding other than
//! `chunked`, `Transfer-Encoding` from an HTTP/1.0 client) and drops
//! `Content-Length` when `Transfer-Encoding` is present. What it passes on
//! unchanged is a `Content-Length` it accepted as several equal values
//! (`5` twice, or `5, 5`): the backend would get both, and may read them
//! differently. [`check`] applies every rule itself, without relying on
//! which of them Pingora's parser happened to enforce, and leaves exactly
//! one framing header on the request.

use std::fmt;

use pingora::http::RequestHeader;
use pingora::{Error, ErrorSource, ErrorType};

/// How a checked request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: neither `Content-Length` nor `Transfer-Encoding` (RFC 9112
    /// §6.3, rule 6: requests are never delimited by closing).
    Empty,
    /// Exactly this many bytes, from the one `Content-Length` left.
    Length(u64),
    /// Chunked transfer coding. `close`: the request also carried
    /// `Content-Length` (removed), so the connection must close after the
    /// answer (RFC 9112 §6.1).
    Chunked { close: bool },
}

/// Why a request's framing is refused. Every one is answered 400 and the
/// connection closed: the end of the request is unknown, so nothing after
/// it can be read as a request (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1).
    TransferEncodingInHttp10,
    /// The last transfer coding is not `chunked`, or `chunked` comes more
    /// than once (RFC 9112 §6.1, §6.3 rule 4).
    NotChunkedLast,
    /// A `Content-Length` that is not 1*DIGIT, overflows, or differs
    /// between lines or list members (RFC 9110 §8.6, RFC 9112 §6.3 rule 5).
    BadContentLength,
    /// A transfer coding other than `chunked` (`gzip, chunked`): switchyard
    /// does not decode it, and passed on the backend would get the coded
    /// bytes under `Transfer-Encoding: chunked` alone. 501 (RFC 9112 §6.1).
    UnknownCoding,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FramingError::TransferEncodingInHttp10 => "Transfer-Encoding in an HTTP/1.0 request",
            FramingError::NotChunkedLast => "the last transfer coding is not a single chunked",
            FramingError::BadContentLength => "invalid or conflicting Content-Length",
            FramingError::UnknownCoding => "a transfer coding other than chunked",
        })
    }
}

impl FramingError {
    /// The status the refusal is answered with: 501 for a coding switchyard
    /// does not implement, 400 for broken framing.
    pub fn status(self) -> u16 {
        match self {
            FramingError::UnknownCoding => 501,
            _ => 400,
        }
    }
}

/// A refused framing as the proxy's error: [`FramingError::status`], the
/// client's fault (so the connection is not reused and the refusal is
/// logged at debug only).
impl From<FramingError> for Box<Error> {
    fn from(e: FramingError) -> Box<Error> {
        Error::create(
            ErrorType::HTTPStatus(e.status()),
            ErrorSource::Downstream,
            Some(e.to_string().into()),
            None,
        )
    }
}

/// Checks the framing of an HTTP/1 request and leaves exactly one framing
/// header on `req`: with `Transfer-Encoding`, `Content-Length` is removed
/// (RFC 9112 §6.1); several equal `Content-Length` values become one
/// (RFC 9110 §8.6). Returns how the body is framed, or why the request must
/// be refused (400 or 501, then close). On an HTTP/2 request (framed by its
/// DATA frames; the h2 codec refuses `Transfer-Encoding`) only the
/// `Content-Length` rules apply and the returned framing says nothing.
pub fn check(req: &mut RequestHeader) -> Result<Framing, FramingError> {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        if req.version < http::Version::HTTP_11 {
            return Err(FramingError::TransferEncodingInHttp10);
        }
        transfer_codings(req)?;
        let close = req.remove_header(&http::header::CONTENT_LENGTH).is_some();
        return Ok(Framing::Chunked { close });
    }
    let Some(length) = content_length(req)? else {
        return Ok(Framing::Empty);
    };
    if req
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .count()
        > 1
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .map(|v| v.as_bytes())
            != Some(length.to_string().as_bytes())
    {
        req.insert_header(http::header::CONTENT_LENGTH, length)
            .map_err(|_| FramingError::BadContentLength)?;
    }
    Ok(Framing::Length(length))
}

/// Checks the transfer codings over every `Transfer-Encoding` line: they
/// must end in `chunked` and name it only once (RFC 9112 §6.3 rule 4, §6.1:
/// a sender must not apply chunked more than once), else 400; and be
/// `chunked` alone, the only coding switchyard implements, else 501
/// (RFC 9112 §6.1). Codings are case-insensitive tokens (RFC 9110 §10.1.4);
/// an empty list member is skipped (RFC 9110 §5.6.1).
fn transfer_codings(req: &RequestHeader) -> Result<(), FramingError> {
    let mut codings = Vec::new();
    for line in req.headers.get_all(http::header::TRANSFER_ENCODING) {
        for coding in line.as_bytes().split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if !coding.is_empty() {
                codings.push(coding);
            }
        }
    }
    let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    if !codings.last().is_some_and(|c| chunked(c))
        || codings.iter().filter(|c| chunked(c)).count() != 1
    {
        return Err(FramingError::NotChunkedLast);
    }
    match codings.len() {
        1 => Ok(()),
        _ => Err(FramingError::UnknownCoding),
    }
}

/// The one value of every `Content-Length` line and list member (RFC 9110
/// §8.6: 1*DIGIT; equal duplicates may stand for one), `None` without the
/// header.
fn content_length(req: &RequestHeader) -> Result<Option<u64>, FramingError> {
    let mut length = None;
    for line in req.headers.get_all(http::header::CONTENT_LENGTH) {
        for member in line.as_bytes().split(|&b| b == b',') {
            let digits = member.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(FramingError::BadContentLength);
            }
            let n = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or(FramingError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(FramingError::BadContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/", None).unwrap();
        r.set_version(version);
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn v11(headers: &[(&str, &str)]) -> RequestHeader {
        req(http::Version::HTTP_11, headers)
    }

    fn lengths(r: &RequestHeader) -> Vec<&[u8]> {
        r.headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    #[test]
    fn no_framing_header_is_no_body() {
        assert_eq!(check(&mut v11(&[])), Ok(Framing::Empty));
    }

    #[test]
    fn equal_content_lengths_become_one() {
        for headers in [
            &[("content-length", "5"), ("content-length", "5")][..],
            &[("content-length", "5, 5")],
            &[("content-length", " 5 ")],
        ] {
            let mut r = v11(headers);
            assert_eq!(check(&mut r), Ok(Framing::Length(5)), "{headers:?}");
            assert_eq!(lengths(&r), [b"5"], "{headers:?}");
        }
        let mut r = v11(&[("content-length", "5")]);
        assert_eq!(check(&mut r), Ok(Framing::Length(5)));
        assert_eq!(lengths(&r), [b"5"]);
    }

    #[test]
    fn bad_content_lengths_are_refused() {
        for value in [
            "+5",
            "-5",
            "0x5",
            "5 5",
            "5,6",
            "5,",
            "",
            "99999999999999999999999",
        ] {
            assert_eq!(
                check(&mut v11(&[("content-length", value)])),
                Err(FramingError::BadContentLength),
                "{value:?}"
            );
        }
        let two = [("content-length", "5"), ("content-length", "6")];
        assert_eq!(check(&mut v11(&two)), Err(FramingError::BadContentLength));
    }

    #[test]
    fn transfer_encoding_wins_and_closes() {
        let mut r = v11(&[("content-length", "4"), ("transfer-encoding", "chunked")]);
        assert_eq!(check(&mut r), Ok(Framing::Chunked { close: true }));
        assert!(lengths(&r).is_empty());
        for te in [
            &["chunked"][..],
            &["CHUNKED"],
            &[" chunked "],
            &[", chunked"],
        ] {
            let headers: Vec<(&str, &str)> = te.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert_eq!(
                check(&mut v11(&headers)),
                Ok(Framing::Chunked { close: false }),
                "{te:?}"
            );
        }
    }

    #[test]
    fn transfer_codings_not_ending_in_one_chunked_are_refused() {
        for te in [
            &["xchunked"][..],
            &["chunked, identity"],
            &["chunked", "identity"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["\"chunked\""],
            &[""],
        ] {
            let headers: Vec<(&str, &str)> = te.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert_eq!(
                check(&mut v11(&headers)),
                Err(FramingError::NotChunkedLast),
                "{te:?}"
            );
        }
    }

    #[test]
    fn other_transfer_codings_are_not_implemented() {
        for te in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["identity, chunked"],
        ] {
            let headers: Vec<(&str, &str)> = te.iter().map(|v| ("transfer-encoding", *v)).collect();
            let refused = check(&mut v11(&headers));
            assert_eq!(refused, Err(FramingError::UnknownCoding), "{te:?}");
            assert_eq!(FramingError::UnknownCoding.status(), 501);
        }
    }

    #[test]
    fn transfer_encoding_from_http10_is_refused() {
        let mut r = req(http::Version::HTTP_10, &[("transfer-encoding", "chunked")]);
        assert_eq!(check(&mut r), Err(FramingError::TransferEncodingInHttp10));
    }
}
