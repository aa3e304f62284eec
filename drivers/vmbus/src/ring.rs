//! The guest side of a channel's ring buffer pair.
//!
//! A channel talks to the host through two rings in one host-visible buffer: first the
//! outgoing (guest-to-host) ring, then the incoming (host-to-guest) ring. Each ring is a
//! 4096-byte control page (`write_index`, `read_index`, `interrupt_mask`,
//! `pending_send_sz`, `feature_bits`; offsets from [`hvnet_wire::ring`]) followed by its
//! data area. The guest describes the whole buffer by one GPADL; OPENCHANNEL names the
//! incoming ring by its page offset ([`RingPair::downstream_page_offset`]).
//!
//! In the data area a packet is a 16-byte descriptor, type-specific headers, the payload
//! padded to 8 bytes and an 8-byte trailer (the packet's start offset in the high half,
//! ignored by readers). Packets wrap around the end of the data area byte-wise. The
//! producer owns `write_index`, the consumer `read_index`; equal indices mean empty, so a
//! producer never fills the ring completely: 8 bytes always stay free.
//!
//! # Trust
//!
//! The host is not trusted (a confidential-VM mindset). The guest keeps its own copies of
//! the indices it owns and never reads them back from shared memory. Every value the host
//! writes passes a check before use:
//!
//! * the outgoing ring's `read_index` must be 8-aligned, inside the data area and inside
//!   the part the guest has written and the host not yet consumed;
//! * the incoming ring's `write_index` must be 8-aligned, inside the data area and must
//!   not take back data it already announced;
//! * an incoming descriptor must have `offset8 >= 2`, `len8 >= offset8`, and the packet
//!   with its trailer must fit both the ring and the bytes the host announced.
//!
//! A broken invariant is reported as the [`RingError`] variant that names it, and the ring
//! (that direction) stays failed: every later call returns the same error. Nothing here
//! panics, loops over host-controlled counts, or touches memory outside the buffer's
//! checked accessors. The descriptor is read once: the copy handed to the caller carries
//! the validated descriptor, not a second fetch the host could have changed meanwhile.
//!
//! # Signalling
//!
//! * Writer: after publishing `write_index`, signal the host only if the host has not set
//!   the outgoing ring's `interrupt_mask` and the ring was empty before this write (the
//!   host's `read_index` equals the old `write_index`) - Linux `hv_need_to_signal`.
//! * Reader: after publishing `read_index` ([`RingPair::read_done`]), signal only if the
//!   incoming ring has the pending-send-size feature bit, the host set `pending_send_sz`,
//!   and the free space crossed from below `pending_send_sz` to at least it (Linux
//!   `hv_pkt_iter_close`, OpenVMM `commit_read`).
//! * Sleeping: a consumer masks interrupts while draining and, before sleeping, unmasks
//!   and checks again ([`RingPair::unmask_and_check`]) so a packet that arrived in
//!   between is not missed.
//!
//! # Batches
//!
//! A data path touches the control page once per batch, not once per packet, as Linux's
//! `hv_pkt_iter` keeps a private read position and publishes it at the end:
//!
//! * Reading: [`RingPair::begin_read`] (or [`RingPair::begin_read_windowed`], which also
//!   copies the packets out in bulk) loads and checks the host's `write_index` once; the
//!   packets up to it are read with the same checks as single reads; then
//!   [`RingPair::read_done`] publishes the read position once.
//! * Writing: [`RingPair::stage`], [`RingPair::stage_prepared`] and
//!   [`RingPair::stage_prepared_batch`] write packets the host does not see yet;
//!   [`RingPair::publish`] stores `write_index` once and applies the signalling rule
//!   above to the whole batch (signal if the host had consumed everything published
//!   before it). The host's `read_index` is loaded for these writes only when the free
//!   space last seen is too small; a stale value only underestimates the free space.
//! * A [`PreparedPacket`] is laid out once and written many times (a receive completion,
//!   a send-section message) with only its transaction id and payload bytes changed.
//!
//! Sources: `shared/reference/hyperv-facts.md` 5.7, 5.9, 5.10 and
//! `shared/reference/wire-layouts.md` 2 (Linux `drivers/hv/ring_buffer.c`, OpenVMM
//! `vm/devices/vmbus/vmbus_ring`).

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use hvnet_wire::ring::{
    check_ring_index, Packet, PacketTrailer, VmGpaDirectHeader, VmPacketDescriptor, VmPacketType,
    PACKET_DESCRIPTOR_SIZE, PACKET_TRAILER_SIZE, RING_CONTROL_SIZE, RING_FEATURE_BITS_OFFSET,
    RING_FEATURE_PENDING_SEND_SZ, RING_INTERRUPT_MASK_OFFSET, RING_PENDING_SEND_SZ_OFFSET,
    RING_READ_INDEX_OFFSET, RING_WRITE_INDEX_OFFSET, VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED,
};
use hvnet_wire::vmbus::{gpa_range_head, gpa_range_pages, GpaRange};
use hvnet_wire::{WireError, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::memory::{MemoryError, SharedBuffer, PAGE_SIZE};

// A ring's control page is exactly one page, so rings start on page boundaries.
const _: () = assert!(RING_CONTROL_SIZE == PAGE_SIZE);

/// Smallest ring: its control page and one data page.
pub const MIN_RING_PAGES: usize = 2;

/// Bytes a packet with its trailer takes at least (a bare descriptor).
const MIN_RING_PACKET: usize = PACKET_DESCRIPTOR_SIZE + PACKET_TRAILER_SIZE;

/// Largest packet a descriptor can describe (`len8` is a u16 count of 8-byte units).
const MAX_DESCRIBED_LEN: usize = u16::MAX as usize * 8;

/// Why a ring operation failed.
///
/// [`RingError::Full`], [`RingError::BufferTooSmall`], [`RingError::OutgoingTooLarge`] and
/// [`RingError::BadOutgoingPacket`] are the caller's business and leave the ring usable. [`RingError::BadPacket`] means the host sent a well-framed
/// packet whose contents the parser rejects; it was consumed and the ring stays usable.
/// Every other variant names an invariant the host broke (see [`RingError::is_corruption`]);
/// the direction it happened in stays failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The buffer cannot hold the requested rings: it is not a whole number of pages,
    /// either ring would have fewer than [`MIN_RING_PAGES`] pages, or a data area is too
    /// large for 32-bit ring indices.
    BadLayout {
        /// Pages in the buffer.
        total_pages: usize,
        /// Pages asked for the outgoing ring (control page included).
        outgoing_pages: usize,
    },
    /// Not enough free space in the outgoing ring right now; nothing was written.
    Full {
        /// Ring bytes the packet needs (packet and trailer).
        needed: usize,
    },
    /// The outgoing packet can never fit: larger than the empty ring or than a
    /// descriptor can describe. Nothing was written; the ring stays usable.
    OutgoingTooLarge {
        /// Ring bytes of the packet (packet and trailer).
        len: usize,
        /// The most the ring can carry.
        max: usize,
    },
    /// An outgoing packet is malformed (e.g. a GPA range whose PFN count does not match
    /// its span, or no ranges at all); nothing was written.
    BadOutgoingPacket(WireError),
    /// The caller's buffer is smaller than the next incoming packet; nothing consumed.
    BufferTooSmall {
        /// Bytes of the packet (trailer excluded).
        needed: usize,
    },
    /// The next incoming packet is well framed but its contents are invalid (unknown or
    /// unsupported type, reserved flags, ranges overlapping the payload). It was consumed.
    BadPacket(WireError),
    /// The incoming ring's `write_index` is out of range, not 8-aligned, or moved
    /// backwards over data it had already announced.
    BadWriteIndex {
        /// The value the host wrote.
        index: u32,
    },
    /// The outgoing ring's `read_index` is out of range, not 8-aligned, or claims that
    /// the host consumed bytes the guest never wrote.
    BadReadIndex {
        /// The value the host wrote.
        index: u32,
    },
    /// An incoming descriptor claims a packet larger than the whole ring can hold.
    PacketTooLarge {
        /// Ring bytes the descriptor claims (packet and trailer).
        len: usize,
        /// The most the ring can carry.
        max: usize,
    },
    /// An incoming descriptor has `offset8 < 2` or `len8 < offset8`.
    BadDescriptor {
        /// The descriptor's `offset8`.
        offset8: u16,
        /// The descriptor's `len8`.
        len8: u16,
    },
    /// The next incoming packet (or its descriptor) reaches past the host's `write_index`.
    PacketPastWriteIndex {
        /// Ring bytes the packet needs (packet and trailer).
        needed: usize,
        /// Bytes between `read_index` and `write_index`.
        available: usize,
    },
    /// A shared-memory access failed. The layout is checked at construction, so this
    /// indicates a broken [`SharedBuffer`] implementation.
    Memory(MemoryError),
}

