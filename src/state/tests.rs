use super::*;

fn domains() -> Domains {
    Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").unwrap()
}

fn sample() -> State {
    serde_json::from_str(
        r##"{
      "workspaces": [{"id": "ws_1", "slug": "my-workspace",
        "preview_domain": {"host": "preview.yourproduct.com", "verified": true},
        "deploy_domain": {"host": "apps.yourplatform.com", "verified": true},
        "branding": {"logo_url": "https://cdn.yourproduct.com/logo.png", "accent_color": "#0a84ff", "support_url": "https://yourproduct.com/help"}}],
      "sandboxes": [{"id": "abc12345", "workspace": "ws_1", "address": "10.0.3.7", "state": "running",
        "previews": [{"port": 5173, "access": "private"}, {"port": 3000, "access": "public"}]}],
      "share_tokens": [{"id": "sh_1", "token_sha256": "0000000000000000000000000000000000000000000000000000000000000000",
        "sandbox": "abc12345", "port": 5173, "expires_at": "2026-12-01T00:00:00Z",
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"}],
      "deployments": [{"id": "dep_1", "workspace": "ws_1", "name": "my-app",
        "domains": [{"host": "app.customer.com", "verified": true}], "active_version": "v17",
        "versions": [
          {"id": "v17", "release": {"kind": "dynamic", "instances": ["10.0.4.1:8080", "10.0.4.2:8080"], "health_check": {"path": "/healthz", "interval_ms": 5000}}},
          {"id": "v16", "release": {"kind": "static", "sha256": "1111111111111111111111111111111111111111111111111111111111111111", "spa": true}}]}]
    }"##,
    )
    .unwrap()
}

fn paths(r: Result<(), Vec<StateError>>) -> Vec<String> {
    r.err().unwrap_or_default().into_iter().map(|e| e.path).collect()
}

#[test]
fn contract_example_is_valid_and_round_trips() {
    let s = sample();
    validate(&s, &domains()).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: State = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn unknown_fields_and_bad_values_are_rejected() {
    let e = serde_json::from_str::<State>(r#"{"sandboxes":[{"id":"a","workspace":"w","address":"10.0.0.1","colour":"red"}]}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    let e = serde_json::from_str::<State>(r#"{"sandboxes":[{"id":"a","workspace":"w","address":"10.0.3"}]}"#).unwrap_err();
    assert!(e.to_string().contains("is not an IP address"), "{e}");
    let e =
        serde_json::from_str::<State>(r#"{"sandboxes":[{"id":"a","workspace":"w","address":"10.0.0.1","state":"asleep"}]}"#).unwrap_err();
    assert!(e.to_string().contains("unknown variant"), "{e}");
    let e = serde_json::from_str::<State>(
        r#"{"deployments":[{"id":"d","workspace":"w","name":"n","active_version":"v","versions":[{"id":"v","release":{"kind":"static","sha256":"00","extra":1}}]}]}"#,
    )
    .unwrap_err();
    assert!(!e.to_string().is_empty());
}

#[test]
fn dangling_references_name_their_path() {
    let mut s = sample();
    s.sandboxes[0].workspace = WorkspaceId::try_from("ws_nope").unwrap();
    s.deployments[0].active_version = Id::try_from("v99").unwrap();
    s.share_tokens[0].port = Some(Port(4000));
    let p = paths(validate(&s, &domains()));
    assert_eq!(p, vec!["sandboxes[0].workspace", "share_tokens[0].port", "deployments[0].active_version"]);
}

#[test]
fn duplicate_ids_and_hosts() {
    let mut s = sample();
    s.sandboxes.push(s.sandboxes[0].clone());
    let mut d = s.deployments[0].clone();
    d.id = Id::try_from("dep_2").unwrap();
    d.name = Label::try_from("other").unwrap();
    d.domains[0].host = Host::try_from("preview.yourproduct.com").unwrap();
    s.deployments.push(d);
    let p = paths(validate(&s, &domains()));
    assert_eq!(p, vec!["sandboxes[1].id", "deployments[1].domains[0].host"]);
}

#[test]
fn hosts_may_not_shadow_platform_routes() {
    let mut s = sample();
    for (h, bad) in [
        ("5173-other.sandbox.miosa.app", true),
        ("x.other-ws.miosa.app", true),
        ("miosa.app", true),
        ("www.miosa.app", false),
        ("shop.example.org", false),
    ] {
        s.deployments[0].domains[0].host = Host::try_from(h).unwrap();
        assert_eq!(validate(&s, &domains()).is_err(), bad, "{h}");
    }
    let mut s = sample();
    s.workspaces[0].preview_domain.as_mut().unwrap().host = Host::try_from("preview.miosa.app").unwrap();
    assert_eq!(paths(validate(&s, &domains())), vec!["workspaces[0].preview_domain.host"]);
    let mut s = sample();
    s.workspaces[0].slug = Label::try_from("sandbox").unwrap();
    assert_eq!(paths(validate(&s, &domains())), vec!["workspaces[0].slug"]);
}

#[test]
fn custom_domain_under_another_tenants_domain_is_refused() {
    let mut s = sample();
    s.workspaces.push(Workspace {
        id: WorkspaceId::try_from("ws_2").unwrap(),
        slug: Label::try_from("two").unwrap(),
        preview_domain: None,
        deploy_domain: None,
        branding: None,
    });
    s.deployments[0].workspace = WorkspaceId::try_from("ws_2").unwrap();
    s.deployments[0].domains[0].host = Host::try_from("steal.preview.yourproduct.com").unwrap();
    assert_eq!(paths(validate(&s, &domains())), vec!["deployments[0].domains[0].host"]);
}

#[test]
fn toml_datetime_is_accepted_for_expires_at() {
    let t: ShareToken = toml::from_str(
        "id = \"sh\"\ntoken_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nsandbox = \"abc\"\nexpires_at = 2026-12-01T00:00:00Z\n",
    )
    .unwrap();
    assert_eq!(t.expires_at, Some(Timestamp(1_796_083_200)));
}

#[test]
fn buckets_claim_aliases_store_names_and_hosts_once() {
    let mut s = sample();
    let bucket = |id: &str, name: &str, alias: &str, host: &str| -> Bucket {
        serde_json::from_value(serde_json::json!({
            "id": id, "workspace": "ws_1", "bucket": name, "alias": alias,
            "domains": [{"host": host, "verified": true}]
        }))
        .unwrap()
    };
    s.buckets.push(bucket("bk_1", "miosa-proj_xxx-uploads", "proj-xxx", "assets.customer.com"));
    validate(&s, &domains()).unwrap();
    // Same alias, same store bucket, a host a deployment claims, a host in the storage zone.
    s.buckets.push(bucket("bk_2", "miosa-proj_xxx-uploads", "proj-xxx", "app.customer.com"));
    s.buckets.push(bucket("bk_3", "other", "other", "x.storage.miosa.app"));
    let p = paths(validate(&s, &domains()));
    assert_eq!(p, vec!["buckets[1].alias", "buckets[1].bucket", "buckets[1].domains[0].host", "buckets[2].domains[0].host"]);
    // A dangling workspace; a bucket name no store allows.
    let mut s = sample();
    let mut b = bucket("bk_1", "n", "a", "f.example.com");
    b.workspace = WorkspaceId::try_from("ws_9").unwrap();
    s.buckets.push(b);
    assert_eq!(paths(validate(&s, &domains())), vec!["buckets[0].workspace"]);
    let e = serde_json::from_str::<Bucket>(r#"{"id":"b","workspace":"w","bucket":"a/b","alias":"a"}"#).unwrap_err();
    assert!(e.to_string().contains("not allowed in a bucket name"), "{e}");
    let e = serde_json::from_str::<Bucket>(r#"{"id":"b","workspace":"w","bucket":"ok","alias":"Not_A_Label"}"#).unwrap_err();
    assert!(e.to_string().contains("only lower-case letters"), "{e}");
}
