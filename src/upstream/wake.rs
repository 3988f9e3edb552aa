//! Waking suspended sandboxes on request (CONTRACT §8).
//!
//! Without `[wake]`, a preview of a `suspended` sandbox answers 503 `sandbox_starting`
//! at once. With it, the proxy hands the request to the [`Waker`], which asks the
//! control plane to start the sandbox and holds the request until the control plane
//! pushes the sandbox as `running` (a new routing table), or until `timeout_ms`:
//!
//! ```text
//! proxy: suspended preview ── Waker::wake(id, host, now) ──▶
//!   join the sandbox's flight, or start one (DashMap entry; no lock held across await)
//!   └─ a new flight spawns the hook call: POST {"sandbox": id} to [wake] url,
//!      HTTP/1.1, bounded by timeout_ms; the outcome is published on the flight
//!   every waiter: table changed (Store's watch channel) → lookup(host) on the newest
//!   table → no longer a suspended preview? ──▶ Wait::Settled(table): the proxy
//!   re-routes on that table (the sandbox's address may have changed meanwhile)
//!   hook call failed ──▶ Wait::HookFailed;  deadline ──▶ Wait::TimedOut  (both 503)
//! ```
//!
//! Invariants:
//! - One hook call per sandbox per flight, however many requests wait. A flight ends
//!   when a waiter sees the sandbox settled, or `timeout_ms` after it started (a
//!   sandbox the control plane never wakes is asked again at most once per window), or
//!   [`FAILED_FLIGHT`] after it started when its call failed: requests in that short
//!   back-off are answered 503 at once instead of hammering a failing hook.
//! - Sandboxes are independent: a slow or failing hook holds only the requests for
//!   that sandbox, never another's (no global lock, one task per call).
//! - Nothing here connects anywhere but the configured hook; where the request then
//!   goes is decided by the proxy from the table it is handed.
//! - Nothing the hook answers can panic the edge: its response is read with a size
//!   limit and only the status line is parsed.

use crate::hook::{CallError, HookUrl, HookUrlError};
use crate::metrics::{Metrics, WakeWait};
use crate::routing::{Route, RouteTable, SharedTable};
use crate::schema::SandboxState;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a flight whose hook call failed keeps answering at once (capped by the
/// wake timeout) before the next request calls the hook again.
pub const FAILED_FLIGHT: Duration = Duration::from_secs(2);

/// Where a flight's hook call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Pending,
    Accepted,
    Failed,
}

/// One wake-up of one sandbox: the hook call and everyone waiting on it.
#[derive(Debug)]
struct Flight {
    started: Instant,
    call: watch::Sender<Call>,
}

impl Flight {
    fn new(started: Instant) -> Flight {
        Flight { started, call: watch::channel(Call::Pending).0 }
    }
}

/// Until when a flight started at `started` in state `call` is joined rather than
/// replaced by a new one (with a new hook call).
fn flight_end(started: Instant, call: Call, window: Duration) -> Instant {
    match call {
        Call::Failed => started + window.min(FAILED_FLIGHT),
        Call::Pending | Call::Accepted => started + window,
    }
}

/// How a wait for a suspended sandbox ended.
#[derive(Debug)]
pub enum Wait {
    /// The host no longer routes to a suspended sandbox in this table (usually: the
    /// sandbox was pushed as running). The request is routed again on it.
    Settled(Arc<RouteTable>),
    /// The hook call failed (logged and counted); answer 503 `sandbox_starting`.
    HookFailed,
    /// `timeout_ms` passed without the sandbox running; answer 503 `sandbox_starting`.
    TimedOut,
}

/// Wakes suspended sandboxes: single-flight hook calls, and waits for the control
/// plane's push. One per process, shared by all proxy threads.
pub struct Waker {
    hook: Arc<HookUrl>,
    timeout: Duration,
    routes: SharedTable,
    changes: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    flights: Arc<DashMap<Box<str>, Arc<Flight>, ahash::RandomState>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").field("timeout", &self.timeout).field("flights", &self.flights.len()).finish()
    }
}

impl Waker {
    /// A waker calling `cfg.url`, reading tables from `routes` and woken by `changes`
    /// (sent after each publish, e.g. [`crate::store::Store::subscribe`]).
    pub fn new(
        cfg: &crate::config::Wake,
        routes: SharedTable,
        changes: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
    ) -> Result<Waker, HookUrlError> {
        Ok(Waker {
            hook: Arc::new(HookUrl::parse(&cfg.url)?),
            timeout: Duration::from_millis(cfg.timeout_ms),
            routes,
            changes,
            metrics,
            flights: Arc::new(DashMap::with_hasher(ahash::RandomState::new())),
        })
    }

