//! [`Semaphore`]: counted permits, for "wait until K sub-channels are open".

use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use crate::task::register_waker;
use crate::wait::{annotate_reason, Describe, WaitReason};

/// A counting semaphore with FIFO service: a waiter for many permits is not overtaken by
/// later waiters for few. Cloning shares the same permits, so a probe can keep one clone
/// and hand another to the sub-channel work items that `release` it.
///
/// Acquired permits are consumed (there is no guard): this is a counter of events as
/// much as a limit on concurrency. Call [`release`](Self::release) to give them back.
#[derive(Clone)]
pub struct Semaphore {
    inner: Arc<Inner>,
}

struct Inner {
    name: Cow<'static, str>,
    state: spin::Mutex<State>,
}

struct State {
    permits: usize,
    waiters: BTreeMap<u64, Waiter>,
    next_key: u64,
}

struct Waiter {
    wanted: usize,
    granted: bool,
    waker: Option<Waker>,
}

impl Semaphore {
    /// A semaphore with `permits` permits, called `semaphore` in reports.
    pub fn new(permits: usize) -> Self {
        Self::named("semaphore", permits)
    }

    /// A semaphore with a name for reports, such as `"sub-channels of nic1"`.
    pub fn named(name: impl Into<Cow<'static, str>>, permits: usize) -> Self {
        Semaphore {
            inner: Arc::new(Inner {
                name: name.into(),
                state: spin::Mutex::new(State {
                    permits,
                    waiters: BTreeMap::new(),
                    next_key: 0,
                }),
            }),
        }
    }

    /// Permits available now.
    pub fn available(&self) -> usize {
        self.inner.state.lock().permits
    }

    /// Adds `permits` and hands them to queued waiters in order.
    pub fn release(&self, permits: usize) {
        let mut state = self.inner.state.lock();
        state.permits = state.permits.saturating_add(permits);
        state.grant();
    }

    /// Takes `permits` if they are available and nobody is queued ahead.
    pub fn try_acquire(&self, permits: usize) -> bool {
        let mut state = self.inner.state.lock();
        if state.waiters.is_empty() && state.permits >= permits {
            state.permits -= permits;
            true
        } else {
            false
        }
    }

    /// Completes once `permits` permits have been taken.
    pub fn acquire(&self, permits: usize) -> Acquire<'_> {
        Acquire {
            semaphore: self,
            wanted: permits,
            key: None,
        }
    }
}

impl State {
    fn grant(&mut self) {
        for waiter in self.waiters.values_mut().filter(|w| !w.granted) {
            if waiter.wanted > self.permits {
                break;
            }
            self.permits -= waiter.wanted;
            waiter.granted = true;
            if let Some(waker) = waiter.waker.take() {
                waker.wake();
            }
        }
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.inner.name)
            .field("available", &self.available())
            .finish()
    }
}

impl Describe for Inner {
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        let first = state
            .waiters
            .values()
            .find(|w| !w.granted)
            .map(|w| w.wanted);
        write!(f, "semaphore '{}' ({} available", self.name, state.permits)?;
        if let Some(wanted) = first {
            write!(f, ", first waiter needs {wanted}")?;
        }
        f.write_str(")")
    }
}

/// The future of [`Semaphore::acquire`]. Dropping it before completion leaves the queue
/// (returning permits it had been granted).
#[must_use = "futures do nothing unless awaited"]
pub struct Acquire<'a> {
    semaphore: &'a Semaphore,
    wanted: usize,
    key: Option<u64>,
}

impl Future for Acquire<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let wanted = self.wanted;
        let mut state = self.semaphore.inner.state.lock();
        match self.key {
            None => {
                if state.waiters.is_empty() && state.permits >= wanted {
                    state.permits -= wanted;
                    return Poll::Ready(());
                }
                let key = state.next_key;
                state.next_key += 1;
                state.waiters.insert(
                    key,
                    Waiter {
                        wanted,
                        granted: false,
                        waker: Some(cx.waker().clone()),
                    },
                );
                drop(state);
                self.key = Some(key);
            }
            Some(key) => {
                let granted = match state.waiters.get_mut(&key) {
                    Some(waiter) if !waiter.granted => {
                        register_waker(&mut waiter.waker, cx);
                        false
                    }
                    _ => true,
                };
                if granted {
                    state.waiters.remove(&key);
                    drop(state);
                    self.key = None;
                    return Poll::Ready(());
                }
            }
        }
        annotate_reason(WaitReason::custom(self.semaphore.inner.clone()), false);
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut state = self.semaphore.inner.state.lock();
            if let Some(waiter) = state.waiters.remove(&key) {
                if waiter.granted {
                    state.permits += waiter.wanted;
                }
                // Either way the queue head may have changed: serve whoever is next.
                state.grant();
            }
        }
    }
}
