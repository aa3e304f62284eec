//! hvemu-vmm: a small KVM-based VMM that boots the hvnet image against hvemu's VMBus host,
//! emulating the Hyper-V hypervisor interface in user space.
//!
//! This tree is compiled into the `hvemu-vmm` binary (`src/bin/hvemu-vmm.rs` includes it
//! with `#[path]`), not into the `hvemu` library: the library forbids `unsafe` code, and a
//! VMM needs a little of it (mapping guest RAM, registering it with KVM, the kick signal,
//! the TAP ioctl and poll). Every `unsafe` block is in [`ram`], [`kick`] or [`nic`] and
//! carries a `// SAFETY:` comment.
//!
//! # What the guest sees
//!
//! * PVH boot ([`elf`], [`boot`]): the ELF's `PT_LOAD` segments at their physical
//!   addresses, entry at the Xen `PHYS32_ENTRY` note in 32-bit protected mode (flat CS/DS,
//!   CR0.PE, paging off, EBX = `hvm_start_info`), a memory map (low RAM, the BIOS hole as
//!   reserved, RAM from 1 MiB), the command line and an RSDP.
//! * ACPI ([`acpi`]): RSDP, RSDT/XSDT, MADT (one local APIC per vCPU, the I/O APIC,
//!   the ISA IRQ0 override), FADT with PM1 ports at 0x600/0x604 and a DSDT holding only
//!   `\_S5`, so S5 power-off works (the VMM exits 0).
//! * Devices ([`devices`]): COM1 as a 16550 register model writing to stdout or a file,
//!   the isa-debug-exit port 0xf4 (exit status `(value << 1) | 1`, as QEMU), the ACPI PM1
//!   control port. The local APIC, I/O APIC, PIC and PIT (with port 0x61) are KVM's
//!   in-kernel models.
//! * Hyper-V ([`hyperv`]): CPUID leaves 0x40000000..0x40000006 ("Microsoft Hv", "Hv#1",
//!   version, privileges, recommendations, limits), the synthetic MSRs (guest OS id,
//!   hypercall page, VP index, TIME_REF_COUNT, reference TSC page, SynIC: SCONTROL,
//!   SVERSION, SIEFP, SIMP, EOM, SINT0..15) and the hypercalls HvPostMessage and
//!   HvSignalEvent, forwarded to [`hvemu::VmbusHost`]. Host-to-guest messages go into
//!   the SIMP slot of SINT2 and channel signals into the SIEF page, each followed by the
//!   SINT2 vector as an MSI to the in-kernel local APIC.
//!
//! # KVM-PVM specifics (the `/dev/kvm` of these machines)
//!
//! * No in-kernel Hyper-V: the synthetic MSR range 0x40000000..=0x400000FF is denied by
//!   `KVM_X86_SET_MSR_FILTER`, which with `KVM_CAP_X86_USER_SPACE_MSR`
//!   (`KVM_MSR_EXIT_REASON_FILTER | UNKNOWN | INVAL`) turns every access into a
//!   `KVM_EXIT_X86_RDMSR`/`WRMSR` handled here; unknown MSRs get a #GP.
//! * `vmcall` livelocks, so the hypercall page this VMM writes when the guest enables the
//!   HYPERCALL MSR does not use it. Its code (64-bit only) is `pushfq; cli; mov r11, rdx;
//!   mov edx, 0x8000; out dx, eax; in eax, dx; mov rdx, r11; popfq; ret`: the `out` exit
//!   lets the VMM read RCX (control), R11 (input GPA or fast input) and R8 (output GPA)
//!   with `KVM_GET_REGS` and run the call; the `in` that follows returns the 32-bit result
//!   in EAX (zero-extended into RAX: status in bits 0..15, no reps). No register is
//!   changed behind KVM's back, so it works however KVM completes port I/O (natively or in
//!   its instruction emulator). Interrupts are off between the two exits so no handler's
//!   hypercall can come in between. R11 is clobbered, which Linux's and hvnet's hypercall
//!   callers already declare (Linux: R8-R11).
//!
//! # Event loop
//!
//! One thread owns the VM: it runs the vCPU (`KVM_RUN`) and handles every exit inline,
//! and it alone touches the [`hvemu::VmbusHost`] (which is not `Send`) and its device back
//! ends. Host work (control commands, device polls, NIC back ends, message and event
//! delivery) is done
//!
//! * right after the exits that can create it (hypercalls, EOM and SynIC MSR writes), and
//! * whenever the vCPU thread is kicked out of `KVM_RUN`: a helper thread kicks it every
//!   few milliseconds (the poll period) while NICs exist, a thread per TAP kicks it as
//!   soon as a frame arrives, and the control server kicks it when a command arrives.
//!
//! A kick is a real-time signal sent with `pthread_kill` to the vCPU thread; its handler
//! sets `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost:
//! KVM returns `EINTR` at once. A halted guest (HLT handled by the in-kernel LAPIC)
//! blocks inside `KVM_RUN`; the signal interrupts it, the loop does the host work, and
//! if that work injected an interrupt (`KVM_SIGNAL_MSI`) the next `KVM_RUN` wakes the
//! guest.
//!
//! # NICs
//!
//! `nic add` (or `run --nic`) creates an hvemu netvsp device on the VMBus host; the guest
//! sees the offer at once if it has connected. Without `--tap` the NIC joins the internal
//! LAN (hvemu's switch with a simulated DHCP server at 10.0.2.2 leasing 10.0.2.15 and
//! up); with `--tap NAME` it is bridged to a host TAP device (created if missing; the
//! caller moves it into a namespace or bridge, and runs dnsmasq or whatever peers it
//! wants there). `nic remove` rescinds the device.
//!
//! # Limits
//!
//! One vCPU; RAM up to 3 GiB (below the MMIO hole); 64-bit guests only (the hypercall
//! page code). Not emulated: synthetic timers, the VP assist page, crash and frequency
//! MSRs (not advertised, #GP), auto-EOI (CPUID recommends against it), SIMP/SIEFP as
//! overlay pages (they are the guest's RAM, as in KVM). `HVEMU_PROFILE=1` samples guest
//! RIPs at every kick, to see where an emulated guest spends its time.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod control;
pub mod devices;
pub mod elf;
pub mod hyperv;
pub mod ic;
pub mod kick;
pub mod machine;
pub mod nic;
pub mod ram;

use std::process::ExitCode;

/// Runs the command line `args` (without the program name); returns the process status.
pub fn main(args: Vec<String>) -> ExitCode {
    match cli::parse(&args) {
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Run(opts)) => machine::run(opts),
        Ok(cli::Command::Ctl(opts)) => control::client(&opts),
        Err(e) => {
            eprintln!("hvemu-vmm: {e}");
            eprintln!("(try `hvemu-vmm --help`)");
            ExitCode::from(2)
        }
    }
}
