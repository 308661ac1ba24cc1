//! The `switchyard` command line: run | check | demo | ctl. Everything real
//! lives in the library; this file parses arguments and prints results.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;

use switchyard::admin::api::Command;
use switchyard::admin::auth;
use switchyard::admin::client::{self, Client};
use switchyard::admin::deploy_client;
use switchyard::check::check_files;
use switchyard::config::{self, Config};
use switchyard::demo::{self, SampleUpstream};
use switchyard::pools::{Color, Weights};
use switchyard::{cleanup, RunOptions, Switchyard};

/// glibc malloc showed up as ~12 % of proxy CPU under load (Pingora allocates
/// per request); mimalloc's thread-local free lists cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (option 4 of `mi_option_t` in
/// mimalloc v2 and v3, `mimalloc.h`; libmimalloc-sys names no constant for it).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

extern "C" {
    /// mimalloc's option setter (`mimalloc.h`), linked with the allocator.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Makes mimalloc commit its arenas as they are used instead of all at once:
/// with eager commit each idle WebSocket held 182 KiB of resident memory
/// against 61 KiB without (`.ci/bench ws-idle`, 9 000 of them), at the same
/// CPU per request (`small`, against bare Pingora in the same run). Set
/// first thing in `main`, before the runtime allocates in earnest.
fn commit_memory_on_demand() {
    // SAFETY: sets one integer option, which mimalloc reads whenever it
    // reserves memory; no pointer is passed.
    unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

#[derive(Parser)]
#[command(version, about = "Edge reverse proxy with atomic blue/green switching")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve traffic with a configuration file.
    Run {
        #[arg(short, long, default_value = "conf/switchyard.toml")]
        config: PathBuf,
        /// Take over the listening sockets of a running switchyard (send it SIGQUIT).
        #[arg(short, long)]
        upgrade: bool,
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a configuration file (and the token, state and page files it names), like `nginx -t`.
    Check {
        #[arg(short, long, default_value = "conf/switchyard.toml")]
        config: PathBuf,
    },
    /// Run the proxy with built-in blue and green sample upstreams on loopback.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = demo::DEFAULT_HTTP)]
        http: std::net::SocketAddr,
        /// Where the demo admin API listens.
        #[arg(long, default_value = demo::DEFAULT_ADMIN)]
        admin: std::net::SocketAddr,
    },
    /// Talk to a running switchyard's admin API.
    ///
    /// Where: --admin, else [listen] admin of the -c config, else 127.0.0.1:9900.
    /// Token: --token-file, else $SWITCHYARD_ADMIN_TOKEN, else admin.token_file of the -c config.
    Ctl {
        /// Read the admin address and token file from this config file.
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// The admin API: HOST:PORT, [IPV6]:PORT or http://HOST:PORT (else -c CONFIG's [listen] admin, else 127.0.0.1:9900).
        #[arg(long, value_name = "ADDRESS")]
        admin: Option<String>,
        /// Read the token from this file (mode 0600); wins over $SWITCHYARD_ADMIN_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Print the raw JSON reply, for scripts (before or after the subcommand).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Show every service: active color and pools.
    Status,
    /// Send all new requests of SERVICE to COLOR.
    Switch {
        /// A service name from the config, e.g. `web`.
        service: String,
        /// The color to switch to.
        #[arg(value_parser = ["blue", "green"])]
        color: String,
        /// Recorded in the history.
        #[arg(long)]
        reason: Option<String>,
        /// Switch even if COLOR has too few healthy backends; with
        /// [cluster] and Redis unreachable, switch this instance only.
        #[arg(long)]
        force: bool,
        /// First wait up to this long (e.g. 60s) for COLOR to become healthy.
        #[arg(long, value_parser = config::parse_duration, value_name = "DURATION")]
        wait_healthy: Option<Duration>,
        /// Then wait up to this long (e.g. 120s) for the old color's requests to finish.
        #[arg(long, value_parser = config::parse_duration, value_name = "DURATION")]
        wait_drained: Option<Duration>,
    },
    /// Switch SERVICE back to the color it had before the last switch.
    Rollback {
        /// A service name from the config, e.g. `web`.
        service: String,
        /// Recorded in the history.
        #[arg(long)]
        reason: Option<String>,
        /// Roll back even if the previous color has too few healthy backends.
        #[arg(long)]
        force: bool,
    },
    /// Split SERVICE's new requests between blue and green, in percent (a canary).
    ///
    /// `ctl weights api 90 10` sends 10 % of new requests to green; `0 100` is a switch to green.
    Weights {
        /// A service name from the config, e.g. `api`.
        service: String,
        /// Percent of new requests for blue, 0 to 100.
        blue: u64,
        /// Percent of new requests for green; blue + green = 100.
        green: u64,
        /// Recorded in the history.
        #[arg(long)]
        reason: Option<String>,
        /// Give traffic to a color even if it has too few healthy backends;
        /// with [cluster] and Redis unreachable, on this instance only.
        #[arg(long)]
        force: bool,
    },
    /// Answer SERVICE's requests with 503 and the maintenance page (on), or serve again (off).
    Maintenance {
        /// A service name from the config, e.g. `web`.
        service: String,
        /// `on` answers 503 with the maintenance page; `off` serves again.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// List past switches, oldest first, with who made each and why.
    History {
        /// Only this service's switches, e.g. `web`.
        #[arg(value_name = "SERVICE")]
        service: Option<String>,
        /// The same as SERVICE, for scripts that prefer a flag.
        #[arg(long = "service", value_name = "SERVICE", conflicts_with = "service")]
        service_flag: Option<String>,
    },
    /// Deploy SERVICE to a color: wait until it is healthy, walk the canary
    /// steps (each judged for --interval by the automatic rollback gates),
    /// and finish on 100 % or roll back.
    ///
    /// Exit codes: 0 done, 3 rolled back by a gate, 4 failed (not healthy in
    /// time, a step refused, changed by someone else, aborted elsewhere),
    /// 5 not started (another deploy holds the service, or nothing to do),
    /// 130 Ctrl-C (aborted, state from before restored), 1 other errors,
    /// 2 bad arguments.
    Deploy {
        /// A service name from the config, e.g. `api`.
        service: String,
        /// The color to deploy to.
        #[arg(long, value_parser = ["blue", "green"], required_unless_present = "abort")]
        to: Option<String>,
        /// Percent of new requests on the target at each step, rising to 100 (default: 100).
        #[arg(long, value_delimiter = ',', value_name = "PERCENTS")]
        steps: Option<Vec<u8>>,
        /// How long each step is judged (default 60s).
        #[arg(long, value_parser = config::parse_duration, value_name = "DURATION")]
        interval: Option<Duration>,
        /// How long to wait for the target color to be healthy (default 5m).
        #[arg(long, value_parser = config::parse_duration, value_name = "DURATION")]
        wait_healthy: Option<Duration>,
        /// The proxy aborts the deploy (restoring the state from before) if
        /// this ctl stops polling it for this long (default 30s).
        #[arg(long, value_parser = config::parse_duration, value_name = "DURATION")]
        lease: Option<Duration>,
        /// Recorded in the history with each step.
        #[arg(long)]
        reason: Option<String>,
        /// Abort SERVICE's running deploy and restore the state from before it.
        #[arg(long, conflicts_with_all = ["to", "steps", "interval", "wait_healthy", "lease", "reason"])]
        abort: bool,
    },
    /// Show the concurrency caps (in flight, queued, top keys) and rate limits.
    Limits,
    /// Re-read the config file switchyard was started with; an invalid file is rejected (its errors printed, exit 1) and the running config kept.
    Reload,
    /// List the HTTPS certificates: names, issuer, serial, expiry, renewal state.
    Certs {
        #[command(subcommand)]
        action: Option<CertsAction>,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Renew ACME certificate NAME now (the current one keeps serving until the new one is issued).
    Renew {
        /// A certificate name from [[acme.certificates]], e.g. `site`.
        name: String,
    },
}

fn main() -> ExitCode {
    commit_memory_on_demand();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run {
            config,
            upgrade,
            daemon,
        } => run(&config, RunOptions { upgrade, daemon }),
        Cmd::Check { config } => return check(&config),
        Cmd::Demo { http, admin } => run_demo(http, admin),
        Cmd::Ctl {
            config,
            admin,
            token_file,
            json,
            action,
        } => ctl(
            Target {
                config,
                admin,
                token_file,
            },
            json,
            action,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Its summary is printed already.
        Err(e) if e.is::<deploy_client::DeployExit>() => match e.downcast_ref() {
            Some(deploy_client::DeployExit { code, .. }) => ExitCode::from(*code),
            None => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("switchyard: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: most of switchyard's errors already
/// name their cause in their own message.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(path: &Path, opts: RunOptions) -> anyhow::Result<()> {
    switchyard::logging::init();
    let config = Config::load(path)?;
    let problems = check_files(&config);
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!("{}", lines.join("\n"));
    }
    if let Some(missing) = missing_token_file(&config) {
        tracing::warn!("{missing}");
    }
    let pid_file = config.server.state_dir.join("switchyard.pid");
    if let Some(pid) = running_instance(&pid_file).filter(|_| !opts.upgrade) {
        // Its sockets are taken and its state_dir is in use; a second
        // daemon would also overwrite the pid file, then remove it on its
        // failed exit, leaving the running one without.
        bail!(
            "switchyard is already running as pid {pid} ({}): stop it first, or start the new one with -u to take over its sockets",
            pid_file.display()
        );
    }
    let yard = Switchyard::build(&config, &opts)?;
    // Written by the daemon after it forks; gone again when it exits.
    cleanup::remove_pid_file_on_exit(pid_file);
    yard.run();
    Ok(())
}

/// The live switchyard process a pid file names, if any: the process exists
/// and its name (`/proc/PID/comm`) starts with `switchyard`, so a stale file
/// whose number was reused by another program does not count.
fn running_instance(pid_file: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    if pid == std::process::id() {
        return None;
    }
    let name = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    name.starts_with("switchyard").then_some(pid)
}

fn check(path: &Path) -> ExitCode {
    // The same check a config reload runs (`check.rs`): the files a config
    // names are checked even when its text has mistakes, so one run lists
    // everything.
    let config = match switchyard::check::check_path(path) {
        Ok(config) => config,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!("{}: check failed", path.display());
            return ExitCode::FAILURE;
        }
    };
    if let Some(missing) = missing_token_file(&config) {
        println!("warning: {missing}");
    } else if config.admin.token_file.is_none()
        && config.admin.tokens.is_empty()
        && std::env::var_os(auth::TOKEN_ENV).is_none()
    {
        println!("note: no admin token configured; the admin API will stay off");
    }
    match config.listen.metrics {
        Some(addr) => println!("metrics listener: http://{addr}/metrics"),
        None => println!("metrics listener: off ([listen] metrics is not set)"),
    }
    println!(
        "{}: ok ({} services, {} routes)",
        path.display(),
        config.services.len(),
        config.routes.len()
    );
    ExitCode::SUCCESS
}

/// When `admin.token_file` is configured but does not exist (and no
/// $SWITCHYARD_ADMIN_TOKEN stands in): what that means and the command that
/// creates it.
fn missing_token_file(config: &Config) -> Option<String> {
    let file = config.admin.token_file.as_deref()?;
    if std::env::var_os(auth::TOKEN_ENV).is_some() || file.exists() {
        return None;
    }
    let effect = match config.admin.tokens.is_empty() {
        true => "so the admin API will stay off",
        false => "so only the [[admin.tokens]] are accepted",
    };
    Some(format!(
        "admin.token_file {} does not exist, {effect}. Create it (mode 0600) with:\n  {}",
        config::show_path(file),
        auth::create_token_command(file)
    ))
}

fn run_demo(http: std::net::SocketAddr, admin: std::net::SocketAddr) -> anyhow::Result<()> {
    for (addr, flag) in [(http, "--http"), (admin, "--admin")] {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("{addr} is taken; pick another with {flag} 127.0.0.1:PORT"))?;
    }
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // It holds the admin token: gone on Ctrl-C, SIGTERM or any other exit.
    cleanup::remove_dir_on_exit(dir.clone());
    cleanup::stop_on_hangup();
    let token = demo::random_token().context("cannot read /dev/urandom")?;
    write_private(&dir.join("admin.token"), &token)?;
    let blue = demo::free_loopback_addr()?;
    let green = demo::free_loopback_addr()?;
    let text = demo::config_text(&dir, http, admin, blue, green);
    let config_path = dir.join("switchyard.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::parse(&config_path, &text)?;

    switchyard::logging::init();
    std::env::remove_var(auth::TOKEN_ENV);
    let mut yard = Switchyard::build(&config, &RunOptions::default())?;
    yard.server
        .add_service(SampleUpstream::new(Color::Blue).service(blue));
    yard.server
        .add_service(SampleUpstream::new(Color::Green).service(green));

    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "switchyard".into());
    println!(
        r#"
switchyard demo: proxy on http://{http}, blue upstream on {blue}, green upstream on {green}
config and state in {dir} (removed when the demo exits)

  curl http://{http}/                      # answered by blue (version 1.0.0)

  export SWITCHYARD_ADMIN_TOKEN={token}
  {exe} ctl --admin http://{admin} status
  {exe} ctl --admin http://{admin} switch web green --wait-healthy 10s
  curl http://{http}/                      # now answered by green (version 1.1.0)
  {exe} ctl --admin http://{admin} rollback web
  {exe} ctl --admin http://{admin} weights web 80 20      # a canary: 20 % of new requests to green
  {exe} ctl --admin http://{admin} deploy web --to green --steps 50,100 --interval 5s
  {exe} ctl --admin http://{admin} history

  # writes are rate-limited per client (2/s, burst 5): the 7th POST gets 429
  for i in $(seq 8); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST http://{http}/; done

Ctrl-C stops the demo.
"#,
        dir = dir.display()
    );
    yard.run();
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Where `ctl` finds the admin API and its token (see [`Cmd::Ctl`]).
struct Target {
    config: Option<PathBuf>,
    admin: Option<String>,
    token_file: Option<PathBuf>,
}

/// Reads the token by precedence: `--token-file`, then
/// $SWITCHYARD_ADMIN_TOKEN, then the config's `admin.token_file`. A file
/// that does not exist is an error that says so.
fn ctl_token(target: &Target, config: Option<&Config>) -> anyhow::Result<auth::Token> {
    let env = std::env::var(auth::TOKEN_ENV).ok();
    let (file, env, origin) = match (&target.token_file, env, config) {
        (Some(file), _, _) => (Some(file.clone()), None, "--token-file".to_string()),
        (None, Some(value), _) => (None, Some(value), String::new()),
        (None, None, Some(c)) => (
            c.admin.token_file.clone(),
            None,
            format!("admin.token_file of {}", c.path.display()),
        ),
        (None, None, None) => (None, None, String::new()),
    };
    if let Some(path) = &file {
        if !path.exists() {
            let mut message = format!("{origin} {} does not exist", config::show_path(path));
            if target.token_file.is_none() {
                message.push_str(&format!(
                    "; without it switchyard runs with its admin API off. Create it (mode 0600) \
                     and restart switchyard:\n  {}",
                    auth::create_token_command(path)
                ));
            }
            bail!("{message}");
        }
    }
    let source = config::Admin {
        token_file: file,
        allow: Vec::new(),
        tokens: Vec::new(),
    };
    match auth::load_token(&source, env)? {
        Some(token) => Ok(token),
        None => match config {
            Some(c) if !c.admin.tokens.is_empty() => bail!(
                "no admin token: {} has no admin.token_file; pass --token-file with your \
                 [[admin.tokens]] file (e.g. {}) or set {}",
                c.path.display(),
                config::show_path(&c.admin.tokens[0].file),
                auth::TOKEN_ENV
            ),
            Some(c) => bail!(
                "no admin token: {} has no admin.token_file; set {} or pass --token-file FILE",
                c.path.display(),
                auth::TOKEN_ENV
            ),
            None => bail!(
                "no admin token: set {}, pass --token-file FILE, or -c CONFIG to use its admin.token_file",
                auth::TOKEN_ENV
            ),
        },
    }
}

/// What to say when nothing listens at the admin address.
fn refused_hint(config: Option<&Config>) -> String {
    match config {
        Some(c) => {
            let token = match &c.admin.token_file {
                Some(file) => format!("admin.token_file {}", config::show_path(file)),
                None => "no admin.token_file".to_string(),
            };
            format!(
                "is switchyard running with {}? Its admin API only runs when it has a token: \
                 {token}, or ${} in its environment (its log says \"admin API disabled\" otherwise)",
                c.path.display(),
                auth::TOKEN_ENV
            )
        }
        None => format!(
            "is switchyard running, and is this its [listen] admin address? Its admin API only \
             runs when it has a token (admin.token_file, or ${} in its environment); \
             -c CONFIG reads the address and token file from its config",
            auth::TOKEN_ENV
        ),
    }
}

fn ctl(target: Target, json: bool, action: CtlAction) -> anyhow::Result<()> {
    // `ctl status | head -1`: end quietly when the reader goes away, as
    // other command-line tools do, rather than panic on the next print.
    // Not for `deploy`, which must notice a closed output and restore.
    if !matches!(action, CtlAction::Deploy { .. }) {
        // SAFETY: restoring a signal's default action; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let config = match &target.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    // --admin, then the config's [listen] admin, then the default.
    let base = match (&target.admin, &config) {
        (Some(admin), _) => client::admin_base_url(admin)?,
        (None, Some(c)) => client::base_url_for(c.listen.admin),
        (None, None) => client::admin_base_url(config::DEFAULT_ADMIN_LISTEN)?,
    };
    let token = ctl_token(&target, config.as_ref())?;
    let client = Client::new(&base, token, refused_hint(config.as_ref()));
    let progress = |line: &str| eprintln!("{line}");
    let mut drain = None;
    // The active color before a switch, to tell a no-op from a switch.
    let mut before = None;
    let cmd = match action {
        CtlAction::Deploy {
            service,
            to: Some(to),
            steps,
            interval,
            wait_healthy,
            lease,
            reason,
            abort: false,
        } => {
            let plan = switchyard::deploy::Plan {
                to: to.parse::<Color>()?,
                steps: steps.unwrap_or(switchyard::deploy::DEFAULT_STEPS.to_vec()),
                interval: interval.unwrap_or(switchyard::deploy::DEFAULT_INTERVAL),
                wait_healthy: wait_healthy.unwrap_or(switchyard::deploy::DEFAULT_WAIT_HEALTHY),
                lease: lease.unwrap_or(switchyard::deploy::LEASE),
                reason,
            };
            plan.check().map_err(anyhow::Error::msg)?;
            return deploy_client::deploy(&client, &service, plan, json);
        }
        CtlAction::Deploy { service, .. } => Command::DeployAbort { service },
        CtlAction::Status => Command::Status,
        CtlAction::History {
            service,
            service_flag,
        } => Command::History {
            service: service.or(service_flag),
        },
        CtlAction::Switch {
            service,
            color,
            reason,
            force,
            wait_healthy,
            wait_drained,
        } => {
            let to = color.parse::<Color>()?;
            let status = client.send(&Command::Status)?;
            // Only a color that takes everything is "already" switched to:
            // during a canary, a switch to the active color ends the split.
            let svc = &status["services"][&service];
            before = svc["active"]
                .as_str()
                .filter(|&c| svc["weights"][c] == 100)
                .map(str::to_string);
            if let Some(within) = wait_healthy {
                client.wait_healthy(&service, to, within, progress)?;
            }
            drain = wait_drained.map(|within| (service.clone(), to.other(), within));
            Command::Switch {
                service,
                to,
                reason,
                force,
            }
        }
        CtlAction::Rollback {
            service,
            reason,
            force,
        } => Command::Rollback {
            service,
            reason,
            force,
        },
        CtlAction::Weights {
            service,
            blue,
            green,
            reason,
            force,
        } => Command::Weights {
            service,
            weights: Weights::new(blue, green)?,
            reason,
            force,
        },
        CtlAction::Maintenance { service, state } => Command::Maintenance {
            service,
            on: state == "on",
        },
        CtlAction::Limits => Command::Limits,
        CtlAction::Reload => Command::Reload,
        CtlAction::Certs { action: None } => Command::Certs,
        CtlAction::Certs {
            action: Some(CertsAction::Renew { name }),
        } => Command::Renew { name },
    };
    let reply = client.send(&cmd)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print_human(&cmd, &reply, before.as_deref());
    }
    if let Some((service, old, within)) = drain {
        client.wait_drained(&service, old, within, progress)?;
    }
    Ok(())
}

/// `before` is the service's active color before a switch, if known.
fn print_human(cmd: &Command, reply: &Value, before: Option<&str>) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    match cmd {
        Command::Status => {
            let empty = serde_json::Map::new();
            for (name, svc) in reply["services"].as_object().unwrap_or(&empty) {
                print_service(name, svc);
            }
            if reply["cluster"].is_object() {
                print_cluster(&reply["cluster"]);
            }
        }
        Command::Switch { to, .. } if before == Some(to.as_str()) => {
            println!("{}: already {to}; nothing changed", s(&reply["name"]));
        }
        Command::Switch { .. } => {
            println!(
                "{}: now {} (was {})",
                s(&reply["name"]),
                s(&reply["active"]),
                s(&reply["previous"])
            );
        }
        // After a canary's rollback `previous` is not where traffic was.
        Command::Rollback { .. } => {
            println!(
                "{}: rolled back: every new request goes to {}",
                s(&reply["name"]),
                s(&reply["active"])
            );
        }
        Command::Weights { .. } => {
            println!(
                "{}: blue {} / green {} (active {})",
                s(&reply["name"]),
                reply["weights"]["blue"],
                reply["weights"]["green"],
                s(&reply["active"])
            );
        }
        Command::Maintenance { .. } => {
            let on = reply["maintenance"].as_bool().unwrap_or(false);
            println!(
                "{}: maintenance {}",
                s(&reply["name"]),
                if on { "on" } else { "off" }
            );
        }
        Command::Limits => print_limits(reply),
        Command::Reload => print_reload(reply),
        Command::Deploy { .. } | Command::DeployStatus { .. } | Command::DeployAbort { .. } => {
            println!("{}", deploy_client::progress_line(reply));
        }
        Command::Certs => {
            let certs = reply["certificates"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if certs.is_empty() {
                println!("no certificates ([listen] https is not configured)");
            }
            for c in &certs {
                print_cert(c);
            }
        }
        Command::Renew { name } => {
            println!(
                "{name}: renewal requested; the current certificate serves until the new one is \
                 issued (watch: switchyard ctl certs)"
            );
        }
        Command::History { service } => {
            let events = reply["events"].as_array().cloned().unwrap_or_default();
            match (events.is_empty(), service) {
                (true, Some(service)) => println!("no switches of {service} yet"),
                (true, None) => println!("no switches yet"),
                _ => {}
            }
            for e in events {
                // A canary step shows its split after the colors.
                let split = match &e["weights"] {
                    Value::Object(w) => format!(" ({}/{})", w["blue"], w["green"]),
                    _ => String::new(),
                };
                // With [cluster], the instance the change went through.
                let by = match &e["instance"] {
                    Value::String(i) => format!("{}@{i}", s(&e["actor"])),
                    _ => s(&e["actor"]),
                };
                println!(
                    "{}  {:<12} {:>5} -> {:<5}{split:<9}  by {:<24} {}",
                    s(&e["time"]),
                    s(&e["service"]),
                    s(&e["from"]),
                    s(&e["to"]),
                    by,
                    s(&e["reason"])
                );
            }
        }
    }
}

/// `GET /status`'s `cluster`: Redis, this instance, the live ones.
fn print_cluster(c: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let reachable = if c["reachable"] == true {
        "reachable"
    } else {
        "UNREACHABLE: switches refused unless forced"
    };
    println!("cluster: redis {} ({reachable})", s(&c["redis"]));
    if let Value::String(e) = &c["last_error"] {
        println!("  last error: {e}");
    }
    let local = if c["local_change"] == true {
        " (holds a change made while redis was unreachable)"
    } else {
        ""
    };
    let version = match &c["version"] {
        Value::Null => "none (not synced with redis since it started)".to_string(),
        v => v.to_string(),
    };
    println!(
        "  this instance: {}, state version {version}{local}",
        s(&c["instance"])
    );
    for m in c["instances"].as_array().into_iter().flatten() {
        println!("  live: {:<24} version {}", s(&m["instance"]), m["version"]);
    }
}

/// The answer of `POST /reload`: what changed, and what waits for a restart.
fn print_reload(reply: &Value) {
    let list = |key: &str| -> Vec<String> {
        reply[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    println!(
        "reloaded {}",
        reply["config"].as_str().unwrap_or("the config")
    );
    for (key, what) in [
        ("services_added", "services added"),
        ("services_removed", "services removed"),
        ("routes_added", "routes added"),
        ("routes_removed", "routes removed"),
        ("limits_reset", "limits starting afresh"),
    ] {
        let names = list(key);
        if !names.is_empty() {
            println!("  {what}: {}", names.join(", "));
        }
    }
    let restart = list("needs_restart");
    if !restart.is_empty() {
        println!(
            "  warning: changed but kept until a restart: {}",
            restart.join(", ")
        );
    }
}

fn print_limits(reply: &Value) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let empty = serde_json::Map::new();
    let caps = reply["concurrency"].as_object().unwrap_or(&empty);
    let rates = reply["rate_limits"].as_object().unwrap_or(&empty);
    let budgets = reply["token_budgets"].as_object().unwrap_or(&empty);
    if caps.is_empty() && rates.is_empty() && budgets.is_empty() {
        println!("no limits configured");
    }
    for (name, c) in caps {
        println!(
            "concurrency {name}: {}/{} in flight, {}/{} queued, {} keys (per key {})",
            n(&c["in_flight"]),
            n(&c["max_in_flight"]),
            n(&c["queue_depth"]),
            n(&c["queue"]),
            n(&c["keys"]),
            n(&c["per_key"]),
        );
        println!(
            "  since start: {} admitted, {} queued, refused {} queue full + {} timed out, {} gave up waiting",
            n(&c["admitted"]),
            n(&c["queued"]),
            n(&c["refused"]["queue_full"]),
            n(&c["refused"]["timeout"]),
            n(&c["abandoned"]),
        );
        for k in c["top_keys"].as_array().into_iter().flatten() {
            println!(
                "    {:<40} {} in flight, {} queued",
                k["key"].as_str().unwrap_or("?"),
                n(&k["in_flight"]),
                n(&k["queued"]),
            );
        }
    }
    for (name, r) in rates {
        println!(
            "rate limit {name}: {} keys tracked; since start {} counted, {} refused, {} key-table resets",
            n(&r["keys"]),
            n(&r["checked"]),
            n(&r["refused"]),
            n(&r["resets"]),
        );
    }
    for (name, b) in budgets {
        let t = &b["tokens"];
        println!(
            "token budget {name}: {} tokens/min per key, {} keys; max_tokens {} (default {})",
            n(&b["tokens_per_minute"]),
            n(&b["keys"]),
            n(&b["max_tokens"]),
            n(&b["default_max_tokens"]),
        );
        println!(
            "  since start: {} admitted, refused {} over budget + {} invalid; tokens {} reserved, {} settled, {} refunded, {} kept",
            n(&b["admitted"]),
            n(&b["refused"]["exhausted"]),
            n(&b["refused"]["invalid"]),
            n(&t["reserved"]),
            n(&t["settled"]),
            n(&t["refunded"]),
            n(&t["kept"]),
        );
        for k in b["top_keys"].as_array().into_iter().flatten() {
            println!(
                "    {:<40} {} tokens used",
                k["key"].as_str().unwrap_or("?"),
                n(&k["used"]),
            );
        }
    }
    let services = reply["tokens_by_service"].as_object().unwrap_or(&empty);
    for (name, t) in services.iter().filter(|(_, t)| n(&t["reserved"]) > 0) {
        println!(
            "tokens of service {name}: {} reserved, {} settled, {} refunded, {} kept",
            n(&t["reserved"]),
            n(&t["settled"]),
            n(&t["refunded"]),
            n(&t["kept"]),
        );
    }
}

fn print_cert(c: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let domains: Vec<String> = c["domains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    let bootstrap = if c["bootstrap"] == true {
        "  [temporary self-signed: not issued yet]"
    } else {
        ""
    };
    println!(
        "{} ({}): {}{bootstrap}",
        s(&c["name"]),
        s(&c["source"]),
        domains.join(", ")
    );
    println!("  issuer       {}", s(&c["issuer"]));
    println!("  serial       {}", s(&c["serial"]));
    println!("  not after    {}", s(&c["not_after"]));
    if c["source"] == "acme" {
        println!("  next renewal {}", s(&c["next_renewal"]));
    }
    if let Some(e) = c["last_error"].as_str() {
        println!(
            "  last error   {e} ({} failed attempts in a row)",
            c["failures"].as_u64().unwrap_or(0)
        );
    }
}

fn print_service(name: &str, svc: &Value) {
    let active = svc["active"].as_str().unwrap_or("-");
    let maintenance = if svc["maintenance"] == true {
        "  [maintenance]"
    } else {
        ""
    };
    println!("{name}: active {active}{maintenance}");
    for color in ["blue", "green"] {
        let marker = if color == active { "*" } else { " " };
        println!(
            "  {marker} {color:<5} {:>3} %  in flight {} (upgraded {})",
            svc["weights"][color].as_u64().unwrap_or(0),
            svc["in_flight"][color].as_u64().unwrap_or(0),
            svc["upgraded"][color].as_u64().unwrap_or(0),
        );
        for b in svc["pools"][color].as_array().into_iter().flatten() {
            // A healthy backend's last error is history: say so.
            let error = match (b["health"].as_str(), b["last_error"].as_str()) {
                (Some("healthy"), Some(e)) => format!("  (last error: {e})"),
                (_, Some(e)) => format!("  ({e})"),
                _ => String::new(),
            };
            println!(
                "      {:<22} {}{error}",
                b["addr"].as_str().unwrap_or("?"),
                b["health"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(line) = rollback_line(&svc["rollback"]) {
        println!("  {line}");
    }
}

/// The automatic rollback watcher's view of a service in one line (`GET
/// /status` `rollback`), or `None` when the service is not watched.
fn rollback_line(r: &Value) -> Option<String> {
    if !r.is_object() {
        return None;
    }
    let live = &r["live"];
    let mut line = match (r["deploy_judging"] == true, live.is_object()) {
        (true, _) => "rollback watch: a deploy is judging".to_string(),
        (false, true) => format!(
            "rollback watch: {} {}",
            live["color"].as_str().unwrap_or("?"),
            figures_text(live, &r["gates"])
        ),
        (false, false) => "rollback watch: idle".to_string(),
    };
    if let Some(left) = live["time_left_s"].as_u64() {
        line.push_str(&format!(", {left} s left"));
    }
    if let Some(reason) = r["last_verdict"]["reason"].as_str() {
        let outcome = r["last_verdict"]["outcome"].as_str().unwrap_or("?");
        line.push_str(&format!("; last: {reason} ({outcome})"));
    }
    Some(line)
}

/// Live gate figures in words: `12 requests, 5xx 0 %, p95 35 ms over 30 s`.
fn figures_text(f: &Value, gates: &Value) -> String {
    let ratio = f["error_ratio"].as_f64().unwrap_or(0.0);
    let p95 = match f["p95_ms"].as_u64() {
        Some(ms) => switchyard::canary::show_secs(Duration::from_millis(ms)),
        None => "-".to_string(),
    };
    format!(
        "{} requests, 5xx {} (max {}), p95 {p95} (max {}) over {} s",
        f["requests"].as_u64().unwrap_or(0),
        switchyard::canary::show_percent(ratio),
        switchyard::canary::show_percent(gates["max_error_ratio"].as_f64().unwrap_or(0.0)),
        switchyard::canary::show_secs(Duration::from_millis(
            gates["max_p95_ms"].as_u64().unwrap_or(0)
        )),
        f["span_s"].as_u64().unwrap_or(0),
    )
}
