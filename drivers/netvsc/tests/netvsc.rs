//! netvsc against hvemu's netvsp under the deterministic scheduler: bring-up on every
//! NVSP version, multi-queue with RSS, several NICs hot-added at once, hot-remove under
//! traffic, sub-channel loss, hosts granting fewer or more queues than asked, hostile host
//! input, and add/remove cycles that must return every byte.

mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use hvemu::netvsp::{NetvspConfig, NetvspFaults, NetvspHandle};
use hvemu::DeviceId;
use hvnet_netvsc::nic::{MtuError, Nic, NicError};
use hvnet_netvsc::NetvscConfig;
use hvnet_runtime::sim::{Config, Simulation};
use hvnet_runtime::testing::check_seeds;
use hvnet_runtime::{Duration, Handle};
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn sim(seed: u64) -> Simulation {
    Simulation::with_config(
        seed,
        Config {
            max_virtual_time: std::time::Duration::from_secs(600),
            ..Config::default()
        },
    )
}

/// Receives frames until `n` arrived or `limit` passed.
async fn receive_n(h: &Handle, nic: &Rc<dyn Nic>, n: usize, limit: Duration) -> Vec<Vec<u8>> {
    let deadline = h.now().saturating_add(limit);
    let mut got = Vec::new();
    loop {
        nic.receive(usize::MAX, &mut |f| got.push(f.to_vec()));
        if got.len() >= n || h.now() >= deadline {
            return got;
        }
        let _ = h.timeout_at(deadline, nic.changed()).await;
    }
}

/// [`receive_n`] the way the network side receives: polls as NIC batches, one frame per
/// `receive` call.
async fn receive_batched(h: &Handle, nic: &Rc<dyn Nic>, n: usize, limit: Duration) -> Vec<Vec<u8>> {
    let deadline = h.now().saturating_add(limit);
    let mut got = Vec::new();
    loop {
        nic.begin_batch();
        while got.len() < n && nic.receive(1, &mut |f| got.push(f.to_vec())) == 1 {}
        nic.end_batch();
        if got.len() >= n || h.now() >= deadline {
            return got;
        }
        let _ = h.timeout_at(deadline, nic.changed()).await;
    }
}

