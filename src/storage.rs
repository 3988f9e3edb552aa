//! Public storage objects (CONTRACT §12): `GET`/`HEAD` of one object of a project's
//! bucket in the platform's S3-compatible store, answered when the object is public.
//!
//! Data flow: start-up builds one [`Storage`] from the resolved `[storage]` settings
//! ([`Storage::new`]: checks the endpoint and builds one HTTP client, no network). The
//! proxy maps a request to a store bucket (routing state) and a key ([`key_of`]), and
//! calls [`Storage::object`], which returns an [`ObjectPlan`] — status, headers,
//! announced length and, for a GET with bytes, an [`ObjectBody`] — or a
//! [`StorageError`] for the one writer to turn into `object_not_found` (404),
//! `storage_unavailable` (502) or `upstream_timeout` (504). The writer sends the
//! headers, then [`stream_object`] the body.
//!
//! Invariants:
//! - **Publicity comes with the bytes.** An object is public when its bucket is, or
//!   it carries the metadata `miosa-public: true`; that is decided on the same GET or
//!   HEAD response that brings the body (its `Attributes`), so no object can change
//!   between the check and the bytes sent. A private object is [`StorageError::NotFound`],
//!   exactly like a missing one, and its stream is dropped unread.
//! - **Conditionals are decided by the edge, on a HEAD.** A request with
//!   `If-None-Match` or `If-Modified-Since` first HEADs the object (one request, no
//!   body, the store connection stays reusable), decides publicity, then the condition:
//!   a 304 carries the object's validators. Only when the client's copy is stale does a
//!   GET follow (two requests then, the rare case). Passing the condition to the store
//!   instead would save that request, but the store's 304 carries neither the metadata
//!   that decides publicity nor the headers a 304 must repeat; evaluating it on the
//!   GET's metadata would drop a started body on every revalidation, closing a pooled
//!   store connection each time — the common case with `max-age=60`.
//! - **Ranges go to the store.** One `bytes=` range becomes a ranged GET (206). When the
//!   store refuses it (416, or anything but a 404), one HEAD tells an unsatisfiable
//!   range of a public object (416 `bytes */size`) from a missing or private object
//!   (404); a range that fits gets the whole object (200), so a store that ignores
//!   ranges still serves. `If-Range` is compared on the ranged GET's own metadata; a
//!   stale one drops that body and the whole object is fetched.
//! - **No total timeout.** A 1 GiB body to a slow client may take an hour. The store
//!   must answer the head within `first_byte_timeout` and each chunk within
//!   `idle_timeout`; `object_store` retries once at most (the client is waiting).
//! - **One client.** Every bucket's `AmazonS3` (cached, at most [`MAX_BUCKETS`]) shares
//!   one HTTP client through [`SharedClient`], so connections pool across buckets. The
//!   clients skip `object_store`'s signing: that one client signs (`sign.rs`, the day's
//!   key kept) and sends on hyper's pooled client (`client.rs`), which together cut the
//!   instructions per small object by 43% (benches/load/RESULTS.md, "Storage").
//! - Nothing the store sends can panic the edge; no error message or `Debug` output
//!   holds the key id or secret.

mod body;
mod client;
pub mod endpoint;
mod key;
mod plan;
mod sign;
#[cfg(test)]
mod tests;

pub use body::{stream_object, ObjectBody};
pub use endpoint::Endpoint;
pub use key::key_of;
pub use plan::{scriptable, ByteRange, DEFAULT_CACHE_CONTROL, PUBLIC_METADATA};

