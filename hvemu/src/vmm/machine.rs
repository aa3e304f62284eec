//! The VM: KVM setup, the vCPU loop and its exits, and the host work between exits (see
//! the module docs of [`crate::vmm`] for the design).

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvemu::{ChannelState, GuestMemory, HostConfig, VmbusHost};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_enable_cap, kvm_fpu, kvm_msi, kvm_msr_entry, kvm_pit_config,
    kvm_regs, kvm_segment, CpuId, Msrs, KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES,
    KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VcpuFd, VmFd,
};

use super::acpi::{PM1A_CNT_PORT, PM1A_EVT_PORT, S5_SLP_TYP, SLP_EN};
use super::boot::{self, Segment};
use super::cli::{format_mac, Request, RunOptions, SerialTarget};
use super::control::{Answer, Server};
use super::devices::{Serial, COM1, DEBUG_EXIT_PORT, HYPERCALL_PORT};
use super::elf;
use super::hyperv::{self, HyperV, WriteEffect};
use super::ic::IntegrationServices;
use super::kick::{self, Kicker};
use super::nic::Nics;
use super::ram::RamMapping;

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// Where KVM's VMX real-mode TSS goes (ignored by AMD and PVM; harmless below the LAPIC).
const TSS_ADDRESS: usize = 0xFFFB_D000;

/// Why the VM could not be set up; each maps to an exit status.
#[derive(Debug)]
pub enum SetupError {
    /// /dev/kvm missing, inaccessible or lacking a capability (status 2).
    Kvm(String),
    /// The kernel file is unreadable or not a PVH ELF, or does not fit (status 2).
    Image(String),
    /// Anything else (status 1).
    Other(String),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kvm(s) | Self::Image(s) | Self::Other(s) => f.write_str(s),
        }
    }
}

fn other(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError + '_ {
    move |e| SetupError::Other(format!("{what}: {e}"))
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// isa-debug-exit port write of this value.
    DebugExit(u32),
    /// ACPI S5.
    PowerOff,
    /// SIGINT/SIGTERM.
    Signal,
    /// The guest or KVM failed (triple fault, internal error, ...).
    Failed(String),
}

impl Stop {
    /// The VMM's exit status for this stop (QEMU's convention for the debug port).
    pub fn exit_status(&self) -> u8 {
        match self {
            Stop::DebugExit(v) => ((v << 1) | 1) as u8,
            Stop::PowerOff => 0,
            Stop::Signal => 130,
            Stop::Failed(_) => 1,
        }
    }
}

/// Exit counters.
#[derive(Clone, Copy, Debug, Default)]
struct ExitStats {
    total: u64,
    io: u64,
    msr: u64,
    mmio: u64,
    kicks: u64,
    hlt: u64,
}

/// What the loop must do after an exit was handled.
enum After {
    Nothing,
    /// The hypercall page's `out`: read the registers, run the call.
    Hypercall,
    /// SynIC state changed: deliver what is pending.
    Deliver,
    /// The guest enabled the reference TSC page.
    PublishTsc,
    Stop(Stop),
}

/// Everything but the vCPU: owns the VM file descriptor, RAM and the emulated platform.
/// Field order is drop order: the VM goes before the RAM it maps.
struct Platform {
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemory,
    host: VmbusHost,
    hv: HyperV,
    serial: Serial,
    nics: Nics,
    ics: IntegrationServices,
    control: Option<Server>,
    /// Set by the VMBus host when it queued a message or set an event flag.
    notified: Rc<Cell<bool>>,
    /// Set by the ticker thread every poll period.
    tick: Arc<AtomicBool>,
    stats: ExitStats,
    started: Instant,
    mem_bytes: u64,
    unknown_ports: Vec<u16>,
    ram: Arc<RamMapping>,
}

/// The VM.
pub struct Machine {
    vcpu: VcpuFd,
    p: Platform,
    tsc_khz: Option<u32>,
    ticker_stop: Arc<AtomicBool>,
    /// `HVEMU_PROFILE=1`: guest RIP samples taken at every kick, by address.
    profile: Option<std::collections::BTreeMap<u64, u64>>,
}

