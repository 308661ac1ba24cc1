//! Upgrading switchyard itself without dropping a request: a new process
//! started with `run -u` takes the listening sockets from the old one on
//! SIGQUIT, and the old one drains and exits.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Kills the new process at the end of the test, whatever happens.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn run_u_takes_over_the_sockets_with_no_failed_request() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut old = ProxyBuilder::new(simple_api(&blue, &green)).start();
    let url = format!("{}/", old.http_url());

    // A client that opens a new connection per request, so it exercises the
    // listening socket itself across the handover.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_idle_connections(0)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match try_get(&agent, &url, None) {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        errors.push(format!("{other:?}"));
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
            errors
        })
    };
    assert!(poll_until(Duration::from_secs(10), || ok
        .load(Ordering::SeqCst)
        >= 20));

    let log = std::fs::File::create(old.dir().join("new.err")).unwrap();
    let new = KillOnDrop(
        Command::new(BIN)
            .args(["run", "-u", "-c"])
            .arg(old.config_path())
            .env_remove(TOKEN_ENV)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The new process listens on the upgrade socket before the old one may send.
    let sock = old.state_dir().join("upgrade.sock");
    assert!(
        poll_until(Duration::from_secs(20), || sock.exists()),
        "no upgrade socket"
    );
    unsafe { libc::kill(old.pid(), libc::SIGQUIT) };

    let exit = old.wait_exit(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|s| s.success()),
        "old process: {exit:?}\n{}",
        old.stderr_text()
    );
    let served_before = ok.load(Ordering::SeqCst);
    assert!(
        poll_until(Duration::from_secs(10), || ok.load(Ordering::SeqCst)
            >= served_before + 20),
        "the new process does not serve"
    );
    stop.store(true, Ordering::SeqCst);
    let errors = client.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:?}"
    );
    drop(new);
}
