//! VMBus channel messages: the control protocol between a guest and the VMBus host.
//!
//! Channel messages travel as the payload of a SynIC message (type 1, at most 240 bytes):
//! the guest posts them with HvPostMessage, the host delivers them into the SINT2 slot of
//! the guest's SIMP page. Each starts with an 8-byte [`ChannelMessageHeader`] whose
//! `msgtype` selects the body.
//!
//! The fixed-size structs here are the *bodies*, without the header (OpenVMM's habit): the
//! header is implied by the [`ChannelMessage`] variant, so a caller cannot pair a body
//! with the wrong type number. Their layout tests check `8 + offset` against the absolute
//! offsets of the Linux structs, which include the header.
//!
//! [`ChannelMessage::decode`] turns untrusted bytes into a message (checking lengths,
//! counts and GPADL range data), and [`ChannelMessage::encode`] builds one; the two are
//! inverse for every message decode accepts. [`gpadl_messages`] splits a page list into a
//! GPADL_HEADER and as many GPADL_BODY messages as it needs.
//!
//! Sources: Linux `include/linux/hyperv.h` and `drivers/hv/hyperv_vmbus.h`, OpenVMM
//! `vm/devices/vmbus/vmbus_core/src/protocol.rs`, as summarised in
//! `shared/reference/hyperv-facts.md` section 5 and `shared/reference/wire-layouts.md`
//! section 1.

use core::fmt;
use core::mem::size_of;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::synic::HV_MESSAGE_PAYLOAD_BYTE_COUNT;
use crate::{WireError, Writer, U16, U32, U64};

/// Largest channel message: one SynIC payload (hvgdk_mini.h).
pub const MAX_CHANNEL_MESSAGE_SIZE: usize = HV_MESSAGE_PAYLOAD_BYTE_COUNT;
/// Size of [`ChannelMessageHeader`].
pub const CHANNEL_MESSAGE_HEADER_SIZE: usize = size_of::<ChannelMessageHeader>();
/// Page size GPADLs and GPA ranges count in (`HV_HYP_PAGE_SIZE`).
pub const HV_PAGE_SIZE: usize = 4096;

/// SINT that carries VMBus messages and channel interrupts (`VMBUS_MESSAGE_SINT`,
/// hyperv_vmbus.h).
pub const VMBUS_MESSAGE_SINT: u8 = 2;
/// Message connection id for versions before 5.0 (`VMBUS_MESSAGE_CONNECTION_ID`).
pub const VMBUS_MESSAGE_CONNECTION_ID: u32 = 1;
/// Message connection id for INITIATE_CONTACT from version 5.0 on
/// (`VMBUS_MESSAGE_CONNECTION_ID_4`); later messages use the id VERSION_RESPONSE returns.
pub const VMBUS_MESSAGE_CONNECTION_ID_4: u32 = 4;
/// Message port id (`VMBUS_MESSAGE_PORT_ID`).
pub const VMBUS_MESSAGE_PORT_ID: u32 = 1;
/// Event connection id used by WS2008 hosts (`VMBUS_EVENT_CONNECTION_ID`).
pub const VMBUS_EVENT_CONNECTION_ID: u32 = 2;
/// Event port id (`VMBUS_EVENT_PORT_ID`).
pub const VMBUS_EVENT_PORT_ID: u32 = 2;
/// Monitor connection id (`VMBUS_MONITOR_CONNECTION_ID`).
pub const VMBUS_MONITOR_CONNECTION_ID: u32 = 3;
/// Monitor port id (`VMBUS_MONITOR_PORT_ID`).
pub const VMBUS_MONITOR_PORT_ID: u32 = 3;

/// PFNs that fit in a GPADL_HEADER message after one range header:
/// (240 - 20 - 8) / 8 = 26 (wire-layouts.md, computed).
pub const GPADL_HEADER_MAX_PFNS: usize = (MAX_CHANNEL_MESSAGE_SIZE
    - CHANNEL_MESSAGE_HEADER_SIZE
    - size_of::<GpadlHeader>()
    - size_of::<GpaRangeHeader>())
    / 8;
/// PFNs that fit in one GPADL_BODY message: (240 - 16) / 8 = 28.
pub const GPADL_BODY_MAX_PFNS: usize =
    (MAX_CHANNEL_MESSAGE_SIZE - CHANNEL_MESSAGE_HEADER_SIZE - size_of::<GpadlBody>()) / 8;

// ---------------------------------------------------------------------------------------
// Versions.

wire_enum! {
    /// A VMBus protocol version, `(major << 16) | minor` (hyperv.h `VERSION_*`).
    /// Ordering follows the protocol: a later version compares greater.
    pub struct VmbusVersion(u32) {
        /// 0.13, `VERSION_WS2008` (not offered by current Linux).
        WS2008 = 0x0000_000D,
        /// 1.1, `VERSION_WIN7` (not offered by current Linux).
        WIN7 = 0x0001_0001,
        /// 2.4, `VERSION_WIN8`: per-channel relid bits in the SIEF page start here.
        WIN8 = 0x0002_0004,
        /// 3.0, `VERSION_WIN8_1`: UNLOAD supported, target_vcpu honoured.
        WIN8_1 = 0x0003_0000,
        /// 4.0, `VERSION_WIN10`.
        WIN10 = 0x0004_0000,
        /// 4.1, `VERSION_WIN10_V4_1`: MODIFYCHANNEL.
        WIN10_V4_1 = 0x0004_0001,
        /// 5.0, `VERSION_WIN10_V5`: INITIATE_CONTACT on connection id 4, msg_sint/msg_vtl.
        WIN10_V5 = 0x0005_0000,
        /// 5.1, `VERSION_WIN10_V5_1`.
        WIN10_V5_1 = 0x0005_0001,
        /// 5.2, `VERSION_WIN10_V5_2`.
        WIN10_V5_2 = 0x0005_0002,
        /// 5.3, `VERSION_WIN10_V5_3`: MODIFYCHANNEL_RESPONSE.
        WIN10_V5_3 = 0x0005_0003,
        /// 6.0, OpenVMM "Copper" (feature flags); no Linux name.
        COPPER = 0x0006_0000,
    }
}

/// The versions a guest offers, newest first, as current Linux does (hyperv-facts.md
/// section 5.1).
pub const VMBUS_GUEST_VERSIONS: [VmbusVersion; 8] = [
    VmbusVersion::WIN10_V5_3,
    VmbusVersion::WIN10_V5_2,
    VmbusVersion::WIN10_V5_1,
    VmbusVersion::WIN10_V5,
    VmbusVersion::WIN10_V4_1,
    VmbusVersion::WIN10,
    VmbusVersion::WIN8_1,
    VmbusVersion::WIN8,
];

impl VmbusVersion {
    /// The version `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        VmbusVersion(((major as u32) << 16) | minor as u32)
    }
    /// The major number.
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// The minor number.
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }
    /// The connection id INITIATE_CONTACT for this version is posted to: 4 from 5.0 on,
    /// 1 before.
    pub const fn initiate_contact_connection_id(self) -> u32 {
        if self.0 >= Self::WIN10_V5.0 {
            VMBUS_MESSAGE_CONNECTION_ID_4
        } else {
            VMBUS_MESSAGE_CONNECTION_ID
        }
    }
    /// Whether INITIATE_CONTACT carries msg_sint/msg_vtl (5.0 on) rather than the
    /// interrupt page GPA, and VERSION_RESPONSE returns a message connection id.
    pub const fn uses_msg_sint(self) -> bool {
        self.0 >= Self::WIN10_V5.0
    }
}

impl fmt::Display for VmbusVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

// ---------------------------------------------------------------------------------------
// Message types and header.