/// Boots `opts` and runs the VM to its end; returns the process status.
pub fn run(opts: RunOptions) -> ExitCode {
    let started = Instant::now();
    let mut m = match Machine::build(&opts) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("hvemu-vmm: {e}");
            return ExitCode::from(match e {
                SetupError::Kvm(_) | SetupError::Image(_) => 2,
                SetupError::Other(_) => 1,
            });
        }
    };
    let setup = started.elapsed();
    let stop = m.run_loop();
    m.p.serial.flush();
    let total = started.elapsed();
    let ready =
        m.p.serial
            .ready
            .as_ref()
            .map(|(t, _)| format!("{:.3} s", t.duration_since(started).as_secs_f64()))
            .unwrap_or_else(|| "never".into());
    let why = match &stop {
        Stop::DebugExit(v) => format!("debug-exit port value {v:#x}"),
        Stop::PowerOff => "ACPI power-off".into(),
        Stop::Signal => "signal".into(),
        Stop::Failed(e) => format!("failure: {e}"),
    };
    eprintln!(
        "hvemu-vmm: VM stopped ({why}), status {}; setup {:.3} s, ready line at {ready}, total {:.3} s, {} exits",
        stop.exit_status(),
        setup.as_secs_f64(),
        total.as_secs_f64(),
        m.p.stats.total
    );
    let open =
        m.p.host
            .channels()
            .iter()
            .filter(|c| c.state == ChannelState::Open)
            .count();
    let hs = m.p.host.stats();
    eprintln!(
        "hvemu-vmm: VMBus at stop: {open} channel(s) open, {} GPADL(s) live, UNLOAD received {} time(s), {} violation(s)",
        hs.live_gpadls,
        hs.unloads,
        hs.violations.len()
    );
    if let Some(samples) = &m.profile {
        m.print_profile(samples);
    }
    m.ticker_stop.store(true, Ordering::Relaxed);
    kick::disarm();
    ExitCode::from(stop.exit_status())
}

fn kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: 0,
        unusable: u8::from(s.present == 0),
        padding: 0,
    }
}

/// Opens `/dev/kvm`, or the device named by `HVEMU_KVM_DEVICE` (for tests of the error
/// path).
fn open_kvm() -> Result<Kvm, SetupError> {
    let path = std::env::var("HVEMU_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| SetupError::Kvm(format!("bad KVM device path {path:?}")))?;
    match Kvm::new_with_path(&cpath) {
        Ok(k) => Ok(k),
        Err(e) => {
            let msg = match e.errno() {
                libc::ENOENT => format!(
                    "{path} does not exist: this machine offers no KVM \
                     (enable virtualization or load kvm_intel/kvm_amd)"
                ),
                libc::EACCES | libc::EPERM => {
                    format!("no permission to open {path} (run as root or join the kvm group)")
                }
                _ => format!("cannot open {path}: {e}"),
            };
            Err(SetupError::Kvm(msg))
        }
    }
}

/// CPUID brand string (48 bytes, NUL-padded).
const BRAND: &[u8; 48] = b"hvemu-vmm virtual CPU (KVM, user-space Hyper-V)\0";

/// The guest CPUID: KVM's supported leaves, with the hypervisor leaves replaced by
/// Hyper-V's, the hypervisor-present bit set and the APIC id of VP 0.
fn guest_cpuid(kvm: &Kvm, vcpus: u32) -> Result<CpuId, SetupError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SetupError::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| {
            !(0x4000_0000..=0x4FFF_FFFF).contains(&e.function)
                && !(0x8000_0002..=0x8000_0004).contains(&e.function)
        })
        .copied()
        .collect();
    // KVM reports no brand string; name the CPU after the VMM.
    let brand: Vec<u32> = BRAND
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for e in &mut entries {
        match e.function {
            0x8000_0000 => e.eax = e.eax.max(0x8000_0004),
            1 => {
                e.ecx |= 1 << 31; // hypervisor present
                e.ebx = (e.ebx & 0x0000_FFFF) | (1 << 16); // APIC id 0, one logical CPU
            }
            0xB | 0x1F => e.edx = 0, // x2APIC id
            _ => {}
        }
    }
    let brand_leaves = (0..3u32).map(|i| {
        let b = &brand[i as usize * 4..];
        (0x8000_0002 + i, [b[0], b[1], b[2], b[3]])
    });
    for (function, [eax, ebx, ecx, edx]) in
        hyperv::cpuid_leaves(vcpus).into_iter().chain(brand_leaves)
    {
        entries.push(kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).map_err(|e| SetupError::Other(format!("CPUID table: {e:?}")))
}

