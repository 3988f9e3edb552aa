//! The control API (CONTRACT §4) against the real binary.

use crate::support::{eventually, raw_request, Edge, Origin};
use crate::Fixture;
use serde_json::json;
use std::time::Duration;

/// An API state: a sandbox of TOML's ws_1 previewing `port` on 127.0.0.2, and a
/// deployment with two versions.
fn api_state(port: u16, v1: &[std::net::SocketAddr], v2: &[std::net::SocketAddr], active: &str) -> serde_json::Value {
    json!({
        "sandboxes": [{"id": "apibox", "workspace": "ws_1", "address": "127.0.0.2", "previews": [{"port": port, "access": "public"}]}],
        "deployments": [{
            "id": "dep_api", "workspace": "ws_1", "name": "api-app", "active_version": active,
            "domains": [{"host": "api-app.customer.test", "verified": true}],
            "versions": [
                {"id": "v1", "release": {"kind": "dynamic", "instances": v1.iter().map(|a| a.to_string()).collect::<Vec<_>>()}},
                {"id": "v2", "release": {"kind": "dynamic", "instances": v2.iter().map(|a| a.to_string()).collect::<Vec<_>>()}}
            ]
        }]
    })
}

#[tokio::test]
async fn auth_health_and_error_shapes() {
    let f = Fixture::start().await;
    let edge = Edge::start_with("max_body_bytes = 4096", &f.toml("")).await;

    // Liveness and readiness need no token.
    let r = raw_request(edge.control, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = raw_request(edge.control, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ready"], true);

    // Everything else does, /metrics included.
    for path in ["/metrics", "/v1/state", "/v1/sandboxes/abc12345"] {
        let r = raw_request(edge.control, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!((r.status, r.code()), (401, "unauthorized".into()), "{path}");
        let r = raw_request(
            edge.control,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 401, "{path}");
    }
    let r = edge.api("GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("miosa_edge_state_generation"));

    // 400 invalid_json, 400 invalid_state with path, 415, 413, 404, 405.
    let r = edge.api("PUT", "/v1/state", Some("{not json")).await;
    assert_eq!((r.status, r.code()), (400, "invalid_json".into()));
    let r = edge
        .api(
            "PUT",
            "/v1/state",
            Some(r#"{"sandboxes":[{"id":"a","workspace":"ws_1","address":"10.0.0.1"},{"id":"b","workspace":"ws_1","address":"10.0.3"}]}"#),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_state".into()));
    assert_eq!(r.json()["error"]["path"], "sandboxes[1].address");
    let r =
        edge.api("PUT", "/v1/state", Some(r#"{"sandboxes":[{"id":"a","workspace":"ws_1","address":"10.0.0.1","colour":"red"}]}"#)).await;
    assert_eq!((r.status, r.code()), (400, "invalid_state".into()));
    assert!(r.json()["error"]["message"].as_str().unwrap_or_default().contains("unknown field `colour`"));
    let r = edge.api("PUT", "/v1/state", Some(r#"{"sandboxes":[{"id":"a","workspace":"ws_nope","address":"10.0.0.1"}]}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("sandboxes[0].workspace")));
    let r = edge.api_with("PUT", "/v1/state", Some("{}"), &[("Content-Type", "text/plain")]).await;
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type".into()));
    let big = format!(r#"{{"sandboxes":[],"pad":"{}"}}"#, "x".repeat(5000));
    let r = edge.api("PUT", "/v1/state", Some(&big)).await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large".into()));
    let r = edge.api("GET", "/v1/sandboxes/nope", None).await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = edge.api("DELETE", "/v1/deployments/nope", None).await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = edge.api("GET", "/v1/nothing", None).await;
    assert_eq!(r.status, 404);
    let r = edge.api("DELETE", "/v1/state", None).await;
    assert_eq!(r.status, 405);

    // 409: an id or a host pinned by TOML.
    let r = edge.api("PUT", "/v1/sandboxes/abc12345", Some(r#"{"id":"abc12345","workspace":"ws_1","address":"10.0.0.9"}"#)).await;
    assert_eq!((r.status, r.code()), (409, "conflict".into()), "{}", r.text());
    assert_eq!(r.json()["error"]["path"], "id", "the offending field of the request's body");
    let r = edge
        .api(
            "PUT",
            "/v1/workspaces/ws_x",
            Some(r#"{"id":"ws_x","slug":"x","preview_domain":{"host":"preview.tenant-one.test","verified":true}}"#),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "conflict".into()), "{}", r.text());
    let r = edge.api("DELETE", "/v1/sandboxes/abc12345", None).await;
    assert_eq!((r.status, r.code()), (409, "conflict".into()));
    // The path's id must be the body's.
    let r = edge.api("PUT", "/v1/sandboxes/one", Some(r#"{"id":"two","workspace":"ws_1","address":"10.0.0.9"}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("id")));

    // Nothing of the above was applied.
    let r = edge.api("GET", "/v1/state", None).await;
    assert_eq!(r.json()["sandboxes"], json!([]));
    let writes = edge.api("GET", "/metrics", None).await.text();
    assert!(writes.contains(r#"miosa_edge_state_writes_total{result="ok"} 0"#), "{writes}");
}

#[tokio::test]
async fn writes_route_at_once_with_generations_and_if_match() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-apibox.sandbox.localhost", f.pb());
    assert_eq!(edge.get(&host, "/").await.status, 404);

    let r = edge.api("GET", "/v1/state", None).await;
    let g0 = r.json()["generation"].as_u64().expect("generation");
    assert_eq!(r.header("etag"), Some(format!("\"{g0}\"").as_str()));

    let state = api_state(f.pb(), &[f.d1.addr], &[f.d2.addr], "v2");
    // A sandbox of ws_1 on 127.0.0.3 where b-public listens.
    let mut state = state;
    state["sandboxes"][0]["address"] = json!("127.0.0.3");
    let r = edge.api_with("PUT", "/v1/state", Some(&state.to_string()), &[("If-Match", &format!("\"{g0}\""))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g1 = r.json()["generation"].as_u64().expect("generation");
    assert!(g1 > g0);
    // Acknowledged means routed: no waiting.
    let r = edge.get(&host, "/").await;
    assert_eq!((r.status, r.json()["origin"].as_str()), (200, Some("b-public")));
    assert_eq!(edge.get("api-app.customer.test", "/").await.json()["origin"], "d2");

    // A stale If-Match is refused and changes nothing.
    let r = edge.api_with("PUT", "/v1/state", Some("{}"), &[("If-Match", &format!("\"{g0}\""))]).await;
    assert_eq!((r.status, r.code()), (412, "precondition_failed".into()));
    assert_eq!(edge.get(&host, "/").await.status, 200);

    // Per-object GET answers the bare object; TOML objects are readable too.
    let r = edge.api("GET", "/v1/sandboxes/apibox", None).await;
    assert_eq!(r.json()["address"], "127.0.0.3");
    let r = edge.api("GET", "/v1/sandboxes/abc12345", None).await;
    assert_eq!(r.json()["id"], "abc12345");

    // ops: all or nothing. The second op is bad, so the first is not applied either.
    let ops = json!({"ops": [
        {"op": "delete", "kind": "sandbox", "id": "apibox"},
        {"op": "upsert", "kind": "sandbox", "value": {"id": "x", "workspace": "ws_nope", "address": "10.0.0.1"}}
    ]});
    let r = edge.api("POST", "/v1/state/ops", Some(&ops.to_string())).await;
    assert_eq!((r.status, r.code()), (400, "invalid_state".into()), "{}", r.text());
    assert_eq!(edge.get(&host, "/").await.status, 200, "the delete was not applied");
    let ops =
        json!({"ops": [{"op": "upsert", "kind": "sandbox", "value": {"id": "x", "workspace": "ws_1", "address": "10.0.0.1", "bogus": 1}}]});
    let r = edge.api("POST", "/v1/state/ops", Some(&ops.to_string())).await;
    assert_eq!(r.json()["error"]["path"], "ops[0].value.bogus", "{}", r.text());
    let ops = json!({"ops": [{"op": "delete", "kind": "sandbox", "id": "apibox"}, {"op": "delete", "kind": "share_token", "id": "nope"}]});
    let r = edge.api("POST", "/v1/state/ops", Some(&ops.to_string())).await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let ops = json!({"ops": [{"op": "delete", "kind": "sandbox", "id": "apibox"}]});
    let r = edge.api("POST", "/v1/state/ops", Some(&ops.to_string())).await;
    let g2 = r.json()["generation"].as_u64().expect("generation");
    assert!(g2 > g1);
    assert_eq!(edge.get(&host, "/").await.status, 404);

    // Per-object PUT and DELETE.
    let sb = json!({"id": "apibox", "workspace": "ws_1", "address": "127.0.0.3", "previews": [{"port": f.pb(), "access": "public"}]});
    let r = edge.api("PUT", "/v1/sandboxes/apibox", Some(&sb.to_string())).await;
    assert!(r.json()["generation"].as_u64().expect("generation") > g2);
    assert_eq!(edge.get(&host, "/").await.status, 200);
    let r = edge.api("DELETE", "/v1/sandboxes/apibox", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(edge.get(&host, "/").await.status, 404);
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let f = Fixture::start().await;
    let mut edge = Edge::start(&f.toml("")).await;
    let state = api_state(f.pa(), &[f.d1.addr], &[f.d2.addr], "v1");
    let r = edge.api("PUT", "/v1/state", Some(&state.to_string())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json()["generation"].as_u64().expect("generation");
    // A rejected write changes nothing, on disk either.
    let r = edge.api("PUT", "/v1/state", Some(r#"{"sandboxes":[{"id":"a","workspace":"ws_nope","address":"10.0.0.1"}]}"#)).await;
    assert_eq!(r.status, 400);

    edge.kill9_and_restart().await;
    let r = edge.api("GET", "/v1/state", None).await;
    assert!(r.json()["generation"].as_u64().expect("generation") > g, "generations only grow across restarts");
    assert_eq!(r.json()["sandboxes"][0]["id"], "apibox");
    assert_eq!(edge.get(&format!("{}-apibox.sandbox.localhost", f.pa()), "/").await.json()["origin"], "a-public");
    assert_eq!(edge.get("api-app.customer.test", "/").await.json()["origin"], "d1");
    assert!(edge.dir.path().join("var/state.snap").exists(), "the snapshot");
}

#[tokio::test]
async fn rollback_is_a_pointer_move_and_in_flight_requests_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let old = Origin::start("old-version", "127.0.0.4").await;
    let new = Origin::start("new-version", "127.0.0.4").await;
    let r = edge.api("PUT", "/v1/state", Some(&api_state(f.pa(), &[old.addr], &[new.addr], "v2").to_string())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(edge.get("api-app.customer.test", "/").await.json()["origin"], "new-version");

    // A streaming request in flight on the new version…
    let ctl = new.expect_stream();
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: api-app.customer.test\r\nConnection: close\r\n\r\n").await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), ctl.started).await.expect("started").expect("started");

    // …roll back: new requests go to the old version at once.
    let r = edge.api("POST", "/v1/deployments/dep_api/activate", Some(r#"{"version":"v1"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..3 {
        assert_eq!(edge.get("api-app.customer.test", "/").await.json()["origin"], "old-version");
    }
    // Unknown version, unknown deployment, TOML deployment.
    let r = edge.api("POST", "/v1/deployments/dep_api/activate", Some(r#"{"version":"v9"}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("version")));
    let r = edge.api("POST", "/v1/deployments/nope/activate", Some(r#"{"version":"v1"}"#)).await;
    assert_eq!(r.status, 404);
    let r = edge.api("POST", "/v1/deployments/dep_1/activate", Some(r#"{"version":"v1"}"#)).await;
    assert_eq!(r.status, 409);

    // The in-flight request completes on the version it started on.
    let _ = ctl.release.send(());
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("finished").expect("read");
    let body = crate::support::parse_response(&buf).text();
    assert!(body.starts_with("first-chunk;") && body.ends_with("chunk-99;end"), "{body}");
}

#[tokio::test]
async fn a_hundred_writes_a_second_under_load_fail_nothing() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let a = [Origin::start("a1", "127.0.0.4").await, Origin::start("a2", "127.0.0.4").await];
    let b = [Origin::start("b1", "127.0.0.5").await, Origin::start("b2", "127.0.0.5").await];
    let (va, vb) = ([a[0].addr, a[1].addr], [b[0].addr, b[1].addr]);
    let r = edge.api("PUT", "/v1/state", Some(&api_state(f.pa(), &va, &vb, "v1").to_string())).await;
    assert_eq!(r.status, 200);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let addr = edge.addr;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut seen) = (0usize, std::collections::BTreeSet::new());
            let mut failures = Vec::new();
            // Bounded: stops when told, and never after 2000 requests.
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = raw_request(addr, "GET / HTTP/1.1\r\nHost: api-app.customer.test\r\nConnection: close\r\n\r\n").await;
                if r.status == 200 {
                    ok += 1;
                    seen.insert(r.header("x-origin").unwrap_or_default().to_string());
                } else {
                    failures.push(format!("{} {}", r.status, r.text()));
                }
            }
            (ok, seen, failures)
        }));
    }
    // 100 writes in about a second, each flipping the active version (and rewriting
    // the whole API state, so every write builds and swaps a whole table).
    let start = std::time::Instant::now();
    for i in 0..100 {
        let active = if i % 2 == 0 { "v2" } else { "v1" };
        let r = edge.api("PUT", "/v1/state", Some(&api_state(f.pa(), &va, &vb, active).to_string())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let next = start + Duration::from_millis(10 * (i + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    let mut all_seen = std::collections::BTreeSet::new();
    for c in clients {
        let (ok, seen, failures) = c.await.expect("client");
        assert!(failures.is_empty(), "failed requests during table swaps: {failures:?}");
        total += ok;
        all_seen.extend(seen);
    }
    assert!(total > 50, "load actually ran ({total} requests)");
    // Every answer came from an instance of one of the two versions, and both versions
    // served: the swaps took effect while the load ran.
    assert!(all_seen.iter().all(|o| ["a1", "a2", "b1", "b2"].contains(&o.as_str())), "{all_seen:?}");
    assert!(all_seen.iter().any(|o| o.starts_with('a')) && all_seen.iter().any(|o| o.starts_with('b')), "{all_seen:?}");
    let g = edge.api("GET", "/v1/state", None).await.json()["generation"].as_u64().expect("generation");
    assert!(g >= 101);
    let _ = eventually(Duration::from_millis(1), || async { Some(()) }).await;
}

#[tokio::test]
async fn domain_verify_reports_expected_records() {
    // A nameserver that never answers: the check is bounded and reports what is
    // expected (the DNS logic itself is tested against a real DNS server in
    // src/dns.rs).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let ns = silent.local_addr().expect("addr");
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("[dns]\nnameservers = [\"{ns}\"]\n\n{}", f.toml(""))).await;
    let started = std::time::Instant::now();
    let r = edge.api("POST", "/v1/domains/verify", Some(r#"{"host":"preview.tenant-one.test","kind":"preview"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    let j = r.json();
    assert_eq!(j["verified"], false);
    assert_eq!(
        j["expected"],
        json!([
            {"name": "*.preview.tenant-one.test.", "type": "CNAME", "value": "edge.localhost."},
            {"name": "_acme-challenge.preview.tenant-one.test.", "type": "CNAME", "value": "ws_1.acme.localhost."}
        ])
    );
    assert_eq!(j["found"], json!([]));
    // A host no workspace claims for that kind.
    let r = edge.api("POST", "/v1/domains/verify", Some(r#"{"host":"preview.tenant-one.test","kind":"deploy"}"#)).await;
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = edge.api("POST", "/v1/domains/verify", Some(r#"{"host":"Not A Host","kind":"preview"}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("host")));
}

#[tokio::test]
async fn a_toml_reload_that_collides_with_api_objects_is_refused() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let sb = json!({"id": "apibox", "workspace": "ws_1", "address": "127.0.0.3", "previews": [{"port": f.pb(), "access": "public"}]});
    assert_eq!(edge.api("PUT", "/v1/sandboxes/apibox", Some(&sb.to_string())).await.status, 200);
    let host = format!("{}-apibox.sandbox.localhost", f.pb());
    assert_eq!(edge.get(&host, "/").await.json()["origin"], "b-public");

    // The operator adds a sandbox with the same id to the file: refused, API object kept.
    let clash = format!("[[sandboxes]]\nid = \"apibox\"\nworkspace = \"ws_2\"\naddress = \"127.0.0.2\"\npreviews = [{{ port = {}, access = \"public\" }}]\n", f.pa());
    edge.write_config(&f.toml(&clash));
    edge.hup();
    let log = eventually(Duration::from_secs(10), || async {
        let l = edge.log();
        l.contains("config reload refused").then_some(l)
    })
    .await
    .expect("refusal logged");
    assert!(log.contains("sandbox `apibox` is pinned by the TOML file"), "{log}");
    assert_eq!(edge.get(&host, "/").await.json()["origin"], "b-public");
    let m = edge.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_config_reloads_total{result=\"error\"} 1"), "{m}");
}

#[tokio::test]
async fn kill_9_in_a_write_storm_loses_no_acknowledged_write_and_invents_none() {
    let f = Fixture::start().await;
    let mut edge = Edge::start(&f.toml("")).await;
    let edge_control = edge.control;
    // Eight writers PUT sandboxes as fast as they are acknowledged; the edge is killed
    // while they write.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 10_000 {
                let id = format!("storm{w}x{i}");
                i += 1;
                let body = json!({"id": id, "workspace": "ws_1", "address": "127.0.0.9", "previews": [{"port": 3000}]}).to_string();
                let head = format!(
                    "PUT /v1/sandboxes/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    crate::support::CONTROL_TOKEN,
                    body.len()
                );
                let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), crate::support::try_raw_request(edge_control, &head)).await else {
                    break; // the edge is gone: this write may or may not have landed
                };
                if r.status == 200 {
                    acked.lock().unwrap().push(id);
                }
            }
        }));
    }
    eventually(Duration::from_secs(20), || async { (acked.lock().unwrap().len() >= 300).then_some(()) })
        .await
        .expect("writes acknowledged");
    edge.kill9_and_restart().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let state = edge.api("GET", "/v1/state", None).await.json();
    let present: std::collections::HashSet<String> =
        state["sandboxes"].as_array().expect("sandboxes").iter().filter_map(|s| s["id"].as_str().map(String::from)).collect();
    for id in &acked {
        assert!(present.contains(id), "acknowledged {id} was lost ({} acknowledged, {} present)", acked.len(), present.len());
    }
    // Nothing invented: every sandbox present is one a writer sent, with what it sent.
    for s in state["sandboxes"].as_array().expect("sandboxes") {
        let id = s["id"].as_str().unwrap_or_default();
        assert!(id.starts_with("storm"), "{s}");
        assert_eq!((s["workspace"].as_str(), s["address"].as_str()), (Some("ws_1"), Some("127.0.0.9")), "{s}");
    }
    assert!(present.len() <= acked.len() + 8, "at most one write in flight per writer may land unacknowledged");
}

#[tokio::test]
async fn write_bodies_must_be_json_objects() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let sb = json!({"id": "apibox", "workspace": "ws_1", "address": "127.0.0.3"});
    assert_eq!(edge.api("PUT", "/v1/sandboxes/apibox", Some(&sb.to_string())).await.status, 200);
    let g = edge.api("GET", "/v1/state", None).await.json()["generation"].as_u64().expect("generation");

    // serde reads a struct from an array: `[]` would have been an empty state.
    for (method, path, body) in [
        ("PUT", "/v1/state", "[]"),
        ("PUT", "/v1/state", " [[],[],[],[]]"),
        ("PUT", "/v1/state", "null"),
        ("PUT", "/v1/state", ""),
        ("PUT", "/v1/sandboxes/apibox", r#"["apibox","ws_1","127.0.0.9"]"#),
        ("POST", "/v1/state/ops", "[[]]"),
        ("POST", "/v1/deployments/dep_1/activate", r#"["v1"]"#),
        ("POST", "/v1/domains/verify", r#"["preview.tenant-one.test","preview"]"#),
    ] {
        let r = edge.api(method, path, Some(body)).await;
        assert_eq!((r.status, r.code()), (400, "invalid_json".into()), "{method} {path} {body}: {}", r.text());
    }
    // A bad body is 400 whatever its If-Match says (the body is checked first).
    for (method, path) in
        [("PUT", "/v1/state"), ("POST", "/v1/state/ops"), ("PUT", "/v1/sandboxes/apibox"), ("POST", "/v1/deployments/dep_1/activate")]
    {
        for if_match in ["", "\"not-a-generation\"", "\"999999\""] {
            let r = edge.api_with(method, path, Some("[]"), &[("If-Match", if_match)]).await;
            assert_eq!((r.status, r.code()), (400, "invalid_json".into()), "{method} {path} If-Match {if_match:?}: {}", r.text());
        }
    }
    // Inside ops, an op and an object given as arrays are refused at their path.
    let r = edge.api("POST", "/v1/state/ops", Some(r#"{"ops":[["delete","sandbox","apibox"]]}"#)).await;
    assert_eq!((r.status, r.code(), r.json()["error"]["path"].as_str()), (400, "invalid_state".into(), Some("ops[0]")), "{}", r.text());
    let r = edge.api("POST", "/v1/state/ops", Some(r#"{"ops":[{"op":"upsert","kind":"sandbox","value":["x","ws_1","10.0.0.1"]}]}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("ops[0].value")), "{}", r.text());
    // And so is a nested object given as an array, at any depth.
    let r = edge
        .api("PUT", "/v1/state", Some(r#"{"sandboxes":[{"id":"a","workspace":"ws_1","address":"10.0.0.1","previews":[[5173,"public"]]}]}"#))
        .await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("sandboxes[0].previews[0]")), "{}", r.text());
    let r = edge.api("PUT", "/v1/workspaces/ws_x", Some(r#"{"id":"ws_x","slug":"x","branding":["https://x.test/l.png"]}"#)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("branding")), "{}", r.text());

    // Nothing changed.
    let r = edge.api("GET", "/v1/state", None).await;
    assert_eq!(r.json()["generation"].as_u64(), Some(g));
    assert_eq!(r.json()["sandboxes"][0]["address"], "127.0.0.3");
}

#[tokio::test]
async fn error_paths_go_through_tagged_releases() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let dep = |release: serde_json::Value| json!({"id": "d", "workspace": "ws_1", "name": "app", "active_version": "v1", "versions": [{"id": "v1", "release": release}]});
    let bad_instance = dep(json!({"kind": "dynamic", "instances": ["10.0.0.1:80", "10.0.0.2"]}));
    let bad_sha = dep(json!({"kind": "static", "sha256": "xyz"}));
    for (body, path) in [
        (json!({"deployments": [bad_instance.clone()]}), "deployments[0].versions[0].release.instances[1]"),
        (json!({"deployments": [bad_sha.clone()]}), "deployments[0].versions[0].release.sha256"),
        (json!({"deployments": [dep(json!({"kind": "lambda"}))]}), "deployments[0].versions[0].release.kind"),
    ] {
        let r = edge.api("PUT", "/v1/state", Some(&body.to_string())).await;
        assert_eq!((r.status, r.code(), r.json()["error"]["path"].as_str()), (400, "invalid_state".into(), Some(path)), "{}", r.text());
    }
    let r = edge.api("PUT", "/v1/deployments/d", Some(&bad_instance.to_string())).await;
    assert_eq!(r.json()["error"]["path"], "versions[0].release.instances[1]", "{}", r.text());
    let ops = json!({"ops": [{"op": "upsert", "kind": "deployment", "value": bad_sha}]});
    let r = edge.api("POST", "/v1/state/ops", Some(&ops.to_string())).await;
    assert_eq!(r.json()["error"]["path"], "ops[0].value.versions[0].release.sha256", "{}", r.text());
    // The ops' own union: an error inside an op names its field too.
    for (op, path) in [
        (json!({"op": "upsert", "kind": "sandboxx", "value": {}}), "ops[0].kind"),
        (json!({"op": "upsertt", "kind": "sandbox", "value": {}}), "ops[0].op"),
        (json!({"op": "delete", "kind": "sandbox", "id": 7}), "ops[0].id"),
        (json!({"op": "delete", "kind": "sandbox", "value": {}}), "ops[0].value"),
        (json!({"op": "upsert", "kind": "sandbox", "id": "x"}), "ops[0].id"),
    ] {
        let r = edge.api("POST", "/v1/state/ops", Some(&json!({ "ops": [op] }).to_string())).await;
        assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some(path)), "{op}: {}", r.text());
    }
    // A field of the other kind is refused, and a good release still reads.
    let mixed = dep(json!({"kind": "dynamic", "instances": ["10.0.0.1:80"], "spa": true}));
    let r = edge.api("PUT", "/v1/deployments/d", Some(&mixed.to_string())).await;
    assert!(r.json()["error"]["message"].as_str().unwrap_or_default().contains("unknown field `spa`"), "{}", r.text());
    let good = dep(json!({"kind": "static", "sha256": "a".repeat(64), "spa": true}));
    let r = edge.api("PUT", "/v1/deployments/d", Some(&good.to_string())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(edge.api("GET", "/v1/deployments/d", None).await.json()["versions"][0]["release"], good["versions"][0]["release"]);
}

#[tokio::test]
async fn known_paths_answer_405_with_allow_for_other_methods() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    for (method, path, allow) in [
        ("TRACE", "/healthz", "GET"),
        ("TRACE", "/readyz", "GET"),
        ("TRACE", "/metrics", "GET"),
        ("TRACE", "/v1/usage", "GET"),
        ("TRACE", "/v1/certificates", "GET"),
        ("POST", "/v1/cluster", "GET"),
        ("PUT", "/v1/openapi.yaml", "GET"),
        ("DELETE", "/v1/state", "GET, PUT"),
        ("GET", "/v1/state/ops", "POST"),
        ("GET", "/v1/domains/verify", "POST"),
        ("GET", "/v1/deployments/dep_1/activate", "POST"),
        ("PATCH", "/v1/sandboxes/abc12345", "GET, PUT, DELETE"),
    ] {
        // Without a token and with one: the method is wrong either way.
        let r = raw_request(edge.control, &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!((r.status, r.code(), r.header("allow")), (405, "method_not_allowed".into(), Some(allow)), "{method} {path}");
        let r = edge.api(method, path, None).await;
        assert_eq!((r.status, r.header("allow")), (405, Some(allow)), "{method} {path}");
    }
    // A known method and path without a token is still 401; an unknown path 404.
    let r = raw_request(edge.control, "GET /v1/certificates HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 401);
    assert_eq!(edge.api("TRACE", "/v1/nothing", None).await.status, 404);
}
