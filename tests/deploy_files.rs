//! The shipped deployment files, read as systemd and GitHub Actions would:
//!
//! - `conf/systemd/switchyard.service`: a unit that systemd accepts
//!   (`systemd-analyze verify`, Debian package `systemd`, installed by
//!   `.ci/setup`: a missing one fails the test with a message, never a skip),
//!   runs switchyard in the foreground after `switchyard check`, reloads with
//!   SIGHUP, stops with the graceful signal and a timeout above the grace
//!   period, and carries the hardening options; installed as the README
//!   says (the shipped config with its state in the unit's StateDirectory),
//!   its config passes `switchyard check`. Its system call filter and W^X
//!   ban allow everything switchyard does from start through a socket
//!   handover to a drain, traced with `strace` (Debian package `strace`,
//!   installed by `.ci/setup`; missing, the test fails saying so).
//! - `deploy/github-actions.yml`: valid YAML whose deploy job finds the idle
//!   color, starts the release there, then runs `switchyard ctl deploy` over
//!   SSH with the admin token kept out of command lines and logs.
//!
//! Nothing here opens a connection beyond loopback.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_yaml::Value;

/// The repository root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// systemd unit

/// A unit file as systemd reads it: `[Section]` headers, `Key=Value` lines
/// (a key may repeat), `#` and `;` comments, `\` continuing a line.
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section: Option<String> = None;
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let line = format!("{pending}{line}");
            pending.clear();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_string());
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line {}: not KEY=VALUE: {raw}", n + 1));
            let section = section
                .clone()
                .unwrap_or_else(|| panic!("unit line {}: outside any [Section]", n + 1));
            entries.push((section, key.trim().to_string(), value.trim().to_string()));
        }
        assert!(pending.is_empty(), "unit ends inside a continued line");
        Unit { entries }
    }

    /// Every value of `key` in `section`, in file order.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in [Service].
    fn service(&self, key: &str) -> &str {
        match self.all("Service", key).as_slice() {
            [one] => one,
            [] => panic!("[Service] has no {key}="),
            many => panic!("[Service] sets {key}= {} times: {many:?}", many.len()),
        }
    }
}

fn unit() -> Unit {
    Unit::parse(&read("conf/systemd/switchyard.service"))
}

/// `BINARY run -c CONFIG` of ExecStart, split.
fn exec_start(unit: &Unit) -> (String, String) {
    let words: Vec<&str> = unit.service("ExecStart").split_whitespace().collect();
    match words.as_slice() {
        [bin, "run", "-c", config] => (bin.to_string(), config.to_string()),
        _ => panic!(
            "ExecStart should be `BINARY run -c CONFIG` (foreground: no -d, no -u), got {words:?}"
        ),
    }
}

