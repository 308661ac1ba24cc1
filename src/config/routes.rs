//! `[[routes]]`: which host and path prefix go to which service (or are
//! denied), with each route's transport limits and their defaults.

use std::collections::HashMap;
use std::time::Duration;

use toml::Spanned;

use super::{file, line_col, names, Concurrency, RateLimit, Service, TokenBudget, Validator};

/// Longest wait for bytes from a backend on a route (60 s), like nginx's `proxy_read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle limit of an upgraded (WebSocket) connection (1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest request body on a route (1 MiB): uploads go to S3 directly.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lower-case host without port; `None` matches requests for hosts that have no routes.
    pub host: Option<String>,
    /// Prefix of the normalized request path, starting with `/`; a `*`
    /// segment matches exactly one whole segment (see `route.rs`).
    pub path: String,
    pub action: RouteAction,
    pub limits: RouteLimits,
}

impl Route {
    /// The route as metrics and logs name it: host and path
    /// (`api.example.com/v1/`), `*` for a route without a host (`*/`).
    pub fn label(&self) -> String {
        format!("{}{}", self.host.as_deref().unwrap_or("*"), self.path)
    }
}

/// Per-route transport settings: what kind of traffic the route carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimits {
    /// Whether WebSocket upgrades are passed through.
    pub websocket: bool,
    /// Idle limit of an upgraded connection.
    pub idle_timeout: Duration,
    /// Longest wait for bytes from the backend (long for SSE streams).
    pub read_timeout: Duration,
    pub max_body: usize,
    /// Index into [`Config::rate_limits`](super::Config::rate_limits) of the
    /// limit this route counts against.
    pub rate_limit: Option<usize>,
    /// Index into [`Config::concurrency`](super::Config::concurrency) of the
    /// in-flight cap this route's requests hold a slot of.
    pub concurrency: Option<usize>,
    /// Index into [`Config::token_budgets`](super::Config::token_budgets)
    /// of the token budget this route's OpenAI-compatible completions are
    /// charged to. A route with one is an AI route: its refusals take
    /// OpenAI's error shape.
    pub token_budget: Option<usize>,
}

