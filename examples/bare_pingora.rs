//! The baseline of the load test (`.ci/bench`): a bare Pingora reverse proxy
//! with Pingora's defaults (system allocator, work stealing, default upstream
//! keep-alive pool) and one worker thread, sending every request to one
//! upstream. Whatever switchyard costs beyond this is switchyard's own.
//!
//!     bare_pingora LISTEN_ADDR UPSTREAM_ADDR

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream) = match args.as_slice() {
        [listen, upstream] => match upstream.parse::<SocketAddr>() {
            Ok(upstream) => (listen.clone(), upstream),
            Err(e) => {
                eprintln!("bare_pingora: UPSTREAM_ADDR {upstream:?}: {e}");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: bare_pingora LISTEN_ADDR UPSTREAM_ADDR");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads: 1,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
