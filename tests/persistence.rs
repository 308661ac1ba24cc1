//! Active colors and history are durable across restarts; a corrupt state
//! file stops start-up instead of being silently ignored.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn active_color_and_history_survive_restart() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();

    proxy.switch("api", "green", Some("persist me"));
    assert_eq!(proxy.get("/", None), (200, "green".to_string()));
    assert!(
        proxy.state_file().is_file(),
        "{} was not written",
        proxy.state_file().display()
    );

    proxy.sigterm();
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("no exit within 10 s of SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");

    // The config still says `active = "blue"`; the saved state must win.
    proxy.restart();
    let s = proxy.status();
    assert_eq!(s["services"]["api"]["active"], "green", "{s}");
    assert_eq!(
        proxy.get("/after-restart", None),
        (200, "green".to_string())
    );
    assert_eq!(
        blue.received("/after-restart"),
        0,
        "blue served traffic: {:?}",
        blue.seen()
    );

    let (code, h) = proxy.admin("GET", "/history", None);
    assert_eq!(code, 200, "{h}");
    let events = h["events"].as_array().unwrap_or_else(|| panic!("{h}"));
    assert_eq!(events.len(), 1, "history after restart: {h}");
    assert_eq!(events[0]["service"], "api", "{h}");
    assert_eq!(events[0]["from"], "blue", "{h}");
    assert_eq!(events[0]["to"], "green", "{h}");
    assert_eq!(events[0]["reason"], "persist me", "{h}");

    // History keeps growing after the restart, newest last.
    proxy.switch("api", "blue", Some("after restart"));
    let (_, h) = proxy.admin("GET", "/history", None);
    let events = h["events"].as_array().unwrap_or_else(|| panic!("{h}"));
    assert_eq!(events.len(), 2, "{h}");
    assert_eq!(events[1]["reason"], "after restart", "{h}");
    assert_eq!(events[1]["to"], "blue", "{h}");
}

/// Starts a proxy over a pre-written state file and asserts it refuses to
/// start, naming the file.
fn assert_refuses_state(content: &str) {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .state_json(content)
        .spawn();
    let st = proxy
        .wait_exit(FAIL_DEADLINE)
        .unwrap_or_else(|| panic!("kept running with state.json = {content:?}"));
    assert!(
        !st.success(),
        "exit status {st} with state.json = {content:?}"
    );
    let err = proxy.stderr_text();
    let path = proxy.state_file().display().to_string();
    assert!(err.contains(&path), "stderr does not name {path}:\n{err}");
}

#[test]
fn truncated_state_file_fails_start() {
    assert_refuses_state("{\"services\": {");
}

#[test]
fn garbage_state_file_fails_start() {
    assert_refuses_state("this is not json \u{1}\u{2}");
}

#[test]
fn state_corrupted_between_runs_fails_restart() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green)).start();
    proxy.switch("api", "green", None);
    proxy.sigterm();
    let st = proxy.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(st.code(), Some(0), "{st}");

    let saved = std::fs::read(proxy.state_file()).expect("state.json");
    // Cut the file in half, as a crash mid-write without atomic rename would.
    std::fs::write(proxy.state_file(), &saved[..saved.len() / 2]).unwrap();

    proxy.relaunch();
    let st = proxy
        .wait_exit(FAIL_DEADLINE)
        .expect("kept running over a truncated state file");
    assert!(!st.success(), "exit status {st}");
    let err = proxy.stderr_text();
    let path = proxy.state_file().display().to_string();
    assert!(err.contains(&path), "stderr does not name {path}:\n{err}");
}
