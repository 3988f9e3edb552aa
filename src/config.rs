//! The operators' TOML file: a serde mirror (`deny_unknown_fields`) turned into a typed
//! [`Config`], with every error located by key path and line:column.
//!
//! Data flow: text → `toml` (syntax and field types; first error) → [`crate::state::validate`]
//! and the config's own rules (all errors) → `Config`. Errors carry the key path; the
//! path is mapped back to the source position through `toml`'s spanned document, so
//! `miosa-edge check` and reload logs can say `edge.toml:12:11: sandboxes[3].address: …`.

use crate::access::{Keys, Tokens};
use crate::releases::Static;
use crate::schema::{self, Domains, PlatformBranding, State, StateError};
use crate::state;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub mod tls;

/// The embedded default configuration (`miosa-edge run` with no `--config`).
pub const DEV_TOML: &str = include_str!("../config/dev.toml");

/// A fully validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: Server,
    pub control: Control,
    pub domains: Domains,
    pub branding: PlatformBranding,
    pub dns: Dns,
    pub log: Log,
    /// `[tokens]` as written.
    pub tokens: Tokens,
    /// `[static]`: the release store and the edge's release cache.
    pub static_: Static,
    /// `[wake]`: the control plane's wake-up hook (absent = suspended sandboxes answer 503 at once).
    pub wake: Option<Wake>,
    /// `[tls]` (used when `[server] https` is set).
    pub tls: tls::Tls,
    /// `[acme]`: certificates obtained from a CA (absent = only `certs_dir` and the default).
    pub acme: Option<tls::Acme>,
    /// `[cluster]`: fleet mode on Redis (absent = a single node).
    pub cluster: Option<Cluster>,
    /// `[storage]`: the platform's S3-compatible store (absent = storage hosts answer
    /// 404 `unknown_host`).
    pub storage: Option<StorageSection>,
    /// The keys `[tokens]` names, loaded from the environment and key files.
    pub keys: std::sync::Arc<Keys>,
    /// The routing sections (`[[workspaces]]`, `[[sandboxes]]`, …).
    pub state: State,
    /// The file it came from (`None` for the embedded default).
    pub source: Option<PathBuf>,
}

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Plain-HTTP listener. Port 0 picks a free port (logged at start).
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// TLS listener; absent = no TLS.
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// Persisted state, generated control token, ACME account.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Proxy worker threads; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// Timeout for connecting to a sandbox or instance.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for an upstream's response header or between two reads of its body
    /// (upgraded connections such as WebSockets have no idle limit).
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// How often the config file is checked for changes (0 = only on SIGHUP).
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// The longest a whole request head may take to arrive: from the start of the
    /// connection, or from the end of the previous response on a keep-alive connection
    /// (so it also closes idle keep-alive connections). Slowloris clients are cut off.
    #[serde(default = "default_client_header_timeout_ms")]
    pub client_header_timeout_ms: u64,
    /// The longest wait between two reads of a client's request body.
    #[serde(default = "default_client_body_timeout_ms")]
    pub client_body_timeout_ms: u64,
    /// Live client connections one IP address may hold; more are closed at once
    /// (0 = unlimited).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u32,
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("var")
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}
fn default_watch_interval_ms() -> u64 {
    1_000
}
fn default_client_header_timeout_ms() -> u64 {
    10_000
}
fn default_client_body_timeout_ms() -> u64 {
    60_000
}
fn default_max_connections_per_ip() -> u32 {
    256
}

impl Default for Server {
    fn default() -> Self {
        Server {
            http: default_http(),
            https: None,
            state_dir: default_state_dir(),
            threads: 0,
            connect_timeout_ms: default_connect_timeout_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            watch_interval_ms: default_watch_interval_ms(),
            client_header_timeout_ms: default_client_header_timeout_ms(),
            client_body_timeout_ms: default_client_body_timeout_ms(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}

/// `[control]`: the embedded control API (CONTRACT §4).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Listener of the control API. Port 0 picks a free port (printed at start).
    #[serde(default = "default_control_listen")]
    pub listen: SocketAddr,
    /// Name of the environment variable holding the bearer token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Largest request body accepted (413 `payload_too_large` beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
}

fn default_control_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9180))
}
fn default_token_env() -> String {
    "MIOSA_EDGE_CONTROL_TOKEN".into()
}
fn default_max_body() -> u64 {
    128 << 20
}

