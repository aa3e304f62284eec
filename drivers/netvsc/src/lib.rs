//! netvsc: the guest driver for Hyper-V's synthetic NIC.
//!
//! [`nic`] is what the network side sees of any NIC; it is independent of netvsc so the
//! network crate can be tested against simple in-memory NICs.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod nic;
