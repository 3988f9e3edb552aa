//! The one writer of the edge's own answers, and the rescue of failed exchanges.
//!
//! Every [`Answer`] — decided by access checks, routing, the static-file server, the
//! ACME responder, or [`rescue`] for an exchange that failed — is written here, so
//! each carries `X-Request-Id`, and pages and errors carry `Cache-Control: no-store`,
//! `nosniff`, the page CSP (HTML) and `X-Robots-Tag` (previews), in the workspace's
//! branding taken from the table the request routed on.

use super::ctx::RequestCtx;
use super::forward::{NOINDEX, NOSNIFF, XRID, XRT};
use super::EdgeProxy;
use crate::answer::{Answer, Body, Detail};
use crate::codes::ErrorCode;
use crate::pages::{Pages, PAGE_CSP};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::prelude::*;
use pingora::{ErrorSource, ErrorType};

impl EdgeProxy {
    /// Writes `answer` to the client: the one way the edge answers by itself.
    pub(super) async fn answer(&self, session: &mut Session, ctx: &mut RequestCtx, answer: Answer) -> Result<()> {
        match answer {
            Answer::Error { code, detail, cookies } => self.page(session, ctx, code, detail, None, &cookies).await,
            Answer::PasswordForm { detail, next, wrong, cookies } => {
                let form = match &ctx.table {
                    Some(t) => t.pages.password_form(ctx.branding, &next, wrong, ctx.request_id()),
                    None => self.routes.load().pages.password_form(Pages::PLATFORM, &next, wrong, ctx.request_id()),
                };
                self.page(session, ctx, ErrorCode::SharePasswordRequired, detail, Some(form), &cookies).await
            }
            Answer::Redirect { status, location, cookies } => {
                let mut resp = own_head(status, Some(6 + cookies.len()))?;
                let location =
                    HeaderValue::from_bytes(&location).map_err(|_| Error::explain(ErrorType::HTTPStatus(400), "bad request target"))?;
                resp.insert_header(header::LOCATION, location)?;
                resp.insert_header(header::CONTENT_LENGTH, 0)?;
                resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                resp.insert_static(&XRID, ctx.request_id.clone())?;
                resp.insert_header(header::REFERRER_POLICY, "no-referrer")?;
                if ctx.preview {
                    resp.insert_static(&XRT, NOINDEX.clone())?;
                }
                for c in &cookies {
                    resp.append_header(header::SET_COOKIE, c.as_str())?;
                }
                ctx.edge_status = Some(status);
                session.write_response_header(Box::new(resp), true).await
            }
            Answer::Challenge(key_auth) => {
                let mut resp = own_head(200, Some(4))?;
                resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
                resp.insert_header(header::CONTENT_LENGTH, key_auth.len())?;
                resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                resp.insert_static(&XRID, ctx.request_id.clone())?;
                ctx.edge_status = Some(200);
                self.head_and_body(session, resp, Some(key_auth)).await
            }
            Answer::MethodNotAllowed { allow } => {
                let mut resp = own_head(405, Some(4))?;
                resp.insert_header(header::ALLOW, allow)?;
                resp.insert_header(header::CONTENT_LENGTH, 0)?;
                resp.insert_static(&XRID, ctx.request_id.clone())?;
                ctx.edge_status = Some(405);
                session.write_response_header(Box::new(resp), true).await
            }
            Answer::File(plan) => {
                let mut resp = own_head(plan.status, Some(plan.headers.len() + 4))?;
                for (name, value) in plan.headers {
                    resp.insert_header(name, value)?;
                }
                if plan.status != 304 {
                    // HEAD announces the length a GET would send.
                    resp.insert_header(header::CONTENT_LENGTH, plan.body.len())?;
                }
                resp.insert_static(&XRID, ctx.request_id.clone())?;
                resp.insert_header(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone())?;
                ctx.edge_status = Some(plan.status);
                let no_body = session.req_header().method == http::Method::HEAD || matches!(plan.body, Body::None);
                session.write_response_header(Box::new(resp), no_body).await?;
                match plan.body {
                    _ if no_body => Ok(()),
                    Body::None => Ok(()),
                    Body::Memory(b) => session.write_response_body(Some(b), true).await,
                    Body::File { path, open, offset, len, copy: Some(b) } => {
                        // Only files kept in memory, so read once and most likely in the
                        // page cache: sendfile would otherwise wait on the disk here.
                        let sent = if ctx.tls {
                            0
                        } else {
                            crate::releases::send_file(session, open.as_ref().map(|f| &*f.0), &path, offset, len).await?
                        };
                        session.write_response_body((sent < b.len()).then(|| b.slice(sent..)), true).await
                    }
                    Body::File { path, offset, len, copy: None, .. } => crate::releases::stream_file(session, &path, offset, len).await,
                }
            }
            Answer::Bare(status) => session.respond_error(status).await,
        }
    }

