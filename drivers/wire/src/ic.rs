//! Integration-component ("util") messages: heartbeat, shutdown, time sync and KVP.
//!
//! Every IC message travels as the payload of a `VM_PKT_DATA_INBAND` ring packet and
//! starts with two headers: an 8-byte pipe header ([`PipeHeader`]) and the 20-byte IC
//! header ([`IcMsgHdr`]); the message body follows at payload offset 28 ([`ICMSG_HDR`]).
//! The host sends requests; the guest answers each one in the same buffer layout, with
//! the same transaction ids, flags `transaction | response` and a status.
//!
//! The first message on a channel is a version negotiation ([`NegotiateMsg`]): the host
//! lists framework versions, then versions of the service; the guest picks the highest
//! version of each that it also speaks ([`negotiate`]) and answers with one of each, or
//! with counts 0/0 when nothing matches ([`negotiate_response_body`]).
//!
//! Untrusted bytes enter through [`IcMessage::parse`] (headers and length fields) and
//! then through the parser of the body the message type calls for ([`heartbeat_seq`],
//! [`ShutdownRequest::parse`], [`TimesyncMsg::parse`], [`KvpRequest::parse`]). Each
//! returns an [`IcError`] naming the broken invariant instead of panicking; past them,
//! accessors only touch bytes that were checked.
//!
//! Lengths: reference guests (Linux `hv_util.c`, FreeBSD `vmbus_ic.c`) size bodies by
//! the packet, not by `icmsgsize`; so do these parsers. `icmsgsize` and the pipe
//! header's `msgsize` are still checked never to claim more bytes than the packet has.
//! Hosts differ in body sizes (OpenVMM's heartbeat body is 16 bytes, Linux's 40; its
//! time-sync v4 body 24, Linux's 22): a parser asks only for the bytes it reads.
//!
//! Sources: Linux `include/linux/hyperv.h`, `include/uapi/linux/hyperv.h`,
//! `drivers/hv/hv_util.c`, `drivers/hv/hv_kvp.c`; OpenVMM `vm/devices/hyperv_ic_protocol`
//! and `vm/devices/hyperv_ic`; as summarised in `shared/reference/hyperv-facts.md`
//! section 8 and `shared/reference/wire-layouts.md` sections 6 and 7.

use core::cmp::Ordering;
use core::fmt;
use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{Writer, U16, U32, U64};

pub use crate::vmbus::{HV_HEART_BEAT_GUID, HV_KVP_GUID, HV_SHUTDOWN_GUID, HV_TS_GUID};

// ---------------------------------------------------------------------------------------
// Sizes and constants.

/// Size of [`PipeHeader`].
pub const PIPE_HEADER_SIZE: usize = size_of::<PipeHeader>();
/// Size of [`IcMsgHdr`].
pub const IC_HEADER_SIZE: usize = size_of::<IcMsgHdr>();
/// Payload offset of every IC body: pipe header plus IC header (Linux `ICMSG_HDR`).
pub const ICMSG_HDR: usize = PIPE_HEADER_SIZE + IC_HEADER_SIZE;
/// Pipe packet type of a data message (OpenVMM's pipe `packet_type` 1).
pub const PIPE_PACKET_TYPE_DATA: u32 = 1;
/// Largest IC message OpenVMM exchanges (`MAX_MESSAGE_SIZE`).
pub const IC_MAX_MESSAGE_SIZE: usize = 13312;
/// Most versions of one kind a negotiate message may list (Linux
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const IC_VERSION_NEGOTIATION_MAX_VER_COUNT: u16 = 100;
/// Body of a negotiate answer: the fixed part and two versions (Linux sets `icmsgsize`
/// to this, 0x10).
pub const NEGOTIATE_RESPONSE_BODY_SIZE: usize = size_of::<IcMsgNegotiate>() + 2 * 4;

/// IC header flag: the message is part of a transaction; a request with it set expects an
/// answer (`ICMSGHDRFLAG_TRANSACTION`).
pub const ICMSGHDRFLAG_TRANSACTION: u8 = 1;
/// IC header flag: the message is a request (`ICMSGHDRFLAG_REQUEST`).
pub const ICMSGHDRFLAG_REQUEST: u8 = 2;
/// IC header flag: the message is a response (`ICMSGHDRFLAG_RESPONSE`).
pub const ICMSGHDRFLAG_RESPONSE: u8 = 4;

/// Shutdown flag: force (`ShutdownFlags::force` in OpenVMM; Linux treats odd values the
/// same as even ones).
pub const SHUTDOWN_FLAG_FORCE: u32 = 1;
/// Shutdown flag: restart instead of power off.
pub const SHUTDOWN_FLAG_RESTART: u32 = 2;
/// Shutdown flag: hibernate.
pub const SHUTDOWN_FLAG_HIBERNATE: u32 = 4;

/// Time-sync flag value: probe only (`ICTIMESYNCFLAG_PROBE`).
pub const ICTIMESYNCFLAG_PROBE: u8 = 0;
/// Time-sync flag: set the clock, e.g. after boot or restore (`ICTIMESYNCFLAG_SYNC`).
pub const ICTIMESYNCFLAG_SYNC: u8 = 1;
/// Time-sync flag: a periodic sample the guest may use to adjust
/// (`ICTIMESYNCFLAG_SAMPLE`).
pub const ICTIMESYNCFLAG_SAMPLE: u8 = 2;
/// 100 ns intervals between 1601-01-01 and 1970-01-01 UTC (Linux `WLTIMEDELTA`):
/// subtract it from `parenttime` for Unix time.
pub const WLTIMEDELTA: u64 = 116_444_736_000_000_000;

/// Largest KVP key in bytes, terminating NUL included (`HV_KVP_EXCHANGE_MAX_KEY_SIZE`).
pub const HV_KVP_EXCHANGE_MAX_KEY_SIZE: usize = 512;
/// Largest KVP value in bytes, terminating NUL included
/// (`HV_KVP_EXCHANGE_MAX_VALUE_SIZE`).
pub const HV_KVP_EXCHANGE_MAX_VALUE_SIZE: usize = 2048;
/// UTF-16 units of the IP-info adapter id field (`MAX_ADAPTER_ID_SIZE`).
pub const MAX_ADAPTER_ID_SIZE: usize = 128;
/// UTF-16 units of the IP-info address, subnet and DNS fields (`MAX_IP_ADDR_SIZE`).
pub const MAX_IP_ADDR_SIZE: usize = 1024;
/// UTF-16 units of the IP-info gateway field (`MAX_GATEWAY_SIZE`).
pub const MAX_GATEWAY_SIZE: usize = 512;
/// Offset of the body after the KVP header for operations 0..=3 (`struct hv_kvp_msg`).
pub const KVP_BODY_OFFSET: usize = size_of::<KvpHdr>();
/// Offset of the body after the KVP header for the IP-info operations 4 and 5
/// (`struct hv_kvp_ip_msg`: operation and pool only).
pub const KVP_IP_BODY_OFFSET: usize = 2;
/// Size of a value record ([`KvpExchgMsgValue`]).
pub const KVP_RECORD_SIZE: usize = size_of::<KvpExchgMsgValue>();
/// KVP body of a GET or SET: header and record.
pub const KVP_GET_SET_SIZE: usize = KVP_BODY_OFFSET + KVP_RECORD_SIZE;
/// KVP body of an ENUMERATE: header, index and record.
pub const KVP_ENUMERATE_SIZE: usize = KVP_BODY_OFFSET + size_of::<KvpMsgEnumerate>();
/// Offset of the record in an ENUMERATE body (after the KVP header and the index).
pub const KVP_ENUMERATE_RECORD_OFFSET: usize = KVP_BODY_OFFSET + offset_of!(KvpMsgEnumerate, data);
/// KVP body of a DELETE: header, key size and key.
pub const KVP_DELETE_SIZE: usize = KVP_BODY_OFFSET + size_of::<KvpMsgDelete>();
/// KVP body of GET_IP_INFO / SET_IP_INFO (`struct hv_kvp_ip_msg`).
pub const KVP_IP_INFO_SIZE: usize = size_of::<KvpIpMsg>();

/// Address family of IP info: none (`ADDR_FAMILY_NONE`).
pub const ADDR_FAMILY_NONE: u8 = 0;
/// Address family of IP info: IPv4 (`ADDR_FAMILY_IPV4`).
pub const ADDR_FAMILY_IPV4: u8 = 1;
/// Address family of IP info: IPv6 (`ADDR_FAMILY_IPV6`); Linux ORs the two.
pub const ADDR_FAMILY_IPV6: u8 = 2;

// ---------------------------------------------------------------------------------------
// Versions.

/// An IC version: major then minor, each a u16 (`struct ic_version`). Ordered by
/// `(major, minor)`.
#[repr(C)]
#[derive(
    Clone, Copy, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IcVersion {
    /// Major version.
    pub major: U16,
    /// Minor version.
    pub minor: U16,
}

impl IcVersion {
    /// Version `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        IcVersion {
            major: U16::new(major),
            minor: U16::new(minor),
        }
    }

    /// `(major << 16) | minor`, the encoding Linux uses for its version constants.
    pub const fn as_u32(self) -> u32 {
        ((self.major.get() as u32) << 16) | self.minor.get() as u32
    }
}

impl PartialOrd for IcVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IcVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_u32().cmp(&other.as_u32())
    }
}

impl fmt::Display for IcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major.get(), self.minor.get())
    }
}

impl fmt::Debug for IcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Framework 1.0 (`UTIL_WS2K8_FW_VERSION`).
pub const FRAMEWORK_VERSION_1: IcVersion = IcVersion::new(1, 0);
/// Framework 3.0 (`UTIL_FW_VERSION`).
pub const FRAMEWORK_VERSION_3: IcVersion = IcVersion::new(3, 0);

/// Framework versions a guest offers, newest first (Linux `fw_versions`).
pub const GUEST_FRAMEWORK_VERSIONS: [IcVersion; 2] = [FRAMEWORK_VERSION_3, FRAMEWORK_VERSION_1];
/// Heartbeat versions a guest offers (Linux `hb_versions`).
pub const GUEST_HEARTBEAT_VERSIONS: [IcVersion; 2] = [IcVersion::new(3, 0), IcVersion::new(1, 0)];
/// Shutdown versions a guest offers (Linux `sd_versions`).
pub const GUEST_SHUTDOWN_VERSIONS: [IcVersion; 4] = [
    IcVersion::new(3, 2),
    IcVersion::new(3, 1),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];
/// Time-sync versions a guest offers (Linux `ts_versions`); 4.0 has the reference-time
/// body ([`IcTimesyncRefData`]).
pub const GUEST_TIMESYNC_VERSIONS: [IcVersion; 3] = [
    IcVersion::new(4, 0),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];
