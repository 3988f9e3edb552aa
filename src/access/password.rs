//! Share passwords: the attempt limiter, argon2id verification off the proxy threads,
//! and the password form's body.
//!
//! Limits (CONTRACT §3): after 10 failures within a minute for one share token and
//! client IP, further attempts answer 429 without running argon2 until the minute has
//! passed. Verification runs on tokio's blocking pool, at most [`MAX_CONCURRENT`] at a
//! time, so a burst of logins costs bounded memory (19 MiB each with argon2's default
//! parameters) and never stalls a proxy thread. Hashes whose parameters exceed
//! [`crate::state`]'s bounds are refused when pushed.
//!
//! In fleet mode (CONTRACT §11) the attempts are also counted in a store every node
//! shares ([`SharedAttempts`], Redis through `cluster::counters`), so the limit holds
//! whichever nodes the tries reach. The shared count is taken *before* verifying (one
//! atomic check-and-count), so concurrent tries on many nodes cannot exceed it. The
//! local limiter keeps counting beside it: a try is refused when either refuses, and
//! when the shared store cannot answer the local one decides alone (never unlimited).

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Failures allowed per share token and client IP within [`WINDOW_SECS`].
pub const MAX_FAILURES: u32 = 10;
/// The attempt window.
pub const WINDOW_SECS: i64 = 60;
/// Argon2 verifications running at once.
pub const MAX_CONCURRENT: usize = 2;
/// Entries kept by the limiter before stale ones are swept.
const SWEEP_AT: usize = 100_000;
/// Largest form body accepted.
pub const MAX_FORM_BYTES: usize = 8 * 1024;

#[derive(Clone, Copy, Debug)]
struct Window {
    start: i64,
    failures: u32,
}

/// Share-password attempts counted where every node of a fleet sees them.
#[async_trait::async_trait]
pub trait SharedAttempts: Send + Sync {
    /// Takes one attempt of `ip` on `share`: `Ok(true)` counts it (the password may be
    /// verified), `Ok(false)` refuses it ([`MAX_FAILURES`] already counted within the
    /// window); `Err` when the store cannot answer (the caller falls back to its own).
    async fn take(&self, share: &[u8; 32], ip: IpAddr) -> Result<bool, String>;
    /// Forgets the attempts of `ip` on `share` (a right password).
    async fn forget(&self, share: &[u8; 32], ip: IpAddr);
}

/// Password attempts and verification.
pub struct Passwords {
    attempts: DashMap<([u8; 32], IpAddr), Window, ahash::RandomState>,
    permits: Arc<Semaphore>,
    /// Fleet mode: the attempts every node counts.
    shared: Option<Arc<dyn SharedAttempts>>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords").field("tracked", &self.attempts.len()).finish()
    }
}

impl Default for Passwords {
    fn default() -> Self {
        Passwords::new()
    }
}

impl Passwords {
    /// An empty limiter.
    pub fn new() -> Passwords {
        Passwords {
            attempts: DashMap::with_hasher(ahash::RandomState::new()),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            shared: None,
        }
    }

    /// Also counts attempts in `shared` (fleet mode).
    pub fn with_shared(mut self, shared: Arc<dyn SharedAttempts>) -> Passwords {
        self.shared = Some(shared);
        self
    }

    /// Whether `ip` may try a password for `share` now, counting the try in the shared
    /// store when there is one (see the module head). Refused when the local limiter or
    /// the shared store refuses; the local limiter alone when the store cannot answer.
    pub async fn admit(&self, share: &[u8; 32], ip: IpAddr, now: i64) -> bool {
        if !self.allowed(share, ip, now) {
            return false;
        }
        let Some(shared) = &self.shared else { return true };
        match shared.take(share, ip).await {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::warn!(error = %e, "share-password attempts: the fleet's count is unreachable; this node's own limit applies");
                true
            }
        }
    }

    /// A right password: forgets the failures here and in the shared store.
    pub async fn forget(&self, share: &[u8; 32], ip: IpAddr) {
        self.succeeded(share, ip);
        if let Some(shared) = &self.shared {
            shared.forget(share, ip).await;
        }
    }

    /// Whether `ip` may try a password for `share` at `now`.
    pub fn allowed(&self, share: &[u8; 32], ip: IpAddr, now: i64) -> bool {
        match self.attempts.get(&(*share, ip)) {
            Some(w) => now - w.start >= WINDOW_SECS || w.failures < MAX_FAILURES,
            None => true,
        }
    }

    /// Records a wrong password.
    pub fn failed(&self, share: &[u8; 32], ip: IpAddr, now: i64) {
        if self.attempts.len() >= SWEEP_AT {
            self.attempts.retain(|_, w| now - w.start < WINDOW_SECS);
        }
        let mut w = self.attempts.entry((*share, ip)).or_insert(Window { start: now, failures: 0 });
        if now - w.start >= WINDOW_SECS {
            *w = Window { start: now, failures: 0 };
        }
        w.failures += 1;
    }

    /// Forgets the failures of `ip` on `share` (after a correct password).
    pub fn succeeded(&self, share: &[u8; 32], ip: IpAddr) {
        self.attempts.remove(&(*share, ip));
    }

    /// Verifies `password` against an argon2id PHC `hash` on the blocking pool.
    pub async fn verify(&self, hash: Arc<str>, password: String) -> bool {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else { return false };
        tokio::task::spawn_blocking(move || verify_now(&hash, &password)).await.unwrap_or(false)
    }
}

/// Verifies synchronously (tests, CLI).
pub fn verify_now(hash: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    match argon2::PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "a share's password_hash cannot be parsed");
            false
        }
    }
}

/// Hashes `password` with argon2id and argon2's default parameters (for the CLI).
pub fn hash(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).map_err(|_| "no system randomness".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// The fields of the password form (`application/x-www-form-urlencoded`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Form {
    pub password: String,
    pub next: String,
}

/// Parses the form body; unknown fields are ignored.
pub fn parse_form(body: &[u8]) -> Form {
    let mut f = Form::default();
    for pair in body.split(|b| *b == b'&') {
        let mut kv = pair.splitn(2, |b| *b == b'=');
        let (k, v) = (kv.next().unwrap_or(b""), kv.next().unwrap_or(b""));
        match k {
            b"password" => f.password = form_decode(v),
            b"next" => f.next = form_decode(v),
            _ => {}
        }
    }
    f
}

/// Decodes one form value (`+` is a space, `%XX` a byte); invalid UTF-8 is replaced.
pub fn form_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < v.len() => match (hex(v[i + 1]), hex(v[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A safe place to return to after the form: a path on this host (`/…`, not `//…`
/// or `/\…`, no control characters, at most 2 KiB); anything else becomes `/`.
pub fn safe_next(next: &str) -> &str {
    let b = next.as_bytes();
    let ok =
        b.first() == Some(&b'/') && !matches!(b.get(1), Some(b'/' | b'\\')) && b.len() <= 2048 && b.iter().all(|c| c.is_ascii_graphic());
    if ok {
        next
    } else {
        "/"
    }
}
