//! Fleet mode, certificates (CONTRACT §11): several real edge processes on one real
//! Redis, ordering from Pebble (pebble-challtestsrv as DNS server and DNS-01 webhook).
//! One order per name fleet-wide, one account and one budget, any node answers any
//! node's HTTP-01 challenge, every node serves a new certificate within 10 s, private
//! keys in Redis are sealed, and a sealed value that does not open is refused.

use crate::support::pebble::{
    certificates, install_pair, is_default, log_tail, metric, metrics, pem_cert, served_cert, tls_connect, tls_get, tls_toml, Pebble,
    PebbleOpts, TestCa, TlsOpts,
};
use crate::support::redis::Redis;
use crate::support::{eventually, free_port, Edge, Origin};
use miosa_edge::cluster::certs::{CertFleet, RedisCertStore, Sealer};
use miosa_edge::cluster::Cluster;
use miosa_edge::config::Config;
use miosa_edge::metrics::Metrics;
use miosa_edge::tls::CertStore;
use redis::Commands;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SEAL_KEY: &str = "fleet-certs-test-seal-key-0123456789abcdef";
const PREFIX: &str = "fleet-certs";
const SANDBOX: &str = "sandbox.localhost";
const APPS: &str = "apps.localhost";
/// Longest wait for an order to complete (issuance against Pebble takes seconds).
const ISSUE: Duration = Duration::from_secs(90);
/// CONTRACT §11: every node serves a new certificate within this of its issuance.
const FLEET_SERVES_WITHIN: Duration = Duration::from_secs(10);

/// One node: its edge and its (own, empty) certs_dir.
struct Node {
    edge: Edge,
    certs_dir: PathBuf,
    _certs: tempfile::TempDir,
}

/// The routing every node is given: workspace `ws_1` (slug `one`), sandbox `abc12345`
/// previewing `sandbox_port` on 127.0.0.2, and, when given, deployment `my-app` with a
/// verified custom domain served by `app`.
fn routing(sandbox_port: u16, deployment: Option<(&str, SocketAddr)>) -> String {
    let mut s = format!(
        r#"[domains]
sandbox = "{SANDBOX}"
apps = "{APPS}"

[[workspaces]]
id = "ws_1"
slug = "one"

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{{ port = {sandbox_port}, access = "public" }}]
"#
    );
    if let Some((domain, app)) = deployment {
        s.push_str(&format!(
            r#"
[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "my-app"
domains = [{{ host = "{domain}", verified = true }}]
active_version = "v1"

[[deployments.versions]]
id = "v1"
release = {{ kind = "dynamic", instances = ["{app}"] }}
"#
        ));
    }
    s
}

/// Starts node `name` on `redis` with TLS, `[acme]` against `pebble` when `acme`, its
/// plain listener on `http_port` (0: any).
async fn node(redis: &Redis, pebble: &Pebble, name: &str, acme: bool, http_port: u16, routing: &str) -> Node {
    node_with(redis, acme.then_some((pebble, "")), name, http_port, routing).await
}

/// [`node`] with `[acme]` against the Pebble given, followed by its tail
/// (`[acme.limits]`…); `None`: no `[acme]`.
async fn node_with(redis: &Redis, acme: Option<(&Pebble, &str)>, name: &str, http_port: u16, routing: &str) -> Node {
    let (certs, certs_dir) = crate::support::pebble::certs_dir();
    let acme = match acme {
        Some((pebble, tail)) => format!("{}{tail}\n", pebble.acme_toml("max_concurrent_orders = 4")),
        None => String::new(),
    };
    let body = format!("[cluster]\nnode = \"{name}\"\nprefix = \"{PREFIX}\"\n\n{}{acme}\n{routing}", tls_toml(&certs_dir, true));
    let server = format!("http = \"127.0.0.1:{http_port}\"\nhttps = \"127.0.0.1:0\"\n");
    let env = [("MIOSA_EDGE_REDIS_URL", redis.url()), ("MIOSA_EDGE_SEAL_KEY", SEAL_KEY.to_string())];
    Node { edge: Edge::start_opts(&server, &env, &body).await, certs_dir, _certs: certs }
}

/// A connection to the test Redis (the test reads and alters what the fleet keeps).
fn redis_conn(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url()).expect("redis url").get_connection().expect("redis connection")
}

