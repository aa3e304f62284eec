//! The Hyper-V platform on the real machine: the glue between `hvnet_hyperv` (the logic,
//! host-tested) and this CPU.
//!
//! - [`NativeCpu`] implements `HvCpu` with `rdmsr`/`wrmsr` on the synthetic MSR range and a
//!   `call` into the hypercall page.
//! - [`PhysPage`] implements `HvPage` over an identity-mapped frame with volatile and
//!   atomic accesses (the hypervisor writes these pages behind the compiler's back).
//! - [`HvPlatform`] owns the SynIC pages and implements `hvnet_vmbus::platform::Hypervisor`.
//! - [`init_clock`] switches the kernel clock to the reference TSC page when it is granted.
//!
//! The hypercall page is a page-aligned, page-sized block reserved in the kernel's `.text`
//! (filled with `int3`), so it is mapped executable and read-only by the kernel's own
//! section mappings: the hypervisor overlays it with its call sequence once the HYPERCALL
//! MSR points at it, and the TLFS says guests only read and execute that page (writes
//! fault). Its underlying frame is never used for anything else, as the TLFS asks. The
//! SIMP, SIEFP and post-message input pages are ordinary frames from the frame allocator,
//! identity-mapped read-write and no-execute like all RAM. (TLFS: hypercall input must be
//! in a normal GPA page, not an overlay.)

use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use hvnet_hyperv::hw::{HvCpu, HvPage, PAGE_SIZE};
use hvnet_hyperv::setup::{SetupError, SynicConfig};
use hvnet_hyperv::synic::VMBUS_MESSAGE_SINT;
use hvnet_hyperv::{hypercall, msr, setup, synic, tsc, HyperVInfo};
use hvnet_runtime::irq::IrqSignal;
use hvnet_vmbus::platform::{HvStatus, Hypervisor, SynicMessage};
use log::{info, warn};
use x86_64::registers::model_specific::Msr;

use crate::arch::{cpu, idt};
use crate::memory::dma;
use crate::time;

/// Interrupt vector of the VMBus SINT (SINT2). The first device vector is the self-test's.
pub const VMBUS_VECTOR: u8 = idt::FIRST_DEVICE_VECTOR + 1;

/// Raised by the SINT2 interrupt: a VMBus message or channel event flag may be pending.
static VMBUS_IRQ: IrqSignal = IrqSignal::named("vmbus SINT2");

/// Set once the hypervisor has accepted the hypercall page; hypercalls before that are
/// refused instead of running into the `int3` filling.
static HYPERCALL_READY: AtomicBool = AtomicBool::new(false);

/// The reference TSC page's address once enabled (0: not in use).
static TSC_PAGE: AtomicU64 = AtomicU64::new(0);

global_asm!(
    ".pushsection .text.hvnet_hypercall_page, \"ax\", @progbits",
    ".balign 4096",
    ".global hvnet_hypercall_page",
    "hvnet_hypercall_page:",
    ".fill 4096, 1, 0xcc",
    ".popsection",
);

unsafe extern "C" {
    static hvnet_hypercall_page: u8;
}

/// Address (= GPA, identity map) of the hypercall page.
fn hypercall_page() -> u64 {
    // Only the symbol's address is taken, never its contents.
    core::ptr::addr_of!(hvnet_hypercall_page) as u64
}

/// Synthetic MSRs are 0x40000000..=0x400000FF (TLFS); this path touches nothing else.
const SYNTHETIC_MSRS: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00FF;

/// The current CPU's MSRs and hypercalls. Private: created only here, after CPUID said
/// which synthetic MSRs exist.
struct NativeCpu;

impl HvCpu for NativeCpu {
    fn rdmsr(&self, msr: u32) -> u64 {
        assert!(
            SYNTHETIC_MSRS.contains(&msr),
            "rdmsr {msr:#x} is not synthetic"
        );
        // SAFETY: reading a synthetic MSR has no side effect on memory; callers only read
        // MSRs the CPUID privileges grant (an absent one faults with #GP, reported).
        unsafe { Msr::new(msr).read() }
    }

