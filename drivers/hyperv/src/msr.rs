//! Synthetic MSRs: numbers, field layouts, and how this guest composes their values.
//!
//! The numbers and bit layouts themselves live in `hvnet_wire::synic` (shared with the host
//! emulator, layout-tested there) and are re-exported here; this module adds the
//! read-modify-write rules a guest must follow: reserved bits the hypervisor reports are
//! kept, only the fields the guest owns change. Sources: TLFS "Hypercall Interface"
//! (HYPERCALL MSR: bit 0 enable, bit 1 locked, bits 2-11 RsvdP, bits 12-63 GPFN) and
//! `shared/reference/hyperv-facts.md` sections 2-4 (Linux `hvgdk_mini.h`).

pub use hvnet_wire::synic::{
    hv_x64_msr_sint, open_source_guest_os_id, PageMsr, ScontrolMsr, SintMsr,
    HV_GUEST_OS_ID_OPEN_SOURCE, HV_SYNIC_FIRST_VALID_VECTOR, HV_X64_MSR_EOM,
    HV_X64_MSR_GUEST_OS_ID, HV_X64_MSR_HYPERCALL, HV_X64_MSR_REFERENCE_TSC, HV_X64_MSR_SCONTROL,
    HV_X64_MSR_SIEFP, HV_X64_MSR_SIMP, HV_X64_MSR_SINT0, HV_X64_MSR_SINT15, HV_X64_MSR_SVERSION,
    HV_X64_MSR_TIME_REF_COUNT, HV_X64_MSR_VP_INDEX,
};

/// Bits 1..11 of the page-enable MSRs (HYPERCALL, SIMP, SIEFP, REFERENCE_TSC): reserved
/// ("RsvdP": ignore on read, preserve on write), except HYPERCALL bit 1, "locked", which
/// the guest must not change either. Kept as read on every write.
pub const PAGE_MSR_PRESERVED: u64 = 0xFFE;

/// HYPERCALL bit 1: the MSR is locked (the page cannot be moved until reset).
pub const HYPERCALL_LOCKED: u64 = 1 << 1;

/// A page-enable MSR value mapping page frame `pfn`, enabled, with the preserved bits of
/// `current` (the value just read).
pub const fn page_enable(current: u64, pfn: u64) -> u64 {
    (current & PAGE_MSR_PRESERVED) | PageMsr::new(pfn, true).0
}

/// A page-enable MSR value with the page disabled and its address cleared (SIMP, SIEFP:
/// what Linux writes when tearing the SynIC down), preserved bits kept.
pub const fn page_disable(current: u64) -> u64 {
    current & PAGE_MSR_PRESERVED
}

/// A page-enable MSR value with only the enable bit cleared (HYPERCALL and REFERENCE_TSC:
/// Linux keeps the address and clears the enable bit).
pub const fn page_clear_enable(current: u64) -> u64 {
    current & !PageMsr::ENABLE
}

/// SINT value delivering `vector`, unmasked, without auto-EOI (the kernel EOIs the local
/// APIC itself, as it does for every device vector), other bits of `current` (polling,
/// intercept, proxy and reserved) kept, as Linux `hv_synic_enable_regs` does.
pub const fn sint_enable(current: u64, vector: u8) -> u64 {
    (current & !(SintMsr::VECTOR_MASK | SintMsr::MASKED | SintMsr::AUTO_EOI)) | vector as u64
}

/// SINT value with the mask bit set, everything else kept.
pub const fn sint_mask(current: u64) -> u64 {
    current | SintMsr::MASKED
}

/// SCONTROL with the SynIC enable bit set, other bits kept.
pub const fn scontrol_enable(current: u64) -> u64 {
    current | ScontrolMsr::ENABLE
}

/// SCONTROL with the SynIC enable bit cleared, other bits kept.
pub const fn scontrol_disable(current: u64) -> u64 {
    current & !ScontrolMsr::ENABLE
}

/// The open-source OS type hvnet reports in its guest OS id (bits 56..62).
///
/// Microsoft allocates these values; the TLFS lists 1 Linux, 2 FreeBSD, 3 Xen, 4 Illumos.
/// hvnet has none of its own, and claiming Linux would invite the host to apply
/// behaviour keyed to Linux kernel versions, so it uses 0x7F, the top of the 7-bit field
/// and far from the allocated range. Any non-zero guest OS id enables the hypercall page
/// (TLFS "Reporting the Guest OS Identity"); the host does not interpret it further as
/// far as the TLFS says.
pub const HVNET_OS_TYPE: u8 = 0x7F;

/// Bits 48..55 ("OS ID", additional vendor information): 0.
pub const HVNET_OS_ID: u8 = 0;

