//! The host ends of a channel's ring pair.
//!
//! A channel's ring GPADL is `[guest-to-host ring][host-to-guest ring]`, split at the
//! OPENCHANNEL `downstream_ringbuffer_pageoffset`; each ring is a 4096-byte control page
//! followed by the data area (hyperv-facts.md 5.7, 5.9). The host *consumes* the first
//! ring and *produces* into the second. This is written from the wire formats alone
//! (`hvnet_wire::ring`), not from the guest's ring code, so the two implementations check
//! each other.
//!
//! The guest is not trusted: every index it wrote passes [`check_ring_index`] and every
//! descriptor [`VmPacketDescriptor::check`] before it is used, and the host keeps its own
//! copies of the indices it owns (the guest could scribble over them). A framing error
//! (bad index, bad descriptor, packet running past the write index) breaks the ring for
//! good, as on a real host; a well-framed packet whose contents do not parse is skipped
//! and reported.
//!
//! Signalling follows Linux `ring_buffer.c` and OpenVMM `vmbus_ring`:
//! * producing: signal the guest only if its `interrupt_mask` is clear and the ring was
//!   empty before this packet (its read index equals our old write index);
//! * producing into a full ring: set `pending_send_sz` (if the guest set the feature bit)
//!   so the guest signals us when it has made room;
//! * consuming: signal the guest if it set the feature bit and a non-zero
//!   `pending_send_sz`, and free space went from `<= pending_send_sz` to `> pending_send_sz`.

use hvnet_wire::ring::{
    check_ring_index, encode_completion, encode_inband, encode_xfer_pages, Packet, PacketKind,
    PacketTrailer, VmPacketDescriptor, VmPacketType, VmTransferPageRange, PACKET_DESCRIPTOR_SIZE,
    PACKET_TRAILER_SIZE, RING_FEATURE_BITS_OFFSET, RING_FEATURE_PENDING_SEND_SZ,
    RING_INTERRUPT_MASK_OFFSET, RING_PENDING_SEND_SZ_OFFSET, RING_READ_INDEX_OFFSET,
    RING_WRITE_INDEX_OFFSET,
};
use hvnet_wire::WireError;
use zerocopy::{FromBytes, IntoBytes};

use crate::memory::{GuestMemory, MemError, PAGE_SIZE};

/// Largest packet the host builds (descriptor + headers + payload); far above anything a
/// VMBus device sends, small enough to keep scratch buffers cheap.
const MAX_HOST_PACKET: usize = 64 * 1024;

/// How the guest broke a ring (the ring is unusable afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingCorruption {
    /// The guest's write index (guest-to-host ring) is out of range or not 8-aligned.
    BadWriteIndex(u32),
    /// The guest's read index (host-to-guest ring) is out of range or not 8-aligned.
    BadReadIndex(u32),
    /// Fewer bytes available than a descriptor and trailer need.
    TruncatedPacket {
        /// Bytes between our read index and the guest's write index.
        available: u32,
    },
    /// The descriptor breaks its own invariants (offset8, len8, flags).
    BadDescriptor(WireError),
    /// The packet (plus trailer) runs past the guest's write index.
    PacketOverrun {
        /// Bytes the packet claims, trailer included.
        needed: usize,
        /// Bytes available.
        available: u32,
    },
    /// A ring page is not guest RAM (e.g. freed and unmapped).
    Memory(MemError),
    /// The page list cannot hold two rings of a control page and a data page each, split
    /// at the given offset.
    BadLayout,
}

impl std::fmt::Display for RingCorruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingCorruption::BadWriteIndex(i) => write!(f, "bad guest write index {i:#x}"),
            RingCorruption::BadReadIndex(i) => write!(f, "bad guest read index {i:#x}"),
            RingCorruption::TruncatedPacket { available } => {
                write!(f, "only {available} bytes available for a packet")
            }
            RingCorruption::BadDescriptor(e) => write!(f, "bad packet descriptor: {e}"),
            RingCorruption::PacketOverrun { needed, available } => {
                write!(f, "packet of {needed} bytes but only {available} available")
            }
            RingCorruption::Memory(e) => write!(f, "ring memory: {e}"),
            RingCorruption::BadLayout => f.write_str("ring pages cannot be split into two rings"),
        }
    }
}

