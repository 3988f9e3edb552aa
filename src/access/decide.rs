//! The access decision for one request to a preview (CONTRACT §3).
//!
//! ```text
//! authorize(snapshot, request, preview, now)
//!   POST /__miosa/share-password on a private preview ─► PasswordPost (password_post)
//!   ?token=mp_…|ms_… ─► valid: 303 to the URL without it + session cookie
//!                       (public preview: the same 303, no cookie)
//!                       WebSocket upgrade (follows no redirect): Pass in place, no
//!                       cookie, the target forwarded without the token
//!                       invalid: the token's 401
//!   public preview ─► Pass
//!   X-Miosa-Token ─► valid: Pass (this request only) · password share: 401 · else 401
//!   session cookie ─► valid: Pass · unreadable: cleared, go on
//!   (every Pass watches what it was opened with: a share, or an mp_ token's exp)
//!   pending cookie (a password share's link was opened) ─► the password form (401)
//!   nothing ─► 401 preview_auth_required (clearing what was unreadable)
//! ```
//!
//! Pure but for the metrics it counts: the request, the snapshot's keys and share
//! records, and `now` decide. Nothing here writes a response; the proxy's one writer
//! sends the [`Answer`].

use super::cookie::{self, Kind as SessionKind, Session as CookieSession};
use super::password::{self, Passwords};
use super::{check_share, share_session_end, verify_token, Credentials};
use crate::answer::{Answer, Cookies, Detail};
use crate::codes::ErrorCode;
use crate::metrics::{Credential, Metrics};
use http::header::{self, HeaderName};
use pingora::http::RequestHeader;
use pingora::prelude::*;

/// Where the share-password form posts (reserved on private preview hosts).
pub const PASSWORD_PATH: &str = "/__miosa/share-password";

static X_MIOSA_TOKEN: HeaderName = HeaderName::from_static("x-miosa-token");

/// The preview a request is for, as access checks need it.
#[derive(Clone, Copy, Debug)]
pub struct Preview<'a> {
    /// The normalised host (cookies are bound to it).
    pub host: &'a str,
    pub sandbox: &'a str,
    pub port: u16,
    /// The port is `private` (else `public`: a token in the URL is still taken out).
    pub private: bool,
    /// The request came over TLS (cookies are `Secure`).
    pub tls: bool,
}

impl Preview<'_> {
    fn detail(&self) -> Detail {
        Detail { port: Some(self.port), deployment: false }
    }

    fn cookie_context(&self, req: &RequestHeader) -> cookie::Context {
        cookie::Context { secure: self.tls || is_localhost(self.host), cross_site: is_cross_site_frame(req) }
    }
}

/// What a live exchange was opened with, and so when it must end (CONTRACT §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// The share record (it ends when the record is deleted or expires).
    pub share: Option<[u8; 32]>,
    /// An `mp_` token's `exp`, in Unix seconds (the session it opened ends then).
    pub until: Option<i64>,
}

impl Watch {
    /// What an exchange authorised by `grant` watches: its share, else its `exp`.
    pub fn of(grant: &super::Grant) -> Watch {
        match grant.share {
            Some(share) => Watch { share: Some(share), until: None },
            None => Watch { share: None, until: Some(grant.expires) },
        }
    }

    /// Whether there is anything to watch.
    pub fn is_some(&self) -> bool {
        self.share.is_some() || self.until.is_some()
    }
}

/// What the edge does with a request to a preview.
#[derive(Debug)]
pub enum Decision {
    /// Forward it; while the exchange lives, watch what it was opened with. `target`:
    /// the request target to forward instead of the client's (a WebSocket upgrade
    /// authorised by `?token=`, without it).
    Pass { watch: Watch, target: Option<Vec<u8>> },
    /// Answer it.
    Answer(Answer),
    /// A password form's POST: [`password_post`] reads and checks it.
    PasswordPost,
}

impl From<Answer> for Decision {
    fn from(a: Answer) -> Decision {
        Decision::Answer(a)
    }
}

