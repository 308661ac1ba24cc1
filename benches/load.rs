//! Load-test harness: switchyard against nginx (the proxy it replaces) and,
//! when installed, HAProxy, all on loopback in front of one shared upstream.
//! A bare Pingora proxy (`examples/bare_pingora.rs`: Pingora's defaults, one
//! thread) joins the simple scenarios (a)-(e) and the HTTPS ones (g)-(j) as
//! a baseline: what Pingora itself costs, and so what switchyard adds on top.
//!
//! Run it with `.ci/bench [--quick]` (or `cargo bench --bench load -- [--quick]`).
//! Without cargo's `--bench` argument (e.g. under `cargo test --all-targets`)
//! it exits at once.
//!
//! Scenarios (pick some by name: `.ci/bench --quick small sse switch`):
//!   small      small responses, keep-alive             (wrk -t1 -c50)
//!   threads    `small` with 2 worker threads per proxy (nginx 2 worker
//!              processes, HAProxy nbthread 2, bare Pingora 2 threads,
//!              switchyard threads = 2 with work stealing off and on);
//!              wrk -t2 -c100, which shares the machine's two cores with them
//!   16k        16 KiB responses, keep-alive
//!   close      a new connection per request (`Connection: close`)
//!   idle       10 000 idle kept-alive client connections: memory
//!   ws-idle    9 000 idle WebSockets through each proxy: memory per upgraded
//!              connection (`load/ws_idle.rs`)
//!   sse        server-sent events relay: time to first byte, added delay
//!   realistic  route table like conf/switchyard.toml, health checks, forwarded headers
//!   switch     blue/green switches every 100 ms under constant load
//!   tls-h1        HTTPS keep-alive, TLS 1.3, HTTP/1.1        (wrk -t1 -c50)
//!   tls-h1-close  HTTPS, new connection per request, HTTP/1.1 (wrk, `Connection: close`)
//!   tls-h2        HTTPS keep-alive, TLS 1.3, HTTP/2          (h2load -t1 -c50 -m1)
//!   tls-h2-close  HTTPS, new connection per request, HTTP/2   (h2load at a fixed rate)
//!   limits        AI completions (POST) through switchyard with the shipped kinds of
//!                 limit and without them; JSON and streamed answers (`load/limits.rs`)
//!   cluster       switchyard on the realistic routes with `[cluster]` off vs on (a
//!                 redis-server started here), and switch propagation across three
//!                 instances of one cluster (`load/cluster.rs`)
//!
//! The HTTPS scenarios give every proxy the same certificate (ECDSA P-256,
//! self-signed, made once per run: `load/tls.rs`) and the same offer (TLS
//! 1.2 + 1.3, ALPN h2 + http/1.1); TLS 1.3 is the client's doing: wrk is
//! pinned by an `OPENSSL_CONF` (shown to hold against a TLS 1.2-only
//! server), and h2load's report of the negotiated protocol is checked on
//! every run.
//!
//! The bare Pingora proxy cannot route or switch, so it sits out `realistic`
//! and `switch`. `.ci/bench` builds it (`target/release/examples/bare_pingora`);
//! when that binary is missing it is left out with a note.
//!
//! Every figure of a wrk scenario is the median over rounds; the rounds of
//! the proxies are interleaved (A B C, B C A, ...) so drift hits all alike.
//!
//! Fixed rate (the plain-HTTP wrk scenarios: small, 16k, close, realistic,
//! threads): after the closed-loop rounds every proxy is loaded again, in
//! interleaved rounds of the same length, at one offered rate that all of
//! them carry (`--rate N`, else 60 % of the slowest proxy's closed-loop
//! req/s in the same run) by an open-loop generator (`load/rate.rs`):
//! CPU per request at the same events per second, achieved rate, and
//! p50/p99/p99.9 from each request's scheduled send time (corrected for
//! coordinated omission). A second table prints them.
//! CPU is utime+stime of the proxy's processes (nginx: master + workers)
//! from /proc, also shown split into user and kernel time; memory is VmHWM
//! (nginx: summed over its processes).
//!
//! `--perf` adds an unmeasured profiling round to each wrk scenario: see
//! `load/perf.rs`.

#[path = "load/cluster.rs"]
mod cluster;
#[path = "load/confs.rs"]
mod confs;
#[path = "load/idle.rs"]
mod idle;
#[path = "load/limits.rs"]
mod limits;
#[path = "load/perf.rs"]
mod perf;
#[path = "load/procs.rs"]
mod procs;
#[path = "load/rate.rs"]
mod rate;
#[path = "load/sse.rs"]
mod sse;
#[path = "load/switch.rs"]
mod switch;
#[path = "load/tls.rs"]
mod tls;
#[path = "load/wrk.rs"]
mod wrk;
#[path = "load/ws_idle.rs"]
mod ws_idle;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use confs::{Kind, Setup, Target, Tools, Upstream};

const ALL: &[&str] = &[
    "small",
    "16k",
    "close",
    "idle",
    "ws-idle",
    "sse",
    "realistic",
    "threads",
    "switch",
    "tls-h1",
    "tls-h1-close",
    "tls-h2",
    "tls-h2-close",
    "limits",
    "cluster",
];
const CONNECTIONS: u32 = 50;
/// Worker threads (nginx: worker processes) per proxy in `threads`.
const THREADS_WORKERS: u32 = 2;
/// Default offered rate of the fixed-rate runs: this share of the slowest
/// proxy's closed-loop req/s in the same scenario and run (60 %), rounded
/// down to whole hundreds, so every proxy can carry it with room to spare.
const RATE_SHARE: f64 = 0.6;
/// `tls-h2-close`: new HTTPS connections per second (h2load `-r`), each
/// with one request. A fixed arrival rate rather than as fast as possible:
/// h2load then measures latency and CPU at a load every proxy can carry,
/// not how many handshakes the client itself manages on the shared cores.
const TLS_NEW_CONNS_PER_SEC: u32 = 1000;
const SWITCH_CLIENTS: usize = 8;
const SWITCH_EVERY: Duration = Duration::from_millis(100);
const SSE_EVERY: Duration = Duration::from_millis(10);
/// `cluster`: time between two switches of the propagation part.
const CLUSTER_SWITCH_EVERY: Duration = Duration::from_millis(300);
/// `cluster`: paced keep-alive clients per instance in the propagation
/// part, each starting a request every [`CLUSTER_PACE`]: a light load
/// (2000 req/s per instance) that still samples every instance every
/// half millisecond.
const CLUSTER_CLIENTS: usize = 2;
/// `cluster`: see [`CLUSTER_CLIENTS`].
const CLUSTER_PACE: Duration = Duration::from_millis(1);
/// `cluster`: the issue's bound on propagation (100 ms); an answer from the
/// old color to a request started later than this after the switch's admin
/// answer counts as stale.
const CLUSTER_BOUND: Duration = Duration::from_millis(100);
/// Host header of the simple scenarios (no route names a host there).
const BENCH_HOST: &str = "bench.local";
/// `ws-idle`: WebSockets held (9 000). Each takes two descriptors in the
/// proxy (client and upstream side) and two in this process (client and
/// echo server), and the hard open-file limit here is 20 000.
const WS_CONNS: usize = 9_000;

struct Opts {
    quick: bool,
    rounds: usize,
    secs: u32,
    warmup: u32,
    switch_secs: u32,
    sse_events: usize,
    idle_conns: usize,
    /// WebSockets held in `ws-idle`.
    ws_conns: usize,
    /// Switches in the propagation part of `cluster`.
    cluster_switches: usize,
    /// New connections per second in `tls-h2-close`.
    tls_rate: u32,
    haproxy: bool,
    pingora: bool,
    /// Profile each proxy of the wrk scenarios (`perf record`).
    perf: bool,
    /// Offered req/s of the fixed-rate runs (`--rate`); `None`: [`RATE_SHARE`]
    /// of the slowest proxy's closed-loop throughput.
    rate: Option<u32>,
    only: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = if quick {
            Opts {
                quick,
                rounds: 1,
                secs: 2,
                warmup: 1,
                switch_secs: 10,
                sse_events: 100,
                idle_conns: 10_000,
                ws_conns: WS_CONNS,
                cluster_switches: 10,
                tls_rate: TLS_NEW_CONNS_PER_SEC,
                haproxy: true,
                pingora: true,
                perf: false,
                rate: None,
                only: Vec::new(),
            }
        } else {
            Opts {
                quick,
                rounds: 3,
                secs: 8,
                warmup: 2,
                switch_secs: 30,
                sse_events: 300,
                idle_conns: 10_000,
                ws_conns: WS_CONNS,
                cluster_switches: 30,
                tls_rate: TLS_NEW_CONNS_PER_SEC,
                haproxy: true,
                pingora: true,
                perf: false,
                rate: None,
                only: Vec::new(),
            }
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{name} needs a number"))
            };
            match a.as_str() {
                "--bench" | "--quick" => {}
                "--rounds" => o.rounds = value(a)?.max(1) as usize,
                "--secs" => o.secs = value(a)?.max(1) as u32,
                "--switch-secs" => o.switch_secs = value(a)?.max(1) as u32,
                "--idle-conns" => o.idle_conns = value(a)?.max(1) as usize,
                "--ws-conns" => o.ws_conns = value(a)?.max(1) as usize,
                "--cluster-switches" => o.cluster_switches = value(a)?.clamp(1, 1000) as usize,
                // h2load starts connections in 10 ms batches: whole hundreds.
                "--tls-rate" => o.tls_rate = (value(a)?.clamp(100, 100_000) / 100 * 100) as u32,
                "--rate" => o.rate = Some(value(a)?.clamp(100, 1_000_000) as u32),
                "--no-haproxy" => o.haproxy = false,
                "--no-pingora" => o.pingora = false,
                "--perf" => o.perf = true,
                "-h" | "--help" => return Err(String::new()),
                s if ALL.contains(&s) => o.only.push(s.to_string()),
                s => return Err(format!("unknown argument {s:?}")),
            }
        }
        Ok(o)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

const USAGE: &str = "usage: .ci/bench [--quick] [--rounds N] [--secs N] [--switch-secs N] \
[--idle-conns N] [--ws-conns N] [--tls-rate N] [--cluster-switches N] [--rate N] [--no-haproxy] \
[--no-pingora] [--perf] [SCENARIO...]
  --rate N      offered req/s of the fixed-rate (open-loop) runs that follow the closed-loop
                rounds of small, 16k, close, realistic and threads (default: 60 % of the
                slowest proxy's closed-loop req/s in the same scenario)
scenarios (default: all):
  small         small responses, keep-alive (wrk -t1 -c50)
  threads       small with 2 worker threads per proxy (switchyard with work stealing off and
                on); wrk -t2 -c100 on the same two cores
  16k           16 KiB responses, keep-alive
  close         a new connection per request (Connection: close)
  idle          10 000 idle keep-alive client connections: memory
  ws-idle       --ws-conns idle WebSockets (default 9 000) through each proxy to an echo
                upstream: memory per upgraded connection
  sse           server-sent events relay: time to first byte, added delay
  realistic     route table like conf/switchyard.toml, health checks, forwarded headers
  switch        blue/green switches every 100 ms under constant load
  tls-h1        HTTPS keep-alive, TLS 1.3, HTTP/1.1 (wrk -t1 -c50)
  tls-h1-close  HTTPS, a new connection per request, TLS 1.3, HTTP/1.1 (wrk, Connection: close)
  tls-h2        HTTPS keep-alive, TLS 1.3, HTTP/2 (h2load -c50 -m1)
  tls-h2-close  HTTPS, a new connection (full handshake) per request, TLS 1.3, HTTP/2,
                at a fixed --tls-rate per second (default 1000, whole hundreds; h2load -r)
  limits        POST /v1/chat/completions through switchyard with a rate limit, a
                concurrency cap and a token budget (none refusing) and without them;
                JSON and streamed answers; nginx proxying plainly as a reference
  cluster       switchyard alone on the realistic routes with [cluster] off vs on (a
                redis-server on loopback, started here), then switch propagation across
                three instances of one cluster: --cluster-switches switches (default 30,
                quick 10) 300 ms apart through the instances' admin APIs, under a light load";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "load: load-test harness; it only runs under `cargo bench --bench load` \
             (see .ci/bench). Nothing to do."
        );
        return;
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("load: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    std::process::exit(run(&opts));
}

