//! NVSP, the netvsc protocol carried in the ring packets of a synthetic NIC's channels.
//!
//! Every NVSP message is a 4-byte type followed by a type-specific body. Linux always
//! sends 40 bytes (header plus the largest body union); OpenVMM sends 28 bytes below NVSP
//! 6.1. So a decoder must accept any length that holds the body it needs, and ignore the
//! rest; [`NvspMessage::parse`] does, and [`NvspMessage::encode`] pads to 40 bytes as
//! Linux does.
//!
//! The SUBCHANNEL message (133) has the same number in both directions with different
//! bodies (request from the guest, completion from the host), so `parse` takes the
//! [`Sender`].
//!
//! Sources: Linux `drivers/net/hyperv/hyperv_net.h` and `netvsc.c`, OpenVMM
//! `vm/devices/net/netvsp/src/protocol.rs`, as summarised in
//! `shared/reference/hyperv-facts.md` section 6 and `shared/reference/wire-layouts.md`
//! section 4.

use core::fmt;
use core::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{sub_slice, WireError, Writer, U16, U32, U64};

/// Size of `struct nvsp_message`: header plus 36-byte body union. Linux sends this many
/// bytes for every message but receive completions.
pub const NVSP_MESSAGE_SIZE: usize = 40;
/// Size OpenVMM sends below NVSP 6.1 (header plus the largest version-1 body).
pub const NVSP_MESSAGE_SIZE_V1: usize = 28;
/// Size of [`NvspMessageHeader`].
pub const NVSP_HEADER_SIZE: usize = size_of::<NvspMessageHeader>();

/// Transfer page set id of the receive buffer; every transfer-page packet from the host
/// carries it (`NETVSC_RECEIVE_BUFFER_ID`).
pub const NETVSC_RECEIVE_BUFFER_ID: u16 = 0xCAFE;
/// Send buffer id Linux uses (`NETVSC_SEND_BUFFER_ID`); DPDK uses 0xFACE and OpenVMM
/// ignores the value.
pub const NETVSC_SEND_BUFFER_ID: u16 = 0;
/// "No send section": the frame travels in GPA ranges (`NETVSC_INVALID_INDEX`).
pub const NETVSC_INVALID_INDEX: u32 = 0xFFFF_FFFF;
/// Receive section size Linux uses to size the buffer (`NETVSC_RECV_SECTION_SIZE`); the
/// real slot size is the host's `sub_alloc_size`.
pub const NETVSC_RECV_SECTION_SIZE: u32 = 1728;
/// Send section size Linux uses to size the buffer (`NETVSC_SEND_SECTION_SIZE`); the
/// real one comes from SEND_SEND_BUF_COMPLETE.
pub const NETVSC_SEND_SECTION_SIZE: u32 = 6144;
/// Default receive buffer: 16 MiB (hyperv-facts.md 6.5).
pub const NETVSC_RECEIVE_BUFFER_DEFAULT: usize = 16 * 1024 * 1024;
/// Largest receive buffer, 31 MiB (`NETVSC_RECEIVE_BUFFER_SIZE`).
pub const NETVSC_RECEIVE_BUFFER_SIZE: usize = 31 * 1024 * 1024;
/// Largest receive buffer for NVSP 2 and older, 15 MiB
/// (`NETVSC_RECEIVE_BUFFER_SIZE_LEGACY`).
pub const NETVSC_RECEIVE_BUFFER_SIZE_LEGACY: usize = 15 * 1024 * 1024;
/// Default send buffer: 170 sections of 6144 bytes = 1,044,480 bytes (hyperv-facts.md 6.5).
pub const NETVSC_SEND_BUFFER_DEFAULT: usize = 170 * 6144;
/// Largest send buffer, 15 MiB (`NETVSC_SEND_BUFFER_SIZE`).
pub const NETVSC_SEND_BUFFER_SIZE: usize = 15 * 1024 * 1024;
/// Entries in the send indirection table (`VRSS_SEND_TAB_SIZE`).
pub const VRSS_SEND_TAB_SIZE: usize = 16;
/// Most channels (primary plus sub-channels) per NIC (`VRSS_CHANNEL_MAX`).
pub const VRSS_CHANNEL_MAX: usize = 64;
/// SUBCHANNEL request operation "allocate" (`NVSP_SUBCHANNEL_ALLOCATE`).
pub const NVSP_SUBCHANNEL_ALLOCATE: u32 = 1;
/// SEND_RNDIS_PKT `channel_type` for data frames.
pub const NVSP_CHANNEL_TYPE_DATA: u32 = 0;
/// SEND_RNDIS_PKT `channel_type` for RNDIS control messages.
pub const NVSP_CHANNEL_TYPE_CONTROL: u32 = 1;

/// NDIS config capability: VMQ (bit 0 of `struct nvsp_2_vsc_capability`).
pub const NDIS_CAP_VMQ: u64 = 1 << 0;
/// NDIS config capability: chimney (bit 1).
pub const NDIS_CAP_CHIMNEY: u64 = 1 << 1;
/// NDIS config capability: SR-IOV (bit 2).
pub const NDIS_CAP_SRIOV: u64 = 1 << 2;
/// NDIS config capability: IEEE 802.1Q (bit 3); Linux always sets it.
pub const NDIS_CAP_IEEE8021Q: u64 = 1 << 3;
/// NDIS config capability: correlation id (bit 4).
pub const NDIS_CAP_CORRELATION_ID: u64 = 1 << 4;
/// NDIS config capability: teaming (bit 5); needed for link-speed updates.
pub const NDIS_CAP_TEAMING: u64 = 1 << 5;
/// NDIS config capability: virtual subnet id (bit 6).
pub const NDIS_CAP_VSUBNETID: u64 = 1 << 6;
/// NDIS config capability: receive segment coalescing (bit 7).
pub const NDIS_CAP_RSC: u64 = 1 << 7;

/// NDIS 6.1, sent for NVSP 4 and older (`NDIS_VERSION_6_1`).
pub const NDIS_VERSION_6_1: u32 = 0x0006_0001;
/// NDIS 6.30, sent from NVSP 5 on (`NDIS_VERSION_6_30`).
pub const NDIS_VERSION_6_30: u32 = 0x0006_001E;

