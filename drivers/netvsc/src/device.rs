//! One netvsc NIC: its queues and buffers, and the packet processing that both the probe
//! (waiting for control answers) and the data path (the network side's polls) run.
//!
//! Everything the host writes is untrusted. Ring packets are copied out and parsed by
//! the checked `hvnet-wire` parsers; receive-buffer ranges are bounds-checked against the
//! buffer before they are copied out; completions must name a section that is busy on
//! the very queue they arrive on. Anything else is counted as malformed and dropped.
//!
//! Received frames are copied once, out of the shared receive buffer into a private
//! scratch buffer, before they are parsed or handed on. That copy is also what makes the
//! driver safe against a host that rewrites a buffer after the guest checked it.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::mem::size_of;

use hvnet_runtime::sync::WaitQueue;
use hvnet_runtime::{Duration, Handle};
use hvnet_vmbus::bus::OpenedChannel;
use hvnet_vmbus::channel::{BoxFuture, ChannelError};
use hvnet_vmbus::memory::SharedBuffer;
use hvnet_vmbus::ring::{OutgoingPacket, RingError};
use hvnet_wire::nvsp::{
    NvspMessage, NvspStatus, NvspVersion, SendRndisPacket, SendRndisPacketComplete, Sender,
    NETVSC_RECEIVE_BUFFER_ID, NVSP_CHANNEL_TYPE_CONTROL, NVSP_CHANNEL_TYPE_DATA, VRSS_CHANNEL_MAX,
    VRSS_SEND_TAB_SIZE,
};
use hvnet_wire::ring::{PacketKind, VmTransferPageHeader, VmTransferPageRange};
use hvnet_wire::rndis::{RndisMessage, RndisPacket, RndisStatus, RNDIS_HEADER_SIZE};
use log::{debug, info, warn};
use zerocopy::IntoBytes;

use crate::config::NetvscConfig;
use crate::flow::flow_hash;
use crate::nic::{Nic, NicError, NicFuture, QueueStats};
use crate::sections::Sections;
use crate::select::FirstOf;

/// Transaction ids of NVSP control requests (INIT, buffers, SUBCHANNEL).
pub(crate) const CONTROL_TAG: u64 = 1 << 62;
/// Transaction ids of sends from the send buffer: the tag plus the section index.
pub(crate) const TX_TAG: u64 = 1 << 61;
/// RNDIS PACKET header in front of every transmitted frame (no per-packet info).
const TX_HEADER: usize = RNDIS_HEADER_SIZE + size_of::<RndisPacket>();
/// Largest RNDIS message taken from the receive buffer (a host range beyond it is
/// malformed: real hosts use 1728-byte slots, jumbo frames need about 9.1 KB).
const MAX_RX_MESSAGE: usize = 16 * 1024;
/// Largest ring packet the driver reads (transfer-page packets with many ranges);
/// larger ones are skipped.
const MAX_RING_PACKET: usize = 64 * 1024;
/// Ethernet header length.
const ETH_HEADER: usize = 14;

/// Why a control exchange with the host failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetvscError {
    /// The channel failed (rescinded, ring trouble, out of memory).
    Channel(ChannelError),
    /// The host did not answer in time.
    Timeout,
    /// The host refused a request with this NVSP or RNDIS status.
    Refused(u32),
    /// The host's answer is malformed or contradicts what was asked.
    BadReply(&'static str),
    /// No NVSP version in common with the host.
    NoVersion,
}

impl core::fmt::Display for NetvscError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Channel(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("host did not answer in time"),
            Self::Refused(s) => write!(f, "host refused with status {s:#x}"),
            Self::BadReply(what) => write!(f, "malformed host reply: {what}"),
            Self::NoVersion => f.write_str("no NVSP version in common with the host"),
        }
    }
}

impl From<ChannelError> for NetvscError {
    fn from(e: ChannelError) -> Self {
        Self::Channel(e)
    }
}

impl From<hvnet_vmbus::memory::MemoryError> for NetvscError {
    fn from(_: hvnet_vmbus::memory::MemoryError) -> Self {
        Self::Channel(ChannelError::OutOfMemory)
    }
}

impl From<RingError> for NetvscError {
    fn from(e: RingError) -> Self {
        Self::Channel(ChannelError::Ring(e))
    }
}

impl From<NetvscError> for ChannelError {
    fn from(e: NetvscError) -> Self {
        match e {
            NetvscError::Channel(e) => e,
            NetvscError::Timeout => ChannelError::Timeout,
            NetvscError::Refused(s) => ChannelError::HostStatus(s),
            NetvscError::BadReply(_) | NetvscError::NoVersion => ChannelError::WrongState,
        }
    }
}

