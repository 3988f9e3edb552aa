//! `EdgeProxy`: pingora's `ProxyHttp` phases, each short and delegating.
//!
//! ```text
//! request_filter          request id; host → one routes.load() → Route
//!                         private preview → access::authorize (token → 303 +
//!                         cookie | header | cookie | form | 401 page)
//!                         Denied / suspended / static → page (rescue)
//!                         suspended with [wake]: upstream::wake holds the request until
//!                         the sandbox is pushed running, then routes on that new table
//! upstream_peer           sandbox address:port | round-robin instance
//! upstream_request_filter X-Forwarded-*, X-Request-Id; strip X-Miosa-* and the
//!                         edge's cookies (the credential firewall)
//! revocation              a share-opened WebSocket or stream ends when the share goes
//! response_filter         X-Request-Id; X-Robots-Tag on previews
//! fail_to_connect         one retry on another instance (deployments)
//! fail_to_proxy           the single place where failures become pages
//! logging                 metrics
//! ```
//!
//! Invariant: the edge only connects to addresses found in the route table loaded by
//! this request (`RequestCtx::table`), never to one derived from the request.

use crate::access::cookie::{self, Kind as SessionKind, Session as CookieSession};
use crate::access::password::{self, Passwords};
use crate::access::{self, Grant};
use crate::access_log::{self, AccessLog};
use crate::codes::ErrorCode;
use crate::metrics::{Credential, Metrics, RouteKind, UpstreamFailure};
use crate::pages::{Detail, Pages, PAGE_CSP, PASSWORD_PATH};
use crate::releases::{serve, Releases};
use crate::routing::{normalize_host, ActiveRelease, Route, RouteTable, SharedTable};
use crate::schema::{Access, SandboxState};
use crate::upstream::wake::{Wait, Waker};
use crate::usage::{Kind as UsageKind, Usage, UsageCell};
use async_trait::async_trait;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::StaticHeaderName;
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
// Names the edge writes on every request: inserted without parsing or copying them
// (vendored pingora-http patch, `StaticHeaderName`).
static XRID: StaticHeaderName = StaticHeaderName::new("x-request-id", "X-Request-Id");
static XFF: StaticHeaderName = StaticHeaderName::new("x-forwarded-for", "X-Forwarded-For");
static XFP: StaticHeaderName = StaticHeaderName::new("x-forwarded-proto", "X-Forwarded-Proto");
static XFH: StaticHeaderName = StaticHeaderName::new("x-forwarded-host", "X-Forwarded-Host");
static XRT: StaticHeaderName = StaticHeaderName::new("x-robots-tag", "X-Robots-Tag");
static NOINDEX: HeaderValue = HeaderValue::from_static("noindex");
static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Upstream timeouts.
#[derive(Clone, Copy, Debug)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// What the proxy does for TLS on its plain listener.
#[derive(Clone, Debug, Default)]
pub struct TlsFront {
    /// Plain-HTTP requests answer 308 to `https://` on this port (CONTRACT §9).
    pub redirect_to: Option<u16>,
    /// Pending ACME HTTP-01 challenges, answered before routing.
    pub challenges: Option<Arc<crate::acme::Http01>>,
}

/// The proxy application.
pub struct EdgeProxy {
    routes: SharedTable,
    metrics: Arc<Metrics>,
    usage: Arc<Usage>,
    access_log: Option<Arc<AccessLog>>,
    opts: ProxyOptions,
    ids: RequestIds,
    passwords: Passwords,
    /// Wakes suspended sandboxes (`[wake]`); `None`: they answer 503 at once.
    waker: Option<Arc<Waker>>,
    releases: Option<Arc<Releases>>,
    /// How long a request waits for a static release still being fetched.
    release_wait: Duration,
    /// Told of every published table (live revocation of share-opened exchanges).
    table_changes: Option<tokio::sync::watch::Receiver<u64>>,
    tls: TlsFront,
    /// Timeouts for slow clients (`crate::hostile`).
    limits: crate::hostile::Limits,
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
    /// The share a private preview was opened with, watched while the exchange lives.
    share_watch: Option<ShareWatch>,
    /// The request came over TLS.
    tls: bool,
    /// The instance this request is using (outstanding-request count).
    instance: Option<crate::routing::instance::InFlight>,
}

/// The preview a request is for, as access checks need it.
#[derive(Clone, Copy)]
struct PreviewRef<'a> {
    table: &'a RouteTable,
    /// The normalised host (cookies are bound to it).
    host: &'a str,
    sandbox: &'a str,
    port: u16,
}

/// What [`EdgeProxy::revocation`] rechecks for a share-opened exchange.
struct ShareWatch {
    share: [u8; 32],
    sandbox: Box<str>,
    port: u16,
}

/// Read size when streaming a large static file from disk.
const STATIC_CHUNK: usize = 64 << 10;

/// How often live share-opened connections recheck their share when no table-change
/// feed is attached (CONTRACT §3: closed within 10 s of revocation).
const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// The error type the vendored pingora-proxy raises when [`EdgeProxy::revocation`] fires.
const REVOKED: &str = "credential_revoked";
static X_MIOSA_TOKEN: HeaderName = HeaderName::from_static("x-miosa-token");