/// Decides a request to preview `p` (see the module head). Only for private previews,
/// or public ones whose target carries a token ([`has_url_token`]).
pub fn authorize(table: &impl Credentials, req: &RequestHeader, p: &Preview<'_>, now: i64, metrics: &Metrics) -> Decision {
    let (host, sandbox, port) = (p.host, p.sandbox, p.port);
    let cctx = p.cookie_context(req);
    if p.private && req.uri.path() == PASSWORD_PATH {
        return Decision::PasswordPost;
    }
    if let Some((token, location)) = url_token(req.raw_path()) {
        // A WebSocket handshake follows no redirect: it is authorised in place, and
        // the token taken out of the target it is forwarded with.
        let upgrade = req.headers.contains_key(header::UPGRADE);
        if !p.private {
            // Nothing to open, but a token never reaches the sandbox.
            if upgrade {
                return Decision::Pass { watch: Watch::default(), target: Some(location) };
            }
            return Answer::see_other(location, Vec::new()).into();
        }
        let credential = if token.starts_with("ms_") { Credential::ShareToken } else { Credential::PreviewToken };
        return match verify_token(table, &token, sandbox, port, now) {
            Ok(grant) if upgrade => {
                metrics.access(credential, !grant.needs_password);
                if grant.needs_password {
                    return Answer::error(ErrorCode::SharePasswordRequired, p.detail()).into();
                }
                Decision::Pass { watch: Watch::of(&grant), target: Some(location) }
            }
            Ok(grant) => {
                metrics.access(credential, true);
                let kind = match (grant.share, grant.needs_password) {
                    (Some(_), true) => SessionKind::Pending,
                    (Some(_), false) => SessionKind::Share,
                    (None, _) => SessionKind::Preview,
                };
                let expires = if kind == SessionKind::Pending { grant.expires.min(now + cookie::PENDING_SECS) } else { grant.expires };
                let s = CookieSession { kind, cross_site: cctx.cross_site, expires, share: grant.share };
                let Some(value) = cookie::encode(table.keys(), host, &s) else {
                    return Answer::from(ErrorCode::InternalError).into();
                };
                let name = if kind == SessionKind::Pending { cctx.pending_name() } else { cctx.session_name() };
                Answer::see_other(location, vec![cookie::set_cookie(cctx, name, &value, expires - now)]).into()
            }
            Err(code) => {
                metrics.access(credential, false);
                Answer::error(code, p.detail()).into()
            }
        };
    }
    if !p.private {
        return Decision::Pass { watch: Watch::default(), target: None };
    }
    if let Some(v) = req.headers.get(&X_MIOSA_TOKEN) {
        let token = std::str::from_utf8(v.as_bytes()).unwrap_or("").trim();
        let credential = if token.starts_with("ms_") { Credential::ShareToken } else { Credential::PreviewToken };
        let result = verify_token(table, token, sandbox, port, now);
        metrics.access(credential, matches!(result, Ok(g) if !g.needs_password));
        return match result {
            Ok(g) if g.needs_password => Answer::error(ErrorCode::SharePasswordRequired, p.detail()).into(),
            Ok(g) => Decision::Pass { watch: Watch::of(&g), target: None },
            Err(code) => Answer::error(code, p.detail()).into(),
        };
    }
    // The session cookie; one that fails counts as none and is cleared.
    let mut clear = Vec::new();
    let cookies = || req.headers.get_all(header::COOKIE).into_iter().map(|v| v.as_bytes());
    if let Some(v) = cookie::find(cookies(), cctx.session_name()) {
        match cookie::decode(table.keys(), host, v, now).filter(|s| s.kind != SessionKind::Pending) {
            Some(s) if super::still_valid(table, &s.grant(), sandbox, port, now) => {
                metrics.access(Credential::Session, true);
                return Decision::Pass { watch: Watch::of(&s.grant()), target: None };
            }
            s => {
                metrics.access(Credential::Session, false);
                clear_both(&mut clear, cctx, cctx.session_name(), s.map(|s| s.cross_site));
            }
        }
    }
    if let Some(v) = cookie::find(cookies(), cctx.pending_name()) {
        match cookie::decode(table.keys(), host, v, now).filter(|s| s.kind == SessionKind::Pending) {
            Some(s) if super::still_valid(table, &s.grant(), sandbox, port, now) => {
                let next = String::from_utf8_lossy(req.raw_path());
                let next = password::safe_next(&next).to_string();
                return Answer::PasswordForm { detail: p.detail(), next, wrong: false, cookies: clear }.into();
            }
            s => clear_both(&mut clear, cctx, cctx.pending_name(), s.map(|s| s.cross_site)),
        }
    }
    if clear.is_empty() {
        metrics.access(Credential::None, false);
    }
    Answer::Error { code: ErrorCode::PreviewAuthRequired, detail: p.detail(), cookies: clear }.into()
}

