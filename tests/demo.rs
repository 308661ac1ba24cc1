//! `switchyard demo`: serves blue on its proxy port, and removes its
//! temporary directory (which holds the admin token) however it is stopped.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A running demo whose temporary directory is under `tmp` (its `TMPDIR`).
struct Demo {
    child: Child,
    tmp: tempfile::TempDir,
    http: String,
}

impl Demo {
    fn start() -> Demo {
        let tmp = tempfile::tempdir().unwrap();
        let [http, admin] = free_ports::<2>();
        let http = format!("127.0.0.1:{http}");
        let child = Command::new(BIN)
            .args([
                "demo",
                "--http",
                &http,
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .env("TMPDIR", tmp.path())
            .env_remove(TOKEN_ENV)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let demo = Demo { child, tmp, http };
        let url = format!("http://{}/", demo.http);
        assert!(
            poll_until(READY_DEADLINE, || try_get(&agent(), &url, None)
                .is_ok_and(|(code, _)| code == 200)),
            "demo did not come up"
        );
        demo
    }

    /// The demo's directory, with its config and admin token.
    fn dir(&self) -> PathBuf {
        self.tmp
            .path()
            .join(format!("switchyard-demo-{}", self.child.id()))
    }

    fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    fn wait_exit(&mut self) -> bool {
        poll_until(Duration::from_secs(15), || {
            self.child.try_wait().unwrap().is_some()
        })
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_cleaned_up_after(sig: i32, name: &str) {
    let mut demo = Demo::start();
    let dir = demo.dir();
    assert!(
        dir.join("admin.token").exists(),
        "no token in {}",
        dir.display()
    );
    demo.signal(sig);
    assert!(demo.wait_exit(), "demo still running after {name}");
    assert!(
        poll_until(Duration::from_secs(5), || !dir.exists()),
        "{} (with the admin token) left behind after {name}",
        dir.display()
    );
}

#[test]
fn demo_removes_its_directory_on_sigint() {
    assert_cleaned_up_after(libc::SIGINT, "SIGINT");
}

#[test]
fn demo_removes_its_directory_on_sigterm() {
    assert_cleaned_up_after(libc::SIGTERM, "SIGTERM");
}

/// Closing the terminal the demo runs in.
#[test]
fn demo_removes_its_directory_on_sighup() {
    assert_cleaned_up_after(libc::SIGHUP, "SIGHUP");
}
