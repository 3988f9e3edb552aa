//! Routing one request: its host on the table it loaded → where it goes, or the answer.
//!
//! ```text
//! host (Host / :authority, one of them) ─ malformed ─► 400 invalid_host
//! table.lookup(host)
//!   plain listener with TLS on, a host the edge routes ─► 308 https://host…
//!     (ACME challenges excepted; an unrouted host gets 404 unknown_host below)
//!   Denied(code)  ─► the code's page, branded for the host's workspace
//!   Preview       ─► access::authorize ─► Answer | Pass (watching a share or an mp_
//!                    token's exp; a WebSocket's ?token= taken out of its target)
//!                    suspended ─► [wake]: hold until pushed running, route again
//!                    ─► sandbox address:port
//!   Deployment    ─► static release: the file (or 404/405/503), answered here
//!                    dynamic: an instance (least loaded of two) | 503 no_healthy_instance
//!   Bucket        ─► [storage] off: 404 unknown_host; else the object read from the
//!                    store (crate::storage), its body streamed by the one writer |
//!                    404 object_not_found | 405 | 502 storage_unavailable | 504
//!   StorageEndpoint ─► [storage] off: 404 unknown_host; else the store's address:
//!                    the S3 request goes on unchanged (no cookie)
//! ```
//!
//! The edge connects only to addresses found in the table this request loaded
//! (`RequestCtx::table`), never to one derived from the request.

use super::ctx::{CredentialWatch, RequestCtx, Target};
use super::rescue::wants_html;
use super::EdgeProxy;
use crate::access::{self, Decision, Preview};
use crate::answer::{Answer, Detail};
use crate::codes::ErrorCode;
use crate::metrics::RouteKind;
use crate::pages::Pages;
use crate::releases::serve;
use crate::routing::{normalize_host, ActiveRelease, Route, RouteTable};
use crate::schema::{Access, SandboxState};
use crate::upstream::wake::Wait;
use crate::usage::Kind as UsageKind;
use http::header;
use pingora::prelude::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What the request path does after routing.
pub(super) enum Next {
    /// Connect to `ctx.target`.
    Upstream,
    /// Answer by the edge.
    Answer(Answer),
    /// A storage object (its head decided, its body streaming from the store).
    Object(crate::storage::ObjectPlan),
}

impl From<Answer> for Next {
    fn from(a: Answer) -> Next {
        Next::Answer(a)
    }
}

impl From<ErrorCode> for Next {
    fn from(code: ErrorCode) -> Next {
        Next::Answer(code.into())
    }
}

impl EdgeProxy {
    /// Routes the request on one freshly loaded table.
    pub(super) async fn route(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Next> {
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
            return Ok(ErrorCode::InvalidHost.into());
        };
        let route = table.lookup(host);
        // A host the edge does not route is answered 404 on the plain listener too: a
        // redirect would echo whatever `Host` a client sent (CONTRACT §9).
        if !matches!(route, Route::Denied { code: ErrorCode::UnknownHost, .. }) {
            if let Some(location) = self.https_redirect(session, ctx, host) {
                drain_small_body(session).await;
                return Ok(Answer::Redirect { status: 308, location, cookies: Vec::new() }.into());
            }
        }
        match route {
            Route::Denied { code, branding, preview, workspace } => {
                self.attribute(ctx, &table, workspace);
                ctx.branding = branding;
                ctx.preview = preview;
                ctx.kind = if preview { RouteKind::Preview } else { RouteKind::Edge };
                Ok(code.into())
            }
            Route::Preview { sandbox_id, sandbox, port, access, tenant_host } => {
                self.attribute(ctx, &table, Some(sandbox.workspace));
                ctx.usage[2] = Some(self.usage.cell(UsageKind::Sandbox, sandbox_id));
                ctx.kind = RouteKind::Preview;
                ctx.preview = true;
                ctx.port = Some(port);
                ctx.branding = branding_of(&table, sandbox.workspace, tenant_host);
                let p = Preview { host, sandbox: sandbox_id, port, private: access == Access::Private, tls: ctx.tls };
                if p.private || access::decide::has_url_token(session.req_header().raw_path()) {
                    if let Some(answer) = self.authorize(session, ctx, &table, &p).await? {
                        return Ok(answer.into());
                    }
                }
                if sandbox.state == SandboxState::Suspended {
                    return self.wake(session, ctx, &p).await;
                }
                ctx.target = Some(Target::Sandbox { addr: SocketAddr::new(sandbox.address, port) });
                Ok(Next::Upstream)
            }
            Route::Bucket { bucket, tenant_host } => {
                ctx.kind = RouteKind::Storage;
                ctx.branding = branding_of(&table, bucket.workspace, tenant_host);
                let Some(storage) = self.live.load().storage.clone() else {
                    return Ok(ErrorCode::UnknownHost.into());
                };
                self.attribute(ctx, &table, Some(bucket.workspace));
                ctx.usage[3] = Some(self.usage.cell(UsageKind::Bucket, &bucket.id));
                Ok(self.serve_object(session, &storage, bucket).await)
            }
            Route::StorageEndpoint => {
                ctx.kind = RouteKind::Storage;
                let Some(storage) = self.live.load().storage.clone() else {
                    return Ok(ErrorCode::UnknownHost.into());
                };
                // Egress of path-style requests (`/{bucket}/{key}`) goes to the bucket's owner.
                let path = session.req_header().uri.path();
                let name = path.trim_start_matches('/').split('/').next().unwrap_or("");
                if let Some(b) = table.bucket_named(name) {
                    self.attribute(ctx, &table, Some(b.workspace));
                    ctx.usage[3] = Some(self.usage.cell(UsageKind::Bucket, &b.id));
                }
                ctx.target = Some(Target::Storage { addr: storage.addr });
                ctx.storage = Some(storage);
                Ok(Next::Upstream)
            }
            Route::Deployment { deployment, index, tenant_host } => {
                self.attribute(ctx, &table, Some(deployment.workspace));
                ctx.usage[1] = Some(self.usage.cell(UsageKind::Deployment, &deployment.id));
                ctx.kind = RouteKind::Deployment;
                ctx.branding = branding_of(&table, deployment.workspace, tenant_host);
                match &deployment.release {
                    ActiveRelease::Static { sha256, spa } => {
                        Ok(self.serve_static(session, ctx, &deployment.id, &sha256.0, *spa).await.into())
                    }
                    ActiveRelease::Dynamic { .. } => match deployment.pick_instance(None, crate::clock::monotonic_ms()) {
                        Some(inst) => {
                            ctx.target = Some(Target::Deployment { index, addr: inst.addr });
                            ctx.instance = Some(inst.health.start());
                            Ok(Next::Upstream)
                        }
                        None => Ok(Answer::error(ErrorCode::NoHealthyInstance, Detail { port: None, deployment: true }).into()),
                    },
                }
            }
        }
    }

