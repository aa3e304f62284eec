//! Interrupt descriptor table, entry stubs and the trap dispatcher.
//!
//! Stable Rust has no `extern "x86-interrupt"`, so all 256 vectors enter through 16-byte
//! assembly stubs that push the vector (and a zero where the CPU pushes no error code),
//! save the general registers into a [`TrapFrame`] and call [`hvnet_trap`]. Exceptions are
//! fatal and produce a report; device interrupts only raise the [`IrqSignal`] registered for
//! their vector, the one interrupt-to-task path (no locks, no allocation in interrupt context).

use core::arch::global_asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use hvnet_runtime::irq::IrqSignal;
use x86_64::instructions::tables::lidt;
use x86_64::registers::control::Cr2;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::gdt;
use super::serial::EmergencyWriter;

/// First vector of the (remapped, masked) legacy PIC.
pub const PIC_BASE: u8 = 0x20;
/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x30;
/// First vector handed out to devices.
pub const FIRST_DEVICE_VECTOR: u8 = 0x40;
/// LAPIC spurious-interrupt vector (low four bits set, as older APICs require).
pub const SPURIOUS_VECTOR: u8 = 0xff;

global_asm!(
    r#"
    .text
    .balign 16
    .global hvnet_isr_stubs
hvnet_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp hvnet_isr_common
    .set vec, vec + 1
    .endr

hvnet_isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call hvnet_trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static hvnet_isr_stubs: u8;
}

/// Registers saved by the stub, then what the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One 16-byte interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const INTERRUPT_GATE_PRESENT: u8 = 0x8e;

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256]);

/// Signals raised by device vectors; null when nothing is registered.
static SIGNALS: [AtomicPtr<IrqSignal>; 256] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];
/// Set while an exception report is being printed.
static IN_EXCEPTION: AtomicBool = AtomicBool::new(false);
/// Interrupts that arrived on a vector nobody registered.
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// IST slot for an exception vector.
fn ist_for(vector: usize) -> u8 {
    match vector {
        2 => gdt::IST_NMI,
        8 => gdt::IST_DOUBLE_FAULT,
        18 => gdt::IST_MACHINE_CHECK,
        0..=31 => gdt::IST_EXCEPTION,
        _ => 0,
    }
}

/// Fills and loads the IDT. Call after [`gdt::init`].
pub fn init() {
    // The stub block is emitted above; taking its address reads nothing.
    let base = core::ptr::addr_of!(hvnet_isr_stubs) as u64;
    let selector = gdt::code_selector();
    // SAFETY: runs once on the boot CPU before interrupts are enabled; nothing else
    // references IDT until `lidt` below.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (v, gate) in idt.0.iter_mut().enumerate() {
        let addr = base + 16 * v as u64;
        *gate = Gate {
            offset_low: addr as u16,
            selector,
            ist: ist_for(v),
            type_attr: INTERRUPT_GATE_PRESENT,
            offset_mid: (addr >> 16) as u16,
            offset_high: (addr >> 32) as u32,
            reserved: 0,
        };
    }
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the table is static, fully initialised, and every gate points at a stub.
    unsafe { lidt(&ptr) };
}

/// Routes `vector` to `signal`: the interrupt handler will `raise` it and send EOI.
pub fn register(vector: u8, signal: &'static IrqSignal) {
    SIGNALS[usize::from(vector)].store(
        signal as *const IrqSignal as *mut IrqSignal,
        Ordering::Release,
    );
}