impl Default for Control {
    fn default() -> Self {
        Control { listen: default_control_listen(), token_env: default_token_env(), max_body_bytes: default_max_body() }
    }
}

/// `[log]`: the access log.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `off` (default), `stdout`, or a file path (appended to): one JSON object per
    /// request.
    #[serde(default = "default_access")]
    pub access: String,
}

fn default_access() -> String {
    "off".into()
}

impl Default for Log {
    fn default() -> Self {
        Log { access: default_access() }
    }
}

/// `[wake]`: waking suspended sandboxes (CONTRACT §8).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wake {
    /// `http://host:port/path` the edge POSTs `{"sandbox": id}` to.
    pub url: String,
    /// How long requests wait for the sandbox to be pushed as running.
    #[serde(default = "default_wake_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_wake_timeout_ms() -> u64 {
    15_000
}

/// `[storage]`: the store whose public objects and S3 endpoint the edge serves (CONTRACT §12).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// `http(s)://host[:port]` of the S3-compatible store (RustFS, MinIO, AWS, …).
    pub endpoint: String,
    /// The region requests are signed for.
    #[serde(default = "default_storage_region")]
    pub region: String,
    /// The environment variable holding the edge's access key id.
    #[serde(default = "default_storage_key_env")]
    pub access_key_env: String,
    /// The environment variable holding the edge's secret access key.
    #[serde(default = "default_storage_secret_env")]
    pub secret_key_env: String,
    /// How long the store may take to answer a request's head, and between two chunks of
    /// a body, before the client gets 504 `upstream_timeout` (or the stream is cut).
    #[serde(default = "default_storage_timeout_ms")]
    pub timeout_ms: u64,
    /// Read from `access_key_env` at load.
    #[serde(skip)]
    pub key_id: String,
    /// Read from `secret_key_env` at load.
    #[serde(skip)]
    pub key_secret: String,
}

impl fmt::Debug for StorageSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are secrets: never shown.
        f.debug_struct("StorageSection").field("endpoint", &self.endpoint).field("region", &self.region).finish_non_exhaustive()
    }
}

impl PartialEq for StorageSection {
    fn eq(&self, o: &StorageSection) -> bool {
        (&self.endpoint, &self.region, &self.key_id, &self.key_secret, self.timeout_ms)
            == (&o.endpoint, &o.region, &o.key_id, &o.key_secret, o.timeout_ms)
    }
}

impl StorageSection {
    /// The settings the storage client is built from.
    pub fn settings(&self) -> crate::storage::StorageSettings {
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        crate::storage::StorageSettings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            key_id: self.key_id.clone(),
            key_secret: self.key_secret.clone(),
            first_byte_timeout: timeout,
            idle_timeout: timeout,
        }
    }
}

fn default_storage_region() -> String {
    "us-east-1".into()
}

fn default_storage_key_env() -> String {
    "STORAGE_KEY_ID".into()
}

fn default_storage_secret_env() -> String {
    "STORAGE_KEY_SECRET".into()
}

fn default_storage_timeout_ms() -> u64 {
    15_000
}

/// Checks `[storage]` and reads the keys it names from the environment.
fn check_storage(s: &mut StorageSection) -> Vec<StateError> {
    let mut errs = Vec::new();
    let err = |path: &str, message: String| StateError { path: format!("storage.{path}"), message };
    if let Err(e) = crate::storage::Endpoint::parse(&s.endpoint) {
        errs.push(err("endpoint", e));
    }
    if s.region.is_empty() || s.region.len() > 64 || !s.region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        errs.push(err("region", "must be 1 to 64 characters of A-Z, a-z, 0-9, '-'".into()));
    }
    if !(100..=600_000).contains(&s.timeout_ms) {
        errs.push(err("timeout_ms", "must be between 100 and 600000".into()));
    }
    for (key, name, slot) in
        [("access_key_env", &s.access_key_env, &mut s.key_id), ("secret_key_env", &s.secret_key_env, &mut s.key_secret)]
    {
        if !is_env_name(name) {
            errs.push(err(key, "must be an environment variable name (A-Z, 0-9, _)".into()));
            continue;
        }
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => *slot = v,
            _ => errs.push(err(key, format!("${name} is not set"))),
        }
    }
    errs
}

