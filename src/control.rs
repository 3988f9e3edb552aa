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
use crate::schema::{
    find_by_id, remove_by_id, upsert_by_id, Deployment, Id, Identified, Sandbox, ShareToken, State, StateError, Workspace,
};
use crate::services::{Service, Shutdown};
use crate::store::{Store, WriteError};
use crate::usage::Usage;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The OpenAPI description of this API (also served at `/v1/openapi.yaml`).
pub const OPENAPI_YAML: &str = include_str!("../docs/control-api.yaml");

/// The control API's shared state.
pub struct ControlApi {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    usage: Arc<Usage>,
    access_log: Option<Arc<AccessLog>>,
    token: Box<[u8]>,
    max_body: u64,
    verifier: Option<Verifier>,
    proxy_addr: SocketAddr,
    proxy_up: AtomicBool,
    /// The TLS certificates (`None` without `[server] https`) and the ACME service.
    certs: Option<Arc<crate::tls::Watcher>>,
    acme: Option<Arc<crate::acme::Manager>>,
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
        crate::store::write_atomic(path, secret.as_bytes(), 0o600)
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
            access_log,
            token: token.into_bytes().into_boxed_slice(),
            max_body,
            verifier,
            proxy_addr,
            proxy_up: AtomicBool::new(false),
            certs: None,
            acme: None,
            listener: std::sync::Mutex::new(None),
        }
    }

    /// Serves on `listener` once started as a service.
    pub fn with_listener(self, listener: std::net::TcpListener) -> Self {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
        self
    }

    /// Reports the certificates served and the names ACME manages.
    pub fn with_certificates(mut self, certs: Arc<crate::tls::Watcher>, acme: Option<Arc<crate::acme::Manager>>) -> Self {
        self.certs = Some(certs);
        self.acme = acme;
        self
    }

    /// `GET /v1/certificates`.
    fn get_certificates(&self) -> Response<Full<Bytes>> {
        let cert = |c: &crate::tls::Cert| {
            serde_json::json!({
                "source": c.source,
                "names": c.names,
                "issuer": c.issuer,
                "not_before": c.not_before,
                "not_after": c.not_after,
                "renew_at": c.renew_at(),
            })
        };
        let mut body = serde_json::json!({ "tls": self.certs.is_some(), "default": null, "certificates": [], "errors": [] });
        if let Some(w) = &self.certs {
            let index = w.index().load_full();
            let mut certs: Vec<&Arc<crate::tls::Cert>> = index.certs().iter().collect();
            certs.sort_by(|a, b| a.source.cmp(&b.source));
            body["default"] = cert(index.default_cert());
            body["certificates"] = certs.into_iter().map(|c| cert(c)).collect();
            body["errors"] = serde_json::to_value(w.errors()).unwrap_or_default();
        }
        if let Some(a) = &self.acme {
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
        match (&method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => return json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            (&Method::GET, ["readyz"]) => return self.readyz().await,
            _ => {}
        }
        if !self.authorized(&req) {
            let mut r = ApiError::new(401, "unauthorized", "missing or wrong bearer token").into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
        let result = match (&method, segs.as_slice()) {
            (&Method::GET, ["metrics"]) => Ok(text(StatusCode::OK, "text/plain; version=0.0.4", self.render_metrics())),
            (&Method::GET, ["v1", "usage"]) => self.get_usage(req.uri().query()),
            (&Method::GET, ["v1", "certificates"]) => Ok(self.get_certificates()),
            (&Method::GET, ["v1", "openapi.yaml"]) => Ok(text(StatusCode::OK, "application/yaml", OPENAPI_YAML.to_string())),
            (&Method::GET, ["v1", "state"]) => Ok(self.get_state()),
            (&Method::PUT, ["v1", "state"]) => self.put_state(req).await,
            (&Method::POST, ["v1", "state", "ops"]) => self.ops(req).await,
            (&Method::POST, ["v1", "deployments", id, "activate"]) => {
                let id = id.to_string();
                self.activate(id, req).await
            }
            (&Method::POST, ["v1", "domains", "verify"]) => self.verify(req).await,
            (m, ["v1", kind, id]) if Kind::from_plural(kind).is_some() => {
                let kind = Kind::from_plural(kind).unwrap_or(Kind::Sandbox);
                let id = id.to_string();
                match *m {
                    Method::GET => self.get_object(kind, &id),
                    Method::PUT => self.put_object(kind, id, req).await,
                    Method::DELETE => self.delete_object(kind, id).await,
                    _ => Err(ApiError::new(405, "method_not_allowed", "use GET, PUT or DELETE")),
                }
            }
            (
                _,
                ["metrics"]
                | ["v1", "usage"]
                | ["v1", "certificates"]
                | ["v1", "state"]
                | ["v1", "state", "ops"]
                | ["v1", "openapi.yaml"]
                | ["v1", "domains", "verify"],
            ) => Err(ApiError::new(405, "method_not_allowed", "method not allowed on this path")),
            _ => Err(ApiError::new(404, "not_found", format!("no such endpoint: {method} {path}"))),
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        self.usage.render_metrics(&mut out);
        if let Some(log) = &self.access_log {
            use std::fmt::Write;
            let _ = writeln!(out, "# HELP miosa_edge_access_log_dropped_total Access log lines dropped because the writer fell behind.");
            let _ = writeln!(out, "# TYPE miosa_edge_access_log_dropped_total counter");
            let _ = writeln!(out, "miosa_edge_access_log_dropped_total {}", log.dropped());
        }
        out
    }

    /// `GET /v1/usage[?cursor=N]`: exact per-workspace usage since the last
    /// acknowledged report; passing the last report's cursor acknowledges it.
    fn get_usage(&self, query: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
        let mut ack = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("cursor", v)) => {
                    ack =
                        Some(v.parse::<u64>().map_err(|_| {
                            ApiError::new(400, "invalid_state", "cursor must be a number from a previous report").at("cursor")
                        })?)
                }
                _ => return Err(ApiError::new(400, "invalid_state", format!("unknown query parameter `{kv}`"))),
            }
        }
        Ok(json(StatusCode::OK, &self.usage.report(ack)))
    }

    async fn readyz(&self) -> Response<Full<Bytes>> {
        if !self.proxy_up.load(Ordering::Relaxed) {
            let up = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(self.proxy_addr)).await;
            if matches!(up, Ok(Ok(_))) {
                self.proxy_up.store(true, Ordering::Relaxed);
            }
        }
        let ready = self.proxy_up.load(Ordering::Relaxed);
        let body = serde_json::json!({"ready": ready, "generation": self.store.generation()});
        json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
    }

    fn get_state(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        struct Out<'a> {
            generation: u64,
            #[serde(flatten)]
            state: &'a State,
        }
        let (generation, body) = self.store.read(|g, _toml, api, _| (g, serde_json::to_vec(&Out { generation: g, state: api })));
        let mut r = bytes_response(StatusCode::OK, "application/json", body.unwrap_or_default());
        if let Ok(v) = header::HeaderValue::from_str(&format!("\"{generation}\"")) {
            r.headers_mut().insert(header::ETAG, v);
        }
        r
    }

    async fn put_state(self: &Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            #[serde(default)]
            generation: Option<u64>,
            #[serde(default)]
            workspaces: Vec<Workspace>,
            #[serde(default)]
            sandboxes: Vec<Sandbox>,
            #[serde(default)]
            share_tokens: Vec<ShareToken>,
            #[serde(default)]
            deployments: Vec<Deployment>,
        }
        let if_match = if_match(&req)?;
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let b: Body = parse(&body)?;
            let state =
                State { workspaces: b.workspaces, sandboxes: b.sandboxes, share_tokens: b.share_tokens, deployments: b.deployments };
            api.store.replace_api(if_match.or(b.generation), state).map_err(ApiError::from)
        })
        .await
    }

    async fn ops(self: &Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            ops: Vec<serde_json::Value>,
        }
        #[derive(Deserialize)]
        #[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
        enum Op {
            Upsert { kind: KindName, value: serde_json::Value },
            Delete { kind: KindName, id: String },
        }
        let if_match = if_match(&req)?;
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let b: Body = parse(&body)?;
            let mut ops = Vec::with_capacity(b.ops.len());
            for (i, v) in b.ops.into_iter().enumerate() {
                let op: Op = serde_path_to_error::deserialize(v).map_err(|e| invalid_at(format!("ops[{i}]"), e))?;
                ops.push(match op {
                    Op::Upsert { kind, value } => (kind.0, Ok(Object::from_value(kind.0, value, &format!("ops[{i}].value"))?)),
                    Op::Delete { kind, id } => (kind.0, Err((i, id))),
                });
            }
            api.store
                .write_api(if_match, move |s| {
                    for (kind, op) in ops {
                        match op {
                            Ok(obj) => obj.upsert(s),
                            Err((i, id)) => {
                                if !kind.delete(s, &id) {
                                    return Err(WriteError::NotFound(format!("ops[{i}]: no {} `{id}`", kind.singular())));
                                }
                            }
                        }
                    }
                    Ok(())
                })
                .map_err(ApiError::from)
        })
        .await
    }

    fn get_object(&self, kind: Kind, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let found = self.store.read(|_, toml, api, _| kind.get(api, id).or_else(|| kind.get(toml, id)));
        match found {
            Some(v) => Ok(json(StatusCode::OK, &v)),
            None => Err(ApiError::new(404, "not_found", format!("no {} `{id}`", kind.singular()))),
        }
    }

    async fn put_object(self: &Arc<Self>, kind: Kind, id: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let if_match = if_match(&req)?;
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| ApiError::new(400, "invalid_json", e.to_string()))?;
            let obj = Object::from_value(kind, value, "")?;
            if obj.id() != id {
                return Err(ApiError::new(400, "invalid_state", format!("the body's id `{}` is not the path's `{id}`", obj.id())).at("id"));
            }
            api.store
                .write_api(if_match, move |s| {
                    obj.upsert(s);
                    Ok(())
                })
                .map_err(ApiError::from)
        })
        .await
    }

    async fn delete_object(self: &Arc<Self>, kind: Kind, id: String) -> Result<Response<Full<Bytes>>, ApiError> {
        self.blocking(move |api| {
            let in_toml = api.store.read(|_, toml, _, _| kind.contains(toml, &id));
            api.store
                .write_api(None, |s| {
                    if kind.delete(s, &id) {
                        Ok(())
                    } else if in_toml {
                        Err(WriteError::Conflict(StateError {
                            path: String::new(),
                            message: format!("{} `{id}` is pinned by the TOML file", kind.singular()),
                        }))
                    } else {
                        Err(WriteError::NotFound(format!("no {} `{id}`", kind.singular())))
                    }
                })
                .map_err(ApiError::from)
        })
        .await
    }

    async fn activate(self: &Arc<Self>, id: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            version: Id,
        }
        let if_match = if_match(&req)?;
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let b: Body = parse(&body)?;
            let in_toml = api.store.read(|_, toml, _, _| find_by_id(&toml.deployments, &id).is_some());
            api.store
                .write_api(if_match, |s| {
                    let Some(d) = s.deployments.iter_mut().find(|d| d.id.as_str() == id) else {
                        return Err(if in_toml {
                            WriteError::Conflict(StateError {
                                path: String::new(),
                                message: format!("deployment `{id}` is pinned by the TOML file"),
                            })
                        } else {
                            WriteError::NotFound(format!("no deployment `{id}`"))
                        });
                    };
                    if !d.versions.iter().any(|v| v.id == b.version) {
                        return Err(WriteError::Invalid(vec![StateError {
                            path: "version".into(),
                            message: format!("deployment `{id}` has no version `{}`", b.version),
                        }]));
                    }
                    d.active_version = b.version;
                    Ok(())
                })
                .map_err(ApiError::from)
        })
        .await
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
        let Some(verifier) = &self.verifier else {
            return Err(ApiError::new(503, "dns_unavailable", "no DNS resolver is configured or reachable"));
        };
        let (owner, domains) = self.store.read(|_, toml, api, domains| {
            let h = b.host.as_str();
            let owner = match b.kind {
                DomainKind::Preview | DomainKind::Deploy => api
                    .workspaces
                    .iter()
                    .chain(toml.workspaces.iter())
                    .find(|w| {
                        let d = if b.kind == DomainKind::Preview { &w.preview_domain } else { &w.deploy_domain };
                        d.as_ref().is_some_and(|d| d.host.as_str() == h)
                    })
                    .map(|w| Some(w.id.clone())),
                DomainKind::Custom => api
                    .deployments
                    .iter()
                    .chain(toml.deployments.iter())
                    .find(|d| d.domains.iter().any(|d| d.host.as_str() == h))
                    .map(|d| Some(d.workspace.clone())),
            };
            (owner, domains.clone())
        });
        let Some(owner) = owner else {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("no workspace or deployment claims `{}` as a {} domain", b.host, kind_word(b.kind)),
            )
            .at("host"));
        };
        let v = verifier.verify(&b.host, b.kind, owner.as_ref(), &domains).await;
        Ok(json(StatusCode::OK, &v))
    }

    /// Reads a JSON request body: 415 unless `Content-Type` is JSON, 413 past the limit.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(415, "unsupported_media_type", "send the body as Content-Type: application/json"));
        }
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let too_large =
            || ApiError::new(413, "payload_too_large", format!("the body is larger than control.max_body_bytes ({} bytes)", self.max_body));
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(too_large());
        }
        let limited = Limited::new(req.into_body(), usize::try_from(self.max_body).unwrap_or(usize::MAX));
        match limited.collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
            Err(e) => Err(ApiError::new(400, "invalid_json", format!("cannot read the body: {e}"))),
        }
    }

    /// Runs a write off the async thread (validation of a big state takes seconds).
    async fn blocking(
        self: &Arc<Self>,
        f: impl FnOnce(&ControlApi) -> Result<u64, ApiError> + Send + 'static,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let api = self.clone();
        let generation = tokio::task::spawn_blocking(move || f(&api))
            .await
            .map_err(|e| ApiError::new(500, "internal_error", format!("write task failed: {e}")))??;
        Ok(json(StatusCode::OK, &serde_json::json!({"generation": generation})))
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

fn if_match(req: &Request<Incoming>) -> Result<Option<u64>, ApiError> {
    if_match_header(req.headers())
}

/// `If-Match: "7"` (or `W/"7"`, or `*` for any) → the generation a write expects.
fn if_match_header(headers: &http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::new(412, "precondition_failed", "If-Match must be the generation, as in the ETag of GET /v1/state"))
}

