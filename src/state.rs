//! The routing state of CONTRACT §2: one schema, read from TOML (operators) and JSON
//! (control plane).
//!
//! Data flow: text → serde into [`State`] (field types reject bad values, unknown fields
//! are refused) → [`validate`] (references, uniqueness, host claims; every error with
//! its key path) → [`crate::routing::RouteTable::build`]. A `State` that passed
//! `validate` is the only input the route table accepts.

use crate::schema::*;

pub mod index;
pub mod records;
pub mod rules;

pub use index::{Applied, BatchOp, Index, Op, Plan, Refusal};
pub use records::{Objects, Origin, SandboxRecord};

// Validation hashes every id and host of the state (100k+ on a large push): ahash, not SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<T> = std::collections::HashSet<T, ahash::RandomState>;

pub use rules::is_under;

/// Validates the cross-field rules of CONTRACT §2 against the configured domains,
/// returning every error found (in document order).
pub fn validate(state: &State, domains: &Domains) -> Result<(), Vec<StateError>> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(StateError { path, message });

    let mut ws_ids: HashMap<&str, usize> = HashMap::default();
    let mut slugs: HashMap<&str, usize> = HashMap::default();
    // host → where it was first claimed, for "no host is claimed twice".
    let mut hosts: HashMap<&str, String> = HashMap::default();
    let mut tenant_domains: HashMap<&str, &str> = HashMap::default();

    for (i, w) in state.workspaces.iter().enumerate() {
        let p = format!("workspaces[{i}]");
        if let Some(prev) = ws_ids.insert(w.id.as_str(), i) {
            err(format!("{p}.id"), format!("workspace id `{}` is already used by workspaces[{prev}]", w.id));
        }
        if let Some(prev) = slugs.insert(w.slug.as_str(), i) {
            err(format!("{p}.slug"), format!("slug `{}` is already used by workspaces[{prev}]", w.slug));
        }
        rules::workspace(w, domains, &mut |f, m| err(format!("{p}.{f}"), m));
        for (key, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
            let Some(d) = d else { continue };
            let path = format!("{p}.{key}.host");
            if rules::platform_suffix_of(d.host.as_str(), domains).is_some() {
                continue;
            }
            match hosts.get(d.host.as_str()) {
                Some(prev) => err(path.clone(), format!("host `{}` is already claimed by {prev}", d.host)),
                None => {
                    hosts.insert(d.host.as_str(), path.clone());
                }
            }
            tenant_domains.insert(d.host.as_str(), w.id.as_str());
        }
    }

    let mut sandboxes: HashMap<&str, (usize, &Sandbox)> = HashMap::default();
    sandboxes.reserve(state.sandboxes.len());
    for (i, s) in state.sandboxes.iter().enumerate() {
        // Paths are formatted only for errors: this loop runs once per sandbox.
        if let Some((prev, _)) = sandboxes.insert(s.id.as_str(), (i, s)) {
            err(format!("sandboxes[{i}].id"), format!("sandbox id `{}` is already used by sandboxes[{prev}]", s.id));
        }
        if !ws_ids.contains_key(s.workspace.as_str()) {
            err(format!("sandboxes[{i}].workspace"), format!("workspace `{}` does not exist", s.workspace));
        }
        rules::sandbox(s, &mut |f, m| err(format!("sandboxes[{i}].{f}"), m));
    }

    let mut share_ids = HashSet::default();
    let mut share_hashes = HashSet::default();
    for (i, t) in state.share_tokens.iter().enumerate() {
        let p = format!("share_tokens[{i}]");
        if !share_ids.insert(t.id.as_str()) {
            err(format!("{p}.id"), format!("share token id `{}` is used twice", t.id));
        }
        if !share_hashes.insert(t.token_sha256) {
            err(format!("{p}.token_sha256"), "the same token hash is used by another share token".into());
        }
        match sandboxes.get(t.sandbox.as_str()) {
            None => err(format!("{p}.sandbox"), format!("sandbox `{}` does not exist", t.sandbox)),
            Some((_, s)) => {
                if let Some(port) = t.port {
                    if !s.previews.iter().any(|pv| pv.port == port) {
                        err(format!("{p}.port"), format!("sandbox `{}` has no preview on port {}", t.sandbox, port.0));
                    }
                }
            }
        }
    }

    let mut dep_ids = HashSet::default();
    let mut dep_names = HashSet::default();
    for (i, d) in state.deployments.iter().enumerate() {
        let p = format!("deployments[{i}]");
        if !dep_ids.insert(d.id.as_str()) {
            err(format!("{p}.id"), format!("deployment id `{}` is used twice", d.id));
        }
        if !ws_ids.contains_key(d.workspace.as_str()) {
            err(format!("{p}.workspace"), format!("workspace `{}` does not exist", d.workspace));
        } else if !dep_names.insert((d.workspace.as_str(), d.name.as_str())) {
            err(format!("{p}.name"), format!("workspace `{}` already has a deployment named `{}`", d.workspace, d.name));
        }
        rules::deployment(d, domains, &mut |f, m| err(format!("{p}.{f}"), m));
        claim_custom_domains(&p, &d.workspace, &d.domains, domains, &tenant_domains, &mut hosts, &mut err);
    }

    let mut bucket_ids = HashSet::default();
    let mut aliases: HashMap<&str, usize> = HashMap::default();
    let mut store_names: HashMap<&str, usize> = HashMap::default();
    for (i, b) in state.buckets.iter().enumerate() {
        let p = format!("buckets[{i}]");
        if !bucket_ids.insert(b.id.as_str()) {
            err(format!("{p}.id"), format!("bucket id `{}` is used twice", b.id));
        }
        if !ws_ids.contains_key(b.workspace.as_str()) {
            err(format!("{p}.workspace"), format!("workspace `{}` does not exist", b.workspace));
        }
        if let Some(prev) = aliases.insert(b.alias.as_str(), i) {
            err(format!("{p}.alias"), format!("alias `{}` is already used by buckets[{prev}]", b.alias));
        }
        if let Some(prev) = store_names.insert(b.bucket.as_str(), i) {
            err(format!("{p}.bucket"), format!("store bucket `{}` is already served by buckets[{prev}]", b.bucket));
        }
        rules::bucket(b, domains, &mut |f, m| err(format!("{p}.{f}"), m));
        claim_custom_domains(&p, &b.workspace, &b.domains, domains, &tenant_domains, &mut hosts, &mut err);
    }

    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// The custom domains of the deployment or bucket at `p` (of `workspace`): each claimed
/// once across the state, and none under another workspace's tenant domain. A host in a
/// platform zone is left to the object's own rules.
fn claim_custom_domains<'s>(
    p: &str,
    workspace: &WorkspaceId,
    entries: &'s [DomainEntry],
    domains: &Domains,
    tenant_domains: &HashMap<&str, &str>,
    hosts: &mut HashMap<&'s str, String>,
    err: &mut impl FnMut(String, String),
) {
    for (j, dom) in entries.iter().enumerate() {
        let path = format!("{p}.domains[{j}].host");
        let h = dom.host.as_str();
        if rules::deployment_host_conflict(h, domains).is_some() {
            continue;
        }
        if let Some((_, parent)) = h.split_once('.') {
            if let Some(owner) = tenant_domains.get(parent) {
                if *owner != workspace.as_str() {
                    err(path.clone(), format!("`{h}` is under workspace `{owner}`'s domain `{parent}`"));
                }
            }
        }
        match hosts.get(h) {
            Some(prev) => err(path, format!("host `{h}` is already claimed by {prev}")),
            None => {
                hosts.insert(h, path);
            }
        }
    }
}

#[cfg(test)]
mod tests;
