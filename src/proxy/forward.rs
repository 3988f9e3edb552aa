//! The headers the edge adds and removes (CONTRACT §3, §6).
//!
//! Upstream: `X-Forwarded-For` (the client address; a client's own value is replaced),
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Request-Id`; the credential firewall takes
//! out `X-Miosa-*` and the edge's own cookies. Downstream: `X-Request-Id` on every
//! response, `X-Robots-Tag: noindex` on previews, HTTP/1.1 to HTTP/1.1 clients.
//!
//! These run on every request: names are [`StaticHeaderName`]s (inserted without being
//! parsed or copied, vendored pingora-http patch) and the client address is written
//! without `fmt`.

use super::ctx::RequestCtx;
use crate::access::cookie;
use http::header::{self, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader, StaticHeaderName};
use pingora::prelude::*;
use std::net::IpAddr;

pub static XRID: StaticHeaderName = StaticHeaderName::new("x-request-id", "X-Request-Id");
static XFF: StaticHeaderName = StaticHeaderName::new("x-forwarded-for", "X-Forwarded-For");
static XFP: StaticHeaderName = StaticHeaderName::new("x-forwarded-proto", "X-Forwarded-Proto");
static XFH: StaticHeaderName = StaticHeaderName::new("x-forwarded-host", "X-Forwarded-Host");
pub static XRT: StaticHeaderName = StaticHeaderName::new("x-robots-tag", "X-Robots-Tag");
pub static NOINDEX: HeaderValue = HeaderValue::from_static("noindex");
pub static NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Sets the forwarding headers of the request going upstream and applies the credential
/// firewall. `client` is the client's address, when the connection has one.
pub fn upstream_request(req: &mut RequestHeader, client: Option<IpAddr>, ctx: &RequestCtx) -> Result<()> {
    match client {
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
    if let Some(target) = &ctx.upstream_target {
        // A WebSocket upgrade authorised by `?token=`: forwarded without the token.
        req.set_raw_path(target)?;
    }
    strip_edge_headers(req);
    strip_edge_cookies(req)
}

/// Adds the edge's headers to a response from upstream, and answers an HTTP/1.1 client
/// in HTTP/1.1 whatever version the upstream spoke (CONTRACT §6: a Python `http.server`
/// answers in HTTP/1.0). The body's framing is already one HTTP/1.1 keeps: its
/// `Content-Length`, or chunked when the upstream ends it by closing (the vendored
/// pingora-proxy sets `Transfer-Encoding: chunked` before this runs).
pub fn downstream_response(resp: &mut ResponseHeader, client: http::Version, ctx: &RequestCtx) -> Result<()> {
    if client == http::Version::HTTP_11 && resp.version < http::Version::HTTP_11 {
        resp.set_version(http::Version::HTTP_11);
    }
    resp.insert_static(&XRID, ctx.request_id.clone())?;
    if ctx.preview {
        resp.append_static(&XRT, NOINDEX.clone())?;
    }
    Ok(())
}

/// What every response from the store carries, through the S3 endpoint too (a presigned
/// `GET` is opened by browsers on the storage origin): `nosniff`, `Content-Security-Policy:
/// sandbox` for types that can run script, and no cookie (CONTRACT §12).
pub fn storage_response(resp: &mut ResponseHeader) -> Result<()> {
    resp.insert_header(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone())?;
    let scriptable = resp.headers.get(header::CONTENT_TYPE).is_some_and(|v| crate::storage::scriptable(v.as_bytes()));
    if scriptable {
        resp.insert_header(header::CONTENT_SECURITY_POLICY, "sandbox")?;
    }
    resp.remove_header(&header::SET_COOKIE);
    Ok(())
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
fn write_ip(ip: IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
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
        IpAddr::V6(_) => {
            let mut w = &mut buf[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
            48 - w.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_written_as_std_writes_them() {
        let mut buf = [0u8; 48];
        for a in [0u32, 1, 9, 10, 99, 100, 255, 256, 0x0a00_0001, 0x7f00_0001, 0xc0a8_6401, 0x6464_6464, 0xffff_ffff] {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(a));
            let n = write_ip(ip, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).expect("ascii"), ip.to_string());
        }
        for s in ["::1", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:192.0.2.128"] {
            let ip: IpAddr = s.parse().expect("v6");
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
}
