//! Host classification and the immutable [`RouteTable`] snapshot (CONTRACT §1).
//!
//! Readers: each request does one `ArcSwap::load` of the published table and keeps that
//! `Arc` to its end, so a request never sees two tables. Lookup is allocation-free: the
//! host is normalised into a stack buffer ([`normalize_host`]) and matched in
//! copy-on-write maps ([`crate::cow`]) keyed by the exact strings that occur in hosts.
//!
//! Writers: the store applies each committed change to a copy of the table
//! ([`RouteTable::apply`]) — a copy shares every map with the table it came from, and
//! changing one entry copies one small leaf — then publishes it with one store. The
//! sandboxes map *is* the state's (`state::Objects::sandboxes`): a million sandboxes are
//! kept once.
//!
//! Precedence (first match wins): exact deployment or bucket host →
//! `{port}-{sandbox}.{sandbox}` → `{name}.{slug}.{apps}` →
//! `{port}-{sandbox}.{tenant preview domain}` → `{name}.{tenant deploy domain}` →
//! `{alias}.{storage}` and the bare `{storage}` host → unknown host.

use crate::access::{Credentials, Keys, ShareEntry};
use crate::codes::ErrorCode;
use crate::cow::{CowMap, CowSlab, Key, Keyed};
use crate::pages::Pages;
use crate::schema::{self, Access, Deployment, Release, State, Workspace};
use crate::schema::{Domains, PlatformBranding};
use crate::state::{Applied, Index, Objects, Refusal, SandboxRecord};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

pub mod instance;

pub use instance::Instance;

/// The published table: readers `load()` it once per request.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// A sandbox as the request path reads it: the state's own record.
pub type SandboxEntry = SandboxRecord;

/// A workspace as the request path needs it.
#[derive(Debug, Clone)]
pub struct WorkspaceEntry {
    pub id: Box<str>,
    pub slug: Box<str>,
    /// Branding index for platform hosts (`*.miosa.app`).
    pub branding: u32,
    /// Branding index for the tenant's own hosts: never the platform's.
    pub tenant_branding: u32,
}

/// What a deployment's active version serves.
#[derive(Debug)]
pub enum ActiveRelease {
    Dynamic { instances: Box<[Instance]>, next: AtomicUsize, balance: schema::Balance, health_check: Option<Box<schema::HealthCheck>> },
    Static { sha256: schema::Sha256, spa: bool },
}

/// A deployment as the request path needs it.
#[derive(Debug)]
pub struct DeploymentEntry {
    pub id: Box<str>,
    pub workspace: u32,
    pub name: Box<str>,
    pub active_version: Box<str>,
    pub release: ActiveRelease,
}

impl DeploymentEntry {
    fn new(d: &Deployment, workspace: u32) -> DeploymentEntry {
        let release = match d.versions.iter().find(|v| v.id == d.active_version).map(|v| &v.release) {
            Some(Release::Dynamic { instances, balance, health_check }) => ActiveRelease::Dynamic {
                instances: instances.iter().map(|a| Instance { addr: a.0, health: instance::health_of(a.0) }).collect(),
                next: AtomicUsize::new(0),
                balance: *balance,
                health_check: health_check.clone().map(Box::new),
            },
            Some(Release::Static { sha256, spa }) => ActiveRelease::Static { sha256: *sha256, spa: *spa },
            // A checked deployment always has its active version; none serves nothing.
            None => ActiveRelease::Dynamic {
                instances: Box::new([]),
                next: AtomicUsize::new(0),
                balance: Default::default(),
                health_check: None,
            },
        };
        DeploymentEntry {
            id: d.id.as_str().into(),
            workspace,
            name: d.name.as_str().into(),
            active_version: d.active_version.as_str().into(),
            release,
        }
    }

    /// The SHA-256 of the active version's static release, if it is one.
    pub fn static_release(&self) -> Option<[u8; 32]> {
        match &self.release {
            ActiveRelease::Static { sha256, .. } => Some(sha256.0),
            ActiveRelease::Dynamic { .. } => None,
        }
    }

    /// Chooses an instance of the active version ([`instance::pick`]); `None` for a
    /// static release or when every instance fails its health check.
    pub fn pick_instance(&self, skip: Option<SocketAddr>, now_ms: u64) -> Option<&Instance> {
        let ActiveRelease::Dynamic { instances, next, balance, .. } = &self.release else { return None };
        instance::pick(instances, next, *balance, skip, now_ms)
    }
}