impl RingError {
    /// Whether the error means the host broke a ring invariant (the ring direction it
    /// happened in is failed from then on).
    pub fn is_corruption(&self) -> bool {
        match self {
            Self::BadWriteIndex { .. }
            | Self::BadReadIndex { .. }
            | Self::BadDescriptor { .. }
            | Self::PacketTooLarge { .. }
            | Self::PacketPastWriteIndex { .. }
            | Self::Memory(_) => true,
            Self::BadLayout { .. }
            | Self::Full { .. }
            | Self::OutgoingTooLarge { .. }
            | Self::BadOutgoingPacket(_)
            | Self::BufferTooSmall { .. }
            | Self::BadPacket(_) => false,
        }
    }
}

impl From<MemoryError> for RingError {
    fn from(e: MemoryError) -> Self {
        Self::Memory(e)
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadLayout {
                total_pages,
                outgoing_pages,
            } => write!(
                f,
                "cannot split {total_pages} pages into rings with {outgoing_pages} outgoing pages"
            ),
            Self::Full { needed } => write!(f, "ring full ({needed} bytes needed)"),
            Self::OutgoingTooLarge { len, max } => {
                write!(f, "packet of {len} ring bytes exceeds the maximum {max}")
            }
            Self::BadOutgoingPacket(e) => write!(f, "malformed outgoing packet: {e}"),
            Self::BufferTooSmall { needed } => {
                write!(f, "buffer too small for a {needed}-byte packet")
            }
            Self::BadPacket(e) => write!(f, "invalid packet from the host: {e}"),
            Self::BadWriteIndex { index } => write!(f, "host wrote bad write_index {index:#x}"),
            Self::BadReadIndex { index } => write!(f, "host wrote bad read_index {index:#x}"),
            Self::PacketTooLarge { len, max } => {
                write!(
                    f,
                    "host packet of {len} ring bytes exceeds the ring ({max})"
                )
            }
            Self::BadDescriptor { offset8, len8 } => {
                write!(f, "bad packet descriptor (offset8 {offset8}, len8 {len8})")
            }
            Self::PacketPastWriteIndex { needed, available } => write!(
                f,
                "packet of {needed} bytes reaches past write_index ({available} available)"
            ),
            Self::Memory(e) => write!(f, "shared memory access failed: {e:?}"),
        }
    }
}

impl core::error::Error for RingError {}

/// What a successful write asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct WriteResult {
    /// Signal the host (HvSignalEvent / monitor bit): the ring was empty before this
    /// packet and the host has not masked interrupts.
    pub signal: bool,
}

/// Counters of one ring direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Packets written (outgoing) or consumed (incoming).
    pub packets: u64,
    /// Ring bytes those packets took, trailers included.
    pub bytes: u64,
    /// Writes refused with [`RingError::Full`] (outgoing only).
    pub full: u64,
    /// Signals the ring asked the caller to send to the host.
    pub signals: u64,
}

/// What follows the descriptor of an outgoing packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutgoingKind<'a> {
    /// `VM_PKT_DATA_INBAND` (6): payload only.
    InBand {
        /// Ask the host for a completion (descriptor flag bit 0).
        completion_requested: bool,
    },
    /// `VM_PKT_COMP` (11): a completion echoing the request's transaction id.
    Completion,
    /// `VM_PKT_DATA_USING_GPA_DIRECT` (9): GPA ranges of guest memory, then the payload.
    GpaDirect {
        /// Ask the host for a completion (Linux always does for page-buffer sends).
        completion_requested: bool,
        /// The ranges; at least one, each with exactly the PFNs its span covers.
        ranges: &'a [GpaRange<'a>],
    },
}

/// A packet to write: descriptor fields, type-specific headers and a gathered payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutgoingPacket<'a> {
    /// Transaction id (echoed in the completion).
    pub trans_id: u64,
    /// Packet type and its headers.
    pub kind: OutgoingKind<'a>,
    /// Payload pieces, written back to back (a gather list).
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet.
    pub fn inband(trans_id: u64, completion_requested: bool, payload: &'a [&'a [u8]]) -> Self {
        Self {
            trans_id,
            kind: OutgoingKind::InBand {
                completion_requested,
            },
            payload,
        }
    }

    /// A completion for transaction `trans_id`.
    pub fn completion(trans_id: u64, payload: &'a [&'a [u8]]) -> Self {
        Self {
            trans_id,
            kind: OutgoingKind::Completion,
            payload,
        }
    }

    /// A GPA-direct packet.
    pub fn gpa_direct(
        trans_id: u64,
        completion_requested: bool,
        ranges: &'a [GpaRange<'a>],
        payload: &'a [&'a [u8]],
    ) -> Self {
        Self {
            trans_id,
            kind: OutgoingKind::GpaDirect {
                completion_requested,
                ranges,
            },
            payload,
        }
    }

    /// Ring bytes the packet takes (descriptor, headers, padded payload, trailer).
    pub fn ring_len(&self) -> Result<usize, RingError> {
        Ok(self.layout()?.ring_len)
    }

    fn layout(&self) -> Result<PacketLayout, RingError> {
        let (packet_type, flags, headers_len) = match self.kind {
            OutgoingKind::InBand {
                completion_requested,
            } => (
                VmPacketType::DATA_INBAND,
                flags_for(completion_requested),
                0,
            ),
            OutgoingKind::Completion => (VmPacketType::COMP, 0, 0),
            OutgoingKind::GpaDirect {
                completion_requested,
                ranges,
            } => {
                if ranges.is_empty() {
                    return Err(RingError::BadOutgoingPacket(WireError::BadCount));
                }
                let mut len = size_of::<VmGpaDirectHeader>();
                for r in ranges {
                    let pages = gpa_range_pages(r.byte_offset, r.byte_count)
                        .map_err(RingError::BadOutgoingPacket)?;
                    if pages != r.pfns.len() {
                        return Err(RingError::BadOutgoingPacket(WireError::BadCount));
                    }
                    len = pages
                        .checked_add(1)
                        .and_then(|words| words.checked_mul(8))
                        .and_then(|bytes| bytes.checked_add(len))
                        .ok_or(RingError::BadOutgoingPacket(WireError::TooLong))?;
                }
                (
                    VmPacketType::DATA_USING_GPA_DIRECT,
                    flags_for(completion_requested),
                    len,
                )
            }
        };
        let too_large = |len: usize| RingError::OutgoingTooLarge {
            len,
            max: MAX_DESCRIBED_LEN + PACKET_TRAILER_SIZE,
        };
        let payload_offset = PACKET_DESCRIPTOR_SIZE + headers_len;
        let mut payload_len = 0usize;
        for piece in self.payload {
            payload_len = payload_len
                .checked_add(piece.len())
                .ok_or(too_large(usize::MAX))?;
        }
        let unpadded = payload_offset
            .checked_add(payload_len)
            .ok_or(too_large(usize::MAX))?;
        let packet_len = hvnet_wire::align8(unpadded).ok_or(too_large(usize::MAX))?;
        let ring_len = packet_len
            .checked_add(PACKET_TRAILER_SIZE)
            .ok_or(too_large(usize::MAX))?;
        if packet_len > MAX_DESCRIBED_LEN {
            return Err(too_large(ring_len));
        }
        // payload_offset <= packet_len <= MAX_DESCRIBED_LEN, so both fit a u16 in 8-byte
        // units; headers are whole words, so the division is exact.
        let offset8 = u16::try_from(payload_offset / 8).map_err(|_| too_large(ring_len))?;
        let len8 = u16::try_from(packet_len / 8).map_err(|_| too_large(ring_len))?;
        Ok(PacketLayout {
            descriptor: VmPacketDescriptor {
                packet_type: packet_type.0.into(),
                offset8: offset8.into(),
                len8: len8.into(),
                flags: flags.into(),
                trans_id: self.trans_id.into(),
            },
            padding: packet_len - unpadded,
            ring_len,
        })
    }
}

fn flags_for(completion_requested: bool) -> u16 {
    if completion_requested {
        VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED
    } else {
        0
    }
}

/// Sizes of an outgoing packet, computed (and checked) before anything is written.
struct PacketLayout {
    descriptor: VmPacketDescriptor,
    padding: usize,
    ring_len: usize,
}

