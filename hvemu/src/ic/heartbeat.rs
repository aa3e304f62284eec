//! Heartbeat device: sends increasing sequence numbers and checks each comes back plus
//! one (Linux answers `seq_num + 1`; Hyper-V sends one every few seconds).

use hvnet_wire::ic::{
    heartbeat_seq, HeartbeatMsgData, IcMsgHdr, IcMsgType, IcStatus, IcVersion, Negotiated,
    HOST_HEARTBEAT_VERSIONS, HV_HEART_BEAT_GUID,
};
use hvnet_wire::vmbus::Guid;
use hvnet_wire::U64;
use zerocopy::IntoBytes;

use super::{HostService, IcHandle, ServiceRequest};

/// What the heartbeat device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatState {
    /// Heartbeats sent.
    pub sent: u64,
    /// Heartbeats answered correctly.
    pub answered: u64,
    /// The sequence number of the next heartbeat.
    pub next_seq: u64,
    /// The last number the guest answered with.
    pub last_echo: Option<u64>,
}

/// The heartbeat service of an [`super::IcDevice`].
#[derive(Debug)]
pub struct Heartbeat {
    beat_on_poll: bool,
    queued: u64,
    state: HeartbeatState,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            beat_on_poll: true,
            queued: 0,
            state: HeartbeatState {
                next_seq: 1,
                ..HeartbeatState::default()
            },
        }
    }
}

impl HostService for Heartbeat {
    /// The sequence number sent.
    type Pending = u64;
    const MSG_TYPE: IcMsgType = IcMsgType::HEARTBEAT;
    const CLASS: Guid = HV_HEART_BEAT_GUID;

    fn default_versions() -> Vec<IcVersion> {
        HOST_HEARTBEAT_VERSIONS.to_vec()
    }

    fn next_request(&mut self, _versions: &Negotiated, poll: bool) -> Option<ServiceRequest<u64>> {
        if self.queued > 0 {
            self.queued -= 1;
        } else if !(poll && self.beat_on_poll) {
            return None;
        }
        let seq = self.state.next_seq;
        self.state.next_seq = seq.wrapping_add(1);
        self.state.sent += 1;
        let body = HeartbeatMsgData {
            seq_num: U64::new(seq),
            reserved: [0; 32],
        };
        Some(ServiceRequest {
            body: body.as_bytes().to_vec(),
            expect_reply: true,
            pending: seq,
        })
    }

    fn on_response(&mut self, seq: u64, header: &IcMsgHdr, body: &[u8]) -> Result<(), String> {
        let echo = heartbeat_seq(body).map_err(|e| format!("heartbeat answer: {e}"))?;
        self.state.last_echo = Some(echo);
        if header.status() != IcStatus::S_OK {
            return Err(format!("heartbeat answer status {:?}", header.status()));
        }
        if echo != seq.wrapping_add(1) {
            return Err(format!("heartbeat {seq} answered with {echo}"));
        }
        self.state.answered += 1;
        Ok(())
    }
}

impl IcHandle<Heartbeat> {
    /// Queues one heartbeat (sent when nothing is outstanding).
    pub fn beat(&self) {
        self.with_service(|s| s.queued += 1);
    }

    /// Whether every poll sends a heartbeat when nothing is outstanding (on by default).
    pub fn set_beat_on_poll(&self, on: bool) {
        self.with_service(|s| s.beat_on_poll = on);
    }

    /// Counters.
    pub fn heartbeat(&self) -> HeartbeatState {
        self.with_service(|s| s.state)
    }
}
