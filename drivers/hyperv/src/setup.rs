//! Turning the hypervisor interface on and off: guest OS id, hypercall page, SynIC,
//! reference TSC page.
//!
//! Orders are those of Linux (`hyperv_init`, `hv_synic_enable_regs`) and the TLFS
//! ("Establishing the Hypercall Interface"), summarised in hyperv-facts.md sections 3-4:
//!
//! 1. GUEST_OS_ID (non-zero) before HYPERCALL: without it the enable bit does not stick.
//! 2. HYPERCALL: read, keep the reserved/locked bits, set the page and enable, read back.
//! 3. SIMP, then SIEFP: read, keep reserved bits, set the page and enable.
//! 4. The VMBus SINT: vector, unmasked, no auto-EOI (the kernel EOIs the local APIC).
//! 5. SCONTROL enable, last: only then can the SynIC deliver into pages that are ready.
//!
//! Teardown runs the same steps in reverse. Every MSR write is a read-modify-write, so
//! bits the guest does not own stay as the hypervisor reported them.

use core::fmt;

use crate::hw::HvCpu;
use crate::msr::*;

/// Why the interface could not be enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// The hypercall MSR did not read back enabled at the page the guest chose (guest OS
    /// id refused, or the MSR is locked to another page).
    HypercallNotEnabled { readback: u64 },
    /// A SynIC or reference-TSC page MSR did not read back enabled at the chosen page.
    PageNotEnabled { msr: u32, readback: u64 },
    /// SINT index outside 0..16.
    InvalidSint(u8),
    /// SINT vectors must be 16..=255.
    InvalidVector(u8),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HypercallNotEnabled { readback } => {
                write!(f, "hypercall page not enabled (MSR reads {readback:#x})")
            }
            Self::PageNotEnabled { msr, readback } => {
                write!(
                    f,
                    "MSR {msr:#x} did not take the page (reads {readback:#x})"
                )
            }
            Self::InvalidSint(s) => write!(f, "SINT {s} does not exist"),
            Self::InvalidVector(v) => write!(f, "vector {v:#x} is below 0x10"),
        }
    }
}

/// Writes `value` to a page MSR and checks that it reads back enabled at `pfn`.
fn enable_page_msr(cpu: &impl HvCpu, msr: u32, pfn: u64) -> Result<(), u64> {
    let value = page_enable(cpu.rdmsr(msr), pfn);
    cpu.wrmsr(msr, value);
    let back = PageMsr(cpu.rdmsr(msr));
    if back.enabled() && back.pfn() == PageMsr(value).pfn() {
        Ok(())
    } else {
        Err(back.0)
    }
}

/// Reports the guest OS id, then maps the hypercall page at frame `pfn` and checks the
/// hypervisor took it. The page must be executable in the guest's page tables; its
/// contents are the hypervisor's from now on.
pub fn enable_hypercall_page(
    cpu: &impl HvCpu,
    guest_os_id: u64,
    pfn: u64,
) -> Result<(), SetupError> {
    cpu.wrmsr(HV_X64_MSR_GUEST_OS_ID, guest_os_id);
    enable_page_msr(cpu, HV_X64_MSR_HYPERCALL, pfn)
        .map_err(|readback| SetupError::HypercallNotEnabled { readback })
}

/// Disables the hypercall page (enable bit cleared, address and locked bit kept, as Linux
/// `hyperv_cleanup`), then clears the guest OS id: the reverse of
/// [`enable_hypercall_page`].
pub fn disable_hypercall_page(cpu: &impl HvCpu) {
    let current = cpu.rdmsr(HV_X64_MSR_HYPERCALL);
    cpu.wrmsr(HV_X64_MSR_HYPERCALL, page_clear_enable(current));
    cpu.wrmsr(HV_X64_MSR_GUEST_OS_ID, 0);
}

/// Where the SynIC delivers, and on which vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynicConfig {
    /// Frame of the message page (SIMP).
    pub simp_pfn: u64,
    /// Frame of the event-flags page (SIEFP).
    pub siefp_pfn: u64,
    /// The SINT to unmask (VMBus: `VMBUS_MESSAGE_SINT`, 2).
    pub sint: u8,
    /// Its interrupt vector (16..=255).
    pub vector: u8,
}

