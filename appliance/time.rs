//! The kernel clock: the TSC, calibrated at boot against the PIT together with the LAPIC
//! timer. `now_ns` is monotonic nanoseconds since calibration (0 before it).
//! On Hyper-V the source can switch, once, to partition reference time (the reference TSC
//! page, see `hyperv::init_clock`): from the switch on, time advances by reference ticks
//! and continues from the value the TSC gave at that moment, so it never jumps.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{apic, cpu, pit};

static TSC_BASE: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Calibration window; the PIT's 16-bit counter caps it at 54 ms.
const CALIBRATION_MS: u64 = 50;

/// Calibration result, for the boot log.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub tsc_khz: u64,
    pub apic_ticks_per_ms: u64,
}

/// Measures TSC and LAPIC timer rates against the PIT. Interrupts must be off.
pub fn calibrate() -> Option<Calibration> {
    let (mut t0, mut t1, mut apic_ticks) = (0u64, 0u64, 0u64);
    let ok = pit::measure(
        CALIBRATION_MS,
        || {
            apic::calibration_start();
            t0 = cpu::rdtsc();
        },
        || {
            t1 = cpu::rdtsc();
            apic_ticks = apic::calibration_elapsed();
        },
    );
    if !ok || t1 <= t0 {
        return None;
    }
    let tsc_khz = (t1 - t0) / CALIBRATION_MS;
    let apic_ticks_per_ms = apic_ticks / CALIBRATION_MS;
    if tsc_khz == 0 || apic_ticks_per_ms == 0 {
        return None;
    }
    apic::set_ticks_per_ms(apic_ticks_per_ms);
    TSC_BASE.store(t0, Ordering::Relaxed);
    TSC_KHZ.store(tsc_khz, Ordering::Release);
    Some(Calibration {
        tsc_khz,
        apic_ticks_per_ms,
    })
}

/// The reference clock (100 ns ticks) once switched to, and where it took over.
static REFERENCE: spin::Once<fn() -> u64> = spin::Once::new();
static REFERENCE_BASE: AtomicU64 = AtomicU64::new(0);
static NS_AT_SWITCH: AtomicU64 = AtomicU64::new(0);

/// Makes `read_100ns` (a monotonic clock in 100 ns units) the time source from now on.
/// Only the first call has an effect.
pub fn use_reference_clock(read_100ns: fn() -> u64) {
    if REFERENCE.is_completed() {
        return;
    }
    NS_AT_SWITCH.store(tsc_now_ns(), Ordering::Relaxed);
    REFERENCE_BASE.store(read_100ns(), Ordering::Relaxed);
    // Publishes the two values above (release) together with the source.
    REFERENCE.call_once(|| read_100ns);
}

/// Nanoseconds since calibration.
pub fn now_ns() -> u64 {
    if let Some(read) = REFERENCE.get() {
        let ticks = read().saturating_sub(REFERENCE_BASE.load(Ordering::Relaxed));
        return NS_AT_SWITCH
            .load(Ordering::Relaxed)
            .saturating_add(ticks.saturating_mul(100));
    }
    tsc_now_ns()
}

/// Nanoseconds since calibration, from the TSC.
fn tsc_now_ns() -> u64 {
    let khz = TSC_KHZ.load(Ordering::Acquire);
    if khz == 0 {
        return 0;
    }
    let delta = cpu::rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
    (u128::from(delta) * 1_000_000 / u128::from(khz)) as u64
}

/// Unix time (ns) minus `now_ns` at the last setting; valid once `WALL_SET` is true.
static WALL_OFFSET_NS: AtomicU64 = AtomicU64::new(0);
static WALL_SET: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Sets the wall clock: `unix_ns` nanoseconds since 1970-01-01 UTC is "now". The
/// monotonic clock is untouched (timers and timeouts never jump); only the offset moves.
pub fn set_wall_clock(unix_ns: u64) {
    WALL_OFFSET_NS.store(unix_ns.wrapping_sub(now_ns()), Ordering::Relaxed);
    WALL_SET.store(true, Ordering::Release);
}

/// Nanoseconds since 1970-01-01 UTC, once the host has told us the time.
pub fn wall_clock_ns() -> Option<u64> {
    WALL_SET.load(Ordering::Acquire).then(|| {
        WALL_OFFSET_NS
            .load(Ordering::Relaxed)
            .wrapping_add(now_ns())
    })
}

/// The partition reference counter (100 ns units) once the clock uses it.
pub fn reference_100ns() -> Option<u64> {
    REFERENCE.get().map(|read| read())
}
