//! The glue between the runtime's executor and this machine: the clock and the idle path
//! (arm the LAPIC timer for the next deadline, then `sti; hlt`).

use hvnet_runtime::irq;
use hvnet_runtime::time::Instant;
use hvnet_runtime::Platform;
use x86_64::instructions::interrupts;

use crate::arch::apic;
use crate::time;

/// The boot CPU's executor platform.
pub struct KernelPlatform;

impl Platform for KernelPlatform {
    fn now(&self) -> Instant {
        Instant::from_nanos(time::now_ns())
    }

    fn idle(&self, deadline: Option<Instant>) {
        // Interrupts off between the check and the halt, so a signal raised in between
        // cannot be missed: `sti; hlt` opens the window only at the halt itself.
        interrupts::disable();
        if irq::any_pending() {
            interrupts::enable();
            return;
        }
        match deadline {
            Some(d) => {
                let now = time::now_ns();
                let due = d.as_nanos();
                if due <= now {
                    interrupts::enable();
                    return;
                }
                apic::arm_oneshot(due - now);
            }
            None => apic::disarm(),
        }
        interrupts::enable_and_hlt();
    }
}