    /// How long a request is held at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Wakes `sandbox` (a suspended sandbox that `host` routes to) and waits until
    /// `host` routes elsewhere than to a suspended sandbox, the hook call fails, or
    /// `timeout` after `now`. Must be called on a tokio runtime (the hook call is a task).
    pub async fn wake(&self, sandbox: &str, host: &str, now: Instant) -> Wait {
        let deadline = tokio::time::Instant::from_std(now + self.timeout);
        let mut changes = self.changes.clone();
        changes.borrow_and_update();
        // The table may have changed since the caller loaded it.
        let table = self.routes.load_full();
        if settled(&table, sandbox, host) {
            self.metrics.wake_wait(WakeWait::Woken);
            return Wait::Settled(table);
        }
        let flight = self.join(sandbox, now);
        let mut call = flight.call.subscribe();
        let mut changes_open = true;
        loop {
            if *call.borrow_and_update() == Call::Failed {
                self.metrics.wake_wait(WakeWait::Failed);
                return Wait::HookFailed;
            }
            tokio::select! {
                r = changes.changed(), if changes_open => {
                    // The sender lives as long as the store; without it, only the
                    // deadline or the call can end the wait.
                    changes_open = r.is_ok();
                    let table = self.routes.load_full();
                    if settled(&table, sandbox, host) {
                        // The sandbox is up: a later suspension needs a new call.
                        self.flights.remove_if(sandbox, |_, f| Arc::ptr_eq(f, &flight));
                        self.metrics.wake_wait(WakeWait::Woken);
                        return Wait::Settled(table);
                    }
                }
                Ok(()) = call.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    self.metrics.wake_wait(WakeWait::Timeout);
                    return Wait::TimedOut;
                }
            }
        }
    }

    /// The sandbox's live flight, or a new one whose hook call is started here.
    fn join(&self, sandbox: &str, now: Instant) -> Arc<Flight> {
        // The shard lock is held only inside this block: never across an await.
        let flight = match self.flights.entry(sandbox.into()) {
            Entry::Occupied(e) if now < flight_end(e.get().started, *e.get().call.borrow(), self.timeout) => {
                return e.get().clone();
            }
            Entry::Occupied(mut e) => {
                let f = Arc::new(Flight::new(now));
                e.insert(f.clone());
                f
            }
            Entry::Vacant(e) => e.insert(Arc::new(Flight::new(now))).clone(),
        };
        self.spawn_call(sandbox.into(), flight.clone());
        flight
    }

    /// Calls the hook for `flight`, publishes the outcome, and retires the flight when
    /// its window ends.
    fn spawn_call(&self, sandbox: Box<str>, flight: Arc<Flight>) {
        let (hook, metrics, flights, timeout) = (self.hook.clone(), self.metrics.clone(), self.flights.clone(), self.timeout);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, hook.post(&serde_json::json!({ "sandbox": &*sandbox }).to_string())).await {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout(timeout)),
            };
            let call = match result {
                Ok(status) => {
                    metrics.wake_call(true);
                    tracing::info!(sandbox = %sandbox, status, "wake hook called");
                    Call::Accepted
                }
                Err(e) => {
                    metrics.wake_call(false);
                    tracing::warn!(sandbox = %sandbox, failure = e.kind(), error = %e, "wake hook failed; requests get 503 sandbox_starting");
                    Call::Failed
                }
            };
            flight.call.send_replace(call);
            let end = flight_end(flight.started, call, timeout);
            tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
            flights.remove_if(&sandbox, |_, f| Arc::ptr_eq(f, &flight));
        });
    }
}

