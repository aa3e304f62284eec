//! Heartbeat: the host sends a sequence number every few seconds; the guest answers with
//! the number plus one, which tells the host it is alive (Linux `hv_util.c`).

use core::cell::Cell;

use hvnet_wire::ic::{
    heartbeat_seq, IcMessage, IcMsgType, IcStatus, IcVersion, GUEST_HEARTBEAT_VERSIONS,
    HEARTBEAT_MIN_BODY, HV_HEART_BEAT_GUID,
};
use hvnet_wire::vmbus::Guid;

use crate::channel::{ChannelCounters, DropReason, Reply, Service};

/// Heartbeat counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatStats {
    /// The channel's counters.
    pub channel: ChannelCounters,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// The last sequence number the host sent.
    pub last_seq: Option<u64>,
}

/// The heartbeat service.
#[derive(Default)]
pub(crate) struct Heartbeat {
    counters: Cell<ChannelCounters>,
    heartbeats: Cell<u64>,
    last_seq: Cell<Option<u64>>,
}

impl Heartbeat {
    pub(crate) fn stats(&self) -> HeartbeatStats {
        HeartbeatStats {
            channel: self.counters.get(),
            heartbeats: self.heartbeats.get(),
            last_seq: self.last_seq.get(),
        }
    }
}

impl Service for Heartbeat {
    const NAME: &'static str = "heartbeat";
    const CLASS: Guid = HV_HEART_BEAT_GUID;
    const MSG_TYPE: IcMsgType = IcMsgType::HEARTBEAT;
    const VERSIONS: &'static [IcVersion] = &GUEST_HEARTBEAT_VERSIONS;
    type After = ();

    fn counters(&self) -> &Cell<ChannelCounters> {
        &self.counters
    }

    fn handle(
        &self,
        msg: &IcMessage<'_>,
        _version: IcVersion,
        reply: &mut Reply,
    ) -> Result<Option<()>, DropReason> {
        let seq = heartbeat_seq(msg.body)?;
        let body = reply.body(HEARTBEAT_MIN_BODY);
        if let Some(dst) = body.get_mut(..HEARTBEAT_MIN_BODY) {
            dst.copy_from_slice(&seq.wrapping_add(1).to_le_bytes());
        }
        reply.set_status(IcStatus::S_OK);
        self.heartbeats.set(self.heartbeats.get() + 1);
        self.last_seq.set(Some(seq));
        Ok(None)
    }

    fn after_reply(&self, _after: ()) {}
}
