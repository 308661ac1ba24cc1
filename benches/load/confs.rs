//! Configurations of the upstream and of every proxy under test, written so
//! that switchyard, nginx and HAProxy do the same job. The bare Pingora proxy
//! (`examples/bare_pingora.rs`) takes no config: it sends everything to one
//! backend, so it only joins the simple scenarios.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster;
use crate::limits;
use crate::procs::{self, Proc};
use crate::tls;

/// Body of `GET /` on the upstream.
pub const SMALL_BODY: &str = "hello from upstream\n";
/// Size of `GET /16k` on the upstream.
pub const BIG_BODY: usize = 16 * 1024;

/// Host and paths of the "realistic" scenario.
pub const API_HOST: &str = "api.example.com";
pub const APP_HOST: &str = "example.com";
pub const REALISTIC_PATH: &str = "/api/v1/users/me";

/// Requests whose answers must agree between the proxies of the realistic
/// scenario: (host, path, status).
pub const REALISTIC_CHECKS: &[(&str, &str, u16)] = &[
    (API_HOST, REALISTIC_PATH, 200),
    (API_HOST, "/api/v1/meetings/7/settlement", 200),
    (
        API_HOST,
        "/api/v1/meetings/7/settlement/progress/stream",
        200,
    ),
    (API_HOST, "/v1/models", 200),
    (API_HOST, "/actuator/health", 404),
    (API_HOST, "/swagger-ui/index.html", 404),
    (API_HOST, "/", 404),
    (APP_HOST, "/", 200),
    (APP_HOST, "/wp-login.php", 404),
    (APP_HOST, "/wp-admin/setup.php", 404),
    ("unknown.example.net", "/", 404),
];

pub struct Tools {
    pub nginx: PathBuf,
    pub haproxy: Option<PathBuf>,
    /// `examples/bare_pingora.rs`, when built (and not left out).
    pub pingora: Option<PathBuf>,
    pub switchyard: PathBuf,
    pub token: String,
    pub token_file: PathBuf,
    /// The open-file limit every child inherits.
    pub nofile: u64,
    /// The certificate every proxy serves in the HTTPS scenarios.
    pub tls: tls::Files,
}

/// The shared upstream: one nginx worker. `general` ports all serve the same
/// content (`/`, `/16k`, `/health`); `blue` and `green` answer their color.
pub struct Upstream {
    pub proc: Proc,
    pub general: Vec<u16>,
    pub blue: u16,
    pub green: u16,
    /// HTTPS with TLS 1.2 only: shows that wrk's TLS 1.3 pin holds.
    pub tls12_only: u16,
    /// Answers `POST /v1/chat/completions` with a fixed event stream (the
    /// `general` ports answer it with a fixed JSON completion).
    pub ai_stream: u16,
}

