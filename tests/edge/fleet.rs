//! Fleet mode (CONTRACT §11): several real edge processes on one real Redis
//! (`redis-server` from scripts/deps, with a password and append-only persistence).

use crate::support::redis::Redis;
use crate::support::{eventually, Edge, Origin};
use std::time::Duration;

/// The `[cluster]` section of node `name`.
fn cluster(name: &str) -> String {
    format!("[cluster]\nnode = \"{name}\"\nprefix = \"fleet-test\"\n")
}

/// A workspace, and the sandbox `abc12345` whose port `port` at 127.0.0.2 is public.
fn routes() -> &'static str {
    r#"
[[workspaces]]
id = "ws_pinned"
slug = "pinned"
"#
}

/// Starts node `name` on `redis`, with `extra` TOML after its `[cluster]` section.
async fn node(redis: &Redis, name: &str, extra: &str) -> Edge {
    Edge::start_env(&[("MIOSA_EDGE_REDIS_URL", redis.url())], &format!("{}\n{}\n{extra}", cluster(name), routes())).await
}

async fn ready(edge: &Edge) -> bool {
    eventually(Duration::from_secs(15), || async move {
        let r = edge.api("GET", "/readyz", None).await;
        (r.status == 200).then_some(())
    })
    .await
    .is_some()
}

/// The generation `GET /v1/state` answers on `edge`.
async fn generation(edge: &Edge) -> u64 {
    edge.api("GET", "/v1/state", None).await.json()["generation"].as_u64().unwrap_or(0)
}

/// Waits until `edge` serves at least `g`.
async fn reaches(edge: &Edge, g: u64) -> bool {
    eventually(Duration::from_secs(5), || async move { (generation(edge).await >= g).then_some(()) }).await.is_some()
}

