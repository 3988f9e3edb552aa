use super::*;
use crate::schema::*;
use crate::state::validate;

fn domains() -> Domains {
    Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").unwrap()
}

/// A small deterministic generator (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn domain(g: &mut Gen) -> Option<DomainEntry> {
    g.chance(40).then(|| DomainEntry {
        host: Host::try_from(g.pick(&["t1.test", "t2.test", "x.t1.test", "sandbox.miosa.app"])).unwrap(),
        verified: g.chance(50),
    })
}

/// A random object from a small universe of ids, names and hosts, so that batches
/// collide on every rule.
fn object(g: &mut Gen) -> Object {
    match g.below(5) {
        4 => Object::Bucket(Bucket {
            id: Id::try_from(g.pick(&["b0", "b1", "b2"])).unwrap(),
            workspace: WorkspaceId::try_from(g.pick(&["w0", "w1", "w2", "w9"])).unwrap(),
            bucket: BucketName::try_from(g.pick(&["proj_1-uploads", "proj_2", "Proj.3"])).unwrap(),
            alias: Label::try_from(g.pick(&["p1", "p2", "p3"])).unwrap(),
            public: g.chance(50),
            domains: (0..g.below(3))
                .map(|_| DomainEntry {
                    host: Host::try_from(g.pick(&["cdn.t1.test", "app.t1.test", "www.c.test", "x.storage.miosa.app", "assets.b.test"]))
                        .unwrap(),
                    verified: g.chance(50),
                })
                .collect(),
        }),
        0 => Object::Workspace(Workspace {
            id: WorkspaceId::try_from(g.pick(&["w0", "w1", "w2", "w3"])).unwrap(),
            slug: Label::try_from(g.pick(&["a", "b", "c", "sandbox"])).unwrap(),
            preview_domain: domain(g),
            deploy_domain: domain(g),
            branding: None,
        }),
        1 => Object::Sandbox(Sandbox {
            id: SandboxId::try_from(g.pick(&["s0", "s1", "s2", "s3", "s4"])).unwrap(),
            workspace: WorkspaceId::try_from(g.pick(&["w0", "w1", "w2", "w0", "w1", "w9"])).unwrap(),
            address: Address("10.0.0.1".parse().unwrap()),
            state: SandboxState::Running,
            previews: (0..g.below(3))
                .map(|i| Preview { port: Port(if g.chance(90) { 1 + i as u16 } else { 1 }), access: Access::Public })
                .collect(),
        }),
        2 => Object::ShareToken(ShareToken {
            id: Id::try_from(g.pick(&["h0", "h1", "h2", "h3"])).unwrap(),
            token_sha256: Sha256([g.below(3) as u8; 32]),
            sandbox: SandboxId::try_from(g.pick(&["s0", "s1", "s2", "s5"])).unwrap(),
            port: g.chance(60).then(|| Port(1 + g.below(4) as u16)),
            expires_at: None,
            password_hash: None,
        }),
        _ => {
            let versions: Vec<Version> = ["v1", "v2"]
                .iter()
                .take(1 + g.below(2) as usize)
                .map(|v| Version {
                    id: Id::try_from(*v).unwrap(),
                    release: Release::Dynamic {
                        instances: (0..1 + g.below(2)).map(|i| Instance(format!("10.0.1.{}:80", 1 + i % 2).parse().unwrap())).collect(),
                        health_check: None,
                        balance: Balance::default(),
                    },
                })
                .collect();
            Object::Deployment(Deployment {
                id: Id::try_from(g.pick(&["d0", "d1", "d2", "d3"])).unwrap(),
                workspace: WorkspaceId::try_from(g.pick(&["w0", "w1", "w2", "w9"])).unwrap(),
                name: Label::try_from(g.pick(&["app", "web"])).unwrap(),
                domains: (0..g.below(3))
                    .map(|_| DomainEntry {
                        host: Host::try_from(g.pick(&[
                            "app.t1.test",
                            "www.c.test",
                            "a.x.t1.test",
                            "app.t2.test",
                            "t2.test",
                            "x.y.miosa.app",
                        ]))
                        .unwrap(),
                        verified: true,
                    })
                    .collect(),
                active_version: Id::try_from(g.pick(&["v1", "v2"])).unwrap(),
                versions,
            })
        }
    }
}

/// `state` with `op` applied the way the control API's ops read (sequentially);
/// `None` for a delete of nothing.
fn apply(state: &mut State, op: &Op) -> Option<()> {
    match op {
        Op::Upsert(o) => {
            state.upsert(o.clone());
            Some(())
        }
        Op::Delete(kind, id) => state.remove(*kind, id).then_some(()),
    }
}

fn sorted(mut s: State) -> State {
    s.workspaces.sort_by(|a, b| a.id.cmp(&b.id));
    s.sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
    s.share_tokens.sort_by(|a, b| a.id.cmp(&b.id));
    s.deployments.sort_by(|a, b| a.id.cmp(&b.id));
    s.buckets.sort_by(|a, b| a.id.cmp(&b.id));
    s
}

