//! What every IC driver shares: the probe that opens the channel, the task that answers
//! the host, version negotiation, reply framing and the per-service counters.
//!
//! # The conversation
//!
//! The host writes requests, one transaction at a time; the guest answers each in the
//! request's own layout (Linux sends the received buffer back): same length or longer,
//! same VMBus and IC transaction ids, flags `transaction | response`, a status. The first
//! request is a version negotiation, answered here for every service; later requests go
//! to the service (`Service::handle`), which edits the answer and may ask for an action
//! once the answer is on its way (`Service::after_reply`: the shutdown service calls
//! the appliance's power control there, never before the host has its S_OK).
//!
//! # Trust
//!
//! A packet that is not in-band, an IC message whose headers do not check out, a type
//! that is not this service's, or a body the service cannot read is dropped without an
//! answer and counted ([`ChannelCounters::malformed`], with the last reason kept); the
//! channel goes on. A request without the transaction flag is handled but not answered:
//! the host does not wait for it (OpenVMM's time samples carry no flags and it never
//! reads answers to them). Answers never wait for ring space: if the outgoing ring is
//! full the answer is dropped and counted, since a host that stopped reading will not
//! make room. Only a corrupted ring stops the task (the channel stays until rescind).
//!
//! # Lifetime
//!
//! The probe opens the channel with 3 pages of ring data per direction (Linux
//! `VMBUS_RING_SIZE(3 * 4096)`: 4 pages with the control page) and spawns the task. The
//! task ends when the channel is rescinded (the bus wakes it with an error) or when
//! [`crate::IcDrivers::close`] or the device's removal asks it to stop.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;

use hvnet_runtime::sync::Event;
use hvnet_runtime::{Handle, JoinHandle};
use hvnet_vmbus::bus::{Device, Driver, OpenedChannel, RingSizes};
use hvnet_vmbus::channel::{BoxFuture, ChannelError, DeviceInstance};
use hvnet_vmbus::race::{race, Either};
use hvnet_vmbus::ring::{OutgoingPacket, RingError};
use hvnet_wire::ic::{
    negotiate, negotiate_response_body, IcError, IcMessage, IcMsgHdr, IcMsgType, IcStatus,
    IcVersion, NegotiateMsg, Negotiated, PipeHeader, GUEST_FRAMEWORK_VERSIONS,
    ICMSGHDRFLAG_RESPONSE, ICMSGHDRFLAG_TRANSACTION, ICMSG_HDR, IC_HEADER_SIZE,
    NEGOTIATE_RESPONSE_BODY_SIZE, PIPE_HEADER_SIZE,
};
use hvnet_wire::ring::PacketKind;
use hvnet_wire::vmbus::Guid;
use hvnet_wire::{U16, U32};
use log::{debug, info, warn};
use zerocopy::{FromBytes, IntoBytes};

/// Ring pages per direction, control page included: 3 data pages as Linux's util
/// drivers use.
pub const IC_RING_PAGES: usize = 4;

/// Malformed messages per service logged at warning level; later ones go to debug (the
/// host controls how many there are).
const LOUD_DROPS: u64 = 8;

/// Packets handled before the task yields to others (IC hosts keep one request in
/// flight, so only a misbehaving host reaches it).
const BUDGET: usize = 64;

/// Why a host message was dropped without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a `VM_PKT_DATA_INBAND` packet.
    NotInBand,
    /// The ring packet itself did not parse (it was consumed).
    BadPacket,
    /// Larger than the incoming ring can hold.
    Oversized(usize),
    /// Headers or body broke a wire rule.
    Wire(IcError),
    /// A message type this channel does not carry.
    UnexpectedType(IcMsgType),
    /// A KVP pool no reference defines.
    BadPool(u8),
    /// A service message after negotiation found no common version.
    NotNegotiated,
}

impl From<IcError> for DropReason {
    fn from(e: IcError) -> Self {
        Self::Wire(e)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInBand => f.write_str("not an in-band packet"),
            Self::BadPacket => f.write_str("malformed ring packet"),
            Self::Oversized(n) => write!(f, "{n}-byte packet larger than the ring"),
            Self::Wire(e) => write!(f, "{e}"),
            Self::UnexpectedType(t) => write!(f, "unexpected message type {t:?}"),
            Self::BadPool(p) => write!(f, "unknown KVP pool {p}"),
            Self::NotNegotiated => f.write_str("message after a failed negotiation"),
        }
    }
}