/// Everything the scenarios share.
struct Env {
    dir: PathBuf,
    tools: Tools,
    wrk: PathBuf,
    lua: PathBuf,
    upstream: Upstream,
    clk_tck: f64,
    /// `perf`, when `--perf` asked for profiles.
    perf: Option<PathBuf>,
    /// h2load (nghttp2-client), for the HTTP/2 scenarios.
    h2load: Option<PathBuf>,
    /// Whether wrk's TLS 1.3 pin was shown to hold (once per run).
    wrk_pin_checked: std::cell::Cell<bool>,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The bare Pingora proxy that `.ci/bench` builds (`cargo build --release
/// --example bare_pingora`), if it is there: `target/release/examples/`, or
/// next to this bench's own `deps/` directory when CARGO_TARGET_DIR moved it.
fn find_bare_pingora() -> Option<PathBuf> {
    let in_tree =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples/bare_pingora");
    let beside_us = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("examples/bare_pingora")));
    [Some(in_tree), beside_us]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

fn run(opts: &Opts) -> i32 {
    let started = Instant::now();
    // A hard bound on the whole run (half as long again as planned, plus
    // slack): 8 wrk/h2load scenarios of at most 4 proxies, the two of
    // `limits` of 3, the variants of `cluster`, the switch scenario, and
    // the propagation part of `cluster` (its switches and a minute for
    // three instances to start and see each other). Children die with us
    // (PR_SET_PDEATHSIG).
    let wrk_runs = 8 * 4 + 2 * 3 + cluster::VARIANTS.len() as u32 + 5;
    // The fixed-rate runs: 5 scenarios of at most 5 proxies, each run the
    // schedule plus at most its drain.
    let rate_runs = 5 * 5 * opts.rounds as u32;
    let cluster_secs = (CLUSTER_SWITCH_EVERY * opts.cluster_switches as u32).as_secs() as u32 + 60;
    let mut planned = wrk_runs * (opts.warmup + opts.rounds as u32 * opts.secs)
        + rate_runs * (opts.secs + rate::DRAIN.as_secs() as u32)
        + 2 * opts.switch_secs
        + cluster_secs;
    if opts.perf {
        // A profiling round per proxy, then perf report and a flame graph.
        planned += 8 * 4 * 60;
    }
    let limit = Duration::from_secs(u64::from(planned) * 3 / 2 + 180);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("load: still running after {limit:?}; giving up");
        std::process::exit(3);
    });
    let nofile = procs::raise_nofile(131_072);
    if nofile < opts.idle_conns as u64 + 1024 {
        eprintln!("load: open-file limit is {nofile}; the idle scenario may fall short");
    }

    let (Some(nginx), Some(wrk)) = (find_tool("nginx"), find_tool("wrk")) else {
        eprintln!("load: needs nginx and wrk (apt-get install nginx-light wrk; .ci/bench does it)");
        return 1;
    };
    let perf = match (opts.perf, find_tool("perf")) {
        (false, _) => None,
        (true, Some(perf)) => Some(perf),
        (true, None) => {
            eprintln!("load: --perf needs perf (apt-get install linux-perf; .ci/bench does it)");
            return 1;
        }
    };
    let h2load = find_tool("h2load");
    let haproxy = if opts.haproxy {
        find_tool("haproxy")
    } else {
        None
    };
    let pingora = if opts.pingora {
        find_bare_pingora()
    } else {
        None
    };
    let tmp = match tempfile::Builder::new()
        .prefix("switchyard-load-")
        .tempdir()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("load: temp dir: {e}");
            return 1;
        }
    };
    let dir = tmp.path().to_path_buf();
    let setup = || -> Result<Env, String> {
        let (token, token_file) = confs::write_token(&dir)?;
        let lua = dir.join("report.lua");
        fs::write(&lua, wrk::LUA).map_err(|e| e.to_string())?;
        let tls = tls::write_files(&dir)?;
        let upstream = confs::start_upstream(&nginx, &dir.join("upstream"), nofile, &tls)?;
        Ok(Env {
            dir: dir.clone(),
            tools: Tools {
                nginx: nginx.clone(),
                haproxy: haproxy.clone(),
                pingora: pingora.clone(),
                switchyard: PathBuf::from(env!("CARGO_BIN_EXE_switchyard")),
                token,
                token_file,
                nofile,
                tls,
            },
            wrk: wrk.clone(),
            lua,
            upstream,
            clk_tck: procs::clock_ticks_per_sec(),
            perf: perf.clone(),
            h2load: h2load.clone(),
            wrk_pin_checked: std::cell::Cell::new(false),
        })
    };
    let mut env = match setup() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("load: setup: {e}");
            return 1;
        }
    };

    println!(
        "load: {} run: {} round(s) of {} s per proxy (wrk -t1 -c{CONNECTIONS}, {} s warm-up), \
         proxies: switchyard{}, nginx{}",
        if opts.quick { "quick" } else { "full" },
        opts.rounds,
        opts.secs,
        opts.warmup,
        match (&env.tools.pingora, opts.pingora) {
            (Some(_), _) => ", pingora (bare baseline; simple scenarios only)",
            (None, true) => {
                " (pingora left out: target/release/examples/bare_pingora not built; \
                 `cargo build --release --example bare_pingora`, which .ci/bench does)"
            }
            (None, false) => " (pingora left out: --no-pingora)",
        },
        match (&env.tools.haproxy, opts.haproxy) {
            (Some(_), _) => ", haproxy",
            (None, true) => " (haproxy not installed)",
            (None, false) => " (haproxy left out: --no-haproxy)",
        }
    );

    let mut wrk_results: Vec<WrkScenario> = Vec::new();
    let mut idle_result: Option<Vec<(Kind, idle::IdleResult)>> = None;
    let mut ws_result: Option<Vec<(Kind, idle::IdleResult)>> = None;
    let mut sse_result: Option<SseResult> = None;
    let mut switch_result: Option<Vec<switch::SwitchReport>> = None;
    let mut cluster_result: Option<cluster::Report> = None;
    let mut errors: Vec<String> = Vec::new();
    let g = env.upstream.general.clone();
    let simple = Setup::Simple {
        backend: g[0],
        alt: g[1],
        many_conns: false,
        stream: false,
        tls: false,
        websocket: false,
        workers: 1,
    };
    let threads_setup = Setup::Simple {
        backend: g[0],
        alt: g[1],
        many_conns: false,
        stream: false,
        tls: false,
        websocket: false,
        workers: THREADS_WORKERS,
    };
    let tls_setup = Setup::Simple {
        backend: g[0],
        alt: g[1],
        many_conns: false,
        stream: false,
        tls: true,
        websocket: false,
        workers: 1,
    };
    for &name in ALL {
        if !opts.wants(name) {
            continue;
        }
        let t = Instant::now();
        eprintln!("load: scenario {name} ...");
        let result = match name {
            "small" => wrk_scenario(
                &env,
                opts,
                WrkSpec::simple(name, "(a) small, keep-alive", "/", &[], simple),
            )
            .map(|r| wrk_results.push(r)),
            "threads" => wrk_scenario(
                &env,
                opts,
                WrkSpec::simple(
                    name,
                    "(o) small, keep-alive, 2 worker threads",
                    "/",
                    &[],
                    threads_setup,
                ),
            )
            .map(|r| wrk_results.push(r)),
            "16k" => wrk_scenario(
                &env,
                opts,
                WrkSpec::simple(name, "(b) 16 KiB, keep-alive", "/16k", &[], simple),
            )
            .map(|r| wrk_results.push(r)),
            "close" => wrk_scenario(
                &env,
                opts,
                WrkSpec::simple(
                    name,
                    "(c) new conn per request",
                    "/",
                    &["Connection: close"],
                    simple,
                ),
            )
            .map(|r| wrk_results.push(r)),
            "realistic" => wrk_scenario(
                &env,
                opts,
                WrkSpec {
                    key: name,
                    title: "(f) realistic routes",
                    setup: Setup::Realistic,
                    host: confs::API_HOST,
                    path: confs::REALISTIC_PATH,
                    headers: vec![format!("Host: {}", confs::API_HOST)],
                    client: Client::Wrk,
                    post: None,
                    fixed_rate: true,
                },
            )
            .map(|r| wrk_results.push(r)),
            "tls-h1" => wrk_scenario(
                &env,
                opts,
                WrkSpec {
                    client: Client::WrkTls,
                    ..WrkSpec::simple(
                        name,
                        "(g) HTTPS keep-alive, TLS 1.3, HTTP/1.1",
                        "/",
                        &[],
                        tls_setup,
                    )
                },
            )
            .map(|r| wrk_results.push(r)),
            "tls-h1-close" => wrk_scenario(
                &env,
                opts,
                WrkSpec {
                    client: Client::WrkTls,
                    ..WrkSpec::simple(
                        name,
                        "(h) HTTPS new conn per request, TLS 1.3, HTTP/1.1",
                        "/",
                        &["Connection: close"],
                        tls_setup,
                    )
                },
            )
            .map(|r| wrk_results.push(r)),
            "tls-h2" => wrk_scenario(
                &env,
                opts,
                WrkSpec {
                    client: Client::H2KeepAlive,
                    ..WrkSpec::simple(
                        name,
                        "(i) HTTPS keep-alive, TLS 1.3, HTTP/2",
                        "/",
                        &[],
                        tls_setup,
                    )
                },
            )
            .map(|r| wrk_results.push(r)),
            "tls-h2-close" => wrk_scenario(
                &env,
                opts,
                WrkSpec {
                    client: Client::H2NewConnections,
                    ..WrkSpec::simple(
                        name,
                        "(j) HTTPS new conn per request, TLS 1.3, HTTP/2",
                        "/",
                        &[],
                        tls_setup,
                    )
                },
            )
            .map(|r| wrk_results.push(r)),
            "limits" => [
                ("limits", "(k) AI completions, limits on vs off", false),
                (
                    "limits-stream",
                    "(l) AI completions streamed (SSE), limits on vs off",
                    true,
                ),
            ]
            .into_iter()
            .try_for_each(|(key, title, stream)| {
                let spec = WrkSpec {
                    key,
                    title,
                    setup: Setup::Limits { stream },
                    host: confs::API_HOST,
                    path: limits::PATH,
                    headers: limits::headers(),
                    client: Client::Wrk,
                    post: Some(stream),
                    fixed_rate: false,
                };
                wrk_results.push(wrk_scenario(&env, opts, spec)?);
                Ok(())
            }),
            "idle" => idle_scenario(&env, opts).map(|r| idle_result = Some(r)),
            "ws-idle" => ws_idle_scenario(&env, opts).map(|r| ws_result = Some(r)),
            "sse" => sse_scenario(&env, opts).map(|r| sse_result = Some(r)),
            "switch" => switch_scenario(&env, opts).map(|r| switch_result = Some(r)),
            "cluster" => cluster_scenario(&env, opts, &mut wrk_results, &mut cluster_result),
            _ => unreachable!(),
        };
        match result {
            Ok(()) => eprintln!(
                "load: scenario {name} done in {:.0} s",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("load: scenario {name} FAILED: {e}");
                errors.push(format!("{name}: {e}"));
            }
        }
    }
    for s in &wrk_results {
        errors.extend(s.failed.iter().map(|e| format!("{}: {e}", s.key)));
    }
    if let Some(how) = env.upstream.proc.exited() {
        errors.push(format!("the upstream nginx exited during the run ({how})"));
    }

    println!();
    print_wrk_table(&wrk_results);
    print_profile_table(&wrk_results);
    if let Some(r) = &idle_result {
        let title = format!("(d) {} idle keep-alive client connections", opts.idle_conns);
        print_idle_table(r, &title);
    }
    if let Some(r) = &ws_result {
        let n = r.first().map_or(0, |(_, v)| v.wanted);
        print_idle_table(
            r,
            &format!("(d2) {n} idle WebSockets (client to echo upstream)"),
        );
    }
    if let Some(r) = &sse_result {
        print_sse_table(r);
    }
    let mut exit = if errors.is_empty() { 0 } else { 1 };
    if let Some(r) = &switch_result {
        if !print_switch_table(r) {
            exit = 1;
        }
    }
    if let Some(r) = &cluster_result {
        if !cluster::print(r) {
            exit = 1;
        }
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    let total = started.elapsed().as_secs_f64();
    println!("\nload: finished in {total:.0} s");

    let doc = json!({
        "meta": meta(opts, &env, total),
        "wrk_scenarios": wrk_results.iter().map(WrkScenario::json).collect::<Vec<_>>(),
        "idle_connections": idle_result.as_ref().map(|r| {
            r.iter().map(|(k, v)| json!({"proxy": k.name(), "result": v.json()})).collect::<Vec<_>>()
        }),
        "ws_idle_connections": ws_result.as_ref().map(|r| {
            r.iter().map(|(k, v)| json!({"proxy": k.name(), "result": v.json()})).collect::<Vec<_>>()
        }),
        "sse": sse_result.as_ref().map(SseResult::json),
        "switch_under_load": switch_result.as_ref().map(|r| r.iter().map(switch::SwitchReport::json).collect::<Vec<_>>()),
        "cluster_switch_propagation": cluster_result.as_ref().map(cluster::Report::json),
        "errors": errors,
    });
    match write_results(&doc) {
        Ok((latest, stamped)) => println!(
            "load: results in {} and {}",
            latest.display(),
            stamped.display()
        ),
        Err(e) => {
            eprintln!("load: writing results: {e}");
            exit = 1;
        }
    }
    drop(env);
    exit
}