wire_enum! {
    /// NVSP protocol versions (`NVSP_PROTOCOL_VERSION_*`, hyperv_net.h). Ordering follows
    /// the protocol.
    pub struct NvspVersion(u32) {
        /// `NVSP_PROTOCOL_VERSION_1`.
        PROTOCOL_VERSION_1 = 0x0000_0002,
        /// `NVSP_PROTOCOL_VERSION_2`.
        PROTOCOL_VERSION_2 = 0x0003_0002,
        /// `NVSP_PROTOCOL_VERSION_4`.
        PROTOCOL_VERSION_4 = 0x0004_0000,
        /// `NVSP_PROTOCOL_VERSION_5`: sub-channels, send indirection table.
        PROTOCOL_VERSION_5 = 0x0005_0000,
        /// `NVSP_PROTOCOL_VERSION_6`.
        PROTOCOL_VERSION_6 = 0x0006_0000,
        /// `NVSP_PROTOCOL_VERSION_61`.
        PROTOCOL_VERSION_61 = 0x0006_0001,
    }
}

/// Versions a guest tries, newest first, each with min = max (Linux `netvsc.c`).
pub const NVSP_GUEST_VERSIONS: [NvspVersion; 6] = [
    NvspVersion::PROTOCOL_VERSION_61,
    NvspVersion::PROTOCOL_VERSION_6,
    NvspVersion::PROTOCOL_VERSION_5,
    NvspVersion::PROTOCOL_VERSION_4,
    NvspVersion::PROTOCOL_VERSION_2,
    NvspVersion::PROTOCOL_VERSION_1,
];

impl NvspVersion {
    /// The NDIS version Linux announces with this NVSP version: 6.30 from NVSP 5, else 6.1.
    pub const fn ndis_version(self) -> u32 {
        if self.0 > Self::PROTOCOL_VERSION_4.0 {
            NDIS_VERSION_6_30
        } else {
            NDIS_VERSION_6_1
        }
    }
}

wire_enum! {
    /// NVSP status codes (`NVSP_STAT_*`, hyperv_net.h).
    pub struct NvspStatus(u32) {
        /// `NVSP_STAT_NONE`.
        NONE = 0,
        /// `NVSP_STAT_SUCCESS`.
        SUCCESS = 1,
        /// `NVSP_STAT_FAIL`.
        FAIL = 2,
        /// `NVSP_STAT_PROTOCOL_TOO_NEW`.
        PROTOCOL_TOO_NEW = 3,
        /// `NVSP_STAT_PROTOCOL_TOO_OLD`.
        PROTOCOL_TOO_OLD = 4,
        /// `NVSP_STAT_INVALID_RNDIS_PKT`.
        INVALID_RNDIS_PKT = 5,
        /// `NVSP_STAT_BUSY`.
        BUSY = 6,
        /// `NVSP_STAT_PROTOCOL_UNSUPPORTED` (OpenVMM notes it is not actually used).
        PROTOCOL_UNSUPPORTED = 7,
    }
}

wire_enum! {
    /// NVSP message types (`NVSP_MSG*_TYPE_*`, hyperv_net.h; hyperv-facts.md 6.2).
    pub struct NvspMessageType(u32) {
        /// `NVSP_MSG_TYPE_NONE`.
        NONE = 0,
        /// `NVSP_MSG_TYPE_INIT`, guest to host.
        INIT = 1,
        /// `NVSP_MSG_TYPE_INIT_COMPLETE`, host to guest.
        INIT_COMPLETE = 2,
        /// `NVSP_MSG1_TYPE_SEND_NDIS_VER`.
        SEND_NDIS_VER = 100,
        /// `NVSP_MSG1_TYPE_SEND_RECV_BUF`.
        SEND_RECV_BUF = 101,
        /// `NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE`.
        SEND_RECV_BUF_COMPLETE = 102,
        /// `NVSP_MSG1_TYPE_REVOKE_RECV_BUF`.
        REVOKE_RECV_BUF = 103,
        /// `NVSP_MSG1_TYPE_SEND_SEND_BUF`.
        SEND_SEND_BUF = 104,
        /// `NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE`.
        SEND_SEND_BUF_COMPLETE = 105,
        /// `NVSP_MSG1_TYPE_REVOKE_SEND_BUF`.
        REVOKE_SEND_BUF = 106,
        /// `NVSP_MSG1_TYPE_SEND_RNDIS_PKT`, both directions.
        SEND_RNDIS_PKT = 107,
        /// `NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE`, both directions.
        SEND_RNDIS_PKT_COMPLETE = 108,
        /// Obsolete chimney messages occupy 109..=119.
        SEND_CHIMNEY_DELEGATED_BUF = 109,
        /// `NVSP_MSG2_TYPE_ALLOC_RXBUF` (deprecated).
        ALLOC_RXBUF = 120,
        /// `NVSP_MSG2_TYPE_ALLOC_RXBUF_COMP` (deprecated).
        ALLOC_RXBUF_COMP = 121,
        /// `NVSP_MSG2_TYPE_FREE_RXBUF` (deprecated).
        FREE_RXBUF = 122,
        /// `NVSP_MSG2_TYPE_SEND_VMQ_RNDIS_PKT` (deprecated).
        SEND_VMQ_RNDIS_PKT = 123,
        /// `NVSP_MSG2_TYPE_SEND_VMQ_RNDIS_PKT_COMP` (deprecated).
        SEND_VMQ_RNDIS_PKT_COMP = 124,
        /// `NVSP_MSG2_TYPE_SEND_NDIS_CONFIG` (NVSP 2+).
        SEND_NDIS_CONFIG = 125,
        /// `NVSP_MSG2_TYPE_ALLOC_CHIMNEY_HANDLE` (obsolete).
        ALLOC_CHIMNEY_HANDLE = 126,
        /// `NVSP_MSG2_TYPE_ALLOC_CHIMNEY_HANDLE_COMP` (obsolete).
        ALLOC_CHIMNEY_HANDLE_COMP = 127,
        /// `NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION`, host to guest (NVSP 4+).
        SEND_VF_ASSOCIATION = 128,
        /// `NVSP_MSG4_TYPE_SWITCH_DATA_PATH`, guest to host (NVSP 4+).
        SWITCH_DATA_PATH = 129,
        /// `NVSP_MSG4_TYPE_UPLINK_CONNECT_STATE_DEPRECATED`.
        UPLINK_CONNECT_STATE = 130,
        /// `NVSP_MSG5_TYPE_OID_QUERY_EX`.
        OID_QUERY_EX = 131,
        /// `NVSP_MSG5_TYPE_OID_QUERY_EX_COMP`.
        OID_QUERY_EX_COMP = 132,
        /// `NVSP_MSG5_TYPE_SUBCHANNEL`: request from the guest, completion from the host.
        SUBCHANNEL = 133,
        /// `NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE`, host to guest in-band.
        SEND_INDIRECTION_TABLE = 134,
        /// `NVSP_MSG6_TYPE_PD_API` (NVSP 6.1).
        PD_API = 135,
        /// `NVSP_MSG6_TYPE_PD_POST_BATCH` (NVSP 6.1).
        PD_POST_BATCH = 136,
    }
}

