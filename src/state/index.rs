//! The writer's view of the state: every object ([`Objects`]) and what checking a write
//! needs — who claims each host, slug, token hash and deployment name, how many objects
//! use each workspace, which shares point at each sandbox — so a write is checked in
//! time proportional to what it changes.
//!
//! ```text
//! Batch (ops, each with the path its errors are named under)
//!   check: fold the ops (the last op on an id wins) → the batch's final objects
//!          each new object: its own rules (state::rules)
//!          claims on the final state: a host, slug, token hash, (workspace, name) has
//!            one claimant; a TOML claimant refuses an API write (409)
//!          references on the final state: a sandbox's workspace, a share's sandbox and
//!            port, a deployment's workspace exist; a deleted workspace is unused; a
//!            changed sandbox still fits its shares; tenant domains hold only their
//!            own workspace's deployment hosts
//!        → Plan (nothing changed yet) | Refusal (every error, in op order)
//!   commit(plan): the objects and indexes change; → the changes the table applies
//! ```
//!
//! A batch is all or nothing, and is checked against the state it leads to, not op by
//! op: moving a host from one deployment to another in one batch is fine in any order.
//! The whole-document check ([`super::validate`]) applies the same object rules.

use super::records::{BucketRec, DeploymentRec, Objects, Origin, SandboxRecord, ShareRec, WorkspaceRec};
use super::rules;
use crate::schema::{Bucket, Deployment, DomainEntry, Domains, Kind, Object, ShareToken, State, StateError, Workspace, WorkspaceId};
use std::sync::Arc;

type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// One change of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Upsert(Object),
    Delete(Kind, String),
}

impl Op {
    pub fn kind(&self) -> Kind {
        match self {
            Op::Upsert(o) => o.kind(),
            Op::Delete(k, _) => *k,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Op::Upsert(o) => o.id(),
            Op::Delete(_, id) => id,
        }
    }
}

/// An op, which part it belongs to, and the path its errors are named under (`ops[2].value`,
/// `sandboxes[7]`, or empty for a one-object write).
#[derive(Clone, Debug)]
pub struct BatchOp {
    pub path: String,
    pub origin: Origin,
    pub op: Op,
}

/// Why a batch was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Rules broken (every error found, in op order).
    Invalid(Vec<StateError>),
    /// An op touches an object or a host the other part (TOML or API) owns.
    Conflict(StateError),
    /// A delete of an object that does not exist.
    NotFound(String),
}

/// A checked batch, ready to commit: its final objects, one per kind and id.
#[derive(Debug)]
pub struct Plan {
    changes: Vec<Pending>,
}

impl Plan {
    /// Whether the batch changes nothing (every op leaves its object as it was).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// How many objects it changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// The batch as one op per object it changes, in the order they first appeared:
    /// (kind, id, the new object or `None` for a delete). What the log records.
    pub fn ops(&self) -> impl Iterator<Item = (Kind, &str, Option<&Object>)> + '_ {
        self.changes.iter().map(|p| (p.kind, p.id(), p.new.as_ref()))
    }
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// The id of a delete (an upsert's is its object's).
    deleted: Option<Box<str>>,
    origin: Origin,
    path: String,
    op_index: usize,
    new: Option<Object>,
}

impl Pending {
    fn id(&self) -> &str {
        match (&self.new, &self.deleted) {
            (Some(o), _) => o.id(),
            (None, Some(id)) => id,
            (None, None) => "",
        }
    }
}

