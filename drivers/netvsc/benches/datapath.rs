//! Hosted netvsc datapath benchmark (not a test; `scripts/bench` runs it).
//!
//! One NIC is brought up against hvemu's netvsp under the deterministic scheduler, with
//! the product's default buffer and ring sizes. Then the simulation is left and a loop of
//! plain synchronous calls moves frames:
//!
//! - `--dir rx`: the host queues 64 frames per queue at a time (256 UDP flows, so RSS
//!   spreads them over the queues), and the guest polls as `hvnet-net`'s interface poll does: a
//!   NIC batch opened, one `receive(1, ..)` per frame (at most 64), the batch ended.
//! - `--dir tx`: per poll the guest opens a batch, reaps send completions by receiving,
//!   `transmit`s up to 64 frames per queue (256 flows) and ends the batch; the host
//!   drains what it got.
//! - `--bulk-receive`: receive with one `receive(usize::MAX, ..)` call per poll instead.
//! - `--light`: 64 frames per round in all, not per queue (with 8 queues a poll then
//!   finds about 8 frames per queue, and each queue's batch costs weigh 8 times more).
//!
//! The measured loop is `hvnet_bench_loop`; everything that is not the guest driver is
//! behind a never-inlined boundary whose name starts with `hvnet_bench_` or behind the
//! counting adapters (`CountingBuffer`, `CountingHypervisor`), so a callgrind profile
//! restricted to the loop (`--toggle-collect=*hvnet_bench_loop*`) can be split into
//! driver, host emulator and network-side callback costs (see `scripts/bench`).
//!
//! Output: `key=value` lines (frames, seconds, pps, and per-packet counts of shared
//! memory accesses, bytes and hypercalls made by the guest in the loop).

#[path = "../tests/support/mod.rs"]
mod support;

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use hvemu::netvsp::{NetvspConfig, NetvspHandle, RxVerdict};
use hvemu::{DeviceId, HostConfig, VmbusHost};
use hvnet_netvsc::nic::{Nic, NicError};
use hvnet_netvsc::NetvscConfig;
use hvnet_runtime::irq::IrqSignal;
use hvnet_runtime::sim::{Config, Simulation};
use hvnet_runtime::{Duration, Handle};
use hvnet_vmbus::bus::VmBusConfig;
use hvnet_vmbus::memory::{DmaAllocator, MemoryError, SharedBuffer};
use hvnet_vmbus::platform::{HvStatus, Hypervisor, SynicMessage};
use support::*;

/// Frames the host queues per round in the RX loop, and frames sent between reaps in TX.
const BATCH: usize = 64;
/// Distinct UDP flows (source ports) the frames cycle through.
const FLOWS: u16 = 256;

// ---------------------------------------------------------------------------------------
// Counting adapters: what the guest does to shared memory and the hypervisor.

thread_local! {
    static COUNTS: RefCell<Counts> = RefCell::new(Counts::default());
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    reads: u64,
    read_bytes: u64,
    writes: u64,
    write_bytes: u64,
    loads: u64,
    stores: u64,
    signals: u64,
}

fn count(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| f(&mut c.borrow_mut()));
}

fn counts() -> Counts {
    COUNTS.with(|c| *c.borrow())
}

/// A guest DMA buffer that counts the guest's accesses, over the emulator's buffer.
struct CountingBuffer {
    inner: Box<dyn SharedBuffer>,
}

impl SharedBuffer for CountingBuffer {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn pfn(&self, index: usize) -> u64 {
        self.inner.pfn(index)
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        count(|c| {
            c.reads += 1;
            c.read_bytes += buf.len() as u64;
        });
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        count(|c| {
            c.writes += 1;
            c.write_bytes += data.len() as u64;
        });
        self.inner.write(offset, data)
    }

    fn load_u32(&self, offset: usize) -> Result<u32, MemoryError> {
        count(|c| c.loads += 1);
        self.inner.load_u32(offset)
    }

    fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemoryError> {
        count(|c| c.stores += 1);
        self.inner.store_u32(offset, value)
    }
}

struct CountingAllocator {
    inner: EmuAllocator,
}

impl DmaAllocator for CountingAllocator {
    fn alloc(&self, pages: usize) -> Result<Box<dyn SharedBuffer>, MemoryError> {
        let inner = self.inner.alloc(pages)?;
        Ok(Box::new(CountingBuffer { inner }))
    }
}

/// The guest's hypervisor, counting signals (HvSignalEvent hypercalls).
struct CountingHypervisor {
    inner: EmuHypervisor,
}

