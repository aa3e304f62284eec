//! The 8254 PIT, used only as a known-frequency reference to calibrate the TSC and the
//! LAPIC timer at boot (channel 2, gated through port 0x61, polled; no interrupts).

use x86_64::instructions::port::Port;

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Runs `start()` when a `ms`-millisecond PIT countdown begins and `stop()` when it ends.
/// Returns false if the PIT never finished (no PIT: some hypervisors omit it).
pub fn measure(ms: u64, start: impl FnOnce(), stop: impl FnOnce()) -> bool {
    let count = (PIT_HZ * ms / 1000).min(0xffff) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: channel 2 and the port-0x61 gate bits belong to the PC speaker path, which
    // nothing else in the kernel uses; the speaker output bit (1) is kept off.
    unsafe {
        let g = gate.read();
        gate.write((g & !0x02) & !0x01); // gate low, speaker off
        cmd.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        ch2.write(count as u8);
        ch2.write((count >> 8) as u8);
        let g = gate.read();
        start();
        gate.write(g | 0x01); // gate high: counting starts
    }
    // Bound the wait: about 100x the expected loop count of a fast CPU.
    for _ in 0..200_000_000u64 {
        // SAFETY: reading the status port has no side effects.
        if unsafe { gate.read() } & 0x20 != 0 {
            stop();
            return true;
        }
        core::hint::spin_loop();
    }
    false
}
