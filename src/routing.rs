//! Host classification and the immutable [`RouteTable`] snapshot (CONTRACT §1).
//!
//! Writers (startup, TOML reload, later the control API) build a whole table from a
//! validated [`State`] off the request path and publish it with one
//! `ArcSwap::store`; each request does one `load` and keeps that `Arc` to the end, so a
//! request never sees two tables. Lookup is allocation-free: the host is normalised
//! into a stack buffer ([`normalize_host`]) and matched against hash maps keyed by the
//! exact strings that occur in hosts.
//!
//! Precedence (first match wins): exact deployment host → `{port}-{sandbox}.{sandbox}`
//! → `{name}.{slug}.{apps}` → `{port}-{sandbox}.{tenant preview domain}` →
//! `{name}.{tenant deploy domain}` → unknown host.

use crate::access::{Credentials, Keys, ShareEntry};
use crate::codes::ErrorCode;
use crate::pages::Pages;
use crate::schema::{self, Access, Release, SandboxState, State};
use crate::schema::{Domains, PlatformBranding};
use crate::state;
use ahash::RandomState;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

pub mod instance;

pub use instance::Instance;

pub use crate::cow::Key;

type Map<V> = HashMap<Key, V, RandomState>;

/// The published table: readers `load()` it once per request.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// A sandbox as the request path needs it (kept small: it lives in the table's
/// buckets, a million of them).
#[derive(Debug)]
pub struct SandboxEntry {
    pub address: IpAddr,
    pub workspace: u32,
    pub state: SandboxState,
    previews: Ports,
}

/// Preview ports sorted by port; up to five inline.
#[derive(Debug)]
enum Ports {
    Inline { len: u8, ports: [(u16, Access); 5] },
    Heap(Box<[(u16, Access)]>),
}

impl Ports {
    fn new(mut v: Vec<(u16, Access)>) -> Ports {
        v.sort_unstable_by_key(|p| p.0);
        if v.len() <= 5 {
            let mut ports = [(0, Access::Private); 5];
            ports[..v.len()].copy_from_slice(&v);
            Ports::Inline { len: v.len() as u8, ports }
        } else {
            Ports::Heap(v.into_boxed_slice())
        }
    }

    fn as_slice(&self) -> &[(u16, Access)] {
        match self {
            Ports::Inline { len, ports } => &ports[..*len as usize],
            Ports::Heap(p) => p,
        }
    }
}

impl SandboxEntry {
    /// The access of a previewed port, `None` if the port is not a preview.
    pub fn preview(&self, port: u16) -> Option<Access> {
        let p = self.previews.as_slice();
        p.binary_search_by_key(&port, |e| e.0).ok().map(|i| p[i].1)
    }
}

/// A workspace as the request path needs it.
#[derive(Debug)]
pub struct WorkspaceEntry {
    pub id: Box<str>,
    pub slug: Box<str>,
    /// Branding index for platform hosts (`*.miosa.app`).
    pub branding: u32,
    /// Branding index for the tenant's own hosts: never the platform's.
    pub tenant_branding: u32,
    deployments: Map<u32>,
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

#[derive(Debug, Clone, Copy)]
struct ExactHost {
    deployment: u32,
    verified: bool,
}

#[derive(Debug, Clone, Copy)]
struct TenantDomain {
    workspace: u32,
    verified: bool,
}

/// The outcome of a host lookup, borrowing from the table.
#[derive(Debug)]
pub enum Route<'t> {
    /// A listed preview port of an existing sandbox.
    Preview { sandbox_id: &'t str, sandbox: &'t SandboxEntry, port: u16, access: Access, tenant_host: bool },
    /// A deployment's active version.
    Deployment { deployment: &'t DeploymentEntry, index: u32, tenant_host: bool },
    /// An edge-generated answer; `branding` indexes [`Pages`].
    Denied { code: ErrorCode, workspace: Option<u32>, branding: u32, preview: bool },
}

/// The routing snapshot.
pub struct RouteTable {
    pub generation: u64,
    pub domains: Domains,
    pub pages: Pages,
    workspaces: Vec<WorkspaceEntry>,
    ws_by_slug: Map<u32>,
    /// `{name}.{slug}` → deployment, so a platform app URL is one probe.
    app_urls: Map<u32>,
    sandboxes: Map<SandboxEntry>,
    deployments: Vec<DeploymentEntry>,
    exact: Map<ExactHost>,
    preview_domains: Map<TenantDomain>,
    deploy_domains: Map<TenantDomain>,
    shares: HashMap<[u8; 32], ShareEntry, RandomState>,
    /// Every static release named by any version, and whether it is active somewhere.
    static_releases: Vec<(schema::Sha256, bool)>,
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

fn keyed<V>(cap: usize) -> Map<V> {
    // Fixed seeds keep lookups deterministic across runs (benchmarks); hash flooding is
    // not a concern because every key comes from the trusted routing state.
    HashMap::with_capacity_and_hasher(cap, RandomState::with_seeds(0x6d69, 0x6f73, 0x6165, 0x6467))
}

impl RouteTable {
    /// Validates `state` and builds a table. Pure: no I/O.
    pub fn build(domains: &Domains, branding: &PlatformBranding, state: &State, generation: u64) -> Result<RouteTable, BuildError> {
        state::validate(state, domains).map_err(BuildError)?;
        RouteTable::build_validated(domains, branding, state, generation)
    }

