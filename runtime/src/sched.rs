//! The scheduler core shared by the kernel executor and the simulation.
//!
//! Both drive the same [`Core`]: a table of tasks, a ready queue fed by wakers, a timer
//! queue and the irq registry. They differ only in policy, which stays in their own
//! modules: the kernel executor polls the ready queue in FIFO order and halts the CPU
//! when there is nothing to do; the simulation picks one ready task at a time with its
//! seeded RNG and jumps its virtual clock to the next timer. Driver code sees neither, only
//! a [`Handle`](crate::Handle) on the core, which is why it runs unchanged in both.
//!
//! Everything here runs in thread context. The only parts reachable from elsewhere are
//! in [`Shared`] (`Send + Sync`, reachable from wakers), and interrupt handlers touch
//! none of it: they only set atomics in an [`IrqSignal`](crate::irq::IrqSignal).

use alloc::borrow::Cow;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::rc::{Rc, Weak};
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use crate::current::{self, Current};
use crate::irq::IrqSignal;
use crate::report::{Report, TaskReport};
use crate::rng::Pcg32;
use crate::task::{BoxedTask, TaskHeader, TaskId, TaskWaker};
use crate::time::Instant;
use crate::Platform;

/// The part of an executor that wakers and primitives reach without a `Handle`.
pub(crate) struct Shared {
    /// Woken tasks, in wake order. Each id appears at most once (see `TaskWaker`).
    pub(crate) ready: spin::Mutex<VecDeque<TaskId>>,
    /// Irq signals some task of this executor has waited on, in first-wait order.
    irqs: spin::Mutex<Vec<IrqEntry>>,
}

struct IrqEntry {
    signal: &'static IrqSignal,
    wakers: Vec<Waker>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            ready: spin::Mutex::new(VecDeque::new()),
            irqs: spin::Mutex::new(Vec::new()),
        }
    }

    /// Remembers that `waker` waits for `signal`. Called by a pending `IrqWait`.
    pub(crate) fn register_irq(&self, signal: &'static IrqSignal, waker: &Waker) {
        let mut irqs = self.irqs.lock();
        let entry = match irqs.iter().position(|e| core::ptr::eq(e.signal, signal)) {
            Some(index) => &mut irqs[index],
            None => {
                irqs.push(IrqEntry {
                    signal,
                    wakers: Vec::new(),
                });
                let last = irqs.len() - 1;
                &mut irqs[last]
            }
        };
        if !entry.wakers.iter().any(|w| w.will_wake(waker)) {
            entry.wakers.push(waker.clone());
        }
    }

    /// Wakes the waiters of every raised signal. The signal stays pending until a waiter
    /// consumes it, so a raise that lands between this scan and the waiter's poll is not
    /// lost. Scans every registered signal: the registry is a handful of entries, and not
    /// relying on the global "some irq pending" flag keeps simulations on parallel test
    /// threads from stealing each other's dispatches.
    pub(crate) fn dispatch_irqs(&self) -> usize {
        let mut woken = 0;
        let mut irqs = self.irqs.lock();
        for entry in irqs.iter_mut() {
            if !entry.wakers.is_empty() && entry.signal.is_pending() {
                log::trace!("irq {} dispatched", entry.signal.name());
                for waker in entry.wakers.drain(..) {
                    waker.wake();
                    woken += 1;
                }
            }
        }
        woken
    }
}

/// Where `now()` comes from.
pub(crate) enum Clock {
    Platform(Rc<dyn Platform>),
    Virtual(Cell<Instant>),
}

/// Adds lines about non-task state (a worker's queue) to deadlock reports.
pub(crate) trait Reporter {
    fn report(&self, notes: &mut Vec<String>);
}

struct TaskSlot {
    header: Arc<TaskHeader>,
    waker_state: Arc<TaskWaker>,
    waker: Waker,
    /// `None` while the task is being polled.
    future: Option<BoxedTask>,
}

