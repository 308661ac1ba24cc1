//! In-flight caps (`[concurrency.NAME]`): at most `max_in_flight` requests
//! of every route naming the cap at the backends at once, and at most
//! `per_key` of them under one key, so one client cannot hold every GPU.
//!
//! A request over the cap waits in a FIFO queue of `queue` places for up to
//! `queue_timeout`; a full queue or a wait past the timeout is refused (503
//! with `Retry-After`). A freed slot goes to the oldest waiter that may take
//! it: a waiter whose key already holds `per_key` slots is skipped, not
//! waited for, so it never blocks the waiters of other keys behind it.
//!
//! A slot is a [`Permit`] kept in the request's context: it is given back
//! when the context is dropped, which is when the request ends however it
//! ends (answered, failed, client gone, upgraded connection closed).
//!
//! A cap with `scope = "cluster"` counts its slots in Redis as leases
//! ([`crate::limits::leases`]): `max_in_flight` and `per_key` hold across
//! every instance. A request that finds the cluster cap full waits, as
//! locally, for up to `queue_timeout` among at most `queue` waiters of this
//! instance, asking Redis again every [`CLUSTER_POLL_INTERVAL`] (a slot
//! freed on another instance sends no message; the order among waiters of
//! different instances is whoever asks first). While Redis cannot answer,
//! requests are judged by the local cap of this instance's share
//! (`max_in_flight / live instances`, at least 1, `per_key` at most that),
//! with the local queue as above; requests holding leases count in it.
//!
//! Per-key entries exist only while the key has a request in flight or
//! queued, so the table is at most `max_in_flight + queue` entries.
//! Handing out a slot scans the queue from its head past waiters whose key
//! is full: O(queue) at worst, bounded by [`crate::config::MAX_QUEUE`].

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use tokio::sync::oneshot;

use crate::cluster::Link;
use crate::config;
use crate::limits::key::{Key, Keyer};
use crate::limits::leases::{ClusterCap, Lease};

pub use crate::limits::leases::CLUSTER_POLL_INTERVAL;

/// Counters of one cap since start, for the metrics to come (issue 11).
#[derive(Debug, Default)]
pub struct ConcurrencyStats {
    /// Requests given a slot, at once or after waiting.
    pub admitted: AtomicU64,
    /// Requests that had to wait in the queue (admitted or not in the end).
    pub queued: AtomicU64,
    /// Refused at once: the queue was full (or there is none).
    pub refused_queue_full: AtomicU64,
    /// Refused after waiting `queue_timeout` without a slot.
    pub refused_timeout: AtomicU64,
    /// Queued requests whose client went away before a slot was free.
    pub abandoned: AtomicU64,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken and the queue is full (or `queue = 0`).
    QueueFull,
    /// Waited `queue_timeout` without a slot.
    Timeout,
    /// The client went away while its request waited.
    ClientGone,
}

/// One named cap, shared by every route that names it.
pub struct Concurrency {
    name: String,
    /// The settings it was built from: a reload keeps this cap (its slots
    /// and queue) only while they stay equal.
    settings: config::Concurrency,
    inner: Arc<Inner>,
    keyer: Keyer,
    /// `scope = "cluster"`: the slots in Redis.
    cluster: Option<Arc<ClusterCap>>,
}

struct Inner {
    /// `max_in_flight`; for a cluster cap, this instance's share of it
    /// once Redis has failed (see the module doc).
    max_in_flight: AtomicUsize,
    per_key: AtomicUsize,
    queue_cap: usize,
    queue_timeout: Duration,
    state: Mutex<State>,
    stats: ConcurrencyStats,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    /// Keys with a request in flight or queued; no other key is kept.
    keys: HashMap<Key, KeyState>,
    /// Waiters, oldest first.
    queue: VecDeque<Waiter>,
    next_id: u64,
}

#[derive(Default)]
struct KeyState {
    in_flight: usize,
    queued: usize,
}

struct Waiter {
    id: u64,
    key: Key,
    /// Where the slot is handed over; the waiting request holds the receiver.
    grant: oneshot::Sender<Permit>,
}