/// The logs of `nodes` and Pebble's, for failure messages.
fn context(pebble: &Pebble, nodes: &[&Node]) -> String {
    let mut s = String::new();
    for n in nodes {
        s.push_str(&format!("--- edge log (tail) ---\n{}\n", log_tail(&n.edge.log(), 6000)));
    }
    s + &pebble.logs()
}

/// Waits (bounded) until `edge` serves `sni` a certificate that verifies against
/// Pebble's root; answers its serial.
async fn wait_pebble_cert(edge: &Edge, pebble: &Pebble, sni: &str, limit: Duration) -> Option<String> {
    eventually(limit, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let served = served_cert(edge.https(), Some(sni)).await.ok()?;
        if !served.issuer_cn.contains("Pebble") {
            return None;
        }
        let (_, info) = tls_connect(edge.https(), &TlsOpts::verified(sni, pebble.roots())).await.ok()?;
        Some(info.cert().serial)
    })
    .await
}

/// Waits (at most 10 s) until `edge` serves `sni` the certificate with `serial`.
async fn serves(edge: &Edge, sni: &str, serial: &str) -> bool {
    eventually(FLEET_SERVES_WITHIN, || async { (served_cert(edge.https(), Some(sni)).await.ok()?.serial == serial).then_some(()) })
        .await
        .is_some()
}

