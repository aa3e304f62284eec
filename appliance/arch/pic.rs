//! The legacy 8259 PICs: remapped away from the exception vectors, then fully masked. The
//! appliance takes interrupts only through the local APIC (and, on Hyper-V, the SynIC).

use x86_64::instructions::port::Port;

use super::idt::PIC_BASE;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;
const EOI: u8 = 0x20;

/// Remaps both PICs to `PIC_BASE..PIC_BASE + 16` and masks every line.
pub fn disable() {
    let mut mc: Port<u8> = Port::new(MASTER_CMD);
    let mut md: Port<u8> = Port::new(MASTER_DATA);
    let mut sc: Port<u8> = Port::new(SLAVE_CMD);
    let mut sd: Port<u8> = Port::new(SLAVE_DATA);
    // SAFETY: the standard ICW1-4 sequence on the PIC ports, run once at boot with
    // interrupts disabled; afterwards every line is masked.
    unsafe {
        mc.write(0x11); // ICW1: init, expect ICW4
        sc.write(0x11);
        md.write(PIC_BASE); // ICW2: vector base
        sd.write(PIC_BASE + 8);
        md.write(4); // ICW3: slave on IRQ2
        sd.write(2);
        md.write(1); // ICW4: 8086 mode
        sd.write(1);
        md.write(0xff); // mask all
        sd.write(0xff);
    }
}

/// End-of-interrupt to the master PIC (needed after a spurious IRQ 15).
pub fn eoi_master() {
    let mut mc: Port<u8> = Port::new(MASTER_CMD);
    // SAFETY: writing EOI to the master PIC command port has no other effect.
    unsafe { mc.write(EOI) };
}