use dashmap::DashMap;
use http::header::{HeaderName, HeaderValue};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::{ClientOptions, GetOptions, GetResult, ObjectMeta, ObjectStore, RetryConfig};
use pingora::http::RequestHeader;
use plan::Ask;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The most store buckets whose clients are kept; the cache is cleared when full (a
/// client is cheap to rebuild: no network).
pub const MAX_BUCKETS: usize = 4096;

/// The longest wait for a TCP (and TLS) connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest error message kept from the store (it may quote the store's answer).
const MAX_MESSAGE: usize = 512;

/// Resolved `[storage]` settings.
#[derive(Clone)]
pub struct StorageSettings {
    /// The store's endpoint, `http(s)://host[:port]`, addressed path-style
    /// (`<endpoint>/<bucket>/<key>`).
    pub endpoint: String,
    /// The signing region (e.g. `us-east-1`).
    pub region: String,
    /// The access key id.
    pub key_id: String,
    /// The secret access key.
    pub key_secret: String,
    /// The store must answer a request's head within this.
    pub first_byte_timeout: Duration,
    /// The longest wait for one chunk of a body.
    pub idle_timeout: Duration,
}

impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSettings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Why an object cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Missing or private: the two are indistinguishable (404 `object_not_found`).
    #[error("object not found")]
    NotFound,
    /// The store refused, failed, or answered something unusable (502
    /// `storage_unavailable`); the message names the cause, never a secret.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer (or send the next chunk) in time (504
    /// `upstream_timeout`).
    #[error("the store did not answer in time")]
    Timeout,
}

/// The answer to a storage request, for the one writer.
///
/// The writer sends `status` with `headers`, then `Content-Length: n` when
/// `content_length` is `Some(n)` (for a HEAD, the length a GET would send; `None` on a
/// 304), then [`stream_object`] with `body` when it is `Some` (never for a HEAD, a 304,
/// a 416 or an empty object: those end with the header).
#[derive(Debug)]
pub struct ObjectPlan {
    /// 200, 206, 304 or 416.
    pub status: u16,
    /// Every header but `Content-Length`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What `Content-Length` announces; `None` for a 304.
    pub content_length: Option<u64>,
    /// The bytes to send.
    pub body: Option<ObjectBody>,
}

/// Replaces the credentials in error messages (a store's error body may quote the key
/// id; nothing should ever quote the secret, but nothing is trusted to).
#[derive(Default)]
pub(crate) struct Redactor {
    secrets: [String; 2],
}

impl Redactor {
    /// `e` and its causes as one message, without secrets, at most [`MAX_MESSAGE`] bytes.
    fn message(&self, e: &dyn std::error::Error) -> String {
        let mut text = crate::releases::store::chain(e);
        for s in self.secrets.iter().filter(|s| !s.is_empty()) {
            text = text.replace(s.as_str(), "<redacted>");
        }
        if text.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    }
}

/// Hands every bucket's client the one HTTP client, so connections pool across
/// buckets (`object_store` would build a client, and a pool, per bucket).
#[derive(Debug)]
struct SharedClient(HttpClient);

impl HttpConnector for SharedClient {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(self.0.clone())
    }
}

/// Public objects of the platform's store.
pub struct Storage {
    endpoint: String,
    region: String,
    allow_http: bool,
    http: HttpClient,
    retry: RetryConfig,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    redactor: Arc<Redactor>,
    stores: DashMap<Box<str>, AmazonS3, ahash::RandomState>,
}

impl fmt::Debug for Storage {
    // The clients' own Debug would print the credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("buckets", &self.stores.len())
            .finish_non_exhaustive()
    }
}

/// A store bucket name safe in a path-style URL: 1 to 255 of `A-Z a-z 0-9 . - _`,
/// starting with a letter or digit (so never `.` or `..`).
fn check_bucket(bucket: &str) -> Result<(), StorageError> {
    let b = bucket.as_bytes();
    let ok =
        (1..=255).contains(&b.len()) && b[0].is_ascii_alphanumeric() && b.iter().all(|c| c.is_ascii_alphanumeric() || b".-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Unavailable(format!("bad store bucket name {bucket:?}")))
    }
}