wire_enum! {
    /// Channel message type numbers (`enum vmbus_channel_message_type`, hyperv.h;
    /// hyperv-facts.md section 5.3).
    pub struct MessageType(u32) {
        /// `CHANNELMSG_INVALID`.
        INVALID = 0,
        /// `CHANNELMSG_OFFERCHANNEL`, host to guest.
        OFFERCHANNEL = 1,
        /// `CHANNELMSG_RESCIND_CHANNELOFFER`, host to guest.
        RESCIND_CHANNELOFFER = 2,
        /// `CHANNELMSG_REQUESTOFFERS`, guest to host, header only.
        REQUESTOFFERS = 3,
        /// `CHANNELMSG_ALLOFFERS_DELIVERED`, host to guest, header only.
        ALLOFFERS_DELIVERED = 4,
        /// `CHANNELMSG_OPENCHANNEL`, guest to host.
        OPENCHANNEL = 5,
        /// `CHANNELMSG_OPENCHANNEL_RESULT`, host to guest.
        OPENCHANNEL_RESULT = 6,
        /// `CHANNELMSG_CLOSECHANNEL`, guest to host (no reply).
        CLOSECHANNEL = 7,
        /// `CHANNELMSG_GPADL_HEADER`, guest to host.
        GPADL_HEADER = 8,
        /// `CHANNELMSG_GPADL_BODY`, guest to host.
        GPADL_BODY = 9,
        /// `CHANNELMSG_GPADL_CREATED`, host to guest.
        GPADL_CREATED = 10,
        /// `CHANNELMSG_GPADL_TEARDOWN`, guest to host.
        GPADL_TEARDOWN = 11,
        /// `CHANNELMSG_GPADL_TORNDOWN`, host to guest.
        GPADL_TORNDOWN = 12,
        /// `CHANNELMSG_RELID_RELEASED`, guest to host.
        RELID_RELEASED = 13,
        /// `CHANNELMSG_INITIATE_CONTACT`, guest to host.
        INITIATE_CONTACT = 14,
        /// `CHANNELMSG_VERSION_RESPONSE`, host to guest.
        VERSION_RESPONSE = 15,
        /// `CHANNELMSG_UNLOAD`, guest to host, header only.
        UNLOAD = 16,
        /// `CHANNELMSG_UNLOAD_RESPONSE`, host to guest, header only.
        UNLOAD_RESPONSE = 17,
        /// 18: OpenVMM OPEN_RESERVED_CHANNEL (not decoded here).
        OPEN_RESERVED_CHANNEL = 18,
        /// 19: OpenVMM CLOSE_RESERVED_CHANNEL (not decoded here).
        CLOSE_RESERVED_CHANNEL = 19,
        /// 20: OpenVMM CLOSE_RESERVED_RESPONSE (not decoded here).
        CLOSE_RESERVED_RESPONSE = 20,
        /// `CHANNELMSG_TL_CONNECT_REQUEST` (hv_sock), guest to host.
        TL_CONNECT_REQUEST = 21,
        /// `CHANNELMSG_MODIFYCHANNEL` (4.1+), guest to host.
        MODIFYCHANNEL = 22,
        /// `CHANNELMSG_TL_CONNECT_RESULT`, host to guest (not decoded here).
        TL_CONNECT_RESULT = 23,
        /// `CHANNELMSG_MODIFYCHANNEL_RESPONSE` (5.3+), host to guest.
        MODIFYCHANNEL_RESPONSE = 24,
        /// 25: OpenVMM 6.0 MODIFY_CONNECTION (not decoded here).
        MODIFY_CONNECTION = 25,
        /// 26: OpenVMM 6.0 MODIFY_CONNECTION_RESPONSE (not decoded here).
        MODIFY_CONNECTION_RESPONSE = 26,
        /// 27: OpenVMM 6.0 PAUSE (not decoded here).
        PAUSE = 27,
        /// 28: OpenVMM 6.0 PAUSE_RESPONSE (not decoded here).
        PAUSE_RESPONSE = 28,
        /// 29: OpenVMM 6.0 RESUME (not decoded here).
        RESUME = 29,
    }
}

/// Header of every channel message (`struct vmbus_channel_message_header`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ChannelMessageHeader {
    /// [`MessageType`].
    pub msgtype: U32,
    /// Zero.
    pub padding: U32,
}

impl ChannelMessageHeader {
    /// A header for `msgtype`.
    pub const fn new(msgtype: MessageType) -> Self {
        ChannelMessageHeader {
            msgtype: U32::new(msgtype.0),
            padding: U32::ZERO,
        }
    }
    /// The message type.
    pub fn message_type(&self) -> MessageType {
        MessageType(self.msgtype.get())
    }
}

// ---------------------------------------------------------------------------------------
// GUIDs.

/// A GUID in the Windows/UEFI byte order: first three fields little-endian, last eight
/// bytes as written (Linux `guid_t`, OpenVMM `Guid`).
#[repr(C)]
#[derive(
    Clone, Copy, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Guid {
    /// First field (8 hex digits).
    pub data1: U32,
    /// Second field (4 hex digits).
    pub data2: U16,
    /// Third field (4 hex digits).
    pub data3: U16,
    /// Last 16 hex digits, in written order.
    pub data4: [u8; 8],
}

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid::from_fields(0, 0, 0, [0; 8]);

    /// The GUID written `d1-d2-d3-d4[0..2]-d4[2..8]`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        Guid {
            data1: U32::new(d1),
            data2: U16::new(d2),
            data3: U16::new(d3),
            data4: d4,
        }
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1.get(),
            self.data2.get(),
            self.data3.get(),
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            d[5],
            d[6],
            d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Synthetic network adapter class, f8615163-df3e-46c5-913f-f2d2f965ed0e (`HV_NIC_GUID`).
pub const HV_NIC_GUID: Guid = Guid::from_fields(
    0xf8615163,
    0xdf3e,
    0x46c5,
    [0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e],
);
/// Heartbeat IC, 57164f39-9115-4e78-ab55-382f3bd5422d (`HV_HEART_BEAT_GUID`).
pub const HV_HEART_BEAT_GUID: Guid = Guid::from_fields(
    0x57164f39,
    0x9115,
    0x4e78,
    [0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5, 0x42, 0x2d],
);
/// Shutdown IC, 0e0b6031-5213-4934-818b-38d90ced39db (`HV_SHUTDOWN_GUID`).
pub const HV_SHUTDOWN_GUID: Guid = Guid::from_fields(
    0x0e0b6031,
    0x5213,
    0x4934,
    [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
);
/// Time synchronisation IC, 9527e630-d0ae-497b-adce-e80ab0175caf (`HV_TS_GUID`).
pub const HV_TS_GUID: Guid = Guid::from_fields(
    0x9527e630,
    0xd0ae,
    0x497b,
    [0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf],
);
/// Key-value pair IC, a9a0f4e7-5a45-4d96-b827-8a841e8c03e6 (`HV_KVP_GUID`).
pub const HV_KVP_GUID: Guid = Guid::from_fields(
    0xa9a0f4e7,
    0x5a45,
    0x4d96,
    [0xb8, 0x27, 0x8a, 0x84, 0x1e, 0x8c, 0x03, 0xe6],
);
/// Volume shadow copy IC, 35fa2e29-ea23-4236-96ae-3a6ebacba440 (`HV_VSS_GUID`).
pub const HV_VSS_GUID: Guid = Guid::from_fields(
    0x35fa2e29,
    0xea23,
    0x4236,
    [0x96, 0xae, 0x3a, 0x6e, 0xba, 0xcb, 0xa4, 0x40],
);
/// Synthetic SCSI controller, ba6163d9-04a1-4d29-b605-72e2ffb1dc7f (`HV_SCSI_GUID`).
pub const HV_SCSI_GUID: Guid = Guid::from_fields(
    0xba6163d9,
    0x04a1,
    0x4d29,
    [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
);

// ---------------------------------------------------------------------------------------
// Offers.

/// Offer flag: enumerate the device interface (`VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE`).
pub const VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE: u16 = 0x0001;
/// Offer flag 0x2: Linux "server supports transfer pages"; OpenVMM reuses the bit for
/// "confidential ring buffer" under 6.0 feature flags. A guest at 5.3 or lower ignores it.
pub const VMBUS_CHANNEL_SERVER_SUPPORTS_TRANSFER_PAGES: u16 = 0x0002;
/// Offer flag 0x4: Linux "server supports GPADLs"; OpenVMM "confidential external
/// memory" under 6.0 feature flags.
pub const VMBUS_CHANNEL_SERVER_SUPPORTS_GPADLS: u16 = 0x0004;
/// Offer flag: named-pipe mode; `user_def` starts with the pipe mode
/// (`VMBUS_CHANNEL_NAMED_PIPE_MODE`).
pub const VMBUS_CHANNEL_NAMED_PIPE_MODE: u16 = 0x0010;
/// Offer flag: loopback offer (`VMBUS_CHANNEL_LOOPBACK_OFFER`).
pub const VMBUS_CHANNEL_LOOPBACK_OFFER: u16 = 0x0100;
/// Offer flag: parent offer (`VMBUS_CHANNEL_PARENT_OFFER`).
pub const VMBUS_CHANNEL_PARENT_OFFER: u16 = 0x0200;
/// Offer flag: request monitored notification
/// (`VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION`).
pub const VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION: u16 = 0x0400;
/// Offer flag: hv_sock provider offer (`VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER`).
pub const VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER: u16 = 0x2000;
/// Pipe mode: byte stream (`VMBUS_PIPE_TYPE_BYTE`).
pub const VMBUS_PIPE_TYPE_BYTE: u32 = 0;
/// Pipe mode: messages (`VMBUS_PIPE_TYPE_MESSAGE`).
pub const VMBUS_PIPE_TYPE_MESSAGE: u32 = 4;
/// Bytes of user-defined data in an offer (`MAX_USER_DEFINED_BYTES`).
pub const MAX_USER_DEFINED_BYTES: usize = 120;
/// Linux treats this relid as invalid (`INVALID_RELID`).
pub const INVALID_RELID: u32 = u32::MAX;

/// The offer body (`struct vmbus_channel_offer`): 176 bytes, at offset 8 of OFFERCHANNEL.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ChannelOffer {
    /// Device class GUID (e.g. [`HV_NIC_GUID`]).
    pub if_type: Guid,
    /// Instance GUID; a primary and all its sub-channels share it.
    pub if_instance: Guid,
    /// Unused.
    pub reserved1: U64,
    /// Unused.
    pub reserved2: U64,
    /// `VMBUS_CHANNEL_*` offer flags.
    pub chn_flags: U16,
    /// MMIO space in MiB (PCI pass-through).
    pub mmio_megabytes: U16,
    /// User-defined data; in pipe mode the first u32 is the pipe mode.
    pub user_def: [u8; MAX_USER_DEFINED_BYTES],
    /// 0 for a primary channel, > 0 for a sub-channel (Win8+).
    pub sub_channel_index: U16,
    /// Reserved (OpenVMM: mmio_megabytes_optional).
    pub reserved3: U16,
}

/// OFFERCHANNEL body (`struct vmbus_channel_offer_channel` minus its header): 188 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OfferChannel {
    /// The offer proper.
    pub offer: ChannelOffer,
    /// The channel's relid.
    pub child_relid: U32,
    /// Monitor id: trigger group `monitorid / 32`, bit `monitorid % 32`.
    pub monitorid: u8,
    /// Bit 0: `monitorid` is valid.
    pub monitor_allocated: u8,
    /// Bit 0: the channel has a dedicated interrupt (use `connection_id`).
    pub is_dedicated_interrupt: U16,
    /// Event connection id the guest passes to HvSignalEvent for this channel.
    pub connection_id: U32,
}