/// NVSP header (`struct nvsp_message_header`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NvspMessageHeader {
    /// [`NvspMessageType`].
    pub msg_type: U32,
}

/// INIT body (`struct nvsp_message_init`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Init {
    /// Lowest acceptable [`NvspVersion`]; Linux sends min = max.
    pub min_protocol_ver: U32,
    /// Highest acceptable [`NvspVersion`].
    pub max_protocol_ver: U32,
}

/// INIT_COMPLETE body (`struct nvsp_message_init_complete`): 12 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InitComplete {
    /// Deprecated; OpenVMM: 2 if version 1 was negotiated, else 0xFFFFFFFF.
    pub negotiated_protocol_ver: U32,
    /// OpenVMM sends 34.
    pub max_mdl_chain_len: U32,
    /// [`NvspStatus`]; 1 = success.
    pub status: U32,
}

/// SEND_NDIS_VER body (`struct nvsp_1_message_send_ndis_version`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendNdisVersion {
    /// NDIS major version (6).
    pub ndis_major_ver: U32,
    /// NDIS minor version (1 or 30).
    pub ndis_minor_ver: U32,
}

impl SendNdisVersion {
    /// The body for an NDIS version encoded `(major << 16) | minor`.
    pub fn new(version: u32) -> Self {
        SendNdisVersion {
            ndis_major_ver: (version >> 16).into(),
            ndis_minor_ver: (version & 0xFFFF).into(),
        }
    }
}

/// SEND_RECV_BUF body (`struct nvsp_1_message_send_receive_buffer`): 6 bytes (OpenVMM
/// declares 2 more reserved bytes, inside the union padding).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendReceiveBuffer {
    /// GPADL of the receive buffer.
    pub gpadl_handle: U32,
    /// [`NETVSC_RECEIVE_BUFFER_ID`].
    pub id: U16,
}

/// One receive buffer section (`struct nvsp_1_receive_buffer_section`): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ReceiveBufferSection {
    /// Start of the section; Linux requires 0.
    pub offset: U32,
    /// Bytes per receive slot, chosen by the host.
    pub sub_alloc_size: U32,
    /// Number of slots.
    pub num_sub_allocs: U32,
    /// End of the section (OpenVMM: sub_alloc_size * num_sub_allocs).
    pub end_offset: U32,
}

/// SEND_RECV_BUF_COMPLETE fixed body (`struct nvsp_1_message_send_receive_buffer_complete`
/// up to its section array): 8 bytes, followed by `num_sections` sections.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendReceiveBufferComplete {
    /// [`NvspStatus`].
    pub status: U32,
    /// Number of sections that follow; Linux requires exactly 1.
    pub num_sections: U32,
}

/// REVOKE_RECV_BUF / REVOKE_SEND_BUF body (`struct nvsp_1_message_revoke_*_buffer`): 2 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RevokeBuffer {
    /// Buffer id.
    pub id: U16,
}

/// SEND_SEND_BUF body (`struct nvsp_1_message_send_send_buffer`): 6 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendSendBuffer {
    /// GPADL of the send buffer.
    pub gpadl_handle: U32,
    /// [`NETVSC_SEND_BUFFER_ID`].
    pub id: U16,
}

/// SEND_SEND_BUF_COMPLETE body (`struct nvsp_1_message_send_send_buffer_complete`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendSendBufferComplete {
    /// [`NvspStatus`].
    pub status: U32,
    /// Section size chosen by the host (OpenVMM 6144).
    pub section_size: U32,
}

/// SEND_RNDIS_PKT body (`struct nvsp_1_message_send_rndis_packet`): 12 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendRndisPacket {
    /// [`NVSP_CHANNEL_TYPE_DATA`] or [`NVSP_CHANNEL_TYPE_CONTROL`].
    pub channel_type: U32,
    /// Send section used, or [`NETVSC_INVALID_INDEX`] when the data is in GPA ranges.
    pub send_buf_section_index: U32,
    /// Bytes used in that section (0 if none).
    pub send_buf_section_size: U32,
}

/// SEND_RNDIS_PKT_COMPLETE body (`struct nvsp_1_message_send_rndis_packet_complete`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendRndisPacketComplete {
    /// [`NvspStatus`]: 1 success, 2 fail.
    pub status: U32,
}

/// SEND_NDIS_CONFIG body (`struct nvsp_2_send_ndis_config`): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendNdisConfig {
    /// Frame MTU: interface MTU + 14.
    pub mtu: U32,
    /// Zero.
    pub reserved: U32,
    /// `NDIS_CAP_*` bits.
    pub capability: U64,
}

/// SEND_VF_ASSOCIATION body (`struct nvsp_4_send_vf_association`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendVfAssociation {
    /// 1 = a VF is present and `serial` valid.
    pub allocated: U32,
    /// VF serial number.
    pub serial: U32,
}

/// SWITCH_DATA_PATH body (`struct nvsp_4_sw_datapath`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SwitchDataPath {
    /// 0 synthetic, 1 VF.
    pub active_datapath: U32,
}

/// SUBCHANNEL request body (`struct nvsp_5_subchannel_request`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SubchannelRequest {
    /// [`NVSP_SUBCHANNEL_ALLOCATE`].
    pub op: U32,
    /// Sub-channels wanted (queues - 1).
    pub num_subchannels: U32,
}

/// SUBCHANNEL completion body (`struct nvsp_5_subchannel_complete`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SubchannelComplete {
    /// [`NvspStatus`].
    pub status: U32,
    /// Sub-channels granted (a guest trusts no more than it asked for).
    pub num_subchannels: U32,
}

