use super::*;
use crate::schema::{Domains, PlatformBranding};

fn domains() -> Domains {
    Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").unwrap()
}

fn table() -> RouteTable {
    let s: State = toml::from_str(
        r##"
[[workspaces]]
id = "ws_1"
slug = "my-workspace"
preview_domain = { host = "preview.yourproduct.com", verified = true }
deploy_domain = { host = "apps.yourplatform.com", verified = true }
branding = { accent_color = "#0a84ff" }

[[workspaces]]
id = "ws_2"
slug = "other"
preview_domain = { host = "preview.unverified.com", verified = false }

[[sandboxes]]
id = "abc12345"
workspace = "ws_1"
address = "10.0.3.7"
previews = [{ port = 5173 }, { port = 3000, access = "public" }]

[[sandboxes]]
id = "zzz"
workspace = "ws_2"
address = "10.0.3.8"
previews = [{ port = 3000, access = "public" }]

[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "my-app"
domains = [{ host = "app.customer.com", verified = true }, { host = "new.customer.com" }]
active_version = "v17"
versions = [{ id = "v17", release = { kind = "dynamic", instances = ["10.0.4.1:8080", "10.0.4.2:8080"] } }]

[[buckets]]
id = "bk_1"
workspace = "ws_1"
bucket = "miosa-proj_xxx-uploads"
alias = "proj-xxx"
domains = [{ host = "assets.customer.com", verified = true }, { host = "cdn.customer.com" }]
"##,
    )
    .unwrap();
    RouteTable::build(&domains(), &PlatformBranding::default(), &s, 7).unwrap()
}

fn preview(t: &RouteTable, host: &str) -> Option<(String, u16, bool)> {
    match t.lookup(host) {
        Route::Preview { sandbox_id, port, tenant_host, .. } => Some((sandbox_id.to_string(), port, tenant_host)),
        _ => None,
    }
}

fn denied(t: &RouteTable, host: &str) -> Option<ErrorCode> {
    match t.lookup(host) {
        Route::Denied { code, .. } => Some(code),
        _ => None,
    }
}

fn deployment(t: &RouteTable, host: &str) -> Option<String> {
    match t.lookup(host) {
        Route::Deployment { deployment, .. } => Some(deployment.id.to_string()),
        _ => None,
    }
}

#[test]
fn every_host_class() {
    let t = table();
    assert_eq!(deployment(&t, "app.customer.com").as_deref(), Some("dep_1"));
    assert_eq!(preview(&t, "5173-abc12345.sandbox.miosa.app"), Some(("abc12345".into(), 5173, false)));
    assert_eq!(deployment(&t, "my-app.my-workspace.miosa.app").as_deref(), Some("dep_1"));
    assert_eq!(preview(&t, "3000-abc12345.preview.yourproduct.com"), Some(("abc12345".into(), 3000, true)));
    assert_eq!(deployment(&t, "my-app.apps.yourplatform.com").as_deref(), Some("dep_1"));
    assert_eq!(denied(&t, "example.com"), Some(ErrorCode::UnknownHost));
}

#[test]
fn not_found_cases() {
    let t = table();
    assert_eq!(denied(&t, "8080-abc12345.sandbox.miosa.app"), Some(ErrorCode::PreviewNotFound));
    assert_eq!(denied(&t, "5173-nosuch.sandbox.miosa.app"), Some(ErrorCode::PreviewNotFound));
    assert_eq!(denied(&t, "nope.my-workspace.miosa.app"), Some(ErrorCode::UnknownHost));
    assert_eq!(denied(&t, "nope.apps.yourplatform.com"), Some(ErrorCode::UnknownHost));
    // Malformed port labels are not previews at all.
    for h in [
        "05173-abc12345.sandbox.miosa.app",
        "0-abc12345.sandbox.miosa.app",
        "65536-abc12345.sandbox.miosa.app",
        "abc12345.sandbox.miosa.app",
        "5173-.sandbox.miosa.app",
        "a.b.sandbox.miosa.app",
    ] {
        assert_eq!(denied(&t, h), Some(ErrorCode::UnknownHost), "{h}");
    }
    assert_eq!(denied(&t, "sandbox.miosa.app"), Some(ErrorCode::UnknownHost));
    assert_eq!(denied(&t, "10.0.3.7"), Some(ErrorCode::UnknownHost));
}

#[test]
fn tenant_isolation() {
    let t = table();
    // zzz belongs to ws_2: not reachable through ws_1's preview domain.
    assert_eq!(denied(&t, "3000-zzz.preview.yourproduct.com"), Some(ErrorCode::PreviewNotFound));
    assert!(preview(&t, "3000-zzz.sandbox.miosa.app").is_some());
    match t.lookup("3000-zzz.preview.yourproduct.com") {
        Route::Denied { workspace, branding, .. } => {
            assert_eq!(workspace, Some(0), "the page is ws_1's");
            assert_ne!(branding, Pages::PLATFORM, "a tenant host never shows the platform branding");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unverified_domains() {
    let t = table();
    assert_eq!(denied(&t, "new.customer.com"), Some(ErrorCode::DomainNotVerified));
    assert_eq!(denied(&t, "3000-zzz.preview.unverified.com"), Some(ErrorCode::DomainNotVerified));
}

#[test]
fn retry_skips_the_instance_that_failed() {
    let t = table();
    let Route::Deployment { deployment, .. } = t.lookup("app.customer.com") else { panic!() };
    let a = deployment.pick_instance(None, 0).unwrap().addr;
    for _ in 0..8 {
        assert_ne!(deployment.pick_instance(Some(a), 0).map(|i| i.addr), Some(a));
    }
}

#[test]
fn port_labels() {
    assert_eq!(split_port_label("5173-abc"), Some((5173, "abc")));
    assert_eq!(split_port_label("1-a-b"), Some((1, "a-b")));
    assert_eq!(split_port_label("65535-x"), Some((65535, "x")));
    for bad in ["0-x", "01-x", "65536-x", "-x", "5173", "5173-", "+5-x", "99999999999-x", "123456-x", "1a-x", "é-x"] {
        assert_eq!(split_port_label(bad), None, "{bad}");
    }
    // The byte-by-byte reading answers as the plain definition does, for every label made
    // of these pieces (digits, `-`, letters, a multi-byte character).
    fn reference(label: &str) -> Option<(u16, &str)> {
        let (port, id) = label.split_once('-')?;
        if id.is_empty() || port.is_empty() || port.len() > 5 || port.starts_with('0') || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        u16::try_from(port.parse::<u32>().ok()?).ok().filter(|&p| p > 0).map(|p| (p, id))
    }
    let pieces = ["", "0", "1", "9", "65", "535", "65536", "99999", "-", "--", "a", "é"];
    let mut n = 0;
    for a in pieces {
        for b in pieces {
            for c in pieces {
                for d in pieces {
                    let label = format!("{a}{b}{c}{d}");
                    assert_eq!(split_port_label(&label), reference(&label), "{label:?}");
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 12 * 12 * 12 * 12);
}

#[test]
fn host_normalisation() {
    let mut b = [0u8; 256];
    assert_eq!(normalize_host(b"5173-ABC.Sandbox.MIOSA.app:8080", &mut b), Some("5173-abc.sandbox.miosa.app"));
    assert_eq!(normalize_host(b"app.customer.com.", &mut b), Some("app.customer.com"));
    assert_eq!(normalize_host(b"app.customer.com.:443", &mut b), Some("app.customer.com"));
    assert_eq!(normalize_host(b"[::1]:8080", &mut b), Some("[::1]"));
    assert_eq!(normalize_host(b"xn--bcher-kva.example", &mut b), Some("xn--bcher-kva.example"));
    for bad in [&b""[..], b":8080", b"a b", b"a@b", b"host:port", b"a/b", "bücher.example".as_bytes(), b"a:123456", &[b'a'; 300]] {
        assert_eq!(normalize_host(bad, &mut b), None, "{:?}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn lookups_are_deterministic_across_swaps() {
    let shared: SharedTable = Arc::new(ArcSwap::from_pointee(table()));
    let before = shared.load_full();
    publish(&shared, RouteTable::empty(&domains(), &PlatformBranding::default()));
    // The old snapshot still answers as before; new loads see the new table.
    assert!(preview(&before, "3000-abc12345.sandbox.miosa.app").is_some());
    assert_eq!(denied(&shared.load(), "3000-abc12345.sandbox.miosa.app"), Some(ErrorCode::PreviewNotFound));
}

/// xorshift64*: a deterministic stream of pseudo-random numbers for fuzz-style tests.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn hostile_hosts_never_panic_and_stay_in_bounds() {
    let t = table();
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"abcxyz0123456789-.:[]_@ /\\\0\xff\xc3\xa9AZ%";
    for _ in 0..200_000 {
        let len = (next() % 300) as usize;
        let raw: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
        let mut buf = [0u8; 256];
        if let Some(h) = normalize_host(&raw, &mut buf) {
            assert!(h.len() <= 253 + 3 && h.bytes().all(|b| !b.is_ascii_uppercase()), "{h:?}");
            let _ = t.lookup(h);
        }
    }
    // Shapes close to real ones.
    for _ in 0..50_000 {
        let port = next() % 70_000;
        let host = format!(
            "{port}-abc{}.{}",
            next() % 3,
            ["sandbox.miosa.app", "preview.yourproduct.com", "miosa.app", "x.y"][(next() % 4) as usize]
        );
        let mut buf = [0u8; 256];
        if let Some(h) = normalize_host(host.as_bytes(), &mut buf) {
            let _ = t.lookup(h);
        }
    }
}

mod instances {
    use super::super::*;
    use crate::schema::Balance;

    fn deployment(n: usize, balance: Balance, base_port: u16) -> DeploymentEntry {
        let instances: Box<[Instance]> = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("10.9.9.9:{}", base_port + i as u16).parse().unwrap();
                Instance { addr, health: crate::routing::instance::health_of(addr) }
            })
            .collect();
        DeploymentEntry {
            id: "d".into(),
            workspace: 0,
            name: "d".into(),
            active_version: "v".into(),
            release: ActiveRelease::Dynamic { instances, next: AtomicUsize::new(0), balance, health_check: None },
        }
    }

    fn counts(d: &DeploymentEntry, picks: usize, skip: Option<SocketAddr>) -> Vec<usize> {
        let ActiveRelease::Dynamic { instances, .. } = &d.release else { unreachable!() };
        let mut c = vec![0; instances.len()];
        for _ in 0..picks {
            if let Some(p) = d.pick_instance(skip, 0) {
                c[instances.iter().position(|i| i.addr == p.addr).unwrap()] += 1;
            }
        }
        c
    }

    #[test]
    fn least_loaded_avoids_the_busy_instance_and_round_robin_does_not() {
        let d = deployment(3, Balance::LeastLoaded, 20_000);
        let ActiveRelease::Dynamic { instances, .. } = &d.release else { unreachable!() };
        let busy: Vec<_> = (0..50).map(|_| instances[0].health.start()).collect();
        let c = counts(&d, 3000, None);
        // the busy one only wins when both candidates are it (never: candidates are distinct)
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 1000 && c[2] > 1000, "{c:?}");
        drop(busy);
        assert_eq!(instances[0].health.outstanding(), 0);
        let c = counts(&d, 3000, None);
        assert!(c.iter().all(|n| *n > 700), "unloaded: spread over all {c:?}");

        let rr = deployment(3, Balance::RoundRobin, 20_100);
        let ActiveRelease::Dynamic { instances, .. } = &rr.release else { unreachable!() };
        let _busy: Vec<_> = (0..50).map(|_| instances[0].health.start()).collect();
        assert_eq!(counts(&rr, 3000, None), vec![1000, 1000, 1000]);
    }

    #[test]
    fn ejected_and_unhealthy_instances_are_skipped_until_none_is_left() {
        let d = deployment(3, Balance::LeastLoaded, 20_200);
        let ActiveRelease::Dynamic { instances, .. } = &d.release else { unreachable!() };
        instances[1].health.passive_failure();
        let c = counts(&d, 1000, None);
        assert_eq!(c[1], 0, "ejected: {c:?}");
        // skip (the instance that just failed) is honoured while another is available
        let c = counts(&d, 1000, Some(instances[0].addr));
        assert_eq!((c[0], c[1]), (0, 0), "{c:?}");
        assert_eq!(c[2], 1000);
        // all ejected after request failures: still tried rather than refusing everything
        instances[0].health.passive_failure();
        instances[2].health.passive_failure();
        assert!(d.pick_instance(None, 0).is_some());
        // a recovered response ends the failure run (ejection itself expires with time)
        instances[1].health.passive_success();
    }
}

#[test]
fn storage_hosts_route_to_buckets_and_the_endpoint() {
    let t = table();
    for (host, tenant) in [("proj-xxx.storage.miosa.app", false), ("assets.customer.com", true)] {
        match t.lookup(host) {
            Route::Bucket { bucket, tenant_host } => {
                assert_eq!((&*bucket.id, &*bucket.bucket, bucket.public, tenant_host), ("bk_1", "miosa-proj_xxx-uploads", false, tenant))
            }
            other => panic!("{host}: {other:?}"),
        }
    }
    assert!(matches!(t.lookup("storage.miosa.app"), Route::StorageEndpoint));
    assert_eq!(denied(&t, "nope.storage.miosa.app"), Some(ErrorCode::UnknownHost));
    assert_eq!(denied(&t, "a.proj-xxx.storage.miosa.app"), Some(ErrorCode::UnknownHost));
    assert_eq!(denied(&t, "cdn.customer.com"), Some(ErrorCode::DomainNotVerified));
    assert_eq!(t.bucket_named("miosa-proj_xxx-uploads").map(|b| &*b.id), Some("bk_1"));
    assert!(t.bucket_named("proj-xxx").is_none(), "the store's name, not the alias");
    assert_eq!(t.bucket_count(), 1);
}

#[test]
fn bucket_writes_move_aliases_and_domains() {
    let t = table();
    let mut index = Index::build(domains(), &State::default(), &State::default()).unwrap();
    let s: State = toml::from_str(
        r#"
[[workspaces]]
id = "ws_1"
slug = "a"
[[buckets]]
id = "bk_1"
workspace = "ws_1"
bucket = "b1"
alias = "one"
domains = [{ host = "files.example.com", verified = true }]
"#,
    )
    .unwrap();
    let mut ops = Vec::new();
    crate::state::index::push_state(&mut ops, &s, crate::state::Origin::Api, "");
    let plan = index.check(ops).unwrap();
    let applied = index.commit(plan);
    let t1 = t.apply(&applied, index.objects(), 8);
    assert!(matches!(t1.lookup("one.storage.miosa.app"), Route::Bucket { .. }));
    assert!(matches!(t1.lookup("files.example.com"), Route::Bucket { .. }));
    // Renamed alias, domain dropped, made public: the old names stop routing.
    let mut b = s.buckets[0].clone();
    b.alias = "two".try_into().unwrap();
    b.domains.clear();
    b.public = true;
    let op = crate::state::BatchOp {
        path: String::new(),
        origin: crate::state::Origin::Api,
        op: crate::state::Op::Upsert(crate::schema::Object::Bucket(b)),
    };
    let applied = index.commit(index.check(vec![op]).unwrap());
    let t2 = t1.apply(&applied, index.objects(), 9);
    assert_eq!(denied(&t2, "one.storage.miosa.app"), Some(ErrorCode::UnknownHost));
    assert_eq!(denied(&t2, "files.example.com"), Some(ErrorCode::UnknownHost));
    match t2.lookup("two.storage.miosa.app") {
        Route::Bucket { bucket, .. } => assert!(bucket.public),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hosts_and_aliases_move_between_objects_in_one_batch_in_any_order() {
    let base: State = toml::from_str(
        r#"
[[workspaces]]
id = "ws_1"
slug = "a"
[[deployments]]
id = "dep_a"
workspace = "ws_1"
name = "one"
domains = [{ host = "shop.example.com", verified = true }]
active_version = "v"
versions = [{ id = "v", release = { kind = "dynamic", instances = ["10.0.0.1:80"] } }]
[[deployments]]
id = "dep_b"
workspace = "ws_1"
name = "two"
active_version = "v"
versions = [{ id = "v", release = { kind = "dynamic", instances = ["10.0.0.2:80"] } }]
[[buckets]]
id = "bk_a"
workspace = "ws_1"
bucket = "store-a"
alias = "files"
[[buckets]]
id = "bk_b"
workspace = "ws_1"
bucket = "store-b"
alias = "other"
"#,
    )
    .unwrap();
    for taker_first in [true, false] {
        let mut index = Index::build(domains(), &State::default(), &State::default()).unwrap();
        let mut ops = Vec::new();
        crate::state::index::push_state(&mut ops, &base, crate::state::Origin::Api, "");
        index.commit(index.check(ops).unwrap());
        let t = RouteTable::from_state(index.objects(), &domains(), &PlatformBranding::default(), 1);
        // dep_b takes shop.example.com from dep_a, bk_b takes alias `files` from bk_a.
        let (mut da, mut db) = (base.deployments[0].clone(), base.deployments[1].clone());
        db.domains = std::mem::take(&mut da.domains);
        let (mut ba, mut bb) = (base.buckets[0].clone(), base.buckets[1].clone());
        ba.alias = "spare".try_into().unwrap();
        bb.alias = "files".try_into().unwrap();
        use crate::schema::Object;
        let mut objs = vec![Object::Deployment(db), Object::Bucket(bb), Object::Deployment(da), Object::Bucket(ba)];
        if !taker_first {
            objs.reverse();
        }
        let ops = objs
            .into_iter()
            .map(|o| crate::state::BatchOp { path: String::new(), origin: crate::state::Origin::Api, op: crate::state::Op::Upsert(o) })
            .collect();
        let applied = index.commit(index.check(ops).unwrap());
        let t2 = t.apply(&applied, index.objects(), 2);
        match t2.lookup("shop.example.com") {
            Route::Deployment { deployment, .. } => assert_eq!(&*deployment.id, "dep_b", "taker first: {taker_first}"),
            other => panic!("taker first {taker_first}: {other:?}"),
        }
        match t2.lookup("files.storage.miosa.app") {
            Route::Bucket { bucket, .. } => assert_eq!(&*bucket.id, "bk_b", "taker first: {taker_first}"),
            other => panic!("taker first {taker_first}: {other:?}"),
        }
        assert!(matches!(t2.lookup("spare.storage.miosa.app"), Route::Bucket { .. }));
    }
}
