//! A small device for testing VMBus itself: sub-channel grants and echo.
//!
//! Protocol (all in-band packets; payloads are seen with their padding to 8 bytes):
//!
//! * **Sub-channel request**, primary channel only: payload starts with
//!   [`SUBCH_MAGIC`] (`b"SUBCH"`) followed by a `u16` little-endian count (7 bytes,
//!   [`SUBCH_REQUEST_LEN`]). The device grants `min(count, max_subchannels) + over_grant`
//!   sub-channels: it has the host offer indices `1..=granted` (those not offered yet)
//!   and answers with a **completion** (`VM_PKT_COMP`, same transaction id) whose
//!   payload is `b"SUBCH"` + granted count (`u16` LE). The completion goes into the ring
//!   before the offers are queued, so a guest sees it first or concurrently, as with
//!   netvsp; it must wait for the offers themselves.
//! * **Echo**, any channel: any other in-band packet comes back with the same
//!   transaction id and payload, as a completion if the guest asked for one, else as an
//!   in-band packet without completion requested.
//! * Other packet types are counted and ignored (an empty completion if one was
//!   requested).
//!
//! When the host-to-guest ring is full, replies wait in a per-channel backlog and the
//! device stops reading until the guest makes room (the pending-send-size protocol wakes
//! it), so a guest that floods the device sees real back-pressure.

use std::collections::{BTreeMap, VecDeque};

use crate::device::{ChannelCtx, DeviceBackend, HostActions};
use crate::ring::{HostRing, RingError, RingPacketKind};

/// First five bytes of a sub-channel request and its answer.
pub const SUBCH_MAGIC: &[u8; 5] = b"SUBCH";
/// Length of a sub-channel request or answer before padding.
pub const SUBCH_REQUEST_LEN: usize = 7;

/// What the test device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestDeviceCounters {
    /// Channels opened.
    pub opens: u32,
    /// Channels closed.
    pub closes: u32,
    /// Sub-channel requests received.
    pub subchannel_requests: u32,
    /// Count granted by the last request.
    pub last_granted: u16,
    /// Packets echoed.
    pub echoed: u64,
    /// Packets of other types ignored.
    pub ignored: u64,
    /// Replies that found the ring full and waited.
    pub deferred: u64,
}

#[derive(Clone, Debug)]
enum Reply {
    InBand { trans_id: u64, payload: Vec<u8> },
    Completion { trans_id: u64, payload: Vec<u8> },
}

/// The test device (see the module docs for its protocol).
#[derive(Debug, Default)]
pub struct SubchannelTestDevice {
    max_subchannels: u16,
    over_grant: u16,
    counters: TestDeviceCounters,
    backlog: BTreeMap<u32, VecDeque<Reply>>,
}

impl SubchannelTestDevice {
    /// A device granting at most `max_subchannels` sub-channels per request.
    pub fn new(max_subchannels: u16) -> Self {
        SubchannelTestDevice {
            max_subchannels,
            ..Default::default()
        }
    }

    /// Grants `extra` more sub-channels than asked for (a misbehaving host, which a guest
    /// must not trust).
    pub fn over_grant(mut self, extra: u16) -> Self {
        self.over_grant = extra;
        self
    }

    /// Changes the cap for later requests.
    pub fn set_max_subchannels(&mut self, max: u16) {
        self.max_subchannels = max;
    }

    /// Counters.
    pub fn counters(&self) -> TestDeviceCounters {
        self.counters
    }

    /// Replies waiting for ring space on `relid`.
    pub fn backlog(&self, relid: u32) -> usize {
        self.backlog.get(&relid).map_or(0, VecDeque::len)
    }

    /// Sends queued replies; returns false if the ring is still full (or broken).
    fn flush(&mut self, relid: u32, ring: &mut HostRing) -> bool {
        let Some(q) = self.backlog.get_mut(&relid) else {
            return true;
        };
        while let Some(reply) = q.front() {
            let r = match reply {
                Reply::InBand { trans_id, payload } => ring.write_inband(*trans_id, false, payload),
                Reply::Completion { trans_id, payload } => {
                    ring.write_completion(*trans_id, payload)
                }
            };
            match r {
                Ok(()) => {
                    q.pop_front();
                }
                Err(_) => return false,
            }
        }
        true
    }

    fn reply(&mut self, relid: u32, ring: &mut HostRing, reply: Reply) -> bool {
        self.backlog.entry(relid).or_default().push_back(reply);
        let sent = self.flush(relid, ring);
        if !sent {
            self.counters.deferred += 1;
        }
        sent
    }
}

impl DeviceBackend for SubchannelTestDevice {
    fn on_open(
        &mut self,
        ch: ChannelCtx,
        _ring: &mut HostRing,
        _host: &mut HostActions<'_>,
    ) -> Result<(), u32> {
        self.counters.opens += 1;
        self.backlog.remove(&ch.relid);
        Ok(())
    }

    fn on_packets(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>) {
        if !self.flush(ch.relid, ring) {
            // Still no room: keep the guest's packets in its ring (back-pressure).
            return;
        }
        loop {
            let packet = match ring.read_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(RingError::MalformedPacket(_)) => continue,
                Err(_) => return,
            };
            let reply = match packet.kind {
                RingPacketKind::InBand => {
                    let p = &packet.payload;
                    let is_request = ch.sub_index == 0
                        && p.len() >= SUBCH_REQUEST_LEN
                        && p.starts_with(SUBCH_MAGIC);
                    if is_request {
                        let asked = u16::from_le_bytes([p[5], p[6]]);
                        let granted = asked
                            .min(self.max_subchannels)
                            .saturating_add(self.over_grant);
                        self.counters.subchannel_requests += 1;
                        self.counters.last_granted = granted;
                        host.offer_subchannels(granted);
                        let mut payload = SUBCH_MAGIC.to_vec();
                        payload.extend_from_slice(&granted.to_le_bytes());
                        Reply::Completion {
                            trans_id: packet.trans_id,
                            payload,
                        }
                    } else {
                        self.counters.echoed += 1;
                        if packet.completion_requested {
                            Reply::Completion {
                                trans_id: packet.trans_id,
                                payload: packet.payload,
                            }
                        } else {
                            Reply::InBand {
                                trans_id: packet.trans_id,
                                payload: packet.payload,
                            }
                        }
                    }
                }
                _ => {
                    self.counters.ignored += 1;
                    if !packet.completion_requested {
                        continue;
                    }
                    Reply::Completion {
                        trans_id: packet.trans_id,
                        payload: Vec::new(),
                    }
                }
            };
            if !self.reply(ch.relid, ring, reply) {
                return;
            }
        }
    }

    fn on_close(&mut self, ch: ChannelCtx) {
        self.counters.closes += 1;
        self.backlog.remove(&ch.relid);
    }
}
