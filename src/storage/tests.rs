use super::plan::{self, Ask, ByteRange};
use super::*;
use http::header;
use object_store::{Attribute, Attributes};

fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, b"/k", None).expect("request");
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).expect("header");
    }
    r
}

/// Metadata of an object last modified at Unix second `modified` (chrono's type, built
/// from its default, the epoch, so the crate needs no chrono dependency).
fn meta(etag: Option<&str>, modified: u64, size: u64) -> ObjectMeta {
    let epoch: ObjectMeta = ObjectMeta {
        location: object_store::path::Path::from("k"),
        last_modified: Default::default(),
        size,
        e_tag: etag.map(str::to_owned),
        version: None,
    };
    ObjectMeta { last_modified: epoch.last_modified + Duration::from_secs(modified), ..epoch }
}

fn attrs(pairs: &[(Attribute, &str)]) -> Attributes {
    let mut a = Attributes::new();
    for (k, v) in pairs {
        a.insert(k.clone(), v.to_string().into());
    }
    a
}

fn get<'h>(headers: &'h [(HeaderName, HeaderValue)], name: &HeaderName) -> Option<&'h str> {
    headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.to_str().ok())
}

#[test]
fn key_of_decodes_once_and_refuses_what_path_cannot_express() {
    assert_eq!(key_of(b"/a/b.png").as_deref(), Some("a/b.png"));
    assert_eq!(key_of(b"/%2541").as_deref(), Some("%41"), "decoded exactly once");
    assert_eq!(key_of(b"/a%2Fb").as_deref(), Some("a/b"));
    assert_eq!(key_of(b"/a%20b/%C3%BC.txt?x=1&y").as_deref(), Some("a b/ü.txt"), "query dropped");
    assert_eq!(key_of(b"/a+b~c").as_deref(), Some("a+b~c"));
    for bad in [
        &b""[..],
        b"/",
        b"/?x",
        b"a/b",
        b"/..",
        b"/a/../b",
        b"/a/%2E%2E/b",
        b"/./a",
        b"/a//b",
        b"//a",
        b"/a/",
        b"/a%2F",
        b"/%zz",
        b"/a%4",
        b"/%FF",
        b"/a%00b",
        b"/a%0Ab",
    ] {
        assert_eq!(key_of(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
    let long = format!("/{}", "k".repeat(1025));
    assert_eq!(key_of(long.as_bytes()), None);
    assert!(key_of(format!("/{}", "k".repeat(1024)).as_bytes()).is_some());
}

#[test]
fn one_range_is_parsed_several_or_malformed_are_ignored() {
    let range = |v: &str| Ask::of(&req("GET", &[("range", v)])).range;
    assert_eq!(range("bytes=0-9"), Some(ByteRange::FromTo(0, 9)));
    assert_eq!(range("Bytes= 5 - "), Some(ByteRange::From(5)));
    assert_eq!(range("bytes=-3"), Some(ByteRange::Last(3)));
    for v in ["bytes=0-1,3-4", "bytes=5-2", "bytes=-", "bytes=a-b", "items=0-1", "bytes=0-99999999999999999999", "bytes=1"] {
        assert_eq!(range(v), None, "{v}");
    }
    assert_eq!(Ask::of(&req("HEAD", &[("range", "bytes=0-1")])).range, None, "HEAD ignores Range");
    assert_eq!(ByteRange::FromTo(2, u64::MAX).to_get_range(), object_store::GetRange::Offset(2));
    assert_eq!(ByteRange::FromTo(2, 4).to_get_range(), object_store::GetRange::Bounded(2..5));
    assert!(ByteRange::From(9).satisfiable(10) && !ByteRange::From(10).satisfiable(10));
    assert!(!ByteRange::Last(0).satisfiable(10) && !ByteRange::Last(5).satisfiable(0) && ByteRange::Last(50).satisfiable(1));
}

#[test]
fn if_none_match_wins_over_if_modified_since() {
    let m = meta(Some("\"abc\""), 1_700_000_000, 10);
    let ask = |h: &[(&str, &str)]| Ask::of(&req("GET", h));
    assert!(ask(&[("if-none-match", "\"abc\"")]).not_modified(&m));
    assert!(ask(&[("if-none-match", "W/\"abc\"")]).not_modified(&m), "weak comparison");
    assert!(ask(&[("if-none-match", "\"x,y\", \"abc\"")]).not_modified(&m), "a comma inside a tag");
    assert!(ask(&[("if-none-match", "\"zz\""), ("if-none-match", "*")]).not_modified(&m));
    assert!(!ask(&[("if-none-match", "\"abd\"")]).not_modified(&m));
    assert!(!ask(&[("if-none-match", "abc")]).not_modified(&m), "unquoted: malformed");
    let date = "Tue, 14 Nov 2023 22:13:20 GMT"; // 1_700_000_000
    assert!(ask(&[("if-modified-since", date)]).not_modified(&m));
    assert!(!ask(&[("if-modified-since", "Tue, 14 Nov 2023 22:13:19 GMT")]).not_modified(&m));
    assert!(!ask(&[("if-modified-since", "yesterday")]).is_conditional());
    assert!(!ask(&[("if-none-match", "\"old\""), ("if-modified-since", date)]).not_modified(&m), "If-None-Match decides alone");
}

#[test]
fn if_range_needs_the_same_strong_etag_or_date() {
    let m = meta(Some("\"abc\""), 1_700_000_000, 10);
    let holds = |v: &str| Ask::of(&req("GET", &[("range", "bytes=0-1"), ("if-range", v)])).if_range_holds(&m);
    assert!(holds("\"abc\""));
    assert!(!holds("\"abd\"") && !holds("W/\"abc\"") && !holds("garbage"));
    assert!(holds("Tue, 14 Nov 2023 22:13:20 GMT") && !holds("Tue, 14 Nov 2023 22:13:21 GMT"));
    assert!(Ask::of(&req("GET", &[])).if_range_holds(&m));
}

#[test]
fn publicity_is_the_bucket_or_the_metadata() {
    let flag = |v: &str| attrs(&[(Attribute::Metadata(PUBLIC_METADATA.into()), v)]);
    assert!(plan::is_public(true, &Attributes::new()));
    assert!(!plan::is_public(false, &Attributes::new()));
    assert!(plan::is_public(false, &flag("TRUE")) && plan::is_public(false, &flag("true")));
    assert!(!plan::is_public(false, &flag("yes")) && !plan::is_public(false, &flag("false")));
    assert!(!plan::is_public(false, &attrs(&[(Attribute::Metadata("public".into()), "true")])));
}

#[test]
fn scriptable_types_are_sandboxed() {
    for t in ["text/html", "TEXT/HTML; charset=utf-8", "image/svg+xml", "application/xhtml+xml", "text/xml", "application/rss+xml "] {
        assert!(plan::scriptable(t.as_bytes()), "{t}");
    }
    for t in ["image/png", "text/plain", "application/json", "text/htmlx", ""] {
        assert!(!plan::scriptable(t.as_bytes()), "{t}");
    }
}

#[test]
fn object_headers_pass_the_objects_own_and_drop_invalid_values() {
    let m = meta(Some("\"e1\""), 784_111_777, 5);
    let a = attrs(&[
        (Attribute::ContentType, "text/html; charset=utf-8"),
        (Attribute::CacheControl, "no-cache"),
        (Attribute::ContentDisposition, "attachment\r\nSet-Cookie: a=b"),
        (Attribute::ContentLanguage, "fr"),
    ]);
    let h = plan::object_headers(&m, &a);
    assert_eq!(get(&h, &header::CONTENT_TYPE), Some("text/html; charset=utf-8"));
    assert_eq!(get(&h, &header::CONTENT_SECURITY_POLICY), Some("sandbox"));
    assert_eq!(get(&h, &header::ETAG), Some("\"e1\""));
    assert_eq!(get(&h, &header::LAST_MODIFIED), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
    assert_eq!(get(&h, &header::CACHE_CONTROL), Some("no-cache"));
    assert_eq!(get(&h, &header::ACCEPT_RANGES), Some("bytes"));
    assert_eq!(get(&h, &header::X_CONTENT_TYPE_OPTIONS), Some("nosniff"));
    assert_eq!(get(&h, &header::CONTENT_LANGUAGE), Some("fr"));
    assert_eq!(get(&h, &header::CONTENT_DISPOSITION), None, "an invalid value is dropped");
    assert!(h.iter().all(|(n, _)| *n != header::SET_COOKIE && *n != header::CONTENT_LENGTH));

    let h = plan::object_headers(&meta(None, 0, 5), &Attributes::new());
    assert_eq!(get(&h, &header::CONTENT_TYPE), Some("application/octet-stream"));
    assert_eq!(get(&h, &header::CACHE_CONTROL), Some(DEFAULT_CACHE_CONTROL));
    assert_eq!(get(&h, &header::CONTENT_SECURITY_POLICY), None);
    assert_eq!(get(&h, &header::ETAG), None);
    assert_eq!(get(&h, &header::LAST_MODIFIED), None, "no date from the store: none, not the epoch");

    let h = plan::not_modified_headers(&m, &a);
    assert_eq!(get(&h, &header::CONTENT_TYPE), None);
    assert!(get(&h, &header::ETAG).is_some() && get(&h, &header::LAST_MODIFIED).is_some() && get(&h, &header::CACHE_CONTROL).is_some());
    assert_eq!(get(&plan::unsatisfiable_headers(7), &header::CONTENT_RANGE), Some("bytes */7"));
    assert_eq!(plan::content_range(&(2..5), 9).as_ref().and_then(|v| v.to_str().ok()), Some("bytes 2-4/9"));
}

fn settings(endpoint: &str) -> StorageSettings {
    StorageSettings {
        endpoint: endpoint.into(),
        region: "us-east-1".into(),
        key_id: "AKIDEXAMPLE".into(),
        key_secret: "very-secret-value".into(),
        first_byte_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
    }
}

#[test]
fn new_checks_the_endpoint_and_debug_hides_the_credentials() {
    for ok in ["http://127.0.0.1:9000", "https://storage.example", "https://s.example:443/", "http://[::1]:9000"] {
        assert!(Storage::new(settings(ok)).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "127.0.0.1:9000",
        "ftp://s.example",
        "http://s.example:0",
        "http://s.example:99999",
        "http://s.example:",
        "http://u:p@s.example",
        "http://s.example/base",
        "http://s.example?x",
    ] {
        assert!(Storage::new(settings(bad)).is_err(), "{bad}");
    }
    assert!(Storage::new(StorageSettings { key_secret: String::new(), ..settings("http://s.example") }).is_err());
    assert!(Storage::new(StorageSettings { region: " ".into(), ..settings("http://s.example") }).is_err());
    assert!(Storage::new(StorageSettings { idle_timeout: Duration::ZERO, ..settings("http://s.example") }).is_err());
    let s = Storage::new(settings("http://127.0.0.1:9000/")).expect("storage");
    let shown = format!("{s:?} {:?}", settings("http://x"));
    assert!(!shown.contains("very-secret-value") && !shown.contains("AKIDEXAMPLE"), "{shown}");
    assert!(shown.contains("http://127.0.0.1:9000\""), "trailing / trimmed: {shown}");
}

#[test]
fn bucket_clients_are_cached_bounded_and_checked() {
    let s = Storage::new(settings("http://127.0.0.1:9000")).expect("storage");
    assert!(s.store("bucket-a").is_ok() && s.store("bucket-a").is_ok());
    assert_eq!(s.stores.len(), 1);
    for bad in ["", "..", ".x", "a/b", "a?b", "a b"] {
        assert!(matches!(s.store(bad), Err(StorageError::Unavailable(_))), "{bad:?}");
    }
    for i in 0..MAX_BUCKETS + 1 {
        s.store(&format!("b{i}")).expect("bucket");
    }
    assert!(s.stores.len() <= MAX_BUCKETS);
}

#[test]
fn error_messages_never_hold_the_credentials() {
    let r = Redactor { secrets: ["very-secret-value".into(), "AKIDEXAMPLE".into()] };
    let e = std::io::Error::other("denied for AKIDEXAMPLE with very-secret-value");
    let m = r.message(&e);
    assert!(!m.contains("AKIDEXAMPLE") && !m.contains("very-secret-value") && m.contains("<redacted>"), "{m}");
    let long = std::io::Error::other("é".repeat(MAX_MESSAGE));
    assert!(r.message(&long).len() <= MAX_MESSAGE + '…'.len_utf8());
}
