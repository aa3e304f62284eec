//! Integration components on the host side: heartbeat, shutdown, time sync and KVP
//! devices that talk to a guest the way Hyper-V (and OpenVMM) do.
//!
//! Each device is an [`IcDevice`] around a service ([`Heartbeat`], [`Shutdown`],
//! [`Timesync`], [`Kvp`]); add it to a [`crate::VmbusHost`] with
//! [`IcDevice::into_device_spec`] and keep its [`IcHandle`] (cloneable, like
//! [`crate::netvsp::NetvspHandle`]) to drive it and to look at what happened.
//!
//! # Conversation
//!
//! * When the guest opens the channel the device writes a version negotiation request:
//!   framework versions then service versions ([`IcVersions`], OpenVMM's lists by
//!   default), IC transaction id 0, flags `transaction | request`. The guest must answer
//!   with counts 1/1 naming versions from those lists, or 0/0; after 0/0 the device
//!   stays quiet ([`Negotiation::NoCommonVersion`]).
//! * Then one request at a time: the device sends the next one only when the previous
//!   was answered (IC services are request/response). Requests come from the handle
//!   (shutdown, time, KVP operations, explicit heartbeats) and, for the heartbeat, from
//!   every [`crate::VmbusHost::poll_device`] while [`IcHandle::set_beat_on_poll`] is on.
//!   Requests sent without the transaction flag (time samples, as OpenVMM sends them)
//!   expect no answer.
//! * Everything the guest writes is checked: in-band packets, no completion requested,
//!   IC headers that parse, flags exactly `transaction | response`, the VMBus and IC
//!   transaction ids and the message type of the outstanding request, an answer at least
//!   as long as the request, and a body the service can read and that answers what was
//!   asked (the heartbeat's sequence number plus one, the versions offered, ...). Each
//!   breach is counted in [`IcStats::violations`] with a description in
//!   [`IcStats::errors`]; nothing panics.
//!
//! As with every back end, the device acts only inside host calls (the guest's signal or
//! a poll).

mod heartbeat;
mod kvp;
mod shutdown;
mod timesync;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use hvnet_wire::ic::{
    encode_message, parse_negotiate_response, IcMessage, IcMsgHdr, IcMsgNegotiate, IcMsgType,
    IcStatus, IcVersion, Negotiated, HOST_FRAMEWORK_VERSIONS, ICMSGHDRFLAG_REQUEST,
    ICMSGHDRFLAG_RESPONSE, ICMSGHDRFLAG_TRANSACTION, ICMSG_HDR, NEGOTIATE_RESPONSE_BODY_SIZE,
};
use hvnet_wire::vmbus::Guid;
use zerocopy::IntoBytes;

use crate::device::{ChannelCtx, DeviceBackend, DeviceSpec, HostActions};
use crate::ring::{HostRing, RingError, RingPacketKind};

pub use heartbeat::{Heartbeat, HeartbeatState};
pub use kvp::{IpInfoRecord, Kvp, KvpHostValue, KvpOp, KvpResponse};
pub use shutdown::{Shutdown, ShutdownResult};
pub use timesync::{TimeMessage, Timesync, TimesyncState};

/// Descriptions of violations kept (the newest).
const MAX_ERRORS: usize = 32;

/// Versions a device offers in its negotiation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcVersions {
    /// Framework versions, in the order sent.
    pub framework: Vec<IcVersion>,
    /// Service versions, in the order sent.
    pub message: Vec<IcVersion>,
}

impl IcVersions {
    /// OpenVMM's framework versions (1.0, 3.0) and `message`.
    pub fn with_message(message: &[IcVersion]) -> Self {
        IcVersions {
            framework: HOST_FRAMEWORK_VERSIONS.to_vec(),
            message: message.to_vec(),
        }
    }
}

/// Where version negotiation stands on the current channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiation {
    /// The channel is not open.
    Closed,
    /// Request sent (or waiting for ring space), no answer yet.
    Pending,
    /// The guest picked these versions.
    Done(Negotiated),
    /// The guest answered 0/0: no version in common; the device stays quiet.
    NoCommonVersion,
    /// The guest's answer was unusable (counted as a violation); the device stays quiet.
    Failed,
}

