use super::serve::{self, Body, Found, Release};
use super::unpack::{self, Limits, UnpackError};
use pingora::http::RequestHeader;
use std::io::Write;
use std::path::Path;

/// One archive entry: (raw name, kind, contents). Names are written into the header
/// bytes as given, so hostile names (`../x`, `/etc/x`) can be built.
#[derive(Clone, Copy)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
}

/// (name, kind, contents)
type Entry<'a> = (&'a str, Kind, &'a [u8]);

fn tar_gz(entries: &[Entry]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_old();
        let nb = name.as_bytes();
        h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
        h.set_mode(0o644);
        h.set_size(if matches!(kind, Kind::File) { data.len() as u64 } else { 0 });
        h.set_entry_type(match kind {
            Kind::File => tar::EntryType::Regular,
            Kind::Dir => tar::EntryType::Directory,
            Kind::Symlink => tar::EntryType::Symlink,
            Kind::HardLink => tar::EntryType::Link,
            Kind::Char => tar::EntryType::Char,
        });
        if matches!(kind, Kind::Symlink | Kind::HardLink) {
            h.set_link_name("index.html").unwrap();
        }
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        if matches!(kind, Kind::File) {
            tar.extend_from_slice(data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

const LIMITS: Limits = Limits { max_files: 100, max_unpacked_bytes: 1 << 20 };

fn unpack_bytes(dir: &Path, archive: &[u8], limits: Limits) -> Result<std::path::PathBuf, UnpackError> {
    let file = dir.join("a.tar.gz");
    std::fs::write(&file, archive).unwrap();
    let dest = dir.join(unpack::hex(&sha(archive)));
    unpack::verify_and_unpack(&file, &sha(archive), &dest, limits).map(|()| dest)
}

#[test]
fn unpacks_a_good_archive_and_refuses_hostile_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = tar_gz(&[
        ("./", Kind::Dir, b""),
        ("index.html", Kind::File, b"<h1>home</h1>"),
        ("assets/", Kind::Dir, b""),
        ("assets/app-3f9a1c.js", Kind::File, b"console.log(1)"),
    ]);
    let dest = unpack_bytes(dir.path(), &good, LIMITS).unwrap();
    assert_eq!(std::fs::read(dest.join("assets/app-3f9a1c.js")).unwrap(), b"console.log(1)");

    // Tampered: the bytes do not hash to the name.
    let file = dir.path().join("t.tar.gz");
    std::fs::write(&file, &good).unwrap();
    let err = unpack::verify_and_unpack(&file, &[7; 32], &dir.path().join("t"), LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::HashMismatch { .. }), "{err}");
    assert!(!dir.path().join("t").exists());

    let cases: [(&str, Vec<Entry>); 9] = [
        ("climbs", vec![("ok.txt", Kind::File, b"1"), ("../evil", Kind::File, b"x")]),
        ("nested climb", vec![("a/../../evil", Kind::File, b"x")]),
        ("absolute", vec![("/etc/evil", Kind::File, b"x")]),
        ("symlink", vec![("link", Kind::Symlink, b"")]),
        ("hard link", vec![("link", Kind::HardLink, b"")]),
        ("device", vec![("dev", Kind::Char, b"")]),
        ("duplicate", vec![("a", Kind::File, b"1"), ("a", Kind::File, b"2")]),
        ("backslash", vec![("a\\..\\b", Kind::File, b"1")]),
        ("truncated", vec![]),
    ];
    for (what, entries) in cases {
        let mut archive = tar_gz(&entries);
        if what == "truncated" {
            archive = good[..good.len() / 2].to_vec();
        }
        let err = unpack_bytes(dir.path(), &archive, LIMITS).unwrap_err();
        assert!(matches!(err, UnpackError::Entry { .. } | UnpackError::Format(_)), "{what}: {err}");
        assert!(!dir.path().join(unpack::hex(&sha(&archive))).exists(), "{what}: nothing left behind");
        assert!(!dir.path().join("evil").exists() && !dir.path().parent().unwrap().join("evil").exists(), "{what}");
    }
    // No temporary directories are left either.
    let left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.starts_with(".tmp")), "{left:?}");

    // Tar bombs: too many entries, too many bytes.
    let many: Vec<(String, Kind, &[u8])> = (0..101).map(|i| (format!("f{i}"), Kind::File, &b"x"[..])).collect();
    let many: Vec<(&str, Kind, &[u8])> = many.iter().map(|(n, k, d)| (n.as_str(), *k, *d)).collect();
    assert!(matches!(unpack_bytes(dir.path(), &tar_gz(&many), LIMITS), Err(UnpackError::TooManyFiles(100))));
    let big = vec![0u8; 600 << 10];
    let two = tar_gz(&[("a", Kind::File, &big), ("b", Kind::File, &big)]);
    assert!(
        matches!(unpack_bytes(dir.path(), &two, LIMITS), Err(UnpackError::TooLarge(_))),
        "zeros compress well; the limit is on unpacked bytes"
    );
}

