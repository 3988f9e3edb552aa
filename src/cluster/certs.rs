//! Certificates kept in Redis (fleet mode, CONTRACT §11): every node serves the fleet's
//! certificates, each name is ordered by one node at a time, and any node answers any
//! node's HTTP-01 challenges.
//!
//! ```text
//! ACME on node A ── lock {p}:lock:cert:{name} (SET NX PX, renewed while it runs)
//!                 ── re-check {p}:cert:{entry} (another node may have just renewed it)
//!                 ── budget: {p}:acme:ledger (WATCH/MULTI) ── order ── RedisCertStore::save
//! every node: Watcher ── FleetStore::list ── HGETALL {p}:certs (entry → stamp), 1–2 s
//!                        changed entry ── HMGET {p}:cert:{entry} ── open the sealed key
//! every node: HGETALL {p}:http01 (token → "expiry key-authorization"), every 200 ms
//! ```
//!
//! Keys under `[cluster] prefix` (`{p}`): `{p}:certs` (hash: entry → stamp, what the
//! watchers poll), `{p}:cert:{entry}` (hash: `fullchain` PEM, `key` sealed PEM,
//! `stamp`), `{p}:lock:{what}` (order and account locks), `{p}:acme:account` (sealed
//! JSON), `{p}:acme:ledger` (JSON), `{p}:http01` (hash of pending challenges).
//!
//! Secrets (private keys, the ACME account) are sealed with AES-256-GCM under a key
//! derived from `[cluster] seal_key_env` by HKDF-SHA256; what a value is (`cert:{entry}`,
//! `acme:account`) is authenticated with it, so a sealed value copied under another key
//! does not open. Everything read from Redis is input: a value that does not open or
//! parse is logged, counted (`miosa_edge_cluster_bad_input_total`) and refused, never
//! served and never a panic.
//!
//! A node's watcher reads [`FleetStore`]: the fleet's certificates, the operator's
//! `certs_dir` beside them, and a local copy of the fleet's for starting while Redis is
//! away. ACME saves to Redis only.

use super::{Cluster, RedisError};
use crate::tls::store::{valid_entry, CertStore, DirStore};
use redis::Commands;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An order lock expires this long after it was taken or last renewed (a node that
/// dies mid-order holds the name no longer than this).
pub const LOCK_TTL: Duration = Duration::from_secs(60);
/// The holder renews its lock this often while the order runs.
pub const LOCK_RENEW: Duration = Duration::from_secs(20);
/// Every node rereads the fleet's pending HTTP-01 challenges this often.
pub const TOKEN_POLL: Duration = Duration::from_millis(200);
/// A pending challenge left behind by a node that died mid-order is ignored after this.
pub const TOKEN_TTL: Duration = Duration::from_secs(600);
/// The certificate watch polls Redis at least this often in fleet mode (a certificate
/// issued on any node is served by every node within it, plus one read).
pub const WATCH_AT_MOST: Duration = Duration::from_secs(2);
/// Largest value read from Redis for a certificate (a chain of a few is ~10 KiB).
const MAX_VALUE_BYTES: usize = 1 << 20;
/// First byte of a sealed value: the format (nonce ‖ ciphertext ‖ tag, key by HKDF).
const SEAL_V1: u8 = 1;
const TAG_LEN: usize = 16;
/// Tries of an optimistic (WATCH/MULTI) update before giving up.
const UPDATE_TRIES: usize = 30;

/// Release a lock only if this node still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
/// Extend a lock only if this node still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Why a sealed value was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is {0} bytes, shorter than any sealed value")]
    Truncated(usize),
    #[error("sealed value has format {0}, not {SEAL_V1}")]
    Format(u8),
    #[error("sealed value does not open (another seal key, or altered)")]
    Open,
    #[error("no randomness for a nonce")]
    Random,
    #[error("the seal key cannot be derived")]
    Key,
}

