//! VMBus guest scenarios against the emulated Hyper-V host, under the deterministic
//! scheduler. Each failing seed prints the command that replays it.

mod support;

use hvemu::{ChannelSel, Faults};
use hvnet_runtime::sim::{Config, SimError, Simulation};
use hvnet_runtime::testing::check_seeds;
use hvnet_vmbus::bus::VmBusConfig;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const NICS: u32 = 4;
const SUBCHANNELS: u16 = 8;

fn sim(seed: u64) -> Simulation {
    Simulation::with_config(
        seed,
        Config {
            max_virtual_time: std::time::Duration::from_secs(600),
            ..Config::default()
        },
    )
}

/// A world with the default host and bus configuration for `seed`.
fn default_world(sim: &Simulation, seed: u64) -> World {
    world(
        &sim.handle(),
        host_config(seed),
        VmBusConfig::default(),
        seed,
    )
}

/// Asserts the host saw no protocol violation and returns a short summary.
fn assert_clean_host(w: &World) {
    assert_host_clean(&w.host, &w.memory);
}

/// Scenario 1: Four NICs with eight sub-channels each hot-added at the same instant all come up.
#[test]
fn four_multiqueue_nics_hot_added_at_once_all_come_up() {
    check_seeds(1000, |seed| {
        let sim = sim(seed);
        let w = default_world(&sim, seed);
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
        assert_eq!(
            open,
            (NICS as usize) * (1 + SUBCHANNELS as usize),
            "every channel opened exactly once"
        );
        drop(host);
        assert_clean_host(&w);
        Ok::<_, String>(())
    });
}

fn add_nic_raw(
    host: &std::rc::Rc<std::cell::RefCell<hvemu::VmbusHost>>,
    n: u32,
    max: u16,
) -> hvemu::DeviceId {
    let spec = hvemu::DeviceSpec::new(
        class_bytes(),
        instance_bytes(n),
        Box::new(hvemu::SubchannelTestDevice::new(max)),
    );
    host.borrow_mut().add_device(spec)
}

/// Scenario 2: Negative control: with one worker for both kinds of offers (Linux before the fix),
/// the watchdog reports the deadlock and names the waiting tasks.
#[test]
fn single_worker_configuration_deadlocks_and_the_watchdog_says_so() {
    for seed in 0..20 {
        let sim = sim(seed);
        let config = VmBusConfig {
            single_worker: true,
            ..VmBusConfig::default()
        };
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
                assert!(
                    text.contains("rtnl"),
                    "seed {seed}: report does not name the config lock:\n{text}"
                );
                assert!(
                    text.contains("probe relid"),
                    "seed {seed}: report does not name the probe:\n{text}"
                );
                assert!(
                    text.contains("sub-channels opened"),
                    "seed {seed}: report lacks the probe's wait:\n{text}"
                );
                if seed == 0 {
                    println!("negative control, seed 0:\n{text}");
                }
            }
            Err(other) => panic!("seed {seed}: expected a deadlock, got {other}"),
            Ok(()) => panic!("seed {seed}: single-worker configuration did not deadlock"),
        }
    }
}

/// Waits (in virtual time) until the guest holds no channel and both workers are idle.
async fn until_all_released(
    w_bus: &hvnet_vmbus::bus::VmBus,
    handle: &hvnet_runtime::Handle,
) -> Result<(), String> {
    for _ in 0..20_000 {
        w_bus.settle().await;
        if w_bus.live_relids().is_empty() {
            return Ok(());
        }
        handle.sleep(std::time::Duration::from_millis(1)).await;
    }
    Err(format!(
        "channels never released: {:?}",
        w_bus.live_relids()
    ))
}

/// Lets the guest consume everything the host queued and both workers finish.
async fn quiesce(
    bus: &hvnet_vmbus::bus::VmBus,
    host: &std::rc::Rc<std::cell::RefCell<hvemu::VmbusHost>>,
    handle: &hvnet_runtime::Handle,
) {
    // No `settle` here: a probe may legitimately be stuck (an open the host never
    // answers) until the rescind that the caller is about to inject.
    let _ = bus;
    for _ in 0..10_000 {
        handle.sleep(std::time::Duration::from_millis(1)).await;
        if host_scope(|| host.borrow().pending_messages() == 0 && !host.borrow().events_pending()) {
            handle.sleep(std::time::Duration::from_millis(5)).await;
            return;
        }
    }
}

