//! Public storage objects (CONTRACT §12) through the library API, against a real
//! S3-compatible server (`moto_server`, see `s3.rs`), and against loopback sockets that
//! refuse, stall or misbehave. The edge's wiring (hosts, the writer) is tested
//! end-to-end elsewhere; here every rule of `miosa_edge::storage` meets a real store.

use crate::s3::{S3Server, KEY_ID, KEY_SECRET};
use crate::support::closed_port;
use miosa_edge::storage::{ObjectPlan, Storage, StorageError, StorageSettings, DEFAULT_CACHE_CONTROL};
use pingora::http::RequestHeader;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PUBLIC: &str = "pub-bucket";
const PRIVATE: &str = "priv-bucket";
const MARKED: (&str, &str) = ("x-amz-meta-miosa-public", "true");

fn settings(endpoint: String, first_byte: Duration, idle: Duration) -> StorageSettings {
    StorageSettings {
        endpoint,
        region: "us-east-1".into(),
        key_id: KEY_ID.into(),
        key_secret: KEY_SECRET.into(),
        first_byte_timeout: first_byte,
        idle_timeout: idle,
    }
}

fn storage_for(s3: &S3Server) -> Storage {
    Storage::new(settings(s3.endpoint(), Duration::from_secs(10), Duration::from_secs(10))).expect("storage")
}

fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, b"/ignored", None).expect("request");
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).expect("header");
    }
    r
}

/// The plan and every byte of its body.
async fn fetch(
    storage: &Storage,
    bucket: &str,
    public: bool,
    key: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> Result<(ObjectPlan, Vec<u8>), StorageError> {
    let mut plan = storage.object(bucket, public, key, &request(method, headers)).await?;
    let mut bytes = Vec::new();
    if let Some(mut body) = plan.body.take() {
        while let Some(chunk) = body.next().await? {
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok((plan, bytes))
}

fn header<'p>(plan: &'p ObjectPlan, name: &str) -> Option<&'p str> {
    plan.headers.iter().find(|(n, _)| n.as_str() == name).and_then(|(_, v)| v.to_str().ok())
}

/// A store with a public and a private bucket; the private one holds `marked.txt`
/// (`miosa-public: true`) and `hidden.txt` (no metadata).
async fn store_with_buckets() -> S3Server {
    let s3 = S3Server::start().await;
    s3.create_bucket(PUBLIC).await;
    s3.create_bucket(PRIVATE).await;
    s3.put_with_headers(PRIVATE, "marked.txt", &[MARKED, ("Content-Type", "text/plain")], b"marked public").await;
    s3.put_with_headers(PRIVATE, "hidden.txt", &[("Content-Type", "text/plain")], b"private bytes").await;
    s3
}

#[tokio::test]
async fn storage_objects_publicity_headers_and_keys() {
    let s3 = store_with_buckets().await;
    let storage = storage_for(&s3);
    s3.put_with_headers(PUBLIC, "img/logo.png", &[("Content-Type", "image/png")], b"\x89PNG....").await;
    s3.put_with_headers(PUBLIC, "page.html", &[("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache")], b"<h1>x</h1>")
        .await;
    s3.put_with_headers(PUBLIC, "pic.svg", &[("Content-Type", "Image/SVG+XML")], b"<svg/>").await;
    let odd_key = "dir with space/ünï cødé 🚀.txt";
    s3.put_with_headers(PUBLIC, odd_key, &[("Content-Type", "text/plain")], b"odd key").await;

    // A public bucket's object: 200 with the object's headers.
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "img/logo.png", "GET", &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", s3.log()));
    assert_eq!((plan.status, bytes.as_slice(), plan.content_length), (200, &b"\x89PNG...."[..], Some(8)));
    assert_eq!(header(&plan, "content-type"), Some("image/png"));
    assert!(header(&plan, "etag").is_some_and(|t| t.starts_with('"')), "{plan:?}");
    assert!(header(&plan, "last-modified").is_some_and(|d| d.ends_with(" GMT")), "{plan:?}");
    assert_eq!(header(&plan, "cache-control"), Some(DEFAULT_CACHE_CONTROL));
    assert_eq!(header(&plan, "accept-ranges"), Some("bytes"));
    assert_eq!(header(&plan, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&plan, "content-security-policy"), None, "a PNG is not sandboxed");
    assert_eq!(header(&plan, "set-cookie"), None);

    // HTML and SVG are sandboxed; the object's own Cache-Control wins.
    let (plan, _) = fetch(&storage, PUBLIC, true, "page.html", "GET", &[]).await.expect("html");
    assert_eq!(header(&plan, "content-security-policy"), Some("sandbox"));
    assert_eq!(header(&plan, "cache-control"), Some("no-cache"));
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "pic.svg", "GET", &[]).await.expect("svg");
    assert_eq!((header(&plan, "content-security-policy"), bytes.as_slice()), (Some("sandbox"), &b"<svg/>"[..]));

    // HEAD: the same headers, the GET's length, no body.
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "page.html", "HEAD", &[]).await.expect("head");
    assert_eq!((plan.status, plan.content_length, bytes.len()), (200, Some(10), 0));
    assert!(plan.body.is_none() && header(&plan, "etag").is_some());
    assert_eq!(header(&plan, "content-security-policy"), Some("sandbox"));

    // A private bucket: only the marked object; unmarked and missing are the same 404.
    let (plan, bytes) = fetch(&storage, PRIVATE, false, "marked.txt", "GET", &[]).await.expect("marked");
    assert_eq!((plan.status, bytes.as_slice()), (200, &b"marked public"[..]));
    for (bucket, public, key, method) in [
        (PRIVATE, false, "hidden.txt", "GET"),
        (PRIVATE, false, "hidden.txt", "HEAD"),
        (PRIVATE, false, "missing.txt", "GET"),
        (PUBLIC, true, "missing.txt", "GET"),
        (PUBLIC, true, "missing.txt", "HEAD"),
        ("no-such-bucket", true, "img/logo.png", "GET"),
    ] {
        let got = fetch(&storage, bucket, public, key, method, &[]).await;
        assert!(matches!(got, Err(StorageError::NotFound)), "{method} {bucket}/{key}: {got:?}");
    }
    // The same private object is public through a public bucket entry.
    assert_eq!(fetch(&storage, PRIVATE, true, "hidden.txt", "GET", &[]).await.expect("public bucket").1, b"private bytes");

    // A key with spaces and Unicode, from its request path.
    let key = miosa_edge::storage::key_of(format!("/{}?download=1", crate::s3::encode_key(odd_key)).as_bytes()).expect("key");
    assert_eq!(key, odd_key);
    assert_eq!(fetch(&storage, PUBLIC, true, &key, "GET", &[]).await.expect("odd key").1, b"odd key");
}

