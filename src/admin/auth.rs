//! Who may use the admin API: a bearer token compared in constant time, from
//! a client address on the allowlist. Without a token the API does not run.

use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::config;

/// Environment variable that carries the token; it wins over `admin.token_file`.
pub const TOKEN_ENV: &str = "SWITCHYARD_ADMIN_TOKEN";
/// Shortest token accepted (16 bytes): anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

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
}

/// Reads the token: `env` (the value of [`TOKEN_ENV`]) first, then the file.
/// `Ok(None)` means no token is configured and the admin API stays off.
pub fn load_token(admin: &config::Admin, env: Option<String>) -> Result<Option<Token>, TokenError> {
    let (raw, source) = match (env, &admin.token_file) {
        (Some(value), _) => (value, format!("${TOKEN_ENV}")),
        (None, Some(path)) => match read_token_file(path)? {
            Some(value) => (value, path.display().to_string()),
            None => return Ok(None),
        },
        (None, None) => return Ok(None),
    };
    let token = raw.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort(source, token.len()));
    }
    Ok(Some(Token(token.as_bytes().into())))
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
        }
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
