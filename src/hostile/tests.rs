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

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[test]
fn h2_ping_and_settings_floods_are_cut_acks_and_data_are_not_counted() {
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    assert_eq!(wire.len(), 24);
    wire.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
    for _ in 0..500 {
        wire.extend(frame(0x4, 0x1, &[])); // SETTINGS ACK: free
        wire.extend(frame(0x6, 0x1, &[0; 8])); // PING ACK: free
        wire.extend(frame(0x0, 0, &[6; 300])); // DATA, with a payload that looks like frames
    }
    // Fed in pieces of every size, at one instant: within the budget.
    let mut f = H2Flood::new(0);
    for piece in wire.chunks(7) {
        assert!(f.feed(piece, 0));
    }
    // 99 more PINGs fit the burst of 100 (the SETTINGS took one); the next does not.
    let ping = frame(0x6, 0, &[0; 8]);
    for _ in 0..99 {
        assert!(f.feed(&ping, 0));
    }
    assert!(!f.feed(&ping, 0), "the 101st unanswered control frame at once is a flood");
    // A client pinging at the refill rate is never cut.
    let mut g = H2Flood::new(0);
    assert!(g.feed(&wire[..24], 0));
    for i in 0..2_000u64 {
        assert!(g.feed(&ping, i * 100), "ping {i} at 10/s");
    }
}
