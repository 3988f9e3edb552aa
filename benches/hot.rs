//! Criterion benches of the request path's hot functions.
//!
//! `cargo bench --bench hot` — host lookup over 1M sandboxes + 100k custom domains
//! (hits of every class and misses), host normalisation, error-page rendering, and
//! building the whole table. Setup prints the table's resident size per sandbox.
//! `cargo bench --bench hot -- access` — `mp_` verification (HS256, EdDSA), session
//! cookie verification, and share-token lookup in a table of 1M share records.
//! `cargo bench --bench hot -- resolve` — the TLS certificate choice by SNI over 100k
//! exact names and 10k wildcards (what every handshake runs).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use miosa_edge::answer::Detail;
use miosa_edge::codes::ErrorCode;
use miosa_edge::routing::{normalize_host, Route, RouteTable};
use miosa_edge::schema::*;
use miosa_edge::schema::{Domains, PlatformBranding};
use std::hint::black_box;
use std::time::Instant;

// The binary's allocator, so table layout and page behaviour match production.
#[global_allocator]
static GLOBAL: miosa_edge::allocator::EdgeAlloc = miosa_edge::allocator::EdgeAlloc;

/// Table size; `MIOSA_BENCH_SANDBOXES` overrides it (to compare cache-resident tables).
static SANDBOXES: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::env::var("MIOSA_BENCH_SANDBOXES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000));
const DOMAINS: usize = 100_000;
const WORKSPACES: usize = 10_000;

fn domains() -> Domains {
    Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").unwrap()
}

fn big_state() -> State {
    let mut s = State::default();
    for w in 0..WORKSPACES {
        s.workspaces.push(Workspace {
            id: WorkspaceId::try_from(format!("ws_{w}")).unwrap(),
            slug: Label::try_from(format!("team-{w}")).unwrap(),
            preview_domain: Some(DomainEntry { host: Host::try_from(format!("preview.tenant-{w}.com")).unwrap(), verified: true }),
            deploy_domain: None,
            branding: (w % 10 == 0)
                .then(|| WorkspaceBranding { accent_color: Some(AccentColor::try_from("#0a84ff").unwrap()), ..Default::default() }),
        });
    }
    for i in 0..*SANDBOXES {
        s.sandboxes.push(Sandbox {
            id: SandboxId::try_from(format!("sb{i:08x}")).unwrap(),
            workspace: WorkspaceId::try_from(format!("ws_{}", i % WORKSPACES)).unwrap(),
            address: Address(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32))),
            state: SandboxState::Running,
            previews: vec![Preview { port: Port(5173), access: Access::Public }, Preview { port: Port(3000), access: Access::Private }],
        });
    }
    for d in 0..DOMAINS {
        s.deployments.push(Deployment {
            id: Id::try_from(format!("dep_{d}")).unwrap(),
            workspace: WorkspaceId::try_from(format!("ws_{}", d % WORKSPACES)).unwrap(),
            name: Label::try_from(format!("app-{d}")).unwrap(),
            domains: vec![DomainEntry { host: Host::try_from(format!("www.customer-{d}.com")).unwrap(), verified: true }],
            active_version: Id::try_from("v1").unwrap(),
            versions: vec![Version {
                id: Id::try_from("v1").unwrap(),
                release: Release::Dynamic {
                    instances: vec![Instance(format!("10.1.0.{}:8080", d % 250 + 1).parse().unwrap())],
                    health_check: None,
                    balance: Balance::default(),
                },
            }],
        });
    }
    s
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn hosts(n: usize, f: impl Fn(usize) -> String) -> Vec<String> {
    // A stride that visits the whole key space, so lookups are not cache-friendly.
    (0..n).map(|i| f(i.wrapping_mul(7919))).collect()
}

