//! ACME in fleet mode (CONTRACT §11): one account, one ledger and one order per name
//! for the whole fleet, kept in Redis through [`crate::cluster::certs::CertFleet`].
//!
//! ```text
//! tick (each node with [acme]) ── GET ledger (budget and backoff as the fleet counts them)
//!   due name ── order_task ── lock cert:{name} ── held elsewhere: wait, it is being ordered
//!                           ── re-check the store: renewed meanwhile? serve it, no order
//!                           ── ledger: check + started (one WATCH/MULTI) ── order
//!                           ── save to Redis ── ledger: succeeded | failed ── unlock
//! every node ── TokenFollower: the fleet's HTTP-01 challenges into Http01, every 200 ms
//! ```
//!
//! Locks expire ([`LOCK_TTL`](crate::cluster::certs::LOCK_TTL)) and their holder renews
//! them while the order runs, so a node that dies mid-order holds its names a minute at
//! most. Redis away: no node orders (a lock cannot be taken), every node keeps serving
//! what it has.

use super::ledger::Ledger;
use super::Http01;
use crate::cluster::certs::{CertFleet, Lock, LOCK_RENEW, TOKEN_POLL};
use crate::services::{Service, Shutdown};
use std::sync::Arc;
use std::time::Duration;

/// `{p}:acme:ledger`: the fleet's ledger, JSON.
pub const LEDGER: &str = "acme:ledger";
/// `{p}:acme:account`: the fleet's ACME account, sealed JSON.
pub const ACCOUNT: &str = "acme:account";

/// Runs a blocking Redis call on the blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("blocking task: {e}"))
}

/// [`blocking`] for work that can fail itself (a Redis call, a file write): its error
/// and a failed task are one error, so callers handle a failure once.
pub async fn try_blocking<T: Send + 'static, E: std::fmt::Display>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, String> {
    blocking(move || f().map_err(|e| e.to_string())).await?
}

/// The fleet's ledger from its stored bytes; one that does not parse is logged, counted
/// and replaced by an empty one (as a corrupt `ledger.json` is).
pub fn parse_ledger(fleet: &CertFleet, raw: Option<&[u8]>) -> Ledger {
    match raw.map(serde_json::from_slice::<Ledger>) {
        None => Ledger::default(),
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            fleet.refused(LEDGER, &format!("does not parse ({e}); starting a new one"));
            Ledger::default()
        }
    }
}

/// Renews `lock` every [`LOCK_RENEW`] until aborted.
pub async fn keep(lock: Arc<Lock>, name: String) {
    loop {
        tokio::time::sleep(LOCK_RENEW).await;
        let l = lock.clone();
        match try_blocking(move || l.renew()).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(name = %name, "cluster: this node lost its order lock; another node may order the name too"),
            Err(e) => tracing::warn!(name = %name, error = %e, "cluster: cannot renew the order lock"),
        }
    }
}

/// Lets go of `lock` (logged when Redis cannot be told; it expires anyway).
pub async fn release(lock: Arc<Lock>) {
    if let Err(e) = try_blocking(move || lock.release()).await {
        tracing::warn!(error = %e, "cluster: cannot release an order lock; it expires by itself");
    }
}

/// Keeps this node's copy of the fleet's pending HTTP-01 challenges, so it answers the
/// challenges of any node's orders (nodes without `[acme]` too). The request path reads
/// the copy; it never waits on Redis.
pub struct TokenFollower {
    pub fleet: Arc<CertFleet>,
    pub http01: Arc<Http01>,
}

#[async_trait::async_trait]
impl Service for TokenFollower {
    fn name(&self) -> &'static str {
        "fleet HTTP-01 challenges"
    }

    async fn run(self: Arc<Self>, shutdown: Shutdown) {
        crate::services::run_blocking(self.name(), shutdown, move |stop| self.follow(stop)).await
    }
}

impl TokenFollower {
    fn follow(&self, shutdown: &Shutdown) {
        let mut away = false;
        while !shutdown.is_set() {
            let wait = match self.fleet.tokens() {
                Ok(tokens) => {
                    if away {
                        tracing::info!("cluster: the fleet's HTTP-01 challenges can be read again");
                        away = false;
                    }
                    self.http01.set_fleet(tokens);
                    TOKEN_POLL
                }
                Err(e) => {
                    if !away {
                        tracing::warn!(error = %e, "cluster: cannot read the fleet's HTTP-01 challenges; answering the ones this node has");
                        away = true;
                    }
                    Duration::from_secs(1)
                }
            };
            std::thread::sleep(wait);
        }
    }
}
