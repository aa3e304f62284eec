//! The kernel executor: one per CPU, polling tasks until there is nothing to do, then
//! halting until an interrupt or the next timer.
//!
//! Each turn of the loop does, in order:
//! 1. dispatch raised [`IrqSignal`](crate::irq::IrqSignal)s to their waiting tasks;
//! 2. wake the tasks whose timers are due;
//! 3. poll every task that was ready at the start of the turn, in wake order (tasks woken
//!    during the turn wait for the next one, so irqs and timers are looked at between
//!    batches and a busy task cannot starve them);
//! 4. if nothing is ready, call [`Platform::idle`] with the earliest timer deadline.
//!
//! Step 4 is race-free because in thread context only the loop itself wakes tasks, and
//! the one thing that can happen behind its back, an interrupt, raises the global
//! [`irq::any_pending`](crate::irq::any_pending) flag that `idle` checks with interrupts
//! disabled.

use alloc::rc::Rc;
use core::future::Future;

use crate::handle::Handle;
use crate::sched::{Clock, Core, Polled};
use crate::time::Instant;

/// What the executor needs from the machine. The kernel implements it with the Hyper-V
/// reference time (or TSC) for `now` and `cli; check; arm timer; sti; hlt` for `idle`.
pub trait Platform {
    /// The current time, monotonic.
    fn now(&self) -> Instant;

    /// Called when no task is ready. Must return once an
    /// [`IrqSignal`](crate::irq::IrqSignal) has been raised (check
    /// [`irq::any_pending`](crate::irq::any_pending) with interrupts disabled before
    /// halting) or `deadline` has passed; may return earlier. `None`: no timer is armed.
    fn idle(&self, deadline: Option<Instant>);
}

/// The kernel's executor. See the [module docs](self).
pub struct Executor<P: Platform + 'static> {
    platform: Rc<P>,
    core: Rc<Core>,
}

impl<P: Platform + 'static> Executor<P> {
    /// An executor on `platform`, its [`Handle::random_u64`] seeded from the clock.
    pub fn new(platform: P) -> Self {
        let seed = platform.now().as_nanos();
        Self::with_seed(platform, seed)
    }

    /// An executor whose handle's random numbers are seeded with `seed`.
    pub fn with_seed(platform: P, seed: u64) -> Self {
        let platform = Rc::new(platform);
        let clock = Clock::Platform(platform.clone());
        Executor {
            platform,
            core: Rc::new(Core::new(clock, seed)),
        }
    }

    /// A handle for spawning tasks and reading the clock.
    pub fn handle(&self) -> Handle {
        Handle::new(self.core.clone())
    }

    /// The platform the executor runs on.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// What every live task is doing (for a watchdog or a debug command).
    pub fn report(&self) -> crate::Report {
        self.core.report()
    }

    /// Runs tasks forever.
    pub fn run(&self) -> ! {
        loop {
            self.turn();
            self.idle_if_nothing_ready();
        }
    }

    /// Runs tasks until `future` (itself run as a task named `main`) completes, and
    /// returns its output. Other tasks stay alive for a later run.
    pub fn run_until<F>(&self, future: F) -> F::Output
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let mut main = self.handle().spawn("main", future);
        loop {
            self.turn();
            if let Some(output) = main.try_take() {
                return output;
            }
            self.idle_if_nothing_ready();
        }
    }

    /// One turn of the loop (steps 1 to 3); returns how many tasks were polled.
    pub fn turn(&self) -> usize {
        crate::irq::take_any_pending();
        self.core.shared.dispatch_irqs();
        self.core.fire_timers(self.platform.now());
        let batch = self.core.take_ready();
        let mut polled = 0;
        for id in batch {
            if self.core.poll(id) != Polled::Gone {
                polled += 1;
            }
        }
        polled
    }

    fn idle_if_nothing_ready(&self) {
        if self.core.has_ready() {
            return;
        }
        let deadline = self.core.next_deadline();
        if let Some(deadline) = deadline {
            if deadline <= self.platform.now() {
                return;
            }
        }
        log::trace!("idle until {deadline:?}");
        self.platform.idle(deadline);
    }
}

impl<P: Platform + 'static> Drop for Executor<P> {
    fn drop(&mut self) {
        self.core.clear_tasks();
    }
}