/// Sends every frame, waiting for room on `Busy`; returns the first other error.
async fn transmit_all(h: &Handle, nic: &Rc<dyn Nic>, frames: &[Vec<u8>]) -> Result<(), NicError> {
    for f in frames {
        loop {
            match nic.transmit(f.len(), &mut |dst| dst.copy_from_slice(f)) {
                Ok(()) => break,
                Err(NicError::Busy) => {
                    // Completions are reaped by the receive path.
                    nic.receive(usize::MAX, &mut |_| {});
                    let _ = h.timeout(Duration::from_millis(10), nic.changed()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Waits until every send section is back (all sends completed).
async fn wait_sends_completed(h: &Handle, nic: &Rc<dyn Nic>, total: usize) -> Res {
    let netvsc = as_netvsc(nic);
    for _ in 0..1000 {
        nic.receive(usize::MAX, &mut |_| {});
        if netvsc.free_send_sections() == total {
            return Ok(());
        }
        h.sleep(Duration::from_micros(200)).await;
    }
    Err(format!(
        "{} of {total} send sections free after 200 ms",
        netvsc.free_send_sections()
    ))
}

fn frames_for(m: [u8; 6], count: u16, len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| udp_frame(m, 1000 + i, len, i as u8))
        .collect()
}

/// Checks both directions on `nic`: `count` frames in from the host (all delivered,
/// content intact) and `count` frames out (all reach the host intact, all sections
/// come back).
async fn exchange(h: &Handle, nic: &Rc<dyn Nic>, nv: &NetvspHandle, count: u16) -> Res {
    let sent = frames_for(nic.mac(), count, 100);
    for f in &sent {
        host_scope(|| nv.send_to_guest(f));
    }
    let got = receive_n(h, nic, sent.len(), Duration::from_secs(1)).await;
    let mut want = sent.clone();
    let mut have = got.clone();
    want.sort();
    have.sort();
    ensure(want == have, || {
        format!(
            "received {} frames, wanted {} identical ones",
            got.len(),
            sent.len()
        )
    })?;
    let total = as_netvsc(nic).free_send_sections();
    transmit_all(h, nic, &sent)
        .await
        .map_err(|e| format!("transmit: {e:?}"))?;
    wait_sends_completed(h, nic, total).await?;
    let mut out = Vec::new();
    while let Some(f) = host_scope(|| nv.take_from_guest()) {
        out.push(f);
    }
    out.sort();
    ensure(out == want, || {
        format!("host got {} frames, wanted {}", out.len(), want.len())
    })
}

/// Runs `body` in a fresh world for `seed` under the simulation, then checks the host
/// saw no protocol or guest-memory violation.
fn in_world<F, Fut>(seed: u64, body: F) -> Res
where
    F: FnOnce(Rc<NetWorld>, Handle) -> Fut,
    Fut: std::future::Future<Output = Res> + 'static,
{
    in_world_with(seed, test_netvsc_config(), body)
}

/// [`in_world`] with the driver configured by `config`.
fn in_world_with<F, Fut>(seed: u64, config: NetvscConfig, body: F) -> Res
where
    F: FnOnce(Rc<NetWorld>, Handle) -> Fut,
    Fut: std::future::Future<Output = Res> + 'static,
{
    let sim = sim(seed);
    let h = sim.handle();
    let w = world_with(&h, seed, config);
    sim.run(body(w.clone(), h)).map_err(|e| e.to_string())??;
    assert_clean(&w);
    Ok(())
}

fn world(h: &Handle, seed: u64) -> Rc<NetWorld> {
    world_with(h, seed, test_netvsc_config())
}

fn world_with(h: &Handle, seed: u64, config: NetvscConfig) -> Rc<NetWorld> {
    let w = Rc::new(net_world(h, seed, config));
    spawn_host_pump(h, &w);
    w
}

/// Connects VMBus, adds NIC `n` with `config` on the host, and waits for the driver to
/// register it.
async fn one_nic(
    w: &NetWorld,
    n: u32,
    config: NetvspConfig,
) -> Result<(DeviceId, NetvspHandle, Rc<dyn Nic>), String> {
    w.bus
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let (dev, nv) = add_nic(w, n, config);
    Ok((dev, nv, first_nic(w).await))
}

/// Heap (`heap_live`), guest pages and tasks.
type Resources = ((i64, i64), usize, usize);

/// After a NIC of add/remove cycle `cycle` is gone: no GPADL or channel is left, and
/// heap, guest pages and tasks are back to `baseline` (taken at cycle 1: the first
/// cycle warms caches such as executor queues and bus tables).
fn nothing_left(w: &NetWorld, h: &Handle, cycle: u32, baseline: &mut Option<Resources>) -> Res {
    ensure(w.bus.live_gpadls() == 0, || {
        format!("cycle {cycle}: {} GPADLs live", w.bus.live_gpadls())
    })?;
    ensure(w.bus.live_relids().is_empty(), || {
        format!("relids {:?}", w.bus.live_relids())
    })?;
    let now = (heap_live(), w.memory.live_pages(), h.task_count());
    match *baseline {
        None if cycle >= 1 => *baseline = Some(now),
        Some(b) if b != now => {
            return Err(format!(
                "cycle {cycle}: (heap, pages, tasks) {now:?} vs baseline {b:?}"
            ))
        }
        _ => {}
    }
    Ok(())
}

async fn first_nic(w: &NetWorld) -> Rc<dyn Nic> {
    w.registry.registered.acquire(1).await;
    let list = w.registry.lock.lock().await;
    list.last().cloned().expect("registered")
}

fn assert_clean(w: &NetWorld) {
    assert_host_clean(&w.host, &w.memory);
}

/// One NIC, eight queues: everything negotiated as the host expects, RSS spreads
/// received flows over all queues, and both directions carry frames intact.
#[test]
fn one_nic_with_eight_queues_negotiates_and_spreads_traffic() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            let (_, nv, nic) = one_nic(&w, 0, NetvspConfig::default()).await?;
            ensure(nic.queue_count() == 8, || {
                format!("{} queues", nic.queue_count())
            })?;
            ensure(
                nic.mac() == mac(0) && nic.link_up() && nic.mtu() == 1500,
                || {
                    format!(
                        "mac {:?} link {} mtu {}",
                        nic.mac(),
                        nic.link_up(),
                        nic.mtu()
                    )
                },
            )?;
            let st = host_scope(|| nv.state());
            ensure(st.nvsp_version == Some(0x60001), || format!("{st:?}"))?;
            ensure(st.ndis_version == Some((6, 30)), || format!("{st:?}"))?;
            ensure(
                st.queues_open.len() == 8 && st.subchannels_requested == 7,
                || format!("{st:?}"),
            )?;
            ensure(st.packet_filter != 0 && st.rndis_initialized, || {
                format!("{st:?}")
            })?;
            let rss = st.rss.clone().ok_or("no RSS parameters")?;
            ensure(format!("{rss:?}").contains("table"), || format!("{rss:?}"))?;
            // 256 flows: Toeplitz on the host must land some on every queue.
            exchange(&h, &nic, &nv, 256).await?;
            for q in 0..8 {
                let s = nic.queue_stats(q);
                ensure(s.rx_packets > 0, || {
                    format!("queue {q} received nothing: {s:?}")
                })?;
            }
            let tx_queues = (0..8)
                .filter(|&q| nic.queue_stats(q).tx_packets > 0)
                .count();
            ensure(tx_queues > 1, || {
                format!("all sends on {tx_queues} queue(s)")
            })?;
            let netvsc = as_netvsc(&nic);
            ensure(netvsc.counters().send_tables == 1, || {
                format!("{:?}", netvsc.counters())
            })?;
            ensure(netvsc.counters().malformed == 0, || {
                format!("{:?}", netvsc.counters())
            })?;
            Ok::<_, String>(())
        })
    });
}

/// Hosts that stop at each NVSP version: the guest settles on that version, asks for
/// sub-channels only from NVSP 5, and traffic flows.
#[test]
fn every_nvsp_version_host_works() {
    for (version, queues) in [
        (0x2, 1),
        (0x30002, 1),
        (0x40000, 1),
        (0x50000, 8),
        (0x60000, 8),
        (0x60001, 8),
    ] {
        let seed = u64::from(version);
        let sim = sim(seed);
        let h = sim.handle();
        let w = world(&h, seed);
        let w2 = w.clone();
        let result = sim.run(async move {
            let w = w2;
            w.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let config = NetvspConfig {
                max_nvsp_version: version,
                ..NetvspConfig::default()
            };
            let (_, nv) = add_nic(&w, 1, config);
            let nic = first_nic(&w).await;
            let st = host_scope(|| nv.state());
            ensure(st.nvsp_version == Some(version), || {
                format!("{version:#x}: {st:?}")
            })?;
            let ndis = if version > 0x40000 { (6, 30) } else { (6, 1) };
            ensure(st.ndis_version == Some(ndis), || {
                format!("{version:#x}: {st:?}")
            })?;
            ensure(nic.queue_count() == queues, || {
                format!("NVSP {version:#x}: {} queues", nic.queue_count())
            })?;
            exchange(&h, &nic, &nv, 32).await
        });
        result
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("NVSP {version:#x}: {e}"));
        assert_clean(&w);
    }
}

