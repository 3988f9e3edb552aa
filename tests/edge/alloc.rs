//! Host lookup allocates nothing (DESIGN.md hot-path rule), checked with a counting
//! allocator on this thread.

use miosa_edge::routing::{normalize_host, Route, RouteTable};
use miosa_edge::schema::State;
use miosa_edge::schema::{Domains, PlatformBranding};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
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
}
