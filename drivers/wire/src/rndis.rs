//! RNDIS messages carried inside NVSP SEND_RNDIS_PKT, and the NDIS objects they carry.
//!
//! An RNDIS message is an 8-byte [`RndisHeader`] (type, total length) and a body. Every
//! offset inside a body (`info_buf_offset`, `data_offset`, `per_pkt_info_offset`,
//! `status_buf_offset`) counts from the start of the *body*, byte 8 of the message.
//! [`RndisMessage::parse`] checks the header length and every such offset/length pair
//! against the body, and for data packets walks the per-packet-info (PPI) list once, so
//! the accessors of what it returns cannot go out of bounds.
//!
//! Several messages may sit back to back in one send section (each `msg_len` includes
//! its padding); [`RndisMessage::parse_with_len`] returns the length to step over.
//!
//! Sources: Linux `include/linux/rndis.h`, `drivers/net/hyperv/hyperv_net.h` and
//! `rndis_filter.c`, OpenVMM `vm/devices/net/netvsp/src/rndisprot.rs`, as summarised in
//! `shared/reference/hyperv-facts.md` section 7 and `shared/reference/wire-layouts.md`
//! section 5.

use core::mem::size_of;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::{sub_slice, WireError, Writer, U16, U32};

/// Size of [`RndisHeader`] (`RNDIS_HEADER_SIZE`).
pub const RNDIS_HEADER_SIZE: usize = size_of::<RndisHeader>();
/// RNDIS major version a guest requests (`RNDIS_MAJOR_VERSION`).
pub const RNDIS_MAJOR_VERSION: u32 = 1;
/// RNDIS minor version a guest requests (`RNDIS_MINOR_VERSION`).
pub const RNDIS_MINOR_VERSION: u32 = 0;
/// `max_xfer_size` Linux puts in INITIALIZE.
pub const RNDIS_LINUX_MAX_XFER_SIZE: u32 = 0x4000;
/// Device flag: connectionless (`RNDIS_DF_CONNECTIONLESS`).
pub const RNDIS_DF_CONNECTIONLESS: u32 = 1;
/// Medium: 802.3 (`RNDIS_MEDIUM_802_3`).
pub const RNDIS_MEDIUM_802_3: u32 = 0;
/// Bit 31 of a message type marks a completion (`RNDIS_MSG_COMPLETION`).
pub const RNDIS_MSG_COMPLETION: u32 = 0x8000_0000;

/// Packet filter: directed (`NDIS_PACKET_TYPE_DIRECTED`).
pub const NDIS_PACKET_TYPE_DIRECTED: u32 = 0x01;
/// Packet filter: multicast list (`NDIS_PACKET_TYPE_MULTICAST`).
pub const NDIS_PACKET_TYPE_MULTICAST: u32 = 0x02;
/// Packet filter: all multicast (`NDIS_PACKET_TYPE_ALL_MULTICAST`).
pub const NDIS_PACKET_TYPE_ALL_MULTICAST: u32 = 0x04;
/// Packet filter: broadcast (`NDIS_PACKET_TYPE_BROADCAST`).
pub const NDIS_PACKET_TYPE_BROADCAST: u32 = 0x08;
/// Packet filter: promiscuous (`NDIS_PACKET_TYPE_PROMISCUOUS`).
pub const NDIS_PACKET_TYPE_PROMISCUOUS: u32 = 0x20;
/// OID_GEN_MEDIA_CONNECT_STATUS value: connected.
pub const NDIS_MEDIA_STATE_CONNECTED: u32 = 0;
/// OID_GEN_MEDIA_CONNECT_STATUS value: disconnected.
pub const NDIS_MEDIA_STATE_DISCONNECTED: u32 = 1;

wire_enum! {
    /// RNDIS message types (`RNDIS_MSG_*`, rndis.h). A completion is its request's type
    /// with bit 31 set.
    pub struct RndisMessageType(u32) {
        /// `RNDIS_MSG_PACKET`: a data frame.
        PACKET = 0x0000_0001,
        /// `RNDIS_MSG_INIT`.
        INIT = 0x0000_0002,
        /// `RNDIS_MSG_INIT_C`.
        INIT_C = 0x8000_0002,
        /// `RNDIS_MSG_HALT` (no reply).
        HALT = 0x0000_0003,
        /// `RNDIS_MSG_QUERY`.
        QUERY = 0x0000_0004,
        /// `RNDIS_MSG_QUERY_C`.
        QUERY_C = 0x8000_0004,
        /// `RNDIS_MSG_SET`.
        SET = 0x0000_0005,
        /// `RNDIS_MSG_SET_C`.
        SET_C = 0x8000_0005,
        /// `RNDIS_MSG_RESET`.
        RESET = 0x0000_0006,
        /// `RNDIS_MSG_RESET_C`.
        RESET_C = 0x8000_0006,
        /// `RNDIS_MSG_INDICATE`: status indication from the device.
        INDICATE = 0x0000_0007,
        /// `RNDIS_MSG_KEEPALIVE`.
        KEEPALIVE = 0x0000_0008,
        /// `RNDIS_MSG_KEEPALIVE_C`.
        KEEPALIVE_C = 0x8000_0008,
        /// SET_EX (OpenVMM only; not decoded here).
        SET_EX = 0x0000_0009,
        /// SET_EX completion (OpenVMM only; not decoded here).
        SET_EX_C = 0x8000_0009,
    }
}

wire_enum! {
    /// RNDIS status codes (`RNDIS_STATUS_*`, rndis.h; hyperv-facts.md 7.2).
    pub struct RndisStatus(u32) {
        /// `RNDIS_STATUS_SUCCESS`.
        SUCCESS = 0x0000_0000,
        /// `RNDIS_STATUS_PENDING`.
        PENDING = 0x0000_0103,
        /// `RNDIS_STATUS_ONLINE`.
        ONLINE = 0x4001_0003,
        /// `RNDIS_STATUS_RESET_START`.
        RESET_START = 0x4001_0004,
        /// `RNDIS_STATUS_RESET_END`.
        RESET_END = 0x4001_0005,
        /// `RNDIS_STATUS_MEDIA_CONNECT`: link up.
        MEDIA_CONNECT = 0x4001_000B,
        /// `RNDIS_STATUS_MEDIA_DISCONNECT`: link down.
        MEDIA_DISCONNECT = 0x4001_000C,
        /// `RNDIS_STATUS_MEDIA_SPECIFIC_INDICATION`.
        MEDIA_SPECIFIC_INDICATION = 0x4001_0012,
        /// `RNDIS_STATUS_LINK_SPEED_CHANGE`: status buffer is a u32 in 100 bit/s units.
        LINK_SPEED_CHANGE = 0x4001_0013,
        /// `RNDIS_STATUS_NETWORK_CHANGE` (hyperv_net.h).
        NETWORK_CHANGE = 0x4001_0018,
        /// `RNDIS_STATUS_BUFFER_OVERFLOW`.
        BUFFER_OVERFLOW = 0x8000_0005,
        /// `RNDIS_STATUS_FAILURE`.
        FAILURE = 0xC000_0001,
        /// `RNDIS_STATUS_RESOURCES`.
        RESOURCES = 0xC000_009A,
        /// `RNDIS_STATUS_NOT_SUPPORTED`.
        NOT_SUPPORTED = 0xC000_00BB,
        /// `RNDIS_STATUS_INVALID_LENGTH`.
        INVALID_LENGTH = 0xC001_0014,
        /// `RNDIS_STATUS_INVALID_DATA`.
        INVALID_DATA = 0xC001_0015,
        /// `RNDIS_STATUS_BUFFER_TOO_SHORT`.
        BUFFER_TOO_SHORT = 0xC001_0016,
        /// `RNDIS_STATUS_INVALID_OID`.
        INVALID_OID = 0xC001_0017,
    }
}

wire_enum! {
    /// Object identifiers netvsc queries and sets (`RNDIS_OID_*` in rndis.h, `OID_*` in
    /// hyperv_net.h; hyperv-facts.md 7.4).
    pub struct Oid(u32) {
        /// `RNDIS_OID_802_3_PERMANENT_ADDRESS`: the MAC (6 bytes).
        OID_802_3_PERMANENT_ADDRESS = 0x0101_0101,
        /// `RNDIS_OID_802_3_CURRENT_ADDRESS`.
        OID_802_3_CURRENT_ADDRESS = 0x0101_0102,
        /// `RNDIS_OID_GEN_MAXIMUM_FRAME_SIZE`.
        GEN_MAXIMUM_FRAME_SIZE = 0x0001_0106,
        /// `RNDIS_OID_GEN_LINK_SPEED`: u32 in 100 bit/s units.
        GEN_LINK_SPEED = 0x0001_0107,
        /// `RNDIS_OID_GEN_CURRENT_PACKET_FILTER`: u32 of `NDIS_PACKET_TYPE_*`.
        GEN_CURRENT_PACKET_FILTER = 0x0001_010E,
        /// `RNDIS_OID_GEN_MEDIA_CONNECT_STATUS`: u32, 0 connected, 1 disconnected.
        GEN_MEDIA_CONNECT_STATUS = 0x0001_0114,
        /// `RNDIS_OID_GEN_RNDIS_CONFIG_PARAMETER`.
        GEN_RNDIS_CONFIG_PARAMETER = 0x0001_021B,
        /// `RNDIS_OID_GEN_FRIENDLY_NAME`: UTF-16 name.
        GEN_FRIENDLY_NAME = 0x0002_0216,
        /// `OID_GEN_RECEIVE_SCALE_CAPABILITIES`: [`NdisRecvScaleCap`].
        GEN_RECEIVE_SCALE_CAPABILITIES = 0x0001_0203,
        /// `OID_GEN_RECEIVE_SCALE_PARAMETERS`: [`NdisRecvScaleParam`] + table + key.
        GEN_RECEIVE_SCALE_PARAMETERS = 0x0001_0204,
        /// `OID_GEN_MAX_LINK_SPEED`.
        GEN_MAX_LINK_SPEED = 0x0001_0206,
        /// `OID_GEN_LINK_STATE`.
        GEN_LINK_STATE = 0x0001_0207,
        /// `OID_GEN_LINK_PARAMETERS`.
        GEN_LINK_PARAMETERS = 0x0001_0208,
        /// `OID_OFFLOAD_ENCAPSULATION`.
        OFFLOAD_ENCAPSULATION = 0x0101_010A,
        /// `OID_TCP_OFFLOAD_CURRENT_CONFIG`.
        TCP_OFFLOAD_CURRENT_CONFIG = 0xFC01_020B,
        /// `OID_TCP_OFFLOAD_PARAMETERS`: [`NdisOffloadParams`].
        TCP_OFFLOAD_PARAMETERS = 0xFC01_020C,
        /// `OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES`.
        TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01_020D,
    }
}

// ---------------------------------------------------------------------------------------
// Header and control bodies. All are `struct rndis_*` in hyperv_net.h, naturally aligned
// u32 fields.

/// RNDIS message header: 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RndisHeader {
    /// [`RndisMessageType`].
    pub ndis_msg_type: U32,
    /// Total message length, header included.
    pub msg_len: U32,
}

/// INITIALIZE body (`struct rndis_initialize_request`): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InitializeRequest {
    /// Request id, echoed in the completion.
    pub req_id: U32,
    /// [`RNDIS_MAJOR_VERSION`].
    pub major_ver: U32,
    /// [`RNDIS_MINOR_VERSION`].
    pub minor_ver: U32,
    /// Largest message the guest accepts (Linux 0x4000).
    pub max_xfer_size: U32,
}

/// INITIALIZE completion body (`struct rndis_initialize_complete`): 44 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InitializeComplete {
    /// Request id.
    pub req_id: U32,
    /// [`RndisStatus`].
    pub status: U32,
    /// RNDIS major version.
    pub major_ver: U32,
    /// RNDIS minor version.
    pub minor_ver: U32,
    /// [`RNDIS_DF_CONNECTIONLESS`].
    pub dev_flags: U32,
    /// [`RNDIS_MEDIUM_802_3`].
    pub medium: U32,
    /// Most RNDIS packets per send section (OpenVMM 8).
    pub max_pkt_per_msg: U32,
    /// Largest message the device accepts (OpenVMM 0xEFFFFFFF).
    pub max_xfer_size: U32,
    /// Packet alignment = 1 << this (OpenVMM 3 = 8 bytes).
    pub pkt_alignment_factor: U32,
    /// Address family list offset.
    pub af_list_offset: U32,
    /// Address family list size.
    pub af_list_size: U32,
}

