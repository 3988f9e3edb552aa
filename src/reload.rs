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
//! Listener addresses are fixed at start; a reload that changes `[server]`,
//! `[control]`, `[static]`, `[wake]` or `[cluster]` logs that a restart is needed for them and
//! applies the rest (routes, branding, `[tokens]` keys).

use crate::config::{Config, ConfigError, ConfigIssue};
use crate::metrics::Metrics;
use crate::services::{Service, Shutdown};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Reloads one config file into the store.
pub struct Reloader {
    /// `None` for the embedded default: SIGHUP is then acknowledged and ignored.
    path: Option<PathBuf>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    started_with: Config,
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
        Reloader { path: started_with.source.clone(), store, metrics, started_with }
    }

    /// Reloads now. On success returns the new generation; on failure the old table
    /// keeps serving and the error (with every issue) is returned and logged.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let Some(path) = &self.path else {
            tracing::info!("running the embedded default config: nothing to reload");
            return Ok(self.store.generation());
        };
        let result = Config::load(Some(path)).and_then(|mut cfg| {
            // A session key generated at start-up stays in force unless one is configured.
            cfg.keys = std::sync::Arc::new((*cfg.keys).clone().inherit_session_key(&self.started_with.keys));
            self.store.replace_toml(&cfg).map(|generation| (cfg, generation)).map_err(|errs| ConfigError::Invalid {
                file: path.display().to_string(),
                issues: errs.into_iter().map(|i| ConfigIssue { path: i.path, message: i.message, line: 0, column: 0 }).collect(),
            })
        });
        match result {
            Ok((cfg, generation)) => {
                self.metrics.reload(true);
                let (s, o) = (&cfg.server, &self.started_with.server);
                if s.http != o.http
                    || s.https != o.https
                    || s.threads != o.threads
                    || s.state_dir != o.state_dir
                    || cfg.control != self.started_with.control
                {
                    tracing::warn!(file = %path.display(), "[server] listeners, threads, state_dir and [control] changed: they take effect on restart");
                }
                if cfg.static_ != self.started_with.static_ || cfg.wake != self.started_with.wake {
                    tracing::warn!(file = %path.display(), "[static] and [wake] changed: they take effect on restart");
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

/// The reloader as a service: reloads on SIGHUP, and when the file's fingerprint
/// changes (checked every `interval`; `None` = SIGHUP only).
pub struct ReloadService {
    reloader: Reloader,
    interval: Option<Duration>,
    /// Registered before the service starts, so a SIGHUP right after start-up reloads
    /// instead of killing the process.
    hup: tokio::sync::Mutex<tokio::signal::unix::Signal>,
}

impl ReloadService {
    /// Registers the SIGHUP handler (call on the runtime the service will run on).
    pub fn new(reloader: Reloader, interval: Option<Duration>) -> std::io::Result<ReloadService> {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(ReloadService { reloader, interval, hup: tokio::sync::Mutex::new(hup) })
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
        let mut last = fp(r);
        let tick = self.interval.unwrap_or(Duration::from_secs(3600));
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() { return; }
                    tracing::info!("SIGHUP: reloading config");
                    last = fp(r);
                    let _ = r.reload();
                }
                _ = tokio::time::sleep(tick), if self.interval.is_some() && r.path.is_some() => {
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
}
