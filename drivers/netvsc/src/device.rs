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
//!
//! # The data path's costs
//!
//! A poll of a queue reads the host's `write_index` once
//! ([`hvnet_vmbus::ring::RingPair::begin_read`]); every receive completion is staged
//! from a packet prepared when the queue was attached (only the transaction id changes),
//! and the completions and the read position are published with one store each and at
//! most one signal. A transmit copies the frame into a send section and writes one
//! prepared SEND_RNDIS_PKT. Counters are cells, so counting copies nothing.
//!
//! # Batches
//!
//! The network side polls an interface as one NIC batch ([`Nic::begin_batch`] ..
//! [`Nic::end_batch`]). Inside it nothing is published per frame: sends are staged in
//! the rings (published every 32 sends of a queue, when the send
//! buffer runs out, and at the end), and polls leave staging their completions and
//! handing back the read space to the end, which does it once per queue with at most
//! one signal. The network side takes received frames one per `receive(1)` call (that
//! is how smoltcp asks); the first call of a batch reads every queue's ring ahead into
//! the backlog (up to a poll's budget per queue, see `backlog`), and the following calls
//! are served from it. A batch never ended is ended before [`Nic::changed`] waits.
//!
//! # VLAN
//!
//! The host moves 802.1Q tags out of frames into a per-packet info (type 6). On receive
//! the tag is put back into the frame (TPID 0x8100 and the TCI from the PPI) so that the
//! network side sees an ordinary tagged frame; on transmit a tagged frame leaves with its
//! tag stripped and a VLAN PPI instead, as Linux sends it.

use alloc::collections::BTreeMap;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::mem::size_of;

use hvnet_runtime::sync::WaitQueue;
use hvnet_runtime::{Duration, Handle};
use hvnet_vmbus::bus::{Device, OpenedChannel};
use hvnet_vmbus::channel::{BoxFuture, ChannelError};
use hvnet_vmbus::memory::SharedBuffer;
use hvnet_vmbus::ring::{OutgoingPacket, PreparedPacket, RawIncoming, RingError};
use hvnet_wire::nvsp::{
    parse_fixed, NvspMessage, NvspMessageType, NvspStatus, NvspVersion, SendRndisPacket,
    SendRndisPacketComplete, NETVSC_RECEIVE_BUFFER_ID, NVSP_CHANNEL_TYPE_CONTROL,
    NVSP_CHANNEL_TYPE_DATA, VRSS_CHANNEL_MAX, VRSS_SEND_TAB_SIZE,
};
use hvnet_wire::ring::{PacketKind, VmTransferPageHeader, VmTransferPageRange};
use hvnet_wire::rndis::{
    Ndis8021qInfo, PacketView, PerPacketInfo, PpiType, RndisHeader, RndisMessage, RndisMessageType,
    RndisPacket, RndisStatus, PPI_HEADER_SIZE, RNDIS_HEADER_SIZE,
};
use log::{debug, info, warn};
use zerocopy::IntoBytes;

use crate::backlog::Backlog;
use crate::config::NetvscConfig;
use crate::flow::flow_hash;
use crate::nic::{MtuFuture, Nic, NicError, NicFuture, QueueStats};
use crate::sections::Sections;
use crate::select::FirstOf;

/// Transaction ids of NVSP control requests (INIT, buffers, SUBCHANNEL).
pub(crate) const CONTROL_TAG: u64 = 1 << 62;
/// Transaction ids of sends from the send buffer: the tag plus the section index.
pub(crate) const TX_TAG: u64 = 1 << 61;
/// RNDIS PACKET header in front of every transmitted frame (no per-packet info).
const TX_HEADER: usize = RNDIS_HEADER_SIZE + size_of::<RndisPacket>();
/// One 802.1Q tag in a frame (TPID and TCI).
pub(crate) const VLAN_TAG: usize = 4;
/// A VLAN per-packet info: its header and one u32.
pub(crate) const VLAN_PPI: usize = PPI_HEADER_SIZE + 4;
/// Where `transmit` has the network side write a frame in its staging buffer: with the
/// RNDIS header right in front of it for an untagged frame, and for a tagged one room
/// for the header and a VLAN PPI once the 4 tag bytes are taken out.
const TX_FRAME_AT: usize = TX_HEADER + VLAN_PPI - VLAN_TAG;
/// 802.1Q TPID.
const ETHERTYPE_VLAN: [u8; 2] = [0x81, 0x00];
/// Largest RNDIS message taken from the receive buffer (a host range beyond it is
/// malformed: real hosts use 1728-byte slots, jumbo frames need about 9.1 KB).
const MAX_RX_MESSAGE: usize = 16 * 1024;
/// Largest ring packet the driver reads (transfer-page packets with many ranges);
/// larger ones are skipped.
const MAX_RING_PACKET: usize = 64 * 1024;
/// Ethernet header length.
pub(crate) const ETH_HEADER: usize = 14;
/// Snapshots of a ring's `write_index` one poll takes at most: the second picks up what
/// arrived while the first was processed; anything later waits for the next poll, so a
/// host that writes without pause cannot keep a poll going.
const SNAPSHOTS_PER_POLL: usize = 2;

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
pub(crate) enum Sink<'a> {
    /// The network side's callback (its `receive`).
    Deliver(&'a mut dyn FnMut(&[u8])),
    /// The NIC's backlog (borrowed for the whole pass), read ahead of the network side
    /// inside a batch: the batch's one-frame `receive` calls are served from it.
    Ahead(&'a mut Backlog),
    /// The NIC's backlog: a sender is digging for send completions that sit behind
    /// received frames; the frames wait there for the next `receive`. Reading stops when
    /// the backlog is full (the host keeps the rest).
    Stash(&'a mut Backlog),
    /// The backlog while the queues are being stopped: frames go there while it has
    /// room and are dropped (counted) after, because the rings must be emptied.
    Drain(&'a mut Backlog),
    /// Nowhere: the NIC is not registered yet; frames are dropped and counted.
    Drop,
}

/// Receive completions a poll gathers before it stages them.
const ACK_BATCH: usize = 64;
/// Ring bytes a poll copies out per frame of its budget (see `read_queue`).
const RING_BYTES_PER_FRAME: usize = 128;
/// Most ring bytes a poll copies out at once.
const READ_WINDOW: usize = 8192;

impl Sink<'_> {
    /// The backlog, if frames go there.
    #[inline]
    fn backlog(&mut self) -> Option<&mut Backlog> {
        match self {
            Sink::Ahead(backlog) | Sink::Stash(backlog) | Sink::Drain(backlog) => Some(backlog),
            Sink::Deliver(_) | Sink::Drop => None,
        }
    }

    /// Whether reading must stop: the frames go to a backlog that may not hold another
    /// message (draining reads on regardless).
    #[inline]
    fn full(&self) -> bool {
        match self {
            Sink::Ahead(backlog) | Sink::Stash(backlog) => !backlog.has_room(MAX_RX_MESSAGE),
            _ => false,
        }
    }
}

/// Frames the backlog holds; past it the rings are left alone (the host queues).
const BACKLOG_FRAMES: usize = 512;
/// Most arena bytes of the backlog (private memory, grown on demand from 16 KiB and
/// given back with the NIC): about 320 frames of 1514 bytes with their RNDIS headers,
/// so that under load even eight queues get some 40 full-size frames each per pass. A
/// pass stops reading ahead while less than one largest message ([`MAX_RX_MESSAGE`])
/// is free.
const BACKLOG_BYTES: usize = 512 * 1024;
/// Frames one read-ahead pass takes off each queue's ring (a NAPI poll's budget), so
/// that under load every queue's batch end - completions staged, ring space handed
/// back, a signal - is shared by this many frames. The arena bounds the pass as well.
const READ_AHEAD: usize = 64;

/// Sends a queue holds back inside an open batch before it publishes them anyway, so
/// that a long burst keeps a host that runs alongside busy.
const UNPUBLISHED_SENDS_MAX: usize = 32;

/// Driver-wide counters of one NIC (queue counters are in [`QueueStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Host messages or packets dropped as malformed.
    pub malformed: u64,
    /// Link-state indications received.
    pub link_changes: u64,
    /// Send indirection tables received.
    pub send_tables: u64,
    /// Received frames whose VLAN PPI was put back into the frame as a tag.
    pub vlan_rx: u64,
    /// Tagged frames sent with the tag moved into a VLAN PPI.
    pub vlan_tx: u64,
    /// MTU changes carried out.
    pub mtu_changes: u64,
}

/// Counters of one queue, a cell each (counting copies nothing).
#[derive(Default)]
struct QueueCounters {
    rx_packets: Cell<u64>,
    rx_bytes: Cell<u64>,
    rx_dropped: Cell<u64>,
    tx_packets: Cell<u64>,
    tx_bytes: Cell<u64>,
    tx_busy: Cell<u64>,
    tx_errors: Cell<u64>,
}

fn add(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().wrapping_add(n));
}

