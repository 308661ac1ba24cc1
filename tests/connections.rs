//! Connection floods: the caps on client connections (total and per client
//! address), eviction of idle kept-alive connections at the cap, and what
//! happens when the open-file limit itself runs out. Each test starts the
//! proxy with a low open-file limit so a few hundred connections reach it.

mod common;

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
    let proxy = flood_proxy(&blue, &green, "max_connections = 10");
    let addr = proxy.http_addr();

    // Ten connections that have not sent a request are not idle keep-alive
    // connections: nothing may be evicted.
    let mut held: Vec<RawConn> = (0..10).map(|_| RawConn::connect(&addr)).collect();
    let mut refused = RawConn::connect(&addr);
    let _ = refused.send(b"GET /refused HTTP/1.1\r\nHost: flood.test\r\n\r\n");
    let data = refused
        .wait_closed(Duration::from_secs(5))
        .expect("the 11th connection is closed at once");
    assert!(data.is_empty(), "{:?}", String::from_utf8_lossy(&data));
    assert_eq!(blue.received("/refused"), 0);
    assert!(held.iter_mut().all(|c| !is_closed(c)));

    // Holding the cap costs no busy loop.
    let share = cpu_share(&proxy);
    assert!(share < MAX_CPU_SHARE, "proxy used {share:.2} of a core");
    assert_eq!(proxy.error_lines(), Vec::<String>::new());

    // One of them finishes its request and goes idle: now a new client is
    // admitted by closing it.
    served(&mut held[0], "/first");
    let mut newcomer = RawConn::connect(&addr);
    served(&mut newcomer, "/newcomer");
    assert!(held[0].wait_closed(Duration::from_secs(5)).is_some());

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
    assert!(proxy
        .stderr_text()
        .contains("max_connections leaves too few open files"));

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
    // Pingora's accept loop waits a second after each EMFILE: its error
    // line comes about once a second, not in a loop.
    let accept_errors = proxy.stderr_text().matches("Accept() failed").count();
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