/// HALT body (`struct rndis_halt_request`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HaltRequest {
    /// Request id.
    pub req_id: U32,
}

/// QUERY body (`struct rndis_query_request`): 20 bytes; input data (if any) follows.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct QueryRequest {
    /// Request id.
    pub req_id: U32,
    /// [`Oid`].
    pub oid: U32,
    /// Bytes of input data.
    pub info_buflen: U32,
    /// Offset of the input data from the body start (Linux 20).
    pub info_buf_offset: U32,
    /// Zero.
    pub dev_vc_handle: U32,
}

/// QUERY completion body (`struct rndis_query_complete`): 16 bytes; the result follows.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct QueryComplete {
    /// Request id.
    pub req_id: U32,
    /// [`RndisStatus`].
    pub status: U32,
    /// Bytes of result.
    pub info_buflen: U32,
    /// Offset of the result from the body start (at least 16).
    pub info_buf_offset: U32,
}

/// SET body (`struct rndis_set_request`): 20 bytes; the value follows.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SetRequest {
    /// Request id.
    pub req_id: U32,
    /// [`Oid`].
    pub oid: U32,
    /// Bytes of value.
    pub info_buflen: U32,
    /// Offset of the value from the body start (Linux 20).
    pub info_buf_offset: U32,
    /// Zero.
    pub dev_vc_handle: U32,
}

/// SET completion body (`struct rndis_set_complete`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SetComplete {
    /// Request id.
    pub req_id: U32,
    /// [`RndisStatus`].
    pub status: U32,
}

/// RESET body (`struct rndis_reset_request`): 4 bytes, no request id.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ResetRequest {
    /// Reserved.
    pub reserved: U32,
}

/// RESET completion body (`struct rndis_reset_complete`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ResetComplete {
    /// [`RndisStatus`].
    pub status: U32,
    /// Non-zero if addressing was reset.
    pub addressing_reset: U32,
}

/// INDICATE_STATUS body (`struct rndis_indicate_status`): 12 bytes; status data follows.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IndicateStatus {
    /// [`RndisStatus`] (e.g. media connect).
    pub status: U32,
    /// Bytes of status data.
    pub status_buflen: U32,
    /// Offset of the status data from the body start.
    pub status_buf_offset: U32,
}

/// Diagnostic info in the status buffer of error indications
/// (`struct rndis_diagnostic_info`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DiagnosticInfo {
    /// Diagnostic status.
    pub diag_status: U32,
    /// Offset of the offending data.
    pub error_offset: U32,
}

/// KEEPALIVE body (`struct rndis_keepalive_request`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct KeepaliveRequest {
    /// Request id.
    pub req_id: U32,
}

/// KEEPALIVE completion body (`struct rndis_keepalive_complete`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct KeepaliveComplete {
    /// Request id.
    pub req_id: U32,
    /// [`RndisStatus`].
    pub status: U32,
}

// ---------------------------------------------------------------------------------------
// Data packets and per-packet info.

/// PACKET body (`struct rndis_packet`): 36 bytes; PPIs and the frame follow.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RndisPacket {
    /// Frame start, from the body start.
    pub data_offset: U32,
    /// Frame length.
    pub data_len: U32,
    /// Out-of-band data offset (0; netvsc does not use OOB data).
    pub oob_data_offset: U32,
    /// Out-of-band data length (0).
    pub oob_data_len: U32,
    /// Out-of-band element count (0).
    pub num_oob_data_elements: U32,
    /// First PPI, from the body start.
    pub per_pkt_info_offset: U32,
    /// Total bytes of all PPIs.
    pub per_pkt_info_len: U32,
    /// Zero.
    pub vc_handle: U32,
    /// Zero.
    pub reserved: U32,
}

/// Out-of-band data element (`struct rndis_oobd`): 12 bytes; unused by netvsc.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RndisOobd {
    /// Element size.
    pub size: U32,
    /// Element type.
    pub oob_type: U32,
    /// Class info offset.
    pub class_info_offset: U32,
}

/// PPI header (`struct rndis_per_packet_info`): 12 bytes; data follows at `ppi_offset`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PerPacketInfo {
    /// Whole PPI size, header included.
    pub size: U32,
    /// Bits 0..30 [`PpiType`], bit 31 [`PPI_INTERNAL`].
    pub type_word: U32,
    /// Offset of the data from the PPI start (12).
    pub ppi_offset: U32,
}

/// Bit 31 of a PPI type word: an internal (Hyper-V specific) PPI type.
pub const PPI_INTERNAL: u32 = 0x8000_0000;
/// Internal PPI type 1: packet id, used with RSC (`RNDIS_PKTINFO_ID`).
pub const RNDIS_PKTINFO_ID: u32 = 1;
/// Size of [`PerPacketInfo`].
pub const PPI_HEADER_SIZE: usize = size_of::<PerPacketInfo>();

wire_enum! {
    /// PPI types (`enum ndis_per_pkt_info_type`, hyperv_net.h).
    pub struct PpiType(u32) {
        /// `TCPIP_CHKSUM_PKTINFO`: [`NdisTcpIpChecksumInfo`].
        TCPIP_CHKSUM_PKTINFO = 0,
        /// `IPSEC_PKTINFO`.
        IPSEC_PKTINFO = 1,
        /// `TCP_LARGESEND_PKTINFO`: [`NdisTcpLsoInfo`].
        TCP_LARGESEND_PKTINFO = 2,
        /// `CLASSIFICATION_HANDLE_PKTINFO`.
        CLASSIFICATION_HANDLE_PKTINFO = 3,
        /// `NDIS_RESERVED`.
        NDIS_RESERVED = 4,
        /// `SG_LIST_PKTINFO`.
        SG_LIST_PKTINFO = 5,
        /// `IEEE_8021Q_INFO`: [`Ndis8021qInfo`].
        IEEE_8021Q_INFO = 6,
        /// `ORIGINAL_PKTINFO`.
        ORIGINAL_PKTINFO = 7,
        /// `PACKET_CANCEL_ID`, also `NBL_HASH_VALUE`: the RSS hash (u32) on receive.
        PACKET_CANCEL_ID = 8,
        /// `ORIGINAL_NET_BUFLIST`, also `NBL_HASH_INFO`: hash type/function (u32).
        ORIGINAL_NET_BUFLIST = 9,
        /// `CACHED_NET_BUFLIST`.
        CACHED_NET_BUFLIST = 10,
        /// `SHORT_PKT_PADINFO`.
        SHORT_PKT_PADINFO = 11,
    }
}

impl PpiType {
    /// `NBL_HASH_VALUE`: the RSS hash value PPI (same number as `PACKET_CANCEL_ID`).
    pub const NBL_HASH_VALUE: PpiType = PpiType::PACKET_CANCEL_ID;
    /// `NBL_HASH_INFO`: the RSS hash info PPI (same number as `ORIGINAL_NET_BUFLIST`).
    pub const NBL_HASH_INFO: PpiType = PpiType::ORIGINAL_NET_BUFLIST;
}

/// Internal packet-id PPI data (`struct rndis_pktinfo_id`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PktInfoId {
    /// Version (1).
    pub ver: u8,
    /// Bit 0 sub-allocation (RSC fragment), bit 1 first fragment, bit 2 last fragment.
    pub flag: u8,
    /// Packet id.
    pub pkt_id: U16,
}

/// Checksum PPI data (`struct ndis_tcp_ip_checksum_info`): one u32 with a transmit view
/// (guest to host) and a receive view (host to guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NdisTcpIpChecksumInfo(pub u32);

impl NdisTcpIpChecksumInfo {
    /// Transmit: the packet is IPv4.
    pub const TX_IS_IPV4: u32 = 1 << 0;
    /// Transmit: the packet is IPv6.
    pub const TX_IS_IPV6: u32 = 1 << 1;
    /// Transmit: compute the TCP checksum.
    pub const TX_TCP_CHECKSUM: u32 = 1 << 2;
    /// Transmit: compute the UDP checksum.
    pub const TX_UDP_CHECKSUM: u32 = 1 << 3;
    /// Transmit: compute the IP header checksum.
    pub const TX_IP_HEADER_CHECKSUM: u32 = 1 << 4;
    /// Transmit: bits 16..25 hold the TCP header offset.
    pub const TX_TCP_HEADER_OFFSET_SHIFT: u32 = 16;
    /// Receive: TCP checksum failed.
    pub const RX_TCP_CHECKSUM_FAILED: u32 = 1 << 0;
    /// Receive: UDP checksum failed.
    pub const RX_UDP_CHECKSUM_FAILED: u32 = 1 << 1;
    /// Receive: IP checksum failed.
    pub const RX_IP_CHECKSUM_FAILED: u32 = 1 << 2;
    /// Receive: TCP checksum verified.
    pub const RX_TCP_CHECKSUM_SUCCEEDED: u32 = 1 << 3;
    /// Receive: UDP checksum verified.
    pub const RX_UDP_CHECKSUM_SUCCEEDED: u32 = 1 << 4;
    /// Receive: IP checksum verified.
    pub const RX_IP_CHECKSUM_SUCCEEDED: u32 = 1 << 5;
    /// Receive: loopback.
    pub const RX_LOOPBACK: u32 = 1 << 6;
    /// Receive: TCP checksum value invalid.
    pub const RX_TCP_CHECKSUM_VALUE_INVALID: u32 = 1 << 7;
    /// Receive: IP checksum value invalid.
    pub const RX_IP_CHECKSUM_VALUE_INVALID: u32 = 1 << 8;

    /// Whether all of `bits` are set.
    pub const fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
    /// Transmit view: the TCP header offset (10 bits).
    pub const fn tcp_header_offset(self) -> u16 {
        ((self.0 >> Self::TX_TCP_HEADER_OFFSET_SHIFT) & 0x3FF) as u16
    }
    /// Transmit view with `flags` and a TCP header offset (10 bits kept).
    pub const fn transmit(flags: u32, tcp_header_offset: u16) -> Self {
        NdisTcpIpChecksumInfo(
            (flags & 0xFFFF)
                | (((tcp_header_offset as u32) & 0x3FF) << Self::TX_TCP_HEADER_OFFSET_SHIFT),
        )
    }
}

/// IEEE 802.1Q PPI data (`struct ndis_pkt_8021q_info`): bits 0..2 priority, 3 CFI,
/// 4..15 VLAN id. This is NDIS's order, not the order of the 802.1Q tag (TCI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ndis8021qInfo(pub u32);

impl Ndis8021qInfo {
    /// From VLAN id (12 bits) and priority (3 bits), CFI clear.
    pub const fn new(vlan_id: u16, priority: u8) -> Self {
        Ndis8021qInfo(((priority as u32) & 0x7) | (((vlan_id as u32) & 0xFFF) << 4))
    }
    /// From an 802.1Q tag control word (priority 13..15, CFI/DEI 12, VLAN id 0..11).
    pub const fn from_tci(tci: u16) -> Self {
        let pri = (tci >> 13) as u32 & 0x7;
        let cfi = (tci >> 12) as u32 & 1;
        let vid = tci as u32 & 0xFFF;
        Ndis8021qInfo(pri | (cfi << 3) | (vid << 4))
    }
    /// As an 802.1Q tag control word.
    pub const fn tci(self) -> u16 {
        ((self.priority() as u16) << 13) | ((self.cfi() as u16) << 12) | self.vlan_id()
    }
    /// Priority (0..7).
    pub const fn priority(self) -> u8 {
        (self.0 & 0x7) as u8
    }
    /// Canonical format indicator / drop eligible.
    pub const fn cfi(self) -> bool {
        self.0 & 0x8 != 0
    }
    /// VLAN id (0..4095).
    pub const fn vlan_id(self) -> u16 {
        ((self.0 >> 4) & 0xFFF) as u16
    }
}

/// LSO PPI data, LSOv2 transmit view (`struct ndis_tcp_lso_info`): bits 0..19 MSS,
/// 20..29 TCP header offset, 30 type (1 = LSOv2), 31 IP version (1 = IPv6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NdisTcpLsoInfo(pub u32);

