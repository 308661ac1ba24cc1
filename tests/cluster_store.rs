//! `RedisState` against a real `redis-server` on loopback (issue 13 point
//! 1): round trip, compare and set, seeding once, the history stream, the
//! change channel, Redis gone, and the password.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{RedisOptions, RedisServer};
use futures_util::StreamExt;
use switchyard::cluster::{load_password, ClusterError, RedisState};
use switchyard::config::{Cluster, PasswordSource};
use switchyard::pools::Color;
use switchyard::store::{Actor, Event, SavedService, SavedState, Stamp, HISTORY_LIMIT};

/// Short, so the "Redis gone" cases finish quickly (300 ms).
const TIMEOUT: Duration = Duration::from_millis(300);

fn cluster(redis: &RedisServer, name: &str) -> Cluster {
    redis.cluster(name, TIMEOUT)
}

fn state(active: Color) -> SavedState {
    let mut services = BTreeMap::new();
    services.insert(
        "api".to_string(),
        SavedService {
            active,
            previous: None,
            weights: None,
            maintenance: false,
            rolled_back: false,
        },
    );
    SavedState {
        version: SavedState::VERSION,
        services,
        cluster: None,
    }
}

fn event(service: &str, to: Color) -> Event {
    Event {
        instance: None,
        time: "2026-11-30T05:00:00Z".into(),
        service: service.into(),
        from: Color::Blue,
        to,
        weights: None,
        maintenance: None,
        reason: "test".into(),
        actor: Actor::token("default"),
    }
}

#[tokio::test]
async fn state_round_trips_with_its_version() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "rt"), None).unwrap();
    assert_eq!(store.read().await.unwrap(), None);
    let v = store
        .seed(None, &state(Color::Green))
        .await
        .unwrap()
        .version;
    assert_eq!(v, 1);
    let read = store.read().await.unwrap().unwrap();
    assert_eq!(read.version, 1);
    assert_eq!(read.state, state(Color::Green));
    // Another cluster name on the same Redis sees nothing of it.
    let other = RedisState::new(&cluster(&redis, "other"), None).unwrap();
    assert_eq!(other.read().await.unwrap(), None);
}

