//! The `cluster` scenario (issue 13): what `[cluster]` costs one switchyard
//! serving the realistic route table, and how fast a switch made through
//! one instance's admin API reaches every instance of a cluster.
//!
//! (m) `[cluster]` off vs on: the realistic scenario's switchyard config
//!     (`load/confs.rs`) once per [`VARIANTS`] entry, loaded by the same wrk
//!     as every wrk scenario, in interleaved rounds (`load.rs`). The
//!     variants with `[cluster]` share one `redis-server` that the harness
//!     starts on a free loopback port with a directory of its own, without
//!     persistence (`--save "" --appendonly no`), and kills at the end. Its
//!     CPU is measured per round as well: with `[cluster]` alone Redis only
//!     answers heartbeats and version checks, but a limit with
//!     `scope = "cluster"` makes it work for every request it counts.
//! (n) switch propagation: [`INSTANCES`] switchyard instances with the
//!     switch scenario's config (service `app`: blue on the upstream's port
//!     answering `blue`, green on the one answering `green`), each with its
//!     own `state_dir` and admin API, in one cluster ([`SWITCH_NAME`]) on
//!     that Redis. A light, paced keep-alive GET load runs on every
//!     instance while switches alternate between green and blue, issued
//!     round-robin through the instances' admin APIs. For each (switch,
//!     instance): the time from issuing the admin request to the arrival of
//!     the instance's first answer from the new color (to a request started
//!     after the switch was issued). The measurement's resolution is the
//!     gap between two requests to one instance ([`Plan::resolution`]) plus
//!     one loopback round trip.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::procs::{self, Proc};
use crate::switch::{color_name, BLUE, GREEN};

/// One switchyard of the on-vs-off comparison (m).
#[derive(Debug, PartialEq, Eq)]
pub struct Variant {
    /// Its name in the table, the results and its directory.
    pub name: &'static str,
    /// With a `[cluster]` section: name [`ON_OFF_NAME`], instance
    /// `bench-N` (N counts the cluster variants, from 1), on the scenario's
    /// Redis.
    pub cluster: bool,
    /// `Some(scope)`: the realistic config's rate limit (`writes`) counts
    /// every request, with this `scope`; `None`: it counts writes only, as
    /// shipped (the load sends none).
    pub limit_scope: Option<&'static str>,
}

impl Variant {
    pub const fn new(name: &'static str, cluster: bool, limit_scope: Option<&'static str>) -> Self {
        Variant {
            name,
            cluster,
            limit_scope,
        }
    }
}

/// The variants of (m), in table order; the first is the baseline the
/// notes compare the others with. A variant with a limit scope counts
/// every request of the load against the realistic config's limit
/// (`writes`, at a rate no load reaches, so nothing is refused): local,
/// then through Redis, so the difference is what a cluster check costs.
/// Names must differ: they name the directories and the instances.
pub static VARIANTS: &[Variant] = &[
    Variant::new("switchyard, cluster off", false, None),
    Variant::new("switchyard, cluster on", true, None),
    Variant::new(
        "switchyard, cluster on, every request limited locally",
        true,
        Some("local"),
    ),
    Variant::new(
        "switchyard, cluster on, every request limited in Redis",
        true,
        Some("cluster"),
    ),
];

/// `[cluster] name` of the variants of (m).
pub const ON_OFF_NAME: &str = "bench";
/// `[cluster] name` of the instances of (n): another key prefix on the
/// same Redis, so the two parts never see each other's state.
pub const SWITCH_NAME: &str = "bench-switch";
/// Instances in (n).
pub const INSTANCES: usize = 3;
/// (n): how long the instances may take to see each other live in
/// `GET /status` after they serve (20 s): the first heartbeat is at start.
const LIVE_DEADLINE: Duration = Duration::from_secs(20);
/// How long `redis-server` may take to answer PING after it starts (10 s).
const REDIS_DEADLINE: Duration = Duration::from_secs(10);

/// `instance` of a cluster variant (`bench-1`, `bench-2`, ... in
/// [`VARIANTS`] order); `None` for a variant without `[cluster]`.
pub fn instance_of(v: &Variant) -> Option<String> {
    if !v.cluster {
        return None;
    }
    // By value, not by address: names differ.
    let n = VARIANTS.iter().filter(|w| w.cluster).position(|w| w == v)?;
    Some(format!("bench-{}", n + 1))
}

