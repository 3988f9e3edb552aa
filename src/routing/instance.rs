//! Runtime instances of a deployment and what request-time selection knows of each:
//! load (outstanding requests), passive ejection after failures seen by requests, and
//! the verdict of active checks (written by [`crate::upstream::health`]).
//!
//! An instance's state lives in a process-wide registry keyed by its address, so it
//! survives routing-table swaps: a table build attaches the shared [`InstanceHealth`]
//! to each instance it routes to. Selection reads only atomics: no lock on the request
//! path.

use crate::schema::Balance;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

/// First ejection after a failure seen by a request; doubles per failure in a row.
const EJECT_BASE_MS: u64 = 2_000;
const EJECT_MAX_MS: u64 = 30_000;

static REGISTRY: LazyLock<DashMap<SocketAddr, Arc<InstanceHealth>>> = LazyLock::new(DashMap::new);

/// The shared state of the instance at `addr`.
pub fn health_of(addr: SocketAddr) -> Arc<InstanceHealth> {
    REGISTRY.entry(addr).or_insert_with(|| Arc::new(InstanceHealth::default())).clone()
}

/// What is known of one instance.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    outstanding: AtomicU32,
    /// Passive: not chosen before this time (ms, [`crate::clock::monotonic_ms`]).
    ejected_until: AtomicU64,
    passive_failures: AtomicU32,
    /// Active: failed `unhealthy_threshold` checks in a row and not recovered.
    down: AtomicBool,
}

impl InstanceHealth {
    /// Requests in flight to this instance.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether active checks consider it down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Neither down nor ejected at `now`.
    pub fn available(&self, now: u64) -> bool {
        !self.is_down() && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// A request starts using it; the guard ends the use when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A request could not connect or was reset: eject for a while (2 s, doubling per
    /// failure in a row, at most 30 s).
    pub fn passive_failure(&self) {
        let n = self.passive_failures.fetch_add(1, Ordering::Relaxed).min(4);
        self.ejected_until.store(crate::clock::monotonic_ms() + (EJECT_BASE_MS << n).min(EJECT_MAX_MS), Ordering::Relaxed);
    }

    /// Active checks found it failing: out of rotation until [`Self::mark_up`].
    pub fn mark_down(&self) {
        self.down.store(true, Ordering::Relaxed);
    }

    /// Active checks found it healthy again: back in rotation, past ejections forgotten.
    pub fn mark_up(&self) {
        self.down.store(false, Ordering::Relaxed);
        self.passive_failures.store(0, Ordering::Relaxed);
        self.ejected_until.store(0, Ordering::Relaxed);
    }

    /// A request got a response: failures in a row end.
    pub fn passive_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// One request's use of an instance (see [`InstanceHealth::start`]).
#[derive(Debug)]
pub struct InFlight(Arc<InstanceHealth>);

impl InFlight {
    pub fn health(&self) -> &Arc<InstanceHealth> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Forgets instances no table refers to any more.
pub fn forget_unused() {
    REGISTRY.retain(|_, h| Arc::strong_count(h) > 1);
}

/// A runtime instance and its shared health (outstanding requests, ejection, checks).
#[derive(Debug)]
pub struct Instance {
    pub addr: SocketAddr,
    pub health: Arc<InstanceHealth>,
}

/// splitmix64: spreads a counter over 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
/// Chooses an instance of `instances`: the less loaded of two (or the next
/// in turn with `round_robin`) among those neither ejected nor failing their health
/// check; `skip` avoids one that just failed. When every instance is ejected after
/// failures seen by requests, those not failing active checks are tried anyway
/// (better than refusing all traffic on a blip); `None` when every instance fails its
/// health check (503 `no_healthy_instance`).
pub fn pick<'i>(
    instances: &'i [Instance],
    next: &AtomicUsize,
    balance: Balance,
    skip: Option<SocketAddr>,
    now_ms: u64,
) -> Option<&'i Instance> {
    let n = instances.len();
    if n == 0 {
        return None;
    }
    let ok = |i: &&Instance| Some(i.addr) != skip && i.health.available(now_ms);
    let r = next.fetch_add(1, Ordering::Relaxed);
    let chosen = match balance {
        Balance::RoundRobin => (0..n).map(|k| &instances[(r + k) % n]).find(ok),
        Balance::LeastLoaded => {
            // Two distinct candidates from a mixed counter (cheap, lock-free).
            let x = mix(r as u64);
            let a = &instances[(x % n as u64) as usize];
            let b = &instances[if n > 1 { (((x >> 32) % (n as u64 - 1)) as usize + (x % n as u64) as usize + 1) % n } else { 0 }];
            match (ok(&a), ok(&b)) {
                (true, true) => Some(if b.health.outstanding() < a.health.outstanding() { b } else { a }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => instances.iter().filter(ok).min_by_key(|i| i.health.outstanding()),
            }
        }
    };
    chosen.or_else(|| {
        let alive = |i: &&Instance| !i.health.is_down();
        (0..n).map(|k| &instances[(r + k) % n]).filter(alive).find(|i| Some(i.addr) != skip).or_else(|| {
            // Only the instance that just failed is left: try it again.
            instances.iter().find(alive)
        })
    })
}