    fn wrmsr(&self, msr: u32, value: u64) {
        assert!(
            SYNTHETIC_MSRS.contains(&msr),
            "wrmsr {msr:#x} is not synthetic"
        );
        // SAFETY: only synthetic MSRs are written. Those that point the hypervisor at
        // guest memory (HYPERCALL, SIMP, SIEFP, REFERENCE_TSC) are given frames this module
        // owns for that purpose and never frees while they are enabled.
        unsafe { Msr::new(msr).write(value) }
    }

    fn hypercall(&self, control: u64, input_gpa: u64, output_gpa: u64) -> u64 {
        call_hypercall_page(control, input_gpa, output_gpa)
    }

    fn fast_hypercall(&self, control: u64, rdx: u64, r8: u64) -> u64 {
        // A fast call passes its input in RDX and R8 instead of GPAs; the calling
        // sequence is the same.
        call_hypercall_page(control, rdx, r8)
    }
}

/// One identity-mapped 4 KiB frame shared with the hypervisor.
pub struct PhysPage {
    addr: u64,
}

impl PhysPage {
    /// # Safety
    /// `addr` must be a page-aligned, identity-mapped, writable frame that is used only
    /// through `PhysPage` accessors (never through Rust references) while any `PhysPage`
    /// for it exists.
    unsafe fn new(addr: u64) -> Self {
        debug_assert!(addr.is_multiple_of(PAGE_SIZE as u64));
        PhysPage { addr }
    }

    /// The page's address (= GPA).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Address of `len` bytes at `offset`, checked to be inside the page and aligned to
    /// `align`. The offsets `hvnet_hyperv` passes are constants: a failure is a bug.
    fn at(&self, offset: usize, len: usize, align: usize) -> u64 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= PAGE_SIZE)
                && offset.is_multiple_of(align),
            "shared-page access {offset}+{len} (align {align}) out of bounds"
        );
        self.addr + offset as u64
    }
}

impl HvPage for PhysPage {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        let a = self.at(offset, buf.len(), 1);
        // SAFETY: inside the page, which `new`'s contract makes ours to access this way.
        unsafe { dma::copy_from_phys(a, buf) }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        let a = self.at(offset, data.len(), 1);
        // SAFETY: as in `read`.
        unsafe { dma::copy_to_phys(a, data) }
    }

    fn load_u32(&self, offset: usize) -> u32 {
        let a = self.at(offset, 4, 4);
        // SAFETY: aligned u32 inside the page; every access to it is atomic or volatile.
        unsafe { AtomicU32::from_ptr(a as *mut u32) }.load(Ordering::Acquire)
    }

    fn load_u64(&self, offset: usize) -> u64 {
        let a = self.at(offset, 8, 8);
        // SAFETY: aligned u64 inside the page; every access to it is atomic or volatile.
        unsafe { AtomicU64::from_ptr(a as *mut u64) }.load(Ordering::Acquire)
    }

    fn swap_u32(&self, offset: usize, value: u32) -> u32 {
        let a = self.at(offset, 4, 4);
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(a as *mut u32) }.swap(value, Ordering::SeqCst)
    }

    fn swap_u64(&self, offset: usize, value: u64) -> u64 {
        let a = self.at(offset, 8, 8);
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(a as *mut u64) }.swap(value, Ordering::SeqCst)
    }
}

/// hvnet's guest OS id, with this build's version.
fn guest_os_id() -> u64 {
    let part = |s: &str| s.parse::<u8>().unwrap_or(0);
    msr::hvnet_guest_os_id(
        part(env!("CARGO_PKG_VERSION_MAJOR")),
        part(env!("CARGO_PKG_VERSION_MINOR")),
        part(env!("CARGO_PKG_VERSION_PATCH")),
    )
}