/// Why a ring operation did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The host-to-guest ring has no room; `pending_send_sz` has been set (if the guest
    /// supports it) and the guest will signal when it has made room.
    Full {
        /// Bytes the packet needs, trailer included.
        needed: usize,
        /// Free bytes (a write needs strictly more than `needed`).
        free: usize,
    },
    /// The ring is broken (see [`RingCorruption`]); it stays broken.
    Broken(RingCorruption),
    /// A well-framed packet whose contents are invalid; it has been consumed and skipped.
    /// Keep reading.
    MalformedPacket(WireError),
    /// The host tried to build an impossible packet (too long, bad ranges).
    Encode(WireError),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Full { needed, free } => {
                write!(f, "ring full: need {needed} bytes, {free} free")
            }
            RingError::Broken(c) => write!(f, "ring broken: {c}"),
            RingError::MalformedPacket(e) => write!(f, "malformed packet skipped: {e}"),
            RingError::Encode(e) => write!(f, "cannot encode packet: {e}"),
        }
    }
}

impl std::error::Error for RingError {}

/// One GPA range of a GPA-direct packet, copied out of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedGpaRange {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset into the first page.
    pub byte_offset: u32,
    /// Frames spanned.
    pub pfns: Vec<u64>,
}

/// What a packet carries besides its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingPacketKind {
    /// `VM_PKT_DATA_INBAND`.
    InBand,
    /// `VM_PKT_COMP`.
    Completion,
    /// `VM_PKT_DATA_USING_XFER_PAGES`: `(byte_count, byte_offset)` ranges.
    TransferPages {
        /// Transfer page set id.
        pageset_id: u16,
        /// The ranges.
        ranges: Vec<(u32, u32)>,
    },
    /// `VM_PKT_DATA_USING_GPA_DIRECT`.
    GpaDirect {
        /// The ranges.
        ranges: Vec<OwnedGpaRange>,
    },
}

/// A packet the guest wrote, copied out of the ring and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPacket {
    /// Packet type.
    pub packet_type: VmPacketType,
    /// Transaction id.
    pub trans_id: u64,
    /// Whether the guest asked for a completion.
    pub completion_requested: bool,
    /// Type-specific data.
    pub kind: RingPacketKind,
    /// Bytes from `offset8 * 8` to `len8 * 8`: the payload including its padding to 8.
    pub payload: Vec<u8>,
}

/// Counters of one ring pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Packets read from the guest.
    pub packets_in: u64,
    /// Packets written to the guest.
    pub packets_out: u64,
    /// Well-framed but malformed guest packets skipped.
    pub malformed_in: u64,
    /// Writes refused because the host-to-guest ring was full.
    pub full: u64,
    /// Times the guest had to be signalled (data written to an empty ring with interrupts
    /// unmasked, or room made for a blocked guest writer).
    pub signals_to_guest: u64,
    /// Writes where the guest had masked interrupts (no signal).
    pub masked_writes: u64,
}

/// Page list and size of one ring (control page + data pages).
#[derive(Clone, Debug)]
struct RingPages {
    control: u64,
    data: Vec<u64>,
    size: u32,
}

impl RingPages {
    fn new(pages: &[u64]) -> Option<Self> {
        let (&control, data) = pages.split_first()?;
        if data.is_empty() {
            return None;
        }
        let size = u32::try_from(data.len().checked_mul(PAGE_SIZE)?).ok()?;
        Some(RingPages {
            control,
            data: data.to_vec(),
            size,
        })
    }

    fn control_gpa(&self, offset: usize) -> u64 {
        self.control * PAGE_SIZE as u64 + offset as u64
    }

    /// Copies from the data area starting at `offset`, wrapping at the end.
    fn read(&self, mem: &GuestMemory, offset: u32, buf: &mut [u8]) -> Result<(), MemError> {
        let size = self.size as usize;
        let mut pos = offset as usize % size;
        let mut done = 0;
        while done < buf.len() {
            let page = self.data[pos / PAGE_SIZE];
            let in_page = pos % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(buf.len() - done);
            mem.read(
                page * PAGE_SIZE as u64 + in_page as u64,
                &mut buf[done..done + n],
            )?;
            done += n;
            pos = (pos + n) % size;
        }
        Ok(())
    }