impl OutgoingPacket<'_> {
    /// Writes the packet (descriptor, headers, payload, zero padding; no trailer) to the
    /// start of `dst`, which holds at least `layout.ring_len - 8` bytes.
    fn emit(&self, layout: &PacketLayout, dst: &mut [u8]) -> Result<usize, RingError> {
        let mut w = SliceWriter { dst, pos: 0 };
        w.put(layout.descriptor.as_bytes())?;
        if let OutgoingKind::GpaDirect { ranges, .. } = self.kind {
            let header = VmGpaDirectHeader {
                reserved: U32::ZERO,
                // `layout` bounded the ranges by the packet length.
                range_cnt: u32::try_from(ranges.len()).unwrap_or(u32::MAX).into(),
            };
            w.put(header.as_bytes())?;
            for r in ranges {
                w.put(U64::new(gpa_range_head(r.byte_offset, r.byte_count)).as_bytes())?;
                w.put(r.pfns.as_bytes())?;
            }
        }
        for piece in self.payload {
            w.put(piece)?;
        }
        w.put(&[0u8; 8][..layout.padding.min(8)])?;
        Ok(w.pos)
    }
}

/// Appends to a private slice; running out of room is a caller bug reported as an error.
struct SliceWriter<'a> {
    dst: &'a mut [u8],
    pos: usize,
}

impl SliceWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), RingError> {
        let end = self.pos + bytes.len();
        let dst = self
            .dst
            .get_mut(self.pos..end)
            .ok_or(out_of_ring(self.pos, bytes.len()))?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}

/// Largest packet (trailer excluded) a [`PreparedPacket`] holds.
pub const PREPARED_MAX: usize = 64;

/// Bytes a batch reads at once at the start of a packet: its descriptor and, for the
/// common small packets, all of it (a netvsc receive indication with one range is 72
/// bytes, a send completion 56), so that most packets take one copy out of the ring.
const READ_AHEAD: usize = 96;

/// Most bytes [`RingPair::stage_prepared_batch`] assembles before copying them into the
/// ring.
pub const ASSEMBLY_BYTES: usize = 4096;

/// Packets up to this many ring bytes are assembled in private memory and copied into
/// the ring in one piece (or two, where the ring wraps) instead of field by field.
const ASSEMBLE_MAX: usize = 128;

/// A small outgoing packet laid out once and sent many times: only its transaction id
/// and its payload bytes change between sends (netvsc's receive completions and its
/// SEND_RNDIS_PKT messages). Writing one is a single copy into the ring, with no layout
/// work, because the descriptor was checked when the packet was prepared and cannot be
/// changed afterwards.
#[derive(Clone, Copy)]
pub struct PreparedPacket {
    /// The packet, then room for its trailer (filled at each write).
    bytes: [u8; PREPARED_MAX + PACKET_TRAILER_SIZE],
    /// Packet length without trailer (a multiple of 8, at most [`PREPARED_MAX`]).
    len: usize,
    /// Where the payload starts (`offset8 * 8`).
    payload_offset: usize,
}

impl fmt::Debug for PreparedPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedPacket")
            .field("bytes", &&self.bytes[..self.len])
            .finish()
    }
}

impl PreparedPacket {
    /// Lays `packet` out; [`RingError::OutgoingTooLarge`] if it takes more than
    /// [`PREPARED_MAX`] bytes without its trailer.
    pub fn new(packet: &OutgoingPacket<'_>) -> Result<Self, RingError> {
        let layout = packet.layout()?;
        let len = layout.ring_len - PACKET_TRAILER_SIZE;
        if len > PREPARED_MAX {
            return Err(RingError::OutgoingTooLarge {
                len: layout.ring_len,
                max: PREPARED_MAX + PACKET_TRAILER_SIZE,
            });
        }
        let mut p = Self {
            bytes: [0; PREPARED_MAX + PACKET_TRAILER_SIZE],
            len,
            payload_offset: layout.descriptor.payload_offset(),
        };
        packet.emit(&layout, &mut p.bytes)?;
        Ok(p)
    }

    /// Sets the transaction id of the next write.
    #[inline]
    pub fn set_trans_id(&mut self, trans_id: u64) {
        self.bytes[8..16].copy_from_slice(&trans_id.to_le_bytes());
    }

    /// The payload bytes (with their padding) to change between writes; the descriptor
    /// and headers are fixed.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.payload_offset..self.len]
    }

    /// Where the payload starts in the packet (for the `patch` of
    /// [`RingPair::stage_prepared_with`]).
    pub fn payload_offset(&self) -> usize {
        self.payload_offset
    }

    /// The packet as it will be written (trailer excluded).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Ring bytes a write takes (packet and trailer).
    pub fn ring_len(&self) -> usize {
        self.len + PACKET_TRAILER_SIZE
    }
}

/// Where one ring lives in the buffer.
#[derive(Clone, Copy, Debug)]
struct RingGeometry {
    /// Offset of the control page.
    control: usize,
    /// Offset of the data area.
    data: usize,
    /// Size of the data area (a non-zero multiple of 4096 that fits a u32).
    size: usize,
}

impl RingGeometry {
    /// Bytes from `from` forward to `to`, both inside the data area.
    fn distance(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            self.size - from + to
        }
    }

    /// `pos + len` wrapped into the data area (`pos < size`, `len <= size`).
    fn advance(&self, pos: usize, len: usize) -> usize {
        let end = pos + len;
        if end >= self.size {
            end - self.size
        } else {
            end
        }
    }

    /// Bytes a producer may still use: the ring never fills completely, so 8 bytes
    /// stay free to keep full distinguishable from empty.
    fn free(&self, write: usize, read: usize) -> usize {
        self.size
            .saturating_sub(self.distance(read, write))
            .saturating_sub(PACKET_TRAILER_SIZE)
    }

    /// The largest packet (with trailer) an empty ring accepts.
    fn max_ring_packet(&self) -> usize {
        self.size - PACKET_TRAILER_SIZE
    }

    fn size_u32(&self) -> u32 {
        // Checked in `RingPair::new`.
        u32::try_from(self.size).unwrap_or(u32::MAX)
    }
}

/// Counters of one direction, one cell each so that counting copies nothing.
#[derive(Debug, Default)]
struct Counters {
    packets: Cell<u64>,
    bytes: Cell<u64>,
    full: Cell<u64>,
    signals: Cell<u64>,
}

impl Counters {
    fn bump(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get().wrapping_add(n));
    }

    fn snapshot(&self) -> RingStats {
        RingStats {
            packets: self.packets.get(),
            bytes: self.bytes.get(),
            full: self.full.get(),
            signals: self.signals.get(),
        }
    }
}

/// Guest state of the outgoing ring.
#[derive(Debug, Default)]
struct OutState {
    /// Where the next packet goes: the end of everything written, published or staged
    /// (the guest's own copy of `write_index`; never read back from shared memory).
    write: Cell<usize>,
    /// The `write_index` value last stored: the host sees packets up to here.
    published: Cell<usize>,
    /// The host's `read_index` as last validated. Free space computed from it is never
    /// more than the real free space (the host only moves it forward).
    read: Cell<usize>,
    /// The first corruption seen; the ring refuses all work after it.
    failed: Cell<Option<RingError>>,
    /// `failed.is_some()`, cheap to test on every call.
    broken: Cell<bool>,
    stats: Counters,
}

/// Guest state of the incoming ring.
#[derive(Debug, Default)]
struct InState {
    /// Start of the next packet to consume (not yet published).
    read: Cell<usize>,
    /// The `read_index` value last published to the host.
    committed: Cell<usize>,
    /// The host's `write_index` as last validated.
    write: Cell<usize>,
    /// The first corruption seen; the ring refuses all work after it.
    failed: Cell<Option<RingError>>,
    /// `failed.is_some()`, cheap to test on every call.
    broken: Cell<bool>,
    stats: Counters,
}

impl InState {
    fn check(&self) -> Result<(), RingError> {
        if self.broken.get() {
            return Err(self
                .failed
                .get()
                .unwrap_or(RingError::Memory(MemoryError::OutOfMemory)));
        }
        Ok(())
    }

    /// Records `e` if it is a corruption (the incoming ring fails for good); returns it.
    fn fail(&self, e: RingError) -> RingError {
        if e.is_corruption() {
            self.failed.set(Some(e));
            self.broken.set(true);
        }
        e
    }
}

/// A validated incoming descriptor and where its packet starts.
struct NextPacket {
    descriptor: VmPacketDescriptor,
    start: usize,
    len: usize,
}

/// A channel's outgoing and incoming rings over one host-visible buffer.
///
/// All methods take `&self` and finish without awaiting, so the channel can share the
/// pair between its send and receive paths on one executor. The pair is not meant for
/// use from several CPUs at once (one producer for the outgoing ring, one consumer for
/// the incoming ring).
pub struct RingPair {
    buffer: Rc<dyn SharedBuffer>,
    outgoing_pages: usize,
    out_ring: RingGeometry,
    in_ring: RingGeometry,
    out: OutState,
    inc: InState,
    /// Private memory where batches of prepared packets are laid out before they are
    /// copied into the ring (grows to at most [`ASSEMBLY_BYTES`] on first use).
    assembly: RefCell<Vec<u8>>,
}