fn sandbox(id: &str, port: u16) -> String {
    serde_json::json!({
        "id": id, "workspace": "ws_1", "address": "127.0.0.2",
        "previews": [{"port": port, "access": "public"}]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_routes_on_every_node_at_the_same_generation() {
    let redis = Redis::start();
    let origin = Origin::start("fleet-origin", "127.0.0.2").await;
    let port = origin.addr.port();
    let a = node(&redis, "edge-a", "").await;
    let b = node(&redis, "edge-b", "").await;
    assert!(ready(&a).await, "edge-a never ready: {}", a.log());
    assert!(ready(&b).await, "edge-b never ready: {}", b.log());

    let r = a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = b.api("PUT", "/v1/sandboxes/abc12345", Some(&sandbox("abc12345", port))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json()["generation"].as_u64().expect("generation");

    // Both nodes route the sandbox written on b, and answer the same state at g.
    assert!(reaches(&a, g).await, "edge-a never reached generation {g}: {}", a.log());
    for edge in [&a, &b] {
        let r = edge.get(&format!("{port}-abc12345.sandbox.localhost"), "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["origin"], "fleet-origin");
    }
    let (sa, sb) = (a.api("GET", "/v1/state", None).await.json(), b.api("GET", "/v1/state", None).await.json());
    assert_eq!(sa, sb);
    assert_eq!(sa["generation"].as_u64(), Some(g));

    // If-Match compares with the fleet's generation, whichever node is asked.
    let stale = (g - 1).to_string();
    let moved = sandbox("abc12345", port + 1);
    let r = a.api_with("PUT", "/v1/sandboxes/abc12345", Some(&moved), &[("If-Match", &format!("\"{stale}\""))]).await;
    assert_eq!(r.status, 412, "{}", r.text());
    let r = a.api_with("PUT", "/v1/sandboxes/abc12345", Some(&moved), &[("If-Match", &format!("\"{g}\""))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = b.api("DELETE", "/v1/sandboxes/abc12345", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"].as_u64(), Some(g + 2));
    assert!(reaches(&a, g + 2).await);
    let r = a.get(&format!("{port}-abc12345.sandbox.localhost"), "/").await;
    assert_eq!(r.status, 404, "{}", r.text());

    // Concurrent writes on both nodes: every one acknowledged exactly once, in one order.
    let bodies: Vec<(String, String)> = (0..20).map(|i| (format!("/v1/sandboxes/box{i}"), sandbox(&format!("box{i}"), port))).collect();
    let mut tasks = Vec::new();
    for (i, (path, body)) in bodies.iter().enumerate() {
        let edge = if i % 2 == 0 { &a } else { &b };
        tasks.push(edge.api("PUT", path, Some(body)));
    }
    let mut gens: Vec<u64> = Vec::new();
    for r in futures_util::future::join_all(tasks).await {
        assert_eq!(r.status, 200, "{}", r.text());
        gens.push(r.json()["generation"].as_u64().expect("generation"));
    }
    gens.sort_unstable();
    gens.dedup();
    assert_eq!(gens.len(), 20, "each write took its own generation: {gens:?}");
    let top = *gens.last().expect("gens");
    assert!(reaches(&a, top).await && reaches(&b, top).await);
    let (sa, sb) = (a.api("GET", "/v1/state", None).await.json(), b.api("GET", "/v1/state", None).await.json());
    assert_eq!(sa, sb);
    assert_eq!(sa["sandboxes"].as_array().map(Vec::len), Some(20), "{sa}");

    // GET /v1/cluster lists both, ready, at the fleet's generation: not a node last
    // heard of long ago, nor a heartbeat that does not parse.
    redis.cmd(&["HSET", "fleet-test:nodes", "ghost", r#"{"generation":1,"ready":true,"at":1000}"#]).expect("redis");
    redis.cmd(&["HSET", "fleet-test:nodes", "junk", "not json"]).expect("redis");
    let listed = eventually(Duration::from_secs(5), || async {
        let j = a.api("GET", "/v1/cluster", None).await.json();
        let nodes = j["nodes"].as_array().cloned().unwrap_or_default();
        let ok = nodes.len() == 2 && nodes.iter().all(|n| n["ready"] == true && n["generation"].as_u64() == Some(top));
        ok.then_some(j)
    })
    .await;
    let last = a.api("GET", "/v1/cluster", None).await.text();
    let j = listed.unwrap_or_else(|| panic!("GET /v1/cluster: {last}"));
    assert_eq!(j["nodes"][0]["node"], "edge-a");
    assert_eq!(j["nodes"][1]["node"], "edge-b");
    assert!(j["nodes"][0]["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')));
    let m = a.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_cluster_connected 1"), "{m}");
    assert!(m.contains(&format!("miosa_edge_cluster_generation {top}")), "{m}");
}

/// The `miosa_edge_cluster_connected` gauge of `edge`.
async fn connected(edge: &Edge) -> Option<bool> {
    let m = edge.api("GET", "/metrics", None).await.text();
    m.lines().find_map(|l| l.strip_prefix("miosa_edge_cluster_connected ")).map(|v| v.trim() == "1")
}

async fn readyz(edge: &Edge) -> u16 {
    edge.api("GET", "/readyz", None).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_nodes_route_and_restart_on_their_copy_refuse_writes_then_catch_up() {
    let mut redis = Redis::start();
    let origin = Origin::start("fleet-origin", "127.0.0.2").await;
    let port = origin.addr.port();
    let a = node(&redis, "edge-a", "").await;
    let mut b = node(&redis, "edge-b", "").await;
    assert!(ready(&a).await && ready(&b).await, "{}\n{}", a.log(), b.log());
    assert_eq!(a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    let r = a.api("PUT", "/v1/sandboxes/s1", Some(&sandbox("s1", port))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json()["generation"].as_u64().expect("generation");
    assert!(reaches(&b, g).await);

    redis.stop();
    let lost = eventually(Duration::from_secs(10), || async { (connected(&a).await == Some(false)).then_some(()) }).await;
    assert!(lost.is_some(), "edge-a never noticed Redis going away");
    // Writes are refused, not half-made; routing and readiness go on.
    let r = a.api("PUT", "/v1/sandboxes/s2", Some(&sandbox("s2", port))).await;
    assert_eq!((r.status, r.code()), (503, "cluster_unavailable".to_string()), "{}", r.text());
    for edge in [&a, &b] {
        assert_eq!(edge.get(&format!("{port}-s1.sandbox.localhost"), "/").await.status, 200);
        assert_eq!(readyz(edge).await, 200, "a node with a state stays ready without Redis");
        assert_eq!(generation(edge).await, g);
    }
    // A restart without Redis serves the node's own copy.
    b.kill9_and_restart().await;
    assert!(ready(&b).await, "a restarted node with a local copy is ready without Redis: {}", b.log());
    assert_eq!(generation(&b).await, g, "never an older generation than it served");
    assert_eq!(b.get(&format!("{port}-s1.sandbox.localhost"), "/").await.status, 200);
    // A node with no state and no Redis is not ready.
    let c = node(&redis, "edge-c", "").await;
    assert_eq!(readyz(&c).await, 503);

    redis.start_again();
    // Writes work again once the nodes have reconnected (backoff up to 5 s).
    let r = eventually(Duration::from_secs(15), || async {
        let r = b.api("PUT", "/v1/sandboxes/s2", Some(&sandbox("s2", port))).await;
        (r.status == 200).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("writes never came back: {}", b.log()));
    let g2 = r.json()["generation"].as_u64().expect("generation");
    assert_eq!(g2, g + 1, "the acknowledged writes survived the outage (append-only Redis)");
    for edge in [&a, &b, &c] {
        assert!(reaches(edge, g2).await, "{}", edge.log());
        assert!(ready(edge).await);
        assert_eq!(edge.get(&format!("{port}-s2.sandbox.localhost"), "/").await.status, 200);
    }
    let states: Vec<serde_json::Value> =
        futures_util::future::join_all([&a, &b, &c].map(|e| e.api("GET", "/v1/state", None))).await.into_iter().map(|r| r.json()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_trimmed_log_takes_the_snapshot_and_foreign_records_are_passed_over() {
    let redis = Redis::start();
    let origin = Origin::start("fleet-origin", "127.0.0.2").await;
    let port = origin.addr.port();
    let a = node(&redis, "edge-a", "").await;
    let mut b = node(&redis, "edge-b", "").await;
    assert!(ready(&a).await && ready(&b).await);
    assert_eq!(a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    assert!(reaches(&b, 1).await);
    // b stops at generation 1; the fleet goes on without it.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let mut g = 1;
    for i in 0..5 {
        let r = a.api("PUT", &format!("/v1/sandboxes/s{i}"), Some(&sandbox(&format!("s{i}"), port))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        g = r.json()["generation"].as_u64().expect("generation");
    }
    // Age the fleet's snapshot so a node keeps a new one at once, then trim the log
    // below it: b's position is gone from the stream.
    redis.cmd(&["SET", "fleet-test:snap:at", "0"]).expect("redis");
    let kept = eventually(Duration::from_secs(10), || async {
        let at = redis.cmd(&["GET", "fleet-test:snap:at"]).unwrap_or_default();
        (at.trim() != "0" && !at.trim().is_empty()).then_some(())
    })
    .await;
    assert!(kept.is_some(), "no node kept a snapshot: {}", a.log());
    redis.cmd(&["XTRIM", "fleet-test:log", "MINID", &format!("{}-0", g + 1)]).expect("redis");
    assert_eq!(redis.cmd(&["XLEN", "fleet-test:log"]).map(|s| s.trim().to_string()), Some("0".into()));
    b.kill9_and_restart().await;
    assert!(ready(&b).await, "{}", b.log());
    assert_eq!(generation(&b).await, g);
    assert!(b.log().contains("took the fleet's snapshot"), "{}", b.log());
    assert_eq!(b.get(&format!("{port}-s4.sandbox.localhost"), "/").await.status, 200);

    // A record nobody can read (a foreign writer, a truncated value) is passed over
    // whole by every node, in its place; the fleet goes on after it.
    let bad = (g + 1).to_string();
    redis.cmd(&["XADD", "fleet-test:log", &format!("{bad}-0"), "r", "{\"g\":", "t", "0"]).expect("redis");
    redis.cmd(&["SET", "fleet-test:gen", &bad]).expect("redis");
    assert!(reaches(&a, g + 1).await && reaches(&b, g + 1).await);
    let r = b.api("PUT", "/v1/sandboxes/s9", Some(&sandbox("s9", port))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"].as_u64(), Some(g + 2));
    assert!(reaches(&a, g + 2).await);
    for edge in [&a, &b] {
        let m = edge.api("GET", "/metrics", None).await.text();
        assert!(m.contains("miosa_edge_cluster_bad_input_total 1"), "{m}");
        assert!(!edge.log().contains("panicked"), "{}", edge.log());
    }
    // A generation key that is not a number: writes answer 503, nothing panics, and
    // the fleet works again once it is repaired.
    redis.cmd(&["SET", "fleet-test:gen", "not-a-number"]).expect("redis");
    let r = a.api("PUT", "/v1/sandboxes/s10", Some(&sandbox("s10", port))).await;
    assert_eq!((r.status, r.code()), (503, "cluster_unavailable".to_string()), "{}", r.text());
    redis.cmd(&["SET", "fleet-test:gen", &(g + 2).to_string()]).expect("redis");
    let r = eventually(Duration::from_secs(15), || async {
        let r = a.api("PUT", "/v1/sandboxes/s10", Some(&sandbox("s10", port))).await;
        (r.status == 200).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("writes never came back: {}", a.log()));
    assert_eq!(r.json()["generation"].as_u64(), Some(g + 3));
    assert!(reaches(&b, g + 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_share_on_one_node_closes_its_live_websocket_on_another() {
    use crate::access::{cookie, get, open_ws, push_share, ws_closed_within};
    use crate::support::{ws_echo, TOKENS_TOML};
    use futures_util::{SinkExt, StreamExt};
    let redis = Redis::start();
    let (ws_addr, _ws) = ws_echo("127.0.0.5").await;
    let a = node(&redis, "edge-a", TOKENS_TOML).await;
    let b = node(&redis, "edge-b", TOKENS_TOML).await;
    assert!(ready(&a).await && ready(&b).await);
    assert_eq!(a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    let body = serde_json::json!({
        "id": "wsbox", "workspace": "ws_1", "address": "127.0.0.5",
        "previews": [{"port": ws_addr.port(), "access": "private"}]
    });
    assert_eq!(a.api("PUT", "/v1/sandboxes/wsbox", Some(&body.to_string())).await.status, 200);
    let token = push_share(&a, "sh_ws", "wsbox", None, "").await;
    let g = generation(&a).await;
    assert!(reaches(&b, g).await);
    // The share opened on b (the record came from a), the session used on b.
    let ws_host = format!("{}-wsbox.sandbox.localhost", ws_addr.port());
    let r = b.request(&get(&ws_host, &format!("/?token={token}"), "")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let session = cookie(&r, "__Host-miosa_session");
    let mut ws = open_ws(&b, &ws_host, &session).await;
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert!(matches!(echo, Some(Ok(m)) if m.to_text().unwrap_or("") == "ping"));
    // Deleted through a: b closes the WebSocket within 10 s.
    let deleted_at = std::time::Instant::now();
    assert_eq!(a.api("DELETE", "/v1/share-tokens/sh_ws", None).await.status, 200);
    let closed = ws_closed_within(&mut ws, Duration::from_secs(12)).await;
    assert!(closed, "the WebSocket on edge-b was not closed after the share was deleted on edge-a");
    assert!(deleted_at.elapsed() <= Duration::from_secs(10), "closed after {:?}", deleted_at.elapsed());
    let m = b.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_revoked_connections_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_history_of_its_own_sets_it_aside_and_takes_the_fleets_state() {
    let redis = Redis::start();
    let origin = Origin::start("fleet-origin", "127.0.0.2").await;
    let port = origin.addr.port();
    let a = node(&redis, "edge-a", "").await;
    assert!(ready(&a).await);
    assert_eq!(a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    let r = a.api("PUT", "/v1/sandboxes/fleetbox", Some(&sandbox("fleetbox", port))).await;
    let g = r.json()["generation"].as_u64().expect("generation");

    // A single node with writes of its own (generations of another history)…
    let mut x = Edge::start_env(&[("MIOSA_EDGE_REDIS_URL", redis.url())], routes()).await;
    assert_eq!(x.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    for i in 0..5 {
        let r = x.api("PUT", &format!("/v1/sandboxes/own{i}"), Some(&sandbox(&format!("own{i}"), port))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // …joins the fleet: its own state is set aside, not mixed with the fleet's log.
    x.write_config(&format!("{}\n{}", cluster("edge-x"), routes()));
    x.kill9_and_restart().await;
    assert!(ready(&x).await, "{}", x.log());
    assert!(reaches(&x, g).await);
    let st = x.api("GET", "/v1/state", None).await.json();
    assert_eq!(st, a.api("GET", "/v1/state", None).await.json());
    assert_eq!(x.get(&format!("{port}-fleetbox.sandbox.localhost"), "/").await.status, 200);
    assert_eq!(x.get(&format!("{port}-own0.sandbox.localhost"), "/").await.status, 404);
    assert!(x.log().contains("set aside"), "{}", x.log());
    let aside = std::fs::read_dir(x.dir.path().join("var"))
        .expect("state dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("before-fleet-"));
    assert!(aside, "the node's own state is kept aside, not deleted");

    // A node whose state belongs to another fleet (another identity) does not follow.
    std::fs::write(x.dir.path().join("var/fleet.id"), "another-fleet").expect("write");
    x.kill9_and_restart().await;
    let refused = eventually(Duration::from_secs(10), || async { x.log().contains("Redis holds fleet").then_some(()) }).await;
    assert!(refused.is_some(), "{}", x.log());
    assert_eq!(readyz(&x).await, 503, "a node with another fleet's state is not ready");
    let w = a.api("PUT", "/v1/sandboxes/later", Some(&sandbox("later", port))).await;
    assert_eq!(w.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(x.get(&format!("{port}-later.sandbox.localhost"), "/").await.status, 404, "never followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_starts_from_the_fleets_snapshot_and_is_ready_only_once_caught_up() {
    let redis = Redis::start();
    let origin = Origin::start("fleet-origin", "127.0.0.2").await;
    let port = origin.addr.port();
    let a = node(&redis, "edge-a", "").await;
    assert!(ready(&a).await);
    assert_eq!(a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await.status, 200);
    for i in 0..3 {
        assert_eq!(a.api("PUT", &format!("/v1/sandboxes/s{i}"), Some(&sandbox(&format!("s{i}"), port))).await.status, 200);
    }
    let at = redis.cmd(&["GET", "fleet-test:snap:at"]).unwrap_or_default();
    redis.cmd(&["SET", "fleet-test:snap:at", "0"]).expect("redis");
    let kept = eventually(Duration::from_secs(10), || async {
        let now = redis.cmd(&["GET", "fleet-test:snap:at"]).unwrap_or_default();
        (now.trim() != "0" && now != at).then_some(())
    })
    .await;
    assert!(kept.is_some(), "no snapshot kept: {}", a.log());
    // Records after the snapshot: the new node follows them from the stream.
    let mut g = 0;
    for i in 3..6 {
        let r = a.api("PUT", &format!("/v1/sandboxes/s{i}"), Some(&sandbox(&format!("s{i}"), port))).await;
        g = r.json()["generation"].as_u64().expect("generation");
    }
    let c = node(&redis, "edge-c", "").await;
    assert!(ready(&c).await, "{}", c.log());
    // Ready means caught up: the generation it answers is the fleet's at once.
    assert_eq!(c.api("GET", "/readyz", None).await.json()["generation"].as_u64(), Some(g));
    assert!(c.log().contains("started from the fleet's snapshot"), "{}", c.log());
    assert_eq!(c.api("GET", "/v1/state", None).await.json(), a.api("GET", "/v1/state", None).await.json());
    assert_eq!(c.get(&format!("{port}-s5.sandbox.localhost"), "/").await.status, 200);
    assert!(c.dir.path().join("var/fleet.id").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_written_on_one_node_serves_on_every_node_and_its_egress_is_the_fleets() {
    let redis = Redis::start();
    let s3 = crate::s3::S3Server::start().await;
    s3.create_bucket("fleet-files").await;
    s3.put_with_headers("fleet-files", "hello.txt", &[("Content-Type", "text/plain")], b"hello fleet").await;
    let storage = format!("[storage]\nendpoint = \"{}\"\n", s3.endpoint());
    let env = [
        ("MIOSA_EDGE_REDIS_URL", redis.url()),
        ("STORAGE_KEY_ID", crate::s3::KEY_ID.into()),
        ("STORAGE_KEY_SECRET", crate::s3::KEY_SECRET.into()),
    ];
    let a = Edge::start_env(&env, &format!("{}\n{}\n{storage}", cluster("edge-a"), routes())).await;
    let b = Edge::start_env(&env, &format!("{}\n{}\n{storage}", cluster("edge-b"), routes())).await;
    assert!(ready(&a).await && ready(&b).await, "{}\n{}", a.log(), b.log());
    let r = a.api("PUT", "/v1/workspaces/ws_1", Some(r#"{"id":"ws_1","slug":"one"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bucket = r#"{"id":"bk_1","workspace":"ws_1","bucket":"fleet-files","alias":"files","public":true}"#;
    let r = a.api("PUT", "/v1/buckets/bk_1", Some(bucket)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json()["generation"].as_u64().expect("generation");
    assert!(reaches(&b, g).await, "edge-b never reached generation {g}: {}", b.log());
    for edge in [&a, &b] {
        let r = edge.get("files.storage.localhost", "/hello.txt").await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello fleet"), "{}", edge.log());
    }
    // Egress counted on both nodes, reported once by either.
    let buckets = eventually(Duration::from_secs(15), || async {
        let u = b.api("GET", "/v1/usage", None).await.json();
        let e = u["buckets"].as_array()?.iter().find(|e| e["id"] == "bk_1")?.clone();
        (e["requests"] == 2).then_some(e)
    })
    .await
    .expect("the fleet's report counts both nodes' requests for bk_1");
    assert_eq!(buckets["bytes"], 2 * "hello fleet".len());
}
