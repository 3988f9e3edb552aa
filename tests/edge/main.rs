//! Integration tests: the real `miosa-edge` binary, real origins on loopback, raw
//! HTTP clients. One binary (see DESIGN.md); modules by capability.

mod support;

mod access;
mod acme;
mod alloc;
mod browser;
mod coalesce;
mod control;
mod fleet;
mod fleet_certs;
mod fleet_counters;
mod forwarding;
mod hostile;
mod layers;
mod lifecycle;
mod observe;
mod openapi;
mod pool;
mod releases;
mod reload;
mod routes;
mod s3;
mod storage;
mod storage_objects;
mod task_pipe;
mod timer;
mod tls;
mod upstreams;
mod wake;

use support::{closed_port, Origin};

/// Origins and the TOML routing sections that point at them.
pub struct Fixture {
    pub a_public: Origin,
    pub a_private: Origin,
    pub b_public: Origin,
    pub d1: Origin,
    pub d2: Origin,
    pub a_dead_port: u16,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Fixture {
            a_public: Origin::start("a-public", "127.0.0.2").await,
            a_private: Origin::start("a-private", "127.0.0.2").await,
            b_public: Origin::start("b-public", "127.0.0.3").await,
            d1: Origin::start("d1", "127.0.0.4").await,
            d2: Origin::start("d2", "127.0.0.4").await,
            a_dead_port: closed_port("127.0.0.2"),
        }
    }

    pub fn pa(&self) -> u16 {
        self.a_public.addr.port()
    }
    pub fn pb(&self) -> u16 {
        self.b_public.addr.port()
    }

    /// The routing sections (plus `extra` appended).
    pub fn toml(&self, extra: &str) -> String {
        format!(
            r##"[branding]
name = "MIOSA"
accent_color = "#5b5bd6"
support_url = "https://miosa.example/support"

[[workspaces]]
id = "ws_1"
slug = "one"
preview_domain = {{ host = "preview.tenant-one.test", verified = true }}
deploy_domain = {{ host = "apps.tenant-one.test", verified = true }}
branding = {{ accent_color = "#0a84ff", logo_url = "https://cdn.tenant-one.test/logo.png", support_url = "mailto:help@tenant-one.test" }}

[[workspaces]]
id = "ws_2"
slug = "two"
preview_domain = {{ host = "preview.tenant-two.test", verified = true }}
deploy_domain = {{ host = "apps.tenant-two.test", verified = false }}

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "127.0.0.2"
previews = [
  {{ port = {pa}, access = "public" }},
  {{ port = {pp}, access = "private" }},
  {{ port = {dead}, access = "public" }},
]

[[sandboxes]]
id = "zzz99"
workspace = "ws_2"
address = "127.0.0.3"
previews = [{{ port = {pb}, access = "public" }}]

[[sandboxes]]
id = "sleepy"
workspace = "ws_2"
address = "127.0.0.3"
state = "suspended"
previews = [{{ port = {pb}, access = "public" }}]

[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "my-app"
domains = [{{ host = "app.customer.test", verified = true }}, {{ host = "new.customer.test", verified = false }}]
active_version = "v2"

[[deployments.versions]]
id = "v2"
release = {{ kind = "dynamic", instances = ["{d1}", "{d2}"] }}

[[deployments.versions]]
id = "v1"
release = {{ kind = "static", sha256 = "1111111111111111111111111111111111111111111111111111111111111111" }}

{extra}"##,
            pa = self.pa(),
            pp = self.a_private.addr.port(),
            dead = self.a_dead_port,
            pb = self.pb(),
            d1 = self.d1.addr,
            d2 = self.d2.addr,
        )
    }
}
