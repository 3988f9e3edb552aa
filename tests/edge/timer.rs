//! pingora's fast timers, which bound the edge's request heads and upstream reads, with
//! the vendored pingora-timeout's memory of each thread's recent slots
//! (vendor/README.md, pingora-timeout 1): timers sharing a slot all fire, none early, and
//! a thread moving from slot to slot — as every request does — never waits on a timer
//! that is not in the clock's tree.

use futures_util::future::join_all;
use pingora::time::fast_timeout::{fast_sleep, fast_timeout};
use std::time::{Duration, Instant};

/// Runs `f` and fails the test if it takes longer than `limit`: a timer that never
/// fires hangs, and a test must fail instead.
async fn within<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f).await.expect("a fast timer never fired")
}

#[tokio::test]
async fn timers_sharing_a_slot_all_fire_and_none_early() {
    let start = Instant::now();
    // Registered within the same millisecond or two: one slot, mostly from memory.
    let sleeps = (0..300).map(|_| async {
        let t = Instant::now();
        fast_sleep(Duration::from_millis(30)).await;
        t.elapsed()
    });
    let waited = within(Duration::from_secs(5), join_all(sleeps)).await;
    assert_eq!(waited.len(), 300);
    let early: Vec<_> = waited.iter().filter(|w| **w < Duration::from_millis(30)).collect();
    assert!(early.is_empty(), "timers fired before their 30 ms: {early:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_thread_moving_from_slot_to_slot_gets_timers_that_fire() {
    // Durations that land in the same and in different remembered places, in turn, as a
    // request's head deadline and upstream read timeouts do.
    for round in 0..30 {
        for ms in [1u64, 10, 15, 40, 25] {
            let t = Instant::now();
            within(Duration::from_secs(2), fast_sleep(Duration::from_millis(ms))).await;
            assert!(t.elapsed() >= Duration::from_millis(ms), "round {round}: {ms} ms fired after {:?}", t.elapsed());
        }
    }
}

#[tokio::test]
async fn timeouts_fire_on_futures_that_never_finish_and_not_on_those_that_do() {
    for round in 0..50 {
        let stuck = fast_timeout(Duration::from_millis(20), std::future::pending::<()>());
        assert!(within(Duration::from_secs(2), stuck).await.is_err(), "round {round}: a pending future was not timed out");
        let ready = fast_timeout(Duration::from_millis(20), async { round });
        assert_eq!(within(Duration::from_secs(2), ready).await.ok(), Some(round));
    }
}
