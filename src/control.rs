//! The embedded control API (CONTRACT §4): how the control plane pushes routes.
//!
//! A hyper HTTP/1.1 server run as a [`Service`] off the proxy's threads; heavy writes
//! (validating and building a large table) run on the services' blocking pool. Every
//! route but `/healthz` and `/readyz` needs `Authorization: Bearer <token>` (compared in
//! constant time). Writes go through [`Store::write_api`]: validated whole, persisted,
//! then published and acknowledged with `{"generation": N}`; a refused write changes
//! nothing. Errors are `{"error":{"code","message","path"}}`.

use crate::access_log::AccessLog;
use crate::dns::{DomainKind, Verifier};
use crate::metrics::Metrics;
use crate::schema::Kind;
use crate::services::{Service, Shutdown};
use crate::store::Store;
use crate::usage::Usage;
use bytes::Bytes;
use error::{bytes_response, json, parse};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod error;
mod writes;

pub use error::ApiError;

/// The OpenAPI description of this API (also served at `/v1/openapi.yaml`).
pub const OPENAPI_YAML: &str = include_str!("../docs/control-api.yaml");

/// The control API's shared state.
pub struct ControlApi {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    usage: Arc<Usage>,
    /// Replaced by config reloads (`[log] access`).
    access_log: Arc<arc_swap::ArcSwapOption<AccessLog>>,
    token: Box<[u8]>,
    /// `[control] max_body_bytes`, replaced by config reloads.
    max_body: Arc<std::sync::atomic::AtomicU64>,
    /// Replaced by config reloads (`[dns] nameservers`); `None`: unavailable.
    verifier: Arc<arc_swap::ArcSwapOption<Verifier>>,
    proxy_addr: SocketAddr,
    proxy_up: AtomicBool,
    /// The TLS certificates (`None` without `[server] https`) and the ACME service.
    certs: Option<Arc<crate::tls::Watcher>>,
    /// Replaced when a reload changes `[acme]`.
    acme: Arc<arc_swap::ArcSwapOption<crate::acme::Manager>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Fleet mode: `GET /v1/usage` answers the fleet's counts.
    fleet_usage: Option<Arc<crate::cluster::counters::FleetUsage>>,
    /// Taken by [`Service::run`].
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
}

/// Why the control API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("refusing to serve the control API on non-loopback {addr} without a token: set {env}")]
    NoTokenOnPublicAddress { addr: SocketAddr, env: String },
    #[error("cannot write the generated secret to {path}: {source}")]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate a control token: no system randomness")]
    Random,
    #[error("cannot start the control API: {0}")]
    Io(#[from] std::io::Error),
}

/// The bearer token: from `env` if set, else the one in `<state_dir>/control.token`
/// (generated with mode 0600 if missing). Refuses a non-loopback listener without an
/// explicit token.
pub fn resolve_token(env: &str, listen: SocketAddr, state_dir: &Path) -> Result<String, ControlError> {
    if let Ok(t) = std::env::var(env) {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    if !listen.ip().is_loopback() {
        return Err(ControlError::NoTokenOnPublicAddress { addr: listen, env: env.to_string() });
    }
    let path = state_dir.join("control.token");
    let (token, generated) = secret_file(&path)?;
    if generated {
        tracing::warn!(file = %path.display(), "{env} is not set: generated a control API token and wrote it to this file (mode 0600)");
    } else {
        tracing::info!(file = %path.display(), "control API token read from file ({env} is not set)");
    }
    Ok(token)
}

/// A secret kept in `path`: read if it holds at least 32 characters, else 32 random
/// bytes as hex written there (mode 0600, temp file + fsync + rename). Returns the
/// secret and whether it was generated now.
pub fn secret_file(path: &Path) -> Result<(String, bool), ControlError> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim();
        if t.len() >= 32 {
            return Ok((t.to_string(), false));
        }
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| ControlError::Random)?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        crate::files::write_atomic(path, secret.as_bytes(), 0o600)
    };
    write().map_err(|source| ControlError::TokenFile { path: path.to_owned(), source })?;
    Ok((secret, true))
}

