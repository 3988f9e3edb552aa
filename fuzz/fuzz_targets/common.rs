//! What several targets share: a small routing table with every host class, built the
//! way the edge builds it (TOML → validated state → table with keys).

use miosa_edge::config::Config;
use miosa_edge::routing::RouteTable;

/// The HS256 secret of preview key `k1` and the session key (fuzzing only).
pub const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789abcdef";

pub const TOML: &str = r##"
[tokens]
session_key_env = "FUZZ_SESSION_KEY"
[[tokens.preview_keys]]
kid = "k1"
alg = "HS256"
secret_env = "FUZZ_PREVIEW_KEY"

[[workspaces]]
id = "ws_1"
slug = "one"
preview_domain = { host = "preview.tenant.test", verified = true }
deploy_domain = { host = "apps.tenant.test", verified = true }

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{ port = 3000, access = "public" }, { port = 5173, access = "private" }]

[[share_tokens]]
id = "sh_1"
sandbox = "abc12345"
token_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "my-app"
domains = [{ host = "app.customer.test", verified = true }]
active_version = "v1"

[[deployments.versions]]
id = "v1"
release = { kind = "dynamic", instances = ["127.0.0.4:8080"] }
"##;

/// The table of [`TOML`].
pub fn table() -> RouteTable {
    // Keys come from the environment, as in the edge.
    std::env::set_var("FUZZ_SESSION_KEY", SECRET);
    std::env::set_var("FUZZ_PREVIEW_KEY", SECRET);
    let cfg = Config::parse(TOML, None).unwrap_or_else(|e| panic!("fuzz fixture: {e}"));
    RouteTable::build(&cfg.domains, &cfg.branding, &cfg.state, 1).expect("fuzz fixture table").with_access(cfg.keys.clone())
}
