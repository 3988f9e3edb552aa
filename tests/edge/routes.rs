//! Every host class of CONTRACT §1 reaches the right origin; isolation; pages.

use crate::support::Edge;
use crate::Fixture;

#[tokio::test]
async fn every_host_class_reaches_its_origin() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let (pa, pb) = (f.pa(), f.pb());

    // 1. exact custom domain → deployment (round-robin over both instances)
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = edge.get("app.customer.test", "/x?y=1").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["path"], "/x?y=1");
        assert_eq!(j["headers"]["host"][0], "app.customer.test");
        seen.insert(j["origin"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["d1", "d2"]);

    // 2. platform sandbox preview → that port of that sandbox
    let r = edge.get(&format!("{pa}-abc12345.sandbox.localhost"), "/").await;
    assert_eq!(r.json()["origin"], "a-public");
    assert_eq!(r.header("x-robots-tag"), Some("noindex"));
    let r = edge.get(&format!("{pb}-zzz99.sandbox.localhost"), "/").await;
    assert_eq!(r.json()["origin"], "b-public");

    // 3. platform app URL
    let r = edge.get("my-app.one.apps.localhost", "/").await;
    assert!(r.json()["origin"].as_str().unwrap_or_default().starts_with('d'));
    assert_eq!(r.header("x-robots-tag"), None, "deployments are indexable");

    // 4. tenant preview domain
    let r = edge.get(&format!("{pa}-abc12345.preview.tenant-one.test"), "/").await;
    assert_eq!(r.json()["origin"], "a-public");
    assert_eq!(r.json()["headers"]["host"][0], format!("{pa}-abc12345.preview.tenant-one.test"));

    // 5. tenant deploy domain
    let r = edge.get("my-app.apps.tenant-one.test", "/").await;
    assert!(r.json()["origin"].as_str().unwrap_or_default().starts_with('d'));

    // 6. anything else
    let r = edge.get("example.org", "/").await;
    assert_eq!((r.status, r.code()), (404, "unknown_host".into()));
}

#[tokio::test]
async fn tenant_isolation_and_not_found_pages() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let pb = f.pb();

    // zzz99 belongs to ws_2: not through ws_1's preview domain, HTML or JSON.
    let r = edge.get(&format!("{pb}-zzz99.preview.tenant-one.test"), "/").await;
    assert_eq!((r.status, r.code()), (404, "preview_not_found".into()));
    let html = edge.request(&format!("GET / HTTP/1.1\r\nHost: {pb}-zzz99.preview.tenant-one.test\r\nAccept: text/html,*/*\r\n")).await;
    assert_eq!(html.status, 404);
    assert!(html.header("content-type").unwrap_or_default().starts_with("text/html"));
    let page = html.text();
    assert!(page.contains("#0a84ff") && page.contains("https://cdn.tenant-one.test/logo.png"), "tenant branding: {page}");
    assert!(!page.contains("MIOSA"), "a branded page never names the platform");
    assert!(page.contains("preview_not_found"));
    assert_eq!(html.header("cache-control"), Some("no-store"));
    assert!(html.header("content-security-policy").is_some_and(|c| c.contains("default-src 'none'")));
    assert_eq!(html.header("x-robots-tag"), Some("noindex"));
    assert_eq!(html.header("x-content-type-options"), Some("nosniff"));
    let rid = html.header("x-request-id").unwrap_or_default().to_string();
    assert!(!rid.is_empty() && page.contains(&rid), "the page shows the request id");

    // A tenant host of an unbranded workspace shows neither the platform nor ws_1.
    let r = edge.request("GET / HTTP/1.1\r\nHost: 1-nope.preview.tenant-two.test\r\nAccept: text/html\r\n").await;
    assert_eq!(r.status, 404);
    assert!(!r.text().contains("MIOSA") && !r.text().contains("#0a84ff"));

    // Unlisted port, unknown sandbox: 404 preview_not_found (JSON).
    let r = edge.get("1-abc12345.sandbox.localhost", "/").await;
    assert_eq!((r.status, r.code()), (404, "preview_not_found".into()));
    let r = edge.get("3000-nosuchbox.sandbox.localhost", "/").await;
    assert_eq!((r.status, r.code()), (404, "preview_not_found".into()));
    assert_eq!(r.json()["error"]["status"], 404);

    // Unknown host, platform branding as HTML.
    let r = edge.request("GET / HTTP/1.1\r\nHost: nothing.example\r\nAccept: text/html\r\n").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("MIOSA") && r.text().contains("unknown_host"));
    assert!(r.text().contains("https://miosa.example/support"));

    // Unverified domains: 421, branded.
    let r = edge.get("new.customer.test", "/").await;
    assert_eq!((r.status, r.code()), (421, "domain_not_verified".into()));
    let r = edge.get("my-app.apps.tenant-two.test", "/").await;
    assert_eq!((r.status, r.code()), (421, "domain_not_verified".into()));
}

