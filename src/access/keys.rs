//! `mp_` preview tokens (CONTRACT §3): the `[tokens]` section, the keys it names, and
//! in-line verification of a token's JWS.
//!
//! The header's `kid` picks one of the configured [`Keys`], whose algorithm is pinned
//! (`none` and algorithm confusion are refused before any signature work). HS256 runs
//! on a precomputed `ring` HMAC key; ES256 and EdDSA use `jsonwebtoken`'s ring verifiers
//! on keys parsed once. The session-cookie key lives here too. Secrets never appear in
//! `Debug` output or logs.

use super::Grant;
use crate::codes::ErrorCode;
use crate::schema::StateError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// `[tokens]`: keys for `mp_` preview tokens and the session cookie (CONTRACT §3).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Environment variable holding the session-cookie key (at least 32 bytes), shared
    /// by every edge node. Unset: a random key kept in `<state_dir>/session.key`.
    #[serde(default = "default_session_key_env")]
    pub session_key_env: String,
    /// Longest session a share token without `expires_at` opens, in seconds.
    #[serde(default = "default_share_session_ttl")]
    pub share_session_ttl_secs: u64,
    /// `mp_` verification keys; several at once for rotation.
    #[serde(default)]
    pub preview_keys: Vec<PreviewKeySpec>,
}

fn default_session_key_env() -> String {
    "MIOSA_EDGE_SESSION_KEY".into()
}

fn default_share_session_ttl() -> u64 {
    7 * 86_400
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens { session_key_env: default_session_key_env(), share_session_ttl_secs: default_share_session_ttl(), preview_keys: Vec::new() }
    }
}

/// `[[tokens.preview_keys]]`: one `mp_` verification key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewKeySpec {
    /// Matched against the token header's `kid`.
    pub kid: String,
    /// The only algorithm this key accepts.
    pub alg: KeyAlg,
    /// HS256: environment variable holding the secret (at least 32 bytes).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// ES256 / EdDSA: PEM `PUBLIC KEY` (SPKI) file.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

/// Algorithms a preview key may be pinned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum KeyAlg {
    HS256,
    ES256,
    EdDSA,
}

/// Leeway on `exp`, `iat` and `nbf` (CONTRACT §3).
pub const LEEWAY_SECS: i64 = 30;
/// Longest `exp - iat` of an `mp_` token.
pub const MAX_TOKEN_LIFE_SECS: i64 = 86_400;
/// Longest accepted token (a JWS of a few claims is ~250 bytes).
const MAX_TOKEN_LEN: usize = 4096;
/// Shortest secret accepted for HS256 and the session key (CONTRACT §3).
pub const MIN_SECRET_LEN: usize = 32;

/// Verification material for one `kid`.
#[derive(Clone)]
enum Verifier {
    Hs256(hmac::Key),
    Jws { alg: jsonwebtoken::Algorithm, key: jsonwebtoken::DecodingKey },
}

#[derive(Clone)]
struct PreviewKey {
    kid: Box<str>,
    alg: KeyAlg,
    verifier: Verifier,
}

/// The configured token keys: `mp_` verification keys and the session-cookie key.
#[derive(Clone)]
pub struct Keys {
    preview: Vec<PreviewKey>,
    session: Option<hmac::Key>,
    /// Longest session opened by a share token without `expires_at`.
    pub share_session_ttl: i64,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.preview.iter().map(|k| &*k.kid).collect();
        f.debug_struct("Keys").field("preview_kids", &kids).field("session_key", &self.session.is_some()).finish()
    }
}

impl Keys {
    /// No keys: every `mp_` token is refused and no session can be opened.
    pub fn none() -> Keys {
        Keys { preview: Vec::new(), session: None, share_session_ttl: 7 * 86_400 }
    }