    /// Builds a table from a state the caller has just passed through
    /// [`state::validate`] (validation is the costly half on large states; references
    /// are still resolved defensively).
    pub fn build_validated(
        domains: &Domains,
        branding: &PlatformBranding,
        state: &State,
        generation: u64,
    ) -> Result<RouteTable, BuildError> {
        let mut pages = Pages::new(branding);
        let mut workspaces = Vec::with_capacity(state.workspaces.len());
        let mut ws_index: HashMap<&str, u32, RandomState> = HashMap::with_capacity_and_hasher(state.workspaces.len(), RandomState::new());
        let mut ws_by_slug = keyed(state.workspaces.len());
        let mut preview_domains = keyed(0);
        let mut deploy_domains = keyed(0);
        for (i, w) in state.workspaces.iter().enumerate() {
            let i = i as u32;
            let (b, tb) = match &w.branding {
                Some(b) => {
                    let idx = pages.add_workspace_branding(b);
                    (idx, idx)
                }
                None => (Pages::PLATFORM, Pages::NEUTRAL),
            };
            ws_index.insert(w.id.as_str(), i);
            ws_by_slug.insert(w.slug.as_str().into(), i);
            if let Some(d) = &w.preview_domain {
                preview_domains.insert(d.host.as_str().into(), TenantDomain { workspace: i, verified: d.verified });
            }
            if let Some(d) = &w.deploy_domain {
                deploy_domains.insert(d.host.as_str().into(), TenantDomain { workspace: i, verified: d.verified });
            }
            workspaces.push(WorkspaceEntry {
                id: w.id.as_str().into(),
                slug: w.slug.as_str().into(),
                branding: b,
                tenant_branding: tb,
                deployments: keyed(0),
            });
        }
        let ws_of = |id: &schema::WorkspaceId| {
            ws_index.get(id.as_str()).copied().ok_or_else(|| {
                BuildError(vec![schema::StateError { path: String::new(), message: format!("workspace `{id}` does not exist") }])
            })
        };

        let mut sandboxes = keyed(state.sandboxes.len());
        for s in &state.sandboxes {
            let previews = Ports::new(s.previews.iter().map(|p| (p.port.0, p.access)).collect());
            sandboxes.insert(
                s.id.as_str().into(),
                SandboxEntry { workspace: ws_of(&s.workspace)?, address: s.address.0, state: s.state, previews },
            );
        }

        let mut deployments = Vec::with_capacity(state.deployments.len());
        let mut exact = keyed(state.deployments.len());
        let mut app_urls = keyed(state.deployments.len());
        for (i, d) in state.deployments.iter().enumerate() {
            let i = i as u32;
            let ws = ws_of(&d.workspace)?;
            let version = d.versions.iter().find(|v| v.id == d.active_version).ok_or_else(|| {
                BuildError(vec![schema::StateError {
                    path: String::new(),
                    message: format!("deployment `{}` has no active version", d.id),
                }])
            })?;
            let release = match &version.release {
                Release::Dynamic { instances, balance, health_check } => ActiveRelease::Dynamic {
                    instances: instances.iter().map(|a| Instance { addr: a.0, health: instance::health_of(a.0) }).collect(),
                    next: AtomicUsize::new(0),
                    balance: *balance,
                    health_check: health_check.clone().map(Box::new),
                },
                Release::Static { sha256, spa } => ActiveRelease::Static { sha256: *sha256, spa: *spa },
            };
            workspaces[ws as usize].deployments.insert(d.name.as_str().into(), i);
            app_urls.insert(Key::from(format!("{}.{}", d.name, workspaces[ws as usize].slug).as_str()), i);
            for dom in &d.domains {
                exact.insert(dom.host.as_str().into(), ExactHost { deployment: i, verified: dom.verified });
            }
            deployments.push(DeploymentEntry {
                id: d.id.as_str().into(),
                workspace: ws,
                name: d.name.as_str().into(),
                active_version: d.active_version.as_str().into(),
                release,
            });
        }

        let mut shares = HashMap::with_capacity_and_hasher(state.share_tokens.len(), RandomState::new());
        for t in &state.share_tokens {
            shares.insert(
                t.token_sha256.0,
                ShareEntry {
                    id: t.id.as_str().into(),
                    sandbox: t.sandbox.as_str().into(),
                    port: t.port.map(|p| p.0),
                    expires_at: t.expires_at.map(|e| e.0),
                    password_hash: t.password_hash.as_ref().map(|h| Arc::from(h.as_str())),
                },
            );
        }

        let mut static_releases: Vec<(schema::Sha256, bool)> = Vec::new();
        let mut static_index: HashMap<[u8; 32], usize, RandomState> = HashMap::with_hasher(RandomState::new());
        for d in &state.deployments {
            for v in &d.versions {
                if let Release::Static { sha256, .. } = &v.release {
                    let active = v.id == d.active_version;
                    match static_index.get(&sha256.0) {
                        Some(&i) => static_releases[i].1 |= active,
                        None => {
                            static_index.insert(sha256.0, static_releases.len());
                            static_releases.push((*sha256, active));
                        }
                    }
                }
            }
        }

        Ok(RouteTable {
            generation,
            domains: domains.clone(),
            pages,
            workspaces,
            ws_by_slug,
            app_urls,
            sandboxes,
            deployments,
            exact,
            preview_domains,
            deploy_domains,
            shares,
            static_releases,
            access: Arc::new(Keys::none()),
        })
    }

