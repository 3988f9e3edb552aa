//! The authoritative routing state: the operators' TOML part plus the control-plane
//! (API) part, merged into one published [`RouteTable`].
//!
//! Writers (control API, TOML reload) take the store's mutex, build the candidate
//! state, check conflicts between the two parts, validate the merge as a whole, build
//! the table, persist the API part to `<state_dir>/state.json` (temp file, fsync,
//! rename, fsync of the directory) and only then publish the table with one atomic
//! store and acknowledge. A failure at any step changes nothing. The request path never
//! takes the mutex: it reads the published table.
//!
//! Generations only grow: every published table gets the next one, and the generation
//! is persisted with the API state, so a restart continues from it.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::{publish, RouteTable, SharedTable};
use crate::schema::{Domains, PlatformBranding};
use crate::schema::{Identified, State, StateError};
use crate::state::validate;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The merged state is invalid (first error's path is the API document's).
    #[error("{}", .0.first().map(|e| e.to_string()).unwrap_or_default())]
    Invalid(Vec<StateError>),
    /// An id or host is defined by the TOML file.
    #[error("{}", .0)]
    Conflict(StateError),
    /// `If-Match` named another generation.
    #[error("state is at generation {current}, not {expected}")]
    Stale { current: u64, expected: u64 },
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state could not be persisted; nothing was applied.
    #[error("cannot persist state: {0}")]
    Persist(#[source] std::io::Error),
}

