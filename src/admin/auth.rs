//! Who may use the admin API: a bearer token compared in constant time, from
//! a client address on the allowlist. Without a token the API does not run.
//!
//! There may be several tokens, each with a name (`[[admin.tokens]]`, plus
//! `default` for `admin.token_file` and `env` for `$SWITCHYARD_ADMIN_TOKEN`):
//! the name of the token that authenticated a change is what the history
//! records as its actor (`token:NAME`).

use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config;

/// Environment variable that carries the token; it wins over `admin.token_file`.
pub const TOKEN_ENV: &str = "SWITCHYARD_ADMIN_TOKEN";
/// Shortest token accepted (16 bytes): anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;
/// The name of the token read from `admin.token_file`.
pub const DEFAULT_TOKEN_NAME: &str = config::RESERVED_TOKEN_NAMES[0];
/// The name of the token read from [`TOKEN_ENV`].
pub const ENV_TOKEN_NAME: &str = config::RESERVED_TOKEN_NAMES[1];

/// The admin secret. Never printed: `Debug` shows only its length.
#[derive(Clone)]
pub struct Token(Box<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

impl Token {
    /// Checks an `Authorization` header value. Constant time in the token's
    /// content; only its length can leak, which does not help a guesser.
    pub fn matches_header(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        bool::from(presented.trim_ascii().ct_eq(&self.0))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Every token the admin API accepts, each with its name. `Debug` shows
/// the names only.
#[derive(Clone)]
pub struct Tokens(Vec<(String, Token)>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Tokens {
    /// The name of the token an `Authorization: Bearer ...` value carries,
    /// `None` when it matches none. Every token is compared, in constant
    /// time in its content, whichever matches: the time taken says nothing
    /// about which token came close or which one matched (only the tokens'
    /// lengths could show, which does not help a guesser).
    pub fn identify(&self, header: Option<&[u8]>) -> Option<&str> {
        let presented = header
            .and_then(|h| h.strip_prefix(b"Bearer "))?
            .trim_ascii();
        // 1-based index of the match; 0: none. Values are distinct (checked
        // at load), so at most one matches.
        let mut found = 0u32;
        for (i, (_, token)) in self.0.iter().enumerate() {
            let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
            found.conditional_assign(&index, presented.ct_eq(&token.0));
        }
        let i = usize::try_from(found).ok()?.checked_sub(1)?;
        self.0.get(i).map(|(name, _)| name.as_str())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin token file {}: {source}", config::show_path(path))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "admin token file {} is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
        config::show_path(path),
        shell_quote(path)
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "admin token file {} is not a regular file; give the path of a file (mode 0600) that holds the token",
        config::show_path(path)
    )]
    NotAFile { path: PathBuf },
    #[error("admin token from {0} is {1} byte(s); use at least {MIN_TOKEN_LEN}. Make one with: {cmd}", cmd = create_token_command(Path::new("FILE")))]
    TooShort(String, usize),
    #[error(
        "admin token file {} of token {name:?} does not exist. Create it (mode 0600) with:\n  {}",
        config::show_path(path),
        create_token_command(path)
    )]
    Missing { name: String, path: PathBuf },
    #[error(
        "admin token {name:?} has the same value as token {other:?}; give every token its own \
         value, so the history can tell who made a change"
    )]
    SameValue { name: String, other: String },
}

/// Reads every admin token: `env` (the value of [`TOKEN_ENV`]) or, without
/// it, `default` (`admin.token_file`; a file that does not exist just
/// leaves it out), then each `[[admin.tokens]]` entry, whose file must
/// exist. `Ok(None)`: no token at all, the admin API stays off.
pub fn load_tokens(
    admin: &config::Admin,
    env: Option<String>,
) -> Result<Option<Tokens>, TokenError> {
    let (tokens, mut problems) = read_tokens(admin, env);
    match problems.is_empty() {
        true => Ok((!tokens.0.is_empty()).then_some(tokens)),
        false => Err(problems.swap_remove(0).1),
    }
}

/// What [`load_tokens`] finds wrong, each with the config key it is about
/// (`admin.token_file`, or `admin.tokens.file#I` for entry I), for
/// `switchyard check`.
pub fn check_tokens(admin: &config::Admin, env: Option<String>) -> Vec<(String, TokenError)> {
    read_tokens(admin, env).1
}

