//! The routing state as the control plane pushes it (JSON, `PUT /v1/state`): any bytes
//! give a state or an error, a state passes or fails validation, never a panic; a
//! valid state builds a table whose hosts all route.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miosa_edge::schema::{Domains, PlatformBranding};
use miosa_edge::routing::RouteTable;
use miosa_edge::schema::State;
use miosa_edge::state;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = serde_json::from_slice::<State>(data) else { return };
    let domains = Domains::default();
    if state::validate(&s, &domains).is_ok() {
        let table = RouteTable::build(&domains, &PlatformBranding::default(), &s, 1).expect("a valid state builds a table");
        for w in &s.workspaces {
            if let Some(d) = &w.preview_domain {
                let _ = table.lookup(d.host.as_str());
            }
        }
        for d in &s.deployments {
            for e in &d.domains {
                let _ = table.lookup(e.host.as_str());
            }
        }
        // What the control API writes back parses again to the same state.
        let json = serde_json::to_vec(&s).expect("serialize");
        let again: State = serde_json::from_slice(&json).expect("own output parses");
        assert_eq!(again, s);
    }
});