impl OfferChannel {
    /// A zeroed offer body, to fill in.
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }
    /// Whether bit 0 of `monitor_allocated` is set.
    pub fn monitor_allocated(&self) -> bool {
        self.monitor_allocated & 1 != 0
    }
    /// Whether bit 0 of `is_dedicated_interrupt` is set.
    pub fn is_dedicated_interrupt(&self) -> bool {
        self.is_dedicated_interrupt.get() & 1 != 0
    }
    /// The sub-channel index: 0 for a primary.
    pub fn sub_channel_index(&self) -> u16 {
        self.offer.sub_channel_index.get()
    }
    /// Whether this offers a primary channel (sub-channel index 0).
    pub fn is_primary(&self) -> bool {
        self.sub_channel_index() == 0
    }
}

/// RESCIND_CHANNELOFFER body (`struct vmbus_channel_rescind_offer`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RescindChannelOffer {
    /// The relid being withdrawn.
    pub child_relid: U32,
}

/// OPENCHANNEL body (`struct vmbus_channel_open_channel`): 140 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OpenChannel {
    /// Relid of the channel.
    pub child_relid: U32,
    /// Echoed in the result; Linux uses the relid.
    pub openid: U32,
    /// GPADL covering both rings.
    pub ringbuffer_gpadlhandle: U32,
    /// VP index that receives the channel's interrupts.
    pub target_vp: U32,
    /// Page offset of the host-to-guest ring in the GPADL = size in pages of the
    /// guest-to-host ring including its control page.
    pub downstream_ringbuffer_pageoffset: U32,
    /// User data; netvsc sends zeros.
    pub userdata: [u8; MAX_USER_DEFINED_BYTES],
}

impl OpenChannel {
    /// An open request with zeroed user data.
    pub fn new(
        child_relid: u32,
        openid: u32,
        ringbuffer_gpadlhandle: u32,
        target_vp: u32,
        downstream_ringbuffer_pageoffset: u32,
    ) -> Self {
        OpenChannel {
            child_relid: child_relid.into(),
            openid: openid.into(),
            ringbuffer_gpadlhandle: ringbuffer_gpadlhandle.into(),
            target_vp: target_vp.into(),
            downstream_ringbuffer_pageoffset: downstream_ringbuffer_pageoffset.into(),
            userdata: [0; MAX_USER_DEFINED_BYTES],
        }
    }
}

/// OPENCHANNEL_RESULT body (`struct vmbus_channel_open_result`): 12 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct OpenResult {
    /// Relid of the channel.
    pub child_relid: U32,
    /// The openid from the request.
    pub openid: U32,
    /// 0 = success; Linux treats anything else as failure.
    pub status: U32,
}

/// CLOSECHANNEL body (`struct vmbus_channel_close_channel`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CloseChannel {
    /// Relid of the channel.
    pub child_relid: U32,
}

/// Head of one GPA range (`struct gpa_range` without its PFN array): 8 bytes. The PFNs
/// spanned by the range follow as u64 words.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpaRangeHeader {
    /// Length of the range in bytes.
    pub byte_count: U32,
    /// Offset of the range into its first page.
    pub byte_offset: U32,
}

/// GPADL_HEADER fixed body (`struct vmbus_channel_gpadl_header` minus its header):
/// 12 bytes, followed by range data as u64 words.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpadlHeader {
    /// Channel the GPADL belongs to.
    pub child_relid: U32,
    /// Handle chosen by the guest.
    pub gpadl: U32,
    /// Bytes of all range data (range heads and all PFNs, also those in body messages).
    pub range_buflen: U16,
    /// Number of ranges.
    pub rangecount: U16,
}

impl GpadlHeader {
    /// Number of u64 words of range data the whole GPADL carries (header plus bodies).
    pub fn total_words(&self) -> usize {
        usize::from(self.range_buflen.get()) / 8
    }

    /// Parses the complete range data of this GPADL, gathered from the header message and
    /// every body message. The data must fill `range_buflen` exactly.
    pub fn parse_ranges<'b>(&self, words: &'b [U64]) -> Result<GpaRanges<'b>, WireError> {
        if words.len() * 8 != usize::from(self.range_buflen.get()) {
            return Err(WireError::BadLength);
        }
        let (ranges, rest) = GpaRanges::parse(words, usize::from(self.rangecount.get()))?;
        if !rest.is_empty() {
            return Err(WireError::BadLength);
        }
        Ok(ranges)
    }
}

/// GPADL_BODY fixed body (`struct vmbus_channel_gpadl_body` minus its header): 8 bytes,
/// followed by more PFNs.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpadlBody {
    /// Sequence number; Linux leaves it 0.
    pub msgnumber: U32,
    /// Same handle as the header.
    pub gpadl: U32,
}

/// GPADL_CREATED body (`struct vmbus_channel_gpadl_created`): 12 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpadlCreated {
    /// Channel of the GPADL.
    pub child_relid: U32,
    /// The handle.
    pub gpadl: U32,
    /// 0 = success.
    pub creation_status: U32,
}

/// GPADL_TEARDOWN body (`struct vmbus_channel_gpadl_teardown`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpadlTeardown {
    /// Channel of the GPADL.
    pub child_relid: U32,
    /// The handle.
    pub gpadl: U32,
}

/// GPADL_TORNDOWN body (`struct vmbus_channel_gpadl_torndown`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GpadlTorndown {
    /// The handle.
    pub gpadl: U32,
}

/// RELID_RELEASED body (`struct vmbus_channel_relid_released`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RelidReleased {
    /// The relid the guest gives back.
    pub child_relid: U32,
}

/// INITIATE_CONTACT body (`struct vmbus_channel_initiate_contact`): 32 bytes.
///
/// The u64 at body offset 8 is a union: before 5.0 the GPA of the guest's interrupt page;
/// from 5.0 byte 0 is msg_sint, byte 1 msg_vtl, and (OpenVMM, 6.0 only) bytes 4..8 the
/// feature flags.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InitiateContact {
    /// Requested [`VmbusVersion`].
    pub vmbus_version_requested: U32,
    /// VP that receives channel-management messages (honoured from 3.0).
    pub target_vcpu: U32,
    /// Interrupt page GPA (< 5.0) or msg_sint/msg_vtl (>= 5.0).
    pub interrupt_page: U64,
    /// GPA of the parent-to-child monitor page.
    pub monitor_page1: U64,
    /// GPA of the child-to-parent monitor page.
    pub monitor_page2: U64,
}

impl InitiateContact {
    /// A request for `version`: from 5.0 on it carries `msg_sint`/`msg_vtl`, before it
    /// the interrupt page GPA `interrupt_page`.
    pub fn new(
        version: VmbusVersion,
        target_vcpu: u32,
        msg_sint: u8,
        msg_vtl: u8,
        interrupt_page: u64,
        monitor_page1: u64,
        monitor_page2: u64,
    ) -> Self {
        let union = if version.uses_msg_sint() {
            u64::from(msg_sint) | (u64::from(msg_vtl) << 8)
        } else {
            interrupt_page
        };
        InitiateContact {
            vmbus_version_requested: version.0.into(),
            target_vcpu: target_vcpu.into(),
            interrupt_page: union.into(),
            monitor_page1: monitor_page1.into(),
            monitor_page2: monitor_page2.into(),
        }
    }
    /// The requested version.
    pub fn version(&self) -> VmbusVersion {
        VmbusVersion(self.vmbus_version_requested.get())
    }
    /// msg_sint (meaningful from 5.0).
    pub fn msg_sint(&self) -> u8 {
        self.interrupt_page.get() as u8
    }
    /// msg_vtl (meaningful from 5.0).
    pub fn msg_vtl(&self) -> u8 {
        (self.interrupt_page.get() >> 8) as u8
    }
    /// OpenVMM feature flags (meaningful only when requesting 6.0).
    pub fn feature_flags(&self) -> u32 {
        (self.interrupt_page.get() >> 32) as u32
    }
}