/// `[cluster]`: several nodes as one fleet, sharing state through Redis (CONTRACT §11).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The environment variable holding `redis://[:password@]host:port/db` (or `rediss://`).
    #[serde(default = "default_redis_url_env")]
    pub redis_url_env: String,
    /// This node's name, unique in the fleet; default: the host name.
    #[serde(default)]
    pub node: String,
    /// Prefix of every key, so several fleets can share one Redis.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// The environment variable holding the key (≥ 32 bytes) that seals private keys kept
    /// in Redis.
    #[serde(default = "default_seal_key_env")]
    pub seal_key_env: String,
    /// Read from `redis_url_env` at load.
    #[serde(skip)]
    pub redis_url: String,
    /// Read from `seal_key_env` at load (absent: no certificates are kept in Redis).
    #[serde(skip)]
    pub seal_key: Option<std::sync::Arc<[u8]>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password and the seal key is a secret: neither is shown.
        f.debug_struct("Cluster").field("node", &self.node).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn default_redis_url_env() -> String {
    "MIOSA_EDGE_REDIS_URL".into()
}

fn default_cluster_prefix() -> String {
    "miosa-edge".into()
}

fn default_seal_key_env() -> String {
    "MIOSA_EDGE_SEAL_KEY".into()
}

/// The host name (the default node name of a fleet).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "edge".into())
}

/// Checks `[cluster]` and reads the secrets it names from the environment.
fn check_cluster(c: &mut Cluster, https: bool) -> Vec<StateError> {
    let mut errs = Vec::new();
    let err = |path: &str, message: String| StateError { path: format!("cluster.{path}"), message };
    if c.node.is_empty() {
        c.node = host_name();
    }
    if c.node.len() > 64 || !c.node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        errs.push(err("node", "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'".into()));
    }
    if c.prefix.is_empty() || c.prefix.len() > 64 || !c.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        errs.push(err("prefix", "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'".into()));
    }
    for (key, name) in [("redis_url_env", &c.redis_url_env), ("seal_key_env", &c.seal_key_env)] {
        if !is_env_name(name) {
            errs.push(err(key, "must be an environment variable name (A-Z, 0-9, _)".into()));
        }
    }
    if !errs.is_empty() {
        return errs;
    }
    match std::env::var(&c.redis_url_env) {
        Ok(url) if url.starts_with("redis://") || url.starts_with("rediss://") => match redis::Client::open(url.as_str()) {
            Ok(_) => c.redis_url = url,
            Err(e) => errs.push(err("redis_url_env", format!("${} is not a usable Redis URL: {e}", c.redis_url_env))),
        },
        Ok(_) => errs.push(err("redis_url_env", format!("${} must be a redis:// or rediss:// URL", c.redis_url_env))),
        Err(_) => errs.push(err("redis_url_env", format!("${} is not set", c.redis_url_env))),
    }
    match env_bytes(&c.seal_key_env) {
        Some(k) if k.len() >= 32 => c.seal_key = Some(k.into()),
        Some(_) => errs.push(err("seal_key_env", format!("${} must hold at least 32 bytes", c.seal_key_env))),
        // Without TLS no certificate is kept, so no key is needed.
        None if https => errs.push(err(
            "seal_key_env",
            format!("${} is not set: with [server] https the fleet keeps its certificates' keys in Redis, sealed with it", c.seal_key_env),
        )),
        None => {}
    }
    errs
}

/// `[dns]`: resolvers for domain verification (and later DNS-01 checks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// `IP:port` of the nameservers to ask; absent = the system's resolvers.
    #[serde(default)]
    pub nameservers: Option<Vec<SocketAddr>>,
}

/// The file's sections, each read on its own so that a bad value in one section (or one
/// element of a routing section) does not hide the errors of the others.
struct RawConfig {
    server: Server,
    control: Control,
    domains: Domains,
    branding: PlatformBranding,
    dns: Dns,
    log: Log,
    workspaces: Vec<schema::Workspace>,
    sandboxes: Vec<schema::Sandbox>,
    share_tokens: Vec<schema::ShareToken>,
    deployments: Vec<schema::Deployment>,
    buckets: Vec<schema::Bucket>,
    tokens: Tokens,
    tls: Option<tls::Tls>,
    acme: Option<tls::Acme>,
    static_: Static,
    wake: Option<Wake>,
    cluster: Option<Cluster>,
    storage: Option<StorageSection>,
    /// The top-level keys whose value could not be read (their checks are skipped: the
    /// defaults in their place would report errors the file does not have).
    failed: Vec<String>,
}