/// The `[cluster]` section of an instance on the Redis at `redis_port`.
pub fn section(redis_port: u16, name: &str, instance: &str) -> String {
    format!(
        "[cluster]\nredis = \"redis://127.0.0.1:{redis_port}/0\"\nname = \"{name}\"\n\
         instance = \"{instance}\"\n"
    )
}

/// The scenario's `redis-server`; dropping it kills it.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

/// Starts `redis-server` on a free loopback port, its files in `dir`, no
/// persistence; returns once it answers PING.
pub fn start_redis(redis_server: &Path, dir: &Path) -> Result<Redis, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let port = procs::free_ports(1)[0];
    let mut cmd = Command::new(redis_server);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--loglevel", "warning"]);
    let mut proc = Proc::spawn("redis-server", cmd, &dir.join("redis.log"), false)?;
    let end = Instant::now() + REDIS_DEADLINE;
    while Instant::now() < end {
        if let Some(how) = proc.exited() {
            return Err(format!(
                "redis-server exited ({how}) at start; its log:\n{}",
                proc.log_tail(20)
            ));
        }
        if ping(port) {
            return Ok(Redis { proc, port });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "redis-server on 127.0.0.1:{port} did not answer PING within {REDIS_DEADLINE:?}; its log:\n{}",
        proc.log_tail(20)
    ))
}

/// Whether the Redis on `port` answers PING (RESP, one round trip).
fn ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&procs::local(port), Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// `GET path` on the admin API at `admin_port`, as JSON.
pub fn admin_get(admin_port: u16, token: &str, path: &str) -> Result<Value, String> {
    let url = format!("http://127.0.0.1:{admin_port}{path}");
    let mut resp = agent()
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if resp.status().as_u16() != 200 {
        return Err(format!("GET {path}: {}: {text}", resp.status()));
    }
    serde_json::from_str(&text).map_err(|e| format!("GET {path}: {e}: {text}"))
}

/// `GET /status`'s `cluster` of an instance that must be `instance`,
/// reach its Redis and serve a cluster state version; returns that
/// version.
pub fn check_member(admin_port: u16, token: &str, instance: &str) -> Result<u64, String> {
    let status = admin_get(admin_port, token, "/status")?;
    let c = &status["cluster"];
    let version = c["version"].as_u64();
    match version {
        Some(v) if c["reachable"] == true && c["instance"] == instance => Ok(v),
        _ => Err(format!(
            "{instance} is not serving a cluster state: GET /status cluster = {c}"
        )),
    }
}

// ---------------------------------------------------------------------------
// (n) switch propagation
// ---------------------------------------------------------------------------

/// Non-200, unexpected body or transport error.
const FAILED: u8 = 2;

/// How (n) runs.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Switches issued, alternating green and blue (blue is active first).
    pub switches: usize,
    /// Time between two switches.
    pub every: Duration,
    /// Keep-alive clients per instance.
    pub clients: usize,
    /// Each client starts a request every `pace` (skipping a tick it
    /// missed, never bursting to catch up).
    pub pace: Duration,
    /// An answer from the old color to a request started later than this
    /// after the switch's admin answer is stale (the bound, 100 ms).
    pub bound: Duration,
}

impl Plan {
    /// The gap between two requests to one instance: the clients of an
    /// instance start out of step, spread over one `pace`.
    pub fn resolution(&self) -> Duration {
        self.pace / self.clients.max(1) as u32
    }

    /// Requests per second on each instance.
    pub fn rate_per_instance(&self) -> f64 {
        self.clients as f64 / self.pace.as_secs_f64()
    }
}

/// One instance of (n).
pub struct Node {
    /// Its HTTP listener's port.
    pub port: u16,
    /// Its admin API's port.
    pub admin_port: u16,
    /// Its `[cluster] instance`.
    pub instance: String,
}

#[derive(Clone, Copy)]
struct Answer {
    node: usize,
    /// ns since the run's epoch.
    start_ns: u64,
    end_ns: u64,
    color: u8,
}

#[derive(Clone, Copy)]
struct Call {
    /// The node whose admin API took the switch.
    via: usize,
    issued_ns: u64,
    answered_ns: u64,
    from: u8,
    to: u8,
    ok: bool,
}

