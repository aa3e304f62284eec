//! x86_64 machine support: the only place (with `boot/entry.rs` and `memory/`) that uses
//! privileged instructions. Everything here runs on the boot CPU; per-CPU pieces (GDT/TSS,
//! LAPIC) are written per CPU so application processors can reuse them.

pub mod apic;
pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod pic;
pub mod pit;
pub mod serial;
