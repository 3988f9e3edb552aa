//! Counters shared by the fleet in Redis (CONTRACT §11): the share-password attempt
//! limit and the usage report.
//!
//! ```text
//! password POST (any node) ─ EVAL take: count < 10 ? INCR (+PEXPIRE 60 s when new) : refuse
//!                            ─ refused: 429 · counted: argon2 ─ right: DEL
//!                            Redis unreachable: this node's own limiter decides alone
//! usage (each node)        ─ every second: Usage::fleet_batch (saved in usage.json first)
//!                            ─ EVAL apply: (epoch, seq) newer than applied:{node}?
//!                              HINCRBY totals; SET applied ─ Usage::fleet_applied
//! GET /v1/usage (any node) ─ flush this node ─ EVAL report: ack = issued? acked := issued;
//!                            answer totals − acked; issued := totals under the next cursor
//! ```
//!
//! Keys under `[cluster] prefix` (`{p}`):
//! - `{p}:pw:{sha256 of the token, hex}:{client IP}`: failures within the window (a
//!   counter that expires 60 s after the first).
//! - `{p}:usage:totals`: the fleet's workspace counts since ever, fields `r:{id}`
//!   (requests) and `b:{id}` (bytes). `{p}:usage:issued` and `{p}:usage:acked` hold the
//!   same fields as they were at the last issued and the last acknowledged cursor;
//!   `{p}:usage:cursor` the fields `next` and `issued` (cursor numbers).
//! - `{p}:usage:applied:{node}`: `"{epoch} {seq}"`, the last batch of `node` applied.
//!
//! Never lost, never doubled: a node's counts are in its `usage.json` until the fleet
//! confirms them (a Redis outage or a crash keeps them there), and a batch carries a
//! sequence number the fleet applies once (a retry after a timeout, whose first try did
//! reach Redis, is passed over). The report's cursor works as the single node's
//! ([`crate::usage::Usage::report`]), in one script, so every node shares one cursor.
//!
//! Everything read from Redis is input: a count that does not parse is logged, counted
//! in `miosa_edge_cluster_bad_input_total` and skipped (a corrupt field in the totals is
//! started again from the batch being applied, and said so).

use super::{Cluster, RedisError};
use crate::access::password::{SharedAttempts, MAX_FAILURES, WINDOW_SECS};
use crate::services::{Service, Shutdown};
use crate::usage::{Batch, Entry, Report, Usage};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

static TAKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE));
static APPLY_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(APPLY));
static REPORT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REPORT));

/// A password try waits at most this long for Redis (then this node's limiter decides).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// After Redis failed a password try, the next tries skip it for this long.
const ATTEMPT_BACKOFF: Duration = Duration::from_secs(1);
/// Idle connections kept for password tries.
const ATTEMPT_POOL: usize = 4;
/// How often a node sends its counts (CONTRACT §11: at least every second).
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Takes one attempt: refused (0) when ARGV[1] are counted; else counted (1), the
/// window (ARGV[2] ms) starting with the first. A value that is not a count starts
/// again at one (2, so the caller says so).
const TAKE: &str = r"
local v = redis.call('GET', KEYS[1])
local n = 0
if v then n = tonumber(v) end
if n == nil or n < 0 or n ~= math.floor(n) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
  return 2
end
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// Applies a batch once: KEYS = applied, totals; ARGV = epoch, seq, then field and
/// delta pairs. Answers {1 applied | 0 applied before, fields that were not counts
/// (started again from the delta), 1 when `applied` did not read}. Every field is
/// checked before anything is written, so the script never stops half way.
const APPLY: &str = r"
local unreadable = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local e, s = string.match(cur, '^(%S+) (%d+)$')
  if e == nil then
    unreadable = 1
  elseif e == ARGV[1] and tonumber(s) >= tonumber(ARGV[2]) then
    return {0, {}, 0}
  end
end
local bad = {}
for i = 3, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  if v and not string.match(v, '^%d+$') then
    bad[#bad + 1] = ARGV[i]
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
return {1, bad, unreadable}
";

/// The report with the cursor: KEYS = totals, issued, acked, cursor; ARGV[1] = the
/// acknowledged cursor or ''. Answers {cursor, {field, total, acked, …}}. A fleet's
/// first cursor is its clock in seconds × 1000: far from any a single node gave (a
/// consumer's stored cursor from before cannot acknowledge a fleet report it never
/// saw), and past those of a fleet whose Redis lost its keys.
const REPORT: &str = r"
local issued = redis.call('HGET', KEYS[4], 'issued')
if ARGV[1] ~= '' and issued and issued == ARGV[1] then
  redis.call('DEL', KEYS[3])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[3]) end
  redis.call('HDEL', KEYS[4], 'issued')