#[tokio::test]
async fn of_two_writers_with_the_same_version_exactly_one_wins() {
    let redis = RedisServer::start();
    let a = Arc::new(RedisState::new(&cluster(&redis, "cas"), None).unwrap());
    let b = Arc::new(RedisState::new(&cluster(&redis, "cas"), None).unwrap());
    a.seed(None, &state(Color::Blue)).await.unwrap();
    for round in 0..20u64 {
        let held = a.read().await.unwrap().unwrap();
        let expected = held.version;
        let stamp = Stamp {
            version: held.version,
            epoch: held.epoch,
            local: false,
        };
        let (green, blue) = (state(Color::Green), state(Color::Blue));
        let (ra, rb) = tokio::join!(a.change(&stamp, &green), b.change(&stamp, &blue));
        let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} {rb:?}");
        let lost = if ra.is_ok() { rb } else { ra };
        match lost {
            Err(ClusterError::Conflict {
                expected: e,
                current,
            }) => {
                assert_eq!((e, current), (expected, expected + 1));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(a.read().await.unwrap().unwrap().version, expected + 1);
    }
}

#[tokio::test]
async fn two_instances_seeding_together_seed_once() {
    let redis = RedisServer::start();
    for round in 0..10 {
        let name = format!("seed{round}");
        let a = RedisState::new(&cluster(&redis, &name), None).unwrap();
        let b = RedisState::new(&cluster(&redis, &name), None).unwrap();
        let (blue, green) = (state(Color::Blue), state(Color::Green));
        let (ra, rb) = tokio::join!(a.seed(None, &blue), b.seed(None, &green));
        let (ra, rb) = (ra.unwrap().won, rb.unwrap().won);
        assert!(ra ^ rb, "round {round}: exactly one seeds ({ra}, {rb})");
        let held = a.read().await.unwrap().unwrap();
        assert_eq!(held.version, 1);
        let winner = if ra { Color::Blue } else { Color::Green };
        assert_eq!(held.state, state(winner));
        // A later seed changes nothing.
        assert!(!a.seed(None, &state(Color::Blue)).await.unwrap().won);
    }
    // Seeding after a change leaves the changed state alone.
    let c = RedisState::new(&cluster(&redis, "seeded"), None).unwrap();
    let held = c.read().await.unwrap();
    assert_eq!(held, None);
    let seeded = c.seed(None, &state(Color::Blue)).await.unwrap();
    let stamp = Stamp {
        version: seeded.version,
        epoch: seeded.epoch,
        local: false,
    };
    c.change(&stamp, &state(Color::Green)).await.unwrap();
    assert!(!c.seed(None, &state(Color::Blue)).await.unwrap().won);
    assert_eq!(c.read().await.unwrap().unwrap().state, state(Color::Green));
}

#[tokio::test]
async fn history_is_bounded_and_filtered_by_service() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "hist"), None).unwrap();
    let total = HISTORY_LIMIT as u64 * 3;
    for v in 0..total {
        let (svc, to) = if v % 2 == 0 {
            ("api", Color::Green)
        } else {
            ("web", Color::Blue)
        };
        let _ = v;
        store.append_history(&event(svc, to)).await.unwrap();
    }
    // Approximate trimming keeps at least the limit and far less than all.
    let mut len_cmd = redis::cmd("XLEN");
    len_cmd.arg("hist:history");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let len: u64 = len_cmd.query_async(&mut conn).await.unwrap();
    assert!(
        (HISTORY_LIMIT as u64..total).contains(&len),
        "stream length {len}"
    );

    let all = store.history(None, HISTORY_LIMIT).await.unwrap();
    assert_eq!(all.len(), HISTORY_LIMIT);
    let last = all.last().unwrap();
    assert_eq!((last.service.as_str(), last.to), ("web", Color::Blue));
    let api = store.history(Some("api"), 10).await.unwrap();
    assert!(
        !api.is_empty() && api.iter().all(|e| e.service == "api"),
        "{api:?}"
    );
    assert!(store.history(Some("nope"), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_subscriber_sees_a_change_promptly() {
    let redis = RedisServer::start();
    let writer = RedisState::new(&cluster(&redis, "pub"), None).unwrap();
    let reader = RedisState::new(&cluster(&redis, "pub"), None).unwrap();
    let mut changes = Box::pin(reader.subscribe().await.unwrap());
    let started = Instant::now();
    let v = writer
        .seed(None, &state(Color::Green))
        .await
        .unwrap()
        .version;
    // A generous deadline: the measured time is printed, not asserted.
    let seen = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("no message within 5 s");
    println!("change seen after {:?}", started.elapsed());
    assert_eq!(seen, Some(v));
    assert_eq!(reader.read().await.unwrap().unwrap().version, v);
}

#[tokio::test]
async fn redis_killed_fails_within_the_timeout_and_recovers() {
    let mut redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "down"), None).unwrap();
    store.seed(None, &state(Color::Blue)).await.unwrap();
    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let e = store.read().await.unwrap_err();
        let took = started.elapsed();
        common::redis::assert_gone_within(&e, &redis, took, TIMEOUT);
    }
    // Back, empty (no persistence): calls work again on a new connection.
    redis.restart();
    assert_eq!(store.read().await.unwrap(), None);
    assert_eq!(
        store
            .seed(None, &state(Color::Green))
            .await
            .unwrap()
            .version,
        1
    );
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_a_timeout() {
    // A listener that accepts and never answers: the call must give up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = Cluster {
        redis: format!("redis://127.0.0.1:{port}/0"),
        tls: false,
        name: "mute".into(),
        instance: "test".into(),
        password: None,
        ca_file: None,
        timeout: TIMEOUT,
        limit_timeout: TIMEOUT,
        lease: Duration::from_secs(10),
    };
    let store = RedisState::new(&c, None).unwrap();
    let started = Instant::now();
    let e = store.read().await.unwrap_err();
    assert!(matches!(e, ClusterError::Timeout { .. }), "{e:?}");
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(2));
    drop(listener);
}