#[tokio::test]
async fn storage_objects_ranges() {
    let s3 = store_with_buckets().await;
    let storage = storage_for(&s3);
    let data: Vec<u8> = (0..100u8).collect();
    s3.put_with_headers(PUBLIC, "r.bin", &[], &data).await;
    let range = |v: &'static str| [("range", v)];

    let (plan, bytes) =
        fetch(&storage, PUBLIC, true, "r.bin", "GET", &range("bytes=10-19")).await.unwrap_or_else(|e| panic!("{e}\n{}", s3.log()));
    assert_eq!((plan.status, header(&plan, "content-range"), plan.content_length), (206, Some("bytes 10-19/100"), Some(10)));
    assert_eq!(bytes, &data[10..20]);
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &range("bytes=-5")).await.expect("suffix");
    assert_eq!((plan.status, header(&plan, "content-range"), bytes.as_slice()), (206, Some("bytes 95-99/100"), &data[95..]));
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &range("bytes=90-")).await.expect("open-ended");
    assert_eq!((plan.status, header(&plan, "content-range"), bytes.as_slice()), (206, Some("bytes 90-99/100"), &data[90..]));
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &range("bytes=95-500")).await.expect("past the end");
    assert_eq!((plan.status, header(&plan, "content-range"), bytes.as_slice()), (206, Some("bytes 95-99/100"), &data[95..]));

    // Several ranges or a malformed one: the whole object.
    for v in ["bytes=0-1,5-6", "bytes=9-2", "lines=1-2"] {
        let (plan, bytes) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &[("range", v)]).await.expect("whole");
        assert_eq!((plan.status, header(&plan, "content-range"), bytes.len()), (200, None, 100), "{v}");
    }

    // Unsatisfiable: 416 with the size, for a public object only.
    let (plan, bytes) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &range("bytes=100-")).await.expect("416");
    assert_eq!((plan.status, header(&plan, "content-range"), bytes.len()), (416, Some("bytes */100"), 0));
    assert_eq!(plan.content_length, Some(0));
    let got = fetch(&storage, PRIVATE, false, "hidden.txt", "GET", &range("bytes=500-")).await;
    assert!(matches!(got, Err(StorageError::NotFound)), "{got:?}");
    let got = fetch(&storage, PRIVATE, false, "hidden.txt", "GET", &range("bytes=0-3")).await;
    assert!(matches!(got, Err(StorageError::NotFound)), "a private object's range: {got:?}");
    let got = fetch(&storage, PUBLIC, true, "missing", "GET", &range("bytes=0-3")).await;
    assert!(matches!(got, Err(StorageError::NotFound)), "{got:?}");
    let (plan, bytes) = fetch(&storage, PRIVATE, false, "marked.txt", "GET", &range("bytes=0-5")).await.expect("marked");
    assert_eq!((plan.status, bytes.as_slice()), (206, &b"marked"[..]));

    // If-Range: the current strong ETag keeps the range, another one gets the whole.
    let (whole, _) = fetch(&storage, PUBLIC, true, "r.bin", "HEAD", &[]).await.expect("head");
    let etag = header(&whole, "etag").expect("etag").to_owned();
    let (plan, _) = fetch(&storage, PUBLIC, true, "r.bin", "GET", &[("range", "bytes=0-0"), ("if-range", &etag)]).await.expect("if-range");
    assert_eq!(plan.status, 206);
    let (plan, bytes) =
        fetch(&storage, PUBLIC, true, "r.bin", "GET", &[("range", "bytes=0-0"), ("if-range", "\"stale\"")]).await.expect("stale");
    assert_eq!((plan.status, bytes.len()), (200, 100));
    let (plan, bytes) =
        fetch(&storage, PUBLIC, true, "r.bin", "GET", &[("range", "bytes=500-"), ("if-range", "\"stale\"")]).await.expect("stale 416");
    assert_eq!((plan.status, bytes.len()), (200, 100), "a stale If-Range makes an unsatisfiable range moot");
}

