//! Kept-alive backend connections of the lean HTTP/1 path
//! ([`crate::fast_path`]): one pool per worker thread, last in first out,
//! with no task per connection.
//!
//! Pingora's own pool hands every idle connection to a spawned task that
//! watches it for a close, and takes it back through a lock. Here an idle
//! connection just sits in its thread's list, and one idle longer than
//! [`IDLE_LIMIT`] is closed instead of used. A connection the backend
//! closed meanwhile fails on first use, before any response byte, and the
//! request is retried once on a new connection ([`crate::fast_path`]);
//! for a request that must not be retried (a non-idempotent method) the
//! connection is asked first (one non-blocking `recv` with `MSG_PEEK`:
//! a syscall the common request does not pay). With `server.work_stealing` off (the default) a connection is used
//! by the thread that made it; with it on, a task may put a connection back
//! on another thread's list, which is harmless (the stream is `Send`).
//!
//! Known limit: connections of a backend removed by a reload stay open in
//! the lists until the backend closes them and a later take or put on that
//! thread sweeps them ([`put`] sweeps the whole list once it is full).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pingora::protocols::Stream;

/// Longest a backend connection stays idle in a pool before it is closed
/// instead of used (4 s): below the shortest keep-alive timeout common
/// backends use (Node.js: 5 s), so the backend rarely closes a connection
/// at the moment it is reused.
pub const IDLE_LIMIT: Duration = Duration::from_secs(4);

struct Idle {
    stream: Stream,
    since: Instant,
}

#[derive(Default)]
struct Lists {
    by_backend: HashMap<SocketAddr, Vec<Idle>>,
    count: usize,
}

thread_local! {
    static POOL: RefCell<Lists> = RefCell::new(Lists::default());
}

/// A kept-alive connection to `addr` idle for less than [`IDLE_LIMIT`], if
/// this thread has one; the most recently used first. `verify`: also make
/// sure the backend has not closed it (one `recv` more), for a request that
/// could not be retried if it had (a non-idempotent method).
pub fn take(addr: SocketAddr, verify: bool) -> Option<Stream> {
    POOL.with_borrow_mut(|lists| {
        let list = lists.by_backend.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            lists.count -= 1;
            if idle.since.elapsed() < IDLE_LIMIT && (!verify || still_open(&idle.stream)) {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Keeps `stream` (a connection to `addr` whose last response was read
/// whole) for reuse, unless this thread already keeps `cap` connections:
/// then the expired ones are swept, and if none was, `stream` is closed.
pub fn put(addr: SocketAddr, stream: Stream, cap: usize) {
    POOL.with_borrow_mut(|lists| {
        if lists.count >= cap {
            sweep(lists);
            if lists.count >= cap {
                return;
            }
        }
        lists.count += 1;
        lists.by_backend.entry(addr).or_default().push(Idle {
            stream,
            since: Instant::now(),
        });
    });
}

/// Closes every connection idle past [`IDLE_LIMIT`] or closed by its backend.
fn sweep(lists: &mut Lists) {
    for list in lists.by_backend.values_mut() {
        list.retain(|idle| idle.since.elapsed() < IDLE_LIMIT && still_open(&idle.stream));
    }
    lists.by_backend.retain(|_, list| !list.is_empty());
    lists.count = lists.by_backend.values().map(Vec::len).sum();
}

/// Whether an idle connection is still open with nothing unread: a backend
/// that closed it (0 bytes) or sent bytes nobody asked for (a stray or late
/// answer) makes it unusable. One `recv(MSG_PEEK | MSG_DONTWAIT)`, which
/// takes nothing from the socket. Pingora's unique id of a plain TCP
/// stream is its file descriptor.
fn still_open(stream: &Stream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`, which we own; the
    // descriptor stays open while `stream` is borrowed, and MSG_PEEK leaves
    // the data in place.
    let n = unsafe {
        libc::recv(
            stream.id(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}