/// The top-level keys of a config file.
const SECTIONS: &[&str] = &[
    "server",
    "control",
    "domains",
    "branding",
    "dns",
    "log",
    "workspaces",
    "sandboxes",
    "share_tokens",
    "deployments",
    "buckets",
    "tokens",
    "tls",
    "acme",
    "static",
    "wake",
    "cluster",
    "storage",
];

impl RawConfig {
    /// Reads every section of `table`, collecting each error with its key path.
    fn read(table: toml::Table, errors: &mut Vec<StateError>) -> RawConfig {
        let mut raw = RawConfig {
            server: Server::default(),
            control: Control::default(),
            domains: Domains::default(),
            branding: PlatformBranding::default(),
            dns: Dns::default(),
            log: Log::default(),
            workspaces: Vec::new(),
            sandboxes: Vec::new(),
            share_tokens: Vec::new(),
            deployments: Vec::new(),
            buckets: Vec::new(),
            tokens: Tokens::default(),
            tls: None,
            acme: None,
            static_: Static::default(),
            wake: None,
            cluster: None,
            storage: None,
            failed: Vec::new(),
        };
        for (key, value) in table {
            let before = errors.len();
            match key.as_str() {
                "server" => set(&mut raw.server, section(&key, value, errors)),
                "control" => set(&mut raw.control, section(&key, value, errors)),
                "domains" => set(&mut raw.domains, section(&key, value, errors)),
                "branding" => set(&mut raw.branding, section(&key, value, errors)),
                "dns" => set(&mut raw.dns, section(&key, value, errors)),
                "log" => set(&mut raw.log, section(&key, value, errors)),
                "tokens" => set(&mut raw.tokens, section(&key, value, errors)),
                "tls" => raw.tls = section(&key, value, errors),
                "acme" => raw.acme = section(&key, value, errors),
                "static" => set(&mut raw.static_, section(&key, value, errors)),
                "wake" => raw.wake = section(&key, value, errors),
                "cluster" => raw.cluster = section(&key, value, errors),
                "storage" => raw.storage = section(&key, value, errors),
                "workspaces" => raw.workspaces = elements(&key, value, errors),
                "sandboxes" => raw.sandboxes = elements(&key, value, errors),
                "share_tokens" => raw.share_tokens = elements(&key, value, errors),
                "deployments" => raw.deployments = elements(&key, value, errors),
                "buckets" => raw.buckets = elements(&key, value, errors),
                _ => errors.push(StateError {
                    path: key.clone(),
                    message: format!(
                        "unknown field `{key}`, expected one of {}",
                        SECTIONS.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
                    ),
                }),
            }
            if errors.len() > before {
                raw.failed.push(key);
            }
        }
        raw
    }