impl EdgeProxy {
    /// A proxy reading routes from `routes`.
    pub fn new(
        routes: SharedTable,
        metrics: Arc<Metrics>,
        usage: Arc<Usage>,
        access_log: Option<Arc<AccessLog>>,
        opts: ProxyOptions,
    ) -> EdgeProxy {
        EdgeProxy {
            routes,
            metrics,
            usage,
            access_log,
            opts,
            ids: RequestIds::new(),
            passwords: Passwords::new(),
            waker: None,
            releases: None,
            release_wait: Duration::ZERO,
            table_changes: None,
            tls: TlsFront::default(),
            limits: crate::hostile::Limits::default(),
        }
    }

    /// Bounds slow clients: the request-head deadline and the body read timeout.
    pub fn with_limits(mut self, limits: crate::hostile::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// HTTPS redirects and ACME HTTP-01 answers on the plain listener.
    pub fn with_tls(mut self, tls: TlsFront) -> Self {
        self.tls = tls;
        self
    }

    /// Lets live share-opened exchanges react to every published table at once.
    pub fn with_table_changes(mut self, changes: tokio::sync::watch::Receiver<u64>) -> Self {
        self.table_changes = Some(changes);
        self
    }

    /// Serves static releases from `releases`, waiting up to `wait` for one being fetched.
    pub fn with_releases(mut self, releases: Arc<Releases>, wait: Duration) -> Self {
        self.releases = Some(releases);
        self.release_wait = wait;
        self
    }

    /// Answers a request of a deployment whose active version is static release `sha`.
    async fn serve_static(&self, session: &mut Session, ctx: &mut RequestCtx, deployment: &str, sha: &[u8; 32], spa: bool) -> Result<()> {
        let detail = Detail { port: None, deployment: true };
        let release = match &self.releases {
            Some(r) => r.get(sha, self.release_wait).await.map_err(|e| tracing::warn!(deployment, error = %e, "static release not served")),
            None => Err(()),
        };
        let Ok(release) = release else {
            return self.respond(session, ctx, ErrorCode::ReleaseUnavailable, detail).await;
        };
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        if !head && req.method != http::Method::GET {
            let mut resp = ResponseHeader::build(405, Some(4))?;
            resp.insert_header(header::ALLOW, "GET, HEAD")?;
            resp.insert_header(header::CONTENT_LENGTH, 0)?;
            resp.insert_static(&XRID, ctx.request_id.clone())?;
            ctx.edge_status = Some(405);
            return session.write_response_header(Box::new(resp), true).await;
        }
        let Some(path) = serve::decode_path(req.uri.path()) else {
            return self.respond(session, ctx, ErrorCode::NotFound, detail).await;
        };
        let previous = self.releases.as_ref().and_then(|r| r.previous(deployment, sha));
        let found = serve::resolve(&release, previous.as_deref(), &path, wants_html(req), spa);
        if matches!(found, serve::Found::Missing) {
            return self.respond(session, ctx, ErrorCode::NotFound, detail).await;
        }
        let plan = serve::plan(req, &found);
        let len = match &plan.body {
            serve::Body::None => 0,
            serve::Body::Memory(b) => b.len() as u64,
            serve::Body::File { len, .. } => *len,
        };
        let mut resp = ResponseHeader::build(plan.status, Some(plan.headers.len() + 4))?;
        for (name, value) in plan.headers {
            resp.insert_header(name, value)?;
        }
        if plan.status != 304 {
            // HEAD announces the length a GET would send.
            resp.insert_header(header::CONTENT_LENGTH, len)?;
        }
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        ctx.edge_status = Some(plan.status);
        let no_body = head || matches!(plan.body, serve::Body::None);
        session.write_response_header(Box::new(resp), no_body).await?;
        if no_body {
            return Ok(());
        }
        match plan.body {
            serve::Body::Memory(b) => session.write_response_body(Some(b), true).await,
            serve::Body::File { path, offset, len } => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let io = |e: std::io::Error| Error::because(ErrorType::InternalError, "reading a static release file", e);
                let mut f = tokio::fs::File::open(&path).await.map_err(io)?;
                f.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
                let mut left = len;
                while left > 0 {
                    let mut buf = bytes::BytesMut::with_capacity(STATIC_CHUNK.min(left as usize));
                    let n = f.read_buf(&mut buf).await.map_err(io)?;
                    if n == 0 {
                        return Error::e_explain(ErrorType::InternalError, "static release file shrank while being served");
                    }
                    left -= n as u64;
                    session.write_response_body(Some(buf.freeze()), left == 0).await?;
                }
                Ok(())
            }
            serve::Body::None => Ok(()),
        }
    }

    /// Holds previews of suspended sandboxes while `waker` wakes them (CONTRACT §8).
    pub fn with_waker(mut self, waker: Arc<Waker>) -> Self {
        self.waker = Some(waker);
        self
    }

    fn attribute(&self, ctx: &mut RequestCtx, table: &RouteTable, workspace: Option<u32>) {
        if let Some(w) = workspace.and_then(|w| table.workspace(w)) {
            ctx.usage[0] = Some(self.usage.cell(UsageKind::Workspace, &w.id));
        }
    }