    /// A storage object: the head decided by [`crate::storage`], the request id, then its
    /// body streamed from the store with the client's pace (nothing for `HEAD` or 304).
    pub(super) async fn write_object(&self, session: &mut Session, ctx: &mut RequestCtx, plan: crate::storage::ObjectPlan) -> Result<()> {
        let mut resp = own_head(plan.status, Some(plan.headers.len() + 2))?;
        for (name, value) in plan.headers {
            resp.append_header(name, value)?;
        }
        if let Some(n) = plan.content_length {
            resp.insert_header(header::CONTENT_LENGTH, n)?;
        }
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        ctx.edge_status = Some(plan.status);
        let body = plan.body.filter(|_| session.req_header().method != http::Method::HEAD);
        session.write_response_header(Box::new(resp), body.is_none()).await?;
        match body {
            Some(b) => crate::storage::stream_object(session, b).await,
            None => Ok(()),
        }
    }

    /// The page (HTML clients) or JSON error of `code`; `html` replaces the code's page
    /// (the password form).
    async fn page(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        code: ErrorCode,
        detail: Detail,
        html: Option<Bytes>,
        cookies: &[String],
    ) -> Result<()> {
        let status = code.status();
        let wants_html = wants_html(session.req_header());
        let body = match (wants_html, html) {
            (true, Some(b)) => b,
            (true, None) => match &ctx.table {
                Some(t) => t.pages.html(ctx.branding, code, detail, ctx.request_id()),
                None => self.routes.load().pages.html(Pages::PLATFORM, code, detail, ctx.request_id()),
            },
            (false, _) => Pages::json(code),
        };
        let mut resp = own_head(status, Some(8 + cookies.len()))?;
        resp.insert_header(header::CONTENT_TYPE, if wants_html { "text/html; charset=utf-8" } else { "application/json" })?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_static(&XRID, ctx.request_id.clone())?;
        resp.insert_header(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone())?;
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
        self.head_and_body(session, resp, Some(body)).await
    }

    /// Writes `resp` and, unless the request is a `HEAD`, `body`.
    async fn head_and_body(&self, session: &mut Session, resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
        let head_only = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head_only).await?;
        if !head_only {
            session.write_response_body(body, true).await?;
        }
        Ok(())
    }
}

/// What a failed exchange answers: the page of its code, or — for a malformed request
/// pingora already judged, or a client that is gone — `None` (a bare status, or
/// nothing).
pub(super) fn rescue(e: &Error) -> Option<ErrorCode> {
    match (e.esource(), e.etype()) {
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
    }
}

/// Whether the client accepts an HTML page (CONTRACT §5).
pub fn wants_html(req: &RequestHeader) -> bool {
    req.headers.get(header::ACCEPT).is_some_and(|v| v.as_bytes().windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")))
}

/// A head for one of the edge's own answers: without pingora's map of names as written,
/// since the edge writes none of its names in a case of its own — they go out in their
/// usual case (`X-Request-Id`, `ETag`; vendor/README.md pingora-http 9), and each field
/// costs one map insert instead of two.
fn own_head(status: impl TryInto<http::StatusCode>, fields: Option<usize>) -> Result<ResponseHeader> {
    ResponseHeader::build_no_case(status, fields)
}
