//! Release stores: where `<sha256>.tar.gz` archives come from.
//!
//! `[static] store` names one store for the whole edge (CONTRACT §7):
//!
//! - a local directory (the default, `releases`, relative to the working directory):
//!   [`DirStore`] reads `<dir>/<name>`;
//! - an S3-compatible bucket, `s3://bucket/prefix`: [`S3Store`] reads the object
//!   `prefix/<name>` through `object_store` (reqwest, rustls on ring).
//!
//! Data flow: config parsing calls [`check_spec`] (syntax only: no environment, no
//! network). Startup calls [`open`], which reads the environment once
//! ([`S3Settings::from_env`]) and builds the client without touching the network, so a
//! missing bucket or half-set credentials stop the edge at startup, not at the first
//! deploy. The release cache then calls [`ReleaseStore::fetch`] off the proxy threads
//! to copy one archive into a new file, which it verifies (SHA-256) and unpacks.
//!
//! Invariants: a store never trusts the object's size. It refuses an object whose
//! announced length exceeds `max_bytes` before copying anything, and counts the bytes
//! while copying, so an object that grows or lies about its length still stops at
//! `max_bytes`. On any failure after `dest` was created, `dest` is removed. Only plain
//! file names are fetched (no `/`, `..`), so a name can never leave the store's
//! directory or prefix. No `Debug` output prints a secret.
//!
//! S3 settings, later ones winning: the standard `AWS_*` variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT`/`AWS_ENDPOINT_URL`, …, as `object_store` reads them), then the
//! platform's `STORAGE_ENDPOINT` (path-style requests; `http://` allowed),
//! `STORAGE_KEY_ID` + `STORAGE_KEY_SECRET` (both or neither; they replace any AWS session
//! token) and `STORAGE_BUCKET`, then the bucket written in the URL. So
//! `s3://bucket/prefix` always reads `bucket`, and `s3://` or `s3:///prefix` reads
//! `STORAGE_BUCKET` (or `AWS_BUCKET`). The region defaults to `us-east-1`.

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[cfg(test)]
mod tests;

/// Why an archive could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("release archive {0} not found in the store")]
    NotFound(String),
    #[error("release archive {name} is larger than {limit} bytes")]
    TooLarge { name: String, limit: u64 },
    #[error("cannot fetch release archive {name}: {message}")]
    Other { name: String, message: String },
}

/// A place archives are fetched from.
#[async_trait]
pub trait ReleaseStore: Send + Sync + std::fmt::Debug {
    /// Copies object `name` (e.g. `<sha256>.tar.gz`) into the new file `dest`, refusing
    /// more than `max_bytes`; returns its size.
    async fn fetch(&self, name: &str, dest: &Path, max_bytes: u64) -> Result<u64, StoreError>;
}

/// A parsed `[static] store` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// A local directory (relative paths are relative to the working directory).
    Dir(PathBuf),
    /// An S3-compatible bucket: `bucket` is `None` for `s3://` and `s3:///prefix` (the
    /// bucket then comes from `STORAGE_BUCKET` or `AWS_BUCKET`); `prefix` has no leading
    /// or trailing `/` and may be empty.
    S3 { bucket: Option<String>, prefix: String },
}

/// Parses a `[static] store` value: `s3://[bucket][/prefix]` or a directory path.
/// Syntax only: reads no environment and touches no network.
pub fn parse_spec(spec: &str) -> Result<StoreSpec, String> {
    if spec.is_empty() {
        return Err("empty: expected a directory or s3://bucket/prefix".into());
    }
    let lower = spec.get(..5).map(str::to_ascii_lowercase);
    if lower.as_deref() == Some("s3://") {
        return parse_s3(&spec[5..]);
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
            return Err(format!("unsupported store {scheme}://: expected a directory or s3://bucket/prefix"));
        }
    }
    if spec.get(..3).is_some_and(|s| s.eq_ignore_ascii_case("s3:")) {
        return Err("an S3 store is written s3://bucket/prefix".into());
    }
    if spec.contains('\0') {
        return Err("a directory name cannot contain NUL".into());
    }
    Ok(StoreSpec::Dir(PathBuf::from(spec)))
}

