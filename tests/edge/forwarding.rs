//! Forwarding as CONTRACT §6: headers, WebSockets, streaming through a reload.

use crate::support::{eventually, ws_echo, Edge};
use crate::Fixture;
use std::time::Duration;

#[tokio::test]
async fn forwarding_headers_are_set_and_credentials_stripped() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let r = edge
        .request(&format!(
            "GET /p?q=1 HTTP/1.1\r\nHost: {host}:8080\r\nAccept: application/json\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Request-Id: client-id_1.2\r\nX-Miosa-Token: mp_secret\r\nX-Miosa-Anything: 1\r\nAuthorization: Bearer app-token\r\nCookie: app=1\r\n"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let h = &j["headers"];
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]), "client-supplied XFF is replaced");
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(h["x-forwarded-host"], serde_json::json!([format!("{host}:8080")]));
    assert_eq!(h["host"], serde_json::json!([format!("{host}:8080")]), "the original Host goes upstream");
    assert_eq!(h["x-request-id"], serde_json::json!(["client-id_1.2"]));
    assert!(h.get("x-miosa-token").is_none() && h.get("x-miosa-anything").is_none(), "{h}");
    assert_eq!(h["authorization"], serde_json::json!(["Bearer app-token"]));
    assert_eq!(h["cookie"], serde_json::json!(["app=1"]));
    assert_eq!(r.header("x-request-id"), Some("client-id_1.2"), "echoed to the client");
    assert_eq!(r.header("x-origin"), Some("a-public"));

    // An invalid request id is replaced by a generated one, echoed both ways.
    let r = edge.request(&format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: bad id!\r\n")).await;
    let sent = r.json()["headers"]["x-request-id"][0].as_str().unwrap_or_default().to_string();
    assert!(sent.len() == 32 && sent.bytes().all(|b| b.is_ascii_hexdigit()), "{sent}");
    assert_eq!(r.header("x-request-id"), Some(sent.as_str()));

    // Hop-by-hop headers, and headers the client nominates in Connection, stay here; so
    // does every standard hop-by-hop field, in any case, nominated or not (the vendored
    // pingora-proxy removes only those a request has: vendor/README.md, pingora-proxy 7).
    let hop_by_hop = [
        ("Keep-Alive: timeout=5\r\nX-Hop-Secret: 1\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nX-Kept: yes\r\nConnection: close, X-Hop-Secret, Upgrade, HTTP2-Settings\r\n",
         &["keep-alive", "x-hop-secret", "te", "proxy-authorization", "upgrade", "http2-settings"][..]),
        ("KEEP-ALIVE: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nproxy-authorization: Basic eA==\r\nTe: trailers\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\nHttp2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nX-Kept: yes\r\nConnection: keep-alive\r\nConnection: close\r\n",
         &["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade", "http2-settings"][..]),
    ];
    for (fields, gone) in hop_by_hop {
        let r = crate::support::raw_request(edge.addr, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n")).await;
        let h = &r.json()["headers"];
        for name in gone {
            assert!(h.get(name).is_none(), "{name} was forwarded: {h}");
        }
        assert_eq!(h["x-kept"], serde_json::json!(["yes"]));
    }

    // POST bodies stream through.
    let body = "x".repeat(100_000);
    let raw = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let r = crate::support::raw_request(edge.addr, &raw).await;
    assert_eq!(r.json()["body_len"], 100_000);
}

/// Header names travel in their canonical case both ways, however the other side wrote
/// them (`x-custom-HEADER` reaches the origin as `X-Custom-Header`, an origin's
/// `x-app-header` the client as `X-App-Header`), as Caddy forwards them (HAProxy and Envoy
/// in lower case) and as the edge already forwarded an HTTP/2 client's: the names as
/// written are not kept in a second header map (vendor/README.md, pingora-core 11).
/// Values and order are kept.
#[tokio::test]
async fn header_names_are_forwarded_in_their_canonical_case() {
    let f = Fixture::start().await;
    // An origin answering each request with its head as it arrived, and fields of its own
    // in odd case.
    let (port, _origin) = crate::support::one_answer_origin("127.0.0.2", |head| {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\nx-app-header: a\r\nCONTENT-type: text/plain\r\nx-Powered-by: b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            head.len()
        )
        .into_bytes();
        a.extend_from_slice(head);
        a
    })
    .await;
    let (edge, _s, host) = edge_in_front_of(&f, "cased", port).await;
    let r = crate::support::raw_request(
        edge.addr,
        &format!(
            "GET / HTTP/1.1\r\nhost: {host}\r\nx-custom-HEADER: 1\r\nACCEPT-language: en\r\nuser-agent: t\r\nX-Multi: 1\r\nx-multi: 2\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", edge.log());
    let seen = String::from_utf8_lossy(&r.body).to_string();
    let lines: Vec<&str> = seen.split("\r\n").collect();
    for line in [
        format!("Host: {host}").as_str(),
        "X-Custom-Header: 1",
        "Accept-Language: en",
        "User-Agent: t",
        "X-Forwarded-For: 127.0.0.1",
        "X-Forwarded-Proto: http",
    ] {
        assert!(lines.contains(&line), "the origin saw no `{line}`:\n{seen}");
    }
    let multi: Vec<&str> = lines.iter().filter(|l| l.to_ascii_lowercase().starts_with("x-multi:")).copied().collect();
    assert_eq!(multi, ["X-Multi: 1", "X-Multi: 2"], "repeated fields keep their order:\n{seen}");
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    for name in ["X-App-Header", "Content-Type", "X-Powered-By", "X-Request-Id"] {
        assert!(names.contains(&name), "the client got no `{name}`: {names:?}");
    }
    assert_eq!(r.header("x-app-header"), Some("a"));
}

#[tokio::test]
async fn websocket_echo_through_the_edge() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let f = Fixture::start().await;
    let (ws_addr, _task) = ws_echo("127.0.0.2").await;
    let extra = format!(
        r#"[[sandboxes]]
id = "wsbox"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{{ port = {}, access = "public" }}]
"#,
        ws_addr.port()
    );
    let edge = Edge::start(&f.toml(&extra)).await;
    // Many handshakes: a fast upstream's 101 racing the end of the pre-upgrade request
    // used to close the connection right after the handshake (vendor/README.md).
    for conn in 0..25 {
        let stream = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
        let url = format!("ws://{}-wsbox.sandbox.localhost/hmr", ws_addr.port());
        let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.expect("websocket handshake through the edge");
        assert_eq!(resp.status(), 101);
        for i in 0..4 {
            ws.send(Message::text(format!("hot-reload {i}"))).await.expect("send");
            let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
            let got = got.expect("frame").unwrap_or_else(|e| panic!("connection {conn}, message {i}: {e}; edge log:\n{}", edge.log()));
            assert_eq!(got.into_text().expect("text").as_str(), format!("hot-reload {i}"));
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo").expect("frame").expect("ok");
        assert_eq!(got.into_data().as_ref(), &[0u8, 1, 2, 255]);
        ws.close(None).await.expect("close");
    }
}

