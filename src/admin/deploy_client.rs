//! `switchyard ctl deploy`: starts a deploy in the proxy (`POST
//! /services/NAME/deploy`), follows it (`GET`, which also renews the
//! deploy's lease), prints progress and a one-line summary, and turns the
//! outcome into an exit code. Ctrl-C (SIGINT) aborts it (`DELETE`), which
//! restores the state from before the deploy.
//!
//! Exit codes: [`EXIT_DONE`] 0, [`EXIT_ROLLED_BACK`] 3, [`EXIT_FAILED`] 4,
//! [`EXIT_REFUSED`] 5, [`EXIT_INTERRUPTED`] 130; 1 for any other error
//! (admin API unreachable, bad token, a bad plan), as every `ctl` command,
//! and 2 for arguments the command line parser refuses (clap's usage error).

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api::Command;
use super::client::{Client, ClientError};
use crate::canary::{show_percent, show_secs};
use crate::deploy::Plan;

/// The deploy reached 100 % on the target and passed every step.
pub const EXIT_DONE: u8 = 0;
/// A gate failed and traffic was rolled back.
pub const EXIT_ROLLED_BACK: u8 = 3;
/// The deploy could not go on: the target never became healthy, a step
/// was refused, someone else changed the service, or another caller
/// aborted it.
pub const EXIT_FAILED: u8 = 4;
/// The deploy did not start: another one holds the service (409), or
/// there is nothing to deploy.
pub const EXIT_REFUSED: u8 = 5;
/// Ctrl-C: the deploy was aborted and the state from before restored.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How often the deploy is polled (1 s): well inside its lease.
pub const POLL: Duration = Duration::from_secs(1);
/// A progress line is printed when the phase or step changes, and at
/// least this often otherwise (5 s).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often a wait looks for Ctrl-C (100 ms).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// What interrupted the deploy: 0 nothing yet, else the signal number
/// (SIGINT, SIGTERM, SIGHUP) or [`CLOSED_OUTPUT`].
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);
/// Nobody reads the progress any more (a closed pipe).
const CLOSED_OUTPUT: i32 = -1;

extern "C" fn on_interrupt(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(signal, Ordering::SeqCst);
}

/// How the summary names what interrupted the deploy.
fn interrupted_by() -> &'static str {
    match INTERRUPTED.load(Ordering::SeqCst) {
        libc::SIGINT => "Ctrl-C",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        CLOSED_OUTPUT => "a closed output",
        _ => "an interrupt",
    }
}

/// How long `ctl deploy` keeps asking when the admin API does not answer
/// a poll (10 s) before it gives up; the deploy's lease ends it in the
/// proxy if nobody polls.
const POLL_RETRY_FOR: Duration = Duration::from_secs(10);

/// Ctrl-C, and the signals a cancelled CI job or a dropped SSH session
/// sends (SIGTERM, SIGHUP), all abort the deploy and restore the state
/// from before it at once, rather than leaving the canary to the lease.
fn catch_interrupt() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

/// How a deploy ended, for `main`: the exit code and the summary line
/// (already printed).
#[derive(Debug, thiserror::Error)]
#[error("{summary}")]
pub struct DeployExit {
    pub code: u8,
    pub summary: String,
}

/// Runs `ctl deploy SERVICE`: start, follow, summarize. Progress lines go
/// to standard output (standard error with `json`, which prints one JSON
/// object at the end instead of the summary). `Ok` on success; a
/// [`DeployExit`] error carries any other outcome's exit code.
pub fn deploy(client: &Client, service: &str, plan: Plan, json: bool) -> anyhow::Result<()> {
    catch_interrupt();
    let say = |line: &str| {
        let written = match json {
            true => writeln!(std::io::stderr(), "{line}"),
            false => writeln!(std::io::stdout(), "{line}"),
        };
        // Nobody reads any more (over SSH without a terminal, a cancelled
        // job closes the pipe and sends no signal): abort as for Ctrl-C.
        if written.is_err() {
            let _ =
                INTERRUPTED.compare_exchange(0, CLOSED_OUTPUT, Ordering::SeqCst, Ordering::SeqCst);
        }
    };
    let started = Instant::now();
    let cmd = Command::Deploy {
        service: service.to_string(),
        plan: plan.clone(),
    };
    let mut last = match client.send(&cmd) {
        Ok(v) => v,
        Err(ClientError::Refused {
            status: 409,
            message,
        }) => {
            let summary = format!("deploy {service} -> {}: not started: {message}", plan.to);
            return finish(json, EXIT_REFUSED, summary, json!({ "error": message }));
        }
        Err(e) => return Err(e.into()),
    };
    let status = Command::DeployStatus {
        service: service.to_string(),
    };
    let mut shown = (String::new(), Instant::now());
    let mut interrupted = false;
    while last["running"] == true {
        let line = progress_line(&last);
        let key = format!("{}{}", last["phase"], last["step"]);
        if key != shown.0 || shown.1.elapsed() >= PROGRESS_EVERY {
            say(&line);
            shown = (key, Instant::now());
        }
        if wait_or_interrupt(POLL) {
            interrupted = true;
            say(&format!(
                "{service}: interrupted: aborting the deploy and restoring the state from before it"
            ));
            last = match client.send(&Command::DeployAbort {
                service: service.to_string(),
            }) {
                Ok(v) => v,
                // It ended on its own meanwhile: its own outcome stands.
                Err(ClientError::Refused { status: 409, .. }) => client.send(&status)?,
                Err(e) => return Err(e.into()),
            };
            break;
        }
        last = match poll(client, &status, &say) {
            Ok(v) => v,
            // Interrupted while the poll was failing: abort at the loop's top.
            Err(_) if INTERRUPTED.load(Ordering::SeqCst) != 0 => continue,
            Err(e) => return Err(e.into()),
        };
    }
    let took = show_secs(Duration::from_secs(started.elapsed().as_secs()));
    let outcome = last["outcome"].as_str().unwrap_or("-").to_string();
    let to = plan.to;
    let (code, summary) = match (interrupted, last["phase"].as_str()) {
        (_, Some("done")) => (
            EXIT_DONE,
            format!(
                "deploy {service} -> {to}: done in {took}: {outcome}{}",
                last_figures(&last)
            ),
        ),
        (_, Some("rolled_back")) => (
            EXIT_ROLLED_BACK,
            format!("deploy {service} -> {to}: ROLLED BACK after {took}: {outcome}"),
        ),
        (true, _) => (
            EXIT_INTERRUPTED,
            format!(
                "deploy {service} -> {to}: aborted by {} after {took}: {outcome}; now {}",
                interrupted_by(),
                weights_text(&last["weights"])
            ),
        ),
        _ => (
            EXIT_FAILED,
            format!("deploy {service} -> {to}: FAILED after {took}: {outcome}"),
        ),
    };
    finish(json, code, summary, last)
}