/// Checks everything a removed device must give back.
fn assert_device_fully_released(w: &World, pages_baseline: usize, what: &str) {
    let host = w.host.borrow();
    let stats = host.stats();
    assert_eq!(stats.live_gpadls, 0, "{what}: host still has live GPADLs");
    assert_eq!(
        stats.partial_gpadls, 0,
        "{what}: host still has half-built GPADLs"
    );
    assert!(
        host.channels().is_empty(),
        "{what}: host still has channels: {:?}",
        host.channels()
    );
    for c in host.released_channels() {
        assert_eq!(
            c.relid_released, 1,
            "{what}: relid {} released {} times",
            c.relid, c.relid_released
        );
    }
    drop(host);
    assert_eq!(w.bus.live_gpadls(), 0, "{what}: guest still tracks GPADLs");
    assert_eq!(
        w.memory.live_pages(),
        pages_baseline,
        "{what}: guest pages leaked"
    );
    assert_clean_host(w);
}

/// Eight bring-ups of a 2-queue NIC with `faults`, each followed (if anything is left) by
/// a removal. Asserts no hang, no leaked page or GPADL, no task left behind, exactly one
/// RELID_RELEASED per channel, and a guest heap that stops growing.
const CYCLES: u32 = 8;

fn bring_up_and_remove(seed: u64, faults: Faults, what: &str) {
    let sim = sim(seed);
    let handle = sim.handle();
    let w = default_world(&sim, seed);
    w.driver.want_subchannels.set(2);
    let (bus, host) = (w.bus.clone(), w.host.clone());
    let result = sim.run({
        let handle = handle.clone();
        async move {
            bus.connect().await.map_err(|e| format!("{e:?}"))?;
            let pages_at_connect = hvemu_pages(&host);
            let tasks_at_connect = handle.task_count();
            let mut after = Vec::with_capacity(CYCLES as usize);
            for cycle in 0..CYCLES {
                let instance = instance_bytes(7 + cycle);
                let dev = host_scope(|| add_nic_raw_with(&host, instance, faults));
                quiesce(&bus, &host, &handle).await;
                if host_scope(|| !host.borrow().device_channels(dev).is_empty()) {
                    host_scope(|| host.borrow_mut().remove_device(dev));
                }
                until_all_released(&bus, &handle).await?;
                bus.settle().await;
                // Rescind tasks drop the channel from the table before they finish.
                for _ in 0..1000 {
                    if handle.task_count() <= tasks_at_connect {
                        break;
                    }
                    handle.sleep(std::time::Duration::from_millis(1)).await;
                }
                if handle.task_count() > tasks_at_connect {
                    return Err(format!(
                        "{} tasks never finished: {}",
                        handle.task_count() - tasks_at_connect,
                        handle.report()
                    ));
                }
                after.push((heap_live(), hvemu_pages(&host)));
            }
            Ok::<_, String>((pages_at_connect, after))
        }
    });
    let (pages_at_connect, after) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} (seed {seed}): {e}"),
        Err(e) => panic!("{what}: {e}"),
    };
    assert_eq!(
        after[0].1, pages_at_connect,
        "{what} (seed {seed}): pages leaked by the first cycle"
    );
    assert_device_fully_released(&w, pages_at_connect, what);
    // A leak grows with every cycle; memory freed late (from an earlier cycle) may make a
    // later cycle end lower, which is fine.
    // The heap oscillates by a map node or two between cycles (seen: 2 blocks, 544
    // bytes), but a leak of even one block per cycle adds six over cycles 1..7; cycle 0
    // settles allocator capacities and is not counted.
    let (first, last) = (after[1].0, after[CYCLES as usize - 1].0);
    assert!(
        last.1 - first.1 < 4 && last.0 - first.0 < 1024,
        "{what} (seed {seed}): guest heap keeps growing: {first:?} after cycle 1, {last:?} after cycle {} (bytes, blocks)",
        CYCLES - 1
    );
}

fn hvemu_pages(host: &std::rc::Rc<std::cell::RefCell<hvemu::VmbusHost>>) -> usize {
    host_scope(|| host.borrow().memory().live_pages())
}

fn add_nic_raw_with(
    host: &std::rc::Rc<std::cell::RefCell<hvemu::VmbusHost>>,
    instance: [u8; 16],
    faults: Faults,
) -> hvemu::DeviceId {
    let mut spec = hvemu::DeviceSpec::new(
        class_bytes(),
        instance,
        Box::new(hvemu::SubchannelTestDevice::new(8)),
    );
    spec.faults = faults;
    host.borrow_mut().add_device(spec)
}

