//! Runs wrk (one thread, as the machine has two cores; two in the `threads`
//! scenario) and reads the JSON its Lua `done()` hook prints.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procs;

/// wrk's `done()` hook: one line, `WRKJSON {...}`; latencies in µs.
pub const LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f,"max_us":%.0f,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#;

/// Requests per second over `secs` (0 for an empty run).
pub fn rate(requests: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        requests as f64 / secs
    } else {
        0.0
    }
}

/// One wrk run as reported by the hook.
#[derive(Debug, Clone)]
pub struct WrkOut {
    pub requests: u64,
    pub secs: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    /// Answers outside 2xx/3xx.
    pub non2xx: u64,
    pub raw: Value,
}

pub struct Load<'a> {
    pub url: &'a str,
    pub secs: u32,
    /// wrk's threads (`-t`): 1, or the proxies' worker threads in `threads`.
    pub threads: u32,
    pub connections: u32,
    pub headers: &'a [String],
    /// `OPENSSL_CONF` for wrk's TLS (see `tls::Files::openssl_conf`).
    pub openssl_conf: Option<&'a Path>,
}

pub fn run(wrk: &Path, script: &Path, load: &Load) -> Result<WrkOut, String> {
    let mut cmd = Command::new(wrk);
    cmd.arg(format!("-t{}", load.threads.max(1)))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.secs))
        .arg("--latency")
        .args(["--timeout", "5s"])
        .arg("-s")
        .arg(script);
    for h in load.headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(conf) = load.openssl_conf {
        cmd.env("OPENSSL_CONF", conf);
    }
    cmd.arg(load.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    procs::set_death_signal(&mut cmd, libc::SIGKILL);
    let mut child = cmd.spawn().map_err(|e| format!("starting wrk: {e}"))?;
    // wrk stops itself after -d; this only guards against a hang.
    let deadline = Instant::now() + Duration::from_secs(u64::from(load.secs) + 30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("wrk against {} did not finish in time", load.url));
            }
            Err(e) => return Err(format!("waiting for wrk: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading wrk output: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| {
            format!(
                "wrk against {} printed no result ({}):\n{}\n{}",
                load.url,
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let raw: Value = serde_json::from_str(line).map_err(|e| format!("wrk JSON {line}: {e}"))?;
    let num = |k: &str| raw.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let secs = num("duration_us") / 1e6;
    let requests = num("requests") as u64;
    Ok(WrkOut {
        requests,
        secs,
        rps: rate(requests, secs),
        p50_ms: num("p50_us") / 1e3,
        p99_ms: num("p99_us") / 1e3,
        p999_ms: num("p999_us") / 1e3,
        max_ms: num("max_us") / 1e3,
        socket_errors: (num("connect") + num("read") + num("write") + num("timeout")) as u64,
        non2xx: num("status") as u64,
        raw,
    })
}
