//! Certificate storage (certbot layout) and the watcher that keeps the index current.
//!
//! The store is a small trait so a store shared by several edge nodes can replace the
//! directory without touching the resolver or the watcher.

use super::{Cert, CertIndex, SharedIndex};
use crate::metrics::Metrics;
use crate::services::{Service, Shutdown};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest PEM file read from a store (a chain of a few certificates is ~10 KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Where certificates are kept: entries of a certificate chain and its private key.
pub trait CertStore: Send + Sync + fmt::Debug {
    /// Every entry with a stamp that changes whenever either of its files may have.
    fn list(&self) -> io::Result<Vec<(String, u64)>>;
    /// An entry's full chain and private key, PEM.
    fn read(&self, entry: &str) -> io::Result<(Vec<u8>, Vec<u8>)>;
    /// Writes an entry (replacing it); readers never see a half-written file.
    fn save(&self, entry: &str, fullchain: &[u8], privkey: &[u8]) -> io::Result<()>;
    /// Removes an entry (a missing one is not an error).
    fn remove(&self, entry: &str) -> io::Result<()>;
    /// Whether `entry` was obtained by ACME for the fleet rather than placed by the
    /// operator (a directory holds the operator's files, and ACME's where it manages the
    /// names: the caller knows those).
    fn obtained_by_acme(&self, _entry: &str) -> bool {
        false
    }
}

/// `<dir>/<entry>/fullchain.pem` + `<dir>/<entry>/privkey.pem` (certbot's live layout;
/// symbolic links, as certbot makes them, are followed).
#[derive(Debug)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<DirStore> {
        std::fs::create_dir_all(dir)?;
        Ok(DirStore { dir: dir.to_owned() })
    }
}

fn stamp(path: &Path) -> io::Result<u64> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev()).hash(&mut h);
    Ok(h.finish())
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(MAX_PEM_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_PEM_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is larger than {MAX_PEM_BYTES} bytes", path.display())));
    }
    Ok(out)
}

/// An entry name the store accepts: one path component, no hidden files.
pub fn valid_entry(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl CertStore for DirStore {
    /// Removes an entry (both files and its directory).
    fn remove(&self, entry: &str) -> io::Result<()> {
        if !valid_entry(entry) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid certificate entry name {entry:?}")));
        }
        match std::fs::remove_dir_all(self.dir.join(entry)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            if !valid_entry(&name) {
                continue;
            }
            let p = e.path();
            let (Ok(a), Ok(b)) = (stamp(&p.join("fullchain.pem")), stamp(&p.join("privkey.pem"))) else { continue };
            out.push((name, a ^ b.rotate_left(17)));
        }
        out.sort();
        Ok(out)
    }

    fn read(&self, entry: &str) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let p = self.dir.join(entry);
        Ok((read_bounded(&p.join("fullchain.pem"))?, read_bounded(&p.join("privkey.pem"))?))
    }

    fn save(&self, entry: &str, fullchain: &[u8], privkey: &[u8]) -> io::Result<()> {
        if !valid_entry(entry) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid certificate entry name {entry:?}")));
        }
        let d = self.dir.join(entry);
        std::fs::create_dir_all(&d)?;
        // Key first: a reader that sees the new key with the old chain finds a mismatch,
        // keeps the old certificate, and rereads when the chain's stamp changes.
        crate::files::write_atomic(&d.join("privkey.pem"), privkey, 0o600)?;
        crate::files::write_atomic(&d.join("fullchain.pem"), fullchain, 0o644)
    }
}

/// A store entry that could not be used.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadError {
    pub entry: String,
    pub error: String,
    /// Unix seconds.
    pub at: i64,
}

/// Parses a PEM chain and key into a servable certificate.
pub fn parse_pair(source: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Cert, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem).collect::<Result<_, _>>().map_err(|e| format!("fullchain.pem: {e}"))?;
    let Some(leaf) = chain.first().cloned() else { return Err("fullchain.pem: no certificate".into()) };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("privkey.pem: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("certificate and key: {e}"))?;
    let (_, x) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| format!("fullchain.pem: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if !d.is_empty() && !names.contains(&d) {
                    names.push(d);
                }
            }
        }
    }
    if names.is_empty() {
        return Err("the certificate carries no DNS name (subjectAltName)".into());
    }
    let issuer =
        x.issuer().iter_common_name().next().and_then(|c| c.as_str().ok()).map(str::to_owned).unwrap_or_else(|| x.issuer().to_string());
    let authority_key_id = x.extensions().iter().find_map(|e| match e.parsed_extension() {
        x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    Ok(Cert {
        names,
        not_before: x.validity().not_before.timestamp(),
        not_after: x.validity().not_after.timestamp(),
        issuer,
        source: source.to_owned(),
        serial: x.tbs_certificate.raw_serial().to_vec(),
        authority_key_id,
        key: Arc::new(key),
    })
}

struct Entry {
    stamp: u64,
    good: Option<Arc<Cert>>,
    error: Option<LoadError>,
}

/// Keeps the shared [`CertIndex`] in step with a [`CertStore`].
pub struct Watcher {
    /// Replaced when a reload names another `certs_dir`.
    store: arc_swap::ArcSwap<Arc<dyn CertStore>>,
    index: SharedIndex,
    default: Arc<Cert>,
    entries: Mutex<HashMap<String, Entry>>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher").field("store", &self.store.load()).finish()
    }
}

