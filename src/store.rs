//! The writer: the authoritative routing state (the operators' TOML part and the control
//! plane's API part), its write-ahead log, and the published table.
//!
//! ```text
//! write (ops)        ─ store lock ─ check the batch on the state it leads to (state::Index)
//!                                   append its record to the log (no fsync yet)
//!                                   commit; the next table = this one + the change
//!                    ─ unlock ────── wait until durable: one writer fsyncs for everyone
//!                                   who appended meanwhile (group commit), then publishes
//!                                   the newest durable table and wakes them all
//!                    ─ acknowledged: {"generation": N}; a request sent now sees it
//! compaction (a service): rotate the log at generation G, write state.json of G from a
//!                    copy of the state (no lock held), drop the folded segments
//! start:             state.json + every later log record, checked as one batch
//! ```
//!
//! A write costs what it changes: checking touches the objects it names and those that
//! refer to them, the table copies one leaf per map it touches ([`crate::cow`]), the log
//! gets one record. A refused write changes nothing. Requests never take the store lock:
//! they read the published table. Generations only grow, across restarts too.

pub mod log;
pub mod snapshot;

use crate::access::Keys;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::{publish, RouteTable, SharedTable};
use crate::schema::{Domains, Kind, PlatformBranding, State, StateError};
use crate::services::{Service, Shutdown};
use crate::state::index::push_state;
use crate::state::{BatchOp, Index, Objects, Op, Origin, Refusal};
use arc_swap::ArcSwap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The log is folded into a snapshot once its current segment holds this many bytes…
const COMPACT_BYTES: u64 = 64 << 20;
/// …or this many records.
const COMPACT_RECORDS: u64 = 100_000;

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The state it leads to is invalid (every error; the first one's path is shown).
    #[error("{}", .0.first().map(|e| e.to_string()).unwrap_or_default())]
    Invalid(Vec<StateError>),
    /// An id or host is defined by the other part (TOML or API).
    #[error("{}", .0)]
    Conflict(StateError),
    /// `If-Match` named another generation.
    #[error("state is at generation {current}, not {expected}")]
    Stale { current: u64, expected: u64 },
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The write could not be made durable; nothing of it was published.
    #[error("cannot persist state: {0}")]
    Persist(String),
    /// Fleet mode: Redis could not take the write; nothing of it was published.
    #[error("the fleet's store is unreachable: {0}")]
    Unavailable(String),
}

/// Fleet mode: where a write is made durable fleet-wide before it is acknowledged
/// (implemented by [`crate::cluster`] on Redis).
pub trait Replicator: Send + Sync {
    /// Appends the record `payload` of generation `expected + 1` if the fleet is still at
    /// generation `expected` (compare-and-append). Blocking.
    fn append(&self, expected: u64, payload: &[u8]) -> Result<(), Replicate>;
}

/// Why a replicated append did not happen.
#[derive(Debug)]
pub enum Replicate {
    /// The fleet is at this later generation: catch up, check again, retry.
    Behind(u64),
    /// Redis is unreachable or refused the write.
    Unavailable(String),
}

/// How long a write waits for this node to catch up with the fleet before it gives up.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a replicated batch could not be followed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The batch starts after a generation this node does not have: load a snapshot.
    #[error("generation {found} follows {have}: records are missing")]
    Gap { have: u64, found: u64 },
    #[error("{0}")]
    Write(#[from] WriteError),
}

