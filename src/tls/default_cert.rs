//! The default certificate: what a handshake for a name the edge has no certificate
//! for receives. Self-signed, generated once into `<state_dir>/default-cert/` and kept,
//! so a browser that was told to trust it keeps trusting it across restarts.

use super::store::{parse_pair, CertStore, DirStore};
use super::Cert;
use std::path::Path;

/// Store entry of the default certificate (under `<state_dir>`).
pub const DIR: &str = "default-cert";
const ENTRY: &str = "current";

/// The names the default certificate carries, from `[domains]`: `localhost`, the
/// wildcards of the sandbox and apps zones, and the storage host and its wildcard, so the
/// embedded dev default works over `https://3000-demo.sandbox.localhost:8443` once the
/// certificate is trusted.
pub fn names(sandbox: &str, apps: &str, storage: &str) -> Vec<String> {
    vec!["localhost".into(), format!("*.{sandbox}"), format!("*.{apps}"), storage.into(), format!("*.{storage}")]
}

/// Loads the default certificate from `<state_dir>/default-cert`, generating a new one
/// when it is missing, unreadable, expired or made for other names.
pub fn load_or_generate(state_dir: &Path, names: &[String]) -> Result<Cert, String> {
    let store = DirStore::open(&state_dir.join(DIR)).map_err(|e| format!("{}: {e}", state_dir.join(DIR).display()))?;
    if let Ok((chain, key)) = store.read(ENTRY) {
        match parse_pair("default", &chain, &key) {
            Ok(c) if c.names == names && c.not_after > crate::clock::unix_now() + 86_400 => return Ok(c),
            Ok(_) => tracing::info!("default certificate is for other names or expiring; generating a new one"),
            Err(e) => tracing::warn!(error = %e, "default certificate cannot be used; generating a new one"),
        }
    }
    let (chain, key) = generate(names)?;
    store.save(ENTRY, chain.as_bytes(), key.as_bytes()).map_err(|e| format!("cannot save the default certificate: {e}"))?;
    tracing::info!(names = ?names, dir = %state_dir.join(DIR).display(), "generated a self-signed default certificate");
    parse_pair("default", chain.as_bytes(), key.as_bytes())
}

/// A self-signed certificate for `names` (PEM chain, PEM key).
pub fn generate(names: &[String]) -> Result<(String, String), String> {
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "miosa-edge default certificate");
    let now = time_from_unix(crate::clock::unix_now());
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(825);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn time_from_unix(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