impl ControlApi {
    /// The API over `store`; `proxy_addr` is probed by `/readyz`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        usage: Arc<Usage>,
        access_log: Option<Arc<AccessLog>>,
        token: String,
        max_body: u64,
        nameservers: Option<&[SocketAddr]>,
        proxy_addr: SocketAddr,
    ) -> ControlApi {
        let verifier = match Verifier::new(nameservers) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "domain verification unavailable");
                None
            }
        };
        ControlApi {
            store,
            metrics,
            usage,
            access_log: Arc::new(arc_swap::ArcSwapOption::new(access_log)),
            token: token.into_bytes().into_boxed_slice(),
            max_body: Arc::new(std::sync::atomic::AtomicU64::new(max_body)),
            verifier: Arc::new(arc_swap::ArcSwapOption::new(verifier.map(Arc::new))),
            proxy_addr,
            proxy_up: AtomicBool::new(false),
            certs: None,
            acme: Arc::default(),
            cluster: None,
            fleet_usage: None,
            listener: std::sync::Mutex::new(None),
        }
    }

    /// Where a config reload publishes a new domain verifier (`[dns] nameservers`).
    pub fn verifier(&self) -> Arc<arc_swap::ArcSwapOption<Verifier>> {
        self.verifier.clone()
    }

    /// Where a config reload publishes a new access log (`[log] access`).
    pub fn access_log(&self) -> Arc<arc_swap::ArcSwapOption<AccessLog>> {
        self.access_log.clone()
    }

    /// Where a config reload sets a new `[control] max_body_bytes`.
    pub fn max_body(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.max_body.clone()
    }

    /// Serves on `listener` once started as a service.
    pub fn with_listener(self, listener: std::net::TcpListener) -> Self {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
        self
    }

    /// Fleet mode: readiness follows the fleet, `GET /v1/cluster` lists its nodes.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Answers `GET /v1/usage` with the fleet's counts (CONTRACT §11).
    pub fn with_fleet_usage(mut self, fleet: Arc<crate::cluster::counters::FleetUsage>) -> Self {
        self.fleet_usage = Some(fleet);
        self
    }

    /// `GET /v1/cluster`: the nodes that reported within the last minute (a single node
    /// lists itself).
    async fn get_cluster(&self) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some(c) = self.cluster.clone() else {
            let node = serde_json::json!({
                "node": crate::config::host_name(),
                "generation": self.store.generation(),
                "ready": self.proxy_up.load(Ordering::Relaxed),
                "last_seen": crate::schema::Timestamp(crate::clock::unix_now()).to_rfc3339(),
            });
            return Ok(json(StatusCode::OK, &serde_json::json!({ "nodes": [node] })));
        };
        let nodes = tokio::task::spawn_blocking(move || c.nodes())
            .await
            .map_err(|e| ApiError::Internal(format!("cluster task failed: {e}")))?
            .map_err(|e| ApiError::ClusterUnavailable(format!("Redis: {e}")))?;
        Ok(json(StatusCode::OK, &serde_json::json!({ "nodes": nodes })))
    }

    /// Reports the certificates served and the names ACME manages.
    pub fn with_certificates(mut self, certs: Arc<crate::tls::Watcher>, acme: Option<Arc<crate::acme::Manager>>) -> Self {
        self.certs = Some(certs);
        self.acme.store(acme);
        self
    }

    /// Where a config reload publishes the ACME service it started (or `None`).
    pub fn acme(&self) -> Arc<arc_swap::ArcSwapOption<crate::acme::Manager>> {
        self.acme.clone()
    }

    /// `GET /v1/certificates` (CONTRACT §4): every certificate served, the default
    /// included, as `names`, `issuer`, `not_before`/`not_after`/`renew_after` (RFC 3339),
    /// `source` (`acme` for those ACME or the fleet obtained, `file` for the operator's,
    /// `default`), its store `entry` and its `last_error`; then the load errors of
    /// `certs_dir` entries and, with `[acme]`, the managed names and the CA budget.
    fn get_certificates(&self) -> Response<Full<Bytes>> {
        let rfc3339 = |t: i64| crate::schema::Timestamp(t).to_rfc3339();
        // The ACME service of now (a reload may replace it).
        let acme = self.acme.load_full();
        let mut body = serde_json::json!({ "tls": self.certs.is_some(), "certificates": [], "errors": [] });
        if let Some(w) = &self.certs {
            let index = w.index().load_full();
            let errors = w.errors();
            let statuses = acme.as_ref().map(|a| a.statuses()).unwrap_or_default();
            let default = index.default_cert();
            let mut certs: Vec<&Arc<crate::tls::Cert>> = index.certs().iter().collect();
            certs.sort_by(|a, b| a.source.cmp(&b.source));
            let list: Vec<serde_json::Value> = std::iter::once(default)
                .chain(certs.into_iter().filter(|c| !Arc::ptr_eq(c, default)))
                .map(|c| {
                    let managed: Vec<&crate::acme::SubjectStatus> =
                        statuses.iter().filter(|s| crate::acme::entry_name(&s.name) == c.source).collect();
                    let (source, entry) = if Arc::ptr_eq(c, default) {
                        ("default", None)
                    } else if !managed.is_empty() || w.store().obtained_by_acme(&c.source) {
                        ("acme", Some(c.source.as_str()))
                    } else {
                        ("file", Some(c.source.as_str()))
                    };
                    // ACME's last failure for the names it renews, else the entry's last
                    // load failure (the certificate listed is the last good one).
                    let last_error = managed
                        .iter()
                        .find_map(|s| s.last_error.clone())
                        .or_else(|| entry.and_then(|e| errors.iter().find(|l| l.entry == e).map(|l| l.error.clone())));
                    let renew_after = acme.as_ref().map(|a| a.renew_after(c)).unwrap_or_else(|| c.renew_at());
                    serde_json::json!({
                        "names": c.names,
                        "issuer": c.issuer,
                        "not_before": rfc3339(c.not_before),
                        "not_after": rfc3339(c.not_after),
                        "renew_after": rfc3339(renew_after),
                        "source": source,
                        "entry": entry,
                        "last_error": last_error,
                    })
                })
                .collect();
            body["certificates"] = list.into();
            body["errors"] = serde_json::to_value(errors).unwrap_or_default();
        }
        if let Some(a) = acme {
            body["managed"] = serde_json::to_value(a.statuses()).unwrap_or_default();
            body["budget"] = a.budget();
        }
        json(StatusCode::OK, &body)
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(v) = req.headers().get(header::AUTHORIZATION) else { return false };
        let Some(t) = v.as_bytes().strip_prefix(b"Bearer ") else { return false };
        constant_time_eq(t.trim_ascii(), &self.token)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        // A method a known path does not offer is answered before the token is checked,
        // like any method on it: the answer says nothing about the state.
        if let Some(allow) = allowed_methods(&segs) {
            if !allow.split(", ").any(|m| m == method.as_str()) {
                return ApiError::MethodNotAllowed(allow).into_response();
            }
        }
        match (&method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => return json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            (&Method::GET, ["readyz"]) => return self.readyz().await,
            _ => {}
        }
        if !self.authorized(&req) {
            return ApiError::Unauthorized.into_response();
        }
        let result = match (&method, segs.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                Ok(bytes_response(StatusCode::OK, "text/plain; version=0.0.4", self.render_metrics().into_bytes()))
            }
            (&Method::GET, ["v1", "usage"]) => self.get_usage(req.uri().query()).await,
            (&Method::GET, ["v1", "certificates"]) => Ok(self.get_certificates()),
            (&Method::GET, ["v1", "cluster"]) => self.get_cluster().await,
            (&Method::GET, ["v1", "openapi.yaml"]) => {
                Ok(bytes_response(StatusCode::OK, "application/yaml", OPENAPI_YAML.as_bytes().to_vec()))
            }
            (&Method::GET, ["v1", "state"]) => Ok(self.get_state()),
            (&Method::PUT, ["v1", "state"]) => self.put_state(req).await,
            (&Method::POST, ["v1", "state", "ops"]) => self.ops(req).await,
            (&Method::POST, ["v1", "deployments", id, "activate"]) => {
                let id = id.to_string();
                self.activate(id, req).await
            }
            (&Method::POST, ["v1", "domains", "verify"]) => self.verify(req).await,
            (m, ["v1", kind, id]) if Kind::from_path(kind).is_some() => {
                let kind = Kind::from_path(kind).unwrap_or(Kind::Sandbox);
                let id = id.to_string();
                match *m {
                    Method::GET => self.get_object(kind, &id),
                    Method::PUT => self.put_object(kind, id, req).await,
                    Method::DELETE => self.delete_object(kind, id).await,
                    _ => Err(ApiError::MethodNotAllowed("GET, PUT, DELETE")),
                }
            }
            _ => Err(ApiError::not_found(format!("no such endpoint: {method} {path}"))),
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        self.usage.render_metrics(&mut out);
        if let Some(log) = &*self.access_log.load() {
            use std::fmt::Write;
            let _ = writeln!(out, "# HELP miosa_edge_access_log_dropped_total Access log lines dropped because the writer fell behind.");
            let _ = writeln!(out, "# TYPE miosa_edge_access_log_dropped_total counter");
            let _ = writeln!(out, "miosa_edge_access_log_dropped_total {}", log.dropped());
        }
        out
    }

    /// `GET /v1/usage[?cursor=N]`: exact per-workspace usage since the last
    /// acknowledged report; passing the last report's cursor acknowledges it.
    async fn get_usage(&self, query: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
        let mut ack = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("cursor", v)) => {
                    ack = Some(v.parse::<u64>().map_err(|_| ApiError::invalid("cursor must be a number from a previous report", "cursor"))?)
                }
                _ => return Err(ApiError::invalid(format!("unknown query parameter `{kv}`"), "")),
            }
        }
        if let Some(fleet) = &self.fleet_usage {
            // Redis round-trips on a blocking connection: off the async threads.
            let fleet = fleet.clone();
            let report = tokio::task::spawn_blocking(move || fleet.report(ack))
                .await
                .map_err(|e| ApiError::Internal(format!("usage report failed: {e}")))?
                .map_err(|e| ApiError::ClusterUnavailable(format!("the fleet's usage counts cannot be read: {e}")))?;
            return Ok(json(StatusCode::OK, &report));
        }
        // A report saves the cursor durably: off the async threads.
        let usage = self.usage.clone();
        let report = tokio::task::spawn_blocking(move || usage.report(ack))
            .await
            .map_err(|e| ApiError::Internal(format!("usage report failed: {e}")))?;
        Ok(json(StatusCode::OK, &report))
    }

    async fn readyz(&self) -> Response<Full<Bytes>> {
        if !self.proxy_up.load(Ordering::Relaxed) {
            let up = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(self.proxy_addr)).await;
            if matches!(up, Ok(Ok(_))) {
                self.proxy_up.store(true, Ordering::Relaxed);
            }
        }
        // In a fleet: caught up with it, or cut off from Redis with a state of its own.
        let ready = self.proxy_up.load(Ordering::Relaxed) && self.cluster.as_ref().is_none_or(|c| c.ready());
        let body = serde_json::json!({"ready": ready, "generation": self.store.generation()});
        json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
    }

    async fn verify(self: &Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            host: crate::schema::Host,
            kind: DomainKind,
        }
        let body = self.body(req).await?;
        let b: Body = parse(&body)?;
        let Some(verifier) = self.verifier.load_full() else {
            return Err(ApiError::DnsUnavailable);
        };
        let published = self.store.published();
        let h = b.host.as_str();
        let owner = match b.kind {
            DomainKind::Preview | DomainKind::Deploy => published
                .objects
                .workspaces
                .iter()
                .find(|w| {
                    let d = if b.kind == DomainKind::Preview { &w.obj.preview_domain } else { &w.obj.deploy_domain };
                    d.as_ref().is_some_and(|d| d.host.as_str() == h)
                })
                .map(|w| Some(w.obj.id.clone())),
            DomainKind::Custom => published
                .objects
                .deployments
                .iter()
                .find(|d| d.obj.domains.iter().any(|d| d.host.as_str() == h))
                .map(|d| Some(d.obj.workspace.clone())),
        };
        let domains = (*published.domains).clone();
        let Some(owner) = owner else {
            return Err(ApiError::NotFound {
                message: format!("no workspace or deployment claims `{}` as a {} domain", b.host, kind_word(b.kind)),
                path: Some("host".into()),
            });
        };
        let v = verifier.verify(&b.host, b.kind, owner.as_ref(), &domains).await;
        Ok(json(StatusCode::OK, &v))
    }
}

