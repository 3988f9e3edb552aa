//! Host lookup allocates nothing (DESIGN.md hot-path rule), and what pingora allocates per
//! request, checked with a counting allocator on this thread.

use miosa_edge::routing::{normalize_host, Route, RouteTable};
use miosa_edge::schema::State;
use miosa_edge::schema::{Domains, PlatformBranding};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    /// Allocations of at least `LARGE_BYTES` bytes.
    static LARGE: Cell<usize> = const { Cell::new(0) };
}

const LARGE_BYTES: usize = 8 * 1024;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        if l.size() >= LARGE_BYTES {
            let _ = LARGE.try_with(|c| c.set(c.get() + 1));
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn lookup_is_allocation_free() {
    let state: State = toml::from_str(
        r#"
[[workspaces]]
id = "ws_1"
slug = "one"
preview_domain = { host = "preview.tenant.test", verified = true }
deploy_domain = { host = "apps.tenant.test", verified = true }
[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "10.0.0.1"
previews = [{ port = 5173 }]
[[deployments]]
id = "d"
workspace = "ws_1"
name = "app"
domains = [{ host = "app.customer.test", verified = true }]
active_version = "v"
versions = [{ id = "v", release = { kind = "dynamic", instances = ["10.0.0.2:80"] } }]
[[buckets]]
id = "b"
workspace = "ws_1"
bucket = "proj_1-uploads"
alias = "proj"
domains = [{ host = "files.customer.test", verified = true }]
"#,
    )
    .expect("state");
    let t = RouteTable::build(&Domains::default(), &PlatformBranding::default(), &state, 1).expect("table");
    let hosts: [&[u8]; 11] = [
        b"5173-abc12345.sandbox.localhost:8080",
        b"5173-ABC12345.sandbox.localhost.",
        b"app.one.apps.localhost",
        b"app.customer.test",
        b"5173-abc12345.preview.tenant.test",
        b"app.apps.tenant.test",
        b"nothing.example",
        b"9-nobody.sandbox.localhost",
        b"proj.storage.localhost",
        b"files.customer.test",
        b"storage.localhost",
    ];
    let mut kinds = 0usize;
    let before = ALLOCS.with(|c| c.get());
    for h in hosts {
        let mut buf = [0u8; 256];
        let host = normalize_host(h, &mut buf).expect("valid host");
        kinds += match t.lookup(host) {
            Route::Preview { .. } => 1,
            Route::Deployment { .. } => 10,
            Route::Denied { .. } => 100,
            Route::Bucket { .. } => 1000,
            Route::StorageEndpoint => 10000,
        };
    }
    let after = ALLOCS.with(|c| c.get());
    assert_eq!(kinds, 3 + 30 + 200 + 2000 + 10000, "each host classified as expected");
    assert_eq!(after - before, 0, "host lookup allocated");
}

/// vendor/README.md, pingora-http 8: a name given as a `HeaderName` is not parsed (and,
/// for a name outside the standard ones, copied) again on insert.
#[test]
fn header_names_given_as_such_are_not_parsed_again() {
    let value = http::HeaderValue::from_static("v");
    let mut resp = pingora::http::ResponseHeader::build(200, Some(8)).expect("head");
    let custom = http::HeaderName::from_static("x-edge-test");
    let count = |f: &mut dyn FnMut()| {
        let before = ALLOCS.with(|c| c.get());
        f();
        ALLOCS.with(|c| c.get()) - before
    };
    let standard = count(&mut || resp.insert_header(http::header::CACHE_CONTROL, value.clone()).expect("insert"));
    let other = count(&mut || resp.insert_header(custom.clone(), value.clone()).expect("insert"));
    // The one left: the written form of a name outside the standard ones, for the map of
    // names as written (the `http` crate does not lend a name's bytes).
    assert_eq!((standard, other), (0, 1), "allocations for a standard name, another name");
    let mut wire = Vec::new();
    resp.header_to_h1_wire(&mut wire);
    assert_eq!(String::from_utf8_lossy(&wire), "Cache-Control: v\r\nx-edge-test: v\r\n");

    // pingora-http 10: a head that keeps no names as written (every parsed HTTP/1 head,
    // pingora-core 11) builds no written form only to drop it: nothing allocated.
    let mut no_case = pingora::http::ResponseHeader::build_no_case(200, Some(8)).expect("head");
    let other = count(&mut || no_case.insert_header(custom.clone(), value.clone()).expect("insert"));
    let second = http::HeaderName::from_static("x-edge-second");
    let appended = count(&mut || {
        no_case.append_header(&second, value.clone()).expect("append");
    });
    assert_eq!((other, appended), (0, 0), "allocations inserting and appending other names into a head without the map");
    let mut wire = Vec::new();
    no_case.header_to_h1_wire(&mut wire);
    assert_eq!(String::from_utf8_lossy(&wire), "X-Edge-Test: v\r\nX-Edge-Second: v\r\n");
}

/// vendor/README.md, pingora-http 9: a head without a map of names as written (the edge's
/// own answers) writes each name in its usual case, and inserting a common name whose
/// usual case is known into a head with that map copies nothing.
#[test]
fn names_go_out_in_their_usual_case() {
    let mut resp = pingora::http::ResponseHeader::build_no_case(200, Some(4)).expect("head");
    resp.insert_header(http::header::ETAG, "\"e\"").expect("insert");
    resp.insert_header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff").expect("insert");
    resp.insert_header(http::HeaderName::from_static("x-request-id"), "r").expect("insert");
    resp.insert_header(http::header::CONTENT_LENGTH, "0").expect("insert");
    let mut wire = Vec::new();
    resp.header_to_h1_wire(&mut wire);
    assert_eq!(
        String::from_utf8_lossy(&wire),
        "ETag: \"e\"\r\nX-Content-Type-Options: nosniff\r\nX-Request-Id: r\r\nContent-Length: 0\r\n"
    );
    let mut cased = pingora::http::ResponseHeader::build(200, Some(4)).expect("head");
    let value = http::HeaderValue::from_static("v");
    let before = ALLOCS.with(|c| c.get());
    cased.insert_header(http::header::ETAG, value.clone()).expect("insert");
    cased.insert_header(http::header::LAST_MODIFIED, value).expect("insert");
    assert_eq!(ALLOCS.with(|c| c.get()) - before, 0, "allocations inserting ETag and Last-Modified");
}

/// Answers every request itself, from `request_filter`: pingora's request path with no
/// upstream, so what is counted is pingora's own.
struct Answer;

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Answer {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _s: &mut pingora::proxy::Session,
        _c: &mut (),
    ) -> pingora::Result<Box<pingora::upstreams::peer::HttpPeer>> {
        Err(pingora::Error::new_str("this proxy answers itself"))
    }

    async fn request_filter(&self, s: &mut pingora::proxy::Session, _c: &mut ()) -> pingora::Result<bool> {
        let mut head = pingora::http::ResponseHeader::build(200, Some(1))?;
        head.insert_header(http::header::CONTENT_LENGTH, "2")?;
        s.write_response_header(Box::new(head), false).await?;
        s.write_response_body(Some(bytes::Bytes::from_static(b"ok")), true).await?;
        Ok(true)
    }
}

/// vendor/README.md, pingora-core 8: pingora's HTTP/1 connection loop awaits each
/// request's future where it is made. Boxed, that future (about 9.5 KiB for the edge's
/// proxy in a release build) was a heap allocation of its size, and a copy of it, on every
/// request of a keep-alive connection.
#[test]
fn keep_alive_requests_do_not_box_their_futures() {
    use pingora::apps::ServerApp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One thread runs the proxy's connection and its client, so the thread's counters see
    // the proxy's allocations and no other test's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let more = rt.block_on(async {
        let conf = std::sync::Arc::new(pingora::server::configuration::ServerConf::default());
        let app = std::sync::Arc::new(pingora::proxy::http_proxy(&conf, Answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let stream: pingora::protocols::Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            app.process_new(stream, &shutdown).await;
        };
        let client = async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut buf = vec![0u8; 4096];
            let mut requests = async |n: usize| {
                let before = LARGE.with(|c| c.get());
                for _ in 0..n {
                    c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.expect("send");
                    let mut got = 0;
                    while !buf[..got].ends_with(b"\r\n\r\nok") {
                        let r = c.read(&mut buf[got..]).await.expect("read");
                        assert!(r > 0, "the proxy closed the connection: {:?}", String::from_utf8_lossy(&buf[..got]));
                        got += r;
                    }
                    assert!(buf.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..got]));
                }
                LARGE.with(|c| c.get()) - before
            };
            // The connection's first request sets up what it keeps (buffers); then 20 more.
            requests(1).await;
            requests(20).await
        };
        tokio::select! {
            _ = server => panic!("the connection ended before its client"),
            counts = client => counts,
        }
    });
    assert_eq!(more, 0, "allocations of {LARGE_BYTES} bytes or more over 20 keep-alive requests");
}