/// The password form's POST: checks the pending cookie, the attempt limit and the
/// password (argon2 off the proxy threads, reading the form's body), then opens the
/// session (a 303 to the page the form was shown for).
pub async fn password_post(
    session: &mut Session,
    table: &impl Credentials,
    passwords: &Passwords,
    p: &Preview<'_>,
    now: i64,
    metrics: &Metrics,
) -> Result<Answer> {
    let (host, sandbox, port) = (p.host, p.sandbox, p.port);
    if session.req_header().method != http::Method::POST {
        return Ok(Answer::see_other(b"/".to_vec(), Vec::new()));
    }
    let req = session.req_header();
    let cctx = p.cookie_context(req);
    let pending = cookie::find(req.headers.get_all(header::COOKIE).into_iter().map(|v| v.as_bytes()), cctx.pending_name())
        .and_then(|v| cookie::decode(table.keys(), host, v, now))
        .filter(|s| s.kind == SessionKind::Pending);
    let Some((pending, hash)) = pending.and_then(|p| p.share.map(|h| (p, h))) else {
        // The form outlived its pending cookie (15 minutes): start again from the link.
        return Ok(Answer::error(ErrorCode::PreviewAuthRequired, p.detail()));
    };
    let Some(share) = table.share(&hash) else {
        return Ok(Answer::error(ErrorCode::ShareTokenInvalid, p.detail()));
    };
    if let Err(code) = check_share(share, sandbox, port, now) {
        return Ok(Answer::error(code, p.detail()));
    }
    let Some(hash_str) = share.password_hash.clone() else {
        // The password was removed meanwhile: the token alone opens the session.
        return Ok(open_share_session(table, p, pending, share.expires_at, "/", now));
    };
    let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if !passwords.admit(&hash, ip, now).await {
        metrics.access(Credential::Password, false);
        return Ok(Answer::error(ErrorCode::TooManyAttempts, p.detail()));
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
    if passwords.verify(hash_str, form.password).await {
        metrics.access(Credential::Password, true);
        passwords.forget(&hash, ip).await;
        return Ok(open_share_session(table, p, pending, share.expires_at, &next, now));
    }
    metrics.access(Credential::Password, false);
    passwords.failed(&hash, ip, now);
    Ok(Answer::PasswordForm { detail: p.detail(), next, wrong: true, cookies: Vec::new() })
}

/// Opens a share session after its password (303 to `next`, session cookie set,
/// pending cookie cleared). The cookies are framed like the link was opened (a
/// partitioned cookie in a cross-site frame): the form's own POST is same-origin.
fn open_share_session(
    table: &impl Credentials,
    p: &Preview<'_>,
    pending: CookieSession,
    expires_at: Option<i64>,
    next: &str,
    now: i64,
) -> Answer {
    let cctx = cookie::Context { secure: p.tls || is_localhost(p.host), cross_site: pending.cross_site };
    let expires = share_session_end(table.keys(), expires_at, now);
    let s = CookieSession { kind: SessionKind::Share, cross_site: pending.cross_site, expires, share: pending.share };
    let Some(value) = cookie::encode(table.keys(), p.host, &s) else {
        return ErrorCode::InternalError.into();
    };
    let cookies: Cookies =
        vec![cookie::set_cookie(cctx, cctx.session_name(), &value, expires - now), cookie::clear_cookie(cctx, cctx.pending_name())];
    Answer::see_other(next.as_bytes().to_vec(), cookies)
}

/// Clears cookie `name` as it was set: partitioned or not (`cross_site`), or both ways
/// when that is unknown (an unreadable cookie), since a partitioned cookie is only
/// cleared by a partitioned `Set-Cookie`.
fn clear_both(out: &mut Cookies, cctx: cookie::Context, name: &str, cross_site: Option<bool>) {
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

/// `localhost` and `*.localhost`: secure contexts for browsers even over plain HTTP.
pub fn is_localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// A navigation into a cross-site frame (`Sec-Fetch-Dest: iframe`, `Sec-Fetch-Site: cross-site`).
fn is_cross_site_frame(req: &RequestHeader) -> bool {
    let is = |name: &str, v: &[u8]| req.headers.get(name).is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(v));
    is("sec-fetch-dest", b"iframe") && is("sec-fetch-site", b"cross-site")
}

/// Whether a request target carries an edge token (`token=mp_…` or `token=ms_…`).
pub fn has_url_token(raw_path: &[u8]) -> bool {
    raw_path.windows(9).any(|w| w == b"token=mp_" || w == b"token=ms_")
        || raw_path.windows(11).any(|w| w.eq_ignore_ascii_case(b"token=mp%5f") || w.eq_ignore_ascii_case(b"token=ms%5f"))
}

/// The edge token in a request target's query, and the same target without it (every
/// `token` parameter holding an `mp_`/`ms_` token removed, the rest kept in order).
/// A `token` parameter of the app's own (another value) is left alone.
pub fn url_token(raw_path: &[u8]) -> Option<(String, Vec<u8>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
