use super::*;
use crate::schema::{Object, Sandbox};
use std::sync::atomic::{AtomicBool, Ordering};

const TOML: &str = "[[workspaces]]\nid = \"w\"\nslug = \"w\"\n";

fn config(dir: &Path, extra: &str) -> Config {
    Config::parse(&format!("[server]\nstate_dir = \"{}\"\n{TOML}{extra}", dir.display()), None).expect("config")
}

fn open(dir: &Path) -> Store {
    Store::open(&config(dir, ""), Arc::new(Metrics::new()), true).expect("store")
}

fn sandbox(id: &str, last: u8) -> BatchOp {
    let s: Sandbox = serde_json::from_str(&format!(r#"{{"id":"{id}","workspace":"w","address":"10.0.0.{last}"}}"#)).expect("sandbox");
    BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(Object::Sandbox(s)) }
}

fn address(store: &Store, id: &str) -> Option<String> {
    match store.published().objects.get(Kind::Sandbox, id) {
        Some((_, Object::Sandbox(s))) => Some(s.address.0.to_string()),
        _ => None,
    }
}

#[test]
fn start_up_reads_the_snapshot_and_the_log_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let g0 = {
        let store = open(dir.path());
        let g1 = store.apply(None, vec![sandbox("a", 1)]).unwrap();
        store.compact().unwrap();
        let g2 = store.apply(None, vec![sandbox("b", 2)]).unwrap();
        let g3 = store.apply(None, vec![sandbox("a", 3)]).unwrap();
        assert!(g1 < g2 && g2 < g3);
        // The second and third writes are only in the log.
        assert!(std::fs::metadata(dir.path().join("state.log")).unwrap().len() > 0);
        g3
    };
    let store = open(dir.path());
    assert_eq!(address(&store, "a").as_deref(), Some("10.0.0.3"));
    assert_eq!(address(&store, "b").as_deref(), Some("10.0.0.2"));
    assert!(store.generation() > g0, "generations only grow across restarts");
    // And a second restart goes higher still.
    let g = store.generation();
    drop(store);
    assert!(open(dir.path()).generation() > g);
}

#[test]
fn a_torn_or_corrupt_tail_is_dropped_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.apply(None, vec![sandbox("a", 1)]).unwrap();
        store.apply(None, vec![sandbox("b", 2)]).unwrap();
    }
    let log = dir.path().join("state.log");
    let full = std::fs::read(&log).unwrap();
    // A crash in the middle of the last record: cut it short.
    std::fs::write(&log, &full[..full.len() - 5]).unwrap();
    {
        let store = open(dir.path());
        assert_eq!(address(&store, "a").as_deref(), Some("10.0.0.1"));
        assert_eq!(address(&store, "b"), None, "the torn write is gone, nothing else");
        store.apply(None, vec![sandbox("c", 3)]).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(address(&store, "c").as_deref(), Some("10.0.0.3"), "records after a cut tail are read back");
    drop(store);
    // Garbage after good records (a foreign write): dropped, a start never fails on it.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(b"\xff\xff\xff\x7fgarbage");
    std::fs::write(&log, &bytes).unwrap();
    let store = open(dir.path());
    assert_eq!(address(&store, "c").as_deref(), Some("10.0.0.3"));
}

