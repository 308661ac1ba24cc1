//! The shipped observability files, checked as Prometheus and Grafana would
//! read them: `conf/prometheus/alerts.yml` (rules), its unit tests
//! `alerts_test.yml`, the scrape example `prometheus.yml` and the dashboard
//! `conf/grafana/switchyard.json`.
//!
//! - `promtool` (Debian package `prometheus`, installed by `.ci/setup`)
//!   checks the rules and the scrape config and runs the rule unit tests. A
//!   missing `promtool` fails the tests with a message; they never skip.
//! - Every `switchyard_*` name the rules and the dashboard use is one of the
//!   metrics contract (README: Metrics), and a running switchyard exports
//!   each of them from start-up, on its `[listen] metrics` port.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The metric families of the names contract (issue 11), which the rules and
/// the dashboard may use (besides Prometheus's own `up`).
const CONTRACT: &[&str] = &[
    "switchyard_build_info",
    "switchyard_config_reloads_total",
    "switchyard_requests_total",
    "switchyard_request_duration_seconds",
    "switchyard_upstream_errors_total",
    "switchyard_received_bytes_total",
    "switchyard_sent_bytes_total",
    "switchyard_active_color",
    "switchyard_switches_total",
    "switchyard_maintenance",
    "switchyard_backend_up",
    "switchyard_in_flight_requests",
    "switchyard_upgraded_connections",
    "switchyard_refusals_total",
    "switchyard_limit_admissions_total",
    "switchyard_limit_refusals_total",
    "switchyard_concurrency_in_flight",
    "switchyard_concurrency_queue_depth",
    "switchyard_tokens_total",
    "switchyard_service_tokens_total",
    "switchyard_certificate_not_after_seconds",
    "switchyard_certificate_renewal_failures_total",
    "switchyard_cluster_redis_up",
    "switchyard_cluster_state_version",
    "switchyard_cluster_instances",
    "switchyard_cluster_redis_outages_total",
];

/// The histograms of the contract: a query names their `_bucket`, `_sum`
/// and `_count` series, which belong to the family.
const HISTOGRAMS: &[&str] = &["switchyard_request_duration_seconds"];

/// The job label every rule and the scrape example use.
const JOB: &str = "switchyard";

/// How long the metrics listener of a started switchyard may take to answer.
const METRICS_DEADLINE: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn prometheus_dir() -> PathBuf {
    repo().join("conf/prometheus")
}

fn dashboard_path() -> PathBuf {
    repo().join("conf/grafana/switchyard.json")
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

/// `promtool` on `PATH`; panics, naming `.ci/setup`, when there is none.
fn promtool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found on PATH: run .ci/setup (it installs the Debian package \
                 `prometheus`, which ships promtool); these tests never skip without it"
            )
        })
}

/// Runs `promtool ARGS` in `conf/prometheus` and asserts it succeeded.
fn run_promtool(args: &[&str]) -> Output {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(prometheus_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}",
        args.join(" "),
        describe(&out)
    );
    out
}