end
local totals = redis.call('HGETALL', KEYS[1])
local acked = {}
local a = redis.call('HGETALL', KEYS[3])
for i = 1, #a, 2 do acked[a[i]] = a[i + 1] end
local out = {}
for i = 1, #totals, 2 do
  out[#out + 1] = totals[i]
  out[#out + 1] = totals[i + 1]
  out[#out + 1] = acked[totals[i]] or '0'
end
redis.call('DEL', KEYS[2])
for i = 1, #totals, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #totals) do chunk[#chunk + 1] = totals[j] end
  redis.call('HSET', KEYS[2], unpack(chunk))
end
if redis.call('HEXISTS', KEYS[4], 'next') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[4], 'next', t[1] .. '000')
end
local next = redis.call('HINCRBY', KEYS[4], 'next', 1)
redis.call('HSET', KEYS[4], 'issued', tostring(next))
return {next, out}
";

/// The usage keys of one fleet, as seen by one node.
#[derive(Clone, Debug)]
pub struct UsageKeys {
    pub totals: String,
    pub issued: String,
    pub acked: String,
    pub cursor: String,
    /// `{p}:usage:applied:{node}`.
    pub applied: String,
}

impl UsageKeys {
    /// The keys under `prefix` for `node`.
    pub fn new(prefix: &str, node: &str) -> UsageKeys {
        UsageKeys {
            totals: format!("{prefix}:usage:totals"),
            issued: format!("{prefix}:usage:issued"),
            acked: format!("{prefix}:usage:acked"),
            cursor: format!("{prefix}:usage:cursor"),
            applied: format!("{prefix}:usage:applied:{node}"),
        }
    }
}

/// What applying a batch found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Applied now (`false`: it had been applied before).
    pub now: bool,
    /// Fields of the totals that did not hold a count (started again from the batch).
    pub bad_fields: Vec<String>,
    /// The node's `applied` key did not read.
    pub bad_applied: bool,
}

/// Applies `batch` to the fleet's totals, once per (epoch, seq).
pub fn apply(conn: &mut redis::Connection, keys: &UsageKeys, batch: &Batch) -> Result<Applied, RedisError> {
    let mut inv = APPLY_SCRIPT.prepare_invoke();
    inv.key(&keys.applied).key(&keys.totals).arg(&batch.epoch).arg(batch.seq);
    for (id, (r, b)) in &batch.deltas {
        // Deltas past i64 would fail HINCRBY; no node counts that much in a second.
        let (r, b) = (i64::try_from(*r).unwrap_or(i64::MAX), i64::try_from(*b).unwrap_or(i64::MAX));
        inv.arg(format!("r:{id}")).arg(r).arg(format!("b:{id}")).arg(b);
    }
    let (now, bad_fields, bad_applied): (u8, Vec<String>, u8) = inv.invoke(conn)?;
    Ok(Applied { now: now == 1, bad_fields, bad_applied: bad_applied == 1 })
}

/// One row of the report script: a field and its total and acknowledged values, raw.
type Row = (String, String, String);

/// Runs the report script (acknowledging `ack` if it is the last issued cursor).
pub fn report_rows(conn: &mut redis::Connection, keys: &UsageKeys, ack: Option<u64>) -> Result<(u64, Vec<Row>), RedisError> {
    let (cursor, flat): (u64, Vec<String>) = REPORT_SCRIPT
        .key(&keys.totals)
        .key(&keys.issued)
        .key(&keys.acked)
        .key(&keys.cursor)
        .arg(ack.map(|a| a.to_string()).unwrap_or_default())
        .invoke(conn)?;
    let mut rows = Vec::with_capacity(flat.len() / 3);
    let mut it = flat.into_iter();
    while let (Some(f), Some(t), Some(a)) = (it.next(), it.next(), it.next()) {
        rows.push((f, t, a));
    }
    Ok((cursor, rows))
}

/// Builds the report from the script's rows; `bad` is told of each row that does not
/// read (a field that is not `r:`/`b:`, a value that is not a count), which is skipped.
pub fn report_from_rows(cursor: u64, rows: Vec<Row>, mut bad: impl FnMut(&str)) -> Report {
    let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (field, total, acked) in rows {
        let (which, id) = match field.split_once(':') {
            Some(("r", id)) => (0, id),
            Some(("b", id)) => (1, id),
            _ => {
                bad(&field);
                continue;
            }
        };
        let (Ok(total), Ok(acked)) = (total.parse::<u64>(), acked.parse::<u64>()) else {
            bad(&field);
            continue;
        };
        let e = per.entry(id.to_string()).or_default();
        let d = total.saturating_sub(acked);
        if which == 0 {
            e.0 = d;
        } else {
            e.1 = d;
        }
    }
    let entries = per.into_iter().filter(|(_, (r, b))| *r > 0 || *b > 0).map(|(id, (requests, bytes))| Entry { id, requests, bytes });
    Report::new(cursor, entries)
}

/// The fleet's usage counts as one node takes part in them.
pub struct FleetUsage {
    cluster: Arc<Cluster>,
    usage: Arc<Usage>,
    keys: UsageKeys,
    /// One flush at a time (the flusher and a report's own flush).
    conn: Mutex<Option<redis::Connection>>,
}

impl std::fmt::Debug for FleetUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetUsage").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl FleetUsage {
    /// This node's counts in `usage`, sent to `cluster`.
    pub fn new(cluster: Arc<Cluster>, usage: Arc<Usage>) -> FleetUsage {
        let keys = UsageKeys::new(&cluster.prefix, &cluster.node);
        FleetUsage { cluster, usage, keys, conn: Mutex::new(None) }
    }

    /// Sends what this node counted and the fleet does not have yet (blocking).
    /// Answers how many workspaces the batch carried (0: nothing was pending).
    pub fn flush(&self) -> Result<usize, RedisError> {
        let c = &self.cluster;
        c.with_conn(&self.conn, |conn| {
            let Some(batch) = self.usage.fleet_batch() else { return Ok(0) };
            let applied = apply(conn, &self.keys, &batch)?;
            for field in &applied.bad_fields {
                c.metrics.cluster_bad_input.inc();
                tracing::error!(key = %self.keys.totals, field = %field, "cluster: a usage total in Redis was not a count: started again from this node's batch");
            }
            if applied.bad_applied {
                c.metrics.cluster_bad_input.inc();
                tracing::error!(key = %self.keys.applied, "cluster: this node's last applied usage batch in Redis does not read: applied the batch");
            }
            if !applied.now {
                tracing::info!(seq = batch.seq, "cluster: a usage batch sent again had been applied before: not counted twice");
            }
            self.usage.fleet_applied(batch.seq);
            Ok(batch.deltas.len())
        })
    }

    /// The fleet's report (blocking): this node's counts are sent first, then the
    /// report is made with the cursor semantics of [`Usage::report`].
    pub fn report(&self, ack: Option<u64>) -> Result<Report, RedisError> {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cluster: cannot send this node's usage counts");
        }
        let c = &self.cluster;
        let (cursor, rows) = c.with_conn(&self.conn, |conn| report_rows(conn, &self.keys, ack))?;
        Ok(report_from_rows(cursor, rows, |field| {
            c.metrics.cluster_bad_input.inc();
            tracing::error!(key = %self.keys.totals, field = %field, "cluster: a usage count in Redis does not read: skipped");
        }))
    }
}

