// miosa-edge patch (pingora-proxy 11): the task pipes between the two halves of an HTTP/1
// exchange. Licensed as the rest of this crate (Apache-2.0).

//! A bounded, in-order pipe of one sender and one receiver, for the two halves of an
//! HTTP/1 exchange.
//!
//! `proxy_1to1` runs the downstream half and the upstream half of a request joined in one
//! task and passes [`HttpTask`](pingora_core::protocols::http::HttpTask)s between them
//! through two pipes of `TASK_BUFFER_SIZE` (4). pingora 0.9.1 made them tokio `mpsc`
//! channels — built for many senders on many threads: a list of 32-slot blocks, a
//! semaphore and an atomic waker each, allocated and torn down twice per request. With one
//! sender, one receiver and both polled by the same task, a short queue behind a mutex
//! that is never contended does the same job.
//!
//! The surface is the part of `tokio::sync::mpsc` the proxy uses, with the same meaning:
//! at most `cap` items queued or promised to a [`Permit`]; items come out in the order they
//! went in; the receiver gets every item sent before the sender was dropped, then `None`;
//! once the receiver is gone every reservation fails, [`Sender::is_closed`] says so, and
//! what was queued is dropped. Nothing here panics (a poisoned lock is taken as it is: no
//! code holding it can panic).

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    /// Slots promised to live permits.
    reserved: usize,
    cap: usize,
    /// The receiver, waiting for an item or the sender's end.
    receiver_waiting: Option<Waker>,
    /// The sender, waiting for room or the receiver's end.
    sender_waiting: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

struct Shared<T>(Mutex<State<T>>);

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Puts `cx`'s waker in `slot` unless the one there wakes the same task.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// A pipe holding at most `cap` items (at least one).
pub fn channel<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let cap = cap.max(1);
    let shared = Arc::new(Shared(Mutex::new(State {
        queue: VecDeque::with_capacity(cap),
        reserved: 0,
        cap,
        receiver_waiting: None,
        sender_waiting: None,
        sender_gone: false,
        receiver_gone: false,
    })));
    (Sender(shared.clone()), Receiver(shared))
}

/// The sending end.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving end.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A slot reserved in the pipe: [`Permit::send`] fills it; dropped unused, it is given back.
pub struct Permit<'a, T> {
    shared: &'a Shared<T>,
}

/// The receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// The receiver is gone; the value that was not sent.
pub struct SendError<T>(pub T);

/// Why [`Sender::try_reserve`] found no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// Every slot is taken; the receiver has not caught up.
    Full,
    /// The receiver is gone.
    Closed,
}

impl<T> Sender<T> {
    /// Sends `value`, waiting for room; fails, handing it back, when the receiver is gone.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        match self.reserve().await {
            Ok(permit) => {
                permit.send(value);
                Ok(())
            }
            Err(Closed) => Err(SendError(value)),
        }
    }

    /// Waits for a slot.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, Closed> {
        poll_fn(|cx| self.poll_reserve(cx)).await
    }

    fn poll_reserve(&self, cx: &Context<'_>) -> Poll<Result<Permit<'_, T>, Closed>> {
        let mut s = self.0.lock();
        match self.reserve_locked(&mut s) {
            Ok(permit) => Poll::Ready(Ok(permit)),
            Err(TrySendError::Closed) => Poll::Ready(Err(Closed)),
            Err(TrySendError::Full) => {
                register(&mut s.sender_waiting, cx);
                Poll::Pending
            }
        }
    }

    /// A slot if one is free now.
    pub fn try_reserve(&self) -> Result<Permit<'_, T>, TrySendError> {
        self.reserve_locked(&mut self.0.lock())
    }

    fn reserve_locked(&self, s: &mut State<T>) -> Result<Permit<'_, T>, TrySendError> {
        if s.receiver_gone {
            return Err(TrySendError::Closed);
        }
        if s.queue.len() + s.reserved >= s.cap {
            return Err(TrySendError::Full);
        }
        s.reserved += 1;
        Ok(Permit { shared: &self.0 })
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.0.lock().receiver_gone
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut s = self.0.lock();
            s.sender_gone = true;
            s.receiver_waiting.take()
        };
        wake(waiting);
    }
}

impl<T> Permit<'_, T> {
    /// Puts `value` in the reserved slot (dropped if the receiver left meanwhile).
    pub fn send(self, value: T) {
        let (waiting, unsent) = {
            let mut s = self.shared.lock();
            s.reserved -= 1;
            if s.receiver_gone {
                (None, Some(value))
            } else {
                s.queue.push_back(value);
                (s.receiver_waiting.take(), None)
            }
        };
        // The slot is used: nothing to give back on drop.
        std::mem::forget(self);
        drop(unsent);
        wake(waiting);
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        let waiting = {
            let mut s = self.shared.lock();
            s.reserved -= 1;
            s.sender_waiting.take()
        };
        wake(waiting);
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once the sender is gone and every item sent was received.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &Context<'_>) -> Poll<Option<T>> {
        let (ready, waiting) = {
            let mut s = self.0.lock();
            if let Some(v) = s.queue.pop_front() {
                (Poll::Ready(Some(v)), s.sender_waiting.take())
            } else if s.sender_gone {
                (Poll::Ready(None), None)
            } else {
                register(&mut s.receiver_waiting, cx);
                (Poll::Pending, None)
            }
        };
        wake(waiting);
        ready
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (queued, waiting) = {
            let mut s = self.0.lock();
            s.receiver_gone = true;
            (std::mem::take(&mut s.queue), s.sender_waiting.take())
        };
        drop(queued);
        wake(waiting);
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task_pipe::Sender")
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task_pipe::Receiver")
    }
}

impl<T> fmt::Debug for Permit<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task_pipe::Permit")
    }
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the task pipe's receiver is gone")
    }
}

impl std::error::Error for Closed {}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the task pipe's receiver is gone")
    }
}

impl<T> std::error::Error for SendError<T> {}

impl fmt::Display for TrySendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrySendError::Full => "the task pipe is full",
            TrySendError::Closed => "the task pipe's receiver is gone",
        })
    }
}

impl std::error::Error for TrySendError {}
