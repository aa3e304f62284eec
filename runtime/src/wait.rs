//! "What is this task waiting for?": the annotations behind deadlock reports.
//!
//! A deadlock in a kernel is usually silent: the CPU halts and nothing ever happens again.
//! To turn that into a sentence ("probe:nic2 waits on config lock 'rtnl' held by
//! probe:nic1"), every runtime primitive that returns `Poll::Pending` records a
//! [`WaitReason`] on the task being polled. The executor clears a task's reasons each time
//! it polls it, so the list always describes the *latest* wait, and a watchdog (or the
//! simulation's deadlock detector) can print it.
//!
//! Reasons are cheap to record: most are a `&'static str`, an `Instant` or an `Arc` that
//! is formatted only when a report is actually printed, so a lock's reason names whoever
//! holds it *at report time*, not when the waiter started waiting.
//!
//! Code with its own waits (a driver waiting for a host completion) can add a reason with
//! [`annotate`] right before returning `Pending`, or wrap a future in [`waiting_on`].

use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;
use core::future::{poll_fn, Future};
use core::pin::pin;

use crate::current;
use crate::task::TaskHeader;
use crate::time::Instant;

/// Something that can say, when a report is printed, what a task is waiting on.
///
/// Implemented by primitives whose description depends on their state at report time
/// (a lock's holder, a semaphore's count). Must not block: it is called while printing.
pub trait Describe: Send + Sync {
    /// Writes a short description, such as `semaphore 'sub-channels of nic1' (1 of 4)`.
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

/// One thing a task is waiting on. Cheap to clone.
#[derive(Clone)]
pub struct WaitReason(Reason);

#[derive(Clone)]
enum Reason {
    Static(&'static str),
    Shared(Arc<str>),
    Sleep(Instant),
    Irq(&'static str),
    Named(&'static str, &'static str),
    Join(Arc<TaskHeader>),
    Custom(Arc<dyn Describe>),
}

impl WaitReason {
    /// A fixed text, such as `"probe_done"`.
    pub const fn text(text: &'static str) -> Self {
        WaitReason(Reason::Static(text))
    }

    /// A text built at run time, such as `"sub-channels of nic1"`; clones share it.
    pub fn shared(text: impl Into<Arc<str>>) -> Self {
        WaitReason(Reason::Shared(text.into()))
    }

    /// A description computed when the report is printed.
    pub fn custom(describe: Arc<dyn Describe>) -> Self {
        WaitReason(Reason::Custom(describe))
    }

    pub(crate) const fn sleep(deadline: Instant) -> Self {
        WaitReason(Reason::Sleep(deadline))
    }

    pub(crate) const fn irq(name: &'static str) -> Self {
        WaitReason(Reason::Irq(name))
    }

    /// `kind 'name'`, such as `event 'probe_done'`.
    pub(crate) const fn named(kind: &'static str, name: &'static str) -> Self {
        WaitReason(Reason::Named(kind, name))
    }

    pub(crate) fn join(task: Arc<TaskHeader>) -> Self {
        WaitReason(Reason::Join(task))
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Reason::Static(text) => f.write_str(text),
            Reason::Shared(text) => f.write_str(text),
            Reason::Sleep(deadline) => write!(f, "timer at {deadline}"),
            Reason::Irq(name) => write!(f, "irq {name}"),
            Reason::Named(kind, name) => write!(f, "{kind} '{name}'"),
            Reason::Join(task) => {
                f.write_str("task ")?;
                task.write_label(f)?;
                f.write_str(" to finish")
            }
            Reason::Custom(describe) => describe.describe(f),
        }
    }
}

impl fmt::Debug for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WaitReason({self})")
    }
}

impl From<&'static str> for WaitReason {
    fn from(text: &'static str) -> Self {
        WaitReason::text(text)
    }
}

impl From<String> for WaitReason {
    fn from(text: String) -> Self {
        WaitReason::shared(text)
    }
}

impl From<Arc<str>> for WaitReason {
    fn from(text: Arc<str>) -> Self {
        WaitReason::shared(text)
    }
}

/// Records on the task being polled that it waits on `reason`. Call it right before
/// returning `Poll::Pending`; the executor forgets it at the task's next poll. Outside a
/// task (no executor polling) it does nothing.
pub fn annotate(reason: impl Into<WaitReason>) {
    annotate_reason(reason.into(), false);
}

pub(crate) fn annotate_reason(reason: WaitReason, front: bool) {
    current::with(|cur| {
        if let Some(cur) = cur {
            cur.task.push_waiting(reason, front);
        }
    });
}

/// Runs `future`, and whenever it is pending, records `reason` on the current task in
/// front of whatever the inner primitives recorded, e.g. `"sub-channels of nic1"` ahead
/// of `semaphore ... (1 of 4)`.
pub fn waiting_on<F: Future>(
    reason: impl Into<WaitReason>,
    future: F,
) -> impl Future<Output = F::Output> {
    let reason = reason.into();
    async move {
        let mut future = pin!(future);
        poll_fn(|cx| {
            let poll = future.as_mut().poll(cx);
            if poll.is_pending() {
                annotate_reason(reason.clone(), true);
            }
            poll
        })
        .await
    }
}