#[async_trait::async_trait]
impl Service for ControlApi {
    fn name(&self) -> &'static str {
        "control API"
    }

    /// Accepts control connections until the process begins to stop (a process started
    /// with `--upgrade` binds the port next); connections already open finish.
    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let listener = self.listener.lock().unwrap_or_else(|p| p.into_inner()).take();
        let listener = match listener.map(|l| l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l))) {
            Some(Ok(l)) => l,
            Some(Err(e)) => return tracing::error!(error = %e, "control API listener failed"),
            None => return tracing::error!("control API started without a listener"),
        };
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait() => break,
            };
            let (sock, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let api = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
                let _ = conn.await;
            });
        }
        drop(listener);
        tracing::info!("control API closed: the process is stopping");
    }
}

/// The methods a known path offers, as its `Allow` header lists them (`None`: no such
/// endpoint).
fn allowed_methods(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        ["healthz"] | ["readyz"] | ["metrics"] => "GET",
        ["v1", "usage" | "certificates" | "cluster" | "openapi.yaml"] => "GET",
        ["v1", "state"] => "GET, PUT",
        ["v1", "state", "ops"] | ["v1", "domains", "verify"] | ["v1", "deployments", _, "activate"] => "POST",
        ["v1", kind, _] if Kind::from_path(kind).is_some() => "GET, PUT, DELETE",
        _ => return None,
    })
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn kind_word(k: DomainKind) -> &'static str {
    match k {
        DomainKind::Preview => "preview",
        DomainKind::Deploy => "deploy",
        DomainKind::Custom => "custom",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_file_or_generated_never_on_public_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let env = "MIOSA_EDGE_TEST_TOKEN_NEVER_SET";
        let public: SocketAddr = "0.0.0.0:9180".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:9180".parse().unwrap();
        assert!(matches!(resolve_token(env, public, dir.path()), Err(ControlError::NoTokenOnPublicAddress { .. })));
        assert!(!dir.path().join("control.token").exists());

        let t = resolve_token(env, loopback, dir.path()).unwrap();
        assert_eq!(t.len(), 64);
        let path = dir.path().join("control.token");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), t);
        // A restart reuses it, so the control plane's copy stays valid.
        assert_eq!(resolve_token(env, loopback, dir.path()).unwrap(), t);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn if_match_forms() {
        use writes::if_match_header;
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::IF_MATCH, header::HeaderValue::from_str(v).unwrap());
            if_match_header(&h).map_err(|e| e.status().as_u16())
        };
        assert_eq!(parse("\"7\""), Ok(Some(7)));
        assert_eq!(parse("W/\"7\""), Ok(Some(7)));
        assert_eq!(parse("*"), Ok(None));
        assert_eq!(parse("\"x\""), Err(412));
        assert_eq!(if_match_header(&http::HeaderMap::new()).map_err(|e| e.status().as_u16()), Ok(None));
    }
}
