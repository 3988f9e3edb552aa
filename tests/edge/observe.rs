//! Usage attribution (exact, with cursor acknowledgement), bounded metrics, and the
//! JSON access log with tokens redacted.

use crate::support::{eventually, Edge};
use crate::Fixture;
use std::time::Duration;

fn workspace(report: &serde_json::Value, id: &str) -> (u64, u64) {
    report["workspaces"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["id"] == id))
        .map(|w| (w["requests"].as_u64().unwrap_or(0), w["bytes"].as_u64().unwrap_or(0)))
        .unwrap_or((0, 0))
}

#[tokio::test]
async fn usage_is_attributed_by_id_and_never_lost_or_doubled() {
    let f = Fixture::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let edge = Edge::start(&format!("[log]\naccess = \"{}\"\n\n{}", log.display(), f.toml(""))).await;
    let a = format!("{}-abc12345.sandbox.localhost", f.pa());
    let mut bytes_ws1 = 0;
    for _ in 0..3 {
        bytes_ws1 += edge.get(&a, "/p?token=mp_secret.value&x=1").await.body.len() as u64;
    }
    for _ in 0..2 {
        bytes_ws1 += edge.get("app.customer.test", "/").await.body.len() as u64;
    }
    edge.get(&format!("{}-zzz99.sandbox.localhost", f.pb()), "/").await;
    edge.get("nothing.example", "/").await;

    let r1 = edge.api("GET", "/v1/usage", None).await.json();
    assert_eq!(workspace(&r1, "ws_1"), (5, bytes_ws1));
    assert_eq!(workspace(&r1, "ws_2").0, 1);
    let cursor = r1["cursor"].as_u64().expect("cursor");

    // One more request; acknowledging r1 leaves exactly that one.
    edge.get(&a, "/").await;
    let r2 = edge.api("GET", &format!("/v1/usage?cursor={cursor}"), None).await.json();
    assert_eq!(workspace(&r2, "ws_1").0, 1);
    assert_eq!(workspace(&r2, "ws_2").0, 0);
    // Retrying with the same (now old) cursor gives the same counts, not fewer.
    let r3 = edge.api("GET", &format!("/v1/usage?cursor={cursor}"), None).await.json();
    assert_eq!(workspace(&r3, "ws_1").0, 1);

    // Metrics by id, never by host.
    let m = edge.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_workspace_requests_total{workspace=\"ws_1\"} 6"), "{m}");
    assert!(m.contains("miosa_edge_sandbox_requests_total{sandbox=\"abc12345\"} 4"));
    assert!(m.contains("miosa_edge_deployment_requests_total{deployment=\"dep_1\"} 2"));
    assert!(!m.contains("customer.test"), "no raw hosts in labels");

    // The access log: one JSON object per request, tokens redacted.
    let lines = eventually(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().count() >= 8).then_some(text)
    })
    .await
    .expect("access log written");
    assert!(!lines.contains("mp_secret"), "a token reached the log");
    let entries: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let first = &entries[0];
    assert_eq!(first["path"], "/p?token=REDACTED&x=1");
    assert_eq!(
        (first["route"].as_str(), first["workspace"].as_str(), first["sandbox"].as_str()),
        (Some("preview"), Some("ws_1"), Some("abc12345"))
    );
    assert_eq!(first["status"], 303, "an edge token is taken out of the URL before anything goes upstream");
    assert!(first["request_id"].as_str().is_some_and(|r| r.len() == 32));
    assert!(first["upstream"].is_null(), "{first}");
    assert!(entries.iter().any(|e| e["upstream"].as_str().is_some_and(|u| u.starts_with("127.0.0.2:"))), "upstreams are logged");
    let unknown = entries.iter().find(|e| e["host"] == "nothing.example").expect("unknown host logged");
    assert_eq!((unknown["status"].as_u64(), unknown["route"].as_str()), (Some(404), Some("edge")));
    assert!(entries.iter().any(|e| e["deployment"] == "dep_1"));
}

/// Requests counted in the last moment before a fast stop (SIGINT: no drain) are in the
/// usage after a restart: the usage counters' last save runs before the process goes
/// (it was dropped with the services' runtime, and logged as a failed task).
#[tokio::test]
async fn usage_counted_just_before_a_fast_stop_is_kept() {
    let f = Fixture::start().await;
    let mut edge = Edge::start(&f.toml("")).await;
    let a = format!("{}-abc12345.sandbox.localhost", f.pa());
    for _ in 0..4 {
        assert_eq!(edge.get(&a, "/").await.status, 200);
    }
    edge.interrupt_and_restart().await;
    let r = edge.api("GET", "/v1/usage", None).await.json();
    assert_eq!(workspace(&r, "ws_1").0, 4, "{r}\n{}", edge.log());
    assert!(!edge.log().contains("usage save task failed"), "{}", edge.log());
}
