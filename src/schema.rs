//! The contract's data (CONTRACT §1, §2): the routing state's objects and the platform's
//! own names, as types that cannot hold invalid values.
//!
//! The same structures are read from the operators' TOML and from the control plane's
//! JSON. Each field type parses from text ([`types`]), so a deserialized [`State`] is
//! valid field by field and unknown fields are refused; the rules between objects
//! (references, uniqueness, host claims) are [`crate::state::validate`]'s.
//!
//! Layering: this module imports nothing of the crate. Everything above it (validation,
//! the route table, the writers, the control API, the config) speaks these types.

#![deny(missing_docs)]

pub mod kinds;
pub mod strict;
pub mod types;

use serde::{Deserialize, Serialize};
use std::fmt;

pub use kinds::{Kind, Object, StateDoc};
pub use types::*;

/// The whole routing state (TOML routing sections, or a control-plane push).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Tenants, with their domains and branding.
    #[serde(default)]
    pub workspaces: Vec<Workspace>,
    /// Sandboxes and the ports they preview.
    #[serde(default)]
    pub sandboxes: Vec<Sandbox>,
    /// Share-token records (only the SHA-256 of each token).
    #[serde(default)]
    pub share_tokens: Vec<ShareToken>,
    /// Deployments and their versions.
    #[serde(default)]
    pub deployments: Vec<Deployment>,
    /// Storage buckets whose public objects the edge serves (CONTRACT §12).
    #[serde(default)]
    pub buckets: Vec<Bucket>,
}

/// A tenant workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    /// Unique among workspaces; lower-case `a-z 0-9 _ -`, at most 63 (it names `{id}.{acme_zone}`).
    pub id: WorkspaceId,
    /// One DNS label, unique: its apps live at `{name}.{slug}.{apps}`.
    pub slug: Label,
    /// A tenant preview domain: `{port}-{sandbox}.{host}` opens this workspace's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_domain: Option<DomainEntry>,
    /// A tenant deployment domain: `{name}.{host}` opens this workspace's deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_domain: Option<DomainEntry>,
    /// The look of the edge's pages on this workspace's hosts (never the platform's on its own domains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branding: Option<WorkspaceBranding>,
}

/// A domain and whether its DNS set-up was verified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainEntry {
    /// A lower-case DNS name, claimed by no other object of the state.
    pub host: Host,
    /// Its DNS set-up was verified; an unverified domain answers 421 `domain_not_verified`.
    #[serde(default)]
    pub verified: bool,
}

/// A workspace's look on edge-generated pages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceBranding {
    /// An `https:` image shown at the top of pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<HttpsUrl>,
    /// `#rgb` or `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accent_color: Option<AccentColor>,
    /// An `https:` or `mailto:` link shown as "Get help".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_url: Option<SupportUrl>,
}

/// Whether a sandbox is up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Its previews are proxied.
    #[default]
    Running,
    /// Asleep: with `[wake]`, a request wakes it and waits; else 503 `sandbox_starting`.
    Suspended,
}

/// Who may open a preview.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A token, a share link or a session is needed.
    #[default]
    Private,
    /// Anyone may open it.
    Public,
}

/// A sandbox (a VM or container with dev servers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// One lower-case DNS label of at most 57 characters (`{port}-{id}` is one label).
    pub id: SandboxId,
    /// The workspace it belongs to (must exist).
    pub workspace: WorkspaceId,
    /// The IP address its preview ports are reached at.
    pub address: Address,
    /// `running` (default) or `suspended` (woken on request with `[wake]`).
    #[serde(default)]
    pub state: SandboxState,
    /// The ports that may be opened, each listed once.
    #[serde(default)]
    pub previews: Vec<Preview>,
}

/// One previewed port of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preview {
    /// 1 to 65535.
    pub port: Port,
    /// `private` (default: a token, share link or session is needed) or `public`.
    #[serde(default)]
    pub access: Access,
}

/// A share-token record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareToken {
    /// Unique among share tokens.
    pub id: Id,
    /// The lower-case hex SHA-256 of the whole `ms_…` token (the edge never sees the token at rest).
    pub token_sha256: Sha256,
    /// The sandbox it opens (must exist).
    pub sandbox: SandboxId,
    /// The one preview port it opens (one of the sandbox's previews); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// When it stops opening anything; absent: never (sessions last `share_session_ttl_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// An argon2id PHC string: the link then asks for the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<PasswordHash>,
}

