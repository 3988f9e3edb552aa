//! Background work as services: one runtime, one shutdown signal.
//!
//! ```text
//! server::run ── Services::new ── start(control API) ── start(reloader) ── start(health checks)
//!                                 start(ACME) ── start(release manager) ── start(certificate watch)
//!                                 start(access-log writer)
//!             ── pingora Server::run (the proxy's own runtimes) ──────────────┐
//!   pingora's execution phase: SIGTERM, SIGQUIT (upgrade hand-over), SIGINT  │
//!             ──► Shutdown fires for every service at once                   │
//!             ── Services::stop (after the proxy has drained) ◄──────────────┘
//! ```
//!
//! Every long-running piece of background work (the control API, config reload, active
//! health checks, ACME, static release fetches, the certificate watch, the access-log
//! writer) implements [`Service`] and runs as a task of one small tokio runtime beside
//! pingora's proxy runtimes, so none of it ever runs on a proxy thread and none builds a
//! thread or runtime of its own. Heavy synchronous work inside a service (validating a
//! large state, unpacking a release, parsing certificates) goes to the runtime's
//! blocking pool.
//!
//! Shutdown is pingora's: the [`Shutdown`] every service holds fires on the first
//! execution phase that means the process is stopping. The control API then stops
//! accepting (a process started with `--upgrade` takes its port), the others end their
//! loops; connections and requests already in flight finish while the proxy drains.
//! [`Services::stop`] waits (3 s at most) for every service to end before the runtime
//! goes, so the last work of a loop (the usage counters' last save) is done after a
//! fast stop too, which does not drain.

use async_trait::async_trait;
use pingora::server::ExecutionPhase;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// A long-running piece of background work.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// For logs: what stopped, what failed.
    fn name(&self) -> &'static str;

    /// Runs until `shutdown` fires (or the work is done). Never panics on input it reads
    /// from outside; a failure it cannot recover from is logged and ends the service.
    async fn run(self: Arc<Self>, shutdown: Shutdown);
}

/// Fires once, when the process begins to stop.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A signal that never fires (tests, and services run outside [`Services`]).
    pub fn never() -> Shutdown {
        // The sender is leaked on purpose: a dropped sender would read as "stopping".
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// Whether the process is stopping.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the process is stopping.
    pub async fn wait(&mut self) {
        // An error means the sender is gone: the services are being torn down.
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

/// Runs a service's blocking loop (one that waits on sockets or files, checking
/// `shutdown` between rounds) on the runtime's blocking pool; a loop that panics is
/// logged as `{name} failed`.
pub async fn run_blocking(name: &'static str, shutdown: Shutdown, work: impl FnOnce(&Shutdown) + Send + 'static) {
    if let Err(e) = tokio::task::spawn_blocking(move || work(&shutdown)).await {
        tracing::error!(error = %e, "{name} failed");
    }
}

/// The services of one process and the runtime they run on.
pub struct Services {
    runtime: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    running: Arc<Running>,
}

/// How many services are still running, so [`Services::stop`] can let them end their
/// loops (a last save of the usage counters, the access log's last lines) before the
/// runtime drops what is left.
#[derive(Debug, Default)]
struct Running {
    count: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

/// One running service; dropped when its task ends, however it ends.
struct RunningGuard(Arc<Running>);

impl Running {
    fn enter(self: &Arc<Self>) -> RunningGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        RunningGuard(self.clone())
    }

    /// Waits until no service is running.
    async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("stopping", &*self.stop.borrow()).finish()
    }
}

/// The nice value of background threads (the proxy's stay at the process's own).
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: nice is per thread).
fn lower_priority() {
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours; who = 0
    // is the calling thread. A failure (a sandbox that forbids it) leaves the priority
    // as it was, which is only slower under contention.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) };
    if r != 0 {
        tracing::debug!("cannot lower the priority of a background thread");
    }
}

/// How long [`Services::stop`] waits for services and their blocking work to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

