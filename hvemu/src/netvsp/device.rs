//! The netvsp state machine: one per device, shared by all of its channels.
//!
//! Calls come from [`super::Netvsp`]'s [`crate::DeviceBackend`] methods (with the ring of
//! the channel concerned) and from [`super::NetvspHandle`] (frames, link, faults,
//! injection). Work for a channel that cannot be done in the current call (a reply when
//! its ring is full, a frame for another queue, the send indirection table, which goes
//! to the primary) waits in that channel's queues until the next call for it.

use std::collections::{BTreeMap, VecDeque};

use hvnet_wire::nvsp::{
    encode_send_indirection_table, InitComplete, NvspMessage, NvspStatus, NvspVersion,
    ReceiveBufferCompleteMsg, ReceiveBufferSection, SendReceiveBuffer, SendReceiveBufferComplete,
    SendRndisPacket, SendRndisPacketComplete, SendSendBuffer, SendSendBufferComplete, Sender,
    SubchannelComplete, SubchannelRequest, NETVSC_INVALID_INDEX, NETVSC_RECEIVE_BUFFER_ID,
    NVSP_CHANNEL_TYPE_CONTROL, NVSP_CHANNEL_TYPE_DATA, NVSP_SUBCHANNEL_ALLOCATE, VRSS_CHANNEL_MAX,
    VRSS_SEND_TAB_SIZE,
};
use hvnet_wire::rndis::{
    encode_packet, Ndis8021qInfo, Ppi, PpiType, RndisMessage, NDIS_PACKET_TYPE_ALL_MULTICAST,
    NDIS_PACKET_TYPE_BROADCAST, NDIS_PACKET_TYPE_DIRECTED, NDIS_PACKET_TYPE_MULTICAST,
    NDIS_PACKET_TYPE_PROMISCUOUS, RNDIS_HEADER_SIZE,
};

use hvnet_wire::U32;
use zerocopy::FromBytes;

use super::buffers::{GuestBuf, SectionAllocator, SectionUse};
use super::nvsp;
use super::rndis::{self, ControlEnv, RndisState};
use super::{BufferInfo, NetvspConfig, NetvspState, NetvspStats, QueueStats, RxVerdict};
use crate::device::{ChannelCtx, HostActions};
use crate::ring::{HostRing, RingError, RingPacket, RingPacketKind};
use crate::rss;

/// Replies a channel may have waiting for ring space before the host stops reading the
/// guest's packets on it (back-pressure instead of unbounded memory).
const OUT_LIMIT: usize = 256;
/// RNDIS control replies a channel may have waiting for a receive section.
const CONTROL_LIMIT: usize = 256;
/// Largest RNDIS message read from GPA-direct ranges.
const MAX_GPA_DIRECT_BYTES: usize = 256 * 1024;
/// RNDIS messages processed from one send before the rest is refused.
const MAX_MESSAGES_PER_SEND: usize = 64;
/// Malformed-message descriptions kept for tests.
const ERROR_LOG: usize = 32;
/// Ethernet header length.
const ETH_HEADER: usize = 14;
/// One 802.1Q tag.
const VLAN_TAG: usize = 4;
/// `negotiated_protocol_ver` of INIT_COMPLETE for versions after 1 (OpenVMM: the field
/// is deprecated and only carries 2 for NVSP 1).
const NEGOTIATED_VERSION_DEPRECATED: u32 = 0xFFFF_FFFF;

#[derive(Debug)]
enum Outgoing {
    /// In-band packet without completion (the send table, injected messages).
    InBand { trans_id: u64, payload: Vec<u8> },
    /// Completion of a guest request.
    Completion { trans_id: u64, payload: Vec<u8> },
    /// Fault injection: a transfer-page packet whose range is not a section.
    BadXfer {
        trans_id: u64,
        offset: u32,
        len: u32,
    },
}

#[derive(Debug)]
enum RxItem {
    /// A frame for the guest (its 802.1Q tag, if any, taken out), with its RSS hash and
    /// the tag control word to indicate in a VLAN PPI.
    Frame {
        data: Vec<u8>,
        hash: Option<u32>,
        vlan: Option<u16>,
    },
    /// An encoded RNDIS control message (completion or indication).
    Control(Vec<u8>),
    /// Fault injection: bytes indicated as they are.
    Raw(Vec<u8>),
}

#[derive(Debug, Default)]
struct Queue {
    open: bool,
    out: VecDeque<Outgoing>,
    /// RNDIS control messages for the guest; indicated before frames, so a backlog of
    /// frames waiting for data sections never holds up a reply.
    ctrl: VecDeque<RxItem>,
    /// Frames for the guest.
    frames: VecDeque<RxItem>,
    stats: QueueStats,
}

impl Queue {
    fn requeue(&mut self, item: RxItem) {
        match item {
            RxItem::Frame { .. } => self.frames.push_front(item),
            _ => self.ctrl.push_front(item),
        }
    }
}

#[derive(Debug)]
struct RecvBuffer {
    gpadl: u32,
    id: u16,
    size: u64,
    section_size: u32,
    sections: SectionAllocator,
}

#[derive(Debug)]
struct SendBuffer {
    gpadl: u32,
    id: u16,
    size: u64,
    section_size: u32,
    count: u32,
}

#[derive(Debug, Default)]
struct Counters {
    malformed: u64,
    runt_drops: u64,
    oversize_drops: u64,
    link_down_drops: u64,
    not_ready_drops: u64,
    filtered_drops: u64,
    backlog_drops: u64,
    control_drops: u64,
    closed_drops: u64,
    from_guest_drops: u64,
    completions_dropped: u64,
    failed_rx_completions: u64,
    subchannel_requests: u64,
    indirection_tables_sent: u64,
    primary_opens: u64,
    rescinds_triggered: u64,
    vlan_rx: u64,
    vlan_tx: u64,
    vlan_drops: u64,
    errors: VecDeque<String>,
}

/// What one guest send carried.
#[derive(Clone, Copy, Debug, Default)]
struct SendSummary {
    data: usize,
    control: usize,
}