/// Which proxy: also the table order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Switchyard,
    /// switchyard on the same route without its limits (`limits` only).
    SwitchyardNoLimits,
    /// switchyard without its metrics listener (`realistic` only; the
    /// `switchyard` line counts every request, as the shipped config does).
    SwitchyardNoMetrics,
    /// switchyard on the realistic routes as one variant of the `cluster`
    /// scenario (`[cluster]` on or off, see `load/cluster.rs`).
    Clustered(&'static cluster::Variant),
    /// switchyard with several worker threads (`threads` scenario), with
    /// `server.work_stealing` set as given; takes the place of `Switchyard`.
    SwitchyardThreads {
        work_stealing: bool,
    },
    /// A bare Pingora proxy with Pingora's defaults: what switchyard builds on.
    Pingora,
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Switchyard => "switchyard",
            Kind::SwitchyardNoLimits => "switchyard, no limits",
            Kind::SwitchyardNoMetrics => "switchyard, no metrics",
            Kind::Clustered(v) => v.name,
            Kind::SwitchyardThreads {
                work_stealing: false,
            } => "switchyard, work stealing off",
            Kind::SwitchyardThreads {
                work_stealing: true,
            } => "switchyard, work stealing on",
            Kind::Pingora => "pingora",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// What the proxies of a scenario are set up to do.
#[derive(Clone, Copy)]
pub enum Setup {
    /// Everything to one backend (`backend`); `alt` is switchyard's idle green pool.
    Simple {
        backend: u16,
        alt: u16,
        /// Many idle client connections are coming: size connection tables for them.
        many_conns: bool,
        /// The backend streams (SSE): nginx must not buffer.
        stream: bool,
        /// Also serve HTTPS (TLS 1.2 + 1.3, ALPN h2 and http/1.1) with the
        /// run's certificate on `Target::tls_port`.
        tls: bool,
        /// The route passes WebSocket upgrades (idle for up to an hour).
        websocket: bool,
        /// Worker threads (processes for nginx) of every proxy: 1, or 2 in
        /// the `threads` scenario.
        workers: u32,
    },
    /// A route table like conf/switchyard.toml; health checks on.
    Realistic,
    /// Blue/green service `app` whose active color changes under load. nginx
    /// reads its upstream from `app-color.conf` in its directory.
    Switch,
    /// The AI route (`/v1/` on the api host), see `load/limits.rs`:
    /// switchyard with the limits, switchyard without them, and nginx
    /// proxying plainly. `stream`: the backend answers an event stream.
    Limits { stream: bool },
    /// The realistic route table in switchyard alone, once per
    /// [`cluster::VARIANTS`] entry; the cluster ones share the Redis on
    /// `redis_port` (process `redis_pid`, whose CPU is measured too).
    Cluster { redis_port: u16, redis_pid: u32 },
}

impl Setup {
    /// Worker threads (nginx: worker processes) of each proxy.
    pub fn workers(self) -> u32 {
        match self {
            Setup::Simple { workers, .. } => workers.max(1),
            _ => 1,
        }
    }
}

/// One proxy under test.
pub struct Target {
    pub kind: Kind,
    pub proc: Proc,
    pub port: u16,
    /// The HTTPS port of a TLS setup (0 otherwise).
    pub tls_port: u16,
    /// switchyard only.
    pub admin_port: u16,
    /// switchyard's metrics listener (`realistic` only; 0 otherwise).
    pub metrics_port: u16,
    /// nginx only: its directory and config, for `nginx -s reload`.
    pub dir: PathBuf,
    pub conf: PathBuf,
}

impl Target {
    pub fn addr(&self) -> std::net::SocketAddr {
        procs::local(self.port)
    }
}

pub fn write_token(dir: &Path) -> Result<(String, PathBuf), String> {
    let mut bytes = [0u8; 16];
    let random = fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !random {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = t.to_le_bytes();
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("admin.token");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes()).map_err(|e| e.to_string())?;
    Ok((token, path))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The parts of an nginx config every instance shares; `workers` worker
/// processes.
fn nginx_conf(
    dir: &Path,
    workers: u32,
    worker_connections: u32,
    nofile: u64,
    http: &str,
) -> String {
    let d = dir.display();
    // Workers of a root master run as nobody, who cannot read the temp dir.
    let user = if is_root() { "user root root;\n" } else { "" };
    format!(
        "{user}worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    default_type text/plain;
    server_tokens off;
    sendfile on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
{http}}}
"
    )
}

fn start_nginx(
    name: &str,
    nginx: &Path,
    dir: &Path,
    conf_text: &str,
) -> Result<(Proc, PathBuf), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, conf_text).map_err(|e| format!("{}: {e}", conf.display()))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    let p = Proc::spawn(name, cmd, &dir.join("stderr.log"), true)?;
    Ok((p, conf))
}

