//! Static releases as CONTRACT §7, end to end: archives built here, a directory store,
//! the real edge fetching, verifying, unpacking and serving them; rollback between
//! static and dynamic versions; skew protection; refused archives; cache eviction.

use crate::support::{eventually, Edge, Response};
use crate::Fixture;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// A `.tar.gz` of `files` (path, contents); returns (bytes, sha256 hex).
pub fn archive(files: &[(&str, &[u8])]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("append");
    }
    let bytes = b.into_inner().expect("tar").finish().expect("gzip");
    let hex: String = ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    (bytes, hex)
}

/// Writes an archive into the store directory under its hash; returns the hash.
fn put(store: &Path, files: &[(&str, &[u8])]) -> String {
    let (bytes, hex) = archive(files);
    std::fs::write(store.join(format!("{hex}.tar.gz")), bytes).expect("write archive");
    hex
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Pushes deployment `dep_s` (`site.one.apps.localhost`) with these versions, `active` active.
async fn push(edge: &Edge, versions: &[(&str, String)], active: &str) {
    let versions: Vec<String> = versions.iter().map(|(id, release)| format!("{{\"id\":\"{id}\",\"release\":{release}}}")).collect();
    let body = format!(
        "{{\"id\":\"dep_s\",\"workspace\":\"ws_1\",\"name\":\"site\",\"domains\":[],\"active_version\":\"{active}\",\"versions\":[{}]}}",
        versions.join(",")
    );
    let r = edge.api("PUT", "/v1/deployments/dep_s", Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn static_release(hex: &str, spa: bool) -> String {
    format!("{{\"kind\":\"static\",\"sha256\":\"{hex}\",\"spa\":{spa}}}")
}

const HOST: &str = "site.one.apps.localhost";

async fn req(edge: &Edge, method: &str, path: &str, headers: &str) -> Response {
    edge.request(&format!("{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{headers}")).await
}

async fn activate(edge: &Edge, version: &str) {
    let r = edge.api("POST", "/v1/deployments/dep_s/activate", Some(&format!("{{\"version\":\"{version}\"}}"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn edge_config(f: &Fixture, store: &Path, extra: &str) -> String {
    format!("[static]\nstore = \"{}\"\nwait_ms = 5000\nmemory_file_bytes = 65536\n{extra}\n\n{}", store.display(), f.toml(""))
}

#[tokio::test]
async fn static_releases_are_served_and_rolled_back() {
    let f = Fixture::start().await;
    let store = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let app_js = b"console.log('release a')".repeat(20);
    let a = put(
        store.path(),
        &[
            ("index.html", b"<h1>release a</h1>"),
            ("404.html", b"<h1>a: not found</h1>"),
            ("assets/app-3f9a1c.js", &app_js),
            ("assets/app-3f9a1c.js.gz", &gzip(&app_js)),
            ("big.bin", &big),
        ],
    );
    let b = put(store.path(), &[("index.html", b"<h1>release b</h1>"), ("assets/app-77aa00.js", b"b")]);
    let mut edge = Edge::start(&edge_config(&f, store.path(), "")).await;
    let dynamic = format!("{{\"kind\":\"dynamic\",\"instances\":[\"{}\"]}}", f.d1.addr);
    push(&edge, &[("va", static_release(&a, true)), ("vb", static_release(&b, false)), ("vd", dynamic)], "va").await;

    let r = req(&edge, "GET", "/", "Accept: text/html\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>release a</h1>"), "{:?}", r.headers);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert!(r.header("x-request-id").is_some());

    // Precompressed sibling, long caching for the fingerprinted name, validators.
    let r = req(&edge, "GET", "/assets/app-3f9a1c.js", "Accept-Encoding: gzip, br\r\n").await;
    assert_eq!((r.status, r.header("content-encoding"), r.header("vary")), (200, Some("gzip"), Some("Accept-Encoding")));
    assert_eq!(r.body, gzip(&app_js));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    // The edge's own answers write names in their usual case (vendor/README.md
    // pingora-http 9; `etag`, `vary` and `x-content-type-options` went out in lower case before).
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    for name in [
        "Content-Type",
        "Content-Encoding",
        "Vary",
        "Cache-Control",
        "ETag",
        "Accept-Ranges",
        "Content-Length",
        "X-Request-Id",
        "X-Content-Type-Options",
    ] {
        assert!(names.contains(&name), "{name} is not written so: {names:?}");
    }
    let r = req(&edge, "GET", "/assets/app-3f9a1c.js", "").await;
    assert_eq!(r.body, app_js, "identity without Accept-Encoding");
    let etag = r.header("etag").expect("etag").to_string();
    let r = req(&edge, "GET", "/assets/app-3f9a1c.js", &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!((r.status, r.body.len()), (304, 0));
    let r = req(&edge, "HEAD", "/assets/app-3f9a1c.js", "").await;
    assert_eq!((r.status, r.header("content-length"), r.body.len()), (200, Some(app_js.len().to_string().as_str()), 0));

    // A large file streams from disk, whole or by range.
    let r = req(&edge, "GET", "/big.bin", "").await;
    assert_eq!((r.status, r.body.len()), (200, big.len()));
    assert!(r.body == big, "the streamed body is the file");
    let r = req(&edge, "GET", "/big.bin", "Range: bytes=1000-1999\r\n").await;
    assert_eq!((r.status, r.header("content-range")), (206, Some("bytes 1000-1999/300000")));
    assert_eq!(r.body, &big[1000..2000]);
    let r = req(&edge, "GET", "/big.bin", "Range: bytes=400000-\r\n").await;
    assert_eq!(r.status, 416);

    // SPA fallback for pages, the release's 404 for the rest, methods.
    let r = req(&edge, "GET", "/some/client/route", "Accept: text/html\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>release a</h1>"));
    let r = req(&edge, "GET", "/api/data.json", "Accept: application/json\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (404, "<h1>a: not found</h1>"));
    let r = req(&edge, "GET", "/.well-known/thing", "Accept: text/html\r\n").await;
    assert_eq!(r.status, 404, "no SPA fallback under /.well-known/");
    let r = req(&edge, "POST", "/", "Content-Length: 0\r\n").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    let r = req(&edge, "GET", "/%2e%2e/%2e%2e/etc/passwd", "Accept: application/json\r\n").await;
    assert_eq!(r.status, 404);

    // Switch to release b: its files, and a's fingerprinted assets still load (skew).
    activate(&edge, "vb").await;
    let r = req(&edge, "GET", "/", "").await;
    assert_eq!(r.text(), "<h1>release b</h1>", "b was fetched ahead: activation is instant");
    assert_eq!(req(&edge, "GET", "/assets/app-77aa00.js", "").await.text(), "b");
    let r = req(&edge, "GET", "/assets/app-3f9a1c.js", "").await;
    assert_eq!((r.status, r.body == app_js), (200, true), "a tab opened before the deploy still gets its chunk");
    // The memory of the previous release survives a restart (kill -9: no shutdown).
    edge.kill9_and_restart().await;
    let survived = eventually(Duration::from_secs(10), || {
        let edge = &edge;
        async move { (req(edge, "GET", "/assets/app-3f9a1c.js", "").await.status == 200).then_some(()) }
    })
    .await;
    assert!(survived.is_some(), "skew protection is lost on restart: {}", edge.log());
    assert_eq!(req(&edge, "GET", "/big.bin", "Accept: application/json\r\n").await.status, 404, "only fingerprinted assets");
    let r = req(&edge, "GET", "/missing", "Accept: application/json\r\n").await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()), "no 404.html in b: the edge's page");

    // Static → dynamic → static: pointer moves.
    activate(&edge, "vd").await;
    let r = req(&edge, "GET", "/", "").await;
    assert_eq!(r.header("x-origin"), Some("d1"));
    activate(&edge, "va").await;
    assert_eq!(req(&edge, "GET", "/", "").await.text(), "<h1>release a</h1>");

    let m = edge.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_release_fetches_total{result=\"ok\"} 2"), "{m}");
    assert!(m.contains("miosa_edge_releases_cached 2"), "{m}");
}

#[tokio::test]
async fn refused_archives_answer_release_unavailable() {
    let f = Fixture::start().await;
    let store = tempfile::tempdir().unwrap();
    // Tampered: stored under a name that is not its hash.
    let (bytes, _) = archive(&[("index.html", b"evil")]);
    let fake = "ab".repeat(32);
    std::fs::write(store.path().join(format!("{fake}.tar.gz")), bytes).unwrap();
    // A symlink entry.
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "index.html", "/etc/passwd").unwrap();
    let link = b.into_inner().unwrap().finish().unwrap();
    let link_hex: String = ring::digest::digest(&ring::digest::SHA256, &link).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(store.path().join(format!("{link_hex}.tar.gz")), link).unwrap();
    let missing = "cd".repeat(32);

    let edge = Edge::start(&edge_config(&f, store.path(), "")).await;
    for (i, hex) in [&fake, &link_hex, &missing].into_iter().enumerate() {
        push(&edge, &[("v", static_release(hex, false))], "v").await;
        let r = req(&edge, "GET", "/", "Accept: application/json\r\n").await;
        assert_eq!((r.status, r.code()), (503, "release_unavailable".into()), "case {i}");
        assert!(r.header("retry-after").is_some());
    }
    let log = edge.log();
    assert!(log.contains("archive SHA-256 is"), "{log}");
    assert!(log.contains("symbolic links are not allowed"), "{log}");
    assert!(log.contains("not found"), "{log}");
    let m = edge.api("GET", "/metrics", None).await.text();
    // Three here, and the fixture's placeholder release `1111…` (not in the store).
    assert!(m.contains("miosa_edge_release_fetches_total{result=\"error\"} 4"), "{m}");
    assert!(!edge.dir.path().join("var/releases").join(&fake).exists(), "nothing of a refused archive stays in the cache");
}

#[tokio::test]
async fn cache_is_bounded_but_keeps_what_is_active() {
    let f = Fixture::start().await;
    let store = tempfile::tempdir().unwrap();
    let noise =
        |seed: u32| -> Vec<u8> { (0..700_000u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect() };
    let (n1, n2) = (noise(1), noise(2));
    let a = put(store.path(), &[("index.html", b"a"), ("blob.bin", &n1)]);
    let b = put(store.path(), &[("index.html", b"b"), ("blob.bin", &n2)]);
    let edge = Edge::start(&edge_config(&f, store.path(), "cache_max_bytes = 1048576\nskew_window_secs = 0")).await;
    push(&edge, &[("va", static_release(&a, false)), ("vb", static_release(&b, false))], "va").await;
    assert_eq!(req(&edge, "GET", "/", "").await.text(), "a");
    let cache = edge.dir.path().join("var/releases");
    // Both are fetched ahead; together they exceed the bound, so the inactive one goes.
    let settled = eventually(Duration::from_secs(10), || {
        let (ca, cb) = (cache.join(&a), cache.join(&b));
        async move { (ca.exists() && !cb.exists()).then_some(()) }
    })
    .await;
    assert!(settled.is_some(), "the inactive release was not evicted");
    // Activating it fetches it again; the now inactive one is evicted instead.
    activate(&edge, "vb").await;
    assert_eq!(req(&edge, "GET", "/", "").await.text(), "b");
    let settled = eventually(Duration::from_secs(10), || {
        let (ca, cb) = (cache.join(&a), cache.join(&b));
        async move { (!ca.exists() && cb.exists()).then_some(()) }
    })
    .await;
    assert!(settled.is_some(), "the cache did not follow the active release");
}

#[tokio::test]
async fn releases_come_from_an_s3_bucket() {
    let f = Fixture::start().await;
    let s3 = crate::s3::S3Server::start().await;
    s3.create_bucket("releases").await;
    let (bytes, hex) = archive(&[("index.html", b"<h1>from s3</h1>"), ("assets/app-9c8b7a.js", b"s3 js")]);
    s3.put("releases", &format!("site/{hex}.tar.gz"), &bytes).await;
    let config = format!("[static]\nstore = \"s3://releases/site\"\nwait_ms = 10000\n\n{}", f.toml(""));
    let edge = Edge::start_env(&s3.edge_env(), &config).await;
    push(&edge, &[("v1", static_release(&hex, false))], "v1").await;
    let r = req(&edge, "GET", "/", "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>from s3</h1>"), "{}", edge.log());
    assert_eq!(req(&edge, "GET", "/assets/app-9c8b7a.js", "").await.text(), "s3 js");
    // An archive the bucket does not have: unavailable, said in the log.
    let missing = "ef".repeat(32);
    push(&edge, &[("v2", static_release(&missing, false))], "v2").await;
    let r = req(&edge, "GET", "/", "Accept: application/json\r\n").await;
    assert_eq!((r.status, r.code()), (503, "release_unavailable".into()));
    assert!(edge.log().contains(&format!("{missing}.tar.gz not found")), "{}", edge.log());
}

/// `[static]` reloads live (CONTRACT §10): a new `store` is fetched from at once (a
/// release that failed in the old one is tried again in the new one), without a restart.
/// Before, `[static]` took effect on restart only.
#[tokio::test]
async fn static_section_reloads_live() {
    let f = Fixture::start().await;
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hex = put(new.path(), &[("index.html", b"from the new store")]);
    let edge = Edge::start(&edge_config(&f, old.path(), "")).await;
    push(&edge, &[("v", static_release(&hex, false))], "v").await;
    let r = req(&edge, "GET", "/", "Accept: application/json\r\n").await;
    assert_eq!((r.status, r.code()), (503, "release_unavailable".into()), "not in the old store");

    edge.write_config(&edge_config(&f, new.path(), "max_files = 100"));
    let r = eventually(Duration::from_secs(15), || async {
        let r = req(&edge, "GET", "/", "").await;
        (r.status == 200).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("the new store was never used\n{}", edge.log()));
    assert_eq!(r.text(), "from the new store");
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}

/// A file kept in memory and large enough is sent by the kernel from its file (sendfile,
/// vendor/README.md pingora-core patch 4) on plain HTTP/1: the same bytes, whole, as a
/// range and on a kept-open connection, and nothing for HEAD. Counted with strace: no
/// sendfile call without the patch.
#[tokio::test]
async fn large_static_files_are_sent_from_their_file_by_the_kernel() {
    use crate::support::read_response;
    use tokio::io::AsyncWriteExt;
    let f = Fixture::start().await;
    let store = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let hex = put(store.path(), &[("index.html", b"<h1>hi</h1>"), ("data.bin", &data)]);
    let (_certs, dir) = crate::support::pebble::certs_dir();
    let config = format!("{}{}", crate::support::pebble::tls_toml(&dir, false), edge_config(&f, store.path(), ""));
    let edge = Edge::start_opts("https = \"127.0.0.1:0\"", &[], &config).await;
    push(&edge, &[("v", static_release(&hex, false))], "v").await;
    let r = req(&edge, "GET", "/data.bin", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // Over TLS the kernel cannot send the file (no kTLS): the bytes are written from memory.
    let r = crate::support::pebble::tls_get(edge.https(), Some(HOST), HOST, "/data.bin", None, &["http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    assert_eq!(r.response.status, 200);
    assert!(r.response.body == data, "over TLS: {} bytes, not the file's", r.response.body.len());

    let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    let (calls, trace) = crate::support::count_syscalls(&edge, "sendfile", async {
        for (i, (method, range)) in [("GET", ""), ("GET", "Range: bytes=1000-30999\r\n"), ("HEAD", ""), ("GET", "")].into_iter().enumerate()
        {
            s.write_all(format!("{method} /data.bin HTTP/1.1\r\nHost: {HOST}\r\n{range}\r\n").as_bytes()).await.expect("send");
            let (status_line, r) = if method == "HEAD" {
                // No body follows a HEAD answer: read the head alone.
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    tokio::io::AsyncReadExt::read_exact(&mut s, &mut b).await.expect("head");
                    head.push(b[0]);
                }
                let r = crate::support::parse_response(&head);
                (String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string(), r)
            } else {
                read_response(&mut s, Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|| panic!("request {i}: no whole response\n{}", edge.log()))
            };
            match (method, range.is_empty()) {
                ("HEAD", _) => {
                    assert_eq!(status_line, "HTTP/1.1 200 OK");
                    assert_eq!(r.header("content-length"), Some("40000"));
                }
                (_, true) => {
                    assert_eq!(status_line, "HTTP/1.1 200 OK", "request {i}");
                    assert!(r.body == data, "request {i}: {} bytes, not the file's", r.body.len());
                }
                (_, false) => {
                    assert_eq!(status_line, "HTTP/1.1 206 Partial Content", "request {i}");
                    assert!(r.body == data[1000..31_000], "request {i}: {} bytes, not the range", r.body.len());
                }
            }
        }
    })
    .await;
    // At least one per body: the whole file twice and the range (HEAD has none); more
    // when the socket's buffer takes a body in parts.
    assert!(calls >= 3, "{calls} sendfile calls:\n{trace}");
    // From the file its release keeps open (releases::serve::KEPT_OPEN_MAX): no `open`
    // per request.
    let (_, trace) = crate::support::count_syscalls(&edge, "openat", async {
        for i in 0..3 {
            s.write_all(format!("GET /data.bin HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.expect("send");
            let (status_line, r) =
                read_response(&mut s, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("request {i}: no whole response"));
            assert_eq!(status_line, "HTTP/1.1 200 OK", "request {i}");
            assert!(r.body == data, "request {i}: {} bytes, not the file's", r.body.len());
        }
    })
    .await;
    let opened = trace.lines().filter(|l| l.contains("data.bin")).count();
    assert_eq!(opened, 0, "the file was opened for a request:\n{trace}");

    // Bytes the kernel sent count as the workspace's egress like any others: seven whole
    // files (two before the traces, one over TLS, three in the second) and the range.
    let want = 7 * 40_000 + 30_000;
    let got = eventually(Duration::from_secs(10), || async {
        let j = edge.api("GET", "/v1/usage", None).await.json();
        let bytes = j["workspaces"].as_array()?.iter().find(|w| w["id"] == "ws_1")?["bytes"].as_u64()?;
        (bytes >= want).then_some(bytes)
    })
    .await;
    assert_eq!(got, Some(want), "ws_1's egress");
}
