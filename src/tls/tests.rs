use super::default_cert::generate;
use super::store::{parse_pair, CertStore, DirStore, Watcher};
use super::*;
use crate::metrics::Metrics;

fn cert(source: &str, names: &[&str]) -> Arc<Cert> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let (chain, key) = generate(&names).expect("generate");
    Arc::new(parse_pair(source, chain.as_bytes(), key.as_bytes()).expect("parse"))
}

#[test]
fn exact_then_one_label_wildcard_then_default() {
    let default = cert("default", &["localhost"]);
    let wild = cert("wild", &["*.sandbox.test"]);
    let exact = cert("exact", &["app.customer.test", "www.customer.test"]);
    let idx = CertIndex::new(default.clone(), vec![wild.clone(), exact.clone()]);
    assert_eq!(idx.resolve(Some("5173-abc.sandbox.test")).source, "wild");
    assert_eq!(idx.resolve(Some("5173-ABC.Sandbox.TEST")).source, "wild");
    assert_eq!(idx.resolve(Some("www.customer.test")).source, "exact");
    // a wildcard covers one label only
    assert_eq!(idx.resolve(Some("a.b.sandbox.test")).source, "default");
    assert_eq!(idx.resolve(Some("sandbox.test")).source, "default");
    assert_eq!(idx.resolve(Some(".sandbox.test")).source, "default");
    assert_eq!(idx.resolve(Some("unknown.test")).source, "default");
    assert_eq!(idx.resolve(None).source, "default");
    assert_eq!(idx.covering("*.sandbox.test").map(|c| c.source.as_str()), Some("wild"));
    assert!(idx.covering("*.customer.test").is_none());
    assert!(idx.covering("nothing.test").is_none());
}

#[test]
fn parse_reads_names_validity_and_refuses_mismatched_pairs() {
    let names = vec!["*.Sandbox.test".to_string(), "sandbox.test".to_string()];
    let (chain, key) = generate(&names).unwrap();
    let c = parse_pair("x", chain.as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(c.names, vec!["*.sandbox.test", "sandbox.test"]);
    assert!(c.not_after > c.not_before);
    assert!(c.renew_at() > c.not_before && c.renew_at() < c.not_after);
    assert!(c.covers("a.sandbox.test") && c.covers("sandbox.test") && !c.covers("a.b.sandbox.test"));
    let (_, other_key) = generate(&names).unwrap();
    let e = parse_pair("x", chain.as_bytes(), other_key.as_bytes()).unwrap_err();
    assert!(e.contains("key"), "{e}");
    assert!(parse_pair("x", b"not pem", key.as_bytes()).is_err());
    assert!(parse_pair("x", chain.as_bytes(), b"").is_err());
}

#[test]
fn watcher_picks_up_changes_and_keeps_the_previous_pair_when_a_new_one_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CertStore> = Arc::new(DirStore::open(dir.path()).unwrap());
    let w = Watcher::new(store.clone(), cert("default", &["localhost"]), Arc::new(Metrics::new()));
    assert!(!w.scan());
    let (c1, k1) = generate(&["app.customer.test".to_string()]).unwrap();
    store.save("app", c1.as_bytes(), k1.as_bytes()).unwrap();
    assert!(w.scan());
    let first = w.index().load().resolve(Some("app.customer.test")).clone();
    assert_eq!(first.source, "app");
    // a broken replacement: reported, the previous certificate keeps serving
    std::fs::write(dir.path().join("app/fullchain.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    w.scan();
    assert!(Arc::ptr_eq(w.index().load().resolve(Some("app.customer.test")), &first));
    assert_eq!(w.errors().len(), 1);
    // a good replacement is served on the next scan
    let (c2, k2) = generate(&["app.customer.test".to_string()]).unwrap();
    store.save("app", c2.as_bytes(), k2.as_bytes()).unwrap();
    assert!(w.scan());
    let second = w.index().load().resolve(Some("app.customer.test")).clone();
    assert!(!Arc::ptr_eq(&second, &first));
    assert!(w.errors().is_empty());
    // removed from the store: no longer served
    std::fs::remove_dir_all(dir.path().join("app")).unwrap();
    assert!(w.scan());
    assert_eq!(w.index().load().resolve(Some("app.customer.test")).source, "default");
}

#[test]
fn store_refuses_entry_names_that_are_paths() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).unwrap();
    for bad in ["../x", "a/b", ".hidden", "", "*.x"] {
        assert!(store.save(bad, b"x", b"y").is_err(), "{bad}");
    }
}