/// The hash of an object's identity (kind and id) among a batch's ops.
fn identity_hash(kind: Kind, id: &str) -> u64 {
    crate::cow::hash(id.as_bytes()) ^ (kind as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What a committed batch changed, for the route table (old and new of each object).
#[derive(Debug, Clone)]
pub enum Applied {
    Workspace {
        slot: u32,
        old: Option<Arc<Workspace>>,
        new: Option<Arc<Workspace>>,
    },
    /// Sandboxes changed (the table reads the state's own map).
    Sandbox,
    ShareToken {
        old: Option<Arc<ShareToken>>,
        new: Option<Arc<ShareToken>>,
    },
    Deployment {
        slot: u32,
        workspace_slot: u32,
        old: Option<Arc<Deployment>>,
        new: Option<Arc<Deployment>>,
    },
    Bucket {
        workspace_slot: u32,
        old: Option<Arc<Bucket>>,
        new: Option<Arc<Bucket>>,
    },
}

impl Applied {
    /// The kind of the object that changed.
    pub fn kind(&self) -> Kind {
        match self {
            Applied::Workspace { .. } => Kind::Workspace,
            Applied::Sandbox => Kind::Sandbox,
            Applied::ShareToken { .. } => Kind::ShareToken,
            Applied::Deployment { .. } => Kind::Deployment,
            Applied::Bucket { .. } => Kind::Bucket,
        }
    }
}

/// Who claims a host: a workspace's tenant domain, a deployment's or a bucket's custom domain.
#[derive(Clone, Debug)]
struct Claim {
    kind: Kind,
    id: Box<str>,
    /// `preview_domain`, `deploy_domain` or `domains`.
    field: &'static str,
    origin: Origin,
}

impl Claim {
    fn describe(&self) -> String {
        claimant(self.kind, &self.id, self.field)
    }
}

/// How a claimant of a host is named in messages.
fn claimant(kind: Kind, id: &str, field: &str) -> String {
    match kind {
        Kind::Workspace => format!("workspace `{id}` ({field})"),
        other => format!("{} `{id}`", other.singular()),
    }
}

/// A custom domain is "one label under" its parent (the tenant-domain rule).
fn parent_of(host: &str) -> Option<&str> {
    host.split_once('.').map(|(_, parent)| parent)
}

/// How many objects use a workspace.
#[derive(Clone, Copy, Debug, Default)]
struct Refs {
    sandboxes: u64,
    deployments: u64,
    buckets: u64,
}

/// The validated state and its indexes (see the module head).
#[derive(Debug)]
pub struct Index {
    objects: Objects,
    domains: Domains,
    slugs: HashMap<Box<str>, Box<str>>,
    hosts: HashMap<Box<str>, Claim>,
    share_hashes: HashMap<[u8; 32], Box<str>>,
    /// Workspace id → deployment name → deployment id.
    dep_names: HashMap<Box<str>, HashMap<Box<str>, Box<str>>>,
    /// Objects using each workspace, by the workspace's slot.
    ws_refs: Vec<Refs>,
    /// Sandbox id → the share tokens that name it (only sandboxes that have some).
    shares_of: HashMap<Box<str>, Vec<Box<str>>>,
    /// A domain → the deployment and bucket hosts one label under it (the tenant-domain rule).
    hosts_under: HashMap<Box<str>, Vec<Box<str>>>,
    /// Bucket alias → bucket id.
    aliases: HashMap<Box<str>, Box<str>>,
    /// Store bucket name → bucket id (one object per store bucket: egress through the S3
    /// endpoint is attributed by it).
    store_names: HashMap<Box<str>, Box<str>>,
    ws_free: Vec<u32>,
    ws_next: u32,
    dep_free: Vec<u32>,
    dep_next: u32,
}

impl Index {
    /// An empty state under `domains`.
    pub fn new(domains: Domains) -> Index {
        Index {
            objects: Objects::default(),
            domains,
            slugs: HashMap::default(),
            hosts: HashMap::default(),
            share_hashes: HashMap::default(),
            dep_names: HashMap::default(),
            ws_refs: Vec::new(),
            shares_of: HashMap::default(),
            hosts_under: HashMap::default(),
            aliases: HashMap::default(),
            store_names: HashMap::default(),
            ws_free: Vec::new(),
            ws_next: 0,
            dep_free: Vec::new(),
            dep_next: 0,
        }
    }

    /// The state of the TOML part `toml` and the API part `api`, checked whole. Errors
    /// name API objects by their path in `api` and TOML ones as `toml: …`.
    pub fn build(domains: Domains, toml: &State, api: &State) -> Result<Index, Refusal> {
        let mut index = Index::new(domains);
        let mut ops = Vec::with_capacity(api.sandboxes.len() + toml.sandboxes.len() + 64);
        push_state(&mut ops, api, Origin::Api, "");
        push_state(&mut ops, toml, Origin::Toml, "toml: ");
        let plan = index.check(ops)?;
        index.commit(plan);
        Ok(index)
    }

    /// The objects (a cheap copy: share it, serialise it, keep it).
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The domains the state was checked under.
    pub fn domains(&self) -> &Domains {
        &self.domains
    }

    /// Puts a sandbox read from the state's own snapshot in place without the batch
    /// machinery (a start reads a million): its id, its own rules, that it is new and
    /// that its workspace exists are still checked. `path` names it in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn load_sandbox(
        &mut self,
        path: impl Fn() -> String,
        id: &str,
        workspace: Result<u32, &str>,
        address: std::net::IpAddr,
        state: crate::schema::SandboxState,
        previews: &[crate::schema::Preview],
        origin: Origin,
    ) -> Result<(), StateError> {
        let mut first: Option<StateError> = None;
        let mut err = |f: String, m: String| {
            first.get_or_insert_with(|| StateError { path: join(&path(), &f), message: m });
        };
        if let Err(m) = crate::schema::check_sandbox_id(id) {
            err("id".into(), m);
        }
        rules::sandbox_parts(id, previews, &mut err);
        if let Err(w) = workspace {
            err("workspace".into(), format!("workspace `{w}` does not exist"));
        }
        if let Some(e) = first {
            return Err(e);
        }
        let slot = workspace.unwrap_or(u32::MAX);
        if self.objects.sandboxes.insert(SandboxRecord::from_parts(id, address, slot, state, previews, origin)).is_some() {
            // A start refuses the whole state: nothing to restore.
            return Err(StateError { path: join(&path(), "id"), message: format!("sandbox id `{id}` is used twice") });
        }
        self.refs(slot, |r| r.sandboxes += 1);
        Ok(())
    }

    /// The slot of workspace `id`, if it exists (resolved once per workspace by a bulk load).
    pub fn workspace_slot(&self, id: &str) -> Option<u32> {
        self.objects.workspaces.get(id.as_bytes()).map(|r| r.slot)
    }

    /// Room for `n` more sandboxes (a bulk load).
    pub fn reserve_sandboxes(&mut self, n: usize) {
        self.objects.sandboxes.reserve(n);
    }

    /// Checks `ops` as one batch against the state it leads to (see the module head).
    pub fn check(&self, ops: Vec<BatchOp>) -> Result<Plan, Refusal> {
        // Fold: the last op on an id wins; deletes of what does not exist are refused.
        let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
        let mut at: hashbrown::HashTable<usize> = hashbrown::HashTable::with_capacity(ops.len());
        for (i, b) in ops.into_iter().enumerate() {
            let BatchOp { path, origin, op } = b;
            let kind = op.kind();
            let (new, deleted) = match op {
                Op::Upsert(o) => (Some(o), None),
                Op::Delete(_, id) => (None, Some(id.into_boxed_str())),
            };
            let p = Pending { kind, deleted, origin, path, op_index: i, new };
            let id = p.id();
            if let Some(o) = self.objects.origin(kind, id) {
                if o != origin {
                    // Either way round, the one conflict: an id both parts define.
                    let message = format!("{} `{id}` is pinned by the TOML file", kind.singular());
                    return Err(Refusal::Conflict(StateError { path: join(&p.path, "id"), message }));
                }
            }
            let hash = identity_hash(kind, id);
            let earlier = at.find(hash, |&j| pending[j].kind == kind && pending[j].id() == id).copied();
            if p.new.is_none() {
                let exists = match earlier {
                    Some(j) => pending[j].new.is_some(),
                    None => self.objects.origin(kind, id).is_some(),
                };
                if !exists {
                    let what = format!("no {} `{id}`", kind.singular());
                    return Err(Refusal::NotFound(if p.path.is_empty() { what } else { format!("{}: {what}", p.path) }));
                }
            }
            match earlier {
                Some(j) if pending[j].origin != origin => {
                    // Both parts define the object (a whole build): name the API's.
                    let api = if origin == Origin::Api { &p.path } else { &pending[j].path };
                    let message = format!("{} `{id}` is pinned by the TOML file", kind.singular());
                    return Err(Refusal::Conflict(StateError { path: join(api, "id"), message }));
                }
                Some(j) => pending[j] = p,
                None => {
                    at.insert_unique(hash, pending.len(), |&j| identity_hash(pending[j].kind, pending[j].id()));
                    pending.push(p);
                }
            }
        }
        // What does not change is not a change: an identical upsert, or the create and
        // delete of one id in the same batch.
        pending.retain(|p| !self.unchanged(p));
        let mut tenants: HashMap<&str, &str> = HashMap::default();
        for p in &pending {
            if let Some(Object::Workspace(w)) = &p.new {
                for d in [&w.preview_domain, &w.deploy_domain].into_iter().flatten() {
                    tenants.insert(d.host.as_str(), p.id());
                }
            }
        }
        let at = pending.iter().enumerate().map(|(i, p)| ((p.kind, p.id()), i)).collect();
        let view = View { index: self, pending: &pending, at, tenants };
        let mut errors: Vec<(usize, StateError)> = Vec::new();
        let mut conflict: Option<StateError> = None;
        view.check_objects(&mut errors);
        view.check_claims(&mut errors, &mut conflict);
        view.check_references(&mut errors);
        if let Some(c) = conflict {
            return Err(Refusal::Conflict(c));
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.0);
            return Err(Refusal::Invalid(errors.into_iter().map(|e| e.1).collect()));
        }
        Ok(Plan { changes: pending })
    }

    fn unchanged(&self, p: &Pending) -> bool {
        let k = p.id().as_bytes();
        match &p.new {
            None => self.objects.origin(p.kind, p.id()).is_none(),
            Some(Object::Workspace(w)) => self.objects.workspaces.get(k).is_some_and(|r| *r.obj == *w),
            Some(Object::Sandbox(s)) => self.objects.sandboxes.get(k).is_some_and(|r| {
                r.address == s.address.0
                    && r.state == s.state
                    && r.previews().eq(s.previews.iter().map(|p| (p.port.0, p.access)))
                    && self.objects.workspace_ids.get(r.workspace).is_some_and(|w| *w == s.workspace)
            }),
            Some(Object::ShareToken(t)) => self.objects.share_tokens.get(k).is_some_and(|r| *r.obj == *t),
            Some(Object::Deployment(d)) => self.objects.deployments.get(k).is_some_and(|r| *r.obj == *d),
            Some(Object::Bucket(b)) => self.objects.buckets.get(k).is_some_and(|r| *r.obj == *b),
        }
    }

    /// Applies a checked plan; returns what changed, for the route table (sandboxes,
    /// which the table shares with the state, as one entry however many changed).
    pub fn commit(&mut self, plan: Plan) -> Vec<Applied> {
        // Pass 1: every old object lets go of its claims and references.
        for p in &plan.changes {
            self.release(p.kind, p.id());
        }
        // Pass 2: the new objects take theirs; workspaces first (sandboxes and
        // deployments name their slots).
        let mut changes: Vec<Option<Pending>> = plan.changes.into_iter().map(Some).collect();
        let mut applied = Vec::new();
        let mut sandboxes = false;
        for kind in Kind::ALL {
            for slot in changes.iter_mut() {
                if slot.as_ref().is_none_or(|p| p.kind != kind) {
                    continue;
                }
                let Some(p) = slot.take() else { continue };
                match self.install(p) {
                    Some(a) => applied.push(a),
                    None => sandboxes = true,
                }
            }
        }
        if sandboxes {
            applied.push(Applied::Sandbox);
        }
        applied
    }

    fn release(&mut self, kind: Kind, id: &str) {
        let k = id.as_bytes();
        match kind {
            Kind::Workspace => {
                if let Some(r) = self.objects.workspaces.get(k) {
                    let w = r.obj.clone();
                    self.slugs.remove(w.slug.as_str());
                    for d in [&w.preview_domain, &w.deploy_domain].into_iter().flatten() {
                        self.hosts.remove(d.host.as_str());
                    }
                }
            }
            Kind::Sandbox => {
                if let Some(slot) = self.objects.sandboxes.get(k).map(|r| r.workspace) {
                    self.refs(slot, |r| r.sandboxes -= 1);
                }
            }
            Kind::ShareToken => {
                if let Some(r) = self.objects.share_tokens.get(k) {
                    let t = r.obj.clone();
                    self.share_hashes.remove(&t.token_sha256.0);
                    if let Some(list) = self.shares_of.get_mut(t.sandbox.as_str()) {
                        list.retain(|s| **s != *id);
                        if list.is_empty() {
                            self.shares_of.remove(t.sandbox.as_str());
                        }
                    }
                }
            }
            Kind::Deployment => {
                if let Some(r) = self.objects.deployments.get(k) {
                    let d = r.obj.clone();
                    if let Some(names) = self.dep_names.get_mut(d.workspace.as_str()) {
                        names.remove(d.name.as_str());
                        if names.is_empty() {
                            self.dep_names.remove(d.workspace.as_str());
                        }
                    }
                    if let Some(slot) = self.workspace_slot(d.workspace.as_str()) {
                        self.refs(slot, |r| r.deployments -= 1);
                    }
                    self.release_domains(&d.domains);
                }
            }
            Kind::Bucket => {
                if let Some(r) = self.objects.buckets.get(k) {
                    let b = r.obj.clone();
                    self.aliases.remove(b.alias.as_str());
                    self.store_names.remove(b.bucket.as_str());
                    if let Some(slot) = self.workspace_slot(b.workspace.as_str()) {
                        self.refs(slot, |r| r.buckets -= 1);
                    }
                    self.release_domains(&b.domains);
                }
            }
        }
    }

    /// Lets go of the custom domains of a deployment or bucket.
    fn release_domains(&mut self, domains: &[DomainEntry]) {
        for dom in domains {
            self.hosts.remove(dom.host.as_str());
            if let Some(parent) = parent_of(dom.host.as_str()) {
                if let Some(list) = self.hosts_under.get_mut(parent) {
                    list.retain(|h| **h != *dom.host.as_str());
                    if list.is_empty() {
                        self.hosts_under.remove(parent);
                    }
                }
            }
        }
    }

    /// Claims the custom domains of a deployment or bucket.
    fn claim_domains(&mut self, kind: Kind, id: &str, origin: Origin, domains: &[DomainEntry]) {
        for dom in domains {
            let claim = Claim { kind, id: id.into(), field: "domains", origin };
            self.hosts.insert(dom.host.as_str().into(), claim);
            if let Some(parent) = parent_of(dom.host.as_str()) {
                self.hosts_under.entry(parent.into()).or_default().push(dom.host.as_str().into());
            }
        }
    }

    /// Puts one new object in place (`None` for a sandbox: the table needs no detail).
    fn install(&mut self, p: Pending) -> Option<Applied> {
        if p.kind == Kind::Sandbox {
            match p.new {
                Some(Object::Sandbox(s)) => {
                    let slot = self.objects.workspaces.get(s.workspace.as_str().as_bytes()).map(|r| r.slot).unwrap_or(u32::MAX);
                    self.objects.sandboxes.insert(SandboxRecord::new(&s, slot, p.origin));
                    self.refs(slot, |r| r.sandboxes += 1);
                }
                _ => {
                    self.objects.sandboxes.remove(p.id().as_bytes());
                }
            }
            return None;
        }
        let id: Box<str> = p.id().into();
        let k = id.as_bytes();
        let o = &mut self.objects;
        Some(match (p.kind, p.new) {
            (Kind::Workspace, new) => {
                let old = o.workspaces.get(k).map(|r| (r.slot, r.obj.clone()));
                let slot = match (&old, &new) {
                    (Some((slot, _)), _) => *slot,
                    (None, _) => self.ws_free.pop().unwrap_or_else(|| {
                        self.ws_next += 1;
                        self.ws_next - 1
                    }),
                };
                let new = match new {
                    Some(Object::Workspace(w)) => {
                        let w = Arc::new(w);
                        self.slugs.insert(w.slug.as_str().into(), id.clone());
                        for (field, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
                            if let Some(d) = d {
                                let claim = Claim { kind: Kind::Workspace, id: id.clone(), field, origin: p.origin };
                                self.hosts.insert(d.host.as_str().into(), claim);
                            }
                        }
                        o.workspaces.insert(WorkspaceRec { obj: w.clone(), origin: p.origin, slot });
                        o.workspace_ids.set(slot, Some(w.id.clone()));
                        Some(w)
                    }
                    _ => {
                        o.workspaces.remove(k);
                        o.workspace_ids.set(slot, None);
                        if let Some(r) = self.ws_refs.get_mut(slot as usize) {
                            *r = Refs::default();
                        }
                        self.ws_free.push(slot);
                        None
                    }
                };
                Applied::Workspace { slot, old: old.map(|x| x.1), new }
            }
            (Kind::ShareToken, new) => {
                let old = o.share_tokens.get(k).map(|r| r.obj.clone());
                let new = match new {
                    Some(Object::ShareToken(t)) => {
                        let t = Arc::new(t);
                        self.share_hashes.insert(t.token_sha256.0, id.clone());
                        self.shares_of.entry(t.sandbox.as_str().into()).or_default().push(id.clone());
                        o.share_tokens.insert(ShareRec { obj: t.clone(), origin: p.origin });
                        Some(t)
                    }
                    _ => {
                        o.share_tokens.remove(k);
                        None
                    }
                };
                Applied::ShareToken { old, new }
            }
            (Kind::Deployment, new) => {
                let old = o.deployments.get(k).map(|r| (r.slot, r.obj.clone()));
                let slot = match &old {
                    Some((slot, _)) => *slot,
                    None => self.dep_free.pop().unwrap_or_else(|| {
                        self.dep_next += 1;
                        self.dep_next - 1
                    }),
                };
                let (new, ws_slot) = match new {
                    Some(Object::Deployment(d)) => {
                        let d = Arc::new(d);
                        let ws_slot = o.workspaces.get(d.workspace.as_str().as_bytes()).map(|r| r.slot).unwrap_or(u32::MAX);
                        self.dep_names.entry(d.workspace.as_str().into()).or_default().insert(d.name.as_str().into(), id.clone());
                        self.refs(ws_slot, |r| r.deployments += 1);
                        self.claim_domains(Kind::Deployment, &id, p.origin, &d.domains);
                        self.objects.deployments.insert(DeploymentRec { obj: d.clone(), origin: p.origin, slot });
                        (Some(d), ws_slot)
                    }
                    _ => {
                        self.objects.deployments.remove(k);
                        self.dep_free.push(slot);
                        (None, u32::MAX)
                    }
                };
                Applied::Deployment { slot, workspace_slot: ws_slot, old: old.map(|x| x.1), new }
            }
            (Kind::Bucket, new) => {
                let old = o.buckets.get(k).map(|r| r.obj.clone());
                let (new, ws_slot) = match new {
                    Some(Object::Bucket(b)) => {
                        let b = Arc::new(b);
                        let ws_slot = o.workspaces.get(b.workspace.as_str().as_bytes()).map(|r| r.slot).unwrap_or(u32::MAX);
                        self.aliases.insert(b.alias.as_str().into(), id.clone());
                        self.store_names.insert(b.bucket.as_str().into(), id.clone());
                        self.refs(ws_slot, |r| r.buckets += 1);
                        self.claim_domains(Kind::Bucket, &id, p.origin, &b.domains);
                        self.objects.buckets.insert(BucketRec { obj: b.clone(), origin: p.origin });
                        (Some(b), ws_slot)
                    }
                    _ => {
                        self.objects.buckets.remove(k);
                        (None, u32::MAX)
                    }
                };
                Applied::Bucket { workspace_slot: ws_slot, old, new }
            }
            // Put in place above.
            (Kind::Sandbox, _) => return None,
        })
    }

    fn refs(&mut self, slot: u32, f: impl FnOnce(&mut Refs)) {
        let i = slot as usize;
        if i >= self.ws_refs.len() {
            if slot == u32::MAX {
                return; // no workspace (refused before it gets here)
            }
            self.ws_refs.resize(i + 1, Refs::default());
        }
        f(&mut self.ws_refs[i]);
    }
}

