//! VMBus ring buffers: the control page and the packets written into the ring data.
//!
//! Each channel has two rings (guest-to-host and host-to-guest), each a 4096-byte
//! control page followed by the data area. A packet in the data area is a 16-byte
//! [`VmPacketDescriptor`], type-specific headers, the payload padded to 8 bytes, then an
//! 8-byte [`PacketTrailer`] that `len8` does not count. Packets wrap around the end of the
//! data area byte-wise; this module works on one packet already copied out of the ring
//! into contiguous memory (the ring logic does the copy and the index arithmetic).
//!
//! [`Packet::parse`] checks a packet from the peer; [`encode_inband`],
//! [`encode_completion`], [`encode_xfer_pages`] and [`encode_gpa_direct`] build one
//! (without the trailer, which depends on where the packet lands in the ring).
//!
//! Sources: Linux `include/linux/hyperv.h` and `drivers/hv/ring_buffer.c`, OpenVMM
//! `vm/devices/vmbus/vmbus_ring/src/lib.rs`, as summarised in
//! `shared/reference/hyperv-facts.md` section 5.9 and `shared/reference/wire-layouts.md`
//! section 2.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub use crate::align8;
use crate::vmbus::{gpa_range_head, gpa_range_pages, GpaRange, GpaRanges};
use crate::{sub_slice, WireError, Writer, U16, U32, U64};

/// Bytes of zero padding that bring `n` up to a multiple of 8.
pub const fn pad8(n: usize) -> usize {
    (8 - n % 8) % 8
}

/// Size of a ring's control page; the data area starts right after it.
pub const RING_CONTROL_SIZE: usize = 4096;
/// `feature_bits` bit 0: the pending-send-size protocol is supported (Linux sets it on
/// both rings before opening).
pub const RING_FEATURE_PENDING_SEND_SZ: u32 = 1;
/// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`: the only descriptor flag.
pub const VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;
/// Size of [`VmPacketDescriptor`].
pub const PACKET_DESCRIPTOR_SIZE: usize = size_of::<VmPacketDescriptor>();
/// Size of [`PacketTrailer`].
pub const PACKET_TRAILER_SIZE: usize = size_of::<PacketTrailer>();

/// A ring's control page (`struct hv_ring_buffer` up to its data): 4096 bytes.
///
/// The ring logic reads and writes these words in shared memory one at a time; the
/// `RING_*_OFFSET` constants give their positions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RingControl {
    /// Byte offset in the data area where the producer writes next.
    pub write_index: U32,
    /// Byte offset in the data area where the consumer reads next.
    pub read_index: U32,
    /// Set by the consumer while it drains; the producer does not signal while set.
    pub interrupt_mask: U32,
    /// Bytes a blocked producer needs; the consumer signals when free space crosses it.
    pub pending_send_sz: U32,
    /// Reserved (twelve u32 words).
    pub reserved1: [u8; 48],
    /// Bit 0: [`RING_FEATURE_PENDING_SEND_SZ`].
    pub feature_bits: U32,
    /// Pad to 4096 bytes.
    pub reserved2: [u8; 4028],
}

/// Offset of `write_index` in the control page.
pub const RING_WRITE_INDEX_OFFSET: usize = offset_of!(RingControl, write_index);
/// Offset of `read_index` in the control page.
pub const RING_READ_INDEX_OFFSET: usize = offset_of!(RingControl, read_index);
/// Offset of `interrupt_mask` in the control page.
pub const RING_INTERRUPT_MASK_OFFSET: usize = offset_of!(RingControl, interrupt_mask);
/// Offset of `pending_send_sz` in the control page.
pub const RING_PENDING_SEND_SZ_OFFSET: usize = offset_of!(RingControl, pending_send_sz);
/// Offset of `feature_bits` in the control page.
pub const RING_FEATURE_BITS_OFFSET: usize = offset_of!(RingControl, feature_bits);

/// Checks a ring index the peer wrote: it must lie inside a data area of `data_size`
/// bytes and be 8-byte aligned (OpenVMM validates every peer index this way).
pub fn check_ring_index(index: u32, data_size: u32) -> Result<u32, WireError> {
    if index >= data_size || !index.is_multiple_of(8) {
        return Err(WireError::BadOffset);
    }
    Ok(index)
}

