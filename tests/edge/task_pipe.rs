//! The vendored pingora-proxy's task pipes between the two halves of an HTTP/1 exchange
//! (vendor/README.md, pingora-proxy 11): bounded, in order, every item sent before the
//! sender left is received, nothing is sent once the receiver left, and a waiting end is
//! woken. The proxy's own tests (forwarding, WebSockets, uploads, streaming) run through
//! them too.

use futures_util::FutureExt;
use pingora::proxy::task_pipe::{channel, Closed, TrySendError};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `f`'s result, or a failure if it takes 5 s: a pipe that forgets to wake an end hangs,
/// and a test must fail instead.
async fn soon<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f).await.expect("a pipe operation hung")
}

#[tokio::test]
async fn items_come_out_in_order_and_the_pipe_holds_at_most_its_size() {
    let (tx, mut rx) = channel::<u32>(4);
    let permits: Vec<_> = (0..4).map(|_| tx.try_reserve().expect("a free slot")).collect();
    assert_eq!(tx.try_reserve().unwrap_err(), TrySendError::Full, "four slots promised, none left");
    assert!(tx.reserve().now_or_never().is_none(), "reserve waits while the pipe is full");
    for (i, p) in permits.into_iter().enumerate() {
        p.send(i as u32);
    }
    assert_eq!(tx.try_reserve().unwrap_err(), TrySendError::Full, "four items queued");
    for i in 0..4 {
        assert_eq!(soon(rx.recv()).await, Some(i));
    }
    assert!(rx.recv().now_or_never().is_none(), "an empty pipe with its sender waits");
    // A permit dropped unused gives its slot back.
    let kept: Vec<_> = (0..3).map(|_| tx.try_reserve().expect("slot")).collect();
    {
        let _unused = tx.try_reserve().expect("the fourth slot");
        assert_eq!(tx.try_reserve().unwrap_err(), TrySendError::Full);
    }
    assert!(tx.try_reserve().is_ok(), "the unused permit's slot is free again");
    drop(kept);
    soon(tx.send(7)).await.expect("send");
    assert_eq!(soon(rx.recv()).await, Some(7));
}

#[tokio::test]
async fn the_receiver_gets_everything_sent_before_the_sender_left_then_none() {
    let (tx, mut rx) = channel::<&str>(4);
    soon(tx.send("a")).await.expect("send");
    soon(tx.send("b")).await.expect("send");
    drop(tx);
    assert_eq!(soon(rx.recv()).await, Some("a"));
    assert_eq!(soon(rx.recv()).await, Some("b"));
    assert_eq!(soon(rx.recv()).await, None);
    assert_eq!(soon(rx.recv()).await, None, "and stays ended");
}

/// Counts its drops, to see what the pipe lets go of.
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn nothing_is_sent_once_the_receiver_left_and_what_was_queued_is_dropped() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = channel::<Counted>(4);
    soon(tx.send(Counted(drops.clone()))).await.map_err(|_| "send").expect("send");
    let permit = tx.try_reserve().expect("slot");
    assert!(!tx.is_closed());
    drop(rx);
    assert!(tx.is_closed());
    assert_eq!(drops.load(Ordering::SeqCst), 1, "the queued item is dropped with the receiver");
    permit.send(Counted(drops.clone()));
    assert_eq!(drops.load(Ordering::SeqCst), 2, "an item sent through a permit taken before is dropped");
    let back = soon(tx.send(Counted(drops.clone()))).await.expect_err("the receiver is gone");
    assert_eq!(drops.load(Ordering::SeqCst), 2, "a failed send hands its value back");
    drop(back);
    assert_eq!(soon(tx.reserve()).await.unwrap_err(), Closed);
    assert_eq!(tx.try_reserve().unwrap_err(), TrySendError::Closed);
}

#[tokio::test]
async fn a_waiting_end_is_woken() {
    // The receiver waits for the sender's item, then for its end.
    let (tx, mut rx) = channel::<u8>(1);
    let recv = tokio::spawn(async move {
        let first = soon(rx.recv()).await;
        let end = soon(rx.recv()).await;
        (first, end)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    soon(tx.send(1)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(tx);
    let got = tokio::time::timeout(Duration::from_secs(5), recv).await.expect("the receiver was woken").expect("task");
    assert_eq!(got, (Some(1), None));

    // The sender waits for room, then for the receiver's end.
    let (tx, mut rx) = channel::<u8>(1);
    soon(tx.send(1)).await.expect("send");
    let send = tokio::spawn(async move {
        let room = soon(tx.send(2)).await.is_ok();
        let full = soon(tx.send(3)).await.is_ok();
        let closed = soon(tx.send(4)).await.is_ok();
        (room, full, closed)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(soon(rx.recv()).await, Some(1), "taking an item makes room for the waiting send");
    assert_eq!(soon(rx.recv()).await, Some(2));
    assert_eq!(soon(rx.recv()).await, Some(3));
    drop(rx);
    let got = tokio::time::timeout(Duration::from_secs(5), send).await.expect("the sender was woken").expect("task");
    assert_eq!(got, (true, true, false), "the send after the receiver left fails");
}

/// Two tasks on two threads, a pipe of four: every item arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_items_across_threads_arrive_once_in_order() {
    const N: u32 = 20_000;
    let (tx, mut rx) = channel::<u32>(4);
    let sender = tokio::spawn(async move {
        for i in 0..N {
            if i % 3 == 0 {
                soon(tx.reserve()).await.expect("reserve").send(i);
            } else {
                soon(tx.send(i)).await.expect("send");
            }
        }
    });
    let receiver = tokio::spawn(async move {
        let mut next = 0;
        while let Some(i) = soon(rx.recv()).await {
            assert_eq!(i, next, "out of order");
            next += 1;
        }
        next
    });
    let got = tokio::time::timeout(Duration::from_secs(30), receiver).await.expect("bounded").expect("receiver");
    soon(sender).await.expect("sender");
    assert_eq!(got, N);
}
