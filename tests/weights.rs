//! Weighted splits between a service's colors (canaries): the split itself,
//! its persistence and history, stickiness by cookie and by client address,
//! and upgraded connections staying on the color they opened on.

mod common;

use std::collections::HashMap;

use common::*;

/// The color an answer came from (each test upstream answers its label).
fn color_of(reply: &Reply) -> String {
    reply
        .header("x-upstream")
        .unwrap_or_else(|| panic!("no x-upstream in {:?}", reply.headers))
        .to_string()
}

fn weights(p: &Proxy, blue: u64, green: u64) {
    let out = p.ctl(&[
        "weights",
        "api",
        &blue.to_string(),
        &green.to_string(),
        "--reason",
        "canary",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
}

fn sticky_api(blue: &Upstream, green: &Upstream, sticky: &str) -> String {
    let mut s = service_with(
        "api",
        &[blue],
        &[green],
        "blue",
        &format!("sticky = {}", toml_str(sticky)),
    );
    s.push_str(&route_with("/", "api", "websocket = true"));
    s
}

#[test]
fn a_canary_gets_its_share_and_zero_hundred_is_a_switch() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut p = ProxyBuilder::new(simple_api(&blue, &green)).start();
    weights(&p, 90, 10);
    let s = p.service_status("api");
    assert_eq!(
        s["weights"],
        serde_json::json!({"blue": 90, "green": 10}),
        "{s}"
    );
    assert_eq!(s["active"], "blue", "{s}");

    // A few thousand requests over several connections: the split holds.
    let url = format!("{}/canary", p.http_url());
    let counts: Vec<usize> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let agent = agent();
                    (0..500)
                        .filter(|_| try_get(&agent, &url, None).unwrap().1 == "green")
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let green_share = counts.iter().sum::<usize>() as f64 / 2000.0;
    assert!(
        (0.08..=0.12).contains(&green_share),
        "green got {:.1} % of 2000 requests at 90/10",
        green_share * 100.0
    );

    // Kept across a restart, like the active color.
    p.restart();
    assert_eq!(p.service_status("api")["weights"]["green"], 10);

    // All of it: green becomes the active color, blue the previous.
    weights(&p, 0, 100);
    let s = p.service_status("api");
    assert_eq!(
        (s["active"].as_str(), s["previous"].as_str()),
        (Some("green"), Some("blue")),
        "{s}"
    );
    assert!((0..20).all(|_| p.get("/x", None).1 == "green"));

    // The history shows the step with its split, and who made it.
    let out = p.ctl(&["history", "api"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("blue -> blue  (90/10)"), "{text}");
    assert!(text.contains("canary"), "{text}");
    let status = String::from_utf8_lossy(&p.ctl(&["status"]).stdout).into_owned();
    assert!(status.contains("green 100 %"), "{status}");
}

#[test]
fn a_rollback_during_a_canary_returns_everything_to_the_active_color() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(simple_api(&blue, &green)).start();
    weights(&p, 50, 50);
    // A switch to the active color during a split ends the split.
    let out = p.ctl(&["switch", "api", "blue"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("now blue"), "{text}");
    assert_eq!(p.service_status("api")["weights"]["blue"], 100);
    weights(&p, 50, 50);
    let out = p.ctl(&["rollback", "api", "--reason", "errors"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "api: rolled back: every new request goes to blue"
    );
    let s = p.service_status("api");
    assert_eq!(
        s["weights"],
        serde_json::json!({"blue": 100, "green": 0}),
        "{s}"
    );
    assert!((0..20).all(|_| p.get("/x", None).1 == "blue"));
}

#[test]
fn bad_weights_are_refused_and_change_nothing() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let mut body = service_with("api", &[&blue], &[&green], "blue", &fast_health());
    body.push_str(&route(None, "/", "api"));
    let p = ProxyBuilder::new(body).start();
    p.wait_health(
        "api",
        &[(&blue, "healthy"), (&green, "healthy")],
        std::time::Duration::from_secs(10),
    );
    for (body, code) in [
        (r#"{"blue": 90, "green": 9}"#, 400),
        (r#"{"blue": 200, "green": -100}"#, 400),
        (r#"{"blue": "90", "green": 10}"#, 400),
        (r#"{"blue": 90}"#, 400),
        (r#"{"blue": 90, "green": 10, "extra": 1}"#, 400),
        ("not json", 400),
    ] {
        let (got, v) = p.admin("PUT", "/services/api/weights", Some(body));
        assert_eq!(got, code, "{body}: {v}");
        assert!(v["error"].is_string(), "{body}: {v}");
    }
    let (got, v) = p.admin(
        "PUT",
        "/services/nope/weights",
        Some(r#"{"blue": 90, "green": 10}"#),
    );
    assert_eq!(got, 404, "{v}");
    let (got, _) = p.admin(
        "POST",
        "/services/api/weights",
        Some(r#"{"blue": 90, "green": 10}"#),
    );
    assert_eq!(got, 405);
    let out = p.ctl(&["weights", "api", "90", "20"]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("adding up to 100"),
        "{}",
        describe(&out)
    );

    // A color with no healthy backend gets no share, unless forced.
    green.set_healthy(false);
    p.wait_health(
        "api",
        &[(&green, "unhealthy")],
        std::time::Duration::from_secs(10),
    );
    let (got, v) = p.admin(
        "PUT",
        "/services/api/weights",
        Some(r#"{"blue": 90, "green": 10}"#),
    );
    assert_eq!(got, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("healthy"), "{v}");
    assert_eq!(p.service_status("api")["weights"]["green"], 0);
    let (got, v) = p.admin(
        "PUT",
        "/services/api/weights",
        Some(r#"{"blue": 90, "green": 10, "force": true}"#),
    );
    assert_eq!(got, 200, "{v}");
    assert_eq!(v["weights"]["green"], 10, "{v}");
}

#[test]
fn a_cookie_keeps_a_client_on_its_color_as_the_canary_grows() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(sticky_api(&blue, &green, "cookie")).start();
    let url = format!("{}/page", p.http_url());
    // No split, no cookie: nothing to be sticky about.
    let r = request("GET", &url, &[], None);
    assert_eq!(r.header("set-cookie"), None);

    weights(&p, 50, 50);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    for _ in 0..100 {
        let first = request("GET", &url, &[], None);
        let cookie = first
            .header("set-cookie")
            .expect("a new client gets its bucket")
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("Path=/"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        let bucket: u8 = pair
            .trim_start_matches("switchyard-bucket=")
            .parse()
            .unwrap();
        let color = color_of(&first);
        assert_eq!(
            color == "green",
            bucket < 50,
            "bucket {bucket} went {color}"
        );
        // The same client stays put, and is not given a new cookie.
        for _ in 0..5 {
            let again = request("GET", &url, &[("cookie", &format!("a=b; {pair}"))], None);
            assert_eq!(color_of(&again), color, "{pair}");
            assert_eq!(again.header("set-cookie"), None);
        }
        *seen.entry(color.clone()).or_default() += 1;
        clients.push((pair, color));
    }
    assert!(seen.get("blue").is_some_and(|&n| n >= 25), "{seen:?}");
    assert!(seen.get("green").is_some_and(|&n| n >= 25), "{seen:?}");

    // Green grows: nobody on green goes back to blue.
    weights(&p, 20, 80);
    for (pair, color) in clients.iter().filter(|(_, c)| c == "green") {
        let r = request("GET", &url, &[("cookie", pair.as_str())], None);
        assert_eq!(&color_of(&r), color, "{pair}");
    }
    // A forged or broken cookie is replaced, not trusted.
    let r = request("GET", &url, &[("cookie", "switchyard-bucket=250")], None);
    assert!(r.header("set-cookie").is_some());
}

#[test]
fn a_client_address_keeps_its_color_without_cookies() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(sticky_api(&blue, &green, "client_ip"))
        .server(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .start();
    weights(&p, 50, 50);
    let url = format!("{}/page", p.http_url());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for n in 0..100u32 {
        let ip = format!("198.51.{}.{}", n / 250, n % 250 + 1);
        let colors: Vec<String> = (0..5)
            .map(|_| {
                let r = request("GET", &url, &[("x-forwarded-for", &ip)], None);
                assert_eq!(r.header("set-cookie"), None);
                color_of(&r)
            })
            .collect();
        assert!(
            colors.iter().all(|c| *c == colors[0]),
            "{ip} bounced: {colors:?}"
        );
        *seen.entry(colors[0].clone()).or_default() += 1;
    }
    assert!(seen.get("blue").is_some_and(|&n| n >= 25), "{seen:?}");
    assert!(seen.get("green").is_some_and(|&n| n >= 25), "{seen:?}");
}

#[test]
fn a_websocket_stays_on_the_color_it_opened_on() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let p = ProxyBuilder::new(sticky_api(&blue, &green, "cookie")).start();
    let mut ws = ws_connect(&p.http_addr(), "/ws").unwrap();
    assert_eq!(ws_echo(&mut ws, "a").unwrap(), "blue:a");
    weights(&p, 0, 100);
    weights(&p, 50, 50);
    assert_eq!(ws_echo(&mut ws, "b").unwrap(), "blue:b");
    assert_eq!(p.service_status("api")["upgraded"]["blue"], 1);
    weights(&p, 0, 100);
    let mut fresh = ws_connect(&p.http_addr(), "/ws").unwrap();
    assert_eq!(ws_echo(&mut fresh, "c").unwrap(), "green:c");
    assert_eq!(ws_echo(&mut ws, "d").unwrap(), "blue:d");
    ws_close(ws);
    ws_close(fresh);
}
