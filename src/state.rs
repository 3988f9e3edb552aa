//! The routing state of CONTRACT §2: one schema, read from TOML (operators) and JSON
//! (control plane).
//!
//! Data flow: text → serde into [`State`] (field types reject bad values, unknown fields
//! are refused) → [`validate`] (references, uniqueness, host claims; every error with
//! its key path) → [`crate::routing::RouteTable::build`]. A `State` that passed
//! `validate` is the only input the route table accepts.

use crate::schema::*;

// Validation hashes every id and host of the state (100k+ on a large push): ahash, not SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<T> = std::collections::HashSet<T, ahash::RandomState>;

/// True when `host` is `suffix` or a name under it.
pub fn is_under(host: &str, suffix: &str) -> bool {
    host == suffix || (host.len() > suffix.len() && host.ends_with(suffix) && host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
}

/// Validates the cross-field rules of CONTRACT §2 against the configured domains,
/// returning every error found (in document order).
pub fn validate(state: &State, domains: &Domains) -> Result<(), Vec<StateError>> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(StateError { path, message });

    // Slugs that would be shadowed by the platform's own names under the apps domain
    // (with apps = miosa.app and sandbox = sandbox.miosa.app, slug `sandbox` can never route).
    let reserved_slugs: Vec<&str> = [&domains.sandbox, &domains.edge_target, &domains.acme_zone]
        .into_iter()
        .filter_map(|d| {
            let d = d.as_str();
            let rest = d.strip_suffix(domains.apps.as_str())?.strip_suffix('.')?;
            (!rest.contains('.')).then_some(rest)
        })
        .collect();

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
        if reserved_slugs.contains(&w.slug.as_str()) {
            err(format!("{p}.slug"), format!("slug `{}` is reserved by the platform's domains", w.slug));
        }
        for (key, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
            let Some(d) = d else { continue };
            let path = format!("{p}.{key}.host");
            if let Some(platform) = platform_suffix_of(d.host.as_str(), domains) {
                err(path, format!("`{}` is under the platform's domain `{platform}`", d.host));
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
        if s.id.as_str().len() > 57 {
            // `{port}-{id}` must fit one 63-byte DNS label.
            err(format!("sandboxes[{i}].id"), format!("sandbox id `{}` is longer than 57 characters", s.id));
        }
        if s.previews.len() > 1 {
            let mut ports = HashSet::default();
            for (j, pv) in s.previews.iter().enumerate() {
                if !ports.insert(pv.port) {
                    err(format!("sandboxes[{i}].previews[{j}].port"), format!("port {} is listed twice", pv.port.0));
                }
            }
        }
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
        let mut version_ids = HashSet::default();
        for (j, v) in d.versions.iter().enumerate() {
            let vp = format!("{p}.versions[{j}]");
            if !version_ids.insert(v.id.as_str()) {
                err(format!("{vp}.id"), format!("version id `{}` is used twice", v.id));
            }
            match &v.release {
                Release::Dynamic { instances, health_check, .. } => {
                    if instances.is_empty() {
                        err(format!("{vp}.release.instances"), "a dynamic release needs at least one instance".into());
                    }
                    let mut seen = HashSet::default();
                    for (k, inst) in instances.iter().enumerate() {
                        if !seen.insert(inst.0) {
                            err(format!("{vp}.release.instances[{k}]"), format!("instance `{}` is listed twice", inst.0));
                        }
                    }
                    if let Some(hc) = health_check {
                        if !hc.path.starts_with('/') || hc.path.len() > 1024 || hc.path.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            err(
                                format!("{vp}.release.health_check.path"),
                                format!("`{}` must be an absolute path without spaces", hc.path),
                            );
                        }
                        if !(100..=3_600_000).contains(&hc.interval_ms) {
                            err(format!("{vp}.release.health_check.interval_ms"), "must be between 100 and 3600000".into());
                        }
                        if !(10..=60_000).contains(&hc.timeout_ms) || hc.timeout_ms > hc.interval_ms.max(10) {
                            err(
                                format!("{vp}.release.health_check.timeout_ms"),
                                "must be between 10 and 60000 and at most interval_ms".into(),
                            );
                        }
                        for (k, v) in [("healthy_threshold", hc.healthy_threshold), ("unhealthy_threshold", hc.unhealthy_threshold)] {
                            if !(1..=100).contains(&v) {
                                err(format!("{vp}.release.health_check.{k}"), "must be between 1 and 100".into());
                            }
                        }
                    }
                }
                Release::Static { .. } => {}
            }
        }
        if !version_ids.contains(d.active_version.as_str()) {
            err(format!("{p}.active_version"), format!("version `{}` is not one of this deployment's versions", d.active_version));
        }
        for (j, dom) in d.domains.iter().enumerate() {
            let path = format!("{p}.domains[{j}].host");
            let h = dom.host.as_str();
            if let Some(reason) = deployment_host_conflict(h, domains) {
                err(path, reason);
                continue;
            }
            if let Some((_, parent)) = h.split_once('.') {
                if let Some(owner) = tenant_domains.get(parent) {
                    if *owner != d.workspace.as_str() {
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

    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn platform_suffix_of<'d>(host: &str, domains: &'d Domains) -> Option<&'d str> {
    [&domains.sandbox, &domains.apps, &domains.edge_target, &domains.acme_zone].into_iter().map(|d| d.as_str()).find(|d| is_under(host, d))
}

/// Why an exact deployment host would shadow a platform route, if it would.
fn deployment_host_conflict(h: &str, d: &Domains) -> Option<String> {
    for zone in [&d.sandbox, &d.edge_target, &d.acme_zone] {
        if is_under(h, zone.as_str()) {
            return Some(format!("`{h}` is under the platform's domain `{zone}`"));
        }
    }
    if let Some(rest) = h.strip_suffix(d.apps.as_str()).and_then(|r| r.strip_suffix('.')) {
        if rest.matches('.').count() == 1 {
            return Some(format!("`{h}` has the shape of a platform app URL ({{name}}.{{workspace}}.{})", d.apps));
        }
    }
    if h == d.apps.as_str() {
        return Some(format!("`{h}` is the platform's apps domain"));
    }
    None
}

#[cfg(test)]
mod tests;
