//! Same seed, same schedule; different seeds, different schedules.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::time::Duration;

use super::traced;
use crate::sim::Pick;
use crate::Worker;

/// Six tasks that yield and sleep a random amount between recording their id: the
/// finishing order depends entirely on the scheduler and the handle's RNG.
fn racy(seed: u64) -> (Vec<u32>, Vec<Pick>, u64) {
    let sim = traced(seed);
    let h = sim.handle();
    let order = Rc::new(RefCell::new(Vec::new()));
    let order2 = order.clone();
    sim.run(async move {
        let worker = Worker::new(&h, "side");
        let mut tasks = Vec::new();
        for i in 0..6u32 {
            let (h2, order) = (h.clone(), order2.clone());
            tasks.push(h.spawn(format!("racer{i}"), async move {
                for _ in 0..3 {
                    h2.yield_now().await;
                    order.borrow_mut().push(i);
                }
                h2.sleep(Duration::from_micros(h2.random_below(10))).await;
                order.borrow_mut().push(i + 100);
            }));
            let (h2, order) = (h.clone(), order2.clone());
            worker
                .queue(format!("side{i}"), async move {
                    h2.yield_now().await;
                    order.borrow_mut().push(i + 200);
                })
                .unwrap();
        }
        for task in tasks {
            task.await;
        }
        worker.flush().await;
    })
    .unwrap();
    let order = order.borrow().clone();
    (order, sim.trace(), sim.fingerprint())
}

#[test]
fn same_seed_gives_identical_trace_and_results() {
    for seed in [0, 1, 7, 0xdead_beef] {
        let (order_a, trace_a, print_a) = racy(seed);
        let (order_b, trace_b, print_b) = racy(seed);
        assert!(!trace_a.is_empty());
        assert_eq!(trace_a, trace_b, "seed {seed}: traces differ");
        assert_eq!(order_a, order_b, "seed {seed}: results differ");
        assert_eq!(print_a, print_b);
    }
}

#[test]
fn different_seeds_give_different_schedules() {
    let runs: Vec<_> = (0..20).map(racy).collect();
    let orders: BTreeSet<&Vec<u32>> = runs.iter().map(|(order, _, _)| order).collect();
    let prints: BTreeSet<u64> = runs.iter().map(|(_, _, print)| *print).collect();
    assert!(
        orders.len() >= 15,
        "only {} distinct orders in 20 seeds",
        orders.len()
    );
    assert_eq!(prints.len(), 20, "two seeds produced the same schedule");
    // And specifically the first two seeds.
    assert_ne!(runs[0].1, runs[1].1);
}

#[test]
fn trace_records_each_pick_with_its_choice_count() {
    let (_, trace, _) = racy(3);
    for (i, pick) in trace.iter().enumerate() {
        assert_eq!(pick.step, i as u64 + 1);
        assert!(pick.ready >= 1);
        assert!(!pick.name.is_empty());
    }
    assert!(
        trace.iter().any(|pick| pick.ready > 1),
        "never a choice to make"
    );
    assert!(
        trace.windows(2).all(|w| w[0].time <= w[1].time),
        "time went backwards"
    );
}

/// No timers and no handle randomness: only the scheduler's picks can change the order.
fn yields_only(seed: u64) -> Vec<u32> {
    let sim = crate::sim::Simulation::new(seed);
    let h = sim.handle();
    let order = Rc::new(RefCell::new(Vec::new()));
    let order2 = order.clone();
    sim.run(async move {
        let tasks: Vec<_> = (0..5u32)
            .map(|i| {
                let (h2, order) = (h.clone(), order2.clone());
                h.spawn("yielder", async move {
                    for _ in 0..2 {
                        order.borrow_mut().push(i);
                        h2.yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    })
    .unwrap();
    let order = order.borrow().clone();
    order
}

#[test]
fn the_seeded_pick_alone_changes_the_order() {
    let orders: BTreeSet<Vec<u32>> = (0..20).map(yields_only).collect();
    assert!(
        orders.len() >= 15,
        "only {} distinct orders in 20 seeds",
        orders.len()
    );
    assert_eq!(yields_only(9), yields_only(9));
}