impl NdisTcpLsoInfo {
    /// An LSOv2 request (Linux's only form).
    pub const fn v2(mss: u32, tcp_header_offset: u16, ipv6: bool) -> Self {
        NdisTcpLsoInfo(
            (mss & 0xF_FFFF)
                | (((tcp_header_offset as u32) & 0x3FF) << 20)
                | (1 << 30)
                | ((ipv6 as u32) << 31),
        )
    }
    /// Maximum segment size.
    pub const fn mss(self) -> u32 {
        self.0 & 0xF_FFFF
    }
    /// TCP header offset.
    pub const fn tcp_header_offset(self) -> u16 {
        ((self.0 >> 20) & 0x3FF) as u16
    }
    /// Whether this is an LSOv2 request.
    pub const fn is_v2(self) -> bool {
        self.0 & (1 << 30) != 0
    }
    /// Whether the packet is IPv6.
    pub const fn is_ipv6(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

/// One per-packet-info entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ppi<'a> {
    /// Type (bits 0..30 of the type word).
    pub ppi_type: PpiType,
    /// Bit 31 of the type word.
    pub internal: bool,
    /// The data.
    pub data: &'a [u8],
}

impl<'a> Ppi<'a> {
    /// A public PPI of `ppi_type` carrying `data`, for [`encode_packet`].
    pub const fn new(ppi_type: PpiType, data: &'a [u8]) -> Self {
        Ppi {
            ppi_type,
            internal: false,
            data,
        }
    }

    /// The data as a little-endian u32, if it is at least 4 bytes long.
    pub fn data_u32(&self) -> Option<u32> {
        U32::read_from_prefix(self.data).ok().map(|(v, _)| v.get())
    }
}

/// A checked PPI list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PpiList<'a> {
    bytes: &'a [u8],
}

impl<'a> PpiList<'a> {
    /// An empty list.
    pub const EMPTY: PpiList<'static> = PpiList { bytes: &[] };

    /// Checks a PPI region: entries back to back, each at least a 12-byte header, its
    /// `size` within the region and its `ppi_offset` between 12 and `size`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (_, next) = split_ppi(rest)?;
            rest = next;
        }
        Ok(PpiList { bytes })
    }

    /// The raw region.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Iterates over the entries.
    pub fn iter(&self) -> PpiIter<'a> {
        PpiIter { rest: self.bytes }
    }

    /// The data of the first public PPI of type `t`.
    pub fn find(&self, t: PpiType) -> Option<&'a [u8]> {
        self.iter()
            .find(|p| !p.internal && p.ppi_type == t)
            .map(|p| p.data)
    }
}

#[inline]
fn split_ppi(bytes: &[u8]) -> Result<(Ppi<'_>, &[u8]), WireError> {
    // The header's words read in place (receive paths walk this for every frame).
    let head = bytes
        .first_chunk::<PPI_HEADER_SIZE>()
        .ok_or(WireError::BadLength)?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let (size, type_word, offset) = (word(0) as usize, word(4), word(8) as usize);
    if size < PPI_HEADER_SIZE || size > bytes.len() {
        return Err(WireError::BadLength);
    }
    if offset < PPI_HEADER_SIZE || offset > size {
        return Err(WireError::BadOffset);
    }
    Ok((
        Ppi {
            ppi_type: PpiType(type_word & !PPI_INTERNAL),
            internal: type_word & PPI_INTERNAL != 0,
            data: &bytes[offset..size],
        },
        &bytes[size..],
    ))
}

/// Iterator over a [`PpiList`].
#[derive(Clone, Debug)]
pub struct PpiIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PpiIter<'a> {
    type Item = Ppi<'a>;

    fn next(&mut self) -> Option<Ppi<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        // The list was checked by `PpiList::parse`; an error here cannot happen but
        // ends the iteration rather than panicking.
        match split_ppi(self.rest) {
            Ok((ppi, rest)) => {
                self.rest = rest;
                Some(ppi)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

/// A checked data packet: the fixed body, the frame and the PPI list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RndisPacketMsg<'a> {
    /// The fixed body.
    pub header: RndisPacket,
    /// The Ethernet frame.
    pub data: &'a [u8],
    /// The per-packet info.
    pub ppis: PpiList<'a>,
}

impl<'a> RndisPacketMsg<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let (header, _) = RndisPacket::read_from_prefix(body).map_err(|_| WireError::Truncated)?;
        let data = region(
            body,
            header.data_offset.get(),
            header.data_len.get(),
            size_of::<RndisPacket>(),
            true,
        )?;
        let ppi_bytes = region(
            body,
            header.per_pkt_info_offset.get(),
            header.per_pkt_info_len.get(),
            size_of::<RndisPacket>(),
            false,
        )?;
        Ok(RndisPacketMsg {
            header,
            data,
            ppis: PpiList::parse(ppi_bytes)?,
        })
    }

    /// Checksum PPI.
    pub fn checksum_info(&self) -> Option<NdisTcpIpChecksumInfo> {
        self.ppi_u32(PpiType::TCPIP_CHKSUM_PKTINFO)
            .map(NdisTcpIpChecksumInfo)
    }
    /// IEEE 802.1Q PPI.
    pub fn vlan(&self) -> Option<Ndis8021qInfo> {
        self.ppi_u32(PpiType::IEEE_8021Q_INFO).map(Ndis8021qInfo)
    }
    /// LSO PPI.
    pub fn lso(&self) -> Option<NdisTcpLsoInfo> {
        self.ppi_u32(PpiType::TCP_LARGESEND_PKTINFO)
            .map(NdisTcpLsoInfo)
    }
    /// RSS hash value PPI (type 8, as Linux and DPDK read it).
    pub fn hash_value(&self) -> Option<u32> {
        self.ppi_u32(PpiType::NBL_HASH_VALUE)
    }
    /// RSS hash info PPI (type 9).
    pub fn hash_info(&self) -> Option<u32> {
        self.ppi_u32(PpiType::NBL_HASH_INFO)
    }

    fn ppi_u32(&self, t: PpiType) -> Option<u32> {
        let data = self.ppis.find(t)?;
        U32::read_from_prefix(data).ok().map(|(v, _)| v.get())
    }
}

/// A PACKET message checked for a receive path in one pass: where the frame lies in
/// the message, and the per-packet info a NIC driver acts on.
///
/// [`PacketView::parse`] makes exactly the checks [`RndisMessage::parse`] makes for a
/// PACKET (header length, fixed body, frame and PPI regions inside the body, every PPI
/// entry well formed), walking the PPI list once and keeping the entries it knows, so a
/// driver does not decode the message into the general enum and then search the list
/// again per PPI type. One check is added: an IEEE 802.1Q PPI whose data is shorter than
/// its 4-byte value is [`WireError::BadLength`] (a driver would otherwise lose the tag
/// without noticing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketView {
    /// Offset of the frame from the start of the message (RNDIS header included); at
    /// least [`RNDIS_HEADER_SIZE`] + 36.
    pub data_start: usize,
    /// Length of the frame.
    pub data_len: usize,
    /// The first public IEEE 802.1Q PPI.
    pub vlan: Option<Ndis8021qInfo>,
    /// The first public checksum PPI (if at least 4 bytes).
    pub checksum: Option<NdisTcpIpChecksumInfo>,
    /// The first public RSS hash value PPI (if at least 4 bytes).
    pub hash_value: Option<u32>,
}

impl PacketView {
    /// Checks the message at the start of `bytes`: `Ok(None)` if it is not a PACKET
    /// (decode it with [`RndisMessage::parse`]), the view if it is a valid one.
    #[inline]
    pub fn parse(bytes: &[u8]) -> Result<Option<Self>, WireError> {
        // References into `bytes` (the structs have alignment 1), not copies.
        let (header, _) = RndisHeader::ref_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        if header.ndis_msg_type.get() != RndisMessageType::PACKET.0 {
            return Ok(None);
        }
        let len = usize::try_from(header.msg_len.get()).map_err(|_| WireError::BadLength)?;
        if len < RNDIS_HEADER_SIZE {
            return Err(WireError::BadLength);
        }
        let body = bytes
            .get(RNDIS_HEADER_SIZE..len)
            .ok_or(WireError::BadLength)?;
        let (p, _) = RndisPacket::ref_from_prefix(body).map_err(|_| WireError::Truncated)?;
        let fixed = size_of::<RndisPacket>();
        let data = region(body, p.data_offset.get(), p.data_len.get(), fixed, true)?;
        let mut view = PacketView {
            // `region` checked the offset against the body, which is smaller than a
            // usize can count.
            data_start: RNDIS_HEADER_SIZE + p.data_offset.get() as usize,
            data_len: data.len(),
            ..PacketView::default()
        };
        if p.per_pkt_info_len.get() == 0 {
            return Ok(Some(view));
        }
        let mut rest = region(
            body,
            p.per_pkt_info_offset.get(),
            p.per_pkt_info_len.get(),
            fixed,
            false,
        )?;
        while !rest.is_empty() {
            let (ppi, next) = split_ppi(rest)?;
            rest = next;
            if ppi.internal {
                continue;
            }
            let value = ppi.data.first_chunk::<4>().map(|v| u32::from_le_bytes(*v));
            match ppi.ppi_type {
                PpiType::IEEE_8021Q_INFO if view.vlan.is_none() => {
                    view.vlan = Some(Ndis8021qInfo(value.ok_or(WireError::BadLength)?));
                }
                PpiType::TCPIP_CHKSUM_PKTINFO if view.checksum.is_none() => {
                    view.checksum = value.map(NdisTcpIpChecksumInfo);
                }
                PpiType::NBL_HASH_VALUE if view.hash_value.is_none() => {
                    view.hash_value = value;
                }
                _ => {}
            }
        }
        Ok(Some(view))
    }

    /// The frame inside `bytes`, the message this view was parsed from.
    pub fn frame<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        bytes
            .get(self.data_start..self.data_start + self.data_len)
            .unwrap_or(&[])
    }
}

/// Resolves an (offset, length) pair counted from the body start. With `always` false a
/// zero length means "absent" and the offset is not checked; otherwise the region must
/// start at or after the fixed body (`min_offset`) and end inside the body.
fn region(
    body: &[u8],
    offset: u32,
    len: u32,
    min_offset: usize,
    always: bool,
) -> Result<&[u8], WireError> {
    if len == 0 && !always {
        return Ok(&[]);
    }
    let offset = usize::try_from(offset).map_err(|_| WireError::BadOffset)?;
    let len = usize::try_from(len).map_err(|_| WireError::BadLength)?;
    if offset < min_offset {
        return Err(WireError::BadOffset);
    }
    sub_slice(body, offset, len, WireError::BadOffset)
}

// ---------------------------------------------------------------------------------------
// The message enum.

/// A decoded RNDIS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RndisMessage<'a> {
    /// PACKET.
    Packet(RndisPacketMsg<'a>),
    /// INITIALIZE.
    InitializeRequest(InitializeRequest),
    /// INITIALIZE completion.
    InitializeComplete(InitializeComplete),
    /// HALT.
    HaltRequest(HaltRequest),
    /// QUERY with its input data.
    QueryRequest {
        /// Fixed body.
        body: QueryRequest,
        /// Input data.
        info: &'a [u8],
    },
    /// QUERY completion with its result.
    QueryComplete {
        /// Fixed body.
        body: QueryComplete,
        /// Result data.
        info: &'a [u8],
    },
    /// SET with its value.
    SetRequest {
        /// Fixed body.
        body: SetRequest,
        /// The value.
        info: &'a [u8],
    },
    /// SET completion.
    SetComplete(SetComplete),
    /// RESET.
    ResetRequest(ResetRequest),
    /// RESET completion.
    ResetComplete(ResetComplete),
    /// INDICATE_STATUS with its status data.
    IndicateStatus {
        /// Fixed body.
        body: IndicateStatus,
        /// Status data.
        status_buf: &'a [u8],
    },
    /// KEEPALIVE.
    KeepaliveRequest(KeepaliveRequest),
    /// KEEPALIVE completion.
    KeepaliveComplete(KeepaliveComplete),
}

fn fixed<T: FromBytes>(body: &[u8]) -> Result<T, WireError> {
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| WireError::Truncated)
}

