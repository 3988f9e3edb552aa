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
//!  → request_filter          request id; hostile::screen; ACME HTTP-01 answer
//!                            proxy::route: table = routes.load(); table.lookup(host)
//!                              Preview → access::authorize → Pass | Answer; [wake]
//!                              Deployment → static file | an instance
//!                            every answer → proxy::rescue (the one writer)
//!  → upstream_peer           the target chosen on the request's table
//!  → upstream_request_filter proxy::forward: X-Forwarded-*, X-Request-Id; strip X-Miosa-*
//!  → response_filter         X-Request-Id; X-Robots-Tag: noindex on previews
//!  → fail_to_proxy           rescue: a failure becomes the answer of its code
//!  → logging                 metrics, usage, access log
//! ```
//!
//! # Layers
//!
//! Dependencies point one way: leaves (`clock`, `codes`, `hook`, `metrics`, `services`,
//! `usage`, `answer`) → the contract's data (`schema`) → its rules (`state`) → what a
//! snapshot holds (`access`, `pages`) → the snapshot (`routing`) → the writers (`store`,
//! `reload`) and the services → the request path (`proxy`) → start-up (`server`).
//! `cargo test --test edge layers` checks it.
//!
//! Everything a request reads lives in one immutable [`routing::RouteTable`] published
//! through `ArcSwap`; writers build off the request path and swap it in with one store.

pub mod access;
pub mod access_log;
pub mod acme;
pub mod allocator;
pub mod answer;
pub mod clock;
pub mod cluster;
pub mod codes;
pub mod config;
pub mod control;
pub mod cow;
pub mod dns;
pub mod files;
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
pub mod storage;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod usage;