#[tokio::test]
async fn access_state_and_release_answers() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let pp = f.a_private.addr.port();

    // Private previews are closed without a credential; no byte reaches the sandbox.
    let r = edge.get(&format!("{pp}-abc12345.sandbox.localhost"), "/").await;
    assert_eq!((r.status, r.code()), (401, "preview_auth_required".into()));

    // Suspended sandbox: 503 with Retry-After; the HTML page retries by itself.
    let r = edge.get(&format!("{}-sleepy.sandbox.localhost", f.pb()), "/").await;
    assert_eq!((r.status, r.code()), (503, "sandbox_starting".into()));
    assert!(r.header("retry-after").is_some());
    let r = edge.request(&format!("GET / HTTP/1.1\r\nHost: {}-sleepy.sandbox.localhost\r\nAccept: text/html\r\n", f.pb())).await;
    assert!(r.text().contains("http-equiv=\"refresh\""));

    // Nothing listening on a listed port: 502 with the diagnosis.
    let host = format!("{}-abc12345.sandbox.localhost", f.a_dead_port);
    let r = edge.get(&host, "/").await;
    assert_eq!((r.status, r.code()), (502, "sandbox_unavailable".into()));
    let r = edge.request(&format!("GET / HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n")).await;
    let page = r.text();
    assert!(page.contains(&format!("nothing is listening on port <strong>{}</strong>", f.a_dead_port)), "{page}");
    assert!(page.contains("0.0.0.0") && page.contains("127.0.0.1"));
    assert!(r.header("x-request-id").is_some_and(|id| page.contains(id)));
}

#[tokio::test]
async fn deployment_survives_a_dead_instance_and_rolls_back_by_pointer() {
    let f = Fixture::start().await;
    let dead = crate::support::closed_port("127.0.0.4");
    let extra = format!(
        r#"[[deployments]]
id = "dep_2"
workspace = "ws_1"
name = "half"
active_version = "v1"

[[deployments.versions]]
id = "v1"
release = {{ kind = "dynamic", instances = ["127.0.0.4:{dead}", "{d1}"] }}
"#,
        d1 = f.d1.addr
    );
    let edge = Edge::start(&f.toml(&extra)).await;
    // Half the picks hit the dead instance first; a failed connect is retried once on
    // the other instance, so no request fails.
    for _ in 0..6 {
        let r = edge.get("half.one.apps.localhost", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["origin"], "d1");
    }
    // The active version of dep_1 in the fixture could be the static v1: then the
    // edge answers release_unavailable until static serving exists.
    edge.write_config(&f.toml(&extra).replace("active_version = \"v2\"", "active_version = \"v1\""));
    edge.hup();
    let r = crate::support::eventually(std::time::Duration::from_secs(10), || async {
        let r = edge.get("app.customer.test", "/").await;
        (r.status == 503).then_some(r)
    })
    .await
    .expect("rollback applied");
    assert_eq!(r.code(), "release_unavailable");
}
