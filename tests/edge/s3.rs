//! The S3 release store against a real S3-compatible server: `moto_server` (PyPI
//! `moto[server]`, installed by scripts/deps) on a free loopback port.
//!
//! [`S3Server`] is also the support for end-to-end tests of static releases: start it,
//! [`S3Server::create_bucket`], [`S3Server::put`] the archives, and give the edge
//! [`S3Server::edge_env`] plus `[static] store = "s3://<bucket>/<prefix>"`.
//!
//! Tests build stores with explicit [`S3Settings`], never by setting environment
//! variables: those are process-wide and tests run in parallel threads.

#![allow(dead_code)]

use crate::support::{closed_port, eventually};
use miosa_edge::releases::store::{open_spec, ReleaseStore, S3Settings, S3Store, StoreError, StoreSpec};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The access key id the server is used with (moto accepts any).
pub const KEY_ID: &str = "test-storage-key-id";
/// The secret access key the server is used with.
pub const KEY_SECRET: &str = "test-storage-key-secret-0123456789";

/// A running `moto_server` on `127.0.0.1`, killed on drop.
pub struct S3Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange (`Connection: close`): the status and body, or `None` when
/// the connection fails. Requests are unsigned: moto accepts them for bucket creation
/// and uploads, so setting up never goes through the code under test.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    http_with(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers.
async fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let extra: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = String::from_utf8_lossy(&buf[..end]).split(' ').nth(1)?.parse().ok()?;
    Some((status, buf[end + 4..].to_vec()))
}

impl S3Server {
    /// Starts `moto_server` on a free port and waits (bounded) until it answers.
    /// Panics, pointing at scripts/deps, when `moto_server` is not installed: CI
    /// installs it, so a missing server is a failure, not a skip.
    pub async fn start() -> S3Server {
        S3Server::start_env(&[]).await
    }

    /// Like [`S3Server::start`], with extra environment for `moto_server` (e.g.
    /// `INITIAL_NO_AUTH_ACTION_COUNT`, after which it checks every request's signature).
    pub async fn start_env(env: &[(&str, &str)]) -> S3Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moto.log");
        // The port was free a moment ago; if moto loses a race for it, it exits and
        // we try another.
        for _ in 0..3 {
            let port = closed_port("127.0.0.1");
            let out = std::fs::File::create(&log).expect("moto log");
            let err = out.try_clone().expect("moto log");
            let child = match Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // Path-style whatever the Host (the storage host `storage.localhost` would
                // otherwise read as bucket `storage`), as a store behind the edge is set up.
                .env("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "moto_server is not on PATH: run scripts/deps (it installs the PyPI package moto[server]; \
                     CI runs it through scripts/test)"
                ),
                Err(e) => panic!("cannot start moto_server: {e}"),
            };
            let mut child = child;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let ready = eventually(Duration::from_secs(60), || {
                let exited = child.try_wait().ok().flatten().is_some();
                async move {
                    if exited {
                        return Some(false);
                    }
                    // `GET /` is ListBuckets: a 200 means moto is serving S3.
                    http(addr, "GET", "/", b"").await.filter(|(status, _)| *status == 200).map(|_| true)
                }
            })
            .await;
            match ready {
                Some(true) => return S3Server { child, addr, log, _dir: dir },
                Some(false) => continue,
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("moto_server did not answer within 60 s; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("moto_server exited three times; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's output so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates `bucket` (in moto's default region, `us-east-1`).
    pub async fn create_bucket(&self, bucket: &str) {
        let answer = http(self.addr, "PUT", &format!("/{bucket}"), b"").await;
        assert!(matches!(answer, Some((200, _))), "create bucket {bucket}: {answer:?}\n{}", self.log());
    }

    /// Uploads `bytes` as object `key` (e.g. `prefix/<sha256>.tar.gz`; plain URL
    /// characters only) of `bucket`.
    pub async fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let answer = http(self.addr, "PUT", &format!("/{bucket}/{key}"), bytes).await;
        assert!(matches!(answer, Some((200, _))), "put {bucket}/{key}: {answer:?}\n{}", self.log());
    }

