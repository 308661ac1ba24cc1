//! Connection floods: the caps on client connections (total and per client
//! address), eviction of idle kept-alive connections at the cap, and what
//! happens when the open-file limit itself runs out. Each test starts the
//! proxy with a low open-file limit so a few hundred connections reach it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Open-file limit of the proxy in these tests: the default cap is then
/// `(256 - 64 - 16) / 2 = 88` connections with a 16-connection upstream pool.
const OPEN_FILES: u64 = 256;
const DEFAULT_CAP: usize = 88;

/// A busy loop would use about one core; an idle proxy uses next to nothing.
/// Anything above this share of one core while a limit is hit is a spin.
const MAX_CPU_SHARE: f64 = 0.30;

/// How long the proxy's CPU time is watched while a limit is hit.
const CPU_WINDOW: Duration = Duration::from_secs(2);

/// Ten places, and a header deadline long enough that a connection midway
/// through its header stays for the whole test.
const TEN_PLACES: &str = "max_connections = 10\nheader_timeout = \"60s\"";

fn flood_proxy(blue: &Upstream, green: &Upstream, extra: &str) -> Proxy {
    ProxyBuilder::new(simple_api(blue, green))
        .open_files(OPEN_FILES)
        .server("upstream_keepalive_pool = 16\nkeepalive_timeout = \"60s\"")
        .server(extra)
        .start()
}

/// One request on `c`, expecting 200 from blue.
fn served(c: &mut RawConn, path: &str) {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: flood.test\r\n\r\n").as_bytes())
        .unwrap_or_else(|e| panic!("send {path}: {e}"));
    let r = c
        .read_response(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{path}: {r:?}");
}

/// Whether the server has closed `c` (checked without waiting long).
fn is_closed(c: &mut RawConn) -> bool {
    c.wait_closed(Duration::from_millis(1)).is_some()
}

/// The proxy's CPU use over [`CPU_WINDOW`], as a share of one core.
fn cpu_share(proxy: &Proxy) -> f64 {
    let (cpu0, t0) = (proxy.cpu_time(), Instant::now());
    // Measuring over a window is the point here, not synchronisation.
    std::thread::sleep(CPU_WINDOW);
    (proxy.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64()
}

#[test]
fn idle_keep_alive_flood_gives_way_to_new_clients_and_in_flight_requests_finish() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = flood_proxy(&blue, &green, "");
    let addr = proxy.http_addr();
    assert_eq!(proxy.get("/warm-up", None), (200, "blue".to_string()));
    let baseline = proxy.open_fds();

    // A request in flight while the flood comes.
    let mut busy = RawConn::connect(&addr);
    busy.send(b"GET /inflight?hold=1 HTTP/1.1\r\nHost: flood.test\r\n\r\n")
        .unwrap();
    assert!(poll_until(Duration::from_secs(5), || blue
        .in_flight_for("/inflight")
        == 1));
    // And a stream whose response has begun: not idle either.
    let mut stream = RawConn::connect(&addr);
    stream
        .send(b"GET /events?sse=2&gated=1 HTTP/1.1\r\nHost: flood.test\r\n\r\n")
        .unwrap();
    stream
        .read_head(Duration::from_secs(5))
        .expect("stream head");
    let mut events = Vec::new();
    stream
        .read_body_until(&mut events, "data: blue-1\n\n", Duration::from_secs(5))
        .unwrap();

    // 300 kept-alive clients, each served once and then idle: far more than
    // the cap. Each new one at the cap closes the oldest idle one.
    let mut flood: Vec<RawConn> = (0..300)
        .map(|i| {
            let mut c = RawConn::connect(&addr);
            served(&mut c, &format!("/flood/{i}"));
            c
        })
        .collect();
    let mut closed = 0;
    assert!(
        poll_until(Duration::from_secs(10), || {
            closed = flood.iter_mut().map(is_closed).filter(|&c| c).count();
            closed >= 300 - DEFAULT_CAP
        }),
        "only {closed} of 300 idle connections were closed at a cap of {DEFAULT_CAP}"
    );
    // The oldest went first: the newest are still open.
    assert!(!is_closed(flood.last_mut().unwrap()));

    // A second client is served, and the in-flight request finishes.
    let mut second = RawConn::connect(&addr);
    served(&mut second, "/second");
    // One permit for the held request, one for the stream's second event.
    blue.release(2);
    let r = busy
        .read_response(Duration::from_secs(10))
        .expect("the in-flight request survives the flood");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    stream
        .read_body_until(&mut events, "data: blue-2\n\n", Duration::from_secs(10))
        .expect("the stream survives the flood");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());
    // Operators hear of it once, not per connection.
    let warnings = proxy
        .stderr_text()
        .matches("connection caps reached")
        .count();
    assert_eq!(warnings, 1, "{}", proxy.stderr_text());

    // Recovery: with the flood gone the connections are given back.
    drop(flood);
    drop(second);
    drop(busy);
    drop(stream);
    assert_recovered(&proxy, baseline);
}