/// KVP versions a guest offers (Linux `kvp_versions`: WIN8, WIN7, WS2008).
pub const GUEST_KVP_VERSIONS: [IcVersion; 3] = [
    IcVersion::new(4, 0),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];

/// Framework versions OpenVMM's host offers, in its order.
pub const HOST_FRAMEWORK_VERSIONS: [IcVersion; 2] = [FRAMEWORK_VERSION_1, FRAMEWORK_VERSION_3];
/// Heartbeat versions a host offers (OpenVMM has no heartbeat IC; these are the versions
/// Linux knows).
pub const HOST_HEARTBEAT_VERSIONS: [IcVersion; 2] = [IcVersion::new(1, 0), IcVersion::new(3, 0)];
/// Shutdown versions OpenVMM's host offers.
pub const HOST_SHUTDOWN_VERSIONS: [IcVersion; 4] = [
    IcVersion::new(1, 0),
    IcVersion::new(3, 0),
    IcVersion::new(3, 1),
    IcVersion::new(3, 2),
];
/// Time-sync versions OpenVMM's host offers (4.0 only).
pub const HOST_TIMESYNC_VERSIONS: [IcVersion; 1] = [IcVersion::new(4, 0)];
/// KVP versions OpenVMM's host offers (5.0 adds a binary IP-info format Linux lacks).
pub const HOST_KVP_VERSIONS: [IcVersion; 3] = [
    IcVersion::new(3, 0),
    IcVersion::new(4, 0),
    IcVersion::new(5, 0),
];

// ---------------------------------------------------------------------------------------
// Open enumerations.

wire_enum! {
    /// IC message types (`ICMSGTYPE_*`, Linux; OpenVMM `MessageType`).
    pub struct IcMsgType(u16) {
        /// `ICMSGTYPE_NEGOTIATE`: version negotiation.
        NEGOTIATE = 0,
        /// `ICMSGTYPE_HEARTBEAT`.
        HEARTBEAT = 1,
        /// `ICMSGTYPE_KVPEXCHANGE`.
        KVPEXCHANGE = 2,
        /// `ICMSGTYPE_SHUTDOWN`.
        SHUTDOWN = 3,
        /// `ICMSGTYPE_TIMESYNC`.
        TIMESYNC = 4,
        /// `ICMSGTYPE_VSS`.
        VSS = 5,
        /// RDV (OpenVMM only).
        RDV = 6,
        /// `ICMSGTYPE_FCOPY` (Linux) / guest interface (OpenVMM).
        FCOPY = 7,
        /// VM session (OpenVMM only).
        VM_SESSION = 8,
    }
}

wire_enum! {
    /// IC status codes, HRESULT style (`HV_*` in Linux `include/linux/hyperv.h` and the
    /// uapi header; OpenVMM `Status`).
    pub struct IcStatus(u32) {
        /// `HV_S_OK`.
        S_OK = 0,
        /// `HV_E_FAIL`.
        E_FAIL = 0x8000_4005,
        /// `HV_S_CONT`: no more items; ends an enumeration (OpenVMM `NO_MORE_ITEMS`).
        S_CONT = 0x8007_0103,
        /// `HV_ERROR_NOT_SUPPORTED`.
        NOT_SUPPORTED = 0x8007_0032,
        /// `HV_GUID_NOTFOUND`.
        GUID_NOTFOUND = 0x8004_1002,
        /// `HV_INVALIDARG`.
        INVALIDARG = 0x8007_0057,
        /// `HV_ERROR_ALREADY_EXISTS`.
        ALREADY_EXISTS = 0x8007_0050,
        /// `HV_ERROR_DISK_FULL`.
        DISK_FULL = 0x8007_0070,
        /// `HV_ERROR_MACHINE_LOCKED`.
        MACHINE_LOCKED = 0x8007_04F7,
        /// `HV_ERROR_DEVICE_NOT_CONNECTED`.
        DEVICE_NOT_CONNECTED = 0x8007_048F,
    }
}

impl IcStatus {
    /// OpenVMM's name for [`IcStatus::S_CONT`].
    pub const NO_MORE_ITEMS: Self = Self::S_CONT;
}

wire_enum! {
    /// KVP operations (`KVP_OP_*`, Linux uapi; OpenVMM `KvpOperation`).
    pub struct KvpOperation(u8) {
        /// `KVP_OP_GET`.
        GET = 0,
        /// `KVP_OP_SET`.
        SET = 1,
        /// `KVP_OP_DELETE`.
        DELETE = 2,
        /// `KVP_OP_ENUMERATE`.
        ENUMERATE = 3,
        /// `KVP_OP_GET_IP_INFO`.
        GET_IP_INFO = 4,
        /// `KVP_OP_SET_IP_INFO`.
        SET_IP_INFO = 5,
    }
}

wire_enum! {
    /// KVP pools (`KVP_POOL_*`, Linux uapi; OpenVMM `KvpPool`).
    pub struct KvpPool(u8) {
        /// `KVP_POOL_EXTERNAL`: data the host pushes to the guest.
        EXTERNAL = 0,
        /// `KVP_POOL_GUEST`: data the guest publishes.
        GUEST = 1,
        /// `KVP_POOL_AUTO`: the guest-generated well-known keys.
        AUTO = 2,
        /// `KVP_POOL_AUTO_EXTERNAL`.
        AUTO_EXTERNAL = 3,
        /// `KVP_POOL_AUTO_INTERNAL`.
        AUTO_INTERNAL = 4,
    }
}

wire_enum! {
    /// KVP value types (Linux `REG_*`; OpenVMM `ValueType` adds expand-string and QWORD).
    pub struct KvpValueType(u32) {
        /// `REG_SZ`: a UTF-16LE string.
        REG_SZ = 1,
        /// Expand string (OpenVMM `EXPAND_STRING`): read as a string.
        REG_EXPAND_SZ = 2,
        /// `REG_U32`: a little-endian u32 (OpenVMM `DWORD`).
        REG_U32 = 4,
        /// `REG_U64`: a little-endian u64 (Linux).
        REG_U64 = 8,
        /// `REG_QWORD`: a little-endian u64 (OpenVMM `QWORD`).
        REG_QWORD = 11,
    }
}

// ---------------------------------------------------------------------------------------
// Structures.

/// Pipe header in front of every IC message (`struct vmbuspipe_hdr`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PipeHeader {
    /// Pipe packet type ([`PIPE_PACKET_TYPE_DATA`]).
    pub flags: U32,
    /// Bytes following this header.
    pub msgsize: U32,
}

/// IC message header (`struct icmsg_hdr`): 20 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IcMsgHdr {
    /// Framework version.
    pub icverframe: IcVersion,
    /// [`IcMsgType`].
    pub icmsgtype: U16,
    /// Message (service) version.
    pub icvermsg: IcVersion,
    /// Body size in bytes.
    pub icmsgsize: U16,
    /// [`IcStatus`] of a response.
    pub status: U32,
    /// Echoed by the response.
    pub ictransaction_id: u8,
    /// `ICMSGHDRFLAG_*` bits.
    pub icflags: u8,
    /// Zero.
    pub reserved: [u8; 2],
}

impl IcMsgHdr {
    /// The message type.
    pub fn msg_type(&self) -> IcMsgType {
        IcMsgType(self.icmsgtype.get())
    }

    /// The status.
    pub fn status(&self) -> IcStatus {
        IcStatus(self.status.get())
    }

    /// Whether the sender expects an answer (transaction flag).
    pub fn is_transaction(&self) -> bool {
        self.icflags & ICMSGHDRFLAG_TRANSACTION != 0
    }
}

/// Version negotiation body, fixed part (`struct icmsg_negotiate` up to its version
/// array): 8 bytes, followed by `icframe_vercnt + icmsg_vercnt` [`IcVersion`]s.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IcMsgNegotiate {
    /// Framework versions listed first.
    pub icframe_vercnt: U16,
    /// Service versions listed after them.
    pub icmsg_vercnt: U16,
    /// Zero.
    pub reserved: U32,
}

/// Heartbeat body (`struct heartbeat_msg_data`): 40 bytes in Linux; OpenVMM declares 16
/// (sequence number, application state, reserved). Only `seq_num` is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HeartbeatMsgData {
    /// Sequence number; the guest answers with it plus one.
    pub seq_num: U64,
    /// Reserved (OpenVMM: application state u32, then reserved).
    pub reserved: [u8; 32],
}

/// Shutdown body (`struct shutdown_msg_data`): 2060 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ShutdownMsgData {
    /// Reason (OpenVMM sends `SHTDN_REASON_FLAG_PLANNED`, 0x80000000).
    pub reason_code: U32,
    /// Time allowed for the shutdown.
    pub timeout_seconds: U32,
    /// `SHUTDOWN_FLAG_*` bits.
    pub flags: U32,
    /// Message text.
    pub display_message: [u8; 2048],
}

/// Time-sync body for versions below 4 (`struct ictimesync_data`): 25 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IcTimesyncData {
    /// Host UTC in 100 ns units since 1601-01-01.
    pub parenttime: U64,
    /// Guest time (unused).
    pub childtime: U64,
    /// Round trip (unused).
    pub roundtriptime: U64,
    /// `ICTIMESYNCFLAG_*`.
    pub flags: u8,
}

/// Time-sync body for version 4 (`struct ictimesync_ref_data`): 22 bytes (OpenVMM
/// declares 24; the first 22 agree).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IcTimesyncRefData {
    /// Host UTC in 100 ns units since 1601-01-01.
    pub parenttime: U64,
    /// The guest's reference counter (TIME_REF_COUNT) when the sample was taken.
    pub vmreferencetime: U64,
    /// `ICTIMESYNCFLAG_*`.
    pub flags: u8,
    /// Leap-second flags.
    pub leapflags: u8,
    /// Stratum.
    pub stratum: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// KVP header for operations 0..=3 (`struct hv_kvp_hdr`): 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct KvpHdr {
    /// [`KvpOperation`].
    pub operation: u8,
    /// [`KvpPool`].
    pub pool: u8,
    /// Padding.
    pub pad: U16,
}

/// KVP value record (`struct hv_kvp_exchg_msg_value`): 2572 bytes. Strings are UTF-16LE
/// and their sizes count bytes including the terminating NUL.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KvpExchgMsgValue {
    /// [`KvpValueType`].
    pub value_type: U32,
    /// Bytes of `key` used.
    pub key_size: U32,
    /// Bytes of `value` used.
    pub value_size: U32,
    /// UTF-16LE key.
    pub key: [u8; HV_KVP_EXCHANGE_MAX_KEY_SIZE],
    /// UTF-16LE string, or a u32/u64 at offset 0.
    pub value: [u8; HV_KVP_EXCHANGE_MAX_VALUE_SIZE],
}

