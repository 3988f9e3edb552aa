//! ACME (RFC 8555): certificates for the names the routing state implies, obtained and
//! renewed in the background (CONTRACT §9).
//!
//! ```text
//! routing state ──► subjects ──► tick: valid? backoff? budget? ──► order (≤ N at once)
//!   *.{sandbox}, *.{slug}.{apps}      DNS-01: TXT via webhook / RFC 2136, seen on [dns]
//!   *.{tenant domain} (TXT at          HTTP-01: token answered on the plain listener
//!     {workspace}.{acme_zone})        ──► CertStore::save ──► Watcher::scan (served)
//!   verified custom domains
//! ```
//!
//! Names come only from the routing state, never from a request. Every order is
//! written to the ledger before it starts (crash loops cannot hammer the CA); failures
//! back off per name; the CA's rate limits are budgeted; the certificate being
//! served keeps serving until a new one is saved.
//!
//! In fleet mode ([`fleet`]) the account, the ledger, the certificates and the pending
//! HTTP-01 challenges are the fleet's, in Redis; each name is ordered by the one node
//! holding its lock, after a fresh look at the fleet's store and budget.

pub mod dns01;
pub mod fleet;
pub mod ledger;
pub mod rfc2136;

use crate::cluster::certs::{CertFleet, Lock, RedisCertStore, TOKEN_POLL};
use crate::config::tls::Acme as AcmeConfig;
use crate::dns::Verifier;
use crate::metrics::Metrics;
use crate::schema::Domains;
use crate::services::{Service, Shutdown};
use crate::state::Objects;
use crate::store::Store;
use crate::tls::{Cert, CertStore, Watcher};
use bytes::Bytes;
use dns01::Dns01Solver;
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use ledger::{registered_domain, Ledger};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Where HTTP-01 challenges are asked for.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// How long a DNS-01 or HTTP-01 order may take at the CA.
const POLL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a renewal-information window is refreshed when the CA names no time.
const ARI_REFRESH_SECS: i64 = 6 * 3600;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pending HTTP-01 challenges: token → key authorization; this node's own, and in
/// fleet mode every node's (a copy [`fleet::TokenFollower`] keeps current).
#[derive(Debug, Default)]
pub struct Http01 {
    tokens: Mutex<HashMap<String, Bytes>>,
    fleet: arc_swap::ArcSwap<HashMap<String, Bytes>>,
}

impl Http01 {
    /// The key authorization for a request to `/.well-known/acme-challenge/{token}`.
    pub fn answer(&self, raw_path: &[u8]) -> Option<Bytes> {
        let token = std::str::from_utf8(raw_path.strip_prefix(HTTP01_PREFIX.as_bytes())?).ok()?;
        if let Some(ka) = lock(&self.tokens).get(token) {
            return Some(ka.clone());
        }
        self.fleet.load().get(token).cloned()
    }

    /// Replaces the copy of the fleet's pending challenges.
    pub fn set_fleet(&self, tokens: HashMap<String, Bytes>) {
        if **self.fleet.load() != tokens {
            self.fleet.store(Arc::new(tokens));
        }
    }

    fn insert(&self, token: &str, key_auth: &str) {
        lock(&self.tokens).insert(token.to_owned(), Bytes::copy_from_slice(key_auth.as_bytes()));
    }

    fn remove(&self, token: &str) {
        lock(&self.tokens).remove(token);
    }
}

/// Builds the configured provider.
fn dns01_solver(cfg: &crate::config::tls::Dns01) -> Result<Box<dyn Dns01Solver>, String> {
    match cfg.provider {
        crate::config::tls::Dns01Provider::Webhook => {
            let url = cfg.url.as_deref().ok_or("acme.dns01.url is required for the webhook provider")?;
            Ok(Box::new(dns01::Webhook { url: crate::hook::HookUrl::parse(url).map_err(|e| format!("acme.dns01.url: {e}"))? }))
        }
        crate::config::tls::Dns01Provider::Rfc2136 => Ok(Box::new(rfc2136::Rfc2136::from_config(cfg)?)),
    }
}

/// How a name is validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Challenge {
    #[serde(rename = "dns-01")]
    Dns01,
    #[serde(rename = "http-01")]
    Http01,
}

/// A certificate the edge should hold: one name each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subject {
    /// `*.sandbox.example.com` or `app.customer.com`.
    pub name: String,
    pub challenge: Challenge,
    /// DNS-01: where the TXT record is written (fully qualified, trailing dot).
    pub txt_at: Option<String>,
}

