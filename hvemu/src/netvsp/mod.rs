//! netvsp: the host end of a Hyper-V synthetic NIC, behind a VMBus device.
//!
//! [`Netvsp`] is a [`DeviceBackend`]: add it to a [`crate::VmbusHost`] (see
//! [`Netvsp::into_device_spec`]) and keep its [`NetvspHandle`] to play the network:
//! queue frames for the guest, collect the frames it sent, flip the link, read what it
//! negotiated ([`NetvspHandle::state`]) and what happened ([`NetvspHandle::stats`]),
//! inject malformed host messages, and change [`NetvspFaults`] at any time.
//!
//! The protocol follows the facts sheet (hyperv-facts.md sections 6 and 7), OpenVMM's
//! netvsp where hosts differ, and what Linux and DPDK guests expect. The guest is not
//! trusted: every offset, length, index and GPADL it names is checked, bad messages are
//! counted in [`NetvspStats::malformed`] (the last few described in
//! [`NetvspStats::errors`]) and logged at debug level; nothing panics.
//!
//! # When the host acts
//!
//! Back ends run only inside host calls: when the guest signals a channel
//! ([`crate::VmbusHost::signal_event`]) or the test calls
//! [`crate::VmbusHost::poll_device`]. Both read every packet the guest wrote on that
//! channel, then write what waits for it. So a frame queued with
//! [`NetvspHandle::send_to_guest`], a link indication, the send indirection table or a
//! completion released from [`NetvspHandle::release_held_completions`] reaches the guest
//! at the next signal or poll of *its* channel; `poll_device` covers all of them.
//!
//! # What a guest must do (Linux's order; the host enforces the parts marked "must")
//!
//! 1. Open the primary channel (sub-channel index 0). This resets all NVSP/RNDIS state.
//! 2. NVSP INIT (type 1, in-band, completion requested) with `min = max =` one version;
//!    the completion (INIT_COMPLETE, type 2) has status 1 if the host takes it, else 3
//!    (PROTOCOL_TOO_NEW: above [`NetvspConfig::max_nvsp_version`]), 4 or 2: try the next
//!    version. Only 2, 0x30002, 0x40000, 0x50000, 0x60000, 0x60001 are known. Nothing but
//!    INIT is accepted before a successful INIT. `negotiated_protocol_ver` in the reply
//!    is 0xFFFFFFFF (deprecated field, as OpenVMM sends it) except for NVSP 1.
//! 3. NVSP >= 2: SEND_NDIS_CONFIG (125), at most once per session, before the receive
//!    buffer; its MTU (frame size, 1514..=9216, else 1514 is used) sizes the receive
//!    sections, and its value less 14 (at most [`NetvspConfig::mtu`]) is the MTU in
//!    effect: longer frames are dropped both ways ([`NetvspState::mtu`]). A guest
//!    changes its MTU by closing the primary and starting over (Linux's
//!    `netvsc_change_mtu`); OID_GEN_MAXIMUM_FRAME_SIZE keeps reporting the port's maximum.
//! 4. SEND_NDIS_VER (100), at most once.
//! 5. Receive buffer: a GPADL on the primary, then SEND_RECV_BUF (101) with id 0xCAFE
//!    (must), completion requested. The reply (102) has one section: offset 0,
//!    `sub_alloc_size` = 256 + frame MTU + 36 (1806 by default; or
//!    [`NetvspConfig::recv_section_size`]), `num_sub_allocs` = buffer size / that,
//!    `end_offset` = their product. The guest must use these numbers, not 1728.
//! 6. Send buffer: a GPADL, then SEND_SEND_BUF (104); the reply (105) gives the section
//!    size (6144 by default, [`NetvspConfig::send_section_size`]); sections = size / it.
//! 7. RNDIS INITIALIZE, QUERYs (MAC, frame size, link, link speed, RSS capabilities,
//!    offload capabilities), SETs (packet filter, offload parameters, RSS parameters),
//!    KEEPALIVE, RESET, HALT, each inside NVSP SEND_RNDIS_PKT (107) with channel type 1:
//!    either in GPA ranges (a `VM_PKT_DATA_USING_GPA_DIRECT` packet, section index
//!    0xFFFFFFFF) or copied into a send section (in-band packet, section index and
//!    used size). The host completes every 107 that asks for it with 108 {status} in a
//!    completion packet carrying the same transaction id, and puts each RNDIS reply
//!    (`*_CMPLT`) into a receive section, indicated like a frame (below). HALT has no
//!    reply. No frame reaches the guest before INITIALIZE, a non-zero packet filter and
//!    the receive buffer.
//! 8. Multi-queue (NVSP >= 5): SUBCHANNEL (133) {op 1, n} on the primary, completion
//!    requested. The completion carries {status, granted}, where granted is
//!    `min(n, max_queues - 1)` unless faults say otherwise; the host then offers
//!    sub-channels 1..=granted. Open
//!    each (no NVSP INIT on sub-channels). When all are open the host queues
//!    SEND_INDIRECTION_TABLE (134, in-band, transaction id 0, 76 bytes: count 16, offset
//!    12, entry i = i % (granted + 1)) on the primary; it arrives at the primary's next
//!    signal or poll. RSS parameters may name queues 0..=granted.
//! 9. Receive path: each frame (and each RNDIS reply) is one `VM_PKT_DATA_USING_XFER_PAGES`
//!    packet, completion requested, transfer page set 0xCAFE, one range (byte count,
//!    byte offset into the receive buffer = section * section size), payload NVSP 107
//!    (channel type 0 for frames, 1 for control, section index 0xFFFFFFFF). A frame is an
//!    RNDIS PACKET with, when RSS is enabled and the frame is IP, one hash-value PPI
//!    (type 8, the Toeplitz hash), and a VLAN PPI (type 6) when the frame had an 802.1Q
//!    tag (taken out of the frame) or the port has a VLAN ([`NetvspConfig::port_vlan`]). The guest must complete each such packet with 108
//!    {status} in a completion packet with the packet's transaction id; only then is the
//!    section reused. Receive sections are per device, shared by all queues; the lowest
//!    few are reserved for control messages. Frames are queued per queue (bounded by
//!    [`NetvspConfig::rx_backlog_limit`]) while no section or no ring space is free.
//! 10. Transmit path: RNDIS PACKETs (channel type 0) in a send section (several per
//!     section back to back, each `msg_len` including its padding) or in GPA ranges;
//!     each frame lands in [`NetvspHandle::take_from_guest`], with the tag of its VLAN
//!     PPI (if any) put back into it. Completed like any 107.
//! 11. Teardown: HALT (optional), revoke buffers (103/106) or just close; closing the
//!     primary resets everything, closing a sub-channel moves its queued frames to the
//!     primary.
//!
//! Messages sent by the host are 28 bytes long below NVSP 6.1 and 40 bytes from 6.1
//! (OpenVMM's sizes), so a guest must accept both.

