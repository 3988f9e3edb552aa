//! Hostile and slow clients: the checks a request passes before it is routed, the
//! per-IP connection cap, and the timeouts that bound slow clients.
//!
//! ```text
//! accept
//!  → front::Front           over [server] max_connections_per_ip for this IP → closed;
//!                           then the TLS handshake within [tls] handshake_timeout_ms
//!  → request head           pingora parses it; the whole head must arrive within
//!                           client_header_timeout_ms (vendored pingora-proxy patch 3)
//!                           or the connection is closed without an answer
//!  → EdgeProxy::request_filter
//!      screen()             414 / 431 / 400 (connection closed), else routing
//!      body reads           client_body_timeout_ms between two reads → 408
//! ```
//!
//! What pingora 0.9 refuses itself with a bare `400` and a closed connection before any
//! of this runs (measured, `tests/edge/hostile.rs`): differing duplicate or unparseable
//! `Content-Length`, a final `Transfer-Encoding` other than `chunked`, `Transfer-Encoding`
//! on HTTP/1.0, obs-fold and whitespace before a colon, control characters in header
//! values, bad chunk sizes and chunk framing, request targets over 64 KiB (the `http`
//! crate's URI limit), more than 256 header fields or more than 1 MiB of head, an
//! absolute-form target whose authority differs from `Host`, two `Host` fields, and
//! `CONNECT` (405). Control characters and spaces in the request target are
//! percent-encoded by pingora before the edge sees it (`/a%01b`), so nothing raw reaches
//! an upstream.
//!
//! What [`screen`] adds, allocation-free and in this order: targets over
//! [`MAX_TARGET_BYTES`] (414 `uri_too_long`); more than [`MAX_HEADERS`] fields or
//! [`MAX_HEADER_BYTES`] of them (431 `request_header_too_large`); any request framed by
//! both `Content-Length` and `Transfer-Encoding` (pingora drops the length and forwards
//! the chunked body), `Transfer-Encoding` other than one `chunked`, and `Content-Length`
//! repeated or not plain digits (pingora forwards `4, 4` and two identical fields as
//! they came) — all 400 `bad_request`; a NUL in the path (raw or `%00`), `*` with a
//! method other than `OPTIONS`, and absolute-form targets with a scheme other than
//! `http`/`https`, and an HTTP/2 request without a path (no `:path`) — 400
//! `bad_request`. A refused request closes its connection: what follows it on the wire
//! is never read as another request.

use crate::codes::ErrorCode;
use crate::config;
use dashmap::DashMap;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use pingora::http::RequestHeader;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Longest request target (path and query, or the whole absolute-form URI): 414 above.
/// nginx's default `large_client_header_buffers` allows 8 KiB too.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Most header fields a request may carry: 431 above (pingora refuses over 256 with 400).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header fields (names, values and 4 bytes of framing each): 431 above.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The limits of `[server]` that bound slow and greedy clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The whole request head must arrive within this (see `config::Server`).
    pub header_timeout: Duration,
    /// Longest wait between two reads of a request body.
    pub body_timeout: Duration,
    /// Live connections per client IP; 0 = unlimited.
    pub max_connections_per_ip: u32,
}

impl Limits {
    /// The limits configured in `[server]`.
    pub fn from_config(s: &config::Server) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(s.client_header_timeout_ms),
            body_timeout: Duration::from_millis(s.client_body_timeout_ms),
            max_connections_per_ip: s.max_connections_per_ip,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&config::Server::default())
    }
}

/// Why the edge refuses `session`'s request before routing it, if it does. The raw
/// HTTP/1 head is looked at only when the request carries `Transfer-Encoding`.
pub fn screen_session(session: &pingora::proxy::Session) -> Option<ErrorCode> {
    screen(session.req_header(), || session.as_http1().map(|h| h.get_headers_raw_bytes()))
}

/// Why the edge refuses a request, if it does (module docs). `raw_head` gives the
/// request head as received (HTTP/1 only): pingora removes `Content-Length` from the
/// parsed head when `Transfer-Encoding` is present, so only the raw head shows both.
pub fn screen<R: AsRef<[u8]>>(req: &RequestHeader, raw_head: impl FnOnce() -> Option<R>) -> Option<ErrorCode> {
    let target = req.raw_path();
    if target.len() > MAX_TARGET_BYTES {
        return Some(ErrorCode::UriTooLong);
    }
    if req.headers.len() > MAX_HEADERS {
        return Some(ErrorCode::RequestHeaderTooLarge);
    }
    let bytes: usize = req.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if bytes > MAX_HEADER_BYTES {
        return Some(ErrorCode::RequestHeaderTooLarge);
    }
    let mut te = req.headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if te.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Some(ErrorCode::BadRequest);
        }
        if req.headers.contains_key(CONTENT_LENGTH) || raw_head().is_some_and(|raw| has_field(raw.as_ref(), b"content-length")) {
            return Some(ErrorCode::BadRequest);
        }
    }
    let mut cl = req.headers.get_all(CONTENT_LENGTH).iter();
    if let Some(first) = cl.next() {
        let v = first.as_bytes();
        if cl.next().is_some() || v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return Some(ErrorCode::BadRequest);
        }
    }
    // origin-form, `*` for OPTIONS, or absolute-form with an http(s) scheme (pingora
    // checks that its authority is the Host); pingora answers CONNECT itself.
    let form_ok = match target.first() {
        Some(b'/') => true,
        Some(b'*') => target.len() == 1 && req.method == http::Method::OPTIONS,
        _ => match target.iter().position(|&b| b == b':') {
            Some(i) => {
                let scheme = &target[..i];
                (scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) && target[i..].starts_with(b"://")
            }
            None => false,
        },
    };
    // An HTTP/2 request without `:path` (and no `:authority` to make it absolute) has no
    // path at all: malformed (RFC 9113 §8.3.1); h2 itself refuses an empty `:path`.
    let no_path = req.uri.path().is_empty();
    if (!form_ok || no_path) && req.method != http::Method::CONNECT {
        return Some(ErrorCode::BadRequest);
    }
    if has_nul(req.uri.path().as_bytes()) || has_nul(path_of(target)) {
        return Some(ErrorCode::BadRequest);
    }
    None
}

