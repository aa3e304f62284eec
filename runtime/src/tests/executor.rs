//! Spawning, joining, timers, timeouts and irq signals; in the simulation and on the
//! kernel executor with a fake platform.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;

use crate::irq::IrqSignal;
use crate::sim::Simulation;
use crate::sync::Event;
use crate::testing::check_seeds;
use crate::{Elapsed, Executor, Instant, Platform};

const MS: Duration = Duration::from_millis(1);

#[test]
fn spawn_and_join_return_outputs() {
    check_seeds(50, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let sum = sim.run(async move {
            let tasks: Vec<_> = (0..5u64)
                .map(|i| {
                    let h2 = h.clone();
                    h.spawn("square", async move {
                        h2.yield_now().await;
                        i * i
                    })
                })
                .collect();
            let mut sum = 0;
            for task in tasks {
                sum += task.await;
            }
            sum
        })?;
        assert_eq!(sum, 1 + 4 + 9 + 16);
        Ok::<_, crate::sim::SimError>(())
    });
}

#[test]
fn joiner_resumes_only_after_the_joined_task_finished() {
    check_seeds(50, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let log = Rc::new(RefCell::new(Vec::new()));
        let log2 = log.clone();
        sim.run(async move {
            let log3 = log2.clone();
            let h2 = h.clone();
            let child = h.spawn("child", async move {
                for step in 0..3 {
                    log3.borrow_mut().push(step);
                    h2.yield_now().await;
                }
                "done"
            });
            assert_eq!(child.await, "done");
            log2.borrow_mut().push(99);
        })?;
        assert_eq!(*log.borrow(), vec![0, 1, 2, 99]);
        Ok::<_, crate::sim::SimError>(())
    });
}

#[test]
fn detached_task_keeps_running() {
    let sim = Simulation::new(1);
    let h = sim.handle();
    let flag = Rc::new(Event::named("detached done"));
    let flag2 = flag.clone();
    let h2 = h.clone();
    sim.run(async move {
        drop(h.spawn("detached", async move {
            h2.sleep(MS).await;
            flag2.set();
        }));
        flag.wait().await;
    })
    .unwrap();
}

#[test]
fn sleeps_wake_in_deadline_order_at_their_deadline() {
    check_seeds(50, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let woke = Rc::new(RefCell::new(Vec::new()));
        let woke2 = woke.clone();
        sim.run(async move {
            let mut tasks = Vec::new();
            for ms in [30u64, 10, 20, 10, 5] {
                let (h2, woke3) = (h.clone(), woke2.clone());
                tasks.push(h.spawn("sleeper", async move {
                    let deadline = h2.now() + Duration::from_millis(ms);
                    h2.sleep(Duration::from_millis(ms)).await;
                    let now = h2.now();
                    assert!(now >= deadline, "woke at {now} before {deadline}");
                    assert!(
                        now.saturating_duration_since(deadline) < MS,
                        "woke at {now}, long after {deadline}"
                    );
                    woke3.borrow_mut().push(ms);
                }));
            }
            for task in tasks {
                task.await;
            }
        })?;
        assert_eq!(*woke.borrow(), vec![5, 10, 10, 20, 30]);
        // Virtual time jumped: 30 ms passed without 30 ms of work.
        assert!(sim.now() >= Instant::ZERO + 30 * MS);
        assert!(sim.now() < Instant::ZERO + 31 * MS);
        Ok::<_, crate::sim::SimError>(())
    });
}

#[test]
fn sleep_in_the_past_completes_at_once() {
    let sim = Simulation::new(3);
    let h = sim.handle();
    sim.run(async move {
        h.sleep(MS).await;
        let before = h.now();
        h.sleep_until(Instant::ZERO).await;
        h.sleep(Duration::ZERO).await;
        assert!(h.now() >= before);
    })
    .unwrap();
}

#[test]
fn timeout_fires_when_the_future_is_slower() {
    let sim = Simulation::new(4);
    let h = sim.handle();
    let result = sim
        .run(async move {
            let start = h.now();
            let r = h.timeout(10 * MS, h.sleep(20 * MS)).await;
            (r, h.now().saturating_duration_since(start))
        })
        .unwrap();
    assert_eq!(result.0, Err(Elapsed));
    assert!(result.1 >= 10 * MS && result.1 < 11 * MS, "{:?}", result.1);
}

#[test]
fn timeout_fires_for_a_future_that_never_completes() {
    static NEVER: Event = Event::named("never");
    let sim = Simulation::new(5);
    let h = sim.handle();
    let r = sim
        .run(async move { h.timeout(MS, NEVER.wait()).await })
        .unwrap();
    assert_eq!(r, Err(Elapsed));
}

#[test]
fn timeout_does_not_fire_when_the_future_is_faster() {
    check_seeds(20, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let h2 = h.clone();
        let r = sim.run(async move {
            h.timeout(20 * MS, async move {
                h2.sleep(10 * MS).await;
                7
            })
            .await
        })?;
        assert_eq!(r, Ok(7));
        // The timeout's timer was removed: nothing is pending, the run ended at ~10 ms.
        assert!(sim.now() < Instant::ZERO + 11 * MS);
        Ok::<_, crate::sim::SimError>(())
    });
}

#[test]
fn irq_raise_wakes_the_waiting_task() {
    static SIG: IrqSignal = IrqSignal::named("test nic");
    check_seeds(20, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let h2 = h.clone();
        let woke_at = sim.run(async move {
            h.spawn("device", async move {
                h2.sleep(MS).await;
                SIG.raise();
            });
            SIG.wait().await;
            h.now()
        })?;
        assert!(woke_at >= Instant::ZERO + MS);
        assert!(!SIG.is_pending(), "the wait consumed the raise");
        Ok::<_, crate::sim::SimError>(())
    });
}

