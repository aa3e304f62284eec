//! hvemu: an in-process Hyper-V host for testing hvnet's guest drivers.
//!
//! The guest drivers (`drivers/vmbus`, netvsc) talk to Hyper-V through a handful of
//! hypervisor services: HvPostMessage, HvSignalEvent, the SynIC message slot and the
//! per-channel event flags, plus ring buffers and GPADL-described buffers in guest memory.
//! This crate models the *host* end of all of that, deterministically and on one thread,
//! so the same driver code that runs on Hyper-V can be driven by plain `#[test]`s.
//!
//! # Layers
//!
//! * [`GuestMemory`]: a model of guest RAM. Pages are handed out scrambled and with holes
//!   between them, so a guest that assumes contiguity or confuses host addresses with
//!   guest physical addresses fails loudly. Pages referenced by a live GPADL are pinned;
//!   freeing them is recorded as a violation.
//! * [`HostRing`]: the host ends of one channel's ring pair, written from the wire formats
//!   in `hvnet-wire` (never from the guest's ring code). Every index and descriptor the
//!   guest wrote is validated before use.
//! * [`VmbusHost`]: the VMBus control plane as a synchronous state machine (OpenVMM's
//!   `vmbus_server/src/channels.rs` is the model): version negotiation, offers, GPADLs,
//!   open/close, rescind and relid release, with every malformed or out-of-state guest
//!   message counted as a [`Violation`] instead of a panic.
//! * [`DeviceBackend`]: what a host device (a netvsp, or the [`SubchannelTestDevice`])
//!   plugs in to serve a channel's rings.
//! * [`Faults`] and [`HostFaults`]: deterministic fault injection (rescind at step k,
//!   swallowed or failed opens, duplicate offers, raw malformed messages, seeded delay and
//!   cross-channel reordering of host messages).
//!
//! # Determinism
//!
//! Nothing here reads a clock, spawns a thread or iterates a hash map. Randomised faults
//! draw from one [`SplitMix64`] seeded by [`HostConfig::seed`]; time moves only when the
//! caller calls [`VmbusHost::advance_time`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod device;
mod faults;
mod host;
pub mod ic;
pub mod lan;
mod memory;
pub mod netvsp;
pub mod peers;
mod queue;
mod ring;
mod rng;
pub mod rss;
mod stats;
pub mod switch;
mod testdev;

pub use device::{ChannelCtx, DeviceBackend, DeviceId, DeviceSpec, HostActions};
pub use faults::{ChannelSel, DuplicateOffer, Faults, HostFaults, RescindTiming};
pub use host::{ConnectionInfo, HostConfig, VmbusHost, STATUS_UNSUCCESSFUL};
pub use memory::{
    GuestMemory, GuestRam, MemError, MemoryViolation, MemoryViolationKind, PAGE_SIZE,
};
pub use ring::{
    HostRing, OwnedGpaRange, RingCorruption, RingError, RingPacket, RingPacketKind, RingStats,
};
pub use rng::SplitMix64;
pub use stats::{ChannelState, ChannelSummary, HostStats, Violation, ViolationKind};
pub use testdev::{SubchannelTestDevice, TestDeviceCounters, SUBCH_MAGIC, SUBCH_REQUEST_LEN};

/// Hypercall status codes the emulated hypervisor returns (`HV_STATUS_*`).
pub mod status {
    /// `HV_STATUS_INVALID_PARAMETER`: payload longer than 240 bytes, reserved message type.
    pub const INVALID_PARAMETER: u16 = 0x5;
    /// `HV_STATUS_INVALID_CONNECTION_ID`: no port behind the connection id (e.g. id 4 on a
    /// pre-5.0 host, or a channel whose ring is not open).
    pub const INVALID_CONNECTION_ID: u16 = 0x12;
    /// `HV_STATUS_INSUFFICIENT_BUFFERS`: the host's message queue is full; retry.
    pub const INSUFFICIENT_BUFFERS: u16 = 0x13;
}