    /// An empty table (no routes): every host is unknown.
    pub fn empty(domains: &Domains, branding: &PlatformBranding) -> RouteTable {
        match RouteTable::build(domains, branding, &State::default(), 0) {
            Ok(t) => t,
            Err(e) => unreachable!("an empty state is always valid: {e}"),
        }
    }

    /// A workspace by index (as found in routes).
    pub fn workspace(&self, i: u32) -> Option<&WorkspaceEntry> {
        self.workspaces.get(i as usize)
    }

    /// A deployment by index (as found in routes).
    pub fn deployment(&self, i: u32) -> Option<&DeploymentEntry> {
        self.deployments.get(i as usize)
    }

    /// Every static release named by a version of a deployment (fetched ahead of
    /// activation), with whether it is some deployment's active release.
    pub fn static_releases(&self) -> &[(schema::Sha256, bool)] {
        &self.static_releases
    }

    /// Every deployment.
    pub fn deployments(&self) -> &[DeploymentEntry] {
        &self.deployments
    }

    /// A share record by its token's SHA-256.
    pub fn share(&self, sha256: &[u8; 32]) -> Option<&ShareEntry> {
        self.shares.get(sha256)
    }

    /// The same table with `keys` in force.
    pub fn with_access(mut self, keys: Arc<Keys>) -> RouteTable {
        self.access = keys;
        self
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
        // 1. Exact deployment hosts.
        if let Some(e) = self.exact.get(host) {
            let dep = &self.deployments[e.deployment as usize];
            let ws = &self.workspaces[dep.workspace as usize];
            if !e.verified {
                return self.denied(ErrorCode::DomainNotVerified, Some(dep.workspace), ws.tenant_branding, false);
            }
            return Route::Deployment { deployment: dep, index: e.deployment, tenant_host: true };
        }
        // 3. `{name}.{slug}.{apps}`.
        if let Some(rest) = strip_zone(host, &self.domains.apps) {
            if let Some((_name, slug)) = rest.split_once('.') {
                if !slug.contains('.') {
                    if let Some(&di) = self.app_urls.get(rest) {
                        return Route::Deployment { deployment: &self.deployments[di as usize], index: di, tenant_host: false };
                    }
                    if let Some(&wi) = self.ws_by_slug.get(slug) {
                        let b = self.workspaces[wi as usize].branding;
                        return self.denied(ErrorCode::UnknownHost, Some(wi), b, false);
                    }
                }
            }
        }
        // 4 and 5: tenant domains, one label below the registered domain.
        let mut tenant: Option<u32> = None;
        if let Some((first, parent)) = host.split_once('.') {
            if let Some(td) = self.preview_domains.get(parent) {
                if !td.verified {
                    let b = self.workspaces[td.workspace as usize].tenant_branding;
                    return self.denied(ErrorCode::DomainNotVerified, Some(td.workspace), b, true);
                }
                if let Some((port, id)) = split_port_label(first) {
                    return self.preview(id, port, Some(td.workspace));
                }
                tenant = Some(td.workspace);
            }
            if let Some(td) = self.deploy_domains.get(parent) {
                let ws = &self.workspaces[td.workspace as usize];
                if !td.verified {
                    return self.denied(ErrorCode::DomainNotVerified, Some(td.workspace), ws.tenant_branding, false);
                }
                if let Some(&di) = ws.deployments.get(first) {
                    return Route::Deployment { deployment: &self.deployments[di as usize], index: di, tenant_host: true };
                }
                tenant = Some(td.workspace);
            }
        }
        // 6. Unknown: branded for the tenant whose domain it sits under, if any; a host
        // that *is* a tenant domain also belongs to that tenant.
        let tenant = tenant.or_else(|| self.preview_domains.get(host).or_else(|| self.deploy_domains.get(host)).map(|td| td.workspace));
        match tenant {
            Some(wi) => self.denied(ErrorCode::UnknownHost, Some(wi), self.workspaces[wi as usize].tenant_branding, false),
            None => self.denied(ErrorCode::UnknownHost, None, Pages::PLATFORM, false),
        }
    }

