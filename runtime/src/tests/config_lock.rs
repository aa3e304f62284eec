//! ConfigLock: mutual exclusion, FIFO hand-off, holder names, cancellation.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::future::{poll_fn, Future};
use core::pin::Pin;
use core::task::Poll;
use core::time::Duration;

use crate::sim::{SimError, Simulation};
use crate::sync::Event;
use crate::testing::check_seeds;
use crate::ConfigLock;

#[test]
fn mutual_exclusion_under_many_schedules() {
    check_seeds(300, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let lock = Rc::new(ConfigLock::new("rtnl", Vec::<u32>::new()));
        let inside = Rc::new(Cell::new(0u32));
        let lock2 = lock.clone();
        sim.run(async move {
            let mut tasks = Vec::new();
            for i in 0..6u32 {
                let (h2, lock, inside) = (h.clone(), lock2.clone(), inside.clone());
                tasks.push(h.spawn(format!("changer{i}"), async move {
                    for round in 0..3 {
                        let mut config = lock.lock().await;
                        inside.set(inside.get() + 1);
                        assert_eq!(inside.get(), 1, "two holders at once");
                        // Read-modify-write across await points.
                        let before = config.len();
                        if h2.random_below(2) == 0 {
                            h2.yield_now().await;
                        } else {
                            h2.sleep(Duration::from_micros(h2.random_below(30))).await;
                        }
                        assert_eq!(config.len(), before);
                        config.push(i * 10 + round);
                        inside.set(inside.get() - 1);
                    }
                }));
            }
            for task in tasks {
                task.await;
            }
        })?;
        let values = lock.try_lock().expect("free at the end").clone();
        assert_eq!(values.len(), 18);
        Ok::<_, SimError>(())
    });
}

/// Tasks queue for a held lock in a seed-dependent order; they must get it in exactly
/// that order, including a task that unlocks and immediately relocks (no barging).
#[test]
fn fifo_hand_off_in_arrival_order() {
    check_seeds(300, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let arrivals = Rc::new(RefCell::new(Vec::new()));
        let acquisitions = Rc::new(RefCell::new(Vec::new()));
        let (arrivals2, acquisitions2) = (arrivals.clone(), acquisitions.clone());
        sim.run(async move {
            let lock = Rc::new(ConfigLock::new("rtnl", ()));
            let guard = lock.lock().await;
            let mut tasks = Vec::new();
            for i in 0..6u32 {
                let (h2, lock, arr, acq) = (
                    h.clone(),
                    lock.clone(),
                    arrivals2.clone(),
                    acquisitions2.clone(),
                );
                tasks.push(h.spawn(format!("waiter{i}"), async move {
                    for _ in 0..h2.random_below(4) {
                        h2.yield_now().await;
                    }
                    for _ in 0..2 {
                        // The lock future queues on its first poll, right after this push.
                        arr.borrow_mut().push(i);
                        let _g = lock.lock().await;
                        acq.borrow_mut().push(i);
                    }
                }));
            }
            while lock.waiters() < 6 {
                h.yield_now().await;
            }
            drop(guard);
            for task in tasks {
                task.await;
            }
        })?;
        assert_eq!(acquisitions.borrow().len(), 12);
        assert_eq!(*acquisitions.borrow(), *arrivals.borrow());
        Ok::<_, SimError>(())
    });
}

#[test]
fn holder_name_is_recorded_and_cleared() {
    let sim = Simulation::new(41);
    let h = sim.handle();
    sim.run(async move {
        let lock = Rc::new(ConfigLock::new("rtnl", 0u32));
        assert_eq!(lock.holder(), None);
        let (lock2, h2) = (lock.clone(), h.clone());
        let seen = h
            .spawn("probe:nic1", async move {
                let mut g = lock2.lock().await;
                *g += 1;
                h2.sleep(Duration::from_millis(1)).await;
                lock2.holder()
            })
            .await;
        assert_eq!(seen.as_deref(), Some("probe:nic1"));
        assert_eq!(lock.holder(), None);
        assert!(!lock.is_locked());
        let g = lock.try_lock().unwrap();
        assert_eq!(*g, 1);
        assert_eq!(lock.holder().as_deref(), Some("main"));
        assert!(lock.try_lock().is_none(), "held");
    })
    .unwrap();
}

/// A waiter granted the lock but dropped before it noticed passes it to the next one.
#[test]
fn cancelled_waiter_passes_the_lock_on() {
    let sim = Simulation::new(42);
    let h = sim.handle();
    sim.run(async move {
        let lock = Rc::new(ConfigLock::new("rtnl", String::new()));
        let drop_now = Rc::new(Event::named("drop now"));
        let guard = lock.lock().await;
        let (l, d) = (lock.clone(), drop_now.clone());
        let quitter = h.spawn("quitter", async move {
            let mut waiting = l.lock();
            poll_fn(|cx| {
                assert!(Pin::new(&mut waiting).poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            d.wait().await;
            drop(waiting);
        });
        while lock.waiters() < 1 {
            h.yield_now().await;
        }
        let l = lock.clone();
        let next = h.spawn("next", async move {
            l.lock().await.push_str("next had it");
        });
        while lock.waiters() < 2 {
            h.yield_now().await;
        }
        drop(guard);
        // Handed to the quitter, which now drops its request without using it.
        assert_eq!(lock.holder().as_deref(), Some("quitter"));
        drop_now.set();
        quitter.await;
        h.timeout(Duration::from_millis(1), next)
            .await
            .expect("lock passed on");
        assert_eq!(*lock.try_lock().unwrap(), "next had it");
    })
    .unwrap();
}

#[test]
fn lock_wait_can_time_out() {
    let sim = Simulation::new(43);
    let h = sim.handle();
    sim.run(async move {
        let lock = ConfigLock::new("rtnl", ());
        let _g = lock.lock().await;
        assert!(h
            .timeout(Duration::from_millis(1), lock.lock())
            .await
            .is_err());
        assert_eq!(lock.waiters(), 0, "the timed-out waiter left the queue");
    })
    .unwrap();
}