    /// Whether every one of `keys` was read (or left to its default).
    fn read_ok(&self, keys: &[&str]) -> bool {
        !self.failed.iter().any(|f| keys.contains(&f.as_str()))
    }
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

/// Reads the section `[key]`, which must be a table (serde would read a struct from an
/// array too).
fn section<T: serde::de::DeserializeOwned>(key: &str, value: toml::Value, errors: &mut Vec<StateError>) -> Option<T> {
    if !value.is_table() {
        errors.push(StateError { path: key.into(), message: format!("must be a table ([{key}]), not {}", value.type_str()) });
        return None;
    }
    read_value(key, value, errors)
}

/// Reads each element of `[[key]]` on its own; a bad one is reported and left out.
fn elements<T: serde::de::DeserializeOwned>(key: &str, value: toml::Value, errors: &mut Vec<StateError>) -> Vec<T> {
    let toml::Value::Array(items) = value else {
        errors.push(StateError { path: key.into(), message: format!("must be an array of tables ([[{key}]]), not {}", value.type_str()) });
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{key}[{i}]");
        if !item.is_table() {
            errors.push(StateError { path, message: format!("must be a table, not {}", item.type_str()) });
            continue;
        }
        if let Some(v) = read_value(&path, item, errors) {
            out.push(v);
        }
    }
    out
}

/// Deserializes `value`, the part of the file at `path`; an error names the innermost key.
fn read_value<T: serde::de::DeserializeOwned>(path: &str, value: toml::Value, errors: &mut Vec<StateError>) -> Option<T> {
    // Structs from tables only, at every depth (serde reads them from arrays too).
    match serde_path_to_error::deserialize::<_, T>(schema::strict::Strict(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let message = e.into_inner().message().trim().to_string();
            let path = match inner.as_str() {
                "." => path.to_string(),
                p if p.starts_with('[') => format!("{path}{p}"),
                p => format!("{path}.{p}"),
            };
            errors.push(StateError { path, message });
            None
        }
    }
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Key path, e.g. `sandboxes[3].address` (empty for syntax errors).
    pub path: String,
    pub message: String,
    /// 1-based line and column, when the position is known.
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has {} error(s):\n{}", .file, .issues.len(), .issues.iter().map(|i| format!("  {}:{i}", .file)).collect::<Vec<_>>().join("\n"))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}

impl Config {
    /// Loads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(DEV_TOML, None),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                Config::parse(&text, Some(p))
            }
        }
    }

    /// Parses and validates a whole file.
    pub fn parse(text: &str, source: Option<&Path>) -> Result<Config, ConfigError> {
        let file = source.map(|p| p.display().to_string()).unwrap_or_else(|| "<embedded dev.toml>".into());
        let invalid = |issues| ConfigError::Invalid { file: file.clone(), issues };
        let doc = match DeTable::parse(text) {
            Ok(doc) => doc,
            Err(e) => return Err(invalid(vec![issue_from_toml(text, None, &e)])),
        };
        let table: toml::Table = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => return Err(invalid(vec![issue_from_toml(text, Some(&doc), &e)])),
        };
        let mut errors: Vec<StateError> = Vec::new();
        let mut raw = RawConfig::read(table, &mut errors);
        // Checks run on the sections that could be read; a section that could not is
        // reported already, and its defaults would only add errors the file does not have.
        if raw.read_ok(&["server", "tls", "acme"]) {
            errors.extend(tls::check(raw.server.https, raw.tls.as_ref(), raw.acme.as_ref()));
        }
        if let (true, Some(https)) = (raw.read_ok(&["server"]), raw.server.https) {
            // Connections are told apart by the port they arrived on (crate::front).
            if https.port() == raw.server.http.port() && https.port() != 0 {
                errors.push(StateError { path: "server.https".into(), message: "must use another port than server.http".into() });
            }
        }
        for (key, v, min, max) in [
            ("connect_timeout_ms", raw.server.connect_timeout_ms, 1, 600_000),
            ("read_timeout_ms", raw.server.read_timeout_ms, 1, 86_400_000),
            ("watch_interval_ms", raw.server.watch_interval_ms, 0, 3_600_000),
            ("client_header_timeout_ms", raw.server.client_header_timeout_ms, 100, 3_600_000),
            ("client_body_timeout_ms", raw.server.client_body_timeout_ms, 100, 86_400_000),
        ] {
            if v < min || v > max {
                errors.push(StateError { path: format!("server.{key}"), message: format!("must be between {min} and {max}") });
            }
        }
        if raw.control.token_env.is_empty() || !raw.control.token_env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            errors.push(StateError {
                path: "control.token_env".into(),
                message: "must be an environment variable name (A-Z, 0-9, _)".into(),
            });
        }
        if !(1024..=(4u64 << 30)).contains(&raw.control.max_body_bytes) {
            errors.push(StateError { path: "control.max_body_bytes".into(), message: "must be between 1024 and 4294967296".into() });
        }
        if raw.log.access.is_empty() || raw.log.access.chars().any(char::is_control) {
            errors.push(StateError { path: "log.access".into(), message: "must be off, stdout or a file path".into() });
        }
        if raw.server.threads > 1024 {
            errors.push(StateError { path: "server.threads".into(), message: "must be at most 1024".into() });
        }
        let name = &raw.branding.name;
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            errors
                .push(StateError { path: "branding.name".into(), message: "must be 1 to 64 characters without control characters".into() });
        }
        errors.extend(check_domains(&raw.domains));
        errors.extend(check_tokens(&raw.tokens));
        errors.extend(raw.static_.check());
        if let Some(w) = &raw.wake {
            errors.extend(check_wake(w));
        }
        let https = raw.server.https.is_some();
        if let Some(c) = &mut raw.cluster {
            errors.extend(check_cluster(c, https));
        }
        if let Some(s) = &mut raw.storage {
            errors.extend(check_storage(s));
        }
        let keys = if !raw.read_ok(&["tokens"]) || errors.iter().any(|e| e.path.starts_with("tokens")) {
            crate::access::Keys::none()
        } else {
            crate::access::Keys::load(&raw.tokens, env_bytes).unwrap_or_else(|es| {
                errors.extend(es);
                crate::access::Keys::none()
            })
        };
        let objects_read = raw.read_ok(&["domains", "workspaces", "sandboxes", "share_tokens", "deployments", "buckets"]);
        let state = State {
            workspaces: raw.workspaces,
            sandboxes: raw.sandboxes,
            share_tokens: raw.share_tokens,
            deployments: raw.deployments,
            buckets: raw.buckets,
        };
        // References between objects are checked only when every object could be read: a
        // left-out one would make its references look dangling.
        if objects_read {
            if let Err(es) = state::validate(&state, &raw.domains) {
                errors.extend(es);
            }
        }
        if !errors.is_empty() {
            let mut issues: Vec<ConfigIssue> = errors
                .into_iter()
                .map(|e| {
                    // An unknown key is shown at the key, a bad value at the value.
                    let span = span_of_path(&doc, &e.path, e.message.starts_with("unknown field"));
                    let (line, column) = line_col(text, span.start);
                    ConfigIssue { path: e.path, message: e.message, line, column }
                })
                .collect();
            // In the file's order, as a compiler lists them (sections are read by name).
            issues.sort_by_key(|i| (i.line, i.column));
            return Err(invalid(issues));
        }
        Ok(Config {
            server: raw.server,
            control: raw.control,
            domains: raw.domains,
            branding: raw.branding,
            dns: raw.dns,
            log: raw.log,
            tokens: raw.tokens,
            static_: raw.static_,
            wake: raw.wake,
            tls: raw.tls.unwrap_or_default(),
            acme: raw.acme,
            cluster: raw.cluster,
            storage: raw.storage,
            keys: std::sync::Arc::new(keys),
            state,
            source: source.map(Path::to_owned),
        })
    }
}