impl<'a> RndisMessage<'a> {
    /// Decodes the RNDIS message at the start of `bytes`; bytes past `msg_len` are
    /// ignored.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        Self::parse_with_len(bytes).map(|(m, _)| m)
    }

    /// Decodes the RNDIS message at the start of `bytes` and returns it with its
    /// `msg_len`, the step to the next message of a batch.
    ///
    /// `msg_len` must cover the header and fit in `bytes` ([`WireError::BadLength`]); the
    /// body must hold the type's fixed part ([`WireError::Truncated`]); every data region
    /// must lie inside the body, after the fixed part ([`WireError::BadOffset`]).
    pub fn parse_with_len(bytes: &'a [u8]) -> Result<(Self, usize), WireError> {
        let (header, _) = RndisHeader::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        let len = usize::try_from(header.msg_len.get()).map_err(|_| WireError::BadLength)?;
        if len < RNDIS_HEADER_SIZE {
            return Err(WireError::BadLength);
        }
        let body = bytes
            .get(RNDIS_HEADER_SIZE..len)
            .ok_or(WireError::BadLength)?;
        let t = RndisMessageType(header.ndis_msg_type.get());
        let msg = match t {
            RndisMessageType::PACKET => Self::Packet(RndisPacketMsg::parse(body)?),
            RndisMessageType::INIT => Self::InitializeRequest(fixed(body)?),
            RndisMessageType::INIT_C => Self::InitializeComplete(fixed(body)?),
            RndisMessageType::HALT => Self::HaltRequest(fixed(body)?),
            RndisMessageType::QUERY => {
                let b: QueryRequest = fixed(body)?;
                let info = region(
                    body,
                    b.info_buf_offset.get(),
                    b.info_buflen.get(),
                    size_of::<QueryRequest>(),
                    false,
                )?;
                Self::QueryRequest { body: b, info }
            }
            RndisMessageType::QUERY_C => {
                let b: QueryComplete = fixed(body)?;
                let info = region(
                    body,
                    b.info_buf_offset.get(),
                    b.info_buflen.get(),
                    size_of::<QueryComplete>(),
                    false,
                )?;
                Self::QueryComplete { body: b, info }
            }
            RndisMessageType::SET => {
                let b: SetRequest = fixed(body)?;
                let info = region(
                    body,
                    b.info_buf_offset.get(),
                    b.info_buflen.get(),
                    size_of::<SetRequest>(),
                    false,
                )?;
                Self::SetRequest { body: b, info }
            }
            RndisMessageType::SET_C => Self::SetComplete(fixed(body)?),
            RndisMessageType::RESET => Self::ResetRequest(fixed(body)?),
            RndisMessageType::RESET_C => Self::ResetComplete(fixed(body)?),
            RndisMessageType::INDICATE => {
                let b: IndicateStatus = fixed(body)?;
                let status_buf = region(
                    body,
                    b.status_buf_offset.get(),
                    b.status_buflen.get(),
                    size_of::<IndicateStatus>(),
                    false,
                )?;
                Self::IndicateStatus {
                    body: b,
                    status_buf,
                }
            }
            RndisMessageType::KEEPALIVE => Self::KeepaliveRequest(fixed(body)?),
            RndisMessageType::KEEPALIVE_C => Self::KeepaliveComplete(fixed(body)?),
            RndisMessageType::SET_EX | RndisMessageType::SET_EX_C => {
                return Err(WireError::Unsupported(t.0))
            }
            t => return Err(WireError::UnknownType(t.0)),
        };
        Ok((msg, len))
    }

    /// The message type.
    pub fn message_type(&self) -> RndisMessageType {
        match self {
            Self::Packet(_) => RndisMessageType::PACKET,
            Self::InitializeRequest(_) => RndisMessageType::INIT,
            Self::InitializeComplete(_) => RndisMessageType::INIT_C,
            Self::HaltRequest(_) => RndisMessageType::HALT,
            Self::QueryRequest { .. } => RndisMessageType::QUERY,
            Self::QueryComplete { .. } => RndisMessageType::QUERY_C,
            Self::SetRequest { .. } => RndisMessageType::SET,
            Self::SetComplete(_) => RndisMessageType::SET_C,
            Self::ResetRequest(_) => RndisMessageType::RESET,
            Self::ResetComplete(_) => RndisMessageType::RESET_C,
            Self::IndicateStatus { .. } => RndisMessageType::INDICATE,
            Self::KeepaliveRequest(_) => RndisMessageType::KEEPALIVE,
            Self::KeepaliveComplete(_) => RndisMessageType::KEEPALIVE_C,
        }
    }

    /// Writes the message into `buf` and returns its length.
    ///
    /// Variable data is placed right after the fixed body, and the offset and length
    /// fields are rewritten to say so (QUERY/SET info at 20, QUERY completion result at
    /// 16, status data at 12, PPIs at 36 followed by the frame), as Linux lays them out.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        match self {
            Self::Packet(p) => encode_packet_raw(buf, p.ppis.as_bytes(), p.data),
            Self::InitializeRequest(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::InitializeComplete(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::HaltRequest(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::QueryRequest { body, info } => {
                let mut b = *body;
                b.info_buf_offset = (size_of::<QueryRequest>() as u32).into();
                b.info_buflen = len_u32(info.len())?.into();
                encode_fixed(buf, self.message_type(), &b, info)
            }
            Self::QueryComplete { body, info } => {
                let mut b = *body;
                b.info_buf_offset = (size_of::<QueryComplete>() as u32).into();
                b.info_buflen = len_u32(info.len())?.into();
                encode_fixed(buf, self.message_type(), &b, info)
            }
            Self::SetRequest { body, info } => {
                let mut b = *body;
                b.info_buf_offset = (size_of::<SetRequest>() as u32).into();
                b.info_buflen = len_u32(info.len())?.into();
                encode_fixed(buf, self.message_type(), &b, info)
            }
            Self::SetComplete(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::ResetRequest(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::ResetComplete(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::IndicateStatus { body, status_buf } => {
                let mut b = *body;
                b.status_buf_offset = (size_of::<IndicateStatus>() as u32).into();
                b.status_buflen = len_u32(status_buf.len())?.into();
                encode_fixed(buf, self.message_type(), &b, status_buf)
            }
            Self::KeepaliveRequest(b) => encode_fixed(buf, self.message_type(), b, &[]),
            Self::KeepaliveComplete(b) => encode_fixed(buf, self.message_type(), b, &[]),
        }
    }
}

fn len_u32(n: usize) -> Result<u32, WireError> {
    u32::try_from(n).map_err(|_| WireError::TooLong)
}

fn encode_fixed<T: IntoBytes + Immutable>(
    buf: &mut [u8],
    t: RndisMessageType,
    body: &T,
    tail: &[u8],
) -> Result<usize, WireError> {
    let body = body.as_bytes();
    let len = RNDIS_HEADER_SIZE
        .checked_add(body.len())
        .and_then(|n| n.checked_add(tail.len()))
        .ok_or(WireError::TooLong)?;
    let header = RndisHeader {
        ndis_msg_type: t.0.into(),
        msg_len: len_u32(len)?.into(),
    };
    let mut w = Writer::new(buf);
    w.put(header.as_bytes())?;
    w.put(body)?;
    w.put(tail)?;
    Ok(w.len())
}

fn encode_packet_raw(buf: &mut [u8], ppis: &[u8], frame: &[u8]) -> Result<usize, WireError> {
    let fixed_len = size_of::<RndisPacket>();
    let data_offset = fixed_len
        .checked_add(ppis.len())
        .ok_or(WireError::TooLong)?;
    let body = RndisPacket {
        data_offset: len_u32(data_offset)?.into(),
        data_len: len_u32(frame.len())?.into(),
        per_pkt_info_offset: len_u32(fixed_len)?.into(),
        per_pkt_info_len: len_u32(ppis.len())?.into(),
        ..RndisPacket::new_zeroed()
    };
    let mut w = Writer::new(buf);
    let total = RNDIS_HEADER_SIZE
        .checked_add(data_offset)
        .and_then(|n| n.checked_add(frame.len()))
        .ok_or(WireError::TooLong)?;
    let header = RndisHeader {
        ndis_msg_type: RndisMessageType::PACKET.0.into(),
        msg_len: len_u32(total)?.into(),
    };
    w.put(header.as_bytes())?;
    w.put(body.as_bytes())?;
    w.put(ppis)?;
    w.put(frame)?;
    Ok(w.len())
}

/// Writes a PACKET message the way Linux builds one: the PPIs right after the 36-byte
/// body (each a 12-byte header plus its data padded to 4 bytes), then the frame;
/// `msg_len` = 8 + 36 + PPI bytes + frame length, without trailing padding.
pub fn encode_packet(buf: &mut [u8], ppis: &[Ppi<'_>], frame: &[u8]) -> Result<usize, WireError> {
    let ppi_len = ppis.iter().try_fold(0usize, |acc, p| {
        p.data
            .len()
            .checked_add(3)
            .map(|n| n & !3)
            .and_then(|n| n.checked_add(PPI_HEADER_SIZE))
            .and_then(|n| acc.checked_add(n))
            .ok_or(WireError::TooLong)
    })?;
    // Reserve the PPI region inside `buf` and fill it in place, then write around it.
    let fixed_end = RNDIS_HEADER_SIZE + size_of::<RndisPacket>();
    let region = buf
        .get_mut(fixed_end..)
        .and_then(|b| b.get_mut(..ppi_len))
        .ok_or(WireError::BufferTooSmall)?;
    let mut w = Writer::new(region);
    for p in ppis {
        let padded = (p.data.len() + 3) & !3;
        let size = len_u32(PPI_HEADER_SIZE + padded)?;
        let word = p.ppi_type.0 | if p.internal { PPI_INTERNAL } else { 0 };
        let hdr = PerPacketInfo {
            size: size.into(),
            type_word: word.into(),
            ppi_offset: (PPI_HEADER_SIZE as u32).into(),
        };
        w.put(hdr.as_bytes())?;
        w.put(p.data)?;
        w.zeros(padded - p.data.len())?;
    }
    // Now the header, body and frame; the PPI bytes already sit at their place.
    let data_offset = size_of::<RndisPacket>() + ppi_len;
    let total = RNDIS_HEADER_SIZE
        .checked_add(data_offset)
        .and_then(|n| n.checked_add(frame.len()))
        .ok_or(WireError::TooLong)?;
    let frame_dst = buf
        .get_mut(RNDIS_HEADER_SIZE + data_offset..total)
        .ok_or(WireError::BufferTooSmall)?;
    frame_dst.copy_from_slice(frame);
    let header = RndisHeader {
        ndis_msg_type: RndisMessageType::PACKET.0.into(),
        msg_len: len_u32(total)?.into(),
    };
    let body = RndisPacket {
        data_offset: len_u32(data_offset)?.into(),
        data_len: len_u32(frame.len())?.into(),
        per_pkt_info_offset: (size_of::<RndisPacket>() as u32).into(),
        per_pkt_info_len: len_u32(ppi_len)?.into(),
        ..RndisPacket::new_zeroed()
    };
    let mut w = Writer::new(buf);
    w.put(header.as_bytes())?;
    w.put(body.as_bytes())?;
    Ok(total)
}

// ---------------------------------------------------------------------------------------
// NDIS objects.

/// NDIS object header (`struct ndis_obj_header` / `struct ndis_object_header`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NdisObjectHeader {
    /// `NDIS_OBJECT_TYPE_*`.
    pub obj_type: u8,
    /// Revision.
    pub revision: u8,
    /// Size of the object in bytes.
    pub size: U16,
}

impl NdisObjectHeader {
    /// A header for an object of `obj_type`, `revision` and `size` bytes.
    pub const fn new(obj_type: u8, revision: u8, size: u16) -> Self {
        NdisObjectHeader {
            obj_type,
            revision,
            size: U16::new(size),
        }
    }
}

/// `NDIS_OBJECT_TYPE_DEFAULT` (offload parameters).
pub const NDIS_OBJECT_TYPE_DEFAULT: u8 = 0x80;
/// `NDIS_OBJECT_TYPE_RSS_CAPABILITIES`.
pub const NDIS_OBJECT_TYPE_RSS_CAPABILITIES: u8 = 0x88;
/// `NDIS_OBJECT_TYPE_RSS_PARAMETERS`.
pub const NDIS_OBJECT_TYPE_RSS_PARAMETERS: u8 = 0x89;
/// `NDIS_OBJECT_TYPE_OFFLOAD` (hardware offload capabilities).
pub const NDIS_OBJECT_TYPE_OFFLOAD: u8 = 0xA7;
/// Offload encapsulation object type (OpenVMM).
pub const NDIS_OBJECT_TYPE_OFFLOAD_ENCAPSULATION: u8 = 0xA8;
/// `NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2`.
pub const NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2: u8 = 2;
/// `NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2`.
pub const NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2: u16 = 18;
/// `NDIS_RECEIVE_SCALE_PARAMETERS_REVISION_2`.
pub const NDIS_RECEIVE_SCALE_PARAMETERS_REVISION_2: u8 = 2;
/// `NDIS_SIZEOF_RECEIVE_SCALE_PARAMETERS_REVISION_2`.
pub const NDIS_SIZEOF_RECEIVE_SCALE_PARAMETERS_REVISION_2: u16 = 40;
/// `NDIS_OFFLOAD_PARAMETERS_REVISION_3`.
pub const NDIS_OFFLOAD_PARAMETERS_REVISION_3: u8 = 3;
/// Offload parameters size Linux sends for NVSP <= 4 (`VERSION_4_OFFLOAD_SIZE`).
pub const VERSION_4_OFFLOAD_SIZE: u16 = 22;

/// RSS hash function Toeplitz (`NDIS_HASH_FUNC_TOEPLITZ`).
pub const NDIS_HASH_FUNC_TOEPLITZ: u32 = 0x0000_0001;
/// Hash type IPv4 (`NDIS_HASH_IPV4`).
pub const NDIS_HASH_IPV4: u32 = 0x0000_0100;
/// Hash type TCP/IPv4 (`NDIS_HASH_TCP_IPV4`).
pub const NDIS_HASH_TCP_IPV4: u32 = 0x0000_0200;
/// Hash type IPv6 (`NDIS_HASH_IPV6`).
pub const NDIS_HASH_IPV6: u32 = 0x0000_0400;
/// Hash type IPv6 with extensions (`NDIS_HASH_IPV6_EX`).
pub const NDIS_HASH_IPV6_EX: u32 = 0x0000_0800;
/// Hash type TCP/IPv6 (`NDIS_HASH_TCP_IPV6`).
pub const NDIS_HASH_TCP_IPV6: u32 = 0x0000_1000;
/// Hash type TCP/IPv6 with extensions (`NDIS_HASH_TCP_IPV6_EX`).
pub const NDIS_HASH_TCP_IPV6_EX: u32 = 0x0000_2000;

/// RSS parameter flag: base CPU unchanged (`NDIS_RSS_PARAM_FLAG_BASE_CPU_UNCHANGED`).
pub const NDIS_RSS_PARAM_FLAG_BASE_CPU_UNCHANGED: u16 = 0x0001;
/// RSS parameter flag: hash info unchanged (`NDIS_RSS_PARAM_FLAG_HASH_INFO_UNCHANGED`).
pub const NDIS_RSS_PARAM_FLAG_HASH_INFO_UNCHANGED: u16 = 0x0002;
/// RSS parameter flag: table unchanged (`NDIS_RSS_PARAM_FLAG_ITABLE_UNCHANGED`).
pub const NDIS_RSS_PARAM_FLAG_ITABLE_UNCHANGED: u16 = 0x0004;
/// RSS parameter flag: key unchanged (`NDIS_RSS_PARAM_FLAG_HASH_KEY_UNCHANGED`).
pub const NDIS_RSS_PARAM_FLAG_HASH_KEY_UNCHANGED: u16 = 0x0008;
/// RSS parameter flag: disable RSS (`NDIS_RSS_PARAM_FLAG_DISABLE_RSS`).
pub const NDIS_RSS_PARAM_FLAG_DISABLE_RSS: u16 = 0x0010;
/// RSS parameter flag: default processor unchanged (OpenVMM).
pub const NDIS_RSS_PARAM_FLAG_DEFAULT_PROCESSOR_UNCHANGED: u16 = 0x0020;

/// RSS capability: message-signalled interrupts (`NDIS_RSS_CAPS_MESSAGE_SIGNALED_INTERRUPTS`).
pub const NDIS_RSS_CAPS_MESSAGE_SIGNALED_INTERRUPTS: u32 = 0x0100_0000;
/// RSS capability: classification at ISR (`NDIS_RSS_CAPS_CLASSIFICATION_AT_ISR`).
pub const NDIS_RSS_CAPS_CLASSIFICATION_AT_ISR: u32 = 0x0200_0000;
/// RSS capability: classification at DPC (`NDIS_RSS_CAPS_CLASSIFICATION_AT_DPC`).
pub const NDIS_RSS_CAPS_CLASSIFICATION_AT_DPC: u32 = 0x0400_0000;
/// RSS capability: using MSI-X (`NDIS_RSS_CAPS_USING_MSI_X`).
pub const NDIS_RSS_CAPS_USING_MSI_X: u32 = 0x0800_0000;
/// RSS capability: RSS on ports (`NDIS_RSS_CAPS_RSS_AVAILABLE_ON_PORTS`).
pub const NDIS_RSS_CAPS_RSS_AVAILABLE_ON_PORTS: u32 = 0x1000_0000;
/// RSS capability: supports MSI-X (`NDIS_RSS_CAPS_SUPPORTS_MSI_X`).
pub const NDIS_RSS_CAPS_SUPPORTS_MSI_X: u32 = 0x2000_0000;
/// RSS capability: TCP/IPv4 hashing (`NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4`).
pub const NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4: u32 = 0x0000_0100;
/// RSS capability: TCP/IPv6 hashing (`NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6`).
pub const NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6: u32 = 0x0000_0200;
/// RSS capability: TCP/IPv6 extension hashing (`NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6_EX`).
pub const NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6_EX: u32 = 0x0000_0400;

/// Toeplitz key length (`NETVSC_HASH_KEYLEN`).
pub const NETVSC_HASH_KEYLEN: usize = 40;
/// Default receive indirection table entries (`ITAB_NUM`).
pub const ITAB_NUM: usize = 128;
/// Largest receive indirection table Linux accepts from the host (`ITAB_NUM_MAX`).
pub const ITAB_NUM_MAX: usize = 256;
/// Linux's default Toeplitz key (`netvsc_hash_key`, rndis_filter.c).
pub const NETVSC_DEFAULT_HASH_KEY: [u8; NETVSC_HASH_KEYLEN] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// RSS capabilities, the result of OID_GEN_RECEIVE_SCALE_CAPABILITIES
/// (`struct ndis_recv_scale_cap`, packed): 18 bytes on the wire.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NdisRecvScaleCap {
    /// Type 0x88, revision 2, size 18.
    pub hdr: NdisObjectHeader,
    /// `NDIS_RSS_CAPS_*`.
    pub cap_flag: U32,
    /// Interrupt messages (OpenVMM 1).
    pub num_int_msg: U32,
    /// Receive queues the host offers.
    pub num_recv_que: U32,
    /// Indirection table entries (OpenVMM 128).
    pub num_indirect_tabent: U16,
}

/// RSS parameters, set with OID_GEN_RECEIVE_SCALE_PARAMETERS
/// (`struct ndis_recv_scale_param`, revision 2): 40 bytes, followed in the info buffer
/// by the u32 indirection table and the key. The C struct has padding after the u16s at
/// 12 and 20; here it is explicit.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NdisRecvScaleParam {
    /// Type 0x89, revision 2, size 40.
    pub hdr: NdisObjectHeader,
    /// `NDIS_RSS_PARAM_FLAG_*`.
    pub flag: U16,
    /// Base CPU.
    pub base_cpu_number: U16,
    /// Hash function | hash types.
    pub hashinfo: U32,
    /// Indirection table size in bytes (4 per entry).
    pub indirect_tabsize: U16,
    /// Padding.
    pub pad1: [u8; 2],
    /// Table offset from the start of this struct.
    pub indirect_taboffset: U32,
    /// Key size in bytes (40).
    pub hashkey_size: U16,
    /// Padding.
    pub pad2: [u8; 2],
    /// Key offset from the start of this struct.
    pub hashkey_offset: U32,
    /// Processor masks offset.
    pub processor_masks_offset: U32,
    /// Number of processor masks.
    pub num_processor_masks: U32,
    /// Processor mask entry size.
    pub processor_masks_entry_size: U32,
}

/// A checked RSS parameter buffer: the struct, its indirection table and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RssParameters<'a> {
    /// The fixed struct.
    pub params: NdisRecvScaleParam,
    /// Indirection table entries (queue numbers).
    pub table: &'a [U32],
    /// The hash key.
    pub key: &'a [u8],
}