/// Where received frames go.
enum Sink<'a> {
    /// The network side's callback (its `receive`).
    Deliver(&'a mut dyn FnMut(&[u8])),
    /// The NIC's backlog: a sender is digging for send completions that sit behind
    /// received frames; the frames wait there for the next `receive`.
    Stash,
    /// Nowhere: the NIC is not registered yet; frames are dropped and counted.
    Drop,
}

/// Frames the backlog holds; past it the rings are left alone (the host queues).
const BACKLOG_FRAMES: usize = 256;

/// Driver-wide counters of one NIC (queue counters are in [`QueueStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Host messages or packets dropped as malformed.
    pub malformed: u64,
    /// Link-state indications received.
    pub link_changes: u64,
    /// Send indirection tables received.
    pub send_tables: u64,
}

/// One queue: an open channel (the primary is queue 0; sub-channel n is queue n).
pub(crate) struct Queue {
    pub(crate) index: u16,
    pub(crate) channel: OpenedChannel,
    stats: Cell<QueueStats>,
    /// Receive completions the ring had no room for, oldest first.
    owed: RefCell<VecDeque<u64>>,
}

impl Queue {
    pub(crate) fn new(index: u16, channel: OpenedChannel) -> Rc<Self> {
        Rc::new(Self {
            index,
            channel,
            stats: Cell::new(QueueStats::default()),
            owed: RefCell::new(VecDeque::new()),
        })
    }

    fn count(&self, f: impl FnOnce(&mut QueueStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }
}

/// The receive buffer as the host laid it out.
pub(crate) struct RecvBuffer {
    pub(crate) buf: Rc<dyn SharedBuffer>,
    /// End of the host's section area: ranges must lie below it.
    pub(crate) limit: usize,
}

/// The send buffer and its sections.
pub(crate) struct SendBuffer {
    pub(crate) buf: Rc<dyn SharedBuffer>,
    pub(crate) section_size: usize,
    pub(crate) sections: Sections,
}

/// A control request's answer slot.
#[derive(Default)]
struct Pending {
    reply: RefCell<Option<Vec<u8>>>,
}

/// One synthetic NIC.
pub struct NetvscNic {
    pub(crate) id: String,
    pub(crate) handle: Handle,
    pub(crate) config: NetvscConfig,
    pub(crate) nvsp_version: Cell<NvspVersion>,
    /// The open queues, ascending by sub-channel index (the primary first).
    queues: RefCell<Vec<Rc<Queue>>>,
    pub(crate) recv: RefCell<Option<RecvBuffer>>,
    pub(crate) send: RefCell<Option<SendBuffer>>,
    pub(crate) mac: Cell<[u8; 6]>,
    pub(crate) mtu: Cell<usize>,
    pub(crate) link: Cell<bool>,
    removed: Cell<bool>,
    control: RefCell<BTreeMap<u64, Rc<Pending>>>,
    rndis: RefCell<BTreeMap<u32, Rc<Pending>>>,
    next_id: Cell<u32>,
    send_table: RefCell<[u32; VRSS_SEND_TAB_SIZE]>,
    counters: Cell<NicCounters>,
    rx_scratch: RefCell<Vec<u8>>,
    packet_scratch: RefCell<Vec<u8>>,
    tx_scratch: RefCell<Vec<u8>>,
    rx_cursor: Cell<usize>,
    /// Frames taken off the rings while looking for send completions, oldest first, with
    /// their queue.
    backlog: RefCell<VecDeque<(u16, Vec<u8>)>>,
    /// Bumped on every change the network side must look at (link, send room, removal).
    generation: Cell<u64>,
    seen_generation: Cell<u64>,
    events: WaitQueue,
}

impl NetvscNic {
    pub(crate) fn new(
        id: String,
        handle: Handle,
        config: NetvscConfig,
        primary: OpenedChannel,
    ) -> Self {
        Self {
            id,
            handle,
            config,
            nvsp_version: Cell::new(NvspVersion::PROTOCOL_VERSION_1),
            queues: RefCell::new(vec![Queue::new(0, primary)]),
            recv: RefCell::new(None),
            send: RefCell::new(None),
            mac: Cell::new([0; 6]),
            mtu: Cell::new(1500),
            link: Cell::new(false),
            removed: Cell::new(false),
            control: RefCell::new(BTreeMap::new()),
            rndis: RefCell::new(BTreeMap::new()),
            next_id: Cell::new(1),
            send_table: RefCell::new([0; VRSS_SEND_TAB_SIZE]),
            counters: Cell::new(NicCounters::default()),
            rx_scratch: RefCell::new(vec![0; MAX_RX_MESSAGE]),
            packet_scratch: RefCell::new(vec![0; 4096]),
            tx_scratch: RefCell::new(Vec::new()),
            rx_cursor: Cell::new(0),
            backlog: RefCell::new(VecDeque::new()),
            generation: Cell::new(0),
            seen_generation: Cell::new(0),
            events: WaitQueue::named("netvsc nic event"),
        }
    }