#[test]
fn a_write_that_changes_nothing_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let doc = |addr: &str| {
        serde_json::from_str::<State>(&format!(r#"{{"sandboxes":[{{"id":"a","workspace":"w","address":"{addr}"}}]}}"#)).unwrap()
    };
    let g = store.replace_api(None, doc("10.0.0.1")).unwrap();
    let len = std::fs::metadata(dir.path().join("state.log")).unwrap().len();
    assert_eq!(store.replace_api(None, doc("10.0.0.1")).unwrap(), g, "an equal whole state");
    assert_eq!(store.apply(None, vec![sandbox("a", 1)]).unwrap(), g, "an equal object");
    assert_eq!(std::fs::metadata(dir.path().join("state.log")).unwrap().len(), len);
    assert!(store.replace_api(None, doc("10.0.0.2")).unwrap() > g);
    // A whole state without `a` deletes it.
    store.replace_api(None, State::default()).unwrap();
    assert_eq!(address(&store, "a"), None);
}

#[test]
fn concurrent_writers_share_fsyncs_and_every_acknowledged_write_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let routes = store.routes();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (store, routes) = (store.clone(), routes.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    let id = format!("s{t}-{i}");
                    let g = store.apply(None, vec![sandbox(&id, 1)]).unwrap();
                    // Acknowledged means published: the table routes it now.
                    let table = routes.load();
                    assert!(table.generation >= g);
                    assert!(matches!(table.lookup(&format!("1-{id}.sandbox.localhost")), crate::routing::Route::Denied { .. }));
                    assert!(store.published().objects.sandboxes.contains(id.as_bytes()));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.published().objects.sandboxes.len(), 400);
}

#[test]
fn compaction_racing_writes_and_reads_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..600u32 {
                let id = format!("s{i}");
                store.apply(None, vec![sandbox(&id, (i % 200) as u8 + 1)]).unwrap();
                acked.push(id);
            }
            acked
        })
    };
    let compactor = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                store.compact().unwrap();
                n += 1;
            }
            n
        })
    };
    let reader = {
        let (routes, stop) = (store.routes(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let g = routes.load().generation;
                assert!(g >= last, "a reader never sees an older table");
                last = g;
            }
        })
    };
    let acked = writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(compactor.join().unwrap() > 0);
    reader.join().unwrap();
    drop(store);
    let store = open(dir.path());
    for id in &acked {
        assert!(store.published().objects.sandboxes.contains(id.as_bytes()), "{id} lost");
    }
    // Folded segments are gone; the snapshot and one current segment remain.
    let segments = log::segments(dir.path()).unwrap();
    assert!(segments.len() <= 2, "{segments:?}");
}

#[test]
fn refused_writes_change_nothing_on_disk_either() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let g = store.apply(None, vec![sandbox("a", 1)]).unwrap();
    let bad: Sandbox = serde_json::from_str(r#"{"id":"b","workspace":"nope","address":"10.0.0.2"}"#).unwrap();
    let op = BatchOp { path: "ops[0].value".into(), origin: Origin::Api, op: Op::Upsert(Object::Sandbox(bad)) };
    match store.apply(None, vec![op]) {
        Err(WriteError::Invalid(e)) => assert_eq!(e[0].path, "ops[0].value.workspace"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(store.apply(Some(g - 1), vec![sandbox("c", 3)]), Err(WriteError::Stale { .. })));
    let workspace_in_use = BatchOp { path: String::new(), origin: Origin::Api, op: Op::Delete(Kind::Workspace, "w".into()) };
    assert!(matches!(store.apply(None, vec![workspace_in_use]), Err(WriteError::Conflict(_))), "a TOML workspace");
    assert_eq!(store.generation(), g);
    drop(store);
    let store = open(dir.path());
    assert_eq!(address(&store, "b"), None);
    assert_eq!(address(&store, "c"), None);
}

#[test]
fn an_earlier_versions_state_json_is_read_and_replaced_by_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("state.json"),
        r#"{"generation":41,"sandboxes":[{"id":"old","workspace":"w","address":"10.0.0.7","previews":[{"port":3000}]}]}"#,
    )
    .unwrap();
    let store = open(dir.path());
    assert_eq!(address(&store, "old").as_deref(), Some("10.0.0.7"));
    assert!(store.generation() > 41);
    assert!(*store.compaction_wanted().borrow(), "the first fold replaces the legacy file");
    store.compact().unwrap();
    assert!(dir.path().join(snapshot::FILE).exists() && !dir.path().join(snapshot::LEGACY_FILE).exists());
    drop(store);
    assert_eq!(address(&open(dir.path()), "old").as_deref(), Some("10.0.0.7"));
}