/// The ops that put every object of `state` in place, named `{prefix}{kind}[{i}]`.
pub fn push_state(ops: &mut Vec<BatchOp>, state: &State, origin: Origin, prefix: &str) {
    let mut push =
        |kind: Kind, i: usize, o: Object| ops.push(BatchOp { path: format!("{prefix}{}[{i}]", kind.field()), origin, op: Op::Upsert(o) });
    for (i, o) in state.workspaces.iter().enumerate() {
        push(Kind::Workspace, i, Object::Workspace(o.clone()));
    }
    for (i, o) in state.sandboxes.iter().enumerate() {
        push(Kind::Sandbox, i, Object::Sandbox(o.clone()));
    }
    for (i, o) in state.share_tokens.iter().enumerate() {
        push(Kind::ShareToken, i, Object::ShareToken(o.clone()));
    }
    for (i, o) in state.deployments.iter().enumerate() {
        push(Kind::Deployment, i, Object::Deployment(o.clone()));
    }
    for (i, o) in state.buckets.iter().enumerate() {
        push(Kind::Bucket, i, Object::Bucket(o.clone()));
    }
}

/// [`push_state`] taking the objects out of `state` instead of copying them (large states
/// read from disk).
pub fn push_state_owned(ops: &mut Vec<BatchOp>, state: State, origin: Origin, prefix: &str) {
    let mut push =
        |kind: Kind, i: usize, o: Object| ops.push(BatchOp { path: format!("{prefix}{}[{i}]", kind.field()), origin, op: Op::Upsert(o) });
    for (i, o) in state.workspaces.into_iter().enumerate() {
        push(Kind::Workspace, i, Object::Workspace(o));
    }
    for (i, o) in state.sandboxes.into_iter().enumerate() {
        push(Kind::Sandbox, i, Object::Sandbox(o));
    }
    for (i, o) in state.share_tokens.into_iter().enumerate() {
        push(Kind::ShareToken, i, Object::ShareToken(o));
    }
    for (i, o) in state.deployments.into_iter().enumerate() {
        push(Kind::Deployment, i, Object::Deployment(o));
    }
    for (i, o) in state.buckets.into_iter().enumerate() {
        push(Kind::Bucket, i, Object::Bucket(o));
    }
}