    /// Copies into the data area starting at `offset`, wrapping at the end.
    fn write(&self, mem: &GuestMemory, offset: u32, data: &[u8]) -> Result<(), MemError> {
        let size = self.size as usize;
        let mut pos = offset as usize % size;
        let mut done = 0;
        while done < data.len() {
            let page = self.data[pos / PAGE_SIZE];
            let in_page = pos % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(data.len() - done);
            mem.write(
                page * PAGE_SIZE as u64 + in_page as u64,
                &data[done..done + n],
            )?;
            done += n;
            pos = (pos + n) % size;
        }
        Ok(())
    }
}

/// The host ends of one open channel: reads the guest-to-host ring, writes the
/// host-to-guest ring.
#[derive(Debug)]
pub struct HostRing {
    mem: GuestMemory,
    incoming: RingPages,
    outgoing: RingPages,
    /// Our read index into `incoming` (the copy in guest memory is only published).
    in_read: u32,
    /// Our write index into `outgoing`.
    out_write: u32,
    /// Whether we set `pending_send_sz` on the outgoing ring and must clear it.
    out_pending_set: bool,
    broken: Option<RingCorruption>,
    /// Corruption not yet reported by the host as a violation.
    unreported: Option<RingCorruption>,
    /// Malformed-packet errors not yet reported.
    unreported_malformed: Vec<WireError>,
    signal_guest: bool,
    stats: RingStats,
}

impl HostRing {
    /// Builds the host ends over the ring GPADL's pages, split at `downstream_offset`
    /// pages. Each ring needs its control page and at least one data page. Reads the
    /// initial indices the guest left in the control pages and validates them.
    pub fn new(
        mem: GuestMemory,
        pages: &[u64],
        downstream_offset: usize,
    ) -> Result<Self, RingCorruption> {
        let bad = RingCorruption::BadLayout;
        let (inc, out) = pages.split_at_checked(downstream_offset).ok_or(bad)?;
        let incoming = RingPages::new(inc).ok_or(bad)?;
        let outgoing = RingPages::new(out).ok_or(bad)?;
        let mut ring = HostRing {
            mem,
            incoming,
            outgoing,
            in_read: 0,
            out_write: 0,
            out_pending_set: false,
            broken: None,
            unreported: None,
            unreported_malformed: Vec::new(),
            signal_guest: false,
            stats: RingStats::default(),
        };
        // The guest initialises its rings; adopt the indices we own, after checking them.
        let r = ring.load(true, RING_READ_INDEX_OFFSET)?;
        ring.in_read =
            check_ring_index(r, ring.incoming.size).map_err(|_| RingCorruption::BadReadIndex(r))?;
        let w = ring.load(false, RING_WRITE_INDEX_OFFSET)?;
        ring.out_write = check_ring_index(w, ring.outgoing.size)
            .map_err(|_| RingCorruption::BadWriteIndex(w))?;
        Ok(ring)
    }

    fn load(&self, incoming: bool, offset: usize) -> Result<u32, RingCorruption> {
        let ring = if incoming {
            &self.incoming
        } else {
            &self.outgoing
        };
        self.mem
            .load_u32(ring.control_gpa(offset))
            .map_err(RingCorruption::Memory)
    }

    fn store(&self, incoming: bool, offset: usize, value: u32) -> Result<(), RingCorruption> {
        let ring = if incoming {
            &self.incoming
        } else {
            &self.outgoing
        };
        self.mem
            .store_u32(ring.control_gpa(offset), value)
            .map_err(RingCorruption::Memory)
    }

    fn fail(&mut self, c: RingCorruption) -> RingError {
        if self.broken.is_none() {
            self.broken = Some(c);
            self.unreported = Some(c);
        }
        RingError::Broken(self.broken.unwrap_or(c))
    }

    fn check(&self) -> Result<(), RingError> {
        match self.broken {
            Some(c) => Err(RingError::Broken(c)),
            None => Ok(()),
        }
    }

    /// Data bytes of the guest-to-host ring.
    pub fn incoming_size(&self) -> u32 {
        self.incoming.size
    }

    /// Data bytes of the host-to-guest ring.
    pub fn outgoing_size(&self) -> u32 {
        self.outgoing.size
    }

