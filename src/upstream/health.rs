//! Active health checks of runtime instances (`health_check`), run off the proxy
//! threads: `GET path` every `interval_ms`; `unhealthy_threshold` failures in a row take
//! an instance out of rotation, `healthy_threshold` passes bring it back.
//!
//! The checker follows the routing table (checks start for new instances and stop for
//! removed ones) and writes what it learns into each instance's shared
//! [`InstanceHealth`], which request-time selection reads
//! ([`crate::routing::instance`]).

use crate::metrics::Metrics;
use crate::routing::instance::InstanceHealth;
use crate::routing::{ActiveRelease, SharedTable};
use crate::schema::HealthCheck;
use crate::services::{Service, Shutdown};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The least time between two looks at the table (bursts of writes are coalesced).
const FOLLOW_PAUSE: Duration = Duration::from_millis(200);

/// Runs the active checks of every active version that has a `health_check`, following
/// the routing table: checks start for new instances and stop for removed ones.
pub struct HealthChecker {
    routes: SharedTable,
    changes: tokio::sync::watch::Receiver<u64>,
    metrics: Arc<Metrics>,
}

impl HealthChecker {
    /// A checker following `routes`, woken by `changes` (sent after each publish).
    pub fn new(routes: SharedTable, changes: tokio::sync::watch::Receiver<u64>, metrics: Arc<Metrics>) -> HealthChecker {
        HealthChecker { routes, changes, metrics }
    }
}

#[async_trait::async_trait]
impl Service for HealthChecker {
    fn name(&self) -> &'static str {
        "health checks"
    }

    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut changes = self.changes.clone();
        let mut running: HashMap<(SocketAddr, HealthCheck), tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let table = self.routes.load_full();
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
                    slot.insert(tokio::spawn(check_loop(addr, hc, health, self.metrics.clone())));
                }
            }
            // Instances no table refers to any more: forget them.
            crate::routing::instance::forget_unused();
            // A look costs what the deployments cost: coalesce bursts of writes.
            tokio::time::sleep(FOLLOW_PAUSE).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { shutdown.wait().await; break },
                _ = shutdown.wait() => break,
            }
        }
        for task in running.into_values() {
            task.abort();
        }
    }
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
                health.mark_up();
                metrics.health_transition(true);
                tracing::info!(instance = %addr, "instance healthy again");
            }
        } else {
            fail_run += 1;
            ok_run = 0;
            if !health.is_down() && fail_run >= hc.unhealthy_threshold {
                health.mark_down();
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