    /// Loads `[tokens]`: secrets from the environment (`env` reads one variable), public
    /// keys from PEM files. Relative key paths are taken from the working directory,
    /// like `state_dir`. A missing session-key variable is not an error here: the
    /// server then uses a key kept in the state directory ([`Keys::with_session_key`]).
    pub fn load(tokens: &Tokens, env: impl Fn(&str) -> Option<Vec<u8>>) -> Result<Keys, Vec<StateError>> {
        // An empty variable counts as unset.
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| errors.push(StateError { path, message });
        let session = match env(&tokens.session_key_env) {
            Some(v) if v.len() >= MIN_SECRET_LEN => Some(hmac::Key::new(hmac::HMAC_SHA256, &v)),
            Some(_) => {
                err(
                    "tokens.session_key_env".into(),
                    format!("the session key in ${} must be at least {MIN_SECRET_LEN} bytes", tokens.session_key_env),
                );
                None
            }
            None => None,
        };
        let mut preview = Vec::new();
        for (i, spec) in tokens.preview_keys.iter().enumerate() {
            let p = format!("tokens.preview_keys[{i}]");
            let verifier = match (spec.alg, &spec.secret_env, &spec.public_key_file) {
                (KeyAlg::HS256, Some(var), None) => match env(var) {
                    Some(v) if v.len() >= MIN_SECRET_LEN => Verifier::Hs256(hmac::Key::new(hmac::HMAC_SHA256, &v)),
                    Some(_) => {
                        err(format!("{p}.secret_env"), format!("the secret in ${var} must be at least {MIN_SECRET_LEN} bytes"));
                        continue;
                    }
                    None => {
                        err(format!("{p}.secret_env"), format!("environment variable {var} is not set"));
                        continue;
                    }
                },
                (KeyAlg::HS256, _, _) => {
                    err(format!("{p}.secret_env"), "an HS256 key needs `secret_env` (and no `public_key_file`)".into());
                    continue;
                }
                (alg @ (KeyAlg::ES256 | KeyAlg::EdDSA), None, Some(file)) => match load_public_key(alg, file) {
                    Ok(v) => v,
                    Err(m) => {
                        err(format!("{p}.public_key_file"), m);
                        continue;
                    }
                },
                (_, _, _) => {
                    err(format!("{p}.public_key_file"), "an ES256 or EdDSA key needs `public_key_file` (and no `secret_env`)".into());
                    continue;
                }
            };
            preview.push(PreviewKey { kid: spec.kid.as_str().into(), alg: spec.alg, verifier });
        }
        if errors.is_empty() {
            Ok(Keys { preview, session, share_session_ttl: tokens.share_session_ttl_secs as i64 })
        } else {
            Err(errors)
        }
    }

    /// Whether a session key is configured.
    pub fn has_session_key(&self) -> bool {
        self.session.is_some()
    }

    /// The same keys with `key` as the session key when none was configured.
    pub fn with_session_key(self, key: &[u8]) -> Keys {
        match self.session {
            Some(_) => self,
            None => Keys { session: Some(hmac::Key::new(hmac::HMAC_SHA256, key)), ..self },
        }
    }

    /// The same keys, taking the session key of `running` when none is configured (a
    /// reload keeps the generated key of the running process).
    pub fn inherit_session_key(mut self, running: &Keys) -> Keys {
        if self.session.is_none() {
            self.session = running.session.clone();
        }
        self
    }

    /// The session-cookie key, if any.
    pub(crate) fn session_key(&self) -> Option<&hmac::Key> {
        self.session.as_ref()
    }
}

fn load_public_key(alg: KeyAlg, file: &Path) -> Result<Verifier, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if !pem.windows(10).any(|w| w == b"PUBLIC KEY") || pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(format!("{} must hold a PEM `PUBLIC KEY` (SPKI), and no private key", file.display()));
    }
    let (jalg, key) = match alg {
        KeyAlg::ES256 => (jsonwebtoken::Algorithm::ES256, jsonwebtoken::DecodingKey::from_ec_pem(&pem)),
        KeyAlg::EdDSA => (jsonwebtoken::Algorithm::EdDSA, jsonwebtoken::DecodingKey::from_ed_pem(&pem)),
        KeyAlg::HS256 => return Err("HS256 keys are secrets, not files".into()),
    };
    let key = key.map_err(|e| format!("{} is not a valid {alg:?} public key: {e}", file.display()))?;
    Ok(Verifier::Jws { alg: jalg, key })
}

#[derive(Deserialize)]
struct JwsHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(default, borrow)]
    kid: Option<Cow<'a, str>>,
    /// Critical extensions: the edge understands none, so their presence refuses.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    nbf: Option<i64>,
}