impl Default for RouteLimits {
    fn default() -> Self {
        RouteLimits {
            websocket: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            rate_limit: None,
            concurrency: None,
            token_budget: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAction {
    /// Proxy to the service with this index in
    /// [`Config::services`](super::Config::services).
    Proxy(usize),
    /// Answer 404 from the proxy; the request never reaches a backend.
    Deny,
}

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        routes: Vec<Spanned<file::Route>>,
        services: &[Service],
        rate_limits: &[RateLimit],
        concurrency: &[Concurrency],
        token_budgets: &[TokenBudget],
    ) -> Vec<Route> {
        // (host, path) -> line of the route that claimed it first.
        let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut out = Vec::new();
        for spanned in routes {
            let r = spanned.get_ref();
            let host = match &r.host {
                None => None,
                Some(h) => {
                    // The grammar requests are held to (host.rs), so every
                    // host a request can name can also be routed, and in the
                    // same canonical form (lower case, no trailing dot).
                    match crate::host::Authority::parse(h.get_ref().as_bytes()) {
                        Ok(a) if a.port().is_none() && !h.get_ref().ends_with(':') => {
                            Some(a.host().to_string())
                        }
                        _ => {
                            self.at(
                                h,
                                format!(
                                    "bad host {:?}: give a host name, an IPv4 address or a bracketed IPv6 address, without port or scheme, e.g. \"api.example.com\"",
                                    h.get_ref()
                                ),
                            );
                            Some(h.get_ref().to_ascii_lowercase())
                        }
                    }
                }
            };
            if !r.path.get_ref().starts_with('/') {
                self.at(
                    &r.path,
                    format!("route path {:?} must start with '/'", r.path.get_ref()),
                );
            } else if let Some(problem) = crate::route::route_path_error(r.path.get_ref()) {
                self.at(
                    &r.path,
                    format!("route path {:?}: {problem}", r.path.get_ref()),
                );
            }
            let action = match (&r.service, &r.action) {
                (Some(svc), None) => match services.iter().position(|s| s.name == *svc.get_ref()) {
                    Some(i) => Some(RouteAction::Proxy(i)),
                    // Its table had a mistake, already reported.
                    None if self.was_dropped("services", svc.get_ref()) => None,
                    None => {
                        self.at(
                            svc,
                            format!(
                                "route to unknown service {:?}; defined services: {}",
                                svc.get_ref(),
                                names(services.iter().map(|s| s.name.as_str()))
                            ),
                        );
                        None
                    }
                },
                (None, Some(a)) if a.get_ref() == "deny" => Some(RouteAction::Deny),
                (None, Some(a)) => {
                    self.at(
                        a,
                        format!(
                            "unknown route action {:?}; the only action is \"deny\"",
                            a.get_ref()
                        ),
                    );
                    None
                }
                _ => {
                    self.at(
                        &spanned,
                        "a route needs exactly one of `service = \"NAME\"` or `action = \"deny\"`"
                            .into(),
                    );
                    None
                }
            };
            let line = line_col(self.text, spanned.span().start).0;
            let key = (host.clone(), r.path.get_ref().clone());
            let duplicate = seen.get(&key).copied();
            if let Some(first) = duplicate {
                self.at(
                    &spanned,
                    format!(
                        "duplicate route: host {} path {:?} is already routed by the route on line {first}",
                        host.as_deref().unwrap_or("(any)"),
                        r.path.get_ref()
                    ),
                );
            } else {
                seen.insert(key, line);
            }
            let rate_limit = r.rate_limit.as_ref().and_then(|name| {
                let found = rate_limits.iter().position(|l| l.name == *name.get_ref());
                if found.is_none() && !self.was_dropped("rate_limits", name.get_ref()) {
                    self.at(
                        name,
                        format!(
                            "route uses unknown rate limit {:?}; defined [rate_limits]: {}",
                            name.get_ref(),
                            names(rate_limits.iter().map(|l| l.name.as_str()))
                        ),
                    );
                }
                found
            });
            let concurrency = r.concurrency.as_ref().and_then(|name| {
                let found = concurrency.iter().position(|c| c.name == *name.get_ref());
                if found.is_none() && !self.was_dropped("concurrency", name.get_ref()) {
                    self.at(
                        name,
                        format!(
                            "route uses unknown concurrency cap {:?}; defined [concurrency]: {}",
                            name.get_ref(),
                            names(concurrency.iter().map(|c| c.name.as_str()))
                        ),
                    );
                }
                found
            });
            let token_budget = r.token_budget.as_ref().and_then(|name| {
                let found = token_budgets.iter().position(|b| b.name == *name.get_ref());
                if found.is_none() && !self.was_dropped("token_budgets", name.get_ref()) {
                    self.at(
                        name,
                        format!(
                            "route uses unknown token budget {:?}; defined [token_budgets]: {}",
                            name.get_ref(),
                            names(token_budgets.iter().map(|b| b.name.as_str()))
                        ),
                    );
                }
                found
            });
            let defaults = RouteLimits::default();
            let limits = RouteLimits {
                websocket: r.websocket.unwrap_or(false),
                // Long streams (SSE, WebSockets) use the whole general range.
                idle_timeout: self.duration(r.idle_timeout.as_ref(), defaults.idle_timeout),
                read_timeout: self.duration(r.read_timeout.as_ref(), defaults.read_timeout),
                max_body: self.size(r.max_body.as_ref(), defaults.max_body),
                rate_limit,
                concurrency,
                token_budget,
            };
            if let (Some(action), None) = (action, duplicate) {
                out.push(Route {
                    host,
                    path: r.path.get_ref().clone(),
                    action,
                    limits,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::{errors, GOOD};
    use crate::config::Config;

    #[test]
    fn unknown_service_is_located() {
        let text = GOOD.replace("service = \"api\"", "service = \"apx\"");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].col), (17, 11));
        assert!(e[0].message.contains("unknown service \"apx\""), "{}", e[0]);
    }

    #[test]
    fn duplicate_route_names_the_first_line() {
        let text = format!("{GOOD}\n[[routes]]\npath = \"/actuator\"\naction = \"deny\"\n");
        let e = errors(&text);
        assert!(e[0].message.contains("on line 19"), "{}", e[0]);
    }

    #[test]
    fn route_hosts_follow_the_request_host_grammar() {
        let with_host = |h: &str| GOOD.replace("API.example.com", h);
        for (written, canonical) in [
            ("API.Example.com.", "api.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("[0:0::1]", "[::1]"),
            ("[2001:DB8:0:0::1]", "[2001:db8::1]"),
            ("under_score.example", "under_score.example"),
        ] {
            let c = Config::parse(Path::new("t.toml"), &with_host(written)).unwrap();
            assert_eq!(c.routes[0].host.as_deref(), Some(canonical), "{written}");
            // A request naming the host any valid way reaches the route.
            let table = crate::route::RouteTable::new(&c.routes);
            let request =
                crate::host::Authority::parse(format!("{written}:8443").as_bytes()).unwrap();
            assert!(table
                .resolve(Some(request.host()), "/api/x")
                .unwrap()
                .is_some());
        }
        for bad in [
            "a.com:80",
            "a.com:",
            "http://a.com",
            "a b",
            "a..b",
            "",
            "::1",
            "1.2.3",
            "[::ffff:127.0.0.1]",
        ] {
            let e = errors(&with_host(bad));
            assert!(e[0].message.contains("bad host"), "{bad}: {}", e[0]);
        }
    }
}
