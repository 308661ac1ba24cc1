//! Several switchyard instances sharing their state through one real Redis
//! (issue 13): a switch made on one reaches every instance's snapshot
//! within the bound while each serves traffic; Redis going away leaves
//! every instance serving and refuses unforced switches; Redis coming
//! back (empty) is re-seeded from the newest state and every instance
//! converges on it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{poll_until, Proxy, ProxyBuilder, Upstream};
use serde_json::Value;

/// The issue's bound for a change to reach every instance (100 ms).
const BOUND: Duration = Duration::from_millis(100);

/// Three instances of one cluster (`name`) on `redis`, serving `api`
/// (blue active) from the same two upstreams.
fn three(redis: &RedisServer, name: &str, blue: &Upstream, green: &Upstream) -> Vec<Proxy> {
    (1..=3)
        .map(|i| {
            let body = format!(
                "{}\n[cluster]\nredis = \"{}\"\nname = \"{name}\"\ninstance = \"edge-{i}\"\n\
                 timeout = \"300ms\"\nlease = \"3s\"\n",
                common::simple_api(blue, green),
                redis.url()
            );
            ProxyBuilder::new(body).start()
        })
        .collect()
}

/// One answer: the instance's index, when the request started, status, body.
type Seen = (usize, Instant, u16, String);

