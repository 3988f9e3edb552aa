//! The TOML config parser (the operator's file, reloaded live): any text gives a config
//! or errors naming a key path, never a panic; a config that parses builds a table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miosa_edge::config::Config;
use miosa_edge::routing::RouteTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = Config::parse(text, None) {
        RouteTable::build(&cfg.domains, &cfg.branding, &cfg.state, 1).expect("a config that parses builds a table");
    }
});