impl QueueCounters {
    fn from_stats(s: QueueStats) -> Self {
        Self {
            rx_packets: Cell::new(s.rx_packets),
            rx_bytes: Cell::new(s.rx_bytes),
            rx_dropped: Cell::new(s.rx_dropped),
            tx_packets: Cell::new(s.tx_packets),
            tx_bytes: Cell::new(s.tx_bytes),
            tx_busy: Cell::new(s.tx_busy),
            tx_errors: Cell::new(s.tx_errors),
        }
    }

    fn snapshot(&self) -> QueueStats {
        QueueStats {
            rx_packets: self.rx_packets.get(),
            rx_bytes: self.rx_bytes.get(),
            rx_dropped: self.rx_dropped.get(),
            tx_packets: self.tx_packets.get(),
            tx_bytes: self.tx_bytes.get(),
            tx_busy: self.tx_busy.get(),
            tx_errors: self.tx_errors.get(),
        }
    }
}

/// One queue: an open channel (the primary is queue 0; sub-channel n is queue n).
pub(crate) struct Queue {
    pub(crate) index: u16,
    pub(crate) channel: OpenedChannel,
    stats: QueueCounters,
    /// Transaction ids of receive indications to complete (successfully): gathered
    /// during a poll and staged together at its end, as Linux's multi-receive-completion
    /// buffer does; those the ring had no room for stay here, oldest first.
    acks: RefCell<Vec<u64>>,
    /// SEND_RNDIS_PKT_COMPLETE (success), laid out once; each receive completion is a
    /// copy with its transaction id.
    completion: Option<PreparedPacket>,
    /// SEND_RNDIS_PKT of a data frame from a send section, laid out once; each send
    /// sets its section, size and transaction id.
    send: Option<PreparedPacket>,
    /// Set when a poll inside an open batch left its end (staging the completions,
    /// publishing, handing the read space back) to [`Nic::end_batch`].
    deferred: Cell<bool>,
    /// Sends an open batch holds back (transaction id, section and size as in
    /// SEND_RNDIS_PKT's payload at 8..16), oldest first, written at its end.
    held_sends: RefCell<Vec<(u64, u64)>>,
}

impl Queue {
    pub(crate) fn new(index: u16, channel: OpenedChannel, stats: QueueStats) -> Rc<Self> {
        Rc::new(Self {
            index,
            channel,
            stats: QueueCounters::from_stats(stats),
            acks: RefCell::new(Vec::with_capacity(ACK_BATCH)),
            completion: prepared_completion(),
            send: prepared_send(),
            deferred: Cell::new(false),
            held_sends: RefCell::new(Vec::with_capacity(UNPUBLISHED_SENDS_MAX)),
        })
    }
}

/// The receive completion every queue sends per indication: 8 bytes of NVSP (type 108,
/// status success) in a completion packet, as Linux's `netvsc_send_recv_completion`.
fn prepared_completion() -> Option<PreparedPacket> {
    let msg = NvspMessage::SendRndisPacketComplete(SendRndisPacketComplete {
        status: NvspStatus::SUCCESS.0.into(),
    });
    let mut bytes = [0u8; 8];
    let len = msg.encode_into(&mut bytes).ok()?;
    PreparedPacket::new(&OutgoingPacket::completion(0, &[&bytes[..len]])).ok()
}

/// SEND_RNDIS_PKT (107, data) padded to 40 bytes in an in-band packet asking for
/// completion.
fn prepared_send() -> Option<PreparedPacket> {
    let msg = NvspMessage::SendRndisPacket(SendRndisPacket {
        channel_type: NVSP_CHANNEL_TYPE_DATA.into(),
        ..SendRndisPacket::default()
    });
    let bytes = msg.encode().ok()?;
    PreparedPacket::new(&OutgoingPacket::inband(0, true, &[bytes.as_bytes()])).ok()
}

/// The receive buffer as the host laid it out.
pub(crate) struct RecvBuffer {
    pub(crate) buf: Rc<dyn SharedBuffer>,
    /// End of the host's section area: ranges must lie below it.
    pub(crate) limit: usize,
    /// Its GPADL on the primary channel.
    pub(crate) gpadl: u32,
}