/// Counters every IC channel keeps (per service, over all its channels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    /// Channels opened.
    pub opens: u64,
    /// Channels whose task has ended (rescind, removal or close).
    pub stopped: u64,
    /// Host messages received (all kinds, malformed included).
    pub messages: u64,
    /// Answers written to the ring.
    pub replies: u64,
    /// Answers dropped because the outgoing ring was full.
    pub replies_dropped: u64,
    /// Requests without the transaction flag (handled, not answered).
    pub unanswered: u64,
    /// Messages dropped without an answer.
    pub malformed: u64,
    /// Why the last one was dropped.
    pub last_drop: Option<DropReason>,
    /// Negotiation requests answered.
    pub negotiations: u64,
    /// Negotiations answered with counts 0/0.
    pub no_common_version: u64,
    /// The framework version of the last successful negotiation.
    pub framework_version: Option<IcVersion>,
    /// The service version of the last successful negotiation.
    pub message_version: Option<IcVersion>,
    /// Channels whose ring the host corrupted (their task stopped).
    pub ring_failures: u64,
}

/// One integration service as the shared channel code drives it.
pub(crate) trait Service: 'static {
    /// Name for logs and task names.
    const NAME: &'static str;
    /// Class GUID of its channels.
    const CLASS: Guid;
    /// The IC message type it handles.
    const MSG_TYPE: IcMsgType;
    /// Service versions offered, newest first.
    const VERSIONS: &'static [IcVersion];
    /// What to do once the answer is written.
    type After;

    /// The shared counters.
    fn counters(&self) -> &Cell<ChannelCounters>;

    /// Handles a request of [`Self::MSG_TYPE`] in service version `version`, editing
    /// `reply` (status, body). An error drops the message without an answer.
    fn handle(
        &self,
        msg: &IcMessage<'_>,
        version: IcVersion,
        reply: &mut Reply,
    ) -> Result<Option<Self::After>, DropReason>;

    /// Runs after the answer was written (or dropped for want of ring space).
    fn after_reply(&self, after: Self::After);
}

fn count<S: Service>(svc: &S, f: impl FnOnce(&mut ChannelCounters)) {
    let mut c = svc.counters().get();
    f(&mut c);
    svc.counters().set(c);
}

fn dropped<S: Service>(svc: &S, relid: u32, reason: DropReason) {
    let mut n = 0;
    count(svc, |c| {
        c.malformed += 1;
        c.last_drop = Some(reason);
        n = c.malformed;
    });
    if n <= LOUD_DROPS {
        warn!(
            "ic {} relid {relid}: dropped host message: {reason}",
            S::NAME
        );
    } else {
        debug!(
            "ic {} relid {relid}: dropped host message: {reason}",
            S::NAME
        );
    }
}

/// The answer being built: a copy of the request, grown when the answer needs more room.
pub(crate) struct Reply {
    bytes: Vec<u8>,
    grown: bool,
}

impl Reply {
    fn new(payload: &[u8]) -> Self {
        Reply {
            bytes: payload.to_vec(),
            grown: false,
        }
    }

    /// The body (after the headers), at least `min_len` bytes: a shorter request is
    /// extended with zeros.
    pub(crate) fn body(&mut self, min_len: usize) -> &mut [u8] {
        let want = ICMSG_HDR.saturating_add(min_len);
        if self.bytes.len() < want {
            self.bytes.resize(want, 0);
            self.grown = true;
        }
        self.bytes.get_mut(ICMSG_HDR..).unwrap_or(&mut [])
    }

    fn header(&self) -> IcMsgHdr {
        IcMsgHdr::read_from_prefix(self.bytes.get(PIPE_HEADER_SIZE..).unwrap_or(&[]))
            .map(|(h, _)| h)
            .unwrap_or_default()
    }

    fn set_header(&mut self, header: &IcMsgHdr) {
        if let Some(dst) = self
            .bytes
            .get_mut(PIPE_HEADER_SIZE..PIPE_HEADER_SIZE + IC_HEADER_SIZE)
        {
            dst.copy_from_slice(header.as_bytes());
        }
    }