fn bench_lookup(c: &mut Criterion) {
    let state = big_state();
    let before = resident_bytes();
    let t0 = Instant::now();
    let table = RouteTable::build(&domains(), &PlatformBranding::default(), &state, 1).unwrap();
    let took = t0.elapsed();
    let grown = resident_bytes().saturating_sub(before);
    eprintln!(
        "table: {} sandboxes + {DOMAINS} domains built in {:.2} s; +{} MiB resident ({} B per sandbox, all objects counted)",
        *SANDBOXES,
        took.as_secs_f64(),
        grown >> 20,
        grown / *SANDBOXES as u64
    );

    let sets = [
        ("sandbox_hit", hosts(4096, |i| format!("5173-sb{:08x}.sandbox.miosa.app", i % *SANDBOXES))),
        // A realistic working set: 10k active sandboxes out of the million.
        ("sandbox_hot10k_hit", hosts(4096, |i| format!("5173-sb{:08x}.sandbox.miosa.app", (i % 10_000) * 97 % *SANDBOXES))),
        ("custom_domain_hit", hosts(4096, |i| format!("www.customer-{}.com", i % DOMAINS))),
        ("app_url_hit", hosts(4096, |i| format!("app-{}.team-{}.miosa.app", i % DOMAINS, (i % DOMAINS) % WORKSPACES))),
        (
            "tenant_preview_hit",
            hosts(4096, |i| {
                let sb = i % *SANDBOXES;
                format!("5173-sb{sb:08x}.preview.tenant-{}.com", sb % WORKSPACES)
            }),
        ),
        ("miss_unknown_host", hosts(4096, |i| format!("nothing-{i}.example.org"))),
        ("miss_unknown_sandbox", hosts(4096, |i| format!("5173-zz{i:08x}.sandbox.miosa.app"))),
    ];
    let mut g = c.benchmark_group("lookup_1M");
    for (name, hs) in &sets {
        // Sanity: hits hit, misses miss.
        let hit = matches!(table.lookup(&hs[1]), Route::Preview { .. } | Route::Deployment { .. });
        assert_eq!(hit, name.ends_with("_hit"), "{name}: {}", hs[1]);
        let mut i = 0usize;
        g.bench_function(*name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(matches!(table.lookup(black_box(&hs[i])), Route::Preview { .. }))
            })
        });
    }
    let raw: Vec<Vec<u8>> = sets[0].1.iter().map(|h| h.to_uppercase().into_bytes()).collect();
    let mut i = 0usize;
    g.bench_function("normalize_and_lookup", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let mut buf = [0u8; 256];
            let h = normalize_host(black_box(&raw[i]), &mut buf).unwrap_or("");
            black_box(matches!(table.lookup(h), Route::Preview { .. }))
        })
    });
    g.finish();

    c.bench_function("page_render_html", |b| {
        b.iter(|| {
            black_box(table.pages.html(
                0,
                ErrorCode::SandboxUnavailable,
                Detail { port: Some(5173), deployment: false },
                "0123456789abcdef0123456789abcdef",
            ))
        })
    });

    let mut g = c.benchmark_group("table_build");
    g.sample_size(10);
    g.bench_function("1M_sandboxes_100k_domains", |b| {
        b.iter_batched(
            || (),
            |_| black_box(RouteTable::build(&domains(), &PlatformBranding::default(), &state, 2).unwrap()),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The state of `n` sandboxes (and the workspaces and deployments of [`big_state`]),
/// built the way the control plane would push it: batches of 10,000 objects.
fn build_index(n: usize) -> miosa_edge::state::Index {
    use miosa_edge::state::{index::push_state_owned, Index, Origin};
    let mut index = Index::new(domains());
    let mut state = big_state();
    state.sandboxes.truncate(n);
    let mut batches: Vec<State> = Vec::new();
    batches.push(State { workspaces: std::mem::take(&mut state.workspaces), ..State::default() });
    for chunk in std::mem::take(&mut state.sandboxes).chunks(10_000) {
        batches.push(State { sandboxes: chunk.to_vec(), ..State::default() });
    }
    for chunk in std::mem::take(&mut state.deployments).chunks(10_000) {
        batches.push(State { deployments: chunk.to_vec(), ..State::default() });
    }
    for b in batches {
        let mut ops = Vec::new();
        push_state_owned(&mut ops, b, Origin::Api, "");
        let plan = index.check(ops).unwrap();
        index.commit(plan);
    }
    index
}

/// One-object writes, in memory (the store adds one log append and an fsync shared
/// with concurrent writers): check the batch on the state it leads to, commit it, and
/// make the next table. The same write on a thousand sandboxes and on a million. Also
/// prints the resident memory of state + table per sandbox, and how long a start takes
/// to read a snapshot of the million plus 100,000 log records after it.
fn bench_apply(c: &mut Criterion) {
    use miosa_edge::state::{BatchOp, Op, Origin};
    let mut g = c.benchmark_group("apply_one_op");
    // The large state first, so its resident size is read in a process that held
    // nothing before it.
    for n in [*SANDBOXES, 1_000usize] {
        let before = resident_bytes();
        let t0 = Instant::now();
        let mut index = build_index(n);
        let mut table = RouteTable::from_state(index.objects(), &domains(), &PlatformBranding::default(), 1);
        let took = t0.elapsed();
        let grown = resident_bytes().saturating_sub(before);
        eprintln!(
            "state + table: {n} sandboxes + {DOMAINS} deployments built in batches of 10k in {:.2} s; +{} MiB resident ({} B per sandbox, all objects counted)",
            took.as_secs_f64(),
            grown >> 20,
            grown / n as u64
        );
        if n == *SANDBOXES {
            start_up(&index);
        }
        let mut i = 0u32;
        let mut generation = 1;
        g.bench_function(format!("sandbox_upsert_{n}"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                // Alternately a new sandbox and a change of an existing one.
                let id = format!("sb{:08x}", (i as usize * 7919) % (n * 2));
                let s = Sandbox {
                    id: SandboxId::try_from(id).unwrap(),
                    workspace: WorkspaceId::try_from(format!("ws_{}", i as usize % WORKSPACES)).unwrap(),
                    address: Address(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))),
                    state: SandboxState::Running,
                    previews: vec![Preview { port: Port(5173), access: Access::Public }],
                };
                let ops = vec![BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(Object::Sandbox(s)) }];
                let plan = index.check(ops).unwrap();
                let applied = index.commit(plan);
                generation += 1;
                let next = table.apply(&applied, index.objects(), generation);
                // The published table stays shared with the next write's copy.
                table = black_box(next);
            })
        });
    }
    g.finish();
}