/// What an IC device observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcStats {
    /// Times the guest opened the channel.
    pub opens: u64,
    /// Times it closed (close, rescind or unload).
    pub closes: u64,
    /// Negotiation on the current channel.
    pub negotiation: Negotiation,
    /// Requests written to the ring (negotiation included).
    pub requests_sent: u64,
    /// Valid answers received.
    pub responses: u64,
    /// Requests that found the ring full and waited.
    pub ring_full: u64,
    /// Raw payloads injected.
    pub injected: u64,
    /// Guest messages that broke a rule.
    pub violations: u64,
    /// The last violations, described (oldest first).
    pub errors: Vec<String>,
    /// Whether a request waits for its answer.
    pub outstanding: bool,
}

/// A request a service wants sent.
pub struct ServiceRequest<P> {
    /// The body (after the IC header).
    pub body: Vec<u8>,
    /// Send with `transaction | request` and wait for an answer; otherwise no flags.
    pub expect_reply: bool,
    /// What the service needs to check the answer.
    pub pending: P,
}

/// The per-service half of an [`IcDevice`]. Implemented by [`Heartbeat`], [`Shutdown`],
/// [`Timesync`] and [`Kvp`].
pub trait HostService: 'static {
    /// What the service remembers about an outstanding request.
    type Pending;
    /// The message type of its requests.
    const MSG_TYPE: IcMsgType;
    /// Its class GUID.
    const CLASS: Guid;
    /// Service versions offered by default.
    fn default_versions() -> Vec<IcVersion>;
    /// The channel (re)opened: forget per-channel state.
    fn reset(&mut self) {}
    /// The next request, if any; `poll` is set inside [`crate::VmbusHost::poll_device`].
    fn next_request(
        &mut self,
        versions: &Negotiated,
        poll: bool,
    ) -> Option<ServiceRequest<Self::Pending>>;
    /// Checks and records the guest's answer to a request; `Err` describes a violation.
    fn on_response(
        &mut self,
        pending: Self::Pending,
        header: &IcMsgHdr,
        body: &[u8],
    ) -> Result<(), String>;
    /// A request that expected no answer was written.
    fn on_sent_without_reply(&mut self, pending: Self::Pending) {
        let _ = pending;
    }
}

enum Waiting<P> {
    Negotiate,
    Service(P),
}

struct Outstanding<P> {
    trans_id: u64,
    ic_transaction_id: u8,
    msg_type: IcMsgType,
    len: usize,
    waiting: Waiting<P>,
}

/// A request encoded and not yet in the ring.
struct Unsent<P> {
    payload: Vec<u8>,
    trans_id: u64,
    outstanding: Option<Outstanding<P>>,
    pending_no_reply: Option<P>,
}

pub(crate) struct Inner<S: HostService> {
    pub(crate) service: S,
    versions: IcVersions,
    open: bool,
    /// The ring failed (reported once; the host records the corruption too).
    ring_failed: bool,
    negotiation: Negotiation,
    outstanding: Option<Outstanding<S::Pending>>,
    unsent: Option<Unsent<S::Pending>>,
    inject: VecDeque<Vec<u8>>,
    next_trans_id: u64,
    next_ic_transaction: u8,
    stats: IcStats,
}

impl<S: HostService> Inner<S> {
    fn new(service: S, versions: IcVersions) -> Self {
        Inner {
            service,
            versions,
            open: false,
            ring_failed: false,
            negotiation: Negotiation::Closed,
            outstanding: None,
            unsent: None,
            inject: VecDeque::new(),
            next_trans_id: 1,
            next_ic_transaction: 0,
            stats: IcStats {
                opens: 0,
                closes: 0,
                negotiation: Negotiation::Closed,
                requests_sent: 0,
                responses: 0,
                ring_full: 0,
                injected: 0,
                violations: 0,
                errors: Vec::new(),
                outstanding: false,
            },
        }
    }

    fn violation(&mut self, detail: String) {
        log::debug!("hvemu ic {:?}: guest violation: {detail}", S::MSG_TYPE);
        self.stats.violations += 1;
        if self.stats.errors.len() >= MAX_ERRORS {
            self.stats.errors.remove(0);
        }
        self.stats.errors.push(detail);
    }