wire_enum! {
    /// Ring packet types (`enum vmbus_packet_type`, hyperv.h).
    pub struct VmPacketType(u16) {
        /// `VM_PKT_INVALID`.
        INVALID = 0,
        /// `VM_PKT_SYNCH`.
        SYNCH = 1,
        /// `VM_PKT_ADD_XFER_PAGESET`.
        ADD_XFER_PAGESET = 2,
        /// `VM_PKT_RM_XFER_PAGESET`.
        RM_XFER_PAGESET = 3,
        /// `VM_PKT_ESTABLISH_GPADL`.
        ESTABLISH_GPADL = 4,
        /// `VM_PKT_TEARDOWN_GPADL`.
        TEARDOWN_GPADL = 5,
        /// `VM_PKT_DATA_INBAND`: payload only.
        DATA_INBAND = 6,
        /// `VM_PKT_DATA_USING_XFER_PAGES`: transfer-page ranges (netvsc receive path).
        DATA_USING_XFER_PAGES = 7,
        /// `VM_PKT_DATA_USING_GPADL`.
        DATA_USING_GPADL = 8,
        /// `VM_PKT_DATA_USING_GPA_DIRECT`: GPA ranges (netvsc page-buffer sends).
        DATA_USING_GPA_DIRECT = 9,
        /// `VM_PKT_CANCEL_REQUEST`.
        CANCEL_REQUEST = 10,
        /// `VM_PKT_COMP`: completion, echoing the request's transaction id.
        COMP = 11,
        /// `VM_PKT_DATA_USING_ADDITIONAL_PKT`.
        DATA_USING_ADDITIONAL_PKT = 12,
        /// `VM_PKT_ADDITIONAL_DATA`.
        ADDITIONAL_DATA = 13,
    }
}

/// Packet descriptor at the start of every packet (`struct vmpacket_descriptor`): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VmPacketDescriptor {
    /// [`VmPacketType`] (C name `type`).
    pub packet_type: U16,
    /// Payload offset from the descriptor start, in 8-byte units (at least 2).
    pub offset8: U16,
    /// Packet length (descriptor, headers, padded payload; trailer excluded) in 8-byte units.
    pub len8: U16,
    /// Bit 0: completion requested; other bits reserved.
    pub flags: U16,
    /// Transaction id, echoed in the completion.
    pub trans_id: U64,
}

impl VmPacketDescriptor {
    /// Checks the descriptor's own invariants: `offset8 >= 2`, `len8 >= offset8`, and
    /// no flag but completion-requested. The ring reader calls this before copying
    /// `len8 * 8` bytes.
    pub fn check(&self) -> Result<(), WireError> {
        if self.offset8.get() < 2 {
            return Err(WireError::BadOffset);
        }
        if self.len8.get() < self.offset8.get() {
            return Err(WireError::BadLength);
        }
        if self.flags.get() & !VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED != 0 {
            return Err(WireError::BadFlags);
        }
        Ok(())
    }
    /// The packet type.
    pub fn packet_type(&self) -> VmPacketType {
        VmPacketType(self.packet_type.get())
    }
    /// Packet length in bytes, trailer excluded.
    pub fn packet_len(&self) -> usize {
        usize::from(self.len8.get()) * 8
    }
    /// Bytes the packet occupies in the ring, trailer included.
    pub fn ring_len(&self) -> usize {
        self.packet_len() + PACKET_TRAILER_SIZE
    }
    /// Payload offset in bytes.
    pub fn payload_offset(&self) -> usize {
        usize::from(self.offset8.get()) * 8
    }
    /// Whether the sender asked for a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags.get() & VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED != 0
    }
}

/// Transfer-page header after the descriptor (`struct vmtransfer_page_packet_header`
/// minus its descriptor): 8 bytes, followed by `range_cnt` [`VmTransferPageRange`]s.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VmTransferPageHeader {
    /// Transfer page set id; netvsc: the receive buffer id 0xCAFE.
    pub xfer_pageset_id: U16,
    /// Unused by Linux.
    pub sender_owns_set: u8,
    /// May hold garbage (OpenVMM note).
    pub reserved: u8,
    /// Number of ranges.
    pub range_cnt: U32,
}

/// One transfer-page range (`struct vmtransfer_page_range`): 8 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VmTransferPageRange {
    /// Length of the data (netvsc: one RNDIS message).
    pub byte_count: U32,
    /// Offset of the data from the start of the transfer page set.
    pub byte_offset: U32,
}