impl Machine {
    /// Creates the VM, loads the kernel and prepares everything up to the first run.
    pub fn build(opts: &RunOptions) -> Result<Machine, SetupError> {
        let path = opts.kernel.display();
        let file = std::fs::read(&opts.kernel)
            .map_err(|e| SetupError::Image(format!("cannot read kernel {path}: {e}")))?;
        let image = elf::parse(&file).map_err(|e| SetupError::Image(format!("{path}: {e}")))?;
        let plan = boot::plan(&image, &file, opts.mem_bytes, &opts.cmdline, opts.cpus)
            .map_err(|e| SetupError::Image(format!("{path}: {e}")))?;

        let kvm = open_kvm()?;
        if kvm.get_api_version() != 12 {
            return Err(SetupError::Kvm(format!(
                "unexpected KVM API version {}",
                kvm.get_api_version()
            )));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(SetupError::Kvm(format!("this KVM lacks {name}")));
            }
        }
        log::debug!(
            "kvm: in-kernel Hyper-V SynIC {}, TSC control {}",
            kvm.check_extension(Cap::HypervSynic),
            kvm.check_extension(Cap::TscControl)
        );

        let vm = kvm.create_vm().map_err(other("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(TSS_ADDRESS) {
            log::debug!("KVM_SET_TSS_ADDR: {e} (ignored)");
        }
        vm.create_irq_chip().map_err(other("KVM_CREATE_IRQCHIP"))?;
        // KVM_PIT_SPEAKER_DUMMY makes KVM decode port 0x61 too (channel 2 gate and output,
        // what PIT calibration polls); without it the port falls through to user space.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(other("KVM_CREATE_PIT2"))?;

        let ram = RamMapping::new(opts.mem_bytes).map_err(|e| {
            SetupError::Other(format!(
                "cannot map {} MiB of guest RAM: {e}",
                opts.mem_bytes >> 20
            ))
        })?;
        ram.register(&vm)
            .map_err(|e| SetupError::Other(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
        let mem = ram.guest_memory();
        for (gpa, bytes) in &plan.writes {
            mem.write(*gpa, bytes)
                .map_err(|e| SetupError::Image(format!("{path}: {e}")))?;
        }

        // Synthetic MSRs to user space: deny the range in the filter, exit on denial.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL,
        );
        vm.enable_cap(&cap)
            .map_err(other("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)"))?;
        let deny = [0u8; 32];
        vm.set_msr_filter(
            MsrFilterDefaultAction::ALLOW,
            &[MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: *hyperv::MSR_RANGE.start(),
                msr_count: 256,
                bitmap: &deny,
            }],
        )
        .map_err(other("KVM_X86_SET_MSR_FILTER"))?;

        let mut vcpu = vm.create_vcpu(0).map_err(other("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&guest_cpuid(&kvm, opts.cpus)?)
            .map_err(other("KVM_SET_CPUID2"))?;
        let e = &plan.entry;
        let mut sregs = vcpu.get_sregs().map_err(other("KVM_GET_SREGS"))?;
        sregs.cs = kvm_segment(&e.cs);
        let data = kvm_segment(&e.data);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment(&e.tr);
        sregs.ldt = kvm_segment(&Segment {
            type_: 2,
            ..Segment::default()
        });
        sregs.gdt = kvm_dtable {
            base: e.gdt.0,
            limit: e.gdt.1,
            ..Default::default()
        };
        sregs.idt = kvm_dtable::default();
        sregs.cr0 = e.cr0;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(other("KVM_SET_SREGS"))?;
        vcpu.set_regs(&kvm_regs {
            rip: e.rip,
            rbx: e.rbx,
            rflags: e.rflags,
            ..Default::default()
        })
        .map_err(other("KVM_SET_REGS"))?;
        vcpu.set_fpu(&kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            ..Default::default()
        })
        .map_err(other("KVM_SET_FPU"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&k| k > 0);

        let out: Box<dyn Write + Send> = match &opts.serial {
            SerialTarget::Stdout => Box::new(io::stdout()),
            SerialTarget::File(p) => Box::new(BufWriter::new(File::create(p).map_err(|e| {
                SetupError::Other(format!("cannot create serial log {}: {e}", p.display()))
            })?)),
        };

        let mut host = VmbusHost::new(
            HostConfig {
                vp_count: opts.cpus,
                ..HostConfig::default()
            },
            mem.clone(),
        );
        let notified = Rc::new(Cell::new(false));
        let flag = notified.clone();
        host.set_notify(Box::new(move || flag.set(true)));

        let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
        let kicker = kick::arm(immediate_exit)
            .map_err(|e| SetupError::Other(format!("installing signal handlers: {e}")))?;
        let tick = Arc::new(AtomicBool::new(false));
        let ticker_stop = Arc::new(AtomicBool::new(false));
        start_ticker(
            Duration::from_millis(opts.poll_ms),
            kicker,
            tick.clone(),
            ticker_stop.clone(),
        )
        .map_err(|e| SetupError::Other(format!("starting the poll thread: {e}")))?;
        let control =
            match &opts.control {
                Some(p) => Some(Server::start(p, kicker).map_err(|e| {
                    SetupError::Other(format!("control socket {}: {e}", p.display()))
                })?),
                None => None,
            };

        let mut nics = Nics::new();
        nics.set_waker(kicker, tick.clone());
        let ics = IntegrationServices::add(&mut host);
        let mut p = Platform {
            vm,
            _kvm: kvm,
            mem,
            host,
            hv: HyperV::new(),
            serial: Serial::new(out),
            nics,
            ics,
            control,
            notified,
            tick,
            stats: ExitStats::default(),
            started: Instant::now(),
            mem_bytes: opts.mem_bytes,
            unknown_ports: Vec::new(),
            ram,
        };
        for spec in &opts.nics {
            p.nics
                .add(&mut p.host, spec)
                .map_err(|e| SetupError::Other(format!("--nic: {e}")))?;
        }
        log::info!(
            "vmm: {} MiB RAM, entry {:#x}, kernel {:#x}..{:#x}, RSDP {:#x}, TSC {} kHz",
            opts.mem_bytes >> 20,
            image.pvh_entry,
            image.span().0,
            image.span().1,
            plan.acpi.rsdp(),
            tsc_khz.unwrap_or(0)
        );
        Ok(Machine {
            vcpu,
            p,
            tsc_khz,
            ticker_stop,
            profile: std::env::var_os("HVEMU_PROFILE").map(|_| Default::default()),
        })
    }

    /// Runs the vCPU until the guest stops.
    pub fn run_loop(&mut self) -> Stop {
        loop {
            if kick::shutdown_requested() {
                return Stop::Signal;
            }
            self.p.service();
            let after = match self.vcpu.run() {
                Ok(exit) => self.p.handle_exit(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    self.p.stats.kicks += 1;
                    if let Some(samples) = &mut self.profile {
                        if let Ok(r) = self.vcpu.get_regs() {
                            *samples.entry(r.rip).or_default() += 1;
                        }
                        // Keep the ticker running even without NICs.
                        self.p.tick.store(false, Ordering::Release);
                    }
                    After::Nothing
                }
                Err(e) => After::Stop(Stop::Failed(format!("KVM_RUN: {e}"))),
            };
            match after {
                After::Nothing => {}
                After::Deliver => self.p.deliver(),
                After::Hypercall => match self.vcpu.get_regs() {
                    Ok(r) => {
                        self.p
                            .hv
                            .hypercall(r.rcx, r.r11, r.r8, &self.p.mem, &mut self.p.host);
                        // A signal may have made a NIC transmit: forward it now rather
                        // than at the next tick.
                        if !self.p.nics.is_empty() {
                            self.p.nics.pump(&mut self.p.host);
                        }
                        self.p.deliver();
                    }
                    Err(e) => return Stop::Failed(format!("KVM_GET_REGS: {e}")),
                },
                After::PublishTsc => self.publish_tsc(),
                After::Stop(s) => {
                    if let Stop::Failed(why) = &s {
                        self.dump_state(why);
                    }
                    return s;
                }
            }
        }
    }

    fn publish_tsc(&mut self) {
        let Some(khz) = self.tsc_khz else {
            log::info!("hyperv: TSC frequency unknown; reference TSC page left invalid");
            return;
        };
        let mut msrs = match Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }]) {
            Ok(m) => m,
            Err(_) => return,
        };
        match self.vcpu.get_msrs(&mut msrs) {
            Ok(1) => {
                let tsc = msrs.as_slice()[0].data;
                let p = self
                    .p
                    .hv
                    .publish_tsc_page(&self.p.mem, tsc, u64::from(khz) * 1000);
                log::debug!("hyperv: reference TSC page {p:?}");
            }
            r => log::info!("hyperv: cannot read the guest TSC ({r:?}); TSC page left invalid"),
        }
    }

    /// The most frequent guest RIPs sampled at kicks (symbolize them with
    /// `addr2line -f -e KERNEL ADDR...`). The samples are where the guest was when the
    /// poll period ended, so they show where guest CPU time goes.
    fn print_profile(&self, samples: &std::collections::BTreeMap<u64, u64>) {
        let total: u64 = samples.values().sum();
        let mut top: Vec<(u64, u64)> = samples.iter().map(|(&a, &n)| (n, a)).collect();
        top.sort_unstable_by(|a, b| b.cmp(a));
        eprintln!("hvemu-vmm: profile: {total} RIP samples, most frequent:");
        for (n, addr) in top.into_iter().take(20) {
            eprintln!(
                "  {addr:#x} {n} ({:.1}%)",
                n as f64 * 100.0 / total.max(1) as f64
            );
        }
    }

    fn dump_state(&mut self, why: &str) {
        eprintln!("hvemu-vmm: {why}");
        if let Ok(r) = self.vcpu.get_regs() {
            eprintln!(
                "  rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx
            );
        }
        if let Ok(s) = self.vcpu.get_sregs() {
            eprintln!(
                "  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            );
        }
        for l in self.p.serial.tail().iter().rev().take(5).rev() {
            eprintln!("  serial: {l}");
        }
    }
}