/// The path part of a raw request target (before `?` or `#`).
fn path_of(target: &[u8]) -> &[u8] {
    let end = target.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(target.len());
    &target[..end]
}

/// A NUL byte, raw or percent-encoded.
fn has_nul(path: &[u8]) -> bool {
    path.contains(&0) || path.windows(3).any(|w| w == b"%00")
}

/// Whether a raw HTTP/1 head has a field named `name` (lower-case ASCII): a line that
/// starts with the name, in any case, directly followed by `:`.
fn has_field(raw: &[u8], name: &[u8]) -> bool {
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() > name.len() && line[name.len()] == b':' && line[..name.len()].eq_ignore_ascii_case(name))
}

/// Live connections per client IP, and the cap (`[server] max_connections_per_ip`,
/// 0 = unlimited). Kept by [`crate::front::Front`], which admits each connection once,
/// when it is accepted, and holds its [`Admitted`] for as long as the connection lives.
#[derive(Debug)]
pub(crate) struct PerIp {
    /// Replaced by config reloads; connections already admitted keep their place.
    pub(crate) max: std::sync::atomic::AtomicU32,
    pub(crate) live: DashMap<IpAddr, u32, ahash::RandomState>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub(crate) fn new(max: u32) -> Arc<PerIp> {
        Arc::new(PerIp { max: max.into(), live: DashMap::default() })
    }

    /// Counts a new connection from `ip`, or `None` when `ip` is at the cap.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut n = self.live.entry(ip).or_insert(0);
        if *n >= self.max.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(Admitted { per_ip: self.clone(), ip })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.per_ip.live.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// HTTP/2 control frames a client may send that the server must answer (PING, SETTINGS):
/// a burst of this many per connection…
pub const H2_CONTROL_BURST: u32 = 100;
/// …refilled at this many a second. A client past it is flooding (each one costs the
/// edge a frame to write, whether or not the client reads): its connection is closed,
/// as nginx does.
pub const H2_CONTROL_PER_SEC: u32 = 10;

/// The client preface of HTTP/2 (RFC 9113 §3.4), before the first frame.
const H2_PREFACE_LEN: usize = 24;

/// Reads the frame headers of what an HTTP/2 client sends (the bytes as they arrive, in
/// any pieces) and keeps the budget of PING and SETTINGS frames (not their ACKs).
#[derive(Debug)]
pub(crate) struct H2Flood {
    phase: Phase,
    tokens: u32,
    /// Milliseconds (any monotonic origin) of the last refill.
    refilled_ms: u64,
}

#[derive(Debug)]
enum Phase {
    /// Preface bytes still to pass.
    Preface(usize),
    /// A frame header being read: its bytes so far.
    Header([u8; 9], usize),
    /// Payload bytes still to pass.
    Payload(u32),
}

impl H2Flood {
    pub(crate) fn new(now_ms: u64) -> H2Flood {
        H2Flood { phase: Phase::Preface(H2_PREFACE_LEN), tokens: H2_CONTROL_BURST, refilled_ms: now_ms }
    }

    /// Takes in bytes the client sent; `false` once it has sent more PING and SETTINGS
    /// frames than its budget allows.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], now_ms: u64) -> bool {
        while !bytes.is_empty() {
            match &mut self.phase {
                Phase::Preface(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.phase = Phase::Header([0; 9], 0);
                    }
                }
                Phase::Payload(left) => {
                    let n = (*left as usize).min(bytes.len());
                    *left -= n as u32;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.phase = Phase::Header([0; 9], 0);
                    }
                }
                Phase::Header(head, have) => {
                    let n = (9 - *have).min(bytes.len());
                    head[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < 9 {
                        continue;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
                    let (kind, flags) = (head[3], head[4]);
                    // PING (0x6) and SETTINGS (0x4) without the ACK flag (0x1).
                    if (kind == 0x6 || kind == 0x4) && flags & 0x1 == 0 && !self.take(now_ms) {
                        return false;
                    }
                    self.phase = if len == 0 { Phase::Header([0; 9], 0) } else { Phase::Payload(len) };
                }
            }
        }
        true
    }

    fn take(&mut self, now_ms: u64) -> bool {
        let earned = now_ms.saturating_sub(self.refilled_ms) * u64::from(H2_CONTROL_PER_SEC) / 1000;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(H2_CONTROL_BURST)) as u32;
            self.refilled_ms += earned * 1000 / u64::from(H2_CONTROL_PER_SEC);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests;