/// GPA-direct header after the descriptor (`struct vmdata_gpa_direct` minus its
/// descriptor and first range): 8 bytes, followed by the GPA ranges.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VmGpaDirectHeader {
    /// Zero (may hold garbage, per OpenVMM).
    pub reserved: U32,
    /// Number of GPA ranges (OpenVMM rejects 0).
    pub range_cnt: U32,
}

/// One-page range as Linux page-buffer sends use it (`struct hv_page_buffer`): 16 bytes,
/// wire-identical to a GPA range holding exactly one PFN.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvPageBuffer {
    /// Bytes used in the page.
    pub len: U32,
    /// Offset inside the page.
    pub offset: U32,
    /// Page frame number.
    pub pfn: U64,
}

/// The 8 bytes after every packet: Linux writes the packet's start offset in the high
/// half of a u64 (OpenVMM `Footer { reserved, offset }`); readers ignore it.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PacketTrailer {
    /// Zero.
    pub reserved: U32,
    /// Ring data offset where the packet's descriptor begins.
    pub offset: U32,
}

impl PacketTrailer {
    /// The trailer for a packet written at data offset `start`.
    pub const fn new(start: u32) -> Self {
        PacketTrailer {
            reserved: U32::ZERO,
            offset: U32::new(start),
        }
    }
}

/// What follows the descriptor, by packet type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind<'a> {
    /// `VM_PKT_DATA_INBAND`.
    InBand,
    /// `VM_PKT_COMP`.
    Completion,
    /// `VM_PKT_DATA_USING_XFER_PAGES`.
    TransferPages {
        /// The header after the descriptor.
        header: VmTransferPageHeader,
        /// The ranges (`header.range_cnt` of them).
        ranges: &'a [VmTransferPageRange],
    },
    /// `VM_PKT_DATA_USING_GPA_DIRECT`.
    GpaDirect {
        /// The header after the descriptor.
        header: VmGpaDirectHeader,
        /// The checked GPA ranges.
        ranges: GpaRanges<'a>,
    },
}