impl fmt::Debug for RingPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingPair")
            .field("outgoing_pages", &self.outgoing_pages)
            .field("incoming_pages", &self.incoming_pages())
            .field("out", &self.out)
            .field("in", &self.inc)
            .finish()
    }
}

impl RingPair {
    /// Sets up the rings over `buffer`: the first `outgoing_pages` pages (control page
    /// included) are the outgoing ring, the rest the incoming ring.
    ///
    /// Both control pages are reset: indices 0, interrupts unmasked, no pending send size,
    /// and the pending-send-size feature bit set (as Linux does before OPENCHANNEL).
    pub fn new(
        buffer: impl Into<Rc<dyn SharedBuffer>>,
        outgoing_pages: usize,
    ) -> Result<Self, RingError> {
        let buffer = buffer.into();
        let total_pages = buffer.len() / PAGE_SIZE;
        let bad = RingError::BadLayout {
            total_pages,
            outgoing_pages,
        };
        if buffer.len() % PAGE_SIZE != 0 {
            return Err(bad);
        }
        let incoming_pages = total_pages.checked_sub(outgoing_pages).ok_or(bad)?;
        if outgoing_pages < MIN_RING_PAGES || incoming_pages < MIN_RING_PAGES {
            return Err(bad);
        }
        let geometry = |first_page: usize, pages: usize| -> Result<RingGeometry, RingError> {
            let size = (pages - 1) * PAGE_SIZE;
            // Indices are u32 byte offsets below the data size.
            u32::try_from(size).map_err(|_| bad)?;
            let control = first_page * PAGE_SIZE;
            Ok(RingGeometry {
                control,
                data: control + RING_CONTROL_SIZE,
                size,
            })
        };
        let out_ring = geometry(0, outgoing_pages)?;
        let in_ring = geometry(outgoing_pages, incoming_pages)?;
        let pair = Self {
            buffer,
            outgoing_pages,
            out_ring,
            in_ring,
            out: OutState::default(),
            inc: InState::default(),
            assembly: RefCell::new(Vec::new()),
        };
        for ring in [&pair.out_ring, &pair.in_ring] {
            pair.store(ring, RING_WRITE_INDEX_OFFSET, 0)?;
            pair.store(ring, RING_READ_INDEX_OFFSET, 0)?;
            pair.store(ring, RING_INTERRUPT_MASK_OFFSET, 0)?;
            pair.store(ring, RING_PENDING_SEND_SZ_OFFSET, 0)?;
            pair.store(ring, RING_FEATURE_BITS_OFFSET, RING_FEATURE_PENDING_SEND_SZ)?;
        }
        Ok(pair)
    }

    /// Pages of the outgoing ring, control page included.
    pub fn outgoing_pages(&self) -> usize {
        self.outgoing_pages
    }

    /// Pages of the incoming ring, control page included.
    pub fn incoming_pages(&self) -> usize {
        self.buffer.pages() - self.outgoing_pages
    }

    /// OPENCHANNEL's `downstream_ringbuffer_pageoffset`: the page offset of the incoming
    /// ring inside the ring GPADL (= the outgoing ring's pages).
    pub fn downstream_page_offset(&self) -> u32 {
        // `new` checked that the outgoing data area fits a u32 byte count.
        u32::try_from(self.outgoing_pages).unwrap_or(u32::MAX)
    }

    /// The buffer holding both rings (to describe it by a GPADL).
    pub fn buffer(&self) -> &Rc<dyn SharedBuffer> {
        &self.buffer
    }

    /// Bytes in the outgoing data area.
    pub fn outgoing_data_size(&self) -> usize {
        self.out_ring.size
    }

    /// Bytes in the incoming data area.
    pub fn incoming_data_size(&self) -> usize {
        self.in_ring.size
    }

    /// The largest packet (with trailer, see [`OutgoingPacket::ring_len`]) the outgoing
    /// ring accepts when empty.
    pub fn max_outgoing_packet(&self) -> usize {
        self.out_ring
            .max_ring_packet()
            .min(MAX_DESCRIBED_LEN + PACKET_TRAILER_SIZE)
    }

    /// Counters of the outgoing ring.
    pub fn outgoing_stats(&self) -> RingStats {
        self.out.stats.snapshot()
    }

    /// Counters of the incoming ring.
    pub fn incoming_stats(&self) -> RingStats {
        self.inc.stats.snapshot()
    }

    /// The corruption that failed the outgoing ring, if any.
    pub fn outgoing_failure(&self) -> Option<RingError> {
        self.out.failed.get()
    }

    /// The corruption that failed the incoming ring, if any.
    pub fn incoming_failure(&self) -> Option<RingError> {
        self.inc.failed.get()
    }

    // -----------------------------------------------------------------------------------
    // Outgoing ring.

    /// Writes one packet to the outgoing ring and publishes it (with any packets staged
    /// before it).
    ///
    /// Refuses with [`RingError::Full`] (writing nothing, publishing nothing) unless the
    /// free space, which always keeps 8 bytes back, holds the whole packet with its
    /// trailer; the host's `read_index` is loaded and checked for this on every call. On
    /// success the result says whether to signal the host.
    pub fn try_write(&self, packet: &OutgoingPacket<'_>) -> Result<WriteResult, RingError> {
        self.stage_packet(packet, true)?;
        self.publish()
    }

    /// Writes one packet after those written before but does not publish it: the host
    /// sees it only at the next [`publish`](Self::publish) (or
    /// [`try_write`](Self::try_write)). Staging a batch and publishing it once stores
    /// `write_index` once and signals at most once (the writer's half of Linux's batched
    /// `hv_pkt_iter` use). The host's `read_index` is loaded only when the free space last
    /// seen is too small. [`RingError::Full`] writes nothing.
    pub fn stage(&self, packet: &OutgoingPacket<'_>) -> Result<(), RingError> {
        self.stage_packet(packet, false)
    }

    /// Stages a prepared packet (see [`stage`](Self::stage)): one copy into the ring.
    #[inline]
    pub fn stage_prepared(&self, packet: &mut PreparedPacket) -> Result<(), RingError> {
        self.out_fail_check()?;
        let ring_len = packet.len + PACKET_TRAILER_SIZE;
        let start = self.out.write.get();
        if self.out_ring.free(start, self.out.read.get()) < ring_len {
            self.reserve(ring_len, true)?;
        }
        // The trailer: the packet's start offset in the high half of a u64.
        let trailer = u64::from(index_u32(start)) << 32;
        packet.bytes[packet.len..ring_len].copy_from_slice(&trailer.to_le_bytes());
        self.put(&self.out_ring, start, &packet.bytes[..ring_len])
            .map_err(|e| self.out_fail(e))?;
        self.wrote(start, ring_len);
        Ok(())
    }

    /// Stages one copy of `template` per transaction id in `trans_ids` (netvsc's
    /// receive completions of a batch, as Linux's `send_recv_completions` flushes them):
    /// the copies are assembled in private memory and go into the ring in one piece per
    /// [`ASSEMBLY_BYTES`]. Returns how many were staged: all of them, or as many as fit
    /// (the host's `read_index` is loaded once if the free space last seen is too small);
    /// [`RingError::Full`] if not even one fits.
    pub fn stage_prepared_batch(
        &self,
        template: &PreparedPacket,
        trans_ids: &[u64],
    ) -> Result<usize, RingError> {
        self.stage_prepared_with(template, trans_ids, |packet, &trans_id| {
            packet[8..16].copy_from_slice(&trans_id.to_le_bytes());
        })
    }