impl<'a> RssParameters<'a> {
    /// Checks an RSS parameter buffer (a SET info buffer). Table and key must lie inside
    /// the buffer, the table in whole u32 entries; a zero size means "not present".
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        let (params, _) =
            NdisRecvScaleParam::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        let min = size_of::<NdisRecvScaleParam>();
        let table_bytes = region(
            bytes,
            params.indirect_taboffset.get(),
            u32::from(params.indirect_tabsize.get()),
            min,
            false,
        )?;
        let table = <[U32]>::ref_from_bytes(table_bytes).map_err(|_| WireError::BadLength)?;
        let key = region(
            bytes,
            params.hashkey_offset.get(),
            u32::from(params.hashkey_size.get()),
            min,
            false,
        )?;
        Ok(RssParameters { params, table, key })
    }
}

/// Writes an RSS parameter buffer the way Linux does: the 40-byte struct, the table at
/// offset 40, the key after it.
pub fn encode_rss_parameters(
    buf: &mut [u8],
    flag: u16,
    hashinfo: u32,
    table: &[u32],
    key: &[u8],
) -> Result<usize, WireError> {
    let base = size_of::<NdisRecvScaleParam>();
    let tabsize = table
        .len()
        .checked_mul(4)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or(WireError::TooLong)?;
    let keysize = u16::try_from(key.len()).map_err(|_| WireError::TooLong)?;
    let params = NdisRecvScaleParam {
        hdr: NdisObjectHeader::new(
            NDIS_OBJECT_TYPE_RSS_PARAMETERS,
            NDIS_RECEIVE_SCALE_PARAMETERS_REVISION_2,
            NDIS_SIZEOF_RECEIVE_SCALE_PARAMETERS_REVISION_2,
        ),
        flag: flag.into(),
        hashinfo: hashinfo.into(),
        indirect_tabsize: tabsize.into(),
        indirect_taboffset: (base as u32).into(),
        hashkey_size: keysize.into(),
        hashkey_offset: (base as u32 + u32::from(tabsize)).into(),
        ..NdisRecvScaleParam::default()
    };
    let mut w = Writer::new(buf);
    w.put(params.as_bytes())?;
    for e in table {
        w.put(U32::new(*e).as_bytes())?;
    }
    w.put(key)?;
    Ok(w.len())
}

/// Offload parameter value: no change (`NDIS_OFFLOAD_PARAMETERS_NO_CHANGE`).
pub const NDIS_OFFLOAD_PARAMETERS_NO_CHANGE: u8 = 0;
/// Checksum offload: TX and RX disabled.
pub const NDIS_OFFLOAD_PARAMETERS_TX_RX_DISABLED: u8 = 1;
/// Checksum offload: TX enabled, RX disabled.
pub const NDIS_OFFLOAD_PARAMETERS_TX_ENABLED_RX_DISABLED: u8 = 2;
/// Checksum offload: RX enabled, TX disabled.
pub const NDIS_OFFLOAD_PARAMETERS_RX_ENABLED_TX_DISABLED: u8 = 3;
/// Checksum offload: TX and RX enabled.
pub const NDIS_OFFLOAD_PARAMETERS_TX_RX_ENABLED: u8 = 4;
/// LSOv2 / RSC: disabled.
pub const NDIS_OFFLOAD_PARAMETERS_LSOV2_DISABLED: u8 = 1;
/// LSOv2 / RSC: enabled.
pub const NDIS_OFFLOAD_PARAMETERS_LSOV2_ENABLED: u8 = 2;