/// hvnet's guest OS id: open source (bit 63), OS type [`HVNET_OS_TYPE`], the version
/// `major.minor.patch` in bits 16..47 as `major << 16 | minor << 8 | patch` (the packing
/// Linux uses for its kernel version), build number 0.
pub const fn hvnet_guest_os_id(major: u8, minor: u8, patch: u8) -> u64 {
    let version = ((major as u32) << 16) | ((minor as u32) << 8) | patch as u32;
    open_source_guest_os_id(HVNET_OS_TYPE, HVNET_OS_ID, version, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MSR numbers checked against hyperv-facts.md section 2 (Linux hvgdk_mini.h) and the
    /// TLFS pages on the hypercall interface and SynIC.
    #[test]
    fn msr_numbers_match_the_tlfs() {
        assert_eq!(HV_X64_MSR_GUEST_OS_ID, 0x4000_0000);
        assert_eq!(HV_X64_MSR_HYPERCALL, 0x4000_0001);
        assert_eq!(HV_X64_MSR_VP_INDEX, 0x4000_0002);
        assert_eq!(HV_X64_MSR_TIME_REF_COUNT, 0x4000_0020);
        assert_eq!(HV_X64_MSR_REFERENCE_TSC, 0x4000_0021);
        assert_eq!(HV_X64_MSR_SCONTROL, 0x4000_0080);
        assert_eq!(HV_X64_MSR_SVERSION, 0x4000_0081);
        assert_eq!(HV_X64_MSR_SIEFP, 0x4000_0082);
        assert_eq!(HV_X64_MSR_SIMP, 0x4000_0083);
        assert_eq!(HV_X64_MSR_EOM, 0x4000_0084);
        assert_eq!(HV_X64_MSR_SINT0, 0x4000_0090);
        assert_eq!(hv_x64_msr_sint(2), Some(0x4000_0092));
        assert_eq!(HV_X64_MSR_SINT15, 0x4000_009F);
    }

    /// Bit layouts: hvgdk_mini.h `hv_x64_msr_hypercall_contents`, `hv_synic_simp`,
    /// `hv_synic_sint`, `hv_synic_scontrol` (hyperv-facts.md sections 2-3).
    #[test]
    fn page_msr_values_keep_reserved_bits() {
        // Host reports a locked bit and some reserved bits, and an old address.
        let current = 0xdead_b000 | HYPERCALL_LOCKED | 0x400;
        let v = page_enable(current, 0x1_2345);
        assert_eq!(v, (0x1_2345 << 12) | 0x402 | 1);
        assert_eq!(PageMsr(v).pfn(), 0x1_2345);
        assert!(PageMsr(v).enabled());
        assert_eq!(page_disable(v), 0x402);
        assert_eq!(page_clear_enable(v), (0x1_2345 << 12) | 0x402);
        // A PFN beyond 52 bits cannot reach the reserved or enable bits.
        assert_eq!(page_enable(0, u64::MAX) & 0xFFF, 1);
    }

    #[test]
    fn sint_and_scontrol_values() {
        // Reset value: masked, vector 0; a polling bit the host set stays.
        let reset = SintMsr::MASKED | SintMsr::POLLING | SintMsr::AUTO_EOI | 0x12;
        let v = sint_enable(reset, 0x41);
        assert_eq!(v, SintMsr::POLLING | 0x41);
        let s = SintMsr(v);
        assert_eq!(s.vector(), 0x41);
        assert!(!s.masked() && !s.auto_eoi());
        assert_eq!(sint_mask(v), v | 0x1_0000);
        assert_eq!(SintMsr::MASKED, 1 << 16);
        assert_eq!(SintMsr::AUTO_EOI, 1 << 17);
        assert_eq!(SintMsr::POLLING, 1 << 18);
        assert_eq!(scontrol_enable(0xf0), 0xf1);
        assert_eq!(scontrol_disable(0xf1), 0xf0);
    }

    /// TLFS "Guest OS Identity MSR for Open Source Operating Systems": bits 0-15 build,
    /// 16-47 version, 48-55 OS id, 56-62 OS type, 63 open source.
    #[test]
    fn guest_os_id_encoding() {
        let id = hvnet_guest_os_id(1, 2, 3);
        assert_eq!(id >> 63, 1, "open source");
        assert_eq!((id >> 56) & 0x7F, 0x7F, "OS type");
        assert_eq!((id >> 48) & 0xFF, 0, "OS id");
        assert_eq!((id >> 16) & 0xFFFF_FFFF, 0x01_02_03, "version");
        assert_eq!(id & 0xFFFF, 0, "build");
        assert_eq!(id, 0xFF00_0001_0203_0000);
        assert_ne!(hvnet_guest_os_id(0, 0, 0), 0, "must be non-zero");
        // Not one of the allocated types (1 Linux, 2 FreeBSD, 3 Xen, 4 Illumos).
        assert!(!(1..=4).contains(&HVNET_OS_TYPE));
    }
}