#[tokio::test]
async fn password_auth_from_a_private_file_and_never_shown() {
    const SECRET: &str = "correct-horse-battery-staple";
    let redis = RedisServer::with(RedisOptions {
        password: Some(SECRET.into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis.pass");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = cluster(&redis, "auth");
    c.password = Some(PasswordSource::File(path.clone()));
    let password = load_password(&c, |_| None).unwrap();
    let store = RedisState::new(&c, password.as_ref()).unwrap();
    assert_eq!(
        store
            .seed(None, &state(Color::Green))
            .await
            .unwrap()
            .version,
        1
    );

    // No password, and a wrong one: an auth error that shows neither.
    let none = RedisState::new(&cluster(&redis, "auth"), None).unwrap();
    let e = none.read().await.unwrap_err();
    assert!(matches!(e, ClusterError::Auth { .. }), "{e:?}");
    std::fs::write(&path, "wrong-password-123\n").unwrap();
    let wrong = load_password(&c, |_| None).unwrap();
    let wrong_store = RedisState::new(&c, wrong.as_ref()).unwrap();
    let e2 = wrong_store.read().await.unwrap_err();
    assert!(matches!(e2, ClusterError::Auth { .. }), "{e2:?}");
    for text in [
        e.to_string(),
        format!("{e:?}"),
        e2.to_string(),
        format!("{e2:?}"),
    ] {
        assert!(
            !text.contains(SECRET) && !text.contains("wrong-password-123"),
            "{text}"
        );
    }
    assert!(!format!("{:?}", wrong.unwrap()).contains("wrong-password"));
}

#[test]
fn check_accepts_cluster_and_refuses_a_readable_password_file() {
    const SECRET: &str = "pw-in-a-file-9876";
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("redis.pass");
    std::fs::write(&pass, SECRET).unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let [http] = common::free_ports::<1>();
    let config = dir.path().join("switchyard.toml");
    let text = format!(
        "[server]\nstate_dir = \"{}\"\n\n[listen]\nhttp = \"127.0.0.1:{http}\"\n\n\
         [services.api]\nblue = [\"127.0.0.1:9\"]\ngreen = [\"127.0.0.1:9\"]\n\n\
         [[routes]]\npath = \"/\"\nservice = \"api\"\n\n\
         [cluster]\nredis = \"redis://127.0.0.1:1/0\"\nname = \"prod\"\npassword_file = \"{}\"\n",
        dir.path().join("state").display(),
        pass.display()
    );
    std::fs::write(&config, &text).unwrap();
    let check = common::run_check(&config, None);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A password file others can read is refused at its key.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = common::run_check(&config, None);
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        err.contains(":18:17:") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let check = common::run_check(&config, None);
    assert!(check.status.success(), "{check:?}");
    assert!(!String::from_utf8_lossy(&check.stdout).contains(SECRET));
}

#[tokio::test]
async fn a_persistent_redis_keeps_the_state_across_a_kill() {
    let mut redis = RedisServer::with(RedisOptions {
        persistent: true,
        ..Default::default()
    });
    let store = RedisState::new(&cluster(&redis, "aof"), None).unwrap();
    store.seed(None, &state(Color::Green)).await.unwrap();
    redis.restart();
    let held = store.read().await.unwrap().unwrap();
    assert_eq!((held.version, held.state), (1, state(Color::Green)));
}

#[tokio::test]
async fn rediss_with_a_private_ca_round_trips_and_an_unknown_ca_is_refused() {
    let redis = RedisServer::with(RedisOptions {
        tls: true,
        ..Default::default()
    });
    let mut c = cluster(&redis, "tls");
    assert!(c.redis.starts_with("rediss://"));
    c.tls = true;
    c.ca_file = Some(redis.ca_file());
    let store = RedisState::new(&c, None).unwrap();
    assert_eq!(
        store
            .seed(None, &state(Color::Green))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(store.read().await.unwrap().unwrap().version, 1);

    // The system's roots do not know the test CA: a clear error, no panic.
    c.ca_file = None;
    let untrusted = RedisState::new(&c, None).unwrap();
    let e = untrusted.read().await.unwrap_err();
    assert!(matches!(e, ClusterError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

#[test]
fn a_reload_that_adds_cluster_needs_a_restart_and_the_old_config_keeps_serving() {
    let blue = common::Upstream::start("blue");
    let green = common::Upstream::start("green");
    let proxy = common::ProxyBuilder::new(common::simple_api(&blue, &green)).start();
    let text = std::fs::read_to_string(proxy.config_path()).unwrap();
    std::fs::write(
        proxy.config_path(),
        format!("{text}\n[cluster]\nredis = \"redis://127.0.0.1:1/0\"\n"),
    )
    .unwrap();
    let (code, answer) = proxy.admin("POST", "/reload", None);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["needs_restart"],
        serde_json::json!(["cluster"]),
        "{answer}"
    );
    let (code, body) = common::get(&format!("{}/a", proxy.http_url()), None);
    assert_eq!((code, body.as_str()), (200, "blue"));
}

fn stamp(version: u64, epoch: &str, local: bool) -> Stamp {
    Stamp {
        version,
        epoch: epoch.into(),
        local,
    }
}

#[tokio::test]
async fn after_a_loss_the_newest_offered_state_wins_until_the_first_change() {
    let mut redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "loss"), None).unwrap();
    let first = store.seed(None, &state(Color::Blue)).await.unwrap();
    assert!(first.won);
    let e1 = first.epoch.clone();
    // Versions 2..=5 in the first epoch.
    for v in 1..5 {
        store
            .change(&stamp(v, &e1, false), &state(Color::Green))
            .await
            .unwrap();
    }
    // Redis restarted empty: an instance that served version 3 reconnects
    // first and seeds under a new epoch, keeping its own version.
    redis.restart();
    let old = store
        .seed(Some(&stamp(3, &e1, false)), &state(Color::Blue))
        .await
        .unwrap();
    assert!(old.won);
    assert_eq!(old.version, 3);
    assert_ne!(old.epoch, e1);
    // The instance that served version 5 comes next: newer, so it wins
    // (no change was made since the re-seed).
    let newest = store
        .seed(Some(&stamp(5, &e1, false)), &state(Color::Green))
        .await
        .unwrap();
    assert!(newest.won, "{newest:?}");
    let held = store.read().await.unwrap().unwrap();
    assert_eq!((held.version, &held.state), (5, &state(Color::Green)));
    assert_eq!(held.epoch, old.epoch, "the re-seed's epoch stays");
    // An older one can never win.
    assert!(
        !store
            .seed(Some(&stamp(4, &e1, false)), &state(Color::Blue))
            .await
            .unwrap()
            .won
    );
    // After the first change, settling is over: a state from before the
    // loss no longer replaces it, however high its version.
    let v = store
        .change(&stamp(5, &held.epoch, false), &state(Color::Blue))
        .await
        .unwrap();
    assert_eq!(v, 6);
    assert!(
        !store
            .seed(Some(&stamp(9, &e1, false)), &state(Color::Green))
            .await
            .unwrap()
            .won
    );
    // A change computed in the old epoch is refused even at the same
    // version number.
    let e = store
        .change(&stamp(6, &e1, false), &state(Color::Green))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClusterError::Conflict { current: 6, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_local_change_is_pushed_only_onto_the_version_it_was_made_from() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "local"), None).unwrap();
    let seeded = store.seed(None, &state(Color::Blue)).await.unwrap();
    let e = seeded.epoch;
    // Made locally from version 1 while Redis was unreachable: offered as 2.
    let pushed = store
        .seed(Some(&stamp(1, &e, true)), &state(Color::Green))
        .await
        .unwrap();
    assert!(pushed.won);
    assert_eq!(pushed.version, 2);
    // Another instance's local change from version 1 comes too late.
    let late = store
        .seed(Some(&stamp(1, &e, true)), &state(Color::Blue))
        .await
        .unwrap();
    assert!(!late.won);
    let held = store.read().await.unwrap().unwrap();
    assert_eq!((held.version, held.state), (2, state(Color::Green)));
    // A Redis restored from an older dump (same epoch, lower version)
    // takes an instance's newer state.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("local:version")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        store
            .seed(Some(&stamp(2, &e, false)), &state(Color::Green))
            .await
            .unwrap()
            .won
    );
    assert_eq!(store.read().await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn heartbeats_list_live_instances_and_drop_expired_ones() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "beat"), None).unwrap();
    let short = Duration::from_millis(300);
    store.heartbeat("edge-2", "{}", short).await.unwrap();
    let live = store
        .heartbeat("edge-1", "{\"version\":3}", Duration::from_secs(30))
        .await
        .unwrap();
    let names: Vec<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["edge-1", "edge-2"]);
    assert_eq!(live[0].1, "{\"version\":3}");
    // edge-2 stops beating: gone once its lease has run out.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = store
            .heartbeat("edge-1", "{}", Duration::from_secs(30))
            .await
            .unwrap();
        if live.len() == 1 {
            assert_eq!(live[0].0, "edge-1");
            break;
        }
        assert!(Instant::now() < deadline, "edge-2 never expired: {live:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.leave("edge-1").await.unwrap();
    let live = store.heartbeat("edge-3", "{}", short).await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
}

/// Runs one raw command on `redis` (a test writing garbage by hand).
fn raw(redis: &RedisServer, args: &[&str]) {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query::<redis::Value>(&mut conn).unwrap();
}

#[tokio::test]
async fn a_version_that_is_not_a_number_is_named_as_malformed() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "ver"), None).unwrap();
    let seeded = store.seed(None, &state(Color::Blue)).await.unwrap();
    raw(&redis, &["SET", "ver:version", "abc"]);
    let at = stamp(1, &seeded.epoch, false);
    let errors = [
        store.read().await.map(|_| ()).unwrap_err(),
        store.version().await.map(|_| ()).unwrap_err(),
        store
            .change(&at, &state(Color::Green))
            .await
            .map(|_| ())
            .unwrap_err(),
        store
            .seed(Some(&stamp(5, &seeded.epoch, false)), &state(Color::Green))
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for e in errors {
        assert!(
            matches!(e, ClusterError::Corrupt { .. })
                && e.to_string().contains("malformed ver:version"),
            "{e:?}"
        );
    }
}

