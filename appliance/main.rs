//! hvnet: a network appliance kernel for Hyper-V and Azure.
//!
//! Boot path: `boot/entry.rs` (PVH or Multiboot2, 32-bit) -> [`kernel_entry`] (64-bit):
//! console and logging, GDT/IDT, boot information, frames and page tables, heap, APIC and
//! clock, ACPI, hypervisor detection, then the async executor runs the appliance's tasks
//! forever. The pure parts (boot-info parsing, command line, frame allocator, S5 decoding)
//! build on the host too and are unit-tested there.

#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

extern crate alloc;

mod boot;
mod calendar;
mod config;
mod console;
mod guest_info;
mod memory;
mod power;

#[cfg(target_os = "none")]
mod acpi;
#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod hyperv;
#[cfg(target_os = "none")]
mod logger;
#[cfg(target_os = "none")]
mod platform;
#[cfg(target_os = "none")]
mod time;

#[cfg(target_os = "none")]
mod kernel;

#[cfg(target_os = "none")]
pub use kernel::fatal_stop;

/// On the host this binary only exists for `cargo test` of the pure modules.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hvnet is a kernel image: build it with scripts/build (target x86_64-unknown-none)");
}