#[test]
fn promtool_check_rules_passes_on_the_shipped_rules() {
    let out = run_promtool(&["check", "rules", "alerts.yml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rules = alert_rules();
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool saw another number of rules than the {} alerts in alerts.yml:\n{text}",
        rules.len()
    );
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let out = run_promtool(&["test", "rules", "alerts_test.yml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{}", describe(&out));
}

#[test]
fn promtool_check_config_passes_on_the_scrape_example() {
    let out = run_promtool(&["check", "config", "prometheus.yml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The rule file is found and checked through the config too.
    assert!(text.contains("1 rule files found"), "{}", describe(&out));

    let config: serde_yaml::Value = read_yaml(&prometheus_dir().join("prometheus.yml"));
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"].as_str() == Some(JOB))
        .expect("a scrape job named switchyard");
    assert_eq!(job["scrape_interval"].as_str(), Some("15s"));
    let targets = job["static_configs"][0]["targets"]
        .as_sequence()
        .expect("static targets");
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].as_str(), Some("127.0.0.1:9901"));
}

/// A promtool unit test that cannot fail proves nothing: each rule
/// (alertname and severity) needs a test where it fires and one where the
/// same alertname is expected silent.
#[test]
fn every_rule_has_a_firing_and_a_not_firing_unit_test() {
    let tests: serde_yaml::Value = read_yaml(&prometheus_dir().join("alerts_test.yml"));
    let mut fired: BTreeSet<(String, String)> = BTreeSet::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    for group in tests["tests"].as_sequence().expect("tests") {
        for case in group["alert_rule_test"]
            .as_sequence()
            .expect("alert_rule_test")
        {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected = case["exp_alerts"].as_sequence().expect("exp_alerts");
            if expected.is_empty() {
                silent.insert(name.clone());
            }
            for alert in expected {
                let severity = alert["exp_labels"]["severity"]
                    .as_str()
                    .expect("an expected alert names its severity");
                fired.insert((name.clone(), severity.to_string()));
            }
        }
    }
    for rule in alert_rules() {
        let key = (rule.name.clone(), rule.severity.clone());
        assert!(
            fired.contains(&key),
            "no unit test where {} ({}) fires",
            rule.name,
            rule.severity
        );
        assert!(
            silent.contains(&rule.name),
            "no unit test where {} is expected not to fire",
            rule.name
        );
    }
}

// ---------------------------------------------------------------------------
// The rules and the dashboard use only contract names
// ---------------------------------------------------------------------------

/// One alerting rule of alerts.yml.
struct Rule {
    name: String,
    severity: String,
    expr: String,
}

fn read_yaml(path: &Path) -> serde_yaml::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every alerting rule of alerts.yml, checked for the fields Alertmanager's
/// route and the Discord message rely on.
fn alert_rules() -> Vec<Rule> {
    let doc = read_yaml(&prometheus_dir().join("alerts.yml"));
    let mut rules = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        let group_name = group["name"].as_str().expect("group name");
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{group_name}: a rule that is not an alert"));
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                severity == "warning" || severity == "critical",
                "{name}: severity {severity:?} is neither warning nor critical"
            );
            for key in ["summary", "description"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "{name}: no {key} annotation"
                );
            }
            let expr = rule["expr"].as_str().expect("expr").to_string();
            assert!(
                expr.contains(&format!("job=\"{JOB}\"")),
                "{name}: the expression does not select job=\"{JOB}\": {expr}"
            );
            rules.push(Rule {
                name: name.to_string(),
                severity: severity.to_string(),
                expr,
            });
        }
    }
    assert!(!rules.is_empty(), "alerts.yml has no rules");
    rules
}

/// The metric families named in a PromQL expression (or any text): each
/// `switchyard_*` identifier, with a histogram's `_bucket`, `_sum` and
/// `_count` suffix taken back to its family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("switchyard_") {
        if text[..at].chars().next_back().is_some_and(is_ident) {
            continue; // inside another identifier
        }
        let end = text[at..]
            .find(|c: char| !is_ident(c))
            .map_or(text.len(), |n| at + n);
        let name = &text[at..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| HISTOGRAMS.contains(base))
            .unwrap_or(name);
        names.insert(family.to_string());
    }
    names
}

/// Every string anywhere in a JSON document.
fn json_strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| json_strings(i, out)),
        _ => {}
    }
}

fn dashboard() -> Value {
    let path = dashboard_path();
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Metric families used by the dashboard: in its queries, variables, and any
/// other text.
fn dashboard_names() -> BTreeSet<String> {
    let d = dashboard();
    let mut strings = Vec::new();
    json_strings(&d, &mut strings);
    strings.iter().flat_map(|s| metric_names(s)).collect()
}

fn rule_names() -> BTreeSet<String> {
    alert_rules()
        .iter()
        .flat_map(|r| metric_names(&r.expr))
        .collect()
}

/// The names used by the rules and the dashboard, each with who uses it.
fn used_names() -> BTreeMap<String, Vec<&'static str>> {
    let mut used: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for n in rule_names() {
        used.entry(n).or_default().push("alerts.yml");
    }
    for n in dashboard_names() {
        used.entry(n).or_default().push("switchyard.json");
    }
    used
}

