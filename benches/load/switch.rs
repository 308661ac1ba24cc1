//! Switch under load: constant keep-alive traffic while the active color
//! flips every `interval`; every request is checked against the switch calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BLUE: u8 = 0;
pub const GREEN: u8 = 1;
/// Non-200, unexpected body or transport error.
const FAILED: u8 = 2;

pub fn color_name(c: u8) -> &'static str {
    if c == BLUE {
        "blue"
    } else {
        "green"
    }
}

#[derive(Clone, Copy)]
struct Outcome {
    /// Start of the request, ns since the test's epoch.
    start_ns: u64,
    color: u8,
}

#[derive(Clone, Copy)]
struct Call {
    issued_ns: u64,
    returned_ns: u64,
    from: u8,
    ok: bool,
}

#[derive(Debug, Clone)]
pub struct SwitchReport {
    pub proxy: String,
    pub method: String,
    pub secs: f64,
    pub requests: u64,
    pub failed: u64,
    /// Requests that started after switch k returned (and before switch
    /// k+1 was issued) and were answered by the color switch k left.
    pub stale: u64,
    pub answered_blue: u64,
    pub answered_green: u64,
    pub switches: u64,
    pub switch_errors: u64,
    pub call_ms_p50: f64,
    pub call_ms_max: f64,
    /// Distinct failures (requests and switch calls) with their counts.
    pub failures: BTreeMap<String, u64>,
}

impl SwitchReport {
    pub fn json(&self) -> Value {
        json!({
            "proxy": self.proxy,
            "method": self.method,
            "secs": self.secs,
            "requests": self.requests,
            "failed": self.failed,
            "answered_by_old_color_after_switch_returned": self.stale,
            "answered_blue": self.answered_blue,
            "answered_green": self.answered_green,
            "switches": self.switches,
            "switch_errors": self.switch_errors,
            "switch_call_ms_p50": self.call_ms_p50,
            "switch_call_ms_max": self.call_ms_max,
            "failures": self.failures,
        })
    }
}

pub struct Plan<'a> {
    pub proxy: &'a str,
    pub method: &'a str,
    pub url: &'a str,
    pub clients: usize,
    pub secs: u32,
    pub interval: Duration,
}

/// Runs `plan.clients` keep-alive clients against `plan.url` while calling
/// `switch(to)` every `plan.interval` for `plan.secs`, starting from blue.
pub fn run(plan: &Plan, mut switch: impl FnMut(u8) -> Result<(), String>) -> SwitchReport {
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..plan.clients)
        .map(|_| {
            let stop = stop.clone();
            let url = plan.url.to_string();
            std::thread::spawn(move || client(&url, epoch, &stop))
        })
        .collect();

    // Traffic first, then the switches.
    std::thread::sleep(Duration::from_millis(300));
    let ns = |t: Instant| t.duration_since(epoch).as_nanos() as u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(u64::from(plan.secs));
    let mut calls = Vec::new();
    let mut active = BLUE;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut k: u32 = 0;
    loop {
        let at = start + plan.interval * k;
        if at >= end {
            break;
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let to = 1 - active;
        let issued = Instant::now();
        let result = switch(to);
        let returned = Instant::now();
        calls.push(Call {
            issued_ns: ns(issued),
            returned_ns: ns(returned),
            from: active,
            ok: result.is_ok(),
        });
        match result {
            Ok(()) => active = to,
            Err(e) => *failures.entry(format!("switch call: {e}")).or_default() += 1,
        }
        k += 1;
    }
    // A little more traffic after the last switch.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for w in workers {
        let (mut o, f) = w.join().expect("client thread");
        outcomes.append(&mut o);
        for (e, n) in f {
            *failures.entry(e).or_default() += n;
        }
    }
    outcomes.sort_by_key(|o| o.start_ns);

    let mut stale = 0u64;
    for (i, call) in calls.iter().enumerate() {
        if !call.ok {
            continue;
        }
        let window_end = calls.get(i + 1).map_or(u64::MAX, |c| c.issued_ns);
        let lo = outcomes.partition_point(|o| o.start_ns < call.returned_ns);
        let hi = outcomes.partition_point(|o| o.start_ns < window_end);
        if lo < hi {
            stale += outcomes[lo..hi]
                .iter()
                .filter(|o| o.color == call.from)
                .count() as u64;
        }
    }
    let mut call_ms: Vec<f64> = calls
        .iter()
        .map(|c| (c.returned_ns - c.issued_ns) as f64 / 1e6)
        .collect();
    call_ms.sort_by(f64::total_cmp);
    let count = |c: u8| outcomes.iter().filter(|o| o.color == c).count() as u64;
    SwitchReport {
        proxy: plan.proxy.to_string(),
        method: plan.method.to_string(),
        secs: epoch.elapsed().as_secs_f64(),
        requests: outcomes.len() as u64,
        failed: count(FAILED),
        stale,
        answered_blue: count(BLUE),
        answered_green: count(GREEN),
        switches: calls.len() as u64,
        switch_errors: calls.iter().filter(|c| !c.ok).count() as u64,
        call_ms_p50: call_ms.get(call_ms.len() / 2).copied().unwrap_or(0.0),
        call_ms_max: call_ms.last().copied().unwrap_or(0.0),
        failures,
    }
}

fn client(url: &str, epoch: Instant, stop: &AtomicBool) -> (Vec<Outcome>, BTreeMap<String, u64>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut out = Vec::with_capacity(100_000);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut fail = |what: String| {
        *failures.entry(what).or_default() += 1;
        FAILED
    };
    while !stop.load(Ordering::Relaxed) {
        let start_ns = epoch.elapsed().as_nanos() as u64;
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
        out.push(Outcome { start_ns, color });
    }
    (out, failures)
}