/// The kinds of object the API manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Workspace,
    Sandbox,
    ShareToken,
    Deployment,
}

/// A kind as written in ops (`"kind": "share_token"`).
#[derive(Clone, Copy, Debug)]
struct KindName(Kind);

impl<'de> Deserialize<'de> for KindName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "workspace" => Ok(KindName(Kind::Workspace)),
            "sandbox" => Ok(KindName(Kind::Sandbox)),
            "share_token" => Ok(KindName(Kind::ShareToken)),
            "deployment" => Ok(KindName(Kind::Deployment)),
            other => {
                Err(serde::de::Error::custom(format!("unknown kind `{other}`, expected workspace, sandbox, share_token or deployment")))
            }
        }
    }
}

impl Kind {
    fn from_plural(s: &str) -> Option<Kind> {
        match s {
            "workspaces" => Some(Kind::Workspace),
            "sandboxes" => Some(Kind::Sandbox),
            "share-tokens" => Some(Kind::ShareToken),
            "deployments" => Some(Kind::Deployment),
            _ => None,
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Kind::Workspace => "workspace",
            Kind::Sandbox => "sandbox",
            Kind::ShareToken => "share token",
            Kind::Deployment => "deployment",
        }
    }

    fn get(self, s: &State, id: &str) -> Option<serde_json::Value> {
        let v = match self {
            Kind::Workspace => find_by_id(&s.workspaces, id).map(serde_json::to_value),
            Kind::Sandbox => find_by_id(&s.sandboxes, id).map(serde_json::to_value),
            Kind::ShareToken => find_by_id(&s.share_tokens, id).map(serde_json::to_value),
            Kind::Deployment => find_by_id(&s.deployments, id).map(serde_json::to_value),
        };
        v.and_then(Result::ok)
    }