impl Hypervisor for CountingHypervisor {
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus> {
        self.inner
            .post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        count(|c| c.signals += 1);
        self.inner.signal_event(connection_id)
    }

    fn take_message(&self) -> Option<SynicMessage> {
        self.inner.take_message()
    }

    fn drain_events(&self, f: &mut dyn FnMut(u32)) {
        self.inner.drain_events(f)
    }

    fn interrupt(&self) -> &'static IrqSignal {
        self.inner.interrupt()
    }

    fn vp_index(&self) -> u32 {
        self.inner.vp_index()
    }
}

// ---------------------------------------------------------------------------------------
// The world: `support::net_world` with the counting adapters in between.

fn bench_world(handle: &Handle, seed: u64, config: NetvscConfig) -> NetWorld {
    let host_config = HostConfig {
        seed,
        ..HostConfig::default()
    };
    let machine = emu_machine_with(
        handle,
        host_config,
        VmBusConfig::default(),
        1 << 16,
        seed,
        |hv, mem| {
            (
                Rc::new(CountingHypervisor { inner: hv }),
                Rc::new(CountingAllocator { inner: mem }),
            )
        },
    );
    net_world_on(machine, config)
}

/// Brings one NIC up under the simulation; returns the world, the NIC, its device and the
/// host's handle. The simulation (and its host pump) is not run again afterwards.
fn bring_up(
    queues: u16,
) -> (
    Rc<NetWorld>,
    Rc<dyn Nic>,
    DeviceId,
    NetvspHandle,
    Simulation,
) {
    let seed = 1;
    let sim = Simulation::with_config(
        seed,
        Config {
            max_virtual_time: std::time::Duration::from_secs(600),
            ..Config::default()
        },
    );
    let h = sim.handle();
    // The product's defaults (16 MiB receive buffer, 1 MiB send buffer, 128-page rings).
    let config = NetvscConfig {
        queues,
        ..NetvscConfig::default()
    };
    let w = Rc::new(bench_world(&h, seed, config));
    spawn_host_pump(&h, &w);
    let w2 = w.clone();
    let (nic, dev, nv) = sim
        .run(async move {
            w2.bus
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let (dev, nv) = add_nic(&w2, 0, NetvspConfig::default());
            w2.registry.registered.acquire(1).await;
            let nic = w2
                .registry
                .lock
                .lock()
                .await
                .last()
                .cloned()
                .ok_or("no NIC registered")?;
            // Let the host's send indirection table and link indication arrive.
            for _ in 0..20 {
                nic.receive(usize::MAX, &mut |_| {});
                h.sleep(Duration::from_micros(200)).await;
            }
            Ok::<_, String>((nic, dev, nv))
        })
        .expect("simulation")
        .expect("bring-up");
    assert_eq!(nic.queue_count(), usize::from(queues), "queues granted");
    assert!(nic.link_up(), "link up");
    (w, nic, dev, nv, sim)
}

// ---------------------------------------------------------------------------------------
// Boundaries: never inlined, so the profile can tell them apart from the driver.

/// Host: lets every channel of the device run (write queued frames, read completions).
#[inline(never)]
fn hvnet_bench_host_poll(host: &RefCell<VmbusHost>, dev: DeviceId) {
    host_scope(|| host.borrow_mut().poll_device(dev));
}

/// Host: queues `frames` for the guest.
#[inline(never)]
fn hvnet_bench_host_inject(nv: &NetvspHandle, frames: &[&[u8]]) -> usize {
    host_scope(|| {
        frames
            .iter()
            .filter(|f| matches!(nv.send_to_guest(f), RxVerdict::Queued(_)))
            .count()
    })
}

/// Host: takes every frame the guest sent; returns how many.
#[inline(never)]
fn hvnet_bench_host_drain(nv: &NetvspHandle) -> usize {
    host_scope(|| {
        let mut n = 0;
        while let Some(f) = nv.take_from_guest() {
            black_box(&f);
            n += 1;
        }
        n
    })
}

/// Network side, RX: what a stack would do with a delivered frame is not the driver's
/// cost; this only looks at its length.
#[inline(never)]
fn hvnet_bench_deliver(frame: &[u8], bytes: &Cell<u64>) {
    bytes.set(bytes.get() + black_box(frame).len() as u64);
}

/// Network side, TX: writes the frame into the driver's buffer (the payload copy).
#[inline(never)]
fn hvnet_bench_fill(dst: &mut [u8], frame: &[u8]) {
    dst.copy_from_slice(frame);
}

