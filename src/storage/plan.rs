//! The pure half of serving an object: what a request asks beyond its key (one byte
//! range, validators) and the headers of each answer, from the object's metadata.
//! No I/O here, so every rule is unit-tested without a store.
//!
//! Header conventions follow `crate::releases::serve` (static files): `Accept-Ranges:
//! bytes`, `Content-Range` on 206 and 416, `ETag`/`Cache-Control` on 304. Values the
//! store sends that are not valid header values are dropped, never a panic.

use http::header::{self, HeaderName, HeaderValue};
use object_store::{Attribute, Attributes, GetRange, ObjectMeta};
use pingora::http::RequestHeader;
use std::borrow::Cow;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The user metadata that makes one object of a private bucket public: what the
/// platform sets (`x-amz-meta-miosa-public: true`) for an object uploaded as public.
pub const PUBLIC_METADATA: &str = "miosa-public";

/// `Cache-Control` of an object that sets none (CONTRACT §12).
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=60";

/// What a header list is.
pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// One byte range as asked: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `a` to `b` inclusive (`a <= b`).
    FromTo(u64, u64),
    /// Bytes from `a` to the end.
    From(u64),
    /// The last `n` bytes.
    Last(u64),
}

impl ByteRange {
    /// The same range for `object_store` (which checks the store's `Content-Range`
    /// against it, clamped to the object's size).
    pub fn to_get_range(self) -> GetRange {
        match self {
            ByteRange::FromTo(a, b) => match b.checked_add(1) {
                Some(end) => GetRange::Bounded(a..end),
                None => GetRange::Offset(a),
            },
            ByteRange::From(a) => GetRange::Offset(a),
            ByteRange::Last(n) => GetRange::Suffix(n),
        }
    }

    /// Whether the range selects at least one byte of an object of `size` bytes
    /// (RFC 9110 §14.1.1).
    pub fn satisfiable(self, size: u64) -> bool {
        match self {
            ByteRange::FromTo(a, _) | ByteRange::From(a) => a < size,
            ByteRange::Last(n) => n > 0 && size > 0,
        }
    }
}

/// What a request asks beyond its key: method, range and validators, parsed once.
#[derive(Debug, Default)]
pub struct Ask {
    /// A `HEAD` (no body; `Range` is ignored, as RFC 9110 defines ranges for GET only).
    pub head: bool,
    /// One satisfiable-looking range; `None` for no `Range`, several ranges, or a
    /// malformed one (all served whole, as RFC 9110 allows).
    pub range: Option<ByteRange>,
    /// `If-Range`, when present.
    pub if_range: Option<HeaderValue>,
    /// Every `If-None-Match` line.
    pub if_none_match: Vec<HeaderValue>,
    /// `If-Modified-Since` in Unix seconds; `None` when absent or not an HTTP date.
    pub if_modified_since: Option<u64>,
}