/// What `state.json` holds.
#[derive(Serialize, Deserialize)]
struct Persisted {
    generation: u64,
    #[serde(flatten)]
    state: State,
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid state file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("the persisted state does not fit the config: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<StateError>),
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Inner {
    generation: u64,
    domains: Domains,
    branding: PlatformBranding,
    keys: Arc<crate::access::Keys>,
    toml: State,
    api: State,
}

/// The routing state and its published table.
pub struct Store {
    inner: Mutex<Inner>,
    routes: SharedTable,
    /// The generation of each table right after it is published: lets waiters (the
    /// waker) sleep until the table changes instead of polling it.
    changes: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("file", &self.file).finish()
    }
}

impl Store {
    /// Opens the store for `cfg`: loads the last acknowledged API state from
    /// `<state_dir>/state.json` when `persist` is true, merges it with the TOML routes
    /// and publishes the first table.
    pub fn open(cfg: &Config, metrics: Arc<Metrics>, persist: bool) -> Result<Store, OpenError> {
        let file = persist.then(|| cfg.server.state_dir.join("state.json"));
        let (generation, api) = match &file {
            Some(f) => load(f)?,
            None => (0, State::default()),
        };
        let generation = generation + 1;
        if let Some(f) = &file {
            if let Some(dir) = f.parent() {
                std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir { path: dir.to_owned(), source })?;
            }
        }
        let inner = Inner {
            generation,
            domains: cfg.domains.clone(),
            branding: cfg.branding.clone(),
            keys: cfg.keys.clone(),
            toml: cfg.state.clone(),
            api,
        };
        conflicts(&inner.toml, &inner.api).map_err(|e| OpenError::Invalid(vec![e]))?;
        let table = build(&inner, &inner.api, generation).map_err(OpenError::Invalid)?;
        metrics.generation.set(generation as i64);
        metrics.sandboxes.set(table.sandbox_count() as i64);
        let changes = tokio::sync::watch::channel(generation).0;
        let store = Store { inner: Mutex::new(inner), routes: Arc::new(ArcSwap::from_pointee(table)), changes, metrics, file };
        // Record the new generation so generations keep growing across restarts.
        if let Some(f) = &store.file {
            let g = store.lock();
            if let Err(e) = persist_file(f, g.generation, &g.api) {
                tracing::warn!(error = %e, file = %f.display(), "cannot write state file");
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A writer that panicked left `Inner` as it was before its write (all checks
        // happen on copies), so the data is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The published table (readers `load()` it once per request).
    pub fn routes(&self) -> SharedTable {
        self.routes.clone()
    }

    /// Notified with the new generation after every publish (the table is already
    /// visible through [`Self::routes`] when the notification arrives).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The generation of the published table.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The API-managed state and its generation.
    pub fn api_state(&self) -> (u64, State) {
        let g = self.lock();
        (g.generation, g.api.clone())
    }

    /// Runs `f` on the current generation, TOML part, API part and domains, under the
    /// writers' lock (readers of the published table are not affected).
    pub fn read<R>(&self, f: impl FnOnce(u64, &State, &State, &Domains) -> R) -> R {
        let g = self.lock();
        f(g.generation, &g.toml, &g.api, &g.domains)
    }

    /// Applies `change` to a copy of the API state; validates, persists and publishes
    /// the result, or changes nothing. `if_match` is the generation the caller saw.
    pub fn write_api(&self, if_match: Option<u64>, change: impl FnOnce(&mut State) -> Result<(), WriteError>) -> Result<u64, WriteError> {
        self.write(if_match, |old| {
            let mut api = old.clone();
            change(&mut api)?;
            Ok(api)
        })
    }

    /// Replaces the whole API state (`PUT /v1/state`) without copying the old one.
    pub fn replace_api(&self, if_match: Option<u64>, state: State) -> Result<u64, WriteError> {
        self.write(if_match, |_| Ok(state))
    }

    fn write(&self, if_match: Option<u64>, next: impl FnOnce(&State) -> Result<State, WriteError>) -> Result<u64, WriteError> {
        let mut g = self.lock();
        let result = (|| {
            if let Some(expected) = if_match {
                if expected != g.generation {
                    return Err(WriteError::Stale { current: g.generation, expected });
                }
            }
            let api = next(&g.api)?;
            conflicts(&g.toml, &api).map_err(WriteError::Conflict)?;
            let generation = g.generation + 1;
            let table = build(&g, &api, generation).map_err(WriteError::Invalid)?;
            if let Some(f) = &self.file {
                persist_file(f, generation, &api).map_err(WriteError::Persist)?;
            }
            self.publish(&mut g, table, generation);
            g.api = api;
            Ok(generation)
        })();
        self.metrics.state_write(result.is_ok());
        result
    }

    /// Replaces the TOML part (a reload). Conflicts with API objects are refused.
    pub fn replace_toml(&self, cfg: &Config) -> Result<u64, Vec<StateError>> {
        let mut g = self.lock();
        conflicts(&cfg.state, &g.api).map_err(|e| vec![e])?;
        let candidate = Inner {
            generation: g.generation,
            domains: cfg.domains.clone(),
            branding: cfg.branding.clone(),
            keys: cfg.keys.clone(),
            toml: cfg.state.clone(),
            api: State::default(),
        };
        let generation = g.generation + 1;
        let table = build(&candidate, &g.api, generation)?;
        if let Some(f) = &self.file {
            if let Err(e) = persist_file(f, generation, &g.api) {
                return Err(vec![StateError { path: String::new(), message: format!("cannot persist state: {e}") }]);
            }
        }
        self.publish(&mut g, table, generation);
        g.domains = candidate.domains;
        g.branding = candidate.branding;
        g.keys = candidate.keys;
        g.toml = candidate.toml;
        Ok(generation)
    }

    fn publish(&self, g: &mut Inner, table: RouteTable, generation: u64) {
        let sandboxes = table.sandbox_count();
        publish(&self.routes, table);
        // send_replace: delivered even when nobody subscribed yet.
        self.changes.send_replace(generation);
        g.generation = generation;
        self.metrics.generation.set(generation as i64);
        self.metrics.sandboxes.set(sandboxes as i64);
    }
}

/// Builds the table for the API state `api` on top of `base`'s TOML part. The API
/// objects come first in the merge so that error paths name the API document's
/// indices; errors in TOML objects are labelled as such.
fn build(base: &Inner, api: &State, generation: u64) -> Result<RouteTable, Vec<StateError>> {
    let toml = &base.toml;
    let no_toml_routes =
        toml.workspaces.is_empty() && toml.sandboxes.is_empty() && toml.share_tokens.is_empty() && toml.deployments.is_empty();
    // In production the TOML file usually holds no routes: skip copying a large API state.
    let merged;
    let whole = if no_toml_routes {
        api
    } else {
        merged = api.merged(toml);
        &merged
    };
    if let Err(errs) = validate(whole, &base.domains) {
        return Err(errs.into_iter().map(|e| relabel(e, api)).collect());
    }
    RouteTable::build_validated(&base.domains, &base.branding, whole, generation).map(|t| t.with_access(base.keys.clone())).map_err(|e| e.0)
}

/// Turns `sandboxes[7].x` into `toml: sandboxes[2].x` when index 7 is past the API
/// objects of that kind.
fn relabel(mut e: StateError, api: &State) -> StateError {
    let kinds = [
        ("workspaces", api.workspaces.len()),
        ("sandboxes", api.sandboxes.len()),
        ("share_tokens", api.share_tokens.len()),
        ("deployments", api.deployments.len()),
    ];
    for (kind, n) in kinds {
        let Some(rest) = e.path.strip_prefix(kind).and_then(|r| r.strip_prefix('[')) else { continue };
        let Some((idx, tail)) = rest.split_once(']') else { continue };
        if let Ok(i) = idx.parse::<usize>() {
            if i >= n {
                e.path = format!("toml: {kind}[{}]{tail}", i - n);
            }
        }
    }
    e
}

/// The first API object of one kind whose id the TOML part also defines.
fn shared_id<T: Identified>(toml: &[T], api: &[T], kind: &str, what: &str) -> Result<(), StateError> {
    let ids: HashSet<&str> = toml.iter().map(Identified::id_str).collect();
    match api.iter().enumerate().find(|(_, o)| ids.contains(o.id_str())) {
        Some((i, o)) => {
            Err(StateError { path: format!("{kind}[{i}].id"), message: format!("{what} `{}` is pinned by the TOML file", o.id_str()) })
        }
        None => Ok(()),
    }
}

/// An id or host defined in both parts.
fn conflicts(toml: &State, api: &State) -> Result<(), StateError> {
    let conflict = |path: String, what: String| Err(StateError { path, message: format!("{what} is pinned by the TOML file") });
    shared_id(&toml.workspaces, &api.workspaces, "workspaces", "workspace")?;
    shared_id(&toml.sandboxes, &api.sandboxes, "sandboxes", "sandbox")?;
    shared_id(&toml.share_tokens, &api.share_tokens, "share_tokens", "share token")?;
    shared_id(&toml.deployments, &api.deployments, "deployments", "deployment")?;
    let mut hosts: HashSet<&str> = HashSet::new();
    for w in &toml.workspaces {
        hosts.extend(w.preview_domain.iter().chain(w.deploy_domain.iter()).map(|d| d.host.as_str()));
    }
    for d in &toml.deployments {
        hosts.extend(d.domains.iter().map(|d| d.host.as_str()));
    }
    for (i, w) in api.workspaces.iter().enumerate() {
        for (key, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
            if let Some(d) = d.as_ref().filter(|d| hosts.contains(d.host.as_str())) {
                return conflict(format!("workspaces[{i}].{key}.host"), format!("host `{}`", d.host));
            }
        }
    }
    for (i, dep) in api.deployments.iter().enumerate() {
        for (j, d) in dep.domains.iter().enumerate() {
            if hosts.contains(d.host.as_str()) {
                return conflict(format!("deployments[{i}].domains[{j}].host"), format!("host `{}`", d.host));
            }
        }
    }
    Ok(())
}

fn load(file: &Path) -> Result<(u64, State), OpenError> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, State::default())),
        Err(source) => return Err(OpenError::Read { path: file.to_owned(), source }),
    };
    let p: Persisted = serde_json::from_slice(&text).map_err(|e| OpenError::Corrupt { path: file.to_owned(), message: e.to_string() })?;
    Ok((p.generation, p.state))
}

/// Writes `bytes` to `path` so readers see the old file or the new one, never a part:
/// a temp file beside it (created with `mode`), fsync, rename, fsync of the directory.
/// For small files (keys, tokens, certificates, ledgers); `state.json` streams its own.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // the rename itself is durable once the directory is synced (best effort)
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `state.json` durably: temp file, fsync, rename, fsync of the directory.
fn persist_file(file: &Path, generation: u64, api: &State) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Out<'a> {
        generation: u64,
        #[serde(flatten)]
        state: &'a State,
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(".state.json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(&mut f);
        serde_json::to_writer(&mut w, &Out { generation, state: api }).map_err(std::io::Error::other)?;
        w.flush()?;
        drop(w);
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