/// Scenario 3: Rescind injected at every step of a device's bring-up (GPADL, OPENCHANNEL of the
/// primary and of each sub-channel), before and after the host's reply, and during steady
/// state: no hang, nothing leaked, RELID_RELEASED exactly once per channel.
#[test]
fn rescind_at_every_step_of_bring_up_leaks_nothing() {
    // A 2-queue NIC takes 6 guest messages to come up (GPADL + OPEN for 3 channels);
    // step 9 and beyond fall into steady state (the removal path itself).
    for k in 1..=10 {
        for seed in 0..8 {
            bring_up_and_remove(
                seed,
                Faults::none().rescind_at_step(k),
                &format!("rescind after step {k}"),
            );
            bring_up_and_remove(
                seed,
                Faults::none().rescind_before_step(k),
                &format!("rescind before step {k}"),
            );
        }
    }
}

/// An OPENCHANNEL the host never answers, then a rescind: the waiting open fails at once.
#[test]
fn rescind_wakes_an_open_that_never_gets_its_result() {
    for seed in 0..16 {
        bring_up_and_remove(
            seed,
            Faults::none().never_answer_open(),
            "primary open never answered",
        );
        bring_up_and_remove(
            seed,
            Faults::none().never_answer_open_on(ChannelSel::Subchannels),
            "sub-channel open never answered",
        );
    }
}

/// Steady state: a NIC that is up is removed; its driver's remove runs under the config
/// lock and everything comes back.
#[test]
fn steady_state_removal_leaks_nothing() {
    for seed in 0..16 {
        bring_up_and_remove(seed, Faults::none(), "steady-state removal");
    }
}

/// Scenario 4a: A duplicate primary offer is dropped (and the ghost relid never opened).
#[test]
fn duplicate_primary_offer_is_dropped() {
    for dup in [
        hvemu::DuplicateOffer::SameRelid,
        hvemu::DuplicateOffer::NewRelid,
    ] {
        let sim = sim(1);
        let w = default_world(&sim, 1);
        w.driver.want_subchannels.set(2);
        let (bus, host, up) = (w.bus.clone(), w.host.clone(), w.up.clone());
        sim.run(async move {
            bus.connect().await.unwrap();
            let faults = Faults {
                duplicate_primary_offer: Some(dup),
                ..Faults::none()
            };
            add_nic_raw_with(&host, instance_bytes(1), faults);
            up.acquire(1).await;
            bus.settle().await;
        })
        .unwrap();
        assert_eq!(w.bus.stats().duplicate_offers, 1, "{dup:?}");
        assert_eq!(
            w.rtnl.try_lock().unwrap().len(),
            1,
            "{dup:?}: one interface"
        );
        let host = w.host.borrow();
        assert!(
            host.channels()
                .iter()
                .filter(|c| c.duplicate)
                .all(|c| c.opens == 0),
            "{dup:?}: ghost opened"
        );
        drop(host);
        assert_clean_host(&w);
    }
}

/// Scenario 4b: A probe that fails (the host refuses OPENCHANNEL) frees what it set up and still
/// marks probe done, so the later rescind completes and releases the relid.
#[test]
fn probe_failure_then_rescind_completes() {
    for seed in 0..8 {
        bring_up_and_remove(
            seed,
            Faults::none().fail_open(hvemu::STATUS_UNSUCCESSFUL),
            "probe failure",
        );
        bring_up_and_remove(
            seed,
            Faults::none().fail_gpadl(hvemu::STATUS_UNSUCCESSFUL),
            "GPADL failure",
        );
    }
}

/// Scenario 4c: A sub-channel offer that arrives after its primary was rescinded is not handed to
/// any driver and is released when the host rescinds it.
#[test]
fn subchannel_offer_after_primary_rescind_is_released() {
    let sim = sim(3);
    let handle = sim.handle();
    let w = default_world(&sim, 3);
    w.driver.want_subchannels.set(0);
    let (bus, host) = (w.bus.clone(), w.host.clone());
    let result = sim.run({
        let handle = handle.clone();
        async move {
            bus.connect().await.unwrap();
            let pages = hvemu_pages(&host);
            let dev = add_nic_raw_with(&host, instance_bytes(9), Faults::none());
            quiesce(&bus, &host, &handle).await;
            // The host offers sub-channels nobody asked for and withdraws the device in the
            // same breath: the sub-channel offers reach the guest after the primary's rescind.
            let primary = host.borrow().device_channels(dev)[0].1;
            host.borrow_mut().offer_subchannels(dev, 2);
            host.borrow_mut().remove_device(dev);
            until_all_released(&bus, &handle).await.unwrap();
            let _ = primary;
            pages
        }
    });
    let pages = result.unwrap();
    let stats = w.bus.stats();
    assert_eq!(stats.offers, 3, "{stats:?}");
    assert_eq!(stats.rescinds, 3, "{stats:?}");
    assert_eq!(stats.relids_released, 3, "{stats:?}");
    assert_device_fully_released(&w, pages, "sub-channel after primary rescind");
}