/// Verifies the JWS of an `mp_` token (without the prefix) for `sandbox`:`port`.
pub fn verify_preview(keys: &Keys, jws: &str, sandbox: &str, port: u16, now: i64) -> Result<Grant, ErrorCode> {
    let invalid = ErrorCode::PreviewTokenInvalid;
    if jws.len() > MAX_TOKEN_LEN {
        return Err(invalid);
    }
    let mut parts = jws.splitn(3, '.');
    let (Some(h64), Some(p64), Some(s64)) = (parts.next(), parts.next(), parts.next()) else { return Err(invalid) };
    if s64.contains('.') {
        return Err(invalid);
    }
    let mut buf = [0u8; 512];
    let n = B64.decode_slice(h64, &mut buf).map_err(|_| invalid)?;
    let header: JwsHeader<'_> = serde_json::from_slice(&buf[..n]).map_err(|_| invalid)?;
    if header.crit.is_some() {
        return Err(invalid);
    }
    let key = match (&header.kid, keys.preview.as_slice()) {
        (Some(kid), ks) => ks.iter().find(|k| *k.kid == **kid),
        (None, [only]) => Some(only),
        (None, _) => None, // several keys: `kid` is required
    }
    .ok_or(invalid)?;
    // The algorithm is pinned per key: `none`, and any other algorithm (HS256 signed
    // with an ES256 public key as secret, say), is refused before any crypto runs.
    if header.alg != key.alg.as_str() {
        return Err(invalid);
    }
    let message = &jws.as_bytes()[..h64.len() + 1 + p64.len()];
    let ok = match &key.verifier {
        Verifier::Hs256(k) => {
            let mut sig = [0u8; 48];
            match B64.decode_slice(s64, &mut sig) {
                Ok(32) => hmac::verify(k, message, &sig[..32]).is_ok(),
                _ => false,
            }
        }
        Verifier::Jws { alg, key } => jsonwebtoken::crypto::verify(s64, message, key, *alg).unwrap_or(false),
    };
    if !ok {
        return Err(invalid);
    }
    let payload = B64.decode(p64).map_err(|_| invalid)?;
    let c: Claims = serde_json::from_slice(&payload).map_err(|_| invalid)?;
    if c.sub != sandbox || c.port.is_some_and(|p| p != port) || c.exp - c.iat > MAX_TOKEN_LIFE_SECS || c.exp < c.iat {
        return Err(invalid);
    }
    if c.iat > now + LEEWAY_SECS || c.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
        return Err(invalid);
    }
    if c.exp + LEEWAY_SECS < now {
        return Err(ErrorCode::PreviewTokenExpired);
    }
    Ok(Grant { expires: c.exp.max(now), share: None, needs_password: false })
}

impl KeyAlg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::HS256 => "HS256",
            KeyAlg::ES256 => "ES256",
            KeyAlg::EdDSA => "EdDSA",
        }
    }
}

/// Signing for the `token` CLI and tests: an `mp_` token for `sandbox`.
pub mod mint {
    use super::*;
    use crate::access::share_hash;

    /// A signing key: an HS256 secret, or a PKCS#8 PEM private key for ES256/EdDSA.
    pub enum SigningKey<'a> {
        Hs256(&'a [u8]),
        Pem(KeyAlg, &'a [u8]),
    }

    /// Signs an `mp_` token with claims `sub`, `iat`, `exp` and optionally `port`.
    pub fn preview_token(
        key: SigningKey<'_>,
        kid: Option<&str>,
        sandbox: &str,
        port: Option<u16>,
        iat: i64,
        exp: i64,
    ) -> Result<String, String> {
        let (alg, ekey) = match key {
            SigningKey::Hs256(s) => (jsonwebtoken::Algorithm::HS256, jsonwebtoken::EncodingKey::from_secret(s)),
            SigningKey::Pem(KeyAlg::ES256, pem) => {
                (jsonwebtoken::Algorithm::ES256, jsonwebtoken::EncodingKey::from_ec_pem(pem).map_err(|e| format!("bad ES256 key: {e}"))?)
            }
            SigningKey::Pem(KeyAlg::EdDSA, pem) => {
                (jsonwebtoken::Algorithm::EdDSA, jsonwebtoken::EncodingKey::from_ed_pem(pem).map_err(|e| format!("bad EdDSA key: {e}"))?)
            }
            SigningKey::Pem(KeyAlg::HS256, _) => return Err("HS256 keys are secrets, not PEM files".into()),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let mut claims = serde_json::json!({ "sub": sandbox, "iat": iat, "exp": exp });
        if let Some(p) = port {
            claims["port"] = p.into();
        }
        jsonwebtoken::encode(&header, &claims, &ekey).map(|t| format!("mp_{t}")).map_err(|e| format!("cannot sign: {e}"))
    }

    /// A fresh `ms_` token (32 random bytes, base64url) and its `token_sha256` in hex.
    pub fn share_token() -> Result<(String, String), String> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| "no system randomness".to_string())?;
        let token = format!("ms_{}", B64.encode(bytes));
        let hex = crate::schema::Sha256(share_hash(&token)).to_string();
        Ok((token, hex))
    }
}
