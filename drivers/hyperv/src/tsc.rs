//! Partition reference time from the reference TSC page, with the TIME_REF_COUNT MSR as
//! fallback.
//!
//! The page (`struct ms_hyperv_tsc_page`: sequence u32 @0, reserved u32 @4, scale u64 @8,
//! offset i64 @16) lets the guest compute reference time (100 ns units) from the TSC
//! without an exit: `time = ((tsc * scale) >> 64) + offset`, a 64x64 -> 128-bit multiply.
//! The hypervisor changes scale and offset under a sequence number: a reader takes the
//! sequence, reads TSC, scale and offset, and retries if the sequence changed meanwhile.
//! Sequence 0 means the page is not valid now (e.g. after migration to a host with a
//! different TSC rate): read TIME_REF_COUNT instead. 0xFFFFFFFF is treated the same way:
//! older TLFS versions used it as the "invalid" marker, and hypervisors that emulate
//! Hyper-V (KVM, ACRN) skip both values when they count the sequence, so a valid page
//! never carries either. Sources: hyperv-facts.md section 4,
//! Linux `hv_read_tsc_page_tsc` (clocksource/hyperv_timer.h), OpenVMM hv1 reference_time.

use core::mem::offset_of;

use hvnet_wire::synic::HvReferenceTscPage;

use crate::hw::{HvCpu, HvPage};
use crate::msr::HV_X64_MSR_TIME_REF_COUNT;

/// Offset of `tsc_sequence` in the page.
pub const SEQUENCE_OFFSET: usize = offset_of!(HvReferenceTscPage, tsc_sequence);
/// Offset of `tsc_scale`.
pub const SCALE_OFFSET: usize = offset_of!(HvReferenceTscPage, tsc_scale);
/// Offset of `tsc_offset`.
pub const OFFSET_OFFSET: usize = offset_of!(HvReferenceTscPage, tsc_offset);

/// Reference time ticks per second (100 ns units).
pub const REFERENCE_HZ: u64 = 10_000_000;

/// Sequence values that mark the page invalid.
pub const fn sequence_is_valid(sequence: u32) -> bool {
    sequence != 0 && sequence != u32::MAX
}

/// How often a read is retried while the hypervisor keeps updating the page.
pub const MAX_RETRIES: usize = 64;

/// `((tsc * scale) >> 64) + offset`, the reference time for a TSC reading. The sum wraps
/// like the C code's unsigned arithmetic.
pub const fn scale_tsc(tsc: u64, scale: u64, offset: i64) -> u64 {
    let product = (tsc as u128 * scale as u128) >> 64;
    (product as u64).wrapping_add(offset as u64)
}

/// Reads reference time from the TSC page, calling `rdtsc` for the TSC value. `None` if
/// the page is invalid (sequence 0 or 0xFFFFFFFF) or kept changing for [`MAX_RETRIES`]
/// attempts.
pub fn read_tsc_page(page: &impl HvPage, mut rdtsc: impl FnMut() -> u64) -> Option<u64> {
    for _ in 0..MAX_RETRIES {
        let sequence = page.load_u32(SEQUENCE_OFFSET);
        if !sequence_is_valid(sequence) {
            return None;
        }
        let tsc = rdtsc();
        let scale = page.load_u64(SCALE_OFFSET);
        let offset = page.load_u64(OFFSET_OFFSET) as i64;
        if page.load_u32(SEQUENCE_OFFSET) == sequence {
            return Some(scale_tsc(tsc, scale, offset));
        }
    }
    None
}

