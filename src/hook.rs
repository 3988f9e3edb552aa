//! A small HTTP/1.1 client for the control plane's hooks: `[wake] url` (CONTRACT §8)
//! and the DNS-01 webhook (`[acme.dns01] url`), plus the status-line parser the health
//! probes share.
//!
//! Hooks are URLs an operator writes, answered by services the edge does not control:
//! a [`HookUrl`] is parsed once (plain `http://` only), a call sends one JSON `POST`
//! with `Connection: close`, and only the status line of the answer is read, with a
//! size limit, so nothing a hook answers can panic the edge or hold memory. Calls are
//! not bounded in time here: callers wrap them in their own timeout.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest hook response head read (the status line is all that counts).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The longest `[wake] url` accepted.
const MAX_URL_LEN: usize = 2048;

/// Why a `[wake] url` is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookUrlError {
    #[error("https:// is not supported for the wake hook in this version: use a plain http:// URL (e.g. a sidecar or a private network address)")]
    Https,
    #[error("must be an http://host[:port]/path URL")]
    Scheme,
    #[error("must name a host (http://host[:port]/path)")]
    NoHost,
    #[error("user information (`user@`) is not supported in the wake URL")]
    UserInfo,
    #[error("host `{0}` is not a DNS name, an IPv4 address or a bracketed IPv6 address")]
    BadHost(String),
    #[error("port must be a number from 1 to 65535")]
    BadPort,
    #[error("path must be printable ASCII without spaces or `#`")]
    BadPath,
    #[error("is longer than {MAX_URL_LEN} characters")]
    TooLong,
}

/// A parsed `[wake] url`: `http://host[:port]/path` (plain HTTP only in this version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookUrl {
    /// What to connect to: a DNS name or an IP address (IPv6 without brackets).
    host: String,
    port: u16,
    /// The `Host` header: the authority as written.
    authority: String,
    /// The request target: path and query, at least `/`.
    target: String,
}

impl HookUrl {
    /// Parses `http://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> Result<HookUrl, HookUrlError> {
        if url.len() > MAX_URL_LEN {
            return Err(HookUrlError::TooLong);
        }
        let scheme_end = url.find("://").ok_or(HookUrlError::Scheme)?;
        let scheme = &url[..scheme_end];
        if scheme.eq_ignore_ascii_case("https") {
            return Err(HookUrlError::Https);
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(HookUrlError::Scheme);
        }
        let rest = &url[scheme_end + 3..];
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.is_empty() {
            return Err(HookUrlError::NoHost);
        }
        if authority.contains('@') {
            return Err(HookUrlError::UserInfo);
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| HookUrlError::BadHost(authority.into()))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(HookUrlError::BadHost(addr.into()));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(HookUrlError::BadPort)?),
            };
            (addr, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => parse_port(p).ok_or(HookUrlError::BadPort)?,
        };
        let is_v6 = authority.starts_with('[');
        if !is_v6 && !is_host_name(host) {
            return Err(HookUrlError::BadHost(host.into()));
        }
        if !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
            return Err(HookUrlError::BadPath);
        }
        let target = if target.starts_with('/') { target.to_string() } else { format!("/{target}") };
        Ok(HookUrl { host: host.to_string(), port, authority: authority.to_string(), target })
    }

    /// POSTs the JSON `body` to this URL; `Ok` for a 2xx answer. Unbounded in time:
    /// callers wrap it.
    pub async fn post(&self, body: &str) -> Result<u16, CallError> {
        self.post_to(&self.target, body).await
    }

    /// POSTs the JSON `body` to this URL's path joined with `suffix` (`/set-txt`);
    /// `Ok` for a 2xx answer. Unbounded in time: callers wrap it.
    pub async fn post_json(&self, suffix: &str, body: &str) -> Result<u16, String> {
        let target = format!("{}{suffix}", self.target.trim_end_matches('/'));
        self.post_to(&target, body).await.map_err(|e| e.to_string())
    }

    async fn post_to(&self, target: &str, body: &str) -> Result<u16, CallError> {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nUser-Agent: miosa-edge/{}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            body.len(),
            env!("CARGO_PKG_VERSION"),
        );
        let mut conn = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(CallError::Connect)?;
        let _ = conn.set_nodelay(true);
        conn.write_all(request.as_bytes()).await.map_err(CallError::Io)?;
        let status = read_status(&mut conn).await?;
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(CallError::Status(status))
        }
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|p| *p != 0)
}