fn start_ticker(
    period: Duration,
    kicker: Kicker,
    tick: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("hvemu-ticker".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(period);
                // Kick only when the last tick was consumed and there is work for ticks
                // (the loop sets the flag back to false only while NICs exist).
                if !tick.swap(true, Ordering::AcqRel) {
                    kicker.kick();
                }
            }
        })
        .map(|_| ())
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl Platform {
    fn handle_exit(&mut self, exit: VcpuExit<'_>) -> After {
        self.stats.total += 1;
        match exit {
            VcpuExit::IoOut(port, data) => {
                self.stats.io += 1;
                self.port_out(port, data)
            }
            VcpuExit::IoIn(port, data) => {
                self.stats.io += 1;
                self.port_in(port, data);
                After::Nothing
            }
            VcpuExit::X86Rdmsr(exit) => {
                self.stats.msr += 1;
                let v = if hyperv::MSR_RANGE.contains(&exit.index) {
                    self.hv.rdmsr(exit.index)
                } else {
                    None
                };
                match v {
                    Some(v) => *exit.data = v,
                    None => {
                        log::debug!("rdmsr {:#x}: #GP ({:?})", exit.index, exit.reason);
                        *exit.error = 1;
                    }
                }
                After::Nothing
            }
            VcpuExit::X86Wrmsr(exit) => {
                self.stats.msr += 1;
                if !hyperv::MSR_RANGE.contains(&exit.index) {
                    log::debug!(
                        "wrmsr {:#x}={:#x}: #GP ({:?})",
                        exit.index,
                        exit.data,
                        exit.reason
                    );
                    *exit.error = 1;
                    return After::Nothing;
                }
                match self.hv.wrmsr(exit.index, exit.data, &self.mem) {
                    Ok(WriteEffect::None) => After::Nothing,
                    Ok(WriteEffect::Deliver) => After::Deliver,
                    Ok(WriteEffect::TscPageEnabled) => After::PublishTsc,
                    Err(()) => {
                        log::debug!("wrmsr {:#x}={:#x}: #GP", exit.index, exit.data);
                        *exit.error = 1;
                        After::Nothing
                    }
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                self.stats.mmio += 1;
                log::debug!("mmio read {addr:#x} ({} bytes): nothing there", data.len());
                data.fill(0xFF);
                After::Nothing
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.stats.mmio += 1;
                log::debug!("mmio write {addr:#x} ({} bytes): nothing there", data.len());
                After::Nothing
            }
            VcpuExit::Hlt => {
                // With the in-kernel local APIC KVM handles HLT itself; seeing it here
                // means the guest halted for good.
                self.stats.hlt += 1;
                std::thread::sleep(Duration::from_millis(1));
                After::Nothing
            }
            VcpuExit::Shutdown => {
                After::Stop(Stop::Failed("guest shut down (triple fault)".into()))
            }
            VcpuExit::SystemEvent(kind, _) => {
                After::Stop(Stop::Failed(format!("guest system event {kind}")))
            }
            VcpuExit::FailEntry(reason, cpu) => After::Stop(Stop::Failed(format!(
                "KVM entry failed: reason {reason:#x} on CPU {cpu}"
            ))),
            VcpuExit::InternalError => After::Stop(Stop::Failed("KVM internal error".into())),
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => After::Nothing,
            other => After::Stop(Stop::Failed(format!("unexpected exit {other:?}"))),
        }
    }

    fn port_out(&mut self, port: u16, data: &[u8]) -> After {
        match port {
            COM1..=0x3FF => {
                for &b in data {
                    self.serial.write(port - COM1, b);
                }
            }
            HYPERCALL_PORT => return After::Hypercall,
            DEBUG_EXIT_PORT => return After::Stop(Stop::DebugExit(le_value(data))),
            PM1A_CNT_PORT => {
                let v = le_value(data) as u16;
                if v & SLP_EN != 0 && (v >> 10) & 7 == S5_SLP_TYP {
                    return After::Stop(Stop::PowerOff);
                }
            }
            _ => self.unknown_port(port, "write"),
        }
        After::Nothing
    }

    fn port_in(&mut self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3FF => {
                for b in data.iter_mut() {
                    *b = self.serial.read(port - COM1);
                }
            }
            HYPERCALL_PORT => {
                let v = (self.hv.take_result() as u32).to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&v[..n]);
            }
            PM1A_EVT_PORT..=0x607 => data.fill(0),
            _ => {
                self.unknown_port(port, "read");
                data.fill(0xFF);
            }
        }
    }

    fn unknown_port(&mut self, port: u16, what: &str) {
        if !self.unknown_ports.contains(&port) {
            self.unknown_ports.push(port);
            log::debug!("port {port:#x} {what}: no device (reported once)");
        }
    }

    /// Delivers pending SynIC messages and event flags; raises the SINT if needed.
    fn deliver(&mut self) {
        self.notified.set(false);
        if let Some(vector) = self.hv.deliver(&self.mem, &mut self.host) {
            self.inject(vector);
        }
    }

    /// Sends `vector` to VP 0's local APIC as an MSI (fixed delivery, physical
    /// destination APIC id 0).
    fn inject(&mut self, vector: u8) {
        let msi = kvm_msi {
            address_lo: 0xFEE0_0000,
            data: u32::from(vector),
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::warn!("KVM_SIGNAL_MSI vector {vector:#x}: {e}");
        }
    }

    /// Host work between two runs: control requests, NIC back ends and device polls on
    /// each tick, message and event delivery.
    fn service(&mut self) {
        let mut requests = Vec::new();
        if let Some(c) = &self.control {
            while let Some(p) = c.try_next() {
                requests.push(p);
            }
        }
        for p in requests {
            let answer = self.answer(&p.request);
            let _ = p.reply.send(answer);
        }
        // The ticker kicks only after the previous tick was taken; with no NICs the tick
        // is left set, so an idle VM without NICs is not woken every poll period.
        if self.tick.swap(false, Ordering::AcqRel) {
            if !self.nics.is_empty() {
                self.nics.pump(&mut self.host);
            }
            self.ics.pump(&mut self.host, Instant::now());
        }
        if self.notified.get() || self.host.pending_messages() > 0 || self.host.events_pending() {
            self.deliver();
        }
    }

    fn answer(&mut self, request: &Request) -> Answer {
        match request {
            Request::Status => Ok(self.status()),
            Request::Shutdown => self.ics.request_shutdown(&mut self.host),
            Request::Kvp => {
                let pairs = self.ics.kvp_pairs();
                Ok(if pairs.is_empty() {
                    "no KVP pairs from the guest yet".into()
                } else {
                    pairs
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            Request::NicList => {
                let lines = self.nics.list(&self.host);
                Ok(if lines.is_empty() {
                    "no NICs".into()
                } else {
                    lines.join("\n")
                })
            }
            Request::NicAdd(spec) => {
                let id = self.nics.add(&mut self.host, spec)?;
                let line = self
                    .nics
                    .list(&self.host)
                    .into_iter()
                    .find(|l| l.starts_with(&format!("nic {id}:")))
                    .unwrap_or_default();
                log::info!("vmm: hot-added {line}");
                Ok(format!(
                    "nic {id} added (mac {}, {} queue(s)); the guest sees the offer {}",
                    spec.mac
                        .map(|m| format_mac(&m))
                        .unwrap_or_else(|| format_mac(&super::nic::default_mac(id))),
                    spec.queues,
                    if self.host.connection().is_some_and(|c| c.offers_requested) {
                        "now"
                    } else {
                        "when it connects to VMBus"
                    }
                ))
            }
            Request::NicRemove(id) => {
                self.nics.remove(&mut self.host, *id)?;
                log::info!("vmm: hot-removed nic {id}");
                Ok(format!("nic {id} removed (rescinded)"))
            }
        }
    }

    fn status(&self) -> String {
        let up = self.started.elapsed().as_secs_f64();
        let ready = match &self.serial.ready {
            Some((t, line)) => format!(
                "ready after {:.3} s: \"{}\"",
                t.duration_since(self.started).as_secs_f64(),
                line.trim()
            ),
            None => "not ready yet".into(),
        };
        let vmbus = match self.host.connection() {
            Some(c) => format!(
                "connected, version {}, offers {}",
                c.version,
                if c.offers_requested {
                    "requested"
                } else {
                    "not requested"
                }
            ),
            None => "not connected".into(),
        };
        let hs = self.host.stats();
        let h = &self.hv.stats;
        let s = &self.stats;
        [
            format!(
                "vm: up {up:.3} s, 1 vCPU, {} MiB RAM ({} MiB host-mapped), guest {ready}",
                self.mem_bytes >> 20,
                self.ram.size() >> 20
            ),
            format!(
                "hyperv: guest OS id {:#x}, hypercall page {}, SynIC {}, hypercalls {} (posts {}, signals {}, failed {}), messages delivered {}, events {}, interrupts {}, EOMs {}",
                self.hv.guest_os_id(),
                if self.hv.hypercalls_enabled() { "on" } else { "off" },
                if self.hv.synic_ready() { "on" } else { "off" },
                h.hypercalls,
                h.posts,
                h.signals,
                h.failed_hypercalls,
                h.messages_delivered,
                h.events_delivered,
                h.interrupts,
                h.eoms
            ),
            format!(
                "vmbus: {vmbus}; channels {}, offers sent {}, rescinds {}, gpadls live {}, violations {}",
                self.host.channels().len(),
                hs.offers_sent,
                hs.rescinds_sent,
                hs.live_gpadls,
                hs.violations.len()
            ),
            format!(
                "nics: {}; internal LAN DHCP leases: {}",
                self.nics.len(),
                match self.nics.leases() {
                    l if l.is_empty() => "none".to_string(),
                    l => l
                        .iter()
                        .map(|(mac, ip)| format!("{} {ip}", format_mac(mac)))
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            ),
            self.ics.summary(),
            self.nics.azure_summary(),
            format!(
                "exits: {} (io {}, msr {}, mmio {}, kicks {}, hlt {})",
                s.total, s.io, s.msr, s.mmio, s.kicks, s.hlt
            ),
        ]
        .join("\n")
    }
}
