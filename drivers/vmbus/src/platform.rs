//! What VMBus needs from the hypervisor.
//!
//! On the appliance this is implemented over the hypercall page (HvPostMessage,
//! HvSignalEvent) and the SynIC message and event-flag pages of the VMBus SINT; in host tests
//! by an adapter over the emulated host. Everything the host hands over through it is
//! untrusted: callers validate lengths, relids and indices before use.

use hvnet_runtime::irq::IrqSignal;

/// A hypercall status other than success (`HV_STATUS_*`, TLFS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HvStatus(pub u16);

impl HvStatus {
    /// `HV_STATUS_INVALID_CONNECTION_ID`: e.g. a pre-5.0 host refusing connection id 4.
    pub const INVALID_CONNECTION_ID: Self = Self(0x12);
    /// `HV_STATUS_INSUFFICIENT_BUFFERS`: the host's message queue is full; retry later.
    pub const INSUFFICIENT_BUFFERS: Self = Self(0x13);
    /// `HV_STATUS_INVALID_PARAMETER`.
    pub const INVALID_PARAMETER: Self = Self(0x5);
}

/// One message taken from the VMBus SINT's slot in the SIMP page (a copy: the slot is
/// released with EOM as soon as it is copied).
#[derive(Clone, Copy)]
pub struct SynicMessage {
    /// `hv_message_header.message_type` (1 = channel message on VMBus).
    pub message_type: u32,
    /// `hv_message_header.payload_size` as the host wrote it (not yet validated: may exceed
    /// 240).
    pub payload_size: u8,
    /// The 240 payload bytes of the slot.
    pub payload: [u8; 240],
}

/// The guest's view of the hypervisor for VMBus.
pub trait Hypervisor {
    /// HvPostMessage: sends `payload` (at most 240 bytes) with `message_type` to the host
    /// on `connection_id`.
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus>;

    /// HvSignalEvent: sets event flag 0 on `connection_id` (the channel's host notification).
    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus>;

    /// Takes the pending VMBus message, if any, and signals end-of-message so the host may
    /// deliver the next one.
    fn take_message(&self) -> Option<SynicMessage>;

    /// Calls `f` with every channel relid whose event flag is set in the VMBus SINT's
    /// event-flags block, clearing each flag first (VMBus >= WIN8 per-channel flags).
    fn drain_events(&self, f: &mut dyn FnMut(u32));

    /// Raised whenever a message or an event flag may be pending (the SINT interrupt).
    fn interrupt(&self) -> &'static IrqSignal;

    /// VP index of the CPU running the VMBus tasks (target for channel interrupts).
    fn vp_index(&self) -> u32;
}