    /// Stages one copy of `template` per item of `items`, `patch` writing the item into
    /// its copy (the packet bytes, trailer excluded: the transaction id at 8..16, the
    /// payload from [`PreparedPacket::payload_offset`]). Assembled and copied into the
    /// ring as [`stage_prepared_batch`](Self::stage_prepared_batch) does; returns how
    /// many were staged (as many as fit, in order), [`RingError::Full`] if none fits.
    pub fn stage_prepared_with<T>(
        &self,
        template: &PreparedPacket,
        items: &[T],
        mut patch: impl FnMut(&mut [u8], &T),
    ) -> Result<usize, RingError> {
        self.out_fail_check()?;
        if items.is_empty() {
            return Ok(0);
        }
        let ring = self.out_ring;
        let len = template.len;
        let ring_len = len + PACKET_TRAILER_SIZE;
        if ring_len > ring.max_ring_packet() {
            return Err(RingError::OutgoingTooLarge {
                len: ring_len,
                max: self.max_outgoing_packet(),
            });
        }
        let start = self.out.write.get();
        let mut free = ring.free(start, self.out.read.get());
        if free < items.len() * ring_len {
            free = ring.free(start, self.load_read_index()?);
        }
        let count = items.len().min(free / ring_len);
        if count == 0 {
            Counters::bump(&self.out.stats.full, 1);
            return Err(RingError::Full { needed: ring_len });
        }
        let mut assembly = self.assembly.borrow_mut();
        let per_chunk = (ASSEMBLY_BYTES / ring_len).max(1);
        let mut pos = start;
        for chunk in items[..count].chunks(per_chunk) {
            let bytes = chunk.len() * ring_len;
            if assembly.len() < bytes {
                assembly.resize(bytes, 0);
            }
            let chunk_start = pos;
            for (dst, item) in assembly[..bytes].chunks_exact_mut(ring_len).zip(chunk) {
                dst[..len].copy_from_slice(&template.bytes[..len]);
                patch(&mut dst[..len], item);
                let trailer = u64::from(index_u32(pos)) << 32;
                dst[len..].copy_from_slice(&trailer.to_le_bytes());
                pos = ring.advance(pos, ring_len);
            }
            self.put(&ring, chunk_start, &assembly[..bytes])
                .map_err(|e| self.out_fail(e))?;
            self.out.write.set(pos);
        }
        Counters::bump(&self.out.stats.packets, count as u64);
        Counters::bump(&self.out.stats.bytes, (count * ring_len) as u64);
        Ok(count)
    }

    /// Writes a prepared packet and publishes it (with any staged before it). Unlike
    /// [`try_write`](Self::try_write) the host's `read_index` is loaded only when the
    /// free space last seen is too small.
    #[inline]
    pub fn try_write_prepared(
        &self,
        packet: &mut PreparedPacket,
    ) -> Result<WriteResult, RingError> {
        self.stage_prepared(packet)?;
        self.publish()
    }

    /// Whether packets were staged and not yet published.
    pub fn has_unpublished(&self) -> bool {
        self.out.write.get() != self.out.published.get()
    }

    /// Publishes every staged packet: one release store of `write_index`, then the
    /// signal decision of Linux `hv_need_to_signal` for the whole batch - signal if the
    /// host has not masked interrupts and had consumed everything published before (so
    /// it may be asleep). Nothing staged: nothing stored, no signal.
    #[inline]
    pub fn publish(&self) -> Result<WriteResult, RingError> {
        self.out_fail_check()?;
        let write = self.out.write.get();
        let before = self.out.published.get();
        if write == before {
            return Ok(WriteResult { signal: false });
        }
        let ring = self.out_ring;
        // One look through the `Rc` for the three accesses below.
        let buffer: &dyn SharedBuffer = &*self.buffer;
        // The packet bytes are visible before the index (release store).
        buffer
            .store_u32(ring.control + RING_WRITE_INDEX_OFFSET, index_u32(write))
            .map_err(|e| self.out_fail(e.into()))?;
        self.out.published.set(write);

        // Linux `hv_need_to_signal`: the index store must be ordered before the loads of
        // the host's mask and read index, or the host could go to sleep unsignalled.
        // The packets are published now: a failed or implausible load must not turn into
        // an error (the caller could send them again), so it errs towards a spare signal.
        fence(Ordering::SeqCst);
        let masked = match buffer.load_u32(ring.control + RING_INTERRUPT_MASK_OFFSET) {
            Ok(mask) => mask != 0,
            Err(_) => false,
        };
        let was_empty = match buffer.load_u32(ring.control + RING_READ_INDEX_OFFSET) {
            Ok(raw) => match self.check_read_index(raw) {
                Some(read) => {
                    // A valid value also refreshes the free space the next write sees.
                    self.out.read.set(read);
                    read == before
                }
                None => true,
            },
            Err(_) => true,
        };
        let signal = !masked && was_empty;
        if signal {
            Counters::bump(&self.out.stats.signals, 1);
        }
        Ok(WriteResult { signal })
    }

    /// Whether `bytes` more ring bytes can be staged now: judged by the free space last
    /// seen, and only if that is too small by the host's `read_index` loaded once more.
    /// Nothing is reserved; a writer that stages later (a batch) asks for everything it
    /// means to stage.
    #[inline(always)]
    pub fn outgoing_room(&self, bytes: usize) -> Result<bool, RingError> {
        if !self.out.broken.get()
            && self
                .out_ring
                .free(self.out.write.get(), self.out.read.get())
                >= bytes
        {
            return Ok(true);
        }
        self.outgoing_room_now(bytes)
    }

    /// [`outgoing_room`](Self::outgoing_room) with the host's `read_index` loaded.
    #[inline(never)]
    fn outgoing_room_now(&self, bytes: usize) -> Result<bool, RingError> {
        Ok(self.outgoing_free()? >= bytes)
    }

    /// Free bytes of the outgoing ring now (the 8-byte gap already deducted): a packet
    /// fits if its [`OutgoingPacket::ring_len`] is at most this.
    pub fn outgoing_free(&self) -> Result<usize, RingError> {
        self.out_fail_check()?;
        let read = self.load_read_index()?;
        Ok(self.out_ring.free(self.out.write.get(), read))
    }

