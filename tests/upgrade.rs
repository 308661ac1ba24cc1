//! Upgrading switchyard itself without dropping a request: a new process
//! started with `run -u` takes the listening sockets from the old one on
//! SIGQUIT, and the old one drains and exits. Also the listening sockets'
//! other rules (`src/listener.rs`): an address that cannot be bound stops
//! the start with a clear error.

mod common;

use std::fs;
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

    let new = upgrade(&mut old);
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

/// Starts `run -u` on `old`'s config, sends the old process SIGQUIT once
/// the new one waits for the sockets, and waits for the old one to exit.
fn upgrade(old: &mut Proxy) -> KillOnDrop {
    let log = fs::File::create(old.dir().join("new.err")).unwrap();
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
    new
}

#[test]
fn run_u_takes_over_the_https_socket_too() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let certs = tempfile::tempdir().unwrap();
    let (site, _) = tls::self_signed_site(certs.path(), "api.test");
    let tables = format!("[tls]\n{site}");
    let mut old = ProxyBuilder::new(simple_api(&blue, &green))
        .https(&tables)
        .start();
    let addr = old.https_addr();
    let config = Arc::new(tls::Recorder::config(Arc::default()));
    let get = || {
        let mut conn = tls::try_tls_connect(&addr, "api.test", config.clone())?;
        Ok::<u16, String>(tls::exchange(&mut conn, &tls::get_request("api.test", "/")).status)
    };
    assert_eq!(get(), Ok(200));

    // The old process still listens when the new one starts: a fresh bind
    // of the same address would fail, so an answer afterwards comes from
    // the socket handed over.
    let new = upgrade(&mut old);
    assert!(
        poll_until(Duration::from_secs(10), || get() == Ok(200)),
        "the new process does not serve HTTPS: {:?}\n{}",
        get(),
        fs::read_to_string(old.dir().join("new.err")).unwrap_or_default()
    );
    drop(new);
}

#[test]
fn a_listen_address_in_use_stops_the_start_with_a_clear_error() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .http_port(port)
        .spawn();
    let status = proxy
        .wait_exit(FAIL_DEADLINE)
        .expect("started on an address in use");
    assert_eq!(status.code(), Some(1), "{status}");
    let log = proxy.stderr_text();
    let address = format!("127.0.0.1:{port}");
    assert!(
        log.contains(&format!("cannot listen on {address}")) && log.contains("in use"),
        "{log}"
    );
}

#[test]
fn an_upgrade_whose_new_address_is_in_use_keeps_serving_what_it_took_over() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut old = ProxyBuilder::new(simple_api(&blue, &green)).start();
    // The new process's config adds a metrics listener on a taken port:
    // the old process hands over the proxy's socket, so exiting would
    // leave nothing serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let config = fs::read_to_string(old.config_path()).unwrap();
    let config = config.replacen(
        "[listen]\n",
        &format!("[listen]\nmetrics = \"{address}\"\n"),
        1,
    );
    fs::write(old.config_path(), config).unwrap();

    let mut new = upgrade(&mut old);
    assert_eq!(old.get("/", None), (200, "blue".to_string()));
    let new_log = || fs::read_to_string(old.dir().join("new.err")).unwrap_or_default();
    let said = format!("cannot listen on {address}");
    assert!(
        poll_until(Duration::from_secs(10), || new_log().contains(&said)),
        "{}",
        new_log()
    );
    let log = new_log();
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process exited:\n{log}"
    );
}
