//! Live reload of the operators' TOML file: SIGHUP, or a change seen by polling.
//!
//! validate → build → swap: the file is parsed and validated whole, merged with the
//! control-plane state by the [`Store`] (conflicts refused), a new table is built off
//! the request path, and only then published with one atomic store. A file that fails
//! keeps the old table serving; every error is logged with its key path and
//! line:column and the failure is counted in
//! `miosa_edge_config_reloads_total{result="error"}`. Requests in flight hold the table
//! they started with (an `Arc`), so none fails because of a swap.
//!
//! The sections beside the routing state (`[wake]`, `[tls]`, `[static]`, `[acme]`,
//! `[control] max_body_bytes`, the `[server]` timeouts and per-IP cap, `[log] access`,
//! `[dns] nameservers`) are applied by an [`Apply`] given by start-up: it builds every new
//! piece first (nothing started, nothing published), and only once the routing state
//! took the file are they swapped in. A piece that cannot be built refuses the whole
//! file, like a parse error. What is fixed at start — listener addresses, threads,
//! `state_dir`, `[control] listen` and `token_env`, `[static] cache_dir`, `[cluster]`
//! (the node's identity) — is logged as needing a restart when it changes; the rest applies.

use crate::config::{Config, ConfigError, ConfigIssue};
use crate::metrics::Metrics;
use crate::services::{Service, Shutdown};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Builds the pieces of a new config that live outside the routing state.
pub trait Apply: Send + Sync {
    /// Builds what `new` needs where it differs from `old` (the config in force), without
    /// starting or publishing anything; the returned [`Commit`] swaps it in. An error is
    /// a list of issues with their key paths: the whole file is then refused.
    fn prepare(&self, old: &Config, new: &Config) -> Result<Commit, Vec<ConfigIssue>>;
}

/// Publishes what [`Apply::prepare`] built.
pub type Commit = Box<dyn FnOnce() + Send>;

/// Reloads one config file into the store.
pub struct Reloader {
    /// `None` for the embedded default: SIGHUP is then acknowledged and ignored.
    path: Option<PathBuf>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    started_with: Config,
    /// The config in force (the last one reloaded).
    current: std::sync::Mutex<Config>,
    apply: Option<Arc<dyn Apply>>,
}

/// What identifies a version of the file on disk without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn fingerprint(path: &std::path::Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint { modified: m.modified().ok(), len: m.len(), inode: m.ino() })
}

impl Reloader {
    /// A reloader for the file `started_with` came from.
    pub fn new(started_with: Config, store: Arc<Store>, metrics: Arc<Metrics>) -> Reloader {
        let current = std::sync::Mutex::new(started_with.clone());
        Reloader { path: started_with.source.clone(), store, metrics, started_with, current, apply: None }
    }

    /// Applies the sections beside the routing state with `apply`.
    pub fn with_apply(mut self, apply: Arc<dyn Apply>) -> Reloader {
        self.apply = Some(apply);
        self
    }

