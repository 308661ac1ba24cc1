//! `switchyard ctl deploy`: a deploy that passes its gates ends on 100 %
//! green (exit 0, summary line); one whose green fails mid-canary is rolled
//! back (exit 3, the gate's figures in the reason); Ctrl-C and a ctl that
//! dies both restore the state from before the deploy; a second deploy of
//! the same service is refused (409) naming the one that holds it.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::load::Load;
use common::*;
use serde_json::Value;

/// `api` with health checks and gates short enough for tests (window
/// 2 s, 5 requests), every path routed to it.
fn deployable_api(blue: &Upstream, green: &Upstream) -> String {
    let mut s = service_with("api", &[blue], &[green], "blue", &fast_health());
    s.push_str("[services.api.rollback]\nwindow = \"2s\"\nmin_requests = 5\n\n");
    s.push_str(&route(None, "/", "api"));
    s
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn events(p: &Proxy) -> Vec<Value> {
    let (code, v) = p.admin("GET", "/history?service=api", None);
    assert_eq!(code, 200, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// A webhook receiver on loopback: records each JSON body it is posted
/// and answers 204.
struct Webhooks {
    addr: String,
    posts: Arc<Mutex<Vec<Value>>>,
}

impl Webhooks {
    fn start() -> Webhooks {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let seen = posts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break serde_json::from_slice(&buf[end + 4..end + 4 + len]).ok();
                    }
                };
                if let Some(body) = body {
                    seen.lock().unwrap().push(body);
                }
                let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            }
        });
        Webhooks { addr, posts }
    }

    /// A `[[notify.webhooks]]` table (JSON format, `events`) posting here;
    /// the URL goes in a 0600 file under `dir`.
    fn config(&self, dir: &std::path::Path, events: &str) -> String {
        let file = dir.join("hook.url");
        std::fs::write(&file, format!("http://{}/hook\n", self.addr)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "[[notify.webhooks]]\nname = \"ci\"\nurl_file = {}\nformat = \"json\"\nevents = {events}\n\n",
            toml_str(file.to_str().unwrap())
        )
    }

    /// Waits for `n` posts and returns them.
    fn wait(&self, n: usize) -> Vec<Value> {
        let got = poll_until(Duration::from_secs(10), || {
            self.posts.lock().unwrap().len() >= n
        });
        let posts = self.posts.lock().unwrap().clone();
        assert!(got, "{} of {n} webhook posts: {posts:?}", posts.len());
        posts
    }
}

/// Polls `GET /services/api/deploy` until `f` holds.
fn wait_deploy(p: &Proxy, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = poll_until(Duration::from_secs(15), || {
        let (code, v) = p.admin("GET", "/services/api/deploy", None);
        last = v;
        code == 200 && f(&last)
    });
    assert!(ok, "{what}: {last}");
    last
}

#[test]
fn a_healthy_deploy_walks_its_steps_to_green() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    let load = Load::start(&format!("{}/orders", p.http_url()), 2, 3000);
    let out = p.ctl(&[
        "deploy",
        "api",
        "--to",
        "green",
        "--steps",
        "50,100",
        "--interval",
        "1s",
        "--wait-healthy",
        "10s",
        "--reason",
        "release 2",
    ]);
    let answers = load.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("api: step 1/2 (blue 50 / green 50)"),
        "{text}"
    );
    assert!(
        text.contains("api: step 2/2 (blue 0 / green 100)"),
        "{text}"
    );
    let summary = text.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("deploy api -> green: done in ")
            && summary.contains("deploy done: green 100 % after 2 step(s); last step: "),
        "{summary}"
    );
    let s = p.service_status("api");
    assert_eq!(s["active"], "green", "{s}");
    assert_eq!(s["weights"], serde_json::json!({"blue": 0, "green": 100}));
    assert!(answers.iter().all(|(code, _)| *code == 200));
    assert!(answers.iter().any(|(_, b)| b == "green"));
    let e = events(&p);
    let mine: Vec<(&str, &str)> = e
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        mine,
        vec![
            (
                "deploy:token:default",
                "release 2: deploy step 1/2, green 50 %"
            ),
            (
                "deploy:token:default",
                "release 2: deploy step 2/2, green 100 %"
            ),
            (
                "deploy:token:default",
                "deploy done: green 100 % after 2 step(s)"
            ),
        ]
    );
    // The watcher takes over the new color after the deploy.
    assert!(poll_until(Duration::from_secs(5), || {
        p.service_status("api")["rollback"]["watching"] == true
    }));
}

