//! The file as written. Each struct mirrors a TOML table and refuses keys it
//! does not know, so a typo is an error rather than a silently ignored setting.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub server: Option<Server>,
    pub listen: Option<Listen>,
    pub admin: Option<Admin>,
    pub tls: Option<Tls>,
    pub acme: Option<Acme>,
    #[serde(default)]
    pub services: BTreeMap<Spanned<String>, Service>,
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
    #[serde(default)]
    pub rate_limits: BTreeMap<Spanned<String>, RateLimit>,
    #[serde(default)]
    pub concurrency: BTreeMap<Spanned<String>, Concurrency>,
    #[serde(default)]
    pub token_budgets: BTreeMap<Spanned<String>, TokenBudget>,
    pub access_log: Option<AccessLog>,
    pub notify: Option<Notify>,
    pub cluster: Option<Cluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub redis: Spanned<String>,
    pub name: Option<Spanned<String>>,
    pub instance: Option<Spanned<String>>,
    pub password_file: Option<Spanned<PathBuf>>,
    pub password_env: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub timeout: Option<Spanned<String>>,
    pub limit_timeout: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    pub webhooks: Option<Vec<Webhook>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub name: Spanned<String>,
    pub url_file: Option<Spanned<PathBuf>>,
    pub url_env: Option<Spanned<String>>,
    pub format: Spanned<String>,
    pub events: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    pub enabled: Option<bool>,
    pub path: Option<Spanned<PathBuf>>,
    pub sample: Option<Spanned<f64>>,
    pub buffer_lines: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBudget {
    pub tokens_per_minute: Spanned<u64>,
    pub key: Option<Spanned<String>>,
    pub max_tokens: Option<Spanned<u64>>,
    pub default_max_tokens: Option<Spanned<u64>>,
    pub max_body: Option<Spanned<String>>,
    pub prompt_bytes_per_token: Option<Spanned<u32>>,
    pub media_tokens: Option<Spanned<u64>>,
    pub scope: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    pub max_in_flight: Spanned<u32>,
    pub per_key: Option<Spanned<u32>>,
    pub key: Option<Spanned<String>>,
    pub queue: Option<Spanned<u32>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub scope: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub rate: Spanned<String>,
    pub burst: Option<Spanned<u32>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub key: Option<Spanned<String>>,
    pub scope: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub threads: Option<Spanned<u32>>,
    pub work_stealing: Option<Spanned<bool>>,
    pub grace_period: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<PathBuf>>,
    pub upstream_keepalive_pool: Option<Spanned<usize>>,
    pub header_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
    pub send_timeout: Option<Spanned<String>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub max_header_size: Option<Spanned<String>>,
    pub maintenance_page: Option<Spanned<PathBuf>>,
    pub retry_after: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<u64>>,
    pub max_connections_per_client: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub http: Option<Spanned<String>>,
    pub https: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub metrics: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub token_file: Option<Spanned<PathBuf>>,
    pub allow: Option<Vec<Spanned<String>>>,
    pub tokens: Option<Vec<AdminToken>>,
}

/// One `[[admin.tokens]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    pub name: Spanned<String>,
    pub file: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub blue: Spanned<Vec<Spanned<String>>>,
    pub green: Spanned<Vec<Spanned<String>>>,
    pub active: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub health: Option<Health>,
    pub min_healthy: Option<Spanned<usize>>,
    pub sticky: Option<Spanned<String>>,
    pub rollback: Option<Rollback>,
}

/// `[services.NAME.rollback]`: the automatic rollback watcher's gates.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub enabled: Option<bool>,
    pub window: Option<Spanned<String>>,
    pub max_error_ratio: Option<Spanned<f64>>,
    pub max_p95: Option<Spanned<String>>,
    pub min_requests: Option<Spanned<u64>>,
    pub watch: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub path: Spanned<String>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub expect: Option<Spanned<u16>>,
    pub body: Option<String>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: Option<Spanned<String>>,
    pub path: Spanned<String>,
    pub service: Option<Spanned<String>>,
    pub action: Option<Spanned<String>>,
    pub websocket: Option<bool>,
    pub idle_timeout: Option<Spanned<String>>,
    pub read_timeout: Option<Spanned<String>>,
    pub max_body: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<String>>,
    pub token_budget: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub certs_dir: Option<Spanned<PathBuf>>,
    pub redirect_http: Option<bool>,
    pub hsts: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub default_certificate: Option<Spanned<String>>,
    pub certificates: Option<Vec<TlsCertificate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    pub name: Spanned<String>,
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    pub directory: Option<Spanned<String>>,
    pub email: Option<Spanned<String>>,
    pub ca_root: Option<Spanned<PathBuf>>,
    pub retry_backoff: Option<Spanned<String>>,
    pub certificates: Option<Vec<AcmeCertificate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCertificate {
    pub name: Spanned<String>,
    pub domains: Spanned<Vec<Spanned<String>>>,
}