impl From<Refusal> for WriteError {
    fn from(r: Refusal) -> WriteError {
        match r {
            Refusal::Invalid(e) => WriteError::Invalid(e),
            Refusal::Conflict(e) => WriteError::Conflict(e),
            Refusal::NotFound(m) => WriteError::NotFound(m),
        }
    }
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read the state in {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("the persisted state does not fit the config: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<StateError>),
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a published generation holds besides the table: the objects (both parts, with
/// where each comes from), for the control API's reads.
#[derive(Debug, Clone)]
pub struct Published {
    pub generation: u64,
    pub objects: Objects,
    pub domains: Arc<Domains>,
}

struct Writer {
    index: Index,
    /// The newest table (published once durable).
    table: RouteTable,
    generation: u64,
    /// The TOML part as the file gives it (reloads are applied as the difference).
    toml: State,
    branding: PlatformBranding,
    keys: Arc<Keys>,
    log: Option<log::Writer>,
    compacting: bool,
    /// Fleet mode: generations are the fleet's (a start or a reload takes none).
    fleet: bool,
}

/// A table whose record is in the log, waiting to be durable.
struct Staged {
    generation: u64,
    table: Arc<RouteTable>,
    published: Published,
    /// The kinds of object it changed (bits by `Kind::ALL` order).
    kinds: u8,
}

/// Every kind changed (a reload, a rebuild).
const ALL_KINDS: u8 = 0b1111;

fn kind_bit(k: Kind) -> u8 {
    1 << Kind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

/// Tables appended to the log but not yet durable, and who makes them so.
#[derive(Default)]
struct Pending {
    /// The generation durable and published.
    durable: u64,
    queue: VecDeque<Staged>,
    syncing: bool,
    /// The log cannot be written: every later write fails until a restart.
    broken: Option<String>,
}

/// The routing state, its log, and its published table.
pub struct Store {
    writer: Mutex<Writer>,
    pending: Mutex<Pending>,
    durable: Condvar,
    /// The current log segment, for whoever makes appended records durable.
    file: Mutex<Option<Arc<std::fs::File>>>,
    routes: SharedTable,
    published: ArcSwap<Published>,
    /// The generation of each table right after it is published: lets followers (the
    /// waker, live revocation, the services) sleep until the table changes.
    changes: tokio::sync::watch::Sender<u64>,
    /// The same, per kind of object: sent only when a publish changed that kind (a
    /// follower of deployments is not woken by a million sandbox writes).
    kind_changes: [tokio::sync::watch::Sender<u64>; 4],
    /// Set when the log should be folded into a snapshot ([`Store::compact`]).
    compact_wanted: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
    dir: Option<PathBuf>,
    /// Fleet mode: writes go through the fleet's log first.
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A writer that panicked left the state as it was before its write (every check
    // happens before anything changes), so the data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens the store for `cfg`: with `persist`, the API state of `<state_dir>` (its
    /// snapshot and log), merged with the TOML routes and checked whole; publishes the
    /// first table at a generation above every one served before.
    pub fn open(cfg: &Config, metrics: Arc<Metrics>, persist: bool) -> Result<Store, OpenError> {
        let dir = persist.then(|| cfg.server.state_dir.clone());
        let fleet = cfg.cluster.is_some();
        let started = std::time::Instant::now();
        let invalid = |r: Refusal| OpenError::Invalid(crate::routing::BuildError::from(r).0);
        let mut index = Index::new(cfg.domains.clone());
        let mut generation = 0;
        let mut log_writer = None;
        let mut snap = snapshot::Snapshot::default();
        let mut legacy = false;
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir { path: dir.clone(), source })?;
            snap = snapshot::Snapshot::read(dir).map_err(|message| OpenError::Read { path: dir.clone(), message })?;
            legacy = !dir.join(snapshot::FILE).exists() && dir.join(snapshot::LEGACY_FILE).exists();
        }
        let parse_ms = started.elapsed().as_millis() as u64;
        let snapshot_generation = snap.generation;
        // The log is read and decoded on a second core while the snapshot's workspaces
        // and sandboxes go in place (a start-up only: both are done before it goes on).
        let (recovered, placed) = std::thread::scope(|scope| {
            let log = dir.as_deref().map(|dir| scope.spawn(move || recover(dir, snapshot_generation)));
            let placed = (|| {
                // Workspaces first (sandboxes name them), then the snapshot's sandboxes put
                // in place directly; everything else — the TOML part and the log's
                // records — is checked below as one batch on the state they lead to.
                let mut ops = Vec::new();
                push_state(&mut ops, &State { workspaces: std::mem::take(&mut snap.workspaces), ..State::default() }, Origin::Api, "");
                push_state(&mut ops, &State { workspaces: cfg.state.workspaces.clone(), ..State::default() }, Origin::Toml, "toml: ");
                let plan = index.check(ops).map_err(invalid)?;
                index.commit(plan);
                index.reserve_sandboxes(snap.sandbox_hint() + cfg.state.sandboxes.len());
                let snapshot_error = |message: String| OpenError::Read { path: cfg.server.state_dir.join(snapshot::FILE), message };
                // Each workspace name of the snapshot resolved to its slot once.
                let slots: Vec<Option<u32>> = snap.names.iter().map(|n| index.workspace_slot(n)).collect();
                snap.sandboxes(
                    |i, s| {
                        let slot = match s.workspace_index {
                            Some(w) => slots.get(w).copied().flatten(),
                            None => index.workspace_slot(s.workspace),
                        };
                        index
                            .load_sandbox(
                                || format!("sandboxes[{i}]"),
                                s.id,
                                slot.ok_or(s.workspace),
                                s.address,
                                s.state,
                                s.previews,
                                Origin::Api,
                            )
                            .map_err(|e| OpenError::Invalid(vec![e]))
                    },
                    snapshot_error,
                )
            })();
            let recovered = log.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(OpenError::Read { path: cfg.server.state_dir.clone(), message: "the log reader failed".into() })
                })
            });
            (recovered, placed)
        });
        placed?;
        let mut log_ops = Vec::new();
        if let (Some(dir), Some(recovered)) = (&dir, recovered) {
            let recovered = recovered?;
            generation = recovered.generation;
            log_ops = recovered.ops;
            let mut w = log::Writer::open(dir).map_err(|e| OpenError::Read { path: dir.clone(), message: e.to_string() })?;
            w.records = recovered.records;
            log_writer = Some(w);
        }
        let read = started.elapsed();
        let mut ops = Vec::with_capacity(log_ops.len() + 64);
        let rest = State {
            share_tokens: std::mem::take(&mut snap.share_tokens),
            deployments: std::mem::take(&mut snap.deployments),
            buckets: std::mem::take(&mut snap.buckets),
            ..State::default()
        };
        crate::state::index::push_state_owned(&mut ops, rest, Origin::Api, "");
        let toml = State { workspaces: Vec::new(), ..cfg.state.clone() };
        push_state(&mut ops, &toml, Origin::Toml, "toml: ");
        ops.extend(log_ops);
        let loaded = started.elapsed();
        let plan = index.check(ops).map_err(invalid)?;
        index.commit(plan);
        drop(snap);
        let checked = started.elapsed();
        // A start takes a generation of its own, so generations keep growing across
        // restarts (logged below, so a second restart goes higher still). In a fleet the
        // generations are the fleet's: the node resumes at the one it had.
        if !fleet {
            generation += 1;
        }
        let fold_now = legacy || log_writer.as_ref().is_some_and(|l| l.records >= COMPACT_RECORDS || l.bytes >= COMPACT_BYTES);
        let table = RouteTable::from_state(index.objects(), &cfg.domains, &cfg.branding, generation).with_access(cfg.keys.clone());
        tracing::info!(
            sandboxes = index.objects().sandboxes.len(),
            generation,
            snapshot_ms = parse_ms,
            sandboxes_and_log_ms = read.as_millis() as u64 - parse_ms,
            check_ms = (checked - loaded).as_millis() as u64,
            table_ms = (started.elapsed() - checked).as_millis() as u64,
            "routing state loaded"
        );
        let file = log_writer.as_ref().map(log::Writer::file);
        let published = Published { generation, objects: index.objects().clone(), domains: table.domains.clone() };
        metrics.generation.set(generation as i64);
        metrics.sandboxes.set(table.sandbox_count() as i64);
        let store = Store {
            routes: Arc::new(ArcSwap::from_pointee(table.clone())),
            writer: Mutex::new(Writer {
                index,
                table,
                generation,
                toml: cfg.state.clone(),
                branding: cfg.branding.clone(),
                keys: cfg.keys.clone(),
                log: log_writer,
                compacting: false,
                fleet,
            }),
            pending: Mutex::new(Pending { durable: generation, ..Default::default() }),
            durable: Condvar::new(),
            file: Mutex::new(file),
            published: ArcSwap::from_pointee(published),
            changes: tokio::sync::watch::channel(generation).0,
            kind_changes: std::array::from_fn(|_| tokio::sync::watch::channel(generation).0),
            compact_wanted: tokio::sync::watch::channel(fold_now).0,
            metrics,
            dir,
            replicator: std::sync::OnceLock::new(),
        };
        if let Some(dir) = &store.dir {
            // The snapshot exists from the first start on.
            let path = dir.join(snapshot::FILE);
            if !path.exists() && !dir.join(snapshot::LEGACY_FILE).exists() {
                let at = if fleet { generation } else { generation - 1 };
                if let Err(e) = snapshot::write(&path, at, store.lock().index.objects()) {
                    tracing::warn!(error = %e, file = %path.display(), "cannot write the first snapshot");
                }
            }
        }
        if !fleet {
            let mut w = store.lock();
            if let Some(log) = &mut w.log {
                let mark = log::Record { generation, ops: Vec::new() }.frame();
                if let Err(e) = log.append(&mark).and_then(|()| log.file().sync_data()) {
                    tracing::warn!(error = %e, "cannot record the start's generation in the state log");
                }
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        lock(&self.writer)
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

    /// Notified with the new generation after every publish that changed objects of
    /// `kind` (or rebuilt the whole table).
    pub fn subscribe_to(&self, kind: Kind) -> tokio::sync::watch::Receiver<u64> {
        self.kind_changes[Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)].subscribe()
    }

    /// The generation of the published table.
    pub fn generation(&self) -> u64 {
        self.published.load().generation
    }

    /// The published generation and its objects (both parts).
    pub fn published(&self) -> Arc<Published> {
        self.published.load_full()
    }

    /// Fleet mode: every later write is appended to the fleet's log through `r` before
    /// it is acknowledged.
    pub fn replicate_through(&self, r: Arc<dyn Replicator>) {
        let _ = self.replicator.set(r);
    }

    /// Applies `ops` (API writes) as one batch: all or nothing, checked on the state it
    /// leads to, durable before it returns. `if_match` is the generation the caller
    /// saw. A batch that changes nothing writes nothing and answers the current
    /// generation.
    pub fn apply(&self, if_match: Option<u64>, ops: Vec<BatchOp>) -> Result<u64, WriteError> {
        let mut ops = Some(ops);
        let again = self.replicator.get().is_some().then(|| ops.clone()).flatten();
        self.write(if_match, move |_| Ok(ops.take().or_else(|| again.clone()).unwrap_or_default()))
    }

    /// Like [`Self::apply`], the ops made from the current state under the writers'
    /// lock (a read-modify-write such as `activate` cannot lose a concurrent write).
    /// In a fleet, `make` is called again when another node's write came first.
    pub fn write(
        &self,
        if_match: Option<u64>,
        mut make: impl FnMut(&Objects) -> Result<Vec<BatchOp>, WriteError>,
    ) -> Result<u64, WriteError> {
        let deadline = std::time::Instant::now() + CATCH_UP_WAIT;
        let result = loop {
            match self.write_inner(if_match, &mut make) {
                Err(Retry::Behind(fleet)) => {
                    // Another node's write came first: wait until it is followed here,
                    // then check this one again on the state it now meets.
                    if !self.wait_for_generation(fleet, deadline) {
                        break Err(WriteError::Unavailable(format!(
                            "this node is at generation {}, behind the fleet's {fleet}",
                            self.generation()
                        )));
                    }
                }
                Err(Retry::No(e)) => break Err(e),
                Ok(g) => break Ok(g),
            }
        };
        self.metrics.state_write(result.is_ok());
        result
    }

    /// Waits until the published generation reaches `generation`, at most until
    /// `deadline` (a blocking caller: the control API's writes run on the blocking pool;
    /// the follower applies records within milliseconds of their append).
    fn wait_for_generation(&self, generation: u64, deadline: std::time::Instant) -> bool {
        while self.generation() < generation {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    fn write_inner(
        &self,
        if_match: Option<u64>,
        make: &mut impl FnMut(&Objects) -> Result<Vec<BatchOp>, WriteError>,
    ) -> Result<u64, Retry> {
        let mut w = self.lock();
        let replicator = self.replicator.get();
        if let Some(expected) = if_match {
            if expected != w.generation {
                if replicator.is_some() && expected > w.generation {
                    return Err(Retry::Behind(expected));
                }
                return Err(Retry::No(WriteError::Stale { current: w.generation, expected }));
            }
        }
        if let Some(broken) = &lock(&self.pending).broken {
            return Err(Retry::No(WriteError::Persist(broken.clone())));
        }
        let ops = make(w.index.objects()).map_err(Retry::No)?;
        let plan = w.index.check(ops).map_err(|r| Retry::No(r.into()))?;
        if plan.is_empty() {
            return Ok(w.generation);
        }
        let generation = w.generation + 1;
        let framed = log::frame(generation, plan.ops());
        if let Some(r) = replicator {
            match r.append(w.generation, &framed[8..]) {
                Ok(()) => {}
                Err(Replicate::Behind(fleet)) => return Err(Retry::Behind(fleet)),
                Err(Replicate::Unavailable(m)) => return Err(Retry::No(WriteError::Unavailable(m))),
            }
        }
        if let Some(log) = &mut w.log {
            if let Err(e) = log.append(&framed) {
                if replicator.is_none() {
                    return Err(Retry::No(WriteError::Persist(e.to_string())));
                }
                // The fleet has it: this node's copy is only a cache for a start without
                // Redis, and the follower finds the record there again.
                tracing::error!(error = %e, generation, "cannot append to the local state log");
            }
        }
        let applied = w.index.commit(plan);
        self.stage_applied(&mut w, &applied, generation);
        drop(w);
        self.wait_durable(generation).map_err(Retry::No)?;
        Ok(generation)
    }

    /// Fleet mode: applies records of the fleet's log, in order, from the generation
    /// after this node's (records it already has are skipped). A record this node's
    /// check refuses (its TOML pins collide with it) is logged, counted and passed over
    /// whole: the node keeps the fleet's order and never applies half a batch.
    pub fn follow(&self, records: Vec<log::Record>) -> Result<u64, FollowError> {
        let mut w = self.lock();
        let mut last = None;
        for rec in records {
            if rec.generation <= w.generation {
                continue;
            }
            if rec.generation != w.generation + 1 {
                let have = w.generation;
                drop(w);
                if let Some(g) = last {
                    self.wait_durable(g)?;
                }
                return Err(FollowError::Gap { have, found: rec.generation });
            }
            let generation = rec.generation;
            let ops = rec.ops.into_iter().map(|op| BatchOp { path: String::new(), origin: Origin::Api, op }).collect();
            let (applied, framed) = match w.index.check(ops) {
                Ok(plan) => {
                    let framed = log::frame(generation, plan.ops());
                    (w.index.commit(plan), framed)
                }
                Err(refusal) => {
                    let why = WriteError::from(refusal);
                    tracing::error!(generation, error = %why, "a fleet write is refused by this node's state (its TOML routes?): passed over");
                    self.metrics.cluster_refused.inc();
                    (Vec::new(), log::Record { generation, ops: Vec::new() }.frame())
                }
            };
            if let Some(log) = &mut w.log {
                if let Err(e) = log.append(&framed) {
                    tracing::error!(error = %e, generation, "cannot append to the local state log");
                }
            }
            self.stage_applied(&mut w, &applied, generation);
            last = Some(generation);
        }
        let generation = w.generation;
        drop(w);
        if let Some(g) = last {
            self.wait_durable(g)?;
        }
        Ok(generation)
    }

    /// Fleet mode: takes the fleet's snapshot `bytes` (of a later generation than this
    /// node's): it becomes the local snapshot (the local log is folded away) and the API
    /// part of the state is replaced by it, applied as its difference. Returns the
    /// generation it brought, or `None` when it is not ahead of this node.
    pub fn follow_snapshot(&self, bytes: &[u8]) -> Result<Option<u64>, String> {
        let snap = snapshot::Snapshot::decode(bytes.to_vec())?;
        let generation = snap.generation;
        let doc = snap.into_state()?;
        let mut w = self.lock();
        if generation <= w.generation {
            return Ok(None);
        }
        if w.compacting {
            return Err("a compaction is under way; try again".into());
        }
        let ops = diff(w.index.objects(), doc, Origin::Api, "");
        let plan = w.index.check(ops).map_err(|r| WriteError::from(r).to_string())?;
        if let (Some(dir), Some(log)) = (&self.dir, &mut w.log) {
            // The snapshot covers everything before it: it replaces the local one, and the
            // log starts again after it (as a compaction at `generation` would leave it).
            snapshot::write_bytes(&dir.join(snapshot::FILE), bytes).map_err(|e| format!("cannot write the snapshot: {e}"))?;
            log.rotate(generation).map_err(|e| format!("cannot rotate the state log: {e}"))?;
            *lock(&self.file) = Some(log.file());
            for seg in log::segments(dir).map_err(|e| e.to_string())? {
                // Every rotated segment (`state.log.N`) is older than the snapshot.
                if seg.file_name() != Some(std::ffi::OsStr::new("state.log")) {
                    let _ = std::fs::remove_file(&seg);
                }
            }
        }
        let applied = w.index.commit(plan);
        self.stage_applied(&mut w, &applied, generation);
        drop(w);
        self.wait_durable(generation).map_err(|e| e.to_string())?;
        Ok(Some(generation))
    }

    /// The API part at the published generation, as the snapshot format (what a fleet
    /// keeps in Redis for nodes that join).
    pub fn snapshot_bytes(&self) -> std::io::Result<(u64, Vec<u8>)> {
        let p = self.published();
        Ok((p.generation, snapshot::encode(p.generation, &p.objects)?))
    }

    /// Replaces the whole API part (`PUT /v1/state`): the document is checked whole
    /// (errors name its paths), then applied as its difference from the current state.
    pub fn replace_api(&self, if_match: Option<u64>, doc: State) -> Result<u64, WriteError> {
        let toml = self.lock().toml.clone();
        let domains = self.published.load().domains.clone();
        check_document(&doc, &toml, &domains)?;
        let mut doc = Some(doc);
        let again = self.replicator.get().is_some().then(|| doc.clone()).flatten();
        self.write(if_match, move |objects| {
            let doc = doc.take().or_else(|| again.clone()).unwrap_or_default();
            Ok(diff(objects, doc, Origin::Api, ""))
        })
    }

    /// Replaces the TOML part and the config it came with (a reload). A change of the
    /// platform's domains or branding rebuilds the whole table; otherwise the new file
    /// is applied as its difference. Conflicts with API objects are refused.
    pub fn replace_toml(&self, cfg: &Config) -> Result<u64, Vec<StateError>> {
        let mut w = self.lock();
        // A fleet's generations are its writes': a node's own pins take none.
        let generation = if w.fleet { w.generation } else { w.generation + 1 };
        let table = if cfg.domains != *w.index.domains() || cfg.branding != w.branding {
            let api = w.index.objects().to_state(Origin::Api);
            let index = Index::build(cfg.domains.clone(), &cfg.state, &api).map_err(|r| crate::routing::BuildError::from(r).0)?;
            w.index = index;
            RouteTable::from_state(w.index.objects(), &cfg.domains, &cfg.branding, generation)
        } else {
            let ops = diff_toml(w.index.objects(), &cfg.state);
            let plan = w.index.check(ops).map_err(|r| crate::routing::BuildError::from(r).0)?;
            let applied = w.index.commit(plan);
            w.table.apply(&applied, w.index.objects(), generation)
        };
        let fleet = w.fleet;
        if let Some(log) = w.log.as_mut().filter(|_| !fleet) {
            let mark = log::Record { generation, ops: Vec::new() }.frame();
            if let Err(e) = log.append(&mark) {
                return Err(vec![StateError { path: String::new(), message: format!("cannot persist state: {e}") }]);
            }
        }
        w.generation = generation;
        w.toml = cfg.state.clone();
        w.branding = cfg.branding.clone();
        w.keys = cfg.keys.clone();
        let table = table.with_access(cfg.keys.clone());
        self.stage(&mut w, table, ALL_KINDS);
        drop(w);
        self.wait_durable(generation).map_err(|e| vec![StateError { path: String::new(), message: e.to_string() }])?;
        Ok(generation)
    }

    /// Takes changes committed to the index into the next table, at `generation`, and
    /// queues it (published once durable).
    fn stage_applied(&self, w: &mut Writer, applied: &[crate::state::Applied], generation: u64) {
        let kinds = applied.iter().fold(0, |m, a| m | kind_bit(a.kind()));
        let table = w.table.apply(applied, w.index.objects(), generation).with_access(w.keys.clone());
        w.generation = generation;
        self.stage(w, table, kinds);
    }

    /// Queues `table` to be published once its record is durable, and asks for a
    /// compaction when the log has grown enough.
    fn stage(&self, w: &mut Writer, table: RouteTable, kinds: u8) {
        let published = Published { generation: table.generation, objects: w.index.objects().clone(), domains: table.domains.clone() };
        let table = Arc::new(table);
        w.table = (*table).clone();
        lock(&self.pending).queue.push_back(Staged { generation: table.generation, table, published, kinds });
        if let Some(log) = &w.log {
            if !w.compacting && (log.bytes >= COMPACT_BYTES || log.records >= COMPACT_RECORDS) {
                self.compact_wanted.send_replace(true);
            }
        }
    }

    /// Waits until `generation` is durable and published: the first waiter to find no
    /// sync under way fsyncs the log for everyone who appended before it (group commit),
    /// publishes the newest durable table, and wakes the others.
    fn wait_durable(&self, generation: u64) -> Result<(), WriteError> {
        let mut p = lock(&self.pending);
        loop {
            // (A fleet node's reload stages a table at the generation it has: it is
            // published by the pass below, like any other.)
            if p.durable >= generation && p.queue.front().is_none_or(|e| e.generation > generation) {
                return Ok(());
            }
            if let Some(b) = &p.broken {
                return Err(WriteError::Persist(b.clone()));
            }
            if p.syncing {
                p = self.durable.wait(p).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            p.syncing = true;
            let target = p.queue.back().map(|e| e.generation).unwrap_or(generation);
            drop(p);
            let file = lock(&self.file).clone();
            let synced = file.map_or(Ok(()), |f| f.sync_data());
            p = lock(&self.pending);
            p.syncing = false;
            match synced {
                Ok(()) => {
                    let (mut newest, mut kinds) = (None, 0);
                    while p.queue.front().is_some_and(|e| e.generation <= target) {
                        newest = p.queue.pop_front();
                        kinds |= newest.as_ref().map_or(0, |e| e.kinds);
                    }
                    if let Some(e) = newest {
                        p.durable = e.generation;
                        self.publish(e.table, e.published, kinds);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot make the state log durable: refusing writes until a restart");
                    p.broken = Some(format!("the state log cannot be written: {e}"));
                }
            }
            self.durable.notify_all();
        }
    }

    fn publish(&self, table: Arc<RouteTable>, published: Published, kinds: u8) {
        let (generation, sandboxes) = (table.generation, table.sandbox_count());
        self.published.store(Arc::new(published));
        publish(&self.routes, Arc::unwrap_or_clone(table));
        // send_replace: delivered even when nobody subscribed yet.
        self.changes.send_replace(generation);
        for (i, tx) in self.kind_changes.iter().enumerate() {
            if kinds & (1 << i) != 0 {
                tx.send_replace(generation);
            }
        }
        self.metrics.generation.set(generation as i64);
        self.metrics.sandboxes.set(sandboxes as i64);
    }

    /// Told when the log has grown enough to be folded into a snapshot.
    pub fn compaction_wanted(&self) -> tokio::sync::watch::Receiver<bool> {
        self.compact_wanted.subscribe()
    }

    /// Folds the log into a snapshot: rotates the current segment at the current
    /// generation, writes `state.json` of that generation from a copy of the state
    /// (writers and requests go on meanwhile), then removes the folded segments.
    /// Blocking: run it off the async threads.
    pub fn compact(&self) -> std::io::Result<()> {
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        let (generation, objects) = {
            let mut w = self.lock();
            if w.compacting {
                return Ok(());
            }
            let generation = w.generation;
            let Some(log) = &mut w.log else { return Ok(()) };
            log.rotate(generation)?;
            *lock(&self.file) = Some(log.file());
            w.compacting = true;
            self.compact_wanted.send_replace(false);
            (generation, w.index.objects().clone())
        };
        let result = (|| {
            snapshot::write(&dir.join(snapshot::FILE), generation, &objects)?;
            for seg in log::segments(&dir)? {
                let folded = seg
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("state.log."))
                    .and_then(|g| g.parse::<u64>().ok())
                    .is_some_and(|g| g <= generation);
                if folded {
                    std::fs::remove_file(&seg)?;
                }
            }
            log::sync_dir(&dir);
            Ok(())
        })();
        self.lock().compacting = false;
        match &result {
            Ok(()) => tracing::info!(generation, sandboxes = objects.sandboxes.len(), "state log folded into a snapshot"),
            Err(e) => tracing::warn!(error = %e, generation, "state log compaction failed; the log keeps every record"),
        }
        result
    }
}

/// A write's outcome when it may be tried again.
enum Retry {
    /// The fleet is at this later generation.
    Behind(u64),
    No(WriteError),
}

/// How often the log is folded even when it stays small, so `state.json` never lags far.
const FOLD_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Folds the log into a snapshot in the background: when the store asks (the log grew
/// past its bounds) and every ten minutes while records accumulate.
pub struct Compactor(pub Arc<Store>);

#[async_trait::async_trait]
impl Service for Compactor {
    fn name(&self) -> &'static str {
        "state compaction"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut wanted = self.0.compaction_wanted();
        loop {
            tokio::select! {
                r = wanted.wait_for(|w| *w) => if r.is_err() { return },
                _ = tokio::time::sleep(FOLD_EVERY) => {
                    if self.0.lock().log.as_ref().is_none_or(|l| l.records == 0) {
                        continue;
                    }
                }
                _ = shutdown.wait() => return,
            }
            let store = self.0.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || store.compact()).await {
                tracing::error!(error = %e, "state compaction task failed");
            }
        }
    }
}

/// The ops that turn the `origin` part of `objects` into `doc` (upserts named by their
/// path in the document, deletes of what it no longer holds).
fn diff(objects: &Objects, doc: State, origin: Origin, prefix: &str) -> Vec<BatchOp> {
    let mut deletes = Vec::new();
    for kind in Kind::ALL {
        let keep: std::collections::HashSet<&str> = doc.ids(kind).collect();
        let gone: Vec<String> = match kind {
            Kind::Workspace => objects.workspaces.iter().filter(|r| r.origin == origin).map(|r| r.obj.id.to_string()).collect(),
            Kind::Sandbox => objects.sandboxes.iter().filter(|r| r.origin == origin).map(|r| r.id().to_string()).collect(),
            Kind::ShareToken => objects.share_tokens.iter().filter(|r| r.origin == origin).map(|r| r.obj.id.to_string()).collect(),
            Kind::Deployment => objects.deployments.iter().filter(|r| r.origin == origin).map(|r| r.obj.id.to_string()).collect(),
            Kind::Bucket => objects.buckets.iter().filter(|r| r.origin == origin).map(|r| r.obj.id.to_string()).collect(),
        };
        deletes.extend(gone.into_iter().filter(|id| !keep.contains(id.as_str())).map(|id| BatchOp {
            path: String::new(),
            origin,
            op: Op::Delete(kind, id),
        }));
    }
    // Room for every object of the document at once: a whole-table PUT of 100k
    // sandboxes grew this (some 30 MB) by doubling when workspaces were left out.
    let objects = Kind::ALL.iter().map(|&k| doc.count(k)).sum::<usize>();
    let mut ops = Vec::with_capacity(objects + deletes.len());
    crate::state::index::push_state_owned(&mut ops, doc, origin, prefix);
    ops.extend(deletes);
    ops
}

/// [`diff`] for the TOML part.
fn diff_toml(objects: &Objects, toml: &State) -> Vec<BatchOp> {
    diff(objects, toml.clone(), Origin::Toml, "toml: ")
}

/// A whole API document checked with the TOML part, errors named by the document's
/// paths (`sandboxes[3].address`; TOML objects as `toml: …`): an id or host the TOML
/// file defines is a conflict, the rest the rules of the whole state.
fn check_document(doc: &State, toml: &State, domains: &Domains) -> Result<(), WriteError> {
    for kind in Kind::ALL {
        let pinned: std::collections::HashSet<&str> = toml.ids(kind).collect();
        if pinned.is_empty() {
            continue;
        }
        if let Some((i, id)) = doc.ids(kind).enumerate().find(|(_, id)| pinned.contains(id)) {
            let message = format!("{} `{id}` is pinned by the TOML file", kind.singular());
            return Err(WriteError::Conflict(StateError { path: format!("{}[{i}].id", kind.field()), message }));
        }
    }
    let mut hosts: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for w in &toml.workspaces {
        hosts.extend(w.preview_domain.iter().chain(w.deploy_domain.iter()).map(|d| d.host.as_str()));
    }
    for d in &toml.deployments {
        hosts.extend(d.domains.iter().map(|d| d.host.as_str()));
    }
    if !hosts.is_empty() {
        let pinned = |path: String, host: &str| {
            Err(WriteError::Conflict(StateError { path, message: format!("host `{host}` is pinned by the TOML file") }))
        };
        for (i, w) in doc.workspaces.iter().enumerate() {
            for (key, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
                if let Some(d) = d.as_ref().filter(|d| hosts.contains(d.host.as_str())) {
                    return pinned(format!("workspaces[{i}].{key}.host"), d.host.as_str());
                }
            }
        }
        for (i, dep) in doc.deployments.iter().enumerate() {
            for (j, d) in dep.domains.iter().enumerate() {
                if hosts.contains(d.host.as_str()) {
                    return pinned(format!("deployments[{i}].domains[{j}].host"), d.host.as_str());
                }
            }
        }
    }
    let empty_toml = Kind::ALL.iter().all(|k| toml.count(*k) == 0);
    let merged;
    let whole = if empty_toml {
        doc
    } else {
        merged = doc.merged(toml);
        &merged
    };
    crate::state::validate(whole, domains).map_err(|errs| {
        // The document's objects come first in the merge; past their count, a path names
        // a TOML object.
        WriteError::Invalid(
            errs.into_iter()
                .map(|mut e| {
                    for kind in Kind::ALL {
                        let Some(rest) = e.path.strip_prefix(kind.field()).and_then(|r| r.strip_prefix('[')) else { continue };
                        let Some((idx, tail)) = rest.split_once(']') else { continue };
                        if let Ok(i) = idx.parse::<usize>() {
                            if i >= doc.count(kind) {
                                e.path = format!("toml: {}[{}]{tail}", kind.field(), i - doc.count(kind));
                            }
                        }
                    }
                    e
                })
                .collect(),
        )
    })
}

/// What the state directory holds: the ops that rebuild the API state, and the
/// generation they reach.
struct Recovered {
    ops: Vec<BatchOp>,
    generation: u64,
    /// Log records replayed after the snapshot.
    records: u64,
}

/// Reads every log record of `dir` after `snapshot_generation`. A torn tail is cut off
/// with a log line; segments after a break in the generations are set aside as
/// `.corrupt`.
fn recover(dir: &Path, snapshot_generation: u64) -> Result<Recovered, OpenError> {
    let read_err = |message: String| OpenError::Read { path: dir.to_path_buf(), message };
    let mut ops = Vec::new();
    let mut generation = snapshot_generation;
    let mut last: Option<u64> = None;
    let mut broken = false;
    let mut records = 0;
    for seg in log::segments(dir).map_err(|e| read_err(e.to_string()))? {
        if broken {
            let aside = PathBuf::from(format!("{}.corrupt", seg.display()));
            tracing::error!(segment = %seg.display(), aside = %aside.display(), "state log segment after a break: set aside, not replayed");
            let _ = std::fs::rename(&seg, &aside);
            continue;
        }
        let bytes = log::read(&seg).map_err(|e| read_err(format!("{}: {e}", seg.display())))?;
        let parsed = log::parse(&bytes, last);
        for r in parsed.records {
            last = Some(r.generation);
            if r.generation <= generation {
                continue; // folded into the snapshot already
            }
            if r.generation != generation + 1 {
                tracing::error!(segment = %seg.display(), expected = generation + 1, found = r.generation, "state log records missing after the snapshot");
                broken = true;
                break;
            }
            generation = r.generation;
            records += 1;
            ops.extend(r.ops.into_iter().map(|op| BatchOp { path: String::new(), origin: Origin::Api, op }));
        }
        if let Some(why) = parsed.torn {
            tracing::warn!(segment = %seg.display(), kept_bytes = parsed.good_len, reason = %why, "state log: torn tail dropped");
            log::truncate(&seg, parsed.good_len).map_err(|e| read_err(format!("cannot cut the torn tail of {}: {e}", seg.display())))?;
            broken = true;
        }
    }
    Ok(Recovered { ops, generation, records })
}

#[cfg(test)]
mod tests;
