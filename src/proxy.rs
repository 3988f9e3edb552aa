//! `EdgeProxy`: pingora's `ProxyHttp` phases, each short and delegating.
//!
//! ```text
//! request_filter           request id; hostile::screen; ACME HTTP-01 answer
//!                          route (proxy::route): host → one routes.load() → Route
//!                            access::authorize → Pass | Answer · wake · static file
//!                            · storage object (crate::storage) · the S3 endpoint
//!                          any Answer → the one writer (proxy::rescue)
//! upstream_peer            ctx.target: sandbox address:port | the chosen instance
//! upstream_request_filter  forwarding headers, credential firewall (proxy::forward)
//! revocation               a share-opened exchange ends with its share (access),
//!                          an mp_-opened one at the token's exp
//! response_filter          X-Request-Id; X-Robots-Tag on previews (proxy::forward)
//! error_while_proxy        passive health; one replay of an idempotent request
//! fail_to_connect          one retry on another instance (deployments)
//! fail_to_proxy            rescue: a failure becomes the answer of its code
//! logging                  metrics, usage, the access-log line
//! ```
//!
//! Invariant: the edge only connects to addresses found in the route table loaded by
//! this request (`RequestCtx::table`), never to one derived from the request.

pub mod ctx;
pub mod forward;
mod rescue;
mod route;

use crate::access::password::Passwords;
use crate::access_log::{self, AccessLog};
use crate::answer::{Answer, Detail};
use crate::metrics::{Metrics, UpstreamFailure};
use crate::releases::Releases;
use crate::routing::{ActiveRelease, SharedTable};
use crate::upstream::wake::Waker;
use crate::usage::Usage;
use async_trait::async_trait;
use ctx::{RequestCtx, RequestIds, Target};
use http::header::{self, HeaderName};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};
use route::Next;
use std::sync::Arc;
use std::time::Duration;

pub use ctx::valid_request_id;
pub use rescue::wants_html;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The error type the vendored pingora-proxy raises when [`EdgeProxy::revocation`] fires.
const REVOKED: &str = "credential_revoked";

/// Upstream timeouts.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// The proxy's settings that a config reload replaces (`[wake]`, `[tls] redirect_http`,
/// `[static] wait_ms`, the `[server]` timeouts, `[log] access`): one snapshot, read with
/// one load where a request needs it.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// Wakes suspended sandboxes (`[wake]`); `None`: they answer 503 at once. A request
    /// already waiting keeps the waker it started with.
    pub waker: Option<Arc<Waker>>,
    /// Plain-HTTP requests answer 308 to `https://` on this port (CONTRACT §9).
    pub redirect_to: Option<u16>,
    /// How long a request waits for a static release still being fetched.
    pub release_wait: Duration,
    /// Upstream timeouts (`[server] connect_timeout_ms`, `read_timeout_ms`).
    pub opts: ProxyOptions,
    /// Timeouts for slow clients (`crate::hostile`).
    pub limits: crate::hostile::Limits,
    /// The access log (`[log] access`); `None`: off. A request logs to the one in force
    /// when it ends.
    pub access_log: Option<Arc<AccessLog>>,
    /// `[storage]`: public objects and the S3 endpoint; `None`: storage hosts answer 404
    /// `unknown_host`. A request keeps the one it started with.
    pub storage: Option<Arc<StorageFront>>,
}

/// `[storage]` as the request path uses it (CONTRACT §12): the object reader, and the
/// store's address for the S3 endpoint, resolved once when the section is loaded.
#[derive(Debug)]
pub struct StorageFront {
    pub objects: crate::storage::Storage,
    pub endpoint: crate::storage::Endpoint,
    pub addr: std::net::SocketAddr,
}

impl StorageFront {
    /// Builds the reader and resolves the endpoint (a blocking lookup: call it at start
    /// or reload, never on a proxy thread). A host name is resolved again on reload only.
    pub fn new(section: &crate::config::StorageSection) -> std::result::Result<StorageFront, String> {
        let endpoint = crate::storage::Endpoint::parse(&section.endpoint)?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&endpoint.authority())
            .map_err(|e| format!("[storage] endpoint {}: cannot resolve: {e}", section.endpoint))?
            .next()
            .ok_or_else(|| format!("[storage] endpoint {}: no address", section.endpoint))?;
        let objects = crate::storage::Storage::new(section.settings())?;
        Ok(StorageFront { objects, endpoint, addr })
    }
}

