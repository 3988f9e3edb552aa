//! Fleet mode (CONTRACT §11): several nodes behave as one edge by sharing what must be
//! shared through Redis. Nodes never talk to each other and there is no consensus code
//! here: Redis orders the writes, every node follows.
//!
//! ```text
//! control write on any node ─ check on its state at G ─ EVAL append: if gen == G
//!                               then INCR gen; XADD log (G+1)-0 {record} ─ local log ─ ack
//!                               else "behind": wait for the follower, check again
//! follower (each node)      ─ XREAD BLOCK from its generation ─ Store::follow, in order
//!                               a gap (trimmed away) ─ GET snap ─ Store::follow_snapshot
//! beat (each node)          ─ HSET nodes {node: generation, ready, last_seen}, every second
//!                             one node at a time (lock): SET snap, XTRIM log below it
//! ```
//!
//! Keys, all under `[cluster] prefix` (`{p}`): `{p}:gen` (the fleet's generation),
//! `{p}:log` (a stream: entry `G-0` holds the record that made generation G, in the
//! state log's own JSON, and the time Redis appended it), `{p}:snap` (the state at some
//! generation, in the snapshot format of [`crate::store::snapshot`]; `{p}:snap:at`, when
//! it was kept; `{p}:logbytes`, record bytes appended since), `{p}:nodes` (a hash of
//! heartbeats), and the keys of [`certs`] and [`counters`].
//!
//! Everything read from Redis is input: a record that does not parse, a generation
//! that goes back, a snapshot that fails its checksum are logged, counted
//! (`miosa_edge_cluster_bad_input_total`) and skipped or refused; never applied in part.
//!
//! The connections are synchronous ones on blocking threads: the follower blocks in
//! XREAD anyway, and a write already runs on the blocking pool while it holds the
//! store's writer lock.