/// What polling one task did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Polled {
    /// The task returned `Pending`.
    Pending,
    /// The task finished and was removed.
    Finished,
    /// No such task (finished earlier; a stale wake).
    Gone,
}

pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    clock: Clock,
    tasks: RefCell<BTreeMap<TaskId, TaskSlot>>,
    next_task: Cell<u64>,
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    next_timer: Cell<u64>,
    reporters: RefCell<Vec<Weak<dyn Reporter>>>,
    /// Woken tasks the simulation has taken off the wake queue and not yet polled,
    /// ordered by id so that its seeded pick is reproducible.
    pub(crate) collected: RefCell<BTreeSet<TaskId>>,
    /// Randomness for code that asks the handle (fault injection, jitter). Its own stream,
    /// so drawing from it does not shift the simulation's scheduling decisions.
    rng: RefCell<Pcg32>,
}

impl Core {
    pub(crate) fn new(clock: Clock, seed: u64) -> Self {
        Core {
            shared: Arc::new(Shared::new()),
            clock,
            tasks: RefCell::new(BTreeMap::new()),
            next_task: Cell::new(1),
            timers: RefCell::new(BTreeMap::new()),
            next_timer: Cell::new(0),
            reporters: RefCell::new(Vec::new()),
            collected: RefCell::new(BTreeSet::new()),
            rng: RefCell::new(Pcg32::new(seed, 0x6876_6e65_7421)),
        }
    }

    pub(crate) fn now(&self) -> Instant {
        match &self.clock {
            Clock::Platform(platform) => platform.now(),
            Clock::Virtual(now) => now.get(),
        }
    }

    /// Moves the virtual clock (simulation only; never backwards).
    pub(crate) fn set_virtual_now(&self, t: Instant) {
        if let Clock::Virtual(now) = &self.clock {
            if t > now.get() {
                now.set(t);
            }
        }
    }

    pub(crate) fn random_u64(&self) -> u64 {
        self.rng.borrow_mut().next_u64()
    }

    pub(crate) fn spawn_boxed(&self, header: Arc<TaskHeader>, future: BoxedTask) {
        let id = header.id;
        let waker_state = Arc::new(TaskWaker {
            id,
            queued: AtomicBool::new(false),
            shared: Arc::downgrade(&self.shared),
        });
        let waker = Waker::from(waker_state.clone());
        log::trace!("spawn task {id} ({})", header.name);
        self.tasks.borrow_mut().insert(
            id,
            TaskSlot {
                header,
                waker_state,
                waker: waker.clone(),
                future: Some(future),
            },
        );
        waker.wake();
    }

    pub(crate) fn new_header(&self, name: Cow<'static, str>) -> Arc<TaskHeader> {
        let id = TaskId(self.next_task.get());
        self.next_task.set(id.0 + 1);
        Arc::new(TaskHeader::new(id, name))
    }

    pub(crate) fn header(&self, id: TaskId) -> Option<Arc<TaskHeader>> {
        self.tasks.borrow().get(&id).map(|slot| slot.header.clone())
    }

    pub(crate) fn contains(&self, id: TaskId) -> bool {
        self.tasks.borrow().contains_key(&id)
    }

    pub(crate) fn task_count(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Empties the ready queue, returning the woken ids in wake order.
    pub(crate) fn take_ready(&self) -> VecDeque<TaskId> {
        core::mem::take(&mut *self.shared.ready.lock())
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.shared.ready.lock().is_empty()
    }

    /// Polls task `id` once, with the task published as current.
    pub(crate) fn poll(&self, id: TaskId) -> Polled {
        let (mut future, waker, header) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.get_mut(&id) else {
                return Polled::Gone;
            };
            let Some(future) = slot.future.take() else {
                // Re-entrant poll of the task being polled: cannot happen with our loops.
                return Polled::Pending;
            };
            // Clear before polling: a wake during the poll must queue it again.
            slot.waker_state.queued.store(false, Ordering::Release);
            (future, slot.waker.clone(), slot.header.clone())
        };
        header.clear_waiting();
        let poll = {
            let _current = current::enter(Current {
                shared: self.shared.clone(),
                task: header.clone(),
            });
            future.as_mut().poll(&mut Context::from_waker(&waker))
        };
        match poll {
            Poll::Pending => {
                if let Some(slot) = self.tasks.borrow_mut().get_mut(&id) {
                    slot.future = Some(future);
                }
                Polled::Pending
            }
            Poll::Ready(()) => {
                let slot = self.tasks.borrow_mut().remove(&id);
                log::trace!("task {id} ({}) finished", header.name);
                // Dropped outside the borrow: dropping a future may touch the core.
                drop(future);
                drop(slot);
                Polled::Finished
            }
        }
    }

