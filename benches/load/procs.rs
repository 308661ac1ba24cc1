//! Child processes (started, measured and always stopped), `/proc` readings,
//! free ports and a tiny blocking HTTP client for readiness and sanity checks.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process under test. Dropping it stops it (and, for nginx, its workers),
/// also while unwinding from a panic. If the harness itself dies, the kernel
/// sends the child a signal (`PR_SET_PDEATHSIG`), so nothing is left behind.
pub struct Proc {
    pub name: String,
    child: Child,
    pid: u32,
    /// nginx: a master whose worker processes count too.
    tree: bool,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`. Must be called
    /// from the main thread: the death signal fires when the spawning thread ends.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, tree: bool) -> Result<Proc, String> {
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // nginx's master turns SIGTERM into a fast shutdown of its workers.
        set_death_signal(&mut cmd, if tree { libc::SIGTERM } else { libc::SIGKILL });
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            pid: child.id(),
            child,
            tree,
            log: log.to_path_buf(),
        })
    }

    /// The process and, for nginx, its current workers.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        if self.tree {
            pids.extend(children_of(self.pid));
        }
        pids
    }

    /// (utime, stime) in clock ticks, summed over [`Proc::pids`].
    pub fn cpu_split(&self) -> (u64, u64) {
        self.pids()
            .into_iter()
            .filter_map(cpu_ticks)
            .fold((0, 0), |(u, s), (du, ds)| (u + du, s + ds))
    }

    /// Peak resident set (VmHWM) in KiB, summed over [`Proc::pids`].
    pub fn hwm_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|p| status_kib(p, "VmHWM:"))
            .sum()
    }

    /// Current resident set (VmRSS) in KiB, summed over [`Proc::pids`].
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|p| status_kib(p, "VmRSS:"))
            .sum()
    }

    /// `Some(reason)` once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last `lines` lines of the process's output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.tree {
            let workers = children_of(self.pid);
            // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for w in workers {
                let comm = fs::read_to_string(format!("/proc/{w}/comm")).unwrap_or_default();
                if comm.trim() == "nginx" {
                    // SAFETY: kill(2) on a worker of the nginx we started.
                    unsafe {
                        libc::kill(w as libc::pid_t, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Has the kernel send `sig` to the child when the spawning thread ends.
pub fn set_death_signal(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Fields of `/proc/PID/stat` after the command name: [0] state, [1] ppid,
/// [11] utime, [12] stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// (utime, stime) of one process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let f = stat_fields(pid)?;
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == parent)
        })
        .collect()
}

/// A `kB` line of `/proc/PID/status`, e.g. `VmHWM:`.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Raises the open-file limit (inherited by every child) to `want` if
/// possible, else as far as the hard limit allows. Returns the soft limit.
// rlim_t is u64 on 64-bit Linux only.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur >= want as libc::rlim_t {
            return r.rlim_cur as u64;
        }
        let both = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: (want as libc::rlim_t).max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur as u64
}

/// `n` distinct ports that were free a moment ago: every probe listener on
/// 127.0.0.1:0 is held until all ports are read.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `GET path` with `Connection: close` on a new connection; reads until the
/// server closes. Returns the status and the raw response.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> io::Result<(u16, Vec<u8>)> {
    http_request(addr, "GET", host, path)
}

/// [`http_get`] with another method (and an empty body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\nUser-Agent: switchyard-bench\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let status = parse_status(&buf)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    Ok((status, buf))
}

/// The status code of `HTTP/1.x NNN ...`.
pub fn parse_status(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body) from a
/// kept-alive connection; returns its status.
pub fn read_response(s: &mut TcpStream) -> io::Result<u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status = parse_status(&buf)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let done = |buf: &[u8]| -> bool {
        if let Some(len) = header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
            buf.len() >= head_end + len
        } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            buf[head_end..].ends_with(b"0\r\n\r\n")
        } else {
            true
        }
    };
    while !done(&buf) {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Waits until `GET path` (Host `host`) through `addr` answers `status`,
/// failing early with the process's log if it exits.
pub fn wait_ready(
    p: &mut Proc,
    addr: SocketAddr,
    host: &str,
    path: &str,
    status: u16,
) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut last = String::from("no answer");
    while Instant::now() < end {
        if let Some(how) = p.exited() {
            return Err(format!(
                "{} exited ({how}) before serving; its log:\n{}",
                p.name,
                p.log_tail(30)
            ));
        }
        match http_get(addr, host, path) {
            Ok((s, _)) if s == status => return Ok(()),
            Ok((s, _)) => last = format!("status {s}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} not ready on {addr} after 20 s ({last}); its log:\n{}",
        p.name,
        p.log_tail(30)
    ))
}