/// Sends this node's usage counts to the fleet every second, and once more at shutdown.
pub struct UsageFlusher(pub Arc<FleetUsage>);

#[async_trait::async_trait]
impl Service for UsageFlusher {
    fn name(&self) -> &'static str {
        "cluster usage counts"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait() => true,
            };
            let fleet = self.0.clone();
            match tokio::task::spawn_blocking(move || fleet.flush()).await {
                Ok(Ok(_)) => {
                    if failing {
                        tracing::info!("cluster: usage counts reach the fleet again");
                    }
                    failing = false;
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, "cluster: cannot send usage counts; they wait in usage.json");
                    }
                    failing = true;
                }
                Err(e) => tracing::error!(error = %e, "cluster usage flush task failed"),
            }
            if last {
                return;
            }
        }
    }
}

/// The share-password attempt limit counted in Redis ([`SharedAttempts`]).
pub struct Attempts(Arc<AttemptsInner>);

struct AttemptsInner {
    cluster: Arc<Cluster>,
    /// Idle connections (a try takes one, or makes one).
    pool: Mutex<Vec<redis::Connection>>,
    /// Redis failed a try recently: skip it until then.
    down_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Attempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempts").finish_non_exhaustive()
    }
}

impl Attempts {
    /// Attempts counted in `cluster`'s Redis.
    pub fn new(cluster: Arc<Cluster>) -> Attempts {
        Attempts(Arc::new(AttemptsInner { cluster, pool: Mutex::new(Vec::new()), down_until: Mutex::new(None) }))
    }
}

