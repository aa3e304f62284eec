//! VMBus guest scenarios against the emulated Hyper-V host, under the deterministic
//! scheduler. Each failing seed prints the command that replays it.

mod support;

use hvemu::{ChannelSel, Faults, HostConfig};
use hvnet_runtime::sim::{Config, SimError, Simulation};
use hvnet_runtime::testing::check_seeds;
use hvnet_vmbus::bus::VmBusConfig;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const NICS: u32 = 4;
const SUBCHANNELS: u16 = 8;

fn sim(seed: u64) -> Simulation {
    Simulation::with_config(seed, Config { max_virtual_time: std::time::Duration::from_secs(600), ..Config::default() })
}

/// Asserts the host saw no protocol violation and returns a short summary.
fn assert_clean_host(w: &World) {
    let host = w.host.borrow();
    let v = host.violations();
    assert!(v.is_empty(), "host recorded protocol violations: {v:#?}");
    let mv = w.memory.violations();
    assert!(mv.is_empty(), "guest-memory violations: {mv:#?}");
}

/// 1. Four NICs with eight sub-channels each hot-added at the same instant all come up.
#[test]
fn four_multiqueue_nics_hot_added_at_once_all_come_up() {
    check_seeds(1000, |seed| {
        let sim = sim(seed);
        let w = world(&sim.handle(), host_config(seed), VmBusConfig::default(), seed);
        let (bus, up, rtnl) = (w.bus.clone(), w.up.clone(), w.rtnl.clone());
        let host = w.host.clone();
        sim.run(async move {
            bus.connect().await.map_err(|e| format!("connect: {e:?}"))?;
            for n in 0..NICS {
                add_nic_raw(&host, n, SUBCHANNELS);
            }
            up.acquire(NICS as usize).await;
            bus.settle().await;
            let names = rtnl.lock().await.clone();
            if names.len() != NICS as usize {
                return Err(format!("{} interfaces registered", names.len()));
            }
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())??;
        let host = w.host.borrow();
        let open = host.channels().iter().filter(|c| c.opens == 1).count();
        assert_eq!(open, (NICS as usize) * (1 + SUBCHANNELS as usize), "every channel opened exactly once");
        drop(host);
        assert_clean_host(&w);
        Ok::<_, String>(())
    });
}

fn add_nic_raw(host: &std::rc::Rc<std::cell::RefCell<hvemu::VmbusHost>>, n: u32, max: u16) -> hvemu::DeviceId {
    let spec = hvemu::DeviceSpec::new(class_bytes(), instance_bytes(n), Box::new(hvemu::SubchannelTestDevice::new(max)));
    host.borrow_mut().add_device(spec)
}

/// 2. Negative control: with one worker for both kinds of offers (Linux before the fix),
/// the watchdog reports the deadlock and names the waiting tasks.
#[test]
fn single_worker_configuration_deadlocks_and_the_watchdog_says_so() {
    for seed in 0..20 {
        let sim = sim(seed);
        let config = VmBusConfig { single_worker: true, ..VmBusConfig::default() };
        let w = world(&sim.handle(), host_config(seed), config, seed);
        let (bus, up, host) = (w.bus.clone(), w.up.clone(), w.host.clone());
        let result = sim.run(async move {
            bus.connect().await.expect("connect");
            for n in 0..NICS {
                add_nic_raw(&host, n, SUBCHANNELS);
            }
            up.acquire(NICS as usize).await;
        });
        match result {
            Err(SimError::Deadlock { report, .. }) => {
                let text = report.to_string();
                assert!(text.contains("rtnl"), "seed {seed}: report does not name the config lock:\n{text}");
                assert!(text.contains("probe relid"), "seed {seed}: report does not name the probe:\n{text}");
                assert!(text.contains("sub-channels opened"), "seed {seed}: report lacks the probe's wait:\n{text}");
                if seed == 0 {
                    println!("negative control, seed 0:\n{text}");
                }
            }
            Err(other) => panic!("seed {seed}: expected a deadlock, got {other}"),
            Ok(()) => panic!("seed {seed}: single-worker configuration did not deadlock"),
        }
    }
}