/// A storage bucket as the request path needs it (CONTRACT §12).
#[derive(Debug)]
pub struct BucketEntry {
    pub id: Box<str>,
    pub workspace: u32,
    /// The store's name for it.
    pub bucket: Box<str>,
    /// Every object is public.
    pub public: bool,
}

/// A bucket by its alias, or by one of its domains.
#[derive(Debug, Clone)]
struct BucketKey {
    key: Key,
    bucket: Arc<BucketEntry>,
    verified: bool,
}

/// An exact host of a deployment.
#[derive(Debug, Clone)]
struct ExactHost {
    host: Key,
    deployment: u32,
    verified: bool,
}

/// A workspace's tenant domain.
#[derive(Debug, Clone)]
struct TenantDomain {
    host: Key,
    workspace: u32,
    verified: bool,
    /// A preview domain (else a deploy domain).
    preview: bool,
}

/// A name (a slug, or a deployment's name within its workspace) → a slot.
#[derive(Debug, Clone)]
struct Named {
    key: Key,
    slot: u32,
}

/// How often a static release is named by versions, and by active ones.
#[derive(Debug, Clone)]
struct ReleaseUse {
    sha256: [u8; 32],
    versions: u32,
    active: u32,
}

macro_rules! keyed {
    ($($t:ty => $f:ident),*) => {$(
        impl Keyed for $t {
            fn key(&self) -> &[u8] {
                self.$f.as_bytes()
            }
        }
    )*};
}
keyed!(ExactHost => host, TenantDomain => host, Named => key, BucketKey => key);

impl Keyed for ReleaseUse {
    fn key(&self) -> &[u8] {
        &self.sha256
    }
}

/// `{workspace slot}{name}`: the key of a deployment name within its workspace.
fn name_key<'b>(workspace: u32, name: &str, buf: &'b mut [u8; 96]) -> Option<&'b [u8]> {
    let n = name.len();
    if n + 4 > buf.len() {
        return None;
    }
    buf[..4].copy_from_slice(&workspace.to_le_bytes());
    buf[4..4 + n].copy_from_slice(name.as_bytes());
    Some(&buf[..4 + n])
}

fn name_entry(workspace: u32, name: &str, slot: u32) -> Option<Named> {
    let mut buf = [0u8; 96];
    // The key is bytes: the slot's four bytes, then the (ASCII) name.
    let k = name_key(workspace, name, &mut buf)?;
    Some(Named { key: Key::from_bytes(k), slot })
}

/// The outcome of a host lookup, borrowing from the table.
#[derive(Debug)]
pub enum Route<'t> {
    /// A listed preview port of an existing sandbox.
    Preview { sandbox_id: &'t str, sandbox: &'t SandboxEntry, port: u16, access: Access, tenant_host: bool },
    /// A deployment's active version.
    Deployment { deployment: &'t DeploymentEntry, index: u32, tenant_host: bool },
    /// Public objects of a bucket (`{alias}.{storage}` or one of its domains).
    Bucket { bucket: &'t BucketEntry, tenant_host: bool },
    /// The bare `{storage}` host: the S3 endpoint, proxied to the store.
    StorageEndpoint,
    /// An edge-generated answer; `branding` indexes [`Pages`].
    Denied { code: ErrorCode, workspace: Option<u32>, branding: u32, preview: bool },
}

/// The routing snapshot.
#[derive(Clone)]
pub struct RouteTable {
    pub generation: u64,
    pub domains: Arc<Domains>,
    pub pages: Arc<Pages>,
    workspaces: CowSlab<WorkspaceEntry>,
    ws_by_slug: CowMap<Named>,
    sandboxes: CowMap<SandboxRecord>,
    deployments: CowSlab<Arc<DeploymentEntry>>,
    /// (workspace slot, name) → deployment slot: app URLs and tenant deploy domains.
    dep_by_name: CowMap<Named>,
    exact: CowMap<ExactHost>,
    tenant_domains: CowMap<TenantDomain>,
    shares: CowMap<ShareEntry>,
    /// Every static release named by a version, and how many active versions name it.
    releases: CowMap<ReleaseUse>,
    /// Buckets by alias (`{alias}.{storage}`).
    bucket_aliases: CowMap<BucketKey>,
    /// Buckets by custom domain.
    bucket_hosts: CowMap<BucketKey>,
    /// Buckets by their name in the store (egress through the S3 endpoint).
    bucket_names: CowMap<BucketKey>,
    /// Token and session keys in force with this table (one snapshot per request).
    pub access: Arc<Keys>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("generation", &self.generation)
            .field("workspaces", &self.workspaces.len())
            .field("sandboxes", &self.sandboxes.len())
            .field("deployments", &self.deployments.len())
            .finish()
    }
}

