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
//! Sources: `shared/reference/hyperv-facts.md` 5.7, 5.9, 5.10 and
//! `shared/reference/wire-layouts.md` 2 (Linux `drivers/hv/ring_buffer.c`, OpenVMM
//! `vm/devices/vmbus/vmbus_ring`).

use alloc::rc::Rc;
use core::cell::Cell;
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
use zerocopy::{FromZeros, IntoBytes};

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

/// Guest state of the outgoing ring.
#[derive(Clone, Copy, Debug, Default)]
struct OutState {
    /// Where the next packet goes (the guest's own copy of `write_index`).
    write: usize,
    /// The host's `read_index` as last validated.
    read: usize,
    /// The first corruption seen; the ring refuses all work after it.
    failed: Option<RingError>,
    stats: RingStats,
}

/// Guest state of the incoming ring.
#[derive(Clone, Copy, Debug, Default)]
struct InState {
    /// Start of the next packet to consume (not yet published).
    read: usize,
    /// The `read_index` value last published to the host.
    committed: usize,
    /// The host's `write_index` as last validated.
    write: usize,
    /// The first corruption seen; the ring refuses all work after it.
    failed: Option<RingError>,
    stats: RingStats,
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
    out: Cell<OutState>,
    inc: Cell<InState>,
}