/// One instance driven by hand: a switchboard on its own state dir,
/// with `[cluster]` (named `name`) on `redis` or without, and its sync.
struct Node {
    board: Arc<switchyard::switchboard::Switchboard>,
    link: Option<Arc<switchyard::cluster::Link>>,
    sync: Option<switchyard::cluster::sync::StateSync>,
}

fn node(redis: Option<&RedisServer>, name: &str, state_dir: &std::path::Path) -> Node {
    use switchyard::cluster::{sync::StateSync, Link};
    let mut text = "[services.api]\nblue = [\"127.0.0.1:9\"]\ngreen = [\"127.0.0.1:9\"]\n\n\
                    [[routes]]\npath = \"/\"\nservice = \"api\"\n"
        .to_string();
    if let Some(redis) = redis {
        text.push_str(&format!(
            "\n[cluster]\nredis = \"{}\"\nname = \"{name}\"\ntimeout = \"300ms\"\n",
            redis.url()
        ));
    }
    let config = switchyard::config::Config::parse(&state_dir.join("s.toml"), &text).unwrap();
    let link = config
        .cluster
        .as_ref()
        .map(|c| Arc::new(Link::new(c, None).unwrap()));
    let pages = switchyard::respond::Pages::builtin(config.server.retry_after);
    let settings =
        switchyard::settings::Settings::new(&config.server, pages).with_cluster(link.clone());
    let store = switchyard::store::FileStore::open(state_dir).unwrap();
    let board = Arc::new(
        switchyard::switchboard::Switchboard::with_settings(&config, settings, Box::new(store))
            .unwrap(),
    );
    let sync = link
        .as_ref()
        .map(|l| StateSync::new(l.clone(), board.clone()));
    Node { board, link, sync }
}

