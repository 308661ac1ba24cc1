//! `switchyard check`: a good config passes; each kind of mistake exits 1
//! with a `FILE:LINE:COL: message` diagnostic pointing at the right line.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

/// A valid config. `check` must not bind ports or contact backends, so fixed
/// port numbers are fine here. Mutations below replace one exact line.
fn good_config(dir: &Path) -> String {
    let state = dir.join("state");
    fs::create_dir_all(&state).unwrap();
    let token = dir.join("admin.token");
    fs::write(&token, "check-token-0123456789abcdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        r#"[server]
threads = 1
grace_period = "5s"
state_dir = {state}

[listen]
http = "127.0.0.1:18080"
admin = "127.0.0.1:18081"

[admin]
token_file = {token}
allow = ["127.0.0.1/32", "::1/128"]

[services.api]
blue = ["127.0.0.1:18090"]
green = ["127.0.0.1:18091"]
active = "blue"

[[routes]]
host = "api.example.com"
path = "/api/"
service = "api"

[[routes]]
host = "api.example.com"
path = "/actuator"
action = "deny"
"#,
        state = toml_str(state.to_str().unwrap()),
        token = toml_str(token.to_str().unwrap()),
    )
}

/// 1-based number of the only line equal to `line` (after trimming).
fn line_of(text: &str, line: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == line)
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "line {line:?} occurs {} times", hits.len());
    hits[0]
}

/// Replaces the single line `from` with `to` (which may span lines).
fn replace_line(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} not unique");
    text.replacen(from, to, 1)
}

/// `(line, col, message)` of every `FILE:LINE:COL: message` on stderr.
fn diagnostics(stderr: &str, file: &str) -> Vec<(usize, usize, String)> {
    let prefix = format!("{file}:");
    stderr
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.trim().parse().ok()?;
            let col = parts.next()?.trim().parse().ok()?;
            let msg = parts.next()?.trim().to_string();
            Some((line, col, msg))
        })
        .collect()
}

/// Writes `text`, runs `check`, and asserts exit 1 with a diagnostic on one
/// of `lines`.
fn assert_rejected(case: &str, dir: tempfile::TempDir, text: &str, lines: &[usize]) {
    let path = dir.path().join("switchyard.toml");
    fs::write(&path, text).unwrap();
    let out = run_check(&path, None);
    let file = path.to_str().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let diags = diagnostics(&stderr, file);
    let numbered: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{:>3} | {l}\n", i + 1))
        .collect();
    let context = format!(
        "case: {case}\n{}\n--- config ---\n{numbered}",
        describe(&out)
    );
    assert_eq!(out.status.code(), Some(1), "{context}");
    assert!(
        !diags.is_empty(),
        "no {file}:LINE:COL: diagnostic\n{context}"
    );
    for (line, col, msg) in &diags {
        assert!(
            *line >= 1 && *col >= 1,
            "not 1-based: {line}:{col}\n{context}"
        );
        assert!(!msg.is_empty(), "empty message\n{context}");
    }
    assert!(
        diags.iter().any(|(l, _, _)| lines.contains(l)),
        "expected a diagnostic on line {lines:?}, got {diags:?}\n{context}"
    );
}

#[test]
fn good_config_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    fs::write(&path, good_config(dir.path())).unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn route_to_unknown_service() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "service = \"api\"",
        "service = \"nope\"",
    );
    let line = line_of(&text, "service = \"nope\"");
    assert_rejected("unknown service", dir, &text, &[line]);
}

#[test]
fn empty_pool() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "blue = [\"127.0.0.1:18090\"]",
        "blue = []",
    );
    let line = line_of(&text, "blue = []");
    assert_rejected("empty pool", dir, &text, &[line]);
}

#[test]
fn duplicate_route() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = good_config(dir.path());
    let first = line_of(&text, "path = \"/api/\"");
    text.push_str(
        "\n[[routes]]\nhost = \"api.example.com\"\npath = \"/api/\"\nservice = \"api\"\n",
    );
    // The diagnostic belongs to the second, duplicate entry: its table
    // header or one of its keys, not the original route.
    let total = text.lines().count();
    let second: Vec<usize> = (total - 3..=total).collect();
    assert!(!second.contains(&first));
    assert_rejected("duplicate route", dir, &text, &second);
}

#[test]
fn bad_address() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "green = [\"127.0.0.1:18091\"]",
        "green = [\"127.0.0.1:notaport\"]",
    );
    let line = line_of(&text, "green = [\"127.0.0.1:notaport\"]");
    assert_rejected("bad address", dir, &text, &[line]);
}

#[test]
fn bad_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "http = \"127.0.0.1:18080\"",
        "http = \"127.0.0.1:notaport\"",
    );
    let line = line_of(&text, "http = \"127.0.0.1:notaport\"");
    assert_rejected("bad listen address", dir, &text, &[line]);
}

#[test]
fn bad_duration() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "grace_period = \"5s\"",
        "grace_period = \"soon\"",
    );
    let line = line_of(&text, "grace_period = \"soon\"");
    assert_rejected("bad duration", dir, &text, &[line]);
}

#[test]
fn bad_color() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "active = \"blue\"",
        "active = \"purple\"",
    );
    let line = line_of(&text, "active = \"purple\"");
    assert_rejected("bad color", dir, &text, &[line]);
}

#[test]
fn unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(
        &good_config(dir.path()),
        "threads = 1",
        "threads = 1\ncolour = 1",
    );
    let line = line_of(&text, "colour = 1");
    assert_rejected("unknown key", dir, &text, &[line]);
}

#[test]
fn malformed_toml() {
    let dir = tempfile::tempdir().unwrap();
    let text = replace_line(&good_config(dir.path()), "[listen]", "[listen");
    let line = line_of(&text, "[listen");
    assert_rejected("malformed TOML", dir, &text, &[line]);
}

#[test]
fn missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist.toml");
    let out = run_check(&path, None);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(path.to_str().unwrap()), "{}", describe(&out));
}

#[test]
fn shipped_configs_pass_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = root.join("conf");
    let entries =
        fs::read_dir(&conf).unwrap_or_else(|e| panic!("{} must exist: {e}", conf.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .toml files in {}", conf.display());
    for f in files {
        // Relative paths inside shipped configs are relative to the repo root.
        let out = run_check(&f, Some(root));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{} fails check:\n{}",
            f.display(),
            describe(&out)
        );
    }
}

#[test]
fn missing_maintenance_page_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("missing.html");
    let path = dir.path().join("switchyard.toml");
    let text = format!(
        "[server]\nmaintenance_page = {}\n\n[services.a]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n",
        toml_str(page.to_str().unwrap())
    );
    fs::write(&path, text).unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.html"), "{stderr}");
    fs::write(&page, "<p>back soon</p>").unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}