/// Seals and opens the secrets kept in Redis (AES-256-GCM, a random 96-bit nonce per
/// value, the key derived from the seal key with HKDF-SHA256).
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// The sealer of `secret` (`[cluster] seal_key_env`'s bytes; config checks ≥ 32).
    pub fn new(secret: &[u8]) -> Result<Sealer, SealError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"miosa-edge seal v1").extract(secret);
        let okm = prk.expand(&[b"aes-256-gcm"], &AES_256_GCM).map_err(|_| SealError::Key)?;
        Ok(Sealer { key: LessSafeKey::new(UnboundKey::from(okm)), rng: SystemRandom::new() })
    }

    /// `1 ‖ nonce ‖ ciphertext ‖ tag`; `context` says what the value is and must be
    /// given again to open it.
    pub fn seal(&self, context: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut body)
            .map_err(|_| SealError::Open)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(SEAL_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The plain bytes of a value [`Sealer::seal`] made under the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let Some((&format, rest)) = sealed.split_first() else { return Err(SealError::Truncated(0)) };
        if format != SEAL_V1 {
            return Err(SealError::Format(format));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated(sealed.len()));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Truncated(sealed.len()))?;
        let mut buf = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf).map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// The fleet's certificate side: sealed values, locks, optimistic updates and pending
/// challenges in Redis. Its calls are blocking (run them on the blocking pool).
pub struct CertFleet {
    cluster: Arc<Cluster>,
    /// `None` without a seal key (a fleet without TLS keeps no secret).
    sealer: Option<Sealer>,
    conn: Mutex<Option<redis::Connection>>,
}

