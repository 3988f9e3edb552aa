//! Fleet mode's counters (CONTRACT §11): the share-password attempt limit and the usage
//! report, through several real edge processes on one real Redis (`redis-server`).

use crate::support::redis::Redis;
use crate::support::{eventually, parse_response, raw_request, Edge, Origin, Response, TOKENS_TOML};
use miosa_edge::access::mint;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Node `name` of the fleet on `redis`: the test keys, one workspace, and sandbox
/// `abc12345` at 127.0.0.2 with a private and a public port.
async fn node(redis: &Redis, name: &str, private: u16, public: u16) -> Edge {
    let toml = format!(
        r#"[cluster]
node = "{name}"
prefix = "fleet-test"
{TOKENS_TOML}
[[workspaces]]
id = "ws_1"
slug = "one"

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{{ port = {private}, access = "private" }}, {{ port = {public}, access = "public" }}]
"#
    );
    let edge = Edge::start_env(&[("MIOSA_EDGE_REDIS_URL", redis.url())], &toml).await;
    let ready = eventually(Duration::from_secs(15), || async {
        let r = edge.api("GET", "/readyz", None).await;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "{name} never ready: {}", edge.log());
    edge
}

/// The generation `GET /v1/state` answers on `edge`.
async fn generation(edge: &Edge) -> u64 {
    edge.api("GET", "/v1/state", None).await.json()["generation"].as_u64().unwrap_or(0)
}

/// Sends `raw` to `addr` from the local address `ip` (the client IP the edge sees).
async fn raw_request_from(ip: [u8; 4], addr: SocketAddr, raw: &str) -> Response {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((ip, 0))).expect("bind a loopback source address");
    let mut s = sock.connect(addr).await.expect("connect");
    s.write_all(raw.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await.expect("response timed out").expect("read");
    parse_response(&buf)
}