/// KVP ENUMERATE body (`struct hv_kvp_msg_enumerate`): 2576 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KvpMsgEnumerate {
    /// Index asked for.
    pub index: U32,
    /// The record returned.
    pub data: KvpExchgMsgValue,
}

/// KVP DELETE body (`struct hv_kvp_msg_delete`): 516 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KvpMsgDelete {
    /// Bytes of `key` used.
    pub key_size: U32,
    /// UTF-16LE key.
    pub key: [u8; HV_KVP_EXCHANGE_MAX_KEY_SIZE],
}

/// KVP IP address info (`struct hv_kvp_ipaddr_value`): 7426 bytes. Every field is a
/// NUL-terminated UTF-16LE string; lists are separated by `;`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KvpIpaddrValue {
    /// Adapter id (GET_IP_INFO: the MAC address).
    pub adapter_id: [u8; MAX_ADAPTER_ID_SIZE * 2],
    /// `ADDR_FAMILY_*` bits.
    pub addr_family: u8,
    /// Non-zero if DHCP is on.
    pub dhcp_enabled: u8,
    /// Addresses.
    pub ip_addr: [u8; MAX_IP_ADDR_SIZE * 2],
    /// Subnet masks.
    pub sub_net: [u8; MAX_IP_ADDR_SIZE * 2],
    /// Gateways.
    pub gate_way: [u8; MAX_GATEWAY_SIZE * 2],
    /// DNS servers.
    pub dns_addr: [u8; MAX_IP_ADDR_SIZE * 2],
}

/// KVP IP-info message (`struct hv_kvp_ip_msg`): 7428 bytes, a 2-byte header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KvpIpMsg {
    /// [`KvpOperation`] (4 or 5).
    pub operation: u8,
    /// [`KvpPool`].
    pub pool: u8,
    /// The info.
    pub kvp_ip_val: KvpIpaddrValue,
}

const KEY_FIELD: usize = offset_of!(KvpExchgMsgValue, key);
const VALUE_FIELD: usize = offset_of!(KvpExchgMsgValue, value);

// ---------------------------------------------------------------------------------------
// Errors.

/// Why bytes are not a valid IC message, or why an answer does not fit. Each variant
/// names the invariant the peer (or the caller) broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcError {
    /// Shorter than the pipe and IC headers.
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// The pipe header's `msgsize` claims more bytes than follow it.
    PipeSizeBeyondPacket {
        /// `msgsize`.
        msgsize: u32,
        /// Bytes after the pipe header.
        available: usize,
    },
    /// `icmsgsize` claims more bytes than follow the headers.
    MsgSizeBeyondPacket {
        /// `icmsgsize`.
        icmsgsize: u16,
        /// Bytes after the headers.
        available: usize,
    },
    /// The body is shorter than its message type needs.
    BodyTooShort {
        /// Bytes the parser needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// A negotiate message lists no versions of a kind, more than
    /// [`IC_VERSION_NEGOTIATION_MAX_VER_COUNT`], or more than the body holds.
    BadVersionCount {
        /// `icframe_vercnt`.
        framework: u16,
        /// `icmsg_vercnt`.
        message: u16,
    },
    /// A KVP operation no reference defines.
    UnknownOperation(u8),
    /// A KVP string size that is odd, too small, above its field's maximum, or beyond
    /// the bytes present.
    BadStringSize {
        /// The size field.
        size: u32,
        /// The most the field allows.
        max: usize,
    },
    /// A KVP value type no reference defines.
    BadValueType(u32),
    /// A string to encode does not fit its field (NUL included).
    StringTooLong {
        /// Bytes the field has.
        max: usize,
    },
    /// An output buffer is smaller than the message or field written to it.
    BufferTooSmall,
    /// A message body longer than `icmsgsize` (u16) can describe.
    TooLong,
}

impl fmt::Display for IcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len } => write!(f, "{len}-byte IC message lacks its headers"),
            Self::PipeSizeBeyondPacket { msgsize, available } => {
                write!(f, "pipe header claims {msgsize} bytes, {available} present")
            }
            Self::MsgSizeBeyondPacket {
                icmsgsize,
                available,
            } => write!(f, "icmsgsize {icmsgsize} beyond the {available} body bytes"),
            Self::BodyTooShort { needed, available } => {
                write!(f, "body of {available} bytes, {needed} needed")
            }
            Self::BadVersionCount { framework, message } => write!(
                f,
                "bad negotiate counts: {framework} framework, {message} message versions"
            ),
            Self::UnknownOperation(op) => write!(f, "unknown KVP operation {op}"),
            Self::BadStringSize { size, max } => {
                write!(f, "KVP string size {size} invalid (at most {max})")
            }
            Self::BadValueType(t) => write!(f, "unknown KVP value type {t}"),
            Self::StringTooLong { max } => write!(f, "string does not fit {max} bytes"),
            Self::BufferTooSmall => f.write_str("output buffer too small"),
            Self::TooLong => f.write_str("IC body longer than icmsgsize can describe"),
        }
    }
}

impl core::error::Error for IcError {}

fn need(body: &[u8], needed: usize) -> Result<(), IcError> {
    if body.len() < needed {
        Err(IcError::BodyTooShort {
            needed,
            available: body.len(),
        })
    } else {
        Ok(())
    }
}

fn read_at<T: FromBytes>(bytes: &[u8], offset: usize) -> Result<T, IcError> {
    let needed = offset.saturating_add(size_of::<T>());
    let tail = bytes.get(offset..).ok_or(IcError::BodyTooShort {
        needed,
        available: bytes.len(),
    })?;
    T::read_from_prefix(tail)
        .map(|(v, _)| v)
        .map_err(|_| IcError::BodyTooShort {
            needed,
            available: bytes.len(),
        })
}

// ---------------------------------------------------------------------------------------
// The message frame.

/// A checked IC message: headers validated, body = every byte after them (padding of the
/// ring packet included, as reference guests read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcMessage<'a> {
    /// The pipe header.
    pub pipe: PipeHeader,
    /// The IC header.
    pub header: IcMsgHdr,
    /// Bytes after the headers.
    pub body: &'a [u8],
}

impl<'a> IcMessage<'a> {
    /// Checks the headers at the start of a ring packet's payload: both present, the pipe
    /// header's `msgsize` and `icmsgsize` within the packet.
    pub fn parse(payload: &'a [u8]) -> Result<Self, IcError> {
        let truncated = IcError::Truncated { len: payload.len() };
        let (pipe, rest) = PipeHeader::read_from_prefix(payload).map_err(|_| truncated)?;
        let (header, body) = IcMsgHdr::read_from_prefix(rest).map_err(|_| truncated)?;
        if pipe.msgsize.get() as usize > rest.len() {
            return Err(IcError::PipeSizeBeyondPacket {
                msgsize: pipe.msgsize.get(),
                available: rest.len(),
            });
        }
        if usize::from(header.icmsgsize.get()) > body.len() {
            return Err(IcError::MsgSizeBeyondPacket {
                icmsgsize: header.icmsgsize.get(),
                available: body.len(),
            });
        }
        Ok(IcMessage { pipe, header, body })
    }

    /// The message type.
    pub fn msg_type(&self) -> IcMsgType {
        self.header.msg_type()
    }

    /// The first `icmsgsize` bytes of the body (checked to exist).
    pub fn declared_body(&self) -> &'a [u8] {
        self.body
            .get(..usize::from(self.header.icmsgsize.get()))
            .unwrap_or(self.body)
    }
}

/// Writes a whole IC message (pipe header, `header` with `icmsgsize` set to the body's
/// length, body pieces back to back); returns the bytes written. The pipe header says
/// [`PIPE_PACKET_TYPE_DATA`] and the IC header plus body length.
pub fn encode_message(buf: &mut [u8], header: &IcMsgHdr, body: &[&[u8]]) -> Result<usize, IcError> {
    let body_len = body
        .iter()
        .try_fold(0usize, |n, piece| n.checked_add(piece.len()))
        .ok_or(IcError::TooLong)?;
    let icmsgsize = u16::try_from(body_len).map_err(|_| IcError::TooLong)?;
    let pipe = PipeHeader {
        flags: U32::new(PIPE_PACKET_TYPE_DATA),
        msgsize: U32::new((IC_HEADER_SIZE + body_len) as u32),
    };
    let mut header = *header;
    header.icmsgsize = U16::new(icmsgsize);
    let mut w = Writer::new(buf);
    let small = |_| IcError::BufferTooSmall;
    w.put(pipe.as_bytes()).map_err(small)?;
    w.put(header.as_bytes()).map_err(small)?;
    for piece in body {
        w.put(piece).map_err(small)?;
    }
    Ok(w.len())
}

// ---------------------------------------------------------------------------------------
// Negotiation.

/// A checked negotiate body: counts within bounds and every listed version present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NegotiateMsg<'a> {
    /// The fixed part.
    pub fixed: IcMsgNegotiate,
    /// The framework versions.
    pub framework: &'a [IcVersion],
    /// The service versions.
    pub message: &'a [IcVersion],
}

impl<'a> NegotiateMsg<'a> {
    /// Checks a negotiate body as a response may carry it: counts at most
    /// [`IC_VERSION_NEGOTIATION_MAX_VER_COUNT`] each (0 allowed) and all versions present.
    pub fn parse(body: &'a [u8]) -> Result<Self, IcError> {
        let (fixed, rest) =
            IcMsgNegotiate::read_from_prefix(body).map_err(|_| IcError::BodyTooShort {
                needed: size_of::<IcMsgNegotiate>(),
                available: body.len(),
            })?;
        let (fw, msg) = (fixed.icframe_vercnt.get(), fixed.icmsg_vercnt.get());
        let bad = IcError::BadVersionCount {
            framework: fw,
            message: msg,
        };
        if fw > IC_VERSION_NEGOTIATION_MAX_VER_COUNT || msg > IC_VERSION_NEGOTIATION_MAX_VER_COUNT {
            return Err(bad);
        }
        let (framework, rest) =
            <[IcVersion]>::ref_from_prefix_with_elems(rest, usize::from(fw)).map_err(|_| bad)?;
        let (message, _) =
            <[IcVersion]>::ref_from_prefix_with_elems(rest, usize::from(msg)).map_err(|_| bad)?;
        Ok(NegotiateMsg {
            fixed,
            framework,
            message,
        })
    }