/// Checks a `[static] store` value's syntax (see [`parse_spec`]); the error names the
/// problem, for the caller to prefix with the key path.
pub fn check_spec(spec: &str) -> Result<(), String> {
    parse_spec(spec).map(|_| ())
}

/// `rest` is what follows `s3://`.
fn parse_s3(rest: &str) -> Result<StoreSpec, String> {
    if rest.contains(['?', '#']) {
        return Err("an s3:// store takes no query or fragment".into());
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket = if bucket.is_empty() {
        None
    } else {
        check_bucket(bucket)?;
        Some(bucket.to_owned())
    };
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        object_store::path::Path::parse(prefix).map_err(|e| format!("bad prefix {prefix:?}: {e}"))?;
        if prefix.chars().any(char::is_control) {
            return Err(format!("bad prefix {prefix:?}: control character"));
        }
    }
    Ok(StoreSpec::S3 { bucket, prefix: prefix.to_owned() })
}

/// S3 bucket naming rules (3–63 of `a-z 0-9 . - _`, alphanumeric at both ends), which
/// S3-compatible servers share; `_` is allowed for legacy buckets.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
    let ends = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bytes = bucket.as_bytes();
    if (3..=63).contains(&bytes.len()) && ok_chars && ends(bytes.first()) && ends(bytes.last()) {
        Ok(())
    } else {
        Err(format!("bad bucket name {bucket:?}: expected 3 to 63 of a-z, 0-9, '.', '-', '_', starting and ending with a letter or digit"))
    }
}

/// Opens the store `spec` names, reading the S3 variables from the environment (see
/// the module head for their precedence). Builds clients only: no network.
pub fn open(spec: &str) -> Result<Arc<dyn ReleaseStore>, String> {
    open_spec(&parse_spec(spec)?, &S3Settings::from_env())
}

/// Opens a parsed store with explicit S3 settings (tests use this; nothing here reads
/// the environment).
pub fn open_spec(spec: &StoreSpec, settings: &S3Settings) -> Result<Arc<dyn ReleaseStore>, String> {
    Ok(match spec {
        StoreSpec::Dir(root) => Arc::new(DirStore { root: root.clone() }),
        StoreSpec::S3 { bucket, prefix } => Arc::new(S3Store::from_parts(bucket.as_deref(), prefix, settings)?),
    })
}

/// Only a plain file name is fetched: it can never leave the directory or prefix.
fn check_name(name: &str) -> Result<(), StoreError> {
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']) && !name.chars().any(char::is_control);
    if plain {
        Ok(())
    } else {
        Err(StoreError::Other { name: name.to_owned(), message: "not a plain file name".into() })
    }
}

/// `dest` being written, at most `max` bytes; removed again unless [`Download::finish`]
/// succeeds.
struct Download<'a> {
    name: &'a str,
    dest: &'a Path,
    file: tokio::fs::File,
    written: u64,
    max: u64,
}

impl<'a> Download<'a> {
    async fn create(name: &'a str, dest: &'a Path, max: u64) -> Result<Download<'a>, StoreError> {
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| StoreError::Other { name: name.to_owned(), message: format!("cannot create {}: {e}", dest.display()) })?;
        Ok(Download { name, dest, file, written: 0, max })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.written = self.written.saturating_add(chunk.len() as u64);
        if self.written > self.max {
            return Err(StoreError::TooLarge { name: self.name.to_owned(), limit: self.max });
        }
        self.file.write_all(chunk).await.map_err(|e| self.io_error(e))
    }

    /// Completes the file after `copied` (the copy's outcome), or removes it.
    async fn finish(mut self, copied: Result<(), StoreError>) -> Result<u64, StoreError> {
        // A tokio file may still have a write in flight: flush before trusting it.
        let result = match copied {
            Ok(()) => self.file.flush().await.map_err(|e| self.io_error(e)),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(self.written),
            Err(e) => {
                drop(self.file);
                let _ = tokio::fs::remove_file(self.dest).await;
                Err(e)
            }
        }
    }

    fn io_error(&self, e: std::io::Error) -> StoreError {
        StoreError::Other { name: self.name.to_owned(), message: format!("cannot write {}: {e}", self.dest.display()) }
    }
}

