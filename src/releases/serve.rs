//! Serving an unpacked release: the file index and the per-request answer.
//!
//! [`Release::load`] walks an unpacked release once and indexes every file by its URL
//! path with everything a response needs precomputed: content type, strong `ETag`
//! (SHA-256 of the contents), `Cache-Control` (long and `immutable` for fingerprinted
//! asset names, revalidating otherwise), precompressed `.br`/`.gz` siblings, and the
//! bytes themselves for small files. [`plan`] turns a request into a [`Plan`] — status,
//! headers and a body that is either in memory or a byte range of a file on disk — as
//! a pure function, so every serving rule is unit-tested without a socket.
//!
//! Resolution of a path: the file itself; `dir/` → `dir/index.html`; `/about` →
//! `/about/index.html` or `/about.html`; with `spa`, an HTML request (`Accept` names
//! `text/html`) for anything else, outside `/.well-known/`, gets `/index.html`; a
//! fingerprinted asset missing here is looked up in the deployment's previous release
//! (skew protection, decided by the caller); then the release's `/404.html` with 404.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of small files one release may keep in memory; the rest streams from disk.
pub const MEMORY_BUDGET: u64 = 64 << 20;

/// Bodies from this size on are sent from their file by the kernel (sendfile) on plain
/// HTTP/1 connections even when a copy is kept in memory: below it, the two system calls
/// of opening and closing the file cost more than copying the bytes.
pub const SEND_FILE_MIN_BYTES: u64 = 16 << 10;

/// Open descriptors the releases in memory may keep, all together: the files the kernel
/// sends (kept in memory, at least [`SEND_FILE_MIN_BYTES`]) then cost no `open` and
/// `close` per request. Bounded so that a few large releases never take the descriptors
/// the edge needs for connections — at most an eighth of the process's limit on open
/// files ([`kept_open_budget`]); files beyond it are opened for each request.
pub const KEPT_OPEN_MAX: usize = 256;

static KEPT_OPEN: AtomicUsize = AtomicUsize::new(0);

/// The descriptors the releases may keep open under a limit of `nofile` open files.
pub fn kept_open_budget(nofile: u64) -> usize {
    (nofile / 8).min(KEPT_OPEN_MAX as u64) as usize
}

/// [`kept_open_budget`] of this process's soft limit, read once (after the server raised
/// it to the hard one at start).
pub(crate) fn kept_open_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| kept_open_budget(crate::files::open_files_limit().map_or(0, |(soft, _)| soft)))
}

/// Descriptors counted against [`KEPT_OPEN_MAX`] by one release (or one interrupted
/// [`Release::load`]), given back when it is dropped.
#[derive(Debug, Default)]
struct KeptOpen(usize);

impl KeptOpen {
    /// Whether one more may be kept (and counts it).
    fn reserve(&mut self) -> bool {
        let ok = KEPT_OPEN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < kept_open_limit()).then_some(n + 1)).is_ok();
        self.0 += usize::from(ok);
        ok
    }
}