/// Enables the SynIC: SIMP, SIEFP, the SINT, then SCONTROL. On failure, whatever was
/// turned on is turned off again and SCONTROL is never enabled.
pub fn enable_synic(cpu: &impl HvCpu, config: &SynicConfig) -> Result<(), SetupError> {
    let sint_msr = hv_x64_msr_sint(config.sint).ok_or(SetupError::InvalidSint(config.sint))?;
    if config.vector < HV_SYNIC_FIRST_VALID_VECTOR {
        return Err(SetupError::InvalidVector(config.vector));
    }
    let pages = enable_page_msr(cpu, HV_X64_MSR_SIMP, config.simp_pfn)
        .map_err(|readback| SetupError::PageNotEnabled {
            msr: HV_X64_MSR_SIMP,
            readback,
        })
        .and_then(|()| {
            enable_page_msr(cpu, HV_X64_MSR_SIEFP, config.siefp_pfn).map_err(|readback| {
                SetupError::PageNotEnabled {
                    msr: HV_X64_MSR_SIEFP,
                    readback,
                }
            })
        });
    if let Err(e) = pages {
        disable_page(cpu, HV_X64_MSR_SIEFP);
        disable_page(cpu, HV_X64_MSR_SIMP);
        return Err(e);
    }
    let sint = cpu.rdmsr(sint_msr);
    cpu.wrmsr(sint_msr, sint_enable(sint, config.vector));
    let scontrol = cpu.rdmsr(HV_X64_MSR_SCONTROL);
    cpu.wrmsr(HV_X64_MSR_SCONTROL, scontrol_enable(scontrol));
    Ok(())
}

fn disable_page(cpu: &impl HvCpu, msr: u32) {
    let current = cpu.rdmsr(msr);
    cpu.wrmsr(msr, page_disable(current));
}

/// Disables the SynIC in the reverse order of [`enable_synic`]: SCONTROL off, the SINT
/// masked, SIEFP and SIMP disabled with their addresses cleared. (Linux
/// `hv_synic_disable_regs` masks the SINT first and clears SCONTROL last; either way no
/// message or flag lands in the pages once they are given back.)
pub fn disable_synic(cpu: &impl HvCpu, sint: u8) {
    let scontrol = cpu.rdmsr(HV_X64_MSR_SCONTROL);
    cpu.wrmsr(HV_X64_MSR_SCONTROL, scontrol_disable(scontrol));
    if let Some(sint_msr) = hv_x64_msr_sint(sint) {
        let current = cpu.rdmsr(sint_msr);
        cpu.wrmsr(sint_msr, sint_mask(current));
    }
    disable_page(cpu, HV_X64_MSR_SIEFP);
    disable_page(cpu, HV_X64_MSR_SIMP);
}

/// Maps the reference TSC page at frame `pfn` and checks the hypervisor took it.
pub fn enable_reference_tsc(cpu: &impl HvCpu, pfn: u64) -> Result<(), SetupError> {
    enable_page_msr(cpu, HV_X64_MSR_REFERENCE_TSC, pfn).map_err(|readback| {
        SetupError::PageNotEnabled {
            msr: HV_X64_MSR_REFERENCE_TSC,
            readback,
        }
    })
}

/// Disables the reference TSC page (enable bit cleared, as Linux `hyperv_cleanup`).
pub fn disable_reference_tsc(cpu: &impl HvCpu) {
    let current = cpu.rdmsr(HV_X64_MSR_REFERENCE_TSC);
    cpu.wrmsr(HV_X64_MSR_REFERENCE_TSC, page_clear_enable(current));
}