// ---------------------------------------------------------------------------
// wrk and h2load scenarios: (a) (b) (c) (f) (g)-(j); the bare Pingora proxy is in all but (f)
// ---------------------------------------------------------------------------

struct WrkSpec {
    key: &'static str,
    title: &'static str,
    setup: Setup,
    host: &'static str,
    path: &'static str,
    headers: Vec<String>,
    client: Client,
    /// `limits`: wrk POSTs the scenario's chat body (`Some(stream)`).
    post: Option<bool>,
    /// After the closed-loop rounds, fixed-rate rounds too (plain HTTP GET
    /// scenarios only: `load/rate.rs` speaks neither TLS nor POST).
    fixed_rate: bool,
}

/// What loads the proxies of a wrk scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    /// wrk over plain HTTP/1.1.
    Wrk,
    /// wrk over HTTPS, pinned to TLS 1.3 (`tls::Files::openssl_conf`);
    /// wrk sends no ALPN, so HTTP/1.1.
    WrkTls,
    /// h2load over HTTPS: [`CONNECTIONS`] kept-alive HTTP/2 connections,
    /// one stream in flight on each (the concurrency of the wrk scenarios).
    H2KeepAlive,
    /// h2load over HTTPS: `--tls-rate` new connections per second, each a
    /// full TLS 1.3 handshake, one HTTP/2 request, and a close.
    H2NewConnections,
}

impl Client {
    fn tls(self) -> bool {
        self != Client::Wrk
    }

    fn h2(self) -> bool {
        matches!(self, Client::H2KeepAlive | Client::H2NewConnections)
    }
}

impl WrkSpec {
    fn simple(
        key: &'static str,
        title: &'static str,
        path: &'static str,
        headers: &[&str],
        setup: Setup,
    ) -> WrkSpec {
        WrkSpec {
            key,
            title,
            setup,
            host: BENCH_HOST,
            path,
            headers: headers.iter().map(|h| h.to_string()).collect(),
            client: Client::Wrk,
            post: None,
            fixed_rate: true,
        }
    }
}

struct Round {
    wrk: wrk::WrkOut,
    cpu_ticks: u64,
    cpu_us_per_req: f64,
    user_us_per_req: f64,
    kernel_us_per_req: f64,
    /// `cluster`: CPU of the shared redis-server during the round, µs per
    /// request of the round (not in `cpu_us_per_req`).
    redis_us_per_req: Option<f64>,
}

struct ProxyRuns {
    kind: Kind,
    rounds: Vec<Round>,
    /// The fixed-rate rounds (empty when the scenario has none).
    at_rate: Vec<RateRound>,
    peak_rss_kib: u64,
    /// `--perf`: percent of samples per component.
    profile: Option<BTreeMap<&'static str, f64>>,
}

/// One fixed-rate (open-loop) round of one proxy.
struct RateRound {
    out: rate::RateOut,
    cpu_ticks: u64,
    cpu_us_per_req: f64,
    user_us_per_req: f64,
    kernel_us_per_req: f64,
}

/// Medians over the fixed-rate rounds.
#[derive(Clone, Copy, Default)]
struct RateFigures {
    achieved: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu: f64,
    user: f64,
    kernel: f64,
    /// The generator's own lateness at idle slots, p99 ms.
    lag_p99: f64,
    client_cpu: f64,
    /// Errors, non-2xx answers and slots never sent, over all rounds.
    errors: u64,
}

/// The offered rate of a scenario's fixed-rate rounds and where it came from.
struct RateInfo {
    offered: u32,
    how: String,
    connections: u32,
}

/// Medians over rounds.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu: f64,
    user: f64,
    kernel: f64,
    rss_mib: f64,
    errors: u64,
}

impl ProxyRuns {
    fn rate_figures(&self) -> Option<RateFigures> {
        if self.at_rate.is_empty() {
            return None;
        }
        let m = |f: fn(&RateRound) -> f64| median(self.at_rate.iter().map(f).collect());
        Some(RateFigures {
            achieved: m(|r| r.out.achieved_rps),
            p50: m(|r| r.out.p50_ms),
            p99: m(|r| r.out.p99_ms),
            p999: m(|r| r.out.p999_ms),
            cpu: m(|r| r.cpu_us_per_req),
            user: m(|r| r.user_us_per_req),
            kernel: m(|r| r.kernel_us_per_req),
            lag_p99: m(|r| r.out.send_lag_p99_ms),
            client_cpu: m(|r| r.out.client_cpu_us_per_req),
            errors: self
                .at_rate
                .iter()
                .map(|r| r.out.errors + r.out.non2xx + r.out.missed)
                .sum(),
        })
    }

    fn figures(&self) -> Figures {
        let m = |f: fn(&Round) -> f64| median(self.rounds.iter().map(f).collect());
        Figures {
            rps: m(|r| r.wrk.rps),
            p50: m(|r| r.wrk.p50_ms),
            p99: m(|r| r.wrk.p99_ms),
            p999: m(|r| r.wrk.p999_ms),
            cpu: m(|r| r.cpu_us_per_req),
            user: m(|r| r.user_us_per_req),
            kernel: m(|r| r.kernel_us_per_req),
            rss_mib: self.peak_rss_kib as f64 / 1024.0,
            errors: self
                .rounds
                .iter()
                .map(|r| r.wrk.socket_errors + r.wrk.non2xx)
                .sum(),
        }
    }
}

struct WrkScenario {
    key: &'static str,
    title: &'static str,
    proxies: Vec<ProxyRuns>,
    /// The fixed-rate rounds' offered rate, when the scenario had them.
    rate: Option<RateInfo>,
    /// How the scenario was run, printed under the table.
    notes: Vec<String>,
    /// Proxies left out because they failed the scenario's pre-check.
    failed: Vec<String>,
}

impl WrkScenario {
    fn nginx(&self) -> Option<Figures> {
        self.proxies
            .iter()
            .find(|p| p.kind == Kind::Nginx)
            .map(ProxyRuns::figures)
    }

    fn nginx_at_rate(&self) -> Option<RateFigures> {
        self.proxies
            .iter()
            .find(|p| p.kind == Kind::Nginx)
            .and_then(ProxyRuns::rate_figures)
    }

