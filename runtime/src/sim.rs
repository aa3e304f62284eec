//! Deterministic simulation: the same tasks, primitives and [`Handle`] as the kernel, run
//! on one thread under a scheduler that a seed controls completely.
//!
//! - **Seeded choice.** The ready tasks form an ordered set (by task id, which follows
//!   spawn order); each step the RNG picks one to poll. Every pick is logged at trace
//!   level and (optionally) recorded, so two runs with one seed give identical traces.
//! - **Virtual time.** `now()` is a counter. Each poll costs a small random amount of
//!   time (see [`Config::poll_cost`]), so a timeout can race with the work it guards.
//!   When nothing is ready the clock jumps to the earliest timer.
//! - **Deadlock detection.** Nothing ready, no timer pending and the main future not
//!   done: no event can ever happen again. Instead of hanging, [`Simulation::run`] returns
//!   [`SimError::Deadlock`] with a [`Report`] naming every task and what it waits on.
//!   Step and virtual-time limits catch livelocks the same way.
//! - **Interrupts.** [`IrqSignal`](crate::irq::IrqSignal)s raised by simulated hardware
//!   are dispatched at the top of every step, as the kernel executor does every turn.
//!
//! There is no other source of nondeterminism: no wall clock, no threads, no hash-map
//! iteration. The `testing` module (with the `std` feature) runs scenarios over many
//! seeds and prints the command that replays a failing one.

use alloc::borrow::Cow;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::future::Future;

use crate::handle::Handle;
use crate::report::Report;
use crate::rng::Pcg32;
use crate::sched::{Clock, Core};
use crate::task::TaskId;
use crate::time::{Duration, Instant};

/// Limits and costs of a simulation.
#[derive(Clone, Debug)]
pub struct Config {
    /// Polls allowed in one [`Simulation::run`] before it gives up with
    /// [`SimError::StepLimit`] (a livelock: tasks keep waking each other).
    pub max_steps: u64,
    /// Virtual time the clock may reach before [`SimError::TimeLimit`].
    pub max_virtual_time: Duration,
    /// Each poll advances the clock by a random amount in `0..=poll_cost`, so that work
    /// takes time and timeouts race with it. Zero makes polls free.
    pub poll_cost: Duration,
    /// Keep every pick in memory for [`Simulation::trace`] (they are always logged).
    pub record_trace: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_steps: 1_000_000,
            max_virtual_time: Duration::from_secs(3600),
            poll_cost: Duration::from_micros(5),
            record_trace: false,
        }
    }
}

/// One scheduling decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Step number within the simulation, from 1.
    pub step: u64,
    /// Virtual time of the poll.
    pub time: Instant,
    /// The task polled.
    pub task: TaskId,
    /// Its name.
    pub name: Cow<'static, str>,
    /// How many tasks were ready to choose from.
    pub ready: usize,
}

/// Why a simulation stopped without the main future completing. Every variant carries
/// the seed, so a printed error is enough to replay it.
#[derive(Clone, Debug)]
pub enum SimError {
    /// No task ready, no timer pending, main not done.
    Deadlock {
        /// The simulation's seed.
        seed: u64,
        /// Virtual time when it was detected.
        time: Instant,
        /// Every live task and what it waits on.
        report: Report,
    },
    /// `max_steps` polls without the main future completing.
    StepLimit {
        /// The simulation's seed.
        seed: u64,
        /// Steps taken.
        steps: u64,
        /// Virtual time reached.
        time: Instant,
        /// Every live task when it stopped.
        report: Report,
    },
    /// The virtual clock would pass `max_virtual_time`.
    TimeLimit {
        /// The simulation's seed.
        seed: u64,
        /// The limit.
        limit: Duration,
        /// Virtual time when it stopped.
        time: Instant,
        /// Every live task when it stopped.
        report: Report,
    },
}

impl SimError {
    /// The seed of the simulation that failed.
    pub fn seed(&self) -> u64 {
        match self {
            SimError::Deadlock { seed, .. }
            | SimError::StepLimit { seed, .. }
            | SimError::TimeLimit { seed, .. } => *seed,
        }
    }

    /// The task report taken when it stopped.
    pub fn report(&self) -> &Report {
        match self {
            SimError::Deadlock { report, .. }
            | SimError::StepLimit { report, .. }
            | SimError::TimeLimit { report, .. } => report,
        }
    }

    /// Whether it is a deadlock.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, SimError::Deadlock { .. })
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Deadlock { seed, time, report } => write!(
                f,
                "deadlock at {time} (seed {seed}): no task is ready and no timer is pending\n\
                 {report}"
            ),
            SimError::StepLimit {
                seed,
                steps,
                time,
                report,
            } => write!(
                f,
                "step limit: {steps} polls without finishing, at {time} (seed {seed})\n{report}"
            ),
            SimError::TimeLimit {
                seed,
                limit,
                time,
                report,
            } => write!(
                f,
                "time limit: virtual time would pass {limit:?}, at {time} (seed {seed})\n{report}"
            ),
        }
    }
}

impl core::error::Error for SimError {}