/// The index of the current virtual processor (VP_INDEX, read-only; the `target_vp` of
/// channels and INITIATE_CONTACT). The MSR is 64 bits wide; VP indices fit in 32.
pub fn vp_index(cpu: &impl HvCpu) -> u32 {
    cpu.rdmsr(HV_X64_MSR_VP_INDEX) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::fake::{FakeCpu, Op};

    const OS_ID: u64 = 0xFF00_0001_0000_0000;

    #[test]
    fn hypercall_page_needs_the_guest_os_id_first() {
        let cpu = FakeCpu::new();
        // The host reports the locked bit clear and a reserved bit set.
        cpu.set(HV_X64_MSR_HYPERCALL, 0x800);
        enable_hypercall_page(&cpu, OS_ID, 0x123).unwrap();
        assert_eq!(
            cpu.ops(),
            vec![
                Op::Wrmsr(HV_X64_MSR_GUEST_OS_ID, OS_ID),
                Op::Rdmsr(HV_X64_MSR_HYPERCALL),
                Op::Wrmsr(HV_X64_MSR_HYPERCALL, (0x123 << 12) | 0x800 | 1),
                Op::Rdmsr(HV_X64_MSR_HYPERCALL),
            ]
        );
    }

    #[test]
    fn hypercall_page_refused_is_reported() {
        let cpu = FakeCpu::new();
        // A zero guest OS id: the fake keeps the enable bit clear, as the TLFS says.
        assert_eq!(
            enable_hypercall_page(&cpu, 0, 0x123),
            Err(SetupError::HypercallNotEnabled {
                readback: 0x123 << 12
            })
        );
        // Locked to another page: the write is ignored and the readback shows it.
        let cpu = FakeCpu::new();
        cpu.set(HV_X64_MSR_HYPERCALL, (0x999 << 12) | HYPERCALL_LOCKED | 1);
        assert_eq!(
            enable_hypercall_page(&cpu, OS_ID, 0x123),
            Err(SetupError::HypercallNotEnabled {
                readback: (0x999 << 12) | 3
            })
        );
    }

    #[test]
    fn synic_enable_order_and_bits() {
        let cpu = FakeCpu::new();
        cpu.set(HV_X64_MSR_SIMP, 0x200); // reserved bit the host reports
        cpu.set(HV_X64_MSR_SCONTROL, 0x100);
        let config = SynicConfig {
            simp_pfn: 0x1000,
            siefp_pfn: 0x1001,
            sint: 2,
            vector: 0x41,
        };
        enable_synic(&cpu, &config).unwrap();
        assert_eq!(
            cpu.writes(),
            vec![
                (HV_X64_MSR_SIMP, (0x1000 << 12) | 0x200 | 1),
                (HV_X64_MSR_SIEFP, (0x1001 << 12) | 1),
                // Vector 0x41, masked (bit 16) and auto-EOI (bit 17) clear.
                (0x4000_0092, 0x41),
                (HV_X64_MSR_SCONTROL, 0x101),
            ]
        );
        // Each page MSR is read before it is written and read back after.
        let ops = cpu.ops();
        assert_eq!(ops[0], Op::Rdmsr(HV_X64_MSR_SIMP));
        assert_eq!(ops[2], Op::Rdmsr(HV_X64_MSR_SIMP));
        assert_eq!(ops.last(), Some(&Op::Wrmsr(HV_X64_MSR_SCONTROL, 0x101)));
    }

    #[test]
    fn full_enable_sequence_order() {
        let cpu = FakeCpu::new();
        enable_hypercall_page(&cpu, OS_ID, 0x100).unwrap();
        enable_synic(
            &cpu,
            &SynicConfig {
                simp_pfn: 0x200,
                siefp_pfn: 0x201,
                sint: 2,
                vector: 0x41,
            },
        )
        .unwrap();
        let order: std::vec::Vec<u32> = cpu.writes().iter().map(|w| w.0).collect();
        assert_eq!(
            order,
            vec![
                HV_X64_MSR_GUEST_OS_ID,
                HV_X64_MSR_HYPERCALL,
                HV_X64_MSR_SIMP,
                HV_X64_MSR_SIEFP,
                HV_X64_MSR_SINT0 + 2,
                HV_X64_MSR_SCONTROL,
            ]
        );
    }

    #[test]
    fn synic_rejects_bad_sint_and_vector_without_touching_msrs() {
        let cpu = FakeCpu::new();
        let mut config = SynicConfig {
            simp_pfn: 1,
            siefp_pfn: 2,
            sint: 16,
            vector: 0x41,
        };
        assert_eq!(
            enable_synic(&cpu, &config),
            Err(SetupError::InvalidSint(16))
        );
        config.sint = 2;
        config.vector = 15;
        assert_eq!(
            enable_synic(&cpu, &config),
            Err(SetupError::InvalidVector(15))
        );
        assert!(cpu.ops().is_empty());
    }

    /// A page MSR that does not stick (here: a fake that ignores SIEFP writes) fails the
    /// enable, rolls SIMP back and never enables SCONTROL or the SINT.
    #[test]
    fn synic_page_failure_rolls_back() {
        struct DeafSiefp(FakeCpu);
        impl HvCpu for DeafSiefp {
            fn rdmsr(&self, msr: u32) -> u64 {
                self.0.rdmsr(msr)
            }
            fn wrmsr(&self, msr: u32, value: u64) {
                if msr == HV_X64_MSR_SIEFP {
                    self.0.log.borrow_mut().push(Op::Wrmsr(msr, value));
                } else {
                    self.0.wrmsr(msr, value)
                }
            }
            fn hypercall(&self, c: u64, i: u64, o: u64) -> u64 {
                self.0.hypercall(c, i, o)
            }
            fn fast_hypercall(&self, c: u64, d: u64, r: u64) -> u64 {
                self.0.fast_hypercall(c, d, r)
            }
        }
        let cpu = DeafSiefp(FakeCpu::new());
        let err = enable_synic(
            &cpu,
            &SynicConfig {
                simp_pfn: 0x10,
                siefp_pfn: 0x11,
                sint: 2,
                vector: 0x41,
            },
        );
        assert_eq!(
            err,
            Err(SetupError::PageNotEnabled {
                msr: HV_X64_MSR_SIEFP,
                readback: 0
            })
        );
        assert_eq!(cpu.0.get(HV_X64_MSR_SIMP), 0, "SIMP rolled back");
        assert_eq!(cpu.0.get(HV_X64_MSR_SCONTROL), 0);
        assert_eq!(cpu.0.get(HV_X64_MSR_SINT0 + 2), SintMsr::MASKED);
    }

    #[test]
    fn teardown_is_the_reverse() {
        let cpu = FakeCpu::new();
        enable_hypercall_page(&cpu, OS_ID, 0x100).unwrap();
        enable_synic(
            &cpu,
            &SynicConfig {
                simp_pfn: 0x200,
                siefp_pfn: 0x201,
                sint: 2,
                vector: 0x41,
            },
        )
        .unwrap();
        cpu.clear_log();
        disable_synic(&cpu, 2);
        disable_hypercall_page(&cpu);
        assert_eq!(
            cpu.writes(),
            vec![
                (HV_X64_MSR_SCONTROL, 0),
                (HV_X64_MSR_SINT0 + 2, 0x1_0041),
                (HV_X64_MSR_SIEFP, 0),
                (HV_X64_MSR_SIMP, 0),
                // Enable cleared, address kept (Linux hyperv_cleanup).
                (HV_X64_MSR_HYPERCALL, 0x100 << 12),
                (HV_X64_MSR_GUEST_OS_ID, 0),
            ]
        );
    }

    #[test]
    fn reference_tsc_enable_and_disable() {
        let cpu = FakeCpu::new();
        cpu.set(HV_X64_MSR_REFERENCE_TSC, 0x40);
        enable_reference_tsc(&cpu, 0x777).unwrap();
        assert_eq!(cpu.get(HV_X64_MSR_REFERENCE_TSC), (0x777 << 12) | 0x41);
        disable_reference_tsc(&cpu);
        assert_eq!(cpu.get(HV_X64_MSR_REFERENCE_TSC), (0x777 << 12) | 0x40);
    }

    #[test]
    fn vp_index_reads_the_msr() {
        let cpu = FakeCpu::new();
        cpu.set(HV_X64_MSR_VP_INDEX, 3);
        assert_eq!(vp_index(&cpu), 3);
        assert_eq!(cpu.ops(), vec![Op::Rdmsr(HV_X64_MSR_VP_INDEX)]);
    }
}