/// `nginx -s reload` for the instance in `dir`; returns once the command exits.
pub fn nginx_reload(nginx: &Path, dir: &Path, conf: &Path) -> Result<(), String> {
    let out = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-s", "reload"])
        .output()
        .map_err(|e| format!("nginx -s reload: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nginx -s reload: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn start_upstream(
    nginx: &Path,
    dir: &Path,
    nofile: u64,
    tls: &tls::Files,
) -> Result<Upstream, String> {
    let ports = procs::free_ports(12);
    let (general, rest) = ports.split_at(8);
    let (blue, green, tls12_only, ai_stream) = (rest[0], rest[1], rest[2], rest[3]);
    let data = dir.join("data");
    fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    fs::write(data.join("16k"), vec![b'x'; BIG_BODY]).map_err(|e| e.to_string())?;
    let mut http = String::from("    server {\n");
    for p in general {
        writeln!(http, "        listen 127.0.0.1:{p} backlog=4096;").unwrap();
    }
    write!(
        http,
        "        location / {{ return 200 \"{}\"; }}
        location = /16k {{ root {}; }}
        location = /health {{ return 200 \"ok\\n\"; }}
{}    }}
    server {{
        listen 127.0.0.1:{ai_stream} backlog=4096;
        location / {{ return 200 \"ok\\n\"; }}
{}    }}
    server {{
        listen 127.0.0.1:{blue} backlog=4096;
        location / {{ return 200 \"blue\"; }}
    }}
    server {{
        listen 127.0.0.1:{green} backlog=4096;
        location / {{ return 200 \"green\"; }}
    }}
    server {{
        listen 127.0.0.1:{tls12_only} ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2;
        location / {{ return 200 \"tls 1.2\"; }}
    }}
",
        SMALL_BODY.replace('\n', "\\n"),
        data.display(),
        limits::upstream_location(false),
        limits::upstream_location(true),
        tls.cert.display(),
        tls.key.display()
    )
    .unwrap();
    let (mut proc, _) = start_nginx(
        "upstream nginx",
        nginx,
        dir,
        &nginx_conf(dir, 1, 16384, nofile, &http),
    )?;
    let addr = procs::local(general[0]);
    procs::wait_ready(&mut proc, addr, "upstream", "/", 200)?;
    for &p in [blue, green, ai_stream].iter().chain(general) {
        procs::wait_ready(&mut proc, procs::local(p), "upstream", "/", 200)?;
    }
    Ok(Upstream {
        proc,
        general: general.to_vec(),
        blue,
        green,
        tls12_only,
        ai_stream,
    })
}

/// Starts switchyard, the bare Pingora proxy (when built; simple setups
/// only: it cannot route or switch), nginx and (when installed) HAProxy for
/// `setup`, each in its own directory under `dir`, and waits until each serves.
pub fn start_proxies(
    tools: &Tools,
    up: &Upstream,
    dir: &Path,
    setup: Setup,
    ready: (&str, &str, u16),
) -> Result<Vec<Target>, String> {
    let mut kinds = vec![Kind::Switchyard];
    if setup.workers() > 1 {
        // Both settings of work stealing, the shipped default first.
        kinds = vec![
            Kind::SwitchyardThreads {
                work_stealing: false,
            },
            Kind::SwitchyardThreads {
                work_stealing: true,
            },
        ];
    }
    if matches!(setup, Setup::Cluster { .. }) {
        // switchyard only: the scenario compares its own variants.
        kinds = cluster::VARIANTS.iter().map(Kind::Clustered).collect();
    }
    if matches!(setup, Setup::Limits { .. }) {
        kinds.push(Kind::SwitchyardNoLimits);
    }
    let realistic = matches!(setup, Setup::Realistic);
    if realistic {
        kinds.push(Kind::SwitchyardNoMetrics);
    }
    let tls = matches!(setup, Setup::Simple { tls: true, .. });
    if tools.pingora.is_some() && matches!(setup, Setup::Simple { .. }) {
        kinds.push(Kind::Pingora);
    }
    if !matches!(setup, Setup::Cluster { .. }) {
        kinds.push(Kind::Nginx);
    }
    if tools.haproxy.is_some()
        && !matches!(
            setup,
            Setup::Switch | Setup::Limits { .. } | Setup::Cluster { .. }
        )
    {
        kinds.push(Kind::Haproxy);
    }
    let mut out = Vec::new();
    for kind in kinds {
        let d = dir.join(kind.name());
        fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        let ports = procs::free_ports(4);
        let (port, admin_port) = (ports[0], ports[1]);
        let tls_port = if tls { ports[2] } else { 0 };
        let metrics_port = match kind {
            Kind::Switchyard if realistic => ports[3],
            // Every variant as conf/switchyard.toml, metrics listener included.
            Kind::Clustered(_) => ports[3],
            _ => 0,
        };
        let (mut proc, conf) = match kind {
            Kind::Switchyard
            | Kind::SwitchyardNoLimits
            | Kind::SwitchyardNoMetrics
            | Kind::SwitchyardThreads { .. }
            | Kind::Clustered(_) => {
                let conf = d.join("switchyard.toml");
                let listen = (port, tls_port, metrics_port);
                let text = switchyard_conf(tools, up, &d, listen, admin_port, setup, kind);
                fs::write(&conf, text).map_err(|e| e.to_string())?;
                (spawn_switchyard(tools, &d, &conf)?, conf)
            }
            Kind::Pingora => {
                let Setup::Simple { backend, .. } = setup else {
                    unreachable!("the bare Pingora proxy runs in simple setups only")
                };
                let mut cmd = Command::new(tools.pingora.as_ref().expect("bare_pingora"));
                cmd.arg(format!("127.0.0.1:{port}"))
                    .arg(format!("127.0.0.1:{backend}"))
                    .env(BARE_PINGORA_THREADS, setup.workers().to_string())
                    .current_dir(&d);
                if tls {
                    cmd.arg(format!("127.0.0.1:{tls_port}"))
                        .arg(&tools.tls.cert)
                        .arg(&tools.tls.key);
                }
                let p = Proc::spawn("pingora", cmd, &d.join("pingora.log"), false)?;
                // No config file: the command line is all of it.
                (p, PathBuf::new())
            }
            Kind::Nginx => {
                let (many, http) = nginx_proxy_http(up, &d, (port, tls_port), &tools.tls, setup)?;
                let connections = match setup {
                    // Two connections per WebSocket, as many as the
                    // open-file limit allows.
                    Setup::Simple {
                        websocket: true, ..
                    } => tools.nofile.saturating_sub(500) as u32,
                    _ if many => 12288,
                    _ => 1024,
                };
                let text = nginx_conf(&d, setup.workers(), connections, tools.nofile, &http);
                start_nginx("nginx", &tools.nginx, &d, &text)?
            }
            Kind::Haproxy => {
                let conf = d.join("haproxy.cfg");
                fs::write(
                    &conf,
                    haproxy_conf(up, (port, tls_port), &tools.tls, setup, tools.nofile),
                )
                .map_err(|e| e.to_string())?;
                let mut cmd = Command::new(tools.haproxy.as_ref().expect("haproxy"));
                cmd.arg("-db").arg("-f").arg(&conf);
                let p = Proc::spawn("haproxy", cmd, &d.join("haproxy.log"), false)?;
                (p, conf)
            }
        };
        let (host, path, status) = ready;
        procs::wait_ready(&mut proc, procs::local(port), host, path, status)?;
        out.push(Target {
            kind,
            proc,
            port,
            tls_port,
            admin_port,
            metrics_port,
            dir: d,
            conf,
        });
    }
    Ok(out)
}

/// The environment variable that gives `examples/bare_pingora.rs` its
/// worker threads (1 when unset).
pub const BARE_PINGORA_THREADS: &str = "BARE_PINGORA_THREADS";

/// Starts `tools.switchyard run -c conf` in `dir` (its log there), without
/// waiting for it to serve.
pub fn spawn_switchyard(tools: &Tools, dir: &Path, conf: &Path) -> Result<Proc, String> {
    let mut cmd = Command::new(&tools.switchyard);
    cmd.arg("run").arg("-c").arg(conf).current_dir(dir);
    cmd.env_remove("SWITCHYARD_ADMIN_TOKEN");
    cmd.env("RUST_LOG", "warn");
    Proc::spawn("switchyard", cmd, &dir.join("switchyard.log"), false)
}

/// switchyard's config for `setup` as `kind` (limits or not, a cluster
/// variant); `listen` is (http, https or 0, metrics or 0).
pub fn switchyard_conf(
    tools: &Tools,
    up: &Upstream,
    dir: &Path,
    (port, tls_port, metrics_port): (u16, u16, u16),
    admin: u16,
    setup: Setup,
    kind: Kind,
) -> String {
    let limits = kind == Kind::Switchyard;
    // A cluster variant is the realistic config, plus its `[cluster]`
    // section and limit scope.
    let (setup, cluster) = match (setup, kind) {
        (Setup::Cluster { redis_port, .. }, Kind::Clustered(v)) => {
            (Setup::Realistic, Some((v, redis_port)))
        }
        (Setup::Cluster { .. }, _) => unreachable!("only cluster variants run the cluster setup"),
        (other, _) => (other, None),
    };
    let d = dir.display();
    let metrics = match metrics_port {
        0 => String::new(),
        m => format!("metrics = \"127.0.0.1:{m}\"\n"),
    };
    // The certificate as a static one; no redirect, so the plain port
    // answers the readiness check like the other proxies' plain ports.
    let (https, tls) = if tls_port != 0 {
        (
            format!("https = \"127.0.0.1:{tls_port}\"\n"),
            format!(
                "[tls]
certs_dir = \"{d}/certs\"
redirect_http = false

[[tls.certificates]]
name = \"bench\"
cert = \"{}\"
key = \"{}\"

",
                tools.tls.cert.display(),
                tools.tls.key.display()
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let mut s = String::new();
    let server_extra = match setup {
        // As conf/switchyard.toml.
        Setup::Realistic => format!(
            "header_timeout = \"10s\"
body_timeout = \"10s\"
keepalive_timeout = \"15s\"
send_timeout = \"10s\"
max_header_size = \"32KiB\"
trusted_proxies = []
maintenance_page = \"{d}/maintenance.html\"
retry_after = \"30s\"
"
        ),
        _ => "keepalive_timeout = \"60s\"\n".to_string(),
    };
    // `threads`: both settings of work stealing, written out.
    let server_extra = match kind {
        Kind::SwitchyardThreads { work_stealing } => {
            format!("{server_extra}work_stealing = {work_stealing}\n")
        }
        _ => server_extra,
    };
    let threads = setup.workers();
    if matches!(setup, Setup::Realistic) {
        let _ = fs::write(dir.join("maintenance.html"), "<h1>Back soon</h1>\n");
    }
    write!(
        s,
        "[server]
threads = {threads}
grace_period = \"1s\"
state_dir = \"{d}/state\"
{server_extra}
[listen]
http = \"127.0.0.1:{port}\"
{https}{metrics}admin = \"127.0.0.1:{admin}\"

[admin]
token_file = \"{}\"
allow = [\"127.0.0.1/32\", \"::1/128\"]

# Like every proxy here (nginx: access_log off): no access log.
[access_log]
enabled = false

{tls}",
        tools.token_file.display()
    )
    .unwrap();
    match setup {
        Setup::Simple {
            backend,
            alt,
            websocket,
            ..
        } => write!(
            s,
            "[services.app]
blue = [\"127.0.0.1:{backend}\"]
green = [\"127.0.0.1:{alt}\"]
active = \"blue\"

[[routes]]
path = \"/\"
service = \"app\"
{}",
            if websocket {
                "websocket = true\nidle_timeout = \"1h\"\n"
            } else {
                ""
            }
        )
        .unwrap(),
        Setup::Limits { stream } => {
            let backend = if stream { up.ai_stream } else { up.general[0] };
            write!(
                s,
                "[services.ai]
blue = [\"127.0.0.1:{backend}\"]
green = [\"127.0.0.1:{}\"]
active = \"blue\"
connect_timeout = \"3s\"

{}",
                up.general[1],
                limits::switchyard_route(limits)
            )
            .unwrap()
        }
        Setup::Switch => write!(
            s,
            "[services.app]
blue = [\"127.0.0.1:{}\"]
green = [\"127.0.0.1:{}\"]
active = \"blue\"

[[routes]]
path = \"/\"
service = \"app\"
",
            up.blue, up.green
        )
        .unwrap(),
        Setup::Realistic => {
            let g = &up.general;
            let health = "health = { path = \"/health\", interval = \"2s\", timeout = \"1s\", expect = 200, rise = 2, fall = 3 }";
            write!(
                s,
                "[services.web]
blue = [\"127.0.0.1:{}\"]
green = [\"127.0.0.1:{}\"]
active = \"blue\"
{health}

[services.api]
blue = [\"127.0.0.1:{}\"]
green = [\"127.0.0.1:{}\"]
active = \"blue\"
health = {{ path = \"/health\", interval = \"2s\", timeout = \"1s\", expect = 200, body = \"ok\", rise = 2, fall = 3 }}

[services.ai]
blue = [\"127.0.0.1:{}\"]
green = [\"127.0.0.1:{}\"]
active = \"blue\"
connect_timeout = \"3s\"
health = {{ path = \"/health\", interval = \"5s\", timeout = \"2s\", expect = 200, rise = 2, fall = 3 }}

[rate_limits.writes]
{}",
                g[2],
                g[3],
                g[4],
                g[5],
                g[6],
                g[7],
                // With a scope: the same limit counting every request of the
                // load, at a rate no load reaches (nothing refused), so the
                // table shows what a check costs, local or through Redis.
                match cluster.and_then(|(v, _)| v.limit_scope) {
                    None => "rate = \"2/s\"\nburst = 10\nmethods = [\"POST\", \"PUT\", \"DELETE\"]\n"
                        .to_string(),
                    Some(scope) => {
                        format!("rate = \"1000000/s\"\nburst = 1000\nscope = \"{scope}\"\n")
                    }
                }
            )
            .unwrap();
            for r in realistic_routes() {
                s.push_str("\n[[routes]]\n");
                writeln!(s, "host = \"{}\"", r.host).unwrap();
                writeln!(s, "path = \"{}\"", r.path).unwrap();
                match r.service {
                    Some(svc) => writeln!(s, "service = \"{svc}\"").unwrap(),
                    None => s.push_str("action = \"deny\"\n"),
                }
                if r.websocket {
                    s.push_str("websocket = true\nidle_timeout = \"1h\"\n");
                }
                if let Some(t) = r.read_timeout {
                    writeln!(s, "read_timeout = \"{t}\"").unwrap();
                }
                if r.rate_limited() {
                    s.push_str("rate_limit = \"writes\"\n");
                }
            }
        }
        Setup::Cluster { .. } => unreachable!("turned into Realistic above"),
    }
    if let Some((v, redis_port)) = cluster {
        if let Some(instance) = cluster::instance_of(v) {
            s.push('\n');
            s.push_str(&cluster::section(
                redis_port,
                cluster::ON_OFF_NAME,
                &instance,
            ));
        }
    }
    s
}

/// One route of the realistic table (the shape of conf/switchyard.toml).
struct RRoute {
    host: &'static str,
    path: &'static str,
    /// `None`: deny.
    service: Option<&'static str>,
    websocket: bool,
    read_timeout: Option<&'static str>,
}

impl RRoute {
    /// Writes to the API and the AI endpoint count against the per-client
    /// rate limit (2/s, burst 10, POST/PUT/DELETE), as in conf/switchyard.toml.
    fn rate_limited(&self) -> bool {
        matches!(self.service, Some("api" | "ai")) && !self.websocket
    }
}

fn realistic_routes() -> Vec<RRoute> {
    let r = |host, path, service, websocket, read_timeout| RRoute {
        host,
        path,
        service,
        websocket,
        read_timeout,
    };
    vec![
        r(APP_HOST, "/", Some("web"), false, None),
        r(APP_HOST, "/wp-admin/", None, false, None),
        r(APP_HOST, "/wp-login.php", None, false, None),
        r(APP_HOST, "/xmlrpc.php", None, false, None),
        r(APP_HOST, "/panel/", None, false, None),
        r(APP_HOST, "/upload.php", None, false, None),
        r(API_HOST, "/api/", Some("api"), false, None),
        r(API_HOST, "/api/v2/ws", Some("api"), true, None),
        r(
            API_HOST,
            "/api/v1/meetings/*/settlement/progress/stream",
            Some("api"),
            false,
            Some("31m"),
        ),
        r(
            API_HOST,
            "/api/v1/rag-chat/stream",
            Some("api"),
            false,
            Some("90s"),
        ),
        r(API_HOST, "/actuator", None, false, None),
        r(API_HOST, "/swagger-ui", None, false, None),
        r(API_HOST, "/v3/api-docs", None, false, None),
        r(API_HOST, "/webjars/", None, false, None),
        r(API_HOST, "/v1/", Some("ai"), false, Some("5m")),
    ]
}

/// nginx as the reverse proxy: (needs a big connection table, http block).
fn nginx_proxy_http(
    up: &Upstream,
    dir: &Path,
    (port, tls_port): (u16, u16),
    tls: &tls::Files,
    setup: Setup,
) -> Result<(bool, String), String> {
    let base = "        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
        proxy_set_header Host $http_host;
";
    let upstream = |name: &str, addr: &str| {
        format!(
            "    upstream {name} {{
        server {addr};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
"
        )
    };
    // nginx proxies the AI route plainly: the simple setup's proxy in front
    // of the completion backend (it cannot count tokens).
    let setup = match setup {
        Setup::Limits { stream } => Setup::Simple {
            backend: if stream { up.ai_stream } else { up.general[0] },
            alt: up.general[1],
            many_conns: false,
            stream,
            tls: false,
            websocket: false,
            workers: 1,
        },
        other => other,
    };
    Ok(match setup {
        Setup::Simple {
            backend,
            many_conns,
            stream,
            websocket,
            ..
        } => {
            let extra = if stream {
                "        proxy_buffering off;\n        proxy_cache off;\n"
            } else {
                ""
            };
            // Upgrades passed on (`Connection: upgrade` instead of the
            // empty one), idle for up to an hour.
            let base = if websocket {
                "        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection \"upgrade\";
        proxy_set_header Host $http_host;
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;
"
            } else {
                base
            };
            // The same offer as switchyard's listener: TLS 1.2 and 1.3,
            // ALPN h2 and http/1.1; nginx's defaults otherwise (session
            // tickets on). HTTP/2 requests per connection are bounded by
            // `keepalive_requests`, set high in the shared http block.
            let https = if tls_port != 0 {
                format!(
                    "        listen 127.0.0.1:{tls_port} ssl http2 backlog=4096;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
",
                    tls.cert.display(),
                    tls.key.display()
                )
            } else {
                String::new()
            };
            (
                many_conns,
                format!(
                    "{}    server {{
        listen 127.0.0.1:{port} backlog=4096;
{https}        location / {{
            proxy_pass http://backend;
{base}{extra}        }}
    }}
",
                    upstream("backend", &format!("127.0.0.1:{backend}"))
                ),
            )
        }
        Setup::Switch => {
            let include = dir.join("app-color.conf");
            write_nginx_color(&include, up.blue)?;
            (
                false,
                format!(
                    "    upstream app {{
        include {};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
{base}        }}
    }}
",
                    include.display()
                ),
            )
        }
        Setup::Realistic => (false, nginx_realistic(up, port)),
        Setup::Limits { .. } => unreachable!("mapped to a simple setup above"),
        Setup::Cluster { .. } => unreachable!("nginx sits out the cluster scenario"),
    })
}

/// Points nginx's `app` upstream at `port` (written whole, then renamed).
pub fn write_nginx_color(include: &Path, port: u16) -> Result<(), String> {
    let tmp = include.with_extension("tmp");
    fs::write(&tmp, format!("server 127.0.0.1:{port};\n")).map_err(|e| e.to_string())?;
    fs::rename(&tmp, include).map_err(|e| e.to_string())
}

/// The nginx config switchyard replaces: the same hosts, prefixes, deny
/// routes, WebSocket and SSE locations, forwarded headers and request ids.
fn nginx_realistic(up: &Upstream, port: u16) -> String {
    let g = &up.general;
    let mut h = String::new();
    // Keep a sane client request id, else make one; echo it to the client.
    h.push_str(
        "    map $http_x_request_id $reqid {
        default $request_id;
        \"~^[A-Za-z0-9._:-]{1,128}$\" $http_x_request_id;
    }
    map $http_upgrade $connection_upgrade {
        default upgrade;
        \"\" \"\";
    }
    # Only writes are counted: an empty key is not limited.
    map $request_method $write_client {
        default \"\";
        POST $binary_remote_addr;
        PUT $binary_remote_addr;
        DELETE $binary_remote_addr;
    }
    limit_req_zone $write_client zone=writes:10m rate=2r/s;
    limit_req_status 429;
",
    );
    for (name, b) in [("web", g[2]), ("api", g[4]), ("ai", g[6])] {
        write!(
            h,
            "    upstream {name} {{
        server 127.0.0.1:{b};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
"
        )
        .unwrap();
    }
    // proxy_set_header in a location replaces every inherited one, so each
    // proxying location gets the whole set.
    let headers = |connection: &str| {
        format!(
            "            proxy_http_version 1.1;
            proxy_set_header Connection {connection};
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $reqid;
            add_header X-Request-Id $reqid always;
"
        )
    };
    let mut servers: Vec<(&str, String)> =
        vec![(APP_HOST, String::new()), (API_HOST, String::new())];
    for r in realistic_routes() {
        let body = &mut servers
            .iter_mut()
            .find(|(host, _)| *host == r.host)
            .expect("known host")
            .1;
        // A `*` segment needs a regex location in nginx.
        let location = match r.path.contains('*') {
            true => format!("~ ^{}", r.path.replace('*', "[^/]+")),
            false => r.path.to_string(),
        };
        match r.service {
            None => writeln!(body, "        location {location} {{ return 404; }}").unwrap(),
            Some(svc) => {
                writeln!(body, "        location {location} {{").unwrap();
                writeln!(body, "            proxy_pass http://{svc};").unwrap();
                if r.websocket {
                    body.push_str(&headers("$connection_upgrade"));
                    body.push_str("            proxy_set_header Upgrade $http_upgrade;\n");
                    body.push_str(
                        "            proxy_read_timeout 1h;\n            proxy_send_timeout 1h;\n",
                    );
                } else {
                    body.push_str(&headers("\"\""));
                }
                if let Some(t) = r.read_timeout {
                    writeln!(body, "            proxy_read_timeout {t};").unwrap();
                    body.push_str("            proxy_buffering off;\n");
                }
                if r.rate_limited() {
                    body.push_str("            limit_req zone=writes burst=10 nodelay;\n");
                }
                body.push_str("        }\n");
            }
        }
    }
    // Listen options may be given once per address: on the default server.
    for (host, body) in servers {
        // Paths no route covers are 404, as in switchyard.
        let fallback = if body.contains("location / {") {
            ""
        } else {
            "        location / { return 404; }\n"
        };
        write!(
            h,
            "    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        client_header_timeout 10s;
        client_body_timeout 10s;
        send_timeout 10s;
        keepalive_timeout 15s;
        large_client_header_buffers 4 32k;
        client_max_body_size 1m;
{body}{fallback}    }}
"
        )
        .unwrap();
    }
    format!(
        "{h}    server {{
        listen 127.0.0.1:{port} default_server backlog=4096;
        server_name _;
        location / {{ return 404; }}
    }}
"
    )
}

/// HAProxy refuses to start when 2 × maxconn (+ a little) file descriptors
/// are not available, so the connection limit is fitted to the open-file
/// limit (which only root with CAP_SYS_RESOURCE can raise).
pub fn haproxy_maxconn(setup: Setup, nofile: u64) -> u64 {
    let many = matches!(
        setup,
        Setup::Simple {
            many_conns: true,
            ..
        }
    );
    let want = if many { 12288 } else { 4096 };
    want.min(nofile.saturating_sub(200) / 2)
}

fn haproxy_conf(
    up: &Upstream,
    (port, tls_port): (u16, u16),
    tls: &tls::Files,
    setup: Setup,
    nofile: u64,
) -> String {
    let maxconn = haproxy_maxconn(setup, nofile);
    let nbthread = setup.workers();
    let mut s = format!(
        "global
    nbthread {nbthread}
    maxconn {maxconn}
    ulimit-n {nofile}

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout tunnel 1h
    http-reuse always

"
    );
    match setup {
        Setup::Simple {
            backend, stream, ..
        } => write!(
            s,
            "frontend fe
    bind 127.0.0.1:{port}
    {}
    {}
    default_backend be

backend be
    server s1 127.0.0.1:{backend}
",
            // Without it HAProxy sends with MSG_MORE and holds small
            // event-stream writes back (the streaming twin of nginx's
            // `proxy_buffering off`).
            if stream {
                "option http-no-delay"
            } else {
                "# (no streaming options)"
            },
            // The same offer as the others: TLS 1.2 + 1.3, h2 and http/1.1.
            if tls_port != 0 {
                format!(
                    "bind 127.0.0.1:{tls_port} ssl crt {} alpn h2,http/1.1 ssl-min-ver TLSv1.2",
                    tls.bundle.display()
                )
            } else {
                "# (no HTTPS)".to_string()
            }
        )
        .unwrap(),
        Setup::Switch => write!(
            s,
            "frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{}
",
            up.blue
        )
        .unwrap(),
        Setup::Limits { .. } => unreachable!("HAProxy sits out the limits scenario"),
        Setup::Cluster { .. } => unreachable!("HAProxy sits out the cluster scenario"),
        Setup::Realistic => {
            let g = &up.general;
            write!(
                s,
                "frontend fe
    bind 127.0.0.1:{port}
    timeout client 15s
    timeout http-keep-alive 15s
    unique-id-format %{{+X}}o%ci%cp%fp%Ts%rt%pid
    unique-id-header X-Request-Id
    http-response set-header X-Request-Id %[unique-id]
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    acl app hdr(host),field(1,:) -i {APP_HOST}
    acl api hdr(host),field(1,:) -i {API_HOST}
    acl app_deny path_beg /wp-admin/ /wp-login.php /xmlrpc.php /panel/ /upload.php
    acl api_deny path_beg /actuator /swagger-ui /v3/api-docs /webjars/
    http-request deny deny_status 404 if app app_deny
    http-request deny deny_status 404 if api api_deny
    # Writes per client to the API and AI routes (HAProxy's nearest to limit_req).
    stick-table type ip size 100k expire 10s store http_req_rate(1s)
    acl write method POST PUT DELETE
    acl limited path_beg /api/ /v1/
    http-request track-sc0 src if api limited write
    http-request deny deny_status 429 if api limited write {{ sc_http_req_rate(0) gt 12 }}
    use_backend api if api {{ path_beg /api/ }}
    use_backend ai if api {{ path_beg /v1/ }}
    use_backend web if app
    default_backend none

backend none
    http-request deny deny_status 404

backend web
    option httpchk GET /health
    http-check expect status 200
    server b 127.0.0.1:{} check inter 2s rise 2 fall 3

backend api
    http-request set-timeout server 31m if {{ path_reg ^/api/v1/meetings/[^/]+/settlement/progress/stream }}
    http-request set-timeout server 90s if {{ path_beg /api/v1/rag-chat/stream }}
    option httpchk GET /health
    http-check expect string ok
    server b 127.0.0.1:{} check inter 2s rise 2 fall 3

backend ai
    timeout connect 3s
    timeout server 5m
    option httpchk GET /health
    http-check expect status 200
    server b 127.0.0.1:{} check inter 5s rise 2 fall 3
",
                g[2], g[4], g[6]
            )
            .unwrap()
        }
    }
    s
}
