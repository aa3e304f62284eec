//! Worker: strict order, one item at a time, flush, stop.

use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;

use crate::sim::{SimError, Simulation};
use crate::testing::check_seeds;
use crate::{Handle, Worker, WorkerStopped};

/// Items that sleep and yield a random amount while recording how many items are in
/// flight; some are queued from other tasks while the worker is busy.
#[test]
fn items_run_in_queue_order_one_at_a_time() {
    check_seeds(200, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        let order = Rc::new(RefCell::new(Vec::new()));
        let in_flight = Rc::new(Cell::new(0u32));
        let max_in_flight = Rc::new(Cell::new(0u32));
        let (order2, in_flight2, max2) = (order.clone(), in_flight.clone(), max_in_flight.clone());
        sim.run(async move {
            let worker = Worker::new(&h, "ordered");
            let queue_item = move |h: &Handle, worker: &Worker, i: u32| {
                let (h2, order, in_flight, max) =
                    (h.clone(), order2.clone(), in_flight2.clone(), max2.clone());
                worker
                    .queue(format!("item{i}"), async move {
                        in_flight.set(in_flight.get() + 1);
                        max.set(max.get().max(in_flight.get()));
                        for _ in 0..h2.random_below(3) {
                            h2.yield_now().await;
                        }
                        h2.sleep(Duration::from_micros(h2.random_below(50))).await;
                        order.borrow_mut().push(i);
                        in_flight.set(in_flight.get() - 1);
                    })
                    .unwrap();
            };
            for i in 0..10 {
                queue_item(&h, &worker, i);
            }
            // More items from another task while the first ones run.
            let (h2, w2, q2) = (h.clone(), worker.clone(), queue_item.clone());
            h.spawn("queuer", async move {
                h2.sleep(Duration::from_micros(20)).await;
                for i in 10..20 {
                    q2(&h2, &w2, i);
                }
            })
            .await;
            worker.flush().await;
            assert!(worker.is_idle());
        })?;
        assert_eq!(*order.borrow(), (0..20).collect::<Vec<_>>());
        assert_eq!(max_in_flight.get(), 1, "two items ran at once");
        assert_eq!(in_flight.get(), 0);
        Ok::<_, SimError>(())
    });
}

#[test]
fn flush_waits_for_items_queued_before_it_only() {
    check_seeds(50, |seed| {
        let sim = Simulation::new(seed);
        let h = sim.handle();
        sim.run(async move {
            let worker = Worker::new(&h, "flushme");
            let done = Rc::new(Cell::new(0));
            for _ in 0..3 {
                let (h2, d) = (h.clone(), done.clone());
                worker
                    .queue("slow", async move {
                        h2.sleep(Duration::from_millis(1)).await;
                        d.set(d.get() + 1);
                    })
                    .unwrap();
            }
            let flush = worker.flush();
            let (h2, d) = (h.clone(), done.clone());
            worker
                .queue("later", async move {
                    h2.sleep(Duration::from_secs(1)).await;
                    d.set(d.get() + 100);
                })
                .unwrap();
            flush.await;
            assert_eq!(done.get(), 3);
            assert!(
                h.now().as_nanos() < 1_000_000_000,
                "flush waited for the later item"
            );
            assert_eq!(worker.running().as_deref(), Some("later"));
            worker.flush().await;
            assert_eq!(done.get(), 103);
        })?;
        Ok::<_, SimError>(())
    });
}

#[test]
fn stop_drains_the_queue_then_refuses_items() {
    let sim = Simulation::new(31);
    let h = sim.handle();
    sim.run(async move {
        let worker = Worker::new(&h, "stopping");
        let ran = Rc::new(Cell::new(0));
        for _ in 0..3 {
            let r = ran.clone();
            worker
                .queue("before stop", async move { r.set(r.get() + 1) })
                .unwrap();
        }
        worker.stop();
        assert_eq!(
            worker.queue("after stop", async {}),
            Err(WorkerStopped {
                worker: "stopping".into()
            })
        );
        worker.flush().await;
        assert_eq!(ran.get(), 3);
        while !worker.has_exited() {
            h.yield_now().await;
        }
        // Only main is left: the worker task has finished.
        assert_eq!(h.task_count(), 1);
    })
    .unwrap();
}

#[test]
fn two_workers_run_concurrently() {
    let sim = Simulation::new(32);
    let h = sim.handle();
    sim.run(async move {
        let a = Worker::new(&h, "a");
        let b = Worker::new(&h, "b");
        let start = h.now();
        for worker in [&a, &b] {
            let h2 = h.clone();
            worker
                .queue(
                    "sleep",
                    async move { h2.sleep(Duration::from_millis(10)).await },
                )
                .unwrap();
        }
        a.flush().await;
        b.flush().await;
        let took = h.now().saturating_duration_since(start);
        assert!(took < Duration::from_millis(11), "{took:?}");
    })
    .unwrap();
}
