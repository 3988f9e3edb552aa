//! AWS Signature Version 4 for the edge's own reads, done in the transport.
//!
//! `object_store` signs every request itself, and its signer was half of the edge's
//! instructions per public object (callgrind: it derives the signing key with four
//! HMACs per request, parses the URL again and hex-encodes through `fmt`). The stores'
//! clients are built with `skip_signature`, and [`Signing`] — the `HttpService` they send
//! through — signs instead, with the day's signing key computed once and kept.
//!
//! What is signed: `host`, `range` and every `x-amz-*` header (the date and the payload
//! hash this adds, and any `object_store` set), the path as sent (S3 encodes it once)
//! and the query in canonical order. Requests here are `GET`/`HEAD` with no body (the payload hash of
//! the empty body); a request with a body is sent as `UNSIGNED-PAYLOAD`.

use async_trait::async_trait;
use object_store::client::{HttpClient, HttpError, HttpRequest, HttpResponse, HttpService};
use std::fmt;
use std::sync::Mutex;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The SHA-256 of nothing, as S3 wants it for a request without a body.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The credentials and region a request is signed with, and the day's signing key.
pub(super) struct Signer {
    key_id: String,
    secret: String,
    region: String,
    /// `(YYYYMMDD, signing key)` of the last day signed for.
    day: Mutex<Option<(String, ring::hmac::Key)>>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("region", &self.region).finish_non_exhaustive()
    }
}

impl Signer {
    pub(super) fn new(key_id: &str, secret: &str, region: &str) -> Signer {
        Signer { key_id: key_id.into(), secret: secret.into(), region: region.into(), day: Mutex::new(None) }
    }

    /// Adds `host`, `x-amz-date`, `x-amz-content-sha256` and `authorization` to `req`,
    /// signed at `now` (Unix seconds).
    pub(super) fn sign(&self, req: &mut HttpRequest, now: i64) -> Result<(), String> {
        let host = host_of(req.uri()).ok_or("the request to the store names no host")?;
        let stamp: String = crate::schema::Timestamp(now).to_rfc3339().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let date = stamp.get(..8).ok_or("a bad clock")?.to_string();
        let digest = if req.body().is_empty() { EMPTY_SHA256 } else { UNSIGNED_PAYLOAD };
        let value = |s: &str| http::HeaderValue::from_str(s).map_err(|_| format!("`{s}` is not a header value"));
        let headers = req.headers_mut();
        headers.insert(http::header::HOST, value(&host)?);
        headers.insert("x-amz-date", value(&stamp)?);
        headers.insert("x-amz-content-sha256", http::HeaderValue::from_static(digest));
        let (signed, canonical_headers) = canonical_headers(req.headers())?;
        let canonical_request = format!(
            "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{digest}",
            req.method().as_str(),
            req.uri().path(),
            canonical_query(req.uri().query().unwrap_or(""))
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let hashed = hex(ring::digest::digest(&ring::digest::SHA256, canonical_request.as_bytes()).as_ref())?;
        let to_sign = format!("{ALGORITHM}\n{stamp}\n{scope}\n{hashed}");
        let signature = hex(ring::hmac::sign(&self.key_for(&date), to_sign.as_bytes()).as_ref())?;
        let auth = format!("{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}", self.key_id);
        req.headers_mut().insert(http::header::AUTHORIZATION, value(&auth)?);
        Ok(())
    }

    /// The signing key of `date` (YYYYMMDD): four HMACs once a day.
    fn key_for(&self, date: &str) -> ring::hmac::Key {
        let mut day = self.day.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((d, key)) = day.as_ref() {
            if d == date {
                return key.clone();
            }
        }
        let hmac = |key: &[u8], data: &[u8]| ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data);
        let k_date = hmac(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        let k_region = hmac(k_date.as_ref(), self.region.as_bytes());
        let k_service = hmac(k_region.as_ref(), b"s3");
        let k_signing = hmac(k_service.as_ref(), b"aws4_request");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k_signing.as_ref());
        *day = Some((date.to_string(), key.clone()));
        key
    }
}

/// `host[:port]` as `Host` carries it: the port only when it is not the scheme's default.
fn host_of(uri: &http::Uri) -> Option<String> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    Some(match uri.port_u16() {
        Some(p) if p != default => format!("{host}:{p}"),
        _ => host.to_string(),
    })
}