/// A deployment: named app of a workspace with versions, one of them active.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Unique among deployments.
    pub id: Id,
    /// The workspace it belongs to (must exist).
    pub workspace: WorkspaceId,
    /// One DNS label, unique in its workspace: `{name}.{slug}.{apps}`.
    pub name: Label,
    /// Custom domains routed to it exactly (`app.customer.com`).
    #[serde(default)]
    pub domains: Vec<DomainEntry>,
    /// The id of the version served (one of `versions`).
    pub active_version: Id,
    /// Every version that may be activated; their static releases are fetched ahead.
    pub versions: Vec<Version>,
}

/// A project's bucket in the platform's store, served on `{alias}.{storage}` and its
/// verified domains (CONTRACT §12).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    /// Unique among buckets.
    pub id: Id,
    /// The workspace it belongs to (must exist).
    pub workspace: WorkspaceId,
    /// The store's name for it (it may hold characters no host name can).
    pub bucket: BucketName,
    /// One DNS label, unique among buckets: `{alias}.{storage}`.
    pub alias: Label,
    /// Every object is public (else only those with `miosa-public: true` metadata).
    #[serde(default)]
    pub public: bool,
    /// Custom domains serving its public objects (`assets.customer.com`).
    #[serde(default)]
    pub domains: Vec<DomainEntry>,
}

/// One immutable version of a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// Unique in its deployment.
    pub id: Id,
    /// What it serves.
    pub release: Release,
}

/// What a version serves.
///
/// Read through [`RawRelease`], whose fields are read in place: an internally tagged enum
/// would buffer the object first, and an error inside it would lose its path
/// (`release` instead of `release.instances[1]`, CONTRACT §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", try_from = "RawRelease")]
pub enum Release {
    /// Runtime instances behind the edge.
    Dynamic {
        /// `IP:port` of each instance, each listed once (at least one).
        instances: Vec<Instance>,
        /// Active checks of every instance while the version is active.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_check: Option<HealthCheck>,
        /// How an instance is chosen per request.
        #[serde(default, skip_serializing_if = "Balance::is_default")]
        balance: Balance,
    },
    /// A static release archive served by the edge.
    Static {
        /// The SHA-256 of the archive `{sha256}.tar.gz` in the release store.
        sha256: Sha256,
        /// Unknown paths of HTML requests get `/index.html` (single-page apps).
        #[serde(default)]
        spa: bool,
    },
}

/// The kinds of release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ReleaseKind {
    Dynamic,
    Static,
}

/// A release as written: the fields of every kind, checked against `kind` after.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    kind: ReleaseKind,
    #[serde(default)]
    instances: Option<Vec<Instance>>,
    #[serde(default)]
    health_check: Option<HealthCheck>,
    #[serde(default)]
    balance: Option<Balance>,
    #[serde(default)]
    sha256: Option<Sha256>,
    #[serde(default)]
    spa: Option<bool>,
}

impl TryFrom<RawRelease> for Release {
    type Error = String;

    fn try_from(r: RawRelease) -> Result<Release, String> {
        let foreign = |kind: &str, fields: &[(&str, bool)]| match fields.iter().find(|(_, present)| *present) {
            Some((name, _)) => Err(format!("unknown field `{name}` for a {kind} release")),
            None => Ok(()),
        };
        match r.kind {
            ReleaseKind::Dynamic => {
                foreign("dynamic", &[("sha256", r.sha256.is_some()), ("spa", r.spa.is_some())])?;
                let instances = r.instances.ok_or("missing field `instances`")?;
                Ok(Release::Dynamic { instances, health_check: r.health_check, balance: r.balance.unwrap_or_default() })
            }
            ReleaseKind::Static => {
                foreign(
                    "static",
                    &[("instances", r.instances.is_some()), ("health_check", r.health_check.is_some()), ("balance", r.balance.is_some())],
                )?;
                let sha256 = r.sha256.ok_or("missing field `sha256`")?;
                Ok(Release::Static { sha256, spa: r.spa.unwrap_or_default() })
            }
        }
    }
}

/// Instance selection of a dynamic release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Power of two choices over outstanding requests (the less loaded of two).
    #[default]
    LeastLoaded,
    /// Each instance in turn.
    RoundRobin,
}

impl Balance {
    fn is_default(&self) -> bool {
        *self == Balance::LeastLoaded
    }
}

/// Active health check of a dynamic release: `GET path` on every instance of the
/// active version each `interval_ms`; 2xx/3xx within `timeout_ms` is a pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// An absolute path asked with `GET`.
    pub path: String,
    /// Between checks: 100 to 3600000 (default 5000).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// For one answer: 10 to 60000, at most `interval_ms` (default 2000).
    #[serde(default = "default_hc_timeout_ms")]
    pub timeout_ms: u64,
    /// Passes in a row that bring an unhealthy instance back.
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    /// Failures in a row that take an instance out.
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
}

