//! `[tls]` and `[acme]` (CONTRACT §9, §10).

use crate::schema::StateError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `[tls]`: certificates served on `[server] https`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// certbot layout: `<name>/fullchain.pem` + `<name>/privkey.pem`; ACME writes here too.
    #[serde(default = "default_certs_dir")]
    pub certs_dir: PathBuf,
    /// Plain HTTP answers 308 to `https://` (CONTRACT §9). `false` keeps plain HTTP
    /// serving, as the embedded dev default does so a browser needs no trusted certificate.
    #[serde(default = "yes")]
    pub redirect_http: bool,
    /// How often `certs_dir` is checked for added or replaced files.
    #[serde(default = "default_watch_ms")]
    pub watch_interval_ms: u64,
    /// A TLS handshake must finish within this, from the connection's accept; a client
    /// that stalls in it is disconnected (counted as `timeout`).
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certs_dir: default_certs_dir(),
            redirect_http: true,
            watch_interval_ms: default_watch_ms(),
            handshake_timeout_ms: default_handshake_ms(),
        }
    }
}

fn default_certs_dir() -> PathBuf {
    PathBuf::from("certs")
}
fn yes() -> bool {
    true
}
fn default_watch_ms() -> u64 {
    1_000
}
fn default_handshake_ms() -> u64 {
    10_000
}

/// `[acme]`: certificates obtained and renewed from an RFC 8555 CA.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The CA's directory URL.
    pub directory: String,
    /// Account contacts (`mailto:`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// PEM trust roots for the ACME server's own HTTPS (Pebble in tests); absent = the
    /// system's roots.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Orders in progress at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_orders: usize,
    /// Suffixes under which every label is its own registered domain for the CA's
    /// per-domain limit (the apps domain, once it is on the Public Suffix List).
    #[serde(default)]
    pub public_suffixes: Vec<String>,
    /// How long a DNS-01 record may take to become visible on `[dns] nameservers`.
    #[serde(default = "default_propagation_secs")]
    pub propagation_timeout_secs: u64,
    /// First wait after a failed order; doubles per failure up to `backoff_max_secs`.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_secs: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_secs: u64,
    #[serde(default)]
    pub dns01: Option<Dns01>,
    #[serde(default)]
    pub limits: Limits,
}

fn default_concurrency() -> usize {
    2
}
fn default_propagation_secs() -> u64 {
    120
}
fn default_backoff_min() -> u64 {
    60
}
fn default_backoff_max() -> u64 {
    86_400
}

/// `[acme.dns01]`: how DNS-01 TXT records are written.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns01 {
    pub provider: Dns01Provider,
    /// webhook: base URL; the edge POSTs `{host, value}` to `<url>/set-txt` and `<url>/clear-txt`.
    #[serde(default)]
    pub url: Option<String>,
    /// rfc2136: the primary nameserver accepting dynamic updates (`IP:port`).
    #[serde(default)]
    pub server: Option<SocketAddr>,
    /// rfc2136: the zone to update; absent = found by asking `server` for the SOA.
    #[serde(default)]
    pub zone: Option<String>,
    /// rfc2136: TSIG key name, algorithm and the environment variable holding its
    /// base64 secret.
    #[serde(default)]
    pub tsig_key_name: Option<String>,
    #[serde(default = "default_tsig_alg")]
    pub tsig_algorithm: String,
    #[serde(default)]
    pub tsig_secret_env: Option<String>,
}

fn default_tsig_alg() -> String {
    "hmac-sha256".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dns01Provider {
    Webhook,
    Rfc2136,
}

/// `[acme.limits]`: the CA's rate limits the edge budgets against (Let's Encrypt's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// New certificates per registered domain per 7 days.
    #[serde(default = "d50")]
    pub certs_per_domain_per_week: u32,
    /// New orders per account per 3 hours.
    #[serde(default = "d300")]
    pub orders_per_3h: u32,
    /// Failed validations per hostname per hour.
    #[serde(default = "d5")]
    pub failures_per_host_per_hour: u32,
    /// Certificates for the same set of names per 7 days.
    #[serde(default = "d5")]
    pub duplicates_per_week: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { certs_per_domain_per_week: 50, orders_per_3h: 300, failures_per_host_per_hour: 5, duplicates_per_week: 5 }
    }
}