    /// Drops every task (breaking the `Rc` cycles between tasks and the handles they
    /// hold). Futures are dropped outside the table borrow, in id order.
    pub(crate) fn clear_tasks(&self) {
        let tasks = core::mem::take(&mut *self.tasks.borrow_mut());
        drop(tasks);
        self.take_ready();
        self.collected.borrow_mut().clear();
    }

    pub(crate) fn add_timer(&self, deadline: Instant, waker: Waker) -> (Instant, u64) {
        let seq = self.next_timer.get();
        self.next_timer.set(seq + 1);
        self.timers.borrow_mut().insert((deadline, seq), waker);
        (deadline, seq)
    }

    pub(crate) fn update_timer(&self, key: (Instant, u64), cx: &Context<'_>) {
        let mut timers = self.timers.borrow_mut();
        match timers.get_mut(&key) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            Some(waker) => *waker = cx.waker().clone(),
            None => {
                timers.insert(key, cx.waker().clone());
            }
        }
    }

    pub(crate) fn remove_timer(&self, key: (Instant, u64)) {
        self.timers.borrow_mut().remove(&key);
    }

    /// Wakes every timer due at `now`; returns how many.
    pub(crate) fn fire_timers(&self, now: Instant) -> usize {
        let mut fired = 0;
        loop {
            let waker = {
                let mut timers = self.timers.borrow_mut();
                match timers.first_key_value() {
                    Some((&(deadline, _), _)) if deadline <= now => {
                        timers.pop_first().map(|(_, waker)| waker)
                    }
                    _ => None,
                }
            };
            match waker {
                Some(waker) => {
                    waker.wake();
                    fired += 1;
                }
                None => return fired,
            }
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.borrow().first_key_value().map(|(&(t, _), _)| t)
    }

    pub(crate) fn add_reporter(&self, reporter: Weak<dyn Reporter>) {
        let mut reporters = self.reporters.borrow_mut();
        reporters.retain(|r| r.strong_count() > 0);
        reporters.push(reporter);
    }

    /// Describes every live task and what it waits on; a task is marked ready if it is
    /// in the wake queue or collected by the simulation.
    pub(crate) fn report(&self) -> Report {
        let mut ready: BTreeSet<TaskId> = self.collected.borrow().clone();
        ready.extend(self.shared.ready.lock().iter().copied());
        let headers: Vec<Arc<TaskHeader>> = self
            .tasks
            .borrow()
            .values()
            .map(|slot| slot.header.clone())
            .collect();
        let tasks = headers
            .iter()
            .map(|header| {
                let snapshot = header.snapshot();
                TaskReport {
                    id: header.id,
                    name: snapshot.label,
                    ready: ready.contains(&header.id),
                    waiting_on: snapshot.waiting.iter().map(ToString::to_string).collect(),
                    holds: snapshot.holds.iter().map(|h| h.to_string()).collect(),
                }
            })
            .collect();
        let mut notes = Vec::new();
        let reporters: Vec<_> = self
            .reporters
            .borrow()
            .iter()
            .filter_map(|r| r.upgrade())
            .collect();
        for reporter in reporters {
            reporter.report(&mut notes);
        }
        Report { tasks, notes }
    }
}
