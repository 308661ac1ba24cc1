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

/// Runs `check` on `text` and returns its diagnostics (exit 1 asserted).
fn rejected(dir: &Path, text: &str) -> Vec<(usize, usize, String)> {
    let path = dir.join("switchyard.toml");
    fs::write(&path, text).unwrap();
    let out = run_check(&path, Some(dir));
    assert_eq!(out.status.code(), Some(1), "{}\n{text}", describe(&out));
    diagnostics(
        &String::from_utf8_lossy(&out.stderr),
        path.to_str().unwrap(),
    )
}

#[test]
fn every_mistake_is_reported_in_line_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = good_config(dir.path());
    text = replace_line(&text, "threads = 1", "threads = \"two\"");
    text = replace_line(
        &text,
        "grace_period = \"5s\"",
        "grace_period = \"5s\"\ncolour = 1",
    );
    text = replace_line(
        &text,
        "http = \"127.0.0.1:18080\"",
        "htp = \"127.0.0.1:18080\"",
    );
    text = replace_line(&text, "service = \"api\"", "service = \"nope\"");
    text = replace_line(
        &text,
        "action = \"deny\"",
        "action = \"deny\"\nwebsockets = true",
    );
    text.push_str("\n[[routes]]\nservice = \"api\"\n");
    let expected = [
        (line_of(&text, "threads = \"two\""), "invalid type"),
        (line_of(&text, "colour = 1"), "unknown key `colour`"),
        (
            line_of(&text, "htp = \"127.0.0.1:18080\""),
            "unknown key `htp`",
        ),
        (
            line_of(&text, "service = \"nope\""),
            "unknown service \"nope\"",
        ),
        (
            line_of(&text, "websockets = true"),
            "unknown key `websockets`",
        ),
        (text.lines().count() - 1, "missing required key `path`"),
    ];
    let diags = rejected(dir.path(), &text);
    let lines: Vec<usize> = diags.iter().map(|d| d.0).collect();
    let want: Vec<usize> = expected.iter().map(|e| e.0).collect();
    assert_eq!(lines, want, "{diags:#?}");
    for ((_, _, msg), (_, says)) in diags.iter().zip(expected) {
        assert!(msg.contains(says), "wanted {says:?} in {msg:?}");
    }
}