#[tokio::test]
async fn streaming_response_in_flight_survives_a_reload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let ctl = f.a_public.expect_stream();
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    s.write_all(format!("GET /stream HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), ctl.started).await.expect("stream started").expect("started");

    // Swap in a table where this sandbox no longer exists.
    let new = f.toml("").replace("id = \"abc12345\"", "id = \"renamed\"");
    edge.write_config(&new);
    edge.hup();
    let gone = eventually(Duration::from_secs(10), || async {
        let r = edge.get(&host, "/").await;
        (r.status == 404).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the new table was published");

    // The request that started on the old table finishes on it, whole.
    let _ = ctl.release.send(());
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("stream finished").expect("read");
    let r = crate::support::parse_response(&buf);
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(body.starts_with("first-chunk;chunk-0;") && body.ends_with("chunk-99;end"), "{body}");
}

/// HTTP/1.1 pipelining (RFC 9112 §9.3.2): requests written back to back, in one write,
/// are all answered, in order, on the one connection; on TLS too.
#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = crate::Fixture::start().await;
    let (_t, dir) = crate::support::pebble::certs_dir();
    let edge =
        Edge::start_opts("https = \"127.0.0.1:0\"", &[], &format!("{}{}", crate::support::pebble::tls_toml(&dir, false), f.toml(""))).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let req = |path: &str, last: bool| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let two = format!("{}{}", req("/one", false), req("/two", true));
    let three = format!("{}{}{}", req("/a", false), req("/b", false), req("/c", true));
    for (wire, paths) in [(two, vec!["/one", "/two"]), (three, vec!["/a", "/b", "/c"])] {
        // Plain.
        let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
        s.write_all(wire.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("in time").expect("read");
        assert_answers(&buf, &paths);
        // TLS.
        let opts = crate::support::pebble::TlsOpts { sni: Some(host.clone()), ..crate::support::pebble::TlsOpts::default() };
        let (mut t, _) = crate::support::pebble::tls_connect(edge.https(), &opts).await.expect("tls");
        t.write_all(wire.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut buf)).await.expect("in time");
        assert_answers(&buf, &paths);
    }
}

/// `buf` holds one 200 per path, each echoing its path, in order.
fn assert_answers(buf: &[u8], paths: &[&str]) {
    let text = String::from_utf8_lossy(buf);
    let statuses = text.matches("HTTP/1.1 200").count();
    assert_eq!(statuses, paths.len(), "one answer per pipelined request: {text}");
    let mut at = 0;
    for p in paths {
        let needle = format!("\"path\":\"{p}\"");
        let found = text[at..].find(&needle).unwrap_or_else(|| panic!("{p} not answered in order: {text}"));
        at += found + needle.len();
    }
}

/// An HTTP/1.0 origin (Python's `http.server` is one): its answers reach an HTTP/1.1
/// client as HTTP/1.1 (CONTRACT §6), with a body framed so the connection stays usable —
/// by its `Content-Length`, or chunked when the origin ends its body by closing.
///
/// Before, the status line was `HTTP/1.0` whenever the origin sent a `Content-Length`.
#[tokio::test]
async fn http10_origin_answers_http11_clients_in_http11() {
    let f = Fixture::start().await;
    let (port, _origin) = crate::support::one_answer_origin("127.0.0.2", |head| {
        let answer: &[u8] = if head.starts_with(b"GET /len ") {
            b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        } else {
            b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3\r\nContent-Type: text/plain\r\n\r\nended by close"
        };
        answer.to_vec()
    })
    .await;
    let (edge, mut s, host) = edge_in_front_of(&f, "py", port).await;
    for round in 0..2 {
        for (path, body) in [("/len", "hello"), ("/close", "ended by close")] {
            let r = ok_on(&mut s, &edge, &host, path).await;
            assert_eq!(r.text(), body, "round {round}, {path}");
            assert!(r.header("content-length").is_some() || r.header("transfer-encoding") == Some("chunked"), "{path}: {:?}", r.headers);
        }
    }
}

/// An origin answer with both `Transfer-Encoding: chunked` and `Content-Length` is framed
/// by the chunks (RFC 9112 §6.3: the transfer coding overrides the length), and its
/// `Content-Length` does not reach the client beside them, in either order of the fields.
///
/// vendor/README.md, pingora-core 15: the session notes the framing fields while it parses
/// the head; this fails when it misses one (the client then sees `Content-Length: 99`).
#[tokio::test]
async fn an_origin_answer_with_both_framings_goes_on_chunked_without_its_length() {
    let f = Fixture::start().await;
    let (port, _origin) = crate::support::one_answer_origin("127.0.0.2", |head| {
        let fields: &[u8] = if head.starts_with(b"GET /te-first ") {
            b"Transfer-Encoding: chunked\r\nContent-Length: 99\r\n"
        } else {
            b"content-length: 99\r\ntransfer-encoding: chunked\r\n"
        };
        [&b"HTTP/1.1 200 OK\r\n"[..], fields, b"\r\n5\r\nhello\r\n0\r\n\r\n"].concat()
    })
    .await;
    let (edge, mut s, host) = edge_in_front_of(&f, "both", port).await;
    for path in ["/te-first", "/cl-first", "/te-first"] {
        let r = ok_on(&mut s, &edge, &host, path).await;
        assert_eq!(r.text(), "hello", "{path}");
        assert_eq!(r.header("content-length"), None, "{path}: {:?}", r.headers);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{path}: {:?}", r.headers);
    }
}

/// An origin connection is pooled only when its answers allow it: `Connection: close`
/// and an HTTP/1.0 answer without `Connection: keep-alive` end it (RFC 9112 §9.3), even
/// when the origin leaves the socket open; a plain HTTP/1.1 answer keeps it. The origins
/// below serve any number of requests per connection and count their connections.
///
/// vendor/README.md, pingora-core 9: the upstream session keeps only these fields of a
/// head it hands to the proxy; this fails when one of them is not kept (`Connection`: one
/// connection for three `close` answers).
#[tokio::test]
async fn origin_connections_are_reused_only_when_their_answers_allow_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let mut extra = String::new();
    let mut origins = Vec::new();
    for (id, answer) in [
        ("close", &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..]),
        ("old", &b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]),
        ("kept", &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]),
        ("oldkept", &b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"[..]),
    ] {
        let origin = tokio::net::TcpListener::bind(("127.0.0.2", 0)).await.expect("bind");
        let port = origin.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = origin.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if sock.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    }
                });
            }
        });
        extra += &format!("[[sandboxes]]\nid = \"{id}\"\nworkspace = \"ws_1\"\naddress = \"127.0.0.2\"\npreviews = [{{ port = {port}, access = \"public\" }}]\n");
        origins.push((id, port, accepted, task));
    }
    let edge = Edge::start(&f.toml(&extra)).await;
    let mut seen = Vec::new();
    for (id, port, accepted, _task) in &origins {
        let host = format!("{port}-{id}.sandbox.localhost");
        for i in 0..3 {
            let r = edge.get(&host, "/").await;
            assert_eq!((r.status, r.text()), (200, "ok".to_string()), "{id}, request {i}\n{}", edge.log());
        }
        seen.push((*id, accepted.load(Ordering::SeqCst)));
    }
    assert_eq!(seen, [("close", 3), ("old", 3), ("kept", 1), ("oldkept", 1)], "origin connections for three requests each");
}