/// The certificates the routing state implies (CONTRACT §9), sorted and deduplicated.
pub fn subjects(objects: &Objects, d: &Domains) -> Vec<Subject> {
    let mut out = Vec::new();
    let wild = |zone: &str, txt_at: String| Subject { name: format!("*.{zone}"), challenge: Challenge::Dns01, txt_at: Some(txt_at) };
    out.push(wild(d.sandbox.as_str(), format!("_acme-challenge.{}.", d.sandbox.as_str())));
    let deploying: HashSet<&str> = objects.deployments.iter().map(|x| x.obj.workspace.as_str()).collect();
    for w in objects.workspaces.iter().map(|r| &*r.obj) {
        if deploying.contains(w.id.as_str()) {
            let zone = format!("{}.{}", w.slug.as_str(), d.apps.as_str());
            out.push(wild(&zone, format!("_acme-challenge.{zone}.")));
        }
        for dom in [&w.preview_domain, &w.deploy_domain].into_iter().flatten() {
            if dom.verified {
                // `_acme-challenge.{D}` is a CNAME to `{workspace}.{acme_zone}` (CONTRACT §1).
                out.push(wild(dom.host.as_str(), format!("{}.{}.", w.id.as_str(), d.acme_zone.as_str())));
            }
        }
    }
    // Storage (CONTRACT §12): `{alias}.{storage}` under one wildcard, the bare host (the
    // S3 endpoint) by HTTP-01, once there is a bucket to serve.
    if !objects.buckets.is_empty() {
        out.push(wild(d.storage.as_str(), format!("_acme-challenge.{}.", d.storage.as_str())));
        out.push(Subject { name: d.storage.as_str().to_owned(), challenge: Challenge::Http01, txt_at: None });
    }
    let custom =
        objects.deployments.iter().flat_map(|r| r.obj.domains.clone()).chain(objects.buckets.iter().flat_map(|r| r.obj.domains.clone()));
    for dom in custom.filter(|d| d.verified) {
        out.push(Subject { name: dom.host.as_str().to_owned(), challenge: Challenge::Http01, txt_at: None });
    }
    // A wildcard the edge holds anyway covers exact names one label under it: no
    // per-host certificate (and order) for those.
    let wildcards: HashSet<String> = out.iter().filter_map(|s| s.name.strip_prefix("*.").map(str::to_owned)).collect();
    out.retain(|s| s.challenge == Challenge::Dns01 || !s.name.split_once('.').is_some_and(|(_, parent)| wildcards.contains(parent)));
    out.sort();
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The certificate store entry for a managed name: `_wildcard.{parent}` for `*.{parent}`.
pub fn entry_name(name: &str) -> String {
    match name.strip_prefix("*.") {
        Some(parent) => format!("_wildcard.{parent}"),
        None => name.to_owned(),
    }
}

/// CertMagic's rule, after taking a name's lock: whether `stored`, the fleet's
/// certificate for `name` as read now, was obtained since this node decided to order
/// (`old`: the certificate it meant to replace), so that no order is needed.
fn renewed_elsewhere(stored: &Cert, name: &str, old: Option<&Cert>, now: i64) -> bool {
    stored.covers(name) && old.is_none_or(|o| o.serial != stored.serial && stored.not_after > o.not_after) && now < stored.renew_at()
}

/// What `GET /v1/certificates` says of a managed name.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectStatus {
    pub name: String,
    pub challenge: Challenge,
    /// valid | pending | ordering | backoff | deferred | unsupported
    pub state: &'static str,
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<i64>,
    pub last_attempt_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub deferred_by: Option<&'static str>,
}

/// A renewal time from the CA (ARI), by certificate serial: (chosen time in the
/// suggested window, when to ask again).
type AriWindow = (Option<i64>, i64);

/// Why an order failed.
#[derive(Debug)]
struct OrderError {
    message: String,
    /// The CA refused a challenge (counts toward the failed-validation limit).
    validation: bool,
}

impl OrderError {
    fn other(e: impl std::fmt::Display) -> OrderError {
        OrderError { message: e.to_string(), validation: false }
    }
    fn validation(e: impl std::fmt::Display) -> OrderError {
        OrderError { message: e.to_string(), validation: true }
    }
}

enum Cleanup {
    Txt(String, String),
    Token(String),
}

/// The background ACME service.
pub struct Manager {
    cfg: AcmeConfig,
    dir: PathBuf,
    watcher: Arc<Watcher>,
    store: Arc<Store>,
    http01: Arc<Http01>,
    dns: Option<Box<dyn Dns01Solver>>,
    verifier: Verifier,
    /// `[dns] nameservers`, asked directly for DNS-01 records.
    nameservers: Vec<std::net::SocketAddr>,
    metrics: Arc<Metrics>,
    ledger: Mutex<Ledger>,
    status: Mutex<BTreeMap<String, SubjectStatus>>,
    /// Names being ordered; shared with the service this one replaced (a config
    /// reload), so an order it still has under way is not started twice.
    inflight: Arc<Mutex<HashSet<String>>>,
    orders: Arc<Semaphore>,
    wake: Notify,
    account: tokio::sync::OnceCell<Account>,
    ari: Mutex<HashMap<Vec<u8>, AriWindow>>,
    /// Fleet mode: the account, ledger, locks and challenges are the fleet's.
    fleet: Option<Arc<CertFleet>>,
    /// Fleet mode: names not to try before a time (another node orders them, or Redis
    /// was away), with the state to report meanwhile.
    waits: Mutex<HashMap<String, (i64, &'static str)>>,
}

/// The ACME account as it is kept (`state_dir/acme/account.json`, or sealed in Redis).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: instant_acme::AccountCredentials,
}

/// What the fleet says of a name this node wants to order.
enum Claim {
    /// This node holds the name's lock and its order fits the fleet's budget.
    Go(Arc<Lock>),
    /// Not now: try again at this time, reporting this state meanwhile.
    Wait(i64, &'static str),
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("acme::Manager").field("directory", &self.cfg.directory).finish_non_exhaustive()
    }
}

impl Manager {
    /// The ACME service (start it with [`crate::services::Services::start`]). `http01`
    /// is shared with the proxy; `fleet` in fleet mode.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &AcmeConfig,
        state_dir: &std::path::Path,
        nameservers: Option<&[std::net::SocketAddr]>,
        watcher: Arc<Watcher>,
        store: Arc<Store>,
        http01: Arc<Http01>,
        metrics: Arc<Metrics>,
        fleet: Option<Arc<CertFleet>>,
    ) -> Result<Arc<Manager>, String> {
        let dir = state_dir.join("acme");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dns = cfg.dns01.as_ref().map(dns01_solver).transpose()?;
        let verifier = Verifier::new(nameservers).map_err(|e| format!("dns: {e}"))?;
        let ledger = Ledger::load(&dir.join("ledger.json"));
        let me = Arc::new(Manager {
            cfg: cfg.clone(),
            dir,
            watcher,
            store: store.clone(),
            http01,
            dns,
            verifier,
            nameservers: nameservers.map(<[_]>::to_vec).unwrap_or_default(),
            metrics,
            ledger: Mutex::new(ledger),
            status: Mutex::new(BTreeMap::new()),
            inflight: Arc::default(),
            orders: Arc::new(Semaphore::new(cfg.max_concurrent_orders)),
            wake: Notify::new(),
            account: tokio::sync::OnceCell::new(),
            ari: Mutex::new(HashMap::new()),
            fleet,
            waits: Mutex::new(HashMap::new()),
        });
        Ok(me)
    }
}