/// A store in fleet mode (generations are the fleet's; no Redis needed to follow records).
fn open_fleet(dir: &Path) -> (Store, Arc<Metrics>) {
    let mut cfg = config(dir, "");
    cfg.cluster = Some(crate::config::Cluster {
        redis_url_env: "UNUSED".into(),
        node: "n1".into(),
        prefix: "p".into(),
        seal_key_env: "UNUSED".into(),
        redis_url: "redis://127.0.0.1:1/0".into(),
        seal_key: None,
    });
    let metrics = Arc::new(Metrics::new());
    (Store::open(&cfg, metrics.clone(), true).expect("store"), metrics)
}

fn record(generation: u64, ops: Vec<BatchOp>) -> log::Record {
    log::Record { generation, ops: ops.into_iter().map(|b| b.op).collect() }
}

#[test]
fn a_fleet_node_follows_records_in_order_passes_over_refused_ones_and_takes_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (f, metrics) = open_fleet(dir.path());
    assert_eq!(f.generation(), 0, "a fleet node's start takes no generation of its own");
    assert_eq!(f.follow(vec![record(1, vec![sandbox("a", 1)]), record(2, vec![sandbox("b", 2)])]).unwrap(), 2);
    assert_eq!(address(&f, "b").as_deref(), Some("10.0.0.2"));
    // Records it has are skipped; a record after a missing one is a gap (load a snapshot).
    assert_eq!(f.follow(vec![record(2, vec![sandbox("b", 9)])]).unwrap(), 2);
    assert_eq!(address(&f, "b").as_deref(), Some("10.0.0.2"));
    assert!(matches!(f.follow(vec![record(4, vec![sandbox("c", 4)])]), Err(FollowError::Gap { have: 2, found: 4 })));
    // A record this node's state refuses (a sandbox of an unknown workspace) is passed over
    // whole, in its place: the generation moves on, nothing of it is applied.
    let bad: Sandbox = serde_json::from_str(r#"{"id":"x","workspace":"nope","address":"10.0.0.7"}"#).unwrap();
    let bad = BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(Object::Sandbox(bad)) };
    assert_eq!(f.follow(vec![record(3, vec![sandbox("c", 3), bad])]).unwrap(), 3);
    assert_eq!(address(&f, "c"), None, "never half a batch");
    assert_eq!(metrics.cluster_refused.get(), 1);
    drop(f);
    // A restart resumes at the generation it had, with what it followed.
    let (f, _) = open_fleet(dir.path());
    assert_eq!(f.generation(), 3);
    assert_eq!(address(&f, "a").as_deref(), Some("10.0.0.1"));

    // Another node's state at a later generation, as the fleet keeps it in Redis.
    let other = tempfile::tempdir().unwrap();
    let (o, _) = open_fleet(other.path());
    o.follow((1..=6).map(|g| record(g, vec![sandbox(&format!("s{g}"), g as u8)])).collect()).unwrap();
    let (g, bytes) = o.snapshot_bytes().unwrap();
    assert_eq!(g, 6);
    let mut torn = bytes.clone();
    torn.truncate(bytes.len() - 3);
    assert!(f.follow_snapshot(&torn).is_err());
    assert_eq!(f.generation(), 3, "a snapshot that does not read changes nothing");
    assert_eq!(f.follow_snapshot(&bytes).unwrap(), Some(6));
    assert_eq!(f.follow_snapshot(&bytes).unwrap(), None, "not ahead: nothing to take");
    assert_eq!(address(&f, "a"), None, "the fleet's state replaces this node's");
    assert_eq!(address(&f, "s6").as_deref(), Some("10.0.0.6"));
    f.follow(vec![record(7, vec![sandbox("t", 7)])]).unwrap();
    drop(f);
    let (f, _) = open_fleet(dir.path());
    assert_eq!(f.generation(), 7, "the snapshot became the local one, the log goes on after it");
    assert_eq!(address(&f, "s1").as_deref(), Some("10.0.0.1"));
    assert_eq!(address(&f, "t").as_deref(), Some("10.0.0.7"));
    assert_eq!(address(&f, "a"), None);
}