impl Ask {
    /// Reads `req`'s method, `Range`, `If-Range`, `If-None-Match`, `If-Modified-Since`.
    pub fn of(req: &RequestHeader) -> Ask {
        let head = req.method == http::Method::HEAD;
        let since = req.headers.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok());
        Ask {
            head,
            range: if head { None } else { parse_range(req) },
            if_range: req.headers.get(header::IF_RANGE).cloned(),
            if_none_match: req.headers.get_all(header::IF_NONE_MATCH).iter().cloned().collect(),
            if_modified_since: since.and_then(|s| httpdate::parse_http_date(s).ok()).and_then(unix_secs),
        }
    }

    /// Whether the request carries a validator that may make it a 304.
    pub fn is_conditional(&self) -> bool {
        !self.if_none_match.is_empty() || self.if_modified_since.is_some()
    }

    /// Whether the client's copy is current (304): `If-None-Match` (weak comparison,
    /// `*` matches any existing object) when present, else `If-Modified-Since` at
    /// second precision.
    pub fn not_modified(&self, meta: &ObjectMeta) -> bool {
        if !self.if_none_match.is_empty() {
            return self.if_none_match.iter().any(|list| etag_listed(list.as_bytes(), meta.e_tag.as_deref()));
        }
        match (self.if_modified_since, last_modified_secs(meta)) {
            (Some(since), Some(modified)) => modified <= since,
            _ => false,
        }
    }

    /// Whether a range may be served for `meta` (`If-Range` absent, or naming this
    /// version: the same strong ETag, or exactly its `Last-Modified`); otherwise the
    /// whole object is sent.
    pub fn if_range_holds(&self, meta: &ObjectMeta) -> bool {
        let Some(v) = &self.if_range else { return true };
        let v = v.as_bytes().trim_ascii();
        if v.starts_with(b"\"") {
            let strong = meta.e_tag.as_deref().filter(|t| !t.starts_with("W/"));
            return strong.is_some_and(|t| t.as_bytes() == v);
        }
        if v.starts_with(b"W/") {
            return false;
        }
        let date = std::str::from_utf8(v).ok().and_then(|s| httpdate::parse_http_date(s).ok()).and_then(unix_secs);
        date.is_some_and(|d| last_modified_secs(meta) == Some(d))
    }
}

/// The single range of `Range`, if it is one well-formed `bytes=` range.
fn parse_range(req: &RequestHeader) -> Option<ByteRange> {
    let mut lines = req.headers.get_all(header::RANGE).iter();
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let v = line.to_str().ok()?.trim();
    let unit = v.get(..6)?;
    if !unit.eq_ignore_ascii_case("bytes=") {
        return None;
    }
    let spec = &v[6..];
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (number(a), number(b)) {
        (Some(a), Some(b)) if a <= b => Some(ByteRange::FromTo(a, b)),
        (Some(a), None) if b.is_empty() => Some(ByteRange::From(a)),
        (None, Some(n)) if a.is_empty() => Some(ByteRange::Last(n)),
        _ => None,
    }
}

/// A non-empty run of ASCII digits that fits a u64.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether the `If-None-Match` value `list` names `etag` (weak comparison: `W/` is
/// ignored on both sides), or is `*`. A malformed list matches nothing past its error.
pub fn etag_listed(list: &[u8], etag: Option<&str>) -> bool {
    let list = list.trim_ascii();
    if list == b"*" {
        return true;
    }
    let Some(etag) = etag else { return false };
    let want = etag.strip_prefix("W/").unwrap_or(etag).as_bytes();
    let mut rest = list;
    loop {
        rest = rest.trim_ascii_start();
        while let Some(r) = rest.strip_prefix(b",") {
            rest = r.trim_ascii_start();
        }
        if rest.is_empty() {
            return false;
        }
        let tag = rest.strip_prefix(b"W/").unwrap_or(rest);
        // An entity tag is a quoted string with no `"` inside (it may hold commas).
        let Some(body) = tag.strip_prefix(b"\"") else { return false };
        let Some(end) = body.iter().position(|b| *b == b'"') else { return false };
        if &tag[..end + 2] == want {
            return true;
        }
        rest = &body[end + 1..];
    }
}