#[test]
fn incremental_checks_agree_with_the_whole_state_check() {
    let mut g = Gen(0x5eed_1234_abcd_0001);
    let mut index = Index::new(domains());
    let mut state = State::default();
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..4000 {
        let n = 1 + g.below(3);
        let ops: Vec<BatchOp> = (0..n)
            .map(|i| {
                let op = if g.chance(30) {
                    let o = object(&mut g);
                    Op::Delete(o.kind(), o.id().to_string())
                } else {
                    Op::Upsert(object(&mut g))
                };
                BatchOp { path: format!("ops[{i}]"), origin: Origin::Api, op }
            })
            .collect();
        let mut expected = state.clone();
        let applies = ops.iter().all(|b| apply(&mut expected, &b.op).is_some());
        let whole = validate(&expected, &domains());
        match index.check(ops.clone()) {
            Ok(plan) => {
                assert!(applies, "round {round}: a delete of nothing was accepted: {ops:?}");
                assert!(whole.is_ok(), "round {round}: accepted {ops:?}\nbut the state it leads to is invalid: {whole:?}");
                index.commit(plan);
                state = expected;
                accepted += 1;
            }
            Err(Refusal::NotFound(_)) => {
                assert!(!applies, "round {round}: refused as not found: {ops:?}");
                refused += 1;
            }
            Err(e) => {
                assert!(
                    !applies || whole.is_err(),
                    "round {round}: refused {ops:?} with {e:?}\nbut the state it leads to is valid:\n{expected:#?}"
                );
                refused += 1;
            }
        }
        assert_eq!(sorted(index.objects().to_state(Origin::Api)), sorted(state.clone()), "round {round}");
    }
    // The generator reaches both outcomes often.
    assert!(accepted > 400 && refused > 400, "accepted {accepted}, refused {refused}");
}

fn ws(id: &str, slug: &str) -> Object {
    Object::Workspace(Workspace {
        id: WorkspaceId::try_from(id).unwrap(),
        slug: Label::try_from(slug).unwrap(),
        preview_domain: None,
        deploy_domain: None,
        branding: None,
    })
}

fn sb(id: &str, w: &str) -> Object {
    Object::Sandbox(Sandbox {
        id: SandboxId::try_from(id).unwrap(),
        workspace: WorkspaceId::try_from(w).unwrap(),
        address: Address("10.0.0.1".parse().unwrap()),
        state: SandboxState::Running,
        previews: vec![Preview { port: Port(3000), access: Access::Public }],
    })
}

fn put(o: Object) -> BatchOp {
    BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(o) }
}

#[test]
fn one_object_writes_name_their_fields_and_references() {
    let mut index = Index::new(domains());
    index.commit(index.check(vec![put(ws("w1", "one"))]).unwrap());
    // A sandbox of a missing workspace: the body's field.
    match index.check(vec![put(sb("s1", "nope"))]) {
        Err(Refusal::Invalid(e)) => {
            assert_eq!((e[0].path.as_str(), e[0].message.as_str()), ("workspace", "workspace `nope` does not exist"))
        }
        other => panic!("{other:?}"),
    }
    index.commit(index.check(vec![put(sb("s1", "w1"))]).unwrap());
    // Deleting a workspace still used is refused; with its sandbox in the same batch, fine.
    let del = |k: Kind, id: &str, path: &str| BatchOp { path: path.into(), origin: Origin::Api, op: Op::Delete(k, id.into()) };
    match index.check(vec![del(Kind::Workspace, "w1", "")]) {
        Err(Refusal::Invalid(e)) => assert!(e[0].message.contains("still used by 1"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(index.check(vec![del(Kind::Workspace, "w1", "ops[0]"), del(Kind::Sandbox, "s1", "ops[1]")]).is_ok());
    match index.check(vec![del(Kind::Sandbox, "nope", "ops[3]")]) {
        Err(Refusal::NotFound(m)) => assert_eq!(m, "ops[3]: no sandbox `nope`"),
        other => panic!("{other:?}"),
    }
    // The same object again changes nothing.
    assert!(index.check(vec![put(sb("s1", "w1"))]).unwrap().is_empty());
}

#[test]
fn the_other_parts_objects_and_hosts_are_conflicts() {
    let toml = State {
        workspaces: vec![Workspace {
            preview_domain: Some(DomainEntry { host: Host::try_from("p.tenant.test").unwrap(), verified: true }),
            ..match ws("w1", "one") {
                Object::Workspace(w) => w,
                _ => unreachable!(),
            }
        }],
        ..State::default()
    };
    let index = Index::build(domains(), &toml, &State::default()).unwrap();
    match index.check(vec![put(ws("w1", "x"))]) {
        Err(Refusal::Conflict(e)) => assert_eq!((e.path.as_str(), e.message.as_str()), ("id", "workspace `w1` is pinned by the TOML file")),
        other => panic!("{other:?}"),
    }
    let claims = Object::Workspace(Workspace {
        preview_domain: Some(DomainEntry { host: Host::try_from("p.tenant.test").unwrap(), verified: true }),
        ..match ws("w2", "two") {
            Object::Workspace(w) => w,
            _ => unreachable!(),
        }
    });
    match index.check(vec![put(claims)]) {
        Err(Refusal::Conflict(e)) => assert_eq!(e.path, "preview_domain.host"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_host_moves_between_deployments_in_one_batch_in_any_order() {
    let dep = |id: &str, host: Option<&str>| {
        Object::Deployment(Deployment {
            id: Id::try_from(id).unwrap(),
            workspace: WorkspaceId::try_from("w1").unwrap(),
            name: Label::try_from(id).unwrap(),
            domains: host.map(|h| DomainEntry { host: Host::try_from(h).unwrap(), verified: true }).into_iter().collect(),
            active_version: Id::try_from("v").unwrap(),
            versions: vec![Version { id: Id::try_from("v").unwrap(), release: Release::Static { sha256: Sha256([1; 32]), spa: false } }],
        })
    };
    let mut index = Index::new(domains());
    index.commit(index.check(vec![put(ws("w1", "one")), put(dep("a", Some("app.c.test"))), put(dep("b", None))]).unwrap());
    assert!(index.check(vec![put(dep("b", Some("app.c.test")))]).is_err());
    index.commit(index.check(vec![put(dep("b", Some("app.c.test"))), put(dep("a", None))]).unwrap());
    assert!(index.check(vec![put(dep("a", Some("app.c.test")))]).is_err(), "b holds it now");
}
