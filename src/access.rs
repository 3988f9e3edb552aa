//! Access to private previews (CONTRACT §3): `mp_` preview tokens, `ms_` share tokens
//! and the edge's host-bound session cookies.
//!
//! Data flow: the proxy finds a credential (`?token=`, `X-Miosa-Token`, the session
//! cookie) and asks this module for a [`Grant`] or an [`ErrorCode`]. Every check is a
//! pure function of the request's host, the route (sandbox, port), the route table
//! (share records) and `now`, so expiry is tested without sleeping.
//!
//! - `mp_` tokens are compact JWS verified in-line against the configured [`Keys`]
//!   ([`keys`]: `kid` picks the key, its algorithm is pinned).
//! - `ms_` tokens are looked up by the SHA-256 of the whole presented string in the
//!   table's share records; deleting a record revokes the token and, because every
//!   session cookie opened with it names the record's hash, those sessions too.
//! - Session cookies are HMAC-SHA256 signed over the exact host, so a cookie minted for
//!   `5173-abc…` opens nothing on `3000-abc…` ([`cookie`]).
//!
//! Secrets never appear in `Debug` output or logs.

use crate::codes::ErrorCode;
use std::sync::Arc;
use std::time::Duration;

pub mod cookie;
pub mod decide;
pub mod keys;
pub mod password;
#[cfg(test)]
mod tests;

pub use decide::{authorize, password_post, Decision, Preview, Watch, PASSWORD_PATH};
pub use keys::{mint, verify_preview, LEEWAY_SECS, MAX_TOKEN_LIFE_SECS, MIN_SECRET_LEN};
pub use keys::{KeyAlg, Keys, PreviewKeySpec, Tokens};

/// What access checks read of one routing snapshot: the keys in force with it and its
/// share records. The route table implements it, so this module sits below routing and
/// a request's checks all read the one snapshot it loaded.
pub trait Credentials {
    /// Token and session keys in force with this snapshot.
    fn keys(&self) -> &Keys;
    /// A share record by its token's SHA-256.
    fn share(&self, sha256: &[u8; 32]) -> Option<&ShareEntry>;
}

/// A share-token record as access checks need it, keyed by its token's SHA-256.
#[derive(Debug, Clone)]
pub struct ShareEntry {
    /// The SHA-256 of the token (the key).
    pub sha256: [u8; 32],
    pub id: Box<str>,
    pub sandbox: Box<str>,
    pub port: Option<u16>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// argon2id PHC string.
    pub password_hash: Option<Arc<str>>,
}

impl crate::cow::Keyed for ShareEntry {
    fn key(&self) -> &[u8] {
        &self.sha256
    }
}

/// What a valid credential grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// When the session it opens (or it itself) ends, in Unix seconds.
    pub expires: i64,
    /// The share record it came from (`None` for `mp_` tokens).
    pub share: Option<[u8; 32]>,
    /// The share needs its password before a session opens.
    pub needs_password: bool,
}

/// A token presented by a client, by its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    Preview(&'a str),
    Share(&'a str),
}