/// What (n) measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub instances: usize,
    pub switches: usize,
    pub switch_errors: usize,
    pub every_ms: f64,
    pub clients_per_instance: usize,
    pub rate_per_instance: f64,
    pub resolution_ms: f64,
    pub bound_ms: f64,
    pub secs: f64,
    /// Admin request to admin answer, ms, sorted.
    pub call_ms: Vec<f64>,
    /// Per (switch, instance): admin request issued to the instance's first
    /// answer from the new color, ms, sorted.
    pub each_ms: Vec<f64>,
    /// Per switch: to the last instance's first answer from the new color,
    /// ms, sorted (switches every instance answered from the new color).
    pub all_ms: Vec<f64>,
    /// Per (switch, instance other than the one that took it): from the
    /// switch's admin answer to that instance's first answer from the new
    /// color, ms, sorted; negative when it came before the admin answer.
    /// What the cluster's own propagation (pub/sub) adds after the switch
    /// is committed.
    pub others_after_answer_ms: Vec<f64>,
    /// (switch, instance) pairs with no answer from the new color before
    /// the next switch.
    pub unreached: u64,
    pub requests: u64,
    pub requests_per_instance: Vec<u64>,
    pub failed: u64,
    /// Answers from the old color to requests started more than `bound`
    /// after the switch's admin answer (and before the next switch).
    pub stale: u64,
    /// Each instance's state version (`GET /status`) at the end.
    pub versions: Vec<Option<u64>>,
    /// Distinct failures (requests and switch calls) with their counts.
    pub failures: BTreeMap<String, u64>,
}

impl Report {
    /// The promise of issue 13: no failed request, no switch refused, no
    /// stale answer, every instance reached by every switch, and every
    /// instance on one version at the end.
    pub fn clean(&self) -> bool {
        self.failed == 0
            && self.stale == 0
            && self.switch_errors == 0
            && self.unreached == 0
            && self
                .versions
                .first()
                .is_some_and(|v| v.is_some() && self.versions.iter().all(|w| w == v))
    }

    pub fn json(&self) -> Value {
        let stat = |v: &[f64]| {
            json!({
                "n": v.len(),
                "p50_ms": crate::percentile(v, 50.0),
                "max_ms": v.last().copied().unwrap_or(0.0),
            })
        };
        json!({
            "instances": self.instances,
            "switches": self.switches,
            "switch_errors": self.switch_errors,
            "switch_every_ms": self.every_ms,
            "clients_per_instance": self.clients_per_instance,
            "requests_per_sec_per_instance": self.rate_per_instance,
            "resolution_ms": self.resolution_ms,
            "stale_bound_ms": self.bound_ms,
            "secs": self.secs,
            "switch_call": stat(&self.call_ms),
            "to_each_instance": stat(&self.each_ms),
            "to_all_instances": stat(&self.all_ms),
            "others_after_admin_answer": stat(&self.others_after_answer_ms),
            "others_after_admin_answer_ms": self.others_after_answer_ms,
            "to_each_instance_ms": self.each_ms,
            "to_all_instances_ms": self.all_ms,
            "unreached": self.unreached,
            "requests": self.requests,
            "requests_per_instance": self.requests_per_instance,
            "failed": self.failed,
            "stale": self.stale,
            "versions_at_end": self.versions,
            "failures": self.failures,
            "clean": self.clean(),
        })
    }
}

/// Waits until every node's `GET /status` lists all the nodes as live.
pub fn wait_live(nodes: &[Node], token: &str) -> Result<(), String> {
    let end = Instant::now() + LIVE_DEADLINE;
    let mut last = Vec::new();
    while Instant::now() < end {
        last = nodes
            .iter()
            .map(|n| admin_get(n.admin_port, token, "/status").map(|s| s["cluster"].clone()))
            .collect::<Vec<_>>();
        let all = last.iter().all(|c| {
            c.as_ref().is_ok_and(|c| {
                c["instances"].as_array().map(Vec::len) == Some(nodes.len())
                    && c["reachable"] == true
            })
        });
        if all {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the {} instances did not all see each other live within {LIVE_DEADLINE:?}: {last:?}",
        nodes.len()
    ))
}

