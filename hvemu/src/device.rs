//! The interface between the VMBus host and the device back ends behind its channels.

use std::any::Any;
use std::collections::BTreeMap;

use hvnet_wire::vmbus::{VmbusVersion, MAX_USER_DEFINED_BYTES};

use crate::faults::Faults;
use crate::host::Gpadl;
use crate::memory::GuestMemory;
use crate::ring::{HostRing, OwnedGpaRange};

/// Identifies a device added with [`crate::VmbusHost::add_device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

/// Which channel a back-end call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelCtx {
    /// The device.
    pub device: DeviceId,
    /// The channel's relid.
    pub relid: u32,
    /// 0 for the primary channel, > 0 for a sub-channel.
    pub sub_index: u16,
    /// VP the guest wants this channel's interrupts on.
    pub target_vp: u32,
    /// The negotiated VMBus version.
    pub version: VmbusVersion,
}

/// What a back end may ask of the host during a call, and what it may look at. Requests
/// are applied when the call returns.
pub struct HostActions<'a> {
    pub(crate) device: DeviceId,
    pub(crate) subchannels: u16,
    pub(crate) offer_subchannels: Option<u16>,
    pub(crate) rescind: bool,
    pub(crate) memory: &'a GuestMemory,
    pub(crate) gpadls: &'a BTreeMap<u32, Gpadl>,
}

impl<'a> HostActions<'a> {
    pub(crate) fn new(
        device: DeviceId,
        subchannels: u16,
        memory: &'a GuestMemory,
        gpadls: &'a BTreeMap<u32, Gpadl>,
    ) -> Self {
        HostActions {
            device,
            subchannels,
            offer_subchannels: None,
            rescind: false,
            memory,
            gpadls,
        }
    }

    /// Sub-channels the device has offered (or will offer) so far: indices `1..=n`.
    pub fn subchannels(&self) -> u16 {
        self.subchannels
    }

    /// Offers sub-channels so that indices `1..=count` exist (only the missing ones are
    /// offered; the count never shrinks).
    pub fn offer_subchannels(&mut self, count: u16) {
        let prev = self.offer_subchannels.unwrap_or(0);
        self.offer_subchannels = Some(prev.max(count));
    }

    /// Rescinds the whole device (hot-remove) once the call returns.
    pub fn rescind_device(&mut self) {
        self.rescind = true;
    }

    /// Guest memory, to reach buffers the guest described with GPADLs.
    pub fn memory(&self) -> &GuestMemory {
        self.memory
    }

    /// The ranges of a created GPADL that belongs to a channel of this device.
    pub fn gpadl(&self, id: u32) -> Option<&[OwnedGpaRange]> {
        let g = self.gpadls.get(&id)?;
        if g.device != self.device {
            return None;
        }
        g.ranges()
    }
}

/// A host device serving one or more channels (the primary and its sub-channels).
///
/// Calls are synchronous and come from the host's guest-facing entry points:
/// `on_open` while handling OPENCHANNEL, `on_packets` when the guest signals the channel,
/// `on_poll` from [`crate::VmbusHost::poll_device`], `on_close` on CLOSECHANNEL, rescind
/// and UNLOAD. Writing to the ring signals the guest as the ring rules require; the host
/// raises the event flag after the call.
pub trait DeviceBackend: Any {
    /// The guest opened channel `ch`. An `Err(status)` fails the open with that
    /// OPENCHANNEL_RESULT status.
    fn on_open(
        &mut self,
        ch: ChannelCtx,
        ring: &mut HostRing,
        host: &mut HostActions<'_>,
    ) -> Result<(), u32> {
        let _ = (ch, ring, host);
        Ok(())
    }

    /// The guest signalled channel `ch`: read what it wrote, answer, or make progress on
    /// writes that found the ring full.
    fn on_packets(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>);

    /// The test asked the device to make progress on its own (e.g. deliver host-initiated
    /// packets).
    fn on_poll(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>) {
        let _ = (ch, ring, host);
    }

    /// Channel `ch` closed (CLOSECHANNEL, rescind or UNLOAD); its ring is gone.
    fn on_close(&mut self, ch: ChannelCtx) {
        let _ = ch;
    }
}

/// A device to add to the host.
pub struct DeviceSpec {
    /// Interface (class) GUID in wire byte order, e.g. the netvsc GUID.
    pub class_id: [u8; 16],
    /// Instance GUID in wire byte order; shared by the primary and its sub-channels.
    pub instance_id: [u8; 16],
    /// The back end.
    pub backend: Box<dyn DeviceBackend>,
    /// Faults to inject for this device.
    pub faults: Faults,
    /// `chn_flags` of the offers.
    pub offer_flags: u16,
    /// `mmio_megabytes` of the offers.
    pub mmio_megabytes: u16,
    /// User-defined bytes of the offers.
    pub user_def: [u8; MAX_USER_DEFINED_BYTES],
}

impl DeviceSpec {
    /// A device with no faults, no offer flags and zero user data.
    pub fn new(class_id: [u8; 16], instance_id: [u8; 16], backend: Box<dyn DeviceBackend>) -> Self {
        DeviceSpec {
            class_id,
            instance_id,
            backend,
            faults: Faults::none(),
            offer_flags: 0,
            mmio_megabytes: 0,
            user_def: [0; MAX_USER_DEFINED_BYTES],
        }
    }

    /// The same device with `faults`.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }
}

impl std::fmt::Debug for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSpec")
            .field("class_id", &self.class_id)
            .field("instance_id", &self.instance_id)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}
