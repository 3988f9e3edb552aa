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

    // GET /v1/cluster lists both, ready, at the fleet's generation.
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