mod buffers;
mod device;
mod nvsp;
mod rndis;

use std::cell::RefCell;
use std::rc::Rc;

use hvnet_wire::vmbus::HV_NIC_GUID;
use zerocopy::IntoBytes;

use crate::device::{ChannelCtx, DeviceBackend, DeviceSpec, HostActions};
use crate::ring::HostRing;

pub use buffers::{BufError, GuestBuf, SectionAllocator, SectionUse};
pub use nvsp::{negotiate, recv_section_size};
pub use rndis::{parse_rss_parameters, RssInfo};

use device::Inner;

/// Faults the emulated NIC can inject. All default to off; change them at any time with
/// [`NetvspHandle::set_faults`] (they apply to later messages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetvspFaults {
    /// Answer every SUBCHANNEL request with status FAIL and grant nothing.
    pub refuse_subchannels: bool,
    /// Grant at most this many sub-channels (fewer than asked).
    pub max_subchannels: Option<u16>,
    /// Grant (and offer) this many sub-channels *more* than the normal grant: a host a
    /// guest must not trust (Linux rejects a grant above its request).
    pub extra_subchannels: u16,
    /// Never send SEND_INDIRECTION_TABLE.
    pub no_indirection_table: bool,
    /// Never complete guest sends that carry only data (RNDIS PACKETs); control
    /// messages are still completed.
    pub drop_tx_completions: bool,
    /// Hold the completions of data sends until
    /// [`NetvspHandle::release_held_completions`] (delayed completions).
    pub hold_tx_completions: bool,
    /// Rescind the device (hot-remove) as soon as this many frames in total have been
    /// indicated to the guest; once.
    pub rescind_after_rx_frames: Option<u64>,
}

