//! Static releases (CONTRACT §7): fetched from the release store, verified, unpacked
//! into the cache, indexed, and served by the edge itself.
//!
//! Data flow: a background service is told of every published routing table; each new
//! generation names the static releases of every version ([`RouteTable::static_releases`]),
//! and any not yet cached is fetched at once ([`store`] → [`unpack`] → [`serve::Release`]),
//! so activating a pushed version is a pointer move with nothing left to download. A
//! request for a release still being fetched waits up to `[static] wait_ms`, then gets
//! 503 `release_unavailable`; a failed fetch is retried with backoff.
//!
//! The same service remembers, per deployment, the static release it served before the
//! last switch and when the switch happened: for `skew_window_secs` after it, a
//! fingerprinted asset missing from the new release is served from the previous one, so
//! tabs opened before the deploy keep loading their chunks. This memory is kept in
//! `<cache_dir>/skew.json`, so it survives restarts.
//!
//! Eviction keeps the unpacked cache under `cache_max_bytes`, least recently used first,
//! and never removes a release that is active, protected by skew, or being served (an
//! `Arc` held by a request: the check and the removal happen under the map's write lock,
//! which a request needs to take its `Arc`).

use crate::metrics::Metrics;
use crate::routing::{RouteTable, SharedTable};
use crate::schema::StateError;
use crate::services::{Service, Shutdown};
use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde::Deserialize;
use serve::Release;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use store::ReleaseStore;
use tokio::sync::watch;

pub mod serve;
pub mod store;
#[cfg(test)]
mod tests;
pub mod unpack;

/// `[static]`: static releases (CONTRACT §7).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Static {
    /// Where `<sha256>.tar.gz` archives are: a directory (relative to the working
    /// directory), or `s3://bucket/prefix` (credentials and endpoint from `AWS_*` or
    /// `STORAGE_*` variables).
    #[serde(default = "default_store")]
    pub store: String,
    /// Where archives are unpacked; default `<state_dir>/releases`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Unpacked releases kept on disk; least recently used ones beyond this are removed
    /// (never one that is active or being served).
    #[serde(default = "default_cache_max_bytes")]
    pub cache_max_bytes: u64,
    /// Largest archive fetched.
    #[serde(default = "default_max_archive_bytes")]
    pub max_archive_bytes: u64,
    /// Largest total of unpacked file sizes.
    #[serde(default = "default_max_unpacked_bytes")]
    pub max_unpacked_bytes: u64,
    /// Most entries in an archive.
    #[serde(default = "default_max_files")]
    pub max_files: u64,
    /// How long a request waits for a release still being fetched before answering
    /// 503 `release_unavailable`.
    #[serde(default = "default_release_wait_ms")]
    pub wait_ms: u64,
    /// After a deployment switches static releases, fingerprinted assets missing from
    /// the new one are served from the previous one for this long (skew protection).
    #[serde(default = "default_skew_window_secs")]
    pub skew_window_secs: u64,
    /// Files up to this size are served from memory; larger ones stream from disk.
    #[serde(default = "default_memory_file_bytes")]
    pub memory_file_bytes: u64,
}

fn default_store() -> String {
    "releases".into()
}
fn default_cache_max_bytes() -> u64 {
    10 << 30
}
fn default_max_archive_bytes() -> u64 {
    1 << 30
}
fn default_max_unpacked_bytes() -> u64 {
    2 << 30
}
fn default_max_files() -> u64 {
    50_000
}
fn default_release_wait_ms() -> u64 {
    10_000
}
fn default_skew_window_secs() -> u64 {
    86_400
}
fn default_memory_file_bytes() -> u64 {
    256 << 10
}

impl Default for Static {
    fn default() -> Self {
        Static {
            store: default_store(),
            cache_dir: None,
            cache_max_bytes: default_cache_max_bytes(),
            max_archive_bytes: default_max_archive_bytes(),
            max_unpacked_bytes: default_max_unpacked_bytes(),
            max_files: default_max_files(),
            wait_ms: default_release_wait_ms(),
            skew_window_secs: default_skew_window_secs(),
            memory_file_bytes: default_memory_file_bytes(),
        }
    }
}