/// SEND_INDIRECTION_TABLE body (`struct nvsp_5_send_indirect_table`): 8 bytes; the table
/// itself lies `offset` bytes from the start of the NVSP message.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendIndirectionTable {
    /// Entries; must be [`VRSS_SEND_TAB_SIZE`].
    pub count: U32,
    /// Byte offset of the u32 table from the start of the NVSP message.
    pub offset: U32,
}

/// A SEND_RECV_BUF_COMPLETE message with its sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveBufferCompleteMsg<'a> {
    /// The fixed part.
    pub fixed: SendReceiveBufferComplete,
    /// The `num_sections` sections.
    pub sections: &'a [ReceiveBufferSection],
}

/// A SEND_INDIRECTION_TABLE message; keeps the whole message because the table's offset
/// is counted from its start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SendIndirectionTableMsg<'a> {
    fixed: SendIndirectionTable,
    message: &'a [u8],
}

/// Offset Linux reads the send table from on hosts up to NVSP 6.0: header plus the
/// 36-byte body union (hyperv-facts.md 6.7, item 7).
pub const SEND_TABLE_QUIRK_OFFSET: usize = NVSP_MESSAGE_SIZE;

impl<'a> SendIndirectionTableMsg<'a> {
    /// The fixed part.
    pub fn fixed(&self) -> SendIndirectionTable {
        self.fixed
    }
    /// The whole message, header included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.message
    }

    /// The 16-entry table at the message's own `offset`, as a host writes it.
    pub fn table_at_offset(&self) -> Result<&'a [U32], WireError> {
        let offset = usize::try_from(self.fixed.offset.get()).map_err(|_| WireError::BadOffset)?;
        self.table_at(offset)
    }

    /// The table as Linux reads it given the negotiated NVSP version: up to NVSP 6.0
    /// hosts report the offset wrongly, so when the message is long enough Linux reads
    /// the table at [`SEND_TABLE_QUIRK_OFFSET`] (40) instead.
    pub fn table(&self, version: NvspVersion) -> Result<&'a [U32], WireError> {
        let table_len = VRSS_SEND_TAB_SIZE * size_of::<U32>();
        if version <= NvspVersion::PROTOCOL_VERSION_6
            && self.message.len() >= SEND_TABLE_QUIRK_OFFSET + table_len
        {
            self.table_at(SEND_TABLE_QUIRK_OFFSET)
        } else {
            self.table_at_offset()
        }
    }

    fn table_at(&self, offset: usize) -> Result<&'a [U32], WireError> {
        if self.fixed.count.get() as usize != VRSS_SEND_TAB_SIZE {
            return Err(WireError::BadCount);
        }
        let bytes = sub_slice(
            self.message,
            offset,
            VRSS_SEND_TAB_SIZE * size_of::<U32>(),
            WireError::BadOffset,
        )?;
        <[U32]>::ref_from_bytes(bytes).map_err(|_| WireError::BadOffset)
    }
}

impl fmt::Debug for SendIndirectionTableMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendIndirectionTableMsg")
            .field("fixed", &self.fixed)
            .field("len", &self.message.len())
            .finish()
    }
}

/// Writes a SEND_INDIRECTION_TABLE message the way OpenVMM does: count 16, offset 12,
/// the table right after the body; 76 bytes.
pub fn encode_send_indirection_table(
    buf: &mut [u8],
    table: &[u32; VRSS_SEND_TAB_SIZE],
) -> Result<usize, WireError> {
    let mut w = Writer::new(buf);
    w.put(U32::new(NvspMessageType::SEND_INDIRECTION_TABLE.0).as_bytes())?;
    let fixed = SendIndirectionTable {
        count: U32::new(VRSS_SEND_TAB_SIZE as u32),
        offset: U32::new((NVSP_HEADER_SIZE + size_of::<SendIndirectionTable>()) as u32),
    };
    w.put(fixed.as_bytes())?;
    for entry in table {
        w.put(U32::new(*entry).as_bytes())?;
    }
    Ok(w.len())
}

/// Which side sent a message; decides how SUBCHANNEL (133) is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The guest (netvsc): 133 is a [`SubchannelRequest`].
    Guest,
    /// The host (netvsp): 133 is a [`SubchannelComplete`].
    Host,
}