    /// Checks a negotiate request from the host: as [`parse`](Self::parse), and at least
    /// one version of each kind (FreeBSD's rule).
    pub fn parse_request(body: &'a [u8]) -> Result<Self, IcError> {
        let m = Self::parse(body)?;
        if m.framework.is_empty() || m.message.is_empty() {
            return Err(IcError::BadVersionCount {
                framework: m.fixed.icframe_vercnt.get(),
                message: m.fixed.icmsg_vercnt.get(),
            });
        }
        Ok(m)
    }
}

/// The versions both sides speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The framework version.
    pub framework: IcVersion,
    /// The service version.
    pub message: IcVersion,
}

/// Picks the highest framework version and the highest service version that both the
/// host and the guest list; `None` unless both kinds have one in common (Linux then
/// answers with counts 0/0). The order of either list does not matter.
pub fn negotiate(
    host_framework: &[IcVersion],
    host_message: &[IcVersion],
    our_framework: &[IcVersion],
    our_message: &[IcVersion],
) -> Option<Negotiated> {
    fn highest(host: &[IcVersion], ours: &[IcVersion]) -> Option<IcVersion> {
        host.iter().filter(|v| ours.contains(v)).max().copied()
    }
    Some(Negotiated {
        framework: highest(host_framework, our_framework)?,
        message: highest(host_message, our_message)?,
    })
}

/// The body of a negotiate answer: counts 1/1 with the framework version in entry 0 and
/// the service version in entry 1, or counts 0/0 (and zero versions) when `chosen` is
/// `None`. [`NEGOTIATE_RESPONSE_BODY_SIZE`] bytes, the `icmsgsize` Linux sets.
pub fn negotiate_response_body(chosen: Option<Negotiated>) -> [u8; NEGOTIATE_RESPONSE_BODY_SIZE] {
    let mut out = [0u8; NEGOTIATE_RESPONSE_BODY_SIZE];
    let (count, versions) = match chosen {
        Some(n) => (1u16, [n.framework, n.message]),
        None => (0, [IcVersion::default(); 2]),
    };
    let fixed = IcMsgNegotiate {
        icframe_vercnt: U16::new(count),
        icmsg_vercnt: U16::new(count),
        reserved: U32::ZERO,
    };
    let mut w = Writer::new(&mut out);
    // Both fit: 8 + 2 * 4 bytes into a 16-byte array.
    let _ = w.put(fixed.as_bytes());
    let _ = w.put(versions.as_bytes());
    out
}