impl Static {
    /// The section's own rules, each error with its key path.
    pub fn check(&self) -> Vec<StateError> {
        let st = self;
        let mut errs = Vec::new();
        if let Err(m) = store::check_spec(&st.store) {
            errs.push(StateError { path: "static.store".into(), message: m });
        }
        for (key, v, min, max) in [
            ("cache_max_bytes", st.cache_max_bytes, 1 << 20, u64::MAX),
            ("max_archive_bytes", st.max_archive_bytes, 1024, 64 << 30),
            ("max_unpacked_bytes", st.max_unpacked_bytes, 1024, 256 << 30),
            ("max_files", st.max_files, 1, 10_000_000),
            ("wait_ms", st.wait_ms, 0, 600_000),
            ("skew_window_secs", st.skew_window_secs, 0, 30 * 86_400),
            ("memory_file_bytes", st.memory_file_bytes, 0, 64 << 20),
        ] {
            if v < min || v > max {
                errs.push(StateError { path: format!("static.{key}"), message: format!("must be between {min} and {max}") });
            }
        }
        errs
    }
}

/// Wait before a failed fetch is tried again (doubling up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Releases unpacked or indexed at the same time.
const UNPACKS_AT_ONCE: usize = 2;
/// How often the manager looks at the table without being told of a change.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

enum Slot {
    /// Being fetched; the receiver changes when it is done (either way).
    Fetching(watch::Receiver<()>),
    Ready(Arc<Release>),
    Failed {
        error: Arc<str>,
        at: Instant,
        backoff: Duration,
    },
}

/// What the edge remembers of a deployment's static releases (persisted in
/// `<cache_dir>/skew.json`, so a restart keeps skew protection).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Skew {
    #[serde(with = "hex32")]
    current: [u8; 32],
    #[serde(with = "hex32_opt")]
    previous: Option<[u8; 32]>,
    switched_at: SystemTime,
}

mod hex32 {
    pub fn serialize<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::unpack::hex(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        crate::schema::Sha256::try_from(s).map(|h| h.0).map_err(serde::de::Error::custom)
    }
}

mod hex32_opt {
    pub fn serialize<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::hex32::serialize(v, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        s.map(|s| crate::schema::Sha256::try_from(s).map(|h| h.0).map_err(serde::de::Error::custom)).transpose()
    }
}

/// The release cache and its fetcher.
pub struct Releases {
    /// `[static]`, replaced by config reloads (but `cache_dir`, fixed at start).
    cfg: ArcSwap<Static>,
    cache_dir: PathBuf,
    store: ArcSwap<Arc<dyn ReleaseStore>>,
    slots: DashMap<[u8; 32], Slot, ahash::RandomState>,
    skew: DashMap<Box<str>, Skew, ahash::RandomState>,
    runtime: tokio::runtime::Handle,
    /// Bounds the unpacks and indexings running at once on the blocking pool.
    unpacking: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    routes: SharedTable,
    changes: watch::Receiver<u64>,
}

impl std::fmt::Debug for Releases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releases").field("cache_dir", &self.cache_dir).field("store", &self.store.load()).finish()
    }
}