/// The send buffer and its sections.
pub(crate) struct SendBuffer {
    pub(crate) buf: Rc<dyn SharedBuffer>,
    pub(crate) section_size: usize,
    pub(crate) sections: Sections,
    /// Its GPADL on the primary channel.
    pub(crate) gpadl: u32,
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
    /// The NIC itself, for the sub-channel handler (which must not keep it alive).
    pub(crate) me: Weak<NetvscNic>,
    /// The primary channel's device handle (to reopen it on an MTU change); taken when
    /// the NIC goes away.
    pub(crate) device: RefCell<Option<Device>>,
    pub(crate) nvsp_version: Cell<NvspVersion>,
    /// The open queues, ascending by sub-channel index (the primary first).
    queues: RefCell<Vec<Rc<Queue>>>,
    pub(crate) recv: RefCell<Option<RecvBuffer>>,
    pub(crate) send: RefCell<Option<SendBuffer>>,
    pub(crate) mac: Cell<[u8; 6]>,
    pub(crate) mtu: Cell<usize>,
    /// The largest MTU the host and the send sections allow.
    pub(crate) max_mtu: Cell<usize>,
    pub(crate) link: Cell<bool>,
    removed: Cell<bool>,
    /// Set while the queues are stopped for an MTU change.
    pub(crate) paused: Cell<bool>,
    /// Set while an MTU change runs (a second one is refused).
    pub(crate) changing: Cell<bool>,
    control: RefCell<BTreeMap<u64, Rc<Pending>>>,
    rndis: RefCell<BTreeMap<u32, Rc<Pending>>>,
    next_id: Cell<u32>,
    send_table: [Cell<u32>; VRSS_SEND_TAB_SIZE],
    counters: Cell<NicCounters>,
    rx_scratch: RefCell<Vec<u8>>,
    packet_scratch: RefCell<Vec<u8>>,
    tx_scratch: RefCell<Vec<u8>>,
    rx_cursor: Cell<usize>,
    /// A poll gave send sections back; it tells the waiters once, at its end.
    sections_freed: Cell<bool>,
    /// Set between [`Nic::begin_batch`] and [`Nic::end_batch`].
    batch_open: Cell<bool>,
    /// Frames taken off the rings ahead of the network side or while looking for send
    /// completions, oldest first.
    backlog: RefCell<Backlog>,
    /// Counters of queues that were closed for an MTU change, by index, so that the
    /// queues reopened after it carry on counting.
    saved_stats: RefCell<BTreeMap<u16, QueueStats>>,
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
        device: Device,
        me: Weak<NetvscNic>,
    ) -> Self {
        Self {
            id,
            handle,
            config,
            me,
            device: RefCell::new(Some(device)),
            nvsp_version: Cell::new(NvspVersion::PROTOCOL_VERSION_1),
            queues: RefCell::new(Vec::new()),
            recv: RefCell::new(None),
            send: RefCell::new(None),
            mac: Cell::new([0; 6]),
            mtu: Cell::new(1500),
            max_mtu: Cell::new(1500),
            link: Cell::new(false),
            removed: Cell::new(false),
            paused: Cell::new(false),
            changing: Cell::new(false),
            control: RefCell::new(BTreeMap::new()),
            rndis: RefCell::new(BTreeMap::new()),
            next_id: Cell::new(1),
            send_table: Default::default(),
            counters: Cell::new(NicCounters::default()),
            rx_scratch: RefCell::new(vec![0; MAX_RX_MESSAGE]),
            packet_scratch: RefCell::new(vec![0; 4096]),
            tx_scratch: RefCell::new(Vec::new()),
            rx_cursor: Cell::new(0),
            sections_freed: Cell::new(false),
            batch_open: Cell::new(false),
            backlog: RefCell::new(Backlog::new(BACKLOG_BYTES, BACKLOG_FRAMES)),
            saved_stats: RefCell::new(BTreeMap::new()),
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
        core::array::from_fn(|i| self.send_table[i].get())
    }

    /// Sub-channel indices of the open queues, ascending.
    pub fn open_queues(&self) -> Vec<u16> {
        self.queues.borrow().iter().map(|q| q.index).collect()
    }

    /// Send sections currently free (all of them when idle).
    pub fn free_send_sections(&self) -> usize {
        self.send.borrow().as_ref().map_or(0, |s| s.sections.free())
    }

    /// Send sections in all (0 without a send buffer).
    pub fn send_sections(&self) -> usize {
        self.send
            .borrow()
            .as_ref()
            .map_or(0, |s| s.sections.count())
    }

    /// Whether the queues are stopped for an MTU change.
    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }

    #[cold]
    #[inline(never)]
    fn malformed(&self, what: core::fmt::Arguments<'_>) {
        self.count(|c| c.malformed += 1);
        debug!("netvsc {}: dropped malformed host input: {what}", self.id);
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut NicCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    pub(crate) fn bump(&self) {
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

    /// A fresh queue for `channel` as `index`, counting on from where a queue of that
    /// index stopped (an MTU change closes and reopens every queue).
    fn new_queue(&self, index: u16, channel: OpenedChannel) -> Rc<Queue> {
        let stats = self
            .saved_stats
            .borrow_mut()
            .remove(&index)
            .unwrap_or_default();
        Queue::new(index, channel, stats)
    }

    /// Installs the opened primary channel as queue 0. Returns it back if the NIC is
    /// gone or a primary is already installed, so the caller can close it.
    pub(crate) fn attach_primary(&self, channel: OpenedChannel) -> Result<(), OpenedChannel> {
        if self.removed.get() {
            return Err(channel);
        }
        let mut queues = self.queues.borrow_mut();
        if queues.first().is_some_and(|q| q.index == 0) {
            return Err(channel);
        }
        let queue = self.new_queue(0, channel);
        queues.insert(0, queue);
        Ok(())
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
        let queue = self.new_queue(index, channel);
        queues.insert(at, queue);
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
            add(&queue.stats.tx_errors, lost);
        }
        info!("netvsc {}: queue {index} removed", self.id);
        self.bump();
        Rc::try_unwrap(queue).ok().map(|q| q.channel)
    }

    /// Takes every queue out (an MTU change closes them): sends still in flight count as
    /// errors, the counters are kept for the queues that will replace them. Returns the
    /// channels, sub-channels first and the primary last (the order to close them in).
    pub(crate) fn take_queues(&self) -> Vec<OpenedChannel> {
        let queues = core::mem::take(&mut *self.queues.borrow_mut());
        let mut channels = Vec::new();
        for q in queues.iter().rev() {
            if let Some(send) = self.send.borrow_mut().as_mut() {
                let lost = send.sections.reclaim_queue(q.index) as u64;
                add(&q.stats.tx_errors, lost);
            }
            self.saved_stats
                .borrow_mut()
                .insert(q.index, q.stats.snapshot());
            for trans_id in q.acks.borrow_mut().drain(..) {
                debug!(
                    "netvsc {}: receive completion {trans_id:#x} dropped with queue {}",
                    self.id, q.index
                );
            }
            channels.push(q.channel.clone());
        }
        self.bump();
        channels
    }

    /// Takes the receive and send buffers out (their GPADLs are torn down by the caller).
    pub(crate) fn take_buffers(&self) -> (Option<RecvBuffer>, Option<SendBuffer>) {
        (self.recv.borrow_mut().take(), self.send.borrow_mut().take())
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
                add(&q.stats.tx_errors, lost);
            }
            if q.index != 0 {
                subchannels.push(q.channel.clone());
            }
        }
        self.recv.borrow_mut().take();
        self.send.borrow_mut().take();
        self.backlog.borrow_mut().release();
        self.control.borrow_mut().clear();
        self.rndis.borrow_mut().clear();
        self.saved_stats.borrow_mut().clear();
        self.device.borrow_mut().take();
        self.bump();
        subchannels
    }

    /// Resolves once no MTU change runs.
    pub(crate) async fn change_done(&self) {
        self.events.wait_until(|| !self.changing.get()).await;
    }

    /// Whether the NIC was removed (also while an MTU change runs).
    pub(crate) fn removed(&self) -> bool {
        self.removed.get()
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
    /// send section and waits for the host's *_CMPLT with the same id; returns it. With
    /// `answer` unset (HALT has no completion) it returns once the message is sent.
    pub(crate) async fn rndis_request(
        &self,
        msg: &RndisMessage<'_>,
        req_id: u32,
        answer: bool,
    ) -> Result<Vec<u8>, NetvscError> {
        let pending = Rc::new(Pending::default());
        if answer {
            self.rndis.borrow_mut().insert(req_id, pending.clone());
        }
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
            if answer {
                self.wait_for(|| pending.reply.borrow().is_some()).await
            } else {
                Ok(())
            }
        }
        .await;
        if answer {
            self.rndis.borrow_mut().remove(&req_id);
        }
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
    pub(crate) async fn wait_for(&self, mut done: impl FnMut() -> bool) -> Result<(), NetvscError> {
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
    pub(crate) async fn wait_for_change(&self) -> Result<(), NetvscError> {
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

    /// Stopping the queues for an MTU change: reads every queue until the host has
    /// completed every send and has nothing more to indicate, or `deadline` passes.
    /// Frames that arrive meanwhile wait in the backlog while it has room. Returns
    /// whether the queues were quiet at the end.
    pub(crate) async fn drain(&self, deadline: hvnet_runtime::Instant) -> bool {
        loop {
            let mut busy = false;
            for queue in self.open_queue_list() {
                let before = queue.channel.ring().incoming_stats().packets;
                let polled = match self.backlog.try_borrow_mut() {
                    Ok(mut backlog) => {
                        self.poll_queue(&queue, &mut Sink::Drain(&mut backlog), usize::MAX)
                    }
                    Err(_) => self.poll_queue(&queue, &mut Sink::Drop, usize::MAX),
                };
                if let Err(e) = polled {
                    debug!("netvsc {}: queue {} drain: {e}", self.id, queue.index);
                    continue;
                }
                busy |= queue.channel.ring().incoming_stats().packets != before
                    || !queue.acks.borrow().is_empty();
            }
            let sent_back = self
                .send
                .borrow()
                .as_ref()
                .is_none_or(|s| s.sections.free() == s.sections.count());
            if !busy && sent_back {
                return true;
            }
            if self.removed.get() || self.handle.now() >= deadline {
                return false;
            }
            self.handle.sleep(Duration::from_micros(100)).await;
        }
    }

    // ---------------------------------------------------------------------------------
    // Packet processing.

    /// Processes what the host wrote to `queue`: completions, in-band messages and
    /// received RNDIS messages, as one batch (one snapshot of the host's write index,
    /// completions staged and published together with the read position, one signal).
    /// Data frames go to `sink`; at most `budget` are delivered, and stashing stops when
    /// the backlog is full. Returns the number of frames delivered.
    fn poll_queue(
        &self,
        queue: &Queue,
        sink: &mut Sink<'_>,
        budget: usize,
    ) -> Result<usize, NetvscError> {
        let ring = queue.channel.ring();
        let batched = self.batch_open.get();
        if batched {
            // The batch's end stages, publishes and hands back for every poll of it.
            queue.deferred.set(true);
        } else if queue.acks.borrow().is_empty() && !ring.has_incoming()? {
            // Nothing new and nothing owed: every poll ends by publishing, so there is
            // nothing to publish either.
            return Ok(0);
        }
        let mut delivered = 0;
        // Outside a batch the completions owed go first; with no room even for them,
        // reading more would only add to them (the host signals when it consumed some).
        let owed_staged = if batched {
            Ok(true)
        } else {
            self.flush_acks(queue)
        };
        let read = match owed_staged {
            Ok(true) => self.read_queue(queue, sink, budget, &mut delivered),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        let finished = if batched {
            Ok(())
        } else {
            self.flush_acks(queue)
                .and_then(|_| self.finish_batch(queue))
        };
        if self.sections_freed.replace(false) {
            self.bump();
        }
        read?;
        finished?;
        Ok(delivered)
    }

    /// Reads packets of `queue`, starting with `batch` (see [`Self::poll_queue`]).
    fn read_queue(
        &self,
        queue: &Queue,
        sink: &mut Sink<'_>,
        budget: usize,
        delivered: &mut usize,
    ) -> Result<(), NetvscError> {
        let ring = queue.channel.ring();
        let mut scratch = self.packet_scratch.borrow_mut();
        // Enough ring bytes for the frames the budget allows and the completions around
        // them (a receive indication is 72 bytes, a send completion 56).
        let window = budget.saturating_mul(RING_BYTES_PER_FRAME).min(READ_WINDOW);
        if !self.may_read_on(queue, sink, *delivered, budget)? {
            return Ok(());
        }
        for _ in 0..SNAPSHOTS_PER_POLL {
            let mut batch = ring.begin_read_windowed(&mut scratch, window)?;
            if batch.is_empty() {
                return Ok(());
            }
            loop {
                let raw = match batch.next_raw(MAX_RING_PACKET) {
                    Ok(Some(RawIncoming::Packet(raw))) => raw,
                    Ok(Some(RawIncoming::TooLong(n))) => {
                        self.malformed(format_args!("{n}-byte ring packet"));
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(
                            "netvsc {}: queue {} ring failed: {e:?}",
                            self.id, queue.index
                        );
                        return Err(e.into());
                    }
                };
                if let Some((trans_id, payload)) = raw.completion() {
                    // Most of what a sending queue reads.
                    self.on_completion(queue, trans_id, payload);
                    continue;
                }
                match raw.parse() {
                    Ok(packet) => {
                        let trans_id = packet.descriptor.trans_id.get();
                        match packet.kind {
                            PacketKind::Completion => {
                                self.on_completion(queue, trans_id, packet.payload)
                            }
                            PacketKind::InBand => self.on_inband(packet.payload),
                            PacketKind::TransferPages { header, ranges } => {
                                *delivered += self.on_receive(
                                    queue,
                                    trans_id,
                                    header,
                                    ranges,
                                    packet.payload,
                                    sink,
                                );
                                // Only receive indications use up what reading needs.
                                if !self.may_read_on(queue, sink, *delivered, budget)? {
                                    return Ok(());
                                }
                            }
                            PacketKind::GpaDirect { .. } => {
                                self.malformed(format_args!("GPA-direct packet from the host"))
                            }
                        }
                    }
                    Err(e) => self.malformed(format_args!("ring packet: {e:?}")),
                }
            }
        }
        Ok(())
    }

    /// Whether another packet may be read: the budget is not spent, the backlog has room
    /// for a message if the frames go there (draining reads on regardless), and the ring
    /// has room for the completions gathered (reading more would only add to them).
    #[inline]
    fn may_read_on(
        &self,
        queue: &Queue,
        sink: &Sink<'_>,
        delivered: usize,
        budget: usize,
    ) -> Result<bool, NetvscError> {
        if delivered >= budget {
            return Ok(false);
        }
        if sink.full() {
            return Ok(false);
        }
        self.room_for_acks(queue)
    }

    /// Whether the completions gathered on `queue` leave room for another packet's: at
    /// [`ACK_BATCH`] they are staged; `false` if the ring cannot take them (reading more
    /// would only add to them).
    fn room_for_acks(&self, queue: &Queue) -> Result<bool, NetvscError> {
        if queue.acks.borrow().len() < ACK_BATCH {
            return Ok(true);
        }
        self.flush_acks(queue)
    }

    /// Publishes the completions staged on `queue` and hands the space read back to the
    /// host, with one signal if either asks for it.
    fn finish_batch(&self, queue: &Queue) -> Result<(), NetvscError> {
        let ring = queue.channel.ring();
        let published = ring.publish();
        let consumed = ring.read_done();
        if published.as_ref().is_ok_and(|w| w.signal) || consumed.as_ref().is_ok_and(|s| *s) {
            queue.channel.signal_host();
        }
        published.map(|_| ())?;
        consumed.map(|_| ())?;
        Ok(())
    }

    /// [`Nic::receive`] beyond its one-frame fast path: the backlog first, then the
    /// rings (read ahead inside a batch).
    #[inline(never)]
    fn receive_slow(&self, budget: usize, deliver: &mut dyn FnMut(&[u8])) -> usize {
        // A receive from inside `deliver` (the receive path is running) gets nothing.
        if self.removed.get() || self.packet_scratch.try_borrow_mut().is_err() {
            return 0;
        }
        // Held while `deliver` runs: a send from inside it does not stash (see
        // `reap_completions`).
        let Ok(mut backlog) = self.backlog.try_borrow_mut() else {
            return 0;
        };
        let delivered = Self::serve_backlog(&mut backlog, budget, deliver);
        if delivered >= budget || self.paused.get() {
            return delivered;
        }
        let left = budget - delivered;
        if self.batch_open.get() && left < READ_AHEAD {
            // A batch takes frames one or a few at a time: one pass over the rings reads
            // ahead for all of its calls (and those of the next batches).
            self.poll_round(&mut Sink::Ahead(&mut backlog), BACKLOG_FRAMES, READ_AHEAD);
            return delivered + Self::serve_backlog(&mut backlog, left, deliver);
        }
        delivered + self.poll_round(&mut Sink::Deliver(deliver), left, left)
    }

    /// Hands up to `budget` frames of `backlog` to `deliver`; returns how many.
    fn serve_backlog(
        backlog: &mut Backlog,
        budget: usize,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> usize {
        let mut delivered = 0;
        while delivered < budget && backlog.take(&mut *deliver) {
            delivered += 1;
        }
        delivered
    }

    /// One pass over the queues, round robin from a different queue each time, taking
    /// up to `budget` frames to `sink`, at most `per_queue` from each. Returns how many
    /// were taken.
    fn poll_round(&self, sink: &mut Sink<'_>, budget: usize, per_queue: usize) -> usize {
        let count = self.queues.borrow().len();
        if count == 0 {
            return 0;
        }
        let start = self.rx_cursor.get() % count;
        self.rx_cursor.set(start + 1);
        let mut taken = 0;
        for i in 0..count {
            if taken >= budget {
                break;
            }
            // A queue detached meanwhile just ends the round early.
            let Some(q) = self.queues.borrow().get((start + i) % count).cloned() else {
                break;
            };
            match self.poll_queue(&q, sink, per_queue.min(budget - taken)) {
                Ok(n) => taken += n,
                Err(e) => debug!("netvsc {}: queue {} poll: {e}", self.id, q.index),
            }
        }
        taken
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
        let Ok(mut backlog) = self.backlog.try_borrow_mut() else {
            return;
        };
        for queue in self.open_queue_list() {
            if let Err(e) = self.poll_queue(&queue, &mut Sink::Stash(&mut backlog), usize::MAX) {
                debug!("netvsc {}: queue {} reap: {e}", self.id, queue.index);
            }
        }
    }

    /// Stages the receive completions gathered on `queue`; returns whether all went (if
    /// not, the rest stay for the next poll, and what was staged is published so that
    /// the host can make room).
    fn flush_acks(&self, queue: &Queue) -> Result<bool, NetvscError> {
        let mut acks = queue.acks.borrow_mut();
        if acks.is_empty() {
            return Ok(true);
        }
        let ring = queue.channel.ring();
        let staged = match &queue.completion {
            Some(template) => match ring.stage_prepared_batch(template, &acks) {
                Ok(n) => n,
                Err(RingError::Full { .. }) => 0,
                Err(e) => return Err(e.into()),
            },
            None => {
                let mut n = 0;
                for &trans_id in acks.iter() {
                    if !self.stage_completion(queue, trans_id, NvspStatus::SUCCESS)? {
                        break;
                    }
                    n += 1;
                }
                n
            }
        };
        acks.drain(..staged);
        if acks.is_empty() {
            return Ok(true);
        }
        if ring.publish()?.signal {
            queue.channel.signal_host();
        }
        Ok(false)
    }

    /// Stages one receive completion with `status`; `Ok(false)` if the ring is full.
    fn stage_completion(
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
            .stage(&OutgoingPacket::completion(trans_id, &[&bytes[..len]]))
        {
            Ok(()) => Ok(true),
            Err(RingError::Full { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    #[inline(always)]
    fn on_completion(&self, queue: &Queue, trans_id: u64, payload: &[u8]) {
        if trans_id & TX_TAG != 0 && trans_id & CONTROL_TAG == 0 {
            let section = (trans_id & 0xffff_ffff) as u32;
            let status = match parse_fixed::<SendRndisPacketComplete>(
                payload,
                NvspMessageType::SEND_RNDIS_PKT_COMPLETE,
            ) {
                Ok(c) => c.status.get(),
                Err(_) => return self.malformed(format_args!("send completion {trans_id:#x}")),
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
                add(&queue.stats.tx_errors, 1);
            }
            // Waiters are told once, at the end of the poll.
            self.sections_freed.set(true);
        } else if let Some(p) = self.control.borrow().get(&trans_id) {
            *p.reply.borrow_mut() = Some(payload.to_vec());
        } else {
            self.malformed(format_args!(
                "completion for unknown transaction {trans_id:#x}"
            ));
        }
    }

    fn on_inband(&self, payload: &[u8]) {
        match NvspMessage::parse(payload, hvnet_wire::nvsp::Sender::Host) {
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
                for (slot, entry) in self.send_table.iter().zip(t) {
                    slot.set(entry);
                }
                self.count(|c| c.send_tables += 1);
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
    #[inline]
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
            match parse_fixed::<SendRndisPacket>(payload, NvspMessageType::SEND_RNDIS_PKT) {
                Ok(_) => {
                    for range in ranges {
                        delivered += self.on_rndis_range(queue, range, sink);
                    }
                    NvspStatus::SUCCESS
                }
                Err(_) => {
                    self.malformed(format_args!("transfer-page packet without SEND_RNDIS_PKT"));
                    NvspStatus::FAIL
                }
            }
        };
        // The host keeps the slots busy until it gets this completion, whatever we
        // thought of the contents. Successes are staged together at the end of the poll.
        let queued = status == NvspStatus::SUCCESS
            || match self.stage_completion(queue, trans_id, status) {
                Ok(staged) => !staged,
                Err(e) => {
                    warn!("netvsc {}: receive completion failed: {e}", self.id);
                    false
                }
            };
        if queued {
            queue.acks.borrow_mut().push(trans_id);
        }
        delivered
    }

    /// One range of a receive indication: the RNDIS message is copied out of the receive
    /// buffer (into the backlog's arena if the frame is to wait there, else into
    /// scratch), checked, and its frame handed to `sink`. Returns 1 for a frame
    /// delivered or held, else 0.
    #[inline]
    fn on_rndis_range(
        &self,
        queue: &Queue,
        range: &VmTransferPageRange,
        sink: &mut Sink<'_>,
    ) -> usize {
        let offset = range.byte_offset.get() as usize;
        let len = range.byte_count.get() as usize;
        if let Some(backlog) = sink.backlog() {
            if let Some(room) = backlog.reserve(len) {
                let Some(frame) = self.take_message(queue, offset, room) else {
                    return 0;
                };
                let frame_len = frame.len() as u64;
                if backlog.commit(len, frame) {
                    // Counted as received once off the ring, as a delivered frame is.
                    add(&queue.stats.rx_packets, 1);
                    add(&queue.stats.rx_bytes, frame_len);
                    return 1;
                }
                add(&queue.stats.rx_dropped, 1);
                return 0;
            }
        }
        let mut scratch = self.rx_scratch.borrow_mut();
        let Some(room) = scratch.get_mut(..len) else {
            add(&queue.stats.rx_dropped, 1);
            self.malformed(format_args!("receive range {offset:#x}+{len:#x}"));
            return 0;
        };
        let Some(frame) = self.take_message(queue, offset, room) else {
            return 0;
        };
        let frame = &room[frame];
        match sink {
            Sink::Deliver(d) => {
                d(frame);
                add(&queue.stats.rx_packets, 1);
                add(&queue.stats.rx_bytes, frame.len() as u64);
                1
            }
            // Held frames went to the arena above; here it had no room.
            _ => {
                add(&queue.stats.rx_dropped, 1);
                0
            }
        }
    }

    /// Copies the RNDIS message at `offset` of the receive buffer into `message` (private
    /// memory of the range's length) and handles it: a data frame's place in `message`
    /// is returned (its VLAN tag put back); control messages are processed here.
    #[inline]
    fn take_message(
        &self,
        queue: &Queue,
        offset: usize,
        message: &mut [u8],
    ) -> Option<core::ops::Range<usize>> {
        let len = message.len();
        let copied = match self.recv.borrow().as_ref() {
            Some(r) if offset.checked_add(len).is_some_and(|end| end <= r.limit) => {
                r.buf.read(offset, message).is_ok()
            }
            _ => false,
        };
        if !copied {
            add(&queue.stats.rx_dropped, 1);
            self.malformed(format_args!("receive range {offset:#x}+{len:#x}"));
            return None;
        }
        match PacketView::parse(message) {
            Ok(Some(view)) => self.on_frame(queue, message, view),
            Ok(None) => {
                self.on_control_message(queue, message);
                None
            }
            Err(e) => {
                add(&queue.stats.rx_dropped, 1);
                self.malformed(format_args!("RNDIS message: {e:?}"));
                None
            }
        }
    }

    /// A received data frame (`view` checked against `message`, private memory): the VLAN
    /// tag goes back into the frame. Returns where the frame is in `message`.
    #[inline]
    fn on_frame(
        &self,
        queue: &Queue,
        message: &mut [u8],
        view: PacketView,
    ) -> Option<core::ops::Range<usize>> {
        if self.removed.get() || view.data_len < ETH_HEADER {
            add(&queue.stats.rx_dropped, 1);
            return None;
        }
        let end = view.data_start + view.data_len;
        let start = match view.vlan {
            None => view.data_start,
            Some(tag) => match insert_vlan_tag(message, view.data_start, tag) {
                Some(start) => {
                    self.count(|c| c.vlan_rx += 1);
                    start
                }
                None => {
                    add(&queue.stats.rx_dropped, 1);
                    self.malformed(format_args!("VLAN frame at {}", view.data_start));
                    return None;
                }
            },
        };
        if start > end || end > message.len() {
            add(&queue.stats.rx_dropped, 1);
            return None;
        }
        Some(start..end)
    }

    /// A received RNDIS message that is not a data frame.
    fn on_control_message(&self, queue: &Queue, bytes: &[u8]) {
        match RndisMessage::parse(bytes) {
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
                add(&queue.stats.rx_dropped, 1);
                self.malformed(format_args!("RNDIS message: {e:?}"));
            }
        }
    }

    fn on_status(&self, status: RndisStatus) {
        let up = match status {
            RndisStatus::MEDIA_CONNECT => true,
            RndisStatus::MEDIA_DISCONNECT => false,
            other => return debug!("netvsc {}: RNDIS status {:#x} ignored", self.id, other.0),
        };
        self.count(|c| c.link_changes += 1);
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

    /// Takes a free send section on queue `queue` and copies `message` into it, reaping
    /// completions once if no section is free; returns the section.
    #[inline(always)]
    fn fill_section(&self, queue: u16, message: &[u8]) -> Result<u32, NicError> {
        match self.try_fill_section(queue, message) {
            Err(NicError::Busy) => self.fill_section_after_reaping(queue, message),
            done => done,
        }
    }

    /// Copies `message` into a free send section taken for `queue`; `Busy` if none is free.
    #[inline(always)]
    fn try_fill_section(&self, queue: u16, message: &[u8]) -> Result<u32, NicError> {
        let mut guard = self.send.borrow_mut();
        let send = guard.as_mut().ok_or(NicError::Removed)?;
        if message.len() > send.section_size {
            return Err(NicError::TooLong);
        }
        let section = send.sections.take(queue).ok_or(NicError::Busy)?;
        let offset = section as usize * send.section_size;
        if send.buf.write(offset, message).is_err() {
            send.sections.give_back(section, queue);
            return Err(NicError::Removed);
        }
        Ok(section)
    }

    /// [`Self::fill_section`] once the send buffer was full: sends held back by an open
    /// batch are written (they cannot complete otherwise), completions are reaped, and
    /// the copy is tried once more.
    #[cold]
    #[inline(never)]
    fn fill_section_after_reaping(&self, queue: u16, message: &[u8]) -> Result<u32, NicError> {
        self.publish_held_sends();
        self.reap_completions();
        self.try_fill_section(queue, message)
    }

    /// Sends SEND_RNDIS_PKT for send section `section` holding `size` bytes on `queue`.
    /// Inside an open batch the send is only held (its transaction id and section) and
    /// written with the others at the batch's end, or once [`UNPUBLISHED_SENDS_MAX`] wait:
    /// one copy into the ring for all of them. Ring room for every held send is checked
    /// here, so that a send accepted now is not refused later. Outside a batch it is
    /// written and published at once, after any still held (sends keep their order).
    #[inline(always)]
    fn write_send(
        &self,
        queue: &Queue,
        prepared: &PreparedPacket,
        trans_id: u64,
        where_: u64,
    ) -> Result<hvnet_vmbus::ring::WriteResult, RingError> {
        if !self.batch_open.get() {
            return self.write_send_now(queue, prepared, trans_id, where_);
        }
        let ring_len = prepared.ring_len();
        let held = queue.held_sends.borrow().len();
        if !queue.channel.ring().outgoing_room((held + 1) * ring_len)? {
            self.make_room_for_send(queue, ring_len)?;
        }
        let mut held = queue.held_sends.borrow_mut();
        held.push((trans_id, where_));
        let enough = held.len() >= UNPUBLISHED_SENDS_MAX;
        drop(held);
        queue.deferred.set(true);
        if enough {
            self.write_held_sends(queue)?;
        }
        Ok(hvnet_vmbus::ring::WriteResult { signal: false })
    }

    /// [`Self::write_send`] when the ring may not hold one more send besides those held:
    /// what is held is written (the host can start on it), then the send needs only its
    /// own room; `Full` if even that is missing.
    #[inline(never)]
    fn make_room_for_send(&self, queue: &Queue, ring_len: usize) -> Result<(), RingError> {
        self.write_held_sends(queue)?;
        if queue.channel.ring().outgoing_room(ring_len)? {
            Ok(())
        } else {
            Err(RingError::Full { needed: ring_len })
        }
    }

    /// [`Self::write_send`] outside a batch.
    #[inline(never)]
    fn write_send_now(
        &self,
        queue: &Queue,
        prepared: &PreparedPacket,
        trans_id: u64,
        where_: u64,
    ) -> Result<hvnet_vmbus::ring::WriteResult, RingError> {
        if !self.write_held_sends(queue)? {
            return Err(RingError::Full {
                needed: prepared.ring_len(),
            });
        }
        let mut packet = *prepared;
        packet.set_trans_id(trans_id);
        packet.payload_mut()[8..16].copy_from_slice(&where_.to_le_bytes());
        queue.channel.ring().try_write_prepared(&mut packet)
    }

    /// Writes the sends held on `queue` into its ring (as many as fit, in order) and
    /// publishes them with one signal at most. Returns whether none is left held; those
    /// left (ring full) go with the next batch end, and the host is asked to signal when
    /// there is room.
    fn write_held_sends(&self, queue: &Queue) -> Result<bool, RingError> {
        let mut held = queue.held_sends.borrow_mut();
        // Sends are held only on queues with a prepared SEND_RNDIS_PKT.
        let (false, Some(template)) = (held.is_empty(), &queue.send) else {
            return Ok(true);
        };
        let ring = queue.channel.ring();
        // SEND_RNDIS_PKT: section index and used size at 8..16 of the payload.
        let at = template.payload_offset() + 8;
        let written = ring.stage_prepared_with(template, &held, |packet, &(trans_id, where_)| {
            packet[8..16].copy_from_slice(&trans_id.to_le_bytes());
            packet[at..at + 8].copy_from_slice(&where_.to_le_bytes());
        });
        let written = match written {
            Ok(n) => n,
            Err(RingError::Full { .. }) => 0,
            Err(e) => return Err(e),
        };
        held.drain(..written);
        let all = held.is_empty();
        drop(held);
        if ring.publish()?.signal {
            queue.channel.signal_host();
        }
        if !all {
            queue.deferred.set(true);
            let _ = ring.set_pending_send_size(template.ring_len());
        }
        Ok(all)
    }

    /// Writes the sends held on every queue (the send buffer ran out inside a batch: the
    /// host can complete them while the batch goes on).
    fn publish_held_sends(&self) {
        for queue in self.queues.borrow().iter() {
            if let Err(e) = self.write_held_sends(queue) {
                debug!("netvsc {}: queue {} send: {e:?}", self.id, queue.index);
            }
        }
    }

    /// Ends the open batch, if any: every queue a poll or a send of it touched writes its
    /// held sends, stages its completions, publishes, and hands the read space back, with
    /// one signal.
    fn finish_deferred(&self) {
        self.batch_open.set(false);
        let queues = self.queues.borrow();
        for queue in queues.iter().filter(|q| q.deferred.replace(false)) {
            let done = self
                .write_held_sends(queue)
                .map_err(NetvscError::from)
                .and_then(|_| self.flush_acks(queue))
                .and_then(|_| self.finish_batch(queue));
            if let Err(e) = done {
                debug!("netvsc {}: queue {} batch end: {e}", self.id, queue.index);
            }
        }
    }

    fn give_back(&self, section: u32, queue: u16) {
        if let Some(s) = self.send.borrow_mut().as_mut() {
            s.sections.give_back(section, queue);
        }
    }

    /// Copies one RNDIS message into a free send section and sends it on `queue`; the
    /// section comes back with the host's completion.
    #[inline(always)]
    fn send_section(
        &self,
        queue: &Queue,
        channel_type: u32,
        message: &[u8],
    ) -> Result<(), NicError> {
        let queue_index = queue.index;
        let section = self.fill_section(queue_index, message)?;
        let ring = queue.channel.ring();
        let trans_id = TX_TAG | u64::from(section);
        // `fill_section` bounded the message by the section size, a u32.
        let size = message.len() as u32;
        let written = match &queue.send {
            Some(prepared) if channel_type == NVSP_CHANNEL_TYPE_DATA => {
                // SEND_RNDIS_PKT: section index at 8, its used size at 12.
                let where_ = u64::from(section) | u64::from(size) << 32;
                self.write_send(queue, prepared, trans_id, where_)
            }
            _ => {
                let msg = NvspMessage::SendRndisPacket(SendRndisPacket {
                    channel_type: channel_type.into(),
                    send_buf_section_index: section.into(),
                    send_buf_section_size: size.into(),
                });
                match msg.encode() {
                    Ok(bytes) => {
                        ring.try_write(&OutgoingPacket::inband(trans_id, true, &[bytes.as_bytes()]))
                    }
                    Err(_) => {
                        self.give_back(section, queue_index);
                        return Err(NicError::TooLong);
                    }
                }
            }
        };
        match written {
            Ok(w) => {
                if w.signal {
                    queue.channel.signal_host();
                }
                Ok(())
            }
            Err(RingError::Full { needed }) => {
                self.give_back(section, queue_index);
                // Ask the host to signal once the packet fits.
                let _ = ring.set_pending_send_size(needed);
                Err(NicError::Busy)
            }
            Err(e) => {
                self.give_back(section, queue_index);
                warn!("netvsc {}: queue {queue_index} send failed: {e:?}", self.id);
                add(&queue.stats.tx_errors, 1);
                Err(NicError::Removed)
            }
        }
    }

    /// Sends a data frame's RNDIS `message` on the queue the host's send table gives
    /// its flow (`frame`, inside the message); the primary if that queue is not open.
    /// `len` is the frame as the network side wrote it (with its tag, if any).
    #[inline(always)]
    fn send_frame(
        &self,
        message: &[u8],
        frame: &[u8],
        tagged: bool,
        len: usize,
    ) -> Result<(), NicError> {
        let queues = self.queues.borrow();
        // One queue: every flow goes there, no need to hash.
        let entry = match queues.len() {
            0 | 1 => 0,
            _ => flow_hash(frame).map_or(0, |hash| {
                self.send_table[hash as usize % VRSS_SEND_TAB_SIZE].get()
            }),
        };
        let index = u16::try_from(entry).unwrap_or(0);
        // Queues are sorted by index and usually dense: look where it would be first.
        let queue = match queues.get(usize::from(index)) {
            Some(q) if q.index == index => q,
            _ => queues
                .iter()
                .find(|q| q.index == index)
                .or_else(|| queues.first().filter(|q| q.index == 0))
                .ok_or(NicError::Removed)?,
        };
        let result = self.send_section(queue, NVSP_CHANNEL_TYPE_DATA, message);
        match result {
            Ok(()) => {
                add(&queue.stats.tx_packets, 1);
                add(&queue.stats.tx_bytes, len as u64);
                if tagged {
                    self.count(|c| c.vlan_tx += 1);
                }
            }
            Err(NicError::Busy) => add(&queue.stats.tx_busy, 1),
            Err(_) => {}
        }
        result
    }
}

/// Puts an 802.1Q tag with `tag`'s TCI into the frame at `start` of `message` (private
/// memory), moving the two MAC addresses 4 bytes to the front. Returns where the tagged
/// frame starts, or `None` if there is no room in front or the frame has no MACs.
fn insert_vlan_tag(message: &mut [u8], start: usize, tag: Ndis8021qInfo) -> Option<usize> {
    let new_start = start.checked_sub(VLAN_TAG)?;
    if message.len() < start + 12 {
        return None;
    }
    message.copy_within(start..start + 12, new_start);
    let tci = tag.tci().to_be_bytes();
    message[new_start + 12..new_start + 16].copy_from_slice(&[
        ETHERTYPE_VLAN[0],
        ETHERTYPE_VLAN[1],
        tci[0],
        tci[1],
    ]);
    Some(new_start)
}

/// Builds the RNDIS PACKET message around the frame of `len` bytes that the network side
/// wrote at [`TX_FRAME_AT`] of `staged`. A tagged frame (TPID 0x8100 and a full tag) has
/// its tag moved into a VLAN PPI. Returns the message's byte range in `staged` and the
/// frame's (as sent).
fn frame_tx_message(
    staged: &mut [u8],
    len: usize,
) -> (core::ops::Range<usize>, core::ops::Range<usize>, bool) {
    let end = TX_FRAME_AT + len;
    let tagged = len >= ETH_HEADER + VLAN_TAG
        && staged[TX_FRAME_AT + 12..TX_FRAME_AT + 14] == ETHERTYPE_VLAN;
    if !tagged {
        let start = TX_FRAME_AT - TX_HEADER;
        write_packet_header(&mut staged[start..TX_FRAME_AT], len, 0);
        return (start..end, TX_FRAME_AT..end, false);
    }
    let tci = u16::from_be_bytes([staged[TX_FRAME_AT + 14], staged[TX_FRAME_AT + 15]]);
    // The MACs move over the tag; the PPI goes in front of them.
    staged.copy_within(TX_FRAME_AT..TX_FRAME_AT + 12, TX_FRAME_AT + VLAN_TAG);
    let ppi = PerPacketInfo {
        size: (VLAN_PPI as u32).into(),
        type_word: PpiType::IEEE_8021Q_INFO.0.into(),
        ppi_offset: (PPI_HEADER_SIZE as u32).into(),
    };
    staged[TX_HEADER..TX_HEADER + PPI_HEADER_SIZE].copy_from_slice(ppi.as_bytes());
    staged[TX_HEADER + PPI_HEADER_SIZE..TX_HEADER + VLAN_PPI]
        .copy_from_slice(&Ndis8021qInfo::from_tci(tci).0.to_le_bytes());
    write_packet_header(&mut staged[..TX_HEADER], len - VLAN_TAG, VLAN_PPI);
    (0..end, TX_HEADER + VLAN_PPI..end, true)
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
        // Inside a batch the network side takes one frame per call, and most find it
        // read ahead: kept to this small path.
        if budget == 1 && !self.removed.get() {
            if let Ok(mut backlog) = self.backlog.try_borrow_mut() {
                if backlog.take(&mut *deliver) {
                    return 1;
                }
            }
        }
        self.receive_slow(budget, deliver)
    }

    fn transmit(&self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Result<(), NicError> {
        if self.removed.get() {
            return Err(NicError::Removed);
        }
        if self.paused.get() {
            return Err(NicError::Busy);
        }
        if !self.link.get() {
            return Err(NicError::LinkDown);
        }
        // A VLAN tag may ride in the frame, hence + 4 (checked again once it is known).
        let mtu = self.mtu.get();
        if len < ETH_HEADER || len > mtu + ETH_HEADER + VLAN_TAG {
            return Err(NicError::TooLong);
        }
        // The queue depends on the flow, which only the filled frame tells; so the
        // message is built in private memory first, then copied into a send section.
        let total = TX_FRAME_AT + len;
        let mut staged = self.tx_scratch.borrow_mut();
        if staged.len() < total {
            staged.resize(total, 0);
        }
        fill(&mut staged[TX_FRAME_AT..total]);
        let (message, frame, tagged) = frame_tx_message(&mut staged[..total], len);
        if frame.len() > mtu + ETH_HEADER {
            return Err(NicError::TooLong);
        }
        self.send_frame(&staged[message], &staged[frame], tagged, len)
    }

    fn can_transmit(&self) -> bool {
        if self.removed.get() || self.paused.get() || !self.link.get() {
            return false;
        }
        if self.free_send_sections() == 0 {
            self.reap_completions();
        }
        self.free_send_sections() > 0
    }

    fn begin_batch(&self) {
        self.batch_open.set(true);
    }

    fn end_batch(&self) {
        self.finish_deferred();
    }

    fn changed(&self) -> NicFuture<'_> {
        alloc::boxed::Box::pin(async move {
            // Nothing held back may wait with the caller (a batch left open).
            self.finish_deferred();
            let seen = self.seen_generation.get();
            let queues = self.open_queue_list();
            let ready = self.removed.get()
                || self.generation.get() != seen
                || !self.backlog.borrow().is_empty()
                || (!self.paused.get()
                    && queues.iter().any(|q| {
                        !q.acks.borrow().is_empty()
                            || q.channel.ring().has_incoming().unwrap_or(false)
                    }));
            if !ready {
                let mut futures: Vec<BoxFuture<'_, ()>> = if self.paused.get() {
                    Vec::new()
                } else {
                    queues
                        .into_iter()
                        .map(|q| {
                            let ch = q.channel.clone();
                            alloc::boxed::Box::pin(async move {
                                let _ = ch.wait_signal().await;
                            }) as BoxFuture<'_, ()>
                        })
                        .collect()
                };
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
            .map_or_else(QueueStats::default, |q| q.stats.snapshot())
    }

    fn max_mtu(&self) -> usize {
        self.max_mtu.get()
    }

    fn set_mtu(&self, mtu: usize) -> MtuFuture<'_> {
        alloc::boxed::Box::pin(crate::driver::change_mtu(self, mtu))
    }
}

/// Writes the RNDIS PACKET header for a frame of `frame_len` bytes that follows
/// `ppi_len` bytes of per-packet info right behind it (`dst` is [`TX_HEADER`] bytes).
fn write_packet_header(dst: &mut [u8], frame_len: usize, ppi_len: usize) {
    // Frames are bounded by the MTU, so every length fits a u32.
    let body = size_of::<RndisPacket>() as u32;
    let ppi_offset = if ppi_len == 0 { 0 } else { body };
    let words: [hvnet_wire::U32; TX_HEADER / 4] = [
        RndisMessageType::PACKET.0.into(),
        ((TX_HEADER + ppi_len + frame_len) as u32).into(),
        (body + ppi_len as u32).into(),
        (frame_len as u32).into(),
        0.into(),
        0.into(),
        0.into(),
        ppi_offset.into(),
        (ppi_len as u32).into(),
        0.into(),
        0.into(),
    ];
    // One copy of the whole header.
    if let Some(dst) = dst.get_mut(..TX_HEADER) {
        dst.copy_from_slice(words.as_bytes());
    }
}

// The header above is `RndisHeader` then `RndisPacket`, word by word.
const _: () = assert!(TX_HEADER == size_of::<RndisHeader>() + size_of::<RndisPacket>());

#[cfg(test)]
mod tests {
    use super::*;
    use hvnet_wire::rndis::RndisMessage;

    #[test]
    fn tx_message_untagged_and_tagged() {
        let frame: Vec<u8> = (0..60u8).collect();
        let mut staged = vec![0u8; TX_FRAME_AT + frame.len()];
        staged[TX_FRAME_AT..].copy_from_slice(&frame);
        let (msg, f, tagged) = frame_tx_message(&mut staged, frame.len());
        assert!(!tagged);
        assert_eq!(&staged[f], &frame[..]);
        let RndisMessage::Packet(p) = RndisMessage::parse(&staged[msg]).unwrap() else {
            panic!()
        };
        assert_eq!(p.data, &frame[..]);
        assert_eq!(p.vlan(), None);

        // 802.1Q, VLAN 100, priority 5, DEI set.
        let mut tagged_frame = frame.clone();
        tagged_frame[12..16].copy_from_slice(&[0x81, 0x00, 0xb0, 0x64]);
        let mut staged = vec![0u8; TX_FRAME_AT + tagged_frame.len()];
        staged[TX_FRAME_AT..].copy_from_slice(&tagged_frame);
        let (msg, f, tagged) = frame_tx_message(&mut staged, tagged_frame.len());
        assert!(tagged);
        let mut untagged = tagged_frame[..12].to_vec();
        untagged.extend_from_slice(&tagged_frame[16..]);
        assert_eq!(&staged[f.clone()], &untagged[..]);
        let bytes = staged[msg].to_vec();
        let RndisMessage::Packet(p) = RndisMessage::parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(p.data, &untagged[..]);
        let v = p.vlan().unwrap();
        assert_eq!((v.vlan_id(), v.priority(), v.cfi()), (100, 5, true));

        // And back: the receive side puts the same tag into the same place.
        let view = PacketView::parse(&bytes).unwrap().unwrap();
        let mut rx = bytes.clone();
        let start = insert_vlan_tag(&mut rx, view.data_start, view.vlan.unwrap()).unwrap();
        assert_eq!(
            &rx[start..view.data_start + view.data_len],
            &tagged_frame[..]
        );
    }

    #[test]
    fn vlan_insertion_needs_room() {
        let mut m = [0u8; 20];
        assert_eq!(insert_vlan_tag(&mut m, 2, Ndis8021qInfo::new(1, 0)), None);
        assert_eq!(insert_vlan_tag(&mut m, 10, Ndis8021qInfo::new(1, 0)), None);
        assert_eq!(
            insert_vlan_tag(&mut m, 8, Ndis8021qInfo::new(1, 0)),
            Some(4)
        );
    }
}
