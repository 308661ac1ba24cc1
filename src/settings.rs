//! The `[server]` settings every request reads, part of the snapshot a
//! request loads once (`pools.rs`), so a config reload changes them for new
//! requests only.

use std::time::Duration;

use crate::config;
use crate::respond;

/// Settings every request reads, taken from `[server]` at start-up and
/// again on each config reload.
pub struct Settings {
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_header_size: usize,
    pub pages: respond::Pages,
    /// This instance's link to the cluster (`[cluster]`), for the limits
    /// with `scope = "cluster"`; `None`: a lone instance. Made once at
    /// start and kept by every reload.
    pub cluster: Option<std::sync::Arc<crate::cluster::Link>>,
}

impl Settings {
    /// `pages`: the 503 page and `Retry-After`, read from `server`'s files
    /// by the caller (`load_pages` in `lib.rs`), which reports a bad file.
    pub fn new(server: &config::Server, pages: respond::Pages) -> Settings {
        Settings {
            body_timeout: server.body_timeout,
            keepalive_timeout: server.keepalive_timeout,
            send_timeout: server.send_timeout,
            trusted_proxies: server.trusted_proxies.clone(),
            max_header_size: server.max_header_size,
            pages,
            cluster: None,
        }
    }

    /// These settings on `link`'s cluster.
    pub fn with_cluster(mut self, link: Option<std::sync::Arc<crate::cluster::Link>>) -> Settings {
        self.cluster = link;
        self
    }
}