    /// Writes an edge-generated answer (the one way the edge answers by itself).
    async fn respond(&self, session: &mut Session, ctx: &mut RequestCtx, code: ErrorCode, detail: Detail) -> Result<()> {
        self.respond_with(session, ctx, code, detail, None, &[]).await
    }

    /// [`Self::respond`] with `Set-Cookie` lines, and for HTML clients an alternative
    /// body (the password form) in place of the code's page.
    async fn respond_with(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        code: ErrorCode,
        detail: Detail,
        html: Option<bytes::Bytes>,
        cookies: &[String],
    ) -> Result<()> {
        let status = code.status();
        let wants_html = wants_html(session.req_header());
        let body = match (wants_html, html) {
            (true, Some(b)) => b,
            (true, None) => match &ctx.table {
                Some(t) => t.pages.html(ctx.branding, code, detail, request_id_str(&ctx.request_id)),
                None => self.routes.load().pages.html(Pages::PLATFORM, code, detail, request_id_str(&ctx.request_id)),
            },
            (false, _) => Pages::json(code),
        };
        let mut resp = ResponseHeader::build(status, Some(8 + cookies.len()))?;
        resp.insert_header(header::CONTENT_TYPE, if wants_html { "text/html; charset=utf-8" } else { "application/json" })?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        if wants_html {
            resp.insert_header(header::CONTENT_SECURITY_POLICY, PAGE_CSP)?;
        }
        if ctx.preview {
            resp.insert_static(&XRT, NOINDEX.clone())?;
        }
        if let Some(s) = code.retry_after() {
            resp.insert_header(header::RETRY_AFTER, s)?;
        }
        for c in cookies {
            resp.append_header(header::SET_COOKIE, c.as_str())?;
        }
        ctx.edge_status = Some(status);
        let head_only = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head_only).await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// A `303 See Other` to `location` (a path on this host) setting `cookies`.
    async fn redirect(&self, session: &mut Session, ctx: &mut RequestCtx, location: &[u8], cookies: &[String]) -> Result<()> {
        self.redirect_with(session, ctx, 303, location, cookies).await
    }