/// A checked ring packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The descriptor.
    pub descriptor: VmPacketDescriptor,
    /// Type-specific headers.
    pub kind: PacketKind<'a>,
    /// Bytes from `offset8 * 8` to `len8 * 8` (the payload, with its padding).
    pub payload: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Checks one packet at the start of `bytes` (which may continue past it, e.g. with
    /// the trailer).
    ///
    /// Accepts the four types OpenVMM accepts (in-band, transfer pages, GPA direct,
    /// completion); other defined types give [`WireError::Unsupported`]. For transfer
    /// pages the ranges must end at or before the payload (Linux's check); for GPA
    /// direct there must be at least one range and all ranges must end at or before the
    /// payload.
    #[inline]
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        let (descriptor, _) =
            VmPacketDescriptor::read_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        Self::parse_described(descriptor, bytes)
    }

    /// [`Packet::parse`] for a caller that has read the descriptor at the start of
    /// `bytes` already (a ring reader frames packets by it): `descriptor` must be that
    /// copy; it is checked here as `parse` checks it, just not read again.
    #[inline]
    pub fn parse_described(
        descriptor: VmPacketDescriptor,
        bytes: &'a [u8],
    ) -> Result<Self, WireError> {
        debug_assert!(bytes.get(..PACKET_DESCRIPTOR_SIZE) == Some(descriptor.as_bytes()));
        descriptor.check()?;
        let packet = sub_slice(bytes, 0, descriptor.packet_len(), WireError::Truncated)?;
        let payload_offset = descriptor.payload_offset();
        let (headers, payload) = packet
            .split_at_checked(payload_offset)
            .ok_or(WireError::BadLength)?;
        // The region between the descriptor and the payload.
        let headers = headers.get(PACKET_DESCRIPTOR_SIZE..).unwrap_or(&[]);
        let kind = match descriptor.packet_type() {
            VmPacketType::DATA_INBAND => PacketKind::InBand,
            VmPacketType::COMP => PacketKind::Completion,
            VmPacketType::DATA_USING_XFER_PAGES => {
                let (header, rest) = VmTransferPageHeader::read_from_prefix(headers)
                    .map_err(|_| WireError::BadOffset)?;
                let count =
                    usize::try_from(header.range_cnt.get()).map_err(|_| WireError::BadCount)?;
                let (ranges, _) = <[VmTransferPageRange]>::ref_from_prefix_with_elems(rest, count)
                    .map_err(|_| WireError::BadCount)?;
                PacketKind::TransferPages { header, ranges }
            }
            VmPacketType::DATA_USING_GPA_DIRECT => {
                let (header, rest) = VmGpaDirectHeader::read_from_prefix(headers)
                    .map_err(|_| WireError::BadOffset)?;
                let count =
                    usize::try_from(header.range_cnt.get()).map_err(|_| WireError::BadCount)?;
                if count == 0 {
                    return Err(WireError::BadCount);
                }
                // `rest` is a multiple of 8 bytes: offset8 counts 8-byte units.
                let words = <[U64]>::ref_from_bytes(rest).map_err(|_| WireError::BadLength)?;
                let (ranges, _) = GpaRanges::parse(words, count)?;
                PacketKind::GpaDirect { header, ranges }
            }
            t if t.0 <= VmPacketType::ADDITIONAL_DATA.0 => {
                return Err(WireError::Unsupported(u32::from(t.0)))
            }
            t => return Err(WireError::UnknownType(u32::from(t.0))),
        };
        Ok(Packet {
            descriptor,
            kind,
            payload,
        })
    }

    /// The transaction id.
    pub fn trans_id(&self) -> u64 {
        self.descriptor.trans_id.get()
    }

    /// A completion packet without headers (`offset8` 2, no flags), as hosts send them,
    /// seen without the general parse: its transaction id and payload. `None` for any
    /// other packet, which [`Packet::parse`] then handles (and for which it would give
    /// the same answer). A fast path for the packet a sending queue reads most;
    /// `descriptor` is the one at the start of `bytes`, as for
    /// [`Packet::parse_described`].
    #[inline]
    pub fn completion_payload(
        descriptor: &VmPacketDescriptor,
        bytes: &'a [u8],
    ) -> Option<(u64, &'a [u8])> {
        debug_assert!(bytes.get(..PACKET_DESCRIPTOR_SIZE) == Some(descriptor.as_bytes()));
        let len = descriptor.packet_len();
        if descriptor.packet_type() != VmPacketType::COMP
            || descriptor.offset8.get() != 2
            || descriptor.flags.get() != 0
            || len < PACKET_DESCRIPTOR_SIZE
        {
            return None;
        }
        let payload = bytes.get(PACKET_DESCRIPTOR_SIZE..len)?;
        Some((descriptor.trans_id.get(), payload))
    }
}

fn encode_packet(
    buf: &mut [u8],
    packet_type: VmPacketType,
    flags: u16,
    trans_id: u64,
    headers_len: usize,
    write_headers: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>,
    payload: &[u8],
) -> Result<usize, WireError> {
    let offset = PACKET_DESCRIPTOR_SIZE
        .checked_add(headers_len)
        .ok_or(WireError::TooLong)?;
    let len = offset
        .checked_add(payload.len())
        .and_then(align8)
        .ok_or(WireError::TooLong)?;
    let offset8 = u16::try_from(offset / 8).map_err(|_| WireError::TooLong)?;
    let len8 = u16::try_from(len / 8).map_err(|_| WireError::TooLong)?;
    if buf.len() < len {
        return Err(WireError::BufferTooSmall);
    }
    let mut w = Writer::new(buf);
    let descriptor = VmPacketDescriptor {
        packet_type: packet_type.0.into(),
        offset8: offset8.into(),
        len8: len8.into(),
        flags: flags.into(),
        trans_id: trans_id.into(),
    };
    w.put(descriptor.as_bytes())?;
    write_headers(&mut w)?;
    w.put(payload)?;
    w.zeros(len.checked_sub(w.len()).ok_or(WireError::BadLength)?)?;
    Ok(len)
}

fn flags_for(completion_requested: bool) -> u16 {
    if completion_requested {
        VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED
    } else {
        0
    }
}

/// Bytes an in-band packet with `payload_len` payload bytes takes, trailer excluded.
pub fn inband_packet_len(payload_len: usize) -> Option<usize> {
    PACKET_DESCRIPTOR_SIZE
        .checked_add(payload_len)
        .and_then(align8)
}