/// `host`, `range` and the `x-amz-*` headers, sorted: (`SignedHeaders`, the canonical lines
/// without the last newline's blank line). Header names are lower-case already.
fn canonical_headers(headers: &http::HeaderMap) -> Result<(String, String), String> {
    let mut names: Vec<&str> =
        headers.keys().map(|k| k.as_str()).filter(|k| *k == "host" || *k == "range" || k.starts_with("x-amz-")).collect();
    names.sort_unstable();
    names.dedup();
    let mut lines = String::with_capacity(256);
    for name in &names {
        lines.push_str(name);
        lines.push(':');
        for (i, v) in headers.get_all(*name).iter().enumerate() {
            if i > 0 {
                lines.push(',');
            }
            lines.push_str(v.to_str().map_err(|_| format!("header {name} is not text"))?.trim());
        }
        lines.push('\n');
    }
    Ok((names.join(";"), lines))
}

/// The query with each name and value percent-decoded, encoded again as SigV4 wants
/// (unreserved characters kept, every other byte `%XX`), sorted by name then value.
fn canonical_query(query: &str) -> String {
    if query.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (aws_encode(&decode(k)), aws_encode(&decode(v)))
        })
        .collect();
    pairs.sort_unstable();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// `s` with its `%XX` escapes decoded (S3 queries do not use `+`); one with a malformed
/// escape, which `object_store` never builds, is taken as it is.
fn decode(s: &str) -> Vec<u8> {
    super::key::percent_decode(s.as_bytes()).unwrap_or_else(|| s.as_bytes().to_vec())
}

/// SigV4's URI encoding: `A-Z a-z 0-9 - _ . ~` kept, every other byte `%XX` (upper-case).
fn aws_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &c in bytes {
        if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(HEX_UPPER[(c >> 4) as usize] as char);
            out.push(HEX_UPPER[(c & 15) as usize] as char);
        }
    }
    out
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Lower-case hex of a SHA-256 digest or HMAC-SHA256 tag (the schema's own hex).
fn hex(bytes: &[u8]) -> Result<String, String> {
    let digest: [u8; 32] = bytes.try_into().map_err(|_| format!("a {}-byte digest where 32 were expected", bytes.len()))?;
    Ok(crate::schema::Sha256(digest).to_string())
}

/// The `HttpService` the stores' clients send through: signs, then sends with `inner`.
#[derive(Debug)]
pub(super) struct Signing {
    pub(super) inner: HttpClient,
    pub(super) signer: Signer,
}

#[async_trait]
impl HttpService for Signing {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.signer
            .sign(&mut req, crate::clock::unix_now())
            .map_err(|e| HttpError::new(object_store::client::HttpErrorKind::Request, SignError(e)))?;
        self.inner.execute(req).await
    }
}

/// A request that could not be signed (an unsigned one is never sent).
#[derive(Debug)]
struct SignError(String);

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot sign the request: {}", self.0)
    }
}

impl std::error::Error for SignError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's own example ("GET Object" in the Signature Version 4 documentation for S3,
    /// `examplebucket`, a `Range` header): the same signature, byte for byte.
    #[test]
    fn signs_the_aws_documentation_example() {
        let s = Signer::new("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1");
        let example = || -> HttpRequest {
            http::Request::builder()
                .method("GET")
                .uri("https://examplebucket.s3.amazonaws.com/test.txt")
                .header("range", "bytes=0-9")
                .body(object_store::client::HttpRequestBody::empty())
                .unwrap()
        };
        for _ in 0..2 {
            // The second time with the day's key from the cache.
            let mut req = example();
            s.sign(&mut req, 1_369_353_600).unwrap(); // 2013-05-24T00:00:00Z
            assert_eq!(
                req.headers()["authorization"],
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
                 Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
            );
            assert_eq!(req.headers()["x-amz-date"], "20130524T000000Z");
            assert_eq!(req.headers()["host"], "examplebucket.s3.amazonaws.com");
        }
        // Another day, another key.
        let mut req = example();
        s.sign(&mut req, 1_369_353_600 + 86_400).unwrap();
        assert!(req.headers()["authorization"].to_str().unwrap().contains("/20130525/"));
    }

    #[test]
    fn canonical_parts_follow_sigv4() {
        assert_eq!(canonical_query("versionId=a%2Bb&acl&prefix=x y"), "acl=&prefix=x%20y&versionId=a%2Bb");
        assert_eq!(canonical_query(""), "");
        assert_eq!(host_of(&"http://127.0.0.1:9000/b/k".parse().unwrap()).unwrap(), "127.0.0.1:9000");
        assert_eq!(host_of(&"https://s3.example:443/b/k".parse().unwrap()).unwrap(), "s3.example");
        assert_eq!(host_of(&"http://s3.example:80/b".parse().unwrap()).unwrap(), "s3.example");
        assert_eq!(hex(&[0xab; 32]).unwrap(), "ab".repeat(32));
        assert!(hex(&[0, 15, 255]).is_err(), "only 32-byte digests");
        assert_eq!(aws_encode("a/b~c d".as_bytes()), "a%2Fb~c%20d");
    }
}