/// Offload parameters, set with OID_TCP_OFFLOAD_PARAMETERS (`struct ndis_offload_params`,
/// revision 3): 28 bytes (Linux sends 22 for NVSP 4 and older). The C struct's padding
/// at 15 and 26..28 is explicit here.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NdisOffloadParams {
    /// Type 0x80, revision 3, size 28 or 22.
    pub header: NdisObjectHeader,
    /// IPv4 header checksum.
    pub ip_v4_csum: u8,
    /// TCP/IPv4 checksum.
    pub tcp_ip_v4_csum: u8,
    /// UDP/IPv4 checksum.
    pub udp_ip_v4_csum: u8,
    /// TCP/IPv6 checksum.
    pub tcp_ip_v6_csum: u8,
    /// UDP/IPv6 checksum.
    pub udp_ip_v6_csum: u8,
    /// LSOv1.
    pub lso_v1: u8,
    /// IPsec v1.
    pub ip_sec_v1: u8,
    /// LSOv2 IPv4.
    pub lso_v2_ipv4: u8,
    /// LSOv2 IPv6.
    pub lso_v2_ipv6: u8,
    /// TCP connection offload IPv4.
    pub tcp_connection_ip_v4: u8,
    /// TCP connection offload IPv6.
    pub tcp_connection_ip_v6: u8,
    /// Padding.
    pub pad1: u8,
    /// Flags.
    pub flags: U32,
    /// IPsec v2.
    pub ip_sec_v2: u8,
    /// IPsec v2 IPv4.
    pub ip_sec_v2_ip_v4: u8,
    /// RSC IPv4.
    pub rsc_ip_v4: u8,
    /// RSC IPv6.
    pub rsc_ip_v6: u8,
    /// Encapsulated packet task offload.
    pub encapsulated_packet_task_offload: u8,
    /// Encapsulation types.
    pub encapsulation_types: u8,
    /// Padding.
    pub pad2: [u8; 2],
}