#[test]
fn a_green_failing_mid_canary_is_rolled_back_with_exit_code_3() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let hooks = Webhooks::start();
    let dir = tempfile::tempdir().unwrap();
    let config =
        deployable_api(&blue, &green) + &hooks.config(dir.path(), "[\"deploy\", \"rollback\"]");
    let p = ProxyBuilder::new(config).start();
    // It passes its health check but answers 500 to everything else.
    green.set_status(Some(500));
    let load = Load::start(&format!("{}/orders", p.http_url()), 2, 3000);
    // `--json` after the subcommand, as a pipeline writes it.
    let out = p.ctl(&[
        "deploy",
        "api",
        "--json",
        "--to",
        "green",
        "--steps",
        "20,100",
        "--interval",
        "10s",
        "--wait-healthy",
        "10s",
    ]);
    drop(load);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    // --json: one JSON object on stdout; progress went to stderr.
    let v: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["phase"], "rolled_back", "{v}");
    assert_eq!(v["step"], 1, "{v}");
    let outcome = v["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("deploy rolled back at step 1/2 (green 20 %): 5xx 100 % > 1 % over "),
        "{outcome}"
    );
    assert!(
        v["summary"].as_str().unwrap().contains("ROLLED BACK"),
        "{v}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("api: waiting for green to be healthy"),
        "{stderr}"
    );
    let s = p.service_status("api");
    assert_eq!(
        (s["active"].as_str(), s["weights"]["blue"].as_u64()),
        (Some("blue"), Some(100)),
        "{s}"
    );
    let last = events(&p).pop().unwrap();
    assert_eq!(last["actor"], "deploy:token:default", "{last}");
    assert_eq!(last["reason"], outcome, "{last}");
    // Notified: the start, the rollback with its figures, the end.
    let posts = hooks.wait(3);
    let seen: Vec<(&str, &str)> = posts
        .iter()
        .map(|v| (v["event"].as_str().unwrap(), v["summary"].as_str().unwrap()))
        .collect();
    assert!(
        seen[0].0 == "deploy"
            && seen[0]
                .1
                .starts_with("api: deploy to green started by token:default"),
        "{seen:?}"
    );
    assert_eq!(posts[1]["event"], "rollback", "{seen:?}");
    assert_eq!(posts[1]["reason"], outcome, "{seen:?}");
    assert!(
        seen[2].0 == "deploy"
            && seen[2]
                .1
                .starts_with("api: rolled back: deploy rolled back at step 1/2"),
        "{seen:?}"
    );
}

/// Starts `ctl deploy api --to green --steps 50,100 --interval 30s` with
/// `extra` and waits until it is at step 1.
fn deploy_at_step_one(p: &Proxy, extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "deploy",
        "api",
        "--to",
        "green",
        "--steps",
        "50,100",
        "--interval",
        "30s",
    ];
    args.extend_from_slice(extra);
    let child = p.spawn_ctl(&args);
    wait_deploy(p, "deploy at step 1", |v| {
        v["phase"] == "step" && v["step"] == 1
    });
    child
}

/// The state `ctl weights api 80 20` leaves: what a deploy must restore.
fn split_80_20(p: &Proxy) {
    let out = p.ctl(&["weights", "api", "80", "20", "--reason", "earlier canary"]);
    assert!(out.status.success(), "{}", describe(&out));
}

fn assert_state_80_20(p: &Proxy) {
    let s = p.service_status("api");
    assert_eq!(
        s["weights"],
        serde_json::json!({"blue": 80, "green": 20}),
        "{s}"
    );
    assert_eq!(s["active"], "blue", "{s}");
    assert!(s["previous"].is_null(), "{s}");
}