/// Connections a [`SilentFlood`] opens at most per place (each reopen counts),
/// so a flood is bounded in count even if it is never stopped.
const FLOOD_OPENS_PER_PLACE: usize = 200;

/// Longest a [`SilentFlood`] keeps reopening connections (20 s), so it is
/// bounded in time even if the test fails before stopping it.
const FLOOD_MAX_TIME: Duration = Duration::from_secs(20);

/// [`SilentFlood`] phases: reopen closed connections, hold the open ones
/// without reopening, close them all.
const FLOOD_RUN: u8 = 0;
const FLOOD_HOLD: u8 = 1;
const FLOOD_RELEASE: u8 = 2;

/// One client (127.0.0.1) that keeps `places` connections open without ever
/// sending a byte, and opens a new one whenever the proxy closes one: the
/// tester's flood of issue 8. Runs on its own thread and runtime.
struct SilentFlood {
    control: tokio::sync::watch::Sender<u8>,
    /// Connections opened so far.
    opened: Arc<AtomicUsize>,
    /// Connections the proxy closed (EOF or reset).
    closed: Arc<AtomicUsize>,
    /// Bytes the proxy sent on flood connections (it must answer nothing).
    answered: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentFlood {
    fn start(addr: &str, places: usize) -> SilentFlood {
        let (control, rx) = tokio::sync::watch::channel(FLOOD_RUN);
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        let counts = (opened.clone(), closed.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let until = tokio::time::Instant::now() + FLOOD_MAX_TIME;
                let tasks: Vec<_> = (0..places)
                    .map(|_| {
                        let (rx, counts) = (rx.clone(), counts.clone());
                        tokio::spawn(silent_place(addr, rx, counts, until))
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        SilentFlood {
            control,
            opened,
            closed,
            answered,
            thread: Some(thread),
        }
    }

    /// Stops reopening; the connections still open stay open.
    fn hold(&self) {
        let _ = self.control.send(FLOOD_HOLD);
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::Relaxed)
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for SilentFlood {
    /// Closes every flood connection and waits for the flood's thread.
    fn drop(&mut self) {
        let _ = self.control.send(FLOOD_RELEASE);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One place of a [`SilentFlood`]: a connection that sends nothing, reopened
/// when closed while the flood runs (at most [`FLOOD_OPENS_PER_PLACE`] times,
/// until `until`), held once it stops, dropped at release.
async fn silent_place(
    addr: std::net::SocketAddr,
    mut control: tokio::sync::watch::Receiver<u8>,
    (opened, closed, answered): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>),
    until: tokio::time::Instant,
) {
    use tokio::io::AsyncReadExt;
    for _ in 0..FLOOD_OPENS_PER_PLACE {
        if *control.borrow() != FLOOD_RUN || tokio::time::Instant::now() >= until {
            break;
        }
        let connect = tokio::net::TcpStream::connect(addr);
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 256];
        loop {
            tokio::select! {
                read = conn.read(&mut buf) => match read {
                    Ok(n) if n > 0 => {
                        answered.fetch_add(n, Ordering::Relaxed);
                    }
                    _ => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                _ = control.wait_for(|c| *c == FLOOD_RELEASE) => return,
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
    let _ = control.wait_for(|c| *c == FLOOD_RELEASE).await;
}

/// Open-file limit for the silent flood, the tester's: with the default
/// upstream pool (128) the default cap is `(256 - 64 - 128) / 2 = 32`.
const SILENT_FLOOD_OPEN_FILES: u64 = 256;

/// Requests a second client (127.0.0.2) sends during a flood, each on a new
/// connection, one after the other.
const SECOND_CLIENT_REQUESTS: usize = 40;

#[test]
fn flood_of_silent_connections_does_not_starve_a_second_client_and_it_recovers() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // The default upstream pool and a header deadline far beyond the test:
    // silent connections end only by eviction here.
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .open_files(SILENT_FLOOD_OPEN_FILES)
        .server("header_timeout = \"60s\"")
        .start();
    let addr = proxy.http_addr();
    assert_eq!(proxy.get("/warm-up", None), (200, "blue".to_string()));
    let baseline = proxy.open_fds();

    // 400 silent places, as the tester's flood, reopened as they are closed.
    let flood = SilentFlood::start(&addr, 400);
    assert!(
        poll_until(Duration::from_secs(10), || flood.closed() >= 400),
        "the proxy closed {} of {} silent connections",
        flood.closed(),
        flood.opened()
    );

    // Meanwhile a second client is served.
    let churn_before = flood.closed();
    let mut answered = 0;
    let mut failures = Vec::new();
    for i in 0..SECOND_CLIENT_REQUESTS {
        let mut c = RawConn::connect_from("127.0.0.2", &addr);
        let sent =
            c.send(format!("GET /second/{i} HTTP/1.1\r\nHost: flood.test\r\n\r\n").as_bytes());
        match sent.and_then(|_| c.read_response(Duration::from_secs(10))) {
            Ok(r) if (r.status, r.body.as_str()) == (200, "blue") => answered += 1,
            Ok(r) => failures.push(format!("{i}: {} {:?}", r.status, r.body)),
            Err(e) => failures.push(format!("{i}: {e}")),
        }
    }
    let churn = flood.closed() - churn_before;
    assert!(
        answered * 100 >= SECOND_CLIENT_REQUESTS * 95,
        "{answered} of {SECOND_CLIENT_REQUESTS} answered during the flood: {failures:?}"
    );
    // The flood kept reopening while the second client was served.
    assert!(
        churn >= 400,
        "only {churn} silent connections closed meanwhile"
    );

    // Held at the cap without reopening: no busy loop, still served.
    flood.hold();
    let share = cpu_share(&proxy);
    assert!(share < MAX_CPU_SHARE, "proxy used {share:.2} of a core");
    let mut late = RawConn::connect_from("127.0.0.2", &addr);
    served(&mut late, "/second/held");
    assert_eq!(flood.answered(), 0, "silent connections closed unanswered");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // Recovery: with the flood gone every place is given back.
    drop(flood);
    drop(late);
    assert_recovered(&proxy, baseline);
}

#[test]
fn silent_connections_give_way_but_in_flight_and_mid_header_ones_do_not() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = flood_proxy(&blue, &green, TEN_PLACES);
    let addr = proxy.http_addr();

    // Midway through a header, and then a request in flight.
    let mut partial = RawConn::connect(&addr);
    partial.send(b"GET /partial HTTP/1.1\r\nHost: flo").unwrap();
    let mut busy = RawConn::connect(&addr);
    busy.send(b"GET /inflight?hold=1 HTTP/1.1\r\nHost: flood.test\r\n\r\n")
        .unwrap();
    assert!(poll_until(Duration::from_secs(5), || blue
        .in_flight_for("/inflight")
        == 1));
    // A full exchange on a third connection: by its answer the proxy has long
    // read the partial header that was sent before.
    let mut probe = RawConn::connect(&addr);
    served(&mut probe, "/probe");
    drop(probe);

    // 40 silent connections on the 8 places left: silent ones give way (or
    // are refused), none of the two busy ones does.
    let mut silent: Vec<RawConn> = (0..40).map(|_| RawConn::connect(&addr)).collect();
    let mut closed = 0;
    assert!(
        poll_until(Duration::from_secs(10), || {
            closed = silent.iter_mut().map(is_closed).filter(|&c| c).count();
            closed >= 32
        }),
        "{closed} of 40 silent connections closed at a cap of 10 with 2 busy"
    );
    assert!(!is_closed(&mut partial), "the partial header was evicted");
    assert!(!is_closed(&mut busy), "the request in flight was evicted");
    // The oldest silent ones went first (newer ones arriving in a burst may
    // be refused instead: see MAX_PENDING_EVICTIONS); none got an answer.
    for c in silent.iter_mut().take(8) {
        let data = c.wait_closed(Duration::from_secs(5)).expect("evicted");
        assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    }
    for c in silent.iter_mut() {
        if let Some(data) = c.wait_closed(Duration::from_millis(1)) {
            assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
        }
    }

    // Both finish.
    partial.send(b"od.test\r\n\r\n").unwrap();
    let r = partial
        .read_response(Duration::from_secs(10))
        .expect("the partial header survives the flood");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    blue.release(1);
    let r = busy
        .read_response(Duration::from_secs(10))
        .expect("the in-flight request survives the flood");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());
}

#[test]
fn per_client_cap_closes_extra_connections_at_once_while_others_are_served() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = flood_proxy(&blue, &green, "max_connections_per_client = 5");
    let addr = proxy.http_addr();

    // 127.0.0.1 opens 40 connections without sending anything.
    let mut flood: Vec<RawConn> = (0..40).map(|_| RawConn::connect(&addr)).collect();
    let mut closed = 0;
    assert!(
        poll_until(Duration::from_secs(5), || {
            closed = flood.iter_mut().map(is_closed).filter(|&c| c).count();
            closed == 35
        }),
        "{closed} of 40 connections closed; expected the 35 over the cap of 5"
    );
    // One more, even with a complete request, is closed unanswered.
    let mut extra = RawConn::connect(&addr);
    let _ = extra.send(b"GET /extra HTTP/1.1\r\nHost: flood.test\r\n\r\n");
    let data = extra
        .wait_closed(Duration::from_secs(5))
        .expect("a connection over the per-client cap stays open");
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert_eq!(blue.received("/extra"), 0);

    // Another client address is served meanwhile, and nothing spins.
    let mut other = RawConn::connect_from("127.0.0.2", &addr);
    served(&mut other, "/other-client");
    let share = cpu_share(&proxy);
    assert!(share < MAX_CPU_SHARE, "proxy used {share:.2} of a core");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // Closing the flood gives the places back.
    drop(flood);
    assert!(poll_until(Duration::from_secs(5), || {
        let mut c = RawConn::connect(&addr);
        c.send(b"GET /again HTTP/1.1\r\nHost: flood.test\r\n\r\n")
            .is_ok()
            && c.read_response(Duration::from_secs(5))
                .is_ok_and(|r| r.status == 200)
    }));
}

#[test]
fn at_the_cap_with_nothing_idle_new_connections_are_refused_then_it_recovers() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let proxy = flood_proxy(&blue, &green, TEN_PLACES);
    let addr = proxy.http_addr();

    // Nine connections midway through a header and one with a request in
    // flight are not idle: nothing may be evicted. The request reaching the
    // backend also shows that the proxy has read the partial headers, which
    // were sent before it.
    let mut held: Vec<RawConn> = (0..9)
        .map(|i| {
            let mut c = RawConn::connect(&addr);
            c.send(format!("GET /held/{i} HTTP/1.1\r\n").as_bytes())
                .unwrap();
            c
        })
        .collect();
    let mut inflight = RawConn::connect(&addr);
    inflight
        .send(b"GET /inflight?hold=1 HTTP/1.1\r\nHost: flood.test\r\n\r\n")
        .unwrap();
    assert!(poll_until(Duration::from_secs(5), || blue
        .in_flight_for("/inflight")
        == 1));
    let mut refused = RawConn::connect(&addr);
    let _ = refused.send(b"GET /refused HTTP/1.1\r\nHost: flood.test\r\n\r\n");
    let data = refused
        .wait_closed(Duration::from_secs(5))
        .expect("the 11th connection is closed at once");
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert_eq!(blue.received("/refused"), 0);
    assert!(held.iter_mut().all(|c| !is_closed(c)));
    assert!(!is_closed(&mut inflight));

    // Holding the cap costs no busy loop.
    let share = cpu_share(&proxy);
    assert!(share < MAX_CPU_SHARE, "proxy used {share:.2} of a core");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // One of them finishes its request and goes idle: now a new client is
    // admitted by closing it.
    held[0].send(b"Host: flood.test\r\n\r\n").unwrap();
    let r = held[0]
        .read_response(Duration::from_secs(10))
        .expect("held[0] answered");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");
    let mut newcomer = RawConn::connect(&addr);
    served(&mut newcomer, "/newcomer");
    assert!(held[0].wait_closed(Duration::from_secs(5)).is_some());
    blue.release(1);
    let r = inflight
        .read_response(Duration::from_secs(10))
        .expect("the request in flight is answered");
    assert_eq!((r.status, r.body.as_str()), (200, "blue"), "{r:?}");

    drop(held);
    assert!(poll_until(Duration::from_secs(5), || {
        try_get(&agent(), &format!("{}/after", proxy.http_url()), None)
            .is_ok_and(|(code, _)| code == 200)
    }));
}

#[test]
fn exhausted_open_file_limit_does_not_spin_and_recovers() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    // A cap far beyond the open-file limit: accept() itself fails (EMFILE).
    let proxy = ProxyBuilder::new(simple_api(&blue, &green))
        .open_files(128)
        .server("max_connections = 100000\nheader_timeout = \"60s\"")
        .start();
    let addr = proxy.http_addr();
    // The log is written by a thread of its own: it may lag the start.
    assert!(poll_until(Duration::from_secs(5), || proxy
        .stderr_text()
        .contains("max_connections leaves too few open files")));

    // Connections beyond the limit wait in the listen backlog.
    let flood: Vec<RawConn> = (0..200).map(|_| RawConn::connect(&addr)).collect();
    let mut fds = 0;
    assert!(
        poll_until(Duration::from_secs(10), || {
            fds = proxy.open_fds();
            fds >= 120
        }),
        "the flood did not fill the open-file limit: {fds} open"
    );
    let share = cpu_share(&proxy);
    assert!(
        share < MAX_CPU_SHARE,
        "proxy used {share:.2} of a core at EMFILE"
    );
    // The accept loop waits half a second after each EMFILE
    // (`listener::ACCEPT_BACKOFF`): its error line comes about twice a
    // second, not in a loop.
    let accept_errors = proxy
        .stderr_text()
        .matches("cannot accept a connection")
        .count();
    assert!(
        accept_errors <= 2 * CPU_WINDOW.as_secs() as usize + 10,
        "{accept_errors} accept errors logged"
    );

    drop(flood);
    assert!(poll_until(Duration::from_secs(10), || {
        try_get(&agent(), &format!("{}/after", proxy.http_url()), None)
            .is_ok_and(|(code, _)| code == 200)
    }));
}

/// Once a flood is gone, the proxy is back to `baseline` open files (give
/// or take two) and serves.
fn assert_recovered(proxy: &Proxy, baseline: usize) {
    let mut fds = 0;
    assert!(
        poll_until(Duration::from_secs(10), || {
            fds = proxy.open_fds();
            fds <= baseline + 2
        }),
        "{fds} files open after the flood, {baseline} before"
    );
    assert_eq!(proxy.get("/after", None), (200, "blue".to_string()));
}