    /// Reloads now. On success returns the new generation; on failure the old table
    /// keeps serving and the error (with every issue) is returned and logged.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let Some(path) = &self.path else {
            tracing::info!("running the embedded default config: nothing to reload");
            return Ok(self.store.generation());
        };
        // One reload at a time: SIGHUP and the file watch share this service, but the
        // lock keeps `current` and the pieces in step whoever calls.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let invalid = |issues| ConfigError::Invalid { file: path.display().to_string(), issues };
        let result = Config::load(Some(path)).and_then(|mut cfg| {
            // A session key generated at start-up stays in force unless one is configured.
            cfg.keys = std::sync::Arc::new((*cfg.keys).clone().inherit_session_key(&self.started_with.keys));
            // Build first: a piece that cannot be built refuses the file before anything changes.
            let commit = match &self.apply {
                Some(a) => Some(a.prepare(&current, &cfg).map_err(invalid)?),
                None => None,
            };
            let generation = self.store.replace_toml(&cfg).map_err(|errs| {
                invalid(errs.into_iter().map(|i| ConfigIssue { path: i.path, message: i.message, line: 0, column: 0 }).collect())
            })?;
            if let Some(commit) = commit {
                commit();
            }
            Ok((cfg, generation))
        });
        match result {
            Ok((cfg, generation)) => {
                *current = cfg.clone();
                drop(current);
                self.metrics.reload(true);
                for key in restart_only(&self.started_with, &cfg, self.apply.is_some()) {
                    tracing::warn!(file = %path.display(), key, "changed, but takes effect on restart");
                }
                let fleet = |c: &Option<crate::config::Cluster>| {
                    c.as_ref().map(|c| (c.node.clone(), c.prefix.clone(), c.redis_url.clone(), c.seal_key.clone()))
                };
                if fleet(&cfg.cluster) != fleet(&self.started_with.cluster) {
                    tracing::warn!(file = %path.display(), "[cluster] changed: it takes effect on restart");
                }
                tracing::info!(file = %path.display(), generation, "config reloaded");
                Ok(generation)
            }
            Err(e) => {
                self.metrics.reload(false);
                match &e {
                    ConfigError::Invalid { file, issues } => {
                        for i in issues {
                            tracing::error!(file = %file, line = i.line, column = i.column, path = %i.path, "config reload refused: {}", i.message);
                        }
                    }
                    other => tracing::error!(error = %other, "config reload refused"),
                }
                tracing::warn!(file = %path.display(), "still serving the previous routing table");
                Err(e)
            }
        }
    }
}

/// The keys of `new` that differ from `started` but are fixed at start (`applied`:
/// whether an [`Apply`] applies the sections beside the routing state).
fn restart_only(started: &Config, new: &Config, applied: bool) -> Vec<&'static str> {
    let (s, o) = (&new.server, &started.server);
    let (c, oc) = (&new.control, &started.control);
    let mut out = Vec::new();
    let fixed = [
        ("server.http", s.http != o.http),
        ("server.https", s.https != o.https),
        ("server.threads", s.threads != o.threads),
        ("server.state_dir", s.state_dir != o.state_dir),
        ("control.listen", c.listen != oc.listen),
        ("control.token_env", c.token_env != oc.token_env),
        ("static.cache_dir", new.static_.cache_dir != started.static_.cache_dir),
    ];
    out.extend(fixed.into_iter().filter(|(_, changed)| *changed).map(|(k, _)| k));
    if !applied {
        let live = [
            ("server.connect_timeout_ms", s.connect_timeout_ms != o.connect_timeout_ms),
            ("server.read_timeout_ms", s.read_timeout_ms != o.read_timeout_ms),
            ("server.client_header_timeout_ms", s.client_header_timeout_ms != o.client_header_timeout_ms),
            ("server.client_body_timeout_ms", s.client_body_timeout_ms != o.client_body_timeout_ms),
            ("server.max_connections_per_ip", s.max_connections_per_ip != o.max_connections_per_ip),
            ("control.max_body_bytes", c.max_body_bytes != oc.max_body_bytes),
            ("static", new.static_ != started.static_),
            ("wake", new.wake != started.wake),
            ("tls", new.tls != started.tls),
            ("acme", new.acme != started.acme),
            ("log", new.log != started.log),
            ("dns", new.dns != started.dns),
            ("storage", new.storage != started.storage),
        ];
        out.extend(live.into_iter().filter(|(_, changed)| *changed).map(|(k, _)| k));
    }
    out
}

/// The reloader as a service: reloads on SIGHUP, and when the file's fingerprint
/// changes (checked every `interval`; `None` = SIGHUP only). A reload that changes
/// `[server] watch_interval_ms` changes the interval (applied by the service itself).
pub struct ReloadService {
    reloader: Reloader,
    interval: Option<Duration>,
    /// Registered before the service starts, so a SIGHUP right after start-up reloads
    /// instead of killing the process.
    hup: tokio::sync::Mutex<tokio::signal::unix::Signal>,
    /// The file's fingerprint when the service was made (before the edge says it
    /// listens): a change saved while the service's task is still starting is seen.
    started_with: Option<Fingerprint>,
}