/// How the emulated NIC is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetvspConfig {
    /// Permanent (and current) MAC address.
    pub mac: [u8; 6],
    /// The port's largest IP MTU, reported as OID_GEN_MAXIMUM_FRAME_SIZE. The MTU in
    /// effect is the guest's SEND_NDIS_CONFIG value less 14, at most this (this one
    /// without an NDIS config); frames up to it + 14 (+ 4 for a VLAN tag) pass in
    /// either direction, longer ones are dropped.
    pub mtu: u32,
    /// Queues (primary plus sub-channels) offered: RSS capabilities report it and
    /// SUBCHANNEL grants at most `max_queues - 1`.
    pub max_queues: u16,
    /// Newest NVSP version accepted (0x60001 by default).
    pub max_nvsp_version: u32,
    /// Initial media state.
    pub link_up: bool,
    /// Link speed in 100 bit/s units (OID_GEN_LINK_SPEED); 10 Gbit/s by default.
    pub link_speed: u32,
    /// Indirection table entries reported in the RSS capabilities (128).
    pub indirection_table_entries: u16,
    /// Receive section size to report instead of 256 + frame MTU + 36.
    pub recv_section_size: Option<u32>,
    /// Send section size reported in SEND_SEND_BUF_COMPLETE (6144).
    pub send_section_size: u32,
    /// Frames waiting for the guest (all queues) before [`NetvspHandle::send_to_guest`]
    /// drops new ones.
    pub rx_backlog_limit: usize,
    /// Frames the guest sent that may wait in [`NetvspHandle::take_from_guest`] before
    /// new ones are dropped.
    pub from_guest_limit: usize,
    /// The port's VLAN: frames the host indicates without an 802.1Q tag of their own
    /// carry a VLAN PPI for it (priority 0), and guest frames whose VLAN PPI names
    /// another VLAN are dropped (counted in [`NetvspStats::vlan_drops`]). Tags in frames
    /// given to [`NetvspHandle::send_to_guest`] always travel as VLAN PPIs.
    pub port_vlan: Option<u16>,
    /// Faults to inject.
    pub faults: NetvspFaults,
}

impl Default for NetvspConfig {
    fn default() -> Self {
        NetvspConfig {
            mac: [0x00, 0x15, 0x5d, 0x00, 0x00, 0x01],
            mtu: 1500,
            max_queues: 8,
            max_nvsp_version: 0x60001,
            link_up: true,
            link_speed: 100_000_000,
            indirection_table_entries: rndis::DEFAULT_TABLE_ENTRIES,
            recv_section_size: None,
            send_section_size: hvnet_wire::nvsp::NETVSC_SEND_SECTION_SIZE,
            rx_backlog_limit: 1024,
            from_guest_limit: 4096,
            port_vlan: None,
            faults: NetvspFaults::default(),
        }
    }
}

/// A guest buffer as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferInfo {
    /// Its GPADL.
    pub gpadl: u32,
    /// The id the guest gave (0xCAFE for the receive buffer).
    pub id: u16,
    /// Bytes described by the GPADL.
    pub size: u64,
    /// Section (sub-allocation) size the host reported.
    pub section_size: u32,
    /// Number of sections.
    pub section_count: u32,
}

/// What the guest has negotiated so far (reset when the primary channel opens or
/// closes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetvspState {
    /// Negotiated NVSP version.
    pub nvsp_version: Option<u32>,
    /// NDIS version (major, minor) from SEND_NDIS_VER.
    pub ndis_version: Option<(u32, u32)>,
    /// MTU from SEND_NDIS_CONFIG, as sent (a frame MTU: the IP MTU + 14).
    pub ndis_config_mtu: Option<u32>,
    /// The IP MTU in effect (see [`NetvspConfig::mtu`]).
    pub mtu: u32,
    /// Capability bits from SEND_NDIS_CONFIG.
    pub ndis_capabilities: Option<u64>,
    /// The receive buffer.
    pub recv_buffer: Option<BufferInfo>,
    /// The send buffer.
    pub send_buffer: Option<BufferInfo>,
    /// RNDIS INITIALIZE answered, no HALT since.
    pub rndis_initialized: bool,
    /// The packet filter (0 until the guest sets one).
    pub packet_filter: u32,
    /// RSS settings, once set.
    pub rss: Option<RssInfo>,
    /// The last offload parameters value set.
    pub offload_params: Option<Vec<u8>>,
    /// Open channels by sub-channel index.
    pub queues_open: Vec<u16>,
    /// Sub-channels asked for in the last SUBCHANNEL request.
    pub subchannels_requested: u32,
    /// Sub-channels granted by the last SUBCHANNEL request.
    pub subchannels_granted: u16,
    /// Whether SEND_INDIRECTION_TABLE was queued for the guest.
    pub indirection_table_sent: bool,
    /// Media state.
    pub link_up: bool,
    /// Data path from SWITCH_DATA_PATH (0 synthetic).
    pub data_path: u32,
    /// Whether the rescind fault fired.
    pub rescinded: bool,
}