fn release(dir: &Path, files: &[(&str, &[u8])], memory: u64) -> Release {
    let root = dir.join(format!("r{}", files.len()));
    for (name, data) in files {
        let p = root.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    Release::load([1; 32], &root, memory).unwrap()
}

fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.insert_header(k.to_string(), v.to_string()).unwrap();
    }
    r
}

fn header<'p>(p: &'p serve::Plan, name: &str) -> Option<&'p str> {
    p.headers.iter().find(|(n, _)| n.as_str() == name).and_then(|(_, v)| v.to_str().ok())
}

fn body(p: &serve::Plan) -> Vec<u8> {
    match &p.body {
        Body::None => Vec::new(),
        Body::Memory(b) => b.to_vec(),
        Body::File { path, offset, len, copy, open } => {
            let on_disk = std::fs::read(path).unwrap()[*offset as usize..(*offset + *len) as usize].to_vec();
            if let Some(copy) = copy {
                assert_eq!(copy.as_ref(), on_disk.as_slice(), "the memory copy is the file's bytes");
            }
            if let Some(f) = open {
                let mut b = vec![0; *len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&*f.0, &mut b, *offset).unwrap();
                assert!(b == on_disk, "the file kept open is the path's");
            }
            on_disk
        }
    }
}

fn get(r: &Release, prev: Option<&Release>, path: &str, headers: &[(&str, &str)], spa: bool) -> serve::Plan {
    let rq = req(path, headers);
    let html = headers.iter().any(|(k, v)| *k == "accept" && v.contains("text/html"));
    let decoded = serve::decode_path(path).expect("valid path");
    serve::plan(&rq, &serve::resolve(r, prev, &decoded, html, spa))
}