impl AttemptsInner {
    /// `{p}:pw:{hex sha256}:{ip}`.
    fn key(&self, share: &[u8; 32], ip: IpAddr) -> String {
        let hex: String = share.iter().map(|b| format!("{b:02x}")).collect();
        self.cluster.key(&format!("pw:{hex}:{ip}"))
    }

    /// Runs `f` on a pooled connection (blocking), with the short time limit of a try.
    fn run<T>(&self, f: impl Fn(&mut redis::Connection) -> Result<T, RedisError>) -> Result<T, String> {
        if self.down_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| Instant::now() < t) {
            return Err("Redis failed moments ago".into());
        }
        let fresh = || {
            self.cluster.connect().and_then(|c| {
                c.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
                c.set_write_timeout(Some(ATTEMPT_TIMEOUT))?;
                Ok(c)
            })
        };
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let r = match pooled {
            Some(mut c) => match f(&mut c) {
                Ok(v) => Ok((v, c)),
                // A pooled connection may have died with a Redis restart: one fresh try.
                // Not after a timeout: the first may have counted (twice would be
                // stricter, still not what was asked).
                Err(e) if !e.is_timeout() && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()) => {
                    fresh().and_then(|mut c| f(&mut c).map(|v| (v, c)))
                }
                Err(e) => Err(e),
            },
            None => fresh().and_then(|mut c| f(&mut c).map(|v| (v, c))),
        };
        match r {
            Ok((v, c)) => {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < ATTEMPT_POOL {
                    pool.push(c);
                }
                Ok(v)
            }
            Err(e) => {
                // The connection is dropped; the next tries skip Redis for a moment.
                *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + ATTEMPT_BACKOFF);
                Err(e.to_string())
            }
        }
    }
}

#[async_trait::async_trait]
impl SharedAttempts for Attempts {
    async fn take(&self, share: &[u8; 32], ip: IpAddr) -> Result<bool, String> {
        let key = self.0.key(share, ip);
        let me = self.0.clone();
        let r = tokio::task::spawn_blocking(move || {
            me.run(|conn| TAKE_SCRIPT.key(&key).arg(MAX_FAILURES).arg(WINDOW_SECS * 1000).invoke::<u8>(conn))
        })
        .await
        .map_err(|e| e.to_string())??;
        if r == 2 {
            self.0.cluster.metrics.cluster_bad_input.inc();
            tracing::error!("cluster: a share-password attempt count in Redis was not a count: counted again from one");
        }
        Ok(r != 0)
    }

