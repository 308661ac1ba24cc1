//! The baseline of the load test (`.ci/bench`): a bare Pingora reverse proxy
//! with Pingora's defaults (system allocator, work stealing, default upstream
//! keep-alive pool) and one worker thread, sending every request to one
//! upstream. Whatever switchyard costs beyond this is switchyard's own.
//!
//!     [BARE_PINGORA_THREADS=N] bare_pingora LISTEN_ADDR UPSTREAM_ADDR [TLS_LISTEN_ADDR CERT_PEM KEY_PEM]
//!
//! `BARE_PINGORA_THREADS` sets the worker threads (default 1; the bench's
//! `threads` scenario runs 2, work stealing on as Pingora's default).
//!
//! With the TLS arguments it also serves HTTPS the way Pingora's rustls
//! build does by default (TLS 1.2 and 1.3), with ALPN h2 and http/1.1.

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
    let usage = "usage: bare_pingora LISTEN_ADDR UPSTREAM_ADDR [TLS_LISTEN_ADDR CERT_PEM KEY_PEM]";
    let (listen, upstream, tls) = match args.as_slice() {
        [listen, upstream] => (listen, upstream, None),
        [listen, upstream, tls_listen, cert, key] => {
            (listen, upstream, Some((tls_listen, cert, key)))
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let upstream = match upstream.parse::<SocketAddr>() {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("bare_pingora: UPSTREAM_ADDR {upstream:?}: {e}");
            std::process::exit(2);
        }
    };
    let threads = match std::env::var("BARE_PINGORA_THREADS") {
        Err(_) => 1,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                eprintln!("bare_pingora: BARE_PINGORA_THREADS {v:?}: not a positive number");
                std::process::exit(2);
            }
        },
    };
    let conf = ServerConf {
        threads,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(listen);
    if let Some((tls_listen, cert, key)) = tls {
        let mut settings = match pingora::listeners::tls::TlsSettings::intermediate(cert, key) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bare_pingora: TLS settings: {e}");
                std::process::exit(2);
            }
        };
        settings.enable_h2();
        proxy.add_tls_with_settings(tls_listen, None, settings);
    }
    server.add_service(proxy);
    server.run_forever();
}
