//! Maintenance mode: per service, through the admin API and `ctl`, answered
//! 503 with Retry-After (HTML or JSON), and kept across restarts.

mod common;

use serde_json::Value;

use common::*;

/// Services `api` (everything) and `web` (`/web`), blue active.
fn two_services(ab: &Upstream, ag: &Upstream, wb: &Upstream, wg: &Upstream) -> String {
    service("api", &[ab], &[ag], "blue")
        + &service("web", &[wb], &[wg], "blue")
        + &route(None, "/web", "web")
        + &route(None, "/", "api")
}

fn maintenance(proxy: &Proxy, service: &str, on: bool) -> (u16, Value) {
    proxy.admin(
        "POST",
        &format!("/services/{service}/maintenance"),
        Some(&format!(r#"{{"on": {on}}}"#)),
    )
}

fn has_error_message(v: &Value) -> bool {
    v["error"].as_str().is_some_and(|e| !e.trim().is_empty())
}

/// Asserts `path` is answered 503 + Retry-After by the proxy, as HTML by
/// default and as JSON when asked for. Returns the HTML body.
fn assert_in_maintenance(proxy: &Proxy, path: &str, retry_after: &str) -> String {
    let url = format!("{}{path}", proxy.http_url());
    let html = request("GET", &url, &[("Accept", "text/html")], None);
    assert_eq!(html.status, 503, "{html:?}");
    assert_eq!(html.header("retry-after"), Some(retry_after), "{html:?}");
    assert!(
        html.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{html:?}"
    );
    let json = request("GET", &url, &[("Accept", "application/json")], None);
    assert_eq!(json.status, 503, "{json:?}");
    assert_eq!(json.header("retry-after"), Some(retry_after), "{json:?}");
    assert!(
        json.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{json:?}"
    );
    assert!(has_error_message(&json.json()), "{json:?}");
    html.body
}

#[test]
fn maintenance_on_answers_503_and_off_restores_traffic() {
    let (ab, ag) = (Upstream::start("api-blue"), Upstream::start("api-green"));
    let (wb, wg) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    let proxy = ProxyBuilder::new(two_services(&ab, &ag, &wb, &wg))
        .server(r#"retry_after = "45s""#)
        .start();
    assert_eq!(proxy.service_status("api")["maintenance"], false);

    let (code, v) = maintenance(&proxy, "api", true);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["name"], "api", "{v}");
    assert_eq!(v["maintenance"], true, "{v}");
    assert_eq!(proxy.service_status("api")["maintenance"], true);
    assert_eq!(proxy.service_status("web")["maintenance"], false);

    let page = assert_in_maintenance(&proxy, "/in-maintenance", "45");
    assert!(!page.trim().is_empty());
    assert_eq!(ab.received("/in-maintenance"), 0);
    assert_eq!(ag.received("/in-maintenance"), 0);
    // Only the named service.
    assert_eq!(proxy.get("/web/x", None), (200, "web-blue".to_string()));

    let (code, v) = maintenance(&proxy, "api", false);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["maintenance"], false, "{v}");
    assert_eq!(proxy.get("/back", None), (200, "api-blue".to_string()));
    assert_eq!(proxy.service_status("api")["maintenance"], false);
}

#[test]
fn bad_maintenance_requests_are_refused_and_change_nothing() {
    let (ab, ag) = (Upstream::start("api-blue"), Upstream::start("api-green"));
    let (wb, wg) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    let proxy = ProxyBuilder::new(two_services(&ab, &ag, &wb, &wg)).start();
    let before = proxy.status();

    for (body, expected) in [
        (r#"{"on": "yes"}"#, 400),
        (r#"{"on": 1}"#, 400),
        (r#"{}"#, 400),
        (r#"{"on": true"#, 400),
    ] {
        let (code, v) = proxy.admin("POST", "/services/api/maintenance", Some(body));
        assert_eq!(code, expected, "body {body}: {v}");
        assert!(has_error_message(&v), "body {body}: {v}");
    }
    let (code, v) = proxy.admin(
        "POST",
        "/services/nope/maintenance",
        Some(r#"{"on": true}"#),
    );
    assert_eq!(code, 404, "{v}");
    assert!(has_error_message(&v), "{v}");

    assert_eq!(proxy.status(), before, "a refused request changed state");
    assert_eq!(proxy.get("/", None), (200, "api-blue".to_string()));
}

#[test]
fn ctl_maintenance_on_and_off() {
    let (ab, ag) = (Upstream::start("api-blue"), Upstream::start("api-green"));
    let (wb, wg) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    let proxy = ProxyBuilder::new(two_services(&ab, &ag, &wb, &wg)).start();

    let out = proxy.ctl(&["maintenance", "api", "on"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.service_status("api")["maintenance"], true);
    assert_eq!(proxy.get("/x", None).0, 503);

    let out = proxy.ctl(&["maintenance", "api", "off"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.service_status("api")["maintenance"], false);
    assert_eq!(proxy.get("/x", None), (200, "api-blue".to_string()));

    let out = proxy.ctl(&["maintenance", "nope", "on"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let out = proxy.ctl(&["maintenance", "api", "maybe"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(proxy.service_status("api")["maintenance"], false);
}

#[test]
fn maintenance_survives_a_restart() {
    let (ab, ag) = (Upstream::start("api-blue"), Upstream::start("api-green"));
    let (wb, wg) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    let mut proxy = ProxyBuilder::new(two_services(&ab, &ag, &wb, &wg)).start();
    proxy.switch("api", "green", Some("before maintenance"));
    let (code, v) = maintenance(&proxy, "api", true);
    assert_eq!(code, 200, "{v}");

    proxy.restart();
    let api = proxy.service_status("api");
    assert_eq!(api["maintenance"], true, "{api}");
    assert_eq!(api["active"], "green", "{api}");
    assert_eq!(proxy.get("/after-restart", None).0, 503);
    assert_eq!(proxy.service_status("web")["maintenance"], false);

    let (code, v) = maintenance(&proxy, "api", false);
    assert_eq!(code, 200, "{v}");
    proxy.restart();
    assert_eq!(proxy.service_status("api")["maintenance"], false);
    assert_eq!(proxy.get("/", None), (200, "api-green".to_string()));
}

#[test]
fn configured_maintenance_page_is_served_in_maintenance_mode() {
    let (ab, ag) = (Upstream::start("api-blue"), Upstream::start("api-green"));
    let (wb, wg) = (Upstream::start("web-blue"), Upstream::start("web-green"));
    let dir = tempfile::tempdir().unwrap();
    let page_path = dir.path().join("maintenance.html");
    let page = "<html><body>Planned maintenance. marker-51c2</body></html>\n";
    std::fs::write(&page_path, page).unwrap();
    let proxy = ProxyBuilder::new(two_services(&ab, &ag, &wb, &wg))
        .server(&format!(
            "maintenance_page = {}\nretry_after = \"2m\"",
            toml_str(page_path.to_str().unwrap())
        ))
        .start();

    let (code, v) = maintenance(&proxy, "api", true);
    assert_eq!(code, 200, "{v}");
    let body = assert_in_maintenance(&proxy, "/", "120");
    assert_eq!(body, page);
}