    /// Counters.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Why the ring is broken, if it is.
    pub fn broken(&self) -> Option<RingCorruption> {
        self.broken
    }

    /// Whether the guest set the pending-send-size feature bit on its outgoing ring.
    fn feature(&self, incoming: bool) -> Result<bool, RingCorruption> {
        Ok(self.load(incoming, RING_FEATURE_BITS_OFFSET)? & RING_FEATURE_PENDING_SEND_SZ != 0)
    }

    /// Bytes the guest has written that we have not read yet (0 if its index is bad).
    pub fn incoming_available(&self) -> u32 {
        let size = self.incoming.size;
        match self
            .load(true, RING_WRITE_INDEX_OFFSET)
            .ok()
            .and_then(|w| check_ring_index(w, size).ok())
        {
            Some(w) => {
                ((u64::from(w) + u64::from(size) - u64::from(self.in_read)) % u64::from(size))
                    as u32
            }
            None => 0,
        }
    }

    /// Masks (or unmasks) the guest's signals for the guest-to-host ring, as a host
    /// consumer does while draining. A correct guest does not signal while it is set.
    pub fn set_incoming_interrupt_mask(&mut self, masked: bool) -> Result<(), RingError> {
        self.check()?;
        self.store(true, RING_INTERRUPT_MASK_OFFSET, u32::from(masked))
            .map_err(|c| self.fail(c))
    }

    /// Whether the host currently masks guest signals on the guest-to-host ring (as
    /// stored in guest memory).
    pub fn incoming_interrupt_masked(&self) -> bool {
        self.load(true, RING_INTERRUPT_MASK_OFFSET)
            .is_ok_and(|m| m != 0)
    }

    /// Reads the next packet the guest wrote, or `None` if the ring is empty.
    ///
    /// Framing errors break the ring ([`RingError::Broken`]); a packet that is framed
    /// correctly but does not parse is consumed and reported as
    /// [`RingError::MalformedPacket`] (call again for the next one).
    pub fn read_packet(&mut self) -> Result<Option<RingPacket>, RingError> {
        self.check()?;
        let size = self.incoming.size;
        let w = self
            .load(true, RING_WRITE_INDEX_OFFSET)
            .map_err(|c| self.fail(c))?;
        let w =
            check_ring_index(w, size).map_err(|_| self.fail(RingCorruption::BadWriteIndex(w)))?;
        let r = self.in_read;
        if w == r {
            return Ok(None);
        }
        let available = ((u64::from(w) + u64::from(size) - u64::from(r)) % u64::from(size)) as u32;
        if (available as usize) < PACKET_DESCRIPTOR_SIZE + PACKET_TRAILER_SIZE {
            return Err(self.fail(RingCorruption::TruncatedPacket { available }));
        }
        let mut desc_bytes = [0u8; PACKET_DESCRIPTOR_SIZE];
        self.incoming
            .read(&self.mem, r, &mut desc_bytes)
            .map_err(|e| self.fail(RingCorruption::Memory(e)))?;
        let desc = VmPacketDescriptor::read_from_bytes(&desc_bytes)
            .map_err(|_| self.fail(RingCorruption::TruncatedPacket { available }))?;
        desc.check()
            .map_err(|e| self.fail(RingCorruption::BadDescriptor(e)))?;
        let needed = desc.ring_len();
        if needed > available as usize {
            return Err(self.fail(RingCorruption::PacketOverrun { needed, available }));
        }
        let mut bytes = vec![0u8; desc.packet_len()];
        self.incoming
            .read(&self.mem, r, &mut bytes)
            .map_err(|e| self.fail(RingCorruption::Memory(e)))?;

        // Consume the packet (and its trailer) before looking inside it: a packet with bad
        // contents is still a whole packet.
        let new_r = ((u64::from(r) + needed as u64) % u64::from(size)) as u32;
        let free_before = size - available;
        let free_after = free_before + needed as u32;
        self.in_read = new_r;
        self.store(true, RING_READ_INDEX_OFFSET, new_r)
            .map_err(|c| self.fail(c))?;
        self.check_pending_send(free_before, free_after)
            .map_err(|c| self.fail(c))?;

        let packet = match Packet::parse(&bytes) {
            Ok(p) => p,
            Err(e) => {
                self.stats.malformed_in += 1;
                self.unreported_malformed.push(e);
                return Err(RingError::MalformedPacket(e));
            }
        };
        self.stats.packets_in += 1;
        let kind = match packet.kind {
            PacketKind::InBand => RingPacketKind::InBand,
            PacketKind::Completion => RingPacketKind::Completion,
            PacketKind::TransferPages { header, ranges } => RingPacketKind::TransferPages {
                pageset_id: header.xfer_pageset_id.get(),
                ranges: ranges
                    .iter()
                    .map(|r| (r.byte_count.get(), r.byte_offset.get()))
                    .collect(),
            },
            PacketKind::GpaDirect { ranges, .. } => RingPacketKind::GpaDirect {
                ranges: ranges
                    .iter()
                    .map(|r| OwnedGpaRange {
                        byte_count: r.byte_count,
                        byte_offset: r.byte_offset,
                        pfns: r.pfns.iter().map(|p| p.get()).collect(),
                    })
                    .collect(),
            },
        };
        Ok(Some(RingPacket {
            packet_type: packet.descriptor.packet_type(),
            trans_id: packet.trans_id(),
            completion_requested: packet.descriptor.completion_requested(),
            kind,
            payload: packet.payload.to_vec(),
        }))
    }

