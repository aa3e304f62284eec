//! [`Handle`]: what drivers get instead of a global runtime.
//!
//! Spawning, the clock, timers and randomness all come from a handle passed in, never
//! from a global, so the same driver code runs on the kernel [`Executor`](crate::Executor)
//! and inside a [`Simulation`](crate::sim::Simulation) without knowing which.

use alloc::borrow::Cow;
use alloc::rc::Rc;
use core::fmt;
use core::future::{poll_fn, Future};
use core::pin::{pin, Pin};
use core::task::{Context, Poll};

use crate::report::Report;
use crate::sched::Core;
use crate::task::{joinable, JoinHandle};
use crate::time::{Duration, Elapsed, Instant};
use crate::wait::{annotate_reason, WaitReason};

/// A cheap, cloneable reference to an executor (kernel or simulated). Not `Send`: tasks
/// and handles belong to one CPU.
#[derive(Clone)]
pub struct Handle {
    pub(crate) core: Rc<Core>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("now", &self.now())
            .field("tasks", &self.core.task_count())
            .finish()
    }
}

impl Handle {
    pub(crate) fn new(core: Rc<Core>) -> Self {
        Handle { core }
    }

    /// Starts `future` as a new task called `name` (shown in logs and deadlock reports).
    /// The task runs even if the returned handle is dropped.
    pub fn spawn<F>(&self, name: impl Into<Cow<'static, str>>, future: F) -> JoinHandle<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let header = self.core.new_header(name.into());
        let (task, join) = joinable(future, header.clone());
        self.core.spawn_boxed(header, task);
        join
    }

    /// The current time.
    pub fn now(&self) -> Instant {
        self.core.now()
    }

    /// Completes `duration` from now.
    pub fn sleep(&self, duration: Duration) -> Sleep {
        self.sleep_until(self.now() + duration)
    }

    /// Completes at `deadline` (at once if it has passed).
    pub fn sleep_until(&self, deadline: Instant) -> Sleep {
        Sleep {
            core: self.core.clone(),
            deadline,
            key: None,
        }
    }

    /// Runs `future` for at most `duration`; on expiry it is dropped and the result is
    /// `Err(Elapsed)`. If both are ready at the same poll, the future's result wins.
    pub fn timeout<F: Future>(
        &self,
        duration: Duration,
        future: F,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> {
        self.timeout_at(self.now() + duration, future)
    }

    /// Like [`timeout`](Self::timeout) with an absolute deadline.
    pub fn timeout_at<F: Future>(
        &self,
        deadline: Instant,
        future: F,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> {
        let mut sleep = self.sleep_until(deadline);
        async move {
            let mut future = pin!(future);
            poll_fn(|cx| {
                if let Poll::Ready(output) = future.as_mut().poll(cx) {
                    return Poll::Ready(Ok(output));
                }
                match Pin::new(&mut sleep).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        }
    }

    /// Lets every other ready task run once before this one continues (in a simulation,
    /// it is a scheduling point at which the RNG may pick someone else).
    pub fn yield_now(&self) -> YieldNow {
        YieldNow { yielded: false }
    }

    /// Records on the task being polled what it is waiting on, for custom waits; call it
    /// right before returning `Poll::Pending`. See [`crate::wait`].
    pub fn set_waiting_on(&self, reason: impl Into<WaitReason>) {
        crate::wait::annotate(reason);
    }

    /// Runs `future`, reporting `reason` as what the task waits on while it is pending.
    pub fn waiting_on<F: Future>(
        &self,
        reason: impl Into<WaitReason>,
        future: F,
    ) -> impl Future<Output = F::Output> {
        crate::wait::waiting_on(reason, future)
    }

    /// 64 random bits. Seeded by the simulation's seed (on a stream apart from its
    /// scheduling choices), so faults drawn here replay with the seed.
    pub fn random_u64(&self) -> u64 {
        self.core.random_u64()
    }

    /// A random value in `0..bound` (`0` when `bound` is `0`).
    pub fn random_below(&self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.core.random_u64() % bound
        }
    }

    /// What every live task is doing now: for a watchdog task that finds no progress,
    /// or for logging on a debug command.
    pub fn report(&self) -> Report {
        self.core.report()
    }

    /// How many tasks are alive (spawned and not finished).
    pub fn task_count(&self) -> usize {
        self.core.task_count()
    }
}

/// The future of [`Handle::sleep`] and [`Handle::sleep_until`]. Registers its timer on
/// first poll and removes it when dropped.
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    core: Rc<Core>,
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

impl Sleep {
    /// When it completes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.core.now() >= self.deadline {
            if let Some(key) = self.key.take() {
                self.core.remove_timer(key);
            }
            return Poll::Ready(());
        }
        match self.key {
            Some(key) => self.core.update_timer(key, cx),
            None => {
                let key = self.core.add_timer(self.deadline, cx.waker().clone());
                self.key = Some(key);
            }
        }
        annotate_reason(WaitReason::sleep(self.deadline), false);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.core.remove_timer(key);
        }
    }
}

/// The future of [`Handle::yield_now`].
#[must_use = "futures do nothing unless awaited"]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        annotate_reason(WaitReason::text("yield"), false);
        Poll::Pending
    }
}
