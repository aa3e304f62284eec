//! The interrupt-to-task path.
//!
//! An interrupt handler runs with the executor frozen in the middle of whatever it was
//! doing, possibly holding the ready-queue lock. So a handler must not lock, allocate or
//! call a `Waker`; it only calls [`IrqSignal::raise`], which sets two atomics: the signal's
//! own pending flag and a global "some irq is pending" flag.
//!
//! The executor, back in thread context, dispatches on every turn of its loop: each
//! signal some task has waited on (signals register with the polling executor on their
//! first wait) that is pending gets its waiters woken. The waiting task then consumes the
//! pending flag when it polls [`IrqSignal::wait`]. Several raises before that poll
//! coalesce into one completion, as a level-triggered "there is work" bit should: the
//! task drains everything the device queued, not one item per raise.
//!
//! Before halting, the kernel's [`Platform::idle`](crate::Platform::idle) disables
//! interrupts and checks [`any_pending`]: a raise between the executor's last dispatch
//! and the `hlt` is then seen, not slept through.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll};

use crate::current;
use crate::wait::{annotate_reason, WaitReason};

/// Set by every raise; cleared by the executor before it dispatches.
static ANY_PENDING: AtomicBool = AtomicBool::new(false);

/// Whether any signal was raised since the executor last dispatched. The kernel's idle
/// routine checks it with interrupts disabled before halting.
pub fn any_pending() -> bool {
    ANY_PENDING.load(Ordering::Acquire)
}

/// Clears the global flag ahead of a dispatch. A raise after this sets it again, so the
/// following idle returns at once and the next turn dispatches it.
pub(crate) fn take_any_pending() -> bool {
    ANY_PENDING.swap(false, Ordering::AcqRel)
}

/// An event raised by an interrupt handler (or by simulation code) and awaited by a task.
///
/// Lives in a `static` next to the handler that raises it:
/// ```
/// use hvnet_runtime::irq::IrqSignal;
/// static VMBUS_SINT: IrqSignal = IrqSignal::named("vmbus sint2");
/// // in the interrupt handler: VMBUS_SINT.raise();
/// // in the message task:      VMBUS_SINT.wait().await;
/// ```
pub struct IrqSignal {
    name: &'static str,
    pending: AtomicBool,
}

impl IrqSignal {
    /// An unnamed signal (reports call it `irq`).
    pub const fn new() -> Self {
        Self::named("irq")
    }

    /// A signal with a name for reports and logs.
    pub const fn named(name: &'static str) -> Self {
        IrqSignal {
            name,
            pending: AtomicBool::new(false),
        }
    }

    /// The signal's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Marks the signal raised. Safe to call from an interrupt handler: two atomic
    /// stores, no lock, no allocation, no waker call.
    pub fn raise(&self) {
        self.pending.store(true, Ordering::Release);
        ANY_PENDING.store(true, Ordering::Release);
    }

    /// Whether a raise is waiting to be consumed by a [`wait`](Self::wait).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Completes once per raise (raises before the completion coalesce). A raise that
    /// happened before the first wait is not lost.
    pub fn wait(&'static self) -> IrqWait {
        IrqWait { signal: self }
    }
}

impl Default for IrqSignal {
    fn default() -> Self {
        Self::new()
    }
}

/// The future of [`IrqSignal::wait`].
#[must_use = "futures do nothing unless awaited"]
pub struct IrqWait {
    signal: &'static IrqSignal,
}

impl Future for IrqWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        let registered = current::with(|cur| match cur {
            Some(cur) => {
                cur.shared.register_irq(self.signal, cx.waker());
                true
            }
            None => false,
        });
        if !registered {
            log::warn!(
                "irq {} awaited outside an executor: nothing will wake it",
                self.signal.name
            );
        }
        annotate_reason(WaitReason::irq(self.signal.name), false);
        Poll::Pending
    }
}