#[test]
fn unit_runs_switchyard_in_the_foreground_after_check_and_reloads_with_sighup() {
    let unit = unit();
    let (bin, config) = exec_start(&unit);
    assert!(
        bin.starts_with('/') && bin.ends_with("/switchyard"),
        "{bin}"
    );
    assert!(
        config.starts_with('/'),
        "config path must be absolute: {config}"
    );

    // Foreground: systemd's main PID is switchyard itself.
    let kind = unit.service("Type");
    assert!(kind == "exec" || kind == "simple", "Type={kind}");
    assert!(unit.all("Service", "PIDFile").is_empty());

    // The same binary checks the same config before every start.
    let check = format!("{bin} check -c {config}");
    assert!(
        unit.all("Service", "ExecStartPre")
            .contains(&check.as_str()),
        "no ExecStartPre={check}"
    );

    assert_eq!(unit.service("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit.service("Restart"), "on-failure");
}

#[test]
fn unit_stops_with_the_draining_signal_within_its_timeout() {
    let unit = unit();
    // SIGTERM drains (src/shutdown.rs); SIGINT would cut requests off.
    assert_eq!(unit.service("KillSignal"), "SIGTERM");
    let timeout = switchyard::config::parse_duration(unit.service("TimeoutStopSec"))
        .expect("TimeoutStopSec in switchyard's duration syntax, e.g. 45s");
    // The shipped config's grace period, plus Pingora's teardown (1 s after
    // its own grace period of grace_period + 1 s).
    let config = switchyard::config::Config::load(&root().join("conf/switchyard.toml"))
        .expect("shipped config loads");
    let longest_drain = config.server.grace_period + Duration::from_secs(2);
    assert!(
        timeout > longest_drain,
        "TimeoutStopSec={timeout:?} would SIGKILL a drain of up to {longest_drain:?}"
    );
}

#[test]
fn unit_is_hardened_and_binds_low_ports_with_one_capability() {
    let unit = unit();
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
    ] {
        assert_eq!(unit.service(key), value, "{key}");
    }
    let families: Vec<&str> = unit.service("RestrictAddressFamilies").split(' ').collect();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    let filters = unit.all("Service", "SystemCallFilter");
    assert!(filters.contains(&"@system-service"), "{filters:?}");

    // A limit high enough that the computed max_connections is generous
    // (nginx's 768 ran out in a real flood).
    let nofile: u64 = unit.service("LimitNOFILE").parse().expect("a number");
    let max = switchyard::connections::default_max_connections(
        nofile,
        switchyard::config::DEFAULT_UPSTREAM_KEEPALIVE_POOL,
    );
    assert!(
        max >= 10_000,
        "LimitNOFILE={nofile} gives max_connections {max}"
    );
}

#[test]
fn unit_user_and_state_directory_match_the_installed_config() {
    let unit = unit();
    assert_eq!(unit.service("User"), "switchyard");
    assert!(unit.all("Service", "DynamicUser").is_empty());
    let state = unit.service("StateDirectory");
    let (_, config) = exec_start(&unit);
    // Relative paths of the config (conf/admin.token) resolve next to it.
    let etc = Path::new(&config).parent().expect("config in a directory");
    assert_eq!(Path::new(unit.service("WorkingDirectory")), etc);

    // Install as the README says, under a temporary root: the shipped config
    // with state_dir in the StateDirectory and the named `ci` token on.
    let readme = read("README.md");
    let state_dir = format!("/var/lib/{state}");
    let edit = format!("state_dir = \"{state_dir}\"");
    assert!(
        readme.contains(&edit),
        "the README's install does not set {edit}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let installed_etc = tmp.path().join(etc.strip_prefix("/").unwrap());
    let installed_state = tmp.path().join(state_dir.trim_start_matches('/'));
    fs::create_dir_all(installed_etc.join("conf")).unwrap();
    fs::create_dir_all(&installed_state).unwrap();
    let text = install_config(&read("conf/switchyard.toml"), &installed_state);
    let installed = installed_etc.join(Path::new(&config).file_name().unwrap());
    fs::write(&installed, text).unwrap();
    fs::copy(
        root().join("conf/maintenance.html"),
        installed_etc.join("conf/maintenance.html"),
    )
    .unwrap();
    for (name, token) in [("admin", TOKEN), ("ci", "ci-token-0123456789abcdef")] {
        let path = installed_etc.join(format!("conf/{name}.token"));
        fs::write(&path, token).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    let out = run_check(&installed, Some(&installed_etc));
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("warning"), "{stdout}");
}

/// The README's two edits of the shipped config, with `state_dir` under a
/// test root. Each must apply: a changed shipped config fails here, so the
/// README's install commands get updated with it.
fn install_config(shipped: &str, state_dir: &Path) -> String {
    let from = "state_dir = \"state\"";
    assert!(shipped.contains(from), "shipped config has no `{from}`");
    let ci = "# [[admin.tokens]]\n# name = \"ci\"\n# file = \"conf/ci.token\"";
    assert!(
        shipped.contains(ci),
        "shipped config has no commented ci token"
    );
    shipped
        .replacen(
            from,
            &format!("state_dir = {}", toml_str(&state_dir.display().to_string())),
            1,
        )
        .replacen(ci, &ci.replace("# ", ""), 1)
}

#[test]
fn systemd_accepts_the_unit() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze not found: install the `systemd` package (.ci/setup does)"
    );
    let unit = unit();
    // An offline root with the unit, the programs it runs (stand-ins: verify
    // only checks that they are executable) and systemd's own units.
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let (bin, _) = exec_start(&unit);
    for program in [bin.as_str(), "/bin/kill"] {
        let path = r.join(program.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let units = r.join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::copy(
        root().join("conf/systemd/switchyard.service"),
        units.join("switchyard.service"),
    )
    .unwrap();
    fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", describe(&copied));

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", r.display()))
        .arg(units.join("switchyard.service"))
        .output()
        .unwrap();
    // verify exits 0 on an unknown key, but says so: both must be clean.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "{}",
        describe(&out)
    );
}

/// The system calls a `SystemCallFilter=` entry names: `@group`s expanded
/// by `systemd-analyze syscall-filter`, recursively.
fn syscall_group(entry: &str) -> std::collections::BTreeSet<String> {
    if !entry.starts_with('@') {
        return [entry.to_string()].into();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", entry])
        .output()
        .expect("systemd-analyze: install the `systemd` package (.ci/setup does)");
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = text
        .lines()
        .skip(1) // the group's own name
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    names.into_iter().flat_map(syscall_group).collect()
}

/// The names of the system calls in an `strace -f` log.
fn traced_syscalls(log: &str) -> std::collections::BTreeSet<String> {
    log.lines()
        .filter_map(|line| {
            // "PID name(args) = result" or "PID <... name resumed> ...".
            let rest = line.split_once(' ')?.1.trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let next = rest[name.len()..].chars().next();
            (!name.is_empty() && matches!(next, Some('(') | Some(' '))).then_some(name)
        })
        .collect()
}

/// A switchyard run under strace; killed (both) if the test ends first.
struct Traced {
    strace: std::process::Child,
    pid: i32,
}

impl Drop for Traced {
    fn drop(&mut self) {
        if !matches!(self.strace.try_wait(), Ok(Some(_))) {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.strace.kill();
            let _ = self.strace.wait();
        }
    }
}

/// Starts `switchyard ARGS` under `strace -f` writing to `log`.
fn traced(dir: &Path, log: &Path, args: &[&str]) -> Traced {
    use std::os::unix::process::CommandExt;
    let stderr = fs::File::create(log.with_extension("err")).unwrap();
    let mut cmd = Command::new("strace");
    // A soft open-file limit below the hard one, so switchyard raises it
    // (src/connections.rs) and the trace holds that call too.
    // SAFETY: getrlimit and setrlimit are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max.min(4096) / 2;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut strace = cmd
        .args(["-f", "-qq", "-o"])
        .arg(log)
        .arg(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove(TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("strace: install the `strace` package (.ci/setup does)");
    // strace forks short-lived helpers of its own first: the child that
    // matters is the one that has become switchyard.
    let children = format!("/proc/{0}/task/{0}/children", strace.id());
    let is_switchyard = |pid: &i32| {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "switchyard")
    };
    let mut pid = None;
    let found = poll_until(READY_DEADLINE, || {
        pid = fs::read_to_string(&children).ok().and_then(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .find(is_switchyard)
        });
        pid.is_some()
    });
    if !found {
        let _ = strace.kill();
        let _ = strace.wait();
        panic!("strace started no switchyard");
    }
    Traced {
        strace,
        pid: pid.unwrap(),
    }
}

/// Waits for a traced run (logging to `log`) to end; kills it at the
/// deadline and shows its stderr.
fn wait_traced(run: &mut Traced, log: &Path, what: &str) {
    let done = poll_until(Duration::from_secs(30), || {
        matches!(run.strace.try_wait(), Ok(Some(_)))
    });
    if !done {
        let stderr = fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        let trace = fs::read_to_string(log).unwrap_or_default();
        let signals: Vec<&str> = trace
            .lines()
            .filter(|l| l.contains("--- SIG") || l.contains("+++"))
            .collect();
        panic!("{what} did not exit; its stderr:\n{stderr}\nsignals: {signals:?}");
    }
}

/// `SystemCallFilter=` and `MemoryDenyWriteExecute=` would make any call
/// outside them fail: every system call switchyard makes while starting,
/// serving, switching, handing its sockets to a new process (`run -u`,
/// SIGQUIT) and draining must be in the unit's filter, and no memory may
/// become writable and executable or executable after mapping.
#[test]
fn unit_syscall_filter_and_wx_ban_allow_what_switchyard_does() {
    let unit = unit();
    let mut allowed = std::collections::BTreeSet::new();
    let mut denied = std::collections::BTreeSet::new();
    for entry in unit.all("Service", "SystemCallFilter") {
        for word in entry.split_whitespace() {
            match word.strip_prefix('~') {
                Some(deny) => denied.extend(syscall_group(deny)),
                None => allowed.extend(syscall_group(word)),
            }
        }
    }
    assert!(allowed.contains("prlimit64") && !denied.contains("prlimit64"));

    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let dir = tempfile::tempdir().unwrap();
    let [http, admin] = free_ports::<2>();
    let token = dir.path().join("admin.token");
    fs::write(&token, TOKEN).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "[server]\nthreads = 2\ngrace_period = \"5s\"\nstate_dir = \"state\"\n\n\
         [listen]\nhttp = \"127.0.0.1:{http}\"\nadmin = \"127.0.0.1:{admin}\"\n\n\
         [admin]\ntoken_file = \"admin.token\"\n\n{}",
        simple_api(&blue, &green)
    );
    fs::write(dir.path().join("switchyard.toml"), config).unwrap();
    let url = format!("http://127.0.0.1:{http}/");
    let admin_url = format!("http://127.0.0.1:{admin}");
    let args = ["run", "-c", "switchyard.toml"];

    let old_log = dir.path().join("old.strace");
    let mut old = traced(dir.path(), &old_log, &args);
    assert!(
        poll_until(READY_DEADLINE, || try_get(&agent(), &url, None).is_ok()),
        "switchyard under strace did not serve"
    );
    for _ in 0..20 {
        assert_eq!(get(&url, None).0, 200);
    }
    let out = run_ctl(&admin_url, Some(TOKEN), &["switch", "api", "green"]);
    assert!(out.status.success(), "{}", describe(&out));

    // The binary upgrade: a new process takes the sockets over.
    let new_log = dir.path().join("new.strace");
    let mut new = traced(
        dir.path(),
        &new_log,
        &["run", "-u", "-c", "switchyard.toml"],
    );
    let sock = dir.path().join("state/upgrade.sock");
    assert!(
        poll_until(READY_DEADLINE, || sock.exists()),
        "no upgrade socket"
    );
    assert_eq!(unsafe { libc::kill(old.pid, libc::SIGQUIT) }, 0);
    wait_traced(&mut old, &old_log, "the old process");
    assert_eq!(get(&url, None), (200, "green".to_string()));
    assert_eq!(unsafe { libc::kill(new.pid, libc::SIGTERM) }, 0);
    wait_traced(&mut new, &new_log, "the new process");

    let mut log = fs::read_to_string(&old_log).unwrap();
    log.push_str(&fs::read_to_string(&new_log).unwrap());
    assert!(
        log.contains("SCM_RIGHTS"),
        "no socket handover in the trace"
    );
    assert!(
        log.contains("prlimit64(0, RLIMIT_NOFILE, {"),
        "no raise of the open-file limit in the trace"
    );
    let used = traced_syscalls(&log);
    assert!(used.len() > 20, "too few system calls traced: {used:?}");
    let outside: Vec<&String> = used
        .iter()
        .filter(|s| !allowed.contains(*s) || denied.contains(*s))
        .collect();
    assert!(
        outside.is_empty(),
        "system calls the unit's filter refuses: {outside:?}"
    );
    for line in log.lines() {
        let wx = line.contains("PROT_WRITE") && line.contains("PROT_EXEC");
        let made_executable = line.contains("mprotect(") && line.contains("PROT_EXEC");
        assert!(
            !wx && !made_executable,
            "MemoryDenyWriteExecute refuses: {line}"
        );
    }
}

// ---------------------------------------------------------------------------
// CD workflow

fn workflow() -> Value {
    serde_yaml::from_str(&read("deploy/github-actions.yml")).expect("valid YAML")
}

fn steps(job: &Value) -> Vec<&Value> {
    job["steps"]
        .as_sequence()
        .expect("a job with steps")
        .iter()
        .collect()
}

fn run_of(step: &Value) -> &str {
    step["run"].as_str().unwrap_or("")
}

#[test]
fn workflow_builds_then_deploys_through_ctl_deploy_on_push_to_main() {
    let wf = workflow();
    let branches = wf["on"]["push"]["branches"].as_sequence().expect("on.push");
    assert!(branches.iter().any(|b| b == "main"), "{branches:?}");

    let jobs = &wf["jobs"];
    assert!(jobs["build"]["steps"].is_sequence(), "no build job");
    let deploy = &jobs["deploy"];
    assert_eq!(deploy["needs"], "build");
    let steps = steps(deploy);
    let position = |needle: &str| {
        steps
            .iter()
            .position(|s| run_of(s).contains(needle))
            .unwrap_or_else(|| panic!("no deploy step runs `{needle}`"))
    };
    // The host-side command every `ctl` call runs, against the loopback API.
    let ctl = position("exec switchyard ctl --admin 127.0.0.1:9900");
    let idle = position("ctl --json status");
    let start = position("systemctl restart $SERVICE@$IDLE");
    let canary = position("ctl --json deploy \"$SERVICE\" --to \"$IDLE\"");
    assert!(ctl < idle && idle < start && start < canary);
    let canary_run = run_of(steps[canary]);
    assert!(canary_run.contains("--steps 10,50,100 --interval 60s"));
    // A rollback's non-zero exit must fail the step despite the `tee`.
    assert!(canary_run.contains("set -o pipefail"));

    let report = steps
        .iter()
        .find(|s| s["if"] == "failure()")
        .expect("a step reporting a failed deploy");
    assert!(run_of(report).contains("DISCORD_WEBHOOK"));
}

#[test]
fn workflow_keeps_the_admin_token_out_of_command_lines_and_logs() {
    let env_name = switchyard::admin::auth::TOKEN_ENV;
    let secret = format!("${{{{ secrets.{env_name} }}}}");
    let wf = workflow();
    // Not workflow- or job-wide: only the steps that call ctl see it.
    assert!(wf["env"].get(env_name).is_none());
    let deploy = &wf["jobs"]["deploy"];
    assert!(deploy["env"].get(env_name).is_none());
    let mut users = 0;
    for step in steps(deploy) {
        let run = run_of(step);
        if let Some(value) = step["env"].get(env_name) {
            assert_eq!(value, secret.as_str());
            assert!(run.contains(". ./ctl.sh"), "{run}");
            users += 1;
        }
        // The only read of the token: piped to ssh's stdin.
        let reads = run.matches(&format!("${env_name}")).count()
            + run.matches(&format!("${{{env_name}")).count();
        let piped = run
            .matches(&format!("printf '%s\\n' \"${env_name}\" |"))
            .count();
        assert_eq!(
            reads, piped,
            "the token is used other than on ssh's stdin:\n{run}"
        );
        assert!(!run.contains("set -x"), "set -x would print the token");
        // `${{ secrets.X }}` in a script is pasted into its text.
        assert!(
            !run.contains("secrets."),
            "a secret in a script's text:\n{run}"
        );
    }
    assert_eq!(users, 2, "the idle-color and ctl deploy steps");
}