/// A slot of a cap, given back when dropped.
pub struct Permit {
    inner: Arc<Inner>,
    key: Key,
    /// A cluster cap's slot in Redis (dropped, so given back, with the
    /// permit).
    _lease: Option<Lease>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let grants = {
            let mut state = self.inner.lock();
            state.in_flight -= 1;
            if let Some(k) = state.keys.get_mut(&self.key) {
                k.in_flight -= 1;
            }
            forget_if_idle(&mut state, self.key);
            self.inner.dispatch(&mut state)
        };
        // Outside the lock: a grant that finds its waiter gone comes back
        // as a Permit, whose drop takes the lock again.
        hand_over(grants);
    }
}

impl Concurrency {
    /// An empty cap: nothing in flight, nobody waiting.
    pub fn new(cap: &config::Concurrency) -> Concurrency {
        Concurrency {
            settings: cap.clone(),
            name: cap.name.clone(),
            inner: Arc::new(Inner {
                max_in_flight: AtomicUsize::new(cap.max_in_flight as usize),
                per_key: AtomicUsize::new(cap.per_key as usize),
                queue_cap: cap.queue as usize,
                queue_timeout: cap.queue_timeout,
                state: Mutex::new(State::default()),
                stats: ConcurrencyStats::default(),
            }),
            keyer: Keyer::new(cap.key.clone()),
            cluster: None,
        }
    }

    /// The cap `cap` on `link`'s cluster when it says `scope = "cluster"`
    /// (and a lone instance's cap otherwise, or without a link).
    pub fn with_link(cap: &config::Concurrency, link: Option<&Arc<Link>>) -> Concurrency {
        let mut local = Concurrency::new(cap);
        let Some(link) = link.filter(|_| cap.scope == config::Scope::Cluster) else {
            return local;
        };
        let cluster = ClusterCap::new(link.clone(), cap);
        local.keyer = Keyer::with_shared(cap.key.clone(), cluster.limit.shared_hash());
        local.cluster = Some(cluster);
        local
    }