#[test]
fn rules_and_dashboard_use_only_contract_names() {
    let used = used_names();
    let unknown: Vec<String> = used
        .iter()
        .filter(|(n, _)| !CONTRACT.contains(&n.as_str()))
        .map(|(n, by)| format!("{n} (in {})", by.join(", ")))
        .collect();
    assert!(
        unknown.is_empty(),
        "names outside the metrics contract: {unknown:?}"
    );
    // What the alert list of issue 11 needs.
    let rules = rule_names();
    for needed in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_backend_up",
        "switchyard_active_color",
        "switchyard_certificate_not_after_seconds",
        "switchyard_certificate_renewal_failures_total",
        "switchyard_limit_refusals_total",
        "switchyard_switches_total",
    ] {
        assert!(rules.contains(needed), "no rule uses {needed}");
    }
    // What the dashboard of issue 11 shows.
    let dash = dashboard_names();
    for needed in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_active_color",
        "switchyard_backend_up",
        "switchyard_in_flight_requests",
        "switchyard_refusals_total",
        "switchyard_limit_refusals_total",
        "switchyard_tokens_total",
        "switchyard_certificate_not_after_seconds",
    ] {
        assert!(dash.contains(needed), "no dashboard panel uses {needed}");
    }
}

#[test]
fn metric_names_are_read_back_to_their_families() {
    let names = metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(switchyard_request_duration_seconds_bucket[5m]))) \
         / switchyard_requests_total{x=\"switchyard_not_a_name\"} + my_switchyard_other \
         + switchyard_tokens_count",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // A label value is read too (stricter, never looser); `my_switchyard_*`
    // is another identifier; `_count` of a non-histogram stays as written.
    assert_eq!(
        names,
        [
            "switchyard_not_a_name",
            "switchyard_request_duration_seconds",
            "switchyard_requests_total",
            "switchyard_tokens_count",
        ]
    );
}

/// The dashboard imports into Grafana: a datasource chosen at import or by
/// variable, a `service` variable, and every panel query on that datasource.
#[test]
fn dashboard_is_importable_with_datasource_and_service_variables() {
    let d = dashboard();
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "no uid");
    assert!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title"
    );
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 36, "schemaVersion {schema} is old");

    let inputs = d["__inputs"].as_array().expect("__inputs for import");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS datasource input"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let service = var("service");
    assert_eq!(service["type"], "query");
    let query = service["query"]["query"]
        .as_str()
        .or(service["query"].as_str())
        .expect("service query");
    assert_eq!(query, "label_values(switchyard_requests_total, service)");

    // Panels (and rows' nested panels): unique ids, every target on the
    // datasource variable, every query filtered by the selected services.
    let mut panels = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for p in &panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {:?} is not on the datasource variable",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            targets += 1;
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{t}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("job=\"switchyard\""), "{expr}");
        }
    }
    assert!(targets >= 10, "only {targets} queries");
}

/// Grafana's variables in the dashboard's queries, and what stands for each
/// when promtool parses them.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__range", "1h"),
    ("$service", ".*"),
];

/// Every panel query parses as PromQL: promtool checks them as recording
/// rules of a scratch rule file, with Grafana's variables filled in.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let d = dashboard();
    let mut rules = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let mut expr = t["expr"].as_str().expect("expr").to_string();
            for (var, value) in GRAFANA_VARIABLES {
                expr = expr.replace(var, value);
            }
            assert!(
                !expr.contains('$'),
                "panel {:?}: a variable the dashboard does not define: {expr}",
                p["title"]
            );
            let mut rule = serde_yaml::Mapping::new();
            rule.insert(
                "record".into(),
                format!("dashboard:query_{}", rules.len()).into(),
            );
            rule.insert("expr".into(), expr.into());
            rules.push(serde_yaml::Value::Mapping(rule));
        }
    }
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), serde_yaml::Value::Sequence(rules));
    let mut doc = serde_yaml::Mapping::new();
    doc.insert(
        "groups".into(),
        serde_yaml::Value::Sequence(vec![serde_yaml::Value::Mapping(group)]),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard_queries.yml");
    fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    run_promtool(&["check", "rules", file.to_str().unwrap()]);
}

// ---------------------------------------------------------------------------
// A running switchyard exports every name used
// ---------------------------------------------------------------------------

