//! Client connection admission: how many connections switchyard holds, in
//! total and per client address, and which one gives way when the total is
//! reached (nginx's `worker_connections` / `limit_conn`, HAProxy's `maxconn`
//! and per-source tracking).
//!
//! Every accepted client connection takes a place before Pingora sees it and
//! gives it back when it closes. Past `max_connections_per_client` the new
//! connection is closed at once. At `max_connections` the oldest idle
//! HTTP/1 connection is told to close instead, so clients with requests in
//! flight keep being served; only when nothing is idle is the new connection
//! closed. Idle means that not a single byte of a request has arrived since
//! the connection was accepted (fresh) or since its last response (kept
//! alive): nginx treats both alike as "reusable" and closes them first when
//! `worker_connections` run out. So a flood of connections that never send
//! anything cannot lock other clients out; a connection midway through a
//! header is not idle, and the header deadline ends it.
//! While [`MAX_PENDING_EVICTIONS`] evicted connections are still closing,
//! only a newcomer with request bytes already waiting evicts; a silent one
//! is refused, which keeps a flood within the open-file limit.
//! Each refusal and eviction is counted (for the metrics listener to come,
//! issue 11) and logged at debug; a warning with the counts so far is logged
//! at most once per [`CAP_WARN_INTERVAL`]: under a flood, one line per
//! connection would bury the real errors.
//!
//! Costs: the accept path takes an atomic for the total, a lock on the
//! per-client table (only when a per-client cap is set) and a lock on the
//! table of evictable connections. A request (and a fresh connection) pays
//! two compare-and-swaps on its connection's [`Slot`] (idle while waiting,
//! busy at its first byte) plus one shared counter that orders idle
//! connections, and registers its waker while it waits idle (one atomic
//! swap); no lock. Finding the
//! oldest idle connection scans the table under its lock, which only happens
//! at the cap.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// Open files kept back from client connections for everything else the
/// process opens (64): listeners (proxy and admin), admin API connections,
/// health probes, the state and log files, epoll and the runtime's own.
pub const FD_RESERVE: u64 = 64;

/// The smallest computed default of `max_connections` (16 connections), so
/// a process started with a tiny open-file limit still serves someone.
pub const MIN_DEFAULT_MAX_CONNECTIONS: usize = 16;

/// Shortest time between two warnings that a cap was hit (60 s).
pub const CAP_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Evicted connections that may still be closing at once (16). An evicted
/// connection closes only when its task next runs, and Pingora accepts up to
/// 128 connections in one go before any of their tasks runs: without this
/// bound a flood of silent connections holds the cap, a batch of new ones
/// and a batch of evicted ones still closing, and runs out of open files
/// (EMFILE; Pingora then stops accepting for a second). Past the bound only
/// a new connection whose request bytes are already waiting evicts; one
/// that has sent nothing yet is refused, which closes it at once.
pub const MAX_PENDING_EVICTIONS: usize = 16;

/// Candidates tried when an eviction loses a race with its connection
/// turning busy (8); each try picks the next oldest.
const EVICTION_TRIES: usize = 8;

/// Raises the open-file soft limit to the hard limit (nginx's
/// `worker_rlimit_nofile`) and returns `(before, after)`, the soft limit in
/// files. A limit the OS reports as unlimited comes back as `u64::MAX`.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur >= lim.rlim_max {
        return Ok((before, before));
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, lim.rlim_max))
}

/// The default `max_connections` for an open-file limit of `open_files`:
/// `(open_files - FD_RESERVE - upstream_keepalive_pool) / 2`, at least
/// [`MIN_DEFAULT_MAX_CONNECTIONS`]. Half, because each client connection
/// with a request in flight also holds one upstream connection; the idle
/// upstream pool and [`FD_RESERVE`] come off first.
pub fn default_max_connections(open_files: u64, upstream_keepalive_pool: usize) -> usize {
    let free = open_files
        .saturating_sub(FD_RESERVE)
        .saturating_sub(upstream_keepalive_pool as u64)
        / 2;
    usize::try_from(free)
        .unwrap_or(usize::MAX)
        .max(MIN_DEFAULT_MAX_CONNECTIONS)
}

