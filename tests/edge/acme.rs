//! ACME as CONTRACT §9 against a real RFC 8555 CA: Pebble, with pebble-challtestsrv as
//! the DNS server Pebble and the edge ask and as the DNS-01 webhook the edge writes TXT
//! records through. Every wait is bounded; every handshake that claims a certificate was
//! issued verifies against Pebble's root.

use crate::support::pebble::{
    certificates, certs_dir, install_pair, is_default, log_tail, metric, metrics, read_all, served_cert, tls_connect, tls_get, tls_toml,
    unix_now, Pebble, PebbleOpts, TestCa, TlsOpts, TlsResponse,
};
use crate::support::{eventually, free_port, parse_response, Edge, Origin};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The platform suffixes (`[domains]`) the tests run under: the embedded defaults, so
/// the wildcards ordered are `*.sandbox.localhost` and `*.one.apps.localhost`. The
/// edge's DNS-01 propagation check must ask `[dns] nameservers` for these too (a stub
/// resolver following RFC 6761 answers names under `localhost.` itself, never with TXT).
const SANDBOX: &str = "sandbox.localhost";
const APPS: &str = "apps.localhost";
const ACME_ZONE: &str = "acme.localhost";

/// Longest wait for an order to complete (issuance against Pebble takes seconds).
const ISSUE: Duration = Duration::from_secs(90);

/// Pebble, a certs directory, and the edge's plain port Pebble validates HTTP-01 on.
struct Ca {
    pebble: Pebble,
    http_port: u16,
    _certs: tempfile::TempDir,
    certs_dir: PathBuf,
}

impl Ca {
    async fn start(validity_secs: Option<u64>) -> Ca {
        let http_port = free_port();
        let pebble = Pebble::start(PebbleOpts { http_port, validity_secs }).await;
        let (certs, certs_dir) = certs_dir();
        Ca { pebble, http_port, _certs: certs, certs_dir }
    }

    /// The edge's whole config body: `[tls]`, `[dns]`, `[acme]` (+ `acme_keys`),
    /// `[acme.dns01]`, then `acme_tail` (`[acme.limits]`…) and the routing sections.
    fn body(&self, acme_keys: &str, acme_tail: &str, routing: &str) -> String {
        format!("{}{}{acme_tail}\n\n{routing}", tls_toml(&self.certs_dir, true), self.pebble.acme_toml(acme_keys))
    }

    /// Starts the edge on the reserved plain port and a free TLS port.
    async fn edge(&self, server_extra: &str, acme_keys: &str, acme_tail: &str, routing: &str) -> Edge {
        let server = format!("http = \"127.0.0.1:{}\"\nhttps = \"127.0.0.1:0\"\n{server_extra}", self.http_port);
        Edge::start_opts(&server, &[], &self.body(acme_keys, acme_tail, routing)).await
    }

    /// The edge's log, `/v1/certificates` and Pebble's output, for failure messages.
    async fn context(&self, edge: &Edge) -> String {
        let r = edge.api("GET", "/v1/certificates", None).await;
        format!(
            "--- /v1/certificates ({}) ---\n{}\n--- edge log (tail) ---\n{}\n{}",
            r.status,
            r.text(),
            log_tail(&edge.log(), 8000),
            self.pebble.logs()
        )
    }

    /// A handshake for `sni` verified against Pebble's root, then `GET path` with
    /// `Host: sni`.
    async fn verified_get(&self, edge: &Edge, sni: &str, path: &str) -> Result<TlsResponse, String> {
        tls_get(edge.https(), Some(sni), sni, path, Some(self.pebble.roots()), &["http/1.1"]).await
    }

    /// Waits (bounded by [`ISSUE`]) until `sni` is served a certificate Pebble issued.
    async fn wait_issued(&self, edge: &Edge, sni: &str) -> TlsResponse {
        // Look without verifying (no alert, no noise in the edge's log) until Pebble's
        // certificate is served, then verify.
        let poll = || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let served = served_cert(edge.https(), Some(sni)).await.ok()?;
            if !pebble_issued(&served.issuer_cn) {
                return None;
            }
            self.verified_get(edge, sni, "/").await.ok()
        };
        match eventually(ISSUE, poll).await {
            Some(r) => r,
            None => {
                let last = self.verified_get(edge, sni, "/").await.err().unwrap_or_default();
                panic!("no certificate issued by Pebble served for {sni} within {ISSUE:?}; last: {last}\n{}", self.context(edge).await)
            }
        }
    }
}

