//! The local APIC (x2APIC through MSRs when the CPU has it, xAPIC through uncached MMIO
//! otherwise): enable, spurious vector, EOI, and a one-shot timer the executor arms for its
//! next deadline. State lives in atomics because `eoi` runs in interrupt context.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use x86_64::registers::model_specific::Msr;

use super::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_16: u32 = 0b0011;

const MODE_NONE: u8 = 0;
const MODE_XAPIC: u8 = 1;
const MODE_X2APIC: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
static MMIO_BASE: AtomicU64 = AtomicU64::new(0);
/// Timer ticks (after the divider) per millisecond, from calibration.
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

fn read(reg: u32) -> u32 {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => {
            // SAFETY: x2APIC mode is enabled, so MSR 0x800 + reg/16 is the register.
            unsafe { Msr::new(0x800 + (reg >> 4)).read() as u32 }
        }
        MODE_XAPIC => {
            let base = MMIO_BASE.load(Ordering::Relaxed);
            // SAFETY: `base` is the APIC page, mapped uncached by `init`.
            unsafe { core::ptr::read_volatile((base + u64::from(reg)) as *const u32) }
        }
        _ => 0,
    }
}

fn write(reg: u32, value: u32) {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => {
            let mut msr = Msr::new(0x800 + (reg >> 4));
            // SAFETY: as in `read`; writes to defined registers only.
            unsafe { msr.write(u64::from(value)) }
        }
        MODE_XAPIC => {
            let base = MMIO_BASE.load(Ordering::Relaxed);
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile((base + u64::from(reg)) as *mut u32, value) }
        }
        _ => {}
    }
}

/// Which APIC flavour is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    X2Apic,
    XApic { base: u64 },
}

/// Enables the local APIC. `map_mmio` maps the xAPIC page uncached and returns its address.
pub fn init(map_mmio: impl FnOnce(u64) -> Option<u64>) -> Option<Flavour> {
    let mut base_msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let base = unsafe { base_msr.read() };
    let flavour = if super::cpu::has_x2apic() {
        // SAFETY: setting EN and EXTD together is the documented way into x2APIC mode.
        unsafe { base_msr.write(base | APIC_BASE_ENABLE | APIC_BASE_X2APIC) };
        MODE.store(MODE_X2APIC, Ordering::Relaxed);
        Flavour::X2Apic
    } else {
        let phys = base & 0x000f_ffff_ffff_f000;
        // SAFETY: enabling the xAPIC at its current base.
        unsafe { base_msr.write(base | APIC_BASE_ENABLE) };
        let virt = map_mmio(phys)?;
        MMIO_BASE.store(virt, Ordering::Relaxed);
        MODE.store(MODE_XAPIC, Ordering::Relaxed);
        Flavour::XApic { base: phys }
    };
    write(REG_TPR, 0);
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    Some(flavour)
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => read(REG_ID),
        _ => read(REG_ID) >> 24,
    }
}

/// Signals end of interrupt. Interrupt-safe (atomics only).
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Sends an interrupt with `vector` to this CPU (used to test the interrupt-to-task
/// path end to end; later the SMP bring-up's IPIs use the same register).
pub fn self_ipi(vector: u8) {
    const REG_ICR_LOW: u32 = 0x300;
    const SHORTHAND_SELF: u32 = 0b01 << 18;
    write(REG_ICR_LOW, SHORTHAND_SELF | u32::from(vector));
}

/// Starts a free-running countdown from `u32::MAX` (timer interrupt masked) for calibration.
pub fn calibration_start() {
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, u32::MAX);
}

/// Ticks elapsed since [`calibration_start`]; stops the countdown.
pub fn calibration_elapsed() -> u64 {
    let remaining = read(REG_TIMER_CURRENT);
    write(REG_TIMER_INITIAL, 0);
    u64::from(u32::MAX - remaining)
}

/// Records the calibrated rate (ticks after the divider per millisecond).
pub fn set_ticks_per_ms(per_ms: u64) {
    TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
}

/// Arms a one-shot timer interrupt `ns` nanoseconds from now (clamped to what the
/// 32-bit counter holds; an early wake-up is harmless to the executor).
pub fn arm_oneshot(ns: u64) {
    let per_ms = TICKS_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        return;
    }
    let ticks = (u128::from(ns) * u128::from(per_ms) / 1_000_000).clamp(1, u128::from(u32::MAX));
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, ticks as u32);
}

/// Stops the timer.
pub fn disarm() {
    write(REG_TIMER_INITIAL, 0);
}
