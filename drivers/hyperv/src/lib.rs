//! The Hyper-V guest platform: detection, synthetic MSRs, hypercalls, SynIC, reference time.
//!
//! This crate holds the logic of what the Hyper-V Top-Level Functional Specification (TLFS)
//! asks of a guest, and touches no hardware itself. It reaches the machine through small
//! traits the caller implements: [`Cpuid`] for detection, [`hw::HvCpu`] (MSRs and
//! hypercalls) and [`hw::HvPage`] (pages shared with the hypervisor) for the rest. The
//! appliance implements them with real instructions and identity-mapped frames; host tests
//! implement them with recording fakes. Modules:
//!
//! - detection (this file): CPUID leaves, privileges, [`detect`];
//! - [`msr`]: MSR numbers and how values are composed (reserved bits kept), guest OS id;
//! - [`setup`]: enable/disable orders for the hypercall page, SynIC and TSC page;
//! - [`hypercall`]: HvPostMessage and HvSignalEvent, status mapping;
//! - [`synic`]: taking messages from the SIMP slot (with EOM), draining event flags;
//! - [`tsc`]: reference time from the TSC page, TIME_REF_COUNT fallback.
//!
//! Facts are from `shared/reference/hyperv-facts.md` sections 1-5 (Linux `hvgdk_mini.h`,
//! `hv.c`, `hyperv_vmbus.h`, OpenVMM hvdef) and the TLFS; wire layouts come from
//! `hvnet_wire::synic`, which is shared with the host emulator.

#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

pub mod hw;
pub mod hypercall;
pub mod msr;
pub mod setup;
pub mod synic;
pub mod tsc;

#[cfg(test)]
mod fake;

pub use hw::{HvCpu, HvPage};

/// CPUID leaf 0x40000000: highest hypervisor leaf and vendor signature.
pub const CPUID_VENDOR_AND_MAX: u32 = 0x4000_0000;
/// CPUID leaf 0x40000001: hypervisor interface signature ("Hv#1" for Hyper-V).
pub const CPUID_INTERFACE: u32 = 0x4000_0001;
/// CPUID leaf 0x40000002: hypervisor version.
pub const CPUID_VERSION: u32 = 0x4000_0002;
/// CPUID leaf 0x40000003: partition privileges (EAX:EBX) and features (EDX).
pub const CPUID_FEATURES: u32 = 0x4000_0003;
/// The lowest "highest leaf" a Hyper-V that guests may use reports.
pub const MIN_HYPERV_MAX_LEAF: u32 = 0x4000_0005;

/// "Hv#1", the Hyper-V interface signature in leaf 0x40000001 EAX.
pub const HV_INTERFACE_SIGNATURE: u32 = 0x3123_7648;

/// Partition privilege bits (leaf 0x40000003 EAX, the low half of the privilege mask).
pub mod privilege {
    pub const ACCESS_VP_RUNTIME: u32 = 1 << 0;
    pub const ACCESS_PARTITION_REFERENCE_COUNTER: u32 = 1 << 1;
    pub const ACCESS_SYNIC_REGS: u32 = 1 << 2;
    pub const ACCESS_SYNTHETIC_TIMER_REGS: u32 = 1 << 3;
    pub const ACCESS_APIC_REGS: u32 = 1 << 4;
    pub const ACCESS_HYPERCALL_MSRS: u32 = 1 << 5;
    pub const ACCESS_VP_INDEX: u32 = 1 << 6;
    pub const ACCESS_PARTITION_REFERENCE_TSC: u32 = 1 << 9;
    pub const ACCESS_FREQUENCY_MSRS: u32 = 1 << 11;
}

/// The four registers one CPUID leaf returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A source of CPUID results.
pub trait Cpuid {
    fn cpuid(&self, leaf: u32) -> CpuidResult;
}

/// Which hypervisor (if any) the CPU reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// CPUID.1:ECX bit 31 clear: bare metal (or a hypervisor that hides itself).
    None,
    /// Hyper-V (or a faithful emulation): vendor "Microsoft Hv" and interface "Hv#1".
    HyperV(HyperVInfo),
    /// Some other hypervisor; its 12-byte vendor signature.
    Other { vendor: [u8; 12] },
}

/// What the Hyper-V leaves say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HyperVInfo {
    pub max_leaf: u32,
    pub major: u16,
    pub minor: u16,
    pub build: u32,
    /// Leaf 0x40000003 EAX.
    pub privileges: u32,
    /// Leaf 0x40000003 EDX.
    pub features: u32,
}

impl HyperVInfo {
    /// VMBus needs the hypercall page (HvPostMessage/HvSignalEvent), the SynIC and the
    /// VP index (current Linux refuses Hyper-V without hypercall and VP-index privileges).
    pub fn missing_for_vmbus(&self) -> Option<&'static str> {
        use privilege::*;
        if self.privileges & ACCESS_HYPERCALL_MSRS == 0 {
            Some("hypercall MSRs")
        } else if self.privileges & ACCESS_VP_INDEX == 0 {
            Some("VP index MSR")
        } else if self.privileges & ACCESS_SYNIC_REGS == 0 {
            Some("SynIC MSRs")
        } else {
            None
        }
    }
}

impl HyperVInfo {
    /// Whether reference time can come from the TSC page: the page itself (privilege 9)
    /// and the TIME_REF_COUNT MSR (privilege 1) for when the page is invalid.
    pub fn has_reference_tsc(&self) -> bool {
        use privilege::*;
        let needed = ACCESS_PARTITION_REFERENCE_TSC | ACCESS_PARTITION_REFERENCE_COUNTER;
        self.privileges & needed == needed
    }
}