impl Manager {
    /// This (new, not yet started) service for `[acme]` after a reload, taking over
    /// from `old`: names `old` is still ordering are not ordered again meanwhile.
    pub fn taking_over(mut self: Arc<Self>, old: &Manager) -> Arc<Self> {
        if let Some(me) = Arc::get_mut(&mut self) {
            me.inflight = old.inflight.clone();
        }
        self
    }
}

#[async_trait::async_trait]
impl Service for Manager {
    fn name(&self) -> &'static str {
        "acme"
    }

    /// Looks at the managed names whenever the routing state changes, a renewal window
    /// arrives or an order ends, until the process begins to stop (orders under way are
    /// left to the runtime's end).
    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        // The names to order come from workspaces and deployments only.
        let mut workspaces = self.store.subscribe_to(crate::schema::Kind::Workspace);
        let mut changes = self.store.subscribe_to(crate::schema::Kind::Deployment);
        let mut feed = true;
        loop {
            if let Some(fleet) = &self.fleet {
                self.refresh_ledger(fleet.clone()).await;
            }
            let wait = self.clone().tick();
            self.sweep().await;
            tokio::select! {
                r = changes.changed(), if feed => feed = r.is_ok(),
                r = workspaces.changed(), if feed => feed = r.is_ok(),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

impl Manager {
    /// Looks at every managed name once; starts the orders that are due and allowed.
    /// Returns how long until something is due again.
    fn tick(self: Arc<Self>) -> Duration {
        let now = crate::clock::unix_now();
        let published = self.store.published();
        let subjects = subjects(&published.objects, &published.domains);
        let index = self.watcher.index().load_full();
        let mut next = now + 3600;
        let mut ledger = lock(&self.ledger);
        ledger.prune(now);
        let mut statuses = lock(&self.status);
        statuses.retain(|name, _| subjects.iter().any(|s| &s.name == name));
        lock(&self.waits).retain(|_, (until, _)| *until > now);
        let mut started = false;
        for s in subjects {
            let b = ledger.names.get(&s.name).cloned().unwrap_or_default();
            let st = statuses.entry(s.name.clone()).or_insert_with(|| SubjectStatus {
                name: s.name.clone(),
                challenge: s.challenge,
                state: "pending",
                failures: 0,
                last_error: None,
                next_attempt_at: None,
                last_attempt_at: None,
                last_success_at: None,
                deferred_by: None,
            });
            st.failures = b.failures;
            st.last_error = b.last_error.clone();
            st.last_attempt_at = b.last_attempt;
            st.last_success_at = b.last_success;
            st.next_attempt_at = None;
            st.deferred_by = None;
            if lock(&self.inflight).contains(&s.name) {
                st.state = "ordering";
                continue;
            }
            if s.challenge == Challenge::Dns01 && self.dns.is_none() {
                st.state = "unsupported";
                st.last_error = Some("DNS-01 names need [acme.dns01]".into());
                continue;
            }
            let cert = index.covering(&s.name).cloned();
            if let Some(c) = &cert {
                let due = self.due_at(c, now);
                if now < due {
                    st.state = "valid";
                    st.next_attempt_at = Some(due);
                    next = next.min(due);
                    continue;
                }
            }
            if let Some((until, state)) = lock(&self.waits).get(&s.name).copied().filter(|(until, _)| *until > now) {
                st.state = state;
                st.next_attempt_at = Some(until);
                next = next.min(until);
                continue;
            }
            let not_before = ledger.next_try(&s.name);
            if not_before > now {
                st.state = "backoff";
                st.next_attempt_at = Some(not_before);
                next = next.min(not_before);
                continue;
            }
            let registered = registered_domain(&s.name, &self.cfg.public_suffixes);
            if let Err(d) = ledger.check(&s.name, &registered, cert.is_some(), &self.cfg.limits, now) {
                st.state = "deferred";
                st.deferred_by = Some(d.limit);
                st.next_attempt_at = Some(d.until);
                next = next.min(d.until);
                continue;
            }
            let Ok(permit) = self.orders.clone().try_acquire_owned() else {
                st.state = "pending";
                continue;
            };
            if self.fleet.is_none() {
                // (in fleet mode, once the name's lock is held: see `claim`)
                ledger.started(&s.name, now);
            }
            st.state = "ordering";
            st.last_attempt_at = Some(now);
            lock(&self.inflight).insert(s.name.clone());
            started = true;
            let me = self.clone();
            tokio::spawn(async move { me.order_task(s, registered, cert, permit).await });
        }
        if started && self.fleet.is_none() {
            self.persist(&ledger);
        }
        let b = ledger.budget(&self.cfg.limits, now);
        for (limit, v) in [
            ("orders_per_3h", b.orders),
            ("certs_per_domain_per_week", b.certs_per_domain),
            ("failures_per_host_per_hour", b.failures_per_host),
            ("duplicates_per_week", b.duplicates),
        ] {
            self.metrics.acme_budget.with_label_values(&[limit]).set(v);
        }
        Duration::from_secs((next - now).clamp(1, 3600) as u64)
    }

    /// When `c` should be renewed: the CA's renewal window when it offers one (ARI),
    /// else two thirds into its life.
    fn due_at(self: &Arc<Self>, c: &Arc<Cert>, now: i64) -> i64 {
        let fallback = c.renew_at();
        if c.authority_key_id.is_none() || self.account.get().is_none() {
            return fallback;
        }
        let cached = lock(&self.ari).get(&c.serial).copied();
        if cached.is_none_or(|(_, refresh)| refresh <= now) {
            lock(&self.ari).insert(c.serial.clone(), (cached.and_then(|x| x.0), now + ARI_REFRESH_SECS));
            let me = self.clone();
            let c = c.clone();
            tokio::spawn(async move { me.fetch_ari(&c).await });
        }
        match cached.and_then(|x| x.0) {
            Some(start) => start.min(c.not_after - 60),
            None => fallback,
        }
    }

    /// When `c` is due for renewal as known now (the CA's window if fetched, else two
    /// thirds into its life); asks nothing of the CA.
    pub fn renew_after(&self, c: &Cert) -> i64 {
        match lock(&self.ari).get(&c.serial).and_then(|x| x.0) {
            Some(start) => start.min(c.not_after - 60),
            None => c.renew_at(),
        }
    }

    async fn fetch_ari(&self, c: &Cert) {
        let (Some(account), Some(aki)) = (self.account.get(), c.authority_key_id.as_deref()) else { return };
        let id = CertificateIdentifier::new(aki.into(), c.serial.as_slice().into());
        let now = crate::clock::unix_now();
        match account.renewal_info(&id).await {
            Ok((info, retry)) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp();
                // a random point in the window spreads renewals of many certificates
                let at = start + (end - start).max(0) * (c.serial.iter().map(|b| *b as i64).sum::<i64>() % 100) / 100;
                let refresh = now + (retry.as_secs() as i64).clamp(60, ARI_REFRESH_SECS);
                lock(&self.ari).insert(c.serial.clone(), (Some(at), refresh));
                self.wake.notify_one();
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                lock(&self.ari).insert(c.serial.clone(), (None, i64::MAX));
            }
            Err(e) => tracing::debug!(error = %e, source = %c.source, "renewal information unavailable"),
        }
    }

    fn persist(&self, ledger: &Ledger) {
        if let Err(e) = ledger.save(&self.dir.join("ledger.json")) {
            tracing::error!(error = %e, "cannot write the ACME ledger");
        }
    }

    async fn order_task(self: Arc<Self>, s: Subject, registered: String, old: Option<Arc<Cert>>, permit: OwnedSemaphorePermit) {
        let held = match &self.fleet {
            Some(fleet) => match self.claim(fleet.clone(), &s, &registered, old.as_deref()).await {
                Claim::Go(l) => Some(l),
                Claim::Wait(until, state) => {
                    lock(&self.waits).insert(s.name.clone(), (until, state));
                    lock(&self.inflight).remove(&s.name);
                    drop(permit);
                    self.wake.notify_one();
                    return;
                }
            },
            None => None,
        };
        let keeper = held.clone().map(|l| tokio::spawn(fleet::keep(l, s.name.clone())));
        tracing::info!(name = %s.name, challenge = ?s.challenge, renewal = old.is_some(), "ordering a certificate");
        let result = match self.order(&s, old.as_deref()).await {
            Ok((chain, key)) => {
                let entry = entry_name(&s.name);
                let watcher = self.watcher.clone();
                let saved = fleet::try_blocking(move || {
                    watcher.store().save(&entry, chain.as_bytes(), key.as_bytes())?;
                    watcher.scan();
                    Ok::<_, std::io::Error>(())
                })
                .await;
                saved.map_err(|e| OrderError::other(format!("cannot save the certificate: {e}")))
            }
            Err(e) => Err(e),
        };
        let now = crate::clock::unix_now();
        let (min, max) = (self.cfg.backoff_min_secs as i64, self.cfg.backoff_max_secs as i64);
        let apply = {
            let name = s.name.clone();
            let registered = registered.clone();
            let failure = result.as_ref().err().map(|e| (e.message.clone(), e.validation));
            move |ledger: &mut Ledger| -> i64 {
                match &failure {
                    None => {
                        ledger.succeeded(&name, &registered, now);
                        0
                    }
                    Some((message, validation)) => ledger.failed(&name, message, *validation, min, max, now),
                }
            }
        };
        let next = match &self.fleet {
            Some(fleet) => self.record_in_fleet(fleet.clone(), apply, now).await,
            None => {
                let mut ledger = lock(&self.ledger);
                let next = apply(&mut ledger);
                self.persist(&ledger);
                next
            }
        };
        match &result {
            Ok(()) => {
                tracing::info!(name = %s.name, "certificate issued and serving");
                self.metrics.acme_orders.with_label_values(&["success"]).inc();
            }
            Err(e) => {
                tracing::error!(name = %s.name, error = %e.message, retry_in_secs = next - now, "certificate order failed; the certificate being served (if any) keeps serving");
                self.metrics.acme_orders.with_label_values(&["failure"]).inc();
            }
        }
        if let Some(k) = keeper {
            k.abort();
        }
        if let Some(l) = held {
            fleet::release(l).await;
        }
        lock(&self.inflight).remove(&s.name);
        drop(permit);
        self.wake.notify_one();
    }

    async fn account(&self) -> Result<Account, OrderError> {
        self.account
            .get_or_try_init(|| async {
                if let Some(fleet) = &self.fleet {
                    return self.fleet_account(fleet.clone()).await;
                }
                let builder = || self.account_builder();
                let path = self.dir.join("account.json");
                if let Ok(bytes) = std::fs::read(&path) {
                    match serde_json::from_slice::<SavedAccount>(&bytes) {
                        Ok(saved) if saved.directory == self.cfg.directory => {
                            return builder().map_err(OrderError::other)?.from_credentials(saved.credentials).await.map_err(OrderError::other);
                        }
                        Ok(_) => tracing::warn!("the ACME directory changed; registering a new account"),
                        Err(e) => tracing::error!(error = %e, file = %path.display(), "ACME account file is corrupt; registering a new account"),
                    }
                }
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) =
                    builder().map_err(OrderError::other)?.create(&new, self.cfg.directory.clone(), None).await.map_err(OrderError::other)?;
                let saved = SavedAccount { directory: self.cfg.directory.clone(), credentials };
                let written = serde_json::to_vec(&saved)
                    .map_err(std::io::Error::other)
                    .and_then(|b| crate::files::write_atomic(&path, &b, 0o600));
                if let Err(e) = written {
                    tracing::error!(error = %e, file = %path.display(), "cannot save the ACME account; it will be registered again at the next start");
                }
                tracing::info!(id = account.id(), "registered an ACME account");
                Ok(account)
            })
            .await
            .cloned()
    }

    fn account_builder(&self) -> Result<instant_acme::AccountBuilder, instant_acme::Error> {
        match &self.cfg.ca_bundle {
            Some(p) => Account::builder_with_root(p),
            None => Account::builder(),
        }
    }

    /// The fleet's account when it has one for this directory (`None`: register one).
    async fn fleet_stored_account(&self, fleet: &Arc<CertFleet>) -> Result<Option<SavedAccount>, OrderError> {
        let f = fleet.clone();
        let raw = fleet::try_blocking(move || f.get(fleet::ACCOUNT))
            .await
            .map_err(|e| OrderError::other(format!("the fleet's ACME account: redis: {e}")))?;
        let Some(raw) = raw else { return Ok(None) };
        let plain = fleet.open(fleet::ACCOUNT, &raw).map_err(|e| {
            OrderError::other(format!("the fleet's ACME account cannot be opened (is the seal key the same on every node?): {e}"))
        })?;
        match serde_json::from_slice::<SavedAccount>(&plain) {
            Ok(saved) if saved.directory == self.cfg.directory => Ok(Some(saved)),
            Ok(_) => {
                tracing::warn!("the fleet's ACME account is for another directory; registering a new one");
                Ok(None)
            }
            Err(e) => {
                fleet.refused(fleet::ACCOUNT, &e);
                Err(OrderError::other(format!("the fleet's ACME account does not parse: {e}")))
            }
        }
    }

    /// The fleet's one account: read from Redis, or registered by one node (under a
    /// lock, the others wait for it) and kept there sealed.
    async fn fleet_account(&self, fleet: Arc<CertFleet>) -> Result<Account, OrderError> {
        let deadline = tokio::time::Instant::now() + crate::cluster::certs::LOCK_TTL;
        loop {
            if let Some(saved) = self.fleet_stored_account(&fleet).await? {
                return self
                    .account_builder()
                    .map_err(OrderError::other)?
                    .from_credentials(saved.credentials)
                    .await
                    .map_err(OrderError::other);
            }
            let f = fleet.clone();
            let held = fleet::try_blocking(move || f.lock(fleet::ACCOUNT))
                .await
                .map_err(|e| OrderError::other(format!("the fleet's ACME account: redis: {e}")))?;
            let Some(held) = held.map(Arc::new) else {
                if tokio::time::Instant::now() >= deadline {
                    return Err(OrderError::other("another node has been registering the fleet's ACME account for too long"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let registered = async {
                // Registered by another node just before this one took the lock?
                if let Some(saved) = self.fleet_stored_account(&fleet).await? {
                    return self
                        .account_builder()
                        .map_err(OrderError::other)?
                        .from_credentials(saved.credentials)
                        .await
                        .map_err(OrderError::other);
                }
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) = self
                    .account_builder()
                    .map_err(OrderError::other)?
                    .create(&new, self.cfg.directory.clone(), None)
                    .await
                    .map_err(OrderError::other)?;
                let saved = SavedAccount { directory: self.cfg.directory.clone(), credentials };
                let json = serde_json::to_vec(&saved).map_err(OrderError::other)?;
                let sealed = fleet.seal(fleet::ACCOUNT, &json).map_err(OrderError::other)?;
                let f = fleet.clone();
                match fleet::try_blocking(move || f.set(fleet::ACCOUNT, &sealed, false)).await {
                    Ok(_) => tracing::info!(id = account.id(), "registered the fleet's ACME account"),
                    Err(e) => tracing::error!(error = %e, "cannot keep the fleet's ACME account in Redis; another will be registered"),
                }
                Ok(account)
            }
            .await;
            fleet::release(held).await;
            return registered;
        }
    }

    /// Fleet mode, before an order: take the name's lock, look whether another node
    /// renewed it meanwhile (CertMagic's rule), then check and record the order in the
    /// fleet's ledger in one transaction.
    async fn claim(&self, fleet: Arc<CertFleet>, s: &Subject, registered: &str, old: Option<&Cert>) -> Claim {
        let now = crate::clock::unix_now();
        // A node sealing with another key than the fleet's would replace certificates
        // the others cannot open, and they it (each ordering again): it orders nothing.
        let f = fleet.clone();
        match fleet::try_blocking(move || f.seal_key_matches()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(name = %s.name, "cluster: this node's seal key does not open the fleet's values; not ordering (is seal_key_env the same on every node?)");
                return Claim::Wait(now + 60, "pending");
            }
            Err(e) => {
                tracing::warn!(name = %s.name, error = %e, "cluster: cannot check the seal key (Redis unreachable?); not ordering");
                return Claim::Wait(now + 30, "pending");
            }
        }
        let what = format!("cert:{}", s.name);
        let f = fleet.clone();
        let held = match fleet::try_blocking(move || f.lock(&what)).await {
            Ok(Some(l)) => Arc::new(l),
            Ok(None) => {
                tracing::debug!(name = %s.name, "another node is ordering this name");
                return Claim::Wait(now + 5, "ordering");
            }
            Err(e) => {
                tracing::warn!(name = %s.name, error = %e, "cluster: cannot take the order lock (Redis unreachable?); not ordering");
                return Claim::Wait(now + 30, "pending");
            }
        };
        // The name's certificate as the fleet holds it now: renewed by another node
        // between this node's look and its lock?
        let entry = entry_name(&s.name);
        let store = RedisCertStore::new(fleet.clone());
        let stored = fleet::try_blocking(move || store.read(&entry)).await;
        let fresh = match stored {
            Ok((chain, key)) => {
                crate::tls::store::parse_pair(&entry_name(&s.name), &chain, &key).ok().filter(|c| renewed_elsewhere(c, &s.name, old, now))
            }
            _ => None,
        };
        if let Some(c) = fresh {
            tracing::info!(name = %s.name, not_after = c.not_after, "another node renewed this name; serving its certificate");
            fleet::release(held).await;
            let w = self.watcher.clone();
            let _ = fleet::blocking(move || w.scan()).await;
            return Claim::Wait(now + 5, "valid");
        }
        // The fleet's budget and backoff, checked and counted in one transaction.
        let (name, registered, limits, renewal) = (s.name.clone(), registered.to_owned(), self.cfg.limits, old.is_some());
        let f = fleet.clone();
        let counted = fleet::try_blocking(move || {
            f.update(fleet::LEDGER, |raw| {
                let mut l = fleet::parse_ledger(&f, raw);
                l.prune(now);
                let next_try = l.next_try(&name);
                if next_try > now {
                    return (None, Err((next_try, "backoff")));
                }
                if let Err(d) = l.check(&name, &registered, renewal, &limits, now) {
                    return (None, Err((d.until, "deferred")));
                }
                l.started(&name, now);
                (serde_json::to_vec(&l).ok(), Ok(l))
            })
        })
        .await;
        match counted {
            Ok(Ok(l)) => {
                *lock(&self.ledger) = l;
                Claim::Go(held)
            }
            Ok(Err((until, state))) => {
                fleet::release(held).await;
                Claim::Wait(until, state)
            }
            Err(e) => {
                tracing::warn!(name = %s.name, error = %e, "cluster: cannot count the order in the fleet's ledger; not ordering");
                fleet::release(held).await;
                Claim::Wait(now + 30, "pending")
            }
        }
    }

    /// Fleet mode: records an order's end in the fleet's ledger (`apply` answers when
    /// the name may be tried again). Redis away: recorded in this node's copy only.
    async fn record_in_fleet(&self, fleet: Arc<CertFleet>, apply: impl Fn(&mut Ledger) -> i64 + Send + Clone + 'static, now: i64) -> i64 {
        let f = fleet.clone();
        let local = apply.clone();
        let r = fleet::try_blocking(move || {
            f.update(fleet::LEDGER, |raw| {
                let mut l = fleet::parse_ledger(&f, raw);
                let next = apply(&mut l);
                l.prune(now);
                (serde_json::to_vec(&l).ok(), (l, next))
            })
        })
        .await;
        match r {
            Ok((l, next)) => {
                *lock(&self.ledger) = l;
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "cluster: cannot record the order in the fleet's ledger; recorded in this node's copy");
                local(&mut lock(&self.ledger))
            }
        }
    }

    /// Names that left the routing state: `tick` orders and renews only the names the
    /// state has; the ledger notes when each managed name left, and the certificate of
    /// one gone for [`ledger::UNUSED_FOR`] (30 days) is removed from the store and the
    /// index (CONTRACT §9). In a fleet the ledger is the fleet's, so one node notes it.
    async fn sweep(&self) {
        let now = crate::clock::unix_now();
        let published = self.store.published();
        let current: std::collections::HashSet<String> =
            subjects(&published.objects, &published.domains).into_iter().map(|s| s.name).collect();
        let expired = match &self.fleet {
            Some(fleet) => {
                let f = fleet.clone();
                let r = fleet::try_blocking(move || {
                    f.update(fleet::LEDGER, |raw| {
                        let mut l = fleet::parse_ledger(&f, raw);
                        let (expired, changed) = l.leftovers(|n| current.contains(n), now);
                        (changed.then(|| serde_json::to_vec(&l).ok()).flatten(), (l, expired))
                    })
                })
                .await;
                match r {
                    Ok((l, expired)) => {
                        *lock(&self.ledger) = l;
                        expired
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster: cannot note the names that left the state in the fleet's ledger");
                        return;
                    }
                }
            }
            None => {
                let mut l = lock(&self.ledger);
                let (expired, changed) = l.leftovers(|n| current.contains(n), now);
                if changed {
                    self.persist(&l);
                }
                expired
            }
        };
        if expired.is_empty() {
            return;
        }
        let watcher = self.watcher.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for name in &expired {
                let entry = entry_name(name);
                match watcher.store().remove(&entry) {
                    Ok(()) => tracing::info!(name = %name, entry = %entry, "ACME: the certificate of a name unused for 30 days removed"),
                    Err(e) => tracing::warn!(name = %name, entry = %entry, error = %e, "ACME: cannot remove the certificate of a name unused for 30 days"),
                }
            }
            watcher.scan();
        })
        .await;
        if let Err(e) = removed {
            tracing::error!(error = %e, "ACME: removing unused certificates failed");
        }
    }

    /// Fleet mode: this node's copy of the fleet's ledger, read before each look at the
    /// names. A fleet without a ledger yet starts from this node's (its history counts).
    async fn refresh_ledger(&self, fleet: Arc<CertFleet>) {
        let f = fleet.clone();
        let raw = match fleet::try_blocking(move || f.get(fleet::LEDGER)).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: cannot read the fleet's ACME ledger; using this node's copy");
                return;
            }
        };
        match raw {
            Some(raw) => {
                let l = fleet::parse_ledger(&fleet, Some(&raw));
                *lock(&self.ledger) = l;
            }
            None => {
                let Ok(json) = serde_json::to_vec(&*lock(&self.ledger)) else { return };
                let _ = fleet::blocking(move || fleet.set(fleet::LEDGER, &json, true)).await;
            }
        }
    }

    /// One order, start to certificate: (PEM chain, PEM key).
    async fn order(&self, s: &Subject, old: Option<&Cert>) -> Result<(String, String), OrderError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(s.name.clone())];
        let replaces = old.and_then(|c| {
            let ari_known = lock(&self.ari).get(&c.serial).is_some_and(|x| x.0.is_some());
            let aki = c.authority_key_id.as_deref()?;
            ari_known.then(|| CertificateIdentifier::new(aki.into(), c.serial.as_slice().into()).into_owned())
        });
        let mut new = NewOrder::new(&ids);
        if let Some(r) = replaces {
            new = new.replaces(r);
        }
        let mut order = account.new_order(&new).await.map_err(OrderError::other)?;
        let mut cleanup = Vec::new();
        let result = async {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(OrderError::other)?;
                match a.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(OrderError::validation(format!("authorization for {} is {other:?}", s.name))),
                }
                let ty = match s.challenge {
                    Challenge::Dns01 => ChallengeType::Dns01,
                    Challenge::Http01 => ChallengeType::Http01,
                };
                let mut ch = a
                    .challenge(ty.clone())
                    .ok_or_else(|| OrderError::other(format!("the CA offers no {ty:?} challenge for {}", s.name)))?;
                let ka = ch.key_authorization();
                match (s.challenge, &self.dns, &s.txt_at) {
                    (Challenge::Dns01, Some(dns), Some(fqdn)) => {
                        let value = ka.dns_value();
                        dns.set_txt(fqdn, &value).await.map_err(OrderError::other)?;
                        cleanup.push(Cleanup::Txt(fqdn.clone(), value.clone()));
                        self.await_txt(fqdn, &value).await?;
                    }
                    (Challenge::Http01, _, _) => {
                        self.http01.insert(&ch.token, ka.as_str());
                        cleanup.push(Cleanup::Token(ch.token.clone()));
                        if let Some(fleet) = self.fleet.clone() {
                            // The CA may ask any node: publish, and give every node
                            // time to read it before the CA is told to look.
                            let (token, ka) = (ch.token.clone(), ka.as_str().to_owned());
                            fleet::try_blocking(move || fleet.put_token(&token, &ka))
                                .await
                                .map_err(|e| OrderError::other(format!("cannot publish the HTTP-01 challenge to the fleet: {e}")))?;
                            tokio::time::sleep(TOKEN_POLL * 2 + Duration::from_millis(100)).await;
                        }
                    }
                    _ => return Err(OrderError::other("DNS-01 needs [acme.dns01]")),
                }
                ch.set_ready().await.map_err(OrderError::other)?;
            }
            let status = order.poll_ready(&RetryPolicy::new().timeout(POLL_TIMEOUT)).await.map_err(|e| match e {
                instant_acme::Error::Api(p) => OrderError::validation(p),
                e => OrderError::other(e),
            })?;
            if status != OrderStatus::Ready {
                return Err(OrderError::validation(Self::why_invalid(&mut order).await));
            }
            let key = order.finalize().await.map_err(OrderError::other)?;
            let chain = order.poll_certificate(&RetryPolicy::new().timeout(POLL_TIMEOUT)).await.map_err(OrderError::other)?;
            Ok((chain, key))
        }
        .await;
        for c in cleanup {
            match c {
                Cleanup::Token(t) => {
                    self.http01.remove(&t);
                    if let Some(fleet) = self.fleet.clone() {
                        if let Err(e) = fleet::try_blocking(move || fleet.remove_token(&t)).await {
                            tracing::warn!(error = %e, "cannot withdraw an HTTP-01 challenge from the fleet; it expires");
                        }
                    }
                }
                Cleanup::Txt(fqdn, value) => {
                    if let Some(dns) = &self.dns {
                        if let Err(e) = dns.clear_txt(&fqdn, &value).await {
                            tracing::warn!(record = %fqdn, error = %e, "cannot clear the DNS-01 record");
                        }
                    }
                }
            }
        }
        result
    }

    /// The CA's reasons for an invalid order, from its challenges.
    async fn why_invalid(order: &mut instant_acme::Order) -> String {
        let mut reasons = Vec::new();
        let mut authzs = order.authorizations();
        while let Some(Ok(a)) = authzs.next().await {
            for c in &a.challenges {
                if let Some(p) = &c.error {
                    reasons.push(p.to_string());
                }
            }
        }
        if reasons.is_empty() {
            "the CA marked the order invalid".into()
        } else {
            reasons.join("; ")
        }
    }

    /// Waits until every one of `[dns] nameservers` (or the system's resolver) serves
    /// `value` at `fqdn`, so the CA is not asked to look before the record can be seen.
    async fn await_txt(&self, fqdn: &str, value: &str) -> Result<(), OrderError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.cfg.propagation_timeout_secs);
        loop {
            let seen = if self.nameservers.is_empty() {
                self.verifier.txt_values(fqdn.trim_end_matches('.')).await.iter().any(|v| v == value)
            } else {
                let mut all = true;
                for ns in &self.nameservers {
                    match dns01::txt_at(*ns, fqdn).await {
                        Ok(values) if values.iter().any(|v| v == value) => {}
                        Ok(_) => all = false,
                        Err(e) => {
                            tracing::debug!(nameserver = %ns, record = %fqdn, error = %e, "DNS-01 propagation check");
                            all = false;
                        }
                    }
                }
                all
            };
            if seen {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(OrderError::other(format!(
                    "the TXT record at {fqdn} was not visible within {} s",
                    self.cfg.propagation_timeout_secs
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Managed names and what is known of them.
    pub fn statuses(&self) -> Vec<SubjectStatus> {
        lock(&self.status).values().cloned().collect()
    }

    /// What is left of the CA's limits.
    pub fn budget(&self) -> serde_json::Value {
        let b = lock(&self.ledger).budget(&self.cfg.limits, crate::clock::unix_now());
        serde_json::json!({
            "orders_per_3h": b.orders,
            "certs_per_domain_per_week": b.certs_per_domain,
            "failures_per_host_per_hour": b.failures_per_host,
            "duplicates_per_week": b.duplicates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_answers_only_pending_tokens() {
        let h = Http01::default();
        assert!(h.answer(b"/.well-known/acme-challenge/abc").is_none());
        h.insert("abc", "abc.thumb");
        assert_eq!(h.answer(b"/.well-known/acme-challenge/abc").as_deref(), Some(&b"abc.thumb"[..]));
        assert!(h.answer(b"/.well-known/acme-challenge/abcd").is_none());
        assert!(h.answer(b"/other/abc").is_none());
        h.remove("abc");
        assert!(h.answer(b"/.well-known/acme-challenge/abc").is_none());
        // The fleet's challenges (fleet mode) are answered too, this node's first.
        h.set_fleet(HashMap::from([("xyz".to_string(), Bytes::from_static(b"xyz.fleet")), ("abc".into(), Bytes::from_static(b"abc.f"))]));
        assert_eq!(h.answer(b"/.well-known/acme-challenge/xyz").as_deref(), Some(&b"xyz.fleet"[..]));
        h.insert("abc", "abc.thumb");
        assert_eq!(h.answer(b"/.well-known/acme-challenge/abc").as_deref(), Some(&b"abc.thumb"[..]));
        h.set_fleet(HashMap::new());
        assert!(h.answer(b"/.well-known/acme-challenge/xyz").is_none());
    }

    #[test]
    fn an_order_is_skipped_only_for_a_certificate_obtained_since() {
        let names = vec!["*.s.test".to_string()];
        let (chain, key) = crate::tls::default_cert::generate(&names).unwrap();
        let at = |serial: u8, not_before: i64, not_after: i64| Cert {
            serial: vec![serial],
            not_before,
            not_after,
            ..crate::tls::store::parse_pair("_wildcard.s.test", chain.as_bytes(), key.as_bytes()).unwrap()
        };
        let old = at(1, 0, 90);
        let now = 61; // old is due (renewal at 60)
                      // Another node renewed it: a new serial, valid longer, not due.
        assert!(renewed_elsewhere(&at(2, 60, 150), "*.s.test", Some(&old), now));
        // Nothing new in the fleet's store: order.
        assert!(!renewed_elsewhere(&old, "*.s.test", Some(&old), now));
        // The fleet's certificate is another one, but not newer, or itself due: order.
        assert!(!renewed_elsewhere(&at(3, 0, 80), "*.s.test", Some(&old), now));
        assert!(!renewed_elsewhere(&at(4, 0, 90), "*.s.test", Some(&old), now));
        // A first certificate that appeared meanwhile is enough; one for another name is not.
        assert!(renewed_elsewhere(&at(2, 60, 150), "*.s.test", None, now));
        assert!(!renewed_elsewhere(&at(2, 60, 150), "*.other.test", None, now));
        assert!(!renewed_elsewhere(&at(2, 60, 150), "*.s.test", None, 121));
    }

    #[test]
    fn entry_names_of_wildcards() {
        assert_eq!(entry_name("*.sandbox.example.com"), "_wildcard.sandbox.example.com");
        assert_eq!(entry_name("app.customer.com"), "app.customer.com");
        assert!(crate::tls::store::valid_entry(&entry_name("*.a.b")));
    }

    #[test]
    fn subjects_follow_the_routing_state() {
        let cfg = crate::config::Config::parse(
            r#"
[domains]
sandbox = "sandbox.example.com"
apps = "example.com"
edge_target = "edge.example.com"
acme_zone = "acme.example.com"
storage = "storage.example.com"

[[workspaces]]
id = "ws_1"
slug = "one"
preview_domain = { host = "preview.tenant.test", verified = true }
deploy_domain = { host = "apps.tenant.test", verified = false }

[[workspaces]]
id = "ws_2"
slug = "two"

[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "web"
domains = [{ host = "app.customer.test", verified = true }, { host = "new.customer.test", verified = false }, { host = "www.preview.tenant.test", verified = true }]
active_version = "v1"
[[deployments.versions]]
id = "v1"
release = { kind = "dynamic", instances = ["127.0.0.1:1"] }
"#,
            None,
        )
        .expect("config");
        let index = crate::state::Index::build(cfg.domains.clone(), &cfg.state, &Default::default()).unwrap();
        let got = subjects(index.objects(), &cfg.domains);
        assert!(!got.iter().any(|s| s.name.contains("storage")), "no bucket, no storage names: {got:?}");
        let mut state = cfg.state.clone();
        state.buckets = serde_json::from_str(
            r#"[{"id":"bk_1","workspace":"ws_2","bucket":"b1","alias":"files",
                 "domains":[{"host":"assets.customer.test","verified":true},{"host":"cdn.customer.test"}]}]"#,
        )
        .unwrap();
        let index = crate::state::Index::build(cfg.domains.clone(), &state, &Default::default()).unwrap();
        let storage: Vec<(String, Challenge)> = subjects(index.objects(), &cfg.domains)
            .into_iter()
            .filter(|s| s.name.contains("storage") || s.name.contains("assets") || s.name.contains("cdn"))
            .map(|s| (s.name, s.challenge))
            .collect();
        assert_eq!(
            storage,
            vec![
                ("*.storage.example.com".to_string(), Challenge::Dns01),
                ("assets.customer.test".to_string(), Challenge::Http01),
                ("storage.example.com".to_string(), Challenge::Http01),
            ]
        );
        let names: Vec<(&str, Challenge, Option<&str>)> = got.iter().map(|s| (s.name.as_str(), s.challenge, s.txt_at.as_deref())).collect();
        assert_eq!(
            names,
            vec![
                ("*.one.example.com", Challenge::Dns01, Some("_acme-challenge.one.example.com.")),
                ("*.preview.tenant.test", Challenge::Dns01, Some("ws_1.acme.example.com.")),
                ("*.sandbox.example.com", Challenge::Dns01, Some("_acme-challenge.sandbox.example.com.")),
                ("app.customer.test", Challenge::Http01, None),
            ]
        );
    }
}