/// Prints the summary (or, with `json`, the last progress with the exit
/// code and summary) and returns the outcome.
fn finish(json: bool, code: u8, summary: String, mut last: Value) -> anyhow::Result<()> {
    if json {
        // An answer that is not an object still gets its exit code.
        if !last.is_object() {
            last = json!({ "answer": last });
        }
        last["exit_code"] = json!(code);
        last["summary"] = json!(summary);
        // A closed output is no reason to panic: the exit code still says it.
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string(&last)?);
    } else {
        let _ = writeln!(std::io::stdout(), "{summary}");
    }
    match code {
        EXIT_DONE => Ok(()),
        _ => Err(DeployExit { code, summary }.into()),
    }
}

/// Sleeps `d`, or less when Ctrl-C comes; returns whether it did.
fn wait_or_interrupt(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if INTERRUPTED.load(Ordering::SeqCst) != 0 {
            return true;
        }
        std::thread::sleep(SIGNAL_CHECK.min(end.saturating_duration_since(Instant::now())));
    }
    INTERRUPTED.load(Ordering::SeqCst) != 0
}

/// One progress poll. A poll that gets no answer (a restart of the admin
/// listener, a network blip over SSH) is tried again for up to
/// [`POLL_RETRY_FOR`]; an answer that refuses is final.
fn poll(client: &Client, status: &Command, say: &dyn Fn(&str)) -> Result<Value, ClientError> {
    let give_up = Instant::now() + POLL_RETRY_FOR;
    loop {
        match client.send(status) {
            Err(e @ ClientError::Refused { .. }) => return Err(e),
            Err(e) if Instant::now() < give_up => {
                say(&format!("progress poll failed ({e}); trying again"));
                if wait_or_interrupt(POLL) {
                    return Err(e);
                }
            }
            other => return other,
        }
    }
}

fn weights_text(w: &Value) -> String {
    format!(
        "blue {} / green {}",
        w["blue"].as_u64().unwrap_or(0),
        w["green"].as_u64().unwrap_or(0)
    )
}

/// `; last step: 212 requests, 5xx 0 %, p95 35 ms`, when there are figures.
fn last_figures(p: &Value) -> String {
    let f = &p["live"];
    if !f.is_object() {
        return String::new();
    }
    format!("; last step: {}", figures(f))
}

fn figures(f: &Value) -> String {
    let p95 = match f["p95_ms"].as_u64() {
        Some(ms) => show_secs(Duration::from_millis(ms)),
        None => "-".into(),
    };
    format!(
        "{} requests, 5xx {}, p95 {p95}",
        f["requests"].as_u64().unwrap_or(0),
        show_percent(f["error_ratio"].as_f64().unwrap_or(0.0)),
    )
}

/// One line of progress: phase, step, health, request count, error ratio,
/// p95 and time left.
pub fn progress_line(p: &Value) -> String {
    let service = p["service"].as_str().unwrap_or("?");
    let to = p["to"].as_str().unwrap_or("?");
    let h = &p["health"];
    let health = match h["required"].as_u64() {
        Some(required) => format!(
            "{to} {} of {} healthy ({required} needed)",
            h["healthy"].as_u64().unwrap_or(0),
            h["backends"].as_u64().unwrap_or(0)
        ),
        None => format!("{to} not health-checked"),
    };
    let left = match p["time_left_s"].as_u64() {
        Some(s) => format!(", {s} s left"),
        None => String::new(),
    };
    match p["phase"].as_str() {
        Some("waiting_healthy") => {
            format!("{service}: waiting for {to} to be healthy: {health}{left}")
        }
        Some("step") => {
            let live = match p["live"].is_object() {
                true => figures(&p["live"]),
                false => "no requests yet".into(),
            };
            format!(
                "{service}: step {}/{} ({}): {health}; {live}{left}",
                p["step"].as_u64().unwrap_or(0),
                p["of"].as_u64().unwrap_or(0),
                weights_text(&p["weights"])
            )
        }
        Some(phase) => format!(
            "{service}: {phase}: {}",
            p["outcome"].as_str().unwrap_or("-")
        ),
        None => format!("{service}: {p}"),
    }
}