/// Another sync of `n` (its own is driven by hand).
fn node_sync(n: &Node) -> switchyard::cluster::sync::StateSync {
    switchyard::cluster::sync::StateSync::new(n.link.clone().unwrap(), n.board.clone())
}

impl Node {
    /// One sync round, on `rt` (whose threads keep driving the connection).
    fn converge(&self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.sync.as_ref().unwrap().converge()).unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn who() -> Actor {
    Actor::token("default")
}

#[test]
fn with_a_malformed_state_in_redis_a_switch_says_so_and_a_rollback_still_goes_through() {
    use switchyard::pools::{SwitchError, SwitchKind};
    let redis = RedisServer::start();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let a = node(Some(&redis), "bad", dir.path());
    a.converge(&rt);
    a.board
        .switch("api", Color::Green, SwitchKind::Switch, None, false, &who())
        .unwrap();
    // Someone writes garbage by hand, under a newer version.
    raw(
        &redis,
        &["MSET", "bad:version", "100", "bad:state", "not json"],
    );
    let e = a
        .board
        .switch("api", Color::Blue, SwitchKind::Switch, None, false, &who())
        .unwrap_err();
    // Not "this instance now serves redis's state": it cannot.
    assert!(matches!(e, SwitchError::ClusterDown(_)), "{e:?}");
    assert!(e.to_string().contains("malformed bad:state"), "{e}");
    assert_eq!(a.board.service("api").unwrap().active, Color::Green);
    // A rollback never waits for Redis: on this instance alone, marked.
    let back = a.board.rollback("api", None, false, &who()).unwrap();
    assert_eq!(back.active, Color::Blue);
    assert!(a.board.stamp().unwrap().local);
}

#[test]
fn a_switch_refused_for_an_unpushed_local_change_is_not_an_outage() {
    use switchyard::pools::{SwitchError, SwitchKind};
    let mut redis = RedisServer::start();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let a = node(Some(&redis), "pending", dir.path());
    a.converge(&rt);
    redis.kill();
    a.board
        .switch("api", Color::Green, SwitchKind::Switch, None, true, &who())
        .unwrap();
    let link = a.link.as_ref().unwrap();
    assert!(!link.is_up());
    let outages = link.outages();
    // Redis answers again (another user of the link saw it) before the
    // sync has pushed the forced change.
    redis.restart();
    link.mark_up(link.since());
    let e = a
        .board
        .switch("api", Color::Blue, SwitchKind::Switch, None, false, &who())
        .unwrap_err();
    assert!(matches!(e, SwitchError::ClusterDown(_)), "{e:?}");
    assert!(e.to_string().contains("not pushed yet"), "{e}");
    // No call was made: Redis is not declared down for it.
    assert!(link.is_up());
    assert_eq!(link.outages(), outages);
}

#[test]
fn an_instance_back_from_running_alone_is_not_overruled_by_a_stale_one() {
    use switchyard::pools::SwitchKind;
    let redis = RedisServer::start();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    // Both served version 8 of a cluster: green.
    let old = r#"{"version":1,"services":{"api":{"active":"green","previous":"blue"}},"cluster":{"version":8,"epoch":"e1"}}"#;
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("state.json"), old).unwrap();
    }
    // README "back to one instance": b stopped, a runs alone and changes.
    {
        let alone = node(None, "back", &a_dir);
        alone
            .board
            .switch("api", Color::Blue, SwitchKind::Switch, None, false, &who())
            .unwrap();
        alone.board.set_maintenance("api", true, &who()).unwrap();
    }
    // Several again, on an empty Redis: a first, then b with its old file.
    let a = node(Some(&redis), "back", &a_dir);
    a.converge(&rt);
    let b = node(Some(&redis), "back", &b_dir);
    b.converge(&rt);
    a.converge(&rt);
    for (name, n) in [("a", &a), ("b", &b)] {
        let s = n.board.service("api").unwrap();
        assert_eq!(
            (s.active, s.maintenance),
            (Color::Blue, true),
            "instance {name} serves the stale state"
        );
    }
}