    async fn redirect_with(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        location: &[u8],
        cookies: &[String],
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(6 + cookies.len()))?;
        let location = HeaderValue::from_bytes(location).map_err(|_| Error::explain(ErrorType::HTTPStatus(400), "bad request target"))?;
        resp.insert_header(header::LOCATION, location)?;
        resp.insert_header(header::CONTENT_LENGTH, 0)?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        resp.insert_header(header::REFERRER_POLICY, "no-referrer")?;
        if ctx.preview {
            resp.insert_static(&XRT, NOINDEX.clone())?;
        }
        for c in cookies {
            resp.append_header(header::SET_COOKIE, c.as_str())?;
        }
        ctx.edge_status = Some(status);
        session.write_response_header(Box::new(resp), true).await
    }

    /// An ACME HTTP-01 key authorization (`text/plain`, 200).
    async fn answer_challenge(&self, session: &mut Session, ctx: &mut RequestCtx, key_auth: bytes::Bytes) -> Result<bool> {
        let mut resp = ResponseHeader::build(200, Some(4))?;
        resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
        resp.insert_header(header::CONTENT_LENGTH, key_auth.len())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        ctx.edge_status = Some(200);
        let head_only = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head_only).await?;
        if !head_only {
            session.write_response_body(Some(key_auth), true).await?;
        }
        Ok(true)
    }

    /// Access to a preview (CONTRACT §3). A token in the URL is always taken out by a
    /// redirect; on private previews a credential is required. `Ok(true)` when the
    /// edge answered; otherwise the request may go upstream.
    async fn authorize(&self, session: &mut Session, ctx: &mut RequestCtx, p: &PreviewRef<'_>, private: bool) -> Result<bool> {
        let PreviewRef { table, host, sandbox, port } = *p;
        let now = crate::clock::unix_now();
        let req = session.req_header();
        let cctx = cookie::Context { secure: ctx.tls || is_localhost(host), cross_site: is_cross_site_frame(req) };
        if private && req.uri.path() == PASSWORD_PATH {
            self.password_post(session, ctx, p, cctx, now).await?;
            return Ok(true);
        }
        if let Some((token, location)) = url_token(req.raw_path()) {
            if !private {
                // Nothing to open, but a token never reaches the sandbox.
                self.redirect(session, ctx, &location, &[]).await?;
                return Ok(true);
            }
            let credential = if token.starts_with("ms_") { Credential::ShareToken } else { Credential::PreviewToken };
            return match access::verify_token(table, &token, sandbox, port, now) {
                Ok(grant) => {
                    self.metrics.access(credential, true);
                    let kind = match (grant.share, grant.needs_password) {
                        (Some(_), true) => SessionKind::Pending,
                        (Some(_), false) => SessionKind::Share,
                        (None, _) => SessionKind::Preview,
                    };
                    let expires = if kind == SessionKind::Pending { grant.expires.min(now + cookie::PENDING_SECS) } else { grant.expires };
                    let s = CookieSession { kind, cross_site: cctx.cross_site, expires, share: grant.share };
                    let Some(value) = cookie::encode(&table.access, host, &s) else {
                        self.respond(session, ctx, ErrorCode::InternalError, Detail::default()).await?;
                        return Ok(true);
                    };
                    let name = if kind == SessionKind::Pending { cctx.pending_name() } else { cctx.session_name() };
                    let set = cookie::set_cookie(cctx, name, &value, expires - now);
                    self.redirect(session, ctx, &location, &[set]).await?;
                    Ok(true)
                }
                Err(code) => {
                    self.metrics.access(credential, false);
                    self.respond(session, ctx, code, Detail { port: Some(port), deployment: false }).await?;
                    Ok(true)
                }
            };
        }
        if !private {
            return Ok(false);
        }
        let detail = Detail { port: Some(port), deployment: false };
        if let Some(v) = req.headers.get(&X_MIOSA_TOKEN) {
            let token = std::str::from_utf8(v.as_bytes()).unwrap_or("").trim();
            let credential = if token.starts_with("ms_") { Credential::ShareToken } else { Credential::PreviewToken };
            let result = access::verify_token(table, token, sandbox, port, now);
            self.metrics.access(credential, matches!(result, Ok(g) if !g.needs_password));
            return match result {
                Ok(g) if g.needs_password => {
                    self.respond(session, ctx, ErrorCode::SharePasswordRequired, detail).await?;
                    Ok(true)
                }
                Ok(g) => {
                    self.watch(ctx, &g, sandbox, port);
                    Ok(false)
                }
                Err(code) => {
                    self.respond(session, ctx, code, detail).await?;
                    Ok(true)
                }
            };
        }
        // The session cookie; one that fails counts as none and is cleared.
        let mut clear = Vec::new();
        let cookies = || req.headers.get_all(header::COOKIE).into_iter().map(|v| v.as_bytes());
        if let Some(v) = cookie::find(cookies(), cctx.session_name()) {
            match cookie::decode(&table.access, host, v, now).filter(|s| s.kind != SessionKind::Pending) {
                Some(s) if access::still_valid(table, &s.grant(), sandbox, port, now) => {
                    self.metrics.access(Credential::Session, true);
                    self.watch(ctx, &s.grant(), sandbox, port);
                    return Ok(false);
                }
                s => {
                    self.metrics.access(Credential::Session, false);
                    clear_both(&mut clear, cctx, cctx.session_name(), s.map(|s| s.cross_site));
                }
            }
        }
        if let Some(v) = cookie::find(cookies(), cctx.pending_name()) {
            match cookie::decode(&table.access, host, v, now).filter(|s| s.kind == SessionKind::Pending) {
                Some(s) if access::still_valid(table, &s.grant(), sandbox, port, now) => {
                    let next = String::from_utf8_lossy(req.raw_path()).into_owned();
                    let form = table.pages.password_form(ctx.branding, password::safe_next(&next), false, request_id_str(&ctx.request_id));
                    self.respond_with(session, ctx, ErrorCode::SharePasswordRequired, detail, Some(form), &clear).await?;
                    return Ok(true);
                }
                s => clear_both(&mut clear, cctx, cctx.pending_name(), s.map(|s| s.cross_site)),
            }
        }
        if clear.is_empty() {
            self.metrics.access(Credential::None, false);
        }
        self.respond_with(session, ctx, ErrorCode::PreviewAuthRequired, detail, None, &clear).await?;
        Ok(true)
    }

    /// The password form's POST: checks the pending cookie, the attempt limit and the
    /// password (argon2 off the proxy threads), then opens the session.
    async fn password_post(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        p: &PreviewRef<'_>,
        cctx: cookie::Context,
        now: i64,
    ) -> Result<()> {
        let PreviewRef { table, host, sandbox, port } = *p;
        let detail = Detail { port: Some(port), deployment: false };
        if session.req_header().method != http::Method::POST {
            return self.redirect(session, ctx, b"/", &[]).await;
        }
        let req = session.req_header();
        let pending = cookie::find(req.headers.get_all(header::COOKIE).into_iter().map(|v| v.as_bytes()), cctx.pending_name())
            .and_then(|v| cookie::decode(&table.access, host, v, now))
            .filter(|s| s.kind == SessionKind::Pending);
        let Some((pending, hash)) = pending.and_then(|p| p.share.map(|h| (p, h))) else {
            // The form outlived its pending cookie (15 minutes): start again from the link.
            return self.respond(session, ctx, ErrorCode::PreviewAuthRequired, detail).await;
        };
        let share = match table.share(&hash) {
            Some(s) => s,
            None => return self.respond(session, ctx, ErrorCode::ShareTokenInvalid, detail).await,
        };
        if let Err(code) = access::check_share(share, sandbox, port, now) {
            return self.respond(session, ctx, code, detail).await;
        }
        let Some(hash_str) = share.password_hash.clone() else {
            // The password was removed meanwhile: the token alone opens the session.
            return self.open_share_session(session, ctx, p, pending, share.expires_at, "/", now).await;
        };
        let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        if !self.passwords.allowed(&hash, ip, now) {
            self.metrics.access(Credential::Password, false);
            return self.respond(session, ctx, ErrorCode::TooManyAttempts, detail).await;
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > password::MAX_FORM_BYTES {
                return Error::e_explain(ErrorType::HTTPStatus(413), "password form too large");
            }
            body.extend_from_slice(&chunk);
        }
        let form = password::parse_form(&body);
        let next = password::safe_next(&form.next).to_string();
        if self.passwords.verify(hash_str, form.password).await {
            self.metrics.access(Credential::Password, true);
            self.passwords.succeeded(&hash, ip);
            return self.open_share_session(session, ctx, p, pending, share.expires_at, &next, now).await;
        }
        self.metrics.access(Credential::Password, false);
        self.passwords.failed(&hash, ip, now);
        let form = table.pages.password_form(ctx.branding, &next, true, request_id_str(&ctx.request_id));
        self.respond_with(session, ctx, ErrorCode::SharePasswordRequired, detail, Some(form), &[]).await
    }

    /// Opens a share session after its password (303 to `next`, session cookie set,
    /// pending cookie cleared). The cookies are framed like the link was opened (a
    /// partitioned cookie in a cross-site frame): the form's own POST is same-origin.
    #[allow(clippy::too_many_arguments)]
    async fn open_share_session(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        p: &PreviewRef<'_>,
        pending: CookieSession,
        expires_at: Option<i64>,
        next: &str,
        now: i64,
    ) -> Result<()> {
        let (table, host) = (p.table, p.host);
        let cctx = cookie::Context { secure: ctx.tls || is_localhost(host), cross_site: pending.cross_site };
        let expires = access::share_session_end(&table.access, expires_at, now);
        let s = CookieSession { kind: SessionKind::Share, cross_site: pending.cross_site, expires, share: pending.share };
        let Some(value) = cookie::encode(&table.access, host, &s) else {
            return self.respond(session, ctx, ErrorCode::InternalError, Detail::default()).await;
        };
        let cookies =
            [cookie::set_cookie(cctx, cctx.session_name(), &value, expires - now), cookie::clear_cookie(cctx, cctx.pending_name())];
        self.redirect(session, ctx, next.as_bytes(), &cookies).await
    }

    /// Remembers a share-backed grant so that a live exchange ends with its share.
    fn watch(&self, ctx: &mut RequestCtx, grant: &Grant, sandbox: &str, port: u16) {
        if let Some(share) = grant.share {
            ctx.share_watch = Some(ShareWatch { share, sandbox: sandbox.into(), port });
        }
    }

    /// Routes a preview of a suspended sandbox `p` once the waker is done with it: on
    /// the table in which it settled (the sandbox's address may have changed), or 503
    /// `sandbox_starting`. `Ok(true)` when the edge answered.
    async fn route_woken(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        wait: Wait,
        p: &PreviewRef<'_>,
        private: bool,
    ) -> Result<bool> {
        let detail = Detail { port: Some(p.port), deployment: false };
        let Wait::Settled(table) = wait else {
            self.respond(session, ctx, ErrorCode::SandboxStarting, detail).await?;
            return Ok(true);
        };
        match table.lookup(p.host) {
            Route::Preview { sandbox_id, sandbox, port, access, tenant_host }
                if sandbox_id == p.sandbox && port == p.port && sandbox.state != SandboxState::Suspended =>
            {
                // Branding indexes belong to a table: take them from the new one.
                let ws = table.workspace(sandbox.workspace);
                ctx.branding = ws.map(|w| if tenant_host { w.tenant_branding } else { w.branding }).unwrap_or(Pages::PLATFORM);
                ctx.table = Some(table.clone());
                // Made private while the request waited: it needs a credential now.
                if access == Access::Private
                    && !private
                    && self.authorize(session, ctx, &PreviewRef { table: &table, host: p.host, sandbox: sandbox_id, port }, true).await?
                {
                    return Ok(true);
                }
                ctx.target = Some(Target::Sandbox { addr: SocketAddr::new(sandbox.address, port) });
                Ok(false)
            }
            // Deleted, or the port unlisted, while the request waited.
            Route::Denied { code, branding, .. } => {
                ctx.branding = branding;
                ctx.table = Some(table.clone());
                self.respond(session, ctx, code, detail).await?;
                Ok(true)
            }
            // Suspended again already, or no longer this sandbox: the answer of a wait
            // that did not succeed.
            _ => {
                self.respond(session, ctx, ErrorCode::SandboxStarting, detail).await?;
                Ok(true)
            }
        }
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
        if !ctx.tls {
            if let Some(port) = self.tls.redirect_to {
                if !session.req_header().raw_path().starts_with(crate::acme::HTTP01_PREFIX.as_bytes()) {
                    let raw = session.req_header().raw_path();
                    let mut location = Vec::with_capacity(16 + host.len() + raw.len());
                    location.extend_from_slice(b"https://");
                    location.extend_from_slice(host.as_bytes());
                    if port != 443 {
                        location.extend_from_slice(format!(":{port}").as_bytes());
                    }
                    location.extend_from_slice(if raw.starts_with(b"/") { raw } else { b"/" });
                    self.redirect_with(session, ctx, 308, &location, &[]).await?;
                    return Ok(true);
                }
            }
        }
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
                let private = access == Access::Private;
                if (private || has_url_token(session.req_header().raw_path()))
                    && self.authorize(session, ctx, &PreviewRef { table: &table, host, sandbox: sandbox_id, port }, private).await?
                {
                    return Ok(true);
                }
                if sandbox.state == SandboxState::Suspended {
                    let Some(waker) = &self.waker else {
                        self.respond(session, ctx, ErrorCode::SandboxStarting, detail).await?;
                        return Ok(true);
                    };
                    let wait = waker.wake(sandbox_id, host, Instant::now()).await;
                    let p = PreviewRef { table: &table, host, sandbox: sandbox_id, port };
                    return self.route_woken(session, ctx, wait, &p, private).await;
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
                    ActiveRelease::Static { sha256, spa } => {
                        self.serve_static(session, ctx, &deployment.id, &sha256.0, *spa).await?;
                        Ok(true)
                    }
                    ActiveRelease::Dynamic { .. } => match deployment.pick_instance(None, crate::clock::monotonic_ms()) {
                        Some(inst) => {
                            ctx.target = Some(Target::Deployment { index, addr: inst.addr });
                            ctx.instance = Some(inst.health.start());
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
            share_watch: None,
            tls: false,
            instance: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v.as_bytes()) => v.clone(),
            _ => self.ids.next(),
        };
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if let Some(code) = crate::hostile::screen_session(session) {
            // Ambiguous or oversized: answer, and never read what follows on this connection.
            session.set_keepalive(None);
            return self.respond(session, ctx, code, Detail::default()).await.map(|()| true);
        }
        if !session.is_upgrade_req() {
            session.set_read_timeout(Some(self.limits.body_timeout));
        }
        if let Some(challenges) = &self.tls.challenges {
            if let Some(key_auth) = challenges.answer(session.req_header().raw_path()) {
                return self.answer_challenge(session, ctx, key_auth).await;
            }
        }
        self.route(session, ctx).await
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let addr = match ctx.target {
            Some(Target::Sandbox { addr }) => addr,
            Some(Target::Deployment { index, addr }) if ctx.retries > 0 => {
                // A retry after a failure before any response: another instance of the same table.
                let table = ctx.table.clone();
                let next = table
                    .as_ref()
                    .and_then(|t| t.deployment(index))
                    .and_then(|d| d.pick_instance(Some(addr), crate::clock::monotonic_ms()));
                match next {
                    Some(inst) => {
                        ctx.instance = Some(inst.health.start());
                        ctx.target = Some(Target::Deployment { index, addr: inst.addr });
                        inst.addr
                    }
                    None => addr,
                }
            }
            Some(Target::Deployment { addr, .. }) => addr,
            None => return Error::e_explain(ErrorType::InternalError, "no upstream chosen for this request"),
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.opts.connect_timeout);
        peer.options.total_connection_timeout = Some(self.opts.connect_timeout);
        // Upgraded connections (WebSocket hot reload) may idle for long; everything
        // else must answer within the read timeout.
        let idle = if session.is_upgrade_req() { None } else { Some(self.opts.read_timeout) };
        peer.options.read_timeout = idle;
        peer.options.write_timeout = idle;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(&self, session: &mut Session, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<()> {
        match session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()) {
            Some(ip) => {
                let mut buf = [0u8; 48];
                let n = write_ip(ip, &mut buf);
                req.insert_static(&XFF, HeaderValue::from_bytes(&buf[..n]).map_err(|_| Error::new(ErrorType::InternalError))?)?;
            }
            None => {
                req.remove_header(XFF.name());
            }
        }
        req.insert_static(&XFP, if ctx.tls { PROTO_HTTPS.clone() } else { PROTO_HTTP.clone() })?;
        let fwd_host = match req.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers.get(header::HOST).cloned(),
        };
        match fwd_host {
            Some(h) => req.insert_static(&XFH, h)?,
            None => {
                req.remove_header(XFH.name());
            }
        }
        req.insert_static(&XRID, ctx.request_id.clone())?;
        strip_edge_headers(req);
        strip_edge_cookies(req)?;
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let reset = matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError);
        if reset && matches!(e.esource(), ErrorSource::Upstream) {
            if let Some(i) = &ctx.instance {
                i.health().passive_failure();
            }
        }
        let replayable = session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated();
        if !replayable || session.response_written().is_some() {
            e.set_retry(false);
        } else if reset && ctx.retries == 0 && matches!(ctx.target, Some(Target::Deployment { .. })) {
            // The instance went away before answering an idempotent request (killed,
            // restarted): once more on another instance, so no GET is lost.
            ctx.retries += 1;
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn response_filter(&self, _session: &mut Session, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        if let Some(i) = &ctx.instance {
            i.health().passive_success();
        }
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        if ctx.preview {
            resp.append_static(&XRT, NOINDEX.clone())?;
        }
        Ok(())
    }

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        self.metrics.upstream_failure(failure_reason(&e));
        if let Some(i) = &ctx.instance {
            i.health().passive_failure();
        }
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
            // The client stopped sending its body ([server] client_body_timeout_ms).
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => Some(ErrorCode::RequestTimeout),
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

    fn request_header_timeout(&self) -> Option<Duration> {
        Some(self.limits.header_timeout)
    }

    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        // pingora's own summary prints the whole target: tokens in URLs must not reach logs.
        let req = session.req_header();
        let host = req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        format!("{} {}, Host: {}", req.method, access_log::redact(&String::from_utf8_lossy(req.raw_path())), host.unwrap_or("-"))
    }

    fn revocation(&self, ctx: &RequestCtx) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>> {
        let w = ctx.share_watch.as_ref()?;
        let (routes, metrics) = (self.routes.clone(), self.metrics.clone());
        let (share, sandbox, port) = (w.share, w.sandbox.clone(), w.port);
        let mut changes = self.table_changes.clone();
        // Event-driven: the share is rechecked when a table is published (a deletion or
        // a new `expires_at`) and when its expiry comes; no timer runs for a share
        // without expiry, so the many short requests of a session cost next to nothing.
        Some(Box::pin(async move {
            let grant = Grant { expires: i64::MAX, share: Some(share), needs_password: false };
            loop {
                let table = routes.load_full();
                let now = crate::clock::unix_now();
                if !access::still_valid(&*table, &grant, &sandbox, port, now) {
                    metrics.revoked_connections.inc();
                    return;
                }
                let expires_in = table.share(&share).and_then(|s| s.expires_at).map(|t| Duration::from_secs((t - now).max(0) as u64));
                drop(table);
                let expiry = async {
                    match expires_in {
                        // A second past it, so the recheck sees it expired.
                        Some(d) => tokio::time::sleep(d + Duration::from_millis(1000)).await,
                        None => std::future::pending().await,
                    }
                };
                match &mut changes {
                    Some(rx) => {
                        tokio::select! {
                            r = rx.changed() => if r.is_err() { changes = None },
                            _ = expiry => {}
                        }
                    }
                    // No change feed (tests of the proxy alone): poll.
                    None => {
                        tokio::select! {
                            _ = tokio::time::sleep(REVOCATION_POLL) => {}
                            _ = expiry => {}
                        }
                    }
                }
            }
        }))
    }

    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        if matches!(e.etype(), ErrorType::Custom(REVOKED)) {
            tracing::info!(
                request_id = request_id_str(&ctx.request_id),
                route = ctx.kind.as_str(),
                "share revoked or expired: live connection closed"
            );
            return true;
        }
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

/// Clears cookie `name` as it was set: partitioned or not (`cross_site`), or both ways
/// when that is unknown (an unreadable cookie), since a partitioned cookie is only
/// cleared by a partitioned `Set-Cookie`.
fn clear_both(out: &mut Vec<String>, cctx: cookie::Context, name: &str, cross_site: Option<bool>) {
    match cross_site {
        Some(cross_site) => out.push(cookie::clear_cookie(cookie::Context { cross_site, ..cctx }, name)),
        None => {
            out.push(cookie::clear_cookie(cookie::Context { cross_site: false, ..cctx }, name));
            if cctx.secure {
                out.push(cookie::clear_cookie(cookie::Context { cross_site: true, ..cctx }, name));
            }
        }
    }
}

/// Whether the client accepts an HTML page.
fn wants_html(req: &RequestHeader) -> bool {
    req.headers.get(header::ACCEPT).is_some_and(|v| v.as_bytes().windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")))
}

/// `localhost` and `*.localhost`: secure contexts for browsers even over plain HTTP.
fn is_localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// A navigation into a cross-site frame (`Sec-Fetch-Dest: iframe`, `Sec-Fetch-Site: cross-site`).
fn is_cross_site_frame(req: &RequestHeader) -> bool {
    let is = |name: &str, v: &[u8]| req.headers.get(name).is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(v));
    is("sec-fetch-dest", b"iframe") && is("sec-fetch-site", b"cross-site")
}

/// Whether a request target carries an edge token (`token=mp_…` or `token=ms_…`).
fn has_url_token(raw_path: &[u8]) -> bool {
    raw_path.windows(9).any(|w| w == b"token=mp_" || w == b"token=ms_")
        || raw_path.windows(11).any(|w| w.eq_ignore_ascii_case(b"token=mp%5f") || w.eq_ignore_ascii_case(b"token=ms%5f"))
}

/// The edge token in a request target's query, and the same target without it (every
/// `token` parameter holding an `mp_`/`ms_` token removed, the rest kept in order).
/// A `token` parameter of the app's own (another value) is left alone.
fn url_token(raw_path: &[u8]) -> Option<(String, Vec<u8>)> {
    let q = raw_path.iter().position(|b| *b == b'?')?;
    let (path, query) = (&raw_path[..q], &raw_path[q + 1..]);
    let mut token = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    for pair in query.split(|b| *b == b'&') {
        if let Some(v) = pair.strip_prefix(b"token=") {
            let v = password::form_decode(v);
            if v.starts_with("mp_") || v.starts_with("ms_") {
                token.get_or_insert(v);
                continue;
            }
        }
        kept.push(pair);
    }
    let token = token?;
    let mut location = path.to_vec();
    if location.is_empty() {
        location.push(b'/');
    }
    let kept: Vec<&[u8]> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    if !kept.is_empty() {
        location.push(b'?');
        location.extend_from_slice(&kept.join(&b'&'));
    }
    // An absolute-form target (`GET http://host/p?token=…`): redirect to its path.
    if !location.starts_with(b"/") {
        let after_scheme = location.windows(3).position(|w| w == b"://").map(|i| i + 3).unwrap_or(0);
        let p = location[after_scheme..].iter().position(|b| *b == b'/').map(|i| i + after_scheme);
        location = match p {
            Some(i) => location[i..].to_vec(),
            None => b"/".to_vec(),
        };
    }
    Some((token, location))
}

/// Removes the edge's own cookies from the `Cookie` headers, keeping the app's.
fn strip_edge_cookies(req: &mut RequestHeader) -> Result<()> {
    if !req.headers.get_all(header::COOKIE).iter().any(|v| cookie::mentions_edge_cookie(v.as_bytes())) {
        return Ok(());
    }
    let kept: Vec<Vec<u8>> =
        req.headers.get_all(header::COOKIE).iter().filter_map(|v| cookie::without_edge_cookies(v.as_bytes())).collect();
    req.remove_header(&header::COOKIE);
    for v in kept {
        req.append_header(header::COOKIE, HeaderValue::from_bytes(&v).map_err(|_| Error::new(ErrorType::InternalError))?)?;
    }
    Ok(())
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

/// Writes `ip` as text into `buf` (an address is at most 45 bytes) and returns its length,
/// without a heap string. IPv4, nearly every client, skips the formatting machinery
/// (about 700 instructions per request under callgrind).
fn write_ip(ip: std::net::IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        std::net::IpAddr::V6(_) => {
            let mut w = &mut buf[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
            48 - w.len()
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
    fn client_addresses_are_written_as_std_writes_them() {
        let mut buf = [0u8; 48];
        for a in [0u32, 1, 9, 10, 99, 100, 255, 256, 0x0a00_0001, 0x7f00_0001, 0xc0a8_6401, 0x6464_6464, 0xffff_ffff] {
            let ip = std::net::IpAddr::from(std::net::Ipv4Addr::from(a));
            let n = write_ip(ip, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).expect("ascii"), ip.to_string());
        }
        for s in ["::1", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:192.0.2.128"] {
            let ip: std::net::IpAddr = s.parse().expect("v6");
            let n = write_ip(ip, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).expect("ascii"), ip.to_string());
        }
    }

    #[test]
    fn static_header_names_are_their_written_names_in_lower_case() {
        for h in [&XRID, &XFF, &XFP, &XFH, &XRT] {
            let written = std::str::from_utf8(h.written()).expect("ascii");
            assert_eq!(h.name().as_str(), written.to_ascii_lowercase(), "{written}");
        }
        // And they land in the request as written, once, replacing what was there.
        let mut req = RequestHeader::build("GET", b"/", None).expect("request");
        req.append_header("x-forwarded-for", "1.2.3.4").expect("append");
        req.insert_static(&XFF, HeaderValue::from_static("5.6.7.8")).expect("insert");
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        assert_eq!(String::from_utf8_lossy(&wire), "X-Forwarded-For: 5.6.7.8\r\n");
        req.append_static(&XFF, HeaderValue::from_static("9.9.9.9")).expect("append");
        assert_eq!(req.headers.get_all(XFF.name()).iter().count(), 2);
    }

    #[test]
    fn url_tokens_are_taken_out_of_the_target() {
        let t = |p: &str| url_token(p.as_bytes()).map(|(t, l)| (t, String::from_utf8(l).unwrap()));
        assert_eq!(t("/a?token=mp_x.y.z"), Some(("mp_x.y.z".into(), "/a".into())));
        assert_eq!(t("/a?x=1&token=ms_abc&y=2"), Some(("ms_abc".into(), "/a?x=1&y=2".into())));
        assert_eq!(t("/a?token=ms_1&token=mp_2&z"), Some(("ms_1".into(), "/a?z".into())), "every edge token goes");
        assert_eq!(t("/a?token=app-own&b=1"), None, "an app's own `token` stays");
        assert_eq!(t("/a?token=app&token=mp_1"), Some(("mp_1".into(), "/a?token=app".into())));
        assert_eq!(t("/a?xtoken=mp_1"), None);
        assert_eq!(t("?token=mp_1"), Some(("mp_1".into(), "/".into())));
        assert_eq!(t("http://h.example/p/q?token=mp_1&a"), Some(("mp_1".into(), "/p/q?a".into())), "absolute form");
        assert_eq!(t("http://h.example?token=mp_1"), Some(("mp_1".into(), "/".into())));
        assert_eq!(t("/a?token=mp%5F1"), Some(("mp_1".into(), "/a".into())), "percent-encoded");
        assert!(has_url_token(b"/?a=1&token=mp_x") && has_url_token(b"/?token=MS%5fx") && !has_url_token(b"/?token=x"));
        assert!(is_localhost("localhost") && is_localhost("3000-a.sandbox.localhost") && !is_localhost("notlocalhost"));
    }

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