/// A DNS name or IPv4 address: labels of `a-z A-Z 0-9 - _`, dot-separated.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.')
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Why a hook call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connection failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the hook closed the connection without a response")]
    Closed,
    #[error("the hook's response is not HTTP/1.x")]
    Malformed,
    #[error("the hook answered {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl CallError {
    /// For the `failure` log field.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Connect(_) => "connect",
            CallError::Io(_) | CallError::Closed => "reset",
            CallError::Malformed => "malformed",
            CallError::Status(_) => "status",
            CallError::Timeout(_) => "timeout",
        }
    }
}

/// Reads response heads until a final (non-1xx) one; its status.
async fn read_status(conn: &mut TcpStream) -> Result<u16, CallError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = parse_status_line(&buf[..end]).ok_or(CallError::Malformed)?;
            if !(100..200).contains(&status) {
                return Ok(status);
            }
            buf.drain(..end + 4);
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(CallError::Malformed);
        }
        let n = conn.read(&mut chunk).await.map_err(CallError::Io)?;
        if n == 0 {
            // A status line without the end of the head still says how it went.
            return parse_status_line(&buf).ok_or(CallError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status of `HTTP/1.x NNN[ reason]` (the first line of `head`).
pub fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ")?;
    if !minor.is_ascii_digit() || rest.len() < 3 || !rest[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    if rest.len() > 3 && rest[3] != b' ' {
        return None;
    }
    let s = rest[..3].iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    (100..=599).contains(&s).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_urls() {
        let u = HookUrl::parse("http://control.internal:8080/v1/wake?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str(), u.target.as_str()),
            ("control.internal", 8080, "control.internal:8080", "/v1/wake?x=1")
        );
        let u = HookUrl::parse("HTTP://10.0.0.1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.target.as_str()), ("10.0.0.1", 80, "/"));
        let u = HookUrl::parse("http://[::1]:9/w").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.authority.as_str()), ("::1", 9, "[::1]:9"));
        assert_eq!(HookUrl::parse("http://h?q").unwrap().target, "/?q");
        for (bad, err) in [
            ("https://cp.example/wake", HookUrlError::Https),
            ("ftp://cp.example/wake", HookUrlError::Scheme),
            ("cp.example/wake", HookUrlError::Scheme),
            ("http:///wake", HookUrlError::NoHost),
            ("http://user:pw@cp/wake", HookUrlError::UserInfo),
            ("http://cp:0/wake", HookUrlError::BadPort),
            ("http://cp:65536/", HookUrlError::BadPort),
            ("http://cp:/", HookUrlError::BadPort),
            ("http://[::1/", HookUrlError::BadHost("[::1".into())),
            ("http://[::1]x/", HookUrlError::BadPort),
            ("http://c p/", HookUrlError::BadHost("c p".into())),
            ("http://cp/a b", HookUrlError::BadPath),
            ("http://cp/a#frag", HookUrlError::BadPath),
            ("http://cp/é", HookUrlError::BadPath),
        ] {
            assert_eq!(HookUrl::parse(bad), Err(err), "{bad}");
        }
        assert_eq!(HookUrl::parse(&format!("http://h/{}", "a".repeat(3000))), Err(HookUrlError::TooLong));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\nx: y"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 \r\n"), Some(204));
        for bad in [&b"HTTP/2 200"[..], b"HTTP/1.1 2000 OK", b"HTTP/1.1 20", b"HTTP/1.1 099 x", b"hello", b"", b"HTTP/1.1 abc"] {
            assert_eq!(parse_status_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