// ---------------------------------------------------------------------------------------
// The loops.

struct Bench {
    w: Rc<NetWorld>,
    nic: Rc<dyn Nic>,
    dev: DeviceId,
    nv: NetvspHandle,
    frames: Vec<Vec<u8>>,
    /// Frames the host queues per RX round, and the guest sends per TX poll at most.
    per_round: usize,
}

/// Receives what the NIC has, the way `hvnet-net`'s interface poll does: one frame per
/// `receive` call, at most `BATCH` of them, or (`bulk`) all in one call. Returns frames.
#[inline(always)]
fn receive_poll(b: &Bench, bulk: bool, deliver: &mut dyn FnMut(&[u8])) -> usize {
    if bulk {
        return b.nic.receive(usize::MAX, deliver);
    }
    let mut got = 0;
    while got < BATCH {
        if b.nic.receive(1, deliver) == 0 {
            break;
        }
        got += 1;
    }
    got
}

/// RX: `n` frames from the host to the guest. Each round the host queues `per_round`
/// frames (loaded: `BATCH` per queue, RSS spreads the flows so that every queue has
/// about a poll's worth waiting), then the guest polls as the interface does until it has them all: a
/// batch opened, up to `BATCH` frames received, the batch ended (completions and read
/// space back to the host at once). Returns frames received.
#[inline(always)]
fn rx_loop(b: &Bench, bulk: bool, n: usize) -> usize {
    let bytes = Cell::new(0u64);
    let mut deliver = |f: &[u8]| hvnet_bench_deliver(f, &bytes);
    let mut got = 0;
    let mut next = 0;
    let mut batch: Vec<&[u8]> = Vec::with_capacity(BATCH * 8);
    let round = b.per_round;
    while got < n {
        batch.clear();
        let want = round.min(n - got);
        for _ in 0..want {
            batch.push(&b.frames[next % b.frames.len()]);
            next += 1;
        }
        let queued = hvnet_bench_host_inject(&b.nv, &batch);
        assert_eq!(queued, want, "host refused frames");
        let mut this = 0;
        let mut idle = 0;
        while this < want {
            hvnet_bench_host_poll(&b.w.host, b.dev);
            b.nic.begin_batch();
            let r = receive_poll(b, bulk, &mut deliver);
            b.nic.end_batch();
            this += r;
            idle = if r == 0 { idle + 1 } else { 0 };
            assert!(idle < 100, "RX stalled: {this} of {want} frames");
        }
        got += this;
    }
    black_box(bytes.get());
    got
}

/// TX: `n` frames from the guest to the host, up to `per_round` per poll (loaded:
/// `BATCH` per queue, many flows spread over the queues by the host's send table), as the
/// interface sends a burst: a batch opened, send completions reaped by receiving, the
/// frames sent until they are done or the send buffer is full, the batch ended (one
/// publication per queue); then the host takes what it got. Returns frames the host
/// got.
#[inline(always)]
fn tx_loop(b: &Bench, bulk: bool, n: usize) -> usize {
    let mut taken = 0;
    let mut sent = 0;
    let mut busy = 0;
    let burst = b.per_round;
    while sent < n {
        b.nic.begin_batch();
        receive_poll(b, bulk, &mut |_| {});
        let mut this = 0;
        while this < burst && sent < n {
            let frame = &b.frames[sent % b.frames.len()];
            let mut fill = |dst: &mut [u8]| hvnet_bench_fill(dst, frame);
            match b.nic.transmit(frame.len(), &mut fill) {
                Ok(()) => {
                    sent += 1;
                    this += 1;
                }
                Err(NicError::Busy) => break,
                Err(e) => panic!("transmit: {e:?}"),
            }
        }
        b.nic.end_batch();
        busy = if this == 0 { busy + 1 } else { 0 };
        assert!(busy < 100, "TX stalled");
        // The host completes the sends (it ran inside the signal, or runs now) and
        // hands the frames on.
        hvnet_bench_host_poll(&b.w.host, b.dev);
        taken += hvnet_bench_host_drain(&b.nv);
    }
    // The last completions, so that every run ends with all sections back.
    b.nic.begin_batch();
    receive_poll(b, bulk, &mut |_| {});
    b.nic.end_batch();
    taken
}

/// The measured loop (callgrind collects only inside it).
#[inline(never)]
fn hvnet_bench_loop(b: &Bench, rx: bool, bulk: bool, n: usize) -> usize {
    if rx {
        rx_loop(b, bulk, n)
    } else {
        tx_loop(b, bulk, n)
    }
}