/// A decoded NVSP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvspMessage<'a> {
    /// INIT (1).
    Init(Init),
    /// INIT_COMPLETE (2).
    InitComplete(InitComplete),
    /// SEND_NDIS_VER (100).
    SendNdisVersion(SendNdisVersion),
    /// SEND_RECV_BUF (101).
    SendReceiveBuffer(SendReceiveBuffer),
    /// SEND_RECV_BUF_COMPLETE (102).
    SendReceiveBufferComplete(ReceiveBufferCompleteMsg<'a>),
    /// REVOKE_RECV_BUF (103).
    RevokeReceiveBuffer(RevokeBuffer),
    /// SEND_SEND_BUF (104).
    SendSendBuffer(SendSendBuffer),
    /// SEND_SEND_BUF_COMPLETE (105).
    SendSendBufferComplete(SendSendBufferComplete),
    /// REVOKE_SEND_BUF (106).
    RevokeSendBuffer(RevokeBuffer),
    /// SEND_RNDIS_PKT (107).
    SendRndisPacket(SendRndisPacket),
    /// SEND_RNDIS_PKT_COMPLETE (108).
    SendRndisPacketComplete(SendRndisPacketComplete),
    /// SEND_NDIS_CONFIG (125).
    SendNdisConfig(SendNdisConfig),
    /// SEND_VF_ASSOCIATION (128).
    SendVfAssociation(SendVfAssociation),
    /// SWITCH_DATA_PATH (129).
    SwitchDataPath(SwitchDataPath),
    /// SUBCHANNEL (133) from the guest.
    SubchannelRequest(SubchannelRequest),
    /// SUBCHANNEL (133) from the host.
    SubchannelComplete(SubchannelComplete),
    /// SEND_INDIRECTION_TABLE (134).
    SendIndirectionTable(SendIndirectionTableMsg<'a>),
}

fn body<T: FromBytes>(bytes: &[u8]) -> Result<T, WireError> {
    T::read_from_prefix(bytes)
        .map(|(v, _)| v)
        .map_err(|_| WireError::Truncated)
}

impl<'a> NvspMessage<'a> {
    /// Decodes an NVSP message sent by `sender`. Trailing bytes (Linux pads to 40) are
    /// ignored; a body shorter than its type needs is [`WireError::Truncated`].
    pub fn parse(bytes: &'a [u8], sender: Sender) -> Result<Self, WireError> {
        let (header, rest) =
            NvspMessageHeader::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        let t = NvspMessageType(header.msg_type.get());
        Ok(match t {
            NvspMessageType::INIT => Self::Init(body(rest)?),
            NvspMessageType::INIT_COMPLETE => Self::InitComplete(body(rest)?),
            NvspMessageType::SEND_NDIS_VER => Self::SendNdisVersion(body(rest)?),
            NvspMessageType::SEND_RECV_BUF => Self::SendReceiveBuffer(body(rest)?),
            NvspMessageType::SEND_RECV_BUF_COMPLETE => {
                let (fixed, rest) = SendReceiveBufferComplete::read_from_prefix(rest)
                    .map_err(|_| WireError::Truncated)?;
                let count =
                    usize::try_from(fixed.num_sections.get()).map_err(|_| WireError::BadCount)?;
                let (sections, _) =
                    <[ReceiveBufferSection]>::ref_from_prefix_with_elems(rest, count)
                        .map_err(|_| WireError::BadCount)?;
                Self::SendReceiveBufferComplete(ReceiveBufferCompleteMsg { fixed, sections })
            }
            NvspMessageType::REVOKE_RECV_BUF => Self::RevokeReceiveBuffer(body(rest)?),
            NvspMessageType::SEND_SEND_BUF => Self::SendSendBuffer(body(rest)?),
            NvspMessageType::SEND_SEND_BUF_COMPLETE => Self::SendSendBufferComplete(body(rest)?),
            NvspMessageType::REVOKE_SEND_BUF => Self::RevokeSendBuffer(body(rest)?),
            NvspMessageType::SEND_RNDIS_PKT => Self::SendRndisPacket(body(rest)?),
            NvspMessageType::SEND_RNDIS_PKT_COMPLETE => Self::SendRndisPacketComplete(body(rest)?),
            NvspMessageType::SEND_NDIS_CONFIG => Self::SendNdisConfig(body(rest)?),
            NvspMessageType::SEND_VF_ASSOCIATION => Self::SendVfAssociation(body(rest)?),
            NvspMessageType::SWITCH_DATA_PATH => Self::SwitchDataPath(body(rest)?),
            NvspMessageType::SUBCHANNEL => match sender {
                Sender::Guest => Self::SubchannelRequest(body(rest)?),
                Sender::Host => Self::SubchannelComplete(body(rest)?),
            },
            NvspMessageType::SEND_INDIRECTION_TABLE => {
                Self::SendIndirectionTable(SendIndirectionTableMsg {
                    fixed: body(rest)?,
                    message: bytes,
                })
            }
            t if (NvspMessageType::SEND_CHIMNEY_DELEGATED_BUF.0
                ..=NvspMessageType::PD_POST_BATCH.0)
                .contains(&t.0) =>
            {
                return Err(WireError::Unsupported(t.0))
            }
            t => return Err(WireError::UnknownType(t.0)),
        })
    }

    /// The message's type number.
    pub fn message_type(&self) -> NvspMessageType {
        match self {
            Self::Init(_) => NvspMessageType::INIT,
            Self::InitComplete(_) => NvspMessageType::INIT_COMPLETE,
            Self::SendNdisVersion(_) => NvspMessageType::SEND_NDIS_VER,
            Self::SendReceiveBuffer(_) => NvspMessageType::SEND_RECV_BUF,
            Self::SendReceiveBufferComplete(_) => NvspMessageType::SEND_RECV_BUF_COMPLETE,
            Self::RevokeReceiveBuffer(_) => NvspMessageType::REVOKE_RECV_BUF,
            Self::SendSendBuffer(_) => NvspMessageType::SEND_SEND_BUF,
            Self::SendSendBufferComplete(_) => NvspMessageType::SEND_SEND_BUF_COMPLETE,
            Self::RevokeSendBuffer(_) => NvspMessageType::REVOKE_SEND_BUF,
            Self::SendRndisPacket(_) => NvspMessageType::SEND_RNDIS_PKT,
            Self::SendRndisPacketComplete(_) => NvspMessageType::SEND_RNDIS_PKT_COMPLETE,
            Self::SendNdisConfig(_) => NvspMessageType::SEND_NDIS_CONFIG,
            Self::SendVfAssociation(_) => NvspMessageType::SEND_VF_ASSOCIATION,
            Self::SwitchDataPath(_) => NvspMessageType::SWITCH_DATA_PATH,
            Self::SubchannelRequest(_) | Self::SubchannelComplete(_) => NvspMessageType::SUBCHANNEL,
            Self::SendIndirectionTable(_) => NvspMessageType::SEND_INDIRECTION_TABLE,
        }
    }

    /// Writes the header and body only (no padding); returns the bytes written. This is
    /// the short form Linux uses for receive completions (8 bytes).
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        if let Self::SendIndirectionTable(m) = self {
            w.put(m.message)?;
            return Ok(w.len());
        }
        w.put(U32::new(self.message_type().0).as_bytes())?;
        match self {
            Self::Init(b) => w.put(b.as_bytes())?,
            Self::InitComplete(b) => w.put(b.as_bytes())?,
            Self::SendNdisVersion(b) => w.put(b.as_bytes())?,
            Self::SendReceiveBuffer(b) => w.put(b.as_bytes())?,
            Self::SendReceiveBufferComplete(m) => {
                w.put(m.fixed.as_bytes())?;
                w.put(m.sections.as_bytes())?;
            }
            Self::RevokeReceiveBuffer(b) | Self::RevokeSendBuffer(b) => w.put(b.as_bytes())?,
            Self::SendSendBuffer(b) => w.put(b.as_bytes())?,
            Self::SendSendBufferComplete(b) => w.put(b.as_bytes())?,
            Self::SendRndisPacket(b) => w.put(b.as_bytes())?,
            Self::SendRndisPacketComplete(b) => w.put(b.as_bytes())?,
            Self::SendNdisConfig(b) => w.put(b.as_bytes())?,
            Self::SendVfAssociation(b) => w.put(b.as_bytes())?,
            Self::SwitchDataPath(b) => w.put(b.as_bytes())?,
            Self::SubchannelRequest(b) => w.put(b.as_bytes())?,
            Self::SubchannelComplete(b) => w.put(b.as_bytes())?,
            Self::SendIndirectionTable(_) => {}
        }
        Ok(w.len())
    }

    /// Encodes the message padded with zeros to [`NVSP_MESSAGE_SIZE`] (40) bytes, as
    /// Linux sends it; longer messages keep their length (at most [`NvspBuf::CAPACITY`]).
    pub fn encode(&self) -> Result<NvspBuf, WireError> {
        let mut out = NvspBuf {
            bytes: [0; NvspBuf::CAPACITY],
            len: 0,
        };
        let len = self
            .encode_into(&mut out.bytes)
            .map_err(|_| WireError::TooLong)?;
        out.len = len.max(NVSP_MESSAGE_SIZE) as u8;
        Ok(out)
    }
}