/// The raw bytes of an environment variable.
fn env_bytes(name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    std::env::var_os(name).map(|v| v.into_vec())
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_tokens(t: &Tokens) -> Vec<StateError> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: &str| errs.push(StateError { path, message: message.into() });
    if !is_env_name(&t.session_key_env) {
        err("tokens.session_key_env".into(), "must be an environment variable name (A-Z, 0-9, _)");
    }
    if !(60..=30 * 86_400).contains(&t.share_session_ttl_secs) {
        err("tokens.share_session_ttl_secs".into(), "must be between 60 and 2592000 (30 days)");
    }
    let mut kids = std::collections::HashSet::new();
    for (i, k) in t.preview_keys.iter().enumerate() {
        let p = format!("tokens.preview_keys[{i}]");
        if k.kid.is_empty() || k.kid.len() > 64 || !k.kid.bytes().all(|b| b.is_ascii_graphic()) {
            err(format!("{p}.kid"), "must be 1 to 64 printable ASCII characters");
        } else if !kids.insert(k.kid.as_str()) {
            err(format!("{p}.kid"), "is used by another preview key");
        }
        if let Some(v) = &k.secret_env {
            if !is_env_name(v) {
                err(format!("{p}.secret_env"), "must be an environment variable name (A-Z, 0-9, _)");
            }
        }
    }
    errs
}

fn check_wake(w: &Wake) -> Vec<StateError> {
    let mut errs = Vec::new();
    if let Err(e) = crate::hook::HookUrl::parse(&w.url) {
        errs.push(StateError { path: "wake.url".into(), message: e.to_string() });
    }
    if !(100..=300_000).contains(&w.timeout_ms) {
        errs.push(StateError { path: "wake.timeout_ms".into(), message: "must be between 100 and 300000".into() });
    }
    errs
}

