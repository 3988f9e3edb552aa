//! A bare pingora proxy with no features, built with the same profile and allocator as
//! miosa-edge, so the load benchmark shows what our features cost on their own.
//!
//! `cargo run --release --example bare_proxy -- LISTEN ORIGIN THREADS`

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use std::net::SocketAddr;

#[global_allocator]
static GLOBAL: miosa_edge::allocator::EdgeAlloc = miosa_edge::allocator::EdgeAlloc;

struct Bare {
    origin: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.origin, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(origin)) = (args.get(1), args.get(2).and_then(|o| o.parse().ok())) else {
        eprintln!("usage: bare_proxy LISTEN ORIGIN [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    // The edge's runtime choice (src/server.rs): one thread, tokio's single-threaded
    // scheduler; several, work stealing.
    let conf = ServerConf { threads, work_stealing: threads > 1, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Bare { origin });
    svc.add_tcp(listen);
    server.add_service(svc);
    println!("bare_proxy listening on {listen}");
    server.run(RunArgs::default());
}