    /// Asks the host to signal once at least `bytes` are free in the outgoing ring
    /// (pending-send-size protocol; rounded up to 8 as OpenVMM does). `0` withdraws the
    /// request. The caller re-checks the ring after setting it, then waits.
    pub fn set_pending_send_size(&self, bytes: usize) -> Result<(), RingError> {
        let max = self.max_outgoing_packet();
        let too_large = RingError::OutgoingTooLarge { len: bytes, max };
        let rounded = hvnet_wire::align8(bytes).ok_or(too_large)?;
        if rounded > max {
            return Err(too_large);
        }
        let value = u32::try_from(rounded).map_err(|_| too_large)?;
        self.store(&self.out_ring, RING_PENDING_SEND_SZ_OFFSET, value)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn out_fail_check(&self) -> Result<(), RingError> {
        if self.out.broken.get() {
            return Err(self
                .out
                .failed
                .get()
                .unwrap_or(RingError::Memory(MemoryError::OutOfMemory)));
        }
        Ok(())
    }

    /// Records `e` if it is a corruption (the outgoing ring fails for good); returns it.
    fn out_fail(&self, e: RingError) -> RingError {
        if e.is_corruption() {
            self.out.failed.set(Some(e));
            self.out.broken.set(true);
        }
        e
    }

    /// Lays `packet` out and writes it after the packets written so far.
    fn stage_packet(&self, packet: &OutgoingPacket<'_>, fresh: bool) -> Result<(), RingError> {
        self.out_fail_check()?;
        let ring = self.out_ring;
        let layout = packet.layout()?;
        if layout.ring_len > ring.max_ring_packet() {
            return Err(RingError::OutgoingTooLarge {
                len: layout.ring_len,
                max: self.max_outgoing_packet(),
            });
        }
        let start = self.reserve(layout.ring_len, fresh)?;
        let trailer = PacketTrailer::new(index_u32(start));
        let written = if layout.ring_len <= ASSEMBLE_MAX {
            // Small packets (completions, control messages) go in one copy.
            let mut local = [0u8; ASSEMBLE_MAX];
            let len = packet.emit(&layout, &mut local)?;
            local[len..len + PACKET_TRAILER_SIZE].copy_from_slice(trailer.as_bytes());
            self.put(&ring, start, &local[..layout.ring_len])
                .map(|_| ())
        } else {
            self.put_fields(packet, &layout, start, &trailer)
        };
        written.map_err(|e| self.out_fail(e))?;
        self.wrote(start, layout.ring_len);
        Ok(())
    }

    /// Writes a large packet in place, piece by piece.
    fn put_fields(
        &self,
        packet: &OutgoingPacket<'_>,
        layout: &PacketLayout,
        start: usize,
        trailer: &PacketTrailer,
    ) -> Result<(), RingError> {
        let ring = self.out_ring;
        let mut pos = self.put(&ring, start, layout.descriptor.as_bytes())?;
        if let OutgoingKind::GpaDirect { ranges, .. } = packet.kind {
            let header = VmGpaDirectHeader {
                reserved: U32::ZERO,
                // `layout` bounded the ranges by the packet length.
                range_cnt: u32::try_from(ranges.len()).unwrap_or(u32::MAX).into(),
            };
            pos = self.put(&ring, pos, header.as_bytes())?;
            for r in ranges {
                let head = U64::new(gpa_range_head(r.byte_offset, r.byte_count));
                pos = self.put(&ring, pos, head.as_bytes())?;
                pos = self.put(&ring, pos, r.pfns.as_bytes())?;
            }
        }
        for piece in packet.payload.iter().filter(|p| !p.is_empty()) {
            pos = self.put(&ring, pos, piece)?;
        }
        if layout.padding > 0 {
            pos = self.put(&ring, pos, &[0u8; 8][..layout.padding.min(8)])?;
        }
        self.put(&ring, pos, trailer.as_bytes())?;
        Ok(())
    }

    /// Finds room for `needed` ring bytes after the last packet written; returns where
    /// they start. With `fresh` the host's `read_index` is always loaded; otherwise only
    /// when the free space last seen is too small.
    fn reserve(&self, needed: usize, fresh: bool) -> Result<usize, RingError> {
        let ring = self.out_ring;
        if needed > ring.max_ring_packet() {
            return Err(RingError::OutgoingTooLarge {
                len: needed,
                max: self.max_outgoing_packet(),
            });
        }
        let write = self.out.write.get();
        if fresh || ring.free(write, self.out.read.get()) < needed {
            let read = self.load_read_index()?;
            if ring.free(write, read) < needed {
                Counters::bump(&self.out.stats.full, 1);
                return Err(RingError::Full { needed });
            }
        }
        Ok(write)
    }

    /// Accounts a packet of `ring_len` bytes written at `start`.
    fn wrote(&self, start: usize, ring_len: usize) {
        self.out.write.set(self.out_ring.advance(start, ring_len));
        Counters::bump(&self.out.stats.packets, 1);
        Counters::bump(&self.out.stats.bytes, ring_len as u64);
    }

    /// Loads and checks the host's `read_index` of the outgoing ring: in range, aligned,
    /// and no further than the guest has published. A bad value fails the ring.
    fn load_read_index(&self) -> Result<usize, RingError> {
        let raw = self
            .load(&self.out_ring, RING_READ_INDEX_OFFSET)
            .map_err(|e| self.out_fail(e))?;
        match self.check_read_index(raw) {
            Some(read) => {
                self.out.read.set(read);
                Ok(read)
            }
            None => Err(self.out_fail(RingError::BadReadIndex { index: raw })),
        }
    }

    /// A host `read_index` value if it is valid: inside the data area, 8-aligned, and
    /// between the last value seen and the published `write_index` (the host consumes
    /// from where it was up to what it was shown, never beyond).
    fn check_read_index(&self, raw: u32) -> Option<usize> {
        let ring = self.out_ring;
        let read = check_ring_index(raw, ring.size_u32()).ok()? as usize;
        let last = self.out.read.get();
        if ring.distance(last, read) > ring.distance(last, self.out.published.get()) {
            return None;
        }
        Some(read)
    }

    // -----------------------------------------------------------------------------------
    // Incoming ring.

    /// Copies the next incoming packet (descriptor to `len8 * 8`, trailer excluded) into
    /// `buf` without consuming it; returns its length, or `None` if the ring is empty.
    pub fn peek(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        self.with_incoming(|| {
            let write = self.load_write_index()?;
            let Some(next) = self.next_packet(write)? else {
                return Ok(None);
            };
            self.copy_packet(&next, buf)?;
            Ok(Some(next.len))
        })
    }

    /// Consumes the next incoming packet without copying it; returns its length, or
    /// `None` if the ring is empty. The space goes back to the host at
    /// [`read_done`](Self::read_done).
    pub fn advance(&self) -> Result<Option<usize>, RingError> {
        self.with_incoming(|| {
            let write = self.load_write_index()?;
            let Some(next) = self.next_packet(write)? else {
                return Ok(None);
            };
            self.consume(&next);
            Ok(Some(next.len))
        })
    }

    /// Copies the next incoming packet into `buf` and consumes it; returns its length, or
    /// `None` if the ring is empty. If `buf` is too small nothing is consumed
    /// ([`RingError::BufferTooSmall`] says how much is needed).
    pub fn read(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        self.with_incoming(|| {
            let write = self.load_write_index()?;
            let Some(next) = self.next_packet(write)? else {
                return Ok(None);
            };
            self.copy_packet(&next, buf)?;
            self.consume(&next);
            Ok(Some(next.len))
        })
    }

    /// Like [`read`](Self::read), then parses the copy with [`Packet::parse`]. A packet
    /// the parser rejects is consumed anyway and reported as [`RingError::BadPacket`].
    pub fn read_packet<'b>(&self, buf: &'b mut [u8]) -> Result<Option<Packet<'b>>, RingError> {
        let Some(len) = self.read(&mut *buf)? else {
            return Ok(None);
        };
        parse_copied(buf, len)
    }

    /// Starts reading a batch: loads and checks the host's `write_index` once; the
    /// batch then reads the packets announced up to it without touching the control page
    /// again (Linux keeps the same private read position in `hv_pkt_iter`). Publish the
    /// space with [`read_done`](Self::read_done) after the batch.
    #[inline]
    pub fn begin_read(&self) -> Result<IncomingBatch<'_>, RingError> {
        let end = self.with_incoming(|| self.load_write_index())?;
        Ok(IncomingBatch { ring: self, end })
    }

    /// Starts reading a batch in bulk (see [`WindowedBatch`]): like
    /// [`begin_read`](Self::begin_read), with `buf` as the private copy and `window` the
    /// bytes to copy out at once.
    #[inline]
    pub fn begin_read_windowed<'b>(
        &self,
        buf: &'b mut Vec<u8>,
        window: usize,
    ) -> Result<WindowedBatch<'_, 'b>, RingError> {
        let end = self.with_incoming(|| self.load_write_index())?;
        let window = window.clamp(MIN_RING_PACKET, self.in_ring.size);
        Ok(WindowedBatch {
            ring: self,
            end,
            buf,
            window,
            have_start: self.inc.read.get(),
            have: 0,
        })
    }

    /// Whether a packet is waiting in the incoming ring.
    pub fn has_incoming(&self) -> Result<bool, RingError> {
        self.with_incoming(|| {
            let write = self.load_write_index()?;
            Ok(write != self.inc.read.get())
        })
    }

    /// Publishes the incoming `read_index` after packets were consumed; returns whether
    /// to signal the host (pending-send-size protocol).
    ///
    /// The host is signalled only if the incoming ring carries the pending-send-size
    /// feature bit, `pending_send_sz` is non-zero, and the free space was below it before
    /// this commit and is at least it now. As in OpenVMM, the low 3 bits of
    /// `pending_send_sz` are ignored: some hosts ask for "ring size - 1" meaning "tell me
    /// when empty", which is never reachable since 8 bytes always stay free.
    pub fn read_done(&self) -> Result<bool, RingError> {
        self.with_incoming(|| {
            let read = self.inc.read.get();
            let committed = self.inc.committed.get();
            if read == committed {
                return Ok(false);
            }
            let ring = self.in_ring;
            // Packet reads are done before the space is handed back (release store).
            self.store(&ring, RING_READ_INDEX_OFFSET, index_u32(read))?;
            let freed = ring.distance(committed, read);
            self.inc.committed.set(read);
            // Order the index store before the loads below (Linux `hv_pkt_iter_close`).
            fence(Ordering::SeqCst);
            let features = self.load(&ring, RING_FEATURE_BITS_OFFSET)?;
            if features & RING_FEATURE_PENDING_SEND_SZ == 0 {
                return Ok(false);
            }
            let pending = self.load(&ring, RING_PENDING_SEND_SZ_OFFSET)? & !7;
            if pending == 0 {
                return Ok(false);
            }
            let write = self.load_write_index()?;
            let now_free = ring.free(write, read);
            // The host may already have used some freed space; then it was not blocked
            // on exactly this amount, and a spare signal is harmless.
            let before_free = now_free.saturating_sub(freed);
            let pending = pending as usize;
            let signal = before_free < pending && now_free >= pending;
            if signal {
                Counters::bump(&self.inc.stats.signals, 1);
            }
            Ok(signal)
        })
    }

    /// Sets (`true`) or clears the incoming ring's `interrupt_mask`: while set the host
    /// does not signal for new packets. Prefer [`unmask_and_check`](Self::unmask_and_check)
    /// for clearing before a sleep.
    pub fn set_interrupt_mask(&self, masked: bool) -> Result<(), RingError> {
        self.store(&self.in_ring, RING_INTERRUPT_MASK_OFFSET, u32::from(masked))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Clears the interrupt mask and then looks for packets again: returns `true` if one
    /// is waiting (keep draining; mask again if desired), `false` if the caller may sleep
    /// until the host signals. Checking after unmasking closes the window in which the
    /// host wrote a packet while the mask was still set and so did not signal.
    pub fn unmask_and_check(&self) -> Result<bool, RingError> {
        self.with_incoming(|| {
            self.store(&self.in_ring, RING_INTERRUPT_MASK_OFFSET, 0)?;
            // The mask store must be visible before we sample the write index.
            fence(Ordering::SeqCst);
            let write = self.load_write_index()?;
            Ok(write != self.inc.read.get())
        })
    }

    /// Runs `f` on the incoming ring, refusing all work once the ring failed and
    /// recording a corruption `f` reports.
    fn with_incoming<T>(&self, f: impl FnOnce() -> Result<T, RingError>) -> Result<T, RingError> {
        self.inc.check()?;
        f().map_err(|e| self.inc.fail(e))
    }

    /// Loads and checks the host's `write_index` of the incoming ring: in range, aligned,
    /// and not behind data it announced before (the bytes from our read position to the
    /// host's write position only grow until we consume).
    fn load_write_index(&self) -> Result<usize, RingError> {
        let ring = self.in_ring;
        let raw = self.load(&ring, RING_WRITE_INDEX_OFFSET)?;
        let bad = RingError::BadWriteIndex { index: raw };
        let write = check_ring_index(raw, ring.size_u32()).map_err(|_| bad)? as usize;
        let read = self.inc.read.get();
        if ring.distance(read, write) < ring.distance(read, self.inc.write.get()) {
            return Err(bad);
        }
        self.inc.write.set(write);
        Ok(write)
    }

    /// Finds and checks the next incoming packet among those announced up to `write`
    /// (a validated write index).
    fn next_packet(&self, write: usize) -> Result<Option<NextPacket>, RingError> {
        let ring = self.in_ring;
        let read = self.inc.read.get();
        if write == read {
            return Ok(None);
        }
        let available = ring.distance(read, write);
        if available < MIN_RING_PACKET {
            return Err(RingError::PacketPastWriteIndex {
                needed: MIN_RING_PACKET,
                available,
            });
        }
        let mut descriptor = VmPacketDescriptor::new_zeroed();
        self.get(&ring, read, descriptor.as_mut_bytes())?;
        let len = self.check_descriptor(&descriptor, available)?;
        Ok(Some(NextPacket {
            descriptor,
            start: read,
            len,
        }))
    }

    /// The framing checks of an incoming descriptor: `offset8 >= 2`, `len8 >= offset8`,
    /// and the packet with its trailer fits the ring and the `available` bytes the host
    /// announced. Returns the packet length (trailer excluded).
    fn check_descriptor(
        &self,
        descriptor: &VmPacketDescriptor,
        available: usize,
    ) -> Result<usize, RingError> {
        let (offset8, len8) = (descriptor.offset8.get(), descriptor.len8.get());
        if offset8 < 2 || len8 < offset8 {
            return Err(RingError::BadDescriptor { offset8, len8 });
        }
        let len = usize::from(len8) * 8;
        let needed = len + PACKET_TRAILER_SIZE;
        let max = self.in_ring.max_ring_packet();
        if needed > max {
            return Err(RingError::PacketTooLarge { len: needed, max });
        }
        if needed > available {
            return Err(RingError::PacketPastWriteIndex { needed, available });
        }
        Ok(len)
    }

    /// Copies a checked packet into `buf`: the validated descriptor, then the rest from
    /// the ring (the descriptor is not fetched twice).
    fn copy_packet(&self, next: &NextPacket, buf: &mut [u8]) -> Result<(), RingError> {
        let ring = self.in_ring;
        let dst = buf
            .get_mut(..next.len)
            .ok_or(RingError::BufferTooSmall { needed: next.len })?;
        let (head, rest) = dst.split_at_mut(PACKET_DESCRIPTOR_SIZE.min(next.len));
        head.copy_from_slice(&next.descriptor.as_bytes()[..head.len()]);
        let rest_start = ring.advance(next.start, PACKET_DESCRIPTOR_SIZE);
        self.get(&ring, rest_start, rest)
    }

    fn consume(&self, next: &NextPacket) {
        let ring_len = next.len + PACKET_TRAILER_SIZE;
        self.inc
            .read
            .set(self.in_ring.advance(next.start, ring_len));
        Counters::bump(&self.inc.stats.packets, 1);
        Counters::bump(&self.inc.stats.bytes, ring_len as u64);
    }

    // -----------------------------------------------------------------------------------
    // Memory access.

    fn load(&self, ring: &RingGeometry, field: usize) -> Result<u32, RingError> {
        Ok(self.buffer.load_u32(ring.control + field)?)
    }

    fn store(&self, ring: &RingGeometry, field: usize, value: u32) -> Result<(), RingError> {
        Ok(self.buffer.store_u32(ring.control + field, value)?)
    }

    /// Writes `bytes` at data position `pos`, wrapping at the end; returns the position
    /// after them.
    fn put(&self, ring: &RingGeometry, pos: usize, bytes: &[u8]) -> Result<usize, RingError> {
        if pos >= ring.size || bytes.len() > ring.size {
            return Err(out_of_ring(pos, bytes.len()));
        }
        let buffer: &dyn SharedBuffer = &*self.buffer;
        let (first, second) = bytes.split_at(bytes.len().min(ring.size - pos));
        buffer.write(ring.data + pos, first)?;
        if !second.is_empty() {
            buffer.write(ring.data, second)?;
        }
        Ok(ring.advance(pos, bytes.len()))
    }

    /// Reads `buf.len()` bytes at data position `pos`, wrapping at the end.
    fn get(&self, ring: &RingGeometry, pos: usize, buf: &mut [u8]) -> Result<(), RingError> {
        if pos >= ring.size || buf.len() > ring.size {
            return Err(out_of_ring(pos, buf.len()));
        }
        let buffer: &dyn SharedBuffer = &*self.buffer;
        let split = buf.len().min(ring.size - pos);
        let (first, second) = buf.split_at_mut(split);
        buffer.read(ring.data + pos, first)?;
        if !second.is_empty() {
            buffer.read(ring.data, second)?;
        }
        Ok(())
    }
}