#[async_trait::async_trait]
impl Service for Releases {
    fn name(&self) -> &'static str {
        "static releases"
    }

    /// Observes every published table until the process begins to stop.
    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut changes = self.changes.clone();
        let mut seen = u64::MAX;
        loop {
            let table = self.routes.load_full();
            if table.generation != seen {
                seen = table.generation;
                self.observe(&table, SystemTime::now());
            }
            // Woken by every publish; the timeout only guards against a missed one.
            tokio::select! {
                r = tokio::time::timeout(WATCH_INTERVAL, changes.changed()) => {
                    if matches!(r, Ok(Err(_))) {
                        // No more publishes (the store is gone): look now and then.
                        tokio::time::sleep(WATCH_INTERVAL).await;
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// Read size when streaming a large static file from disk.
const STATIC_CHUNK: usize = 64 << 10;

/// Sends `len` bytes of the file at `path` from `offset` as the response body, in
/// chunks as the client takes them (the end of the body is the last chunk's).
pub async fn stream_file(session: &mut pingora::proxy::Session, path: &Path, offset: u64, len: u64) -> pingora::Result<()> {
    use pingora::{Error, ErrorType};
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let io = |e: std::io::Error| Error::because(ErrorType::InternalError, "reading a static release file", e);
    let mut f = tokio::fs::File::open(path).await.map_err(io)?;
    f.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
    let mut left = len;
    while left > 0 {
        let mut buf = bytes::BytesMut::with_capacity(STATIC_CHUNK.min(left as usize));
        let n = f.read_buf(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Error::e_explain(ErrorType::InternalError, "static release file shrank while being served");
        }
        left -= n as u64;
        session.write_response_body(Some(buf.freeze()), left == 0).await?;
    }
    Ok(())
}

/// Up to `len` bytes of `path` from `offset` as the next part of the response body, sent
/// by the kernel from the file (sendfile) without copying them through the edge, for as
/// long as the client's socket takes them without waiting. Returns how many were sent:
/// the caller writes the rest, all of it where the connection does not allow this (TLS,
/// HTTP/2) or the file cannot be opened. `open`: the file kept open by its release
/// (`path` is then not opened); sendfile reads it at `offset` without moving its
/// position, so requests share it.
pub async fn send_file(
    session: &mut pingora::proxy::Session,
    open: Option<&std::fs::File>,
    path: &Path,
    offset: u64,
    len: u64,
) -> pingora::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = usize::try_from(len) else { return Ok(0) };
        let opened;
        let file = match open {
            Some(f) => f,
            // A local file of a release in the page cache: opening it does not wait on a disk.
            None => match std::fs::File::open(path) {
                Ok(f) => {
                    opened = f;
                    &opened
                }
                Err(_) => return Ok(0),
            },
        };
        session.downstream_session.write_body_file(file.as_raw_fd(), offset, len).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (session, open, path, offset, len);
        Ok(0)
    }
}

/// Why a release cannot be served now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReleaseError {
    #[error("release {0} is still being fetched")]
    NotReady(String),
    #[error("release {sha} failed: {error}")]
    Failed { sha: String, error: Arc<str> },
}

impl Releases {
    /// The release manager following `routes` (start it as a service); releases are
    /// unpacked under `[static] cache_dir` (default `<state_dir>/releases`) by work
    /// spawned on `runtime` (the services' runtime: never a proxy thread).
    pub fn new(
        cfg: &Static,
        state_dir: &Path,
        store: Arc<dyn ReleaseStore>,
        routes: SharedTable,
        changes: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Releases>> {
        let cache_dir = cfg.cache_dir.clone().unwrap_or_else(|| state_dir.join("releases"));
        std::fs::create_dir_all(&cache_dir)?;
        // Leftovers of an interrupted unpack or download.
        for e in std::fs::read_dir(&cache_dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
        let releases = Arc::new(Releases {
            cfg: ArcSwap::from_pointee(cfg.clone()),
            cache_dir,
            store: ArcSwap::from_pointee(store),
            slots: DashMap::with_hasher(ahash::RandomState::new()),
            skew: DashMap::with_hasher(ahash::RandomState::new()),
            runtime,
            unpacking: Arc::new(tokio::sync::Semaphore::new(UNPACKS_AT_ONCE)),
            metrics,
            routes,
            changes,
        });
        releases.load_skew();
        Ok(releases)
    }

    /// Reacts to a new table: fetches missing releases, tracks switches for skew
    /// protection, evicts beyond the cache bound.
    pub fn observe(self: &Arc<Self>, table: &RouteTable, now: SystemTime) {
        for (sha, _) in table.static_releases() {
            self.ensure(sha);
        }
        let mut changed = false;
        for d in table.deployments() {
            let Some(sha) = d.static_release() else { continue };
            let mut e = self.skew.entry(d.id.clone()).or_insert_with(|| {
                changed = true;
                Skew { current: sha, previous: None, switched_at: now }
            });
            if e.current != sha {
                e.previous = Some(e.current);
                e.current = sha;
                e.switched_at = now;
                changed = true;
            }
        }
        let before = self.skew.len();
        let ids: std::collections::HashSet<&str> = table.deployments().map(|d| &*d.id).collect();
        self.skew.retain(|id, _| ids.contains(&**id));
        if changed || self.skew.len() != before {
            self.save_skew();
        }
        self.evict(table, now);
    }

    /// Starts fetching `sha` unless it is cached, being fetched, or failed recently.
    fn ensure(self: &Arc<Self>, sha: [u8; 32]) {
        let (tx, rx) = watch::channel(());
        let last_backoff = match self.slots.entry(sha) {
            dashmap::Entry::Vacant(v) => {
                v.insert(Slot::Fetching(rx));
                Duration::ZERO
            }
            dashmap::Entry::Occupied(mut o) => {
                let last = match o.get() {
                    Slot::Ready(_) | Slot::Fetching(_) => return,
                    Slot::Failed { at, backoff, .. } if at.elapsed() < *backoff => return,
                    Slot::Failed { backoff, .. } => *backoff,
                };
                o.insert(Slot::Fetching(rx));
                last
            }
        };
        let this = self.clone();
        self.runtime.spawn(async move {
            let result = this.fetch(sha).await;
            let hex = unpack::hex(&sha);
            match result {
                Ok(release) => {
                    tracing::info!(release = %hex, files = release.len(), bytes = release.disk_bytes, "static release ready");
                    this.metrics.release_fetch(true);
                    this.slots.insert(sha, Slot::Ready(Arc::new(release)));
                    this.evict(&this.routes.load(), SystemTime::now());
                }
                Err(e) => {
                    tracing::warn!(release = %hex, error = %e, "static release unavailable");
                    this.metrics.release_fetch(false);
                    let backoff = if last_backoff.is_zero() { FIRST_BACKOFF } else { (last_backoff * 2).min(MAX_BACKOFF) };
                    this.slots.insert(sha, Slot::Failed { error: e.into(), at: Instant::now(), backoff });
                }
            }
            this.update_gauges();
            drop(tx); // wakes every waiter
        });
    }

    async fn fetch(&self, sha: [u8; 32]) -> Result<Release, String> {
        let cfg = self.cfg.load_full();
        let store = Arc::clone(&self.store.load());
        let hex = unpack::hex(&sha);
        let dir = self.cache_dir.join(&hex);
        if !dir.is_dir() {
            let archive = self.cache_dir.join(format!(".dl-{hex}-{}", std::process::id()));
            let fetched = store.fetch(&format!("{hex}.tar.gz"), &archive, cfg.max_archive_bytes).await;
            if let Err(e) = fetched {
                let _ = tokio::fs::remove_file(&archive).await;
                return Err(e.to_string());
            }
            let limits = unpack::Limits { max_files: cfg.max_files, max_unpacked_bytes: cfg.max_unpacked_bytes };
            let (a, d) = (archive.clone(), dir.clone());
            let _permit = self.unpacking.acquire().await.map_err(|_| "the release manager is stopping".to_string())?;
            let unpacked = tokio::task::spawn_blocking(move || unpack::verify_and_unpack(&a, &sha, &d, limits)).await;
            let _ = tokio::fs::remove_file(&archive).await;
            match unpacked {
                Ok(Ok(())) => {}
                Ok(Err(e)) if dir.is_dir() => tracing::debug!(error = %e, "another fetch unpacked it first"),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(format!("unpack task failed: {e}")),
            }
        }
        let mem = cfg.memory_file_bytes;
        let _permit = self.unpacking.acquire().await.map_err(|_| "the release manager is stopping".to_string())?;
        tokio::task::spawn_blocking(move || Release::load(sha, &dir, mem))
            .await
            .map_err(|e| format!("index task failed: {e}"))?
            .map_err(|e| format!("cannot index the unpacked release: {e}"))
    }

    /// Applies a reloaded `[static]` (its `cache_dir` excepted: fixed at start) and
    /// fetches from `store` from now on. Fetches under way finish with the settings
    /// they started with; releases that failed are tried again at once (the new store
    /// may have them). Cache limits apply at the next look at the table.
    pub fn reconfigure(&self, cfg: &Static, store: Arc<dyn ReleaseStore>) {
        self.cfg.store(Arc::new(cfg.clone()));
        self.store.store(Arc::new(store));
        self.slots.retain(|_, slot| !matches!(slot, Slot::Failed { .. }));
        self.evict(&self.routes.load_full(), SystemTime::now());
    }

    /// The release `sha`, waiting up to `wait` for a fetch in progress.
    pub async fn get(self: &Arc<Self>, sha: &[u8; 32], wait: Duration) -> Result<Arc<Release>, ReleaseError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Decide under the map's shard lock, act after it is released (`ensure`
            // takes the same shard's write lock).
            let waiting = match self.slots.get(sha).as_deref() {
                Some(Slot::Ready(r)) => {
                    r.touch(crate::clock::unix_now().max(0) as u64);
                    return Ok(r.clone());
                }
                Some(Slot::Fetching(rx)) => Some(rx.clone()),
                Some(Slot::Failed { error, at, backoff }) if at.elapsed() < *backoff => {
                    return Err(ReleaseError::Failed { sha: unpack::hex(sha), error: error.clone() });
                }
                _ => None,
            };
            let Some(mut rx) = waiting else {
                self.ensure(*sha);
                continue;
            };
            // Resolves when the fetch finishes (the sender is dropped).
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(ReleaseError::NotReady(unpack::hex(sha)));
            }
            if let Some(Slot::Failed { error, .. }) = self.slots.get(sha).as_deref() {
                return Err(ReleaseError::Failed { sha: unpack::hex(sha), error: error.clone() });
            }
        }
    }

    /// The previous release of `deployment` while skew protection applies to its
    /// current release `current` (and the previous one is cached).
    pub fn previous(&self, deployment: &str, current: &[u8; 32]) -> Option<Arc<Release>> {
        let window = self.cfg.load().skew_window_secs;
        let skew = self.skew.get(deployment)?;
        let previous = if skew.current == *current {
            if skew.switched_at.elapsed().unwrap_or_default() > Duration::from_secs(window) {
                return None;
            }
            skew.previous?
        } else {
            // The switch is younger than the manager's last look at the table (it
            // polls): what it saw as current is the previous release.
            if window == 0 {
                return None;
            }
            skew.current
        };
        match self.slots.get(&previous).as_deref() {
            Some(Slot::Ready(r)) => Some(r.clone()),
            _ => None,
        }
    }

    fn evict(&self, table: &RouteTable, now: SystemTime) {
        // (sha, bytes, last use) of every cached release; no `Arc` is kept, so the
        // reference count below counts only the slot and requests.
        let mut ready: Vec<([u8; 32], u64, u64)> = self
            .slots
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Ready(r) => Some((*e.key(), r.disk_bytes, r.last_used.load(std::sync::atomic::Ordering::Relaxed))),
                _ => None,
            })
            .collect();
        let cfg = self.cfg.load_full();
        let mut total: u64 = ready.iter().map(|(_, bytes, _)| bytes).sum();
        if total <= cfg.cache_max_bytes {
            self.update_gauges();
            return;
        }
        let window = Duration::from_secs(cfg.skew_window_secs);
        let protected: std::collections::HashSet<[u8; 32]> = table
            .static_releases()
            .filter(|(_, active)| *active)
            .map(|(s, _)| s)
            .chain(self.skew.iter().filter(|s| now.duration_since(s.switched_at).unwrap_or_default() <= window).filter_map(|s| s.previous))
            .collect();
        ready.sort_by_key(|(_, _, last_used)| *last_used);
        for (sha, bytes, _) in ready {
            if total <= cfg.cache_max_bytes {
                break;
            }
            if protected.contains(&sha) {
                continue;
            }
            // Removed only if no request holds it, decided under the map's write lock:
            // a request takes its `Arc` under the read lock, so none can take it after
            // this check, and none that took it before can be reading the files.
            let removed = self.slots.remove_if(&sha, |_, slot| matches!(slot, Slot::Ready(r) if Arc::strong_count(r) == 1));
            let Some((_, Slot::Ready(r))) = removed else { continue };
            total = total.saturating_sub(bytes);
            tracing::info!(release = %unpack::hex(&sha), bytes, "static release evicted from the cache");
            // Renamed out of the way at once, so a fetch that starts now never sees a
            // half-deleted directory; deleted in the background.
            let doomed = self.cache_dir.join(format!(".evict-{}-{}", unpack::hex(&sha), unix_nanos()));
            match std::fs::rename(&r.root, &doomed) {
                Ok(()) => {
                    self.runtime.spawn_blocking(move || std::fs::remove_dir_all(doomed));
                }
                Err(e) => tracing::warn!(release = %unpack::hex(&sha), error = %e, "cannot remove an evicted release"),
            }
        }
        self.update_gauges();
    }

    fn skew_file(&self) -> PathBuf {
        self.cache_dir.join("skew.json")
    }

    /// Writes the skew memory (temp file + rename; losing it costs only skew protection).
    fn save_skew(&self) {
        let map: std::collections::BTreeMap<String, Skew> = self.skew.iter().map(|e| (e.key().to_string(), e.value().clone())).collect();
        let result = serde_json::to_vec(&map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::files::write_atomic(&self.skew_file(), &bytes, 0o644));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot save the static releases' skew memory");
        }
    }

    /// Reads the skew memory of an earlier run, if any.
    fn load_skew(&self) {
        let Ok(bytes) = std::fs::read(self.skew_file()) else { return };
        match serde_json::from_slice::<std::collections::BTreeMap<String, Skew>>(&bytes) {
            Ok(map) => {
                for (id, s) in map {
                    self.skew.insert(id.into(), s);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring an unreadable skew.json"),
        }
    }

    fn update_gauges(&self) {
        let (mut n, mut bytes) = (0i64, 0i64);
        for e in self.slots.iter() {
            if let Slot::Ready(r) = e.value() {
                n += 1;
                bytes += r.disk_bytes as i64;
            }
        }
        self.metrics.releases_cached.set(n);
        self.metrics.release_cache_bytes.set(bytes);
    }
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