#[test]
fn irq_raised_before_the_wait_is_not_lost() {
    static SIG: IrqSignal = IrqSignal::named("early");
    SIG.raise();
    assert!(SIG.is_pending());
    let sim = Simulation::new(6);
    sim.run(SIG.wait()).unwrap();
    assert!(!SIG.is_pending());
}

#[test]
fn irq_raises_coalesce_into_one_wake() {
    static SIG: IrqSignal = IrqSignal::named("coalesce");
    let sim = Simulation::new(7);
    let h = sim.handle();
    let (first, second) = sim
        .run(async move {
            SIG.raise();
            SIG.raise();
            SIG.raise();
            let first = h.timeout(MS, SIG.wait()).await;
            let second = h.timeout(MS, SIG.wait()).await;
            (first, second)
        })
        .unwrap();
    assert_eq!(first, Ok(()));
    assert_eq!(
        second,
        Err(Elapsed),
        "three raises before the wait are one wake"
    );
}

#[test]
fn irq_raised_by_another_task_while_waiting_wakes_once_per_raise() {
    static SIG: IrqSignal = IrqSignal::named("per raise");
    let sim = Simulation::new(8);
    let h = sim.handle();
    let h2 = h.clone();
    let count = sim
        .run(async move {
            h.spawn("device", async move {
                for _ in 0..4 {
                    h2.sleep(MS).await;
                    SIG.raise();
                }
            });
            let mut count = 0;
            while h.timeout(5 * MS, SIG.wait()).await.is_ok() {
                count += 1;
            }
            count
        })
        .unwrap();
    assert_eq!(count, 4);
}

/// A platform whose clock only moves when the executor idles, jumping to the deadline;
/// "interrupts" are raised from `idle` when a test asks for them.
struct FakePlatform {
    now: Cell<u64>,
    idles: RefCell<Vec<Option<Instant>>>,
    interrupt_on_idle: Cell<Option<&'static IrqSignal>>,
}

impl FakePlatform {
    fn new() -> Self {
        FakePlatform {
            now: Cell::new(1_000),
            idles: RefCell::new(Vec::new()),
            interrupt_on_idle: Cell::new(None),
        }
    }
}

impl Platform for FakePlatform {
    fn now(&self) -> Instant {
        Instant(self.now.get())
    }

    fn idle(&self, deadline: Option<Instant>) {
        self.idles.borrow_mut().push(deadline);
        assert!(self.idles.borrow().len() < 100, "executor keeps idling");
        if let Some(signal) = self.interrupt_on_idle.take() {
            // The interrupt arrives while halted.
            signal.raise();
            return;
        }
        match deadline {
            Some(deadline) => self.now.set(self.now.get().max(deadline.0)),
            None => panic!("idle without a deadline and no interrupt coming: hang"),
        }
    }
}

#[test]
fn kernel_executor_idles_until_the_next_deadline() {
    let executor = Executor::new(FakePlatform::new());
    let h = executor.handle();
    let h2 = h.clone();
    let done_at = executor.run_until(async move {
        let helper = h.spawn("helper", async move {
            h2.sleep(Duration::from_micros(5)).await;
            h2.now()
        });
        h.sleep(Duration::from_micros(10)).await;
        let helper_done = helper.await;
        h.sleep(Duration::from_micros(3)).await;
        (helper_done, h.now())
    });
    assert_eq!(done_at, (Instant(6_000), Instant(14_000)));
    assert_eq!(
        *executor.platform().idles.borrow(),
        vec![
            Some(Instant(6_000)),
            Some(Instant(11_000)),
            Some(Instant(14_000))
        ]
    );
}

#[test]
fn kernel_executor_polls_in_spawn_order() {
    let executor = Executor::new(FakePlatform::new());
    let h = executor.handle();
    let order = Rc::new(RefCell::new(Vec::new()));
    let order2 = order.clone();
    executor.run_until(async move {
        let tasks: Vec<_> = (0..5)
            .map(|i| {
                let order3 = order2.clone();
                h.spawn("fifo", async move { order3.borrow_mut().push(i) })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
    assert_eq!(*order.borrow(), vec![0, 1, 2, 3, 4]);
    assert!(
        executor.platform().idles.borrow().is_empty(),
        "never idle with work ready"
    );
}

#[test]
fn kernel_executor_idles_without_deadline_until_an_interrupt() {
    static SIG: IrqSignal = IrqSignal::named("fake hpet");
    let executor = Executor::new(FakePlatform::new());
    executor.platform().interrupt_on_idle.set(Some(&SIG));
    executor.run_until(SIG.wait());
    assert_eq!(*executor.platform().idles.borrow(), vec![None]);
    assert!(!SIG.is_pending());
}

#[test]
fn kernel_executor_keeps_tasks_between_runs() {
    let executor = Executor::new(FakePlatform::new());
    let h = executor.handle();
    let h2 = h.clone();
    let background = Rc::new(Cell::new(0));
    let background2 = background.clone();
    h.spawn("ticker", async move {
        loop {
            h2.sleep(Duration::from_micros(1)).await;
            background2.set(background2.get() + 1);
        }
    });
    let h3 = h.clone();
    executor.run_until(async move { h3.sleep(Duration::from_micros(3)).await });
    let after_first = background.get();
    assert!(after_first >= 2, "{after_first}");
    executor.run_until(async move { h.sleep(Duration::from_micros(3)).await });
    assert!(background.get() > after_first);
}