/// The product's point: four multi-queue NICs hot-added at the same instant all come
/// up with every queue, over many scheduler seeds, and all carry traffic.
#[test]
fn four_eight_queue_nics_hot_added_at_once() {
    check_seeds(100, |seed| {
        in_world(seed, |w, h| async move {
            w.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let handles: Vec<NetvspHandle> = (0..4)
                .map(|n| add_nic(&w, n, NetvspConfig::default()).1)
                .collect();
            w.registry.registered.acquire(4).await;
            let nics = w.registry.lock.lock().await.clone();
            for (n, nv) in handles.iter().enumerate() {
                let nic = nics
                    .iter()
                    .find(|x| x.mac() == mac(n as u32))
                    .ok_or("missing NIC")?;
                ensure(nic.queue_count() == 8, || {
                    format!("NIC {n}: {} queues", nic.queue_count())
                })?;
                exchange(&h, nic, nv, 16).await?;
            }
            Ok::<_, String>(())
        })
    });
}

/// Hosts that refuse sub-channels, grant fewer, or grant more than asked: the NIC comes
/// up with what it may use, never with channels it did not ask for.
#[test]
fn hosts_granting_other_queue_counts() {
    let cases = [
        (
            "refused",
            NetvspFaults {
                refuse_subchannels: true,
                ..NetvspFaults::default()
            },
            1,
        ),
        (
            "three granted",
            NetvspFaults {
                max_subchannels: Some(3),
                ..NetvspFaults::default()
            },
            4,
        ),
        (
            "two extra",
            NetvspFaults {
                extra_subchannels: 2,
                ..NetvspFaults::default()
            },
            8,
        ),
        (
            "no send table",
            NetvspFaults {
                no_indirection_table: true,
                ..NetvspFaults::default()
            },
            8,
        ),
    ];
    for (name, faults, queues) in cases {
        let sim = sim(7);
        let h = sim.handle();
        let w = world(&h, 7);
        let w2 = w.clone();
        let result = sim.run(async move {
            let w = w2;
            w.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let config = NetvspConfig {
                faults,
                max_queues: 10,
                ..NetvspConfig::default()
            };
            let (_, nv) = add_nic(&w, 2, config);
            let nic = first_nic(&w).await;
            ensure(nic.queue_count() == queues, || {
                format!("{} queues", nic.queue_count())
            })?;
            exchange(&h, &nic, &nv, 32).await
        });
        result
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_clean(&w);
    }
}

/// A guest-side traffic loop: echoes every received frame back.
/// Echoes every frame back. `batched`: each round is a NIC batch taking one frame per
/// `receive` (read-ahead, held sends), as the network side does.
fn spawn_echo(h: &Handle, nic: Rc<dyn Nic>, echoed: Rc<RefCell<u64>>, batched: bool) {
    let h2 = h.clone();
    h.spawn("echo", async move {
        while !nic.is_removed() {
            let mut frames = Vec::new();
            if batched {
                nic.begin_batch();
                while frames.len() < 64 && nic.receive(1, &mut |f| frames.push(f.to_vec())) == 1 {}
            } else {
                nic.receive(64, &mut |f| frames.push(f.to_vec()));
            }
            for f in frames {
                if nic
                    .transmit(f.len(), &mut |d| d.copy_from_slice(&f))
                    .is_ok()
                {
                    *echoed.borrow_mut() += 1;
                }
            }
            nic.end_batch();
            let _ = h2.timeout(Duration::from_millis(5), nic.changed()).await;
        }
    });
}

/// A host-side traffic source: keeps sending frames to the NIC until told to stop.
fn spawn_source(h: &Handle, nv: NetvspHandle, m: [u8; 6], stop: Rc<RefCell<bool>>) {
    let h2 = h.clone();
    h.spawn("source", async move {
        let mut i: u16 = 0;
        while !*stop.borrow() {
            for _ in 0..8 {
                let f = udp_frame(m, 2000 + (i % 512), 200, i as u8);
                host_scope(|| nv.send_to_guest(&f));
                i = i.wrapping_add(1);
            }
            h2.sleep(Duration::from_micros(300)).await;
        }
    });
}

/// Hot-remove while frames flow both ways, then the same NIC added again, many times:
/// every task ends, and GPADLs, guest pages and heap return to the baseline.
#[test]
fn hot_remove_under_traffic_and_add_remove_cycles_leak_nothing() {
    check_seeds(10, |seed| {
        in_world(seed, |w, h| async move {
            w.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let mut baseline = None;
            for cycle in 0..20u32 {
                let (dev, nv) = add_nic(&w, 3, NetvspConfig::default());
                let nic = first_nic(&w).await;
                let echoed = Rc::new(RefCell::new(0));
                let stop = Rc::new(RefCell::new(false));
                // Every other cycle through batches: held sends and read-ahead frames
                // meet the removal too.
                spawn_echo(&h, nic.clone(), echoed.clone(), cycle % 2 == 1);
                spawn_source(&h, nv.clone(), nic.mac(), stop.clone());
                // Let traffic run, then pull the NIC at a seed-dependent moment.
                h.sleep(Duration::from_micros(500 + h.random_below(3000)))
                    .await;
                remove_nic(&w, dev);
                w.registry.unregistered.acquire(1).await;
                *stop.borrow_mut() = true;
                w.bus.settle().await;
                h.sleep(Duration::from_millis(20)).await;
                ensure(nic.is_removed(), || "removed NIC still live".into())?;
                ensure(*echoed.borrow() > 0 || cycle > 0, || {
                    "no traffic before removal".into()
                })?;
                drop(nic);
                host_scope(|| drop(nv));
                nothing_left(&w, &h, cycle, &mut baseline)?;
            }
            Ok(())
        })
    });
}

/// A sub-channel rescinded while the NIC stays: that queue goes, sends in flight on it
/// are given back, the rest keep working.
#[test]
fn one_subchannel_rescinded_keeps_the_nic() {
    check_seeds(20, |seed| {
        in_world(seed, |w, h| async move {
            let (dev, nv, nic) = one_nic(&w, 4, NetvspConfig::default()).await?;
            exchange(&h, &nic, &nv, 32).await?;
            let gone = host_scope(|| w.host.borrow_mut().rescind_subchannel(dev, 3));
            ensure(gone, || "no sub-channel 3".into())?;
            w.bus.settle().await;
            h.sleep(Duration::from_millis(5)).await;
            ensure(nic.queue_count() == 7, || {
                format!("{} queues", nic.queue_count())
            })?;
            ensure(!as_netvsc(&nic).open_queues().contains(&3), || {
                "queue 3 still open".into()
            })?;
            // The host now steers nothing to queue 3 (it is closed); traffic goes on.
            exchange(&h, &nic, &nv, 64).await
        })
    });
}