/// Runs (n) on `nodes` (serving blue, all live): the load, the switches,
/// and the analysis.
pub fn run(plan: &Plan, nodes: &[Node], token: &str) -> Report {
    let epoch = Instant::now();
    let ns = |t: Instant| t.duration_since(epoch).as_nanos() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let planned = plan.every * plan.switches as u32 + Duration::from_secs(1);
    // A hard bound on the clients, should the stop flag never come.
    let deadline = epoch + planned + Duration::from_secs(30);
    let mut workers = Vec::new();
    for (node, n) in nodes.iter().enumerate() {
        for c in 0..plan.clients {
            let stop = stop.clone();
            let url = format!("http://127.0.0.1:{}/", n.port);
            let offset = plan.resolution() * c as u32;
            let pace = plan.pace;
            workers.push(std::thread::spawn(move || {
                client(node, &url, epoch, offset, pace, deadline, &stop)
            }));
        }
    }

    // Traffic first, then the switches.
    std::thread::sleep(Duration::from_millis(300));
    let agent = agent();
    let auth = format!("Bearer {token}");
    let start = Instant::now();
    let mut calls: Vec<Call> = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut active = BLUE;
    for k in 0..plan.switches {
        let at = start + plan.every * k as u32;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let via = &nodes[k % nodes.len()];
        let to = if active == BLUE { GREEN } else { BLUE };
        let url = format!("http://127.0.0.1:{}/services/app/switch", via.admin_port);
        let body =
            json!({"to": color_name(to), "reason": "bench: cluster propagation"}).to_string();
        let issued = Instant::now();
        let result = agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.as_str())
            .map_err(|e| e.to_string())
            .and_then(|mut resp| {
                let status = resp.status().as_u16();
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                match status {
                    200 => Ok(()),
                    _ => Err(format!("{status}: {text}")),
                }
            });
        let answered = Instant::now();
        calls.push(Call {
            via: k % nodes.len(),
            issued_ns: ns(issued),
            answered_ns: ns(answered),
            from: active,
            to,
            ok: result.is_ok(),
        });
        match result {
            Ok(()) => active = to,
            Err(e) => {
                let e = format!("switch through {}: {e}", via.instance);
                *failures.entry(e).or_default() += 1;
            }
        }
    }
    // The last switch gets as long as the others to reach every instance.
    std::thread::sleep(plan.every);
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for w in workers {
        match w.join() {
            Ok((mut a, f)) => {
                answers.append(&mut a);
                for (e, n) in f {
                    *failures.entry(e).or_default() += n;
                }
            }
            Err(_) => {
                *failures
                    .entry("a client thread panicked".into())
                    .or_default() += 1
            }
        }
    }
    let secs = epoch.elapsed().as_secs_f64();
    let versions = nodes
        .iter()
        .map(|n| {
            admin_get(n.admin_port, token, "/status")
                .ok()
                .and_then(|s| s["cluster"]["version"].as_u64())
        })
        .collect();
    let mut report = analyse(plan, nodes.len(), &calls, answers);
    report.secs = secs;
    report.versions = versions;
    for (e, n) in failures {
        *report.failures.entry(e).or_default() += n;
    }
    report
}

/// One paced keep-alive client of instance `node`.
fn client(
    node: usize,
    url: &str,
    epoch: Instant,
    offset: Duration,
    pace: Duration,
    deadline: Instant,
    stop: &AtomicBool,
) -> (Vec<Answer>, BTreeMap<String, u64>) {
    let agent = agent();
    let mut out = Vec::with_capacity(32_768);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut next = Instant::now() + offset;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        while next <= Instant::now() {
            next += pace;
        }
        let start_ns = epoch.elapsed().as_nanos() as u64;
        let mut fail = |what: String| {
            *failures.entry(what).or_default() += 1;
            FAILED
        };
        let color = match agent.get(url).call() {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                match resp.body_mut().read_to_string() {
                    Ok(body) if status == 200 && body.trim() == "blue" => BLUE,
                    Ok(body) if status == 200 && body.trim() == "green" => GREEN,
                    Ok(body) => fail(format!("status {status}: {:.60}", body.trim())),
                    Err(e) => fail(format!("status {status}, reading body: {e}")),
                }
            }
            Err(e) => fail(format!("transport: {e}")),
        };
        let end_ns = epoch.elapsed().as_nanos() as u64;
        out.push(Answer {
            node,
            start_ns,
            end_ns,
            color,
        });
    }
    (out, failures)
}