/// Unix seconds of `t`, `None` before 1970.
fn unix_secs(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// The object's `Last-Modified` in Unix seconds (HTTP dates have no finer precision);
/// `None` when the store sent none (`object_store` then says the epoch).
fn last_modified_secs(meta: &ObjectMeta) -> Option<u64> {
    u64::try_from(meta.last_modified.timestamp()).ok().filter(|s| *s > 0)
}

/// Whether an object is public: its bucket is, or it carries `miosa-public: true`
/// (ASCII case-insensitive).
pub fn is_public(public_bucket: bool, attributes: &Attributes) -> bool {
    public_bucket
        || attributes.get(&Attribute::Metadata(Cow::Borrowed(PUBLIC_METADATA))).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether a content type can run script when opened as a document: HTML, XHTML, SVG
/// or any XML (compared case-insensitively, parameters ignored). Those get
/// `Content-Security-Policy: sandbox`, so an upload never runs script on a storage
/// origin.
pub fn scriptable(content_type: &[u8]) -> bool {
    let essence = content_type.split(|b| *b == b';').next().unwrap_or_default().trim_ascii().to_ascii_lowercase();
    matches!(essence.as_slice(), b"text/html" | b"application/xhtml+xml" | b"image/svg+xml" | b"text/xml" | b"application/xml")
        || essence.ends_with(b"+xml")
}

/// The value of attribute `a`, when it is a valid header value.
fn attribute(attributes: &Attributes, a: &Attribute) -> Option<HeaderValue> {
    attributes.get(a).and_then(|v| HeaderValue::from_str(v).ok())
}

/// The validators and caching headers every 200, 206 and 304 carries: `ETag`,
/// `Last-Modified` (IMF-fixdate), `Cache-Control` (the object's own, else
/// [`DEFAULT_CACHE_CONTROL`]) and `X-Content-Type-Options: nosniff`.
fn validators(meta: &ObjectMeta, attributes: &Attributes, out: &mut Headers) {
    if let Some(etag) = meta.e_tag.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        out.push((header::ETAG, etag));
    }
    let modified = last_modified_secs(meta).map(|s| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(s)));
    if let Some(v) = modified.and_then(|d| HeaderValue::from_str(&d).ok()) {
        out.push((header::LAST_MODIFIED, v));
    }
    let cache = attribute(attributes, &Attribute::CacheControl).unwrap_or(HeaderValue::from_static(DEFAULT_CACHE_CONTROL));
    out.push((header::CACHE_CONTROL, cache));
    out.push((header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")));
}

/// The headers of a 200 or 206 (and their HEAD): the object's `Content-Type` (else
/// `application/octet-stream`), the validators, `Accept-Ranges`, the object's
/// `Content-Disposition`/`-Encoding`/`-Language`, and the CSP for scriptable types.
/// Never `Content-Length` (the writer announces `ObjectPlan::content_length`).
pub fn object_headers(meta: &ObjectMeta, attributes: &Attributes) -> Headers {
    let mut out = Vec::with_capacity(12);
    let content_type = attribute(attributes, &Attribute::ContentType).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    if scriptable(content_type.as_bytes()) {
        out.push((header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox")));
    }
    out.push((header::CONTENT_TYPE, content_type));
    validators(meta, attributes, &mut out);
    out.push((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
    let passed = [
        (Attribute::ContentDisposition, header::CONTENT_DISPOSITION),
        (Attribute::ContentEncoding, header::CONTENT_ENCODING),
        (Attribute::ContentLanguage, header::CONTENT_LANGUAGE),
    ];
    for (a, name) in passed {
        if let Some(v) = attribute(attributes, &a) {
            out.push((name, v));
        }
    }
    out
}

/// The headers of a 304: the validators only (no body, no type).
pub fn not_modified_headers(meta: &ObjectMeta, attributes: &Attributes) -> Headers {
    let mut out = Vec::with_capacity(4);
    validators(meta, attributes, &mut out);
    out
}

/// `Content-Range` of a 206: `bytes a-b/size` for the half-open `range`.
pub fn content_range(range: &Range<u64>, size: u64) -> Option<HeaderValue> {
    let last = range.end.checked_sub(1)?;
    HeaderValue::from_str(&format!("bytes {}-{last}/{size}", range.start)).ok()
}

/// The headers of a 416: `Content-Range: bytes */size`, `Accept-Ranges`, `nosniff`.
pub fn unsatisfiable_headers(size: u64) -> Headers {
    let mut out = Vec::with_capacity(3);
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        out.push((header::CONTENT_RANGE, v));
    }
    out.push((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
    out.push((header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")));
    out
}