/// Writes a `VM_PKT_DATA_INBAND` packet (descriptor, payload, zero padding); returns its
/// length (a multiple of 8, trailer excluded).
pub fn encode_inband(
    buf: &mut [u8],
    trans_id: u64,
    completion_requested: bool,
    payload: &[u8],
) -> Result<usize, WireError> {
    encode_packet(
        buf,
        VmPacketType::DATA_INBAND,
        flags_for(completion_requested),
        trans_id,
        0,
        |_| Ok(()),
        payload,
    )
}

/// Writes a `VM_PKT_COMP` packet answering transaction `trans_id`.
pub fn encode_completion(
    buf: &mut [u8],
    trans_id: u64,
    payload: &[u8],
) -> Result<usize, WireError> {
    encode_packet(buf, VmPacketType::COMP, 0, trans_id, 0, |_| Ok(()), payload)
}

/// Writes a `VM_PKT_DATA_USING_XFER_PAGES` packet (host to guest).
pub fn encode_xfer_pages(
    buf: &mut [u8],
    trans_id: u64,
    completion_requested: bool,
    xfer_pageset_id: u16,
    ranges: &[VmTransferPageRange],
    payload: &[u8],
) -> Result<usize, WireError> {
    let header = VmTransferPageHeader {
        xfer_pageset_id: xfer_pageset_id.into(),
        sender_owns_set: 0,
        reserved: 0,
        range_cnt: u32::try_from(ranges.len())
            .map_err(|_| WireError::TooLong)?
            .into(),
    };
    let headers_len = ranges
        .len()
        .checked_mul(size_of::<VmTransferPageRange>())
        .and_then(|n| n.checked_add(size_of::<VmTransferPageHeader>()))
        .ok_or(WireError::TooLong)?;
    encode_packet(
        buf,
        VmPacketType::DATA_USING_XFER_PAGES,
        flags_for(completion_requested),
        trans_id,
        headers_len,
        |w| {
            w.put(header.as_bytes())?;
            w.put(ranges.as_bytes())
        },
        payload,
    )
}