fn read_tokens(admin: &config::Admin, env: Option<String>) -> (Tokens, Vec<(String, TokenError)>) {
    let mut tokens = Tokens(Vec::new());
    let mut problems = Vec::new();
    let default_name = match env {
        Some(_) => ENV_TOKEN_NAME,
        None => DEFAULT_TOKEN_NAME,
    };
    match load_token(admin, env) {
        Ok(Some(token)) => tokens.0.push((default_name.to_string(), token)),
        Ok(None) => {}
        Err(e) => problems.push(("admin.token_file".to_string(), e)),
    }
    for (i, named) in admin.tokens.iter().enumerate() {
        let key = format!("admin.tokens.file#{i}");
        let token = read_token_file(&named.file).and_then(|raw| match raw {
            Some(raw) => checked(raw, named.file.display().to_string()),
            None => Err(TokenError::Missing {
                name: named.name.clone(),
                path: named.file.clone(),
            }),
        });
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                problems.push((key, e));
                continue;
            }
        };
        // Two names for one secret would make the history guess.
        if let Some((other, _)) = tokens.0.iter().find(|(_, t)| t.0 == token.0) {
            let e = TokenError::SameValue {
                name: named.name.clone(),
                other: other.clone(),
            };
            problems.push((key, e));
            continue;
        }
        tokens.0.push((named.name.clone(), token));
    }
    (tokens, problems)
}

/// A token read from `source`, trimmed, if it is long enough.
fn checked(raw: String, source: String) -> Result<Token, TokenError> {
    let token = raw.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort(source, token.len()));
    }
    Ok(Token(token.as_bytes().into()))
}

/// Reads one token: `env` (the value of [`TOKEN_ENV`]) first, then
/// `admin.token_file` (`[[admin.tokens]]` are not read: see
/// [`load_tokens`]). `Ok(None)` means neither is there.
pub fn load_token(admin: &config::Admin, env: Option<String>) -> Result<Option<Token>, TokenError> {
    let (raw, source) = match (env, &admin.token_file) {
        (Some(value), _) => (value, format!("${TOKEN_ENV}")),
        (None, Some(path)) => match read_token_file(path)? {
            Some(value) => (value, path.display().to_string()),
            None => return Ok(None),
        },
        (None, None) => return Ok(None),
    };
    checked(raw, source).map(Some)
}

/// `Ok(None)` when the file does not exist (admin off, said in the log).
fn read_token_file(path: &Path) -> Result<Option<String>, TokenError> {
    let read_err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    // Before the mode: `chmod 600` on a directory or a device would be bad advice.
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map(Some).map_err(read_err)
}

/// The one shell command that creates a token file at `path` with mode
/// 0600 (umask 077 in a subshell), from 32 random bytes as hex; it needs
/// only POSIX tools, no openssl.
pub fn create_token_command(path: &Path) -> String {
    format!(
        "(umask 077; head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \\n' > {})",
        shell_quote(path)
    )
}

