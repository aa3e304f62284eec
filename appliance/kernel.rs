//! The 64-bit kernel entry and the boot sequence.

use alloc::boxed::Box;
use alloc::rc::Rc;
use core::fmt::Write;
use core::sync::atomic::{AtomicU8, Ordering};
use core::time::Duration;

use hvnet_hyperv::{Cpuid, CpuidResult, HyperVInfo, Hypervisor};
use hvnet_ic::{register_ic_drivers, Clock, IcDrivers, PowerControl};
use hvnet_net::{AzureConfig, EchoConfig, InterfaceManager, ManagerConfig};
use hvnet_netvsc::{NetvscConfig, NetvscDriver};
use hvnet_runtime::irq::IrqSignal;
use hvnet_runtime::{Executor, Handle};
use hvnet_vmbus::bus::{ConnectError, VmBus, VmBusConfig};
use log::{error, info, warn};

use crate::arch::{apic, cpu, gdt, idt, pic, serial};
use crate::boot::info::{BootInfo, PhysMemory};
use crate::config::{Config, ExitMode, TestAction, UnknownWord};
use crate::guest_info::NetworkKvp;
use crate::hyperv::HvPlatform;
use crate::memory::{dma::FrameDma, frames::FRAME_SIZE, heap, layout, paging};
use crate::platform::KernelPlatform;
use crate::{acpi, calendar, hyperv, logger, time};

const MIB: u64 = 1 << 20;

/// How fatal stops end (set from the command line; `Halt` until then).
static EXIT_MODE: AtomicU8 = AtomicU8::new(0); // 0: halt
const EXIT_DEBUG_PORT: u8 = 1;

/// Loader memory as the boot identity map shows it: the first 4 GiB.
struct LoaderMemory;

impl PhysMemory for LoaderMemory {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        if addr == 0 || end > (1 << 32) {
            return None;
        }
        // SAFETY: the boot page tables identity-map 0..4 GiB and the loader's structures
        // are RAM it reserved for us; nothing writes them while we copy them out.
        Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
    }
}

struct NativeCpuid;