    /// Uploads `bytes` as object `key` of `bucket` with request `headers` (moto keeps
    /// `Content-Type`, `Cache-Control`, `Content-Disposition`, `x-amz-meta-*`…). `key` is
    /// percent-encoded here, so it may hold spaces or any Unicode.
    pub async fn put_with_headers(&self, bucket: &str, key: &str, headers: &[(&str, &str)], bytes: &[u8]) {
        let answer = http_with(self.addr, "PUT", &format!("/{bucket}/{}", encode_key(key)), headers, bytes).await;
        assert!(matches!(answer, Some((200, _))), "put {bucket}/{key}: {answer:?}\n{}", self.log());
    }

    /// Store settings for this server, as the edge builds them from its environment
    /// ([`S3Server::edge_env`]) with `STORAGE_BUCKET` = `bucket`.
    pub fn settings(&self, bucket: Option<&str>) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            bucket: bucket.map(str::to_owned),
            key_id: Some(KEY_ID.into()),
            key_secret: Some(KEY_SECRET.into()),
            ..S3Settings::default()
        }
    }

    /// The environment an edge process needs to read this server: `STORAGE_ENDPOINT`,
    /// `STORAGE_KEY_ID`, `STORAGE_KEY_SECRET`, and `AWS_REGION=us-east-1` (so a stray
    /// region in the test's environment cannot change the signing). With
    /// `[static] store = "s3://<bucket>/<prefix>"` the URL names the bucket;
    /// `STORAGE_BUCKET` is only needed for `store = "s3://"`.
    pub fn edge_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("STORAGE_ENDPOINT", self.endpoint()),
            ("STORAGE_KEY_ID", KEY_ID.into()),
            ("STORAGE_KEY_SECRET", KEY_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// `key` percent-encoded for a request path: every byte but unreserved ones and `/`.
pub fn encode_key(key: &str) -> String {
    key.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn archive_name() -> String {
    format!("{SHA}.tar.gz")
}

#[tokio::test]
async fn s3_store_fetches_under_the_prefix_refuses_missing_and_too_large() {
    let s3 = S3Server::start().await;
    s3.create_bucket("releases").await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let name = archive_name();
    s3.put("releases", &format!("site/v1/{name}"), &body).await;
    s3.put("releases", &name, b"the unprefixed object").await;

    let store = S3Store::new("s3://releases/site/v1", &s3.settings(None)).expect("store");
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("dl");
    let n = store.fetch(&name, &dest, 1 << 20).await.unwrap_or_else(|e| panic!("fetch: {e}\n{}", s3.log()));
    assert_eq!(n, body.len() as u64);
    assert_eq!(tokio::fs::read(&dest).await.expect("read"), body, "the object under the prefix, byte for byte");

    let missing = dir.path().join("missing");
    let err = store.fetch(&format!("{}.tar.gz", "f".repeat(64)), &missing, 1 << 20).await.expect_err("missing");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert!(!missing.exists());

    let big = dir.path().join("big");
    let err = store.fetch(&name, &big, body.len() as u64 - 1).await.expect_err("too large");
    assert!(matches!(err, StoreError::TooLarge { limit, .. } if limit == body.len() as u64 - 1), "{err:?}");
    assert!(!big.exists(), "nothing is left behind");
}

#[tokio::test]
async fn s3_bucket_comes_from_the_url_first_then_storage_bucket() {
    let s3 = S3Server::start().await;
    s3.create_bucket("edge-releases").await;
    let name = archive_name();
    s3.put("edge-releases", &name, b"root object").await;
    let dir = tempfile::tempdir().expect("tempdir");

    // `s3://` with no bucket: STORAGE_BUCKET names it; no prefix.
    let spec = StoreSpec::S3 { bucket: None, prefix: String::new() };
    let store = open_spec(&spec, &s3.settings(Some("edge-releases"))).expect("open");
    let dest = dir.path().join("a");
    assert_eq!(store.fetch(&name, &dest, 1024).await.unwrap_or_else(|e| panic!("fetch: {e}\n{}", s3.log())), 11);
    assert_eq!(tokio::fs::read(&dest).await.expect("read"), b"root object");

    // The URL's bucket wins over STORAGE_BUCKET (which names no existing bucket).
    let store = S3Store::new("s3://edge-releases", &s3.settings(Some("no-such-bucket"))).expect("store");
    assert_eq!(store.bucket(), "edge-releases");
    let dest = dir.path().join("b");
    assert_eq!(store.fetch(&name, &dest, 1024).await.unwrap_or_else(|e| panic!("fetch: {e}\n{}", s3.log())), 11);
}
