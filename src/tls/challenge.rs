//! Pending ACME HTTP-01 challenges (RFC 8555 §8.3): the token the CA will
//! ask for at `/.well-known/acme-challenge/{token}` on port 80 and the key
//! authorization to answer with. The ACME client adds one before telling
//! the CA it is ready and removes it once the authorization is settled; the
//! plain HTTP listener answers from here before any routing, redirect,
//! limit or maintenance mode.

use std::collections::HashMap;
use std::sync::RwLock;

/// The path prefix the CA's validation requests use (RFC 8555 §8.3).
pub const PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// Tokens awaiting validation → their key authorizations.
#[derive(Debug, Default)]
pub struct Challenges {
    pending: RwLock<HashMap<String, String>>,
}

impl Challenges {
    pub fn new() -> Challenges {
        Challenges::default()
    }

    /// Answers `token` with `key_authorization` until [`Challenges::remove`].
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.pending
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.pending
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// Whether a request path is a challenge request at all: such requests
    /// are never routed, redirected or limited, whether or not the token is
    /// known.
    pub fn is_challenge_path(path: &[u8]) -> bool {
        path.starts_with(PATH_PREFIX.as_bytes())
    }

    /// The key authorization for the request path `path` (the raw path
    /// without query), if it names a pending token. Tokens are base64url
    /// (RFC 8555 §8.1), so the path is compared as is, undecoded.
    pub fn answer(&self, path: &[u8]) -> Option<String> {
        let token = std::str::from_utf8(path.strip_prefix(PATH_PREFIX.as_bytes())?).ok()?;
        self.pending
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_pending_tokens_only() {
        let c = Challenges::new();
        c.insert("tok_en-1", "tok_en-1.thumb");
        assert_eq!(
            c.answer(b"/.well-known/acme-challenge/tok_en-1").as_deref(),
            Some("tok_en-1.thumb")
        );
        assert_eq!(c.answer(b"/.well-known/acme-challenge/other"), None);
        assert_eq!(c.answer(b"/.well-known/acme-challenge/"), None);
        assert_eq!(c.answer(b"/tok_en-1"), None);
        assert!(Challenges::is_challenge_path(
            b"/.well-known/acme-challenge/x"
        ));
        c.remove("tok_en-1");
        assert_eq!(c.answer(b"/.well-known/acme-challenge/tok_en-1"), None);
    }
}