/// Counts of expected outcomes that are logged at debug only, for the
/// metrics listener to expose. All are totals since start.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// New connections closed at once: `max_connections` reached, nothing
    /// idle (or [`MAX_PENDING_EVICTIONS`] still closing and nothing sent).
    pub refused_total: AtomicU64,
    /// New connections closed at once: `max_connections_per_client` reached.
    pub refused_per_client: AtomicU64,
    /// Idle connections closed to admit a new one: kept-alive ones waiting
    /// for a next request and fresh ones that never sent a byte alike.
    pub evicted_idle: AtomicU64,
    /// Connections closed because a request header missed `header_timeout`.
    pub header_timeouts: AtomicU64,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached and no idle connection to close.
    Total,
    /// This client address holds `max_connections_per_client` already.
    PerClient,
    /// `max_connections` reached, [`MAX_PENDING_EVICTIONS`] evicted
    /// connections still closing, and the new one has sent nothing yet.
    Evicting,
}

/// The connection table shared by all accept loops and connections.
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    max_per_client: Option<usize>,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// HTTP/1 connections that may become idle, by id.
    evictable: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    /// Orders idle periods: a smaller ticket went idle earlier.
    next_ticket: AtomicU64,
    /// Evicted connections not yet closed.
    evicting: AtomicUsize,
    /// When the table was made, and the time after it (in seconds) before
    /// which no further cap warning is logged.
    born: Instant,
    next_warn_secs: AtomicU64,
    pub stats: ConnStats,
}

/// [`Slot::state`] of a connection that is not idle.
const BUSY: u64 = 0;
/// [`Slot::state`] of a connection told to close.
const EVICTED: u64 = u64::MAX;

/// The idle state of one HTTP/1 connection, shared between the connection
/// (which moves it between busy and idle: idle while no byte of a request
/// has arrived) and [`Connections`] (which may evict it while idle).
#[derive(Debug, Default)]
pub struct Slot {
    /// [`BUSY`], [`EVICTED`], or the ticket of the idle period.
    state: AtomicU64,
    /// The read waiting for the next request, woken by an eviction.
    waker: AtomicWaker,
}

impl Slot {
    /// Whether the connection was told to close.
    pub fn evicted(&self) -> bool {
        self.state.load(Ordering::Acquire) == EVICTED
    }

