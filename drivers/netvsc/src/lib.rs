//! netvsc: the guest driver for Hyper-V's synthetic NIC.
//!
//! - [`nic`]: what the network side sees of any NIC (independent of netvsc, so the
//!   network crate can be tested against simple in-memory NICs).
//! - [`driver`]: probe, sub-channel handling and removal, i.e. where the two VMBus offer
//!   workers and the configuration lock meet.
//! - [`device`]: one NIC's queues, buffers and packet processing.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod backlog;
pub mod config;
pub mod device;
pub mod driver;
mod flow;
pub mod nic;
mod sections;
mod select;

pub use config::NetvscConfig;
pub use device::{NetvscError, NetvscNic, NicCounters};
pub use driver::NetvscDriver;