/// `path.field`, or `field` for an empty path.
fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// The state a batch leads to: the index, with the batch's objects over it.
struct View<'a> {
    index: &'a Index,
    pending: &'a [Pending],
    at: HashMap<(Kind, &'a str), usize>,
    /// The tenant domains the batch's workspaces claim → their workspace.
    tenants: HashMap<&'a str, &'a str>,
}

impl<'a> View<'a> {
    fn pending(&self, kind: Kind, id: &str) -> Option<&'a Pending> {
        self.at.get(&(kind, id)).map(|&i| &self.pending[i])
    }

    /// Whether the workspace `id` exists once the batch is applied.
    fn workspace_exists(&self, id: &str) -> bool {
        match self.pending(Kind::Workspace, id) {
            Some(p) => p.new.is_some(),
            None => self.index.objects.workspaces.contains(id.as_bytes()),
        }
    }

    /// The ports of sandbox `id` once the batch is applied (`None`: it does not exist).
    fn sandbox_ports(&self, id: &str) -> Option<Vec<u16>> {
        match self.pending(Kind::Sandbox, id) {
            Some(Pending { new: Some(Object::Sandbox(s)), .. }) => Some(s.previews.iter().map(|p| p.port.0).collect()),
            Some(_) => None,
            None => self.index.objects.sandboxes.get(id.as_bytes()).map(|r| r.previews().map(|p| p.0).collect()),
        }
    }

    /// The workspace whose tenant domain is exactly `domain` once the batch is applied.
    fn tenant_owner(&self, domain: &str) -> Option<&str> {
        if let Some(ws) = self.tenants.get(domain) {
            return Some(ws);
        }
        let claim = self.index.hosts.get(domain).filter(|c| c.kind == Kind::Workspace)?;
        // A pending version of that workspace replaces its claims (checked above).
        self.pending(Kind::Workspace, &claim.id).is_none().then_some(&*claim.id)
    }

    /// Each new object's own rules.
    fn check_objects(&self, errors: &mut Vec<(usize, StateError)>) {
        let domains = &self.index.domains;
        for p in self.pending {
            let mut err = |f: String, m: String| errors.push((p.op_index, StateError { path: join(&p.path, &f), message: m }));
            match &p.new {
                Some(Object::Workspace(w)) => rules::workspace(w, domains, &mut err),
                Some(Object::Sandbox(s)) => rules::sandbox(s, &mut err),
                Some(Object::Deployment(d)) => rules::deployment(d, domains, &mut err),
                Some(Object::Bucket(b)) => rules::bucket(b, domains, &mut err),
                Some(Object::ShareToken(_)) | None => {}
            }
        }
    }

    /// One claimant per host, slug, token hash and (workspace, name).
    fn check_claims(&self, errors: &mut Vec<(usize, StateError)>, conflict: &mut Option<StateError>) {
        let idx = self.index;
        // Claims the batch makes, in op order; the state's own claimants count first
        // unless the batch replaces them.
        let mut slugs: HashMap<&str, &Pending> = HashMap::default();
        let mut hashes: HashMap<[u8; 32], &Pending> = HashMap::default();
        let mut names: HashMap<(&str, &str), &Pending> = HashMap::default();
        let mut aliases: HashMap<&str, &Pending> = HashMap::default();
        let mut store_names: HashMap<&str, &Pending> = HashMap::default();
        let mut hosts: HashMap<&str, (&Pending, &'static str)> = HashMap::default();
        let mut ordered: Vec<&Pending> = self.pending.iter().collect();
        ordered.sort_by_key(|p| p.op_index);
        for p in ordered {
            let mut err = |f: String, m: String| errors.push((p.op_index, StateError { path: join(&p.path, &f), message: m }));
            match &p.new {
                Some(Object::Workspace(w)) => {
                    let slug = w.slug.as_str();
                    if let Some(prev) = slugs.get(slug) {
                        err("slug".into(), format!("slug `{slug}` is already used by workspace `{}`", prev.id()));
                    } else if let Some(owner) = idx.slugs.get(slug).filter(|o| self.pending(Kind::Workspace, o).is_none()) {
                        err("slug".into(), format!("slug `{slug}` is already used by workspace `{owner}`"));
                    } else {
                        slugs.insert(slug, p);
                    }
                    for (field, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
                        let Some(d) = d else { continue };
                        if rules::platform_suffix_of(d.host.as_str(), &idx.domains).is_some() {
                            continue; // reported by the object's own rules
                        }
                        self.claim_host(p, d.host.as_str(), field, &format!("{field}.host"), &mut hosts, errors, conflict);
                    }
                }
                Some(Object::ShareToken(t)) => {
                    let taken = hashes.contains_key(&t.token_sha256.0)
                        || idx.share_hashes.get(&t.token_sha256.0).is_some_and(|o| self.pending(Kind::ShareToken, o).is_none());
                    if taken {
                        err("token_sha256".into(), "the same token hash is used by another share token".into());
                    } else {
                        hashes.insert(t.token_sha256.0, p);
                    }
                }
                Some(Object::Deployment(d)) => {
                    let key = (d.workspace.as_str(), d.name.as_str());
                    let owner = idx
                        .dep_names
                        .get(key.0)
                        .and_then(|names| names.get(key.1))
                        .filter(|o| self.pending(Kind::Deployment, o).is_none())
                        .is_some();
                    if names.contains_key(&key) || owner {
                        err("name".into(), format!("workspace `{}` already has a deployment named `{}`", d.workspace, d.name));
                    } else {
                        names.insert(key, p);
                    }
                    for (j, dom) in d.domains.iter().enumerate() {
                        if rules::deployment_host_conflict(dom.host.as_str(), &idx.domains).is_some() {
                            continue; // reported by the object's own rules
                        }
                        let path = format!("domains[{j}].host");
                        self.claim_host(p, dom.host.as_str(), "domains", &path, &mut hosts, errors, conflict);
                    }
                }
                Some(Object::Bucket(b)) => {
                    let alias = b.alias.as_str();
                    if let Some(prev) = aliases.get(alias) {
                        err("alias".into(), format!("alias `{alias}` is already used by bucket `{}`", prev.id()));
                    } else if let Some(owner) = idx.aliases.get(alias).filter(|o| self.pending(Kind::Bucket, o).is_none()) {
                        err("alias".into(), format!("alias `{alias}` is already used by bucket `{owner}`"));
                    } else {
                        aliases.insert(alias, p);
                    }
                    let name = b.bucket.as_str();
                    if let Some(prev) = store_names.get(name) {
                        err("bucket".into(), format!("store bucket `{name}` is already served by bucket `{}`", prev.id()));
                    } else if let Some(owner) = idx.store_names.get(name).filter(|o| self.pending(Kind::Bucket, o).is_none()) {
                        err("bucket".into(), format!("store bucket `{name}` is already served by bucket `{owner}`"));
                    } else {
                        store_names.insert(name, p);
                    }
                    for (j, dom) in b.domains.iter().enumerate() {
                        if rules::deployment_host_conflict(dom.host.as_str(), &idx.domains).is_some() {
                            continue; // reported by the object's own rules
                        }
                        let path = format!("domains[{j}].host");
                        self.claim_host(p, dom.host.as_str(), "domains", &path, &mut hosts, errors, conflict);
                    }
                }
                Some(Object::Sandbox(_)) | None => {}
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn claim_host(
        &self,
        p: &'a Pending,
        host: &'a str,
        field: &'static str,
        path: &str,
        hosts: &mut HashMap<&'a str, (&'a Pending, &'static str)>,
        errors: &mut Vec<(usize, StateError)>,
        conflict: &mut Option<StateError>,
    ) {
        let error = |m: String| StateError { path: join(&p.path, path), message: m };
        if let Some((prev, f)) = hosts.get(host) {
            let who = claimant(prev.kind, prev.id(), f);
            errors.push((p.op_index, error(format!("host `{host}` is already claimed by {who}"))));
            return;
        }
        if let Some(c) = self.index.hosts.get(host).filter(|c| self.pending(c.kind, &c.id).is_none()) {
            if c.origin != p.origin && c.origin == Origin::Toml {
                conflict.get_or_insert_with(|| error(format!("host `{host}` is pinned by the TOML file")));
            } else {
                errors.push((p.op_index, error(format!("host `{host}` is already claimed by {}", c.describe()))));
            }
            return;
        }
        hosts.insert(host, (p, field));
    }

    /// References on the final state.
    fn check_references(&self, errors: &mut Vec<(usize, StateError)>) {
        let idx = self.index;
        // Workspaces the batch takes references from or gives references to.
        let mut refs_delta: HashMap<&str, i64> = HashMap::default();
        for p in self.pending {
            let mut err = |f: &str, m: String| errors.push((p.op_index, StateError { path: join(&p.path, f), message: m }));
            let k = p.id().as_bytes();
            // The reference the old version held.
            let old_ws: Option<&str> = match p.kind {
                Kind::Sandbox => {
                    idx.objects.sandboxes.get(k).and_then(|r| idx.objects.workspace_ids.get(r.workspace)).map(WorkspaceId::as_str)
                }
                Kind::Deployment => idx.objects.deployments.get(k).map(|r| r.obj.workspace.as_str()),
                Kind::Bucket => idx.objects.buckets.get(k).map(|r| r.obj.workspace.as_str()),
                _ => None,
            };
            if let Some(w) = old_ws {
                *refs_delta.entry(w).or_default() -= 1;
            }
            match &p.new {
                Some(Object::Sandbox(s)) => {
                    *refs_delta.entry(s.workspace.as_str()).or_default() += 1;
                    if !self.workspace_exists(s.workspace.as_str()) {
                        err("workspace", format!("workspace `{}` does not exist", s.workspace));
                    }
                }
                Some(Object::Deployment(Deployment { workspace, domains, .. }) | Object::Bucket(Bucket { workspace, domains, .. })) => {
                    *refs_delta.entry(workspace.as_str()).or_default() += 1;
                    if !self.workspace_exists(workspace.as_str()) {
                        err("workspace", format!("workspace `{workspace}` does not exist"));
                    }
                    for (j, dom) in domains.iter().enumerate() {
                        let h = dom.host.as_str();
                        let Some(parent) = parent_of(h) else { continue };
                        if let Some(owner) = self.tenant_owner(parent) {
                            if owner != workspace.as_str() {
                                err(&format!("domains[{j}].host"), format!("`{h}` is under workspace `{owner}`'s domain `{parent}`"));
                            }
                        }
                    }
                }
                Some(Object::ShareToken(t)) => match self.sandbox_ports(t.sandbox.as_str()) {
                    None => err("sandbox", format!("sandbox `{}` does not exist", t.sandbox)),
                    Some(ports) => {
                        if let Some(port) = t.port.filter(|p| !ports.contains(&p.0)) {
                            err("port", format!("sandbox `{}` has no preview on port {}", t.sandbox, port.0));
                        }
                    }
                },
                Some(Object::Workspace(w)) => {
                    // A new tenant domain may hold only this workspace's deployment and bucket hosts.
                    for (field, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
                        let Some(d) = d else { continue };
                        for h in idx.hosts_under.get(d.host.as_str()).into_iter().flatten() {
                            let Some(c) = idx.hosts.get(h).filter(|c| matches!(c.kind, Kind::Deployment | Kind::Bucket)) else { continue };
                            if self.pending(c.kind, &c.id).is_some() {
                                continue; // checked with the object's new version
                            }
                            let owner = match c.kind {
                                Kind::Bucket => idx.objects.buckets.get(c.id.as_bytes()).map(|r| r.obj.workspace.clone()),
                                _ => idx.objects.deployments.get(c.id.as_bytes()).map(|r| r.obj.workspace.clone()),
                            };
                            if owner.is_some_and(|o| o.as_str() != w.id.as_str()) {
                                let who = claimant(c.kind, &c.id, c.field);
                                err(&format!("{field}.host"), format!("`{h}` of {who} is under this domain `{}`", d.host));
                            }
                        }
                    }
                }
                None => {}
            }
            // A sandbox that changes or goes must still fit the shares that name it.
            if p.kind == Kind::Sandbox {
                let ports = self.sandbox_ports(p.id());
                for share in idx.shares_of.get(p.id()).into_iter().flatten() {
                    if self.pending(Kind::ShareToken, share).is_some() {
                        continue; // checked with the share's new version
                    }
                    let Some(t) = idx.objects.share_tokens.get(share.as_bytes()) else { continue };
                    match (&ports, t.obj.port) {
                        (None, _) => err("", format!("sandbox `{}` is still used by share token `{share}`", p.id())),
                        (Some(ports), Some(port)) if !ports.contains(&port.0) => {
                            err("previews", format!("share token `{share}` opens port {} of sandbox `{}`", port.0, p.id()))
                        }
                        _ => {}
                    }
                }
            }
        }
        // A workspace that goes must be unused.
        for p in self.pending.iter().filter(|p| p.kind == Kind::Workspace && p.new.is_none()) {
            let r = idx.workspace_slot(p.id()).and_then(|s| idx.ws_refs.get(s as usize)).copied().unwrap_or_default();
            let left = (r.sandboxes + r.deployments + r.buckets) as i64 + refs_delta.get(p.id()).copied().unwrap_or(0);
            if left > 0 {
                let message = format!("workspace `{}` is still used by {left} sandbox(es), deployment(s) or bucket(s)", p.id());
                errors.push((p.op_index, StateError { path: p.path.clone(), message }));
            }
        }
    }
}

#[cfg(test)]
mod tests;
