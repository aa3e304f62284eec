//! Time-sync device: sends the host time in the layout of the negotiated version
//! (version 4: `ictimesync_ref_data`, 22 bytes; older: `ictimesync_data`, 25 bytes) with
//! the `SYNC` or `SAMPLE` flag, and checks that answers echo what was sent.

use std::collections::VecDeque;

use hvnet_wire::ic::{
    IcMsgHdr, IcMsgType, IcStatus, IcTimesyncData, IcTimesyncRefData, IcVersion, Negotiated,
    TimesyncMsg, HOST_TIMESYNC_VERSIONS, HV_TS_GUID, ICTIMESYNCFLAG_SAMPLE, ICTIMESYNCFLAG_SYNC,
    WLTIMEDELTA,
};
use hvnet_wire::vmbus::Guid;
use zerocopy::IntoBytes;

use super::{HostService, IcHandle, ServiceRequest};

/// A time message to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeMessage {
    /// Host time, 100 ns units since 1601-01-01 UTC.
    pub parent_time: u64,
    /// `ICTIMESYNCFLAG_*`.
    pub flags: u8,
    /// The guest reference counter at sampling time (version 4 only).
    pub reference_time: u64,
    /// Send as a transaction and wait for the answer. OpenVMM sends samples without
    /// flags and never reads answers; Linux answers every message anyway.
    pub expect_reply: bool,
}

impl TimeMessage {
    /// A `SYNC` message for Unix time `unix_100ns` (100 ns units).
    pub fn sync(unix_100ns: u64) -> Self {
        TimeMessage {
            parent_time: unix_100ns.saturating_add(WLTIMEDELTA),
            flags: ICTIMESYNCFLAG_SYNC,
            reference_time: 0,
            expect_reply: true,
        }
    }

    /// A `SAMPLE` message for Unix time `unix_100ns`.
    pub fn sample(unix_100ns: u64) -> Self {
        TimeMessage {
            flags: ICTIMESYNCFLAG_SAMPLE,
            ..Self::sync(unix_100ns)
        }
    }
}

/// What the time-sync device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimesyncState {
    /// Messages written.
    pub sent: u64,
    /// Messages answered (those sent as transactions).
    pub answered: u64,
    /// The last message written.
    pub last_sent: Option<TimeMessage>,
}

/// The time-sync service of an [`super::IcDevice`].
#[derive(Debug, Default)]
pub struct Timesync {
    queue: VecDeque<TimeMessage>,
    state: TimesyncState,
}

impl HostService for Timesync {
    type Pending = TimeMessage;
    const MSG_TYPE: IcMsgType = IcMsgType::TIMESYNC;
    const CLASS: Guid = HV_TS_GUID;

    fn default_versions() -> Vec<IcVersion> {
        HOST_TIMESYNC_VERSIONS.to_vec()
    }

    fn next_request(
        &mut self,
        versions: &Negotiated,
        _poll: bool,
    ) -> Option<ServiceRequest<TimeMessage>> {
        let m = self.queue.pop_front()?;
        self.state.sent += 1;
        self.state.last_sent = Some(m);
        let body = if versions.message.major.get() >= 4 {
            IcTimesyncRefData {
                parenttime: m.parent_time.into(),
                vmreferencetime: m.reference_time.into(),
                flags: m.flags,
                ..IcTimesyncRefData::default()
            }
            .as_bytes()
            .to_vec()
        } else {
            IcTimesyncData {
                parenttime: m.parent_time.into(),
                flags: m.flags,
                ..IcTimesyncData::default()
            }
            .as_bytes()
            .to_vec()
        };
        Some(ServiceRequest {
            body,
            expect_reply: m.expect_reply,
            pending: m,
        })
    }

    fn on_response(
        &mut self,
        sent: TimeMessage,
        header: &IcMsgHdr,
        body: &[u8],
    ) -> Result<(), String> {
        let echoed = TimesyncMsg::parse(body, header.icvermsg)
            .map_err(|e| format!("time-sync answer: {e}"))?;
        if header.status() != IcStatus::S_OK {
            return Err(format!("time-sync answer status {:?}", header.status()));
        }
        if echoed.parent_time() != sent.parent_time || echoed.flags() != sent.flags {
            return Err(format!(
                "time-sync answer {:?} does not echo {sent:?}",
                echoed
            ));
        }
        self.state.answered += 1;
        Ok(())
    }
}

impl IcHandle<Timesync> {
    /// Sends a `SYNC` with Unix time `unix_100ns` (100 ns units).
    pub fn send_sync(&self, unix_100ns: u64) {
        self.send_time(TimeMessage::sync(unix_100ns));
    }

    /// Sends a `SAMPLE` with Unix time `unix_100ns`.
    pub fn send_sample(&self, unix_100ns: u64) {
        self.send_time(TimeMessage::sample(unix_100ns));
    }

    /// Sends `message`.
    pub fn send_time(&self, message: TimeMessage) {
        self.with_service(|s| s.queue.push_back(message));
    }

    /// Counters.
    pub fn timesync(&self) -> TimesyncState {
        self.with_service(|s| s.state)
    }
}