/// One workspace (`ws_1`, slug `one`), sandbox `abc12345` previewing `sandbox_port`
/// publicly on 127.0.0.2, and, when given, deployment `my-app` with one domain.
fn routing(sandbox_port: u16, deployment: Option<(&str, bool, SocketAddr)>) -> String {
    routing_with("", sandbox_port, deployment)
}

/// [`routing`] with extra keys for workspace `ws_1`.
fn routing_with(workspace_extra: &str, sandbox_port: u16, deployment: Option<(&str, bool, SocketAddr)>) -> String {
    let mut s = format!(
        r#"[domains]
sandbox = "{SANDBOX}"
apps = "{APPS}"
acme_zone = "{ACME_ZONE}"

[[workspaces]]
id = "ws_1"
slug = "one"
{workspace_extra}

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{{ port = {sandbox_port}, access = "public" }}]
"#
    );
    if let Some((domain, verified, instance)) = deployment {
        s.push_str(&format!(
            r#"
[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "my-app"
domains = [{{ host = "{domain}", verified = {verified} }}]
active_version = "v1"

[[deployments.versions]]
id = "v1"
release = {{ kind = "dynamic", instances = ["{instance}"] }}
"#
        ));
    }
    s
}

/// The `managed` entry for `name`.
fn managed(certs: &Value, name: &str) -> Option<Value> {
    certs["managed"].as_array()?.iter().find(|m| m["name"] == name).cloned()
}

fn managed_names(certs: &Value) -> Vec<String> {
    let mut v: Vec<String> =
        certs["managed"].as_array().map(|a| a.iter().filter_map(|m| m["name"].as_str().map(str::to_string)).collect()).unwrap_or_default();
    v.sort();
    v
}

fn pebble_issued(issuer_cn: &str) -> bool {
    issuer_cn.contains("Pebble")
}

#[tokio::test]
async fn sandbox_wildcard_is_issued_by_dns01() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let ca = Ca::start(None).await;
    let started = unix_now();
    let edge = ca.edge("", "", "", &routing(origin.addr.port(), None)).await;
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());

    let wildcard = format!("*.{SANDBOX}");
    let entry_name = format!("_wildcard.{SANDBOX}");
    let r = ca.wait_issued(&edge, &host).await;
    let cert = r.info.cert();
    assert_eq!(cert.names, vec![wildcard.clone()], "{cert:?}");
    assert!(pebble_issued(&cert.issuer_cn), "{cert:?}");
    assert_eq!(r.response.status, 200, "{}", r.response.text());
    assert_eq!(r.response.json()["origin"], "sbx");
    assert_eq!(r.response.json()["headers"]["x-forwarded-proto"], serde_json::json!(["https"]));

    // Saved into certs_dir under the wildcard's entry name.
    let entry = ca.certs_dir.join(&entry_name);
    let saved = std::fs::read_to_string(entry.join("fullchain.pem")).unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
    assert_eq!(crate::support::pebble::pem_cert(&saved).as_ref(), r.info.leaf.as_slice(), "the served certificate is the saved one");
    assert!(entry.join("privkey.pem").exists());
    assert!(r.info.chain_len >= 2, "the chain includes Pebble's intermediate");
    // The webhook's TXT record is cleared once the order is done.
    let removed = format!("Removed DNS-01 TXT challenge for Host \"_acme-challenge.{SANDBOX}.\"");
    let cleared = eventually(Duration::from_secs(10), || async { ca.pebble.challtestsrv_log().contains(&removed).then_some(()) }).await;
    assert!(cleared.is_some(), "{removed}\n{}", ca.pebble.challtestsrv_log());

    // The control API: managed and valid (the state may trail the first handshake).
    let valid = eventually(Duration::from_secs(10), || async {
        let c = certificates(&edge).await;
        (managed(&c, &wildcard)?["state"] == "valid").then_some(c)
    })
    .await;
    let certs = match valid {
        Some(c) => c,
        None => panic!("{wildcard} never valid in /v1/certificates\n{}", ca.context(&edge).await),
    };
    assert_eq!(managed_names(&certs), vec![wildcard.clone()], "only the sandbox wildcard is managed here: {certs}");
    let m = managed(&certs, &wildcard).expect("managed");
    assert_eq!(m["challenge"], "dns-01", "{m}");
    assert_eq!(m["failures"], 0, "{m}");
    assert!(m["last_error"].is_null(), "{m}");
    assert!(m["last_success_at"].as_i64().is_some_and(|t| t >= started - 1 && t <= unix_now() + 1), "{m}");
    let listed = certs["certificates"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["entry"] == entry_name.as_str()).cloned())
        .unwrap_or_else(|| panic!("issued certificate not listed: {certs}"));
    assert_eq!(listed["names"], serde_json::json!([wildcard]), "{listed}");
    assert!(listed["issuer"].as_str().is_some_and(pebble_issued), "{listed}");
    assert_eq!(listed["not_after"], miosa_edge::schema::Timestamp(cert.not_after).to_rfc3339(), "{listed}");
    assert_eq!((listed["source"].as_str(), listed["last_error"].as_str()), (Some("acme"), None), "{listed}");
    assert!(listed["renew_after"].as_str().is_some_and(|t| t < listed["not_after"].as_str().unwrap_or_default()), "{listed}");
    for k in ["orders_per_3h", "certs_per_domain_per_week", "failures_per_host_per_hour", "duplicates_per_week"] {
        assert!(certs["budget"][k].as_u64().is_some_and(|v| v > 0), "budget.{k}: {certs}");
    }

    // Metrics.
    let text = metrics(&edge).await;
    assert!(metric(&text, "miosa_edge_acme_orders_total", "result=\"success\"").is_some_and(|v| v >= 1.0), "{text}");
    assert_eq!(
        metric(&text, "miosa_edge_certificate_expiry_seconds", &format!("cert=\"{entry_name}\"")).map(|v| v as i64),
        Some(cert.not_after),
        "{text}"
    );
    assert!(metric(&text, "miosa_edge_acme_budget_remaining", "limit=\"").is_some(), "{text}");
}