    fn contains(self, s: &State, id: &str) -> bool {
        match self {
            Kind::Workspace => find_by_id(&s.workspaces, id).is_some(),
            Kind::Sandbox => find_by_id(&s.sandboxes, id).is_some(),
            Kind::ShareToken => find_by_id(&s.share_tokens, id).is_some(),
            Kind::Deployment => find_by_id(&s.deployments, id).is_some(),
        }
    }

    fn delete(self, s: &mut State, id: &str) -> bool {
        match self {
            Kind::Workspace => remove_by_id(&mut s.workspaces, id),
            Kind::Sandbox => remove_by_id(&mut s.sandboxes, id),
            Kind::ShareToken => remove_by_id(&mut s.share_tokens, id),
            Kind::Deployment => remove_by_id(&mut s.deployments, id),
        }
    }
}

/// One typed object of any kind.
enum Object {
    Workspace(Workspace),
    Sandbox(Sandbox),
    ShareToken(ShareToken),
    Deployment(Deployment),
}

impl Object {
    fn from_value(kind: Kind, v: serde_json::Value, prefix: &str) -> Result<Object, ApiError> {
        let at = |e| invalid_at(prefix.to_string(), e);
        Ok(match kind {
            Kind::Workspace => Object::Workspace(serde_path_to_error::deserialize(v).map_err(at)?),
            Kind::Sandbox => Object::Sandbox(serde_path_to_error::deserialize(v).map_err(at)?),
            Kind::ShareToken => Object::ShareToken(serde_path_to_error::deserialize(v).map_err(at)?),
            Kind::Deployment => Object::Deployment(serde_path_to_error::deserialize(v).map_err(at)?),
        })
    }