impl Storage {
    /// Checks `settings` (endpoint URL, non-empty region and credentials, non-zero
    /// timeouts) and builds the one HTTP client; no network.
    pub fn new(settings: StorageSettings) -> Result<Storage, String> {
        let ep = Endpoint::parse(&settings.endpoint).map_err(|e| format!("storage endpoint: {e}"))?;
        let endpoint = format!("{}://{}", if ep.tls { "https" } else { "http" }, ep.authority());
        if settings.region.trim().is_empty() {
            return Err("storage region is empty".into());
        }
        if settings.key_id.is_empty() || settings.key_secret.is_empty() {
            return Err("storage key id and key secret must both be set".into());
        }
        if settings.first_byte_timeout.is_zero() || settings.idle_timeout.is_zero() {
            return Err("storage timeouts must be longer than zero".into());
        }
        let allow_http = !ep.tls;
        // Requests are signed in the transport, with the day's signing key kept (sign.rs),
        // and sent on hyper's client (client.rs).
        let transport = HttpClient::new(client::HyperService::new(settings.first_byte_timeout.min(CONNECT_TIMEOUT), ep.tls)?);
        let signer = sign::Signer::new(&settings.key_id, &settings.key_secret, &settings.region);
        let http = HttpClient::new(sign::Signing { inner: transport, signer });
        // One retry of a refused connection or a 5xx, within the time the client waits.
        let retry = RetryConfig { max_retries: 1, retry_timeout: settings.first_byte_timeout, ..RetryConfig::default() };
        let redactor = Arc::new(Redactor { secrets: [settings.key_secret.clone(), settings.key_id.clone()] });
        Ok(Storage {
            endpoint,
            region: settings.region,
            allow_http,
            http,
            retry,
            first_byte_timeout: settings.first_byte_timeout,
            idle_timeout: settings.idle_timeout,
            redactor,
            stores: DashMap::with_hasher(ahash::RandomState::new()),
        })
    }

    /// The client of store bucket `bucket`, built once (no network).
    fn store(&self, bucket: &str) -> Result<AmazonS3, StorageError> {
        if let Some(s) = self.stores.get(bucket) {
            return Ok(s.clone());
        }
        check_bucket(bucket)?;
        let store = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(self.allow_http)
            .with_region(&self.region)
            // Signed by the shared client's transport instead (storage/sign.rs).
            .with_skip_signature(true)
            .with_bucket_name(bucket)
            .with_retry(self.retry.clone())
            .with_http_connector(SharedClient(self.http.clone()))
            .build()
            .map_err(|e| {
                StorageError::Unavailable(format!("cannot set up the client of bucket {bucket}: {}", self.redactor.message(&e)))
            })?;
        if self.stores.len() >= MAX_BUCKETS {
            self.stores.clear();
        }
        self.stores.insert(bucket.into(), store.clone());
        Ok(store)
    }

    /// GET or HEAD of object `key` (from [`key_of`]) of store bucket `bucket` for
    /// `req`, `public_bucket` when the bucket makes every object public. See the module
    /// head for how conditionals and ranges are decided. Any method but `HEAD` is
    /// served as a `GET`: the caller answers other methods 405 before asking.
    pub async fn object(&self, bucket: &str, public_bucket: bool, key: &str, req: &RequestHeader) -> Result<ObjectPlan, StorageError> {
        let store = self.store(bucket)?;
        // Anything `key_of` returns parses to itself; anything else names no object.
        let path = object_store::path::Path::parse(key).ok().filter(|p| p.as_ref() == key && !key.is_empty());
        let path = path.ok_or(StorageError::NotFound)?;
        let fetch = Fetch { storage: self, store: &store, path: &path, public_bucket };
        let ask = Ask::of(req);
        if ask.is_conditional() || ask.head {
            let found = fetch.get(true, None).await.map_err(|f| f.into_error(&self.redactor))?;
            if ask.not_modified(&found.meta) {
                return Ok(found.not_modified());
            }
            if ask.head {
                return Ok(found.into_plan(true, false, self));
            }
        }
        let Some(range) = ask.range else { return fetch.whole().await };
        match fetch.get(false, Some(range)).await {
            Ok(found) if ask.if_range_holds(&found.meta) => Ok(found.into_plan(false, true, self)),
            Ok(stale) => {
                // Release its connection before asking for the whole object.
                drop(stale);
                fetch.whole().await
            }
            Err(Failure::Store(e)) if !matches!(e, object_store::Error::NotFound { .. }) => fetch.refused_range(&ask, range).await,
            Err(f) => Err(f.into_error(&self.redactor)),
        }
    }
}