/// A start of the edge's store on a snapshot of `index` plus 100,000 one-object log
/// records after it (written directly: no fsync per record here).
fn start_up(index: &miosa_edge::state::Index) {
    use miosa_edge::schema::Object;
    use miosa_edge::store::{log, snapshot, Store};
    let dir = tempfile::tempdir().unwrap();
    snapshot::write(&dir.path().join(snapshot::FILE), 10, index.objects()).unwrap();
    let mut bytes = Vec::new();
    for k in 0..100_000u32 {
        let s = Sandbox {
            id: SandboxId::try_from(format!("sb{:08x}", (k as usize * 13) % *SANDBOXES)).unwrap(),
            workspace: WorkspaceId::try_from(format!("ws_{}", k as usize % WORKSPACES)).unwrap(),
            address: Address(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + k))),
            state: SandboxState::Running,
            previews: vec![Preview { port: Port(5173), access: Access::Public }],
        };
        let o = Object::Sandbox(s);
        bytes.extend(log::frame(11 + k as u64, std::iter::once((o.kind(), o.id(), Some(&o)))));
    }
    std::fs::write(dir.path().join("state.log"), &bytes).unwrap();
    let cfg = miosa_edge::config::Config::parse(
        &format!("[server]\nstate_dir = \"{}\"\n[domains]\nsandbox = \"sandbox.miosa.app\"\napps = \"miosa.app\"\nedge_target = \"edge.miosa.app\"\nacme_zone = \"acme.miosa.app\"\n", dir.path().display()),
        None,
    )
    .unwrap();
    let t0 = Instant::now();
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    let store = Store::open(&cfg, std::sync::Arc::new(miosa_edge::metrics::Metrics::new()), true).unwrap();
    eprintln!(
        "start-up: snapshot of {} sandboxes + 100000 log records read, checked and published in {:.2} s (generation {})",
        store.published().objects.sandboxes.len(),
        t0.elapsed().as_secs_f64(),
        store.generation()
    );
}