/// Why a table could not be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid routing state: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct BuildError(pub Vec<schema::StateError>);

impl From<Refusal> for BuildError {
    fn from(r: Refusal) -> BuildError {
        BuildError(match r {
            Refusal::Invalid(errs) => errs,
            Refusal::Conflict(e) => vec![e],
            Refusal::NotFound(m) => vec![schema::StateError { path: String::new(), message: m }],
        })
    }
}

impl RouteTable {
    /// Checks `state` whole and builds its table (tests, benches, tools). Pure: no I/O.
    pub fn build(domains: &Domains, branding: &PlatformBranding, state: &State, generation: u64) -> Result<RouteTable, BuildError> {
        let index = Index::build(domains.clone(), state, &State::default())?;
        Ok(RouteTable::from_state(index.objects(), domains, branding, generation))
    }

    /// An empty table (no routes): every host is unknown.
    pub fn empty(domains: &Domains, branding: &PlatformBranding) -> RouteTable {
        RouteTable::from_state(&Objects::default(), domains, branding, 0)
    }

    /// The table of a whole checked state.
    pub fn from_state(objects: &Objects, domains: &Domains, branding: &PlatformBranding, generation: u64) -> RouteTable {
        let mut t = RouteTable {
            generation,
            domains: Arc::new(domains.clone()),
            pages: Arc::new(Pages::new(branding)),
            workspaces: CowSlab::default(),
            ws_by_slug: CowMap::new(),
            sandboxes: objects.sandboxes.clone(),
            deployments: CowSlab::default(),
            dep_by_name: CowMap::new(),
            exact: CowMap::new(),
            tenant_domains: CowMap::new(),
            shares: CowMap::new(),
            releases: CowMap::new(),
            bucket_aliases: CowMap::new(),
            bucket_hosts: CowMap::new(),
            bucket_names: CowMap::new(),
            access: Arc::new(Keys::none()),
        };
        for w in objects.workspaces.iter() {
            t.put_workspace(w.slot, None, Some(&w.obj));
        }
        for d in objects.deployments.iter() {
            let ws = objects.workspaces.get(d.obj.workspace.as_str().as_bytes()).map(|w| w.slot).unwrap_or(u32::MAX);
            t.put_deployment(d.slot, ws, None, Some(&d.obj));
        }
        for s in objects.share_tokens.iter() {
            t.put_share(None, Some(&s.obj));
        }
        for b in objects.buckets.iter() {
            let ws = objects.workspaces.get(b.obj.workspace.as_str().as_bytes()).map(|w| w.slot).unwrap_or(u32::MAX);
            t.put_bucket(ws, None, Some(&b.obj));
        }
        t
    }

    /// The next table: this one with `changes` (just committed to `objects`) applied,
    /// at `generation`. Costs what the changes cost, not what the table holds.
    pub fn apply(&self, changes: &[Applied], objects: &Objects, generation: u64) -> RouteTable {
        let mut t = self.clone();
        t.generation = generation;
        t.sandboxes = objects.sandboxes.clone();
        // Every old version lets go first, then the new ones take their keys: a host, slug,
        // alias or token hash that moves from one object to another in one batch ends up
        // with its new owner whatever the order of the ops.
        for c in changes {
            t.put(c, true);
        }
        for c in changes {
            t.put(c, false);
        }
        t
    }