fn d50() -> u32 {
    50
}
fn d300() -> u32 {
    300
}
fn d5() -> u32 {
    5
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks `[tls]` and `[acme]` against each other and `[server] https`.
pub fn check(https: Option<SocketAddr>, tls: Option<&Tls>, acme: Option<&Acme>) -> Vec<StateError> {
    let mut errs = Vec::new();
    let mut err = |path: &str, message: String| errs.push(StateError { path: path.into(), message });
    if let Some(t) = tls {
        if !(100..=3_600_000).contains(&t.watch_interval_ms) {
            err("tls.watch_interval_ms", "must be between 100 and 3600000".into());
        }
        if !(100..=300_000).contains(&t.handshake_timeout_ms) {
            err("tls.handshake_timeout_ms", "must be between 100 and 300000".into());
        }
        if t.certs_dir.as_os_str().is_empty() {
            err("tls.certs_dir", "must be a directory path".into());
        }
    }
    let Some(a) = acme else { return errs };
    if https.is_none() {
        err("acme", "needs `[server] https`: certificates are only useful with the TLS listener".into());
    }
    match a.directory.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("https") | Some("http")) && u.host().is_some() => {}
        _ => err("acme.directory", "must be an https:// URL".into()),
    }
    for (i, c) in a.contact.iter().enumerate() {
        if !c.starts_with("mailto:") || c.len() < 10 || c.chars().any(|ch| ch.is_control() || ch == ' ') {
            err(&format!("acme.contact[{i}]"), "must be a mailto: address".into());
        }
    }
    if !(1..=64).contains(&a.max_concurrent_orders) {
        err("acme.max_concurrent_orders", "must be between 1 and 64".into());
    }
    if !(1..=3600).contains(&a.propagation_timeout_secs) {
        err("acme.propagation_timeout_secs", "must be between 1 and 3600".into());
    }
    if a.backoff_min_secs == 0 || a.backoff_min_secs > a.backoff_max_secs || a.backoff_max_secs > 30 * 86_400 {
        err("acme.backoff_min_secs", "must be at least 1 and at most backoff_max_secs (at most 30 days)".into());
    }
    for (i, s) in a.public_suffixes.iter().enumerate() {
        if crate::schema::Host::try_from(s.as_str()).is_err() {
            err(&format!("acme.public_suffixes[{i}]"), "must be a domain name".into());
        }
    }
    if let Some(d) = &a.dns01 {
        match d.provider {
            Dns01Provider::Webhook => match d.url.as_deref().map(crate::hook::HookUrl::parse) {
                Some(Ok(_)) => {}
                Some(Err(e)) => err("acme.dns01.url", e.to_string()),
                None => err("acme.dns01.url", "is required for the webhook provider".into()),
            },
            Dns01Provider::Rfc2136 => {
                if d.server.is_none() {
                    err("acme.dns01.server", "is required for the rfc2136 provider (IP:port)".into());
                }
                if d.tsig_key_name.as_deref().is_none_or(str::is_empty) {
                    err("acme.dns01.tsig_key_name", "is required for the rfc2136 provider".into());
                }
                if !matches!(d.tsig_algorithm.as_str(), "hmac-sha256" | "hmac-sha384" | "hmac-sha512") {
                    err("acme.dns01.tsig_algorithm", "must be hmac-sha256, hmac-sha384 or hmac-sha512".into());
                }
                match &d.tsig_secret_env {
                    Some(v) if is_env_name(v) => {}
                    _ => err("acme.dns01.tsig_secret_env", "must name the environment variable holding the base64 TSIG secret".into()),
                }
                if let Some(z) = &d.zone {
                    if crate::schema::Host::try_from(z.trim_end_matches('.')).is_err() {
                        err("acme.dns01.zone", "must be a domain name".into());
                    }
                }
            }
        }
    }
    let l = &a.limits;
    for (k, v) in [
        ("certs_per_domain_per_week", l.certs_per_domain_per_week),
        ("orders_per_3h", l.orders_per_3h),
        ("failures_per_host_per_hour", l.failures_per_host_per_hour),
        ("duplicates_per_week", l.duplicates_per_week),
    ] {
        if v == 0 || v > 100_000 {
            err(&format!("acme.limits.{k}"), "must be between 1 and 100000".into());
        }
    }
    errs
}