/// Decodes a message that must be of type `expected` with the fixed body `T`, without
/// going through [`NvspMessage::parse`]: the data path's shortcut for the two messages it
/// sees per packet (SEND_RNDIS_PKT in a receive indication, SEND_RNDIS_PKT_COMPLETE in a
/// send completion). The checks are the ones `parse` makes for that type: a 4-byte header
/// and a body of at least `size_of::<T>()` bytes ([`WireError::Truncated`]); any other
/// type is [`WireError::UnknownType`] (here: not the type expected). Trailing bytes are
/// ignored.
pub fn parse_fixed<T: FromBytes>(bytes: &[u8], expected: NvspMessageType) -> Result<T, WireError> {
    let (header, rest) =
        NvspMessageHeader::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
    let t = header.msg_type.get();
    if t != expected.0 {
        return Err(WireError::UnknownType(t));
    }
    body(rest)
}

/// An encoded NVSP message kept inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NvspBuf {
    bytes: [u8; NvspBuf::CAPACITY],
    len: u8,
}

impl NvspBuf {
    /// Largest message the buffer holds (room for the 76-byte indirection table message).
    pub const CAPACITY: usize = 128;

    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Whether the buffer is empty (never, for an encoded message).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for NvspBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NvspBuf").field(&self.as_bytes()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use proptest::prelude::*;

    // Sizes and offsets: Linux drivers/net/hyperv/hyperv_net.h @67fa8c35, see
    // shared/reference/wire-layouts.md section 4. Bodies exclude the 4-byte header, so the
    // "Abs." column is checked as H + offset.
    const H: usize = NVSP_HEADER_SIZE;

    #[test]
    fn parse_fixed_matches_the_general_decoder() {
        let msg = NvspMessage::SendRndisPacketComplete(SendRndisPacketComplete {
            status: NvspStatus::FAIL.0.into(),
        });
        let mut buf = [0u8; 40];
        let n = msg.encode_into(&mut buf).unwrap();
        assert_eq!(n, 8);
        for len in [8, 28, 40] {
            let got: SendRndisPacketComplete =
                parse_fixed(&buf[..len], NvspMessageType::SEND_RNDIS_PKT_COMPLETE).unwrap();
            assert_eq!(got.status.get(), NvspStatus::FAIL.0);
        }
        for len in 0..8 {
            assert_eq!(
                parse_fixed::<SendRndisPacketComplete>(
                    &buf[..len],
                    NvspMessageType::SEND_RNDIS_PKT_COMPLETE
                ),
                Err(WireError::Truncated),
                "{len}"
            );
        }
        assert_eq!(
            parse_fixed::<SendRndisPacket>(&buf, NvspMessageType::SEND_RNDIS_PKT),
            Err(WireError::UnknownType(
                NvspMessageType::SEND_RNDIS_PKT_COMPLETE.0
            ))
        );
    }

    #[test]
    fn header_and_init_layouts() {
        assert_eq!(size_of::<NvspMessageHeader>(), 4);
        assert_eq!(offset_of!(NvspMessageHeader, msg_type), 0);

        assert_eq!(size_of::<Init>(), 8);
        assert_eq!(H + offset_of!(Init, min_protocol_ver), 4);
        assert_eq!(H + offset_of!(Init, max_protocol_ver), 8);

        assert_eq!(size_of::<InitComplete>(), 12);
        assert_eq!(H + offset_of!(InitComplete, negotiated_protocol_ver), 4);
        assert_eq!(H + offset_of!(InitComplete, max_mdl_chain_len), 8);
        assert_eq!(H + offset_of!(InitComplete, status), 12);

        assert_eq!(size_of::<SendNdisVersion>(), 8);
        assert_eq!(H + offset_of!(SendNdisVersion, ndis_major_ver), 4);
        assert_eq!(H + offset_of!(SendNdisVersion, ndis_minor_ver), 8);
    }

    #[test]
    fn buffer_message_layouts() {
        assert_eq!(size_of::<SendReceiveBuffer>(), 6);
        assert_eq!(H + offset_of!(SendReceiveBuffer, gpadl_handle), 4);
        assert_eq!(H + offset_of!(SendReceiveBuffer, id), 8);

        // The complete message with one section is 24 bytes of body.
        assert_eq!(
            size_of::<SendReceiveBufferComplete>() + size_of::<ReceiveBufferSection>(),
            24
        );
        assert_eq!(H + offset_of!(SendReceiveBufferComplete, status), 4);
        assert_eq!(H + offset_of!(SendReceiveBufferComplete, num_sections), 8);

        assert_eq!(size_of::<ReceiveBufferSection>(), 16);
        assert_eq!(offset_of!(ReceiveBufferSection, offset), 0);
        assert_eq!(offset_of!(ReceiveBufferSection, sub_alloc_size), 4);
        assert_eq!(offset_of!(ReceiveBufferSection, num_sub_allocs), 8);
        assert_eq!(offset_of!(ReceiveBufferSection, end_offset), 12);

        assert_eq!(size_of::<RevokeBuffer>(), 2);
        assert_eq!(H + offset_of!(RevokeBuffer, id), 4);

        assert_eq!(size_of::<SendSendBuffer>(), 6);
        assert_eq!(H + offset_of!(SendSendBuffer, gpadl_handle), 4);
        assert_eq!(H + offset_of!(SendSendBuffer, id), 8);

        assert_eq!(size_of::<SendSendBufferComplete>(), 8);
        assert_eq!(H + offset_of!(SendSendBufferComplete, status), 4);
        assert_eq!(H + offset_of!(SendSendBufferComplete, section_size), 8);
    }