/// The device state (see the module docs).
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: NetvspConfig,
    version: Option<NvspVersion>,
    ndis_version: Option<(u32, u32)>,
    ndis_config: Option<(u32, u64)>,
    recv: Option<RecvBuffer>,
    send: Option<SendBuffer>,
    data_path: u32,
    rndis: RndisState,
    queues: BTreeMap<u16, Queue>,
    sub_requested: u32,
    sub_granted: u16,
    table_sent: bool,
    next_trans_id: u64,
    frames_queued: usize,
    from_guest: VecDeque<Vec<u8>>,
    held: Vec<(u16, u64, Vec<u8>)>,
    rx_frames_total: u64,
    rescinded: bool,
    counters: Counters,
}

impl Inner {
    pub(crate) fn new(config: NetvspConfig) -> Self {
        Inner {
            config,
            version: None,
            ndis_version: None,
            ndis_config: None,
            recv: None,
            send: None,
            data_path: 0,
            rndis: RndisState::default(),
            queues: BTreeMap::new(),
            sub_requested: 0,
            sub_granted: 0,
            table_sent: false,
            next_trans_id: 1,
            frames_queued: 0,
            from_guest: VecDeque::new(),
            held: Vec::new(),
            rx_frames_total: 0,
            rescinded: false,
            counters: Counters::default(),
        }
    }

    fn queue(&mut self, q: u16) -> &mut Queue {
        self.queues.entry(q).or_default()
    }

    fn is_open(&self, q: u16) -> bool {
        self.queues.get(&q).is_some_and(|x| x.open)
    }

    /// Records a protocol violation by the guest (or an impossible request).
    fn bad(&mut self, q: u16, what: impl Into<String>) {
        let what = what.into();
        log::debug!("netvsp: queue {q}: {what}");
        self.counters.malformed += 1;
        if self.counters.errors.len() == ERROR_LOG {
            self.counters.errors.pop_front();
        }
        self.counters.errors.push_back(format!("queue {q}: {what}"));
    }

    fn next_tid(&mut self) -> u64 {
        let t = self.next_trans_id;
        // Never 0: unsolicited messages use 0.
        self.next_trans_id = self.next_trans_id.checked_add(1).unwrap_or(1);
        t
    }

    fn encode(&self, msg: &NvspMessage<'_>) -> Vec<u8> {
        nvsp::encode(msg, self.version)
    }

    fn complete(&mut self, q: u16, trans_id: u64, msg: &NvspMessage<'_>) {
        let payload = self.encode(msg);
        self.queue(q)
            .out
            .push_back(Outgoing::Completion { trans_id, payload });
    }

    /// The IP MTU in effect: the one the guest asked for in SEND_NDIS_CONFIG (its frame
    /// MTU less the Ethernet header), at most the port's [`NetvspConfig::mtu`]; the
    /// port's without a usable NDIS config.
    pub(crate) fn mtu(&self) -> u32 {
        match self.ndis_config.map(|c| c.0) {
            Some(frame) if frame >= nvsp::MIN_FRAME_MTU => {
                (frame - ETH_HEADER as u32).min(self.config.mtu)
            }
            _ => self.config.mtu,
        }
    }

    /// Largest frame accepted in either direction: the MTU in effect plus the Ethernet
    /// header, and one 802.1Q tag if the frame carries one.
    fn max_frame(&self, frame: &[u8]) -> usize {
        let tag = if is_tagged(frame) { VLAN_TAG } else { 0 };
        self.mtu() as usize + ETH_HEADER + tag
    }

    fn env(&self) -> ControlEnv {
        ControlEnv {
            mac: self.config.mac,
            mtu: self.config.mtu,
            link_up: self.config.link_up,
            link_speed: self.config.link_speed,
            max_queues: self.config.max_queues.max(1),
            table_entries: self.config.indirection_table_entries,
            queues_available: u32::from(self.sub_granted) + 1,
        }
    }

    /// Forgets everything the guest negotiated (the primary channel opened or closed).
    /// Frames and replies still queued are dropped.
    fn reset_protocol(&mut self) {
        self.version = None;
        self.ndis_version = None;
        self.ndis_config = None;
        self.recv = None;
        self.send = None;
        self.data_path = 0;
        self.rndis = RndisState::default();
        self.sub_requested = 0;
        self.sub_granted = 0;
        self.table_sent = false;
        self.held.clear();
        let mut dropped = 0;
        for q in self.queues.values_mut() {
            dropped += q.frames.len();
            q.frames.clear();
            q.ctrl.clear();
            q.out.clear();
        }
        self.counters.closed_drops += dropped as u64;
        self.frames_queued = 0;
    }

    // -----------------------------------------------------------------------------------
    // Channel events.

    pub(crate) fn on_open(&mut self, ch: ChannelCtx) -> Result<(), u32> {
        let q = ch.sub_index;
        if usize::from(q) >= VRSS_CHANNEL_MAX {
            return Err(crate::STATUS_UNSUCCESSFUL);
        }
        if q == 0 {
            self.reset_protocol();
            self.counters.primary_opens += 1;
        }
        let queue = self.queue(q);
        queue.open = true;
        queue.out.clear();
        queue.ctrl.clear();
        let stale = queue.frames.len();
        queue.frames.clear();
        self.frames_queued = self.frames_queued.saturating_sub(stale);
        if q > 0 {
            self.maybe_send_table();
        }
        Ok(())
    }

    pub(crate) fn on_close(&mut self, ch: ChannelCtx) {
        let q = ch.sub_index;
        if q == 0 {
            self.reset_protocol();
            self.queue(0).open = false;
            return;
        }
        let queue = self.queue(q);
        queue.open = false;
        queue.out.clear();
        queue.ctrl.clear();
        let items: Vec<RxItem> = queue.frames.drain(..).collect();
        // Frames waiting for a closed sub-channel go to the primary instead.
        if self.is_open(0) {
            self.queue(0).frames.extend(items);
        } else {
            self.frames_queued = self.frames_queued.saturating_sub(items.len());
            self.counters.closed_drops += items.len() as u64;
        }
    }

    /// The guest signalled channel `ch` (or the test polled it): read what it wrote,
    /// then write what is waiting for it.
    pub(crate) fn run(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>) {
        let q = ch.sub_index;
        self.queue(q).open = true;
        self.read_incoming(q, ring, host);
        self.flush(q, ring, host);
    }

    fn read_incoming(&mut self, q: u16, ring: &mut HostRing, host: &mut HostActions<'_>) {
        loop {
            if self.queue(q).out.len() >= OUT_LIMIT {
                // The guest is not reading our replies; stop reading its requests.
                return;
            }
            match ring.read_packet() {
                Ok(Some(p)) => self.handle_packet(q, p, host),
                Ok(None) => return,
                Err(RingError::MalformedPacket(e)) => self.bad(q, format!("ring packet: {e}")),
                Err(e) => {
                    log::warn!("netvsp: queue {q}: cannot read the ring: {e}");
                    return;
                }
            }
        }
    }