    /// Sets the status.
    pub(crate) fn set_status(&mut self, status: IcStatus) {
        let mut h = self.header();
        h.status = U32::new(status.0);
        self.set_header(&h);
    }

    fn set_msgsize(&mut self, size: u16) {
        let mut h = self.header();
        h.icmsgsize = U16::new(size);
        self.set_header(&h);
    }

    /// Marks it a response and, if the body grew, makes the size fields cover it.
    fn finish(mut self) -> Vec<u8> {
        let mut h = self.header();
        h.icflags = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE;
        if self.grown {
            let body = self.bytes.len() - ICMSG_HDR;
            let size = u16::try_from(body).unwrap_or(u16::MAX);
            h.icmsgsize = U16::new(h.icmsgsize.get().max(size));
            if let Ok((mut pipe, _)) = PipeHeader::read_from_prefix(&self.bytes) {
                let after = (self.bytes.len() - PIPE_HEADER_SIZE) as u32;
                pipe.msgsize = U32::new(pipe.msgsize.get().max(after));
                if let Some(dst) = self.bytes.get_mut(..PIPE_HEADER_SIZE) {
                    dst.copy_from_slice(pipe.as_bytes());
                }
            }
        }
        self.set_header(&h);
        self.bytes
    }
}

/// What the task knows about its channel.
#[derive(Clone, Copy, Debug, Default)]
struct ChannelState {
    /// `None` before a negotiation; `Some(None)` after one found nothing in common.
    negotiated: Option<Option<Negotiated>>,
}

/// Answers a negotiation request in `reply`; returns the outcome.
fn answer_negotiate<S: Service>(
    svc: &S,
    msg: &IcMessage<'_>,
    reply: &mut Reply,
) -> Result<Option<Negotiated>, DropReason> {
    let request = NegotiateMsg::parse_request(msg.body)?;
    let chosen = negotiate(
        request.framework,
        request.message,
        &GUEST_FRAMEWORK_VERSIONS,
        S::VERSIONS,
    );
    let body = negotiate_response_body(chosen);
    reply
        .body(NEGOTIATE_RESPONSE_BODY_SIZE)
        .get_mut(..NEGOTIATE_RESPONSE_BODY_SIZE)
        .ok_or(DropReason::Wire(IcError::BufferTooSmall))?
        .copy_from_slice(&body);
    reply.set_msgsize(NEGOTIATE_RESPONSE_BODY_SIZE as u16);
    reply.set_status(IcStatus::S_OK);
    count(svc, |c| {
        c.negotiations += 1;
        match chosen {
            Some(n) => {
                c.framework_version = Some(n.framework);
                c.message_version = Some(n.message);
            }
            None => c.no_common_version += 1,
        }
    });
    Ok(chosen)
}

/// The outcome of one request.
struct Handled<A> {
    /// The answer, if one is owed.
    answer: Option<Vec<u8>>,
    /// The service's follow-up.
    after: Option<A>,
}

/// Handles one in-band payload.
fn process<S: Service>(
    svc: &S,
    state: &mut ChannelState,
    relid: u32,
    payload: &[u8],
) -> Result<Handled<S::After>, DropReason> {
    let msg = IcMessage::parse(payload)?;
    let mut reply = Reply::new(payload);
    let after = match msg.msg_type() {
        IcMsgType::NEGOTIATE => {
            let chosen = answer_negotiate(svc, &msg, &mut reply)?;
            match chosen {
                Some(n) => info!(
                    "ic {} relid {relid}: framework {}, version {}",
                    S::NAME,
                    n.framework,
                    n.message
                ),
                None => warn!(
                    "ic {} relid {relid}: no version in common with the host",
                    S::NAME
                ),
            }
            state.negotiated = Some(chosen);
            None
        }
        t if t == S::MSG_TYPE => {
            let version = match state.negotiated {
                Some(Some(n)) => n.message,
                Some(None) => return Err(DropReason::NotNegotiated),
                // No negotiation seen: the header says which layout the host used.
                None => msg.header.icvermsg,
            };
            svc.handle(&msg, version, &mut reply)?
        }
        t => return Err(DropReason::UnexpectedType(t)),
    };
    let answer = if msg.header.is_transaction() {
        Some(reply.finish())
    } else {
        count(svc, |c| c.unanswered += 1);
        None
    };
    Ok(Handled { answer, after })
}