    /// One change's old version out (`remove`), or its new version in.
    fn put(&mut self, c: &Applied, remove: bool) {
        fn pick<'a, T>(remove: bool, old: &'a Option<Arc<T>>, new: &'a Option<Arc<T>>) -> (Option<&'a T>, Option<&'a T>) {
            if remove {
                (old.as_deref(), None)
            } else {
                (None, new.as_deref())
            }
        }
        match c {
            Applied::Workspace { slot, old, new } => {
                // A slot emptied by the first pass is filled again by the second (the
                // table is published only once both are done).
                let (old, new) = pick(remove, old, new);
                self.put_workspace(*slot, old, new);
            }
            Applied::Sandbox => {}
            Applied::ShareToken { old, new } => {
                let (old, new) = pick(remove, old, new);
                self.put_share(old, new);
            }
            Applied::Deployment { slot, workspace_slot, old, new } => {
                let (old, new) = pick(remove, old, new);
                self.put_deployment(*slot, *workspace_slot, old, new);
            }
            Applied::Bucket { workspace_slot, old, new } => {
                let (old, new) = pick(remove, old, new);
                self.put_bucket(*workspace_slot, old, new);
            }
        }
    }

    /// The same table with `keys` in force.
    pub fn with_access(mut self, keys: Arc<Keys>) -> RouteTable {
        self.access = keys;
        self
    }

    fn put_workspace(&mut self, slot: u32, old: Option<&Workspace>, new: Option<&Workspace>) {
        if let Some(w) = old {
            self.ws_by_slug.remove(w.slug.as_str().as_bytes());
            for d in [&w.preview_domain, &w.deploy_domain].into_iter().flatten() {
                self.tenant_domains.remove(d.host.as_str().as_bytes());
            }
        }
        let Some(w) = new else {
            self.workspaces.set(slot, None);
            return;
        };
        let (branding, tenant_branding) = match &w.branding {
            Some(b) => {
                let i = match self.pages.find_workspace_branding(b) {
                    Some(i) => i,
                    // Rendered once per distinct branding; kept until the next full build.
                    None => Arc::make_mut(&mut self.pages).add_workspace_branding(b),
                };
                (i, i)
            }
            None => (Pages::PLATFORM, Pages::NEUTRAL),
        };
        self.workspaces
            .set(slot, Some(WorkspaceEntry { id: w.id.as_str().into(), slug: w.slug.as_str().into(), branding, tenant_branding }));
        self.ws_by_slug.insert(Named { key: Key::from(w.slug.as_str()), slot });
        for (d, preview) in [(&w.preview_domain, true), (&w.deploy_domain, false)] {
            if let Some(d) = d {
                self.tenant_domains.insert(TenantDomain {
                    host: Key::from(d.host.as_str()),
                    workspace: slot,
                    verified: d.verified,
                    preview,
                });
            }
        }
    }

    fn put_deployment(&mut self, slot: u32, workspace: u32, old: Option<&Deployment>, new: Option<&Deployment>) {
        if let Some(d) = old {
            let ws = self.deployments.get(slot).map(|e| e.workspace).unwrap_or(u32::MAX);
            let mut buf = [0u8; 96];
            if let Some(k) = name_key(ws, d.name.as_str(), &mut buf) {
                self.dep_by_name.remove(k);
            }
            for dom in &d.domains {
                self.exact.remove(dom.host.as_str().as_bytes());
            }
            self.count_releases(d, -1);
        }
        let Some(d) = new else {
            self.deployments.set(slot, None);
            return;
        };
        self.deployments.set(slot, Some(Arc::new(DeploymentEntry::new(d, workspace))));
        if let Some(e) = name_entry(workspace, d.name.as_str(), slot) {
            self.dep_by_name.insert(e);
        }
        for dom in &d.domains {
            self.exact.insert(ExactHost { host: Key::from(dom.host.as_str()), deployment: slot, verified: dom.verified });
        }
        self.count_releases(d, 1);
    }

    fn count_releases(&mut self, d: &Deployment, by: i32) {
        for v in &d.versions {
            let Release::Static { sha256, .. } = &v.release else { continue };
            let active = i32::from(v.id == d.active_version) * by;
            let mut u = self.releases.get(&sha256.0).cloned().unwrap_or(ReleaseUse { sha256: sha256.0, versions: 0, active: 0 });
            u.versions = u.versions.saturating_add_signed(by);
            u.active = u.active.saturating_add_signed(active);
            if u.versions == 0 {
                self.releases.remove(&sha256.0);
            } else {
                self.releases.insert(u);
            }
        }
    }

    fn put_bucket(&mut self, workspace: u32, old: Option<&schema::Bucket>, new: Option<&schema::Bucket>) {
        if let Some(b) = old {
            self.bucket_aliases.remove(b.alias.as_str().as_bytes());
            self.bucket_names.remove(b.bucket.as_str().as_bytes());
            for d in &b.domains {
                self.bucket_hosts.remove(d.host.as_str().as_bytes());
            }
        }
        let Some(b) = new else { return };
        let entry = Arc::new(BucketEntry { id: b.id.as_str().into(), workspace, bucket: b.bucket.as_str().into(), public: b.public });
        self.bucket_aliases.insert(BucketKey { key: Key::from(b.alias.as_str()), bucket: entry.clone(), verified: true });
        self.bucket_names.insert(BucketKey { key: Key::from(b.bucket.as_str()), bucket: entry.clone(), verified: true });
        for d in &b.domains {
            self.bucket_hosts.insert(BucketKey { key: Key::from(d.host.as_str()), bucket: entry.clone(), verified: d.verified });
        }
    }

    fn put_share(&mut self, old: Option<&schema::ShareToken>, new: Option<&schema::ShareToken>) {
        if let Some(t) = old {
            self.shares.remove(&t.token_sha256.0);
        }
        if let Some(t) = new {
            self.shares.insert(ShareEntry {
                sha256: t.token_sha256.0,
                id: t.id.as_str().into(),
                sandbox: t.sandbox.as_str().into(),
                port: t.port.map(|p| p.0),
                expires_at: t.expires_at.map(|e| e.0),
                password_hash: t.password_hash.as_ref().map(|h| Arc::from(h.as_str())),
            });
        }
    }

    /// A workspace by slot (as found in routes).
    pub fn workspace(&self, slot: u32) -> Option<&WorkspaceEntry> {
        self.workspaces.get(slot)
    }

    /// A deployment by slot (as found in routes).
    pub fn deployment(&self, slot: u32) -> Option<&DeploymentEntry> {
        self.deployments.get(slot).map(|d| &**d)
    }

    /// Every deployment.
    pub fn deployments(&self) -> impl Iterator<Item = &DeploymentEntry> + '_ {
        self.deployments.iter().map(|(_, d)| &**d)
    }

    /// Every static release named by a version of a deployment (fetched ahead of
    /// activation), with whether it is some deployment's active release.
    pub fn static_releases(&self) -> impl Iterator<Item = ([u8; 32], bool)> + '_ {
        self.releases.iter().map(|u| (u.sha256, u.active > 0))
    }

    /// Whether a version names static release `sha`, and whether an active one does.
    pub fn static_release(&self, sha: &[u8; 32]) -> Option<bool> {
        self.releases.get(sha).map(|u| u.active > 0)
    }

    /// A share record by its token's SHA-256.
    pub fn share(&self, sha256: &[u8; 32]) -> Option<&ShareEntry> {
        self.shares.get(sha256)
    }

    /// The bucket whose store name is `name` (the first segment of an S3 endpoint path).
    pub fn bucket_named(&self, name: &str) -> Option<&BucketEntry> {
        self.bucket_names.get(name.as_bytes()).map(|b| &*b.bucket)
    }

    /// Number of buckets in the table.
    pub fn bucket_count(&self) -> usize {
        self.bucket_aliases.len()
    }

    /// Number of sandboxes in the table.
    pub fn sandbox_count(&self) -> usize {
        self.sandboxes.len()
    }

    /// Classifies a normalised host (see [`normalize_host`]). Allocation-free.
    pub fn lookup(&self, host: &str) -> Route<'_> {
        // 2. `{port}-{sandbox}.{sandbox zone}`. Checked before the exact hosts only
        // because validation refuses exact hosts in the sandbox zone, so the order of
        // CONTRACT §1 is kept and previews skip one hash probe.
        if let Some(label) = first_label_under(host, &self.domains.sandbox) {
            if let Some((port, id)) = split_port_label(label) {
                return self.preview(id, port, None);
            }
        }
        // 6. `{alias}.{storage}` and the bare `{storage}` host: as with the sandbox zone,
        // validation keeps every other route out of the storage zone.
        if host == self.domains.storage.as_str() {
            return Route::StorageEndpoint;
        }
        if let Some(alias) = first_label_under(host, &self.domains.storage) {
            return match self.bucket_aliases.get(alias.as_bytes()) {
                Some(b) => Route::Bucket { bucket: &b.bucket, tenant_host: false },
                None => self.denied(ErrorCode::UnknownHost, None, Pages::PLATFORM, false),
            };
        }
        // 1. Exact deployment and bucket hosts.
        if let Some(e) = self.exact.get(host.as_bytes()) {
            if let Some(dep) = self.deployment(e.deployment) {
                if !e.verified {
                    return self.denied(ErrorCode::DomainNotVerified, Some(dep.workspace), self.tenant_branding(dep.workspace), false);
                }
                return Route::Deployment { deployment: dep, index: e.deployment, tenant_host: true };
            }
        }
        if let Some(b) = self.bucket_hosts.get(host.as_bytes()) {
            if !b.verified {
                let ws = b.bucket.workspace;
                return self.denied(ErrorCode::DomainNotVerified, Some(ws), self.tenant_branding(ws), false);
            }
            return Route::Bucket { bucket: &b.bucket, tenant_host: true };
        }
        // 3. `{name}.{slug}.{apps}`.
        if let Some(rest) = strip_zone(host, &self.domains.apps) {
            if let Some((name, slug)) = rest.split_once('.') {
                if !slug.contains('.') {
                    if let Some(ws) = self.ws_by_slug.get(slug.as_bytes()) {
                        if let Some((dep, slot)) = self.named_deployment(ws.slot, name) {
                            return Route::Deployment { deployment: dep, index: slot, tenant_host: false };
                        }
                        let b = self.workspace(ws.slot).map(|w| w.branding).unwrap_or(Pages::PLATFORM);
                        return self.denied(ErrorCode::UnknownHost, Some(ws.slot), b, false);
                    }
                }
            }
        }
        // 4 and 5: tenant domains, one label below the registered domain.
        let mut tenant: Option<u32> = None;
        if let Some((first, parent)) = host.split_once('.') {
            if let Some(td) = self.tenant_domains.get(parent.as_bytes()) {
                let b = self.tenant_branding(td.workspace);
                if td.preview {
                    if !td.verified {
                        return self.denied(ErrorCode::DomainNotVerified, Some(td.workspace), b, true);
                    }
                    if let Some((port, id)) = split_port_label(first) {
                        return self.preview(id, port, Some(td.workspace));
                    }
                } else {
                    if !td.verified {
                        return self.denied(ErrorCode::DomainNotVerified, Some(td.workspace), b, false);
                    }
                    if let Some((dep, slot)) = self.named_deployment(td.workspace, first) {
                        return Route::Deployment { deployment: dep, index: slot, tenant_host: true };
                    }
                }
                tenant = Some(td.workspace);
            }
        }
        // 7. Unknown: branded for the tenant whose domain it sits under, if any; a host
        // that *is* a tenant domain also belongs to that tenant.
        let tenant = tenant.or_else(|| self.tenant_domains.get(host.as_bytes()).map(|td| td.workspace));
        match tenant {
            Some(wi) => self.denied(ErrorCode::UnknownHost, Some(wi), self.tenant_branding(wi), false),
            None => self.denied(ErrorCode::UnknownHost, None, Pages::PLATFORM, false),
        }
    }

    fn tenant_branding(&self, ws: u32) -> u32 {
        self.workspace(ws).map(|w| w.tenant_branding).unwrap_or(Pages::NEUTRAL)
    }

    fn named_deployment(&self, ws: u32, name: &str) -> Option<(&DeploymentEntry, u32)> {
        let mut buf = [0u8; 96];
        let slot = self.dep_by_name.get(name_key(ws, name, &mut buf)?)?.slot;
        self.deployment(slot).map(|d| (d, slot))
    }

    fn denied(&self, code: ErrorCode, workspace: Option<u32>, branding: u32, preview: bool) -> Route<'_> {
        Route::Denied { code, workspace, branding, preview }
    }

    fn preview(&self, id: &str, port: u16, tenant: Option<u32>) -> Route<'_> {
        let not_found = |wi: Option<u32>| {
            let branding = match (tenant, wi) {
                (Some(t), _) => self.tenant_branding(t),
                (None, Some(w)) => self.workspace(w).map(|w| w.branding).unwrap_or(Pages::PLATFORM),
                (None, None) => Pages::PLATFORM,
            };
            self.denied(ErrorCode::PreviewNotFound, tenant.or(wi), branding, true)
        };
        let Some(sb) = self.sandboxes.get(id.as_bytes()) else {
            return not_found(None);
        };
        // Tenant isolation: a tenant preview domain only serves its own sandboxes, and
        // says nothing about whether the id exists elsewhere.
        if tenant.is_some_and(|t| t != sb.workspace) {
            return not_found(None);
        }
        match sb.preview(port) {
            Some(access) => Route::Preview { sandbox_id: sb.id(), sandbox: sb, port, access, tenant_host: tenant.is_some() },
            None => not_found(Some(sb.workspace)),
        }
    }
}

