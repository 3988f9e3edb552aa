//! Usage attribution for chargeback: requests and bytes served per workspace,
//! deployment, sandbox and storage bucket, keyed by the ids of the routing state (never
//! the raw Host). Bytes are the body bytes sent to clients: egress, what the platform
//! bills (CONTRACT §12), for proxied responses, static releases and storage alike.
//!
//! Counters live outside the route table, so a table swap loses nothing; each is an
//! `Arc<UsageCell>` found once per request and bumped with two relaxed atomic adds at
//! the end of it. Metrics show a bounded top-N per kind with the rest summed as
//! `_other`; the control API's `GET /v1/usage` gives exact per-workspace counts with a
//! cursor (see [`Usage::report`]) so a consumer never loses or double-counts usage.
//!
//! The billing counts (workspaces, deployments) and the cursor survive a crash: they are
//! saved to `<state_dir>/usage.json` every second while they change ([`UsageSaver`])
//! and before a report is answered, so a crash loses at most a second of counts and
//! never counts anything twice. Sandbox counters (metrics only) start from zero.
//!
//! In fleet mode (CONTRACT §11) the report is the fleet's, kept in Redis by
//! `cluster::counters`; this node sends it what it counted in numbered batches
//! ([`Usage::fleet_batch`], [`Usage::fleet_applied`]). Which counts were confirmed by the
//! fleet, and the batch in flight, are saved in `usage.json` with the counts, before the
//! batch is sent: a batch sent again after a crash or a lost answer carries the same
//! sequence number, which the fleet applies once.

use crate::services::{Service, Shutdown};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How many ids per kind `/metrics` shows before summing the rest as `_other`.
pub const METRICS_TOP_N: usize = 20;

/// The counters of one object.
#[derive(Debug)]
pub struct UsageCell {
    /// The object's id (workspace, deployment or sandbox).
    pub id: Box<str>,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl UsageCell {
    /// Counts one request that sent `bytes` of body to the client.
    pub fn add(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (self.requests.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// What kind of object a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Workspace,
    Deployment,
    Sandbox,
    Bucket,
}

/// How a bucket's id is told apart from workspaces' in the billing totals, the saved
/// cursor and the fleet's batches (workspace and bucket ids never hold a `:`).
const BUCKET_PREFIX: &str = "bucket:";

/// Totals per id: (requests, bytes).
type Totals = HashMap<Box<str>, (u64, u64)>;

#[derive(Default)]
struct Cursor {
    next: u64,
    /// Totals as reported with the last issued cursor.
    issued: Option<(u64, Totals)>,
    /// Totals at the last acknowledged cursor: reports are counted from here.
    acked: Totals,
    /// Fleet mode: what the fleet has of this node's workspace counts.
    fleet: Option<FleetState>,
}

/// This node's share of the fleet's workspace counts (saved in `usage.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FleetState {
    /// Names this `usage.json`: sequence numbers restart with a new one.
    epoch: String,
    /// The last sequence number given to a batch.
    seq: u64,
    /// Per workspace, the counts the fleet confirmed it has.
    flushed: Counts,
    /// The batch sent and not yet confirmed.
    batch: Option<Batch>,
}

/// Workspace counts sent to the fleet under one sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The `usage.json` this node counts in (see [`Usage::fleet_batch`]).
    pub epoch: String,
    /// Grows by one per batch; the fleet applies each (epoch, seq) once.
    pub seq: u64,
    /// Per workspace, (requests, bytes) counted since the previous batch.
    pub deltas: BTreeMap<String, (u64, u64)>,
}

/// Usage counters of the whole edge.
#[derive(Default)]
pub struct Usage {
    workspaces: DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState>,
    deployments: DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState>,
    sandboxes: DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState>,
    buckets: DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState>,
    cursor: Mutex<Cursor>,
    /// Where the billing counts are saved (`None`: kept in memory only).
    file: Option<PathBuf>,
    /// The requests counted when last saved (a change means a save is due).
    saved_requests: AtomicU64,
}

/// Per-id (requests, bytes), as saved.
type Counts = BTreeMap<String, (u64, u64)>;

/// What `usage.json` holds: per-id (requests, bytes) and the report cursor.
#[derive(Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    workspaces: BTreeMap<String, (u64, u64)>,
    #[serde(default)]
    deployments: BTreeMap<String, (u64, u64)>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    buckets: BTreeMap<String, (u64, u64)>,
    #[serde(default)]
    next: u64,
    #[serde(default)]
    issued: Option<(u64, Counts)>,
    #[serde(default)]
    acked: BTreeMap<String, (u64, u64)>,
    /// Fleet mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetState>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").field("workspaces", &self.workspaces.len()).finish()
    }
}