fn vendor_bytes(r: CpuidResult) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    v[8..].copy_from_slice(&r.edx.to_le_bytes());
    v
}

/// Classifies the hypervisor from CPUID.
pub fn detect(c: &impl Cpuid) -> Hypervisor {
    if c.cpuid(1).ecx & (1 << 31) == 0 {
        return Hypervisor::None;
    }
    let top = c.cpuid(CPUID_VENDOR_AND_MAX);
    let vendor = vendor_bytes(top);
    let is_hyperv = &vendor == b"Microsoft Hv"
        && (MIN_HYPERV_MAX_LEAF..=0x4000_ffff).contains(&top.eax)
        && c.cpuid(CPUID_INTERFACE).eax == HV_INTERFACE_SIGNATURE;
    if !is_hyperv {
        return Hypervisor::Other { vendor };
    }
    let version = c.cpuid(CPUID_VERSION);
    let features = c.cpuid(CPUID_FEATURES);
    Hypervisor::HyperV(HyperVInfo {
        max_leaf: top.eax,
        major: (version.ebx >> 16) as u16,
        minor: version.ebx as u16,
        build: version.eax,
        privileges: features.eax,
        features: features.edx,
    })
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::HyperV(i) => write!(
                f,
                "Microsoft Hyper-V {}.{} (build {})",
                i.major, i.minor, i.build
            ),
            Self::Other { vendor } => {
                let s = vendor.iter().map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                });
                f.write_str("\"")?;
                for ch in s {
                    fmt::Write::write_char(f, ch)?;
                }
                f.write_str("\"")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeMap;
    use std::string::ToString;

    struct Table(BTreeMap<u32, CpuidResult>);

    impl Cpuid for Table {
        fn cpuid(&self, leaf: u32) -> CpuidResult {
            self.0.get(&leaf).copied().unwrap_or_default()
        }
    }

    fn vendor(sig: &[u8; 12], max: u32) -> CpuidResult {
        let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        CpuidResult {
            eax: max,
            ebx: w(0),
            ecx: w(4),
            edx: w(8),
        }
    }

    fn hyperv(privileges: u32) -> Table {
        let mut t = BTreeMap::new();
        t.insert(
            1,
            CpuidResult {
                ecx: 1 << 31,
                ..Default::default()
            },
        );
        t.insert(CPUID_VENDOR_AND_MAX, vendor(b"Microsoft Hv", 0x4000_000c));
        t.insert(
            CPUID_INTERFACE,
            CpuidResult {
                eax: HV_INTERFACE_SIGNATURE,
                ..Default::default()
            },
        );
        t.insert(
            CPUID_VERSION,
            CpuidResult {
                eax: 20348,
                ebx: (10 << 16),
                ..Default::default()
            },
        );
        t.insert(
            CPUID_FEATURES,
            CpuidResult {
                eax: privileges,
                ..Default::default()
            },
        );
        Table(t)
    }

    #[test]
    fn bare_metal_and_other_hypervisors() {
        assert_eq!(detect(&Table(BTreeMap::new())), Hypervisor::None);
        let mut t = BTreeMap::new();
        t.insert(
            1,
            CpuidResult {
                ecx: 1 << 31,
                ..Default::default()
            },
        );
        t.insert(CPUID_VENDOR_AND_MAX, vendor(b"TCGTCGTCGTCG", 0x4000_0001));
        let h = detect(&Table(t));
        assert_eq!(
            h,
            Hypervisor::Other {
                vendor: *b"TCGTCGTCGTCG"
            }
        );
        assert_eq!(h.to_string(), "\"TCGTCGTCGTCG\"");
    }

    #[test]
    fn hyperv_with_vmbus_privileges() {
        let h = detect(&hyperv(0x2e7f));
        let Hypervisor::HyperV(i) = h else {
            panic!("{h:?}")
        };
        assert_eq!((i.major, i.minor, i.build), (10, 0, 20348));
        assert_eq!(i.missing_for_vmbus(), None);
        assert!(i.has_reference_tsc());
        assert_eq!(h.to_string(), "Microsoft Hyper-V 10.0 (build 20348)");
    }

    #[test]
    fn hyperv_missing_privileges_is_reported() {
        let Hypervisor::HyperV(i) = detect(&hyperv(privilege::ACCESS_SYNIC_REGS)) else {
            panic!()
        };
        assert_eq!(i.missing_for_vmbus(), Some("hypercall MSRs"));
        assert!(!i.has_reference_tsc());
        // The TSC page without the reference counter MSR has no fallback: not used.
        let Hypervisor::HyperV(i) =
            detect(&hyperv(privilege::ACCESS_PARTITION_REFERENCE_TSC | 0x64))
        else {
            panic!()
        };
        assert!(!i.has_reference_tsc());
    }

    #[test]
    fn fake_signature_without_interface_is_not_hyperv() {
        let mut t = hyperv(0x2e7f);
        t.0.insert(CPUID_INTERFACE, CpuidResult::default());
        assert!(matches!(detect(&t), Hypervisor::Other { .. }));
        // Max leaf too low for a usable Hyper-V.
        let mut t = hyperv(0x2e7f);
        t.0.insert(CPUID_VENDOR_AND_MAX, vendor(b"Microsoft Hv", 0x4000_0001));
        assert!(matches!(detect(&t), Hypervisor::Other { .. }));
    }
}