impl std::fmt::Debug for CertFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertFleet").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl CertFleet {
    /// The certificate side of `cluster`; `seal_key` from `[cluster] seal_key_env`.
    pub fn new(cluster: Arc<Cluster>, seal_key: Option<&[u8]>) -> Result<Arc<CertFleet>, String> {
        let sealer = seal_key.map(Sealer::new).transpose().map_err(|e| format!("cluster.seal_key_env: {e}"))?;
        Ok(Arc::new(CertFleet { cluster, sealer, conn: Mutex::new(None) }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.cluster.node
    }

    /// Logs and counts a value read from Redis that could not be used.
    pub fn refused(&self, key: &str, error: &dyn std::fmt::Display) {
        self.cluster.metrics.cluster_bad_input.inc();
        tracing::error!(key = %self.cluster.key(key), %error, "cluster: a value in Redis cannot be used: refused");
    }

    fn run<T>(&self, f: impl FnOnce(&mut redis::Connection) -> Result<T, RedisError>) -> Result<T, RedisError> {
        self.cluster.with_conn(&self.conn, f)
    }

    fn sealer(&self) -> Result<&Sealer, io::Error> {
        self.sealer.as_ref().ok_or_else(|| io::Error::other("[cluster] seal_key_env is not set: no secret can be kept in Redis"))
    }

    /// Seals `plain` as `{p}:{name}`'s value.
    pub fn seal(&self, name: &str, plain: &[u8]) -> io::Result<Vec<u8>> {
        self.sealer()?.seal(name, plain).map_err(io::Error::other)
    }

    /// Opens `{p}:{name}`'s sealed value; a value that does not open is logged, counted
    /// and refused (`InvalidData`).
    pub fn open(&self, name: &str, sealed: &[u8]) -> io::Result<Vec<u8>> {
        self.sealer()?.open(name, sealed).map_err(|e| {
            self.refused(name, &e);
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", self.cluster.key(name)))
        })
    }

    /// Whether this node's seal key is the fleet's: `{p}:seal:check` holds a value
    /// sealed by the first node that looked; it opens here or not (refused: logged and
    /// counted). A node whose key differs must not write what the others cannot open.
    pub fn seal_key_matches(&self) -> Result<bool, RedisError> {
        const CHECK: &str = "seal:check";
        let Some(sealer) = &self.sealer else { return Ok(false) };
        let ours = match sealer.seal(CHECK, b"miosa-edge seal check") {
            Ok(v) => v,
            Err(_) => return Ok(false),
        };
        self.set(CHECK, &ours, true)?;
        let Some(stored) = self.get(CHECK)? else { return Ok(false) };
        Ok(self.open(CHECK, &stored).is_ok())
    }

    /// `GET {p}:{name}`.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let key = self.cluster.key(name);
        self.run(|c| c.get(&key))
    }

    /// `SET {p}:{name} value` (`only_new`: NX). Whether it was written.
    pub fn set(&self, name: &str, value: &[u8], only_new: bool) -> Result<bool, RedisError> {
        let key = self.cluster.key(name);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(value);
        if only_new {
            cmd.arg("NX");
        }
        let r: Option<String> = self.run(|c| cmd.query(c))?;
        Ok(r.is_some())
    }

    /// Replaces `{p}:{name}` by what `f` makes of its current value, atomically
    /// (WATCH/MULTI, tried again when another node wrote in between). `f` answers the
    /// new value (`None`: leave it) and a result, the one of the try that counted.
    pub fn update<R>(&self, name: &str, mut f: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R)) -> Result<R, RedisError> {
        let key = self.cluster.key(name);
        for attempt in 0..UPDATE_TRIES {
            if attempt > 0 {
                // Another node's update came first: back off a random while (up to
                // 2^attempt ms, at most 100 ms), without holding the connection, so
                // contending nodes stop colliding.
                let mut r = [0u8; 2];
                let _ = SystemRandom::new().fill(&mut r);
                let cap = (1u64 << attempt.min(7)).min(100);
                std::thread::sleep(Duration::from_millis(u64::from(u16::from_le_bytes(r)) % (cap + 1)));
            }
            let done = self.run(|c| {
                redis::cmd("WATCH").arg(&key).exec(c)?;
                let current: Option<Vec<u8>> = c.get(&key)?;
                let (next, result) = f(current.as_deref());
                let Some(next) = next else {
                    redis::cmd("UNWATCH").exec(c)?;
                    return Ok(Some(result));
                };
                let done: redis::Value = redis::pipe().atomic().set(&key, next).ignore().query(c)?;
                Ok((!matches!(done, redis::Value::Nil)).then_some(result))
            })?;
            if let Some(result) = done {
                return Ok(result);
            }
        }
        Err(RedisError::from((redis::ErrorKind::Io, "optimistic update", format!("{key} kept changing"))))
    }

    /// Takes `{p}:lock:{what}` for [`LOCK_TTL`] if no node holds it (`None`: one does).
    pub fn lock(self: &Arc<Self>, what: &str) -> Result<Option<Lock>, RedisError> {
        let key = self.cluster.key(&format!("lock:{what}"));
        let mut nonce = [0u8; 8];
        let _ = SystemRandom::new().fill(&mut nonce);
        let token = format!("{}:{:016x}", self.cluster.node, u64::from_le_bytes(nonce));
        let ttl = LOCK_TTL.as_millis() as u64;
        let got: Option<String> = self.run(|c| redis::cmd("SET").arg(&key).arg(&token).arg("NX").arg("PX").arg(ttl).query(c))?;
        Ok(got.map(|_| Lock { fleet: self.clone(), key, token }))
    }

    /// Who holds `{p}:lock:{what}` (the node name), if anyone.
    pub fn lock_holder(&self, what: &str) -> Result<Option<String>, RedisError> {
        let v: Option<String> = self.get(&format!("lock:{what}"))?.map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(v.map(|t| t.rsplit_once(':').map(|(n, _)| n.to_owned()).unwrap_or(t)))
    }

    /// Publishes a pending HTTP-01 challenge to the fleet.
    pub fn put_token(&self, token: &str, key_authorization: &str) -> Result<(), RedisError> {
        let expires = super::now_ms() + TOKEN_TTL.as_millis() as u64;
        let key = self.cluster.key("http01");
        self.run(|c| c.hset(&key, token, format!("{expires} {key_authorization}")))
    }

    /// Withdraws a challenge once its order is done.
    pub fn remove_token(&self, token: &str) -> Result<(), RedisError> {
        let key = self.cluster.key("http01");
        self.run(|c| c.hdel(&key, token))
    }

    /// The fleet's pending challenges: token → key authorization. Expired ones and
    /// values that do not read are removed (the latter logged and counted).
    pub fn tokens(&self) -> Result<HashMap<String, bytes::Bytes>, RedisError> {
        let key = self.cluster.key("http01");
        let all: Vec<(String, Vec<u8>)> = self.run(|c| c.hgetall(&key))?;
        let now = super::now_ms();
        let mut out = HashMap::with_capacity(all.len());
        let mut drop = Vec::new();
        for (token, value) in all {
            match parse_token(&token, &value) {
                Ok((expires, _)) if expires <= now => drop.push(token),
                Ok((_, ka)) => {
                    out.insert(token, bytes::Bytes::copy_from_slice(ka));
                }
                Err(e) => {
                    self.refused("http01", &format!("challenge {token:?}: {e}"));
                    drop.push(token);
                }
            }
        }
        if !drop.is_empty() {
            self.run(|c| c.hdel::<_, _, ()>(&key, &drop))?;
        }
        Ok(out)
    }
}