    fn handle_packet(&mut self, q: u16, p: RingPacket, host: &mut HostActions<'_>) {
        match &p.kind {
            RingPacketKind::Completion => self.handle_rx_completion(q, &p),
            RingPacketKind::TransferPages { .. } => {
                self.bad(q, "transfer-page packet from the guest");
            }
            RingPacketKind::InBand | RingPacketKind::GpaDirect { .. } => {
                let payload = p.payload.clone();
                match NvspMessage::parse(&payload, Sender::Guest) {
                    Ok(msg) => self.handle_nvsp(q, &p, msg, host),
                    Err(e) => self.bad(q, format!("NVSP message: {e}")),
                }
            }
        }
    }

    fn handle_nvsp(
        &mut self,
        q: u16,
        p: &RingPacket,
        msg: NvspMessage<'_>,
        host: &mut HostActions<'_>,
    ) {
        let tid = p.trans_id;
        let is_gpa_direct = matches!(p.kind, RingPacketKind::GpaDirect { .. });
        if let NvspMessage::SendRndisPacket(m) = msg {
            self.handle_send_rndis(q, p, m, host);
            return;
        }
        if is_gpa_direct {
            self.bad(
                q,
                format!("{:?} in a GPA-direct packet", msg.message_type()),
            );
            return;
        }
        if q != 0 {
            self.bad(q, format!("{:?} on a sub-channel", msg.message_type()));
            return;
        }
        if self.version.is_none() && !matches!(msg, NvspMessage::Init(_)) {
            self.bad(q, format!("{:?} before INIT", msg.message_type()));
            return;
        }
        match msg {
            NvspMessage::Init(m) => {
                self.handle_init(tid, m.min_protocol_ver.get(), m.max_protocol_ver.get())
            }
            NvspMessage::SendNdisConfig(m) => {
                if self.version < Some(NvspVersion::PROTOCOL_VERSION_2) {
                    self.bad(0, "NDIS config below NVSP 2");
                } else if self.ndis_config.is_some() {
                    self.bad(0, "NDIS config sent twice");
                } else if self.recv.is_some() {
                    self.bad(0, "NDIS config after the receive buffer");
                } else {
                    self.ndis_config = Some((m.mtu.get(), m.capability.get()));
                }
            }
            NvspMessage::SendNdisVersion(m) => {
                if self.ndis_version.is_some() {
                    self.bad(0, "NDIS version sent twice");
                } else {
                    self.ndis_version = Some((m.ndis_major_ver.get(), m.ndis_minor_ver.get()));
                }
            }
            NvspMessage::SendReceiveBuffer(m) => self.handle_recv_buf(tid, m, host),
            NvspMessage::RevokeReceiveBuffer(m) => match &self.recv {
                Some(r) if r.id == m.id.get() => {
                    if r.sections.outstanding() > 0 {
                        self.bad(0, "receive buffer revoked with sections outstanding");
                    }
                    self.recv = None;
                }
                _ => self.bad(
                    0,
                    format!("revoke of unknown receive buffer {:#x}", m.id.get()),
                ),
            },
            NvspMessage::SendSendBuffer(m) => self.handle_send_buf(tid, m, host),
            NvspMessage::RevokeSendBuffer(_) => {
                if self.send.take().is_none() {
                    self.bad(0, "revoke of a send buffer that does not exist");
                }
            }
            NvspMessage::SubchannelRequest(m) => self.handle_subchannel(tid, m, host),
            NvspMessage::SwitchDataPath(m) => {
                if self.version < Some(NvspVersion::PROTOCOL_VERSION_4) {
                    self.bad(0, "SWITCH_DATA_PATH below NVSP 4");
                } else {
                    self.data_path = m.active_datapath.get();
                    if p.completion_requested {
                        self.complete(0, tid, &msg);
                    }
                }
            }
            other => self.bad(
                0,
                format!("{:?} is not a message a guest sends", other.message_type()),
            ),
        }
    }

    fn handle_init(&mut self, tid: u64, min: u32, max: u32) {
        if self.recv.is_some() || self.send.is_some() {
            self.bad(0, "INIT after buffers were established");
            let m = NvspMessage::InitComplete(InitComplete {
                negotiated_protocol_ver: 0.into(),
                max_mdl_chain_len: 0.into(),
                status: NvspStatus::FAIL.0.into(),
            });
            self.complete(0, tid, &m);
            return;
        }
        let reply = match nvsp::negotiate(min, max, self.config.max_nvsp_version) {
            Ok(v) => {
                self.version = Some(v);
                let negotiated = if v == NvspVersion::PROTOCOL_VERSION_1 {
                    v.0
                } else {
                    NEGOTIATED_VERSION_DEPRECATED
                };
                InitComplete {
                    negotiated_protocol_ver: negotiated.into(),
                    max_mdl_chain_len: nvsp::MAX_MDL_CHAIN_LEN.into(),
                    status: NvspStatus::SUCCESS.0.into(),
                }
            }
            Err(status) => {
                // A failed attempt; the guest tries its next version.
                self.version = None;
                InitComplete {
                    negotiated_protocol_ver: 0.into(),
                    max_mdl_chain_len: 0.into(),
                    status: status.0.into(),
                }
            }
        };
        self.complete(0, tid, &NvspMessage::InitComplete(reply));
    }