/// Whether `host` no longer routes to suspended `sandbox` in `table`.
fn settled(table: &RouteTable, sandbox: &str, host: &str) -> bool {
    !matches!(table.lookup(host), Route::Preview { sandbox_id, sandbox: sb, .. } if sandbox_id == sandbox && sb.state == SandboxState::Suspended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use crate::routing::publish;
    use crate::schema::State;
    use crate::schema::{Domains, PlatformBranding};
    use arc_swap::ArcSwap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn wake_config_is_validated() {
        let issues = |t: &str| match Config::parse(t, None) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected issues, got {other:?}"),
        };
        let c = Config::parse("[wake]\nurl = \"http://127.0.0.1:9/wake\"\n", None).unwrap();
        assert_eq!(c.wake.map(|w| w.timeout_ms), Some(15_000));
        assert!(Config::parse("", None).unwrap().wake.is_none());
        let i = issues("[wake]\nurl = \"https://cp.example/wake\"\n");
        assert_eq!(i[0].path, "wake.url");
        assert!(i[0].message.contains("plain http://"), "{:?}", i[0]);
        assert_eq!(i[0].line, 2);
        let i = issues("[wake]\nurl = \"http://cp/wake\"\ntimeout_ms = 50\n");
        assert_eq!((i[0].path.as_str(), i[0].line), ("wake.timeout_ms", 3));
        assert!(!issues("[wake]\nurl = \"http://cp/w\"\ntimeout_ms = 300001\n").is_empty());
        assert!(Config::parse("[wake]\nurl = \"http://cp/w\"\ntimeout_ms = 300000\n", None).is_ok());
    }

    #[test]
    fn wake_flight_windows() {
        let t0 = Instant::now();
        let w = Duration::from_secs(15);
        assert_eq!(flight_end(t0, Call::Pending, w), t0 + w);
        assert_eq!(flight_end(t0, Call::Accepted, w), t0 + w);
        assert_eq!(flight_end(t0, Call::Failed, w), t0 + FAILED_FLIGHT);
        assert_eq!(flight_end(t0, Call::Failed, Duration::from_millis(500)), t0 + Duration::from_millis(500));
    }

    fn state(sleepy: &str) -> State {
        toml::from_str(&format!(
            "[[workspaces]]\nid = \"ws_1\"\nslug = \"one\"\n\n[[sandboxes]]\nid = \"box1\"\nworkspace = \"ws_1\"\naddress = \"10.0.0.9\"\nstate = \"{sleepy}\"\npreviews = [{{ port = 3000, access = \"public\" }}]\n"
        ))
        .unwrap()
    }

    fn table(s: &str, generation: u64) -> RouteTable {
        let domains = Domains::from_names("sandbox.test", "apps.test", "edge.test", "acme.test").unwrap();
        RouteTable::build(&domains, &PlatformBranding::default(), &state(s), generation).unwrap()
    }

    /// A hook on loopback answering `status` to every call; counts calls.
    async fn hook(status: u16) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/wake", l.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
                });
            }
        });
        (url, calls)
    }

    fn waker(url: String, timeout_ms: u64) -> (Waker, SharedTable, watch::Sender<u64>, Arc<Metrics>) {
        let routes: SharedTable = Arc::new(ArcSwap::from_pointee(table("suspended", 1)));
        let (tx, rx) = watch::channel(1);
        let metrics = Arc::new(Metrics::new());
        let w = Waker::new(&crate::config::Wake { url, timeout_ms }, routes.clone(), rx, metrics.clone()).unwrap();
        (w, routes, tx, metrics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wake_is_single_flight_and_settles_on_push() {
        let (url, calls) = hook(200).await;
        let (w, routes, tx, metrics) = waker(url, 10_000);
        let w = Arc::new(w);
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let w = w.clone();
                tokio::spawn(async move { w.wake("box1", "3000-box1.sandbox.test", Instant::now()).await })
            })
            .collect();
        // The control plane pushes `running` once the hook was called.
        let t0 = Instant::now();
        while calls.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the hook was never called");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        publish(&routes, table("running", 2));
        tx.send_replace(2);
        for h in waiters {
            match tokio::time::timeout(Duration::from_secs(5), h).await {
                Ok(Ok(Wait::Settled(t))) => assert_eq!(t.generation, 2),
                other => panic!("a waiter ended with {other:?}"),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let text = metrics.render();
        assert!(text.contains(r#"miosa_edge_wake_calls_total{result="ok"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_wake_waits_total{result="woken"} 50"#), "{text}");
        assert!(w.flights.is_empty(), "the flight ends once the sandbox runs");
    }

    #[tokio::test]
    async fn wake_failures_answer_at_once_and_time_out() {
        // Nothing listens: the call fails and the waiters are answered before the timeout.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (w, _routes, _tx, metrics) = waker(format!("http://{dead}/wake"), 5_000);
        let t0 = Instant::now();
        assert!(matches!(w.wake("box1", "3000-box1.sandbox.test", t0).await, Wait::HookFailed));
        // Within the back-off, the failed flight answers without another call.
        assert!(matches!(w.wake("box1", "3000-box1.sandbox.test", Instant::now()).await, Wait::HookFailed));
        assert!(t0.elapsed() < Duration::from_secs(4));
        let text = metrics.render();
        assert!(text.contains(r#"miosa_edge_wake_calls_total{result="error"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_wake_waits_total{result="failed"} 2"#), "{text}");

        // A hook that accepts but a control plane that never pushes: the timeout.
        let (url, calls) = hook(500).await;
        let (w, _routes, _tx, _) = waker(url.clone(), 300);
        assert!(matches!(w.wake("box1", "3000-box1.sandbox.test", Instant::now()).await, Wait::HookFailed));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (url, _) = hook(202).await;
        let (w, _routes, _tx, metrics) = waker(url, 300);
        let t0 = Instant::now();
        assert!(matches!(w.wake("box1", "3000-box1.sandbox.test", t0).await, Wait::TimedOut));
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(metrics.render().contains(r#"miosa_edge_wake_waits_total{result="timeout"} 1"#));

        // A host that is not a suspended preview (anymore) settles at once.
        assert!(matches!(w.wake("box1", "3000-other.sandbox.test", Instant::now()).await, Wait::Settled(_)));
    }
}