/// VERSION_RESPONSE body (`struct vmbus_channel_version_response`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VersionResponse {
    /// Non-zero: the requested version is accepted.
    pub version_supported: u8,
    /// OpenVMM: 0 ok, 1 failed low resources, 2 failed unknown. Linux ignores it.
    pub connection_state: u8,
    /// Zero.
    pub padding: U16,
    /// From 5.0: connection id for all later guest messages. OpenVMM puts the version
    /// number here for accepted versions below 5.0.
    pub msg_conn_id: U32,
}

impl VersionResponse {
    /// Whether the host accepted the version.
    pub fn supported(&self) -> bool {
        self.version_supported != 0
    }
}

/// TL_CONNECT_REQUEST body (`struct vmbus_channel_tl_connect_request`): 32 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TlConnectRequest {
    /// Guest endpoint id.
    pub guest_endpoint_id: Guid,
    /// Host service id.
    pub host_service_id: Guid,
}

/// MODIFYCHANNEL body (`struct vmbus_channel_modifychannel`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ModifyChannel {
    /// Relid of the channel.
    pub child_relid: U32,
    /// New target VP for its interrupts.
    pub target_vp: U32,
}

/// MODIFYCHANNEL_RESPONSE body (`struct vmbus_channel_modifychannel_response`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ModifyChannelResponse {
    /// Relid of the channel.
    pub child_relid: U32,
    /// 0 = success.
    pub status: U32,
}

/// A fixed-size message body and its type number.
pub trait MessageBody: IntoBytes + Immutable {
    /// The type number carried in the header.
    const TYPE: MessageType;
}

macro_rules! message_bodies {
    ($($ty:ident => $t:ident,)*) => {
        $(impl MessageBody for $ty { const TYPE: MessageType = MessageType::$t; })*
        // Every channel message must fit one SynIC payload (OpenVMM checks the same with
        // `const_assert!`).
        $(const _: () = assert!(
            CHANNEL_MESSAGE_HEADER_SIZE + size_of::<$ty>() <= MAX_CHANNEL_MESSAGE_SIZE
        );)*
    };
}

message_bodies! {
    OfferChannel => OFFERCHANNEL,
    RescindChannelOffer => RESCIND_CHANNELOFFER,
    OpenChannel => OPENCHANNEL,
    OpenResult => OPENCHANNEL_RESULT,
    CloseChannel => CLOSECHANNEL,
    GpadlHeader => GPADL_HEADER,
    GpadlBody => GPADL_BODY,
    GpadlCreated => GPADL_CREATED,
    GpadlTeardown => GPADL_TEARDOWN,
    GpadlTorndown => GPADL_TORNDOWN,
    RelidReleased => RELID_RELEASED,
    InitiateContact => INITIATE_CONTACT,
    VersionResponse => VERSION_RESPONSE,
    TlConnectRequest => TL_CONNECT_REQUEST,
    ModifyChannel => MODIFYCHANNEL,
    ModifyChannelResponse => MODIFYCHANNEL_RESPONSE,
}

// ---------------------------------------------------------------------------------------
// GPA ranges.

/// One GPA range: a byte span over a list of 4 KiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRange<'a> {
    /// Length in bytes (non-zero).
    pub byte_count: u32,
    /// Offset into the first page (below 4096).
    pub byte_offset: u32,
    /// Page frame numbers, exactly as many as the span covers.
    pub pfns: &'a [U64],
}

/// Number of pages a range of `byte_count` bytes starting `byte_offset` into its first
/// page spans, after checking that the range is well-formed.
pub fn gpa_range_pages(byte_offset: u32, byte_count: u32) -> Result<usize, WireError> {
    if byte_count == 0 {
        return Err(WireError::BadLength);
    }
    if byte_offset as usize >= HV_PAGE_SIZE {
        return Err(WireError::BadOffset);
    }
    // At most (4095 + u32::MAX) / 4096 + 1 pages: no overflow in u64 or usize >= 32 bits.
    let pages = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(HV_PAGE_SIZE as u64);
    usize::try_from(pages).map_err(|_| WireError::BadCount)
}

/// A checked list of GPA ranges, as carried by a GPADL or a GPA-direct ring packet: each
/// range is one u64 head word (`byte_count` in the low half, `byte_offset` in the high
/// half) followed by its PFNs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRanges<'a> {
    words: &'a [U64],
    count: usize,
}

impl<'a> GpaRanges<'a> {
    /// Checks `count` ranges at the start of `words`; returns them and the words after.
    ///
    /// Every range must have a non-zero length, an offset below 4096 and all of its PFNs
    /// present.
    pub fn parse(words: &'a [U64], count: usize) -> Result<(Self, &'a [U64]), WireError> {
        let mut pos = 0usize;
        for _ in 0..count {
            let head = words.get(pos).ok_or(WireError::BadCount)?.get();
            let pages = gpa_range_pages((head >> 32) as u32, head as u32)?;
            pos = pos
                .checked_add(1)
                .and_then(|p| p.checked_add(pages))
                .ok_or(WireError::BadCount)?;
            if pos > words.len() {
                return Err(WireError::BadCount);
            }
        }
        let (used, rest) = words.split_at_checked(pos).ok_or(WireError::BadCount)?;
        Ok((GpaRanges { words: used, count }, rest))
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.count
    }
    /// Whether there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The raw words (range heads and PFNs).
    pub fn words(&self) -> &'a [U64] {
        self.words
    }
    /// Iterates over the ranges.
    pub fn iter(&self) -> GpaRangeIter<'a> {
        GpaRangeIter {
            words: self.words,
            left: self.count,
        }
    }
}

impl<'a> IntoIterator for GpaRanges<'a> {
    type Item = GpaRange<'a>;
    type IntoIter = GpaRangeIter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over [`GpaRanges`].
#[derive(Clone, Debug)]
pub struct GpaRangeIter<'a> {
    words: &'a [U64],
    left: usize,
}

impl<'a> Iterator for GpaRangeIter<'a> {
    type Item = GpaRange<'a>;

    fn next(&mut self) -> Option<GpaRange<'a>> {
        if self.left == 0 {
            return None;
        }
        let (head, rest) = self.words.split_first()?;
        let head = head.get();
        let byte_count = head as u32;
        let byte_offset = (head >> 32) as u32;
        // Already validated by `GpaRanges::parse`; the checks only keep this panic-free.
        let pages = gpa_range_pages(byte_offset, byte_count).ok()?;
        let (pfns, rest) = rest.split_at_checked(pages)?;
        self.words = rest;
        self.left -= 1;
        Some(GpaRange {
            byte_count,
            byte_offset,
            pfns,
        })
    }
}

/// The u64 head word of a range: `byte_count` low, `byte_offset` high.
pub const fn gpa_range_head(byte_offset: u32, byte_count: u32) -> u64 {
    ((byte_offset as u64) << 32) | byte_count as u64
}

// ---------------------------------------------------------------------------------------
// Variable-length messages.

/// A GPADL_HEADER message: the fixed part and the range words it carries. The words may
/// be only the start of the range data; the rest follows in GPADL_BODY messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpadlHeaderMsg<'a> {
    /// The fixed part.
    pub header: GpadlHeader,
    /// Range data carried in this message (range heads and PFNs, as u64 words).
    pub words: &'a [U64],
}

impl<'a> GpadlHeaderMsg<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let (header, rest) =
            GpadlHeader::read_from_prefix(body).map_err(|_| WireError::Truncated)?;
        let words = <[U64]>::ref_from_bytes(rest).map_err(|_| WireError::BadLength)?;
        let buflen = usize::from(header.range_buflen.get());
        if !buflen.is_multiple_of(8) || words.len() * 8 > buflen {
            return Err(WireError::BadLength);
        }
        let count = usize::from(header.rangecount.get());
        // Each range needs a head word and at least one PFN.
        if count == 0 || count * 16 > buflen {
            return Err(WireError::BadCount);
        }
        Ok(GpadlHeaderMsg { header, words })
    }
}

/// A GPADL_BODY message: the fixed part and the PFN words it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpadlBodyMsg<'a> {
    /// The fixed part.
    pub body: GpadlBody,
    /// More range data (u64 words).
    pub words: &'a [U64],
}

impl<'a> GpadlBodyMsg<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let (fixed, rest) = GpadlBody::read_from_prefix(body).map_err(|_| WireError::Truncated)?;
        let words = <[U64]>::ref_from_bytes(rest).map_err(|_| WireError::BadLength)?;
        Ok(GpadlBodyMsg { body: fixed, words })
    }
}

// ---------------------------------------------------------------------------------------
// The message enum.

