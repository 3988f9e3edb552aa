//! Token parsing: whatever a client sends as `?token=`, `X-Miosa-Token` or the session
//! cookie. The input is split at its first NUL into a token and a cookie value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miosa_edge::access::{self, cookie};
use miosa_edge::routing::RouteTable;
use std::sync::OnceLock;

#[path = "common.rs"]
mod common;

static TABLE: OnceLock<RouteTable> = OnceLock::new();

/// A fixed `now` inside any token the fuzzer may forge (2026-01-01).
const NOW: i64 = 1_767_225_600;

fuzz_target!(|data: &[u8]| {
    let table = TABLE.get_or_init(common::table);
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let token = String::from_utf8_lossy(a);
    let _ = access::verify_token(table, &token, "abc12345", 5173, NOW);
    let _ = access::verify_preview(&table.access, &token, "abc12345", 5173, NOW);
    // The same string with each prefix, so the fuzzer need not find them.
    let _ = access::verify_token(table, &format!("mp_{token}"), "abc12345", 5173, NOW);
    let _ = access::verify_token(table, &format!("ms_{token}"), "abc12345", 5173, NOW);
    let value = String::from_utf8_lossy(b);
    if let Some(s) = cookie::decode(&table.access, "5173-abc12345.sandbox.miosa.app", &value, NOW) {
        // Only a value the edge signed decodes; re-encoding it must round-trip.
        let again = cookie::encode(&table.access, "5173-abc12345.sandbox.miosa.app", &s).expect("session key");
        assert_eq!(again, *value);
    }
    let _ = cookie::find(std::iter::once(b), "__Host-miosa_session");
    let _ = cookie::without_edge_cookies(b);
    let _ = access::password::parse_form(b);
    let _ = access::password::safe_next(&value);
});