/// `"{expires_ms} {key_authorization}"` of a well-formed token.
fn parse_token<'a>(token: &str, value: &'a [u8]) -> Result<(u64, &'a [u8]), String> {
    let well_formed = |s: &[u8]| !s.is_empty() && s.len() <= 256 && s.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
    if !well_formed(token.as_bytes()) {
        return Err("not an ACME token".into());
    }
    let i = value.iter().position(|b| *b == b' ').ok_or("no expiry")?;
    let (expires, ka) = (&value[..i], &value[i + 1..]);
    let expires = std::str::from_utf8(expires).ok().and_then(|s| s.parse().ok()).ok_or("expiry is not a number")?;
    // A key authorization is `{token}.{thumbprint}`.
    if !well_formed(ka) || !ka.starts_with(token.as_bytes()) {
        return Err("not a key authorization of this token".into());
    }
    Ok((expires, ka))
}

/// A held lock; released by [`Lock::release`] (or expiring [`LOCK_TTL`] after its last
/// renewal when the holder dies).
#[derive(Debug)]
pub struct Lock {
    fleet: Arc<CertFleet>,
    key: String,
    token: String,
}

impl Lock {
    /// Extends the lock by [`LOCK_TTL`]; `false` when this node no longer holds it.
    pub fn renew(&self) -> Result<bool, RedisError> {
        let ttl = LOCK_TTL.as_millis() as u64;
        let n: i64 = self.fleet.run(|c| redis::Script::new(RENEW).key(&self.key).arg(&self.token).arg(ttl).invoke(c))?;
        Ok(n == 1)
    }

    /// Lets go (only if this node still holds it).
    pub fn release(&self) -> Result<(), RedisError> {
        self.fleet.run(|c| redis::Script::new(RELEASE).key(&self.key).arg(&self.token).invoke::<i64>(c)).map(|_| ())
    }
}

/// [`CertStore`] on Redis: `{p}:certs` lists entries with their stamps,
/// `{p}:cert:{entry}` holds the chain and the sealed key.
#[derive(Debug)]
pub struct RedisCertStore {
    fleet: Arc<CertFleet>,
}

impl RedisCertStore {
    pub fn new(fleet: Arc<CertFleet>) -> RedisCertStore {
        RedisCertStore { fleet }
    }
}

fn io_err(e: RedisError) -> io::Error {
    io::Error::other(format!("redis: {e}"))
}

/// A stamp from whatever a store wrote as one (any bytes; equal bytes, equal stamp).
fn stamp_of(raw: &[u8]) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, raw);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(b)
}

impl CertStore for RedisCertStore {
    fn obtained_by_acme(&self, _entry: &str) -> bool {
        true
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let key = self.fleet.cluster.key("certs");
        let all: Vec<(String, Vec<u8>)> = self.fleet.run(|c| c.hgetall(&key)).map_err(io_err)?;
        let mut out = Vec::with_capacity(all.len());
        for (entry, stamp) in all {
            if !valid_entry(&entry) {
                self.fleet.refused("certs", &format!("entry {entry:?} is not a certificate entry name"));
                continue;
            }
            out.push((entry, stamp_of(&stamp)));
        }
        out.sort();
        Ok(out)
    }

    fn read(&self, entry: &str) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let name = format!("cert:{entry}");
        let key = self.fleet.cluster.key(&name);
        let (chain, sealed): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.fleet.run(|c| redis::cmd("HMGET").arg(&key).arg("fullchain").arg("key").query(c)).map_err(io_err)?;
        let (Some(chain), Some(sealed)) = (chain, sealed) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{key}: no certificate and key")));
        };
        if chain.len() > MAX_VALUE_BYTES || sealed.len() > MAX_VALUE_BYTES {
            let e = format!("larger than {MAX_VALUE_BYTES} bytes");
            self.fleet.refused(&name, &e);
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{key}: {e}")));
        }
        let key_pem = self.fleet.open(&name, &sealed)?;
        Ok((chain, key_pem))
    }

    fn save(&self, entry: &str, fullchain: &[u8], privkey: &[u8]) -> io::Result<()> {
        if !valid_entry(entry) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid certificate entry name {entry:?}")));
        }
        let name = format!("cert:{entry}");
        let sealed = self.fleet.seal(&name, privkey)?;
        let mut h = Vec::with_capacity(fullchain.len() + sealed.len());
        h.extend_from_slice(fullchain);
        h.extend_from_slice(&sealed);
        let stamp = format!("{:016x}", stamp_of(&h));
        let (key, list) = (self.fleet.cluster.key(&name), self.fleet.cluster.key("certs"));
        // One transaction: a watcher sees the chain, the key and the new stamp together.
        self.fleet
            .run(|c| {
                redis::pipe()
                    .atomic()
                    .hset_multiple(&key, &[("fullchain", fullchain), ("key", sealed.as_slice()), ("stamp", stamp.as_bytes())])
                    .ignore()
                    .hset(&list, entry, &stamp)
                    .ignore()
                    .exec(c)
            })
            .map_err(io_err)
    }

    fn remove(&self, entry: &str) -> io::Result<()> {
        let (key, list) = (self.fleet.cluster.key(&format!("cert:{entry}")), self.fleet.cluster.key("certs"));
        self.fleet.run(|c| redis::pipe().atomic().hdel(&list, entry).ignore().del(&key).ignore().exec(c)).map_err(io_err)
    }
}

