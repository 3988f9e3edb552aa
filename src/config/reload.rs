//! Live reload of the operators' TOML file: SIGHUP, or a change seen by polling.
//!
//! validate → build → swap: the file is parsed and validated whole, a new
//! [`RouteTable`] is built off the request path, and only then published with one
//! atomic store. A file that fails keeps the old table serving; every error is logged
//! with its key path and line:column and the failure is counted in
//! `miosa_edge_config_reloads_total{result="error"}`. Requests in flight hold the table
//! they started with (an `Arc`), so none fails because of a swap.
//!
//! Listener addresses are fixed at start; a reload that changes `[server]` logs that a
//! restart is needed for that section and applies the rest.

use super::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::routing::{publish, RouteTable, SharedTable};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Reloads one config file into a shared table.
pub struct Reloader {
    path: PathBuf,
    routes: SharedTable,
    metrics: Arc<Metrics>,
    generation: Arc<AtomicU64>,
    started_with: super::Server,
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
    /// A reloader for `path`, whose current table was built from `started_with`.
    pub fn new(path: PathBuf, routes: SharedTable, metrics: Arc<Metrics>, generation: Arc<AtomicU64>, started_with: super::Server) -> Reloader {
        Reloader { path, routes, metrics, generation, started_with }
    }

    /// Reloads now. On success returns the new generation; on failure the old table
    /// keeps serving and the error (with every issue) is returned and logged.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let result = Config::load(Some(&self.path)).and_then(|cfg| {
            let generation = self.generation.load(Ordering::SeqCst) + 1;
            let table = RouteTable::build(&cfg.domains, &cfg.branding, &cfg.state, generation).map_err(|e| ConfigError::Invalid {
                file: self.path.display().to_string(),
                issues: e
                    .0
                    .into_iter()
                    .map(|i| super::ConfigIssue { path: i.path, message: i.message, line: 0, column: 0 })
                    .collect(),
            })?;
            Ok((cfg, table, generation))
        });
        match result {
            Ok((cfg, table, generation)) => {
                let sandboxes = table.sandbox_count();
                publish(&self.routes, table);
                self.generation.store(generation, Ordering::SeqCst);
                self.metrics.generation.set(generation as i64);
                self.metrics.sandboxes.set(sandboxes as i64);
                self.metrics.reload(true);
                let s = &cfg.server;
                let o = &self.started_with;
                if s.http != o.http || s.https != o.https || s.threads != o.threads || s.state_dir != o.state_dir {
                    tracing::warn!(file = %self.path.display(), "[server] listeners, threads and state_dir changed: they take effect on restart");
                }
                tracing::info!(file = %self.path.display(), generation, sandboxes, "config reloaded");
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
                tracing::warn!(file = %self.path.display(), "still serving the previous routing table");
                Err(e)
            }
        }
    }

    /// Runs the reloader on its own thread: reloads on SIGHUP, and when the file's
    /// fingerprint changes (checked every `interval`; `None` = SIGHUP only).
    pub fn spawn(self, interval: Option<Duration>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // Register the handler before returning so a SIGHUP right after start-up
        // reloads instead of killing the process.
        let mut hup = rt.block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })?;
        std::thread::Builder::new().name("miosa-reload".into()).spawn(move || {
            rt.block_on(async move {
                let mut last = fingerprint(&self.path);
                let tick = interval.unwrap_or(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        got = hup.recv() => {
                            if got.is_none() { return; }
                            tracing::info!("SIGHUP: reloading config");
                            last = fingerprint(&self.path);
                            let _ = self.reload();
                        }
                        _ = tokio::time::sleep(tick), if interval.is_some() => {
                            let now = fingerprint(&self.path);
                            if now != last {
                                last = now;
                                if now.is_some() {
                                    let _ = self.reload();
                                } else {
                                    tracing::warn!(file = %self.path.display(), "config file is gone; keeping the current table");
                                }
                            }
                        }
                    }
                }
            })
        })
    }
}
