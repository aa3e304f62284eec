//! [`Event`]: a flag tasks can wait for, such as a channel's `probe_done`.

use alloc::collections::BTreeMap;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use crate::wait::{annotate_reason, WaitReason};

/// A level-triggered flag: [`wait`](Self::wait) completes while it is set, for every
/// waiter, until [`reset`](Self::reset). Usable in a `static`.
pub struct Event {
    name: &'static str,
    state: spin::Mutex<EventState>,
}

struct EventState {
    set: bool,
    waiters: BTreeMap<u64, Waker>,
    next_key: u64,
}

impl Event {
    /// A cleared event called `event` in reports.
    pub const fn new() -> Self {
        Self::named("event")
    }

    /// A cleared event with a name for reports, such as `"probe_done"`.
    pub const fn named(name: &'static str) -> Self {
        Event {
            name,
            state: spin::Mutex::new(EventState {
                set: false,
                waiters: BTreeMap::new(),
                next_key: 0,
            }),
        }
    }

    /// The event's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        let waiters = {
            let mut state = self.state.lock();
            state.set = true;
            core::mem::take(&mut state.waiters)
        };
        for waker in waiters.into_values() {
            waker.wake();
        }
    }

    /// Clears the flag; later waits block until the next [`set`](Self::set).
    pub fn reset(&self) {
        self.state.lock().set = false;
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.state.lock().set
    }

    /// Completes when the flag is set (at once if it already is).
    pub fn wait(&self) -> EventWait<'_> {
        EventWait {
            event: self,
            key: None,
        }
    }
}

impl Default for Event {
    fn default() -> Self {
        Self::new()
    }
}

/// The future of [`Event::wait`].
#[must_use = "futures do nothing unless awaited"]
pub struct EventWait<'a> {
    event: &'a Event,
    key: Option<u64>,
}

impl Future for EventWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.event.state.lock();
        if state.set {
            if let Some(key) = self.key {
                state.waiters.remove(&key);
            }
            drop(state);
            self.key = None;
            return Poll::Ready(());
        }
        match self.key.and_then(|key| state.waiters.get_mut(&key)) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            Some(waker) => *waker = cx.waker().clone(),
            None => {
                let key = state.next_key;
                state.next_key += 1;
                state.waiters.insert(key, cx.waker().clone());
                drop(state);
                self.key = Some(key);
            }
        }
        annotate_reason(WaitReason::named("event", self.event.name), false);
        Poll::Pending
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.event.state.lock().waiters.remove(&key);
        }
    }
}
