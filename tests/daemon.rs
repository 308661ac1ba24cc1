//! `run -d`: the daemon keeps relative paths working, writes its pid and log
//! into state_dir, serves, refuses a second start on the same state_dir,
//! drains and stops on SIGTERM, and removes its pid file when it exits.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Stops the daemon even when an assertion fails: it is not our child, so
/// nothing else would.
struct Daemon(Option<i32>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn daemon_serves_logs_to_state_dir_stops_on_sigterm_and_removes_its_pid_file() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let [http, admin] = free_ports::<2>();
    // Relative state_dir: must resolve against the directory it was started in.
    let config = format!(
        "[server]\nthreads = 1\nstate_dir = \"state\"\n\n[listen]\nhttp = \"127.0.0.1:{http}\"\nadmin = \"127.0.0.1:{admin}\"\n\n{}",
        simple_api(&blue, &green)
    );
    std::fs::write(dir.path().join("switchyard.toml"), config).unwrap();
    let out = Command::new(BIN)
        .args(["run", "-c", "switchyard.toml", "-d"])
        .current_dir(dir.path())
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    let pid_file = dir.path().join("state/switchyard.pid");
    let read_pid =
        || -> Option<i32> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() };
    let mut daemon = Daemon(None);
    assert!(
        poll_until(Duration::from_secs(20), || {
            daemon.0 = read_pid();
            daemon.0.is_some()
        }),
        "daemon wrote no pid file"
    );
    let url = format!("http://127.0.0.1:{http}/");
    assert!(
        poll_until(Duration::from_secs(20), || try_get(&agent(), &url, None)
            .is_ok()),
        "daemon did not come up"
    );
    assert_eq!(get(&url, None), (200, "blue".to_string()));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // A second daemon on the same config is refused before it forks, and
    // leaves the running one's pid file alone.
    let again = Command::new(BIN)
        .args(["run", "-c", "switchyard.toml", "-d"])
        .current_dir(dir.path())
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains(&format!("already running as pid {pid}")),
        "{said}"
    );
    assert_eq!(read_pid(), Some(pid));
    assert_eq!(get(&url, None), (200, "blue".to_string()));

    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        poll_until(Duration::from_secs(10), || unsafe { libc::kill(pid, 0) }
            != 0),
        "daemon {pid} still running after SIGTERM"
    );
    // Its pid file goes with it.
    assert!(
        poll_until(Duration::from_secs(5), || !pid_file.exists()),
        "{} left behind after the daemon exited",
        pid_file.display()
    );
    // What the daemon logged after detaching went to the file, not to nowhere.
    let log = std::fs::read_to_string(dir.path().join("state/switchyard.log")).unwrap();
    assert!(log.contains("drained"), "{log}");
}