impl Drop for KeptOpen {
    fn drop(&mut self) {
        KEPT_OPEN.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// Descriptors kept open by the releases in memory now (see [`KEPT_OPEN_MAX`]).
pub fn kept_open() -> usize {
    KEPT_OPEN.load(Ordering::Relaxed)
}

/// One stored representation of a file (identity, gzip or brotli).
#[derive(Debug)]
pub struct Representation {
    pub path: Arc<Path>,
    pub size: u64,
    pub etag: HeaderValue,
    /// The contents, for small files.
    pub body: Option<Bytes>,
    /// The file, open, for those the kernel sends (within [`KEPT_OPEN_MAX`]). A release's
    /// files never change (its directory is named by the archive's hash), so a descriptor
    /// opened once serves every request, and even outlives an eviction unharmed.
    pub open: Option<OpenFile>,
}

/// A file of the release.
#[derive(Debug)]
pub struct FileEntry {
    pub identity: Representation,
    pub gzip: Option<Representation>,
    pub brotli: Option<Representation>,
    pub content_type: HeaderValue,
    pub cache_control: HeaderValue,
    pub html: bool,
}

/// An unpacked, indexed release.
#[derive(Debug)]
pub struct Release {
    pub sha256: [u8; 32],
    pub root: PathBuf,
    files: HashMap<Box<str>, FileEntry, ahash::RandomState>,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Unix seconds of the last request served from it (for cache eviction).
    pub last_used: AtomicU64,
    /// Held for its `Drop`: gives the release's open descriptors back to the budget.
    _kept_open: KeptOpen,
}

impl Release {
    /// Indexes the unpacked release at `root` (blocking: reads every file once).
    pub fn load(sha256: [u8; 32], root: &Path, memory_file_bytes: u64) -> std::io::Result<Release> {
        let mut paths = Vec::new();
        walk(root, root, &mut paths)?;
        paths.sort();
        let mut reps: HashMap<String, Representation> = HashMap::new();
        let mut disk_bytes = 0u64;
        let mut memory = 0u64;
        let mut kept_open = KeptOpen::default();
        for (url, path) in paths {
            let mut file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            disk_bytes += size;
            let keep = size <= memory_file_bytes && memory + size <= MEMORY_BUDGET;
            let mut contents = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(&mut file, &mut contents)?;
            let open = (keep && size >= SEND_FILE_MIN_BYTES && kept_open.reserve()).then(|| OpenFile(Arc::new(file)));
            let d = ring::digest::digest(&ring::digest::SHA256, &contents);
            let tag: String = d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
            let etag = HeaderValue::from_str(&format!("\"{tag}\"")).map_err(std::io::Error::other)?;
            let body = keep.then(|| {
                memory += size;
                Bytes::from(contents)
            });
            reps.insert(url, Representation { path: path.into(), size, etag, body, open });
        }
        let mut files = HashMap::with_hasher(ahash::RandomState::new());
        let copy = |r: &Representation, suffix: &str| Representation {
            path: r.path.clone(),
            size: r.size,
            // `"hash"` → `"hash-gz"`: a precompressed variant has its own validator.
            etag: HeaderValue::from_bytes(&[&r.etag.as_bytes()[..r.etag.len() - 1], suffix.as_bytes(), b"\""].concat())
                .unwrap_or_else(|_| r.etag.clone()),
            body: r.body.clone(),
            open: r.open.clone(),
        };
        for (url, rep) in &reps {
            let ct = content_type(url);
            let cache_control = if fingerprinted(url) {
                HeaderValue::from_static("public, max-age=31536000, immutable")
            } else {
                HeaderValue::from_static("public, max-age=0, must-revalidate")
            };
            let entry = FileEntry {
                identity: copy(rep, ""),
                gzip: reps.get(&format!("{url}.gz")).map(|r| copy(r, "-gz")),
                brotli: reps.get(&format!("{url}.br")).map(|r| copy(r, "-br")),
                content_type: HeaderValue::from_static(ct),
                cache_control,
                html: ct.starts_with("text/html"),
            };
            files.insert(url.as_str().into(), entry);
        }
        Ok(Release { sha256, root: root.to_owned(), files, disk_bytes, last_used: AtomicU64::new(0), _kept_open: kept_open })
    }

    /// The file at a URL path (`/a/b.js`).
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.get(path)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the release has no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Marks the release used at `now` (Unix seconds).
    pub fn touch(&self, now: u64) {
        self.last_used.store(now, Ordering::Relaxed);
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        let path = e.path();
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path.strip_prefix(root).map_err(std::io::Error::other)?;
            let url = format!("/{}", rel.to_string_lossy());
            out.push((url, path));
        }
    }
    Ok(())
}

/// Content type by extension (charset on text types).
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" => "text/plain; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "br" => "application/octet-stream",
        _ => "application/octet-stream",
    }
}