#[test]
fn ctrl_c_aborts_and_restores_the_state_from_before() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    assert!(poll_until(Duration::from_secs(10), || p
        .health_of("api", &green.addr())
        == "healthy"));
    split_80_20(&p);
    let child = deploy_at_step_one(&p, &[]);
    assert_eq!(p.service_status("api")["weights"]["green"], 50);
    // SAFETY: signals the ctl child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl deploy");
    assert_eq!(out.status.code(), Some(130), "{}", describe(&out));
    let summary = stdout(&out);
    let summary = summary.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("deploy api -> green: aborted by Ctrl-C after ")
            && summary.ends_with("now blue 80 / green 20"),
        "{summary}"
    );
    assert_state_80_20(&p);
    let last = events(&p).pop().unwrap();
    assert_eq!(last["actor"], "deploy:token:default", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("deploy aborted by token:default; restoring the state from before"),
        "{last}"
    );
}

#[test]
fn a_ctl_that_dies_lets_the_lease_run_out_and_the_state_is_restored() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    assert!(poll_until(Duration::from_secs(10), || p
        .health_of("api", &green.addr())
        == "healthy"));
    split_80_20(&p);
    let mut child = deploy_at_step_one(&p, &["--lease", "3s"]);
    child.kill().expect("kill ctl");
    let _ = child.wait();
    // Polled through /status: a poll of the deploy with the token that
    // started it would renew its lease.
    assert!(
        poll_until(Duration::from_secs(10), || {
            p.service_status("api")["weights"]["green"] == 20
        }),
        "not restored: {}",
        p.service_status("api")
    );
    let (_, v) = p.admin("GET", "/services/api/deploy", None);
    assert_eq!(v["phase"], "aborted", "{v}");
    assert!(
        v["outcome"]
            .as_str()
            .unwrap()
            .starts_with("deploy abandoned: no progress poll for 3 s"),
        "{v}"
    );
    assert_state_80_20(&p);
}

#[test]
fn a_second_deploy_is_refused_naming_the_first() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    let first = deploy_at_step_one(&p, &[]);
    let (code, v) = p.admin("POST", "/services/api/deploy", Some("{\"to\":\"green\"}"));
    assert_eq!(code, 409, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "a deploy of api to green is already running: started by deploy:token:default at 20"
        ),
        "{error}"
    );
    assert!(error.contains("(step 1 of 2)"), "{error}");
    let second = p.ctl(&["deploy", "api", "--to", "green"]);
    assert_eq!(second.status.code(), Some(5), "{}", describe(&second));
    assert!(stdout(&second).contains("not started: a deploy of api to green is already running"));
    // Aborted from elsewhere: the first ctl ends with "failed" (4).
    let abort = p.ctl(&["deploy", "api", "--abort"]);
    assert!(abort.status.success(), "{}", describe(&abort));
    assert!(stdout(&abort).contains("api: aborted: deploy aborted by token:default"));
    let out = wait_output_with_deadline(first, Duration::from_secs(15), "first ctl deploy");
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(p.active("api"), "blue");
    assert_eq!(p.service_status("api")["weights"]["blue"], 100);
}

/// A plan out of range is refused with the range the proxy really
/// enforces and the value it got, so the operator knows what to type;
/// nothing starts.
#[test]
fn a_plan_out_of_range_names_the_real_range_and_the_value() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    for (flag, value, range) in [
        ("--lease", "2s", "lease must be 3 s to 10 min, got 2 s"),
        ("--lease", "11m", "lease must be 3 s to 10 min, got 11 min"),
        (
            "--interval",
            "500ms",
            "interval must be 1 s to 1 h, got 500 ms",
        ),
        ("--interval", "2h", "interval must be 1 s to 1 h, got 2 h"),
        (
            "--wait-healthy",
            "61m",
            "wait_healthy must be 0 s to 1 h, got 61 min",
        ),
    ] {
        let out = p.ctl(&["deploy", "api", "--to", "green", flag, value]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{flag} {value}: {}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(range), "{flag} {value}: {err}");
    }
    assert_eq!(p.active("api"), "blue");
    assert!(events(&p).is_empty());
}