    /// Requests judged by the local share (cluster caps; 0 otherwise).
    pub fn fallbacks(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.limit.fallbacks())
    }

    /// Whether the cap is counted in Redis (`scope = "cluster"`).
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Slots this instance holds in Redis (cluster caps; 0 otherwise).
    pub fn leases(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.held())
    }

    /// Reads the cluster's shared hash key now (see
    /// [`crate::limits::rate::RateLimit::load_secret`]).
    pub async fn load_secret(&self) -> Result<(), crate::cluster::ClusterError> {
        match &self.cluster {
            Some(c) => c.limit.load_secret().await,
            None => Ok(()),
        }
    }

    /// A cluster slot for `key`: a lease taken in Redis, waiting for one
    /// (polled) as long as the queue allows; this instance's share when
    /// Redis cannot answer.
    async fn acquire_cluster(&self, cap: &Arc<ClusterCap>, key: Key) -> Result<Permit, Refused> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.queue_timeout;
        let member = cap.member();
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            match cap.limit.ask(&key, cap.try_acquire(&key, &member)).await {
                Some(Some(lease)) => {
                    // Redis answers: the whole cap again for whoever
                    // falls back next (the share is set when one does).
                    inner
                        .max_in_flight
                        .store(self.settings.max_in_flight as usize, Ordering::Relaxed);
                    inner
                        .per_key
                        .store(self.settings.per_key as usize, Ordering::Relaxed);
                    let mut permit = inner.admit(&mut inner.lock(), key);
                    permit._lease = Some(lease);
                    return Ok(permit);
                }
                Some(None) => {}
                None => {
                    drop(waiting);
                    let share = cap.limit.share(u64::from(self.settings.max_in_flight)) as usize;
                    inner.max_in_flight.store(share, Ordering::Relaxed);
                    inner.per_key.store(
                        (self.settings.per_key as usize).min(share),
                        Ordering::Relaxed,
                    );
                    return self.acquire_local(key).await;
                }
            }
            if waiting.is_none() {
                if cap.waiting.fetch_add(1, Ordering::Relaxed) >= inner.queue_cap {
                    cap.waiting.fetch_sub(1, Ordering::Relaxed);
                    inner
                        .stats
                        .refused_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Refused::QueueFull);
                }
                inner.stats.queued.fetch_add(1, Ordering::Relaxed);
                waiting = Some(Waiting(&cap.waiting));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                inner.stats.refused_timeout.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Timeout);
            }
            tokio::time::sleep(CLUSTER_POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// A slot for `req` from `client` (its address after `trusted_proxies`):
    /// at once if one is free for its key, else after waiting in the queue.
    /// Dropping the returned future (the client went away) leaves the queue.
    pub async fn acquire(&self, req: &RequestHeader, client: IpAddr) -> Result<Permit, Refused> {
        self.acquire_key(self.keyer.key(req, client)).await
    }

    /// [`Concurrency::acquire`] for a proxied request, which leaves the
    /// queue as soon as its client is seen to go away: an HTTP/2 stream
    /// reset, or an HTTP/1 connection closed while a request without a body
    /// waits. An HTTP/1 request with a body (or a WebSocket upgrade) is not
    /// watched: the only way to see the close is to read the connection,
    /// which would consume body (or upgraded) bytes the backend must get;
    /// such a waiter leaves at its `queue_timeout` instead.
    pub async fn admit(&self, session: &mut Session, client: IpAddr) -> Result<Permit, Refused> {
        let key = self.keyer.key(session.req_header(), client);
        let downstream = session.as_downstream_mut();
        tokio::select! {
            biased;
            granted = self.acquire_key(key) => granted,
            () = client_gone(downstream) => {
                tracing::debug!("client went away while its request waited for a concurrency slot");
                Err(Refused::ClientGone)
            }
        }
    }

    async fn acquire_key(&self, key: Key) -> Result<Permit, Refused> {
        match &self.cluster {
            Some(cap) => self.acquire_cluster(cap, key).await,
            None => self.acquire_local(key).await,
        }
    }

    async fn acquire_local(&self, key: Key) -> Result<Permit, Refused> {
        let inner = &self.inner;
        let (id, mut grant) = {
            let mut state = inner.lock();
            let held = state.keys.get(&key).map_or(0, |k| k.in_flight);
            if state.in_flight < inner.max_in_flight() && held < inner.per_key() {
                return Ok(inner.admit(&mut state, key));
            }
            if state.queue.len() >= inner.queue_cap {
                inner
                    .stats
                    .refused_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refused::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push_back(Waiter { id, key, grant: tx });
            state.keys.entry(key).or_default().queued += 1;
            inner.stats.queued.fetch_add(1, Ordering::Relaxed);
            (id, rx)
        };
        tracing::debug!("request queued for a concurrency slot");
        // Leaves the queue however the wait ends, the future dropped included.
        let mut leave = Leave {
            inner: inner.clone(),
            id,
            key,
            timed_out: false,
        };
        match tokio::time::timeout(inner.queue_timeout, &mut grant).await {
            Ok(Ok(permit)) => Ok(permit),
            // The sender is only dropped with its waiter, which `Leave` removes.
            Ok(Err(_)) => Err(Refused::Timeout),
            Err(_) => match grant.try_recv() {
                // Granted just as the wait ran out: take it.
                Ok(permit) => Ok(permit),
                Err(_) => {
                    leave.timed_out = true;
                    inner.stats.refused_timeout.fetch_add(1, Ordering::Relaxed);
                    Err(Refused::Timeout)
                }
            },
        }
    }

    /// The cap's name (`[concurrency.NAME]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Requests waiting for a slot now.
    pub fn queue_depth(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Keys with a request in flight or queued now.
    pub fn keys(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// Counters since start.
    pub fn stats(&self) -> &ConcurrencyStats {
        &self.inner.stats
    }

    /// What the cap holds now, taken under one lock: the settings, in-flight
    /// and queued requests, and the `top` keys by slots held then queued
    /// (heaviest first; header keys appear only as their hash).
    pub fn snapshot(&self, top: usize) -> CapSnapshot {
        let state = self.inner.lock();
        let mut keys: Vec<(Key, usize, usize)> = state
            .keys
            .iter()
            .map(|(k, s)| (*k, s.in_flight, s.queued))
            .collect();
        keys.sort_unstable_by_key(|&(_, in_flight, queued)| std::cmp::Reverse((in_flight, queued)));
        keys.truncate(top);
        CapSnapshot {
            max_in_flight: self.inner.max_in_flight(),
            per_key: self.inner.per_key(),
            queue: self.inner.queue_cap,
            in_flight: state.in_flight,
            queue_depth: state.queue.len(),
            keys: state.keys.len(),
            top_keys: keys,
        }
    }

    /// The `Retry-After` of a refusal, in seconds: the queue timeout, the
    /// longest a slot could take to come round to a client that waits.
    pub fn retry_after(&self) -> u64 {
        self.inner.queue_timeout.as_secs().max(1)
    }
}

impl Inner {
    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    fn per_key(&self) -> usize {
        self.per_key.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still
        // consistent (each update is one step), so a poisoned lock is used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>, state: &mut State, key: Key) -> Permit {
        state.in_flight += 1;
        state.keys.entry(key).or_default().in_flight += 1;
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        Permit {
            inner: self.clone(),
            key,
            _lease: None,
        }
    }

    /// Takes the free slots' waiters out of the queue, oldest first,
    /// skipping those whose key is at `per_key`.
    fn dispatch(self: &Arc<Self>, state: &mut State) -> Vec<(oneshot::Sender<Permit>, Permit)> {
        let mut grants = Vec::new();
        let mut i = 0;
        while state.in_flight < self.max_in_flight() && i < state.queue.len() {
            let key = state.queue[i].key;
            let held = state.keys.get(&key).map_or(0, |k| k.in_flight);
            if held >= self.per_key() {
                i += 1;
                continue;
            }
            let Some(waiter) = state.queue.remove(i) else {
                break;
            };
            if let Some(k) = state.keys.get_mut(&key) {
                k.queued -= 1;
            }
            let permit = self.admit(state, key);
            grants.push((waiter.grant, permit));
        }
        grants
    }
}

/// Resolves when the client of `downstream` is seen gone; pending for
/// ever where that cannot be seen without reading the body (see
/// [`Concurrency::admit`]).
async fn client_gone(downstream: &mut ServerSession) {
    if let Some(reset) = downstream.watch_h2_stream_close() {
        // Any outcome (reset, close, error) ends the stream.
        let _ = reset.await;
        return;
    }
    let upgrade = downstream
        .req_header()
        .headers
        .contains_key(http::header::UPGRADE);
    if matches!(downstream, ServerSession::H1(_)) && !upgrade && downstream.is_body_done() {
        // No body left to read (none expected, or a completion's already
        // read for its token budget): a read sees the close (an error),
        // and bytes of a pipelined next request are kept for it (pending).
        if downstream.read_body_or_idle(true).await.is_err() {
            return;
        }
    }
    std::future::pending().await
}

fn hand_over(grants: Vec<(oneshot::Sender<Permit>, Permit)>) {
    for (tx, permit) in grants {
        // A waiter gone meanwhile: the permit comes back and is dropped,
        // which passes the slot on.
        drop(tx.send(permit));
    }
}

fn forget_if_idle(state: &mut State, key: Key) {
    if state
        .keys
        .get(&key)
        .is_some_and(|k| k.in_flight == 0 && k.queued == 0)
    {
        state.keys.remove(&key);
    }
}

/// One waiter of a cluster cap, counted while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes a waiter from the queue when its wait ends without a slot.
struct Leave {
    inner: Arc<Inner>,
    id: u64,
    key: Key,
    /// The wait ran out (counted as such), rather than being dropped.
    timed_out: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        let Some(i) = state.queue.iter().position(|w| w.id == self.id) else {
            return; // Granted: it left the queue then.
        };
        state.queue.remove(i);
        if let Some(k) = state.keys.get_mut(&self.key) {
            k.queued -= 1;
        }
        forget_if_idle(&mut state, self.key);
        if !self.timed_out {
            self.inner.stats.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One cap at one moment ([`Concurrency::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapSnapshot {
    pub max_in_flight: usize,
    pub per_key: usize,
    /// Places in the queue.
    pub queue: usize,
    pub in_flight: usize,
    pub queue_depth: usize,
    /// Keys with a request in flight or queued.
    pub keys: usize,
    /// (key, slots held, requests queued), heaviest first.
    pub top_keys: Vec<(Key, usize, usize)>,
}

/// Every configured cap, indexed like `Config::concurrency`.
pub struct ConcurrencyCaps(Vec<Arc<Concurrency>>);

impl ConcurrencyCaps {
    pub fn new(caps: &[config::Concurrency]) -> ConcurrencyCaps {
        ConcurrencyCaps::carry(caps, None, None)
    }

    /// The caps of a reloaded config: a cap whose name and settings are
    /// unchanged in `old` is the same cap (the slots held and the queue
    /// carry on, so a reload never doubles the cap); a new or changed one
    /// starts empty, while requests holding the old one's slots finish on it.
    /// `link`: the cluster, for caps with `scope = "cluster"`.
    pub fn carry(
        caps: &[config::Concurrency],
        old: Option<&ConcurrencyCaps>,
        link: Option<&Arc<Link>>,
    ) -> ConcurrencyCaps {
        ConcurrencyCaps(
            caps.iter()
                .map(|c| {
                    old.and_then(|o| o.0.iter().find(|k| k.settings == *c))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Concurrency::with_link(c, link)))
                })
                .collect(),
        )
    }

    /// The cap a route names by its index (`RouteLimits::concurrency`).
    pub fn get(&self, index: usize) -> Option<&Concurrency> {
        self.0.get(index).map(|c| &**c)
    }

    /// Every cap, in configuration order (for the metrics and admin views).
    pub fn iter(&self) -> impl Iterator<Item = &Concurrency> {
        self.0.iter().map(|c| &**c)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    use super::*;

    fn cap(max: u32, per_key: u32, queue: u32) -> Concurrency {
        Concurrency::new(&config::Concurrency {
            name: "t".into(),
            max_in_flight: max,
            per_key,
            key: config::KeySource::ClientIp,
            scope: Default::default(),
            queue,
            queue_timeout: Duration::from_secs(5),
        })
    }

    fn key(n: u8) -> Key {
        Key::Ip(IpAddr::from([10, 0, 0, n]))
    }

    /// Polls `f` once: `Some` when it is done.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_a_wait_times_out() {
        let c = cap(1, 1, 1);
        let held = c.acquire_key(key(1)).await.unwrap();
        let mut waiting = pin!(c.acquire_key(key(2)));
        assert!(poll_once(waiting.as_mut()).is_none());
        assert_eq!(c.queue_depth(), 1);
        assert_eq!(c.acquire_key(key(3)).await.err(), Some(Refused::QueueFull));
        // Paused time: the timeout fires as soon as nothing else can run.
        assert_eq!(waiting.await.err(), Some(Refused::Timeout));
        assert_eq!((c.queue_depth(), c.in_flight(), c.keys()), (0, 1, 1));
        let s = c.stats();
        assert_eq!(s.refused_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(s.refused_timeout.load(Ordering::Relaxed), 1);
        assert_eq!(s.abandoned.load(Ordering::Relaxed), 0);
        drop(held);
        assert_eq!((c.in_flight(), c.keys()), (0, 0), "nothing kept");
        // No queue at all: over the cap is refused at once.
        let none = cap(1, 1, 0);
        let _p = none.acquire_key(key(1)).await.unwrap();
        assert_eq!(
            none.acquire_key(key(2)).await.err(),
            Some(Refused::QueueFull)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_go_to_waiters_in_order_skipping_full_keys() {
        let c = cap(2, 1, 10);
        let a1 = c.acquire_key(key(1)).await.unwrap();
        let b1 = c.acquire_key(key(2)).await.unwrap();
        // Queue: A, A, C (A at its per_key of 1 while a1 runs).
        let mut a2 = pin!(c.acquire_key(key(1)));
        let mut a3 = pin!(c.acquire_key(key(1)));
        let mut c1 = pin!(c.acquire_key(key(3)));
        for f in [a2.as_mut(), a3.as_mut()] {
            assert!(poll_once(f).is_none());
        }
        assert!(poll_once(c1.as_mut()).is_none());
        assert_eq!(c.queue_depth(), 3);
        // B's slot frees: A is still full, so C (behind two A) takes it.
        drop(b1);
        let c1 = poll_once(c1.as_mut()).unwrap().unwrap();
        assert!(poll_once(a2.as_mut()).is_none());
        assert_eq!(c.queue_depth(), 2);
        // A's slot frees: the older A waiter gets it, then the next.
        drop(a1);
        assert!(poll_once(a3.as_mut()).is_none(), "FIFO within a key");
        let a2 = poll_once(a2.as_mut()).unwrap().unwrap();
        drop(a2);
        let a3 = poll_once(a3.as_mut()).unwrap().unwrap();
        assert_eq!((c.in_flight(), c.queue_depth(), c.keys()), (2, 0, 2));
        drop((a3, c1));
        assert_eq!((c.in_flight(), c.keys()), (0, 0));
        assert_eq!(c.stats().admitted.load(Ordering::Relaxed), 5);
        assert_eq!(c.stats().queued.load(Ordering::Relaxed), 3);
        let caps = ConcurrencyCaps::new(&[config::Concurrency {
            name: "gpu".into(),
            max_in_flight: 1,
            per_key: 1,
            key: config::KeySource::Global,
            scope: Default::default(),
            queue: 0,
            queue_timeout: Duration::from_secs(1),
        }]);
        let names: Vec<&str> = caps.iter().map(Concurrency::name).collect();
        assert_eq!(names, ["gpu"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_leaves_the_queue_and_passes_no_slot_away() {
        let c = cap(1, 1, 2);
        let held = c.acquire_key(key(1)).await.unwrap();
        {
            let mut gone = pin!(c.acquire_key(key(2)));
            assert!(poll_once(gone.as_mut()).is_none());
            assert_eq!((c.queue_depth(), c.keys()), (1, 2));
        }
        assert_eq!((c.queue_depth(), c.keys()), (0, 1), "left at once");
        assert_eq!(c.stats().abandoned.load(Ordering::Relaxed), 1);
        let mut next = pin!(c.acquire_key(key(3)));
        assert!(poll_once(next.as_mut()).is_none());
        drop(held);
        let p = poll_once(next.as_mut()).unwrap().unwrap();
        assert_eq!(c.in_flight(), 1);
        drop(p);
        assert_eq!((c.in_flight(), c.keys()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_granted_to_a_waiter_that_is_gone_is_passed_on() {
        let c = cap(1, 1, 2);
        let held = c.acquire_key(key(1)).await.unwrap();
        // Granted, then dropped before it looked: the slot goes on to C.
        let (tx, rx) = oneshot::channel();
        {
            let mut state = c.inner.lock();
            state.queue.push_back(Waiter {
                id: u64::MAX,
                key: key(2),
                grant: tx,
            });
            state.keys.entry(key(2)).or_default().queued += 1;
        }
        drop(rx);
        let mut next = pin!(c.acquire_key(key(3)));
        assert!(poll_once(next.as_mut()).is_none());
        drop(held);
        let _p = poll_once(next.as_mut()).unwrap().unwrap();
        assert_eq!((c.in_flight(), c.queue_depth(), c.keys()), (1, 0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_state_stays_bounded() {
        let c = cap(4, 1, 0);
        for round in 0..1000u32 {
            let p = c.acquire_key(Key::Hashed(u64::from(round))).await.unwrap();
            drop(p);
        }
        assert_eq!(c.keys(), 0);
    }
}