    fn id(&self) -> &str {
        match self {
            Object::Workspace(o) => o.id_str(),
            Object::Sandbox(o) => o.id_str(),
            Object::ShareToken(o) => o.id_str(),
            Object::Deployment(o) => o.id_str(),
        }
    }

    /// Replaces the object with the same id, or appends it.
    fn upsert(self, s: &mut State) {
        match self {
            Object::Workspace(o) => upsert_by_id(&mut s.workspaces, o),
            Object::Sandbox(o) => upsert_by_id(&mut s.sandboxes, o),
            Object::ShareToken(o) => upsert_by_id(&mut s.share_tokens, o),
            Object::Deployment(o) => upsert_by_id(&mut s.deployments, o),
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
    path: Option<String>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), path: None }
    }

    fn at(mut self, path: impl Into<String>) -> ApiError {
        let p = path.into();
        self.path = (!p.is_empty()).then_some(p);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut e = serde_json::json!({"code": self.code, "message": self.message});
        if let Some(p) = self.path {
            e["path"] = p.into();
        }
        json(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &serde_json::json!({ "error": e }))
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Invalid(errs) => {
                let first = errs.into_iter().next().unwrap_or(StateError { path: String::new(), message: "invalid state".into() });
                ApiError::new(400, "invalid_state", first.message).at(first.path)
            }
            WriteError::Conflict(c) => ApiError::new(409, "conflict", c.message).at(c.path),
            e @ WriteError::Stale { .. } => ApiError::new(412, "precondition_failed", e.to_string()),
            WriteError::NotFound(m) => ApiError::new(404, "not_found", m),
            e @ WriteError::Persist(_) => {
                tracing::error!(error = %e, "state write not persisted");
                ApiError::new(500, "internal_error", e.to_string())
            }
        }
    }
}

