//! VMBus guest side.
//!
//! The crate is written against two small traits so it runs unchanged on the appliance
//! (real hypercalls, SynIC pages and frames) and in host tests against the emulated
//! Hyper-V host: [`platform::Hypervisor`] (post messages, signal events, take incoming
//! messages and event flags) and [`memory::DmaAllocator`] (memory the host can see, with
//! guest physical addresses that need not equal the guest's own addresses).

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bus;
pub mod channel;
pub mod gpadl;
pub mod memory;
pub mod platform;
pub mod race;
pub mod ring;
