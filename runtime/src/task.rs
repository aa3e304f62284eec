//! Tasks: identity, wakers, wait annotations and join handles.
//!
//! A task's future is `!Send` and stays inside the executor that spawned it. What other
//! parties need to reach lives in two small `Send + Sync` pieces:
//! - [`TaskWaker`], behind every `Waker` handed to the task's future. Waking it pushes
//!   the task id onto its executor's ready queue once (an atomic flag skips duplicates),
//!   so a wake is one atomic swap and, at most, one short queue push.
//! - [`TaskHeader`], the task's name plus what it is waiting on and which locks it holds,
//!   read by deadlock reports. Worker tasks also record the work item they are running,
//!   so a report names `probe:nic1`, not just "the primary worker".

use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::task::Wake;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::{self, Write as _};
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use crate::sched::Shared;
use crate::wait::{annotate_reason, WaitReason};

/// Identifies a task within one executor or simulation. Ids are handed out in spawn
/// order, so ordering by id is deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub(crate) u64);

impl TaskId {
    /// The raw number (1 for the first task spawned).
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The parts of a task that deadlock reports and primitives read.
pub(crate) struct TaskHeader {
    pub(crate) id: TaskId,
    pub(crate) name: Cow<'static, str>,
    status: spin::Mutex<TaskStatus>,
}

#[derive(Default)]
struct TaskStatus {
    /// The work item a worker task is running.
    item: Option<Cow<'static, str>>,
    /// What the task waited on when its last poll returned `Pending`.
    waiting: Vec<WaitReason>,
    /// Locks held: (lock key, description).
    holds: Vec<(u64, Cow<'static, str>)>,
}

/// A copy of a task's status taken for a report.
pub(crate) struct TaskSnapshot {
    pub(crate) label: String,
    pub(crate) waiting: Vec<WaitReason>,
    pub(crate) holds: Vec<Cow<'static, str>>,
}

impl TaskHeader {
    pub(crate) fn new(id: TaskId, name: Cow<'static, str>) -> Self {
        TaskHeader {
            id,
            name,
            status: spin::Mutex::new(TaskStatus::default()),
        }
    }

    /// Writes the task's name, or `item on name` while a worker runs an item.
    pub(crate) fn write_label(&self, f: &mut dyn fmt::Write) -> fmt::Result {
        let status = self.status.lock();
        match &status.item {
            Some(item) => write!(f, "{item} on {}", self.name),
            None => f.write_str(&self.name),
        }
    }

    pub(crate) fn label(&self) -> String {
        let mut label = String::new();
        let _ = self.write_label(&mut label);
        label
    }

    pub(crate) fn set_item(&self, item: Option<Cow<'static, str>>) {
        self.status.lock().item = item;
    }

    pub(crate) fn clear_waiting(&self) {
        self.status.lock().waiting.clear();
    }

    pub(crate) fn push_waiting(&self, reason: WaitReason, front: bool) {
        let mut status = self.status.lock();
        if front {
            status.waiting.insert(0, reason);
        } else {
            status.waiting.push(reason);
        }
    }

    pub(crate) fn add_hold(&self, key: u64, what: Cow<'static, str>) {
        self.status.lock().holds.push((key, what));
    }

    pub(crate) fn remove_hold(&self, key: u64) {
        self.status.lock().holds.retain(|(k, _)| *k != key);
    }

    pub(crate) fn snapshot(&self) -> TaskSnapshot {
        let label = self.label();
        let status = self.status.lock();
        TaskSnapshot {
            label,
            waiting: status.waiting.clone(),
            holds: status.holds.iter().map(|(_, what)| what.clone()).collect(),
        }
    }
}

/// The `Waker` behind a task: pushes the task onto its executor's ready queue.
pub(crate) struct TaskWaker {
    pub(crate) id: TaskId,
    /// Set while the task sits in the ready queue, so repeated wakes push it once.
    pub(crate) queued: AtomicBool,
    /// Weak: the executor's irq registry holds wakers, which must not keep it alive.
    pub(crate) shared: Weak<Shared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            if let Some(shared) = self.shared.upgrade() {
                shared.ready.lock().push_back(self.id);
            }
        }
    }
}

/// Stores `cx`'s waker in `slot`, skipping the clone when the stored one would wake the
/// same task (the common case of a task polled again for the same wait).
pub(crate) fn register_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

pub(crate) struct JoinState<T> {
    output: Option<T>,
    finished: bool,
    waker: Option<Waker>,
}

/// Waits for a spawned task and returns its output. Dropping it detaches the task, which
/// keeps running; its output is then dropped when it finishes.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
    header: Arc<TaskHeader>,
}

impl<T> JoinHandle<T> {
    /// The task's id.
    pub fn id(&self) -> crate::TaskId {
        self.header.id
    }

    /// The name the task was spawned with.
    pub fn name(&self) -> &str {
        &self.header.name
    }

    /// Whether the task has finished (its output may already have been taken).
    pub fn is_finished(&self) -> bool {
        self.state.borrow().finished
    }

    /// Takes the output if the task has finished, without waiting.
    pub fn try_take(&mut self) -> Option<T> {
        self.state.borrow_mut().output.take()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut state = self.state.borrow_mut();
        if let Some(output) = state.output.take() {
            return Poll::Ready(output);
        }
        assert!(
            !state.finished,
            "JoinHandle for task {} polled after it returned the output",
            self.header.name
        );
        register_waker(&mut state.waker, cx);
        drop(state);
        annotate_reason(WaitReason::join(self.header.clone()), false);
        Poll::Pending
    }
}

/// A task's future as the executor stores it.
pub(crate) type BoxedTask = Pin<Box<dyn Future<Output = ()>>>;

/// Wraps a task's future so that its output lands in the join state. Returns the
/// type-erased future the executor stores, and the handle.
pub(crate) fn joinable<F>(future: F, header: Arc<TaskHeader>) -> (BoxedTask, JoinHandle<F::Output>)
where
    F: Future + 'static,
    F::Output: 'static,
{
    let state = Rc::new(RefCell::new(JoinState {
        output: None,
        finished: false,
        waker: None,
    }));
    let task_state = state.clone();
    let wrapped = async move {
        let output = future.await;
        let waker = {
            let mut state = task_state.borrow_mut();
            state.output = Some(output);
            state.finished = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    };
    (Box::pin(wrapped), JoinHandle { state, header })
}

impl fmt::Debug for TaskHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {} ", self.id)?;
        f.write_char('(')?;
        self.write_label(f)?;
        f.write_char(')')
    }
}