#[tokio::test]
async fn storage_objects_conditionals_and_a_large_body() {
    let s3 = store_with_buckets().await;
    let storage = storage_for(&s3);
    s3.put_with_headers(PUBLIC, "c.txt", &[("Cache-Control", "max-age=5")], b"cached").await;

    for (bucket, public, key) in [(PUBLIC, true, "c.txt"), (PRIVATE, false, "marked.txt")] {
        let (plan, _) = fetch(&storage, bucket, public, key, "GET", &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", s3.log()));
        let etag = header(&plan, "etag").expect("etag").to_owned();
        let modified = header(&plan, "last-modified").expect("last-modified").to_owned();
        for method in ["GET", "HEAD"] {
            let (nm, bytes) = fetch(&storage, bucket, public, key, method, &[("if-none-match", &etag)]).await.expect("304");
            assert_eq!((nm.status, nm.content_length, bytes.len()), (304, None, 0), "{method} {bucket}/{key}");
            assert!(nm.body.is_none());
            assert_eq!(header(&nm, "etag"), Some(etag.as_str()));
            assert_eq!(header(&nm, "last-modified"), Some(modified.as_str()));
            assert_eq!(header(&nm, "cache-control"), header(&plan, "cache-control"));
            assert_eq!(header(&nm, "content-type"), None);
        }
        let (nm, _) = fetch(&storage, bucket, public, key, "GET", &[("if-none-match", &format!("\"x\", W/{etag}"))]).await.expect("list");
        assert_eq!(nm.status, 304);
        let (nm, _) = fetch(&storage, bucket, public, key, "GET", &[("if-modified-since", &modified)]).await.expect("ims");
        assert_eq!(nm.status, 304);
        let (fresh, bytes) =
            fetch(&storage, bucket, public, key, "GET", &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]).await.expect("old");
        assert_eq!((fresh.status, bytes.len() as u64), (200, fresh.content_length.unwrap_or(0)));
        // If-None-Match decides alone: a stale tag beats a current date.
        let (fresh, bytes) =
            fetch(&storage, bucket, public, key, "GET", &[("if-none-match", "\"other\""), ("if-modified-since", &modified)])
                .await
                .expect("inm");
        assert_eq!(fresh.status, 200);
        assert!(!bytes.is_empty());
    }
    assert_eq!(
        fetch(&storage, PUBLIC, true, "c.txt", "GET", &[])
            .await
            .expect("c")
            .0
            .headers
            .iter()
            .find(|(n, _)| n == "cache-control")
            .map(|(_, v)| v.clone()),
        Some(http::HeaderValue::from_static("max-age=5"))
    );
    // A private object's validator does not reveal it.
    let got = fetch(&storage, PRIVATE, false, "hidden.txt", "GET", &[("if-none-match", "*")]).await;
    assert!(matches!(got, Err(StorageError::NotFound)), "{got:?}");

    // 5 MiB, read through ObjectBody::next, byte for byte.
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    s3.put_with_headers(PUBLIC, "big.bin", &[], &big).await;
    let mut plan = storage.object(PUBLIC, true, "big.bin", &request("GET", &[])).await.expect("big");
    assert_eq!(plan.content_length, Some(big.len() as u64));
    let mut body = plan.body.take().expect("a body");
    let (mut got, mut chunks) = (Vec::with_capacity(big.len()), 0);
    while let Some(chunk) = body.next().await.expect("chunk") {
        got.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert_eq!(body.remaining(), 0);
    assert!(body.next().await.expect("still the end").is_none(), "asking again after the end is harmless");
    assert!(got == big, "the 5 MiB object, byte for byte ({} bytes read)", got.len());
    assert!(chunks > 1, "streamed, not one buffer");
}

/// A loopback "store" answering each connection with `answer` after reading the
/// request head, then closing it, or with `stall` keeping it open and silent for a
/// minute (`None`: read, then say nothing).
async fn fake_store(answer: Option<&'static [u8]>, stall: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                match answer {
                    Some(a) => {
                        let _ = s.write_all(a).await;
                        if stall {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn storage_objects_store_down_silent_or_failing() {
    let short = Duration::from_millis(700);
    let at = |addr: String| Storage::new(settings(addr, short, short)).expect("storage");

    // Nothing listens: unavailable, quickly, and the message holds no secret.
    let down = at(format!("http://127.0.0.1:{}", closed_port("127.0.0.1")));
    match fetch(&down, PUBLIC, true, "k", "GET", &[]).await {
        Err(StorageError::Unavailable(m)) => assert!(!m.contains(KEY_SECRET) && !m.contains(KEY_ID), "{m}"),
        other => panic!("a closed port: {other:?}"),
    }

    // Accepts, reads, never answers: Timeout within first_byte_timeout.
    let silent = at(format!("http://{}", fake_store(None, true).await));
    let started = Instant::now();
    let got = fetch(&silent, PUBLIC, true, "k", "GET", &[]).await;
    assert!(matches!(got, Err(StorageError::Timeout)), "{got:?}");
    assert!(started.elapsed() < short + Duration::from_millis(500), "{:?}", started.elapsed());

    // 5xx and 403: unavailable (a 403 is the store's problem, not a missing object).
    for answer in [
        &b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"[..],
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nno length",
    ] {
        let failing = at(format!("http://{}", fake_store(Some(answer), false).await));
        let got = fetch(&failing, PUBLIC, true, "k", "GET", &[]).await;
        assert!(matches!(got, Err(StorageError::Unavailable(_))), "{:?}: {got:?}", String::from_utf8_lossy(answer));
    }

    // A store that ignores Range: the whole object, not an error.
    let rangeless =
        at(format!("http://{}", fake_store(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nabcd"), false).await));
    let (plan, bytes) = fetch(&rangeless, PUBLIC, true, "k", "GET", &[("range", "bytes=0-1")]).await.expect("whole");
    assert_eq!((plan.status, bytes.as_slice(), header(&plan, "content-range")), (200, &b"abcd"[..], None));

    // The head arrives, then the body stalls: the next chunk times out after idle_timeout.
    let stalling = at(format!(
        "http://{}",
        fake_store(
            Some(
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\netag: \"t\"\r\nlast-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n0123456789"
            ),
            true
        )
        .await
    ));
    let mut plan = stalling.object(PUBLIC, true, "k", &request("GET", &[])).await.expect("the head");
    assert_eq!((plan.status, plan.content_length), (200, Some(100)));
    let mut body = plan.body.take().expect("body");
    assert_eq!(body.next().await.expect("first chunk").as_deref(), Some(&b"0123456789"[..]));
    let started = Instant::now();
    assert!(matches!(body.next().await, Err(StorageError::Timeout)));
    assert!(started.elapsed() >= short && started.elapsed() < short + Duration::from_millis(500), "{:?}", started.elapsed());
}

/// A keep-alive loopback "store" answering every request with a 2-byte object; counts
/// the connections it accepts.
async fn counting_store() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\netag: \"k\"\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn storage_objects_buckets_share_one_connection_pool() {
    let (addr, accepted) = counting_store().await;
    let storage = Storage::new(settings(format!("http://{addr}"), Duration::from_secs(5), Duration::from_secs(5))).expect("storage");
    for bucket in ["bucket-a", "bucket-b", "bucket-a", "bucket-c"] {
        let (plan, bytes) = fetch(&storage, bucket, true, "k", "GET", &[]).await.expect("object");
        assert_eq!((plan.status, bytes.as_slice()), (200, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection for every bucket");
}