    async fn forget(&self, share: &[u8; 32], ip: IpAddr) {
        let key = self.0.key(share, ip);
        let me = self.0.clone();
        let r = tokio::task::spawn_blocking(move || me.run(|conn| redis::cmd("DEL").arg(&key).query::<()>(conn))).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cluster: cannot forget share-password failures after a right password");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// Debian's `redis-server` on a unix socket in a temp dir (no port to race for),
    /// killed on drop.
    struct TestRedis {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl TestRedis {
        fn start() -> TestRedis {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("redis.sock");
            let child = Command::new("redis-server")
                .args(["--port", "0", "--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--unixsocket")
                .arg(&sock)
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is not installed: run scripts/deps");
            let url = format!("redis+unix://{}", sock.display());
            let r = TestRedis { child, url, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(20);
            while r.conn_once().is_none() {
                assert!(Instant::now() < deadline, "redis-server did not answer within 20 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            r
        }

        fn conn_once(&self) -> Option<redis::Connection> {
            let mut c = redis::Client::open(self.url.as_str()).ok()?.get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut c).ok()?;
            Some(c)
        }

        fn conn(&self) -> redis::Connection {
            self.conn_once().expect("connect")
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn batch(epoch: &str, seq: u64, deltas: &[(&str, u64, u64)]) -> Batch {
        Batch { epoch: epoch.into(), seq, deltas: deltas.iter().map(|(id, r, b)| (id.to_string(), (*r, *b))).collect() }
    }

    fn report(conn: &mut redis::Connection, keys: &UsageKeys, ack: Option<u64>) -> (Report, Vec<String>) {
        let (cursor, rows) = report_rows(conn, keys, ack).unwrap();
        let mut bad = Vec::new();
        let r = report_from_rows(cursor, rows, |f| bad.push(f.to_string()));
        (r, bad)
    }

    fn e(id: &str, requests: u64, bytes: u64) -> Entry {
        Entry { id: id.into(), requests, bytes }
    }

    #[test]
    fn a_batch_is_applied_once_whatever_the_retries() {
        let redis = TestRedis::start();
        let mut c = redis.conn();
        let a = UsageKeys::new("t", "edge-a");
        let b = UsageKeys::new("t", "edge-b");
        let b1 = batch("e1", 1, &[("ws_1", 2, 150), ("ws_2", 1, 7)]);
        assert!(apply(&mut c, &a, &b1).unwrap().now);
        // The answer was lost and the batch is sent again: passed over.
        assert_eq!(apply(&mut c, &a, &b1).unwrap(), Applied::default());
        // Another node's first batch is its own.
        assert!(apply(&mut c, &b, &batch("e9", 1, &[("ws_1", 1, 1)])).unwrap().now);
        assert!(apply(&mut c, &a, &batch("e1", 2, &[("ws_1", 1, 10)])).unwrap().now);
        // A node whose usage.json was lost starts a new epoch at 1: counted.
        assert!(apply(&mut c, &a, &batch("e2", 1, &[("ws_1", 1, 1)])).unwrap().now);
        let (r, bad) = report(&mut c, &a, None);
        assert!(bad.is_empty());
        assert_eq!(r.workspaces, vec![e("ws_1", 5, 162), e("ws_2", 1, 7)]);
    }

    #[test]
    fn a_batch_whose_answer_was_lost_is_sent_again_and_counted_once() {
        use crate::usage::Kind;
        let redis = TestRedis::start();
        let mut c = redis.conn();
        let k = UsageKeys::new("t", "edge-a");
        let u = Usage::default();
        let ws = u.cell(Kind::Workspace, "ws_1");
        ws.add(10);
        ws.add(20);
        let b1 = u.fleet_batch().unwrap();
        assert!(apply(&mut c, &k, &b1).unwrap().now);
        // The answer never came (a timeout): the node still has the batch in flight.
        ws.add(5);
        let again = u.fleet_batch().unwrap();
        assert_eq!(again, b1, "the same batch, not one with the new count");
        let applied = apply(&mut c, &k, &again).unwrap();
        assert!(!applied.now, "passed over the second time");
        u.fleet_applied(again.seq);
        let b2 = u.fleet_batch().unwrap();
        assert_eq!(b2.seq, b1.seq + 1);
        assert!(apply(&mut c, &k, &b2).unwrap().now);
        u.fleet_applied(b2.seq);
        assert_eq!(u.fleet_batch(), None);
        let (r, _) = report(&mut c, &k, None);
        assert_eq!(r.workspaces, vec![e("ws_1", 3, 35)]);
    }

    #[test]
    fn the_fleet_cursor_acknowledges_like_a_single_node() {
        let redis = TestRedis::start();
        let mut c = redis.conn();
        let k = UsageKeys::new("t", "edge-a");
        let (r0, _) = report(&mut c, &k, None);
        assert!(r0.workspaces.is_empty());
        assert!(r0.cursor > 1_700_000_000_000, "{}", r0.cursor);
        // A cursor a single node gave acknowledges nothing here.
        let (r0b, _) = report(&mut c, &k, Some(1));
        assert!(r0b.cursor == r0.cursor + 1);
        apply(&mut c, &k, &batch("e", 1, &[("ws_1", 2, 150), ("ws_2", 1, 7)])).unwrap();
        let (r1, _) = report(&mut c, &k, None);
        assert_eq!(r1.workspaces, vec![e("ws_1", 2, 150), e("ws_2", 1, 7)]);
        apply(&mut c, &k, &batch("e", 2, &[("ws_1", 1, 10)])).unwrap();
        // Not acknowledged: everything again.
        let (r2, _) = report(&mut c, &k, None);
        assert_eq!(r2.workspaces[0], e("ws_1", 3, 160));
        apply(&mut c, &k, &batch("e", 3, &[("ws_1", 1, 1)])).unwrap();
        // An old cursor acknowledges nothing.
        let (r3, _) = report(&mut c, &k, Some(r1.cursor));
        assert_eq!(r3.workspaces, vec![e("ws_1", 4, 161), e("ws_2", 1, 7)]);
        let (r4, _) = report(&mut c, &k, Some(r3.cursor));
        assert!(r4.workspaces.is_empty(), "{:?}", r4.workspaces);
        // A retry with the same cursor: the same counts again (none), then new ones.
        apply(&mut c, &k, &batch("e", 4, &[("ws_2", 1, 1)])).unwrap();
        let (r5, _) = report(&mut c, &k, Some(r3.cursor));
        assert_eq!(r5.workspaces, vec![e("ws_2", 1, 1)]);
        let (r6, _) = report(&mut c, &k, Some(r5.cursor));
        assert!(r6.workspaces.is_empty());
        assert!(r6.cursor > r5.cursor && r5.cursor > r4.cursor);
    }

    #[test]
    fn counts_in_redis_that_do_not_read_are_skipped_not_panicked_on() {
        let redis = TestRedis::start();
        let mut c = redis.conn();
        let k = UsageKeys::new("t", "edge-a");
        apply(&mut c, &k, &batch("e", 1, &[("ws_1", 2, 150), ("ws_2", 1, 7)])).unwrap();
        let _: () = redis::cmd("HSET").arg(&k.totals).arg("r:ws_1").arg("lots").arg("x:odd").arg("1").query(&mut c).unwrap();
        let (r, mut bad) = report(&mut c, &k, None);
        bad.sort();
        assert_eq!(bad, vec!["r:ws_1".to_string(), "x:odd".to_string()]);
        assert_eq!(r.workspaces, vec![e("ws_1", 0, 150), e("ws_2", 1, 7)]);
        // A batch onto the unreadable total starts it again, and says so.
        let applied = apply(&mut c, &k, &batch("e", 2, &[("ws_1", 1, 1)])).unwrap();
        assert_eq!(applied.bad_fields, vec!["r:ws_1".to_string()]);
        let _: () = redis::cmd("SET").arg(&k.applied).arg("garbage").query(&mut c).unwrap();
        let applied = apply(&mut c, &k, &batch("e", 3, &[("ws_2", 1, 1)])).unwrap();
        assert!(applied.now && applied.bad_applied);
        let (r, _) = report(&mut c, &k, None);
        assert_eq!(r.workspaces, vec![e("ws_1", 1, 151), e("ws_2", 2, 8)]);
        // Rows of the wrong shape from a foreign script are skipped too.
        let rows = vec![("r:a".into(), "-1".into(), "0".into()), ("b:a".into(), "5".into(), "9".into())];
        let mut n = 0;
        let r = report_from_rows(7, rows, |_| n += 1);
        assert_eq!((n, r.workspaces), (1, Vec::new()), "a total below its acknowledgement reports nothing");
    }

    #[test]
    fn the_attempt_script_counts_ten_then_refuses_within_the_window() {
        let redis = TestRedis::start();
        let mut c = redis.conn();
        let take = |c: &mut redis::Connection, key: &str| -> u8 { TAKE_SCRIPT.key(key).arg(MAX_FAILURES).arg(60_000).invoke(c).unwrap() };
        for i in 0..MAX_FAILURES {
            assert_eq!(take(&mut c, "t:pw:a:1"), 1, "try {i}");
        }
        assert_eq!(take(&mut c, "t:pw:a:1"), 0, "the 11th");
        assert_eq!(take(&mut c, "t:pw:a:1"), 0);
        assert_eq!(take(&mut c, "t:pw:a:2"), 1, "another IP is counted apart");
        let count: u32 = redis::cmd("GET").arg("t:pw:a:1").query(&mut c).unwrap();
        assert_eq!(count, MAX_FAILURES, "refused tries are not counted");
        let ttl: i64 = redis::cmd("PTTL").arg("t:pw:a:1").query(&mut c).unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
        // A window that ends forgets the tries (a short one here, waited for by polling).
        let _: () = redis::cmd("PEXPIRE").arg("t:pw:a:1").arg(50).query(&mut c).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while take(&mut c, "t:pw:a:1") == 0 {
            assert!(Instant::now() < deadline, "the window never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _: () = redis::cmd("SET").arg("t:pw:a:3").arg("x").query(&mut c).unwrap();
        assert_eq!(take(&mut c, "t:pw:a:3"), 2, "a value that is not a count");
        let ttl: i64 = redis::cmd("PTTL").arg("t:pw:a:3").query(&mut c).unwrap();
        assert!(ttl > 0);
    }
}