impl Services {
    /// A runtime of two worker threads (background work is I/O-bound; two keep a slow
    /// step of one service from delaying the control API). Its threads, and those of its
    /// blocking pool, run at a lower scheduling priority than the proxy's: when a core
    /// is contended, requests go first and control-plane writes wait.
    pub fn new() -> std::io::Result<Services> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("miosa-services")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(Services { runtime, stop: watch::channel(false).0, running: Arc::default() })
    }

    /// The runtime's handle, for work spawned on behalf of a service from elsewhere
    /// (a proxy thread asking for a release fetch).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// The shutdown signal the services are given.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.stop.subscribe())
    }

    /// Runs `f` to completion on the services' runtime (set-up that must happen before
    /// anything else runs, such as registering a signal handler).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Starts services later, from elsewhere (a config reload replacing one).
    pub fn starter(&self) -> Starter {
        Starter { runtime: self.handle(), shutdown: self.shutdown(), running: self.running.clone() }
    }

    /// Starts `service`.
    pub fn start<S: Service>(&self, service: Arc<S>) {
        let shutdown = self.shutdown();
        let name = service.name();
        let running = self.running.enter();
        self.runtime.spawn(async move {
            service.run(shutdown).await;
            tracing::debug!(service = name, "service ended");
            drop(running);
        });
    }

    /// Fires [`Shutdown`] when pingora's execution phase says the process is stopping:
    /// a graceful terminate (SIGTERM), the hand-over of an upgrade (SIGQUIT), or any
    /// shutdown (SIGINT).
    pub fn stop_with(&self, mut phases: broadcast::Receiver<ExecutionPhase>) {
        let stop = self.stop.clone();
        self.runtime.spawn(async move {
            loop {
                match phases.recv().await {
                    Ok(
                        ExecutionPhase::GracefulTerminate
                        | ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::ShutdownStarted
                        | ExecutionPhase::ShutdownGracePeriod
                        | ExecutionPhase::ShutdownRuntimes
                        | ExecutionPhase::Terminated,
                    )
                    | Err(broadcast::error::RecvError::Closed) => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                }
            }
            stop.send_replace(true);
        });
    }

    /// Fires [`Shutdown`] (if it has not fired), lets the services end their loops and
    /// waits a little for them and their blocking work to end. After a graceful stop
    /// they have ended while the proxy drained; after a fast one (SIGINT) this is where
    /// they get to do their last work.
    pub fn stop(self) {
        self.stop.send_replace(true);
        let running = self.running.clone();
        let ended = self.runtime.block_on(async { tokio::time::timeout(STOP_TIMEOUT, running.all_ended()).await.is_ok() });
        if !ended {
            let left = running.count.load(std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(services = left, "services still running when the process stopped");
        }
        self.runtime.shutdown_timeout(STOP_TIMEOUT);
    }
}

/// Starts services on the services' runtime after start-up; each can be stopped alone.
#[derive(Clone, Debug)]
pub struct Starter {
    runtime: tokio::runtime::Handle,
    shutdown: Shutdown,
    running: Arc<Running>,
}

/// Stops one service started by a [`Starter`] (the process's shutdown stops it too).
#[derive(Debug)]
pub struct Stop(watch::Sender<bool>);

impl Stop {
    /// Fires the service's [`Shutdown`]: its loop ends; work it spawned finishes.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Starter {
    /// Starts `service` with a shutdown of its own, fired by [`Stop::stop`] or when the
    /// process begins to stop.
    pub fn start<S: Service>(&self, service: Arc<S>) -> Stop {
        let (tx, rx) = watch::channel(false);
        let (own, mut process) = (tx.clone(), self.shutdown.clone());
        self.runtime.spawn(async move {
            tokio::select! {
                _ = process.wait() => { own.send_replace(true); }
                _ = own.closed() => {}
            }
        });
        let name = service.name();
        let running = self.running.enter();
        self.runtime.spawn(async move {
            service.run(Shutdown(rx)).await;
            tracing::debug!(service = name, "service ended");
            drop(running);
        });
        Stop(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter(AtomicU32);

    #[async_trait]
    impl Service for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
            self.0.fetch_add(1, Ordering::SeqCst);
            shutdown.wait().await;
            self.0.fetch_add(10, Ordering::SeqCst);
        }
    }

    #[test]
    fn services_end_on_pingoras_stopping_phase() {
        let services = Services::new().expect("runtime");
        let (phases, rx) = broadcast::channel(4);
        services.stop_with(rx);
        let (a, b) = (Arc::new(Counter(AtomicU32::new(0))), Arc::new(Counter(AtomicU32::new(0))));
        services.start(a.clone());
        services.start(b.clone());
        let mut shutdown = services.shutdown();
        services.block_on(async {
            while a.0.load(Ordering::SeqCst) == 0 || b.0.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        });
        phases.send(ExecutionPhase::Running).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!shutdown.is_set(), "running is not stopping");
        phases.send(ExecutionPhase::GracefulUpgradeTransferringFds).expect("send");
        services.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), shutdown.wait()).await.expect("shutdown fired");
            while a.0.load(Ordering::SeqCst) != 11 || b.0.load(Ordering::SeqCst) != 11 {
                tokio::task::yield_now().await;
            }
        });
        services.stop();
        assert!(!Shutdown::never().is_set());
    }

    /// Saves on its blocking pool once told to stop, as the usage counters do.
    struct LastSave(Arc<AtomicU32>);

    #[async_trait]
    impl Service for LastSave {
        fn name(&self) -> &'static str {
            "last save"
        }
        async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
            shutdown.wait().await;
            let saved = self.0.clone();
            let _ = tokio::task::spawn_blocking(move || saved.fetch_add(1, Ordering::SeqCst)).await;
        }
    }

    /// A fast stop (SIGINT: no drain, `stop` right after the signal) still lets every
    /// service do its last work before the runtime goes.
    #[test]
    fn stop_lets_the_services_finish_their_last_work() {
        for _ in 0..20 {
            let services = Services::new().expect("runtime");
            let saved = Arc::new(AtomicU32::new(0));
            services.start(Arc::new(LastSave(saved.clone())));
            services.starter().start(Arc::new(LastSave(saved.clone())));
            services.stop();
            assert_eq!(saved.load(Ordering::SeqCst), 2, "a last save was dropped");
        }
    }
}