    fn handle_recv_buf(&mut self, tid: u64, m: SendReceiveBuffer, host: &HostActions<'_>) {
        let gpadl = m.gpadl_handle.get();
        let id = m.id.get();
        let result = if self.recv.is_some() {
            Err("receive buffer already established".to_string())
        } else if id != NETVSC_RECEIVE_BUFFER_ID {
            Err(format!("receive buffer id {id:#x}, not 0xCAFE"))
        } else {
            match host.gpadl(gpadl) {
                None => Err(format!("receive buffer GPADL {gpadl:#x} unknown")),
                Some(ranges) => {
                    let size = GuestBuf::new(ranges).len();
                    let section_size = self.config.recv_section_size.unwrap_or_else(|| {
                        nvsp::recv_section_size(nvsp::frame_mtu(self.ndis_config.map(|c| c.0)))
                    });
                    // Offsets travel as u32: only count sections whose end fits.
                    let limit = size.min(u64::from(u32::MAX));
                    let count =
                        u32::try_from(limit / u64::from(section_size.max(1))).unwrap_or(u32::MAX);
                    if section_size == 0 || count == 0 {
                        Err(format!(
                            "receive buffer of {size} bytes holds no {section_size}-byte section"
                        ))
                    } else {
                        Ok(RecvBuffer {
                            gpadl,
                            id,
                            size,
                            section_size,
                            sections: SectionAllocator::new(
                                count,
                                SectionAllocator::default_reserve(count),
                            ),
                        })
                    }
                }
            }
        };
        let (status, section) = match result {
            Ok(r) => {
                let s = ReceiveBufferSection {
                    offset: 0.into(),
                    sub_alloc_size: r.section_size.into(),
                    num_sub_allocs: r.sections.count().into(),
                    end_offset: (r.section_size * r.sections.count()).into(),
                };
                self.recv = Some(r);
                (NvspStatus::SUCCESS, Some(s))
            }
            Err(e) => {
                self.bad(0, e);
                (NvspStatus::FAIL, None)
            }
        };
        let sections: Vec<ReceiveBufferSection> = section.into_iter().collect();
        let msg = NvspMessage::SendReceiveBufferComplete(ReceiveBufferCompleteMsg {
            fixed: SendReceiveBufferComplete {
                status: status.0.into(),
                num_sections: (sections.len() as u32).into(),
            },
            sections: &sections,
        });
        self.complete(0, tid, &msg);
    }

    fn handle_send_buf(&mut self, tid: u64, m: SendSendBuffer, host: &HostActions<'_>) {
        let gpadl = m.gpadl_handle.get();
        let section_size = self.config.send_section_size.max(1);
        let result = if self.send.is_some() {
            Err("send buffer already established".to_string())
        } else {
            match host.gpadl(gpadl) {
                None => Err(format!("send buffer GPADL {gpadl:#x} unknown")),
                Some(ranges) => {
                    let size = GuestBuf::new(ranges).len();
                    let count = u32::try_from(size / u64::from(section_size)).unwrap_or(u32::MAX);
                    if count == 0 {
                        Err(format!(
                            "send buffer of {size} bytes is smaller than a section"
                        ))
                    } else {
                        Ok(SendBuffer {
                            gpadl,
                            id: m.id.get(),
                            size,
                            section_size,
                            count,
                        })
                    }
                }
            }
        };
        let status = match result {
            Ok(s) => {
                self.send = Some(s);
                NvspStatus::SUCCESS
            }
            Err(e) => {
                self.bad(0, e);
                NvspStatus::FAIL
            }
        };
        let msg = NvspMessage::SendSendBufferComplete(SendSendBufferComplete {
            status: status.0.into(),
            section_size: if status == NvspStatus::SUCCESS {
                section_size
            } else {
                0
            }
            .into(),
        });
        self.complete(0, tid, &msg);
    }

    fn handle_subchannel(&mut self, tid: u64, m: SubchannelRequest, host: &mut HostActions<'_>) {
        self.counters.subchannel_requests += 1;
        let reply = |status: NvspStatus, n: u16| {
            NvspMessage::SubchannelComplete(SubchannelComplete {
                status: status.0.into(),
                num_subchannels: u32::from(n).into(),
            })
        };
        if self.version < Some(NvspVersion::PROTOCOL_VERSION_5) {
            self.bad(0, "SUBCHANNEL below NVSP 5");
            self.complete(0, tid, &reply(NvspStatus::FAIL, 0));
            return;
        }
        if m.op.get() != NVSP_SUBCHANNEL_ALLOCATE {
            self.bad(0, format!("SUBCHANNEL operation {}", m.op.get()));
            self.complete(0, tid, &reply(NvspStatus::FAIL, 0));
            return;
        }
        let asked = m.num_subchannels.get();
        self.sub_requested = asked;
        let faults = self.config.faults;
        if faults.refuse_subchannels {
            self.complete(0, tid, &reply(NvspStatus::FAIL, 0));
            return;
        }
        let most = VRSS_CHANNEL_MAX as u32 - 1;
        let mut granted = asked.min(u32::from(self.config.max_queues.max(1)) - 1);
        if let Some(cap) = faults.max_subchannels {
            granted = granted.min(u32::from(cap));
        }
        let granted = (granted + u32::from(faults.extra_subchannels)).min(most) as u16;
        // The completion goes out before the offers (as on Hyper-V, a guest may see
        // either first).
        self.complete(0, tid, &reply(NvspStatus::SUCCESS, granted));
        self.sub_granted = granted;
        self.table_sent = false;
        if granted > 0 {
            host.offer_subchannels(granted);
        }
        self.maybe_send_table();
    }

    /// Queues SEND_INDIRECTION_TABLE on the primary once every granted sub-channel is
    /// open (OpenVMM's timing): 16 entries `i % queues`, offset 12, transaction id 0,
    /// 76 bytes. At that length a Linux guest below NVSP 6.1 cannot apply its "offset
    /// is wrong, read at 40" workaround (it needs >= 104 bytes), so it reads the table
    /// at the offset given, like every other guest.
    fn maybe_send_table(&mut self) {
        let n = self.sub_granted;
        if n == 0 || self.table_sent || self.config.faults.no_indirection_table {
            return;
        }
        if !(1..=n).all(|i| self.is_open(i)) || !self.is_open(0) {
            return;
        }
        let queues = u32::from(n) + 1;
        let mut table = [0u32; VRSS_SEND_TAB_SIZE];
        for (i, e) in table.iter_mut().enumerate() {
            *e = i as u32 % queues;
        }
        let mut buf = [0u8; 128];
        match encode_send_indirection_table(&mut buf, &table) {
            Ok(len) => {
                self.queue(0).out.push_back(Outgoing::InBand {
                    trans_id: 0,
                    payload: buf[..len].to_vec(),
                });
                self.table_sent = true;
                self.counters.indirection_tables_sent += 1;
            }
            Err(e) => log::error!("netvsp: cannot encode the send table: {e}"),
        }
    }

    // -----------------------------------------------------------------------------------
    // Guest sends (RNDIS inside NVSP 107).