/// Counters of one queue (channel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames indicated to the guest.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Transfer-page packets the guest completed on this channel.
    pub rx_completions: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Send completions written (or queued) for the guest.
    pub tx_completions: u64,
    /// RNDIS control requests received.
    pub control_messages: u64,
    /// RNDIS control messages (replies, indications, injected bytes) indicated.
    pub control_replies: u64,
    /// Writes that found the ring full.
    pub ring_full: u64,
    /// Times an indication waited because no receive section was free.
    pub no_section: u64,
    /// Replies and in-band messages waiting for ring space now.
    pub pending_out: usize,
    /// Frames and control messages waiting for a section or ring space now.
    pub pending_rx: usize,
}

/// Counters of the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetvspStats {
    /// Per queue, by sub-channel index.
    pub queues: Vec<QueueStats>,
    /// Guest messages that broke the protocol (bad offsets, lengths, indices, states).
    pub malformed: u64,
    /// Frames for the guest shorter than 14 bytes.
    pub runt_drops: u64,
    /// Frames for the guest longer than the maximum (or not fitting a section).
    pub oversize_drops: u64,
    /// Frames for the guest dropped while the link was down.
    pub link_down_drops: u64,
    /// Frames for the guest dropped before it was ready (no INIT, receive buffer or
    /// RNDIS INITIALIZE, or the primary closed).
    pub not_ready_drops: u64,
    /// Frames for the guest its packet filter rejected.
    pub filtered_drops: u64,
    /// Frames for the guest dropped because the backlog was full.
    pub backlog_drops: u64,
    /// RNDIS replies dropped because too many were waiting.
    pub control_drops: u64,
    /// Frames dropped because their channel closed.
    pub closed_drops: u64,
    /// Frames from the guest dropped because nobody took them.
    pub from_guest_drops: u64,
    /// Frames from the guest waiting in [`NetvspHandle::take_from_guest`].
    pub from_guest_pending: usize,
    /// Send completions dropped by [`NetvspFaults::drop_tx_completions`].
    pub completions_dropped: u64,
    /// Send completions held by [`NetvspFaults::hold_tx_completions`] now.
    pub completions_held: usize,
    /// Receive completions with a status other than success.
    pub failed_rx_completions: u64,
    /// Receive sections the guest has not returned.
    pub outstanding_rx_sections: usize,
    /// Transfer-page packets the guest has not completed.
    pub outstanding_rx_packets: usize,
    /// Frames waiting for the guest (all queues).
    pub frames_queued: usize,
    /// Frames indicated to the guest in total.
    pub rx_frames_total: u64,
    /// SUBCHANNEL requests received.
    pub subchannel_requests: u64,
    /// Send indirection tables queued.
    pub indirection_tables_sent: u64,
    /// Times the primary channel was opened.
    pub primary_opens: u64,
    /// Times the rescind fault fired.
    pub rescinds_triggered: u64,
    /// Frames indicated to the guest with a VLAN PPI.
    pub vlan_rx: u64,
    /// Frames from the guest whose VLAN PPI was put back into the frame as a tag.
    pub vlan_tx: u64,
    /// Frames from the guest dropped for naming a VLAN other than the port's.
    pub vlan_drops: u64,
    /// The last malformed messages, described (oldest first, at most 32).
    pub errors: Vec<String>,
}

/// What [`NetvspHandle::send_to_guest`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVerdict {
    /// Queued for this queue (sub-channel index).
    Queued(u16),
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the MTU in effect + 14 + 4.
    TooLong,
    /// The link is down.
    LinkDown,
    /// The guest has not finished bringing the NIC up.
    NotReady,
    /// The guest's packet filter does not accept it.
    Filtered,
    /// Too many frames are waiting.
    BacklogFull,
}

/// The NIC back end; add it to a [`crate::VmbusHost`].
pub struct Netvsp {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for Netvsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netvsp").finish_non_exhaustive()
    }
}

impl Netvsp {
    /// A NIC with `config`.
    pub fn new(config: NetvspConfig) -> Self {
        Netvsp {
            inner: Rc::new(RefCell::new(Inner::new(config))),
        }
    }

