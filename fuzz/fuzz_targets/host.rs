//! Host parsing: any bytes a client may send as `Host` or `:authority` go through
//! `normalize_host` and, when they normalise, through the table lookup.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miosa_edge::routing::{normalize_host, RouteTable};
use std::sync::OnceLock;

#[path = "common.rs"]
mod common;

static TABLE: OnceLock<RouteTable> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let table = TABLE.get_or_init(common::table);
    let mut buf = [0u8; 256];
    if let Some(host) = normalize_host(data, &mut buf) {
        // A normalised host is printable lower-case ASCII, at most 256 bytes. (Only one
        // trailing dot is removed: `a..` stays `a.`, which matches no route.)
        assert!(host.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()), "{host:?}");
        assert!(!host.is_empty() && host.len() <= 256, "{host:?}");
        let _ = table.lookup(host);
    }
});