pub mod certs;
pub mod counters;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::services::{Service, Shutdown};
use crate::store::log::Record;
use crate::store::{FollowError, Replicate, Replicator, Store};
use redis::{Commands, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Connecting to Redis gives up after this long (a write answers 503 meanwhile).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// A command without an answer after this long is a lost connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The follower's blocking read waits this long for new records (ms).
const BLOCK_MS: usize = 1000;
/// Records read at a time.
const READ_COUNT: usize = 1000;
/// Heartbeats older than this are not listed by `GET /v1/cluster`.
const NODE_SEEN_WITHIN_MS: u64 = 60_000;
/// A node that has not reported for this long is removed from `{p}:nodes`.
const FORGET_AFTER_MS: u64 = 3_600_000;
/// A new snapshot is kept in Redis after this many records…
const SNAPSHOT_EVERY_RECORDS: u64 = 100_000;
/// …or this many record bytes…
const SNAPSHOT_EVERY_BYTES: u64 = 64 << 20;
/// …or this long after the last one, when anything was written since.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(60);
/// Records kept in the stream before the snapshot (a node a little behind follows them
/// instead of loading the snapshot).
const KEEP_BEFORE_SNAPSHOT: u64 = 10_000;

/// Compare-and-append: the record of generation ARGV[1]+1 is added only if the fleet is
/// still at ARGV[1]. Answers {1, new} or {0, current}.
const APPEND: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '0' end
local n = tonumber(cur)
if n == nil or n < 0 or n ~= math.floor(n) then
  return redis.error_reply('the generation key holds ' .. cur .. ', not a generation')
end
if cur ~= ARGV[1] then return {0, cur} end
local g = n + 1
local t = redis.call('TIME')
redis.call('XADD', KEYS[2], g .. '-0', 'r', ARGV[2], 't', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('SET', KEYS[1], g)
redis.call('INCRBY', KEYS[3], string.len(ARGV[2]))
return {1, tostring(g)}
";

/// A fleet that has never been written to takes a node's state as its start.
/// KEYS: gen, snap, id; ARGV: generation, snapshot, the fleet identity the node has.
const SEED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
return 1
";

/// Where a node keeps the identity of the fleet its state belongs to.
const FLEET_ID_FILE: &str = "fleet.id";

/// The fleet as this node sees it.
pub struct Cluster {
    /// This node's name.
    pub node: String,
    prefix: String,
    state_dir: std::path::PathBuf,
    client: redis::Client,
    metrics: Arc<Metrics>,
    /// The writes' connection (one write at a time holds the store lock anyway).
    writer: Mutex<Option<redis::Connection>>,
    /// The follower reaches Redis.
    connected: AtomicBool,
    /// This node's state belongs to another history than the fleet's: it does not
    /// follow, and is not ready (it would serve a state the fleet never had).
    foreign: AtomicBool,
    /// The follower has tried to reach Redis at least once (until then a node is not
    /// ready: it may be about to find that the fleet is ahead of it).
    tried: AtomicBool,
    /// The follower has applied everything the fleet had when it (re)connected.
    caught_up: AtomicBool,
    /// This node has a state to serve (its own copy, or the fleet's once caught up).
    has_state: AtomicBool,
    /// The fleet's generation as last seen.
    fleet_generation: AtomicU64,
    append: redis::Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Why Redis could not be used.
pub type RedisError = redis::RedisError;

/// A node's heartbeat, as `GET /v1/cluster` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: String,
    pub generation: u64,
    pub ready: bool,
    /// RFC 3339, UTC.
    pub last_seen: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Beat {
    generation: u64,
    ready: bool,
    /// Unix milliseconds.
    at: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Cluster {
    /// The fleet of `[cluster]` (None without it). Does not connect yet.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Option<Arc<Cluster>>, String> {
        let Some(c) = &cfg.cluster else { return Ok(None) };
        let client = redis::Client::open(c.redis_url.as_str()).map_err(|e| format!("cluster: ${}: {e}", c.redis_url_env))?;
        Ok(Some(Arc::new(Cluster {
            node: c.node.clone(),
            prefix: c.prefix.clone(),
            state_dir: cfg.server.state_dir.clone(),
            client,
            metrics,
            writer: Mutex::new(None),
            connected: AtomicBool::new(false),
            tried: AtomicBool::new(false),
            foreign: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            has_state: AtomicBool::new(false),
            fleet_generation: AtomicU64::new(0),
            append: redis::Script::new(APPEND),
        })))
    }

    /// `{prefix}:{name}`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// A fresh connection with bounded connect, read and write times.
    pub fn connect(&self) -> Result<redis::Connection, RedisError> {
        let conn = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// Runs `f` on a connection kept in `slot` (made when missing, dropped after an
    /// error so the next call connects again).
    pub fn with_conn<T>(
        &self,
        slot: &Mutex<Option<redis::Connection>>,
        f: impl FnOnce(&mut redis::Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match guard.as_mut() {
            Some(c) => c,
            None => guard.insert(self.connect()?),
        };
        let r = f(conn);
        if r.as_ref().is_err_and(|e| e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()) {
            *guard = None;
        }
        r
    }

    /// Whether the follower reaches Redis now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Ready to serve (CONTRACT §11): caught up with the fleet, or cut off from Redis
    /// with a state of its own. A node with no state and no Redis is not ready.
    pub fn ready(&self) -> bool {
        if !self.tried.load(Ordering::Relaxed) || self.foreign.load(Ordering::Relaxed) {
            false
        } else if self.connected() {
            self.caught_up.load(Ordering::Relaxed)
        } else {
            self.has_state.load(Ordering::Relaxed)
        }
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.tried.store(true, Ordering::Relaxed);
        if !up {
            self.caught_up.store(false, Ordering::Relaxed);
        }
        self.metrics.cluster_connected.set(i64::from(up));
    }

    fn saw_generation(&self, g: u64) {
        self.fleet_generation.fetch_max(g, Ordering::Relaxed);
        self.metrics.cluster_generation.set(self.fleet_generation.load(Ordering::Relaxed) as i64);
    }

    /// Every node that reported within the last minute, by name.
    pub fn nodes(&self) -> Result<Vec<NodeStatus>, RedisError> {
        let mut conn = self.connect()?;
        let all: Vec<(String, Vec<u8>)> = conn.hgetall(self.key("nodes"))?;
        let now = now_ms();
        let mut out = Vec::new();
        for (node, value) in all {
            let Ok(beat) = serde_json::from_slice::<Beat>(&value) else {
                self.metrics.cluster_bad_input.inc();
                tracing::warn!(node = %node, "cluster: a heartbeat in Redis does not parse: skipped");
                continue;
            };
            if now.saturating_sub(beat.at) > NODE_SEEN_WITHIN_MS {
                continue;
            }
            let last_seen = crate::schema::Timestamp((beat.at / 1000) as i64).to_rfc3339();
            out.push(NodeStatus { node, generation: beat.generation, ready: beat.ready, last_seen });
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// Before the store opens: a node with no state of its own takes the fleet's
    /// snapshot as its `state.snap`, so it starts from it the fast way (a million
    /// sandboxes in a couple of seconds) and follows the log from there. Redis away or
    /// without a snapshot: nothing happens (the follower catches up later).
    pub fn prepare(&self) {
        let state_dir = self.state_dir.as_path();
        use crate::store::{log, snapshot};
        let has_files = state_dir.join(snapshot::FILE).exists()
            || state_dir.join(snapshot::LEGACY_FILE).exists()
            || log::segments(state_dir).map(|s| !s.is_empty()).unwrap_or(false);
        let mut conn = match self.connect() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: Redis unreachable at start; serving this node's own copy until it answers");
                return;
            }
        };
        let fleet: Result<(Option<String>, Option<String>), RedisError> =
            redis::pipe().get(self.key("id")).get(self.key("gen")).query(&mut conn);
        let (fleet_id, fleet_gen) = match fleet {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot read the fleet's identity at start");
                return;
            }
        };
        let local_id = self.local_id();
        if has_files && fleet_gen.is_some() && local_id.is_none() {
            // A state made outside this fleet (a single node's, or an earlier version's):
            // following the fleet's log on top of it would mix two histories. It is set
            // aside, and the node starts from the fleet's state.
            let aside = state_dir.join(format!("before-fleet-{}", now_ms()));
            let moved = std::fs::create_dir_all(&aside).and_then(|()| {
                for e in std::fs::read_dir(state_dir)? {
                    let path = e?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                    if name == snapshot::FILE || name == snapshot::LEGACY_FILE || name.starts_with("state.log") {
                        std::fs::rename(&path, aside.join(&name))?;
                    }
                }
                Ok(())
            });
            match moved {
                Ok(()) => {
                    tracing::warn!(aside = %aside.display(), fleet = ?fleet_id, "cluster: this node's state was not made in this fleet: set aside; starting from the fleet's")
                }
                Err(e) => {
                    tracing::error!(error = %e, "cluster: cannot set aside a state made outside this fleet");
                    return;
                }
            }
        } else if has_files {
            return;
        }
        let started = Instant::now();
        let bytes: Option<Vec<u8>> = match conn.get(self.key("snap")) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot read the fleet's snapshot at start; following its log instead");
                return;
            }
        };
        let Some(bytes) = bytes else { return };
        let generation = match snapshot::Snapshot::decode(bytes.clone()) {
            Ok(s) => s.generation,
            Err(e) => {
                self.metrics.cluster_bad_input.inc();
                tracing::error!(error = %e, "cluster: the fleet's snapshot in Redis does not read: not used");
                return;
            }
        };
        let Some(id) = fleet_id else {
            // Every fleet that has a snapshot has an identity (the node that seeded it,
            // or the first to connect, set it): without one this is not our layout.
            self.metrics.cluster_bad_input.inc();
            tracing::error!("cluster: the fleet has a snapshot but no identity: not used");
            return;
        };
        let written = std::fs::create_dir_all(state_dir)
            .and_then(|()| snapshot::write_bytes(&state_dir.join(snapshot::FILE), &bytes))
            .and_then(|()| self.save_local_id(&id));
        if let Err(e) = written {
            tracing::error!(error = %e, "cluster: cannot write the fleet's snapshot to the state directory");
            let _ = std::fs::remove_file(state_dir.join(snapshot::FILE));
            return;
        }
        tracing::info!(
            generation,
            bytes = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "cluster: started from the fleet's snapshot"
        );
    }

    /// The fleet this node's state belongs to (`<state_dir>/fleet.id`).
    fn local_id(&self) -> Option<String> {
        std::fs::read_to_string(self.state_dir.join(FLEET_ID_FILE)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    fn save_local_id(&self, id: &str) -> std::io::Result<()> {
        crate::files::write_atomic(&self.state_dir.join(FLEET_ID_FILE), id.as_bytes(), 0o644)
    }

    /// Ties the store to the fleet: its writes are appended here first.
    pub fn attach(self: &Arc<Self>, store: &Store) {
        self.has_state.store(store.generation() > 0, Ordering::Relaxed);
        store.replicate_through(Arc::new(Appender(self.clone())));
    }
}

/// The store's [`Replicator`]: compare-and-append in one script.
struct Appender(Arc<Cluster>);

impl Replicator for Appender {
    fn append(&self, expected: u64, payload: &[u8]) -> Result<(), Replicate> {
        let c = &self.0;
        if !c.connected() {
            return Err(Replicate::Unavailable("Redis is unreachable".into()));
        }
        let keys = [c.key("gen"), c.key("log"), c.key("logbytes")];
        let r: Result<(u8, String), RedisError> = c.with_conn(&c.writer, |conn| {
            c.append.key(&keys[0]).key(&keys[1]).key(&keys[2]).arg(expected.to_string()).arg(payload).invoke(conn)
        });
        match r {
            Ok((1, _)) => {
                c.saw_generation(expected + 1);
                Ok(())
            }
            Ok((_, current)) => match current.parse::<u64>() {
                Ok(g) if g > expected => {
                    c.saw_generation(g);
                    Err(Replicate::Behind(g))
                }
                // The fleet went back (Redis lost data): never follow it there.
                _ => Err(Replicate::Unavailable(format!("the fleet is at generation {current}, behind this node's {expected}"))),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cluster: append failed");
                Err(Replicate::Unavailable(e.to_string()))
            }
        }
    }
}

/// Reads one stream entry: its generation and record. `None` for anything foreign.
fn entry(id: &str, fields: &[(String, Value)]) -> Result<(u64, Record, u64), String> {
    let g = id.strip_suffix("-0").and_then(|g| g.parse::<u64>().ok()).ok_or_else(|| format!("entry id {id} is not a generation"))?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let Some(Value::BulkString(raw)) = field("r") else { return Err(format!("entry {id} has no record")) };
    let t = match field("t") {
        Some(Value::BulkString(t)) => std::str::from_utf8(t).ok().and_then(|t| t.parse().ok()).unwrap_or(0),
        _ => 0,
    };
    let record = Record::decode(raw).map_err(|e| format!("entry {id}: {e}"))?;
    if record.generation != g {
        return Err(format!("entry {id} holds the record of generation {}", record.generation));
    }
    Ok((g, record, t))
}

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, Value)>);

/// Parses an XREAD reply: `[[stream, [[id, [k, v, …]], …]]]`.
fn stream_entries(v: Value) -> Result<Vec<Entry>, String> {
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s,
        Value::Map(m) => m.into_iter().map(|(k, v)| Value::Array(vec![k, v])).collect(),
        other => return Err(format!("XREAD answered {other:?}")),
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(mut pair) = s else { return Err("a stream reply is not a pair".into()) };
        let Some(Value::Array(entries)) = pair.pop() else { return Err("a stream reply has no entries".into()) };
        for e in entries {
            let Value::Array(mut idf) = e else { return Err("an entry is not a pair".into()) };
            let (Some(fields), Some(id)) = (idf.pop(), idf.pop()) else { return Err("an entry is not a pair".into()) };
            let id = match id {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::SimpleString(s) => s,
                _ => return Err("an entry id is not a string".into()),
            };
            let flat = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => return Err(format!("entry {id} has no fields")),
            };
            let mut pairs = Vec::new();
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let k = match k {
                    Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    Value::SimpleString(s) => s,
                    _ => continue,
                };
                pairs.push((k, v));
            }
            out.push((id, pairs));
        }
    }
    Ok(out)
}