    /// A handle to the NIC (clones share it).
    pub fn handle(&self) -> NetvspHandle {
        NetvspHandle {
            inner: self.inner.clone(),
        }
    }

    /// A device spec with the network class GUID and `instance_id`, ready for
    /// [`crate::VmbusHost::add_device`].
    pub fn into_device_spec(self, instance_id: [u8; 16]) -> DeviceSpec {
        let mut class = [0u8; 16];
        class.copy_from_slice(HV_NIC_GUID.as_bytes());
        DeviceSpec::new(class, instance_id, Box::new(self))
    }
}

impl DeviceBackend for Netvsp {
    fn on_open(
        &mut self,
        ch: ChannelCtx,
        _ring: &mut HostRing,
        _host: &mut HostActions<'_>,
    ) -> Result<(), u32> {
        self.inner.borrow_mut().on_open(ch)
    }

    fn on_packets(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>) {
        self.inner.borrow_mut().run(ch, ring, host);
    }

    fn on_poll(&mut self, ch: ChannelCtx, ring: &mut HostRing, host: &mut HostActions<'_>) {
        self.inner.borrow_mut().run(ch, ring, host);
    }

    fn on_close(&mut self, ch: ChannelCtx) {
        self.inner.borrow_mut().on_close(ch);
    }
}

/// The outside of the NIC: what a test or the [`crate::switch::Switch`] uses. Clones
/// share the NIC. Calls must not overlap a host call into the device (they cannot in
/// single-threaded use: the host never calls out while the device runs).
#[derive(Clone)]
pub struct NetvspHandle {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for NetvspHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetvspHandle").finish_non_exhaustive()
    }
}

impl NetvspHandle {
    /// Queues an Ethernet frame (no FCS) for the guest. It is indicated at the next
    /// signal or poll of the queue RSS picks; see [`RxVerdict`] for why it may be
    /// dropped instead (each reason is also counted in [`NetvspStats`]).
    pub fn send_to_guest(&self, frame: &[u8]) -> RxVerdict {
        self.inner.borrow_mut().send_to_guest(frame)
    }

    /// Takes the oldest frame the guest transmitted.
    pub fn take_from_guest(&self) -> Option<Vec<u8>> {
        self.inner.borrow_mut().take_from_guest()
    }

    /// Changes the media state; if the guest has initialized RNDIS, an INDICATE_STATUS
    /// (MEDIA_CONNECT or MEDIA_DISCONNECT) is queued on the primary.
    pub fn set_link(&self, up: bool) {
        self.inner.borrow_mut().set_link(up);
    }

    /// What the guest negotiated.
    pub fn state(&self) -> NetvspState {
        self.inner.borrow().state()
    }

    /// Counters.
    pub fn stats(&self) -> NetvspStats {
        self.inner.borrow().stats()
    }

    /// The configuration (with the current link state).
    pub fn config(&self) -> NetvspConfig {
        self.inner.borrow().config
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: NetvspFaults) {
        self.inner.borrow_mut().config.faults = faults;
    }

    /// Queues the send completions held by [`NetvspFaults::hold_tx_completions`] for
    /// delivery (at the next signal or poll of their channels); returns how many.
    pub fn release_held_completions(&self) -> usize {
        self.inner.borrow_mut().release_held_completions()
    }

    /// Fault injection: queues `bytes` as the payload of an in-band packet (transaction
    /// id 0, no completion requested) on channel `queue`.
    pub fn inject_raw_nvsp(&self, queue: u16, bytes: &[u8]) {
        self.inner.borrow_mut().inject_raw_nvsp(queue, bytes);
    }

    /// Fault injection: queues `bytes` to be copied into a receive section and indicated
    /// on channel `queue` like an RNDIS control message (needs the receive buffer; bytes
    /// that do not fit a section are dropped and counted as oversize).
    pub fn inject_raw_rndis(&self, queue: u16, bytes: &[u8]) {
        self.inner.borrow_mut().inject_raw_rndis(queue, bytes);
    }

    /// Fault injection: queues a transfer-page packet on channel `queue` whose single
    /// range is `(len, offset)`, whatever the receive buffer holds (e.g. past its end).
    /// Its completion is accepted without freeing any section.
    pub fn inject_bad_xfer(&self, queue: u16, offset: u32, len: u32) {
        self.inner.borrow_mut().inject_bad_xfer(queue, offset, len);
    }
}