/// A decoded channel message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelMessage<'a> {
    /// OFFERCHANNEL (1).
    OfferChannel(OfferChannel),
    /// RESCIND_CHANNELOFFER (2).
    RescindChannelOffer(RescindChannelOffer),
    /// REQUESTOFFERS (3).
    RequestOffers,
    /// ALLOFFERS_DELIVERED (4).
    AllOffersDelivered,
    /// OPENCHANNEL (5).
    OpenChannel(OpenChannel),
    /// OPENCHANNEL_RESULT (6).
    OpenResult(OpenResult),
    /// CLOSECHANNEL (7).
    CloseChannel(CloseChannel),
    /// GPADL_HEADER (8).
    GpadlHeader(GpadlHeaderMsg<'a>),
    /// GPADL_BODY (9).
    GpadlBody(GpadlBodyMsg<'a>),
    /// GPADL_CREATED (10).
    GpadlCreated(GpadlCreated),
    /// GPADL_TEARDOWN (11).
    GpadlTeardown(GpadlTeardown),
    /// GPADL_TORNDOWN (12).
    GpadlTorndown(GpadlTorndown),
    /// RELID_RELEASED (13).
    RelidReleased(RelidReleased),
    /// INITIATE_CONTACT (14).
    InitiateContact(InitiateContact),
    /// VERSION_RESPONSE (15).
    VersionResponse(VersionResponse),
    /// UNLOAD (16).
    Unload,
    /// UNLOAD_RESPONSE (17).
    UnloadResponse,
    /// TL_CONNECT_REQUEST (21).
    TlConnectRequest(TlConnectRequest),
    /// MODIFYCHANNEL (22).
    ModifyChannel(ModifyChannel),
    /// MODIFYCHANNEL_RESPONSE (24).
    ModifyChannelResponse(ModifyChannelResponse),
}

fn fixed<T: FromBytes>(body: &[u8]) -> Result<T, WireError> {
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| WireError::Truncated)
}

impl<'a> ChannelMessage<'a> {
    /// Decodes a channel message (a SynIC payload or HvPostMessage payload).
    ///
    /// Like Linux, a message may be longer than its type needs (the extra bytes are
    /// ignored: OpenVMM's 6.0 extensions append fields), but not shorter
    /// ([`WireError::Truncated`]) and not longer than 240 bytes ([`WireError::TooLong`]).
    /// GPADL messages must carry whole u64 words; a GPADL_HEADER must be consistent with
    /// its `range_buflen` and `rangecount`.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_CHANNEL_MESSAGE_SIZE {
            return Err(WireError::TooLong);
        }
        let (header, body) =
            ChannelMessageHeader::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        let t = header.message_type();
        Ok(match t {
            MessageType::OFFERCHANNEL => Self::OfferChannel(fixed(body)?),
            MessageType::RESCIND_CHANNELOFFER => Self::RescindChannelOffer(fixed(body)?),
            MessageType::REQUESTOFFERS => Self::RequestOffers,
            MessageType::ALLOFFERS_DELIVERED => Self::AllOffersDelivered,
            MessageType::OPENCHANNEL => Self::OpenChannel(fixed(body)?),
            MessageType::OPENCHANNEL_RESULT => Self::OpenResult(fixed(body)?),
            MessageType::CLOSECHANNEL => Self::CloseChannel(fixed(body)?),
            MessageType::GPADL_HEADER => Self::GpadlHeader(GpadlHeaderMsg::parse(body)?),
            MessageType::GPADL_BODY => Self::GpadlBody(GpadlBodyMsg::parse(body)?),
            MessageType::GPADL_CREATED => Self::GpadlCreated(fixed(body)?),
            MessageType::GPADL_TEARDOWN => Self::GpadlTeardown(fixed(body)?),
            MessageType::GPADL_TORNDOWN => Self::GpadlTorndown(fixed(body)?),
            MessageType::RELID_RELEASED => Self::RelidReleased(fixed(body)?),
            MessageType::INITIATE_CONTACT => Self::InitiateContact(fixed(body)?),
            MessageType::VERSION_RESPONSE => Self::VersionResponse(fixed(body)?),
            MessageType::UNLOAD => Self::Unload,
            MessageType::UNLOAD_RESPONSE => Self::UnloadResponse,
            MessageType::TL_CONNECT_REQUEST => Self::TlConnectRequest(fixed(body)?),
            MessageType::MODIFYCHANNEL => Self::ModifyChannel(fixed(body)?),
            MessageType::MODIFYCHANNEL_RESPONSE => Self::ModifyChannelResponse(fixed(body)?),
            t if t.0 > MessageType::INVALID.0 && t.0 <= MessageType::RESUME.0 => {
                return Err(WireError::Unsupported(t.0))
            }
            t => return Err(WireError::UnknownType(t.0)),
        })
    }

    /// The message's type number.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::OfferChannel(_) => MessageType::OFFERCHANNEL,
            Self::RescindChannelOffer(_) => MessageType::RESCIND_CHANNELOFFER,
            Self::RequestOffers => MessageType::REQUESTOFFERS,
            Self::AllOffersDelivered => MessageType::ALLOFFERS_DELIVERED,
            Self::OpenChannel(_) => MessageType::OPENCHANNEL,
            Self::OpenResult(_) => MessageType::OPENCHANNEL_RESULT,
            Self::CloseChannel(_) => MessageType::CLOSECHANNEL,
            Self::GpadlHeader(_) => MessageType::GPADL_HEADER,
            Self::GpadlBody(_) => MessageType::GPADL_BODY,
            Self::GpadlCreated(_) => MessageType::GPADL_CREATED,
            Self::GpadlTeardown(_) => MessageType::GPADL_TEARDOWN,
            Self::GpadlTorndown(_) => MessageType::GPADL_TORNDOWN,
            Self::RelidReleased(_) => MessageType::RELID_RELEASED,
            Self::InitiateContact(_) => MessageType::INITIATE_CONTACT,
            Self::VersionResponse(_) => MessageType::VERSION_RESPONSE,
            Self::Unload => MessageType::UNLOAD,
            Self::UnloadResponse => MessageType::UNLOAD_RESPONSE,
            Self::TlConnectRequest(_) => MessageType::TL_CONNECT_REQUEST,
            Self::ModifyChannel(_) => MessageType::MODIFYCHANNEL,
            Self::ModifyChannelResponse(_) => MessageType::MODIFYCHANNEL_RESPONSE,
        }
    }

    /// Writes the message (header included) into `buf`; returns the bytes written.
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(buf);
        w.put(ChannelMessageHeader::new(self.message_type()).as_bytes())?;
        match self {
            Self::OfferChannel(b) => w.put(b.as_bytes())?,
            Self::RescindChannelOffer(b) => w.put(b.as_bytes())?,
            Self::OpenChannel(b) => w.put(b.as_bytes())?,
            Self::OpenResult(b) => w.put(b.as_bytes())?,
            Self::CloseChannel(b) => w.put(b.as_bytes())?,
            Self::GpadlHeader(m) => {
                w.put(m.header.as_bytes())?;
                w.put(m.words.as_bytes())?;
            }
            Self::GpadlBody(m) => {
                w.put(m.body.as_bytes())?;
                w.put(m.words.as_bytes())?;
            }
            Self::GpadlCreated(b) => w.put(b.as_bytes())?,
            Self::GpadlTeardown(b) => w.put(b.as_bytes())?,
            Self::GpadlTorndown(b) => w.put(b.as_bytes())?,
            Self::RelidReleased(b) => w.put(b.as_bytes())?,
            Self::InitiateContact(b) => w.put(b.as_bytes())?,
            Self::VersionResponse(b) => w.put(b.as_bytes())?,
            Self::TlConnectRequest(b) => w.put(b.as_bytes())?,
            Self::ModifyChannel(b) => w.put(b.as_bytes())?,
            Self::ModifyChannelResponse(b) => w.put(b.as_bytes())?,
            Self::RequestOffers
            | Self::AllOffersDelivered
            | Self::Unload
            | Self::UnloadResponse => {}
        }
        Ok(w.len())
    }

    /// Encodes the message into a [`ChannelMessageBuf`], ready to post.
    ///
    /// Fails with [`WireError::TooLong`] only for GPADL messages carrying more words than
    /// fit in 240 bytes.
    pub fn encode(&self) -> Result<ChannelMessageBuf, WireError> {
        let mut out = ChannelMessageBuf::EMPTY;
        let len = self
            .encode_into(&mut out.bytes)
            .map_err(|_| WireError::TooLong)?;
        out.len = len as u8;
        Ok(out)
    }
}

/// Encodes a fixed-size body with its header.
pub fn encode_body<T: MessageBody>(body: &T) -> ChannelMessageBuf {
    let mut out = ChannelMessageBuf::EMPTY;
    let mut w = Writer::new(&mut out.bytes);
    // Every `MessageBody` fits (checked at compile time above), so these cannot fail.
    let ok = w.put(ChannelMessageHeader::new(T::TYPE).as_bytes()).is_ok()
        && w.put(body.as_bytes()).is_ok();
    debug_assert!(ok);
    out.len = w.len() as u8;
    out
}

/// An encoded channel message of at most 240 bytes, kept inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelMessageBuf {
    bytes: [u8; MAX_CHANNEL_MESSAGE_SIZE],
    len: u8,
}