    fn denied(&self, code: ErrorCode, workspace: Option<u32>, branding: u32, preview: bool) -> Route<'_> {
        Route::Denied { code, workspace, branding, preview }
    }

    fn preview(&self, id: &str, port: u16, tenant: Option<u32>) -> Route<'_> {
        let not_found = |wi: Option<u32>| {
            let branding = match (tenant, wi) {
                (Some(t), _) => self.workspaces[t as usize].tenant_branding,
                (None, Some(w)) => self.workspaces[w as usize].branding,
                (None, None) => Pages::PLATFORM,
            };
            self.denied(ErrorCode::PreviewNotFound, tenant.or(wi), branding, true)
        };
        let Some((sandbox_id, sb)) = self.sandboxes.get_key_value(id) else {
            return not_found(None);
        };
        // Tenant isolation: a tenant preview domain only serves its own sandboxes, and
        // says nothing about whether the id exists elsewhere.
        if tenant.is_some_and(|t| t != sb.workspace) {
            return not_found(None);
        }
        match sb.preview(port) {
            Some(access) => Route::Preview { sandbox_id: sandbox_id.as_str(), sandbox: sb, port, access, tenant_host: tenant.is_some() },
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
    let (port, id) = label.split_once('-')?;
    if id.is_empty() || port.is_empty() || port.len() > 5 || port.starts_with('0') || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = port.parse().ok()?;
    u16::try_from(n).ok().filter(|&p| p > 0).map(|p| (p, id))
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