/// Archives in a local directory: `<root>/<name>`.
#[derive(Debug, Clone)]
pub struct DirStore {
    /// The directory holding `<sha256>.tar.gz` files.
    pub root: PathBuf,
}

#[async_trait]
impl ReleaseStore for DirStore {
    async fn fetch(&self, name: &str, dest: &Path, max_bytes: u64) -> Result<u64, StoreError> {
        check_name(name)?;
        let path = self.root.join(name);
        let other = |message: String| StoreError::Other { name: name.to_owned(), message };
        let mut src = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(name.to_owned())),
            Err(e) => return Err(other(format!("cannot open {}: {e}", path.display()))),
        };
        let meta = src.metadata().await.map_err(|e| other(format!("cannot stat {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(other(format!("{} is not a regular file", path.display())));
        }
        if meta.len() > max_bytes {
            return Err(StoreError::TooLarge { name: name.to_owned(), limit: max_bytes });
        }
        let mut out = Download::create(name, dest, max_bytes).await?;
        let copied = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = src.read(&mut buf).await.map_err(|e| other(format!("cannot read {}: {e}", path.display())))?;
                if n == 0 {
                    return Ok(());
                }
                out.write(&buf[..n]).await?;
            }
        }
        .await;
        out.finish(copied).await
    }
}

/// S3 settings from outside the URL: the `AWS_*` variables and the platform's
/// `STORAGE_*` ones. [`S3Settings::from_env`] reads them; tests build one directly.
/// `Debug` shows which are set, never their values.
#[derive(Clone, Default)]
pub struct S3Settings {
    /// `AWS_*` variables (name, value), applied first as `object_store` reads them;
    /// names it does not know are ignored.
    pub aws: Vec<(String, String)>,
    /// `STORAGE_ENDPOINT`: an S3-compatible endpoint such as `http://127.0.0.1:9000`,
    /// addressed path-style (`<endpoint>/<bucket>/<key>`).
    pub endpoint: Option<String>,
    /// `STORAGE_BUCKET`: the bucket when the URL names none.
    pub bucket: Option<String>,
    /// `STORAGE_KEY_ID`: the access key id (with `key_secret`).
    pub key_id: Option<String>,
    /// `STORAGE_KEY_SECRET`: the secret access key (with `key_id`).
    pub key_secret: Option<String>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.aws.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("S3Settings")
            .field("aws", &names)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("key_id", &self.key_id.as_ref().map(|_| "<set>"))
            .field("key_secret", &self.key_secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl S3Settings {
    /// Reads the process environment (see [`S3Settings::from_vars`]).
    pub fn from_env() -> S3Settings {
        S3Settings::from_vars(std::env::vars_os())
    }

    /// Picks the S3 settings out of `vars`: every `AWS_*` variable, and
    /// `STORAGE_ENDPOINT`, `STORAGE_BUCKET`, `STORAGE_KEY_ID`, `STORAGE_KEY_SECRET`.
    /// Empty and non-UTF-8 values count as unset.
    pub fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> S3Settings {
        let mut s = S3Settings::default();
        for (key, value) in vars {
            let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else { continue };
            if value.is_empty() {
                continue;
            }
            let value = value.to_owned();
            match key {
                "STORAGE_ENDPOINT" => s.endpoint = Some(value),
                "STORAGE_BUCKET" => s.bucket = Some(value),
                "STORAGE_KEY_ID" => s.key_id = Some(value),
                "STORAGE_KEY_SECRET" => s.key_secret = Some(value),
                _ if key.starts_with("AWS_") => s.aws.push((key.to_owned(), value)),
                _ => {}
            }
        }
        s.aws.sort();
        s
    }
}

/// Archives in an S3-compatible bucket: object `<prefix>/<name>`.
pub struct S3Store {
    client: AmazonS3,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
}

impl fmt::Debug for S3Store {
    // The client's own Debug would print static credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("bucket", &self.bucket).field("prefix", &self.prefix).field("endpoint", &self.endpoint).finish()
    }
}

/// A whole archive may take a while; a stalled connection must not wait forever.
const REQUEST_TIMEOUT: &str = "300s";
const CONNECT_TIMEOUT: &str = "5s";

impl S3Store {
    /// The store `url` (`s3://[bucket][/prefix]`) names, with `settings` (see the
    /// module head for precedence). Builds the client only: no network.
    pub fn new(url: &str, settings: &S3Settings) -> Result<S3Store, String> {
        match parse_spec(url)? {
            StoreSpec::S3 { bucket, prefix } => S3Store::from_parts(bucket.as_deref(), &prefix, settings),
            StoreSpec::Dir(_) => Err(format!("{url:?} is not an s3:// URL")),
        }
    }