/// `path` as one shell word: as is when it holds only safe characters,
/// otherwise in single quotes.
fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b));
    if safe {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Whether a client address is on the allowlist. IPv4 clients that reach an
/// IPv6 socket arrive as `::ffff:a.b.c.d` and are checked as IPv4.
pub fn allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allow.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(file: Option<PathBuf>) -> config::Admin {
        config::Admin {
            token_file: file,
            allow: vec![],
            tokens: vec![],
        }
    }

    fn private(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn named_tokens_identify_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("admin.token");
        let ci = dir.path().join("ci.token");
        private(&default, "default-token-0123456789\n");
        private(&ci, "ci-token-abcdefghijklmnop\n");
        let mut a = admin(Some(default));
        a.tokens.push(config::AdminTokenFile {
            name: "ci".into(),
            file: ci.clone(),
        });
        let tokens = load_tokens(&a, None).unwrap().unwrap();
        assert_eq!(format!("{tokens:?}"), r#"["default", "ci"]"#);
        let id = |h: &str| tokens.identify(Some(h.as_bytes()));
        assert_eq!(id("Bearer default-token-0123456789"), Some("default"));
        assert_eq!(id("Bearer ci-token-abcdefghijklmnop"), Some("ci"));
        assert_eq!(id("Bearer ci-token-abcdefghijklmnoX"), None);
        assert_eq!(id("ci-token-abcdefghijklmnop"), None);
        assert_eq!(tokens.identify(None), None);
        // The environment replaces the default token, under its own name.
        let tokens = load_tokens(&a, Some("from-the-environment".into()))
            .unwrap()
            .unwrap();
        assert_eq!(tokens.names().collect::<Vec<_>>(), ["env", "ci"]);
        // Named tokens alone are enough to run the admin API.
        let mut only = admin(None);
        only.tokens = a.tokens.clone();
        assert!(load_tokens(&only, None).unwrap().is_some());
        // One secret under two names, a missing file, an open file: each
        // refused at its entry.
        a.tokens.push(config::AdminTokenFile {
            name: "copy".into(),
            file: ci.clone(),
        });
        a.tokens.push(config::AdminTokenFile {
            name: "gone".into(),
            file: dir.path().join("gone.token"),
        });
        let open = dir.path().join("open.token");
        private(&open, "open-token-abcdefghijklmnop");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o604)).unwrap();
        a.tokens.push(config::AdminTokenFile {
            name: "open".into(),
            file: open,
        });
        let problems: Vec<(String, String)> = check_tokens(&a, None)
            .into_iter()
            .map(|(k, e)| (k, e.to_string()))
            .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(problems[0].0, "admin.tokens.file#1");
        assert!(
            problems[0].1.contains("same value as token \"ci\""),
            "{problems:?}"
        );
        assert_eq!(problems[1].0, "admin.tokens.file#2");
        assert!(problems[1].1.contains("does not exist"), "{problems:?}");
        assert_eq!(problems[2].0, "admin.tokens.file#3");
        assert!(problems[2].1.contains("chmod 600"), "{problems:?}");
        assert!(!problems.iter().any(|(_, e)| e.contains("ci-token")));
        assert!(load_tokens(&a, None).is_err());
    }

    #[test]
    fn token_header_check() {
        let t = Token(b"0123456789abcdef".as_slice().into());
        assert!(t.matches_header(Some(b"Bearer 0123456789abcdef")));
        assert!(!t.matches_header(Some(b"Bearer 0123456789abcdeX")));
        assert!(!t.matches_header(Some(b"Basic 0123456789abcdef")));
        assert!(!t.matches_header(Some(b"Bearer ")));
        assert!(!t.matches_header(None));
        assert_eq!(format!("{t:?}"), "Token(16 bytes)");
    }

    #[test]
    fn token_file_permissions_and_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        assert!(load_token(&admin(Some(path.clone())), None)
            .unwrap()
            .is_none());
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_token(&admin(Some(path.clone())), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        // A directory open to all: named as not a file, no chmod advice.
        let open_dir = dir.path().join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = load_token(&admin(Some(open_dir)), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a regular file") && !err.contains("chmod"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = load_token(&admin(Some(path.clone())), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.as_str(), "0123456789abcdef0123");
        let t = load_token(&admin(Some(path)), Some("from-the-environment".into()))
            .unwrap()
            .unwrap();
        assert_eq!(t.as_str(), "from-the-environment");
        assert!(matches!(
            load_token(&admin(None), Some("short".into())),
            Err(TokenError::TooShort(_, 5))
        ));
        assert!(load_token(&admin(None), None).unwrap().is_none());
    }

    #[test]
    fn token_command_creates_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my token's file");
        let cmd = create_token_command(&path);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{cmd}");
        let t = load_token(&admin(Some(path)), None).unwrap().unwrap();
        assert_eq!(t.as_str().len(), 64, "{cmd}");
        assert!(t.as_str().bytes().all(|b| b.is_ascii_hexdigit()), "{cmd}");
    }

    #[test]
    fn allowlist_handles_mapped_v4() {
        let allow: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        assert!(allowed(&allow, "127.0.0.1".parse().unwrap()));
        assert!(allowed(&allow, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&allow, "10.0.0.1".parse().unwrap()));
        assert!(!allowed(&allow, "::1".parse().unwrap()));
    }
}
