//! [`ConfigLock`]: the async mutex around network configuration (Linux's rtnl).
//!
//! NIC probe and removal and every configuration change take it; the sub-channel worker,
//! the data path and interrupt handlers never do. That rule is what keeps several
//! multi-queue NICs hot-plugged at once from deadlocking (see DESIGN.md), and when it is
//! broken the lock helps say so: it knows its name and the task holding it, so a waiter
//! is reported as "waits on config lock 'rtnl' held by probe:nic1 on worker:primary", and
//! the holder as "holds config lock 'rtnl'".
//!
//! Service is FIFO with direct hand-off: on unlock the lock passes straight to the oldest
//! waiter, so a task that unlocks and relocks in a loop cannot starve the others, and a
//! waiter's place cannot be stolen by a `try_lock`.

use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;
use core::future::Future;
use core::ops::{Deref, DerefMut};
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::{Context, Poll, Waker};

use crate::current;
use crate::task::{register_waker, TaskHeader};
use crate::wait::{annotate_reason, Describe, WaitReason};

/// Distinguishes locks in a task's list of held locks.
static NEXT_LOCK_KEY: AtomicU64 = AtomicU64::new(1);

/// A FIFO-fair async mutex that records its name and its holder for reports.
pub struct ConfigLock<T> {
    shared: Arc<LockShared>,
    // After the async lock is acquired this spin lock is always free: it only gives the
    // guard safe mutable access without `unsafe`.
    data: spin::Mutex<T>,
}

struct LockShared {
    key: u64,
    name: Cow<'static, str>,
    state: spin::Mutex<LockState>,
}

#[derive(Default)]
struct LockState {
    locked: bool,
    holder: Option<Holder>,
    waiters: BTreeMap<u64, Waiter>,
    next_ticket: u64,
}

struct Holder {
    /// The holder's label when it got the lock, e.g. `probe:nic1 on worker:primary`.
    label: String,
    task: Option<Arc<TaskHeader>>,
}

struct Waiter {
    waker: Option<Waker>,
    task: Option<Arc<TaskHeader>>,
    granted: bool,
}

impl LockShared {
    fn hold_text(&self) -> Cow<'static, str> {
        Cow::Owned(format!("config lock '{}'", self.name))
    }

    /// Makes `task` the holder (the lock is already marked locked).
    fn set_holder(&self, state: &mut LockState, task: Option<Arc<TaskHeader>>) {
        let label = match &task {
            Some(task) => {
                task.add_hold(self.key, self.hold_text());
                task.label()
            }
            None => String::from("code outside any task"),
        };
        log::trace!("config lock '{}' taken by {label}", self.name);
        state.holder = Some(Holder { label, task });
    }

    /// Releases the lock held by the current holder, handing it to the oldest waiter.
    fn release(&self) {
        let mut state = self.state.lock();
        if let Some(holder) = state.holder.take() {
            if let Some(task) = holder.task {
                task.remove_hold(self.key);
            }
        }
        let next = state
            .waiters
            .iter_mut()
            .find(|(_, w)| !w.granted)
            .map(|(_, waiter)| {
                waiter.granted = true;
                (waiter.task.clone(), waiter.waker.take())
            });
        match next {
            Some((task, waker)) => {
                self.set_holder(&mut state, task);
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            None => {
                state.locked = false;
                log::trace!("config lock '{}' released", self.name);
            }
        }
    }
}

impl Describe for LockShared {
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config lock '{}'", self.name)?;
        let state = self.state.lock();
        match &state.holder {
            Some(holder) => write!(f, " held by {}", holder.label),
            None => f.write_str(" (free)"),
        }
    }
}