impl Watcher {
    /// A watcher serving `default` for unknown names; call [`Watcher::scan`] to load.
    pub fn new(store: Arc<dyn CertStore>, default: Arc<Cert>, metrics: Arc<Metrics>) -> Watcher {
        let index = Arc::new(arc_swap::ArcSwap::from_pointee(CertIndex::new(default.clone(), Vec::new())));
        Watcher { store: arc_swap::ArcSwap::from_pointee(store), index, default, entries: Mutex::new(HashMap::new()), metrics }
    }

    pub fn index(&self) -> SharedIndex {
        self.index.clone()
    }

    /// The store being watched now.
    pub fn store(&self) -> Arc<dyn CertStore> {
        Arc::clone(&self.store.load())
    }

    /// Watches `store` instead (a reload named another `certs_dir`) and reads it at
    /// once: the certificates of the old store stop being served, those of the new one
    /// are served from this call on. Returns whether the index changed.
    pub fn replace_store(&self, store: Arc<dyn CertStore>) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.store.store(Arc::new(store));
        // Stamps of the old store say nothing about the new one's files.
        entries.clear();
        drop(entries);
        self.rescan(true)
    }

    /// Rereads changed entries and publishes a new index if anything changed. A pair
    /// that fails to load keeps its previous certificate serving. Returns whether the
    /// index changed.
    pub fn scan(&self) -> bool {
        self.rescan(false)
    }

    /// [`Watcher::scan`]; `publish` publishes a new index even if no entry changed.
    fn rescan(&self, publish: bool) -> bool {
        let store = self.store();
        let listed = match store.list() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the certificate store; keeping the certificates being served");
                return false;
            }
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = publish;
        let before = entries.len();
        entries.retain(|name, _| listed.iter().any(|(n, _)| n == name));
        changed |= entries.len() != before;
        for (name, stamp) in listed {
            if entries.get(&name).is_some_and(|e| e.stamp == stamp) {
                continue;
            }
            let parsed = store.read(&name).map_err(|e| e.to_string()).and_then(|(c, k)| parse_pair(&name, &c, &k));
            let old = entries.remove(&name).and_then(|e| e.good);
            let entry = match parsed {
                Ok(cert) => {
                    tracing::info!(entry = %name, names = ?cert.names, not_after = cert.not_after, issuer = %cert.issuer, "certificate loaded");
                    changed = true;
                    Entry { stamp, good: Some(Arc::new(cert)), error: None }
                }
                Err(error) => {
                    tracing::error!(entry = %name, %error, kept_previous = old.is_some(), "certificate pair cannot be used");
                    Entry { stamp, good: old, error: Some(LoadError { entry: name.clone(), error, at: crate::clock::unix_now() }) }
                }
            };
            entries.insert(name, entry);
        }
        if changed {
            let certs: Vec<Arc<Cert>> = entries.values().filter_map(|e| e.good.clone()).collect();
            self.metrics.certificate_expiry.reset();
            for c in &certs {
                self.metrics.certificate_expiry.with_label_values(&[&c.source]).set(c.not_after as f64);
            }
            self.metrics.certificate_expiry.with_label_values(&["default"]).set(self.default.not_after as f64);
            self.index.store(Arc::new(CertIndex::new(self.default.clone(), certs)));
        }
        changed
    }

    /// Entries that could not be loaded at their last change.
    pub fn errors(&self) -> Vec<LoadError> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<LoadError> = entries.values().filter_map(|e| e.error.clone()).collect();
        out.sort_by(|a, b| a.entry.cmp(&b.entry));
        out
    }
}

/// Rescans a [`Watcher`]'s store every `interval` (the scan reads files: it runs on the
/// blocking pool).
pub struct WatchService {
    pub watcher: Arc<Watcher>,
    /// In milliseconds; a reload may change it (read before each wait).
    pub interval_ms: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl Service for WatchService {
    fn name(&self) -> &'static str {
        "certificate watch"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(self.interval_ms.load(std::sync::atomic::Ordering::Relaxed))) => {}
                _ = shutdown.wait() => return,
            }
            let w = self.watcher.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || w.scan()).await {
                tracing::error!(error = %e, "certificate scan failed");
            }
        }
    }
}