    fn trans_id(&mut self) -> u64 {
        let id = self.next_trans_id;
        self.next_trans_id = self.next_trans_id.wrapping_add(1).max(1);
        id
    }

    fn on_open(&mut self, ring: &mut HostRing) {
        self.open = true;
        self.ring_failed = false;
        self.negotiation = Negotiation::Pending;
        self.outstanding = None;
        self.unsent = None;
        self.stats.opens += 1;
        self.service.reset();
        let fixed = IcMsgNegotiate {
            icframe_vercnt: (self.versions.framework.len() as u16).into(),
            icmsg_vercnt: (self.versions.message.len() as u16).into(),
            reserved: 0.into(),
        };
        // OpenVMM: versions zero in the header, IC transaction id 0.
        let header = IcMsgHdr {
            icmsgtype: IcMsgType::NEGOTIATE.0.into(),
            icflags: ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST,
            ..IcMsgHdr::default()
        };
        let body = [
            fixed.as_bytes(),
            self.versions.framework.as_bytes(),
            self.versions.message.as_bytes(),
        ];
        let mut payload = vec![0u8; ICMSG_HDR + body.iter().map(|b| b.len()).sum::<usize>()];
        let Ok(n) = encode_message(&mut payload, &header, &body) else {
            self.violation(String::from("host: negotiate request does not encode"));
            return;
        };
        payload.truncate(n);
        let trans_id = self.trans_id();
        let outstanding = Outstanding {
            trans_id,
            ic_transaction_id: 0,
            msg_type: IcMsgType::NEGOTIATE,
            len: payload.len(),
            waiting: Waiting::Negotiate,
        };
        self.unsent = Some(Unsent {
            payload,
            trans_id,
            outstanding: Some(outstanding),
            pending_no_reply: None,
        });
        self.flush(ring);
    }

    fn on_close(&mut self) {
        self.open = false;
        self.negotiation = Negotiation::Closed;
        self.outstanding = None;
        self.unsent = None;
        self.stats.closes += 1;
    }

    /// Writes the unsent request; returns whether the ring took it.
    fn flush(&mut self, ring: &mut HostRing) -> bool {
        let Some(unsent) = self.unsent.take() else {
            return true;
        };
        match ring.write_inband(unsent.trans_id, false, &unsent.payload) {
            Ok(()) => {
                self.stats.requests_sent += 1;
                if let Some(o) = unsent.outstanding {
                    self.outstanding = Some(o);
                }
                if let Some(p) = unsent.pending_no_reply {
                    self.service.on_sent_without_reply(p);
                }
                true
            }
            Err(RingError::Full { .. }) => {
                self.stats.ring_full += 1;
                self.unsent = Some(unsent);
                false
            }
            Err(e) => {
                log::debug!("hvemu ic {:?}: ring write failed: {e}", S::MSG_TYPE);
                false
            }
        }
    }