/// Whether a file name carries a content hash (`app-3f9a1c.js`, `index.BxP3k9aZ.css`,
/// `main.3f9a1c2b.chunk.js`): a `-` or `.` separated part of at least 6 characters of
/// `[A-Za-z0-9_]` with at least one digit and one letter, before the extension.
pub fn fingerprinted(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some((stem, _ext)) = name.rsplit_once('.') else { return false };
    stem.split(['-', '.']).skip(1).any(|part| {
        part.len() >= 6
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && part.bytes().any(|b| b.is_ascii_digit())
            && part.bytes().any(|b| b.is_ascii_alphabetic())
    })
}

/// A response decided for a request, and where its body comes from (the edge's answer
/// types: the one writer sends them).
pub use crate::answer::{Body, FilePlan as Plan, OpenFile};

/// The outcome of resolving a path in a release.
pub enum Found<'r> {
    /// A file (and whether it is the SPA fallback or 404 page).
    File(&'r FileEntry, u16),
    /// Nothing, and the release has no `404.html`.
    Missing,
}

/// Percent-decodes a URL path; `None` for invalid encodings, NUL, or `..` segments.
/// Borrows when there is nothing to decode (the common case).
pub fn decode_path(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let ok = |s: &str| s.starts_with('/') && !s.contains('\0') && !s.contains('\\') && !s.split('/').any(|seg| seg == "..");
    if !raw.contains('%') {
        return ok(raw).then_some(std::borrow::Cow::Borrowed(raw));
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    ok(&s).then_some(std::borrow::Cow::Owned(s))
}

/// Resolves a decoded path in `release`; `previous` is the deployment's previous
/// release while skew protection applies.
pub fn resolve<'r>(release: &'r Release, previous: Option<&'r Release>, path: &str, wants_html: bool, spa: bool) -> Found<'r> {
    if let Some(f) = lookup(release, path) {
        return Found::File(f, 200);
    }
    if let Some(prev) = previous {
        if fingerprinted(path) {
            if let Some(f) = prev.file(path) {
                return Found::File(f, 200);
            }
        }
    }
    if spa && wants_html && !path.starts_with("/.well-known/") {
        if let Some(f) = release.file("/index.html") {
            return Found::File(f, 200);
        }
    }
    match release.file("/404.html") {
        Some(f) => Found::File(f, 404),
        None => Found::Missing,
    }
}

fn lookup<'r>(release: &'r Release, path: &str) -> Option<&'r FileEntry> {
    if path.ends_with('/') {
        return release.file(&format!("{path}index.html"));
    }
    release.file(path).or_else(|| release.file(&format!("{path}/index.html"))).or_else(|| {
        if path.contains('.') {
            None
        } else {
            release.file(&format!("{path}.html"))
        }
    })
}

fn accepts(req: &RequestHeader, coding: &str) -> bool {
    req.headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case(coding) && !q_zero
        })
    })
}

/// A byte range request: `Some(Ok((start, len)))` for one satisfiable range, `Some(Err)`
/// for an unsatisfiable one, `None` to serve the whole file (no Range, several ranges,
/// or a syntax we ignore, as RFC 9110 allows).
fn range(req: &RequestHeader, size: u64) -> Option<Result<(u64, u64), ()>> {
    let v = req.headers.get(header::RANGE)?.to_str().ok()?;
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| if s.bytes().all(|c| c.is_ascii_digit()) && !s.is_empty() { s.parse::<u64>().ok() } else { None };
    match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n = parse(b)?;
            if n == 0 || size == 0 {
                return Some(Err(()));
            }
            let n = n.min(size);
            Some(Ok((size - n, n)))
        }
        (false, _) => {
            let start = parse(a)?;
            let end = if b.is_empty() { size.saturating_sub(1) } else { parse(b)?.min(size.saturating_sub(1)) };
            if start >= size || (!b.is_empty() && parse(b)? < start) {
                return Some(Err(()));
            }
            Some(Ok((start, end - start + 1)))
        }
        (true, true) => None,
    }
}