/// The sync runs on a runtime of one worker (as Pingora runs background
/// services), and the shared Redis connection it makes is driven there.
/// Switches on two instances at once must never stall on it: none may
/// fail for a Redis that answers (before, one now and then waited the
/// whole timeout, was answered 503 and counted as an outage, while
/// Redis had taken it).
#[test]
fn switches_on_two_instances_at_once_never_wait_on_their_own_sync() {
    use switchyard::pools::{SwitchError, SwitchKind};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = ["a", "b"]
        .iter()
        .map(|n| node(Some(&redis), "stall", &dir.path().join(n)))
        .collect();
    let mut runtimes = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    for n in &nodes {
        let rt = runtime();
        let sync = Arc::new(node_sync(n));
        let stopped = stopped.clone();
        rt.spawn(async move { sync.run(stopped).await });
        runtimes.push(rt);
    }
    for n in &nodes {
        assert!(common::poll_until(Duration::from_secs(10), || n
            .board
            .stamp()
            .is_some()));
    }
    let outcomes: Vec<Vec<Result<(), String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                s.spawn(move || {
                    (0..60)
                        .map(|k| {
                            let to = if (k + i) % 2 == 0 {
                                Color::Green
                            } else {
                                Color::Blue
                            };
                            match n
                                .board
                                .switch("api", to, SwitchKind::Switch, None, false, &who())
                            {
                                Ok(_) | Err(SwitchError::ClusterConflict(_)) => Ok(()),
                                Err(e) => Err(e.to_string()),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    stop.send(true).unwrap();
    let failed: Vec<&String> = outcomes
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} switches failed: {failed:?}",
        failed.len()
    );
    for n in &nodes {
        assert_eq!(n.link.as_ref().unwrap().outages(), 0);
    }
}

#[tokio::test]
async fn liveness_keys_of_the_wrong_type_are_rebuilt_not_fatal() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "junk"), None).unwrap();
    raw(&redis, &["SET", "junk:instances", "garbage"]);
    raw(&redis, &["SET", "junk:instance-info", "garbage"]);
    let live = store
        .heartbeat("edge-1", "{\"version\":3}", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        live,
        [("edge-1".to_string(), "{\"version\":3}".to_string())]
    );
    // An entry that is not JSON is still listed, by name.
    raw(
        &redis,
        &["HSET", "junk:instance-info", "edge-2", "not json"],
    );
    raw(
        &redis,
        &["ZADD", "junk:instances", "99999999999999", "edge-2"],
    );
    let live = store
        .heartbeat("edge-1", "{}", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(live[1], ("edge-2".to_string(), "not json".to_string()));
}

#[tokio::test]
async fn a_malformed_history_entry_is_skipped_not_fatal() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "hjunk"), None).unwrap();
    store
        .append_history(&event("api", Color::Green))
        .await
        .unwrap();
    raw(&redis, &["XADD", "hjunk:history", "*", "foo", "bar"]);
    raw(
        &redis,
        &[
            "XADD",
            "hjunk:history",
            "*",
            "service",
            "api",
            "event",
            "{not json",
        ],
    );
    store
        .append_history(&event("api", Color::Blue))
        .await
        .unwrap();
    let all = store.history(None, 10).await.unwrap();
    let to: Vec<Color> = all.iter().map(|e| e.to).collect();
    assert_eq!(to, [Color::Green, Color::Blue]);
    assert_eq!(store.history(Some("api"), 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_stamp_from_another_cluster_never_beats_this_ones_state() {
    let redis = RedisServer::start();
    let store = RedisState::new(&cluster(&redis, "here"), None).unwrap();
    let seeded = store.seed(None, &state(Color::Blue)).await.unwrap();
    assert!(seeded.epoch.starts_with("here:"), "{seeded:?}");
    // A state_dir copied from cluster "there", at a high version: offered
    // as a state never in this cluster, so settling cannot take it.
    let foreign = stamp(131, "there:0123456789abcdef", false);
    let offer = store
        .seed(Some(&foreign), &state(Color::Green))
        .await
        .unwrap();
    assert!(!offer.won, "{offer:?}");
    let held = store.read().await.unwrap().unwrap();
    assert_eq!((held.version, held.state), (1, state(Color::Blue)));
    // Into an empty cluster it seeds as version 1, under this cluster's epoch.
    let empty = RedisState::new(&cluster(&redis, "fresh"), None).unwrap();
    let first = empty
        .seed(Some(&foreign), &state(Color::Green))
        .await
        .unwrap();
    assert!(first.won);
    assert_eq!(first.version, 1);
    assert!(first.epoch.starts_with("fresh:"));
}
