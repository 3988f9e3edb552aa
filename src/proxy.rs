//! `EdgeProxy`: pingora's `ProxyHttp` phases, each short and delegating.
//!
//! ```text
//! request_filter          request id; host → one routes.load() → Route
//!                         Denied / private / suspended / static → page (rescue)
//! upstream_peer           sandbox address:port | round-robin instance
//! upstream_request_filter X-Forwarded-*, X-Request-Id; strip X-Miosa-*
//! response_filter         X-Request-Id; X-Robots-Tag on previews
//! fail_to_connect         one retry on another instance (deployments)
//! fail_to_proxy           the single place where failures become pages
//! logging                 metrics
//! ```
//!
//! Invariant: the edge only connects to addresses found in the route table loaded by
//! this request (`RequestCtx::table`), never to one derived from the request.

use crate::access_log::{self, AccessLog};
use crate::metrics::{Metrics, RouteKind, UpstreamFailure};
use crate::pages::{Detail, ErrorCode, Pages, PAGE_CSP};
use crate::routing::{normalize_host, ActiveRelease, Route, RouteTable, SharedTable};
use crate::state::{Access, SandboxState};
use crate::usage::{Kind as UsageKind, Usage, UsageCell};
use async_trait::async_trait;
use http::header::{self, HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Header names used on every request. pingora's `insert_header` parses the name from
// its case-preserving form either way; a `&'static str` spares the copy a `HeaderName`
// would need (measured with callgrind: each insert costs ~1.5k instructions in pingora).
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const XRID: &str = "X-Request-Id";
const XFF: &str = "X-Forwarded-For";
const XFP: &str = "X-Forwarded-Proto";
const XFH: &str = "X-Forwarded-Host";
const XRT: &str = "X-Robots-Tag";
static NOINDEX: HeaderValue = HeaderValue::from_static("noindex");
static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Upstream timeouts.
#[derive(Clone, Copy, Debug)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `X-Forwarded-Proto` of this listener.
    pub tls: bool,
}

/// The proxy application.
pub struct EdgeProxy {
    routes: SharedTable,
    metrics: Arc<Metrics>,
    usage: Arc<Usage>,
    access_log: Option<Arc<AccessLog>>,
    opts: ProxyOptions,
    ids: RequestIds,
}

/// Where a request is going.
#[derive(Debug, Clone, Copy)]
enum Target {
    Sandbox { addr: SocketAddr },
    Deployment { index: u32, addr: SocketAddr },
}

/// Per-request state shared by the phases.
pub struct RequestCtx {
    start: Instant,
    /// The one table this request routes on.
    table: Option<Arc<RouteTable>>,
    /// Shared (reference-counted) by the upstream request and the response.
    request_id: HeaderValue,
    kind: RouteKind,
    target: Option<Target>,
    branding: u32,
    preview: bool,
    port: Option<u16>,
    retries: u8,
    /// Status of an edge-generated answer (for logging).
    edge_status: Option<u16>,
    /// Usage counters of the workspace, deployment and sandbox this request is for.
    usage: [Option<Arc<UsageCell>>; 3],
}

impl EdgeProxy {
    /// A proxy reading routes from `routes`.
    pub fn new(
        routes: SharedTable,
        metrics: Arc<Metrics>,
        usage: Arc<Usage>,
        access_log: Option<Arc<AccessLog>>,
        opts: ProxyOptions,
    ) -> EdgeProxy {
        EdgeProxy { routes, metrics, usage, access_log, opts, ids: RequestIds::new() }
    }

    fn attribute(&self, ctx: &mut RequestCtx, table: &RouteTable, workspace: Option<u32>) {
        if let Some(w) = workspace.and_then(|w| table.workspace(w)) {
            ctx.usage[0] = Some(self.usage.cell(UsageKind::Workspace, &w.id));
        }
    }