/// What a fleet node's watcher reads: the fleet's certificates in Redis, and the
/// operator's `certs_dir` beside them (files placed there by hand keep being served).
/// Saves go to Redis. An entry in both is listed twice: the directory's as
/// `certs_dir/{entry}`, so both load and the index serves the one valid longer.
///
/// While Redis cannot be read, the fleet's entries are listed as they were last seen
/// (the watcher keeps serving them, and keeps following `certs_dir`). Every entry read
/// from Redis is also kept in a local copy (`state_dir/fleet-certs`, certbot layout,
/// keys 0600), so a node that starts while Redis is away serves the fleet's
/// certificates it had; the copy follows the fleet's list whenever Redis answers.
#[derive(Debug)]
pub struct FleetStore {
    redis: RedisCertStore,
    dir: DirStore,
    copy: Option<DirStore>,
    /// The fleet's entries as Redis listed them last (or the local copy's, until Redis
    /// has answered once).
    last: Mutex<Vec<(String, u64)>>,
    /// Whether `last` comes from the local copy.
    from_copy: std::sync::atomic::AtomicBool,
    /// Whether the last listing of Redis failed (logged once per outage).
    away: std::sync::atomic::AtomicBool,
}

/// How a directory entry that Redis also holds is listed.
const DIR_PREFIX: &str = "certs_dir/";

impl FleetStore {
    /// The fleet's certificates (`redis`) beside the operator's (`dir`), with a local
    /// copy of the fleet's in `copy` when given.
    pub fn new(redis: RedisCertStore, dir: DirStore, copy: Option<DirStore>) -> FleetStore {
        FleetStore { redis, dir, copy, last: Mutex::new(Vec::new()), from_copy: Default::default(), away: Default::default() }
    }

    /// Removes from the local copy what the fleet no longer lists.
    fn prune_copy(&self, listed: &[(String, u64)]) {
        let Some(copy) = &self.copy else { return };
        let Ok(have) = copy.list() else { return };
        for (name, _) in have {
            if !listed.iter().any(|(n, _)| *n == name) {
                if let Err(e) = copy.remove(&name) {
                    tracing::warn!(entry = %name, error = %e, "cannot remove a certificate from the local copy of the fleet's");
                }
            }
        }
    }

    fn in_redis(&self, entry: &str) -> bool {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(n, _)| n == entry)
    }
}

impl CertStore for FleetStore {
    /// The fleet's certificates are the ones its nodes obtained from the CA.
    fn obtained_by_acme(&self, entry: &str) -> bool {
        !entry.starts_with(DIR_PREFIX) && self.in_redis(entry)
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        use std::sync::atomic::Ordering;
        let fleet = match self.redis.list() {
            Ok(l) => {
                if self.away.swap(false, Ordering::Relaxed) {
                    tracing::info!(certificates = l.len(), "cluster: the fleet's certificates can be read again");
                }
                self.prune_copy(&l);
                self.from_copy.store(false, Ordering::Relaxed);
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = l.clone();
                l
            }
            Err(e) => {
                if !self.away.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cluster: cannot list the fleet's certificates; serving the ones this node has");
                }
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_empty() || self.from_copy.load(Ordering::Relaxed) {
                    // Started while Redis is away: the local copy of the fleet's.
                    if let Some(Ok(copied)) = self.copy.as_ref().map(DirStore::list) {
                        *last = copied;
                        self.from_copy.store(true, Ordering::Relaxed);
                    }
                }
                last.clone()
            }
        };
        let names: HashSet<&str> = fleet.iter().map(|(n, _)| n.as_str()).collect();
        let mut out = Vec::with_capacity(fleet.len());
        match self.dir.list() {
            Ok(local) => {
                for (n, s) in local {
                    let listed = if names.contains(n.as_str()) { format!("{DIR_PREFIX}{n}") } else { n };
                    out.push((listed, s));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list certs_dir; serving the fleet's certificates"),
        }
        out.extend(fleet);
        out.sort();
        Ok(out)
    }

    fn read(&self, entry: &str) -> io::Result<(Vec<u8>, Vec<u8>)> {
        if let Some(local) = entry.strip_prefix(DIR_PREFIX) {
            return self.dir.read(local);
        }
        if !self.in_redis(entry) {
            return self.dir.read(entry);
        }
        if self.from_copy.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(copy) = &self.copy {
                return copy.read(entry);
            }
        }
        let (chain, key) = self.redis.read(entry)?;
        if let Some(copy) = &self.copy {
            if let Err(e) = copy.save(entry, &chain, &key) {
                tracing::warn!(entry = %entry, error = %e, "cannot keep a local copy of the fleet's certificate");
            }
        }
        Ok((chain, key))
    }