impl ChannelMessageBuf {
    const EMPTY: ChannelMessageBuf = ChannelMessageBuf {
        bytes: [0; MAX_CHANNEL_MESSAGE_SIZE],
        len: 0,
    };

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

impl fmt::Debug for ChannelMessageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ChannelMessageBuf")
            .field(&self.as_bytes())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// GPADL message construction.

/// Splits one GPA range into a GPADL_HEADER message and as many GPADL_BODY messages as
/// needed, the way Linux builds them: one range, `range_buflen = 8 + 8 * pages`, up to 26
/// PFNs in the header and 28 in each body, body `msgnumber` left 0.
///
/// `pfns` must hold exactly the pages the range spans ([`WireError::BadCount`]) and the
/// range data must fit the u16 `range_buflen` ([`WireError::TooLong`]).
pub fn gpadl_messages(
    child_relid: u32,
    gpadl: u32,
    byte_offset: u32,
    byte_count: u32,
    pfns: &[u64],
) -> Result<GpadlMessages<'_>, WireError> {
    if gpa_range_pages(byte_offset, byte_count)? != pfns.len() {
        return Err(WireError::BadCount);
    }
    let buflen = pfns
        .len()
        .checked_add(1)
        .and_then(|w| w.checked_mul(8))
        .and_then(|b| u16::try_from(b).ok())
        .ok_or(WireError::TooLong)?;
    Ok(GpadlMessages {
        header: Some(GpadlHeader {
            child_relid: child_relid.into(),
            gpadl: gpadl.into(),
            range_buflen: buflen.into(),
            rangecount: U16::new(1),
        }),
        head_word: gpa_range_head(byte_offset, byte_count),
        gpadl,
        pfns,
    })
}

/// Iterator of the messages [`gpadl_messages`] builds.
#[derive(Clone, Debug)]
pub struct GpadlMessages<'a> {
    header: Option<GpadlHeader>,
    head_word: u64,
    gpadl: u32,
    pfns: &'a [u64],
}

impl GpadlMessages<'_> {
    fn take_pfns(&mut self, n: usize, w: &mut Writer<'_>) -> Result<(), WireError> {
        let (now, later) = self.pfns.split_at(n.min(self.pfns.len()));
        for pfn in now {
            w.put(U64::new(*pfn).as_bytes())?;
        }
        self.pfns = later;
        Ok(())
    }
}