/// One client per instance sending `GET /` back to back, recording when
/// each request started and what it got (status, body: the color), until
/// stopped or 20 s.
struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(proxies: &[Proxy]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (stop, seen) = (stop.clone(), seen.clone());
                let url = format!("{}/", p.http_url());
                std::thread::spawn(move || {
                    let agent = common::agent();
                    let end = Instant::now() + Duration::from_secs(20);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                        let started = Instant::now();
                        let (code, body) = common::try_get(&agent, &url, None)
                            .unwrap_or((0, "transport error".into()));
                        seen.lock().unwrap().push((i, started, code, body));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            seen,
            threads,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

fn cluster_status(p: &Proxy) -> Value {
    p.status()["cluster"].clone()
}

fn wait_all(proxies: &[Proxy], what: &str, f: impl Fn(&Proxy) -> bool) {
    assert!(
        poll_until(Duration::from_secs(10), || proxies.iter().all(&f)),
        "{what}: {:?}",
        proxies.iter().map(cluster_status).collect::<Vec<_>>()
    );
}

#[test]
fn a_switch_on_one_instance_reaches_all_three_within_the_bound_under_load() {
    let redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let proxies = three(&redis, "switch", &blue, &green);
    wait_all(&proxies, "three live instances", |p| {
        cluster_status(p)["instances"].as_array().map(Vec::len) == Some(3)
    });

    let mut propagation = Vec::new();
    for (round, to) in ["green", "blue", "green"].into_iter().enumerate() {
        let traffic = Traffic::start(&proxies);
        assert!(poll_until(Duration::from_secs(5), || traffic.count() > 30));
        let via = &proxies[round % 3];
        let asked = Instant::now();
        let (code, answer) = via.admin(
            "POST",
            "/services/api/switch",
            Some(&format!(r#"{{"to":"{to}"}}"#)),
        );
        let answered = Instant::now();
        assert_eq!(code, 200, "{answer}");
        // Keep the load on past the bound, then look at every answer.
        let after = traffic.count();
        assert!(poll_until(Duration::from_secs(5), || traffic.count() > after + 60));
        let seen = traffic.stop();
        let failed: Vec<_> = seen.iter().filter(|s| s.2 != 200).collect();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        let old = if to == "green" { "blue" } else { "green" };
        let late: Vec<_> = seen
            .iter()
            .filter(|s| s.1 >= answered + BOUND && s.3 == old)
            .collect();
        assert!(
            late.is_empty(),
            "answers from {old} more than {BOUND:?} after the switch: {late:?}"
        );
        // When each instance first answered from the new color.
        for i in 0..3 {
            let first = seen
                .iter()
                .filter(|s| s.0 == i && s.1 >= asked && s.3 == to)
                .map(|s| s.1)
                .min()
                .expect("every instance answered from the new color");
            propagation.push(first.saturating_duration_since(asked));
        }
        let versions: Vec<Value> = proxies
            .iter()
            .map(|p| cluster_status(p)["version"].clone())
            .collect();
        assert!(versions.iter().all(|v| v == &versions[0]), "{versions:?}");
    }
    propagation.sort();
    println!(
        "switch propagation from the admin request to each instance's first answer from the new color: p50 {:?}, max {:?}",
        propagation[propagation.len() / 2],
        propagation.last().unwrap()
    );
    // Every instance's history is the cluster's: the three switches, each
    // naming the instance it was made through.
    let (_, history) = proxies[2].admin("GET", "/history", None);
    let events = history["events"].as_array().unwrap();
    let through: Vec<&str> = events
        .iter()
        .map(|e| e["instance"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(through, ["edge-1", "edge-2", "edge-3"], "{history}");
}

#[test]
fn status_shows_each_live_instance_and_the_version_it_serves() {
    let redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let mut proxies = three(&redis, "status", &blue, &green);
    wait_all(&proxies, "three live instances", |p| {
        cluster_status(p)["instances"].as_array().map(Vec::len) == Some(3)
    });
    let c = cluster_status(&proxies[0]);
    assert_eq!(c["redis"], redis.url());
    assert_eq!(c["reachable"], true);
    assert_eq!(c["instance"], "edge-1");
    let names: Vec<&str> = c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["instance"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["edge-1", "edge-2", "edge-3"]);
    assert!(c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["version"] == c["version"]));
    let ctl = common::run_ctl(
        &proxies[1].admin_url(),
        Some(proxies[1].token()),
        &["status"],
    );
    let out = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{}", common::describe(&ctl));
    assert!(
        out.contains("(reachable)")
            && out.contains("this instance: edge-2")
            && out.contains("live: edge-3"),
        "{out}"
    );
    // An instance that stops cleanly leaves at once.
    let mut last = proxies.pop().unwrap();
    last.sigterm();
    assert!(last.wait_exit(Duration::from_secs(10)).is_some());
    wait_all(&proxies, "edge-3 gone", |p| {
        cluster_status(p)["instances"].as_array().map(Vec::len) == Some(2)
    });
}

#[test]
fn with_redis_down_instances_keep_serving_refuse_switches_and_converge_when_it_returns() {
    let mut redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let proxies = three(&redis, "down", &blue, &green);
    wait_all(&proxies, "three live instances", |p| {
        cluster_status(p)["instances"].as_array().map(Vec::len) == Some(3)
    });

    let traffic = Traffic::start(&proxies);
    assert!(poll_until(Duration::from_secs(5), || traffic.count() > 30));
    redis.kill();
    wait_all(&proxies, "every instance sees redis gone", |p| {
        cluster_status(p)["reachable"] == false
    });

    // An unforced switch is refused with the documented error, on any
    // instance, through the API and through ctl.
    let (code, answer) =
        proxies[1].admin("POST", "/services/api/switch", Some(r#"{"to":"green"}"#));
    assert_eq!(code, 503, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused so that the instances do not diverge"),
        "{answer}"
    );
    let ctl = common::run_ctl(
        &proxies[2].admin_url(),
        Some(proxies[2].token()),
        &["switch", "api", "green"],
    );
    assert!(!ctl.status.success());
    assert!(
        String::from_utf8_lossy(&ctl.stderr).contains("do not diverge"),
        "{}",
        common::describe(&ctl)
    );
    for p in &proxies {
        assert_eq!(p.active("api"), "blue");
    }

    // Forced on one instance: that instance alone, marked as local.
    let (code, answer) = proxies[0].admin(
        "POST",
        "/services/api/switch",
        Some(r#"{"to":"green","force":true}"#),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(cluster_status(&proxies[0])["local_change"], true);
    assert_eq!(proxies[1].active("api"), "blue");

    let count = traffic.count();
    assert!(poll_until(Duration::from_secs(5), || traffic.count() > count + 30));
    // Redis returns empty (no persistence): re-seeded from the newest state
    // (the forced change), and every instance converges on it.
    redis.restart();
    wait_all(&proxies, "all on green, one version", |p| {
        let c = cluster_status(p);
        p.active("api") == "green"
            && c["reachable"] == true
            && c["local_change"] == false
            && c["version"] == cluster_status(&proxies[0])["version"]
    });
    let seen = traffic.stop();
    let failed: Vec<_> = seen.iter().filter(|s| s.2 != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // The forced switch made while Redis was down reaches the cluster's
    // history (seen through another instance).
    let forced = |p: &Proxy| {
        let (_, history) = p.admin("GET", "/history", None);
        history["events"].as_array().is_some_and(|events| {
            events
                .iter()
                .any(|e| e["instance"] == "edge-1" && e["to"] == "green")
        })
    };
    assert!(
        poll_until(Duration::from_secs(10), || forced(&proxies[1])),
        "{}",
        proxies[1].admin("GET", "/history", None).1
    );

    // And switches work again.
    let (code, answer) = proxies[2].admin("POST", "/services/api/switch", Some(r#"{"to":"blue"}"#));
    assert_eq!(code, 200, "{answer}");
    wait_all(&proxies, "all back on blue", |p| p.active("api") == "blue");
}

#[test]
fn a_joining_instance_seeds_an_empty_redis_from_its_saved_state_and_others_follow() {
    let redis = RedisServer::start();
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let body = |i: usize| {
        format!(
            "{}\n[cluster]\nredis = \"{}\"\nname = \"join\"\ninstance = \"edge-{i}\"\n",
            common::simple_api(&blue, &green),
            redis.url()
        )
    };
    // A single instance that ran on its own had switched to green.
    let saved = r#"{"version":1,"services":{"api":{"active":"green","previous":"blue"}}}"#;
    let first = ProxyBuilder::new(body(1)).state_json(saved).start();
    assert_eq!(first.active("api"), "green");
    assert_eq!(cluster_status(&first)["version"], 1);
    // A second one whose saved state says blue joins: the cluster wins.
    let stale = r#"{"version":1,"services":{"api":{"active":"blue"}}}"#;
    let second = ProxyBuilder::new(body(2)).state_json(stale).start();
    assert_eq!(second.active("api"), "green");
    let (code, body) = common::get(&format!("{}/", second.http_url()), None);
    assert_eq!((code, body.as_str()), (200, "green"));
}

/// Two switchboards on one Redis, driven by hand (no sync loop), so the
/// race is exact: the one that changes second gets 409 and then serves
/// the first one's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_instances_changing_at_once_the_later_gets_a_conflict_and_the_winners_state() {
    use switchyard::cluster::sync::StateSync;
    use switchyard::cluster::Link;
    use switchyard::pools::{Color, SwitchError, SwitchKind, Weights};
    use switchyard::store::{Actor, FileStore};
    use switchyard::switchboard::Switchboard;

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[services.api]\nblue = [\"127.0.0.1:9\"]\ngreen = [\"127.0.0.1:9\"]\n\n\
         [[routes]]\npath = \"/\"\nservice = \"api\"\n\n\
         [cluster]\nredis = \"{}\"\nname = \"race\"\ntimeout = \"300ms\"\n",
        redis.url()
    );
    let config = switchyard::config::Config::parse(&dir.path().join("s.toml"), &text).unwrap();
    let board = |name: &str| {
        let link = Arc::new(Link::new(config.cluster.as_ref().unwrap(), None).unwrap());
        let pages = switchyard::respond::Pages::builtin(config.server.retry_after);
        let settings = switchyard::settings::Settings::new(&config.server, pages)
            .with_cluster(Some(link.clone()));
        let store = FileStore::open(&dir.path().join(name)).unwrap();
        let board =
            Arc::new(Switchboard::with_settings(&config, settings, Box::new(store)).unwrap());
        (board.clone(), StateSync::new(link, board))
    };
    let ((a, sync_a), (b, sync_b)) = (board("a"), board("b"));
    sync_a.converge().await.unwrap();
    sync_b.converge().await.unwrap();
    let who = Actor::token("default");

    // Board calls block (they wait for Redis): off the async threads.
    let (a2, w) = (a.clone(), who.clone());
    tokio::task::spawn_blocking(move || {
        a2.switch("api", Color::Green, SwitchKind::Switch, None, false, &w)
    })
    .await
    .unwrap()
    .unwrap();
    let (b2, w) = (b.clone(), who.clone());
    let split = Weights::new(50, 50).unwrap();
    let lost = tokio::task::spawn_blocking(move || {
        b2.set_weights("api", split, SwitchKind::Switch, None, false, &w)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(lost, SwitchError::ClusterConflict(_)), "{lost:?}");
    assert!(lost.to_string().contains("redis holds 2"), "{lost}");
    // The loser now serves the winner's state, and can change it.
    assert_eq!(b.service("api").unwrap().active, Color::Green);
    let (b2, w) = (b.clone(), who.clone());
    tokio::task::spawn_blocking(move || {
        b2.set_weights("api", split, SwitchKind::Switch, None, false, &w)
    })
    .await
    .unwrap()
    .unwrap();
    sync_a.converge().await.unwrap();
    assert_eq!(a.service("api").unwrap().weights, split);
    assert_eq!(a.stamp().unwrap().version, 3);
    assert_eq!(b.stamp().unwrap().version, 3);
}

#[test]
fn with_a_wrong_password_status_and_a_refused_switch_say_why() {
    use common::redis::RedisOptions;
    use std::os::unix::fs::PermissionsExt;
    let redis = RedisServer::with(RedisOptions {
        password: Some("right-password".into()),
        ..Default::default()
    });
    let (blue, green) = (Upstream::start("blue"), Upstream::start("green"));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis.pass");
    std::fs::write(&pw, "wrong-password\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let body = format!(
        "{}\n[cluster]\nredis = \"{}\"\nname = \"pw\"\npassword_file = \"{}\"\ntimeout = \"300ms\"\n",
        common::simple_api(&blue, &green),
        redis.url(),
        pw.display()
    );
    let p = ProxyBuilder::new(body).start();
    let ctl = common::run_ctl(&p.admin_url(), Some(p.token()), &["status"]);
    let out = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{}", common::describe(&ctl));
    assert!(
        out.contains("UNREACHABLE")
            && out.contains("refused the password")
            && out.contains("state version none"),
        "{out}"
    );
    let (code, answer) = p.admin("POST", "/services/api/switch", Some(r#"{"to":"green"}"#));
    assert_eq!(code, 503, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused the password"), "{answer}");
    assert!(!out.contains("wrong-password") && !error.contains("wrong-password"));
}

/// A TCP relay to Redis that can swallow the next answer Redis sends
/// (the command still runs there): an answer lost on the way back.
struct LossyRelay {
    port: u16,
    swallow: Arc<AtomicBool>,
}

impl LossyRelay {
    fn start(redis_port: u16) -> LossyRelay {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let swallow = Arc::new(AtomicBool::new(false));
        let armed = swallow.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut c_in, &mut s_out));
                let (mut s_in, mut c_out, armed) = (server, client, armed.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = s_in.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if armed.swap(false, Ordering::SeqCst) {
                            continue;
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LossyRelay { port, swallow }
    }
}

/// A change Redis took but whose answer was lost is in force here too, not
/// reported as refused while every other instance follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_answer_was_lost_is_found_taken_not_refused() {
    use switchyard::cluster::sync::StateSync;
    use switchyard::cluster::Link;
    use switchyard::pools::{Color, SwitchKind};
    use switchyard::store::{Actor, FileStore};
    use switchyard::switchboard::Switchboard;

    let redis = RedisServer::start();
    let port: u16 = redis
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let relay = LossyRelay::start(port);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[services.api]\nblue = [\"127.0.0.1:9\"]\ngreen = [\"127.0.0.1:9\"]\n\n\
         [[routes]]\npath = \"/\"\nservice = \"api\"\n\n\
         [cluster]\nredis = \"redis://127.0.0.1:{}/0\"\nname = \"lossy\"\ntimeout = \"300ms\"\n",
        relay.port
    );
    let config = switchyard::config::Config::parse(&dir.path().join("s.toml"), &text).unwrap();
    let link = Arc::new(Link::new(config.cluster.as_ref().unwrap(), None).unwrap());
    let pages = switchyard::respond::Pages::builtin(config.server.retry_after);
    let settings =
        switchyard::settings::Settings::new(&config.server, pages).with_cluster(Some(link.clone()));
    let store = FileStore::open(&dir.path().join("a")).unwrap();
    let board = Arc::new(Switchboard::with_settings(&config, settings, Box::new(store)).unwrap());
    StateSync::new(link, board.clone())
        .converge()
        .await
        .unwrap();
    assert_eq!(board.stamp().unwrap().version, 1);
    let switch = |to: Color| {
        let b = board.clone();
        tokio::task::spawn_blocking(move || {
            b.switch(
                "api",
                to,
                SwitchKind::Switch,
                None,
                false,
                &Actor::token("default"),
            )
        })
    };
    // Once with every answer, so Redis knows the script (an unknown one
    // costs a NOSCRIPT round trip first).
    switch(Color::Green).await.unwrap().unwrap();
    relay.swallow.store(true, Ordering::SeqCst);
    let switched = switch(Color::Blue).await.unwrap();
    assert!(
        !relay.swallow.load(Ordering::SeqCst),
        "an answer was swallowed"
    );
    let after = switched.expect("Redis took the change: it is not refused");
    assert_eq!(after.active, Color::Blue);
    assert_eq!(board.stamp().unwrap().version, 3);
}