/// A `switchyard run` started by this test; killed on drop.
struct Running {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let stderr = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
            eprintln!("--- switchyard stderr ---\n{stderr}");
        }
    }
}

/// Starts switchyard with everything that has metric series configured: two
/// colors with health checks, a rate limit, a concurrency cap, a token
/// budget and an ACME certificate whose CA is a loopback port where nothing
/// listens (issuance fails there, touching nothing off this machine), and
/// `[listen] metrics` on `metrics_port`.
/// Everything on, `[cluster]` included (on `redis`).
fn start_full(
    blue: &Upstream,
    green: &Upstream,
    metrics_port: u16,
    redis: &common::redis::RedisServer,
) -> Running {
    let dir = tempfile::Builder::new()
        .prefix("switchyard-obs-")
        .tempdir()
        .expect("tempdir");
    let state = dir.path().join("state");
    let certs = dir.path().join("certs");
    fs::create_dir_all(&state).unwrap();
    let [http, https, admin, dead_ca] = free_ports::<4>();
    let config = format!(
        r#"[server]
threads = 1
grace_period = "1s"
state_dir = {state}

[listen]
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = "127.0.0.1:{admin}"
metrics = "127.0.0.1:{metrics_port}"

[tls]
certs_dir = {certs}

[acme]
directory = "https://127.0.0.1:{dead_ca}/dir"
retry_backoff = "1h"

[[acme.certificates]]
name = "site"
domains = ["site.switchyard.test"]

[rate_limits.writes]
rate = "2/s"
burst = 10

[concurrency.gpu]
max_in_flight = 2
queue = 2
queue_timeout = "1s"

[token_budgets.ai]
tokens_per_minute = 1000

[cluster]
redis = "{redis}"
name = "observability"

{api}
{ai}
{api_route}
{ai_route}
"#,
        state = toml_str(state.to_str().unwrap()),
        certs = toml_str(certs.to_str().unwrap()),
        redis = redis.url(),
        api = service_with("api", &[blue], &[green], "blue", &fast_health()),
        ai = service("ai", &[blue], &[green], "green"),
        api_route = route_with("/api/", "api", "rate_limit = \"writes\""),
        ai_route = route_with("/v1/", "ai", "concurrency = \"gpu\"\ntoken_budget = \"ai\""),
    );
    let config_path = dir.path().join("switchyard.toml");
    fs::write(&config_path, &config).unwrap();
    let stderr = fs::File::create(dir.path().join("stderr.log")).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .env_remove(TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn switchyard run");
    Running { child, dir }
}

/// The sample names of a Prometheus text exposition.
fn exported_samples(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every name the rules and the dashboard use is exported, with at least one
/// series, by a switchyard that has just started and served nothing.
/// Needs the metrics listener (`[listen] metrics`, `GET /metrics`) of
/// issue 11 point 1.
#[test]
fn a_running_switchyard_exports_every_name_the_rules_and_dashboard_use() {
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let metrics_port = free_port();
    let redis = common::redis::RedisServer::start();
    let mut proxy = start_full(&blue, &green, metrics_port, &redis);
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");

    let mut body = String::new();
    let mut exited = None;
    let answered = poll_until(METRICS_DEADLINE, || {
        if let Ok(Some(st)) = proxy.child.try_wait() {
            exited = Some(st);
            return true;
        }
        match try_get(&agent(), &url, None) {
            Ok((200, text)) => {
                body = text;
                true
            }
            _ => false,
        }
    });
    assert!(exited.is_none(), "switchyard exited at start ({exited:?})");
    assert!(
        answered,
        "no 200 from GET {url} within {METRICS_DEADLINE:?}"
    );

    let samples = exported_samples(&body);
    let missing: Vec<String> = used_names()
        .into_iter()
        .filter(|(name, _)| {
            !(samples.contains(name)
                || (HISTOGRAMS.contains(&name.as_str())
                    && samples.contains(&format!("{name}_bucket"))))
        })
        .map(|(name, by)| format!("{name} (used in {})", by.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exported at start-up: {missing:?}\n--- /metrics ---\n{body}"
    );
}