/// A deterministic, single-threaded executor for tests. See the [module docs](self).
pub struct Simulation {
    seed: u64,
    config: Config,
    core: Rc<Core>,
    rng: RefCell<Pcg32>,
    steps: Cell<u64>,
    trace: RefCell<Vec<Pick>>,
    /// FNV-1a over (task id, time) of every pick: a cheap schedule fingerprint.
    fingerprint: Cell<u64>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Simulation {
    /// A simulation with the default [`Config`].
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, Config::default())
    }

    /// A simulation with explicit limits and costs.
    pub fn with_config(seed: u64, config: Config) -> Self {
        Simulation {
            seed,
            config,
            core: Rc::new(Core::new(Clock::Virtual(Cell::new(Instant::ZERO)), seed)),
            rng: RefCell::new(Pcg32::new(seed, 0x5eed)),
            steps: Cell::new(0),
            trace: RefCell::new(Vec::new()),
            fingerprint: Cell::new(FNV_OFFSET),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A handle for spawning tasks: the same type drivers get from the kernel executor.
    pub fn handle(&self) -> Handle {
        Handle::new(self.core.clone())
    }

    /// Virtual time now.
    pub fn now(&self) -> Instant {
        self.core.now()
    }

    /// Polls made so far (all runs).
    pub fn steps(&self) -> u64 {
        self.steps.get()
    }

    /// The recorded picks (empty unless [`Config::record_trace`] is set).
    pub fn trace(&self) -> Vec<Pick> {
        self.trace.borrow().clone()
    }

    /// A fingerprint of the schedule so far (every pick's task and time), always kept.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint.get()
    }

    /// A snapshot of every live task.
    pub fn report(&self) -> Report {
        self.collect_ready();
        self.core.report()
    }

    /// Runs the simulation until `future` (spawned as task `main`) completes, returning
    /// its output, or until it deadlocks or hits a limit. Tasks still alive afterwards
    /// stay, and continue if `run` is called again.
    pub fn run<F>(&self, future: F) -> Result<F::Output, SimError>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let mut main = self.handle().spawn("main", future);
        let limit = Instant::ZERO + self.config.max_virtual_time;
        let first_step = self.steps.get();
        loop {
            if let Some(output) = main.try_take() {
                return Ok(output);
            }
            self.core.shared.dispatch_irqs();
            self.core.fire_timers(self.core.now());
            self.collect_ready();

            if self.core.collected.borrow().is_empty() {
                match self.core.next_deadline() {
                    Some(deadline) if deadline > limit => return Err(self.time_limit(limit)),
                    Some(deadline) => {
                        log::trace!("seed {} idle: clock jumps to {deadline}", self.seed);
                        self.core.set_virtual_now(deadline);
                        continue;
                    }
                    None => {
                        let error = SimError::Deadlock {
                            seed: self.seed,
                            time: self.now(),
                            report: self.report(),
                        };
                        log::debug!("{error}");
                        return Err(error);
                    }
                }
            }

            if self.steps.get() - first_step >= self.config.max_steps {
                return Err(SimError::StepLimit {
                    seed: self.seed,
                    steps: self.steps.get() - first_step,
                    time: self.now(),
                    report: self.report(),
                });
            }
            let id = self.pick();
            self.core.poll(id);

            let cost = self
                .rng
                .borrow_mut()
                .below(self.poll_cost_nanos().saturating_add(1));
            let after = self.now() + Duration::from_nanos(cost);
            if after > limit {
                return Err(self.time_limit(limit));
            }
            self.core.set_virtual_now(after);
        }
    }

    fn poll_cost_nanos(&self) -> u64 {
        u64::try_from(self.config.poll_cost.as_nanos()).unwrap_or(u64::MAX)
    }

    fn time_limit(&self, limit: Instant) -> SimError {
        log::debug!("seed {} reached the time limit {limit}", self.seed);
        SimError::TimeLimit {
            seed: self.seed,
            limit: self.config.max_virtual_time,
            time: self.now(),
            report: self.report(),
        }
    }

    /// Moves woken tasks from the wake queue into the ordered ready set.
    fn collect_ready(&self) {
        let woken = self.core.take_ready();
        let mut ready = self.core.collected.borrow_mut();
        for id in woken {
            if self.core.contains(id) {
                ready.insert(id);
            }
        }
    }

    /// Takes the seeded choice out of the ready set and records it.
    fn pick(&self) -> TaskId {
        let mut ready = self.core.collected.borrow_mut();
        let count = ready.len();
        let index = self.rng.borrow_mut().below(count as u64) as usize;
        let id = ready.iter().nth(index).copied().unwrap_or(TaskId(0));
        ready.remove(&id);
        drop(ready);

        let step = self.steps.get() + 1;
        self.steps.set(step);
        let time = self.now();
        let mut hash = self.fingerprint.get();
        for word in [id.0, time.as_nanos()] {
            for byte in word.to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
            }
        }
        self.fingerprint.set(hash);

        if self.config.record_trace || log::log_enabled!(log::Level::Trace) {
            let name = self
                .core
                .header(id)
                .map(|h| h.name.clone())
                .unwrap_or_default();
            log::trace!(
                "seed {} step {step} at {time}: pick task {id} ({name}) of {count} ready",
                self.seed
            );
            if self.config.record_trace {
                self.trace.borrow_mut().push(Pick {
                    step,
                    time,
                    task: id,
                    name,
                    ready: count,
                });
            }
        }
        id
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        self.core.clear_tasks();
    }
}

impl fmt::Debug for Simulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.seed)
            .field("now", &self.now())
            .field("steps", &self.steps.get())
            .finish()
    }
}
