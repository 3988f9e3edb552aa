//! What one request carries from phase to phase: the table it routes on, its id, where
//! it goes, whose usage it counts, and what an edge answer needs to be branded.

use crate::metrics::RouteKind;
use crate::pages::Pages;
use crate::releases::serve::Release;
use crate::routing::instance::InFlight;
use crate::routing::RouteTable;
use crate::usage::UsageCell;
use http::header::HeaderValue;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where a request is going.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Sandbox {
        addr: SocketAddr,
    },
    Deployment {
        index: u32,
        addr: SocketAddr,
    },
    /// The store behind the S3 endpoint (`[storage] endpoint`, resolved at load).
    Storage {
        addr: SocketAddr,
    },
}

impl Target {
    /// The upstream address.
    pub fn addr(self) -> SocketAddr {
        match self {
            Target::Sandbox { addr } | Target::Deployment { addr, .. } | Target::Storage { addr } => addr,
        }
    }
}

/// Per-request state shared by the phases.
pub struct RequestCtx {
    pub start: Instant,
    /// The one table this request routes on.
    pub table: Option<Arc<RouteTable>>,
    /// Shared (reference-counted) by the upstream request and the response.
    pub request_id: HeaderValue,
    pub kind: RouteKind,
    pub target: Option<Target>,
    /// Branding index of the table's pages for an edge answer.
    pub branding: u32,
    /// A preview host (`X-Robots-Tag: noindex` on every response).
    pub preview: bool,
    pub port: Option<u16>,
    pub retries: u8,
    /// Status of an edge-generated answer (for logging).
    pub edge_status: Option<u16>,
    /// Usage counters of the workspace, deployment, sandbox and bucket this request is for.
    pub usage: [Option<Arc<UsageCell>>; 4],
    /// What a private preview was opened with (a share, an `mp_` token's `exp`),
    /// watched while the exchange lives.
    pub watch: Option<CredentialWatch>,
    /// The request target to forward instead of the client's: a WebSocket upgrade
    /// authorised by `?token=`, without the token.
    pub upstream_target: Option<Vec<u8>>,
    /// The request came over TLS.
    pub tls: bool,
    /// The instance this request is using (outstanding-request count).
    pub instance: Option<InFlight>,
    /// `[storage]` as this request found it (the S3 endpoint's peer).
    pub storage: Option<Arc<crate::proxy::StorageFront>>,
    /// The static releases a file answer may stream from (the active one, and the
    /// previous one under skew protection): held until the request ends, so the cache
    /// never evicts them mid-body.
    pub releases: [Option<Arc<Release>>; 2],
}

impl RequestCtx {
    /// The context of a request that has not been looked at yet.
    pub fn new() -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            table: None,
            request_id: HeaderValue::from_static(""),
            kind: RouteKind::Edge,
            target: None,
            branding: Pages::PLATFORM,
            preview: false,
            port: None,
            retries: 0,
            edge_status: None,
            usage: [None, None, None, None],
            watch: None,
            upstream_target: None,
            tls: false,
            instance: None,
            storage: None,
            releases: [None, None],
        }
    }

    /// The request id as text.
    pub fn request_id(&self) -> &str {
        request_id_str(&self.request_id)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}

/// What ends a live exchange of a private preview: the share it was opened with
/// (rechecked by [`crate::access::until_revoked`]), or the `exp` of its `mp_` token.
pub struct CredentialWatch {
    pub watch: crate::access::Watch,
    pub sandbox: Box<str>,
    pub port: u16,
}

/// The request id as text (always ASCII: validated or generated).
pub fn request_id_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

/// `X-Request-Id` a client may set: 1 to 128 of `A-Z a-z 0-9 . _ -`.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Generates request ids: 32 hex characters, unpredictable across processes (keyed
/// SipHash of a counter with per-process random keys), unique within one.
pub struct RequestIds {
    key: std::collections::hash_map::RandomState,
    /// XORed into the counter for the id's low half: a random word of the process.
    low_key: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

impl RequestIds {
    pub fn new() -> RequestIds {
        let low = std::collections::hash_map::RandomState::new();
        RequestIds { key: Default::default(), low_key: low.hash_one(0u64), counter: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = self.key.hash_one(n);
        // The low half is the counter itself mixed with a key, so ids never repeat.
        let b = n ^ self.low_key;
        let mut out = [0u8; 32];
        for (i, byte) in a.to_be_bytes().iter().chain(b.to_be_bytes().iter()).enumerate() {
            out[2 * i] = HEX[(byte >> 4) as usize];
            out[2 * i + 1] = HEX[(byte & 15) as usize];
        }
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_x.y"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(valid_request_id(&[b'a'; 128]));
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(valid_request_id(a.as_bytes()));
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