fn bench_access(c: &mut Criterion) {
    use miosa_edge::access::{self, cookie, mint};
    use miosa_edge::access::{KeyAlg, PreviewKeySpec, Tokens};
    use ring::signature::KeyPair;
    use std::sync::Arc;

    const SECRET: &[u8] = b"bench-hs256-secret-0123456789abcdef";
    // An Ed25519 key pair; the public half as the PEM file the edge loads.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let b64 = |der: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    };
    let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(pair.public_key().as_ref());
    let dir = tempfile::tempdir().unwrap();
    let pub_file = dir.path().join("ed.pem");
    std::fs::write(&pub_file, format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", b64(&spki))).unwrap();
    let priv_pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", b64(pkcs8.as_ref()));
    let tokens = Tokens {
        session_key_env: "SESSION".into(),
        preview_keys: vec![
            PreviewKeySpec { kid: "k1".into(), alg: KeyAlg::HS256, secret_env: Some("HS".into()), public_key_file: None },
            PreviewKeySpec { kid: "ed".into(), alg: KeyAlg::EdDSA, secret_env: None, public_key_file: Some(pub_file) },
        ],
        ..Tokens::default()
    };
    let keys = access::Keys::load(&tokens, |n| match n {
        "HS" => Some(SECRET.to_vec()),
        "SESSION" => Some(b"bench-session-key-0123456789abcdef".to_vec()),
        _ => None,
    })
    .unwrap();
    let now = miosa_edge::clock::unix_now();
    let hs = mint::preview_token(mint::SigningKey::Hs256(SECRET), Some("k1"), "abc12345", Some(5173), now, now + 3600).unwrap();
    let ed = mint::preview_token(mint::SigningKey::Pem(KeyAlg::EdDSA, priv_pem.as_bytes()), Some("ed"), "abc12345", None, now, now + 3600)
        .unwrap();
    let mut g = c.benchmark_group("access");
    for (name, t) in [("mp_verify_hs256", &hs), ("mp_verify_eddsa", &ed)] {
        let jws = t.strip_prefix("mp_").unwrap();
        assert!(access::verify_preview(&keys, jws, "abc12345", 5173, now).is_ok());
        g.bench_function(name, |b| b.iter(|| black_box(access::verify_preview(&keys, black_box(jws), "abc12345", 5173, now).is_ok())));
    }
    let host = "5173-abc12345.sandbox.miosa.app";
    let session = cookie::Session { kind: cookie::Kind::Preview, cross_site: false, expires: now + 3600, share: None };
    let value = cookie::encode(&keys, host, &session).unwrap();
    assert_eq!(cookie::decode(&keys, host, &value, now), Some(session));
    g.bench_function("session_cookie_verify", |b| b.iter(|| black_box(cookie::decode(&keys, black_box(host), black_box(&value), now))));

    // 1M share records over 1,000 sandboxes; tokens presented in a spread order.
    const SHARES: usize = 1_000_000;
    let mut state = State::default();
    state.workspaces.push(Workspace {
        id: WorkspaceId::try_from("ws_1").unwrap(),
        slug: Label::try_from("one").unwrap(),
        preview_domain: None,
        deploy_domain: None,
        branding: None,
    });
    for i in 0..1000 {
        state.sandboxes.push(Sandbox {
            id: SandboxId::try_from(format!("sb{i:05}")).unwrap(),
            workspace: WorkspaceId::try_from("ws_1").unwrap(),
            address: Address(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1))),
            state: SandboxState::Running,
            previews: vec![Preview { port: Port(5173), access: Access::Private }],
        });
    }
    let token = |i: usize| format!("ms_bench-share-token-{i:012}");
    for i in 0..SHARES {
        state.share_tokens.push(ShareToken {
            id: Id::try_from(format!("sh_{i}")).unwrap(),
            token_sha256: Sha256(access::share_hash(&token(i))),
            sandbox: SandboxId::try_from(format!("sb{:05}", i % 1000)).unwrap(),
            port: None,
            expires_at: None,
            password_hash: None,
        });
    }
    let table = RouteTable::build(&domains(), &PlatformBranding::default(), &state, 1).unwrap().with_access(Arc::new(keys.clone()));
    drop(state);
    let presented: Vec<(String, String)> = hosts(4096, |i| token(i % SHARES))
        .into_iter()
        .enumerate()
        .map(|(j, t)| (t, format!("sb{:05}", (j.wrapping_mul(7919) % SHARES) % 1000)))
        .collect();
    assert!(access::verify_share(&table, &presented[1].0, &presented[1].1, 5173, now).is_ok());
    let mut i = 0usize;
    g.bench_function("share_verify_1M_records", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let (t, sb) = &presented[i];
            black_box(access::verify_share(&table, black_box(t), sb, 5173, now).is_ok())
        })
    });
    g.finish();
}

