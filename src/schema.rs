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

pub mod kinds;
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
}

/// A tenant workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub slug: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_domain: Option<DomainEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_domain: Option<DomainEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branding: Option<WorkspaceBranding>,
}

/// A domain and whether its DNS set-up was verified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainEntry {
    pub host: Host,
    #[serde(default)]
    pub verified: bool,
}

/// A workspace's look on edge-generated pages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceBranding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<HttpsUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accent_color: Option<AccentColor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_url: Option<SupportUrl>,
}

/// Whether a sandbox is up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    #[default]
    Running,
    Suspended,
}

/// Who may open a preview.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Private,
    Public,
}

/// A sandbox (a VM or container with dev servers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    pub id: SandboxId,
    pub workspace: WorkspaceId,
    pub address: Address,
    #[serde(default)]
    pub state: SandboxState,
    #[serde(default)]
    pub previews: Vec<Preview>,
}

/// One previewed port of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preview {
    pub port: Port,
    #[serde(default)]
    pub access: Access,
}

/// A share-token record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareToken {
    pub id: Id,
    pub token_sha256: Sha256,
    pub sandbox: SandboxId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<PasswordHash>,
}

/// A deployment: named app of a workspace with versions, one of them active.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub id: Id,
    pub workspace: WorkspaceId,
    pub name: Label,
    #[serde(default)]
    pub domains: Vec<DomainEntry>,
    pub active_version: Id,
    pub versions: Vec<Version>,
}

/// One immutable version of a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    pub id: Id,
    pub release: Release,
}

/// What a version serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Release {
    /// Runtime instances behind the edge.
    Dynamic {
        instances: Vec<Instance>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_check: Option<HealthCheck>,
        /// How an instance is chosen per request.
        #[serde(default, skip_serializing_if = "Balance::is_default")]
        balance: Balance,
    },
    /// A static release archive served by the edge.
    Static {
        sha256: Sha256,
        #[serde(default)]
        spa: bool,
    },
}

/// Instance selection of a dynamic release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Power of two choices over outstanding requests (the less loaded of two).
    #[default]
    LeastLoaded,
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
    pub path: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
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
identified!(Workspace, Sandbox, ShareToken, Deployment);

impl State {
    /// Appends `other`'s objects to this state (used to merge TOML and API state; the
    /// merged result is validated as a whole, which reports ids or hosts defined twice).
    pub fn merged(&self, other: &State) -> State {
        let mut s = self.clone();
        s.workspaces.extend(other.workspaces.iter().cloned());
        s.sandboxes.extend(other.sandboxes.iter().cloned());
        s.share_tokens.extend(other.share_tokens.iter().cloned());
        s.deployments.extend(other.deployments.iter().cloned());
        s
    }
}

/// `[domains]`: the platform's own suffixes (CONTRACT §1).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domains {
    #[serde(default = "d_sandbox")]
    pub sandbox: Host,
    #[serde(default = "d_apps")]
    pub apps: Host,
    #[serde(default = "d_edge")]
    pub edge_target: Host,
    #[serde(default = "d_acme")]
    pub acme_zone: Host,
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

impl Domains {
    /// Domains from their four names (validated as hosts).
    pub fn from_names(sandbox: &str, apps: &str, edge_target: &str, acme_zone: &str) -> Result<Domains, String> {
        Ok(Domains {
            sandbox: Host::try_from(sandbox)?,
            apps: Host::try_from(apps)?,
            edge_target: Host::try_from(edge_target)?,
            acme_zone: Host::try_from(acme_zone)?,
        })
    }
}

impl Default for Domains {
    fn default() -> Self {
        Domains { sandbox: d_sandbox(), apps: d_apps(), edge_target: d_edge(), acme_zone: d_acme() }
    }
}

/// `[branding]`: the platform's default look, used on hosts no workspace owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformBranding {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub logo_url: Option<HttpsUrl>,
    #[serde(default = "default_accent")]
    pub accent_color: AccentColor,
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