fn invalid_at(prefix: String, e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner_path = e.path().to_string();
    let path = match (prefix.is_empty(), inner_path.as_str()) {
        (_, ".") => prefix,
        (true, p) => p.to_string(),
        (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
        (false, p) => format!("{prefix}.{p}"),
    };
    ApiError::new(400, "invalid_state", e.into_inner().to_string()).at(path)
}

/// Parses a JSON body: syntax errors are `invalid_json`, schema errors `invalid_state`
/// with the path of the bad field.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Valid bodies (nearly all) parse without tracking the path, about a fifth faster on a
    // 100k-sandbox state; a refused one is parsed again, with it, for the error's path.
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => {
            return Err(ApiError::new(400, "invalid_json", e.into_inner().to_string()))
        }
        Err(e) => return Err(invalid_at(String::new(), e)),
    };
    de.end().map_err(|e| ApiError::new(400, "invalid_json", e.to_string()))?;
    Ok(v)
}

fn bytes_response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, v: &impl Serialize) -> Response<Full<Bytes>> {
    bytes_response(status, "application/json", serde_json::to_vec(v).unwrap_or_default())
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    bytes_response(status, content_type, body.into_bytes())
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
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::IF_MATCH, header::HeaderValue::from_str(v).unwrap());
            if_match_header(&h).map_err(|e| e.status)
        };
        assert_eq!(parse("\"7\""), Ok(Some(7)));
        assert_eq!(parse("W/\"7\""), Ok(Some(7)));
        assert_eq!(parse("*"), Ok(None));
        assert_eq!(parse("\"x\""), Err(412));
        assert_eq!(if_match_header(&http::HeaderMap::new()).map_err(|e| e.status), Ok(None));
    }
}
