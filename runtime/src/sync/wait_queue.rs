//! [`WaitQueue`]: the building block for "wait until some condition on my state holds".

use alloc::collections::BTreeMap;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use crate::wait::{annotate_reason, WaitReason};

/// A FIFO queue of waiting tasks. [`wake_one`](Self::wake_one) and
/// [`wake_all`](Self::wake_all) complete waits that are already queued; a wake with
/// nobody waiting is not remembered (use [`Event`](super::Event) for that).
///
/// Pair it with state in a `RefCell` or lock and use [`wait_until`](Self::wait_until):
/// the condition is checked and the wait queued in the same poll, so a wake cannot slip
/// in between on a single CPU.
pub struct WaitQueue {
    name: &'static str,
    state: spin::Mutex<QueueState>,
}

struct QueueState {
    waiters: BTreeMap<u64, Waiter>,
    next_key: u64,
}

struct Waiter {
    waker: Waker,
    notified: bool,
}

impl WaitQueue {
    /// An empty queue called `wait queue` in reports.
    pub const fn new() -> Self {
        Self::named("wait queue")
    }

    /// An empty queue with a name for reports.
    pub const fn named(name: &'static str) -> Self {
        WaitQueue {
            name,
            state: spin::Mutex::new(QueueState {
                waiters: BTreeMap::new(),
                next_key: 0,
            }),
        }
    }

    /// Completes the oldest waiting [`wait`](Self::wait); returns whether there was one.
    pub fn wake_one(&self) -> bool {
        let waker = {
            let mut state = self.state.lock();
            state.waiters.values_mut().find(|w| !w.notified).map(|w| {
                w.notified = true;
                w.waker.clone()
            })
        };
        match waker {
            Some(waker) => {
                waker.wake();
                true
            }
            None => false,
        }
    }

    /// Completes every waiting [`wait`](Self::wait); returns how many.
    pub fn wake_all(&self) -> usize {
        let mut woken = 0;
        let mut state = self.state.lock();
        for waiter in state.waiters.values_mut().filter(|w| !w.notified) {
            waiter.notified = true;
            waiter.waker.wake_by_ref();
            woken += 1;
        }
        woken
    }

    /// How many waits are queued and not yet woken.
    pub fn waiting(&self) -> usize {
        self.state
            .lock()
            .waiters
            .values()
            .filter(|w| !w.notified)
            .count()
    }

    /// Completes at the next wake after its first poll.
    pub fn wait(&self) -> QueueWait<'_> {
        QueueWait {
            queue: self,
            key: None,
        }
    }

    /// Completes as soon as `condition()` is true, re-checking it after every wake.
    pub async fn wait_until(&self, mut condition: impl FnMut() -> bool) {
        while !condition() {
            self.wait().await;
        }
    }
}

impl Default for WaitQueue {
    fn default() -> Self {
        Self::new()
    }
}

/// The future of [`WaitQueue::wait`].
#[must_use = "futures do nothing unless awaited"]
pub struct QueueWait<'a> {
    queue: &'a WaitQueue,
    key: Option<u64>,
}

impl Future for QueueWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.queue.state.lock();
        let key = match self.key {
            Some(key) => key,
            None => {
                let key = state.next_key;
                state.next_key += 1;
                state.waiters.insert(
                    key,
                    Waiter {
                        waker: cx.waker().clone(),
                        notified: false,
                    },
                );
                drop(state);
                self.key = Some(key);
                annotate_reason(WaitReason::named("wait queue", self.queue.name), false);
                return Poll::Pending;
            }
        };
        let notified = match state.waiters.get_mut(&key) {
            Some(waiter) if waiter.notified => true,
            Some(waiter) => {
                if !waiter.waker.will_wake(cx.waker()) {
                    waiter.waker = cx.waker().clone();
                }
                false
            }
            // Cannot happen: only this future removes its entry.
            None => true,
        };
        if notified {
            state.waiters.remove(&key);
            drop(state);
            self.key = None;
            return Poll::Ready(());
        }
        drop(state);
        annotate_reason(WaitReason::named("wait queue", self.queue.name), false);
        Poll::Pending
    }
}

impl Drop for QueueWait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let removed = self.queue.state.lock().waiters.remove(&key);
            // A wake this wait received but never consumed goes to the next waiter, so
            // cancelling a wait (a timeout) cannot swallow a `wake_one`.
            if removed.is_some_and(|w| w.notified) {
                self.queue.wake_one();
            }
        }
    }
}