/// One workspace's or bucket's usage in a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub id: String,
    pub requests: u64,
    pub bytes: u64,
}

/// The answer of `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Pass it back (`?cursor=`) to acknowledge this report.
    pub cursor: u64,
    /// Counts since the last acknowledged report, per workspace.
    pub workspaces: Vec<Entry>,
    /// The same, per storage bucket (its objects served on storage hosts).
    pub buckets: Vec<Entry>,
}

impl Report {
    /// A report of `entries` (workspaces, and buckets under their billing key), each list
    /// sorted by id.
    pub fn new(cursor: u64, entries: impl IntoIterator<Item = Entry>) -> Report {
        let (mut buckets, mut workspaces): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.id.starts_with(BUCKET_PREFIX));
        for b in &mut buckets {
            b.id.drain(..BUCKET_PREFIX.len());
        }
        workspaces.sort_by(|a, b| a.id.cmp(&b.id));
        buckets.sort_by(|a, b| a.id.cmp(&b.id));
        Report { cursor, workspaces, buckets }
    }
}

impl Usage {
    /// Counters saved to `file`, starting from what it holds (a missing file starts at
    /// zero; an unreadable one too, with a warning: counts are never made up).
    pub fn open(file: PathBuf) -> Usage {
        let saved: Saved = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e, "usage counters unreadable: counting from zero");
                Saved::default()
            }),
            Err(_) => Saved::default(),
        };
        let u = Usage { file: Some(file), ..Usage::default() };
        for (kind, counts) in [(Kind::Workspace, &saved.workspaces), (Kind::Deployment, &saved.deployments), (Kind::Bucket, &saved.buckets)]
        {
            for (id, (r, b)) in counts {
                let c = u.cell(kind, id);
                c.requests.store(*r, Ordering::Relaxed);
                c.bytes.store(*b, Ordering::Relaxed);
            }
        }
        let boxed = |m: &BTreeMap<String, (u64, u64)>| -> Totals { m.iter().map(|(k, v)| (k.as_str().into(), *v)).collect() };
        {
            let mut c = u.cursor.lock().unwrap_or_else(|p| p.into_inner());
            c.next = saved.next;
            c.issued = saved.issued.as_ref().map(|(n, t)| (*n, boxed(t)));
            c.acked = boxed(&saved.acked);
            c.fleet = saved.fleet;
        }
        u.saved_requests.store(u.total_requests(), Ordering::Relaxed);
        u
    }

    fn total_requests(&self) -> u64 {
        self.workspaces.iter().chain(self.deployments.iter()).chain(self.buckets.iter()).map(|e| e.value().get().0).sum()
    }

    /// Saves the billing counts and the cursor (`c`, held by the caller) durably.
    fn save_locked(&self, c: &Cursor) -> std::io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let counts = |m: &DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState>| -> BTreeMap<String, (u64, u64)> {
            m.iter().map(|e| (e.key().to_string(), e.value().get())).collect()
        };
        let plain = |t: &Totals| -> BTreeMap<String, (u64, u64)> { t.iter().map(|(k, v)| (k.to_string(), *v)).collect() };
        let total = self.total_requests();
        let saved = Saved {
            workspaces: counts(&self.workspaces),
            deployments: counts(&self.deployments),
            buckets: counts(&self.buckets),
            next: c.next,
            issued: c.issued.as_ref().map(|(n, t)| (*n, plain(t))),
            acked: plain(&c.acked),
            fleet: c.fleet.clone(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        crate::files::write_atomic(file, &bytes, 0o644)?;
        self.saved_requests.store(total, Ordering::Relaxed);
        Ok(())
    }

    /// Saves the counts if any changed since the last save.
    pub fn save_if_changed(&self) -> std::io::Result<()> {
        if self.file.is_none() || self.total_requests() == self.saved_requests.load(Ordering::Relaxed) {
            return Ok(());
        }
        let c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        self.save_locked(&c)
    }

    fn map(&self, kind: Kind) -> &DashMap<Box<str>, Arc<UsageCell>, ahash::RandomState> {
        match kind {
            Kind::Workspace => &self.workspaces,
            Kind::Deployment => &self.deployments,
            Kind::Sandbox => &self.sandboxes,
            Kind::Bucket => &self.buckets,
        }
    }

    /// The billed totals: every workspace's, and every bucket's under its billing key.
    fn billed(&self) -> impl Iterator<Item = (Box<str>, (u64, u64))> + '_ {
        let ws = self.workspaces.iter().map(|e| (e.key().clone(), e.value().get()));
        let buckets = self.buckets.iter().map(|e| (format!("{BUCKET_PREFIX}{}", e.key()).into_boxed_str(), e.value().get()));
        ws.chain(buckets)
    }

    /// The counters of `id` (created on first use).
    pub fn cell(&self, kind: Kind, id: &str) -> Arc<UsageCell> {
        let map = self.map(kind);
        if let Some(c) = map.get(id) {
            return c.clone();
        }
        map.entry(id.into())
            .or_insert_with(|| Arc::new(UsageCell { id: id.into(), requests: AtomicU64::new(0), bytes: AtomicU64::new(0) }))
            .clone()
    }

    /// Exact per-workspace counts since the last acknowledged report. Passing the
    /// cursor of the last report acknowledges it first: the consumer stores a report,
    /// then asks with its cursor. A retried request with an older cursor acknowledges
    /// nothing and gets counts from the last acknowledgement again, so nothing is lost
    /// or counted twice.
    pub fn report(&self, ack: Option<u64>) -> Report {
        let mut c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(a), Some((issued, _))) = (ack, &c.issued) {
            if a == *issued {
                if let Some((_, totals)) = c.issued.take() {
                    c.acked = totals;
                }
            }
        }
        let totals: Totals = self.billed().collect();
        let entries: Vec<Entry> = totals
            .iter()
            .filter_map(|(id, (r, b))| {
                let (ar, ab) = c.acked.get(id).copied().unwrap_or((0, 0));
                let (r, b) = (r.saturating_sub(ar), b.saturating_sub(ab));
                (r > 0 || b > 0).then(|| Entry { id: id.to_string(), requests: r, bytes: b })
            })
            .collect();
        c.next += 1;
        let cursor = c.next;
        c.issued = Some((cursor, totals));
        // The cursor is durable before the report leaves: a crash right after can
        // neither lose what it acknowledged nor report it twice.
        if let Err(e) = self.save_locked(&c) {
            tracing::error!(error = %e, "cannot save the usage counters");
        }
        Report::new(cursor, entries)
    }

    /// Fleet mode: the workspace counts to send to the fleet. The batch sent before and
    /// not confirmed comes again unchanged (same sequence, same deltas: the fleet applies
    /// it once); otherwise what was counted since the last confirmed batch, under the next
    /// sequence number. It is saved durably, with counts that include it, before it is
    /// returned, so a crash after sending retries this very batch. `None` when nothing is
    /// pending, or when it cannot be saved (then it is not sent: sent and forgotten, its
    /// number could be given again to other counts, which the fleet would pass over).
    ///
    /// The first batch of a node that counted alone before starts from what its
    /// consumer acknowledged there: acknowledged counts are not reported again.
    pub fn fleet_batch(&self) -> Option<Batch> {
        let mut c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let acked = &c.acked;
        let mut fleet = c.fleet.clone().unwrap_or_else(|| FleetState {
            epoch: new_epoch(),
            seq: 0,
            flushed: acked.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            batch: None,
        });
        if let Some(b) = &fleet.batch {
            return Some(b.clone());
        }
        let deltas: BTreeMap<String, (u64, u64)> = self
            .billed()
            .filter_map(|(id, (r, b))| {
                let (fr, fb) = fleet.flushed.get(&*id).copied().unwrap_or((0, 0));
                let (dr, db) = (r.saturating_sub(fr), b.saturating_sub(fb));
                (dr > 0 || db > 0).then(|| (id.into_string(), (dr, db)))
            })
            .collect();
        if deltas.is_empty() {
            return None;
        }
        fleet.seq += 1;
        let batch = Batch { epoch: fleet.epoch.clone(), seq: fleet.seq, deltas };
        fleet.batch = Some(batch.clone());
        let before = c.fleet.replace(fleet);
        if let Err(e) = self.save_locked(&c) {
            tracing::error!(error = %e, "cannot save the usage counters: this node's counts wait before going to the fleet");
            c.fleet = before;
            return None;
        }
        Some(batch)
    }

    /// Fleet mode: the fleet has batch `seq` (applied now or before): its counts are
    /// flushed. Saving this is not needed for correctness (the batch would be sent
    /// again and passed over by the fleet), only done.
    pub fn fleet_applied(&self, seq: u64) {
        let mut c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fleet) = c.fleet.as_mut() else { return };
        if fleet.batch.as_ref().is_none_or(|b| b.seq != seq) {
            return;
        }
        if let Some(batch) = fleet.batch.take() {
            for (id, (r, b)) in batch.deltas {
                let f = fleet.flushed.entry(id).or_insert((0, 0));
                *f = (f.0.saturating_add(r), f.1.saturating_add(b));
            }
        }
        if let Err(e) = self.save_locked(&c) {
            tracing::warn!(error = %e, "cannot save the usage counters");
        }
    }

    /// Prometheus text for the top-N ids of each kind, the rest summed as `_other`.
    pub fn render_metrics(&self, out: &mut String) {
        for (kind, label) in
            [(Kind::Workspace, "workspace"), (Kind::Deployment, "deployment"), (Kind::Sandbox, "sandbox"), (Kind::Bucket, "bucket")]
        {
            let mut all: Vec<(Box<str>, (u64, u64))> = self.map(kind).iter().map(|e| (e.key().clone(), e.value().get())).collect();
            all.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
            let other = all.iter().skip(METRICS_TOP_N).fold((0u64, 0u64), |acc, (_, (r, b))| (acc.0 + r, acc.1 + b));
            for (metric, idx, help) in [("requests", 0, "Requests"), ("bytes", 1, "Response body bytes sent")] {
                let name = format!("miosa_edge_{label}_{metric}_total");
                let _ = writeln!(out, "# HELP {name} {help} per {label} (top {METRICS_TOP_N} by requests; the rest as _other).");
                let _ = writeln!(out, "# TYPE {name} counter");
                for (id, v) in all.iter().take(METRICS_TOP_N) {
                    let n = if idx == 0 { v.0 } else { v.1 };
                    let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape_label(id));
                }
                if all.len() > METRICS_TOP_N {
                    let n = if idx == 0 { other.0 } else { other.1 };
                    let _ = writeln!(out, "{name}{{{label}=\"_other\"}} {n}");
                }
            }
        }
    }
}