    /// Reads the guest's packets, then sends what waits.
    fn pump(&mut self, ring: &mut HostRing, poll: bool) {
        if !self.open || self.ring_failed {
            return;
        }
        loop {
            let packet = match ring.read_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(RingError::MalformedPacket(e)) => {
                    self.violation(format!("malformed ring packet: {e}"));
                    continue;
                }
                Err(e) => {
                    self.ring_failed = true;
                    self.violation(format!("ring failed: {e}"));
                    return;
                }
            };
            if packet.kind != RingPacketKind::InBand {
                self.violation(format!(
                    "{:?} packet; IC answers are in-band",
                    packet.packet_type
                ));
                continue;
            }
            if packet.completion_requested {
                self.violation(String::from("answer asks for a completion"));
            }
            self.on_message(packet.trans_id, &packet.payload);
        }
        self.send_pending(ring, poll);
    }

    fn on_message(&mut self, trans_id: u64, payload: &[u8]) {
        let msg = match IcMessage::parse(payload) {
            Ok(m) => m,
            Err(e) => return self.violation(format!("answer does not parse: {e}")),
        };
        let flags = msg.header.icflags;
        if flags != ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE {
            return self.violation(format!("answer flags {flags:#x}, want 0x5"));
        }
        let Some(out) = self.outstanding.take() else {
            return self.violation(format!(
                "answer (trans id {trans_id:#x}, {:?}) to nothing outstanding",
                msg.msg_type()
            ));
        };
        let mismatch = if trans_id != out.trans_id {
            Some(format!(
                "transaction id {trans_id:#x}, want {:#x}",
                out.trans_id
            ))
        } else if msg.header.ictransaction_id != out.ic_transaction_id {
            Some(format!(
                "IC transaction id {}, want {}",
                msg.header.ictransaction_id, out.ic_transaction_id
            ))
        } else if msg.msg_type() != out.msg_type {
            Some(format!(
                "message type {:?}, want {:?}",
                msg.msg_type(),
                out.msg_type
            ))
        } else if payload.len() < out.len {
            Some(format!(
                "answer of {} bytes shorter than the {}-byte request",
                payload.len(),
                out.len
            ))
        } else {
            None
        };
        if let Some(detail) = mismatch {
            // Still the answer's turn: keep waiting for the right one.
            self.outstanding = Some(out);
            return self.violation(detail);
        }
        match out.waiting {
            Waiting::Negotiate => self.on_negotiate_response(&msg),
            Waiting::Service(pending) => {
                match self.service.on_response(pending, &msg.header, msg.body) {
                    Ok(()) => self.stats.responses += 1,
                    Err(detail) => self.violation(detail),
                }
            }
        }
    }

    fn on_negotiate_response(&mut self, msg: &IcMessage<'_>) {
        if msg.header.status() != IcStatus::S_OK {
            self.violation(format!(
                "negotiate answer with status {:?}",
                msg.header.status()
            ));
        }
        if usize::from(msg.header.icmsgsize.get()) < NEGOTIATE_RESPONSE_BODY_SIZE {
            self.violation(format!(
                "negotiate answer icmsgsize {}",
                msg.header.icmsgsize.get()
            ));
        }
        self.negotiation = match parse_negotiate_response(msg.body) {
            Ok(Some(n)) => {
                if self.versions.framework.contains(&n.framework)
                    && self.versions.message.contains(&n.message)
                {
                    self.stats.responses += 1;
                    Negotiation::Done(n)
                } else {
                    self.violation(format!(
                        "guest picked framework {} / version {}, not offered",
                        n.framework, n.message
                    ));
                    Negotiation::Failed
                }
            }
            Ok(None) => {
                self.stats.responses += 1;
                Negotiation::NoCommonVersion
            }
            Err(e) => {
                self.violation(format!("negotiate answer: {e}"));
                Negotiation::Failed
            }
        };
    }

    fn send_pending(&mut self, ring: &mut HostRing, poll: bool) {
        while let Some(raw) = self.inject.pop_front() {
            let trans_id = self.trans_id();
            match ring.write_inband(trans_id, false, &raw) {
                Ok(()) => self.stats.injected += 1,
                Err(_) => {
                    self.inject.push_front(raw);
                    break;
                }
            }
        }
        if !self.flush(ring) {
            return;
        }
        let Negotiation::Done(versions) = self.negotiation else {
            return;
        };
        while self.outstanding.is_none() {
            let Some(request) = self.service.next_request(&versions, poll) else {
                return;
            };
            let ic_transaction_id = self.next_ic_transaction;
            self.next_ic_transaction = self.next_ic_transaction.wrapping_add(1);
            let header = IcMsgHdr {
                icverframe: versions.framework,
                icmsgtype: S::MSG_TYPE.0.into(),
                icvermsg: versions.message,
                ictransaction_id: ic_transaction_id,
                icflags: if request.expect_reply {
                    ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST
                } else {
                    0
                },
                ..IcMsgHdr::default()
            };
            let mut payload = vec![0u8; ICMSG_HDR + request.body.len()];
            if encode_message(&mut payload, &header, &[&request.body]).is_err() {
                self.violation(String::from("host: request does not encode"));
                return;
            }
            let trans_id = self.trans_id();
            let (outstanding, pending_no_reply) = if request.expect_reply {
                let o = Outstanding {
                    trans_id,
                    ic_transaction_id,
                    msg_type: S::MSG_TYPE,
                    len: payload.len(),
                    waiting: Waiting::Service(request.pending),
                };
                (Some(o), None)
            } else {
                (None, Some(request.pending))
            };
            self.unsent = Some(Unsent {
                payload,
                trans_id,
                outstanding,
                pending_no_reply,
            });
            if !self.flush(ring) {
                return;
            }
        }
    }

    fn stats(&self) -> IcStats {
        IcStats {
            negotiation: self.negotiation,
            outstanding: self.outstanding.is_some() || self.unsent.is_some(),
            ..self.stats.clone()
        }
    }
}