/// The packets the host had announced when [`RingPair::begin_read`] looked: read them
/// one by one with [`read_packet`](Self::read_packet), then publish the space with
/// [`RingPair::read_done`].
///
/// The snapshot was validated when it was taken, and every descriptor is checked against
/// it exactly as [`RingPair::read`] checks against a fresh `write_index`, so a host that
/// moves its index meanwhile only delays packets to the next batch. Reading through
/// [`RingPair::read`] and friends while a batch is open is allowed (they advance the
/// same read position).
#[derive(Debug)]
pub struct IncomingBatch<'r> {
    ring: &'r RingPair,
    /// The host's `write_index` at the start of the batch.
    end: usize,
}

impl<'r> IncomingBatch<'r> {
    /// Whether every packet of the snapshot was consumed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.ring.inc.read.get() == self.end
    }

    /// Copies the next packet of the batch into `buf`, consumes it and parses the copy
    /// ([`Packet::parse`]); `None` once the batch is done. The descriptor is read into
    /// `buf` once and checked there. A too-small `buf` consumes nothing
    /// ([`RingError::BufferTooSmall`]); a packet the parser rejects is consumed and
    /// reported as [`RingError::BadPacket`].
    #[inline]
    pub fn read_packet<'b>(&mut self, buf: &'b mut [u8]) -> Result<Option<Packet<'b>>, RingError> {
        let ring = self.ring;
        ring.inc.check()?;
        let read = ring.inc.read.get();
        if read == self.end {
            return Ok(None);
        }
        match self.fetch(read, buf) {
            Ok(len) => parse_copied(buf, len),
            Err(e) => Err(ring.inc.fail(e)),
        }
    }

    /// Copies the packet at `read` into `buf` and consumes it; returns its length.
    #[inline]
    fn fetch(&self, read: usize, buf: &mut [u8]) -> Result<usize, RingError> {
        let ring = self.ring;
        let geometry = ring.in_ring;
        let available = geometry.distance(read, self.end);
        if available < MIN_RING_PACKET {
            return Err(RingError::PacketPastWriteIndex {
                needed: MIN_RING_PACKET,
                available,
            });
        }
        // One copy for the common small packets: the descriptor and whatever follows it
        // up to READ_AHEAD bytes, all of it announced by the host (bytes past this packet
        // are simply read again as part of the next one).
        let first = available.min(READ_AHEAD).min(buf.len());
        let Some(head) = buf
            .get_mut(..first)
            .filter(|h| h.len() >= PACKET_DESCRIPTOR_SIZE)
        else {
            // Not even room for the descriptor: look at it without consuming.
            let needed = ring
                .next_packet(self.end)?
                .map_or(PACKET_DESCRIPTOR_SIZE, |next| next.len);
            return Err(RingError::BufferTooSmall { needed });
        };
        ring.get(&geometry, read, head)?;
        let (descriptor, _) =
            VmPacketDescriptor::read_from_prefix(head).map_err(|_| RingError::BufferTooSmall {
                needed: PACKET_DESCRIPTOR_SIZE,
            })?;
        let len = ring.check_descriptor(&descriptor, available)?;
        if len > first {
            let rest = buf
                .get_mut(first..len)
                .ok_or(RingError::BufferTooSmall { needed: len })?;
            ring.get(&geometry, geometry.advance(read, first), rest)?;
        }
        ring.consume(&NextPacket {
            descriptor,
            start: read,
            len,
        });
        Ok(len)
    }

    /// Consumes the next packet of the batch without copying it (e.g. one too large to
    /// read); returns its length, or `None` once the batch is done.
    pub fn skip(&mut self) -> Result<Option<usize>, RingError> {
        let ring = self.ring;
        let end = self.end;
        ring.with_incoming(|| {
            let Some(next) = ring.next_packet(end)? else {
                return Ok(None);
            };
            ring.consume(&next);
            Ok(Some(next.len))
        })
    }
}

