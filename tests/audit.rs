//! Named admin tokens (`[[admin.tokens]]`) and the audit trail: the history
//! records which token made each switch, filters by service, and still
//! reads history files written before the actor was recorded.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use common::*;

const CI_TOKEN: &str = "ci-token-0123456789abcdef";
const OPS_TOKEN: &str = "ops-token-0123456789abcdef";

/// Writes a token file with `mode` and returns its path.
fn token_file(dir: &Path, name: &str, token: &str, mode: u32) -> PathBuf {
    let path = dir.join(format!("{name}.token"));
    fs::write(&path, format!("{token}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `[[admin.tokens]]` tables for `(name, file)` pairs.
fn token_tables(tokens: &[(&str, &Path)]) -> String {
    tokens
        .iter()
        .map(|(name, file)| {
            format!(
                "[[admin.tokens]]\nname = {}\nfile = {}\n",
                toml_str(name),
                toml_str(file.to_str().unwrap())
            )
        })
        .collect()
}

/// Two services, `api` and `web`, each with a blue and a green upstream.
struct Services {
    upstreams: Vec<Upstream>,
}

impl Services {
    fn start() -> Services {
        let upstreams = ["api-blue", "api-green", "web-blue", "web-green"]
            .map(Upstream::start)
            .into();
        Services { upstreams }
    }

    fn config(&self) -> String {
        let u = &self.upstreams;
        let mut s = service("api", &[&u[0]], &[&u[1]], "blue");
        s.push_str(&service("web", &[&u[2]], &[&u[3]], "blue"));
        s.push_str(&route(None, "/", "api"));
        s
    }
}

fn switch_with(proxy: &Proxy, token: &str, service: &str, to: &str, reason: &str) -> (u16, Value) {
    let body = serde_json::json!({ "to": to, "reason": reason }).to_string();
    admin_request(
        &proxy.admin_url(),
        "POST",
        &format!("/services/{service}/switch"),
        Some(&body),
        Some(token),
    )
}

/// `(service, to, actor, reason)` of every event `GET /history` + `query` returns.
fn history(proxy: &Proxy, query: &str) -> Vec<(String, String, String, String)> {
    let (code, v) = admin_request(
        &proxy.admin_url(),
        "GET",
        &format!("/history{query}"),
        None,
        Some(proxy.token()),
    );
    assert_eq!(code, 200, "GET /history{query}: {v}");
    let s = |e: &Value, k: &str| e[k].as_str().unwrap_or("<missing>").to_string();
    v["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {v}"))
        .iter()
        .map(|e| (s(e, "service"), s(e, "to"), s(e, "actor"), s(e, "reason")))
        .collect()
}

fn event(service: &str, to: &str, actor: &str, reason: &str) -> (String, String, String, String) {
    (service.into(), to.into(), actor.into(), reason.into())
}

#[test]
fn named_tokens_each_work_and_the_history_names_which_one_switched() {
    let tokens = tempfile::tempdir().unwrap();
    let ci = token_file(tokens.path(), "ci", CI_TOKEN, 0o600);
    let ops = token_file(tokens.path(), "ops", OPS_TOKEN, 0o600);
    let services = Services::start();
    let body = format!(
        "{}{}",
        token_tables(&[("ci", &ci), ("ops", &ops)]),
        services.config()
    );
    let proxy = ProxyBuilder::new(body).start();

    let (code, v) = switch_with(&proxy, CI_TOKEN, "api", "green", "release 7");
    assert_eq!((code, v["active"].as_str()), (200, Some("green")), "{v}");
    let (code, v) = switch_with(&proxy, OPS_TOKEN, "web", "green", "web release");
    assert_eq!((code, v["active"].as_str()), (200, Some("green")), "{v}");
    // admin.token_file keeps working, under the name `default`.
    let (code, v) = switch_with(&proxy, proxy.token(), "api", "blue", "back");
    assert_eq!((code, v["active"].as_str()), (200, Some("blue")), "{v}");

    // A wrong token (a valid one with its last byte changed, a prefix, a
    // token followed by more) is refused and changes nothing.
    let prefix = &CI_TOKEN[..CI_TOKEN.len() - 1];
    let longer = format!("{OPS_TOKEN}x");
    let wrong = format!("{prefix}X");
    for bad in [wrong.as_str(), prefix, longer.as_str()] {
        let (code, v) = switch_with(&proxy, bad, "web", "blue", "should not happen");
        assert_eq!(code, 401, "token {bad:?} was accepted: {v}");
    }
    assert_eq!(proxy.active("web"), "green");

    assert_eq!(
        history(&proxy, ""),
        vec![
            event("api", "green", "token:ci", "release 7"),
            event("web", "green", "token:ops", "web release"),
            event("api", "blue", "token:default", "back"),
        ]
    );
    // `ctl history` shows who, per line; a rollback through ctl records its token too.
    let out = run_ctl(&proxy.admin_url(), Some(OPS_TOKEN), &["rollback", "api"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = run_ctl(&proxy.admin_url(), Some(CI_TOKEN), &["history"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].contains("api")
            && lines[0].contains("by token:ci")
            && lines[0].ends_with("release 7"),
        "{text}"
    );
    assert!(lines[1].contains("by token:ops"), "{text}");
    assert!(lines[2].contains("by token:default"), "{text}");
    assert!(
        lines[3].contains("blue -> green") && lines[3].contains("by token:ops"),
        "{text}"
    );
    // Maintenance on and off are state changes too: in the history, by whom.
    let out = run_ctl(
        &proxy.admin_url(),
        Some(OPS_TOKEN),
        &["maintenance", "web", "on"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let (code, _) = admin_request(
        &proxy.admin_url(),
        "POST",
        "/services/web/maintenance",
        Some(r#"{"on": false}"#),
        Some(CI_TOKEN),
    );
    assert_eq!(code, 200);
    let web = history(&proxy, "?service=web");
    assert_eq!(
        web[1..],
        [
            event("web", "green", "token:ops", "maintenance on"),
            event("web", "green", "token:ci", "maintenance off"),
        ]
    );
    let out = run_ctl(&proxy.admin_url(), Some(CI_TOKEN), &["history", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("maintenance on"), "{text}");
    // Secrets never reach the log.
    let log = proxy.stderr_text();
    for secret in [CI_TOKEN, OPS_TOKEN, prefix] {
        assert!(!log.contains(secret), "a token is in the log:\n{log}");
    }
}

#[test]
fn history_filters_by_service_in_the_api_and_in_ctl() {
    let services = Services::start();
    let proxy = ProxyBuilder::new(services.config()).start();
    proxy.switch("api", "green", Some("api 1"));
    proxy.switch("web", "green", Some("web 1"));
    proxy.switch("api", "blue", Some("api 2"));

    let api = history(&proxy, "?service=api");
    assert_eq!(
        api,
        vec![
            event("api", "green", "token:default", "api 1"),
            event("api", "blue", "token:default", "api 2"),
        ]
    );
    assert_eq!(
        history(&proxy, "?service=web"),
        vec![event("web", "green", "token:default", "web 1")]
    );
    assert_eq!(history(&proxy, "").len(), 3);
    assert!(history(&proxy, "?service=nope").is_empty());
    // A misspelt parameter is refused, not taken for "no filter".
    let (code, v) = admin_request(
        &proxy.admin_url(),
        "GET",
        "/history?servce=api",
        None,
        Some(proxy.token()),
    );
    assert_eq!(code, 400, "{v}");

    for args in [
        &["history", "web"][..],
        &["history", "--service", "web"][..],
    ] {
        let out = run_ctl(&proxy.admin_url(), Some(proxy.token()), args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {text}");
        assert!(
            lines[0].contains("web") && lines[0].contains("web 1"),
            "{args:?}: {text}"
        );
    }
    let out = run_ctl(
        &proxy.admin_url(),
        Some(proxy.token()),
        &["history", "nope"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no switches of nope yet"
    );
    let out = run_ctl(
        &proxy.admin_url(),
        Some(proxy.token()),
        &["--json", "history", "api"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["events"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["events"][1]["actor"], "token:default", "{v}");
}

#[test]
fn history_written_before_the_actor_was_recorded_still_loads() {
    let services = Services::start();
    let proxy = ProxyBuilder::new(services.config()).start();
    // As an older switchyard wrote it: no `actor`.
    let old = r#"{"time":"2026-11-01T10:00:00.000Z","service":"api","from":"blue","to":"green","reason":"old release"}"#;
    fs::write(
        proxy.state_dir().join("history.jsonl"),
        format!("{old}\n{old}\n"),
    )
    .unwrap();
    proxy.switch("web", "green", Some("new release"));
    assert_eq!(
        history(&proxy, ""),
        vec![
            event("api", "green", "unrecorded", "old release"),
            event("api", "green", "unrecorded", "old release"),
            event("web", "green", "token:default", "new release"),
        ]
    );
    let out = run_ctl(&proxy.admin_url(), Some(proxy.token()), &["history", "api"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("by unrecorded"), "{text}");
}

/// `(line, col, message)` of each `FILE:LINE:COL: message` that `check` printed about `config`.
fn diagnostics(out: &std::process::Output, config: &Path) -> Vec<(usize, usize, String)> {
    let prefix = format!("{}:", config.display());
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let col = parts.next()?.parse().ok()?;
            Some((line, col, parts.next()?.trim().to_string()))
        })
        .collect()
}

/// 1-based number of the line of `text` that is exactly `line`, counting from the `nth` (0-based) match.
fn line_no(text: &str, line: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| *l == line)
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no line {line:?} in\n{text}"))
}

#[test]
fn check_refuses_bad_token_entries_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let ci = token_file(dir.path(), "ci", CI_TOKEN, 0o600);
    let open = token_file(dir.path(), "open", OPS_TOKEN, 0o644);
    let services = Services::start();
    let config = dir.path().join("switchyard.toml");
    let state = dir.path().join("state");
    let write = |tables: &str| -> String {
        let text = format!(
            "[server]\nstate_dir = {}\n[admin]\n{tables}{}",
            toml_str(state.to_str().unwrap()),
            services.config()
        );
        fs::write(&config, &text).unwrap();
        text
    };

    // The good form passes.
    write(&token_tables(&[("ci", &ci)]));
    let out = run_check(&config, None);
    assert!(out.status.success(), "{}", describe(&out));

    // The same name twice: refused at the second name.
    let text = write(&token_tables(&[("ci", &ci), ("ci", &open)]));
    let out = run_check(&config, None);
    assert!(!out.status.success(), "{}", describe(&out));
    let found = diagnostics(&out, &config);
    let at = line_no(&text, "name = \"ci\"", 1);
    assert!(
        found
            .iter()
            .any(|(l, c, m)| (*l, *c) == (at, 8) && m.contains("\"ci\" is used twice")),
        "{found:?}\n{}",
        describe(&out)
    );

    // A token file others can read: refused at its `file` key, with the fix.
    let text = write(&token_tables(&[("ci", &ci), ("ops", &open)]));
    let out = run_check(&config, None);
    assert!(!out.status.success(), "{}", describe(&out));
    let found = diagnostics(&out, &config);
    let file_line = format!("file = {}", toml_str(open.to_str().unwrap()));
    let at = line_no(&text, &file_line, 0);
    assert_eq!(found.len(), 1, "{found:?}\n{}", describe(&out));
    let (l, c, m) = &found[0];
    assert_eq!((*l, *c), (at, 8), "{m}");
    assert!(m.contains("mode 0644") && m.contains("chmod 600"), "{m}");
    assert!(!describe(&out).contains(OPS_TOKEN), "{}", describe(&out));

    // A named token file that does not exist: refused with the command that creates it.
    let gone = dir.path().join("gone.token");
    let text = write(&token_tables(&[("gone", &gone)]));
    let out = run_check(&config, None);
    assert!(!out.status.success(), "{}", describe(&out));
    let found = diagnostics(&out, &config);
    let at = line_no(
        &text,
        &format!("file = {}", toml_str(gone.to_str().unwrap())),
        0,
    );
    assert!(
        found
            .iter()
            .any(|(l, _, m)| *l == at && m.contains("\"gone\" does not exist")),
        "{found:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("umask 077; head -c 32 /dev/urandom")
            && stderr.contains(gone.to_str().unwrap()),
        "{stderr}"
    );
}

#[test]
fn a_world_readable_named_token_refuses_start() {
    let tokens = tempfile::tempdir().unwrap();
    let open = token_file(tokens.path(), "ci", CI_TOKEN, 0o604);
    let services = Services::start();
    let body = format!("{}{}", token_tables(&[("ci", &open)]), services.config());
    let mut proxy = ProxyBuilder::new(body).spawn();
    let status = proxy
        .wait_exit(FAIL_DEADLINE)
        .expect("started with a 0604 named token file");
    assert!(!status.success(), "{status}");
    let log = proxy.stderr_text();
    assert!(log.contains("chmod 600"), "{log}");
    assert!(!log.contains(CI_TOKEN), "{log}");
}

#[test]
fn ctl_with_only_named_tokens_in_the_config_says_to_pass_one() {
    let dir = tempfile::tempdir().unwrap();
    let ci = token_file(dir.path(), "ci", CI_TOKEN, 0o600);
    let config = dir.path().join("switchyard.toml");
    let text = format!(
        "[listen]\nadmin = \"127.0.0.1:{}\"\n[admin]\n{}{}",
        free_port(),
        token_tables(&[("ci", &ci)]),
        "[services.api]\nblue = [\"127.0.0.1:1\"]\ngreen = [\"127.0.0.1:2\"]\n"
    );
    fs::write(&config, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["ctl", "-c", config.to_str().unwrap(), "status"])
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--token-file") && stderr.contains(ci.to_str().unwrap()),
        "{stderr}"
    );
}