#[tokio::test]
async fn custom_domain_is_issued_by_http01_after_it_is_verified() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let app = Origin::start("app", "127.0.0.4").await;
    let ca = Ca::start(None).await;
    let domain = "custom.customer.test";
    // Room for the HTTP-01 order beside the two DNS-01 wildcards of this state.
    let acme_keys = "max_concurrent_orders = 4";
    let mut edge = ca.edge("", acme_keys, "", &routing(origin.addr.port(), Some((domain, false, app.addr)))).await;
    let pid = edge.child.id();

    let certs = certificates(&edge).await;
    assert!(managed(&certs, domain).is_none(), "an unverified domain is not managed: {certs}");

    // Verified by a config reload; no restart.
    edge.write_config(&ca.body(acme_keys, "", &routing(origin.addr.port(), Some((domain, true, app.addr)))));
    let r = ca.wait_issued(&edge, domain).await;
    let cert = r.info.cert();
    assert_eq!(cert.names, vec![domain.to_string()], "an exact-name certificate: {cert:?}");
    assert!(pebble_issued(&cert.issuer_cn), "{cert:?}");
    assert_eq!(r.response.status, 200, "{}", r.response.text());
    assert_eq!(r.response.json()["origin"], "app");
    assert!(ca.certs_dir.join(domain).join("fullchain.pem").exists(), "saved as certs_dir/{domain}");

    let certs = certificates(&edge).await;
    let m = managed(&certs, domain).unwrap_or_else(|| panic!("{domain} not managed: {certs}"));
    assert_eq!(m["challenge"], "http-01", "{m}");
    let apps =
        managed(&certs, &format!("*.one.{APPS}")).unwrap_or_else(|| panic!("a workspace with deployments gets its apps wildcard: {certs}"));
    assert_eq!(apps["challenge"], "dns-01", "{apps}");
    let valid =
        eventually(Duration::from_secs(10), || async { (managed(&certificates(&edge).await, domain)?["state"] == "valid").then_some(()) })
            .await;
    assert!(valid.is_some(), "{domain} valid\n{}", ca.context(&edge).await);

    assert_eq!(edge.child.id(), pid);
    assert!(edge.child.try_wait().expect("try_wait").is_none(), "the edge was not restarted");

    // The domain leaves the routing state: it is no longer renewed (not managed), the
    // ledger notes when it left, and its certificate goes once unused for 30 days (§9).
    edge.write_config(&ca.body(acme_keys, "", &routing(origin.addr.port(), Some((domain, false, app.addr)))));
    let ledger_path = edge.dir.path().join("var/acme/ledger.json");
    let left = eventually(Duration::from_secs(10), || async {
        let l: Value = serde_json::from_slice(&std::fs::read(&ledger_path).ok()?).ok()?;
        l["names"][domain]["left_at"].as_i64()
    })
    .await;
    let left = left.unwrap_or_else(|| {
        panic!("the ledger never noted that {domain} left: {}", std::fs::read_to_string(&ledger_path).unwrap_or_default())
    });
    assert!(managed(&certificates(&edge).await, domain).is_none(), "a name out of the state is not renewed");
    assert!(ca.certs_dir.join(domain).join("fullchain.pem").exists(), "kept while unused for less than 30 days");
    // Thirty days later (the ledger's clock moved back), at the next start:
    let mut l: Value = serde_json::from_slice(&std::fs::read(&ledger_path).expect("ledger")).expect("ledger json");
    l["names"][domain]["left_at"] = (left - 30 * 86_400).into();
    std::fs::write(&ledger_path, serde_json::to_vec(&l).expect("json")).expect("write ledger");
    edge.kill9_and_restart().await;
    let removed = eventually(Duration::from_secs(10), || async { (!ca.certs_dir.join(domain).exists()).then_some(()) }).await;
    assert!(removed.is_some(), "the certificate of a name unused for 30 days was not removed: {}", edge.log());
    // The index follows the removal (the sweep rescans right after it): the listing may
    // trail the files by a moment.
    let listed = |certs: &Value| {
        certs["certificates"].as_array().into_iter().flatten().any(|c| c["names"].as_array().is_some_and(|n| n.iter().any(|n| n == domain)))
    };
    let gone = eventually(Duration::from_secs(10), || async { (!listed(&certificates(&edge).await)).then_some(()) }).await;
    assert!(gone.is_some(), "no longer served: {}", certificates(&edge).await);
}

