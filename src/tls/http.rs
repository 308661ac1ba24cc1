//! What HTTP requests see of TLS. On the plain listener: ACME HTTP-01
//! challenge answers, before anything else, and the redirect to https for
//! hosts a certificate covers. On the HTTPS listener: the
//! `Strict-Transport-Security` header. The proxy phases call these.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, STRICT_TRANSPORT_SECURITY,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, HttpModules, Module};
use pingora::prelude::*;

use crate::host::{self, Authority};
use crate::respond;
use crate::tls::challenge::Challenges;
use crate::tls::store::CertStore;

/// The default HTTPS port, left out of redirect URLs (RFC 9110 §4.2.2).
pub const HTTPS_DEFAULT_PORT: u16 = 443;

/// Which listener a proxy instance serves, and what TLS asks of it.
pub enum Side {
    /// Plain HTTP, no TLS configured at all: requests are left alone (a
    /// backend may serve `/.well-known/acme-challenge/` itself).
    PlainOnly,
    /// Plain HTTP beside HTTPS or ACME.
    Plain(Plain),
    /// The HTTPS listener.
    Https(Https),
}

/// The plain listener's duties when TLS is configured.
pub struct Plain {
    challenges: Arc<Challenges>,
    certs: Arc<CertStore>,
    /// The HTTPS port redirects go to; `None`: no redirect
    /// (`tls.redirect_http = false` or no HTTPS listener).
    redirect_port: Option<u16>,
}

/// What the plain listener answers by itself, before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainAnswer {
    /// `/.well-known/acme-challenge/...`: the key authorization of a pending
    /// token, or `None` (404) for any other token.
    Challenge(Option<String>),
    /// 301 to this `https://` URL.
    Redirect(HeaderValue),
}

impl Plain {
    /// `redirect_port`: the HTTPS port when `tls.redirect_http` is on.
    pub fn new(
        challenges: Arc<Challenges>,
        certs: Arc<CertStore>,
        redirect_port: Option<u16>,
    ) -> Plain {
        Plain {
            challenges,
            certs,
            redirect_port,
        }
    }

    /// A challenge request's answer (RFC 8555 §8.3). Asked first, before
    /// the request's host is even validated: the CA's request carries a
    /// valid `Host`, the answer is the same whatever host is named (a token
    /// is unique), and it is public anyway, so no host rule, redirect, rate
    /// limit or maintenance mode may come in the way of a validation.
    pub fn challenge(&self, req: &RequestHeader) -> Option<PlainAnswer> {
        let path = req.uri.path().as_bytes();
        Challenges::is_challenge_path(path)
            .then(|| PlainAnswer::Challenge(self.challenges.answer(path)))
    }

    /// The redirect for a request to `authority` (RFC 9110 §15.4.2), when
    /// some certificate covers its host: the same host and target (path and
    /// query) on https, with the HTTPS port unless it is 443. A target that
    /// cannot be a header value is answered as it would be on plain HTTP:
    /// not redirected.
    pub fn redirect(
        &self,
        req: &RequestHeader,
        authority: Option<&Authority>,
    ) -> Option<PlainAnswer> {
        let port = self.redirect_port?;
        let authority = authority?;
        if !self.certs.covers(authority.host()) {
            return None;
        }
        let target = req.raw_path();
        // `OPTIONS *` asks about the server, not a resource (RFC 9112
        // §3.2.4): there is no URL to send it to.
        if target == b"*" {
            return None;
        }
        // An absolute-form target names its own authority: keep only its
        // path and query (the host is the authority's).
        let origin = host::origin_form(target);
        let target = origin.as_deref().unwrap_or(target);
        let mut url = format!("https://{}", authority.host()).into_bytes();
        if port != HTTPS_DEFAULT_PORT {
            url.extend_from_slice(format!(":{port}").as_bytes());
        }
        if !target.starts_with(b"/") {
            url.push(b'/');
        }
        url.extend_from_slice(target);
        HeaderValue::from_bytes(&url)
            .ok()
            .map(PlainAnswer::Redirect)
    }
}

