//! The deadlock DESIGN.md is built around, modelled with runtime primitives only.
//!
//! K NICs are hot-plugged at once. Each NIC's probe is queued on a worker; it takes the
//! config lock and, still holding it, waits until its M sub-channels are open. The
//! sub-channel openings are work items queued after all the probes (their offers arrive
//! later), and never take the lock. A configuration change ("dhcp") also wants the lock.
//!
//! - Probes on `primary`, sub-channels on `subchannel`: every schedule completes.
//! - One worker for both (the old Linux code): the first probe waits for items stuck
//!   behind it in its own queue while holding the lock, and everything stops. The
//!   simulation must say so, naming the tasks, the lock and its holder.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::time::Duration;

use crate::sim::{SimError, Simulation};
use crate::sync::Semaphore;
use crate::testing::check_seeds;
use crate::{ConfigLock, Handle, Worker};

const NICS: usize = 3;
const SUBCHANNELS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Design {
    /// The design: two workers, sub-channel items never take the lock.
    TwoWorkers,
    /// The old Linux code: one ordered queue for everything.
    OneWorker,
    /// Two workers, but a sub-channel item takes the config lock (breaking the rule).
    SubchannelTakesLock,
}

/// Runs the hot-plug; returns the interface table built under the config lock.
async fn hot_plug(h: Handle, design: Design) -> Vec<String> {
    let split_workers = design != Design::OneWorker;
    let config = Rc::new(ConfigLock::new("rtnl", Vec::<String>::new()));
    let primary = Worker::new(&h, "primary");
    let subchannel = if split_workers {
        Worker::new(&h, "subchannel")
    } else {
        primary.clone()
    };
    let opened: Vec<Semaphore> = (0..NICS)
        .map(|nic| Semaphore::named(format!("sub-channels of nic{nic}"), 0))
        .collect();

    for (nic, opened) in opened.iter().enumerate() {
        let (h, config, opened) = (h.clone(), config.clone(), opened.clone());
        primary
            .queue(format!("probe:nic{nic}"), async move {
                let mut table = config.lock().await;
                // Open the primary channel, negotiate: some host round trips.
                h.sleep(Duration::from_micros(10 + h.random_below(40)))
                    .await;
                h.waiting_on(
                    format!("nic{nic} sub-channels ({SUBCHANNELS} requested)"),
                    opened.acquire(SUBCHANNELS),
                )
                .await;
                table.push(format!("nic{nic}"));
            })
            .unwrap();
    }
    for (nic, opened) in opened.iter().enumerate() {
        for sub in 1..=SUBCHANNELS {
            let (h, opened, config) = (h.clone(), opened.clone(), config.clone());
            subchannel
                .queue(format!("subchannel:nic{nic}/{sub}"), async move {
                    h.sleep(Duration::from_micros(h.random_below(20))).await;
                    if design == Design::SubchannelTakesLock {
                        config.lock().await.push(format!("nic{nic} queue {sub}"));
                    }
                    opened.release(1);
                })
                .unwrap();
        }
    }
    // A configuration change arriving while the probes run.
    let (h2, config2) = (h.clone(), config.clone());
    let dhcp = h.spawn("dhcp:lease", async move {
        h2.sleep(Duration::from_millis(1)).await;
        config2.lock().await.push(String::from("lease"));
    });

    primary.flush().await;
    subchannel.flush().await;
    dhcp.await;
    let table = config.lock().await.clone();
    table
}

#[test]
fn two_workers_never_deadlock() {
    check_seeds(1000, |seed| {
        let sim = Simulation::new(seed);
        let table = sim.run(hot_plug(sim.handle(), Design::TwoWorkers))?;
        let mut nics: Vec<&str> = table
            .iter()
            .map(String::as_str)
            .filter(|name| *name != "lease")
            .collect();
        nics.sort_unstable();
        assert_eq!(nics, ["nic0", "nic1", "nic2"], "seed {seed}");
        assert!(table.iter().any(|name| name == "lease"));
        Ok::<_, SimError>(())
    });
}

#[test]
fn one_worker_deadlocks_and_says_why() {
    check_seeds(100, |seed| {
        let sim = Simulation::new(seed);
        let err = match sim.run(hot_plug(sim.handle(), Design::OneWorker)) {
            Ok(table) => return Err(format!("completed with one worker: {table:?}")),
            Err(err) => err,
        };
        let SimError::Deadlock { report, .. } = &err else {
            return Err(format!("expected a deadlock, got {err}"));
        };
        let text = err.to_string();
        let expect = |needle: &str| {
            if text.contains(needle) {
                Ok(())
            } else {
                Err(format!("report lacks {needle:?}:\n{text}"))
            }
        };
        // Probes run in queue order, so nic0's probe is the one stuck holding the lock.
        expect(&format!("(seed {seed})"))?;
        expect(
            "probe:nic0 on worker:primary waits on nic0 sub-channels (4 requested); \
             semaphore 'sub-channels of nic0' (0 available, first waiter needs 4); \
             holds config lock 'rtnl'",
        )?;
        expect("dhcp:lease waits on config lock 'rtnl' held by probe:nic0 on worker:primary")?;
        expect("main waits on flush of worker primary")?;
        expect(
            "worker primary: running probe:nic0; queued behind it: probe:nic1, probe:nic2, \
             subchannel:nic0/1",
        )?;
        if report.tasks.iter().any(|task| task.ready) {
            return Err(format!("a deadlock with a ready task:\n{text}"));
        }
        Ok(())
    });
}

/// The other half of the rule: with two workers, a sub-channel item that takes the
/// config lock deadlocks against the probe that holds it. The simulation finds it.
#[test]
fn subchannel_item_taking_the_lock_deadlocks() {
    let mut deadlocks = 0;
    for seed in 0..100 {
        let sim = Simulation::new(seed);
        match sim.run(hot_plug(sim.handle(), Design::SubchannelTakesLock)) {
            Ok(_) => {}
            Err(err) => {
                assert!(err.is_deadlock(), "{err}");
                let text = err.to_string();
                assert!(
                    text.contains(
                        "on worker:subchannel waits on config lock 'rtnl' held by probe:nic"
                    ),
                    "{text}"
                );
                deadlocks += 1;
            }
        }
    }
    assert!(deadlocks >= 90, "only {deadlocks} of 100 seeds deadlocked");
}