#[tokio::test]
async fn renewal_while_a_long_request_is_in_flight() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let ca = Ca::start(Some(30)).await;
    // The held stream must outlast the renewal: a long upstream read timeout, and no
    // duplicate-certificate budget in the way of renewing every 20 s.
    let edge =
        ca.edge("read_timeout_ms = 120000", "", "[acme.limits]\nduplicates_per_week = 1000\n", &routing(origin.addr.port(), None)).await;
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());
    let first = ca.wait_issued(&edge, &host).await.info.cert();
    assert!((25..=31).contains(&(first.not_after - first.not_before)), "Pebble issued with the short validity: {first:?}");

    // A long request through the current certificate.
    let (mut s, info) = tls_connect(edge.https(), &TlsOpts::verified(&host, ca.pebble.roots())).await.expect("handshake");
    let old = info.cert();
    let stream = origin.expect_stream();
    s.write_all(format!("GET /stream HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), stream.started).await.expect("stream never started").expect("started");
    let mut head = Vec::new();
    let got_first = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&head).contains("first-chunk;") {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed".to_string());
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    })
    .await;
    assert!(matches!(got_first, Ok(Ok(()))), "first chunk through TLS: {got_first:?} {:?}", String::from_utf8_lossy(&head));

    // Renewed at two thirds of the life: a fresh handshake gets a new serial.
    let renewed = eventually(ISSUE, || async {
        let (_, info) = tls_connect(edge.https(), &TlsOpts::verified(&host, ca.pebble.roots())).await.ok()?;
        let c = info.cert();
        (c.serial != old.serial).then_some(c)
    })
    .await;
    let renewed = match renewed {
        Some(c) => c,
        None => panic!("no renewed certificate within {ISSUE:?} (old {old:?})\n{}", ca.context(&edge).await),
    };
    assert_eq!(renewed.names, old.names);
    assert!(renewed.not_after > old.not_after, "{renewed:?} after {old:?}");

    // The long request was not cut by the swap.
    stream.release.send(()).expect("release");
    let rest = read_all(&mut s).await.expect("rest of the stream");
    head.extend_from_slice(&rest);
    let r = parse_response(&head);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(body.starts_with("first-chunk;") && body.contains("chunk-99;") && body.ends_with("end"), "complete body: {body}");

    let text = metrics(&edge).await;
    assert!(metric(&text, "miosa_edge_acme_orders_total", "result=\"success\"").is_some_and(|v| v >= 2.0), "{text}");
}