impl ReloadService {
    /// Registers the SIGHUP handler (call on the runtime the service will run on) and
    /// notes the file's fingerprint.
    pub fn new(reloader: Reloader, interval: Option<Duration>) -> std::io::Result<ReloadService> {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let started_with = reloader.path.as_deref().and_then(fingerprint);
        Ok(ReloadService { reloader, interval, hup: tokio::sync::Mutex::new(hup), started_with })
    }
}

#[async_trait::async_trait]
impl Service for ReloadService {
    fn name(&self) -> &'static str {
        "config reload"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let r = &self.reloader;
        let mut hup = self.hup.lock().await;
        let fp = |r: &Reloader| r.path.as_deref().and_then(fingerprint);
        let mut last = self.started_with;
        // `[server] watch_interval_ms` as started with, then as the last reload set it.
        let mut interval = self.interval;
        loop {
            let tick = interval.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() { return; }
                    tracing::info!("SIGHUP: reloading config");
                    last = fp(r);
                    let _ = r.reload();
                }
                _ = tokio::time::sleep(tick), if interval.is_some() && r.path.is_some() => {
                    let now = fp(r);
                    if now != last {
                        last = now;
                        if now.is_some() {
                            let _ = r.reload();
                        } else {
                            tracing::warn!("config file is gone; keeping the current table");
                        }
                    }
                }
                _ = shutdown.wait() => return,
            }
            if r.path.is_some() {
                let ms = r.current.lock().unwrap_or_else(|p| p.into_inner()).server.watch_interval_ms;
                interval = (ms > 0).then(|| Duration::from_millis(ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[[workspaces]]\nid = \"w\"\nslug = \"w\"\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.1\"\npreviews = [{ port = 3000, access = \"public\" }]\n";

    #[test]
    fn failed_reload_is_counted_and_keeps_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, GOOD).unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::open(&cfg, metrics.clone(), false).unwrap());
        let routes = store.routes();
        let r = Reloader::new(cfg, store.clone(), metrics.clone());

        std::fs::write(&path, format!("{GOOD}[[sandboxes]]\nid = \"b\"\nworkspace = \"nope\"\naddress = \"10.0.0.2\"\n")).unwrap();
        let e = r.reload().unwrap_err();
        assert!(e.to_string().contains("sandboxes[1].workspace"), "{e}");
        assert_eq!(metrics.reload_counts(), (0, 1));
        assert_eq!(routes.load().generation, 1);
        assert_eq!(routes.load().sandbox_count(), 1);

        std::fs::write(&path, format!("{GOOD}[[sandboxes]]\nid = \"b\"\nworkspace = \"w\"\naddress = \"10.0.0.2\"\n")).unwrap();
        assert_eq!(r.reload().unwrap(), 2);
        assert_eq!(metrics.reload_counts(), (1, 1));
        assert_eq!(routes.load().sandbox_count(), 2);
        assert!(metrics.render().contains("miosa_edge_state_generation 2"));
    }

    #[test]
    fn sections_a_reload_cannot_apply_are_named() {
        std::env::set_var("RELOADTEST_STORAGE_ID", "id");
        std::env::set_var("RELOADTEST_STORAGE_SECRET", "secret");
        let storage = "[storage]\nendpoint = \"http://127.0.0.1:9000\"\naccess_key_env = \"RELOADTEST_STORAGE_ID\"\n\
                       secret_key_env = \"RELOADTEST_STORAGE_SECRET\"\n";
        let started = Config::parse(GOOD, None).unwrap();
        let new = Config::parse(&format!("{storage}{GOOD}"), None).unwrap();
        // Without the server's pieces (an Apply), [storage] waits for a restart, and says so.
        assert_eq!(restart_only(&started, &new, false), vec!["storage"]);
        assert!(restart_only(&started, &new, true).is_empty(), "applied live with them");
    }
}
