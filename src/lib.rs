//! miosa-edge: the edge proxy and TLS router of the MIOSA platform, on pingora.
//!
//! It routes sandbox previews (`5173-abc12345.sandbox.miosa.app` → port 5173 of
//! sandbox `abc12345`), tenants' preview and deployment domains, and deployments'
//! active versions, answering every failure with a branded page or a JSON error.
//!
//! # Request flow
//!
//! ```text
//! accept (pingora listener)
//!  → front::Front            per-IP connection cap; TLS handshake on the https port
//!  → request_filter          request id; hostile::screen (414/431/400, closed)
//!                            table = routes.load(); route = table.lookup(host)
//!                            denied / private / suspended / static → branded page, stop
//!  → upstream_peer           sandbox addr:port | round-robin instance
//!  → upstream_request_filter X-Forwarded-For/Proto/Host, X-Request-Id; strip X-Miosa-*
//!  → response_filter         X-Request-Id; X-Robots-Tag: noindex on previews
//!  → fail_to_proxy           the single place where failures become pages
//!  → logging                 metrics
//! ```
//!
//! Everything a request reads lives in one immutable [`routing::RouteTable`] published
//! through `ArcSwap`; writers (start-up, TOML reload) validate and build a whole new
//! table off the request path and swap it in with one store.

pub mod access;
pub mod access_log;
pub mod acme;
pub mod answer;
pub mod clock;
pub mod codes;
pub mod config;
pub mod control;
pub mod dns;
pub mod front;
pub mod hook;
pub mod hostile;
pub mod metrics;
pub mod pages;
pub mod proxy;
pub mod releases;
pub mod reload;
pub mod routing;
pub mod schema;
pub mod server;
pub mod services;
pub mod state;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod usage;