impl Credentials for RouteTable {
    fn keys(&self) -> &Keys {
        &self.access
    }

    fn share(&self, sha256: &[u8; 32]) -> Option<&ShareEntry> {
        self.shares.get(sha256)
    }
}

/// `host` without `.zone` (`None` unless it is strictly under `zone`).
fn strip_zone<'h>(host: &'h str, zone: &schema::Host) -> Option<&'h str> {
    let rest = host.strip_suffix(zone.as_str())?.strip_suffix('.')?;
    (!rest.is_empty()).then_some(rest)
}

/// The single label of `host` directly under `zone`.
fn first_label_under<'h>(host: &'h str, zone: &schema::Host) -> Option<&'h str> {
    strip_zone(host, zone).filter(|l| !l.contains('.'))
}

/// Splits `5173-abc12345` at its first `-` into a port (1–65535, decimal, no leading
/// zero) and a non-empty sandbox id.
pub fn split_port_label(label: &str) -> Option<(u16, &str)> {
    // Digits read as they are met (every preview request comes through here): at most
    // five, then the `-`; no search for the `-`, no generic integer parse.
    let b = label.as_bytes();
    let mut n: u32 = 0;
    for (i, &c) in b.iter().enumerate().take(6) {
        match c {
            b'-' if i > 0 && i + 1 < b.len() => return u16::try_from(n).ok().map(|p| (p, &label[i + 1..])),
            b'1'..=b'9' => n = n * 10 + u32::from(c - b'0'),
            b'0' if i > 0 => n *= 10,
            _ => return None,
        }
    }
    None
}