/// Waits until `edge` reports `name` as `valid` (not ordering) in `/v1/certificates`.
async fn wait_valid(edge: &Edge, name: &str) -> bool {
    eventually(Duration::from_secs(15), || async {
        let c = certificates(edge).await;
        let m = c["managed"].as_array()?.iter().find(|m| m["name"] == name)?.clone();
        (m["state"] == "valid").then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_acme_order_a_name_once_and_both_serve_it() {
    let redis = Redis::start();
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let pebble = Pebble::start(PebbleOpts { http_port: free_port(), validity_secs: None }).await;
    let routes = routing(origin.addr.port(), None);
    let (a, b) = tokio::join!(node(&redis, &pebble, "edge-a", true, 0, &routes), node(&redis, &pebble, "edge-b", true, 0, &routes));
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());
    let wildcard = format!("*.{SANDBOX}");
    let entry = format!("_wildcard.{SANDBOX}");

    // Both serve the one certificate Pebble issued.
    let Some(sa) = wait_pebble_cert(&a.edge, &pebble, &host, ISSUE).await else {
        panic!("edge-a never served a certificate from Pebble\n{}", context(&pebble, &[&a, &b]))
    };
    let Some(sb) = wait_pebble_cert(&b.edge, &pebble, &host, FLEET_SERVES_WITHIN).await else {
        panic!("edge-b never served the fleet's certificate\n{}", context(&pebble, &[&a, &b]))
    };
    assert_eq!(sa, sb, "both nodes serve the same certificate");
    let r = tls_get(b.edge.https(), Some(&host), &host, "/", Some(pebble.roots()), &["http/1.1"]).await.expect("verified GET on edge-b");
    assert_eq!(r.response.json()["origin"], "sbx");

    // Once no node is ordering any more, exactly one order was placed, fleet-wide.
    for n in [&a, &b] {
        assert!(wait_valid(&n.edge, &wildcard).await, "{wildcard} never valid\n{}", context(&pebble, &[n]));
    }
    let added = format!("Added DNS-01 TXT challenge for Host \"_acme-challenge.{SANDBOX}.\"");
    assert_eq!(pebble.challtestsrv_log().matches(&added).count(), 1, "one order for {wildcard}\n{}", pebble.challtestsrv_log());
    let successes: f64 = {
        let (ma, mb) = (metrics(&a.edge).await, metrics(&b.edge).await);
        [ma, mb].iter().map(|m| metric(m, "miosa_edge_acme_orders_total", "result=\"success\"").unwrap_or(0.0)).sum()
    };
    assert_eq!(successes, 1.0, "one successful order across the fleet");
    // The budget is counted fleet-wide: the node that did not order sees the order too.
    let mut conn = redis_conn(&redis);
    let ledger: Option<String> = conn.get(format!("{PREFIX}:acme:ledger")).expect("GET ledger");
    let ledger: serde_json::Value = serde_json::from_str(&ledger.expect("the fleet's ledger is in Redis")).expect("ledger JSON");
    assert_eq!(ledger["orders"].as_array().map(Vec::len), Some(1), "{ledger}");
    let (ba, bb) = (certificates(&a.edge).await["budget"].clone(), certificates(&b.edge).await["budget"].clone());
    assert_eq!(ba["orders_per_3h"], 299, "{ba}");
    assert_eq!(ba, bb, "both nodes count the same budget");

    // Kept in Redis, not in either node's certs_dir; the private key and the account
    // sealed (not plaintext), opening with the fleet's seal key only.
    for n in [&a, &b] {
        assert!(!n.certs_dir.join(&entry).exists(), "saved to Redis, not to {}", n.certs_dir.display());
    }
    let key = format!("{PREFIX}:cert:{entry}");
    let (chain, sealed): (Vec<u8>, Vec<u8>) =
        redis::cmd("HMGET").arg(&key).arg("fullchain").arg("key").query(&mut conn).expect("HMGET certificate");
    let (_, served) = tls_connect(a.edge.https(), &TlsOpts::sni(&host)).await.expect("handshake");
    assert_eq!(pem_cert(&String::from_utf8_lossy(&chain)).as_ref(), served.leaf.as_slice(), "the served certificate is the fleet's");
    assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY") && !sealed.windows(5).any(|w| w == b"-----"), "the key is sealed");
    let sealer = Sealer::new(SEAL_KEY.as_bytes()).expect("sealer");
    let opened = sealer.open(&format!("cert:{entry}"), &sealed).expect("opens with the fleet's seal key");
    assert!(String::from_utf8_lossy(&opened).contains("PRIVATE KEY"));
    assert!(Sealer::new(b"some other seal key of thirty-two bytes+").expect("sealer").open(&format!("cert:{entry}"), &sealed).is_err());
    let account: Vec<u8> = conn.get(format!("{PREFIX}:acme:account")).expect("GET account");
    assert!(!account.is_empty() && !account.windows(9).any(|w| w == b"key_pkcs8"), "the account is sealed");
    let account = sealer.open("acme:account", &account).expect("the account opens");
    assert!(String::from_utf8_lossy(&account).contains(&pebble.directory()), "one account, for Pebble's directory");

    // A sealed key altered in Redis is refused, logged and counted; no node panics,
    // nodes that served the certificate keep serving it, a new node serves the default.
    let mut altered = sealed.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 0x40;
    let _: () = conn.hset(&key, "key", altered).expect("HSET key");
    let _: () = conn.hset(format!("{PREFIX}:certs"), &entry, "altered").expect("HSET stamp");
    let c = node(&redis, &pebble, "edge-c", false, 0, &routes).await;
    let refused = eventually(Duration::from_secs(10), || async {
        let m = metrics(&c.edge).await;
        metric(&m, "miosa_edge_cluster_bad_input_total", "").filter(|v| *v >= 1.0).map(|_| m)
    })
    .await;
    assert!(refused.is_some(), "edge-c counts the refused value\n{}", context(&pebble, &[&c]));
    assert!(c.edge.log().contains(&key), "edge-c logs which value it refused\n{}", log_tail(&c.edge.log(), 4000));
    let errors = certificates(&c.edge).await["errors"].clone();
    assert_eq!(errors[0]["entry"], entry.as_str(), "the refused entry is reported: {errors}");
    let default = served_cert(c.edge.https(), Some(&host)).await.expect("edge-c handshake");
    assert!(is_default(&default), "edge-c serves the default, not a certificate without its key: {default:?}");
    for n in [&a, &b] {
        let counted = eventually(Duration::from_secs(10), || async {
            metric(&metrics(&n.edge).await, "miosa_edge_cluster_bad_input_total", "").filter(|v| *v >= 1.0)
        })
        .await;
        assert!(counted.is_some(), "the node rereads the altered entry and refuses it\n{}", context(&pebble, &[n]));
        let still = served_cert(n.edge.https(), Some(&host)).await.expect("handshake");
        assert_eq!(still.serial, sa, "the certificate being served keeps serving");
    }
    for n in [&a, &b, &c] {
        let r = n.edge.api("GET", "/v1/certificates", None).await;
        assert_eq!(r.status, 200, "the node is alive: {}", r.text());
    }

    // A node with [acme] and another seal key opens nothing of the fleet's and orders
    // nothing (it would replace what the others cannot open, and they it).
    let (certs, certs_dir) = crate::support::pebble::certs_dir();
    let body = format!(
        "[cluster]\nnode = \"edge-d\"\nprefix = \"{PREFIX}\"\n\n{}{}\n{routes}",
        tls_toml(&certs_dir, true),
        pebble.acme_toml("max_concurrent_orders = 4")
    );
    let env = [("MIOSA_EDGE_REDIS_URL", redis.url()), ("MIOSA_EDGE_SEAL_KEY", "another seal key, also 32 bytes or more".to_string())];
    let d = Edge::start_opts("https = \"127.0.0.1:0\"\n", &env, &body).await;
    let held_back = eventually(Duration::from_secs(15), || async {
        let c = certificates(&d).await;
        let m = c["managed"].as_array()?.iter().find(|m| m["name"] == wildcard.as_str())?.clone();
        (m["state"] == "pending" && d.log().contains("seal key does not open the fleet's values")).then_some(())
    })
    .await;
    assert!(held_back.is_some(), "edge-d holds back\n{}", log_tail(&d.log(), 4000));
    assert_eq!(pebble.challtestsrv_log().matches(&added).count(), 1, "still one order\n{}", pebble.challtestsrv_log());
    assert!(!d.log().contains("ordering a certificate"), "{}", log_tail(&d.log(), 4000));
    drop(certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_acme_answers_the_fleets_http01_challenge_and_serves_its_certificate() {
    let redis = Redis::start();
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let app = Origin::start("app", "127.0.0.4").await;
    let domain = "shop.customer.test";
    // Pebble validates HTTP-01 on the plain port of edge-c, which has no [acme]: only the
    // fleet's copy of edge-a's challenge can answer it.
    let c_port = free_port();
    let pebble = Pebble::start(PebbleOpts { http_port: c_port, validity_secs: None }).await;
    let routes = routing(origin.addr.port(), Some((domain, app.addr)));
    let c = node(&redis, &pebble, "edge-c", false, c_port, &routes).await;
    let a = node(&redis, &pebble, "edge-a", true, 0, &routes).await;

    let Some(serial) = wait_pebble_cert(&a.edge, &pebble, domain, ISSUE).await else {
        panic!("edge-a never served a certificate for {domain}\n{}", context(&pebble, &[&a, &c]))
    };
    let issued = Instant::now();
    let Some(on_c) = wait_pebble_cert(&c.edge, &pebble, domain, FLEET_SERVES_WITHIN).await else {
        panic!("edge-c did not serve {domain}'s certificate within 10 s\n{}", context(&pebble, &[&a, &c]))
    };
    assert!(issued.elapsed() <= FLEET_SERVES_WITHIN + Duration::from_secs(1));
    assert_eq!(on_c, serial);
    let r = tls_get(c.edge.https(), Some(domain), domain, "/", Some(pebble.roots()), &["http/1.1"]).await.expect("verified GET on edge-c");
    assert_eq!(r.response.status, 200, "{}", r.response.text());
    assert_eq!(r.response.json()["origin"], "app");
    // The challenge was edge-a's order, and it is withdrawn from the fleet once done.
    let managed = certificates(&c.edge).await;
    assert!(managed["managed"].as_array().is_none_or(|m| m.is_empty()), "edge-c orders nothing: {managed}");
    let mut conn = redis_conn(&redis);
    let withdrawn = eventually(Duration::from_secs(10), || {
        let n: usize = conn.hlen(format!("{PREFIX}:http01")).unwrap_or(usize::MAX);
        async move { (n == 0).then_some(()) }
    })
    .await;
    assert!(withdrawn.is_some(), "the fleet's pending challenges are removed after the order");
}

/// The certificate side of a fleet node `node` on `redis` (prefix `lib`), built from the
/// library directly: the parts the processes above use, each case on its own.
fn cert_fleet(redis: &Redis, node: &str) -> (std::sync::Arc<CertFleet>, std::sync::Arc<Metrics>) {
    cert_fleet_at(redis, node, "lib")
}

/// [`cert_fleet`] under `prefix`.
fn cert_fleet_at(redis: &Redis, node: &str, prefix: &str) -> (std::sync::Arc<CertFleet>, std::sync::Arc<Metrics>) {
    let mut cfg = Config::parse("", None).expect("empty config");
    cfg.cluster = Some(miosa_edge::config::Cluster {
        redis_url_env: "UNUSED".into(),
        node: node.into(),
        prefix: prefix.into(),
        seal_key_env: "UNUSED".into(),
        redis_url: redis.url(),
        seal_key: None,
    });
    let metrics = std::sync::Arc::new(Metrics::new());
    let cluster = Cluster::new(&cfg, metrics.clone()).expect("cluster").expect("fleet mode");
    (CertFleet::new(cluster, Some(SEAL_KEY.as_bytes())).expect("cert fleet"), metrics)
}

#[test]
fn order_locks_are_exclusive_and_only_their_holder_renews_or_releases_them() {
    let redis = Redis::start();
    let (a, _) = cert_fleet(&redis, "edge-a");
    let (b, _) = cert_fleet(&redis, "edge-b");
    let la = a.lock("cert:x.test").expect("redis").expect("free");
    assert!(b.lock("cert:x.test").expect("redis").is_none(), "held by edge-a");
    assert!(a.lock("cert:x.test").expect("redis").is_none(), "not twice, even by its holder");
    assert_eq!(b.lock_holder("cert:x.test").expect("redis").as_deref(), Some("edge-a"));
    assert!(b.lock("cert:y.test").expect("redis").is_some(), "locks are per name");
    let ttl: i64 = redis.cmd(&["PTTL", "lib:lock:cert:x.test"]).and_then(|s| s.trim().parse().ok()).expect("PTTL");
    assert!(ttl > 0 && ttl <= 60_000, "held with an expiry: {ttl}");
    assert!(la.renew().expect("redis"));

    // edge-a's lock expired (as when it stalls past 60 s) and edge-b took the name:
    // edge-a can neither renew nor release edge-b's lock.
    redis.cmd(&["DEL", "lib:lock:cert:x.test"]).expect("DEL");
    let lb = b.lock("cert:x.test").expect("redis").expect("free again");
    assert!(!la.renew().expect("redis"), "not the holder any more");
    la.release().expect("redis");
    assert_eq!(b.lock_holder("cert:x.test").expect("redis").as_deref(), Some("edge-b"));
    lb.release().expect("redis");
    assert_eq!(b.lock_holder("cert:x.test").expect("redis"), None);
    assert!(a.lock("cert:x.test").expect("redis").is_some());
}

#[test]
fn optimistic_updates_from_several_nodes_lose_nothing() {
    let redis = Redis::start();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (f, _) = cert_fleet(&redis, &format!("edge-{i}"));
            std::thread::spawn(move || {
                for _ in 0..25 {
                    f.update("counter", |raw| {
                        let n: u64 = raw.and_then(|r| std::str::from_utf8(r).ok()?.parse().ok()).unwrap_or(0);
                        (Some((n + 1).to_string().into_bytes()), ())
                    })
                    .expect("update");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(redis.cmd(&["GET", "lib:counter"]).map(|s| s.trim().to_string()).as_deref(), Some("100"));
}

#[test]
fn the_redis_store_seals_keys_and_refuses_what_does_not_open() {
    let redis = Redis::start();
    let (f, metrics) = cert_fleet(&redis, "edge-a");
    let store = RedisCertStore::new(f.clone());
    let leaf = crate::support::pebble::TestCa::new("fleet store test CA").issue(&["a.test"]);
    store.save("a.test", leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("save");
    let listed = store.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "a.test");
    let (chain, key) = store.read("a.test").expect("read");
    assert_eq!((chain.as_slice(), key.as_slice()), (leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
    // Saving again changes the stamp (the watchers reread it).
    store.save("a.test", leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("save");
    assert_ne!(store.list().expect("list")[0].1, listed[0].1);
    assert_eq!(metrics.cluster_bad_input.get(), 0);

    let mut conn = redis_conn(&redis);
    let sealed: Vec<u8> = conn.hget("lib:cert:a.test", "key").expect("HGET");
    assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"), "sealed");
    // A sealed key copied under another entry does not open there.
    let _: () =
        conn.hset_multiple("lib:cert:b.test", &[("fullchain", leaf.cert_pem.as_bytes()), ("key", sealed.as_slice())]).expect("HSET");
    let _: () = conn.hset("lib:certs", "b.test", "1").expect("HSET");
    let e = store.read("b.test").expect_err("moved key");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert_eq!(metrics.cluster_bad_input.get(), 1);
    // Truncated, and not sealed at all (a plaintext key written by hand).
    for bad in [&sealed[..20], leaf.key_pem.as_bytes(), &[][..]] {
        let _: () = conn.hset("lib:cert:a.test", "key", bad).expect("HSET");
        assert_eq!(store.read("a.test").expect_err("refused").kind(), std::io::ErrorKind::InvalidData);
    }
    assert_eq!(metrics.cluster_bad_input.get(), 4);
    // An entry name that could be a path is not listed.
    let _: () = conn.hset("lib:certs", "../etc", "1").expect("HSET");
    assert!(store.list().expect("list").iter().all(|(n, _)| n != "../etc"));
    assert_eq!(metrics.cluster_bad_input.get(), 5);
    assert_eq!(store.read("c.test").expect_err("absent").kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn http01_challenges_are_shared_expire_and_foreign_values_are_dropped() {
    let redis = Redis::start();
    let (a, _) = cert_fleet(&redis, "edge-a");
    let (b, metrics) = cert_fleet(&redis, "edge-b");
    a.put_token("tok_1", "tok_1.thumbprint").expect("put");
    let seen = b.tokens().expect("tokens");
    assert_eq!(seen.get("tok_1").map(|v| v.as_ref()), Some(&b"tok_1.thumbprint"[..]));
    let http01 = miosa_edge::acme::Http01::default();
    http01.set_fleet(seen);
    assert_eq!(http01.answer(b"/.well-known/acme-challenge/tok_1").as_deref(), Some(&b"tok_1.thumbprint"[..]));

    redis.cmd(&["HSET", "lib:http01", "tok_2", "1 tok_2.expired"]).expect("HSET");
    redis.cmd(&["HSET", "lib:http01", "tok_3", "not a challenge"]).expect("HSET");
    let seen = b.tokens().expect("tokens");
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["tok_1"]);
    assert_eq!(metrics.cluster_bad_input.get(), 1, "the foreign value is counted, the expired one is not");
    assert_eq!(
        redis.cmd(&["HLEN", "lib:http01"]).map(|s| s.trim().to_string()).as_deref(),
        Some("1"),
        "expired and foreign values removed"
    );
    a.remove_token("tok_1").expect("remove");
    assert!(b.tokens().expect("tokens").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_ordered_once_and_every_node_serves_it_within_10_s() {
    let redis = Redis::start();
    let origin = Origin::start("sbx", "127.0.0.2").await;
    // 30 s certificates: renewal starts 20 s after issuance (and the next 20 s after that).
    let pebble = Pebble::start(PebbleOpts { http_port: free_port(), validity_secs: Some(30) }).await;
    let routes = routing(origin.addr.port(), None);
    let limits = "[acme.limits]\nduplicates_per_week = 1000\n";
    let (a, b) = tokio::join!(
        node_with(&redis, Some((&pebble, limits)), "edge-a", 0, &routes),
        node_with(&redis, Some((&pebble, limits)), "edge-b", 0, &routes)
    );
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());
    let Some(first) = wait_pebble_cert(&a.edge, &pebble, &host, ISSUE).await else {
        panic!("edge-a never served a certificate from Pebble\n{}", context(&pebble, &[&a, &b]))
    };

    // Renewed by one node; whichever it was, the other serves the new one within 10 s.
    let renewed = eventually(Duration::from_secs(60), || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in [&a, &b] {
            let c = served_cert(n.edge.https(), Some(&host)).await.ok()?;
            if c.issuer_cn.contains("Pebble") && c.serial != first {
                return Some((c.serial, std::ptr::eq(n, &a)));
            }
        }
        None
    })
    .await;
    let Some((second, on_a)) = renewed else { panic!("never renewed\n{}", context(&pebble, &[&a, &b])) };
    let other = if on_a { &b } else { &a };
    let followed = eventually(FLEET_SERVES_WITHIN, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (served_cert(other.edge.https(), Some(&host)).await.ok()?.serial == second).then_some(())
    })
    .await;
    assert!(followed.is_some(), "the other node serves the renewed certificate within 10 s\n{}", context(&pebble, &[other]));
    let (_, info) = tls_connect(other.edge.https(), &TlsOpts::verified(&host, pebble.roots())).await.expect("verified");
    assert_eq!(info.cert().serial, second);

    // Two orders in all: the first certificate and its one renewal.
    let mut conn = redis_conn(&redis);
    let ledger: String = conn.get(format!("{PREFIX}:acme:ledger")).expect("GET ledger");
    let ledger: serde_json::Value = serde_json::from_str(&ledger).expect("ledger JSON");
    assert_eq!(ledger["orders"].as_array().map(Vec::len), Some(2), "{ledger}");
    let added = format!("Added DNS-01 TXT challenge for Host \"_acme-challenge.{SANDBOX}.\"");
    assert_eq!(pebble.challtestsrv_log().matches(&added).count(), 2, "{}", pebble.challtestsrv_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_certificates_are_served_beside_certs_dir_and_kept_while_redis_is_away() {
    let mut redis = Redis::start();
    let ca = TestCa::new("fleet certificates test CA");
    let now = time::OffsetDateTime::now_utc();
    let fleet_leaf = ca.issue_valid(&["a.fleet.test"], now - time::Duration::hours(1), now + time::Duration::days(30));
    // Another node's certificate, as it saves it.
    let (f, _) = cert_fleet_at(&redis, "edge-x", PREFIX);
    let store = RedisCertStore::new(f.clone());
    store.save("a.fleet.test", fleet_leaf.cert_pem.as_bytes(), fleet_leaf.key_pem.as_bytes()).expect("save");

    let mut c = node_with(&redis, None, "edge-c", 0, &routing(free_port(), None)).await;
    assert!(serves(&c.edge, "a.fleet.test", &fleet_leaf.serial).await, "the fleet's certificate is served\n{}", c.edge.log());

    // The operator's certs_dir is served beside it; an entry of the same name in both
    // loads both, and the one valid longer serves.
    let own = ca.issue(&["b.fleet.test"]);
    install_pair(&c.certs_dir, "b.fleet.test", &own);
    assert!(serves(&c.edge, "b.fleet.test", &own.serial).await, "certs_dir is still served\n{}", c.edge.log());
    let longer = ca.issue_valid(&["a.fleet.test"], now - time::Duration::hours(1), now + time::Duration::days(60));
    install_pair(&c.certs_dir, "a.fleet.test", &longer);
    assert!(serves(&c.edge, "a.fleet.test", &longer.serial).await, "the one valid longer serves\n{}", c.edge.log());
    let listed = certificates(&c.edge).await;
    let sources: Vec<(Option<&str>, Option<&str>)> =
        listed["certificates"].as_array().expect("certificates").iter().map(|c| (c["entry"].as_str(), c["source"].as_str())).collect();
    assert_eq!(
        sources,
        vec![
            (None, Some("default")),
            (Some("a.fleet.test"), Some("acme")),
            (Some("b.fleet.test"), Some("file")),
            (Some("certs_dir/a.fleet.test"), Some("file"))
        ],
        "the fleet's certificates are ACME's, certs_dir's the operator's: {listed}"
    );
    std::fs::remove_dir_all(c.certs_dir.join("a.fleet.test")).expect("remove");
    assert!(serves(&c.edge, "a.fleet.test", &fleet_leaf.serial).await, "the fleet's again\n{}", c.edge.log());

    // Redis away: the node keeps serving what it has, the fleet's and its own.
    redis.stop();
    let noticed = eventually(Duration::from_secs(10), || async {
        c.edge.log().contains("cannot list the fleet's certificates; serving the ones this node has").then_some(())
    })
    .await;
    assert!(noticed.is_some(), "{}", log_tail(&c.edge.log(), 4000));
    for (sni, serial) in [("a.fleet.test", &fleet_leaf.serial), ("b.fleet.test", &own.serial)] {
        assert_eq!(&served_cert(c.edge.https(), Some(sni)).await.expect("handshake").serial, serial, "{sni} while Redis is away");
    }
    // A node restarted meanwhile serves the fleet's certificates from its local copy.
    c.edge.kill9_and_restart().await;
    for (sni, serial) in [("a.fleet.test", &fleet_leaf.serial), ("b.fleet.test", &own.serial)] {
        let got = served_cert(c.edge.https(), Some(sni)).await.expect("handshake");
        assert_eq!(&got.serial, serial, "{sni} after a restart while Redis is away: {got:?}\n{}", log_tail(&c.edge.log(), 4000));
    }

    // Back: a certificate renewed meanwhile elsewhere is served within 10 s.
    redis.start_again();
    let renewed = ca.issue_valid(&["a.fleet.test"], now - time::Duration::minutes(1), now + time::Duration::days(40));
    let saved = eventually(Duration::from_secs(10), || async {
        store.save("a.fleet.test", renewed.cert_pem.as_bytes(), renewed.key_pem.as_bytes()).ok()
    })
    .await;
    assert!(saved.is_some(), "Redis back");
    assert!(serves(&c.edge, "a.fleet.test", &renewed.serial).await, "served after Redis returned\n{}", log_tail(&c.edge.log(), 4000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ordering_different_names_at_once_share_one_account() {
    let redis = Redis::start();
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let pebble = Pebble::start(PebbleOpts { http_port: free_port(), validity_secs: None }).await;
    // Each node's own sandbox zone ([domains] is per node): two names, one per node,
    // ordered at the same time, and both nodes need the fleet's account for it.
    let zones = [SANDBOX, "sbx2.localhost"];
    let routes = routing(origin.addr.port(), None);
    let routes_b = routes.replace(&format!("sandbox = \"{SANDBOX}\""), &format!("sandbox = \"{}\"", zones[1]));
    let (a, b) = tokio::join!(node(&redis, &pebble, "edge-a", true, 0, &routes), node(&redis, &pebble, "edge-b", true, 0, &routes_b));
    for (n, zone) in [(&a, zones[0]), (&b, zones[1])] {
        let host = format!("{}-abc12345.{zone}", origin.addr.port());
        assert!(wait_pebble_cert(&n.edge, &pebble, &host, ISSUE).await.is_some(), "{host} never served\n{}", context(&pebble, &[&a, &b]));
        assert!(n.edge.log().contains("ordering a certificate"), "each node ordered its own name");
    }
    let log = std::fs::read_to_string(pebble.dir.path().join("pebble.log")).unwrap_or_default();
    assert!(log.contains("There are now 1 accounts in memory"), "{log}");
    assert!(!log.contains("There are now 2 accounts in memory"), "one account for the fleet\n{log}");
    // Both nodes serve both certificates (every certificate is the fleet's).
    for n in [&a, &b] {
        for zone in zones {
            let host = format!("x.{zone}");
            assert!(wait_pebble_cert(&n.edge, &pebble, &host, FLEET_SERVES_WITHIN).await.is_some(), "{host}\n{}", context(&pebble, &[n]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_order_backs_off_on_every_node() {
    let redis = Redis::start();
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let app = Origin::start("app", "127.0.0.4").await;
    let pebble = Pebble::start(PebbleOpts { http_port: free_port(), validity_secs: None }).await;
    let domain = "bad.customer.test";
    // Pebble validates HTTP-01 where no node listens: the order fails.
    pebble.challtestsrv("/add-a", &format!(r#"{{"host":"{domain}","addresses":["127.0.0.9"]}}"#)).await;
    let routes = routing(origin.addr.port(), Some((domain, app.addr)));
    let (a, b) = tokio::join!(node(&redis, &pebble, "edge-a", true, 0, &routes), node(&redis, &pebble, "edge-b", true, 0, &routes));
    for n in [&a, &b] {
        let backoff = eventually(ISSUE, || async {
            let c = certificates(&n.edge).await;
            let m = c["managed"].as_array()?.iter().find(|m| m["name"] == domain)?.clone();
            (m["state"] == "backoff").then_some(m)
        })
        .await;
        let Some(m) = backoff else { panic!("{domain} never in backoff\n{}", context(&pebble, &[n])) };
        assert_eq!(m["failures"], 1, "the fleet's count of failures: {m}");
        assert!(m["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
    }
    // One attempt in all: the node that did not order did not try again.
    let mut conn = redis_conn(&redis);
    let ledger: String = conn.get(format!("{PREFIX}:acme:ledger")).expect("GET ledger");
    let ledger: serde_json::Value = serde_json::from_str(&ledger).expect("ledger JSON");
    let failed = ledger["failed"].as_array().map(|f| f.iter().filter(|x| x[1] == domain).count());
    assert_eq!(failed, Some(1), "{ledger}");
    let tried = |n: &Node| {
        n.edge.log().lines().filter(|l| l.contains("certificate order failed") && l.contains(&format!("name={domain} "))).count()
    };
    assert_eq!(tried(&a) + tried(&b), 1, "\n{}", context(&pebble, &[&a, &b]));
}