fn bench_resolve(c: &mut Criterion) {
    use miosa_edge::tls::{default_cert, store::parse_pair, Cert, CertIndex};
    use std::sync::Arc;
    // One real key pair shared by every entry: the index only looks at names.
    let (chain, key) = default_cert::generate(&["localhost".into()]).unwrap();
    let real = parse_pair("default", chain.as_bytes(), key.as_bytes()).unwrap();
    let cert = |source: String, names: Vec<String>| {
        Arc::new(Cert {
            names,
            not_before: real.not_before,
            not_after: real.not_after,
            issuer: real.issuer.clone(),
            source,
            serial: real.serial.clone(),
            authority_key_id: None,
            key: real.key.clone(),
        })
    };
    let mut certs: Vec<Arc<Cert>> = (0..DOMAINS).map(|i| cert(format!("c{i}"), vec![format!("www.customer-{i}.com")])).collect();
    certs.extend((0..WORKSPACES).map(|i| cert(format!("w{i}"), vec![format!("*.team-{i}.miosa.app")])));
    certs.push(cert("sandbox".into(), vec!["*.sandbox.miosa.app".into()]));
    let t0 = Instant::now();
    let index = Arc::new(arc_swap::ArcSwap::from_pointee(CertIndex::new(cert("default".into(), vec!["localhost".into()]), certs)));
    eprintln!("cert index: {} exact + {} wildcard names built in {:.0} ms", DOMAINS, WORKSPACES + 1, t0.elapsed().as_secs_f64() * 1e3);
    let sets = [
        ("exact_hit", hosts(4096, |i| format!("www.customer-{}.com", i % DOMAINS))),
        ("wildcard_hit", hosts(4096, |i| format!("app-{i}.team-{}.miosa.app", i % WORKSPACES))),
        ("sandbox_wildcard_hit", hosts(4096, |i| format!("5173-sb{i:08x}.sandbox.miosa.app"))),
        ("miss_default", hosts(4096, |i| format!("nothing-{i}.example.org"))),
    ];
    let mut g = c.benchmark_group("resolve_100k");
    for (name, hs) in &sets {
        let got = index.load().resolve(Some(&hs[1])).source.clone();
        assert_eq!(got == "default", name.starts_with("miss"), "{name}: {} → {got}", hs[1]);
        let mut i = 0usize;
        g.bench_function(*name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                // what SniResolver::resolve does: one load, one lookup, one Arc clone
                black_box(index.load().resolve(black_box(Some(hs[i].as_str()))).key.clone())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_lookup, bench_apply, bench_access, bench_resolve);
criterion_main!(benches);