/// Reads a negotiate answer (as the host does): `Some` with the two versions for counts
/// 1/1, `None` for 0/0; any other count is [`IcError::BadVersionCount`].
pub fn parse_negotiate_response(body: &[u8]) -> Result<Option<Negotiated>, IcError> {
    let m = NegotiateMsg::parse(body)?;
    match (m.framework, m.message) {
        ([], []) => Ok(None),
        ([framework], [message]) => Ok(Some(Negotiated {
            framework: *framework,
            message: *message,
        })),
        _ => Err(IcError::BadVersionCount {
            framework: m.fixed.icframe_vercnt.get(),
            message: m.fixed.icmsg_vercnt.get(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Heartbeat, shutdown, time sync.

/// Bytes of a heartbeat body a guest needs: the sequence number (Linux does not require
/// the reserved area).
pub const HEARTBEAT_MIN_BODY: usize = size_of::<u64>();

/// The sequence number of a heartbeat body.
pub fn heartbeat_seq(body: &[u8]) -> Result<u64, IcError> {
    need(body, HEARTBEAT_MIN_BODY)?;
    read_at::<U64>(body, 0).map(|v| v.get())
}

/// What a shutdown request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// Reason code.
    pub reason_code: u32,
    /// Seconds allowed.
    pub timeout_seconds: u32,
    /// `SHUTDOWN_FLAG_*` bits.
    pub flags: u32,
}

/// Bytes of a shutdown body read: reason, timeout and flags (the display message is not
/// needed).
pub const SHUTDOWN_MIN_BODY: usize = offset_of!(ShutdownMsgData, display_message);

impl ShutdownRequest {
    /// Reads the fixed fields of a shutdown body.
    pub fn parse(body: &[u8]) -> Result<Self, IcError> {
        need(body, SHUTDOWN_MIN_BODY)?;
        Ok(ShutdownRequest {
            reason_code: read_at::<U32>(body, offset_of!(ShutdownMsgData, reason_code))?.get(),
            timeout_seconds: read_at::<U32>(body, offset_of!(ShutdownMsgData, timeout_seconds))?
                .get(),
            flags: read_at::<U32>(body, offset_of!(ShutdownMsgData, flags))?.get(),
        })
    }
}

/// A time-sync body in the layout of the negotiated version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimesyncMsg {
    /// Versions below 4.
    V1(IcTimesyncData),
    /// Version 4 and later.
    V4(IcTimesyncRefData),
}

impl TimesyncMsg {
    /// Reads a body in the layout of service version `version`.
    pub fn parse(body: &[u8], version: IcVersion) -> Result<Self, IcError> {
        if version.major.get() >= 4 {
            need(body, size_of::<IcTimesyncRefData>())?;
            read_at(body, 0).map(TimesyncMsg::V4)
        } else {
            need(body, size_of::<IcTimesyncData>())?;
            read_at(body, 0).map(TimesyncMsg::V1)
        }
    }

    /// The host time, 100 ns units since 1601-01-01 UTC.
    pub fn parent_time(&self) -> u64 {
        match self {
            Self::V1(d) => d.parenttime.get(),
            Self::V4(d) => d.parenttime.get(),
        }
    }

    /// The flags.
    pub fn flags(&self) -> u8 {
        match self {
            Self::V1(d) => d.flags,
            Self::V4(d) => d.flags,
        }
    }

    /// The guest reference counter at sampling time (version 4 only).
    pub fn reference_time(&self) -> Option<u64> {
        match self {
            Self::V1(_) => None,
            Self::V4(d) => Some(d.vmreferencetime.get()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// KVP strings.

/// A UTF-16LE string from a KVP message, as bytes (NUL and anything after it included).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KvpString<'a> {
    bytes: &'a [u8],
}

impl<'a> KvpString<'a> {
    /// A string whose size field says `size` bytes of `field`: even, between `min` and
    /// `max`, and present.
    pub fn sized(field: &'a [u8], size: u32, min: usize, max: usize) -> Result<Self, IcError> {
        let bad = IcError::BadStringSize { size, max };
        let n = usize::try_from(size).map_err(|_| bad)?;
        if n % 2 != 0 || n < min || n > max {
            return Err(bad);
        }
        let bytes = field.get(..n).ok_or(bad)?;
        Ok(KvpString { bytes })
    }

    /// A string in a fixed-size field, ending at the first NUL or at the field's end.
    pub fn fixed(field: &'a [u8]) -> Self {
        KvpString {
            bytes: field.get(..field.len() & !1).unwrap_or(&[]),
        }
    }

    /// The UTF-16 units before the first NUL.
    pub fn units(&self) -> impl Iterator<Item = u16> + Clone + 'a {
        self.bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
    }

    /// Number of units before the first NUL.
    pub fn len_units(&self) -> usize {
        self.units().count()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.units().next().is_none()
    }

    /// Whether the string equals `s`.
    pub fn eq_str(&self, s: &str) -> bool {
        self.units().eq(s.encode_utf16())
    }

    /// The characters, with unpaired surrogates replaced by U+FFFD.
    pub fn chars(&self) -> impl Iterator<Item = char> + 'a {
        char::decode_utf16(self.units()).map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
    }
}

impl fmt::Display for KvpString<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use core::fmt::Write;
        for c in self.chars() {
            f.write_char(c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for KvpString<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", DisplayQuoted(self))
    }
}

struct DisplayQuoted<'a, 'b>(&'b KvpString<'a>);

impl fmt::Debug for DisplayQuoted<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use core::fmt::Write;
        f.write_char('"')?;
        for c in self.0.chars() {
            for e in c.escape_debug() {
                f.write_char(e)?;
            }
        }
        f.write_char('"')
    }
}

/// Writes `units` as UTF-16LE followed by a NUL at the start of `field` and zeroes the
/// rest of it; returns the bytes used, NUL included (the size field's value). Fails
/// without a partial string when it does not fit.
pub fn put_utf16(
    field: &mut [u8],
    units: impl IntoIterator<Item = u16> + Clone,
) -> Result<u32, IcError> {
    let count = units.clone().into_iter().count();
    let used = count
        .checked_add(1)
        .and_then(|n| n.checked_mul(2))
        .filter(|&n| n <= field.len())
        .ok_or(IcError::StringTooLong { max: field.len() })?;
    for (dst, u) in field.chunks_exact_mut(2).zip(units) {
        dst.copy_from_slice(&u.to_le_bytes());
    }
    field.get_mut(count * 2..).unwrap_or(&mut []).fill(0);
    u32::try_from(used).map_err(|_| IcError::StringTooLong { max: field.len() })
}

/// [`put_utf16`] for a `&str`.
pub fn put_str(field: &mut [u8], s: &str) -> Result<u32, IcError> {
    put_utf16(field, s.encode_utf16())
}

// ---------------------------------------------------------------------------------------
// KVP records.

/// A value from a KVP record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvpValue<'a> {
    /// `REG_SZ` or expand string.
    String(KvpString<'a>),
    /// `REG_U32`.
    U32(u32),
    /// `REG_U64` or `REG_QWORD`.
    U64(u64),
}

/// A checked view of a KVP value record that may be shorter than 2572 bytes (hosts send
/// what the operation needs): the 12-byte fixed part is present; the key and value are
/// checked against the bytes present when asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvpRecord<'a> {
    bytes: &'a [u8],
}

impl<'a> KvpRecord<'a> {
    /// Checks that the fixed part (type and sizes) is present.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, IcError> {
        need(bytes, KEY_FIELD)?;
        Ok(KvpRecord { bytes })
    }

    /// The value type field.
    pub fn value_type(&self) -> KvpValueType {
        KvpValueType(self.word(offset_of!(KvpExchgMsgValue, value_type)))
    }

    /// The key size field.
    pub fn key_size(&self) -> u32 {
        self.word(offset_of!(KvpExchgMsgValue, key_size))
    }

    /// The value size field.
    pub fn value_size(&self) -> u32 {
        self.word(offset_of!(KvpExchgMsgValue, value_size))
    }

    fn word(&self, offset: usize) -> u32 {
        read_at::<U32>(self.bytes, offset).map_or(0, |v| v.get())
    }

    fn field(&self, start: usize, len: usize) -> &'a [u8] {
        let end = start.saturating_add(len).min(self.bytes.len());
        self.bytes.get(start..end).unwrap_or(&[])
    }

    /// The key: size even, at least one unit plus the NUL, at most 512 bytes, present.
    pub fn key(&self) -> Result<KvpString<'a>, IcError> {
        KvpString::sized(
            self.field(KEY_FIELD, HV_KVP_EXCHANGE_MAX_KEY_SIZE),
            self.key_size(),
            4,
            HV_KVP_EXCHANGE_MAX_KEY_SIZE,
        )
    }

    /// The value in its declared type; strings must be even-sized, at most 2048 bytes
    /// and present, numbers need their 4 or 8 bytes.
    pub fn value(&self) -> Result<KvpValue<'a>, IcError> {
        let field = self.field(VALUE_FIELD, HV_KVP_EXCHANGE_MAX_VALUE_SIZE);
        let number = |n: usize| -> Result<&[u8], IcError> {
            field.get(..n).ok_or(IcError::BodyTooShort {
                needed: VALUE_FIELD + n,
                available: self.bytes.len(),
            })
        };
        match self.value_type() {
            KvpValueType::REG_SZ | KvpValueType::REG_EXPAND_SZ => Ok(KvpValue::String(
                KvpString::sized(field, self.value_size(), 0, HV_KVP_EXCHANGE_MAX_VALUE_SIZE)?,
            )),
            KvpValueType::REG_U32 => {
                let b = number(4)?;
                Ok(KvpValue::U32(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            KvpValueType::REG_U64 | KvpValueType::REG_QWORD => {
                let b = number(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(KvpValue::U64(u64::from_le_bytes(a)))
            }
            KvpValueType(t) => Err(IcError::BadValueType(t)),
        }
    }
}

/// Fills a KVP value record in place (a guest answering GET or ENUMERATE).
pub struct KvpRecordMut<'a> {
    bytes: &'a mut [u8],
}

impl<'a> KvpRecordMut<'a> {
    /// A record over the first [`KVP_RECORD_SIZE`] bytes of `bytes`.
    pub fn new(bytes: &'a mut [u8]) -> Result<Self, IcError> {
        let bytes = bytes
            .get_mut(..KVP_RECORD_SIZE)
            .ok_or(IcError::BufferTooSmall)?;
        Ok(KvpRecordMut { bytes })
    }

    fn set_word(&mut self, offset: usize, v: u32) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + 4) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Sets the value type.
    pub fn set_value_type(&mut self, t: KvpValueType) {
        self.set_word(offset_of!(KvpExchgMsgValue, value_type), t.0);
    }

    /// Writes the key and its size.
    pub fn set_key(&mut self, units: impl IntoIterator<Item = u16> + Clone) -> Result<(), IcError> {
        let field = self
            .bytes
            .get_mut(KEY_FIELD..VALUE_FIELD)
            .ok_or(IcError::BufferTooSmall)?;
        let size = put_utf16(field, units)?;
        self.set_word(offset_of!(KvpExchgMsgValue, key_size), size);
        Ok(())
    }

    /// Writes a string value, its size and type `REG_SZ`.
    pub fn set_value_string(
        &mut self,
        units: impl IntoIterator<Item = u16> + Clone,
    ) -> Result<(), IcError> {
        let field = self
            .bytes
            .get_mut(VALUE_FIELD..KVP_RECORD_SIZE)
            .ok_or(IcError::BufferTooSmall)?;
        let size = put_utf16(field, units)?;
        self.set_word(offset_of!(KvpExchgMsgValue, value_size), size);
        self.set_value_type(KvpValueType::REG_SZ);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// KVP requests.

/// A checked KVP request body (what follows the IC header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvpRequest<'a> {
    /// GET: the value of `key` in `pool`.
    Get {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: KvpString<'a>,
    },
    /// SET: store `value` under `key` in `pool`.
    Set {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: KvpString<'a>,
        /// Value.
        value: KvpValue<'a>,
    },
    /// DELETE: remove `key` from `pool`.
    Delete {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: KvpString<'a>,
    },
    /// ENUMERATE: the `index`th pair of `pool`.
    Enumerate {
        /// Pool.
        pool: KvpPool,
        /// Index.
        index: u32,
    },
    /// GET_IP_INFO for an adapter.
    GetIpInfo {
        /// Pool.
        pool: KvpPool,
        /// Adapter id (a MAC address in Linux's daemon).
        adapter_id: KvpString<'a>,
        /// Address family asked for.
        addr_family: u8,
    },
    /// SET_IP_INFO for an adapter (injected configuration).
    SetIpInfo {
        /// Pool.
        pool: KvpPool,
        /// Adapter id (the device GUID in Linux's daemon).
        adapter_id: KvpString<'a>,
    },
}

impl<'a> KvpRequest<'a> {
    /// Checks a KVP body. Only the bytes an operation reads must be present: GET needs
    /// the key, SET key and value, DELETE its key, ENUMERATE its index, the IP-info
    /// operations the adapter id and address family.
    pub fn parse(body: &'a [u8]) -> Result<Self, IcError> {
        need(body, 2)?;
        let (op, pool) = (KvpOperation(body[0]), KvpPool(body[1]));
        Ok(match op {
            KvpOperation::GET | KvpOperation::SET => {
                need(body, KVP_BODY_OFFSET)?;
                let record = KvpRecord::parse(&body[KVP_BODY_OFFSET..]).map_err(|_| {
                    IcError::BodyTooShort {
                        needed: KVP_BODY_OFFSET + KEY_FIELD,
                        available: body.len(),
                    }
                })?;
                let key = record.key()?;
                if op == KvpOperation::GET {
                    KvpRequest::Get { pool, key }
                } else {
                    KvpRequest::Set {
                        pool,
                        key,
                        value: record.value()?,
                    }
                }
            }
            KvpOperation::DELETE => {
                let size_at = KVP_BODY_OFFSET + offset_of!(KvpMsgDelete, key_size);
                let size = read_at::<U32>(body, size_at)?.get();
                let start = KVP_BODY_OFFSET + offset_of!(KvpMsgDelete, key);
                let end = (start + HV_KVP_EXCHANGE_MAX_KEY_SIZE).min(body.len());
                let field = body.get(start..end).unwrap_or(&[]);
                KvpRequest::Delete {
                    pool,
                    key: KvpString::sized(field, size, 4, HV_KVP_EXCHANGE_MAX_KEY_SIZE)?,
                }
            }
            KvpOperation::ENUMERATE => KvpRequest::Enumerate {
                pool,
                index: read_at::<U32>(body, KVP_BODY_OFFSET + offset_of!(KvpMsgEnumerate, index))?
                    .get(),
            },
            KvpOperation::GET_IP_INFO | KvpOperation::SET_IP_INFO => {
                let start = KVP_IP_BODY_OFFSET + offset_of!(KvpIpaddrValue, adapter_id);
                let family_at = KVP_IP_BODY_OFFSET + offset_of!(KvpIpaddrValue, addr_family);
                need(body, family_at + 1)?;
                let adapter_id = KvpString::fixed(&body[start..family_at]);
                if op == KvpOperation::GET_IP_INFO {
                    KvpRequest::GetIpInfo {
                        pool,
                        adapter_id,
                        addr_family: body[family_at],
                    }
                } else {
                    KvpRequest::SetIpInfo { pool, adapter_id }
                }
            }
            KvpOperation(other) => return Err(IcError::UnknownOperation(other)),
        })
    }

    /// The operation.
    pub fn operation(&self) -> KvpOperation {
        match self {
            Self::Get { .. } => KvpOperation::GET,
            Self::Set { .. } => KvpOperation::SET,
            Self::Delete { .. } => KvpOperation::DELETE,
            Self::Enumerate { .. } => KvpOperation::ENUMERATE,
            Self::GetIpInfo { .. } => KvpOperation::GET_IP_INFO,
            Self::SetIpInfo { .. } => KvpOperation::SET_IP_INFO,
        }
    }

    /// The pool.
    pub fn pool(&self) -> KvpPool {
        match *self {
            Self::Get { pool, .. }
            | Self::Set { pool, .. }
            | Self::Delete { pool, .. }
            | Self::Enumerate { pool, .. }
            | Self::GetIpInfo { pool, .. }
            | Self::SetIpInfo { pool, .. } => pool,
        }
    }
}

/// The record of an ENUMERATE body (after the KVP header and index), for the host
/// reading a guest's answer.
pub fn kvp_enumerate_record(body: &[u8]) -> Result<KvpRecord<'_>, IcError> {
    need(body, KVP_ENUMERATE_RECORD_OFFSET)?;
    KvpRecord::parse(&body[KVP_ENUMERATE_RECORD_OFFSET..])
}

/// The record of a GET or SET body (after the KVP header).
pub fn kvp_get_record(body: &[u8]) -> Result<KvpRecord<'_>, IcError> {
    need(body, KVP_BODY_OFFSET)?;
    KvpRecord::parse(&body[KVP_BODY_OFFSET..])
}

/// Field of [`KvpIpaddrValue`] in [`KvpIpInfo`] and [`KvpIpInfoMut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpInfoField {
    /// `adapter_id`.
    AdapterId,
    /// `ip_addr`.
    IpAddr,
    /// `sub_net`.
    SubNet,
    /// `gate_way`.
    GateWay,
    /// `dns_addr`.
    DnsAddr,
}

impl IpInfoField {
    /// Offset and length inside [`KvpIpaddrValue`].
    const fn range(self) -> (usize, usize) {
        match self {
            Self::AdapterId => (
                offset_of!(KvpIpaddrValue, adapter_id),
                MAX_ADAPTER_ID_SIZE * 2,
            ),
            Self::IpAddr => (offset_of!(KvpIpaddrValue, ip_addr), MAX_IP_ADDR_SIZE * 2),
            Self::SubNet => (offset_of!(KvpIpaddrValue, sub_net), MAX_IP_ADDR_SIZE * 2),
            Self::GateWay => (offset_of!(KvpIpaddrValue, gate_way), MAX_GATEWAY_SIZE * 2),
            Self::DnsAddr => (offset_of!(KvpIpaddrValue, dns_addr), MAX_IP_ADDR_SIZE * 2),
        }
    }
}

/// A checked view of the IP info in a GET_IP_INFO answer (the KVP body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvpIpInfo<'a> {
    bytes: &'a [u8],
}

impl<'a> KvpIpInfo<'a> {
    /// Checks that the whole 7428-byte IP-info body is present.
    pub fn parse(body: &'a [u8]) -> Result<Self, IcError> {
        need(body, KVP_IP_INFO_SIZE)?;
        Ok(KvpIpInfo {
            bytes: &body[KVP_IP_BODY_OFFSET..KVP_IP_INFO_SIZE],
        })
    }