    #[test]
    fn data_and_v2_v5_layouts() {
        assert_eq!(size_of::<SendRndisPacket>(), 12);
        assert_eq!(H + offset_of!(SendRndisPacket, channel_type), 4);
        assert_eq!(H + offset_of!(SendRndisPacket, send_buf_section_index), 8);
        assert_eq!(H + offset_of!(SendRndisPacket, send_buf_section_size), 12);

        assert_eq!(size_of::<SendRndisPacketComplete>(), 4);
        assert_eq!(H + offset_of!(SendRndisPacketComplete, status), 4);

        assert_eq!(size_of::<SendNdisConfig>(), 16);
        assert_eq!(H + offset_of!(SendNdisConfig, mtu), 4);
        assert_eq!(H + offset_of!(SendNdisConfig, reserved), 8);
        assert_eq!(H + offset_of!(SendNdisConfig, capability), 12);

        assert_eq!(size_of::<SendVfAssociation>(), 8);
        assert_eq!(H + offset_of!(SendVfAssociation, allocated), 4);
        assert_eq!(H + offset_of!(SendVfAssociation, serial), 8);

        assert_eq!(size_of::<SwitchDataPath>(), 4);
        assert_eq!(H + offset_of!(SwitchDataPath, active_datapath), 4);

        assert_eq!(size_of::<SubchannelRequest>(), 8);
        assert_eq!(H + offset_of!(SubchannelRequest, op), 4);
        assert_eq!(H + offset_of!(SubchannelRequest, num_subchannels), 8);

        assert_eq!(size_of::<SubchannelComplete>(), 8);
        assert_eq!(H + offset_of!(SubchannelComplete, status), 4);
        assert_eq!(H + offset_of!(SubchannelComplete, num_subchannels), 8);

        assert_eq!(size_of::<SendIndirectionTable>(), 8);
        assert_eq!(H + offset_of!(SendIndirectionTable, count), 4);
        assert_eq!(H + offset_of!(SendIndirectionTable, offset), 8);
    }

    #[test]
    fn capability_bits() {
        // Masks measured in wire-layouts.md ("NDIS config capability word").
        let masks = [
            NDIS_CAP_VMQ,
            NDIS_CAP_CHIMNEY,
            NDIS_CAP_SRIOV,
            NDIS_CAP_IEEE8021Q,
            NDIS_CAP_CORRELATION_ID,
            NDIS_CAP_TEAMING,
            NDIS_CAP_VSUBNETID,
            NDIS_CAP_RSC,
        ];
        assert_eq!(masks, [0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80]);
    }

    #[test]
    fn versions() {
        for pair in NVSP_GUEST_VERSIONS.windows(2) {
            assert!(pair[0] > pair[1]);
        }
        assert_eq!(
            NvspVersion::PROTOCOL_VERSION_5.ndis_version(),
            NDIS_VERSION_6_30
        );
        assert_eq!(
            NvspVersion::PROTOCOL_VERSION_4.ndis_version(),
            NDIS_VERSION_6_1
        );
        let v = SendNdisVersion::new(NDIS_VERSION_6_30);
        assert_eq!((v.ndis_major_ver.get(), v.ndis_minor_ver.get()), (6, 30));
    }