/// Reference time in 100 ns units: from the TSC page when it is valid, else from the
/// TIME_REF_COUNT MSR (an exit, but always right).
pub fn reference_time(cpu: &impl HvCpu, page: &impl HvPage, rdtsc: impl FnMut() -> u64) -> u64 {
    read_tsc_page(page, rdtsc).unwrap_or_else(|| cpu.rdmsr(HV_X64_MSR_TIME_REF_COUNT))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::cell::Cell;
    use std::vec;

    use super::*;
    use crate::fake::{FakeCpu, FakePage, Op};

    /// Offsets: Linux `struct ms_hyperv_tsc_page` (hvgdk_mini.h), wire-layouts.md
    /// section 3, hyperv-facts.md section 4.
    #[test]
    fn tsc_page_layout() {
        assert_eq!(SEQUENCE_OFFSET, 0);
        assert_eq!(offset_of!(HvReferenceTscPage, reserved1), 4);
        assert_eq!(SCALE_OFFSET, 8);
        assert_eq!(OFFSET_OFFSET, 16);
    }

    #[test]
    fn scale_arithmetic_by_hand() {
        // Scale 2^63 is one half: 1000 ticks -> 500.
        assert_eq!(scale_tsc(1000, 1 << 63, 0), 500);
        // Scale 2^64 - 1 is just under one: 2^32 ticks -> 2^32 - 1.
        assert_eq!(scale_tsc(1 << 32, u64::MAX, 0), (1 << 32) - 1);
        // A 2.5 GHz TSC: scale = (10^7 << 64) / 2.5e9 = 2^64 / 250 (OpenVMM's formula).
        let scale = ((10_000_000u128 << 64) / 2_500_000_000u128) as u64;
        assert_eq!(scale, 73_786_976_294_838_206);
        // One second of TSC is 10^7 reference ticks (the scale truncation loses one).
        assert_eq!(scale_tsc(2_500_000_000, scale, 0), 9_999_999);
        // 10^12 ticks (400 s): 4e9 reference ticks, minus the truncation error
        // 10^12 * (2^64/250 - scale) / 2^64 = 10^12 * 0.464 / 2^64, far below one tick
        // but enough to floor to the tick below.
        assert_eq!(scale_tsc(1_000_000_000_000, scale, 0), 3_999_999_999);
        // Offsets are signed.
        assert_eq!(scale_tsc(2_500_000_000, scale, -9_999_999), 0);
        assert_eq!(scale_tsc(0, scale, 42), 42);
        // A product that needs all 128 bits.
        assert_eq!(scale_tsc(u64::MAX, u64::MAX, 0), u64::MAX - 1);
    }

    #[test]
    fn valid_page_is_read_without_an_exit() {
        let cpu = FakeCpu::new();
        let page = FakePage::new("tsc", &cpu.log);
        page.put_u32(0, 7);
        page.put_u64(8, 1 << 63);
        page.put_u64(16, (-100i64) as u64);
        assert_eq!(reference_time(&cpu, &page, || 1000), 400);
        assert!(cpu.ops().is_empty(), "no MSR read");
    }

    #[test]
    fn sequence_zero_falls_back_to_the_msr() {
        let cpu = FakeCpu::new();
        cpu.set(HV_X64_MSR_TIME_REF_COUNT, 123_456);
        let page = FakePage::new("tsc", &cpu.log);
        page.put_u64(8, 1 << 63);
        assert_eq!(read_tsc_page(&page, || 1000), None);
        assert_eq!(reference_time(&cpu, &page, || 1000), 123_456);
        assert_eq!(cpu.ops(), vec![Op::Rdmsr(HV_X64_MSR_TIME_REF_COUNT)]);
        // The old "invalid" marker too.
        page.put_u32(0, u32::MAX);
        assert_eq!(read_tsc_page(&page, || 1000), None);
        page.put_u32(0, u32::MAX - 1);
        assert_eq!(read_tsc_page(&page, || 1000), Some(500));
    }

    /// The hypervisor updates scale and offset while the guest reads: the read that saw
    /// two different sequences is discarded and redone with the new values.
    #[test]
    fn sequence_change_during_read_retries() {
        let cpu = FakeCpu::new();
        let page = FakePage::new("tsc", &cpu.log);
        page.put_u32(0, 1);
        page.put_u64(8, 1 << 63);
        let calls = Cell::new(0);
        let t = read_tsc_page(&page, || {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                // Update in the middle of the first read.
                page.put_u64(8, 1 << 62);
                page.put_u64(16, 5);
                page.put_u32(0, 2);
            }
            1000
        });
        assert_eq!(calls.get(), 2);
        assert_eq!(t, Some(255));
    }

    #[test]
    fn page_that_never_settles_gives_up() {
        let cpu = FakeCpu::new();
        let page = FakePage::new("tsc", &cpu.log);
        page.put_u32(0, 1);
        let seq = Cell::new(1u32);
        let t = read_tsc_page(&page, || {
            seq.set(seq.get() % 1000 + 1);
            page.put_u32(0, seq.get());
            0
        });
        assert_eq!(t, None);
        cpu.set(HV_X64_MSR_TIME_REF_COUNT, 9);
        let seq2 = Cell::new(1u32);
        let t = reference_time(&cpu, &page, || {
            seq2.set(seq2.get() % 1000 + 1);
            page.put_u32(0, seq2.get());
            0
        });
        assert_eq!(t, 9);
    }
}