impl Cpuid for NativeCpuid {
    fn cpuid(&self, leaf: u32) -> CpuidResult {
        let r = cpu::cpuid(leaf);
        CpuidResult {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }
}

/// Stops after a fatal error: exits the emulator with failure under tests, else halts.
pub fn fatal_stop() -> ! {
    if EXIT_MODE.load(Ordering::Relaxed) == EXIT_DEBUG_PORT {
        cpu::debug_exit(cpu::DebugExit::Failure);
    }
    cpu::halt_forever()
}

/// Ends a successful test run.
fn test_success() -> ! {
    info!("hvnet: test passed, exiting");
    if EXIT_MODE.load(Ordering::Relaxed) == EXIT_DEBUG_PORT {
        cpu::debug_exit(cpu::DebugExit::Success);
    }
    info!("hvnet: powering off");
    acpi::power_off();
    warn!("hvnet: power-off did not take effect; halting");
    cpu::halt_forever()
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let mut w = serial::EmergencyWriter;
    let _ = match panic.location() {
        Some(l) => writeln!(
            w,
            "\n*** PANIC at {}:{}: {} ***",
            l.file(),
            l.line(),
            panic.message()
        ),
        None => writeln!(w, "\n*** PANIC: {} ***", panic.message()),
    };
    fatal_stop()
}

/// Called by `boot/entry.rs` in 64-bit mode with interrupts off.
#[unsafe(no_mangle)]
extern "C" fn kernel_entry(protocol: u32, info: u64) -> ! {
    serial::init();
    logger::init(log::LevelFilter::Info);
    gdt::init();
    idt::init();

    let boot = match BootInfo::parse(protocol, info, &LoaderMemory) {
        Ok(b) => b,
        Err(e) => {
            error!("boot: unusable loader information: {e}");
            fatal_stop();
        }
    };
    let mut unknown: [Option<UnknownWord<'_>>; 8] = [None; 8];
    let mut unknown_count = 0;
    let config = Config::parse(boot.cmdline(), |w| {
        if let Some(slot) = unknown.get_mut(unknown_count) {
            *slot = Some(w);
        }
        unknown_count += 1;
    });
    log::set_max_level(config.log_level);
    if config.exit == ExitMode::DebugPort {
        EXIT_MODE.store(EXIT_DEBUG_PORT, Ordering::Relaxed);
    }
    info!(
        "hvnet {} booting via {}; command line \"{}\"",
        env!("CARGO_PKG_VERSION"),
        boot.loader,
        boot.cmdline()
    );
    for w in unknown.iter().flatten() {
        warn!("config: ignoring unknown command-line word \"{}\"", w.0);
    }
    if unknown_count > unknown.len() {
        warn!(
            "config: {} more unknown words ignored",
            unknown_count - unknown.len()
        );
    }
    if boot.cmdline_truncated {
        warn!("config: command line truncated");
    }
    if boot.regions_dropped > 0 {
        warn!(
            "memory: {} memory-map entries beyond the first {} ignored",
            boot.regions_dropped,
            boot.memory_regions().len()
        );
    }

    init_memory(&boot);

    pic::disable();
    match apic::init(|phys| paging::map_mmio(phys, FRAME_SIZE)) {
        Some(apic::Flavour::X2Apic) => info!("apic: x2APIC, id {}", apic::id()),
        Some(apic::Flavour::XApic { base }) => info!("apic: xAPIC at {base:#x}, id {}", apic::id()),
        None => {
            error!("apic: could not map the local APIC");
            fatal_stop();
        }
    }
    match time::calibrate() {
        Some(c) => info!(
            "time: TSC {}.{:03} MHz, APIC timer {} ticks/ms (calibrated against the PIT)",
            c.tsc_khz / 1000,
            c.tsc_khz % 1000,
            c.apic_ticks_per_ms
        ),
        None => {
            error!("time: no PIT to calibrate the clock against");
            fatal_stop();
        }
    }

    let mut brand = [0u8; 48];
    info!("cpu: {}", cpu::brand(&mut brand));
    match acpi::init(boot.rsdp) {
        Ok(s) => info!(
            "acpi: {} CPU(s) enabled ({} possible), {} I/O APIC(s), power-off {}",
            s.cpus_enabled,
            s.cpus_possible,
            s.io_apics,
            if s.power_off { "via S5" } else { "unavailable" }
        ),
        Err(e) => warn!("acpi: tables unusable: {e}"),
    }

    let hypervisor = hvnet_hyperv::detect(&NativeCpuid);
    info!("hypervisor: {hypervisor}");
    if let Hypervisor::HyperV(i) = &hypervisor {
        hyperv::init_clock(i);
    }

    let executor = Executor::new(KernelPlatform);
    let handle = executor.handle();
    handle.spawn("appliance", appliance(handle.clone(), hypervisor, config));
    // From here on interrupts are enabled only inside the idle path.
    executor.run()
}

/// Frames, page tables and heap, from the memory map.
fn init_memory(boot: &BootInfo) {
    let image = layout::kernel_image();
    {
        let mut frames = paging::FRAMES.lock();
        for r in boot
            .memory_regions()
            .iter()
            .filter(|r| r.kind == crate::boot::info::MemoryKind::Usable)
        {
            if let Err(e) = frames.add_free(r.start, r.end()) {
                warn!(
                    "memory: overlapping memory-map entry {:#x}..{:#x} ignored ({e:?})",
                    r.start,
                    r.end()
                );
            }
        }
        // The first MiB holds firmware data and (later) the AP start-up trampoline.
        let low = frames.reserve(0, MIB);
        let kernel = frames.reserve(image.0, image.1);
        if low.is_err() || kernel.is_err() {
            error!("memory: memory map too fragmented to reserve the kernel image");
            fatal_stop();
        }
    }
    let summary = match paging::init(boot) {
        Ok(s) => s,
        Err(e) => {
            error!("memory: page tables could not be built: {e:?}");
            fatal_stop();
        }
    };
    let usable = boot.usable_bytes();
    // A quarter of RAM, between 4 and 64 MiB: device buffers come from frames, not the heap.
    let heap_size = (usable / 4).clamp(4 * MIB, 64 * MIB) & !(2 * MIB - 1);
    let Some(heap_start) = paging::FRAMES
        .lock()
        .alloc(heap_size / FRAME_SIZE, 2 * MIB, u64::MAX)
    else {
        error!(
            "memory: no {} MiB run of RAM for the heap ({} MiB usable)",
            heap_size / MIB,
            usable / MIB
        );
        fatal_stop();
    };
    heap::init(heap_start, heap_size as usize);
    info!(
        "memory: {} MiB usable in {} map entries ({} MiB mapped), kernel {} KiB at {:#x}, heap {} MiB at {:#x}, {} page-table frames",
        usable / MIB,
        boot.memory_regions().len(),
        summary.mapped_ram / MIB,
        (image.1 - image.0) / 1024,
        image.0,
        heap_size / MIB,
        heap_start,
        summary.table_frames
    );
}

/// The appliance's main task: report readiness, then run what the command line asks for.
async fn appliance(handle: Handle, hypervisor: Hypervisor, config: Config) {
    // Kept for the appliance's life (its tasks hold them too).
    let _network = match hypervisor {
        Hypervisor::HyperV(i) => match i.missing_for_vmbus() {
            Some(what) => {
                info!("hvnet: ready, no VMBus (Hyper-V without {what})");
                None
            }
            None => start_vmbus(&handle, &i, &config).await,
        },
        _ => {
            info!("hvnet: ready, no VMBus (not Hyper-V)");
            None
        }
    };
    let (used, size) = heap::stats();
    log::debug!(
        "heap: {used} of {size} bytes in use, {} failed allocations",
        heap::failures()
    );

    match config.test {
        None => {}
        Some(TestAction::Ready) => {
            // Prove the timer interrupt path: the executor must sleep and be woken by the
            // LAPIC one-shot, with nothing else to do.
            let requested = Duration::from_millis(20);
            let t0 = handle.now();
            handle.sleep(requested).await;
            let slept = handle.now().saturating_duration_since(t0);
            info!(
                "timer: slept {} us for a {} us request",
                slept.as_micros(),
                requested.as_micros()
            );
            // A boxed allocation round trip shows the heap works from tasks.
            let probe = Box::new([0u8; 4096]);
            if slept < requested || probe.len() != 4096 {
                error!("timer: woke early");
                fatal_stop();
            }
            // The device-interrupt path: vector -> IrqSignal -> this task, via a self-IPI.
            static TEST_IRQ: IrqSignal = IrqSignal::named("self-test IPI");
            idt::register(idt::FIRST_DEVICE_VECTOR, &TEST_IRQ);
            apic::self_ipi(idt::FIRST_DEVICE_VECTOR);
            match handle
                .timeout(Duration::from_millis(100), TEST_IRQ.wait())
                .await
            {
                Ok(()) => info!(
                    "irq: self-IPI on vector {:#x} woke its task",
                    idt::FIRST_DEVICE_VECTOR
                ),
                Err(_) => {
                    error!("irq: self-IPI never arrived");
                    fatal_stop();
                }
            }
            if idt::unexpected_interrupts() != 0 {
                warn!(
                    "irq: {} interrupts on unregistered vectors",
                    idt::unexpected_interrupts()
                );
            }
            test_success();
        }
        Some(TestAction::PageFault) => {
            info!("test: reading unmapped address 0x4000_0000_0000 (expect a page-fault report)");
            // SAFETY: deliberately unsound test action: the read faults and never returns.
            let v = unsafe { core::ptr::read_volatile(0x4000_0000_0000 as *const u64) };
            error!("test: unmapped read returned {v:#x}; no fault was taken");
            fatal_stop();
        }
        Some(TestAction::StackOverflow) => {
            info!("test: recursing into the stack guard page (expect a stack-overflow report)");
            let depth = recurse(core::hint::black_box(0));
            error!("test: recursion returned at depth {depth}; no fault was taken");
            fatal_stop();
        }
    }
}

/// What the running appliance keeps alive: the bus, the network side, the IC drivers.
struct Network {
    _bus: VmBus,
    _manager: InterfaceManager,
    _ic: IcDrivers,
}

/// Brings up the hypercall page and SynIC, the network side, the netvsc and integration
/// service drivers, connects VMBus (NIC offers are probed from then on, also when
/// hot-added later) and prints the ready line.
async fn start_vmbus(handle: &Handle, info: &HyperVInfo, config: &Config) -> Option<Network> {
    let platform = match HvPlatform::init(info) {
        Ok(p) => p,
        Err(e) => {
            error!("hyperv: platform bring-up failed: {e}");
            info!("hvnet: ready, VMBus unavailable: {e}");
            return None;
        }
    };
    let bus = VmBus::new(
        handle,
        Rc::new(platform),
        Rc::new(FrameDma),
        VmBusConfig::default(),
    );
    let mut net_config = ManagerConfig::default();
    if config.echo {
        net_config.interface.echo = Some(EchoConfig::default());
    }
    net_config.azure = azure_config(config);
    let manager = InterfaceManager::new(handle.clone(), net_config);
    let netvsc = NetvscConfig {
        queues: config.queues,
        ..NetvscConfig::default()
    };
    bus.register_driver(Rc::new(NetvscDriver::new(Rc::new(manager.clone()), netvsc)));
    let power = Rc::new(HostPowerRequest {
        handle: handle.clone(),
        bus: bus.clone(),
        requested: core::cell::Cell::new(false),
    });
    let status = manager.clone();
    let ic = register_ic_drivers(
        &bus,
        power,
        Rc::new(WallClock),
        Rc::new(NetworkKvp::new(move || status.snapshot())),
    );
    match bus.connect().await {
        Ok(version) => {
            let relids = bus.live_relids();
            info!(
                "vmbus: version {version}, {} channel offer(s), relids {relids:?}",
                relids.len()
            );
            info!("hvnet: ready, VMBus {version}");
            Some(Network {
                _bus: bus,
                _manager: manager,
                _ic: ic,
            })
        }
        Err(e) => {
            let reason = match e {
                ConnectError::NoCommonVersion => "the host accepted no offered version",
                ConnectError::OutOfMemory => "no memory for the connection pages",
            };
            error!("vmbus: connect failed: {reason}");
            info!("hvnet: ready, VMBus unavailable: {reason}");
            None
        }
    }
}

/// The Azure agent's settings from the command line.
fn azure_config(config: &Config) -> AzureConfig {
    let mut azure = AzureConfig {
        enabled: config.azure,
        ..AzureConfig::default()
    };
    if let Some(a) = config.wireserver {
        azure.wireserver = a.into();
    }
    if let Some(a) = config.imds {
        azure.imds = a.into();
    }
    azure
}

/// Hyper-V's "Shut Down" / "Restart" (the shutdown integration service): close every
/// channel (the integration services' too) and UNLOAD VMBus so the host sees a clean guest
/// exit, then power off through ACPI (or reset).
struct HostPowerRequest {
    handle: Handle,
    bus: VmBus,
    requested: core::cell::Cell<bool>,
}

impl PowerControl for HostPowerRequest {
    fn shutdown(&self, reboot: bool) {
        if self.requested.replace(true) {
            return;
        }
        let what = if reboot { "restart" } else { "shutdown" };
        info!("hvnet: the host requested a {what}; closing VMBus channels");
        let bus = self.bus.clone();
        // The IC channel task called us: the work runs in a task of its own, so that task
        // can finish answering while the channels close under it.
        self.handle.spawn("power", async move {
            bus.unload().await;
            let (used, _) = heap::stats();
            info!("hvnet: VMBus unloaded ({used} heap bytes in use); {what} now");
            if reboot {
                acpi::reset();
                warn!("hvnet: reset did not take effect; halting");
            } else {
                acpi::power_off();
                warn!("hvnet: ACPI power-off did not take effect; halting");
            }
            cpu::halt_forever();
        });
    }
}

/// The wall clock, as the time-synchronization service sets it.
struct WallClock;

impl Clock for WallClock {
    fn set_time(&self, unix_100ns: u64) {
        let first = time::wall_clock_ns().is_none();
        time::set_wall_clock(unix_100ns.saturating_mul(100));
        let date = calendar::format_utc(unix_100ns / 10_000_000);
        let date = core::str::from_utf8(&date).unwrap_or("?");
        if first {
            info!("timesync: wall clock set to {date} by the host");
        } else {
            log::debug!("timesync: wall clock set to {date}");
        }
    }

    fn reference_counter(&self) -> Option<u64> {
        time::reference_100ns()
    }
}

/// Uses a page of stack per level until the guard page below the stack is hit.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut pad = [0u8; 4096];
    core::hint::black_box(&mut pad);
    if depth == u64::MAX {
        return depth;
    }
    recurse(depth + 1) + u64::from(pad[depth as usize % 4096])
}