/// The same loop, outside the measured function.
#[inline(never)]
fn warm_up(b: &Bench, rx: bool, bulk: bool, n: usize) -> usize {
    if rx {
        rx_loop(b, bulk, n)
    } else {
        tx_loop(b, bulk, n)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: datapath [--frames N] [--size 64|1500] [--queues 1|8] [--dir rx|tx] [--bulk-receive] [--light]"
    );
    std::process::exit(2)
}

fn main() {
    let mut frames = 200_000usize;
    let mut size = 64usize;
    let mut queues = 8u16;
    let mut rx = true;
    let mut bulk = false;
    let mut light = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--frames" => frames = value().parse().unwrap_or_else(|_| usage()),
            "--size" => size = value().parse().unwrap_or_else(|_| usage()),
            "--queues" => queues = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => {
                rx = match value().as_str() {
                    "rx" => true,
                    "tx" => false,
                    _ => usage(),
                }
            }
            "--bulk-receive" => bulk = true,
            "--light" => light = true,
            // `cargo bench` passes --bench; ignore it.
            "--bench" => {}
            _ => usage(),
        }
    }
    if !(60..=1514).contains(&size) || !(1..=8).contains(&queues) {
        usage();
    }

    let (w, nic, dev, nv, _sim) = bring_up(queues);
    // Ethernet + IPv4 + UDP headers are 42 bytes; `size` is the frame without FCS.
    let frames_list = (0..FLOWS)
        .map(|i| udp_frame(nic.mac(), 1000 + i, size - 42, i as u8))
        .collect();
    let b = Bench {
        w,
        nic,
        dev,
        nv,
        frames: frames_list,
        // Loaded: a poll's worth per queue (RSS and the send table spread the flows).
        per_round: if light {
            BATCH
        } else {
            BATCH * usize::from(queues)
        },
    };
    let warm = warm_up(&b, rx, bulk, 1024);
    assert_eq!(warm, 1024, "warm-up moved {warm} frames");

    let before = counts();
    let stats_before: Vec<_> = (0..queues).map(|q| b.nic.queue_stats(q.into())).collect();
    let start = Instant::now();
    let moved = hvnet_bench_loop(&b, rx, bulk, frames);
    let secs = start.elapsed().as_secs_f64();
    let after = counts();
    assert_eq!(moved, frames, "moved {moved} of {frames} frames");

    let per = |a: u64, b: u64| (a - b) as f64 / frames as f64;
    let active: Vec<String> = (0..queues)
        .map(|q| {
            let s = b.nic.queue_stats(q.into());
            let s0 = stats_before[usize::from(q)];
            if rx {
                (s.rx_packets - s0.rx_packets).to_string()
            } else {
                (s.tx_packets - s0.tx_packets).to_string()
            }
        })
        .collect();
    let netvsc = as_netvsc(&b.nic);
    println!("dir={}", if rx { "rx" } else { "tx" });
    println!("size={size}");
    println!("receive={}", if bulk { "bulk" } else { "per-frame" });
    println!("load={}", if light { "light" } else { "loaded" });
    println!("queues={queues}");
    println!("frames={frames}");
    println!("seconds={secs:.6}");
    println!("pps={:.0}", frames as f64 / secs);
    println!("per_queue_packets={}", active.join(","));
    println!("malformed={}", netvsc.counters().malformed);
    println!("shm_reads_per_pkt={:.3}", per(after.reads, before.reads));
    println!(
        "shm_read_bytes_per_pkt={:.1}",
        per(after.read_bytes, before.read_bytes)
    );
    println!("shm_writes_per_pkt={:.3}", per(after.writes, before.writes));
    println!(
        "shm_write_bytes_per_pkt={:.1}",
        per(after.write_bytes, before.write_bytes)
    );
    println!("shm_loads_per_pkt={:.3}", per(after.loads, before.loads));
    println!("shm_stores_per_pkt={:.3}", per(after.stores, before.stores));
    println!(
        "shm_accesses_per_pkt={:.3}",
        per(
            after.reads + after.writes + after.loads + after.stores,
            before.reads + before.writes + before.loads + before.stores
        )
    );
    println!("signals_per_pkt={:.3}", per(after.signals, before.signals));
    let v = b.w.host.borrow().violations().len() + b.w.memory.violations().len();
    println!("host_violations={v}");
}
