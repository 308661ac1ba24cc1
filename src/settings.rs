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
        }
    }
}
