//! The hvnet runtime: a small async executor for a single-CPU unikernel, the locks and
//! ordered workers the drivers are built on, and a deterministic simulation of all of it
//! for host tests.
//!
//! # Why its own runtime
//! The appliance is one `no_std` image on Hyper-V. Drivers are written as async tasks
//! because most of what they do is wait: for a host message, a ring interrupt, a
//! sub-channel to open. The hard bugs in that world are orderings: which task runs first
//! when two NICs are hot-plugged at once, whether a probe can wait for work that sits
//! behind it on the same queue. So the runtime is built to make orderings *testable*:
//! driver code gets everything (spawning, clock, timers, randomness) from a [`Handle`],
//! and a [`Handle`] is the same type whether it comes from the kernel [`Executor`] or from
//! a [`sim::Simulation`], where a seed decides every scheduling choice and a deadlock
//! becomes an error that names the waiting tasks instead of a silent hang.
//!
//! # Pieces
//! - [`Executor`] + [`Platform`]: the kernel's per-CPU loop (dispatch irqs, fire timers,
//!   poll ready tasks, otherwise halt until the next interrupt or deadline).
//! - [`irq::IrqSignal`]: the only thing an interrupt handler touches (two atomic stores);
//!   the executor turns raises into wakes in thread context.
//! - [`Handle`]: spawn ([`JoinHandle`]), `now`, `sleep`, `timeout`.
//! - [`Worker`]: an ordered work queue served by one task (VMBus has `primary` and
//!   `subchannel`).
//! - [`ConfigLock`]: the FIFO async mutex around network configuration (rtnl).
//! - [`sync`]: [`Event`](sync::Event), [`WaitQueue`](sync::WaitQueue),
//!   [`Semaphore`](sync::Semaphore).
//! - [`wait`]: what each blocked task waits on, for deadlock reports ([`Report`]).
//! - [`sim`]: the deterministic scheduler; `testing` (feature `std`) runs it over seeds.
//!
//! # Single CPU
//! Futures need not be `Send` and handles are `Rc`-based: a task lives and dies on the
//! executor that spawned it. Wakers are real `Waker`s (`Send + Sync`) that only push a
//! task id onto its executor's ready queue.
//!
//! # Host tests
//! Enable the `std` feature in dev-dependencies: it makes the "task being polled" slot
//! thread-local, so simulations can run on the test harness's parallel threads, and adds
//! the `testing` module.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod config_lock;
mod current;
pub mod executor;
mod handle;
pub mod irq;
mod report;
mod rng;
mod sched;
pub mod sim;
pub mod sync;
mod task;
#[cfg(any(test, feature = "std"))]
pub mod testing;
pub mod time;
pub mod wait;
pub mod worker;

#[cfg(test)]
mod tests;

pub use config_lock::{ConfigGuard, ConfigLock, Lock};
pub use executor::{Executor, Platform};
pub use handle::{Handle, Sleep, YieldNow};
pub use report::{Report, TaskReport};
pub use rng::Pcg32;
pub use task::{JoinHandle, TaskId};
pub use time::{Duration, Elapsed, Instant};
pub use wait::WaitReason;
pub use worker::{Worker, WorkerStopped};
