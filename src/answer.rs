//! Every answer the edge makes itself, as a value.
//!
//! Modules decide; they never write. Access checks, routing, the static-file server,
//! the ACME responder and the rescue of a failed exchange each return an [`Answer`],
//! and one writer (`crate::proxy::rescue`) turns it into a response: the branded page
//! or JSON error of its code, a redirect, a password form, a key authorization or a
//! file. So every edge answer carries the same headers (`X-Request-Id`, `no-store`,
//! `nosniff`, the page CSP, `X-Robots-Tag` on previews) and is counted and logged the
//! same way, whichever module decided it.

use crate::codes::ErrorCode;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use std::path::Path;
use std::sync::Arc;

/// Per-response details a page may mention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detail {
    /// The sandbox port a preview tried to reach.
    pub port: Option<u16>,
    /// True for deployments (wording: "the app" instead of "the sandbox").
    pub deployment: bool,
}

/// `Set-Cookie` lines to send with an answer.
pub type Cookies = Vec<String>;

/// An answer the edge makes itself.
#[derive(Debug)]
pub enum Answer {
    /// The page (HTML clients) or JSON error of `code`.
    Error { code: ErrorCode, detail: Detail, cookies: Cookies },
    /// The share-password form (HTML clients; `wrong` after a wrong password), or the
    /// JSON error `share_password_required` (others). Answered 401.
    PasswordForm { detail: Detail, next: String, wrong: bool, cookies: Cookies },
    /// A redirect without a body: 303 after a token or a password, 308 to HTTPS.
    Redirect { status: u16, location: Vec<u8>, cookies: Cookies },
    /// An ACME HTTP-01 key authorization (`text/plain`, 200).
    Challenge(Bytes),
    /// A static release file, or its 304, 206 or 416.
    File(FilePlan),
    /// 405 with `Allow`.
    MethodNotAllowed { allow: &'static str },
    /// A malformed request: a bare status, as pingora would answer it.
    Bare(u16),
}

impl Answer {
    /// The page or JSON error of `code`.
    pub fn error(code: ErrorCode, detail: Detail) -> Answer {
        Answer::Error { code, detail, cookies: Vec::new() }
    }

    /// A `303 See Other` to `location` (a path on this host) setting `cookies`.
    pub fn see_other(location: Vec<u8>, cookies: Cookies) -> Answer {
        Answer::Redirect { status: 303, location, cookies }
    }
}

impl From<ErrorCode> for Answer {
    fn from(code: ErrorCode) -> Answer {
        Answer::error(code, Detail::default())
    }
}

/// A response decided for a static file request (`crate::releases::serve::plan`).
#[derive(Debug)]
pub struct FilePlan {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Body,
}

/// The body of a [`FilePlan`].
#[derive(Debug, PartialEq, Eq)]
pub enum Body {
    None,
    Memory(Bytes),
    /// `len` bytes of `path` from `offset`. `copy`: the same bytes, when the file is kept
    /// in memory. Sent by the kernel from the file where the connection allows it (see
    /// `proxy::rescue`; from `open`, the file opened once, if it is kept open), else
    /// written from `copy` or streamed from disk.
    File {
        path: Arc<Path>,
        open: Option<OpenFile>,
        offset: u64,
        len: u64,
        copy: Option<Bytes>,
    },
}

/// A file opened once and shared by every response that sends from it; equal to another
/// when it is the same open file.
#[derive(Debug, Clone)]
pub struct OpenFile(pub Arc<std::fs::File>);

impl PartialEq for OpenFile {
    fn eq(&self, other: &OpenFile) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OpenFile {}

impl Body {
    /// The number of bytes the body holds (what `Content-Length` announces).
    pub fn len(&self) -> u64 {
        match self {
            Body::None => 0,
            Body::Memory(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    /// Whether there are no bytes to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