/// Garbage from the host (in-band NVSP, RNDIS in receive sections, ranges outside the
/// buffer, unknown RNDIS types, bad PPI offsets) is counted and dropped; the NIC works on.
#[test]
fn malformed_host_input_is_dropped_and_counted() {
    malformed_host_input(false);
}

/// The same host input taken as the network side takes it: one frame per `receive` in
/// NIC batches, so the read-ahead path (messages parsed in the backlog's arena) meets it.
#[test]
fn malformed_host_input_read_ahead_is_dropped_and_counted() {
    malformed_host_input(true);
}

fn malformed_host_input(batched: bool) {
    let sim = sim(11);
    let h = sim.handle();
    let w = world(&h, 11);
    let w2 = w.clone();
    let result = sim.run(async move {
        let w = w2;
        let (_, nv, nic) = one_nic(&w, 5, NetvspConfig::default()).await?;
        let mut garbage: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        garbage.insert("empty", vec![]);
        garbage.insert("short header", vec![1, 0]);
        garbage.insert("unknown type", vec![0xff, 0, 0, 0, 0, 0, 0, 0]);
        // SEND_INDIRECTION_TABLE with count 1000.
        let mut table = vec![134, 0, 0, 0, 0xe8, 3, 0, 0, 12, 0, 0, 0];
        table.resize(76, 0xff);
        garbage.insert("bad send table", table);
        for g in garbage.values() {
            host_scope(|| nv.inject_raw_nvsp(0, g));
        }
        let rndis: Vec<Vec<u8>> = vec![
            vec![1, 0, 0, 0],
            // PACKET claiming 4 GiB.
            vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            // PACKET with data offset past its end.
            {
                let mut p = vec![0u8; 44];
                p[0] = 1;
                p[4] = 44;
                p[8] = 200;
                p[12] = 10;
                p
            },
            // PACKET with a PPI region running out of the message.
            {
                let mut p = vec![0u8; 60];
                p[0] = 1;
                p[4] = 60;
                p[8] = 36;
                p[12] = 16;
                p[28] = 36;
                p[32] = 100;
                p
            },
            // QUERY_CMPLT for a request nobody made.
            vec![
                4, 0, 0x80, 0x80, 24, 0, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ];
        let take = |limit| {
            let (h, nic) = (h.clone(), nic.clone());
            async move {
                if batched {
                    receive_batched(&h, &nic, usize::MAX, limit).await
                } else {
                    receive_n(&h, &nic, usize::MAX, limit).await
                }
            }
        };
        for r in &rndis {
            host_scope(|| nv.inject_raw_rndis(0, r));
            let _ = take(Duration::from_millis(2)).await;
            eprintln!(
                "rndis {}: {}",
                r.len(),
                as_netvsc(&nic).counters().malformed
            );
        }
        host_scope(|| nv.inject_bad_xfer(0, u32::MAX - 10, 100));
        host_scope(|| nv.inject_bad_xfer(0, 0, 1 << 30));
        // Let it all arrive and be processed.
        let _ = take(Duration::from_millis(20)).await;
        let malformed = as_netvsc(&nic).counters().malformed;
        let expected = (garbage.len() + rndis.len() + 2) as u64;
        ensure(malformed >= expected, || {
            format!("{malformed} malformed counted, {expected} injected")
        })?;
        exchange(&h, &nic, &nv, 64).await
    });
    result.map_err(|e| e.to_string()).and_then(|r| r).unwrap();
}

/// A host that never answers NVSP INIT: the probe gives up after its timeout, the
/// channel is released, and nothing is registered.
#[test]
fn silent_host_times_out_the_probe() {
    let sim = sim(5);
    let h = sim.handle();
    let config = NetvscConfig {
        reply_timeout: Duration::from_millis(50),
        ..test_netvsc_config()
    };
    let w = Rc::new(net_world(&h, 5, config));
    let w2 = w.clone();
    let result = sim.run(async move {
        let w = w2;
        w.bus
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        // A class-matching device whose back end is the sub-channel test device: it
        // answers no NVSP at all.
        let spec = hvemu::DeviceSpec::new(
            zerocopy::transmute!(hvnet_wire::vmbus::HV_NIC_GUID),
            instance(9),
            Box::new(hvemu::SubchannelTestDevice::new(0)),
        );
        host_scope(|| w.host.borrow_mut().add_device(spec));
        w.bus.settle().await;
        let h2 = w.bus.handle().clone();
        h2.sleep(Duration::from_millis(200)).await;
        w.bus.settle().await;
        ensure(w.bus.stats().probes_failed == 1, || {
            format!("{:?}", w.bus.stats())
        })?;
        ensure(w.registry.lock.lock().await.is_empty(), || {
            "registered".into()
        })?;
        ensure(w.bus.live_gpadls() == 0, || {
            format!("{} GPADLs", w.bus.live_gpadls())
        })
    });
    result.map_err(|e| e.to_string()).and_then(|r| r).unwrap();
}

// ---------------------------------------------------------------------------------------
// MTU changes.

/// A port that carries jumbo frames.
fn jumbo_port() -> NetvspConfig {
    NetvspConfig {
        mtu: 9000,
        ..NetvspConfig::default()
    }
}

/// Changes the MTU the way the network side does: with the configuration lock held.
async fn set_mtu(w: &NetWorld, nic: &Rc<dyn Nic>, mtu: usize) -> Result<(), MtuError> {
    let _config = w.registry.lock.lock().await;
    nic.set_mtu(mtu).await
}

/// Echoes received frames back until `stop`; counts the frames echoed.
fn spawn_echo_until(
    h: &Handle,
    nic: Rc<dyn Nic>,
    echoed: Rc<RefCell<u64>>,
    stop: Rc<RefCell<bool>>,
) {
    let h2 = h.clone();
    h.spawn("echo", async move {
        while !*stop.borrow() && !nic.is_removed() {
            let mut frames = Vec::new();
            nic.receive(64, &mut |f| frames.push(f.to_vec()));
            for f in frames {
                if nic
                    .transmit(f.len(), &mut |d| d.copy_from_slice(&f))
                    .is_ok()
                {
                    *echoed.borrow_mut() += 1;
                }
            }
            let _ = h2.timeout(Duration::from_millis(1), nic.changed()).await;
        }
    });
}

/// Frames of exactly `len` bytes pass both ways; one byte more is refused by the
/// driver and dropped by the host.
async fn check_frame_limit(h: &Handle, nic: &Rc<dyn Nic>, nv: &NetvspHandle, mtu: usize) -> Res {
    let biggest = udp_frame(nic.mac(), 4242, mtu - 28, 0x5a);
    let verdict = host_scope(|| nv.send_to_guest(&biggest));
    ensure(
        matches!(verdict, hvemu::netvsp::RxVerdict::Queued(_)),
        || {
            format!(
                "MTU {mtu}: host refused a {}-byte frame: {verdict:?}",
                biggest.len()
            )
        },
    )?;
    let got = receive_n(h, nic, 1, Duration::from_millis(200)).await;
    ensure(got == [biggest.clone()], || {
        format!("MTU {mtu}: {} frames received", got.len())
    })?;
    let over = udp_frame(nic.mac(), 4242, mtu - 27, 0x5a);
    let verdict = host_scope(|| nv.send_to_guest(&over));
    ensure(verdict == hvemu::netvsp::RxVerdict::TooLong, || {
        format!(
            "MTU {mtu}: host took a {}-byte frame: {verdict:?}",
            over.len()
        )
    })?;
    ensure(
        nic.transmit(over.len(), &mut |d| d.copy_from_slice(&over)) == Err(NicError::TooLong),
        || format!("MTU {mtu}: driver sent a {}-byte frame", over.len()),
    )?;
    transmit_all(h, nic, std::slice::from_ref(&biggest))
        .await
        .map_err(|e| format!("MTU {mtu}: transmit: {e:?}"))?;
    let total = as_netvsc(nic).send_sections();
    wait_sends_completed(h, nic, total).await?;
    let out = host_scope(|| nv.take_from_guest());
    ensure(out.as_ref() == Some(&biggest), || {
        format!("MTU {mtu}: host got {:?} bytes", out.map(|f| f.len()))
    })
}

/// The MTU goes up and down while frames flow both ways, over many schedules: each
/// change renegotiates with the host (which then enforces the new size), keeps every
/// queue, resumes the traffic, and shows in `mtu()` and `changed()`.
#[test]
fn mtu_changes_up_and_down_under_traffic() {
    check_seeds(12, |seed| {
        in_world(seed, |w, h| async move {
            let (_, nv, nic) = one_nic(&w, 6, jumbo_port()).await?;
            let max = nic.max_mtu();
            // A 6144-byte send section carries the RNDIS header, a VLAN PPI and a frame of
            // at most 6070 bytes of IP.
            ensure(nic.mtu() == 1500 && max == 6070, || {
                format!("mtu {} max {max}", nic.mtu())
            })?;
            let echoed = Rc::new(RefCell::new(0));
            let stop = Rc::new(RefCell::new(false));
            spawn_echo_until(&h, nic.clone(), echoed.clone(), stop.clone());
            spawn_source(&h, nv.clone(), nic.mac(), stop.clone());
            for mtu in [4000, 1000, max, 576, 1500] {
                h.sleep(Duration::from_micros(300 + h.random_below(3000)))
                    .await;
                let before = *echoed.borrow();
                let generation = as_netvsc(&nic).counters().mtu_changes;
                set_mtu(&w, &nic, mtu)
                    .await
                    .map_err(|e| format!("set_mtu({mtu}): {e}"))?;
                ensure(nic.mtu() == mtu, || {
                    format!("mtu {} after {mtu}", nic.mtu())
                })?;
                ensure(
                    as_netvsc(&nic).counters().mtu_changes == generation + 1,
                    || "change not counted".into(),
                )?;
                ensure(
                    h.timeout(Duration::from_micros(1), nic.changed())
                        .await
                        .is_ok(),
                    || "changed() did not report the new MTU".into(),
                )?;
                let st = host_scope(|| nv.state());
                ensure(
                    st.mtu as usize == mtu && st.ndis_config_mtu == Some(mtu as u32 + 14),
                    || format!("host after {mtu}: {st:?}"),
                )?;
                ensure(nic.queue_count() == 8 && st.queues_open.len() == 8, || {
                    format!("{} queues after {mtu}", nic.queue_count())
                })?;
                // Traffic resumes.
                for _ in 0..200 {
                    if *echoed.borrow() > before {
                        break;
                    }
                    h.sleep(Duration::from_micros(200)).await;
                }
                ensure(*echoed.borrow() > before, || {
                    format!("no traffic after MTU {mtu}")
                })?;
            }
            *stop.borrow_mut() = true;
            h.sleep(Duration::from_millis(5)).await;
            // Drain what the traffic left, then check the limits at the final MTU.
            let _ = receive_n(&h, &nic, usize::MAX, Duration::from_millis(5)).await;
            while host_scope(|| nv.take_from_guest()).is_some() {}
            check_frame_limit(&h, &nic, &nv, 1500).await?;
            let netvsc = as_netvsc(&nic);
            ensure(netvsc.counters().malformed == 0, || {
                format!("{:?}", netvsc.counters())
            })?;
            let stats = host_scope(|| nv.stats());
            ensure(stats.malformed == 0, || format!("host: {:?}", stats.errors))?;
            exchange(&h, &nic, &nv, 64).await
        })
    });
}

/// Frames at the MTU pass and one byte more is refused, after changes up and down.
#[test]
fn mtu_limits_hold_after_each_change() {
    in_world(17, |w, h| async move {
        let (_, nv, nic) = one_nic(&w, 7, jumbo_port()).await?;
        check_frame_limit(&h, &nic, &nv, 1500).await?;
        for mtu in [5000, 68 + 100, nic.max_mtu(), 1280] {
            set_mtu(&w, &nic, mtu)
                .await
                .map_err(|e| format!("set_mtu({mtu}): {e}"))?;
            check_frame_limit(&h, &nic, &nv, mtu).await?;
        }
        // The same MTU again changes nothing on the host.
        let opens = host_scope(|| nv.stats().primary_opens);
        set_mtu(&w, &nic, 1280)
            .await
            .map_err(|e| format!("same MTU: {e}"))?;
        ensure(host_scope(|| nv.stats().primary_opens) == opens, || {
            "renegotiated for the same MTU".into()
        })?;
        exchange(&h, &nic, &nv, 32).await
    })
    .unwrap();
}

/// MTUs outside 68..=max are refused with an error that says the range; nothing is
/// renegotiated.
#[test]
fn mtu_out_of_range_is_refused() {
    in_world(3, |w, h| async move {
        let (_, nv, nic) = one_nic(&w, 8, NetvspConfig::default()).await?;
        ensure(nic.max_mtu() == 1500, || format!("max {}", nic.max_mtu()))?;
        let opens = host_scope(|| nv.stats().primary_opens);
        for (mtu, max) in [(67, 1500), (0, 1500), (1501, 1500), (9000, 1500)] {
            let e = set_mtu(&w, &nic, mtu).await;
            ensure(e == Err(MtuError::OutOfRange { mtu, min: 68, max }), || {
                format!("set_mtu({mtu}): {e:?}")
            })?;
            let text = e.unwrap_err().to_string();
            ensure(
                text.contains(&format!("{mtu}")) && text.contains("68..=1500"),
                || format!("unclear error: {text}"),
            )?;
        }
        ensure(nic.mtu() == 1500, || format!("mtu {}", nic.mtu()))?;
        ensure(host_scope(|| nv.stats().primary_opens) == opens, || {
            "a refused MTU renegotiated".into()
        })?;
        exchange(&h, &nic, &nv, 16).await
    })
    .unwrap();
}

/// The host rescinds the NIC while an MTU change runs (at a different moment per seed):
/// the change ends with `Removed` (or had finished), the interface goes away, and
/// GPADLs, channels, guest pages, heap and tasks all return to the baseline.
#[test]
fn rescind_during_mtu_change_leaks_nothing() {
    check_seeds(12, |seed| {
        in_world(seed, |w, h| async move {
            w.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            // A removal that waits for the configuration lock (held by the change) grows
            // the lock's waiter list once; make it grow before the baseline is taken.
            {
                let held = w.registry.lock.lock().await;
                for _ in 0..2 {
                    let w = w.clone();
                    h.spawn("lock waiter", async move {
                        drop(w.registry.lock.lock().await);
                    });
                }
                h.sleep(Duration::from_micros(100)).await;
                drop(held);
                h.sleep(Duration::from_micros(100)).await;
            }
            let mut baseline = None;
            for cycle in 0..10u32 {
                let (dev, nv) = add_nic(&w, 9, jumbo_port());
                let nic = first_nic(&w).await;
                let outcome: Rc<RefCell<Option<Result<(), MtuError>>>> =
                    Rc::new(RefCell::new(None));
                {
                    let (w, nic, outcome) = (w.clone(), nic.clone(), outcome.clone());
                    let mtu = if cycle % 2 == 0 { 4000 } else { 1000 };
                    h.spawn("mtu change", async move {
                        let r = set_mtu(&w, &nic, mtu).await;
                        *outcome.borrow_mut() = Some(r);
                    });
                }
                h.sleep(Duration::from_micros(h.random_below(1500))).await;
                remove_nic(&w, dev);
                w.registry.unregistered.acquire(1).await;
                w.bus.settle().await;
                h.sleep(Duration::from_millis(20)).await;
                let r = outcome.borrow_mut().take();
                ensure(
                    matches!(r, Some(Ok(())) | Some(Err(MtuError::Removed))),
                    || format!("cycle {cycle}: change ended with {r:?}"),
                )?;
                ensure(nic.is_removed(), || "removed NIC still live".into())?;
                drop(nic);
                host_scope(|| drop(nv));
                nothing_left(&w, &h, cycle, &mut baseline)?;
            }
            Ok(())
        })
    });
}

// ---------------------------------------------------------------------------------------
// 802.1Q VLAN tags.

/// `frame` with an 802.1Q tag carrying `tci` after the MACs.
fn tagged(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// Tagged frames cross in both directions as the network side wrote them: the host
/// carries the tag in a VLAN PPI (the frame untagged), the driver puts it back on
/// receive and takes it out on transmit. A port VLAN tags the host's untagged frames.
#[test]
fn vlan_tags_cross_both_ways() {
    check_seeds(8, |seed| {
        in_world(seed, |w, h| async move {
            let (_, nv, nic) = one_nic(&w, 10, NetvspConfig::default()).await?;
            let m = nic.mac();
            // VLAN 100..164, priorities and DEI varied; many flows over all queues.
            let frames: Vec<Vec<u8>> = (0..64u16)
                .map(|i| {
                    let tci = (i % 8) << 13 | (i % 2) << 12 | (100 + i);
                    tagged(&udp_frame(m, 3000 + i, 100, i as u8), tci)
                })
                .collect();
            for f in &frames {
                let v = host_scope(|| nv.send_to_guest(f));
                ensure(matches!(v, hvemu::netvsp::RxVerdict::Queued(_)), || {
                    format!("host refused a tagged frame: {v:?}")
                })?;
            }
            let mut got = receive_n(&h, &nic, frames.len(), Duration::from_secs(1)).await;
            let mut want = frames.clone();
            got.sort();
            want.sort();
            ensure(got == want, || {
                format!(
                    "{} of {} tagged frames came back intact",
                    got.len(),
                    want.len()
                )
            })?;
            let total = as_netvsc(&nic).free_send_sections();
            transmit_all(&h, &nic, &frames)
                .await
                .map_err(|e| format!("transmit: {e:?}"))?;
            wait_sends_completed(&h, &nic, total).await?;
            let mut out = Vec::new();
            while let Some(f) = host_scope(|| nv.take_from_guest()) {
                out.push(f);
            }
            out.sort();
            ensure(out == want, || {
                format!(
                    "host got {} of {} tagged frames intact",
                    out.len(),
                    want.len()
                )
            })?;
            let c = as_netvsc(&nic).counters();
            let s = host_scope(|| nv.stats());
            ensure(
                c.vlan_rx == 64 && c.vlan_tx == 64 && s.vlan_rx == 64 && s.vlan_tx == 64,
                || format!("guest {c:?}, host rx {} tx {}", s.vlan_rx, s.vlan_tx),
            )?;
            // Untagged traffic is untouched.
            exchange(&h, &nic, &nv, 32).await
        })
    });
}

/// On a port with a VLAN the host's untagged frames arrive tagged with it.
#[test]
fn port_vlan_tags_received_frames() {
    in_world(21, |w, h| async move {
        w.bus
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let config = NetvspConfig {
            port_vlan: Some(42),
            ..NetvspConfig::default()
        };
        let (_, nv) = add_nic(&w, 11, config);
        let nic = first_nic(&w).await;
        let frames = frames_for(nic.mac(), 16, 80);
        for f in &frames {
            host_scope(|| nv.send_to_guest(f));
        }
        let mut got = receive_n(&h, &nic, frames.len(), Duration::from_secs(1)).await;
        let mut want: Vec<Vec<u8>> = frames.iter().map(|f| tagged(f, 42)).collect();
        got.sort();
        want.sort();
        ensure(got == want, || {
            format!(
                "{} frames, tags {:?}",
                got.len(),
                got.first().map(|f| &f[12..16])
            )
        })?;
        // Frames the stack tags with the port VLAN go out; the host hands them on tagged.
        let total = as_netvsc(&nic).free_send_sections();
        transmit_all(&h, &nic, &want)
            .await
            .map_err(|e| format!("transmit: {e:?}"))?;
        wait_sends_completed(&h, &nic, total).await?;
        let mut out = Vec::new();
        while let Some(f) = host_scope(|| nv.take_from_guest()) {
            out.push(f);
        }
        out.sort();
        ensure(out == want, || format!("host got {} frames", out.len()))
    })
    .unwrap();
}

/// An RNDIS PACKET with `ppis` (raw entries) and `frame`, as a host indicates it.
fn packet_with_ppis(ppis: &[u8], frame: &[u8]) -> Vec<u8> {
    let total = 8 + 36 + ppis.len() + frame.len();
    let mut m = Vec::new();
    for word in [
        1u32,
        total as u32,
        (36 + ppis.len()) as u32,
        frame.len() as u32,
        0,
        0,
        0,
        36,
        ppis.len() as u32,
        0,
        0,
    ] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(ppis);
    m.extend_from_slice(frame);
    m
}

/// A PPI entry from its header words and data.
fn ppi(size: u32, ppi_type: u32, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    for word in [size, ppi_type, offset] {
        p.extend_from_slice(&word.to_le_bytes());
    }
    p.extend_from_slice(data);
    p
}

/// Malformed VLAN PPIs from the host (data shorter than its value, data offset inside the
/// header or past the entry, entry size past the region or below a header) are dropped
/// and counted; a good one next to them still works, and so does the NIC.
#[test]
fn malformed_vlan_ppis_are_dropped_and_counted() {
    in_world(23, |w, h| async move {
        let (_, nv, nic) = one_nic(&w, 12, NetvspConfig::default()).await?;
        let frame = udp_frame(nic.mac(), 5000, 60, 0x33);
        let vlan = 0x0645u32.to_le_bytes();
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("2-byte VLAN value", ppi(14, 6, 12, &[0x45, 0x06])),
            ("data offset inside the header", ppi(16, 6, 8, &vlan)),
            ("data offset past the entry", ppi(16, 6, 20, &vlan)),
            ("entry past the region", ppi(32, 6, 12, &vlan)),
            ("entry smaller than a header", ppi(8, 6, 12, &vlan)),
        ];
        let dropped_before: u64 = (0..nic.queue_count())
            .map(|q| nic.queue_stats(q).rx_dropped)
            .sum();
        for (name, entry) in &bad {
            let before = as_netvsc(&nic).counters().malformed;
            host_scope(|| nv.inject_raw_rndis(0, &packet_with_ppis(entry, &frame)));
            let got = receive_n(&h, &nic, 1, Duration::from_millis(5)).await;
            ensure(got.is_empty(), || {
                format!("{name}: {} frames delivered", got.len())
            })?;
            let after = as_netvsc(&nic).counters().malformed;
            ensure(after == before + 1, || {
                format!("{name}: malformed {before} -> {after}")
            })?;
        }
        let dropped: u64 = (0..nic.queue_count())
            .map(|q| nic.queue_stats(q).rx_dropped)
            .sum();
        ensure(dropped == dropped_before + bad.len() as u64, || {
            format!("rx_dropped {dropped_before} -> {dropped}")
        })?;
        // A good VLAN PPI after an unknown one: delivered tagged (VLAN 100, priority 5).
        let mut entries = ppi(16, 0x7fff, 12, &[0; 4]);
        entries.extend_from_slice(&ppi(16, 6, 12, &vlan));
        host_scope(|| nv.inject_raw_rndis(0, &packet_with_ppis(&entries, &frame)));
        let got = receive_n(&h, &nic, 1, Duration::from_millis(50)).await;
        ensure(got == [tagged(&frame, 0xa064)], || {
            format!("good PPI: {got:?}")
        })?;
        exchange(&h, &nic, &nv, 32).await
    })
    .unwrap();
}

/// Frames the host has taken from the guest so far.
fn host_got(nv: &NetvspHandle) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(f) = host_scope(|| nv.take_from_guest()) {
        out.push(f);
    }
    out
}