fn check_domains(d: &Domains) -> Vec<StateError> {
    let mut errs = Vec::new();
    let named = d.named();
    for (i, (ka, a)) in named.iter().enumerate() {
        for (kb, b) in &named[i + 1..] {
            if a == b {
                errs.push(StateError { path: format!("domains.{kb}"), message: format!("`{b}` is also domains.{ka}") });
            }
        }
    }
    // The zones may sit under apps (sandbox.miosa.app, storage.miosa.app under miosa.app)
    // but under no other zone: apps under sandbox would make every app URL look like a
    // preview, a storage zone under sandbox would make bucket hosts look like previews.
    for (ka, a) in &named {
        for (kb, b) in &named {
            if a != b && *kb != "apps" && state::is_under(a.as_str(), b.as_str()) {
                errs.push(StateError { path: format!("domains.{ka}"), message: format!("`{a}` must not be under domains.{kb}") });
            }
        }
    }
    errs
}

fn issue_from_toml(text: &str, doc: Option<&Spanned<DeTable<'_>>>, e: &toml::de::Error) -> ConfigIssue {
    let start = e.span().map(|s| s.start).unwrap_or(0);
    let (line, column) = line_col(text, start);
    let path = doc.map(|d| path_of_offset(d, start)).unwrap_or_default();
    ConfigIssue { path, message: e.message().trim().to_string(), line, column }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            if let Ok(i) = r[..end].parse() {
                out.push(Seg::Index(i));
            }
            rest = &r[end + 1..];
        }
    }
    out
}

/// The span of the deepest node of `doc` along `path` (the whole document if none): of a
/// scalar's value, or of its key when `at_key`.
fn span_of_path(doc: &Spanned<DeTable<'_>>, path: &str, at_key: bool) -> std::ops::Range<usize> {
    let mut span = 0..0;
    let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for seg in parse_path(path) {
        let next = match (seg, table, array) {
            (Seg::Key(k), Some(t), _) => t.iter().find(|(key, _)| key.get_ref().as_ref() == k).map(|(key, v)| {
                // Point at the key: for tables declared by a header the value's span
                // may be the whole section.
                span = key.span();
                v
            }),
            (Seg::Index(i), _, Some(a)) => a.get(i).inspect(|v| span = v.span()),
            _ => None,
        };
        let Some(v) = next else { break };
        table = None;
        array = None;
        match v.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(a) => array = Some(&a[..]),
            // A bad scalar: point at the value itself.
            _ if !at_key => span = v.span(),
            _ => {}
        }
    }
    span
}

/// The key path of the deepest node whose span contains `offset`.
fn path_of_offset(doc: &Spanned<DeTable<'_>>, offset: usize) -> String {
    fn walk_value(v: &Spanned<DeValue<'_>>, offset: usize, path: &mut String) {
        match v.get_ref() {
            DeValue::Table(t) => walk_table(t, offset, path),
            DeValue::Array(a) => {
                // Arrays of tables: pick the element containing the offset, or the last
                // one that starts before it (header spans do not cover the body).
                let mut best = None;
                for (i, e) in a.iter().enumerate() {
                    if e.span().start <= offset {
                        best = Some(i);
                    }
                    if e.span().contains(&offset) {
                        best = Some(i);
                        break;
                    }
                }
                if let Some(i) = best {
                    path.push_str(&format!("[{i}]"));
                    walk_value(&a[i], offset, path);
                }
            }
            _ => {}
        }
    }
    fn walk_table(t: &DeTable<'_>, offset: usize, path: &mut String) {
        let mut best: Option<(&str, &Spanned<DeValue<'_>>, usize)> = None;
        for (k, v) in t.iter() {
            let (ks, vs) = (k.span(), v.span());
            if ks.contains(&offset) || vs.contains(&offset) || ks.start <= offset && vs.end >= offset {
                best = Some((k.get_ref().as_ref(), v, ks.start));
                break;
            }
            // A section header: the key is before the offset and the body follows.
            if ks.start <= offset && best.is_none_or(|b| ks.start > b.2) {
                if let DeValue::Table(_) | DeValue::Array(_) = v.get_ref() {
                    best = Some((k.get_ref().as_ref(), v, ks.start));
                }
            }
        }
        if let Some((k, v, _)) = best {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
            walk_value(v, offset, path);
        }
    }
    let mut path = String::new();
    walk_table(doc.get_ref(), offset, &mut path);
    path
}

#[cfg(test)]
mod tests;