impl Iterator for GpadlMessages<'_> {
    type Item = ChannelMessageBuf;

    fn next(&mut self) -> Option<ChannelMessageBuf> {
        let mut out = ChannelMessageBuf::EMPTY;
        let mut w = Writer::new(&mut out.bytes);
        if let Some(header) = self.header.take() {
            w.put(ChannelMessageHeader::new(MessageType::GPADL_HEADER).as_bytes())
                .ok()?;
            w.put(header.as_bytes()).ok()?;
            w.put(U64::new(self.head_word).as_bytes()).ok()?;
            self.take_pfns(GPADL_HEADER_MAX_PFNS, &mut w).ok()?;
        } else if !self.pfns.is_empty() {
            w.put(ChannelMessageHeader::new(MessageType::GPADL_BODY).as_bytes())
                .ok()?;
            let body = GpadlBody {
                msgnumber: U32::ZERO,
                gpadl: self.gpadl.into(),
            };
            w.put(body.as_bytes()).ok()?;
            self.take_pfns(GPADL_BODY_MAX_PFNS, &mut w).ok()?;
        } else {
            return None;
        }
        out.len = w.len() as u8;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use proptest::prelude::*;
    use std::vec::Vec;

    const H: usize = CHANNEL_MESSAGE_HEADER_SIZE;

    // Sizes and offsets below: Linux include/linux/hyperv.h @20cd569d, see
    // shared/reference/wire-layouts.md section 1. Bodies exclude the 8-byte header, so
    // each absolute Linux offset is checked as H + body offset.

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<ChannelMessageHeader>(), 8);
        assert_eq!(offset_of!(ChannelMessageHeader, msgtype), 0);
        assert_eq!(offset_of!(ChannelMessageHeader, padding), 4);
    }

    #[test]
    fn guid_layout() {
        assert_eq!(size_of::<Guid>(), 16);
        assert_eq!(offset_of!(Guid, data1), 0);
        assert_eq!(offset_of!(Guid, data2), 4);
        assert_eq!(offset_of!(Guid, data3), 6);
        assert_eq!(offset_of!(Guid, data4), 8);
        // hyperv-facts.md 5.11: the netvsc class GUID's bytes on the wire.
        assert_eq!(
            HV_NIC_GUID.as_bytes(),
            &[
                0x63, 0x51, 0x61, 0xf8, 0x3e, 0xdf, 0xc5, 0x46, 0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65,
                0xed, 0x0e
            ]
        );
        assert_eq!(
            std::format!("{HV_NIC_GUID}"),
            "f8615163-df3e-46c5-913f-f2d2f965ed0e"
        );
    }

    #[test]
    fn offer_layout() {
        assert_eq!(size_of::<ChannelOffer>(), 176);
        assert_eq!(offset_of!(ChannelOffer, if_type), 0);
        assert_eq!(offset_of!(ChannelOffer, if_instance), 16);
        assert_eq!(offset_of!(ChannelOffer, reserved1), 32);
        assert_eq!(offset_of!(ChannelOffer, reserved2), 40);
        assert_eq!(offset_of!(ChannelOffer, chn_flags), 48);
        assert_eq!(offset_of!(ChannelOffer, mmio_megabytes), 50);
        assert_eq!(offset_of!(ChannelOffer, user_def), 52);
        assert_eq!(offset_of!(ChannelOffer, sub_channel_index), 172);
        assert_eq!(offset_of!(ChannelOffer, reserved3), 174);

        assert_eq!(H + size_of::<OfferChannel>(), 196);
        assert_eq!(H + offset_of!(OfferChannel, offer), 8);
        assert_eq!(H + offset_of!(OfferChannel, child_relid), 184);
        assert_eq!(H + offset_of!(OfferChannel, monitorid), 188);
        assert_eq!(H + offset_of!(OfferChannel, monitor_allocated), 189);
        assert_eq!(H + offset_of!(OfferChannel, is_dedicated_interrupt), 190);
        assert_eq!(H + offset_of!(OfferChannel, connection_id), 192);
    }

    #[test]
    fn small_message_layouts() {
        assert_eq!(H + size_of::<RescindChannelOffer>(), 12);
        assert_eq!(H + offset_of!(RescindChannelOffer, child_relid), 8);

        assert_eq!(H + size_of::<OpenChannel>(), 148);
        assert_eq!(H + offset_of!(OpenChannel, child_relid), 8);
        assert_eq!(H + offset_of!(OpenChannel, openid), 12);
        assert_eq!(H + offset_of!(OpenChannel, ringbuffer_gpadlhandle), 16);
        assert_eq!(H + offset_of!(OpenChannel, target_vp), 20);
        assert_eq!(
            H + offset_of!(OpenChannel, downstream_ringbuffer_pageoffset),
            24
        );
        assert_eq!(H + offset_of!(OpenChannel, userdata), 28);

        assert_eq!(H + size_of::<OpenResult>(), 20);
        assert_eq!(H + offset_of!(OpenResult, child_relid), 8);
        assert_eq!(H + offset_of!(OpenResult, openid), 12);
        assert_eq!(H + offset_of!(OpenResult, status), 16);

        assert_eq!(H + size_of::<CloseChannel>(), 12);
        assert_eq!(H + offset_of!(CloseChannel, child_relid), 8);

        assert_eq!(H + size_of::<GpadlCreated>(), 20);
        assert_eq!(H + offset_of!(GpadlCreated, child_relid), 8);
        assert_eq!(H + offset_of!(GpadlCreated, gpadl), 12);
        assert_eq!(H + offset_of!(GpadlCreated, creation_status), 16);

        assert_eq!(H + size_of::<GpadlTeardown>(), 16);
        assert_eq!(H + offset_of!(GpadlTeardown, child_relid), 8);
        assert_eq!(H + offset_of!(GpadlTeardown, gpadl), 12);

        assert_eq!(H + size_of::<GpadlTorndown>(), 12);
        assert_eq!(H + offset_of!(GpadlTorndown, gpadl), 8);

        assert_eq!(H + size_of::<RelidReleased>(), 12);
        assert_eq!(H + offset_of!(RelidReleased, child_relid), 8);

        assert_eq!(H + size_of::<TlConnectRequest>(), 40);
        assert_eq!(H + offset_of!(TlConnectRequest, guest_endpoint_id), 8);
        assert_eq!(H + offset_of!(TlConnectRequest, host_service_id), 24);

        assert_eq!(H + size_of::<ModifyChannel>(), 16);
        assert_eq!(H + offset_of!(ModifyChannel, child_relid), 8);
        assert_eq!(H + offset_of!(ModifyChannel, target_vp), 12);

        assert_eq!(H + size_of::<ModifyChannelResponse>(), 16);
        assert_eq!(H + offset_of!(ModifyChannelResponse, child_relid), 8);
        assert_eq!(H + offset_of!(ModifyChannelResponse, status), 12);
    }

    #[test]
    fn gpadl_layouts() {
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
        assert_eq!(offset_of!(GpaRangeHeader, byte_count), 0);
        assert_eq!(offset_of!(GpaRangeHeader, byte_offset), 4);

        assert_eq!(H + size_of::<GpadlHeader>(), 20);
        assert_eq!(H + offset_of!(GpadlHeader, child_relid), 8);
        assert_eq!(H + offset_of!(GpadlHeader, gpadl), 12);
        assert_eq!(H + offset_of!(GpadlHeader, range_buflen), 16);
        assert_eq!(H + offset_of!(GpadlHeader, rangecount), 18);

        assert_eq!(H + size_of::<GpadlBody>(), 16);
        assert_eq!(H + offset_of!(GpadlBody, msgnumber), 8);
        assert_eq!(H + offset_of!(GpadlBody, gpadl), 12);

        // Capacities computed in wire-layouts.md: 26 PFNs in a header, 28 in a body.
        assert_eq!(GPADL_HEADER_MAX_PFNS, 26);
        assert_eq!(GPADL_BODY_MAX_PFNS, 28);
    }

    #[test]
    fn contact_layouts() {
        assert_eq!(H + size_of::<InitiateContact>(), 40);
        assert_eq!(H + offset_of!(InitiateContact, vmbus_version_requested), 8);
        assert_eq!(H + offset_of!(InitiateContact, target_vcpu), 12);
        assert_eq!(H + offset_of!(InitiateContact, interrupt_page), 16);
        assert_eq!(H + offset_of!(InitiateContact, monitor_page1), 24);
        assert_eq!(H + offset_of!(InitiateContact, monitor_page2), 32);

        assert_eq!(H + size_of::<VersionResponse>(), 16);
        assert_eq!(H + offset_of!(VersionResponse, version_supported), 8);
        assert_eq!(H + offset_of!(VersionResponse, connection_state), 9);
        assert_eq!(H + offset_of!(VersionResponse, padding), 10);
        assert_eq!(H + offset_of!(VersionResponse, msg_conn_id), 12);
    }

    #[test]
    fn versions_order_and_connection_ids() {
        for pair in VMBUS_GUEST_VERSIONS.windows(2) {
            assert!(pair[0] > pair[1]);
        }
        assert_eq!(VmbusVersion::new(5, 3), VmbusVersion::WIN10_V5_3);
        assert_eq!(VmbusVersion::WIN8.major(), 2);
        assert_eq!(VmbusVersion::WIN8.minor(), 4);
        assert!(VmbusVersion::WS2008 < VmbusVersion::WIN7);
        assert_eq!(VmbusVersion::WIN10_V5.initiate_contact_connection_id(), 4);
        assert_eq!(VmbusVersion::WIN10_V4_1.initiate_contact_connection_id(), 1);
        assert_eq!(std::format!("{}", VmbusVersion::WIN10_V5_2), "5.2");
        assert_eq!(std::format!("{:?}", VmbusVersion::WIN8_1), "WIN8_1");
    }

    /// A netvsc primary offer, built byte by byte from the Linux offsets.
    fn offer_fixture() -> [u8; 196] {
        let mut b = [0u8; 196];
        b[0] = 1; // msgtype OFFERCHANNEL
        b[8..24].copy_from_slice(HV_NIC_GUID.as_bytes());
        b[24..40].copy_from_slice(&[0x11; 16]); // instance
        b[56..58].copy_from_slice(&0x0001u16.to_le_bytes()); // chn_flags
        b[180..182].copy_from_slice(&0u16.to_le_bytes()); // sub_channel_index
        b[184..188].copy_from_slice(&0x0eu32.to_le_bytes()); // child_relid
        b[188] = 3; // monitorid
        b[189] = 1; // monitor_allocated
        b[190] = 1; // is_dedicated_interrupt
        b[192..196].copy_from_slice(&0x200eu32.to_le_bytes()); // connection_id
        b
    }

    #[test]
    fn offer_decode_encode() {
        let bytes = offer_fixture();
        let msg = ChannelMessage::decode(&bytes).unwrap();
        let ChannelMessage::OfferChannel(offer) = msg else {
            panic!("wrong variant {msg:?}");
        };
        assert_eq!(offer.offer.if_type, HV_NIC_GUID);
        assert_eq!(
            offer.offer.chn_flags.get(),
            VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE
        );
        assert_eq!(offer.child_relid.get(), 0x0e);
        assert_eq!(offer.monitorid, 3);
        assert!(offer.monitor_allocated());
        assert!(offer.is_dedicated_interrupt());
        assert!(offer.is_primary());
        assert_eq!(offer.connection_id.get(), 0x200e);
        assert_eq!(msg.encode().unwrap().as_bytes(), &bytes[..]);
        assert_eq!(encode_body(&offer).as_bytes(), &bytes[..]);

        let mut sub = bytes;
        sub[180] = 2;
        let ChannelMessage::OfferChannel(offer) = ChannelMessage::decode(&sub).unwrap() else {
            panic!()
        };
        assert_eq!(offer.sub_channel_index(), 2);
        assert!(!offer.is_primary());

        assert_eq!(
            ChannelMessage::decode(&bytes[..195]),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn initiate_contact_fixtures() {
        // 5.3 to connection id 4: msg_sint 2 at byte 16, msg_vtl 0 at byte 17.
        let mut b = [0u8; 40];
        b[0] = 14;
        b[8..12].copy_from_slice(&0x0005_0003u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16] = 2;
        b[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        b[32..40].copy_from_slice(&0x2000u64.to_le_bytes());
        let ic = InitiateContact::new(
            VmbusVersion::WIN10_V5_3,
            1,
            2,
            0,
            0xdead_0000,
            0x1000,
            0x2000,
        );
        let enc = ChannelMessage::InitiateContact(ic).encode().unwrap();
        assert_eq!(enc.as_bytes(), &b[..]);
        let ChannelMessage::InitiateContact(back) = ChannelMessage::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(back.version(), VmbusVersion::WIN10_V5_3);
        assert_eq!(back.msg_sint(), 2);
        assert_eq!(back.msg_vtl(), 0);
        assert_eq!(back.feature_flags(), 0);

        // Before 5.0 the same bytes hold the interrupt page GPA.
        let old = InitiateContact::new(VmbusVersion::WIN10_V4_1, 0, 2, 0, 0xdead_0000, 1, 2);
        assert_eq!(old.interrupt_page.get(), 0xdead_0000);
        let enc = ChannelMessage::InitiateContact(old).encode().unwrap();
        assert_eq!(&enc.as_bytes()[16..24], &0xdead_0000u64.to_le_bytes());
    }

    #[test]
    fn version_response_fixture() {
        let b = [15, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0];
        let ChannelMessage::VersionResponse(v) = ChannelMessage::decode(&b).unwrap() else {
            panic!()
        };
        assert!(v.supported());
        assert_eq!(v.msg_conn_id.get(), 4);
        // OpenVMM's 6.0 response appends supported_features: tolerated and ignored.
        let mut long = [0u8; 20];
        long[..16].copy_from_slice(&b);
        long[16] = 0xff;
        assert_eq!(
            ChannelMessage::decode(&long),
            Ok(ChannelMessage::VersionResponse(v))
        );
    }

    #[test]
    fn header_only_messages() {
        for (t, m) in [
            (3u8, ChannelMessage::RequestOffers),
            (4, ChannelMessage::AllOffersDelivered),
            (16, ChannelMessage::Unload),
            (17, ChannelMessage::UnloadResponse),
        ] {
            let b = [t, 0, 0, 0, 0, 0, 0, 0];
            assert_eq!(ChannelMessage::decode(&b), Ok(m));
            assert_eq!(m.encode().unwrap().as_bytes(), &b);
        }
    }

    #[test]
    fn fixed_messages_round_trip() {
        let msgs = [
            ChannelMessage::RescindChannelOffer(RescindChannelOffer {
                child_relid: 7.into(),
            }),
            ChannelMessage::OpenChannel(OpenChannel::new(7, 7, 0xe1e10, 1, 129)),
            ChannelMessage::OpenResult(OpenResult {
                child_relid: 7.into(),
                openid: 7.into(),
                status: 0.into(),
            }),
            ChannelMessage::CloseChannel(CloseChannel {
                child_relid: 7.into(),
            }),
            ChannelMessage::GpadlCreated(GpadlCreated {
                child_relid: 7.into(),
                gpadl: 0xe1e10.into(),
                creation_status: 0.into(),
            }),
            ChannelMessage::GpadlTeardown(GpadlTeardown {
                child_relid: 7.into(),
                gpadl: 0xe1e10.into(),
            }),
            ChannelMessage::GpadlTorndown(GpadlTorndown {
                gpadl: 0xe1e10.into(),
            }),
            ChannelMessage::RelidReleased(RelidReleased {
                child_relid: 7.into(),
            }),
            ChannelMessage::TlConnectRequest(TlConnectRequest {
                guest_endpoint_id: HV_KVP_GUID,
                host_service_id: HV_TS_GUID,
            }),
            ChannelMessage::ModifyChannel(ModifyChannel {
                child_relid: 7.into(),
                target_vp: 3.into(),
            }),
            ChannelMessage::ModifyChannelResponse(ModifyChannelResponse {
                child_relid: 7.into(),
                status: 0.into(),
            }),
        ];
        for m in msgs {
            let enc = m.encode().unwrap();
            assert_eq!(enc.as_bytes()[0] as u32, m.message_type().0);
            assert_eq!(ChannelMessage::decode(enc.as_bytes()), Ok(m));
            // One byte short of the body is always rejected.
            let short = &enc.as_bytes()[..enc.len() - 1];
            assert_eq!(ChannelMessage::decode(short), Err(WireError::Truncated));
        }
        // OPENCHANNEL fixture: downstream page offset at byte 24.
        let enc = ChannelMessage::OpenChannel(OpenChannel::new(7, 7, 0xe1e10, 1, 129))
            .encode()
            .unwrap();
        assert_eq!(enc.len(), 148);
        assert_eq!(&enc.as_bytes()[16..20], &0xe1e10u32.to_le_bytes());
        assert_eq!(&enc.as_bytes()[24..28], &129u32.to_le_bytes());
    }

    #[test]
    fn gpadl_header_fixture() {
        // One range of 3 pages: range_buflen 8 + 3 * 8 = 32, as Linux builds it.
        let mut b = [0u8; 52];
        b[0] = 8;
        b[8..12].copy_from_slice(&5u32.to_le_bytes());
        b[12..16].copy_from_slice(&0xe1e10u32.to_le_bytes());
        b[16..18].copy_from_slice(&32u16.to_le_bytes());
        b[18..20].copy_from_slice(&1u16.to_le_bytes());
        b[20..24].copy_from_slice(&0x3000u32.to_le_bytes()); // byte_count
        b[24..28].copy_from_slice(&0u32.to_le_bytes()); // byte_offset
        for (i, pfn) in [0x100u64, 0x101, 0x102].iter().enumerate() {
            b[28 + 8 * i..36 + 8 * i].copy_from_slice(&pfn.to_le_bytes());
        }
        let ChannelMessage::GpadlHeader(m) = ChannelMessage::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(m.header.gpadl.get(), 0xe1e10);
        assert_eq!(m.header.total_words(), 4);
        let ranges = m.header.parse_ranges(m.words).unwrap();
        let all: Vec<_> = ranges.iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].byte_count, 0x3000);
        assert_eq!(all[0].byte_offset, 0);
        let pfns: Vec<u64> = all[0].pfns.iter().map(|p| p.get()).collect();
        assert_eq!(pfns, [0x100, 0x101, 0x102]);

        let mut built = gpadl_messages(5, 0xe1e10, 0, 0x3000, &[0x100, 0x101, 0x102]).unwrap();
        assert_eq!(built.next().unwrap().as_bytes(), &b[..]);
        assert_eq!(built.next(), None);

        // Not whole words.
        assert_eq!(ChannelMessage::decode(&b[..51]), Err(WireError::BadLength));
        // More words than range_buflen announces.
        let mut bad = b;
        bad[16] = 24;
        assert_eq!(ChannelMessage::decode(&bad), Err(WireError::BadLength));
        // range_buflen not a multiple of 8.
        bad[16] = 33;
        assert_eq!(ChannelMessage::decode(&bad), Err(WireError::BadLength));
        // No ranges.
        let mut bad = b;
        bad[18] = 0;
        assert_eq!(ChannelMessage::decode(&bad), Err(WireError::BadCount));
        // Three ranges cannot fit in 32 bytes of range data.
        bad[18] = 3;
        assert_eq!(ChannelMessage::decode(&bad), Err(WireError::BadCount));
    }

    #[test]
    fn gpadl_split_into_header_and_bodies() {
        // 16 KiB ring pair + headers: 60 pages -> header (26) + body (28) + body (6).
        let pfns: Vec<u64> = (0x1000..0x1000 + 60).collect();
        let msgs: Vec<_> = gpadl_messages(9, 0xe1e11, 0, 60 * 4096, &pfns)
            .unwrap()
            .collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].len(), 20 + 8 + 26 * 8);
        assert_eq!(msgs[1].len(), 240);
        assert_eq!(msgs[2].len(), 16 + 6 * 8);

        // Reassemble as a host would and check the ranges.
        let mut words: Vec<U64> = Vec::new();
        let mut header = None;
        for m in &msgs {
            match ChannelMessage::decode(m.as_bytes()).unwrap() {
                ChannelMessage::GpadlHeader(h) => {
                    header = Some(h.header);
                    words.extend_from_slice(h.words);
                }
                ChannelMessage::GpadlBody(b) => {
                    assert_eq!(b.body.gpadl.get(), 0xe1e11);
                    words.extend_from_slice(b.words);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let header = header.unwrap();
        assert_eq!(header.range_buflen.get(), 8 + 60 * 8);
        let ranges = header.parse_ranges(&words).unwrap();
        let r = ranges.iter().next().unwrap();
        assert_eq!(r.pfns.len(), 60);
        assert_eq!(r.pfns[59].get(), 0x1000 + 59);
        // Missing the last body: rejected.
        assert_eq!(
            header.parse_ranges(&words[..words.len() - 6]),
            Err(WireError::BadLength)
        );
    }

    #[test]
    fn gpadl_builder_rejects_bad_input() {
        assert_eq!(
            gpadl_messages(1, 1, 0, 4097, &[1]).map(|_| ()),
            Err(WireError::BadCount)
        );
        assert_eq!(
            gpadl_messages(1, 1, 4096, 1, &[1]).map(|_| ()),
            Err(WireError::BadOffset)
        );
        assert_eq!(
            gpadl_messages(1, 1, 0, 0, &[]).map(|_| ()),
            Err(WireError::BadLength)
        );
        let many = std::vec![0u64; 8192];
        assert_eq!(
            gpadl_messages(1, 1, 0, 8192 * 4096, &many).map(|_| ()),
            Err(WireError::TooLong)
        );
    }

    #[test]
    fn gpa_ranges_parse() {
        let words: Vec<U64> = [
            gpa_range_head(0x800, 0x1000), // spans 2 pages
            7,
            8,
            gpa_range_head(0, 10), // 1 page
            9,
            0xffff, // trailing
        ]
        .iter()
        .map(|w| U64::new(*w))
        .collect();
        let (ranges, rest) = GpaRanges::parse(&words, 2).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(ranges.len(), 2);
        let v: Vec<_> = ranges.iter().collect();
        assert_eq!(v[0].byte_offset, 0x800);
        assert_eq!(v[0].pfns.len(), 2);
        assert_eq!(v[1].byte_count, 10);
        assert_eq!(v[1].pfns[0].get(), 9);
        assert_eq!(GpaRanges::parse(&words, 3), Err(WireError::BadCount));
        assert_eq!(GpaRanges::parse(&words[..4], 2), Err(WireError::BadCount));
        assert_eq!(GpaRanges::parse(&words[..0], 1), Err(WireError::BadCount));
    }

    #[test]
    fn unknown_and_oversized() {
        assert_eq!(ChannelMessage::decode(&[]), Err(WireError::Truncated));
        assert_eq!(
            ChannelMessage::decode(&[1, 0, 0]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            ChannelMessage::decode(&[0, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownType(0))
        );
        assert_eq!(
            ChannelMessage::decode(&[18, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::Unsupported(18))
        );
        assert_eq!(
            ChannelMessage::decode(&[30, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownType(30))
        );
        let mut big = [0u8; 241];
        big[0] = 3;
        assert_eq!(ChannelMessage::decode(&big), Err(WireError::TooLong));
        assert_eq!(
            ChannelMessage::decode(&big[..240]),
            Ok(ChannelMessage::RequestOffers)
        );

        let words = [U64::ZERO; 29];
        let m = ChannelMessage::GpadlBody(GpadlBodyMsg {
            body: GpadlBody::default(),
            words: &words,
        });
        assert_eq!(m.encode(), Err(WireError::TooLong));
        let mut small = [0u8; 10];
        assert_eq!(ChannelMessage::RequestOffers.encode_into(&mut small), Ok(8));
        assert_eq!(
            ChannelMessage::CloseChannel(CloseChannel::default()).encode_into(&mut small),
            Err(WireError::BufferTooSmall)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..260)) {
            if let Ok(msg) = ChannelMessage::decode(&bytes) {
                // Whatever decodes re-encodes to a message that decodes the same.
                let enc = msg.encode().unwrap();
                prop_assert_eq!(ChannelMessage::decode(enc.as_bytes()), Ok(msg));
                if let ChannelMessage::GpadlHeader(h) = msg {
                    if let Ok(r) = h.header.parse_ranges(h.words) {
                        prop_assert!(r.iter().count() == r.len());
                    }
                }
            }
        }

        #[test]
        fn decode_typed_garbage(t in 0u32..32, body in proptest::collection::vec(any::<u8>(), 0..232)) {
            let mut bytes = std::vec![0u8; 8];
            bytes[..4].copy_from_slice(&t.to_le_bytes());
            bytes.extend_from_slice(&body);
            let _ = ChannelMessage::decode(&bytes);
        }

        #[test]
        fn gpa_ranges_never_panic(raw in proptest::collection::vec(any::<u64>(), 0..40), count in 0usize..8) {
            let words: Vec<U64> = raw.iter().map(|w| U64::new(*w)).collect();
            if let Ok((ranges, _)) = GpaRanges::parse(&words, count) {
                prop_assert_eq!(ranges.iter().count(), count);
            }
        }
    }
}