fn default_interval_ms() -> u64 {
    5000
}
fn default_hc_timeout_ms() -> u64 {
    2000
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

/// A validation error: the key path of the first bad field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateError {
    /// `sandboxes[3].address`
    pub path: String,
    /// Lower-case, names the subject.
    pub message: String,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for StateError {}

/// An object of the routing state, identified by its id within its kind.
pub trait Identified {
    /// The id.
    fn id_str(&self) -> &str;
}

macro_rules! identified {
    ($($t:ty),*) => {$(
        impl Identified for $t {
            fn id_str(&self) -> &str {
                self.id.as_str()
            }
        }
    )*};
}
identified!(Workspace, Sandbox, ShareToken, Deployment, Bucket);

impl State {
    /// Appends `other`'s objects to this state (used to merge TOML and API state; the
    /// merged result is validated as a whole, which reports ids or hosts defined twice).
    pub fn merged(&self, other: &State) -> State {
        let mut s = self.clone();
        s.workspaces.extend(other.workspaces.iter().cloned());
        s.sandboxes.extend(other.sandboxes.iter().cloned());
        s.share_tokens.extend(other.share_tokens.iter().cloned());
        s.deployments.extend(other.deployments.iter().cloned());
        s.buckets.extend(other.buckets.iter().cloned());
        s
    }
}

/// `[domains]`: the platform's own suffixes (CONTRACT §1).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domains {
    /// Sandbox previews: `{port}-{sandbox}.{sandbox}`.
    #[serde(default = "d_sandbox")]
    pub sandbox: Host,
    /// Deployment fallback URLs: `{name}.{workspace_slug}.{apps}`.
    #[serde(default = "d_apps")]
    pub apps: Host,
    /// What tenants CNAME their domains to.
    #[serde(default = "d_edge")]
    pub edge_target: Host,
    /// Where tenants delegate `_acme-challenge` (`{workspace}.{acme_zone}`).
    #[serde(default = "d_acme")]
    pub acme_zone: Host,
    /// Public storage objects (`{alias}.{storage}`) and the S3 endpoint (the bare host).
    #[serde(default = "d_storage")]
    pub storage: Host,
}

fn host(s: &str) -> Host {
    Host::try_from(s).unwrap_or_else(|e| panic!("built-in default host {s}: {e}"))
}
fn d_sandbox() -> Host {
    host("sandbox.localhost")
}
fn d_apps() -> Host {
    host("apps.localhost")
}
fn d_edge() -> Host {
    host("edge.localhost")
}
fn d_acme() -> Host {
    host("acme.localhost")
}
fn d_storage() -> Host {
    host("storage.localhost")
}

impl Domains {
    /// Domains from their first four names (validated as hosts); the storage zone is
    /// `storage.{apps}`, as in production (`storage.miosa.app`).
    pub fn from_names(sandbox: &str, apps: &str, edge_target: &str, acme_zone: &str) -> Result<Domains, String> {
        Ok(Domains {
            sandbox: Host::try_from(sandbox)?,
            apps: Host::try_from(apps)?,
            edge_target: Host::try_from(edge_target)?,
            acme_zone: Host::try_from(acme_zone)?,
            storage: Host::try_from(format!("storage.{apps}"))?,
        })
    }

    /// The platform's zones with their `[domains]` keys, in CONTRACT §1's order.
    pub fn named(&self) -> [(&'static str, &Host); 5] {
        [
            ("sandbox", &self.sandbox),
            ("apps", &self.apps),
            ("edge_target", &self.edge_target),
            ("acme_zone", &self.acme_zone),
            ("storage", &self.storage),
        ]
    }
}

impl Default for Domains {
    fn default() -> Self {
        Domains { sandbox: d_sandbox(), apps: d_apps(), edge_target: d_edge(), acme_zone: d_acme(), storage: d_storage() }
    }
}

/// `[branding]`: the platform's default look, used on hosts no workspace owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformBranding {
    /// Shown on pages of hosts no workspace owns (never on a tenant's).
    #[serde(default = "default_name")]
    pub name: String,
    /// An `https:` image.
    #[serde(default)]
    pub logo_url: Option<HttpsUrl>,
    /// `#rgb` or `#rrggbb`.
    #[serde(default = "default_accent")]
    pub accent_color: AccentColor,
    /// An `https:` or `mailto:` link.
    #[serde(default)]
    pub support_url: Option<SupportUrl>,
}

fn default_name() -> String {
    "MIOSA".into()
}
fn default_accent() -> AccentColor {
    AccentColor::try_from("#5b5bd6").unwrap_or_else(|e| panic!("built-in accent: {e}"))
}

impl Default for PlatformBranding {
    fn default() -> Self {
        PlatformBranding { name: default_name(), logo_url: None, accent_color: default_accent(), support_url: None }
    }
}