    /// The `Location` of the 308 to HTTPS a plain-listener request for a routed host gets
    /// when TLS is on (ACME HTTP-01 challenges excepted), else `None`.
    fn https_redirect(&self, session: &Session, ctx: &RequestCtx, host: &str) -> Option<Vec<u8>> {
        let port = self.live.load().redirect_to.filter(|_| !ctx.tls)?;
        let raw = session.req_header().raw_path();
        if raw.starts_with(crate::acme::HTTP01_PREFIX.as_bytes()) {
            return None;
        }
        let mut location = Vec::with_capacity(16 + host.len() + raw.len());
        location.extend_from_slice(b"https://");
        location.extend_from_slice(host.as_bytes());
        if port != 443 {
            location.extend_from_slice(format!(":{port}").as_bytes());
        }
        location.extend_from_slice(if raw.starts_with(b"/") { raw } else { b"/" });
        Some(location)
    }

    /// The access decision for preview `p`: `Some` answer, or `None` to go on (then
    /// watching the share or `mp_` token it was opened with, if any).
    async fn authorize(&self, session: &mut Session, ctx: &mut RequestCtx, table: &RouteTable, p: &Preview<'_>) -> Result<Option<Answer>> {
        let now = crate::clock::unix_now();
        match access::authorize(table, session.req_header(), p, now, &self.metrics) {
            Decision::Pass { watch, target } => {
                if watch.is_some() {
                    ctx.watch = Some(CredentialWatch { watch, sandbox: p.sandbox.into(), port: p.port });
                }
                ctx.upstream_target = target;
                Ok(None)
            }
            Decision::Answer(a) => Ok(Some(a)),
            Decision::PasswordPost => access::password_post(session, table, &self.passwords, p, now, &self.metrics).await.map(Some),
        }
    }

    /// Holds a preview of a suspended sandbox while the waker wakes it (CONTRACT §8),
    /// then routes it on the table in which it settled (the sandbox's address may have
    /// changed), or answers 503 `sandbox_starting`.
    async fn wake(&self, session: &mut Session, ctx: &mut RequestCtx, p: &Preview<'_>) -> Result<Next> {
        let detail = Detail { port: Some(p.port), deployment: false };
        let Some(waker) = self.live.load().waker.clone() else {
            return Ok(Answer::error(ErrorCode::SandboxStarting, detail).into());
        };
        let Wait::Settled(table) = waker.wake(p.sandbox, p.host, Instant::now()).await else {
            return Ok(Answer::error(ErrorCode::SandboxStarting, detail).into());
        };
        match table.lookup(p.host) {
            Route::Preview { sandbox_id, sandbox, port, access, tenant_host }
                if sandbox_id == p.sandbox && port == p.port && sandbox.state != SandboxState::Suspended =>
            {
                // Branding indexes belong to a table: take them from the new one.
                ctx.branding = branding_of(&table, sandbox.workspace, tenant_host);
                ctx.table = Some(table.clone());
                // Made private while the request waited: it needs a credential now.
                if access == Access::Private && !p.private {
                    let now_private = Preview { private: true, ..*p };
                    if let Some(answer) = self.authorize(session, ctx, &table, &now_private).await? {
                        return Ok(answer.into());
                    }
                }
                ctx.target = Some(Target::Sandbox { addr: SocketAddr::new(sandbox.address, port) });
                Ok(Next::Upstream)
            }
            // Deleted, or the port unlisted, while the request waited.
            Route::Denied { code, branding, .. } => {
                ctx.branding = branding;
                ctx.table = Some(table.clone());
                Ok(Answer::error(code, detail).into())
            }
            // Suspended again already, or no longer this sandbox: the answer of a wait
            // that did not succeed.
            _ => Ok(Answer::error(ErrorCode::SandboxStarting, detail).into()),
        }
    }