    fn handle_send_rndis(
        &mut self,
        q: u16,
        p: &RingPacket,
        m: SendRndisPacket,
        host: &mut HostActions<'_>,
    ) {
        let (status, summary) = if self.version.is_none() {
            self.bad(q, "SEND_RNDIS_PKT before INIT");
            (NvspStatus::FAIL, SendSummary::default())
        } else {
            match self.read_send(p, m, host) {
                Ok(bytes) => self.process_rndis(q, m.channel_type.get(), &bytes),
                Err(e) => {
                    self.bad(q, e);
                    (NvspStatus::FAIL, SendSummary::default())
                }
            }
        };
        if !p.completion_requested {
            return;
        }
        let payload = self.encode(&NvspMessage::SendRndisPacketComplete(
            SendRndisPacketComplete {
                status: status.0.into(),
            },
        ));
        let data_send = summary.data > 0 && summary.control == 0;
        let faults = self.config.faults;
        if data_send && faults.drop_tx_completions {
            self.counters.completions_dropped += 1;
            return;
        }
        if data_send && faults.hold_tx_completions {
            self.held.push((q, p.trans_id, payload));
            return;
        }
        let queue = self.queue(q);
        queue.stats.tx_completions += 1;
        queue.out.push_back(Outgoing::Completion {
            trans_id: p.trans_id,
            payload,
        });
    }

    /// The bytes of a guest send: a send-buffer section (in-band packet) or the GPA
    /// ranges of a GPA-direct packet.
    fn read_send(
        &self,
        p: &RingPacket,
        m: SendRndisPacket,
        host: &HostActions<'_>,
    ) -> Result<Vec<u8>, String> {
        let index = m.send_buf_section_index.get();
        let size = m.send_buf_section_size.get();
        match &p.kind {
            RingPacketKind::GpaDirect { ranges } => {
                if index != NETVSC_INVALID_INDEX {
                    return Err(format!("GPA-direct send also names section {index}"));
                }
                GuestBuf::new(ranges)
                    .read_all(host.memory(), MAX_GPA_DIRECT_BYTES)
                    .map_err(|e| format!("GPA-direct send: {e}"))
            }
            RingPacketKind::InBand => {
                if index == NETVSC_INVALID_INDEX {
                    return Err("in-band send without a send section".into());
                }
                let sb = self
                    .send
                    .as_ref()
                    .ok_or("send section but no send buffer")?;
                if index >= sb.count {
                    return Err(format!("send section {index} of {}", sb.count));
                }
                if size == 0 || size > sb.section_size {
                    return Err(format!(
                        "send section size {size} (sections are {} bytes)",
                        sb.section_size
                    ));
                }
                let ranges = host
                    .gpadl(sb.gpadl)
                    .ok_or("send buffer GPADL was torn down")?;
                let mut v = vec![0u8; size as usize];
                let offset = u64::from(index) * u64::from(sb.section_size);
                GuestBuf::new(ranges)
                    .read(host.memory(), offset, &mut v)
                    .map_err(|e| format!("send buffer: {e}"))?;
                Ok(v)
            }
            _ => Err("SEND_RNDIS_PKT in a packet that carries no data".into()),
        }
    }

    /// Handles the RNDIS messages of one send, back to back (each `msg_len` includes its
    /// padding).
    fn process_rndis(
        &mut self,
        q: u16,
        channel_type: u32,
        bytes: &[u8],
    ) -> (NvspStatus, SendSummary) {
        let mut s = SendSummary::default();
        let mut rest = bytes;
        let mut status = NvspStatus::SUCCESS;
        while rest.len() >= RNDIS_HEADER_SIZE {
            if s.data + s.control == MAX_MESSAGES_PER_SEND {
                self.bad(q, "too many RNDIS messages in one send");
                status = NvspStatus::INVALID_RNDIS_PKT;
                break;
            }
            let (msg, len) = match RndisMessage::parse_with_len(rest) {
                Ok(v) => v,
                Err(e) => {
                    let n = s.data + s.control;
                    self.bad(q, format!("RNDIS message {n} of a send: {e}"));
                    status = NvspStatus::INVALID_RNDIS_PKT;
                    break;
                }
            };
            let expected = match msg {
                RndisMessage::Packet(_) => NVSP_CHANNEL_TYPE_DATA,
                _ => NVSP_CHANNEL_TYPE_CONTROL,
            };
            if channel_type != expected {
                self.bad(
                    q,
                    format!(
                        "RNDIS {:?} sent with channel type {channel_type}",
                        msg.message_type()
                    ),
                );
            }
            match msg {
                RndisMessage::Packet(pk) => {
                    s.data += 1;
                    match pk.ppis.find(PpiType::IEEE_8021Q_INFO) {
                        None => self.transmit(q, pk.data, None),
                        Some(data) => match U32::read_from_prefix(data) {
                            Ok((v, _)) => self.transmit(q, pk.data, Some(Ndis8021qInfo(v.get()))),
                            Err(_) => self.bad(
                                q,
                                format!("VLAN PPI of {} bytes in a guest send", data.len()),
                            ),
                        },
                    }
                }
                other => {
                    s.control += 1;
                    self.control(q, &other);
                }
            }
            rest = rest.get(len..).unwrap_or(&[]);
        }
        if s.data + s.control == 0 && status == NvspStatus::SUCCESS {
            self.bad(
                q,
                format!("send of {} bytes holds no RNDIS message", bytes.len()),
            );
            status = NvspStatus::INVALID_RNDIS_PKT;
        }
        if s.data > rndis::MAX_PACKETS_PER_MESSAGE as usize {
            // INITIALIZE_CMPLT told the guest the limit; the frames still go out.
            self.bad(
                q,
                format!(
                    "{} packets in one send; the host allows {}",
                    s.data,
                    rndis::MAX_PACKETS_PER_MESSAGE
                ),
            );
        }
        (status, s)
    }

