//! CPU identification and the few instructions the rest of the kernel needs.

use raw_cpuid::{CpuId, CpuIdResult};
use x86_64::instructions::port::Port;

/// Raw CPUID for a leaf (subleaf 0).
pub fn cpuid(leaf: u32) -> CpuIdResult {
    raw_cpuid::native_cpuid::cpuid_count(leaf, 0)
}

/// Whether the CPU offers x2APIC (CPUID.1:ECX bit 21).
pub fn has_x2apic() -> bool {
    CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_x2apic())
}

/// Whether the CPU supports the no-execute page bit (CPUID.80000001h:EDX bit 20).
pub fn has_nx() -> bool {
    CpuId::new()
        .get_extended_processor_and_feature_identifiers()
        .is_some_and(|f| f.has_execute_disable())
}

/// CPU brand string, or vendor if there is none.
pub fn brand(buf: &mut [u8; 48]) -> &str {
    let id = CpuId::new();
    if let Some(b) = id.get_processor_brand_string() {
        let s = b.as_str().trim();
        let n = s.len().min(buf.len());
        buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        return core::str::from_utf8(&buf[..n]).unwrap_or("?");
    }
    if let Some(v) = id.get_vendor_info() {
        let s = v.as_str();
        let n = s.len().min(buf.len());
        buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        return core::str::from_utf8(&buf[..n]).unwrap_or("?");
    }
    "unknown"
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stops this CPU for good: interrupts off, halt in a loop (NMIs return to the loop).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Status codes for QEMU's `isa-debug-exit` device at port 0xf4: QEMU exits with
/// `(code << 1) | 1`, so 0x10 gives 33 and 0x11 gives 35.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DebugExit {
    Success = 0x10,
    Failure = 0x11,
}

/// Asks the emulator to exit with `code`. Returns if no such device is present.
pub fn debug_exit(code: DebugExit) {
    let mut port: Port<u8> = Port::new(0xf4);
    // SAFETY: port 0xf4 is the isa-debug-exit device in our test setups; on real hardware
    // nothing decodes it and the write is dropped.
    unsafe { port.write(code as u8) };
}