/// Number of interrupts that arrived on unregistered vectors.
pub fn unexpected_interrupts() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// Entry from the assembly stubs, interrupts disabled.
#[unsafe(no_mangle)]
extern "C" fn hvnet_trap(frame: &mut TrapFrame) {
    let vector = frame.vector as usize;
    match vector {
        0..=31 => exception(frame),
        v if (PIC_BASE as usize..PIC_BASE as usize + 16).contains(&v) => {
            // The PIC is fully masked: only spurious IRQ 7/15 arrive here, and those take no
            // EOI from the slave; a spurious slave IRQ still needs one on the master.
            if v == PIC_BASE as usize + 15 {
                super::pic::eoi_master();
            }
        }
        v if v == SPURIOUS_VECTOR as usize => {}
        v => {
            let signal = SIGNALS[v].load(Ordering::Acquire);
            if signal.is_null() {
                if v != TIMER_VECTOR as usize {
                    UNEXPECTED.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                // SAFETY: only `&'static IrqSignal`s are stored by `register`.
                unsafe { &*signal }.raise();
            }
            super::apic::eoi();
        }
    }
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "non-maskable interrupt",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved (15)",
    "x87 floating-point",
    "alignment check",
    "machine check",
    "SIMD floating-point",
    "virtualization",
    "control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved (31)",
];

/// Prints the exception report and stops (or exits the emulator under tests).
fn exception(frame: &TrapFrame) -> ! {
    let v = frame.vector as usize;
    let mut w = EmergencyWriter;
    // A fault inside the report would reuse (and overwrite) the same IST stack: say so
    // briefly and stop instead of recursing.
    if IN_EXCEPTION.swap(true, Ordering::Relaxed) {
        let _ = writeln!(
            w,
            "\n*** nested EXCEPTION {v} at RIP {:#x} while reporting; halting ***",
            frame.rip
        );
        crate::fatal_stop();
    }
    let _ = writeln!(w, "\n*** EXCEPTION {v} ({}) ***", EXCEPTION_NAMES[v & 31]);
    let _ = writeln!(
        w,
        "error code {:#x}  RIP {:#018x}  CS {:#x}  RFLAGS {:#x}",
        frame.error_code, frame.rip, frame.cs, frame.rflags
    );
    if v == 14 {
        let cr2 = Cr2::read_raw();
        let e = frame.error_code;
        let _ = writeln!(
            w,
            "CR2 {cr2:#018x}  ({} {} in {} mode{})",
            if e & 1 != 0 {
                "protection violation"
            } else {
                "page not present"
            },
            if e & 0x10 != 0 {
                "on instruction fetch"
            } else if e & 2 != 0 {
                "on write"
            } else {
                "on read"
            },
            if e & 4 != 0 { "user" } else { "kernel" },
            if e & 8 != 0 { ", reserved bit set" } else { "" },
        );
    }
    let _ = writeln!(
        w,
        "RSP {:#018x}  SS {:#x}  RBP {:#018x}",
        frame.rsp, frame.ss, frame.rbp
    );
    let _ = writeln!(
        w,
        "RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx
    );
    let _ = writeln!(
        w,
        "RSI {:#018x} RDI {:#018x} R8  {:#018x} R9  {:#018x}",
        frame.rsi, frame.rdi, frame.r8, frame.r9
    );
    let _ = writeln!(
        w,
        "R10 {:#018x} R11 {:#018x} R12 {:#018x} R13 {:#018x}",
        frame.r10, frame.r11, frame.r12, frame.r13
    );
    let _ = writeln!(w, "R14 {:#018x} R15 {:#018x}", frame.r14, frame.r15);
    let guard = crate::memory::layout::stack_guard();
    if (guard.0..guard.1).contains(&frame.rsp) || (guard.0..guard.1).contains(&Cr2::read_raw()) {
        let _ = writeln!(w, "kernel stack overflow (hit the guard page)");
    }
    stack_summary(&mut w, frame);
    let _ = writeln!(w, "*** halting ***");
    crate::fatal_stop()
}

/// Prints the words at the faulting stack pointer and a frame-pointer walk of return
/// addresses (the kernel is built with frame pointers), reading only kernel-image memory.
fn stack_summary(w: &mut EmergencyWriter, frame: &TrapFrame) {
    let (lo, hi) = crate::memory::layout::kernel_image();
    let guard = crate::memory::layout::stack_guard();
    let readable = |addr: u64| {
        addr.is_multiple_of(8)
            && addr >= lo
            && addr.saturating_add(8) <= hi
            && !(guard.0..guard.1).contains(&addr)
    };
    if readable(frame.rsp) {
        let _ = write!(w, "stack:");
        for i in 0..8u64 {
            let a = frame.rsp + 8 * i;
            if !readable(a) {
                break;
            }
            // SAFETY: `a` is 8-aligned inside the kernel image, which is mapped.
            let word = unsafe { core::ptr::read_volatile(a as *const u64) };
            let _ = write!(w, " {word:#x}");
        }
        let _ = writeln!(w);
    }
    let _ = write!(w, "call trace: {:#x}", frame.rip);
    let mut rbp = frame.rbp;
    for _ in 0..16 {
        if !readable(rbp) || !readable(rbp + 8) {
            break;
        }
        // SAFETY: both words lie inside the mapped kernel image (checked above).
        let (next, ret) = unsafe {
            (
                core::ptr::read_volatile(rbp as *const u64),
                core::ptr::read_volatile((rbp + 8) as *const u64),
            )
        };
        if ret == 0 {
            break;
        }
        let _ = write!(w, " <- {ret:#x}");
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    let _ = writeln!(w);
}