    /// Writes an edge-generated answer (the one way the edge answers by itself).
    async fn respond(&self, session: &mut Session, ctx: &mut RequestCtx, code: ErrorCode, detail: Detail) -> Result<()> {
        let status = code.status();
        let wants_html = session
            .req_header()
            .headers
            .get(header::ACCEPT)
            .is_some_and(|v| v.as_bytes().windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")));
        let body = if wants_html {
            match &ctx.table {
                Some(t) => t.pages.html(ctx.branding, code, detail, request_id_str(&ctx.request_id)),
                None => self.routes.load().pages.html(Pages::PLATFORM, code, detail, request_id_str(&ctx.request_id)),
            }
        } else {
            Pages::json(code)
        };
        let mut resp = ResponseHeader::build(status, Some(8))?;
        resp.insert_header(header::CONTENT_TYPE, if wants_html { "text/html; charset=utf-8" } else { "application/json" })?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(XRID, ctx.request_id.clone())?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        if wants_html {
            resp.insert_header(header::CONTENT_SECURITY_POLICY, PAGE_CSP)?;
        }
        if ctx.preview {
            resp.insert_header(XRT, NOINDEX.clone())?;
        }
        if let Some(s) = code.retry_after() {
            resp.insert_header(header::RETRY_AFTER, s)?;
        }
        ctx.edge_status = Some(status);
        let head_only = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head_only).await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// Routes the request; `Ok(true)` when the edge answered it itself.
    async fn route(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let table = self.routes.load_full();
        let mut buf = [0u8; 256];
        let host = {
            let req = session.req_header();
            let mut hosts = req.headers.get_all(header::HOST).iter();
            let raw = match (req.uri.authority(), hosts.next(), hosts.next()) {
                (_, Some(_), Some(_)) => None, // two Host headers: ambiguous, refuse
                (Some(a), _, _) => Some(a.as_str().as_bytes()),
                (None, Some(h), None) => Some(h.as_bytes()),
                (None, None, _) => None,
            };
            raw.and_then(|r| normalize_host(r, &mut buf))
        };
        ctx.table = Some(table.clone());
        let Some(host) = host else {
            self.respond(session, ctx, ErrorCode::InvalidHost, Detail::default()).await?;
            return Ok(true);
        };
        match table.lookup(host) {
            Route::Denied { code, branding, preview, workspace } => {
                self.attribute(ctx, &table, workspace);
                ctx.branding = branding;
                ctx.preview = preview;
                ctx.kind = if preview { RouteKind::Preview } else { RouteKind::Edge };
                self.respond(session, ctx, code, Detail::default()).await?;
                Ok(true)
            }
            Route::Preview { sandbox_id, sandbox, port, access, tenant_host } => {
                self.attribute(ctx, &table, Some(sandbox.workspace));
                ctx.usage[2] = Some(self.usage.cell(UsageKind::Sandbox, sandbox_id));
                ctx.kind = RouteKind::Preview;
                ctx.preview = true;
                ctx.port = Some(port);
                let ws = table.workspace(sandbox.workspace);
                ctx.branding = ws.map(|w| if tenant_host { w.tenant_branding } else { w.branding }).unwrap_or(Pages::PLATFORM);
                let detail = Detail { port: Some(port), deployment: false };
                if access == Access::Private {
                    // Preview tokens and share links are not implemented in this version:
                    // a private preview is closed to everyone rather than open to anyone.
                    self.respond(session, ctx, ErrorCode::PreviewAuthRequired, detail).await?;
                    return Ok(true);
                }
                if sandbox.state == SandboxState::Suspended {
                    self.respond(session, ctx, ErrorCode::SandboxStarting, detail).await?;
                    return Ok(true);
                }
                ctx.target = Some(Target::Sandbox { addr: SocketAddr::new(sandbox.address, port) });
                Ok(false)
            }
            Route::Deployment { deployment, index, tenant_host } => {
                self.attribute(ctx, &table, Some(deployment.workspace));
                ctx.usage[1] = Some(self.usage.cell(UsageKind::Deployment, &deployment.id));
                ctx.kind = RouteKind::Deployment;
                let ws = table.workspace(deployment.workspace);
                ctx.branding = ws.map(|w| if tenant_host { w.tenant_branding } else { w.branding }).unwrap_or(Pages::PLATFORM);
                let detail = Detail { port: None, deployment: true };
                match &deployment.release {
                    ActiveRelease::Static { .. } => {
                        self.respond(session, ctx, ErrorCode::ReleaseUnavailable, detail).await?;
                        Ok(true)
                    }
                    ActiveRelease::Dynamic { .. } => match deployment.pick_instance(None) {
                        Some(addr) => {
                            ctx.target = Some(Target::Deployment { index, addr });
                            Ok(false)
                        }
                        None => {
                            self.respond(session, ctx, ErrorCode::NoHealthyInstance, detail).await?;
                            Ok(true)
                        }
                    },
                }
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            table: None,
            request_id: HeaderValue::from_static(""),
            kind: RouteKind::Edge,
            target: None,
            branding: Pages::PLATFORM,
            preview: false,
            port: None,
            retries: 0,
            edge_status: None,
            usage: [None, None, None],
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v.as_bytes()) => v.clone(),
            _ => self.ids.next(),
        };
        self.route(session, ctx).await
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let addr = match ctx.target {
            Some(Target::Sandbox { addr }) => addr,
            Some(Target::Deployment { index, addr }) if ctx.retries > 0 => {
                // A retry after a failed connect: another instance of the same table.
                let next = ctx.table.as_ref().and_then(|t| t.deployment(index)).and_then(|d| d.pick_instance(Some(addr)));
                let next = next.unwrap_or(addr);
                ctx.target = Some(Target::Deployment { index, addr: next });
                next
            }
            Some(Target::Deployment { addr, .. }) => addr,
            None => return Error::e_explain(ErrorType::InternalError, "no upstream chosen for this request"),
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.opts.connect_timeout);
        peer.options.total_connection_timeout = Some(self.opts.connect_timeout);
        // Upgraded connections (WebSocket hot reload) may idle for long; everything
        // else must answer within the read timeout.
        peer.options.read_timeout = if session.is_upgrade_req() { None } else { Some(self.opts.read_timeout) };
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(&self, session: &mut Session, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<()> {
        match session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()) {
            Some(ip) => {
                // An IP address is at most 45 bytes: format it without a heap string.
                let mut buf = [0u8; 48];
                let mut w = &mut buf[..];
                let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
                let n = 48 - w.len();
                req.insert_header(XFF, HeaderValue::from_bytes(&buf[..n]).map_err(|_| Error::new(ErrorType::InternalError))?)?;
            }
            None => {
                req.remove_header(XFF);
            }
        }
        req.insert_header(XFP, if self.opts.tls { PROTO_HTTPS.clone() } else { PROTO_HTTP.clone() })?;
        let fwd_host = match req.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers.get(header::HOST).cloned(),
        };
        match fwd_host {
            Some(h) => req.insert_header(XFH, h)?,
            None => {
                req.remove_header(XFH);
            }
        }
        req.insert_header(XRID, ctx.request_id.clone())?;
        strip_edge_headers(req);
        Ok(())
    }

    async fn response_filter(&self, _session: &mut Session, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        resp.insert_header(XRID, ctx.request_id.clone())?;
        if ctx.preview {
            resp.append_header(XRT, NOINDEX.clone())?;
        }
        Ok(())
    }

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        self.metrics.upstream_failure(failure_reason(&e));
        // Nothing reached the upstream yet, so any method may be retried once on
        // another instance of the same deployment.
        if let Some(Target::Deployment { index, .. }) = ctx.target {
            let several = ctx
                .table
                .as_ref()
                .and_then(|t| t.deployment(index))
                .is_some_and(|d| matches!(&d.release, ActiveRelease::Dynamic { instances, .. } if instances.len() > 1));
            if several && ctx.retries == 0 {
                ctx.retries += 1;
                e.set_retry(true);
                return e;
            }
        }
        e.set_retry(false);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let code = match (e.esource(), e.etype()) {
            // pingora chose a status for a malformed request: answer it bare.
            (_, ErrorType::HTTPStatus(_)) => None,
            (ErrorSource::Upstream, ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
                Some(ErrorCode::UpstreamTimeout)
            }
            (ErrorSource::Upstream, _) => Some(ErrorCode::SandboxUnavailable),
            (ErrorSource::Downstream, _) => None,
            (ErrorSource::Internal | ErrorSource::Unset, _) => Some(ErrorCode::InternalError),
        };
        if matches!(e.esource(), ErrorSource::Upstream)
            && !matches!(
                e.etype(),
                ErrorType::ConnectRefused | ErrorType::ConnectTimedout | ErrorType::ConnectError | ErrorType::ConnectNoRoute
            )
        {
            // Connect failures were counted in fail_to_connect.
            self.metrics.upstream_failure(failure_reason(e));
        }
        let downstream_dead = matches!(e.esource(), ErrorSource::Downstream)
            && matches!(e.etype(), ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed);
        if session.response_written().is_some() || downstream_dead {
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        }
        let status = match code {
            Some(code) => {
                let detail = Detail { port: ctx.port, deployment: matches!(ctx.target, Some(Target::Deployment { .. })) };
                if self.respond(session, ctx, code, detail).await.is_err() {
                    return FailToProxy { error_code: 0, can_reuse_downstream: false };
                }
                code.status()
            }
            None => {
                // A malformed request from the client: a bare 4xx, as pingora would.
                let s = match e.etype() {
                    ErrorType::HTTPStatus(s) => *s,
                    _ => 400,
                };
                let _ = session.respond_error(s).await;
                s
            }
        };
        FailToProxy { error_code: status, can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        // Upstream failures are routine for previews (a dev server not started yet):
        // they become a page and a metric, and a warning without pingora's dump.
        if matches!(e.esource(), ErrorSource::Upstream) {
            tracing::warn!(
                request_id = request_id_str(&ctx.request_id),
                route = ctx.kind.as_str(),
                failure = e.etype().as_str(),
                upstream = ?ctx.target.map(|t| match t { Target::Sandbox { addr } | Target::Deployment { addr, .. } => addr }),
                path = %session.req_header().uri.path(),
                "upstream failed"
            );
            return true;
        }
        // A client that went away is not an error of ours.
        matches!(e.esource(), ErrorSource::Downstream)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map(|r| r.status.as_u16()).or(ctx.edge_status).unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        self.metrics.request(ctx.kind, status, elapsed.as_secs_f64());
        let bytes = session.body_bytes_sent() as u64;
        for cell in ctx.usage.iter().flatten() {
            cell.add(bytes);
        }
        if let Some(log) = &self.access_log {
            let req = session.req_header();
            let id = |i: usize| ctx.usage[i].as_ref().map(|c| &*c.id);
            let host = req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
            let line = serde_json::json!({
                "ts": access_log::now_rfc3339_ms(),
                "request_id": request_id_str(&ctx.request_id),
                "method": req.method.as_str(),
                "host": host,
                "path": access_log::redact(&String::from_utf8_lossy(req.raw_path())),
                "route": ctx.kind.as_str(),
                "workspace": id(0),
                "deployment": id(1),
                "sandbox": id(2),
                "status": status,
                "bytes": bytes,
                "duration_ms": elapsed.as_secs_f64() * 1000.0,
                "upstream": ctx.target.map(|t| match t { Target::Sandbox { addr } | Target::Deployment { addr, .. } => addr.to_string() }),
            });
            log.write(line.to_string());
        }
    }
}

fn failure_reason(e: &Error) -> UpstreamFailure {
    match e.etype() {
        ErrorType::ConnectRefused => UpstreamFailure::Refused,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamFailure::Timeout,
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => UpstreamFailure::Reset,
        _ => UpstreamFailure::Other,
    }
}

/// Removes every `X-Miosa-*` header (the credential firewall of CONTRACT §3).
fn strip_edge_headers(req: &mut RequestHeader) {
    let has = req.headers.keys().any(|k| k.as_str().starts_with("x-miosa-"));
    if has {
        let names: Vec<http::HeaderName> = req.headers.keys().filter(|k| k.as_str().starts_with("x-miosa-")).cloned().collect();
        for n in names {
            req.remove_header(&n);
        }
    }
}

/// The request id as text (always ASCII: validated or generated).
fn request_id_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

/// `X-Request-Id` a client may set: 1 to 128 of `A-Z a-z 0-9 . _ -`.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Generates request ids: 32 hex characters, unpredictable across processes (keyed
/// SipHash of a counter with per-process random keys), unique within one.
struct RequestIds {
    keys: (std::collections::hash_map::RandomState, std::collections::hash_map::RandomState),
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        RequestIds { keys: (Default::default(), Default::default()), counter: AtomicU64::new(0) }
    }

    fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = self.keys.0.hash_one(n);
        // The low half is the counter itself mixed with a key, so ids never repeat.
        let b = n ^ self.keys.1.hash_one(0u64);
        let mut out = [0u8; 32];
        for (i, byte) in a.to_be_bytes().iter().chain(b.to_be_bytes().iter()).enumerate() {
            out[2 * i] = HEX[(byte >> 4) as usize];
            out[2 * i + 1] = HEX[(byte & 15) as usize];
        }
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

impl std::fmt::Debug for EdgeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeProxy").field("opts", &self.opts).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_x.y"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(valid_request_id(&[b'a'; 128]));
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(valid_request_id(a.as_bytes()));
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