/// Value header of OID_GEN_RNDIS_CONFIG_PARAMETER (`struct rndis_config_parameter_info`):
/// 20 bytes; name and value (UTF-16) follow.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RndisConfigParameterInfo {
    /// Offset of the name.
    pub parameter_name_offset: U32,
    /// Length of the name in bytes.
    pub parameter_name_length: U32,
    /// 0 integer, 2 string.
    pub parameter_type: U32,
    /// Offset of the value.
    pub parameter_value_offset: U32,
    /// Length of the value in bytes.
    pub parameter_value_length: U32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use proptest::prelude::*;
    use std::vec::Vec;

    // Sizes and offsets: Linux drivers/net/hyperv/hyperv_net.h @67fa8c35 and
    // include/linux/rndis.h, see shared/reference/wire-layouts.md section 5. Bodies are
    // checked at their body offsets; "Abs." = 8 + body offset.

    #[test]
    fn header_and_init_layouts() {
        assert_eq!(size_of::<RndisHeader>(), 8);
        assert_eq!(offset_of!(RndisHeader, ndis_msg_type), 0);
        assert_eq!(offset_of!(RndisHeader, msg_len), 4);

        assert_eq!(size_of::<InitializeRequest>(), 16);
        assert_eq!(offset_of!(InitializeRequest, req_id), 0);
        assert_eq!(offset_of!(InitializeRequest, major_ver), 4);
        assert_eq!(offset_of!(InitializeRequest, minor_ver), 8);
        assert_eq!(offset_of!(InitializeRequest, max_xfer_size), 12);

        assert_eq!(size_of::<InitializeComplete>(), 44);
        assert_eq!(offset_of!(InitializeComplete, req_id), 0);
        assert_eq!(offset_of!(InitializeComplete, status), 4);
        assert_eq!(offset_of!(InitializeComplete, major_ver), 8);
        assert_eq!(offset_of!(InitializeComplete, minor_ver), 12);
        assert_eq!(offset_of!(InitializeComplete, dev_flags), 16);
        assert_eq!(offset_of!(InitializeComplete, medium), 20);
        assert_eq!(offset_of!(InitializeComplete, max_pkt_per_msg), 24);
        assert_eq!(offset_of!(InitializeComplete, max_xfer_size), 28);
        assert_eq!(offset_of!(InitializeComplete, pkt_alignment_factor), 32);
        assert_eq!(offset_of!(InitializeComplete, af_list_offset), 36);
        assert_eq!(offset_of!(InitializeComplete, af_list_size), 40);
        // struct rndis_message = header + largest body (initialize complete) = 52.
        assert_eq!(RNDIS_HEADER_SIZE + size_of::<InitializeComplete>(), 52);
    }

    #[test]
    fn control_layouts() {
        assert_eq!(size_of::<HaltRequest>(), 4);
        assert_eq!(offset_of!(HaltRequest, req_id), 0);

        for (size, offs) in [
            (
                size_of::<QueryRequest>(),
                [
                    offset_of!(QueryRequest, req_id),
                    offset_of!(QueryRequest, oid),
                    offset_of!(QueryRequest, info_buflen),
                    offset_of!(QueryRequest, info_buf_offset),
                    offset_of!(QueryRequest, dev_vc_handle),
                ],
            ),
            (
                size_of::<SetRequest>(),
                [
                    offset_of!(SetRequest, req_id),
                    offset_of!(SetRequest, oid),
                    offset_of!(SetRequest, info_buflen),
                    offset_of!(SetRequest, info_buf_offset),
                    offset_of!(SetRequest, dev_vc_handle),
                ],
            ),
        ] {
            assert_eq!(size, 20);
            assert_eq!(offs, [0, 4, 8, 12, 16]);
        }

        assert_eq!(size_of::<QueryComplete>(), 16);
        assert_eq!(offset_of!(QueryComplete, req_id), 0);
        assert_eq!(offset_of!(QueryComplete, status), 4);
        assert_eq!(offset_of!(QueryComplete, info_buflen), 8);
        assert_eq!(offset_of!(QueryComplete, info_buf_offset), 12);

        assert_eq!(size_of::<SetComplete>(), 8);
        assert_eq!(offset_of!(SetComplete, req_id), 0);
        assert_eq!(offset_of!(SetComplete, status), 4);

        assert_eq!(size_of::<ResetRequest>(), 4);
        assert_eq!(offset_of!(ResetRequest, reserved), 0);
        assert_eq!(size_of::<ResetComplete>(), 8);
        assert_eq!(offset_of!(ResetComplete, status), 0);
        assert_eq!(offset_of!(ResetComplete, addressing_reset), 4);

        assert_eq!(size_of::<IndicateStatus>(), 12);
        assert_eq!(offset_of!(IndicateStatus, status), 0);
        assert_eq!(offset_of!(IndicateStatus, status_buflen), 4);
        assert_eq!(offset_of!(IndicateStatus, status_buf_offset), 8);

        assert_eq!(size_of::<DiagnosticInfo>(), 8);
        assert_eq!(offset_of!(DiagnosticInfo, diag_status), 0);
        assert_eq!(offset_of!(DiagnosticInfo, error_offset), 4);

        assert_eq!(size_of::<KeepaliveRequest>(), 4);
        assert_eq!(offset_of!(KeepaliveRequest, req_id), 0);
        assert_eq!(size_of::<KeepaliveComplete>(), 8);
        assert_eq!(offset_of!(KeepaliveComplete, req_id), 0);
        assert_eq!(offset_of!(KeepaliveComplete, status), 4);
    }

    #[test]
    fn packet_layouts() {
        assert_eq!(size_of::<RndisPacket>(), 36);
        assert_eq!(offset_of!(RndisPacket, data_offset), 0);
        assert_eq!(offset_of!(RndisPacket, data_len), 4);
        assert_eq!(offset_of!(RndisPacket, oob_data_offset), 8);
        assert_eq!(offset_of!(RndisPacket, oob_data_len), 12);
        assert_eq!(offset_of!(RndisPacket, num_oob_data_elements), 16);
        assert_eq!(offset_of!(RndisPacket, per_pkt_info_offset), 20);
        assert_eq!(offset_of!(RndisPacket, per_pkt_info_len), 24);
        assert_eq!(offset_of!(RndisPacket, vc_handle), 28);
        assert_eq!(offset_of!(RndisPacket, reserved), 32);

        assert_eq!(size_of::<RndisOobd>(), 12);
        assert_eq!(offset_of!(RndisOobd, size), 0);
        assert_eq!(offset_of!(RndisOobd, oob_type), 4);
        assert_eq!(offset_of!(RndisOobd, class_info_offset), 8);

        assert_eq!(size_of::<PerPacketInfo>(), 12);
        assert_eq!(offset_of!(PerPacketInfo, size), 0);
        assert_eq!(offset_of!(PerPacketInfo, type_word), 4);
        assert_eq!(offset_of!(PerPacketInfo, ppi_offset), 8);

        assert_eq!(size_of::<PktInfoId>(), 4);
        assert_eq!(offset_of!(PktInfoId, ver), 0);
        assert_eq!(offset_of!(PktInfoId, flag), 1);
        assert_eq!(offset_of!(PktInfoId, pkt_id), 2);
    }

    #[test]
    fn ndis_object_layouts() {
        assert_eq!(size_of::<NdisObjectHeader>(), 4);
        assert_eq!(offset_of!(NdisObjectHeader, obj_type), 0);
        assert_eq!(offset_of!(NdisObjectHeader, revision), 1);
        assert_eq!(offset_of!(NdisObjectHeader, size), 2);

        assert_eq!(size_of::<NdisRecvScaleCap>(), 18);
        assert_eq!(offset_of!(NdisRecvScaleCap, hdr), 0);
        assert_eq!(offset_of!(NdisRecvScaleCap, cap_flag), 4);
        assert_eq!(offset_of!(NdisRecvScaleCap, num_int_msg), 8);
        assert_eq!(offset_of!(NdisRecvScaleCap, num_recv_que), 12);
        assert_eq!(offset_of!(NdisRecvScaleCap, num_indirect_tabent), 16);

        assert_eq!(size_of::<NdisRecvScaleParam>(), 40);
        assert_eq!(offset_of!(NdisRecvScaleParam, hdr), 0);
        assert_eq!(offset_of!(NdisRecvScaleParam, flag), 4);
        assert_eq!(offset_of!(NdisRecvScaleParam, base_cpu_number), 6);
        assert_eq!(offset_of!(NdisRecvScaleParam, hashinfo), 8);
        assert_eq!(offset_of!(NdisRecvScaleParam, indirect_tabsize), 12);
        assert_eq!(offset_of!(NdisRecvScaleParam, indirect_taboffset), 16);
        assert_eq!(offset_of!(NdisRecvScaleParam, hashkey_size), 20);
        assert_eq!(offset_of!(NdisRecvScaleParam, hashkey_offset), 24);
        assert_eq!(offset_of!(NdisRecvScaleParam, processor_masks_offset), 28);
        assert_eq!(offset_of!(NdisRecvScaleParam, num_processor_masks), 32);
        assert_eq!(
            offset_of!(NdisRecvScaleParam, processor_masks_entry_size),
            36
        );

        assert_eq!(size_of::<NdisOffloadParams>(), 28);
        assert_eq!(offset_of!(NdisOffloadParams, header), 0);
        assert_eq!(offset_of!(NdisOffloadParams, ip_v4_csum), 4);
        assert_eq!(offset_of!(NdisOffloadParams, tcp_ip_v4_csum), 5);
        assert_eq!(offset_of!(NdisOffloadParams, udp_ip_v4_csum), 6);
        assert_eq!(offset_of!(NdisOffloadParams, tcp_ip_v6_csum), 7);
        assert_eq!(offset_of!(NdisOffloadParams, udp_ip_v6_csum), 8);
        assert_eq!(offset_of!(NdisOffloadParams, lso_v1), 9);
        assert_eq!(offset_of!(NdisOffloadParams, ip_sec_v1), 10);
        assert_eq!(offset_of!(NdisOffloadParams, lso_v2_ipv4), 11);
        assert_eq!(offset_of!(NdisOffloadParams, lso_v2_ipv6), 12);
        assert_eq!(offset_of!(NdisOffloadParams, tcp_connection_ip_v4), 13);
        assert_eq!(offset_of!(NdisOffloadParams, tcp_connection_ip_v6), 14);
        assert_eq!(offset_of!(NdisOffloadParams, flags), 16);
        assert_eq!(offset_of!(NdisOffloadParams, ip_sec_v2), 20);
        assert_eq!(offset_of!(NdisOffloadParams, ip_sec_v2_ip_v4), 21);
        assert_eq!(offset_of!(NdisOffloadParams, rsc_ip_v4), 22);
        assert_eq!(offset_of!(NdisOffloadParams, rsc_ip_v6), 23);
        assert_eq!(
            offset_of!(NdisOffloadParams, encapsulated_packet_task_offload),
            24
        );
        assert_eq!(offset_of!(NdisOffloadParams, encapsulation_types), 25);

        assert_eq!(size_of::<RndisConfigParameterInfo>(), 20);
        assert_eq!(
            offset_of!(RndisConfigParameterInfo, parameter_name_offset),
            0
        );
        assert_eq!(
            offset_of!(RndisConfigParameterInfo, parameter_name_length),
            4
        );
        assert_eq!(offset_of!(RndisConfigParameterInfo, parameter_type), 8);
        assert_eq!(
            offset_of!(RndisConfigParameterInfo, parameter_value_offset),
            12
        );
        assert_eq!(
            offset_of!(RndisConfigParameterInfo, parameter_value_length),
            16
        );
    }

    #[test]
    fn ppi_bit_layouts() {
        // Masks from wire-layouts.md ("IEEE 802.1Q PPI", "Checksum PPI", "LSO PPI").
        let v = Ndis8021qInfo::new(0xABC, 5);
        assert_eq!(v.0, 0xABC5);
        assert_eq!((v.vlan_id(), v.priority(), v.cfi()), (0xABC, 5, false));
        assert_eq!(Ndis8021qInfo::from_tci(0xBABC).0, 0xABCD);
        assert_eq!(Ndis8021qInfo(0xABCD).tci(), 0xBABC);

        let c = NdisTcpIpChecksumInfo::transmit(
            NdisTcpIpChecksumInfo::TX_IS_IPV4 | NdisTcpIpChecksumInfo::TX_TCP_CHECKSUM,
            34,
        );
        assert_eq!(c.0, 0x0022_0005);
        assert_eq!(c.tcp_header_offset(), 34);
        assert_eq!(NdisTcpIpChecksumInfo(0x3ff_0000).tcp_header_offset(), 0x3ff);
        assert_eq!(NdisTcpIpChecksumInfo::RX_IP_CHECKSUM_VALUE_INVALID, 0x100);

        let l = NdisTcpLsoInfo::v2(1460, 54, true);
        assert_eq!(l.0, 0x4000_0000 | 0x8000_0000 | (54 << 20) | 1460);
        assert_eq!(
            (l.mss(), l.tcp_header_offset(), l.is_v2(), l.is_ipv6()),
            (1460, 54, true, true)
        );
    }

    /// A host receive indication as Linux would see it: one frame with a checksum PPI,
    /// a VLAN PPI and a hash value PPI.
    fn rx_packet_fixture() -> Vec<u8> {
        let frame: Vec<u8> = (0..60u8).collect();
        let mut b = Vec::new();
        let ppis: [(u32, u32); 3] = [(0, 0x28), (6, 0x0645), (8, 0xdead_beef)];
        let ppi_len = 16 * ppis.len() as u32;
        let data_offset = 36 + ppi_len;
        let msg_len = 8 + data_offset + frame.len() as u32;
        for w in [
            1,
            msg_len,
            data_offset,
            frame.len() as u32,
            0,
            0,
            0,
            36,
            ppi_len,
            0,
            0,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        for (t, v) in ppis {
            for w in [16, t, 12, v] {
                b.extend_from_slice(&w.to_le_bytes());
            }
        }
        b.extend_from_slice(&frame);
        b
    }

    #[test]
    fn packet_decode_and_encode() {
        let bytes = rx_packet_fixture();
        let (m, len) = RndisMessage::parse_with_len(&bytes).unwrap();
        assert_eq!(len, bytes.len());
        let RndisMessage::Packet(p) = m else { panic!() };
        assert_eq!(p.data.len(), 60);
        assert_eq!(p.data[59], 59);
        assert_eq!(p.checksum_info(), Some(NdisTcpIpChecksumInfo(0x28)));
        assert!(p.checksum_info().unwrap().has(
            NdisTcpIpChecksumInfo::RX_TCP_CHECKSUM_SUCCEEDED
                | NdisTcpIpChecksumInfo::RX_IP_CHECKSUM_SUCCEEDED
        ));
        assert_eq!(p.vlan().unwrap().vlan_id(), 0x64);
        assert_eq!(p.vlan().unwrap().priority(), 5);
        assert_eq!(p.hash_value(), Some(0xdead_beef));
        assert_eq!(p.hash_info(), None);
        assert_eq!(p.lso(), None);
        assert_eq!(p.ppis.iter().count(), 3);

        // The generic encoder copies the PPI region and lays out the same bytes.
        let mut out = [0u8; 256];
        assert_eq!(m.encode(&mut out), Ok(bytes.len()));
        assert_eq!(&out[..bytes.len()], &bytes[..]);

        // The builder makes the same message from typed PPIs.
        let mut out2 = [0u8; 256];
        let (csum, vlan, hash) = (
            0x28u32.to_le_bytes(),
            0x0645u32.to_le_bytes(),
            0xdead_beefu32.to_le_bytes(),
        );
        let ppis = [
            Ppi::new(PpiType::TCPIP_CHKSUM_PKTINFO, &csum),
            Ppi::new(PpiType::IEEE_8021Q_INFO, &vlan),
            Ppi::new(PpiType::NBL_HASH_VALUE, &hash),
        ];
        let n = encode_packet(&mut out2, &ppis, p.data).unwrap();
        assert_eq!(&out2[..n], &bytes[..]);
        assert_eq!(
            encode_packet(&mut out2[..n - 1], &ppis, p.data),
            Err(WireError::BufferTooSmall)
        );
        assert_eq!(
            encode_packet(&mut out2[..50], &ppis, p.data),
            Err(WireError::BufferTooSmall)
        );

        // A PPI whose data is not a multiple of 4 is padded.
        let n = encode_packet(
            &mut out2,
            &[Ppi::new(PpiType::NDIS_RESERVED, &[1, 2, 3, 4, 5])],
            &[9],
        )
        .unwrap();
        let RndisMessage::Packet(q) = RndisMessage::parse(&out2[..n]).unwrap() else {
            panic!()
        };
        let ppi = q.ppis.iter().next().unwrap();
        assert_eq!(ppi.data, &[1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(q.data, &[9]);
    }

    #[test]
    fn packet_rejects_bad_offsets() {
        let good = rx_packet_fixture();
        let set = |off: usize, v: u32| {
            let mut b = good.clone();
            b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            b
        };
        // msg_len larger than the buffer, smaller than the header.
        assert_eq!(
            RndisMessage::parse(&set(4, good.len() as u32 + 1)),
            Err(WireError::BadLength)
        );
        assert_eq!(RndisMessage::parse(&set(4, 7)), Err(WireError::BadLength));
        // Body shorter than the 36-byte packet header.
        assert_eq!(RndisMessage::parse(&set(4, 40)), Err(WireError::Truncated));
        // Frame beyond the body; frame inside the fixed body.
        assert_eq!(RndisMessage::parse(&set(12, 61)), Err(WireError::BadOffset));
        assert_eq!(RndisMessage::parse(&set(8, 20)), Err(WireError::BadOffset));
        assert_eq!(
            RndisMessage::parse(&set(8, u32::MAX)),
            Err(WireError::BadOffset)
        );
        // PPI region out of bounds or inside the fixed body.
        assert_eq!(
            RndisMessage::parse(&set(32, 4000)),
            Err(WireError::BadOffset)
        );
        assert_eq!(RndisMessage::parse(&set(28, 8)), Err(WireError::BadOffset));
        // A PPI of size 0 (would loop forever), size past the region, data offset < 12.
        assert_eq!(RndisMessage::parse(&set(44, 0)), Err(WireError::BadLength));
        assert_eq!(RndisMessage::parse(&set(44, 17)), Err(WireError::BadLength));
        assert_eq!(RndisMessage::parse(&set(52, 4)), Err(WireError::BadOffset));
        assert_eq!(RndisMessage::parse(&set(52, 17)), Err(WireError::BadOffset));
        // Region length not covering whole PPIs.
        assert_eq!(RndisMessage::parse(&set(32, 44)), Err(WireError::BadLength));
        // Unknown and unsupported types.
        assert_eq!(
            RndisMessage::parse(&set(0, 0x42)),
            Err(WireError::UnknownType(0x42))
        );
        assert_eq!(
            RndisMessage::parse(&set(0, 9)),
            Err(WireError::Unsupported(9))
        );
        assert_eq!(RndisMessage::parse(&good[..7]), Err(WireError::Truncated));
    }

    #[test]
    fn init_fixture() {
        // Linux INITIALIZE: version 1.0, max_xfer_size 0x4000.
        let req = RndisMessage::InitializeRequest(InitializeRequest {
            req_id: 1.into(),
            major_ver: RNDIS_MAJOR_VERSION.into(),
            minor_ver: RNDIS_MINOR_VERSION.into(),
            max_xfer_size: RNDIS_LINUX_MAX_XFER_SIZE.into(),
        });
        let mut out = [0u8; 64];
        let n = req.encode(&mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[2, 0, 0, 0, 24, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0]
        );
        assert_eq!(RndisMessage::parse(&out[..n]), Ok(req));

        // OpenVMM's completion: connectionless, 802.3, 8 packets, alignment 8.
        let mut c = [0u8; 52];
        c[..4].copy_from_slice(&0x8000_0002u32.to_le_bytes());
        c[4] = 52;
        c[8] = 1;
        c[16] = 1; // major
        c[24] = 1; // dev_flags
        c[32] = 8; // max_pkt_per_msg
        c[36..40].copy_from_slice(&0xEFFF_FFFFu32.to_le_bytes());
        c[40] = 3;
        let RndisMessage::InitializeComplete(ic) = RndisMessage::parse(&c).unwrap() else {
            panic!()
        };
        assert_eq!(ic.max_pkt_per_msg.get(), 8);
        assert_eq!(ic.pkt_alignment_factor.get(), 3);
        assert_eq!(ic.dev_flags.get(), RNDIS_DF_CONNECTIONLESS);
        let mut short = c;
        short[4] = 51;
        assert_eq!(RndisMessage::parse(&short), Err(WireError::Truncated));
    }

    #[test]
    fn query_fixtures() {
        // Query the MAC: info buffer offset 20, no input.
        let q = RndisMessage::QueryRequest {
            body: QueryRequest {
                req_id: 2.into(),
                oid: Oid::OID_802_3_PERMANENT_ADDRESS.0.into(),
                info_buf_offset: 20.into(),
                ..QueryRequest::default()
            },
            info: &[],
        };
        let mut out = [0u8; 64];
        let n = q.encode(&mut out).unwrap();
        assert_eq!(n, 28);
        assert_eq!(&out[12..16], &0x0101_0101u32.to_le_bytes());
        assert_eq!(&out[20..24], &20u32.to_le_bytes());
        assert_eq!(RndisMessage::parse(&out[..n]), Ok(q));

        // Its completion: 6 bytes of MAC at body offset 16.
        let mut c = [0u8; 30];
        c[..4].copy_from_slice(&0x8000_0004u32.to_le_bytes());
        c[4] = 30;
        c[8] = 2;
        c[16] = 6;
        c[20] = 16;
        c[24..30].copy_from_slice(&[0x00, 0x15, 0x5d, 0x01, 0x02, 0x03]);
        let m = RndisMessage::parse(&c).unwrap();
        let RndisMessage::QueryComplete { body, info } = m else {
            panic!()
        };
        assert_eq!(body.req_id.get(), 2);
        assert_eq!(info, &[0x00, 0x15, 0x5d, 0x01, 0x02, 0x03]);
        let n = m.encode(&mut out).unwrap();
        assert_eq!(&out[..n], &c);

        // Offsets Linux rejects: inside the fixed body, past the end.
        let mut bad = c;
        bad[20] = 12;
        assert_eq!(RndisMessage::parse(&bad), Err(WireError::BadOffset));
        bad[20] = 17;
        assert_eq!(RndisMessage::parse(&bad), Err(WireError::BadOffset));
        // A failed query with no data may carry any offset.
        let mut empty = c;
        empty[16] = 0;
        empty[20] = 0;
        let RndisMessage::QueryComplete { info, .. } = RndisMessage::parse(&empty).unwrap() else {
            panic!()
        };
        assert!(info.is_empty());
    }

    #[test]
    fn set_packet_filter_fixture() {
        let filter =
            NDIS_PACKET_TYPE_DIRECTED | NDIS_PACKET_TYPE_ALL_MULTICAST | NDIS_PACKET_TYPE_BROADCAST;
        assert_eq!(filter, 0x0D);
        let value = filter.to_le_bytes();
        let s = RndisMessage::SetRequest {
            body: SetRequest {
                req_id: 7.into(),
                oid: Oid::GEN_CURRENT_PACKET_FILTER.0.into(),
                ..SetRequest::default()
            },
            info: &value,
        };
        let mut out = [0u8; 64];
        let n = s.encode(&mut out).unwrap();
        assert_eq!(n, 32);
        assert_eq!(&out[16..24], &[4, 0, 0, 0, 20, 0, 0, 0]);
        assert_eq!(&out[28..32], &[0x0D, 0, 0, 0]);
        let RndisMessage::SetRequest { body, info } = RndisMessage::parse(&out[..n]).unwrap()
        else {
            panic!()
        };
        assert_eq!(Oid(body.oid.get()), Oid::GEN_CURRENT_PACKET_FILTER);
        assert_eq!(info, &value);

        let done = [5, 0, 0, 0x80, 16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            RndisMessage::parse(&done),
            Ok(RndisMessage::SetComplete(SetComplete {
                req_id: 7.into(),
                status: 0.into()
            }))
        );
    }

    #[test]
    fn indicate_status_fixture() {
        // Link speed change: status buffer = u32 in 100 bit/s units.
        let mut b = [0u8; 24];
        b[0] = 7;
        b[4] = 24;
        b[8..12].copy_from_slice(&0x4001_0013u32.to_le_bytes());
        b[12] = 4;
        b[16] = 12;
        b[20..24].copy_from_slice(&100_000_000u32.to_le_bytes());
        let m = RndisMessage::parse(&b).unwrap();
        let RndisMessage::IndicateStatus { body, status_buf } = m else {
            panic!()
        };
        assert_eq!(
            RndisStatus(body.status.get()),
            RndisStatus::LINK_SPEED_CHANGE
        );
        assert_eq!(status_buf, &100_000_000u32.to_le_bytes());
        let mut out = [0u8; 32];
        assert_eq!(m.encode(&mut out), Ok(24));
        assert_eq!(&out[..24], &b);
        // Media connect carries no data.
        let connect = [
            7, 0, 0, 0, 20, 0, 0, 0, 0x0B, 0, 1, 0x40, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let RndisMessage::IndicateStatus { body, status_buf } =
            RndisMessage::parse(&connect).unwrap()
        else {
            panic!()
        };
        assert_eq!(RndisStatus(body.status.get()), RndisStatus::MEDIA_CONNECT);
        assert!(status_buf.is_empty());
    }

    #[test]
    fn small_messages_round_trip() {
        let msgs = [
            RndisMessage::HaltRequest(HaltRequest { req_id: 3.into() }),
            RndisMessage::ResetRequest(ResetRequest::default()),
            RndisMessage::ResetComplete(ResetComplete {
                status: 0.into(),
                addressing_reset: 1.into(),
            }),
            RndisMessage::KeepaliveRequest(KeepaliveRequest { req_id: 4.into() }),
            RndisMessage::KeepaliveComplete(KeepaliveComplete {
                req_id: 4.into(),
                status: 0.into(),
            }),
        ];
        for m in msgs {
            let mut out = [0u8; 32];
            let n = m.encode(&mut out).unwrap();
            assert_eq!(RndisMessage::parse_with_len(&out), Ok((m, n)));
            assert_eq!(m.encode(&mut out[..n - 1]), Err(WireError::BufferTooSmall));
        }
    }

    #[test]
    fn batched_messages() {
        // Two packets back to back in one section, stepped over with msg_len.
        let mut section = [0u8; 256];
        let a = encode_packet(&mut section, &[], &[1, 2, 3]).unwrap();
        let b = encode_packet(&mut section[a..], &[], &[4, 5]).unwrap();
        let (m1, l1) = RndisMessage::parse_with_len(&section[..a + b]).unwrap();
        let (m2, l2) = RndisMessage::parse_with_len(&section[l1..a + b]).unwrap();
        assert_eq!((l1, l2), (a, b));
        let (RndisMessage::Packet(p1), RndisMessage::Packet(p2)) = (m1, m2) else {
            panic!()
        };
        assert_eq!((p1.data, p2.data), (&[1u8, 2, 3][..], &[4u8, 5][..]));
        assert!(p1.ppis.iter().next().is_none());
    }

    #[test]
    fn rss_parameters() {
        let table: Vec<u32> = (0..128).map(|i| i % 4).collect();
        let mut buf = [0u8; 1024];
        let hash = NDIS_HASH_FUNC_TOEPLITZ
            | NDIS_HASH_IPV4
            | NDIS_HASH_TCP_IPV4
            | NDIS_HASH_IPV6
            | NDIS_HASH_TCP_IPV6;
        let n = encode_rss_parameters(&mut buf, 0, hash, &table, &NETVSC_DEFAULT_HASH_KEY).unwrap();
        assert_eq!(n, 40 + 512 + 40);
        assert_eq!(&buf[..4], &[0x89, 2, 40, 0]);
        assert_eq!(&buf[12..14], &512u16.to_le_bytes());
        assert_eq!(&buf[16..20], &40u32.to_le_bytes());
        assert_eq!(&buf[20..22], &40u16.to_le_bytes());
        assert_eq!(&buf[24..28], &552u32.to_le_bytes());
        let p = RssParameters::parse(&buf[..n]).unwrap();
        assert_eq!(p.params.hashinfo.get(), hash);
        assert_eq!(p.table.len(), 128);
        assert_eq!(p.table[5].get(), 1);
        assert_eq!(p.key, &NETVSC_DEFAULT_HASH_KEY);

        // Table size not a multiple of 4, key out of bounds, table over the struct.
        let mut bad = buf;
        bad[12] = 2;
        assert_eq!(RssParameters::parse(&bad[..n]), Err(WireError::BadLength));
        let mut bad = buf;
        bad[24..28].copy_from_slice(&560u32.to_le_bytes());
        assert_eq!(RssParameters::parse(&bad[..n]), Err(WireError::BadOffset));
        let mut bad = buf;
        bad[16] = 36;
        assert_eq!(RssParameters::parse(&bad[..n]), Err(WireError::BadOffset));
        assert_eq!(RssParameters::parse(&buf[..39]), Err(WireError::Truncated));

        // Capabilities as OpenVMM writes them: 18 bytes.
        let caps = NdisRecvScaleCap {
            hdr: NdisObjectHeader::new(
                NDIS_OBJECT_TYPE_RSS_CAPABILITIES,
                NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2,
                NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2,
            ),
            cap_flag: NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4.into(),
            num_int_msg: 1.into(),
            num_recv_que: 8.into(),
            num_indirect_tabent: 128.into(),
        };
        let bytes = caps.as_bytes();
        assert_eq!(bytes.len(), 18);
        assert_eq!(&bytes[..4], &[0x88, 2, 18, 0]);
        assert_eq!(NdisRecvScaleCap::read_from_bytes(bytes).unwrap(), caps);
    }

    #[test]
    fn names() {
        assert_eq!(
            std::format!("{:?}", RndisMessageType(0x8000_0004)),
            "QUERY_C"
        );
        assert_eq!(
            std::format!("{:?}", PpiType::NBL_HASH_VALUE),
            "PACKET_CANCEL_ID"
        );
        assert_eq!(
            std::format!("{:?}", Oid(0x0001_0114)),
            "GEN_MEDIA_CONNECT_STATUS"
        );
        assert_eq!(
            RndisMessageType::QUERY.0 | RNDIS_MSG_COMPLETION,
            RndisMessageType::QUERY_C.0
        );
    }

    #[test]
    fn packet_view_matches_the_decoder() {
        let bytes = rx_packet_fixture();
        let v = PacketView::parse(&bytes).unwrap().unwrap();
        let RndisMessage::Packet(p) = RndisMessage::parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(v.frame(&bytes), p.data);
        assert_eq!(v.data_start, 8 + 36 + 48);
        assert_eq!(v.vlan, p.vlan());
        assert_eq!(v.checksum, p.checksum_info());
        assert_eq!(v.hash_value, p.hash_value());
        // Not a PACKET: left to the general decoder.
        let ka = [8u8, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(PacketView::parse(&ka), Ok(None));
        assert_eq!(PacketView::parse(&[1, 0]), Err(WireError::Truncated));
        // A VLAN PPI carrying 2 bytes: the decoder ignores it, the view refuses it.
        let mut short_msg = Vec::new();
        for w in [
            1u32,
            8 + 36 + 14 + 20,
            36 + 14,
            20,
            0,
            0,
            0,
            36,
            14,
            0,
            0,
            14,
            6,
            12,
        ] {
            short_msg.extend_from_slice(&w.to_le_bytes());
        }
        short_msg.extend_from_slice(&[0x45, 0x06]);
        short_msg.extend_from_slice(&[7; 20]);
        let RndisMessage::Packet(p) = RndisMessage::parse(&short_msg).unwrap() else {
            panic!()
        };
        assert_eq!(p.vlan(), None);
        assert_eq!(PacketView::parse(&short_msg), Err(WireError::BadLength));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((m, len)) = RndisMessage::parse_with_len(&bytes) {
                prop_assert!(len <= bytes.len());
                if let RndisMessage::Packet(p) = m {
                    for ppi in p.ppis.iter() {
                        let _ = ppi.data_u32();
                    }
                    let _ = (p.checksum_info(), p.vlan(), p.hash_value(), p.hash_info(), p.lso());
                }
                // Encoding normalises offsets; a second round trip is a fixed point.
                let mut out = [0u8; 512];
                let n = m.encode(&mut out).unwrap();
                let m2 = RndisMessage::parse(&out[..n]).unwrap();
                let mut out2 = [0u8; 512];
                let n2 = m2.encode(&mut out2).unwrap();
                prop_assert_eq!(&out[..n], &out2[..n2]);
            }
        }

        /// The one-pass view accepts exactly the PACKETs the decoder accepts (but for a
        /// short VLAN PPI) and finds the same frame and PPIs.
        #[test]
        fn packet_view_agrees_with_the_decoder(
            body in proptest::collection::vec(any::<u8>(), 36..160),
            words in proptest::collection::vec((0usize..40, 0u32..200), 0..8),
        ) {
            let mut bytes = 1u32.to_le_bytes().to_vec();
            bytes.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&body);
            // Plausible offsets and sizes so that the deeper checks are reached.
            for (at, v) in words {
                let at = 8 + (at * 4) % (bytes.len() - 8 - 3);
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            let slow = RndisMessage::parse(&bytes);
            let fast = PacketView::parse(&bytes);
            match (slow, fast) {
                (Ok(RndisMessage::Packet(p)), Ok(Some(v))) => {
                    prop_assert_eq!(v.frame(&bytes), p.data);
                    prop_assert_eq!(v.vlan, p.vlan());
                    prop_assert_eq!(v.checksum, p.checksum_info());
                    prop_assert_eq!(v.hash_value, p.hash_value());
                }
                (Ok(RndisMessage::Packet(p)), Err(WireError::BadLength)) => {
                    let short = p
                        .ppis
                        .iter()
                        .find(|x| !x.internal && x.ppi_type == PpiType::IEEE_8021Q_INFO)
                        .is_some_and(|x| x.data.len() < 4);
                    prop_assert!(short, "view refused a good packet");
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "decoder {:?}, view {:?}", a, b),
            }
        }

        #[test]
        fn parse_typed_garbage(
            t in prop::sample::select(&[1u32, 2, 3, 4, 5, 6, 7, 8, 0x8000_0002, 0x8000_0004,
                0x8000_0005, 0x8000_0006, 0x8000_0008][..]),
            body in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut bytes = t.to_le_bytes().to_vec();
            bytes.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&body);
            let _ = RndisMessage::parse(&bytes);
        }

        #[test]
        fn rss_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(list) = PpiList::parse(&bytes) {
                let n: usize = list.iter().map(|p| p.data.len() + PPI_HEADER_SIZE).sum();
                prop_assert!(n <= bytes.len());
            }
            if let Ok(p) = RssParameters::parse(&bytes) {
                prop_assert!(p.table.len() * 4 + p.key.len() <= bytes.len() * 2);
            }
        }
    }
}
