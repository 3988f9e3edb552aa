//! Unit tests of the request screen and the per-IP count.

use super::*;

fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, target.as_bytes(), None).expect("request");
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).expect("header");
    }
    r
}

fn check(r: &RequestHeader, raw: &str) -> Option<&'static str> {
    screen(r, || Some(raw.as_bytes())).map(ErrorCode::as_str)
}

#[test]
fn plain_requests_pass() {
    let r = req("GET", "/a/b?c=%00&d=1", &[("host", "x.test"), ("content-length", "12")]);
    assert_eq!(check(&r, ""), None);
    let r = req("POST", "/", &[("host", "x.test"), ("transfer-encoding", "Chunked")]);
    assert_eq!(check(&r, "POST / HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: Chunked\r\n\r\n"), None);
    assert_eq!(check(&req("OPTIONS", "*", &[]), ""), None);
    assert_eq!(check(&req("GET", "http://x.test/a", &[]), ""), None);
    assert_eq!(check(&req("GET", &format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1)), &[]), ""), None);
}

#[test]
fn framing_smuggling_shapes_are_refused() {
    let te = [("transfer-encoding", "chunked")];
    // pingora removed Content-Length from the parsed head: only the raw one shows it.
    let raw = "POST / HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(check(&req("POST", "/", &te), raw), Some("bad_request"));
    let raw = "POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nContent-Length: 4\n\n";
    assert_eq!(check(&req("POST", "/", &te), raw), Some("bad_request"));
    assert_eq!(check(&req("POST", "/", &[("transfer-encoding", "chunked"), ("content-length", "4")]), ""), Some("bad_request"));
    // A field merely mentioning the name is not a Content-Length field.
    let raw = "POST / HTTP/1.1\r\nX-Content-Length: 4\r\nX: content-length: 4\r\n\r\n";
    assert_eq!(check(&req("POST", "/", &te), raw), None);
    for (k, v) in [("transfer-encoding", "gzip, chunked"), ("transfer-encoding", "chunked, chunked")] {
        assert_eq!(check(&req("POST", "/", &[(k, v)]), ""), Some("bad_request"), "{v}");
    }
    assert_eq!(check(&req("POST", "/", &[te[0], te[0]]), ""), Some("bad_request"));
    for v in ["4, 4", "+4", "", " 4", "0x4"] {
        assert_eq!(check(&req("POST", "/", &[("content-length", v)]), ""), Some("bad_request"), "{v:?}");
    }
    assert_eq!(check(&req("POST", "/", &[("content-length", "4"), ("content-length", "4")]), ""), Some("bad_request"));
}

#[test]
fn sizes() {
    let long = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
    assert_eq!(check(&req("GET", &long, &[]), ""), Some("uri_too_long"));
    let many: Vec<(String, &str)> = (0..=MAX_HEADERS).map(|i| (format!("x-h{i}"), "a")).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(check(&req("GET", "/", &many), ""), Some("request_header_too_large"));
    assert_eq!(check(&req("GET", "/", &many[..MAX_HEADERS]), ""), None);
    let big = "a".repeat(MAX_HEADER_BYTES);
    assert_eq!(check(&req("GET", "/", &[("x-big", big.as_str())]), ""), Some("request_header_too_large"));
}

#[test]
fn targets() {
    assert_eq!(check(&req("GET", "*", &[]), ""), Some("bad_request"));
    assert_eq!(check(&req("GET", "/a%00b", &[]), ""), Some("bad_request"));
    assert_eq!(check(&req("GET", "/a%2500b", &[]), ""), None);
    assert_eq!(check(&req("GET", "ftp://x.test/a", &[]), ""), Some("bad_request"));
    assert_eq!(check(&req("GET", "HTTPS://x.test/a", &[]), ""), None);
    for t in ["a", "http:/x", "*a", "x://y/", "javascript:alert(1)"] {
        assert_eq!(check(&req("GET", t, &[]), ""), Some("bad_request"), "{t}");
    }
}

#[test]
fn per_ip_counts_and_gives_back() {
    let p = PerIp::new(2);
    let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
    let one = p.admit(a).expect("first");
    let two = p.admit(a).expect("second");
    assert!(p.admit(a).is_none(), "over the cap");
    let other = p.admit(b).expect("another IP");
    drop(one);
    let three = p.admit(a).expect("a place was given back");
    drop((two, three, other));
    assert!(p.live.is_empty(), "entries are removed at zero");
}