/// Writes `answer`, as the other local answers: `Server` and
/// `X-Request-Id`, the connection kept alive where the client allows it.
pub async fn send(
    session: &mut Session,
    request_id: &HeaderValue,
    answer: PlainAnswer,
) -> Result<()> {
    let (status, content_type, body, location) = match answer {
        PlainAnswer::Challenge(Some(key_authorization)) => (
            200,
            Some("text/plain"),
            Bytes::from(key_authorization),
            None,
        ),
        PlainAnswer::Challenge(None) => (
            404,
            Some("text/plain"),
            Bytes::from_static(b"unknown ACME challenge token\n"),
            None,
        ),
        PlainAnswer::Redirect(url) => (301, None, Bytes::new(), Some(url)),
    };
    let mut resp = ResponseHeader::build(status, Some(5))?;
    if let Some(content_type) = content_type {
        resp.insert_header(CONTENT_TYPE, content_type)?;
    }
    resp.insert_header(CONTENT_LENGTH, body.len())?;
    if let Some(url) = location {
        resp.insert_header(LOCATION, url)?;
    }
    respond::stamp(&mut resp, request_id)?;
    session
        .write_response_header(Box::new(resp), body.is_empty())
        .await?;
    if !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// The HTTPS listener's settings.
pub struct Https {
    /// `tls.hsts`: sent on every answer.
    hsts: Option<HeaderValue>,
}

impl Https {
    /// `hsts`: the `Strict-Transport-Security` value (RFC 6797 §6.1), if
    /// configured; a value that is not a valid header value is dropped.
    pub fn new(hsts: Option<&str>) -> Https {
        Https {
            hsts: hsts.and_then(|h| HeaderValue::from_str(h).ok()),
        }
    }

    /// Adds the HSTS module to the HTTPS proxy: a response-header filter
    /// that sees every answer, the backend's and switchyard's own refusals
    /// alike (RFC 6797 §7.1: on every response over secure transport).
    pub fn modules(&self, modules: &mut HttpModules) {
        if let Some(value) = &self.hsts {
            modules.add_module(Box::new(HstsBuilder(value.clone())));
        }
    }
}

struct HstsBuilder(HeaderValue);

impl HttpModuleBuilder for HstsBuilder {
    fn init(&self) -> Module {
        Box::new(Hsts(self.0.clone()))
    }
}

struct Hsts(HeaderValue);

#[async_trait]
impl HttpModule for Hsts {
    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        // The configured policy wins over a backend's own.
        resp.insert_header(STRICT_TRANSPORT_SECURITY, self.0.clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::tls::certs::self_signed;

    fn plain(redirect_port: Option<u16>) -> (Plain, Arc<Challenges>) {
        let tls = config::Tls {
            certs_dir: "certs".into(),
            redirect_http: true,
            hsts: None,
            handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
            default_certificate: None,
            certificates: vec![config::StaticCertificate {
                name: "site".into(),
                cert: "c.pem".into(),
                key: "c.key".into(),
            }],
        };
        let certs = Arc::new(CertStore::new(&tls, None));
        let cert = self_signed(&["site.example".into(), "*.wild.example".into()]).unwrap();
        assert!(certs.install("site", cert, false));
        let challenges = Arc::new(Challenges::new());
        (
            Plain::new(challenges.clone(), certs, redirect_port),
            challenges,
        )
    }

    fn req(target: &[u8], host: &str) -> (RequestHeader, Option<Authority>) {
        let mut r = RequestHeader::build("GET", target, None).unwrap();
        r.insert_header("host", host).unwrap();
        let a = host::request_authority(&r).unwrap();
        (r, a)
    }

    fn location(answer: Option<PlainAnswer>) -> Option<String> {
        match answer? {
            PlainAnswer::Redirect(url) => Some(url.to_str().unwrap().to_string()),
            other => panic!("not a redirect: {other:?}"),
        }
    }

    #[test]
    fn challenges_are_answered_for_any_host_and_unknown_tokens_get_none() {
        let (p, challenges) = plain(Some(443));
        challenges.insert("tok", "tok.thumb");
        let (r, _) = req(b"/.well-known/acme-challenge/tok", "nobody.example");
        assert_eq!(
            p.challenge(&r),
            Some(PlainAnswer::Challenge(Some("tok.thumb".into())))
        );
        let (r, _) = req(b"/.well-known/acme-challenge/other?x=1", "site.example");
        assert_eq!(p.challenge(&r), Some(PlainAnswer::Challenge(None)));
        let (r, _) = req(b"/.well-known/other", "site.example");
        assert_eq!(p.challenge(&r), None);
    }

    #[test]
    fn redirects_covered_hosts_keeping_target_and_port() {
        let (p, _) = plain(Some(8443));
        let (r, a) = req(b"/a/b?q=1&r", "Site.example:8080");
        assert_eq!(
            location(p.redirect(&r, a.as_ref())).as_deref(),
            Some("https://site.example:8443/a/b?q=1&r")
        );
        let (r, a) = req(b"/", "x.wild.example");
        assert_eq!(
            location(p.redirect(&r, a.as_ref())).as_deref(),
            Some("https://x.wild.example:8443/")
        );
        let (r, a) = req(b"http://site.example/p?q", "site.example");
        assert_eq!(
            location(p.redirect(&r, a.as_ref())).as_deref(),
            Some("https://site.example:8443/p?q")
        );
        // Not covered: a name no certificate has, two labels under the
        // wildcard, no host at all.
        for host in ["other.example", "a.b.wild.example"] {
            let (r, a) = req(b"/", host);
            assert_eq!(p.redirect(&r, a.as_ref()), None, "{host}");
        }
        let (r, _) = req(b"/", "site.example");
        assert_eq!(p.redirect(&r, None), None);
        // Asterisk form names no resource: answered as on plain HTTP.
        let mut r = RequestHeader::build("OPTIONS", b"*", None).unwrap();
        r.insert_header("host", "site.example").unwrap();
        let a = host::request_authority(&r).unwrap();
        assert_eq!(p.redirect(&r, a.as_ref()), None);
        // The default port is left out.
        let (p, _) = plain(Some(443));
        let (r, a) = req(b"/x", "site.example");
        assert_eq!(
            location(p.redirect(&r, a.as_ref())).as_deref(),
            Some("https://site.example/x")
        );
        // Redirect off.
        let (p, _) = plain(None);
        assert_eq!(p.redirect(&r, a.as_ref()), None);
    }
}