/// The password form's POST with the pending cookie.
fn post(host: &str, pending: &str, password: &str) -> String {
    let body = format!("password={}&next=%2F", password.replace(' ', "+"));
    format!(
        "POST /__miosa/share-password HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nCookie: {pending}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_password_failures_count_across_nodes() {
    let mut redis = Redis::start();
    let private = Origin::start("private", "127.0.0.2").await;
    let public = Origin::start("public", "127.0.0.2").await;
    let (pp, pa) = (private.addr.port(), public.addr.port());
    let a = node(&redis, "edge-a", pp, pa).await;
    let b = node(&redis, "edge-b", pp, pa).await;
    let host = format!("{pp}-abc12345.sandbox.localhost");

    let hash = miosa_edge::access::password::hash("correct horse").expect("hash");
    let (token, sha) = mint::share_token().expect("share token");
    let body = format!("{{\"id\":\"sh_pw\",\"token_sha256\":\"{sha}\",\"sandbox\":\"abc12345\",\"password_hash\":\"{hash}\"}}");
    let r = a.api("PUT", "/v1/share-tokens/sh_pw", Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json()["generation"].as_u64().expect("generation");
    let reached = eventually(Duration::from_secs(5), || async { (generation(&b).await >= g).then_some(()) }).await;
    assert!(reached.is_some(), "edge-b never reached generation {g}: {}", b.log());

    // The link gives a pending cookie (the session key is the fleet's: it reads on both).
    let r = a.request(&format!("GET /?token={token} HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let pending = r
        .headers_named("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-miosa_share_pending="))
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no pending cookie: {:?}", r.headers));

    // Ten wrong passwords, alternating nodes: every one the form again.
    for i in 0..10 {
        let edge = if i % 2 == 0 { &a } else { &b };
        let r = raw_request(edge.addr, &post(&host, &pending, "nope")).await;
        assert_eq!(r.status, 401, "try {i} on {}: {}", if i % 2 == 0 { "a" } else { "b" }, r.text());
    }
    let key = format!("fleet-test:pw:{}:127.0.0.1", hex(&miosa_edge::access::share_hash(&token)));
    assert_eq!(redis.cmd(&["GET", &key]).map(|s| s.trim().to_string()), Some("10".into()), "counted in Redis");
    // The 11th on either node is 429, even with the right password.
    for edge in [&a, &b] {
        let r = raw_request(edge.addr, &post(&host, &pending, "correct horse")).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(r.text().contains("Too many wrong passwords"), "{}", r.text());
    }

    // Another client IP is counted apart: a wrong password is a 401, the right one opens.
    let r = raw_request_from([127, 0, 0, 3], b.addr, &post(&host, &pending, "nope")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = raw_request_from([127, 0, 0, 3], a.addr, &post(&host, &pending, "correct horse")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let key3 = key.replace("127.0.0.1", "127.0.0.3");
    assert_eq!(redis.cmd(&["EXISTS", &key3]).map(|s| s.trim().to_string()), Some("0".into()), "a right password forgets the failures");

    // Redis away: each node limits alone (never unlimited), and says so.
    redis.stop();
    for i in 0..10 {
        let r = raw_request_from([127, 0, 0, 4], a.addr, &post(&host, &pending, "nope")).await;
        assert_eq!(r.status, 401, "try {i} without Redis: {}", r.text());
    }
    let r = raw_request_from([127, 0, 0, 4], a.addr, &post(&host, &pending, "correct horse")).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(a.log().contains("this node's own limit applies"), "{}", a.log());
    // Redis back: the counting is the fleet's again, on connections made anew, and the
    // IP limited on both nodes before still is (its count survived in Redis).
    redis.start_again();
    let connected = eventually(Duration::from_secs(15), || async {
        b.api("GET", "/metrics", None).await.text().contains("miosa_edge_cluster_connected 1").then_some(())
    })
    .await;
    assert!(connected.is_some(), "edge-b never reconnected: {}", b.log());
    let r = raw_request_from([127, 0, 0, 5], b.addr, &post(&host, &pending, "nope")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let key5 = key.replace("127.0.0.1", "127.0.0.5");
    assert_eq!(redis.cmd(&["GET", &key5]).map(|s| s.trim().to_string()), Some("1".into()), "{}", b.log());
    let r = raw_request(b.addr, &post(&host, &pending, "correct horse")).await;
    assert_eq!(r.status, 429, "{}", r.text());
}

/// Sends `n` requests to the public preview through `edge`; answers the body bytes the
/// client received.
async fn traffic(edge: &Edge, port: u16, n: usize) -> u64 {
    let mut bytes = 0;
    for i in 0..n {
        let r = edge.get(&format!("{port}-abc12345.sandbox.localhost"), &format!("/t/{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        bytes += r.body.len() as u64;
    }
    bytes
}

/// `ws_1`'s (requests, bytes) in `GET /v1/usage[?cursor=ack]` on `edge`, and the cursor.
async fn usage(edge: &Edge, ack: Option<u64>) -> Option<(u64, u64, u64)> {
    let path = match ack {
        Some(c) => format!("/v1/usage?cursor={c}"),
        None => "/v1/usage".to_string(),
    };
    let r = edge.api("GET", &path, None).await;
    if r.status != 200 {
        return None;
    }
    let j = r.json();
    let cursor = j["cursor"].as_u64()?;
    let ws = j["workspaces"].as_array()?.iter().find(|w| w["id"] == "ws_1").cloned();
    let (req, bytes) = ws.map(|w| (w["requests"].as_u64().unwrap_or(0), w["bytes"].as_u64().unwrap_or(0))).unwrap_or((0, 0));
    Some((req, bytes, cursor))
}

/// Polls `GET /v1/usage[?cursor=ack]` on `edge` until it reports at least `requests`
/// (a retried acknowledgement acknowledges nothing more, so polling is harmless);
/// answers the first such report, so a count past `requests` (doubled) fails the test.
async fn usage_reaches(edge: &Edge, ack: Option<u64>, requests: u64) -> (u64, u64, u64) {
    let got = eventually(Duration::from_secs(10), || async { usage(edge, ack).await.filter(|(r, _, _)| *r >= requests) }).await;
    match got {
        Some(g) => g,
        None => panic!("usage never reached {requests} requests: last {:?}; {}", usage(edge, ack).await, edge.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_two_nodes_is_reported_once_by_either() {
    let redis = Redis::start();
    let private = Origin::start("private", "127.0.0.2").await;
    let public = Origin::start("public", "127.0.0.2").await;
    let (pp, pa) = (private.addr.port(), public.addr.port());
    let a = node(&redis, "edge-a", pp, pa).await;
    let b = node(&redis, "edge-b", pp, pa).await;

    let bytes = traffic(&a, pa, 7).await + traffic(&b, pa, 5).await;
    let (r1, b1, c1) = usage_reaches(&b, None, 12).await;
    assert_eq!((r1, b1), (12, bytes), "the fleet's counts, once");
    // Not acknowledged: the other node answers the same counts.
    let (r2, b2, c2) = usage_reaches(&a, None, 12).await;
    assert_eq!((r2, b2), (12, bytes));
    assert!(c2 > c1, "one cursor for the fleet: {c1} then {c2}");

    // Acknowledged on a, more traffic on b: only that is reported, on either node.
    let more = traffic(&b, pa, 3).await;
    let (r3, b3, c3) = usage_reaches(&b, Some(c2), 3).await;
    assert_eq!((r3, b3), (3, more));
    // A retry with the same cursor acknowledges nothing more: the same counts.
    let (r4, b4, c4) = usage(&a, Some(c2)).await.expect("usage on a");
    assert_eq!((r4, b4), (3, more));
    // An older cursor acknowledges nothing either.
    assert_eq!(usage(&a, Some(c1)).await.map(|(r, b, _)| (r, b)), Some((3, more)));
    assert!(c4 > c3);
    // Acknowledging the last report on the other node: nothing left.
    let last = usage(&a, None).await.expect("usage").2;
    assert_eq!(usage(&b, Some(last)).await.map(|(r, b, _)| (r, b)), Some((0, 0)));
    // Each node's own metrics stay its own.
    let m = a.api("GET", "/metrics", None).await.text();
    assert!(m.contains("miosa_edge_workspace_requests_total{workspace=\"ws_1\"} 7"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_redis_outage_and_a_crash_without_loss_or_double() {
    let mut redis = Redis::start();
    let private = Origin::start("private", "127.0.0.2").await;
    let public = Origin::start("public", "127.0.0.2").await;
    let (pp, pa) = (private.addr.port(), public.addr.port());
    let mut a = node(&redis, "edge-a", pp, pa).await;
    let b = node(&redis, "edge-b", pp, pa).await;

    let mut bytes = traffic(&a, pa, 4).await + traffic(&b, pa, 4).await;
    let (r, by, _) = usage_reaches(&a, None, 8).await;
    assert_eq!((r, by), (8, bytes));

    // Redis away: nodes keep counting; the report cannot be made (503), nothing is lost.
    redis.stop();
    bytes += traffic(&a, pa, 6).await + traffic(&b, pa, 5).await;
    let r = a.api("GET", "/v1/usage", None).await;
    assert_eq!((r.status, r.code()), (503, "cluster_unavailable".into()), "{}", r.text());

    // a crashes once its counts are saved with the batch it could not send (usage.json
    // is written every second); its restart sends that very batch.
    let file = a.dir.path().join("var/usage.json");
    let saved = eventually(Duration::from_secs(10), || async {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).ok()?).ok()?;
        (j["workspaces"]["ws_1"][0].as_u64() == Some(10) && j["fleet"]["batch"]["seq"].as_u64().is_some()).then_some(j)
    })
    .await;
    assert!(saved.is_some(), "a's pending counts never saved: {}", std::fs::read_to_string(&file).unwrap_or_default());
    a.kill9_and_restart().await;
    bytes += traffic(&a, pa, 2).await;

    redis.start_again();
    let (r, by, _) = usage_reaches(&b, None, 8 + 11 + 2).await;
    assert_eq!((r, by), (21, bytes), "every count once, after the outage and the crash");
    let (r, by, _) = usage_reaches(&a, None, 21).await;
    assert_eq!((r, by), (21, bytes));
    assert_eq!(redis.cmd(&["HGET", "fleet-test:usage:totals", "r:ws_1"]).map(|s| s.trim().to_string()), Some("21".into()));
}