fn analyse(plan: &Plan, instances: usize, calls: &[Call], mut answers: Vec<Answer>) -> Report {
    answers.sort_by_key(|a| a.start_ns);
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut each_ms = Vec::new();
    let mut all_ms = Vec::new();
    let mut others_after_answer_ms = Vec::new();
    let mut unreached = 0u64;
    let mut stale = 0u64;
    for (i, call) in calls.iter().enumerate() {
        if !call.ok {
            continue;
        }
        let window_end = calls.get(i + 1).map_or(u64::MAX, |c| c.issued_ns);
        // Requests started after the switch was issued, before the next one.
        let lo = answers.partition_point(|a| a.start_ns < call.issued_ns);
        let hi = answers.partition_point(|a| a.start_ns < window_end);
        let window = &answers[lo..hi];
        let mut slowest: Option<u64> = Some(0);
        for node in 0..instances {
            let first = window
                .iter()
                .filter(|a| a.node == node && a.color == call.to)
                .map(|a| a.end_ns)
                .min();
            match first {
                Some(end) => {
                    let took = end.saturating_sub(call.issued_ns);
                    each_ms.push(ms(took));
                    if node != call.via {
                        others_after_answer_ms.push(ms(end) - ms(call.answered_ns));
                    }
                    slowest = slowest.map(|s| s.max(took));
                }
                None => {
                    unreached += 1;
                    slowest = None;
                }
            }
        }
        if let Some(s) = slowest {
            all_ms.push(ms(s));
        }
        let late_from = call.answered_ns + plan.bound.as_nanos() as u64;
        stale += window
            .iter()
            .filter(|a| a.start_ns >= late_from && a.color == call.from)
            .count() as u64;
    }
    let mut call_ms: Vec<f64> = calls
        .iter()
        .map(|c| ms(c.answered_ns - c.issued_ns))
        .collect();
    for v in [
        &mut call_ms,
        &mut each_ms,
        &mut all_ms,
        &mut others_after_answer_ms,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let requests_per_instance = (0..instances)
        .map(|n| answers.iter().filter(|a| a.node == n).count() as u64)
        .collect();
    Report {
        instances,
        switches: calls.len(),
        switch_errors: calls.iter().filter(|c| !c.ok).count(),
        every_ms: plan.every.as_secs_f64() * 1e3,
        clients_per_instance: plan.clients,
        rate_per_instance: plan.rate_per_instance(),
        resolution_ms: plan.resolution().as_secs_f64() * 1e3,
        bound_ms: plan.bound.as_secs_f64() * 1e3,
        call_ms,
        each_ms,
        all_ms,
        others_after_answer_ms,
        unreached,
        requests: answers.len() as u64,
        requests_per_instance,
        failed: answers.iter().filter(|a| a.color == FAILED).count() as u64,
        stale,
        ..Report::default()
    }
}

/// Prints (n)'s table; false when switchyard broke the promise.
pub fn print(r: &Report) -> bool {
    println!(
        "(n) cluster switch propagation: {} instances on one Redis, {} switches every {:.0} ms \
         (alternating green/blue, round-robin through the admin APIs), {} paced keep-alive \
         client(s) per instance ({:.0} req/s each instance; resolution {:.2} ms + one round trip)",
        r.instances,
        r.switches,
        r.every_ms,
        r.clients_per_instance,
        r.rate_per_instance,
        r.resolution_ms
    );
    let row = |what: &str, v: &[f64]| {
        vec![
            what.to_string(),
            v.len().to_string(),
            format!("{:.2}", crate::percentile(v, 50.0)),
            format!("{:.2}", v.last().copied().unwrap_or(0.0)),
        ]
    };
    crate::print_table(
        &["from issuing the admin request to", "n", "p50 ms", "max ms"],
        &[
            row("its answer (the switch call)", &r.call_ms),
            row("each instance's first new-color answer", &r.each_ms),
            row("the last instance's (per switch)", &r.all_ms),
        ],
    );
    println!(
        "  the other instances' first new-color answer after the switch's admin answer \
         (negative: before it), p50 {:.2} ms, max {:.2} ms",
        crate::percentile(&r.others_after_answer_ms, 50.0),
        r.others_after_answer_ms.last().copied().unwrap_or(0.0)
    );
    let clean = r.clean();
    println!(
        "  requests {} (per instance {:?}), failed {}, old color > {:.0} ms after the admin \
         answer {}, switches ok {}/{}, (switch, instance) pairs never reached {}, versions at \
         the end {:?}: clean {}",
        r.requests,
        r.requests_per_instance,
        r.failed,
        r.bound_ms,
        r.stale,
        r.switches - r.switch_errors,
        r.switches,
        r.unreached,
        r.versions,
        if clean { "yes" } else { "NO" }
    );
    let mut f: Vec<_> = r.failures.iter().collect();
    f.sort_by(|a, b| b.1.cmp(a.1));
    for (e, n) in f.into_iter().take(4) {
        println!("  failure ×{n}: {e}");
    }
    println!();
    clean
}
