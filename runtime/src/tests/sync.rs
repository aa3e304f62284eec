//! Event, WaitQueue and Semaphore.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::future::{poll_fn, Future};
use core::pin::Pin;
use core::task::Poll;
use core::time::Duration;

use crate::sim::{SimError, Simulation};
use crate::sync::{Event, Semaphore, WaitQueue};
use crate::testing::check_seeds;
use crate::Elapsed;

const MS: Duration = Duration::from_millis(1);

#[test]
fn event_wakes_every_waiter_and_stays_set_until_reset() {
    check_seeds(30, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let event = Rc::new(Event::named("link up"));
        let woken = Rc::new(Cell::new(0));
        let (event2, woken2) = (event.clone(), woken.clone());
        sim.run(async move {
            let waiters: Vec<_> = (0..4)
                .map(|_| {
                    let (e, w) = (event2.clone(), woken2.clone());
                    h.spawn("waiter", async move {
                        e.wait().await;
                        w.set(w.get() + 1);
                    })
                })
                .collect();
            h.sleep(MS).await;
            assert_eq!(woken2.get(), 0);
            event2.set();
            for waiter in waiters {
                waiter.await;
            }
            // Still set: a late waiter passes at once.
            event2.wait().await;
            event2.reset();
            assert_eq!(h.timeout(MS, event2.wait()).await, Err(Elapsed));
        })?;
        assert_eq!(woken.get(), 4);
        assert!(!event.is_set());
        Ok::<_, SimError>(())
    });
}

#[test]
fn wait_queue_wakes_in_fifo_order_and_passes_on_cancelled_wakes() {
    let sim = Simulation::new(21);
    let h = sim.handle();
    let order = Rc::new(RefCell::new(Vec::new()));
    let order2 = order.clone();
    sim.run(async move {
        let queue = Rc::new(WaitQueue::named("ring space"));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (q, o) = (queue.clone(), order2.clone());
            tasks.push(h.spawn("waiter", async move {
                q.wait().await;
                o.borrow_mut().push(i);
            }));
            // Let it queue before the next one, fixing the arrival order.
            while queue.waiting() < i + 1 {
                h.yield_now().await;
            }
        }
        assert!(queue.wake_one());
        h.sleep(MS).await;
        assert_eq!(*order2.borrow(), vec![0]);
        assert_eq!(queue.wake_all(), 2);
        for task in tasks {
            task.await;
        }
        assert!(!queue.wake_one(), "nobody left");

        // A waiter that was woken but dropped before it saw the wake passes it on.
        let drop_now = Rc::new(Event::named("drop now"));
        let (q, d) = (queue.clone(), drop_now.clone());
        let cancelled = h.spawn("cancelled", async move {
            let mut wait = q.wait();
            // Queue the wait with one poll, then stop polling it.
            poll_fn(|cx| {
                assert!(Pin::new(&mut wait).poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            d.wait().await;
            drop(wait);
        });
        while queue.waiting() < 1 {
            h.yield_now().await;
        }
        let (q, o) = (queue.clone(), order2.clone());
        let next = h.spawn("next", async move {
            q.wait().await;
            o.borrow_mut().push(10);
        });
        while queue.waiting() < 2 {
            h.yield_now().await;
        }
        assert!(queue.wake_one(), "wakes 'cancelled', first in line");
        drop_now.set();
        cancelled.await;
        h.timeout(10 * MS, next)
            .await
            .expect("the wake was passed on");
        assert_eq!(order2.borrow().last(), Some(&10));
    })
    .unwrap();
}

#[test]
fn wait_until_rechecks_the_condition() {
    let sim = Simulation::new(22);
    let h = sim.handle();
    sim.run(async move {
        let queue = Rc::new(WaitQueue::new());
        let count = Rc::new(Cell::new(0));
        let (q, c, h2) = (queue.clone(), count.clone(), h.clone());
        h.spawn("producer", async move {
            for _ in 0..5 {
                h2.sleep(MS).await;
                c.set(c.get() + 1);
                q.wake_all();
            }
        });
        queue.wait_until(|| count.get() >= 3).await;
        assert_eq!(count.get(), 3);
    })
    .unwrap();
}

#[test]
fn semaphore_waits_for_k_releases() {
    check_seeds(50, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        sim.run(async move {
            let opened = Semaphore::named("sub-channels of nic1", 0);
            for i in 0..4u64 {
                let (s, h2) = (opened.clone(), h.clone());
                h.spawn("subchannel", async move {
                    h2.sleep(Duration::from_micros(100 * (i + 1))).await;
                    s.release(1);
                });
            }
            let start = h.now();
            opened.acquire(4).await;
            assert!(h.now().saturating_duration_since(start) >= Duration::from_micros(400));
            assert_eq!(opened.available(), 0);
        })?;
        Ok::<_, SimError>(())
    });
}

#[test]
fn semaphore_serves_waiters_in_order() {
    let sim = Simulation::new(23);
    let h = sim.handle();
    let order = Rc::new(RefCell::new(Vec::new()));
    let order2 = order.clone();
    sim.run(async move {
        let sem = Semaphore::new(0);
        let mut tasks = Vec::new();
        // A big request first, then small ones: the small ones must not overtake it.
        for (i, want) in [3usize, 1, 1].into_iter().enumerate() {
            let (s, o) = (sem.clone(), order2.clone());
            tasks.push(h.spawn("acquirer", async move {
                s.acquire(want).await;
                o.borrow_mut().push(i);
            }));
            h.sleep(MS).await;
        }
        sem.release(1);
        h.sleep(MS).await;
        assert!(
            order2.borrow().is_empty(),
            "a small waiter overtook the big one"
        );
        assert!(!sem.try_acquire(1), "try_acquire must not jump the queue");
        sem.release(2);
        h.sleep(MS).await;
        assert_eq!(*order2.borrow(), vec![0]);
        sem.release(1);
        h.sleep(MS).await;
        assert_eq!(*order2.borrow(), vec![0, 1]);
        sem.release(1);
        for task in tasks {
            task.await;
        }
        assert_eq!(sem.available(), 0);
    })
    .unwrap();
    assert_eq!(*order.borrow(), vec![0, 1, 2]);
}

#[test]
fn cancelled_acquire_returns_its_permits() {
    let sim = Simulation::new(24);
    let h = sim.handle();
    sim.run(async move {
        let sem = Semaphore::new(1);
        assert_eq!(h.timeout(MS, sem.acquire(2)).await, Err(Elapsed));
        assert_eq!(sem.available(), 1);
        assert!(sem.try_acquire(1));
    })
    .unwrap();
}