impl fmt::Debug for RingPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingPair")
            .field("outgoing_pages", &self.outgoing_pages)
            .field("incoming_pages", &self.incoming_pages())
            .field("out", &self.out.get())
            .field("in", &self.inc.get())
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
            out: Cell::new(OutState::default()),
            inc: Cell::new(InState::default()),
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
        self.out.get().stats
    }

    /// Counters of the incoming ring.
    pub fn incoming_stats(&self) -> RingStats {
        self.inc.get().stats
    }

    /// The corruption that failed the outgoing ring, if any.
    pub fn outgoing_failure(&self) -> Option<RingError> {
        self.out.get().failed
    }

    /// The corruption that failed the incoming ring, if any.
    pub fn incoming_failure(&self) -> Option<RingError> {
        self.inc.get().failed
    }

    // -----------------------------------------------------------------------------------
    // Outgoing ring.

    /// Writes one packet to the outgoing ring and publishes it.
    ///
    /// Refuses with [`RingError::Full`] (writing nothing) unless the free space, which
    /// always keeps 8 bytes back, holds the whole packet with its trailer. On success the
    /// result says whether to signal the host.
    pub fn try_write(&self, packet: &OutgoingPacket<'_>) -> Result<WriteResult, RingError> {
        let mut st = self.out.get();
        let result = self.write_packet(&mut st, packet);
        match result {
            Err(e) if e.is_corruption() => st.failed = Some(e),
            Err(RingError::Full { .. }) => st.stats.full += 1,
            Ok(WriteResult { signal: true }) => st.stats.signals += 1,
            _ => {}
        }
        self.out.set(st);
        result
    }

    /// Free bytes of the outgoing ring now (the 8-byte gap already deducted): a packet
    /// fits if its [`OutgoingPacket::ring_len`] is at most this.
    pub fn outgoing_free(&self) -> Result<usize, RingError> {
        let mut st = self.out.get();
        let result = self.load_read_index(&mut st);
        if let Err(e) = result {
            st.failed = Some(e);
        }
        self.out.set(st);
        result.map(|read| self.out_ring.free(st.write, read))
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

    fn write_packet(
        &self,
        st: &mut OutState,
        packet: &OutgoingPacket<'_>,
    ) -> Result<WriteResult, RingError> {
        if let Some(e) = st.failed {
            return Err(e);
        }
        let ring = self.out_ring;
        let layout = packet.layout()?;
        if layout.ring_len > ring.max_ring_packet() {
            return Err(RingError::OutgoingTooLarge {
                len: layout.ring_len,
                max: self.max_outgoing_packet(),
            });
        }
        let read = self.load_read_index(st)?;
        if layout.ring_len > ring.free(st.write, read) {
            return Err(RingError::Full {
                needed: layout.ring_len,
            });
        }

        let start = st.write;
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
        for piece in packet.payload {
            pos = self.put(&ring, pos, piece)?;
        }
        pos = self.put(&ring, pos, &[0u8; 8][..layout.padding.min(8)])?;
        // `start` < data size, which fits a u32 (checked in `new`).
        let trailer = PacketTrailer::new(u32::try_from(start).unwrap_or(0));
        pos = self.put(&ring, pos, trailer.as_bytes())?;

        // The packet bytes are visible before the index (release store).
        self.store(&ring, RING_WRITE_INDEX_OFFSET, index_u32(pos))?;
        st.write = pos;
        st.stats.packets += 1;
        st.stats.bytes += layout.ring_len as u64;

        // Linux `hv_need_to_signal`: the index store must be ordered before the loads of
        // the host's mask and read index, or the host could go to sleep unsignalled.
        // The packet is published now: a failed load must not turn into an error (the
        // caller could send it again), so it errs towards a spare signal instead.
        fence(Ordering::SeqCst);
        let masked = match self.load(&ring, RING_INTERRUPT_MASK_OFFSET) {
            Ok(mask) => mask != 0,
            Err(_) => false,
        };
        let was_empty = match self.load(&ring, RING_READ_INDEX_OFFSET) {
            Ok(host_read) => usize::try_from(host_read).is_ok_and(|r| r == start),
            Err(_) => true,
        };
        Ok(WriteResult {
            signal: !masked && was_empty,
        })
    }

    /// Loads and checks the host's `read_index` of the outgoing ring: in range, aligned,
    /// and no further than the guest has written.
    fn load_read_index(&self, st: &mut OutState) -> Result<usize, RingError> {
        if let Some(e) = st.failed {
            return Err(e);
        }
        let ring = self.out_ring;
        let raw = self.load(&ring, RING_READ_INDEX_OFFSET)?;
        let bad = RingError::BadReadIndex { index: raw };
        let read = check_ring_index(raw, ring.size_u32()).map_err(|_| bad)? as usize;
        // The host consumes from where it was up to our write index, never beyond.
        if ring.distance(st.read, read) > ring.distance(st.read, st.write) {
            return Err(bad);
        }
        st.read = read;
        Ok(read)
    }

    // -----------------------------------------------------------------------------------
    // Incoming ring.

    /// Copies the next incoming packet (descriptor to `len8 * 8`, trailer excluded) into
    /// `buf` without consuming it; returns its length, or `None` if the ring is empty.
    pub fn peek(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        self.with_incoming(|st| {
            let Some(next) = self.next_packet(st)? else {
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
        self.with_incoming(|st| {
            let Some(next) = self.next_packet(st)? else {
                return Ok(None);
            };
            self.consume(st, &next);
            Ok(Some(next.len))
        })
    }

    /// Copies the next incoming packet into `buf` and consumes it; returns its length, or
    /// `None` if the ring is empty. If `buf` is too small nothing is consumed
    /// ([`RingError::BufferTooSmall`] says how much is needed).
    pub fn read(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        self.with_incoming(|st| {
            let Some(next) = self.next_packet(st)? else {
                return Ok(None);
            };
            self.copy_packet(&next, buf)?;
            self.consume(st, &next);
            Ok(Some(next.len))
        })
    }

    /// Like [`read`](Self::read), then parses the copy with [`Packet::parse`]. A packet
    /// the parser rejects is consumed anyway and reported as [`RingError::BadPacket`].
    pub fn read_packet<'b>(&self, buf: &'b mut [u8]) -> Result<Option<Packet<'b>>, RingError> {
        let Some(len) = self.read(&mut *buf)? else {
            return Ok(None);
        };
        let buf: &'b [u8] = buf;
        let bytes = buf
            .get(..len)
            .ok_or(RingError::BufferTooSmall { needed: len })?;
        Packet::parse(bytes).map(Some).map_err(RingError::BadPacket)
    }

    /// Whether a packet is waiting in the incoming ring.
    pub fn has_incoming(&self) -> Result<bool, RingError> {
        self.with_incoming(|st| {
            let write = self.load_write_index(st)?;
            Ok(write != st.read)
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
        self.with_incoming(|st| {
            if st.read == st.committed {
                return Ok(false);
            }
            let ring = self.in_ring;
            // Packet reads are done before the space is handed back (release store).
            self.store(&ring, RING_READ_INDEX_OFFSET, index_u32(st.read))?;
            let freed = ring.distance(st.committed, st.read);
            st.committed = st.read;
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
            let write = self.load_write_index(st)?;
            let now_free = ring.free(write, st.read);
            // The host may already have used some freed space; then it was not blocked
            // on exactly this amount, and a spare signal is harmless.
            let before_free = now_free.saturating_sub(freed);
            let pending = pending as usize;
            let signal = before_free < pending && now_free >= pending;
            if signal {
                st.stats.signals += 1;
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
        self.with_incoming(|st| {
            self.store(&self.in_ring, RING_INTERRUPT_MASK_OFFSET, 0)?;
            // The mask store must be visible before we sample the write index.
            fence(Ordering::SeqCst);
            let write = self.load_write_index(st)?;
            Ok(write != st.read)
        })
    }

    /// Runs `f` on the incoming state, refusing all work once the ring failed and
    /// recording a corruption `f` reports.
    fn with_incoming<T>(
        &self,
        f: impl FnOnce(&mut InState) -> Result<T, RingError>,
    ) -> Result<T, RingError> {
        let mut st = self.inc.get();
        let result = match st.failed {
            Some(e) => Err(e),
            None => f(&mut st),
        };
        if let Err(e) = result {
            if e.is_corruption() {
                st.failed = Some(e);
            }
        }
        self.inc.set(st);
        result
    }

    /// Loads and checks the host's `write_index` of the incoming ring: in range, aligned,
    /// and not behind data it announced before (the bytes from our read position to the
    /// host's write position only grow until we consume).
    fn load_write_index(&self, st: &mut InState) -> Result<usize, RingError> {
        let ring = self.in_ring;
        let raw = self.load(&ring, RING_WRITE_INDEX_OFFSET)?;
        let bad = RingError::BadWriteIndex { index: raw };
        let write = check_ring_index(raw, ring.size_u32()).map_err(|_| bad)? as usize;
        if ring.distance(st.read, write) < ring.distance(st.read, st.write) {
            return Err(bad);
        }
        st.write = write;
        Ok(write)
    }

    /// Finds and checks the next incoming packet.
    fn next_packet(&self, st: &mut InState) -> Result<Option<NextPacket>, RingError> {
        let ring = self.in_ring;
        let write = self.load_write_index(st)?;
        if write == st.read {
            return Ok(None);
        }
        let available = ring.distance(st.read, write);
        if available < MIN_RING_PACKET {
            return Err(RingError::PacketPastWriteIndex {
                needed: MIN_RING_PACKET,
                available,
            });
        }
        let mut descriptor = VmPacketDescriptor::new_zeroed();
        self.get(&ring, st.read, descriptor.as_mut_bytes())?;
        let (offset8, len8) = (descriptor.offset8.get(), descriptor.len8.get());
        if offset8 < 2 || len8 < offset8 {
            return Err(RingError::BadDescriptor { offset8, len8 });
        }
        let len = usize::from(len8) * 8;
        let needed = len + PACKET_TRAILER_SIZE;
        if needed > ring.max_ring_packet() {
            return Err(RingError::PacketTooLarge {
                len: needed,
                max: ring.max_ring_packet(),
            });
        }
        if needed > available {
            return Err(RingError::PacketPastWriteIndex { needed, available });
        }
        Ok(Some(NextPacket {
            descriptor,
            start: st.read,
            len,
        }))
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

    fn consume(&self, st: &mut InState, next: &NextPacket) {
        let ring_len = next.len + PACKET_TRAILER_SIZE;
        st.read = self.in_ring.advance(next.start, ring_len);
        st.stats.packets += 1;
        st.stats.bytes += ring_len as u64;
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
        let (first, second) = bytes.split_at(bytes.len().min(ring.size - pos));
        self.buffer.write(ring.data + pos, first)?;
        if !second.is_empty() {
            self.buffer.write(ring.data, second)?;
        }
        Ok(ring.advance(pos, bytes.len()))
    }

    /// Reads `buf.len()` bytes at data position `pos`, wrapping at the end.
    fn get(&self, ring: &RingGeometry, pos: usize, buf: &mut [u8]) -> Result<(), RingError> {
        if pos >= ring.size || buf.len() > ring.size {
            return Err(out_of_ring(pos, buf.len()));
        }
        let split = buf.len().min(ring.size - pos);
        let (first, second) = buf.split_at_mut(split);
        self.buffer.read(ring.data + pos, first)?;
        if !second.is_empty() {
            self.buffer.read(ring.data, second)?;
        }
        Ok(())
    }
}

fn out_of_ring(offset: usize, len: usize) -> RingError {
    RingError::Memory(MemoryError::OutOfBounds { offset, len })
}

/// A data position as the u32 ring index (positions are below the data size, which
/// `RingPair::new` checked fits a u32).
fn index_u32(pos: usize) -> u32 {
    u32::try_from(pos).unwrap_or(0)
}