/// How many frames the host takes from the guest within the next 2 ms; each must be
/// `want`.
async fn host_sees(h: &Handle, nv: &NetvspHandle, want: &[u8]) -> Result<usize, String> {
    h.sleep(Duration::from_millis(2)).await;
    let got = host_got(nv);
    ensure(got.iter().all(|f| f == want), || {
        "the host got a frame other than the one sent".into()
    })?;
    Ok(got.len())
}

/// Inside a batch sends stay invisible to the host until the batch ends (then all
/// arrive); a long burst is published every 32 sends of a queue; and a batch left open
/// is ended by `changed()`, so that nothing waits with a sleeping caller.
#[test]
fn a_batch_holds_sends_back_until_it_ends() {
    // Room for more sends than a queue holds back.
    let config = NetvscConfig {
        send_buffer_bytes: 1 << 20,
        ..test_netvsc_config()
    };
    check_seeds(10, |seed| {
        in_world_with(seed, config.clone(), |w, h| async move {
            let (_, nv, nic) = one_nic(&w, 0, NetvspConfig::default()).await?;
            let total = as_netvsc(&nic).free_send_sections();
            // One flow, so that every frame goes to the same queue.
            let frame = udp_frame(mac(9), 4000, 100, 7);
            let send = |n: usize| -> Res {
                for _ in 0..n {
                    nic.transmit(frame.len(), &mut |d| d.copy_from_slice(&frame))
                        .map_err(|e| format!("transmit: {e:?}"))?;
                }
                Ok(())
            };
            let seen = || host_sees(&h, &nv, &frame);

            // Sends of an open batch reach the host when it ends; 40 sends on one queue:
            // the first 32 are published without the end.
            for (n, early_want) in [(10, 0), (40, 32)] {
                nic.begin_batch();
                send(n)?;
                let early = seen().await?;
                nic.end_batch();
                let late = seen().await?;
                ensure(early == early_want && early + late == n, || {
                    format!("{n} sends: host saw {early} in the batch, {late} after it")
                })?;
            }

            // Left open: waiting for the NIC publishes it.
            nic.begin_batch();
            send(5)?;
            let _ = h.timeout(Duration::from_millis(2), nic.changed()).await;
            let got = seen().await?;
            ensure(got == 5, || format!("{got} of 5 sends after changed()"))?;

            // Out of send sections inside a batch: what waits is published at once, so
            // that the host can complete it while the batch goes on.
            nic.begin_batch();
            let mut sent = 0;
            while nic
                .transmit(frame.len(), &mut |d| d.copy_from_slice(&frame))
                .is_ok()
            {
                sent += 1;
            }
            let got = seen().await?;
            ensure(got == sent, || format!("host saw {got} of {sent} sends"))?;
            nic.end_batch();
            wait_sends_completed(&h, &nic, total).await
        })
    });
}