    fn from_parts(bucket: Option<&str>, prefix: &str, settings: &S3Settings) -> Result<S3Store, String> {
        let builder = builder(bucket, settings)?;
        let bucket = builder
            .get_config_value(&AmazonS3ConfigKey::Bucket)
            .ok_or_else(|| "no bucket: name it in the URL (s3://bucket/prefix) or set STORAGE_BUCKET".to_owned())?;
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let client = builder.build().map_err(|e| format!("cannot set up the S3 client: {e}"))?;
        Ok(S3Store { client, bucket, prefix: prefix.to_owned(), endpoint })
    }

    /// The bucket read.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix (no leading or trailing `/`; may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> Result<object_store::path::Path, StoreError> {
        let key = if self.prefix.is_empty() { name.to_owned() } else { format!("{}/{name}", self.prefix) };
        object_store::path::Path::parse(&key)
            .map_err(|e| StoreError::Other { name: name.to_owned(), message: format!("bad object key: {e}") })
    }
}

/// The client configuration for `bucket` (from the URL) and `settings`, in precedence
/// order; the bucket check is the caller's.
fn builder(bucket: Option<&str>, settings: &S3Settings) -> Result<AmazonS3Builder, String> {
    let storage_creds = match (&settings.key_id, &settings.key_secret) {
        (Some(_), Some(_)) => true,
        (None, None) => false,
        (Some(_), None) => return Err("STORAGE_KEY_ID is set but STORAGE_KEY_SECRET is not".into()),
        (None, Some(_)) => return Err("STORAGE_KEY_SECRET is set but STORAGE_KEY_ID is not".into()),
    };
    let mut b = AmazonS3Builder::new()
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), REQUEST_TIMEOUT)
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), CONNECT_TIMEOUT)
        // The release cache retries failed fetches with its own backoff.
        .with_retry(RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..RetryConfig::default() });
    for (name, value) in &settings.aws {
        let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else { continue };
        // An AWS session token belongs to the AWS keys, not to STORAGE_KEY_*.
        if storage_creds && key == AmazonS3ConfigKey::Token {
            continue;
        }
        b = b.with_config(key, value);
    }
    if let Some(endpoint) = &settings.endpoint {
        b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
    }
    if let (Some(id), Some(secret)) = (&settings.key_id, &settings.key_secret) {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
    }
    if let Some(name) = &settings.bucket {
        b = b.with_bucket_name(name);
    }
    if let Some(name) = bucket {
        b = b.with_bucket_name(name);
    }
    if let Some(endpoint) = b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        if endpoint.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
            b = b.with_allow_http(true);
        }
    }
    Ok(b)
}

/// `e` and its causes, for a message (reqwest hides the useful part in the sources).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[async_trait]
impl ReleaseStore for S3Store {
    async fn fetch(&self, name: &str, dest: &Path, max_bytes: u64) -> Result<u64, StoreError> {
        check_name(name)?;
        let key = self.key(name)?;
        let other = |e: &dyn std::error::Error| StoreError::Other { name: name.to_owned(), message: chain(e) };
        let got = match self.client.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound(name.to_owned())),
            Err(e) => return Err(other(&e)),
        };
        if got.meta.size > max_bytes {
            return Err(StoreError::TooLarge { name: name.to_owned(), limit: max_bytes });
        }
        let mut body = got.into_stream();
        let mut out = Download::create(name, dest, max_bytes).await?;
        let copied = async {
            // `poll_next` is callable on the boxed `dyn Stream` without naming the trait.
            while let Some(chunk) = std::future::poll_fn(|cx| body.as_mut().poll_next(cx)).await {
                out.write(&chunk.map_err(|e| other(&e))?).await?;
            }
            Ok(())
        }
        .await;
        out.finish(copied).await
    }
}