    /// Marks the connection idle (waiting for a next request) with `ticket`.
    /// False if it was evicted meanwhile.
    pub fn set_idle(&self, ticket: u64) -> bool {
        self.state
            .compare_exchange(BUSY, ticket, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks the idle connection busy (bytes of a request arrived). False if
    /// an eviction won the race: those bytes must not be handed on.
    pub fn set_busy(&self, ticket: u64) -> bool {
        self.state
            .compare_exchange(ticket, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Registers the task to wake on eviction.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

impl Connections {
    /// A table admitting at most `max_total` connections, and
    /// `max_per_client` per client address when set.
    pub fn new(max_total: usize, max_per_client: Option<usize>) -> Connections {
        Connections {
            max_total,
            max_per_client,
            open: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            evictable: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            next_ticket: AtomicU64::new(1),
            evicting: AtomicUsize::new(0),
            born: Instant::now(),
            next_warn_secs: AtomicU64::new(0),
            stats: ConnStats::default(),
        }
    }

    /// The total cap, in connections.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Client connections open now (evicted ones count until they close).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A ticket for a connection going idle now.
    pub fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a place for a new connection from `peer`; `evictable` gives it
    /// a [`Slot`] (HTTP/1). At the total cap, the oldest idle connection is
    /// evicted to make room, unless [`MAX_PENDING_EVICTIONS`] are still
    /// closing and `sent` (asked only then) says the new connection has no
    /// request bytes waiting. The place is given back when the returned
    /// [`Admission`] is dropped.
    pub fn admit(
        self: &Arc<Self>,
        peer: Option<IpAddr>,
        evictable: bool,
        sent: impl FnOnce() -> bool,
    ) -> Result<Admission, Refused> {
        let counted_peer = match (self.max_per_client, peer) {
            (Some(cap), Some(ip)) => {
                let mut table = lock(&self.per_client);
                let n = table.entry(ip).or_insert(0);
                if *n >= cap {
                    drop(table);
                    self.stats
                        .refused_per_client
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %ip, cap, "connection refused: max_connections_per_client");
                    self.warn_cap_hit();
                    return Err(Refused::PerClient);
                }
                *n += 1;
                Some(ip)
            }
            _ => None,
        };
        let mut admission = Admission {
            table: self.clone(),
            peer: counted_peer,
            slot: None,
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            if self.evicting.load(Ordering::Acquire) >= MAX_PENDING_EVICTIONS && !sent() {
                drop(admission);
                self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    cap = self.max_total,
                    "connection refused: max_connections, evictions still closing"
                );
                self.warn_cap_hit();
                return Err(Refused::Evicting);
            }
            if !self.evict_oldest_idle() {
                // Dropping the admission gives back both places.
                drop(admission);
                self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    cap = self.max_total,
                    "connection refused: max_connections, none idle"
                );
                self.warn_cap_hit();
                return Err(Refused::Total);
            }
            self.stats.evicted_idle.fetch_add(1, Ordering::Relaxed);
            self.warn_cap_hit();
        }
        if evictable {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let slot = Arc::new(Slot::default());
            lock(&self.evictable).insert(id, slot.clone());
            admission.slot = Some((id, slot));
        }
        Ok(admission)
    }

    /// One warning per [`CAP_WARN_INTERVAL`] at most, with the totals, so an
    /// operator learns that a cap is being hit without a line per connection.
    fn warn_cap_hit(&self) {
        let now = self.born.elapsed().as_secs();
        let next = self.next_warn_secs.load(Ordering::Relaxed);
        let later = now + CAP_WARN_INTERVAL.as_secs();
        if now < next
            || self
                .next_warn_secs
                .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let s = &self.stats;
        tracing::warn!(
            max_connections = self.max_total,
            max_connections_per_client = self.max_per_client,
            refused_total = s.refused_total.load(Ordering::Relaxed),
            refused_per_client = s.refused_per_client.load(Ordering::Relaxed),
            evicted_idle = s.evicted_idle.load(Ordering::Relaxed),
            "connection caps reached (totals since start; reported at most once a minute)"
        );
    }

    /// Tells the connection idle the longest to close. False if none is idle.
    fn evict_oldest_idle(&self) -> bool {
        let table = lock(&self.evictable);
        for _ in 0..EVICTION_TRIES {
            let oldest = table
                .values()
                .filter_map(|s| {
                    let state = s.state.load(Ordering::Acquire);
                    (state != BUSY && state != EVICTED).then_some((state, s))
                })
                .min_by_key(|(ticket, _)| *ticket);
            let Some((ticket, slot)) = oldest else {
                return false;
            };
            if slot
                .state
                .compare_exchange(ticket, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.evicting.fetch_add(1, Ordering::AcqRel);
                slot.waker.wake();
                tracing::debug!("idle connection closed to admit a new one");
                return true;
            }
        }
        false
    }
}

/// A connection's place in [`Connections`]; dropping it gives the place back.
#[derive(Debug)]
pub struct Admission {
    table: Arc<Connections>,
    peer: Option<IpAddr>,
    slot: Option<(u64, Arc<Slot>)>,
}

impl Admission {
    /// The connection's idle state, for HTTP/1 connections.
    pub fn slot(&self) -> Option<Arc<Slot>> {
        self.slot.as_ref().map(|(_, s)| s.clone())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((id, slot)) = self.slot.take() {
            lock(&self.table.evictable).remove(&id);
            if slot.evicted() {
                self.table.evicting.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(ip) = self.peer {
            let mut table = lock(&self.table.per_client);
            if let Some(n) = table.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    table.remove(&ip);
                }
            }
        }
        self.table.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Locks a table; a panic elsewhere while holding it leaves counts that
/// are still usable, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn default_leaves_room_for_upstreams_and_files() {
        assert_eq!(default_max_connections(1024, 128), (1024 - 64 - 128) / 2);
        assert_eq!(
            default_max_connections(100, 128),
            MIN_DEFAULT_MAX_CONNECTIONS
        );
        assert!(default_max_connections(u64::MAX, 128) > 1 << 30);
    }

    #[test]
    fn per_client_cap_counts_each_address_and_gives_back_on_close() {
        let c = Arc::new(Connections::new(100, Some(2)));
        let a1 = c.admit(ip("127.0.0.1"), true, || false).unwrap();
        let _a2 = c.admit(ip("127.0.0.1"), true, || false).unwrap();
        assert_eq!(
            c.admit(ip("127.0.0.1"), true, || false).unwrap_err(),
            Refused::PerClient
        );
        let _b = c.admit(ip("127.0.0.2"), true, || false).unwrap();
        drop(a1);
        let _a3 = c.admit(ip("127.0.0.1"), true, || false).unwrap();
        assert_eq!(c.stats.refused_per_client.load(Ordering::Relaxed), 1);
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_is_evicted_else_refused() {
        let c = Arc::new(Connections::new(3, None));
        let a = c.admit(None, true, || false).unwrap();
        let b = c.admit(None, true, || false).unwrap();
        let _h2 = c.admit(None, false, || false).unwrap();
        // Nothing idle: refused, and the count is unchanged.
        assert_eq!(c.admit(None, true, || false).unwrap_err(), Refused::Total);
        assert_eq!(c.open(), 3);
        let (sa, sb) = (a.slot().unwrap(), b.slot().unwrap());
        let tb = c.ticket();
        assert!(sb.set_idle(tb));
        let ta = c.ticket();
        assert!(sa.set_idle(ta));
        // b went idle first, so b goes.
        let _d = c.admit(None, true, || false).unwrap();
        assert!(sb.evicted() && !sa.evicted());
        // An evicted connection cannot turn busy, a racing one can.
        assert!(!sb.set_busy(tb));
        assert!(sa.set_busy(ta));
        assert_eq!(c.admit(None, true, || false).unwrap_err(), Refused::Total);
        drop(b);
        assert_eq!(c.open(), 3);
        assert_eq!(c.stats.evicted_idle.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats.refused_total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn evictions_still_closing_are_bounded_unless_the_newcomer_sent_bytes() {
        let c = Arc::new(Connections::new(1, None));
        // Each newcomer goes idle and is evicted by the next; none closes.
        let mut evicted = Vec::new();
        let mut last = c.admit(None, true, || false).unwrap();
        for _ in 0..MAX_PENDING_EVICTIONS {
            assert!(last.slot().unwrap().set_idle(c.ticket()));
            evicted.push(std::mem::replace(
                &mut last,
                c.admit(None, true, || false).unwrap(),
            ));
        }
        assert!(last.slot().unwrap().set_idle(c.ticket()));
        assert_eq!(
            c.admit(None, true, || false).unwrap_err(),
            Refused::Evicting
        );
        assert_eq!(c.stats.refused_total.load(Ordering::Relaxed), 1);
        // A newcomer whose request is already waiting still gets in.
        let sent = c.admit(None, true, || true).unwrap();
        assert!(sent.slot().unwrap().set_idle(c.ticket()));
        // Evicted connections closing make room for silent ones again.
        evicted.clear();
        assert!(c.admit(None, true, || false).is_ok());
        assert_eq!(c.stats.evicted_idle.load(Ordering::Relaxed), 18);
    }
}
