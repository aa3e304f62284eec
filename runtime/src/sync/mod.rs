//! Async synchronisation for tasks on one executor.
//!
//! All primitives here are FIFO where order matters, record what a waiting task waits on
//! (see [`crate::wait`]), and never block the CPU: a task that cannot proceed returns
//! `Pending` and is woken later. Their state sits behind short spin locks that are only
//! taken in thread context (never by interrupt handlers), so they are `Sync` and can live
//! in statics or be shared by several executors later.
//!
//! The [`ConfigLock`](crate::ConfigLock) and [`Worker`](crate::Worker) have their own
//! modules at the crate root, being the two pieces the whole design turns on.

mod event;
mod semaphore;
mod wait_queue;

pub use event::{Event, EventWait};
pub use semaphore::{Acquire, Semaphore};
pub use wait_queue::{QueueWait, WaitQueue};
