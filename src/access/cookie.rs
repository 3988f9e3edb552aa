//! The edge's session cookies: signed, host-bound values and their `Set-Cookie` lines.
//!
//! Value: `1{kind}{mode}.{expires}.{share}.{mac}` where `kind` is `p` (opened by an
//! `mp_` token), `s` (by a share token) or `w` (a share token waiting for its
//! password), `mode` is `c` when the cookie was set for a cross-site frame
//! (`SameSite=None; Partitioned`) and `l` otherwise, `share` is the base64url SHA-256
//! of the share token (`-` for `p`), and `mac` the first 16 bytes of
//! HMAC-SHA256(session key, `host \0 payload`), base64url. Binding the exact host into
//! the MAC is what keeps a cookie of `5173-abc…` from opening `3000-abc…`; naming the
//! share record is what lets deleting it end every session it opened.
//!
//! Names: `__Host-miosa_session` (and `__Host-miosa_share_pending` for the password
//! step) on secure contexts (TLS, or `localhost` / `*.localhost`, which browsers treat
//! as secure); `miosa_session` / `miosa_share_pending` without `Secure` on plain HTTP
//! elsewhere (CONTRACT §3).

use super::{Grant, Keys};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use std::fmt::Write;

/// Session cookie name on secure contexts.
pub const SESSION_SECURE: &str = "__Host-miosa_session";
/// Session cookie name on plain HTTP for hosts that are not `localhost`.
pub const SESSION_PLAIN: &str = "miosa_session";
/// Pending-password cookie name on secure contexts.
pub const PENDING_SECURE: &str = "__Host-miosa_share_pending";
/// Pending-password cookie name on plain HTTP.
pub const PENDING_PLAIN: &str = "miosa_share_pending";
/// How long the password form may take to be filled in.
pub const PENDING_SECS: i64 = 15 * 60;
const MAC_LEN: usize = 16;
/// Longest cookie value the edge ever writes is ~90 bytes.
const MAX_VALUE_LEN: usize = 160;

/// What a session cookie stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Opened by an `mp_` token.
    Preview,
    /// Opened by a share token (and its password, if it has one).
    Share,
    /// A share token whose password has not been entered yet.
    Pending,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Preview => b'p',
            Kind::Share => b's',
            Kind::Pending => b'w',
        }
    }
}

/// A decoded (and verified) cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub kind: Kind,
    /// Set for a cross-site frame (partitioned cookie).
    pub cross_site: bool,
    pub expires: i64,
    pub share: Option<[u8; 32]>,
}

impl Session {
    /// The grant this session carries.
    pub fn grant(&self) -> Grant {
        Grant { expires: self.expires, share: self.share, needs_password: self.kind == Kind::Pending }
    }
}

/// How `Set-Cookie` lines are written for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// TLS listener, or a `localhost` host: `__Host-` names with `Secure`.
    pub secure: bool,
    /// The request came from a cross-site frame: `SameSite=None; Partitioned`.
    pub cross_site: bool,
}

impl Context {
    /// The session cookie's name in this context.
    pub fn session_name(&self) -> &'static str {
        if self.secure {
            SESSION_SECURE
        } else {
            SESSION_PLAIN
        }
    }

    /// The pending-password cookie's name in this context.
    pub fn pending_name(&self) -> &'static str {
        if self.secure {
            PENDING_SECURE
        } else {
            PENDING_PLAIN
        }
    }
}