#[tokio::test]
async fn failing_challenge_backs_off_and_the_old_certificate_keeps_serving() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let app = Origin::start("app", "127.0.0.4").await;
    let ca = Ca::start(None).await;
    let domain = "bad.customer.test";
    // Pebble validates HTTP-01 where the edge does not listen.
    ca.pebble.challtestsrv("/add-a", &format!(r#"{{"host":"{domain}","addresses":["127.0.0.9"]}}"#)).await;
    // An old certificate past two thirds of its life: due for renewal.
    let old_ca = TestCa::new("miosa-edge old test CA");
    let now = time::OffsetDateTime::now_utc();
    let old = old_ca.issue_valid(&[domain], now - time::Duration::days(20), now + time::Duration::days(1));
    install_pair(&ca.certs_dir, domain, &old);

    let started = unix_now();
    // Room for the HTTP-01 order beside the two DNS-01 wildcards of this state.
    let edge = ca.edge("", "max_concurrent_orders = 4", "", &routing(origin.addr.port(), Some((domain, true, app.addr)))).await;
    let served = eventually(Duration::from_secs(5), || async {
        (served_cert(edge.https(), Some(domain)).await.ok()?.serial == old.serial).then_some(())
    })
    .await;
    assert!(served.is_some(), "the pre-placed certificate is served\n{}", ca.context(&edge).await);

    let entry = eventually(ISSUE, || async {
        let m = managed(&certificates(&edge).await, domain)?;
        (m["state"] == "backoff").then_some(m)
    })
    .await;
    let m = match entry {
        Some(m) => m,
        None => panic!("{domain} never in backoff\n{}", ca.context(&edge).await),
    };
    assert_eq!(m["challenge"], "http-01", "{m}");
    assert!(m["failures"].as_u64().is_some_and(|n| n >= 1), "{m}");
    assert!(m["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
    assert!(m["last_attempt_at"].as_i64().is_some_and(|t| t >= started - 1), "{m}");
    assert!(m["next_attempt_at"].as_i64().is_some_and(|t| t > unix_now()), "backed off into the future: {m}");
    assert!(m["last_success_at"].is_null(), "{m}");

    let text = metrics(&edge).await;
    assert!(metric(&text, "miosa_edge_acme_orders_total", "result=\"failure\"").is_some_and(|v| v >= 1.0), "{text}");

    // The old certificate keeps serving, untouched on disk.
    let r = tls_get(edge.https(), Some(domain), domain, "/", Some(old_ca.roots()), &[]).await.expect("the old certificate still verifies");
    assert_eq!(r.info.cert().serial, old.serial);
    assert_eq!(r.response.json()["origin"], "app");
    let on_disk = std::fs::read_to_string(ca.certs_dir.join(domain).join("fullchain.pem")).expect("fullchain");
    assert_eq!(on_disk, old.cert_pem);
}

#[tokio::test]
async fn unknown_names_get_the_default_certificate_after_issuance() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let app = Origin::start("app", "127.0.0.4").await;
    let ca = Ca::start(None).await;
    let domain = "app.customer.test";
    let edge = ca.edge("", "", "", &routing(origin.addr.port(), Some((domain, true, app.addr)))).await;
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());

    // Wait until the tenant's certificates are issued: sandbox wildcard (DNS-01), the
    // workspace's apps wildcard (DNS-01), the custom domain (HTTP-01).
    assert_eq!(ca.wait_issued(&edge, &host).await.response.json()["origin"], "sbx");
    assert_eq!(ca.wait_issued(&edge, domain).await.response.json()["origin"], "app");
    let r = ca.wait_issued(&edge, &format!("my-app.one.{APPS}")).await;
    assert_eq!(r.info.cert().names, vec![format!("*.one.{APPS}")]);
    assert_eq!(r.response.json()["origin"], "app");

    let default = served_cert(edge.https(), None).await.expect("no SNI");
    assert!(is_default(&default) && !pebble_issued(&default.issuer_cn), "no SNI gets the default: {default:?}");
    for sni in [
        "unknown.example.org".to_string(),
        format!("a.b.{SANDBOX}"),
        SANDBOX.to_string(),
        "customer.test".to_string(),
        "other.customer.test".to_string(),
        "x.app.customer.test".to_string(),
        format!("one.{APPS}"),
        format!("a.my-app.one.{APPS}"),
    ] {
        let sni = sni.as_str();
        let c = served_cert(edge.https(), Some(sni)).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(c.serial, default.serial, "{sni} gets the default, not {c:?}");
        let verified = tls_connect(edge.https(), &TlsOpts::verified(sni, ca.pebble.roots())).await;
        assert!(verified.is_err(), "{sni}: nothing Pebble issued verifies for it");
    }
}

#[tokio::test]
async fn tenant_domain_wildcard_through_cname_delegation() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let ca = Ca::start(None).await;
    let domain = "preview.tenant-one.test";
    let delegated = format!("ws_1.{ACME_ZONE}.");
    // The tenant's `_acme-challenge` CNAME into the platform's zone (CONTRACT §1).
    ca.pebble.challtestsrv("/set-cname", &format!(r#"{{"host":"_acme-challenge.{domain}.","target":"{delegated}"}}"#)).await;
    let ws = format!("preview_domain = {{ host = \"{domain}\", verified = true }}");
    let edge = ca.edge("", "", "", &routing_with(&ws, origin.addr.port(), None)).await;

    let host = format!("{}-abc12345.{domain}", origin.addr.port());
    let r = ca.wait_issued(&edge, &host).await;
    assert_eq!(r.info.cert().names, vec![format!("*.{domain}")], "{:?}", r.info.cert());
    assert_eq!(r.response.status, 200, "{}", r.response.text());
    assert_eq!(r.response.json()["origin"], "sbx");
    let m = managed(&certificates(&edge).await, &format!("*.{domain}")).expect("managed");
    assert_eq!(m["challenge"], "dns-01", "{m}");
    // The TXT record was written at the delegated name, not under the tenant's zone.
    let log = ca.pebble.challtestsrv_log();
    assert!(log.contains(&format!("TXT challenge for Host \"{delegated}\"")), "{log}");
    assert!(!log.contains(&format!("TXT challenge for Host \"_acme-challenge.{domain}.\"")), "{log}");
    assert!(ca.certs_dir.join(format!("_wildcard.{domain}")).join("fullchain.pem").exists());
}

/// `[acme]` reloads live (CONTRACT §10): added to a running edge, the ACME service starts
/// and the sandbox wildcard is issued; removed, the service stops and no name is managed
/// any more (the issued certificate keeps serving from certs_dir). Before, `[acme]` was
/// read at start only.
#[tokio::test]
async fn acme_section_reloads_live() {
    let origin = Origin::start("sbx", "127.0.0.2").await;
    let ca = Ca::start(None).await;
    let routing = routing(origin.addr.port(), None);
    let server = format!("http = \"127.0.0.1:{}\"\nhttps = \"127.0.0.1:0\"\n", ca.http_port);
    // The same [tls] and [dns] ([dns] is read at start), without [acme].
    let with = ca.body("", "", &routing);
    let without = format!("{}{routing}", with.split("[acme]").next().unwrap_or_default());
    assert!(without.contains("[dns]") && !without.contains("[acme"), "{without}");
    let edge = Edge::start_opts(&server, &[], &without).await;
    let host = format!("{}-abc12345.{SANDBOX}", origin.addr.port());
    assert!(is_default(&served_cert(edge.https(), Some(&host)).await.expect("handshake")));
    assert!(certificates(&edge).await.get("managed").is_none(), "no [acme] yet");

    edge.write_config(&with);
    let r = ca.wait_issued(&edge, &host).await;
    assert_eq!(r.info.cert().names, vec![format!("*.{SANDBOX}")]);
    assert_eq!(r.response.json()["origin"], "sbx");
    assert!(managed(&certificates(&edge).await, &format!("*.{SANDBOX}")).is_some());

    edge.write_config(&without);
    eventually(Duration::from_secs(10), || async { certificates(&edge).await.get("managed").is_none().then_some(()) })
        .await
        .unwrap_or_else(|| panic!("[acme] removed but still managing\n{}", log_tail(&edge.log(), 4000)));
    assert!(pebble_issued(&served_cert(edge.https(), Some(&host)).await.expect("handshake").issuer_cn));
    assert!(!edge.log().contains("takes effect on restart"), "{}", log_tail(&edge.log(), 4000));
}