/// Scenario 5: Version negotiation against hosts that accept only one version, and against a
/// pre-5.0 host that refuses INITIATE_CONTACT on connection id 4; then a NIC still comes up
/// on the negotiated connection.
#[test]
fn version_negotiation_against_restricted_hosts() {
    use hvnet_wire::vmbus::VmbusVersion;
    let cases = [
        (vec![VmbusVersion::WIN8], false, VmbusVersion::WIN8),
        (vec![VmbusVersion::WIN10], false, VmbusVersion::WIN10),
        (
            vec![VmbusVersion::WIN10_V5_3],
            false,
            VmbusVersion::WIN10_V5_3,
        ),
        (
            vec![
                VmbusVersion::WIN10,
                VmbusVersion::WIN8_1,
                VmbusVersion::WIN8,
            ],
            true,
            VmbusVersion::WIN10,
        ),
        (
            hvemu::HostConfig::default().versions,
            true,
            VmbusVersion::WIN10_V4_1,
        ),
    ];
    for (versions, pre_v5, expect) in cases {
        let sim = sim(5);
        let config = hvemu::HostConfig {
            versions: versions.clone(),
            pre_win10_v5_connection_ids: pre_v5,
            msg_conn_id: 4,
            ..host_config(5)
        };
        let w = world(&sim.handle(), config, VmBusConfig::default(), 5);
        w.driver.want_subchannels.set(2);
        let (bus, host, up) = (w.bus.clone(), w.host.clone(), w.up.clone());
        let got = sim
            .run(async move {
                let v = bus.connect().await.expect("connect");
                add_nic_raw(&host, 1, 2);
                up.acquire(1).await;
                v
            })
            .unwrap();
        assert_eq!(
            got, expect,
            "host versions {versions:?}, pre-5.0 ids {pre_v5}"
        );
        assert_clean_host(&w);
    }
    // A host that accepts nothing: a clear error, no hang.
    let sim = sim(6);
    let config = hvemu::HostConfig {
        versions: vec![VmbusVersion::WIN7],
        ..host_config(6)
    };
    let w = world(&sim.handle(), config, VmBusConfig::default(), 6);
    let bus = w.bus.clone();
    let r = sim.run(async move { bus.connect().await }).unwrap();
    assert_eq!(r, Err(hvnet_vmbus::bus::ConnectError::NoCommonVersion));
}

/// Scenario 6: Malformed host messages of every type (empty, short, overlong, unknown relids, huge
/// counts, garbage) are dropped and counted, never a panic; the bus keeps working.
#[test]
fn malformed_host_messages_are_rejected_and_the_bus_keeps_working() {
    for seed in 0..4u64 {
        let sim = sim(seed);
        let w = default_world(&sim, seed);
        w.driver.want_subchannels.set(2);
        let (bus, host, up) = (w.bus.clone(), w.host.clone(), w.up.clone());
        let handle = sim.handle();
        let bad = sim
            .run(async move {
                bus.connect().await.unwrap();
                let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for msg_type in 0u32..=32 {
                    let header = msg_type.to_le_bytes();
                    let mut cases: Vec<Vec<u8>> = vec![
                        vec![],
                        header[..2].to_vec(),
                        [&header[..], &[0u8; 4]].concat(),
                        [&header[..], &[0u8; 4], &[0xffu8; 3]].concat(),
                        [&header[..], &[0u8; 4], &[0xffu8; 232]].concat(),
                    ];
                    let mut random = [&header[..], &[0u8; 4]].concat();
                    random.extend((0..(next() % 232)).map(|_| next() as u8));
                    cases.push(random);
                    for body in cases {
                        host_scope(|| host.borrow_mut().inject_raw(1, &body));
                    }
                }
                // Unknown relids for the relid-carrying replies, and a non-VMBus SynIC type.
                for t in [2u32, 6, 10, 12] {
                    let mut m = t.to_le_bytes().to_vec();
                    m.extend([0u8; 4]);
                    m.extend(0xdead_beefu32.to_le_bytes());
                    m.extend([0u8; 12]);
                    host_scope(|| host.borrow_mut().inject_raw(1, &m));
                }
                host_scope(|| host.borrow_mut().inject_raw(0x8000_0010, &[1, 2, 3]));
                handle.sleep(std::time::Duration::from_millis(5)).await;
                let bad = bus.stats().bad_messages;
                // Still works: a NIC comes up afterwards.
                add_nic_raw(&host, 3, 2);
                up.acquire(1).await;
                bad
            })
            .unwrap();
        assert!(bad >= 150, "seed {seed}: only {bad} bad messages counted");
        assert_eq!(w.rtnl.try_lock().unwrap().len(), 1);
    }
}