#[test]
fn serving_rules() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let r = release(
        dir.path(),
        &[
            ("/index.html", b"<h1>home</h1>"),
            ("/docs/index.html", b"docs"),
            ("/about.html", b"about"),
            ("/404.html", b"not here"),
            ("/assets/app-3f9a1c.js", b"console.log('app')"),
            ("/assets/app-3f9a1c.js.br", b"BROTLI"),
            ("/assets/app-3f9a1c.js.gz", b"GZIP"),
            ("/robots.txt", b"User-agent: *"),
            ("/big.bin", &big),
            ("/.well-known/security.txt", b"contact"),
        ],
        64 << 10,
    );
    let html = [("accept", "text/html,*/*")];

    let p = get(&r, None, "/", &[], false);
    assert_eq!((p.status, body(&p)), (200, b"<h1>home</h1>".to_vec()));
    assert_eq!(header(&p, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&p, "cache-control"), Some("no-cache"), "HTML revalidates");
    assert_eq!(body(&get(&r, None, "/docs/", &[], false)), b"docs");
    assert_eq!(body(&get(&r, None, "/docs", &[], false)), b"docs");
    assert_eq!(body(&get(&r, None, "/about", &[], false)), b"about", "clean URLs");

    // Fingerprinted assets are immutable; others revalidate.
    let p = get(&r, None, "/assets/app-3f9a1c.js", &[], false);
    assert_eq!(header(&p, "cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(header(&p, "content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(header(&get(&r, None, "/robots.txt", &[], false), "cache-control"), Some("public, max-age=0, must-revalidate"));

    // Precompressed siblings by Accept-Encoding, with Vary and their own ETag.
    let plain = get(&r, None, "/assets/app-3f9a1c.js", &[], false);
    let br = get(&r, None, "/assets/app-3f9a1c.js", &[("accept-encoding", "gzip, deflate, br")], false);
    let gz = get(&r, None, "/assets/app-3f9a1c.js", &[("accept-encoding", "gzip")], false);
    let no_br = get(&r, None, "/assets/app-3f9a1c.js", &[("accept-encoding", "br;q=0, gzip")], false);
    assert_eq!((body(&br), header(&br, "content-encoding")), (b"BROTLI".to_vec(), Some("br")));
    assert_eq!((body(&gz), header(&gz, "content-encoding")), (b"GZIP".to_vec(), Some("gzip")));
    assert_eq!(header(&no_br, "content-encoding"), Some("gzip"), "q=0 refuses a coding");
    assert_eq!(header(&plain, "content-encoding"), None);
    for p in [&plain, &br, &gz] {
        assert_eq!(header(p, "vary"), Some("Accept-Encoding"));
        assert_eq!(header(p, "content-type"), Some("text/javascript; charset=utf-8"));
    }
    assert_ne!(header(&plain, "etag"), header(&br, "etag"));
    assert!(header(&get(&r, None, "/robots.txt", &[], false), "vary").is_none());

    // ETag and If-None-Match.
    let etag = header(&plain, "etag").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
    let p = get(&r, None, "/assets/app-3f9a1c.js", &[("if-none-match", &format!("\"x\", W/{etag}"))], false);
    assert_eq!((p.status, p.body == Body::None), (304, true));
    assert_eq!(header(&p, "etag"), Some(etag.as_str()));
    assert_eq!(get(&r, None, "/assets/app-3f9a1c.js", &[("if-none-match", "\"other\"")], false).status, 200);

    // Ranges: memory and disk bodies.
    let p = get(&r, None, "/robots.txt", &[("range", "bytes=0-9")], false);
    assert_eq!((p.status, body(&p), header(&p, "content-range")), (206, b"User-agent".to_vec(), Some("bytes 0-9/13")));
    let p = get(&r, None, "/big.bin", &[("range", "bytes=-5")], false);
    assert!(matches!(p.body, Body::File { .. }), "large files stream from disk");
    assert_eq!((p.status, body(&p)), (206, big[big.len() - 5..].to_vec()));
    let p = get(&r, None, "/big.bin", &[("range", "bytes=299990-")], false);
    assert_eq!((body(&p), header(&p, "content-range")), (big[299_990..].to_vec(), Some("bytes 299990-299999/300000")));
    let p = get(&r, None, "/big.bin", &[("range", "bytes=300000-")], false);
    assert_eq!((p.status, header(&p, "content-range")), (416, Some("bytes */300000")));
    let p = get(&r, None, "/big.bin", &[("range", "bytes=0-1,5-6")], false);
    assert_eq!((p.status, body(&p).len()), (200, 300_000), "several ranges: the whole file");
    let p = get(&r, None, "/big.bin", &[("range", "bytes=0-1"), ("if-range", "\"stale\"")], false);
    assert_eq!(p.status, 200, "If-Range with another validator: the whole file");
    assert_eq!(get(&r, None, "/big.bin", &[], false).status, 200);

    // Misses: SPA fallback for HTML requests only, never under /.well-known/; 404.html otherwise.
    let p = get(&r, None, "/app/route", &html, true);
    assert_eq!((p.status, body(&p)), (200, b"<h1>home</h1>".to_vec()));
    let p = get(&r, None, "/app/data.json", &[("accept", "application/json")], true);
    assert_eq!((p.status, body(&p)), (404, b"not here".to_vec()));
    let p = get(&r, None, "/.well-known/missing", &html, true);
    assert_eq!(p.status, 404);
    assert_eq!(body(&get(&r, None, "/.well-known/security.txt", &[], true)), b"contact");
    let p = get(&r, None, "/app/route", &html, false);
    assert_eq!((p.status, body(&p)), (404, b"not here".to_vec()), "without spa, the release's 404.html");
    assert!(header(&p, "etag").is_none());

    // Skew protection: a fingerprinted asset of the previous release, nothing else.
    let new = release(dir.path(), &[("/index.html", b"v2"), ("/assets/app-77aa00.js", b"v2 app")], 64 << 10);
    let p = get(&new, Some(&r), "/assets/app-3f9a1c.js", &[], false);
    assert_eq!((p.status, body(&p)), (200, b"console.log('app')".to_vec()));
    assert!(matches!(serve::resolve(&new, Some(&r), "/about.html", false, false), Found::Missing), "only fingerprinted assets");
    assert!(matches!(serve::resolve(&new, None, "/assets/app-3f9a1c.js", false, false), Found::Missing));

    // Paths that cannot be served.
    for bad in ["/../etc/passwd", "/a/%2e%2e/b", "/%zz", "/a%00b", "relative", "/a%5c..%5cb"] {
        assert_eq!(serve::decode_path(bad), None, "{bad}");
    }
    assert_eq!(serve::decode_path("/caf%C3%A9.html").as_deref(), Some("/café.html"));
}

#[test]
fn fingerprints_and_types() {
    for yes in [
        "/assets/app-3f9a1c.js",
        "/index.BxP3k9aZ.css",
        "/static/js/main.3f9a1c2b.chunk.js",
        "/_next/static/chunks/pages/app-0c7f8e0d9a1b2c3d.js",
    ] {
        assert!(serve::fingerprinted(yes), "{yes}");
    }
    for no in ["/app.js", "/polyfill-legacy.js", "/logo-v2.png", "/index.html", "/README", "/a-123456.js"] {
        assert!(!serve::fingerprinted(no), "{no}");
    }
    assert_eq!(serve::content_type("/x.WASM"), "application/wasm");
    assert_eq!(serve::content_type("/x"), "application/octet-stream");
}

#[test]
fn files_the_kernel_sends_are_kept_open_within_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mid: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
    let big = vec![7u8; 200_000];
    let r = release(dir.path(), &[("/mid.bin", &mid), ("/small.txt", b"tiny"), ("/big.bin", &big)], 100_000);
    let p = get(&r, None, "/mid.bin", &[], false);
    assert!(matches!(&p.body, Body::File { open: Some(_), copy: Some(_), .. }), "kept in memory and sent by the kernel: open");
    assert!(body(&p) == mid);
    let p = get(&r, None, "/mid.bin", &[("range", "bytes=100-30099")], false);
    assert!(matches!(&p.body, Body::File { open: Some(_), .. }), "a range of it too");
    assert!(body(&p) == mid[100..30_100]);
    assert!(matches!(get(&r, None, "/small.txt", &[], false).body, Body::Memory(_)));
    let p = get(&r, None, "/big.bin", &[], false);
    assert!(matches!(&p.body, Body::File { open: None, copy: None, .. }), "streamed from disk, opened per request");

    // The budget: an eighth of the open files limit, at most KEPT_OPEN_MAX.
    assert_eq!(
        [1024, 100, 0, 1 << 20].map(serve::kept_open_budget),
        [128, 12, 0, serve::KEPT_OPEN_MAX],
        "under limits of 1024, 100, 0 and 1M open files"
    );

    // Many such files: no more than the budget, all releases together; a dropped
    // release gives its descriptors back. (Other tests may hold a few meanwhile.)
    let page = vec![1u8; 16 << 10];
    let max = serve::kept_open_limit();
    let names: Vec<String> = (0..max + 40).map(|i| format!("/p{i}.bin")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), page.as_slice())).collect();
    let kept = |r: &Release| names.iter().filter(|n| matches!(get(r, None, n, &[], false).body, Body::File { open: Some(_), .. })).count();
    let many = release(&dir.path().join("a"), &files, 64 << 20);
    let again = release(&dir.path().join("b"), &files, 64 << 20);
    let (a, b) = (kept(&many), kept(&again));
    assert!(a + b <= max && a >= max.saturating_sub(16), "{a} + {b} kept open, budget {max}");
    assert!(serve::kept_open() >= a + b);
    drop((many, again));
    let third = release(&dir.path().join("c"), &files, 64 << 20);
    assert!(kept(&third) >= max.saturating_sub(16), "the budget came back: {}", kept(&third));
    for n in &names[..3] {
        assert!(body(&get(&third, None, n, &[], false)) == page, "{n}");
    }
}