/// `body_len` bytes of `fill` after a head with its `Content-Length`.
fn answer(body_len: usize, fill: u8) -> Vec<u8> {
    let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n").into_bytes();
    a.extend(std::iter::repeat_n(fill, body_len));
    a
}

/// An edge routing `{port}-{id}.sandbox.localhost` to `127.0.0.2:{port}`, and a client
/// connection to it.
async fn edge_in_front_of(f: &Fixture, id: &str, port: u16) -> (Edge, tokio::net::TcpStream, String) {
    let extra = format!("[[sandboxes]]\nid = \"{id}\"\nworkspace = \"ws_1\"\naddress = \"127.0.0.2\"\npreviews = [{{ port = {port}, access = \"public\" }}]\n");
    let edge = Edge::start(&f.toml(&extra)).await;
    let s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    (edge, s, format!("{port}-{id}.sandbox.localhost"))
}

/// Sends request `i` on `s` and checks its answer: `body_len` bytes of `fill`.
async fn get_on(s: &mut tokio::net::TcpStream, edge: &Edge, host: &str, i: usize, body_len: usize, fill: u8) {
    let r = ok_on(s, edge, host, &format!("/{i}")).await;
    assert!(r.body.len() == body_len && r.body.iter().all(|&b| b == fill), "request {i}: {} bytes", r.body.len());
}