/// Writes an answer; never waits for room.
fn send_reply<S: Service>(svc: &S, ch: &OpenedChannel, trans_id: u64, bytes: &[u8]) {
    match ch
        .ring()
        .try_write(&OutgoingPacket::inband(trans_id, false, &[bytes]))
    {
        Ok(w) => {
            if w.signal {
                ch.signal_host();
            }
            count(svc, |c| c.replies += 1);
        }
        Err(e) => {
            count(svc, |c| c.replies_dropped += 1);
            debug!(
                "ic {} relid {}: answer of {} bytes dropped: {e}",
                S::NAME,
                ch.device().channel().relid(),
                bytes.len()
            );
        }
    }
}

/// Reads and answers what the incoming ring holds, at most [`BUDGET`] packets; returns
/// whether it stopped for the budget (more may wait), `Err` once the ring is corrupt.
fn drain<S: Service>(
    svc: &S,
    ch: &OpenedChannel,
    state: &mut ChannelState,
    buf: &mut [u8],
) -> Result<bool, RingError> {
    let relid = ch.device().channel().relid();
    let ring = ch.ring();
    let mut left = BUDGET;
    loop {
        if left == 0 {
            break;
        }
        left -= 1;
        let (trans_id, outcome) = match ring.read_packet(&mut *buf) {
            Ok(None) => break,
            Ok(Some(packet)) => {
                count(svc, |c| c.messages += 1);
                let trans_id = packet.trans_id();
                let outcome = match packet.kind {
                    PacketKind::InBand => process(svc, state, relid, packet.payload),
                    _ => Err(DropReason::NotInBand),
                };
                (trans_id, outcome)
            }
            Err(RingError::BufferTooSmall { needed }) => {
                ring.advance()?;
                count(svc, |c| c.messages += 1);
                dropped(svc, relid, DropReason::Oversized(needed));
                continue;
            }
            Err(RingError::BadPacket(_)) => {
                count(svc, |c| c.messages += 1);
                dropped(svc, relid, DropReason::BadPacket);
                continue;
            }
            Err(e) => return Err(e),
        };
        match outcome {
            Ok(Handled { answer, after }) => {
                if let Some(bytes) = answer {
                    send_reply(svc, ch, trans_id, &bytes);
                }
                if let Some(after) = after {
                    svc.after_reply(after);
                }
            }
            Err(reason) => dropped(svc, relid, reason),
        }
    }
    if ring.read_done()? {
        ch.signal_host();
    }
    Ok(left == 0)
}

/// The channel's task: answer, sleep until signalled, repeat; ends on rescind or stop.
async fn run<S: Service>(svc: Rc<S>, ch: OpenedChannel, stop: Rc<Event>, handle: Handle) {
    let relid = ch.device().channel().relid();
    // Any packet the ring can hold fits (data area of the incoming ring).
    let mut buf = vec![0u8; ch.ring().incoming_data_size()];
    let mut state = ChannelState::default();
    loop {
        if stop.is_set() {
            break;
        }
        // Drained: unmask, and look again for what came meanwhile.
        let more = match drain(&*svc, &ch, &mut state, &mut buf) {
            Ok(false) => ch.ring().unmask_and_check(),
            Ok(true) => {
                // A host that keeps writing must not keep this CPU to itself.
                handle.yield_now().await;
                continue;
            }
            Err(e) => Err(e),
        };
        match more {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(
                    "ic {} relid {relid}: ring failed ({e}); channel abandoned",
                    S::NAME
                );
                count(&*svc, |c| c.ring_failures += 1);
                break;
            }
        }
        match race(ch.wait_signal(), stop.wait()).await {
            Either::Left(Ok(())) => {}
            Either::Left(Err(_)) | Either::Right(()) => break,
        }
    }
    count(&*svc, |c| c.stopped += 1);
    debug!("ic {} relid {relid}: task ends", S::NAME);
}

/// One open IC channel: its task and the channel, until removal or close.
pub(crate) struct IcInstance {
    stop: Rc<Event>,
    task: RefCell<Option<JoinHandle<()>>>,
    channel: RefCell<Option<OpenedChannel>>,
}

