//! The rules one object must keep by itself (CONTRACT §1, §2), whatever else the state
//! holds: shared by the whole-document check ([`super::validate`]) and the incremental
//! check of a write ([`super::index`]), so the two can never disagree on them.
//!
//! Each rule reports through `err(field, message)`, `field` relative to the object
//! (`previews[1].port`); the caller prefixes the object's own path.

use crate::schema::{Bucket, Deployment, Domains, Preview, Release, Sandbox, Workspace};
use std::collections::HashSet;

/// A sink for errors: the field's path inside the object, and the message.
pub type Err<'a> = dyn FnMut(String, String) + 'a;

/// A workspace's own rules: its slug is not a platform label, its tenant domains are
/// not under a platform domain.
pub fn workspace(w: &Workspace, domains: &Domains, err: &mut Err<'_>) {
    if reserved_slug(w.slug.as_str(), domains) {
        err("slug".into(), format!("slug `{}` is reserved by the platform's domains", w.slug));
    }
    for (key, d) in [("preview_domain", &w.preview_domain), ("deploy_domain", &w.deploy_domain)] {
        let Some(d) = d else { continue };
        if let Some(platform) = platform_suffix_of(d.host.as_str(), domains) {
            err(format!("{key}.host"), format!("`{}` is under the platform's domain `{platform}`", d.host));
        }
    }
}

/// A sandbox's own rules: its id fits a preview label, each port is listed once.
pub fn sandbox(s: &Sandbox, err: &mut Err<'_>) {
    sandbox_parts(s.id.as_str(), &s.previews, err)
}

/// [`sandbox`] on a sandbox's parts (a start reads a million without making objects).
pub fn sandbox_parts(id: &str, previews: &[Preview], err: &mut Err<'_>) {
    if id.len() > 57 {
        // `{port}-{id}` must fit one 63-byte DNS label.
        err("id".into(), format!("sandbox id `{id}` is longer than 57 characters"));
    }
    // A few ports each, a million sandboxes: compare, do not hash.
    for (j, pv) in previews.iter().enumerate() {
        if previews[..j].iter().any(|p| p.port == pv.port) {
            err(format!("previews[{j}].port"), format!("port {} is listed twice", pv.port.0));
        }
    }
}

/// A deployment's own rules: versions, their releases and health checks, the active
/// version, and hosts that would shadow a platform route.
pub fn deployment(d: &Deployment, domains: &Domains, err: &mut Err<'_>) {
    let mut version_ids = HashSet::new();
    for (j, v) in d.versions.iter().enumerate() {
        let vp = format!("versions[{j}]");
        if !version_ids.insert(v.id.as_str()) {
            err(format!("{vp}.id"), format!("version id `{}` is used twice", v.id));
        }
        let Release::Dynamic { instances, health_check, .. } = &v.release else { continue };
        if instances.is_empty() {
            err(format!("{vp}.release.instances"), "a dynamic release needs at least one instance".into());
        }
        let mut seen = HashSet::new();
        for (k, inst) in instances.iter().enumerate() {
            if !seen.insert(inst.0) {
                err(format!("{vp}.release.instances[{k}]"), format!("instance `{}` is listed twice", inst.0));
            }
        }
        if let Some(hc) = health_check {
            if !hc.path.starts_with('/') || hc.path.len() > 1024 || hc.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                err(format!("{vp}.release.health_check.path"), format!("`{}` must be an absolute path without spaces", hc.path));
            }
            if !(100..=3_600_000).contains(&hc.interval_ms) {
                err(format!("{vp}.release.health_check.interval_ms"), "must be between 100 and 3600000".into());
            }
            if !(10..=60_000).contains(&hc.timeout_ms) || hc.timeout_ms > hc.interval_ms.max(10) {
                err(format!("{vp}.release.health_check.timeout_ms"), "must be between 10 and 60000 and at most interval_ms".into());
            }
            for (k, v) in [("healthy_threshold", hc.healthy_threshold), ("unhealthy_threshold", hc.unhealthy_threshold)] {
                if !(1..=100).contains(&v) {
                    err(format!("{vp}.release.health_check.{k}"), "must be between 1 and 100".into());
                }
            }
        }
    }
    if !version_ids.contains(d.active_version.as_str()) {
        err("active_version".into(), format!("version `{}` is not one of this deployment's versions", d.active_version));
    }
    for (j, dom) in d.domains.iter().enumerate() {
        if let Some(reason) = deployment_host_conflict(dom.host.as_str(), domains) {
            err(format!("domains[{j}].host"), reason);
        }
    }
}

/// A bucket's own rules: its domains would shadow no platform route (a host listed twice
/// is a claim made twice, reported with the other claims).
pub fn bucket(b: &Bucket, domains: &Domains, err: &mut Err<'_>) {
    for (j, dom) in b.domains.iter().enumerate() {
        if let Some(reason) = deployment_host_conflict(dom.host.as_str(), domains) {
            err(format!("domains[{j}].host"), reason);
        }
    }
}

/// True when `host` is `suffix` or a name under it.
pub fn is_under(host: &str, suffix: &str) -> bool {
    host == suffix || (host.len() > suffix.len() && host.ends_with(suffix) && host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
}

/// Slugs that would be shadowed by the platform's own names under the apps domain
/// (with apps = miosa.app and sandbox = sandbox.miosa.app, slug `sandbox` can never route).
pub fn reserved_slug(slug: &str, domains: &Domains) -> bool {
    [&domains.sandbox, &domains.edge_target, &domains.acme_zone, &domains.storage].into_iter().any(|d| {
        d.as_str()
            .strip_suffix(domains.apps.as_str())
            .and_then(|r| r.strip_suffix('.'))
            .is_some_and(|rest| !rest.contains('.') && rest == slug)
    })
}

/// The platform domain `host` is (or is under), if any.
pub fn platform_suffix_of<'d>(host: &str, domains: &'d Domains) -> Option<&'d str> {
    domains.named().into_iter().map(|(_, d)| d.as_str()).find(|d| is_under(host, d))
}

/// Why an exact deployment host would shadow a platform route, if it would.
pub fn deployment_host_conflict(h: &str, d: &Domains) -> Option<String> {
    for zone in [&d.sandbox, &d.edge_target, &d.acme_zone, &d.storage] {
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