/// Writes a `VM_PKT_DATA_USING_GPA_DIRECT` packet (guest to host). Each range must carry
/// exactly the PFNs its span covers ([`WireError::BadCount`]).
pub fn encode_gpa_direct(
    buf: &mut [u8],
    trans_id: u64,
    completion_requested: bool,
    ranges: &[GpaRange<'_>],
    payload: &[u8],
) -> Result<usize, WireError> {
    if ranges.is_empty() {
        return Err(WireError::BadCount);
    }
    let mut words = 0usize;
    for r in ranges {
        if gpa_range_pages(r.byte_offset, r.byte_count)? != r.pfns.len() {
            return Err(WireError::BadCount);
        }
        words = words
            .checked_add(1 + r.pfns.len())
            .ok_or(WireError::TooLong)?;
    }
    let header = VmGpaDirectHeader {
        reserved: U32::ZERO,
        range_cnt: u32::try_from(ranges.len())
            .map_err(|_| WireError::TooLong)?
            .into(),
    };
    let headers_len = words
        .checked_mul(8)
        .and_then(|n| n.checked_add(size_of::<VmGpaDirectHeader>()))
        .ok_or(WireError::TooLong)?;
    encode_packet(
        buf,
        VmPacketType::DATA_USING_GPA_DIRECT,
        flags_for(completion_requested),
        trans_id,
        headers_len,
        |w| {
            w.put(header.as_bytes())?;
            for r in ranges {
                w.put(U64::new(gpa_range_head(r.byte_offset, r.byte_count)).as_bytes())?;
                w.put(r.pfns.as_bytes())?;
            }
            Ok(())
        },
        payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    // Sizes and offsets: Linux include/linux/hyperv.h @20cd569d, see
    // shared/reference/wire-layouts.md section 2. Structs that follow the descriptor
    // exclude it, so Linux offsets are checked as 16 + offset.
    const D: usize = PACKET_DESCRIPTOR_SIZE;

    #[test]
    fn ring_control_layout() {
        assert_eq!(size_of::<RingControl>(), RING_CONTROL_SIZE);
        assert_eq!(RING_WRITE_INDEX_OFFSET, 0);
        assert_eq!(RING_READ_INDEX_OFFSET, 4);
        assert_eq!(RING_INTERRUPT_MASK_OFFSET, 8);
        assert_eq!(RING_PENDING_SEND_SZ_OFFSET, 12);
        assert_eq!(offset_of!(RingControl, reserved1), 16);
        assert_eq!(RING_FEATURE_BITS_OFFSET, 64);
        assert_eq!(offset_of!(RingControl, reserved2), 68);
    }

    #[test]
    fn descriptor_and_headers_layout() {
        assert_eq!(size_of::<VmPacketDescriptor>(), 16);
        assert_eq!(offset_of!(VmPacketDescriptor, packet_type), 0);
        assert_eq!(offset_of!(VmPacketDescriptor, offset8), 2);
        assert_eq!(offset_of!(VmPacketDescriptor, len8), 4);
        assert_eq!(offset_of!(VmPacketDescriptor, flags), 6);
        assert_eq!(offset_of!(VmPacketDescriptor, trans_id), 8);

        assert_eq!(D + size_of::<VmTransferPageHeader>(), 24);
        assert_eq!(D + offset_of!(VmTransferPageHeader, xfer_pageset_id), 16);
        assert_eq!(D + offset_of!(VmTransferPageHeader, sender_owns_set), 18);
        assert_eq!(D + offset_of!(VmTransferPageHeader, reserved), 19);
        assert_eq!(D + offset_of!(VmTransferPageHeader, range_cnt), 20);

        assert_eq!(size_of::<VmTransferPageRange>(), 8);
        assert_eq!(offset_of!(VmTransferPageRange, byte_count), 0);
        assert_eq!(offset_of!(VmTransferPageRange, byte_offset), 4);

        // vmdata_gpa_direct is 32 bytes including one empty gpa_range at 24.
        assert_eq!(D + size_of::<VmGpaDirectHeader>(), 24);
        assert_eq!(D + offset_of!(VmGpaDirectHeader, reserved), 16);
        assert_eq!(D + offset_of!(VmGpaDirectHeader, range_cnt), 20);

        assert_eq!(size_of::<HvPageBuffer>(), 16);
        assert_eq!(offset_of!(HvPageBuffer, len), 0);
        assert_eq!(offset_of!(HvPageBuffer, offset), 4);
        assert_eq!(offset_of!(HvPageBuffer, pfn), 8);

        assert_eq!(size_of::<PacketTrailer>(), 8);
        assert_eq!(offset_of!(PacketTrailer, reserved), 0);
        assert_eq!(offset_of!(PacketTrailer, offset), 4);
        // Linux writes (start << 32) as a u64: the same bytes.
        assert_eq!(
            PacketTrailer::new(0x1238).as_bytes(),
            &(0x1238u64 << 32).to_le_bytes()
        );
    }

    #[test]
    fn padding_helpers() {
        assert_eq!(
            (pad8(0), pad8(1), pad8(7), pad8(8), pad8(13)),
            (0, 7, 1, 0, 3)
        );
        assert_eq!(align8(13), Some(16));
    }

    #[test]
    fn ring_index_check() {
        assert_eq!(check_ring_index(0, 4096), Ok(0));
        assert_eq!(check_ring_index(4088, 4096), Ok(4088));
        assert_eq!(check_ring_index(4096, 4096), Err(WireError::BadOffset));
        assert_eq!(check_ring_index(12, 4096), Err(WireError::BadOffset));
    }

    #[test]
    fn inband_fixture() {
        // NVSP INIT (12 bytes) in-band with completion requested, trans id 0x55.
        let payload = [1, 0, 0, 0, 2, 0, 6, 0, 2, 0, 6, 0];
        let mut buf = [0xAAu8; 64];
        let len = encode_inband(&mut buf, 0x55, true, &payload).unwrap();
        assert_eq!(len, 32);
        assert_eq!(inband_packet_len(payload.len()), Some(32));
        let expect: [u8; 32] = [
            6, 0, 2, 0, 4, 0, 1, 0, 0x55, 0, 0, 0, 0, 0, 0, 0, // descriptor
            1, 0, 0, 0, 2, 0, 6, 0, 2, 0, 6, 0, 0, 0, 0, 0, // payload + padding
        ];
        assert_eq!(&buf[..32], &expect);
        let p = Packet::parse(&buf[..32]).unwrap();
        assert_eq!(p.kind, PacketKind::InBand);
        assert_eq!(p.trans_id(), 0x55);
        assert!(p.descriptor.completion_requested());
        assert_eq!(&p.payload[..12], &payload);
        assert_eq!(p.descriptor.ring_len(), 40);
    }

    #[test]
    fn completion_fixture() {
        let mut buf = [0u8; 24];
        let len = encode_completion(&mut buf, 7, &[108, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!(len, 24);
        assert_eq!(&buf[..8], &[11, 0, 2, 0, 3, 0, 0, 0]);
        let p = Packet::parse(&buf).unwrap();
        assert_eq!(p.kind, PacketKind::Completion);
        assert_eq!(p.payload, &[108, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            encode_completion(&mut buf[..23], 7, &[0; 8]),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn xfer_pages_fixture() {
        // Host receive indication: two RNDIS messages in the 0xCAFE buffer, NVSP 107 at
        // offset8 * 8 = 40 (>= 24 + 8 * 2).
        let ranges = [
            VmTransferPageRange {
                byte_count: 100.into(),
                byte_offset: 0.into(),
            },
            VmTransferPageRange {
                byte_count: 60.into(),
                byte_offset: 1806.into(),
            },
        ];
        let nvsp = [107, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        let mut buf = [0u8; 128];
        let len = encode_xfer_pages(&mut buf, 9, true, 0xCAFE, &ranges, &nvsp).unwrap();
        assert_eq!(len, 56);
        assert_eq!(&buf[..8], &[7, 0, 5, 0, 7, 0, 1, 0]);
        assert_eq!(&buf[16..24], &[0xFE, 0xCA, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&buf[28..32], &0u32.to_le_bytes());
        assert_eq!(&buf[36..40], &1806u32.to_le_bytes());
        let p = Packet::parse(&buf[..len]).unwrap();
        let PacketKind::TransferPages {
            header,
            ranges: got,
        } = p.kind
        else {
            panic!()
        };
        assert_eq!(header.xfer_pageset_id.get(), 0xCAFE);
        assert_eq!(got, &ranges);
        assert_eq!(p.payload, &nvsp);

        // Ranges reaching into the payload: offset8 too small for range_cnt.
        let mut bad = buf;
        bad[20] = 3;
        assert_eq!(Packet::parse(&bad[..len]), Err(WireError::BadCount));
        // offset8 = 2 leaves no room for the transfer-page header.
        let mut bad = buf;
        bad[2] = 2;
        assert_eq!(Packet::parse(&bad[..len]), Err(WireError::BadOffset));
    }

    #[test]
    fn gpa_direct_fixture() {
        // A two-page RNDIS control message, like Linux's page-buffer send.
        let pfns = [U64::new(0x5000), U64::new(0x5001)];
        let range = GpaRange {
            byte_count: 4200,
            byte_offset: 0xF00,
            pfns: &pfns,
        };
        let nvsp = [
            107u8, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        let mut buf = [0u8; 128];
        let len = encode_gpa_direct(&mut buf, 0x77, true, &[range], &nvsp).unwrap();
        // 16 + 8 + 8 + 16 = 48 bytes of headers, 16 of payload.
        assert_eq!(len, 64);
        assert_eq!(&buf[..8], &[9, 0, 6, 0, 8, 0, 1, 0]);
        assert_eq!(&buf[20..24], &1u32.to_le_bytes());
        assert_eq!(&buf[24..28], &4200u32.to_le_bytes());
        assert_eq!(&buf[28..32], &0xF00u32.to_le_bytes());
        assert_eq!(&buf[32..40], &0x5000u64.to_le_bytes());
        let p = Packet::parse(&buf[..len]).unwrap();
        let PacketKind::GpaDirect { ranges, .. } = p.kind else {
            panic!()
        };
        let v: Vec<_> = ranges.iter().collect();
        assert_eq!(v, [range]);
        assert_eq!(p.payload, &nvsp);

        let mut bad = buf;
        bad[20] = 0;
        assert_eq!(Packet::parse(&bad[..len]), Err(WireError::BadCount));
        let mut bad = buf;
        bad[20] = 2;
        assert_eq!(Packet::parse(&bad[..len]), Err(WireError::BadCount));

        let short = GpaRange {
            byte_count: 4200,
            byte_offset: 0xF00,
            pfns: &pfns[..1],
        };
        assert_eq!(
            encode_gpa_direct(&mut buf, 1, true, &[short], &[]),
            Err(WireError::BadCount)
        );
        assert_eq!(
            encode_gpa_direct(&mut buf, 1, true, &[], &[]),
            Err(WireError::BadCount)
        );
    }

    #[test]
    fn bad_descriptors() {
        let mut buf = [0u8; 32];
        encode_inband(&mut buf, 1, false, &[0; 16]).unwrap();
        assert!(Packet::parse(&buf).is_ok());
        assert_eq!(Packet::parse(&buf[..31]), Err(WireError::Truncated));
        assert_eq!(Packet::parse(&buf[..15]), Err(WireError::Truncated));

        let mut b = buf;
        b[2] = 1; // offset8 < 2
        assert_eq!(Packet::parse(&b), Err(WireError::BadOffset));
        let mut b = buf;
        b[4] = 1; // len8 < offset8
        assert_eq!(Packet::parse(&b), Err(WireError::BadLength));
        let mut b = buf;
        b[6] = 2; // reserved flag
        assert_eq!(Packet::parse(&b), Err(WireError::BadFlags));
        let mut b = buf;
        b[0] = 8; // DATA_USING_GPADL
        assert_eq!(Packet::parse(&b), Err(WireError::Unsupported(8)));
        let mut b = buf;
        b[0] = 99;
        assert_eq!(Packet::parse(&b), Err(WireError::UnknownType(99)));
        let mut b = buf;
        b[4] = 0xff; // len8 far beyond the buffer
        assert_eq!(Packet::parse(&b), Err(WireError::Truncated));
    }

    #[test]
    fn encoder_limits() {
        let mut big = std::vec![0u8; 600 * 1024];
        let payload = std::vec![0u8; 530 * 1024];
        assert_eq!(
            encode_inband(&mut big, 0, false, &payload),
            Err(WireError::TooLong)
        );
    }

    /// The completion fast path as a ring reader calls it.
    fn fast_completion(bytes: &[u8]) -> Option<(u64, &[u8])> {
        let (descriptor, _) = VmPacketDescriptor::read_from_prefix(bytes).ok()?;
        Packet::completion_payload(&descriptor, bytes)
    }

    #[test]
    fn the_completion_fast_path_takes_only_plain_completions() {
        let mut buf = [0u8; 24];
        encode_completion(&mut buf, 7, &[108, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!(
            fast_completion(&buf),
            Some((7, &[108, 0, 0, 0, 1, 0, 0, 0][..]))
        );
        // Flags, headers, another type, or bytes short of the length: the general parse.
        for (at, value) in [(6, 1), (2, 3), (0, 6)] {
            let mut other = buf;
            other[at] = value;
            assert_eq!(fast_completion(&other), None, "byte {at} = {value}");
        }
        assert_eq!(fast_completion(&buf[..23]), None);
    }

    proptest! {
        /// Whatever the fast path accepts, the general parse reads the same way.
        #[test]
        fn completion_fast_path_agrees_with_parse(
            mut bytes in proptest::collection::vec(any::<u8>(), 16..64),
            len8 in 2u16..8,
        ) {
            // Mostly plain completions, so that the agreement is tested, not just `None`.
            bytes[..8].copy_from_slice(&[11, 0, 2, 0, len8 as u8, 0, 0, 0]);
            if let Some((trans_id, payload)) = fast_completion(&bytes) {
                let p = Packet::parse(&bytes).expect("the general parse accepts it too");
                prop_assert_eq!(p.kind, PacketKind::Completion);
                prop_assert_eq!(p.trans_id(), trans_id);
                prop_assert_eq!(p.payload, payload);
            } else {
                prop_assert!(usize::from(len8) * 8 > bytes.len());
            }
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = Packet::parse(&bytes) {
                prop_assert!(p.descriptor.packet_len() <= bytes.len());
                if let PacketKind::GpaDirect { ranges, .. } = p.kind {
                    prop_assert_eq!(ranges.iter().count(), ranges.len());
                }
            }
        }

        #[test]
        fn parse_typed_garbage(
            t in prop::sample::select(&[6u16, 7, 9, 11][..]),
            offset8 in 0u16..12,
            len8 in 0u16..14,
            rest in proptest::collection::vec(any::<u8>(), 0..112),
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&t.to_le_bytes());
            bytes.extend_from_slice(&offset8.to_le_bytes());
            bytes.extend_from_slice(&len8.to_le_bytes());
            bytes.extend_from_slice(&[0; 10]);
            bytes.extend_from_slice(&rest);
            let _ = Packet::parse(&bytes);
        }
    }
}