/// Byte → lower-cased byte for characters allowed in a host name, 0 for any other.
static HOST_CHARS: [u8; 256] = host_chars(false);
/// The same, plus `:`, `[` and `]` for IPv6 literals.
static HOST_CHARS_IPV6: [u8; 256] = host_chars(true);

const fn host_chars(ipv6: bool) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = (b as u8).to_ascii_lowercase();
        let ok = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == b'-'
            || c == b'.'
            || c == b'_'
            || (ipv6 && (c == b':' || c == b'[' || c == b']'));
        if ok {
            t[b] = c;
        }
        b += 1;
    }
    t
}

/// Normalises a request's host (from `Host` or `:authority`) into `buf`: lower-cased,
/// port and one trailing dot removed. Returns `None` for a malformed host (empty, bad
/// characters, bad port, too long). IP literals are returned as they are (they never
/// match a route). Allocation-free.
pub fn normalize_host<'b>(raw: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return None;
    }
    let (name, port): (&[u8], &[u8]) = if raw[0] == b'[' {
        // IPv6 literal: `[::1]:8080`.
        let end = raw.iter().position(|&b| b == b']')?;
        let rest = &raw[end + 1..];
        let port = match rest {
            [] => &[][..],
            [b':', p @ ..] => p,
            _ => return None,
        };
        (&raw[..=end], port)
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(i) => (&raw[..i], &raw[i + 1..]),
            None => (raw, &[][..]),
        }
    };
    if !port.is_empty() && (port.len() > 5 || !port.iter().all(u8::is_ascii_digit)) {
        return None;
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > buf.len() {
        return None;
    }
    let table = if name[0] == b'[' { &HOST_CHARS_IPV6 } else { &HOST_CHARS };
    let out = &mut buf[..name.len()];
    let mut bad = false;
    for (o, &b) in out.iter_mut().zip(name) {
        let c = table[b as usize];
        bad |= c == 0;
        *o = c;
    }
    if bad {
        return None;
    }
    // Every byte is ASCII, so this cannot fail; fall back to "malformed" regardless.
    std::str::from_utf8(&buf[..name.len()]).ok()
}

/// Publishes `table` (one atomic store; readers in flight keep their snapshot).
pub fn publish(shared: &SharedTable, table: RouteTable) {
    shared.store(Arc::new(table));
}

#[cfg(test)]
mod tests;
