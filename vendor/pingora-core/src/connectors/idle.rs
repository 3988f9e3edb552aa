// miosa-edge patch (pingora-core 5): idle upstream connections kept without a task each.
//
// pingora 0.9.1 put every released upstream connection behind an `Arc<Mutex<_>>`, an LRU
// node with its own `Notify`, a oneshot channel, and a task spawned to watch it while idle;
// reusing it meant waking that task and waiting until it let go of the lock. On a keep-alive
// proxy that is a task spawned, two task switches and four allocations per request.
//
// Here an idle connection is a plain entry in a list. Nothing polls it while it waits: the
// runtime's I/O driver still records when its peer closes it or sends something, so the
// non-blocking read at reuse (`test_reusable_stream`) sees it without a system call, and one
// sweeper per pool, running only while the pool holds connections, closes every second those
// past their idle timeout and those their peer closed.

use super::{test_reusable_stream, PoolCallback};
use crate::protocols::Stream;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the sweeper looks at the idle connections.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Idle {
    stream: Stream,
    since: Instant,
    idle_timeout: Option<Duration>,
    seq: u64,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.idle_timeout.is_some_and(|t| now.saturating_duration_since(self.since) >= t)
    }
}

#[derive(Default)]
struct Inner {
    /// Per reuse key, oldest first; reuse takes the newest (the warmest connection, and the
    /// older ones are left to time out when traffic drops).
    groups: HashMap<u64, VecDeque<Idle>>,
    /// Every idle connection's sequence number and key, oldest first, for eviction.
    by_age: BTreeMap<u64, u64>,
    next_seq: u64,
    sweeping: bool,
}

/// The keep-alive pool of a [super::TransportConnector].
pub(crate) struct IdlePool {
    inner: Mutex<Inner>,
    size: usize,
    callback: Option<PoolCallback>,
    unexpected_data: Arc<AtomicU64>,
}

impl IdlePool {
    pub(crate) fn new(
        size: usize,
        callback: Option<PoolCallback>,
        unexpected_data: Arc<AtomicU64>,
    ) -> Self {
        IdlePool { inner: Mutex::new(Inner::default()), size, callback, unexpected_data }
    }

    /// Keep `stream` for reuse under `key`. The oldest idle connections beyond the pool's
    /// size are closed.
    pub(crate) fn put(self: &Arc<Self>, key: u64, stream: Stream, idle_timeout: Option<Duration>) {
        let mut evicted = Vec::new();
        let start_sweeper = {
            let mut inner = self.inner.lock();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.by_age.insert(seq, key);
            inner.groups.entry(key).or_default().push_back(Idle {
                stream,
                since: Instant::now(),
                idle_timeout,
                seq,
            });
            while inner.by_age.len() > self.size {
                let Some((_, oldest_key)) = inner.by_age.pop_first() else {
                    break;
                };
                if let Some(idle) = inner.pop_oldest(oldest_key) {
                    evicted.push(idle);
                }
            }
            let start = !inner.sweeping && !inner.by_age.is_empty();
            inner.sweeping |= start;
            start
        };
        // streams are closed outside the lock
        self.report(&evicted);
        drop(evicted);
        if start_sweeper {
            self.spawn_sweeper();
        }
    }

    /// The newest idle connection kept under `key` that is still usable: within its idle
    /// timeout, and neither closed by its peer nor holding data nobody asked for.
    pub(crate) fn take(&self, key: u64) -> Option<Stream> {
        loop {
            let mut idle = {
                let mut inner = self.inner.lock();
                let group = inner.groups.get_mut(&key)?;
                let idle = group.pop_back();
                if group.is_empty() {
                    inner.groups.remove(&key);
                }
                let idle = idle?;
                inner.by_age.remove(&idle.seq);
                idle
            };
            if !idle.expired(Instant::now())
                && test_reusable_stream(&mut idle.stream, &self.unexpected_data)
            {
                return Some(idle.stream);
            }
            self.report(std::slice::from_ref(&idle));
        }
    }

    /// Close the idle connections past their timeout or no longer usable. Returns whether
    /// the pool still holds connections; when it does not, the sweeper stops (under the same
    /// lock, so the next `put` starts another).
    fn sweep(&self, now: Instant) -> bool {
        let mut doomed = Vec::new();
        let remaining = {
            let mut inner = self.inner.lock();
            let Inner { groups, by_age, .. } = &mut *inner;
            groups.retain(|_, group| {
                for mut idle in std::mem::take(group) {
                    if idle.expired(now)
                        || !test_reusable_stream(&mut idle.stream, &self.unexpected_data)
                    {
                        by_age.remove(&idle.seq);
                        doomed.push(idle);
                    } else {
                        group.push_back(idle);
                    }
                }
                !group.is_empty()
            });
            let remaining = !inner.by_age.is_empty();
            if !remaining {
                inner.sweeping = false;
            }
            remaining
        };
        self.report(&doomed);
        remaining
    }

    fn report(&self, gone: &[Idle]) {
        if let Some(callback) = &self.callback {
            for idle in gone {
                callback(idle.since.elapsed());
            }
        }
    }

    fn spawn_sweeper(self: &Arc<Self>) {
        // If the runtime drops the task (shutdown), the next `put` starts another.
        struct Stopped(Weak<IdlePool>, bool);
        impl Stopped {
            fn disarm(&mut self) {
                self.1 = false;
            }
        }
        impl Drop for Stopped {
            fn drop(&mut self) {
                if self.1 {
                    if let Some(pool) = self.0.upgrade() {
                        pool.inner.lock().sweeping = false;
                    }
                }
            }
        }
        let mut stopped = Stopped(Arc::downgrade(self), true);
        pingora_runtime::current_handle().spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = stopped.0.upgrade() else {
                    break;
                };
                if !pool.sweep(Instant::now()) {
                    break;
                }
            }
            // `sweep` cleared `sweeping` itself (or the pool is gone)
            stopped.disarm();
        });
    }
}

impl Inner {
    fn pop_oldest(&mut self, key: u64) -> Option<Idle> {
        let group = self.groups.get_mut(&key)?;
        let idle = group.pop_front();
        if group.is_empty() {
            self.groups.remove(&key);
        }
        idle
    }
}
