//! ACPI tables through the `acpi` crate: the MADT for CPUs and I/O APICs, the FADT and DSDT
//! for power-off. Firmware tables are mapped read-only on demand by [`IdentityHandler`].

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use spin::Once;
use x86_64::instructions::port::Port;

use crate::boot::info::{Rsdp, RSDP_MAX_LEN};
use crate::memory::paging;
use crate::power::{find_s5, SleepTypes};

/// Maps firmware memory identity, read-only. Mappings are never torn down: tables are
/// small, read at boot, and live in ranges that stay reserved.
#[derive(Clone, Copy)]
struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let mapped = paging::map_firmware(physical_address as u64, size as u64)
            .and_then(|a| NonNull::new(a as *mut T));
        // The trait has no error return; an unmappable table (page 0 or overflowing
        // range) would only come from corrupt firmware. Stop with a clear message.
        let Some(ptr) = mapped else {
            panic!("ACPI: cannot map firmware table at {physical_address:#x} (+{size:#x})");
        };
        // SAFETY: the range is identity-mapped and readable for `size` bytes.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the tables told us.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub cpus_enabled: usize,
    pub cpus_possible: usize,
    pub io_apics: usize,
    pub power_off: bool,
}

/// PM1 control ports and S5 sleep types.
struct PowerOff {
    pm1a: u16,
    pm1b: Option<u16>,
    types: SleepTypes,
}

static POWER_OFF: Once<PowerOff> = Once::new();
/// The FADT reset register when it is an I/O port: (port, value).
static RESET_PORT: Once<(u16, u8)> = Once::new();
static RSDP_COPY: Once<[u8; RSDP_MAX_LEN]> = Once::new();

/// Why the ACPI tables could not be used.
#[derive(Debug)]
pub enum AcpiSetupError {
    NoRsdp,
    Tables(acpi::AcpiError),
}

impl core::fmt::Display for AcpiSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => f.write_str("the loader gave no RSDP"),
            Self::Tables(e) => write!(f, "{e:?}"),
        }
    }
}

/// Parses the tables the loader pointed at.
pub fn init(rsdp: Option<Rsdp>) -> Result<Summary, AcpiSetupError> {
    let address = match rsdp.ok_or(AcpiSetupError::NoRsdp)? {
        Rsdp::Address(a) => a as usize,
        // Multiboot2 hands over a copy: keep it in kernel memory, which is identity-mapped.
        Rsdp::Copy { bytes, .. } => RSDP_COPY.call_once(|| bytes).as_ptr() as usize,
    };
    // SAFETY: the address is the RSDP the loader reported (or our copy of it); the crate
    // validates signature and checksum before trusting it.
    let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, address) }
        .map_err(AcpiSetupError::Tables)?;

    let mut summary = Summary {
        cpus_enabled: 0,
        cpus_possible: 0,
        io_apics: 0,
        power_off: false,
    };
    if let Ok(madt) = tables.find_table::<Madt>() {
        if madt.get().header.length as usize >= core::mem::size_of::<Madt>() {
            for entry in madt.get().entries() {
                let flags = match entry {
                    MadtEntry::LocalApic(e) => e.flags,
                    MadtEntry::LocalX2Apic(e) => e.flags,
                    MadtEntry::IoApic(_) => {
                        summary.io_apics += 1;
                        continue;
                    }
                    _ => continue,
                };
                // Bit 0 enabled, bit 1 online-capable (may be hot-added).
                if flags & 1 != 0 {
                    summary.cpus_enabled += 1;
                }
                if flags & 3 != 0 {
                    summary.cpus_possible += 1;
                }
            }
        }
    } else {
        log::warn!("ACPI: no MADT");
    }

    if let Some(r) = reset_from(&tables) {
        RESET_PORT.call_once(|| r);
    }
    match power_off_from(&tables) {
        Some(p) => {
            POWER_OFF.call_once(|| p);
            summary.power_off = true;
        }
        None => {
            log::warn!("ACPI: no usable S5 power-off (needs PM1 I/O ports and \\_S5 in the DSDT)")
        }
    }
    Ok(summary)
}

fn reset_from(tables: &AcpiTables<IdentityHandler>) -> Option<(u16, u8)> {
    let fadt = tables.find_table::<acpi::fadt::Fadt>().ok()?;
    let flags = fadt.flags; // a copy: the FADT is packed
    if !flags.supports_system_reset_via_fadt() {
        return None;
    }
    let reg = fadt.reset_register().ok()?;
    (reg.address_space == acpi::address::AddressSpace::SystemIo
        && reg.address != 0
        && reg.address <= 0xffff)
        .then_some((reg.address as u16, fadt.reset_value))
}

fn power_off_from(tables: &AcpiTables<IdentityHandler>) -> Option<PowerOff> {
    let fadt = tables.find_table::<acpi::fadt::Fadt>().ok()?;
    let io_port = |g: acpi::address::GenericAddress| {
        (g.address_space == acpi::address::AddressSpace::SystemIo
            && g.address != 0
            && g.address <= 0xffff)
            .then_some(g.address as u16)
    };
    let pm1a = io_port(fadt.pm1a_control_block().ok()?)?;
    let pm1b = fadt.pm1b_control_block().ok().flatten().and_then(io_port);
    let dsdt = tables.dsdt().ok()?;
    let code = paging::map_firmware(dsdt.address as u64, u64::from(dsdt.length))?;
    // SAFETY: the DSDT body was just mapped readable for `length` bytes.
    let aml = unsafe { core::slice::from_raw_parts(code as *const u8, dsdt.length as usize) };
    let types = find_s5(aml)?;
    Some(PowerOff { pm1a, pm1b, types })
}

/// Enters S5 (soft off). Returns only if ACPI power-off is unavailable or did not work.
pub fn power_off() {
    const SLP_EN: u16 = 1 << 13;
    let Some(p) = POWER_OFF.get() else { return };
    x86_64::instructions::interrupts::disable();
    if let Some(b) = p.pm1b {
        // SAFETY: the FADT names this port as the PM1b control register.
        unsafe { Port::<u16>::new(b).write((u16::from(p.types.b) << 10) | SLP_EN) };
    }
    // SAFETY: the FADT names this port as the PM1a control register; writing SLP_TYP|SLP_EN
    // is the ACPI-defined way to enter the sleep state.
    unsafe { Port::<u16>::new(p.pm1a).write((u16::from(p.types.a) << 10) | SLP_EN) };
    // Give the platform a moment before the caller falls back to halting.
    settle();
}

/// Resets the machine: the FADT reset register if it is an I/O port, then the 8042
/// keyboard controller's reset line, then the PCI reset control register (0xcf9).
/// Returns only if none of them took effect.
pub fn reset() {
    x86_64::instructions::interrupts::disable();
    if let Some(&(port, value)) = RESET_PORT.get() {
        // SAFETY: the FADT names this I/O port and value as the system reset register.
        unsafe { Port::<u8>::new(port).write(value) };
        settle();
    }
    // SAFETY: 0x64 is the 8042 command port; command 0xfe pulses the CPU reset line.
    unsafe { Port::<u8>::new(0x64).write(0xfe) };
    settle();
    // SAFETY: 0xcf9 is the PIIX/ICH reset control register; 0x06 asks for a hard reset.
    unsafe { Port::<u8>::new(0xcf9).write(0x06) };
    settle();
}

/// Gives the platform a moment to act on a power or reset request.
fn settle() {
    for _ in 0..1_000_000 {
        core::hint::spin_loop();
    }
}