    fn save(&self, entry: &str, fullchain: &[u8], privkey: &[u8]) -> io::Result<()> {
        self.redis.save(entry, fullchain, privkey)
    }

    /// Removes the fleet's entry and this node's copy of it (never the operator's
    /// `certs_dir`, which ACME does not write to in a fleet).
    fn remove(&self, entry: &str) -> io::Result<()> {
        self.redis.remove(entry)?;
        if let Some(copy) = &self.copy {
            copy.remove(entry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let s = Sealer::new(KEY).unwrap();
        let plain = b"-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----\n";
        let sealed = s.seal("cert:a.test", plain).unwrap();
        assert_eq!(sealed.len(), 1 + NONCE_LEN + plain.len() + TAG_LEN);
        assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"), "not plaintext");
        assert_eq!(s.open("cert:a.test", &sealed).unwrap(), plain);
        // A fresh nonce each time.
        assert_ne!(s.seal("cert:a.test", plain).unwrap(), sealed);

        // Another key, another context (a value copied under another entry).
        let other = Sealer::new(b"another key of at least thirty-two bytes").unwrap();
        assert_eq!(other.open("cert:a.test", &sealed), Err(SealError::Open));
        assert_eq!(s.open("cert:b.test", &sealed), Err(SealError::Open));
        // Truncated anywhere.
        for n in [0, 1, 12, 1 + NONCE_LEN + TAG_LEN - 1] {
            assert!(matches!(s.open("cert:a.test", &sealed[..n]), Err(SealError::Truncated(_))), "{n}");
        }
        assert_eq!(s.open("cert:a.test", &sealed[..sealed.len() - 1]), Err(SealError::Open));
        // Any byte altered.
        for i in 1..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(s.open("cert:a.test", &t), Err(SealError::Open), "byte {i}");
        }
        let mut t = sealed.clone();
        t[0] = 2;
        assert_eq!(s.open("cert:a.test", &t), Err(SealError::Format(2)));
        // The empty value seals and opens too.
        assert_eq!(s.open("x", &s.seal("x", b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn the_seal_key_is_derived_not_used_as_is() {
        // Two keys sharing their first 32 bytes are different keys.
        let a = Sealer::new(KEY).unwrap();
        let mut longer = KEY.to_vec();
        longer.extend_from_slice(b"more");
        let b = Sealer::new(&longer).unwrap();
        assert_eq!(b.open("x", &a.seal("x", b"secret").unwrap()), Err(SealError::Open));
    }

    #[test]
    fn challenge_values_are_checked() {
        assert_eq!(parse_token("tok_1", b"123 tok_1.thumb"), Ok((123, &b"tok_1.thumb"[..])));
        assert!(parse_token("tok_1", b"123").is_err());
        assert!(parse_token("tok_1", b"x tok_1.thumb").is_err());
        assert!(parse_token("tok_1", b"123 other.thumb").is_err());
        assert!(parse_token("tok_1", b"123 tok_1.<script>").is_err());
        assert!(parse_token("../x", b"123 ../x.t").is_err());
        assert!(parse_token("", b"123 .t").is_err());
        assert!(parse_token("t", "1 t.\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn stamps_follow_the_bytes() {
        assert_eq!(stamp_of(b"a"), stamp_of(b"a"));
        assert_ne!(stamp_of(b"a"), stamp_of(b"b"));
    }
}