/// An IC device: add it to a [`crate::VmbusHost`]; drive and inspect it through its
/// [`IcHandle`].
pub struct IcDevice<S: HostService> {
    inner: Rc<RefCell<Inner<S>>>,
}

impl<S: HostService> std::fmt::Debug for IcDevice<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcDevice")
            .field("type", &S::MSG_TYPE)
            .finish_non_exhaustive()
    }
}

impl<S: HostService> IcDevice<S> {
    /// A device offering the service's default versions (see [`IcVersions`]).
    pub fn new(service: S) -> Self {
        Self::with_versions(service, IcVersions::with_message(&S::default_versions()))
    }

    /// A device offering `versions`.
    pub fn with_versions(service: S, versions: IcVersions) -> Self {
        IcDevice {
            inner: Rc::new(RefCell::new(Inner::new(service, versions))),
        }
    }

    /// A handle to the device (clones share it).
    pub fn handle(&self) -> IcHandle<S> {
        IcHandle {
            inner: self.inner.clone(),
        }
    }

    /// A device spec with the service's class GUID and `instance_id`, for
    /// [`crate::VmbusHost::add_device`].
    pub fn into_device_spec(self, instance_id: [u8; 16]) -> DeviceSpec {
        let mut class = [0u8; 16];
        class.copy_from_slice(S::CLASS.as_bytes());
        DeviceSpec::new(class, instance_id, Box::new(self))
    }
}

impl<S: HostService> DeviceBackend for IcDevice<S> {
    fn on_open(
        &mut self,
        _ch: ChannelCtx,
        ring: &mut HostRing,
        _host: &mut HostActions<'_>,
    ) -> Result<(), u32> {
        self.inner.borrow_mut().on_open(ring);
        Ok(())
    }

    fn on_packets(&mut self, _ch: ChannelCtx, ring: &mut HostRing, _host: &mut HostActions<'_>) {
        self.inner.borrow_mut().pump(ring, false);
    }

    fn on_poll(&mut self, _ch: ChannelCtx, ring: &mut HostRing, _host: &mut HostActions<'_>) {
        self.inner.borrow_mut().pump(ring, true);
    }

    fn on_close(&mut self, _ch: ChannelCtx) {
        self.inner.borrow_mut().on_close();
    }
}

/// The outside of an IC device, for tests and the VMM. Clones share the device; calls
/// must not overlap a host call into it (they cannot on one thread).
pub struct IcHandle<S: HostService> {
    inner: Rc<RefCell<Inner<S>>>,
}

impl<S: HostService> Clone for IcHandle<S> {
    fn clone(&self) -> Self {
        IcHandle {
            inner: self.inner.clone(),
        }
    }
}

impl<S: HostService> std::fmt::Debug for IcHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcHandle")
            .field("type", &S::MSG_TYPE)
            .finish_non_exhaustive()
    }
}

impl<S: HostService> IcHandle<S> {
    /// Counters, negotiation state and violations.
    pub fn stats(&self) -> IcStats {
        self.inner.borrow().stats()
    }

    /// The negotiated versions, once the guest answered.
    pub fn negotiated(&self) -> Option<Negotiated> {
        match self.inner.borrow().negotiation {
            Negotiation::Done(n) => Some(n),
            _ => None,
        }
    }

    /// Whether the guest has the channel open.
    pub fn is_open(&self) -> bool {
        self.inner.borrow().open
    }

    /// Versions offered from the next open on.
    pub fn set_versions(&self, versions: IcVersions) {
        self.inner.borrow_mut().versions = versions;
    }

    /// Fault injection: queues `payload` (an IC message, or anything) as an in-band
    /// packet without completion, sent at the next signal or poll whatever the state of
    /// the conversation. No answer is expected: one arriving is a violation.
    pub fn inject_raw(&self, payload: &[u8]) {
        self.inner.borrow_mut().inject.push_back(payload.to_vec());
    }

    fn with_service<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.inner.borrow_mut().service)
    }
}