impl<T> ConfigLock<T> {
    /// A lock called `name` (for reports) around `value`.
    pub fn new(name: impl Into<Cow<'static, str>>, value: T) -> Self {
        ConfigLock {
            shared: Arc::new(LockShared {
                key: NEXT_LOCK_KEY.fetch_add(1, Ordering::Relaxed),
                name: name.into(),
                state: spin::Mutex::new(LockState::default()),
            }),
            data: spin::Mutex::new(value),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Who holds it (the task label at the time it took the lock), if anyone.
    pub fn holder(&self) -> Option<String> {
        self.shared
            .state
            .lock()
            .holder
            .as_ref()
            .map(|h| h.label.clone())
    }

    /// Whether it is held.
    pub fn is_locked(&self) -> bool {
        self.shared.state.lock().locked
    }

    /// How many tasks are queued for it.
    pub fn waiters(&self) -> usize {
        self.shared.state.lock().waiters.len()
    }

    /// Waits for the lock, in arrival order.
    pub fn lock(&self) -> Lock<'_, T> {
        Lock {
            lock: self,
            ticket: None,
        }
    }

    /// Takes the lock if it is free and nobody is queued for it.
    pub fn try_lock(&self) -> Option<ConfigGuard<'_, T>> {
        let mut state = self.shared.state.lock();
        if state.locked {
            return None;
        }
        state.locked = true;
        self.shared.set_holder(&mut state, current::task());
        drop(state);
        Some(self.guard())
    }

    /// Consumes the lock, returning the value.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }

    fn guard(&self) -> ConfigGuard<'_, T> {
        ConfigGuard {
            lock: self,
            data: Some(self.data.lock()),
        }
    }
}

impl<T> fmt::Debug for ConfigLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigLock")
            .field("name", &self.shared.name)
            .field("holder", &self.holder())
            .field("waiters", &self.waiters())
            .finish_non_exhaustive()
    }
}

/// The future of [`ConfigLock::lock`]. Dropping it leaves the queue; if the lock had
/// already been handed to it, it is passed on to the next waiter.
#[must_use = "futures do nothing unless awaited"]
pub struct Lock<'a, T> {
    lock: &'a ConfigLock<T>,
    ticket: Option<u64>,
}

impl<'a, T> Future for Lock<'a, T> {
    type Output = ConfigGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ConfigGuard<'a, T>> {
        let shared = &self.lock.shared;
        let mut state = shared.state.lock();
        match self.ticket {
            None => {
                if !state.locked {
                    // Free means nobody is queued either: release hands off directly.
                    state.locked = true;
                    shared.set_holder(&mut state, current::task());
                    drop(state);
                    return Poll::Ready(self.lock.guard());
                }
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.waiters.insert(
                    ticket,
                    Waiter {
                        waker: Some(cx.waker().clone()),
                        task: current::task(),
                        granted: false,
                    },
                );
                drop(state);
                self.ticket = Some(ticket);
            }
            Some(ticket) => {
                let granted = match state.waiters.get_mut(&ticket) {
                    Some(waiter) if !waiter.granted => {
                        register_waker(&mut waiter.waker, cx);
                        false
                    }
                    _ => true,
                };
                if granted {
                    state.waiters.remove(&ticket);
                    drop(state);
                    self.ticket = None;
                    return Poll::Ready(self.lock.guard());
                }
            }
        }
        annotate_reason(WaitReason::custom(self.lock.shared.clone()), false);
        Poll::Pending
    }
}

impl<T> Drop for Lock<'_, T> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let removed = self.lock.shared.state.lock().waiters.remove(&ticket);
            if removed.is_some_and(|w| w.granted) {
                // Handed to us, never used: pass it on.
                self.lock.shared.release();
            }
        }
    }
}

/// Access to the value while the lock is held; unlocks (handing the lock to the next
/// waiter) when dropped.
pub struct ConfigGuard<'a, T> {
    lock: &'a ConfigLock<T>,
    data: Option<spin::MutexGuard<'a, T>>,
}

impl<T> ConfigGuard<'_, T> {
    /// The lock's name.
    pub fn lock_name(&self) -> &str {
        self.lock.name()
    }
}

impl<T> Deref for ConfigGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data.as_deref().expect("guard data present until drop")
    }
}

impl<T> DerefMut for ConfigGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.data
            .as_deref_mut()
            .expect("guard data present until drop")
    }
}

impl<T> Drop for ConfigGuard<'_, T> {
    fn drop(&mut self) {
        // Free the data first, so the next holder finds it unlocked.
        self.data = None;
        self.lock.shared.release();
    }
}

impl<T: fmt::Debug> fmt::Debug for ConfigGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
