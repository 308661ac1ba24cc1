//! `--perf`: where each proxy's CPU goes. After the measured rounds of a wrk
//! scenario, one more (unmeasured) round runs under `perf record` with DWARF
//! call graphs; the samples are sorted into components (kernel, Pingora, the
//! http/bytes crates, tokio, allocator, switchyard, ...) by symbol name, and
//! a flame graph is drawn when `inferno-collapse-perf` and
//! `inferno-flamegraph` (`cargo install inferno`) are on the PATH.
//!
//! Attribution is by the sampled function's own name, so work inlined into a
//! caller counts for the caller's crate; generic code instantiated for
//! Pingora (`core::`, `alloc::`, futures) is its own row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::procs;

/// Sampling frequency (Hz). Low, because every sample copies 16 KiB of stack.
const FREQUENCY: u32 = 499;

/// The component rows, in table order.
pub const COMPONENTS: &[&str] = &[
    "kernel",
    "pingora",
    "http/httparse/bytes",
    "tokio",
    "allocator",
    "memcpy",
    "generic (core/alloc/futures)",
    "switchyard",
    "nginx/haproxy",
    "libc/other",
];

/// A running `perf record` of some processes.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts sampling `pids` for `secs` seconds into `data`.
pub fn record(perf: &Path, pids: &[u32], secs: u32, data: &Path) -> Result<Recording, String> {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut cmd = Command::new(perf);
    cmd.args(["record", "-q", "--call-graph", "dwarf,16384"])
        .arg(format!("-F{FREQUENCY}"))
        .arg("-p")
        .arg(list.join(","))
        .arg("-o")
        .arg(data)
        .arg("--")
        .args(["sleep", &secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    procs::set_death_signal(&mut cmd, libc::SIGINT);
    let child = cmd.spawn().map_err(|e| format!("starting perf: {e}"))?;
    Ok(Recording {
        child,
        data: data.to_path_buf(),
    })
}

impl Recording {
    /// Waits for the recording to end; returns the data file.
    pub fn finish(self) -> Result<PathBuf, String> {
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| format!("waiting for perf: {e}"))?;
        if !out.status.success() || !self.data.exists() {
            return Err(format!(
                "perf record failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(self.data)
    }
}

/// Share of samples (percent) per component of [`COMPONENTS`].
pub fn breakdown(perf: &Path, data: &Path) -> Result<BTreeMap<&'static str, f64>, String> {
    let out = Command::new(perf)
        .args(["report", "--no-children", "-g", "none", "--stdio"])
        .args(["--sort", "dso,sym", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("perf report: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut shares: BTreeMap<&'static str, f64> = BTreeMap::new();
    for line in text.lines() {
        // "    12.34%  switchyard  [.] pingora_core::...::read_request"
        let mut words = line.split_whitespace();
        let Some(pct) = words.next().and_then(|w| w.strip_suffix('%')) else {
            continue;
        };
        let Ok(pct) = pct.parse::<f64>() else {
            continue;
        };
        let dso = words.next().unwrap_or("");
        let kind = words.next().unwrap_or("");
        let symbol = words.collect::<Vec<_>>().join(" ");
        *shares.entry(component(dso, kind, &symbol)).or_default() += pct;
    }
    if shares.is_empty() {
        return Err(format!("perf report of {} had no samples", data.display()));
    }
    Ok(shares)
}

fn component(dso: &str, kind: &str, symbol: &str) -> &'static str {
    let has = |s: &str| symbol.contains(s);
    if kind == "[k]" {
        "kernel"
    } else if has("switchyard") {
        "switchyard"
    } else if has("pingora") {
        "pingora"
    } else if has("tokio") || has("mio::") {
        "tokio"
    } else if has("http::") || has("httparse") || has("bytes::") {
        "http/httparse/bytes"
    } else if symbol.starts_with("mi_")
        || symbol.starts_with("_mi_")
        || has("malloc")
        || has("_int_free")
        || has("libc_free")
        || has("cfree")
        || symbol == "free"
    {
        "allocator"
    } else if has("memmove") || has("memcpy") || has("memset") {
        "memcpy"
    } else if dso.starts_with("nginx") || dso.starts_with("haproxy") {
        "nginx/haproxy"
    } else if has("core::") || has("alloc::") || has("futures") || has("{{closure}}") {
        "generic (core/alloc/futures)"
    } else {
        "libc/other"
    }
}

/// Draws `data` as a flame graph into `svg`; `Ok(false)` when inferno is
/// not installed.
pub fn flamegraph(perf: &Path, data: &Path, title: &str, svg: &Path) -> Result<bool, String> {
    let (Some(collapse), Some(draw)) =
        (which("inferno-collapse-perf"), which("inferno-flamegraph"))
    else {
        return Ok(false);
    };
    let script = Command::new(perf)
        .args(["script", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("perf script: {e}"))?;
    let folded = pipe(&collapse, &[], &script.stdout)?;
    let drawn = pipe(&draw, &["--title", title, "--width", "1600"], &folded)?;
    std::fs::write(svg, drawn).map_err(|e| format!("{}: {e}", svg.display()))?;
    Ok(true)
}

fn pipe(cmd: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", cmd.display()))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", cmd.display()))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!("{} failed: {}", cmd.display(), out.status));
    }
    Ok(out.stdout)
}

/// A program on the PATH (or in ~/.cargo/bin, where `cargo install` puts it).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