fn mac(key: &hmac::Key, host: &str, payload: &[u8]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(host.as_bytes());
    ctx.update(&[0]);
    ctx.update(payload);
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Encodes and signs a cookie value for `host` (`None` without a session key).
pub fn encode(keys: &Keys, host: &str, s: &Session) -> Option<String> {
    let key = keys.session_key()?;
    let mut v = String::with_capacity(96);
    v.push('1');
    v.push(s.kind.tag() as char);
    v.push(if s.cross_site { 'c' } else { 'l' });
    let _ = write!(v, ".{}.", s.expires);
    match &s.share {
        Some(h) => B64.encode_string(h, &mut v),
        None => v.push('-'),
    }
    let tag = mac(key, host, v.as_bytes());
    v.push('.');
    B64.encode_string(&tag[..MAC_LEN], &mut v);
    Some(v)
}

/// Decodes a cookie value for `host`; `None` if it is malformed, tampered with,
/// signed for another host, or expired at `now`.
pub fn decode(keys: &Keys, host: &str, value: &str, now: i64) -> Option<Session> {
    let key = keys.session_key()?;
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    let (payload, mac64) = value.rsplit_once('.')?;
    let mut tag = [0u8; 24];
    if B64.decode_slice(mac64, &mut tag).ok()? != MAC_LEN {
        return None;
    }
    let expect = mac(key, host, payload.as_bytes());
    // Constant-time comparison of the truncated tag.
    if expect[..MAC_LEN].iter().zip(&tag[..MAC_LEN]).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return None;
    }
    let mut parts = payload.split('.');
    let (head, exp, share) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let &[b'1', kind, mode] = head.as_bytes() else { return None };
    let kind = match kind {
        b'p' => Kind::Preview,
        b's' => Kind::Share,
        b'w' => Kind::Pending,
        _ => return None,
    };
    let cross_site = match mode {
        b'c' => true,
        b'l' => false,
        _ => return None,
    };
    let expires: i64 = exp.parse().ok()?;
    if expires <= now {
        return None;
    }
    let share = match (kind, share) {
        (Kind::Preview, "-") => None,
        (Kind::Share | Kind::Pending, s) => {
            let mut h = [0u8; 33];
            if B64.decode_slice(s, &mut h).ok()? != 32 {
                return None;
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(&h[..32]);
            Some(out)
        }
        _ => return None,
    };
    Some(Session { kind, cross_site, expires, share })
}

/// A `Set-Cookie` line setting `name=value` for `max_age` seconds.
pub fn set_cookie(ctx: Context, name: &str, value: &str, max_age: i64) -> String {
    let mut s = format!("{name}={value}; Path=/; Max-Age={}; HttpOnly", max_age.max(0));
    attributes(ctx, &mut s);
    s
}

/// A `Set-Cookie` line clearing `name`.
pub fn clear_cookie(ctx: Context, name: &str) -> String {
    let mut s = format!("{name}=; Path=/; Max-Age=0; HttpOnly");
    attributes(ctx, &mut s);
    s
}

fn attributes(ctx: Context, s: &mut String) {
    match (ctx.secure, ctx.cross_site) {
        (true, true) => s.push_str("; Secure; SameSite=None; Partitioned"),
        (true, false) => s.push_str("; Secure; SameSite=Lax"),
        // Browsers refuse `SameSite=None` without `Secure`: a plain-HTTP host cannot
        // keep a session inside a cross-site frame (use TLS for embedding).
        (false, _) => s.push_str("; SameSite=Lax"),
    }
}

/// The value of cookie `name` in a request's `Cookie` header values (the first one
/// that is UTF-8; other cookies' bytes do not matter).
pub fn find<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a str> {
    for h in headers {
        for pair in h.split(|b| *b == b';') {
            let Some(eq) = pair.iter().position(|b| *b == b'=') else { continue };
            if pair[..eq].trim_ascii() == name.as_bytes() {
                if let Ok(v) = std::str::from_utf8(pair[eq + 1..].trim_ascii()) {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Whether a `Cookie` header value names one of the edge's cookies.
pub fn mentions_edge_cookie(h: &[u8]) -> bool {
    h.windows(13).any(|w| w == b"miosa_session") || h.windows(19).any(|w| w == b"miosa_share_pending")
}

/// A `Cookie` header value without the edge's own cookies (the app's cookies are kept
/// in order, each pair unchanged, joined by `; `); `None` when nothing is left.
pub fn without_edge_cookies(h: &[u8]) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(h.len());
    for pair in h.split(|b| *b == b';') {
        let trimmed = pair.trim_ascii_start();
        let name = trimmed.split(|b| *b == b'=').next().unwrap_or(b"").trim_ascii_end();
        if matches!(name, b"__Host-miosa_session" | b"miosa_session" | b"__Host-miosa_share_pending" | b"miosa_share_pending") {
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(trimmed);
    }
    (!out.is_empty()).then_some(out)
}