#[test]
fn durations_have_one_form_and_a_range_per_setting() {
    let cases = [
        ("header_timeout = \"0s\"", "allowed from 100ms to 10m"),
        ("header_timeout = \"10 sec\"", "bad duration"),
        ("header_timeout = \"10 seconds\"", "bad duration"),
        ("header_timeout = \"1.5s\"", "1500ms"),
        ("body_timeout = \"0ms\"", "allowed from 100ms"),
        ("keepalive_timeout = \"9000h\"", "allowed from 100ms to 1h"),
        ("send_timeout = \"10\"", "\"10s\""),
        ("send_timeout = 10", "send_timeout = \"10s\""),
        ("retry_after = \"0s\"", "allowed from 1s to 24h"),
        ("retry_after = \"1500ms\"", "whole seconds"),
        ("grace_period = \"50ms\"", "allowed from 100ms to 1h"),
    ];
    for (line, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let text = good_config(dir.path());
        let text = if line.starts_with("grace_period") {
            replace_line(&text, "grace_period = \"5s\"", line)
        } else {
            replace_line(&text, "threads = 1", &format!("threads = 1\n{line}"))
        };
        let diags = rejected(dir.path(), &text);
        assert_eq!(diags.len(), 1, "{line}: {diags:#?}");
        assert_eq!(diags[0].0, line_of(&text, line), "{line}: {diags:#?}");
        assert!(
            diags[0].2.contains(says),
            "{line}: wanted {says:?} in {:?}",
            diags[0].2
        );
    }
    // Service, health and route durations too.
    for (from, to, says) in [
        (
            "active = \"blue\"",
            "active = \"blue\"\nconnect_timeout = \"0s\"",
            "allowed from 100ms to 5m",
        ),
        (
            "active = \"blue\"",
            "active = \"blue\"\nhealth = { path = \"/h\", interval = \"0s\" }",
            "allowed from 100ms to 1h",
        ),
        (
            "path = \"/api/\"",
            "path = \"/api/\"\nread_timeout = 90",
            "read_timeout = \"90s\"",
        ),
        (
            "path = \"/api/\"",
            "path = \"/api/\"\nidle_timeout = \"400d\"",
            "bad duration",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = replace_line(&good_config(dir.path()), from, to);
        let diags = rejected(dir.path(), &text);
        assert_eq!(diags.len(), 1, "{to}: {diags:#?}");
        assert!(
            diags[0].2.contains(says),
            "{to}: wanted {says:?} in {:?}",
            diags[0].2
        );
    }
}

#[test]
fn sizes_and_counts_have_a_range_per_setting() {
    for (line, says) in [
        ("max_header_size = \"0\"", "allowed from 1KiB to 1MiB"),
        ("max_header_size = \"2MiB\"", "allowed from 1KiB to 1MiB"),
        ("max_header_size = \"1.5KiB\"", "bad size"),
        ("max_header_size = \"32 kb\"", "bad size"),
        (
            "upstream_keepalive_pool = 1000000",
            "allowed from 0 to 65536",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = replace_line(
            &good_config(dir.path()),
            "threads = 1",
            &format!("threads = 1\n{line}"),
        );
        let diags = rejected(dir.path(), &text);
        assert_eq!(diags.len(), 1, "{line}: {diags:#?}");
        assert!(
            diags[0].2.contains(says),
            "{line}: wanted {says:?} in {:?}",
            diags[0].2
        );
    }
    for (from, to, says) in [
        ("threads = 1", "threads = 0", "allowed from 1 to 1024"),
        ("threads = 1", "threads = 5000", "allowed from 1 to 1024"),
        (
            "path = \"/api/\"",
            "path = \"/api/\"\nmax_body = \"2GiB\"",
            "allowed from 0 to 1GiB",
        ),
        (
            "active = \"blue\"",
            "active = \"blue\"\nhealth = { path = \"/h\", rise = 0, fall = 1000 }",
            "allowed from 1 to 100",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = replace_line(&good_config(dir.path()), from, to);
        let diags = rejected(dir.path(), &text);
        assert!(!diags.is_empty(), "{to}");
        for d in &diags {
            assert!(d.2.contains(says), "{to}: wanted {says:?} in {:?}", d.2);
        }
    }
}

#[test]
fn duplicate_route_names_the_line_of_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = good_config(dir.path());
    // The first route's `[[routes]]` header is two lines above its path.
    let first = line_of(&text, "path = \"/api/\"") - 2;
    text.push_str(
        "\n[[routes]]\nhost = \"API.example.com\"\npath = \"/api/\"\nservice = \"api\"\n",
    );
    let diags = rejected(dir.path(), &text);
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(
        diags[0].2.contains(&format!("on line {first}")),
        "{:?} does not name line {first}",
        diags[0].2
    );
}

#[test]
fn unreadable_relative_paths_say_what_they_are_relative_to() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    // A relative maintenance page that is missing.
    let text = replace_line(
        &good_config(dir.path()),
        "threads = 1",
        "threads = 1\nmaintenance_page = \"pages/missing.html\"",
    );
    let path = dir.path().join("switchyard.toml");
    fs::write(&path, &text).unwrap();
    let out = run_check(&path, Some(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pages/missing.html"), "{}", describe(&out));
    assert!(
        err.contains(&format!("relative to {}", base.display())),
        "{}",
        describe(&out)
    );

    // A relative token file readable by others.
    fs::write(
        dir.path().join("loose.token"),
        "check-token-0123456789abcdef\n",
    )
    .unwrap();
    fs::set_permissions(
        dir.path().join("loose.token"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let token = dir.path().join("admin.token");
    let text =
        good_config(dir.path()).replace(&toml_str(token.to_str().unwrap()), "\"loose.token\"");
    fs::write(&path, &text).unwrap();
    let out = run_check(&path, Some(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("relative to {}", base.display())),
        "{}",
        describe(&out)
    );

    // A relative state dir whose state file cannot be read.
    let text = good_config(dir.path());
    let state = dir.path().join("state");
    let text = text.replace(&toml_str(state.to_str().unwrap()), "\"state\"");
    fs::create_dir_all(state.join("state.json")).unwrap();
    fs::write(&path, &text).unwrap();
    let out = run_check(&path, Some(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state_dir = state"), "{}", describe(&out));
    assert!(
        err.contains(&format!("relative to {}", base.display())),
        "{}",
        describe(&out)
    );
}

#[test]
fn missing_token_file_is_named_with_the_command_that_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let text = good_config(dir.path());
    let token = dir.path().join("admin.token");
    fs::remove_file(&token).unwrap();
    fs::write(&path, &text).unwrap();
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("does not exist"), "{}", describe(&out));
    assert!(said.contains(token.to_str().unwrap()), "{}", describe(&out));
    // The printed command creates a token file that check then accepts.
    let cmd = said
        .lines()
        .find(|l| l.contains("umask 077"))
        .unwrap_or_else(|| panic!("no command printed:\n{}", describe(&out)))
        .trim()
        .to_string();
    let ran = std::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{cmd}: {ran:?}");
    assert_eq!(
        fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600,
        "{cmd}"
    );
    let out = run_check(&path, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("does not exist"),
        "{}",
        describe(&out)
    );
}

/// Problems with the files a config names are listed in the same run as the
/// mistakes in the config text, in line order, each at the key naming the
/// file; a token path that is a directory gets no `chmod` advice.
#[test]
fn file_problems_and_config_mistakes_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let open_dir = dir.path().join("open");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let token = dir.path().join("admin.token");
    let text = replace_line(
        &good_config(dir.path()),
        "threads = 1",
        "threads = 0\nmaintenance_page = \"nope/maint.html\"",
    )
    .replace(
        &toml_str(token.to_str().unwrap()),
        &toml_str(open_dir.to_str().unwrap()),
    );
    let path = dir.path().join("switchyard.toml");
    fs::write(&path, &text).unwrap();
    let out = run_check(&path, Some(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let found = diagnostics(&stderr, path.to_str().unwrap());
    let lines: Vec<(usize, usize)> = found.iter().map(|(l, c, _)| (*l, *c)).collect();
    // threads (2:11), maintenance_page (3:20), token_file (12:14).
    assert_eq!(lines, vec![(2, 11), (3, 20), (12, 14)], "{stderr}");
    assert!(!stderr.contains("))"), "nested parentheses: {stderr}");
    assert!(found[0].2.contains("threads"), "{stderr}");
    assert!(found[1].2.contains("nope/maint.html"), "{stderr}");
    assert!(
        found[2].2.contains("not a regular file") && !stderr.contains("chmod"),
        "{stderr}"
    );
}

/// Issue 10: the GPU endpoint ships behind all three limits, and vLLM's
/// other generating endpoints, which the token budget does not charge,
/// are not exposed.
#[test]
fn the_shipped_config_protects_the_ai_endpoint() {
    use switchyard::config::{Config, RouteAction};
    use switchyard::route::RouteTable;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("conf/switchyard.toml")).unwrap();
    let table = RouteTable::new(&config.routes);
    let host = Some("api.moyeobab.com");
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models"] {
        let target = table.resolve(host, path).unwrap().unwrap();
        let ai = config.services.iter().position(|s| s.name == "ai");
        assert_eq!(Some(target.action), ai.map(RouteAction::Proxy), "{path}");
        let l = target.limits;
        let named = |i: Option<usize>, names: Vec<&str>| i.map(|i| names[i].to_string());
        assert_eq!(
            named(
                l.rate_limit,
                config.rate_limits.iter().map(|r| r.name.as_str()).collect()
            ),
            Some("ai_calls".into())
        );
        assert_eq!(
            named(
                l.concurrency,
                config.concurrency.iter().map(|c| c.name.as_str()).collect()
            ),
            Some("gpu".into())
        );
        assert_eq!(
            named(
                l.token_budget,
                config
                    .token_budgets
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect()
            ),
            Some("ai".into())
        );
    }
    for path in [
        "/v1/responses",
        "/v1/embeddings",
        "/v1/audio/transcriptions",
        "/v1/rerank",
    ] {
        let target = table.resolve(host, path).unwrap().unwrap();
        assert_eq!(target.action, RouteAction::Deny, "{path}");
    }
}