/// Follows the fleet's log into the store (one per node).
pub struct Follower {
    pub cluster: Arc<Cluster>,
    pub store: Arc<Store>,
}

#[async_trait::async_trait]
impl Service for Follower {
    fn name(&self) -> &'static str {
        "cluster follower"
    }

    async fn run(self: Arc<Self>, shutdown: Shutdown) {
        crate::services::run_blocking(self.name(), shutdown, move |stop| self.follow(stop)).await
    }
}

impl Follower {
    fn follow(&self, shutdown: &Shutdown) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_set() {
            let r = self.connect().and_then(|mut conn| {
                self.cluster.set_connected(true);
                backoff = Duration::from_millis(100);
                self.session(&mut conn, shutdown)
            });
            if shutdown.is_set() {
                return;
            }
            if let Err(e) = r {
                if self.cluster.connected() {
                    tracing::warn!(error = %e, "cluster: not following the fleet; serving the state this node has, writes answer 503");
                }
                self.cluster.set_connected(false);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        self.cluster.connect().map_err(|e| e.to_string())
    }

    /// One connected stretch: catch up, then follow until an error.
    fn session(&self, conn: &mut redis::Connection, shutdown: &Shutdown) -> Result<(), String> {
        let c = &self.cluster;
        let fleet = self.fleet_generation(conn)?;
        let local = self.store.generation();
        self.check_identity(conn, fleet.is_some(), local)?;
        c.foreign.store(false, Ordering::Relaxed);
        match fleet {
            None if local > 0 => self.seed(conn, local)?,
            Some(g) if g < local => {
                // Redis went back (restored from an older copy, or flushed in part):
                // this node never serves an older generation than it did.
                self.cluster.metrics.cluster_bad_input.inc();
                return Err(format!("the fleet is at generation {g}, behind this node's {local}; not following it back"));
            }
            _ => {}
        }
        let target = fleet.unwrap_or(0);
        c.saw_generation(target);
        let mut caught_up = false;
        while !shutdown.is_set() {
            let have = self.store.generation();
            if !caught_up && have >= target {
                caught_up = true;
                c.caught_up.store(true, Ordering::Relaxed);
                c.has_state.store(true, Ordering::Relaxed);
                tracing::info!(generation = have, "cluster: caught up with the fleet");
            }
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(if caught_up { BLOCK_MS } else { 1 })
                .arg("STREAMS")
                .arg(c.key("log"))
                .arg(format!("{have}-0"))
                .query(conn)
                .map_err(|e| e.to_string())?;
            let entries = match stream_entries(reply) {
                Ok(e) => e,
                Err(e) => {
                    c.metrics.cluster_bad_input.inc();
                    return Err(format!("the fleet's log does not read: {e}"));
                }
            };
            if entries.is_empty() {
                c.metrics.cluster_lag_seconds.set(0.0);
                if !caught_up {
                    // Nothing after `have`, yet the fleet is further: trimmed away.
                    self.load_snapshot(conn)?;
                }
                continue;
            }
            let mut records = Vec::with_capacity(entries.len());
            let mut newest_t = 0;
            for (id, fields) in &entries {
                match entry(id, fields) {
                    Ok((_, r, t)) => {
                        newest_t = t;
                        records.push(r);
                    }
                    Err(e) => {
                        // A record this node cannot read is passed over whole, in its
                        // place (the fleet's order is kept; its ops are not applied).
                        c.metrics.cluster_bad_input.inc();
                        tracing::error!(error = %e, "cluster: a record of the fleet's log does not read: passed over");
                        match id.strip_suffix("-0").and_then(|g| g.parse::<u64>().ok()) {
                            Some(g) => records.push(Record { generation: g, ops: Vec::new() }),
                            None => return Err(format!("the fleet's log holds a foreign entry {id}")),
                        }
                    }
                }
            }
            if let Some(last) = records.last() {
                c.saw_generation(last.generation);
            }
            match self.store.follow(records) {
                Ok(_) => {}
                Err(FollowError::Gap { have, found }) => {
                    tracing::info!(have, found, "cluster: this node's position was trimmed from the fleet's log; loading the snapshot");
                    self.load_snapshot(conn)?;
                }
                Err(FollowError::Write(e)) => return Err(format!("cannot apply the fleet's records: {e}")),
            }
            if newest_t > 0 {
                c.metrics.cluster_lag_seconds.set(now_ms().saturating_sub(newest_t) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    /// The fleet's generation (`None`: nothing was ever written).
    fn fleet_generation(&self, conn: &mut redis::Connection) -> Result<Option<u64>, String> {
        let v: Option<String> = conn.get(self.cluster.key("gen")).map_err(|e| e.to_string())?;
        match v {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                self.cluster.metrics.cluster_bad_input.inc();
                format!("{} holds {s:?}, not a generation", self.cluster.key("gen"))
            }),
        }
    }

    /// Makes sure this node's state belongs to the fleet in Redis (`{p}:id` against
    /// `<state_dir>/fleet.id`): a state of another history is never followed.
    fn check_identity(&self, conn: &mut redis::Connection, fleet_exists: bool, local: u64) -> Result<(), String> {
        let c = &self.cluster;
        let mine = c.local_id();
        let theirs: Option<String> = conn.get(c.key("id")).map_err(|e| e.to_string())?;
        let foreign = |e: String| {
            c.foreign.store(true, Ordering::Relaxed);
            c.metrics.cluster_bad_input.inc();
            Err::<(), String>(e)
        };
        match (mine, theirs) {
            (Some(m), Some(t)) if m == t => Ok(()),
            (Some(m), Some(t)) => {
                foreign(format!("this node's state belongs to fleet {m}, Redis holds fleet {t}: not following it (check [cluster] prefix)"))
            }
            (None, _) if local > 0 && fleet_exists => foreign(
                "this node's state was not made in this fleet (it started while Redis was away): restart it to take the fleet's state"
                    .into(),
            ),
            (mine, theirs) => {
                // A fresh node adopts the fleet's identity; a node that seeds a new fleet
                // (or one Redis lost) gives it its own, or a new one.
                let id = match (theirs, mine) {
                    (Some(t), _) => t,
                    (None, Some(m)) => m,
                    (None, None) => {
                        let mut raw = [0u8; 16];
                        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                            .map_err(|_| "no randomness for a fleet identity".to_string())?;
                        raw.iter().map(|b| format!("{b:02x}")).collect()
                    }
                };
                // Whoever set it first wins (two fresh nodes at once).
                let (id,): (String,) =
                    redis::pipe().set_nx(c.key("id"), &id).ignore().get(c.key("id")).query(conn).map_err(|e| e.to_string())?;
                c.save_local_id(&id).map_err(|e| format!("cannot keep the fleet's identity in the state directory: {e}"))
            }
        }
    }

    /// The fleet has no state yet: this node's becomes its start.
    fn seed(&self, conn: &mut redis::Connection, local: u64) -> Result<(), String> {
        let (generation, bytes) = self.store.snapshot_bytes().map_err(|e| e.to_string())?;
        let id = self.cluster.local_id().unwrap_or_default();
        let seeded: i64 = redis::Script::new(SEED)
            .key(self.cluster.key("gen"))
            .key(self.cluster.key("snap"))
            .key(self.cluster.key("id"))
            .arg(generation.to_string())
            .arg(bytes)
            .arg(id)
            .invoke(conn)
            .map_err(|e| e.to_string())?;
        if seeded == 1 {
            tracing::info!(generation, local, "cluster: the fleet had no state; this node's is its start");
        }
        Ok(())
    }

    fn load_snapshot(&self, conn: &mut redis::Connection) -> Result<(), String> {
        let bytes: Option<Vec<u8>> = conn.get(self.cluster.key("snap")).map_err(|e| e.to_string())?;
        let Some(bytes) = bytes else {
            self.cluster.metrics.cluster_bad_input.inc();
            return Err("the fleet's log was trimmed past this node and there is no snapshot".into());
        };
        let started = Instant::now();
        match self.store.follow_snapshot(&bytes) {
            Ok(Some(g)) => {
                tracing::info!(generation = g, ms = started.elapsed().as_millis() as u64, "cluster: took the fleet's snapshot");
                Ok(())
            }
            Ok(None) => Err("the fleet's snapshot is not ahead of this node and its log was trimmed".into()),
            Err(e) => {
                self.cluster.metrics.cluster_bad_input.inc();
                Err(format!("the fleet's snapshot cannot be taken: {e}"))
            }
        }
    }
}

/// Heartbeats, and the fleet's snapshot kept fresh (one node at a time).
pub struct Beats {
    pub cluster: Arc<Cluster>,
    pub store: Arc<Store>,
}

#[async_trait::async_trait]
impl Service for Beats {
    fn name(&self) -> &'static str {
        "cluster heartbeat"
    }

    async fn run(self: Arc<Self>, shutdown: Shutdown) {
        crate::services::run_blocking(self.name(), shutdown, move |stop| self.beat(stop)).await
    }
}

impl Beats {
    fn beat(&self, shutdown: &Shutdown) {
        let slot = Mutex::new(None);
        let mut beats: u64 = 0;
        while !shutdown.is_set() {
            let c = &self.cluster;
            beats += 1;
            if beats % 60 == 0 {
                // Nodes that left without a word (killed, scaled away) are forgotten
                // after an hour, so the hash does not grow with every name ever used.
                if let Err(e) = c.with_conn(&slot, |conn| self.forget_departed(conn)) {
                    tracing::debug!(error = %e, "cluster: cannot prune departed nodes");
                }
            }
            let beat = Beat { generation: self.store.generation(), ready: c.ready(), at: now_ms() };
            let json = serde_json::to_vec(&beat).unwrap_or_default();
            let r = c.with_conn(&slot, |conn| conn.hset::<_, _, _, ()>(c.key("nodes"), &c.node, json));
            if r.is_ok() && c.caught_up.load(Ordering::Relaxed) {
                if let Err(e) = c.with_conn(&slot, |conn| self.maybe_snapshot(conn)) {
                    tracing::warn!(error = %e, "cluster: cannot keep the fleet's snapshot");
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        // Leaving: the fleet stops listing this node at once.
        let _ = self.cluster.with_conn(&slot, |conn| conn.hdel::<_, _, ()>(self.cluster.key("nodes"), &self.cluster.node));
    }

    fn forget_departed(&self, conn: &mut redis::Connection) -> Result<(), RedisError> {
        let c = &self.cluster;
        let all: Vec<(String, Vec<u8>)> = conn.hgetall(c.key("nodes"))?;
        let now = now_ms();
        let gone: Vec<String> = all
            .into_iter()
            .filter(|(_, v)| serde_json::from_slice::<Beat>(v).map_or(true, |b| now.saturating_sub(b.at) > FORGET_AFTER_MS))
            .map(|(node, _)| node)
            .collect();
        if !gone.is_empty() {
            conn.hdel::<_, _, ()>(c.key("nodes"), gone)?;
        }
        Ok(())
    }

    /// Writes a new snapshot of the fleet's state when enough was written since the
    /// last one, under a lock so one node does it; trims the log below it.
    fn maybe_snapshot(&self, conn: &mut redis::Connection) -> Result<bool, RedisError> {
        let c = &self.cluster;
        let fleet: Option<u64> = conn.get::<_, Option<String>>(c.key("gen"))?.and_then(|g| g.parse().ok());
        let Some(fleet) = fleet else { return Ok(false) };
        let head: Vec<u8> = conn.getrange(c.key("snap"), 0, 24)?;
        let snap_gen = head.get(17..25).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
        let bytes_since: u64 = conn.get::<_, Option<String>>(c.key("logbytes"))?.and_then(|b| b.parse().ok()).unwrap_or(0);
        // When the last snapshot was kept (Unix ms; none yet: long ago).
        let at: u64 = conn.get::<_, Option<String>>(c.key("snap:at"))?.and_then(|b| b.parse().ok()).unwrap_or(0);
        let since = Duration::from_millis(now_ms().saturating_sub(at));
        let behind = fleet.saturating_sub(snap_gen);
        let wanted = behind >= SNAPSHOT_EVERY_RECORDS || bytes_since >= SNAPSHOT_EVERY_BYTES || (behind > 0 && since >= SNAPSHOT_EVERY);
        if !wanted || self.store.generation() < fleet {
            return Ok(false);
        }
        let lock: Option<String> = redis::cmd("SET").arg(c.key("snap:lock")).arg(&c.node).arg("NX").arg("PX").arg(60_000).query(conn)?;
        if lock.is_none() {
            return Ok(false);
        }
        let result = (|| {
            let (generation, bytes) =
                self.store.snapshot_bytes().map_err(|e| RedisError::from((redis::ErrorKind::Io, "snapshot", e.to_string())))?;
            let size = bytes.len();
            // Never replace a newer snapshot with an older one.
            let current: Vec<u8> = conn.getrange(c.key("snap"), 0, 24)?;
            let now_gen = current.get(17..25).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
            if generation <= now_gen {
                return Ok(false);
            }
            redis::pipe().atomic().set(c.key("snap"), bytes).set(c.key("snap:at"), now_ms()).set(c.key("logbytes"), 0).query::<()>(conn)?;
            // Records after a large write are cheaper to skip than to replay: when the
            // log holds more than the byte bound (measured, whatever triggered this
            // snapshot), it keeps nothing the snapshot holds. Either way only records
            // the snapshot holds (its generation and below) are trimmed.
            // (A Redis that does not offer MEMORY USAGE: the appended-bytes count decides.)
            let log_bytes: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(c.key("log")).query(conn).unwrap_or(None);
            let min = if log_bytes.unwrap_or(0).max(bytes_since) >= SNAPSHOT_EVERY_BYTES {
                generation + 1
            } else {
                generation.saturating_sub(KEEP_BEFORE_SNAPSHOT)
            };
            let trimmed: u64 = redis::cmd("XTRIM").arg(c.key("log")).arg("MINID").arg(format!("{min}-0")).query(conn)?;
            tracing::info!(generation, bytes = size, trimmed, "cluster: kept a snapshot of the fleet's state");
            Ok(true)
        })();
        let _: Result<(), _> = conn.del(c.key("snap:lock"));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_stream_entries_are_refused_not_applied() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let fields = vec![("r".to_string(), bulk(r#"{"g":7,"ops":[]}"#)), ("t".to_string(), bulk("123"))];
        assert_eq!(entry("7-0", &fields).map(|(g, r, t)| (g, r.generation, t)), Ok((7, 7, 123)));
        assert!(entry("8-0", &fields).unwrap_err().contains("generation 7"));
        assert!(entry("7-1", &fields).is_err());
        assert!(entry("x", &fields).is_err());
        let truncated = vec![("r".to_string(), bulk(r#"{"g":7,"ops":[{"op":"upsert""#))];
        assert!(entry("7-0", &truncated).is_err());
        assert!(entry("7-0", &[]).is_err());
        // A reply of the wrong shape is an error, not a panic.
        assert!(stream_entries(Value::Int(3)).is_err());
        assert!(stream_entries(Value::Array(vec![Value::Int(1)])).is_err());
        assert_eq!(stream_entries(Value::Nil), Ok(Vec::new()));
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("p:log"),
            Value::Array(vec![Value::Array(vec![bulk("7-0"), Value::Array(vec![bulk("r"), bulk("{}"), bulk("t"), bulk("1")])])]),
        ])]);
        let parsed = stream_entries(reply).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "7-0");
        assert_eq!(parsed[0].1.len(), 2);
    }
}