    #[test]
    fn init_fixture() {
        // Linux INIT for NVSP 6.1: 40 bytes, min = max = 0x60001.
        let mut b = [0u8; 40];
        b[0] = 1;
        b[4..8].copy_from_slice(&0x60001u32.to_le_bytes());
        b[8..12].copy_from_slice(&0x60001u32.to_le_bytes());
        let m = NvspMessage::parse(&b, Sender::Guest).unwrap();
        let v = NvspVersion::PROTOCOL_VERSION_61.0;
        assert_eq!(
            m,
            NvspMessage::Init(Init {
                min_protocol_ver: v.into(),
                max_protocol_ver: v.into()
            })
        );
        assert_eq!(m.encode().unwrap().as_bytes(), &b);

        // OpenVMM's 28-byte INIT_COMPLETE parses too.
        let mut c = [0u8; 28];
        c[0] = 2;
        c[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        c[8] = 34;
        c[12] = 1;
        let NvspMessage::InitComplete(ic) = NvspMessage::parse(&c, Sender::Host).unwrap() else {
            panic!()
        };
        assert_eq!(NvspStatus(ic.status.get()), NvspStatus::SUCCESS);
        assert_eq!(ic.max_mdl_chain_len.get(), 34);
        assert_eq!(
            NvspMessage::parse(&c[..15], Sender::Host),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn receive_buffer_complete_fixture() {
        // OpenVMM: one section of 1806-byte slots (hyperv-facts.md 6.5), 28 bytes total.
        let mut b = [0u8; 28];
        b[0] = 102;
        b[4] = 1; // status success
        b[8] = 1; // num_sections
        b[16..20].copy_from_slice(&1806u32.to_le_bytes());
        b[20..24].copy_from_slice(&9289u32.to_le_bytes());
        b[24..28].copy_from_slice(&(1806u32 * 9289).to_le_bytes());
        let m = NvspMessage::parse(&b, Sender::Host).unwrap();
        let NvspMessage::SendReceiveBufferComplete(rc) = m else {
            panic!()
        };
        assert_eq!(rc.sections.len(), 1);
        assert_eq!(rc.sections[0].offset.get(), 0);
        assert_eq!(rc.sections[0].sub_alloc_size.get(), 1806);
        assert_eq!(rc.sections[0].num_sub_allocs.get(), 9289);
        let mut out = [0u8; 64];
        assert_eq!(m.encode_into(&mut out), Ok(28));
        assert_eq!(&out[..28], &b);

        // Two sections announced, room for one.
        let mut bad = b;
        bad[8] = 2;
        assert_eq!(
            NvspMessage::parse(&bad, Sender::Host),
            Err(WireError::BadCount)
        );
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            NvspMessage::parse(&bad, Sender::Host),
            Err(WireError::BadCount)
        );
        // Zero sections (a failure reply) is well-formed.
        let mut fail = b;
        fail[4] = 2;
        fail[8] = 0;
        let NvspMessage::SendReceiveBufferComplete(rc) =
            NvspMessage::parse(&fail[..12], Sender::Host).unwrap()
        else {
            panic!()
        };
        assert!(rc.sections.is_empty());
    }

    #[test]
    fn rndis_packet_and_completion_fixture() {
        let m = NvspMessage::SendRndisPacket(SendRndisPacket {
            channel_type: NVSP_CHANNEL_TYPE_CONTROL.into(),
            send_buf_section_index: NETVSC_INVALID_INDEX.into(),
            send_buf_section_size: 0.into(),
        });
        let enc = m.encode().unwrap();
        assert_eq!(enc.len(), 40);
        assert_eq!(
            &enc.as_bytes()[..16],
            &[107, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
        );
        assert!(enc.as_bytes()[16..].iter().all(|b| *b == 0));
        assert_eq!(NvspMessage::parse(enc.as_bytes(), Sender::Guest), Ok(m));

        // Receive completion: 8 bytes {108, status 1}.
        let done = NvspMessage::SendRndisPacketComplete(SendRndisPacketComplete {
            status: NvspStatus::SUCCESS.0.into(),
        });
        let mut out = [0u8; 8];
        assert_eq!(done.encode_into(&mut out), Ok(8));
        assert_eq!(out, [108, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(NvspMessage::parse(&out, Sender::Guest), Ok(done));
        assert_eq!(
            done.encode_into(&mut out[..7]),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn subchannel_by_sender() {
        let b = [133, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0];
        assert_eq!(
            NvspMessage::parse(&b, Sender::Guest),
            Ok(NvspMessage::SubchannelRequest(SubchannelRequest {
                op: NVSP_SUBCHANNEL_ALLOCATE.into(),
                num_subchannels: 3.into(),
            }))
        );
        let m = NvspMessage::parse(&b, Sender::Host).unwrap();
        assert_eq!(
            m,
            NvspMessage::SubchannelComplete(SubchannelComplete {
                status: NvspStatus::SUCCESS.0.into(),
                num_subchannels: 3.into(),
            })
        );
        assert_eq!(m.message_type(), NvspMessageType::SUBCHANNEL);
    }

    #[test]
    fn ndis_config_fixture() {
        let m = NvspMessage::SendNdisConfig(SendNdisConfig {
            mtu: 1514.into(),
            reserved: 0.into(),
            capability: (NDIS_CAP_IEEE8021Q | NDIS_CAP_SRIOV | NDIS_CAP_TEAMING).into(),
        });
        let enc = m.encode().unwrap();
        assert_eq!(
            &enc.as_bytes()[..20],
            &[125, 0, 0, 0, 0xea, 0x05, 0, 0, 0, 0, 0, 0, 0x2c, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(NvspMessage::parse(enc.as_bytes(), Sender::Guest), Ok(m));
    }

    #[test]
    fn send_indirection_table() {
        // OpenVMM form: offset 12, 76 bytes, entries i % 4.
        let mut table = [0u32; 16];
        for (i, e) in table.iter_mut().enumerate() {
            *e = (i % 4) as u32;
        }
        let mut buf = [0u8; 128];
        let len = encode_send_indirection_table(&mut buf, &table).unwrap();
        assert_eq!(len, 76);
        assert_eq!(&buf[..12], &[134, 0, 0, 0, 16, 0, 0, 0, 12, 0, 0, 0]);
        let NvspMessage::SendIndirectionTable(m) =
            NvspMessage::parse(&buf[..len], Sender::Host).unwrap()
        else {
            panic!()
        };
        let got: std::vec::Vec<u32> = m
            .table_at_offset()
            .unwrap()
            .iter()
            .map(|e| e.get())
            .collect();
        assert_eq!(got, table);
        // 76 < 104: even at NVSP 6.0 Linux uses the offset field.
        assert_eq!(
            m.table(NvspVersion::PROTOCOL_VERSION_6),
            m.table_at_offset()
        );
        let enc = NvspMessage::SendIndirectionTable(m).encode().unwrap();
        assert_eq!(enc.as_bytes(), &buf[..76]);

        // A Windows host up to 6.0: 104-byte message whose table sits at 40 while the
        // offset field says 12.
        let mut win = [0u8; 104];
        win[..12].copy_from_slice(&buf[..12]);
        for i in 0..16 {
            win[40 + 4 * i..44 + 4 * i].copy_from_slice(&(i as u32 + 100).to_le_bytes());
        }
        let NvspMessage::SendIndirectionTable(m) = NvspMessage::parse(&win, Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            m.table(NvspVersion::PROTOCOL_VERSION_6).unwrap()[0].get(),
            100
        );
        assert_eq!(
            m.table(NvspVersion::PROTOCOL_VERSION_61).unwrap()[0].get(),
            0
        );

        // Bad count, offset out of bounds.
        let mut bad = buf;
        bad[4] = 15;
        let NvspMessage::SendIndirectionTable(m) =
            NvspMessage::parse(&bad[..len], Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.table_at_offset(), Err(WireError::BadCount));
        let mut bad = buf;
        bad[8] = 13;
        let NvspMessage::SendIndirectionTable(m) =
            NvspMessage::parse(&bad[..len], Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.table_at_offset(), Err(WireError::BadOffset));
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let NvspMessage::SendIndirectionTable(m) =
            NvspMessage::parse(&bad[..len], Sender::Host).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.table_at_offset(), Err(WireError::BadOffset));
    }

    #[test]
    fn unknown_and_unsupported() {
        assert_eq!(
            NvspMessage::parse(&[], Sender::Host),
            Err(WireError::Truncated)
        );
        assert_eq!(
            NvspMessage::parse(&[0; 40], Sender::Host),
            Err(WireError::UnknownType(0))
        );
        let mut b = [0u8; 40];
        b[0] = 131;
        assert_eq!(
            NvspMessage::parse(&b, Sender::Host),
            Err(WireError::Unsupported(131))
        );
        b[0] = 137;
        assert_eq!(
            NvspMessage::parse(&b, Sender::Host),
            Err(WireError::UnknownType(137))
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            host in any::<bool>(),
        ) {
            let sender = if host { Sender::Host } else { Sender::Guest };
            if let Ok(m) = NvspMessage::parse(&bytes, sender) {
                let mut out = [0u8; 256];
                let n = m.encode_into(&mut out).unwrap();
                prop_assert_eq!(NvspMessage::parse(&out[..n], sender), Ok(m));
                if let NvspMessage::SendIndirectionTable(t) = m {
                    let _ = t.table(NvspVersion::PROTOCOL_VERSION_6);
                    let _ = t.table_at_offset();
                }
            }
        }

        #[test]
        fn parse_typed_garbage(
            t in 0u32..140,
            body in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut bytes = t.to_le_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let _ = NvspMessage::parse(&bytes, Sender::Host);
            let _ = NvspMessage::parse(&bytes, Sender::Guest);
        }
    }
}
