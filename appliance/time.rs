//! The kernel clock: the TSC, calibrated at boot against the PIT together with the LAPIC
//! timer. `now_ns` is monotonic nanoseconds since calibration (0 before it).
//! A later Hyper-V layer can replace the source with the reference TSC page.

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

/// Nanoseconds since calibration.
pub fn now_ns() -> u64 {
    let khz = TSC_KHZ.load(Ordering::Acquire);
    if khz == 0 {
        return 0;
    }
    let delta = cpu::rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
    (u128::from(delta) * 1_000_000 / u128::from(khz)) as u64
}