/// Reference time in 100 ns units: the TSC page, or TIME_REF_COUNT when it is invalid.
fn reference_time_100ns() -> u64 {
    let addr = TSC_PAGE.load(Ordering::Acquire);
    // SAFETY: `init_clock` stores the address only after the hypervisor took the page,
    // and the frame is never freed or used otherwise.
    let page = unsafe { PhysPage::new(addr) };
    tsc::reference_time(&NativeCpu, &page, cpu::rdtsc)
}

/// Makes the reference TSC page the kernel clock when the partition may use it (page
/// and TIME_REF_COUNT privileges); otherwise the calibrated TSC stays. Call once, before
/// the executor runs.
pub fn init_clock(info: &HyperVInfo) {
    if !info.has_reference_tsc() {
        info!("time: no reference TSC page privilege; keeping the calibrated TSC");
        return;
    }
    let Some(addr) = dma::alloc_pages(1) else {
        warn!("time: no frame for the reference TSC page; keeping the calibrated TSC");
        return;
    };
    if let Err(e) = setup::enable_reference_tsc(&NativeCpu, addr / PAGE_SIZE as u64) {
        warn!("time: {e}; keeping the calibrated TSC");
        dma::free_pages(addr, 1);
        return;
    }
    TSC_PAGE.store(addr, Ordering::Release);
    // SAFETY: the page was just enabled at `addr`, a frame owned for this purpose.
    let valid = tsc::read_tsc_page(&unsafe { PhysPage::new(addr) }, cpu::rdtsc).is_some();
    time::use_reference_clock(reference_time_100ns);
    info!(
        "time: clock is the Hyper-V reference TSC page at {addr:#x}{}",
        if valid {
            ""
        } else {
            " (invalid now: TIME_REF_COUNT until it is)"
        }
    );
}

/// Why the platform could not be brought up.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// CPUID lacks a privilege VMBus needs.
    Missing(&'static str),
    /// No frames for the SynIC pages.
    OutOfFrames,
    /// The hypervisor refused a setting.
    Setup(SetupError),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(what) => write!(f, "Hyper-V without {what}"),
            Self::OutOfFrames => f.write_str("no memory for the SynIC pages"),
            Self::Setup(e) => write!(f, "{e}"),
        }
    }
}

/// The hypercall interface and the SynIC of the boot CPU, ready for VMBus.
pub struct HvPlatform {
    cpu: NativeCpu,
    simp: PhysPage,
    siefp: PhysPage,
    /// The HvPostMessage input block's page, one user at a time.
    input: spin::Mutex<PhysPage>,
    vp_index: u32,
}

impl HvPlatform {
    /// Reports the guest OS id, enables the hypercall page, allocates the SynIC pages and
    /// enables the SynIC with SINT2 on [`VMBUS_VECTOR`]. Call once.
    pub fn init(info: &HyperVInfo) -> Result<Self, InitError> {
        if let Some(what) = info.missing_for_vmbus() {
            return Err(InitError::Missing(what));
        }
        let cpu = NativeCpu;
        let page = hypercall_page();
        setup::enable_hypercall_page(&cpu, guest_os_id(), page / PAGE_SIZE as u64)
            .map_err(InitError::Setup)?;
        HYPERCALL_READY.store(true, Ordering::Release);

        let Some(frames) = dma::alloc_pages(3) else {
            Self::disable_hypercalls(&cpu);
            return Err(InitError::OutOfFrames);
        };
        let (simp, siefp, input) = (
            frames,
            frames + PAGE_SIZE as u64,
            frames + 2 * PAGE_SIZE as u64,
        );
        // Route the vector before the SINT can fire.
        idt::register(VMBUS_VECTOR, &VMBUS_IRQ);
        let config = SynicConfig {
            simp_pfn: simp / PAGE_SIZE as u64,
            siefp_pfn: siefp / PAGE_SIZE as u64,
            sint: VMBUS_MESSAGE_SINT,
            vector: VMBUS_VECTOR,
        };
        if let Err(e) = setup::enable_synic(&cpu, &config) {
            Self::disable_hypercalls(&cpu);
            dma::free_pages(frames, 3);
            return Err(InitError::Setup(e));
        }
        let vp_index = setup::vp_index(&cpu);
        info!(
            "hyperv: hypercall page at {page:#x}, SynIC message page {simp:#x}, event flags {siefp:#x}, SINT{} on vector {VMBUS_VECTOR:#x}, VP index {vp_index}",
            VMBUS_MESSAGE_SINT
        );
        // SAFETY: the three frames were just allocated for these pages and are used only
        // through `PhysPage`.
        let (simp, siefp, input) = unsafe {
            (
                PhysPage::new(simp),
                PhysPage::new(siefp),
                PhysPage::new(input),
            )
        };
        Ok(HvPlatform {
            cpu,
            simp,
            siefp,
            input: spin::Mutex::new(input),
            vp_index,
        })
    }