    /// The consumer's half of the pending-send-size protocol (Linux
    /// `hv_pkt_iter_close`): signal a blocked guest writer once free space crosses the
    /// size it asked for.
    fn check_pending_send(
        &mut self,
        free_before: u32,
        free_after: u32,
    ) -> Result<(), RingCorruption> {
        if !self.feature(true)? {
            return Ok(());
        }
        let pending = self.load(true, RING_PENDING_SEND_SZ_OFFSET)?;
        if pending != 0 && free_before <= pending && free_after > pending {
            self.signal_guest = true;
            self.stats.signals_to_guest += 1;
        }
        Ok(())
    }

    /// Writes a `VM_PKT_DATA_INBAND` packet to the guest.
    pub fn write_inband(
        &mut self,
        trans_id: u64,
        completion_requested: bool,
        payload: &[u8],
    ) -> Result<(), RingError> {
        let mut buf = scratch(payload.len() + PACKET_DESCRIPTOR_SIZE)?;
        let n = encode_inband(&mut buf, trans_id, completion_requested, payload)
            .map_err(RingError::Encode)?;
        self.write_raw(&buf[..n])
    }

    /// Writes a `VM_PKT_COMP` completion for `trans_id`.
    pub fn write_completion(&mut self, trans_id: u64, payload: &[u8]) -> Result<(), RingError> {
        let mut buf = scratch(payload.len() + PACKET_DESCRIPTOR_SIZE)?;
        let n = encode_completion(&mut buf, trans_id, payload).map_err(RingError::Encode)?;
        self.write_raw(&buf[..n])
    }

    /// Writes a `VM_PKT_DATA_USING_XFER_PAGES` packet; `ranges` are `(byte_count,
    /// byte_offset)` pairs into transfer page set `pageset_id`.
    pub fn write_xfer_pages(
        &mut self,
        trans_id: u64,
        completion_requested: bool,
        pageset_id: u16,
        ranges: &[(u32, u32)],
        payload: &[u8],
    ) -> Result<(), RingError> {
        let ranges: Vec<VmTransferPageRange> = ranges
            .iter()
            .map(|&(count, offset)| VmTransferPageRange {
                byte_count: count.into(),
                byte_offset: offset.into(),
            })
            .collect();
        let mut buf = scratch(payload.len() + PACKET_DESCRIPTOR_SIZE + 8 + 8 * ranges.len())?;
        let n = encode_xfer_pages(
            &mut buf,
            trans_id,
            completion_requested,
            pageset_id,
            &ranges,
            payload,
        )
        .map_err(RingError::Encode)?;
        self.write_raw(&buf[..n])
    }