    /// Driver-wide counters.
    pub fn counters(&self) -> NicCounters {
        self.counters.get()
    }

    /// The negotiated NVSP version.
    pub fn nvsp_version(&self) -> NvspVersion {
        self.nvsp_version.get()
    }

    /// The host's send indirection table (all zeros until it sends one).
    pub fn send_table(&self) -> [u32; VRSS_SEND_TAB_SIZE] {
        *self.send_table.borrow()
    }

    /// Sub-channel indices of the open queues, ascending.
    pub fn open_queues(&self) -> Vec<u16> {
        self.queues.borrow().iter().map(|q| q.index).collect()
    }

    /// Send sections currently free (all of them when idle).
    pub fn free_send_sections(&self) -> usize {
        self.send.borrow().as_ref().map_or(0, |s| s.sections.free())
    }

    fn malformed(&self, what: core::fmt::Arguments<'_>) {
        let mut c = self.counters.get();
        c.malformed += 1;
        self.counters.set(c);
        debug!("netvsc {}: dropped malformed host input: {what}", self.id);
    }

    fn bump(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        self.events.wake_all();
    }

    pub(crate) fn next_id(&self) -> u32 {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1).max(1));
        id
    }

    pub(crate) fn primary(&self) -> Option<Rc<Queue>> {
        self.queue(0)
    }

    fn queue(&self, index: u16) -> Option<Rc<Queue>> {
        self.queues
            .borrow()
            .iter()
            .find(|q| q.index == index)
            .cloned()
    }

    fn open_queue_list(&self) -> Vec<Rc<Queue>> {
        self.queues.borrow().clone()
    }

    /// Attaches an opened sub-channel as queue `index`. Returns the channel back if the
    /// slot is taken or the NIC is gone, so the caller can close it.
    pub(crate) fn attach_queue(
        &self,
        index: u16,
        channel: OpenedChannel,
    ) -> Result<(), OpenedChannel> {
        if self.removed.get() {
            return Err(channel);
        }
        if usize::from(index) >= VRSS_CHANNEL_MAX {
            return Err(channel);
        }
        let mut queues = self.queues.borrow_mut();
        let Err(at) = queues.binary_search_by_key(&index, |q| q.index) else {
            return Err(channel);
        };
        queues.insert(at, Queue::new(index, channel));
        drop(queues);
        self.bump();
        Ok(())
    }

    /// Forgets queue `index` (its channel was rescinded): sends still in flight on it
    /// will never complete, so their sections come back now and count as errors.
    pub(crate) fn detach_queue(&self, index: u16) -> Option<OpenedChannel> {
        let queue = {
            let mut queues = self.queues.borrow_mut();
            let at = queues.iter().position(|q| q.index == index)?;
            queues.remove(at)
        };
        if let Some(send) = self.send.borrow_mut().as_mut() {
            let lost = send.sections.reclaim_queue(index) as u64;
            queue.count(|s| s.tx_errors += lost);
        }
        info!("netvsc {}: queue {index} removed", self.id);
        self.bump();
        Rc::try_unwrap(queue).ok().map(|q| q.channel)
    }

    /// Marks the NIC removed and lets go of every queue and buffer: nothing is sent or
    /// received after this. Returns the sub-channels that were open (queue 0 excluded)
    /// so a caller that is not handling a rescind can close them.
    pub(crate) fn shut_down(&self) -> Vec<OpenedChannel> {
        self.removed.set(true);
        let queues = core::mem::take(&mut *self.queues.borrow_mut());
        let mut subchannels = Vec::new();
        for q in queues {
            if let Some(send) = self.send.borrow_mut().as_mut() {
                let lost = send.sections.reclaim_queue(q.index) as u64;
                q.count(|s| s.tx_errors += lost);
            }
            if q.index != 0 {
                subchannels.push(q.channel.clone());
            }
        }
        self.recv.borrow_mut().take();
        self.send.borrow_mut().take();
        self.backlog.borrow_mut().clear();
        self.control.borrow_mut().clear();
        self.rndis.borrow_mut().clear();
        self.bump();
        subchannels
    }

    // ---------------------------------------------------------------------------------
    // Control requests (probe time).

    /// Sends an NVSP message on the primary; with `answer` set, waits for the host's
    /// completion and returns its payload.
    pub(crate) async fn nvsp_request(
        &self,
        msg: &NvspMessage<'_>,
        answer: bool,
    ) -> Result<Vec<u8>, NetvscError> {
        let bytes = msg.encode().map_err(|_| NetvscError::BadReply("encode"))?;
        let Some(primary) = self.primary() else {
            return Err(ChannelError::Rescinded.into());
        };
        if !answer {
            self.write_with_retry(
                &primary,
                &OutgoingPacket::inband(0, false, &[bytes.as_bytes()]),
            )
            .await?;
            return Ok(Vec::new());
        }
        let id = CONTROL_TAG | u64::from(self.next_id());
        let pending = Rc::new(Pending::default());
        self.control.borrow_mut().insert(id, pending.clone());
        let result = async {
            self.write_with_retry(
                &primary,
                &OutgoingPacket::inband(id, true, &[bytes.as_bytes()]),
            )
            .await?;
            self.wait_for(|| pending.reply.borrow().is_some()).await
        }
        .await;
        self.control.borrow_mut().remove(&id);
        result?;
        let reply = pending.reply.borrow_mut().take().unwrap_or_default();
        Ok(reply)
    }

    /// Sends an RNDIS control message (its `req_id` already set to `req_id`) through a
    /// send section and waits for the host's *_CMPLT with the same id; returns it.
    pub(crate) async fn rndis_request(
        &self,
        msg: &RndisMessage<'_>,
        req_id: u32,
    ) -> Result<Vec<u8>, NetvscError> {
        let pending = Rc::new(Pending::default());
        self.rndis.borrow_mut().insert(req_id, pending.clone());
        let result = async {
            let mut buf = vec![0u8; 2048];
            let len = msg
                .encode(&mut buf)
                .map_err(|_| NetvscError::BadReply("encode"))?;
            let buf = buf.get(..len).ok_or(NetvscError::BadReply("encode"))?;
            loop {
                let primary = self.primary().ok_or(ChannelError::Rescinded)?;
                match self.send_section(&primary, NVSP_CHANNEL_TYPE_CONTROL, buf) {
                    Ok(()) => break,
                    Err(NicError::Busy) => self.wait_for_change().await?,
                    Err(_) => return Err(ChannelError::Rescinded.into()),
                }
            }
            self.wait_for(|| pending.reply.borrow().is_some()).await
        }
        .await;
        self.rndis.borrow_mut().remove(&req_id);
        result?;
        let reply = pending.reply.borrow_mut().take().unwrap_or_default();
        Ok(reply)
    }

    async fn write_with_retry(
        &self,
        queue: &Queue,
        packet: &OutgoingPacket<'_>,
    ) -> Result<(), NetvscError> {
        loop {
            match queue.channel.ring().try_write(packet) {
                Ok(w) => {
                    if w.signal {
                        queue.channel.signal_host();
                    }
                    return Ok(());
                }
                Err(RingError::Full { needed }) => {
                    queue.channel.ring().set_pending_send_size(needed)?;
                    self.wait_for_change().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls the primary until `done` holds, waiting for host signals in between, for at
    /// most the configured reply timeout.
    async fn wait_for(&self, mut done: impl FnMut() -> bool) -> Result<(), NetvscError> {
        let deadline = self.handle.now().saturating_add(self.config.reply_timeout);
        loop {
            if let Some(primary) = self.primary() {
                self.poll_queue(&primary, &mut Sink::Drop, usize::MAX)?;
            }
            if done() {
                return Ok(());
            }
            if self.handle.now() >= deadline {
                return Err(NetvscError::Timeout);
            }
            match self
                .handle
                .timeout_at(deadline, self.wait_for_change())
                .await
            {
                Ok(r) => r?,
                Err(_) => return Err(NetvscError::Timeout),
            }
        }
    }

    /// Waits for a signal on the primary (or any NIC event); fails once the primary is
    /// rescinded or the NIC removed.
    async fn wait_for_change(&self) -> Result<(), NetvscError> {
        let Some(primary) = self.primary() else {
            return Err(ChannelError::Rescinded.into());
        };
        if self.removed.get() || primary.channel.device().channel().is_rescinded() {
            return Err(ChannelError::Rescinded.into());
        }
        if primary.channel.ring().unmask_and_check()? {
            return Ok(());
        }
        let seen = self.generation.get();
        let signal = primary.channel.clone();
        let futures: Vec<BoxFuture<'_, ()>> = vec![
            alloc::boxed::Box::pin(async move {
                let _ = signal.wait_signal().await;
            }),
            alloc::boxed::Box::pin(
                self.events
                    .wait_until(move || self.generation.get() != seen),
            ),
        ];
        FirstOf::new(futures).await;
        Ok(())
    }

    /// How long the probe may wait for sub-channels.
    pub(crate) fn subchannel_timeout(&self) -> Duration {
        self.config.subchannel_timeout
    }

    // ---------------------------------------------------------------------------------
    // Packet processing.

    /// Processes what the host wrote to `queue`: completions, in-band messages and
    /// received RNDIS messages. Data frames go to `sink`; at most `budget` are
    /// delivered, and stashing stops when the backlog is full. Returns the number of
    /// frames delivered.
    fn poll_queue(
        &self,
        queue: &Queue,
        sink: &mut Sink<'_>,
        budget: usize,
    ) -> Result<usize, NetvscError> {
        let ring = queue.channel.ring();
        if !self.flush_owed(queue)? {
            // No room even for the completions we owe: reading more would only add to
            // them. The host signals when it has consumed some.
            return Ok(0);
        }
        let mut delivered = 0;
        let mut scratch = self.packet_scratch.borrow_mut();
        while delivered < budget {
            if matches!(sink, Sink::Stash) && self.backlog.borrow().len() >= BACKLOG_FRAMES {
                break;
            }
            match ring.read_packet(&mut scratch) {
                Ok(None) => break,
                Ok(Some(packet)) => {
                    let trans_id = packet.descriptor.trans_id.get();
                    match packet.kind {
                        PacketKind::Completion => {
                            self.on_completion(queue, trans_id, packet.payload)
                        }
                        PacketKind::InBand => self.on_inband(packet.payload),
                        PacketKind::TransferPages { header, ranges } => {
                            delivered += self.on_receive(
                                queue,
                                trans_id,
                                header,
                                ranges,
                                packet.payload,
                                sink,
                            )
                        }
                        PacketKind::GpaDirect { .. } => {
                            self.malformed(format_args!("GPA-direct packet from the host"))
                        }
                    }
                }
                Err(RingError::BufferTooSmall { needed }) if needed <= MAX_RING_PACKET => {
                    scratch.resize(needed, 0);
                }
                Err(RingError::BufferTooSmall { needed }) => {
                    ring.advance()?;
                    self.malformed(format_args!("{needed}-byte ring packet"));
                }
                Err(RingError::BadPacket(e)) => self.malformed(format_args!("ring packet: {e:?}")),
                Err(e) => {
                    warn!(
                        "netvsc {}: queue {} ring failed: {e:?}",
                        self.id, queue.index
                    );
                    return Err(e.into());
                }
            }
        }
        drop(scratch);
        if ring.read_done()? {
            queue.channel.signal_host();
        }
        Ok(delivered)
    }

    /// Frees send sections for a sender that is not receiving: reads every queue's ring
    /// for completions, stashing the frames in front of them in the backlog (bounded)
    /// for the next `receive` instead of dropping them.
    fn reap_completions(&self) {
        // Inside the network side's `deliver` callback the receive path is running
        // already; it takes the completions itself once the callback returns.
        if self.packet_scratch.try_borrow_mut().is_err() {
            return;
        }
        for queue in self.open_queue_list() {
            if let Err(e) = self.poll_queue(&queue, &mut Sink::Stash, usize::MAX) {
                debug!("netvsc {}: queue {} reap: {e}", self.id, queue.index);
            }
        }
    }

    /// Sends the receive completions still owed on `queue`; returns whether all went.
    fn flush_owed(&self, queue: &Queue) -> Result<bool, NetvscError> {
        loop {
            let Some(&trans_id) = queue.owed.borrow().front() else {
                return Ok(true);
            };
            if !self.complete_receive(queue, trans_id, NvspStatus::SUCCESS)? {
                return Ok(false);
            }
            queue.owed.borrow_mut().pop_front();
        }
    }

    /// Writes one receive completion; `Ok(false)` if the ring is full.
    fn complete_receive(
        &self,
        queue: &Queue,
        trans_id: u64,
        status: NvspStatus,
    ) -> Result<bool, NetvscError> {
        let msg = NvspMessage::SendRndisPacketComplete(SendRndisPacketComplete {
            status: status.0.into(),
        });
        let mut bytes = [0u8; 8];
        let len = msg
            .encode_into(&mut bytes)
            .map_err(|_| NetvscError::BadReply("encode"))?;
        match queue
            .channel
            .ring()
            .try_write(&OutgoingPacket::completion(trans_id, &[&bytes[..len]]))
        {
            Ok(w) => {
                if w.signal {
                    queue.channel.signal_host();
                }
                Ok(true)
            }
            Err(RingError::Full { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn on_completion(&self, queue: &Queue, trans_id: u64, payload: &[u8]) {
        if trans_id & TX_TAG != 0 && trans_id & CONTROL_TAG == 0 {
            let section = (trans_id & 0xffff_ffff) as u32;
            let status = match NvspMessage::parse(payload, Sender::Host) {
                Ok(NvspMessage::SendRndisPacketComplete(c)) => c.status.get(),
                _ => return self.malformed(format_args!("send completion {trans_id:#x}")),
            };
            let freed = self
                .send
                .borrow_mut()
                .as_mut()
                .is_some_and(|s| s.sections.give_back(section, queue.index));
            if !freed {
                return self.malformed(format_args!("completion for idle section {section}"));
            }
            if status != NvspStatus::SUCCESS.0 {
                queue.count(|s| s.tx_errors += 1);
            }
            self.bump();
        } else if let Some(p) = self.control.borrow().get(&trans_id) {
            *p.reply.borrow_mut() = Some(payload.to_vec());
        } else {
            self.malformed(format_args!(
                "completion for unknown transaction {trans_id:#x}"
            ));
        }
    }

    fn on_inband(&self, payload: &[u8]) {
        match NvspMessage::parse(payload, Sender::Host) {
            Ok(NvspMessage::SendIndirectionTable(m)) => {
                let Ok(table) = m.table(self.nvsp_version.get()) else {
                    return self.malformed(format_args!("send indirection table"));
                };
                let mut t = [0u32; VRSS_SEND_TAB_SIZE];
                for (slot, entry) in t.iter_mut().zip(table) {
                    *slot = entry.get();
                }
                if t.iter().any(|&e| e as usize >= VRSS_CHANNEL_MAX) {
                    return self.malformed(format_args!("send table entry out of range: {t:?}"));
                }
                *self.send_table.borrow_mut() = t;
                let mut c = self.counters.get();
                c.send_tables += 1;
                self.counters.set(c);
                debug!("netvsc {}: send indirection table {t:?}", self.id);
            }
            Ok(NvspMessage::SendVfAssociation(_)) => {
                debug!("netvsc {}: VF association ignored", self.id)
            }
            Ok(m) => self.malformed(format_args!(
                "unexpected in-band NVSP {:?}",
                m.message_type()
            )),
            Err(e) => self.malformed(format_args!("in-band NVSP: {e:?}")),
        }
    }

    /// A transfer-page packet: one RNDIS message per range, in the receive buffer.
    fn on_receive(
        &self,
        queue: &Queue,
        trans_id: u64,
        header: VmTransferPageHeader,
        ranges: &[VmTransferPageRange],
        payload: &[u8],
        sink: &mut Sink<'_>,
    ) -> usize {
        let mut delivered = 0;
        let status = if header.xfer_pageset_id.get() != NETVSC_RECEIVE_BUFFER_ID {
            self.malformed(format_args!(
                "transfer page set {:#x}",
                header.xfer_pageset_id.get()
            ));
            NvspStatus::FAIL
        } else {
            match NvspMessage::parse(payload, Sender::Host) {
                Ok(NvspMessage::SendRndisPacket(_)) => {
                    for range in ranges {
                        delivered += self.on_rndis_range(queue, range, sink);
                    }
                    NvspStatus::SUCCESS
                }
                _ => {
                    self.malformed(format_args!("transfer-page packet without SEND_RNDIS_PKT"));
                    NvspStatus::FAIL
                }
            }
        };
        // The host keeps the slots busy until it gets this completion, whatever we
        // thought of the contents.
        match self.complete_receive(queue, trans_id, status) {
            Ok(true) => {}
            Ok(false) => queue.owed.borrow_mut().push_back(trans_id),
            Err(e) => warn!("netvsc {}: receive completion failed: {e}", self.id),
        }
        delivered
    }

    fn on_rndis_range(
        &self,
        queue: &Queue,
        range: &VmTransferPageRange,
        sink: &mut Sink<'_>,
    ) -> usize {
        let offset = range.byte_offset.get() as usize;
        let len = range.byte_count.get() as usize;
        let mut scratch = self.rx_scratch.borrow_mut();
        let copied = {
            let recv = self.recv.borrow();
            match recv.as_ref() {
                Some(r)
                    if len <= MAX_RX_MESSAGE
                        && offset.checked_add(len).is_some_and(|end| end <= r.limit) =>
                {
                    r.buf.read(offset, &mut scratch[..len]).is_ok()
                }
                _ => false,
            }
        };
        if !copied {
            queue.count(|s| s.rx_dropped += 1);
            self.malformed(format_args!("receive range {offset:#x}+{len:#x}"));
            return 0;
        }
        let bytes = &scratch[..len];
        match RndisMessage::parse(bytes) {
            Ok(RndisMessage::Packet(p)) => {
                let frame = p.data;
                let usable = !self.removed.get() && frame.len() >= ETH_HEADER;
                match sink {
                    Sink::Deliver(d) if usable => {
                        d(frame);
                        queue.count(|s| {
                            s.rx_packets += 1;
                            s.rx_bytes += frame.len() as u64;
                        });
                        return 1;
                    }
                    Sink::Stash if usable => {
                        self.backlog
                            .borrow_mut()
                            .push_back((queue.index, frame.to_vec()));
                    }
                    _ => queue.count(|s| s.rx_dropped += 1),
                }
            }
            Ok(RndisMessage::IndicateStatus { body, .. }) => {
                self.on_status(RndisStatus(body.status.get()))
            }
            Ok(
                RndisMessage::InitializeComplete(_)
                | RndisMessage::QueryComplete { .. }
                | RndisMessage::SetComplete(_)
                | RndisMessage::KeepaliveComplete(_)
                | RndisMessage::ResetComplete(_),
            ) => {
                // Every completion but RESET_C starts with req_id.
                let req_id = bytes
                    .get(8..12)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match self.rndis.borrow().get(&req_id) {
                    Some(p) => *p.reply.borrow_mut() = Some(bytes.to_vec()),
                    None => self.malformed(format_args!(
                        "RNDIS completion for unknown request {req_id}"
                    )),
                }
            }
            Ok(m) => self.malformed(format_args!("unexpected RNDIS {:?}", m.message_type())),
            Err(e) => {
                queue.count(|s| s.rx_dropped += 1);
                self.malformed(format_args!("RNDIS message: {e:?}"));
            }
        }
        0
    }

    fn on_status(&self, status: RndisStatus) {
        let up = match status {
            RndisStatus::MEDIA_CONNECT => true,
            RndisStatus::MEDIA_DISCONNECT => false,
            other => return debug!("netvsc {}: RNDIS status {:#x} ignored", self.id, other.0),
        };
        let mut c = self.counters.get();
        c.link_changes += 1;
        self.counters.set(c);
        if self.link.replace(up) != up {
            info!(
                "netvsc {}: link {}",
                self.id,
                if up { "up" } else { "down" }
            );
        }
        self.bump();
    }

    // ---------------------------------------------------------------------------------
    // Transmit.

    /// Copies one RNDIS message into a free send section and sends it on `queue`; the
    /// section comes back with the host's completion.
    fn send_section(
        &self,
        queue: &Queue,
        channel_type: u32,
        message: &[u8],
    ) -> Result<(), NicError> {
        let queue_index = queue.index;
        let (section, buf, offset) = {
            let mut send_guard = self.send.borrow_mut();
            let mut send = send_guard.as_mut().ok_or(NicError::Removed)?;
            if message.len() > send.section_size {
                return Err(NicError::TooLong);
            }
            let section = match send.sections.take(queue_index) {
                Some(section) => section,
                None => {
                    drop(send_guard);
                    self.reap_completions();
                    send_guard = self.send.borrow_mut();
                    send = send_guard.as_mut().ok_or(NicError::Removed)?;
                    send.sections.take(queue_index).ok_or(NicError::Busy)?
                }
            };
            (
                section,
                send.buf.clone(),
                section as usize * send.section_size,
            )
        };
        let give_back = || {
            if let Some(s) = self.send.borrow_mut().as_mut() {
                s.sections.give_back(section, queue_index);
            }
        };
        if buf.write(offset, message).is_err() {
            give_back();
            return Err(NicError::Removed);
        }
        let msg = NvspMessage::SendRndisPacket(SendRndisPacket {
            channel_type: channel_type.into(),
            send_buf_section_index: section.into(),
            send_buf_section_size: (message.len() as u32).into(),
        });
        let Ok(bytes) = msg.encode() else {
            give_back();
            return Err(NicError::TooLong);
        };
        let ring = queue.channel.ring();
        match ring.try_write(&OutgoingPacket::inband(
            TX_TAG | u64::from(section),
            true,
            &[bytes.as_bytes()],
        )) {
            Ok(w) => {
                if w.signal {
                    queue.channel.signal_host();
                }
                Ok(())
            }
            Err(RingError::Full { needed }) => {
                give_back();
                // Ask the host to signal once the packet fits.
                let _ = ring.set_pending_send_size(needed);
                Err(NicError::Busy)
            }
            Err(e) => {
                give_back();
                warn!("netvsc {}: queue {queue_index} send failed: {e:?}", self.id);
                queue.count(|s| s.tx_errors += 1);
                Err(NicError::Removed)
            }
        }
    }

    /// The queue for a frame: the host's send table entry for its flow hash, if that
    /// queue is open; otherwise the primary (`None` once the NIC has no queues).
    fn tx_queue(&self, frame: &[u8]) -> Option<Rc<Queue>> {
        let entry = flow_hash(frame).map_or(0, |hash| {
            self.send_table.borrow()[hash as usize % VRSS_SEND_TAB_SIZE]
        });
        let index = u16::try_from(entry).unwrap_or(0);
        self.queue(index).or_else(|| self.primary())
    }
}

impl Nic for NetvscNic {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn mac(&self) -> [u8; 6] {
        self.mac.get()
    }

    fn mtu(&self) -> usize {
        self.mtu.get()
    }

    fn link_up(&self) -> bool {
        self.link.get() && !self.removed.get()
    }

    fn is_removed(&self) -> bool {
        self.removed.get()
    }

    fn queue_count(&self) -> usize {
        self.queues.borrow().len()
    }

    fn receive(&self, budget: usize, deliver: &mut dyn FnMut(&[u8])) -> usize {
        if self.removed.get() {
            return 0;
        }
        let count = self.queues.borrow().len();
        if count == 0 {
            return 0;
        }
        let mut delivered = 0;
        while delivered < budget {
            let Some((index, frame)) = self.backlog.borrow_mut().pop_front() else {
                break;
            };
            deliver(&frame);
            delivered += 1;
            if let Some(q) = self.queue(index) {
                q.count(|s| {
                    s.rx_packets += 1;
                    s.rx_bytes += frame.len() as u64;
                });
            }
        }
        // Round robin without allocating: this runs once per frame the network side
        // takes. A queue detached meanwhile just ends the round early.
        let start = self.rx_cursor.get() % count;
        self.rx_cursor.set(start + 1);
        let mut sink = Sink::Deliver(deliver);
        for i in 0..count {
            if delivered >= budget {
                break;
            }
            let Some(q) = self.queues.borrow().get((start + i) % count).cloned() else {
                break;
            };
            match self.poll_queue(&q, &mut sink, budget - delivered) {
                Ok(n) => delivered += n,
                Err(e) => debug!("netvsc {}: queue {} poll: {e}", self.id, q.index),
            }
        }
        delivered
    }

    fn transmit(&self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Result<(), NicError> {
        if self.removed.get() {
            return Err(NicError::Removed);
        }
        if !self.link.get() {
            return Err(NicError::LinkDown);
        }
        // A VLAN tag may ride in the frame, hence + 4.
        if len < ETH_HEADER || len > self.mtu.get() + ETH_HEADER + 4 {
            return Err(NicError::TooLong);
        }
        // The queue depends on the flow, which only the filled frame tells; so the
        // message is built in private memory first, then copied into a send section.
        let total = TX_HEADER + len;
        let mut staged = self.tx_scratch.borrow_mut();
        if staged.len() < total {
            staged.resize(total, 0);
        }
        write_packet_header(&mut staged[..TX_HEADER], len);
        fill(&mut staged[TX_HEADER..total]);
        let queue = self
            .tx_queue(&staged[TX_HEADER..total])
            .ok_or(NicError::Removed)?;
        let result = self.send_section(&queue, NVSP_CHANNEL_TYPE_DATA, &staged[..total]);
        match result {
            Ok(()) => queue.count(|s| {
                s.tx_packets += 1;
                s.tx_bytes += len as u64;
            }),
            Err(NicError::Busy) => queue.count(|s| s.tx_busy += 1),
            Err(_) => {}
        }
        result
    }

    fn can_transmit(&self) -> bool {
        if self.removed.get() || !self.link.get() {
            return false;
        }
        if self.free_send_sections() == 0 {
            self.reap_completions();
        }
        self.free_send_sections() > 0
    }

    fn changed(&self) -> NicFuture<'_> {
        alloc::boxed::Box::pin(async move {
            let seen = self.seen_generation.get();
            let queues = self.open_queue_list();
            let ready = self.removed.get()
                || self.generation.get() != seen
                || !self.backlog.borrow().is_empty()
                || queues.iter().any(|q| {
                    !q.owed.borrow().is_empty() || q.channel.ring().has_incoming().unwrap_or(false)
                });
            if !ready {
                let mut futures: Vec<BoxFuture<'_, ()>> = queues
                    .into_iter()
                    .map(|q| {
                        let ch = q.channel.clone();
                        alloc::boxed::Box::pin(async move {
                            let _ = ch.wait_signal().await;
                        }) as BoxFuture<'_, ()>
                    })
                    .collect();
                futures.push(alloc::boxed::Box::pin(
                    self.events
                        .wait_until(move || self.generation.get() != seen),
                ));
                FirstOf::new(futures).await;
            }
            self.seen_generation.set(self.generation.get());
        })
    }

    fn queue_stats(&self, queue: usize) -> QueueStats {
        u16::try_from(queue)
            .ok()
            .and_then(|q| self.queue(q))
            .map_or_else(QueueStats::default, |q| q.stats.get())
    }
}

/// Writes the RNDIS PACKET header for a frame of `frame_len` bytes right behind it.
fn write_packet_header(dst: &mut [u8], frame_len: usize) {
    let body = RndisPacket {
        data_offset: (size_of::<RndisPacket>() as u32).into(),
        data_len: (frame_len as u32).into(),
        ..RndisPacket::default()
    };
    let header = hvnet_wire::rndis::RndisHeader {
        ndis_msg_type: hvnet_wire::rndis::RndisMessageType::PACKET.0.into(),
        msg_len: ((TX_HEADER + frame_len) as u32).into(),
    };
    dst[..RNDIS_HEADER_SIZE].copy_from_slice(header.as_bytes());
    dst[RNDIS_HEADER_SIZE..TX_HEADER].copy_from_slice(body.as_bytes());
}