/// Why one request to the store gave no usable object.
enum Failure {
    /// The object exists but is not public.
    Private,
    /// The store did not answer the head within `first_byte_timeout`.
    TimedOut,
    /// The store's error (including its 404).
    Store(object_store::Error),
}

impl Failure {
    fn into_error(self, redactor: &Redactor) -> StorageError {
        match self {
            Failure::Private | Failure::Store(object_store::Error::NotFound { .. }) => StorageError::NotFound,
            Failure::TimedOut => StorageError::Timeout,
            Failure::Store(e) => StorageError::Unavailable(redactor.message(&e)),
        }
    }
}

/// One object's requests.
struct Fetch<'a> {
    storage: &'a Storage,
    store: &'a AmazonS3,
    path: &'a object_store::path::Path,
    public_bucket: bool,
}

impl Fetch<'_> {
    /// One GET (or HEAD) within `first_byte_timeout`; a private object is
    /// [`Failure::Private`], its stream dropped.
    async fn get(&self, head: bool, range: Option<ByteRange>) -> Result<Found, Failure> {
        let options = GetOptions { head, range: range.map(ByteRange::to_get_range), ..GetOptions::default() };
        let got = tokio::time::timeout(self.storage.first_byte_timeout, self.store.get_opts(self.path, options)).await;
        let got = got.map_err(|_| Failure::TimedOut)?.map_err(Failure::Store)?;
        if !plan::is_public(self.public_bucket, &got.attributes) {
            return Err(Failure::Private);
        }
        Ok(Found::from(got))
    }

    /// The whole object (200).
    async fn whole(&self) -> Result<ObjectPlan, StorageError> {
        match self.get(false, None).await {
            Ok(found) => Ok(found.into_plan(false, false, self.storage)),
            Err(f) => Err(f.into_error(&self.storage.redactor)),
        }
    }

    /// After the store refused `range` (416, or any failure but a 404): one HEAD
    /// decides between 404 (missing or private), 416 (public, and the range misses
    /// it) and the whole object (a stale `If-Range`, or a range that fits: the store
    /// failed or ignored it, and a 200 is always a valid answer to a `Range`; a store
    /// that is really failing fails that GET too).
    async fn refused_range(&self, ask: &Ask, range: ByteRange) -> Result<ObjectPlan, StorageError> {
        let found = self.get(true, None).await.map_err(|f| f.into_error(&self.storage.redactor))?;
        if !ask.if_range_holds(&found.meta) || range.satisfiable(found.meta.size) {
            return self.whole().await;
        }
        Ok(ObjectPlan { status: 416, headers: plan::unsatisfiable_headers(found.meta.size), content_length: Some(0), body: None })
    }
}

/// A public object's answer from the store: metadata, attributes, the byte range the
/// body holds, and the body.
struct Found {
    meta: ObjectMeta,
    attributes: object_store::Attributes,
    range: std::ops::Range<u64>,
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
}

impl From<GetResult> for Found {
    fn from(mut got: GetResult) -> Found {
        let meta = got.meta.clone();
        let attributes = std::mem::take(&mut got.attributes);
        let range = got.range.clone();
        Found { meta, attributes, range, stream: got.into_stream() }
    }
}

impl Found {
    /// 304 with the validators; the (empty) stream is dropped.
    fn not_modified(self) -> ObjectPlan {
        ObjectPlan { status: 304, headers: plan::not_modified_headers(&self.meta, &self.attributes), content_length: None, body: None }
    }

    /// 200 (or 206 when `ranged`) with the object's headers; a body unless `head` or empty.
    fn into_plan(self, head: bool, ranged: bool, storage: &Storage) -> ObjectPlan {
        let mut headers = plan::object_headers(&self.meta, &self.attributes);
        let len = self.range.end.saturating_sub(self.range.start);
        let mut status = 200;
        if ranged {
            if let Some(v) = plan::content_range(&self.range, self.meta.size) {
                headers.push((http::header::CONTENT_RANGE, v));
                status = 206;
            }
        }
        let body = (!head && len > 0).then(|| ObjectBody::new(self.stream, len, storage.idle_timeout, Arc::clone(&storage.redactor)));
        ObjectPlan { status, headers, content_length: Some(len), body }
    }
}