impl IcInstance {
    /// Stops the task and waits for it; returns the channel if still held.
    async fn stop(&self) -> Option<OpenedChannel> {
        self.stop.set();
        let task = self.task.borrow_mut().take();
        if let Some(task) = task {
            task.await;
        }
        self.channel.borrow_mut().take()
    }

    /// Stops the task and closes the channel (the appliance's orderly shutdown).
    pub(crate) async fn close(&self) {
        if let Some(ch) = self.stop().await {
            let relid = ch.device().channel().relid();
            if let Err(e) = ch.close().await {
                debug!("ic: closing relid {relid}: {e}");
            }
        }
    }
}

impl DeviceInstance for IcInstance {
    fn remove(&self) -> BoxFuture<'static, ()> {
        // The bus closes the channel and gives back its rings after this returns.
        let stop = self.stop.clone();
        let task = self.task.borrow_mut().take();
        let channel = self.channel.borrow_mut().take();
        Box::pin(async move {
            stop.set();
            if let Some(task) = task {
                task.await;
            }
            drop(channel);
        })
    }
}

impl IcInstance {
    /// Whether the channel is still held (not closed, removed or rescinded).
    pub(crate) fn is_open(&self) -> bool {
        self.channel.borrow().is_some()
    }
}

/// The live instances of all IC drivers (weak: the bus owns them).
pub(crate) type Instances = Rc<RefCell<Vec<Weak<IcInstance>>>>;

/// The VMBus driver of one service.
pub(crate) struct IcDriver<S: Service> {
    svc: Rc<S>,
    instances: Instances,
}

impl<S: Service> IcDriver<S> {
    pub(crate) fn new(svc: Rc<S>, instances: Instances) -> Self {
        IcDriver { svc, instances }
    }
}

impl<S: Service> Driver for IcDriver<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn class_id(&self) -> Guid {
        S::CLASS
    }

    fn probe(
        &self,
        device: Device,
    ) -> BoxFuture<'static, Result<Rc<dyn DeviceInstance>, ChannelError>> {
        let svc = self.svc.clone();
        let instances = self.instances.clone();
        Box::pin(async move {
            let handle = device.bus()?.handle().clone();
            let relid = device.channel().relid();
            let ch = device
                .open(RingSizes {
                    outgoing_pages: IC_RING_PAGES,
                    incoming_pages: IC_RING_PAGES,
                })
                .await?;
            count(&*svc, |c| c.opens += 1);
            let stop = Rc::new(Event::named("ic stop"));
            let task = handle.spawn(
                format!("ic {} relid {relid}", S::NAME),
                run(svc, ch.clone(), stop.clone(), handle.clone()),
            );
            let instance = Rc::new(IcInstance {
                stop,
                task: RefCell::new(Some(task)),
                channel: RefCell::new(Some(ch)),
            });
            let mut list = instances.borrow_mut();
            list.retain(|w| w.strong_count() > 0);
            list.push(Rc::downgrade(&instance));
            drop(list);
            debug!("ic {}: relid {relid} open", S::NAME);
            Ok(instance as Rc<dyn DeviceInstance>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnet_wire::ic::{encode_message, PIPE_PACKET_TYPE_DATA};

    #[test]
    fn reply_grows_and_marks_response() {
        let header = IcMsgHdr {
            icmsgtype: 2.into(),
            icflags: 3,
            ictransaction_id: 9,
            ..IcMsgHdr::default()
        };
        let mut buf = [0u8; 40];
        let n = encode_message(&mut buf, &header, &[&[1, 2, 3, 4]]).unwrap();
        let mut reply = Reply::new(&buf[..n]);
        reply.set_status(IcStatus::S_CONT);
        assert_eq!(reply.body(2).len(), 4);
        let body = reply.body(10);
        assert_eq!(body, &[1, 2, 3, 4, 0, 0, 0, 0, 0, 0]);
        let out = reply.finish();
        let m = IcMessage::parse(&out).unwrap();
        assert_eq!(m.header.icflags, 5);
        assert_eq!(m.header.ictransaction_id, 9);
        assert_eq!(m.header.status(), IcStatus::S_CONT);
        assert_eq!(m.header.icmsgsize.get(), 10);
        assert_eq!(m.pipe.flags.get(), PIPE_PACKET_TYPE_DATA);
        assert_eq!(m.pipe.msgsize.get(), 30);
    }
}