    fn json(&self) -> Value {
        let base = self.nginx();
        let rate_base = self.nginx_at_rate();
        let proxies: serde_json::Map<String, Value> = self
            .proxies
            .iter()
            .map(|p| {
                let f = p.figures();
                let rel = |v: f64, b: fn(&Figures) -> f64| base.and_then(|n| ratio(v, b(&n)));
                (
                    p.kind.name().to_string(),
                    json!({
                        "median": {
                            "rps": f.rps, "p50_ms": f.p50, "p99_ms": f.p99, "p999_ms": f.p999,
                            "cpu_us_per_req": f.cpu, "peak_rss_mib": f.rss_mib, "errors": f.errors,
                            "user_us_per_req": f.user, "kernel_us_per_req": f.kernel,
                        },
                        "ratio_to_nginx": {
                            "rps": rel(f.rps, |n| n.rps),
                            "p50_ms": rel(f.p50, |n| n.p50),
                            "p99_ms": rel(f.p99, |n| n.p99),
                            "p999_ms": rel(f.p999, |n| n.p999),
                            "cpu_us_per_req": rel(f.cpu, |n| n.cpu),
                            "peak_rss_mib": rel(f.rss_mib, |n| n.rss_mib),
                        },
                        "peak_rss_kib": p.peak_rss_kib,
                        "profile_percent": p.profile,
                        "at_rate": p.rate_figures().map(|f| {
                            let rel = |v: f64, b: fn(&RateFigures) -> f64| {
                                rate_base.and_then(|n| ratio(v, b(&n)))
                            };
                            json!({
                                "median": {
                                    "achieved_rps": f.achieved, "p50_ms": f.p50, "p99_ms": f.p99,
                                    "p999_ms": f.p999, "cpu_us_per_req": f.cpu,
                                    "user_us_per_req": f.user, "kernel_us_per_req": f.kernel,
                                    "client_send_lag_p99_ms": f.lag_p99,
                                    "client_cpu_us_per_req": f.client_cpu,
                                    "errors": f.errors,
                                },
                                "ratio_to_nginx": {
                                    "p50_ms": rel(f.p50, |n| n.p50),
                                    "p99_ms": rel(f.p99, |n| n.p99),
                                    "p999_ms": rel(f.p999, |n| n.p999),
                                    "cpu_us_per_req": rel(f.cpu, |n| n.cpu),
                                },
                                "rounds": p.at_rate.iter().map(|r| json!({
                                    "offered_rps": r.out.offered_rps,
                                    "achieved_rps": r.out.achieved_rps,
                                    "secs": r.out.secs,
                                    "completed": r.out.completed,
                                    "missed": r.out.missed,
                                    "errors": r.out.errors,
                                    "non_2xx": r.out.non2xx,
                                    "p50_ms": r.out.p50_ms,
                                    "p99_ms": r.out.p99_ms,
                                    "p999_ms": r.out.p999_ms,
                                    "max_ms": r.out.max_ms,
                                    "client_send_lag_p50_ms": r.out.send_lag_p50_ms,
                                    "client_send_lag_p99_ms": r.out.send_lag_p99_ms,
                                    "client_cpu_us_per_req": r.out.client_cpu_us_per_req,
                                    "cpu_ticks": r.cpu_ticks,
                                    "cpu_us_per_req": r.cpu_us_per_req,
                                    "user_us_per_req": r.user_us_per_req,
                                    "kernel_us_per_req": r.kernel_us_per_req,
                                })).collect::<Vec<_>>(),
                            })
                        }),
                        "rounds": p.rounds.iter().map(|r| json!({
                            "wrk": r.wrk.raw,
                            "secs": r.wrk.secs,
                            "rps": r.wrk.rps,
                            "p50_ms": r.wrk.p50_ms,
                            "p99_ms": r.wrk.p99_ms,
                            "p999_ms": r.wrk.p999_ms,
                            "max_ms": r.wrk.max_ms,
                            "cpu_ticks": r.cpu_ticks,
                            "cpu_us_per_req": r.cpu_us_per_req,
                            "user_us_per_req": r.user_us_per_req,
                            "kernel_us_per_req": r.kernel_us_per_req,
                            "redis_cpu_us_per_req": r.redis_us_per_req,
                            "socket_errors": r.wrk.socket_errors,
                            "non_2xx": r.wrk.non2xx,
                        })).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        json!({
            "scenario": self.key,
            "title": self.title,
            "proxies": proxies,
            "fixed_rate": self.rate.as_ref().map(|r| json!({
                "offered_rps": r.offered,
                "how": r.how,
                "connections": r.connections,
                "generator": "benches/load/rate.rs: open loop, one thread, keep-alive HTTP/1.1, one request in flight per connection, uniform schedule, latency from each request's scheduled send time",
            })),
            "notes": self.notes,
            "failed": self.failed,
        })
    }
}

fn scenario_dir(env: &Env, key: &str) -> PathBuf {
    env.dir.join(format!("scenario-{key}"))
}

/// Checks that every proxy answers the same statuses (equivalent configs).
fn check_answers(targets: &[Target], checks: &[(&str, &str, u16)]) -> Result<(), String> {
    for t in targets {
        for &(host, path, want) in checks {
            let got = procs::http_get(t.addr(), host, path).map(|(s, _)| s);
            if !matches!(got, Ok(s) if s == want) {
                return Err(format!(
                    "{} answers {got:?} to GET {path} (Host {host}); expected {want}",
                    t.kind.name()
                ));
            }
        }
    }
    Ok(())
}

/// Every proxy of the realistic scenario limits writes per client: a burst
/// of POSTs passes (11 with nginx's `burst=10`), and a rush beyond it is
/// refused with 429 (the cluster variants that count every request at an
/// unreachable rate aside).
fn check_write_limit(targets: &[Target]) -> Result<(), String> {
    // A cluster variant with a limit scope counts every request at a rate
    // no load reaches, on purpose (`load/cluster.rs`).
    let shipped =
        |t: &&Target| !matches!(t.kind, confs::Kind::Clustered(v) if v.limit_scope.is_some());
    for t in targets.iter().filter(shipped) {
        let statuses: Vec<u16> = (0..20)
            .map(|_| {
                procs::http_request(t.addr(), "POST", confs::API_HOST, confs::REALISTIC_PATH)
                    .map_or(0, |(s, _)| s)
            })
            .collect();
        let first_refusal = statuses.iter().position(|&s| s == 429);
        if first_refusal.is_none_or(|i| i < 11) {
            return Err(format!(
                "{} does not limit writes like the others: 20 POSTs answered {statuses:?}",
                t.kind.name()
            ));
        }
    }
    Ok(())
}

fn wrk_scenario(env: &Env, opts: &Opts, spec: WrkSpec) -> Result<WrkScenario, String> {
    let h2load = match (spec.client.h2(), &env.h2load) {
        (false, _) => None,
        (true, Some(h)) => Some(h.as_path()),
        (true, None) => {
            return Err(
                "needs h2load (apt-get install nghttp2-client; .ci/bench does it)".to_string(),
            )
        }
    };
    if spec.client == Client::WrkTls && !env.wrk_pin_checked.get() {
        tls::check_wrk_pin(&env.wrk, &env.lua, &env.tools.tls, env.upstream.tls12_only)?;
        env.wrk_pin_checked.set(true);
    }
    let ready = (spec.host, spec.path, 200);
    let mut targets = confs::start_proxies(
        &env.tools,
        &env.upstream,
        &scenario_dir(env, spec.key),
        spec.setup,
        ready,
    )?;
    if matches!(spec.setup, Setup::Realistic | Setup::Cluster { .. }) {
        check_answers(&targets, confs::REALISTIC_CHECKS)?;
        check_write_limit(&targets)?;
    }
    // `cluster`: the Redis the cluster variants share, whose CPU counts too.
    let redis_pid = match spec.setup {
        Setup::Cluster { redis_pid, .. } => Some(redis_pid),
        _ => None,
    };
    let redis_ticks = || redis_pid.and_then(procs::cpu_ticks).map(|(u, k)| u + k);
    // The POST scenarios get their own wrk script: method and body, then
    // the report hook.
    let script = match spec.post {
        None => env.lua.clone(),
        Some(stream) => {
            limits::precheck(&targets, stream)?;
            let path = env.dir.join(format!("{}.lua", spec.key));
            fs::write(&path, limits::wrk_script(stream, wrk::LUA)).map_err(|e| e.to_string())?;
            path
        }
    };
    let mut notes = Vec::new();
    let mut failed = Vec::new();
    if spec.client.tls() {
        let (kept, n, f) = tls_precheck(env, opts, &spec, targets);
        targets = kept;
        notes = n;
        failed = f;
        if targets.is_empty() {
            return Err(format!(
                "no proxy passed the HTTPS check: {}",
                failed.join("; ")
            ));
        }
    }
    let log = |t: &Target| {
        env.dir
            .join(format!("h2load-{}-{}.log", spec.key, t.kind.name()))
    };
    let run_wrk = |t: &Target, secs: u32| match spec.client {
        Client::Wrk | Client::WrkTls => {
            let u = match spec.client {
                Client::Wrk => format!("http://127.0.0.1:{}{}", t.port, spec.path),
                _ => format!("https://{}:{}{}", tls::TLS_HOST, t.tls_port, spec.path),
            };
            // wrk sends `Host: HOST:PORT` unless told otherwise; the plain
            // scenarios never did, so only HTTPS names the host (as h2load's
            // `:authority`).
            let mut headers = spec.headers.clone();
            if spec.client == Client::WrkTls {
                headers.push(format!("Host: {}", tls::TLS_HOST));
            }
            wrk::run(
                &env.wrk,
                &script,
                &wrk::Load {
                    url: &u,
                    secs,
                    threads: spec.setup.workers(),
                    connections: CONNECTIONS * spec.setup.workers(),
                    headers: &headers,
                    openssl_conf: (spec.client == Client::WrkTls)
                        .then_some(env.tools.tls.openssl_conf.as_path()),
                },
            )
        }
        Client::H2KeepAlive | Client::H2NewConnections => {
            let mode = match spec.client {
                Client::H2KeepAlive => tls::H2Mode::KeepAlive {
                    clients: CONNECTIONS,
                    streams: 1,
                    secs,
                },
                _ => tls::H2Mode::NewConnections {
                    per_sec: opts.tls_rate,
                    secs,
                },
            };
            tls::h2load(&tls::H2Load {
                h2load: h2load.expect("checked above"),
                port: t.tls_port,
                path: spec.path,
                mode,
                h1: false,
                log: &log(t),
            })
        }
    };
    for t in &targets {
        run_wrk(t, opts.warmup)?;
    }
    let mut runs: Vec<ProxyRuns> = targets
        .iter()
        .map(|t| ProxyRuns {
            kind: t.kind,
            rounds: Vec::new(),
            at_rate: Vec::new(),
            peak_rss_kib: 0,
            profile: None,
        })
        .collect();
    for round in 0..opts.rounds {
        for i in 0..targets.len() {
            let idx = (i + round) % targets.len();
            let t = &targets[idx];
            let (user0, kernel0) = t.proc.cpu_split();
            let redis0 = redis_ticks();
            let out = run_wrk(t, opts.secs)?;
            let (user1, kernel1) = t.proc.cpu_split();
            let redis1 = redis_ticks();
            let requests = out.requests;
            let per_req = |ticks: u64| {
                if requests > 0 {
                    ticks as f64 * 1e6 / env.clk_tck / requests as f64
                } else {
                    0.0
                }
            };
            let (user, kernel) = (user1.saturating_sub(user0), kernel1.saturating_sub(kernel0));
            let ticks = user + kernel;
            let cpu_us_per_req = per_req(ticks);
            eprintln!(
                "load:   {} round {}: {:.0} req/s, p99 {:.2} ms, {:.1} CPU µs/req{}",
                t.kind.name(),
                round + 1,
                out.rps,
                out.p99_ms,
                cpu_us_per_req,
                if out.socket_errors + out.non2xx > 0 {
                    format!(", {} errors, {} non-2xx", out.socket_errors, out.non2xx)
                } else {
                    String::new()
                }
            );
            let redis_us_per_req = match (redis0, redis1) {
                (Some(a), Some(b)) => Some(per_req(b.saturating_sub(a))),
                _ => None,
            };
            runs[idx].rounds.push(Round {
                wrk: out,
                cpu_ticks: ticks,
                cpu_us_per_req,
                user_us_per_req: per_req(user),
                kernel_us_per_req: per_req(kernel),
                redis_us_per_req,
            });
        }
    }
    let rate = match spec.fixed_rate && spec.client == Client::Wrk && spec.post.is_none() {
        true => Some(rate_rounds(opts, &spec, &targets, &mut runs, env.clk_tck)?),
        false => None,
    };
    if spec.setup.workers() > 1 {
        notes.push(format!(
            "{} worker threads per proxy (nginx: worker processes); wrk -t{} -c{} and the \
             fixed-rate client run on the same {} cores as the proxy and the upstream nginx \
             (1 worker), so they compete with it for CPU; bare Pingora with its default work \
             stealing (on)",
            spec.setup.workers(),
            spec.setup.workers(),
            CONNECTIONS * spec.setup.workers(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
    }
    if let Some(perf) = &env.perf {
        for (r, t) in runs.iter_mut().zip(&targets) {
            let load = || run_wrk(t, opts.secs);
            let workers = spec.setup.workers();
            let client = format!("wrk -t{workers} -c{}", CONNECTIONS * workers);
            r.profile = Some(profile(env, perf, spec.key, t, opts.secs, &client, load)?);
        }
    }
    for (r, t) in runs.iter_mut().zip(&targets) {
        r.peak_rss_kib = t.proc.hwm_kib();
    }
    if matches!(spec.setup, Setup::Realistic) {
        match metrics_notes(&targets, &runs) {
            Ok(n) => notes.extend(n),
            Err(e) => failed.push(e),
        }
    }
    if matches!(spec.setup, Setup::Cluster { .. }) {
        match cluster_notes(env, &targets, &runs) {
            Ok(n) => notes.extend(n),
            Err(e) => failed.push(e),
        }
    }
    if matches!(spec.setup, Setup::Limits { .. }) {
        match limits_notes(env, &targets, &runs) {
            Ok(n) => notes.extend(n),
            Err(e) => failed.push(e),
        }
    }
    if spec.client == Client::H2NewConnections {
        // The table's latency starts when the request is sent; a new
        // client's wait also holds connect and the handshake.
        let ttfb: Vec<String> = runs
            .iter()
            .map(|r| {
                let means = r
                    .rounds
                    .iter()
                    .filter_map(|round| tls::mean_ms(&round.wrk.raw["time_to_1st_byte"]))
                    .collect();
                format!("{} {:.2}", r.kind.name(), median(means))
            })
            .collect();
        notes.push(format!(
            "mean time from connect to first response byte (TCP + TLS handshake + request), ms: {}",
            ttfb.join(", ")
        ));
    }
    Ok(WrkScenario {
        key: spec.key,
        title: spec.title,
        proxies: runs,
        rate,
        notes,
        failed,
    })
}

/// The fixed-rate rounds of a plain-HTTP wrk scenario, after its
/// closed-loop rounds: every proxy at one offered rate (`--rate`, else
/// [`RATE_SHARE`] of the slowest proxy's closed-loop req/s), interleaved
/// like the closed-loop rounds, by the open-loop client of `load/rate.rs`
/// on [`CONNECTIONS`] × workers connections opened before each round.
fn rate_rounds(
    opts: &Opts,
    spec: &WrkSpec,
    targets: &[Target],
    runs: &mut [ProxyRuns],
    clk_tck: f64,
) -> Result<RateInfo, String> {
    let (offered, how) = match opts.rate {
        Some(r) => (r, "--rate".to_string()),
        None => {
            let (slowest, rps) = runs
                .iter()
                .map(|r| (r.kind.name(), r.figures().rps))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .ok_or("no proxy to load")?;
            let r = ((rps * RATE_SHARE / 100.0).floor() * 100.0) as u32;
            if r < 100 {
                return Err(format!(
                    "{slowest} carried {rps:.0} req/s closed-loop: too little for a fixed-rate run"
                ));
            }
            (
                r,
                format!(
                    "{:.0} % of the slowest proxy's closed-loop req/s ({slowest}, {rps:.0})",
                    RATE_SHARE * 100.0
                ),
            )
        }
    };
    let connections = CONNECTIONS * spec.setup.workers();
    let close = spec
        .headers
        .iter()
        .any(|h| h.eq_ignore_ascii_case("connection: close"));
    eprintln!(
        "load:   fixed rate: {offered} req/s ({how}), {connections} connections, {} s per round",
        opts.secs
    );
    for round in 0..opts.rounds {
        for i in 0..targets.len() {
            let idx = (i + round) % targets.len();
            let t = &targets[idx];
            let mut request = format!("GET {} HTTP/1.1\r\n", spec.path);
            // As wrk: `Host: 127.0.0.1:PORT` unless the scenario names one.
            if !spec
                .headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("host:"))
            {
                request.push_str(&format!("Host: 127.0.0.1:{}\r\n", t.port));
            }
            for h in &spec.headers {
                request.push_str(h);
                request.push_str("\r\n");
            }
            request.push_str("\r\n");
            let conns = rate::connect(t.addr(), connections)?;
            let (user0, kernel0) = t.proc.cpu_split();
            let out = conns.run(&rate::Plan {
                request: request.into_bytes(),
                close,
                rate: offered,
                secs: opts.secs,
            })?;
            let (user1, kernel1) = t.proc.cpu_split();
            let per_req = |ticks: u64| match out.completed {
                0 => 0.0,
                n => ticks as f64 * 1e6 / clk_tck / n as f64,
            };
            let (user, kernel) = (user1.saturating_sub(user0), kernel1.saturating_sub(kernel0));
            let bad = out.errors + out.non2xx + out.missed;
            eprintln!(
                "load:   {} at {offered} req/s, round {}: achieved {:.0} req/s, p50 {:.3} ms, \
                 p99 {:.3} ms, p99.9 {:.3} ms, {:.1} CPU µs/req (client lag p99 {:.3} ms){}",
                t.kind.name(),
                round + 1,
                out.achieved_rps,
                out.p50_ms,
                out.p99_ms,
                out.p999_ms,
                per_req(user + kernel),
                out.send_lag_p99_ms,
                if bad > 0 {
                    format!(
                        ", {} errors, {} non-2xx, {} never sent",
                        out.errors, out.non2xx, out.missed
                    )
                } else {
                    String::new()
                }
            );
            runs[idx].at_rate.push(RateRound {
                cpu_ticks: user + kernel,
                cpu_us_per_req: per_req(user + kernel),
                user_us_per_req: per_req(user),
                kernel_us_per_req: per_req(kernel),
                out,
            });
        }
    }
    Ok(RateInfo {
        offered,
        how,
        connections,
    })
}

/// After the rounds of a `limits` scenario: the limits must have refused
/// nothing (no non-2xx answer, no refusal or queued request in `GET
/// /limits`) and seen every request (the budget admitted at least as many
/// as wrk completed); notes say so, with the token counts and the cost of
/// the limits (switchyard on against off).
fn limits_notes(env: &Env, targets: &[Target], runs: &[ProxyRuns]) -> Result<Vec<String>, String> {
    let on = targets
        .iter()
        .find(|t| t.kind == Kind::Switchyard)
        .ok_or("no switchyard in the limits scenario")?;
    let c = limits::counts(on.admin_port, &env.tools.token)?;
    let figures = |k: Kind| runs.iter().find(|r| r.kind == k).map(ProxyRuns::figures);
    let requests: u64 = runs
        .iter()
        .filter(|r| r.kind == Kind::Switchyard)
        .flat_map(|r| &r.rounds)
        .map(|x| x.wrk.requests)
        .sum();
    let mut problems: Vec<String> = c
        .refusals
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what}: {n}"))
        .collect();
    for r in runs {
        let bad: u64 = r
            .rounds
            .iter()
            .map(|x| x.wrk.non2xx + x.wrk.socket_errors)
            .sum();
        if bad > 0 {
            problems.push(format!(
                "{}: {bad} failed or non-2xx answers",
                r.kind.name()
            ));
        }
    }
    if c.budget_admitted < requests {
        problems.push(format!(
            "the token budget admitted {} requests, fewer than the {requests} measured",
            c.budget_admitted
        ));
    }
    if !problems.is_empty() {
        return Err(format!(
            "the limits were meant to refuse nothing: {}",
            problems.join(", ")
        ));
    }
    let mut notes = vec![format!(
        "limits on: 0 refused, 0 queued (GET /limits and the answers' statuses); since start \
         the token budget admitted {} requests and the concurrency cap {}, {} tokens settled from \
         the answers' usage, {} kept (requests cut off by wrk's stop)",
        c.budget_admitted, c.cap_admitted, c.tokens_settled, c.tokens_kept
    )];
    if let (Some(on), Some(off)) = (figures(Kind::Switchyard), figures(Kind::SwitchyardNoLimits)) {
        notes.push(format!(
            "limits on / off: req/s {:.2}, p99 {:.2}, CPU µs/req {:.2} ({:+.1} µs per request)",
            on.rps / off.rps.max(1e-9),
            on.p99 / off.p99.max(1e-9),
            on.cpu / off.cpu.max(1e-9),
            on.cpu - off.cpu
        ));
    }
    notes.push(
        "nginx: plain proxying of the same POST, a reference line (it has no token budget)"
            .to_string(),
    );
    Ok(notes)
}

/// After the rounds of `cluster`'s on-vs-off part: every cluster variant
/// must still be on the cluster's state (its `GET /status` names it, Redis
/// reachable, a version served) and no variant may have failed a request;
/// notes give each variant against the first (`[cluster]` off) and the
/// Redis CPU per request during each variant's rounds.
fn cluster_notes(env: &Env, targets: &[Target], runs: &[ProxyRuns]) -> Result<Vec<String>, String> {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    for t in targets {
        let Kind::Clustered(v) = t.kind else { continue };
        if !v.cluster {
            continue;
        }
        let Some(instance) = cluster::instance_of(v) else {
            problems.push(format!("{}: no instance name", v.name));
            continue;
        };
        match cluster::check_member(t.admin_port, &env.tools.token, &instance) {
            Ok(version) => notes.push(format!(
                "{}: GET /status after the rounds: instance {instance}, Redis reachable, \
                 state version {version}",
                v.name
            )),
            Err(e) => problems.push(e),
        }
    }
    for r in runs {
        let bad: u64 = r
            .rounds
            .iter()
            .map(|x| x.wrk.non2xx + x.wrk.socket_errors)
            .sum();
        if bad > 0 {
            problems.push(format!(
                "{}: {bad} failed or non-2xx answers",
                r.kind.name()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if let Some((base, others)) = runs.split_first() {
        let b = base.figures();
        for r in others {
            let f = r.figures();
            notes.push(format!(
                "{} / {}: req/s {:.2}, p99 {:.2}, CPU µs/req {:.2} ({:+.2} µs per request)",
                r.kind.name(),
                base.kind.name(),
                f.rps / b.rps.max(1e-9),
                f.p99 / b.p99.max(1e-9),
                f.cpu / b.cpu.max(1e-9),
                f.cpu - b.cpu
            ));
        }
    }
    let redis: Vec<String> = runs
        .iter()
        .map(|r| {
            let per_req = median(r.rounds.iter().filter_map(|x| x.redis_us_per_req).collect());
            format!("{} {per_req:.2}", r.kind.name())
        })
        .collect();
    notes.push(format!(
        "redis-server CPU during each variant's rounds, µs per request (not in the table's \
         CPU; heartbeats and version checks of the cluster variants, all of them running): {}",
        redis.join(", ")
    ));
    Ok(notes)
}

/// After the rounds of `realistic`: switchyard with its metrics listener
/// must have counted every measured request (`switchyard_requests_total`
/// from `GET /metrics`, which also holds warm-up and checks); notes give the
/// cost of counting (switchyard against `switchyard, no metrics`).
fn metrics_notes(targets: &[Target], runs: &[ProxyRuns]) -> Result<Vec<String>, String> {
    let on = targets
        .iter()
        .find(|t| t.kind == Kind::Switchyard && t.metrics_port != 0)
        .ok_or("no switchyard with metrics in the realistic scenario")?;
    let (status, body) = procs::http_get(procs::local(on.metrics_port), "127.0.0.1", "/metrics")
        .map_err(|e| format!("GET /metrics: {e}"))?;
    if status != 200 {
        return Err(format!("GET /metrics answered {status}"));
    }
    let text = String::from_utf8_lossy(&body);
    let counted: f64 = text
        .lines()
        .filter(|l| l.starts_with("switchyard_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    let measured: u64 = runs
        .iter()
        .filter(|r| r.kind == Kind::Switchyard)
        .flat_map(|r| &r.rounds)
        .map(|x| x.wrk.requests)
        .sum();
    if counted < measured as f64 {
        return Err(format!(
            "switchyard_requests_total says {counted}, fewer than the {measured} requests measured"
        ));
    }
    let figures = |k: Kind| runs.iter().find(|r| r.kind == k).map(ProxyRuns::figures);
    let mut notes = vec![format!(
        "metrics on: switchyard_requests_total {counted:.0} since start ({measured} measured, the rest warm-up and checks)"
    )];
    if let (Some(on), Some(off)) = (
        figures(Kind::Switchyard),
        figures(Kind::SwitchyardNoMetrics),
    ) {
        notes.push(format!(
            "metrics on / off: req/s {:.2}, p99 {:.2}, CPU µs/req {:.2} ({:+.2} µs per request)",
            on.rps / off.rps.max(1e-9),
            on.p99 / off.p99.max(1e-9),
            on.cpu / off.cpu.max(1e-9),
            on.cpu - off.cpu
        ));
    }
    Ok(notes)
}

/// Before an HTTPS scenario: every proxy must answer over TLS 1.3 with the
/// scenario's application protocol (an h2load probe, which fails on
/// anything else); a proxy that does not is left out of the scenario with
/// the reason, so the others are still measured. Returns the proxies kept,
/// notes for the table (what was negotiated; for `Connection: close` over
/// HTTP/1.1, whether each server resumes TLS 1.3 sessions, which wrk tries
/// on every reconnect) and the failures.
fn tls_precheck(
    env: &Env,
    opts: &Opts,
    spec: &WrkSpec,
    targets: Vec<Target>,
) -> (Vec<Target>, Vec<String>, Vec<String>) {
    let (mut kept, mut notes, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    let mut resumption = Vec::new();
    let mut negotiated: Vec<(&str, String)> = Vec::new();
    for t in targets {
        let name = t.kind.name();
        let probe = match &env.h2load {
            Some(h2load) => tls::h2load(&tls::H2Load {
                h2load,
                port: t.tls_port,
                path: spec.path,
                mode: tls::H2Mode::Probe,
                h1: !spec.client.h2(),
                log: &env
                    .dir
                    .join(format!("h2load-probe-{}-{name}.log", spec.key)),
            })
            .and_then(|out| match out.requests {
                0 => Err(format!("no answer over HTTPS: {}", out.raw)),
                _ => Ok(out),
            }),
            None => Err("needs h2load (apt-get install nghttp2-client; .ci/bench does it)".into()),
        };
        let out = match probe {
            Ok(out) => out,
            Err(e) => {
                eprintln!("load:   {name}: left out of {}: {e}", spec.key);
                let log = t.proc.log_tail(10);
                let log = if log.trim().is_empty() {
                    String::new()
                } else {
                    format!("; its log:\n{log}")
                };
                failed.push(format!("{name} left out: {e}{log}"));
                continue;
            }
        };
        negotiated.push((
            name,
            format!(
                "{} {} {}",
                out.raw["tls_protocol"].as_str().unwrap_or("?"),
                out.raw["cipher"].as_str().unwrap_or("?"),
                out.raw["server_temp_key"].as_str().unwrap_or("?")
            ),
        ));
        if spec.client == Client::WrkTls && spec.headers.iter().any(|h| h.contains("close")) {
            match tls::resumes(&env.tools.tls, procs::local(t.tls_port)) {
                Ok(r) => resumption.push(format!("{name} {}", if r { "yes" } else { "no" })),
                Err(e) => resumption.push(format!("{name} unknown ({e})")),
            }
        }
        kept.push(t);
    }
    // Once when every proxy agreed (protocol and cipher always must; the
    // key exchange group may differ), else per proxy.
    let n = match negotiated.first() {
        Some((_, first)) if negotiated.iter().all(|(_, n)| n == first) => first.clone(),
        _ => negotiated
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    if !n.is_empty() {
        notes.push(format!(
            "negotiated (h2load probe of each proxy): {n}; same certificate (ECDSA P-256) everywhere"
        ));
    }
    notes.push(match spec.client {
        Client::WrkTls => "wrk pinned to TLS 1.3 by OPENSSL_CONF (checked against a TLS 1.2-only server: no request completes)".to_string(),
        _ => "h2load reports TLS 1.3 and h2 on every run (checked)".to_string(),
    });
    if !resumption.is_empty() {
        notes.push(format!(
            "wrk offers the previous TLS session on each reconnect; server resumes TLS 1.3 sessions: {}",
            resumption.join(", ")
        ));
    }
    if spec.client == Client::H2NewConnections {
        notes.push(format!(
            "fixed arrival rate: {} new connections/s (h2load -r over 10 ms periods), \
             each a full handshake (h2load does not resume) and one request; \
             req/s below the rate means the proxy fell behind",
            opts.tls_rate
        ));
    }
    (kept, notes, failed)
}

/// One unmeasured round of `load` (`secs` long) under `perf record`;
/// returns the share of samples per component and draws a flame graph when
/// it can.
fn profile(
    env: &Env,
    perf: &Path,
    key: &str,
    t: &Target,
    secs: u32,
    client: &str,
    load: impl FnOnce() -> Result<wrk::WrkOut, String>,
) -> Result<BTreeMap<&'static str, f64>, String> {
    let name = t.kind.name();
    let data = env.dir.join(format!("perf-{key}-{name}.data"));
    let recording = perf::record(perf, &t.proc.pids(), secs, &data)?;
    load()?;
    let data = recording.finish()?;
    let shares = perf::breakdown(perf, &data)?;
    let svg = results_dir().join(format!("flame-{key}-{name}.svg"));
    let title = format!("{name}: {key}, {client}");
    match perf::flamegraph(perf, &data, &title, &svg)? {
        true => eprintln!("load:   {name}: flame graph in {}", svg.display()),
        false => eprintln!("load:   {name}: no flame graph (cargo install inferno to get one)"),
    }
    Ok(shares)
}

fn print_profile_table(scenarios: &[WrkScenario]) {
    for s in scenarios {
        let profiled: Vec<&ProxyRuns> = s.proxies.iter().filter(|p| p.profile.is_some()).collect();
        if profiled.is_empty() {
            continue;
        }
        println!(
            "{}: share of the proxy's CPU samples (perf, by function name)",
            s.title
        );
        let mut header = vec!["component"];
        header.extend(profiled.iter().map(|p| p.kind.name()));
        let rows: Vec<Vec<String>> = perf::COMPONENTS
            .iter()
            .map(|c| {
                let mut row = vec![c.to_string()];
                for p in &profiled {
                    let pct = p.profile.as_ref().and_then(|m| m.get(c)).copied();
                    row.push(pct.map_or("-".into(), |v| format!("{v:.1} %")));
                }
                row
            })
            .collect();
        print_table(&header, &rows);
        println!();
    }
}

// ---------------------------------------------------------------------------
// (d) idle connections
// ---------------------------------------------------------------------------

fn idle_scenario(env: &Env, opts: &Opts) -> Result<Vec<(Kind, idle::IdleResult)>, String> {
    let g = &env.upstream.general;
    let setup = Setup::Simple {
        backend: g[0],
        alt: g[1],
        many_conns: true,
        stream: false,
        tls: false,
        websocket: false,
        workers: 1,
    };
    let targets = confs::start_proxies(
        &env.tools,
        &env.upstream,
        &scenario_dir(env, "idle"),
        setup,
        (BENCH_HOST, "/", 200),
    )?;
    let mut out = Vec::new();
    for t in &targets {
        // Warm up first so the baseline is a proxy that has served traffic.
        let url = format!("http://127.0.0.1:{}/", t.port);
        wrk::run(
            &env.wrk,
            &env.lua,
            &wrk::Load {
                url: &url,
                secs: 1,
                threads: 1,
                connections: CONNECTIONS,
                headers: &[],
                openssl_conf: None,
            },
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let mut n = opts.idle_conns;
        if t.kind == Kind::Haproxy {
            let cap = confs::haproxy_maxconn(setup, env.tools.nofile).saturating_sub(100) as usize;
            if cap < n {
                eprintln!(
                    "load:   haproxy: the open-file limit ({}) caps it at {cap} connections",
                    env.tools.nofile
                );
                n = cap;
            }
        }
        let r = idle::hold(&t.proc, t.addr(), BENCH_HOST, n);
        eprintln!(
            "load:   {}: {} of {} held in {:.1} s, RSS {:.1} -> {:.1} MiB ({:.1} KiB/conn)",
            t.kind.name(),
            r.held,
            r.wanted,
            r.open_secs,
            r.rss_before_kib as f64 / 1024.0,
            r.rss_held_kib as f64 / 1024.0,
            r.kib_per_conn()
        );
        out.push((t.kind, r));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// (d2) idle WebSockets
// ---------------------------------------------------------------------------

fn ws_idle_scenario(env: &Env, opts: &Opts) -> Result<Vec<(Kind, idle::IdleResult)>, String> {
    let echo = ws_idle::start_echo().map_err(|e| format!("WebSocket echo upstream: {e}"))?;
    let setup = Setup::Simple {
        backend: echo.port(),
        alt: env.upstream.general[1],
        many_conns: true,
        stream: false,
        tls: false,
        websocket: true,
        workers: 1,
    };
    let targets = confs::start_proxies(
        &env.tools,
        &env.upstream,
        &scenario_dir(env, "ws-idle"),
        setup,
        (BENCH_HOST, "/", 200),
    )?;
    // Two descriptors per WebSocket here (client, echo side) and in the proxy.
    let fit = (env.tools.nofile.saturating_sub(1000) / 2) as usize;
    let mut out = Vec::new();
    for t in &targets {
        let mut n = opts.ws_conns.min(fit);
        if t.kind == Kind::Haproxy {
            n = n.min(confs::haproxy_maxconn(setup, env.tools.nofile).saturating_sub(100) as usize);
        }
        if n < opts.ws_conns {
            eprintln!(
                "load:   {}: the open-file limit ({}) caps it at {n} WebSockets",
                t.kind.name(),
                env.tools.nofile
            );
        }
        let r = ws_idle::hold(&t.proc, t.addr(), BENCH_HOST, "/ws", n);
        eprintln!(
            "load:   {}: {} of {} WebSockets held in {:.1} s, RSS {:.1} -> {:.1} MiB ({:.1} KiB/conn)",
            t.kind.name(),
            r.held,
            r.wanted,
            r.open_secs,
            r.rss_before_kib as f64 / 1024.0,
            r.rss_held_kib as f64 / 1024.0,
            r.kib_per_conn()
        );
        out.push((t.kind, r));
    }
    Ok(out)
}

fn print_idle_table(results: &[(Kind, idle::IdleResult)], title: &str) {
    let base = results
        .iter()
        .find(|(k, _)| *k == Kind::Nginx)
        .map(|(_, r)| r.clone());
    println!("{title} (RSS summed over processes; ratio to nginx in parentheses)");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(k, r)| {
            let mib = |kib: u64| kib as f64 / 1024.0;
            vec![
                k.name().to_string(),
                format!("{}/{}", r.held, r.wanted),
                format!("{}/{}", r.sampled_alive, r.sampled),
                cell(
                    mib(r.rss_before_kib),
                    base.as_ref().map(|b| mib(b.rss_before_kib)),
                    1,
                ),
                cell(
                    mib(r.rss_held_kib),
                    base.as_ref().map(|b| mib(b.rss_held_kib)),
                    1,
                ),
                cell(r.kib_per_conn(), base.as_ref().map(|b| b.kib_per_conn()), 2),
                cell(mib(r.hwm_kib), base.as_ref().map(|b| mib(b.hwm_kib)), 1),
                format!("{:.1}", mib(r.rss_after_close_kib)),
            ]
        })
        .collect();
    print_table(
        &[
            "proxy",
            "held",
            "alive after",
            "RSS before MiB",
            "RSS held MiB",
            "KiB/conn",
            "peak RSS MiB",
            "RSS after close MiB",
        ],
        &rows,
    );
    println!();
}

// ---------------------------------------------------------------------------
// (e) SSE relay
// ---------------------------------------------------------------------------

struct SseRound {
    target: String,
    sample: sse::SseSample,
    p50_us: f64,
    p99_us: f64,
}

struct SseResult {
    events: usize,
    rounds: Vec<Vec<SseRound>>,
}

impl SseResult {
    /// Per target: (ttfb ms, first event ms, p50 µs, p99 µs, added p50 µs,
    /// added p99 µs), medians over rounds; "added" is via-proxy minus direct
    /// of the same round.
    fn summary(&self) -> Vec<(String, [f64; 6])> {
        let names: Vec<String> = self
            .rounds
            .first()
            .map(|r| r.iter().map(|s| s.target.clone()).collect())
            .unwrap_or_default();
        names
            .into_iter()
            .map(|name| {
                let mut cols: [Vec<f64>; 6] = Default::default();
                for round in &self.rounds {
                    let direct = round.iter().find(|s| s.target == "direct");
                    let Some(s) = round.iter().find(|s| s.target == name) else {
                        continue;
                    };
                    cols[0].push(s.sample.ttfb_ms);
                    cols[1].push(s.sample.first_event_ms);
                    cols[2].push(s.p50_us);
                    cols[3].push(s.p99_us);
                    if let Some(d) = direct {
                        cols[4].push(s.p50_us - d.p50_us);
                        cols[5].push(s.p99_us - d.p99_us);
                    }
                }
                let fig = cols.map(median);
                (name, fig)
            })
            .collect()
    }

    fn json(&self) -> Value {
        let summary: serde_json::Map<String, Value> = self
            .summary()
            .into_iter()
            .map(|(name, f)| {
                (
                    name,
                    json!({
                        "ttfb_ms": f[0], "first_event_ms": f[1],
                        "delay_p50_us": f[2], "delay_p99_us": f[3],
                        "added_p50_us": f[4], "added_p99_us": f[5],
                    }),
                )
            })
            .collect();
        json!({
            "events_per_stream": self.events,
            "event_interval_ms": SSE_EVERY.as_millis() as u64,
            "median_over_rounds": summary,
            "rounds": self.rounds.iter().map(|round| round.iter().map(|s| json!({
                "target": s.target,
                "ttfb_ms": s.sample.ttfb_ms,
                "first_event_ms": s.sample.first_event_ms,
                "delay_p50_us": s.p50_us,
                "delay_p99_us": s.p99_us,
                "delays_us": s.sample.delays_us,
            })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })
    }
}

fn sse_scenario(env: &Env, opts: &Opts) -> Result<SseResult, String> {
    let upstream = sse::start_server(SSE_EVERY).map_err(|e| format!("SSE upstream: {e}"))?;
    let setup = Setup::Simple {
        backend: upstream.port(),
        alt: env.upstream.general[1],
        many_conns: false,
        stream: true,
        tls: false,
        websocket: false,
        workers: 1,
    };
    let targets = confs::start_proxies(
        &env.tools,
        &env.upstream,
        &scenario_dir(env, "sse"),
        setup,
        (BENCH_HOST, "/health", 200),
    )?;
    let mut list: Vec<(String, std::net::SocketAddr)> = vec![("direct".into(), upstream)];
    list.extend(
        targets
            .iter()
            .map(|t| (t.kind.name().to_string(), t.addr())),
    );
    // Warm-up: one short stream each.
    for (_, addr) in &list {
        sse::read_stream(*addr, BENCH_HOST, 5)?;
    }
    // All streams of a round run at the same time, so whatever else the
    // machine does hits the direct stream and the proxied ones alike.
    let mut rounds = Vec::new();
    for round in 0..opts.rounds {
        let threads: Vec<_> = list
            .iter()
            .map(|(name, addr)| {
                let (name, addr, events) = (name.clone(), *addr, opts.sse_events);
                std::thread::spawn(move || (name, sse::read_stream(addr, BENCH_HOST, events)))
            })
            .collect();
        let mut this = Vec::new();
        for t in threads {
            let (name, sample) = t.join().map_err(|_| "SSE client panicked".to_string())?;
            let sample = sample?;
            let mut d = sample.delays_us.clone();
            d.sort_by(f64::total_cmp);
            let (p50_us, p99_us) = (percentile(&d, 50.0), percentile(&d, 99.0));
            eprintln!(
                "load:   {name} round {}: ttfb {:.2} ms, delay p50 {p50_us:.0} µs, p99 {p99_us:.0} µs",
                round + 1,
                sample.ttfb_ms
            );
            this.push(SseRound {
                target: name,
                sample,
                p50_us,
                p99_us,
            });
        }
        rounds.push(this);
    }
    Ok(SseResult {
        events: opts.sse_events,
        rounds,
    })
}

fn print_sse_table(r: &SseResult) {
    println!(
        "(e) SSE relay: {} events per stream, one every {} ms, all streams at once; \
         delay = receive time - send stamp; added = via proxy - direct (medians over rounds)",
        r.events,
        SSE_EVERY.as_millis()
    );
    let rows: Vec<Vec<String>> = r
        .summary()
        .into_iter()
        .map(|(name, f)| {
            let added = |v: f64| {
                if name == "direct" {
                    "-".to_string()
                } else {
                    format!("{v:.0}")
                }
            };
            vec![
                name.clone(),
                format!("{:.2}", f[0]),
                format!("{:.2}", f[1]),
                format!("{:.0}", f[2]),
                format!("{:.0}", f[3]),
                added(f[4]),
                added(f[5]),
            ]
        })
        .collect();
    print_table(
        &[
            "target",
            "TTFB ms",
            "1st event ms",
            "delay p50 µs",
            "delay p99 µs",
            "added p50 µs",
            "added p99 µs",
        ],
        &rows,
    );
    println!();
}

// ---------------------------------------------------------------------------
// Switch under load
// ---------------------------------------------------------------------------

fn switch_scenario(env: &Env, opts: &Opts) -> Result<Vec<switch::SwitchReport>, String> {
    let targets = confs::start_proxies(
        &env.tools,
        &env.upstream,
        &scenario_dir(env, "switch"),
        Setup::Switch,
        (BENCH_HOST, "/", 200),
    )?;
    let mut reports = Vec::new();
    for t in &targets {
        let url = format!("http://127.0.0.1:{}/", t.port);
        let plan = switch::Plan {
            proxy: t.kind.name(),
            method: "",
            url: &url,
            clients: SWITCH_CLIENTS,
            secs: opts.switch_secs,
            interval: SWITCH_EVERY,
        };
        let report = match t.kind {
            Kind::Switchyard => {
                let admin = format!("http://127.0.0.1:{}/services/app/switch", t.admin_port);
                let auth = format!("Bearer {}", env.tools.token);
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let plan = switch::Plan {
                    method: "POST /services/app/switch",
                    ..plan
                };
                switch::run(&plan, |to| {
                    let body =
                        json!({"to": switch::color_name(to), "reason": "load test"}).to_string();
                    let mut resp = agent
                        .post(&admin)
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/json")
                        .send(body.as_str())
                        .map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    if status == 200 {
                        Ok(())
                    } else {
                        Err(format!("{status}: {text}"))
                    }
                })
            }
            Kind::Nginx => {
                let include = t.dir.join("app-color.conf");
                let plan = switch::Plan {
                    method: "rewrite upstream + nginx -s reload",
                    ..plan
                };
                let up = &env.upstream;
                let r = switch::run(&plan, |to| {
                    let port = if to == switch::BLUE {
                        up.blue
                    } else {
                        up.green
                    };
                    confs::write_nginx_color(&include, port)?;
                    confs::nginx_reload(&env.tools.nginx, &t.dir, &t.conf)
                });
                // Leave nginx on blue again and let old workers go.
                let _ = confs::write_nginx_color(&include, up.blue);
                r
            }
            // Neither is started for the switch scenario.
            Kind::Haproxy
            | Kind::Pingora
            | Kind::SwitchyardNoLimits
            | Kind::SwitchyardNoMetrics
            | Kind::SwitchyardThreads { .. }
            | Kind::Clustered(_) => continue,
        };
        eprintln!(
            "load:   {}: {} requests, {} failed, {} answered by the old color after the switch returned, {} switches",
            report.proxy, report.requests, report.failed, report.stale, report.switches
        );
        reports.push(report);
    }
    Ok(reports)
}

// ---------------------------------------------------------------------------
// (m) (n) cluster: [cluster] off vs on; switch propagation across instances
// ---------------------------------------------------------------------------

/// `cluster` (`load/cluster.rs`): starts the scenario's redis-server, runs
/// (m) into `wrk_results` and (n) into `propagation`; both parts run even
/// when the other fails, and the errors of both come back together. The
/// Redis is killed at the end.
fn cluster_scenario(
    env: &Env,
    opts: &Opts,
    wrk_results: &mut Vec<WrkScenario>,
    propagation: &mut Option<cluster::Report>,
) -> Result<(), String> {
    let redis_server = find_tool("redis-server").ok_or(
        "needs redis-server (apt-get install redis-server; .ci/setup, which .ci/bench runs, does it)",
    )?;
    let dir = scenario_dir(env, "cluster");
    let mut redis = cluster::start_redis(&redis_server, &dir.join("redis"))?;
    let spec = WrkSpec {
        key: "cluster",
        title: "(m) realistic routes, [cluster] off vs on",
        setup: Setup::Cluster {
            redis_port: redis.port,
            redis_pid: redis.proc.pids()[0],
        },
        host: confs::API_HOST,
        path: confs::REALISTIC_PATH,
        headers: vec![format!("Host: {}", confs::API_HOST)],
        client: Client::Wrk,
        post: None,
        fixed_rate: false,
    };
    let mut errors = Vec::new();
    // wrk_scenario stops its proxies before it returns.
    match wrk_scenario(env, opts, spec) {
        Ok(r) => wrk_results.push(r),
        Err(e) => errors.push(format!("(m) [cluster] off vs on: {e}")),
    }
    match cluster_propagation(env, opts, &dir.join("propagation"), &redis) {
        Ok(r) => {
            eprintln!(
                "load:   propagation: {} switches, {} requests, {} failed, {} stale, {} never reached",
                r.switches, r.requests, r.failed, r.stale, r.unreached
            );
            *propagation = Some(r);
        }
        Err(e) => errors.push(format!("(n) switch propagation: {e}")),
    }
    if let Some(how) = redis.proc.exited() {
        errors.push(format!(
            "redis-server exited during the scenario ({how}); its log:
{}",
            redis.proc.log_tail(20)
        ));
    }
    drop(redis);
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors.join("; ")),
    }
}

/// (n): [`cluster::INSTANCES`] switchyard instances of one cluster on
/// `redis`, each in its own directory under `dir` (config, state_dir, log),
/// all serving blue and seeing each other live; then [`cluster::run`].
fn cluster_propagation(
    env: &Env,
    opts: &Opts,
    dir: &Path,
    redis: &cluster::Redis,
) -> Result<cluster::Report, String> {
    let mut running = Vec::new();
    let mut nodes = Vec::new();
    for i in 1..=cluster::INSTANCES {
        let instance = format!("bench-{i}");
        let d = dir.join(&instance);
        fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        let ports = procs::free_ports(2);
        let (port, admin_port) = (ports[0], ports[1]);
        let conf = d.join("switchyard.toml");
        let text = format!(
            "{}\n{}",
            confs::switchyard_conf(
                &env.tools,
                &env.upstream,
                &d,
                (port, 0, 0),
                admin_port,
                Setup::Switch,
                Kind::Switchyard,
            ),
            cluster::section(redis.port, cluster::SWITCH_NAME, &instance)
        );
        fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut p = confs::spawn_switchyard(&env.tools, &d, &conf)?;
        procs::wait_ready(&mut p, procs::local(port), BENCH_HOST, "/", 200)
            .map_err(|e| format!("{instance}: {e}"))?;
        running.push(p);
        nodes.push(cluster::Node {
            port,
            admin_port,
            instance,
        });
    }
    cluster::wait_live(&nodes, &env.tools.token)?;
    for n in &nodes {
        let (status, body) = procs::http_get(procs::local(n.port), BENCH_HOST, "/")
            .map_err(|e| format!("{}: GET /: {e}", n.instance))?;
        if status != 200 || !body.ends_with(b"blue") {
            return Err(format!(
                "{} does not serve blue before the first switch: {}",
                n.instance,
                String::from_utf8_lossy(&body)
            ));
        }
    }
    let plan = cluster::Plan {
        switches: opts.cluster_switches,
        every: CLUSTER_SWITCH_EVERY,
        clients: CLUSTER_CLIENTS,
        pace: CLUSTER_PACE,
        bound: CLUSTER_BOUND,
    };
    let report = cluster::run(&plan, &nodes, &env.tools.token);
    for (p, n) in running.iter_mut().zip(&nodes) {
        if let Some(how) = p.exited() {
            return Err(format!(
                "{} exited during the run ({how}); its log:\n{}",
                n.instance,
                p.log_tail(30)
            ));
        }
    }
    Ok(report)
}

/// Prints the switch table; false when switchyard broke its promise.
fn print_switch_table(reports: &[switch::SwitchReport]) -> bool {
    println!(
        "Switch under load: {SWITCH_CLIENTS} keep-alive clients, active color flipped every {} ms; \
         clean = no failed request and none answered by the old color once the switch call had returned \
         (required of switchyard; nginx is shown for comparison)",
        SWITCH_EVERY.as_millis()
    );
    let mut ok = true;
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let clean = r.failed == 0 && r.stale == 0 && r.switch_errors == 0;
            if r.proxy == "switchyard" && !clean {
                ok = false;
            }
            vec![
                r.proxy.clone(),
                r.method.clone(),
                format!("{:.0}", r.secs),
                r.requests.to_string(),
                r.failed.to_string(),
                r.stale.to_string(),
                format!("{}/{}", r.switches - r.switch_errors, r.switches),
                format!("{:.1}/{:.1}", r.call_ms_p50, r.call_ms_max),
                if clean { "yes" } else { "NO" }.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "proxy",
            "switch method",
            "s",
            "requests",
            "failed",
            "old color after switch",
            "switches ok",
            "call ms p50/max",
            "clean",
        ],
        &rows,
    );
    for r in reports {
        let mut f: Vec<_> = r.failures.iter().collect();
        f.sort_by(|a, b| b.1.cmp(a.1));
        for (e, n) in f.into_iter().take(4) {
            println!("  {} failure ×{n}: {e}", r.proxy);
        }
    }
    println!();
    ok
}

// ---------------------------------------------------------------------------
// Tables, statistics, results
// ---------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ratio(v: f64, base: f64) -> Option<f64> {
    (base > 0.0).then(|| v / base)
}

/// `value (ratio to base)`.
fn cell(v: f64, base: Option<f64>, digits: usize) -> String {
    match base.and_then(|b| ratio(v, b)) {
        Some(r) => format!("{v:.digits$} ({r:.2})"),
        None => format!("{v:.digits$}"),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i] - c.chars().count();
                if i < 2 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_wrk_table(scenarios: &[WrkScenario]) {
    if scenarios.is_empty() {
        return;
    }
    println!(
        "wrk -t1 -c{CONNECTIONS} (threads: -t{THREADS_WORKERS} -c{}; HTTP/2: h2load -t1): medians \
         over rounds; (ratio to nginx): \
         req/s higher is better, everything else lower is better; latency from request sent to \
         response complete (connect and TLS handshake not included)",
        CONNECTIONS * THREADS_WORKERS
    );
    let mut rows = Vec::new();
    for s in scenarios {
        let base = s.nginx();
        for p in &s.proxies {
            let f = p.figures();
            let b = |g: fn(&Figures) -> f64| base.as_ref().map(g);
            rows.push(vec![
                s.title.to_string(),
                p.kind.name().to_string(),
                cell(f.rps, b(|n| n.rps), 0),
                cell(f.p50, b(|n| n.p50), 2),
                cell(f.p99, b(|n| n.p99), 2),
                cell(f.p999, b(|n| n.p999), 2),
                cell(f.cpu, b(|n| n.cpu), 1),
                format!("{:.1} / {:.1}", f.user, f.kernel),
                cell(f.rss_mib, b(|n| n.rss_mib), 1),
                f.errors.to_string(),
            ]);
        }
    }
    print_table(
        &[
            "scenario",
            "proxy",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "CPU µs/req",
            "user / kernel",
            "peak RSS MiB",
            "errors",
        ],
        &rows,
    );
    for s in scenarios {
        for n in &s.notes {
            println!("  {}: {n}", s.key);
        }
    }
    println!();
    print_rate_table(scenarios);
}

/// The second table: the fixed-rate rounds, each scenario at its offered rate.
fn print_rate_table(scenarios: &[WrkScenario]) {
    let with_rate: Vec<&WrkScenario> = scenarios.iter().filter(|s| s.rate.is_some()).collect();
    if with_rate.is_empty() {
        return;
    }
    println!(
        "At a fixed offered rate (open loop, load/rate.rs; one request in flight per \
         connection): medians over rounds; (ratio to nginx), lower is better; latency from each \
         request's scheduled send time to the answer's last byte (corrected for coordinated \
         omission); client lag = how late the generator itself sent (p99)"
    );
    let mut rows = Vec::new();
    for s in &with_rate {
        let Some(info) = &s.rate else { continue };
        let base = s.nginx_at_rate();
        for p in &s.proxies {
            let Some(f) = p.rate_figures() else { continue };
            let b = |g: fn(&RateFigures) -> f64| base.as_ref().map(g);
            rows.push(vec![
                format!("{} at {} req/s", s.title, info.offered),
                p.kind.name().to_string(),
                format!("{:.0}", f.achieved),
                cell(f.p50, b(|n| n.p50), 3),
                cell(f.p99, b(|n| n.p99), 3),
                cell(f.p999, b(|n| n.p999), 3),
                cell(f.cpu, b(|n| n.cpu), 1),
                format!("{:.1} / {:.1}", f.user, f.kernel),
                format!("{:.3}", f.lag_p99),
                f.errors.to_string(),
            ]);
        }
    }
    print_table(
        &[
            "scenario",
            "proxy",
            "achieved req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "CPU µs/req",
            "user / kernel",
            "client lag ms",
            "errors",
        ],
        &rows,
    );
    for s in &with_rate {
        if let Some(info) = &s.rate {
            println!(
                "  {}: {} req/s offered ({}), {} connections",
                s.key, info.offered, info.how, info.connections
            );
        }
    }
    println!();
}

fn command_line(cmd: &Path, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn meta(opts: &Opts, env: &Env, total_secs: f64) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "time_utc": utc_stamp(SystemTime::now(), true),
        "quick": opts.quick,
        "rounds": opts.rounds,
        "secs_per_run": opts.secs,
        "warmup_secs": opts.warmup,
        "wrk": format!("wrk -t1 -c{CONNECTIONS} -d{}s --latency --timeout 5s", opts.secs),
        "fixed_rate": {
            "rate": opts.rate.map_or_else(
                || json!(format!("{:.0} % of the slowest proxy's closed-loop req/s per scenario, whole hundreds", RATE_SHARE * 100.0)),
                |r| json!(r),
            ),
            "scenarios": "small, 16k, close, realistic, threads (plain HTTP GET)",
            "generator": "benches/load/rate.rs: one thread (tokio current-thread), CONNECTIONS x workers keep-alive HTTP/1.1 connections opened before each round, one request in flight each, connection c sends slots c, c+n, ... of a uniform schedule (timerfd), latency from the scheduled send time to the answer's last byte",
            "drain_secs": rate::DRAIN.as_secs(),
        },
        "switch_secs": opts.switch_secs,
        "switch_clients": SWITCH_CLIENTS,
        "switch_every_ms": SWITCH_EVERY.as_millis() as u64,
        "idle_conns": opts.idle_conns,
        "cluster": {
            "variants": cluster::VARIANTS.iter().map(|v| json!({
                "name": v.name,
                "cluster": v.cluster,
                "instance": cluster::instance_of(v),
                "limit_scope": v.limit_scope,
            })).collect::<Vec<_>>(),
            "on_off_config": format!("the realistic scenario's switchyard config (metrics listener on); with [cluster]: redis = \"redis://127.0.0.1:PORT/0\", name = \"{}\", defaults otherwise", cluster::ON_OFF_NAME),
            "redis": "redis-server started by the harness on a free loopback port, own temp dir, --save \"\" --appendonly no; shared by both parts (different [cluster] names); its CPU is measured per round, not included in switchyard's",
            "propagation_config": format!("{} instances, the switch scenario's config (service app, blue/green upstreams answering their color) + [cluster] name = \"{}\", instance bench-1..{}, own state_dir and admin API each", cluster::INSTANCES, cluster::SWITCH_NAME, cluster::INSTANCES),
            "switches": opts.cluster_switches,
            "switch_every_ms": CLUSTER_SWITCH_EVERY.as_millis() as u64,
            "clients_per_instance": CLUSTER_CLIENTS,
            "client_pace_ms": CLUSTER_PACE.as_secs_f64() * 1e3,
            "stale_bound_ms": CLUSTER_BOUND.as_millis() as u64,
        },
        "total_secs": total_secs,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "clock_ticks_per_sec": env.clk_tck,
        "git_rev": git(&["rev-parse", "HEAD"]),
        "git_dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        "switchyard": env.tools.switchyard,
        "nginx": command_line(&env.tools.nginx, &["-v"]),
        "haproxy": env.tools.haproxy.as_ref().map(|h| command_line(h, &["-v"])),
        "pingora": env.tools.pingora,
        "wrk_version": command_line(&env.wrk, &["-v"]),
        "redis_version": find_tool("redis-server").map(|r| command_line(&r, &["--version"])),
        "h2load_version": env.h2load.as_ref().map(|h| command_line(h, &["--version"])),
        "tls": {
            "certificate": format!("ECDSA P-256, self-signed for {} and 127.0.0.1, one per run, served by every proxy; clients send SNI {}", tls::TLS_HOST, tls::TLS_HOST),
            "server_offer": "TLS 1.2 + 1.3, ALPN h2 + http/1.1",
            "client": format!("TLS 1.3 only with {} (wrk: OPENSSL_CONF; h2load: --tls13-ciphers, protocol checked per run)", tls::CIPHER),
            "h2_keepalive": format!("h2load -t1 -c{CONNECTIONS} -m1 -D<secs>"),
            "h2_new_connections_per_sec": opts.tls_rate,
        },
        "proxy_settings": {
            "switchyard": "threads = 1; health checks only in `realistic`; metrics listener only in `realistic` (as conf/switchyard.toml), where `switchyard, no metrics` is the same without it",
            "nginx": "worker_processes 1; proxy_http_version 1.1; upstream keepalive 128; access_log off",
            "haproxy": "nbthread 1; http-reuse always",
            "threads_scenario": format!("the small scenario with {THREADS_WORKERS} workers per proxy: switchyard threads = {THREADS_WORKERS} with work_stealing = false and = true (two rows); nginx worker_processes {THREADS_WORKERS}; haproxy nbthread {THREADS_WORKERS}; bare Pingora {THREADS_WORKERS} threads (BARE_PINGORA_THREADS), work stealing on (its default); wrk -t{THREADS_WORKERS} -c{}; the upstream nginx keeps 1 worker", CONNECTIONS * THREADS_WORKERS),
            "pingora": "examples/bare_pingora.rs: Pingora 0.9 defaults (work stealing, upstream keep-alive pool 128, system allocator, rustls TlsSettings::intermediate + enable_h2), threads = 1; simple and HTTPS scenarios only",
            "nginx_tls": "listen ssl http2; ssl_protocols TLSv1.2 TLSv1.3; session tickets on (default); keepalive_requests 1000000 (also bounds HTTP/2 requests per connection)",
            "haproxy_tls": "bind ssl crt alpn h2,http/1.1 ssl-min-ver TLSv1.2",
            "switchyard_tls": "[listen] https + one [[tls.certificates]] (static), redirect_http = false",
            "limits": "POST /v1/chat/completions, Authorization: Bearer <one key>; switchyard: the /v1/ route with [rate_limits] 1000000/s burst 1000 (client_ip), [concurrency] max_in_flight 64, per_key 64, queue 16 (client_ip), [token_budgets] 10^9 tokens/min (header:Authorization, max_tokens 2048, default_max_tokens 512), sized to refuse nothing; `switchyard, no limits`: the same route without them; nginx: plain proxy_pass (no token budget); upstream: nginx `return` of a fixed completion with usage (stream: 16 content chunks + finish + usage chunk + [DONE], chunked)",
        },
    })
}

/// `2024-05-01T12:34:56Z` (or `20240501T123456Z` for file names).
fn utc_stamp(t: SystemTime, pretty: bool) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    if pretty {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
    }
}

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results")
}

fn write_results(doc: &Value) -> Result<(PathBuf, PathBuf), String> {
    let dir = results_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    let stamped = dir.join(format!("load-{}.json", utc_stamp(SystemTime::now(), false)));
    let latest = dir.join("latest.json");
    fs::write(&stamped, &text).map_err(|e| format!("{}: {e}", stamped.display()))?;
    fs::write(&latest, &text).map_err(|e| format!("{}: {e}", latest.display()))?;
    Ok((latest, stamped))
}