    /// A string field.
    pub fn field(&self, field: IpInfoField) -> KvpString<'a> {
        let (start, len) = field.range();
        KvpString::fixed(self.bytes.get(start..start + len).unwrap_or(&[]))
    }

    /// `ADDR_FAMILY_*` bits.
    pub fn addr_family(&self) -> u8 {
        self.bytes[offset_of!(KvpIpaddrValue, addr_family)]
    }

    /// Whether DHCP is on.
    pub fn dhcp_enabled(&self) -> bool {
        self.bytes[offset_of!(KvpIpaddrValue, dhcp_enabled)] != 0
    }
}

/// Fills the IP info of a GET_IP_INFO answer in place (the KVP body, 7428 bytes).
pub struct KvpIpInfoMut<'a> {
    bytes: &'a mut [u8],
}

impl<'a> KvpIpInfoMut<'a> {
    /// A view over the IP info of `body` (at least [`KVP_IP_INFO_SIZE`] bytes).
    pub fn new(body: &'a mut [u8]) -> Result<Self, IcError> {
        let bytes = body
            .get_mut(KVP_IP_BODY_OFFSET..KVP_IP_INFO_SIZE)
            .ok_or(IcError::BufferTooSmall)?;
        Ok(KvpIpInfoMut { bytes })
    }

    /// Writes a string field (NUL-terminated, rest zeroed).
    pub fn set_field(&mut self, field: IpInfoField, s: &str) -> Result<(), IcError> {
        let (start, len) = field.range();
        let dst = self
            .bytes
            .get_mut(start..start + len)
            .ok_or(IcError::BufferTooSmall)?;
        put_str(dst, s).map(|_| ())
    }

    /// Sets the `ADDR_FAMILY_*` bits.
    pub fn set_addr_family(&mut self, family: u8) {
        self.bytes[offset_of!(KvpIpaddrValue, addr_family)] = family;
    }