    /// A frame the guest sent; a VLAN PPI puts its tag back into the frame handed on.
    fn transmit(&mut self, q: u16, frame: &[u8], vlan: Option<Ndis8021qInfo>) {
        if !self.rndis.initialized {
            self.bad(q, "RNDIS PACKET before INITIALIZE (or after HALT)");
            return;
        }
        if frame.len() < ETH_HEADER {
            self.bad(q, format!("transmitted runt of {} bytes", frame.len()));
            return;
        }
        if frame.len() > self.max_frame(frame) {
            self.bad(q, format!("transmitted frame of {} bytes", frame.len()));
            return;
        }
        if let (Some(tag), Some(port)) = (vlan, self.config.port_vlan) {
            if tag.vlan_id() != port & 0xFFF {
                self.counters.vlan_drops += 1;
                log::debug!(
                    "netvsp: queue {q}: frame for VLAN {} on port VLAN {port} dropped",
                    tag.vlan_id()
                );
                return;
            }
        }
        let queue = self.queue(q);
        queue.stats.tx_frames += 1;
        queue.stats.tx_bytes += frame.len() as u64;
        if self.from_guest.len() >= self.config.from_guest_limit {
            self.counters.from_guest_drops += 1;
            return;
        }
        let out = match vlan {
            None => frame.to_vec(),
            Some(tag) => {
                self.counters.vlan_tx += 1;
                let tci = tag.tci().to_be_bytes();
                let mut v = Vec::with_capacity(frame.len() + VLAN_TAG);
                v.extend_from_slice(&frame[..12]);
                v.extend_from_slice(&[0x81, 0x00, tci[0], tci[1]]);
                v.extend_from_slice(&frame[12..]);
                v
            }
        };
        self.from_guest.push_back(out);
    }

    fn control(&mut self, q: u16, msg: &RndisMessage<'_>) {
        self.queue(q).stats.control_messages += 1;
        let env = self.env();
        let res = self.rndis.handle(msg, &env);
        if let Some(e) = res.error {
            self.bad(q, e);
        }
        if let Some(reply) = res.reply {
            self.push_control(q, RxItem::Control(reply));
        }
    }

    fn push_control(&mut self, q: u16, item: RxItem) {
        let queue = self.queue(q);
        if queue.ctrl.len() >= CONTROL_LIMIT {
            self.counters.control_drops += 1;
            return;
        }
        queue.ctrl.push_back(item);
    }

    /// A completion from the guest: only receive completions (108 for a transfer-page
    /// packet) are expected.
    fn handle_rx_completion(&mut self, q: u16, p: &RingPacket) {
        let status = match NvspMessage::parse(&p.payload, Sender::Guest) {
            Ok(NvspMessage::SendRndisPacketComplete(c)) => c.status.get(),
            Ok(other) => {
                self.bad(q, format!("completion carrying {:?}", other.message_type()));
                return;
            }
            Err(e) => {
                self.bad(q, format!("completion: {e}"));
                return;
            }
        };
        let freed = self
            .recv
            .as_mut()
            .and_then(|r| r.sections.complete(p.trans_id));
        match freed {
            Some(_) => {
                self.queue(q).stats.rx_completions += 1;
                if status != NvspStatus::SUCCESS.0 {
                    self.counters.failed_rx_completions += 1;
                }
            }
            None => self.bad(
                q,
                format!("completion of unknown transaction {:#x}", p.trans_id),
            ),
        }
    }

    // -----------------------------------------------------------------------------------
    // Host to guest.

    /// Writes what waits for channel `q`: replies first, then receive indications.
    fn flush(&mut self, q: u16, ring: &mut HostRing, host: &mut HostActions<'_>) {
        if !self.flush_out(q, ring) {
            return;
        }
        self.flush_rx(q, ring, host);
    }

    fn flush_out(&mut self, q: u16, ring: &mut HostRing) -> bool {
        let recv_id = self
            .recv
            .as_ref()
            .map_or(NETVSC_RECEIVE_BUFFER_ID, |r| r.id);
        let xfer_payload = self.encode(&NvspMessage::SendRndisPacket(SendRndisPacket {
            channel_type: NVSP_CHANNEL_TYPE_DATA.into(),
            send_buf_section_index: NETVSC_INVALID_INDEX.into(),
            send_buf_section_size: 0.into(),
        }));
        loop {
            let Some(item) = self.queue(q).out.pop_front() else {
                return true;
            };
            let r = match &item {
                Outgoing::InBand { trans_id, payload } => {
                    ring.write_inband(*trans_id, false, payload)
                }
                Outgoing::Completion { trans_id, payload } => {
                    ring.write_completion(*trans_id, payload)
                }
                Outgoing::BadXfer {
                    trans_id,
                    offset,
                    len,
                } => ring.write_xfer_pages(
                    *trans_id,
                    true,
                    recv_id,
                    &[(*len, *offset)],
                    &xfer_payload,
                ),
            };
            match r {
                Ok(()) => {
                    if let Outgoing::BadXfer { trans_id, .. } = item {
                        if let Some(recv) = self.recv.as_mut() {
                            recv.sections.hold(trans_id, Vec::new());
                        }
                    }
                }
                Err(RingError::Full { .. }) => {
                    let queue = self.queue(q);
                    queue.stats.ring_full += 1;
                    queue.out.push_front(item);
                    return false;
                }
                Err(RingError::Encode(e)) => {
                    log::error!("netvsp: queue {q}: dropping an unencodable packet: {e}");
                }
                Err(e) => {
                    log::warn!("netvsp: queue {q}: cannot write the ring: {e}");
                    self.queue(q).out.push_front(item);
                    return false;
                }
            }
        }
    }

