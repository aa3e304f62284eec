//! [`Worker`]: an ordered queue of work items served by one task (Linux's ordered
//! workqueue).
//!
//! Items run strictly in the order they were queued, one at a time: the next starts only
//! after the previous one's future has completed. That is the guarantee VMBus needs for
//! channel offers (a rescind is processed after the offer it rescinds), and also the trap
//! DESIGN.md is about: an item that waits for something queued *behind it on the same
//! worker* waits forever. VMBus therefore owns two workers, `primary` (NIC probes) and
//! `subchannel` (sub-channel openings), and a probe may wait for sub-channels while
//! holding the config lock because their items never queue behind it.
//!
//! The worker's task is named `worker:<name>` and, while an item runs, reports carry the
//! item's name (`probe:nic1 on worker:primary`). A deadlock report also lists each
//! worker's queue, so "stuck behind" is visible.

use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::future::{poll_fn, Future};
use core::pin::Pin;
use core::task::{Poll, Waker};

use crate::current;
use crate::handle::Handle;
use crate::sched::Reporter;
use crate::task::register_waker;
use crate::wait::{annotate_reason, WaitReason};

/// A handle on an ordered work queue. Clones refer to the same queue and task.
#[derive(Clone)]
pub struct Worker {
    inner: Rc<Inner>,
}

struct Inner {
    name: Cow<'static, str>,
    state: RefCell<State>,
}

struct Item {
    name: Cow<'static, str>,
    future: Pin<Box<dyn Future<Output = ()>>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    running: Option<Cow<'static, str>>,
    /// Items ever queued and ever finished: a flush waits until `finished` reaches the
    /// `queued` it saw.
    queued: u64,
    finished: u64,
    stopping: bool,
    exited: bool,
    task_waker: Option<Waker>,
    flush_wakers: Vec<Waker>,
}

/// Returned by [`Worker::queue`] after [`Worker::stop`]: the item was dropped unrun.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStopped {
    /// The worker's name.
    pub worker: Cow<'static, str>,
}

impl fmt::Display for WorkerStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} is stopped", self.worker)
    }
}

impl core::error::Error for WorkerStopped {}

impl Worker {
    /// Creates a worker and spawns its task (`worker:<name>`) on `handle`.
    pub fn new(handle: &Handle, name: impl Into<Cow<'static, str>>) -> Self {
        let inner = Rc::new(Inner {
            name: name.into(),
            state: RefCell::new(State::default()),
        });
        let reporter: Rc<dyn Reporter> = inner.clone();
        handle.core.add_reporter(Rc::downgrade(&reporter));
        let task_name = format!("worker:{}", inner.name);
        handle.spawn(task_name, serve(inner.clone()));
        Worker { inner }
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Appends an item. It runs after every item queued before it has finished.
    pub fn queue(
        &self,
        item_name: impl Into<Cow<'static, str>>,
        future: impl Future<Output = ()> + 'static,
    ) -> Result<(), WorkerStopped> {
        let name = item_name.into();
        let mut state = self.inner.state.borrow_mut();
        if state.stopping {
            log::warn!(
                "worker {}: item {name} queued after stop, dropped",
                self.inner.name
            );
            return Err(WorkerStopped {
                worker: self.inner.name.clone(),
            });
        }
        log::trace!("worker {}: queue {name}", self.inner.name);
        state.queue.push_back(Item {
            name,
            future: Box::pin(future),
        });
        state.queued += 1;
        let waker = state.task_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Items queued or running.
    pub fn pending(&self) -> usize {
        let state = self.inner.state.borrow();
        state.queue.len() + usize::from(state.running.is_some())
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.pending() == 0
    }

    /// The item running now, if any.
    pub fn running(&self) -> Option<Cow<'static, str>> {
        self.inner.state.borrow().running.clone()
    }

    /// Completes once every item queued before this call has finished. (Items queued
    /// later are not waited for, so a flush cannot be starved.)
    pub fn flush(&self) -> impl Future<Output = ()> + 'static {
        let inner = self.inner.clone();
        let target = inner.state.borrow().queued;
        poll_fn(move |cx| {
            let mut state = inner.state.borrow_mut();
            if state.finished >= target || state.exited {
                return Poll::Ready(());
            }
            if !state.flush_wakers.iter().any(|w| w.will_wake(cx.waker())) {
                state.flush_wakers.push(cx.waker().clone());
            }
            let left = target - state.finished;
            drop(state);
            annotate_reason(
                WaitReason::shared(format!(
                    "flush of worker {} ({left} items left)",
                    inner.name
                )),
                false,
            );
            Poll::Pending
        })
    }

    /// Stops accepting items; the task exits after running what is already queued.
    pub fn stop(&self) {
        let waker = {
            let mut state = self.inner.state.borrow_mut();
            state.stopping = true;
            state.task_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.state.borrow().stopping
    }

    /// Whether the task has exited (stopped and drained).
    pub fn has_exited(&self) -> bool {
        self.inner.state.borrow().exited
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.borrow();
        f.debug_struct("Worker")
            .field("name", &self.inner.name)
            .field("running", &state.running)
            .field("queued", &state.queue.len())
            .finish()
    }
}

/// The worker task: take the next item, run it to completion, repeat.
async fn serve(inner: Rc<Inner>) {
    let _drain = DropQueueOnExit(inner.clone());
    loop {
        let next = poll_fn(|cx| {
            let mut state = inner.state.borrow_mut();
            if let Some(item) = state.queue.pop_front() {
                state.running = Some(item.name.clone());
                return Poll::Ready(Some(item));
            }
            if state.stopping {
                return Poll::Ready(None);
            }
            register_waker(&mut state.task_waker, cx);
            drop(state);
            annotate_reason(WaitReason::text("new work (idle)"), false);
            Poll::Pending
        })
        .await;
        let Some(item) = next else {
            break;
        };
        let task = current::task();
        if let Some(task) = &task {
            task.set_item(Some(item.name.clone()));
        }
        log::trace!("worker {}: start {}", inner.name, item.name);
        item.future.await;
        log::trace!("worker {}: done {}", inner.name, item.name);
        if let Some(task) = &task {
            task.set_item(None);
        }
        let flushers = {
            let mut state = inner.state.borrow_mut();
            state.running = None;
            state.finished += 1;
            core::mem::take(&mut state.flush_wakers)
        };
        for waker in flushers {
            waker.wake();
        }
    }
    log::debug!("worker {} stopped", inner.name);
    let flushers = {
        let mut state = inner.state.borrow_mut();
        state.exited = true;
        core::mem::take(&mut state.flush_wakers)
    };
    for waker in flushers {
        waker.wake();
    }
}

/// Drops queued items when the worker task goes away (its executor is dropped), which
/// breaks reference cycles through items that captured the worker or a handle.
struct DropQueueOnExit(Rc<Inner>);

impl Drop for DropQueueOnExit {
    fn drop(&mut self) {
        let items = core::mem::take(&mut self.0.state.borrow_mut().queue);
        drop(items);
    }
}

impl Reporter for Inner {
    fn report(&self, notes: &mut Vec<String>) {
        let state = self.state.borrow();
        let mut line = format!("worker {}: ", self.name);
        match &state.running {
            Some(item) => line.push_str(&format!("running {item}")),
            None if state.exited => line.push_str("exited"),
            None => line.push_str("idle"),
        }
        if !state.queue.is_empty() {
            line.push_str("; queued behind it: ");
            for (i, item) in state.queue.iter().enumerate() {
                if i > 0 {
                    line.push_str(", ");
                }
                line.push_str(&item.name);
            }
        }
        notes.push(line);
    }
}