    /// Sets the DHCP flag.
    pub fn set_dhcp_enabled(&mut self, on: bool) {
        self.bytes[offset_of!(KvpIpaddrValue, dhcp_enabled)] = u8::from(on);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    // Sizes and offsets: Linux include/linux/hyperv.h @20cd569d (IC structures) and
    // include/uapi/linux/hyperv.h @2cc2c3cb (KVP), see shared/reference/wire-layouts.md
    // sections 6 and 7; the "Abs." column is checked as ICMSG_HDR + body offset.

    #[test]
    fn header_layouts() {
        assert_eq!(size_of::<PipeHeader>(), 8);
        assert_eq!(offset_of!(PipeHeader, flags), 0);
        assert_eq!(offset_of!(PipeHeader, msgsize), 4);

        assert_eq!(size_of::<IcMsgHdr>(), 20);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, icverframe), 8);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, icmsgtype), 12);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, icvermsg), 14);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, icmsgsize), 18);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, status), 20);
        assert_eq!(
            PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, ictransaction_id),
            24
        );
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, icflags), 25);
        assert_eq!(PIPE_HEADER_SIZE + offset_of!(IcMsgHdr, reserved), 26);
        assert_eq!(ICMSG_HDR, 28);

        assert_eq!(size_of::<IcVersion>(), 4);
        assert_eq!(offset_of!(IcVersion, major), 0);
        assert_eq!(offset_of!(IcVersion, minor), 2);
        // Major first on the wire.
        assert_eq!(IcVersion::new(3, 1).as_bytes(), &[3, 0, 1, 0]);
    }

    #[test]
    fn body_layouts() {
        assert_eq!(size_of::<IcMsgNegotiate>(), 8);
        assert_eq!(ICMSG_HDR + offset_of!(IcMsgNegotiate, icframe_vercnt), 28);
        assert_eq!(ICMSG_HDR + offset_of!(IcMsgNegotiate, icmsg_vercnt), 30);
        assert_eq!(ICMSG_HDR + offset_of!(IcMsgNegotiate, reserved), 32);
        assert_eq!(ICMSG_HDR + size_of::<IcMsgNegotiate>(), 36);
        assert_eq!(NEGOTIATE_RESPONSE_BODY_SIZE, 0x10);

        assert_eq!(size_of::<ShutdownMsgData>(), 2060);
        assert_eq!(ICMSG_HDR + offset_of!(ShutdownMsgData, reason_code), 28);
        assert_eq!(ICMSG_HDR + offset_of!(ShutdownMsgData, timeout_seconds), 32);
        assert_eq!(ICMSG_HDR + offset_of!(ShutdownMsgData, flags), 36);
        assert_eq!(ICMSG_HDR + offset_of!(ShutdownMsgData, display_message), 40);

        assert_eq!(size_of::<HeartbeatMsgData>(), 40);
        assert_eq!(ICMSG_HDR + offset_of!(HeartbeatMsgData, seq_num), 28);
        assert_eq!(ICMSG_HDR + offset_of!(HeartbeatMsgData, reserved), 36);

        assert_eq!(size_of::<IcTimesyncData>(), 25);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncData, parenttime), 28);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncData, childtime), 36);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncData, roundtriptime), 44);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncData, flags), 52);

        assert_eq!(size_of::<IcTimesyncRefData>(), 22);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncRefData, parenttime), 28);
        assert_eq!(
            ICMSG_HDR + offset_of!(IcTimesyncRefData, vmreferencetime),
            36
        );
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncRefData, flags), 44);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncRefData, leapflags), 45);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncRefData, stratum), 46);
        assert_eq!(ICMSG_HDR + offset_of!(IcTimesyncRefData, reserved), 47);
    }

    #[test]
    fn kvp_layouts() {
        assert_eq!(size_of::<KvpHdr>(), 4);
        assert_eq!(ICMSG_HDR + offset_of!(KvpHdr, operation), 28);
        assert_eq!(ICMSG_HDR + offset_of!(KvpHdr, pool), 29);
        assert_eq!(ICMSG_HDR + offset_of!(KvpHdr, pad), 30);

        assert_eq!(size_of::<KvpExchgMsgValue>(), 2572);
        assert_eq!(offset_of!(KvpExchgMsgValue, value_type), 0);
        assert_eq!(offset_of!(KvpExchgMsgValue, key_size), 4);
        assert_eq!(offset_of!(KvpExchgMsgValue, value_size), 8);
        assert_eq!(offset_of!(KvpExchgMsgValue, key), 12);
        assert_eq!(offset_of!(KvpExchgMsgValue, value), 524);

        assert_eq!(size_of::<KvpMsgEnumerate>(), 2576);
        assert_eq!(offset_of!(KvpMsgEnumerate, index), 0);
        assert_eq!(offset_of!(KvpMsgEnumerate, data), 4);

        assert_eq!(size_of::<KvpMsgDelete>(), 516);
        assert_eq!(offset_of!(KvpMsgDelete, key_size), 0);
        assert_eq!(offset_of!(KvpMsgDelete, key), 4);

        assert_eq!(size_of::<KvpIpaddrValue>(), 7426);
        assert_eq!(offset_of!(KvpIpaddrValue, adapter_id), 0);
        assert_eq!(offset_of!(KvpIpaddrValue, addr_family), 256);
        assert_eq!(offset_of!(KvpIpaddrValue, dhcp_enabled), 257);
        assert_eq!(offset_of!(KvpIpaddrValue, ip_addr), 258);
        assert_eq!(offset_of!(KvpIpaddrValue, sub_net), 2306);
        assert_eq!(offset_of!(KvpIpaddrValue, gate_way), 4354);
        assert_eq!(offset_of!(KvpIpaddrValue, dns_addr), 5378);

        assert_eq!(size_of::<KvpIpMsg>(), 7428);
        assert_eq!(offset_of!(KvpIpMsg, operation), 0);
        assert_eq!(offset_of!(KvpIpMsg, pool), 1);
        assert_eq!(offset_of!(KvpIpMsg, kvp_ip_val), 2);

        // Op 0..3 bodies sit at +4 (Abs. 32), IP info at +2 (Abs. 30).
        assert_eq!(ICMSG_HDR + KVP_BODY_OFFSET, 32);
        assert_eq!(ICMSG_HDR + KVP_IP_BODY_OFFSET, 30);
        assert_eq!(KVP_GET_SET_SIZE, 2576);
        assert_eq!(KVP_ENUMERATE_SIZE, 2580);
        assert_eq!(KVP_DELETE_SIZE, 520);
        assert_eq!(ICMSG_HDR + KVP_ENUMERATE_RECORD_OFFSET, 36);
        assert_eq!(KVP_IP_INFO_SIZE, 7428);
    }

    #[test]
    fn constants() {
        // hyperv-facts.md section 8.
        assert_eq!(
            [
                ICMSGHDRFLAG_TRANSACTION,
                ICMSGHDRFLAG_REQUEST,
                ICMSGHDRFLAG_RESPONSE
            ],
            [1, 2, 4]
        );
        assert_eq!(IcStatus::S_CONT, IcStatus::NO_MORE_ITEMS);
        assert_eq!(IcStatus::NOT_SUPPORTED.0, 0x80070032);
        assert_eq!(std::format!("{:?}", IcStatus(0x80070103)), "S_CONT");
        assert_eq!(std::format!("{:?}", IcMsgType(9)), "IcMsgType(0x9)");
        assert_eq!(WLTIMEDELTA, 11_644_473_600 * 10_000_000);
        assert_eq!(IcVersion::new(3, 2).as_u32(), 0x30002);
        assert!(IcVersion::new(3, 0) > IcVersion::new(1, 5));
        assert!(IcVersion::new(3, 2) > IcVersion::new(3, 1));
        assert_eq!(std::format!("{}", IcVersion::new(4, 0)), "4.0");
    }

    #[test]
    fn class_guids() {
        // hyperv-facts.md 5.11; bytes in the mixed-endian GUID layout.
        let cases = [
            (
                HV_HEART_BEAT_GUID,
                "57164f39-9115-4e78-ab55-382f3bd5422d",
                [0x39, 0x4f, 0x16, 0x57, 0x15, 0x91, 0x78, 0x4e],
            ),
            (
                HV_SHUTDOWN_GUID,
                "0e0b6031-5213-4934-818b-38d90ced39db",
                [0x31, 0x60, 0x0b, 0x0e, 0x13, 0x52, 0x34, 0x49],
            ),
            (
                HV_TS_GUID,
                "9527e630-d0ae-497b-adce-e80ab0175caf",
                [0x30, 0xe6, 0x27, 0x95, 0xae, 0xd0, 0x7b, 0x49],
            ),
            (
                HV_KVP_GUID,
                "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
                [0xe7, 0xf4, 0xa0, 0xa9, 0x45, 0x5a, 0x96, 0x4d],
            ),
        ];
        for (guid, text, head) in cases {
            assert_eq!(std::format!("{guid}"), text);
            assert_eq!(&guid.as_bytes()[..8], &head);
        }
    }

    /// A message as OpenVMM's host writes it: pipe header, header, body.
    fn message(msg_type: IcMsgType, flags: u8, body: &[u8]) -> Vec<u8> {
        let header = IcMsgHdr {
            icmsgtype: msg_type.0.into(),
            icflags: flags,
            ..IcMsgHdr::default()
        };
        let mut buf = vec![0u8; ICMSG_HDR + body.len()];
        let n = encode_message(&mut buf, &header, &[body]).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    fn negotiate_body(fw: &[IcVersion], msg: &[IcVersion]) -> Vec<u8> {
        let fixed = IcMsgNegotiate {
            icframe_vercnt: (fw.len() as u16).into(),
            icmsg_vercnt: (msg.len() as u16).into(),
            reserved: U32::ZERO,
        };
        let mut b = fixed.as_bytes().to_vec();
        b.extend_from_slice(fw.as_bytes());
        b.extend_from_slice(msg.as_bytes());
        b
    }

    #[test]
    fn negotiate_fixture() {
        // OpenVMM's shutdown host: framework 1.0, 3.0; shutdown 1.0, 3.0, 3.1, 3.2.
        let body = negotiate_body(&HOST_FRAMEWORK_VERSIONS, &HOST_SHUTDOWN_VERSIONS);
        let bytes = message(
            IcMsgType::NEGOTIATE,
            ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST,
            &body,
        );
        assert_eq!(&bytes[..8], &[1, 0, 0, 0, 20 + 8 + 24, 0, 0, 0]);
        assert_eq!(bytes[25], 3);
        assert_eq!(&bytes[18..20], &[32, 0]);
        let m = IcMessage::parse(&bytes).unwrap();
        assert_eq!(m.msg_type(), IcMsgType::NEGOTIATE);
        assert!(m.header.is_transaction());
        assert_eq!(m.declared_body(), &body[..]);
        let n = NegotiateMsg::parse_request(m.body).unwrap();
        assert_eq!(n.framework, &HOST_FRAMEWORK_VERSIONS);
        assert_eq!(n.message, &HOST_SHUTDOWN_VERSIONS);
        let chosen = negotiate(
            n.framework,
            n.message,
            &GUEST_FRAMEWORK_VERSIONS,
            &GUEST_SHUTDOWN_VERSIONS,
        );
        assert_eq!(
            chosen,
            Some(Negotiated {
                framework: IcVersion::new(3, 0),
                message: IcVersion::new(3, 2)
            })
        );
        let resp = negotiate_response_body(chosen);
        assert_eq!(resp, [1, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, 0]);
        assert_eq!(parse_negotiate_response(&resp), Ok(chosen));

        // The other services against OpenVMM's lists.
        let pick = |host: &[IcVersion], ours: &[IcVersion]| {
            negotiate(
                &HOST_FRAMEWORK_VERSIONS,
                host,
                &GUEST_FRAMEWORK_VERSIONS,
                ours,
            )
            .map(|n| n.message)
        };
        assert_eq!(
            pick(&HOST_TIMESYNC_VERSIONS, &GUEST_TIMESYNC_VERSIONS),
            Some(IcVersion::new(4, 0))
        );
        assert_eq!(
            pick(&HOST_KVP_VERSIONS, &GUEST_KVP_VERSIONS),
            Some(IcVersion::new(4, 0))
        );
        assert_eq!(
            pick(&HOST_HEARTBEAT_VERSIONS, &GUEST_HEARTBEAT_VERSIONS),
            Some(IcVersion::new(3, 0))
        );
        // A 2008-era host.
        assert_eq!(
            negotiate(
                &[FRAMEWORK_VERSION_1],
                &[IcVersion::new(1, 0)],
                &GUEST_FRAMEWORK_VERSIONS,
                &GUEST_KVP_VERSIONS
            ),
            Some(Negotiated {
                framework: FRAMEWORK_VERSION_1,
                message: IcVersion::new(1, 0)
            })
        );
    }

    #[test]
    fn negotiate_without_common_versions() {
        let ours = (&GUEST_FRAMEWORK_VERSIONS[..], &GUEST_HEARTBEAT_VERSIONS[..]);
        // No common service version, and no common framework version.
        assert_eq!(
            negotiate(
                &HOST_FRAMEWORK_VERSIONS,
                &[IcVersion::new(9, 9)],
                ours.0,
                ours.1
            ),
            None
        );
        assert_eq!(
            negotiate(
                &[IcVersion::new(2, 0)],
                &HOST_HEARTBEAT_VERSIONS,
                ours.0,
                ours.1
            ),
            None
        );
        let resp = negotiate_response_body(None);
        assert_eq!(resp, [0; 16]);
        assert_eq!(parse_negotiate_response(&resp), Ok(None));
        // 1/0 is neither answer.
        let mut odd = resp;
        odd[0] = 1;
        assert!(matches!(
            parse_negotiate_response(&odd),
            Err(IcError::BadVersionCount { .. })
        ));
    }

    #[test]
    fn negotiate_counts_are_checked() {
        let mut body = negotiate_body(&HOST_FRAMEWORK_VERSIONS, &HOST_KVP_VERSIONS);
        // One version more than present.
        body[2] = 4;
        assert_eq!(
            NegotiateMsg::parse(&body),
            Err(IcError::BadVersionCount {
                framework: 2,
                message: 4
            })
        );
        // Above the maximum.
        body[2] = 101;
        assert!(NegotiateMsg::parse(&body).is_err());
        body[0..2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(NegotiateMsg::parse(&body).is_err());
        // Zero of a kind: a valid answer shape, not a valid request.
        let empty = negotiate_body(&HOST_FRAMEWORK_VERSIONS, &[]);
        assert!(NegotiateMsg::parse(&empty).is_ok());
        assert!(NegotiateMsg::parse_request(&empty).is_err());
        assert!(matches!(
            NegotiateMsg::parse(&body[..7]),
            Err(IcError::BodyTooShort { .. })
        ));
    }

    #[test]
    fn frame_checks() {
        let good = message(IcMsgType::HEARTBEAT, 3, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(IcMessage::parse(&good).is_ok());
        assert_eq!(
            IcMessage::parse(&good[..27]),
            Err(IcError::Truncated { len: 27 })
        );
        // icmsgsize beyond the packet.
        let mut bad = good.clone();
        bad[18] = 9;
        assert_eq!(
            IcMessage::parse(&bad),
            Err(IcError::MsgSizeBeyondPacket {
                icmsgsize: 9,
                available: 8
            })
        );
        // Pipe size beyond the packet.
        let mut bad = good.clone();
        bad[4] = 29;
        assert!(matches!(
            IcMessage::parse(&bad),
            Err(IcError::PipeSizeBeyondPacket { msgsize: 29, .. })
        ));
        // Padding after the message is part of the body; icmsgsize may be smaller.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 4]);
        let m = IcMessage::parse(&padded).unwrap();
        assert_eq!(m.body.len(), 12);
        assert_eq!(m.declared_body().len(), 8);
        assert_eq!(heartbeat_seq(m.body), Ok(1));
        assert!(heartbeat_seq(&[0; 7]).is_err());
        // Encoding refuses small buffers and bodies over 64 KiB.
        let mut small = [0u8; 30];
        assert_eq!(
            encode_message(&mut small, &IcMsgHdr::default(), &[&[0; 8]]),
            Err(IcError::BufferTooSmall)
        );
        let big = vec![0u8; 70_000];
        let mut out = vec![0u8; 70_100];
        assert_eq!(
            encode_message(&mut out, &IcMsgHdr::default(), &[&big]),
            Err(IcError::TooLong)
        );
    }

    #[test]
    fn shutdown_and_timesync_bodies() {
        let mut body = vec![0u8; 2060];
        body[0..4].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        body[8] = (SHUTDOWN_FLAG_RESTART | SHUTDOWN_FLAG_FORCE) as u8;
        assert_eq!(
            ShutdownRequest::parse(&body),
            Ok(ShutdownRequest {
                reason_code: 0x8000_0000,
                timeout_seconds: 0,
                flags: 3
            })
        );
        assert!(ShutdownRequest::parse(&body[..11]).is_err());
        assert!(ShutdownRequest::parse(&body[..12]).is_ok());

        // v4 (OpenVMM sends 24 bytes).
        let mut v4 = vec![0u8; 24];
        let t = WLTIMEDELTA + 17_000_000_000_000_000;
        v4[0..8].copy_from_slice(&t.to_le_bytes());
        v4[8..16].copy_from_slice(&555u64.to_le_bytes());
        v4[16] = ICTIMESYNCFLAG_SYNC;
        let m = TimesyncMsg::parse(&v4, IcVersion::new(4, 0)).unwrap();
        assert_eq!(m.parent_time(), t);
        assert_eq!(m.flags(), ICTIMESYNCFLAG_SYNC);
        assert_eq!(m.reference_time(), Some(555));
        assert!(TimesyncMsg::parse(&v4[..21], IcVersion::new(4, 0)).is_err());
        // v3 needs 25 bytes; its flags sit at 24.
        assert!(TimesyncMsg::parse(&v4, IcVersion::new(3, 0)).is_err());
        let mut v3 = vec![0u8; 25];
        v3[0..8].copy_from_slice(&t.to_le_bytes());
        v3[24] = ICTIMESYNCFLAG_SAMPLE;
        let m = TimesyncMsg::parse(&v3, IcVersion::new(3, 0)).unwrap();
        assert_eq!(
            (m.parent_time(), m.flags(), m.reference_time()),
            (t, 2, None)
        );
    }

    fn utf16(s: &str) -> Vec<u8> {
        let mut v: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        v.extend_from_slice(&[0, 0]);
        v
    }

    fn record(value_type: u32, key: &str, value: &[u8], value_size: u32) -> Vec<u8> {
        let mut r = vec![0u8; KVP_RECORD_SIZE];
        let k = utf16(key);
        r[0..4].copy_from_slice(&value_type.to_le_bytes());
        r[4..8].copy_from_slice(&(k.len() as u32).to_le_bytes());
        r[8..12].copy_from_slice(&value_size.to_le_bytes());
        r[12..12 + k.len()].copy_from_slice(&k);
        r[524..524 + value.len()].copy_from_slice(value);
        r
    }

    fn kvp_body(op: KvpOperation, pool: KvpPool, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![op.0, pool.0, 0, 0];
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn kvp_requests() {
        // ENUMERATE as OpenVMM sends it: index then a zero record.
        let mut e = 7u32.to_le_bytes().to_vec();
        e.resize(4 + KVP_RECORD_SIZE, 0);
        let body = kvp_body(KvpOperation::ENUMERATE, KvpPool::AUTO, &e);
        assert_eq!(body.len(), KVP_ENUMERATE_SIZE);
        assert_eq!(
            KvpRequest::parse(&body),
            Ok(KvpRequest::Enumerate {
                pool: KvpPool::AUTO,
                index: 7
            })
        );
        assert!(KvpRequest::parse(&body[..7]).is_err());

        // SET with a string value.
        let v = utf16("blue");
        let set = kvp_body(
            KvpOperation::SET,
            KvpPool::EXTERNAL,
            &record(1, "Colour", &v, v.len() as u32),
        );
        let KvpRequest::Set { pool, key, value } = KvpRequest::parse(&set).unwrap() else {
            panic!()
        };
        assert_eq!(pool, KvpPool::EXTERNAL);
        assert!(key.eq_str("Colour"));
        assert_eq!(std::format!("{key}"), "Colour");
        let KvpValue::String(s) = value else { panic!() };
        assert!(s.eq_str("blue"));
        // SET with numbers.
        let set = kvp_body(
            KvpOperation::SET,
            KvpPool::GUEST,
            &record(4, "N", &42u32.to_le_bytes(), 4),
        );
        assert!(matches!(
            KvpRequest::parse(&set),
            Ok(KvpRequest::Set {
                value: KvpValue::U32(42),
                ..
            })
        ));
        let set = kvp_body(
            KvpOperation::SET,
            KvpPool::GUEST,
            &record(11, "Q", &(1u64 << 40).to_le_bytes(), 8),
        );
        assert!(matches!(
            KvpRequest::parse(&set),
            Ok(KvpRequest::Set {
                value: KvpValue::U64(0x100_0000_0000),
                ..
            })
        ));
        let set = kvp_body(KvpOperation::SET, KvpPool::GUEST, &record(3, "Q", &[], 0));
        assert_eq!(KvpRequest::parse(&set), Err(IcError::BadValueType(3)));

        // GET needs only the key bytes.
        let get = kvp_body(
            KvpOperation::GET,
            KvpPool::EXTERNAL,
            &record(0, "Key", &[], 0),
        );
        let short = &get[..4 + 12 + 8];
        assert!(matches!(
            KvpRequest::parse(short),
            Ok(KvpRequest::Get { .. })
        ));
        assert!(matches!(
            KvpRequest::parse(&get[..4 + 12 + 7]),
            Err(IcError::BadStringSize { size: 8, .. })
        ));

        // DELETE.
        let mut d = 8u32.to_le_bytes().to_vec();
        d.extend_from_slice(&utf16("Key"));
        let del = kvp_body(KvpOperation::DELETE, KvpPool::GUEST, &d);
        let KvpRequest::Delete { key, .. } = KvpRequest::parse(&del).unwrap() else {
            panic!()
        };
        assert!(key.eq_str("Key"));

        // GET_IP_INFO: 2-byte header, adapter id, family.
        let mut ip = vec![KvpOperation::GET_IP_INFO.0, KvpPool::GUEST.0];
        ip.resize(KVP_IP_INFO_SIZE, 0);
        let mac = utf16("00:15:5D:00:00:01");
        ip[2..2 + mac.len()].copy_from_slice(&mac);
        ip[2 + 256] = ADDR_FAMILY_IPV4;
        let KvpRequest::GetIpInfo {
            adapter_id,
            addr_family,
            ..
        } = KvpRequest::parse(&ip).unwrap()
        else {
            panic!()
        };
        assert!(adapter_id.eq_str("00:15:5D:00:00:01"));
        assert_eq!(addr_family, 1);
        assert!(KvpRequest::parse(&ip[..258]).is_err());

        assert_eq!(
            KvpRequest::parse(&[9, 0, 0, 0]),
            Err(IcError::UnknownOperation(9))
        );
        assert!(KvpRequest::parse(&[3]).is_err());
    }

    #[test]
    fn kvp_string_sizes() {
        let field = [b'a', 0, 0, 0, b'b', 0];
        assert!(KvpString::sized(&field, 4, 4, 512).is_ok());
        // Odd, too small, beyond the field, beyond the maximum.
        for size in [3, 2, 8, 514] {
            assert!(
                KvpString::sized(&field, size, 4, 512).is_err(),
                "size {size}"
            );
        }
        // Stops at the first NUL.
        let s = KvpString::sized(&field, 6, 4, 512).unwrap();
        assert_eq!(s.len_units(), 1);
        assert!(s.eq_str("a"));
        // Fixed fields without a NUL end at the field's end; odd tails are ignored.
        let s = KvpString::fixed(&[b'x', 0, b'y', 0, b'z']);
        assert_eq!(std::format!("{s:?}"), "\"xy\"");
        // Lone surrogates are replaced when shown.
        let s = KvpString::fixed(&[0x00, 0xd8, b'k', 0]);
        assert_eq!(std::format!("{s}"), "\u{fffd}k");
    }

    #[test]
    fn kvp_encoding() {
        let mut field = [0xffu8; 12];
        assert_eq!(put_str(&mut field, "héllo"), Ok(12));
        assert_eq!(
            KvpString::fixed(&field).chars().collect::<String>(),
            "héllo"
        );
        assert_eq!(
            put_str(&mut field, "toolong"),
            Err(IcError::StringTooLong { max: 12 })
        );
        assert_eq!(put_str(&mut field, ""), Ok(2));
        assert_eq!(field, [0; 12]);
        // Non-BMP characters take two units.
        let mut field = [0u8; 6];
        assert_eq!(put_str(&mut field, "\u{1f600}"), Ok(6));
        assert_eq!(
            KvpString::fixed(&field).chars().collect::<String>(),
            "\u{1f600}"
        );

        // An ENUMERATE answer filled in place and read back as the host reads it.
        let mut body = vec![0u8; KVP_ENUMERATE_SIZE];
        body[0] = KvpOperation::ENUMERATE.0;
        body[1] = KvpPool::AUTO.0;
        {
            let mut rec = KvpRecordMut::new(&mut body[8..]).unwrap();
            rec.set_key("OSName".encode_utf16()).unwrap();
            rec.set_value_string("hvnet".encode_utf16()).unwrap();
        }
        let rec = kvp_enumerate_record(&body).unwrap();
        assert_eq!(rec.value_type(), KvpValueType::REG_SZ);
        assert_eq!(rec.key_size(), 14);
        assert!(rec.key().unwrap().eq_str("OSName"));
        let KvpValue::String(v) = rec.value().unwrap() else {
            panic!()
        };
        assert!(v.eq_str("hvnet"));
        let long: String = core::iter::repeat_n('x', 1024).collect();
        assert!(KvpRecordMut::new(&mut body[8..])
            .unwrap()
            .set_value_string(long.encode_utf16())
            .is_err());
        assert!(KvpRecordMut::new(&mut body[..100]).is_err());

        // IP info.
        let mut ip = vec![0u8; KVP_IP_INFO_SIZE];
        {
            let mut info = KvpIpInfoMut::new(&mut ip).unwrap();
            info.set_field(IpInfoField::IpAddr, "10.0.0.4;10.0.1.4")
                .unwrap();
            info.set_field(IpInfoField::SubNet, "255.255.255.0;255.255.255.0")
                .unwrap();
            info.set_addr_family(ADDR_FAMILY_IPV4);
            info.set_dhcp_enabled(true);
        }
        let info = KvpIpInfo::parse(&ip).unwrap();
        assert!(info.field(IpInfoField::IpAddr).eq_str("10.0.0.4;10.0.1.4"));
        assert!(info.field(IpInfoField::GateWay).is_empty());
        assert_eq!(info.addr_family(), 1);
        assert!(info.dhcp_enabled());
        assert_eq!(ip[2 + 258], b'1');
        assert!(KvpIpInfo::parse(&ip[..7427]).is_err());
        assert!(KvpIpInfoMut::new(&mut ip[..100]).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(m) = IcMessage::parse(&bytes) {
                let _ = NegotiateMsg::parse(m.body);
                let _ = parse_negotiate_response(m.body);
                let _ = heartbeat_seq(m.body);
                let _ = ShutdownRequest::parse(m.body);
                let _ = TimesyncMsg::parse(m.body, m.header.icvermsg);
                if let Ok(r) = KvpRequest::parse(m.body) {
                    let _ = (r.operation(), r.pool());
                }
                let _ = kvp_enumerate_record(m.body).map(|r| (r.key(), r.value()));
                let _ = kvp_get_record(m.body).map(|r| (r.key(), r.value()));
            }
            let _ = KvpRequest::parse(&bytes);
            let _ = NegotiateMsg::parse_request(&bytes);
        }

        #[test]
        fn kvp_typed_garbage(
            op in 0u8..8,
            pool in 0u8..6,
            sizes in (any::<u32>(), any::<u32>(), 0u32..16),
            len in 0usize..3000,
        ) {
            let mut body = vec![op, pool, 0, 0];
            body.extend_from_slice(&sizes.2.to_le_bytes());
            body.extend_from_slice(&sizes.0.to_le_bytes());
            body.extend_from_slice(&sizes.1.to_le_bytes());
            body.resize(len.max(body.len()), 0x41);
            if let Ok(KvpRequest::Set { key, value, .. }) = KvpRequest::parse(&body) {
                prop_assert!(key.len_units() <= 256);
                if let KvpValue::String(s) = value {
                    prop_assert!(s.len_units() <= 1024);
                }
            }
        }

        #[test]
        fn negotiation_is_symmetric_in_order(
            host in proptest::collection::vec((0u16..5, 0u16..3), 0..6),
            ours in proptest::collection::vec((0u16..5, 0u16..3), 0..6),
        ) {
            let host: Vec<IcVersion> = host.into_iter().map(|(a, b)| IcVersion::new(a, b)).collect();
            let ours: Vec<IcVersion> = ours.into_iter().map(|(a, b)| IcVersion::new(a, b)).collect();
            let mut rev = host.clone();
            rev.reverse();
            let a = negotiate(&host, &host, &ours, &ours);
            prop_assert_eq!(a, negotiate(&rev, &rev, &ours, &ours));
            if let Some(n) = a {
                prop_assert!(host.contains(&n.framework) && ours.contains(&n.framework));
                prop_assert!(ours.iter().filter(|v| host.contains(v)).all(|v| *v <= n.message));
            }
        }
    }
}
