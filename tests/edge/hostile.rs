//! Bad input from clients: malformed, missing, odd or internal Host values.

use crate::support::{Edge, Origin};
use crate::Fixture;

#[tokio::test]
async fn host_normalisation_and_malformed_hosts() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let pa = f.pa();

    // Upper case, port, trailing dot: all the same host.
    for host in [
        format!("{pa}-ABC12345.Sandbox.LOCALHOST"),
        format!("{pa}-abc12345.sandbox.localhost.:9999"),
        format!("{pa}-abc12345.sandbox.localhost."),
    ] {
        let r = edge.get(&host, "/").await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(r.json()["origin"], "a-public");
    }

    // Missing Host, empty Host, two Host headers, junk: 400 invalid_host, never a crash.
    for head in [
        "GET / HTTP/1.1\r\nAccept: application/json\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost:\r\nAccept: application/json\r\n".to_string(),
        format!("GET / HTTP/1.1\r\nHost: {pa}-abc12345.sandbox.localhost\r\nHost: example.org\r\nAccept: application/json\r\n"),
        "GET / HTTP/1.1\r\nHost: exa mple.org\r\nAccept: application/json\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: user@example.org\r\nAccept: application/json\r\n".to_string(),
        format!("GET / HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n", "a".repeat(400)),
        "GET / HTTP/1.1\r\nHost: example.org:99999999\r\nAccept: application/json\r\n".to_string(),
    ] {
        let r = edge.request(&head).await;
        assert_eq!(r.status, 400, "{head:?}: {}", r.text());
        if r.header("content-type") == Some("application/json") {
            assert_eq!(r.code(), "invalid_host");
        }
    }

    // IDN in punycode is a host like any other (unknown here).
    let r = edge.get("xn--bcher-kva.example", "/").await;
    assert_eq!((r.status, r.code()), (404, "unknown_host".into()));
    // Raw UTF-8 is not a valid Host.
    let r = edge.request("GET / HTTP/1.1\r\nHost: bücher.example\r\nAccept: application/json\r\n").await;
    assert_eq!(r.status, 400);

    // The edge is not an open proxy: hosts naming IPs, internal names or absolute-form
    // targets never make it connect anywhere outside its routing state.
    let internal = Origin::start("internal", "127.0.0.5").await;
    for head in [
        format!("GET / HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n", internal.addr),
        format!("GET http://{}/ HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n", internal.addr, internal.addr),
        format!("GET http://{}/ HTTP/1.1\r\nHost: {pa}-abc12345.sandbox.localhost\r\nAccept: application/json\r\n", internal.addr),
        "GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: [::1]:22\r\nAccept: application/json\r\n".to_string(),
        "CONNECT 127.0.0.5:22 HTTP/1.1\r\nHost: 127.0.0.5:22\r\nAccept: application/json\r\n".to_string(),
    ] {
        let r = edge.request(&head).await;
        assert!(r.status == 404 || r.status == 400 || r.status == 405, "{head:?}: {} {}", r.status, r.text());
        assert!(r.header("x-origin").is_none(), "{head:?} reached an origin");
    }
}

#[tokio::test]
async fn garbage_on_the_wire_does_not_take_the_edge_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    for junk in [
        &b"\x00\x01\x02\x03garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
        let _ = s.write_all(junk).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        if !buf.is_empty() {
            assert!(buf.starts_with(b"HTTP/1.1 4"), "{:?} → {:?}", junk, String::from_utf8_lossy(&buf));
        }
    }
    // Still serving.
    let r = edge.get(&format!("{}-abc12345.sandbox.localhost", f.pa()), "/").await;
    assert_eq!(r.status, 200);
}
