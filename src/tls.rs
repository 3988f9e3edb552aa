//! TLS: the SNI certificate resolver and the certificates it serves (CONTRACT §9).
//!
//! ```text
//! handshake ── SniResolver::resolve ── CertIndex (one ArcSwap load, two hash lookups)
//!                                          ▲ exact name → one-label wildcard → default
//! certs_dir ── watcher thread ── parse ────┘ (rebuilt on change; a broken pair keeps its
//! ACME ─────── CertStore::save ── reload ──┘  previous certificate serving)
//! ```
//!
//! `resolve` does no I/O and takes no lock: it loads the current index and looks the
//! server name up. Everything that reads files or parses certificates runs on the
//! watcher thread or the ACME task.

pub mod default_cert;
pub mod store;

use ahash::RandomState;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

pub use store::{CertStore, DirStore, LoadError, WatchService, Watcher};

/// One certificate the edge can serve, with what the index and renewal need to know.
#[derive(Debug)]
pub struct Cert {
    /// DNS names it carries (subjectAltName), lower-case; wildcards as `*.parent`.
    pub names: Vec<String>,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The issuer's common name (or the whole issuer name when it has none).
    pub issuer: String,
    /// Where it came from: the store entry (certs_dir sub-directory) or `default`.
    pub source: String,
    /// Serial number and authority key identifier, DER contents (ARI's certificate id).
    pub serial: Vec<u8>,
    pub authority_key_id: Option<Vec<u8>>,
    pub key: Arc<CertifiedKey>,
}

impl Cert {
    /// When renewal starts: two thirds into the certificate's life.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before).max(0) * 2 / 3
    }

    /// Whether this certificate is valid for `name` (exact, or a one-label wildcard).
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|n| {
            n == name || (n.starts_with("*.") && name.split_once('.').is_some_and(|(l, p)| !l.is_empty() && l != "*" && p == &n[2..]))
        })
    }
}

type Map = HashMap<Box<str>, Arc<Cert>, RandomState>;

/// An immutable snapshot of every certificate by the names it serves.
#[derive(Debug)]
pub struct CertIndex {
    exact: Map,
    /// `*.example.com` under `example.com`.
    wildcard: Map,
    default: Arc<Cert>,
    certs: Vec<Arc<Cert>>,
}

impl CertIndex {
    /// Indexes `certs` by their names; where two certificates carry the same name, the
    /// one that stays valid longer wins. `default` answers every other name.
    pub fn new(default: Arc<Cert>, certs: Vec<Arc<Cert>>) -> CertIndex {
        let hasher = || RandomState::with_seeds(0x6365, 0x7274, 0x696e, 0x6478);
        let mut exact = Map::with_hasher(hasher());
        let mut wildcard = Map::with_hasher(hasher());
        for cert in &certs {
            for name in &cert.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                match map.get(key) {
                    Some(old) if old.not_after >= cert.not_after => {}
                    _ => {
                        map.insert(key.into(), cert.clone());
                    }
                }
            }
        }
        CertIndex { exact, wildcard, default, certs }
    }

    /// The certificate for `server_name`: exact name, then a one-label wildcard, then
    /// the default. Names are matched case-insensitively.
    pub fn resolve(&self, server_name: Option<&str>) -> &Arc<Cert> {
        let Some(name) = server_name else { return &self.default };
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.find(&name.to_ascii_lowercase()).unwrap_or(&self.default);
        }
        self.find(name).unwrap_or(&self.default)
    }

    fn find(&self, name: &str) -> Option<&Arc<Cert>> {
        if let Some(c) = self.exact.get(name) {
            return Some(c);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent)
    }

    /// The certificate that serves exactly `name` (`*.x` looks for the wildcard itself),
    /// never the default.
    pub fn covering(&self, name: &str) -> Option<&Arc<Cert>> {
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.get(parent),
            None => self.find(name),
        }
    }

    /// Every indexed certificate (not the default).
    pub fn certs(&self) -> &[Arc<Cert>] {
        &self.certs
    }

    pub fn default_cert(&self) -> &Arc<Cert> {
        &self.default
    }
}

/// The shared, swappable index.
pub type SharedIndex = Arc<ArcSwap<CertIndex>>;

/// rustls's certificate callback over the current [`CertIndex`].
#[derive(Debug)]
pub struct SniResolver {
    index: SharedIndex,
}

impl SniResolver {
    pub fn new(index: SharedIndex) -> SniResolver {
        SniResolver { index }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let index = self.index.load();
        Some(index.resolve(hello.server_name()).key.clone())
    }
}

#[cfg(test)]
mod tests;
