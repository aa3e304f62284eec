//! hvemu-vmm: a small KVM-based VMM that boots the hvnet image against hvemu's VMBus host,
//! emulating the Hyper-V hypervisor interface in user space.
//!
//! This tree is compiled into the `hvemu-vmm` binary (`src/bin/hvemu-vmm.rs` includes it
//! with `#[path]`), not into the `hvemu` library: the library forbids `unsafe` code, and a
//! VMM needs a little of it (mapping guest RAM, registering it with KVM, the kick signal).
//! Every `unsafe` block is in [`ram`] or [`kick`] and carries a `// SAFETY:` comment.
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
//!   HYPERCALL MSR does not use it. Its code (64-bit only) is
//!   `mov r11, rdx; mov edx, 0x8000; out dx, eax; in eax, dx; mov rdx, r11; ret`: the
//!   `out` exit lets the VMM read RCX (control), R11 (input GPA or fast input) and R8
//!   (output GPA) with `KVM_GET_REGS` and run the call; the `in` that follows returns the
//!   32-bit result in EAX (zero-extended into RAX: status in bits 0..15, no reps). No
//!   register is changed behind KVM's back, so it works however KVM completes port I/O
//!   (natively or in its instruction emulator). R11 is clobbered, which Linux's and
//!   hvnet's hypercall callers already declare.
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
//!   few milliseconds (the poll period), and the control server kicks it when a command
//!   arrives.
//!
//! A kick is a real-time signal sent with `pthread_kill` to the vCPU thread; its handler
//! sets `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost:
//! KVM returns `EINTR` at once. A halted guest (HLT handled by the in-kernel LAPIC)
//! blocks inside `KVM_RUN`; the signal interrupts it, the loop does the host work, and
//! if that work injected an interrupt (`KVM_SIGNAL_MSI`) the next `KVM_RUN` wakes the
//! guest. Only one vCPU is supported.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod control;
pub mod devices;
pub mod elf;
pub mod hyperv;
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