/// A reload that removes the service a deploy runs on ends the deploy
/// saying so (not "changed by someone else"), and the ctl that follows
/// it reports that outcome (exit 4) instead of losing it to a 404.
#[test]
fn a_reload_removing_the_service_ends_its_deploy_saying_why() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let web = service_with("web", &[&blue], &[&green], "blue", "");
    let p = ProxyBuilder::new(format!("{web}{}", deployable_api(&blue, &green))).start();
    let child = deploy_at_step_one(&p, &[]);
    std::fs::write(p.config_path(), format!("{web}{}", route(None, "/", "web"))).unwrap();
    let (code, v) = p.admin("POST", "/reload", None);
    assert_eq!(code, 200, "{v}");
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl deploy");
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("api was removed by a config reload"),
        "{summary}"
    );
}

/// CI runners cancel a job with SIGTERM (and an SSH session that drops
/// hangs up with SIGHUP), not Ctrl-C: the ctl restores the state from
/// before at once, as for Ctrl-C, rather than leaving the canary running
/// until the lease runs out.
#[test]
fn sigterm_and_sighup_abort_like_ctrl_c() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let child = deploy_at_step_one(&p, &[]);
        // SAFETY: signals the ctl child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl deploy");
        assert_eq!(
            out.status.code(),
            Some(130),
            "signal {signal}: {}",
            describe(&out)
        );
        assert_eq!(p.active("api"), "blue");
        assert_eq!(p.service_status("api")["weights"]["blue"], 100);
        // The summary names the signal, not Ctrl-C.
        let name = if signal == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGHUP"
        };
        let text = stdout(&out);
        assert!(
            text.contains(&format!("aborted by {name} after ")),
            "{text}"
        );
        let last = events(&p).pop().unwrap();
        assert!(
            last["reason"]
                .as_str()
                .unwrap()
                .starts_with("deploy aborted by token:default"),
            "{last}"
        );
    }
}

/// `ctl deploy` run over SSH without a terminal (the shipped workflow)
/// gets no signal when the job is cancelled: its output pipe closes. The
/// next progress line it cannot write aborts the deploy and restores the
/// state at once, as Ctrl-C does, instead of a panic and the lease.
#[test]
fn a_closed_output_aborts_and_restores() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    let mut child = deploy_at_step_one(&p, &["--lease", "10m"]);
    drop(child.stdout.take());
    let out = wait_output_with_deadline(child, Duration::from_secs(20), "ctl deploy");
    assert_eq!(out.status.code(), Some(130), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        describe(&out)
    );
    assert_eq!(p.active("api"), "blue");
    assert_eq!(p.service_status("api")["weights"]["blue"], 100);
}

/// A deploy that ends without having made the last change (someone
/// changed the service while it waited for health, then it was aborted)
/// leaves that change alone: it restores only its own work, never over
/// an operator's later command.
#[test]
fn an_abort_never_undoes_a_change_made_by_someone_else() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    green.set_healthy(false);
    let p = ProxyBuilder::new(deployable_api(&blue, &green)).start();
    let child = p.spawn_ctl(&["deploy", "api", "--to", "green", "--wait-healthy", "60s"]);
    wait_deploy(&p, "deploy waiting for health", |v| {
        v["phase"] == "waiting_healthy"
    });
    // Meanwhile an operator moves the service by hand.
    let out = p.ctl(&[
        "weights", "api", "80", "20", "--force", "--reason", "by hand",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    // SAFETY: signals the ctl child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = wait_output_with_deadline(child, Duration::from_secs(15), "ctl deploy");
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("changed by someone else"),
        "{}",
        describe(&out)
    );
    assert_state_80_20(&p);
    let last = events(&p).pop().unwrap();
    assert_eq!(last["actor"], "token:default", "{last}");
}