/// Sends `GET {path}` on the kept-open `s` and returns its answer, a 200 in HTTP/1.1.
async fn ok_on(s: &mut tokio::net::TcpStream, edge: &Edge, host: &str, path: &str) -> crate::support::Response {
    use tokio::io::AsyncWriteExt;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{path}: connection closed: {e}"));
    let (status_line, r) = crate::support::read_response(s, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{path}: no whole response on the kept-open connection\n{}", edge.log()));
    assert_eq!(status_line, "HTTP/1.1 200 OK", "{path}: {:?}", r.headers);
    r
}

/// An origin whose response leaves in two writes without `TCP_NODELAY` (or that corks:
/// nginx's `sendfile on; tcp_nopush on`) holds its last small segment until the first is
/// acknowledged (Nagle). The upstream socket, in delayed-ACK mode, acknowledged it only
/// when Linux's delayed-ACK timer fired, 40 ms later, on nearly every such response; the
/// edge acknowledges at once when the rest of a body has to be waited for
/// (vendor/README.md, pingora-core patch 3).
#[tokio::test]
async fn an_origin_waiting_for_an_ack_is_not_held_for_the_delayed_ack_timer() {
    const BODY: usize = 65_536;
    let f = Fixture::start().await;
    // One full segment, then the rest: Nagle keeps the rest until the ACK.
    let (port, _origin) = crate::support::scripted_origin("127.0.0.2", answer(BODY, b'x'), 60_000).await;
    let (edge, mut s, host) = edge_in_front_of(&f, "nagle", port).await;
    let mut held = Vec::new();
    for i in 0..20 {
        let t = std::time::Instant::now();
        get_on(&mut s, &edge, &host, i, BODY, b'x').await;
        // 40 ms is Linux's shortest delayed ACK; a request through the edge takes ~1 ms.
        if t.elapsed() >= Duration::from_millis(40) {
            held.push((i, t.elapsed()));
        }
    }
    // Without the prompt ACK every request after the first few is held (15 of 20 seen);
    // a loaded machine may delay a few for its own reasons.
    assert!(held.len() <= 4, "responses held for the delayed-ACK timer: {held:?}");
}

/// A response head and a body too large for the room left in the edge's 1460-byte write
/// buffer leave in one send, so one TCP segment on loopback where they were two (the
/// head flushed alone, then the body): vendor/README.md, pingora-core patch 2.
#[tokio::test]
async fn a_response_head_and_its_body_leave_in_one_segment() {
    use std::os::fd::AsRawFd;
    const BODY: usize = 4000;
    let f = Fixture::start().await;
    let a = answer(BODY, b'y');
    let (port, _origin) = crate::support::scripted_origin("127.0.0.2", a.clone(), a.len()).await;
    let (edge, mut s, host) = edge_in_front_of(&f, "seg", port).await;
    let data_segments_in =
        |s: &tokio::net::TcpStream| pingora::protocols::l4::ext::get_tcp_info(s.as_raw_fd()).expect("TCP_INFO").tcpi_data_segs_in;
    let mut segments = Vec::new();
    for i in 0..5 {
        let before = data_segments_in(&s);
        get_on(&mut s, &edge, &host, i, BODY, b'y').await;
        segments.push(data_segments_in(&s) - before);
    }
    assert_eq!(segments, vec![1; 5], "data segments per response (head and body apart: 2)");
}

/// A pooled upstream connection is checked against its peer from the address recorded
/// when it was made, not with a `getpeername` system call on every reuse
/// (vendor/README.md, pingora-core patch 1). Counted with strace on the running edge.
#[tokio::test]
async fn reusing_an_upstream_connection_asks_the_kernel_nothing() {
    const BODY: usize = 100;
    let f = Fixture::start().await;
    let a = answer(BODY, b'z');
    let (port, _origin) = crate::support::scripted_origin("127.0.0.2", a.clone(), a.len()).await;
    let (edge, mut s, host) = edge_in_front_of(&f, "reuse", port).await;
    get_on(&mut s, &edge, &host, 0, BODY, b'z').await; // the upstream connection is made
    let (calls, trace) = crate::support::count_syscalls(&edge, "getpeername", async {
        for i in 1..=20 {
            get_on(&mut s, &edge, &host, i, BODY, b'z').await;
        }
    })
    .await;
    // Before: one per request on the reused connection (20); now at most the first
    // reuse, which reads the address into the connection's record.
    assert!(calls <= 1, "{calls} getpeername calls for 20 requests on one pooled connection:\n{trace}");
}