fn etag_matches(list: &HeaderValue, etag: &HeaderValue) -> bool {
    let l = list.as_bytes();
    if l.trim_ascii() == b"*" {
        return true;
    }
    // Weak comparison, as If-None-Match requires.
    l.split(|b| *b == b',').any(|t| {
        let t = t.trim_ascii();
        let t = t.strip_prefix(b"W/").unwrap_or(t);
        t == etag.as_bytes()
    })
}

/// Plans the answer for `found` (HEAD and GET; other methods are refused earlier).
pub fn plan(req: &RequestHeader, found: &Found<'_>) -> Plan {
    let (f, status) = match found {
        Found::File(f, s) => (*f, *s),
        Found::Missing => return Plan { status: 404, headers: Vec::new(), body: Body::None },
    };
    let has_variants = f.gzip.is_some() || f.brotli.is_some();
    let (rep, encoding) = match (&f.brotli, &f.gzip) {
        (Some(br), _) if accepts(req, "br") => (br, Some("br")),
        (_, Some(gz)) if accepts(req, "gzip") => (gz, Some("gzip")),
        _ => (&f.identity, None),
    };
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(8);
    headers.push((header::CONTENT_TYPE, f.content_type.clone()));
    if status == 200 {
        headers.push((header::ETAG, rep.etag.clone()));
        headers.push((header::CACHE_CONTROL, if f.html { HeaderValue::from_static("no-cache") } else { f.cache_control.clone() }));
        headers.push((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
    } else {
        headers.push((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")));
    }
    if has_variants {
        headers.push((header::VARY, HeaderValue::from_static("Accept-Encoding")));
    }
    if let Some(e) = encoding {
        headers.push((header::CONTENT_ENCODING, HeaderValue::from_static(e)));
    }
    if status == 200 {
        if let Some(inm) = req.headers.get(header::IF_NONE_MATCH) {
            if etag_matches(inm, &rep.etag) {
                headers.retain(|(n, _)| *n != header::CONTENT_TYPE && *n != header::CONTENT_ENCODING);
                return Plan { status: 304, headers, body: Body::None };
            }
        }
    }
    let if_range_ok = req.headers.get(header::IF_RANGE).is_none_or(|v| v.as_bytes() == rep.etag.as_bytes());
    let mut status = status;
    let (offset, len) = match (status, if_range_ok).eq(&(200, true)).then(|| range(req, rep.size)).flatten() {
        Some(Ok((start, len))) => {
            status = 206;
            let cr = format!("bytes {start}-{}/{}", start + len - 1, rep.size);
            if let Ok(v) = HeaderValue::from_str(&cr) {
                headers.push((header::CONTENT_RANGE, v));
            }
            (start, len)
        }
        Some(Err(())) => {
            let cr = format!("bytes */{}", rep.size);
            headers.retain(|(n, _)| *n != header::CONTENT_ENCODING);
            if let Ok(v) = HeaderValue::from_str(&cr) {
                headers.push((header::CONTENT_RANGE, v));
            }
            return Plan { status: 416, headers, body: Body::None };
        }
        None => (0, rep.size),
    };
    let body = match &rep.body {
        // Large enough that the kernel sending it from the file beats copying it out of
        // memory (benches/load/RESULTS.md, "Issue 17"); the copy stays for connections
        // where it cannot (TLS, HTTP/2).
        Some(b) if len >= SEND_FILE_MIN_BYTES => {
            let copy = Some(b.slice(offset as usize..(offset + len) as usize));
            Body::File { path: rep.path.clone(), open: rep.open.clone(), offset, len, copy }
        }
        Some(b) => Body::Memory(b.slice(offset as usize..(offset + len) as usize)),
        None => Body::File { path: rep.path.clone(), open: None, offset, len, copy: None },
    };
    Plan { status, headers, body }
}
