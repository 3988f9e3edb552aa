//! Health of runtime instances: load (outstanding requests), passive ejection after
//! failures seen by requests, and active checks (`health_check`) run off the proxy
//! threads.
//!
//! An instance's state lives in a process-wide registry keyed by its address, so it
//! survives routing-table swaps: a table build attaches the shared [`InstanceHealth`]
//! to each instance it routes to.

use crate::metrics::Metrics;
use crate::routing::{ActiveRelease, SharedTable};
use crate::schema::HealthCheck;
use dashmap::DashMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// First ejection after a failure seen by a request; doubles per failure in a row.
const EJECT_BASE_MS: u64 = 2_000;
const EJECT_MAX_MS: u64 = 30_000;

static REGISTRY: LazyLock<DashMap<SocketAddr, Arc<InstanceHealth>>> = LazyLock::new(DashMap::new);

/// The shared state of the instance at `addr`.
pub fn instance(addr: SocketAddr) -> Arc<InstanceHealth> {
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

/// Runs the active checks of every active version that has a `health_check`, following
/// the routing table: checks start for new instances and stop for removed ones.
pub fn spawn_checker(routes: SharedTable, mut changes: tokio::sync::watch::Receiver<u64>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    std::thread::Builder::new().name("health-checks".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!(error = %e, "cannot start the health-check runtime; instances are not checked"),
        };
        rt.block_on(async move {
            let mut running: HashMap<(SocketAddr, HealthCheck), tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                let table = routes.load_full();
                let mut wanted: HashMap<(SocketAddr, HealthCheck), Arc<InstanceHealth>> = HashMap::new();
                for d in table.deployments() {
                    if let ActiveRelease::Dynamic { instances, health_check: Some(hc), .. } = &d.release {
                        for i in instances.iter() {
                            wanted.insert((i.addr, (**hc).clone()), i.health.clone());
                        }
                    }
                }
                drop(table);
                running.retain(|k, task| {
                    let keep = wanted.contains_key(k);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (k, health) in wanted {
                    if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(k) {
                        let (addr, hc) = slot.key().clone();
                        slot.insert(tokio::spawn(check_loop(addr, hc, health, metrics.clone())));
                    }
                }
                // Instances no table refers to any more: forget them.
                REGISTRY.retain(|_, h| Arc::strong_count(h) > 1);
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
    })?;
    Ok(())
}

async fn check_loop(addr: SocketAddr, hc: HealthCheck, health: Arc<InstanceHealth>, metrics: Arc<Metrics>) {
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = tokio::time::timeout(Duration::from_millis(hc.timeout_ms), probe(addr, &hc.path)).await;
        let passed = matches!(result, Ok(Ok(status)) if (200..400).contains(&status));
        if passed {
            ok_run += 1;
            fail_run = 0;
            if health.is_down() && ok_run >= hc.healthy_threshold {
                health.down.store(false, Ordering::Relaxed);
                health.passive_failures.store(0, Ordering::Relaxed);
                health.ejected_until.store(0, Ordering::Relaxed);
                metrics.health_transition(true);
                tracing::info!(instance = %addr, "instance healthy again");
            }
        } else {
            fail_run += 1;
            ok_run = 0;
            if !health.is_down() && fail_run >= hc.unhealthy_threshold {
                health.down.store(true, Ordering::Relaxed);
                metrics.health_transition(false);
                let why = match result {
                    Err(_) => format!("no answer within {} ms", hc.timeout_ms),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(status)) => format!("answered {status}"),
                };
                tracing::warn!(instance = %addr, path = %hc.path, reason = %why, "instance unhealthy: taken out of rotation");
            }
        }
    }
}

/// `GET path` over a fresh connection; the response status.
async fn probe(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let _ = conn.set_nodelay(true);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: miosa-edge-health-check\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = conn.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    crate::hook::parse_status_line(&buf[..n])
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP/1.x response"))
}