    /// Writes `packet` (descriptor onwards, a multiple of 8 bytes, trailer excluded) as one
    /// packet, followed by the trailer. The bytes are not checked: fault injection uses
    /// this to hand the guest malformed packets.
    pub fn write_raw(&mut self, packet: &[u8]) -> Result<(), RingError> {
        self.check()?;
        let size = self.outgoing.size;
        let r = self
            .load(false, RING_READ_INDEX_OFFSET)
            .map_err(|c| self.fail(c))?;
        let r =
            check_ring_index(r, size).map_err(|_| self.fail(RingCorruption::BadReadIndex(r)))?;
        let w = self.out_write;
        let used = ((u64::from(w) + u64::from(size) - u64::from(r)) % u64::from(size)) as usize;
        let free = size as usize - used;
        let needed = packet.len() + PACKET_TRAILER_SIZE;
        // Strictly greater: a full ring would look empty (hyperv-facts.md 5.9).
        if free <= needed {
            self.stats.full += 1;
            if self.feature(false).map_err(|c| self.fail(c))? {
                let want = u32::try_from(needed).unwrap_or(u32::MAX);
                self.store(false, RING_PENDING_SEND_SZ_OFFSET, want)
                    .map_err(|c| self.fail(c))?;
                self.out_pending_set = true;
            }
            return Err(RingError::Full { needed, free });
        }
        self.outgoing
            .write(&self.mem, w, packet)
            .map_err(|e| self.fail(RingCorruption::Memory(e)))?;
        let trailer = PacketTrailer::new(w);
        let trailer_at = ((u64::from(w) + packet.len() as u64) % u64::from(size)) as u32;
        self.outgoing
            .write(&self.mem, trailer_at, trailer.as_bytes())
            .map_err(|e| self.fail(RingCorruption::Memory(e)))?;
        let new_w = ((u64::from(w) + needed as u64) % u64::from(size)) as u32;
        if self.out_pending_set {
            self.store(false, RING_PENDING_SEND_SZ_OFFSET, 0)
                .map_err(|c| self.fail(c))?;
            self.out_pending_set = false;
        }
        self.out_write = new_w;
        self.store(false, RING_WRITE_INDEX_OFFSET, new_w)
            .map_err(|c| self.fail(c))?;
        self.stats.packets_out += 1;

        // Linux `hv_signal_on_write`: no signal while the guest masks interrupts; else only
        // if the guest had consumed everything before this packet (it may be asleep).
        let mask = self
            .load(false, RING_INTERRUPT_MASK_OFFSET)
            .map_err(|c| self.fail(c))?;
        if mask != 0 {
            self.stats.masked_writes += 1;
            return Ok(());
        }
        let r_now = self
            .load(false, RING_READ_INDEX_OFFSET)
            .map_err(|c| self.fail(c))?;
        if r_now == w {
            self.signal_guest = true;
            self.stats.signals_to_guest += 1;
        }
        Ok(())
    }

    /// Free bytes in the host-to-guest ring (0 if the guest's read index is bad).
    pub fn outgoing_free(&self) -> usize {
        let size = self.outgoing.size;
        match self
            .load(false, RING_READ_INDEX_OFFSET)
            .ok()
            .and_then(|r| check_ring_index(r, size).ok())
        {
            Some(r) => {
                size as usize
                    - ((u64::from(self.out_write) + u64::from(size) - u64::from(r))
                        % u64::from(size)) as usize
            }
            None => 0,
        }
    }

    /// Overwrites a word of a control page (fault injection: corrupt indices the guest
    /// reads). `incoming` selects the guest-to-host ring.
    pub fn poke_control(
        &mut self,
        incoming: bool,
        offset: usize,
        value: u32,
    ) -> Result<(), MemError> {
        let ring = if incoming {
            &self.incoming
        } else {
            &self.outgoing
        };
        self.mem.store_u32(ring.control_gpa(offset), value)
    }

    /// Takes the "signal the guest" request the last operations made. [`crate::VmbusHost`]
    /// turns it into the channel's event flag; a standalone ring leaves it to the caller.
    pub fn take_guest_signal(&mut self) -> bool {
        std::mem::take(&mut self.signal_guest)
    }

    /// Takes problems not yet reported as violations.
    pub(crate) fn take_unreported(&mut self) -> (Option<RingCorruption>, Vec<WireError>) {
        (
            self.unreported.take(),
            std::mem::take(&mut self.unreported_malformed),
        )
    }
}

fn scratch(len: usize) -> Result<Vec<u8>, RingError> {
    let len = len + 8;
    if len > MAX_HOST_PACKET {
        return Err(RingError::Encode(WireError::TooLong));
    }
    Ok(vec![0u8; len])
}