    /// The answer to a request of a deployment whose active version is static release
    /// `sha` (CONTRACT §7). The releases are held in `ctx` while the file streams.
    async fn serve_static(&self, session: &mut Session, ctx: &mut RequestCtx, deployment: &str, sha: &[u8; 32], spa: bool) -> Answer {
        let detail = Detail { port: None, deployment: true };
        let wait = self.live.load().release_wait;
        let release = match &self.releases {
            Some(r) => r.get(sha, wait).await.map_err(|e| tracing::warn!(deployment, error = %e, "static release not served")),
            None => Err(()),
        };
        let Ok(release) = release else {
            return Answer::error(ErrorCode::ReleaseUnavailable, detail);
        };
        let req = session.req_header();
        if req.method != http::Method::HEAD && req.method != http::Method::GET {
            return Answer::MethodNotAllowed { allow: "GET, HEAD" };
        }
        let Some(path) = serve::decode_path(req.uri.path()) else {
            return Answer::error(ErrorCode::NotFound, detail);
        };
        let previous = self.releases.as_ref().and_then(|r| r.previous(deployment, sha));
        let found = serve::resolve(&release, previous.as_deref(), &path, wants_html(req), spa);
        if matches!(found, serve::Found::Missing) {
            return Answer::error(ErrorCode::NotFound, detail);
        }
        let plan = serve::plan(req, &found);
        ctx.releases = [Some(release), previous];
        Answer::File(plan)
    }

    /// A public object of `bucket` (CONTRACT §12): read from the store with the edge's
    /// own credentials; private and missing are one 404.
    async fn serve_object(&self, session: &Session, storage: &super::StorageFront, bucket: &crate::routing::BucketEntry) -> Next {
        let req = session.req_header();
        if req.method != http::Method::HEAD && req.method != http::Method::GET {
            return Answer::MethodNotAllowed { allow: "GET, HEAD" }.into();
        }
        let Some(key) = crate::storage::key_of(req.uri.path().as_bytes()) else {
            return ErrorCode::ObjectNotFound.into();
        };
        match storage.objects.object(&bucket.bucket, bucket.public, &key, req).await {
            Ok(plan) => Next::Object(plan),
            Err(crate::storage::StorageError::NotFound) => ErrorCode::ObjectNotFound.into(),
            Err(crate::storage::StorageError::Timeout) => {
                self.metrics.upstream_failure(crate::metrics::UpstreamFailure::Timeout);
                tracing::warn!(bucket = &*bucket.id, "the store did not answer in time");
                ErrorCode::UpstreamTimeout.into()
            }
            Err(crate::storage::StorageError::Unavailable(e)) => {
                self.metrics.upstream_failure(crate::metrics::UpstreamFailure::Other);
                tracing::warn!(bucket = &*bucket.id, error = %e, "the store failed");
                ErrorCode::StorageUnavailable.into()
            }
        }
    }

    /// Counts the request's usage for `workspace`.
    fn attribute(&self, ctx: &mut RequestCtx, table: &RouteTable, workspace: Option<u32>) {
        if let Some(w) = workspace.and_then(|w| table.workspace(w)) {
            ctx.usage[0] = Some(self.usage.cell(UsageKind::Workspace, &w.id));
        }
    }
}

/// Longest request body read off the wire and dropped before a 308 to `https://`.
const DRAIN_MAX_BYTES: u64 = 64 * 1024;

/// Reads a small request body (a `Content-Length` up to [`DRAIN_MAX_BYTES`]) off the
/// wire and drops it, so the connection can carry the next request after the edge's
/// answer (CONTRACT §9: the plain listener's 308 keeps the connection open; the client
/// sends the body again to `https://`). A longer or chunked body is left unread, and
/// pingora closes the connection after the answer; so does a body that fails to arrive.
async fn drain_small_body(session: &mut Session) {
    let req = session.req_header();
    let length = req.headers.get(header::CONTENT_LENGTH).and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok());
    let small = matches!(length, Some(n) if n > 0 && n <= DRAIN_MAX_BYTES) && !req.headers.contains_key(header::TRANSFER_ENCODING);
    if small && session.drain_request_body().await.is_err() {
        session.set_keepalive(None);
    }
}

/// The branding of workspace `ws` on a platform host, or on the tenant's own host
/// (`tenant_host`: never the platform's).
fn branding_of(table: &Arc<RouteTable>, ws: u32, tenant_host: bool) -> u32 {
    table.workspace(ws).map(|w| if tenant_host { w.tenant_branding } else { w.branding }).unwrap_or(Pages::PLATFORM)
}