/// Inside a batch one-frame receives are served from one read-ahead pass: every frame
/// arrives once, in order per flow; the host gets the completions when the batch ends,
/// not before; and a send from inside the receive callback is safe.
#[test]
fn a_batch_reads_ahead_and_completes_at_its_end() {
    check_seeds(10, |seed| {
        in_world(seed, |w, h| async move {
            let (_, nv, nic) = one_nic(&w, 0, NetvspConfig::default()).await?;
            let total = as_netvsc(&nic).free_send_sections();
            let before: u64 = (0..8).map(|q| nic.queue_stats(q).rx_packets).sum();
            let sent = frames_for(nic.mac(), 100, 200);
            for f in &sent {
                host_scope(|| nv.send_to_guest(f));
            }
            h.sleep(Duration::from_millis(2)).await;
            let indicated = host_scope(|| nv.stats()).outstanding_rx_packets;
            ensure(indicated == sent.len(), || {
                format!("{indicated} of {} frames indicated", sent.len())
            })?;

            let reply = udp_frame(mac(9), 5000, 60, 1);
            let mut got = Vec::new();
            let mut nested = 0;
            nic.begin_batch();
            loop {
                let n = nic.receive(1, &mut |f| {
                    got.push(f.to_vec());
                    // What a stack answering at once would do.
                    let _ = nic.transmit(reply.len(), &mut |d| d.copy_from_slice(&reply));
                    // A misbehaving one: receiving again gets nothing, and no panic.
                    nested += nic.receive(1, &mut |_| {}) + nic.receive(8, &mut |_| {});
                });
                if n == 0 {
                    break;
                }
                ensure(n == 1, || format!("receive(1) delivered {n}"))?;
            }
            h.sleep(Duration::from_millis(2)).await;
            let held = host_scope(|| nv.stats()).outstanding_rx_packets;
            ensure(held == sent.len(), || {
                format!("{held} indications outstanding inside the batch, wanted all")
            })?;
            nic.end_batch();
            h.sleep(Duration::from_millis(2)).await;
            let held = host_scope(|| nv.stats()).outstanding_rx_packets;
            ensure(held == 0, || {
                format!("{held} indications outstanding after it")
            })?;
            ensure(nested == 0, || {
                format!("{nested} frames to nested receives")
            })?;

            let mut want = sent.clone();
            let mut have = got.clone();
            want.sort();
            have.sort();
            ensure(want == have, || {
                format!("{} frames received, {} sent", got.len(), sent.len())
            })?;
            // Per flow (one port each here), frames keep their order: each queue's ring is
            // read in order and the backlog is first in, first out.
            let after: u64 = (0..8).map(|q| nic.queue_stats(q).rx_packets).sum();
            ensure(after - before == sent.len() as u64, || {
                format!("queues counted {} frames", after - before)
            })?;
            wait_sends_completed(&h, &nic, total).await?;
            let replies = host_got(&nv);
            ensure(
                !replies.is_empty() && replies.iter().all(|f| *f == reply),
                || format!("{} replies reached the host", replies.len()),
            )
        })
    });
}
