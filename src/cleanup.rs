//! Files switchyard removes when it exits: the demo's temporary directory
//! (it holds the demo's admin token) and the daemon's pid file.
//!
//! The process ends in several ways: `main` returning after a fast shutdown
//! (SIGINT), the drain watcher's `std::process::exit` after SIGTERM or
//! SIGQUIT, Pingora's own `exit` on a start-up failure. All of them go
//! through libc's `exit`, so one `atexit` handler covers every one. SIGKILL
//! and a crash leave the files behind; nothing can help there.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

enum Leftover {
    /// Removed with everything in it.
    Dir(PathBuf),
    /// Removed only while it still holds this process's id: after a
    /// daemonizing fork the parent exits too, and after an upgrade (`-u`)
    /// the file belongs to the new process.
    PidFile(PathBuf),
}

static LEFTOVERS: Mutex<Vec<Leftover>> = Mutex::new(Vec::new());
static REGISTER: Once = Once::new();

/// Removes `dir` and its contents when the process exits.
pub fn remove_dir_on_exit(dir: PathBuf) {
    add(Leftover::Dir(dir));
}

/// Removes the pid file at `path` when the process exits, if it then holds
/// this process's id.
pub fn remove_pid_file_on_exit(path: PathBuf) {
    add(Leftover::PidFile(path));
}

/// Makes SIGHUP (the terminal closing under `switchyard demo`) stop the
/// process the way SIGTERM does, so the exit handler runs; by default SIGHUP
/// kills the process on the spot and leaves the files behind. Only for the
/// demo: a server's SIGHUP is left to its default, as nobody sends one to a
/// daemon by accident.
pub fn stop_on_hangup() {
    extern "C" fn on_hangup(_: libc::c_int) {
        // SAFETY: `kill` and `getpid` are async-signal-safe.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
    let handler: extern "C" fn(libc::c_int) = on_hangup;
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGHUP, handler as libc::sighandler_t);
    }
}

fn add(leftover: Leftover) {
    if let Ok(mut list) = LEFTOVERS.lock() {
        list.push(leftover);
    }
    REGISTER.call_once(|| {
        // SAFETY: `atexit` only stores the function pointer; `at_exit` is a
        // plain `extern "C" fn()` that does not unwind.
        unsafe {
            libc::atexit(at_exit);
        }
    });
}

extern "C" fn at_exit() {
    // A panic must not unwind into libc.
    let _ = std::panic::catch_unwind(remove_all);
}

fn remove_all() {
    // `try_lock`: a thread stopped mid-`add` must not hang the exit.
    let Ok(list) = LEFTOVERS.try_lock() else {
        return;
    };
    let me = std::process::id();
    for leftover in list.iter() {
        match leftover {
            Leftover::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Leftover::PidFile(path) => {
                let ours = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    == Some(me);
                if ours {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}