impl<'a> Token<'a> {
    /// Classifies a presented token (`None` without a known prefix).
    pub fn parse(s: &'a str) -> Option<Token<'a>> {
        if let Some(jws) = s.strip_prefix("mp_") {
            Some(Token::Preview(jws))
        } else if s.starts_with("ms_") {
            Some(Token::Share(s))
        } else {
            None
        }
    }

    /// The code for a token that cannot even be classified.
    pub fn unknown_code(s: &str) -> ErrorCode {
        if s.starts_with("ms_") {
            ErrorCode::ShareTokenInvalid
        } else {
            ErrorCode::PreviewTokenInvalid
        }
    }
}

/// Verifies a presented token (either kind) for `sandbox`:`port` at `now`.
pub fn verify_token(table: &impl Credentials, token: &str, sandbox: &str, port: u16, now: i64) -> Result<Grant, ErrorCode> {
    match Token::parse(token) {
        Some(Token::Preview(jws)) => verify_preview(table.keys(), jws, sandbox, port, now),
        Some(Token::Share(t)) => verify_share(table, t, sandbox, port, now),
        None => Err(Token::unknown_code(token)),
    }
}

/// The lower-case SHA-256 of a presented share token, as stored in `token_sha256`.
pub fn share_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether `s` has the shape of a share token: `ms_` and at least 22 base64url characters.
pub fn is_share_token(s: &str) -> bool {
    s.strip_prefix("ms_")
        .is_some_and(|t| t.len() >= 22 && t.len() <= 512 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Checks a share record against the route and `now`.
pub fn check_share(share: &ShareEntry, sandbox: &str, port: u16, now: i64) -> Result<(), ErrorCode> {
    if *share.sandbox != *sandbox || share.port.is_some_and(|p| p != port) {
        return Err(ErrorCode::ShareTokenInvalid);
    }
    if share.expires_at.is_some_and(|t| t <= now) {
        return Err(ErrorCode::ShareTokenExpired);
    }
    Ok(())
}

/// Verifies an `ms_` token (the whole string) for `sandbox`:`port`.
pub fn verify_share(table: &impl Credentials, token: &str, sandbox: &str, port: u16, now: i64) -> Result<Grant, ErrorCode> {
    if !is_share_token(token) {
        return Err(ErrorCode::ShareTokenInvalid);
    }
    let hash = share_hash(token);
    let share = table.share(&hash).ok_or(ErrorCode::ShareTokenInvalid)?;
    check_share(share, sandbox, port, now)?;
    let expires = share_session_end(table.keys(), share.expires_at, now);
    Ok(Grant { expires, share: Some(hash), needs_password: share.password_hash.is_some() })
}

/// When a session opened by a share ends: its `expires_at`, but at most
/// `share_session_ttl` from `now`.
pub fn share_session_end(keys: &Keys, expires_at: Option<i64>, now: i64) -> i64 {
    let ttl_end = now.saturating_add(keys.share_session_ttl);
    expires_at.map_or(ttl_end, |t| t.min(ttl_end))
}

/// Whether a share-backed grant still holds (the record exists, matches and has not
/// expired); `mp_` grants always hold until their own expiry.
pub fn still_valid<T: Credentials + ?Sized>(table: &T, grant: &Grant, sandbox: &str, port: u16, now: i64) -> bool {
    match &grant.share {
        Some(h) => live_share(table, h, sandbox, port, now).is_some(),
        None => grant.expires > now,
    }
}

/// The share record `hash` while it holds for `sandbox`:`port` at `now` (exists, matches,
/// not expired).
fn live_share<'t, T: Credentials + ?Sized>(table: &'t T, hash: &[u8; 32], sandbox: &str, port: u16, now: i64) -> Option<&'t ShareEntry> {
    table.share(hash).filter(|s| check_share(s, sandbox, port, now).is_ok())
}

/// How often a live share-opened exchange rechecks its share when no table-change feed
/// is given (CONTRACT §3: closed within 10 s of revocation).
const REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Resolves when an exchange opened with share `share` for `sandbox`:`port` must end:
/// the record is deleted, no longer matches, or expires. `load` reads the newest
/// snapshot. Event-driven: the share is rechecked when `changes` reports a publish (a
/// deletion, a new `expires_at`) and when its expiry comes; no timer runs for a share
/// without expiry, so the many short requests of a session cost next to nothing: one
/// lookup, and one waiter on `changes`. Without a change feed, it polls every second.
pub async fn until_revoked<T: Credentials>(
    load: impl Fn() -> Arc<T>,
    mut changes: Option<tokio::sync::watch::Receiver<u64>>,
    share: [u8; 32],
    sandbox: &str,
    port: u16,
) {
    // A receiver cloned from the proxy's has not seen the publishes since the edge
    // started: without this its first `changed()` is ready at once, and every exchange
    // checked its share twice. Publishes from here on are seen, the first check below
    // reads a table at least this new.
    if let Some(rx) = &mut changes {
        rx.mark_unchanged();
    }
    loop {
        let table = load();
        let now = crate::clock::unix_now();
        let Some(record) = live_share(&*table, &share, sandbox, port, now) else {
            return;
        };
        let expires_in = record.expires_at.map(|t| Duration::from_secs((t - now).max(0) as u64));
        drop(table);
        let expiry = async {
            match expires_in {
                // A second past it, so the recheck sees it expired.
                Some(d) => tokio::time::sleep(d + Duration::from_millis(1000)).await,
                None => std::future::pending().await,
            }
        };
        match &mut changes {
            Some(rx) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { changes = None },
                    _ = expiry => {}
                }
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(REVOCATION_POLL) => {}
                    _ = expiry => {}
                }
            }
        }
    }
}