/// Saves the usage counters every second while they change.
pub struct UsageSaver(pub Arc<Usage>);

#[async_trait::async_trait]
impl Service for UsageSaver {
    fn name(&self) -> &'static str {
        "usage counters"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait() => true,
            };
            let usage = self.0.clone();
            match tokio::task::spawn_blocking(move || usage.save_if_changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the usage counters"),
                Err(e) => tracing::error!(error = %e, "usage save task failed"),
            }
            if last {
                return;
            }
        }
    }
}

/// A fresh name for a `usage.json`'s fleet counts: 16 random hex digits (the clock's
/// nanoseconds if the system has no randomness).
fn new_epoch() -> String {
    let mut raw = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        raw = t.to_le_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_exact_with_cursor_acknowledgement() {
        let u = Usage::default();
        let w1 = u.cell(Kind::Workspace, "ws_1");
        w1.add(100);
        w1.add(50);
        u.cell(Kind::Workspace, "ws_2").add(7);
        let r1 = u.report(None);
        assert_eq!(
            r1.workspaces,
            vec![Entry { id: "ws_1".into(), requests: 2, bytes: 150 }, Entry { id: "ws_2".into(), requests: 1, bytes: 7 }]
        );
        w1.add(10);
        // Not acknowledged yet: the next report still includes the first counts.
        let r2 = u.report(None);
        assert_eq!(r2.workspaces[0], Entry { id: "ws_1".into(), requests: 3, bytes: 160 });
        // Acknowledge r2: only what came after it is reported.
        w1.add(1);
        let r3 = u.report(Some(r2.cursor));
        assert_eq!(r3.workspaces, vec![Entry { id: "ws_1".into(), requests: 1, bytes: 1 }]);
        // A retry with the old cursor acknowledges nothing more: same counts again.
        let r4 = u.report(Some(r2.cursor));
        assert_eq!(r4.workspaces, r3.workspaces);
        let r5 = u.report(Some(r4.cursor));
        assert!(r5.workspaces.is_empty());
    }

    #[test]
    fn counts_and_the_cursor_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usage.json");
        let u = Usage::open(file.clone());
        u.cell(Kind::Workspace, "ws_1").add(100);
        u.cell(Kind::Deployment, "d").add(5);
        u.save_if_changed().unwrap();
        let r1 = u.report(None);
        u.cell(Kind::Workspace, "ws_1").add(1);
        u.save_if_changed().unwrap();
        drop(u);
        // A crash: the next process starts from the saved counts and cursor.
        let u = Usage::open(file.clone());
        let r2 = u.report(Some(r1.cursor));
        assert_eq!(r2.workspaces, vec![Entry { id: "ws_1".into(), requests: 1, bytes: 1 }], "acknowledged counts are not reported again");
        drop(u);
        let u = Usage::open(file);
        // r2 was never acknowledged: its counts come again, from the saved totals.
        assert_eq!(u.report(None).workspaces, r2.workspaces);
        assert!(u.save_if_changed().is_ok());
    }

    #[test]
    fn bucket_egress_is_reported_beside_workspaces_under_one_cursor_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usage.json");
        let u = Usage::open(file.clone());
        u.cell(Kind::Workspace, "ws_1").add(300);
        u.cell(Kind::Bucket, "bk_1").add(200);
        u.cell(Kind::Bucket, "bk_1").add(100);
        let r1 = u.report(None);
        assert_eq!(r1.workspaces, vec![Entry { id: "ws_1".into(), requests: 1, bytes: 300 }]);
        assert_eq!(r1.buckets, vec![Entry { id: "bk_1".into(), requests: 2, bytes: 300 }]);
        u.cell(Kind::Bucket, "bk_1").add(7);
        u.save_if_changed().unwrap();
        drop(u);
        let u = Usage::open(file);
        let r2 = u.report(Some(r1.cursor));
        assert_eq!((r2.workspaces.len(), r2.buckets.clone()), (0, vec![Entry { id: "bk_1".into(), requests: 1, bytes: 7 }]));
        // The fleet's batches carry buckets under their billing key; its report splits them.
        let b = u.fleet_batch().expect("a batch");
        assert!(b.deltas.contains_key("bucket:bk_1"), "{:?}", b.deltas);
        let split =
            Report::new(1, [Entry { id: "bucket:bk_1".into(), requests: 1, bytes: 2 }, Entry { id: "ws".into(), requests: 3, bytes: 4 }]);
        assert_eq!((split.buckets[0].id.as_str(), split.workspaces[0].id.as_str()), ("bk_1", "ws"));
        let text = serde_json::to_string(&split).unwrap();
        assert!(text.contains(r#""buckets":[{"id":"bk_1""#), "{text}");
    }

    #[test]
    fn fleet_batches_are_numbered_kept_until_confirmed_and_saved_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usage.json");
        let u = Usage::open(file.clone());
        assert_eq!(u.fleet_batch(), None, "nothing counted, nothing to send");
        u.cell(Kind::Workspace, "ws_1").add(100);
        u.cell(Kind::Workspace, "ws_2").add(7);
        u.cell(Kind::Deployment, "d").add(5);
        let b1 = u.fleet_batch().unwrap();
        assert_eq!(b1.seq, 1);
        assert_eq!(b1.deltas, BTreeMap::from([("ws_1".into(), (1, 100)), ("ws_2".into(), (1, 7))]));
        // Not confirmed: the same batch again, whatever was counted since.
        u.cell(Kind::Workspace, "ws_1").add(1);
        assert_eq!(u.fleet_batch().as_ref(), Some(&b1));
        // A crash now: the batch was saved before it was sent, and comes again.
        drop(u);
        let u = Usage::open(file.clone());
        assert_eq!(u.fleet_batch().as_ref(), Some(&b1), "the batch in flight survives a restart");
        u.fleet_applied(b1.seq + 7);
        assert_eq!(u.fleet_batch().as_ref(), Some(&b1), "another batch's confirmation changes nothing");
        u.fleet_applied(b1.seq);
        // The count made after the last save before the crash is lost with it (as a
        // single node's); the one saved with the batch is sent next.
        u.cell(Kind::Workspace, "ws_2").add(3);
        let b2 = u.fleet_batch().unwrap();
        assert_eq!((b2.epoch.as_str(), b2.seq), (b1.epoch.as_str(), 2));
        assert_eq!(b2.deltas, BTreeMap::from([("ws_2".into(), (1, 3))]));
        u.fleet_applied(2);
        assert_eq!(u.fleet_batch(), None);
        drop(u);
        let u = Usage::open(file);
        assert_eq!(u.fleet_batch(), None, "confirmed counts are not sent again after a restart");
    }

    #[test]
    fn a_node_joining_a_fleet_sends_only_what_its_consumer_did_not_acknowledge() {
        let u = Usage::default();
        u.cell(Kind::Workspace, "ws_1").add(10);
        let r = u.report(None);
        u.report(Some(r.cursor));
        u.cell(Kind::Workspace, "ws_1").add(5);
        let b = u.fleet_batch().unwrap();
        assert_eq!(b.deltas, BTreeMap::from([("ws_1".into(), (1, 5))]));
        assert_eq!(b.epoch.len(), 16);
    }

    #[test]
    fn metrics_are_bounded() {
        let u = Usage::default();
        for i in 0..30 {
            let c = u.cell(Kind::Sandbox, &format!("sb{i:02}"));
            for _ in 0..=i {
                c.add(1);
            }
        }
        let mut out = String::new();
        u.render_metrics(&mut out);
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("miosa_edge_sandbox_requests_total{")).collect();
        assert_eq!(lines.len(), METRICS_TOP_N + 1);
        assert!(lines[0].contains("sb29") && lines[0].ends_with(" 30"));
        // The ten smallest (1..=10 requests) are summed: 55.
        assert!(lines.contains(&"miosa_edge_sandbox_requests_total{sandbox=\"_other\"} 55"), "{out}");
    }
}