/// Where a config reload publishes a new [`Live`].
pub type SharedLive = Arc<arc_swap::ArcSwap<Live>>;

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
    ids: RequestIds,
    passwords: Passwords,
    releases: Option<Arc<Releases>>,
    /// The waker, the HTTPS redirect and the release wait, replaced by reloads.
    live: SharedLive,
    /// Told of every published table (live revocation of share-opened exchanges).
    table_changes: Option<tokio::sync::watch::Receiver<u64>>,
    tls: TlsFront,
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
        EdgeProxy {
            routes,
            metrics,
            usage,
            ids: RequestIds::new(),
            passwords: Passwords::new(),
            releases: None,
            live: Arc::new(arc_swap::ArcSwap::from_pointee(Live {
                opts,
                access_log,
                limits: crate::hostile::Limits::default(),
                ..Live::default()
            })),
            table_changes: None,
            tls: TlsFront::default(),
        }
    }

    /// Bounds slow clients: the request-head deadline and the body read timeout.
    pub fn with_limits(self, limits: crate::hostile::Limits) -> Self {
        self.live.rcu(|l| Live { limits, ..Live::clone(l) });
        self
    }

    /// Counts share-password attempts in `shared` too (fleet mode, CONTRACT §11).
    pub fn with_shared_attempts(mut self, shared: Arc<dyn crate::access::password::SharedAttempts>) -> Self {
        self.passwords = std::mem::take(&mut self.passwords).with_shared(shared);
        self
    }

    /// HTTPS redirects and ACME HTTP-01 answers on the plain listener.
    pub fn with_tls(mut self, tls: TlsFront) -> Self {
        self.live.rcu(|l| Live { redirect_to: tls.redirect_to, ..Live::clone(l) });
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
        self.live.rcu(|l| Live { release_wait: wait, ..Live::clone(l) });
        self
    }

    /// Holds previews of suspended sandboxes while `waker` wakes them (CONTRACT §8).
    pub fn with_waker(self, waker: Arc<Waker>) -> Self {
        self.live.rcu(|l| Live { waker: Some(waker.clone()), ..Live::clone(l) });
        self
    }

    /// Serves storage hosts from `storage` (CONTRACT §12).
    pub fn with_storage(self, storage: Arc<StorageFront>) -> Self {
        self.live.rcu(|l| Live { storage: Some(storage.clone()), ..Live::clone(l) });
        self
    }

    /// Where a reload publishes the proxy's new [`Live`] settings.
    pub fn live(&self) -> SharedLive {
        self.live.clone()
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// No downstream modules. pingora's default is a compression module at level 0, which
    /// compresses nothing and still costs every request a box for its state and two boxed
    /// header-filter calls; the edge passes bodies on as the upstream or the release has
    /// them encoded.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// Decides everything about a request before any upstream is touched: its id, a
    /// refusal of hostile framing, an ACME challenge, then [`route`](Self::route) —
    /// access, wake-up, static files, or the upstream to connect to. `Ok(true)` when
    /// the edge answered (always through the one writer). Never connects anywhere but
    /// the waker's hook; never reads the body (but the password form's).
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): requests sent back to back are answered
        // one after the other, in order, on the same connection (pingora reads what
        // follows this request as the next one's start; a no-op on HTTP/2).
        session.downstream_session.set_pipelining_enabled(true);
        ctx.request_id = match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v.as_bytes()) => v.clone(),
            _ => self.ids.next(),
        };
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if let Some(code) = crate::hostile::screen_session(session) {
            // Ambiguous or oversized: answer, and never read what follows on this connection.
            session.set_keepalive(None);
            return self.answer(session, ctx, code.into()).await.map(|()| true);
        }
        if !session.is_upgrade_req() {
            session.set_read_timeout(Some(self.live.load().limits.body_timeout));
        }
        if let Some(key_auth) = self.tls.challenges.as_ref().and_then(|c| c.answer(session.req_header().raw_path())) {
            return self.answer(session, ctx, Answer::Challenge(key_auth)).await.map(|()| true);
        }
        match self.route(session, ctx).await? {
            Next::Upstream => Ok(false),
            Next::Answer(a) => self.answer(session, ctx, a).await.map(|()| true),
            Next::Object(plan) => self.write_object(session, ctx, plan).await.map(|()| true),
        }
    }

    /// The peer `route` chose (`ctx.target`); on a retry after a failure before any
    /// response, another instance of the same deployment from the same table. Never
    /// an address the table does not hold. Upgraded connections (WebSockets) have no
    /// read timeout: a hot-reload socket may idle for long.
    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let addr = match ctx.target {
            Some(Target::Sandbox { addr }) => addr,
            Some(Target::Deployment { index, addr }) if ctx.retries > 0 => {
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
            Some(Target::Storage { addr }) => addr,
            None => return Error::e_explain(ErrorType::InternalError, "no upstream chosen for this request"),
        };
        let opts = self.live.load().opts;
        let mut peer = match (&ctx.target, &ctx.storage) {
            // The store, with TLS (certificate checked for its host name) when its endpoint is https.
            (Some(Target::Storage { .. }), Some(s)) => HttpPeer::new(addr, s.endpoint.tls, s.endpoint.host.clone()),
            _ => HttpPeer::new(addr, false, String::new()),
        };
        peer.options.connection_timeout = Some(opts.connect_timeout);
        peer.options.total_connection_timeout = Some(opts.connect_timeout);
        let idle = if session.is_upgrade_req() { None } else { Some(opts.read_timeout) };
        peer.options.read_timeout = idle;
        peer.options.write_timeout = idle;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    /// The forwarding headers and the credential firewall ([`forward::upstream_request`]).
    async fn upstream_request_filter(&self, session: &mut Session, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<()> {
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        forward::upstream_request(req, client, ctx)?;
        if matches!(ctx.target, Some(Target::Storage { .. })) {
            // No cookie ever reaches the store (CONTRACT §12); the rest goes unchanged, so
            // signed requests verify there.
            req.remove_header(&header::COOKIE);
        }
        Ok(())
    }

    /// Marks the failing instance (passive health) and decides whether pingora may
    /// replay the request: once, on another instance, for an idempotent request reset
    /// before any response, so no GET is lost when an instance restarts.
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
            ctx.retries += 1;
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    /// The edge's response headers ([`forward::downstream_response`]); an answer from
    /// an instance ends its failures in a row.
    async fn response_filter(&self, session: &mut Session, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
        if let Some(i) = &ctx.instance {
            i.health().passive_success();
        }
        forward::downstream_response(resp, session.req_header().version, ctx)?;
        if matches!(ctx.target, Some(Target::Storage { .. })) {
            forward::storage_response(resp)?;
        }
        Ok(())
    }

    /// Counts the failure; nothing reached the upstream yet, so any method may be
    /// retried once on another instance of a deployment that has several.
    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        self.metrics.upstream_failure(failure_reason(&e));
        if let Some(i) = &ctx.instance {
            i.health().passive_failure();
        }
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

    /// The rescue: a failure becomes the page or JSON error of its code
    /// ([`rescue::rescue`]), written by the one writer; a malformed request gets a bare
    /// status; a client that is gone, or a response already started, gets nothing more.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let code = rescue::rescue(e);
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
        let (answer, status) = match code {
            Some(code) => {
                let detail = Detail { port: ctx.port, deployment: matches!(ctx.target, Some(Target::Deployment { .. })) };
                (Answer::error(code, detail), code.status())
            }
            None => {
                let s = match e.etype() {
                    ErrorType::HTTPStatus(s) => *s,
                    _ => 400,
                };
                (Answer::Bare(s), s)
            }
        };
        let bare = matches!(answer, Answer::Bare(_));
        if self.answer(session, ctx, answer).await.is_err() && !bare {
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        }
        FailToProxy { error_code: status, can_reuse_downstream: false }
    }

    /// The whole request head must arrive within `[server] client_header_timeout_ms`
    /// (vendored pingora-proxy patch 3).
    fn request_header_timeout(&self) -> Option<Duration> {
        Some(self.live.load().limits.header_timeout)
    }

    /// pingora's own summary prints the whole target: tokens in URLs must not reach logs.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        format!("{} {}, Host: {}", req.method, access_log::redact(&String::from_utf8_lossy(req.raw_path())), host.unwrap_or("-"))
    }

    /// For an exchange opened with a share token: resolves when the share is deleted or
    /// expires ([`crate::access::until_revoked`]); with an `mp_` token (URL, header or
    /// session cookie): at the token's `exp`, where its session ends (CONTRACT §3). The
    /// vendored pingora-proxy (patch 2) then closes the exchange, idle or not. `None`
    /// (no cost) for everything else.
    fn revocation(&self, ctx: &RequestCtx) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>> {
        let w = ctx.watch.as_ref()?;
        let metrics = self.metrics.clone();
        if let Some(share) = w.watch.share {
            let (routes, changes) = (self.routes.clone(), self.table_changes.clone());
            let (sandbox, port) = (w.sandbox.clone(), w.port);
            return Some(Box::pin(async move {
                crate::access::until_revoked(|| routes.load_full(), changes, share, &sandbox, port).await;
                metrics.revoked_connections.inc();
            }));
        }
        let until = w.watch.until?;
        Some(Box::pin(async move {
            // Whole seconds from a `now` rounded down: never before `exp`, at most 1 s after.
            let left = until.saturating_sub(crate::clock::unix_now()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(left)).await;
            metrics.revoked_connections.inc();
        }))
    }

    /// Upstream failures are routine for previews (a dev server not started yet): a
    /// page, a metric and a warning, without pingora's dump. Revocations and clients
    /// that left are not errors of ours.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        if matches!(e.etype(), ErrorType::Custom(REVOKED)) {
            tracing::info!(
                request_id = ctx.request_id(),
                route = ctx.kind.as_str(),
                "credential revoked or expired: live connection closed"
            );
            return true;
        }
        if matches!(e.esource(), ErrorSource::Upstream) {
            tracing::warn!(
                request_id = ctx.request_id(),
                route = ctx.kind.as_str(),
                failure = e.etype().as_str(),
                upstream = ?ctx.target.map(Target::addr),
                path = %session.req_header().uri.path(),
                "upstream failed"
            );
            return true;
        }
        matches!(e.esource(), ErrorSource::Downstream)
    }

    /// Metrics, usage (bytes sent, attributed to the workspace, deployment and sandbox)
    /// and the access-log line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map(|r| r.status.as_u16()).or(ctx.edge_status).unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        self.metrics.request(ctx.kind, status, elapsed.as_secs_f64());
        let bytes = session.body_bytes_sent() as u64;
        for cell in ctx.usage.iter().flatten() {
            cell.add(bytes);
        }
        let live = self.live.load();
        if let Some(log) = &live.access_log {
            let req = session.req_header();
            let id = |i: usize| ctx.usage[i].as_ref().map(|c| &*c.id);
            let entry = access_log::Entry {
                request_id: ctx.request_id(),
                method: req.method.as_str(),
                host: req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok())),
                target: req.raw_path(),
                route: ctx.kind.as_str(),
                workspace: id(0),
                deployment: id(1),
                sandbox: id(2),
                bucket: id(3),
                status,
                bytes,
                duration: elapsed,
                upstream: ctx.target.map(Target::addr),
            };
            log.write(entry.line());
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

impl std::fmt::Debug for EdgeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeProxy").field("opts", &self.live.load().opts).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RouteTable;
    use crate::schema::{Domains, PlatformBranding};
    use pingora::modules::http::compression::ResponseCompression;

    #[test]
    fn requests_carry_no_downstream_module() {
        let domains = Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").expect("domains");
        let table = RouteTable::empty(&domains, &PlatformBranding::default());
        let routes = Arc::new(arc_swap::ArcSwap::from_pointee(table));
        let proxy = EdgeProxy::new(routes, Arc::new(Metrics::new()), Arc::new(Usage::default()), None, ProxyOptions::default());
        let mut modules = HttpModules::new();
        proxy.init_downstream_modules(&mut modules);
        // pingora's default would give each request a (disabled) compression module.
        assert!(modules.build_ctx().get::<ResponseCompression>().is_none());
    }
}