/// Like [`IncomingBatch`], but reading in bulk: [`next`](Self::next) copies up to
/// `window` bytes of packets out of the ring at once into the caller's buffer and hands
/// them over one by one from that private copy, so that a poll handling dozens of small
/// packets (completions, receive indications) makes one copy out of shared memory per
/// window instead of one or two per packet. Every descriptor is checked in the copy
/// exactly as [`IncomingBatch::read_packet`] checks it, and only the copy is used. Made
/// by [`RingPair::begin_read_windowed`]; publish the space with
/// [`RingPair::read_done`] afterwards.
#[derive(Debug)]
pub struct WindowedBatch<'r, 'b> {
    ring: &'r RingPair,
    /// The host's `write_index` at the start of the batch.
    end: usize,
    buf: &'b mut Vec<u8>,
    /// Bytes copied per refill (at least one small packet).
    window: usize,
    /// Ring position of `buf[0]`.
    have_start: usize,
    /// Bytes of `buf` that hold ring bytes.
    have: usize,
}

impl WindowedBatch<'_, '_> {
    /// Whether every packet of the snapshot was consumed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.ring.inc.read.get() == self.end
    }

    /// Consumes the next packet of the batch and hands it over parsed
    /// ([`Incoming::Packet`]), rejected by the parser ([`Incoming::Malformed`]) or, if
    /// it is longer than `max_packet`, unread ([`Incoming::TooLong`]); `None` once the
    /// batch is done.
    #[inline]
    pub fn next(&mut self, max_packet: usize) -> Result<Option<Incoming<'_>>, RingError> {
        Ok(self.next_raw(max_packet)?.map(|raw| match raw {
            RawIncoming::Packet(raw) => match raw.parse() {
                Ok(packet) => Incoming::Packet(packet),
                Err(e) => Incoming::Malformed(e),
            },
            RawIncoming::TooLong(len) => Incoming::TooLong(len),
        }))
    }

    /// Consumes the next packet of the batch and hands over its bytes unparsed
    /// ([`RawIncoming::Packet`], for a caller with a fast path for its common packets
    /// that falls back on [`Packet::parse`]) or, if it is longer than `max_packet`, its
    /// length; `None` once the batch is done.
    #[inline]
    pub fn next_raw(&mut self, max_packet: usize) -> Result<Option<RawIncoming<'_>>, RingError> {
        let ring = self.ring;
        ring.inc.check()?;
        match self.next_inner(max_packet) {
            Ok(Some((descriptor, Some(at), len))) => Ok(Some(match self.buf.get(at..at + len) {
                Some(bytes) => RawIncoming::Packet(RawPacket { descriptor, bytes }),
                None => RawIncoming::TooLong(len),
            })),
            Ok(Some((_, None, len))) => Ok(Some(RawIncoming::TooLong(len))),
            Ok(None) => Ok(None),
            Err(e) => Err(ring.inc.fail(e)),
        }
    }

    /// Finds, checks and consumes the next packet; returns its descriptor, where it lies
    /// in `buf` and its length (a packet longer than `max_packet` is consumed unread: no
    /// place).
    #[inline]
    fn next_inner(
        &mut self,
        max_packet: usize,
    ) -> Result<Option<(VmPacketDescriptor, Option<usize>, usize)>, RingError> {
        let ring = self.ring;
        let geometry = ring.in_ring;
        // Whether the copy was just taken to hold the whole packet at the read position
        // (as long as its descriptor said when the copy was taken).
        let mut sized_for_packet = false;
        loop {
            let pos = ring.inc.read.get();
            if pos == self.end {
                return Ok(None);
            }
            let available = geometry.distance(pos, self.end);
            if available < MIN_RING_PACKET {
                return Err(RingError::PacketPastWriteIndex {
                    needed: MIN_RING_PACKET,
                    available,
                });
            }
            let at = geometry.distance(self.have_start, pos);
            if at + PACKET_DESCRIPTOR_SIZE > self.have {
                self.refill(pos, available.min(self.window))?;
                continue;
            }
            let (descriptor, _) = VmPacketDescriptor::read_from_prefix(&self.buf[at..self.have])
                .map_err(|_| out_of_ring(at, PACKET_DESCRIPTOR_SIZE))?;
            let len = ring.check_descriptor(&descriptor, available)?;
            let next = NextPacket {
                descriptor,
                start: pos,
                len,
            };
            if len > max_packet {
                ring.consume(&next);
                return Ok(Some((descriptor, None, len)));
            }
            if at + len > self.have {
                if sized_for_packet {
                    // The copy was taken to hold this very packet, and its descriptor
                    // (read from that copy) now claims more: the host rewrote it.
                    return Err(RingError::BadDescriptor {
                        offset8: descriptor.offset8.get(),
                        len8: descriptor.len8.get(),
                    });
                }
                // `len` and its trailer fit `available`, so the copy holds the packet.
                self.refill(pos, available.min(self.window.max(len)))?;
                sized_for_packet = true;
                continue;
            }
            ring.consume(&next);
            return Ok(Some((descriptor, Some(at), len)));
        }
    }

    /// Copies `n` ring bytes from `pos` to the start of `buf`.
    fn refill(&mut self, pos: usize, n: usize) -> Result<(), RingError> {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        self.ring.get(&self.ring.in_ring, pos, &mut self.buf[..n])?;
        self.have_start = pos;
        self.have = n;
        Ok(())
    }
}

/// A packet's bytes, descriptor included, trailer excluded, with the descriptor the ring
/// framed it by (read from these very bytes). The ring checked only that the
/// descriptor's offset and length are sane and that the packet lies within what the
/// host published; everything else is the parser's job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawPacket<'a> {
    descriptor: VmPacketDescriptor,
    bytes: &'a [u8],
}

impl<'a> RawPacket<'a> {
    /// The bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The general parse ([`Packet::parse`]), without reading the descriptor again.
    #[inline]
    pub fn parse(&self) -> Result<Packet<'a>, WireError> {
        Packet::parse_described(self.descriptor, self.bytes)
    }

    /// A plain completion's transaction id and payload ([`Packet::completion_payload`]),
    /// `None` for anything else.
    #[inline]
    pub fn completion(&self) -> Option<(u64, &'a [u8])> {
        Packet::completion_payload(&self.descriptor, self.bytes)
    }
}

/// One packet [`WindowedBatch::next_raw`] consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawIncoming<'a> {
    /// A well-framed packet.
    Packet(RawPacket<'a>),
    /// A packet longer than the caller's limit (its length), not read.
    TooLong(usize),
}

/// One packet [`WindowedBatch::next`] consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A packet [`Packet::parse`] accepted.
    Packet(Packet<'a>),
    /// A well-framed packet the parser rejected.
    Malformed(WireError),
    /// A packet longer than the caller's limit (its length), not read.
    TooLong(usize),
}

/// Parses the first `len` bytes of `buf`, a packet just copied out of the ring.
#[inline]
fn parse_copied(buf: &[u8], len: usize) -> Result<Option<Packet<'_>>, RingError> {
    let bytes = buf
        .get(..len)
        .ok_or(RingError::BufferTooSmall { needed: len })?;
    Packet::parse(bytes).map(Some).map_err(RingError::BadPacket)
}

fn out_of_ring(offset: usize, len: usize) -> RingError {
    RingError::Memory(MemoryError::OutOfBounds { offset, len })
}

/// A data position as the u32 ring index (positions are below the data size, which
/// `RingPair::new` checked fits a u32).
fn index_u32(pos: usize) -> u32 {
    u32::try_from(pos).unwrap_or(0)
}