    fn flush_rx(&mut self, q: u16, ring: &mut HostRing, host: &mut HostActions<'_>) {
        loop {
            if self.rescinded {
                return;
            }
            let Some(recv) = self.recv.as_ref() else {
                return;
            };
            let (gpadl, id, section_size) = (recv.gpadl, recv.id, recv.section_size);
            let queue = self.queue(q);
            let Some(item) = queue.ctrl.pop_front().or_else(|| queue.frames.pop_front()) else {
                return;
            };
            let usage = match item {
                RxItem::Frame { .. } => SectionUse::Data,
                _ => SectionUse::Control,
            };
            let section = self.recv.as_mut().and_then(|r| r.sections.alloc(usage));
            let Some(section) = section else {
                // Wait for the guest to return sections.
                let queue = self.queue(q);
                queue.stats.no_section += 1;
                queue.requeue(item);
                return;
            };
            let release = |me: &mut Self| {
                if let Some(r) = me.recv.as_mut() {
                    r.sections.release(section);
                }
            };
            let usable = nvsp::usable_section_bytes(section_size) as usize;
            let (bytes, channel_type) = match &item {
                RxItem::Frame { data, hash, vlan } => {
                    let h = hash.map(u32::to_le_bytes);
                    let v = vlan.map(|tci| Ndis8021qInfo::from_tci(tci).0.to_le_bytes());
                    let ppis: Vec<Ppi<'_>> = h
                        .iter()
                        .map(|b| Ppi::new(PpiType::NBL_HASH_VALUE, b))
                        .chain(v.iter().map(|b| Ppi::new(PpiType::IEEE_8021Q_INFO, b)))
                        .collect();
                    let mut buf = vec![0u8; usable];
                    match encode_packet(&mut buf, &ppis, data) {
                        Ok(n) => {
                            buf.truncate(n);
                            (buf, NVSP_CHANNEL_TYPE_DATA)
                        }
                        Err(_) => (Vec::new(), NVSP_CHANNEL_TYPE_DATA),
                    }
                }
                RxItem::Control(b) | RxItem::Raw(b) => (b.clone(), NVSP_CHANNEL_TYPE_CONTROL),
            };
            if bytes.is_empty() || bytes.len() > usable {
                release(self);
                self.frame_left(&item);
                self.counters.oversize_drops += 1;
                log::warn!(
                    "netvsp: queue {q}: {} bytes do not fit a {usable}-byte section",
                    bytes.len()
                );
                continue;
            }
            let offset = u64::from(section) * u64::from(section_size);
            let written = match host.gpadl(gpadl) {
                Some(ranges) => GuestBuf::new(ranges)
                    .write(host.memory(), offset, &bytes)
                    .map_err(|e| e.to_string()),
                None => Err("GPADL was torn down".to_string()),
            };
            if let Err(e) = written {
                release(self);
                // Keep the item: the buffer may come back (or be revoked, which stops
                // this loop at its top).
                self.queue(q).requeue(item);
                self.bad(q, format!("receive buffer {gpadl:#x} unusable: {e}"));
                return;
            }
            let tid = self.next_tid();
            let payload = self.encode(&NvspMessage::SendRndisPacket(SendRndisPacket {
                channel_type: channel_type.into(),
                send_buf_section_index: NETVSC_INVALID_INDEX.into(),
                send_buf_section_size: 0.into(),
            }));
            let range = (bytes.len() as u32, offset as u32);
            match ring.write_xfer_pages(tid, true, id, &[range], &payload) {
                Ok(()) => {
                    if let Some(r) = self.recv.as_mut() {
                        r.sections.hold(tid, vec![section]);
                    }
                    if let RxItem::Frame { data, .. } = &item {
                        let len = data.len() as u64;
                        let queue = self.queue(q);
                        queue.stats.rx_frames += 1;
                        queue.stats.rx_bytes += len;
                        self.frames_queued = self.frames_queued.saturating_sub(1);
                        self.rx_frames_total += 1;
                        if self.check_rescind(host) {
                            return;
                        }
                    } else {
                        self.queue(q).stats.control_replies += 1;
                    }
                }
                Err(RingError::Full { .. }) => {
                    release(self);
                    let queue = self.queue(q);
                    queue.stats.ring_full += 1;
                    queue.requeue(item);
                    return;
                }
                Err(e) => {
                    release(self);
                    log::warn!("netvsp: queue {q}: cannot indicate: {e}");
                    self.queue(q).requeue(item);
                    return;
                }
            }
        }
    }

    fn frame_left(&mut self, item: &RxItem) {
        if matches!(item, RxItem::Frame { .. }) {
            self.frames_queued = self.frames_queued.saturating_sub(1);
        }
    }

    fn check_rescind(&mut self, host: &mut HostActions<'_>) -> bool {
        match self.config.faults.rescind_after_rx_frames {
            Some(n) if !self.rescinded && self.rx_frames_total >= n => {
                log::debug!("netvsp: fault: rescinding after {n} frames");
                host.rescind_device();
                self.rescinded = true;
                self.counters.rescinds_triggered += 1;
                true
            }
            _ => false,
        }
    }

    // -----------------------------------------------------------------------------------
    // The handle's side.

    fn filter_accepts(&self, frame: &[u8]) -> bool {
        let f = self.rndis.packet_filter;
        if f & NDIS_PACKET_TYPE_PROMISCUOUS != 0 {
            return true;
        }
        let dst = &frame[..6];
        if dst == [0xff; 6] {
            f & NDIS_PACKET_TYPE_BROADCAST != 0
        } else if dst[0] & 1 != 0 {
            // No multicast list is kept: either multicast bit accepts every group.
            f & (NDIS_PACKET_TYPE_MULTICAST | NDIS_PACKET_TYPE_ALL_MULTICAST) != 0
        } else {
            f & NDIS_PACKET_TYPE_DIRECTED != 0 && dst == self.config.mac
        }
    }

    /// The queue and RSS hash for a frame: the guest's indirection table entry for its
    /// Toeplitz hash when RSS is enabled and the frame is IP; queue 0 otherwise, and
    /// when the chosen queue is not open.
    fn classify(&self, frame: &[u8]) -> (u16, Option<u32>) {
        let Some(r) = self.rndis.rss.as_ref().filter(|r| r.enabled) else {
            return (0, None);
        };
        let Some(hash) = rss::rss_hash(&r.key, frame) else {
            return (0, None);
        };
        let q = rss::select_queue(&r.table, hash);
        match u16::try_from(q) {
            Ok(q) if self.is_open(q) => (q, Some(hash)),
            _ => (0, Some(hash)),
        }
    }

    pub(crate) fn send_to_guest(&mut self, frame: &[u8]) -> RxVerdict {
        let verdict = if frame.len() < ETH_HEADER {
            self.counters.runt_drops += 1;
            RxVerdict::Runt
        } else if frame.len() > self.max_frame(frame) {
            self.counters.oversize_drops += 1;
            RxVerdict::TooLong
        } else if !self.config.link_up {
            self.counters.link_down_drops += 1;
            RxVerdict::LinkDown
        } else if self.version.is_none()
            || self.recv.is_none()
            || !self.rndis.initialized
            || !self.is_open(0)
        {
            self.counters.not_ready_drops += 1;
            RxVerdict::NotReady
        } else if !self.filter_accepts(frame) {
            self.counters.filtered_drops += 1;
            RxVerdict::Filtered
        } else if self.frames_queued >= self.config.rx_backlog_limit {
            self.counters.backlog_drops += 1;
            RxVerdict::BacklogFull
        } else {
            // Hyper-V hands 802.1Q tags to the guest out of band: the tag leaves the frame
            // for a VLAN PPI; an untagged frame on a port VLAN gets that VLAN's PPI.
            let (data, vlan) = match split_vlan_tag(frame) {
                Some((untagged, tci)) => (untagged, Some(tci)),
                None => (frame.to_vec(), self.config.port_vlan.map(|id| id & 0xFFF)),
            };
            if vlan.is_some() {
                self.counters.vlan_rx += 1;
            }
            let (q, hash) = self.classify(&data);
            self.queue(q)
                .frames
                .push_back(RxItem::Frame { data, hash, vlan });
            self.frames_queued += 1;
            RxVerdict::Queued(q)
        };
        if !matches!(verdict, RxVerdict::Queued(_)) {
            log::trace!("netvsp: frame to guest dropped: {verdict:?}");
        }
        verdict
    }