    fn disable_hypercalls(cpu: &NativeCpu) {
        HYPERCALL_READY.store(false, Ordering::Release);
        setup::disable_hypercall_page(cpu);
    }

    /// Turns the SynIC and the hypercall page off again (for shutdown and kexec-like
    /// resets, after VMBus has unloaded). The pages stay allocated: a late access through
    /// this value reads empty pages and hypercalls are refused.
    #[allow(dead_code)] // The shutdown path that calls it comes with the integration services.
    pub fn shutdown(&self) {
        setup::disable_synic(&self.cpu, VMBUS_MESSAGE_SINT);
        Self::disable_hypercalls(&self.cpu);
    }
}

impl Hypervisor for HvPlatform {
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus> {
        let input = self.input.lock();
        hypercall::post_message(
            &self.cpu,
            &*input,
            input.addr(),
            connection_id,
            message_type,
            payload,
        )
        .map_err(|s| HvStatus(s.0))
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        hypercall::signal_event(&self.cpu, connection_id, 0).map_err(|s| HvStatus(s.0))
    }

    fn take_message(&self) -> Option<SynicMessage> {
        let m = synic::take_message(&self.cpu, &self.simp, VMBUS_MESSAGE_SINT)?;
        Some(SynicMessage {
            message_type: m.message_type,
            payload_size: m.payload_size,
            payload: m.payload,
        })
    }

    fn drain_events(&self, f: &mut dyn FnMut(u32)) {
        synic::drain_events(&self.siefp, VMBUS_MESSAGE_SINT, f);
    }

    fn interrupt(&self) -> &'static IrqSignal {
        &VMBUS_IRQ
    }

    fn vp_index(&self) -> u32 {
        self.vp_index
    }
}

/// Calls the hypercall page: RCX control, RDX and R8 input (GPAs, or the values of a
/// fast call), result in RAX. Refused until the hypervisor has accepted the page.
fn call_hypercall_page(control: u64, rdx: u64, r8: u64) -> u64 {
    if !HYPERCALL_READY.load(Ordering::Acquire) {
        return u64::from(hypercall::HvStatus::INVALID_HYPERCALL_CODE.0);
    }
    let rax: u64;
    // SAFETY: the hypervisor has overlaid the page with its call sequence (checked when
    // enabling); it follows the TLFS convention: RCX control, RDX/R8 input, result in
    // RAX, near return on our stack. It may clobber R9-R11 (Linux declares them
    // clobbered too) and flags. The asm may read memory (no `nomem`), so an input block
    // written before is in place when the hypervisor reads it.
    unsafe {
        asm!(
            "call {page}",
            page = in(reg) hypercall_page(),
            inout("rcx") control => _,
            inout("rdx") rdx => _,
            inout("r8") r8 => _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            lateout("rax") rax,
        );
    }
    rax
}
