//! The task being polled right now.
//!
//! Primitives need to know who is calling them: a lock records its holder's name, every
//! `Pending` records what the task waits on, and an `IrqSignal` registers with the
//! executor that polls it. A `Context` carries only a `Waker`, so the executor publishes
//! the current task here for the duration of each poll.
//!
//! In the kernel there is one executor per CPU and (for now) one CPU, so a global slot is
//! enough. Host tests run many simulations at once on the test harness's threads; with
//! the `std` feature (and in this crate's own tests) the slot is thread-local instead.
//! Without it, a second executor entering while another is polling is detected and
//! reported rather than silently mixing their tasks.

use alloc::sync::Arc;

use crate::sched::Shared;
use crate::task::TaskHeader;

/// The executor and task of the poll in progress.
pub(crate) struct Current {
    pub(crate) shared: Arc<Shared>,
    pub(crate) task: Arc<TaskHeader>,
}

#[cfg(any(test, feature = "std"))]
mod slot {
    use super::Current;
    use core::cell::RefCell;

    std::thread_local! {
        static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
    }

    pub(super) fn replace(new: Option<Current>) -> Option<Current> {
        CURRENT.with(|slot| slot.replace(new))
    }

    pub(super) fn with<R>(f: impl FnOnce(Option<&Current>) -> R) -> R {
        CURRENT.with(|slot| f(slot.borrow().as_ref()))
    }
}

#[cfg(not(any(test, feature = "std")))]
mod slot {
    use super::Current;

    static CURRENT: spin::Mutex<Option<Current>> = spin::Mutex::new(None);

    pub(super) fn replace(new: Option<Current>) -> Option<Current> {
        core::mem::replace(&mut *CURRENT.lock(), new)
    }

    pub(super) fn with<R>(f: impl FnOnce(Option<&Current>) -> R) -> R {
        f(CURRENT.lock().as_ref())
    }
}

/// Publishes `current` until the returned guard is dropped (also on unwinding).
pub(crate) fn enter(current: Current) -> EnterGuard {
    if let Some(previous) = slot::replace(Some(current)) {
        let name = previous.task.name.clone();
        // Put it back so the other poll is not disturbed, then refuse.
        slot::replace(Some(previous));
        panic!(
            "hvnet-runtime: an executor started polling while task '{name}' is being \
             polled (nested executors, or executors on several threads: enable the \
             runtime's `std` feature for host tests)"
        );
    }
    EnterGuard(())
}

pub(crate) struct EnterGuard(());

impl Drop for EnterGuard {
    fn drop(&mut self) {
        slot::replace(None);
    }
}

/// Calls `f` with the current task, if any. `f` must not poll or call back into this
/// module (the no-`std` slot is a spin lock).
pub(crate) fn with<R>(f: impl FnOnce(Option<&Current>) -> R) -> R {
    slot::with(f)
}

/// The header of the task being polled.
pub(crate) fn task() -> Option<Arc<TaskHeader>> {
    with(|cur| cur.map(|cur| cur.task.clone()))
}