    pub(crate) fn take_from_guest(&mut self) -> Option<Vec<u8>> {
        self.from_guest.pop_front()
    }

    pub(crate) fn set_link(&mut self, up: bool) {
        if self.config.link_up == up {
            return;
        }
        self.config.link_up = up;
        if self.rndis.initialized && self.is_open(0) {
            self.push_control(0, RxItem::Control(rndis::link_indication(up)));
        }
    }

    pub(crate) fn release_held_completions(&mut self) -> usize {
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        for (q, trans_id, payload) in held {
            let queue = self.queue(q);
            queue.stats.tx_completions += 1;
            queue
                .out
                .push_back(Outgoing::Completion { trans_id, payload });
        }
        n
    }

    pub(crate) fn inject_raw_nvsp(&mut self, q: u16, bytes: &[u8]) {
        self.queue(q).out.push_back(Outgoing::InBand {
            trans_id: 0,
            payload: bytes.to_vec(),
        });
    }

    pub(crate) fn inject_raw_rndis(&mut self, q: u16, bytes: &[u8]) {
        self.queue(q).ctrl.push_back(RxItem::Raw(bytes.to_vec()));
    }

    pub(crate) fn inject_bad_xfer(&mut self, q: u16, offset: u32, len: u32) {
        let trans_id = self.next_tid();
        self.queue(q).out.push_back(Outgoing::BadXfer {
            trans_id,
            offset,
            len,
        });
    }

    pub(crate) fn state(&self) -> NetvspState {
        NetvspState {
            nvsp_version: self.version.map(|v| v.0),
            ndis_version: self.ndis_version,
            ndis_config_mtu: self.ndis_config.map(|c| c.0),
            mtu: self.mtu(),
            ndis_capabilities: self.ndis_config.map(|c| c.1),
            recv_buffer: self.recv.as_ref().map(|r| BufferInfo {
                gpadl: r.gpadl,
                id: r.id,
                size: r.size,
                section_size: r.section_size,
                section_count: r.sections.count(),
            }),
            send_buffer: self.send.as_ref().map(|s| BufferInfo {
                gpadl: s.gpadl,
                id: s.id,
                size: s.size,
                section_size: s.section_size,
                section_count: s.count,
            }),
            rndis_initialized: self.rndis.initialized,
            packet_filter: self.rndis.packet_filter,
            rss: self.rndis.rss.clone(),
            offload_params: self.rndis.offload_params.clone(),
            queues_open: self
                .queues
                .iter()
                .filter(|(_, q)| q.open)
                .map(|(&i, _)| i)
                .collect(),
            subchannels_requested: self.sub_requested,
            subchannels_granted: self.sub_granted,
            indirection_table_sent: self.table_sent,
            link_up: self.config.link_up,
            data_path: self.data_path,
            rescinded: self.rescinded,
        }
    }

    pub(crate) fn stats(&self) -> NetvspStats {
        let len = self
            .queues
            .keys()
            .next_back()
            .map_or(0, |&k| usize::from(k) + 1);
        let mut queues = vec![QueueStats::default(); len];
        for (&i, q) in &self.queues {
            let mut s = q.stats;
            s.pending_out = q.out.len();
            s.pending_rx = q.ctrl.len() + q.frames.len();
            queues[usize::from(i)] = s;
        }
        let c = &self.counters;
        NetvspStats {
            queues,
            malformed: c.malformed,
            runt_drops: c.runt_drops,
            oversize_drops: c.oversize_drops,
            link_down_drops: c.link_down_drops,
            not_ready_drops: c.not_ready_drops,
            filtered_drops: c.filtered_drops,
            backlog_drops: c.backlog_drops,
            control_drops: c.control_drops,
            closed_drops: c.closed_drops,
            from_guest_drops: c.from_guest_drops,
            from_guest_pending: self.from_guest.len(),
            completions_dropped: c.completions_dropped,
            completions_held: self.held.len(),
            failed_rx_completions: c.failed_rx_completions,
            outstanding_rx_sections: self.recv.as_ref().map_or(0, |r| r.sections.outstanding()),
            outstanding_rx_packets: self
                .recv
                .as_ref()
                .map_or(0, |r| r.sections.outstanding_packets()),
            frames_queued: self.frames_queued,
            rx_frames_total: self.rx_frames_total,
            subchannel_requests: c.subchannel_requests,
            indirection_tables_sent: c.indirection_tables_sent,
            primary_opens: c.primary_opens,
            rescinds_triggered: c.rescinds_triggered,
            vlan_rx: c.vlan_rx,
            vlan_tx: c.vlan_tx,
            vlan_drops: c.vlan_drops,
            errors: c.errors.iter().cloned().collect(),
        }
    }
}

/// Whether `frame` carries an 802.1Q tag (TPID 0x8100 and a full tag before the
/// ethertype).
fn is_tagged(frame: &[u8]) -> bool {
    frame.len() >= ETH_HEADER + VLAN_TAG && frame[12..14] == [0x81, 0x00]
}

/// A tagged frame (see [`is_tagged`]): the frame without the tag, and the tag control
/// word.
fn split_vlan_tag(frame: &[u8]) -> Option<(Vec<u8>, u16)> {
    if !is_tagged(frame) {
        return None;
    }
    let tci = u16::from_be_bytes([frame[14], frame[15]]);
    let mut untagged = Vec::with_capacity(frame.len() - VLAN_TAG);
    untagged.extend_from_slice(&frame[..12]);
    untagged.extend_from_slice(&frame[16..]);
    Some((untagged, tci))
}
